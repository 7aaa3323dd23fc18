//! GPU health: what each GPU of this machine is doing (utilization, memory, temperature, power,
//! ECC/RAS counters) sampled about once a second, and the health faults that consecutive samples
//! reveal (a GPU that disappears, an uncorrectable error counter that rises, a GPU that stops
//! answering, a vendor tool that hangs).
//!
//! Readers, cheapest first:
//! - [`amd_sysfs`]: amdgpu's own files under `/sys` (or `--sysfs-root DIR`), matched to the KFD
//!   topology so that GPU indices are the ones ROCm uses. A sample is a handful of small reads.
//! - [`nvml`]: NVIDIA's library, opened at run time where the driver installed it; a sample is a
//!   few library calls, and it also tells which processes hold memory on each GPU.
//! - [`nvidia`]: one `nvidia-smi --query-gpu=... --format=csv` call per sample, with a deadline;
//!   the NVIDIA reader where NVML cannot be loaded (or `GPUWARDEN_NVML=off`).
//! - [`rocm_smi`] and [`amd_smi`]: the AMD tools' JSON, the second path for AMD GPUs when sysfs
//!   shows none; these tools take seconds a call, so they run rarely.
//!
//! [`sampler`] owns the thread that drives them and hands [`HealthEvent`]s to a sink;
//! [`tracker`] turns consecutive readings into [`HealthFault`]s and is pure (time comes in).
//!
//! This module does not decide what a fault means for the job: that is the supervisor's job, fed
//! by [`HealthFault::to_fault`]. It does not draw anything either.

pub mod amd_smi;
pub mod amd_sysfs;
pub mod nvidia;
pub mod nvml;
pub mod rocm_smi;
pub mod sampler;
mod tool;
pub mod tracker;

use std::fmt;
use std::time::Instant;

use serde::{Serialize, Serializer};

use crate::gpu::{Gpu, Vendor};
use crate::rules::{Action, Fault, FaultClass, Severity, Stream};

pub use sampler::{HealthConfig, HealthSource, channel_sink, nvidia_inventory, spawn};
pub use tracker::Tracker;

/// A process holding memory on a GPU: from KFD's per-process files on AMD, from NVML on NVIDIA.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GpuProcess {
    pub pid: u32,
    /// `/proc/PID/comm`, when readable.
    pub name: Option<String>,
    pub vram_bytes: u64,
}

/// Which reader produced a reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    AmdSysfs,
    RocmSmi,
    AmdSmi,
    NvidiaSmi,
    Nvml,
}

impl SourceKind {
    /// How a person would name it.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::AmdSysfs => "amdgpu sysfs",
            SourceKind::RocmSmi => "rocm-smi",
            SourceKind::AmdSmi => "amd-smi",
            SourceKind::NvidiaSmi => "nvidia-smi",
            SourceKind::Nvml => "NVML",
        }
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One reading of one quantity.
///
/// `Unknown` and `Error` are different things: a consumer card has no ECC and a laptop may not
/// report its power (`N/A`, `[Not Supported]`, a missing file), which is normal; `ERR!` or
/// `[Unknown Error]` means the driver tried and failed, which is a symptom.
#[derive(Clone, Debug, PartialEq)]
pub enum Value<T> {
    Known(T),
    /// Not reported by this GPU or this source.
    Unknown,
    /// The source reported a failure for this field; the text is what it printed.
    Error(String),
}

impl<T: Copy> Value<T> {
    /// The value, when it is known.
    pub fn known(&self) -> Option<T> {
        match self {
            Value::Known(v) => Some(*v),
            Value::Unknown | Value::Error(_) => None,
        }
    }
}

impl<T> Value<T> {
    pub fn is_known(&self) -> bool {
        matches!(self, Value::Known(_))
    }

    pub fn is_error(&self) -> bool {
        matches!(self, Value::Error(_))
    }

    /// `Known` for `Some`, `Unknown` for `None`.
    pub fn from_option(v: Option<T>) -> Value<T> {
        v.map_or(Value::Unknown, Value::Known)
    }
}

/// In JSON a known value is the number itself, an unknown one is `null`, and an error is
/// `{"error": "<what the tool printed>"}`, so a view can tell "not reported" from "failed".
impl<T: Serialize> Serialize for Value<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            Value::Known(v) => v.serialize(s),
            Value::Unknown => s.serialize_none(),
            Value::Error(text) => {
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry("error", text)?;
                map.end()
            }
        }
    }
}

/// Which GPU a sample or a fault is about. `index` is the runtime's index (what
/// `*_VISIBLE_DEVICES` counts); samples always carry it, a fault from a tool message that names
/// only a PCI address of a GPU never seen before may not.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct DeviceRef {
    pub vendor: Vendor,
    pub index: Option<u32>,
    /// PCI address in sysfs form, lowercase: `0000:0b:00.0`.
    pub pci: Option<String>,
}

