//! Health faults from consecutive readings of one source: what no single sample shows.
//!
//! - A GPU seen before that is gone (its sysfs directory removed, or no longer listed by a tool
//!   that otherwise answered) is `gpu_lost`.
//! - An uncorrectable ECC/RAS counter that rises between two readings is `gpu_ecc`. A count
//!   already non-zero at the first reading is history, not news.
//! - A GPU that answered before and now reports nothing (every reading `N/A`, as rocm-smi shows
//!   GPUs that stopped responding) for `confirm_after` is `gpu_lost`; so is one whose fields
//!   come back as errors (`ERR!`, `[Unknown Error]`) for that long. One bad sample is not
//!   enough: nvidia-smi's `ERR!` in a power field has been seen to pass, and a GPU being reset
//!   answers nothing for a moment.
//! - What the source itself reports ([`Problem`]: `GPU is lost`, the driver unreachable, the
//!   call hung) is passed on at once, with the class the source gave.
//!
//! Each condition is reported once, and again only after it cleared. The tracker is pure: no
//! I/O, no clock (time comes in with each reading), so its tests feed readings and assert
//! faults.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::{DeviceRef, GpuSample, HealthFault, HealthFaultKind, Problem, Reading, SourceKind};
use crate::rules::FaultClass;

/// What the tracker remembers of one GPU.
#[derive(Debug)]
struct DeviceMemory {
    device: DeviceRef,
    name: Option<String>,
    /// Seen present in the last reading that answered.
    present: bool,
    gone_reported: bool,
    /// It answered at least once; only then does silence mean something.
    ever_answered: bool,
    silent_since: Option<Instant>,
    silent_reported: bool,
    errors_since: Option<Instant>,
    errors_reported: bool,
    /// Last uncorrectable count per block.
    uncorrectable: BTreeMap<String, u64>,
}

/// Derives health faults from one source's readings. One tracker per source.
#[derive(Debug)]
pub struct Tracker {
    confirm_after: Duration,
    devices: BTreeMap<String, DeviceMemory>,
    /// Problems reported and not yet cleared, by (kind, class, pci).
    open_problems: BTreeSet<(HealthFaultKind, FaultClass, Option<String>)>,
}

impl Tracker {
    /// `confirm_after`: how long a GPU must stay silent or erroring before it is a fault.
    pub fn new(confirm_after: Duration) -> Tracker {
        Tracker {
            confirm_after,
            devices: BTreeMap::new(),
            open_problems: BTreeSet::new(),
        }
    }

    /// Takes one reading made at `now`; returns the faults it reveals.
    #[must_use]
    pub fn observe(&mut self, now: Instant, reading: &Reading) -> Vec<HealthFault> {
        let mut faults = Vec::new();
        let source = reading.source;
        self.problems(now, reading, &mut faults);
        if !reading.answered {
            return faults;
        }
        // PCI addresses the source already reported a problem for: their disappearance is the
        // same incident.
        let reported: BTreeSet<&str> = reading
            .problems
            .iter()
            .filter_map(|p| p.pci.as_deref())
            .collect();
        let mut seen = BTreeSet::new();
        for sample in &reading.gpus {
            let key = key_of(&sample.device);
            seen.insert(key.clone());
            let memory = self.devices.entry(key).or_insert_with(|| DeviceMemory {
                device: sample.device.clone(),
                name: sample.name.clone(),
                present: sample.present,
                gone_reported: false,
                ever_answered: false,
                silent_since: None,
                silent_reported: false,
                errors_since: None,
                errors_reported: false,
                uncorrectable: BTreeMap::new(),
            });
            if memory.name.is_none() {
                memory.name.clone_from(&sample.name);
            }
            if !sample.present {
                let quiet = sample
                    .device
                    .pci
                    .as_deref()
                    .is_some_and(|p| reported.contains(p));
                if memory.present && !memory.gone_reported && !quiet {
                    faults.push(gone(now, source, memory));
                }
                memory.gone_reported |= memory.present;
                memory.present = false;
                continue;
            }
            memory.present = true;
            memory.gone_reported = false;
            check_sample(now, source, self.confirm_after, memory, sample, &mut faults);
        }
        // A GPU the source stopped listing altogether (nvidia-smi leaves a lost GPU out).
        for (key, memory) in &mut self.devices {
            if seen.contains(key) || !memory.present {
                continue;
            }
            let quiet = memory
                .device
                .pci
                .as_deref()
                .is_some_and(|p| reported.contains(p));
            if !memory.gone_reported && !quiet {
                faults.push(gone(now, source, memory));
            }
            memory.gone_reported = true;
            memory.present = false;
        }
        faults
    }

