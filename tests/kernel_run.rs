//! `gpuwarden run` acting on the kernel log, end to end: the real binary supervising the fake
//! trainer (`tests/fixtures/trainer.py`) while a test writes kernel records about it.
//!
//! Most tests hand gpuwarden a file of `/dev/kmsg`-format records (`--kernel-log FILE`, followed
//! from its end) and append to it, so they run anywhere and see no other kernel traffic. Two
//! tests write into the real `/dev/kmsg` (root only; elsewhere they say why and pass without
//! checking anything); they run one at a time, and every other test here keeps away from the
//! real kernel log (`--kernel-log FILE` or `--no-kernel-log`), so their records reach no other
//! run of this file. Records written into `/dev/kmsg` use level 4 (warning), so none of them
//! reaches the console.
//!
//! What is checked is what a user sees: the exit code, the journal's records, what gpuwarden
//! says on stderr, and the trainer's record of each start (argv, pid).
#![allow(clippy::unwrap_used)]

mod common;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use gpuwarden::time::rfc3339;
use serde_json::Value;

/// The variables that decide which GPUs a job sees: unset for every run, so the caller's
/// environment cannot change what a test means.
const GPU_VARS: [&str; 6] = [
    "HSA_OVERRIDE_GFX_VERSION",
    "PYTORCH_ROCM_ARCH",
    "ROCR_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "CUDA_VISIBLE_DEVICES",
    "ROCM_PATH",
];

/// How long any one thing a test waits for may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(20);

/// The simulated RX 6800 (tests/data/sysfs/README.md): its PCI address is `0000:0b:00.0`.
fn rx6800_sysfs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sysfs")
}

/// The GPU of the simulated tree, and a PCI address where no GPU of it is.
const OUR_GPU: &str = "0000:0b:00.0";
const NOT_OUR_GPU: &str = "0000:86:00.0";

/// The real Xid 31 of FACTS.md (an out-of-bounds store from a Triton kernel), naming `pid`.
fn xid31(pid: i64) -> String {
    format!(
        "NVRM: Xid (PCI:0000:03:00): 31, pid={pid}, name=python3, channel 0x0000000a, intr 00000000. MMU Fault: ENGINE GRAPHICS GPC1 GPCCLIENT_T1_8 faulted @ 0x7f7c_9fe00000. Fault is of type FAULT_PDE ACCESS_TYPE_VIRT_WRITE"
    )
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
        KernelLog { path, seq: 5000 }
    }

    fn arg(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// Appends one kernel record (facility kernel, level 3) in one write, as the kernel's own
    /// records are.
    fn append(&mut self, message: &str) {
        self.seq += 1;
        let record = format!(
            "3,{},{},-;{message}\n",
            self.seq,
            6_137_826_155 + self.seq * 1000
        );
        OpenOptions::new()
            .append(true)
            .open(&self.path)
            .unwrap()
            .write_all(record.as_bytes())
            .unwrap();
    }
}

/// `--sysfs-root` and `--root` at empty directories: a machine without GPUs, so the probe has
/// nothing to say whatever this machine holds.
fn bare_machine(scene: &Scene) -> Vec<String> {
    for dir in ["sys", "root"] {
        std::fs::create_dir_all(scene.path(dir)).unwrap();
    }
    vec![
        "--sysfs-root".into(),
        scene.path("sys").to_string_lossy().into_owned(),
        "--root".into(),
        scene.path("root").to_string_lossy().into_owned(),
    ]
}

/// Waits until the journal holds `n` records of kind `event`.
fn wait_for_records(scene: &Scene, event: &str, n: usize) -> Vec<Value> {
    wait_for_it(&format!("{n} `{event}` record(s) in the journal"), || {
        let found: Vec<Value> = scene
            .journal()
            .into_iter()
            .filter(|r| r["event"] == event)
            .collect();
        (found.len() >= n).then_some(found)
    })
}

/// The pid of the trainer's `n`th start (1-based), once it has started.
fn trainer_pid(scene: &Scene, n: usize) -> i64 {
    wait_for_it(&format!("start {n} of the trainer"), || {
        scene
            .starts()
            .get(n - 1)
            .map(|s| s["pid"].as_i64().unwrap())
    })
}

fn records(journal: &[Value], event: &str) -> Vec<Value> {
    journal
        .iter()
        .filter(|r| r["event"] == event)
        .cloned()
        .collect()
}

fn one(journal: &[Value], event: &str) -> Value {
    let found = records(journal, event);
    assert_eq!(found.len(), 1, "one `{event}` record: {journal:#?}");
    found.into_iter().next().unwrap()
}

fn attempt_record(journal: &[Value], event: &str, attempt: u64) -> Value {
    journal
        .iter()
        .find(|r| r["event"] == event && r["attempt"] == attempt)
        .unwrap_or_else(|| panic!("no `{event}` for attempt {attempt}: {journal:#?}"))
        .clone()
}

/// The step number of a trainer checkpoint (`.../ckpt-step00004.safetensors`).
fn checkpoint_step(path: &str) -> u32 {
    let name = Path::new(path).file_name().unwrap().to_str().unwrap();
    name.trim_start_matches("ckpt-step")
        .trim_end_matches(".safetensors")
        .parse()
        .unwrap()
}

fn attempt_stdout(scene: &Scene, attempt: u32) -> String {
    std::fs::read_to_string(
        scene
            .run_dir()
            .join(format!("attempt-{attempt}.stdout.log")),
    )
    .unwrap()
}

