//! Unattended overnight runs (issue 11), end to end with the real binary and the fake trainer:
//! a hung job is caught by the stall timeout and resumed from its checkpoint, and `report`
//! tells the night from the journal.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;

fn fast_config(scene: &Scene) -> String {
    let path = scene.path("fast.toml");
    std::fs::write(&path, "backoff = { initial = 0.05, max = 0.2 }\n").unwrap();
    path.to_string_lossy().into_owned()
}

fn report_json(scene: &Scene) -> serde_json::Value {
    let out = Command::new(BIN)
        .arg("report")
        .arg(scene.run_dir())
        .arg("--json")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_hung_job_is_caught_by_the_stall_timeout_and_resumed_from_its_checkpoint() {
    let scene = Scene::new();
    let config = fast_config(&scene);
    let out = scene.run(
        &["--config", &config, "--stall-timeout", "2s", "--grace", "2"],
        &[
            "--device",
            "{device}",
            "--resume",
            "{checkpoint}",
            "--steps",
            "8",
            "--sleep",
            "0.05",
            "--hang-at",
            "5",
            "--hang-once",
        ],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");

    // Attempt 1 hung after step 4; attempt 2, on the same GPU tier (a first hang restarts),
    // resumed from step 4 and finished.
    let starts = scene.starts();
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert_eq!(arg_after(&starts[1], "--device"), Some("cuda"));
    let resumed = scene.ckpt().join("ckpt-step00004.safetensors");
    assert_eq!(
        arg_after(&starts[1], "--resume"),
        Some(resumed.to_str().unwrap())
    );
    let journal = scene.full_journal();
    let fault = journal.iter().find(|r| r["event"] == "fault").unwrap();
    assert_eq!(fault["class"], "gpu_hang");
    assert_eq!(fault["rule"], "stall-timeout");
    assert_eq!(fault["stream"], "progress");
    assert!(journal.iter().any(|r| r["event"] == "stacks_captured"));
    assert!(
        journal
            .iter()
            .any(|r| r["event"] == "checkpoint_saved" && r["attempt"] == 1)
    );
    assert_eq!(journal.last().unwrap()["outcome"], "succeeded");

    // From the job's last output to the SIGTERM it got, on the trainer's own clock.
    let records = scene.records();
    let last = records
        .iter()
        .find_map(|r| r["last_output"].as_f64())
        .unwrap();
    let term = records
        .iter()
        .find(|r| r["hang_signal"] == 15)
        .and_then(|r| r["at"].as_f64())
        .unwrap();
    let gap = term - last;
    eprintln!("stall: last output -> SIGTERM {gap:.3} s (stall timeout 2 s)");
    assert!(
        (2.0..3.0).contains(&gap),
        "last output -> SIGTERM {gap:.3} s"
    );
}

#[test]
fn report_json_agrees_with_the_journal() {
    let scene = Scene::new();
    let config = fast_config(&scene);
    let out = scene.run(
        &["--config", &config],
        &[
            "--device",
            "{device}",
            "--resume",
            "{checkpoint}",
            "--steps",
            "8",
            "--sleep",
            "0.3",
            "--fault-at",
            "5",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // A torn last line and an event from a newer gpuwarden must not stop the report.
    let path = scene.run_dir().join("journal.jsonl");
    let mut journal_text = std::fs::read_to_string(&path).unwrap();
    journal_text.push_str(
        "{\"at\":\"2026-12-05T01:00:00.000000Z\",\"event\":\"from_the_future\"}\n{\"at\":\"20",
    );
    std::fs::write(&path, &journal_text).unwrap();

    let journal: Vec<serde_json::Value> = journal_text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let report = report_json(&scene);
    let started: Vec<&serde_json::Value> = journal
        .iter()
        .filter(|r| r["event"] == "attempt_started")
        .collect();
    let ended: Vec<&serde_json::Value> = journal
        .iter()
        .filter(|r| r["event"] == "attempt_ended")
        .collect();
    let attempts = report["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), started.len());
    // The GPU faults at step 5, the CPU resumes from step 4, and at its first new checkpoint
    // the run climbs back to the GPU, past the fault's step (issue 11's climb back).
    assert_eq!(attempts.len(), 3);
    let climb = journal.iter().find(|r| r["event"] == "climb_back").unwrap();
    assert_eq!(attempts[1]["climbed_to"], climb["to"]);
    assert_eq!(climb["attempt"], attempts[1]["attempt"]);
    for ((a, s), e) in attempts.iter().zip(&started).zip(&ended) {
        assert_eq!(a["attempt"], s["attempt"]);
        assert_eq!(a["tier"], s["tier"]);
        assert_eq!(a["device"], s["device"]);
        assert_eq!(a["checkpoint"], s["checkpoint"]);
        assert_eq!(a["seconds"], e["seconds"]);
        assert_eq!(a["ended_by"], e["ended_by"]);
    }
    let fault = journal.iter().find(|r| r["event"] == "fault").unwrap();
    assert_eq!(attempts[0]["fault"]["line"], fault["line"]);
    assert_eq!(attempts[0]["fault"]["class"], "gpu_memory_fault");
    let finished = journal
        .iter()
        .find(|r| r["event"] == "run_finished")
        .unwrap();
    assert_eq!(report["outcome"], finished["outcome"]);
    assert_eq!(report["exit_code"], finished["exit_code"]);
    let saved = journal
        .iter()
        .filter(|r| r["event"] == "checkpoint_saved")
        .count();
    assert!(saved >= 1, "the checkpoints were seen: {saved}");
    assert_eq!(
        report["checkpoints_written"].as_array().unwrap().len(),
        saved
    );
    let tier_seconds: f64 = report["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["seconds"].as_f64().unwrap())
        .sum();
    let attempt_seconds: f64 = ended.iter().map(|e| e["seconds"].as_f64().unwrap()).sum();
    assert!((tier_seconds - attempt_seconds).abs() < 1e-9);
    let ratio = report["goodput"]["ratio"].as_f64().unwrap();
    assert!(ratio > 0.0 && ratio <= 1.0, "{ratio}");
    // The two bad lines are reported as skipped, with their line numbers.
    let skipped = report["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert_eq!(skipped[1]["line"], journal_text.lines().count());

    // The text form: one screen.
    let out = Command::new(BIN)
        .arg("report")
        .arg(scene.run_dir())
        .output()
        .unwrap();
    let shown = text(&out.stdout);
    assert!(shown.contains("goodput:"), "{shown}");
    assert!(shown.contains("Memory access fault"), "{shown}");
    assert!(shown.contains("skipped 2 of"), "{shown}");
}

#[test]
fn resume_continues_the_same_journal_after_gpuwarden_is_killed() {
    use std::time::{Duration, Instant};
    let scene = Scene::new();
    let config = fast_config(&scene);
    let mut child = scene
        .command(
            &["--config", &config],
            &[
                "--device",
                "{device}",
                "--resume",
                "{checkpoint}",
                "--steps",
                "14",
                "--sleep",
                "0.2",
            ],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait for a checkpoint gpuwarden has journaled, then kill gpuwarden outright.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !scene
        .full_journal()
        .iter()
        .any(|r| r["event"] == "checkpoint_saved")
    {
        assert!(Instant::now() < deadline, "no checkpoint_saved");
        std::thread::sleep(Duration::from_millis(50));
    }
    send(child.id(), nix::sys::signal::Signal::SIGKILL);
    child.wait().unwrap();
    let before = std::fs::read_to_string(scene.run_dir().join("journal.jsonl")).unwrap();
    // The guard stops the job; wait for it to be gone before resuming.
    let pid = scene.starts()[0]["pid"].as_i64().unwrap() as i32;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dead(pid) {
        assert!(Instant::now() < deadline, "the job outlived gpuwarden");
        std::thread::sleep(Duration::from_millis(50));
    }

    let out = Command::new(BIN)
        .arg("resume")
        .arg(scene.run_dir())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");
    // Append-only: the old journal is a prefix of the new one.
    let after = std::fs::read_to_string(scene.run_dir().join("journal.jsonl")).unwrap();
    assert!(after.starts_with(&before));
    let journal = scene.full_journal();
    let resumed = journal
        .iter()
        .find(|r| r["event"] == "run_resumed")
        .unwrap();
    assert_eq!(resumed["attempt"], 2);
    assert_eq!(resumed["tier"], "gpu");
    assert_eq!(resumed["restarts_left"], 5);
    let starts: Vec<&serde_json::Value> = journal
        .iter()
        .filter(|r| r["event"] == "attempt_started")
        .collect();
    assert_eq!(starts.len(), 2);
    assert_eq!(starts[1]["attempt"], 2);
    let from = starts[1]["checkpoint"].as_str().unwrap();
    assert!(from.contains("ckpt-step"), "{from}");
    assert_eq!(journal.last().unwrap()["outcome"], "succeeded");
    // The trainer's second start resumed from that checkpoint.
    assert_eq!(arg_after(&scene.starts()[1], "--resume"), Some(from));
    // A finished run is not resumed again.
    let again = Command::new(BIN)
        .arg("resume")
        .arg(scene.run_dir())
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert!(text(&again.stderr).contains("is over"));
    // And the report tells both parts.
    let report = report_json(&scene);
    assert_eq!(report["resumed"], 1);
    assert_eq!(report["attempts"].as_array().unwrap().len(), 2);
}

#[test]
fn with_progress_only_heartbeat_lines_count_and_chatter_does_not_hide_a_hang() {
    // The hung job keeps printing "waiting for the data loader"; only `step N` lines are
    // heartbeats, so the stall timeout still fires.
    let scene = Scene::new();
    let config = fast_config(&scene);
    let out = scene.run(
        &[
            "--config",
            &config,
            "--stall-timeout",
            "2s",
            "--grace",
            "2",
            "--progress",
            r"^step \d+/",
        ],
        &[
            "--device",
            "{device}",
            "--resume",
            "{checkpoint}",
            "--steps",
            "8",
            "--sleep",
            "0.05",
            "--hang-at",
            "5",
            "--hang-once",
            "--chatter",
            "0.2",
        ],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");
    assert!(text(&out.stdout).contains("waiting for the data loader"));
    let journal = scene.full_journal();
    let fault = journal.iter().find(|r| r["event"] == "fault").unwrap();
    assert_eq!(fault["class"], "gpu_hang");
    assert_eq!(fault["rule"], "stall-timeout");
    assert_eq!(scene.starts().len(), 2);
    assert_eq!(journal.last().unwrap()["outcome"], "succeeded");
    // The step interval (a step every 0.05 s plus the print), once per attempt.
    let intervals: Vec<&serde_json::Value> = journal
        .iter()
        .filter(|r| r["event"] == "step_interval")
        .collect();
    assert_eq!(intervals.len(), 2, "{intervals:?}");
    for r in intervals {
        let median = r["median_seconds"].as_f64().unwrap();
        assert!((0.04..0.5).contains(&median), "{r}");
        assert!(r["heartbeats"].as_u64().unwrap() >= 2, "{r}");
    }
    assert!(stderr.contains("a heartbeat every"), "{stderr}");
}

#[test]
fn a_bad_progress_regex_is_a_usage_error_naming_the_flag_or_the_file_line() {
    let scene = Scene::new();
    let out = scene.run(&["--progress", "step (\\d+"], &["--steps", "1"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("--progress"), "{stderr}");
    assert!(!scene.path("record.jsonl").exists(), "the job was started");

    let config = scene.path("bad.toml");
    std::fs::write(&config, "max_restarts = 1\nprogress = \"[\"\n").unwrap();
    let out = scene.run(&["--config", config.to_str().unwrap()], &["--steps", "1"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("bad.toml:2:12"), "{stderr}");
    assert!(stderr.contains("progress regex"), "{stderr}");
}

/// Seconds since the epoch of a journal timestamp (`2026-12-05T01:02:03.456789Z`).
fn epoch_seconds(at: &str) -> f64 {
    let num = |r: std::ops::Range<usize>| at[r].parse::<i64>().unwrap();
    let (y, m, d) = (num(0..4), num(5..7), num(8..10));
    // Days from the civil date (H. Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs: f64 = at[17..at.len() - 1].parse().unwrap();
    (days * 86_400 + num(11..13) * 3600 + num(14..16) * 60) as f64 + secs
}

#[test]
fn every_checkpoint_is_journaled_soon_after_it_is_written() {
    // Issue 11: file events, not only the 2 s rescan. A save every 0.6 s: the rescan alone
    // would see about one in three; the watch sees each, within milliseconds (saves closer
    // together than HINT_GAP, 0.5 s, wait for it).
    let scene = Scene::new();
    let config = fast_config(&scene);
    let out = scene.run(
        &["--config", &config, "--no-kernel-log", "--no-health"],
        &[
            "--steps",
            "12",
            "--every",
            "2",
            "--sleep",
            "0.3",
            "--record-saves",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let saved: Vec<(u64, f64)> = scene
        .records()
        .iter()
        .filter_map(|r| Some((r["saved"].as_u64()?, r["wall"].as_f64()?)))
        .collect();
    assert_eq!(saved.len(), 6, "{saved:?}");
    let journal = scene.full_journal();
    let mut latencies: Vec<f64> = saved
        .iter()
        .map(|(step, wall)| {
            let record = journal
                .iter()
                .find(|r| r["event"] == "checkpoint_saved" && r["step"] == *step)
                .unwrap_or_else(|| panic!("checkpoint of step {step} not journaled"));
            epoch_seconds(record["at"].as_str().unwrap()) - wall
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let ms = |s: f64| s * 1000.0;
    eprintln!(
        "checkpoint written -> checkpoint_saved journaled: min {:.1} ms, median {:.1} ms, max {:.1} ms ({} saves)",
        ms(latencies[0]),
        ms(latencies[latencies.len() / 2]),
        ms(latencies[latencies.len() - 1]),
        latencies.len()
    );
    // Loose: the machine running the tests is shared; the figure above is the measurement.
    assert!(latencies[latencies.len() / 2] < 0.5, "{latencies:?}");
}

#[test]
fn a_policy_table_makes_an_oom_restart_on_the_same_tier() {
    let scene = Scene::new();
    let config = scene.path("policy.toml");
    std::fs::write(
        &config,
        "backoff = { initial = 0.05, max = 0.2 }\n\n[policy]\ngpu_oom = \"restart\"\n",
    )
    .unwrap();
    let out = scene.run(
        &["--config", config.to_str().unwrap()],
        &[
            "--device",
            "{device}",
            "--resume",
            "{checkpoint}",
            "--steps",
            "6",
            "--sleep",
            "0.05",
            "--fault",
            "oom",
            "--fault-at",
            "5",
            "--fault-once",
        ],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");
    assert!(
        stderr.contains("[policy] makes gpu_oom `restart`"),
        "{stderr}"
    );
    let starts = scene.starts();
    assert_eq!(starts.len(), 2, "{starts:?}");
    // The rule says fallback (to the CPU); the policy kept the GPU.
    assert_eq!(arg_after(&starts[1], "--device"), Some("cuda"));
    let journal = scene.journal();
    let fault = journal.iter().find(|r| r["event"] == "fault").unwrap();
    assert_eq!(fault["class"], "gpu_oom");
    assert_eq!(fault["action"], "restart");
}

#[test]
fn a_bad_policy_table_is_a_usage_error_at_its_line() {
    let scene = Scene::new();
    for (table, at, what, listed) in [
        (
            "[policy]\ngpu_oops = \"restart\"\n",
            "bad.toml:2:1",
            "unknown fault class `gpu_oops`",
            "`gpu_oom`",
        ),
        (
            "[policy]\ngpu_oom = \"retry\"\n",
            "bad.toml:2:11",
            "unknown action `retry`",
            "`fallback`",
        ),
    ] {
        let config = scene.path("bad.toml");
        std::fs::write(&config, table).unwrap();
        let out = scene.run(&["--config", config.to_str().unwrap()], &["--steps", "1"]);
        assert_eq!(out.status.code(), Some(2));
        let stderr = text(&out.stderr);
        assert!(stderr.contains(at) && stderr.contains(what), "{stderr}");
        assert!(stderr.contains(listed), "lists what is known: {stderr}");
    }
    assert!(!scene.path("record.jsonl").exists(), "the job was started");
}

#[test]
fn a_long_attempt_without_a_checkpoint_is_said_loudly_and_so_is_a_restart_from_scratch() {
    // The job saves every 100 steps and faults before its first save: with checkpoints watched,
    // the hour (here: a second and a half) it ran is lost, and the user must hear why.
    let scene = Scene::new();
    let config = scene.path("warn.toml");
    std::fs::write(
        &config,
        "backoff = { initial = 0.05, max = 0.2 }\nwarn_no_checkpoint_after = \"1s\"\n",
    )
    .unwrap();
    let out = scene.run(
        &["--config", config.to_str().unwrap()],
        &[
            "--device",
            "{device}",
            "--steps",
            "7",
            "--every",
            "100",
            "--sleep",
            "0.3",
            "--fault-at",
            "6",
        ],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");
    let warnings: Vec<String> = scene
        .journal()
        .iter()
        .filter(|r| r["event"] == "warning")
        .map(|r| r["message"].as_str().unwrap().to_string())
        .collect();
    let first = warnings
        .iter()
        .find(|m| m.starts_with("attempt 1 ran"))
        .unwrap_or_else(|| panic!("{warnings:?}"));
    assert!(first.contains("no new complete checkpoint"), "{first}");
    assert!(first.contains("--checkpoints"), "{first}");
    assert!(first.contains("more often than every 1.0s"), "{first}");
    assert!(
        warnings
            .iter()
            .any(|m| m.starts_with("attempt 2 starts from scratch")),
        "{warnings:?}"
    );
    assert!(
        stderr.contains("warning: attempt 2 starts from scratch"),
        "{stderr}"
    );
}

#[test]
fn learned_tiers_start_the_next_run_past_a_tier_that_faulted_until_forgotten() {
    let scene = Scene::new();
    let config = fast_config(&scene);
    let state = scene.path("state");
    for dir in ["sys", "root"] {
        std::fs::create_dir_all(scene.path(dir)).unwrap();
    }
    let (sys, root) = (scene.path("sys"), scene.path("root"));
    let run = |extra: &[&str], name: &str| {
        let mut flags = vec![
            "--config",
            &config,
            "--sysfs-root",
            sys.to_str().unwrap(),
            "--root",
            root.to_str().unwrap(),
        ];
        flags.extend(extra);
        let out = scene
            .command(
                &flags,
                &["--device", "{device}", "--steps", "4", "--fault-at", "2"],
            )
            .env("XDG_STATE_HOME", &state)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let journal = scene.journal();
        std::fs::rename(scene.run_dir(), scene.path(name)).unwrap();
        (text(&out.stderr), journal)
    };
    let devices = |journal: &[serde_json::Value]| -> Vec<String> {
        journal
            .iter()
            .filter(|r| r["event"] == "attempt_started")
            .map(|r| r["tier"].as_str().unwrap().to_string())
            .collect()
    };

    // The GPU faults, the CPU finishes: learned.
    let (_, first) = run(&[], "run-1");
    assert_eq!(devices(&first), ["gpu", "cpu"]);
    let memory = std::fs::read_to_string(state.join("gpuwarden/tiers.json")).unwrap();
    assert!(
        memory.contains("\"faulted\"") && memory.contains("\"finished\""),
        "{memory}"
    );

    // The same job starts on the CPU, and says why.
    let (stderr, second) = run(&[], "run-2");
    assert_eq!(devices(&second), ["cpu"]);
    assert!(
        stderr.contains("starting on tier `cpu`, learned from earlier runs"),
        "{stderr}"
    );
    assert!(
        stderr.contains("`gpu` faulted (gpu_memory_fault"),
        "{stderr}"
    );

    // --forget: the whole ladder again.
    let (stderr, third) = run(&["--forget"], "run-3");
    assert!(stderr.contains("--forget"), "{stderr}");
    assert_eq!(devices(&third), ["gpu", "cpu"]);
}

#[test]
fn after_a_transient_gpu_fault_the_run_climbs_back_from_the_cpu_at_its_first_new_checkpoint() {
    // Attempt 1 (gpu) dies of a memory fault at step 5, after saving step 4; attempt 2 (cpu)
    // resumes from step 4 and saves step 6 (or 8, when file events right after the fall's own
    // checkpoint wait out their 0.5 s gap); that is the climb: attempt 2 is stopped and
    // attempt 3 goes back to the GPU from there (the fault was a one-off: --fault-once).
    let scene = Scene::new();
    let config = fast_config(&scene);
    let out = scene.run(
        &["--config", &config, "--no-kernel-log", "--no-health"],
        &[
            "--device",
            "{device}",
            "--resume",
            "{checkpoint}",
            "--steps",
            "12",
            "--every",
            "2",
            "--sleep",
            "0.2",
            "--fault-at",
            "5",
            "--fault-once",
        ],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");
    let starts = scene.starts();
    let devices: Vec<_> = starts.iter().map(|s| arg_after(s, "--device")).collect();
    assert_eq!(
        devices,
        [Some("cuda"), Some("cpu"), Some("cuda")],
        "{stderr}"
    );
    let journal = scene.full_journal();
    let climb = journal
        .iter()
        .find(|r| r["event"] == "climb_back")
        .unwrap_or_else(|| panic!("no climb_back in {journal:?}"));
    assert_eq!(climb["attempt"], 2);
    assert_eq!(
        (&climb["from"], &climb["to"]),
        (&"cpu".into(), &"gpu".into())
    );
    assert_eq!(climb["class"], "gpu_memory_fault");
    let climbed_from = climb["checkpoint"].as_str().unwrap();
    assert_eq!(arg_after(&starts[2], "--resume"), Some(climbed_from));
    let step6 = scene.ckpt().join("ckpt-step00006.safetensors");
    assert!(climbed_from >= step6.to_str().unwrap(), "{climbed_from}");
    assert_eq!(
        climb["fell_at"],
        scene
            .ckpt()
            .join("ckpt-step00004.safetensors")
            .to_str()
            .unwrap()
    );
    let ended: Vec<&serde_json::Value> = journal
        .iter()
        .filter(|r| r["event"] == "attempt_ended")
        .collect();
    assert_eq!(ended[1]["ended_by"], "stopped to climb back to tier `gpu`");
    let finished = journal.last().unwrap();
    assert_eq!(finished["outcome"], "succeeded");
    assert_eq!(finished["restarts"], 1, "a climb is not a restart");
    assert!(
        stderr.contains("climbing back: attempt 2 on tier `cpu`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("after 3 attempts (1 restart, 1 climb back)"),
        "{stderr}"
    );

    // From the CPU's new checkpoint journaled to the GPU attempt started, on the journal's clock.
    let at = |r: &serde_json::Value| epoch_seconds(r["at"].as_str().unwrap());
    let saved = journal
        .iter()
        .find(|r| r["event"] == "checkpoint_saved" && r["path"] == climbed_from)
        .unwrap();
    let third = journal
        .iter()
        .find(|r| r["event"] == "attempt_started" && r["attempt"] == 3)
        .unwrap();
    let gap = at(third) - at(saved);
    eprintln!("climb: checkpoint_saved on the cpu -> attempt 3 started on the gpu {gap:.3} s");
    assert!(gap < 5.0, "{gap}");

    // The report tells the climb, and its goodput keeps the CPU's work up to step 6.
    let report = report_json(&scene);
    let attempts = report["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3);
    assert_eq!(attempts[1]["climbed_to"], "gpu");
    let kept = attempts[1]["kept_seconds"].as_f64().unwrap();
    assert!(kept > 0.0, "{:?}", attempts[1]);
    let out = Command::new(BIN)
        .arg("report")
        .arg(scene.run_dir())
        .output()
        .unwrap();
    let shown = text(&out.stdout);
    assert!(shown.contains("climbed back to tier `gpu`"), "{shown}");
    assert!(report["skipped"].as_array().unwrap().is_empty(), "{report}");
}

#[test]
fn with_climb_back_off_the_run_stays_on_the_cpu() {
    let scene = Scene::new();
    let config = fast_config(&scene);
    let out = scene.run(
        &[
            "--config",
            &config,
            "--no-kernel-log",
            "--no-health",
            "--climb-back",
            "off",
        ],
        &[
            "--device",
            "{device}",
            "--resume",
            "{checkpoint}",
            "--steps",
            "8",
            "--every",
            "2",
            "--sleep",
            "0.05",
            "--fault-at",
            "5",
            "--fault-once",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let devices: Vec<_> = scene
        .starts()
        .iter()
        .map(|s| arg_after(s, "--device").map(str::to_string))
        .collect();
    assert_eq!(devices, [Some("cuda".into()), Some("cpu".into())]);
    assert!(
        !scene
            .full_journal()
            .iter()
            .any(|r| r["event"] == "climb_back")
    );
}

#[test]
fn bad_climb_back_stall_and_memory_wait_values_are_usage_errors() {
    let scene = Scene::new();
    for (flag, value, says) in [
        ("--climb-back", "banana", "`3`"),
        ("--climb-back", "1.5", "or `off`"),
        (
            "--stall-timeout",
            "auto:soon",
            "`auto:soon` is not a duration",
        ),
        ("--stall-timeout-floor", "x", "not a duration"),
        ("--gpu-memory-wait", "forever", "not a duration"),
    ] {
        let out = scene.run(&[flag, value], &["--steps", "1"]);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(flag) && stderr.contains(says),
            "{flag}: {stderr}"
        );
    }
    assert!(!scene.path("record.jsonl").exists(), "the job was started");
    let config = scene.path("bad.toml");
    std::fs::write(&config, "max_restarts = 1\nclimb_back = \"often\"\n").unwrap();
    let out = scene.run(&["--config", config.to_str().unwrap()], &["--steps", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("bad.toml:2:14"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn with_progress_the_stall_timeout_is_learned_and_catches_a_hang_in_seconds() {
    // Heartbeats every 0.1 s: after ten, the stall timeout is 5 x 0.1 s, held up by the 1 s
    // floor given here, instead of the 20 minutes it starts with. The hang at step 15 is then
    // stopped about a second after the last heartbeat.
    let scene = Scene::new();
    let config = fast_config(&scene);
    let out = scene.run(
        &[
            "--config",
            &config,
            "--no-kernel-log",
            "--no-health",
            "--grace",
            "2",
            "--progress",
            r"^step \d+/",
            "--stall-timeout-floor",
            "1s",
        ],
        &[
            "--device",
            "{device}",
            "--resume",
            "{checkpoint}",
            "--steps",
            "20",
            "--every",
            "2",
            "--sleep",
            "0.1",
            "--hang-at",
            "15",
            "--hang-once",
        ],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");
    let journal = scene.full_journal();
    let learned: Vec<&serde_json::Value> = journal
        .iter()
        .filter(|r| r["event"] == "stall_timeout_learned")
        .collect();
    assert!(!learned.is_empty(), "{journal:?}");
    assert_eq!(learned[0]["attempt"], 1);
    assert_eq!(learned[0]["timeout_seconds"], 1.0, "{}", learned[0]);
    assert_eq!(learned[0]["ceiling_seconds"], 1200.0);
    assert!(stderr.contains("stall timeout learned: 1.0s"), "{stderr}");
    let fault = journal.iter().find(|r| r["event"] == "fault").unwrap();
    assert_eq!(fault["rule"], "stall-timeout");
    let records = scene.records();
    let last = records
        .iter()
        .find_map(|r| r["last_output"].as_f64())
        .unwrap();
    let term = records
        .iter()
        .find(|r| r["hang_signal"] == 15)
        .and_then(|r| r["at"].as_f64())
        .unwrap();
    let gap = term - last;
    eprintln!(
        "learned stall timeout: last heartbeat -> SIGTERM {gap:.3} s (learned 1 s, default 20 min)"
    );
    assert!((1.0..5.0).contains(&gap), "{gap}");
}

#[test]
fn a_learned_stall_timeout_never_stops_a_job_that_keeps_beating() {
    // Heartbeats every 0.15 s for 4.5 s, no hang: the learned timeout is 1 s (the floor given),
    // and the job must finish untouched. (When the output readers told the supervisor of new
    // output at most once a second, it heard of this job's lines 1.05 s apart, so a 1 s timeout
    // stopped it as stalled at about 2 s.)
    let scene = Scene::new();
    let config = fast_config(&scene);
    let out = scene.run(
        &[
            "--config",
            &config,
            "--no-kernel-log",
            "--no-health",
            "--progress",
            r"^step \d+/",
            "--stall-timeout-floor",
            "1s",
        ],
        &["--steps", "30", "--every", "10", "--sleep", "0.15"],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");
    assert!(stderr.contains("stall timeout learned: 1.0s"), "{stderr}");
    let journal = scene.full_journal();
    assert!(
        journal.iter().all(|r| r["event"] != "fault"),
        "a healthy job was stopped: {journal:#?}"
    );
    assert_eq!(
        journal
            .iter()
            .filter(|r| r["event"] == "attempt_started")
            .count(),
        1
    );
}
