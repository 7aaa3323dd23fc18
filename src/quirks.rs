//! Known-bad GPU/software combinations ("quirks"), kept as data in `rules/quirks.toml`, and the
//! judgement of one situation (the GPUs a job would see, its environment, the ROCm version, its
//! command line) against them.
//!
//! This is the EEG2025 team's `is_problematic_amd_gpu()` turned into data: an RDNA1/RDNA2 card
//! under ROCm 6.2+ crashes EEGNeX's spatial convolutions with `Memory access fault by GPU
//! node-N`, so such a job should start on the CPU. Finding the GPUs, reading version files and
//! deciding which tier a run starts on is `crate::probe`'s job; this module only reads quirk files
//! and says, for one situation, which quirks apply and why.
//!
//! # Quirk file format
//!
//! ```toml
//! [[quirk]]
//! id = "rdna-rocm62-eegnex-spatial-conv"   # unique; a-z, 0-9 and -
//! summary = "What goes wrong, in one sentence."
//! vendor = "amd"                          # amd or nvidia
//! gfx_targets = ["gfx10*"]                # glob patterns over gfx targets (AMD)
//! names = ['''\bRX 6\d{3}\b''']            # regexes over the device name
//! rocm = ">=6.2"                          # optional: comparisons (>=, >, <=, <, =), comma = and
//! if_rocm_unknown = "apply"               # optional: apply (default) or skip
//! job = '''(?i)eegnex'''                  # optional: regex over the command line
//! tier = "cpu"                            # optional: the tier to start on; without it, a warning
//! advice = "What a person can do about it."
//! examples = [{ gfx = "gfx1030", rocm = "6.2.4", job = "python train_eegnex.py" }]
//! counterexamples = [{ gfx = "gfx1030", rocm = "6.1.2", job = "python train_eegnex.py" }]
//! ```
//!
//! # Match semantics
//!
//! A quirk applies when **all** of its conditions hold:
//!
//! 1. a GPU of its `vendor` is visible to the job and is recognised by **any** of these ways:
//!    - its own gfx target (from KFD) matches a `gfx_targets` pattern;
//!    - `HSA_OVERRIDE_GFX_VERSION` (`10.3.0` means gfx1030) matches one: ROCm then runs the GPU
//!      as that target whatever it really is;
//!    - its own target is unknown and `PYTORCH_ROCM_ARCH` lists a matching target. Only then:
//!      that variable is the list of targets a build was made for, often longer than the GPUs
//!      present, and an image built for `gfx90a;gfx1030` must not make an MI210 look like RDNA2;
//!    - its name matches a `names` regex;
//! 2. the ROCm version satisfies `rocm`; when no version was found the quirk applies anyway,
//!    unless `if_rocm_unknown = "skip"` (the seed's safeguard was conservative, and so is this);
//! 3. the job's command line (arguments joined by spaces) matches `job`. Judged without a
//!    command (`gpuwarden probe`), such a quirk is reported as applying only to those jobs.
//!
//! Every example must apply and no counterexample may: a file whose examples disagree with its
//! quirks does not load, so the examples are always true of the quirks they sit under. An example
//! describes one GPU: `vendor` (default: the quirk's), `gfx`, `name`, `rocm` (a version;
//! left out means not found), `env` (a table of variables) and `job` (a command line; left out
//! means judged without one).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use regex::Regex;
use serde::{Deserialize, Serialize, Serializer};
use toml::Spanned;

use crate::gpu::{Gpu, Vendor};
use crate::rules::toml_file::{
    self, FileError, Format, Location, Noun, Origin, TomlFile, regex_problem,
};

/// The built-in quirk file, embedded at build time.
pub const BUILTIN: (&str, &str) = ("rules/quirks.toml", include_str!("../rules/quirks.toml"));

/// The variables quirk matching reads. Only those that are set are in an [`Env`].
pub const HSA_OVERRIDE_GFX_VERSION: &str = "HSA_OVERRIDE_GFX_VERSION";
pub const PYTORCH_ROCM_ARCH: &str = "PYTORCH_ROCM_ARCH";

/// Environment variables by name, only those that are set.
pub type Env = BTreeMap<String, String>;

/// A version number such as ROCm's `6.2.4` or the NVIDIA driver's `550.54.15`: up to three
/// numbers. Missing parts count as 0 when comparing (`6.2` = `6.2.0`), and the text keeps what
/// was written, so `12.4` is shown as `12.4`.
#[derive(Clone, Debug)]
pub struct Version {
    parts: [u32; 3],
    text: String,
}

impl Version {
    /// The version at the start of `text`: `6.2.4-120` and `6.2.4` give 6.2.4, `12.4 (build)`
    /// gives 12.4. A fourth number is ignored. `None` when `text` does not start with a number.
    pub fn parse_prefix(text: &str) -> Option<Version> {
        let end = text
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(text.len());
        let numeric = text[..end].trim_end_matches('.');
        let mut parts = [0u32; 3];
        let mut shown = Vec::new();
        for (i, piece) in numeric.split('.').take(3).enumerate() {
            if piece.is_empty() {
                break;
            }
            parts[i] = piece.parse().ok()?;
            shown.push(piece);
        }
        if shown.is_empty() {
            return None;
        }
        Some(Version {
            parts,
            text: shown.join("."),
        })
    }

