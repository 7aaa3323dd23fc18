//! Prometheus metrics: the [`Board`]'s snapshot in the Prometheus text exposition format
//! (version 0.0.4), encoded by `prometheus-client` and served over plain HTTP by a small responder
//! on its own thread (`--metrics-addr`).
//!
//! Each scrape takes one copy of the snapshot ([`Board::read`]: the lock is held for the copy
//! only) and encodes it; nothing is kept between scrapes, so the numbers can never drift from
//! what the dashboard shows. That is why the metrics are one `prometheus-client`
//! [`Collector`] over the copy (`Scrape`), not the crate's long-lived `Gauge`/`Counter` objects
//! updated in place: the executor already keeps the state, in the snapshot. The crate owns the
//! format (HELP and TYPE lines, label value escaping, `_total` on counters and `_info` on info
//! families, number spelling); `tests/metrics.rs` checks a live scrape with `promtool check
//! metrics`.
//!
//! The text format 0.0.4, not the crate's default OpenMetrics encoder: it keeps the content type
//! and output every Prometheus since 2.0 reads, `promtool check metrics` (Debian's 2.42) parses
//! this format only (an OpenMetrics `# EOF` passes there as a comment, so it would check less),
//! and the OpenMetrics extras (`# EOF`, `# UNIT`, created times) add nothing to a snapshot.
//!
//! The HTTP side stays hand-written on `std::net`: neither `prometheus-client` nor `prometheus`
//! (tikv) serves HTTP, and the servers that would (hyper, axum) bring an async runtime for one
//! `GET` every few seconds. Measured with `cargo bench --bench metrics` (8 GPUs, release build):
//! a whole scrape (connect, request, 15 KB answer, close) takes about 0.14 ms at the client and
//! 0.09 ms of this thread's CPU, 0.009% of one core at 1 scrape/s (the hand-written encoder
//! before: 0.17 ms and 0.13 ms); the copy plus encoding alone is 0.05 ms.
//!
//! Not for: deciding anything, or serving anything but `GET /metrics` (and `/` pointing there).
//! There is no authentication: the address is loopback unless the user binds another one.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
    GaugeValueEncoder, MetricEncoder, prometheus_text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::snapshot::{Board, JobState, KernelState, Snapshot};
use crate::sources::health::{GpuSample, Value};

/// The Content-Type of the text format.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Every family's name starts with this (and `_`).
const PREFIX: &str = "gpuwarden";

/// The snapshot in the exposition format. `now` and `wall` are the moment of the scrape.
///
/// An error is the encoder's own: writing into a `String` does not fail, so it would mean a bug
/// in the encoding, which the endpoint answers with a 500 rather than half a scrape.
pub fn render(snap: Snapshot, now: Instant, wall: SystemTime) -> Result<String, fmt::Error> {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_collector(Box::new(Scrape { snap, now, wall }));
    let mut out = String::with_capacity(8 * 1024);
    prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

/// One scrape: the copy of the snapshot and the moment it is taken at.
#[derive(Debug)]
struct Scrape {
    snap: Snapshot,
    now: Instant,
    wall: SystemTime,
}

/// Starts a family; its samples are then written to the returned encoder.
fn family<'s>(
    enc: &'s mut DescriptorEncoder<'_>,
    name: &'s str,
    kind: MetricType,
    help: &str,
) -> Result<MetricEncoder<'s>, fmt::Error> {
    enc.encode_descriptor(name, help, None, kind)
}

/// A gauge family of one unlabelled sample.
fn gauge(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: impl EncodeGaugeValue,
) -> fmt::Result {
    ConstGauge::new(value).encode(family(enc, name, MetricType::Gauge, help)?)
}

/// A counter family of one unlabelled sample (`_total` is added to `name`).
fn counter(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: impl EncodeCounterValue,
) -> fmt::Result {
    ConstCounter::new(value).encode(family(enc, name, MetricType::Counter, help)?)
}

/// One labelled gauge sample of a family.
fn gauge_sample(
    f: &mut MetricEncoder<'_>,
    labels: &impl EncodeLabelSet,
    value: impl EncodeGaugeValue,
) -> fmt::Result {
    ConstGauge::new(value).encode(f.encode_family(labels)?)
}

/// One of `states`: 1 for the current one, 0 for the others, each a sample labelled `state`.
fn state_set(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    states: &[&str],
    current: &str,
) -> fmt::Result {
    let mut f = family(enc, name, MetricType::Gauge, help)?;
    for s in states {
        gauge_sample(&mut f, &[("state", *s)], u32::from(*s == current))?;
    }
    Ok(())
}

