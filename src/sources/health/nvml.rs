//! NVIDIA GPUs through NVML, the library nvidia-smi itself is built on: the same readings as
//! the [`nvidia`](super::nvidia) query, plus the processes that hold memory on each GPU, without
//! starting a process per sample.
//!
//! `libnvidia-ml.so.1` is opened at run time (`nvml-wrapper` over `libloading`), never linked:
//! the binary starts on machines without an NVIDIA driver, and there [`open`] fails with
//! [`OpenError::Missing`] and the sampler falls back to nvidia-smi as before. A library that is
//! there but cannot start (no driver loaded, a library/driver version mismatch) is
//! [`OpenError::Failed`]: the fallback is taken too, and the reason said once.
//!
//! NVML reports trouble as error codes per call; they map onto the same three kinds of reading
//! as nvidia-smi's text: `NotSupported`/`NoPermission` is "not reported" ([`Value::Unknown`]),
//! `GpuLost` is a [`Problem`] of class `gpu_lost`, anything else is a failed field
//! ([`Value::Error`]) that the tracker confirms over time. So the tracker and the faults are
//! the ones nvidia-smi feeds.
//!
//! Not here: when to sample (`sampler`), what consecutive readings mean (`tracker`).

use std::ffi::{OsStr, OsString};

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;

use super::GpuProcess;
use super::{EccCount, GpuSample, HealthFaultKind, Problem, Reading, SourceKind, Value};
use crate::gpu::{Gpu, Vendor};
use crate::rules::FaultClass;

/// The library's name as the driver installs it (the unversioned `.so` is only in -dev
/// packages).
pub const LIBRARY: &str = "libnvidia-ml.so.1";

/// Set to `off` (or `0`, `no`, `false`) to skip NVML and read NVIDIA GPUs with nvidia-smi; set
/// to a path to open that library instead of [`LIBRARY`].
pub const ENV: &str = "GPUWARDEN_NVML";

/// The library to open as [`ENV`] asks: `None` when NVML is turned off.
pub fn library_from_env() -> Option<OsString> {
    library_choice(std::env::var_os(ENV).as_deref())
}

/// The library a value of [`ENV`] asks for.
fn library_choice(setting: Option<&OsStr>) -> Option<OsString> {
    match setting {
        None => Some(OsString::from(LIBRARY)),
        Some(v) if v.is_empty() => Some(OsString::from(LIBRARY)),
        Some(v) => {
            let off = ["off", "0", "no", "false"]
                .iter()
                .any(|w| v.eq_ignore_ascii_case(w));
            (!off).then(|| v.to_owned())
        }
    }
}

/// Why NVML cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The library is not on this machine (or not loadable): the normal case without NVIDIA.
    #[error("{0} cannot be loaded: {1}")]
    Missing(String, String),
    /// The library loaded but NVML did not start.
    #[error("NVML did not start: {0}")]
    Failed(String),
}

/// An initialised NVML. Dropping it shuts NVML down.
pub struct NvmlReader {
    nvml: Nvml,
    driver: Option<String>,
    /// PCI addresses by index, from earlier readings, to name a GPU whose handle is lost.
    known_pci: Vec<Option<String>>,
}

impl std::fmt::Debug for NvmlReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlReader")
            .field("driver", &self.driver)
            .finish_non_exhaustive()
    }
}

/// Loads `library` and starts NVML.
pub fn open(library: &OsStr) -> Result<NvmlReader, OpenError> {
    let nvml = Nvml::builder()
        .lib_path(library)
        .init()
        .map_err(|e| match e {
            NvmlError::LibloadingError(_)
            | NvmlError::FailedToLoadSymbol(_)
            | NvmlError::LibraryNotFound => {
                OpenError::Missing(library.to_string_lossy().into_owned(), e.to_string())
            }
            other => OpenError::Failed(describe(&other)),
        })?;
    let driver = nvml.sys_driver_version().ok();
    Ok(NvmlReader {
        nvml,
        driver,
        known_pci: Vec::new(),
    })
}

/// What one reading through NVML told: the inventory and the reading.
#[derive(Clone, Debug, PartialEq)]
pub struct NvmlOutput {
    pub gpus: Vec<Gpu>,
    pub reading: Reading,
}

