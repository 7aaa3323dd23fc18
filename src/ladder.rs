//! Tiers of the fallback ladder, and the concrete command of one attempt.
//!
//! A [`Tier`] is one rung of the ladder (`gpu`, `gpu-sdk`, `cpu`, ...): the device string the job
//! is told to use, the environment it runs with, and extra arguments. [`launch`] turns the user's
//! command template plus a tier plus the facts of one attempt ([`Placeholders`]) into an argv and
//! an environment diff, byte-exact and without ever going through a shell.
//! [`capture_env_script`] turns "source this activation script first" (the seed's
//! `source /opt/rocm_sdk_612/bin/activate_sdk.sh`) into a plain environment diff, once, at plan
//! time, so every attempt gets the same environment without a shell in between.
//!
//! This module does not decide which tier comes next (the supervisor does), does not read
//! `gpuwarden.toml` (config.rs does) and does not spawn the job (the executor does).

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::process::{self, Ended, Keep};

/// How long an `env_script` may take before it is killed. Activation scripts export variables;
/// one that runs for 30 s is waiting for input or stuck on a hung GPU tool.
pub const ENV_SCRIPT_TIMEOUT: Duration = Duration::from_secs(30);

/// The names [`Tier::builtin`] knows, in the order of the default ladder.
pub const BUILTIN_TIERS: [&str; 2] = ["gpu", "cpu"];

/// Variables a shell sets or changes by itself; they are never part of an activation script's
/// effect even when the diff shows them.
const SHELL_NOISE: [&str; 4] = ["_", "SHLVL", "PWD", "OLDPWD"];

/// How many trailing stderr lines of a failed `env_script` go into the error.
const STDERR_TAIL_LINES: usize = 12;

/// How many trailing stderr bytes are kept while a script runs (a chatty script must not fill
/// memory; only the end matters for the error message).
const STDERR_KEEP_BYTES: usize = 64 * 1024;

/// How much of `env -0`'s output is kept: far above any real environment, which the kernel
/// caps at a quarter of the stack limit (at most 6 MiB) or `env` could not even start.
const ENV_KEEP_BYTES: usize = 64 << 20;

/// One rung of the fallback ladder.
#[derive(Clone, Debug, PartialEq)]
pub struct Tier {
    /// The name users write in `ladder = [...]` and `--ladder`: "gpu", "cpu", "gpu-sdk", ...
    pub name: String,
    /// What `{device}` becomes: "cuda", "cpu", "cuda:1", ...
    pub device: String,
    /// False for CPU tiers: faults on GPUs are not this tier's business, and the probe's
    /// known-bad-card verdict does not apply to it.
    pub uses_gpu: bool,
    /// Variables set for the job: the `env_script` capture, overridden by the config's `env`.
    pub set_env: BTreeMap<String, String>,
    /// Variables removed from the job's environment. Never overlaps `set_env`.
    pub unset_env: Vec<String>,
    /// Extra arguments appended to the command; placeholders are expanded in them too.
    pub args: Vec<String>,
}

impl Tier {
    /// The tiers that exist without a config file: `gpu` and `cpu`.
    pub fn builtin(name: &str) -> Option<Tier> {
        match name {
            "gpu" => Some(Tier {
                name: "gpu".to_owned(),
                // PyTorch calls ROCm devices "cuda" too, so one string serves AMD and NVIDIA.
                device: "cuda".to_owned(),
                uses_gpu: true,
                set_env: BTreeMap::new(),
                unset_env: Vec::new(),
                args: Vec::new(),
            }),
            "cpu" => {
                // Telling the job `--device cpu` is not enough: libraries still initialise the GPU
                // runtime (torch.cuda.is_available(), NCCL, a stray `.cuda()`), and on a card that
                // just faulted that can hang or fault again. So no GPU may be visible at all.
                // Unsetting the variables would make every GPU visible, and an empty value is read
                // as "unset" by some launchers, so we use "-1": an invalid index, at which the
                // CUDA and HIP runtimes stop enumerating, leaving zero devices. All three are
                // needed: CUDA reads CUDA_VISIBLE_DEVICES, HIP reads HIP_VISIBLE_DEVICES (and
                // CUDA_VISIBLE_DEVICES), and ROCR_VISIBLE_DEVICES filters below HIP, in ROCr.
                let set_env = [
                    "CUDA_VISIBLE_DEVICES",
                    "HIP_VISIBLE_DEVICES",
                    "ROCR_VISIBLE_DEVICES",
                ]
                .into_iter()
                .map(|name| (name.to_owned(), "-1".to_owned()))
                .collect();
                Some(Tier {
                    name: "cpu".to_owned(),
                    device: "cpu".to_owned(),
                    uses_gpu: false,
                    set_env,
                    unset_env: Vec::new(),
                    args: Vec::new(),
                })
            }
            _ => None,
        }
    }
}

