//! CPU time and resident memory of a process, from /proc, and a description
//! of the machine for the report.

use serde::Serialize;
use std::time::Duration;

/// Kernel clock ticks per second, the unit of /proc/PID/stat's CPU times.
/// Linux has reported 100 on every architecture we run on since 2.6.
const CLK_TCK: f64 = 100.0;

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// User plus system CPU time of all the process's threads.
    pub cpu: Duration,
    pub rss_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("process {pid}: {source}")]
    Read { pid: u32, source: std::io::Error },
    #[error("process {pid}: unexpected /proc/{pid}/stat format")]
    Format { pid: u32 },
}

/// Reads `pid`'s CPU time and RSS.
pub fn usage(pid: u32) -> Result<Usage, ProcError> {
    let read = |file: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{file}"))
            .map_err(|source| ProcError::Read { pid, source })
    };
    let stat = read("stat")?;
    let (utime, stime) = parse_stat(&stat).ok_or(ProcError::Format { pid })?;
    let status = read("status")?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    Ok(Usage {
        cpu: Duration::from_secs_f64((utime + stime) as f64 / CLK_TCK),
        rss_bytes: rss_kb * 1024,
    })
}

/// utime and stime (fields 14 and 15), counted after the parenthesised
/// command name, which may itself hold spaces and parentheses.
fn parse_stat(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

/// The machine a report was measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    /// Online CPUs of the machine.
    pub cpus: usize,
    /// CPUs this generator may run on (fewer when pinned).
    pub generator_cpus: usize,
    pub kernel: String,
    pub memory_bytes: u64,
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    Machine {
        cpu_model: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_else(|| "unknown".into()),
        cpus: cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count()
            .max(1),
        generator_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
        memory_bytes: meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_an_awkward_command_name() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 731 52 0 0 20 0 9 0 1 2 3";
        assert_eq!(parse_stat(stat), Some((731, 52)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn own_usage_is_readable_and_grows() {
        let before = usage(std::process::id()).unwrap();
        let mut x = 0u64;
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_millis(60) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let after = usage(std::process::id()).unwrap();
        assert!(after.cpu > before.cpu);
        assert!(after.rss_bytes > 0);
    }
}
