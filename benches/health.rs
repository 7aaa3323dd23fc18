//! Benchmark: what one GPU health sample costs, read from amdgpu's sysfs files in-process
//! versus one call of `rocm-smi --json` (and of `nvidia-smi --query-gpu`, where there is one).
//!
//! `cargo bench --bench health`. The sysfs side samples the simulated RX 6800 of
//! `tests/data/sysfs` (plain files, so the driver's own cost of answering is not in it: on real
//! hardware `gpu_busy_percent` and `power1_average` ask the GPU's firmware, which can take
//! milliseconds). The rocm-smi side runs the real tool twice: as it runs on this machine, and,
//! where `unshare` and root allow, inside a private mount namespace with the simulated tree
//! bind-mounted over `/sys`, where it finds the GPU and prints JSON; the cost of `unshare` and
//! the mounts alone is timed too, so it can be subtracted. Not a statistics package: mean, p50
//! and p99 of plain repetitions are enough to compare microseconds with hundreds of milliseconds.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gpuwarden::sources::health::amd_sysfs::AmdSysfs;
use gpuwarden::sources::health::{nvidia, rocm_smi};

fn main() {
    let tree = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sysfs");
    println!("gpuwarden health benchmark\n");

    let discover = time(200, || {
        std::hint::black_box(AmdSysfs::discover(&tree, &[]));
    });
    report("amd_sysfs discover (simulated RX 6800)", &discover);

    let amd = AmdSysfs::discover(&tree, &[]);
    assert!(!amd.is_empty(), "the simulated tree must hold a GPU");
    let sample = time(20_000, || {
        std::hint::black_box(amd.sample());
    });
    report("amd_sysfs sample, 1 GPU (5 files)", &sample);

    match find("rocm-smi") {
        Some(rocm_smi) => {
            let plain = time(10, || {
                let _ = Command::new(&rocm_smi).args(rocm_smi::SAMPLE_ARGS).output();
            });
            let said = Command::new(&rocm_smi)
                .args(rocm_smi::SAMPLE_ARGS)
                .output()
                .map(|o| {
                    format!(
                        "exit {:?}, stdout {:?}, stderr {:?}",
                        o.status.code(),
                        first_line(&o.stdout),
                        first_line(&o.stderr)
                    )
                })
                .unwrap_or_else(|e| e.to_string());
            report("rocm-smi --json ..., as it runs here", &plain);
            println!("    (it said: {said})");
            namespace_runs(&tree, &sample);
        }
        None => println!("rocm-smi: not on PATH (apt-get install rocm-smi), not timed"),
    }

    match find("nvidia-smi") {
        Some(nvidia_smi) => {
            let args = nvidia::query_args();
            let calls = time(20, || {
                let _ = Command::new(&nvidia_smi).args(&args).output();
            });
            report("nvidia-smi --query-gpu=... (12 fields)", &calls);
        }
        None => println!("nvidia-smi: not on PATH, not timed"),
    }
}

/// rocm-smi inside a private mount namespace over the simulated tree, and the namespace alone.
fn namespace_runs(plain_tree: &Path, sample: &[Duration]) {
    // rocm-smi finds a card's PCI address through the kernel's links (`class/drm/card0` into
    // the device's `drm/`, `drm/card0/device` back up), which the committed tree leaves out
    // because a link to an ancestor is a loop to every tool that walks the repository.
    let tmp = match tempfile::tempdir() {
        Ok(t) => t,
        Err(e) => {
            println!("rocm-smi over the simulated tree: no temporary directory ({e})");
            return;
        }
    };
    let tree = tmp.path().join("sys");
    if let Err(e) = copy_with_kernel_links(plain_tree, &tree) {
        println!("rocm-smi over the simulated tree: cannot copy it ({e})");
        return;
    }
    let tree = tree.as_path();
    let run = |then: &str| {
        let script = format!(
            r#"root=$1; shift; mount --bind "$root" /sys && mount -t tmpfs none /dev/shm && {then}"#
        );
        Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script, "sh"])
            .arg(tree)
            .args(rocm_smi::SAMPLE_ARGS)
            .output()
    };
    let probe = run(r#"exec rocm-smi "$@""#);
    let ok = probe
        .as_ref()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains('{'));
    if !ok {
        let why = match probe {
            Ok(o) => first_line(&o.stderr),
            Err(e) => e.to_string(),
        };
        println!("rocm-smi over the simulated tree: not possible here ({why})");
        return;
    }
    let with_tool = time(10, || {
        let _ = run(r#"exec rocm-smi "$@""#);
    });
    let alone = time(10, || {
        let _ = run("true");
    });
    report("rocm-smi --json ... over the simulated tree", &with_tool);
    report("  of which unshare + 2 mounts alone", &alone);
    // Medians: on a shared machine a few slow rounds would otherwise decide the ratio.
    let tool = median(&with_tool).saturating_sub(median(&alone));
    println!(
        "    => one rocm-smi call costs {:.1} ms (p50, namespace subtracted), {:.0}x one sysfs sample (p50 {:.1} µs)",
        ms(tool),
        tool.as_secs_f64() / median(sample).as_secs_f64(),
        median(sample).as_secs_f64() * 1e6
    );
}

/// The simulated tree copied to `to`, with `class/drm/{card0,renderD128}` turned into links as
/// the kernel makes them.
fn copy_with_kernel_links(from: &Path, to: &Path) -> std::io::Result<()> {
    copy_dir(from, to)?;
    let device = "devices/pci0000:00/0000:00:03.1/0000:0b:00.0";
    for node in ["card0", "renderD128"] {
        let class = to.join("class/drm").join(node);
        std::fs::remove_dir_all(&class)?;
        symlink(format!("../../{device}/drm/{node}"), &class)?;
        symlink(
            "../../../0000:0b:00.0",
            to.join(device).join("drm").join(node).join("device"),
        )?;
    }
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            symlink(std::fs::read_link(entry.path())?, &target)?;
        } else if kind.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

fn time(n: usize, mut f: impl FnMut()) -> Vec<Duration> {
    // A few untimed rounds so caches and the page cache are warm.
    for _ in 0..n.min(20) / 4 + 1 {
        f();
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        f();
        out.push(start.elapsed());
    }
    out.sort_unstable();
    out
}

fn report(what: &str, sorted: &[Duration]) {
    let pct = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
    let unit = |d: Duration| {
        if d < Duration::from_millis(1) {
            format!("{:8.1} µs", d.as_secs_f64() * 1e6)
        } else {
            format!("{:8.1} ms", ms(d))
        }
    };
    println!(
        "{what:<46} n={:<6} mean {}  p50 {}  p99 {}",
        sorted.len(),
        unit(mean(sorted)),
        unit(pct(0.5)),
        unit(pct(0.99))
    );
}

/// The middle of sorted durations.
fn median(sorted: &[Duration]) -> Duration {
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

fn mean(d: &[Duration]) -> Duration {
    d.iter().sum::<Duration>() / d.len().max(1) as u32
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn first_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .to_owned()
}

fn find(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
