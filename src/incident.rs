//! Root cause or cascade: which fault of an incident is its cause, and which ones only follow
//! from it.
//!
//! One incident leaves several fault lines. An Xid 79 is followed by a second Xid 79, by
//! "GPU has fallen off the bus" and by Xid 45 "preemptive cleanup, due to previous errors"; an
//! amdgpu page fault by a ring timeout and a reset; an illegal address on one rank by the NCCL
//! watchdog's fallout on every other rank, and the process's crash. Reported one by one they
//! read as many faults; the first is the one to act on and to tell the user about. A [`Linker`]
//! sees the faults of one log (or one attempt) in order and says of each whether it starts an
//! incident ([`Role::Root`]) or continues one ([`Role::Cascade`], naming its root).
//!
//! A fault is a cascade of an earlier root when
//! - its line says so: Xid 45's `caused by previous Xid N` or `due to previous errors`, a CUDA
//!   error "... due to a previous error"; it then follows the latest root of that Xid (or of
//!   its device), and when none was seen it is still a cascade, of a root not in the log;
//! - or it comes within the window after a root of the same device (or names no device, like
//!   the job's own stderr), and its class is one a fault of the root's class leads to: the same
//!   class again, a runtime error, a collective failure, a crash, a reset, or the GPU being lost
//!   or hung after a GPU fault.
//!
//! A fault that is only noted (action `note`) never starts an incident: a Nonfatal NVLink event
//! must not make the Xid 79 after it a cascade. Pure: no I/O, no clock; positions (line numbers
//! for `scan`, seconds for a run) are given by the caller.

use std::sync::OnceLock;

use regex::Regex;
use serde::Serialize;

use crate::gpu::PciAddress;
use crate::rules::{Action, Fault, FaultClass};

/// What a fault is in its incident.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum Role {
    /// It starts an incident: the cause to act on and to name.
    Root,
    /// It follows from an earlier fault. `root` is that fault, `None` when the line names a
    /// cause that is not in the log (an Xid 45 whose Xid came before the log starts).
    Cascade {
        #[serde(skip_serializing_if = "Option::is_none")]
        root: Option<RootRef>,
        why: String,
    },
}

impl Role {
    pub fn is_cascade(&self) -> bool {
        matches!(self, Role::Cascade { .. })
    }
}

/// The root a cascade points at.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RootRef {
    pub class: FaultClass,
    pub rule: String,
    pub line: String,
    /// Where the root was: its line number for `scan`; `None` in a run's journal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at_line: Option<usize>,
}

/// A root seen, and where.
#[derive(Clone, Debug)]
struct Seen {
    fault: RootRef,
    device: Option<(u32, u8, u8)>,
    xid: Option<u32>,
    at: f64,
}

/// Links the faults of one log or one attempt into incidents.
#[derive(Clone, Debug)]
pub struct Linker {
    /// How far after a root (in the caller's units) a fault can still follow from it.
    window: f64,
    roots: Vec<Seen>,
}

/// The window for `scan`, in lines: an incident's lines come together, with a traceback or a
/// register dump between them at most.
pub const SCAN_WINDOW_LINES: f64 = 400.0;

/// The window for a run, in seconds: the NCCL watchdog's fallout comes within its timeout of the
/// root (commonly 10 min); a second one after that is a new incident.
pub const RUN_WINDOW_SECONDS: f64 = 600.0;

/// Roots kept: the latest ones are the ones a cascade follows.
const KEPT: usize = 64;

impl Linker {
    pub fn new(window: f64) -> Linker {
        Linker {
            window,
            roots: Vec::new(),
        }
    }

