//! CPU time of processes, from Linux's `/proc/<pid>/stat`: what a proxy spends per login or per
//! request. On a 2-core machine the proxy shares the cores with the load generator and the
//! backend, so a proxy that needs less CPU also leaves more to them, and requests per second
//! alone understate the difference; CPU per operation shows it directly.

use std::process::Command;

use anyhow::Context;

/// User plus system CPU seconds used so far by each of `pids` (all their threads), summed.
pub fn cpu_seconds(pids: &[u32]) -> anyhow::Result<f64> {
    let ticks_per_second = clock_ticks()?;
    let mut ticks = 0u64;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
        ticks += process_ticks(&stat)
            .with_context(|| format!("/proc/{pid}/stat has no utime and stime: {stat}"))?;
    }
    Ok(ticks as f64 / ticks_per_second)
}

/// `utime + stime` of a `/proc/<pid>/stat` line (fields 14 and 15; the command name in field 2
/// may hold spaces, so fields are counted after its closing parenthesis).
fn process_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks() -> anyhow::Result<f64> {
    let output = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .context("cannot run getconf CLK_TCK")?;
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .context("getconf CLK_TCK did not print a number")
}

/// `pid` and its children (nginx's master and its workers).
pub fn process_tree(pid: u32) -> anyhow::Result<Vec<u32>> {
    let output = Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .context("cannot run pgrep")?;
    std::iter::once(Ok(pid))
        .chain(
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .map(|line| line.trim().parse().context("pgrep printed a non-number")),
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_read_after_the_command_name() {
        let stat = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 500 0 0 0 \
                    1234 567 0 0 20 0 3 0 100 1000 200";
        assert_eq!(process_ticks(stat), Some(1234 + 567));
        assert_eq!(process_ticks("garbage"), None);
    }

    #[test]
    fn a_process_that_is_gone_is_an_error() {
        let error = cpu_seconds(&[u32::MAX]).unwrap_err().to_string();
        assert!(error.contains("/proc/4294967295/stat"), "{error}");
    }
}
