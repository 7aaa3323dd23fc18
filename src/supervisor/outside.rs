//! Whose fault is it: the decision for faults seen outside the job's own output (a kernel-log
//! record, a GPU health fault).
//!
//! A line on the job's stderr is the job's by construction; a kernel record or a health fault is
//! not: the machine may run other GPU work, and a fault that cannot be tied to the job must never
//! kill it. Everything here is pure: the executor (and the kernel reader thread, which must
//! decide before its bounded queue can drop anything) gathers the [`Facts`] — is the pid the
//! job's, which attempt's group was it in, which GPUs can the live attempt use — and hands them in
//! with `now`; the answer says what to do:
//!
//! - [`whose`] turns a fault and its facts into a [`Verdict`]: the live attempt's (act), an
//!   ended attempt's (a late line: it enriches that attempt's record, never stops the next one),
//!   or foreign (shown and journaled, never acted on).
//! - [`Outside::admit`] applies the repeat window (the same fault about the same process or
//!   device is forwarded once a second, the rest ride along as a count) and bounds foreign
//!   reports: the first of each rule in a minute is reported in full, the rest are counted and
//!   come out as one [`ForeignRepeats`] when the minute is over ([`Outside::due`]) or the run ends
//!   ([`Outside::drain`]). A flood of 200,000 lines about other processes is a handful of
//!   records, whatever it names, and memory stays bounded by the number of rules.
//!
//! It is not for gathering the facts (`crate::attribution` reads `/proc`) nor for what happens to
//! the job once a fault is the job's (`super::Supervisor`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::gpu::PciAddress;
use crate::rules::{Fault, FaultClass};

/// The same fault about the same process or device is forwarded at most once per window.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(1);

/// Foreign faults are reported in full once per rule and window; the rest are counted.
pub const FOREIGN_WINDOW: Duration = Duration::from_secs(60);

/// Distinct (rule, process/device) keys the repeat window remembers before forgetting the stale.
const MAX_REPEAT_KEYS: usize = 4096;

/// A GPU's PCI slot: (domain, bus, device).
pub type Slot = (u32, u8, u8);

/// Whether a pid belongs to the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// A live member, or a dead one that was seen as a member.
    Job,
    /// Alive and not in the job's tree (gpuwarden itself included), or a dead pid whose
    /// number now belongs to another process.
    Foreign,
    /// Dead, and never seen: nothing can tell.
    Unknown,
}

/// What the executor knows about the process a fault line names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PidFacts {
    pub pid: u32,
    /// Whether the pid is (or was) one of the job's processes.
    pub membership: Membership,
    /// The attempt whose process group the pid was seen in, if it was seen.
    pub attempt: Option<u32>,
}

/// The facts a verdict needs, gathered by the executor at the moment the fault is seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// The attempt that is running or being stopped.
    pub live: Option<u32>,
    /// The process the line names (when it names one).
    pub pid: Option<PidFacts>,
    /// The PCI slots of the GPUs the live attempt can use (empty on a CPU tier).
    pub usable: Vec<Slot>,
    /// The fault comes from the GPU health sampler (a tool or sysfs), not the kernel log: one
    /// that names no device (a hung tool, an unreachable driver) concerns every GPU.
    pub health: bool,
}

/// Whom an outside fault concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Verdict {
    /// The live attempt's: stop it. The text says why (for the journal).
    Act { attempt: u32, why: String },
    /// A process of `attempt`, which has ended: a late line that enriches that attempt's record.
    Late { attempt: u32, why: String },
    /// Someone else's, or nothing can tell: show and journal, never act.
    Foreign { reason: String },
}

