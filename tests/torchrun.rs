//! Issue 12: torchrun as the child. `gpuwarden run -- torchrun --nproc-per-node 2 train.py`: a
//! fault in one rank stops every rank and the whole job restarts from the checkpoint.
//!
//! torchrun starts each worker in a session and process group of its own
//! (`start_new_session=True` in torch.distributed.elastic's SubprocessHandler), so the ranks are
//! outside the group gpuwarden signals: they are stopped by torchrun's own shutdown on SIGTERM,
//! by the attempt's cgroup where there is one, and gpuwarden waits until none is left before it
//! restarts. `tests/fixtures/torchrun.py` is a stand-in that treats its workers the same way
//! (CI has no PyTorch: its wheel and the CUDA wheels behind it are gigabytes); where
//! `python3 -c 'import torch'` works, the same scenario also runs under the real torchrun.
//! docs/torchrun.md has a real run on an H100.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
    })
}

/// Runs the two-rank job under `launcher` (argv up to and including `--nproc-per-node 2`):
/// rank 1 faults at step 3 on the `gpu` tier and hangs, rank 0 waits for it.
fn rank_fault_restarts_every_rank_from_the_checkpoint(launcher: &[&str], own_sessions: bool) {
    let scene = Scene::new();
    let record = scene.path("ranks.jsonl");
    let config = scene.path("fast.toml");
    // One fall and its rescue; climbing back up after it is tests/overnight.rs's.
    std::fs::write(
        &config,
        "backoff = { initial = 0.05, max = 0.2 }\nclimb_back = \"off\"\n",
    )
    .unwrap();
    let rank = fixture("rank.py");
    let out = Command::new(BIN)
        .current_dir(scene.dir.path())
        .args(["run", "--no-kernel-log", "--no-health", "--grace", "2"])
        .arg("--config")
        .arg(&config)
        .arg("--run-dir")
        .arg(scene.run_dir())
        .arg("--checkpoints")
        .arg(scene.ckpt())
        .arg("--")
        .args(launcher)
        .arg(&rank)
        .args(["--device", "{device}", "--resume", "{checkpoint}"])
        .arg("--ckpt-dir")
        .arg(scene.ckpt())
        .arg("--record")
        .arg(&record)
        .args(["--steps", "5", "--fault-at", "3", "--sleep", "0.3"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stderr.contains("[rank1]: torch.AcceleratorError: CUDA error: an illegal memory access"),
        "{stderr}"
    );

    // The command as typed, ready to be copied back into a shell.
    let supervising = format!(
        "gpuwarden: supervising: {} {rank} --device {{device}}",
        launcher.join(" ")
    );
    assert!(stderr.contains(&supervising), "{stderr}");

    let starts = read_jsonl(&record);
    assert_eq!(starts.len(), 4, "two ranks, two attempts: {starts:?}");
    let (first, second) = starts.split_at(2);
    for s in first {
        assert_eq!(s["attempt"], 1, "{s}");
        assert_eq!(s["device"], "cuda", "{s}");
        assert!(s["resume"].is_null(), "{s}");
        if own_sessions {
            // As under torchrun: each rank leads a session of its own.
            assert_eq!(s["sid"], s["pid"], "{s}");
        }
    }
    let resumed = second[0]["resume"].as_str().unwrap().to_string();
    assert!(resumed.contains("ckpt-step0000"), "{resumed}");
    for s in second {
        assert_eq!(s["attempt"], 2, "{s}");
        assert_eq!(s["device"], "cpu", "{s}");
        assert_eq!(
            s["resume"],
            resumed.as_str(),
            "every rank resumes from the same file"
        );
        // No rank of attempt 1 was alive when attempt 2's ranks started.
        assert_eq!(s["earlier_alive"], serde_json::json!([]), "{s}");
    }
    let mut ranks: Vec<u64> = second.iter().map(|s| s["rank"].as_u64().unwrap()).collect();
    ranks.sort();
    assert_eq!(ranks, [0, 1]);
    assert!(stdout.contains("rank 0 done on cpu"), "{stdout}");
    assert!(stdout.contains("rank 1 done on cpu"), "{stdout}");
    for s in &starts {
        assert!(!alive(s["pid"].as_u64().unwrap()), "rank left behind: {s}");
    }

    let journal = scene.journal();
    let acted: Vec<_> = journal.iter().filter(|r| r["event"] == "fault").collect();
    assert_eq!(acted.len(), 1, "one fault, acted on once: {journal:?}");
    assert_eq!(acted[0]["class"], "gpu_memory_fault");
    assert_eq!(acted[0]["attempt"], 1);
    let restart = journal
        .iter()
        .find(|r| r["event"] == "restart_scheduled")
        .unwrap();
    assert_eq!(restart["tier"], "cpu");
    let started: Vec<_> = journal
        .iter()
        .filter(|r| r["event"] == "attempt_started")
        .collect();
    assert_eq!(started[1]["checkpoint"], resumed.as_str());
}

#[test]
fn a_fault_in_one_rank_of_a_torchrun_stand_in_restarts_every_rank_from_the_checkpoint() {
    let launcher = fixture("torchrun.py");
    rank_fault_restarts_every_rank_from_the_checkpoint(
        &["python3", &launcher, "--nproc-per-node", "2"],
        true,
    );
}

/// The same under the real torchrun, where PyTorch is installed (not in CI: see the top).
#[test]
fn a_fault_in_one_rank_under_real_torchrun_restarts_every_rank_from_the_checkpoint() {
    let has_torch = Command::new("python3")
        .args(["-c", "import torch.distributed.run"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_torch {
        eprintln!("SKIPPED (optional): PyTorch is not installed; the stand-in test ran instead");
        return;
    }
    rank_fault_restarts_every_rank_from_the_checkpoint(
        &[
            "python3",
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
        ],
        true,
    );
}
