//! Builds the eBPF object (crate `hvprof-ebpf`, target bpfel-unknown-none)
//! with aya-build and the Debian toolchain linked as rustup toolchain
//! `debian` by `cargo xtask setup` (it ships a prebuilt `core` for the BPF
//! target, so no nightly and no `-Z build-std`). The object lands in
//! `OUT_DIR/hvprof-ebpf` and is embedded in the binary.
fn main() -> anyhow::Result<()> {
    let toolchain = std::env::var("HVPROF_EBPF_TOOLCHAIN").unwrap_or_else(|_| "debian".into());
    println!("cargo:rerun-if-env-changed=HVPROF_EBPF_TOOLCHAIN");
    // aya-ebpf needs one unstable feature on the BPF target, hvprof-ebpf
    // another (the compare-exchange intrinsic); unlock them for those
    // crates alone. (Not "1": aya-build would then add -Z build-std.)
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf,hvprof_ebpf") };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../ebpf/hvprof-ebpf")
        .canonicalize()?;
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", root.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "hvprof-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