impl NvmlReader {
    /// One reading of every GPU, processes included.
    pub fn read(&mut self) -> NvmlOutput {
        let mut out = NvmlOutput {
            gpus: Vec::new(),
            reading: Reading::new(SourceKind::Nvml),
        };
        let count = match self.nvml.device_count() {
            Ok(n) => n,
            Err(e) => {
                out.reading.answered = false;
                out.reading.problems.push(Problem {
                    class: FaultClass::GpuUnavailable,
                    kind: HealthFaultKind::ToolReported,
                    pci: None,
                    message: format!("NVML cannot count the GPUs: {}", describe(&e)),
                });
                return out;
            }
        };
        for index in 0..count {
            let facts = self.facts(index);
            let (gpu, sample, problem) = sample_of(facts, self.driver.as_deref(), comm);
            let slot = index as usize;
            if self.known_pci.len() <= slot {
                self.known_pci.resize(slot + 1, None);
            }
            if gpu.pci.is_some() {
                self.known_pci[slot].clone_from(&gpu.pci);
            }
            out.reading.problems.extend(problem);
            out.gpus.push(gpu);
            out.reading.gpus.push(sample);
        }
        out
    }

    /// Every call one sample needs, for GPU `index`.
    fn facts(&self, index: u32) -> Facts {
        let known_pci = self.known_pci.get(index as usize).cloned().flatten();
        let device = match self.nvml.device_by_index(index) {
            Ok(d) => d,
            Err(e) => return Facts::without_handle(index, known_pci, e),
        };
        let processes = device.running_compute_processes().map(|mut list| {
            // A process drawing too (a visualiser) is listed twice; its memory once.
            if let Ok(graphics) = device.running_graphics_processes() {
                list.extend(graphics);
            }
            list.into_iter()
                .map(|p| {
                    let bytes = match p.used_gpu_memory {
                        UsedGpuMemory::Used(b) => b,
                        UsedGpuMemory::Unavailable => 0,
                    };
                    (p.pid, bytes)
                })
                .collect()
        });
        Facts {
            index,
            handle: Ok(()),
            name: device.name(),
            uuid: device.uuid(),
            pci: device.pci_info().map(|p| p.bus_id),
            known_pci,
            compute_capability: device.cuda_compute_capability().map(|c| (c.major, c.minor)),
            memory: device.memory_info().map(|m| (m.used, m.total)),
            utilization: device.utilization_rates().map(|u| u.gpu),
            temperature: device.temperature(TemperatureSensor::Gpu),
            power_mw: device.power_usage(),
            ecc_uncorrected: device
                .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile),
            processes,
        }
    }
}

/// The answers of NVML's calls about one GPU, as they came: kept apart from the calls so that
/// what they mean is testable without a GPU.
struct Facts {
    index: u32,
    /// Whether a handle to the GPU was had at all.
    handle: Result<(), NvmlError>,
    name: Result<String, NvmlError>,
    uuid: Result<String, NvmlError>,
    /// NVML's spelling: `00000000:06:00.0`.
    pci: Result<String, NvmlError>,
    /// The address an earlier reading gave, for a GPU that no longer answers.
    known_pci: Option<String>,
    compute_capability: Result<(i32, i32), NvmlError>,
    /// Used and total, in bytes.
    memory: Result<(u64, u64), NvmlError>,
    utilization: Result<u32, NvmlError>,
    temperature: Result<u32, NvmlError>,
    power_mw: Result<u32, NvmlError>,
    ecc_uncorrected: Result<u64, NvmlError>,
    /// PID and bytes of GPU memory.
    processes: Result<Vec<(u32, u64)>, NvmlError>,
}

impl Facts {
    /// A GPU whose handle could not be had: every reading failed the same way.
    fn without_handle(index: u32, known_pci: Option<String>, e: NvmlError) -> Facts {
        let lost = matches!(e, NvmlError::GpuLost);
        let again = || {
            if lost {
                NvmlError::GpuLost
            } else {
                NvmlError::Unknown
            }
        };
        Facts {
            index,
            handle: Err(e),
            name: Err(again()),
            uuid: Err(again()),
            pci: Err(again()),
            known_pci,
            compute_capability: Err(again()),
            memory: Err(again()),
            utilization: Err(again()),
            temperature: Err(again()),
            power_mw: Err(again()),
            ecc_uncorrected: Err(again()),
            processes: Err(again()),
        }
    }
}

/// A reading: known, not reported by this GPU, or failed (with NVML's words).
fn value<T>(r: Result<T, NvmlError>) -> Value<T> {
    match r {
        Ok(v) => Value::Known(v),
        Err(e) if not_reported(&e) => Value::Unknown,
        Err(e) => Value::Error(describe(&e)),
    }
}

/// The errors that mean "this GPU or this driver does not tell", not "reading it failed".
fn not_reported(e: &NvmlError) -> bool {
    matches!(
        e,
        NvmlError::NotSupported
            | NvmlError::NoPermission
            | NvmlError::FunctionNotFound
            | NvmlError::FailedToLoadSymbol(_)
            | NvmlError::NoData
    )
}

