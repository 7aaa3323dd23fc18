//! What views read: the run's state as of now, published by the executor (or by `watch`) and
//! taken by the live display, the metrics endpoint, the notifier and the report.
//!
//! The executor owns the truth and writes it here as it changes: the latest health sample of
//! every GPU with a short history, the job (command, tier, attempt, pid, restarts and budget,
//! last checkpoint), recent faults including foreign ones, and the sources' own health (kernel
//! log followed or not, age of the last sample, tool timeouts). A reader takes a copy with
//! [`Board::read`]: the lock is held for the copy only, never while a view draws or a scrape is
//! written, so a slow reader cannot stall the event loop.
//!
//! It is not for decisions (the supervisor's) nor for the record of the run (the journal).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use crate::rules::{FaultClass, Severity};
use crate::sources::health::GpuSample;

/// Samples of history kept per GPU (60 s at the default 1 s interval).
pub const HISTORY: usize = 60;

/// Recent faults kept for views.
pub const RECENT_FAULTS: usize = 200;

/// One point of a GPU's history.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Point {
    pub utilization_percent: Option<f64>,
    pub vram_used_bytes: Option<u64>,
    pub temperature_c: Option<f64>,
    pub power_w: Option<f64>,
}

impl Point {
    pub fn of(sample: &GpuSample) -> Point {
        Point {
            utilization_percent: sample.utilization_percent.known(),
            vram_used_bytes: sample.vram_used_bytes.known(),
            temperature_c: sample.temperature_c.known(),
            power_w: sample.power_w.known(),
        }
    }
}

/// A GPU as views show it: its latest sample and the recent history.
#[derive(Clone, Debug)]
pub struct GpuState {
    pub sample: GpuSample,
    /// When `sample` was taken.
    pub at: Instant,
    /// Oldest first, at most [`HISTORY`] points.
    pub history: VecDeque<Point>,
    /// The processes using it and their VRAM (KFD on AMD, NVML on NVIDIA), for the live display.
    pub processes: Vec<GpuProcess>,
}

/// A process holding memory on a GPU (defined with the health readers that find them).
pub use crate::sources::health::GpuProcess;

/// Where the job stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum JobState {
    /// Not started yet.
    #[default]
    Starting,
    Running,
    /// A fault or a signal: the job is being stopped.
    Stopping,
    /// Waiting out the backoff before the next attempt.
    Backoff,
    /// The run is over; the text is its outcome.
    Finished(String),
}

/// The supervised job, for `run` (absent for `watch`).
#[derive(Clone, Debug, Default)]
pub struct JobInfo {
    /// The command as the user gave it.
    pub command: Vec<String>,
    pub state: JobState,
    pub attempt: u32,
    pub tier: String,
    pub device: String,
    /// The attempt's process group leader.
    pub pid: Option<u32>,
    /// When the attempt started.
    pub started: Option<SystemTime>,
    pub restarts: u32,
    pub max_restarts: u32,
    /// What the attempt resumed from.
    pub resumed_from: Option<PathBuf>,
    /// The GPUs the attempt sees, in its ordinal order.
    pub gpus: Vec<crate::gpu::JobGpu>,
    /// GPUs excluded after a fault: hidden from the job for the rest of the run.
    pub excluded: Vec<crate::gpu::JobGpu>,
    /// The newest complete checkpoint seen, and when it was written.
    pub last_checkpoint: Option<(PathBuf, SystemTime)>,
    pub run_dir: PathBuf,
}

impl JobInfo {
    /// Whether the GPU a health sample is about was excluded from the job after a fault
    /// (matched by PCI address, else by vendor and index).
    pub fn excludes(&self, device: &crate::sources::health::DeviceRef) -> bool {
        self.excluded.iter().any(|g| {
            g.vendor == device.vendor
                && match (&g.pci, &device.pci) {
                    (Some(a), Some(b)) => {
                        crate::gpu::PciAddress::parse(a).map(crate::gpu::PciAddress::slot)
                            == crate::gpu::PciAddress::parse(b).map(crate::gpu::PciAddress::slot)
                    }
                    _ => device.index == Some(g.index),
                }
        })
    }
}