/// The facts of one attempt that placeholders in the command refer to.
#[derive(Clone, Copy, Debug)]
pub struct Placeholders<'a> {
    /// `{device}`: the tier's device string.
    pub device: &'a str,
    /// `{checkpoint}`: the last valid checkpoint, or `None` on a fresh start.
    pub checkpoint: Option<&'a Path>,
    /// `{tier}`: the tier's name.
    pub tier: &'a str,
    /// `{attempt}`: 1 for the first attempt of the run.
    pub attempt: u32,
    /// `{run_dir}`: the run directory (journal, logs).
    pub run_dir: &'a Path,
    /// `{gpus}`: the GPUs the attempt sees, by vendor index, in the job's order (`0,2`); empty
    /// on a tier without GPUs.
    pub gpus: &'a str,
    /// `{nproc}`: how many GPUs the attempt sees (1 where it sees none), for
    /// `torchrun --nproc-per-node {nproc}`.
    pub nproc: usize,
}

const CHECKPOINT: &[u8] = b"{checkpoint}";

/// Expands `{device}`, `{checkpoint}`, `{tier}`, `{attempt}`, `{run_dir}`, `{gpus}` and
/// `{nproc}` in each argument.
///
/// Substitution is per argument and byte-exact: a value with spaces or `;` stays inside its
/// argument, non-UTF-8 bytes survive, and unknown `{names}` or other braces (JSON arguments)
/// are left as they are. There is no escape for a literal `{device}`; no real command needs one.
///
/// Without a checkpoint (a fresh start), an argument holding `{checkpoint}` is dropped, and when
/// the placeholder is the whole argument, the flag right before it goes too, so
/// `--resume {checkpoint}` vanishes as a pair while `--resume={checkpoint}` vanishes alone. The
/// argument before counts as a flag when it starts with `-`, is not `-` or `--`, and holds no
/// `=` (then it carries its own value, and the placeholder was a positional argument).
pub fn expand_args(template: &[OsString], p: &Placeholders<'_>) -> Vec<OsString> {
    let mut out: Vec<OsString> = Vec::with_capacity(template.len());
    // Whether the last element of `out` is the previous template argument and a flag that the
    // placeholder after it may be the value of.
    let mut last_is_flag = false;
    for arg in template {
        let bytes = arg.as_bytes();
        if p.checkpoint.is_none() && contains(bytes, CHECKPOINT) {
            if bytes == CHECKPOINT && last_is_flag {
                out.pop();
            }
            last_is_flag = false;
            continue;
        }
        out.push(OsString::from_vec(substitute(bytes, p)));
        last_is_flag = is_flag(bytes);
    }
    out
}

fn is_flag(arg: &[u8]) -> bool {
    arg.starts_with(b"-") && arg != b"-" && arg != b"--" && !arg.contains(&b'=')
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Replaces every known placeholder in one argument. `{checkpoint}` with no checkpoint is left
/// literal, but [`expand_args`] drops such arguments before they get here.
fn substitute(arg: &[u8], p: &Placeholders<'_>) -> Vec<u8> {
    let attempt = p.attempt.to_string();
    let nproc = p.nproc.to_string();
    let mut values: Vec<(&[u8], &[u8])> = vec![
        (b"{device}", p.device.as_bytes()),
        (b"{tier}", p.tier.as_bytes()),
        (b"{attempt}", attempt.as_bytes()),
        (b"{run_dir}", p.run_dir.as_os_str().as_bytes()),
        (b"{gpus}", p.gpus.as_bytes()),
        (b"{nproc}", nproc.as_bytes()),
    ];
    if let Some(checkpoint) = p.checkpoint {
        values.push((CHECKPOINT, checkpoint.as_os_str().as_bytes()));
    }
    let mut out = Vec::with_capacity(arg.len());
    let mut rest = arg;
    // Scanning left to right and skipping over each substituted value means a value that itself
    // contains `{tier}` (a checkpoint directory named so) is never expanded a second time.
    'scan: while let Some((&first, tail)) = rest.split_first() {
        if first == b'{' {
            for (token, value) in &values {
                if let Some(after) = rest.strip_prefix(*token) {
                    out.extend_from_slice(value);
                    rest = after;
                    continue 'scan;
                }
            }
        }
        out.push(first);
        rest = tail;
    }
    out
}

/// The concrete command of one attempt: what the executor spawns.
///
/// `set_env` and `unset_env` never name the same variable, so the order in which the executor
/// applies them does not matter.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    pub argv: Vec<OsString>,
    pub set_env: Vec<(OsString, OsString)>,
    pub unset_env: Vec<OsString>,
}

