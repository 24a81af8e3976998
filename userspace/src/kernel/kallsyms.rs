//! `/proc/kallsyms`, read and parsed once per process: the text symbols
//! of the kernel and its loaded modules, for attach decisions (which
//! functions exist, where) and for naming sampled kernel frames.

use std::sync::{Arc, OnceLock};

/// One text symbol (`t`, `T`, `w`, `W`).
#[derive(Debug, Clone)]
pub struct Symbol {
    /// 0 when addresses are hidden from this user.
    pub addr: u64,
    /// `t`/`T` functions, `w`/`W` weak symbols.
    pub kind: char,
    pub name: Arc<str>,
    /// Module name, empty for vmlinux.
    pub module: Arc<str>,
}

/// Every text symbol, in file order.
pub fn text_symbols() -> &'static [Symbol] {
    static SYMBOLS: OnceLock<Vec<Symbol>> = OnceLock::new();
    SYMBOLS.get_or_init(|| {
        let Ok(text) = std::fs::read_to_string("/proc/kallsyms") else {
            return Vec::new();
        };
        let vmlinux: Arc<str> = Arc::from("");
        let mut out = Vec::with_capacity(200_000);
        for line in text.lines() {
            let mut it = line.split_ascii_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            let kind = match kind {
                "t" | "T" | "w" | "W" => kind.chars().next().unwrap_or('t'),
                _ => continue,
            };
            let module = it.next().map_or_else(
                || vmlinux.clone(),
                |m| Arc::from(m.trim_start_matches('[').trim_end_matches(']')),
            );
            out.push(Symbol {
                addr: u64::from_str_radix(addr, 16).unwrap_or(0),
                kind,
                name: Arc::from(name),
                module,
            });
        }
        out
    })
}
