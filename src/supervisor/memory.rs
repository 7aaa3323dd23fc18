//! A GPU free before the next attempt (issue 11): after a fault the driver may hold the dead
//! attempt's memory for seconds, and an attempt started onto it fails again (an OOM at its first
//! allocation, or the same fault). Before an attempt on a GPU tier that follows a faulted GPU
//! attempt, the run waits, bounded, until the GPUs show that memory released.
//!
//! Here is the rule and the waiting, pure: facts in (what the executor read of each GPU), a
//! verdict out, time passed in. The executor gathers: KFD's per-process VRAM and sysfs
//! `mem_info_vram_used` on AMD, nvidia-smi's compute apps on NVIDIA.
//!
//! The rule, per GPU: where per-process data can be read, none of the ended attempt's processes
//! holds memory on it; where it cannot, the GPU's VRAM used is back within [`slack`] of what it
//! was before the ended attempt started. A GPU with neither is not waited for. Past the bound
//! the next attempt starts anyway (said, journaled): a night must not stall on a reading.

use std::time::{Duration, Instant};

use super::{Effect, Phase, Supervisor};
use crate::gpu::JobGpu;
use crate::journal::Record;

/// What the executor read of one GPU's memory, at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuMemory {
    /// The GPU's vendor index (for what is said).
    pub index: u32,
    /// The processes holding memory on it, with how much; `None` where per-process data
    /// cannot be read (no KFD process directory, no nvidia-smi).
    pub holders: Option<Vec<(u32, u64)>>,
    /// VRAM used now, and before the ended attempt started.
    pub used: Option<u64>,
    pub before: Option<u64>,
    pub total: Option<u64>,
}

/// How VRAM used may stay above its level before the attempt and still count as released: the
/// driver's and other processes' own use moves a little. 256 MiB, or 2% of the card if more.
pub fn slack(total: Option<u64>) -> u64 {
    (256 << 20).max(total.unwrap_or(0) / 50)
}

/// What the readings say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every GPU that could be read shows the memory released.
    Released(String),
    /// A GPU still shows it (why).
    Held(String),
    /// Nothing could be read of any GPU.
    Unknown,
}