fn secs_since_epoch(t: SystemTime) -> Option<f64> {
    t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs_f64())
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> fmt::Result {
        let snap = &self.snap;
        let job = snap.job.as_ref();
        let running = job.is_some_and(|j| j.state == JobState::Running);
        gauge(
            &mut enc,
            "job_up",
            "1 while an attempt of the supervised job is running, else 0.",
            u32::from(running),
        )?;

        if let Some(job) = job {
            let state = match &job.state {
                JobState::Starting => "starting",
                JobState::Running => "running",
                JobState::Stopping => "stopping",
                JobState::Backoff => "backoff",
                JobState::Finished(_) => "finished",
            };
            state_set(
                &mut enc,
                "job_state",
                "Where the job stands: 1 for the current state, 0 for the others.",
                &["starting", "running", "stopping", "backoff", "finished"],
                state,
            )?;
            family(
                &mut enc,
                "job_tier",
                MetricType::Info,
                "The ladder tier and device of the current (or last) attempt, as labels.",
            )?
            .encode_info(&[("tier", job.tier.as_str()), ("device", job.device.as_str())])?;
            gauge(
                &mut enc,
                "job_attempt",
                "The number of the current (or last) attempt, from 1; 0 before the first.",
                job.attempt,
            )?;
            counter(
                &mut enc,
                "job_restarts",
                "Restarts so far in this run (same tier or a fallback).",
                job.restarts,
            )?;
            gauge(
                &mut enc,
                "job_max_restarts",
                "The restart budget of the run.",
                job.max_restarts,
            )?;
            if let Some(start) = job.started.and_then(secs_since_epoch) {
                gauge(
                    &mut enc,
                    "job_attempt_start_time_seconds",
                    "When the current (or last) attempt started, in seconds since the Unix epoch.",
                    start,
                )?;
            }
            if let Some((_, at)) = &job.last_checkpoint {
                gauge(
                    &mut enc,
                    "last_checkpoint_age_seconds",
                    "Seconds since the newest complete checkpoint was written.",
                    self.wall
                        .duration_since(*at)
                        .unwrap_or_default()
                        .as_secs_f64(),
                )?;
            }
        }

        let mut f = family(
            &mut enc,
            "faults",
            MetricType::Counter,
            "GPU faults seen in this run, by class and source; foreign=\"true\" for faults of other processes or devices (shown, never acted on).",
        )?;
        for ((class, source, foreign), count) in &snap.fault_counts {
            let labels = [
                ("class", class.as_str()),
                ("source", source.as_str()),
                ("foreign", if *foreign { "true" } else { "false" }),
            ];
            ConstCounter::new(*count).encode(f.encode_family(&labels)?)?;
        }

        encode_gpus(&mut enc, snap)?;

        let s = &snap.sources;
        if let Some(age) = snap.sample_age(self.now) {
            gauge(
                &mut enc,
                "health_sample_age_seconds",
                "Seconds since the last GPU health sample; grows when the sampler is stuck (a hung smi tool).",
                age.as_secs_f64(),
            )?;
        }
        let mut f = family(
            &mut enc,
            "health_source",
            MetricType::Info,
            "The GPU health sources in use, as labels.",
        )?;
        for name in &s.health {
            f.encode_info(&[("source", name.as_str())])?;
        }
        counter(
            &mut enc,
            "health_tool_timeouts",
            "GPU tool calls (rocm-smi, nvidia-smi) that ran past their deadline.",
            s.tool_timeouts,
        )?;
        let kernel = match s.kernel {
            KernelState::Off => "off",
            KernelState::Following => "following",
            KernelState::Unavailable(_) => "unavailable",
            KernelState::GaveUp(_) => "gave_up",
        };
        state_set(
            &mut enc,
            "kernel_log_state",
            "The kernel log reader: 1 for its current state, 0 for the others.",
            &["off", "following", "unavailable", "gave_up"],
            kernel,
        )?;
        counter(
            &mut enc,
            "kernel_records_lost",
            "Kernel log records overwritten before gpuwarden read them.",
            s.kernel_lost,
        )?;
        counter(
            &mut enc,
            "foreign_faults_held",
            "Foreign kernel faults counted instead of being reported one by one (a neighbour's flood).",
            s.foreign_held,
        )
    }
}

/// A per-GPU gauge value: sizes as integers, measurements as decimals (`dtoa`'s shortest form,
/// so a whole number is written `64.0`).
#[derive(Clone, Copy, Debug)]
enum Num {
    Int(u64),
    Real(f64),
}

