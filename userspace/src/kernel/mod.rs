//! What the running kernel offers: tracefs and tracepoint formats, struct
//! offsets from BTF, symbols, and which attach methods work here. Everything
//! is detected at run time; nothing is assumed from a kernel version.

pub mod btf;
pub mod features;
pub mod tracefs;

/// `uname -r` of the running kernel.
pub fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
