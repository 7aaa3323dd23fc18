//! The supervisor: a pure state machine that decides what happens to a run.
//!
//! It takes [`Event`]s (a fault was seen, the job exited, the user pressed Ctrl-C, time passed)
//! and returns [`Effect`]s (spawn an attempt, signal the job's process group, write a journal
//! record, tell the user something, finish). It does no I/O, reads no clock and starts no thread:
//! time comes in as the `now` argument. Every policy lives here: which fault stops the job, the
//! grace period before SIGKILL, the restart budget and its backoff, and the walk down the ladder.
//! The executor (`crate::app`) carries the effects out.
//!
//! It is not for classifying lines (that is `crate::rules`) nor for finding checkpoints (that is
//! `crate::checkpoints`, run by the executor when it spawns an attempt).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::gpu::JobGpu;
use crate::job::{JobExit, Sig};

pub mod climb;
pub mod memory;
pub mod outside;
pub mod stall;
use crate::incident::{Linker, RUN_WINDOW_SECONDS, Role};
use crate::journal::{ExitRecord, Record};
use crate::rules::{Action, Fault, FaultClass, Stream};

/// How long processes of the group may survive SIGKILL (uninterruptible sleep, typically stuck
/// in a GPU driver call) before the attempt is closed without them.
pub const KILL_WAIT: Duration = Duration::from_secs(5);

/// The default `Policy::settle`: long enough for a Python job to print its traceback after
/// its GPU call fails, short beside any training run.
pub const SETTLE: Duration = Duration::from_millis(500);

/// The knobs of the restart policy, validated by `crate::config`.
#[derive(Clone, Debug)]
pub struct Policy {
    pub max_restarts: u32,
    pub grace: Duration,
    /// How long a fault seen outside the job's own output (a kernel-log line naming the job's
    /// process, a health fault of its GPU) waits for the job's own report before SIGTERM. The
    /// job's GPU context is lost already and it is about to fail on its own; its traceback says
    /// which operation failed, and a signal sent at once would cut it off. A fault line of the
    /// job's own output ends the wait at once.
    pub settle: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// No progress (new output, a new checkpoint) for this long is a fault: `gpu_hang` on a GPU
    /// tier, `job_stalled` otherwise. `None` turns stall detection off.
    pub stall_timeout: Option<Duration>,
    /// `max_restarts` counts the restarts of this sliding window (systemd's
    /// `StartLimitIntervalSec`); `None`: of the whole run.
    pub restart_window: Option<Duration>,
    /// Whether the executor watches a checkpoint location (and so sends `Event::Checkpoint`):
    /// only then can "no new checkpoint" mean "no progress".
    pub checkpoints_watched: bool,
    /// Whether a fault pinned to some of the attempt's GPUs restarts it on the same tier with
    /// those GPUs hidden, before the ladder goes down (issue 14).
    pub gpu_exclusion: bool,
    /// The fewest GPUs the job may run on after an exclusion; an exclusion that would leave
    /// fewer goes down the ladder instead.
    pub min_gpus: usize,
    /// `[policy]` in gpuwarden.toml: the action for a fault class, in place of its rule's.
    pub class_actions: BTreeMap<FaultClass, Action>,
    /// With checkpoints watched, an attempt that ran this long and wrote no new checkpoint is
    /// warned about (and louder when the restart after it starts from scratch).
    pub warn_no_checkpoint_after: Option<Duration>,
    /// At most this many climbs back up the ladder per run (`climb.rs`); 0: never.
    pub climb_back: u32,
    /// The longest wait, before an attempt on a GPU tier after a faulted GPU attempt, for the
    /// GPUs to show that attempt's memory released (`memory.rs`); `None`: no wait.
    pub gpu_memory_wait: Option<Duration>,
    /// `Some(floor)`: an attempt's stall timeout is learned from its heartbeats (`stall.rs`),
    /// with `stall_timeout` as the ceiling; `None`: `stall_timeout` as it is.
    pub stall_floor: Option<Duration>,
}

impl Policy {
    /// Gives `fault` the action `[policy]` names for its class; returns what to say when that
    /// changed it. A stall's `note` is not taken: a stall not acted on would be raised again at
    /// every tick, and "never stop a silent job" is `--stall-timeout off`.
    fn apply(&self, fault: &mut Fault) -> Option<String> {
        let action = *self.class_actions.get(&fault.class)?;
        if action == fault.action || (action == Action::Note && fault.stream == Stream::Progress) {
            return None;
        }
        let said = format!(
            "[policy] makes {} `{action}` (rule {} says `{}`)",
            fault.class, fault.rule, fault.action
        );
        fault.action = action;
        Some(said)
    }
}

/// Attempts in a row on one tier that wrote no new checkpoint, after which the tier is given
/// up on (NVIDIA's resiliency launcher stops after 3 such cycles).
pub const NO_PROGRESS_LIMIT: usize = 3;

/// What the supervisor needs to know of a tier.
#[derive(Clone, Debug)]
pub struct TierInfo {
    pub name: String,
    pub uses_gpu: bool,
}

/// Everything the supervisor reacts to.
#[derive(Clone, Debug)]
pub enum Event {
    /// Begin the run with attempt 1 on the first tier.
    Start,
    /// The executor started `attempt`; `checkpoint` is what it resumes from, `gpus` the GPUs it
    /// sees (in its ordinal order; empty on a CPU tier or where no GPU is known).
    Spawned {
        attempt: u32,
        checkpoint: Option<PathBuf>,
        gpus: Vec<JobGpu>,
    },
    /// The executor could not start `attempt` (the command vanished, fork failed...).
    SpawnFailed { attempt: u32, error: String },
    /// A rule matched a line of `attempt`'s output (or a source attributed to it).
    Fault { attempt: u32, fault: Fault },
    /// A stream of `attempt` was seen empty at `at`, after a silence: everything written to it
    /// before `at` was read and classified, and its faults came before this event.
    OutputIdle {
        attempt: u32,
        stream: Stream,
        at: Instant,
    },
    /// One output stream of `attempt` reached end of file.
    StreamClosed { attempt: u32, stream: Stream },
    /// The leader process of `attempt` exited; `group_alive` tells whether other processes of
    /// its process group (workers, dataloaders) are still running.
    Exited {
        attempt: u32,
        status: JobExit,
        group_alive: bool,
    },
    /// The last process of `attempt`'s process group is gone.
    GroupEmpty { attempt: u32 },
    /// `attempt` ended having read its terminal and got EIO, where every read of it must fail
    /// (`process::terminal_reads_fail`): a restart cannot cure that.
    TerminalReadFailed { attempt: u32 },
    /// gpuwarden itself received a signal.
    Signal(Sig),
    /// Evidence that `attempt` is alive and working, seen at `at`: new output on one of its
    /// streams, or a new complete checkpoint.
    Progress { attempt: u32, at: Instant },
    /// With `--progress`: `attempt`'s heartbeats came `median` apart, over `heartbeats` of
    /// them (sent once per attempt).
    StepInterval {
        attempt: u32,
        heartbeats: u64,
        median: Duration,
    },
    /// A new complete checkpoint of `attempt`, `path`, was found, written at `at`: progress,
    /// and progress that a restart keeps.
    Checkpoint {
        attempt: u32,
        at: Instant,
        path: PathBuf,
    },
    /// The user asked, from the live display (`f`), to stop the live attempt and go on one
    /// tier down the ladder, as a `fallback` fault would.
    ForceFallback,
    /// While the run waits for GPU memory (`Supervisor::memory_wait`): what the GPUs show of
    /// the memory of attempt `ended`, whose processes were `pids`.
    GpuMemory {
        ended: u32,
        pids: Vec<u32>,
        gpus: Vec<memory::GpuMemory>,
    },
    /// Time passed.
    Tick,
}

/// Why the run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The job exited with status 0.
    Succeeded,
    /// A fault's action was `stop`.
    StoppedByFault { rule: String, class: FaultClass },
    /// The fault asked for a tier below the last one.
    LadderExhausted,
    /// `--max-restarts` restarts were used.
    BudgetSpent,
    /// An attempt could not be started.
    SpawnFailed(String),
    /// The user (or the system) sent gpuwarden this signal.
    Interrupted(Sig),
}

impl Outcome {
    /// The process exit code documented in `crate::exit`.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Succeeded => crate::exit::SUCCESS,
            Outcome::Interrupted(sig) => crate::exit::interrupted(sig.number()),
            _ => crate::exit::GAVE_UP,
        }
    }

    /// A short machine-readable name for the journal.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::StoppedByFault { .. } => "stopped_by_fault",
            Outcome::LadderExhausted => "ladder_exhausted",
            Outcome::BudgetSpent => "budget_spent",
            Outcome::SpawnFailed(_) => "spawn_failed",
            Outcome::Interrupted(_) => "interrupted",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Succeeded => f.write_str("the job finished"),
            Outcome::StoppedByFault { rule, class } => {
                write!(f, "gave up: fault {class} ({rule}) has the action `stop`")
            }
            Outcome::LadderExhausted => f.write_str("gave up: no tier left on the fallback ladder"),
            Outcome::BudgetSpent => f.write_str("gave up: the restart budget is spent"),
            Outcome::SpawnFailed(e) => write!(f, "gave up: could not start the job: {e}"),
            Outcome::Interrupted(sig) => write!(f, "stopped by {}", sig.name()),
        }
    }
}

/// What the executor must do. Returned as a `Vec`: an empty vector is an explicit "nothing".
#[derive(Clone, Debug, PartialEq)]
#[must_use]
// Effects live for one step, a handful at a time, and most of them are journal records: boxing
// the record would allocate twice for the common case to shrink the rare one.
#[allow(clippy::large_enum_variant)]
pub enum Effect {
    /// Start `attempt` on ladder tier `tier` (an index into the ladder), with the GPUs
    /// `exclude` (inventory keys, `JobGpu::key`) hidden from it.
    Spawn {
        attempt: u32,
        tier: usize,
        exclude: Vec<usize>,
    },
    /// Send `sig` to the process group of `attempt`.
    Signal { attempt: u32, sig: Sig },
    /// Append a record to the journal (and fsync it).
    Journal(Record),
    /// Tell the user (one line on stderr).
    Say(String),
    /// Capture the stacks of `attempt`'s processes into the run directory (py-spy, bounded in
    /// time) before it is stopped for a stall. Comes before the `Signal` that stops it.
    CaptureStacks { attempt: u32 },
    /// The run is over.
    Finish(Outcome),
}

/// Why an attempt was stopped by gpuwarden.
#[derive(Clone, Debug)]
enum StopCause {
    Fault(Fault),
    User(Sig),
    /// The user forced a fallback (`Event::ForceFallback`): the run goes on one tier down.
    Forced,
    /// A lower tier saved a newer checkpoint after a transient fall: the run goes back up to
    /// tier `to` (`climb.rs`).
    Climb {
        to: usize,
    },
}

/// How an attempt ended, for the summary.
#[derive(Clone, Debug, PartialEq)]
pub enum Ending {
    Running,
    Fault {
        class: FaultClass,
        rule: String,
        status: Option<JobExit>,
    },
    Exit(JobExit),
    User {
        sig: Sig,
        status: Option<JobExit>,
    },
    /// Stopped to fall back one tier, as the user asked.
    Forced {
        status: Option<JobExit>,
    },
    /// Stopped to climb back to the tier `to` after a transient fall.
    Climbed {
        to: String,
        status: Option<JobExit>,
    },
    SpawnFailed(String),
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ending::Running => f.write_str("running"),
            Ending::Fault { class, rule, .. } => write!(f, "{class} ({rule})"),
            Ending::Exit(status) if status.success() => f.write_str("finished (exit status 0)"),
            Ending::Exit(status) => write!(f, "{status}, no known fault"),
            Ending::User { sig, .. } => write!(f, "stopped by {}", sig.name()),
            Ending::Forced { .. } => f.write_str("stopped to fall back (forced by the user)"),
            Ending::Climbed { to, .. } => write!(f, "stopped to climb back to tier `{to}`"),
            Ending::SpawnFailed(e) => write!(f, "could not start: {e}"),
        }
    }
}

/// One attempt as the summary shows it.
#[derive(Clone, Debug)]
pub struct AttemptSummary {
    pub attempt: u32,
    pub tier: usize,
    pub checkpoint: Option<PathBuf>,
    pub started: Instant,
    pub ended: Option<Instant>,
    pub ending: Ending,
    /// Whether it wrote a new checkpoint (`Event::Checkpoint`).
    pub wrote_checkpoint: bool,
    /// The newest checkpoint it got to: the last one it wrote, else the one it resumed from.
    /// Two attempts that fault at the same point got to the same checkpoint.
    pub reached: Option<PathBuf>,
    /// The GPUs it saw.
    pub gpus: Vec<JobGpu>,
}

/// The attempt that is running or being stopped.
#[derive(Debug)]
struct Live {
    attempt: u32,
    tier: usize,
    stop: Option<StopCause>,
    /// When SIGTERM (or the user's signal) went to the group; SIGKILL follows after the grace.
    term_sent: Option<Instant>,
    /// When SIGTERM is due for a fault seen outside the job's output (see `Policy::settle`).
    term_due: Option<Instant>,
    killed_at: Option<Instant>,
    exit: Option<JobExit>,
    /// No process of the attempt's group is left (or the survivors were given up on).
    group_empty: bool,
    /// When `group_empty` became true.
    group_gone_at: Option<Instant>,
    /// Output streams not yet at end of file.
    open: Vec<Stream>,
    /// Open streams seen empty after the group was gone (held open by an outsider).
    drained: Vec<Stream>,
    /// Faults seen in this attempt, by rule id, with how often each was seen.
    seen: BTreeMap<String, u64>,
    /// The latest evidence of progress (the start counts as progress).
    last_progress: Instant,
    /// This attempt's stall timeout: the policy's, or one learned from its heartbeats.
    stall_timeout: Option<Duration>,
    /// When the attempt started: incidents are linked by the time since.
    started: Instant,
    /// The attempt's faults linked into incidents: which is a cause, which follows from one.
    incidents: Linker,
    /// The GPUs it sees (`Event::Spawned`).
    gpus: Vec<JobGpu>,
    /// The GPUs its faults blamed (faults that go down the ladder and say something against a
    /// GPU), in the order named.
    named: Vec<JobGpu>,
    /// It failed reading a terminal it can never read (`Event::TerminalReadFailed`).
    terminal_read_failed: bool,
}

impl Live {
    fn group_gone(&mut self, now: Instant) {
        if !self.group_empty {
            self.group_empty = true;
            self.group_gone_at = Some(now);
        }
    }

