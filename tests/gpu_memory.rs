//! A GPU free before the next attempt (issue 11), end to end: the fake trainer hangs on the GPU
//! tier and is stopped for it; before the restart on the GPU, gpuwarden reads what the GPUs
//! show of the stopped attempt's memory, from a copy of the simulated RX 6800's sysfs tree that
//! the test changes while it waits (KFD's per-process VRAM, or `mem_info_vram_used`), or from a
//! fake `nvidia-smi` answering `--query-compute-apps` on the simulated two-H100 machine.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const PATIENCE: Duration = Duration::from_secs(30);

/// The RX 6800's PCI device directory and its KFD `gpu_id` in the simulated tree.
const DEVICE_DIR: &str = "devices/pci0000:00/0000:00:03.1/0000:0b:00.0";
const KFD_GPU_ID: &str = "38442";

const GPU_VARS: [&str; 4] = [
    "CUDA_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "GPU_DEVICE_ORDINAL",
];

fn data(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A copy of `tests/data/sysfs` in the scene, which the test may change.
fn sysfs_copy(scene: &Scene) -> PathBuf {
    let sys = scene.path("sys");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(data("tests/data/sysfs"))
        .arg(&sys)
        .status()
        .unwrap();
    assert!(copied.success());
    sys
}

/// `run` with the trainer hanging at step 3 of its first attempt (the stall timeout stops it:
/// a `gpu_hang`, which restarts on the same GPU tier), on `sysfs`, with `extra` flags.
fn start(scene: &Scene, sysfs: &Path, extra: &[&str], path: Option<&str>) -> Running {
    std::fs::create_dir_all(scene.path("root")).unwrap();
    let config = scene.path("fast.toml");
    std::fs::write(&config, "backoff = { initial = 0.05, max = 0.2 }\n").unwrap();
    let root = scene.path("root");
    let mut args = vec![
        "--config",
        config.to_str().unwrap(),
        "--no-kernel-log",
        "--no-health",
        "--stall-timeout",
        "2s",
        "--grace",
        "2",
        "--sysfs-root",
        sysfs.to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut cmd = scene.command(
        &args,
        &[
            "--device",
            "{device}",
            "--resume",
            "{checkpoint}",
            "--steps",
            "6",
            "--every",
            "2",
            "--sleep",
            "0.2",
            "--hang-at",
            "3",
            "--hang-once",
        ],
    );
    if let Some(path) = path {
        cmd.env("PATH", path);
    }
    Running::start(cmd, scene, &GPU_VARS, PATIENCE)
}

/// The pid of the trainer's first start.
fn first_pid(scene: &Scene) -> u32 {
    wait_for("the trainer's first start", PATIENCE, || {
        scene.starts().first().and_then(|s| s["pid"].as_u64())
    }) as u32
}

/// Waits until gpuwarden says it waits for the GPUs; returns when it saw that.
fn waiting_said(scene: &Scene) -> Instant {
    wait_for("gpuwarden waiting for GPU memory", PATIENCE, || {
        let said = std::fs::read_to_string(scene.path("gpuwarden.stderr")).unwrap_or_default();
        said.contains("to release the memory of attempt 1 before attempt 2")
            .then(Instant::now)
    })
}

fn memory_wait(scene: &Scene) -> serde_json::Value {
    let journal = scene.full_journal();
    let waits: Vec<&serde_json::Value> = journal
        .iter()
        .filter(|r| r["event"] == "gpu_memory_wait")
        .collect();
    assert_eq!(waits.len(), 1, "{journal:?}");
    // Journaled before attempt 2 started, and attempt 2 is on the GPU tier again.
    let at = |event: &str, attempt: u64| {
        journal
            .iter()
            .position(|r| r["event"] == event && r["attempt"] == attempt)
            .unwrap()
    };
    assert!(at("gpu_memory_wait", 2) < at("attempt_started", 2));
    assert_eq!(journal[at("attempt_started", 2)]["tier"], "gpu");
    waits[0].clone()
}

#[test]
fn the_restart_waits_until_kfd_shows_the_stopped_attempt_holds_no_vram() {
    let scene = Scene::new();
    let sysfs = sysfs_copy(&scene);
    let run = start(&scene, &sysfs, &[], None);
    // The job takes VRAM on the RX 6800, as KFD shows it: 2 GiB under its pid.
    let pid = first_pid(&scene);
    let procs = sysfs.join(format!("class/kfd/kfd/proc/{pid}"));
    std::fs::create_dir_all(&procs).unwrap();
    std::fs::write(procs.join(format!("vram_{KFD_GPU_ID}")), "2147483648\n").unwrap();

    let seen = waiting_said(&scene);
    // The driver holds on to it for a while (deliberately: this is the state being tested).
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        scene.starts().len(),
        1,
        "attempt 2 started onto held memory"
    );
    // KFD drops the process's entry once its memory is freed.
    std::fs::remove_dir_all(&procs).unwrap();
    let held = seen.elapsed();
    let (status, stderr) = run.finish();
    assert_eq!(status.code(), Some(0), "{stderr}");

    let wait = memory_wait(&scene);
    assert_eq!(wait["outcome"], "released", "{wait}");
    assert_eq!(wait["gpus"], serde_json::json!([0]));
    let waited = wait["waited_ms"].as_u64().unwrap();
    eprintln!(
        "gpu memory wait: released {waited} ms after the wait began (held {} ms by the test)",
        held.as_millis()
    );
    assert!((800..10_000).contains(&waited), "{wait}");
    assert!(
        stderr.contains("GPU 0 released the memory of attempt 1"),
        "{stderr}"
    );
    assert_eq!(scene.starts().len(), 2);
}

#[test]
fn without_per_process_data_vram_used_must_drop_back_and_past_the_bound_it_goes_on() {
    // No KFD process directory: the device's `mem_info_vram_used` is all there is. The job
    // "uses" 9 GB and the driver never gives it back: after --gpu-memory-wait 1s the restart
    // goes ahead with a warning.
    let scene = Scene::new();
    let sysfs = sysfs_copy(&scene);
    let used = sysfs.join(DEVICE_DIR).join("mem_info_vram_used");
    let run = start(&scene, &sysfs, &["--gpu-memory-wait", "1s"], None);
    first_pid(&scene);
    std::fs::write(&used, "9000000000\n").unwrap();
    let (status, stderr) = run.finish();
    assert_eq!(status.code(), Some(0), "{stderr}");

    let wait = memory_wait(&scene);
    assert_eq!(wait["outcome"], "timed_out", "{wait}");
    let waited = wait["waited_ms"].as_u64().unwrap();
    assert!((1000..5000).contains(&waited), "{wait}");
    let detail = wait["detail"].as_str().unwrap();
    assert!(
        detail.contains("8583 MiB used, 16 MiB before the attempt"),
        "{detail}"
    );
    assert!(
        stderr.contains("warning: after 1.0s GPU 0 still shows memory of attempt 1"),
        "{stderr}"
    );
    assert_eq!(scene.starts().len(), 2);
}

#[test]
fn on_nvidia_the_restart_waits_for_nvidia_smi_to_list_none_of_the_attempts_processes() {
    // The simulated two-H100 machine (tests/fixtures/two-nvidia-gpus), with an nvidia-smi that
    // answers `--query-compute-apps=pid,used_memory,gpu_bus_id` from a file the test writes.
    let scene = Scene::new();
    let empty = scene.path("empty-sys");
    std::fs::create_dir_all(&empty).unwrap();
    let apps = scene.path("compute-apps.csv");
    std::fs::write(&apps, "").unwrap();
    let bin = scene.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let smi = bin.join("nvidia-smi");
    std::fs::write(
        &smi,
        format!(
            "#!/bin/sh\ncase \"$*\" in\n  *--query-compute-apps*) cat '{}' ;;\n  *) exec '{}' \"$@\" ;;\nesac\n",
            apps.display(),
            data("tests/fixtures/two-nvidia-gpus/nvidia-smi").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&smi, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let search: Vec<PathBuf> = std::iter::once(bin.clone())
        .chain(std::env::split_paths(&path).filter(|d| !d.join("nvidia-smi").exists()))
        .collect();
    let search = std::env::join_paths(search).unwrap();
    let run = start(&scene, &empty, &[], Some(search.to_str().unwrap()));

    // The job on GPU 1 (bus 86), and somebody else's process on GPU 0, in the CSV form.
    let pid = first_pid(&scene);
    std::fs::write(
        &apps,
        format!("4242, 30000, 00000000:3B:00.0\n{pid}, 1024, 00000000:86:00.0\n"),
    )
    .unwrap();
    waiting_said(&scene);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        scene.starts().len(),
        1,
        "attempt 2 started onto held memory"
    );
    // The job's process is gone from the list; the neighbour's stays, and does not matter.
    std::fs::write(&apps, "4242, 30000, 00000000:3B:00.0\n").unwrap();
    let (status, stderr) = run.finish();
    assert_eq!(status.code(), Some(0), "{stderr}");

    let wait = memory_wait(&scene);
    assert_eq!(wait["outcome"], "released", "{wait}");
    assert_eq!(wait["gpus"], serde_json::json!([0, 1]));
    assert!(wait["waited_ms"].as_u64().unwrap() >= 500, "{wait}");
    assert!(stderr.contains("GPUs 0,1 released the memory"), "{stderr}");
}
