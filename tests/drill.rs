//! `gpuwarden drill` (issue 11) on the real binary: a fault injected into a live run by the road
//! a real one takes makes the run stop the attempt and go down the ladder.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A run in the background over the trainer on a machine without GPUs (empty sysfs and root),
/// following the file `kmsg` as its kernel log; killed if the test fails first.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(scene: &Scene) -> Running {
    File::create(scene.path("kmsg")).unwrap();
    for dir in ["sys", "root"] {
        std::fs::create_dir_all(scene.path(dir)).unwrap();
    }
    let config = scene.path("fast.toml");
    // One fall and its rescue; climbing back up after it is tests/overnight.rs's.
    std::fs::write(
        &config,
        "backoff = { initial = 0.05, max = 0.2 }\nclimb_back = \"off\"\n",
    )
    .unwrap();
    let (kmsg, sys, root) = (scene.path("kmsg"), scene.path("sys"), scene.path("root"));
    let mut cmd = scene.command(
        &[
            "--config",
            config.to_str().unwrap(),
            "--kernel-log",
            kmsg.to_str().unwrap(),
            "--sysfs-root",
            sys.to_str().unwrap(),
            "--root",
            root.to_str().unwrap(),
            "--no-health",
        ],
        &[
            "--device",
            "{device}",
            "--resume",
            "{checkpoint}",
            "--sleep",
            "0.1",
            "--steps",
            "30",
        ],
    );
    for var in [
        "CUDA_VISIBLE_DEVICES",
        "HIP_VISIBLE_DEVICES",
        "ROCR_VISIBLE_DEVICES",
    ] {
        cmd.env_remove(var);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(File::create(scene.path("gpuwarden.stderr")).unwrap())
        .spawn()
        .unwrap();
    Running(child)
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(Instant::now() < deadline, "{what} did not happen");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn drill(scene: &Scene, kind: &str) -> std::process::Output {
    Command::new(BIN)
        .arg("drill")
        .arg(scene.run_dir())
        .args(["--kind", kind])
        .output()
        .unwrap()
}

/// Drills the live run, waits for its end, and checks it fell back to the CPU and finished.
fn drill_and_fall_back(kind: &str) -> Vec<serde_json::Value> {
    let scene = Scene::new();
    let mut run = start(&scene);
    wait_until("a checkpoint of attempt 1", || {
        scene
            .full_journal()
            .iter()
            .any(|r| r["event"] == "checkpoint_saved")
    });
    let out = drill(&scene, kind);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let pid = scene.starts()[0]["pid"].as_i64().unwrap();
    assert!(
        text(&out.stdout).contains(&format!("pid {pid} (attempt 1)")),
        "{}",
        text(&out.stdout)
    );
    let status = run.0.wait().unwrap();
    let stderr = std::fs::read_to_string(scene.path("gpuwarden.stderr")).unwrap();
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    let starts = scene.starts();
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert_eq!(arg_after(&starts[0], "--device"), Some("cuda"));
    assert_eq!(arg_after(&starts[1], "--device"), Some("cpu"));
    // Resumed from the checkpoint attempt 1 wrote, not from scratch.
    assert!(arg_after(&starts[1], "--resume").is_some_and(|c| c.contains("ckpt-step")));
    let journal = scene.journal();
    let fault = journal.iter().find(|r| r["event"] == "fault").unwrap();
    assert_eq!(fault["attempt"], 1);
    assert_eq!(fault["class"], "gpu_memory_fault");
    assert_eq!(fault["action"], "fallback");
    // A drill on a run that is over is refused.
    let again = drill(&scene, kind);
    assert_eq!(again.status.code(), Some(2));
    assert!(
        text(&again.stderr).contains("is over"),
        "{}",
        text(&again.stderr)
    );
    journal
}

#[test]
fn a_kernel_drill_appends_an_xid_naming_the_live_pid_and_the_run_falls_back() {
    let journal = drill_and_fall_back("kernel");
    let fault = journal.iter().find(|r| r["event"] == "fault").unwrap();
    assert_eq!(fault["rule"], "xid-31");
    assert_eq!(fault["stream"], "kernel");
    assert!(
        fault["attribution"]
            .as_str()
            .unwrap()
            .contains("is in the job's process tree"),
        "{fault}"
    );
}

#[test]
fn an_output_drill_writes_into_the_jobs_stderr_pipe_and_the_run_falls_back() {
    let journal = drill_and_fall_back("output");
    let fault = journal.iter().find(|r| r["event"] == "fault").unwrap();
    assert_eq!(fault["rule"], "cuda-illegal-address");
    assert_eq!(fault["stream"], "stderr");
}

#[test]
fn a_drill_without_a_live_run_is_a_usage_error() {
    let scene = Scene::new();
    let out = Command::new(BIN)
        .arg("drill")
        .arg(scene.run_dir())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot read the journal"));
}
