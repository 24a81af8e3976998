//! `cargo xtask testbed`: the QEMU test bed for the `vm-*` topologies, built
//! from Debian packages only into a cached directory (`target/testbed` by
//! default) and rebuilt only when an input changes:
//!
//! - `vmlinuz` and the NIC/9p/virtio modules of a Debian kernel package
//!   (`linux-image-6.1.0-*-amd64`, what `linux-image-amd64` depends on),
//!   fetched with `apt-get download` and unpacked, never installed;
//! - `initramfs.cpio.gz`: busybox-static, those modules with a load order
//!   resolved from each module's `depends=`, Debian's HAProxy with every
//!   library `ldd` lists at its own path, and the guest `/init` below;
//! - `share/hvprof`: a statically linked hvprof (glibc, `+crt-static`),
//!   built into its own target dir (`target/testbed/cargo`), stripped,
//!   shared with the guest over 9p;
//! - `testbed.json`: what went in (versions, fingerprints) and how long the
//!   build took. hvprof reads it to put the guest kernel into results.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    hash::{Hash as _, Hasher as _},
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{root, run_cmd};

/// Modules the guest loads (dependencies are added and ordered from each
/// module's `depends=`). `8139cp` drives QEMU's rtl8139 (the C+ chip).
const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "vmxnet3",
    "e1000",
    "e1000e",
    "8139cp",
    "8139too",
    "9pnet_virtio",
    "9p",
    "virtio_console",
];

/// Modules kept next to the initramfs (not loaded) for `probes check
/// --modules`: the NIC paths this machine cannot run.
const EXTRA_MODULES: &[&str] = &["hv_netvsc", "xen-netfront", "xen-netback"];

/// Version of the layout below; bump to force a rebuild.
const LAYOUT: u32 = 1;

/// The guest's `/init`. Mounts, loads modules, configures the one NIC from
/// `hvp.ip=` on the kernel command line, mounts the two 9p shares
/// (`hvtb`: the test bed's `share/`, read-only; `hvrun`: the run's
/// directory, read-write) and serves line commands on the virtio-serial
/// port `hv.ctl`: `hello` → `ready KERNEL NCPU NIC DRIVER`, `start` →
/// HAProxy with `/mnt/run/haproxy.cfg` → `ok PID` or `err ...`, `stop`,
/// `agent HOST:PORT` → `hvprof agent` streaming to that collector with the
/// token in `/mnt/run/agent.token` → `ok PID`, `poweroff`.
const INIT: &str = r#"#!/bin/busybox sh
# hvprof test-bed guest init (written by `cargo xtask testbed`).
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp /run /mnt/tb /mnt/run
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
for m in $(cat /etc/hvprof/modules); do insmod /lib/modules/hvprof/$m.ko 2>/dev/null; done
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1="*) echo "${w#*=}";; esac; done; }
ip link set lo up
NIC=
for d in /sys/class/net/*; do n=${d##*/}; [ "$n" = lo ] || { NIC=$n; break; }; done
DRV=none
if [ -n "$NIC" ]; then
  ip addr add "$(arg hvp.ip)" dev "$NIC"
  ip link set "$NIC" up
  DRV=$(basename "$(readlink /sys/class/net/$NIC/device/driver)")
