//! The health source's thread: finds what can be read on this machine, then samples it on a
//! fixed period and hands [`HealthEvent`]s to a sink until asked to stop.
//!
//! Which readers run:
//! - amdgpu sysfs, when `--sysfs-root` (default `/sys`) shows AMD GPUs: every `interval`.
//! - NVML, when either no AMD GPU was found or sysfs lists an NVIDIA display device, and
//!   `libnvidia-ml.so.1` loads and starts: every `interval`.
//! - else nvidia-smi, on the same condition, when it is on PATH (an old nvidia-smi left on an
//!   AMD machine must not report "no driver" as a GPU fault): every `interval`. A library that
//!   loaded but did not start is said once, in a note of its first reading.
//! - amd-smi, else rocm-smi, when the amdgpu driver is loaded (`module/amdgpu`) but sysfs
//!   showed no AMD GPU, and one of them is on PATH: every `amd_tool_interval`, since they take
//!   up to seconds a call.
//! - none of these: one [`HealthEvent::Unavailable`], and the thread ends.
//!
//! The sink is a closure, so the caller chooses a channel (see [`channel_sink`]) or anything
//! else; it returns `ControlFlow::Break` when nobody listens any more, which ends the thread.
//! [`HealthSource::stop`] is prompt: the thread waits on a condition variable between samples
//! and checks the flag every 20 ms while a tool runs (killing the tool).
//!
//! Not here: parsing (the reader modules), fault logic (`tracker`), what faults mean (the
//! supervisor).

use std::collections::HashSet;
use std::ffi::OsString;
use std::ops::ControlFlow;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::amd_sysfs::{AMDGPU_IDS_PATHS, AmdSysfs};
use super::tool::{ToolOutcome, ToolRunner};
use super::{
    HealthEvent, HealthFaultKind, Problem, Reading, SourceKind, amd_smi, nvidia, nvml, rocm_smi,
};
use crate::gpu::Gpu;
use crate::rules::FaultClass;
use crate::sources::handle::{Handle, Patience};

/// How the health source runs. `Default` is what gpuwarden uses without flags.
#[derive(Clone, Debug)]
pub struct HealthConfig {
    /// Sampling period of sysfs and nvidia-smi (1 s).
    pub interval: Duration,
    /// Sampling period of amd-smi and rocm-smi, which take seconds a call (10 s).
    pub amd_tool_interval: Duration,
    /// Where sysfs is (`/sys`); a simulated tree in tests.
    pub sysfs_root: PathBuf,
    /// The `amdgpu.ids` marketing-name tables to try.
    pub amdgpu_ids: Vec<PathBuf>,
    /// The longest one tool call may take before it is killed and reported as hung (10 s).
    pub tool_timeout: Duration,
    /// How long a GPU must stay silent or keep reporting errors before it is a fault (3 s).
    pub confirm_after: Duration,
    /// The tools, by name (looked up on `search_path`) or by path.
    pub nvidia_smi: PathBuf,
    /// The NVML library to try before nvidia-smi (`libnvidia-ml.so.1`); `None` skips NVML.
    /// By default what `GPUWARDEN_NVML` says (`off`, or a path).
    pub nvml: Option<OsString>,
    pub amd_smi: PathBuf,
    pub rocm_smi: PathBuf,
    /// The directories to look for tools in; `None` is the process's `PATH`.
    pub search_path: Option<OsString>,
}

impl Default for HealthConfig {
    fn default() -> HealthConfig {
        HealthConfig {
            interval: Duration::from_secs(1),
            amd_tool_interval: Duration::from_secs(10),
            sysfs_root: PathBuf::from("/sys"),
            amdgpu_ids: AMDGPU_IDS_PATHS.iter().map(PathBuf::from).collect(),
            tool_timeout: Duration::from_secs(10),
            confirm_after: Duration::from_secs(3),
            nvidia_smi: PathBuf::from("nvidia-smi"),
            nvml: nvml::library_from_env(),
            amd_smi: PathBuf::from("amd-smi"),
            rocm_smi: PathBuf::from("rocm-smi"),
            search_path: None,
        }
    }
}

/// The running health source. Dropping it stops it too.
pub type HealthSource = Handle;

