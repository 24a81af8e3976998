//! tracefs: finding (or mounting) it, and reading tracepoint formats so the
//! eBPF programs get this kernel's field offsets.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::{Context as _, Result, bail};

const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// The tracefs mount point; mounts it at `/sys/kernel/tracing` when no
/// tracefs is mounted (as root, like `perf trace` asks you to). The result
/// is cached for the life of the process.
pub fn root() -> Result<&'static Path> {
    static ROOT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    ROOT.get_or_init(|| find_or_mount().map_err(|e| format!("{e:#}")))
        .as_deref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn find_or_mount() -> Result<PathBuf> {
    for c in CANDIDATES {
        if Path::new(c).join("events").is_dir() {
            return Ok(PathBuf::from(c));
        }
    }
    let target = CANDIDATES[0];
    let rc = nix_mount("tracefs", target, "tracefs");
    if rc != 0 {
        bail!(
            "tracefs is not mounted and mounting it at {target} failed ({}); mount it with `mount -t tracefs nodev {target}`",
            std::io::Error::last_os_error()
        );
    }
    log::info!("mounted tracefs at {target}");
    Ok(PathBuf::from(target))
}

fn nix_mount(source: &str, target: &str, fstype: &str) -> i32 {
    let (Ok(src), Ok(tgt), Ok(fs)) = (
        std::ffi::CString::new(source),
        std::ffi::CString::new(target),
        std::ffi::CString::new(fstype),
    ) else {
        return -1;
    };
    // SAFETY: valid NUL-terminated strings; no data argument.
    unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) }
}

/// Whether tracepoint `category:name` exists on this kernel.
pub fn tracepoint_exists(category: &str, name: &str) -> bool {
    root().is_ok_and(|r| {
        r.join("events")
            .join(category)
            .join(name)
            .join("id")
            .exists()
    })
}

/// One field of a tracepoint record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

/// The fields of tracepoint `category:name`, by name, from its `format`.
pub fn format(category: &str, name: &str) -> Result<HashMap<String, Field>> {
    let path = root()?
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "tracepoint {category}:{name} is not available here ({})",
            path.display()
        )
    })?;
    parse_format(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Parses the text of a tracepoint `format` file.
pub fn parse_format(text: &str) -> Result<HashMap<String, Field>> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut decl = None;
        let mut offset = None;
        let mut size = None;
        for part in rest.split(';') {
            let part = part.trim();
            if let Some(v) = part.strip_prefix("offset:") {
                offset = v.parse::<u32>().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.parse::<u32>().ok();
            } else if decl.is_none() && !part.is_empty() {
                decl = Some(part);
            }
        }
        let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
            bail!("malformed field line: {line}");
        };
        // The name is the last identifier of the declaration, before any
        // array suffix: `__u8 saddr[4]` -> `saddr`.
        let name = decl
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()
            .unwrap_or(decl);
        let name = name.split('[').next().unwrap_or(name);
        fields.insert(name.to_string(), Field { offset, size });
    }
    if fields.is_empty() {
        bail!("no fields found");
    }
    Ok(fields)
}

/// Offset of `field`, which must have `size` bytes, in `fields`.
pub fn offset_of(fields: &HashMap<String, Field>, field: &str, size: u32) -> Result<u32> {
    match fields.get(field) {
        Some(f) if f.size == size => Ok(f.offset),
        Some(f) => bail!("field {field} has {} bytes, expected {size}", f.size),
        None => bail!("field {field} missing"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_inet_sock_set_state() {
        let text = "name: inet_sock_set_state\nID: 2287\nformat:\n\
            \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
            \tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
            \tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;\n\n\
            print fmt: \"x\"";
        let f = parse_format(text).expect("parses");
        assert_eq!(f["skaddr"], Field { offset: 8, size: 8 });
        assert_eq!(
            f["saddr_v6"],
            Field {
                offset: 40,
                size: 16
            }
        );
        assert_eq!(offset_of(&f, "skaddr", 8).ok(), Some(8));
        assert!(offset_of(&f, "skaddr", 4).is_err());
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_format("nothing here").is_err());
        assert!(parse_format("field:int x; offset:zz; size:4;").is_err());
    }
}