fi
mount -t 9p -o trans=virtio,version=9p2000.L hvtb /mnt/tb 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L hvrun /mnt/run 2>/dev/null
ulimit -n 200000
PORT=
for p in /sys/class/virtio-ports/*; do [ "$(cat $p/name 2>/dev/null)" = hv.ctl ] && PORT=/dev/${p##*/}; done
if [ -z "$PORT" ]; then echo "hvprof: no hv.ctl port" > /dev/console; poweroff -f; fi
stop_haproxy() {
  [ -f /run/haproxy.pid ] || return 0
  for p in $(cat /run/haproxy.pid); do kill "$p" 2>/dev/null; done
  i=0
  while [ $i -lt 50 ]; do
    alive=
    for p in $(cat /run/haproxy.pid); do [ -d /proc/$p ] && alive=1; done
    [ -z "$alive" ] && break
    sleep 0.1; i=$((i+1))
  done
  for p in $(cat /run/haproxy.pid); do kill -9 "$p" 2>/dev/null; done
  rm -f /run/haproxy.pid
}
exec 3<>"$PORT"
while true; do
  while read -r cmd rest <&3; do
    case "$cmd" in
      hello) echo "ready $(uname -r) $(nproc) ${NIC:-none} $DRV" >&3 ;;
      start)
        stop_haproxy
        if haproxy -f /mnt/run/haproxy.cfg -D -p /run/haproxy.pid > /mnt/run/haproxy.log 2>&1; then
          echo "ok $(cat /run/haproxy.pid | tr '\n' ' ')" >&3
        else
          echo "err haproxy failed: $(tail -n 3 /mnt/run/haproxy.log | tr '\n' ' ')" >&3
        fi ;;
      stop) stop_haproxy; echo ok >&3 ;;
      agent)
        # `agent HOST:PORT`: stream this guest's probes to the collector.
        [ -f /run/agent.pid ] && kill "$(cat /run/agent.pid)" 2>/dev/null
        /mnt/tb/hvprof agent --collector "$rest" --token /mnt/run/agent.token ${NIC:+--dev $NIC} > /mnt/run/agent.log 2>&1 &
        echo $! > /run/agent.pid
        echo "ok $!" >&3 ;;
      poweroff) stop_haproxy; echo ok >&3; sync; poweroff -f ;;
      *) echo "err unknown command '$cmd'" >&3 ;;
    esac
  done
  sleep 0.2
done
"#;

/// Arguments of `cargo xtask testbed`.
#[derive(clap::Args, Debug)]
pub struct TestbedArgs {
    /// Output directory (default: target/testbed).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Kernel package (default: what `linux-image-amd64` depends on).
    #[arg(long, value_name = "PKG")]
    pub kernel: Option<String>,
    /// Rebuild even if nothing changed.
    #[arg(long)]
    pub force: bool,
}