/// How long [`Handle::stop`] waits for the thread. A sysfs read of a wedged GPU can block in
/// the kernel; past this the thread is left to finish on its own rather than hang gpuwarden.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// Starts the health thread. `sink` gets every event; returning `ControlFlow::Break` ends the
/// thread.
pub fn spawn<F>(config: HealthConfig, sink: F) -> std::io::Result<HealthSource>
where
    F: FnMut(HealthEvent) -> ControlFlow<()> + Send + 'static,
{
    let flag = StopFlag::default();
    let inner = flag.clone();
    Handle::spawn(
        "gpu-health",
        Some(Box::new(move || flag.set())),
        Patience::AtMost(STOP_WAIT),
        move || run(&config, &inner, sink),
    )
}

/// A sink that sends every event into a channel, wrapped into the caller's event type. `send`
/// blocks while the channel is full, so faults are never dropped; it breaks when the receiver
/// is gone.
pub fn channel_sink<T: Send + 'static>(
    tx: SyncSender<T>,
    wrap: fn(HealthEvent) -> T,
) -> impl FnMut(HealthEvent) -> ControlFlow<()> + Send + 'static {
    move |event| match tx.send(wrap(event)) {
        Ok(()) => ControlFlow::Continue(()),
        Err(_) => ControlFlow::Break(()),
    }
}

/// The stop request shared by the owner and the thread; the sampler sleeps on it.
#[derive(Clone, Debug, Default)]
struct StopFlag(Arc<(Mutex<Flags>, Condvar)>);

#[derive(Debug, Default)]
struct Flags {
    stop: bool,
}

impl StopFlag {
    fn set(&self) {
        let (lock, cvar) = &*self.0;
        lock.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        cvar.notify_all();
    }

    fn is_set(&self) -> bool {
        self.0.0.lock().unwrap_or_else(|e| e.into_inner()).stop
    }

    /// Waits up to `d` or until stop is asked; true when it was.
    fn wait(&self, d: Duration) -> bool {
        let (lock, cvar) = &*self.0;
        let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = cvar
            .wait_timeout_while(guard, d, |f| !f.stop)
            .unwrap_or_else(|e| e.into_inner());
        guard.stop
    }
}

/// Distinct notes said at most, so a tool that prints a different odd line every call cannot
/// grow the set (or the journal) without bound.
const MAX_NOTES: usize = 64;

/// One reader and when it is due.
struct Backend {
    reader: Reader,
    tracker: super::Tracker,
    period: Duration,
    due: Instant,
}

enum Reader {
    Sysfs(AmdSysfs),
    /// Boxed: NVML's table of library functions is some 12 KiB.
    Nvml(Box<nvml::NvmlReader>),
    /// With why NVML is not used instead, when that is worth saying (said once).
    Nvidia(ToolRunner, Option<String>),
    RocmSmi(ToolRunner),
    /// The inventory from `amd-smi list`, read at the first call.
    AmdSmi(ToolRunner, Option<Vec<Gpu>>),
}

impl Reader {
    fn source(&self) -> SourceKind {
        match self {
            Reader::Sysfs(_) => SourceKind::AmdSysfs,
            Reader::Nvml(_) => SourceKind::Nvml,
            Reader::Nvidia(..) => SourceKind::NvidiaSmi,
            Reader::RocmSmi(_) => SourceKind::RocmSmi,
            Reader::AmdSmi(..) => SourceKind::AmdSmi,
        }
    }

