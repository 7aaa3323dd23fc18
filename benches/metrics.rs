//! Benchmark: what a Prometheus scrape of `--metrics-addr` costs gpuwarden.
//!
//! `cargo bench --bench metrics`. The board holds what an 8-GPU node shows mid-run: eight GPUs
//! with every gauge known and two ECC blocks each, a running job with a checkpoint, faults of
//! five (class, source) kinds and the 200 recent faults the board keeps. Three figures:
//!
//! - `render`: one scrape's work in-process, [`Board::read`] (the copy) plus the encoding;
//! - `scrape`: a real HTTP GET of `/metrics` from the endpoint on its own thread, wall time at
//!   the client (connect, request, answer, close);
//! - the endpoint thread's own CPU time per scrape, read from its `schedstat` (nanoseconds the
//!   scheduler ran it), which is the cost at 1 scrape/s once multiplied by one per second.
//!
//! Not a statistics package: mean, p50 and p99 of plain repetitions.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use gpuwarden::gpu::{Gpu, Vendor};
use gpuwarden::metrics::{self, MetricsServer};
use gpuwarden::rules::{FaultClass, Severity};
use gpuwarden::snapshot::{Board, FaultNote, JobInfo, JobState, KernelState, Snapshot};
use gpuwarden::sources::health::{EccCount, GpuSample, Value};

fn main() {
    println!("gpuwarden metrics benchmark (8 GPUs, 2 ECC blocks each, a running job)\n");
    let board = Board::new();
    board.update(|s| fill(s, Instant::now()));

    let body = render(&board);
    println!(
        "one scrape: {} bytes, {} lines",
        body.len(),
        body.lines().count()
    );

    let mut n = 0;
    let cost = time(5_000, || {
        n += render(&board).len();
    });
    std::hint::black_box(n);
    report("render (Board::read + encode)", &cost);

    let server = MetricsServer::start("127.0.0.1:0", board).unwrap();
    let addr = server.addr();
    let thread_cpu = || metrics_thread_cpu().expect("the endpoint's thread, named `metrics`");
    get(addr); // The first connection warms the thread.
    let runs = 2_000;
    let cpu0 = thread_cpu();
    let scrape = time(runs, || {
        assert!(get(addr) > 1000);
    });
    let cpu = (thread_cpu() - cpu0) / runs as u32;
    report("scrape (HTTP GET /metrics, client wall)", &scrape);
    println!(
        "endpoint thread CPU per scrape: {:.3} ms; at 1 scrape/s that is {:.4}% of one core",
        ms(cpu),
        cpu.as_secs_f64() * 100.0
    );
    server.stop();
}

/// What `answer` does for `/metrics`, without the socket.
fn render(board: &Board) -> String {
    metrics::render(board.read(), Instant::now(), SystemTime::now()).unwrap()
}

fn fill(s: &mut Snapshot, now: Instant) {
    let samples: Vec<GpuSample> = (0..8u32)
        .map(|i| {
            let gpu = Gpu {
                vendor: Vendor::Nvidia,
                index: i,
                name: Some("NVIDIA H100 80GB HBM3".into()),
                pci: Some(format!("0000:{:02x}:00.0", 0x18 + 0x10 * i)),
                device_id: None,
                kfd_node: None,
                render_minor: None,
                gfx_target: None,
                compute_capability: Some("9.0".into()),
                uuid: None,
                vram_total_bytes: Some(85_520_809_984),
                driver_version: None,
            };
            let mut g = GpuSample::blank(&gpu);
            g.utilization_percent = Value::Known(97.0 + f64::from(i) / 10.0);
            g.vram_used_bytes = Value::Known(71_000_000_000 + u64::from(i));
            g.temperature_c = Value::Known(64.0 + f64::from(i));
            g.power_w = Value::Known(612.25);
            g.ecc = ["sram", "dram"]
                .into_iter()
                .map(|block| EccCount {
                    block: block.into(),
                    correctable: Value::Known(3),
                    uncorrectable: Value::Known(0),
                })
                .collect();
            g
        })
        .collect();
    s.add_sample(&samples, now);
    s.job = Some(JobInfo {
        command: vec!["python".into(), "train.py".into()],
        state: JobState::Running,
        attempt: 3,
        tier: "gpu".into(),
        device: "cuda".into(),
        pid: Some(4242),
        started: Some(SystemTime::now()),
        restarts: 2,
        max_restarts: 5,
        last_checkpoint: Some((PathBuf::from("ckpt/step-1000.pt"), SystemTime::now())),
        ..JobInfo::default()
    });
    let kinds = [
        (FaultClass::GpuMemoryFault, "stderr", Some(1)),
        (FaultClass::GpuLost, "kernel", Some(2)),
        (FaultClass::GpuEcc, "kernel", None),
        (FaultClass::GpuMemoryFault, "kernel", None),
        (FaultClass::GpuDriverError, "tool", None),
    ];
    for i in 0..200 {
        let (class, source, attempt) = kinds[i % kinds.len()];
        s.add_fault(FaultNote {
            at: SystemTime::now(),
            class,
            rule: format!("rule_{i}"),
            severity: Severity::Critical,
            source: source.into(),
            line: "NVRM: Xid (PCI:0000:18:00): 79, pid=4242, GPU has fallen off the bus.".into(),
            attempt,
            reason: attempt.is_none().then(|| "not the job's GPU".into()),
            count: 1,
        });
    }
    s.sources.kernel = KernelState::Following;
    s.sources.health = vec!["nvml".into()];
}

/// GET /metrics; returns the body's length.
fn get(addr: SocketAddr) -> usize {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = Vec::with_capacity(16 * 1024);
    s.read_to_end(&mut text).unwrap();
    let head = text.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    text.len() - head - 4
}

/// Run time of the thread named `metrics` in this process, from its `schedstat`.
fn metrics_thread_cpu() -> Option<Duration> {
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
        if comm.trim() == "metrics" {
            let stat = std::fs::read_to_string(dir.join("schedstat")).ok()?;
            let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
            return Some(Duration::from_nanos(ns));
        }
    }
    None
}

fn time(n: usize, mut f: impl FnMut()) -> Vec<Duration> {
    let mut all: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    all.sort();
    all
}

fn report(what: &str, sorted: &[Duration]) {
    let mean = sorted.iter().sum::<Duration>() / sorted.len() as u32;
    let p = |q: f64| sorted[((sorted.len() - 1) as f64 * q) as usize];
    println!(
        "{what}: mean {:.3} ms, p50 {:.3} ms, p99 {:.3} ms ({} runs)",
        ms(mean),
        ms(p(0.5)),
        ms(p(0.99)),
        sorted.len()
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