    /// The whole of `text` as a version (surrounding spaces allowed), or `None`.
    pub fn parse_exact(text: &str) -> Option<Version> {
        let text = text.trim();
        Version::parse_prefix(text).filter(|v| v.text.len() == text.len())
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Version) -> bool {
        self.parts == other.parts
    }
}

impl Eq for Version {}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Version) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Version) -> std::cmp::Ordering {
        self.parts.cmp(&other.parts)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Ge,
    Gt,
    Le,
    Lt,
    Eq,
}

/// A version requirement: comparisons joined by commas, all of which must hold (`>=6.2, <7`).
#[derive(Clone, Debug)]
pub struct VersionReq {
    clauses: Vec<(Op, Version)>,
    text: String,
}

impl VersionReq {
    /// Parses `>=6.2`, `>= 6.2, < 6.4.1`, `=6.2.4`. The error says what is wrong.
    pub fn parse(text: &str) -> Result<VersionReq, String> {
        let mut clauses = Vec::new();
        for clause in text.split(',') {
            let clause = clause.trim();
            // Longest operators first, so `>=` is not read as `>` then `=6.2`.
            let (op, rest) = [
                (">=", Op::Ge),
                ("<=", Op::Le),
                ("==", Op::Eq),
                (">", Op::Gt),
                ("<", Op::Lt),
                ("=", Op::Eq),
            ]
            .iter()
            .find_map(|(sym, op)| clause.strip_prefix(sym).map(|rest| (*op, rest)))
            .ok_or_else(|| {
                format!("`{clause}` does not start with a comparison (>=, >, <=, <, =)")
            })?;
            let version = Version::parse_exact(rest).ok_or_else(|| {
                format!("`{}` is not a version such as 6.2 or 6.2.4", rest.trim())
            })?;
            clauses.push((op, version));
        }
        Ok(VersionReq {
            clauses,
            text: text.trim().to_string(),
        })
    }

    pub fn matches(&self, v: &Version) -> bool {
        self.clauses.iter().all(|(op, bound)| match op {
            Op::Ge => v >= bound,
            Op::Gt => v > bound,
            Op::Le => v <= bound,
            Op::Lt => v < bound,
            Op::Eq => v == bound,
        })
    }
}

impl fmt::Display for VersionReq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The gfx target `HSA_OVERRIDE_GFX_VERSION` stands for: `10.3.0` is gfx1030, `9.0.10` gfx90a
/// (the last two numbers are written as hex digits in target names). `None` for anything else.
pub fn gfx_from_override(value: &str) -> Option<String> {
    let parts: Vec<u32> = value
        .trim()
        .split('.')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    match parts[..] {
        [major, minor, step] if major > 0 && minor < 16 && step < 16 => {
            Some(format!("gfx{major}{minor:x}{step:x}"))
        }
        _ => None,
    }
}

/// The targets `PYTORCH_ROCM_ARCH` lists (`gfx1030;gfx90a:xnack-` gives gfx1030 and gfx90a).
pub fn gfx_from_arch_list(value: &str) -> Vec<String> {
    value
        .split(|c: char| c == ';' || c == ',' || c.is_whitespace())
        .filter_map(|t| t.split(':').next())
        .filter(|t| t.starts_with("gfx") && t.len() > 3)
        .map(str::to_string)
        .collect()
}

/// What quirk matching needs to know of one GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Device<'a> {
    pub index: u32,
    pub vendor: Vendor,
    pub name: Option<&'a str>,
    /// The GPU's own gfx target, from KFD (not from any environment variable).
    pub gfx_target: Option<&'a str>,
}

impl<'a> From<&'a Gpu> for Device<'a> {
    fn from(gpu: &'a Gpu) -> Device<'a> {
        Device {
            index: gpu.index,
            vendor: gpu.vendor,
            name: gpu.name.as_deref(),
            gfx_target: gpu.gfx_target.as_deref(),
        }
    }
}

impl fmt::Display for Device<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GPU {}", self.index)?;
        if let Some(name) = self.name {
            write!(f, " ({name})")?;
        }
        Ok(())
    }
}

/// What is judged: the GPUs a job would see, its environment, the ROCm version found, and its
/// command line (`None`: no particular job, as `gpuwarden probe` asks).
#[derive(Clone, Debug)]
pub struct Situation<'a> {
    pub devices: Vec<Device<'a>>,
    pub env: &'a Env,
    pub rocm: Option<&'a Version>,
    pub job: Option<&'a str>,
}

/// What to do when no ROCm version was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IfRocmUnknown {
    /// Apply the quirk anyway: a missing version file must not let a known crash through.
    Apply,
    Skip,
}