/// A fault as views list it.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultNote {
    pub at: SystemTime,
    pub class: FaultClass,
    pub rule: String,
    pub severity: Severity,
    /// `stdout`, `stderr`, `kernel`, `tool`.
    pub source: String,
    pub line: String,
    /// The attempt it was acted on in; `None` for a foreign fault.
    pub attempt: Option<u32>,
    /// Why it was not acted on (foreign faults).
    pub reason: Option<String>,
    /// How many times it was seen (a storm, or foreign repeats counted in a window).
    pub count: u64,
}

/// The kernel log reader as views show it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum KernelState {
    /// Not followed (`--no-kernel-log`, or no run).
    #[default]
    Off,
    Following,
    /// Cannot be read (the reason says why: permission, no device).
    Unavailable(String),
    /// The reader failed too often and stopped.
    GaveUp(String),
}

/// The sources' own health.
#[derive(Clone, Debug, Default)]
pub struct SourceState {
    pub kernel: KernelState,
    /// Kernel records overwritten before they were read.
    pub kernel_lost: u64,
    /// Foreign kernel faults counted instead of reported one by one.
    pub foreign_held: u64,
    /// The health sources in use (`sysfs`, `nvidia-smi`, ...); empty when none.
    pub health: Vec<String>,
    /// When the last health sample came.
    pub last_sample: Option<Instant>,
    /// Tool calls that ran past their deadline.
    pub tool_timeouts: u64,
    /// The latest trouble a health source reported.
    pub last_note: Option<String>,
}

/// Everything a view reads. See the module documentation.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub job: Option<JobInfo>,
    pub gpus: Vec<GpuState>,
    /// Newest last, at most [`RECENT_FAULTS`].
    pub faults: VecDeque<FaultNote>,
    pub sources: SourceState,
    /// Faults by (class, source, foreign), for the whole run.
    pub fault_counts: std::collections::BTreeMap<(String, String, bool), u64>,
    /// The tail of the job's output for `run --ui`: `(stderr, line)`, newest last, at most
    /// [`OUTPUT_TAIL`]. Empty unless the display asked for it (`Board::keep_output`).
    pub output: VecDeque<(bool, String)>,
}

impl Snapshot {
    /// Takes one health reading: updates each GPU's latest sample and history.
    pub fn add_sample(&mut self, gpus: &[GpuSample], at: Instant) {
        for sample in gpus {
            let point = Point::of(sample);
            match self
                .gpus
                .iter_mut()
                .find(|g| g.sample.device == sample.device)
            {
                Some(state) => {
                    // Only a source that lists processes replaces them (KFD's are polled apart).
                    if let Some(list) = &sample.processes {
                        state.processes.clone_from(list);
                    }
                    state.sample = sample.clone();
                    state.at = at;
                    if state.history.len() == HISTORY {
                        state.history.pop_front();
                    }
                    state.history.push_back(point);
                }
                None => self.gpus.push(GpuState {
                    sample: sample.clone(),
                    at,
                    history: VecDeque::from([point]),
                    processes: sample.processes.clone().unwrap_or_default(),
                }),
            }
        }
        self.sources.last_sample = Some(at);
    }

    /// Adds a fault to the recent list and the counts.
    pub fn add_fault(&mut self, note: FaultNote) {
        *self
            .fault_counts
            .entry((
                note.class.to_string(),
                note.source.clone(),
                note.attempt.is_none(),
            ))
            .or_insert(0) += note.count.max(1);
        if self.faults.len() == RECENT_FAULTS {
            self.faults.pop_front();
        }
        self.faults.push_back(note);
    }

    /// Age of the last health sample at `now`.
    pub fn sample_age(&self, now: Instant) -> Option<Duration> {
        self.sources
            .last_sample
            .map(|at| now.saturating_duration_since(at))
    }
}