    /// Passes on what the source reported, once per (kind, class, GPU) until it clears.
    fn problems(&mut self, now: Instant, reading: &Reading, faults: &mut Vec<HealthFault>) {
        let current: BTreeSet<(HealthFaultKind, FaultClass, Option<String>)> = reading
            .problems
            .iter()
            .map(|p| (p.kind, p.class, p.pci.clone()))
            .collect();
        for p in &reading.problems {
            let key = (p.kind, p.class, p.pci.clone());
            if self.open_problems.contains(&key) {
                continue;
            }
            self.open_problems.insert(key);
            faults.push(HealthFault {
                class: p.class,
                kind: p.kind,
                device: self.device_for(reading, p),
                source: reading.source,
                message: p.message.clone(),
                at: now,
            });
        }
        self.open_problems.retain(|k| current.contains(k));
    }

    /// The GPU a problem names, with its index when the tracker knows the PCI address.
    fn device_for(&self, reading: &Reading, p: &Problem) -> Option<DeviceRef> {
        let pci = p.pci.as_deref()?;
        let known = reading
            .gpus
            .iter()
            .map(|s| &s.device)
            .chain(self.devices.values().map(|m| &m.device))
            .find(|d| d.pci.as_deref() == Some(pci));
        Some(known.cloned().unwrap_or(DeviceRef {
            vendor: match reading.source {
                SourceKind::NvidiaSmi | SourceKind::Nvml => crate::gpu::Vendor::Nvidia,
                SourceKind::AmdSysfs | SourceKind::RocmSmi | SourceKind::AmdSmi => {
                    crate::gpu::Vendor::Amd
                }
            },
            index: None,
            pci: Some(pci.to_owned()),
        }))
    }
}

/// The checks of a GPU that is there: error counters, silence, failing fields.
fn check_sample(
    now: Instant,
    source: SourceKind,
    confirm_after: Duration,
    memory: &mut DeviceMemory,
    sample: &GpuSample,
    faults: &mut Vec<HealthFault>,
) {
    for count in &sample.ecc {
        let Some(n) = count.uncorrectable.known() else {
            continue;
        };
        if let Some(&before) = memory.uncorrectable.get(&count.block)
            && n > before
        {
            faults.push(HealthFault {
                class: FaultClass::GpuEcc,
                kind: HealthFaultKind::UncorrectableErrors,
                device: Some(memory.device.clone()),
                source,
                message: format!(
                    "{}: uncorrectable {} memory errors rose from {before} to {n}; its memory is failing",
                    describe(memory),
                    block_name(&count.block),
                ),
                at: now,
            });
        }
        memory.uncorrectable.insert(count.block.clone(), n);
    }

    let errors = sample.errors();
    if errors.is_empty() {
        memory.errors_since = None;
        memory.errors_reported = false;
    } else {
        let since = *memory.errors_since.get_or_insert(now);
        if !memory.errors_reported && now.duration_since(since) >= confirm_after {
            memory.errors_reported = true;
            let fields: Vec<String> = errors
                .iter()
                .map(|(field, text)| format!("{field} {text}"))
                .collect();
            faults.push(HealthFault {
                class: FaultClass::GpuLost,
                kind: HealthFaultKind::FieldErrors,
                device: Some(memory.device.clone()),
                source,
                message: format!(
                    "{}: {source} has reported errors for {} ({}): the driver cannot read this GPU",
                    describe(memory),
                    seconds(now.duration_since(since)),
                    fields.join(", "),
                ),
                at: now,
            });
        }
    }

    if sample.answers() {
        memory.ever_answered = true;
        memory.silent_since = None;
        memory.silent_reported = false;
    } else if memory.ever_answered && errors.is_empty() {
        // All fields failing is reported as errors above; this is the quieter "N/A" kind.
        let since = *memory.silent_since.get_or_insert(now);
        if !memory.silent_reported && now.duration_since(since) >= confirm_after {
            memory.silent_reported = true;
            faults.push(HealthFault {
                class: FaultClass::GpuLost,
                kind: HealthFaultKind::Silent,
                device: Some(memory.device.clone()),
                source,
                message: format!(
                    "{}: no utilization, memory, temperature or power reading for {}: the GPU stopped answering",
                    describe(memory),
                    seconds(now.duration_since(since)),
                ),
                at: now,
            });
        }
    }
}

