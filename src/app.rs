//! The executor: one loop that turns the outside world into supervisor events and carries out
//! the supervisor's effects.
//!
//! ```text
//!  output pumps (per attempt, per stream) ─┐
//!  waiter thread (per attempt)            ─┼─ Input ──> loop: Supervisor::step ──> Effect
//!  signal thread                          ─┘   (mpsc)          │
//!                                                              ├─ Spawn:   find checkpoint, build argv/env, spawn, start pumps
//!                                                              ├─ Signal:  killpg(attempt's group)
//!                                                              ├─ Journal: append + fsync
//!                                                              ├─ Say:     one line on stderr
//!                                                              └─ Finish:  summary, exit code
//! ```
//!
//! The loop runs on the main thread on purpose: the job is forked from here, and the kernel's
//! parent-death signal is tied to the forking thread. This file does I/O and nothing clever; a
//! decision that appears here belongs in `crate::supervisor`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use crate::attribution::{self, JobTree, Membership};
use crate::checkpoints;
use crate::config::Plan;
use crate::gpu::Gpu;
use crate::job::Sig;
use crate::journal::{self, Journal, Record};
use crate::ladder::{self, Placeholders};
use crate::process::{self, GroupEvent, Guard, JobSpec};
use crate::rules::{Fault, RuleSet, Stream};
use crate::sources::health::{self, HealthConfig, HealthEvent, HealthSource};
use crate::sources::kernel::{self, FollowConfig, Follower, KernelEvent, KernelSource};
use crate::sources::kmsg;
use crate::sources::output::{self, OutputEvent};
use crate::supervisor::{AttemptSummary, Effect, Event, Outcome, Policy, Supervisor, TierInfo};

/// How long the guard gives the job's group between SIGTERM and SIGKILL when gpuwarden died.
pub const GUARD_GRACE: Duration = Duration::from_secs(1);

/// Errors that end a run before or outside the supervisor's control.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot create the run directory {path}: {source}; pick another with --run-dir")]
    RunDir { path: PathBuf, source: io::Error },
    #[error(
        "the run directory {0} already holds a journal; give a new --run-dir (or move the old run away)"
    )]
    RunDirInUse(PathBuf),
    #[error(
        "cannot create the job's log {path}: {source}; check the space and permissions of the run directory"
    )]
    Log { path: PathBuf, source: io::Error },
    #[error(
        "cannot write the journal {path}: {source}; the run was stopped because it could not be recorded"
    )]
    Journal { path: PathBuf, source: io::Error },
    #[error(
        "cannot set up signal handling or process reaping: {0}; this is a bug or a very unusual system, please report it"
    )]
    Signals(io::Error),
}

impl RunError {
    /// The documented exit code: a run directory that is already taken is a usage error, the
    /// rest are failures of gpuwarden itself.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::RunDirInUse(_) => crate::exit::USAGE,
            _ => crate::exit::INTERNAL,
        }
    }
}

/// What reaches the loop from the threads.
#[derive(Debug)]
enum Input {
    Output {
        attempt: u32,
        stream: Stream,
        event: OutputEvent,
    },
    Group {
        attempt: u32,
        event: GroupEvent,
    },
    Signal(Sig),
    Kernel(KernelEvent<KernelFault>),
    Health(HealthEvent),
}

/// A kernel-log record that a rule matched, as the follower thread hands it over.
#[derive(Debug)]
pub struct KernelFault {
    fault: Fault,
    facility: u8,
    seq: u64,
    /// Records of the same fault about the same process or device that the reader held back
    /// since the last one it forwarded (see `REPEAT_WINDOW`).
    repeats: u64,
}

/// The process or device a fault line names, for telling repeats of one fault apart from a
/// different one: `pid 447`, `pci 0000:03:00.0`, or nothing.
fn outside_whom(fault: &Fault) -> String {
    ["pid", "pci", "node", "gpu"]
        .iter()
        .find_map(|k| fault.captures.get(*k).map(|v| format!("{k} {v}")))
        .unwrap_or_default()
}

/// What `run` watches besides the job's own output.
#[derive(Debug, Default)]
pub struct Watch {
    /// The kernel log to follow (`/dev/kmsg`), or none (`--no-kernel-log`).
    pub kernel: Option<KernelSource>,
    /// This machine's GPUs, for telling whether a device named by a kernel line is one the job
    /// can use.
    pub gpus: Vec<Gpu>,
    /// The GPU health sampler's settings, or none (`--no-health`).
    pub health: Option<HealthConfig>,
}

/// A kernel fault line repeating about the same process or device is forwarded once per window.
const REPEAT_WINDOW: Duration = Duration::from_secs(1);

/// Distinct repeating kernel faults remembered at most before the stale ones are forgotten.
const MAX_REPEAT_KEYS: usize = 4096;

/// How often the job's process tree is re-read for attribution while an attempt runs.
const TREE_REFRESH: Duration = Duration::from_secs(1);

