//! Learned tiers (issue 11): what earlier runs of the same job on the same machine taught about
//! the ladder, so that the next night starts where the job will work instead of paying for the
//! same fault again.
//!
//! A job is known by a [`Fingerprint`]: its command template (placeholders unexpanded), the
//! GPUs' models and targets, and the GPU driver and ROCm/CUDA versions. For each fingerprint the
//! memory holds, per tier, how that tier last went: `finished` (the run succeeded on it) or
//! `faulted` (the run left it by falling back after a fault: the ladder's own judgement that the
//! tier is not for this job). A run starts on the first tier of its ladder that did not fault,
//! and says why; `gpuwarden run --forget` clears the job's memory first.
//!
//! The memory is one JSON file, `$XDG_STATE_HOME/gpuwarden/tiers.json` (else
//! `~/.local/state/gpuwarden/tiers.json`), written whole through a temporary file and a rename,
//! and bounded to the [`KEEP`] fingerprints used last. Memory is a convenience: a file that
//! cannot be read or written is said once and the run goes on as without it.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::gpu::Gpu;
use crate::probe::Software;

/// How many fingerprints the memory keeps (the ones used last).
pub const KEEP: usize = 256;

/// What makes two runs "the same job on the same machine" for the ladder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub command: Vec<String>,
    /// Each GPU's model and target (`AMD Radeon RX 6800 gfx1030`, `NVIDIA H100 sm_90`).
    pub gpus: Vec<String>,
    /// The GPU driver and runtime versions (`nvidia 580.159.04`, `rocm 6.2.1`).
    pub software: Vec<String>,
}

impl Fingerprint {
    pub fn new(command: &[std::ffi::OsString], gpus: &[Gpu], software: &Software) -> Fingerprint {
        let gpus = gpus
            .iter()
            .map(|g| {
                [
                    g.name.clone(),
                    g.gfx_target.clone(),
                    g.compute_capability.clone(),
                    g.driver_version.clone(),
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" ")
            })
            .collect();
        let mut sw = Vec::new();
        if let Some(rocm) = software.rocm.first() {
            sw.push(format!("rocm {}", rocm.version));
        }
        if let Some(driver) = &software.nvidia_driver {
            sw.push(format!("nvidia {}", driver.version));
        }
        if let Some(cuda) = &software.cuda_toolkit {
            sw.push(format!("cuda {}", cuda.version));
        }
        Fingerprint {
            command: command
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            gpus,
            software: sw,
        }
    }

    /// A short stable key (FNV-1a 64 of the JSON form): the same on every run and build.
    pub fn key(&self) -> String {
        let text = serde_json::to_string(self).unwrap_or_default();
        let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        format!("{hash:016x}")
    }
}

/// How a tier last went for one job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierNote {
    /// `finished` or `faulted`.
    pub outcome: String,
    /// The fault (`gpu_memory_fault (xid-31)`) or the exit.
    pub detail: String,
    pub run_dir: PathBuf,
    /// Seconds since the epoch.
    pub at: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Entry {
    fingerprint: Option<Fingerprint>,
    tiers: BTreeMap<String, TierNote>,
    /// When the entry was last used (seconds since the epoch), for [`KEEP`].
    used: u64,
}

/// Where the memory lives: `$XDG_STATE_HOME/gpuwarden`, else `~/.local/state/gpuwarden`.
pub fn state_dir() -> Option<PathBuf> {
    let xdg = std::env::var_os("XDG_STATE_HOME").filter(|v| Path::new(v).is_absolute());
    match xdg {
        Some(dir) => Some(PathBuf::from(dir).join("gpuwarden")),
        None => {
            let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
            Some(PathBuf::from(home).join(".local/state/gpuwarden"))
        }
    }
}

/// The memory file, read once per run.
#[derive(Debug)]
pub struct Memory {
    path: PathBuf,
    entries: BTreeMap<String, Entry>,
}