impl DeviceRef {
    /// The reference of an inventory record.
    pub fn of(gpu: &Gpu) -> DeviceRef {
        DeviceRef {
            vendor: gpu.vendor,
            index: Some(gpu.index),
            pci: gpu.pci.clone(),
        }
    }
}

impl fmt::Display for DeviceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.index, &self.pci) {
            (Some(i), Some(pci)) => write!(f, "GPU {i} ({pci})"),
            (Some(i), None) => write!(f, "GPU {i}"),
            (None, Some(pci)) => write!(f, "GPU at {pci}"),
            (None, None) => write!(f, "an unidentified {} GPU", self.vendor.as_str()),
        }
    }
}

/// Error counters of one hardware block (`umc`, `gfx`, ... for AMD RAS; `total` for a source
/// that reports only totals).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EccCount {
    pub block: String,
    pub uncorrectable: Value<u64>,
    pub correctable: Value<u64>,
}

/// One GPU at one moment.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuSample {
    pub device: DeviceRef,
    pub name: Option<String>,
    /// `gfx1030` on AMD, the compute capability (`9.0`) on NVIDIA.
    pub arch: Option<String>,
    /// False when the device is no longer there (its sysfs directory is gone).
    pub present: bool,
    pub utilization_percent: Value<f64>,
    pub vram_used_bytes: Value<u64>,
    pub vram_total_bytes: Value<u64>,
    /// The main sensor: `edge` on AMD, `temperature.gpu` on NVIDIA.
    pub temperature_c: Value<f64>,
    /// AMD's `junction` (hotspot) sensor, where there is one.
    pub hotspot_c: Value<f64>,
    pub power_w: Value<f64>,
    pub ecc: Vec<EccCount>,
    /// The processes holding memory on it, biggest first, where the source tells (NVML);
    /// `None` where it does not (nvidia-smi's query, sysfs: KFD is read apart, see `ui`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processes: Option<Vec<GpuProcess>>,
}

impl GpuSample {
    /// A sample with nothing known yet about `gpu`.
    pub fn blank(gpu: &Gpu) -> GpuSample {
        GpuSample {
            device: DeviceRef::of(gpu),
            name: gpu.name.clone(),
            arch: gpu
                .gfx_target
                .clone()
                .or_else(|| gpu.compute_capability.clone()),
            present: true,
            utilization_percent: Value::Unknown,
            vram_used_bytes: Value::Unknown,
            vram_total_bytes: Value::from_option(gpu.vram_total_bytes),
            temperature_c: Value::Unknown,
            hotspot_c: Value::Unknown,
            power_w: Value::Unknown,
            ecc: Vec::new(),
            processes: None,
        }
    }

    /// The fields whose source reported an error, with what it printed.
    pub fn errors(&self) -> Vec<(&'static str, &str)> {
        let fields = [
            ("utilization", error_text(&self.utilization_percent)),
            ("memory used", error_text(&self.vram_used_bytes)),
            ("memory total", error_text(&self.vram_total_bytes)),
            ("temperature", error_text(&self.temperature_c)),
            ("hotspot temperature", error_text(&self.hotspot_c)),
            ("power", error_text(&self.power_w)),
        ];
        let ecc = self
            .ecc
            .iter()
            .map(|e| ("ECC uncorrectable", error_text(&e.uncorrectable)));
        fields
            .into_iter()
            .chain(ecc)
            .filter_map(|(name, text)| text.map(|t| (name, t.as_str())))
            .collect()
    }

    /// Whether any of the four everyday readings (utilization, memory used, temperature,
    /// power) is known. A GPU that answers none of them has stopped answering.
    pub fn answers(&self) -> bool {
        self.utilization_percent.is_known()
            || self.vram_used_bytes.is_known()
            || self.temperature_c.is_known()
            || self.power_w.is_known()
    }
}

fn error_text<T>(v: &Value<T>) -> Option<&String> {
    match v {
        Value::Error(text) => Some(text),
        Value::Known(_) | Value::Unknown => None,
    }
}

/// Something a source itself said is wrong with a GPU or with every GPU (`GPU is lost`,
/// `couldn't communicate with the NVIDIA driver`, a call that hung), as opposed to what the
/// tracker infers from consecutive samples.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub class: FaultClass,
    pub kind: HealthFaultKind,
    /// The GPU it is about, when the message names one.
    pub pci: Option<String>,
    pub message: String,
}

/// What one call of a reader returned.
#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    pub source: SourceKind,
    /// Whether the source answered. A tool that hung or printed nothing usable did not, and its
    /// silence says nothing about which GPUs are there: the tracker then looks only at
    /// `problems`.
    pub answered: bool,
    pub gpus: Vec<GpuSample>,
    pub problems: Vec<Problem>,
    /// Trouble with the source that is not a GPU fault (`rocm-smi` printed a warning instead of
    /// JSON): worth saying once, never worth stopping a job for.
    pub notes: Vec<String>,
}