    /// Says what `fault`, seen at position `at` (not before any earlier call's), is. `at_line`
    /// is kept in the root reference of faults that follow it.
    pub fn link(&mut self, fault: &Fault, at: f64, at_line: Option<usize>) -> Role {
        let device = device_of(fault);
        self.roots.retain(|r| at - r.at <= self.window);
        if let Some((xid, why)) = named_cause(&fault.line) {
            // Its root is on its device (any root, for a line that names none): the Xid it
            // names if that was seen, else the latest.
            let candidates = || {
                self.roots
                    .iter()
                    .rev()
                    .filter(|r| same_device(r.device, device))
            };
            let root = candidates()
                .find(|r| xid.is_some() && r.xid == xid)
                .or_else(|| candidates().next())
                .map(|r| r.fault.clone());
            return Role::Cascade { root, why };
        }
        let follows = self
            .roots
            .iter()
            .rev()
            .find(|r| same_device(r.device, device) && leads_to(r.fault.class, fault.class));
        if let Some(root) = follows {
            let why = if root.fault.class == fault.class {
                format!("{} again after {}", fault.class, root.fault.rule)
            } else {
                format!(
                    "{} after {} ({})",
                    fault.class, root.fault.class, root.fault.rule
                )
            };
            return Role::Cascade {
                root: Some(root.fault.clone()),
                why,
            };
        }
        if fault.action > Action::Note {
            if self.roots.len() == KEPT {
                self.roots.remove(0);
            }
            self.roots.push(Seen {
                fault: RootRef {
                    class: fault.class,
                    rule: fault.rule.clone(),
                    line: fault.line.trim().to_string(),
                    at_line,
                },
                device,
                xid: fault.captures.get("xid").and_then(|x| x.parse().ok()),
                at,
            });
        }
        Role::Root
    }
}

/// The device a fault names, as a PCI slot.
fn device_of(fault: &Fault) -> Option<(u32, u8, u8)> {
    fault
        .captures
        .get("pci")
        .and_then(|p| PciAddress::parse(p))
        .map(PciAddress::slot)
}

