//! Signals from a batch system, end to end: the real binary, the fake trainer, real signals.
//!
//! Slurm's `--signal=USR1@90` (and Lightning's and submitit's auto-requeue) send SIGUSR1 to ask
//! the job to checkpoint before preemption. gpuwarden must pass it on and keep supervising;
//! before issue 12 it died of it (status 138) and took the job along.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// Starts gpuwarden over a trainer that notes SIGUSR1 and runs `steps` steps of 0.1 s; returns
/// once the job has started (its start record is written after its handler is installed).
fn start(scene: &Scene, steps: &str) -> Child {
    let child = scene
        .command(
            &["--grace", "2", "--no-kernel-log", "--no-health"],
            &["--note-usr1", "--sleep", "0.1", "--steps", steps],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while scene.starts().is_empty() {
        assert!(Instant::now() < deadline, "the job never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn finish(mut child: Child) -> (Option<i32>, String) {
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status.code(), stderr)
}

fn usr1_notes(scene: &Scene) -> usize {
    scene
        .records()
        .iter()
        .filter(|r| r["signal"] == Signal::SIGUSR1 as i32)
        .count()
}

#[test]
fn sigusr1_reaches_the_job_and_the_run_goes_on_to_exit_0() {
    let scene = Scene::new();
    let child = start(&scene, "20");
    let pid = child.id();
    send(pid, Signal::SIGUSR1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while usr1_notes(&scene) == 0 {
        assert!(Instant::now() < deadline, "SIGUSR1 never reached the job");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A terminal's signals are passed on too, and end nothing (Python ignores both).
    send(pid, Signal::SIGWINCH);
    send(pid, Signal::SIGCONT);
    send(pid, Signal::SIGUSR1);
    let (code, stderr) = finish(child);
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    assert!(usr1_notes(&scene) >= 1);
    assert_eq!(scene.starts().len(), 1, "no restart: {stderr}");
    let journal = scene.journal();
    let forwarded: Vec<_> = journal
        .iter()
        .filter(|r| r["event"] == "signal_forwarded")
        .collect();
    assert_eq!(forwarded.len(), 2, "{journal:?}");
    assert_eq!(forwarded[0]["signal"], "SIGUSR1");
    assert_eq!(forwarded[0]["attempt"], 1);
    let last = journal.last().unwrap();
    assert_eq!(last["event"], "run_finished");
    assert_eq!(last["exit_code"], 0);
    assert!(stderr.contains("SIGUSR1 received: forwarded"), "{stderr}");
}

/// What a Slurm preemption looks like: SIGUSR1 (checkpoint now), later SIGTERM. gpuwarden
/// ends with 143, the code a requeue script tests for (`exit::PREEMPTED`).
#[test]
fn preemption_usr1_then_sigterm_ends_with_143() {
    let scene = Scene::new();
    let child = start(&scene, "1000");
    let pid = child.id();
    send(pid, Signal::SIGUSR1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while usr1_notes(&scene) == 0 {
        assert!(Instant::now() < deadline, "SIGUSR1 never reached the job");
        std::thread::sleep(Duration::from_millis(20));
    }
    send(pid, Signal::SIGTERM);
    let (code, stderr) = finish(child);
    assert_eq!(code, Some(gpuwarden::exit::PREEMPTED), "stderr:\n{stderr}");
    assert_eq!(code, Some(143));
    assert_eq!(scene.starts().len(), 1);
    assert_eq!(scene.journal().last().unwrap()["outcome"], "interrupted");
}