/// Builds (or confirms) the test bed.
pub fn run(args: &TestbedArgs) -> Result<()> {
    let t0 = Instant::now();
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| root().join("target/testbed"));
    let cache = dir.join("cache");
    std::fs::create_dir_all(&cache)
        .with_context(|| format!("cannot create {}", cache.display()))?;
    for tool in ["apt-get", "dpkg-deb", "cpio", "gzip", "strip"] {
        which(tool)?;
    }

    // 1. The kernel package: name and candidate version, .deb in the cache.
    let pkg = match &args.kernel {
        Some(p) => p.clone(),
        None => kernel_package()?,
    };
    let version = apt_candidate(&pkg)?;
    let deb = fetch_deb(&cache, &pkg, &version)?;
    let kdir = cache.join(format!("{pkg}_{version}"));
    if !kdir.join(".unpacked").exists() {
        eprintln!("[testbed] unpacking {}", deb.display());
        let _ = std::fs::remove_dir_all(&kdir);
        std::fs::create_dir_all(&kdir)?;
        run_cmd(Command::new("sh").arg("-c").arg(format!(
            "dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}' --wildcards './boot/vmlinuz-*' './lib/modules/*'",
            deb.display(),
            kdir.display()
        )))?;
        std::fs::write(kdir.join(".unpacked"), "")?;
    }
    let release = only_dir(&kdir.join("lib/modules"))?;
    let vmlinuz = kdir.join(format!("boot/vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        bail!("{} has no {}", deb.display(), vmlinuz.display());
    }
    let index = index_modules(&kdir.join("lib/modules").join(&release))?;
    let order = load_order(&index, MODULES)?;

    // 2. What goes into the initramfs: busybox, HAProxy and its libraries.
    let busybox = PathBuf::from("/bin/busybox");
    if !is_static(&busybox)? {
        bail!(
            "/bin/busybox is not statically linked: install busybox-static (apt-get install busybox-static)"
        );
    }
    let haproxy = PathBuf::from("/usr/sbin/haproxy");
    if !haproxy.is_file() {
        bail!("/usr/sbin/haproxy missing: install haproxy (cargo xtask setup)");
    }
    let libs = ldd(&haproxy)?;

    let mut fp = Fingerprint::default();
    fp.text(&LAYOUT.to_string());
    fp.text(INIT);
    fp.text(&format!("{pkg}={version}"));
    fp.text(&order.join(","));
    for f in std::iter::once(&busybox)
        .chain(std::iter::once(&haproxy))
        .chain(libs.iter())
    {
        fp.file(f)?;
    }
    let initrd_key = fp.hex();

    let manifest_path = dir.join("testbed.json");
    let old = std::fs::read_to_string(&manifest_path).unwrap_or_default();
    let old_key = json_str(&old, "initramfs_fingerprint");
    let initrd = dir.join("initramfs.cpio.gz");
    let kernel_out = dir.join("vmlinuz");
    let mut rebuilt = Vec::new();
    if args.force
        || old_key.as_deref() != Some(initrd_key.as_str())
        || !initrd.is_file()
        || !kernel_out.is_file()
    {
        let t = Instant::now();
        build_initramfs(&dir, &busybox, &haproxy, &libs, &index, &order, &initrd)?;
        std::fs::copy(&vmlinuz, &kernel_out)
            .with_context(|| format!("cannot copy {}", vmlinuz.display()))?;
        let mods = dir.join("modules");
        let _ = std::fs::remove_dir_all(&mods);
        std::fs::create_dir_all(&mods)?;
        let all: BTreeSet<&str> = order
            .iter()
            .map(String::as_str)
            .chain(EXTRA_MODULES.iter().copied())
            .collect();
        for m in all {
            if let Some(p) = index.get(&norm(m)) {
                let name = p.file_name().unwrap_or_default();
                std::fs::copy(p, mods.join(name))?;
            }
        }
        eprintln!(
            "[testbed] initramfs + kernel {release}: {:.1}s",
            t.elapsed().as_secs_f64()
        );
        rebuilt.push("initramfs");
    } else {
        eprintln!("[testbed] initramfs + kernel {release}: up to date");
    }

    // 3. The static hvprof for the guest (cargo decides what to rebuild).
    let t = Instant::now();
    let hv = build_static_hvprof(&dir)?;
    let share = dir.join("share");
    std::fs::create_dir_all(&share)?;
    let shared = share.join("hvprof");
    let mut hfp = Fingerprint::default();
    hfp.file(&hv)?;
    let hv_key = hfp.hex();
    if args.force
        || json_str(&old, "hvprof_fingerprint").as_deref() != Some(hv_key.as_str())
        || !shared.is_file()
    {
        let tmp = share.join(".hvprof.tmp");
        std::fs::copy(&hv, &tmp)?;
        run_cmd(Command::new("strip").arg(&tmp))?;
        std::fs::rename(&tmp, &shared)?;
        rebuilt.push("hvprof");
    }
    eprintln!("[testbed] static hvprof: {:.1}s", t.elapsed().as_secs_f64());

    let build_s = t0.elapsed().as_secs_f64();
    let mut m = String::from("{\n");
    let mut kv = |k: &str, v: &str| {
        let _ = writeln!(
            m,
            "  \"{k}\": \"{}\",",
            v.replace('\\', "\\\\").replace('"', "\\\"")
        );
    };
    kv("kernel_package", &pkg);
    kv("kernel_version", &version);
    kv("kernel_release", &release);
    kv("busybox", &dpkg_version("busybox-static"));
    kv("haproxy", &dpkg_version("haproxy"));
    kv("modules", &order.join(" "));
    kv("initramfs_fingerprint", &initrd_key);
    kv("hvprof_fingerprint", &hv_key);
    kv("rebuilt", &rebuilt.join(" "));
    let _ = writeln!(m, "  \"layout\": {LAYOUT},");
    let _ = writeln!(m, "  \"build_s\": {build_s:.2}\n}}");
    std::fs::write(&manifest_path, m)
        .with_context(|| format!("cannot write {}", manifest_path.display()))?;
    eprintln!(
        "[testbed] {} ready in {build_s:.1}s ({})",
        dir.display(),
        if rebuilt.is_empty() {
            "cached".to_string()
        } else {
            format!("rebuilt {}", rebuilt.join(", "))
        }
    );
    Ok(())
}

