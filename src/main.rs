//! The `gpuwarden` binary: parse the command line, call the library, map errors to exit codes.

mod cli;

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::Parser;

use gpuwarden::config::{self, Overrides, Plan};
use gpuwarden::executor::Watch;
use gpuwarden::exit;
use gpuwarden::gpu::Gpu;
use gpuwarden::probe::{self, Probe, Verdict};
use gpuwarden::quirks::QuirkSet;
use gpuwarden::rules::RuleSet;
use gpuwarden::sources::health::HealthConfig;
use gpuwarden::sources::health::amd_sysfs::{self, AmdSysfs};
use gpuwarden::sources::kernel::KernelSource;

use cli::{
    CheckpointCommand, Cli, Command, DemoArgs, DemoJobArgs, MachineArgs, ProbeArgs, RulesCommand,
    RunArgs, ScanArgs,
};

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
        Command::Checkpoint(CheckpointCommand::Verify { file, json }) => {
            checkpoint_verify(&file, json)
        }
        Command::Probe(args) => probe(args),
        Command::Guard => gpuwarden::process::guard_main(gpuwarden::executor::GUARD_GRACE),
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
    let mut plan = match config::plan(args.command, overrides, &cwd, &stamp) {
        Ok(plan) => plan,
        Err(e) => {
            error(e);
            return exit::USAGE;
        }
    };
    let (gpus, notes) = inventory(&args.machine);
    let verdict = match preflight(&mut plan, &args.machine, gpus.clone(), notes) {
        Ok(verdict) => verdict,
        Err(code) => return code,
    };
    let kernel = if args.no_kernel_log {
        None
    } else if args.kernel_log.is_file() {
        // A file of /dev/kmsg-format records (a capture, a drill): followed from its end.
        Some(KernelSource::File {
            path: args.kernel_log,
            from_start: false,
        })
    } else {
        Some(KernelSource::Kmsg(args.kernel_log))
    };
    let health = (!args.no_health).then(|| HealthConfig {
        interval: Duration::from_secs_f64(args.health_interval),
        sysfs_root: args.machine.sysfs_root.clone(),
        ..HealthConfig::default()
    });
    let watch = Watch {
        kernel,
        gpus,
        health,
        ..Watch::default()
    };
    supervise(&plan, explicit_run_dir, verdict.as_ref(), watch)
}

/// The seed's GPU safeguard: asks the probe which tier the run starts on, and drops the tiers
/// before it from the ladder. `None` when the first tier uses no GPU (nothing to judge).
fn preflight(
    plan: &mut Plan,
    machine: &MachineArgs,
    gpus: Vec<Gpu>,
    notes: Vec<String>,
) -> Result<Option<Verdict>, i32> {
    let quirks = QuirkSet::load(&machine.quirks).map_err(|e| {
        error(format_args!("{e}\nthe job was not started"));
        exit::USAGE
    })?;
    if !probe::needed(plan) {
        return Ok(None);
    }
    let found = Probe::gather(gpus, notes, &machine.root, &quirks, None);
    let verdict = probe::start_tier(plan, &found, &quirks).map_err(|e| {
        error(e);
        exit::USAGE
    })?;
    plan.ladder.drain(..verdict.start);
    Ok(Some(verdict))
}

/// How long the inventory waits for nvidia-smi (it takes ~20-30 ms a call on a healthy GPU).
const NVIDIA_SMI_TIMEOUT: Duration = Duration::from_secs(10);

/// The GPUs of this machine: AMD from sysfs (marketing names from amdgpu.ids under `root`),
/// NVIDIA from nvidia-smi. The notes say where nothing was found.
fn inventory(machine: &MachineArgs) -> (Vec<Gpu>, Vec<String>) {
    let ids: Vec<PathBuf> = amd_sysfs::AMDGPU_IDS_PATHS
        .iter()
        .map(|p| {
            machine
                .root
                .join(Path::new(p).strip_prefix("/").unwrap_or(Path::new(p)))
        })
        .collect();
    let mut gpus = AmdSysfs::discover(&machine.sysfs_root, &ids).gpus();
    let mut notes = Vec::new();
    match gpuwarden::sources::health::nvidia_inventory(NVIDIA_SMI_TIMEOUT) {
        Ok(nvidia) => gpus.extend(nvidia),
        Err(e) => notes.push(e),
    }
    if gpus.is_empty() {
        notes.push(format!(
            "looked for AMD GPUs in {} (KFD topology, DRM cards) and for NVIDIA GPUs with nvidia-smi",
            machine.sysfs_root.display()
        ));
    }
    (gpus, notes)
}

