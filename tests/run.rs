//! `gpuwarden run` end to end: the real binary supervising the fake trainer
//! (`tests/fixtures/trainer.py`), with real process groups, signals and checkpoints.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

fn assert_falls_back_and_resumes(fault: &str) {
    let scene = Scene::new();
    let config = scene.fast_config("");
    let out = scene.run(
        &["--config", &config],
        &[
            "--device",
            "{device}",
            "--resume",
            "{checkpoint}",
            "--steps",
            "8",
            "--fault-at",
            "5",
            "--fault",
            fault,
        ],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");

    let starts = scene.starts();
    assert_eq!(starts.len(), 2, "two attempts: {starts:?}");
    // Attempt 1: on the GPU tier, nothing to resume from, so `--resume {checkpoint}` vanished.
    assert_eq!(arg_after(&starts[0], "--device"), Some("cuda"));
    assert_eq!(arg_after(&starts[0], "--resume"), None);
    assert_eq!(starts[0]["env"]["GPUWARDEN_TIER"], "gpu");
    assert!(starts[0]["env"]["GPUWARDEN_CHECKPOINT"].is_null());
    // Attempt 2: CPU, every GPU hidden, resumed from step 4 (the fault hit step 5).
    assert_eq!(arg_after(&starts[1], "--device"), Some("cpu"));
    let resumed = scene.ckpt().join("ckpt-step00004.safetensors");
    assert_eq!(
        arg_after(&starts[1], "--resume"),
        Some(resumed.to_str().unwrap())
    );
    assert_eq!(starts[1]["env"]["CUDA_VISIBLE_DEVICES"], "-1");
    assert_eq!(starts[1]["env"]["HIP_VISIBLE_DEVICES"], "-1");
    assert_eq!(starts[1]["env"]["ROCR_VISIBLE_DEVICES"], "-1");
    assert_eq!(starts[1]["env"]["GPUWARDEN_ATTEMPT"], "2");
    assert_eq!(
        starts[1]["env"]["GPUWARDEN_CHECKPOINT"],
        resumed.to_str().unwrap()
    );
    assert_eq!(starts[1]["env"]["PYTHONUNBUFFERED"], "1");
    // The job resumed at step 5 and finished.
    let stdout = text(&out.stdout);
    assert!(stdout.contains("step=4"), "stdout:\n{stdout}");
    assert!(stdout.contains("step 8/8"), "stdout:\n{stdout}");

    let journal = scene.journal();
    assert_eq!(
        events(&journal),
        [
            "run_started",
            "attempt_started",
            "fault",
            "attempt_ended",
            "restart_scheduled",
            "attempt_started",
            "attempt_ended",
            "run_finished"
        ]
    );
    let fault_rec = &journal[2];
    assert_eq!(fault_rec["stream"], "stderr");
    assert_eq!(journal[5]["checkpoint"], resumed.to_str().unwrap());
    assert_eq!(journal[7]["outcome"], "succeeded");
    assert_eq!(journal[7]["attempts"], 2);
    // The summary names both attempts, the fault and the checkpoint.
    assert!(stderr.contains("after 2 attempts"), "stderr:\n{stderr}");
    assert!(stderr.contains("ckpt-step00004.safetensors"));
}

#[test]
fn hsa_memory_fault_falls_back_to_cpu_and_resumes() {
    assert_falls_back_and_resumes("hsa");
}

#[test]
fn hip_invalid_device_function_falls_back_to_cpu_and_resumes() {
    assert_falls_back_and_resumes("hip");
}

#[test]
fn fault_classes_reach_the_journal() {
    let scene = Scene::new();
    let config = scene.fast_config("");
    let out = scene.run(
        &["--config", &config],
        &["--device", "{device}", "--fault-at", "1", "--fault", "hsa"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let fault = scene
        .journal()
        .into_iter()
        .find(|r| r["event"] == "fault")
        .unwrap();
    assert_eq!(fault["class"], "gpu_memory_fault");
    assert_eq!(fault["captures"]["node"], "1");
    let ended = scene
        .journal()
        .into_iter()
        .find(|r| r["event"] == "attempt_ended")
        .unwrap();
    // The trainer aborts right after printing the fault, and gpuwarden's SIGTERM (sent within
    // a millisecond of the line) races with it: either signal may be the one that ended it.
    let signal = ended["status"]["name"].as_str().unwrap_or_default();
    assert!(
        ["SIGABRT", "SIGTERM"].contains(&signal),
        "the job ended by a signal: {ended}"
    );
}

#[test]
fn clean_exit_is_exit_zero_without_restart() {
    let scene = Scene::new();
    let out = scene.run(&[], &["--device", "{device}", "--steps", "3"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(scene.starts().len(), 1);
    // stdout carries only the job's stdout: gpuwarden's own words go to stderr.
    let stdout = text(&out.stdout);
    assert!(!stdout.contains("gpuwarden"), "stdout:\n{stdout}");
    assert!(stdout.contains("step 3/3"));
    // ...and the job's output is logged beside the journal, byte for byte.
    let log = std::fs::read(scene.run_dir().join("attempt-1.stdout.log")).unwrap();
    assert_eq!(log, out.stdout);
    let journal = scene.journal();
    assert_eq!(
        events(&journal),
        [
            "run_started",
            "attempt_started",
            "attempt_ended",
            "run_finished"
        ]
    );
    assert_eq!(journal[2]["status"]["code"], 0);
}

#[test]
fn torn_newest_checkpoint_is_skipped() {
    let scene = Scene::new();
    let config = scene.fast_config("");
    let shared = shared_checkpoints().join("torch_save");
    for name in [
        "ckpt-step00015.pt",
        "torn-step00017.pt",
        "torn-tail-step00018.pt",
    ] {
        std::fs::copy(shared.join(name), scene.ckpt().join(name)).unwrap();
    }
    let out = scene.run(
        &["--config", &config],
        &[
            "--device",
            "{device}",
            "--resume",
            "{checkpoint}",
            "--fault-at",
            "1",
            "--steps",
            "3",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let starts = scene.starts();
    // The first attempt already resumes from the newest complete checkpoint.
    let good = scene.ckpt().join("ckpt-step00015.pt");
    assert_eq!(
        arg_after(&starts[0], "--resume"),
        Some(good.to_str().unwrap())
    );
    let skipped: Vec<_> = scene
        .journal()
        .into_iter()
        .filter(|r| r["event"] == "checkpoint_skipped")
        .map(|r| r["path"].as_str().unwrap().to_string())
        .collect();
    assert!(skipped.iter().any(|p| p.ends_with("torn-step00017.pt")));
    assert!(
        skipped
            .iter()
            .any(|p| p.ends_with("torn-tail-step00018.pt"))
    );
    assert!(text(&out.stderr).contains("skipping checkpoint"));
}

#[test]
fn crash_loop_stops_at_the_budget_with_exit_3() {
    let scene = Scene::new();
    let config = scene.fast_config("");
    let out = scene.run(
        &["--config", &config, "--max-restarts", "2"],
        &["--device", "{device}", "--steps", "1", "--exit-code", "1"],
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    // Unrecognised crashes restart on the same tier.
    let starts = scene.starts();
    assert_eq!(starts.len(), 3);
    assert!(
        starts
            .iter()
            .all(|s| arg_after(s, "--device") == Some("cuda"))
    );
    let last = scene.journal().pop().unwrap();
    assert_eq!(last["outcome"], "budget_spent");
    assert_eq!(last["exit_code"], 3);
}

/// Starts gpuwarden over a job that ignores SIGTERM and SIGINT (noting each in its record),
/// and returns once the job runs.
fn start_stubborn_job(scene: &Scene, grace: &str) -> std::process::Child {
    let child = scene
        .command(
            &["--grace", grace],
            &[
                "--device",
                "{device}",
                "--ignore-term",
                "--sleep",
                "0.05",
                "--steps",
                "1000",
            ],
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

#[test]
fn sigterm_to_gpuwarden_is_forwarded_then_sigkill_after_grace_and_no_restart() {
    let scene = Scene::new();
    let mut child = start_stubborn_job(&scene, "1");
    let sent = Instant::now();
    send(child.id(), Signal::SIGTERM);
    let status = child.wait().unwrap();
    let took = sent.elapsed();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(143), "stderr:\n{stderr}");
    // The job saw the SIGTERM (it ignores it), then was killed after the 1 s grace.
    let records = scene.records();
    assert!(records.iter().any(|r| r["signal"] == 15), "{records:?}");
    assert!(
        took >= Duration::from_millis(900),
        "killed too early: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(scene.starts().len(), 1, "no restart after a user signal");
    let journal = scene.journal();
    let ended = journal
        .iter()
        .find(|r| r["event"] == "attempt_ended")
        .unwrap();
    assert_eq!(ended["status"]["signal"], 9);
    assert_eq!(journal.last().unwrap()["outcome"], "interrupted");
}

#[test]
fn killing_gpuwarden_takes_the_job_and_its_grandchildren_along() {
    let scene = Scene::new();
    let pids_file = scene.path("pids");
    let mut child = scene
        .command(
            &[],
            &[
                "--device",
                "{device}",
                "--sleep",
                "0.05",
                "--steps",
                "100000",
                "--grandchild",
                pids_file.to_str().unwrap(),
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let pids: Vec<i32> = loop {
        if let Ok(s) = std::fs::read_to_string(&pids_file)
            && s.ends_with('\n')
        {
            break s.split_whitespace().map(|p| p.parse().unwrap()).collect();
        }
        assert!(Instant::now() < deadline, "the job never started");
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap(); // SIGKILL: gpuwarden gets no chance to clean up itself.
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9));
    let killed = Instant::now();
    while !pids.iter().all(|&p| dead(p)) {
        assert!(
            killed.elapsed() < Duration::from_secs(2),
            "job {} or grandchild {} still alive 2 s after gpuwarden was killed",
            pids[0],
            pids[1]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn checkpoint_path_with_spaces_and_semicolon_is_one_argument() {
    let scene = Scene::new();
    let ckpt = scene.ckpt();
    let odd = ckpt.join("run 1; rm -rf ~");
    std::fs::create_dir(&odd).unwrap();
    std::fs::copy(
        shared_checkpoints().join("safetensors/model.safetensors"),
        odd.join("model-step00015.safetensors"),
    )
    .unwrap();
    let glob = format!(
        "{}/*.safetensors",
        odd.to_str().unwrap().replace('[', "[[]")
    );
    let out = Command::new(BIN)
        .current_dir(scene.dir.path())
        .args(["run", "--run-dir"])
        .arg(scene.run_dir())
        .args(["--checkpoints", &glob, "--"])
        .arg("python3")
        .arg(trainer())
        .arg("--record")
        .arg(scene.path("record.jsonl"))
        .args(["--resume", "{checkpoint}", "--steps", "15"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let starts = scene.starts();
    let want = odd.join("model-step00015.safetensors");
    assert_eq!(
        arg_after(&starts[0], "--resume"),
        Some(want.to_str().unwrap())
    );
}

/// Runs `python3 -c script` under gpuwarden (run directory `run_dir`) while watching
/// gpuwarden's peak memory; returns its exit code, stdout, stderr and peak RSS in KiB.
fn run_watching_memory(
    scene: &Scene,
    run_dir: &std::path::Path,
    script: &str,
) -> (Option<i32>, Vec<u8>, Vec<u8>, u64) {
    let mut child = Command::new(BIN)
        .current_dir(scene.dir.path())
        .args(["run", "--no-kernel-log", "--run-dir"])
        .arg(run_dir)
        .args(["--", "python3", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        stderr.read_to_end(&mut v).unwrap();
        v
    });
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let peak2 = peak.clone();
    let sampler = std::thread::spawn(move || {
        while let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(kb) = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
            {
                peak2.fetch_max(kb, std::sync::atomic::Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let mut out = Vec::new();
    stdout.read_to_end(&mut out).unwrap();
    let status = child.wait().unwrap();
    let err = err_reader.join().unwrap();
    sampler.join().unwrap();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    (status.code(), out, err, peak)
}

#[test]
fn non_utf8_and_a_10_mb_line_pass_through_byte_identical() {
    let scene = Scene::new();
    // 10 MB without a newline, then invalid UTF-8 (a NUL, broken sequences, a lone CR), on
    // both streams.
    let script = r#"
import sys, os
big = b"x" * (10 * 1024 * 1024)
tail = b"\xff\xfe\x00 caf\xc3\xa9 \xe2\x82\n\r\n"
for fd in (1, 2):
    os.write(fd, big)
    os.write(fd, tail)
"#;
    // What gpuwarden takes anyway (the compiled catalog, buffers), with a short line.
    let baseline_dir = scene.dir.path().join("baseline-run");
    let (code, _, _, baseline_kb) =
        run_watching_memory(&scene, &baseline_dir, "print('short line')");
    assert_eq!(code, Some(0));
    let (code, out, err, peak_kb) = run_watching_memory(&scene, &scene.run_dir(), script);
    assert_eq!(code, Some(0), "{}", text(&err));
    let mut want = vec![b'x'; 10 * 1024 * 1024];
    want.extend_from_slice(b"\xff\xfe\x00 caf\xc3\xa9 \xe2\x82\n\r\n");
    assert!(
        out == want,
        "stdout differs ({} vs {} bytes)",
        out.len(),
        want.len()
    );
    // stderr carries gpuwarden's messages too; the job's bytes must be in it unchanged.
    assert!(err.windows(want.len()).any(|w| w == want.as_slice()));
    assert_eq!(
        std::fs::read(scene.run_dir().join("attempt-1.stdout.log")).unwrap(),
        want
    );
    assert_eq!(
        std::fs::read(scene.run_dir().join("attempt-1.stderr.log")).unwrap(),
        want
    );
    // Holding the line would take 10 MB more (twice: two streams).
    assert!(
        peak_kb < baseline_kb + 6 * 1024,
        "gpuwarden's peak RSS {peak_kb} KiB against {baseline_kb} KiB for a short line: a 10 MB line must not be held in memory"
    );
}

#[test]
fn broken_rule_file_is_exit_2_with_file_and_line_and_the_job_never_starts() {
    let scene = Scene::new();
    let rules = scene.path("my-rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(
        rules.join("bad.toml"),
        "# a rule with a broken regex\n[[rule]]\nid = \"broken\"\nclass = \"gpu_hang\"\nstreams = [\"stderr\"]\nregex = \"ring (gfx timeout\"\nseverity = \"error\"\nadvice = \"x\"\nexamples = [\"ring gfx timeout\"]\n",
    )
    .unwrap();
    let marker = scene.path("started");
    let out = scene.run(
        &["--rules", rules.to_str().unwrap()],
        &["--marker", marker.to_str().unwrap()],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(stderr.contains("bad.toml:"), "stderr:\n{stderr}");
    assert!(stderr.contains("broken"), "stderr:\n{stderr}");
    assert!(!marker.exists(), "the job must not start");
    assert!(
        !scene.run_dir().exists(),
        "nothing was started, nothing recorded"
    );
}

#[test]
fn missing_command_is_a_clear_usage_error() {
    let scene = Scene::new();
    let out = Command::new(BIN)
        .current_dir(scene.dir.path())
        .args(["run", "--", "no-such-trainer-xyz", "--epochs", "3"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(stderr.contains("no-such-trainer-xyz"), "stderr:\n{stderr}");
    assert!(stderr.contains("not found"), "stderr:\n{stderr}");

    let out = Command::new(BIN).args(["run"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn rules_check_passes_on_the_builtin_rules() {
    let out = Command::new(BIN).args(["rules", "check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains("rules and context entries in 9 files: every example matches"),
        "{said}"
    );
}

#[test]
fn help_shows_an_example_and_the_exit_codes() {
    let out = Command::new(BIN).args(["run", "--help"]).output().unwrap();
    let help = text(&out.stdout);
    assert!(help.contains("--resume {checkpoint}"), "{help}");
    assert!(help.contains("EXIT CODES"), "{help}");
    assert!(help.contains("128+N"), "{help}");
}

#[test]
fn second_ctrl_c_kills_the_job_at_once() {
    let scene = Scene::new();
    let mut child = start_stubborn_job(&scene, "30");
    let sent = Instant::now();
    send(child.id(), Signal::SIGINT);
    // The job ignores the first one (it records it); the second escalates to SIGKILL.
    while !scene.records().iter().any(|r| r["signal"] == 2) {
        assert!(
            sent.elapsed() < Duration::from_secs(5),
            "SIGINT was not forwarded"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    send(child.id(), Signal::SIGINT);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "the 30 s grace was not cut short"
    );
    assert_eq!(scene.starts().len(), 1);
}

#[test]
fn resumes_from_a_hugging_face_checkpoint_directory() {
    // Real HF Trainer output: checkpoint-9 lacks trainer_state.json (an interrupted save).
    let scene = Scene::new();
    let config = scene.fast_config("");
    for n in [3, 6, 9] {
        let from = shared_checkpoints().join(format!("hf/checkpoint-{n}"));
        let to = scene.ckpt().join(format!("checkpoint-{n}"));
        std::fs::create_dir(&to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
    let out = scene.run(
        &["--config", &config],
        &[
            "--device",
            "{device}",
            "--resume={checkpoint}",
            "--steps",
            "1",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let argv = scene.starts()[0]["argv"].clone();
    let want = format!(
        "--resume={}",
        scene.ckpt().join("checkpoint-6").to_str().unwrap()
    );
    assert!(
        argv.as_array().unwrap().iter().any(|a| a == want.as_str()),
        "{argv:?}"
    );
    let skipped = scene
        .journal()
        .into_iter()
        .find(|r| r["event"] == "checkpoint_skipped")
        .unwrap();
    assert!(skipped["path"].as_str().unwrap().ends_with("checkpoint-9"));
}

#[test]
fn workers_that_ignore_sigterm_are_killed_before_the_next_attempt() {
    // The job reports the fault and keeps running; its worker ignores SIGTERM. Nothing of
    // attempt 1 may still hold the GPU when attempt 2 starts, and the worker that attempt 2
    // leaves behind after a clean exit is stopped too.
    let scene = Scene::new();
    let config = scene.fast_config("");
    let out = scene.run(
        &["--config", &config, "--grace", "1"],
        &[
            "--device",
            "{device}",
            "--fault-at",
            "2",
            "--fault",
            "cuda-continue",
            "--worker",
            "--sleep",
            "0.05",
            "--steps",
            "10",
        ],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");
    let records = scene.records();
    let workers: Vec<i64> = records
        .iter()
        .filter_map(|r| r["worker"].as_i64())
        .collect();
    assert_eq!(workers.len(), 2, "{records:?}");
    for w in &workers {
        assert!(dead(*w as i32), "worker {w} survived the run");
    }
    let journal = scene.journal();
    let at = |i: usize| journal[i]["at"].as_str().unwrap().to_string();
    let fault = journal.iter().position(|r| r["event"] == "fault").unwrap();
    let second = journal
        .iter()
        .rposition(|r| r["event"] == "attempt_started")
        .unwrap();
    // RFC 3339 UTC strings of one length compare like the times they name: attempt 2 began
    // after the 1 s grace had run out and SIGKILL took the worker.
    let fault_secs: f64 = at(fault)[17..26].parse().unwrap();
    let second_secs: f64 = at(second)[17..26].parse().unwrap();
    let gap = (second_secs - fault_secs).rem_euclid(60.0);
    assert!(gap >= 0.9, "attempt 2 started {gap:.3} s after the fault");
    assert!(stderr.contains("SIGKILL"), "{stderr}");
    assert!(
        journal
            .iter()
            .any(|r| r["event"] == "leftovers" && r["attempt"] == 2),
        "the clean exit of attempt 2 left its worker: {journal:?}"
    );
}

#[test]
fn a_job_stopped_by_the_terminal_is_reported_and_can_still_be_stopped() {
    // In a real terminal (a pty from `script`), a job that reads the terminal from the
    // background is stopped by SIGTTIN. gpuwarden says so, and SIGTERM still ends it at once
    // (SIGCONT follows the forwarded signal) instead of after the 30 s grace.
    let scene = Scene::new();
    let run_dir = scene.run_dir();
    let inner = format!(
        "{BIN} run --grace 30 --run-dir {} -- bash -c 'read answer'",
        run_dir.display()
    );
    let mut script = match Command::new("script")
        .args(["-qfc", &inner, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            eprintln!("skipped: `script` (util-linux) is not available: {e}");
            return;
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let (warning, pid) = loop {
        let journal = scene.journal();
        if let Some(w) = journal.iter().find(|r| r["event"] == "warning") {
            break (
                w["message"].as_str().unwrap().to_string(),
                journal[0]["gpuwarden_pid"].as_i64().unwrap(),
            );
        }
        assert!(Instant::now() < deadline, "no warning: {journal:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(warning.contains("SIGTTIN"), "{warning}");
    let sent = Instant::now();
    send(pid, Signal::SIGTERM);
    while scene.journal().last().unwrap()["event"] != "run_finished" {
        assert!(
            sent.elapsed() < Duration::from_secs(5),
            "the stopped job was not ended by SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(scene.journal().last().unwrap()["exit_code"], 143);
    let _ = script.kill();
    let _ = script.wait();
}

#[test]
fn a_fault_behind_output_a_slow_reader_has_not_taken_yet_is_still_seen() {
    // 300 KB of output, then the fault on stdout, then exit 1; gpuwarden's own stdout is read
    // slowly. The attempt must not end before the fault line is read and classified.
    let scene = Scene::new();
    let config = scene.fast_config("");
    let script = r#"
import sys
sys.stdout.write(("x" * 99 + "\n") * 3000)
sys.stdout.write("RuntimeError: HIP error: invalid device function\n")
sys.stdout.flush()
sys.exit(1)
"#;
    let mut child = Command::new(BIN)
        .current_dir(scene.dir.path())
        .args([
            "run",
            "--max-restarts",
            "0",
            "--config",
            &config,
            "--run-dir",
        ])
        .arg(scene.run_dir())
        .args(["--", "python3", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut got = 0;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        std::thread::sleep(Duration::from_millis(150));
        match stdout.read(&mut buf).unwrap() {
            0 => break,
            n => got += n,
        }
    }
    child.wait().unwrap();
    assert_eq!(got, 300_000 + 49, "every byte reached the reader");
    let journal = scene.journal();
    let fault = journal.iter().find(|r| r["event"] == "fault");
    assert!(fault.is_some(), "the fault was missed: {journal:?}");
    assert_eq!(fault.unwrap()["class"], "gpu_unsupported_kernel");
}

#[test]
fn under_nohup_a_hangup_does_not_stop_the_run() {
    let scene = Scene::new();
    let mut child = Command::new("nohup")
        .current_dir(scene.dir.path())
        .arg(BIN)
        .args(["run", "--run-dir"])
        .arg(scene.run_dir())
        .args(["--", "python3"])
        .arg(trainer())
        .arg("--record")
        .arg(scene.path("record.jsonl"))
        .args(["--sleep", "0.05", "--steps", "20"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while scene.starts().is_empty() {
        assert!(Instant::now() < deadline, "the job never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    send(child.id(), Signal::SIGHUP);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{:?}", scene.journal());
    assert_eq!(scene.starts().len(), 1);
}

#[test]
fn a_signal_during_the_env_script_ends_the_run_before_the_job_starts() {
    let scene = Scene::new();
    let script = scene.path("slow-sdk.sh");
    let sourcing = scene.path("sourcing");
    std::fs::write(
        &script,
        format!(
            "touch '{}'\nsleep 2\nexport ROCM_PATH=/opt/rocm_sdk_612\n",
            sourcing.display()
        ),
    )
    .unwrap();
    let config = scene.path("gpuwarden.toml");
    std::fs::write(
        &config,
        format!(
            "ladder = [\"gpu-sdk\", \"cpu\"]\n[[tier]]\nname = \"gpu-sdk\"\ndevice = \"cuda\"\nenv_script = \"{}\"\n",
            script.display()
        ),
    )
    .unwrap();
    let marker = scene.path("started");
    let mut child = scene
        .command(
            &["--config", config.to_str().unwrap()],
            &["--marker", marker.to_str().unwrap()],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Evidence, not a guess: the script is being sourced now.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sourcing.exists() {
        assert!(Instant::now() < deadline, "the env_script never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    send(child.id(), Signal::SIGINT);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(!marker.exists(), "the job started after the user's Ctrl-C");
    assert_eq!(scene.journal().last().unwrap()["outcome"], "interrupted");
}

#[test]
fn a_worker_adopted_after_its_parent_left_the_group_is_reaped() {
    // The leader forks A, A forks B and leaves the group, A exits, the leader exits. B (still
    // in the job's group) is adopted by gpuwarden; when it exits, the group is empty at once.
    let scene = Scene::new();
    let script = r#"
import os, time
if os.fork() == 0:
    if os.fork() == 0:
        time.sleep(0.5)
        os._exit(0)
    os.setpgid(0, 0)
    os._exit(0)
time.sleep(0.1)
"#;
    let started = Instant::now();
    let out = Command::new(BIN)
        .current_dir(scene.dir.path())
        .args(["run", "--grace", "1", "--run-dir"])
        .arg(scene.run_dir())
        .args(["--", "python3", "-c", script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("survived SIGKILL"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}: {stderr}",
        started.elapsed()
    );
}
