//! The `gpuwarden` binary: parse the command line, call the library, map errors to exit codes.

mod cli;

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::Parser;

use gpuwarden::config::{self, Overrides, Plan};
use gpuwarden::exit;
use gpuwarden::rules::RuleSet;

use cli::{Cli, Command, DemoArgs, DemoJobArgs, RulesCommand, RunArgs};

fn main() {
    let cli = Cli::parse();
    // Before any thread exists (the env_script capture starts some): every thread must inherit
    // the blocked mask, or a SIGTERM could land on one of them and kill gpuwarden outright
    // instead of being forwarded to the job.
    if matches!(cli.command, Command::Run(_) | Command::Demo(_))
        && let Err(e) = gpuwarden::process::block_signals()
    {
        error(format_args!("cannot block signals for forwarding: {e}"));
        std::process::exit(exit::INTERNAL);
    }
    let code = match cli.command {
        Command::Run(args) => run(args),
        Command::Demo(args) => demo(args),
        Command::Rules(cmd) => rules(cmd),
        Command::Guard => gpuwarden::process::guard_main(gpuwarden::app::GUARD_GRACE),
        Command::DemoJob(args) => demo_job(args),
    };
    std::process::exit(code);
}

/// Reports a fatal error. A closed stderr must not turn it into a panic.
fn error(message: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr(), "gpuwarden: error: {message:#}");
}

fn current_dir() -> Option<PathBuf> {
    std::env::current_dir()
        .map_err(|e| error(format_args!("cannot read the current directory: {e}")))
        .ok()
}

fn run(args: RunArgs) -> i32 {
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
    };
    let Some(cwd) = current_dir() else {
        return exit::USAGE;
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
        Ok(outcome) => outcome.exit_code(),
        Err(e) => {
            error(&e);
            e.exit_code()
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
    let mut command: Vec<OsString> = vec![exe.into()];
    command.extend(
        [
            "__demo-job",
            "--device",
            "{device}",
            "--resume",
            "{checkpoint}",
            "--checkpoint-dir",
            config::DEMO_CHECKPOINTS,
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
    let Some(cwd) = current_dir() else {
        return exit::USAGE;
    };
    let stamp = gpuwarden::time::compact(SystemTime::now());
    let plan = config::demo_plan(command, args.run_dir, &cwd, &stamp);
    let _ = writeln!(
        std::io::stderr(),
        "gpuwarden demo: a small EEG model trains on the `gpu` tier, hits the HSA memory access \
         fault of ROCm on RDNA GPUs at step {}, and gpuwarden resumes it on the `cpu` tier from \
         its last checkpoint.\n",
        args.fault_at_step
    );
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
            let check = match &dir {
                Some(dir) => RuleSet::check_dir(dir),
                None => RuleSet::check_builtin(),
            };
            for e in &check.errors {
                error(e);
            }
            for f in &check.failures {
                let _ = writeln!(std::io::stderr(), "{f}");
            }
            if check.passed() {
                println!(
                    "{} rules in {} files: every example matches its rule, no counterexample does",
                    check.rules, check.files
                );
                exit::SUCCESS
            } else {
                error(format_args!(
                    "{} broken file(s) and {} failing example(s) among {} rules in {} files",
                    check.errors.len(),
                    check.failures.len(),
                    check.rules,
                    check.files
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
                        r.severity.to_string(),
                        r.action.to_string(),
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
