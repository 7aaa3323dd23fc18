//! Benchmarks of the supervisor as a user meets it: the real `gpuwarden` binary supervising a
//! real child process.
//!
//! - `latency`: time from the moment the job writes a fault line on its stderr to the moment it
//!   receives SIGTERM, over 100 runs (p50, p99, max).
//! - `kmsg-latency`: an NVIDIA Xid 31 record naming the job's pid is written into the real
//!   `/dev/kmsg`; over 120 runs (p50, p99, max), the time from the write to the fault's journal
//!   record (the kernel's wakeup of the reader, the rules, the attribution through /proc: the
//!   decision) and to the moment the job receives SIGTERM (which adds whatever time the
//!   supervisor leaves the job to report the fault itself before stopping it).
//!   Needs root (to write and read the kernel log); without it, it says so and skips. Other
//!   gpuwarden runs on the machine see these records too (as foreign faults, not acted on).
//! - `passthrough`: 2 GB of training-log lines through gpuwarden to /dev/null: throughput and
//!   gpuwarden's peak RSS.
//! - `webhook`: time from the moment the job writes a fault line on its stderr to the moment
//!   gpuwarden's webhook request (`--webhook`) has arrived whole at a local HTTP server, over 30
//!   runs (p50, p99, max). Both ends are wall-clock times of this machine.
//! - `stall`: a job that prints step lines, then hangs: the time from its last step line to
//!   SIGTERM, with a fixed `--stall-timeout 2s` and with the timeout learned from the step lines
//!   (`--progress`, 20 steps 100 ms apart, floor 1 s: learned 1 s), 10 runs each (p50, max, and
//!   how far past the timeout).
//!
//! Run with `cargo bench --bench supervisor` (all), or `-- latency` / `-- kmsg-latency` /
//! `-- passthrough` / `-- webhook` / `-- stall`.
//! The job is this benchmark's own executable, re-run with `GPUWARDEN_BENCH_JOB` set, so the
//! timestamps on both sides of the pipe are taken in compiled code with the same monotonic clock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::OpenOptions;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};

const BIN: &str = env!("CARGO_BIN_EXE_gpuwarden");
const FAULT_LINE: &[u8] = b"Memory access fault by GPU node-1 (Agent handle: 0x55d3c1e8a2b0) on address 0x7f8a3a000000. Reason: Page not present or supervisor privilege.\n";

fn main() {
    match std::env::var("GPUWARDEN_BENCH_JOB").as_deref() {
        Ok("fault") => return fault_job(),
        Ok("flood") => return flood_job(),
        Ok("kmsg") => return kmsg_job(),
        Ok("stall") => return stall_job(),
        Ok("webhook") => return webhook_job(),
        _ => {}
    }
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wants = |name: &str| which.is_empty() || which.iter().any(|w| w == name);
    if wants("latency") {
        latency(100);
    }
    if wants("kmsg-latency") {
        kmsg_latency(120);
    }
    if wants("passthrough") {
        passthrough(2 * 1000 * 1000 * 1000);
    }
    if wants("webhook") {
        webhook(30);
    }
    if wants("stall") {
        stall(10);
    }
}

fn unix_nanos(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos()
}

/// The job of one webhook trial: the fault line, then wait for SIGTERM; reports the wall-clock
/// time of the write.
fn webhook_job() {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let wall = SystemTime::now();
    std::io::stderr().write_all(FAULT_LINE).unwrap();
    let path = std::env::var("GPUWARDEN_BENCH_OUT").unwrap();
    std::fs::write(path, unix_nanos(wall).to_string()).unwrap();
    set.wait().unwrap();
}

/// Reads one HTTP request whole (headers, then `Content-Length` bytes) and answers 200.
fn answer_request(stream: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = stream.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                break;
            }
        }
    }
    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    String::from_utf8_lossy(&got).into_owned()
}