impl EncodeGaugeValue for Num {
    fn encode(&self, e: &mut GaugeValueEncoder<'_>) -> fmt::Result {
        match self {
            Num::Int(n) => EncodeGaugeValue::encode(n, e),
            Num::Real(x) => EncodeGaugeValue::encode(x, e),
        }
    }
}

/// A per-GPU gauge: its name, help, and the value where the sample has one.
type GpuGauge = (&'static str, &'static str, fn(&GpuSample) -> Option<Num>);

/// The per-GPU gauges. A value the source failed to read is left out, not written as 0.
const GPU_GAUGES: [GpuGauge; 7] = [
    (
        "gpu_present",
        "1 while the GPU is there, 0 once it fell off the bus.",
        |s| Some(Num::Int(u64::from(s.present))),
    ),
    ("gpu_utilization_ratio", "GPU busy fraction, 0 to 1.", |s| {
        s.utilization_percent.known().map(|p| Num::Real(p / 100.0))
    }),
    ("gpu_memory_used_bytes", "GPU memory (VRAM) in use.", |s| {
        s.vram_used_bytes.known().map(Num::Int)
    }),
    ("gpu_memory_total_bytes", "GPU memory (VRAM) size.", |s| {
        s.vram_total_bytes.known().map(Num::Int)
    }),
    (
        "gpu_temperature_celsius",
        "GPU temperature, main sensor (AMD edge, NVIDIA temperature.gpu).",
        |s| s.temperature_c.known().map(Num::Real),
    ),
    (
        "gpu_hotspot_temperature_celsius",
        "GPU junction (hotspot) temperature, where the GPU reports one.",
        |s| s.hotspot_c.known().map(Num::Real),
    ),
    ("gpu_power_watts", "GPU power draw.", |s| {
        s.power_w.known().map(Num::Real)
    }),
];

