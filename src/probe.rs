//! The pre-flight probe: what GPUs and GPU software this machine has, which environment variables
//! steer them, and which known-bad combinations of `rules/quirks.toml` apply. `gpuwarden probe`
//! prints it; `gpuwarden run` asks [`start_tier`] which tier of the ladder to start on, which is
//! the EEG2025 team's `apply_gfx1030_safeguard()` for any job.
//!
//! The probe is a plain value ([`Probe`], serialisable for `--json`) built from facts gathered
//! beforehand: the GPU inventory comes from `sources::health` (sysfs, nvidia-smi), the software
//! versions from [`Software::detect`], which reads files under a configurable root so tests can
//! lay out a fake `/opt/rocm`. The tools (nvidia-smi) are run by `sources::health`, not here,
//! and nothing here reads GPU health metrics. Quirk files and their match semantics are `crate::quirks`'.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Serialize, Serializer};

use crate::config::Plan;
use crate::gpu::{Gpu, Vendor};
use crate::ladder::Tier;
use crate::quirks::{Device, Env, Judgement, QuirkSet, Situation, Version};
pub use crate::verdict::{Decision, Verdict};

/// The environment variables the probe reports and the quirks read, in the order shown.
pub const ENV_VARS: [&str; 6] = [
    "HSA_OVERRIDE_GFX_VERSION",
    "PYTORCH_ROCM_ARCH",
    "ROCR_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "CUDA_VISIBLE_DEVICES",
    "ROCM_PATH",
];

/// The relevant variables of an environment (`get` is `std::env::var_os` in the binary), decoded
/// lossily: their values are ASCII in practice.
pub fn read_env(get: impl Fn(&str) -> Option<OsString>) -> Env {
    ENV_VARS
        .iter()
        .filter_map(|name| get(name).map(|v| (name.to_string(), v.to_string_lossy().into_owned())))
        .collect()
}

/// A version found on disk, and the file it was read from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Found {
    pub version: Version,
    pub from: PathBuf,
}

/// The GPU software installed under a filesystem root.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Software {
    /// ROCm installations, the one jobs use first: `$ROCM_PATH`, then `/opt/rocm`, then the
    /// `/opt/rocm-X.Y.Z` directories, newest first. The same directory is listed once.
    pub rocm: Vec<Found>,
    /// `$ROCM_PATH` when it names a directory whose version cannot be told (a custom build such
    /// as the seed's `/opt/rocm_sdk_612`): jobs use that ROCm, so its version counts as unknown.
    pub rocm_path_unversioned: Option<PathBuf>,
    /// The NVIDIA kernel driver, from `/proc/driver/nvidia/version`.
    pub nvidia_driver: Option<Found>,
    /// The CUDA toolkit of `/usr/local/cuda`.
    pub cuda_toolkit: Option<Found>,
}

impl Software {
    /// Reads the versions under `root` (`/` on a real machine). `ROCM_PATH` from `env`, an
    /// absolute path, is taken relative to `root` too. Unreadable files count as absent.
    pub fn detect(root: &Path, env: &Env) -> Software {
        let mut candidates: Vec<PathBuf> = Vec::new();
        let mut rocm_path_unversioned = None;
        if let Some(path) = env.get("ROCM_PATH").filter(|p| !p.trim().is_empty()) {
            let dir = under(root, Path::new(path.trim()));
            if rocm_version(&dir).is_none() {
                rocm_path_unversioned = Some(dir.clone());
            }
            candidates.push(dir);
        }
        candidates.push(root.join("opt/rocm"));
        let mut versioned: Vec<(Version, PathBuf)> = std::fs::read_dir(root.join("opt"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let version = Version::parse_exact(name.strip_prefix("rocm-")?)?;
                Some((version, entry.path()))
            })
            .collect();
        versioned.sort_by(|a, b| b.0.cmp(&a.0));
        candidates.extend(versioned.into_iter().map(|(_, path)| path));

        let mut rocm = Vec::new();
        let mut seen: Vec<PathBuf> = Vec::new();
        for dir in candidates {
            let Some(found) = rocm_version(&dir) else {
                continue;
            };
            // /opt/rocm is usually a link to /opt/rocm-X.Y.Z: one installation, listed once.
            let real = std::fs::canonicalize(&dir).unwrap_or(dir);
            if !seen.contains(&real) {
                seen.push(real);
                rocm.push(found);
            }
        }
        Software {
            rocm,
            rocm_path_unversioned,
            nvidia_driver: nvidia_driver_version(&root.join("proc/driver/nvidia/version")),
            cuda_toolkit: cuda_toolkit_version(&root.join("usr/local/cuda")),
        }
    }

    /// The ROCm version jobs use, as far as can be told.
    pub fn rocm_version(&self) -> Option<&Version> {
        if self.rocm_path_unversioned.is_some() {
            return None;
        }
        self.rocm.first().map(|f| &f.version)
    }
}

/// `path` (absolute) under `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// The version of the ROCm installed in `dir`: `.info/version` (`6.2.4-120`), else
/// `include/rocm-core/rocm_version.h`, else the directory's name (`rocm-6.2.4`). No `hipconfig`
/// is run: it is a Perl script that can take seconds, and may be missing.
pub fn rocm_version(dir: &Path) -> Option<Found> {
    let info = dir.join(".info/version");
    if let Some(version) = read_small(&info).and_then(|t| Version::parse_prefix(t.trim())) {
        return Some(Found {
            version,
            from: info,
        });
    }
    let header = dir.join("include/rocm-core/rocm_version.h");
    if let Some(version) = read_small(&header).and_then(|t| version_from_header(&t)) {
        return Some(Found {
            version,
            from: header,
        });
    }
    let name = dir.file_name()?.to_string_lossy();
    let version = Version::parse_exact(name.strip_prefix("rocm-")?)?;
    dir.is_dir().then(|| Found {
        version,
        from: dir.to_path_buf(),
    })
}

/// The version in `rocm_version.h`: `#define ROCM_VERSION_MAJOR 6` and so on.
pub fn version_from_header(text: &str) -> Option<Version> {
    let part = |name: &str| {
        text.lines().find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("#define") && words.next() == Some(name))
                .then(|| words.next()?.parse::<u32>().ok())
                .flatten()
        })
    };
    let (major, minor) = (part("ROCM_VERSION_MAJOR")?, part("ROCM_VERSION_MINOR")?);
    let patch = part("ROCM_VERSION_PATCH").unwrap_or(0);
    Version::parse_exact(&format!("{major}.{minor}.{patch}"))
}

/// The driver version in `/proc/driver/nvidia/version`, whose first line is
/// `NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024`
/// (the open module says `NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build`).
pub fn nvidia_driver_version(path: &Path) -> Option<Found> {
    let text = read_small(path)?;
    let version = parse_nvrm(&text)?;
    Some(Found {
        version,
        from: path.to_path_buf(),
    })
}

