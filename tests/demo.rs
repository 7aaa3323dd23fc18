//! `gpuwarden demo`: the whole story (GPU fault, stop, resume on CPU, finish) from the binary.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn demo_faults_on_gpu_resumes_on_cpu_and_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let started = Instant::now();
    let out = Command::new(BIN)
        .current_dir(dir.path())
        .args(["demo", "--step-ms", "10", "--run-dir"])
        .arg(&run_dir)
        .output()
        .unwrap();
    let took = started.elapsed();
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(took < Duration::from_secs(30), "the demo took {took:?}");

    // The real HSA message reached the user's terminal, and gpuwarden named the fault.
    assert!(
        stderr.contains("Memory access fault by GPU node-1"),
        "{stderr}"
    );
    assert!(stderr.contains("gpu_memory_fault"), "{stderr}");

    // Issue 12, its own voice: the user's view, not internals.
    assert!(!stderr.contains("__demo-job"), "{stderr}");
    assert!(
        stderr.contains("gpuwarden: supervising: the demo's training job"),
        "{stderr}"
    );
    // Paths as seen from where the user stands (the run directory is under it).
    assert!(
        stderr.contains("gpuwarden: run directory: run\n"),
        "{stderr}"
    );
    assert!(
        stderr.contains("resuming from run/checkpoints/ckpt-step00015.safetensors"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(&dir.path().display().to_string()),
        "{stderr}"
    );
    // Not a terminal: no colour.
    assert!(!stderr.contains('\x1b'), "{stderr}");
    // The summary table fits 80 columns.
    let table: Vec<&str> = stderr
        .lines()
        .skip_while(|l| !l.starts_with("  attempt"))
        .collect();
    assert_eq!(table.len(), 3, "{stderr}");
    for line in table {
        assert!(line.chars().count() <= 80, "{line}");
    }

    let journal = read_jsonl(&run_dir.join("journal.jsonl"));
    let starts: Vec<_> = journal
        .iter()
        .filter(|r| r["event"] == "attempt_started")
        .collect();
    assert_eq!(starts.len(), 2);
    assert_eq!(starts[0]["tier"], "gpu");
    assert!(starts[0]["checkpoint"].is_null());
    assert_eq!(starts[1]["tier"], "cpu");
    // Fault at step 17, checkpoints every 5 steps: resumed from step 15.
    let resumed = starts[1]["checkpoint"].as_str().unwrap();
    assert!(resumed.ends_with("ckpt-step00015.safetensors"), "{resumed}");
    assert_eq!(journal.last().unwrap()["outcome"], "succeeded");

    // The model really trained: the loss printed at the end is below the first one.
    let losses: Vec<f64> = stdout
        .lines()
        .filter(|l| l.starts_with("[demo] step"))
        .filter_map(|l| l.split("loss").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|v| v.parse().ok())
        .collect();
    assert!(losses.len() >= 20, "{stdout}");
    assert!(
        losses.last().unwrap() < &(losses[0] * 0.7),
        "loss did not fall: {losses:?}"
    );
}

/// Issue 12: colour where stderr is a terminal (a pty from util-linux `script`), none with
/// `NO_COLOR` set.
#[test]
fn colour_on_a_terminal_unless_no_color() {
    let dir = tempfile::tempdir().unwrap();
    let run = |no_color: bool, run_dir: &str| {
        let mut cmd = Command::new("script");
        cmd.current_dir(dir.path())
            .args(["-qec"])
            .arg(format!("{BIN} demo --step-ms 5 --run-dir {run_dir}"))
            .arg("/dev/null")
            .env_remove("NO_COLOR");
        if no_color {
            cmd.env("NO_COLOR", "1");
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let coloured = run(false, "a");
    assert!(coloured.contains("\x1b[1mgpuwarden:\x1b[0m"), "{coloured}");
    assert!(
        coloured.contains("\x1b[1;31mfault in attempt 1: gpu_memory_fault"),
        "{coloured}"
    );
    assert!(
        coloured.contains("\x1b[32mthe job finished after 2 attempts"),
        "{coloured}"
    );
    let plain = run(true, "b");
    assert!(plain.contains("gpuwarden: supervising:"), "{plain}");
    assert!(!plain.contains('\x1b'), "{plain}");
}
