//! `cargo xtask setup`: installs what a fresh Debian 12 machine of this
//! kind lacks, step by step, skipping each step whose result is already
//! there (a second run takes a few seconds). See
//! docs/ebpf-toolchain.md for why these packages.

use std::{
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::run_cmd;

/// Debian packages: the eBPF toolchain (Debian's rustc with a prebuilt
/// `core` for bpfel-unknown-none, LLVM 22 for bpf-linker), bpftool, and
/// the programs hvprof drives or compares against.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "clang-22",
    "lld-22",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
    "haproxy",
    "wrk",
    "nginx-light",
    // The report test opens index.html in headless Chromium.
    "chromium",
    "iproute2",
    "iptables",
    // The VM test bed: static glibc for the guest's hvprof, strip, and
    // what the initramfs is made of.
    "libc6-dev",
    "binutils",
    "busybox-static",
    "cpio",
];

/// QEMU comes from bookworm-backports: Debian 12's own 7.2 conflicts with
/// the preinstalled qemu-utils 10.
const BACKPORTS: &[&str] = &["qemu-system-x86"];
const BACKPORTS_SOURCE: &str = "/etc/apt/sources.list.d/bookworm-backports.sources";
const BACKPORTS_TEXT: &str = "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    let t0 = Instant::now();
    step("Debian packages", apt_packages)?;
    step("QEMU (bookworm-backports)", backports)?;
    step("bpf-linker", bpf_linker)?;
    step("rustup toolchain `debian`", debian_toolchain)?;
    eprintln!("[setup] done in {:.1}s", t0.elapsed().as_secs_f64());
    Ok(())
}

fn step(name: &str, f: fn() -> Result<String>) -> Result<()> {
    let t = Instant::now();
    let what = f().with_context(|| format!("setup step `{name}`"))?;
    eprintln!("[setup] {name}: {what} ({:.1}s)", t.elapsed().as_secs_f64());
    Ok(())
}

fn apt_packages() -> Result<String> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok("all installed".into());
    }
    eprintln!("[setup] installing {}", missing.join(" "));
    apt(&["update"])?;
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args)?;
    Ok(format!("installed {}", missing.len()))
}

fn apt(args: &[&str]) -> Result<()> {
    run_cmd(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["-o", "DPkg::Lock::Timeout=300", "-q"])
            .args(args),
    )
}

fn backports() -> Result<String> {
    let missing: Vec<&str> = BACKPORTS
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok("installed".into());
    }
    let path = std::path::Path::new(BACKPORTS_SOURCE);
    let listed = std::fs::read_dir("/etc/apt/sources.list.d")
        .map(|d| {
            d.flatten().any(|e| {
                std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("bookworm-backports"))
            })
        })
        .unwrap_or(false);
    if !listed {
        std::fs::write(path, BACKPORTS_TEXT)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    apt(&["update"])?;
    let mut args = vec![
        "install",
        "-y",
        "--no-install-recommends",
        "-t",
        "bookworm-backports",
    ];
    args.extend(&missing);
    apt(&args)?;
    Ok(format!("installed {}", missing.join(" ")))
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn bpf_linker() -> Result<String> {
    let have = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if let Some(v) = &have
        && v.contains(BPF_LINKER_VERSION)
    {
        return Ok(format!("present ({v})"));
    }
    // Debian 12 has LLVM 22 from the packages above, not the default 23.
    run_cmd(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .env(
                "PATH",
                format!(
                    "/usr/lib/llvm-22/bin:{}",
                    std::env::var("PATH").unwrap_or_default()
                ),
            ),
    )?;
    Ok(format!("installed {BPF_LINKER_VERSION}"))
}

fn debian_toolchain() -> Result<String> {
    let list = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("rustup is required (the machine's Rust toolchain)")?;
    if String::from_utf8_lossy(&list.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some("debian"))
    {
        return Ok("linked".into());
    }
    if !std::path::Path::new("/usr/bin/rustc").exists() {
        bail!("/usr/bin/rustc missing: the rustc-web package did not install");
    }
    run_cmd(Command::new("rustup").args(["toolchain", "link", "debian", "/usr"]))?;
    Ok("linked /usr as `debian`".into())
}