/// One quirk of a quirk file, validated and compiled.
#[derive(Clone, Debug)]
pub struct Quirk {
    pub id: String,
    pub summary: String,
    pub vendor: Vendor,
    gfx_targets: Vec<glob::Pattern>,
    names: Vec<Regex>,
    rocm: Option<VersionReq>,
    if_rocm_unknown: IfRocmUnknown,
    job: Option<Regex>,
    /// The tier a run starts on when the quirk applies; `None`: only a warning.
    pub tier: Option<String>,
    pub advice: String,
    pub origin: Origin,
}

/// A quirk's verdict on one situation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Judgement {
    pub quirk: String,
    pub origin: Origin,
    pub applies: bool,
    pub summary: String,
    pub tier: Option<String>,
    /// Why it applies, one line per condition; or the one reason it does not.
    pub reasons: Vec<String>,
    /// The GPUs (indexes) it applies to.
    pub gpus: Vec<u32>,
    /// Set when the quirk is scoped to jobs and was judged without one: it applies only to
    /// commands matching this regex.
    pub only_for_jobs: Option<String>,
    pub advice: String,
}

impl Quirk {
    /// Judges one situation. The first condition that fails is the reason it does not apply.
    pub fn judge(&self, s: &Situation<'_>) -> Judgement {
        let base = Judgement {
            quirk: self.id.clone(),
            origin: self.origin.clone(),
            applies: false,
            summary: self.summary.clone(),
            tier: self.tier.clone(),
            reasons: Vec::new(),
            gpus: Vec::new(),
            only_for_jobs: None,
            advice: self.advice.clone(),
        };
        let not = |reason: String| Judgement {
            reasons: vec![reason],
            ..base.clone()
        };

        let ours: Vec<&Device<'_>> = s
            .devices
            .iter()
            .filter(|d| d.vendor == self.vendor)
            .collect();
        if ours.is_empty() {
            return not(format!("no {} GPU is visible", vendor_name(self.vendor)));
        }
        let mut reasons = Vec::new();
        let mut gpus = Vec::new();
        for device in &ours {
            if let Some(reason) = self.recognise(device, s.env) {
                reasons.push(reason);
                gpus.push(device.index);
            }
        }
        if gpus.is_empty() {
            let seen: Vec<String> = ours
                .iter()
                .map(|d| match d.gfx_target {
                    Some(t) => format!("{d} is {t}"),
                    None => format!("{d} has no known gfx target"),
                })
                .collect();
            return not(format!(
                "no visible GPU is {}: {}",
                self.wanted(),
                seen.join(", ")
            ));
        }

        if let Some(req) = &self.rocm {
            match (s.rocm, self.if_rocm_unknown) {
                (Some(v), _) if req.matches(v) => reasons.push(format!("ROCm {v} is {req}")),
                (Some(v), _) => return not(format!("ROCm {v} is not {req}")),
                (None, IfRocmUnknown::Apply) => reasons.push(format!(
                    "the ROCm version was not found, so it may be {req}: assumed affected"
                )),
                (None, IfRocmUnknown::Skip) => {
                    return not(format!(
                        "the ROCm version was not found, and this quirk needs {req}"
                    ));
                }
            }
        }

        let mut only_for_jobs = None;
        if let Some(job) = &self.job {
            match s.job {
                Some(command) if job.is_match(command) => {
                    reasons.push(format!("the command line matches `{job}`"));
                }
                Some(_) => return not(format!("the command line does not match `{job}`")),
                None => only_for_jobs = Some(job.as_str().to_string()),
            }
        }

        Judgement {
            applies: true,
            reasons,
            gpus,
            only_for_jobs,
            ..base
        }
    }

    /// How the device is recognised as one this quirk is about, if it is.
    fn recognise(&self, d: &Device<'_>, env: &Env) -> Option<String> {
        if let Some(t) = d.gfx_target
            && self.gfx_matches(t)
        {
            return Some(format!("{d} is {t}"));
        }
        let overridden = env
            .get(HSA_OVERRIDE_GFX_VERSION)
            .map(|v| (v, gfx_from_override(v)));
        if let Some((value, Some(t))) = &overridden
            && self.gfx_matches(t)
        {
            return Some(format!(
                "{HSA_OVERRIDE_GFX_VERSION}={value} makes ROCm run {d} as {t}"
            ));
        }
        // A build's target list says nothing about a GPU whose target is known, or overridden.
        if d.gfx_target.is_none()
            && !matches!(overridden, Some((_, Some(_))))
            && let Some(list) = env.get(PYTORCH_ROCM_ARCH)
            && let Some(t) = gfx_from_arch_list(list)
                .into_iter()
                .find(|t| self.gfx_matches(t))
        {
            return Some(format!(
                "{d} has no known gfx target and {PYTORCH_ROCM_ARCH}={list} names {t}"
            ));
        }
        if let Some(name) = d.name
            && let Some(re) = self.names.iter().find(|re| re.is_match(name))
        {
            return Some(format!("{d} has a name matching `{re}`"));
        }
        None
    }

    fn gfx_matches(&self, target: &str) -> bool {
        self.gfx_targets.iter().any(|p| p.matches(target))
    }