impl Memory {
    /// Reads `dir/tiers.json`; a missing file is an empty memory.
    pub fn load(dir: &Path) -> io::Result<Memory> {
        let path = dir.join("tiers.json");
        let entries = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(io::Error::other)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        Ok(Memory { path, entries })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What is known of the job's tiers.
    pub fn tiers(&self, job: &Fingerprint) -> Option<&BTreeMap<String, TierNote>> {
        self.entries.get(&job.key()).map(|e| &e.tiers)
    }

    /// Forgets the job; returns whether anything was known.
    pub fn forget(&mut self, job: &Fingerprint) -> bool {
        self.entries.remove(&job.key()).is_some()
    }

    /// Notes how tiers went for the job (later notes replace earlier ones).
    pub fn learn(&mut self, job: &Fingerprint, notes: Vec<(String, TierNote)>) {
        let entry = self.entries.entry(job.key()).or_default();
        entry.fingerprint = Some(job.clone());
        entry.used = now();
        entry.tiers.extend(notes);
    }

    /// Writes the file whole (temporary name, then rename), keeping the [`KEEP`] entries used
    /// last.
    pub fn save(&mut self) -> io::Result<()> {
        if self.entries.len() > KEEP {
            let mut used: Vec<u64> = self.entries.values().map(|e| e.used).collect();
            used.sort_unstable_by(|a, b| b.cmp(a));
            let cut = used[KEEP - 1];
            self.entries.retain(|_, e| e.used >= cut);
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self
            .path
            .with_extension(format!("json.{}", std::process::id()));
        let text = serde_json::to_vec_pretty(&self.entries).map_err(io::Error::other)?;
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.path)
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where a run of `ladder` should start given what is known: the index of the first tier that
/// did not fault last time, with the reason to say, or `None` to start at the top (nothing
/// learned, the first tier is fine, or every tier faulted: then the top is as good as any).
pub fn start(ladder: &[String], known: &BTreeMap<String, TierNote>) -> Option<(usize, String)> {
    let faulted = |name: &String| known.get(name).is_some_and(|n| n.outcome == "faulted");
    let start = ladder.iter().position(|t| !faulted(t))?;
    if start == 0 {
        return None;
    }
    let skipped: Vec<String> = ladder[..start]
        .iter()
        .filter_map(|t| {
            let note = known.get(t)?;
            Some(format!(
                "`{t}` faulted ({}) in {}",
                note.detail,
                note.run_dir.display()
            ))
        })
        .collect();
    let why = match known.get(&ladder[start]) {
        Some(n) if n.outcome == "finished" => format!(", and `{}` finished", ladder[start]),
        _ => String::new(),
    };
    Some((
        start,
        format!(
            "starting on tier `{}`, learned from earlier runs of this job on this machine: {}{why}; `gpuwarden run --forget ...` tries the whole ladder again",
            ladder[start],
            skipped.join("; ")
        ),
    ))
}

/// What a finished run's journal teaches: each tier it left by falling back after a fault is
/// `faulted`, the tier it succeeded on is `finished`.
pub fn lessons(journal: &Path, run_dir: &Path) -> io::Result<Vec<(String, TierNote)>> {
    let text = std::fs::read(journal)?;
    let at = now();
    let note = |outcome: &str, detail: String| TierNote {
        outcome: outcome.into(),
        detail,
        run_dir: run_dir.to_path_buf(),
        at,
    };
    let mut tier = String::new();
    let mut fault = None;
    let mut notes = Vec::new();
    for record in String::from_utf8_lossy(&text)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
    {
        let field = |name: &str| record[name].as_str().unwrap_or("").to_string();
        match field("event").as_str() {
            "attempt_started" => {
                tier = field("tier");
                fault = None;
            }
            "fault" if fault.is_none() && field("action") != "note" => {
                fault = Some(format!("{} ({})", field("class"), field("rule")));
            }
            "restart_scheduled" if field("tier") != tier && !tier.is_empty() => {
                if let Some(f) = fault.clone() {
                    notes.push((tier.clone(), note("faulted", f)));
                }
            }
            "run_finished" if field("outcome") == "succeeded" && !tier.is_empty() => {
                notes.push((tier.clone(), note("finished", "exit status 0".into())));
            }
            _ => {}
        }
    }
    Ok(notes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn note(outcome: &str) -> TierNote {
        TierNote {
            outcome: outcome.into(),
            detail: "gpu_memory_fault (xid-31)".into(),
            run_dir: "runs/a".into(),
            at: 1,
        }
    }

    fn ladder(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_run_starts_past_the_tiers_that_faulted() {
        let l = ladder(&["gpu-sdk", "gpu", "cpu"]);
        let mut known = BTreeMap::new();
        assert_eq!(start(&l, &known), None);
        known.insert("gpu-sdk".to_string(), note("faulted"));
        known.insert("gpu".to_string(), note("finished"));
        let (i, why) = start(&l, &known).unwrap();
        assert_eq!(i, 1);
        assert!(
            why.contains("`gpu-sdk` faulted (gpu_memory_fault (xid-31))"),
            "{why}"
        );
        assert!(why.contains("`gpu` finished"), "{why}");
        // Every tier faulted: the top is as good as any.
        for t in &l {
            known.insert(t.clone(), note("faulted"));
        }
        assert_eq!(start(&l, &known), None);
    }

    #[test]
    fn the_key_is_stable_and_tells_jobs_apart() {
        let a = Fingerprint {
            command: vec!["python".into(), "train.py".into()],
            gpus: vec!["AMD Radeon RX 6800 gfx1030".into()],
            software: vec!["rocm 6.2.1".into()],
        };
        assert_eq!(a.key(), a.clone().key());
        let mut b = a.clone();
        b.software = vec!["rocm 6.1.2".into()];
        assert_ne!(a.key(), b.key());
    }
}
