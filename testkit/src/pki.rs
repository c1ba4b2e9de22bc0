//! A test PKI: a CA and a certificate for `localhost` and 127.0.0.1, in PEM files, re-issued
//! in place the way Kubernetes updates a mounted Secret.

use std::path::{Path, PathBuf};

use tempfile::TempDir;

/// A CA and a certificate for `localhost` and 127.0.0.1 signed by it, in PEM files.
pub struct Pki {
    dir: TempDir,
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let pki = Self { dir };
        pki.issue("server");
        pki
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("server.crt")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    /// (Re)issues `<stem>.crt`/`.key` under a CA kept in `ca.crt`/`ca.key` (created once).
    /// Written to temporary names and renamed, as a Secret update is seen by a pod.
    pub fn issue(&self, stem: &str) {
        let ca_key_path = self.dir.path().join("ca.key");
        let ca_key = match std::fs::read_to_string(&ca_key_path) {
            Ok(pem) => rcgen::KeyPair::from_pem(&pem).expect("CA key"),
            Err(_) => rcgen::KeyPair::generate().expect("CA key"),
        };
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "mailproxy test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = rcgen::Issuer::new(ca_params, &ca_key);
        if !self.ca().exists() {
            replace(&self.ca(), &ca_cert.pem());
            replace(&ca_key_path, &ca_key.serialize_pem());
        }
        let key = rcgen::KeyPair::generate().expect("server key");
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
        let cert = params.signed_by(&key, &issuer).expect("server certificate");
        replace(
            &self.dir.path().join(format!("{stem}.key")),
            &key.serialize_pem(),
        );
        replace(&self.dir.path().join(format!("{stem}.crt")), &cert.pem());
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Writes `text` to a temporary name and renames it over `path`.
pub fn replace(path: &Path, text: &str) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text).expect("write test file");
    std::fs::rename(&temporary, path).expect("rename test file");
}