fn gone(now: Instant, source: SourceKind, memory: &DeviceMemory) -> HealthFault {
    let how = match source {
        SourceKind::AmdSysfs => "its sysfs device directory is gone",
        SourceKind::RocmSmi | SourceKind::AmdSmi | SourceKind::NvidiaSmi => {
            "the tool no longer lists it"
        }
        SourceKind::Nvml => "NVML no longer counts it",
    };
    HealthFault {
        class: FaultClass::GpuLost,
        kind: HealthFaultKind::Disappeared,
        device: Some(memory.device.clone()),
        source,
        message: format!(
            "{} disappeared ({how}): the driver lost it or it fell off the bus",
            describe(memory)
        ),
        at: now,
    }
}

/// `GPU 1 (0000:0b:00.0, AMD Radeon RX 6800)`.
fn describe(memory: &DeviceMemory) -> String {
    let d = &memory.device;
    let mut parts = Vec::new();
    if let Some(pci) = &d.pci {
        parts.push(pci.clone());
    }
    if let Some(name) = &memory.name {
        parts.push(name.clone());
    }
    let head = match d.index {
        Some(i) => format!("GPU {i}"),
        None => format!("{} GPU", d.vendor.as_str()),
    };
    if parts.is_empty() {
        head
    } else {
        format!("{head} ({})", parts.join(", "))
    }
}

fn block_name(block: &str) -> String {
    match block {
        "umc" => "UMC (VRAM)".to_owned(),
        "total" | "volatile total" => "ECC".to_owned(),
        other => other.to_uppercase(),
    }
}

fn seconds(d: Duration) -> String {
    format!("{:.0} s", d.as_secs_f64())
}

