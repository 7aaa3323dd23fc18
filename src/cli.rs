//! The command line, as clap definitions. Turning these raw flags into a validated plan is
//! `gpuwarden::config`'s job; this file only says what can be typed.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

const RUN_EXAMPLE: &str = "\
EXAMPLE:
  gpuwarden run --checkpoints ckpt/ -- python train.py --device {device} --resume {checkpoint}

  Starts `python train.py --device cuda` on the `gpu` tier. If the job prints a GPU fault (say
  `Memory access fault by GPU node-1 ... Reason: Page not present or supervisor privilege.`),
  gpuwarden stops it and starts it again on the `cpu` tier, with every GPU hidden:
  `python train.py --device cpu --resume ckpt/ckpt-step00015.pt` (the newest complete checkpoint).

PLACEHOLDERS (replaced inside each argument, never through a shell):
  {device}      the tier's device (cuda, cpu, ...)
  {checkpoint}  the checkpoint to resume from; without one, `--resume {checkpoint}` is dropped
  {tier}        the tier's name         {attempt}  the attempt number (1, 2, ...)
  {run_dir}     the run directory

The job also gets GPUWARDEN_DEVICE, GPUWARDEN_CHECKPOINT (unset when none), GPUWARDEN_TIER,
GPUWARDEN_ATTEMPT, GPUWARDEN_RUN_DIR, and PYTHONUNBUFFERED=1 unless already set.
";

/// Supervise GPU training jobs: catch GPU faults, stop the job, resume it from the last complete
/// checkpoint down a fallback ladder (GPU -> ... -> CPU).
#[derive(Debug, Parser)]
#[command(name = "gpuwarden", version, after_help = gpuwarden::exit::TABLE)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: boxing `RunArgs` to save a few hundred bytes would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a training command under supervision.
    #[command(after_help = format!("{RUN_EXAMPLE}\n{}", gpuwarden::exit::TABLE))]
    Run(RunArgs),
    /// Watch gpuwarden rescue a built-in training job from a GPU fault (no GPU or Python needed).
    #[command(after_help = gpuwarden::exit::TABLE)]
    Demo(DemoArgs),
    /// Find GPU faults in existing logs (dmesg, journalctl -k, a training log).
    #[command(after_help = SCAN_HELP)]
    Scan(ScanArgs),
    /// Inspect and verify the fault rules.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Check checkpoint files: complete? With the `torch` feature, also loadable by libtorch.
    #[command(subcommand)]
    Checkpoint(CheckpointCommand),
    /// Show this machine's GPUs, GPU software and environment, and which known GPU problems
    /// (rules/quirks.toml) apply. Exits 0 whatever it finds, "no GPU found" included.
    Probe(ProbeArgs),
    /// (internal) The guard that kills the job if gpuwarden is killed.
    #[command(name = "__guard", hide = true)]
    Guard,
    /// (internal) The demo's training job.
    #[command(name = "__demo-job", hide = true)]
    DemoJob(DemoJobArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Where the job writes checkpoints: a directory or a glob (`ckpt/*.pt`).
    #[arg(long, value_name = "PATH")]
    pub checkpoints: Option<String>,
    /// The fallback ladder: tier names, first to last (built-in: gpu, cpu; more in the config).
    #[arg(long, value_name = "TIERS", value_delimiter = ',')]
    pub ladder: Option<Vec<String>>,
    /// Configuration file [default: ./gpuwarden.toml when present]. Flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Run directory for the journal and logs [default: ./gpuwarden-runs/<UTC timestamp>].
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Most restarts before giving up [default: 5].
    #[arg(long, value_name = "N")]
    pub max_restarts: Option<u32>,
    /// Seconds between SIGTERM and SIGKILL when stopping the job [default: 10].
    #[arg(long, value_name = "SECONDS")]
    pub grace: Option<f64>,
    /// A directory of extra rule files (*.toml), added to the built-in rules. Repeatable.
    #[arg(long = "rules", value_name = "DIR")]
    pub rules: Vec<PathBuf>,
    /// Start on the GPU even where a known-bad GPU/driver combination says otherwise.
    #[arg(long)]
    pub force_gpu_unsafe: bool,
    /// Do not follow the kernel log (faults are then seen only in the job's output).
    #[arg(long)]
    pub no_kernel_log: bool,
    /// The kernel log to follow: /dev/kmsg, or a file of records in its format (followed from
    /// its end, for drills and tests).
    #[arg(long, value_name = "PATH", default_value = "/dev/kmsg")]
    pub kernel_log: PathBuf,
    /// Do not sample GPU health (sysfs, nvidia-smi).
    #[arg(long)]
    pub no_health: bool,
    /// Seconds between two GPU health samples.
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0, value_parser = positive_seconds)]
    pub health_interval: f64,
    #[command(flatten)]
    pub machine: MachineArgs,
    #[command(flatten)]
    pub notify: NotifyArgs,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9464 (loopback: only
    /// this machine can scrape; 0.0.0.0:9464 opens it to the network, without authentication).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,
    /// The command to supervise, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<std::ffi::OsString>,
}

