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

use cli::{Cli, Command, DemoArgs, DemoJobArgs, RulesCommand, RunArgs, ScanArgs};

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
        Command::Scan(args) => scan(args),
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

/// Exit codes of `scan`, like grep's.
mod scan_exit {
    pub const NOTHING: i32 = 0;
    pub const FOUND: i32 = 1;
    pub const ERROR: i32 = 2;
}

fn scan(args: ScanArgs) -> i32 {
    use gpuwarden::rules::Stream;
    use gpuwarden::scan;

    let stream = match args.stream.as_deref().map(|s| (s, Stream::from_name(s))) {
        None => None,
        Some((_, Some(stream))) => Some(stream),
        Some((name, None)) => {
            error(format_args!(
                "unknown stream `{name}`; use one of: stdout, stderr, kernel, tool"
            ));
            return scan_exit::ERROR;
        }
    };
    let rules = if args.no_builtin_rules {
        RuleSet::from_dirs(&args.rules)
    } else {
        RuleSet::load(&args.rules)
    };
    let rules = match rules {
        Ok(rules) => rules,
        Err(e) => {
            error(e);
            return scan_exit::ERROR;
        }
    };
    let files: Vec<PathBuf> = if args.files.is_empty() {
        vec![PathBuf::from("-")]
    } else {
        args.files
    };
    let many = files.len() > 1;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut found = 0usize;
    let mut failed = false;
    for path in &files {
        let name = path.display().to_string();
        let input: Box<dyn std::io::Read> = if name == "-" {
            Box::new(std::io::stdin().lock())
        } else {
            match std::fs::File::open(path) {
                Ok(file) => Box::new(file),
                Err(e) => {
                    error(format_args!("{name}: cannot read: {e}"));
                    failed = true;
                    continue;
                }
            }
        };
        let result = scan::scan(&rules, stream, input, |finding| {
            if args.json {
                let record = scan::Record::new(&name, finding);
                serde_json::to_writer(&mut out, &record).map_err(std::io::Error::other)?;
                writeln!(out)
            } else {
                scan::write_human(&mut out, many.then_some(name.as_str()), finding)
            }
        });
        match result {
            Ok(summary) => {
                found += summary.findings;
                if !args.json {
                    let _ = writeln!(
                        std::io::stderr(),
                        "{name}: {} finding(s) in {} line(s)",
                        summary.findings,
                        summary.lines
                    );
                }
            }
            // `gpuwarden scan log | head`: the reader left after a finding was written to it.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return scan_exit::FOUND,
            Err(e) => {
                error(format_args!("{name}: {e}"));
                failed = true;
            }
        }
    }
    if let Err(e) = out.flush()
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        error(format_args!("cannot write the findings: {e}"));
        failed = true;
    }
    if failed {
        scan_exit::ERROR
    } else if found > 0 {
        scan_exit::FOUND
    } else {
        scan_exit::NOTHING
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
