//! Struct member offsets from a kernel's BTF (btf-rs, from the retis
//! project). Rust Aya programs have no CO-RE relocations, so the loader
//! resolves what the programs need here and passes it as globals.

use std::path::Path;

use anyhow::{Context as _, Result, anyhow, bail};
use btf_rs::{Btf, BtfType, Type};

/// The running kernel's BTF.
pub fn running() -> Result<Btf> {
    let path = Path::new("/sys/kernel/btf/vmlinux");
    Btf::from_file(path).map_err(|e| {
        anyhow!(
            "reading {}: {e}; hvprof needs a kernel with BTF (CONFIG_DEBUG_INFO_BTF)",
            path.display()
        )
    })
}

/// Byte offset of `member` in `struct name`, looking through anonymous
/// structs and unions. Bitfields are refused.
pub fn member_offset(btf: &Btf, name: &str, member: &str) -> Result<u32> {
    let types = btf
        .resolve_types_by_name(name)
        .map_err(|e| anyhow!("struct {name}: {e}"))?;
    for t in types {
        if let Type::Struct(s) = t {
            if let Some(bits) = find_member(btf, &s, member)? {
                if bits % 8 != 0 {
                    bail!("{name}.{member} is a bitfield");
                }
                return Ok(bits / 8);
            }
        }
    }
    bail!("struct {name} has no member {member}")
}

/// Bit offset of `member` in `s`, recursing into anonymous members.
fn find_member(btf: &Btf, s: &btf_rs::Struct, member: &str) -> Result<Option<u32>> {
    for m in &s.members {
        let mname = btf.resolve_name(m).unwrap_or_default();
        if mname == member {
            if m.bitfield_size().is_some_and(|b| b != 0) {
                bail!("{member} is a bitfield");
            }
            return Ok(Some(m.bit_offset()));
        }
        if mname.is_empty() {
            let inner = btf.resolve_chained_type(m).with_context(|| {
                format!("resolving anonymous member while looking for {member}")
            })?;
            if let Type::Struct(inner) | Type::Union(inner) = inner {
                if let Some(bits) = find_member(btf, &inner, member)? {
                    return Ok(Some(m.bit_offset() + bits));
                }
            }
        }
    }
    Ok(None)
}

/// Whether `func` is a function (BTF_KIND_FUNC) in `btf`.
pub fn has_function(btf: &Btf, func: &str) -> bool {
    btf.resolve_types_by_name(func)
        .is_ok_and(|ts| ts.iter().any(|t| matches!(t, Type::Func(_))))
}

/// Name of a BTF object, for error messages.
#[allow(dead_code)]
pub fn name_of(btf: &Btf, t: &dyn BtfType) -> String {
    btf.resolve_name(t).unwrap_or_default()
}