/// NVML's error as a short text, the way a person would search for it.
fn describe(e: &NvmlError) -> String {
    match e {
        NvmlError::GpuLost => "GPU is lost".to_owned(),
        NvmlError::DriverNotLoaded => "the NVIDIA driver is not loaded".to_owned(),
        NvmlError::LibRmVersionMismatch => "Driver/library version mismatch".to_owned(),
        other => other.to_string(),
    }
}

/// A process's name (`/proc/PID/comm`), where it can be read from here.
fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|n| n.trim().to_owned())
}

/// The inventory record, the sample and, for a lost GPU, the problem that one GPU's facts make.
fn sample_of(
    facts: Facts,
    driver: Option<&str>,
    name_of: impl Fn(u32) -> Option<String>,
) -> (Gpu, GpuSample, Option<Problem>) {
    let pci = facts
        .pci
        .as_deref()
        .ok()
        .and_then(super::normalize_pci)
        .or(facts.known_pci);
    let memory = value(facts.memory);
    let total = memory.known().map(|(_, t)| t);
    let gpu = Gpu {
        vendor: Vendor::Nvidia,
        index: facts.index,
        name: facts.name.ok(),
        pci: pci.clone(),
        device_id: None,
        kfd_node: None,
        render_minor: None,
        gfx_target: None,
        compute_capability: facts
            .compute_capability
            .ok()
            .map(|(major, minor)| format!("{major}.{minor}")),
        uuid: facts.uuid.ok(),
        vram_total_bytes: total,
        driver_version: driver.map(str::to_owned),
    };
    let mut sample = GpuSample::blank(&gpu);
    let lost = [
        facts.handle.as_ref().err(),
        facts.utilization.as_ref().err(),
        facts.temperature.as_ref().err(),
        facts.power_mw.as_ref().err(),
    ]
    .into_iter()
    .any(|e| matches!(e, Some(NvmlError::GpuLost)))
        || matches!(&memory, Value::Error(t) if t == "GPU is lost");
    let split = |v: &Value<(u64, u64)>, pick: fn((u64, u64)) -> u64| match v {
        Value::Known(m) => Value::Known(pick(*m)),
        Value::Unknown => Value::Unknown,
        Value::Error(e) => Value::Error(e.clone()),
    };
    sample.vram_used_bytes = split(&memory, |m| m.0);
    sample.vram_total_bytes = split(&memory, |m| m.1);
    sample.utilization_percent = as_f64(value(facts.utilization), 1.0);
    sample.temperature_c = as_f64(value(facts.temperature), 1.0);
    sample.power_w = as_f64(value(facts.power_mw), 1e-3);
    let ecc = value(facts.ecc_uncorrected);
    if !matches!(ecc, Value::Unknown) {
        sample.ecc.push(EccCount {
            block: "volatile total".to_owned(),
            uncorrectable: ecc,
            correctable: Value::Unknown,
        });
    }
    sample.processes = facts.processes.ok().map(|list| processes(list, name_of));
    let problem = lost.then(|| Problem {
        class: FaultClass::GpuLost,
        kind: HealthFaultKind::ToolReported,
        pci: pci.clone(),
        message: format!(
            "NVML reports GPU {}{} as lost",
            facts.index,
            pci.as_deref()
                .map(|p| format!(" ({p})"))
                .unwrap_or_default()
        ),
    });
    (gpu, sample, problem)
}

fn as_f64(v: Value<u32>, scale: f64) -> Value<f64> {
    match v {
        Value::Known(n) => Value::Known(f64::from(n) * scale),
        Value::Unknown => Value::Unknown,
        Value::Error(e) => Value::Error(e),
    }
}