/// Checks what a user sees after a kernel fault that stopped attempt 1 of a `steps`-step job
/// and resumed it on the cpu tier from a checkpoint. Returns the journal.
fn assert_stopped_and_resumed_on_cpu(
    scene: &Scene,
    status: ExitStatus,
    stderr: &str,
    steps: u32,
) -> Vec<Value> {
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    let journal = scene.journal();
    let ended = attempt_record(&journal, "attempt_ended", 1);
    assert_eq!(ended["status"]["name"], "SIGTERM", "{ended}");
    assert_eq!(ended["ended_by"], "gpu_memory_fault (xid-31)");
    let first = attempt_stdout(scene, 1);
    assert!(
        !first.contains(&format!("step {steps}/{steps}")),
        "attempt 1 ran to its end instead of being stopped:\n{first}"
    );

    let starts = scene.starts();
    assert_eq!(starts.len(), 2, "two starts: {starts:?}");
    assert_eq!(arg_after(&starts[1], "--device"), Some("cpu"));
    let second = attempt_record(&journal, "attempt_started", 2);
    assert_eq!(second["tier"], "cpu");
    let checkpoint = second["checkpoint"]
        .as_str()
        .unwrap_or_else(|| panic!("attempt 2 resumed from no checkpoint: {second}"));
    assert!(
        Path::new(checkpoint).starts_with(scene.ckpt()),
        "{checkpoint}"
    );
    assert_eq!(arg_after(&starts[1], "--resume"), Some(checkpoint));
    let step = checkpoint_step(checkpoint);
    assert!(step >= 2, "{checkpoint}");
    // The trainer resumed where the checkpoint left it and finished.
    let resumed = attempt_stdout(scene, 2);
    assert!(
        resumed.starts_with(&format!(
            "start device=cpu resume={checkpoint} step={step}\n"
        )),
        "{resumed}"
    );
    assert!(
        resumed.contains(&format!("step {steps}/{steps}")),
        "{resumed}"
    );
    let finished = journal.last().unwrap();
    assert_eq!(finished["event"], "run_finished");
    assert_eq!(finished["outcome"], "succeeded");
    assert_eq!(finished["attempts"], 2);
    assert_eq!(finished["exit_code"], 0);
    assert!(
        stderr.contains("fault in attempt 1: gpu_memory_fault (xid-31) on kernel"),
        "stderr:\n{stderr}"
    );
    journal
}

#[test]
fn an_xid_naming_the_jobs_pid_stops_it_and_it_resumes_on_the_cpu_from_its_checkpoint() {
    let scene = Scene::new();
    let mut kmsg = KernelLog::new(&scene);
    let config = scene.fast_config("");
    let mut extra = vec!["--config", &config, "--kernel-log", kmsg.arg()];
    let machine = bare_machine(&scene);
    extra.extend(machine.iter().map(String::as_str));
    let steps = 40;
    let run = start(
        scene.command(
            &extra,
            &[
                "--device",
                "{device}",
                "--resume",
                "{checkpoint}",
                "--sleep",
                "0.05",
                "--steps",
                &steps.to_string(),
            ],
        ),
        &scene,
    );
    let pid = trainer_pid(&scene, 1);
    wait_for_it("the first checkpoint", || {
        scene
            .ckpt()
            .join("ckpt-step00002.safetensors")
            .exists()
            .then_some(())
    });
    kmsg.append(&xid31(pid));
    let (status, stderr) = run.finish();

    let journal = assert_stopped_and_resumed_on_cpu(&scene, status, &stderr, steps);
    let fault = one(&journal, "fault");
    assert_eq!(fault["attempt"], 1);
    assert_eq!(fault["stream"], "kernel");
    assert_eq!(fault["rule"], "xid-31");
    assert_eq!(fault["class"], "gpu_memory_fault");
    assert_eq!(fault["action"], "fallback");
    // A record of the kernel's own (facility 0), as the NVIDIA driver writes it.
    assert_eq!(fault["facility"], "kernel");
    assert_eq!(fault["captures"]["pid"], pid.to_string());
    assert_eq!(fault["line"], xid31(pid));
    assert_eq!(
        fault["attribution"],
        format!(
            "pid {pid} is in the job's process tree (kernel record {})",
            kmsg.seq
        )
    );
    assert!(records(&journal, "foreign_fault").is_empty());
}

#[test]
fn an_xid_naming_a_worker_of_the_job_stops_the_whole_job() {
    // torchrun and DataLoader workers: the process that owns the GPU context, and so the one
    // the Xid names, is a child of the command gpuwarden started. It ignores SIGTERM, so it is
    // killed after the grace.
    let scene = Scene::new();
    let mut kmsg = KernelLog::new(&scene);
    let config = scene.fast_config("");
    let mut extra = vec![
        "--config",
        &config,
        "--grace",
        "1",
        "--kernel-log",
        kmsg.arg(),
    ];
    let machine = bare_machine(&scene);
    extra.extend(machine.iter().map(String::as_str));
    let steps = 30;
    let run = start(
        scene.command(
            &extra,
            &[
                "--device",
                "{device}",
                "--resume",
                "{checkpoint}",
                "--worker",
                "--sleep",
                "0.05",
                "--steps",
                &steps.to_string(),
            ],
        ),
        &scene,
    );
    let leader = trainer_pid(&scene, 1);
    let worker = wait_for_it("the worker of attempt 1", || {
        scene.records().iter().find_map(|r| r["worker"].as_i64())
    });
    wait_for_it("the first checkpoint", || {
        scene
            .ckpt()
            .join("ckpt-step00002.safetensors")
            .exists()
            .then_some(())
    });
    kmsg.append(&xid31(worker));
    let (status, stderr) = run.finish();

    let journal = assert_stopped_and_resumed_on_cpu(&scene, status, &stderr, steps);
    let fault = one(&journal, "fault");
    assert_eq!(fault["captures"]["pid"], worker.to_string());
    assert!(
        fault["attribution"]
            .as_str()
            .unwrap()
            .starts_with(&format!("pid {worker} is in the job's process tree")),
        "{fault}"
    );
    assert!(
        stderr.contains("SIGKILL"),
        "the worker outlived SIGTERM:\n{stderr}"
    );
    for pid in [leader, worker] {
        assert!(dead(pid as i32), "process {pid} of attempt 1 survived");
    }
}