/// The first dotted number of the `NVRM version:` line.
pub fn parse_nvrm(text: &str) -> Option<Version> {
    let line = text.lines().find(|l| l.starts_with("NVRM version:"))?;
    line.split_whitespace()
        .filter(|word| word.contains('.'))
        .find_map(Version::parse_exact)
}

/// The CUDA toolkit's version: `version.json` (CUDA 11.1 and later:
/// `{"cuda": {"name": "CUDA SDK", "version": "12.4.1"}}`), else `version.txt`
/// (`CUDA Version 10.2.89`), else `include/cuda.h` (`#define CUDA_VERSION 13000`: the distro
/// packages of CUDA 13 ship neither file), else the name the directory links to (`cuda-13.0`).
pub fn cuda_toolkit_version(dir: &Path) -> Option<Found> {
    let json = dir.join("version.json");
    let from_json = read_small(&json).and_then(|text| {
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        Version::parse_exact(v.get("cuda")?.get("version")?.as_str()?)
    });
    let txt = dir.join("version.txt");
    let from_txt = || {
        read_small(&txt)?
            .trim()
            .strip_prefix("CUDA Version")
            .and_then(Version::parse_exact)
    };
    let header = dir.join("include/cuda.h");
    let from_header = || {
        let text = read_small(&header)?;
        let n: u32 = text.lines().find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("#define") && words.next() == Some("CUDA_VERSION"))
                .then(|| words.next()?.parse().ok())
                .flatten()
        })?;
        Version::parse_exact(&format!("{}.{}", n / 1000, n % 1000 / 10))
    };
    let real = std::fs::canonicalize(dir).ok();
    let from_name = || {
        let name = real.as_ref()?.file_name()?.to_str()?;
        Version::parse_exact(name.strip_prefix("cuda-")?)
    };
    if let Some(version) = from_json {
        Some(Found {
            version,
            from: json,
        })
    } else if let Some(version) = from_txt() {
        Some(Found { version, from: txt })
    } else if let Some(version) = from_header() {
        Some(Found {
            version,
            from: header,
        })
    } else {
        let version = from_name()?;
        Some(Found {
            version,
            from: real?,
        })
    }
}

/// A small text file's content (lossily decoded), or `None` when it cannot be read. Version
/// files are a few bytes and `cuda.h` defines its version in the first few KiB; the cap keeps a
/// wrong path (a device file) from being read whole.
fn read_small(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(64 * 1024)
        .read_to_end(&mut bytes)
        .ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// The GPUs of `gpus` a job would see under `env`.
///
/// A list is read as CUDA reads it: indexes or `GPU-` UUID prefixes, stopping at the first entry
/// that names no GPU (`-1` hides them all). A value that cannot be read (MIG names, AMD UUIDs)
/// hides nothing: a quirk should rather judge a GPU too many.
pub fn visible<'a>(gpus: &'a [Gpu], env: &Env) -> Vec<&'a Gpu> {
    let (amd, nvidia) = by_runtime(gpus, env);
    gpus.iter()
        .filter(|g| amd.iter().chain(&nvidia).any(|v| std::ptr::eq(*v, *g)))
        .collect()
}

/// The AMD and the NVIDIA GPUs of `gpus` a job sees under `env`, each in the order its runtime
/// numbers them (the job's ordinals).
///
/// AMD: `ROCR_VISIBLE_DEVICES` selects among all GPUs, then `HIP_VISIBLE_DEVICES` (or, when it
/// is unset, `CUDA_VISIBLE_DEVICES`, which HIP also honours) among those. NVIDIA:
/// `CUDA_VISIBLE_DEVICES`. Each list is applied by [`select`].
pub(crate) fn by_runtime<'a>(gpus: &'a [Gpu], env: &Env) -> (Vec<&'a Gpu>, Vec<&'a Gpu>) {
    let of = |vendor: Vendor| {
        let mut list: Vec<&Gpu> = gpus.iter().filter(|g| g.vendor == vendor).collect();
        list.sort_by_key(|g| g.index);
        list
    };
    let mut amd = of(Vendor::Amd);
    if let Some(value) = env.get("ROCR_VISIBLE_DEVICES") {
        amd = select(amd, value);
    }
    if let Some(value) = env
        .get("HIP_VISIBLE_DEVICES")
        .or_else(|| env.get("CUDA_VISIBLE_DEVICES"))
    {
        amd = select(amd, value);
    }
    let mut nvidia = of(Vendor::Nvidia);
    if let Some(value) = env.get("CUDA_VISIBLE_DEVICES") {
        nvidia = select(nvidia, value);
    }
    (amd, nvidia)
}

/// Applies one `*_VISIBLE_DEVICES` list to `list` (positions are indexes into `list`).
pub(crate) fn select<'a>(list: Vec<&'a Gpu>, value: &str) -> Vec<&'a Gpu> {
    let mut chosen: Vec<&Gpu> = Vec::new();
    for entry in value.split(',').map(str::trim) {
        if entry.is_empty() && value.trim().is_empty() {
            break;
        }
        let gpu = if let Ok(n) = entry.parse::<i64>() {
            usize::try_from(n).ok().and_then(|i| list.get(i).copied())
        } else if entry.starts_with("GPU-") && list.iter().any(|g| g.uuid.is_some()) {
            list.iter()
                .copied()
                .find(|g| g.uuid.as_deref().is_some_and(|u| u.starts_with(entry)))
        } else {
            return list;
        };
        match gpu {
            Some(g) if !chosen.iter().any(|c| std::ptr::eq(*c, g)) => chosen.push(g),
            Some(_) => {}
            None => break,
        }
    }
    chosen
}

/// One GPU of the probe, and whether a job started with gpuwarden's environment would see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProbedGpu {
    #[serde(flatten)]
    pub gpu: Gpu,
    pub visible: bool,
}

/// Everything the probe found. Serialised as is by `gpuwarden probe --json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Probe {
    pub gpus: Vec<ProbedGpu>,
    /// What the inventory could not look at ("nvidia-smi: not found"), in words.
    pub notes: Vec<String>,
    pub software: Software,
    /// The variables of [`ENV_VARS`] that are set; the JSON lists every one, unset ones as null.
    #[serde(serialize_with = "all_env_vars")]
    pub env: Env,
    /// The command the quirks were judged for, if one was given.
    pub job: Option<String>,
    /// Every quirk's judgement, in file order.
    pub quirks: Vec<Judgement>,
}

fn all_env_vars<S: Serializer>(env: &Env, s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(ENV_VARS.iter().map(|name| (*name, env.get(*name))))
}

