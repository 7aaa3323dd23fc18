//! Climbing back up the ladder (issue 11): after a fall to a lower tier for a fault that was a
//! fluke, the run goes back up once the lower tier has saved a newer checkpoint, instead of
//! spending the rest of the night on the CPU (10x slower in the seed's numbers).
//!
//! What it remembers and decides, purely (no clock, no I/O; the supervisor asks and acts):
//!
//! - every fall of this run: from which tier to which, the checkpoint the lower tier resumed
//!   from, the fault class, and whether it may ever be climbed back (a fall the crash-loop sense
//!   called deterministic, one for a class that rules out every GPU tier, one after attempts
//!   that wrote nothing, or one the user forced may not);
//! - the tiers closed to climbing: a tier left deterministically, and a tier that faulted again
//!   after being climbed back to (no ping-pong);
//! - how many climbs the run has made against its bound (`climb_back`, `--climb-back`).
//!
//! The rule is to climb at the first newer checkpoint: the checkpoint is the only evidence the
//! supervisor has that the lower tier got past the point where the higher one faulted, and
//! every minute spent waiting for more is a minute at the lower tier's speed. Tiers a pre-flight
//! quirk or the learned tiers skipped are not on the supervisor's ladder at all, so nothing here
//! can climb to them; a resumed run knows no falls and does not climb above where it resumed.

use std::path::PathBuf;
use std::time::Instant;

use super::{Effect, Live, Phase, StopCause};
use crate::job::Sig;
use crate::journal::Record;
use crate::rules::FaultClass;

/// The default bound on climbs per run (`climb_back = 3`). A climb costs one restart from a
/// checkpoint (seconds to minutes) and buys back GPU speed; three allows one rung of a
/// three-rung ladder twice over, or a second fluke hours later on another tier, while a night
/// of faults ends climbing quickly since a tier that faults after a climb is closed anyway.
pub const DEFAULT_CLIMBS: u32 = 3;

/// One fall down the ladder.
#[derive(Clone, Debug, PartialEq)]
pub struct Fall {
    pub from: usize,
    pub to: usize,
    /// How far the attempt that fell got: what the lower tier resumed from.
    pub checkpoint: Option<PathBuf>,
    pub class: FaultClass,
    /// Whether the fall may be climbed back (see [`Why`]).
    pub climbable: bool,
}

/// Why a fall is not one to climb back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// The same class at the same point of training twice: it will happen again.
    Deterministic,
    /// The class rules out every GPU tier (no kernel for the architecture, no GPU).
    RulesOutGpus,
    /// The tier was left after attempts in a row that wrote no checkpoint.
    NoProgress,
}

/// A decision to climb: stop the live attempt and start tier `to` from the newest checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct Climb {
    /// The tier to go back to.
    pub to: usize,
    /// The fall it undoes.
    pub fall: Fall,
    /// Climbs left after this one.
    pub left: u32,
}

/// The run's falls and climbs; see the module documentation.
#[derive(Clone, Debug, Default)]
pub struct Climbs {
    /// At most this many climbs per run; 0 is `off`.
    limit: u32,
    done: u32,
    falls: Vec<Fall>,
    /// Tiers never climbed to again.
    closed: Vec<usize>,
    /// Tiers climbed back to so far.
    climbed_to: Vec<usize>,
}

impl Climbs {
    pub fn new(limit: u32) -> Climbs {
        Climbs {
            limit,
            ..Climbs::default()
        }
    }

    /// Climbs made so far.
    pub fn done(&self) -> u32 {
        self.done
    }

    /// Notes a fall from `from` to `to` for `class`; `not` says why it may never be climbed
    /// back (and closes the tiers it left). A fall from a tier climbed back to closes that tier:
    /// it faulted again after the climb, so the run stays below it.
    pub fn fell(
        &mut self,
        from: usize,
        to: usize,
        checkpoint: Option<PathBuf>,
        class: FaultClass,
        not: Option<Why>,
    ) {
        if not.is_some() || self.climbed_to.contains(&from) {
            // Every tier the fall passed over is closed with the one it left: a class that rules
            // out GPUs jumps several.
            for t in from..to {
                if !self.closed.contains(&t) {
                    self.closed.push(t);
                }
            }
        }
        self.falls.push(Fall {
            from,
            to,
            checkpoint,
            class,
            climbable: not.is_none(),
        });
    }