    /// The GPUs this quirk is about, in words: "gfx10* or named like `RX 6\d{3}`".
    fn wanted(&self) -> String {
        let mut ways: Vec<String> = self.gfx_targets.iter().map(|p| p.to_string()).collect();
        ways.extend(self.names.iter().map(|re| format!("named like `{re}`")));
        ways.join(" or ")
    }
}

fn vendor_name(v: Vendor) -> &'static str {
    match v {
        Vendor::Amd => "AMD",
        Vendor::Nvidia => "NVIDIA",
    }
}

/// Every quirk gpuwarden knows, in file order (built-in first).
#[derive(Clone, Debug, Default)]
pub struct QuirkSet {
    quirks: Vec<Quirk>,
}

impl QuirkSet {
    /// The built-in quirks, then those of `files`, in order. Ids must be unique across all.
    pub fn load(files: &[PathBuf]) -> Result<QuirkSet, QuirkError> {
        let (name, text) = BUILTIN;
        let mut quirks = parse(name, text)?;
        for path in files {
            let text = std::fs::read_to_string(path).map_err(|source| QuirkError::Read {
                path: path.clone(),
                source,
            })?;
            quirks.extend(parse(&path.display().to_string(), &text)?);
        }
        QuirkSet::new(quirks)
    }

    /// A set of already parsed quirks; fails on a repeated id.
    pub fn new(quirks: Vec<Quirk>) -> Result<QuirkSet, QuirkError> {
        for (i, q) in quirks.iter().enumerate() {
            if let Some(first) = quirks[..i].iter().find(|f| f.id == q.id) {
                return Err(QuirkError::DuplicateId {
                    at: FORMAT.at(&q.origin, Some(&q.id)),
                    first: first.origin.clone(),
                });
            }
        }
        Ok(QuirkSet { quirks })
    }

    pub fn quirks(&self) -> &[Quirk] {
        &self.quirks
    }

    /// Every quirk's judgement of `s`, in file order.
    pub fn judge(&self, s: &Situation<'_>) -> Vec<Judgement> {
        self.quirks.iter().map(|q| q.judge(s)).collect()
    }
}

/// A quirk file that cannot be used. Like a broken rule file, it stops gpuwarden before a job
/// starts: running with a quirk silently missing would walk into the very crash it describes.
#[derive(Debug, thiserror::Error)]
pub enum QuirkError {
    #[error("{}: cannot read quirks: {source}; check that the file exists and is readable", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A problem any rule or quirk file can have: syntax, unknown keys, missing fields, wrong
    /// types, a bad id, an empty `summary` or `advice`.
    #[error(transparent)]
    File(#[from] FileError),

    #[error(
        "{at}: duplicate quirk id, already defined at {first}; rename one of them (ids are \
         unique across all quirk files, the built-in one included)"
    )]
    DuplicateId { at: Location, first: Origin },

    #[error(
        "{at}: neither `gfx_targets` nor `names` is given, so the quirk would hold for every GPU \
         of its vendor; say which GPUs it is about"
    )]
    NoDevices { at: Location },

    #[error(
        "{at}: invalid gfx target pattern `{pattern}`: {message}; write e.g. \"gfx1030\" or \"gfx10*\""
    )]
    BadGfxPattern {
        at: Location,
        pattern: String,
        message: String,
    },

    #[error("{at}: invalid regex in `{field}`: {message}; fix the regex")]
    BadRegex {
        at: Location,
        field: &'static str,
        message: String,
    },

    #[error(
        "{at}: invalid `rocm` requirement `{value}`: {message}; write e.g. \">=6.2\" or \">=6.2, <7\""
    )]
    BadRocm {
        at: Location,
        value: String,
        message: String,
    },

    #[error(
        "{at}: `rocm` is set on a quirk about NVIDIA GPUs, which never run ROCm; remove it or set vendor = \"amd\""
    )]
    RocmOnNvidia { at: Location },

    #[error(
        "{at}: tier name `{tier}` cannot be a tier; use only letters, digits, `-`, `_` and `.`"
    )]
    BadTier { at: Location, tier: String },

    #[error(
        "{at}: no examples; add at least one situation the quirk must apply to, so the file \
         shows (and the loader checks) what it means"
    )]
    NoExamples { at: Location },

    #[error("{at}: {kind} is not a valid situation: {message}")]
    BadExample {
        at: Location,
        kind: &'static str,
        message: String,
    },

    #[error(
        "{at}: this {kind} {}: {reason}; fix the {kind} or the quirk's conditions",
        if *kind == "example" { "does not apply" } else { "applies" }
    )]
    ExampleDisagrees {
        at: Location,
        kind: &'static str,
        reason: String,
    },
}

impl QuirkError {
    /// Where in a quirk file the problem is; `None` for a file that cannot be read.
    pub fn location(&self) -> Option<&Location> {
        match self {
            QuirkError::Read { .. } => None,
            QuirkError::File(err) => Some(err.location()),
            QuirkError::DuplicateId { at, .. }
            | QuirkError::NoDevices { at }
            | QuirkError::BadGfxPattern { at, .. }
            | QuirkError::BadRegex { at, .. }
            | QuirkError::BadRocm { at, .. }
            | QuirkError::RocmOnNvidia { at }
            | QuirkError::BadTier { at, .. }
            | QuirkError::NoExamples { at }
            | QuirkError::BadExample { at, .. }
            | QuirkError::ExampleDisagrees { at, .. } => Some(at),
        }
    }
}