/// Two faults can be of one incident unless both name devices and the devices differ.
fn same_device(a: Option<(u32, u8, u8)>, b: Option<(u32, u8, u8)>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

/// A line that names its cause: Xid 45's "caused by previous Xid N" (with N) or "due to previous
/// errors", and runtime errors "due to a previous error".
fn named_cause(line: &str) -> Option<(Option<u32>, String)> {
    static NAMED: OnceLock<Regex> = OnceLock::new();
    let re = NAMED.get_or_init(|| {
        Regex::new(r"\bcaused by previous Xid (\d+)|\bdue to (?:a )?previous errors?\b|\bPreemptive Cleanup\b")
            .expect("the pattern compiles")
    });
    let caps = re.captures(line)?;
    let xid = caps.get(1).and_then(|m| m.as_str().parse().ok());
    let why = match xid {
        Some(n) => format!("the line says it was caused by Xid {n}"),
        None => "the line says it follows a previous error".to_string(),
    };
    Some((xid, why))
}

/// Whether a fault of class `after` can follow from a root of class `root` in one incident.
fn leads_to(root: FaultClass, after: FaultClass) -> bool {
    use FaultClass::*;
    if root == after {
        return true;
    }
    let gpu_fault = matches!(
        root,
        GpuMemoryFault
            | GpuException
            | GpuHang
            | GpuLost
            | GpuEcc
            | GpuInterconnect
            | GpuDriverError
            | GpuReset
    );
    match after {
        // What any fault that kills a GPU context or a rank leaves behind.
        CollectiveFailure | ProcessCrash => root != GpuUnavailable,
        GpuRuntimeError => gpu_fault || matches!(root, DeviceAssert | GpuOom),
        // The driver's recovery after a GPU fault: a hang detected, a reset, the GPU given up.
        GpuReset | GpuHang | GpuLost => gpu_fault,
        // The job's own view of a GPU fault the kernel reported first (an illegal address on
        // stderr after Xid 31 or an amdgpu page fault).
        GpuMemoryFault | GpuException => {
            matches!(root, GpuMemoryFault | GpuException | GpuEcc | GpuLost)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{RuleSet, Stream};

    fn faults(lines: &[(&str, Stream)]) -> Vec<Fault> {
        let rules = RuleSet::builtin().expect("built-in rules load");
        lines
            .iter()
            .map(|(l, s)| {
                rules
                    .classify(*s, l)
                    .unwrap_or_else(|| panic!("no rule for {l}"))
            })
            .collect()
    }

    fn roles(faults: &[Fault]) -> Vec<Role> {
        let mut linker = Linker::new(SCAN_WINDOW_LINES);
        faults
            .iter()
            .enumerate()
            .map(|(i, f)| linker.link(f, i as f64, Some(i + 1)))
            .collect()
    }

    fn root_rule(role: &Role) -> Option<&str> {
        match role {
            Role::Cascade { root: Some(r), .. } => Some(r.rule.as_str()),
            _ => None,
        }
    }

    #[test]
    fn an_xid_79_and_what_follows_it_are_one_incident() {
        let f = faults(&[
            (
                "NVRM: Xid (PCI:0000:06:00): 79, pid=4721, name=python3, GPU has fallen off the bus.",
                Stream::Kernel,
            ),
            (
                "NVRM: Xid (PCI:0000:06:00): 79, GPU has fallen off the bus.",
                Stream::Kernel,
            ),
            (
                "NVRM: GPU 0000:06:00.0: GPU has fallen off the bus.",
                Stream::Kernel,
            ),
            (
                "NVRM: Xid (PCI:0000:06:00): 45, pid=4721, name=python3, Ch 00000010, Preemptive Cleanup, due to previous errors",
                Stream::Kernel,
            ),
            (
                "RuntimeError: CUDA error: unspecified launch failure",
                Stream::Stderr,
            ),
            (
                "[rank1]:[E410 01:50:33.889423318 ProcessGroupNCCL.cpp:1895] [PG ID 0 PG GUID 0(default_pg) Rank 1] Process group watchdog thread terminated with exception: CUDA error: unspecified launch failure",
                Stream::Stderr,
            ),
        ]);
        let r = roles(&f);
        assert_eq!(r[0], Role::Root);
        for role in &r[1..] {
            assert_eq!(root_rule(role), Some("xid-79"), "{role:?}");
        }
    }

    #[test]
    fn xid_45_follows_the_xid_it_names_and_other_devices_are_other_incidents() {
        let f = faults(&[
            (
                "NVRM: Xid (PCI:0000:dc:00): 149, NETIR_LINK_EVT Fatal XC0 i0 Link 00 (0x026001c6 0x00000000 0x00000000 0x00000000 0x00000000 0x00000000)",
                Stream::Kernel,
            ),
            (
                "NVRM: Xid (PCI:0000:ed:00): 31, pid=9, name=python3, Ch 00000008, intr 00000000. MMU Fault: ENGINE GRAPHICS GPCCLIENT_T1_8 faulted @ 0x73ac_1c000000. Fault is of type FAULT_PDE ACCESS_TYPE_VIRT_WRITE",
                Stream::Kernel,
            ),
            (
                "NVRM: Xid (PCI:0000:dc:00): 45, pid=1818990, name=python3, Ch 00000001 caused by previous Xid 149",
                Stream::Kernel,
            ),
            (
                "NVRM: Xid (PCI:0000:aa:00): 45, pid=1818992, name=python3, Ch 0000000c caused by previous Xid 145",
                Stream::Kernel,
            ),
        ]);
        let r = roles(&f);
        assert_eq!(r[0], Role::Root);
        // Xid 31 on another GPU is an incident of its own.
        assert_eq!(r[1], Role::Root);
        assert_eq!(root_rule(&r[2]), Some("xid-149"));
        // A cause the log does not hold is still named a cascade, of no root.
        assert!(
            matches!(r[3], Role::Cascade { root: None, .. }),
            "{:?}",
            r[3]
        );
    }

    #[test]
    fn a_noted_fault_starts_no_incident_and_unrelated_faults_stay_roots() {
        let f = faults(&[
            (
                "NVRM: Xid (PCI:0000:01:00): 144, SAW_MVB Nonfatal XC0 i0 Link 0 (0x00000001 0x00000008 0x00000000 0x00000000 0x00000000 0x00000000)",
                Stream::Kernel,
            ),
            (
                "NVRM: Xid (PCI:0000:01:00): 79, GPU has fallen off the bus.",
                Stream::Kernel,
            ),
            (
                "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.11 GiB of which 6.50 MiB is free.",
                Stream::Stderr,
            ),
        ]);
        let r = roles(&f);
        assert_eq!(r[0], Role::Root);
        assert_eq!(r[1], Role::Root);
        // Running out of memory does not follow from a lost GPU.
        assert_eq!(r[2], Role::Root);
    }

    #[test]
    fn a_root_out_of_the_window_is_forgotten() {
        let f = faults(&[
            (
                "NVRM: Xid (PCI:0000:06:00): 79, GPU has fallen off the bus.",
                Stream::Kernel,
            ),
            (
                "NVRM: Xid (PCI:0000:06:00): 79, GPU has fallen off the bus.",
                Stream::Kernel,
            ),
        ]);
        let mut linker = Linker::new(10.0);
        assert_eq!(linker.link(&f[0], 0.0, None), Role::Root);
        assert_eq!(linker.link(&f[1], 11.0, None), Role::Root);
    }
}
