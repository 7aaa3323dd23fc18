//! Faults from outside the job's output: the kernel log and GPU health. Facts are gathered here
//! (and on the kernel reader thread, before its queue) and judged by
//! `crate::supervisor::outside`; this room carries the answer out: an event for the supervisor,
//! or a bounded report of someone else's fault.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::{Executor, Input, RunError, lock};
use crate::attribution::{JobView, pci_slot};
use crate::journal::Record;
use crate::rules::{Fault, FaultClass, Joins, RuleSet, Stream};
use crate::snapshot::{FaultNote, KernelState};
use crate::sources::health::HealthEvent;
use crate::sources::kernel::{self, Classify, FollowConfig, Kept, KernelEvent, KernelSource};
use crate::sources::kmsg;
use crate::supervisor::Event;
use crate::supervisor::outside::{Admission, Outside, whose};
use crate::voice::say;

/// A kernel-log record that a rule matched, judged on the reader thread.
#[derive(Debug)]
pub struct KernelFault {
    admission: Admission,
    facility: u8,
    seq: u64,
}

/// The name of a kernel-log facility: records written into /dev/kmsg from user space (fault
/// drills, other watchdogs) carry `user`.
fn facility_name(facility: u8) -> String {
    match facility {
        0 => "kernel".to_string(),
        1 => "user".to_string(),
        n => format!("facility {n}"),
    }
}

/// How long a kernel fault that names no process is held for the line that names it.
///
/// The kernel prints a block's lines back to back: in the public reports of
/// `tests/data/corpus` the process line of an amdgpu page fault or ring timeout came 2 to 150 µs
/// after the fault line, and on the test machine two records written back to back into
/// `/dev/kmsg` reached a reader 6 µs apart (median of 40 pairs, 17 µs at most). 100 ms is
/// hundreds of times that, and covers one poll (50 ms) of a file-backed kernel log. A block
/// usually ends sooner: at its process line, or at the next record that does not continue it.
pub const BLOCK_HOLD: Duration = Duration::from_millis(100);

/// A kernel fault waiting for the rest of its block.
#[derive(Debug)]
struct Held {
    fault: Fault,
    facility: u8,
    seq: u64,
    until: Instant,
}

/// The kernel reader's classifier: match the catalog, gather the facts, have them judged, all
/// before the reader's bounded queue. The job's faults must reach the loop (`Kept::Must`);
/// only the first few foreign reports may be dropped, and the rest never leave the thread.
///
/// A fault line that names no process, of a class whose process can come on a line of its
/// own (amdgpu: `ring gfx_0.0.0 timeout` then `Process python3 pid 2113 thread ...`), is held
/// until that line comes, until a record that does not continue it, or for [`BLOCK_HOLD`]; then
/// it is judged with what the block said. Judged on its first line alone, the job's own fault
/// would be called foreign.
struct KernelClassifier {
    rules: Arc<RuleSet>,
    view: Arc<Mutex<JobView>>,
    outside: Arc<Mutex<Outside>>,
    /// A flood repeats one message word for word: the previous message and what it was answer
    /// for it without matching the whole catalog again (about 100 µs a fault line).
    previous: Option<(Vec<u8>, Option<Fault>)>,
    /// The classes a kernel context line can add a pid to.
    gains_pid: Vec<FaultClass>,
    held: Option<Held>,
    hold: Duration,
}

impl KernelClassifier {
    fn new(
        rules: Arc<RuleSet>,
        view: Arc<Mutex<JobView>>,
        outside: Arc<Mutex<Outside>>,
        hold: Duration,
    ) -> KernelClassifier {
        let gains_pid = FaultClass::ALL
            .into_iter()
            .filter(|&class| {
                rules.contexts().iter().any(|c| {
                    c.joins == Joins::After
                        && c.streams.contains(&Stream::Kernel)
                        && c.joins_class(class)
                        && c.regex().contains("?P<pid>")
                })
            })
            .collect();
        KernelClassifier {
            rules,
            view,
            outside,
            previous: None,
            gains_pid,
            held: None,
            hold,
        }
    }

    fn classify(&mut self, record: kmsg::Record) -> Option<Fault> {
        if let Some((message, known)) = &self.previous
            && *message == record.message
        {
            return known.clone();
        }
        let fault = self.rules.classify(Stream::Kernel, &record.text());
        // The record is ours: its message is kept, not copied.
        self.previous = Some((record.message, fault.clone()));
        fault
    }

