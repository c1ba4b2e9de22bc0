//! `mailproxy-operator`: the control plane of a mailproxy fleet.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mailproxy-operator", version, about = "Control plane of a mailproxy fleet")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML (or write one file per CRD with --out-dir).
    Crds {
        /// Write `<group>_<plural>.yaml` files into this directory instead of printing.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crds { out_dir: None } => {
            let documents: Vec<String> = mailproxy_crds::manifests::files()
                .into_iter()
                .map(|(_, yaml)| yaml)
                .collect();
            print!("{}", documents.join("---\n"));
        }
        Command::Crds {
            out_dir: Some(dir),
        } => {
            for (name, yaml) in mailproxy_crds::manifests::files() {
                let path = dir.join(name);
                std::fs::write(&path, yaml)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
        }
    }
    Ok(())
}