/// Who is told when something happens (also `[notify]` in gpuwarden.toml; a flag replaces
/// its key there).
#[derive(Debug, Args)]
#[command(next_help_heading = "Notifications")]
pub struct NotifyArgs {
    /// Run PROGRAM for each notification, with the event as JSON on its stdin and
    /// GPUWARDEN_EVENT set. Never through a shell: give its arguments with --notify-arg.
    #[arg(long, value_name = "PROGRAM")]
    pub notify_cmd: Option<std::ffi::OsString>,
    /// An argument of the --notify-cmd program, kept as one argument. Repeatable, in order.
    #[arg(
        long,
        value_name = "ARG",
        requires = "notify_cmd",
        allow_hyphen_values = true
    )]
    pub notify_arg: Vec<std::ffi::OsString>,
    /// POST each notification as JSON (a `text` field plus the event) to this http:// URL.
    /// Repeatable. No https: use --notify-cmd with curl for that.
    #[arg(long, value_name = "URL")]
    pub webhook: Vec<String>,
    /// Which events notify: fault, fallback, restart, signal, gave_up, interrupted, finished
    /// [default: fault,fallback,gave_up,finished].
    #[arg(long, value_name = "EVENTS", value_delimiter = ',')]
    pub notify_on: Option<Vec<String>>,
}

/// Where the pre-flight probe looks. The defaults are the real machine; tests and containers
/// point them at a simulated tree.
#[derive(Debug, Args)]
pub struct MachineArgs {
    /// Where sysfs is mounted.
    #[arg(long, value_name = "DIR", default_value = "/sys")]
    pub sysfs_root: PathBuf,
    /// The filesystem root under which /opt/rocm*, /usr/local/cuda, /proc/driver/nvidia and
    /// amdgpu.ids are looked for.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// A file of known GPU problems, added to the built-in rules/quirks.toml. Repeatable.
    #[arg(long = "quirks", value_name = "FILE")]
    pub quirks: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Print the probe as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub machine: MachineArgs,
    /// Judge the quirks for this command, as `gpuwarden run` would, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<std::ffi::OsString>,
}

/// A number of seconds, more than 0 and at most a day.
fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 86_400.0 => Ok(s),
        _ => Err(format!(
            "`{text}` is not a number of seconds between 0 (exclusive) and 86400"
        )),
    }
}

const SCAN_HELP: &str = "\
EXAMPLES:
  dmesg | gpuwarden scan
  journalctl -k -b -1 | gpuwarden scan --json
  gpuwarden scan train.log worker-*.log
  gpuwarden scan --kernel          (the kernel's log buffer; needs permission to read /dev/kmsg)

Timestamps and prefixes (dmesg, dmesg -T, syslog/journald, raw /dev/kmsg records, [rank3]:) are
stripped before matching. A multi-line fault (an amdgpu page fault block, a CUDA error with its
hints) is one finding; the same fault repeated (a storm) is one finding with a count.

--json prints one object per finding per line: file, line, end_line (1-based), class, rule,
severity, action, count, text, stream, captures, advice.

EXIT CODES (like grep):
  0  no fault found
  1  faults found
  2  error: an input could not be read, or the rules could not be loaded";

#[derive(Debug, Args)]
pub struct ScanArgs {
    /// Logs to read [default: standard input]; `-` is standard input.
    #[arg(value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Print one JSON object per finding per line.
    #[arg(long)]
    pub json: bool,
    /// Apply only the rules of this stream (stdout, stderr, kernel, tool) [default: every rule].
    #[arg(long, value_name = "STREAM")]
    pub stream: Option<String>,
    /// A directory of extra rule files (*.toml). Repeatable.
    #[arg(long = "rules", value_name = "DIR")]
    pub rules: Vec<PathBuf>,
    /// Use only the rules of --rules directories, not the built-in ones.
    #[arg(long, requires = "rules")]
    pub no_builtin_rules: bool,
    /// Scan the kernel's log buffer (/dev/kmsg, every record still in it) instead of files.
    #[arg(long, conflicts_with = "files")]
    pub kernel: bool,
}

#[derive(Debug, Subcommand)]
pub enum CheckpointCommand {
    /// Verify one checkpoint file: that it is complete and, in a build with the `torch` feature,
    /// that libtorch loads it (lists its tensors: names, shapes, dtypes, bytes).
    #[command(
        after_help = "EXIT CODES:\n  0  the checkpoint verified\n  1  it did not (torn, \
unreadable, or libtorch cannot load it)"
    )]
    Verify {
        /// The checkpoint file (.pt, .pth, .ckpt, .bin, .safetensors).
        file: PathBuf,
        /// Print the result as JSON (with the `torch` feature).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The step at which the demo job's GPU attempt dies with a memory access fault.
    #[arg(long, default_value_t = 17, value_name = "STEP")]
    pub fault_at_step: u32,
    /// Training steps of the demo job.
    #[arg(long, default_value_t = 40, value_name = "N")]
    pub steps: u32,
    /// Milliseconds each training step takes, so the run can be watched.
    #[arg(long, default_value_t = 120, value_name = "MS")]
    pub step_ms: u64,
    /// Run directory [default: ./gpuwarden-runs/<UTC timestamp>].
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Verify rule files: every example must match its rule, no counterexample may, ids unique.
    Check {
        /// A directory of rule files [default: the built-in rules].
        dir: Option<PathBuf>,
    },
    /// List the rules: id, class, action, streams, where defined.
    List {
        /// Also load the rule files of these directories.
        #[arg(long = "rules", value_name = "DIR")]
        rules: Vec<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct DemoJobArgs {
    #[arg(long)]
    pub device: String,
    #[arg(long)]
    pub resume: Option<PathBuf>,
    #[arg(long)]
    pub checkpoint_dir: PathBuf,
    #[arg(long, default_value_t = 40)]
    pub steps: u32,
    #[arg(long, default_value_t = 5)]
    pub checkpoint_every: u32,
    #[arg(long)]
    pub fault_at_step: Option<u32>,
    #[arg(long, default_value_t = 120)]
    pub step_ms: u64,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}
