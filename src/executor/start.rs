//! The run's first journal record: `run_started` for a new run (with what `gpuwarden resume`
//! needs to start it again), or `run_resumed` when `gpuwarden resume` continues one.

use super::{Executor, Input, RunError};
use crate::config::Plan;
use crate::journal::Record;
use crate::probe::Verdict;
use crate::process::{self, Guard};
use crate::rules::Stream;
use crate::sources::health::{self, HealthConfig};
use crate::sources::kernel::KernelSource;
use crate::supervisor::Policy;
use crate::voice::say;

/// Where a resumed run continues, read from its journal by `gpuwarden resume`.
#[derive(Clone, Debug)]
pub struct Resume {
    /// The attempt number to start with (one after the last one journaled).
    pub attempt: u32,
    /// The tier to start on, by name; the first tier of the plan when it is not on the ladder.
    pub tier: String,
    /// Restarts already used by the run.
    pub restarts: u32,
    /// Why the previous gpuwarden is taken to be gone.
    pub reason: String,
    /// The GPUs the run excluded after faults, still excluded: their PCI address, and the
    /// ordinal the attempt that excluded them knew them by.
    pub excluded_pci: Vec<(String, u32)>,
}

/// The supervisor's policy: the plan's settings it decides by.
pub(super) fn policy(plan: &Plan) -> Policy {
    Policy {
        max_restarts: plan.max_restarts,
        grace: plan.grace,
        settle: crate::supervisor::SETTLE,
        backoff_initial: plan.backoff_initial,
        backoff_max: plan.backoff_max,
        stall_timeout: plan.stall_timeout,
        restart_window: plan.restart_window,
        checkpoints_watched: plan.checkpoints.is_some(),
        class_actions: plan.policy.clone(),
        warn_no_checkpoint_after: plan.warn_no_checkpoint_after,
        climb_back: plan.climb_back,
        gpu_memory_wait: plan.gpu_memory_wait,
        stall_floor: plan.stall_learn,
        gpu_exclusion: plan.gpu_exclusion,
        min_gpus: plan.min_gpus,
    }
}

impl Executor<'_> {
    /// Before the first attempt: says the plan's warnings and the pre-flight verdict, warms the
    /// rules, and starts the kernel reader, the health sampler and the guard. A source that
    /// cannot start is a warning: the job is still supervised with what there is.
    pub(super) fn start_watching(
        &mut self,
        preflight: Option<&Verdict>,
        kernel: Option<KernelSource>,
        health: Option<HealthConfig>,
    ) -> Result<(), RunError> {
        for message in self
            .plan
            .warnings
            .iter()
            .cloned()
            .chain(process::inherited_notices())
        {
            self.warn(message)?;
        }
        if let Some(verdict) = preflight.filter(|v| !v.is_silent()) {
            for message in verdict.messages() {
                say(&message);
            }
            self.journal(&Record::Preflight(verdict.clone()))?;
        }
        // Compiled and warmed now, not on the job's first line: a fault that is the first line
        // must not wait for it.
        self.rules.prepare(&[Stream::Stdout, Stream::Stderr]);
        if let Some(source) = kernel {
            self.follow_kernel(source)?;
        }
        if let Some(config) = health {
            match health::spawn(config, health::channel_sink(self.tx.clone(), Input::Health)) {
                Ok(source) => self.health = Some(source),
                Err(e) => self.warn(format!(
                    "cannot start the GPU health sampler ({e}); supervising without it"
                ))?,
            }
        }
        match Guard::spawn() {
            Ok(g) => self.guard = Some(g),
            Err(e) => self.warn(format!(
                "could not start the guard process ({e}): if gpuwarden is killed with SIGKILL, the job's grandchildren may survive it"
            ))?,
        }
        Ok(())
    }

    /// Journals the start (or the resumption) of the run; answers the ladder index a resumed run
    /// continues on.
    pub(super) fn journal_start(
        &mut self,
        resume: Option<&Resume>,
    ) -> Result<Option<usize>, RunError> {
        let plan = self.plan;
        let resume_tier = resume.map(|r| {
            plan.ladder
                .iter()
                .position(|t| t.name == r.tier)
                .unwrap_or(0)
        });
        match resume {
            None => self.journal(&Record::RunStarted {
                command: self.command_words(),
                ladder: plan.ladder.iter().map(|t| t.name.clone()).collect(),
                checkpoints: plan.checkpoints.clone(),
                max_restarts: plan.max_restarts,
                grace_seconds: plan.grace.as_secs_f64(),
                rules: self.rules.rules().len(),
                gpuwarden_pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION"),
                argv: std::env::args_os()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect(),
                cwd: std::env::current_dir().ok(),
                config_file: plan.config_file.clone(),
                stall_timeout_seconds: plan.stall_timeout.map(|d| d.as_secs_f64()),
                restart_window_seconds: plan.restart_window.map(|d| d.as_secs_f64()),
            })?,
            Some(r) => {
                let tier = resume_tier.unwrap_or(0);
                let checkpoint = plan.checkpoints.as_ref().and_then(|spec| {
                    crate::checkpoints::Spec::new(
                        spec,
                        Some(&self.run_dir),
                        std::path::Path::new(""),
                    )
                    .and_then(|s| s.discover())
                    .ok()
                    .and_then(|d| d.newest)
                    .map(|c| c.path)
                });
                say(&format!(
                    "resuming the run in {} as attempt {} on tier `{}`, {} restart(s) left{}",
                    crate::voice::shown_path(&self.run_dir),
                    r.attempt,
                    plan.ladder.get(tier).map_or("?", |t| t.name.as_str()),
                    plan.max_restarts.saturating_sub(r.restarts),
                    match &checkpoint {
                        Some(c) => format!(", from {}", crate::voice::shown_path(c)),
                        None => String::new(),
                    }
                ));
                self.journal(&Record::RunResumed {
                    attempt: r.attempt,
                    tier: plan
                        .ladder
                        .get(tier)
                        .map_or_else(|| r.tier.clone(), |t| t.name.clone()),
                    restarts_left: plan.max_restarts.saturating_sub(r.restarts),
                    checkpoint,
                    gpuwarden_pid: std::process::id(),
                    reason: r.reason.clone(),
                })?
            }
        }
        Ok(resume_tier)
    }
}
