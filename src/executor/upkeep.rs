//! The executor's upkeep beside the loop: what it publishes for views, the guard that must stay
//! alive, orphans to reap, the emergency stop when gpuwarden itself cannot go on, and what a
//! journal that cannot be written says.

use std::thread;
use std::time::{Duration, Instant, SystemTime};

use super::{Executor, RunError, lock};
use crate::job::Sig;
use crate::journal;
use crate::process::{self, Guard};
use crate::snapshot::JobState;
use crate::supervisor::Supervisor;
use crate::voice::say;

impl Executor<'_> {
    /// Says a warning on the console and journals it.
    pub(super) fn warn(&mut self, message: String) -> Result<(), RunError> {
        say(&format!("warning: {message}"));
        self.journal(&journal::Record::Warning { message })
    }

    /// The command as the user gave it, one string an argument.
    pub(super) fn command_words(&self) -> Vec<String> {
        self.plan
            .command
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// Tells the kernel reader and the views where the supervisor stands.
    pub(super) fn publish(&mut self, sup: &Supervisor) {
        let live = sup.live_attempt();
        lock(&self.view).set_live(live);
        let last = sup.attempts().last();
        let tier = last.and_then(|a| self.plan.ladder.get(a.tier));
        let pid = live.and_then(|a| self.groups.get(&a).copied());
        let state = match (live, sup.stopping()) {
            (Some(_), true) => JobState::Stopping,
            (Some(_), false) => JobState::Running,
            (None, _) if sup.next_deadline().is_some() => JobState::Backoff,
            (None, _) => JobState::Starting,
        };
        let restarts = sup.restarts();
        let excluded = sup.excluded().to_vec();
        self.board.update(|s| {
            let Some(job) = &mut s.job else { return };
            job.state = state;
            job.restarts = restarts;
            if let (Some(a), Some(tier)) = (last, tier) {
                if job.attempt != a.attempt {
                    job.started = Some(SystemTime::now());
                }
                job.attempt = a.attempt;
                job.tier = tier.name.clone();
                job.device = tier.device.clone();
                job.resumed_from = a.checkpoint.clone();
                job.gpus.clone_from(&a.gpus);
            }
            job.excluded = excluded;
            if pid.is_some() {
                job.pid = pid;
            }
        });
    }

    /// The guard kills the job if gpuwarden is killed; if someone killed the guard itself, that
    /// protection is gone: say so and start a new one watching what the old one watched.
    pub(super) fn check_guard(&mut self) -> Result<(), RunError> {
        let Some(guard) = &mut self.guard else {
            return Ok(());
        };
        if guard.alive() {
            return Ok(());
        }
        let mut fresh = match Guard::spawn() {
            Ok(fresh) => fresh,
            Err(e) => {
                self.guard = None;
                return self.warn(format!(
                    "the guard process died and a new one cannot be started ({e}): if gpuwarden is killed with SIGKILL, the job may survive it"
                ));
            }
        };
        let mut watched = Ok(());
        for &pgid in self.groups.values() {
            watched = watched.and_then(|()| fresh.watch(pgid));
        }
        for cgroup in self.cgroups.values() {
            watched = watched.and_then(|()| fresh.watch_cgroup(cgroup.path()));
        }
        let pid = fresh.pid();
        self.guard = Some(fresh);
        match watched {
            Ok(()) => self.warn(format!(
                "the guard process (which kills the job if gpuwarden is killed) died; started a new one (pid {pid})"
            )),
            Err(e) => self.warn(format!(
                "the guard process died and the new one (pid {pid}) could not be told what to watch ({e})"
            )),
        }
    }

    /// Reaps orphans adopted from finished attempts that left their process group (daemons
    /// started with `setsid`), so they do not pile up as zombies over a long run.
    pub(super) fn reap_strays(&self) {
        let groups: Vec<u32> = self.groups.values().copied().collect();
        let guard: Vec<u32> = self.guard.iter().map(Guard::pid).collect();
        process::reap_strays(&groups, &guard);
    }

    /// After a failure of gpuwarden itself mid-run: stop what is running as a fault would,
    /// with the configured grace, rather than leave it to the guard's short one.
    pub(super) fn stop_jobs(&mut self) {
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
        for cgroup in self.cgroups.values() {
            cgroup.kill();
        }
    }

    pub(super) fn journal_written(&mut self, written: journal::Written) {
        match written {
            journal::Written::Durable => {}
            journal::Written::Held { first: true, error } => say(&format!(
                "warning: cannot write the journal {} ({error}); keeping its records in memory (up to {}) and writing them when space returns; the job goes on",
                self.journal.path().display(),
                journal::HELD_MAX
            )),
            journal::Written::Held { .. } => {}
            journal::Written::Recovered { held, lost } => {
                let message = if lost == 0 {
                    format!(
                        "the journal can be written again: {held} records held in memory were written late"
                    )
                } else {
                    format!(
                        "the journal can be written again: {held} records held in memory were written late; {lost} more were lost for lack of memory"
                    )
                };
                // Journaled through `warn`, which may find the disk full again: then it waits too.
                let _ = self.warn(message);
            }
        }
    }
}
