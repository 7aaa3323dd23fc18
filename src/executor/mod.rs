//! The executor: one loop that turns the outside world into supervisor events and carries out
//! the supervisor's effects.
//!
//! ```text
//!  output pumps (per attempt, per stream) ─┐
//!  waiter thread (per attempt)            ─┤
//!  signal thread                          ─┼─ Input ──> loop: Supervisor::step ──> Effect
//!  kernel reader (judged: outside::whose) ─┤   (mpsc)          │
//!  health sampler                         ─┤                   │
//!  display keys (Requests: `f`)           ─┘                   ├─ Spawn:   start an attempt (attempt.rs)
//!                                                              ├─ Signal:  killpg(attempt's group)
//!                                                              ├─ Journal: append + fsync
//!                                                              ├─ Say:     one line on stderr
//!                                                              └─ Finish:  summary, exit code
//! ```
//!
//! The loop runs on the main thread on purpose: the job is forked from here, and the kernel's
//! parent-death signal is tied to the forking thread. This room does I/O and gathers facts; a
//! decision belongs in `crate::supervisor` (whose fault a kernel or health line is:
//! `crate::supervisor::outside`). It publishes what views read into a [`Board`].

mod attempt;
mod error;
mod memory;
mod outside;
mod progress;
mod requests;
mod start;
mod upkeep;

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use crate::attribution::JobView;
use crate::cgroup::{Cgroup, RunCgroup};
use crate::config::Plan;
use crate::gpu::Gpu;
use crate::job::Sig;
use crate::journal::{self, Journal, Record};
use crate::process::{self, GroupEvent, Guard};
use crate::rules::{RuleSet, Stream};
use crate::snapshot::{Board, JobInfo, JobState};
use crate::sources::health::{HealthConfig, HealthEvent, HealthSource};
use crate::sources::kernel::{Follower, KernelEvent, KernelSource};
use crate::sources::output::OutputEvent;
use crate::supervisor::outside::Outside;
use crate::supervisor::{Effect, Event, Outcome, Supervisor, TierInfo};
use crate::voice::say;

pub use error::RunError;
pub use outside::KernelFault;
pub use requests::{Request, Requests};
pub use start::Resume;

/// How long the guard gives the job's group between SIGTERM and SIGKILL when gpuwarden died.
pub const GUARD_GRACE: Duration = Duration::from_secs(1);

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
    /// A file event in the checkpoint location: look for a new checkpoint now (progress.rs).
    CheckpointHint,
    Request(Request),
}

/// What `run` watches besides the job's own output, and where it publishes its state.
#[derive(Debug, Default)]
pub struct Watch {
    /// The kernel log to follow (`/dev/kmsg`), or none (`--no-kernel-log`).
    pub kernel: Option<KernelSource>,
    /// This machine's GPUs, for telling whether a device named by a kernel line is one the job
    /// can use.
    pub gpus: Vec<Gpu>,
    /// The GPU health sampler's settings, or none (`--no-health`).
    pub health: Option<HealthConfig>,
    /// Where the run's state is published for views (the live display, metrics).
    pub board: Board,
    /// Continue the run in an existing run directory (`gpuwarden resume`) instead of a new one.
    pub resume: Option<Resume>,
    /// Where the live display's requests (a forced fallback) come in.
    pub requests: Requests,
    /// The sysfs root GPU memory is read under before a GPU attempt after a faulted one
    /// (`--sysfs-root`); `None`: `/sys`.
    pub sysfs_root: Option<PathBuf>,
}

/// How long the end of a run waits for its last notifications (the run's end among them).
const NOTIFY_DRAIN: Duration = Duration::from_secs(15);

/// How often the job's process tree is re-read for attribution while an attempt runs.
const TREE_REFRESH: Duration = Duration::from_secs(1);

