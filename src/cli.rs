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

// Parsed once at start and moved into its subcommand: the size of the largest variant costs
// nothing worth a Box.
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
    /// Show GPU health live: utilisation, VRAM, temperature, power, ECC, their last 60 s, and
    /// the kernel log's GPU faults (full screen; --once for one sample as a table or JSON).
    #[command(after_help = WATCH_HELP)]
    Watch(WatchArgs),
    /// Show this machine's GPUs, GPU software and environment, and which known GPU problems
    /// (rules/quirks.toml) apply. Exits 0 whatever it finds, "no GPU found" included.
    Probe(ProbeArgs),
    // -- overnight: report and resume (issue 11) --
    /// Show what happened in a run, from its journal: attempts, faults, time per tier, goodput.
    Report(ReportArgs),
    /// Continue a run whose gpuwarden died (reboot, OOM killer, kill -9): same run directory
    /// and journal, the tier and attempt count where it stopped, the newest complete checkpoint.
    #[command(after_help = gpuwarden::exit::TABLE)]
    Resume(ResumeArgs),
    /// Inject a fault into a live run the way a real one arrives, to check the night's setup:
    /// an Xid 31 kernel record naming the live attempt's pid, or a CUDA error line on its stderr.
    Drill(DrillArgs),
    // -- end overnight --
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
    /// Time between SIGTERM and SIGKILL when stopping the job: seconds (`10`) or a duration
    /// (`10s`, `1m30s`, `500ms`) [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = duration_seconds)]
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
    /// Time between two GPU health samples: seconds or a duration (`500ms`, `2s`).
    #[arg(long, value_name = "DURATION", default_value = "1", value_parser = positive_seconds)]
    pub health_interval: f64,
    // -- overnight: stall and restart window (issue 11) --
    /// No progress (no output, no new checkpoint) for this long is a fault (`gpu_hang` on a GPU
    /// tier, `job_stalled` otherwise): `90s`, `20m`, `2h`, `off`, or `auto` / `auto:2h`: with
    /// --progress, 5x the median step interval once 10 heartbeats came, at least
    /// --stall-timeout-floor, at most 20m (or the given ceiling). A number is used as given
    /// [default: auto].
    #[arg(long, value_name = "DURATION")]
    pub stall_timeout: Option<String>,
    /// A stall timeout learned from the heartbeats is never shorter than this [default: 2m].
    #[arg(long, value_name = "DURATION")]
    pub stall_timeout_floor: Option<String>,
    /// After a fall down the ladder for a fault that was not deterministic, go back up to the
    /// tier that faulted once the lower tier has saved a newer checkpoint, at most this many
    /// times per run: a number, or `off` [default: 3 when the command is given {checkpoint},
    /// else off].
    #[arg(long, value_name = "N|off")]
    pub climb_back: Option<String>,
    /// Before a GPU attempt that follows a faulted GPU attempt, wait at most this long for the
    /// GPUs to show the faulted attempt's memory released (`30s`, `off`) [default: 30s].
    #[arg(long, value_name = "DURATION")]
    pub gpu_memory_wait: Option<String>,
    /// Count --max-restarts within this sliding window instead of over the whole run
    /// (`1h`, `off`) [default: off].
    #[arg(long, value_name = "DURATION")]
    pub restart_window: Option<String>,
    /// Only output lines matching this regex count as progress for the stall timeout (for a
    /// job that prints heartbeats among other chatter); without it, any output does.
    #[arg(long, value_name = "REGEX")]
    pub progress: Option<String>,
    /// Forget what earlier runs of this job on this machine taught about the ladder (learned
    /// tiers, kept in $XDG_STATE_HOME/gpuwarden) and try every tier again.
    #[arg(long)]
    pub forget: bool,
    // -- end overnight --
    /// When a fault names some of the job's GPUs, go down the ladder at once instead of first
    /// restarting on the same tier with those GPUs hidden.
    #[arg(long)]
    pub no_gpu_exclusion: bool,
    /// The fewest GPUs the job may run on: an exclusion that would leave fewer goes down the
    /// ladder instead [default: 1].
    #[arg(long, value_name = "N")]
    pub min_gpus: Option<u32>,
    #[command(flatten)]
    pub machine: MachineArgs,
    // The live display (src/ui/).
    /// Show the live display while supervising: GPU health, the job, its output, faults. Keys:
    /// q leave it, s stop the job (asks), p pause, ? help. Without a terminal, runs as without.
    #[arg(long)]
    pub ui: bool,
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
    /// Which events notify: fault, stall, fallback, restart, signal, gave_up, interrupted, finished
    /// [default: fault,fallback,stall,gave_up,finished].
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