    /// Closes `tier` to climbing without a fall from it (three attempts without a checkpoint
    /// ended it, or the crash-loop sense judged a fault on it deterministic).
    pub fn close(&mut self, tier: usize) {
        if !self.closed.contains(&tier) {
            self.closed.push(tier);
        }
    }

    /// Whether to climb now that the live attempt on `tier` has saved a checkpoint newer than
    /// the one it resumed from (the executor reports only newer ones, so any checkpoint of an
    /// attempt below a fall is newer than the fall's). The highest tier above `tier` that a
    /// climbable fall left and that is not closed, while climbs are left.
    pub fn on_checkpoint(&self, tier: usize) -> Option<Climb> {
        if self.done >= self.limit {
            return None;
        }
        let fall = self
            .falls
            .iter()
            .filter(|f| f.climbable && f.from < tier && f.to <= tier)
            .filter(|f| !self.closed.contains(&f.from))
            .min_by_key(|f| f.from)?;
        Some(Climb {
            to: fall.from,
            fall: fall.clone(),
            left: self.limit - self.done - 1,
        })
    }

    /// Notes that the run climbed back to `to`.
    pub fn climbed(&mut self, to: usize) {
        self.done += 1;
        if !self.climbed_to.contains(&to) {
            self.climbed_to.push(to);
        }
    }
}

impl super::Supervisor {
    /// The live `attempt` saved `path`: when a climb is due (`Climbs::on_checkpoint`), it is
    /// stopped the usual way (SIGTERM, SIGKILL after the grace) and the run goes back up once it
    /// has ended. Not while it is being stopped or has exited already.
    pub(super) fn climb_if_due(
        &mut self,
        attempt: u32,
        path: PathBuf,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        let Phase::Live(live) = &self.phase else {
            return;
        };
        let ending = live.stop.is_some()
            || live.term_due.is_some()
            || live.exit.is_some()
            || live.group_empty;
        if live.attempt != attempt || ending {
            return;
        }
        let Some(climb) = self.climbs.on_checkpoint(live.tier) else {
            return;
        };
        let (from, to) = (self.tier_name(live.tier), self.tier_name(climb.to));
        let grace = self.policy.grace;
        let fell_at = match &climb.fall.checkpoint {
            Some(c) => format!("at {}", c.display()),
            None => "before any checkpoint".to_string(),
        };
        let reason = format!(
            "{} on tier `{to}` {fell_at} was not deterministic, and tier `{from}` has saved a newer checkpoint",
            climb.fall.class
        );
        self.climbs.climbed(climb.to);
        let Phase::Live(live) = &mut self.phase else {
            return;
        };
        live.stop = Some(StopCause::Climb { to: climb.to });
        let signalled = live.stop_group(Sig::Terminate, now, out);
        out.push(Effect::Journal(Record::ClimbBack {
            attempt,
            from: from.clone(),
            to: to.clone(),
            checkpoint: path.clone(),
            fell_at: climb.fall.checkpoint.clone(),
            class: climb.fall.class,
            reason: reason.clone(),
            climbs_left: climb.left,
        }));
        out.push(Effect::Say(format!(
            "climbing back: attempt {attempt} on tier `{from}` saved {}; {reason}. Stopping it{} to try tier `{to}` again ({} climb(s) left)",
            path.display(),
            if signalled {
                format!(" (SIGTERM to its process group, SIGKILL after {grace:.0?})")
            } else {
                String::new()
            },
            climb.left
        )));
    }