/// The name of a kernel-log facility: records written into /dev/kmsg from user space (fault
/// drills, other watchdogs) carry `user`.
fn facility_name(facility: u8) -> String {
    match facility {
        0 => "kernel".to_string(),
        1 => "user".to_string(),
        n => format!("facility {n}"),
    }
}

/// Bound on queued inputs: a job printing fault lines faster than the journal takes them is
/// slowed down (its pipe fills) instead of growing gpuwarden's memory.
const QUEUE: usize = 1024;

/// Supervises `plan` until the job finishes or gpuwarden gives up.
///
/// `explicit_run_dir` tells whether the user named the run directory (then it is used as given,
/// and must not hold a journal yet) or it is the timestamped default (then a fresh one is made,
/// with a suffix if a run of the same second has it).
///
/// `preflight` is the probe's verdict on where the run starts (`plan.ladder` already begins at
/// that tier); unless it is silent, it is said and journaled before attempt 1.
pub fn run(
    plan: &Plan,
    rules: Arc<RuleSet>,
    explicit_run_dir: bool,
    preflight: Option<&crate::probe::Verdict>,
    watch: Watch,
) -> Result<Outcome, RunError> {
    process::block_signals().map_err(RunError::Signals)?;
    process::become_subreaper().map_err(RunError::Signals)?;
    let run_dir = journal::create_run_dir(&plan.run_dir, explicit_run_dir).map_err(|source| {
        RunError::RunDir {
            path: plan.run_dir.clone(),
            source,
        }
    })?;
    let journal = Journal::create(&run_dir).map_err(|source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            RunError::RunDirInUse(run_dir.clone())
        } else {
            RunError::Journal {
                path: run_dir.join("journal.jsonl"),
                source,
            }
        }
    })?;
    start_voice();
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    process::spawn_signal_thread(tx.clone(), Input::Signal).map_err(RunError::Signals)?;

    let mut exec = Executor {
        plan,
        rules,
        run_dir: run_dir.clone(),
        journal,
        guard: None,
        groups: HashMap::new(),
        terminal_warned: HashSet::new(),
        tx,
        tree: JobTree::new(std::process::id()),
        attempt_of_group: HashMap::new(),
        usable: HashMap::new(),
        gpus: watch.gpus,
        kernel: None,
        health: None,
        refreshed: Instant::now(),
        kernel_dropped: 0,
        kernel_lost: None,
        foreign: BTreeMap::new(),
    };
    exec.journal(&Record::RunStarted {
        command: plan
            .command
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
        ladder: plan.ladder.iter().map(|t| t.name.clone()).collect(),
        checkpoints: plan.checkpoints.clone(),
        max_restarts: plan.max_restarts,
        grace_seconds: plan.grace.as_secs_f64(),
        rules: exec.rules.rules().len(),
        gpuwarden_pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION"),
    })?;
    if let Some(verdict) = preflight.filter(|v| !v.is_silent()) {
        for message in verdict.messages() {
            say(&message);
        }
        exec.journal(&Record::Preflight(verdict.clone()))?;
    }
    // Compiled and warmed now, not on the job's first line: a fault that is the first line
    // must not wait for it.
    exec.rules.prepare(&[Stream::Stdout, Stream::Stderr]);
    if let Some(source) = watch.kernel {
        exec.follow_kernel(source)?;
    }
    if let Some(config) = watch.health {
        match health::spawn(config, health::channel_sink(exec.tx.clone(), Input::Health)) {
            Ok(source) => exec.health = Some(source),
            Err(e) => exec.warn(format!(
                "cannot start the GPU health sampler ({e}); supervising without it"
            ))?,
        }
    }
    match Guard::spawn() {
        Ok(g) => exec.guard = Some(g),
        Err(e) => exec.warn(format!(
            "could not start the guard process ({e}): if gpuwarden is killed with SIGKILL, the job's grandchildren may survive it"
        ))?,
    }
    say(&format!(
        "supervising `{}`; run directory {}",
        exec.command_line(),
        run_dir.display()
    ));

    let policy = Policy {
        max_restarts: plan.max_restarts,
        grace: plan.grace,
        settle: crate::supervisor::SETTLE,
        backoff_initial: plan.backoff_initial,
        backoff_max: plan.backoff_max,
    };
    let tiers = plan
        .ladder
        .iter()
        .map(|t| TierInfo {
            name: t.name.clone(),
            uses_gpu: t.uses_gpu,
        })
        .collect();
    let mut sup = Supervisor::new(policy, tiers);
    let outcome = match exec.drive(&mut sup, &rx) {
        Ok(outcome) => outcome,
        Err(e) => {
            exec.stop_jobs();
            flush_voice();
            return Err(e);
        }
    };
    if let Some(guard) = exec.guard.take() {
        guard.close();
    }
    exec.report_foreign_repeats()?;
    if let Some(follower) = exec.kernel.take() {
        follower.stop();
    }
    if let Some(source) = exec.health.take() {
        source.stop();
    }
    print_summary(&sup, plan, &outcome, exec.journal.path());
    flush_voice();
    Ok(outcome)
}