/// The vendors a quirk file may name.
#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawVendor {
    Amd,
    Nvidia,
}

impl From<RawVendor> for Vendor {
    fn from(v: RawVendor) -> Vendor {
        match v {
            RawVendor::Amd => Vendor::Amd,
            RawVendor::Nvidia => Vendor::Nvidia,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    quirk: Vec<Spanned<RawQuirk>>,
}

/// One `[[quirk]]` as written, values with their spans so errors can name the line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuirk {
    id: Spanned<String>,
    summary: Spanned<String>,
    vendor: RawVendor,
    #[serde(default)]
    gfx_targets: Vec<Spanned<String>>,
    #[serde(default)]
    names: Vec<Spanned<String>>,
    rocm: Option<Spanned<String>>,
    if_rocm_unknown: Option<IfRocmUnknown>,
    job: Option<Spanned<String>>,
    tier: Option<Spanned<String>>,
    advice: Spanned<String>,
    // Optional here so that a quirk without examples gets our own error, which says why.
    examples: Option<Spanned<Vec<Spanned<RawExample>>>>,
    #[serde(default)]
    counterexamples: Vec<Spanned<RawExample>>,
}

/// One example situation: one GPU, its environment, the ROCm version, a command line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExample {
    vendor: Option<RawVendor>,
    gfx: Option<String>,
    name: Option<String>,
    rocm: Option<String>,
    #[serde(default)]
    env: Env,
    job: Option<String>,
}

/// The quirk file format: `[[quirk]]` tables only. Their fields, and those of the examples
/// inside them, are checked by the typed pass (`deny_unknown_fields`).
const FORMAT: Format = Format {
    noun: Noun::Quirk,
    tables: &[("quirk", None)],
    holds: "a quirk file holds only `[[quirk]]` tables",
    needs: "a [[quirk]] has id, summary, vendor, gfx_targets and/or names, advice and examples, \
            optionally rocm, if_rocm_unknown, job and tier (see rules/quirks.toml)",
};

/// Parses and validates the quirk file `text`; `file` names it in origins and errors. The
/// examples are judged too: a file whose examples disagree with its quirks is an error.
pub fn parse(file: &str, text: &str) -> Result<Vec<Quirk>, QuirkError> {
    let file = TomlFile {
        name: file,
        text,
        format: &FORMAT,
    };
    let raw: RawFile = file.load()?;
    raw.quirk
        .into_iter()
        .map(|raw| validate(&file, raw))
        .collect()
}

/// Checks one raw quirk, compiles it, and judges its examples.
fn validate(file: &TomlFile<'_>, raw: Spanned<RawQuirk>) -> Result<Quirk, QuirkError> {
    let header = raw.span().start;
    let raw = raw.into_inner();
    let id = file.id(&raw.id)?;
    let at = |offset: usize| file.at(offset, Some(id));
    let vendor = Vendor::from(raw.vendor);

    file.not_blank("summary", &raw.summary, id)?;
    file.not_blank("advice", &raw.advice, id)?;
    if raw.gfx_targets.is_empty() && raw.names.is_empty() {
        return Err(QuirkError::NoDevices { at: at(header) });
    }
    let mut gfx_targets = Vec::new();
    for pattern in &raw.gfx_targets {
        let text = pattern.get_ref();
        let compiled = glob::Pattern::new(text)
            .map_err(|e| e.msg.to_string())
            .and_then(|p| {
                if text.starts_with("gfx") {
                    Ok(p)
                } else {
                    Err("a gfx target starts with `gfx`".to_string())
                }
            })
            .map_err(|message| QuirkError::BadGfxPattern {
                at: at(pattern.span().start),
                pattern: text.clone(),
                message,
            })?;
        gfx_targets.push(compiled);
    }
    let regex = |field: &'static str, value: &Spanned<String>| {
        Regex::new(value.get_ref()).map_err(|e| QuirkError::BadRegex {
            at: at(value.span().start),
            field,
            message: regex_problem(&e),
        })
    };
    let names = raw
        .names
        .iter()
        .map(|n| regex("names", n))
        .collect::<Result<Vec<_>, _>>()?;
    let job = raw.job.as_ref().map(|j| regex("job", j)).transpose()?;
    let rocm = match &raw.rocm {
        Some(req) => {
            if vendor == Vendor::Nvidia {
                return Err(QuirkError::RocmOnNvidia {
                    at: at(req.span().start),
                });
            }
            Some(
                VersionReq::parse(req.get_ref()).map_err(|message| QuirkError::BadRocm {
                    at: at(req.span().start),
                    value: req.get_ref().clone(),
                    message,
                })?,
            )
        }
        None => None,
    };
    let tier = match raw.tier {
        Some(t) => {
            let name = t.get_ref();
            let ok = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !ok {
                return Err(QuirkError::BadTier {
                    at: at(t.span().start),
                    tier: name.clone(),
                });
            }
            Some(t.into_inner())
        }
        None => None,
    };

    let quirk = Quirk {
        id: id.to_string(),
        summary: raw.summary.into_inner(),
        vendor,
        gfx_targets,
        names,
        rocm,
        if_rocm_unknown: raw.if_rocm_unknown.unwrap_or(IfRocmUnknown::Apply),
        job,
        tier,
        advice: raw.advice.into_inner(),
        origin: file.origin(header),
    };

    let examples = toml_file::required(raw.examples, header)
        .map_err(|offset| QuirkError::NoExamples { at: at(offset) })?;
    let cases = examples.iter().map(|e| ("example", true, e)).chain(
        raw.counterexamples
            .iter()
            .map(|e| ("counterexample", false, e)),
    );
    for (kind, must_apply, example) in cases {
        let example_at = at(example.span().start);
        let judged =
            judge_example(&quirk, example.get_ref()).map_err(|message| QuirkError::BadExample {
                at: example_at.clone(),
                kind,
                message,
            })?;
        if judged.applies != must_apply {
            let reason = if judged.applies {
                judged.reasons.join("; ")
            } else {
                judged.reasons.concat()
            };
            return Err(QuirkError::ExampleDisagrees {
                at: example_at,
                kind,
                reason,
            });
        }
    }
    Ok(quirk)
}