/// The verdict on `gpus` for the ended attempt, whose processes were `pids`.
pub fn judge(gpus: &[GpuMemory], pids: &[u32]) -> Verdict {
    let mut known = Vec::new();
    for g in gpus {
        if let Some(holders) = &g.holders {
            let ours: Vec<String> = holders
                .iter()
                .filter(|(pid, bytes)| *bytes > 0 && pids.contains(pid))
                .map(|(pid, bytes)| format!("pid {pid} holds {}", mib(*bytes)))
                .collect();
            if !ours.is_empty() {
                return Verdict::Held(format!("GPU {}: {}", g.index, ours.join(", ")));
            }
            known.push(format!("GPU {}: no process of the attempt", g.index));
        } else if let (Some(used), Some(before)) = (g.used, g.before) {
            let allowed = before.saturating_add(slack(g.total));
            if used > allowed {
                return Verdict::Held(format!(
                    "GPU {}: {} used, {} before the attempt",
                    g.index,
                    mib(used),
                    mib(before)
                ));
            }
            known.push(format!(
                "GPU {}: {} used, {} before the attempt",
                g.index,
                mib(used),
                mib(before)
            ));
        }
    }
    match known.is_empty() {
        true => Verdict::Unknown,
        false => Verdict::Released(known.join("; ")),
    }
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

/// The wait in progress: `attempt` on `tier` starts once the GPUs `gpus` show the memory of
/// `ended` released, or at `until`.
#[derive(Debug)]
pub(super) struct Wait {
    pub(super) attempt: u32,
    pub(super) tier: usize,
    pub(super) ended: u32,
    pub(super) gpus: Vec<JobGpu>,
    pub(super) since: Instant,
    pub(super) until: Instant,
    /// What the last reading said against starting.
    pub(super) held: Option<String>,
}

impl Supervisor {
    /// While the run waits for GPU memory: the ended attempt and the GPUs to read (the executor
    /// reads them and answers with `Event::GpuMemory`).
    pub fn memory_wait(&self) -> Option<(u32, &[JobGpu])> {
        match &self.phase {
            Phase::MemoryWait(w) => Some((w.ended, &w.gpus)),
            _ => None,
        }
    }

    /// Starts `attempt` on `tier`, first waiting for GPU memory when the attempt before it
    /// faulted on a GPU tier and this one is on a GPU tier too.
    pub(super) fn start_attempt(
        &mut self,
        attempt: u32,
        tier: usize,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        let Some(bound) = self.policy.gpu_memory_wait else {
            return self.spawn(attempt, tier, now, out);
        };
        let on_gpu = |t: usize| self.ladder.get(t).is_some_and(|t| t.uses_gpu);
        let Some(ended) = self.attempts.last() else {
            return self.spawn(attempt, tier, now, out);
        };
        let faulted = matches!(ended.ending, super::Ending::Fault { .. });
        let gpus: Vec<JobGpu> = ended
            .gpus
            .iter()
            .filter(|g| !self.excluded.iter().any(|x| x.key == g.key))
            .cloned()
            .collect();
        if !faulted || !on_gpu(ended.tier) || !on_gpu(tier) || gpus.is_empty() {
            return self.spawn(attempt, tier, now, out);
        }
        out.push(Effect::Say(format!(
            "waiting up to {} for {} to release the memory of attempt {} before attempt {attempt}",
            super::span_text(bound),
            gpu_words(&gpus),
            ended.attempt
        )));
        self.phase = Phase::MemoryWait(Box::new(Wait {
            attempt,
            tier,
            ended: ended.attempt,
            gpus,
            since: now,
            until: now + bound,
            held: None,
        }));
    }

    /// A reading of the GPUs while waiting: the attempt starts when it shows the memory
    /// released, or when nothing could be read at all.
    pub(super) fn on_gpu_memory(
        &mut self,
        ended: u32,
        pids: &[u32],
        gpus: &[GpuMemory],
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        let Phase::MemoryWait(w) = &mut self.phase else {
            return;
        };
        if w.ended != ended {
            return;
        }
        match judge(gpus, pids) {
            Verdict::Held(why) => w.held = Some(why),
            Verdict::Released(detail) => self.end_wait("released", detail, now, out),
            Verdict::Unknown => self.end_wait(
                "unknown",
                "no per-process or VRAM reading of these GPUs".into(),
                now,
                out,
            ),
        }
    }

    /// Past the bound: start anyway, and say so.
    pub(super) fn memory_wait_over(&mut self, now: Instant, out: &mut Vec<Effect>) {
        let Phase::MemoryWait(w) = &self.phase else {
            return;
        };
        if now >= w.until {
            let detail = w.held.clone().unwrap_or_else(|| "no reading came".into());
            self.end_wait("timed_out", detail, now, out);
        }
    }

    fn end_wait(&mut self, outcome: &str, detail: String, now: Instant, out: &mut Vec<Effect>) {
        let Phase::MemoryWait(w) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return;
        };
        let waited = now.saturating_duration_since(w.since);
        out.push(Effect::Journal(Record::GpuMemoryWait {
            attempt: w.attempt,
            gpus: w.gpus.iter().map(|g| g.index).collect(),
            waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
            outcome: outcome.to_string(),
            detail: detail.clone(),
        }));
        let gpus = gpu_words(&w.gpus);
        out.push(Effect::Say(match outcome {
            "released" => format!(
                "{gpus} released the memory of attempt {} after {}",
                w.ended,
                span(waited)
            ),
            "timed_out" => format!(
                "warning: after {} {gpus} still show{} memory of attempt {} ({detail}); starting attempt {} anyway",
                span(waited),
                if w.gpus.len() == 1 { "s" } else { "" },
                w.ended,
                w.attempt
            ),
            _ => format!(
                "cannot tell whether {gpus} released the memory of attempt {} ({detail}); starting attempt {}",
                w.ended, w.attempt
            ),
        }));
        self.spawn(w.attempt, w.tier, now, out);
    }
}

fn span(d: Duration) -> String {
    super::span_text(d)
}