// `gpuwarden watch` (the live display, src/ui/).
const WATCH_HELP: &str = "\
KEYS: q or Ctrl-C quit, p pause the fault feed, ? help.

EXAMPLES:
  gpuwarden watch
  gpuwarden watch --once --json | jq '.gpus[].utilization_percent'
  gpuwarden watch --sysfs-root tests/data/sysfs --kernel-log drill.kmsg

EXIT CODES:
  0  done (q, Ctrl-C, or one sample printed)
  2  usage: the full-screen display needs a terminal (use --once), or bad flags";

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Print one sample of every GPU and exit (a table, or JSON with --json).
    #[arg(long)]
    pub once: bool,
    /// With --once: print JSON.
    #[arg(long, requires = "once")]
    pub json: bool,
    /// Seconds between two GPU health samples.
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0, value_parser = positive_seconds)]
    pub interval: f64,
    /// Where sysfs is mounted (a simulated tree in tests).
    #[arg(long, value_name = "DIR", default_value = "/sys")]
    pub sysfs_root: PathBuf,
    /// The kernel log to follow for GPU faults: /dev/kmsg, or a file of records in its format
    /// (followed from its end).
    #[arg(long, value_name = "PATH", default_value = "/dev/kmsg")]
    pub kernel_log: PathBuf,
    /// Do not follow the kernel log.
    #[arg(long)]
    pub no_kernel_log: bool,
    /// A directory of extra rule files (*.toml) for the fault feed. Repeatable.
    #[arg(long = "rules", value_name = "DIR")]
    pub rules: Vec<PathBuf>,
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

/// A duration more than 0 and at most a day, in seconds.
fn positive_seconds(text: &str) -> Result<f64, String> {
    match duration_seconds(text) {
        Ok(s) if s > 0.0 && s <= 86_400.0 => Ok(s),
        Ok(_) => Err(format!(
            "`{text}` is not between 0 (exclusive) and one day (86400 s)"
        )),
        Err(e) => Err(e),
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

// -- overnight: report and resume (issue 11) --
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The run directory (or its journal.jsonl).
    #[arg(value_name = "RUN_DIR")]
    pub run_dir: PathBuf,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// The run directory of the run to continue.
    #[arg(value_name = "RUN_DIR")]
    pub run_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct DrillArgs {
    /// The run directory of the live run.
    #[arg(value_name = "RUN_DIR")]
    pub run_dir: PathBuf,
    /// `kernel`: an NVRM Xid 31 record naming the job's pid, into the kernel log the run
    /// follows (/dev/kmsg needs root; a --kernel-log file is appended to). `output`: a CUDA
    /// illegal-address line written into the job's own stderr pipe (/proc/PID/fd/2).
    #[arg(long, value_enum, default_value = "kernel")]
    pub kind: DrillKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DrillKind {
    Kernel,
    Output,
}
// -- end overnight --

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
    // The live display (src/ui/).
    /// Tell the demo's story in the live display (see `run --ui`).
    #[arg(long)]
    pub ui: bool,
    /// With --ui: the sysfs tree whose GPUs the display shows [default: a simulated
    /// Radeon RX 6800, made in the run directory].
    #[arg(long, value_name = "DIR", requires = "ui")]
    pub sysfs_root: Option<PathBuf>,
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

// ---- Issue 12: friendlier errors and durations (kept in one block for easy merges) ----

/// Parses the command line like `Cli::parse`, with two errors made clearer than clap makes them:
/// a command given to `run` without `--` (clap only says "unexpected argument"), and a mistyped
/// subcommand too short for clap's own suggestion (`rnu`).
pub fn parse() -> Cli {
    use clap::Parser as _;
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => {
            if let Some(message) = explain(&e, &args) {
                let _ = std::io::Write::write_all(&mut std::io::stderr(), message.as_bytes());
                std::process::exit(gpuwarden::exit::USAGE);
            }
            e.exit()
        }
    }
}

/// A better message for `e`, where there is one.
fn explain(e: &clap::Error, args: &[std::ffi::OsString]) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let words: Vec<String> = args
        .iter()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let invalid = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => Some(s.as_str()),
        _ => None,
    };
    match e.kind() {
        ErrorKind::UnknownArgument
            if words.first().is_some_and(|w| w == "run") && !words.iter().any(|w| w == "--") =>
        {
            let stray = invalid?;
            if stray.starts_with('-') {
                return None;
            }
            let at = words.iter().position(|w| w == stray)?;
            let (options, command) = words.split_at(at);
            Some(format!(
                "error: `{stray}` is not an option of `gpuwarden run`; put the command to supervise after `--`:\n\n  gpuwarden {} -- {}\n\nFor more information, try 'gpuwarden run --help'.\n",
                quote_words(options),
                quote_words(command)
            ))
        }
        ErrorKind::InvalidSubcommand if e.get(ContextKind::SuggestedSubcommand).is_none() => {
            let Some(ContextValue::String(typed)) = e.get(ContextKind::InvalidSubcommand) else {
                return None;
            };
            let near = <Cli as clap::CommandFactory>::command()
                .get_subcommands()
                .filter(|c| !c.is_hide_set())
                .map(|c| c.get_name().to_string())
                .find(|name| one_edit_apart(typed, name))?;
            Some(format!(
                "error: unrecognized subcommand '{typed}'\n\n  tip: a similar subcommand exists: '{near}'\n\nFor more information, try '--help'.\n"
            ))
        }
        _ => None,
    }
}