/// Decides whom a fault seen outside the job's output concerns.
///
/// - A line that names a pid concerns the job when the pid is in the job's tree; a pid seen in
///   an earlier attempt's group concerns that attempt, not the live one.
/// - Otherwise a line that names a device concerns the job when the device is one the live
///   attempt can use.
/// - A health fault that names no device (a tool that hangs) concerns every GPU, so the job's
///   when it uses any.
/// - A kernel line that names neither is not attributed: a fault that cannot be tied to the job
///   must not kill it.
pub fn whose(fault: &Fault, facts: &Facts) -> Verdict {
    let foreign = |reason: String| Verdict::Foreign { reason };
    let act = |why: String| match facts.live {
        Some(attempt) => Verdict::Act { attempt, why },
        None => foreign(format!("{why}, but no attempt is running")),
    };
    if let Some(p) = &facts.pid {
        let pid = p.pid;
        return match p.membership {
            Membership::Job => {
                let why = format!("pid {pid} is in the job's process tree");
                match p.attempt {
                    Some(earlier) if Some(earlier) != facts.live => Verdict::Late {
                        attempt: earlier,
                        why: format!("pid {pid} belonged to attempt {earlier}, which has ended"),
                    },
                    _ => act(why),
                }
            }
            Membership::Foreign => foreign(format!("pid {pid} is not in the job's process tree")),
            Membership::Unknown => foreign(format!(
                "pid {pid} is gone and was never seen in the job's process tree"
            )),
        };
    }
    if let Some(pci) = fault.captures.get("pci") {
        return match PciAddress::parse(pci).map(PciAddress::slot) {
            Some(slot) if facts.usable.contains(&slot) => {
                act(format!("device {pci} is a GPU the job can use"))
            }
            Some(_) if facts.usable.is_empty() => foreign(format!(
                "device {pci}: the job uses no GPU of this machine on its current tier"
            )),
            Some(_) => foreign(format!("device {pci} is not a GPU the job can use")),
            None => foreign(format!("device `{pci}` is not a PCI address")),
        };
    }
    if facts.health {
        return if facts.usable.is_empty() {
            foreign("the job uses no GPU on its current tier".to_string())
        } else {
            act("it concerns every GPU, and the job uses GPUs".to_string())
        };
    }
    foreign("the line names no process and no device of the job".to_string())
}

/// The process or device a fault line names, for telling repeats of one fault apart from a
/// different one: `pid 447`, `pci 0000:03:00.0`, or nothing.
pub fn whom(fault: &Fault) -> String {
    ["pid", "pci", "node", "gpu"]
        .iter()
        .find_map(|k| fault.captures.get(*k).map(|v| format!("{k} {v}")))
        .unwrap_or_default()
}

/// What [`Outside::admit`] decided for one fault.
#[derive(Debug, Clone)]
#[must_use]
pub enum Admission {
    /// The live attempt's fault: hand it to the supervisor. `repeats` counts the records of the
    /// same fault held back since the last one forwarded.
    Act {
        attempt: u32,
        fault: Box<Fault>,
        repeats: u64,
    },
    /// Not the live attempt's, and among the first of its rule in this window (one per process
    /// or device, up to [`FULL_REPORTS`]): show and journal it in full. `ended` is the attempt
    /// a late line is about (its process belonged to that attempt, which has ended).
    Foreign {
        fault: Box<Fault>,
        reason: String,
        ended: Option<u32>,
    },
    /// Held back: a repeat within its window, counted and reported later.
    Held,
}

/// Foreign faults of one rule counted in a window after the first was reported.
#[derive(Debug, Clone, PartialEq)]
pub struct ForeignRepeats {
    pub rule: String,
    pub class: FaultClass,
    /// Faults of the rule in the window after those reported in full.
    pub count: u64,
    /// How many different processes or devices they named (up to 1,000; more says "1000+").
    pub whom: usize,
    /// How long the window lasted.
    pub seconds: f64,
}

#[derive(Debug)]
struct ForeignWindow {
    class: FaultClass,
    opened: Instant,
    /// The processes/devices reported in full in this window.
    reported: Vec<String>,
    count: u64,
    /// The processes/devices named, bounded: only the number is reported.
    whom: HashSet<String>,
}

/// Foreign faults of one rule reported in full per window (each about a different process or
/// device); the rest of the window is counted.
pub const FULL_REPORTS: usize = 10;

/// Keeps at most this many names per window for counting distinct processes or devices.
const MAX_WHOM: usize = 1000;

/// The repeat window and the foreign-fault windows. See the module documentation.
#[derive(Debug, Default)]
pub struct Outside {
    /// Last forward and records held since, by (rule, process/device), for the job's faults.
    forwarded: HashMap<(String, String), (Instant, u64)>,
    /// Open foreign windows, by rule.
    foreign: BTreeMap<String, ForeignWindow>,
    /// Foreign faults by rule for the whole run: (seen, reported in full).
    totals: BTreeMap<String, (u64, u64)>,
}

