//! Prometheus metrics: the [`Board`]'s snapshot written in the text exposition format (version
//! 0.0.4), served over plain HTTP by a small responder on its own thread (`--metrics-addr`).
//!
//! Each scrape takes one copy of the snapshot ([`Board::read`]: the lock is held for the copy
//! only) and renders it; nothing is kept between scrapes, so the numbers can never drift from
//! what the dashboard shows. The format is written here rather than through a client crate: the
//! metrics are a pure function of a snapshot, which the registries of those crates (long-lived
//! metric objects updated in place) do not fit, and the format's rules that matter (a HELP and
//! TYPE line per family, label value escaping, `_total` on counters, `NaN`/`+Inf`) are few and
//! checked by `promtool check metrics` in `tests/metrics.rs`.
//!
//! Not for: deciding anything, or serving anything but `GET /metrics` (and `/` pointing there).
//! There is no authentication: the address is loopback unless the user binds another one.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::snapshot::{Board, JobState, KernelState, Snapshot};
use crate::sources::health::Value;

/// The Content-Type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metric family being written: HELP and TYPE once, then its samples.
struct Family<'a> {
    out: &'a mut String,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &str, kind: &str, help: &str) -> Family<'a> {
        let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        self.out.push(' ');
        self.out.push_str(&number(value));
        self.out.push('\n');
    }
}

/// A sample value as the format spells it (Go's ParseFloat reads Rust's shortest round-trip
/// decimal form; the special values have their own names).
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

/// Label values: backslash, double quote and newline are escaped.
fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// HELP text: backslash and newline are escaped.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

fn secs_since_epoch(t: SystemTime) -> Option<f64> {
    t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs_f64())
}