    /// While SIGTERM waits for the job's own report (`Policy::settle`): a fault line of the
    /// job's own output is that report, so the wait ends.
    fn end_settle(&mut self, own_output: bool, now: Instant, out: &mut Vec<Effect>) {
        if own_output && self.term_due.is_some() && self.term_sent.is_none() {
            self.term_due = None;
            self.stop_group(Sig::Terminate, now, out);
        }
    }

    /// Sends `sig` to the group unless nothing is left of it; returns whether it was sent.
    fn stop_group(&mut self, sig: Sig, now: Instant, out: &mut Vec<Effect>) -> bool {
        if self.group_empty {
            return false;
        }
        self.term_sent.get_or_insert(now);
        out.push(Effect::Signal {
            attempt: self.attempt,
            sig,
        });
        true
    }
}

#[derive(Debug)]
enum Phase {
    Idle,
    /// Waiting out the backoff before starting `attempt` on `tier`.
    Backoff {
        attempt: u32,
        tier: usize,
        until: Instant,
    },
    Live(Box<Live>),
    /// Waiting for the GPUs to release a faulted attempt's memory before the next attempt.
    MemoryWait(Box<memory::Wait>),
    Done,
}

/// The state machine. See the module documentation.
#[derive(Debug)]
pub struct Supervisor {
    policy: Policy,
    ladder: Vec<TierInfo>,
    phase: Phase,
    restarts: u32,
    /// When each restart within the restart window was decided (only with a window).
    restart_times: Vec<Instant>,
    /// The attempt number and tier `Event::Start` begins with: 1 and the first tier, unless a
    /// resumed run continues where its journal stopped.
    start: (u32, usize),
    attempts: Vec<AttemptSummary>,
    /// GPUs hidden from every later attempt, as the attempt that excluded them saw them.
    excluded: Vec<JobGpu>,
    /// The run's falls down the ladder and climbs back up (`climb.rs`).
    climbs: climb::Climbs,
}

impl Supervisor {
    pub fn new(policy: Policy, ladder: Vec<TierInfo>) -> Supervisor {
        Supervisor {
            ladder,
            phase: Phase::Idle,
            restarts: 0,
            restart_times: Vec::new(),
            start: (1, 0),
            attempts: Vec::new(),
            excluded: Vec::new(),
            climbs: climb::Climbs::new(policy.climb_back),
            policy,
        }
    }

    /// The GPUs excluded so far (they stay hidden for the rest of the run).
    pub fn excluded(&self) -> &[JobGpu] {
        &self.excluded
    }

    /// Continues a run whose earlier attempts excluded `gpus` (`gpuwarden resume`).
    pub fn exclude_from_start(&mut self, gpus: Vec<JobGpu>) {
        self.excluded = gpus;
    }

    /// The attempt that is running or being stopped: until it has ended (its group gone and its
    /// output drained), faults that come late still belong to it.
    pub fn live_attempt(&self) -> Option<u32> {
        match &self.phase {
            Phase::Live(live) => Some(live.attempt),
            _ => None,
        }
    }

    /// Continues a run whose gpuwarden died (`gpuwarden resume`): `Event::Start` begins with
    /// `attempt` on `tier`, with `restarts` of the budget already used.
    pub fn resume_at(&mut self, attempt: u32, tier: usize, restarts: u32) {
        self.start = (
            attempt.max(1),
            tier.min(self.ladder.len().saturating_sub(1)),
        );
        self.restarts = restarts;
    }

    /// Restarts used so far.
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// Climbs back up the ladder made so far (`climb.rs`).
    pub fn climbs(&self) -> u32 {
        self.climbs.done()
    }

    /// Whether the live attempt is being stopped (a fault or a signal).
    pub fn stopping(&self) -> bool {
        matches!(&self.phase, Phase::Live(live) if live.stop.is_some())
    }

    /// The attempts so far, for the summary and the views.
    pub fn attempts(&self) -> &[AttemptSummary] {
        &self.attempts
    }