/// One entry per process, biggest first (a process listed as compute and graphics counts once).
fn processes(list: Vec<(u32, u64)>, name_of: impl Fn(u32) -> Option<String>) -> Vec<GpuProcess> {
    let mut out: Vec<GpuProcess> = Vec::new();
    for (pid, bytes) in list {
        match out.iter_mut().find(|p| p.pid == pid) {
            Some(p) => p.vram_bytes = p.vram_bytes.max(bytes),
            None => out.push(GpuProcess {
                pid,
                name: name_of(pid),
                vram_bytes: bytes,
            }),
        }
    }
    out.sort_by(|a, b| b.vram_bytes.cmp(&a.vram_bytes).then(a.pid.cmp(&b.pid)));
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The facts of a healthy H200 with one process, as NVML gives them.
    fn h200() -> Facts {
        Facts {
            index: 0,
            handle: Ok(()),
            name: Ok("NVIDIA H200".into()),
            uuid: Ok("GPU-0d3c6b0e-aaaa-bbbb-cccc-123456789abc".into()),
            pci: Ok("00000000:00:06.0".into()),
            known_pci: None,
            compute_capability: Ok((9, 0)),
            memory: Ok((1 << 30, 150_754_820_096)),
            utilization: Ok(37),
            temperature: Ok(41),
            power_mw: Ok(127_790),
            ecc_uncorrected: Ok(0),
            processes: Ok(vec![(4242, 1 << 30), (77, 500 << 20), (4242, 1 << 30)]),
        }
    }

    fn named(pid: u32) -> Option<String> {
        (pid == 4242).then(|| "python3".to_owned())
    }

    #[test]
    fn a_healthy_gpu_reads_like_the_nvidia_smi_query() {
        let (gpu, s, problem) = sample_of(h200(), Some("580.159.04"), named);
        assert!(problem.is_none());
        assert_eq!(gpu.pci.as_deref(), Some("0000:00:06.0"));
        assert_eq!(gpu.compute_capability.as_deref(), Some("9.0"));
        assert_eq!(gpu.vram_total_bytes, Some(150_754_820_096));
        assert_eq!(gpu.driver_version.as_deref(), Some("580.159.04"));
        assert_eq!(s.device.pci.as_deref(), Some("0000:00:06.0"));
        assert_eq!(s.arch.as_deref(), Some("9.0"));
        assert_eq!(s.utilization_percent, Value::Known(37.0));
        assert_eq!(s.vram_used_bytes, Value::Known(1 << 30));
        assert_eq!(s.temperature_c, Value::Known(41.0));
        assert_eq!(s.power_w, Value::Known(127.79));
        assert_eq!(s.ecc[0].uncorrectable, Value::Known(0));
        let procs = s.processes.unwrap();
        assert_eq!(
            procs,
            [
                GpuProcess {
                    pid: 4242,
                    name: Some("python3".into()),
                    vram_bytes: 1 << 30
                },
                GpuProcess {
                    pid: 77,
                    name: None,
                    vram_bytes: 500 << 20
                },
            ],
            "one entry per process, biggest first"
        );
    }

    #[test]
    fn not_supported_is_unknown_and_other_errors_are_field_errors() {
        let facts = Facts {
            power_mw: Err(NvmlError::NotSupported),
            ecc_uncorrected: Err(NvmlError::NotSupported),
            temperature: Err(NvmlError::Unknown),
            processes: Err(NvmlError::NoPermission),
            ..h200()
        };
        let (_, s, problem) = sample_of(facts, None, named);
        assert!(problem.is_none());
        assert_eq!(s.power_w, Value::Unknown);
        assert!(
            s.ecc.is_empty(),
            "no ECC on this card, like nvidia-smi's [N/A]"
        );
        assert!(s.temperature_c.is_error());
        assert_eq!(s.errors().len(), 1);
        assert_eq!(s.processes, None, "not readable is not 'no process'");
    }

    #[test]
    fn a_lost_gpu_is_a_gpu_lost_problem_named_by_its_last_address() {
        let facts = Facts::without_handle(0, Some("0000:00:06.0".into()), NvmlError::GpuLost);
        let (gpu, s, problem) = sample_of(facts, None, named);
        let problem = problem.unwrap();
        assert_eq!(problem.class, FaultClass::GpuLost);
        assert_eq!(problem.pci.as_deref(), Some("0000:00:06.0"));
        assert_eq!(problem.message, "NVML reports GPU 0 (0000:00:06.0) as lost");
        assert_eq!(gpu.name, None);
        assert!(!s.answers(), "the tracker sees it silent too");
        assert_eq!(s.utilization_percent, Value::Error("GPU is lost".into()));

        // One lost reading among good ones is enough.
        let facts = Facts {
            power_mw: Err(NvmlError::GpuLost),
            ..h200()
        };
        assert!(sample_of(facts, None, named).2.is_some());
    }

    #[test]
    fn a_missing_library_is_missing_not_failed() {
        match open(OsStr::new("/nonexistent/libnvidia-ml.so.1")) {
            Err(OpenError::Missing(lib, _)) => assert_eq!(lib, "/nonexistent/libnvidia-ml.so.1"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_environment_turns_nvml_off_or_names_the_library() {
        assert_eq!(library_choice(None).as_deref(), Some(OsStr::new(LIBRARY)));
        assert_eq!(
            library_choice(Some(OsStr::new(""))).as_deref(),
            Some(OsStr::new(LIBRARY))
        );
        assert_eq!(library_choice(Some(OsStr::new("OFF"))), None);
        assert_eq!(library_choice(Some(OsStr::new("0"))), None);
        assert_eq!(
            library_choice(Some(OsStr::new("/opt/lib/libnvidia-ml.so.1"))).as_deref(),
            Some(OsStr::new("/opt/lib/libnvidia-ml.so.1"))
        );
    }
}