#[test]
fn xids_naming_other_processes_are_journaled_as_foreign_and_the_job_runs_on() {
    let scene = Scene::new();
    let mut kmsg = KernelLog::new(&scene);
    let mut extra = vec!["--kernel-log", kmsg.arg()];
    let machine = bare_machine(&scene);
    extra.extend(machine.iter().map(String::as_str));
    let run = start(
        scene.command(
            &extra,
            &["--device", "{device}", "--sleep", "0.05", "--steps", "40"],
        ),
        &scene,
    );
    trainer_pid(&scene, 1);
    let gpuwarden = scene.journal()[0]["gpuwarden_pid"].as_i64().unwrap();
    // A process that lived and ended before gpuwarden could see it: nothing tells whose it was.
    let mut brief = Command::new("true").spawn().unwrap();
    let gone = i64::from(brief.id());
    brief.wait().unwrap();
    for pid in [1, gpuwarden, gone] {
        kmsg.append(&xid31(pid));
    }
    let foreign = wait_for_records(&scene, "foreign_fault", 3);
    let (status, stderr) = run.finish();

    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    let reasons: Vec<&str> = foreign
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        [
            "pid 1 is not in the job's process tree".to_string(),
            format!("pid {gpuwarden} is not in the job's process tree"),
            format!("pid {gone} is gone and was never seen in the job's process tree"),
        ]
    );
    for (record, pid) in foreign.iter().zip([1, gpuwarden, gone]) {
        assert_eq!(record["rule"], "xid-31");
        assert_eq!(record["class"], "gpu_memory_fault");
        assert_eq!(record["facility"], "kernel");
        assert_eq!(record["line"], xid31(pid));
        assert_eq!(record["captures"]["pid"], pid.to_string());
    }
    assert_eq!(
        stderr
            .matches("kernel log: gpu_memory_fault (xid-31) not acted on: pid ")
            .count(),
        3,
        "stderr:\n{stderr}"
    );
    // Not stopped: one attempt, to its end.
    let journal = scene.journal();
    assert!(records(&journal, "fault").is_empty(), "{journal:#?}");
    assert_eq!(scene.starts().len(), 1);
    let ended = one(&journal, "attempt_ended");
    assert_eq!(ended["status"]["code"], 0);
    assert!(attempt_stdout(&scene, 1).contains("step 40/40"));
    assert_eq!(journal.last().unwrap()["attempts"], 1);
}