    /// The earliest moment at which a `Tick` can change anything, so the executor can sleep
    /// until then instead of polling.
    pub fn next_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Backoff { until, .. } => Some(*until),
            Phase::MemoryWait(w) => Some(w.until),
            Phase::Live(live) => {
                let kill_at = match (live.term_sent, live.killed_at, live.group_empty) {
                    (Some(sent), None, false) => Some(sent + self.policy.grace),
                    _ => None,
                };
                let give_up_at = match (live.killed_at, live.group_empty) {
                    (Some(killed), false) => Some(killed + KILL_WAIT),
                    _ => None,
                };
                let term_at = match (live.term_due, live.term_sent, live.group_empty) {
                    (Some(due), None, false) => Some(due),
                    _ => None,
                };
                term_at
                    .or(kill_at)
                    .or(give_up_at)
                    .or_else(|| self.stall_at(live))
            }
            Phase::Idle | Phase::Done => None,
        }
    }

    /// When `live` counts as stalled if no progress comes first; `None` when stall detection is
    /// off or the attempt is already ending.
    fn stall_at(&self, live: &Live) -> Option<Instant> {
        let timeout = live.stall_timeout?;
        let watching = live.stop.is_none()
            && live.term_sent.is_none()
            && live.exit.is_none()
            && !live.group_empty;
        watching.then(|| live.last_progress + timeout)
    }

    /// Feed one event; get back what to do, in order.
    pub fn step(&mut self, event: Event, now: Instant) -> Vec<Effect> {
        let mut out = Vec::new();
        match event {
            Event::Start => {
                if matches!(self.phase, Phase::Idle) {
                    let (attempt, tier) = self.start;
                    self.spawn(attempt, tier, now, &mut out);
                }
            }
            Event::Spawned {
                attempt,
                checkpoint,
                gpus,
            } => self.on_spawned(attempt, checkpoint, gpus),
            Event::SpawnFailed { attempt, error } => {
                if self.is_current(attempt) {
                    if let Some(a) = self.attempts.last_mut() {
                        a.ended = Some(now);
                        a.ending = Ending::SpawnFailed(error.clone());
                    }
                    self.finish(Outcome::SpawnFailed(error), &mut out);
                }
            }
            Event::Fault { attempt, fault } => self.on_fault(attempt, fault, now, &mut out),
            Event::StreamClosed { attempt, stream } => {
                if let Phase::Live(live) = &mut self.phase
                    && live.attempt == attempt
                {
                    live.open.retain(|s| *s != stream);
                    self.end_if_over(now, &mut out);
                }
            }
            Event::Exited {
                attempt,
                status,
                group_alive,
            } => self.on_exited(attempt, status, group_alive, now, &mut out),
            Event::OutputIdle {
                attempt,
                stream,
                at,
            } => {
                if let Phase::Live(live) = &mut self.phase
                    && live.attempt == attempt
                    && live.group_gone_at.is_some_and(|gone| at > gone)
                {
                    // Seen empty after the last process of the group died: nothing it wrote
                    // is left unread. Whoever still holds the pipe open is not the job.
                    if !live.drained.contains(&stream) {
                        live.drained.push(stream);
                    }
                    self.end_if_over(now, &mut out);
                }
            }
            Event::GroupEmpty { attempt } => {
                if let Phase::Live(live) = &mut self.phase
                    && live.attempt == attempt
                {
                    live.group_gone(now);
                    self.end_if_over(now, &mut out);
                }
            }
            Event::Signal(sig) => self.on_signal(sig, now, &mut out),
            Event::ForceFallback => self.force_fallback(now, &mut out),
            Event::Progress { attempt, at } => {
                if let Phase::Live(live) = &mut self.phase
                    && live.attempt == attempt
                    && at > live.last_progress
                {
                    live.last_progress = at;
                }
            }
            Event::StepInterval {
                attempt,
                heartbeats,
                median,
            } => self.on_step_interval(attempt, heartbeats, median, &mut out),
            Event::TerminalReadFailed { attempt } => {
                if let Phase::Live(live) = &mut self.phase
                    && live.attempt == attempt
                {
                    live.terminal_read_failed = true;
                }
            }
            Event::Checkpoint { attempt, at, path } => {
                if let Phase::Live(live) = &mut self.phase
                    && live.attempt == attempt
                {
                    if at > live.last_progress {
                        live.last_progress = at;
                    }
                    if let Some(a) = self
                        .attempts
                        .iter_mut()
                        .rev()
                        .find(|a| a.attempt == attempt)
                    {
                        a.wrote_checkpoint = true;
                        a.reached = Some(path.clone());
                    }
                    self.climb_if_due(attempt, path, now, &mut out);
                }
            }
            Event::GpuMemory { ended, pids, gpus } => {
                self.on_gpu_memory(ended, &pids, &gpus, now, &mut out)
            }
            Event::Tick => {
                self.check_stall(now, &mut out);
                self.on_tick(now, &mut out);
            }
        }
        out
    }

    fn is_current(&self, attempt: u32) -> bool {
        match &self.phase {
            Phase::Live(live) => live.attempt == attempt,
            _ => false,
        }
    }

    fn spawn(&mut self, attempt: u32, tier: usize, now: Instant, out: &mut Vec<Effect>) {
        self.phase = Phase::Live(Box::new(Live {
            attempt,
            tier,
            stop: None,
            term_sent: None,
            term_due: None,
            killed_at: None,
            exit: None,
            group_empty: false,
            group_gone_at: None,
            open: vec![Stream::Stdout, Stream::Stderr],
            drained: Vec::new(),
            seen: BTreeMap::new(),
            last_progress: now,
            stall_timeout: self.policy.stall_timeout,
            started: now,
            incidents: Linker::new(RUN_WINDOW_SECONDS),
            gpus: Vec::new(),
            named: Vec::new(),
            terminal_read_failed: false,
        }));
        self.attempts.push(AttemptSummary {
            attempt,
            tier,
            checkpoint: None,
            started: now,
            ended: None,
            ending: Ending::Running,
            wrote_checkpoint: false,
            reached: None,
            gpus: Vec::new(),
        });
        out.push(Effect::Spawn {
            attempt,
            tier,
            exclude: self.excluded.iter().map(|g| g.key).collect(),
        });
    }

    fn on_spawned(&mut self, attempt: u32, checkpoint: Option<PathBuf>, gpus: Vec<JobGpu>) {
        let Phase::Live(live) = &mut self.phase else {
            return;
        };
        if live.attempt != attempt {
            return;
        }
        live.gpus.clone_from(&gpus);
        if let Some(a) = self.attempts.last_mut() {
            a.reached.clone_from(&checkpoint);
            a.checkpoint = checkpoint;
            a.gpus = gpus;
        }
    }

    fn on_fault(&mut self, attempt: u32, mut fault: Fault, now: Instant, out: &mut Vec<Effect>) {
        let grace = self.policy.grace;
        let policy_said = self.policy.apply(&mut fault);
        let Phase::Live(live) = &mut self.phase else {
            return;
        };
        if live.attempt != attempt {
            // A late line from an attempt that is already over: it changes nothing.
            return;
        }
        // The GPUs the attempt's faults blame, whichever fault ends up deciding: the job's own
        // `CUDA error` names no GPU and may come before the kernel's Xid that does.
        if fault.action >= Action::Fallback && fault.class.blames_the_device() {
            for g in &fault.gpus {
                if !live.named.iter().any(|n| n.key == g.key) {
                    live.named.push(g.clone());
                }
            }
        }
        // A storm of the same fault is one finding: journal the first, count the rest
        // (the count goes into `attempt_ended`). No allocation for the repeats.
        if let Some(count) = live.seen.get_mut(&fault.rule) {
            *count += 1;
            return;
        }
        live.seen.insert(fault.rule.clone(), 1);
        out.extend(policy_said.map(Effect::Say));
        let since = now.saturating_duration_since(live.started).as_secs_f64();
        let role = live.incidents.link(&fault, since, None);
        let record = Effect::Journal(fault_record(attempt, &fault, Some(role)));
        if fault.action == Action::Note {
            out.push(record);
            return;
        }
        let own_output = matches!(fault.stream, Stream::Stdout | Stream::Stderr);
        match &live.stop {
            None if !own_output && !self.policy.settle.is_zero() => {
                let settle = self.policy.settle;
                out.push(record);
                out.push(Effect::Say(format!(
                    "fault in attempt {attempt}: {} ({}) on {}: {}",
                    fault.class,
                    fault.rule,
                    fault.stream,
                    fault.advice.trim()
                )));
                out.extend(seen_where(&fault).into_iter().map(Effect::Say));
                out.push(Effect::Say(format!(
                    "stopping the job in {settle:.1?} (time for its own error report): SIGTERM to its process group, SIGKILL {grace:.0?} later"
                )));
                live.stop = Some(StopCause::Fault(fault));
                live.term_due = Some(now + settle);
            }
            None => {
                let message = format!(
                    "fault in attempt {attempt}: {} ({}) on {}: {}",
                    fault.class,
                    fault.rule,
                    fault.stream,
                    fault.advice.trim()
                );
                let origin = seen_where(&fault);
                live.stop = Some(StopCause::Fault(fault));
                // The signal goes first: the journal's fsync must not delay it.
                let signalled = live.stop_group(Sig::Terminate, now, out);
                out.push(record);
                out.push(Effect::Say(message));
                out.extend(origin.into_iter().map(Effect::Say));
                if signalled {
                    out.push(Effect::Say(format!(
                        "stopping the job: SIGTERM to its process group, SIGKILL after {grace:.0?}"
                    )));
                }
            }
            // A later fault with a stronger action decides (a device-side assert after an
            // illegal address means "stop", not "fall back").
            Some(StopCause::Fault(first)) if fault.action > first.action => {
                live.stop = Some(StopCause::Fault(fault));
                out.push(record);
                live.end_settle(own_output, now, out);
            }
            Some(_) => {
                out.push(record);
                live.end_settle(own_output, now, out);
            }
        }
    }

    fn on_exited(
        &mut self,
        attempt: u32,
        status: JobExit,
        group_alive: bool,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        let grace = self.policy.grace;
        let Phase::Live(live) = &mut self.phase else {
            return;
        };
        if live.attempt != attempt || live.exit.is_some() {
            return;
        }
        live.exit = Some(status);
        if !group_alive {
            live.group_gone(now);
        }
        // The leader is gone but workers of its group are not: an attempt is over only when
        // nothing of it can still hold the GPU, so they are stopped like the job would be.
        if group_alive && live.term_sent.is_none() {
            out.push(Effect::Journal(Record::Leftovers { attempt }));
            out.push(Effect::Say(format!(
                "attempt {attempt}: the job's main process exited ({status}) but other processes of its group are still running: SIGTERM, SIGKILL after {grace:.0?}"
            )));
            live.stop_group(Sig::Terminate, now, out);
        }
        self.end_if_over(now, out);
    }

    fn on_signal(&mut self, sig: Sig, now: Instant, out: &mut Vec<Effect>) {
        if sig.forward_only() {
            self.forward(sig, out);
            return;
        }
        let grace = self.policy.grace;
        match &mut self.phase {
            Phase::Idle | Phase::Backoff { .. } | Phase::MemoryWait(_) => {
                out.push(Effect::Say(format!(
                    "{} received while no job is running: ending the run",
                    sig.name()
                )));
                self.finish(Outcome::Interrupted(sig), out);
            }
            Phase::Done => {}
            Phase::Live(live) => {
                let attempt = live.attempt;
                if matches!(live.stop, Some(StopCause::User(_))) {
                    // A second signal: no more waiting.
                    if live.killed_at.is_none() && !live.group_empty {
                        live.killed_at = Some(now);
                        out.push(Effect::Signal {
                            attempt,
                            sig: Sig::Kill,
                        });
                        out.push(Effect::Say(format!(
                            "second {}: killing the job now (SIGKILL)",
                            sig.name()
                        )));
                    }
                    return;
                }
                // The user's wish wins over any fault: the run ends instead of restarting.
                live.stop = Some(StopCause::User(sig));
                if live.stop_group(sig, now, out) {
                    out.push(Effect::Say(format!(
                        "{} received: forwarded to the job; it has {grace:.0?} to exit (repeat to kill it now)",
                        sig.name(),
                    )));
                }
            }
        }
    }

    /// The user's `f`: the live attempt is stopped like one a `fallback` fault ends (SIGTERM,
    /// SIGKILL after the grace) and the run goes on one tier down; during a backoff, the attempt
    /// that waits starts one tier down. Refused, with a word, where it cannot be done: no tier
    /// below, the restart budget spent, the attempt already being stopped (a fault's or the
    /// user's own decision stands), or no job at all.
    fn force_fallback(&mut self, now: Instant, out: &mut Vec<Effect>) {
        let grace = self.policy.grace;
        let budget_spent = self.restarts_in_window(now) >= self.policy.max_restarts;
        let last = self.ladder.len().saturating_sub(1);
        let refuse = |out: &mut Vec<Effect>, why: String| {
            out.push(Effect::Say(format!("fallback not forced: {why}")));
        };
        match &mut self.phase {
            Phase::Idle | Phase::Done => refuse(out, "no job is running".into()),
            Phase::MemoryWait(w) => {
                let why = format!(
                    "attempt {} is about to start, once the GPUs release the last attempt's memory; ask again when it runs",
                    w.attempt
                );
                refuse(out, why);
            }
            Phase::Backoff { attempt, tier, .. } => {
                if *tier >= last {
                    let why = format!("attempt {attempt} is due on the last tier already");
                    refuse(out, why);
                    return;
                }
                let from = *tier;
                *tier += 1;
                let (attempt, to) = (*attempt, *tier);
                let record = Record::FallbackForced {
                    attempt,
                    from: self.tier_name(from),
                    to: self.tier_name(to),
                };
                out.push(Effect::Journal(record));
                out.push(Effect::Say(format!(
                    "fallback forced by the user: attempt {attempt} will start on tier `{}` instead of `{}`",
                    self.tier_name(to),
                    self.tier_name(from)
                )));
            }
            Phase::Live(live) => {
                let (attempt, tier) = (live.attempt, live.tier);
                if live.stop.is_some() || live.exit.is_some() || live.group_empty {
                    refuse(out, format!("attempt {attempt} is already ending"));
                    return;
                }
                if tier >= last {
                    let why = format!(
                        "`{}` is the last tier of the ladder; the job keeps running",
                        self.tier_name(tier)
                    );
                    refuse(out, why);
                    return;
                }
                if budget_spent {
                    let why = format!(
                        "the restart budget ({}) is spent; the job keeps running",
                        self.policy.max_restarts
                    );
                    refuse(out, why);
                    return;
                }
                live.stop = Some(StopCause::Forced);
                let signalled = live.stop_group(Sig::Terminate, now, out);
                out.push(Effect::Journal(Record::FallbackForced {
                    attempt,
                    from: self.tier_name(tier),
                    to: self.tier_name(tier + 1),
                }));
                out.push(Effect::Say(format!(
                    "fallback forced by the user: stopping attempt {attempt} on tier `{}`{}, then tier `{}`",
                    self.tier_name(tier),
                    if signalled {
                        format!(" (SIGTERM to its process group, SIGKILL after {grace:.0?})")
                    } else {
                        String::new()
                    },
                    self.tier_name(tier + 1)
                )));
            }
        }
    }

    /// A live attempt without progress for the stall timeout is stopped as a fault: its stacks
    /// are captured first (while it is still there to be looked at), then SIGTERM.
    fn check_stall(&mut self, now: Instant, out: &mut Vec<Effect>) {
        let Phase::Live(live) = &self.phase else {
            return;
        };
        let (Some(due), Some(timeout)) = (self.stall_at(live), live.stall_timeout) else {
            return;
        };
        if now < due {
            return;
        }
        let uses_gpu = self.ladder.get(live.tier).is_some_and(|t| t.uses_gpu);
        let silent = now.saturating_duration_since(live.last_progress);
        let mut fault = stall_fault(uses_gpu, silent, timeout);
        out.extend(self.policy.apply(&mut fault).map(Effect::Say));
        let grace = self.policy.grace;
        let Phase::Live(live) = &mut self.phase else {
            return;
        };
        let attempt = live.attempt;
        live.seen.insert(fault.rule.clone(), 1);
        let since = now.saturating_duration_since(live.started).as_secs_f64();
        let role = live.incidents.link(&fault, since, None);
        out.push(Effect::Journal(fault_record(attempt, &fault, Some(role))));
        out.push(Effect::Say(format!(
            "fault in attempt {attempt}: {} ({}): {}",
            fault.class,
            fault.line,
            fault.advice.trim()
        )));
        live.stop = Some(StopCause::Fault(fault));
        out.push(Effect::CaptureStacks { attempt });
        if live.stop_group(Sig::Terminate, now, out) {
            out.push(Effect::Say(format!(
                "stopping the stalled job: SIGTERM to its process group, SIGKILL after {grace:.0?}"
            )));
        }
    }

    /// A signal that is a message for the job (SIGUSR1 before a Slurm preemption, a terminal
    /// resize): passed to the live attempt's group and nothing else. It never stops or restarts
    /// the run; with no job running (backoff, between attempts) there is nobody to tell.
    fn forward(&mut self, sig: Sig, out: &mut Vec<Effect>) {
        let Phase::Live(live) = &self.phase else {
            return;
        };
        if live.group_empty {
            return;
        }
        let attempt = live.attempt;
        out.push(Effect::Signal { attempt, sig });
        // A resize or a resume is noise in a journal; a checkpoint request is worth a line.
        if matches!(sig, Sig::User1 | Sig::User2) {
            out.push(Effect::Journal(Record::SignalForwarded {
                attempt,
                signal: sig.name().to_string(),
            }));
            out.push(Effect::Say(format!(
                "{} received: forwarded to the job (attempt {attempt}); supervision goes on",
                sig.name()
            )));
        }
    }

    fn on_tick(&mut self, now: Instant, out: &mut Vec<Effect>) {
        let grace = self.policy.grace;
        match &mut self.phase {
            Phase::Backoff {
                attempt,
                tier,
                until,
            } if now >= *until => {
                let (attempt, tier) = (*attempt, *tier);
                self.start_attempt(attempt, tier, now, out);
            }
            Phase::MemoryWait(_) => self.memory_wait_over(now, out),
            Phase::Live(live) => {
                let attempt = live.attempt;
                if let (Some(due), None) = (live.term_due, live.term_sent)
                    && now >= due
                {
                    live.term_due = None;
                    live.stop_group(Sig::Terminate, now, out);
                }
                if let (Some(sent), None, false) =
                    (live.term_sent, live.killed_at, live.group_empty)
                    && now >= sent + grace
                {
                    live.killed_at = Some(now);
                    out.push(Effect::Signal {
                        attempt,
                        sig: Sig::Kill,
                    });
                    out.push(Effect::Say(format!(
                        "the job did not exit within {grace:.0?} of the signal: SIGKILL"
                    )));
                }
                if let (Some(killed), false) = (live.killed_at, live.group_empty)
                    && now >= killed + KILL_WAIT
                {
                    // Processes that outlive SIGKILL are in uninterruptible sleep, usually inside
                    // a wedged GPU driver. Waiting longer cannot help; the next tier may.
                    live.group_gone(now);
                    let message = format!(
                        "attempt {attempt}: processes of the job survived SIGKILL for {KILL_WAIT:?} (stuck in the kernel, often a hung GPU driver); going on without them"
                    );
                    out.push(Effect::Say(message.clone()));
                    out.push(Effect::Journal(Record::Warning { message }));
                    self.end_if_over(now, out);
                }
            }
            _ => {}
        }
    }

    /// Ends the attempt once its group is gone and every output stream is closed or drained.
    fn end_if_over(&mut self, now: Instant, out: &mut Vec<Effect>) {
        let Phase::Live(live) = &self.phase else {
            return;
        };
        // A leader that never exited can only be here when it was given up on after SIGKILL.
        let leader_done = live.exit.is_some() || live.killed_at.is_some();
        if leader_done && live.group_empty && live.open.iter().all(|s| live.drained.contains(s)) {
            self.end_attempt(now, out);
        }
    }

    /// The leader exited and the output is closed (or given up on): decide what comes next.
    fn end_attempt(&mut self, now: Instant, out: &mut Vec<Effect>) {
        let Phase::Live(mut live) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return;
        };
        let status = live.exit;
        // A crash is a fault whether or not a log line said so: the kernel's `segfault at` line
        // may be read before or after the exit, and the output is all read by now. Classified
        // from the exit itself, the outcome does not depend on which thread was faster; a
        // kernel line that comes later is journaled with this attempt.
        let cause = match status {
            _ if live.stop.is_some() => None,
            Some(s) if live.terminal_read_failed && !s.success() => Some(terminal_read_fault()),
            _ => status.and_then(crash_fault),
        };
        if let Some(mut fault) = cause {
            out.extend(self.policy.apply(&mut fault).map(Effect::Say));
            let since = now.saturating_duration_since(live.started).as_secs_f64();
            let role = live.incidents.link(&fault, since, None);
            out.push(Effect::Journal(fault_record(
                live.attempt,
                &fault,
                Some(role),
            )));
            out.push(Effect::Say(format!(
                "fault in attempt {}: {} ({}): {}",
                live.attempt,
                fault.class,
                fault.rule,
                fault.advice.trim()
            )));
            live.seen.insert(fault.rule.clone(), 1);
            live.stop = Some(StopCause::Fault(fault));
        }
        let ending = match &live.stop {
            Some(StopCause::Fault(f)) => Ending::Fault {
                class: f.class,
                rule: f.rule.clone(),
                status,
            },
            Some(StopCause::User(sig)) => Ending::User { sig: *sig, status },
            Some(StopCause::Forced) => Ending::Forced { status },
            Some(StopCause::Climb { to }) => Ending::Climbed {
                to: self.tier_name(*to),
                status,
            },
            None => Ending::Exit(status.unwrap_or(JobExit::Code(-1))),
        };
        let duration = self
            .attempts
            .last()
            .map(|a| now.saturating_duration_since(a.started))
            .unwrap_or_default();
        out.push(Effect::Journal(Record::AttemptEnded {
            attempt: live.attempt,
            tier: self.tier_name(live.tier),
            status: status.map(ExitRecord::from),
            ended_by: ending.to_string(),
            faults: live.seen.clone(),
            seconds: duration.as_secs_f64(),
        }));
        if let Some(a) = self.attempts.last_mut() {
            a.ended = Some(now);
            a.ending = ending;
        }
        let no_checkpoint = self.no_checkpoint_after(duration);
        if let Some(message) = &no_checkpoint {
            warn(message.clone(), out);
        }

        let mut excluding = String::new();
        // The fault class of a fall, and why it may never be climbed back (`climb.rs`).
        let mut fell_for: Option<(FaultClass, Option<climb::Why>)> = None;
        let (next_tier, reason) = match live.stop.take() {
            Some(StopCause::User(sig)) => {
                self.finish(Outcome::Interrupted(sig), out);
                return;
            }
            Some(StopCause::Climb { to }) => {
                self.restart_to_climb(&live, to, now, out);
                return;
            }
            None if status.is_some_and(JobExit::success) => {
                self.finish(Outcome::Succeeded, out);
                return;
            }
            None => (
                live.tier,
                format!(
                    "attempt {} ended with {} and no known fault",
                    live.attempt,
                    status.map_or("an unknown status".to_string(), |s| s.to_string())
                ),
            ),
            Some(StopCause::Forced) if live.tier + 1 < self.ladder.len() => {
                (live.tier + 1, "fallback forced by the user".to_string())
            }
            Some(StopCause::Forced) => {
                self.finish(Outcome::LadderExhausted, out);
                return;
            }
            Some(StopCause::Fault(fault)) => {
                let (action, note) = self.action_after(&fault, live.tier, live.attempt);
                let why = if note.is_some() {
                    // Judged deterministic here: never climbed back to, whatever happens next.
                    self.climbs.close(live.tier);
                    Some(climb::Why::Deterministic)
                } else if fault.class.skips_gpu_tiers() {
                    Some(climb::Why::RulesOutGpus)
                } else {
                    None
                };
                fell_for = Some((fault.class, why));
                if let Some(note) = note {
                    out.push(Effect::Say(note));
                }
                let reason = format!("{} ({})", fault.class, fault.rule);
                match self.exclusion(&fault, action, &live) {
                    Ok(gpus) => {
                        excluding = self.exclude(&fault, gpus, &live, out);
                        (live.tier, format!("{reason}: {excluding}"))
                    }
                    Err(why) => {
                        if let Some(why) = why {
                            out.push(Effect::Say(why));
                        }
                        match self.next_tier(&fault, action, live.tier) {
                            Ok(tier) => (tier, reason),
                            Err(outcome) => {
                                self.finish(outcome, out);
                                return;
                            }
                        }
                    }
                }
            }
        };
        // An exclusion is a new setup of the tier, not one more try of the old one.
        let checked = match excluding.is_empty() {
            false => Ok(next_tier),
            true => self.after_no_progress(next_tier, live.tier),
        };
        let mut no_progress = false;
        let next_tier = match checked {
            Ok(tier) => {
                if tier != next_tier {
                    no_progress = true;
                    out.push(Effect::Say(format!(
                        "{NO_PROGRESS_LIMIT} attempts in a row on tier `{}` wrote no new checkpoint: giving up on the tier",
                        self.tier_name(live.tier)
                    )));
                }
                tier
            }
            Err((note, outcome)) => {
                out.push(Effect::Say(note));
                self.finish(outcome, out);
                return;
            }
        };
        if next_tier > live.tier {
            let reached = self.attempts.last().and_then(|a| a.reached.clone());
            match fell_for {
                // Left after attempts that wrote nothing: not a fluke of one fault.
                _ if no_progress => self.climbs.close(live.tier),
                Some((class, why)) => self.climbs.fell(live.tier, next_tier, reached, class, why),
                // Forced by the user: neither climbed back nor closed.
                None => {}
            }
        }

        let used = self.restarts_in_window(now);
        if used >= self.policy.max_restarts {
            let within = match self.policy.restart_window {
                Some(w) => format!(" within {}", window_text(w)),
                None => String::new(),
            };
            out.push(Effect::Say(format!(
                "{reason}; the restart budget ({}{within}) is spent",
                self.policy.max_restarts
            )));
            self.finish(Outcome::BudgetSpent, out);
            return;
        }
        if no_checkpoint.is_some() && self.attempts.last().is_some_and(|a| a.reached.is_none()) {
            warn(
                format!(
                    "attempt {} starts from scratch: nothing of the {} of attempt {} is kept",
                    live.attempt + 1,
                    span_text(duration),
                    live.attempt
                ),
                out,
            );
        }
        self.restarts += 1;
        if self.policy.restart_window.is_some() {
            self.restart_times.push(now);
        }
        let delay = self.backoff(next_tier);
        let attempt = live.attempt + 1;
        let tier_name = self.tier_name(next_tier);
        out.push(Effect::Journal(Record::RestartScheduled {
            attempt,
            tier: tier_name.clone(),
            reason: reason.clone(),
            delay_seconds: delay.as_secs_f64(),
            restarts_left: self.policy.max_restarts.saturating_sub(used + 1),
        }));
        out.push(Effect::Say(format!(
            "{reason}: restarting as attempt {attempt} on tier `{tier_name}` in {delay:.1?}"
        )));
        if delay.is_zero() {
            self.start_attempt(attempt, next_tier, now, out);
        } else {
            self.phase = Phase::Backoff {
                attempt,
                tier: next_tier,
                until: now + delay,
            };
        }
    }

    /// Issue 11, checkpoint sanity: the warning for the attempt that just ended (the last one),
    /// when checkpoints are watched and it ran `duration`, at least the threshold, without
    /// writing one. The usual causes are a `--checkpoints` that does not name where the job
    /// saves, and a save interval longer than the job gets to run.
    fn no_checkpoint_after(&self, duration: Duration) -> Option<String> {
        let threshold = self.policy.warn_no_checkpoint_after?;
        let a = self.attempts.last()?;
        if !self.policy.checkpoints_watched || a.wrote_checkpoint || duration < threshold {
            return None;
        }
        Some(format!(
            "attempt {} ran {} and no new complete checkpoint appeared: check that --checkpoints (`checkpoints` in gpuwarden.toml) names where the job saves, and that the job saves more often than every {}",
            a.attempt,
            span_text(duration),
            span_text(threshold)
        ))
    }

    /// The tier to restart on after `fault` ended an attempt on `tier` (with a note to say when
    /// the crash-loop sense changed the fault's own action), or why the run ends.
    ///
    /// A class that restarts is judged by how far the attempt got (its newest checkpoint,
    /// written or resumed from): the same class ending an earlier attempt on this tier that got
    /// to the same checkpoint (or to none, both times) faulted at the same point of training and
    /// will end the next one too: it is deterministic, so the run goes down the ladder (or stops,
    /// for a host OOM). The same class at a later point each time is transient: the run stays.
    fn action_after(&self, fault: &Fault, tier: usize, attempt: u32) -> (Action, Option<String>) {
        let mut action = fault.action;
        let mut note = None;
        if action == Action::Restart {
            let reached = self
                .attempts
                .iter()
                .find(|a| a.attempt == attempt)
                .map(|a| a.reached.clone());
            let deterministic = self.attempts.iter().any(|a| {
                a.attempt != attempt
                    && a.tier == tier
                    && Some(&a.reached) == reached.as_ref()
                    && matches!(&a.ending, Ending::Fault { class, .. } if *class == fault.class)
            });
            if deterministic {
                action = fault
                    .class
                    .escalates_on_repeat()
                    .unwrap_or(Action::Fallback);
                let from = match reached.flatten() {
                    Some(c) => format!("checkpoint {}", c.display()),
                    None => "start (no checkpoint)".to_string(),
                };
                note = Some(format!(
                    "{} again at the same point of training, the {from}: deterministic, not a fluke ({action})",
                    fault.class
                ));
            }
        }
        (action, note)
    }

    /// The tier to restart on after `fault` (whose action, crash-loop sense applied, is
    /// `action`) ended an attempt on `tier`, or why the run ends.
    fn next_tier(&self, fault: &Fault, action: Action, tier: usize) -> Result<usize, Outcome> {
        match action {
            Action::Stop => Err(Outcome::StoppedByFault {
                rule: fault.rule.clone(),
                class: fault.class,
            }),
            Action::Restart | Action::Note => Ok(tier),
            Action::Fallback => {
                // No kernel for this architecture (or no GPU at all): every GPU tier will fail
                // the same way, so go straight to the first tier that does not use a GPU.
                let skip_gpu = fault.class.skips_gpu_tiers();
                self.ladder
                    .iter()
                    .enumerate()
                    .skip(tier + 1)
                    .find(|(_, t)| !skip_gpu || !t.uses_gpu)
                    .map(|(i, _)| i)
                    .ok_or(Outcome::LadderExhausted)
            }
        }
    }

    /// The ladder's step between "these GPUs" and the tier below: the GPUs of the ended
    /// attempt `live` to hide from now on, when `fault` (whose action is `action`) goes down the
    /// ladder and blames the device, and it or another such fault of the attempt names some but
    /// not all of the attempt's GPUs. `Err`
    /// with a note when the exclusion was possible but is not taken (it is switched off, every
    /// GPU is named, the same fault hit an earlier attempt at the same point of training on other
    /// GPUs, or too few GPUs would be left); `Err(None)` when it does not apply at all.
    fn exclusion(
        &self,
        fault: &Fault,
        action: Action,
        live: &Live,
    ) -> Result<Vec<JobGpu>, Option<String>> {
        let on_gpu = self.ladder.get(live.tier).is_some_and(|t| t.uses_gpu);
        if action != Action::Fallback || !on_gpu || !fault.class.blames_the_device() {
            return Err(None);
        }
        let mut named: Vec<JobGpu> = Vec::new();
        for g in fault.gpus.iter().chain(&live.named) {
            if live.gpus.iter().any(|v| v.key == g.key) && !named.iter().any(|n| n.key == g.key) {
                named.push(g.clone());
            }
        }
        if named.is_empty() {
            return Err(None);
        }
        let list = gpu_list(&named);
        if !self.policy.gpu_exclusion {
            return Err(Some(format!(
                "{} names {list}; excluding a faulty GPU is switched off (gpu_exclusion = false): down the ladder",
                fault.class
            )));
        }
        let left = live.gpus.len() - named.len();
        if left == 0 {
            return Err(Some(format!(
                "{} names {list}, every GPU the job sees: nothing to exclude, down the ladder",
                fault.class
            )));
        }
        // The same fault at the same point of training as an earlier attempt of this tier, on
        // other GPUs: it follows the job (a bad kernel, an unsupported build), not the GPU, and
        // excluding one GPU after another would only spend restarts on the way down.
        let reached = self
            .attempts
            .iter()
            .find(|a| a.attempt == live.attempt)
            .map(|a| a.reached.clone());
        let again = self.attempts.iter().any(|a| {
            a.attempt != live.attempt
                && a.tier == live.tier
                && Some(&a.reached) == reached.as_ref()
                && matches!(&a.ending, Ending::Fault { rule, .. } if *rule == fault.rule)
        });
        if again {
            return Err(Some(format!(
                "{} ({}) again at the same point of training, now on {list}: it follows the job, not the GPU; down the ladder",
                fault.class, fault.rule
            )));
        }
        if left < self.policy.min_gpus {
            return Err(Some(format!(
                "excluding {list} would leave {left} GPU(s), fewer than min_gpus = {}: down the ladder",
                self.policy.min_gpus
            )));
        }
        Ok(named)
    }

    /// Hides `gpus` from every later attempt; journals and says so. Returns the words for the
    /// restart's reason.
    fn exclude(
        &mut self,
        fault: &Fault,
        gpus: Vec<JobGpu>,
        live: &Live,
        out: &mut Vec<Effect>,
    ) -> String {
        let remaining: Vec<u32> = live
            .gpus
            .iter()
            .filter(|g| !gpus.iter().any(|x| x.key == g.key))
            .map(|g| g.index)
            .collect();
        let words = format!(
            "excluding {} for the rest of the run, keeping GPU(s) {}",
            gpu_list(&gpus),
            remaining
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
        self.excluded.extend(gpus.iter().cloned());
        out.push(Effect::Journal(Record::GpusExcluded {
            attempt: live.attempt,
            tier: self.tier_name(live.tier),
            rule: fault.rule.clone(),
            class: fault.class,
            gpus,
            excluded: self.excluded.iter().map(|g| g.index).collect(),
            remaining,
        }));
        words
    }

    /// Attempts in a row, ending with the last one, on `tier` that wrote no new checkpoint.
    fn no_progress_run(&self, tier: usize) -> usize {
        self.attempts
            .iter()
            .rev()
            .take_while(|a| a.tier == tier && !a.wrote_checkpoint)
            .count()
    }

    /// A restart on the same `tier` after [`NO_PROGRESS_LIMIT`] attempts in a row without a new
    /// checkpoint goes one tier down instead (or ends the run at the bottom of the ladder). Only
    /// when checkpoints are watched: without them "no checkpoint" says nothing.
    fn after_no_progress(&self, next: usize, tier: usize) -> Result<usize, (String, Outcome)> {
        if !self.policy.checkpoints_watched
            || next != tier
            || self.no_progress_run(tier) < NO_PROGRESS_LIMIT
        {
            return Ok(next);
        }
        if tier + 1 < self.ladder.len() {
            Ok(tier + 1)
        } else {
            Err((
                format!(
                    "{NO_PROGRESS_LIMIT} attempts in a row on tier `{}` wrote no new checkpoint, and it is the last tier: giving up",
                    self.tier_name(tier)
                ),
                Outcome::LadderExhausted,
            ))
        }
    }

    /// Restarts that count against the budget now: all of them, or those of the window.
    fn restarts_in_window(&mut self, now: Instant) -> u32 {
        match self.policy.restart_window {
            None => self.restarts,
            Some(window) => {
                self.restart_times
                    .retain(|t| now.saturating_duration_since(*t) < window);
                self.restart_times.len() as u32
            }
        }
    }

    /// Exponential backoff: the first restart on a tier waits `backoff_initial`, each further
    /// restart on the same tier twice as long, capped at `backoff_max`.
    fn backoff(&self, tier: usize) -> Duration {
        let earlier = self.attempts.iter().filter(|a| a.tier == tier).count() as u32;
        // `earlier` counts the attempt that just ended when restarting on the same tier.
        let exponent = earlier.saturating_sub(1).min(20);
        self.policy
            .backoff_initial
            .saturating_mul(1 << exponent)
            .min(self.policy.backoff_max)
    }

    fn tier_name(&self, tier: usize) -> String {
        self.ladder
            .get(tier)
            .map_or_else(|| format!("#{tier}"), |t| t.name.clone())
    }

    fn finish(&mut self, outcome: Outcome, out: &mut Vec<Effect>) {
        self.phase = Phase::Done;
        out.push(Effect::Journal(Record::RunFinished {
            outcome: outcome.name().to_string(),
            detail: outcome.to_string(),
            attempts: self.attempts.len() as u32,
            restarts: self.restarts,
            exit_code: outcome.exit_code(),
        }));
        out.push(Effect::Finish(outcome));
    }
}

