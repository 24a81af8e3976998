//! `/proc/stat`: the CPU time the hypervisor under this machine took from
//! it (steal). A vCPU that wanted to run while the host ran something
//! else accrues steal; to the guest's threads that time looks like time
//! on a CPU, and no CPU sample can land in it. A bare-metal host has none.

/// CPU time stolen from all of this machine's CPUs since boot, in ns;
/// none if `/proc/stat` is unreadable or has no steal column.
pub fn steal_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    // SAFETY: plain sysconf call.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .ok()
        .filter(|h| *h > 0)?;
    parse_steal_ticks(&text).map(|ticks| ticks.saturating_mul(1_000_000_000 / hz))
}

/// The steal column (the 8th number) of the all-CPU `cpu` line, in ticks.
fn parse_steal_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    line.split_whitespace().nth(8)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_steal_column_of_the_all_cpu_line() {
        let stat = "cpu  6952394 3732 1321676 4535279 17327 0 581563 22999 0 0\n\
                    cpu0 3514045 2059 657532 2230604 10580 0 290826 11325 0 0\n";
        assert_eq!(parse_steal_ticks(stat), Some(22999));
        // A kernel without the column, and no all-CPU line.
        assert_eq!(parse_steal_ticks("cpu  1 2 3 4 5 6 7\n"), None);
        assert_eq!(parse_steal_ticks("cpu0 1 2 3 4 5 6 7 8\n"), None);
        assert_eq!(parse_steal_ticks(""), None);
    }

    #[test]
    fn this_machine_reports_a_steal_figure() {
        // Every Linux since 2.6.11 has the column; it only grows.
        let a = steal_ns().expect("steal in /proc/stat");
        let b = steal_ns().expect("steal in /proc/stat");
        assert!(b >= a);
    }
}