    /// One reading and the inventory it shows; `None` when stop was asked meanwhile.
    fn read(&mut self, stop: &StopFlag) -> Option<(Vec<Gpu>, Reading)> {
        match self {
            Reader::Sysfs(amd) => Some((amd.gpus(), amd.sample())),
            Reader::Nvml(reader) => {
                let o = reader.read();
                Some((o.gpus, o.reading))
            }
            Reader::Nvidia(runner, why_not_nvml) => {
                let args = nvidia::query_args();
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let mut read = call(runner, SourceKind::NvidiaSmi, &args, stop, |out, err| {
                    let o = nvidia::parse_query(out, err);
                    (o.gpus, o.reading)
                });
                if let (Some((_, reading)), Some(why)) = (&mut read, why_not_nvml.take()) {
                    reading.notes.push(why);
                }
                read
            }
            Reader::RocmSmi(runner) => call(
                runner,
                SourceKind::RocmSmi,
                &rocm_smi::SAMPLE_ARGS,
                stop,
                |out, _| {
                    let o = rocm_smi::parse_json(out);
                    (o.gpus, o.reading)
                },
            ),
            Reader::AmdSmi(runner, known) => {
                if known.is_none() {
                    let (list, listing) = call(
                        runner,
                        SourceKind::AmdSmi,
                        &amd_smi::LIST_ARGS,
                        stop,
                        |out, _| (amd_smi::parse_list(out), Reading::new(SourceKind::AmdSmi)),
                    )?;
                    // A listing that hung is this round's reading; the list is asked again
                    // next time rather than sampling without PCI addresses for good.
                    if !listing.problems.is_empty() {
                        return Some((Vec::new(), listing));
                    }
                    *known = Some(list);
                }
                let known = known.as_deref().unwrap_or_default();
                call(
                    runner,
                    SourceKind::AmdSmi,
                    &amd_smi::METRIC_ARGS,
                    stop,
                    |out, _| {
                        let o = amd_smi::parse_metric(out, known);
                        (o.gpus, o.reading)
                    },
                )
            }
        }
    }
}

/// Runs a tool once and turns whatever happened into a reading: its output parsed, or a hang
/// (a `gpu_unavailable` problem), or a note when it could not be run.
fn call(
    runner: &mut ToolRunner,
    source: SourceKind,
    args: &[&str],
    stop: &StopFlag,
    parse: impl FnOnce(&str, &str) -> (Vec<Gpu>, Reading),
) -> Option<(Vec<Gpu>, Reading)> {
    let name = runner.program().file_name().map_or_else(
        || source.as_str().to_owned(),
        |n| n.to_string_lossy().into_owned(),
    );
    let mut silent = Reading::new(source);
    silent.answered = false;
    let hung = |message: String| Problem {
        class: FaultClass::GpuUnavailable,
        kind: HealthFaultKind::ToolHung,
        pci: None,
        message,
    };
    match runner.run(args, &|| stop.is_set()) {
        ToolOutcome::Finished {
            code,
            stdout,
            stderr,
            ..
        } => {
            let (gpus, mut reading) = parse(
                &String::from_utf8_lossy(&stdout),
                &String::from_utf8_lossy(&stderr),
            );
            if !reading.answered && reading.problems.is_empty() && code != Some(0) {
                let said = String::from_utf8_lossy(&stderr)
                    .lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty())
                    .map(|l| format!(": {l}"))
                    .unwrap_or_default();
                let code = code.map_or_else(|| "a signal".to_owned(), |c| format!("code {c}"));
                reading
                    .notes
                    .push(format!("{name} exited with {code}{said}"));
            }
            Some((gpus, reading))
        }
        ToolOutcome::TimedOut { took } => {
            silent.problems.push(hung(format!(
                "{name} did not answer within {:.1} s and was killed: the GPU driver is probably stuck",
                took.as_secs_f64()
            )));
            Some((Vec::new(), silent))
        }
        ToolOutcome::StillHung { since } => {
            silent.problems.push(hung(format!(
                "{name} has been stuck in the driver for {:.0} s and cannot be killed",
                since.elapsed().as_secs_f64()
            )));
            Some((Vec::new(), silent))
        }
        ToolOutcome::Stopped => None,
        ToolOutcome::SpawnFailed(e) => {
            silent
                .notes
                .push(format!("could not run {}: {e}", runner.program().display()));
            Some((Vec::new(), silent))
        }
    }
}