/// `GPU 1 (0000:0c:00.0, the job's cuda:1)`, `GPU 0 (...) and GPU 2 (...)`.
fn gpu_list(gpus: &[JobGpu]) -> String {
    gpus.iter()
        .map(JobGpu::to_string)
        .collect::<Vec<_>>()
        .join(" and ")
}

/// The journal record of a fault acted on in `attempt`.
fn fault_record(attempt: u32, fault: &Fault, incident: Option<Role>) -> Record {
    Record::Fault {
        attempt,
        class: fault.class,
        rule: fault.rule.clone(),
        severity: fault.severity,
        action: fault.action,
        stream: fault.stream,
        line: fault.line.clone(),
        captures: fault.captures.clone(),
        facility: fault.facility.clone(),
        attribution: fault.attribution.clone(),
        incident,
        gpus: fault.gpus.clone(),
    }
}

/// `1h`, `20m`, `90s`.
fn window_text(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s >= 60 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{:.0}s", d.as_secs_f64())
    }
}

/// A length of time as a person reads it: `42.0s`, `12m05s`, `3h07m`.
fn span_text(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        3600.. => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        60.. => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{:.1}s", d.as_secs_f64()),
    }
}

/// A warning: said on the console and journaled.
fn warn(message: String, out: &mut Vec<Effect>) {
    out.push(Effect::Say(format!("warning: {message}")));
    out.push(Effect::Journal(Record::Warning { message }));
}

/// For a fault from the kernel log or GPU health, which the user has not seen (the job's own
/// output passes through, these lines do not): the line itself, the GPU it names and why it is
/// the job's, each said on a line of its own under the fault.
fn seen_where(fault: &Fault) -> Vec<String> {
    let source = match fault.stream {
        Stream::Kernel if fault.facility.as_deref() == Some("user") => {
            "kernel log (written by a program)"
        }
        Stream::Kernel => "kernel log",
        Stream::Tool => "GPU health",
        _ => return Vec::new(),
    };
    let mut lines = vec![format!("  {source}: {}", fault.line.trim_end())];
    let gpu = fault.captures.get("gpu");
    let pci = fault.captures.get("pci");
    match (gpu, pci) {
        (Some(gpu), Some(pci)) => lines.push(format!("  the GPU: {gpu} (PCI {pci})")),
        (Some(gpu), None) => lines.push(format!("  the GPU: {gpu}")),
        (None, Some(pci)) => lines.push(format!("  the GPU: PCI {pci}")),
        (None, None) => {}
    }
    if let Some(why) = &fault.attribution {
        lines.push(format!("  why it is the job's: {why}"));
    }
    lines
}

