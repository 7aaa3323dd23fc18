//! The stall timeout learned from the job's heartbeats (issue 11): with `--progress`, once an
//! attempt has printed enough heartbeats, its stall timeout becomes a multiple of the median
//! step interval, as NVIDIA's resiliency launcher sizes its heartbeat timeout from the intervals
//! it observed, instead of the fixed ceiling.
//!
//! Per attempt, never carried over: a restarted attempt loads its checkpoint and warms up
//! (compiles, tunes kernels) before its first step, which is slower than its steps, and a lower
//! tier steps at its own pace (the CPU is 10x slower). Each attempt runs under the ceiling until
//! its own heartbeats are measured. An explicit numeric `--stall-timeout` is never replaced.

use std::time::Duration;

use super::{Effect, Phase};
use crate::journal::Record;

/// The learned timeout is this many median step intervals.
pub const FACTOR: u32 = 5;

/// Heartbeats needed before the interval is trusted (the executor reports it after ten, or at
/// the end of the output with fewer: those are not learned from).
pub const MIN_HEARTBEATS: u64 = 5;

/// The stall timeout learned from `heartbeats` heartbeats `median` apart: `FACTOR` x `median`,
/// at least `floor`, at most `ceiling`; `None` when too few heartbeats came or it would not
/// change the timeout (`ceiling`) at all.
pub fn learned(
    heartbeats: u64,
    median: Duration,
    floor: Duration,
    ceiling: Duration,
) -> Option<Duration> {
    if heartbeats < MIN_HEARTBEATS {
        return None;
    }
    let timeout = median.saturating_mul(FACTOR).max(floor).min(ceiling);
    (timeout < ceiling).then_some(timeout)
}

impl super::Supervisor {
    /// `attempt`'s heartbeats came `median` apart (over `heartbeats` of them): with learning on,
    /// its stall timeout becomes the learned one; journaled and said when it changes.
    pub(super) fn on_step_interval(
        &mut self,
        attempt: u32,
        heartbeats: u64,
        median: Duration,
        out: &mut Vec<Effect>,
    ) {
        let (Some(floor), Some(ceiling)) = (self.policy.stall_floor, self.policy.stall_timeout)
        else {
            return;
        };
        let Phase::Live(live) = &mut self.phase else {
            return;
        };
        if live.attempt != attempt || live.stall_timeout != Some(ceiling) {
            return;
        }
        let Some(timeout) = learned(heartbeats, median, floor, ceiling) else {
            return;
        };
        // Progress goes on being timed from the last heartbeat.
        live.stall_timeout = Some(timeout);
        out.push(Effect::Journal(Record::StallTimeoutLearned {
            attempt,
            heartbeats,
            median_seconds: median.as_secs_f64(),
            timeout_seconds: timeout.as_secs_f64(),
            floor_seconds: floor.as_secs_f64(),
            ceiling_seconds: ceiling.as_secs_f64(),
        }));
        out.push(Effect::Say(format!(
            "attempt {attempt}: stall timeout learned: {} ({FACTOR}x the median step interval of {median:.2?}, at least {} and at most {})",
            super::span_text(timeout),
            super::span_text(floor),
            super::span_text(ceiling),
        )));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::journal::Record;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn five_times_the_median_within_the_floor_and_the_ceiling() {
        // A step every 10 s: 50 s, above a 30 s floor, under the 20 m ceiling.
        assert_eq!(learned(10, S(10), S(30), S(1200)), Some(S(50)));
        // Fast steps: the floor holds.
        assert_eq!(
            learned(10, Duration::from_millis(100), S(30), S(1200)),
            Some(S(30))
        );
    }

    #[test]
    fn slow_steps_keep_the_ceiling_and_say_nothing() {
        // 5 x 5 min = 25 min > 20 min: the ceiling stays, no change to journal.
        assert_eq!(learned(10, S(300), S(30), S(1200)), None);
        assert_eq!(learned(10, S(240), S(30), S(1200)), None);
    }

    // ---- through the supervisor ----

    use crate::job::{JobExit, Sig};
    use crate::supervisor::tests::{Run, policy, says, signals};
    use crate::supervisor::{Effect, Event, Policy};

    fn learning(floor: Option<Duration>) -> Policy {
        Policy {
            stall_timeout: Some(S(1200)),
            stall_floor: floor,
            ..policy()
        }
    }

    fn heartbeats(r: &mut Run, attempt: u32, median: Duration) -> Vec<Effect> {
        r.feed(Event::StepInterval {
            attempt,
            heartbeats: 10,
            median,
        })
    }

    #[test]
    fn a_learned_timeout_stops_a_hang_long_before_the_ceiling_once_per_attempt() {
        let mut r = Run::new(learning(Some(S(2))), &[("gpu", true), ("cpu", false)]).start();
        let out = heartbeats(&mut r, 1, Duration::from_millis(800));
        // 5 x 0.8 s = 4 s, above the 2 s floor: journaled once and said.
        assert!(
            matches!(
                out.as_slice(),
                [Effect::Journal(Record::StallTimeoutLearned { attempt: 1, timeout_seconds, .. }), Effect::Say(_)]
                    if *timeout_seconds == 4.0
            ),
            "{out:?}"
        );
        assert!(
            says(&out).contains("stall timeout learned: 4.0s"),
            "{}",
            says(&out)
        );
        // A second report in the same attempt changes nothing.
        assert!(heartbeats(&mut r, 1, Duration::from_millis(100)).is_empty());
        assert!(signals(&r.advance(Duration::from_millis(3999))).is_empty());
        assert_eq!(
            signals(&r.advance(Duration::from_millis(1))),
            [Sig::Terminate]
        );
        r.exit(1, JobExit::Signal(15));
        r.advance(S(1));
        // The restarted attempt starts under the ceiling again, until its own heartbeats.
        assert_eq!(r.spawns(), [(1, 0), (2, 0)]);
        assert!(signals(&r.advance(S(600))).is_empty());
        assert!(!heartbeats(&mut r, 2, Duration::from_millis(800)).is_empty());
    }

    #[test]
    fn an_explicit_stall_timeout_is_never_replaced() {
        let mut r = Run::new(learning(None), &[("gpu", true)]).start();
        assert!(heartbeats(&mut r, 1, Duration::from_millis(100)).is_empty());
        assert!(signals(&r.advance(S(1199))).is_empty());
        assert_eq!(signals(&r.advance(S(1))), [Sig::Terminate]);
    }

    #[test]
    fn too_few_heartbeats_teach_nothing() {
        assert_eq!(learned(MIN_HEARTBEATS - 1, S(1), S(1), S(1200)), None);
        assert!(learned(MIN_HEARTBEATS, S(1), S(1), S(1200)).is_some());
    }
}
