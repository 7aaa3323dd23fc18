//! `gpuwarden.toml` plus command-line flags, turned into one validated [`Plan`].
//!
//! Two stages, as ripgrep does with its arguments: serde reads the file into `Raw*` structs that
//! mirror it exactly (unknown keys are errors, and values keep their byte spans), then [`plan`]
//! merges them with the flags ([`Overrides`], which win), fills in defaults, checks everything,
//! and resolves each tier of the ladder into a [`Tier`], sourcing its `env_script` once. Every
//! error says what is wrong, where (file:line:column, or which flag), and what to do.
//!
//! Relative paths (`run_dir`, `rules`, `env_script`, `--config`, `--run-dir`, `--rules`) are
//! relative to the current directory, in the file just as on the command line, so that moving a
//! flag into the file never changes its meaning. `checkpoints` is kept exactly as written: it may
//! be a glob, and joining it to a directory whose name holds `[` or `*` would change the pattern.
//!
//! This module does not parse the command line (cli.rs does), load fault rules (rules/ does; it
//! only collects their directories) or decide anything at run time.
//!
//! ```toml
//! checkpoints = "ckpt/"           # a directory or a glob; may use {run_dir}
//! ladder = ["gpu-sdk", "gpu", "cpu"]
//! run_dir = "runs/eeg"            # relative to the current directory
//! max_restarts = 5
//! grace = 10                      # seconds, fractions allowed, at most 86400
//! backoff = { initial = 1.0, max = 60.0 }     # seconds, at most 86400
//! rules = ["my-rules/"]           # searched before --rules directories
//! force_gpu_unsafe = false
//! gpu_exclusion = true            # a fault on some of the GPUs hides them, keeps the others
//! min_gpus = 1                    # an exclusion never leaves fewer GPUs than this
//! stall_timeout = "20m"           # no output and no new checkpoint this long is a fault; "off";
//!                                 # "auto" (the default): with `progress`, learned from the steps
//! stall_timeout_floor = "2m"      # a learned stall timeout is never shorter than this
//! climb_back = 3                  # climbs back up the ladder per run after a transient fall; "off"
//! gpu_memory_wait = "30s"         # wait this long at most for a faulted attempt's GPU memory; "off"
//! restart_window = "1h"           # max_restarts counts restarts in this window; "off": whole run
//! progress = '^step \d+'         # only output lines matching this count as progress
//!
//! [[tier]]
//! name = "gpu-sdk"
//! device = "cuda"
//! env_script = "/opt/rocm_sdk_612/bin/activate_sdk.sh"
//! env = { HSA_OVERRIDE_GFX_VERSION = "10.3.0" }   # wins over what env_script exports
//! unset = ["PYTORCH_ROCM_ARCH"]                    # applied last
//! args = ["--amp", "off"]
//! uses_gpu = true                 # default: device != "cpu"
//!
//! warn_no_checkpoint_after = "10m"  # an attempt this long without a new checkpoint is a warning
//!
//! [policy]                        # a fault class's action, in place of its rules' action
//! gpu_oom = "restart"             # note, restart, fallback or stop
//!
//! [notify]                        # flags --notify-cmd/--notify-arg, --webhook, --notify-on win
//! command = ["notify-send", "gpuwarden"]       # an argv, never a shell; event JSON on stdin
//! webhook = "http://127.0.0.1:8080/hook"       # or a list; plain http only
//! events = ["fault", "fallback", "stall", "gave_up", "finished"]
//! ```

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::checkpoints::{self, CheckpointError};
use crate::ladder::{self, BUILTIN_TIERS, LadderError, Tier};

/// The file looked for in the current directory when `--config` is not given.
pub const CONFIG_FILE_NAME: &str = "gpuwarden.toml";
/// The ladder when neither the file nor `--ladder` gives one.
pub const DEFAULT_LADDER: [&str; 2] = ["gpu", "cpu"];
pub const DEFAULT_MAX_RESTARTS: u32 = 5;
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_secs(1);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// The largest `grace`, `backoff.initial` or `backoff.max`, in seconds: one day. Anything longer
/// is a typo, and a huge value would overflow the `Instant` arithmetic of the supervisor.
pub const MAX_SECONDS: f64 = 86_400.0;
/// The default `stall_timeout`: 20 minutes. Long enough for the silent stretches of a healthy
/// job (a first-run MIOpen/Triton kernel tuning, loading a large dataset, an evaluation pass that
/// prints only at its end: minutes, rarely above ten), and short enough that a hang at 2 a.m.
/// costs a few percent of an eight-hour night instead of the rest of it. Output of any kind
/// (a tqdm bar, a log line) counts as progress, so most jobs are never near it.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// The default `warn_no_checkpoint_after`: an attempt that ran this long without a new
/// checkpoint (with `checkpoints` watched) is warned about. Ten minutes: jobs that checkpoint at
/// all usually do so every few minutes, and an hour lost to a wrong path is worth a loud line.
pub const DEFAULT_WARN_NO_CHECKPOINT_AFTER: Duration = Duration::from_secs(10 * 60);
/// The default `stall_timeout_floor`: a stall timeout learned from the job's heartbeats is never
/// shorter than two minutes. Heartbeats stop while a job saves a checkpoint or runs an evaluation
/// pass, and only a complete checkpoint counts as progress: two minutes covers the save of a
/// model of a few GB and the evaluation of a small one. A job with longer quiet phases sets it.
pub const DEFAULT_STALL_TIMEOUT_FLOOR: Duration = Duration::from_secs(120);
/// The default `gpu_memory_wait`: how long the next GPU attempt after a faulted one waits at most
/// for the GPUs to show the faulted attempt's memory released. The driver frees a killed
/// process's memory in well under a second normally and in seconds after a fault; 30 s is long
/// beside that and short beside a night.
pub const DEFAULT_GPU_MEMORY_WAIT: Duration = Duration::from_secs(30);
/// The most climbs a run may be allowed (`climb_back`).
pub const MAX_CLIMBS: u32 = 100;
/// The longest `stall_timeout` or `restart_window`: one week.
pub const MAX_WINDOW_SECONDS: u64 = 7 * 86_400;
/// The checkpoints of `gpuwarden demo`: inside its run directory.
pub const DEMO_CHECKPOINTS: &str = "{run_dir}/checkpoints";

/// What the command line gives; `None` (or empty, or false) means "not given".
#[derive(Debug, Default)]
pub struct Overrides {
    pub checkpoints: Option<String>,
    pub ladder: Option<Vec<String>>,
    pub run_dir: Option<PathBuf>,
    pub max_restarts: Option<u32>,
    /// Seconds, as given; [`plan`] checks it exactly as it checks the file's `grace`.
    pub grace: Option<f64>,
    pub rule_dirs: Vec<PathBuf>,
    pub force_gpu_unsafe: bool,
    pub config: Option<PathBuf>,
    // -- overnight (issue 11) --
    /// `--stall-timeout` as typed (`20m`, `90s`, `off`, `auto`, `auto:2h`).
    pub stall_timeout: Option<String>,
    /// `--stall-timeout-floor` as typed (`2m`).
    pub stall_timeout_floor: Option<String>,
    /// `--climb-back` as typed (`3`, `off`).
    pub climb_back: Option<String>,
    /// `--gpu-memory-wait` as typed (`30s`, `off`).
    pub gpu_memory_wait: Option<String>,
    /// `--restart-window` as typed (`1h`, `off`).
    pub restart_window: Option<String>,
    /// `--progress` as typed: a regex for the output lines that count as progress.
    pub progress: Option<String>,
    /// `--notify-cmd` and its `--notify-arg`s: program first.
    pub notify_command: Option<Vec<OsString>>,
    /// `--webhook` URLs, unparsed.
    pub webhooks: Vec<String>,
    /// `--notify-on` event names, unparsed.
    pub notify_on: Option<Vec<String>>,
    // -- many GPUs (issue 14) --
    /// `--no-gpu-exclusion`.
    pub no_gpu_exclusion: bool,
    /// `--min-gpus N`.
    pub min_gpus: Option<u32>,
}

/// Everything a run needs to start, checked.
#[derive(Debug)]
pub struct Plan {
    /// The command template, placeholders not yet expanded. Never empty.
    pub command: Vec<OsString>,
    /// Checkpoint directory or glob, as written: `{run_dir}` in it is still to be replaced.
    pub checkpoints: Option<String>,
    /// The tiers to try, in order, each with its `env_script` already captured. Never empty and
    /// never holds a tier twice.
    pub ladder: Vec<Tier>,
    pub run_dir: PathBuf,
    pub max_restarts: u32,
    /// How long a stopped job gets between SIGTERM and SIGKILL.
    pub grace: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Extra rule directories: the file's first, then `--rules`.
    pub rule_dirs: Vec<PathBuf>,
    pub force_gpu_unsafe: bool,
    /// The config file that was read, if any.
    pub config_file: Option<PathBuf>,
    /// No progress for this long is a fault; `None`: stall detection is off. With
    /// `stall_learn`, the ceiling of the learned timeout.
    pub stall_timeout: Option<Duration>,
    /// Whether the stall timeout is learned from the heartbeats (`--progress`), and its floor:
    /// `Some(floor)` unless a number was given for the stall timeout (or it is `off`).
    pub stall_learn: Option<Duration>,
    /// Climbs back up the ladder allowed per run after transient falls; 0: never.
    pub climb_back: u32,
    /// The longest wait, before a GPU attempt after a faulted GPU attempt, for the GPUs to show
    /// that attempt's memory released; `None`: no wait.
    pub gpu_memory_wait: Option<Duration>,
    /// `max_restarts` counts the restarts of this window (like systemd's
    /// `StartLimitIntervalSec`); `None`: of the whole run.
    pub restart_window: Option<Duration>,
    /// The output lines that count as progress (`--progress`, `progress = "..."`); `None`: any
    /// output does.
    pub progress: Option<regex::Regex>,
    /// `[policy]`: the action for a fault class, in place of what its rules say.
    pub policy: BTreeMap<crate::rules::FaultClass, crate::rules::Action>,
    /// An attempt that ran this long and left no new checkpoint is warned about (only with
    /// `checkpoints`); `None`: never.
    pub warn_no_checkpoint_after: Option<Duration>,
    /// Things that are not errors but that the user should hear about before the night (a
    /// checkpoint location that does not exist yet). Said and journaled at the start.
    pub warnings: Vec<String>,
    /// Who is told about faults and the end of the run.
    pub notify: crate::notify::NotifyPlan,
    /// Whether a fault pinned to some of the job's GPUs hides them and restarts on the same
    /// tier before the ladder goes down (`gpu_exclusion`, `--no-gpu-exclusion`).
    pub gpu_exclusion: bool,
    /// The fewest GPUs an exclusion may leave (`min_gpus`, `--min-gpus`); at least 1.
    pub min_gpus: usize,
}