/// How the tracker tells GPUs apart: by PCI address when known (stable across tools and
/// index changes), else by index.
fn key_of(d: &DeviceRef) -> String {
    match (&d.pci, d.index) {
        (Some(pci), _) => format!("{}:{pci}", d.vendor.as_str()),
        (None, Some(i)) => format!("{}#{i}", d.vendor.as_str()),
        (None, None) => format!("{}?", d.vendor.as_str()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::gpu::Vendor;
    use crate::sources::health::{EccCount, Value};

    fn sample(index: u32, pci: &str) -> GpuSample {
        GpuSample {
            device: DeviceRef {
                vendor: Vendor::Amd,
                index: Some(index),
                pci: Some(pci.to_owned()),
            },
            name: Some("AMD Radeon RX 6800".into()),
            arch: Some("gfx1030".into()),
            present: true,
            utilization_percent: Value::Known(0.0),
            vram_used_bytes: Value::Known(17_453_056),
            vram_total_bytes: Value::Known(17_163_091_968),
            temperature_c: Value::Known(49.0),
            hotspot_c: Value::Known(49.0),
            power_w: Value::Known(19.0),
            processes: None,
            ecc: vec![EccCount {
                block: "umc".into(),
                uncorrectable: Value::Known(0),
                correctable: Value::Known(0),
            }],
        }
    }

    fn reading(gpus: Vec<GpuSample>) -> Reading {
        let mut r = Reading::new(SourceKind::AmdSysfs);
        r.gpus = gpus;
        r
    }

    fn silent(mut s: GpuSample) -> GpuSample {
        s.utilization_percent = Value::Unknown;
        s.vram_used_bytes = Value::Unknown;
        s.temperature_c = Value::Unknown;
        s.hotspot_c = Value::Unknown;
        s.power_w = Value::Unknown;
        s
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn a_gpu_that_disappears_is_lost_once() {
        let mut t = Tracker::new(3 * SECOND);
        let t0 = Instant::now();
        let a = sample(0, "0000:0b:00.0");
        let b = sample(1, "0000:0c:00.0");
        assert!(
            t.observe(t0, &reading(vec![a.clone(), b.clone()]))
                .is_empty()
        );
        let mut gone_b = b.clone();
        gone_b.present = false;
        let faults = t.observe(t0 + SECOND, &reading(vec![a.clone(), gone_b.clone()]));
        assert_eq!(faults.len(), 1);
        let f = &faults[0];
        assert_eq!(f.class, FaultClass::GpuLost);
        assert_eq!(f.kind, HealthFaultKind::Disappeared);
        assert_eq!(f.device.as_ref().unwrap().index, Some(1));
        assert_eq!(
            f.message,
            "GPU 1 (0000:0c:00.0, AMD Radeon RX 6800) disappeared (its sysfs device directory \
             is gone): the driver lost it or it fell off the bus"
        );
        assert!(
            t.observe(t0 + 2 * SECOND, &reading(vec![a.clone(), gone_b]))
                .is_empty()
        );
        // Back, then gone again: a new incident.
        assert!(
            t.observe(t0 + 3 * SECOND, &reading(vec![a.clone(), b]))
                .is_empty()
        );
        assert_eq!(t.observe(t0 + 4 * SECOND, &reading(vec![a])).len(), 1);
    }

    #[test]
    fn a_source_that_did_not_answer_loses_no_gpu() {
        let mut t = Tracker::new(3 * SECOND);
        let t0 = Instant::now();
        assert!(
            t.observe(t0, &reading(vec![sample(0, "0000:0b:00.0")]))
                .is_empty()
        );
        let mut r = reading(vec![]);
        r.answered = false;
        assert!(t.observe(t0 + SECOND, &r).is_empty());
    }

    #[test]
    fn a_rising_uncorrectable_count_is_an_ecc_fault_but_old_counts_are_not() {
        let mut t = Tracker::new(3 * SECOND);
        let t0 = Instant::now();
        let mut s = sample(0, "0000:0b:00.0");
        s.ecc[0].uncorrectable = Value::Known(4);
        assert!(
            t.observe(t0, &reading(vec![s.clone()])).is_empty(),
            "history"
        );
        s.ecc[0].correctable = Value::Known(50);
        assert!(t.observe(t0 + SECOND, &reading(vec![s.clone()])).is_empty());
        s.ecc[0].uncorrectable = Value::Known(6);
        let faults = t.observe(t0 + 2 * SECOND, &reading(vec![s.clone()]));
        assert_eq!(faults.len(), 1);
        assert_eq!(faults[0].class, FaultClass::GpuEcc);
        assert_eq!(
            faults[0].message,
            "GPU 0 (0000:0b:00.0, AMD Radeon RX 6800): uncorrectable UMC (VRAM) memory errors \
             rose from 4 to 6; its memory is failing"
        );
        // A counter that cannot be read this time is no change either way.
        s.ecc[0].uncorrectable = Value::Unknown;
        assert!(
            t.observe(t0 + 3 * SECOND, &reading(vec![s.clone()]))
                .is_empty()
        );
        s.ecc[0].uncorrectable = Value::Known(6);
        assert!(t.observe(t0 + 4 * SECOND, &reading(vec![s])).is_empty());
    }

    #[test]
    fn silence_counts_only_when_it_lasts_and_only_for_a_gpu_that_answered() {
        let mut t = Tracker::new(3 * SECOND);
        let t0 = Instant::now();
        let s = sample(0, "0000:0b:00.0");
        // A GPU that never answered (a tool without permissions) is not "silent".
        let mut other = silent(sample(1, "0000:0c:00.0"));
        other.name = None;
        assert!(
            t.observe(t0, &reading(vec![s.clone(), other.clone()]))
                .is_empty()
        );
        for i in 1..=3 {
            let at = t0 + i * SECOND;
            let faults = t.observe(at, &reading(vec![silent(s.clone()), other.clone()]));
            assert!(faults.is_empty(), "second {i}: {faults:?}");
        }
        let faults = t.observe(
            t0 + 4 * SECOND,
            &reading(vec![silent(s.clone()), other.clone()]),
        );
        assert_eq!(faults.len(), 1);
        assert_eq!(faults[0].kind, HealthFaultKind::Silent);
        assert_eq!(faults[0].class, FaultClass::GpuLost);
        assert!(
            faults[0].message.contains("for 3 s"),
            "{}",
            faults[0].message
        );
        assert!(
            t.observe(
                t0 + 5 * SECOND,
                &reading(vec![silent(s.clone()), other.clone()])
            )
            .is_empty()
        );
        // Answering again clears it.
        assert!(
            t.observe(t0 + 6 * SECOND, &reading(vec![s, other]))
                .is_empty()
        );
    }

    #[test]
    fn a_one_sample_err_passes_and_a_lasting_one_is_a_fault() {
        let mut t = Tracker::new(2 * SECOND);
        let t0 = Instant::now();
        let ok = sample(0, "0000:8e:d0.0");
        let mut err = ok.clone();
        err.power_w = Value::Error("ERR!".into());
        assert!(t.observe(t0, &reading(vec![err.clone()])).is_empty());
        assert!(t.observe(t0 + SECOND, &reading(vec![ok])).is_empty());
        assert!(
            t.observe(t0 + 2 * SECOND, &reading(vec![err.clone()]))
                .is_empty()
        );
        assert!(
            t.observe(t0 + 3 * SECOND, &reading(vec![err.clone()]))
                .is_empty()
        );
        let faults = t.observe(t0 + 4 * SECOND, &reading(vec![err.clone()]));
        assert_eq!(faults.len(), 1);
        assert_eq!(faults[0].kind, HealthFaultKind::FieldErrors);
        assert!(
            faults[0].message.contains("power ERR!"),
            "{}",
            faults[0].message
        );
        assert!(t.observe(t0 + 5 * SECOND, &reading(vec![err])).is_empty());
    }

    #[test]
    fn problems_pass_at_once_and_once() {
        let mut t = Tracker::new(3 * SECOND);
        let t0 = Instant::now();
        let mut r = Reading::new(SourceKind::NvidiaSmi);
        r.answered = false;
        r.problems.push(Problem {
            class: FaultClass::GpuUnavailable,
            kind: HealthFaultKind::ToolHung,
            pci: None,
            message: "nvidia-smi did not answer within 10 s".into(),
        });
        let faults = t.observe(t0, &r);
        assert_eq!(faults.len(), 1);
        assert_eq!(faults[0].device, None);
        assert!(
            t.observe(t0 + SECOND, &r).is_empty(),
            "still hung: said already"
        );
        assert!(
            t.observe(t0 + 2 * SECOND, &Reading::new(SourceKind::NvidiaSmi))
                .is_empty()
        );
        assert_eq!(t.observe(t0 + 3 * SECOND, &r).len(), 1, "hung again");
    }

    #[test]
    fn a_lost_gpu_named_by_the_tool_is_one_fault_not_two() {
        let mut t = Tracker::new(3 * SECOND);
        let t0 = Instant::now();
        let mut a = sample(0, "0000:02:00.0");
        a.device.vendor = Vendor::Nvidia;
        let mut b = sample(1, "0000:03:00.0");
        b.device.vendor = Vendor::Nvidia;
        let mut r = Reading::new(SourceKind::NvidiaSmi);
        r.gpus = vec![a, b.clone()];
        assert!(t.observe(t0, &r).is_empty());
        let mut r = Reading::new(SourceKind::NvidiaSmi);
        r.gpus = vec![b];
        r.problems.push(Problem {
            class: FaultClass::GpuLost,
            kind: HealthFaultKind::ToolReported,
            pci: Some("0000:02:00.0".into()),
            message: "nvidia-smi: Unable to determine the device handle for GPU 0000:02:00.0: \
                      GPU is lost. Reboot the system to recover this GPU"
                .into(),
        });
        let faults = t.observe(t0 + SECOND, &r);
        assert_eq!(faults.len(), 1, "{faults:?}");
        assert_eq!(faults[0].kind, HealthFaultKind::ToolReported);
        let d = faults[0].device.as_ref().unwrap();
        assert_eq!(d.index, Some(0), "the index is known from earlier samples");
    }
}