/// How often foreign-fault windows that are over are journaled.
const FOREIGN_CHECK: Duration = Duration::from_secs(1);

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
    // Logs are never overwritten: a directory that holds another run's would end this run at
    // its first attempt, after the job was started. Refused now instead (a resumed run appends
    // to its own).
    let has_journal = run_dir.join("journal.jsonl").exists();
    if let Some(stale) = std::fs::read_dir(&run_dir)
        .ok()
        .filter(|_| !has_journal && watch.resume.is_none())
        .and_then(|entries| {
            entries.flatten().map(|e| e.file_name()).find(|name| {
                let name = name.to_string_lossy();
                name.starts_with("attempt-") && name.ends_with(".log")
            })
        })
    {
        return Err(RunError::RunDirHasLogs(
            run_dir,
            stale.to_string_lossy().into_owned(),
        ));
    }
    let opened = match &watch.resume {
        Some(_) => Journal::append_to(&run_dir),
        None => Journal::create(&run_dir),
    };
    let journal = opened.map_err(|source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            RunError::RunDirInUse(run_dir.clone())
        } else {
            RunError::Journal {
                path: run_dir.join("journal.jsonl"),
                source,
            }
        }
    })?;
    crate::voice::start();
    let notifier = crate::notify::Notifier::start(&plan.notify, &run_dir, journal.path());
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    process::spawn_signal_thread(tx.clone(), Input::Signal).map_err(RunError::Signals)?;
    watch.requests.connect(tx.clone());

    let mut exec = Executor {
        plan,
        rules,
        run_dir: run_dir.clone(),
        journal,
        guard: None,
        groups: HashMap::new(),
        terminal_warned: HashSet::new(),
        tx,
        view: Arc::new(Mutex::new(JobView::new(std::process::id()))),
        outside: Arc::new(Mutex::new(Outside::new())),
        gpus: watch.gpus,
        sights: HashMap::new(),
        gpus_unknown_warned: false,
        terminal_reads_fail: process::terminal_reads_fail(),
        kernel: None,
        health: None,
        refreshed: Instant::now(),
        foreign_checked: Instant::now(),
        kernel_dropped: 0,
        kernel_lost: None,
        skips_reported: HashSet::new(),
        // Where none can be made (no unified hierarchy, no permission), the process group,
        // the subreaper and the /proc walk are what there is; nothing to warn about.
        run_cgroup: RunCgroup::create().ok(),
        cgroups: HashMap::new(),
        pumps: HashMap::new(),
        board: watch.board,
        checkpoints_seen: progress::Seen::default(),
        memory: memory::MemoryWatch::new(watch.sysfs_root.clone()),
        notifier,
    };
    exec.board.update(|s| {
        s.job = Some(JobInfo {
            command: exec.command_words(),
            max_restarts: plan.max_restarts,
            run_dir: run_dir.clone(),
            ..JobInfo::default()
        })
    });
    let resume_tier = exec.journal_start(watch.resume.as_ref())?;
    exec.start_watching(preflight, watch.kernel, watch.health)?;
    say(&format!(
        "supervising: {}",
        crate::voice::job_line(&plan.command)
    ));
    say(&format!(
        "run directory: {}",
        crate::voice::shown_path(&run_dir)
    ));

    let policy = start::policy(plan);
    let tiers = plan
        .ladder
        .iter()
        .map(|t| TierInfo {
            name: t.name.clone(),
            uses_gpu: t.uses_gpu,
        })
        .collect();
    let mut sup = Supervisor::new(policy, tiers);
    if let (Some(r), Some(tier)) = (&watch.resume, resume_tier) {
        sup.resume_at(r.attempt, tier, r.restarts);
        let excluded = exec.still_excluded(&r.excluded_pci);
        if !excluded.is_empty() {
            say(&format!(
                "still excluded after an earlier fault: {}",
                excluded
                    .iter()
                    .map(|g| g.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            sup.exclude_from_start(excluded);
        }
    }
    let outcome = match exec.drive(&mut sup, &rx) {
        Ok(outcome) => outcome,
        Err(e) => {
            exec.stop_jobs();
            if let Some(notifier) = exec.notifier.take() {
                notifier.close(NOTIFY_DRAIN);
            }
            crate::voice::flush();
            return Err(e);
        }
    };
    if let Some(guard) = exec.guard.take() {
        guard.close();
    }
    if let Some(run_cgroup) = &exec.run_cgroup {
        run_cgroup.remove();
    }
    if let Some(follower) = exec.kernel.take() {
        follower.stop();
    }
    exec.report_outside_totals()?;
    if let Some(source) = exec.health.take() {
        source.stop();
    }
    exec.board.update(|s| {
        if let Some(job) = &mut s.job {
            job.state = JobState::Finished(outcome.to_string());
        }
    });
    if let Some(written) = exec.journal.retry() {
        exec.journal_written(written);
    }
    if exec.journal.held() > 0 {
        say(&format!(
            "warning: {} journal records could not be written (the disk is still full); what happened is on the console above",
            exec.journal.held()
        ));
    }
    crate::summary::print(&sup, plan, &outcome, exec.journal.path());
    if let Some(notifier) = exec.notifier.take() {
        notifier.close(NOTIFY_DRAIN);
    }
    crate::voice::flush();
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
    /// The facts about the job's processes and GPUs, shared with the kernel reader thread.
    view: Arc<Mutex<JobView>>,
    /// The repeat and foreign-fault windows (pure state), shared with the kernel reader thread.
    outside: Arc<Mutex<Outside>>,
    gpus: Vec<Gpu>,
    /// What each attempt sees of `gpus`, for telling which of its GPUs a fault names.
    sights: HashMap<u32, crate::devices::Sight>,
    /// Said once: a GPU tier sees no GPU gpuwarden knows while the command uses `{nproc}`.
    gpus_unknown_warned: bool,
    /// The job's reads of its stdin, a terminal, fail with EIO (said at the start).
    terminal_reads_fail: bool,
    kernel: Option<Follower>,
    health: Option<HealthSource>,
    /// When the job's processes were last re-read.
    refreshed: Instant,
    /// When foreign-fault windows were last looked at.
    foreign_checked: Instant,
    /// Kernel records overwritten before the reader got them (`Some` once any were).
    kernel_lost: Option<u64>,
    /// Foreign kernel fault records dropped so far because the loop fell behind.
    kernel_dropped: u64,
    /// Incomplete checkpoints already reported.
    skips_reported: HashSet<PathBuf>,
    /// The run's cgroup (none where none can be made) and each live attempt's.
    run_cgroup: Option<RunCgroup>,
    cgroups: HashMap<u32, Cgroup>,
    /// Each live attempt's output pumps.
    pumps: HashMap<u32, Vec<crate::sources::handle::Handle>>,
    board: Board,
    /// The newest checkpoint seen by the rescan (issue 11: checkpoints are progress).
    checkpoints_seen: progress::Seen,
    /// GPU memory before each attempt and its processes, for the wait after a fault.
    memory: memory::MemoryWatch,
    /// Gets a copy of the journal records someone asked to be told about (`--notify-cmd`,
    /// `--webhook`); never blocks.
    notifier: Option<crate::notify::Notifier>,
}

/// Locks shared state; a panic elsewhere while holding it leaves data that is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
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
            self.publish(sup);
            self.check_guard()?;
            let now = Instant::now();
            let mut timeout = sup.next_deadline().map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(now)
            });
            // The tree also tells which processes were an attempt's, for the wait for its GPU
            // memory after a fault.
            let tree_wanted = self.kernel.is_some() || self.plan.gpu_memory_wait.is_some();
            if tree_wanted && !self.groups.is_empty() {
                // Keep the process tree fresh: a process that faults and dies between two
                // reads is attributed from memory only if a read saw it.
                if now.saturating_duration_since(self.refreshed) >= TREE_REFRESH {
                    lock(&self.view).refresh();
                    self.refreshed = now;
                }
                timeout = timeout.min(TREE_REFRESH);
            }
            if now.saturating_duration_since(self.foreign_checked) >= FOREIGN_CHECK {
                self.foreign_checked = now;
                self.journal_foreign_repeats(now)?;
                if let Some(written) = self.journal.retry() {
                    self.journal_written(written);
                }
            }
            timeout = timeout.min(FOREIGN_CHECK);
            if let Some(attempt) = sup.live_attempt()
                && self.plan.checkpoints.is_some()
            {
                self.rescan_checkpoints(attempt, now, false, &mut pending)?;
                timeout = timeout.min(self.next_checkpoint_look(now));
            }
            timeout = self.memory_step(sup, now, &mut pending, timeout);
            if timeout.is_zero() {
                // A deadline is due. Inputs keep coming in a flood (a neighbour's GPU spamming
                // the kernel log), and a Tick only on an empty channel would never come: the
                // SIGTERM after the settle time, SIGKILL after the grace and the backoff would
                // all wait for the flood to end.
                pending.push(Event::Tick);
            }
            match rx.recv_timeout(timeout) {
                Ok(Input::CheckpointHint) => self.checkpoint_hint(sup, &mut pending)?,
                Ok(input) => {
                    let ended = progress::ended_attempt(&input, sup.live_attempt());
                    let eio = self.terminal_read_failed(&input);
                    if let Some(event) = self.event_of(input, sup.live_attempt())? {
                        pending.push(event);
                    }
                    // Heard before the exit it explains (`pending` is a stack).
                    pending.extend(eio);
                    if let Some(attempt) = ended {
                        self.rescan_checkpoints(attempt, Instant::now(), true, &mut pending)?;
                    }
                }
                // The loop holds a sender itself, so the channel cannot disconnect.
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    pending.push(Event::Tick)
                }
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
                OutputEvent::Fault(mut fault) => {
                    self.pin(attempt, &mut fault);
                    Some(Event::Fault { attempt, fault })
                }
                OutputEvent::Closed => Some(Event::StreamClosed { attempt, stream }),
                OutputEvent::Progress { at } => Some(Event::Progress { attempt, at }),
                OutputEvent::Idle { at } => Some(Event::OutputIdle {
                    attempt,
                    stream,
                    at,
                }),
                OutputEvent::StepInterval { heartbeats, median } => {
                    self.step_interval(attempt, heartbeats, median)?
                }
                OutputEvent::LogFailed(e) => {
                    self.warn(format!(
                        "attempt {attempt}: writing the {stream} log failed ({e}); the output is still passed through"
                    ))?;
                    None
                }
            },
            Input::Group { attempt, event } => self.group_event(attempt, event)?,
            Input::Signal(sig) => Some(Event::Signal(sig)),
            Input::Request(Request::ForceFallback) => Some(Event::ForceFallback),
            Input::Kernel(event) => self.kernel_event(event, live)?,
            Input::Health(event) => self.health_event(event, live)?,
            Input::CheckpointHint => None,
        })
    }

    fn group_event(&mut self, attempt: u32, event: GroupEvent) -> Result<Option<Event>, RunError> {
        Ok(match event {
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
                    self.memory_members(attempt, pgid);
                    // The id may now be reused by an unrelated process.
                    lock(&self.view).group_ended(pgid);
                    if let Some(guard) = &mut self.guard {
                        let _ = guard.unwatch(pgid);
                    }
                }
                if let Some(cgroup) = self.cgroups.remove(&attempt) {
                    let _ = cgroup.remove();
                }
                // Joined if done; one whose pipe a stray still holds is left to its EOF.
                self.pumps.remove(&attempt);
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
        })
    }

    /// Carries out one effect. Events it causes at once (the answer to `Spawn`) go to `pending`.
    fn apply(
        &mut self,
        effect: Effect,
        pending: &mut Vec<Event>,
    ) -> Result<Option<Outcome>, RunError> {
        match effect {
            Effect::Spawn {
                attempt,
                tier,
                exclude,
            } => {
                let mut closed = Vec::new();
                let answer = self.spawn(attempt, tier, &exclude, &mut closed)?;
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
                // And to what left the group.
                if let Some(cgroup) = self.cgroups.get(&attempt) {
                    match sig {
                        Sig::Kill => cgroup.kill(),
                        _ => cgroup.signal(sig.number()),
                    }
                }
            }
            Effect::Journal(record) => {
                if let Record::Fault {
                    attempt,
                    class,
                    rule,
                    severity,
                    stream,
                    line,
                    ..
                } = &record
                {
                    self.board.update(|s| {
                        s.add_fault(crate::snapshot::FaultNote {
                            at: SystemTime::now(),
                            class: *class,
                            rule: rule.clone(),
                            severity: *severity,
                            source: stream.to_string(),
                            line: line.clone(),
                            attempt: Some(*attempt),
                            reason: None,
                            count: 1,
                        })
                    });
                }
                self.journal(&record)?
            }
            Effect::Say(message) => say(&message),
            Effect::CaptureStacks { attempt } => self.capture_stacks(attempt)?,
            Effect::Finish(outcome) => return Ok(Some(outcome)),
        }
        Ok(None)
    }

    /// Appends a record. A journal that cannot be written (a full disk) degrades: the record
    /// waits in memory and the job goes on; said once when it starts and once when it ends.
    fn journal(&mut self, record: &Record) -> Result<(), RunError> {
        let at = SystemTime::now();
        let written = self
            .journal
            .write(record, at)
            .map_err(|source| RunError::Journal {
                path: self.journal.path().to_path_buf(),
                source,
            })?;
        if let Some(notifier) = &mut self.notifier {
            notifier.offer(record, at);
        }
        self.journal_written(written);
        Ok(())
    }
}