impl Reading {
    pub fn new(source: SourceKind) -> Reading {
        Reading {
            source,
            answered: true,
            gpus: Vec::new(),
            problems: Vec::new(),
            notes: Vec::new(),
        }
    }
}

/// What kind of health fault it is; names the rule id in [`HealthFault::to_fault`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthFaultKind {
    /// A GPU seen before is gone.
    Disappeared,
    /// An uncorrectable ECC/RAS counter rose between two samples.
    UncorrectableErrors,
    /// A GPU that used to answer reports nothing (every reading N/A) for a while.
    Silent,
    /// The source reports errors (`ERR!`, `[Unknown Error]`) in a GPU's fields for a while.
    FieldErrors,
    /// A tool call did not finish within its timeout and was killed.
    ToolHung,
    /// The tool said so itself (`GPU is lost`, `couldn't communicate with the NVIDIA driver`).
    ToolReported,
}

impl HealthFaultKind {
    /// The rule id a fault of this kind carries in the journal.
    pub fn rule_id(self) -> &'static str {
        match self {
            HealthFaultKind::Disappeared => "health-gpu-disappeared",
            HealthFaultKind::UncorrectableErrors => "health-uncorrectable-errors-rose",
            HealthFaultKind::Silent => "health-gpu-silent",
            HealthFaultKind::FieldErrors => "health-readings-failing",
            HealthFaultKind::ToolHung => "health-tool-hung",
            HealthFaultKind::ToolReported => "health-tool-reported",
        }
    }

    fn advice(self) -> &'static str {
        match self {
            HealthFaultKind::Disappeared | HealthFaultKind::Silent => {
                "Look at `dmesg` for what happened to the GPU; it usually needs a reset or a reboot before it can be used again."
            }
            HealthFaultKind::UncorrectableErrors => {
                "The GPU's memory is failing: keep jobs off it and have it checked."
            }
            HealthFaultKind::FieldErrors | HealthFaultKind::ToolReported => {
                "The driver cannot read this GPU: look at `dmesg`; a reset or a reboot usually clears it."
            }
            HealthFaultKind::ToolHung => {
                "A GPU tool hanging in the driver means the driver is stuck: look at `dmesg`; a reboot is usually needed."
            }
        }
    }
}

/// A health fault: derived from consecutive samples or reported by a tool.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HealthFault {
    pub class: FaultClass,
    pub kind: HealthFaultKind,
    /// The GPU it is about; `None` for a fault of the whole source (a tool that hung).
    pub device: Option<DeviceRef>,
    pub source: SourceKind,
    /// A sentence a person understands: which GPU, what happened, what it likely means.
    pub message: String,
    #[serde(skip)]
    pub at: Instant,
}

impl HealthFault {
    /// The fault as the supervisor and the journal know faults: stream `tool`, the class's
    /// default action, captures `pci` and `gpu` (the index) where known.
    pub fn to_fault(&self) -> Fault {
        let mut captures = std::collections::BTreeMap::new();
        if let Some(device) = &self.device {
            if let Some(pci) = &device.pci {
                captures.insert("pci".to_owned(), pci.clone());
            }
            if let Some(index) = device.index {
                captures.insert("gpu".to_owned(), index.to_string());
            }
        }
        let severity = match self.class.default_action() {
            Action::Note => Severity::Warning,
            Action::Restart => Severity::Error,
            Action::Fallback | Action::Stop => Severity::Critical,
        };
        Fault {
            rule: self.kind.rule_id().to_owned(),
            class: self.class,
            severity,
            action: self.class.default_action(),
            stream: Stream::Tool,
            line: self.message.clone(),
            captures,
            advice: self.kind.advice().to_owned(),
            facility: None,
            // Whether the GPU is one the job uses is the supervisor's call, made from the
            // `gpu` and `pci` captures.
            attribution: None,
            gpus: Vec::new(),
        }
    }
}

impl fmt::Display for HealthFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}]: {}", self.source, self.class, self.message)
    }
}

/// What the health source hands to its sink.
#[derive(Clone, Debug)]
pub enum HealthEvent {
    /// Sent once at start: the sources in use and the GPUs they found.
    Started {
        sources: Vec<SourceKind>,
        gpus: Vec<Gpu>,
    },
    /// Sent once when there is nothing to watch (no GPU in sysfs, no vendor tool); nothing
    /// follows it.
    Unavailable {
        reason: String,
    },
    /// One reading of every GPU of one source.
    Sample {
        at: Instant,
        source: SourceKind,
        gpus: Vec<GpuSample>,
    },
    Fault(HealthFault),
    /// Trouble with a source that is not a GPU fault; each distinct note is sent once.
    Note {
        source: SourceKind,
        message: String,
    },
}