fn webhook(trials: usize) {
    let dir = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel::<(SystemTime, String)>();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let body = answer_request(&mut stream);
            let _ = tx.send((SystemTime::now(), body));
        }
    });
    let mut samples = Vec::with_capacity(trials);
    for i in 0..trials {
        let out = dir.path().join(format!("webhook-{i}"));
        trial(
            "webhook",
            &out,
            &dir.path().join(format!("run-{i}")),
            &["--notify-on", "fault", "--webhook", &url],
        );
        let written: u128 = std::fs::read_to_string(&out).unwrap().parse().unwrap();
        let (arrived, body) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(
            body.contains("\"fault\""),
            "not the fault's notification: {body}"
        );
        // Nothing else was asked for: the next trial's request is its own.
        while rx.try_recv().is_ok() {}
        samples.push((unix_nanos(arrived) - written) as f64 / 1e6);
    }
    samples.sort_by(f64::total_cmp);
    println!(
        "fault line on stderr -> webhook request arrived ({trials} runs): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms, min {:.3} ms",
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        samples[samples.len() - 1],
        samples[0]
    );
}

/// The job of one stall trial: 20 step lines 100 ms apart, then nothing; reports the
/// nanoseconds from the last line to SIGTERM.
fn stall_job() {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None).unwrap();
    let mut out = std::io::stdout();
    let mut last = Instant::now();
    for step in 1..=20 {
        std::thread::sleep(Duration::from_millis(100));
        writeln!(out, "step {step} loss 0.5").unwrap();
        out.flush().unwrap();
        last = Instant::now();
    }
    set.wait().unwrap();
    let nanos = last.elapsed().as_nanos();
    let path = std::env::var("GPUWARDEN_BENCH_OUT").unwrap();
    std::fs::write(path, nanos.to_string()).unwrap();
}

/// Last step line -> SIGTERM for a hung job, fixed and learned stall timeouts.
fn stall(trials: usize) {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, f64, &[&str]); 2] = [
        ("fixed --stall-timeout 2s", 2.0, &["--stall-timeout", "2s"]),
        (
            "learned (--progress, 100 ms steps, floor 1s)",
            1.0,
            &[
                "--progress",
                r"^step \d+",
                "--stall-timeout",
                "auto",
                "--stall-timeout-floor",
                "1s",
            ],
        ),
    ];
    for (case, (name, timeout, flags)) in cases.into_iter().enumerate() {
        let mut samples = Vec::with_capacity(trials);
        for i in 0..trials {
            let out = dir.path().join(format!("stall-{case}-{i}"));
            trial(
                "stall",
                &out,
                &dir.path().join(format!("run-{case}-{i}")),
                &[&["--ladder", "cpu"], flags].concat(),
            );
            let nanos: f64 = std::fs::read_to_string(&out).unwrap().parse().unwrap();
            samples.push(nanos / 1e9);
        }
        samples.sort_by(f64::total_cmp);
        println!(
            "stall, {name}: last step line -> SIGTERM ({trials} runs): p50 {:.3} s, max {:.3} s, min {:.3} s (timeout {timeout:.1} s; p50 {:.0} ms past it)",
            percentile(&samples, 50.0),
            samples[samples.len() - 1],
            samples[0],
            (percentile(&samples, 50.0) - timeout) * 1000.0
        );
    }
}

/// The job of one latency trial: wait until gpuwarden runs it, print the fault, wait for
/// SIGTERM, report the nanoseconds in between.
fn fault_job() {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None).unwrap();
    // Let gpuwarden finish starting the attempt (journal, log files) so that only the fault
    // path is measured.
    std::thread::sleep(Duration::from_millis(50));
    let t0 = Instant::now();
    std::io::stderr().write_all(FAULT_LINE).unwrap();
    set.wait().unwrap();
    let nanos = t0.elapsed().as_nanos();
    let out = std::env::var("GPUWARDEN_BENCH_OUT").unwrap();
    std::fs::write(out, nanos.to_string()).unwrap();
}