impl Probe {
    /// Judges the inventory `gpus` with `software` and `env` against `quirks`, for the command
    /// line `job` or, without one, for any job.
    pub fn new(
        gpus: Vec<Gpu>,
        notes: Vec<String>,
        software: Software,
        env: Env,
        quirks: &QuirkSet,
        job: Option<&str>,
    ) -> Probe {
        let shown: Vec<&Gpu> = visible(&gpus, &env);
        let judgements = quirks.judge(&Situation {
            devices: shown.iter().map(|g| Device::from(*g)).collect(),
            env: &env,
            rocm: software.rocm_version(),
            job,
        });
        let gpus = gpus
            .iter()
            .map(|g| ProbedGpu {
                gpu: g.clone(),
                visible: shown.iter().any(|s| std::ptr::eq(*s, g)),
            })
            .collect();
        Probe {
            gpus,
            notes,
            software,
            env,
            job: job.map(str::to_string),
            quirks: judgements,
        }
    }

    /// Reads the software under `root` and gpuwarden's own environment, then as [`Probe::new`].
    pub fn gather(
        gpus: Vec<Gpu>,
        notes: Vec<String>,
        root: &Path,
        quirks: &QuirkSet,
        job: Option<&str>,
    ) -> Probe {
        let env = read_env(|name| std::env::var_os(name));
        let software = Software::detect(root, &env);
        Probe::new(gpus, notes, software, env, quirks, job)
    }

    /// The quirks that apply.
    pub fn applying(&self) -> impl Iterator<Item = &Judgement> {
        self.quirks.iter().filter(|j| j.applies)
    }

    /// The report `gpuwarden probe` prints.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let applying = self.applying().count();
        let _ = writeln!(
            out,
            "{}; {}",
            match self.gpus.len() {
                0 => "no GPU found".to_string(),
                1 => "1 GPU".to_string(),
                n => format!("{n} GPUs"),
            },
            match applying {
                0 => "no known GPU problem applies".to_string(),
                1 => "1 known GPU problem applies".to_string(),
                n => format!("{n} known GPU problems apply"),
            }
        );

        out.push_str("\nGPUs\n");
        if self.gpus.is_empty() {
            out.push_str("  no GPU found\n");
        }
        let rows: Vec<Vec<String>> = self.gpus.iter().map(gpu_row).collect();
        table(&mut out, &rows);
        for note in &self.notes {
            let _ = writeln!(out, "  note: {note}");
        }

        out.push_str("\nSoftware\n");
        let row = |what: &str, found: Option<&Found>, extra: &str| match found {
            Some(f) => vec![
                what.to_string(),
                f.version.to_string(),
                format!("{}{extra}", f.from.display()),
            ],
            None => vec![what.to_string(), "not found".to_string()],
        };
        let mut rows = Vec::new();
        let unknown_first = self.software.rocm_path_unversioned.is_some();
        if let Some(dir) = &self.software.rocm_path_unversioned {
            rows.push(vec![
                "ROCm".to_string(),
                "unknown".to_string(),
                format!(
                    "ROCM_PATH names {}, which has no version file",
                    dir.display()
                ),
            ]);
        } else if self.software.rocm.is_empty() {
            rows.push(row("ROCm", None, ""));
        }
        for (i, found) in self.software.rocm.iter().enumerate() {
            let (what, extra) = if i == 0 && !unknown_first {
                ("ROCm", "")
            } else {
                ("", " (also installed)")
            };
            rows.push(row(what, Some(found), extra));
        }
        rows.push(row(
            "NVIDIA driver",
            self.software.nvidia_driver.as_ref(),
            "",
        ));
        rows.push(row("CUDA toolkit", self.software.cuda_toolkit.as_ref(), ""));
        table(&mut out, &rows);

        out.push_str("\nEnvironment\n");
        let rows: Vec<Vec<String>> = ENV_VARS
            .iter()
            .map(|name| {
                vec![
                    name.to_string(),
                    self.env
                        .get(*name)
                        .map_or_else(|| "(unset)".to_string(), |v| format!("{v:?}")),
                ]
            })
            .collect();
        table(&mut out, &rows);
        for g in self.gpus.iter().filter(|g| !g.visible) {
            let _ = writeln!(
                out,
                "  {} GPU {} is hidden from jobs by the *_VISIBLE_DEVICES variables",
                g.gpu.vendor.as_str(),
                g.gpu.index
            );
        }

        let _ = writeln!(out, "\nKnown GPU problems ({} checked)", self.quirks.len());
        if let Some(job) = &self.job {
            let _ = writeln!(out, "  for the command: {job}");
        }
        for j in self.quirks.iter().filter(|j| j.applies) {
            let scope = match &j.only_for_jobs {
                Some(re) => format!(", for commands matching `{re}`"),
                None => String::new(),
            };
            let action = match &j.tier {
                Some(tier) => format!("`gpuwarden run` starts on tier `{tier}`"),
                None => "`gpuwarden run` warns".to_string(),
            };
            let _ = writeln!(out, "  APPLIES {} ({}){scope}: {action}", j.quirk, j.origin);
            let _ = writeln!(out, "    {}", j.summary);
            for reason in &j.reasons {
                let _ = writeln!(out, "    - {reason}");
            }
            let _ = writeln!(out, "    what to do: {}", j.advice);
        }
        for j in self.quirks.iter().filter(|j| !j.applies) {
            let _ = writeln!(
                out,
                "  does not apply: {} ({}): {}",
                j.quirk,
                j.origin,
                j.reasons.join("; ")
            );
        }
        out
    }
}

fn gpu_row(g: &ProbedGpu) -> Vec<String> {
    let gpu = &g.gpu;
    let mut row = vec![
        format!("{} {}", gpu.vendor.as_str(), gpu.index),
        gpu.name.clone().unwrap_or_else(|| match gpu.device_id {
            Some(id) => format!("(device {id:#06x})"),
            None => "(unnamed)".to_string(),
        }),
        gpu.gfx_target
            .clone()
            .or_else(|| {
                gpu.compute_capability
                    .as_ref()
                    .map(|c| format!("compute {c}"))
            })
            .unwrap_or_else(|| "-".to_string()),
        gpu.pci.clone().unwrap_or_else(|| "-".to_string()),
        gpu.vram_total_bytes.map_or_else(
            || "-".to_string(),
            |b| format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30)),
        ),
    ];
    let mut extra = Vec::new();
    if let Some(node) = gpu.kfd_node {
        extra.push(format!("KFD node {node}"));
    }
    if let Some(driver) = &gpu.driver_version {
        extra.push(format!("driver {driver}"));
    }
    if let Some(uuid) = &gpu.uuid {
        extra.push(uuid.clone());
    }
    row.push(extra.join(", "));
    row
}

/// Writes rows as left-aligned columns, two spaces in, trailing spaces trimmed.
fn table(out: &mut String, rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            let w = cell.chars().count();
            match widths.get_mut(i) {
                Some(max) => *max = (*max).max(w),
                None => widths.push(w),
            }
        }
    }
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "  {}", cells.join("  ").trim_end());
    }
}