/// `gpuwarden probe`: the report, or its JSON. A machine without a GPU is not an error.
fn probe(args: ProbeArgs) -> i32 {
    let quirks = match QuirkSet::load(&args.machine.quirks) {
        Ok(q) => q,
        Err(e) => {
            error(e);
            return exit::USAGE;
        }
    };
    let (gpus, notes) = inventory(&args.machine);
    let job = (!args.command.is_empty()).then(|| probe::command_line(&args.command));
    let found = Probe::gather(gpus, notes, &args.machine.root, &quirks, job.as_deref());
    let text = if args.json {
        let with_torch = serde_json::to_value(&found).map(|mut value| {
            if let Some(map) = value.as_object_mut() {
                map.insert("libtorch".to_string(), torch_json());
            }
            value
        });
        match with_torch.and_then(|v| serde_json::to_string_pretty(&v)) {
            Ok(json) => json + "\n",
            Err(e) => {
                error(format_args!("cannot write the probe as JSON: {e}"));
                return exit::INTERNAL;
            }
        }
    } else {
        format!("{}\n{}\n", found.render().trim_end(), torch_section())
    };
    // A closed stdout (`| head`) is not worth a panic.
    let _ = std::io::stdout().write_all(text.as_bytes());
    exit::SUCCESS
}