/// The snapshot in the exposition format. `now` and `wall` are the moment of the scrape.
pub fn render(snap: &Snapshot, now: Instant, wall: SystemTime) -> String {
    let mut out = String::with_capacity(4096);
    let job = snap.job.as_ref();
    let running = job.is_some_and(|j| j.state == JobState::Running);

    Family::new(
        &mut out,
        "gpuwarden_job_up",
        "gauge",
        "1 while an attempt of the supervised job is running, else 0.",
    )
    .sample("gpuwarden_job_up", &[], if running { 1.0 } else { 0.0 });

    if let Some(job) = job {
        let state = match &job.state {
            JobState::Starting => "starting",
            JobState::Running => "running",
            JobState::Stopping => "stopping",
            JobState::Backoff => "backoff",
            JobState::Finished(_) => "finished",
        };
        let mut f = Family::new(
            &mut out,
            "gpuwarden_job_state",
            "gauge",
            "Where the job stands: 1 for the current state, 0 for the others.",
        );
        for s in ["starting", "running", "stopping", "backoff", "finished"] {
            f.sample(
                "gpuwarden_job_state",
                &[("state", s)],
                if s == state { 1.0 } else { 0.0 },
            );
        }
        Family::new(
            &mut out,
            "gpuwarden_job_tier_info",
            "gauge",
            "The ladder tier and device of the current (or last) attempt, as labels.",
        )
        .sample(
            "gpuwarden_job_tier_info",
            &[("tier", &job.tier), ("device", &job.device)],
            1.0,
        );
        Family::new(
            &mut out,
            "gpuwarden_job_attempt",
            "gauge",
            "The number of the current (or last) attempt, from 1; 0 before the first.",
        )
        .sample("gpuwarden_job_attempt", &[], f64::from(job.attempt));
        Family::new(
            &mut out,
            "gpuwarden_job_restarts_total",
            "counter",
            "Restarts so far in this run (same tier or a fallback).",
        )
        .sample("gpuwarden_job_restarts_total", &[], f64::from(job.restarts));
        Family::new(
            &mut out,
            "gpuwarden_job_max_restarts",
            "gauge",
            "The restart budget of the run.",
        )
        .sample(
            "gpuwarden_job_max_restarts",
            &[],
            f64::from(job.max_restarts),
        );
        if let Some(start) = job.started.and_then(secs_since_epoch) {
            Family::new(
                &mut out,
                "gpuwarden_job_attempt_start_time_seconds",
                "gauge",
                "When the current (or last) attempt started, in seconds since the Unix epoch.",
            )
            .sample("gpuwarden_job_attempt_start_time_seconds", &[], start);
        }
        if let Some((_, at)) = &job.last_checkpoint {
            let age = wall.duration_since(*at).unwrap_or_default().as_secs_f64();
            Family::new(
                &mut out,
                "gpuwarden_last_checkpoint_age_seconds",
                "gauge",
                "Seconds since the newest complete checkpoint was written.",
            )
            .sample("gpuwarden_last_checkpoint_age_seconds", &[], age);
        }
    }

    let mut f = Family::new(
        &mut out,
        "gpuwarden_faults_total",
        "counter",
        "GPU faults seen in this run, by class and source; foreign=\"true\" for faults of other processes or devices (shown, never acted on).",
    );
    for ((class, source, foreign), count) in &snap.fault_counts {
        f.sample(
            "gpuwarden_faults_total",
            &[
                ("class", class),
                ("source", source),
                ("foreign", if *foreign { "true" } else { "false" }),
            ],
            *count as f64,
        );
    }

    render_gpus(&mut out, snap);

    let s = &snap.sources;
    if let Some(age) = snap.sample_age(now) {
        Family::new(
            &mut out,
            "gpuwarden_health_sample_age_seconds",
            "gauge",
            "Seconds since the last GPU health sample; grows when the sampler is stuck (a hung smi tool).",
        )
        .sample(
            "gpuwarden_health_sample_age_seconds",
            &[],
            age.as_secs_f64(),
        );
    }
    let mut f = Family::new(
        &mut out,
        "gpuwarden_health_source_info",
        "gauge",
        "The GPU health sources in use, as labels.",
    );
    for name in &s.health {
        f.sample("gpuwarden_health_source_info", &[("source", name)], 1.0);
    }
    Family::new(
        &mut out,
        "gpuwarden_health_tool_timeouts_total",
        "counter",
        "GPU tool calls (rocm-smi, nvidia-smi) that ran past their deadline.",
    )
    .sample(
        "gpuwarden_health_tool_timeouts_total",
        &[],
        s.tool_timeouts as f64,
    );
    let kernel = match s.kernel {
        KernelState::Off => "off",
        KernelState::Following => "following",
        KernelState::Unavailable(_) => "unavailable",
        KernelState::GaveUp(_) => "gave_up",
    };
    let mut f = Family::new(
        &mut out,
        "gpuwarden_kernel_log_state",
        "gauge",
        "The kernel log reader: 1 for its current state, 0 for the others.",
    );
    for k in ["off", "following", "unavailable", "gave_up"] {
        f.sample(
            "gpuwarden_kernel_log_state",
            &[("state", k)],
            if k == kernel { 1.0 } else { 0.0 },
        );
    }
    Family::new(
        &mut out,
        "gpuwarden_kernel_records_lost_total",
        "counter",
        "Kernel log records overwritten before gpuwarden read them.",
    )
    .sample(
        "gpuwarden_kernel_records_lost_total",
        &[],
        s.kernel_lost as f64,
    );
    Family::new(
        &mut out,
        "gpuwarden_foreign_faults_held_total",
        "counter",
        "Foreign kernel faults counted instead of being reported one by one (a neighbour's flood).",
    )
    .sample(
        "gpuwarden_foreign_faults_held_total",
        &[],
        s.foreign_held as f64,
    );
    out
}