/// Parses a PCI address as sysfs or a tool writes it (`0000:0b:00.0`, `00000000:09:00.0`,
/// `0000:C4:00.0`, `00008ED0:00:00.0`) into `(domain, bus, device, function)`.
pub fn parse_pci(text: &str) -> Option<(u32, u8, u8, u8)> {
    let pci = crate::gpu::PciAddress::parse(text)?;
    // Sysfs and the tools always give the function; a spelling without it is not theirs.
    Some((pci.domain, pci.bus, pci.device, pci.function?))
}

/// A PCI address in sysfs form: lowercase, a 4-digit domain unless it needs more
/// (`00000000:09:00.0` -> `0000:09:00.0`), so that every source names a GPU the same way.
pub fn normalize_pci(text: &str) -> Option<String> {
    let pci = crate::gpu::PciAddress::parse(text)?;
    pci.function?;
    Some(pci.to_string())
}

/// A number as a tool prints it, or `None` for anything else (`N/A`, empty).
fn parse_number(text: &str) -> Option<f64> {
    let v: f64 = text.trim().parse().ok()?;
    v.is_finite().then_some(v)
}

/// A tool-output fixture of `tests/data/tools` without its `# source:` line.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn fixture(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tools")
        .join(name);
    std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("# source:"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The simulated sysfs tree of `tests/data/sysfs` (one RX 6800).
#[cfg(test)]
pub(crate) fn sysfs_tree() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sysfs")
}

/// The RX 6800's PCI device directory inside [`sysfs_tree`].
#[cfg(test)]
pub(crate) const DEVICE_DIR: &str = "devices/pci0000:00/0000:00:03.1/0000:0b:00.0";

/// Copies a tree, links included (the simulated sysfs uses relative links as `/sys` does), so
/// a test can change it.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path()).unwrap(), &target).unwrap();
        } else if kind.is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A copy of [`sysfs_tree`] at `to` with the links as the kernel makes them (`class/drm/card0`
/// a link into the PCI device's `drm/`, `drm/card0/device` a link back up), which is what
/// rocm-smi needs to find a card's PCI address. The committed tree avoids those links because
/// a link to an ancestor is a file-system loop to every tool that walks the repository.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn sysfs_tree_with_kernel_links(to: &std::path::Path) {
    copy_tree(&sysfs_tree(), to);
    for node in ["card0", "renderD128"] {
        let class = to.join("class/drm").join(node);
        std::fs::remove_dir_all(&class).unwrap();
        std::os::unix::fs::symlink(format!("../../{DEVICE_DIR}/drm/{node}"), &class).unwrap();
        std::os::unix::fs::symlink(
            "../../../0000:0b:00.0",
            to.join(DEVICE_DIR).join("drm").join(node).join("device"),
        )
        .unwrap();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_from_every_source_look_alike() {
        assert_eq!(
            normalize_pci("00000000:09:00.0").as_deref(),
            Some("0000:09:00.0")
        );
        assert_eq!(
            normalize_pci("0000:C4:00.0").as_deref(),
            Some("0000:c4:00.0")
        );
        assert_eq!(
            normalize_pci("00008ED0:00:00.0").as_deref(),
            Some("8ed0:00:00.0")
        );
        assert_eq!(normalize_pci("GPU0000:07:00.0"), None);
        assert_eq!(parse_pci("0000:0b:00.0"), Some((0, 0x0b, 0, 0)));
    }

    #[test]
    fn values_serialize_so_a_view_can_tell_unknown_from_failed() {
        let v: Vec<Value<f64>> = vec![
            Value::Known(19.5),
            Value::Unknown,
            Value::Error("ERR!".into()),
        ];
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"[19.5,null,{"error":"ERR!"}]"#
        );
    }

    #[test]
    fn a_health_fault_becomes_a_tool_fault_with_the_device_captured() {
        let fault = HealthFault {
            class: FaultClass::GpuEcc,
            kind: HealthFaultKind::UncorrectableErrors,
            device: Some(DeviceRef {
                vendor: Vendor::Amd,
                index: Some(1),
                pci: Some("0000:0b:00.0".into()),
            }),
            source: SourceKind::AmdSysfs,
            message: "GPU 1 (0000:0b:00.0): uncorrectable umc errors rose from 0 to 1".into(),
            at: Instant::now(),
        };
        let f = fault.to_fault();
        assert_eq!(f.rule, "health-uncorrectable-errors-rose");
        assert_eq!(f.stream, Stream::Tool);
        assert_eq!(f.action, Action::Fallback);
        assert_eq!(f.captures["pci"], "0000:0b:00.0");
        assert_eq!(f.captures["gpu"], "1");
    }
}