/// Loads the rules, checks the command, and runs the plan.
fn supervise(
    plan: &Plan,
    explicit_run_dir: bool,
    preflight: Option<&Verdict>,
    watch: Watch,
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
    match gpuwarden::executor::run(plan, rules, explicit_run_dir, preflight, watch) {
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
    // The demo's fault is simulated: the probe has no say in it.
    supervise(&plan, explicit_run_dir, None, Watch::default())
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

/// Writes `rules list`: one line per rule, then the context entries.
fn list_rules(set: &RuleSet) -> std::io::Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    writeln!(
        out,
        "{:<36} {:<24} {:<9} {:<9} streams",
        "id", "class", "severity", "action"
    )?;
    for r in set.rules() {
        let streams: Vec<String> = r.streams.iter().map(|s| s.to_string()).collect();
        writeln!(
            out,
            "{:<36} {:<24} {:<9} {:<9} {}  ({}:{})",
            r.id,
            r.class.as_str(),
            r.severity.to_string(),
            r.action.to_string(),
            streams.join(","),
            r.origin.file,
            r.origin.line
        )?;
    }
    writeln!(
        out,
        "\ncontext entries (lines that join a finding, never start one):"
    )?;
    for c in set.contexts() {
        let classes: Vec<&str> = c.classes.iter().map(|c| c.as_str()).collect();
        writeln!(
            out,
            "{:<36} joins {:<6} {:<24} ({}:{})",
            c.id,
            c.joins.as_str(),
            if classes.is_empty() {
                "any class".to_string()
            } else {
                classes.join(",")
            },
            c.origin.file,
            c.origin.line
        )?;
    }
    out.flush()
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
    if args.kernel {
        return scan_kernel(&rules, stream, args.json);
    }
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
            scan::write_finding(&mut out, args.json, &name, many, finding)
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

/// `scan --kernel`: the records still in the kernel's buffer, as dmesg would print them, through
/// the kernel-log rules (or `stream`'s).
fn scan_kernel(rules: &RuleSet, stream: Option<gpuwarden::rules::Stream>, json: bool) -> i32 {
    use gpuwarden::sources::kernel;
    let backlog = match kernel::read_all(&KernelSource::kmsg()) {
        Ok(backlog) => backlog,
        Err(e) => {
            error(format_args!("cannot read the kernel log: {e}"));
            return scan_exit::ERROR;
        }
    };
    if backlog.lost > 0 {
        let _ = writeln!(
            std::io::stderr(),
            "gpuwarden: {} kernel records were overwritten while the buffer was read",
            backlog.lost
        );
    }
    let mut text = Vec::new();
    for record in &backlog.records {
        let _ = writeln!(
            text,
            "[{:>5}.{:06}] {}",
            record.ts_us / 1_000_000,
            record.ts_us % 1_000_000,
            record.text()
        );
    }
    let name = kernel::DEV_KMSG;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = gpuwarden::scan::scan(
        rules,
        stream.or(Some(gpuwarden::rules::Stream::Kernel)),
        text.as_slice(),
        |finding| gpuwarden::scan::write_finding(&mut out, json, name, false, finding),
    );
    let _ = out.flush();
    match result {
        Ok(summary) => {
            if !json {
                let _ = writeln!(
                    std::io::stderr(),
                    "{name}: {} finding(s) in {} record(s)",
                    summary.findings,
                    summary.lines
                );
            }
            if summary.findings > 0 {
                scan_exit::FOUND
            } else {
                scan_exit::NOTHING
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => scan_exit::FOUND,
        Err(e) => {
            error(e);
            scan_exit::ERROR
        }
    }
}

/// `gpuwarden checkpoint verify FILE`: 0 when the file verified, 1 when it did not.
#[cfg(feature = "torch")]
fn checkpoint_verify(file: &Path, json: bool) -> i32 {
    match gpuwarden::torch::verify_checkpoint(file) {
        Ok(summary) => {
            if json {
                match serde_json::to_string_pretty(&summary) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        error(format_args!("cannot write the summary as JSON: {e}"));
                        return 1;
                    }
                }
            } else {
                println!("{summary}");
            }
            0
        }
        Err(e) => {
            error(e);
            1
        }
    }
}

/// Without libtorch, `verify` still checks completeness, the way `run` does before resuming.
#[cfg(not(feature = "torch"))]
fn checkpoint_verify(file: &Path, json: bool) -> i32 {
    match gpuwarden::checkpoints::validate(file) {
        Ok(format) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "file": file.display().to_string(),
                        "complete": true,
                        "format": format.to_string(),
                        "loaded_with_libtorch": false,
                    })
                );
            } else {
                println!(
                    "{}: complete ({format}); not loaded: this gpuwarden was built without the \
                     `torch` feature (see docs/torch.md)",
                    file.display()
                );
            }
            0
        }
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "file": file.display().to_string(),
                        "complete": false,
                        "problem": e.to_string(),
                        "loaded_with_libtorch": false,
                    })
                );
            }
            error(format_args!(
                "{} is not a complete checkpoint: {e}",
                file.display()
            ));
            1
        }
    }
}

/// What libtorch sees, for `probe --json`: its report, or `null` without the `torch` feature.
fn torch_json() -> serde_json::Value {
    #[cfg(feature = "torch")]
    {
        serde_json::to_value(gpuwarden::torch::report()).unwrap_or(serde_json::Value::Null)
    }
    #[cfg(not(feature = "torch"))]
    {
        serde_json::Value::Null
    }
}

/// The torch section of `gpuwarden probe`. Only `probe` may call it: asking libtorch loads the
/// CUDA driver into gpuwarden, which must not happen in the supervisor.
fn torch_section() -> String {
    #[cfg(feature = "torch")]
    {
        gpuwarden::torch::report().to_string()
    }
    #[cfg(not(feature = "torch"))]
    {
        "libtorch: not built in (build with --features torch to ask libtorch; docs/torch.md)"
            .to_owned()
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
                    "{} rules and context entries in {} files: every example matches, no \
                     counterexample does",
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
                // `rules list | head` closes the pipe: stop quietly, not with a panic.
                let _ = list_rules(&set);
                exit::SUCCESS
            }
            Err(e) => {
                error(e);
                exit::USAGE
            }
        },
    }
}
