//! What the running kernel offers: tracefs and tracepoint formats, struct
//! offsets from BTF, symbols, and which attach methods work here. Everything
//! is detected at run time; nothing is assumed from a kernel version.

pub mod btf;
pub mod features;
pub mod kallsyms;
pub mod stat;
pub mod tracefs;

/// `uname -r` of the running kernel.
pub fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`, so of every
/// event timestamp.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