    /// Judges a whole fault: whose it is, and whether it must reach the loop.
    fn judge(
        &self,
        mut fault: Fault,
        facility: u8,
        seq: u64,
        now: Instant,
    ) -> Option<Kept<KernelFault>> {
        fault.facility = Some(facility_name(facility));
        let facts = lock(&self.view).facts(&fault, false);
        let verdict = whose(&fault, &facts);
        let admission = lock(&self.outside).admit(fault, verdict, now);
        let must = match admission {
            Admission::Held => return None,
            Admission::Act { .. } => true,
            Admission::Foreign { .. } => false,
        };
        let kept = KernelFault {
            admission,
            facility,
            seq,
        };
        Some(if must {
            Kept::Must(kept)
        } else {
            Kept::May(kept)
        })
    }

    fn release(&mut self, now: Instant, out: &mut Vec<Kept<KernelFault>>) {
        if let Some(held) = self.held.take() {
            out.extend(self.judge(held.fault, held.facility, held.seq, now));
        }
    }

    /// The held fault takes what a continuation line says; true when the line continues it.
    fn continues(&mut self, text: &str) -> bool {
        let Some(held) = &mut self.held else {
            return false;
        };
        // Another device's block printed in between does not continue this one (a line that
        // names no device may: older kernels print the process without one).
        if let Some(pci) = held.fault.captures.get("pci")
            && !text.contains(pci.as_str())
            && names_a_device(text)
        {
            return false;
        }
        let Some(context) = self.rules.context(Some(Stream::Kernel), text) else {
            return false;
        };
        if context.context.joins != Joins::After || !context.context.joins_class(held.fault.class) {
            return false;
        }
        for (name, value) in context.captures {
            held.fault.captures.entry(name).or_insert(value);
        }
        true
    }
}

/// Whether a kernel line names a PCI device (`0000:0b:00.0`).
fn names_a_device(text: &str) -> bool {
    text.as_bytes().windows(12).any(|w| {
        let hex = |r: std::ops::Range<usize>| w[r].iter().all(u8::is_ascii_hexdigit);
        hex(0..4)
            && w[4] == b':'
            && hex(5..7)
            && w[7] == b':'
            && hex(8..10)
            && w[10] == b'.'
            && w[11].is_ascii_digit()
    })
}

impl Classify<KernelFault> for KernelClassifier {
    fn record(&mut self, record: kmsg::Record, now: Instant, out: &mut Vec<Kept<KernelFault>>) {
        let (facility, seq) = (record.facility, record.seq);
        // Only while a block is held does the text matter after matching.
        let held_text = self.held.is_some().then(|| record.text().into_owned());
        let fault = self.classify(record);
        if let Some(text) = held_text {
            if fault.is_none() && self.continues(&text) {
                // The block named its process: nothing more can change whose it is.
                if self
                    .held
                    .as_ref()
                    .is_some_and(|h| h.fault.captures.contains_key("pid"))
                {
                    self.release(now, out);
                }
                return;
            }
            self.release(now, out);
        }
        let Some(fault) = fault else {
            return;
        };
        if !fault.captures.contains_key("pid") && self.gains_pid.contains(&fault.class) {
            self.held = Some(Held {
                fault,
                facility,
                seq,
                until: now + self.hold,
            });
            return;
        }
        out.extend(self.judge(fault, facility, seq, now));
    }

    fn deadline(&self) -> Option<Instant> {
        self.held.as_ref().map(|h| h.until)
    }

    fn due(&mut self, now: Instant, out: &mut Vec<Kept<KernelFault>>) {
        if self.held.as_ref().is_some_and(|h| h.until <= now) {
            self.release(now, out);
        }
    }
}