/// The per-GPU families. Every GPU's samples carry `gpu` (the runtime index, or the PCI
/// address when the index is unknown), `pci`, `vendor` and `name`.
fn encode_gpus(enc: &mut DescriptorEncoder<'_>, snap: &Snapshot) -> fmt::Result {
    struct Labels {
        gpu: String,
        pci: String,
        vendor: &'static str,
        name: String,
    }
    impl Labels {
        fn of(s: &GpuSample) -> Labels {
            let d = &s.device;
            Labels {
                gpu: d
                    .index
                    .map(|i| i.to_string())
                    .or_else(|| d.pci.clone())
                    .unwrap_or_default(),
                pci: d.pci.clone().unwrap_or_default(),
                vendor: d.vendor.as_str(),
                name: s.name.clone().unwrap_or_default(),
            }
        }
        fn set(&self) -> [(&'static str, &str); 4] {
            [
                ("gpu", &self.gpu),
                ("pci", &self.pci),
                ("vendor", self.vendor),
                ("name", &self.name),
            ]
        }
    }
    let labels: Vec<Labels> = snap.gpus.iter().map(|g| Labels::of(&g.sample)).collect();

    for (name, help, get) in GPU_GAUGES {
        let mut values = snap
            .gpus
            .iter()
            .zip(&labels)
            .filter_map(|(g, l)| get(&g.sample).map(|v| (l, v)))
            .peekable();
        if values.peek().is_none() {
            continue;
        }
        let mut f = family(enc, name, MetricType::Gauge, help)?;
        for (l, v) in values {
            gauge_sample(&mut f, &l.set(), v)?;
        }
    }
    if let Some(job) = &snap.job
        && !snap.gpus.is_empty()
    {
        let mut f = family(
            enc,
            "gpu_excluded",
            MetricType::Gauge,
            "1 for a GPU hidden from the job for the rest of the run after a fault named it.",
        )?;
        for (g, l) in snap.gpus.iter().zip(&labels) {
            gauge_sample(&mut f, &l.set(), u32::from(job.excludes(&g.sample.device)))?;
        }
    }
    let ecc = || {
        snap.gpus.iter().zip(&labels).flat_map(|(g, l)| {
            g.sample.ecc.iter().flat_map(move |count| {
                [
                    ("correctable", &count.correctable),
                    ("uncorrectable", &count.uncorrectable),
                ]
                .into_iter()
                .filter_map(move |(kind, value)| match value {
                    Value::Known(n) => Some((l, count.block.as_str(), kind, *n)),
                    _ => None,
                })
            })
        })
    };
    if ecc().next().is_some() {
        let mut f = family(
            enc,
            "gpu_ecc_errors",
            MetricType::Counter,
            "GPU memory ECC errors as the driver counts them, by hardware block and kind.",
        )?;
        for (l, block, kind, n) in ecc() {
            let labels = (l.set(), [("block", block), ("kind", kind)]);
            ConstCounter::new(n).encode(f.encode_family(&labels)?)?;
        }
    }
    Ok(())
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
        ("GET" | "HEAD", "/metrics") => {
            match render(board.read(), Instant::now(), SystemTime::now()) {
                Ok(text) => ("200 OK", CONTENT_TYPE, text),
                Err(fmt::Error) => (
                    "500 Internal Server Error",
                    "text/plain; charset=utf-8",
                    "the metrics could not be encoded\n".to_string(),
                ),
            }
        }
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
    use crate::rules::{FaultClass, Severity};
    use crate::snapshot::{FaultNote, JobInfo, sample_gpu};
    use crate::sources::health::EccCount;

    fn snapshot() -> Snapshot {
        let mut s = GpuSample::blank(&sample_gpu());
        // Quotes and a backslash, which label values must escape.
        s.name = Some("AMD Radeon \"RX\" 6800\\x".into());
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
        snap.sources.health = vec!["sysfs".into()];
        snap
    }

    #[test]
    fn families_labels_and_escapes() {
        let text = render(snapshot(), Instant::now(), SystemTime::now()).unwrap();
        assert!(text.contains("gpuwarden_job_up 1\n"), "{text}");
        assert!(text.contains("gpuwarden_job_attempt 2\n"));
        assert!(text.contains("# TYPE gpuwarden_job_restarts_total counter\n"));
        assert!(text.contains("gpuwarden_job_restarts_total 1\n"));
        assert!(text.contains("gpuwarden_job_state{state=\"running\"} 1\n"));
        assert!(text.contains("gpuwarden_job_state{state=\"backoff\"} 0\n"));
        assert!(text.contains("# TYPE gpuwarden_job_tier_info gauge\n"));
        assert!(text.contains("gpuwarden_job_tier_info{tier=\"cpu\",device=\"cpu\"} 1\n"));
        assert!(text.contains("gpuwarden_health_source_info{source=\"sysfs\"} 1\n"));
        assert!(text.contains(
            "gpuwarden_faults_total{class=\"gpu_memory_fault\",source=\"stderr\",foreign=\"false\"} 1\n"
        ));
        assert!(text.contains(
            "gpuwarden_gpu_utilization_ratio{gpu=\"0\",pci=\"0000:03:00.0\",vendor=\"amd\",name=\"AMD Radeon \\\"RX\\\" 6800\\\\x\"} 0.87\n"
        ), "{text}");
        assert!(text.contains("gpuwarden_gpu_temperature_celsius{gpu=\"0\""));
        assert!(text.contains("} 71.5\n"));
        // Sizes stay integers.
        assert!(text.contains("gpuwarden_gpu_memory_used_bytes{gpu=\"0\""));
        assert!(text.contains("} 1073741824\n"));
        assert!(text.contains("gpuwarden_gpu_present{gpu=\"0\""));
        // A value the source failed to read is left out, not written as 0.
        assert!(!text.contains("gpuwarden_gpu_power_watts"));
        assert!(text.contains("gpuwarden_gpu_excluded{gpu=\"0\""));
        assert!(text.contains("block=\"umc\",kind=\"uncorrectable\"} 2\n"));
        assert!(!text.contains("kind=\"correctable\""));
        // The 0.0.4 text format, not OpenMetrics.
        assert!(!text.contains("# EOF"));
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
    fn before_a_job_and_a_sample_only_the_sources_are_shown() {
        let text = render(Snapshot::default(), Instant::now(), SystemTime::now()).unwrap();
        assert!(text.contains("gpuwarden_job_up 0\n"), "{text}");
        assert!(text.contains("gpuwarden_kernel_log_state{state=\"off\"} 1\n"));
        assert!(text.contains("gpuwarden_kernel_records_lost_total 0\n"));
        for absent in [
            "gpuwarden_job_state",
            "gpuwarden_job_tier_info",
            "gpuwarden_gpu_",
            "gpuwarden_health_sample_age_seconds",
            "gpuwarden_last_checkpoint_age_seconds",
        ] {
            assert!(!text.contains(absent), "{absent} in:\n{text}");
        }
    }

    #[test]
    fn checkpoint_age_is_taken_at_the_scrape() {
        let mut snap = snapshot();
        let written = SystemTime::now();
        if let Some(job) = snap.job.as_mut() {
            job.last_checkpoint = Some(("ckpt".into(), written));
        }
        let text = render(snap, Instant::now(), written + Duration::from_millis(2500)).unwrap();
        assert!(
            text.contains("gpuwarden_last_checkpoint_age_seconds 2.5\n"),
            "{text}"
        );
    }
}