/// The per-GPU families. Every GPU's samples carry `gpu` (the runtime index, or the PCI
/// address when the index is unknown), `pci`, `vendor` and `name`.
fn render_gpus(out: &mut String, snap: &Snapshot) {
    struct Labels {
        gpu: String,
        pci: String,
        vendor: &'static str,
        name: String,
    }
    let labels: Vec<Labels> = snap
        .gpus
        .iter()
        .map(|g| {
            let d = &g.sample.device;
            Labels {
                gpu: d
                    .index
                    .map(|i| i.to_string())
                    .or_else(|| d.pci.clone())
                    .unwrap_or_default(),
                pci: d.pci.clone().unwrap_or_default(),
                vendor: d.vendor.as_str(),
                name: g.sample.name.clone().unwrap_or_default(),
            }
        })
        .collect();
    let base = |l: &Labels| -> [(&'static str, String); 4] {
        [
            ("gpu", l.gpu.clone()),
            ("pci", l.pci.clone()),
            ("vendor", l.vendor.to_string()),
            ("name", l.name.clone()),
        ]
    };
    type Get = fn(&crate::sources::health::GpuSample) -> Option<f64>;
    let gauges: [(&str, &str, Get); 7] = [
        (
            "gpuwarden_gpu_present",
            "1 while the GPU is there, 0 once it fell off the bus.",
            |s| Some(if s.present { 1.0 } else { 0.0 }),
        ),
        (
            "gpuwarden_gpu_utilization_ratio",
            "GPU busy fraction, 0 to 1.",
            |s| s.utilization_percent.known().map(|p| p / 100.0),
        ),
        (
            "gpuwarden_gpu_memory_used_bytes",
            "GPU memory (VRAM) in use.",
            |s| s.vram_used_bytes.known().map(|b| b as f64),
        ),
        (
            "gpuwarden_gpu_memory_total_bytes",
            "GPU memory (VRAM) size.",
            |s| s.vram_total_bytes.known().map(|b| b as f64),
        ),
        (
            "gpuwarden_gpu_temperature_celsius",
            "GPU temperature, main sensor (AMD edge, NVIDIA temperature.gpu).",
            |s| s.temperature_c.known(),
        ),
        (
            "gpuwarden_gpu_hotspot_temperature_celsius",
            "GPU junction (hotspot) temperature, where the GPU reports one.",
            |s| s.hotspot_c.known(),
        ),
        ("gpuwarden_gpu_power_watts", "GPU power draw.", |s| {
            s.power_w.known()
        }),
    ];
    for (name, help, get) in gauges {
        let values: Vec<(usize, f64)> = snap
            .gpus
            .iter()
            .enumerate()
            .filter_map(|(i, g)| get(&g.sample).map(|v| (i, v)))
            .collect();
        if values.is_empty() {
            continue;
        }
        let mut f = Family::new(out, name, "gauge", help);
        for (i, v) in values {
            let b = base(&labels[i]);
            let l: Vec<(&str, &str)> = b.iter().map(|(k, v)| (*k, v.as_str())).collect();
            f.sample(name, &l, v);
        }
    }
    if let Some(job) = &snap.job
        && !snap.gpus.is_empty()
    {
        let name = "gpuwarden_gpu_excluded";
        let mut f = Family::new(
            out,
            name,
            "gauge",
            "1 for a GPU hidden from the job for the rest of the run after a fault named it.",
        );
        for (i, g) in snap.gpus.iter().enumerate() {
            let b = base(&labels[i]);
            let l: Vec<(&str, &str)> = b.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let excluded = job.excludes(&g.sample.device);
            f.sample(name, &l, if excluded { 1.0 } else { 0.0 });
        }
    }
    let mut ecc = Vec::new();
    for (i, g) in snap.gpus.iter().enumerate() {
        for count in &g.sample.ecc {
            for (kind, value) in [
                ("correctable", &count.correctable),
                ("uncorrectable", &count.uncorrectable),
            ] {
                if let Value::Known(n) = value {
                    ecc.push((i, count.block.clone(), kind, *n));
                }
            }
        }
    }
    if !ecc.is_empty() {
        let name = "gpuwarden_gpu_ecc_errors_total";
        let mut f = Family::new(
            out,
            name,
            "counter",
            "GPU memory ECC errors as the driver counts them, by hardware block and kind.",
        );
        for (i, block, kind, n) in ecc {
            let b = base(&labels[i]);
            let mut l: Vec<(&str, &str)> = b.iter().map(|(k, v)| (*k, v.as_str())).collect();
            l.push(("block", &block));
            l.push(("kind", kind));
            f.sample(name, &l, n as f64);
        }
    }
}

/// The running endpoint. Dropping it leaves the thread serving until the process ends;
/// [`MetricsServer::stop`] ends it.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl MetricsServer {
    /// Listens on `addr` and serves `board` from a thread. Binding is done here, so a taken port
    /// is an error before the job starts.
    pub fn start(addr: &str, board: Board) -> io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stopping.load(Ordering::Relaxed) {
                        return;
                    }
                    // One scrape at a time is plenty (Prometheus scrapes every few seconds);
                    // a client that stalls is cut off by the timeouts.
                    if let Ok(stream) = conn {
                        let _ = answer(stream, &board);
                    }
                }
            })?;
        Ok(MetricsServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The address actually bound (the port, when `:0` was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one request and answers it.
fn answer(mut stream: TcpStream, board: &Board) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut request = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
        if request.len() > 16 * 1024 {
            break;
        }
    }
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            CONTENT_TYPE,
            render(&board.read(), Instant::now(), SystemTime::now()),
        ),
        ("GET" | "HEAD", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "gpuwarden: metrics are at /metrics\n".to_string(),
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found; metrics are at /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET\n".to_string(),
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        response.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&response)?;
    stream.flush()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::gpu::{Gpu, Vendor};
    use crate::rules::{FaultClass, Severity};
    use crate::snapshot::{FaultNote, JobInfo};
    use crate::sources::health::{EccCount, GpuSample};

    fn snapshot() -> Snapshot {
        let gpu = Gpu {
            vendor: Vendor::Amd,
            index: 0,
            name: Some("AMD Radeon \"RX\" 6800\\x".into()),
            pci: Some("0000:03:00.0".into()),
            device_id: None,
            kfd_node: None,
            render_minor: None,
            gfx_target: None,
            compute_capability: None,
            uuid: None,
            vram_total_bytes: None,
            driver_version: None,
        };
        let mut s = GpuSample::blank(&gpu);
        s.utilization_percent = Value::Known(87.0);
        s.vram_used_bytes = Value::Known(1 << 30);
        s.temperature_c = Value::Known(71.5);
        s.power_w = Value::Error("n/a".into());
        s.ecc = vec![EccCount {
            block: "umc".into(),
            uncorrectable: Value::Known(2),
            correctable: Value::Unknown,
        }];
        let mut snap = Snapshot::default();
        snap.add_sample(&[s], Instant::now());
        snap.job = Some(JobInfo {
            state: JobState::Running,
            attempt: 2,
            tier: "cpu".into(),
            device: "cpu".into(),
            restarts: 1,
            max_restarts: 5,
            ..JobInfo::default()
        });
        snap.add_fault(FaultNote {
            at: SystemTime::now(),
            class: FaultClass::GpuMemoryFault,
            rule: "r".into(),
            severity: Severity::Critical,
            source: "stderr".into(),
            line: String::new(),
            attempt: Some(1),
            reason: None,
            count: 1,
        });
        snap
    }

    #[test]
    fn families_labels_and_escapes() {
        let text = render(&snapshot(), Instant::now(), SystemTime::now());
        assert!(text.contains("gpuwarden_job_up 1\n"), "{text}");
        assert!(text.contains("gpuwarden_job_attempt 2\n"));
        assert!(text.contains("gpuwarden_job_restarts_total 1\n"));
        assert!(text.contains("gpuwarden_job_state{state=\"running\"} 1\n"));
        assert!(text.contains("gpuwarden_job_tier_info{tier=\"cpu\",device=\"cpu\"} 1\n"));
        assert!(text.contains(
            "gpuwarden_faults_total{class=\"gpu_memory_fault\",source=\"stderr\",foreign=\"false\"} 1\n"
        ));
        assert!(text.contains(
            "gpuwarden_gpu_utilization_ratio{gpu=\"0\",pci=\"0000:03:00.0\",vendor=\"amd\",name=\"AMD Radeon \\\"RX\\\" 6800\\\\x\"} 0.87\n"
        ), "{text}");
        assert!(text.contains("gpuwarden_gpu_memory_used_bytes{gpu=\"0\""));
        assert!(text.contains("} 1073741824\n"));
        // A value the source failed to read is left out, not written as 0.
        assert!(!text.contains("gpuwarden_gpu_power_watts"));
        assert!(text.contains("block=\"umc\",kind=\"uncorrectable\"} 2\n"));
        // Every family has HELP and TYPE, once.
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let name = line.split_whitespace().nth(2).unwrap();
            assert_eq!(
                text.matches(&format!("# TYPE {name} ")).count(),
                1,
                "{name}"
            );
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
        }
    }

    #[test]
    fn numbers_in_the_format() {
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(1e21), "1000000000000000000000");
        assert_eq!(number(0.5), "0.5");
        assert_eq!(escape_label("a\nb\"c\\"), "a\\nb\\\"c\\\\");
    }
}