impl Outside {
    pub fn new() -> Outside {
        Outside::default()
    }

    /// Applies the windows to a fault whose verdict is known.
    pub fn admit(&mut self, mut fault: Fault, verdict: Verdict, now: Instant) -> Admission {
        let (reason, ended) = match verdict {
            Verdict::Act { attempt, why } => return self.admit_act(fault, attempt, why, now),
            Verdict::Late { attempt, why } => (why, Some(attempt)),
            Verdict::Foreign { reason } => (reason, None),
        };
        let total = self.totals.entry(fault.rule.clone()).or_insert((0, 0));
        total.0 += 1;
        let who = whom(&fault);
        let window = match self.foreign.get_mut(&fault.rule) {
            Some(w) if now.saturating_duration_since(w.opened) < FOREIGN_WINDOW => w,
            _ => {
                // A window that is over and was not collected yet is replaced: its count is
                // lost only if `due` was never called, which the executor does every second.
                self.foreign.insert(
                    fault.rule.clone(),
                    ForeignWindow {
                        class: fault.class,
                        opened: now,
                        count: 0,
                        reported: Vec::new(),
                        whom: HashSet::new(),
                    },
                );
                let Some(w) = self.foreign.get_mut(&fault.rule) else {
                    return Admission::Held;
                };
                w
            }
        };
        if window.reported.len() < FULL_REPORTS && !window.reported.contains(&who) {
            window.reported.push(who);
            if let Some(total) = self.totals.get_mut(&fault.rule) {
                total.1 += 1;
            }
            fault.attribution = ended.map(|_| reason.clone());
            return Admission::Foreign {
                fault: Box::new(fault),
                reason,
                ended,
            };
        }
        window.count += 1;
        if window.whom.len() < MAX_WHOM {
            window.whom.insert(who);
        }
        Admission::Held
    }

    fn admit_act(
        &mut self,
        mut fault: Fault,
        attempt: u32,
        why: String,
        now: Instant,
    ) -> Admission {
        let key = (fault.rule.clone(), whom(&fault));
        if let Some((last, held)) = self.forwarded.get_mut(&key)
            && now.saturating_duration_since(*last) < REPEAT_WINDOW
        {
            *held += 1;
            return Admission::Held;
        }
        if self.forwarded.len() >= MAX_REPEAT_KEYS {
            self.forwarded
                .retain(|_, (last, _)| now.saturating_duration_since(*last) < REPEAT_WINDOW);
        }
        let repeats = self.forwarded.insert(key, (now, 0)).map_or(0, |(_, h)| h);
        fault.attribution = Some(why);
        Admission::Act {
            attempt,
            fault: Box::new(fault),
            repeats,
        }
    }

    /// The foreign windows that are over at `now`, with their counts (windows with no repeats
    /// close silently).
    pub fn due(&mut self, now: Instant) -> Vec<ForeignRepeats> {
        let over: Vec<String> = self
            .foreign
            .iter()
            .filter(|(_, w)| now.saturating_duration_since(w.opened) >= FOREIGN_WINDOW)
            .map(|(rule, _)| rule.clone())
            .collect();
        over.into_iter()
            .filter_map(|rule| {
                let w = self.foreign.remove(&rule)?;
                Self::summary(rule, w, now)
            })
            .collect()
    }

    /// Every open window's count, at the end of the run.
    pub fn drain(&mut self, now: Instant) -> Vec<ForeignRepeats> {
        std::mem::take(&mut self.foreign)
            .into_iter()
            .filter_map(|(rule, w)| Self::summary(rule, w, now))
            .collect()
    }

    /// Foreign faults of the whole run that were counted rather than reported in full, by
    /// rule: (seen in all, reported in full).
    pub fn counted(&self) -> impl Iterator<Item = (&str, u64, u64)> {
        self.totals
            .iter()
            .filter(|(_, (seen, reported))| seen > reported)
            .map(|(rule, &(seen, reported))| (rule.as_str(), seen, reported))
    }

