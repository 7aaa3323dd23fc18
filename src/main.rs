//! The `gpuwarden` binary: parse the command line, call the library, map errors to exit codes.

mod cli;

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::Parser;

use gpuwarden::config::{self, Overrides, Plan};
use gpuwarden::exit;
use gpuwarden::ladder::Tier;
use gpuwarden::rules::RuleSet;

use cli::{Cli, Command, DemoArgs, DemoJobArgs, RulesCommand, RunArgs};

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(args) => run(args),
        Command::Demo(args) => demo(args),
        Command::Rules(cmd) => rules(cmd),
        Command::Guard => gpuwarden::process::guard_main(gpuwarden::app::GUARD_GRACE),
        Command::DemoJob(args) => demo_job(args),
    };
    std::process::exit(code);
}

fn error(message: impl std::fmt::Display) {
    eprintln!("gpuwarden: error: {message:#}");
}

fn run(args: RunArgs) -> i32 {
    let explicit_run_dir = args.run_dir.is_some();
    let grace = match args.grace.map(Duration::try_from_secs_f64).transpose() {
        Ok(g) => g,
        Err(_) => {
            error("--grace must be a number of seconds, 0 or more");
            return exit::USAGE;
        }
    };
    let overrides = Overrides {
        checkpoints: args.checkpoints,
        ladder: args.ladder,
        run_dir: args.run_dir,
        max_restarts: args.max_restarts,
        grace,
        rule_dirs: args.rules,
        force_gpu_unsafe: args.force_gpu_unsafe,
        config: args.config,
    };
    let cwd = match std::env::current_dir() {
        Ok(d) => d,
        Err(e) => {
            error(format_args!("cannot read the current directory: {e}"));
            return exit::USAGE;
        }
    };
    let stamp = gpuwarden::time::compact(SystemTime::now());
    let plan = match config::plan(args.command, overrides, &cwd, &stamp) {
        Ok(plan) => plan,
        Err(e) => {
            error(e);
            return exit::USAGE;
        }
    };
    supervise(&plan, explicit_run_dir)
}

/// Loads the rules, checks the command, and runs the plan.
fn supervise(plan: &Plan, explicit_run_dir: bool) -> i32 {
    let rules = match RuleSet::load(&plan.rule_dirs) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            error(format_args!("{e}\nthe job was not started"));
            return exit::USAGE;
        }
    };
    if let Err(e) = gpuwarden::app::check_command(plan) {
        error(e);
        return exit::USAGE;
    }
    match gpuwarden::app::run(plan, rules, explicit_run_dir) {
        Ok(report) => report.outcome.exit_code(),
        Err(e) => {
            error(e);
            exit::INTERNAL
        }
    }
}

fn demo(args: DemoArgs) -> i32 {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            error(format_args!("cannot find the gpuwarden executable: {e}"));
            return exit::INTERNAL;
        }
    };
    let explicit_run_dir = args.run_dir.is_some();
    let run_dir = args.run_dir.unwrap_or_else(|| {
        PathBuf::from("gpuwarden-runs").join(gpuwarden::time::compact(SystemTime::now()))
    });
    let mut command: Vec<OsString> = vec![exe.into()];
    command.extend(
        [
            "__demo-job",
            "--device",
            "{device}",
            "--resume",
            "{checkpoint}",
            "--checkpoint-dir",
            "{run_dir}/checkpoints",
        ]
        .map(OsString::from),
    );
    for (flag, value) in [
        ("--steps", args.steps.to_string()),
        ("--fault-at-step", args.fault_at_step.to_string()),
        ("--step-ms", args.step_ms.to_string()),
    ] {
        command.push(flag.into());
        command.push(value.into());
    }
    let ladder: Vec<Tier> = ["gpu", "cpu"]
        .into_iter()
        .filter_map(Tier::builtin)
        .collect();
    eprintln!(
        "gpuwarden demo: a small EEG model trains on the `gpu` tier, hits the HSA memory access \
         fault of ROCm on RDNA GPUs at step {}, and gpuwarden resumes it on the `cpu` tier from \
         its last checkpoint.\n",
        args.fault_at_step
    );
    let plan = Plan {
        command,
        checkpoints: Some("{run_dir}/checkpoints".into()),
        ladder,
        run_dir,
        max_restarts: config::DEFAULT_MAX_RESTARTS,
        grace: config::DEFAULT_GRACE,
        backoff_initial: config::DEFAULT_BACKOFF_INITIAL,
        backoff_max: config::DEFAULT_BACKOFF_MAX,
        rule_dirs: Vec::new(),
        force_gpu_unsafe: false,
        config_file: None,
    };
    supervise(&plan, explicit_run_dir)
}

fn demo_job(args: DemoJobArgs) -> i32 {
    let job = gpuwarden::demo::DemoJob {
        device: args.device,
        resume: args.resume,
        checkpoint_dir: args.checkpoint_dir,
        steps: args.steps,
        checkpoint_every: args.checkpoint_every,
        fault_at_step: args.fault_at_step,
        step_delay: Duration::from_millis(args.step_ms),
        seed: args.seed,
    };
    match gpuwarden::demo::run(&job) {
        // The job prints its own progress and final line.
        Ok(_) => exit::SUCCESS,
        Err(e) => {
            eprintln!("[demo] error: {e}");
            1
        }
    }
}

fn rules(cmd: RulesCommand) -> i32 {
    match cmd {
        RulesCommand::Check { dir } => {
            let set = match &dir {
                Some(dir) => RuleSet::from_dir(dir),
                None => RuleSet::builtin(),
            };
            let set = match set {
                Ok(s) => s,
                Err(e) => {
                    error(e);
                    return exit::USAGE;
                }
            };
            let failures = set.check();
            for f in &failures {
                eprintln!("{f}");
            }
            let files: std::collections::BTreeSet<&str> =
                set.rules().iter().map(|r| r.origin.file.as_str()).collect();
            if failures.is_empty() {
                println!(
                    "{} rules in {} files: every example matches its rule, no counterexample does",
                    set.rules().len(),
                    files.len()
                );
                exit::SUCCESS
            } else {
                error(format_args!(
                    "{} problem(s) in {} rules",
                    failures.len(),
                    set.rules().len()
                ));
                exit::USAGE
            }
        }
        RulesCommand::List { rules } => match RuleSet::load(&rules) {
            Ok(set) => {
                println!(
                    "{:<36} {:<24} {:<9} {:<9} streams",
                    "id", "class", "severity", "action"
                );
                for r in set.rules() {
                    let streams: Vec<String> = r.streams.iter().map(|s| s.to_string()).collect();
                    println!(
                        "{:<36} {:<24} {:<9} {:<9} {}  ({}:{})",
                        r.id,
                        r.class.as_str(),
                        format!("{:?}", r.severity).to_lowercase(),
                        format!("{:?}", r.action).to_lowercase(),
                        streams.join(","),
                        r.origin.file,
                        r.origin.line
                    );
                }
                exit::SUCCESS
            }
            Err(e) => {
                error(e);
                exit::USAGE
            }
        },
    }
}