struct Executor<'a> {
    plan: &'a Plan,
    rules: Arc<RuleSet>,
    run_dir: PathBuf,
    journal: Journal,
    guard: Option<Guard>,
    /// Process group of each attempt whose group still has processes.
    groups: HashMap<u32, u32>,
    /// Attempts already warned about a process stopped by the terminal.
    terminal_warned: HashSet<u32>,
    tx: SyncSender<Input>,
    /// The job's processes, for attributing kernel lines that name a pid.
    tree: JobTree,
    /// The attempt of every process group the job has had, ended ones included.
    attempt_of_group: HashMap<u32, u32>,
    /// The PCI slots of the GPUs each live attempt can use (none on a CPU tier).
    usable: HashMap<u32, Vec<(u32, u8, u8)>>,
    gpus: Vec<Gpu>,
    kernel: Option<Follower>,
    health: Option<HealthSource>,
    /// When `tree` was last re-read.
    refreshed: Instant,
    /// Foreign faults seen, by rule and the process or device they name: the first of each
    /// is journaled, the rest counted.
    foreign: BTreeMap<(String, String), u64>,
    /// Kernel records overwritten before the reader got them (`Some` once any were).
    kernel_lost: Option<u64>,
    /// Kernel fault records dropped so far because the loop fell behind.
    kernel_dropped: u64,
}