/// True when `a` becomes `b` by one insertion, deletion, substitution or swap of neighbours.
fn one_edit_apart(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    if a == b {
        return false;
    }
    let prefix = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let (ra, rb) = (&a[prefix..], &b[prefix..]);
    match ra.len() as isize - rb.len() as isize {
        0 => {
            ra[1..] == rb[1..]
                || (ra.len() >= 2 && ra[0] == rb[1] && ra[1] == rb[0] && ra[2..] == rb[2..])
        }
        1 => ra[1..] == *rb,
        -1 => *ra == rb[1..],
        _ => false,
    }
}

/// Words as a POSIX shell would need them, so the suggested line can be pasted.
fn quote_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            let plain = !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,+@%{}".contains(&b));
            if plain {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A duration in seconds: a plain number of seconds (`10`, `2.5`), or numbers with units, largest
/// first, run together (`500ms`, `10s`, `20m`, `1h30m`, `2d`). Every duration flag takes these,
/// so `--grace 10` still means ten seconds.
pub fn duration_seconds(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let bad = |why: &str| {
        format!(
            "`{text}` is not a duration ({why}); give seconds (`10`, `2.5`) or e.g. `500ms`, `10s`, `20m`, `1h30m`"
        )
    };
    if t.is_empty() {
        return Err(bad("it is empty"));
    }
    if let Ok(secs) = t.parse::<f64>() {
        return if secs.is_finite() && secs >= 0.0 {
            Ok(secs)
        } else {
            Err(bad("negative or not finite"))
        };
    }
    const UNITS: [(&str, f64); 5] = [
        ("d", 86_400.0),
        ("h", 3_600.0),
        ("m", 60.0),
        ("s", 1.0),
        ("ms", 0.001),
    ];
    let mut rest = t;
    let mut total = 0.0;
    let mut last_rank = None;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| bad("a number without a unit after a unit"))?;
        if digits == 0 {
            return Err(bad("a unit without a number"));
        }
        let number: f64 = rest[..digits]
            .parse()
            .map_err(|_| bad("a malformed number"))?;
        let after = &rest[digits..];
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let unit = &after[..unit_len];
        let rank = UNITS
            .iter()
            .position(|(u, _)| *u == unit)
            .ok_or_else(|| bad(&format!("unknown unit `{unit}`; use ms, s, m, h or d")))?;
        if last_rank.is_some_and(|r| r >= rank) {
            return Err(bad("units must go from largest to smallest, each once"));
        }
        last_rank = Some(rank);
        total += number * UNITS[rank].1;
        rest = &after[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        for (text, secs) in [
            ("10", 10.0),
            ("2.5", 2.5),
            ("10s", 10.0),
            ("500ms", 0.5),
            ("20m", 1200.0),
            ("1h30m", 5400.0),
            ("1h30m15s", 5415.0),
            ("1.5h", 5400.0),
            ("1d", 86_400.0),
            ("0", 0.0),
        ] {
            assert_eq!(duration_seconds(text), Ok(secs), "{text}");
        }
        for bad in [
            "", "s", "10x", "-1", "1m1h", "1s1s", "10 s", "nan", "inf", "1h30", "1..5s",
        ] {
            assert!(duration_seconds(bad).is_err(), "{bad}");
        }
        assert!(
            duration_seconds("10x")
                .unwrap_err()
                .contains("unknown unit `x`")
        );
    }

    #[test]
    fn edits() {
        assert!(one_edit_apart("rnu", "run"));
        assert!(one_edit_apart("rn", "run"));
        assert!(one_edit_apart("runn", "run"));
        assert!(one_edit_apart("rum", "run"));
        assert!(!one_edit_apart("run", "run"));
        assert!(!one_edit_apart("xyz", "run"));
    }

    #[test]
    fn quoting() {
        let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(quote_words(&w(&["python", "-u", "x.py"])), "python -u x.py");
        assert_eq!(quote_words(&w(&["a b", "it's"])), "'a b' 'it'\\''s'");
    }
}