/// The Xid 31 of a real illegal-address fault (FACTS.md), naming `pid`, as a `/dev/kmsg` write:
/// level 4 (warning) keeps it off the console.
fn xid31_record(pid: u32) -> String {
    format!(
        "<12>NVRM: Xid (PCI:0000:03:00): 31, pid={pid}, name=python3, channel 0x0000000a, intr 00000000. MMU Fault: ENGINE GRAPHICS GPC1 GPCCLIENT_T1_8 faulted @ 0x7f7c_9fe00000. Fault is of type FAULT_PDE ACCESS_TYPE_VIRT_WRITE\n"
    )
}

/// Writes one record into the kernel log through a fresh descriptor: the kernel's rate limit
/// (10 records in 5 s) is per descriptor, so a fresh one is never limited.
fn write_kmsg(record: &str) -> std::io::Result<()> {
    OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")?
        .write_all(record.as_bytes())
}

/// The job of one kernel-log trial: wait until gpuwarden runs it, write an Xid naming itself
/// into `/dev/kmsg`, wait for SIGTERM; report the nanoseconds in between and the wall-clock time
/// of the write (to compare with the journal's). The job writes the record itself so that both
/// ends of the SIGTERM latency are timed in one process with one monotonic clock; for
/// gpuwarden it is the same as a record written by any other process.
fn kmsg_job() {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let record = xid31_record(std::process::id());
    let wall = SystemTime::now();
    let t0 = Instant::now();
    write_kmsg(&record).unwrap();
    set.wait().unwrap();
    let nanos = t0.elapsed().as_nanos();
    let out = std::env::var("GPUWARDEN_BENCH_OUT").unwrap();
    std::fs::write(out, format!("{nanos} {}", gpuwarden::time::rfc3339(wall))).unwrap();
}

/// Seconds since midnight of an RFC 3339 UTC time as the journal writes it
/// (`2026-11-26T02:36:56.939954Z`).
fn seconds_of_day(rfc3339: &str) -> f64 {
    let time = rfc3339.split('T').nth(1).unwrap().trim_end_matches('Z');
    let mut parts = time.split(':');
    let mut next = || parts.next().unwrap().parse::<f64>().unwrap();
    next() * 3600.0 + next() * 60.0 + next()
}

/// Writes `GPUWARDEN_BENCH_BYTES` bytes of realistic training-log lines to stdout.
fn flood_job() {
    let total: u64 = std::env::var("GPUWARDEN_BENCH_BYTES")
        .unwrap()
        .parse()
        .unwrap();
    let mut chunk = Vec::with_capacity(1 << 20);
    let mut step = 0u64;
    while chunk.len() < (1 << 20) - 200 {
        step += 1;
        writeln!(
            chunk,
            "[rank0]: epoch 3 step {step:>7}/500000 loss {:.6} lr 3.0e-04 grad_norm {:.3} tokens/s {} eta 01:{:02}:{:02}",
            1.0 / (step as f64).sqrt(),
            0.5 + (step % 97) as f64 / 100.0,
            38_000 + step % 1000,
            step % 60,
            step % 59
        )
        .unwrap();
    }
    let mut out = std::io::stdout().lock();
    let mut written = 0u64;
    while written < total {
        let n = chunk.len().min((total - written) as usize);
        out.write_all(&chunk[..n]).unwrap();
        written += n as u64;
    }
}

/// One trial: gpuwarden runs this benchmark's executable as the job `job` (which writes its
/// result to `out`) with `--max-restarts 0` and `flags`, silently, in `run_dir`; the job's fault
/// (or stall) ends the run, so gpuwarden gives up (exit 3).
fn trial(job: &str, out: &std::path::Path, run_dir: &std::path::Path, flags: &[&str]) {
    let status = Command::new(BIN)
        .args(["run", "--max-restarts", "0"])
        .args(flags)
        .arg("--run-dir")
        .arg(run_dir)
        .arg("--")
        .arg(std::env::current_exe().unwrap())
        .env("GPUWARDEN_BENCH_JOB", job)
        .env("GPUWARDEN_BENCH_OUT", out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(
        status.code(),
        Some(3),
        "gpuwarden gives up after 0 restarts"
    );
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank]
}

