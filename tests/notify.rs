//! Notifications end to end: the real binary, the fake trainer faulting on the GPU tier, a real
//! HTTP server on a loopback port (a `TcpListener` in the test) and a real command.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// One request the test server got.
struct Hit {
    at: Instant,
    head: String,
    body: serde_json::Value,
}

/// An HTTP server answering every request with `status`, reporting each on the channel.
fn server(status: &'static str) -> (SocketAddr, mpsc::Receiver<Hit>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                head.push_str(&line);
            }
            let at = Instant::now();
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            // Reported before answering: once gpuwarden has its answer, the hit is counted.
            let body = serde_json::from_slice(&body).unwrap();
            if tx.send(Hit { at, head, body }).is_err() {
                return;
            }
            let _ = write!(stream, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
        }
    });
    (addr, rx)
}

/// A notify command: appends its stdin and `$GPUWARDEN_EVENT` to the file named by its first
/// argument (a path with a space: it must arrive as one argument).
fn hook_script(scene: &Scene) -> String {
    let path = scene.path("hook.sh");
    std::fs::write(
        &path,
        "#!/bin/sh\n{ cat; echo; } >> \"$1\"\necho \"$GPUWARDEN_EVENT\" >> \"$1.events\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.to_string_lossy().into_owned()
}

const FAULTING_JOB: &[&str] = &[
    "--device",
    "{device}",
    "--resume",
    "{checkpoint}",
    "--steps",
    "6",
    "--fault-at",
    "3",
];

#[test]
fn a_fault_reaches_the_webhook_and_the_command_then_the_fallback_and_the_end() {
    let scene = Scene::new();
    let (addr, hits) = server("200 OK");
    let config = scene.fast_config("");
    let script = hook_script(&scene);
    let notes = scene.path("notes dir; x").join("got it.jsonl");
    std::fs::create_dir(notes.parent().unwrap()).unwrap();
    let url = format!("http://{addr}/hooks/gpu?token=abc");
    let mut child = scene
        .command(
            &[
                "--config",
                &config,
                "--no-kernel-log",
                "--no-health",
                "--webhook",
                &url,
                "--notify-cmd",
                &script,
                "--notify-arg",
                notes.to_str().unwrap(),
            ],
            FAULTING_JOB,
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // When the fault line passes through gpuwarden's stderr.
    let stderr = child.stderr.take().unwrap();
    let (line_tx, line_rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap();
            if line.contains("Memory access fault by GPU") {
                let _ = line_tx.send(Instant::now());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let status = child.wait().unwrap();
    let stderr = reader.join().unwrap();
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    let fault_seen = line_rx.recv_timeout(Duration::from_secs(1)).unwrap();

    let got: Vec<Hit> = hits.try_iter().collect();
    let kinds: Vec<&str> = got
        .iter()
        .map(|h| h.body["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["fault", "fallback", "finished"],
        "stderr:\n{stderr}"
    );
    let fault = &got[0];
    assert!(
        fault
            .head
            .starts_with("POST /hooks/gpu?token=abc HTTP/1.1\r\n"),
        "{}",
        fault.head
    );
    assert!(fault.head.contains("Content-Type: application/json"));
    let text = fault.body["text"].as_str().unwrap();
    assert!(text.contains("gpu_memory_fault"), "{text}");
    assert!(text.contains("Memory access fault by GPU node-1"), "{text}");
    assert_eq!(fault.body["record"]["event"], "fault");
    assert_eq!(fault.body["record"]["attempt"], 1);
    assert!(fault.body["record"]["at"].is_string());
    assert_eq!(fault.body["run_dir"], scene.run_dir().to_str().unwrap());
    assert!(
        got[1].body["text"]
            .as_str()
            .unwrap()
            .contains("falling back to tier `cpu`")
    );
    assert_eq!(got[2].body["record"]["exit_code"], 0);
    let latency = fault.at.saturating_duration_since(fault_seen);
    println!("fault line on stderr -> webhook request arrived: {latency:?}");
    assert!(latency < Duration::from_secs(2), "{latency:?}");

    // The command got the same events, each JSON on its stdin, the path as one argument.
    let lines: Vec<serde_json::Value> = read_jsonl(&notes);
    let kinds: Vec<&str> = lines.iter().map(|v| v["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["fault", "fallback", "finished"]);
    let events = std::fs::read_to_string(format!("{}.events", notes.display())).unwrap();
    assert_eq!(events, "fault\nfallback\nfinished\n");
    // Nothing failed, so nothing was journaled about notifications.
    assert!(!scene.journal().iter().any(|r| r["event"] == "warning"));
}

#[test]
fn a_dead_webhook_is_a_journaled_warning_and_never_stops_the_run() {
    let scene = Scene::new();
    // A port where nobody listens.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (addr, hits) = server("500 Internal Server Error");
    let config = scene.fast_config("");
    let started = Instant::now();
    let out = scene.run(
        &[
            "--config",
            &config,
            "--no-kernel-log",
            "--no-health",
            "--webhook",
            &format!("http://127.0.0.1:{port}/"),
            "--webhook",
            &format!("http://{addr}/"),
            "--notify-on",
            "finished",
        ],
        &["--steps", "2"],
    );
    let took = started.elapsed();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");
    // Four tries each (the first and three retries, 0.5 + 1 + 2 s apart).
    assert_eq!(hits.try_iter().count(), 4);
    let warnings: Vec<String> = scene
        .journal()
        .iter()
        .filter(|r| r["event"] == "warning")
        .map(|r| r["message"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings[0].contains(&format!("127.0.0.1:{port}")),
        "{warnings:?}"
    );
    assert!(warnings[0].contains("refused"), "{warnings:?}");
    assert!(warnings[1].contains("500"), "{warnings:?}");
    assert!(stderr.contains("warning: webhook"), "{stderr}");
    assert!(took < Duration::from_secs(20), "{took:?}");
}

#[test]
fn the_notify_table_of_the_config_file_works_and_bad_values_are_usage_errors() {
    let scene = Scene::new();
    let (addr, hits) = server("204 No Content");
    let script = hook_script(&scene);
    let notes = scene.path("notes.jsonl");
    let config = scene.fast_config(
        &format!(
            "[notify]\ncommand = [{script:?}, {:?}]\nwebhook = [\"http://{addr}/a\"]\nevents = [\"fault\", \"gave_up\"]\n",
            notes.to_str().unwrap()
        ),
    );
    let out = scene.run(
        &[
            "--config",
            &config,
            "--no-kernel-log",
            "--no-health",
            "--ladder",
            "gpu",
            "--max-restarts",
            "0",
        ],
        FAULTING_JOB,
    );
    assert_eq!(out.status.code(), Some(3), "stderr:\n{}", text(&out.stderr));
    let kinds: Vec<String> = hits
        .try_iter()
        .map(|h| h.body["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, ["fault", "gave_up"]);
    assert_eq!(read_jsonl(&notes).len(), 2);

    for (bad, says) in [
        (
            "[notify]\nwebhook = \"https://hooks.slack.com/x\"\n",
            "https is not supported",
        ),
        (
            "[notify]\nevents = [\"falt\"]\n",
            "unknown notification event `falt`",
        ),
        ("[notify]\ncommand = []\n", "notify command is empty"),
        ("[notify]\nhook = 1\n", "unknown field"),
    ] {
        let config = scene.fast_config(bad);
        let out = scene.run(&["--config", &config], &["--steps", "1"]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(stderr.contains(says), "{bad}: {stderr}");
        assert!(stderr.contains("fast.toml:"), "{bad}: {stderr}");
    }
    let out = scene.run(&["--webhook", "ftp://x"], &["--steps", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--webhook"),
        "{}",
        text(&out.stderr)
    );
}

/// Issue 12: a stall is among the default notifications, as its own kind `stall` (a silent job
/// never reports its own hang, so this is the one notification only gpuwarden can send).
#[test]
fn a_stall_notifies_as_stall_by_default() {
    let scene = Scene::new();
    let config = scene.fast_config("");
    let script = hook_script(&scene);
    let notes = scene.path("notes.jsonl");
    let out = scene.run(
        &[
            "--config",
            &config,
            "--no-kernel-log",
            "--no-health",
            "--grace",
            "1",
            "--stall-timeout",
            "2s",
            "--notify-cmd",
            &script,
            "--notify-arg",
            notes.to_str().unwrap(),
        ],
        &[
            "--device",
            "{device}",
            "--resume",
            "{checkpoint}",
            "--steps",
            "4",
            "--hang-at",
            "2",
            "--hang-once",
        ],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");
    let lines: Vec<serde_json::Value> = read_jsonl(&notes);
    let kinds: Vec<&str> = lines.iter().map(|v| v["kind"].as_str().unwrap()).collect();
    // One stall at the hang; on a loaded machine a slow start may be one more.
    assert_eq!(kinds.first(), Some(&"stall"), "stderr:\n{stderr}");
    assert_eq!(kinds.last(), Some(&"finished"), "stderr:\n{stderr}");
    assert!(
        kinds[..kinds.len() - 1].iter().all(|k| *k == "stall"),
        "{kinds:?}; stderr:\n{stderr}"
    );
    assert_eq!(lines[0]["record"]["rule"], "stall-timeout");
    let said = lines[0]["text"].as_str().unwrap();
    assert!(said.contains("attempt 1 stalled (gpu_hang)"), "{said}");
}
