//! Progress the supervisor cannot see in the job's output: new checkpoints, and the job's stacks
//! captured before a stalled attempt is stopped.
//!
//! A new checkpoint is looked for when a file event in the checkpoint location hints at one
//! (`sources::checkpoint_files`, inotify: within milliseconds of the save), and by a rescan every
//! [`CHECKPOINT_SCAN`] whatever happens: the fallback FACTS.md recommends, for file systems
//! without events and for events missed. Both do the same cheap look (one directory listing and
//! a check of the newest candidate's end).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use super::{Executor, Input, RunError};
use crate::checkpoints;
use crate::journal::Record;
use crate::process::GroupEvent;
use crate::sources::checkpoint_files::{self, CheckpointWatch};
use crate::supervisor::{Event, Supervisor};
use crate::voice::say;

/// The attempt whose process group `input` says is gone (or whose leader exited alone), when it
/// is the live one: its checkpoint location gets a last look before the attempt can end, so the
/// crash-loop sense knows how far it got.
pub(super) fn ended_attempt(input: &Input, live: Option<u32>) -> Option<u32> {
    match input {
        Input::Group {
            attempt,
            event:
                GroupEvent::Empty
                | GroupEvent::LeaderExited {
                    group_alive: false, ..
                },
        } if live == Some(*attempt) => Some(*attempt),
        _ => None,
    }
}

/// How often the checkpoint location is looked at while an attempt runs.
pub(super) const CHECKPOINT_SCAN: Duration = Duration::from_secs(2);

/// After a new checkpoint is found, file events wait this long for the next look. The first save
/// after a quiet spell is seen at once; a job saving faster than this (a test, a tiny model) is
/// looked at every `HINT_GAP`, so that neither the directory listings nor the journal's fsync of
/// each `checkpoint_saved` can take the loop's time from a kernel-log flood (tests/hostile.rs).
pub(super) const HINT_GAP: Duration = Duration::from_millis(500);

/// The longest `py-spy dump` may take: a job stuck in the GPU driver can make it hang too, and
/// the stop of a stalled job must not wait on it for long.
const STACKS_TIMEOUT: Duration = Duration::from_secs(10);

/// The newest complete checkpoint as last seen: its path and modification time (`None` until
/// a scan has read it).
#[derive(Debug, Default)]
pub(super) struct Seen {
    pub(super) newest: Option<(PathBuf, Option<SystemTime>)>,
    pub(super) scanned: Option<Instant>,
    /// The file-event watch of the checkpoint location, once its directory exists.
    watch: Option<CheckpointWatch>,
    /// File events cannot be had here (said once); the rescan is all there is.
    unwatchable: bool,
    /// A file event came that no look has answered yet.
    hinted: bool,
    /// When the last new checkpoint was found.
    hint_looked: Option<Instant>,
}

