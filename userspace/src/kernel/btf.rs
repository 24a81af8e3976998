//! Struct member offsets from a kernel's BTF (btf-rs, from the retis
//! project). Rust Aya programs have no CO-RE relocations, so the loader
//! resolves what the programs need here and passes it as globals.

use std::path::Path;

use anyhow::{Context as _, Result, anyhow, bail};
use btf_rs::{Btf, Type};

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

/// Struct offsets a program reads, resolved by `resolve` from `btf`:
/// `(offsets, None)`, or the default (marked not valid) and why not.
pub fn offsets_or_why<T: Default>(
    btf: Option<&Btf>,
    resolve: impl FnOnce(&Btf) -> Result<T>,
) -> (T, Option<String>) {
    let Some(btf) = btf else {
        return (T::default(), Some("no kernel BTF".into()));
    };
    match resolve(btf) {
        Ok(o) => (o, None),
        Err(e) => (T::default(), Some(format!("{e:#}"))),
    }
}

/// Byte offset of `member` in `struct name`, looking through anonymous
/// structs and unions. Bitfields are refused.
pub fn member_offset(btf: &Btf, name: &str, member: &str) -> Result<u32> {
    let types = btf
        .resolve_types_by_name(name)
        .map_err(|e| anyhow!("struct {name}: {e}"))?;
    for t in types {
        if let Type::Struct(s) = t
            && let Some(bits) = find_member(btf, &s, member)?
        {
            if bits % 8 != 0 {
                bail!("{name}.{member} is a bitfield");
            }
            return Ok(bits / 8);
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
            if let Type::Struct(inner) | Type::Union(inner) = inner
                && let Some(bits) = find_member(btf, &inner, member)?
            {
                return Ok(Some(m.bit_offset() + bits));
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

/// Largest kernel image hvprof will decompress (a vmlinux is ~50–100 MB).
const MAX_VMLINUX: u64 = 1 << 30;

/// BTF of another kernel, from raw BTF (`/sys/kernel/btf/vmlinux` copied
/// out), a vmlinux ELF, or a compressed boot image (bzImage with an xz,
/// gzip or zstd payload, as Debian's `/boot/vmlinuz-*`).
pub fn load_any(path: &Path) -> Result<Btf> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.starts_with(&[0x9f, 0xeb]) {
        return Btf::from_bytes(&bytes)
            .map_err(|e| anyhow!("{}: invalid raw BTF: {e}", path.display()));
    }
    let elf = if bytes.starts_with(b"\x7fELF") {
        bytes
    } else {
        decompress_boot_image(&bytes).with_context(|| {
            format!(
                "{} is neither BTF, an ELF vmlinux nor a compressed kernel image",
                path.display()
            )
        })?
    };
    let btf =
        elf_btf(&elf).with_context(|| format!("{}: no usable .BTF section", path.display()))?;
    Btf::from_bytes(&btf).map_err(|e| anyhow!("{}: invalid BTF: {e}", path.display()))
}

/// BTF of a module `.ko`, resolved against its kernel's `base`.
pub fn load_module(path: &Path, base: &Btf) -> Result<Btf> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let btf = elf_btf(&bytes).with_context(|| format!("{}: no .BTF section", path.display()))?;
    Btf::from_split_bytes(&btf, base)
        .map_err(|e| anyhow!("{}: invalid module BTF: {e}", path.display()))
}

/// The raw `.BTF` section of an ELF image.
fn elf_btf(bytes: &[u8]) -> Result<Vec<u8>> {
    use elf::{ElfBytes, endian::AnyEndian};
    let elf =
        ElfBytes::<AnyEndian>::minimal_parse(bytes).map_err(|e| anyhow!("not an ELF file: {e}"))?;
    let hdr = elf
        .section_header_by_name(".BTF")
        .map_err(|e| anyhow!("reading ELF sections: {e}"))?
        .ok_or_else(|| anyhow!("no .BTF section"))?;
    let (data, compression) = elf
        .section_data(&hdr)
        .map_err(|e| anyhow!("reading .BTF: {e}"))?;
    if compression.is_some() {
        bail!("compressed .BTF sections are not supported");
    }
    Ok(data.to_vec())
}

/// Finds the compressed vmlinux inside a boot image (as the kernel's
/// `extract-vmlinux` does: try each compression magic, keep the first
/// payload that decompresses to an ELF file).
fn decompress_boot_image(image: &[u8]) -> Result<Vec<u8>> {
    use std::io::Read as _;
    const MAGICS: [(&str, &[u8]); 3] = [
        ("xz", b"\xfd7zXZ\x00"),
        ("gzip", b"\x1f\x8b\x08"),
        ("zstd", b"\x28\xb5\x2f\xfd"),
    ];
    for (kind, magic) in MAGICS {
        let mut from = 0;
        while let Some(pos) = find(&image[from..], magic).map(|p| p + from) {
            let payload = &image[pos..];
            let mut out = Vec::new();
            let ok = match kind {
                "xz" => liblzma::read::XzDecoder::new(payload)
                    .take(MAX_VMLINUX)
                    .read_to_end(&mut out)
                    .is_ok(),
                "gzip" => flate2::read::GzDecoder::new(payload)
                    .take(MAX_VMLINUX)
                    .read_to_end(&mut out)
                    .is_ok(),
                _ => zstd::stream::read::Decoder::new(payload)
                    .map(|d| d.take(MAX_VMLINUX).read_to_end(&mut out).is_ok())
                    .unwrap_or(false),
            };
            // A payload may decode with trailing garbage: keep what came out.
            if (ok || !out.is_empty()) && out.starts_with(b"\x7fELF") {
                return Ok(out);
            }
            from = pos + 1;
        }
    }
    bail!("no xz, gzip or zstd compressed vmlinux found inside")
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