fn which(tool: &str) -> Result<()> {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        bail!(
            "`{tool}` not found: run `cargo xtask setup` (it installs cpio, busybox-static, qemu-system-x86)"
        );
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `linux-image-6.1.0-N-amd64`: what `linux-image-amd64` depends on.
fn kernel_package() -> Result<String> {
    let text = output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .map(str::to_string)
        .context(
            "apt-cache depends linux-image-amd64 names no linux-image-*-amd64 (run apt-get update)",
        )
}

fn apt_candidate(pkg: &str) -> Result<String> {
    let text = output(Command::new("apt-cache").args(["policy", pkg]))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .find(|v| *v != "(none)")
        .map(str::to_string)
        .with_context(|| format!("no candidate version of {pkg} (apt-get update?)"))
}

fn fetch_deb(cache: &Path, pkg: &str, version: &str) -> Result<PathBuf> {
    // apt-get download names files PKG_VERSION_ARCH.deb with ':' escaped.
    let prefix = format!("{pkg}_{}_", version.replace(':', "%3a"));
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(cache)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
            })
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    eprintln!("[testbed] apt-get download {pkg}={version}");
    let t = Instant::now();
    run_cmd(
        Command::new("apt-get")
            // The cache is root's: download as root instead of `_apt`.
            .args(["-o", "APT::Sandbox::User=root", "download", "-q"])
            .arg(format!("{pkg}={version}"))
            .current_dir(cache),
    )?;
    eprintln!("[testbed] downloaded in {:.1}s", t.elapsed().as_secs_f64());
    find().with_context(|| {
        format!(
            "apt-get download left no {prefix}*.deb in {}",
            cache.display()
        )
    })
}

fn only_dir(dir: &Path) -> Result<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
        .pop()
        .with_context(|| format!("no kernel release under {}", dir.display()))
}

fn norm(name: &str) -> String {
    name.replace('-', "_")
}

/// Module name (with `_`) → path of its `.ko`.
fn index_modules(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(stem) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ko"))
            {
                out.insert(norm(stem), p);
            }
        }
    }
    if out.is_empty() {
        bail!(
            "no .ko modules under {} (compressed modules are not supported)",
            dir.display()
        );
    }
    Ok(out)
}

/// The `depends=` of a module, from its `.modinfo` strings.
fn depends(ko: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(ko).with_context(|| format!("cannot read {}", ko.display()))?;
    let needle = b"depends=";
    let Some(i) = bytes.windows(needle.len()).position(|w| w == needle) else {
        return Ok(Vec::new());
    };
    let rest = &bytes[i + needle.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    Ok(String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(norm)
        .collect())
}

/// Wanted modules plus their dependencies, dependencies first.
fn load_order(index: &BTreeMap<String, PathBuf>, wanted: &[&str]) -> Result<Vec<String>> {
    fn visit(
        m: &str,
        index: &BTreeMap<String, PathBuf>,
        done: &mut Vec<String>,
        path: &mut Vec<String>,
    ) -> Result<()> {
        if done.iter().any(|d| d == m) {
            return Ok(());
        }
        if path.iter().any(|p| p == m) {
            bail!("module dependency cycle at {m}");
        }
        let Some(ko) = index.get(m) else {
            // Built into the kernel.
            return Ok(());
        };
        path.push(m.to_string());
        for d in depends(ko)? {
            visit(&d, index, done, path)?;
        }
        path.pop();
        done.push(m.to_string());
        Ok(())
    }
    let mut done = Vec::new();
    for w in wanted {
        let w = norm(w);
        if !index.contains_key(&w) {
            eprintln!(
                "[testbed] note: module {w} is not a .ko in this kernel (built in or absent)"
            );
        }
        visit(&w, index, &mut done, &mut Vec::new())?;
    }
    Ok(done)
}

fn is_static(bin: &Path) -> Result<bool> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("cannot run ldd")?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    Ok(text.contains("not a dynamic executable") || text.contains("statically linked"))
}