/// Builds the command of one attempt: the expanded command followed by the tier's expanded
/// extra arguments, with the tier's environment plus `GPUWARDEN_DEVICE`, `GPUWARDEN_CHECKPOINT`
/// (unset when there is none, so a stale value from the parent cannot leak in),
/// `GPUWARDEN_TIER`, `GPUWARDEN_ATTEMPT`, `GPUWARDEN_RUN_DIR`, `GPUWARDEN_GPUS` (`{gpus}`),
/// `GPUWARDEN_NPROC` (`{nproc}`), and `PYTHONUNBUFFERED=1`.
///
/// `PYTHONUNBUFFERED=1` is there because a Python job whose stdout is a pipe buffers its output
/// in 8 KiB blocks: the lines just before a fault would reach us late or never. It is left alone
/// when the parent environment already has it (`parent_env_has_pythonunbuffered`) or when the
/// tier sets or unsets it itself.
pub fn launch(
    command: &[OsString],
    tier: &Tier,
    p: &Placeholders<'_>,
    parent_env_has_pythonunbuffered: bool,
) -> Launch {
    let mut argv = expand_args(command, p);
    let tier_args: Vec<OsString> = tier.args.iter().map(OsString::from).collect();
    argv.extend(expand_args(&tier_args, p));

    let mut env = EnvDiff {
        set: tier
            .set_env
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect(),
        unset: Vec::new(),
    };
    for name in &tier.unset_env {
        env.unset(OsStr::new(name));
    }
    env.set("GPUWARDEN_DEVICE", OsStr::new(p.device));
    match p.checkpoint {
        Some(checkpoint) => env.set("GPUWARDEN_CHECKPOINT", checkpoint.as_os_str()),
        None => env.unset(OsStr::new("GPUWARDEN_CHECKPOINT")),
    }
    env.set("GPUWARDEN_TIER", OsStr::new(p.tier));
    env.set("GPUWARDEN_ATTEMPT", OsStr::new(&p.attempt.to_string()));
    env.set("GPUWARDEN_RUN_DIR", p.run_dir.as_os_str());
    env.set("GPUWARDEN_GPUS", OsStr::new(p.gpus));
    env.set("GPUWARDEN_NPROC", OsStr::new(&p.nproc.to_string()));
    let tier_decides = tier.set_env.contains_key("PYTHONUNBUFFERED")
        || tier.unset_env.iter().any(|n| n == "PYTHONUNBUFFERED");
    if !parent_env_has_pythonunbuffered && !tier_decides {
        env.set("PYTHONUNBUFFERED", OsStr::new("1"));
    }
    Launch {
        argv,
        set_env: env.set,
        unset_env: env.unset,
    }
}

impl Launch {
    /// Sets one variable of the job's environment over what the tier said (the
    /// `*_VISIBLE_DEVICES` that hide excluded GPUs); `set_env` and `unset_env` stay disjoint.
    pub fn set_var(&mut self, name: &str, value: &str) {
        let mut env = EnvDiff {
            set: std::mem::take(&mut self.set_env),
            unset: std::mem::take(&mut self.unset_env),
        };
        env.set(name, OsStr::new(value));
        self.set_env = env.set;
        self.unset_env = env.unset;
    }
}

/// An environment change that keeps `set` and `unset` disjoint; the last word on a name wins.
struct EnvDiff {
    set: Vec<(OsString, OsString)>,
    unset: Vec<OsString>,
}

impl EnvDiff {
    fn set(&mut self, name: &str, value: &OsStr) {
        self.unset.retain(|n| n != name);
        self.set.retain(|(n, _)| n != name);
        self.set.push((OsString::from(name), value.to_owned()));
    }

    fn unset(&mut self, name: &OsStr) {
        self.set.retain(|(n, _)| n != name);
        if !self.unset.iter().any(|n| n == name) {
            self.unset.push(name.to_owned());
        }
    }
}

/// Why an `env_script` could not be turned into an environment.
#[derive(Debug, thiserror::Error)]
pub enum LadderError {
    #[error(
        "env_script {} does not exist; fix the path in the tier's env_script or install what it activates",
        script.display()
    )]
    ScriptMissing { script: PathBuf },

    #[error(
        "env_script {} cannot be read ({source}); make it readable for this user or fix the path",
        script.display()
    )]
    ScriptUnreadable {
        script: PathBuf,
        source: std::io::Error,
    },

    #[error("env_script {} is not a file; point env_script at the activation script itself", script.display())]
    ScriptNotAFile { script: PathBuf },

    #[error(
        "could not run bash to source env_script {} ({source}); install bash or remove env_script from the tier",
        script.display()
    )]
    Bash {
        script: PathBuf,
        source: std::io::Error,
    },

    #[error(
        "sourcing env_script {} failed ({status}); its last stderr lines:\n{stderr_tail}\nrun `source {}` in bash to see what goes wrong, or remove env_script from the tier",
        script.display(),
        script.display()
    )]
    ScriptFailed {
        script: PathBuf,
        status: ExitStatus,
        stderr_tail: String,
    },

    #[error(
        "sourcing env_script {} ended the shell before its environment could be read (does it call `exit`?); use `return` in a sourced script",
        script.display()
    )]
    ScriptExited { script: PathBuf },

    #[error(
        "sourcing env_script {} took longer than {} s and was killed; it may be waiting for input or for a hung tool. Make it finish on its own (run `source {}` by hand to check)",
        script.display(),
        timeout.as_secs_f64(),
        script.display()
    )]
    ScriptTimedOut { script: PathBuf, timeout: Duration },

    #[error(
        "env_script {} sets {name} to a value that is not UTF-8; gpuwarden keeps tier environments as text, so set it from the tier's env table instead",
        script.display()
    )]
    NotUtf8 { script: PathBuf, name: String },
}

