//! The pre-flight decision, as the journal records it and the console says it: the tier a run
//! starts on and the known GPU problems that put it there. A leaf: the probe that makes it
//! ([`crate::probe::preflight`]) needs the plan and the ladder; the journal that records it
//! must not.

use serde::Serialize;

use crate::quirks::Judgement;

/// What the probe decided about the start of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// No quirk moves the run: it starts on the first tier.
    Clear,
    /// A quirk moved the start down the ladder.
    Moved,
    /// A quirk would have moved it; `--force-gpu-unsafe` kept the first tier.
    Forced,
}

/// The tier a run starts on, and why. The journal records it before attempt 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Index into the plan's ladder of the tier to start on.
    #[serde(skip)]
    pub start: usize,
    pub start_tier: String,
    /// The tiers before it, which this run does not try.
    pub skipped_tiers: Vec<String>,
    pub decision: Decision,
    /// The quirks that applied: those that moved the start (or were overridden), then warnings.
    pub quirks: Vec<Judgement>,
}

impl Verdict {
    /// Whether there is nothing to say or record: the run starts where planned and no known
    /// problem applies. The journal gets a `preflight` line only when this is false, so a
    /// clean machine's journal is the same as before the probe existed.
    pub fn is_silent(&self) -> bool {
        self.decision == Decision::Clear && self.quirks.is_empty()
    }

    /// What to tell the user before the run starts, one line each, without the `gpuwarden:`
    /// prefix: per quirk, what it is, what was found, and what to do.
    pub fn messages(&self) -> Vec<String> {
        let mut out = Vec::new();
        let skipped: Vec<String> = self
            .skipped_tiers
            .iter()
            .map(|t| format!("`{t}`"))
            .collect();
        for j in &self.quirks {
            let what = format!(
                "known GPU problem `{}` ({}): {}",
                j.quirk, j.origin, j.summary
            );
            match (&j.tier, self.decision) {
                (Some(tier), Decision::Moved) if *tier == self.start_tier => {
                    out.push(format!(
                        "starting on tier `{}`, skipping {}: {what}",
                        self.start_tier,
                        skipped.join(", ")
                    ));
                    out.push(format!("  found: {}", j.reasons.join("; ")));
                    out.push(
                        "  to start on the GPU anyway, pass --force-gpu-unsafe (or set \
                         force_gpu_unsafe = true in gpuwarden.toml); a fault still moves the job \
                         down the ladder"
                            .to_string(),
                    );
                }
                (Some(tier), Decision::Forced) => {
                    out.push(format!(
                        "warning: --force-gpu-unsafe: starting on tier `{}` although it would \
                         start on `{tier}` for {what}",
                        self.start_tier
                    ));
                    out.push(format!("  found: {}", j.reasons.join("; ")));
                }
                // A quirk that moved the run to a tier a later quirk then moved it past.
                (Some(tier), _) => {
                    out.push(format!("skipping the tiers before `{tier}`: {what}"));
                    out.push(format!("  found: {}", j.reasons.join("; ")));
                }
                (None, _) => {
                    out.push(format!("warning: {what}"));
                    out.push(format!("  found: {}", j.reasons.join("; ")));
                    out.push(format!("  what to do: {}", j.advice));
                }
            }
        }
        out
    }
}
