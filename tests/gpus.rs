//! Issue 14, end to end: on a machine with several GPUs, a fault pinned to one of them restarts
//! the job on the same tier with that GPU hidden, from the newest checkpoint; a second fault on
//! the last GPU, or a fault that names no GPU, goes down the ladder.
//!
//! The machines are simulated: `tests/data/sysfs-two-gpus` (two RX 6800, KFD nodes 1 and 2,
//! PCI `0000:0b:00.0` and `0000:0c:00.0`) as `--sysfs-root`, and a fake `nvidia-smi` listing two
//! H100 (`tests/fixtures/two-nvidia-gpus`, PCI `0000:3b:00.0` and `0000:86:00.0`) first on
//! `PATH`. Kernel records come from a file given as `--kernel-log`, never from `/dev/kmsg`.
//! What is checked is what a user sees: the exit code, the journal, gpuwarden's stderr, and the
//! trainer's record of each start (its argv and the `*_VISIBLE_DEVICES` it ran with).
#![allow(clippy::unwrap_used)]

mod common;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Variables that decide what GPUs a job sees: removed from every run unless a test sets them.
const GPU_VARS: [&str; 7] = [
    "HSA_OVERRIDE_GFX_VERSION",
    "PYTORCH_ROCM_ARCH",
    "ROCR_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "ROCM_PATH",
];

const PATIENCE: Duration = Duration::from_secs(30);

const AMD_GPU0: &str = "0000:0b:00.0";
const AMD_GPU1: &str = "0000:0c:00.0";