/// Sources `script` in bash and returns what it changed: (variables set or changed, variables
/// removed). Shell bookkeeping (`_`, `SHLVL`, `PWD`, `OLDPWD`) is never part of the result.
///
/// Runs `bash -c 'source "$1" >&2 && env -0' gpuwarden-env SCRIPT`: the path is an argument,
/// never shell text, and the script's own stdout goes to stderr so nothing it prints can be
/// mistaken for an environment variable. The result is the difference against the same command
/// sourcing `/dev/null`, so anything bash itself exports cancels out. Killed after
/// [`ENV_SCRIPT_TIMEOUT`]. Bash runs in its own process group, and once it is done the whole
/// group is killed, so nothing the script started in the background outlives the capture.
pub fn capture_env_script(
    script: &Path,
) -> Result<(BTreeMap<String, String>, Vec<String>), LadderError> {
    capture_env_script_within(script, ENV_SCRIPT_TIMEOUT)
}

/// [`capture_env_script`] with a chosen timeout.
pub fn capture_env_script_within(
    script: &Path,
    timeout: Duration,
) -> Result<(BTreeMap<String, String>, Vec<String>), LadderError> {
    check_readable(script)?;
    let before = source_and_dump(script, Path::new("/dev/null"), timeout)?;
    let after = source_and_dump(script, script, timeout)?;

    let mut set = BTreeMap::new();
    for (name, value) in &after {
        if SHELL_NOISE.iter().any(|n| n.as_bytes() == name.as_slice())
            || before.get(name) == Some(value)
        {
            continue;
        }
        let text = |bytes: &[u8]| {
            String::from_utf8(bytes.to_vec()).map_err(|_| LadderError::NotUtf8 {
                script: script.to_owned(),
                name: String::from_utf8_lossy(name).into_owned(),
            })
        };
        set.insert(text(name)?, text(value)?);
    }
    let mut unset = Vec::new();
    for name in before.keys() {
        if SHELL_NOISE.iter().any(|n| n.as_bytes() == name.as_slice()) || after.contains_key(name) {
            continue;
        }
        // Tier environments are text; a removed name that is not UTF-8 cannot be expressed.
        match String::from_utf8(name.clone()) {
            Ok(name) => unset.push(name),
            Err(_) => {
                return Err(LadderError::NotUtf8 {
                    script: script.to_owned(),
                    name: String::from_utf8_lossy(name).into_owned(),
                });
            }
        }
    }
    Ok((set, unset))
}

fn check_readable(script: &Path) -> Result<(), LadderError> {
    let meta = match std::fs::metadata(script) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(LadderError::ScriptMissing {
                script: script.to_owned(),
            });
        }
        Err(source) => {
            return Err(LadderError::ScriptUnreadable {
                script: script.to_owned(),
                source,
            });
        }
    };
    if meta.is_dir() {
        return Err(LadderError::ScriptNotAFile {
            script: script.to_owned(),
        });
    }
    // bash would say "Permission denied" too, but only as a line in a failure message; opening
    // the file ourselves gives the user the precise reason.
    std::fs::File::open(script).map_err(|source| LadderError::ScriptUnreadable {
        script: script.to_owned(),
        source,
    })?;
    Ok(())
}