/// Judges an example situation against its quirk.
fn judge_example(quirk: &Quirk, example: &RawExample) -> Result<Judgement, String> {
    let rocm = match &example.rocm {
        Some(text) => Some(
            Version::parse_exact(text)
                .ok_or_else(|| format!("rocm = {text:?} is not a version such as 6.2.4"))?,
        ),
        None => None,
    };
    let device = Device {
        index: 0,
        vendor: example.vendor.map_or(quirk.vendor, Vendor::from),
        name: example.name.as_deref(),
        gfx_target: example.gfx.as_deref(),
    };
    Ok(quirk.judge(&Situation {
        devices: vec![device],
        env: &example.env,
        rocm: rocm.as_ref(),
        job: example.job.as_deref(),
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A valid quirk; tests replace one line of it to break it.
    const GOOD: &str = r#"[[quirk]]
id = "test-rdna"
summary = "RDNA2 crashes."
vendor = "amd"
gfx_targets = ["gfx103*"]
rocm = ">=6.2"
job = '''(?i)eegnex'''
tier = "cpu"
advice = "Use the CPU."
examples = [{ gfx = "gfx1030", rocm = "6.2.4", job = "python eegnex.py" }]
counterexamples = [{ gfx = "gfx1030", rocm = "6.1", job = "python eegnex.py" }]
"#;

    fn with(from: &str, to: &str) -> String {
        assert!(GOOD.contains(from), "{from}");
        GOOD.replacen(from, to, 1)
    }

    fn error(text: &str) -> String {
        parse("my.toml", text).unwrap_err().to_string()
    }

    fn device(gfx: Option<&'static str>, name: Option<&'static str>) -> Device<'static> {
        Device {
            index: 0,
            vendor: Vendor::Amd,
            name,
            gfx_target: gfx,
        }
    }

    fn judge(
        quirk: &Quirk,
        d: Device<'_>,
        env: &Env,
        rocm: Option<&str>,
        job: Option<&str>,
    ) -> Judgement {
        let rocm = rocm.map(|r| Version::parse_exact(r).unwrap());
        quirk.judge(&Situation {
            devices: vec![d],
            env,
            rocm: rocm.as_ref(),
            job,
        })
    }

    #[test]
    fn the_builtin_file_loads_and_its_examples_hold() {
        let set = QuirkSet::load(&[]).unwrap();
        let ids: Vec<&str> = set.quirks().iter().map(|q| q.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "rdna-rocm62-eegnex-spatial-conv",
                "rdna-rocm62-memory-faults"
            ]
        );
        let first = &set.quirks()[0];
        assert_eq!(first.tier.as_deref(), Some("cpu"));
        // The origin points at the [[quirk]] header, then the id.
        let lines: Vec<&str> = BUILTIN.1.lines().collect();
        assert_eq!(lines[first.origin.line - 1], "[[quirk]]");
        assert_eq!(
            lines[first.origin.line],
            "id = \"rdna-rocm62-eegnex-spatial-conv\""
        );
    }

    #[test]
    fn all_conditions_must_hold() {
        let q = &parse("t.toml", GOOD).unwrap()[0];
        let env = Env::new();
        let eeg = Some("python train_eegnex.py");
        assert!(judge(q, device(Some("gfx1030"), None), &env, Some("6.2.4"), eeg).applies);
        assert!(judge(q, device(Some("gfx1036"), None), &env, Some("7.0"), eeg).applies);
        let no = judge(q, device(Some("gfx1030"), None), &env, Some("6.1"), eeg);
        assert_eq!(no.reasons, ["ROCm 6.1 is not >=6.2"]);
        let no = judge(q, device(Some("gfx1100"), None), &env, Some("6.2.4"), eeg);
        assert_eq!(no.reasons, ["no visible GPU is gfx103*: GPU 0 is gfx1100"]);
        let no = judge(
            q,
            device(Some("gfx1030"), None),
            &env,
            Some("6.2.4"),
            Some("python sam.py"),
        );
        assert_eq!(no.reasons, ["the command line does not match `(?i)eegnex`"]);
        // Judged for no particular job, it applies to the jobs its regex names.
        let any = judge(q, device(Some("gfx1030"), None), &env, Some("6.2.4"), None);
        assert!(any.applies);
        assert_eq!(any.only_for_jobs.as_deref(), Some("(?i)eegnex"));
    }

    #[test]
    fn any_detection_way_recognises_the_gpu() {
        let text = with(
            "rocm = \">=6.2\"\n",
            "rocm = \">=6.2\"\nnames = ['''RX 6\\d{3}''']\n",
        );
        let q = &parse("t.toml", &text).unwrap()[0];
        let none = Env::new();
        let job = Some("eegnex");
        // By name, with no gfx target known.
        let j = judge(
            q,
            device(None, Some("AMD Radeon RX 6700 XT")),
            &none,
            None,
            job,
        );
        assert!(j.applies);
        assert_eq!(
            j.reasons[0],
            "GPU 0 (AMD Radeon RX 6700 XT) has a name matching `RX 6\\d{3}`"
        );
        // By override, whatever the card is.
        let over: Env = [(HSA_OVERRIDE_GFX_VERSION.to_string(), "10.3.0".to_string())].into();
        assert!(judge(q, device(Some("gfx1100"), None), &over, None, job).applies);
        // By build list, only for a GPU whose target is unknown.
        let arch: Env = [(PYTORCH_ROCM_ARCH.to_string(), "gfx90a;gfx1030".to_string())].into();
        let j = judge(q, device(None, None), &arch, None, job);
        assert_eq!(
            j.reasons[0],
            "GPU 0 has no known gfx target and PYTORCH_ROCM_ARCH=gfx90a;gfx1030 names gfx1030"
        );
        assert!(!judge(q, device(Some("gfx90a"), None), &arch, None, job).applies);
        // Neither: an unknown GPU with no hint.
        let j = judge(
            q,
            device(None, Some("AMD Radeon Graphics")),
            &none,
            None,
            job,
        );
        assert_eq!(
            j.reasons,
            [
                "no visible GPU is gfx103* or named like `RX 6\\d{3}`: GPU 0 (AMD Radeon Graphics) has no known gfx target"
            ]
        );
    }

    #[test]
    fn if_rocm_unknown_skip_spares_an_unknown_version() {
        let text = with(
            "tier = \"cpu\"\n",
            "tier = \"cpu\"\nif_rocm_unknown = \"skip\"\n",
        );
        let q = &parse("t.toml", &text).unwrap()[0];
        let j = judge(
            q,
            device(Some("gfx1030"), None),
            &Env::new(),
            None,
            Some("eegnex"),
        );
        assert!(!j.applies);
        assert_eq!(
            j.reasons,
            ["the ROCm version was not found, and this quirk needs >=6.2"]
        );
    }

    #[test]
    fn versions_and_requirements() {
        let req = VersionReq::parse(">= 6.2, <7").unwrap();
        let v = |t: &str| Version::parse_exact(t).unwrap();
        assert!(req.matches(&v("6.2")));
        assert!(req.matches(&v("6.4.3")));
        assert!(!req.matches(&v("7.0.0")));
        assert!(!req.matches(&v("6.1.2")));
        assert!(VersionReq::parse("=6.2.4").unwrap().matches(&v("6.2.4")));
        assert!(VersionReq::parse(">6.2").unwrap().matches(&v("6.2.1")));
        assert_eq!(
            VersionReq::parse("~6.2").unwrap_err(),
            "`~6.2` does not start with a comparison (>=, >, <=, <, =)"
        );
        assert_eq!(
            VersionReq::parse(">=six").unwrap_err(),
            "`six` is not a version such as 6.2 or 6.2.4"
        );
        assert_eq!(gfx_from_override("10.3.0").as_deref(), Some("gfx1030"));
        assert_eq!(gfx_from_override("9.0.10").as_deref(), Some("gfx90a"));
        assert_eq!(gfx_from_override("11.0.0").as_deref(), Some("gfx1100"));
        assert_eq!(gfx_from_override("10.3"), None);
        assert_eq!(gfx_from_override("gfx1030"), None);
        assert_eq!(
            gfx_from_arch_list("gfx90a:xnack-;gfx1030 gfx1100,gfx942"),
            ["gfx90a", "gfx1030", "gfx1100", "gfx942"]
        );
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_quirk() {
        assert_eq!(
            error(&with("vendor = \"amd\"", "vendor = \"intel\"")),
            "my.toml:4: quirk `test-rdna`: unknown variant `intel`, expected `amd` or `nvidia`; a [[quirk]] has id, summary, vendor, gfx_targets and/or names, advice and examples, optionally rocm, if_rocm_unknown, job and tier (see rules/quirks.toml)"
        );
        assert!(
            error(&with("tier = \"cpu\"", "tier = \"cpu\"\nteir = \"gpu\""))
                .starts_with("my.toml:9: quirk `test-rdna`: unknown field `teir`"),
        );
        assert_eq!(
            error(&with("id = \"test-rdna\"", "id = \"Test RDNA\"")),
            "my.toml:2: invalid id `Test RDNA`; use only lowercase letters, digits and `-`"
        );
        assert_eq!(
            error(&with("rocm = \">=6.2\"", "rocm = \"6.2+\"")),
            "my.toml:6: quirk `test-rdna`: invalid `rocm` requirement `6.2+`: `6.2+` does not start with a comparison (>=, >, <=, <, =); write e.g. \">=6.2\" or \">=6.2, <7\""
        );
        assert!(
            error(&with("job = '''(?i)eegnex'''", "job = '''(eegnex'''")).starts_with(
                "my.toml:7: quirk `test-rdna`: invalid regex in `job`: unclosed group"
            ),
        );
        assert!(
            error(&with(
                "gfx_targets = [\"gfx103*\"]",
                "gfx_targets = [\"10.3.0\"]"
            ))
            .starts_with("my.toml:5: quirk `test-rdna`: invalid gfx target pattern `10.3.0`"),
        );
        assert!(
            error(&with("gfx_targets = [\"gfx103*\"]\n", "")).starts_with(
                "my.toml:1: quirk `test-rdna`: neither `gfx_targets` nor `names` is given"
            ),
        );
        assert!(
            error(&with("tier = \"cpu\"", "tier = \"c p u\""))
                .starts_with("my.toml:8: quirk `test-rdna`: tier name `c p u` cannot be a tier"),
        );
        assert_eq!(
            error(&with("vendor = \"amd\"", "vendor = \"nvidia\"")),
            "my.toml:6: quirk `test-rdna`: `rocm` is set on a quirk about NVIDIA GPUs, which never run ROCm; remove it or set vendor = \"amd\""
        );
        assert!(
            error(&with("examples = [{ gfx = \"gfx1030\", rocm = \"6.2.4\", job = \"python eegnex.py\" }]\n", ""))
                .starts_with("my.toml:1: quirk `test-rdna`: no examples"),
        );
        assert!(error("[[quirk]\n").starts_with("my.toml:1: not valid TOML"));
        assert!(error("[[rule]]\nid = \"x\"\n").starts_with(
            "my.toml:1: unknown top-level key `rule`; a quirk file holds only `[[quirk]]` tables"
        ),);
        assert!(
            error(&with("advice = \"Use the CPU.\"", "advice = \" \""))
                .starts_with("my.toml:9: quirk `test-rdna`: `advice` is empty")
        );
    }

    #[test]
    fn examples_that_disagree_with_their_quirk_do_not_load() {
        assert_eq!(
            error(&with("rocm = \"6.2.4\", job", "rocm = \"6.0\", job")),
            "my.toml:10: quirk `test-rdna`: this example does not apply: ROCm 6.0 is not >=6.2; fix the example or the quirk's conditions"
        );
        assert_eq!(
            error(&with("rocm = \"6.1\", job", "rocm = \"6.3\", job")),
            "my.toml:11: quirk `test-rdna`: this counterexample applies: GPU 0 is gfx1030; ROCm 6.3 is >=6.2; the command line matches `(?i)eegnex`; fix the counterexample or the quirk's conditions"
        );
        assert_eq!(
            error(&with("rocm = \"6.1\", job", "rocm = \"latest\", job")),
            "my.toml:11: quirk `test-rdna`: counterexample is not a valid situation: rocm = \"latest\" is not a version such as 6.2.4"
        );
        assert!(
            error(&with("rocm = \"6.1\", job", "rcom = \"6.1\", job"))
                .starts_with("my.toml:11: quirk `test-rdna`: unknown field `rcom`"),
        );
    }

    #[test]
    fn ids_are_unique_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let mine = dir.path().join("mine.toml");
        std::fs::write(
            &mine,
            with("id = \"test-rdna\"", "id = \"rdna-rocm62-memory-faults\""),
        )
        .unwrap();
        let err = QuirkSet::load(std::slice::from_ref(&mine))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "{}:1: quirk `rdna-rocm62-memory-faults`: duplicate quirk id, already defined at rules/quirks.toml:{}; rename one of them (ids are unique across all quirk files, the built-in one included)",
                mine.display(),
                QuirkSet::load(&[]).unwrap().quirks()[1].origin.line
            )
        );
        std::fs::write(&mine, GOOD).unwrap();
        assert_eq!(QuirkSet::load(&[mine]).unwrap().quirks().len(), 3);
        let missing = dir.path().join("nope.toml");
        let err = QuirkSet::load(&[missing]).unwrap_err();
        assert!(err.location().is_none());
        assert!(err.to_string().contains("nope.toml: cannot read quirks"));
    }
}