/// The fault of an attempt that made no progress for `silent` (at least the stall `timeout`):
/// `gpu_hang` on a GPU tier (a wedged kernel or collective is the usual reason a GPU job goes
/// quiet), `job_stalled` elsewhere.
pub fn stall_fault(uses_gpu: bool, silent: Duration, timeout: Duration) -> Fault {
    let class = if uses_gpu {
        FaultClass::GpuHang
    } else {
        FaultClass::JobStalled
    };
    Fault {
        rule: "stall-timeout".to_string(),
        class,
        severity: crate::rules::Severity::Error,
        action: class.default_action(),
        stream: Stream::Progress,
        line: format!(
            "no progress for {:.1} s (no output, no new checkpoint; the stall timeout is {:.1} s)",
            silent.as_secs_f64(),
            timeout.as_secs_f64()
        ),
        captures: std::collections::BTreeMap::from([(
            "silent_seconds".to_string(),
            format!("{:.1}", silent.as_secs_f64()),
        )]),
        advice: "The job printed nothing and wrote no checkpoint for the whole stall timeout. On a GPU this is usually a hung kernel or a collective waiting for a rank that died; on the CPU a deadlock or a stuck data loader. The stacks captured before the stop (when py-spy is installed) show where it waited. A job that is silent by design needs a longer --stall-timeout, or --stall-timeout off.".to_string(),
        facility: None,
        attribution: None,
        gpus: Vec::new(),
    }
}

/// The fault of a job that failed after reading a terminal it cannot read (stdin a terminal,
/// SIGTTIN ignored, the job in a process group of its own): every attempt would fail the same
/// way, so the run stops instead of spending its restarts.
pub fn terminal_read_fault() -> Fault {
    Fault {
        rule: "terminal-read-eio".to_string(),
        class: FaultClass::ProcessCrash,
        severity: crate::rules::Severity::Error,
        action: Action::Stop,
        stream: Stream::Exit,
        line: "the job read its standard input, a terminal it cannot read here, got EIO (Input/output error) and failed".to_string(),
        captures: std::collections::BTreeMap::new(),
        advice: "gpuwarden was started with SIGTTIN ignored and a terminal as stdin (tmux `new-session 'cmd'` does this), and the job runs in a process group of its own, so its reads of the terminal fail at once; a restart fails the same way. Give the job its input another way (`< file`, `< /dev/null`), or start gpuwarden from an interactive shell.".to_string(),
        facility: None,
        attribution: None,
        gpus: Vec::new(),
    }
}