impl Executor<'_> {
    /// Starts following the kernel log. A reader that cannot start is a warning, not a reason
    /// to leave the job unsupervised.
    pub(super) fn follow_kernel(&mut self, source: KernelSource) -> Result<(), RunError> {
        self.rules.prepare(&[Stream::Kernel]);
        let classify = KernelClassifier::new(
            Arc::clone(&self.rules),
            Arc::clone(&self.view),
            Arc::clone(&self.outside),
            BLOCK_HOLD,
        );
        match kernel::follow(
            FollowConfig::new(source),
            classify,
            self.tx.clone(),
            Input::Kernel,
        ) {
            Ok(follower) => {
                self.kernel = Some(follower);
                self.board
                    .update(|s| s.sources.kernel = KernelState::Following);
            }
            Err(e) => self.warn(format!(
                "cannot follow the kernel log ({e}); supervising with the job's output only"
            ))?,
        }
        Ok(())
    }

    /// A kernel-log event: the job's fault becomes a supervisor event; a foreign one is
    /// journaled and shown; troubles of the reader are warnings.
    pub(super) fn kernel_event(
        &mut self,
        event: KernelEvent<KernelFault>,
        live: Option<u32>,
    ) -> Result<Option<Event>, RunError> {
        match event {
            KernelEvent::Record(KernelFault {
                admission,
                facility,
                seq,
            }) => {
                return self.admitted(
                    admission,
                    live,
                    "kernel log",
                    (facility_name(facility), seq),
                );
            }
            KernelEvent::Lost { records } => {
                // Warned once; the total is reported when the run ends (an overrun can repeat
                // many times a second in a flood, and each journal line is an fsync).
                if self.kernel_lost.is_none() {
                    self.warn(format!(
                        "kernel log: {} records were overwritten before they could be read (a flood); faults among them were missed; the total comes at the end of the run",
                        records.map_or_else(|| "some".to_string(), |n| n.to_string())
                    ))?;
                }
                let lost = self.kernel_lost.get_or_insert(0);
                *lost += records.unwrap_or(0);
                let lost = *lost;
                self.board.update(|s| s.sources.kernel_lost = lost);
            }
            KernelEvent::Dropped { records } => {
                // Only foreign reports can be dropped (the job's faults wait in the reader).
                if self.kernel_dropped == 0 {
                    self.warn(
                        "kernel log: reports of faults that do not concern the job are being dropped because gpuwarden fell behind (a flood); the total comes at the end of the run".to_string(),
                    )?;
                }
                self.kernel_dropped += records;
            }
            // A record the kernel wrote in a form we do not know: nothing to act on.
            KernelEvent::Malformed { .. } => {}
            KernelEvent::Unavailable { reason } => {
                let state = KernelState::Unavailable(reason.clone());
                self.board.update(|s| s.sources.kernel = state);
                self.warn(format!("{reason} (--no-kernel-log silences this)"))?;
            }
            KernelEvent::Restarted { error, restarts } => {
                self.warn(format!(
                    "kernel log reader failed ({error}) and was restarted (restart {restarts})"
                ))?;
            }
            KernelEvent::GaveUp { error } => {
                let state = KernelState::GaveUp(error.clone());
                self.board.update(|s| s.sources.kernel = state);
                self.warn(format!(
                    "kernel log reader failed too often ({error}); supervising without the kernel log from now on"
                ))?;
            }
        }
        Ok(None)
    }

    /// A health event: samples are published for views; a fault is judged like a kernel
    /// record.
    pub(super) fn health_event(
        &mut self,
        event: HealthEvent,
        live: Option<u32>,
    ) -> Result<Option<Event>, RunError> {
        match event {
            HealthEvent::Started { sources, gpus } => {
                // nvidia-smi's inventory completes the one taken at start (sysfs only).
                for gpu in gpus {
                    let slot = |g: &crate::gpu::Gpu| g.pci.as_deref().and_then(pci_slot);
                    if !self.gpus.iter().any(|g| slot(g) == slot(&gpu)) {
                        self.gpus.push(gpu);
                    }
                }
                let names: Vec<String> = sources.iter().map(|s| s.as_str().to_string()).collect();
                say(&format!(
                    "GPU health: watching {} GPU(s) through {}",
                    self.gpus.len(),
                    names.join(", ")
                ));
                self.board.update(|s| s.sources.health = names);
            }
            // No GPU and no GPU tool: nothing to watch, and nothing worth a warning on a
            // machine that has no GPU.
            HealthEvent::Unavailable { .. } => {}
            HealthEvent::Sample { at, gpus, .. } => {
                self.board.update(|s| s.add_sample(&gpus, at));
            }
            HealthEvent::Note { source, message } => {
                let note = format!("{}: {message}", source.as_str());
                let timeout = message.contains("timed out") || message.contains("did not answer");
                self.board.update(|s| {
                    s.sources.last_note = Some(note);
                    if timeout {
                        s.sources.tool_timeouts += 1;
                    }
                });
                self.warn(format!("GPU health ({}): {message}", source.as_str()))?;
            }
            HealthEvent::Fault(found) => {
                let fault = found.to_fault();
                let facts = lock(&self.view).facts(&fault, true);
                let verdict = whose(&fault, &facts);
                let admission = lock(&self.outside).admit(fault, verdict, Instant::now());
                return self.admitted(admission, live, "GPU health", ("health".to_string(), 0));
            }
        }
        Ok(None)
    }

    /// Carries out an admission: the live attempt's fault becomes an event; a report of someone
    /// else's (or of an ended attempt's) is shown and journaled.
    fn admitted(
        &mut self,
        admission: Admission,
        live: Option<u32>,
        source: &str,
        (facility, seq): (String, u64),
    ) -> Result<Option<Event>, RunError> {
        let (fault, reason, ended) = match admission {
            Admission::Held => return Ok(None),
            Admission::Act {
                attempt, mut fault, ..
            } => {
                if live == Some(attempt) {
                    self.pin(attempt, &mut fault);
                    if seq > 0 {
                        fault.attribution = fault
                            .attribution
                            .map(|why| format!("{why} (kernel record {seq})"));
                    }
                    return Ok(Some(Event::Fault {
                        attempt,
                        fault: *fault,
                    }));
                }
                // Judged while the attempt was live; it has ended since.
                let reason = format!("it concerns attempt {attempt}, which has ended");
                (fault, reason, Some(attempt))
            }
            Admission::Foreign {
                fault,
                reason,
                ended,
            } => (fault, reason, ended),
        };
        let fault = *fault;
        say(&format!(
            "{source}: {} ({}) not acted on: {reason}: {}",
            fault.class,
            fault.rule,
            fault.line.trim()
        ));
        let note = FaultNote {
            at: SystemTime::now(),
            class: fault.class,
            rule: fault.rule.clone(),
            severity: fault.severity,
            source: fault.stream.to_string(),
            line: fault.line.clone(),
            attempt: None,
            reason: Some(reason.clone()),
            count: 1,
        };
        self.board.update(|s| s.add_fault(note));
        self.journal(&Record::ForeignFault {
            class: fault.class,
            rule: fault.rule,
            severity: fault.severity,
            line: fault.line,
            captures: fault.captures,
            facility,
            seq,
            reason,
            attempt: ended,
        })?;
        Ok(None)
    }

    /// Journals the foreign-fault windows that are over: one record per rule and window.
    pub(super) fn journal_foreign_repeats(&mut self, now: Instant) -> Result<(), RunError> {
        let due = lock(&self.outside).due(now);
        self.journal_repeats(due)
    }

    fn journal_repeats(
        &mut self,
        due: Vec<crate::supervisor::outside::ForeignRepeats>,
    ) -> Result<(), RunError> {
        for r in due {
            self.board.update(|s| s.sources.foreign_held += r.count);
            self.journal(&Record::ForeignRepeats {
                rule: r.rule,
                class: r.class,
                count: r.count,
                whom: r.whom,
                seconds: r.seconds,
            })?;
        }
        Ok(())
    }

    /// At the end of the run: the open windows, the kernel records lost or dropped in all, and
    /// how often foreign faults came in all.
    pub(super) fn report_outside_totals(&mut self) -> Result<(), RunError> {
        let due = lock(&self.outside).drain(Instant::now());
        self.journal_repeats(due)?;
        if let Some(lost) = self.kernel_lost {
            self.warn(format!(
                "kernel log: {lost} records were overwritten before they could be read, in all"
            ))?;
        }
        if self.kernel_dropped > 0 {
            let dropped = self.kernel_dropped;
            self.warn(format!(
                "kernel log: {dropped} reports of faults that did not concern the job were dropped in all because gpuwarden fell behind"
            ))?;
        }
        let repeats: Vec<String> = lock(&self.outside)
            .counted()
            .map(|(rule, seen, reported)| format!("{rule} x{seen} ({reported} journaled in full)"))
            .collect();
        if repeats.is_empty() {
            return Ok(());
        }
        self.warn(format!(
            "faults that did not concern the job repeated (the rest were counted in foreign_repeats records): {}",
            repeats.join(", ")
        ))
    }
}