/// `GPU 0`, `GPUs 0,1`.
fn gpu_words(gpus: &[JobGpu]) -> String {
    let list: Vec<String> = gpus.iter().map(|g| g.index.to_string()).collect();
    match list.len() {
        1 => format!("GPU {}", list[0]),
        _ => format!("GPUs {}", list.join(",")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn gpu(holders: Option<Vec<(u32, u64)>>, used: Option<u64>, before: Option<u64>) -> GpuMemory {
        GpuMemory {
            index: 0,
            holders,
            used,
            before,
            total: Some(16 * GIB),
        }
    }

    #[test]
    fn per_process_data_waits_for_the_attempts_own_processes_only() {
        let pids = [100, 101];
        // A worker of the attempt still holds memory: wait.
        let held = judge(
            &[gpu(Some(vec![(101, GIB), (555, GIB)]), None, None)],
            &pids,
        );
        assert!(
            matches!(held, Verdict::Held(ref w) if w.contains("pid 101")),
            "{held:?}"
        );
        // Only someone else's process (a neighbour's job) is left: released, whatever the VRAM.
        let other = judge(
            &[gpu(Some(vec![(555, 8 * GIB)]), Some(9 * GIB), Some(GIB))],
            &pids,
        );
        assert!(matches!(other, Verdict::Released(_)), "{other:?}");
        // A KFD entry with no VRAM left is not holding any.
        assert!(matches!(
            judge(&[gpu(Some(vec![(100, 0)]), None, None)], &pids),
            Verdict::Released(_)
        ));
    }

    #[test]
    fn without_per_process_data_vram_used_must_be_back_near_its_level_before_the_attempt() {
        let before = Some(GIB);
        assert!(matches!(
            judge(&[gpu(None, Some(5 * GIB), before)], &[100]),
            Verdict::Held(_)
        ));
        // Within the slack (2% of 16 GiB = 327 MiB): released.
        let near = GIB + (300 << 20);
        assert!(matches!(
            judge(&[gpu(None, Some(near), before)], &[100]),
            Verdict::Released(_)
        ));
    }

    #[test]
    fn nothing_readable_is_unknown_and_one_gpu_holding_holds_the_start() {
        assert_eq!(judge(&[gpu(None, None, None)], &[1]), Verdict::Unknown);
        assert_eq!(judge(&[], &[1]), Verdict::Unknown);
        let two = [
            gpu(Some(vec![]), None, None),
            GpuMemory {
                index: 1,
                ..gpu(Some(vec![(1, GIB)]), None, None)
            },
        ];
        assert!(matches!(judge(&two, &[1]), Verdict::Held(ref w) if w.starts_with("GPU 1")));
    }

    // ---- through the supervisor ----

    use crate::job::JobExit;
    use crate::rules::{Action, FaultClass};
    use crate::supervisor::tests::{Run, fault, policy, says};
    use crate::supervisor::{Event, Policy};

    fn waiting() -> Policy {
        Policy {
            gpu_memory_wait: Some(Duration::from_secs(30)),
            ..policy()
        }
    }

    /// One GPU machine, `tiers`; attempt 1 ends with a fault of `class`, the backoff is over.
    fn after_fault(tiers: &[(&str, bool)], class: FaultClass, action: Action) -> Run {
        let mut r = Run::with_gpus(waiting(), tiers, 1).start();
        r.feed(Event::Fault {
            attempt: 1,
            fault: fault(class, action),
        });
        r.exit(1, JobExit::Signal(15));
        r.advance(Duration::from_secs(1));
        r
    }

    fn reading(holders: Vec<(u32, u64)>) -> Event {
        Event::GpuMemory {
            ended: 1,
            pids: vec![100, 101],
            gpus: vec![gpu(Some(holders), None, None)],
        }
    }

    fn waits(r: &Run) -> Vec<(String, u64)> {
        r.log
            .iter()
            .filter_map(|e| match e {
                Effect::Journal(Record::GpuMemoryWait {
                    outcome, waited_ms, ..
                }) => Some((outcome.clone(), *waited_ms)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_restart_on_the_gpu_waits_until_the_attempts_processes_let_go() {
        let mut r = after_fault(&[("gpu", true)], FaultClass::GpuHang, Action::Restart);
        assert_eq!(r.spawns(), [(1, 0)], "not before the memory is released");
        let (ended, gpus) = r.sup.memory_wait().unwrap();
        assert_eq!((ended, gpus.len()), (1, 1));
        r.now += Duration::from_millis(400);
        r.feed(reading(vec![(101, GIB)]));
        assert_eq!(r.spawns(), [(1, 0)]);
        r.now += Duration::from_millis(300);
        let out = r.feed(reading(vec![]));
        assert_eq!(r.spawns(), [(1, 0), (2, 0)]);
        assert_eq!(waits(&r), [("released".to_string(), 700)]);
        assert!(
            says(&out).contains("GPU 0 released the memory of attempt 1"),
            "{}",
            says(&out)
        );
    }

    #[test]
    fn past_the_bound_the_attempt_starts_anyway_with_a_warning() {
        let mut r = after_fault(&[("gpu", true)], FaultClass::GpuHang, Action::Restart);
        r.feed(reading(vec![(100, GIB)]));
        assert!(r.advance(Duration::from_millis(29_999)).is_empty());
        let out = r.advance(Duration::from_millis(1));
        assert_eq!(r.spawns(), [(1, 0), (2, 0)]);
        assert_eq!(waits(&r), [("timed_out".to_string(), 30_000)]);
        let said = says(&out);
        assert!(said.starts_with("warning: after 30.0s GPU 0 still shows memory of attempt 1 (GPU 0: pid 100 holds 1024 MiB)"), "{said}");
    }

    #[test]
    fn nothing_to_read_starts_at_once_and_a_cpu_tier_or_a_clean_exit_never_waits() {
        let mut r = after_fault(&[("gpu", true)], FaultClass::GpuHang, Action::Restart);
        r.feed(Event::GpuMemory {
            ended: 1,
            pids: vec![100],
            gpus: vec![gpu(None, None, None)],
        });
        assert_eq!(r.spawns(), [(1, 0), (2, 0)]);
        assert_eq!(waits(&r)[0].0, "unknown");

        let r = after_fault(
            &[("gpu", true), ("cpu", false)],
            FaultClass::GpuMemoryFault,
            Action::Fallback,
        );
        assert_eq!(r.spawns(), [(1, 0), (2, 1)]);
        assert!(r.sup.memory_wait().is_none());

        // Exit 1 with no fault: nothing suggests the driver holds anything.
        let mut r = Run::with_gpus(waiting(), &[("gpu", true)], 1).start();
        r.exit(1, JobExit::Code(1));
        r.advance(Duration::from_secs(1));
        assert_eq!(r.spawns(), [(1, 0), (2, 0)]);
    }

    #[test]
    fn the_slack_is_256_mib_or_two_percent_of_the_card() {
        assert_eq!(slack(None), 256 << 20);
        assert_eq!(slack(Some(8 * GIB)), 256 << 20);
        assert_eq!(slack(Some(80 * GIB)), 80 * GIB / 50);
    }
}