impl Executor<'_> {
    /// The event loop. Returns when the supervisor finishes the run.
    fn drive(&mut self, sup: &mut Supervisor, rx: &Receiver<Input>) -> Result<Outcome, RunError> {
        // A signal that came while the plan was made (an env_script can take seconds) ends
        // the run before the job starts.
        let mut pending = vec![Event::Start];
        if let Some(sig) = process::take_pending_signal() {
            pending.push(Event::Signal(sig));
        }
        loop {
            while let Some(event) = pending.pop() {
                for effect in sup.step(event, Instant::now()) {
                    if let Some(outcome) = self.apply(effect, &mut pending)? {
                        return Ok(outcome);
                    }
                }
            }
            let mut timeout = sup.next_deadline().map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(Instant::now())
            });
            if self.kernel.is_some() && !self.groups.is_empty() {
                // Keep the process tree fresh: a process that faults and dies between two
                // reads is attributed from memory only if a read saw it.
                if self.refreshed.elapsed() >= TREE_REFRESH {
                    let _ = self.tree.refresh();
                    self.refreshed = Instant::now();
                }
                timeout = timeout.min(TREE_REFRESH);
            }
            if timeout.is_zero() {
                // A deadline is due. Inputs keep coming in a flood (a neighbour's GPU spamming
                // the kernel log), and a Tick only on an empty channel would never come: the
                // SIGTERM after the settle time, SIGKILL after the grace and the backoff would
                // all wait for the flood to end.
                pending.push(Event::Tick);
            }
            match rx.recv_timeout(timeout) {
                Ok(input) => {
                    let live = sup.live_attempt();
                    if let Some(event) = self.event_of(input, live)? {
                        pending.push(event);
                    }
                }
                Err(RecvTimeoutError::Timeout) => pending.push(Event::Tick),
                // The loop holds a sender itself, so the channel cannot disconnect.
                Err(RecvTimeoutError::Disconnected) => pending.push(Event::Tick),
            }
        }
    }

    /// Turns an input into a supervisor event. `live` is the supervisor's running attempt
    /// (kept until the attempt has ended, after its process group is gone).
    fn event_of(&mut self, input: Input, live: Option<u32>) -> Result<Option<Event>, RunError> {
        Ok(match input {
            Input::Output {
                attempt,
                stream,
                event,
            } => match event {
                OutputEvent::Fault(fault) => Some(Event::Fault { attempt, fault }),
                OutputEvent::Closed => Some(Event::StreamClosed { attempt, stream }),
                OutputEvent::Idle { at } => Some(Event::OutputIdle {
                    attempt,
                    stream,
                    at,
                }),
                OutputEvent::LogFailed(e) => {
                    self.warn(format!(
                        "attempt {attempt}: writing the {stream} log failed ({e}); the output is still passed through"
                    ))?;
                    None
                }
            },
            Input::Group { attempt, event } => match event {
                GroupEvent::LeaderExited {
                    status,
                    group_alive,
                } => Some(Event::Exited {
                    attempt,
                    status,
                    group_alive,
                }),
                GroupEvent::Empty => {
                    if let Some(pgid) = self.groups.remove(&attempt) {
                        // The id may now be reused by an unrelated process.
                        self.tree.remove_group(pgid);
                        if let Some(guard) = &mut self.guard {
                            let _ = guard.unwatch(pgid);
                        }
                    }
                    self.reap_strays();
                    Some(Event::GroupEmpty { attempt })
                }
                GroupEvent::TerminalStop { pid, signal } => {
                    if self.terminal_warned.insert(attempt) {
                        self.warn(format!(
                            "attempt {attempt}: process {pid} of the job was stopped by {} because it used the terminal while the job runs in the background; give it input from a file (`< /dev/null`) or a non-interactive setting",
                            crate::job::signal_name(signal)
                        ))?;
                    }
                    None
                }
            },
            Input::Signal(sig) => Some(Event::Signal(sig)),
            Input::Kernel(event) => self.kernel_event(event, live)?,
            Input::Health(event) => self.health_event(event, live)?,
        })
    }

    /// A health event: a fault of a GPU the running attempt uses becomes a supervisor event.
    /// Samples are not kept yet (the live view will read them).
    fn health_event(
        &mut self,
        event: HealthEvent,
        running: Option<u32>,
    ) -> Result<Option<Event>, RunError> {
        match event {
            HealthEvent::Started { sources, gpus } => {
                // nvidia-smi's inventory completes the one taken at start (sysfs only).
                for gpu in gpus {
                    let known = self.gpus.iter().any(|g| {
                        g.pci.as_deref().and_then(attribution::pci_slot)
                            == gpu.pci.as_deref().and_then(attribution::pci_slot)
                    });
                    if !known {
                        self.gpus.push(gpu);
                    }
                }
                let names: Vec<&str> = sources.iter().map(|s| s.as_str()).collect();
                say(&format!(
                    "GPU health: watching {} GPU(s) through {}",
                    self.gpus.len(),
                    names.join(", ")
                ));
            }
            // No GPU and no GPU tool: nothing to watch, and nothing worth a warning on a
            // machine that has no GPU.
            HealthEvent::Unavailable { .. } | HealthEvent::Sample { .. } => {}
            HealthEvent::Note { source, message } => {
                self.warn(format!("GPU health ({}): {message}", source.as_str()))?;
            }
            HealthEvent::Fault(found) => {
                let fault = found.to_fault();
                let usable = self.usable_by(running);
                let verdict = if fault.captures.contains_key("pci") {
                    attribution::attribute(&fault.captures, |_| Membership::Foreign, &usable)
                } else if !usable.is_empty() {
                    // A tool that hangs or a driver that cannot be reached names no device:
                    // it concerns every GPU, the job's included.
                    attribution::Verdict::Job("it concerns every GPU, and the job uses GPUs".into())
                } else {
                    attribution::Verdict::Foreign("the job uses no GPU on its current tier".into())
                };
                return self.outside_fault(
                    fault,
                    verdict,
                    running,
                    "GPU health",
                    ("health".to_string(), 0),
                    0,
                );
            }
        }
        Ok(None)
    }

    /// The PCI slots of the GPUs `attempt` can use (none without an attempt, or on a CPU tier).
    fn usable_by(&self, attempt: Option<u32>) -> Vec<(u32, u8, u8)> {
        attempt
            .and_then(|a| self.usable.get(&a))
            .cloned()
            .unwrap_or_default()
    }

    /// A fault from outside the job's output (kernel log, GPU health), with the verdict on
    /// whom it concerns: the job's becomes a supervisor event for `running`; any other is shown
    /// and journaled once per rule and process or device, and its repeats are counted (a
    /// neighbour's GPU can log thousands a second; each journal line is an fsync).
    fn outside_fault(
        &mut self,
        mut fault: Fault,
        verdict: attribution::Verdict,
        running: Option<u32>,
        source: &str,
        (facility, seq): (String, u64),
        repeats: u64,
    ) -> Result<Option<Event>, RunError> {
        let reason = match (verdict, running) {
            (attribution::Verdict::Job(why), Some(attempt)) => {
                fault.attribution = Some(why);
                return Ok(Some(Event::Fault { attempt, fault }));
            }
            (attribution::Verdict::Job(_), None) => "no attempt is running".to_string(),
            (attribution::Verdict::Foreign(why), _) => why,
        };
        let count = self
            .foreign
            .entry((fault.rule.clone(), outside_whom(&fault)))
            .or_insert(0);
        let first = *count == 0;
        *count += 1 + repeats;
        if !first {
            return Ok(None);
        }
        say(&format!(
            "{source}: {} ({}) not acted on: {reason}: {}",
            fault.class,
            fault.rule,
            fault.line.trim()
        ));
        self.journal(&Record::ForeignFault {
            class: fault.class,
            rule: fault.rule,
            severity: fault.severity,
            line: fault.line,
            captures: fault.captures,
            facility,
            seq,
            reason,
        })?;
        Ok(None)
    }

    /// Journals, at the end of the run, the kernel records lost or dropped in all and how often
    /// foreign faults repeated after the first of each was journaled.
    fn report_foreign_repeats(&mut self) -> Result<(), RunError> {
        if let Some(lost) = self.kernel_lost {
            self.warn(format!(
                "kernel log: {lost} records were overwritten before they could be read, in all"
            ))?;
        }
        if self.kernel_dropped > 0 {
            let dropped = self.kernel_dropped;
            self.warn(format!(
                "kernel log: {dropped} fault records were dropped in all because gpuwarden fell behind"
            ))?;
        }
        let repeats: Vec<String> = self
            .foreign
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|((rule, whom), n)| {
                let whom = if whom.is_empty() {
                    String::new()
                } else {
                    format!(" ({whom})")
                };
                format!("{rule}{whom} x{n}")
            })
            .collect();
        if repeats.is_empty() {
            return Ok(());
        }
        self.warn(format!(
            "faults that did not concern the job repeated (journaled once each): {}",
            repeats.join(", ")
        ))
    }

    /// Starts following the kernel log. A reader that cannot start is a warning, not a reason
    /// to leave the job unsupervised.
    fn follow_kernel(&mut self, source: KernelSource) -> Result<(), RunError> {
        let rules = Arc::clone(&self.rules);
        rules.prepare(&[Stream::Kernel]);
        // The same fault about the same process or device is forwarded at most once per
        // REPEAT_WINDOW: a flood of one line (a neighbour's wedged GPU logs thousands a second)
        // must not crowd out a different record, such as the one naming the job's process.
        // The repeats held back ride along with the next one forwarded.
        let mut forwarded: HashMap<(String, String), (Instant, u64)> = HashMap::new();
        // A flood repeats one message word for word: the previous message and what it was
        // (a fault with its rule and process/device, or nothing) answer for it without matching
        // the whole catalog again (about 100 µs a fault line, which a flood would outrun).
        let mut previous: Option<(Vec<u8>, Option<Fault>)> = None;
        let classify = move |record: kmsg::Record| {
            let (facility, seq) = (record.facility, record.seq);
            let fault = match &previous {
                Some((message, known)) if *message == record.message => known.clone()?,
                _ => {
                    let fault = rules.classify(Stream::Kernel, &record.text());
                    // The record is ours: its message is kept, not copied.
                    previous = Some((record.message, fault.clone()));
                    fault?
                }
            };
            let whom = outside_whom(&fault);
            let now = Instant::now();
            let key = (fault.rule.clone(), whom);
            if let Some((last, held)) = forwarded.get_mut(&key)
                && now.duration_since(*last) < REPEAT_WINDOW
            {
                *held += 1;
                return None;
            }
            if forwarded.len() >= MAX_REPEAT_KEYS {
                forwarded.retain(|_, (last, _)| now.duration_since(*last) < REPEAT_WINDOW);
            }
            let repeats = forwarded.insert(key, (now, 0)).map_or(0, |(_, held)| held);
            Some(KernelFault {
                fault,
                facility,
                seq,
                repeats,
            })
        };
        match kernel::follow(
            FollowConfig::new(source),
            classify,
            self.tx.clone(),
            Input::Kernel,
        ) {
            Ok(follower) => self.kernel = Some(follower),
            Err(e) => self.warn(format!(
                "cannot follow the kernel log ({e}); supervising with the job's output only"
            ))?,
        }
        Ok(())
    }

    /// A kernel-log event: a fault that concerns the job becomes a supervisor event; a foreign
    /// one is journaled and shown; troubles of the reader are warnings.
    fn kernel_event(
        &mut self,
        event: KernelEvent<KernelFault>,
        running: Option<u32>,
    ) -> Result<Option<Event>, RunError> {
        match event {
            KernelEvent::Record(found) => {
                let KernelFault {
                    mut fault,
                    facility,
                    seq,
                    repeats,
                } = found;
                let usable = self.usable_by(running);
                let tree = &mut self.tree;
                let verdict =
                    attribution::attribute(&fault.captures, |pid| tree.membership(pid), &usable);
                fault.facility = Some(facility_name(facility));
                // A process of an earlier attempt (a late line about it) is not the running
                // attempt's business.
                let verdict = match (verdict, fault.captures.get("pid")) {
                    (attribution::Verdict::Job(why), Some(pid)) => {
                        let attempt_of_pid = pid
                            .parse()
                            .ok()
                            .and_then(|pid| self.tree.group_of(pid))
                            .and_then(|group| self.attempt_of_group.get(&group).copied());
                        match attempt_of_pid {
                            Some(earlier) if Some(earlier) != running => {
                                attribution::Verdict::Foreign(format!(
                                    "pid {pid} belonged to attempt {earlier}, which has ended"
                                ))
                            }
                            _ => attribution::Verdict::Job(format!("{why} (kernel record {seq})")),
                        }
                    }
                    (attribution::Verdict::Job(why), None) => {
                        attribution::Verdict::Job(format!("{why} (kernel record {seq})"))
                    }
                    (verdict, _) => verdict,
                };
                let facility = facility_name(facility);
                return self.outside_fault(
                    fault,
                    verdict,
                    running,
                    "kernel log",
                    (facility, seq),
                    repeats,
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
                *self.kernel_lost.get_or_insert(0) += records.unwrap_or(0);
            }
            KernelEvent::Dropped { records } => {
                // Warned once; the total is reported when the run ends.
                if self.kernel_dropped == 0 {
                    self.warn(
                        "kernel log: fault records are being dropped because gpuwarden fell behind (a flood); the total comes at the end of the run".to_string(),
                    )?;
                }
                self.kernel_dropped += records;
            }
            // A record the kernel wrote in a form we do not know: nothing to act on.
            KernelEvent::Malformed { .. } => {}
            KernelEvent::Unavailable { reason } => {
                self.warn(format!("{reason} (--no-kernel-log silences this)"))?;
            }
            KernelEvent::Restarted { error, restarts } => {
                self.warn(format!(
                    "kernel log reader failed ({error}) and was restarted (restart {restarts})"
                ))?;
            }
            KernelEvent::GaveUp { error } => {
                self.warn(format!(
                    "kernel log reader failed too often ({error}); supervising without the kernel log from now on"
                ))?;
            }
        }
        Ok(None)
    }

    /// Carries out one effect. Events it causes at once (the answer to `Spawn`) go to `pending`.
    fn apply(
        &mut self,
        effect: Effect,
        pending: &mut Vec<Event>,
    ) -> Result<Option<Outcome>, RunError> {
        match effect {
            Effect::Spawn { attempt, tier } => {
                let mut closed = Vec::new();
                let answer = self.spawn(attempt, tier, &mut closed)?;
                // `pending` is a stack: the answer to Spawn must come out first.
                pending.extend(closed);
                pending.push(answer);
            }
            Effect::Signal { attempt, sig } => {
                if let Some(&pgid) = self.groups.get(&attempt)
                    && let Err(e) = process::signal_group(pgid, sig)
                {
                    self.warn(format!(
                        "could not send {} to the job (process group {pgid}): {e}",
                        sig.name()
                    ))?;
                }
            }
            Effect::Journal(record) => self.journal(&record)?,
            Effect::Say(message) => say(&message),
            Effect::Finish(outcome) => return Ok(Some(outcome)),
        }
        Ok(None)
    }

    /// Starts an attempt; returns the answer to `Spawn`. Streams whose reader could not be
    /// started are reported closed through `closed`.
    fn spawn(
        &mut self,
        attempt: u32,
        tier_index: usize,
        closed: &mut Vec<Event>,
    ) -> Result<Event, RunError> {
        let plan = self.plan;
        let Some(tier) = plan.ladder.get(tier_index) else {
            return Ok(Event::SpawnFailed {
                attempt,
                error: format!("no tier #{tier_index} on the ladder"),
            });
        };
        let checkpoint = match self.find_checkpoint(attempt)? {
            Ok(c) => c,
            Err(error) => return Ok(Event::SpawnFailed { attempt, error }),
        };
        let placeholders = Placeholders {
            device: &tier.device,
            checkpoint: checkpoint.as_deref(),
            tier: &tier.name,
            attempt,
            run_dir: &self.run_dir,
        };
        let launch = ladder::launch(
            &plan.command,
            tier,
            &placeholders,
            std::env::var_os("PYTHONUNBUFFERED").is_some(),
        );
        let stdout_log = self.run_dir.join(format!("attempt-{attempt}.stdout.log"));
        let stderr_log = self.run_dir.join(format!("attempt-{attempt}.stderr.log"));
        // `create_new`: a log is never overwritten, whatever is in the run directory.
        let open = |path: &PathBuf| {
            File::options()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|source| RunError::Log {
                    path: path.clone(),
                    source,
                })
        };
        let (out_log, err_log) = (open(&stdout_log)?, open(&stderr_log)?);
        let spec = JobSpec {
            argv: &launch.argv,
            set_env: &launch.set_env,
            unset_env: &launch.unset_env,
        };
        let mut child = match process::spawn_job(&spec) {
            Ok(child) => child,
            Err(e) => {
                let program = launch.argv.first().cloned().unwrap_or_default();
                return Ok(Event::SpawnFailed {
                    attempt,
                    error: format!("{}: {e}", program.to_string_lossy()),
                });
            }
        };
        let pid = child.id();
        // The job leads its own group, so the group id is its pid.
        self.groups.insert(attempt, pid);
        self.attempt_of_group.insert(pid, attempt);
        self.tree.add_group(pid);
        let _ = self.tree.refresh();
        self.refreshed = Instant::now();
        let usable = if tier.uses_gpu {
            usable_gpus(&self.gpus, &launch)
        } else {
            Vec::new()
        };
        self.usable.insert(attempt, usable);
        if let Some(guard) = &mut self.guard
            && let Err(e) = guard.watch(pid)
        {
            self.guard = None;
            self.warn(format!(
                "the guard process is gone ({e}): if gpuwarden is killed, the job may survive it"
            ))?;
        }
        // As plain files: one type for both pipes, readable and pollable.
        let pumps = [
            (
                child.stdout.take().map(|p| File::from(OwnedFd::from(p))),
                Stream::Stdout,
                out_log,
            ),
            (
                child.stderr.take().map(|p| File::from(OwnedFd::from(p))),
                Stream::Stderr,
                err_log,
            ),
        ];
        for (pipe, stream, log) in pumps {
            let started = pipe.map(|pipe| {
                output::spawn(
                    pipe,
                    stream,
                    log,
                    Arc::clone(&self.rules),
                    self.tx.clone(),
                    move |event| Input::Output {
                        attempt,
                        stream,
                        event,
                    },
                )
            });
            if !matches!(started, Some(Ok(_))) {
                // Without a reader the supervisor would wait for this stream forever.
                // Queued directly: the loop must never block sending into its own channel.
                closed.push(Event::StreamClosed { attempt, stream });
            }
        }
        // The std handle is not waited on: `wait_group` reaps the leader and its orphans.
        drop(child);
        let tx = self.tx.clone();
        let waiter = thread::Builder::new()
            .name(format!("wait-{attempt}"))
            .spawn(move || {
                process::wait_group(pid, |event| {
                    let _ = tx.send(Input::Group { attempt, event });
                });
            });
        if let Err(e) = waiter {
            // Without a waiter the exit would never be seen: stop this attempt now.
            let _ = process::signal_group(pid, Sig::Kill);
            return Ok(Event::SpawnFailed {
                attempt,
                error: format!("cannot start a thread to wait for the job: {e}"),
            });
        }
        say(&format!(
            "attempt {attempt} on tier `{}` (device {}){}",
            tier.name,
            tier.device,
            match &checkpoint {
                Some(c) => format!(", resuming from {}", c.display()),
                None => String::new(),
            }
        ));
        self.journal(&Record::AttemptStarted {
            attempt,
            tier: tier.name.clone(),
            device: tier.device.clone(),
            checkpoint: checkpoint.clone(),
            argv: launch.argv.clone(),
            pid,
            stdout_log,
            stderr_log,
        })?;
        Ok(Event::Spawned {
            attempt,
            checkpoint,
        })
    }

    /// The newest complete checkpoint, journaling the incomplete ones it skipped. The inner
    /// error says why the checkpoints could not be looked at; the attempt is then not started,
    /// since starting from scratch could overwrite the progress that is there.
    fn find_checkpoint(
        &mut self,
        attempt: u32,
    ) -> Result<Result<Option<PathBuf>, String>, RunError> {
        let Some(spec) = &self.plan.checkpoints else {
            return Ok(Ok(None));
        };
        // Relative specs are relative to gpuwarden's (and so the job's) working directory.
        let found = checkpoints::Spec::new(spec, Some(&self.run_dir), Path::new(""))
            .and_then(|s| s.discover());
        match found {
            Ok(found) => {
                for skipped in found.skipped {
                    say(&format!(
                        "skipping checkpoint {}: {}",
                        skipped.path.display(),
                        skipped.reason
                    ));
                    self.journal(&Record::CheckpointSkipped {
                        attempt,
                        path: skipped.path,
                        reason: skipped.reason,
                    })?;
                }
                Ok(Ok(found.newest.map(|c| c.path)))
            }
            Err(e) => Ok(Err(format!(
                "cannot look for checkpoints in `{spec}`: {e:#}; not starting from scratch over them"
            ))),
        }
    }

    /// Reaps orphans adopted from finished attempts that left their process group (daemons
    /// started with `setsid`), so they do not pile up as zombies over a long run.
    fn reap_strays(&self) {
        let groups: Vec<u32> = self.groups.values().copied().collect();
        let guard: Vec<u32> = self.guard.iter().map(Guard::pid).collect();
        process::reap_strays(&groups, &guard);
    }

    /// After a failure of gpuwarden itself mid-run: stop what is running as a fault would,
    /// with the configured grace, rather than leave it to the guard's short one.
    fn stop_jobs(&mut self) {
        let groups: Vec<u32> = self.groups.values().copied().collect();
        if groups.is_empty() {
            return;
        }
        say("stopping the job because gpuwarden cannot go on");
        for &g in &groups {
            let _ = process::signal_group(g, Sig::Terminate);
        }
        let deadline = Instant::now() + self.plan.grace;
        while Instant::now() < deadline && groups.iter().any(|&g| process::group_alive(g)) {
            thread::sleep(Duration::from_millis(50));
        }
        for &g in &groups {
            let _ = process::signal_group(g, Sig::Kill);
        }
    }

    fn journal(&mut self, record: &Record) -> Result<(), RunError> {
        self.journal
            .write(record, SystemTime::now())
            .map_err(|source| RunError::Journal {
                path: self.journal.path().to_path_buf(),
                source,
            })
    }

    fn warn(&mut self, message: String) -> Result<(), RunError> {
        say(&format!("warning: {message}"));
        self.journal(&Record::Warning { message })
    }

    fn command_line(&self) -> String {
        self.plan
            .command
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// gpuwarden's own voice: always stderr, so stdout carries only the job's stdout.
///
/// During a run the lines go through a writer thread with a bounded queue: the job's stderr pump
/// shares the stderr lock, and when nobody reads our stderr (Ctrl-S in a terminal, `2>&1 | less`)
/// the pump blocks holding it. The event loop must not block with it, or a job that ignores
/// SIGTERM would never get its SIGKILL; a line that does not fit the queue is dropped (the
/// journal has the facts). Write errors are ignored: a closed stderr (a dropped ssh session)
/// must not stop the supervision, where `eprintln!` would panic.
pub fn say(message: &str) {
    say_raw(&format!("gpuwarden: {message}\n"));
}

enum Voice {
    Line(String),
    Flush(mpsc::Sender<()>),
}

static VOICE: OnceLock<SyncSender<Voice>> = OnceLock::new();

/// Like [`say`], without the `gpuwarden:` prefix (the summary table).
fn say_raw(text: &str) {
    match VOICE.get() {
        Some(tx) => {
            let _ = tx.try_send(Voice::Line(text.to_string()));
        }
        None => {
            let _ = io::stderr().lock().write_all(text.as_bytes());
        }
    }
}

/// Starts the writer thread behind [`say`]. Failing that, `say` writes directly.
fn start_voice() {
    let (tx, rx) = mpsc::sync_channel::<Voice>(256);
    let started = thread::Builder::new().name("voice".into()).spawn(move || {
        for msg in rx {
            match msg {
                Voice::Line(line) => {
                    let _ = io::stderr().lock().write_all(line.as_bytes());
                }
                Voice::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
    });
    if started.is_ok() {
        let _ = VOICE.set(tx);
    }
}

/// Waits (a bounded time) until every line said so far is written.
fn flush_voice() {
    if let Some(tx) = VOICE.get() {
        let (done, wait) = mpsc::channel();
        if tx.send(Voice::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(Duration::from_secs(2));
        }
    }
}

/// Checks that the command can be started before anything else happens, so a typo is a usage
/// error (exit 2) rather than a failed attempt. Uses the first tier's PATH when it sets one.
pub fn check_command(plan: &Plan) -> Result<(), String> {
    let Some(program) = plan.command.first() else {
        return Err("no command given: put the command to supervise after `--`".into());
    };
    let path_var: Option<OsString> = plan
        .ladder
        .first()
        .and_then(|t| t.set_env.get("PATH").map(OsString::from))
        .or_else(|| std::env::var_os("PATH"));
    let program_path = Path::new(program);
    if program.to_string_lossy().contains('/') {
        return if is_executable(program_path) {
            Ok(())
        } else {
            Err(if program_path.is_file() {
                format!(
                    "cannot run `{}`: the file is not executable; `chmod +x` it or run it through its interpreter (`python3 {}`)",
                    program_path.display(),
                    program_path.display()
                )
            } else {
                format!("cannot run `{}`: no such file", program_path.display())
            })
        };
    }
    let found = path_var
        .as_ref()
        .map(|p| std::env::split_paths(p).any(|dir| is_executable(&dir.join(program_path))))
        .unwrap_or(false);
    if found {
        Ok(())
    } else {
        Err(format!(
            "cannot run `{}`: command not found in PATH; check the spelling or give its full path",
            program_path.display()
        ))
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The table printed when the run ends.
fn print_summary(sup: &Supervisor, plan: &Plan, outcome: &Outcome, journal: &Path) {
    let attempts = sup.attempts();
    // Wall time of the whole run, backoff waits included.
    let total = match (attempts.first(), attempts.last()) {
        (Some(first), Some(last)) => last
            .ended
            .unwrap_or_else(Instant::now)
            .saturating_duration_since(first.started),
        _ => Duration::ZERO,
    };
    let restarts = attempts.len().saturating_sub(1);
    say(&format!(
        "{outcome} after {} attempt{} ({} restart{}) in {:.1} s; journal: {}",
        attempts.len(),
        if attempts.len() == 1 { "" } else { "s" },
        restarts,
        if restarts == 1 { "" } else { "s" },
        total.as_secs_f64(),
        journal.display()
    ));
    let rows: Vec<[String; 5]> = attempts
        .iter()
        .map(|a| {
            [
                a.attempt.to_string(),
                plan.ladder
                    .get(a.tier)
                    .map_or_else(|| format!("#{}", a.tier), |t| t.name.clone()),
                a.checkpoint
                    .as_ref()
                    .map_or_else(|| "-".to_string(), |c| c.display().to_string()),
                a.ending.to_string(),
                format!("{:.1} s", attempt_time(a).as_secs_f64()),
            ]
        })
        .collect();
    let header = [
        "attempt".to_string(),
        "tier".into(),
        "resumed from".into(),
        "ended by".into(),
        "time".into(),
    ];
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        say_raw(&format!("  {}\n", line.join("  ").trim_end()));
    }
}

fn attempt_time(a: &AttemptSummary) -> Duration {
    a.ended
        .unwrap_or_else(Instant::now)
        .saturating_duration_since(a.started)
}

/// The PCI slots of the GPUs an attempt can use: this machine's GPUs, less those hidden by the
/// `*_VISIBLE_DEVICES` variables the attempt runs with (inherited, or set or unset by its tier).
fn usable_gpus(gpus: &[Gpu], launch: &ladder::Launch) -> Vec<(u32, u8, u8)> {
    let env = crate::probe::read_env(|name| {
        if launch.unset_env.iter().any(|n| n == name) {
            return None;
        }
        launch
            .set_env
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var_os(name))
    });
    crate::probe::visible(gpus, &env)
        .into_iter()
        .filter_map(|gpu| gpu.pci.as_deref().and_then(attribution::pci_slot))
        .collect()
}