    /// The attempt stopped for a climb has ended: the next one starts at once on tier `to`, from
    /// the newest checkpoint. A climb is not a restart after a fault: it spends no restart of
    /// the budget (`climb_back` bounds it) and waits no backoff.
    pub(super) fn restart_to_climb(
        &mut self,
        live: &Live,
        to: usize,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        let attempt = live.attempt + 1;
        let used = self.restarts_in_window(now);
        let tier = self.tier_name(to);
        let reason = format!("climbing back from tier `{}`", self.tier_name(live.tier));
        out.push(Effect::Journal(Record::RestartScheduled {
            attempt,
            tier: tier.clone(),
            reason: reason.clone(),
            delay_seconds: 0.0,
            restarts_left: self.policy.max_restarts.saturating_sub(used),
        }));
        out.push(Effect::Say(format!(
            "{reason}: restarting as attempt {attempt} on tier `{tier}` now"
        )));
        self.spawn(attempt, to, now, out);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const GPU: usize = 0;
    const SAFE: usize = 1;
    const CPU: usize = 2;

    fn ck(name: &str) -> Option<PathBuf> {
        Some(PathBuf::from(name))
    }

    #[test]
    fn a_transient_fall_is_climbed_back_to_the_tier_it_left() {
        let mut c = Climbs::new(DEFAULT_CLIMBS);
        assert_eq!(c.on_checkpoint(CPU), None, "no fall, nothing to climb to");
        c.fell(GPU, CPU, ck("c4"), FaultClass::GpuMemoryFault, None);
        let climb = c.on_checkpoint(CPU).unwrap();
        assert_eq!(climb.to, GPU);
        assert_eq!(climb.fall.checkpoint, ck("c4"));
        assert_eq!(climb.left, DEFAULT_CLIMBS - 1);
    }

    #[test]
    fn two_transient_falls_climb_to_the_highest_open_tier() {
        let mut c = Climbs::new(DEFAULT_CLIMBS);
        c.fell(GPU, SAFE, ck("c4"), FaultClass::GpuMemoryFault, None);
        c.fell(SAFE, CPU, ck("c6"), FaultClass::GpuException, None);
        assert_eq!(c.on_checkpoint(CPU).unwrap().to, GPU);
        // With the top closed, the rung in between.
        c.close(GPU);
        assert_eq!(c.on_checkpoint(CPU).unwrap().to, SAFE);
    }

    #[test]
    fn deterministic_no_progress_and_gpu_ruling_falls_are_never_climbed() {
        for why in [Why::Deterministic, Why::NoProgress, Why::RulesOutGpus] {
            let mut c = Climbs::new(DEFAULT_CLIMBS);
            c.fell(GPU, CPU, ck("c4"), FaultClass::GpuHang, Some(why));
            assert_eq!(c.on_checkpoint(CPU), None, "{why:?}");
        }
        // A tier closed once stays closed, even for a later transient fall from it.
        let mut c = Climbs::new(DEFAULT_CLIMBS);
        c.close(GPU);
        c.fell(GPU, CPU, ck("c8"), FaultClass::GpuMemoryFault, None);
        assert_eq!(c.on_checkpoint(CPU), None);
    }

    #[test]
    fn a_class_that_rules_out_gpus_closes_every_tier_it_jumped() {
        let mut c = Climbs::new(DEFAULT_CLIMBS);
        c.fell(
            GPU,
            CPU,
            None,
            FaultClass::GpuUnsupportedKernel,
            Some(Why::RulesOutGpus),
        );
        assert!(c.closed.contains(&GPU) && c.closed.contains(&SAFE));
    }

    #[test]
    fn the_bound_is_kept_and_zero_is_off() {
        let mut c = Climbs::new(0);
        c.fell(GPU, CPU, ck("c4"), FaultClass::GpuMemoryFault, None);
        assert_eq!(c.on_checkpoint(CPU), None);

        let mut c = Climbs::new(1);
        c.fell(GPU, SAFE, ck("c4"), FaultClass::GpuMemoryFault, None);
        c.fell(SAFE, CPU, ck("c6"), FaultClass::GpuMemoryFault, None);
        let climb = c.on_checkpoint(CPU).unwrap();
        assert_eq!(climb.left, 0);
        c.climbed(climb.to);
        assert_eq!(c.done(), 1);
        assert_eq!(c.on_checkpoint(SAFE), None);
        assert_eq!(c.on_checkpoint(CPU), None);
    }

    #[test]
    fn a_tier_that_faults_again_after_a_climb_is_not_climbed_to_again() {
        let mut c = Climbs::new(DEFAULT_CLIMBS);
        c.fell(GPU, CPU, ck("c4"), FaultClass::GpuMemoryFault, None);
        c.climbed(GPU);
        // The same transient class again, later in training: still no second climb.
        c.fell(GPU, CPU, ck("c10"), FaultClass::GpuMemoryFault, None);
        assert_eq!(c.on_checkpoint(CPU), None);
    }

    // ---- through the supervisor ----

    use crate::job::JobExit;
    use crate::rules::Action;
    use crate::supervisor::tests::{Run, attempt_with, fault, policy, says, signals};
    use crate::supervisor::{Effect, Event, Outcome, Policy};
    use std::time::Duration;

    const TWO: &[(&str, bool)] = &[("gpu", true), ("cpu", false)];
    const THREE: &[(&str, bool)] = &[("gpu", true), ("gpu-safe", true), ("cpu", false)];

    fn climbing(limit: u32) -> Policy {
        Policy {
            climb_back: limit,
            ..policy()
        }
    }

    /// `attempt` (just spawned) resumes from `from`, then saves `saved`; returns what that did.
    fn saves(r: &mut Run, attempt: u32, from: Option<&str>, saved: &str) -> Vec<Effect> {
        r.feed(Event::Spawned {
            attempt,
            checkpoint: from.map(PathBuf::from),
            gpus: Vec::new(),
        });
        let at = r.now;
        r.feed(Event::Checkpoint {
            attempt,
            at,
            path: PathBuf::from(saved),
        })
    }

    fn climb_records(r: &Run) -> Vec<(String, String, u32)> {
        r.log
            .iter()
            .filter_map(|e| match e {
                Effect::Journal(Record::ClimbBack {
                    from,
                    to,
                    climbs_left,
                    ..
                }) => Some((from.clone(), to.clone(), *climbs_left)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn after_a_transient_fall_the_first_newer_checkpoint_climbs_back_without_a_restart_spent() {
        let mut r = Run::new(climbing(DEFAULT_CLIMBS), TWO).start();
        // A memory fault at step 4 on the GPU: down to the CPU (one restart).
        attempt_with(&mut r, 1, Some("c4"), false, FaultClass::GpuMemoryFault);
        assert_eq!(r.spawns(), [(1, 0), (2, 1)]);
        assert_eq!(r.sup.restarts(), 1);
        // The CPU works; output and time alone are no reason to climb.
        r.feed(Event::Spawned {
            attempt: 2,
            checkpoint: Some(PathBuf::from("c4")),
            gpus: Vec::new(),
        });
        let at = r.now;
        r.feed(Event::Progress { attempt: 2, at });
        assert!(signals(&r.advance(Duration::from_secs(3600))).is_empty());
        // Its first newer checkpoint: stopped the usual way, journaled, said.
        let out = saves(&mut r, 2, Some("c4"), "c6");
        assert_eq!(signals(&out), [Sig::Terminate]);
        assert_eq!(climb_records(&r), [("cpu".into(), "gpu".into(), 2)]);
        let said = says(&out);
        assert!(
            said.starts_with("climbing back: attempt 2 on tier `cpu` saved c6"),
            "{said}"
        );
        assert!(
            said.contains("gpu_memory_fault on tier `gpu` at c4"),
            "{said}"
        );
        // Once it is gone, the GPU again at once, from the newest checkpoint: no backoff.
        r.exit(2, JobExit::Signal(15));
        assert_eq!(r.spawns(), [(1, 0), (2, 1), (3, 0)]);
        assert_eq!(r.sup.restarts(), 1, "a climb spends no restart");
        assert_eq!(
            r.sup.attempts()[1].ending.to_string(),
            "stopped to climb back to tier `gpu`"
        );
        r.exit(3, JobExit::Code(0));
        assert_eq!(r.outcome(), Some(Outcome::Succeeded));
    }

    #[test]
    fn a_deterministic_fall_is_never_climbed_back() {
        let mut r = Run::new(climbing(DEFAULT_CLIMBS), TWO).start();
        // A GPU reset restarts once; the same from the same checkpoint again is deterministic.
        attempt_with(&mut r, 1, Some("c4"), false, FaultClass::GpuReset);
        attempt_with(&mut r, 2, Some("c4"), false, FaultClass::GpuReset);
        assert_eq!(r.spawns(), [(1, 0), (2, 0), (3, 1)]);
        let out = saves(&mut r, 3, Some("c4"), "c6");
        assert!(signals(&out).is_empty());
        assert!(climb_records(&r).is_empty());
    }

    #[test]
    fn a_class_that_rules_out_the_gpu_is_never_climbed_back() {
        let mut r = Run::new(climbing(DEFAULT_CLIMBS), TWO).start();
        attempt_with(
            &mut r,
            1,
            Some("c4"),
            false,
            FaultClass::GpuUnsupportedKernel,
        );
        assert_eq!(r.spawns(), [(1, 0), (2, 1)]);
        assert!(signals(&saves(&mut r, 2, Some("c4"), "c6")).is_empty());
    }

    #[test]
    fn a_run_that_starts_below_the_top_never_climbs_above_its_start() {
        // A resumed run (and, by construction, one a quirk or the learned tiers moved: their
        // skipped tiers are not on the supervisor's ladder) knows no fall to undo.
        let mut r = Run::new(climbing(DEFAULT_CLIMBS), TWO);
        r.sup.resume_at(4, 1, 2);
        r.feed(Event::Start);
        assert_eq!(r.spawns(), [(4, 1)]);
        assert!(signals(&saves(&mut r, 4, Some("c4"), "c6")).is_empty());
    }

    #[test]
    fn no_ping_pong_a_tier_that_faults_after_a_climb_is_left_for_good() {
        let mut r = Run::new(climbing(DEFAULT_CLIMBS), TWO).start();
        attempt_with(&mut r, 1, Some("c4"), false, FaultClass::GpuMemoryFault);
        saves(&mut r, 2, Some("c4"), "c6");
        r.exit(2, JobExit::Signal(15));
        assert_eq!(r.spawns(), [(1, 0), (2, 1), (3, 0)]);
        // Back on the GPU, the same class again, later in training.
        attempt_with(&mut r, 3, Some("c6"), true, FaultClass::GpuMemoryFault);
        assert_eq!(r.spawns(), [(1, 0), (2, 1), (3, 0), (4, 1)]);
        let out = saves(&mut r, 4, Some("written-by-3"), "c12");
        assert!(signals(&out).is_empty(), "{out:?}");
        assert_eq!(climb_records(&r).len(), 1);
        r.exit(4, JobExit::Code(0));
        assert_eq!(r.outcome(), Some(Outcome::Succeeded));
    }

    #[test]
    fn climbs_are_bounded_per_run_and_off_is_never() {
        // gpu -> gpu-safe -> cpu, both transient (a checkpoint on gpu-safe would have climbed
        // already, so it faults first). With one climb, the first goes to the top;
        // when the top faults again the run falls, and the fall from gpu-safe that is still
        // open is not climbed: the bound is spent. With two, it is.
        let night = |limit: u32| {
            let mut r = Run::new(climbing(limit), THREE).start();
            attempt_with(&mut r, 1, Some("c2"), false, FaultClass::GpuMemoryFault);
            attempt_with(&mut r, 2, Some("c2"), false, FaultClass::GpuException);
            saves(&mut r, 3, Some("c2"), "c8");
            r.exit(3, JobExit::Signal(15));
            attempt_with(&mut r, 4, Some("c8"), true, FaultClass::GpuMemoryFault);
            attempt_with(
                &mut r,
                5,
                Some("written-by-4"),
                false,
                FaultClass::GpuException,
            );
            saves(&mut r, 6, Some("written-by-5"), "c20");
            r
        };
        let one = night(1);
        assert_eq!(climb_records(&one), [("cpu".into(), "gpu".into(), 0)]);
        assert_eq!(
            one.spawns(),
            [(1, 0), (2, 1), (3, 2), (4, 0), (5, 1), (6, 2)]
        );
        let two = night(2);
        assert_eq!(
            climb_records(&two),
            [
                ("cpu".into(), "gpu".into(), 1),
                ("cpu".into(), "gpu-safe".into(), 0)
            ]
        );

        let mut off = Run::new(climbing(0), TWO).start();
        attempt_with(&mut off, 1, Some("c4"), false, FaultClass::GpuMemoryFault);
        assert!(signals(&saves(&mut off, 2, Some("c4"), "c6")).is_empty());
    }

    #[test]
    fn an_attempt_already_being_stopped_does_not_climb() {
        let mut r = Run::new(climbing(DEFAULT_CLIMBS), TWO).start();
        attempt_with(&mut r, 1, Some("c4"), false, FaultClass::GpuMemoryFault);
        r.feed(Event::Fault {
            attempt: 2,
            fault: fault(FaultClass::ProcessCrash, Action::Restart),
        });
        let out = saves(&mut r, 2, Some("c4"), "c6");
        assert!(signals(&out).is_empty());
        assert!(climb_records(&r).is_empty());
    }

    #[test]
    fn only_tiers_above_the_live_one_are_climbed_to() {
        let mut c = Climbs::new(DEFAULT_CLIMBS);
        c.fell(GPU, SAFE, ck("c4"), FaultClass::GpuMemoryFault, None);
        // Already at (or above) the tier the fall left: nothing to climb.
        assert_eq!(c.on_checkpoint(GPU), None);
        assert_eq!(c.on_checkpoint(SAFE).unwrap().to, GPU);
    }
}