/// `run` on the simulated RX 6800 (`--sysfs-root`), with `extra` flags and the trainer's `job`
/// arguments, following `kmsg`.
fn start_on_the_rx6800(scene: &Scene, kmsg: &KernelLog, extra: &[&str], job: &[&str]) -> Running {
    std::fs::create_dir_all(scene.path("root")).unwrap();
    let sysfs = rx6800_sysfs();
    let root = scene.path("root");
    let mut args = vec![
        "--kernel-log",
        kmsg.arg(),
        "--sysfs-root",
        sysfs.to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    start(scene.command(&args, job), scene)
}

#[test]
fn a_gpu_reset_of_the_jobs_gpu_restarts_it_and_faults_of_other_devices_do_not() {
    let scene = Scene::new();
    let mut kmsg = KernelLog::new(&scene);
    let config = scene.fast_config("");
    let run = start_on_the_rx6800(
        &scene,
        &kmsg,
        &["--config", &config],
        &[
            "--device",
            "{device}",
            "--resume",
            "{checkpoint}",
            "--sleep",
            "0.05",
            "--steps",
            "40",
        ],
    );
    trainer_pid(&scene, 1);
    // Another GPU of the machine (not one this job can use) resets and falls off the bus.
    let other_reset = format!("amdgpu {NOT_OUR_GPU}: amdgpu: GPU reset begin!");
    let other_lost = "NVRM: Xid (PCI:0000:86:00): 79, GPU has fallen off the bus.";
    kmsg.append(&other_reset);
    kmsg.append(other_lost);
    let foreign = wait_for_records(&scene, "foreign_fault", 2);
    // Then the job's own GPU.
    let ours = format!("amdgpu {OUR_GPU}: amdgpu: GPU reset begin!");
    kmsg.append(&ours);
    let (status, stderr) = run.finish();

    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    assert_eq!(foreign[0]["line"], other_reset);
    assert_eq!(foreign[0]["rule"], "amdgpu-gpu-reset");
    assert_eq!(
        foreign[0]["reason"],
        format!("device {NOT_OUR_GPU} is not a GPU the job can use")
    );
    assert_eq!(foreign[1]["line"], other_lost);
    assert_eq!(foreign[1]["rule"], "xid-79");
    assert_eq!(
        foreign[1]["reason"],
        "device 0000:86:00 is not a GPU the job can use"
    );

    let journal = scene.journal();
    assert_eq!(records(&journal, "foreign_fault").len(), 2, "{journal:#?}");
    let fault = one(&journal, "fault");
    assert_eq!(fault["attempt"], 1);
    assert_eq!(fault["stream"], "kernel");
    assert_eq!(fault["rule"], "amdgpu-gpu-reset");
    assert_eq!(fault["class"], "gpu_reset");
    assert_eq!(fault["captures"]["pci"], OUR_GPU);
    assert_eq!(
        fault["attribution"],
        format!(
            "device {OUR_GPU} is a GPU the job can use (kernel record {})",
            kmsg.seq
        )
    );
    // A reset loses the work on the GPU but says nothing against the tier: the job restarts on
    // the same tier, from its checkpoint.
    assert_eq!(fault["action"], "restart");
    let ended = attempt_record(&journal, "attempt_ended", 1);
    assert_eq!(ended["status"]["name"], "SIGTERM");
    let second = attempt_record(&journal, "attempt_started", 2);
    assert_eq!(second["tier"], "gpu");
    let starts = scene.starts();
    assert_eq!(starts.len(), 2);
    assert_eq!(arg_after(&starts[1], "--device"), Some("cuda"));
    assert_eq!(journal.last().unwrap()["outcome"], "succeeded");
    assert!(
        stderr.contains(&format!(
            "kernel log: gpu_reset (amdgpu-gpu-reset) not acted on: device {NOT_OUR_GPU} is not a GPU the job can use"
        )),
        "stderr:\n{stderr}"
    );
}

#[test]
fn a_gpu_reset_is_foreign_to_a_job_that_uses_no_gpu() {
    // The same reset of the machine's one GPU, first under a tier that hides it from the job,
    // then under the cpu tier: neither job uses the GPU, and neither is stopped.
    let reset = format!("amdgpu {OUR_GPU}: amdgpu: GPU reset begin!");
    let hidden = "ladder = [\"gpu-hidden\", \"cpu\"]\n[[tier]]\nname = \"gpu-hidden\"\ndevice = \"cuda\"\nenv = { ROCR_VISIBLE_DEVICES = \"1\" }\n";
    for (config, ladder) in [(Some(hidden), None), (None, Some("cpu"))] {
        let scene = Scene::new();
        let mut kmsg = KernelLog::new(&scene);
        let mut extra = Vec::new();
        let path = scene.path("gpuwarden.toml");
        if let Some(config) = config {
            std::fs::write(&path, config).unwrap();
            extra.extend(["--config", path.to_str().unwrap()]);
        }
        if let Some(ladder) = ladder {
            extra.extend(["--ladder", ladder]);
        }
        let run = start_on_the_rx6800(
            &scene,
            &kmsg,
            &extra,
            &["--device", "{device}", "--sleep", "0.05", "--steps", "20"],
        );
        trainer_pid(&scene, 1);
        kmsg.append(&reset);
        let foreign = wait_for_records(&scene, "foreign_fault", 1);
        let (status, stderr) = run.finish();

        assert_eq!(
            status.code(),
            Some(0),
            "{config:?} {ladder:?}; stderr:\n{stderr}"
        );
        assert_eq!(foreign[0]["line"], reset);
        assert_eq!(
            foreign[0]["reason"],
            format!("device {OUR_GPU}: the job uses no GPU of this machine on its current tier"),
            "{config:?} {ladder:?}"
        );
        let journal = scene.journal();
        assert!(records(&journal, "fault").is_empty(), "{journal:#?}");
        assert_eq!(scene.starts().len(), 1);
        assert_eq!(journal.last().unwrap()["attempts"], 1);
    }
}

#[test]
fn a_fault_seen_on_stderr_and_in_the_kernel_log_is_one_incident() {
    // The runtime's error on stderr, then the driver's Xid for the same process while the job
    // is being stopped (its worker ignores SIGTERM, so that takes the 1 s grace): one step down
    // the ladder, not two (a second one would leave no tier and end the run with exit 3).
    let scene = Scene::new();
    let mut kmsg = KernelLog::new(&scene);
    let config = scene.fast_config("");
    let mut extra = vec![
        "--config",
        &config,
        "--grace",
        "1",
        "--kernel-log",
        kmsg.arg(),
    ];
    let machine = bare_machine(&scene);
    extra.extend(machine.iter().map(String::as_str));
    let run = start(
        scene.command(
            &extra,
            &[
                "--device",
                "{device}",
                "--resume",
                "{checkpoint}",
                "--fault-at",
                "3",
                "--fault",
                "cuda-continue",
                "--worker",
                "--sleep",
                "0.05",
                "--steps",
                "20",
            ],
        ),
        &scene,
    );
    let worker = wait_for_it("the worker of attempt 1", || {
        scene.records().iter().find_map(|r| r["worker"].as_i64())
    });
    wait_for_records(&scene, "fault", 1);
    kmsg.append(&xid31(worker));
    let (status, stderr) = run.finish();

    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    let journal = scene.journal();
    let faults = records(&journal, "fault");
    assert_eq!(faults.len(), 2, "{journal:#?}");
    assert_eq!(faults[0]["stream"], "stderr");
    assert_eq!(faults[1]["stream"], "kernel");
    assert_eq!(faults[1]["attempt"], 1);
    assert_eq!(one(&journal, "restart_scheduled")["tier"], "cpu");
    let ended = attempt_record(&journal, "attempt_ended", 1);
    assert_eq!(ended["faults"]["xid-31"], 1);
    assert_eq!(scene.starts().len(), 2);
    assert_eq!(journal.last().unwrap()["outcome"], "succeeded");
}

#[test]
fn a_late_kernel_line_about_an_ended_attempt_does_not_stop_the_next_one() {
    // Attempt 1 dies of a fault its stderr reports; attempt 2 runs on the cpu. A kernel record
    // about attempt 1's process read only now (a reader that fell behind or was restarted) is
    // history: attempt 2 has nothing to do with it and must finish.
    let scene = Scene::new();
    let mut kmsg = KernelLog::new(&scene);
    let config = scene.fast_config("");
    let mut extra = vec!["--config", &config, "--kernel-log", kmsg.arg()];
    let machine = bare_machine(&scene);
    extra.extend(machine.iter().map(String::as_str));
    let run = start(
        scene.command(
            &extra,
            &[
                "--device",
                "{device}",
                "--resume",
                "{checkpoint}",
                "--fault-at",
                "3",
                "--fault",
                "cuda",
                "--sleep",
                "0.05",
                "--steps",
                "30",
            ],
        ),
        &scene,
    );
    let first = trainer_pid(&scene, 1);
    trainer_pid(&scene, 2);
    kmsg.append(&xid31(first));
    let (status, stderr) = run.finish();

    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    let journal = scene.journal();
    let foreign = one(&journal, "foreign_fault");
    assert_eq!(foreign["line"], xid31(first));
    assert!(
        foreign["reason"].as_str().unwrap().contains("attempt 1"),
        "the reason names the attempt the process belonged to: {foreign}"
    );
    let faults = records(&journal, "fault");
    assert_eq!(faults.len(), 1, "{journal:#?}");
    assert_eq!(faults[0]["stream"], "stderr");
    assert_eq!(scene.starts().len(), 2);
    assert_eq!(journal.last().unwrap()["attempts"], 2);
}

#[test]
fn an_unreadable_kernel_log_is_one_warning_and_the_job_is_still_supervised() {
    let scene = Scene::new();
    let config = scene.fast_config("");
    let missing = scene.path("no-such-kmsg");
    let mut extra = vec![
        "--config",
        &config,
        "--kernel-log",
        missing.to_str().unwrap(),
    ];
    let machine = bare_machine(&scene);
    extra.extend(machine.iter().map(String::as_str));
    let run = start(
        scene.command(
            &extra,
            &[
                "--device",
                "{device}",
                "--resume",
                "{checkpoint}",
                "--fault-at",
                "3",
                "--fault",
                "hsa",
                "--steps",
                "6",
            ],
        ),
        &scene,
    );
    let (status, stderr) = run.finish();
    assert_supervised_without_the_kernel_log(&scene, status, &stderr, &missing.to_string_lossy());
}

/// After a run whose kernel log (`path`) could not be opened: one warning naming it, in the
/// journal and on stderr, and the fault the job printed still moved it to the cpu tier.
fn assert_supervised_without_the_kernel_log(
    scene: &Scene,
    status: ExitStatus,
    stderr: &str,
    path: &str,
) {
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    let journal = scene.journal();
    let warning = one(&journal, "warning");
    let message = warning["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!("cannot open the kernel log {path}: ")),
        "{message}"
    );
    assert!(
        message.ends_with("supervising without it (--no-kernel-log silences this)"),
        "{message}"
    );
    assert_eq!(
        stderr
            .matches("gpuwarden: warning: cannot open the kernel log")
            .count(),
        1,
        "stderr:\n{stderr}"
    );
    assert!(stderr.contains(message), "stderr:\n{stderr}");
    let fault = one(&journal, "fault");
    assert_eq!(fault["stream"], "stderr");
    assert_eq!(fault["class"], "gpu_memory_fault");
    let starts = scene.starts();
    assert_eq!(starts.len(), 2);
    assert_eq!(arg_after(&starts[1], "--device"), Some("cpu"));
    assert_eq!(journal.last().unwrap()["outcome"], "succeeded");
}

#[test]
fn without_permission_for_dev_kmsg_the_run_warns_once_and_goes_on() {
    // The common case off root: `kernel.dmesg_restrict = 1` and an ordinary user.
    let restricted =
        std::fs::read_to_string("/proc/sys/kernel/dmesg_restrict").is_ok_and(|v| v.trim() == "1");
    if !is_root() || !restricted {
        return common::skip(
            "without_permission_for_dev_kmsg_the_run_warns_once_and_goes_on",
            "needs root (to run gpuwarden as nobody) and kernel.dmesg_restrict = 1 (so that nobody cannot read /dev/kmsg)",
        );
    }
    let scene = Scene::new();
    for dir in [scene.dir.path().to_path_buf(), scene.ckpt()] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let config = scene.fast_config("");
    let mut extra = vec!["--config", &config];
    let machine = bare_machine(&scene);
    extra.extend(machine.iter().map(String::as_str));
    // The checkout may lie where nobody cannot enter (a clone under /root): nobody runs copies.
    let mut cmd = scene.command_for_another_user(
        &extra,
        &[
            "--device",
            "{device}",
            "--resume",
            "{checkpoint}",
            "--fault-at",
            "3",
            "--fault",
            "hsa",
            "--steps",
            "6",
        ],
    );
    // nobody cannot enter /root, where a pyenv python may live: the system's python3.
    cmd.uid(65534)
        .gid(65534)
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", "/nonexistent");
    let run = start(cmd, &scene);
    let (status, stderr) = run.finish();
    assert_supervised_without_the_kernel_log(&scene, status, &stderr, "/dev/kmsg");
    let warning = one(&scene.journal(), "warning");
    assert!(
        warning["message"]
            .as_str()
            .unwrap()
            .contains("run gpuwarden as root or with CAP_SYSLOG"),
        "{warning}"
    );
}

/// Whether this process runs as root (`/proc/self` belongs to the effective user).
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// One real `/dev/kmsg` test at a time, across test processes too.
fn kmsg_lock() -> common::Turn {
    common::machine_turn("kmsg")
}

/// Writes one record into the kernel log through a fresh descriptor: the kernel's rate limit
/// (10 records in 5 s) is per descriptor, so this one is never limited.
fn write_kmsg(record: &str) -> std::io::Result<()> {
    OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")?
        .write_all(record.as_bytes())
}

/// Whether this test can write into and read the kernel log; says why not otherwise.
fn kmsg_usable(test: &str) -> bool {
    let probe = format!("<14>gpuwarden test {test}: checking /dev/kmsg access\n");
    let readable = File::open("/dev/kmsg");
    match (write_kmsg(&probe), readable) {
        (Ok(()), Ok(_)) => true,
        (Err(e), _) | (_, Err(e)) => {
            common::skip(
                test,
                &format!(
                    "/dev/kmsg is not writable and readable here ({e}); run as root to check it"
                ),
            );
            false
        }
    }
}

/// Runs the trainer on the gpu tier under gpuwarden (real kernel log unless `extra` says
/// otherwise), writes an Xid 31 naming it into `/dev/kmsg` once it runs, and returns the run
/// with the trainer's pid.
fn xid_into_dev_kmsg(scene: &Scene, extra: &[&str], steps: u32) -> (Running, i64) {
    let config = scene.fast_config("");
    let mut args = vec!["--config", &config];
    args.extend_from_slice(extra);
    let machine = bare_machine(scene);
    args.extend(machine.iter().map(String::as_str));
    let run = start(
        scene.command(
            &args,
            &[
                "--device",
                "{device}",
                "--resume",
                "{checkpoint}",
                "--sleep",
                "0.05",
                "--steps",
                &steps.to_string(),
            ],
        ),
        scene,
    );
    let pid = trainer_pid(scene, 1);
    wait_for_it("the first checkpoint", || {
        scene
            .ckpt()
            .join("ckpt-step00002.safetensors")
            .exists()
            .then_some(())
    });
    // Level 4 (warning): not printed on the console. A record from user space always has the
    // user facility, whatever its prefix says.
    write_kmsg(&format!("<12>{}\n", xid31(pid))).unwrap();
    (run, pid)
}

#[test]
fn an_xid_written_into_dev_kmsg_stops_the_job_and_is_journaled_with_facility_user() {
    let _one_at_a_time = kmsg_lock();
    if !kmsg_usable("xid_into_dev_kmsg") {
        return;
    }
    let scene = Scene::new();
    let steps = 40;
    let (run, pid) = xid_into_dev_kmsg(&scene, &[], steps);
    let (status, stderr) = run.finish();

    let journal = assert_stopped_and_resumed_on_cpu(&scene, status, &stderr, steps);
    let fault = one(&journal, "fault");
    assert_eq!(fault["stream"], "kernel");
    assert_eq!(fault["rule"], "xid-31");
    assert_eq!(fault["facility"], "user");
    assert_eq!(fault["line"], xid31(pid));
    let attribution = fault["attribution"].as_str().unwrap();
    assert!(
        attribution.starts_with(&format!(
            "pid {pid} is in the job's process tree (kernel record "
        )),
        "{attribution}"
    );
}

#[test]
fn with_no_kernel_log_an_xid_in_dev_kmsg_is_not_acted_on() {
    let _one_at_a_time = kmsg_lock();
    if !kmsg_usable("no_kernel_log") {
        return;
    }
    let scene = Scene::new();
    // The job runs about a second after the record, far longer than the 1.4-5.7 ms a follower
    // takes to read it.
    let (run, _) = xid_into_dev_kmsg(&scene, &["--no-kernel-log"], 24);
    let (status, stderr) = run.finish();

    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    let journal = scene.journal();
    assert_eq!(
        events(&journal),
        [
            "run_started",
            "attempt_started",
            "attempt_ended",
            "run_finished"
        ],
        "{journal:#?}"
    );
    assert_eq!(journal[2]["status"]["code"], 0);
    assert_eq!(scene.starts().len(), 1);
    assert!(attempt_stdout(&scene, 1).contains("step 24/24"));
    assert!(!stderr.contains("kernel log"), "stderr:\n{stderr}");
}

/// A neighbour's job faulting on another GPU of the machine (Xid 13, naming pid 1): foreign to
/// every job here.
const NEIGHBOUR_XID13: &str =
    "NVRM: Xid (PCI:0000:07:00): 13, pid=1, name=init, Graphics SM Warp Exception";

/// The flood's pace: a burst of records every [`PAUSE`]. [`GENTLE`] (about 10,000 records a
/// second) is a pace gpuwarden keeps up with, so a record of the job's finds room in its queue;
/// [`HEAVY`] (about 100,000 a second) is more than it can attribute, so its input channel never
/// empties.
const GENTLE: u64 = 50;
const HEAVY: u64 = 500;
const PAUSE: Duration = Duration::from_millis(5);

/// How long a flood lasts, and when in it the job's Xid 31 is written.
const FLOOD: Duration = Duration::from_secs(6);
const XID31_AFTER: Duration = Duration::from_millis(500);

/// What the flood writer did, in wall-clock time (the journal's clock).
struct Flood {
    /// Records written, the Xid 31 included.
    records: u64,
    /// Just before the Xid 31 naming the job was written.
    xid31_at: SystemTime,
    /// Just after the last record was written.
    ended_at: SystemTime,
}

/// Appends [`NEIGHBOUR_XID13`] records to `kmsg` for [`FLOOD`], bursts of `before` records until
/// the Xid 31 naming `pid` is written ([`XID31_AFTER`] in), bursts of `after` records from then
/// on. Sequence numbers are consecutive (a gap would be reported as lost records).
fn flood(kmsg: &KernelLog, pid: i64, before: u64, after: u64) -> JoinHandle<Flood> {
    let mut file = OpenOptions::new().append(true).open(&kmsg.path).unwrap();
    let mut seq = kmsg.seq;
    std::thread::spawn(move || {
        let record = |seq: &mut u64, message: &str, into: &mut Vec<u8>| {
            *seq += 1;
            writeln!(into, "4,{seq},{},-;{message}", 6_137_826_155 + *seq * 10).unwrap();
        };
        let start = Instant::now();
        let mut xid31_at = None;
        let mut batch = Vec::new();
        let mut records = 0;
        while start.elapsed() < FLOOD {
            if xid31_at.is_none() && start.elapsed() >= XID31_AFTER {
                let mut one = Vec::new();
                record(&mut seq, &xid31(pid), &mut one);
                xid31_at = Some(SystemTime::now());
                file.write_all(&one).unwrap();
                records += 1;
            }
            let burst = if xid31_at.is_some() { after } else { before };
            batch.clear();
            for _ in 0..burst {
                record(&mut seq, NEIGHBOUR_XID13, &mut batch);
            }
            file.write_all(&batch).unwrap();
            records += burst;
            std::thread::sleep(PAUSE);
        }
        Flood {
            records,
            xid31_at: xid31_at.expect("the flood outlasts the moment of the Xid 31"),
            ended_at: SystemTime::now(),
        }
    })
}

/// Starts a 60-step job on the gpu tier (checkpoints every 2 steps) following `kmsg`, waits
/// for its first checkpoint and floods `kmsg` (see [`flood`]). Returns gpuwarden's status and
/// stderr, what the flood did, and the job's pid.
fn run_through_a_flood(
    scene: &Scene,
    kmsg: &KernelLog,
    before: u64,
    after: u64,
) -> (ExitStatus, String, Flood, i64) {
    let config = scene.fast_config("");
    let mut extra = vec!["--config", &config, "--kernel-log", kmsg.arg()];
    let machine = bare_machine(scene);
    extra.extend(machine.iter().map(String::as_str));
    let run = start(
        scene.command(
            &extra,
            &[
                "--device",
                "{device}",
                "--resume",
                "{checkpoint}",
                "--sleep",
                "0.05",
                "--steps",
                "60",
            ],
        ),
        scene,
    );
    let pid = trainer_pid(scene, 1);
    wait_for_it("the first checkpoint", || {
        scene
            .ckpt()
            .join("ckpt-step00002.safetensors")
            .exists()
            .then_some(())
    });
    let writer = flood(kmsg, pid, before, after);
    let (status, stderr) = run.finish();
    (status, stderr, writer.join().unwrap(), pid)
}

/// A warning that the kernel follower dropped records because gpuwarden fell behind.
fn is_drop_warning(record: &Value) -> bool {
    record["event"] == "warning"
        && record["message"]
            .as_str()
            .is_some_and(|m| m.contains("records dropped because gpuwarden fell behind"))
}

#[test]
fn a_flood_of_foreign_kernel_faults_does_not_delay_stopping_the_job() {
    // A neighbour's GPU logs an Xid 13 for its own process without pause. Half a second in, the
    // job's own GPU faults, and the flood grows past what gpuwarden can attribute. The
    // supervisor's deadlines (SIGTERM after the settle time, the backoff) must come due in the
    // flood, not after it; each foreign record is journaled once, not thousands of times.
    let scene = Scene::new();
    let kmsg = KernelLog::new(&scene);
    let (status, stderr, flood, pid) = run_through_a_flood(&scene, &kmsg, GENTLE, HEAVY);

    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    assert!(flood.records > 10_000, "only {} records", flood.records);
    let journal = scene.journal();
    let ended = attempt_record(&journal, "attempt_ended", 1);
    assert_eq!(
        ended["ended_by"], "gpu_memory_fault (xid-31)",
        "{journal:#?}\nstderr:\n{stderr}"
    );
    // Stopped by gpuwarden, not left to run to its end.
    assert_eq!(ended["status"]["name"], "SIGTERM", "{ended}");
    // Stopped during the flood, not after it: a stop that waited for the flood to pass would
    // come after its last record (5.5 s after the Xid).
    let ended_at = ended["at"].as_str().unwrap();
    let flood_end = rfc3339(flood.ended_at);
    assert!(
        ended_at < flood_end.as_str(),
        "attempt 1 ended at {ended_at}, after the flood ended at {flood_end} (the Xid 31 was written at {})",
        rfc3339(flood.xid31_at)
    );
    let second = attempt_record(&journal, "attempt_started", 2);
    assert_eq!(second["tier"], "cpu");
    let started_at = second["at"].as_str().unwrap();
    assert!(
        started_at < flood_end.as_str(),
        "attempt 2 started at {started_at}, not before the flood ended at {flood_end}"
    );
    let fault = one(&journal, "fault");
    assert_eq!(fault["rule"], "xid-31");
    assert_eq!(fault["captures"]["pid"], pid.to_string());

    // The neighbour's fault: journaled and shown once, its repeats counted at the end.
    let foreign = one(&journal, "foreign_fault");
    assert_eq!(foreign["rule"], "xid-13");
    assert_eq!(foreign["captures"]["pid"], "1");
    assert_eq!(foreign["line"], NEIGHBOUR_XID13);
    assert_eq!(
        stderr
            .matches("kernel log: gpu_exception (xid-13) not acted on: pid 1 ")
            .count(),
        1,
        "stderr:\n{stderr}"
    );
    let last = journal.last().unwrap();
    assert_eq!(last["event"], "warning", "{last}");
    let message = last["message"].as_str().unwrap();
    let repeats: u64 = message
        .split_once("xid-13 x")
        .and_then(|(_, rest)| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no repeat count of xid-13 in {message:?}"));
    assert!(repeats > 1000 && repeats < flood.records, "{message}");
    assert!(stderr.contains(message), "stderr:\n{stderr}");
    // Nothing else: eleven records for a run of two attempts and a flood of 100,000 lines. (The
    // follower's warnings that it dropped records are left out: how many bursts of them come
    // depends on the machine's load.)
    let kept: Vec<Value> = journal
        .iter()
        .filter(|r| !is_drop_warning(r))
        .cloned()
        .collect();
    assert_eq!(
        events(&kept),
        [
            "run_started",
            "attempt_started",
            "foreign_fault",
            "fault",
            "attempt_ended",
            "restart_scheduled",
            "attempt_started",
            "attempt_ended",
            "run_finished",
            "foreign_repeats",
            "warning",
        ],
        "{journal:#?}"
    );
    assert_eq!(one(&journal, "run_finished")["outcome"], "succeeded");
}

#[test]
fn a_jobs_fault_is_not_lost_in_a_flood_that_outruns_gpuwarden() {
    // The same flood, heavy from its start: by the time the job's Xid 31 comes, gpuwarden's
    // queue is full of the neighbour's Xid 13, repeats that will only be counted.
    let scene = Scene::new();
    let kmsg = KernelLog::new(&scene);
    let (status, stderr, _, _) = run_through_a_flood(&scene, &kmsg, HEAVY, HEAVY);

    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    let journal = scene.journal();
    let ended = attempt_record(&journal, "attempt_ended", 1);
    assert_eq!(
        ended["ended_by"], "gpu_memory_fault (xid-31)",
        "the job's fault was lost in the flood: {journal:#?}"
    );
    // Falling behind is said when it starts and with its total at the end, not once per
    // burst.
    let drops = journal.iter().filter(|r| is_drop_warning(r)).count();
    assert!(
        drops <= 2,
        "{drops} warnings of dropped records: {journal:#?}"
    );
}

#[test]
fn a_device_fault_read_after_the_job_died_still_belongs_to_its_attempt() {
    // The job's main process finishes, but its worker (which ignores SIGTERM) keeps the attempt
    // alive for the 2 s grace. The driver's Xid about the main process is read only after it
    // has died and been reaped: it is still attempt 1's fault (the process was seen in its
    // tree), so attempt 1 ends by it and the job goes on on the cpu tier, instead of the run
    // calling a job whose GPU faulted a success.
    let scene = Scene::new();
    let mut kmsg = KernelLog::new(&scene);
    let config = scene.fast_config("");
    let mut extra = vec![
        "--config",
        &config,
        "--grace",
        "2",
        "--kernel-log",
        kmsg.arg(),
    ];
    let machine = bare_machine(&scene);
    extra.extend(machine.iter().map(String::as_str));
    let steps = 8;
    let run = start(
        scene.command(
            &extra,
            &[
                "--device",
                "{device}",
                "--resume",
                "{checkpoint}",
                "--worker",
                "--sleep",
                "0.05",
                "--steps",
                &steps.to_string(),
            ],
        ),
        &scene,
    );
    let leader = trainer_pid(&scene, 1);
    // Journaled when gpuwarden has reaped the main process and found its worker still there.
    let leftovers = wait_for_records(&scene, "leftovers", 1);
    assert_eq!(leftovers[0]["attempt"], 1);
    assert!(
        dead(leader as i32),
        "the main process of attempt 1 still runs"
    );
    kmsg.append(&xid31(leader));
    let (status, stderr) = run.finish();

    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    let journal = scene.journal();
    assert!(
        records(&journal, "foreign_fault").is_empty(),
        "{journal:#?}"
    );
    let fault = one(&journal, "fault");
    assert_eq!(fault["attempt"], 1);
    assert_eq!(fault["stream"], "kernel");
    assert_eq!(fault["rule"], "xid-31");
    assert_eq!(fault["captures"]["pid"], leader.to_string());
    assert_eq!(
        fault["attribution"],
        format!(
            "pid {leader} is in the job's process tree (kernel record {})",
            kmsg.seq
        )
    );
    let ended = attempt_record(&journal, "attempt_ended", 1);
    assert_eq!(ended["ended_by"], "gpu_memory_fault (xid-31)", "{ended}");
    // The main process had exited 0; the worker was killed after the grace.
    assert_eq!(ended["status"]["code"], 0, "{ended}");
    assert!(
        stderr.contains("fault in attempt 1: gpu_memory_fault (xid-31) on kernel"),
        "stderr:\n{stderr}"
    );
    let second = attempt_record(&journal, "attempt_started", 2);
    assert_eq!(second["tier"], "cpu");
    let starts = scene.starts();
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert_eq!(arg_after(&starts[1], "--device"), Some("cpu"));
    let checkpoint = second["checkpoint"].as_str().unwrap();
    assert_eq!(checkpoint_step(checkpoint), steps);
    let finished = one(&journal, "run_finished");
    assert_eq!(finished["outcome"], "succeeded");
    assert_eq!(finished["attempts"], 2);
    // Both attempts' workers were killed with their groups.
    let workers: Vec<i64> = scene
        .records()
        .iter()
        .filter_map(|r| r["worker"].as_i64())
        .collect();
    assert_eq!(workers.len(), 2, "{workers:?}");
    for worker in workers {
        assert!(dead(worker as i32), "worker {worker} survived");
    }
}

/// Issue 13: an amdgpu block names its process on the line after its fault line. Judged on its
/// first line alone, the job's ring timeout, on a machine where the job uses no GPU, would be
/// called foreign; held until its process line, it is the job's. A block whose process line
/// never comes is judged by its device once the hold ends.
#[test]
fn an_amdgpu_block_whose_process_comes_a_line_later_is_the_jobs() {
    let scene = Scene::new();
    let mut kmsg = KernelLog::new(&scene);
    let config = scene.fast_config("");
    let mut extra = vec!["--config", &config, "--kernel-log", kmsg.arg()];
    let machine = bare_machine(&scene);
    extra.extend(machine.iter().map(String::as_str));
    let run = start(
        scene.command(
            &extra,
            &[
                "--device",
                "{device}",
                "--resume",
                "{checkpoint}",
                "--sleep",
                "0.05",
                "--steps",
                "40",
            ],
        ),
        &scene,
    );
    let pid = trainer_pid(&scene, 1);
    // Real forms (pop-os/cosmic-epoch#3764, ollama/ollama#7723).
    let lone = "amdgpu 0000:86:00.0: [drm:amdgpu_job_timedout [amdgpu]] *ERROR* ring sdma0 timeout, signaled seq=857, emitted seq=859";
    kmsg.append(lone);
    let foreign = wait_for_records(&scene, "foreign_fault", 1);
    let timeout =
        "amdgpu 0000:86:00.0: ring gfx_0.0.0 timeout, signaled seq=57638, emitted seq=57641";
    let process =
        format!("amdgpu 0000:86:00.0:  Process python3 pid {pid} thread python3:cs0 pid {pid}");
    kmsg.append(timeout);
    let timeout_seq = kmsg.seq;
    kmsg.append(&process);
    let (status, stderr) = run.finish();

    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    assert_eq!(foreign[0]["line"], lone);
    assert_eq!(
        foreign[0]["reason"],
        "device 0000:86:00.0: the job uses no GPU of this machine on its current tier"
    );
    let journal = scene.journal();
    assert_eq!(records(&journal, "foreign_fault").len(), 1, "{journal:#?}");
    let fault = one(&journal, "fault");
    assert_eq!(fault["attempt"], 1);
    assert_eq!(fault["rule"], "amdgpu-ring-timeout");
    assert_eq!(fault["class"], "gpu_hang");
    assert_eq!(fault["line"], timeout);
    assert_eq!(fault["captures"]["pid"], pid.to_string());
    assert_eq!(fault["captures"]["process"], "python3");
    assert_eq!(
        fault["attribution"],
        format!("pid {pid} is in the job's process tree (kernel record {timeout_seq})")
    );
    // A hang restarts the job once.
    attempt_record(&journal, "attempt_started", 2);
    assert_eq!(journal.last().unwrap()["outcome"], "succeeded");
}

/// gpuwarden in the background, without this file's GPU variables.
fn start(cmd: Command, scene: &Scene) -> Running {
    Running::start(cmd, scene, &GPU_VARS, PATIENCE)
}

/// [`common::wait_for`] with this file's patience.
fn wait_for_it<T>(what: &str, ready: impl FnMut() -> Option<T>) -> T {
    common::wait_for(what, PATIENCE, ready)
}