/// The fault a job's exit status is evidence of: death by SIGSEGV, SIGBUS, SIGILL, SIGFPE or
/// SIGABRT is a crash (`process_crash`), whatever the logs said or when they were read.
pub fn crash_fault(status: JobExit) -> Option<Fault> {
    let JobExit::Signal(signal) = status else {
        return None;
    };
    let (rule, what) = match signal {
        11 => ("exit-sigsegv", "a segmentation fault"),
        7 => ("exit-sigbus", "a bus error"),
        4 => ("exit-sigill", "an illegal instruction"),
        8 => ("exit-sigfpe", "an arithmetic exception"),
        6 => ("exit-sigabrt", "an abort"),
        _ => return None,
    };
    let name = crate::job::signal_name(signal);
    Some(Fault {
        rule: rule.to_string(),
        class: FaultClass::ProcessCrash,
        severity: crate::rules::Severity::Error,
        action: FaultClass::ProcessCrash.default_action(),
        stream: Stream::Exit,
        line: format!("the job's main process was killed by signal {signal} ({name})"),
        captures: std::collections::BTreeMap::from([("signal".to_string(), signal.to_string())]),
        advice: format!(
            "The job crashed with {what} ({name}) and no fault line came before it. A crash inside a GPU library often follows a GPU fault the kernel log tells of; otherwise rerun with `python -X faulthandler` (or under gdb) to see where. gpuwarden restarts, and falls back if it repeats."
        ),
        facility: None,
        attribution: None,
        gpus: Vec::new(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::rules::Severity;

    pub(super) fn policy() -> Policy {
        Policy {
            max_restarts: 5,
            grace: Duration::from_secs(10),
            settle: SETTLE,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            stall_timeout: None,
            restart_window: None,
            checkpoints_watched: false,
            class_actions: BTreeMap::new(),
            warn_no_checkpoint_after: None,
            gpu_exclusion: true,
            min_gpus: 1,
            climb_back: climb::DEFAULT_CLIMBS,
            stall_floor: None,
            gpu_memory_wait: None,
        }
    }

    fn ladder(names: &[(&str, bool)]) -> Vec<TierInfo> {
        names
            .iter()
            .map(|(n, g)| TierInfo {
                name: n.to_string(),
                uses_gpu: *g,
            })
            .collect()
    }

    pub(super) fn fault(class: FaultClass, action: Action) -> Fault {
        Fault {
            rule: format!("test-{}", class.as_str()),
            class,
            severity: Severity::Critical,
            action,
            stream: Stream::Stderr,
            line: "Memory access fault by GPU node-1".to_string(),
            captures: BTreeMap::new(),
            advice: "advice".to_string(),
            facility: None,
            attribution: None,
            gpus: Vec::new(),
        }
    }

    /// GPU `index` of a test machine, seen by an attempt as `cuda:ordinal`.
    fn gpu(index: u32, ordinal: u32) -> JobGpu {
        JobGpu {
            key: index as usize,
            vendor: crate::gpu::Vendor::Amd,
            index,
            ordinal,
            pci: Some(format!("0000:{:02x}:00.0", 0x0b + index)),
        }
    }

    /// A harness that runs the machine the way the executor does: Spawn is answered at once.
    pub(super) struct Run {
        pub(super) sup: Supervisor,
        t0: Instant,
        pub(super) now: Instant,
        pub(super) log: Vec<Effect>,
        /// The machine's GPUs (vendor index = key); each attempt on a GPU tier sees those not
        /// excluded, numbered from 0, as the executor would report them.
        machine: u32,
        gpu_tiers: Vec<bool>,
    }

    impl Run {
        pub(super) fn new(policy: Policy, tiers: &[(&str, bool)]) -> Run {
            let t0 = Instant::now();
            Run {
                sup: Supervisor::new(policy, ladder(tiers)),
                t0,
                now: t0,
                log: Vec::new(),
                machine: 0,
                gpu_tiers: tiers.iter().map(|(_, gpu)| *gpu).collect(),
            }
        }

        /// The same on a machine with `n` GPUs.
        pub(super) fn with_gpus(policy: Policy, tiers: &[(&str, bool)], n: u32) -> Run {
            let mut r = Run::new(policy, tiers);
            r.machine = n;
            r
        }

        fn seen(&self, tier: usize, exclude: &[usize]) -> Vec<JobGpu> {
            if !self.gpu_tiers.get(tier).copied().unwrap_or(false) {
                return Vec::new();
            }
            (0..self.machine)
                .filter(|i| !exclude.contains(&(*i as usize)))
                .enumerate()
                .map(|(ordinal, index)| gpu(index, ordinal as u32))
                .collect()
        }

        pub(super) fn feed(&mut self, ev: Event) -> Vec<Effect> {
            let mut queue = vec![ev];
            let mut all = Vec::new();
            while let Some(ev) = queue.pop() {
                let effects = self.sup.step(ev, self.now);
                for e in &effects {
                    if let Effect::Spawn {
                        attempt,
                        tier,
                        exclude,
                    } = e
                    {
                        queue.push(Event::Spawned {
                            attempt: *attempt,
                            checkpoint: None,
                            gpus: self.seen(*tier, exclude),
                        });
                    }
                }
                all.extend(effects);
            }
            self.log.extend(all.clone());
            all
        }

        /// Feeds the start event, as every run begins; for tests that do not look at its effects.
        pub(super) fn start(mut self) -> Run {
            self.feed(Event::Start);
            self
        }

        /// Feeds a fault read in `attempt`'s output (or the kernel log).
        pub(super) fn fault(&mut self, attempt: u32, fault: Fault) -> Vec<Effect> {
            self.feed(Event::Fault { attempt, fault })
        }

        pub(super) fn advance(&mut self, d: Duration) -> Vec<Effect> {
            self.now += d;
            self.feed(Event::Tick)
        }

        pub(super) fn exit(&mut self, attempt: u32, status: JobExit) -> Vec<Effect> {
            let mut out = self.feed(Event::Exited {
                attempt,
                status,
                group_alive: false,
            });
            out.extend(self.feed(Event::StreamClosed {
                attempt,
                stream: Stream::Stdout,
            }));
            out.extend(self.feed(Event::StreamClosed {
                attempt,
                stream: Stream::Stderr,
            }));
            out
        }

        pub(super) fn spawns(&self) -> Vec<(u32, usize)> {
            self.log
                .iter()
                .filter_map(|e| match e {
                    Effect::Spawn { attempt, tier, .. } => Some((*attempt, *tier)),
                    _ => None,
                })
                .collect()
        }

        pub(super) fn outcome(&self) -> Option<Outcome> {
            self.log.iter().find_map(|e| match e {
                Effect::Finish(o) => Some(o.clone()),
                _ => None,
            })
        }
    }

    pub(super) fn signals(effects: &[Effect]) -> Vec<Sig> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Signal { sig, .. } => Some(*sig),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_crash_signal_is_a_fault_whether_the_kernel_line_comes_first_or_not() {
        // Twice the same SIGSEGV, once with the kernel's segfault line read before the exit
        // (`a`), once with nothing read (`b`): the same ladder either way.
        let segfault = || Fault {
            rule: "segfault".into(),
            ..kernel_fault_of(FaultClass::ProcessCrash, Action::Restart)
        };
        let ladder_of = |kernel_first: bool| {
            let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
            for attempt in 1..=2 {
                if kernel_first {
                    r.fault(attempt, segfault());
                }
                r.exit(attempt, JobExit::Signal(11));
                r.advance(Duration::from_secs(60));
            }
            let endings: Vec<String> = r
                .sup
                .attempts()
                .iter()
                .map(|a| match &a.ending {
                    Ending::Fault { class, .. } => class.to_string(),
                    other => other.to_string(),
                })
                .collect();
            (r.spawns(), endings)
        };
        let (a, b) = (ladder_of(true), ladder_of(false));
        assert_eq!(a, b);
        // Restarted once on the GPU, then (the same crash again) fallen back to the CPU.
        assert_eq!(a.0, vec![(1, 0), (2, 0), (3, 1)]);
        assert_eq!(a.1[..2], ["process_crash", "process_crash"]);
    }

    #[test]
    fn a_failed_terminal_read_stops_the_run_and_a_success_after_one_is_a_success() {
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        r.feed(Event::TerminalReadFailed { attempt: 1 });
        r.exit(1, JobExit::Code(1));
        assert_eq!(
            r.outcome(),
            Some(Outcome::StoppedByFault {
                rule: "terminal-read-eio".into(),
                class: FaultClass::ProcessCrash
            })
        );
        // A job that read, failed a read and went on to finish well is not stopped for it;
        // nor is another attempt's report taken for the live one's.
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        r.feed(Event::TerminalReadFailed { attempt: 1 });
        r.exit(1, JobExit::Code(0));
        assert_eq!(r.outcome(), Some(Outcome::Succeeded));
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        r.feed(Event::TerminalReadFailed { attempt: 7 });
        r.exit(1, JobExit::Code(1));
        assert_eq!(r.outcome(), None, "restarted as for any failure");
    }

    #[test]
    fn only_crash_signals_are_crash_faults() {
        for (sig, rule) in [
            (11, "exit-sigsegv"),
            (7, "exit-sigbus"),
            (6, "exit-sigabrt"),
        ] {
            let f = crash_fault(JobExit::Signal(sig)).unwrap();
            assert_eq!(f.rule, rule);
            assert_eq!(f.class, FaultClass::ProcessCrash);
            assert_eq!(f.stream, Stream::Exit);
        }
        for status in [JobExit::Signal(15), JobExit::Signal(9), JobExit::Code(139)] {
            assert!(crash_fault(status).is_none(), "{status}");
        }
    }

    #[test]
    fn clean_exit_finishes_without_restart() {
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        r.exit(1, JobExit::Code(0));
        assert_eq!(r.spawns(), vec![(1, 0)]);
        assert_eq!(r.outcome(), Some(Outcome::Succeeded));
        assert_eq!(r.outcome().unwrap().exit_code(), 0);
    }

    #[test]
    fn memory_fault_stops_then_falls_back_to_cpu_after_backoff() {
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        let out = r.fault(1, fault(FaultClass::GpuMemoryFault, Action::Fallback));
        assert_eq!(signals(&out), vec![Sig::Terminate]);
        r.exit(1, JobExit::Signal(15));
        // Not yet: backoff of 1 s.
        assert_eq!(r.spawns(), vec![(1, 0)]);
        r.advance(Duration::from_millis(999));
        assert_eq!(r.spawns(), vec![(1, 0)]);
        r.advance(Duration::from_millis(1));
        assert_eq!(r.spawns(), vec![(1, 0), (2, 1)]);
        r.exit(2, JobExit::Code(0));
        assert_eq!(r.outcome(), Some(Outcome::Succeeded));
        let a = r.sup.attempts();
        assert!(matches!(
            a[0].ending,
            Ending::Fault {
                class: FaultClass::GpuMemoryFault,
                ..
            }
        ));
        assert_eq!(a[1].ending, Ending::Exit(JobExit::Code(0)));
    }

    pub(super) fn kernel_fault_of(class: FaultClass, action: Action) -> Fault {
        Fault {
            stream: Stream::Kernel,
            ..fault(class, action)
        }
    }

    fn kernel_fault() -> Fault {
        Fault {
            stream: Stream::Kernel,
            rule: "xid-31".to_string(),
            ..fault(FaultClass::GpuMemoryFault, Action::Fallback)
        }
    }

    /// Issue 13: the job's own report of a GPU fault the kernel reported first, and the
    /// collective's fallout, are journaled as following from the kernel's fault.
    #[test]
    fn faults_that_follow_from_the_first_are_journaled_as_its_cascade() {
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        let mut all = r.fault(1, kernel_fault());
        all.extend(r.fault(1, fault(FaultClass::GpuMemoryFault, Action::Fallback)));
        all.extend(r.fault(1, fault(FaultClass::CollectiveFailure, Action::Restart)));
        let incidents: Vec<Role> = all
            .iter()
            .filter_map(|e| match e {
                Effect::Journal(Record::Fault { incident, .. }) => incident.clone(),
                _ => None,
            })
            .collect();
        assert_eq!(incidents.len(), 3, "{all:#?}");
        assert_eq!(incidents[0], Role::Root);
        for role in &incidents[1..] {
            match role {
                Role::Cascade {
                    root: Some(root), ..
                } => assert_eq!(root.rule, "xid-31"),
                other => panic!("not a cascade of the Xid: {other:?}"),
            }
        }
    }

    #[test]
    fn a_kernel_fault_waits_for_the_jobs_own_report_then_sigterm() {
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        let out = r.fault(1, kernel_fault());
        assert!(signals(&out).is_empty(), "no signal before the settle time");
        assert!(
            out.iter()
                .any(|e| matches!(e, Effect::Journal(Record::Fault { .. })))
        );
        assert_eq!(r.sup.next_deadline(), Some(r.t0 + SETTLE));
        assert!(signals(&r.advance(SETTLE - Duration::from_millis(1))).is_empty());
        assert_eq!(
            signals(&r.advance(Duration::from_millis(1))),
            vec![Sig::Terminate]
        );
        // SIGKILL still follows the grace, counted from SIGTERM.
        assert_eq!(
            r.sup.next_deadline(),
            Some(r.t0 + SETTLE + Duration::from_secs(10))
        );
        r.exit(1, JobExit::Signal(15));
        r.advance(Duration::from_secs(1));
        assert_eq!(r.spawns(), vec![(1, 0), (2, 1)]);
    }

    #[test]
    fn the_jobs_own_fault_line_ends_the_wait_and_both_are_journaled() {
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        r.fault(1, kernel_fault());
        r.advance(Duration::from_millis(100));
        let out = r.fault(1, fault(FaultClass::GpuMemoryFault, Action::Fallback));
        assert_eq!(signals(&out), vec![Sig::Terminate]);
        let journaled = r
            .log
            .iter()
            .filter(|e| matches!(e, Effect::Journal(Record::Fault { .. })))
            .count();
        assert_eq!(journaled, 2);
        // No second SIGTERM when the settle time passes.
        assert!(signals(&r.advance(SETTLE)).is_empty());
    }

    #[test]
    fn a_job_that_dies_of_the_fault_during_the_wait_falls_back_unsignalled() {
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        r.fault(1, kernel_fault());
        let out = r.exit(1, JobExit::Code(1));
        assert!(signals(&out).is_empty());
        assert!(signals(&r.advance(SETTLE)).is_empty());
        r.advance(Duration::from_secs(1));
        assert_eq!(r.spawns(), vec![(1, 0), (2, 1)]);
    }

    #[test]
    fn job_that_ignores_sigterm_gets_sigkill_after_grace() {
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        r.fault(1, fault(FaultClass::GpuMemoryFault, Action::Fallback));
        assert!(signals(&r.advance(Duration::from_secs(9))).is_empty());
        assert_eq!(r.sup.next_deadline(), Some(r.t0 + Duration::from_secs(10)));
        assert_eq!(signals(&r.advance(Duration::from_secs(1))), vec![Sig::Kill]);
        // Only once.
        assert!(signals(&r.advance(Duration::from_secs(5))).is_empty());
    }

    #[test]
    fn unsupported_kernel_skips_every_gpu_tier() {
        let mut r = Run::new(
            policy(),
            &[("gpu", true), ("gpu-sdk", true), ("cpu", false)],
        )
        .start();
        r.fault(1, fault(FaultClass::GpuUnsupportedKernel, Action::Fallback));
        r.exit(1, JobExit::Code(1));
        r.advance(Duration::from_secs(1));
        assert_eq!(r.spawns(), vec![(1, 0), (2, 2)]);
    }

    #[test]
    fn fallback_on_last_tier_exhausts_the_ladder() {
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        for attempt in 1..=2 {
            r.fault(attempt, fault(FaultClass::GpuMemoryFault, Action::Fallback));
            r.exit(attempt, JobExit::Code(1));
            r.advance(Duration::from_secs(1));
        }
        assert_eq!(r.outcome(), Some(Outcome::LadderExhausted));
        assert_eq!(r.outcome().unwrap().exit_code(), 3);
    }

    #[test]
    fn crash_loop_stops_at_the_budget_with_growing_backoff() {
        let mut p = policy();
        p.max_restarts = 3;
        let mut r = Run::new(p, &[("gpu", true), ("cpu", false)]).start();
        let mut delays = Vec::new();
        for attempt in 1..=4 {
            r.exit(attempt, JobExit::Code(1));
            if r.outcome().is_some() {
                break;
            }
            let deadline = r.sup.next_deadline().unwrap();
            delays.push(deadline - r.now);
            r.now = deadline;
            r.feed(Event::Tick);
        }
        assert_eq!(
            delays,
            vec![
                Duration::from_secs(1),
                Duration::from_secs(2),
                Duration::from_secs(4)
            ]
        );
        // Unrecognised crashes restart on the same tier.
        assert!(r.spawns().iter().all(|(_, tier)| *tier == 0));
        assert_eq!(r.spawns().len(), 4);
        assert_eq!(r.outcome(), Some(Outcome::BudgetSpent));
    }

    #[test]
    fn backoff_is_capped() {
        let mut p = policy();
        p.max_restarts = 10;
        p.backoff_max = Duration::from_secs(3);
        let mut r = Run::new(p, &[("gpu", true)]).start();
        for attempt in 1..=5 {
            r.exit(attempt, JobExit::Code(1));
            let deadline = r.sup.next_deadline().unwrap();
            assert!(deadline - r.now <= Duration::from_secs(3));
            r.now = deadline;
            r.feed(Event::Tick);
        }
    }

    #[test]
    fn user_signal_is_forwarded_and_never_restarts() {
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        let out = r.feed(Event::Signal(Sig::Terminate));
        assert_eq!(signals(&out), vec![Sig::Terminate]);
        r.exit(1, JobExit::Signal(15));
        assert_eq!(r.outcome(), Some(Outcome::Interrupted(Sig::Terminate)));
        assert_eq!(r.outcome().unwrap().exit_code(), 143);
        assert_eq!(r.spawns().len(), 1);
    }

    #[test]
    fn forward_only_signals_reach_the_job_and_never_stop_it() {
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        for sig in [Sig::User1, Sig::User2, Sig::Continue, Sig::WindowChange] {
            let out = r.feed(Event::Signal(sig));
            assert_eq!(signals(&out), vec![sig]);
            assert_eq!(r.outcome(), None);
        }
        // No stop is under way: the job's own exit ends the run as usual.
        r.exit(1, JobExit::Code(0));
        assert_eq!(r.outcome().unwrap().exit_code(), 0);
        assert_eq!(r.spawns().len(), 1);
    }

    #[test]
    fn forward_only_signal_in_backoff_is_dropped() {
        let mut r = Run::new(policy(), &[("gpu", true)]).start();
        r.exit(1, JobExit::Code(1));
        assert!(signals(&r.feed(Event::Signal(Sig::User1))).is_empty());
        assert_eq!(r.outcome(), None);
    }

    #[test]
    fn second_ctrl_c_kills_at_once() {
        let mut r = Run::new(policy(), &[("gpu", true)]).start();
        assert_eq!(
            signals(&r.feed(Event::Signal(Sig::Interrupt))),
            vec![Sig::Interrupt]
        );
        assert_eq!(
            signals(&r.feed(Event::Signal(Sig::Interrupt))),
            vec![Sig::Kill]
        );
        r.exit(1, JobExit::Signal(9));
        assert_eq!(r.outcome().unwrap().exit_code(), 130);
    }

    #[test]
    fn user_signal_during_fault_stop_wins_over_restart() {
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        r.fault(1, fault(FaultClass::GpuMemoryFault, Action::Fallback));
        r.feed(Event::Signal(Sig::Interrupt));
        r.exit(1, JobExit::Signal(15));
        assert_eq!(r.outcome(), Some(Outcome::Interrupted(Sig::Interrupt)));
        assert_eq!(r.spawns().len(), 1);
    }

    #[test]
    fn signal_during_backoff_ends_the_run() {
        let mut r = Run::new(policy(), &[("gpu", true)]).start();
        r.exit(1, JobExit::Code(1));
        r.feed(Event::Signal(Sig::Interrupt));
        assert_eq!(r.outcome(), Some(Outcome::Interrupted(Sig::Interrupt)));
        r.advance(Duration::from_secs(5));
        assert_eq!(r.spawns().len(), 1);
    }

    #[test]
    fn stop_action_gives_up() {
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        r.fault(1, fault(FaultClass::DeviceAssert, Action::Stop));
        r.exit(1, JobExit::Code(1));
        assert!(matches!(r.outcome(), Some(Outcome::StoppedByFault { .. })));
    }

    #[test]
    fn the_policy_table_overrides_a_class_action_and_says_so() {
        let mut p = policy();
        p.class_actions.insert(FaultClass::GpuOom, Action::Restart);
        p.class_actions.insert(FaultClass::GpuHang, Action::Note);
        let mut r = Run::new(p, &[("gpu", true), ("cpu", false)]).start();
        let out = r.fault(1, fault(FaultClass::GpuOom, Action::Fallback));
        assert!(out.iter().any(
            |e| matches!(e, Effect::Say(m) if m.contains("[policy] makes gpu_oom `restart`"))
        ));
        r.exit(1, JobExit::Code(1));
        r.advance(Duration::from_secs(2));
        // Restarted on the same tier; a hang made `note` by the policy stops nothing.
        assert_eq!(r.spawns(), vec![(1, 0), (2, 0)]);
        let out = r.fault(2, fault(FaultClass::GpuHang, Action::Restart));
        assert!(signals(&out).is_empty());
    }

    #[test]
    fn a_long_attempt_without_a_checkpoint_is_warned_about_and_so_is_a_start_from_scratch() {
        let mut p = policy();
        p.checkpoints_watched = true;
        p.warn_no_checkpoint_after = Some(Duration::from_secs(600));
        let mut r = Run::new(p, &[("gpu", true), ("cpu", false)]).start();
        r.advance(Duration::from_secs(700));
        let out = r.exit(1, JobExit::Code(1));
        let warnings: Vec<&String> = out
            .iter()
            .filter_map(|e| match e {
                Effect::Journal(Record::Warning { message }) => Some(message),
                _ => None,
            })
            .collect();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].starts_with("attempt 1 ran 11m40s and no new complete checkpoint"));
        assert!(warnings[1].starts_with("attempt 2 starts from scratch"));
        // A short attempt, or one that saved, is no news.
        r.advance(Duration::from_secs(2));
        r.feed(Event::Checkpoint {
            attempt: 2,
            path: "ckpt/a.pt".into(),
            at: r.now,
        });
        r.advance(Duration::from_secs(900));
        let out = r.exit(2, JobExit::Code(1));
        assert!(
            !out.iter()
                .any(|e| matches!(e, Effect::Journal(Record::Warning { .. })))
        );
    }

    #[test]
    fn stronger_later_fault_decides() {
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        r.fault(1, fault(FaultClass::GpuMemoryFault, Action::Fallback));
        let out = r.fault(1, fault(FaultClass::DeviceAssert, Action::Stop));
        assert!(signals(&out).is_empty(), "one SIGTERM per attempt");
        r.exit(1, JobExit::Code(1));
        assert!(matches!(r.outcome(), Some(Outcome::StoppedByFault { .. })));
    }

    #[test]
    fn hang_restarts_once_then_falls_back() {
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        for attempt in 1..=2 {
            r.fault(attempt, fault(FaultClass::GpuHang, Action::Restart));
            r.exit(attempt, JobExit::Code(1));
            r.advance(Duration::from_secs(2));
        }
        assert_eq!(r.spawns(), vec![(1, 0), (2, 0), (3, 1)]);
    }

    #[test]
    fn fault_storm_is_journaled_once_with_a_count() {
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        let mut journaled = 0;
        for _ in 0..1000 {
            let out = r.fault(1, fault(FaultClass::GpuMemoryFault, Action::Fallback));
            journaled += out
                .iter()
                .filter(|e| matches!(e, Effect::Journal(Record::Fault { .. })))
                .count();
        }
        assert_eq!(journaled, 1);
        let out = r.exit(1, JobExit::Code(1));
        let counted = out.iter().find_map(|e| match e {
            Effect::Journal(Record::AttemptEnded { faults, .. }) => faults.values().next().copied(),
            _ => None,
        });
        assert_eq!(counted, Some(1000));
    }

    #[test]
    fn note_faults_do_not_stop_the_job() {
        let mut r = Run::new(policy(), &[("gpu", true)]).start();
        let out = r.fault(1, fault(FaultClass::GpuReset, Action::Note));
        assert!(signals(&out).is_empty());
        assert!(
            out.iter()
                .any(|e| matches!(e, Effect::Journal(Record::Fault { .. })))
        );
    }

    #[test]
    fn faults_of_an_old_attempt_are_ignored() {
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        r.exit(1, JobExit::Code(1));
        r.advance(Duration::from_secs(1));
        let out = r.fault(1, fault(FaultClass::GpuMemoryFault, Action::Fallback));
        assert!(out.is_empty());
    }

    #[test]
    fn workers_left_after_the_leader_exits_are_stopped_before_the_attempt_ends() {
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        let out = r.feed(Event::Exited {
            attempt: 1,
            status: JobExit::Code(0),
            group_alive: true,
        });
        assert_eq!(signals(&out), vec![Sig::Terminate]);
        assert!(
            out.iter()
                .any(|e| matches!(e, Effect::Journal(Record::Leftovers { .. })))
        );
        for stream in [Stream::Stdout, Stream::Stderr] {
            r.feed(Event::StreamClosed { attempt: 1, stream });
        }
        assert!(r.outcome().is_none(), "not over while workers live");
        assert_eq!(
            signals(&r.advance(Duration::from_secs(10))),
            vec![Sig::Kill]
        );
        r.feed(Event::GroupEmpty { attempt: 1 });
        assert_eq!(r.outcome(), Some(Outcome::Succeeded));
    }

    #[test]
    fn after_a_fault_workers_that_ignore_sigterm_get_sigkill_even_when_the_leader_exited() {
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        r.fault(1, fault(FaultClass::GpuMemoryFault, Action::Fallback));
        r.feed(Event::Exited {
            attempt: 1,
            status: JobExit::Signal(15),
            group_alive: true,
        });
        assert_eq!(
            signals(&r.advance(Duration::from_secs(10))),
            vec![Sig::Kill]
        );
        r.feed(Event::GroupEmpty { attempt: 1 });
        for stream in [Stream::Stdout, Stream::Stderr] {
            r.feed(Event::StreamClosed { attempt: 1, stream });
        }
        r.advance(Duration::from_secs(1));
        assert_eq!(r.spawns(), vec![(1, 0), (2, 1)]);
    }

    /// Both streams seen empty at `at`.
    fn idle(r: &mut Run, attempt: u32, at: Instant) {
        for stream in [Stream::Stdout, Stream::Stderr] {
            r.feed(Event::OutputIdle {
                attempt,
                stream,
                at,
            });
        }
    }

    #[test]
    fn processes_that_survive_sigkill_are_given_up_on() {
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        r.fault(1, fault(FaultClass::GpuHang, Action::Fallback));
        r.advance(Duration::from_secs(10));
        // The leader is stuck in the driver: no exit, no empty group, the pipes stay open.
        let out = r.advance(KILL_WAIT);
        assert!(
            out.iter()
                .any(|e| matches!(e, Effect::Journal(Record::Warning { .. })))
        );
        let later = r.now + Duration::from_millis(1);
        idle(&mut r, 1, later);
        r.advance(Duration::from_secs(1));
        assert_eq!(r.spawns(), vec![(1, 0), (2, 1)]);
    }

    #[test]
    fn output_held_open_outside_the_group_ends_once_seen_empty_after_the_group_died() {
        let mut r = Run::new(policy(), &[("gpu", true)]).start();
        let before = r.now;
        r.now += Duration::from_millis(10);
        r.feed(Event::Exited {
            attempt: 1,
            status: JobExit::Code(0),
            group_alive: false,
        });
        // An idle report taken before the group died may predate the job's last lines.
        idle(&mut r, 1, before);
        assert!(r.outcome().is_none());
        // Hours of a slow reader: nothing ends the attempt but a fresh look at an empty pipe.
        r.advance(Duration::from_secs(3600));
        assert!(r.outcome().is_none());
        let after = r.now + Duration::from_millis(1);
        idle(&mut r, 1, after);
        assert_eq!(r.outcome(), Some(Outcome::Succeeded));
    }

    #[test]
    fn the_fault_signal_is_sent_before_the_journal_write() {
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        let out = r.fault(1, fault(FaultClass::GpuMemoryFault, Action::Fallback));
        assert!(
            matches!(
                out[0],
                Effect::Signal {
                    sig: Sig::Terminate,
                    ..
                }
            ),
            "{out:?}"
        );
    }

    #[test]
    fn job_exiting_zero_after_a_fault_stop_is_not_success() {
        // Lightning saves and exits 0 on SIGTERM: that is still an attempt ended by a fault.
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        r.fault(1, fault(FaultClass::GpuMemoryFault, Action::Fallback));
        r.exit(1, JobExit::Code(0));
        assert!(r.outcome().is_none());
        r.advance(Duration::from_secs(1));
        assert_eq!(r.spawns(), vec![(1, 0), (2, 1)]);
    }

    #[test]
    fn spawn_failure_ends_the_run() {
        let mut r = Run::new(policy(), &[("gpu", true)]);
        let out = r.sup.step(Event::Start, r.now);
        assert_eq!(
            out,
            vec![Effect::Spawn {
                attempt: 1,
                tier: 0,
                exclude: Vec::new(),
            }]
        );
        r.feed(Event::SpawnFailed {
            attempt: 1,
            error: "No such file".into(),
        });
        assert!(matches!(r.outcome(), Some(Outcome::SpawnFailed(_))));
    }

    #[test]
    fn zero_budget_means_no_restart() {
        let mut p = policy();
        p.max_restarts = 0;
        let mut r = Run::new(p, &[("gpu", true), ("cpu", false)]).start();
        r.fault(1, fault(FaultClass::GpuMemoryFault, Action::Fallback));
        r.exit(1, JobExit::Signal(15));
        assert_eq!(r.outcome(), Some(Outcome::BudgetSpent));
    }

    // ---- forced fallback (issue 10: `f` in `run --ui`) ----

    #[test]
    fn a_forced_fallback_stops_the_attempt_and_restarts_it_one_tier_down() {
        let mut r = Run::new(
            policy(),
            &[("gpu-fast", true), ("gpu-safe", true), ("cpu", false)],
        )
        .start();
        let out = r.feed(Event::ForceFallback);
        assert_eq!(signals(&out), vec![Sig::Terminate], "the signal first");
        assert!(matches!(out[0], Effect::Signal { .. }));
        assert!(out.contains(&Effect::Journal(Record::FallbackForced {
            attempt: 1,
            from: "gpu-fast".into(),
            to: "gpu-safe".into(),
        })));
        assert!(
            says(&out).contains("fallback forced by the user"),
            "{out:?}"
        );
        // Pressed again while it stops: nothing more (the grace still runs).
        let again = r.feed(Event::ForceFallback);
        assert!(signals(&again).is_empty());
        assert!(says(&again).contains("already ending"));
        r.exit(1, JobExit::Signal(15));
        r.advance(Duration::from_secs(1));
        // One tier down, not to the first CPU tier: a forced fallback is not a fault class.
        assert_eq!(r.spawns(), vec![(1, 0), (2, 1)]);
        assert_eq!(r.sup.restarts(), 1, "it is a restart like any other");
        let a = r.sup.attempts();
        assert_eq!(
            a[0].ending,
            Ending::Forced {
                status: Some(JobExit::Signal(15))
            }
        );
        assert!(r.log.iter().any(|e| matches!(
            e,
            Effect::Journal(Record::RestartScheduled { tier, reason, .. })
                if tier == "gpu-safe" && reason == "fallback forced by the user"
        )));
        r.exit(2, JobExit::Code(0));
        assert_eq!(r.outcome(), Some(Outcome::Succeeded));
    }

    #[test]
    fn a_forced_fallback_is_refused_on_the_last_tier_with_no_budget_or_during_a_stop() {
        // The last tier: nothing below, the job keeps running.
        let mut r = Run::new(policy(), &[("cpu", false)]).start();
        let out = r.feed(Event::ForceFallback);
        assert!(signals(&out).is_empty());
        assert!(says(&out).contains("last tier"), "{out:?}");
        assert!(!r.sup.stopping());

        // The budget spent: a fallback would end the run instead.
        let mut p = policy();
        p.max_restarts = 0;
        let mut r = Run::new(p, &[("gpu", true), ("cpu", false)]).start();
        let out = r.feed(Event::ForceFallback);
        assert!(signals(&out).is_empty());
        assert!(says(&out).contains("budget"), "{out:?}");

        // A fault's stop already decided: it stands (a `stop` fault must not become a
        // fallback).
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        r.fault(1, fault(FaultClass::DeviceAssert, Action::Stop));
        let out = r.feed(Event::ForceFallback);
        assert!(signals(&out).is_empty() && says(&out).contains("already ending"));
        r.exit(1, JobExit::Signal(15));
        assert!(matches!(r.outcome(), Some(Outcome::StoppedByFault { .. })));

        // After the run: nothing to do.
        let out = r.feed(Event::ForceFallback);
        assert!(says(&out).contains("no job is running"));
    }

    #[test]
    fn a_forced_fallback_during_a_backoff_moves_the_waiting_attempt_down() {
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        r.exit(1, JobExit::Code(1));
        let out = r.feed(Event::ForceFallback);
        assert!(out.contains(&Effect::Journal(Record::FallbackForced {
            attempt: 2,
            from: "gpu".into(),
            to: "cpu".into(),
        })));
        r.advance(Duration::from_secs(1));
        assert_eq!(r.spawns(), vec![(1, 0), (2, 1)]);
        // On the last tier now: refused.
        r.exit(2, JobExit::Code(1));
        assert!(says(&r.feed(Event::ForceFallback)).contains("last tier"));
    }

    // ---- stall detection (issue 11) ----

    fn stalling(timeout: u64) -> Policy {
        let mut p = policy();
        p.stall_timeout = Some(Duration::from_secs(timeout));
        p
    }

    fn journaled_faults(effects: &[Effect]) -> Vec<FaultClass> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Journal(Record::Fault { class, .. }) => Some(*class),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn progress_keeps_a_job_alive_and_silence_is_a_gpu_hang_on_a_gpu_tier() {
        let mut r = Run::new(stalling(60), &[("gpu", true), ("cpu", false)]).start();
        assert_eq!(r.sup.next_deadline(), Some(r.t0 + Duration::from_secs(60)));
        // Output every 50 s: never a stall.
        for _ in 0..4 {
            assert!(r.advance(Duration::from_secs(50)).is_empty());
            let at = r.now;
            r.feed(Event::Progress { attempt: 1, at });
        }
        assert_eq!(r.sup.next_deadline(), Some(r.now + Duration::from_secs(60)));
        // Progress stamped earlier than one already seen changes nothing.
        r.feed(Event::Progress {
            attempt: 1,
            at: r.t0,
        });
        assert!(r.advance(Duration::from_secs(59)).is_empty());
        let out = r.advance(Duration::from_secs(1));
        assert_eq!(journaled_faults(&out), [FaultClass::GpuHang]);
        // The stacks are captured while the job is still there, then SIGTERM.
        let capture = out
            .iter()
            .position(|e| matches!(e, Effect::CaptureStacks { attempt: 1 }))
            .unwrap();
        let term = out
            .iter()
            .position(|e| {
                matches!(
                    e,
                    Effect::Signal {
                        sig: Sig::Terminate,
                        ..
                    }
                )
            })
            .unwrap();
        assert!(capture < term);
        // A hang restarts on the same tier first.
        r.exit(1, JobExit::Signal(15));
        r.advance(Duration::from_secs(1));
        assert_eq!(r.spawns(), [(1, 0), (2, 0)]);
    }

    #[test]
    fn a_kernel_fault_is_told_with_its_line_its_gpu_and_why_it_is_the_jobs() {
        let mut fault = stall_fault(true, Duration::from_secs(1), Duration::from_secs(1));
        assert!(
            seen_where(&fault).is_empty(),
            "the job's own lines were seen already"
        );
        fault.stream = Stream::Kernel;
        fault.facility = Some("kernel".into());
        fault.line = "NVRM: Xid (PCI:0000:3b:00): 31, pid=447, name=python3, MMU Fault".into();
        fault.captures = BTreeMap::from([("pci".to_string(), "0000:3b:00".to_string())]);
        fault.attribution = Some("pid 447 is in the job's process tree (kernel record 9)".into());
        assert_eq!(
            seen_where(&fault),
            [
                "  kernel log: NVRM: Xid (PCI:0000:3b:00): 31, pid=447, name=python3, MMU Fault",
                "  the GPU: PCI 0000:3b:00",
                "  why it is the job's: pid 447 is in the job's process tree (kernel record 9)",
            ]
        );
        fault.stream = Stream::Tool;
        fault.facility = None;
        fault.line = "GPU 1 is gone".into();
        fault.captures.insert("gpu".into(), "1".into());
        fault.attribution = None;
        assert_eq!(
            seen_where(&fault),
            [
                "  GPU health: GPU 1 is gone",
                "  the GPU: 1 (PCI 0000:3b:00)"
            ]
        );
    }

    #[test]
    fn silence_on_a_cpu_tier_is_job_stalled() {
        let mut r = Run::new(stalling(10), &[("cpu", false)]).start();
        let out = r.advance(Duration::from_secs(10));
        assert_eq!(journaled_faults(&out), [FaultClass::JobStalled]);
        assert_eq!(signals(&out), [Sig::Terminate]);
        // While it is being stopped, no second stall fault; SIGKILL after the grace.
        let out = r.advance(Duration::from_secs(10));
        assert!(journaled_faults(&out).is_empty());
        assert_eq!(signals(&out), [Sig::Kill]);
    }

    #[test]
    fn no_stall_timeout_means_no_stall() {
        let mut r = Run::new(policy(), &[("gpu", true)]).start();
        assert_eq!(r.sup.next_deadline(), None);
        assert!(r.advance(Duration::from_secs(86_400)).is_empty());
    }

    #[test]
    fn a_job_that_exited_is_not_stalled_while_its_output_drains() {
        let mut r = Run::new(stalling(5), &[("gpu", true)]).start();
        r.feed(Event::Exited {
            attempt: 1,
            status: JobExit::Code(0),
            group_alive: false,
        });
        assert!(r.advance(Duration::from_secs(30)).is_empty());
    }

    // ---- crash-loop sense (issue 11) ----

    /// Runs attempt `attempt` from `checkpoint`: spawned, optionally writes a checkpoint, then
    /// ends with a fault of `class` (its default action) and the backoff is waited out.
    pub(super) fn attempt_with(
        r: &mut Run,
        attempt: u32,
        checkpoint: Option<&str>,
        writes: bool,
        class: FaultClass,
    ) {
        r.feed(Event::Spawned {
            attempt,
            checkpoint: checkpoint.map(PathBuf::from),
            gpus: Vec::new(),
        });
        if writes {
            let at = r.now;
            let path = PathBuf::from(format!("written-by-{attempt}"));
            r.feed(Event::Checkpoint { attempt, at, path });
        }
        r.fault(attempt, fault(class, class.default_action()));
        r.exit(attempt, JobExit::Code(1));
        if let Some(deadline) = r.sup.next_deadline() {
            r.now = deadline;
            r.feed(Event::Tick);
        }
    }

    #[test]
    fn the_same_fault_from_the_same_checkpoint_twice_goes_down_the_ladder() {
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        attempt_with(&mut r, 1, Some("c4"), false, FaultClass::GpuReset);
        attempt_with(&mut r, 2, Some("c4"), false, FaultClass::GpuReset);
        // gpu_reset never escalated before; from the same checkpoint twice it is deterministic.
        assert_eq!(r.spawns(), [(1, 0), (2, 0), (3, 1)]);
        assert!(r.log.iter().any(
            |e| matches!(e, Effect::Say(m) if m.contains("deterministic") && m.contains("c4"))
        ));
    }

    #[test]
    fn a_fault_right_after_the_checkpoint_the_next_attempt_resumes_from_is_deterministic() {
        // Attempt 1 writes a checkpoint and faults; attempt 2 resumes from it and faults
        // before writing another: both got exactly as far (the segfault-at-step-3 loop).
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        attempt_with(&mut r, 1, None, true, FaultClass::ProcessCrash);
        attempt_with(
            &mut r,
            2,
            Some("written-by-1"),
            false,
            FaultClass::ProcessCrash,
        );
        assert_eq!(r.spawns(), [(1, 0), (2, 0), (3, 1)]);
    }

    #[test]
    fn the_same_fault_at_a_different_step_each_time_stays_on_the_tier() {
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        // A GPU hang escalates on repeat, but each time after progress: transient, stay.
        attempt_with(&mut r, 1, Some("c2"), true, FaultClass::GpuHang);
        attempt_with(&mut r, 2, Some("c4"), true, FaultClass::GpuHang);
        attempt_with(&mut r, 3, Some("c6"), true, FaultClass::GpuHang);
        assert_eq!(r.spawns(), [(1, 0), (2, 0), (3, 0), (4, 0)]);
    }

    #[test]
    fn three_restarts_without_a_new_checkpoint_end_the_tier() {
        let mut p = policy();
        p.checkpoints_watched = true;
        let mut r = Run::new(p, &[("gpu", true), ("cpu", false)]).start();
        // Different classes (so never "the same fault twice"), and no checkpoint written.
        attempt_with(&mut r, 1, Some("c"), false, FaultClass::GpuReset);
        attempt_with(&mut r, 2, Some("c"), false, FaultClass::ProcessCrash);
        attempt_with(&mut r, 3, Some("c"), false, FaultClass::CollectiveFailure);
        assert_eq!(r.spawns(), [(1, 0), (2, 0), (3, 0), (4, 1)]);
        assert!(
            r.log
                .iter()
                .any(|e| matches!(e, Effect::Say(m) if m.contains("wrote no new checkpoint")))
        );
        // On the last tier it ends the run.
        attempt_with(&mut r, 4, Some("c"), false, FaultClass::GpuReset);
        attempt_with(&mut r, 5, Some("c"), false, FaultClass::ProcessCrash);
        attempt_with(&mut r, 6, Some("c"), false, FaultClass::CollectiveFailure);
        assert_eq!(r.outcome(), Some(Outcome::LadderExhausted));
    }

    #[test]
    fn without_watched_checkpoints_no_checkpoint_is_not_no_progress() {
        let mut r = Run::new(policy(), &[("gpu", true), ("cpu", false)]).start();
        attempt_with(&mut r, 1, None, false, FaultClass::GpuReset);
        attempt_with(&mut r, 2, Some("a"), false, FaultClass::ProcessCrash);
        attempt_with(&mut r, 3, Some("b"), false, FaultClass::CollectiveFailure);
        assert_eq!(r.spawns(), [(1, 0), (2, 0), (3, 0), (4, 0)]);
    }

    #[test]
    fn the_restart_budget_counts_a_sliding_window() {
        let mut p = policy();
        p.max_restarts = 2;
        p.backoff_max = Duration::from_secs(1);
        p.restart_window = Some(Duration::from_secs(3600));
        let mut r = Run::new(p, &[("gpu", true)]).start();
        // Two crashes at the start of the night, then an hour of work, then two more: fine.
        for attempt in 1..=2 {
            r.exit(attempt, JobExit::Code(1));
            r.advance(Duration::from_secs(1));
        }
        r.now += Duration::from_secs(3600);
        for attempt in 3..=4 {
            r.exit(attempt, JobExit::Code(1));
            r.advance(Duration::from_secs(1));
        }
        assert_eq!(r.outcome(), None);
        assert_eq!(r.spawns().len(), 5);
        let left: Vec<u32> = r
            .log
            .iter()
            .filter_map(|e| match e {
                Effect::Journal(Record::RestartScheduled { restarts_left, .. }) => {
                    Some(*restarts_left)
                }
                _ => None,
            })
            .collect();
        assert_eq!(left, [1, 0, 1, 0]);
        // A third within the window spends it.
        r.exit(5, JobExit::Code(1));
        assert_eq!(r.outcome(), Some(Outcome::BudgetSpent));
        assert!(
            r.log.iter().any(
                |e| matches!(e, Effect::Say(m) if m.contains("budget (2 within 1h) is spent"))
            )
        );
    }

    // -- issue 14: exclude only the GPU that faulted --

    /// A fault of the kernel log naming GPU `index` as `attempt` sees it.
    fn gpu_fault(r: &Run, attempt: u32, index: u32, class: FaultClass) -> Fault {
        let mut f = kernel_fault_of(class, class.default_action());
        f.gpus = r
            .sup
            .attempts()
            .iter()
            .find(|a| a.attempt == attempt)
            .unwrap()
            .gpus
            .iter()
            .filter(|g| g.index == index)
            .cloned()
            .collect();
        f
    }

    /// Stops `attempt` for `fault` and lets it die of the SIGTERM; returns what that caused.
    fn stop_for(r: &mut Run, attempt: u32, fault: Fault) -> Vec<Effect> {
        let mut out = r.fault(attempt, fault);
        out.extend(r.advance(SETTLE));
        out.extend(r.exit(attempt, JobExit::Signal(15)));
        out.extend(r.advance(Duration::from_secs(120)));
        out
    }

    fn exclusions(effects: &[Effect]) -> Vec<Record> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Journal(r @ Record::GpusExcluded { .. }) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    pub(super) fn says(effects: &[Effect]) -> String {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Say(s) => Some(s.as_str()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn a_fault_on_one_of_two_gpus_restarts_on_the_same_tier_without_it() {
        let mut r = Run::with_gpus(policy(), &[("gpu", true), ("cpu", false)], 2).start();
        let f = gpu_fault(&r, 1, 1, FaultClass::GpuLost);
        let out = stop_for(&mut r, 1, f);
        assert_eq!(r.spawns(), vec![(1, 0), (2, 0)]);
        let spawn = r
            .log
            .iter()
            .rev()
            .find_map(|e| match e {
                Effect::Spawn { exclude, .. } => Some(exclude.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(spawn, vec![1]);
        let records = exclusions(&out);
        assert_eq!(records.len(), 1, "{out:?}");
        let Record::GpusExcluded {
            attempt,
            gpus,
            excluded,
            remaining,
            ..
        } = &records[0]
        else {
            unreachable!()
        };
        assert_eq!(
            (*attempt, excluded.clone(), remaining.clone()),
            (1, vec![1], vec![0])
        );
        assert_eq!(gpus[0].ordinal, 1);
        let text = says(&out);
        assert!(
            text.contains("excluding GPU 1 (0000:0c:00.0, the job's cuda:1) for the rest of the run, keeping GPU(s) 0"),
            "{text}"
        );
        assert!(
            text.contains("restarting as attempt 2 on tier `gpu`"),
            "{text}"
        );
        // The next attempt sees GPU 0 alone, as cuda:0.
        let a2 = &r.sup.attempts()[1];
        assert_eq!(a2.gpus, vec![gpu(0, 0)]);
        assert_eq!(r.sup.excluded().len(), 1);
    }

    #[test]
    fn a_second_fault_on_the_last_gpu_goes_down_the_ladder_and_the_first_stays_excluded() {
        let mut r = Run::with_gpus(
            policy(),
            &[("gpu", true), ("gpu-safe", true), ("cpu", false)],
            2,
        )
        .start();
        let f = gpu_fault(&r, 1, 1, FaultClass::GpuLost);
        stop_for(&mut r, 1, f);
        let f = gpu_fault(&r, 2, 0, FaultClass::GpuEcc);
        assert_eq!(f.gpus, vec![gpu(0, 0)]);
        let out = stop_for(&mut r, 2, f);
        assert!(exclusions(&out).is_empty());
        let text = says(&out);
        assert!(
            text.contains("every GPU the job sees: nothing to exclude, down the ladder"),
            "{text}"
        );
        assert_eq!(r.spawns(), vec![(1, 0), (2, 0), (3, 1)]);
        // GPU 1 stays hidden on the tier below too.
        let Some(Effect::Spawn { exclude, .. }) = r
            .log
            .iter()
            .rev()
            .find(|e| matches!(e, Effect::Spawn { .. }))
        else {
            unreachable!()
        };
        assert_eq!(exclude, &vec![1]);
        assert_eq!(r.sup.attempts()[2].gpus, vec![gpu(0, 0)]);
    }

    #[test]
    fn a_fault_that_names_no_gpu_goes_down_the_ladder() {
        let mut r = Run::with_gpus(policy(), &[("gpu", true), ("cpu", false)], 2).start();
        let f = kernel_fault_of(FaultClass::GpuLost, Action::Fallback);
        let out = stop_for(&mut r, 1, f);
        assert!(exclusions(&out).is_empty());
        assert_eq!(r.spawns(), vec![(1, 0), (2, 1)]);
        assert!(r.sup.excluded().is_empty());
    }

    #[test]
    fn a_fault_naming_every_gpu_goes_down_the_ladder() {
        let mut r = Run::with_gpus(policy(), &[("gpu", true), ("cpu", false)], 2).start();
        let mut f = gpu_fault(&r, 1, 0, FaultClass::GpuMemoryFault);
        f.gpus
            .extend(gpu_fault(&r, 1, 1, FaultClass::GpuMemoryFault).gpus);
        let out = stop_for(&mut r, 1, f);
        assert!(exclusions(&out).is_empty());
        assert_eq!(r.spawns(), vec![(1, 0), (2, 1)]);
    }

    #[test]
    fn no_exclusion_below_min_gpus_or_when_switched_off_or_for_an_oom() {
        let mut p = policy();
        p.min_gpus = 2;
        let mut r = Run::with_gpus(p, &[("gpu", true), ("cpu", false)], 2).start();
        let f = gpu_fault(&r, 1, 1, FaultClass::GpuLost);
        let out = stop_for(&mut r, 1, f);
        assert!(
            says(&out).contains("would leave 1 GPU(s), fewer than min_gpus = 2"),
            "{}",
            says(&out)
        );
        assert_eq!(r.spawns(), vec![(1, 0), (2, 1)]);

        let mut p = policy();
        p.gpu_exclusion = false;
        let mut r = Run::with_gpus(p, &[("gpu", true), ("cpu", false)], 4).start();
        let f = gpu_fault(&r, 1, 1, FaultClass::GpuLost);
        let out = stop_for(&mut r, 1, f);
        assert!(says(&out).contains("switched off"), "{}", says(&out));
        assert_eq!(r.spawns(), vec![(1, 0), (2, 1)]);

        // An OOM naming cuda:1 is the job's size, not GPU 1's fault.
        let mut r = Run::with_gpus(policy(), &[("gpu", true), ("cpu", false)], 2).start();
        let f = gpu_fault(&r, 1, 1, FaultClass::GpuOom);
        let out = stop_for(&mut r, 1, f);
        assert!(exclusions(&out).is_empty());
        assert_eq!(r.spawns(), vec![(1, 0), (2, 1)]);
    }

    #[test]
    fn a_restart_fault_on_one_gpu_restarts_with_every_gpu_and_an_exclusion_beats_the_last_tier() {
        // A reset loses the work but says nothing against the GPU: same tier, same GPUs.
        let mut r = Run::with_gpus(policy(), &[("gpu", true)], 2).start();
        let f = gpu_fault(&r, 1, 1, FaultClass::GpuReset);
        let out = stop_for(&mut r, 1, f);
        assert!(exclusions(&out).is_empty());
        assert_eq!(r.sup.attempts()[1].gpus.len(), 2);
        // On a one-tier ladder a lost GPU would end the run; with two GPUs the other carries on.
        let f = gpu_fault(&r, 2, 0, FaultClass::GpuLost);
        let out = stop_for(&mut r, 2, f);
        assert_eq!(exclusions(&out).len(), 1);
        assert_eq!(r.spawns(), vec![(1, 0), (2, 0), (3, 0)]);
        assert_eq!(r.sup.attempts()[2].gpus, vec![gpu(1, 0)]);
        assert_eq!(r.outcome(), None);
    }

    #[test]
    fn the_same_fault_at_the_same_point_on_another_gpu_follows_the_job_down_the_ladder() {
        let mut r = Run::with_gpus(policy(), &[("gpu", true), ("cpu", false)], 4).start();
        let f = gpu_fault(&r, 1, 3, FaultClass::GpuMemoryFault);
        let out = stop_for(&mut r, 1, f);
        assert_eq!(exclusions(&out).len(), 1);
        // Attempt 2 (GPUs 0-2) faults the same way before writing a new checkpoint.
        let f = gpu_fault(&r, 2, 2, FaultClass::GpuMemoryFault);
        let out = stop_for(&mut r, 2, f);
        assert!(exclusions(&out).is_empty());
        assert!(
            says(&out).contains("it follows the job, not the GPU; down the ladder"),
            "{}",
            says(&out)
        );
        assert_eq!(r.spawns(), vec![(1, 0), (2, 0), (3, 1)]);
    }

    #[test]
    fn the_same_fault_after_progress_on_another_gpu_excludes_that_one_too() {
        let mut r = Run::with_gpus(policy(), &[("gpu", true), ("cpu", false)], 4).start();
        let f = gpu_fault(&r, 1, 3, FaultClass::GpuLost);
        stop_for(&mut r, 1, f);
        let at = r.now;
        r.feed(Event::Checkpoint {
            attempt: 2,
            at,
            path: PathBuf::from("ckpt/step-20.pt"),
        });
        let f = gpu_fault(&r, 2, 2, FaultClass::GpuLost);
        let out = stop_for(&mut r, 2, f);
        assert_eq!(exclusions(&out).len(), 1, "{}", says(&out));
        assert_eq!(r.spawns(), vec![(1, 0), (2, 0), (3, 0)]);
        let keys: Vec<u32> = r.sup.attempts()[2].gpus.iter().map(|g| g.index).collect();
        assert_eq!(keys, [0, 1]);
    }

    #[test]
    fn the_jobs_own_report_first_and_the_xid_naming_the_gpu_after_still_exclude_it() {
        let mut r = Run::with_gpus(policy(), &[("gpu", true), ("cpu", false)], 2).start();
        // `CUDA error: an illegal memory access` on stderr: no GPU named; it decides at once.
        let own = fault(FaultClass::GpuMemoryFault, Action::Fallback);
        r.fault(1, own);
        // The kernel's Xid 31 naming GPU 1 comes a moment later, with the same action.
        let mut xid = gpu_fault(&r, 1, 1, FaultClass::GpuMemoryFault);
        xid.rule = "xid-31".into();
        let out = stop_for(&mut r, 1, xid);
        assert_eq!(exclusions(&out).len(), 1, "{}", says(&out));
        assert_eq!(r.spawns(), vec![(1, 0), (2, 0)]);
        assert_eq!(r.sup.attempts()[1].gpus, vec![gpu(0, 0)]);
    }
}
