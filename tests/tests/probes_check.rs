//! `hvprof probes check` against the Debian kernel the VM test bed boots
//! (its compressed vmlinuz and module tree, from `cargo xtask testbed`).

use std::path::PathBuf;

use hvprof_tests::{hvprof, skip, workspace_root};
use serde_json::Value;

/// The unpacked Debian kernel package in the test bed cache:
/// (vmlinuz, module directory).
fn debian_kernel() -> Option<(PathBuf, PathBuf)> {
    let cache = workspace_root().join("target/testbed/cache");
    for e in std::fs::read_dir(cache).ok()?.flatten() {
        let dir = e.path();
        if !dir.is_dir() || !e.file_name().to_string_lossy().starts_with("linux-image-") {
            continue;
        }
        let boot = std::fs::read_dir(dir.join("boot")).ok()?;
        let vmlinuz = boot.flatten().map(|b| b.path()).find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })?;
        let modules = dir.join("lib/modules");
        if modules.is_dir() {
            return Some((vmlinuz, modules));
        }
    }
    None
}

#[test]
fn every_nic_path_is_found_in_the_debian_kernel_and_its_modules() {
    let Some((vmlinuz, modules)) = debian_kernel() else {
        skip(
            "probes_check_debian_kernel",
            "no Debian kernel package in target/testbed (run `cargo xtask testbed`)",
        );
        return;
    };
    let out = hvprof(&[
        "probes",
        "check",
        "--btf",
        vmlinuz.to_str().expect("utf8"),
        "--modules",
        modules.to_str().expect("utf8"),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON list");
    for r in &rows {
        for k in ["name", "layer", "path", "function"] {
            assert!(r[k].is_string(), "{k} in {r}");
        }
        assert!(r["found"].is_boolean(), "{r}");
    }
    for path in [
        "virtio", "vmxnet3", "e1000", "e1000e", "rtl8139", "netvsc", "netfront", "netback",
    ] {
        let of_path: Vec<&Value> = rows.iter().filter(|r| r["path"] == path).collect();
        assert!(!of_path.is_empty(), "no catalog rows for {path}");
        for r in of_path {
            assert_eq!(r["found"], true, "{path}: {r}");
        }
    }
    // Without the module tree, module functions are reported with the reason.
    let out = hvprof(&[
        "probes",
        "check",
        "--btf",
        vmlinuz.to_str().expect("utf8"),
        "--json",
    ]);
    assert!(out.status.success());
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON list");
    let vmx = rows
        .iter()
        .find(|r| r["name"] == "vmxnet3:xmit_frame")
        .expect("vmxnet3 row");
    assert_eq!(vmx["found"], false);
    assert!(
        vmx["reason"].as_str().unwrap_or("").contains("--modules"),
        "{vmx}"
    );
}

#[test]
fn probes_check_rejects_what_is_not_a_kernel() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let junk = tmp.path().join("junk");
    std::fs::write(&junk, b"this is not a kernel").expect("write");
    for (args, needle) in [
        (
            vec!["probes", "check", "--btf", "/nonexistent/vmlinux"],
            "/nonexistent/vmlinux",
        ),
        (
            vec!["probes", "check", "--btf", junk.to_str().expect("utf8")],
            "neither BTF",
        ),
        (
            vec![
                "probes",
                "check",
                "--btf",
                junk.to_str().expect("utf8"),
                "--modules",
                "/nonexistent",
            ],
            "not a directory",
        ),
    ] {
        let out = hvprof(&args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
}