/// The thread: choose readers, first round, `Started`, then sample until stopped.
fn run<F>(config: &HealthConfig, stop: &StopFlag, mut sink: F)
where
    F: FnMut(HealthEvent) -> ControlFlow<()>,
{
    let mut backends = choose(config);
    if backends.is_empty() {
        let _ = sink(HealthEvent::Unavailable {
            reason: format!(
                "no AMD GPU under {root}/class/drm and {root}/class/kfd, and no {} on PATH: \
                 GPU health is not watched",
                config.nvidia_smi.display(),
                root = config.sysfs_root.display(),
            ),
        });
        return;
    }
    let mut said = HashSet::new();
    let mut first = true;
    loop {
        let now = Instant::now();
        let mut events = Vec::new();
        let mut inventory = Vec::new();
        for b in &mut backends {
            if !first && b.due > now {
                continue;
            }
            let Some((gpus, reading)) = b.reader.read(stop) else {
                return;
            };
            let at = Instant::now();
            b.due = (b.due + b.period).max(at);
            if first {
                inventory.extend(gpus);
            }
            for message in &reading.notes {
                // Each note once; a tool printing something new every time is cut off.
                if said.len() < MAX_NOTES && said.insert((reading.source, message.clone())) {
                    events.push(HealthEvent::Note {
                        source: reading.source,
                        message: message.clone(),
                    });
                }
            }
            let faults = b.tracker.observe(at, &reading);
            if reading.answered {
                events.push(HealthEvent::Sample {
                    at,
                    source: reading.source,
                    gpus: reading.gpus,
                });
            }
            events.extend(faults.into_iter().map(HealthEvent::Fault));
        }
        if first {
            first = false;
            let started = HealthEvent::Started {
                sources: backends.iter().map(|b| b.reader.source()).collect(),
                gpus: inventory,
            };
            if sink(started).is_break() {
                return;
            }
        }
        for event in events {
            if sink(event).is_break() {
                return;
            }
        }
        let next = backends
            .iter()
            .map(|b| b.due)
            .min()
            .unwrap_or(now + config.interval);
        if stop.wait(next.saturating_duration_since(Instant::now())) {
            return;
        }
    }
}

/// The readers this machine has, per the rules in the module doc.
fn choose(config: &HealthConfig) -> Vec<Backend> {
    let now = Instant::now();
    let backend = |reader: Reader, period: Duration| Backend {
        reader,
        tracker: super::Tracker::new(config.confirm_after),
        period,
        due: now,
    };
    let mut out = Vec::new();
    let amd = AmdSysfs::discover(&config.sysfs_root, &config.amdgpu_ids);
    let amd_found = !amd.is_empty();
    if amd_found {
        out.push(backend(Reader::Sysfs(amd), config.interval));
    }
    let path = config
        .search_path
        .clone()
        .or_else(|| std::env::var_os("PATH"))
        .unwrap_or_default();
    let runner = |p: PathBuf| ToolRunner::new(p, config.tool_timeout);
    if !amd_found || nvidia_in_sysfs(&config.sysfs_root) {
        let (opened, why_not) = match config.nvml.as_deref().map(nvml::open) {
            Some(Ok(reader)) => (Some(reader), None),
            // No library: a machine without the NVIDIA driver, nothing to say.
            None | Some(Err(nvml::OpenError::Missing(..))) => (None, None),
            Some(Err(e)) => (None, Some(format!("{e}; reading the GPUs with nvidia-smi"))),
        };
        if let Some(reader) = opened {
            out.push(backend(Reader::Nvml(Box::new(reader)), config.interval));
        } else if let Some(p) = find_program(&config.nvidia_smi, &path) {
            out.push(backend(Reader::Nvidia(runner(p), why_not), config.interval));
        }
    }
    // rocm-smi and amd-smi read the same sysfs: worth trying only where the amdgpu driver is
    // loaded but its GPUs could not be read directly (a restricted or unusual /sys). Elsewhere
    // they only print "Driver not initialized".
    if !amd_found && config.sysfs_root.join("module/amdgpu").exists() {
        if let Some(p) = find_program(&config.amd_smi, &path) {
            out.push(backend(
                Reader::AmdSmi(runner(p), None),
                config.amd_tool_interval,
            ));
        } else if let Some(p) = find_program(&config.rocm_smi, &path) {
            out.push(backend(
                Reader::RocmSmi(runner(p)),
                config.amd_tool_interval,
            ));
        }
    }
    out
}