/// Runs `source SOURCED >&2 && env -0` in bash and parses the NUL-separated environment.
/// `script` is only used to name the env_script in errors.
fn source_and_dump(
    script: &Path,
    sourced: &Path,
    timeout: Duration,
) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, LadderError> {
    let bash_error = |source| LadderError::Bash {
        script: script.to_owned(),
        source,
    };
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(r#"source "$1" >&2 && env -0"#)
        .arg("gpuwarden-env")
        .arg(sourced);
    // Bash runs in its own process group, killed at the timeout and once bash is done, so
    // nothing the script started in the background outlives the capture. Nobody stops a
    // capture but its timeout: a signal to gpuwarden stays pending until it is done.
    let run = process::run_captured(
        cmd,
        Keep::First(ENV_KEEP_BYTES),
        Keep::Last(STDERR_KEEP_BYTES),
        Instant::now() + timeout,
        &|| false,
    )
    .map_err(|e| bash_error(e.cause))?;
    let status = match run.ended {
        Ended::Exited(Some(status)) => status,
        Ended::Exited(None) => {
            return Err(bash_error(std::io::Error::other(
                "its exit status was collected by someone else",
            )));
        }
        Ended::TimedOut | Ended::Stopped => {
            return Err(LadderError::ScriptTimedOut {
                script: script.to_owned(),
                timeout,
            });
        }
    };
    if !status.success() {
        return Err(LadderError::ScriptFailed {
            script: script.to_owned(),
            status,
            stderr_tail: stderr_tail(&run.stderr),
        });
    }
    if run.stdout.is_empty() {
        return Err(LadderError::ScriptExited {
            script: script.to_owned(),
        });
    }
    Ok(parse_env0(&run.stdout))
}

fn stderr_tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return "  (nothing on stderr)".to_owned();
    }
    let start = lines.len().saturating_sub(STDERR_TAIL_LINES);
    lines[start..]
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Parses `env -0` output: `NAME=VALUE\0` records. A value may hold newlines and `=`; the name
/// ends at the first `=`.
fn parse_env0(bytes: &[u8]) -> BTreeMap<Vec<u8>, Vec<u8>> {
    bytes
        .split(|&b| b == 0)
        .filter_map(|record| {
            let eq = record.iter().position(|&b| b == b'=')?;
            (eq > 0).then(|| (record[..eq].to_vec(), record[eq + 1..].to_vec()))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::thread;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    fn place<'a>(checkpoint: Option<&'a Path>) -> Placeholders<'a> {
        Placeholders {
            device: "cuda:1",
            checkpoint,
            tier: "gpu-sdk",
            attempt: 3,
            run_dir: Path::new("/runs/eeg"),
            gpus: "0,2",
            nproc: 2,
        }
    }

    #[test]
    fn every_placeholder_is_substituted() {
        let ckpt = Path::new("ckpt/epoch-7.pt");
        let out = expand_args(
            &args(&[
                "python",
                "--device",
                "{device}",
                "--resume={checkpoint}",
                "--log={run_dir}/{tier}-{attempt}.log",
            ]),
            &place(Some(ckpt)),
        );
        assert_eq!(
            out,
            args(&[
                "python",
                "--device",
                "cuda:1",
                "--resume=ckpt/epoch-7.pt",
                "--log=/runs/eeg/gpu-sdk-3.log",
            ])
        );
    }

    #[test]
    fn gpus_and_nproc_follow_the_attempts_gpus() {
        let out = expand_args(
            &args(&["torchrun", "--nproc-per-node", "{nproc}", "--gpus={gpus}"]),
            &place(None),
        );
        assert_eq!(
            out,
            args(&["torchrun", "--nproc-per-node", "2", "--gpus=0,2"])
        );
        let l = launch(
            &args(&["t"]),
            &Tier::builtin("gpu").unwrap(),
            &place(None),
            false,
        );
        assert_eq!(env_of(&l, "GPUWARDEN_GPUS").as_deref(), Some("0,2"));
        assert_eq!(env_of(&l, "GPUWARDEN_NPROC").as_deref(), Some("2"));
    }

    #[test]
    fn a_variable_set_over_the_tier_wins_and_keeps_the_env_disjoint() {
        let mut tier = Tier::builtin("gpu").unwrap();
        tier.unset_env = vec!["ROCR_VISIBLE_DEVICES".into()];
        let mut l = launch(&args(&["t"]), &tier, &place(None), false);
        assert!(
            l.unset_env
                .contains(&OsString::from("ROCR_VISIBLE_DEVICES"))
        );
        l.set_var("ROCR_VISIBLE_DEVICES", "0");
        assert_eq!(env_of(&l, "ROCR_VISIBLE_DEVICES").as_deref(), Some("0"));
        assert!(
            !l.unset_env
                .contains(&OsString::from("ROCR_VISIBLE_DEVICES"))
        );
    }

    #[test]
    fn unknown_names_and_json_braces_stay_literal() {
        let template = args(&[
            "--cfg",
            r#"{"lr": 0.1, "sched": {"name": "cos"}}"#,
            "{epoch}",
            "{device",
            "{{device}}",
            "}{",
        ]);
        let out = expand_args(&template, &place(None));
        assert_eq!(
            out,
            args(&[
                "--cfg",
                r#"{"lr": 0.1, "sched": {"name": "cos"}}"#,
                "{epoch}",
                "{device",
                "{cuda:1}",
                "}{",
            ])
        );
    }

    #[test]
    fn checkpoint_with_spaces_and_semicolon_stays_one_argument() {
        let ckpt = Path::new("/data/my ckpts; rm -rf ~/x.pt");
        let out = expand_args(
            &args(&["train", "--resume", "{checkpoint}"]),
            &place(Some(ckpt)),
        );
        assert_eq!(out.len(), 3);
        assert_eq!(out[2], OsString::from("/data/my ckpts; rm -rf ~/x.pt"));
    }

    #[test]
    fn substituted_value_is_not_expanded_again() {
        let ckpt = Path::new("/ck/{tier}/{device}.pt");
        let out = expand_args(&args(&["{checkpoint}"]), &place(Some(ckpt)));
        assert_eq!(out, args(&["/ck/{tier}/{device}.pt"]));
    }

    #[test]
    fn non_utf8_bytes_survive() {
        let raw = OsString::from_vec(b"--name=caf\xe9-{device}".to_vec());
        let ckpt_bytes = OsString::from_vec(b"/ck/\xff\xfe.pt".to_vec());
        let ckpt = Path::new(&ckpt_bytes);
        let out = expand_args(
            &[
                raw,
                OsString::from("--resume"),
                OsString::from("{checkpoint}"),
            ],
            &place(Some(ckpt)),
        );
        assert_eq!(out[0].as_bytes(), b"--name=caf\xe9-cuda:1");
        assert_eq!(out[2].as_bytes(), b"/ck/\xff\xfe.pt");
    }

    #[test]
    fn no_checkpoint_drops_flag_and_placeholder_as_a_pair() {
        let out = expand_args(
            &args(&[
                "python",
                "train.py",
                "--resume",
                "{checkpoint}",
                "--epochs",
                "5",
            ]),
            &place(None),
        );
        assert_eq!(out, args(&["python", "train.py", "--epochs", "5"]));
    }

    #[test]
    fn no_checkpoint_drops_joined_flag_alone() {
        let out = expand_args(
            &args(&["python", "--lr", "0.1", "--resume={checkpoint}", "--x"]),
            &place(None),
        );
        assert_eq!(out, args(&["python", "--lr", "0.1", "--x"]));
    }

    #[test]
    fn no_checkpoint_drops_any_argument_that_holds_the_placeholder() {
        let out = expand_args(
            &args(&["python", "-r", "ckpt={checkpoint},strict"]),
            &place(None),
        );
        // Not alone in its argument: "-r" is kept, as the spec says only lone placeholders take
        // their flag with them.
        assert_eq!(out, args(&["python", "-r"]));
    }

    #[test]
    fn no_checkpoint_after_positional_or_first_drops_only_itself() {
        let out = expand_args(&args(&["{checkpoint}", "train.py"]), &place(None));
        assert_eq!(out, args(&["train.py"]));
        let out = expand_args(&args(&["resume.py", "{checkpoint}", "-v"]), &place(None));
        assert_eq!(out, args(&["resume.py", "-v"]));
    }

    #[test]
    fn no_checkpoint_keeps_separator_and_flags_with_values() {
        let out = expand_args(&args(&["run", "--", "{checkpoint}"]), &place(None));
        assert_eq!(out, args(&["run", "--"]));
        let out = expand_args(&args(&["run", "--amp=off", "{checkpoint}"]), &place(None));
        assert_eq!(out, args(&["run", "--amp=off"]));
        let out = expand_args(&args(&["run", "-", "{checkpoint}"]), &place(None));
        assert_eq!(out, args(&["run", "-"]));
    }

    #[test]
    fn no_checkpoint_twice_in_a_row_takes_only_one_flag() {
        let out = expand_args(
            &args(&["run", "--a", "--resume", "{checkpoint}", "{checkpoint}"]),
            &place(None),
        );
        assert_eq!(out, args(&["run", "--a"]));
    }

    #[test]
    fn builtin_tiers() {
        let gpu = Tier::builtin("gpu").unwrap();
        assert_eq!(gpu.device, "cuda");
        assert!(gpu.uses_gpu);
        assert!(gpu.set_env.is_empty());
        let cpu = Tier::builtin("cpu").unwrap();
        assert_eq!(cpu.device, "cpu");
        assert!(!cpu.uses_gpu);
        for var in [
            "CUDA_VISIBLE_DEVICES",
            "HIP_VISIBLE_DEVICES",
            "ROCR_VISIBLE_DEVICES",
        ] {
            assert_eq!(
                cpu.set_env.get(var).map(String::as_str),
                Some("-1"),
                "{var}"
            );
        }
        assert_eq!(Tier::builtin("gpu-sdk"), None);
        for name in BUILTIN_TIERS {
            assert!(Tier::builtin(name).is_some());
        }
    }

    fn env_of(l: &Launch, name: &str) -> Option<String> {
        l.set_env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.to_string_lossy().into_owned())
    }

    #[test]
    fn launch_appends_tier_args_and_sets_env() {
        let mut tier = Tier::builtin("cpu").unwrap();
        tier.args = vec!["--amp".into(), "off".into(), "--tag={tier}".into()];
        tier.unset_env = vec!["PYTORCH_ROCM_ARCH".into()];
        let ckpt = Path::new("ck/a b.pt");
        let p = Placeholders {
            device: "cpu",
            checkpoint: Some(ckpt),
            tier: "cpu",
            attempt: 2,
            run_dir: Path::new("/r"),
            gpus: "",
            nproc: 1,
        };
        let l = launch(
            &args(&["python", "t.py", "--device", "{device}"]),
            &tier,
            &p,
            false,
        );
        assert_eq!(
            l.argv,
            args(&[
                "python",
                "t.py",
                "--device",
                "cpu",
                "--amp",
                "off",
                "--tag=cpu"
            ])
        );
        assert_eq!(env_of(&l, "CUDA_VISIBLE_DEVICES").as_deref(), Some("-1"));
        assert_eq!(env_of(&l, "GPUWARDEN_DEVICE").as_deref(), Some("cpu"));
        assert_eq!(
            env_of(&l, "GPUWARDEN_CHECKPOINT").as_deref(),
            Some("ck/a b.pt")
        );
        assert_eq!(env_of(&l, "GPUWARDEN_TIER").as_deref(), Some("cpu"));
        assert_eq!(env_of(&l, "GPUWARDEN_ATTEMPT").as_deref(), Some("2"));
        assert_eq!(env_of(&l, "GPUWARDEN_RUN_DIR").as_deref(), Some("/r"));
        assert_eq!(env_of(&l, "PYTHONUNBUFFERED").as_deref(), Some("1"));
        assert_eq!(l.unset_env, vec![OsString::from("PYTORCH_ROCM_ARCH")]);
    }

    #[test]
    fn launch_without_checkpoint_unsets_it_and_respects_parent_pythonunbuffered() {
        let tier = Tier::builtin("gpu").unwrap();
        let l = launch(
            &args(&["t", "--resume", "{checkpoint}"]),
            &tier,
            &place(None),
            true,
        );
        assert_eq!(l.argv, args(&["t"]));
        assert_eq!(env_of(&l, "GPUWARDEN_CHECKPOINT"), None);
        assert!(
            l.unset_env
                .contains(&OsString::from("GPUWARDEN_CHECKPOINT"))
        );
        assert_eq!(env_of(&l, "PYTHONUNBUFFERED"), None);
        assert!(!l.unset_env.contains(&OsString::from("PYTHONUNBUFFERED")));
    }

    #[test]
    fn launch_lets_the_tier_decide_pythonunbuffered_and_keeps_env_disjoint() {
        let mut tier = Tier::builtin("gpu").unwrap();
        tier.unset_env = vec!["PYTHONUNBUFFERED".into(), "GPUWARDEN_TIER".into()];
        let l = launch(&args(&["t"]), &tier, &place(None), false);
        assert_eq!(env_of(&l, "PYTHONUNBUFFERED"), None);
        assert!(l.unset_env.contains(&OsString::from("PYTHONUNBUFFERED")));
        // gpuwarden's own variables always win, and a name is never both set and unset.
        assert_eq!(env_of(&l, "GPUWARDEN_TIER").as_deref(), Some("gpu-sdk"));
        for name in &l.unset_env {
            assert!(l.set_env.iter().all(|(k, _)| k != name), "{name:?}");
        }
        tier.set_env.insert("PYTHONUNBUFFERED".into(), "0".into());
        tier.unset_env.clear();
        let l = launch(&args(&["t"]), &tier, &place(None), false);
        assert_eq!(env_of(&l, "PYTHONUNBUFFERED").as_deref(), Some("0"));
    }

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        path
    }

    #[test]
    fn capture_sees_sets_changes_and_unsets_but_not_shell_noise() {
        let dir = tempfile::tempdir().unwrap();
        // HOME is in every environment bash starts with, so unsetting it is a visible removal.
        let path = script(
            dir.path(),
            "activate sdk.sh",
            "export ROCM_PATH=/opt/rocm_sdk_612\n\
             export HSA_OVERRIDE_GFX_VERSION=10.3.0\n\
             export MULTI='line one\nline=two'\n\
             export PATH=/opt/rocm_sdk_612/bin:$PATH\n\
             unset HOME\n\
             NOT_EXPORTED=1\n\
             cd /tmp\n\
             echo 'FAKE=from_stdout'\n\
             printf 'BOGUS=x\\0'\n",
        );
        let (set, unset) = capture_env_script(&path).unwrap();
        assert_eq!(
            set.get("ROCM_PATH").map(String::as_str),
            Some("/opt/rocm_sdk_612")
        );
        assert_eq!(
            set.get("HSA_OVERRIDE_GFX_VERSION").map(String::as_str),
            Some("10.3.0")
        );
        assert_eq!(
            set.get("MULTI").map(String::as_str),
            Some("line one\nline=two")
        );
        assert!(set["PATH"].starts_with("/opt/rocm_sdk_612/bin:"));
        assert!(
            !set.contains_key("FAKE"),
            "stdout of the script leaked: {set:?}"
        );
        assert!(
            !set.contains_key("BOGUS"),
            "stdout of the script leaked: {set:?}"
        );
        assert!(!set.contains_key("NOT_EXPORTED"));
        for noise in SHELL_NOISE {
            assert!(!set.contains_key(noise), "{noise} in {set:?}");
            assert!(!unset.iter().any(|n| n == noise), "{noise} in {unset:?}");
        }
        if std::env::var_os("HOME").is_some() {
            assert_eq!(unset, vec!["HOME".to_owned()]);
        }
        assert_eq!(set.len(), 4, "{set:?}");
    }

    #[test]
    fn capture_of_a_script_that_changes_nothing_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = script(dir.path(), "noop.sh", "echo hello\n");
        let (set, unset) = capture_env_script(&path).unwrap();
        assert!(set.is_empty(), "{set:?}");
        assert!(unset.is_empty(), "{unset:?}");
    }

    #[test]
    fn failing_script_reports_status_and_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let path = script(
            dir.path(),
            "bad.sh",
            "echo 'checking gfx1010 support' >&2\necho 'ROCm SDK not built for this card' >&2\nfalse\n",
        );
        let err = capture_env_script(&path).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, LadderError::ScriptFailed { .. }), "{msg}");
        assert!(msg.contains("bad.sh"), "{msg}");
        assert!(msg.contains("exit status: 1"), "{msg}");
        assert!(msg.contains("ROCm SDK not built for this card"), "{msg}");
    }

    #[test]
    fn script_calling_exit_zero_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = script(dir.path(), "exits.sh", "export A=1\nexit 0\n");
        let err = capture_env_script(&path).unwrap_err();
        assert!(matches!(err, LadderError::ScriptExited { .. }), "{err}");
        assert!(err.to_string().contains("`exit`"), "{err}");
    }

    #[test]
    fn missing_and_directory_scripts_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.sh");
        let err = capture_env_script(&missing).unwrap_err();
        assert!(matches!(err, LadderError::ScriptMissing { .. }));
        assert!(err.to_string().contains("nope.sh"), "{err}");
        let err = capture_env_script(dir.path()).unwrap_err();
        assert!(matches!(err, LadderError::ScriptNotAFile { .. }), "{err}");
    }

    #[test]
    fn unreadable_script_is_reported() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { nix::libc::geteuid() } == 0 {
            // Root reads any file, so there would be nothing to observe: this test runs again
            // as `nobody`, from a copy of this test binary where `nobody` can reach it (the
            // checkout may lie under /root).
            use std::os::unix::process::CommandExt;
            let dir = tempfile::tempdir().unwrap();
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            let copy = dir.path().join("ladder-tests");
            std::fs::copy(std::env::current_exe().unwrap(), &copy).unwrap();
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
            let out = std::process::Command::new(&copy)
                .args([
                    "--exact",
                    "ladder::tests::unreadable_script_is_reported",
                    "--test-threads=1",
                ])
                .uid(65534)
                .gid(65534)
                .current_dir(dir.path())
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("1 passed"),
                "as nobody: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = script(dir.path(), "secret.sh", "export A=1\n");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();
        assert!(
            std::fs::File::open(&path).is_err(),
            "not root, yet it reads a mode-0 file"
        );
        let err = capture_env_script(&path).unwrap_err();
        assert!(matches!(err, LadderError::ScriptUnreadable { .. }), "{err}");
        assert!(err.to_string().contains("secret.sh"), "{err}");
    }

    #[test]
    fn hanging_script_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("child-alive");
        let path = script(
            dir.path(),
            "hang.sh",
            &format!("(sleep 1.5; touch '{}') &\nsleep 30\n", marker.display()),
        );
        let started = Instant::now();
        let err = capture_env_script_within(&path, Duration::from_millis(300)).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(matches!(err, LadderError::ScriptTimedOut { .. }), "{err}");
        assert!(err.to_string().contains("hang.sh"), "{err}");
        // The background child was in the script's process group and died with it.
        thread::sleep(Duration::from_millis(1800));
        assert!(
            !marker.exists(),
            "the script's background child survived the timeout"
        );
    }

    #[test]
    fn background_process_of_a_successful_script_does_not_outlive_the_capture() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("sleep.pid");
        let path = script(
            dir.path(),
            "agent.sh",
            &format!(
                "sleep 30 &\necho $! > '{}'\nexport AGENT=started\n",
                pid_file.display()
            ),
        );
        let started = Instant::now();
        let (set, _) = capture_env_script(&path).unwrap();
        let took = started.elapsed();
        assert_eq!(set.get("AGENT").map(String::as_str), Some("started"));
        // The sleep held the script's stderr pipe; had it been left running, reading stderr
        // would have waited for the 2 s linger.
        assert!(took < Duration::from_millis(1900), "{took:?}");
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let pid = pid.trim();
        assert!(
            crate::process::tests::gone_soon(pid),
            "the script's `sleep 30 &` (pid {pid}) survived the capture"
        );
    }

    #[test]
    fn parse_env0_keeps_equals_and_newlines_in_values() {
        let map = parse_env0(b"A=1\0B=x=y\nz\0=bad\0noeq\0");
        assert_eq!(map.len(), 2);
        assert_eq!(map[b"B".as_slice()], b"x=y\nz".to_vec());
    }
}