fn latency(trials: usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut samples = Vec::with_capacity(trials);
    for i in 0..trials {
        let out = dir.path().join(format!("latency-{i}"));
        trial("fault", &out, &dir.path().join(format!("run-{i}")), &[]);
        let nanos: f64 = std::fs::read_to_string(&out).unwrap().parse().unwrap();
        samples.push(nanos / 1e6);
    }
    samples.sort_by(f64::total_cmp);
    println!(
        "fault line on stderr -> SIGTERM ({trials} runs): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms, min {:.3} ms",
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        samples[samples.len() - 1],
        samples[0]
    );
}

fn kmsg_latency(trials: usize) {
    let readable = OpenOptions::new().read(true).open("/dev/kmsg");
    let probe = write_kmsg("<14>gpuwarden bench: checking /dev/kmsg access\n");
    if let Err(e) = probe.and(readable.map(drop)) {
        println!(
            "kmsg-latency skipped: /dev/kmsg is not writable and readable here ({e}); run the benchmark as root"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut to_sigterm = Vec::with_capacity(trials);
    let mut to_journal = Vec::with_capacity(trials);
    for i in 0..trials {
        let out = dir.path().join(format!("kmsg-latency-{i}"));
        let run_dir = dir.path().join(format!("kmsg-run-{i}"));
        trial("kmsg", &out, &run_dir, &["--kernel-log", "/dev/kmsg"]);
        // The job was stopped by the kernel record, not by anything else.
        let journal = std::fs::read_to_string(run_dir.join("journal.jsonl")).unwrap();
        let fault: serde_json::Value = journal
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|r| r["event"] == "fault")
            .unwrap_or_else(|| panic!("trial {i}: no fault in the journal:\n{journal}"));
        assert_eq!(fault["stream"], "kernel", "trial {i}");
        assert_eq!(fault["rule"], "xid-31", "trial {i}");
        let report = std::fs::read_to_string(&out).unwrap();
        let (nanos, written) = report.split_once(' ').unwrap();
        to_sigterm.push(nanos.parse::<f64>().unwrap() / 1e6);
        let journaled = seconds_of_day(fault["at"].as_str().unwrap()) - seconds_of_day(written);
        to_journal.push(journaled.rem_euclid(86_400.0) * 1e3);
        // Spaced, so that one trial's teardown does not overlap the next one's measurement.
        std::thread::sleep(Duration::from_millis(50));
    }
    for (what, samples) in [
        ("fault journaled", &mut to_journal),
        ("SIGTERM", &mut to_sigterm),
    ] {
        samples.sort_by(f64::total_cmp);
        println!(
            "Xid record into /dev/kmsg -> {what} ({trials} runs): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms, min {:.3} ms",
            percentile(samples, 50.0),
            percentile(samples, 99.0),
            samples[samples.len() - 1],
            samples[0]
        );
    }
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn passthrough(bytes: u64) {
    let dir = tempfile::tempdir().unwrap();
    let me = std::env::current_exe().unwrap();
    // gpuwarden also logs every byte beside the journal, so this measures pass-through plus
    // logging to disk.
    let run_dir = dir.path().join("run");
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .args(["run", "--max-restarts", "0", "--run-dir"])
        .arg(&run_dir)
        .arg("--")
        .arg(&me)
        .env("GPUWARDEN_BENCH_JOB", "flood")
        .env("GPUWARDEN_BENCH_BYTES", bytes.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut peak = 0;
    while child.try_wait().unwrap().is_none() {
        if let Some(kib) = peak_rss_kib(pid) {
            peak = peak.max(kib);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = started.elapsed();
    let logged = std::fs::metadata(run_dir.join("attempt-1.stdout.log"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert_eq!(logged, bytes, "every byte is logged");
    println!(
        "pass-through of {:.1} GB of log lines (also logged to {}): {:.2} s, {:.0} MB/s; gpuwarden peak RSS {:.1} MiB",
        bytes as f64 / 1e9,
        dir.path().display(),
        took.as_secs_f64(),
        bytes as f64 / 1e6 / took.as_secs_f64(),
        peak as f64 / 1024.0
    );
}