/// Whether a run of `plan` needs the probe at all: only when its first tier uses a GPU.
pub fn needed(plan: &Plan) -> bool {
    plan.ladder.first().is_some_and(|t| t.uses_gpu)
}

/// The command line quirks' `job` regexes are matched against: the arguments joined by spaces.
pub fn command_line(command: &[OsString]) -> String {
    command
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A quirk says where to start, and the ladder does not have that tier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "known GPU problem `{}` ({}): {} ({}). It says to start on tier `{tier}`, which the ladder \
     ({ladder}) does not have; the job was not started. Add the tier (e.g. --ladder \
     {suggested}), or pass --force-gpu-unsafe to start on the GPU anyway",
    .quirk.quirk, .quirk.origin, .quirk.summary, .quirk.reasons.join("; ")
)]
pub struct NoSafeTier {
    /// The quirk that applied.
    pub quirk: Box<Judgement>,
    /// The tier it names.
    pub tier: String,
    /// The ladder's tiers, comma-separated.
    pub ladder: String,
    /// The ladder with the tier added, as a --ladder value.
    pub suggested: String,
}

/// The tier a run of `plan` starts on.
///
/// Each tier that uses a GPU is judged with its own environment (gpuwarden's, with the tier's
/// `env` and `unset` applied: a tier may set `HSA_OVERRIDE_GFX_VERSION` or hide GPUs) and the
/// job's command line. When a quirk that names a tier applies, the run moves on to that tier,
/// which is judged in turn; of several such quirks, the one whose tier comes last on the ladder
/// wins. A quirk naming the tier being judged, or one before it, keeps it. The ROCm version is
/// the one found for gpuwarden's environment: a tier whose `env_script` switches to another ROCm
/// is judged by the system's.
///
/// With `plan.force_gpu_unsafe`, the first tier is kept and the overridden quirks are reported.
/// A quirk naming a tier the ladder lacks is an error, unless forced: the job is not started.
pub fn start_tier(plan: &Plan, probe: &Probe, quirks: &QuirkSet) -> Result<Verdict, NoSafeTier> {
    let ladder = &plan.ladder;
    let job = command_line(&plan.command);
    let gpus: Vec<Gpu> = probe.gpus.iter().map(|g| g.gpu.clone()).collect();
    let judge = |tier: &Tier| -> Vec<Judgement> {
        let env = tier_env(&probe.env, tier);
        let shown = visible(&gpus, &env);
        quirks
            .judge(&Situation {
                devices: shown.into_iter().map(Device::from).collect(),
                env: &env,
                rocm: probe.software.rocm_version(),
                job: Some(&job),
            })
            .into_iter()
            .filter(|j| j.applies)
            .collect()
    };
    let name_of = |i: usize| ladder.get(i).map_or_else(String::new, |t| t.name.clone());

    let mut at = 0;
    let mut movers: Vec<Judgement> = Vec::new();
    let mut warnings: Vec<Judgement> = Vec::new();
    let mut forced = false;
    while let Some(tier) = ladder.get(at).filter(|t| t.uses_gpu) {
        let applying = judge(tier);
        let (moving, warning): (Vec<Judgement>, Vec<Judgement>) =
            applying.into_iter().partition(|j| j.tier.is_some());
        warnings = warning;
        if moving.is_empty() {
            break;
        }
        if plan.force_gpu_unsafe {
            movers = moving;
            forced = true;
            break;
        }
        // Where each quirk wants the run; a missing tier ends the search.
        let mut target = at;
        let mut chosen = None;
        for j in &moving {
            let wanted = j.tier.as_deref().unwrap_or_default();
            let Some(pos) = ladder.iter().position(|t| t.name == wanted) else {
                let names: Vec<&str> = ladder.iter().map(|t| t.name.as_str()).collect();
                let mut suggested = names.clone();
                suggested.push(wanted);
                return Err(NoSafeTier {
                    quirk: Box::new(j.clone()),
                    tier: wanted.to_string(),
                    ladder: names.join(", "),
                    suggested: suggested.join(","),
                });
            };
            if pos > target {
                target = pos;
                chosen = Some(j.clone());
            }
        }
        match chosen {
            Some(j) => {
                movers.push(j);
                at = target;
                // Warnings belong to the tier the run starts on.
                warnings.clear();
            }
            None => break,
        }
    }

    let decision = if forced {
        Decision::Forced
    } else if movers.is_empty() {
        Decision::Clear
    } else {
        Decision::Moved
    };
    Ok(Verdict {
        start: at,
        start_tier: name_of(at),
        skipped_tiers: (0..at).map(name_of).collect(),
        decision,
        quirks: movers.into_iter().chain(warnings).collect(),
    })
}

/// gpuwarden's environment as a tier changes it: `unset` removed, `env` set.
fn tier_env(base: &Env, tier: &Tier) -> Env {
    let mut env = base.clone();
    for name in &tier.unset_env {
        env.remove(name);
    }
    for (name, value) in &tier.set_env {
        if ENV_VARS.contains(&name.as_str()) {
            env.insert(name.clone(), value.clone());
        }
    }
    env
}

