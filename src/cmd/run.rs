//! `gpuwarden run`: build the plan, ask the probe where to start, and supervise the job.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use gpuwarden::config::{self, Overrides, Plan};
use gpuwarden::executor::Watch;
use gpuwarden::exit;
use gpuwarden::metrics::MetricsServer;
use gpuwarden::probe::{self, Probe, Verdict};
use gpuwarden::quirks::QuirkSet;
use gpuwarden::rules::RuleSet;
use gpuwarden::sources::health::HealthConfig;

use super::{current_dir, error};
use crate::cli::RunArgs;

pub fn run(args: RunArgs) -> i32 {
    run_with(args, None)
}

/// `run`, or with `resume` the continuation of a run whose gpuwarden died (`gpuwarden resume`:
/// `args` are the original run's flags with its run directory).
pub fn run_with(args: RunArgs, resume: Option<gpuwarden::executor::Resume>) -> i32 {
    let explicit_run_dir = args.run_dir.is_some();
    let overrides = Overrides {
        checkpoints: args.checkpoints,
        ladder: args.ladder,
        run_dir: args.run_dir,
        max_restarts: args.max_restarts,
        grace: args.grace,
        rule_dirs: args.rules,
        force_gpu_unsafe: args.force_gpu_unsafe,
        config: args.config,
        stall_timeout: args.stall_timeout,
        stall_timeout_floor: args.stall_timeout_floor,
        climb_back: args.climb_back,
        gpu_memory_wait: args.gpu_memory_wait,
        restart_window: args.restart_window,
        progress: args.progress,
        notify_command: args.notify.notify_cmd.map(|program| {
            std::iter::once(program)
                .chain(args.notify.notify_arg)
                .collect()
        }),
        webhooks: args.notify.webhook,
        notify_on: args.notify.notify_on,
        no_gpu_exclusion: args.no_gpu_exclusion,
        min_gpus: args.min_gpus,
    };
    let Some(cwd) = current_dir() else {
        return exit::USAGE;
    };
    let stamp = gpuwarden::time::compact(SystemTime::now());
    let mut plan = match config::plan(args.command, overrides, &cwd, &stamp) {
        Ok(plan) => plan,
        Err(e) => {
            error(e);
            return exit::USAGE;
        }
    };
    let machine = &args.machine;
    let (gpus, notes) = probe::inventory(&machine.sysfs_root, &machine.root);
    let quirks = match QuirkSet::load(&machine.quirks) {
        Ok(quirks) => quirks,
        Err(e) => {
            error(format_args!("{e}\nthe job was not started"));
            return exit::USAGE;
        }
    };
    let verdict = match probe::preflight(&mut plan, &quirks, || {
        Probe::gather(gpus.clone(), notes, &machine.root, &quirks, None)
    }) {
        Ok(verdict) => verdict,
        Err(e) => {
            error(e);
            return exit::USAGE;
        }
    };
    let resumed = resume.is_some();
    let learning = super::learned::before(&mut plan, &gpus, &machine.root, args.forget, resumed);
    let kernel = super::kernel_source(args.no_kernel_log, args.kernel_log);
    let health = (!args.no_health).then(|| HealthConfig {
        interval: Duration::from_secs_f64(args.health_interval),
        sysfs_root: args.machine.sysfs_root.clone(),
        ..HealthConfig::default()
    });
    let watch = Watch {
        kernel,
        gpus,
        health,
        resume,
        sysfs_root: Some(machine.sysfs_root.clone()),
        ..Watch::default()
    };
    let metrics = match &args.metrics_addr {
        None => None,
        Some(addr) => match MetricsServer::start(addr, watch.board.clone()) {
            Ok(server) => Some(server),
            Err(e) => {
                error(format_args!(
                    "cannot serve metrics on {addr}: {e}; pick another --metrics-addr (e.g. 127.0.0.1:9465)\nthe job was not started"
                ));
                return exit::USAGE;
            }
        },
    };
    let board = watch.board.clone();
    let code = supervise(&plan, explicit_run_dir, verdict.as_ref(), watch, args.ui);
    if let Some(learning) = learning {
        super::learned::after(learning, &board);
    }
    if let Some(server) = metrics {
        server.stop();
    }
    code
}

/// Loads the rules, checks the command, and runs the plan (for `run` and `demo`).
pub fn supervise(
    plan: &Plan,
    explicit_run_dir: bool,
    preflight: Option<&Verdict>,
    watch: Watch,
    ui: bool,
) -> i32 {
    let rules = match RuleSet::load(&plan.rule_dirs) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            error(format_args!("{e}\nthe job was not started"));
            return exit::USAGE;
        }
    };
    if let Err(e) = gpuwarden::config::check_command(plan) {
        error(e);
        return exit::USAGE;
    }
    let board = watch.board.clone();
    let sysfs_root = watch.health.as_ref().map(|h| h.sysfs_root.clone());
    let requests = watch.requests.clone();
    let result = super::watch::around_run(&board, ui, sysfs_root, requests, || {
        gpuwarden::executor::run(plan, rules, explicit_run_dir, preflight, watch)
    });
    match result {
        Ok(outcome) => outcome.exit_code(),
        Err(e) => {
            error(&e);
            e.exit_code()
        }
    }
}