/// Absolute paths of the libraries `ldd` lists (the loader included).
fn ldd(bin: &Path) -> Result<Vec<PathBuf>> {
    let text = output(Command::new("ldd").arg(bin))?;
    let mut libs = Vec::new();
    for line in text.lines() {
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    if libs.is_empty() {
        bail!("ldd {} listed no libraries", bin.display());
    }
    Ok(libs)
}

fn copy_into(root: &Path, src: &Path) -> Result<()> {
    let rel = src.strip_prefix("/").unwrap_or(src);
    let dst = root.join(rel);
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // Follow symlinks: the guest gets the file under the name ldd printed.
    std::fs::copy(src, &dst).with_context(|| format!("cannot copy {}", src.display()))?;
    Ok(())
}

fn build_initramfs(
    dir: &Path,
    busybox: &Path,
    haproxy: &Path,
    libs: &[PathBuf],
    index: &BTreeMap<String, PathBuf>,
    order: &[String],
    out: &Path,
) -> Result<()> {
    let stage = dir.join("cache/initramfs");
    let _ = std::fs::remove_dir_all(&stage);
    for d in [
        "bin",
        "etc/hvprof",
        "lib/modules/hvprof",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
    ] {
        std::fs::create_dir_all(stage.join(d))?;
    }
    std::fs::copy(busybox, stage.join("bin/busybox"))?;
    copy_into(&stage, haproxy)?;
    for l in libs {
        copy_into(&stage, l)?;
    }
    let mut loaded = Vec::new();
    for m in order {
        if let Some(p) = index.get(m) {
            std::fs::copy(p, stage.join(format!("lib/modules/hvprof/{m}.ko")))?;
            loaded.push(m.as_str());
        }
    }
    std::fs::write(stage.join("etc/hvprof/modules"), loaded.join("\n") + "\n")?;
    std::fs::write(stage.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")?;
    std::fs::write(stage.join("etc/group"), "root:x:0:\n")?;
    let init = stage.join("init");
    std::fs::write(&init, INIT)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))?;
    }
    let tmp = out.with_extension("tmp");
    run_cmd(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -6 > '{}'",
                tmp.display()
            ))
            .current_dir(&stage),
    )?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}

/// Builds hvprof for the guest: x86_64-unknown-linux-gnu, glibc static,
/// in its own target dir so it never invalidates the main build.
fn build_static_hvprof(dir: &Path) -> Result<PathBuf> {
    let target_dir = dir.join("cargo");
    run_cmd(
        Command::new("cargo")
            .args([
                "build",
                "--release",
                "-p",
                "hvprof",
                "--target",
                "x86_64-unknown-linux-gnu",
            ])
            .arg("--target-dir")
            .arg(&target_dir)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .current_dir(root()),
    )
    .context("building the static hvprof for the guest (needs libc6-dev)")?;
    let bin = target_dir.join("x86_64-unknown-linux-gnu/release/hvprof");
    if !is_static(&bin)? {
        bail!("{} is not statically linked", bin.display());
    }
    Ok(bin)
}

fn dpkg_version(pkg: &str) -> String {
    output(Command::new("dpkg-query").args(["-W", "-f=${Version}", pkg])).unwrap_or_default()
}

/// A content fingerprint (not cryptographic: a cache key).
#[derive(Default)]
struct Fingerprint(std::collections::hash_map::DefaultHasher);

impl Fingerprint {
    fn text(&mut self, s: &str) {
        s.hash(&mut self.0);
    }
    fn file(&mut self, p: &Path) -> Result<()> {
        let bytes = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
        p.hash(&mut self.0);
        bytes.hash(&mut self.0);
        Ok(())
    }
    fn hex(&self) -> String {
        format!("{:016x}", self.0.finish())
    }
}

/// The string value of `"key": "..."` in the flat manifest.
fn json_str(text: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\": \"");
    let i = text.find(&pat)? + pat.len();
    let end = text[i..].find('"')?;
    Some(text[i..i + end].to_string())
}