/// How long [`inventory`] waits for nvidia-smi (it takes ~20-30 ms a call on a healthy GPU).
pub const NVIDIA_SMI_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The GPUs of this machine: AMD from sysfs under `sysfs_root` (marketing names from amdgpu.ids
/// under `root`), NVIDIA from nvidia-smi. The notes say where nothing was found.
///
/// The one function here that asks a tool: nvidia-smi, through `sources::health`, bounded by
/// [`NVIDIA_SMI_TIMEOUT`]. Callers gather it once and hand it to [`Probe::gather`].
pub fn inventory(sysfs_root: &Path, root: &Path) -> (Vec<Gpu>, Vec<String>) {
    use crate::sources::health::amd_sysfs::{AMDGPU_IDS_PATHS, AmdSysfs};
    let ids: Vec<PathBuf> = AMDGPU_IDS_PATHS
        .iter()
        .map(|p| root.join(Path::new(p).strip_prefix("/").unwrap_or(Path::new(p))))
        .collect();
    let mut gpus = AmdSysfs::discover(sysfs_root, &ids).gpus();
    let mut notes = Vec::new();
    match crate::sources::health::nvidia_inventory(NVIDIA_SMI_TIMEOUT) {
        Ok(nvidia) => gpus.extend(nvidia),
        Err(e) => notes.push(e),
    }
    if gpus.is_empty() {
        notes.push(format!(
            "looked for AMD GPUs in {} (KFD topology, DRM cards) and for NVIDIA GPUs with nvidia-smi",
            sysfs_root.display()
        ));
    }
    (gpus, notes)
}

/// The seed's GPU safeguard, before `gpuwarden run` starts anything: which tier of `plan`'s
/// ladder the run starts on. The tiers before it are dropped from `plan.ladder`, so the ladder
/// begins at the start tier; the verdict says which were skipped and why.
///
/// `Ok(None)` when the first tier uses no GPU: there is nothing to judge, and `gather` is not
/// called (in the binary it reads the GPU software under the root and gpuwarden's environment,
/// see [`Probe::gather`]). On [`NoSafeTier`] the ladder is left as it was and the job must not
/// be started.
pub fn preflight(
    plan: &mut Plan,
    quirks: &QuirkSet,
    gather: impl FnOnce() -> Probe,
) -> Result<Option<Verdict>, NoSafeTier> {
    if !needed(plan) {
        return Ok(None);
    }
    let verdict = start_tier(plan, &gather(), quirks)?;
    plan.ladder.drain(..verdict.start);
    Ok(Some(verdict))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rx6800() -> Gpu {
        Gpu {
            device_id: Some(0x73bf),
            kfd_node: Some(1),
            gfx_target: Some("gfx1030".into()),
            vram_total_bytes: Some(16 << 30),
            ..Gpu::for_test(Vendor::Amd, 0, "AMD Radeon RX 6800", "0000:03:00.0")
        }
    }

    fn amd(index: u32, gfx: Option<&str>, name: Option<&str>) -> Gpu {
        Gpu {
            index,
            name: name.map(str::to_string),
            gfx_target: gfx.map(str::to_string),
            pci: None,
            device_id: None,
            kfd_node: Some(index + 1),
            render_minor: None,
            vram_total_bytes: None,
            ..rx6800()
        }
    }

    fn h100(index: u32) -> Gpu {
        Gpu {
            vendor: Vendor::Nvidia,
            index,
            name: Some("NVIDIA H100 80GB HBM3".into()),
            pci: Some(format!("0000:{:02x}:00.0", 0x18 + index)),
            device_id: Some(0x2330),
            kfd_node: None,
            render_minor: None,
            gfx_target: None,
            compute_capability: Some("9.0".into()),
            uuid: Some(format!("GPU-{index}a2b3c4d-0000-1111-2222-333344445555")),
            vram_total_bytes: Some(85_520_809_984),
            driver_version: Some("550.54.15".into()),
        }
    }

    fn quirks() -> QuirkSet {
        QuirkSet::load(&[]).unwrap()
    }

    fn v(text: &str) -> Version {
        Version::parse_exact(text).unwrap()
    }

    fn software(rocm: Option<&str>) -> Software {
        Software {
            rocm: rocm
                .map(|r| Found {
                    version: v(r),
                    from: PathBuf::from("/opt/rocm/.info/version"),
                })
                .into_iter()
                .collect(),
            ..Software::default()
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Env {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn plan(ladder: &[Tier], command: &str, force: bool) -> Plan {
        let mut p = crate::config::demo_plan(
            command.split(' ').map(OsString::from).collect(),
            None,
            Path::new("/tmp"),
            "stamp",
        );
        p.ladder = ladder.to_vec();
        p.force_gpu_unsafe = force;
        p
    }

    fn gpu_cpu() -> Vec<Tier> {
        vec![Tier::builtin("gpu").unwrap(), Tier::builtin("cpu").unwrap()]
    }

    /// The tier `start_tier` picks on the default ladder for one GPU, a ROCm version and env.
    fn verdict(gpus: Vec<Gpu>, rocm: Option<&str>, e: &[(&str, &str)], command: &str) -> Verdict {
        let set = quirks();
        let probe = Probe::new(gpus, vec![], software(rocm), env(e), &set, None);
        start_tier(&plan(&gpu_cpu(), command, false), &probe, &set).unwrap()
    }

    /// The probe of a machine with `gpus` and ROCm 6.2.4, under `env`.
    fn on_rocm_6_2_4(gpus: Vec<Gpu>, env: Env, set: &QuirkSet) -> Probe {
        Probe::new(gpus, vec![], software(Some("6.2.4")), env, set, None)
    }

    const EEGNEX: &str = "python train_eegnex.py --device {device}";

    #[test]
    fn gfx1030_under_rocm_6_2_4_starts_eegnex_on_the_cpu() {
        let v = verdict(vec![rx6800()], Some("6.2.4"), &[], EEGNEX);
        assert_eq!(v.start, 1);
        assert_eq!(v.start_tier, "cpu");
        assert_eq!(v.skipped_tiers, ["gpu"]);
        assert_eq!(v.decision, Decision::Moved);
        assert_eq!(v.quirks[0].quirk, "rdna-rocm62-eegnex-spatial-conv");
        let msg = v.messages();
        assert_eq!(msg.len(), 3, "{msg:?}");
        assert!(
            msg[0].starts_with("starting on tier `cpu`, skipping `gpu`: known GPU problem `rdna-rocm62-eegnex-spatial-conv` (rules/quirks.toml:"),
            "{msg:?}"
        );
        assert_eq!(
            msg[1],
            "  found: GPU 0 (AMD Radeon RX 6800) is gfx1030; ROCm 6.2.4 is >=6.2; the command line matches `(?i)eegnex`"
        );
        assert!(msg[2].contains("pass --force-gpu-unsafe"), "{msg:?}");
    }

    #[test]
    fn gfx1030_under_rocm_6_1_stays_on_the_gpu() {
        let v = verdict(vec![rx6800()], Some("6.1"), &[], EEGNEX);
        assert_eq!((v.start, v.decision), (0, Decision::Clear));
        assert!(v.quirks.is_empty());
        assert!(v.messages().is_empty());
        assert!(v.is_silent());
    }

    #[test]
    fn unknown_rocm_is_assumed_affected() {
        let v = verdict(vec![rx6800()], None, &[], EEGNEX);
        assert_eq!(v.start_tier, "cpu");
        assert!(
            v.quirks[0]
                .reasons
                .iter()
                .any(|r| r.contains("ROCm version was not found")),
            "{:?}",
            v.quirks[0].reasons
        );
    }

    #[test]
    fn hsa_override_on_a_gpu_of_unknown_target_starts_on_the_cpu() {
        let unknown = amd(0, None, None);
        let v = verdict(
            vec![unknown],
            Some("6.2.4"),
            &[("HSA_OVERRIDE_GFX_VERSION", "10.3.0")],
            EEGNEX,
        );
        assert_eq!(v.start_tier, "cpu");
        assert!(
            v.quirks[0].reasons[0]
                .contains("HSA_OVERRIDE_GFX_VERSION=10.3.0 makes ROCm run GPU 0 as gfx1030"),
            "{:?}",
            v.quirks[0].reasons
        );
    }

    #[test]
    fn cdna_gfx90a_stays_on_the_gpu_even_with_rdna_in_the_build_list() {
        let mi210 = amd(0, Some("gfx90a"), Some("AMD Instinct MI210"));
        let v = verdict(vec![mi210.clone()], Some("6.2.4"), &[], EEGNEX);
        assert_eq!((v.start, v.decision), (0, Decision::Clear));
        let v = verdict(
            vec![mi210],
            Some("6.2.4"),
            &[("PYTORCH_ROCM_ARCH", "gfx90a;gfx1030")],
            EEGNEX,
        );
        assert_eq!(v.start, 0);
    }

    #[test]
    fn a_job_the_quirk_is_not_scoped_to_stays_on_the_gpu_with_a_warning() {
        let v = verdict(
            vec![rx6800()],
            Some("6.2.4"),
            &[],
            "python train_c2_sam_real_data.py --device {device}",
        );
        assert_eq!((v.start, v.decision), (0, Decision::Clear));
        assert_eq!(v.quirks.len(), 1);
        assert_eq!(v.quirks[0].quirk, "rdna-rocm62-memory-faults");
        assert!(!v.is_silent());
        assert!(
            v.messages()[0].starts_with("warning: known GPU problem `rdna-rocm62-memory-faults`")
        );
    }

    #[test]
    fn nvidia_gpus_have_no_quirk() {
        let v = verdict(vec![h100(0), h100(1)], None, &[], EEGNEX);
        assert_eq!((v.start, v.decision), (0, Decision::Clear));
        assert!(v.quirks.is_empty());
        let set = quirks();
        let probe = Probe::new(
            vec![h100(0)],
            vec![],
            software(None),
            Env::new(),
            &set,
            None,
        );
        assert_eq!(probe.applying().count(), 0);
        assert!(
            probe
                .quirks
                .iter()
                .all(|j| j.reasons == ["no AMD GPU is visible"])
        );
    }

    #[test]
    fn no_gpu_moves_nothing() {
        let v = verdict(
            vec![],
            Some("6.2.4"),
            &[("HSA_OVERRIDE_GFX_VERSION", "10.3.0")],
            EEGNEX,
        );
        assert_eq!((v.start, v.decision), (0, Decision::Clear));
    }

    #[test]
    fn force_gpu_unsafe_keeps_the_first_tier_and_says_what_it_overrides() {
        let set = quirks();
        let probe = on_rocm_6_2_4(vec![rx6800()], Env::new(), &set);
        let v = start_tier(&plan(&gpu_cpu(), EEGNEX, true), &probe, &set).unwrap();
        assert_eq!((v.start, v.start_tier.as_str()), (0, "gpu"));
        assert_eq!(v.decision, Decision::Forced);
        assert!(v.skipped_tiers.is_empty());
        let messages = v.messages();
        assert!(
            messages[0].starts_with("warning: --force-gpu-unsafe: starting on tier `gpu` although it would start on `cpu` for known GPU problem `rdna-rocm62-eegnex-spatial-conv`"),
            "{messages:?}"
        );
    }

    #[test]
    fn a_ladder_without_the_named_tier_refuses_to_start() {
        let set = quirks();
        let probe = on_rocm_6_2_4(vec![rx6800()], Env::new(), &set);
        let err = start_tier(
            &plan(&[Tier::builtin("gpu").unwrap()], EEGNEX, false),
            &probe,
            &set,
        )
        .unwrap_err();
        assert_eq!(err.tier, "cpu");
        let text = err.to_string();
        assert!(text.contains("the ladder (gpu) does not have"), "{text}");
        assert!(text.contains("--ladder gpu,cpu"), "{text}");
        assert!(text.contains("--force-gpu-unsafe"), "{text}");
        // Forced, the same ladder starts.
        let v = start_tier(
            &plan(&[Tier::builtin("gpu").unwrap()], EEGNEX, true),
            &probe,
            &set,
        )
        .unwrap();
        assert_eq!(v.decision, Decision::Forced);
    }

    #[test]
    fn each_tier_is_judged_with_its_own_environment() {
        // A tier that hides the RDNA card and keeps the MI210 is safe; the one before is not.
        let mut hide = Tier::builtin("gpu").unwrap();
        hide.name = "gpu-mi".into();
        hide.set_env
            .insert("HIP_VISIBLE_DEVICES".into(), "1".into());
        let mut ladder = gpu_cpu();
        ladder.insert(0, hide);
        let gpus = vec![rx6800(), amd(1, Some("gfx90a"), Some("AMD Instinct MI210"))];
        let set = quirks();
        let probe = on_rocm_6_2_4(gpus, Env::new(), &set);
        let v = start_tier(&plan(&ladder, EEGNEX, false), &probe, &set).unwrap();
        assert_eq!((v.start, v.decision), (0, Decision::Clear));

        // The same tier unsetting an override that the environment sets: still safe.
        let mut unset = Tier::builtin("gpu").unwrap();
        unset.unset_env.push("HSA_OVERRIDE_GFX_VERSION".into());
        let gpus = vec![amd(0, Some("gfx1100"), None)];
        let e = env(&[("HSA_OVERRIDE_GFX_VERSION", "10.3.0")]);
        let probe = on_rocm_6_2_4(gpus.clone(), e.clone(), &set);
        let ladder = vec![unset, Tier::builtin("cpu").unwrap()];
        let v = start_tier(&plan(&ladder, EEGNEX, false), &probe, &set).unwrap();
        assert_eq!(v.start, 0);
        // Without the unset, the override makes the gfx1100 run as gfx1030.
        let probe = on_rocm_6_2_4(gpus, e, &set);
        let v = start_tier(&plan(&gpu_cpu(), EEGNEX, false), &probe, &set).unwrap();
        assert_eq!(v.start, 1);
    }

    #[test]
    fn a_ladder_starting_on_the_cpu_is_never_moved() {
        let set = quirks();
        let probe = on_rocm_6_2_4(vec![rx6800()], Env::new(), &set);
        let ladder = vec![Tier::builtin("cpu").unwrap()];
        let v = start_tier(&plan(&ladder, EEGNEX, false), &probe, &set).unwrap();
        assert_eq!((v.start, v.decision), (0, Decision::Clear));
        assert!(v.quirks.is_empty());
        assert!(!needed(&plan(&ladder, EEGNEX, false)));
        assert!(needed(&plan(&gpu_cpu(), EEGNEX, false)));
    }

    #[test]
    fn the_verdict_serialises_for_the_journal() {
        let v = verdict(vec![rx6800()], Some("6.2.4"), &[], EEGNEX);
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["start_tier"], "cpu");
        assert_eq!(json["skipped_tiers"][0], "gpu");
        assert_eq!(json["decision"], "moved");
        assert_eq!(
            json["quirks"][0]["quirk"],
            "rdna-rocm62-eegnex-spatial-conv"
        );
        assert_eq!(json["quirks"][0]["origin"]["file"], "rules/quirks.toml");
        assert!(json.get("start").is_none());
    }

    #[test]
    fn visible_devices_follow_the_runtimes() {
        let gpus = vec![
            amd(0, Some("gfx1030"), None),
            amd(1, Some("gfx90a"), None),
            amd(2, Some("gfx90a"), None),
        ];
        let idx = |e: &[(&str, &str)]| -> Vec<u32> {
            visible(&gpus, &env(e)).iter().map(|g| g.index).collect()
        };
        assert_eq!(idx(&[]), [0, 1, 2]);
        assert_eq!(idx(&[("HIP_VISIBLE_DEVICES", "1,2")]), [1, 2]);
        // HIP indexes count among what ROCR left visible.
        assert_eq!(
            idx(&[
                ("ROCR_VISIBLE_DEVICES", "1,2"),
                ("HIP_VISIBLE_DEVICES", "1")
            ]),
            [2]
        );
        // HIP reads CUDA_VISIBLE_DEVICES only when HIP_VISIBLE_DEVICES is unset.
        assert_eq!(idx(&[("CUDA_VISIBLE_DEVICES", "0")]), [0]);
        assert_eq!(
            idx(&[("CUDA_VISIBLE_DEVICES", "0"), ("HIP_VISIBLE_DEVICES", "2")]),
            [2]
        );
        // CUDA's rules: -1 or an empty list hides all; a bad entry ends the list.
        assert_eq!(idx(&[("HIP_VISIBLE_DEVICES", "-1")]), Vec::<u32>::new());
        assert_eq!(idx(&[("HIP_VISIBLE_DEVICES", "")]), Vec::<u32>::new());
        assert_eq!(idx(&[("HIP_VISIBLE_DEVICES", "2,7,0")]), [2]);
        // What cannot be read hides nothing.
        assert_eq!(idx(&[("ROCR_VISIBLE_DEVICES", "GPU-abcdef")]), [0, 1, 2]);

        let nv = vec![h100(0), h100(1)];
        let shown = visible(&nv, &env(&[("CUDA_VISIBLE_DEVICES", "GPU-1a2b")]));
        assert_eq!(shown.iter().map(|g| g.index).collect::<Vec<_>>(), [1]);
        let shown = visible(&nv, &env(&[("CUDA_VISIBLE_DEVICES", "MIG-0/1/2")]));
        assert_eq!(shown.len(), 2);
    }

    #[test]
    fn a_hidden_rdna_card_does_not_count() {
        let gpus = vec![rx6800(), amd(1, Some("gfx90a"), Some("AMD Instinct MI210"))];
        let v = verdict(gpus, Some("6.2.4"), &[("HIP_VISIBLE_DEVICES", "1")], EEGNEX);
        assert_eq!(v.start, 0);
    }

    #[test]
    fn versions_parse_from_the_files_rocm_and_nvidia_write() {
        assert_eq!(
            Version::parse_prefix("6.2.4-120\n".trim())
                .unwrap()
                .as_str(),
            "6.2.4"
        );
        assert_eq!(Version::parse_prefix("5.7.1").unwrap(), v("5.7.1"));
        assert_eq!(Version::parse_exact("6.2").unwrap(), v("6.2.0"));
        assert!(Version::parse_exact("6.2.4-120").is_none());
        assert!(Version::parse_prefix("rocm").is_none());
        assert!(v("6.10") > v("6.9.9"));

        let header = "#ifndef ROCM_VERSION_H\n#define ROCM_VERSION_MAJOR   6\n#define ROCM_VERSION_MINOR   3\n#define ROCM_VERSION_PATCH   1\n";
        assert_eq!(version_from_header(header).unwrap().as_str(), "6.3.1");
        assert!(version_from_header("#define ROCM_VERSION_MAJOR 6\n").is_none());

        let proprietary = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\nGCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n";
        assert_eq!(parse_nvrm(proprietary).unwrap().as_str(), "550.54.15");
        // Read on the H200 machine (driver 580.159.04, NixOS build).
        let h200 = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  (nixbld@)  \nGCC version:  gcc version 15.3.0 (GCC) \n";
        assert_eq!(parse_nvrm(h200).unwrap().as_str(), "580.159.04");
        let open = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  (dvs-builder@U16-I3-B03-4-3)  Thu Jan 23 23:08:14 UTC 2025\n";
        assert_eq!(parse_nvrm(open).unwrap().as_str(), "570.86.15");
        assert!(parse_nvrm("GCC version:  gcc version 12.2.0\n").is_none());
    }

    #[test]
    fn software_is_found_under_a_root() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let write = |rel: &str, text: &str| {
            let path = r.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        write("opt/rocm-6.2.4/.info/version", "6.2.4-120\n");
        std::os::unix::fs::symlink(r.join("opt/rocm-6.2.4"), r.join("opt/rocm")).unwrap();
        // An older install with only its header, and one known by its name alone.
        write(
            "opt/rocm-6.1.2/include/rocm-core/rocm_version.h",
            "#define ROCM_VERSION_MAJOR 6\n#define ROCM_VERSION_MINOR 1\n#define ROCM_VERSION_PATCH 2\n",
        );
        std::fs::create_dir_all(r.join("opt/rocm-5.7.1")).unwrap();
        write(
            "proc/driver/nvidia/version",
            "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n",
        );
        write(
            "usr/local/cuda/version.json",
            r#"{ "cuda" : { "name" : "CUDA SDK", "version" : "12.4.1" } }"#,
        );

        let sw = Software::detect(r, &Env::new());
        let versions: Vec<&str> = sw.rocm.iter().map(|f| f.version.as_str()).collect();
        assert_eq!(versions, ["6.2.4", "6.1.2", "5.7.1"], "{sw:?}");
        assert_eq!(sw.rocm[0].from, r.join("opt/rocm/.info/version"));
        assert_eq!(sw.rocm_version().unwrap().as_str(), "6.2.4");
        assert_eq!(
            sw.nvidia_driver.as_ref().unwrap().version.as_str(),
            "550.54.15"
        );
        assert_eq!(sw.cuda_toolkit.as_ref().unwrap().version.as_str(), "12.4.1");

        // ROCM_PATH (taken under the root) comes first.
        let sw = Software::detect(r, &env(&[("ROCM_PATH", "/opt/rocm-6.1.2")]));
        assert_eq!(sw.rocm_version().unwrap().as_str(), "6.1.2");
        // A custom build without a version file: what jobs use is unknown, whatever else is
        // installed.
        std::fs::create_dir_all(r.join("opt/rocm_sdk_612/bin")).unwrap();
        let sw = Software::detect(r, &env(&[("ROCM_PATH", "/opt/rocm_sdk_612")]));
        assert_eq!(sw.rocm_path_unversioned, Some(r.join("opt/rocm_sdk_612")));
        assert!(sw.rocm_version().is_none());
        assert_eq!(sw.rocm.len(), 3);
        let set = quirks();
        let e = env(&[("ROCM_PATH", "/opt/rocm_sdk_612")]);
        let text = Probe::new(vec![rx6800()], vec![], sw, e, &set, None).render();
        assert!(
            text.contains(&format!(
                "  ROCm           unknown    ROCM_PATH names {}, which has no version file\n                 6.2.4      {} (also installed)\n",
                r.join("opt/rocm_sdk_612").display(),
                r.join("opt/rocm/.info/version").display()
            )),
            "{text}"
        );
        assert!(text.contains("the ROCm version was not found"), "{text}");

        // Nothing installed: nothing found.
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(
            Software::detect(empty.path(), &Env::new()),
            Software::default()
        );

        // version.txt of older CUDA toolkits.
        std::fs::remove_file(r.join("usr/local/cuda/version.json")).unwrap();
        write("usr/local/cuda/version.txt", "CUDA Version 10.2.89\n");
        let sw = Software::detect(r, &Env::new());
        assert_eq!(sw.cuda_toolkit.unwrap().version.as_str(), "10.2.89");

        // CUDA 13 as the H200 machine has it: /usr/local/cuda -> cuda-13.0, no version file,
        // the version in cuda.h.
        std::fs::remove_dir_all(r.join("usr/local/cuda")).unwrap();
        write(
            "usr/local/cuda-13.0/include/cuda.h",
            "/* license */\n#ifndef __cuda_cuda_h__\n#define CUDA_VERSION 13000\n",
        );
        std::os::unix::fs::symlink(r.join("usr/local/cuda-13.0"), r.join("usr/local/cuda"))
            .unwrap();
        let found = Software::detect(r, &Env::new()).cuda_toolkit.unwrap();
        assert_eq!(found.version.as_str(), "13.0");
        assert_eq!(found.from, r.join("usr/local/cuda/include/cuda.h"));
        std::fs::remove_file(r.join("usr/local/cuda-13.0/include/cuda.h")).unwrap();
        let found = Software::detect(r, &Env::new()).cuda_toolkit.unwrap();
        assert_eq!(found.version.as_str(), "13.0");
        assert_eq!(found.from, r.join("usr/local/cuda-13.0"));
    }

    #[test]
    fn the_report_says_no_gpu_found() {
        let set = quirks();
        let probe = Probe::new(
            vec![],
            vec!["nvidia-smi: not found".into()],
            Software::default(),
            Env::new(),
            &set,
            None,
        );
        let text = probe.render();
        assert!(
            text.starts_with("no GPU found; no known GPU problem applies\n"),
            "{text}"
        );
        assert!(
            text.contains("\nGPUs\n  no GPU found\n  note: nvidia-smi: not found\n"),
            "{text}"
        );
        assert!(text.contains("  ROCm           not found\n"), "{text}");
        assert!(
            text.contains("  HSA_OVERRIDE_GFX_VERSION  (unset)\n"),
            "{text}"
        );
        assert!(
            text.contains("does not apply: rdna-rocm62-eegnex-spatial-conv"),
            "{text}"
        );
    }

    #[test]
    fn the_report_shows_the_gpu_and_the_quirk_that_applies() {
        let set = quirks();
        let probe = on_rocm_6_2_4(
            vec![rx6800()],
            env(&[("HSA_OVERRIDE_GFX_VERSION", "10.3.0")]),
            &set,
        );
        let text = probe.render();
        assert!(
            text.starts_with("1 GPU; 2 known GPU problems apply\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "  amd 0  AMD Radeon RX 6800  gfx1030  0000:03:00.0  16.0 GiB  KFD node 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("  ROCm           6.2.4      /opt/rocm/.info/version\n"),
            "{text}"
        );
        assert!(
            text.contains("  HSA_OVERRIDE_GFX_VERSION  \"10.3.0\"\n"),
            "{text}"
        );
        assert!(
            text.contains("  APPLIES rdna-rocm62-eegnex-spatial-conv (rules/quirks.toml:"),
            "{text}"
        );
        assert!(
            text.contains(
                ", for commands matching `(?i)eegnex`: `gpuwarden run` starts on tier `cpu`\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("    - GPU 0 (AMD Radeon RX 6800) is gfx1030\n"),
            "{text}"
        );
        assert!(
            text.contains("  APPLIES rdna-rocm62-memory-faults"),
            "{text}"
        );
        assert!(!text.contains("does not apply"), "{text}");

        let json = serde_json::to_value(&probe).unwrap();
        assert_eq!(json["gpus"][0]["gfx_target"], "gfx1030");
        assert_eq!(json["gpus"][0]["visible"], true);
        assert_eq!(json["software"]["rocm"][0]["version"], "6.2.4");
        assert_eq!(json["env"]["HSA_OVERRIDE_GFX_VERSION"], "10.3.0");
        assert!(json["env"]["CUDA_VISIBLE_DEVICES"].is_null());
        assert_eq!(json["quirks"][0]["applies"], true);
        assert_eq!(json["quirks"][0]["only_for_jobs"], "(?i)eegnex");
    }

    #[test]
    fn preflight_drops_the_tiers_before_the_start_tier() {
        let set = quirks();
        let mut p = plan(&gpu_cpu(), EEGNEX, false);
        let v = preflight(&mut p, &set, || {
            on_rocm_6_2_4(vec![rx6800()], env(&[]), &set)
        })
        .unwrap()
        .unwrap();
        assert_eq!((v.start, v.decision), (1, Decision::Moved));
        assert_eq!(v.skipped_tiers, ["gpu"]);
        let names: Vec<&str> = p.ladder.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["cpu"]);
    }

    #[test]
    fn preflight_keeps_the_ladder_of_a_clear_machine() {
        let set = quirks();
        let mut p = plan(&gpu_cpu(), EEGNEX, false);
        let v = preflight(&mut p, &set, || {
            Probe::new(vec![h100(0)], vec![], software(None), env(&[]), &set, None)
        })
        .unwrap()
        .unwrap();
        assert_eq!((v.start, v.decision), (0, Decision::Clear));
        assert_eq!(p.ladder, gpu_cpu());
    }

    #[test]
    fn preflight_does_not_probe_a_ladder_that_starts_on_the_cpu() {
        let set = quirks();
        let cpu_only = vec![Tier::builtin("cpu").unwrap()];
        let mut p = plan(&cpu_only, EEGNEX, false);
        let v = preflight(&mut p, &set, || panic!("the probe was gathered")).unwrap();
        assert_eq!(v, None);
        assert_eq!(p.ladder, cpu_only);
    }

    #[test]
    fn preflight_without_the_safe_tier_leaves_the_ladder_alone() {
        let set = quirks();
        let gpu_only = vec![Tier::builtin("gpu").unwrap()];
        let mut p = plan(&gpu_only, EEGNEX, false);
        let e = preflight(&mut p, &set, || {
            on_rocm_6_2_4(vec![rx6800()], env(&[]), &set)
        })
        .unwrap_err();
        assert_eq!(e.tier, "cpu");
        assert_eq!(e.suggested, "gpu,cpu");
        assert_eq!(p.ladder, gpu_only);
    }
}