fn data(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// An amdgpu VM fault of a device, as the kernel logs it (no pid: attributed by device).
fn amd_page_fault(pci: &str) -> String {
    format!("amdgpu {pci}: amdgpu: [gfxhub] page fault (src_id:0 ring:153 vmid:8 pasid:32786)")
}

/// A file of `/dev/kmsg`-format records that gpuwarden follows from its end.
struct KernelLog {
    path: PathBuf,
    seq: u64,
}

impl KernelLog {
    fn new(scene: &Scene) -> KernelLog {
        let path = scene.path("kmsg");
        File::create(&path).unwrap();
        KernelLog { path, seq: 7000 }
    }

    fn append(&mut self, message: &str) {
        self.seq += 1;
        let record = format!("3,{},{},-;{message}\n", self.seq, 9_000_000 + self.seq);
        OpenOptions::new()
            .append(true)
            .open(&self.path)
            .unwrap()
            .write_all(record.as_bytes())
            .unwrap();
    }
}

/// Which simulated machine a run sees.
enum Machine {
    /// Two RX 6800 in sysfs; no nvidia-smi.
    TwoAmd,
    /// Two H100 through the fake nvidia-smi; an empty sysfs.
    TwoNvidia,
    /// A copy of the two RX 6800 that a test changes, sampled for health every 0.2 s.
    AmdSampled(PathBuf),
    /// No GPU gpuwarden can find: an empty sysfs, no nvidia-smi.
    Bare,
}

/// Starts `gpuwarden run` over the trainer on `machine`, following `kmsg`, with `env` set for
/// gpuwarden (and so inherited by the job). The trainer runs `steps` steps of 50 ms, saving a
/// checkpoint every 2, and names `{nproc}` and `{gpus}` in its `--marker` argument.
fn start(
    scene: &Scene,
    machine: Machine,
    kmsg: &KernelLog,
    env: &[(&str, &str)],
    extra: &[&str],
    job: &[&str],
) -> Running {
    let config = scene.path("fast.toml");
    // One fall and its rescue; climbing back up after it is tests/overnight.rs's.
    std::fs::write(
        &config,
        "backoff = { initial = 0.05, max = 0.2 }\nclimb_back = \"off\"\n",
    )
    .unwrap();
    for dir in ["root", "empty-sys"] {
        std::fs::create_dir_all(scene.path(dir)).unwrap();
    }
    let (sysfs, health) = match &machine {
        Machine::TwoAmd => (data("tests/data/sysfs-two-gpus"), "--no-health"),
        Machine::TwoNvidia | Machine::Bare => (scene.path("empty-sys"), "--no-health"),
        Machine::AmdSampled(dir) => (dir.clone(), "--health-interval=0.2"),
    };
    let mut args: Vec<String> = vec![
        "--config".into(),
        config.to_string_lossy().into_owned(),
        "--kernel-log".into(),
        kmsg.path.to_string_lossy().into_owned(),
        health.into(),
        "--grace".into(),
        "2".into(),
        "--sysfs-root".into(),
        sysfs.to_string_lossy().into_owned(),
        "--root".into(),
        scene.path("root").to_string_lossy().into_owned(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut job_args = vec![
        "--device",
        "{device}",
        "--resume",
        "{checkpoint}",
        "--marker",
        "{run_dir}/nproc-{nproc}-gpus-{gpus}",
        "--sleep",
        "0.05",
    ];
    job_args.extend_from_slice(job);
    let mut cmd: Command = scene.command(&args, &job_args);
    for var in GPU_VARS {
        cmd.env_remove(var);
    }
    // The fake nvidia-smi first for the NVIDIA machine; for the AMD one, no nvidia-smi at all
    // (a real one on this machine must not add GPUs to the simulated machine).
    let path = std::env::var_os("PATH").unwrap_or_default();
    let search: Vec<PathBuf> = match machine {
        Machine::TwoNvidia => std::iter::once(data("tests/fixtures/two-nvidia-gpus"))
            .chain(std::env::split_paths(&path))
            .collect(),
        Machine::TwoAmd | Machine::AmdSampled(_) | Machine::Bare => std::env::split_paths(&path)
            .filter(|dir| !dir.join("nvidia-smi").exists())
            .collect(),
    };
    cmd.env("PATH", std::env::join_paths(search).unwrap());
    for (name, value) in env {
        cmd.env(name, value);
    }
    // GPU variables already removed above, before the test's own were set.
    Running::start(cmd, scene, &[], PATIENCE)
}

/// The trainer's `n`th start record (1-based), once it has started.
fn start_record(scene: &Scene, n: usize) -> Value {
    wait_for_it(&format!("start {n} of the trainer"), || {
        scene.starts().get(n - 1).cloned()
    })
}

/// Waits until the trainer's attempt `n` has saved a checkpoint of its own.
fn wait_for_a_checkpoint(scene: &Scene, attempt: u32) {
    let log = scene
        .run_dir()
        .join(format!("attempt-{attempt}.stdout.log"));
    wait_for_it(&format!("a checkpoint of attempt {attempt}"), || {
        let text = std::fs::read_to_string(&log).ok()?;
        let start = text
            .lines()
            .next()?
            .rsplit("step=")
            .next()?
            .parse::<u32>()
            .ok()?;
        (last_step(&text) >= start + 2).then_some(())
    });
}

/// The last `step N/M` an attempt printed.
fn last_step(stdout: &str) -> u32 {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("step "))
        .filter_map(|l| l.split('/').next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

fn env_of<'a>(start: &'a Value, name: &str) -> Option<&'a str> {
    start["env"][name].as_str()
}

fn records(journal: &[Value], event: &str) -> Vec<Value> {
    journal
        .iter()
        .filter(|r| r["event"] == event)
        .cloned()
        .collect()
}

fn attempt_record(journal: &[Value], event: &str, attempt: u64) -> Value {
    journal
        .iter()
        .find(|r| r["event"] == event && r["attempt"] == attempt)
        .unwrap_or_else(|| panic!("no `{event}` for attempt {attempt}: {journal:#?}"))
        .clone()
}

fn checkpoint_step(path: &str) -> u32 {
    let name = Path::new(path).file_name().unwrap().to_str().unwrap();
    name.trim_start_matches("ckpt-step")
        .trim_end_matches(".safetensors")
        .parse()
        .unwrap()
}

/// Checks that attempt `n` resumed from the newest checkpoint attempt `n - 1` saved: the last
/// even step it printed (or the one before, when the stop came between the print and the
/// save).
fn assert_resumed_from_the_newest_checkpoint(scene: &Scene, journal: &[Value], n: u64) {
    let before = std::fs::read_to_string(
        scene
            .run_dir()
            .join(format!("attempt-{}.stdout.log", n - 1)),
    )
    .unwrap();
    let last = last_step(&before);
    let started = attempt_record(journal, "attempt_started", n);
    let checkpoint = started["checkpoint"]
        .as_str()
        .unwrap_or_else(|| panic!("attempt {n} resumed from nothing: {started}"));
    let step = checkpoint_step(checkpoint);
    let newest = last - last % 2;
    assert!(
        step == newest || step + 2 == newest,
        "attempt {n} resumed from step {step}, the last step before was {last}"
    );
    assert!(step >= 2, "{checkpoint}");
}

#[test]
fn a_kernel_fault_on_gpu_1_hides_it_and_the_job_goes_on_with_gpu_0_then_a_fault_on_gpu_0_falls_back()
 {
    let scene = Scene::new();
    let mut kmsg = KernelLog::new(&scene);
    let run = start(&scene, Machine::TwoAmd, &kmsg, &[], &[], &["--steps", "60"]);
    let first = start_record(&scene, 1);
    assert_eq!(env_of(&first, "GPUWARDEN_GPUS"), Some("0,1"));
    assert_eq!(env_of(&first, "GPUWARDEN_NPROC"), Some("2"));
    assert_eq!(env_of(&first, "ROCR_VISIBLE_DEVICES"), None);
    assert!(
        arg_after(&first, "--marker")
            .unwrap()
            .ends_with("nproc-2-gpus-0,1")
    );
    wait_for_a_checkpoint(&scene, 1);
    kmsg.append(&amd_page_fault(AMD_GPU1));

    // Attempt 2: the same tier, GPU 0 alone, one process.
    let second = start_record(&scene, 2);
    assert_eq!(arg_after(&second, "--device"), Some("cuda"));
    assert_eq!(env_of(&second, "ROCR_VISIBLE_DEVICES"), Some("0"));
    assert_eq!(env_of(&second, "GPUWARDEN_GPUS"), Some("0"));
    assert_eq!(env_of(&second, "GPUWARDEN_NPROC"), Some("1"));
    assert!(
        arg_after(&second, "--marker")
            .unwrap()
            .ends_with("nproc-1-gpus-0")
    );
    // The excluded GPU faults again: not the job's business any more.
    kmsg.append(&amd_page_fault(AMD_GPU1));
    wait_for_it("the repeat on GPU 1 judged foreign", || {
        records(&scene.journal(), "foreign_fault").first().cloned()
    });
    wait_for_a_checkpoint(&scene, 2);
    // Now the last GPU faults too: down the ladder, to the CPU.
    kmsg.append(&amd_page_fault(AMD_GPU0));
    let (status, stderr) = run.finish();
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");

    let journal = scene.journal();
    let faults = records(&journal, "fault");
    assert_eq!(faults.len(), 2, "{faults:#?}");
    assert_eq!(faults[0]["rule"], "amdgpu-vm-page-fault");
    assert_eq!(faults[0]["gpus"][0]["pci"], AMD_GPU1);
    assert_eq!(faults[0]["gpus"][0]["index"], 1);
    assert_eq!(faults[0]["gpus"][0]["ordinal"], 1);
    assert_eq!(faults[1]["gpus"][0]["pci"], AMD_GPU0);
    assert_eq!(faults[1]["gpus"][0]["ordinal"], 0);

    let excluded = records(&journal, "gpus_excluded");
    assert_eq!(excluded.len(), 1, "{journal:#?}");
    assert_eq!(excluded[0]["attempt"], 1);
    assert_eq!(excluded[0]["tier"], "gpu");
    assert_eq!(excluded[0]["gpus"][0]["pci"], AMD_GPU1);
    assert_eq!(excluded[0]["excluded"], serde_json::json!([1]));
    assert_eq!(excluded[0]["remaining"], serde_json::json!([0]));

    let foreign = records(&journal, "foreign_fault");
    assert_eq!(foreign.len(), 1, "{foreign:#?}");
    assert_eq!(
        foreign[0]["reason"],
        format!("device {AMD_GPU1} is not a GPU the job can use")
    );

    let a2 = attempt_record(&journal, "attempt_started", 2);
    assert_eq!(a2["tier"], "gpu");
    assert_eq!(a2["gpus"].as_array().unwrap().len(), 1);
    assert_eq!(a2["gpus"][0]["pci"], AMD_GPU0);
    assert_resumed_from_the_newest_checkpoint(&scene, &journal, 2);
    let a3 = attempt_record(&journal, "attempt_started", 3);
    assert_eq!(a3["tier"], "cpu");
    assert_resumed_from_the_newest_checkpoint(&scene, &journal, 3);
    let third = start_record(&scene, 3);
    assert_eq!(env_of(&third, "ROCR_VISIBLE_DEVICES"), Some("-1"));
    assert_eq!(env_of(&third, "GPUWARDEN_NPROC"), Some("1"));
    assert_eq!(env_of(&third, "GPUWARDEN_GPUS"), Some(""));

    assert!(
        stderr.contains(&format!(
            "excluding GPU 1 ({AMD_GPU1}, the job's cuda:1) for the rest of the run, keeping GPU(s) 0"
        )),
        "stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("attempt 2 on tier `gpu` (device cuda, GPU(s) 0 (GPU(s) 1 excluded))"),
        "stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("every GPU the job sees: nothing to exclude, down the ladder"),
        "stderr:\n{stderr}"
    );
    // The summary says which GPUs each attempt ran on, and which one was excluded.
    assert!(
        stderr.contains("  1        gpu (GPUs 0,1)"),
        "stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("  2        gpu (GPUs 0)"),
        "stderr:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "excluded after a fault, for the rest of the run: GPU 1 ({AMD_GPU1}, the job's cuda:1)"
        )),
        "stderr:\n{stderr}"
    );
    let finished = journal.last().unwrap();
    assert_eq!(finished["outcome"], "succeeded");
    assert_eq!(finished["attempts"], 3);

    // The morning after: the report tells which GPU was excluded, and reads every line.
    let report = Command::new(BIN)
        .arg("report")
        .arg(scene.run_dir())
        .output()
        .unwrap();
    let report = text(&report.stdout);
    assert!(
        report.contains(&format!(
            "excluded for the rest of the run: GPU 1 ({AMD_GPU1})"
        )),
        "{report}"
    );
    assert!(report.contains("      GPUs: 0,1\n"), "{report}");
    assert!(!report.contains("skipped"), "{report}");
}

#[test]
fn a_fault_that_names_no_gpu_goes_down_the_ladder_with_every_gpu_kept_until_then() {
    let scene = Scene::new();
    let kmsg = KernelLog::new(&scene);
    // `CUDA error: an illegal memory access` on the job's stderr names no device.
    let run = start(
        &scene,
        Machine::TwoAmd,
        &kmsg,
        &[],
        &[],
        &["--steps", "8", "--fault-at", "5", "--fault", "cuda"],
    );
    let (status, stderr) = run.finish();
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    let journal = scene.journal();
    assert!(records(&journal, "gpus_excluded").is_empty());
    let fault = &records(&journal, "fault")[0];
    assert!(fault.get("gpus").is_none(), "{fault}");
    assert_eq!(
        attempt_record(&journal, "attempt_started", 2)["tier"],
        "cpu"
    );
    assert_eq!(journal.last().unwrap()["attempts"], 2);
}

#[test]
fn an_hsa_fault_on_stderr_names_its_gpu_by_kfd_node_and_the_users_hip_order_is_kept() {
    // The user runs on both GPUs in reverse order: the job's cuda:0 is GPU 1. The HSA runtime
    // names the faulting GPU by its KFD node (node-1 is GPU 0, the job's cuda:1).
    let scene = Scene::new();
    let kmsg = KernelLog::new(&scene);
    let run = start(
        &scene,
        Machine::TwoAmd,
        &kmsg,
        &[("HIP_VISIBLE_DEVICES", "1,0")],
        &[],
        &["--steps", "8", "--fault-at", "5", "--fault", "hsa"],
    );
    let (status, stderr) = run.finish();
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    let journal = scene.journal();
    let faults = records(&journal, "fault");
    assert_eq!(faults[0]["captures"]["node"], "1");
    assert_eq!(faults[0]["gpus"][0]["index"], 0);
    assert_eq!(faults[0]["gpus"][0]["ordinal"], 1);
    let starts = scene.starts();
    assert_eq!(env_of(&starts[0], "GPUWARDEN_GPUS"), Some("1,0"));
    // Attempt 2: GPU 1 alone, through ROCr, and HIP's old list no longer selects among it.
    assert_eq!(env_of(&starts[1], "ROCR_VISIBLE_DEVICES"), Some("1"));
    assert_eq!(env_of(&starts[1], "HIP_VISIBLE_DEVICES"), Some("0"));
    assert_eq!(env_of(&starts[1], "GPUWARDEN_GPUS"), Some("1"));
    assert_eq!(
        attempt_record(&journal, "attempt_started", 2)["tier"],
        "gpu"
    );
    // The trainer faults at step 5 again, still naming node-1: a GPU the job no longer sees,
    // so nothing to exclude, and the run goes down the ladder.
    assert!(
        faults.len() == 2 && faults[1].get("gpus").is_none(),
        "{faults:#?}"
    );
    assert_eq!(
        attempt_record(&journal, "attempt_started", 3)["tier"],
        "cpu"
    );
    assert_eq!(journal.last().unwrap()["outcome"], "succeeded");
}

#[test]
fn an_xid_79_on_one_of_two_nvidia_gpus_hides_it_through_cuda_visible_devices() {
    let scene = Scene::new();
    let mut kmsg = KernelLog::new(&scene);
    let run = start(
        &scene,
        Machine::TwoNvidia,
        &kmsg,
        &[],
        &[],
        &["--steps", "30"],
    );
    let first = start_record(&scene, 1);
    assert_eq!(env_of(&first, "GPUWARDEN_NPROC"), Some("2"));
    wait_for_a_checkpoint(&scene, 1);
    kmsg.append("NVRM: Xid (PCI:0000:86:00): 79, GPU has fallen off the bus.");
    let (status, stderr) = run.finish();
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    let starts = scene.starts();
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert_eq!(env_of(&starts[1], "CUDA_VISIBLE_DEVICES"), Some("0"));
    assert_eq!(env_of(&starts[1], "GPUWARDEN_NPROC"), Some("1"));
    assert!(
        arg_after(&starts[1], "--marker")
            .unwrap()
            .ends_with("nproc-1-gpus-0")
    );
    let journal = scene.journal();
    let excluded = &records(&journal, "gpus_excluded")[0];
    assert_eq!(excluded["gpus"][0]["pci"], "0000:86:00.0");
    assert_eq!(excluded["gpus"][0]["vendor"], "nvidia");
    assert_eq!(
        attempt_record(&journal, "attempt_started", 2)["tier"],
        "gpu"
    );
    assert_resumed_from_the_newest_checkpoint(&scene, &journal, 2);
}

#[test]
fn the_users_cuda_visible_devices_are_honoured_excluding_from_the_users_list() {
    // The user gave the job GPU 1 only. A fault of GPU 0 is not the job's; a fault of GPU 1 is
    // one of every GPU the job sees, so it goes down the ladder rather than onto GPU 0.
    let scene = Scene::new();
    let mut kmsg = KernelLog::new(&scene);
    let run = start(
        &scene,
        Machine::TwoNvidia,
        &kmsg,
        &[("CUDA_VISIBLE_DEVICES", "1")],
        &[],
        &["--steps", "30"],
    );
    let first = start_record(&scene, 1);
    assert_eq!(env_of(&first, "GPUWARDEN_GPUS"), Some("1"));
    assert_eq!(env_of(&first, "GPUWARDEN_NPROC"), Some("1"));
    wait_for_a_checkpoint(&scene, 1);
    kmsg.append("NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus.");
    wait_for_it("the fault of GPU 0 judged foreign", || {
        records(&scene.journal(), "foreign_fault").first().cloned()
    });
    kmsg.append("NVRM: Xid (PCI:0000:86:00): 79, GPU has fallen off the bus.");
    let (status, stderr) = run.finish();
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    let journal = scene.journal();
    assert!(records(&journal, "gpus_excluded").is_empty());
    assert_eq!(
        attempt_record(&journal, "attempt_started", 2)["tier"],
        "cpu"
    );
    assert_eq!(
        records(&journal, "fault")[0]["gpus"][0]["ordinal"],
        0,
        "GPU 1 is the job's cuda:0"
    );
}

#[test]
fn with_no_gpu_exclusion_a_fault_on_one_gpu_goes_down_the_ladder() {
    let scene = Scene::new();
    let mut kmsg = KernelLog::new(&scene);
    let run = start(
        &scene,
        Machine::TwoAmd,
        &kmsg,
        &[],
        &["--no-gpu-exclusion"],
        &["--steps", "30"],
    );
    start_record(&scene, 1);
    wait_for_a_checkpoint(&scene, 1);
    kmsg.append(&amd_page_fault(AMD_GPU1));
    let (status, stderr) = run.finish();
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    let journal = scene.journal();
    assert!(records(&journal, "gpus_excluded").is_empty());
    assert_eq!(
        attempt_record(&journal, "attempt_started", 2)["tier"],
        "cpu"
    );
    assert!(stderr.contains("switched off"), "stderr:\n{stderr}");
}

#[test]
fn min_gpus_zero_is_a_usage_error() {
    let scene = Scene::new();
    let out = scene.run(&["--min-gpus", "0"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("min_gpus must be at least 1"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_gpu_excluded_before_gpuwarden_was_killed_stays_excluded_when_the_run_is_resumed() {
    let scene = Scene::new();
    let mut kmsg = KernelLog::new(&scene);
    let mut run = start(&scene, Machine::TwoAmd, &kmsg, &[], &[], &["--steps", "40"]);
    start_record(&scene, 1);
    wait_for_a_checkpoint(&scene, 1);
    kmsg.append(&amd_page_fault(AMD_GPU1));
    let second = start_record(&scene, 2);
    assert_eq!(env_of(&second, "ROCR_VISIBLE_DEVICES"), Some("0"));
    // gpuwarden dies outright; its guard ends the job.
    let mut child = run.child.take().unwrap();
    send(child.id(), nix::sys::signal::Signal::SIGKILL);
    child.wait().unwrap();
    let pid = second["pid"].as_i64().unwrap() as i32;
    wait_for_it("the job to die with gpuwarden", || dead(pid).then_some(()));

    let mut resume = Command::new(BIN);
    resume.arg("resume").arg(scene.run_dir());
    for var in GPU_VARS {
        resume.env_remove(var);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let search: Vec<PathBuf> = std::env::split_paths(&path)
        .filter(|dir| !dir.join("nvidia-smi").exists())
        .collect();
    resume.env("PATH", std::env::join_paths(search).unwrap());
    let out = resume.output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "still excluded after an earlier fault: GPU 1 ({AMD_GPU1}, the job's cuda:1)"
        )),
        "stderr:\n{stderr}"
    );
    let third = start_record(&scene, 3);
    assert_eq!(env_of(&third, "ROCR_VISIBLE_DEVICES"), Some("0"));
    assert_eq!(env_of(&third, "GPUWARDEN_NPROC"), Some("1"));
    let journal = scene.journal();
    assert_eq!(
        attempt_record(&journal, "attempt_started", 3)["tier"],
        "gpu"
    );
    assert_eq!(journal.last().unwrap()["outcome"], "succeeded");
}

#[test]
fn uncorrectable_errors_rising_on_gpu_1_in_sysfs_exclude_it() {
    // A data-centre card's RAS counter (`ras/umc_err_count`) on each GPU; GPU 1's rises.
    let scene = Scene::new();
    let sysfs = scene.path("sys");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(data("tests/data/sysfs-two-gpus"))
        .arg(&sysfs)
        .status()
        .unwrap();
    assert!(copied.success());
    let device = |bus: &str, port: &str| {
        sysfs.join(format!(
            "devices/pci0000:00/0000:00:03.{port}/0000:{bus}:00.0"
        ))
    };
    for dir in [device("0b", "1"), device("0c", "2")] {
        std::fs::create_dir(dir.join("ras")).unwrap();
        std::fs::write(dir.join("ras/umc_err_count"), "ue: 0\nce: 0\n").unwrap();
    }
    let kmsg = KernelLog::new(&scene);
    let run = start(
        &scene,
        Machine::AmdSampled(sysfs.clone()),
        &kmsg,
        &[],
        &[],
        &["--steps", "40"],
    );
    start_record(&scene, 1);
    wait_for_a_checkpoint(&scene, 1);
    std::fs::write(
        device("0c", "2").join("ras/umc_err_count"),
        "ue: 2\nce: 0\n",
    )
    .unwrap();
    let second = start_record(&scene, 2);
    assert_eq!(env_of(&second, "ROCR_VISIBLE_DEVICES"), Some("0"));
    let (status, stderr) = run.finish();
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    let journal = scene.journal();
    let fault = &records(&journal, "fault")[0];
    assert_eq!(fault["class"], "gpu_ecc");
    assert_eq!(fault["stream"], "tool");
    assert_eq!(fault["gpus"][0]["pci"], AMD_GPU1);
    let excluded = &records(&journal, "gpus_excluded")[0];
    assert_eq!(excluded["remaining"], serde_json::json!([0]));
    assert_eq!(
        attempt_record(&journal, "attempt_started", 2)["tier"],
        "gpu"
    );
    // The run's health history marks GPU 1 as excluded once it is.
    let history = std::fs::read_to_string(scene.run_dir().join("health.jsonl")).unwrap();
    assert!(
        history
            .lines()
            .any(|l| l.contains(AMD_GPU1) && l.contains("\"excluded\":true")),
        "{history}"
    );
    assert!(
        !history
            .lines()
            .any(|l| l.contains(AMD_GPU0) && l.contains("\"excluded\"")),
        "{history}"
    );
}

#[test]
fn a_gpu_tier_that_sees_no_known_gpu_warns_when_the_command_uses_nproc() {
    let scene = Scene::new();
    let kmsg = KernelLog::new(&scene);
    let run = start(&scene, Machine::Bare, &kmsg, &[], &[], &["--steps", "2"]);
    let (status, stderr) = run.finish();
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    let first = start_record(&scene, 1);
    assert!(
        arg_after(&first, "--marker")
            .unwrap()
            .ends_with("nproc-1-gpus-")
    );
    let warnings = records(&scene.journal(), "warning");
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0]["message"]
            .as_str()
            .unwrap()
            .contains("found no GPU it can see"),
        "{warnings:#?}"
    );
}

/// [`common::wait_for`] with this file's patience.
fn wait_for_it<T>(what: &str, ready: impl FnMut() -> Option<T>) -> T {
    common::wait_for(what, PATIENCE, ready)
}
