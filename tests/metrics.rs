//! The Prometheus endpoint end to end: the real binary supervising the fake trainer on the
//! simulated RX 6800 (`tests/data/sysfs`), scraped over HTTP, and the scrape checked by Debian's
//! real `promtool check metrics` (package `prometheus`; `.ci/run` installs it).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `path` from `port`; returns the status line, headers and body as text.
fn get(port: u16, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

fn start(scene: &Scene, port: u16) -> Child {
    let root = scene.path("root");
    std::fs::create_dir_all(&root).unwrap();
    let sysfs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sysfs");
    let addr = format!("127.0.0.1:{port}");
    scene
        .command(
            &[
                "--metrics-addr",
                &addr,
                "--no-kernel-log",
                "--health-interval",
                "0.2",
                "--sysfs-root",
                sysfs.to_str().unwrap(),
                "--root",
                root.to_str().unwrap(),
            ],
            &["--device", "{device}", "--sleep", "0.1", "--steps", "60"],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Scrapes until the job runs and a GPU sample is in.
fn scrape_when_ready(port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            let (_, body) = get(port, "/metrics");
            if body.contains("gpuwarden_job_up 1")
                && body.contains("gpuwarden_gpu_temperature_celsius")
            {
                return body;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the endpoint never showed a running job"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `promtool`, or `None` after saying loudly why the check is skipped. Under CI=true a missing
/// promtool fails the test: CI must install it.
fn promtool() -> Option<&'static str> {
    if Command::new("promtool").arg("--version").output().is_ok() {
        return Some("promtool");
    }
    let msg = "promtool not found: install Debian's `prometheus` package (apt-get install -y prometheus) to check the exposition format";
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(!ci, "{msg}");
    eprintln!("SKIPPED (partly): {msg}");
    None
}

/// CPU time (user + system) of process `pid` so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit(')').next().unwrap();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of proc(5), counted from the state (field 3) here.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn a_live_scrape_passes_promtool_and_shows_the_job_and_the_gpu() {
    let scene = Scene::new();
    let port = free_port();
    let mut child = start(&scene, port);
    let body = scrape_when_ready(port);
    let (head, _) = get(port, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(get(port, "/nope").0.starts_with("HTTP/1.1 404"));

    assert!(body.contains("gpuwarden_job_attempt 1\n"), "{body}");
    assert!(
        body.contains("gpuwarden_job_state{state=\"running\"} 1\n"),
        "{body}"
    );
    assert!(body.contains("gpuwarden_job_restarts_total 0\n"), "{body}");
    assert!(
        body.contains("gpuwarden_kernel_log_state{state=\"off\"} 1\n"),
        "{body}"
    );
    assert!(
        body.contains("gpuwarden_health_sample_age_seconds "),
        "{body}"
    );
    let gpu_line = body
        .lines()
        .find(|l| l.starts_with("gpuwarden_gpu_temperature_celsius{"))
        .unwrap();
    assert!(gpu_line.contains("pci=\"0000:0b:00.0\""), "{gpu_line}");
    assert!(gpu_line.contains("vendor=\"amd\""), "{gpu_line}");
    assert!(body.contains("gpuwarden_gpu_memory_used_bytes{"), "{body}");

    if let Some(promtool) = promtool() {
        let mut check = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        check
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let out = check.wait_with_output().unwrap();
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "promtool:\n{said}\nscrape:\n{body}");
        // No lint complaint either (promtool prints them and still exits 0 for some).
        assert!(said.trim().is_empty(), "promtool:\n{said}\nscrape:\n{body}");
    }

    // The cost of scraping: wall time per scrape, and gpuwarden's CPU time over many scrapes.
    let pid = child.id();
    let n = 200;
    let ticks_before = cpu_ticks(pid);
    let t0 = Instant::now();
    for _ in 0..n {
        get(port, "/metrics");
    }
    let per_scrape = t0.elapsed() / n;
    let ticks = cpu_ticks(pid) - ticks_before;
    // Clock ticks are 1/100 s on Linux (USER_HZ).
    let cpu_per_scrape = Duration::from_millis(ticks * 10) / n;
    println!(
        "metrics: {} bytes a scrape; {per_scrape:?} wall per scrape; gpuwarden CPU per scrape about {cpu_per_scrape:?} ({ticks} ticks over {n} scrapes, job and sampler included); at 1 scrape/s that is {:.3}% of one core",
        body.len(),
        cpu_per_scrape.as_secs_f64() * 100.0
    );
    assert!(per_scrape < Duration::from_millis(100), "{per_scrape:?}");

    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
}

#[test]
fn a_taken_metrics_port_is_a_usage_error_before_the_job_starts() {
    let scene = Scene::new();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = scene.run(
        &["--metrics-addr", &addr, "--no-kernel-log", "--no-health"],
        &[],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot serve metrics on"), "{stderr}");
    assert!(stderr.contains("--metrics-addr"), "{stderr}");
    assert!(scene.starts().is_empty());
}
