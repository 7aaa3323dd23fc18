//! Collection for `gpuwarden watch`: the health sampler and the kernel-log follower, each on its
//! own thread, write into a [`Board`]; the drawing thread only ever reads copies of it.
//!
//! During `gpuwarden run` the executor fills the board instead (it also judges whose fault a
//! kernel record is); here there is no job, so every classified record is simply shown.
//! [`one_reading`] is `watch --once`: one sample of every source, then stop.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use crate::rules::{Fault, RuleSet, Stream};
use crate::snapshot::{Board, FaultNote, GpuState, KernelState, Snapshot};
use crate::sources::health::{
    self, DeviceRef, GpuSample, HealthConfig, HealthEvent, HealthSource, SourceKind,
};
use crate::sources::kernel::{self, FollowConfig, Follower, KernelEvent, KernelSource};

/// Two reports of the same rule and line this close together are one storm entry with a count.
const STORM_WINDOW: Duration = Duration::from_secs(10);

/// The running collectors; dropping it stops them.
#[derive(Debug)]
pub struct Collector {
    health: Option<HealthSource>,
    kernel: Option<Follower>,
    pump: Option<JoinHandle<()>>,
    processes: Option<ProcessPoller>,
}

impl Collector {
    /// Stops every collector and waits for its thread.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.processes.take();
        if let Some(h) = self.health.take() {
            h.stop();
        }
        // The follower holds the pump's sender: once it is gone the pump's loop ends.
        if let Some(k) = self.kernel.take() {
            k.stop();
        }
        if let Some(pump) = self.pump.take() {
            let _ = pump.join();
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Starts sampling GPU health (when `health` is given) and following the kernel log (when
/// `kernel` is given) into `board`.
pub fn start(
    board: &Board,
    health: Option<HealthConfig>,
    kernel: Option<KernelSource>,
    rules: Arc<RuleSet>,
) -> io::Result<Collector> {
    let mut collector = Collector {
        health: None,
        kernel: None,
        pump: None,
        processes: None,
    };
    if let Some(config) = health {
        collector.processes = Some(ProcessPoller::spawn(
            board,
            &config.sysfs_root,
            config.interval.max(Duration::from_secs(1)),
        )?);
        let board = board.clone();
        collector.health = Some(health::spawn(config, move |event| {
            board.update(|s| health_event(s, event, Instant::now()));
            std::ops::ControlFlow::Continue(())
        })?);
    }
    if let Some(source) = kernel {
        rules.prepare(&[Stream::Kernel]);
        let (tx, rx) = mpsc::sync_channel::<KernelEvent<Fault>>(256);
        let classify = move |record: crate::sources::kmsg::Record| {
            rules.classify(Stream::Kernel, &record.text())
        };
        collector.kernel = Some(kernel::follow(
            FollowConfig::new(source),
            classify,
            tx,
            |e| e,
        )?);
        board.update(|s| s.sources.kernel = KernelState::Following);
        let board = board.clone();
        collector.pump = Some(thread::Builder::new().name("watch-kernel".into()).spawn(
            move || {
                for event in rx {
                    board.update(|s| kernel_event(s, event, SystemTime::now()));
                }
            },
        )?);
    }
    Ok(collector)
}

/// Applies one health event to the snapshot.
pub fn health_event(snap: &mut Snapshot, event: HealthEvent, now: Instant) {
    match event {
        HealthEvent::Started { sources, gpus } => {
            snap.sources.health = sources.iter().map(|s| s.as_str().to_string()).collect();
            // The GPUs are listed before their first sample comes.
            for gpu in &gpus {
                let sample = GpuSample::blank(gpu);
                if !snap.gpus.iter().any(|g| g.sample.device == sample.device) {
                    snap.gpus.push(GpuState {
                        sample,
                        at: now,
                        history: Default::default(),
                        processes: Vec::new(),
                    });
                }
            }
        }
        HealthEvent::Unavailable { reason } => snap.sources.last_note = Some(reason),
        HealthEvent::Sample { at, gpus, .. } => snap.add_sample(&gpus, at),
        HealthEvent::Note { source, message } => {
            if message.contains("timed out") || message.contains("did not answer") {
                snap.sources.tool_timeouts += 1;
            }
            snap.sources.last_note = Some(format!("{}: {message}", source.as_str()));
        }
        HealthEvent::Fault(found) => {
            let fault = found.to_fault();
            add_fault(snap, &fault, "health", SystemTime::now());
        }
    }
}

/// Applies one kernel-log event to the snapshot.
pub fn kernel_event(snap: &mut Snapshot, event: KernelEvent<Fault>, now: SystemTime) {
    match event {
        KernelEvent::Record(fault) => add_fault(snap, &fault, "kernel", now),
        KernelEvent::Lost { records } => snap.sources.kernel_lost += records.unwrap_or(1),
        KernelEvent::Dropped { records } => snap.sources.kernel_lost += records,
        KernelEvent::Malformed { .. } | KernelEvent::Restarted { .. } => {}
        KernelEvent::Unavailable { reason } => {
            snap.sources.kernel = KernelState::Unavailable(reason);
        }
        KernelEvent::GaveUp { error } => snap.sources.kernel = KernelState::GaveUp(error),
    }
}

/// Shows a fault; the same rule and line again within [`STORM_WINDOW`] counts on the last entry
/// instead of pushing the feed away.
fn add_fault(snap: &mut Snapshot, fault: &Fault, source: &str, now: SystemTime) {
    if let Some(last) = snap.faults.back_mut()
        && last.rule == fault.rule
        && last.line == fault.line
        && now.duration_since(last.at).is_ok_and(|d| d <= STORM_WINDOW)
    {
        last.count += 1;
        last.at = now;
        let key = (fault.class.to_string(), source.to_string(), true);
        *snap.fault_counts.entry(key).or_insert(0) += 1;
        return;
    }
    snap.add_fault(FaultNote {
        at: now,
        class: fault.class,
        rule: fault.rule.clone(),
        severity: fault.severity,
        source: source.to_string(),
        line: fault.line.clone(),
        attempt: None,
        reason: None,
        count: 1,
    });
}

/// What `watch --once` prints: one sample of every GPU, and what the sources said.
#[derive(Debug, Default)]
pub struct OneReading {
    pub sources: Vec<SourceKind>,
    pub gpus: Vec<GpuSample>,
    /// Notes of the sources (a tool that failed, no GPU found).
    pub notes: Vec<String>,
}

/// Takes one reading of every health source and stops. Waits at most `deadline` (a hung tool is
/// reported in the notes, not waited for).
pub fn one_reading(config: HealthConfig, deadline: Duration) -> io::Result<OneReading> {
    let (tx, rx) = mpsc::sync_channel(64);
    let source = health::spawn(config, health::channel_sink(tx, |e| e))?;
    let end = Instant::now() + deadline;
    let mut reading = OneReading::default();
    let mut started = false;
    let mut answered = 0;
    loop {
        // The first round's events come in one burst right after `Started`.
        let wait = if started {
            Duration::from_millis(200)
        } else {
            end.saturating_duration_since(Instant::now())
        };
        let event = match rx.recv_timeout(wait) {
            Ok(event) => event,
            Err(mpsc::RecvTimeoutError::Timeout) if !started => {
                reading.notes.push(format!(
                    "no health source answered within {:.0} s",
                    deadline.as_secs_f64()
                ));
                break;
            }
            Err(_) => break,
        };
        match event {
            HealthEvent::Started { sources, gpus } => {
                started = true;
                reading.sources = sources;
                for gpu in &gpus {
                    reading.gpus.push(GpuSample::blank(gpu));
                }
            }
            HealthEvent::Unavailable { reason } => {
                reading.notes.push(reason);
                break;
            }
            HealthEvent::Sample { gpus, .. } => {
                answered += 1;
                for sample in gpus {
                    match reading.gpus.iter_mut().find(|g| g.device == sample.device) {
                        Some(slot) => *slot = sample,
                        None => reading.gpus.push(sample),
                    }
                }
                if started && answered >= reading.sources.len() {
                    break;
                }
            }
            HealthEvent::Note { source, message } => {
                reading
                    .notes
                    .push(format!("{}: {message}", source.as_str()));
            }
            HealthEvent::Fault(found) => reading.notes.push(found.to_string()),
        }
    }
    source.stop();
    reading
        .gpus
        .sort_by_key(|g| (g.device.vendor as u8, g.device.index));
    Ok(reading)
}

/// Reads which processes hold VRAM on which AMD GPU, from KFD
/// (`<sysfs>/class/kfd/kfd/proc/<pid>/vram_<gpu_id>`), into the board's GPU rows; stops when
/// dropped. DRM fdinfo would miss ROCm's compute queues; KFD sees them. NVIDIA's processes
/// come with NVML's samples instead (`GpuSample::processes`).
#[derive(Debug)]
pub struct ProcessPoller {
    stop: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl ProcessPoller {
    pub fn spawn(board: &Board, sysfs_root: &Path, every: Duration) -> io::Result<ProcessPoller> {
        let stop: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)> = Arc::default();
        let (flag, board, root) = (Arc::clone(&stop), board.clone(), sysfs_root.to_path_buf());
        let thread = thread::Builder::new()
            .name("kfd-processes".into())
            .spawn(move || {
                // KFD node -> gpu_id, once: the topology does not change under a running driver.
                let (gpus, _) = crate::probe::inventory(&root, Path::new("/"));
                let ids: Vec<(DeviceRef, String)> = gpus
                    .iter()
                    .filter_map(|g| {
                        let node = g.kfd_node?;
                        let path = root.join(format!("class/kfd/kfd/topology/nodes/{node}/gpu_id"));
                        let id = std::fs::read_to_string(path).ok()?.trim().to_string();
                        Some((DeviceRef::of(g), id))
                    })
                    .collect();
                if ids.is_empty() {
                    return;
                }
                let procs = root.join("class/kfd/kfd/proc");
                let (lock, wake) = &*flag;
                let mut stopped = lock
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                while !*stopped {
                    let found = health::amd_sysfs::kfd_processes(&procs, &ids);
                    board.update(|s| {
                        // NVIDIA's come with their samples (NVML).
                        let amd = s
                            .gpus
                            .iter_mut()
                            .filter(|g| g.sample.device.vendor == crate::gpu::Vendor::Amd);
                        for gpu in amd {
                            gpu.processes = found
                                .iter()
                                .filter(|(d, _)| *d == gpu.sample.device)
                                .map(|(_, p)| p.clone())
                                .collect();
                        }
                    });
                    stopped = wake
                        .wait_timeout(stopped, every)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                }
            })?;
        Ok(ProcessPoller {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ProcessPoller {
    fn drop(&mut self) {
        let (lock, wake) = &*self.stop;
        *lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