/// Lines of the job's output kept for the display.
pub const OUTPUT_TAIL: usize = 500;

impl Snapshot {
    /// Adds a line of the job's output to the tail (lossy text; the log keeps the bytes).
    pub fn add_output(&mut self, stderr: bool, line: &[u8]) {
        if self.output.len() == OUTPUT_TAIL {
            self.output.pop_front();
        }
        self.output
            .push_back((stderr, String::from_utf8_lossy(line).into_owned()));
    }
}

/// The shared snapshot: one writer (the executor or `watch`'s collector), any number of readers.
#[derive(Clone, Debug, Default)]
pub struct Board(Arc<Mutex<Snapshot>>);

impl Board {
    pub fn new() -> Board {
        Board::default()
    }

    /// A copy of the state as of now.
    pub fn read(&self) -> Snapshot {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Changes the state. Keep `change` short: readers wait for it.
    pub fn update<R>(&self, change: impl FnOnce(&mut Snapshot) -> R) -> R {
        change(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// The GPU the tests of views put on the board: GPU 0, an RX 6800 at `0000:03:00.0`, with
/// nothing else known. Shared by this module's tests and `metrics`'.
#[cfg(test)]
pub(crate) fn sample_gpu() -> crate::gpu::Gpu {
    crate::gpu::Gpu::for_test(
        crate::gpu::Vendor::Amd,
        0,
        "AMD Radeon RX 6800",
        "0000:03:00.0",
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sources::health::Value;

    fn sample(util: f64) -> GpuSample {
        let mut s = GpuSample::blank(&sample_gpu());
        s.utilization_percent = Value::Known(util);
        s
    }

    #[test]
    fn history_is_bounded_and_newest_last() {
        let mut snap = Snapshot::default();
        let t0 = Instant::now();
        for i in 0..(HISTORY + 10) {
            snap.add_sample(&[sample(i as f64)], t0 + Duration::from_secs(i as u64));
        }
        assert_eq!(snap.gpus.len(), 1);
        let h = &snap.gpus[0].history;
        assert_eq!(h.len(), HISTORY);
        assert_eq!(
            h.back().unwrap().utilization_percent,
            Some((HISTORY + 9) as f64)
        );
        assert_eq!(h.front().unwrap().utilization_percent, Some(10.0));
        assert_eq!(
            snap.sample_age(t0 + Duration::from_secs(100)),
            Some(Duration::from_secs(31))
        );
    }

    #[test]
    fn recent_faults_are_bounded_and_counted_by_class_and_source() {
        let mut snap = Snapshot::default();
        for i in 0..(RECENT_FAULTS + 5) {
            snap.add_fault(FaultNote {
                at: SystemTime::now(),
                class: FaultClass::GpuMemoryFault,
                rule: format!("r{i}"),
                severity: Severity::Critical,
                source: "kernel".into(),
                line: String::new(),
                attempt: None,
                reason: Some("not ours".into()),
                count: 2,
            });
        }
        assert_eq!(snap.faults.len(), RECENT_FAULTS);
        assert_eq!(
            snap.faults.back().unwrap().rule,
            format!("r{}", RECENT_FAULTS + 4)
        );
        let key = ("gpu_memory_fault".to_string(), "kernel".to_string(), true);
        assert_eq!(snap.fault_counts[&key], 2 * (RECENT_FAULTS as u64 + 5));
    }

    #[test]
    fn a_reader_gets_a_copy_that_later_writes_do_not_change() {
        let board = Board::new();
        board.update(|s| s.add_sample(&[sample(10.0)], Instant::now()));
        let copy = board.read();
        board.update(|s| s.add_sample(&[sample(90.0)], Instant::now()));
        assert_eq!(copy.gpus[0].sample.utilization_percent, Value::Known(10.0));
        assert_eq!(
            board.read().gpus[0].sample.utilization_percent,
            Value::Known(90.0)
        );
    }
}