impl Executor<'_> {
    /// A file event hinted at a new checkpoint: looked for now, for the live attempt.
    pub(super) fn checkpoint_hint(
        &mut self,
        sup: &Supervisor,
        pending: &mut Vec<Event>,
    ) -> Result<(), RunError> {
        if let Some(watch) = &self.checkpoints_seen.watch {
            watch.taken();
        }
        self.checkpoints_seen.hinted = true;
        match sup.live_attempt() {
            Some(attempt) => self.rescan_checkpoints(attempt, Instant::now(), false, pending),
            None => Ok(()),
        }
    }

    /// How long the loop may sleep before the next look at the checkpoint location: the rescan
    /// every [`CHECKPOINT_SCAN`], sooner for a file event held back by [`HINT_GAP`].
    pub(super) fn next_checkpoint_look(&self, now: Instant) -> Duration {
        let seen = &self.checkpoints_seen;
        let scan = seen.scanned.map_or(Duration::ZERO, |t| {
            (t + CHECKPOINT_SCAN).saturating_duration_since(now)
        });
        match (seen.hinted, seen.hint_looked) {
            (true, Some(t)) => scan.min((t + HINT_GAP).saturating_duration_since(now)),
            (true, None) => Duration::ZERO,
            (false, _) => scan,
        }
    }

    /// Starts the file-event watch of the checkpoint location if it is not running yet and its
    /// directory now exists.
    fn watch_checkpoints(&mut self, spec: &checkpoints::Spec) {
        if self.checkpoints_seen.watch.is_some() || self.checkpoints_seen.unwatchable {
            return;
        }
        match checkpoint_files::watch(spec, self.tx.clone(), || Input::CheckpointHint) {
            Ok(watch) => self.checkpoints_seen.watch = watch,
            Err(e) => {
                self.checkpoints_seen.unwatchable = true;
                say(&format!(
                    "new checkpoints are looked for every {CHECKPOINT_SCAN:?} only: no file events ({e})"
                ));
            }
        }
    }

    /// Looks for a checkpoint newer than the last one seen; journals it and pushes a checkpoint
    /// event for `attempt` onto `pending` (a stack: the supervisor hears of it before whatever
    /// was pushed earlier, such as the end of the attempt's group).
    /// `last` is the scan when the attempt's processes are all gone: done whatever the cadence,
    /// so a checkpoint written in its last seconds is still credited to it. A file event not yet
    /// answered makes a look due [`HINT_GAP`] after the last one it caused.
    pub(super) fn rescan_checkpoints(
        &mut self,
        attempt: u32,
        now: Instant,
        last: bool,
        pending: &mut Vec<Event>,
    ) -> Result<(), RunError> {
        let Some(spec) = &self.plan.checkpoints else {
            return Ok(());
        };
        let seen = &mut self.checkpoints_seen;
        let since = |t: Option<Instant>| t.map(|t| now.saturating_duration_since(t));
        let answers_hint = seen.hinted && since(seen.hint_looked).is_none_or(|d| d >= HINT_GAP);
        if !last && !answers_hint && since(seen.scanned).is_some_and(|d| d < CHECKPOINT_SCAN) {
            return Ok(());
        }
        seen.hinted = false;
        seen.scanned = Some(now);
        let spec = checkpoints::Spec::new(spec, Some(&self.run_dir), Path::new(""));
        if let Ok(spec) = &spec {
            self.watch_checkpoints(spec);
        }
        let found = spec.and_then(|s| s.discover());
        let Ok(found) = found else {
            // Said when the next attempt starts, where it matters.
            return Ok(());
        };
        let Some(newest) = found.newest else {
            return Ok(());
        };
        let is_new = match &mut self.checkpoints_seen.newest {
            Some((path, modified)) if *path == newest.path => match modified {
                // The baseline from the attempt's start has no time yet: take it, not news.
                None => {
                    *modified = Some(newest.modified);
                    false
                }
                Some(m) => *m != newest.modified,
            },
            _ => true,
        };
        if !is_new {
            return Ok(());
        }
        self.checkpoints_seen.newest = Some((newest.path.clone(), Some(newest.modified)));
        self.checkpoints_seen.hint_looked = Some(now);
        self.journal(&Record::CheckpointSaved {
            attempt,
            path: newest.path.clone(),
            step: newest.step,
        })?;
        // The progress happened when the file was written, not when the scan found it (up to
        // CHECKPOINT_SCAN later): stamped so, a stall is timed from the job's last sign of life.
        let age = SystemTime::now()
            .duration_since(newest.modified)
            .unwrap_or_default();
        let now = Instant::now();
        pending.push(Event::Checkpoint {
            attempt,
            path: newest.path,
            at: now.checked_sub(age).unwrap_or(now),
        });
        Ok(())
    }

    /// With `--progress`: journals (and says) how often the job's heartbeats come, once per
    /// attempt, next to the stall timeout it is measured against; the supervisor may learn the
    /// attempt's stall timeout from it (`supervisor::stall`).
    pub(super) fn step_interval(
        &mut self,
        attempt: u32,
        heartbeats: u64,
        median: Duration,
    ) -> Result<Option<Event>, RunError> {
        let against = match self.plan.stall_timeout {
            Some(t) => format!(" (the stall timeout is {t:.0?})"),
            None => String::new(),
        };
        say(&format!(
            "attempt {attempt}: a heartbeat every {median:.2?} (median of {heartbeats}){against}"
        ));
        self.journal(&Record::StepInterval {
            attempt,
            heartbeats,
            median_seconds: median.as_secs_f64(),
        })?;
        Ok(Some(Event::StepInterval {
            attempt,
            heartbeats,
            median,
        }))
    }

    /// `py-spy dump --pid PID` of the attempt's leader into `attempt-N.stacks.txt`, when py-spy
    /// is on PATH, for at most [`STACKS_TIMEOUT`]; journaled either way.
    pub(super) fn capture_stacks(&mut self, attempt: u32) -> Result<(), RunError> {
        let Some(&pid) = self.groups.get(&attempt) else {
            return Ok(());
        };
        let Some(py_spy) = on_path("py-spy") else {
            return self.journal(&Record::StacksCaptured {
                attempt,
                path: None,
                detail: "py-spy is not on PATH (pip install py-spy to get the stacks of a stalled Python job)".into(),
            });
        };
        let path = self.run_dir.join(format!("attempt-{attempt}.stacks.txt"));
        let detail = match dump(&py_spy, pid, &path) {
            Ok(()) => {
                say(&format!(
                    "attempt {attempt}: the job's stacks are in {}",
                    crate::voice::shown_path(&path)
                ));
                "py-spy dump".to_string()
            }
            Err(e) => {
                say(&format!(
                    "attempt {attempt}: could not capture the job's stacks: {e}"
                ));
                e
            }
        };
        self.journal(&Record::StacksCaptured {
            attempt,
            path: Some(path),
            detail,
        })
    }
}

pub(super) fn on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Runs py-spy with its output in `path`, killing it past the timeout.
fn dump(py_spy: &Path, pid: u32, path: &Path) -> Result<(), String> {
    let out = File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut child = Command::new(py_spy)
        .args(["dump", "--pid", &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", py_spy.display()))?;
    let deadline = Instant::now() + STACKS_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("py-spy failed ({status}); see the file")),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("py-spy took longer than {STACKS_TIMEOUT:?}"));
            }
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.to_string()),
        }
    }
}