/// Where a setting came from, for error messages.
#[derive(Clone, Debug, PartialEq)]
pub enum Origin {
    /// A position in the config file; line and column count from 1.
    File {
        path: PathBuf,
        line: usize,
        column: usize,
    },
    /// The config file, where the parser could not name a position.
    WholeFile { path: PathBuf },
    /// A command-line flag, e.g. "--ladder".
    Flag(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, line, column } => {
                write!(f, "{}:{line}:{column}", path.display())
            }
            Origin::WholeFile { path } => write!(f, "{}", path.display()),
            Origin::Flag(flag) => write!(f, "the {flag} flag"),
        }
    }
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no command to supervise; give the command to supervise after `--`, e.g. `gpuwarden run -- python train.py --device {{device}}`"
    )]
    EmptyCommand,

    #[error(
        "the run directory is empty (`--run-dir \"\"` or `run_dir = \"\"`); name a directory, or leave it out for gpuwarden-runs/<time>"
    )]
    EmptyRunDir,

    #[error(
        "config file {} does not exist; fix the --config path, or leave --config out to use ./{CONFIG_FILE_NAME} when there is one",
        path.display()
    )]
    ConfigMissing { path: PathBuf },

    #[error("cannot read config file {} ({source}); make it a readable file or fix the path", path.display())]
    ConfigUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{at}: {message}; fix the config file at that place")]
    Toml { at: Origin, message: String },

    #[error("{at}: the ladder is empty; list at least one tier, e.g. ladder = [\"gpu\", \"cpu\"]")]
    EmptyLadder { at: Origin },

    #[error(
        "{at}: unknown tier `{name}` in the ladder; known tiers are {known}. Fix the name, or define it with a [[tier]] table in {CONFIG_FILE_NAME}"
    )]
    UnknownTier {
        name: String,
        at: Origin,
        known: String,
    },

    #[error(
        "{at}: tier `{name}` appears twice in the ladder; each tier is tried once, so list it once"
    )]
    TierRepeatedInLadder { name: String, at: Origin },

    #[error(
        "{at}: tier `{name}` is defined twice (first at {first}); rename or remove one of the [[tier]] tables"
    )]
    DuplicateTier {
        name: String,
        at: Origin,
        first: Origin,
    },

    #[error(
        "{at}: tier name `{name}` cannot be used; use only letters, digits, `-`, `_` and `.` (names appear in comma-separated --ladder lists and in file names)"
    )]
    BadTierName { name: String, at: Origin },

    #[error(
        "{at}: tier `{tier}` has an empty device; set e.g. device = \"cuda\", \"cuda:1\" or \"cpu\""
    )]
    EmptyDevice { tier: String, at: Origin },

    #[error(
        "{at}: tier `{tier}` names the environment variable `{name}`, which cannot exist; a name must be non-empty and hold no `=` or NUL"
    )]
    BadEnvName {
        tier: String,
        name: String,
        at: Origin,
    },

    #[error(
        "{at}: tier `{tier}` sets `{name}` to a value holding a NUL character, which no environment can carry; remove it"
    )]
    BadEnvValue {
        tier: String,
        name: String,
        at: Origin,
    },

    #[error(
        "{at}: {what} = {value:?} is not allowed; give a number of seconds from 0 to {MAX_SECONDS} (one day)"
    )]
    BadSeconds {
        what: &'static str,
        value: f64,
        at: Origin,
    },

    #[error(
        "{at}: {what} = `{value}` is not a duration; write a number with a unit, e.g. `90s`, `20m`, `2h` (at most a week), or `off`"
    )]
    BadDuration {
        what: &'static str,
        value: String,
        at: Origin,
    },

    #[error(
        "{at}: climb_back = `{value}` is not a number of climbs; write how many times a run may climb back up the ladder after a transient fall, e.g. `3` (at most {MAX_CLIMBS}), or `off`"
    )]
    BadClimbBack { value: String, at: Origin },

    #[error(
        "the command uses {{checkpoint}} but no checkpoint location is given, so it would always be dropped and every restart would start from scratch; add --checkpoints DIR (or checkpoints = \"...\" in {CONFIG_FILE_NAME}) where the job writes its checkpoints"
    )]
    CheckpointPlaceholderWithoutCheckpoints,

    #[error(
        "{at}: backoff initial ({initial} s) is larger than backoff max ({max} s); make max at least as large as initial"
    )]
    BackoffOrder { initial: f64, max: f64, at: Origin },

    #[error(
        "{at}: checkpoints `{spec}` is not a valid glob: {reason} at character {column} of `{pattern}`; fix the pattern, or if a `[`, `*` or `?` is part of a file name, quote it as `[[]`, `[*]` or `[?]`"
    )]
    BadCheckpointsGlob {
        spec: String,
        /// The spec with `{run_dir}` replaced: what is compiled at run time.
        pattern: String,
        reason: &'static str,
        column: usize,
        at: Origin,
    },

    // The ladder error is part of the message rather than a `#[source]`, so printing the chain
    // with `{:#}` does not say it twice.
    #[error("{at}: {message}")]
    Notify { at: Origin, message: String },

    #[error(
        "{at}: the progress regex `{pattern}` is not valid ({reason}); give a regex for the job's heartbeat lines, e.g. '^step \\d+'"
    )]
    Progress {
        pattern: String,
        reason: String,
        at: Origin,
    },

    #[error("{at}: [policy] {message}")]
    Policy { at: Origin, message: String },

    #[error(
        "{at}: min_gpus must be at least 1 (it is the fewest GPUs the job may run on after a faulty one is excluded)"
    )]
    ZeroMinGpus { at: Origin },

    #[error("{at}: tier `{tier}`: {error}")]
    EnvScript {
        tier: String,
        at: Origin,
        error: LadderError,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    checkpoints: Option<Spanned<String>>,
    ladder: Option<Spanned<Vec<Spanned<String>>>>,
    run_dir: Option<PathBuf>,
    max_restarts: Option<u32>,
    grace: Option<Spanned<f64>>,
    backoff: Option<Spanned<RawBackoff>>,
    #[serde(default)]
    rules: Vec<PathBuf>,
    force_gpu_unsafe: Option<bool>,
    gpu_exclusion: Option<bool>,
    min_gpus: Option<Spanned<u32>>,
    stall_timeout: Option<Spanned<String>>,
    stall_timeout_floor: Option<Spanned<String>>,
    climb_back: Option<Spanned<toml::Value>>,
    gpu_memory_wait: Option<Spanned<String>>,
    restart_window: Option<Spanned<String>>,
    progress: Option<Spanned<String>>,
    policy: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    warn_no_checkpoint_after: Option<Spanned<String>>,
    #[serde(default)]
    tier: Vec<Spanned<RawTier>>,
    notify: Option<Spanned<RawNotify>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    command: Option<Spanned<Vec<String>>>,
    webhook: Option<Spanned<OneOrMany>>,
    events: Option<Spanned<Vec<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackoff {
    initial: Option<Spanned<f64>>,
    max: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    name: Spanned<String>,
    device: Spanned<String>,
    env_script: Option<Spanned<PathBuf>>,
    env: Option<Spanned<BTreeMap<String, String>>>,
    unset: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    args: Vec<String>,
    uses_gpu: Option<bool>,
}

/// The config file's text, kept to turn byte spans into lines.
struct Source {
    path: PathBuf,
    text: String,
}

impl Source {
    fn at(&self, span: Range<usize>) -> Origin {
        let bytes = self.text.as_bytes();
        let start = span.start.min(bytes.len());
        let before = &bytes[..start];
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        Origin::File {
            path: self.path.clone(),
            line: before.iter().filter(|&&b| b == b'\n').count() + 1,
            column: String::from_utf8_lossy(&before[line_start..])
                .chars()
                .count()
                + 1,
        }
    }
}

/// A tier as defined (built in or in the file), before its env_script is sourced.
struct TierDef {
    tier: Tier,
    env_script: Option<(PathBuf, Origin)>,
    defined_at: Option<Origin>,
}

/// Reads the config file (if any), merges the flags, applies defaults, validates, and sources the
/// `env_script` of every tier in the ladder, once each.
///
/// `cwd` resolves relative paths and is where `gpuwarden.toml` is looked for; `now_utc_stamp`
/// (e.g. `20261126T010203Z`) names the default run directory `gpuwarden-runs/<stamp>`.
pub fn plan(
    command: Vec<OsString>,
    overrides: Overrides,
    cwd: &Path,
    now_utc_stamp: &str,
) -> Result<Plan, ConfigError> {
    if command.first().is_none_or(|program| program.is_empty()) {
        return Err(ConfigError::EmptyCommand);
    }

    let (raw, source) = read_config(overrides.config.as_deref(), cwd)?;

    let mut catalog = builtin_catalog();
    for raw_tier in raw.tier {
        let def = tier_def(raw_tier, source.as_ref(), cwd)?;
        let name = def.tier.name.clone();
        if let Some(first) = catalog.get(&name).and_then(|d| d.defined_at.clone()) {
            return Err(ConfigError::DuplicateTier {
                name,
                at: def.defined_at.unwrap_or(Origin::Flag("--config")),
                first,
            });
        }
        // A file tier may replace a built-in one: a `gpu` with a different device, say.
        catalog.insert(name, def);
    }

    let ladder_names: Vec<(String, Origin)> = match (overrides.ladder, raw.ladder, &source) {
        // Tier names cannot hold commas, so splitting here is safe whether or not the CLI
        // already split `--ladder gpu,cpu`.
        (Some(names), _, _) => names
            .iter()
            .flat_map(|n| n.split(','))
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|n| (n.to_owned(), Origin::Flag("--ladder")))
            .collect(),
        (None, Some(list), Some(src)) => {
            if list.get_ref().is_empty() {
                return Err(ConfigError::EmptyLadder {
                    at: src.at(list.span()),
                });
            }
            list.into_inner()
                .into_iter()
                .map(|n| {
                    let at = src.at(n.span());
                    (n.into_inner(), at)
                })
                .collect()
        }
        _ => DEFAULT_LADDER
            .iter()
            .map(|n| ((*n).to_owned(), Origin::Flag("--ladder")))
            .collect(),
    };
    if ladder_names.is_empty() {
        return Err(ConfigError::EmptyLadder {
            at: Origin::Flag("--ladder"),
        });
    }
    let mut chosen: Vec<(&TierDef, &Origin)> = Vec::with_capacity(ladder_names.len());
    for (i, (name, at)) in ladder_names.iter().enumerate() {
        if ladder_names[..i].iter().any(|(earlier, _)| earlier == name) {
            return Err(ConfigError::TierRepeatedInLadder {
                name: name.clone(),
                at: at.clone(),
            });
        }
        let Some(def) = catalog.get(name) else {
            return Err(ConfigError::UnknownTier {
                name: name.clone(),
                at: at.clone(),
                known: catalog
                    .keys()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        chosen.push((def, at));
    }

    let min_gpus = match (overrides.min_gpus, &raw.min_gpus) {
        (Some(0), _) => {
            return Err(ConfigError::ZeroMinGpus {
                at: Origin::Flag("--min-gpus"),
            });
        }
        (Some(n), _) => n,
        (None, Some(n)) if *n.get_ref() == 0 => {
            return Err(ConfigError::ZeroMinGpus {
                at: origin(source.as_ref(), n.span()),
            });
        }
        (None, Some(n)) => *n.get_ref(),
        (None, None) => 1,
    };
    let grace = match (overrides.grace, raw.grace) {
        (Some(secs), _) => seconds("grace", secs, Origin::Flag("--grace"))?,
        (None, Some(secs)) => file_seconds("grace", secs, source.as_ref())?,
        (None, None) => DEFAULT_GRACE,
    };
    let (backoff_initial, backoff_max) = match raw.backoff {
        None => (DEFAULT_BACKOFF_INITIAL, DEFAULT_BACKOFF_MAX),
        Some(backoff) => {
            let span = backoff.span();
            let backoff = backoff.into_inner();
            let initial = match backoff.initial {
                Some(s) => file_seconds("backoff.initial", s, source.as_ref())?,
                None => DEFAULT_BACKOFF_INITIAL,
            };
            let max = match backoff.max {
                Some(s) => file_seconds("backoff.max", s, source.as_ref())?,
                None => DEFAULT_BACKOFF_MAX,
            };
            if initial > max {
                return Err(ConfigError::BackoffOrder {
                    initial: initial.as_secs_f64(),
                    max: max.as_secs_f64(),
                    at: origin(source.as_ref(), span),
                });
            }
            (initial, max)
        }
    };

    let given_run_dir = overrides.run_dir.or(raw.run_dir);
    if given_run_dir
        .as_ref()
        .is_some_and(|d| d.as_os_str().is_empty())
    {
        return Err(ConfigError::EmptyRunDir);
    }
    let run_dir = resolve_run_dir(given_run_dir, cwd, now_utc_stamp);
    let checkpoints = match (overrides.checkpoints, raw.checkpoints) {
        (Some(spec), _) => Some((spec, Origin::Flag("--checkpoints"))),
        (None, Some(spec)) => {
            let at = origin(source.as_ref(), spec.span());
            Some((spec.into_inner(), at))
        }
        (None, None) => None,
    };
    let mut warnings = Vec::new();
    let resumes = command
        .iter()
        .map(|a| a.to_string_lossy())
        .chain(
            chosen
                .iter()
                .flat_map(|(d, _)| d.tier.args.iter().map(|a| a.as_str().into())),
        )
        .any(|a| a.contains("{checkpoint}"));
    if let Some((spec, at)) = &checkpoints {
        check_checkpoints(spec, at, cwd, &run_dir)?;
        warnings.extend(missing_checkpoint_location(spec, at, cwd));
    } else if resumes {
        return Err(ConfigError::CheckpointPlaceholderWithoutCheckpoints);
    }
    let (stall_timeout, learn) = match (overrides.stall_timeout, raw.stall_timeout) {
        (Some(text), _) => stall("stall_timeout", &text, Origin::Flag("--stall-timeout"))?,
        (None, Some(text)) => {
            let at = origin(source.as_ref(), text.span());
            stall("stall_timeout", text.get_ref(), at)?
        }
        (None, None) => (Some(DEFAULT_STALL_TIMEOUT), true),
    };
    let floor = match (overrides.stall_timeout_floor, raw.stall_timeout_floor) {
        (Some(text), _) => duration(
            "stall_timeout_floor",
            &text,
            Origin::Flag("--stall-timeout-floor"),
        )?,
        (None, Some(text)) => {
            let at = origin(source.as_ref(), text.span());
            duration("stall_timeout_floor", text.get_ref(), at)?
        }
        (None, None) => Some(DEFAULT_STALL_TIMEOUT_FLOOR),
    };
    let stall_learn = (learn && stall_timeout.is_some()).then(|| floor.unwrap_or_default());
    let climb_back = match (overrides.climb_back, raw.climb_back) {
        (Some(text), _) => climbs(&text, Origin::Flag("--climb-back"))?,
        (None, Some(value)) => {
            let at = origin(source.as_ref(), value.span());
            let text = match value.get_ref() {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            climbs(&text, at)?
        }
        // A climb restarts the job from its newest checkpoint: only a command that is given
        // `{checkpoint}` surely resumes from it. Another (one that reads GPUWARDEN_CHECKPOINT,
        // or none) climbs when climb_back is set; by default it would start over on the higher
        // tier and lose what the lower one did.
        (None, None) if resumes && checkpoints.is_some() => {
            crate::supervisor::climb::DEFAULT_CLIMBS
        }
        (None, None) => 0,
    };
    let gpu_memory_wait = match (overrides.gpu_memory_wait, raw.gpu_memory_wait) {
        (Some(text), _) => duration("gpu_memory_wait", &text, Origin::Flag("--gpu-memory-wait"))?,
        (None, Some(text)) => {
            let at = origin(source.as_ref(), text.span());
            duration("gpu_memory_wait", text.get_ref(), at)?
        }
        (None, None) => Some(DEFAULT_GPU_MEMORY_WAIT),
    };
    let restart_window = match (overrides.restart_window, raw.restart_window) {
        (Some(text), _) => duration("restart_window", &text, Origin::Flag("--restart-window"))?,
        (None, Some(text)) => {
            let at = origin(source.as_ref(), text.span());
            duration("restart_window", text.get_ref(), at)?
        }
        (None, None) => None,
    };
    let progress = match (overrides.progress, raw.progress) {
        (Some(text), _) => Some(progress_regex(&text, Origin::Flag("--progress"))?),
        (None, Some(text)) => {
            let at = origin(source.as_ref(), text.span());
            Some(progress_regex(text.get_ref(), at)?)
        }
        (None, None) => None,
    };
    let policy = policy_table(raw.policy.unwrap_or_default(), source.as_ref())?;
    let warn_no_checkpoint_after = match raw.warn_no_checkpoint_after {
        Some(text) => {
            let at = origin(source.as_ref(), text.span());
            duration("warn_no_checkpoint_after", text.get_ref(), at)?
        }
        None => Some(DEFAULT_WARN_NO_CHECKPOINT_AFTER),
    };
    let rule_dirs = raw
        .rules
        .into_iter()
        .chain(overrides.rule_dirs)
        .map(|dir| cwd.join(dir))
        .collect();

    let notify = notify_plan(
        raw.notify,
        overrides.notify_command,
        overrides.webhooks,
        overrides.notify_on,
        source.as_ref(),
    )?;

    // Last, because it runs other people's scripts and may take seconds: every cheap mistake has
    // been reported by now.
    let mut ladder = Vec::with_capacity(chosen.len());
    for (def, _) in chosen {
        ladder.push(resolve_tier(def)?);
    }

    Ok(Plan {
        command,
        checkpoints: checkpoints.map(|(spec, _)| spec),
        ladder,
        run_dir,
        max_restarts: overrides
            .max_restarts
            .or(raw.max_restarts)
            .unwrap_or(DEFAULT_MAX_RESTARTS),
        grace,
        backoff_initial,
        backoff_max,
        rule_dirs,
        force_gpu_unsafe: overrides.force_gpu_unsafe || raw.force_gpu_unsafe.unwrap_or(false),
        config_file: source.map(|s| s.path),
        stall_timeout,
        stall_learn,
        climb_back,
        gpu_memory_wait,
        restart_window,
        progress,
        policy,
        warn_no_checkpoint_after,
        warnings,
        notify,
        gpu_exclusion: !overrides.no_gpu_exclusion && raw.gpu_exclusion.unwrap_or(true),
        min_gpus: min_gpus as usize,
    })
}

/// The `[notify]` table merged with the flags (each flag given replaces its key), checked.
fn notify_plan(
    raw: Option<Spanned<RawNotify>>,
    command: Option<Vec<OsString>>,
    webhooks: Vec<String>,
    notify_on: Option<Vec<String>>,
    source: Option<&Source>,
) -> Result<crate::notify::NotifyPlan, ConfigError> {
    use crate::notify::{Kind, NotifyPlan, Webhook};
    let raw = raw.map(Spanned::into_inner);
    let (raw_command, raw_webhook, raw_events) = match raw {
        Some(r) => (r.command, r.webhook, r.events),
        None => (None, None, None),
    };
    let bad = |at: Origin, message: String| ConfigError::Notify { at, message };
    let command = match (command, raw_command) {
        (Some(argv), _) => Some(argv),
        (None, Some(argv)) => {
            if argv.get_ref().first().is_none_or(|p| p.is_empty()) {
                return Err(bad(
                    origin(source, argv.span()),
                    "notify command is empty; give a program and its arguments, e.g. command = [\"notify-send\", \"gpuwarden\"]".into(),
                ));
            }
            Some(argv.into_inner().into_iter().map(OsString::from).collect())
        }
        (None, None) => None,
    };
    let mut hooks = Vec::new();
    if !webhooks.is_empty() {
        for url in &webhooks {
            hooks.push(Webhook::parse(url).map_err(|m| bad(Origin::Flag("--webhook"), m))?);
        }
    } else if let Some(list) = raw_webhook {
        let at = origin(source, list.span());
        let urls = match list.into_inner() {
            OneOrMany::One(u) => vec![u],
            OneOrMany::Many(us) => us,
        };
        for url in &urls {
            hooks.push(Webhook::parse(url).map_err(|m| bad(at.clone(), m))?);
        }
    }
    let kinds = match (notify_on, raw_events) {
        (Some(names), _) => names
            .iter()
            .flat_map(|n| n.split(','))
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|n| Kind::parse(n).map_err(|m| bad(Origin::Flag("--notify-on"), m)))
            .collect::<Result<Vec<_>, _>>()?,
        (None, Some(names)) => {
            let at = origin(source, names.span());
            names
                .into_inner()
                .iter()
                .map(|n| Kind::parse(n).map_err(|m| bad(at.clone(), m)))
                .collect::<Result<Vec<_>, _>>()?
        }
        (None, None) => Kind::DEFAULT.to_vec(),
    };
    Ok(NotifyPlan {
        command,
        webhooks: hooks,
        kinds,
    })
}

/// The text given for a duration is not one ([`parse_duration`]).
#[derive(Debug, PartialEq, Eq)]
pub struct NotADuration;

/// Reads a duration: a number with a unit (`s`, `m`, `h`, `d`; a bare number is seconds), or
/// `off` (`None`). Zero is `off` too. At most [`MAX_WINDOW_SECONDS`].
pub fn parse_duration(text: &str) -> Result<Option<Duration>, NotADuration> {
    let t = text.trim();
    if matches!(t, "off" | "none" | "never") {
        return Ok(None);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number.parse().map_err(|_| NotADuration)?;
    let scale = match unit.trim() {
        "" | "s" | "sec" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        _ => return Err(NotADuration),
    };
    let secs = value * scale;
    if !(0.0..=MAX_WINDOW_SECONDS as f64).contains(&secs) {
        return Err(NotADuration);
    }
    let d = Duration::try_from_secs_f64(secs).map_err(|_| NotADuration)?;
    Ok((!d.is_zero()).then_some(d))
}

/// The stall timeout: a duration (fixed), `off`, or `auto` / `auto:CEILING` (learned from the
/// heartbeats, at most the ceiling, [`DEFAULT_STALL_TIMEOUT`] unless given). Returns the timeout
/// (the ceiling when learned) and whether it is learned.
fn stall(
    what: &'static str,
    text: &str,
    at: Origin,
) -> Result<(Option<Duration>, bool), ConfigError> {
    let t = text.trim();
    match t.strip_prefix("auto") {
        Some("") => Ok((Some(DEFAULT_STALL_TIMEOUT), true)),
        Some(rest) if rest.starts_with(':') => match parse_duration(&rest[1..]) {
            Ok(Some(ceiling)) => Ok((Some(ceiling), true)),
            // The whole text in the error: `auto:soon`, not `soon`.
            _ => Err(ConfigError::BadDuration {
                what,
                value: text.to_owned(),
                at,
            }),
        },
        _ => Ok((duration(what, text, at)?, false)),
    }
}

/// `climb_back`: a number of climbs (at most [`MAX_CLIMBS`]) or `off` (0).
fn climbs(text: &str, at: Origin) -> Result<u32, ConfigError> {
    let t = text.trim();
    if matches!(t, "off" | "none" | "never") {
        return Ok(0);
    }
    match t.parse::<u32>() {
        Ok(n) if n <= MAX_CLIMBS => Ok(n),
        _ => Err(ConfigError::BadClimbBack {
            value: text.to_owned(),
            at,
        }),
    }
}

fn duration(what: &'static str, text: &str, at: Origin) -> Result<Option<Duration>, ConfigError> {
    parse_duration(text).map_err(|NotADuration| ConfigError::BadDuration {
        what,
        value: text.to_owned(),
        at,
    })
}

/// A warning when the checkpoint location does not exist at start: often a typo, and then every
/// restart would start from scratch. Not an error, since the job may create it. A location in
/// the run directory is made by the run itself and never warned about.
fn missing_checkpoint_location(spec: &str, at: &Origin, cwd: &Path) -> Option<String> {
    if spec.contains(checkpoints::RUN_DIR_PLACEHOLDER) {
        return None;
    }
    // For a glob, the directory part before the first wildcard must exist.
    let cut = spec.find(['*', '?', '[']).unwrap_or(spec.len());
    let fixed = &spec[..cut];
    let dir = if cut < spec.len() {
        // `ckpt/run-*/x.pt` -> `ckpt/`; `*.pt` -> the current directory.
        PathBuf::from(fixed.rfind('/').map_or("", |i| &fixed[..=i]))
    } else {
        PathBuf::from(fixed)
    };
    let dir = if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir
    };
    if cwd.join(&dir).exists() {
        return None;
    }
    Some(format!(
        "{at}: the checkpoint location `{spec}` does not exist yet ({} is missing); if the job does not create it, every restart will start from scratch: check the path",
        cwd.join(&dir).display()
    ))
}

/// The plan of `gpuwarden demo`: `command` (the demo job, never empty) on the default ladder
/// with the default policy, checkpoints in `{run_dir}/checkpoints`, and `run_dir` resolved as
/// [`plan`] resolves `--run-dir`. No config file is read: the demo must behave the same in
/// every directory.
pub fn demo_plan(
    command: Vec<OsString>,
    run_dir: Option<PathBuf>,
    cwd: &Path,
    now_utc_stamp: &str,
) -> Plan {
    Plan {
        command,
        checkpoints: Some(DEMO_CHECKPOINTS.to_owned()),
        ladder: DEFAULT_LADDER
            .iter()
            .filter_map(|name| Tier::builtin(name))
            .collect(),
        run_dir: resolve_run_dir(run_dir, cwd, now_utc_stamp),
        max_restarts: DEFAULT_MAX_RESTARTS,
        grace: DEFAULT_GRACE,
        backoff_initial: DEFAULT_BACKOFF_INITIAL,
        backoff_max: DEFAULT_BACKOFF_MAX,
        rule_dirs: Vec::new(),
        force_gpu_unsafe: false,
        gpu_exclusion: true,
        min_gpus: 1,
        config_file: None,
        stall_timeout: Some(DEFAULT_STALL_TIMEOUT),
        stall_learn: None,
        // The demo shows one rescue; a climb back to the GPU it faulted on would hide it.
        climb_back: 0,
        gpu_memory_wait: None,
        restart_window: None,
        progress: None,
        policy: BTreeMap::new(),
        warn_no_checkpoint_after: Some(DEFAULT_WARN_NO_CHECKPOINT_AFTER),
        warnings: Vec::new(),
        notify: crate::notify::NotifyPlan::default(),
    }
}

/// The `[policy]` table (`gpu_oom = "restart"`), checked: every key a fault class, every value
/// an action as the rules name them.
fn policy_table(
    raw: BTreeMap<Spanned<String>, Spanned<String>>,
    source: Option<&Source>,
) -> Result<BTreeMap<crate::rules::FaultClass, crate::rules::Action>, ConfigError> {
    use crate::rules::{Action, FaultClass};
    let names = |all: &mut dyn Iterator<Item = &'static str>| {
        all.map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
    };
    let mut table = BTreeMap::new();
    for (class, action) in raw {
        let bad = |span: Range<usize>, message: String| ConfigError::Policy {
            at: origin(source, span),
            message,
        };
        let Some(c) = FaultClass::from_name(class.get_ref()) else {
            return Err(bad(
                class.span(),
                format!(
                    "unknown fault class `{}`; the classes are {}",
                    class.get_ref(),
                    names(&mut FaultClass::ALL.iter().map(|c| c.as_str()))
                ),
            ));
        };
        let Some(a) = Action::from_name(action.get_ref()) else {
            return Err(bad(
                action.span(),
                format!(
                    "unknown action `{}` for `{c}`; the actions are {}",
                    action.get_ref(),
                    names(&mut Action::ALL.iter().map(|a| a.as_str()))
                ),
            ));
        };
        table.insert(c, a);
    }
    Ok(table)
}

/// `--progress` or `progress = "..."`, compiled. An empty pattern would match every line (the
/// same as no pattern) and is refused as the likely slip it is.
fn progress_regex(text: &str, at: Origin) -> Result<regex::Regex, ConfigError> {
    let bad = |reason: String| ConfigError::Progress {
        pattern: text.to_owned(),
        reason,
        at: at.clone(),
    };
    if text.is_empty() {
        return Err(bad("it is empty and would match every line".into()));
    }
    regex::Regex::new(text).map_err(|e| match e {
        regex::Error::Syntax(s) => {
            let last = s.lines().last().unwrap_or_default().trim();
            bad(last.strip_prefix("error: ").unwrap_or(last).to_owned())
        }
        other => bad(other.to_string()),
    })
}

/// The run directory: the one given (relative to `cwd`), else `gpuwarden-runs/<stamp>`.
fn resolve_run_dir(given: Option<PathBuf>, cwd: &Path, now_utc_stamp: &str) -> PathBuf {
    match given {
        Some(dir) => cwd.join(dir),
        None => cwd.join("gpuwarden-runs").join(now_utc_stamp),
    }
}

/// Refuses a checkpoints glob that cannot compile, so the mistake shows now and not when an
/// attempt starts. The spec is read exactly as at run time, by `checkpoints::Spec`.
fn check_checkpoints(
    spec: &str,
    at: &Origin,
    cwd: &Path,
    run_dir: &Path,
) -> Result<(), ConfigError> {
    match checkpoints::Spec::new(spec, Some(run_dir), cwd) {
        Err(CheckpointError::BadPattern { pattern, source }) => {
            Err(ConfigError::BadCheckpointsGlob {
                spec: spec.to_owned(),
                pattern,
                reason: source.msg,
                column: source.pos + 1,
                at: at.clone(),
            })
        }
        _ => Ok(()),
    }
}

/// Finds and parses the config file: `--config` if given (it must exist), else
/// `cwd/gpuwarden.toml` when present, else none.
fn read_config(
    explicit: Option<&Path>,
    cwd: &Path,
) -> Result<(RawConfig, Option<Source>), ConfigError> {
    let path = match explicit {
        Some(path) => {
            let path = cwd.join(path);
            if !path.exists() {
                return Err(ConfigError::ConfigMissing { path });
            }
            path
        }
        None => {
            let path = cwd.join(CONFIG_FILE_NAME);
            if !path.exists() {
                return Ok((RawConfig::default(), None));
            }
            path
        }
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::ConfigUnreadable {
        path: path.clone(),
        source,
    })?;
    let source = Source { path, text };
    match toml::from_str::<RawConfig>(&source.text) {
        Ok(raw) => Ok((raw, Some(source))),
        Err(e) => Err(ConfigError::Toml {
            at: match e.span() {
                Some(span) => source.at(span),
                None => Origin::WholeFile {
                    path: source.path.clone(),
                },
            },
            message: e.message().trim_end().to_owned(),
        }),
    }
}

fn builtin_catalog() -> BTreeMap<String, TierDef> {
    BUILTIN_TIERS
        .iter()
        .filter_map(|name| Tier::builtin(name))
        .map(|tier| {
            let def = TierDef {
                tier,
                env_script: None,
                defined_at: None,
            };
            (def.tier.name.clone(), def)
        })
        .collect()
}

fn origin(source: Option<&Source>, span: Range<usize>) -> Origin {
    match source {
        Some(src) => src.at(span),
        // Spans only come from a parsed file, so this is never reached; name the flag that
        // brings the file in rather than panicking.
        None => Origin::Flag("--config"),
    }
}

/// Checks one `[[tier]]` table and turns it into a tier (env_script not yet sourced).
fn tier_def(
    raw: Spanned<RawTier>,
    source: Option<&Source>,
    cwd: &Path,
) -> Result<TierDef, ConfigError> {
    let table_at = origin(source, raw.span());
    let raw = raw.into_inner();
    let name_at = origin(source, raw.name.span());
    let name = raw.name.into_inner();
    let name_ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !name_ok {
        return Err(ConfigError::BadTierName { name, at: name_at });
    }
    let device_at = origin(source, raw.device.span());
    let device = raw.device.into_inner();
    if device.trim().is_empty() {
        return Err(ConfigError::EmptyDevice {
            tier: name,
            at: device_at,
        });
    }

    let (env_at, env) = match raw.env {
        Some(env) => (origin(source, env.span()), env.into_inner()),
        None => (table_at.clone(), BTreeMap::new()),
    };
    let (unset_at, unset) = match raw.unset {
        Some(unset) => (origin(source, unset.span()), unset.into_inner()),
        None => (table_at.clone(), Vec::new()),
    };
    let bad_name = |n: &str| n.is_empty() || n.contains('=') || n.contains('\0');
    for (key, value) in &env {
        if bad_name(key) {
            return Err(ConfigError::BadEnvName {
                tier: name,
                name: key.clone(),
                at: env_at,
            });
        }
        if value.contains('\0') {
            return Err(ConfigError::BadEnvValue {
                tier: name,
                name: key.clone(),
                at: env_at,
            });
        }
    }
    if let Some(key) = unset.iter().find(|n| bad_name(n)) {
        return Err(ConfigError::BadEnvName {
            tier: name,
            name: key.clone(),
            at: unset_at,
        });
    }

    let env_script = raw.env_script.map(|s| {
        let at = origin(source, s.span());
        (cwd.join(s.into_inner()), at)
    });
    Ok(TierDef {
        tier: Tier {
            uses_gpu: raw.uses_gpu.unwrap_or(device != "cpu"),
            name,
            device,
            set_env: env,
            unset_env: unset,
            args: raw.args,
        },
        env_script,
        defined_at: Some(table_at),
    })
}

/// Sources the tier's env_script (if any) and merges: the script's changes first, the config's
/// `env` over them, the config's `unset` last.
fn resolve_tier(def: &TierDef) -> Result<Tier, ConfigError> {
    let (mut set, mut unset) = match &def.env_script {
        None => (BTreeMap::new(), Vec::new()),
        Some((script, at)) => {
            ladder::capture_env_script(script).map_err(|error| ConfigError::EnvScript {
                tier: def.tier.name.clone(),
                at: at.clone(),
                error,
            })?
        }
    };
    for (name, value) in &def.tier.set_env {
        unset.retain(|n| n != name);
        set.insert(name.clone(), value.clone());
    }
    for name in &def.tier.unset_env {
        set.remove(name);
        if !unset.contains(name) {
            unset.push(name.clone());
        }
    }
    Ok(Tier {
        set_env: set,
        unset_env: unset,
        ..def.tier.clone()
    })
}

/// [`seconds`] for a value from the config file.
fn file_seconds(
    what: &'static str,
    value: Spanned<f64>,
    source: Option<&Source>,
) -> Result<Duration, ConfigError> {
    let at = origin(source, value.span());
    seconds(what, value.into_inner(), at)
}

/// Checks a number of seconds from the file or a flag: 0 to [`MAX_SECONDS`]. The one check for
/// every duration setting, so `--grace` and `grace =` accept exactly the same values.
fn seconds(what: &'static str, secs: f64, at: Origin) -> Result<Duration, ConfigError> {
    let bad = || ConfigError::BadSeconds {
        what,
        value: secs,
        at: at.clone(),
    };
    // The range check also refuses NaN; try_from never panics, unlike from_secs_f64.
    if !(0.0..=MAX_SECONDS).contains(&secs) {
        return Err(bad());
    }
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

/// Checks that the command can be started before anything else happens, so a typo is a usage
/// error (exit 2) rather than a failed attempt. Uses the first tier's PATH when it sets one.
pub fn check_command(plan: &Plan) -> Result<(), String> {
    let Some(program) = plan.command.first() else {
        return Err("no command given: put the command to supervise after `--`".into());
    };
    let path_var: Option<OsString> = plan
        .ladder
        .first()
        .and_then(|t| t.set_env.get("PATH").map(OsString::from))
        .or_else(|| std::env::var_os("PATH"));
    let program_path = Path::new(program);
    let found = if program.to_string_lossy().contains('/') {
        if program_path.is_dir() {
            return Err(format!(
                "cannot run `{}`: it is a directory; give the program or script inside it",
                program_path.display()
            ));
        }
        if !is_executable(program_path) {
            return Err(if program_path.is_file() {
                format!(
                    "cannot run `{}`: the file is not executable; `chmod +x` it or run it through its interpreter (`python3 {}`)",
                    program_path.display(),
                    program_path.display()
                )
            } else {
                format!("cannot run `{}`: no such file", program_path.display())
            });
        }
        program_path.to_path_buf()
    } else {
        let in_path = path_var.as_ref().and_then(|p| {
            std::env::split_paths(p)
                .map(|dir| dir.join(program_path))
                .find(|candidate| is_executable(candidate))
        });
        match in_path {
            Some(found) => found,
            None => {
                return Err(format!(
                    "cannot run `{}`: command not found in PATH; check the spelling or give its full path",
                    program_path.display()
                ));
            }
        }
    };
    check_interpreter(&found, path_var.as_deref())
}

/// A script whose `#!` line names an interpreter that is not there fails with "No such file or
/// directory", which names neither: say which interpreter is missing.
fn check_interpreter(script: &Path, path_var: Option<&std::ffi::OsStr>) -> Result<(), String> {
    use std::io::Read;
    let mut head = [0u8; 256];
    let n = std::fs::File::open(script)
        .and_then(|mut f| f.read(&mut head))
        .unwrap_or(0);
    let Some(line) = head[..n].strip_prefix(b"#!") else {
        return Ok(());
    };
    let line = line.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let Some(interpreter) = words.next() else {
        return Ok(());
    };
    let missing = |what: &str| {
        Err(format!(
            "cannot run `{}`: its `#!` line names {what}, which is not installed (or not executable); install it or fix the first line of the script",
            script.display()
        ))
    };
    if !is_executable(Path::new(interpreter)) {
        return missing(&format!("the interpreter `{interpreter}`"));
    }
    // `#!/usr/bin/env NAME`: NAME is looked up in PATH (flags such as `-S` skipped).
    if Path::new(interpreter).file_name() == Some(std::ffi::OsStr::new("env"))
        && let Some(name) = words.find(|w| !w.starts_with('-') && !w.contains('='))
    {
        let found = path_var
            .is_some_and(|p| std::env::split_paths(p).any(|dir| is_executable(&dir.join(name))));
        if !found {
            return missing(&format!("`{name}` (through env), not found in PATH"));
        }
    }
    Ok(())
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const STAMP: &str = "20261126T010203Z";

    fn cmd() -> Vec<OsString> {
        ["python", "train.py", "--device", "{device}"]
            .iter()
            .map(OsString::from)
            .collect()
    }

    fn dir_with_config(text: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE_NAME), text).unwrap();
        dir
    }

    fn plan_in(dir: &Path, overrides: Overrides) -> Result<Plan, ConfigError> {
        plan(cmd(), overrides, dir, STAMP)
    }

    fn err_in(text: &str) -> String {
        let dir = dir_with_config(text);
        let err = plan_in(dir.path(), Overrides::default()).unwrap_err();
        err.to_string()
    }

    fn names(plan: &Plan) -> Vec<&str> {
        plan.ladder.iter().map(|t| t.name.as_str()).collect()
    }

    #[test]
    fn defaults_without_a_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let plan = plan_in(dir.path(), Overrides::default()).unwrap();
        assert_eq!(names(&plan), ["gpu", "cpu"]);
        assert_eq!(plan.ladder[1], Tier::builtin("cpu").unwrap());
        assert_eq!(
            plan.run_dir,
            dir.path().join("gpuwarden-runs").join("20261126T010203Z")
        );
        assert_eq!(plan.max_restarts, 5);
        assert_eq!(plan.grace, Duration::from_secs(10));
        assert_eq!(plan.backoff_initial, Duration::from_secs(1));
        assert_eq!(plan.backoff_max, Duration::from_secs(60));
        assert_eq!(plan.checkpoints, None);
        assert!(plan.rule_dirs.is_empty());
        assert!(!plan.force_gpu_unsafe);
        assert_eq!(plan.config_file, None);
        assert_eq!(plan.command, cmd());
    }

    #[test]
    fn gpu_exclusion_and_min_gpus_from_the_file_and_the_flags() {
        let dir = tempfile::tempdir().unwrap();
        let plan = plan_in(dir.path(), Overrides::default()).unwrap();
        assert!(plan.gpu_exclusion);
        assert_eq!(plan.min_gpus, 1);
        let dir = dir_with_config("gpu_exclusion = false\nmin_gpus = 3\n");
        let plan = plan_in(dir.path(), Overrides::default()).unwrap();
        assert!(!plan.gpu_exclusion);
        assert_eq!(plan.min_gpus, 3);
        let dir = dir_with_config("min_gpus = 3\n");
        let flags = Overrides {
            no_gpu_exclusion: true,
            min_gpus: Some(2),
            ..Overrides::default()
        };
        let plan = plan_in(dir.path(), flags).unwrap();
        assert!(!plan.gpu_exclusion);
        assert_eq!(plan.min_gpus, 2);
        let err = err_in("ladder = [\"gpu\"]\nmin_gpus = 0\n");
        assert!(err.contains("gpuwarden.toml:2:12"), "{err}");
        assert!(err.contains("min_gpus must be at least 1"), "{err}");
    }

    #[test]
    fn full_config_is_read() {
        let dir = dir_with_config(
            r#"
checkpoints = "ckpt/*.pt"
ladder = ["gpu-sdk", "gpu", "cpu"]
run_dir = "runs/eeg"
max_restarts = 2
grace = 2.5
backoff = { initial = 0.5, max = 30 }
rules = ["my-rules/"]
force_gpu_unsafe = true

[[tier]]
name = "gpu-sdk"
device = "cuda:1"
env = { HSA_OVERRIDE_GFX_VERSION = "10.3.0" }
unset = ["PYTORCH_ROCM_ARCH"]
args = ["--amp", "off"]
"#,
        );
        let plan = plan_in(dir.path(), Overrides::default()).unwrap();
        assert_eq!(names(&plan), ["gpu-sdk", "gpu", "cpu"]);
        let sdk = &plan.ladder[0];
        assert_eq!(sdk.device, "cuda:1");
        assert!(sdk.uses_gpu);
        assert_eq!(sdk.set_env["HSA_OVERRIDE_GFX_VERSION"], "10.3.0");
        assert_eq!(sdk.unset_env, ["PYTORCH_ROCM_ARCH"]);
        assert_eq!(sdk.args, ["--amp", "off"]);
        assert_eq!(plan.checkpoints.as_deref(), Some("ckpt/*.pt"));
        assert_eq!(plan.run_dir, dir.path().join("runs/eeg"));
        assert_eq!(plan.max_restarts, 2);
        assert_eq!(plan.grace, Duration::from_millis(2500));
        assert_eq!(plan.backoff_initial, Duration::from_millis(500));
        assert_eq!(plan.backoff_max, Duration::from_secs(30));
        assert_eq!(plan.rule_dirs, [dir.path().join("my-rules/")]);
        assert!(plan.force_gpu_unsafe);
        assert_eq!(plan.config_file, Some(dir.path().join(CONFIG_FILE_NAME)));
    }

    #[test]
    fn flags_override_the_file() {
        let dir = dir_with_config(
            "checkpoints = \"a/\"\nladder = [\"cpu\"]\nrun_dir = \"r\"\nmax_restarts = 9\ngrace = 3\nrules = [\"file-rules\"]\n",
        );
        let plan = plan_in(
            dir.path(),
            Overrides {
                checkpoints: Some("b/".into()),
                ladder: Some(vec!["gpu".into()]),
                run_dir: Some("/abs/run".into()),
                max_restarts: Some(0),
                grace: Some(1.0),
                rule_dirs: vec!["flag-rules".into()],
                force_gpu_unsafe: true,
                config: None,
                stall_timeout: Some("90s".into()),
                restart_window: None,
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(plan.checkpoints.as_deref(), Some("b/"));
        assert_eq!(plan.stall_timeout, Some(Duration::from_secs(90)));
        assert_eq!(names(&plan), ["gpu"]);
        assert_eq!(plan.run_dir, PathBuf::from("/abs/run"));
        assert_eq!(plan.max_restarts, 0);
        assert_eq!(plan.grace, Duration::from_secs(1));
        // File rule dirs come first, then the flags', all relative to cwd.
        assert_eq!(
            plan.rule_dirs,
            [dir.path().join("file-rules"), dir.path().join("flag-rules")]
        );
        assert!(plan.force_gpu_unsafe);
    }

    #[test]
    fn explicit_config_replaces_the_default_file_and_must_exist() {
        let dir = dir_with_config("ladder = [\"cpu\"]\n");
        std::fs::write(dir.path().join("other.toml"), "ladder = [\"gpu\"]\n").unwrap();
        let plan = plan_in(
            dir.path(),
            Overrides {
                config: Some("other.toml".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(names(&plan), ["gpu"]);
        assert_eq!(plan.config_file, Some(dir.path().join("other.toml")));

        let err = plan_in(
            dir.path(),
            Overrides {
                config: Some("missing.toml".into()),
                ..Overrides::default()
            },
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::ConfigMissing { .. }));
        assert!(err.to_string().contains("missing.toml"), "{err}");
    }

    #[test]
    fn file_tier_may_shadow_a_builtin() {
        let dir = dir_with_config("[[tier]]\nname = \"gpu\"\ndevice = \"cuda:1\"\n");
        let plan = plan_in(dir.path(), Overrides::default()).unwrap();
        assert_eq!(plan.ladder[0].device, "cuda:1");
        assert_eq!(plan.ladder[1].device, "cpu");
    }

    #[test]
    fn uses_gpu_defaults_from_device() {
        let dir = dir_with_config(
            "ladder = [\"slow\", \"odd\"]\n[[tier]]\nname = \"slow\"\ndevice = \"cpu\"\n[[tier]]\nname = \"odd\"\ndevice = \"cpu\"\nuses_gpu = true\n",
        );
        let plan = plan_in(dir.path(), Overrides::default()).unwrap();
        assert!(!plan.ladder[0].uses_gpu);
        assert!(plan.ladder[1].uses_gpu);
    }

    #[test]
    fn empty_command_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = plan(Vec::new(), Overrides::default(), dir.path(), STAMP).unwrap_err();
        assert!(err.to_string().contains("after `--`"), "{err}");
        let err = plan(
            vec![OsString::new()],
            Overrides::default(),
            dir.path(),
            STAMP,
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::EmptyCommand));
    }

    #[test]
    fn toml_syntax_error_names_file_and_line() {
        let msg = err_in("max_restarts = 3\ngrace = = 4\n");
        assert!(msg.contains("gpuwarden.toml:2:"), "{msg}");
    }

    #[test]
    fn unknown_key_names_file_and_line() {
        let msg = err_in("max_restarts = 3\n\nmax_restart = 4\n");
        assert!(msg.contains("gpuwarden.toml:3:1"), "{msg}");
        assert!(msg.contains("max_restart"), "{msg}");
        let msg = err_in("[[tier]]\nname = \"x\"\ndevice = \"cuda\"\nenvscript = \"a.sh\"\n");
        assert!(msg.contains("gpuwarden.toml:4:"), "{msg}");
        assert!(msg.contains("envscript"), "{msg}");
    }

    #[test]
    fn wrong_type_names_file_and_line() {
        let msg = err_in("grace = 1\nmax_restarts = -1\n");
        assert!(msg.contains("gpuwarden.toml:2:"), "{msg}");
    }

    #[test]
    fn unknown_tier_lists_the_known_ones() {
        let msg = err_in(
            "ladder = [\"gpu\",\n  \"gpu-sdk\"]\n[[tier]]\nname = \"gpu-rocm\"\ndevice = \"cuda\"\n",
        );
        assert!(msg.contains("gpuwarden.toml:2:3"), "{msg}");
        assert!(msg.contains("unknown tier `gpu-sdk`"), "{msg}");
        assert!(msg.contains("`cpu`, `gpu`, `gpu-rocm`"), "{msg}");

        let dir = tempfile::tempdir().unwrap();
        let err = plan_in(
            dir.path(),
            Overrides {
                ladder: Some(vec!["gpu,tpu".into()]),
                ..Overrides::default()
            },
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("--ladder") && msg.contains("`tpu`"), "{msg}");
    }

    #[test]
    fn duplicate_tier_definitions_are_refused() {
        let msg = err_in(
            "[[tier]]\nname = \"sdk\"\ndevice = \"cuda\"\n\n[[tier]]\nname = \"sdk\"\ndevice = \"cpu\"\n",
        );
        assert!(msg.contains("defined twice"), "{msg}");
        assert!(msg.contains("gpuwarden.toml:5:"), "{msg}");
        assert!(
            msg.contains("first at") && msg.contains("gpuwarden.toml:1:"),
            "{msg}"
        );
    }

    #[test]
    fn empty_ladder_is_refused() {
        let msg = err_in("max_restarts = 1\nladder = []\n");
        assert!(msg.contains("gpuwarden.toml:2:"), "{msg}");
        assert!(msg.contains("ladder is empty"), "{msg}");
        let dir = tempfile::tempdir().unwrap();
        let err = plan_in(
            dir.path(),
            Overrides {
                ladder: Some(Vec::new()),
                ..Overrides::default()
            },
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::EmptyLadder { .. }), "{err}");
        assert!(err.to_string().contains("--ladder"), "{err}");
    }

    #[test]
    fn tier_used_twice_in_the_ladder_is_refused() {
        let msg = err_in("ladder = [\"gpu\", \"cpu\",\n\"gpu\"]\n");
        assert!(msg.contains("appears twice"), "{msg}");
        assert!(msg.contains("gpuwarden.toml:2:1"), "{msg}");
    }

    #[test]
    fn bad_tier_fields_are_refused() {
        let msg = err_in("[[tier]]\nname = \"gpu sdk\"\ndevice = \"cuda\"\n");
        assert!(
            msg.contains("gpuwarden.toml:2:") && msg.contains("`gpu sdk`"),
            "{msg}"
        );
        let msg = err_in("[[tier]]\nname = \"x\"\ndevice = \"\"\n");
        assert!(
            msg.contains("gpuwarden.toml:3:") && msg.contains("empty device"),
            "{msg}"
        );
        let msg = err_in("[[tier]]\nname = \"x\"\ndevice = \"cuda\"\nenv = { \"A=B\" = \"1\" }\n");
        assert!(
            msg.contains("gpuwarden.toml:4:") && msg.contains("`A=B`"),
            "{msg}"
        );
        let msg = err_in("[[tier]]\nname = \"x\"\ndevice = \"cuda\"\nunset = [\"\"]\n");
        assert!(msg.contains("gpuwarden.toml:4:"), "{msg}");
    }

    #[test]
    fn negative_nan_and_infinite_seconds_are_refused() {
        for (text, line, what) in [
            ("max_restarts = 1\ngrace = -1\n", 2, "grace"),
            ("grace = nan\n", 1, "grace"),
            ("grace = inf\n", 1, "grace"),
            ("\nbackoff = { initial = -0.5 }\n", 2, "backoff.initial"),
            ("backoff = { max = nan }\n", 1, "backoff.max"),
        ] {
            let msg = err_in(text);
            assert!(
                msg.contains(&format!("gpuwarden.toml:{line}:")),
                "{text}: {msg}"
            );
            assert!(msg.contains(what), "{text}: {msg}");
        }
        let msg = err_in("backoff = { initial = 10, max = 5 }\n");
        assert!(
            msg.contains("gpuwarden.toml:1:") && msg.contains("larger"),
            "{msg}"
        );
    }

    fn with_grace(dir: &Path, grace: f64) -> Result<Plan, ConfigError> {
        plan_in(
            dir,
            Overrides {
                grace: Some(grace),
                ..Overrides::default()
            },
        )
    }

    #[test]
    fn grace_flag_is_checked_like_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let plan = with_grace(dir.path(), 2.5).unwrap();
        assert_eq!(plan.grace, Duration::from_millis(2500));
        let plan = with_grace(dir.path(), 86_400.0).unwrap();
        assert_eq!(plan.grace, Duration::from_secs(86_400));
        for (bad, shown) in [
            (1e19, "1e19"),
            (86_400.5, "86400.5"),
            (-1.0, "-1.0"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "inf"),
        ] {
            let err = with_grace(dir.path(), bad).unwrap_err();
            assert!(matches!(err, ConfigError::BadSeconds { .. }), "{err}");
            let msg = err.to_string();
            assert!(msg.contains("--grace"), "{msg}");
            assert!(msg.contains(shown), "{msg}");
            assert!(msg.contains("from 0 to 86400"), "{msg}");
        }
    }

    #[test]
    fn durations_in_the_file_are_capped_at_one_day() {
        for (text, line, what) in [
            ("max_restarts = 1\ngrace = 1e19\n", 2, "grace = 1e19"),
            ("backoff = { max = 86401 }\n", 1, "backoff.max = 86401.0"),
            (
                "\n\nbackoff = { initial = 1e6, max = 1e7 }\n",
                3,
                "backoff.initial = 1000000.0",
            ),
        ] {
            let msg = err_in(text);
            assert!(
                msg.contains(&format!("gpuwarden.toml:{line}:")),
                "{text}: {msg}"
            );
            assert!(msg.contains(what), "{text}: {msg}");
            assert!(msg.contains("from 0 to 86400"), "{text}: {msg}");
        }
        let dir = dir_with_config("grace = 86400\nbackoff = { initial = 0, max = 86400 }\n");
        let plan = plan_in(dir.path(), Overrides::default()).unwrap();
        assert_eq!(plan.grace, Duration::from_secs(86_400));
        assert_eq!(plan.backoff_initial, Duration::ZERO);
        assert_eq!(plan.backoff_max, Duration::from_secs(86_400));
    }

    fn with_checkpoints(dir: &Path, spec: &str) -> Result<Plan, ConfigError> {
        plan_in(
            dir,
            Overrides {
                checkpoints: Some(spec.into()),
                ..Overrides::default()
            },
        )
    }

    #[test]
    fn bad_checkpoints_glob_is_refused_at_plan_time() {
        let dir = tempfile::tempdir().unwrap();
        let err = with_checkpoints(dir.path(), "[bad").unwrap_err();
        assert!(
            matches!(err, ConfigError::BadCheckpointsGlob { .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("--checkpoints"), "{msg}");
        assert!(msg.contains("`[bad`"), "{msg}");
        assert!(msg.contains("`[[]`"), "{msg}");

        let msg = err_in("max_restarts = 1\ncheckpoints = \"ckpt/[bad/*.pt\"\n");
        assert!(msg.contains("gpuwarden.toml:2:"), "{msg}");
        assert!(msg.contains("`ckpt/[bad/*.pt`"), "{msg}");
        assert!(msg.contains("`[[]`"), "{msg}");
    }

    #[test]
    fn checkpoints_glob_is_checked_with_the_planned_run_dir() {
        let dir = tempfile::tempdir().unwrap();
        let err = with_checkpoints(dir.path(), "{run_dir}/ckpt-[").unwrap_err();
        let msg = err.to_string();
        let expanded = dir.path().join("gpuwarden-runs").join(STAMP).join("ckpt-[");
        assert!(msg.contains("`{run_dir}/ckpt-[`"), "{msg}");
        assert!(msg.contains(&format!("`{}`", expanded.display())), "{msg}");

        // `[` in the run directory is the directory's name, never glob syntax: neither a plain
        // spec nor a glob around it is refused for it.
        for spec in ["{run_dir}/ckpt", "{run_dir}/ckpt/*.pt"] {
            let plan = plan_in(
                dir.path(),
                Overrides {
                    checkpoints: Some(spec.into()),
                    run_dir: Some("runs[1".into()),
                    ..Overrides::default()
                },
            );
            assert!(plan.is_ok(), "{spec}: {plan:?}");
        }

        let plan = with_checkpoints(dir.path(), "{run_dir}/checkpoints/*.pt").unwrap();
        assert_eq!(
            plan.checkpoints.as_deref(),
            Some("{run_dir}/checkpoints/*.pt")
        );
    }

    #[test]
    fn good_checkpoints_specs_are_kept_as_written() {
        let dir = tempfile::tempdir().unwrap();
        // An existing directory whose name holds `[` is that directory, not a glob.
        std::fs::create_dir(dir.path().join("odd[dir")).unwrap();
        for spec in [
            "odd[dir",
            "ckpt/",
            "ckpt/*.pt",
            "ckpt/epoch-?.pt",
            "ckpt/[[]draft]/*.pt",
            "{run_dir}/checkpoints",
        ] {
            let plan = with_checkpoints(dir.path(), spec).unwrap();
            assert_eq!(plan.checkpoints.as_deref(), Some(spec));
        }
        // Not a directory from elsewhere: it is relative to cwd, like every other path.
        let other = tempfile::tempdir().unwrap();
        let err = with_checkpoints(other.path(), "odd[dir").unwrap_err();
        assert!(
            matches!(err, ConfigError::BadCheckpointsGlob { .. }),
            "{err}"
        );
    }

    #[test]
    fn demo_plan_uses_the_defaults_and_reads_no_config_file() {
        // A config file that would change everything, and that would fail to plan at all.
        let dir = dir_with_config("ladder = [\"nope\"]\ngrace = -1\nmax_restarts = 1\n");
        let command: Vec<OsString> = ["gpuwarden", "__demo-job", "--device", "{device}"]
            .iter()
            .map(OsString::from)
            .collect();
        let demo = demo_plan(command.clone(), None, dir.path(), STAMP);
        assert_eq!(demo.command, command);
        assert_eq!(demo.checkpoints.as_deref(), Some("{run_dir}/checkpoints"));
        assert_eq!(names(&demo), DEFAULT_LADDER);
        assert_eq!(demo.ladder[0], Tier::builtin("gpu").unwrap());
        assert_eq!(demo.ladder[1], Tier::builtin("cpu").unwrap());
        assert_eq!(demo.max_restarts, DEFAULT_MAX_RESTARTS);
        assert_eq!(demo.grace, DEFAULT_GRACE);
        assert_eq!(demo.backoff_initial, DEFAULT_BACKOFF_INITIAL);
        assert_eq!(demo.backoff_max, DEFAULT_BACKOFF_MAX);
        assert!(demo.rule_dirs.is_empty());
        assert!(!demo.force_gpu_unsafe);
        assert_eq!(demo.config_file, None);

        // The run directory follows the rule of `plan`.
        let empty = tempfile::tempdir().unwrap();
        let planned = plan_in(empty.path(), Overrides::default()).unwrap();
        let demo = demo_plan(command.clone(), None, empty.path(), STAMP);
        assert_eq!(demo.run_dir, planned.run_dir);
        let demo = demo_plan(command.clone(), Some("runs/demo".into()), dir.path(), STAMP);
        assert_eq!(demo.run_dir, dir.path().join("runs/demo"));
        let demo = demo_plan(command, Some("/abs/demo".into()), dir.path(), STAMP);
        assert_eq!(demo.run_dir, PathBuf::from("/abs/demo"));
    }

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        path
    }

    #[test]
    fn env_script_merges_under_env_and_unset() {
        let dir = tempfile::tempdir().unwrap();
        script(
            dir.path(),
            "activate_sdk.sh",
            "export ROCM_PATH=/opt/rocm_sdk_612\n\
             export HSA_OVERRIDE_GFX_VERSION=from-script\n\
             export PYTORCH_ROCM_ARCH=gfx1010\n\
             export KEEP_ME=1\n\
             echo activated\n",
        );
        std::fs::write(
            dir.path().join(CONFIG_FILE_NAME),
            "ladder = [\"gpu-sdk\", \"cpu\"]\n\
             [[tier]]\n\
             name = \"gpu-sdk\"\n\
             device = \"cuda\"\n\
             env_script = \"activate_sdk.sh\"\n\
             env = { HSA_OVERRIDE_GFX_VERSION = \"10.3.0\" }\n\
             unset = [\"PYTORCH_ROCM_ARCH\"]\n",
        )
        .unwrap();
        let plan = plan_in(dir.path(), Overrides::default()).unwrap();
        let sdk = &plan.ladder[0];
        assert_eq!(sdk.set_env["ROCM_PATH"], "/opt/rocm_sdk_612");
        assert_eq!(sdk.set_env["KEEP_ME"], "1");
        assert_eq!(sdk.set_env["HSA_OVERRIDE_GFX_VERSION"], "10.3.0");
        assert!(!sdk.set_env.contains_key("PYTORCH_ROCM_ARCH"));
        assert!(sdk.unset_env.contains(&"PYTORCH_ROCM_ARCH".to_owned()));
    }

    #[test]
    fn env_script_runs_only_for_tiers_in_the_ladder_and_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let counter = dir.path().join("runs.log");
        script(
            dir.path(),
            "count.sh",
            &format!("echo run >> '{}'\nexport A=1\n", counter.display()),
        );
        script(dir.path(), "broken.sh", "exit 7\n");
        std::fs::write(
            dir.path().join(CONFIG_FILE_NAME),
            "ladder = [\"a\", \"cpu\"]\n\
             [[tier]]\nname = \"a\"\ndevice = \"cuda\"\nenv_script = \"count.sh\"\n\
             [[tier]]\nname = \"unused\"\ndevice = \"cuda\"\nenv_script = \"broken.sh\"\n",
        )
        .unwrap();
        let plan = plan_in(dir.path(), Overrides::default()).unwrap();
        assert_eq!(plan.ladder[0].set_env["A"], "1");
        // The capture runs the script once (the baseline sources /dev/null).
        let runs = std::fs::read_to_string(&counter).unwrap();
        assert_eq!(runs.lines().count(), 1, "{runs}");
    }

    #[test]
    fn env_script_failure_names_the_tier_and_the_line() {
        let dir = tempfile::tempdir().unwrap();
        script(dir.path(), "bad.sh", "echo 'no such SDK' >&2\nreturn 3\n");
        std::fs::write(
            dir.path().join(CONFIG_FILE_NAME),
            "ladder = [\"gpu-sdk\"]\n\
             [[tier]]\nname = \"gpu-sdk\"\ndevice = \"cuda\"\n\
             env_script = \"bad.sh\"\n",
        )
        .unwrap();
        let err = plan_in(dir.path(), Overrides::default()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("gpuwarden.toml:5:"), "{msg}");
        assert!(msg.contains("tier `gpu-sdk`"), "{msg}");
        assert!(
            msg.contains("bad.sh") && msg.contains("no such SDK"),
            "{msg}"
        );

        std::fs::write(
            dir.path().join(CONFIG_FILE_NAME),
            "ladder = [\"gpu-sdk\"]\n\
             [[tier]]\nname = \"gpu-sdk\"\ndevice = \"cuda\"\n\
             env_script = \"/opt/rocm_sdk_612/bin/activate_sdk.sh\"\n",
        )
        .unwrap();
        let msg = plan_in(dir.path(), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("/opt/rocm_sdk_612/bin/activate_sdk.sh does not exist"),
            "{msg}"
        );
    }

    // ---- overnight settings and checkpoint sanity (issue 11) ----

    #[test]
    fn durations_take_units_and_off() {
        assert_eq!(parse_duration("20m"), Ok(Some(Duration::from_secs(1200))));
        assert_eq!(parse_duration("2s"), Ok(Some(Duration::from_secs(2))));
        assert_eq!(parse_duration("1.5h"), Ok(Some(Duration::from_secs(5400))));
        assert_eq!(parse_duration("90"), Ok(Some(Duration::from_secs(90))));
        assert_eq!(parse_duration("off"), Ok(None));
        assert_eq!(parse_duration("0"), Ok(None));
        for bad in ["", "m", "20 parsecs", "-5s", "8d", "1e9"] {
            assert_eq!(parse_duration(bad), Err(NotADuration), "{bad}");
        }
    }

    #[test]
    fn overnight_keys_progress_policy_and_the_checkpoint_warning() {
        use crate::rules::{Action, FaultClass};
        let dir = dir_with_config(
            "progress = '^step \\d+'\nwarn_no_checkpoint_after = \"off\"\n\n[policy]\ngpu_oom = \"restart\"\nhost_oom = \"stop\"\n",
        );
        let plan = plan_in(dir.path(), Overrides::default()).unwrap();
        assert!(plan.progress.unwrap().is_match("step 12/100"));
        assert_eq!(plan.warn_no_checkpoint_after, None);
        assert_eq!(plan.policy.get(&FaultClass::GpuOom), Some(&Action::Restart));
        assert_eq!(plan.policy.get(&FaultClass::HostOom), Some(&Action::Stop));
        // The flag wins over the file, and is named when it is wrong.
        let flag = Overrides {
            progress: Some("(".into()),
            ..Overrides::default()
        };
        let err = plan_in(dir.path(), flag).unwrap_err().to_string();
        assert!(
            err.starts_with("the --progress flag: the progress regex `(`"),
            "{err}"
        );
        assert!(
            err_in("progress = ''\n")
                .contains(":1:12: the progress regex `` is not valid (it is empty")
        );
        let empty = tempfile::tempdir().unwrap();
        let plan = plan_in(empty.path(), Overrides::default()).unwrap();
        assert_eq!(
            plan.warn_no_checkpoint_after,
            Some(DEFAULT_WARN_NO_CHECKPOINT_AFTER)
        );
        assert!(plan.policy.is_empty() && plan.progress.is_none());
    }

    #[test]
    fn stall_and_window_come_from_the_file_with_a_default() {
        let dir = dir_with_config("stall_timeout = \"5m\"\nrestart_window = \"1h\"\n");
        let plan = plan_in(dir.path(), Overrides::default()).unwrap();
        assert_eq!(plan.stall_timeout, Some(Duration::from_secs(300)));
        assert_eq!(plan.restart_window, Some(Duration::from_secs(3600)));
        let empty = tempfile::tempdir().unwrap();
        let plan = plan_in(empty.path(), Overrides::default()).unwrap();
        assert_eq!(plan.stall_timeout, Some(DEFAULT_STALL_TIMEOUT));
        assert_eq!(plan.restart_window, None);
        let dir = dir_with_config("stall_timeout = \"soon\"\n");
        let err = plan_in(dir.path(), Overrides::default()).unwrap_err();
        assert!(
            err.to_string().contains(":1:17: stall_timeout = `soon`"),
            "{err}"
        );
    }

    #[test]
    fn the_stall_timeout_is_learned_unless_a_number_is_given() {
        let empty = tempfile::tempdir().unwrap();
        let plan = plan_in(empty.path(), Overrides::default()).unwrap();
        assert_eq!(plan.stall_learn, Some(DEFAULT_STALL_TIMEOUT_FLOOR));
        let flags = |stall: &str, floor: Option<&str>| Overrides {
            stall_timeout: Some(stall.into()),
            stall_timeout_floor: floor.map(Into::into),
            ..Overrides::default()
        };
        let plan = plan_in(empty.path(), flags("auto:2h", Some("30s"))).unwrap();
        assert_eq!(plan.stall_timeout, Some(Duration::from_secs(7200)));
        assert_eq!(plan.stall_learn, Some(Duration::from_secs(30)));
        let plan = plan_in(empty.path(), flags("45m", Some("30s"))).unwrap();
        assert_eq!(plan.stall_timeout, Some(Duration::from_secs(2700)));
        assert_eq!(plan.stall_learn, None, "a number wins");
        assert_eq!(
            plan_in(empty.path(), flags("off", None))
                .unwrap()
                .stall_learn,
            None
        );
        for bad in ["auto:", "auto:off", "autox"] {
            let err = plan_in(empty.path(), flags(bad, None)).unwrap_err();
            assert!(err.to_string().contains("--stall-timeout"), "{bad}: {err}");
        }
        let dir = dir_with_config("stall_timeout = \"auto\"\nstall_timeout_floor = \"5m\"\n");
        let plan = plan_in(dir.path(), Overrides::default()).unwrap();
        assert_eq!(plan.stall_learn, Some(Duration::from_secs(300)));
    }

    #[test]
    fn climbing_back_is_on_by_default_only_for_a_command_given_its_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let with = |command: &[&str], o: Overrides| {
            let command = command.iter().map(OsString::from).collect();
            plan(command, o, dir.path(), STAMP).unwrap().climb_back
        };
        let ckpt = || Overrides {
            checkpoints: Some("ckpt/".into()),
            ..Overrides::default()
        };
        let resumes = ["python", "train.py", "--resume", "{checkpoint}"];
        assert_eq!(
            with(&resumes, ckpt()),
            crate::supervisor::climb::DEFAULT_CLIMBS
        );
        assert_eq!(with(&["python", "train.py"], ckpt()), 0);
        let given = |n: &str| Overrides {
            climb_back: Some(n.into()),
            ..ckpt()
        };
        assert_eq!(with(&["python", "train.py"], given("2")), 2);
        assert_eq!(with(&resumes, given("off")), 0);
        let dir2 = dir_with_config("climb_back = 5\n");
        let plan = plan_in(dir2.path(), Overrides::default()).unwrap();
        assert_eq!(plan.climb_back, 5);
        let err = err_in("climb_back = \"often\"\n");
        assert!(
            err.contains(":1:14: climb_back = `often`") && err.contains("`off`"),
            "{err}"
        );
        assert!(err_in("climb_back = 101\n").contains("at most 100"));
    }

    #[test]
    fn checkpoint_placeholder_without_checkpoints_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let command: Vec<OsString> = ["python", "train.py", "--resume={checkpoint}"]
            .iter()
            .map(OsString::from)
            .collect();
        let err = plan(command.clone(), Overrides::default(), dir.path(), STAMP).unwrap_err();
        assert!(matches!(
            err,
            ConfigError::CheckpointPlaceholderWithoutCheckpoints
        ));
        assert!(err.to_string().contains("--checkpoints"));
        std::fs::create_dir(dir.path().join("ckpt")).unwrap();
        let ok = plan(
            command,
            Overrides {
                checkpoints: Some("ckpt".into()),
                ..Overrides::default()
            },
            dir.path(),
            STAMP,
        )
        .unwrap();
        assert!(ok.warnings.is_empty(), "{:?}", ok.warnings);
    }

    #[test]
    fn a_missing_checkpoint_location_is_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let with = |spec: &str| {
            plan(
                cmd(),
                Overrides {
                    checkpoints: Some(spec.into()),
                    ..Overrides::default()
                },
                dir.path(),
                STAMP,
            )
            .unwrap()
            .warnings
        };
        let w = with("chekpoints/");
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains(
                "--checkpoints flag: the checkpoint location `chekpoints/` does not exist"
            ),
            "{w:?}"
        );
        assert_eq!(with("nowhere/*.pt").len(), 1);
        // Inside the run directory, which the run makes; and a glob in an existing directory.
        assert!(with("{run_dir}/ckpt").is_empty());
        assert!(with("*.pt").is_empty());
    }
}