/// `program` itself when it is a path, else the first executable of that name on `path`.
fn find_program(program: &Path, path: &OsString) -> Option<PathBuf> {
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.components().count() > 1 {
        return executable(program).then(|| program.to_owned());
    }
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
}

/// Whether sysfs lists a display controller of vendor NVIDIA (`0x10de`, class `0x03xxxx`).
fn nvidia_in_sysfs(root: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(root.join("bus/pci/devices")) else {
        return false;
    };
    entries.flatten().any(|e| {
        let read = |f: &str| std::fs::read_to_string(e.path().join(f)).unwrap_or_default();
        read("vendor").trim() == "0x10de" && read("class").trim().starts_with("0x03")
    })
}

/// The NVIDIA GPUs NVML lists, else those nvidia-smi lists, asked once with `timeout` (for
/// `probe` and the start of `run`). No NVML and no nvidia-smi on `PATH` is an empty list; a call
/// that fails or hangs says why.
pub fn nvidia_inventory(timeout: Duration) -> Result<Vec<Gpu>, String> {
    if let Some(Ok(mut reader)) = nvml::library_from_env().as_deref().map(nvml::open) {
        let read = reader.read();
        if read.reading.answered {
            return Ok(read.gpus);
        }
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let Some(program) = find_program(Path::new("nvidia-smi"), &path) else {
        return Ok(Vec::new());
    };
    let mut runner = ToolRunner::new(program, timeout);
    let args = super::nvidia::query_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match runner.run(&args, &|| false) {
        ToolOutcome::Finished { stdout, stderr, .. } => Ok(super::nvidia::parse_query(
            &String::from_utf8_lossy(&stdout),
            &String::from_utf8_lossy(&stderr),
        )
        .gpus),
        ToolOutcome::TimedOut { took } => Err(format!(
            "nvidia-smi did not answer within {took:.1?} (a hung GPU or driver?)"
        )),
        ToolOutcome::StillHung { .. } | ToolOutcome::Stopped => {
            Err("nvidia-smi did not answer".to_string())
        }
        ToolOutcome::SpawnFailed(e) => Err(format!("cannot run nvidia-smi: {e}")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sources::health::{DEVICE_DIR, Value, copy_tree, sysfs_tree as tree};
    use std::sync::mpsc;
    use std::thread;

    /// A configuration that sees only what the test gives it.
    fn isolated(sysfs_root: PathBuf, tools: &Path) -> HealthConfig {
        HealthConfig {
            interval: Duration::from_millis(50),
            amd_tool_interval: Duration::from_millis(50),
            sysfs_root,
            amdgpu_ids: Vec::new(),
            tool_timeout: Duration::from_millis(500),
            confirm_after: Duration::from_millis(100),
            search_path: Some(tools.as_os_str().to_owned()),
            // NVML is a library, not a tool on the search path: tests that want it ask.
            nvml: None,
            ..HealthConfig::default()
        }
    }

    fn collect(config: HealthConfig) -> (HealthSource, mpsc::Receiver<HealthEvent>) {
        let (tx, rx) = mpsc::sync_channel(64);
        let source = spawn(config, channel_sink(tx, |e| e)).unwrap();
        (source, rx)
    }

    /// Stops `source`, which must take less than `limit`: the wait between samples, and a tool
    /// that hangs, are interrupted.
    fn stop_within(source: HealthSource, limit: Duration) {
        let start = Instant::now();
        source.stop();
        assert!(start.elapsed() < limit, "{:?}", start.elapsed());
    }

    /// Takes the source's first two events, which must be its start and a first sample.
    fn started_and_sampled(rx: &mpsc::Receiver<HealthEvent>) {
        let started = rx.recv_timeout(WAIT).unwrap();
        assert!(
            matches!(started, HealthEvent::Started { .. }),
            "{started:?}"
        );
        let sampled = rx.recv_timeout(WAIT).unwrap();
        assert!(matches!(sampled, HealthEvent::Sample { .. }), "{sampled:?}");
    }

    fn fake_tool(dir: &Path, name: &str, script: &str) {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    const WAIT: Duration = Duration::from_secs(10);

    #[test]
    fn with_neither_gpu_nor_tool_it_says_so_once_and_ends() {
        let empty = tempfile::tempdir().unwrap();
        let (source, rx) = collect(isolated(empty.path().join("sys"), empty.path()));
        match rx.recv_timeout(WAIT).unwrap() {
            HealthEvent::Unavailable { reason } => {
                assert!(reason.contains("GPU health is not watched"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(rx.recv_timeout(WAIT).is_err(), "nothing after it");
        let start = Instant::now();
        while source.is_running() {
            assert!(start.elapsed() < WAIT, "the thread ends by itself");
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn the_simulated_amd_tree_is_sampled_until_stopped() {
        let empty = tempfile::tempdir().unwrap();
        let (source, rx) = collect(isolated(tree(), empty.path()));
        match rx.recv_timeout(WAIT).unwrap() {
            HealthEvent::Started { sources, gpus } => {
                assert_eq!(sources, [SourceKind::AmdSysfs]);
                assert_eq!(gpus[0].gfx_target.as_deref(), Some("gfx1030"));
            }
            other => panic!("{other:?}"),
        }
        for _ in 0..3 {
            match rx.recv_timeout(WAIT).unwrap() {
                HealthEvent::Sample { source, gpus, .. } => {
                    assert_eq!(source, SourceKind::AmdSysfs);
                    assert_eq!(gpus[0].power_w, Value::Known(19.0));
                }
                other => panic!("{other:?}"),
            }
        }
        stop_within(source, Duration::from_millis(500));
    }

    #[test]
    fn stop_interrupts_the_wait_between_samples() {
        let empty = tempfile::tempdir().unwrap();
        let config = HealthConfig {
            interval: Duration::from_secs(60),
            ..isolated(tree(), empty.path())
        };
        let (source, rx) = collect(config);
        started_and_sampled(&rx);
        stop_within(source, Duration::from_secs(1));
    }

    #[test]
    fn a_fake_nvidia_smi_is_read_and_its_hang_is_a_fault() {
        let tools = tempfile::tempdir().unwrap();
        let rows = crate::sources::health::fixture("nvidia-smi-query-gpu-gpuwarden-h200.txt");
        // Answers once, then hangs like nvidia-smi on a wedged driver.
        let marker = tools.path().join("called");
        fake_tool(
            tools.path(),
            "nvidia-smi",
            &format!(
                "if [ -e {m} ]; then exec sleep 60; fi\ntouch {m}\nprintf '%s' '{rows}'",
                m = marker.display()
            ),
        );
        let (source, rx) = collect(isolated(tools.path().join("sys"), tools.path()));
        let mut events = Vec::new();
        while let Ok(e) = rx.recv_timeout(WAIT) {
            let hung = matches!(&e, HealthEvent::Fault(f) if f.kind == HealthFaultKind::ToolHung);
            events.push(e);
            if hung {
                break;
            }
        }
        match &events[0] {
            HealthEvent::Started { sources, gpus } => {
                assert_eq!(sources, &[SourceKind::NvidiaSmi]);
                assert_eq!(gpus[0].compute_capability.as_deref(), Some("9.0"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(&events[1], HealthEvent::Sample { gpus, .. } if gpus.len() == 1));
        match events.last().unwrap() {
            HealthEvent::Fault(f) => {
                assert_eq!(f.class, FaultClass::GpuUnavailable);
                assert!(
                    f.message.starts_with("nvidia-smi did not answer within"),
                    "{}",
                    f.message
                );
            }
            other => panic!("{other:?}"),
        }
        // Stopping while the next call hangs is still prompt.
        stop_within(source, Duration::from_millis(500));
    }

    #[test]
    fn without_the_nvml_library_nvidia_smi_is_read() {
        let tools = tempfile::tempdir().unwrap();
        let rows = crate::sources::health::fixture("nvidia-smi-query-gpu-gpuwarden-h200.txt");
        fake_tool(tools.path(), "nvidia-smi", &format!("printf '%s' '{rows}'"));
        // The default library name, as on this machine, where the driver is not installed
        // (skipped where it is: there NVML is read, as `live_nvml` shows); and a path that
        // cannot exist, anywhere.
        let default = nvml::library_from_env();
        let here = default
            .as_deref()
            .is_some_and(|lib| nvml::open(lib).is_err());
        let libraries = [
            here.then_some(default).flatten(),
            Some(OsString::from("/nonexistent/libnvidia-ml.so.1")),
        ];
        for library in libraries.into_iter().flatten() {
            let config = HealthConfig {
                nvml: Some(library.clone()),
                ..isolated(tools.path().join("sys"), tools.path())
            };
            let (source, rx) = collect(config);
            match rx.recv_timeout(WAIT).unwrap() {
                HealthEvent::Started { sources, gpus } => {
                    assert_eq!(sources, [SourceKind::NvidiaSmi], "{library:?}");
                    assert_eq!(gpus[0].name.as_deref(), Some("NVIDIA H200"));
                }
                other => panic!("{other:?}"),
            }
            match rx.recv_timeout(WAIT).unwrap() {
                HealthEvent::Sample { source, gpus, .. } => {
                    assert_eq!(source, SourceKind::NvidiaSmi);
                    assert_eq!(gpus[0].processes, None, "nvidia-smi's query lists none");
                }
                other => panic!("a missing library is not worth a note: {other:?}"),
            }
            source.stop();
        }
    }

    /// The next fault, skipping samples.
    fn next_fault(rx: &mpsc::Receiver<HealthEvent>) -> crate::sources::health::HealthFault {
        loop {
            match rx.recv_timeout(WAIT).unwrap() {
                HealthEvent::Fault(f) => return f,
                HealthEvent::Sample { .. } => {}
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_rising_ras_count_and_a_vanished_gpu_on_a_copy_of_the_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("sys");
        copy_tree(&tree(), &root);
        let device = root.join(DEVICE_DIR);
        std::fs::create_dir(device.join("ras")).unwrap();
        let umc = device.join("ras/umc_err_count");
        std::fs::write(&umc, "ue: 0\nce: 0\n").unwrap();
        let (source, rx) = collect(isolated(root, tmp.path()));
        started_and_sampled(&rx);

        std::fs::write(&umc, "ue: 1\nce: 0\n").unwrap();
        let f = next_fault(&rx);
        assert_eq!(f.class, FaultClass::GpuEcc);
        assert_eq!(f.source, SourceKind::AmdSysfs);
        let d = f.device.as_ref().unwrap();
        assert_eq!((d.index, d.pci.as_deref()), (Some(0), Some("0000:0b:00.0")));
        assert_eq!(
            f.message,
            "GPU 0 (0000:0b:00.0): uncorrectable UMC (VRAM) memory errors rose from 0 to 1; \
             its memory is failing"
        );

        std::fs::remove_dir_all(&device).unwrap();
        let f = next_fault(&rx);
        assert_eq!(f.class, FaultClass::GpuLost);
        assert_eq!(f.kind, HealthFaultKind::Disappeared);
        assert!(
            f.message.starts_with("GPU 0 (0000:0b:00.0) disappeared"),
            "{}",
            f.message
        );
        assert!(f.to_fault().captures["pci"] == "0000:0b:00.0");
        source.stop();
    }

    #[test]
    fn a_sink_that_hangs_up_ends_the_thread() {
        let empty = tempfile::tempdir().unwrap();
        let (tx, rx) = mpsc::sync_channel(1);
        let source = spawn(isolated(tree(), empty.path()), channel_sink(tx, |e| e)).unwrap();
        drop(rx);
        let start = Instant::now();
        while source.is_running() {
            assert!(start.elapsed() < WAIT);
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The real nvidia-smi through the whole source, on a machine with an NVIDIA GPU:
    /// `cargo test live_nvidia_smi -- --ignored --nocapture`.
    #[test]
    #[ignore = "needs an NVIDIA GPU and nvidia-smi"]
    fn live_nvidia_smi() {
        let config = HealthConfig {
            interval: Duration::from_millis(200),
            ..HealthConfig::default()
        };
        let (source, rx) = collect(config);
        match rx.recv_timeout(WAIT).unwrap() {
            HealthEvent::Started { sources, gpus } => {
                println!("sources {sources:?}");
                for g in &gpus {
                    println!("{}", serde_json::to_string(g).unwrap());
                }
                assert_eq!(sources, [SourceKind::NvidiaSmi]);
                assert!(gpus.iter().all(|g| g.uuid.is_some() && g.pci.is_some()));
            }
            other => panic!("{other:?}"),
        }
        let mut samples = 0;
        let start = Instant::now();
        while samples < 5 {
            match rx.recv_timeout(WAIT).unwrap() {
                HealthEvent::Sample { source, gpus, at } => {
                    println!(
                        "{:>6.0} ms {source}: {}",
                        at.duration_since(start).as_secs_f64() * 1e3,
                        serde_json::to_string(&gpus).unwrap()
                    );
                    let g = &gpus[0];
                    assert!(g.temperature_c.is_known() && g.power_w.is_known());
                    assert!(g.vram_total_bytes.is_known() && g.utilization_percent.is_known());
                    samples += 1;
                }
                HealthEvent::Fault(f) => panic!("a healthy GPU gave a fault: {f}"),
                other => println!("{other:?}"),
            }
        }
        let stop = Instant::now();
        source.stop();
        println!("stopped in {:?}", stop.elapsed());
    }

    /// NVML through the whole source, on a machine with an NVIDIA GPU and its driver:
    /// `cargo test live_nvml -- --ignored --nocapture`.
    #[test]
    #[ignore = "needs an NVIDIA GPU and libnvidia-ml"]
    fn live_nvml() {
        let (source, rx) = collect(HealthConfig::default());
        match rx.recv_timeout(WAIT).unwrap() {
            HealthEvent::Started { sources, gpus } => {
                assert_eq!(sources, [SourceKind::Nvml]);
                assert!(gpus.iter().all(|g| g.uuid.is_some() && g.pci.is_some()));
            }
            other => panic!("{other:?}"),
        }
        match rx.recv_timeout(WAIT).unwrap() {
            HealthEvent::Sample { gpus, .. } => {
                println!("{}", serde_json::to_string(&gpus).unwrap());
                assert!(gpus[0].temperature_c.is_known() && gpus[0].processes.is_some());
            }
            other => panic!("{other:?}"),
        }
        source.stop();
    }

    #[test]
    fn rocm_smi_is_the_second_path_only_where_amdgpu_is_loaded() {
        let tmp = tempfile::tempdir().unwrap();
        let json = crate::sources::health::fixture(
            "rocm-smi-json-showtemp-showuse-showpower-vram-7900xtx.txt",
        );
        fake_tool(tmp.path(), "rocm-smi", &format!("printf '%s' '{json}'"));
        let sys = tmp.path().join("sys");
        std::fs::create_dir_all(&sys).unwrap();
        let (_, rx) = collect(isolated(sys.clone(), tmp.path()));
        assert!(matches!(
            rx.recv_timeout(WAIT).unwrap(),
            HealthEvent::Unavailable { .. }
        ));

        std::fs::create_dir_all(sys.join("module/amdgpu")).unwrap();
        let (source, rx) = collect(isolated(sys, tmp.path()));
        match rx.recv_timeout(WAIT).unwrap() {
            HealthEvent::Started { sources, gpus } => {
                assert_eq!(sources, [SourceKind::RocmSmi]);
                assert_eq!(gpus[0].vram_total_bytes, Some(25_753_026_560));
            }
            other => panic!("{other:?}"),
        }
        match rx.recv_timeout(WAIT).unwrap() {
            HealthEvent::Sample { gpus, .. } => {
                assert_eq!(gpus[0].temperature_c, Value::Known(49.0));
            }
            other => panic!("{other:?}"),
        }
        source.stop();
    }

    #[test]
    fn tools_are_found_on_the_search_path_only_when_executable() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rocm-smi"), "not executable").unwrap();
        let path = dir.path().as_os_str().to_owned();
        assert_eq!(find_program(Path::new("rocm-smi"), &path), None);
        fake_tool(dir.path(), "amd-smi", "true");
        assert_eq!(
            find_program(Path::new("amd-smi"), &path),
            Some(dir.path().join("amd-smi"))
        );
        assert_eq!(find_program(Path::new("/nonexistent/amd-smi"), &path), None);
    }
}