    fn summary(rule: String, w: ForeignWindow, now: Instant) -> Option<ForeignRepeats> {
        (w.count > 0).then(|| ForeignRepeats {
            rule,
            class: w.class,
            count: w.count,
            whom: w.whom.len(),
            seconds: now.saturating_duration_since(w.opened).as_secs_f64(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::rules::Stream;

    fn fault(rule: &str, caps: &[(&str, &str)]) -> Fault {
        let line = format!("{rule} line");
        Fault::for_test(
            rule,
            FaultClass::GpuMemoryFault,
            Stream::Kernel,
            &line,
            caps,
        )
    }

    fn pid(pid: u32, membership: Membership, attempt: Option<u32>) -> Option<PidFacts> {
        Some(PidFacts {
            pid,
            membership,
            attempt,
        })
    }

    const GPU: Slot = (0, 0x3b, 0);

    #[test]
    fn a_pid_of_the_live_attempt_acts() {
        let f = fault("xid-31", &[("pid", "447"), ("pci", "0000:86:00.0")]);
        let facts = Facts {
            live: Some(2),
            pid: pid(447, Membership::Job, Some(2)),
            usable: vec![GPU],
            health: false,
        };
        // The pid decides before the device (which the job does not even use here).
        assert!(
            matches!(whose(&f, &facts), Verdict::Act { attempt: 2, why } if why.contains("pid 447"))
        );
    }

    #[test]
    fn a_pid_of_an_ended_attempt_is_late_not_the_live_attempts() {
        let f = fault("segfault", &[("pid", "447")]);
        let facts = Facts {
            live: Some(2),
            pid: pid(447, Membership::Job, Some(1)),
            ..Facts::default()
        };
        assert!(
            matches!(whose(&f, &facts), Verdict::Late { attempt: 1, why } if why.contains("attempt 1"))
        );
        // Between attempts (none live) it is still attempt 1's.
        let between = Facts {
            live: None,
            ..facts
        };
        assert!(matches!(
            whose(&f, &between),
            Verdict::Late { attempt: 1, .. }
        ));
    }

    #[test]
    fn a_job_pid_with_no_attempt_running_is_not_acted_on() {
        let f = fault("xid-31", &[("pid", "9")]);
        let facts = Facts {
            live: None,
            pid: pid(9, Membership::Job, None),
            ..Facts::default()
        };
        assert!(
            matches!(whose(&f, &facts), Verdict::Foreign { reason } if reason.contains("no attempt"))
        );
    }

    #[test]
    fn foreign_and_unknown_pids_are_foreign_even_on_the_jobs_gpu() {
        let f = fault("xid-31", &[("pid", "9"), ("pci", "0000:3b:00.0")]);
        let mut facts = Facts {
            live: Some(1),
            pid: pid(9, Membership::Foreign, None),
            usable: vec![GPU],
            health: false,
        };
        assert!(
            matches!(whose(&f, &facts), Verdict::Foreign { reason } if reason.contains("not in the job"))
        );
        facts.pid = pid(9, Membership::Unknown, None);
        assert!(
            matches!(whose(&f, &facts), Verdict::Foreign { reason } if reason.contains("never seen"))
        );
    }

    #[test]
    fn a_device_concerns_the_job_only_when_it_can_use_it() {
        let live = |usable: Vec<Slot>| Facts {
            live: Some(1),
            usable,
            ..Facts::default()
        };
        let ours = fault("amdgpu-ring-timeout", &[("pci", "0000:3b:00.0")]);
        let theirs = fault("amdgpu-ring-timeout", &[("pci", "0000:86:00.0")]);
        assert!(matches!(
            whose(&ours, &live(vec![GPU])),
            Verdict::Act { .. }
        ));
        assert!(matches!(
            whose(&theirs, &live(vec![GPU])),
            Verdict::Foreign { .. }
        ));
        assert!(matches!(
            whose(&ours, &live(vec![])),
            Verdict::Foreign { reason } if reason.contains("no GPU")
        ));
        let garbled = fault("x", &[("pci", "zz")]);
        assert!(
            matches!(whose(&garbled, &live(vec![GPU])), Verdict::Foreign { reason } if reason.contains("not a PCI"))
        );
    }

    #[test]
    fn a_line_naming_nothing_is_never_acted_on_but_a_deviceless_health_fault_is() {
        let f = fault("xid-79", &[("xid", "79")]);
        let kernel = Facts {
            live: Some(1),
            usable: vec![GPU],
            ..Facts::default()
        };
        assert!(
            matches!(whose(&f, &kernel), Verdict::Foreign { reason } if reason.contains("names no process"))
        );
        let health = Facts {
            health: true,
            ..kernel.clone()
        };
        assert!(matches!(whose(&f, &health), Verdict::Act { .. }));
        let cpu = Facts {
            usable: vec![],
            ..health
        };
        assert!(matches!(whose(&f, &cpu), Verdict::Foreign { .. }));
    }

    fn act(attempt: u32) -> Verdict {
        Verdict::Act {
            attempt,
            why: "pid".into(),
        }
    }

    #[test]
    fn the_jobs_fault_repeating_is_forwarded_once_a_window_with_the_count() {
        let mut o = Outside::new();
        let t0 = Instant::now();
        let f = fault("xid-31", &[("pid", "447")]);
        assert!(matches!(
            o.admit(f.clone(), act(1), t0),
            Admission::Act { repeats: 0, .. }
        ));
        for i in 1..=5 {
            let at = t0 + Duration::from_millis(100 * i);
            assert!(matches!(o.admit(f.clone(), act(1), at), Admission::Held));
        }
        // Another process's record is not held back by this one's window.
        let other = fault("xid-31", &[("pid", "448")]);
        assert!(matches!(o.admit(other, act(1), t0), Admission::Act { .. }));
        match o.admit(f, act(1), t0 + REPEAT_WINDOW) {
            Admission::Act { repeats, fault, .. } => {
                assert_eq!(repeats, 5);
                assert_eq!(fault.attribution.as_deref(), Some("pid"));
            }
            other => panic!("expected the fault forwarded, got {other:?}"),
        }
    }

    #[test]
    fn a_foreign_flood_is_a_few_reports_per_rule_and_minute_with_counts() {
        let mut o = Outside::new();
        let t0 = Instant::now();
        let foreign = || Verdict::Foreign {
            reason: "not ours".into(),
        };
        let mut reported = 0;
        for i in 0..200_000u32 {
            let f = fault("xid-31", &[("pid", &(10_000 + i % 5000).to_string())]);
            if matches!(o.admit(f, foreign(), t0), Admission::Foreign { .. }) {
                reported += 1;
            }
        }
        assert_eq!(reported, FULL_REPORTS);
        // The job's fault in the middle of it still acts.
        let ours = fault("xid-31", &[("pid", "447")]);
        assert!(matches!(o.admit(ours, act(1), t0), Admission::Act { .. }));
        assert!(o.due(t0 + Duration::from_secs(59)).is_empty());
        let due = o.due(t0 + FOREIGN_WINDOW);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].count, 200_000 - FULL_REPORTS as u64);
        assert_eq!(due[0].whom, MAX_WHOM);
        assert_eq!(
            o.counted().collect::<Vec<_>>(),
            [("xid-31", 200_000, FULL_REPORTS as u64)]
        );
        // A new window reports the rule once more.
        let f = fault("xid-31", &[("pid", "1")]);
        assert!(matches!(
            o.admit(f, foreign(), t0 + FOREIGN_WINDOW),
            Admission::Foreign { .. }
        ));
        assert!(
            o.drain(t0 + FOREIGN_WINDOW).is_empty(),
            "no repeats in the new window"
        );
    }

    #[test]
    fn late_lines_name_their_attempt_and_share_the_foreign_window() {
        let mut o = Outside::new();
        let t0 = Instant::now();
        let v = || Verdict::Late {
            attempt: 1,
            why: "pid 447 belonged to attempt 1, which has ended".into(),
        };
        let f = fault("segfault", &[("pid", "447")]);
        match o.admit(f.clone(), v(), t0) {
            Admission::Foreign { ended, fault, .. } => {
                assert_eq!(ended, Some(1));
                assert!(fault.attribution.unwrap().contains("attempt 1"));
            }
            other => panic!("expected a report, got {other:?}"),
        }
        // The same process again in the window is counted, not reported.
        assert!(matches!(o.admit(f, v(), t0), Admission::Held));
        assert_eq!(o.drain(t0)[0].count, 1);
    }
}
