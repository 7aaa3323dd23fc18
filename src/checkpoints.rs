//! Checkpoint discovery and validation: given the user's `--checkpoints` directory or glob, find
//! the newest checkpoint that was written completely, so a faulted job restarts from it.
//!
//! A fault during `torch.save` leaves a torn file, and the newest file is then not the last good
//! checkpoint (DESIGN.md: "a checkpoint is only as good as its last byte"). This module knows the
//! completion markers of the formats training jobs write (torch.save zip and legacy files,
//! Lightning `.ckpt`, safetensors, HF Trainer `checkpoint-N/`, DeepSpeed `latest` + tag directory,
//! torch.distributed.checkpoint `.metadata`) and checks them by reading headers and tails only:
//! checkpoints are often many GB and a check must stay cheap enough to run on every restart.
//!
//! It is not a loader: it never unpickles or deserializes tensors, so "complete" means "the
//! writer finished", not "loads on this machine" (a file holding CUDA tensors is complete even
//! on a CPU-only host). It does not watch the directory either; the checkpoint source calls
//! [`discover`] when it needs an answer.
//!
//! # Which checkpoint is the newest
//!
//! A step number in the name orders checkpoints better than an mtime (copies and restores change
//! mtimes), so candidates whose name carries one are ordered by it: the number after `step`
//! (`ckpt-step00015.pt`, `epoch=0-step=8.ckpt`, `global_step100/`), else after `checkpoint-`
//! or `iter` (`checkpoint-6/`, `iter_2000.pt`), else after `epoch` (`epoch=3-val_loss=0.50.ckpt`
//! is epoch 3), else the name's only number (`model_1000.pt`). Names without one (`last.ckpt`,
//! `model.safetensors`, or several unrelated numbers as in `loss=0.50.ckpt`) are ordered by
//! modification time, and such a file is used instead of the best numbered one only when it is
//! strictly newer. The first complete candidate in that order is used, and any torn one ahead of
//! it is reported. On an exact mtime tie a complete file is used and a torn one is reported,
//! because nothing tells which of the two was saved last.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The on-disk layout a checkpoint was recognised as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// `torch.save` in its default zip layout (also Lightning `.ckpt` and HF `.bin`).
    TorchZip,
    /// `torch.save(..., _use_new_zipfile_serialization=False)`: a stream of pickles.
    TorchLegacy,
    /// A `.safetensors` file.
    Safetensors,
    /// A Hugging Face `Trainer` `checkpoint-N/` directory.
    HfTrainer,
    /// A DeepSpeed tag directory (`global_stepN/`) named by the `latest` file beside it.
    DeepSpeed,
    /// A `torch.distributed.checkpoint` directory (`.metadata` + `*.distcp`).
    Dcp,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::TorchZip => "torch.save zip",
            Format::TorchLegacy => "torch.save legacy",
            Format::Safetensors => "safetensors",
            Format::HfTrainer => "HF Trainer",
            Format::DeepSpeed => "DeepSpeed",
            Format::Dcp => "torch.distributed.checkpoint",
        })
    }
}

/// A complete checkpoint, ready to resume from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The file or directory to resume from (for DeepSpeed, the tag directory).
    pub path: PathBuf,
    /// The training step read from the name, if the name carries one ([`step_from_name`]).
    pub step: Option<u64>,
    pub format: Format,
    /// Modification time (of the symlink's target for a symlink such as Lightning's `last.ckpt`).
    pub modified: SystemTime,
}

/// A candidate that would have been preferred over [`Discovery::newest`], or ties it, but is
/// incomplete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    /// Why it is not usable, as a sentence for the user (e.g. "... (torn write?)").
    pub reason: String,
}

/// The answer to "where do we resume from?".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Discovery {
    /// The newest complete checkpoint; `None` when there is none yet (fresh start).
    pub newest: Option<Checkpoint>,
    /// Incomplete candidates that would have been chosen over `newest` had they been complete,
    /// or that are exactly as new as it (same step and mtime): numbered ones first (highest step
    /// first), then unnumbered ones (newest first).
    pub skipped: Vec<Skipped>,
}

/// Why discovery could not look at the checkpoints at all (as opposed to finding none).
/// What to do about a checkpoint location that cannot be read, by why.
fn unreadable_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(nix::libc::ELOOP) => {
            "it is a loop of symbolic links: point --checkpoints at the real directory"
        }
        Some(nix::libc::EACCES | nix::libc::EPERM) => {
            "check that gpuwarden's user may list it, or pass another --checkpoints"
        }
        Some(nix::libc::ENOTDIR) => "a part of the path is not a directory: fix the path",
        _ => "check the path, or pass another --checkpoints",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "--checkpoints pattern `{pattern}` is not a valid glob; fix the pattern, or write a \
         literal `[` as `[[]`"
    )]
    BadPattern {
        pattern: String,
        #[source]
        source: glob::PatternError,
    },
    #[error("cannot read checkpoint location {} ({source}); {}", path.display(), unreadable_hint(source))]
    Unreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Why a candidate is not a complete checkpoint. `reason` is a sentence for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Incomplete {
    pub reason: String,
}

impl Incomplete {
    fn new(reason: impl Into<String>) -> Self {
        Incomplete {
            reason: reason.into(),
        }
    }
}

/// Extensions under which training code saves torch.save or safetensors checkpoints. Other
/// extensions in a checkpoint directory (logs, json, yaml, code snapshots) are not candidates.
const CHECKPOINT_EXTENSIONS: [&str; 6] = ["pt", "pth", "ckpt", "bin", "tar", "safetensors"];

const ZIP_LOCAL_HEADER: &[u8; 4] = b"PK\x03\x04";
const ZIP_CENTRAL_HEADER: &[u8; 4] = b"PK\x01\x02";
const ZIP_EOCD: &[u8; 4] = b"PK\x05\x06";
const ZIP64_EOCD: &[u8; 4] = b"PK\x06\x06";
const ZIP64_LOCATOR: &[u8; 4] = b"PK\x06\x07";
const ZIP_EOCD_LEN: u64 = 22;
const ZIP64_LOCATOR_LEN: u64 = 20;
const ZIP64_EOCD_LEN: u64 = 56;
/// The end record sits in the last 22 bytes plus at most a 64 KiB archive comment.
const ZIP_EOCD_SEARCH: u64 = 64 * 1024 + ZIP_EOCD_LEN;

/// torch's legacy serialization opens with `pickle.dump(MAGIC_NUMBER)` where
/// `MAGIC_NUMBER = 0x1950a86a20f9469cfc6c`: a pickle LONG1 opcode (`\x8a`), 10 bytes, little endian.
const TORCH_LEGACY_MAGIC: [u8; 12] = [
    0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
];
/// Bytes to read to recognise any supported file format by its start.
const SNIFF_LEN: usize = 32;

/// safetensors itself refuses headers over 100 MB; a larger length means the file is not one.
const SAFETENSORS_MAX_HEADER: u64 = 100_000_000;

/// The DeepSpeed file naming the last completed tag directory.
const DEEPSPEED_LATEST: &str = "latest";
/// A `latest` file is one short line; anything longer is not DeepSpeed's.
const DEEPSPEED_LATEST_MAX: u64 = 4096;

/// Finds the newest complete checkpoint under `spec`.
///
/// `spec` is a directory, a glob pattern (it contains `*`, `?` or `[` and is not itself an
/// existing directory), or a single checkpoint file or directory. A directory is scanned one
/// level deep: checkpoint files by extension, HF `checkpoint-N/` and DCP directories, and the
/// DeepSpeed tag directory named by a `latest` file. A glob's matches go through the same
/// filter, so `out/*` does not turn a log file into a "torn checkpoint". Temporary names
/// (`*.tmp`, `*.partial`, `tmp-checkpoint-*`, hidden names) never count.
///
/// A missing directory is not an error: the job has not saved anything yet.
pub fn discover(spec: &str) -> Result<Discovery, CheckpointError> {
    Spec::new(spec, None, Path::new(""))?.discover()
}

/// The placeholder a `--checkpoints` value may hold for the run directory.
pub const RUN_DIR_PLACEHOLDER: &str = "{run_dir}";

/// A `--checkpoints` value, read once: a literal path or a glob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Spec {
    /// A directory to scan, or one checkpoint file or directory.
    Path(PathBuf),
    /// A checked glob pattern whose matches are the candidates.
    Glob(String),
}

impl Spec {
    /// Reads `spec`, putting `run_dir` in place of `{run_dir}`; a relative spec is relative to
    /// `cwd` (the job's working directory, where its checkpoints are written).
    ///
    /// Only the user's own text decides whether the spec is a glob: a run directory named
    /// `runs[3]` neither makes `{run_dir}/ckpt` a glob nor breaks `{run_dir}/*.pt` (it is
    /// escaped there). A glob-looking spec that names an existing directory is that directory.
    /// A glob that cannot compile is an error that says how to quote it.
    pub fn new(spec: &str, run_dir: Option<&Path>, cwd: &Path) -> Result<Spec, CheckpointError> {
        let run_dir = run_dir.map(|d| d.to_string_lossy().into_owned());
        let literal = match &run_dir {
            Some(dir) => spec.replace(RUN_DIR_PLACEHOLDER, dir),
            None => spec.to_owned(),
        };
        let own_text = spec.replace(RUN_DIR_PLACEHOLDER, "");
        if !own_text.contains(['*', '?', '[']) || cwd.join(&literal).is_dir() {
            return Ok(Spec::Path(PathBuf::from(literal)));
        }
        let pattern = match &run_dir {
            Some(dir) => spec.replace(RUN_DIR_PLACEHOLDER, &glob::Pattern::escape(dir)),
            None => literal,
        };
        match glob::Pattern::new(&pattern) {
            Ok(_) => Ok(Spec::Glob(pattern)),
            Err(source) => Err(CheckpointError::BadPattern { pattern, source }),
        }
    }

    /// Finds the newest complete checkpoint the spec designates: see [`discover`].
    pub fn discover(&self) -> Result<Discovery, CheckpointError> {
        let path = match self {
            Spec::Glob(pattern) => return Ok(choose(glob_candidates(pattern)?)),
            Spec::Path(path) => path,
        };
        match fs::metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Discovery::default()),
            Err(source) => Err(CheckpointError::Unreadable {
                path: path.clone(),
                source,
            }),
            Ok(meta) if meta.is_dir() => Ok(choose(scan_dir(path)?)),
            // A single named file: the user pointed at it, so it is the only candidate.
            Ok(meta) => Ok(choose(vec![Candidate {
                path: path.clone(),
                step: step_from_path(path),
                modified: modified(&meta),
                known_incomplete: None,
            }])),
        }
    }
}

/// Checks whether the checkpoint at `path` (a file or a checkpoint directory) was written
/// completely, and says what format it is.
///
/// What "complete" means per format:
/// - torch.save zip (`PK\x03\x04` at the start, whatever the extension): the end-of-central-
///   directory record (ZIP64 records too) is present at the very end and points at a central
///   directory inside the file. torch writes these last, so a cut-short save lacks them.
/// - torch.save legacy (pickle protocol 2+ and torch's magic number): accepted on its header
///   alone. The format is a sequence of pickles followed by raw storages whose total length is
///   only known after unpickling, so its end cannot be checked without reading the whole file.
/// - safetensors: the size is exactly 8 + header length + the largest `data_offsets` end.
/// - HF Trainer `checkpoint-N/`: holds `trainer_state.json`, which the Trainer writes at the end
///   of a save.
/// - DeepSpeed tag directory: the `latest` file beside it names it (DeepSpeed writes `latest`
///   after the save) and every `*.pt` file in it is a complete torch.save file (rank 0 may write
///   `latest` before slower ranks finish their shards).
/// - torch.distributed.checkpoint directory: holds `.metadata`, which DCP writes last.
///
/// Symlinks (Lightning's `last.ckpt` in older versions) are followed.
pub fn validate(path: &Path) -> Result<Format, Incomplete> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let dangling = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
            return Err(Incomplete::new(if dangling {
                "symlink points to a file that does not exist"
            } else {
                "does not exist (deleted while gpuwarden looked?)"
            }));
        }
        Err(e) => return Err(Incomplete::new(format!("cannot be read: {e}"))),
    };
    if meta.is_dir() {
        validate_dir(path)
    } else {
        validate_file(path, meta.len())
    }
}

/// Reads the training step from a checkpoint's file or directory name.
///
/// The first of these that the name (without its extension) holds, keywords in any case:
/// 1. the number after `step` (`ckpt-step00015.pt` → 15, `epoch=0-step=8.ckpt` → 8,
///    `global_step100` → 100; the last such number if there are several);
/// 2. the number after `checkpoint`, `iteration` or `iter` (`checkpoint-6` → 6,
///    `iter_2000.pt` → 2000; DeepSpeed's `global_stepN` is already caught by `step`);
/// 3. the number after `epoch` (`epoch=3-val_loss=0.50.ckpt` → 3, `model_epoch7.pth.tar` → 7);
/// 4. the name's only run of digits, if it has exactly one (`model_1000.pt` → 1000,
///    `ckpt-300` → 300, `ckpt.1000` → 1000), not counting a trailing Lightning version suffix
///    `-vN`.
///
/// Otherwise there is no step, and the name is ordered by its mtime: `last.ckpt`,
/// `model.safetensors`, `last-v1.ckpt`, and names with several unrelated numbers such as
/// `loss=0.50.ckpt` or `resnet50-finetune2.pt`. Taking "the last number" from those would read a
/// metric or a model size as a step (`val_loss=0.50` as step 50, beating `val_loss=0.45`).
/// Between the keywords and the numbers one `=`, `_` or `-` may stand.
pub fn step_from_name(name: &str) -> Option<u64> {
    let stem = stem_of(name);
    let lower = stem.to_ascii_lowercase();
    number_after(&lower, "step", Boundary::Anywhere)
        .or_else(|| number_after(&lower, "checkpoint", Boundary::Anywhere))
        .or_else(|| number_after(&lower, "iteration", Boundary::WordStart))
        .or_else(|| number_after(&lower, "iter", Boundary::WordStart))
        .or_else(|| number_after(&lower, "epoch", Boundary::Anywhere))
        .or_else(|| only_digit_run(without_version_suffix(stem)))
}

/// `name` without its final extension, unless that "extension" starts with a digit
/// (`ckpt.1000` is a step, not a file type).
fn stem_of(name: &str) -> &str {
    match name.rfind('.') {
        Some(dot) if dot > 0 => {
            let ext = &name[dot + 1..];
            if ext.starts_with(|c: char| c.is_ascii_digit()) {
                name
            } else {
                &name[..dot]
            }
        }
        _ => name,
    }
}

/// Where a keyword may start in a name.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Boundary {
    /// Anywhere: `globalstep5`, `ckptstep5` and `Step_42` all name a step.
    Anywhere,
    /// Not right after a letter: `iter` is inside `writer` and `filter`, which name no iteration.
    WordStart,
}

/// The number after the last `keyword` in `lower` (already lowercase) that is followed by digits,
/// allowing one `=`, `_` or `-` between them.
fn number_after(lower: &str, keyword: &str, boundary: Boundary) -> Option<u64> {
    lower.rmatch_indices(keyword).find_map(|(at, _)| {
        let after_letter = lower[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphabetic());
        if boundary == Boundary::WordStart && after_letter {
            return None;
        }
        let rest = &lower[at + keyword.len()..];
        let rest = rest.strip_prefix(['=', '_', '-']).unwrap_or(rest);
        leading_number(rest)
    })
}

/// The digits at the start of `s`, if any and if they fit a u64.
fn leading_number(s: &str) -> Option<u64> {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    s[..end].parse().ok()
}

/// `stem` without Lightning's `-vN` suffix, which it appends when a file of the same name exists
/// (`last-v1.ckpt`): a version, not a step.
fn without_version_suffix(stem: &str) -> &str {
    match stem.rsplit_once("-v") {
        Some((head, version))
            if !version.is_empty() && version.bytes().all(|b| b.is_ascii_digit()) =>
        {
            head
        }
        _ => stem,
    }
}

/// The number in `stem` if it holds exactly one run of digits.
fn only_digit_run(stem: &str) -> Option<u64> {
    let mut runs = stem
        .split(|c: char| !c.is_ascii_digit())
        .filter(|run| !run.is_empty());
    let only = runs.next()?;
    match runs.next() {
        Some(_) => None,
        None => only.parse().ok(),
    }
}

fn step_from_path(path: &Path) -> Option<u64> {
    step_from_name(&path.file_name()?.to_string_lossy())
}

/// Names that writers use while a save is in flight, and hidden files: never a checkpoint.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.')
        || name.starts_with("tmp-checkpoint-")
        || name.ends_with(".tmp")
        || name.ends_with(".partial")
}

/// An HF Trainer checkpoint directory name: `checkpoint-` followed by digits only.
fn is_hf_checkpoint_name(name: &str) -> bool {
    name.strip_prefix("checkpoint-")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn has_checkpoint_extension(name: &str) -> bool {
    match name.rsplit_once('.') {
        Some((_, ext)) => CHECKPOINT_EXTENSIONS
            .iter()
            .any(|known| ext.eq_ignore_ascii_case(known)),
        None => false,
    }
}

fn modified(meta: &fs::Metadata) -> SystemTime {
    // Linux filesystems all record mtimes; the fallback only keeps exotic ones usable.
    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Something that may be a checkpoint; validated only when it is next in line.
struct Candidate {
    path: PathBuf,
    step: Option<u64>,
    modified: SystemTime,
    /// Set when discovery already knows it is unusable (e.g. `latest` names a missing directory).
    known_incomplete: Option<Incomplete>,
}

impl Candidate {
    fn check(&self) -> Result<Format, Incomplete> {
        match &self.known_incomplete {
            Some(incomplete) => Err(incomplete.clone()),
            None => validate(&self.path),
        }
    }
}

/// Lists the candidates of a directory spec, one level deep.
fn scan_dir(dir: &Path) -> Result<Vec<Candidate>, CheckpointError> {
    let unreadable = |source| CheckpointError::Unreadable {
        path: dir.to_path_buf(),
        source,
    };
    let entries = fs::read_dir(dir).map_err(unreadable)?;
    let mut candidates = Vec::new();
    let mut deepspeed_tag = None;
    let latest_path = dir.join(DEEPSPEED_LATEST);
    if let Some(latest) = read_deepspeed_latest(dir) {
        let latest_modified = fs::metadata(&latest_path)
            .map(|m| modified(&m))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        match latest {
            Ok(tag) => {
                let tag_dir = dir.join(&tag);
                let step = step_from_name(&tag);
                candidates.push(match fs::metadata(&tag_dir) {
                    Ok(meta) => Candidate {
                        path: tag_dir,
                        step,
                        modified: modified(&meta),
                        known_incomplete: None,
                    },
                    Err(_) => Candidate {
                        path: tag_dir,
                        step,
                        modified: latest_modified,
                        known_incomplete: Some(Incomplete::new(format!(
                            "DeepSpeed `latest` names `{tag}`, but there is no such directory \
                             (deleted, or saved elsewhere?)"
                        ))),
                    },
                });
                deepspeed_tag = Some(tag);
            }
            Err(incomplete) => candidates.push(Candidate {
                path: latest_path,
                step: None,
                modified: latest_modified,
                known_incomplete: Some(incomplete),
            }),
        }
    }
    for entry in entries {
        let entry = entry.map_err(unreadable)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if deepspeed_tag.as_deref() == Some(&*name) {
            continue; // already a candidate, through `latest`
        }
        if let Some(candidate) = classify(&entry.path(), &name, Mode::Scan) {
            candidates.push(candidate);
        }
    }
    Ok(candidates)
}

/// Lists the candidates of a glob spec.
fn glob_candidates(pattern: &str) -> Result<Vec<Candidate>, CheckpointError> {
    let paths = glob::glob(pattern).map_err(|source| CheckpointError::BadPattern {
        pattern: pattern.to_owned(),
        source,
    })?;
    let mut candidates = Vec::new();
    for path in paths {
        let path = path.map_err(|e| CheckpointError::Unreadable {
            path: e.path().to_path_buf(),
            source: e.into(),
        })?;
        let Some(name) = path.file_name() else {
            continue;
        };
        let name = name.to_string_lossy().into_owned();
        if let Some(candidate) = classify(&path, &name, Mode::Glob) {
            candidates.push(candidate);
        }
    }
    Ok(candidates)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Entries of a scanned directory: DeepSpeed tag directories come only through `latest`.
    Scan,
    /// Matches of the user's glob: a matched `global_stepN/` is a candidate, and [`validate`]
    /// then accepts it only if `latest` names it.
    Glob,
}

/// Decides whether one directory entry or glob match is a checkpoint candidate.
fn classify(path: &Path, name: &str, mode: Mode) -> Option<Candidate> {
    if is_temp_name(name) {
        return None;
    }
    let candidate = |meta: &fs::Metadata| Candidate {
        path: path.to_path_buf(),
        step: step_from_name(name),
        modified: modified(meta),
        known_incomplete: None,
    };
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(_) => {
            // A dangling `last.ckpt` symlink is a broken checkpoint the user should hear about;
            // anything else that vanished was deleted by checkpoint rotation while we looked.
            let link = fs::symlink_metadata(path).ok()?;
            return (link.file_type().is_symlink() && has_checkpoint_extension(name))
                .then(|| candidate(&link));
        }
    };
    if meta.is_dir() {
        let is_checkpoint_dir = if name.starts_with("global_step") {
            // DeepSpeed writes the tag directory before `latest`: only `latest` says it is done.
            mode == Mode::Glob
        } else {
            is_hf_checkpoint_name(name) || looks_like_dcp_dir(path)
        };
        return is_checkpoint_dir.then(|| candidate(&meta));
    }
    // Extensionless files are candidates only if they start like a torch.save file; a file
    // with an unknown extension is not (a `.zip` code snapshot starts with the zip magic too).
    let is_checkpoint_file = has_checkpoint_extension(name)
        || (!name.contains('.')
            && sniff(path).is_ok_and(|head| {
                head.starts_with(ZIP_LOCAL_HEADER) || is_torch_legacy_header(&head)
            }));
    is_checkpoint_file.then(|| candidate(&meta))
}

/// Picks the newest complete candidate and reports the incomplete ones that would have won.
///
/// Ordering rule (numbered vs unnumbered): a step number in the name is a better witness of
/// progress than an mtime (copies and restores change mtimes), so numbered candidates are
/// ordered by step, ties by mtime. Unnumbered ones (`last.ckpt`, `model.safetensors`) can only
/// be ordered by mtime. When both kinds are present we take the best complete numbered one and
/// the newest complete unnumbered one, and return the unnumbered one only if its mtime is
/// strictly newer: Lightning writes `epoch=0-step=8.ckpt` and `last.ckpt` for the same step,
/// and on a tie the numbered one says which step it is.
///
/// Within one kind, an incomplete candidate that ties the chosen one (same step and mtime, or
/// same mtime) is reported whatever its name: the path only makes the order total, it says
/// nothing about which save came last.
fn choose(candidates: Vec<Candidate>) -> Discovery {
    let (mut numbered, mut unnumbered): (Vec<_>, Vec<_>) =
        candidates.into_iter().partition(|c| c.step.is_some());
    // Path as the last key keeps the choice deterministic when mtimes tie.
    numbered.sort_by(|a, b| (b.step, b.modified, &b.path).cmp(&(a.step, a.modified, &a.path)));
    unnumbered.sort_by(|a, b| (b.modified, &b.path).cmp(&(a.modified, &a.path)));
    let (best_numbered, failed_numbered) = first_complete(numbered, |c, best| {
        (c.step, c.modified) == (best.step, best.modified)
    });
    let (best_unnumbered, failed_unnumbered) =
        first_complete(unnumbered, |c, best| c.modified == best.modified);
    let newest = match (best_numbered, best_unnumbered) {
        (Some(n), Some(u)) => Some(if u.modified > n.modified { u } else { n }),
        (n, u) => n.or(u),
    };
    // Each failed candidate is ahead of (or tied with) the complete one of its own kind; across
    // kinds it would have won under the same strictly-newer rule as above.
    let winner_numbered = newest.as_ref().map(|c| c.step.is_some());
    let winner_modified = newest.as_ref().map(|c| c.modified);
    let skipped = failed_numbered
        .into_iter()
        .filter(|(c, _)| match (winner_numbered, winner_modified) {
            (Some(false), Some(at)) => c.modified >= at,
            _ => true,
        })
        .chain(failed_unnumbered.into_iter().filter(|(c, _)| {
            match (winner_numbered, winner_modified) {
                (Some(true), Some(at)) => c.modified > at,
                _ => true,
            }
        }))
        .map(|(c, incomplete)| Skipped {
            path: c.path,
            reason: incomplete.reason,
        })
        .collect();
    Discovery { newest, skipped }
}

/// Validates candidates in order until one is complete; returns it, the incomplete ones before
/// it, and the incomplete ones right after it that `ties` says are as new as it.
fn first_complete(
    ordered: Vec<Candidate>,
    ties: impl Fn(&Candidate, &Checkpoint) -> bool,
) -> (Option<Checkpoint>, Vec<(Candidate, Incomplete)>) {
    let mut failed = Vec::new();
    let mut best: Option<Checkpoint> = None;
    for candidate in ordered {
        if let Some(best) = &best {
            // Sorted, so the tied candidates come right after the chosen one.
            if !ties(&candidate, best) {
                break;
            }
            if let Err(incomplete) = candidate.check() {
                failed.push((candidate, incomplete));
            }
            continue;
        }
        match candidate.check() {
            Ok(format) => {
                best = Some(Checkpoint {
                    path: candidate.path,
                    step: candidate.step,
                    format,
                    modified: candidate.modified,
                });
            }
            Err(incomplete) => failed.push((candidate, incomplete)),
        }
    }
    (best, failed)
}

fn validate_dir(dir: &Path) -> Result<Format, Incomplete> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // `Path::parent` of a bare name is "", which the filesystem calls does not accept.
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match read_deepspeed_latest(parent) {
        Some(Ok(tag)) if tag == name => return validate_deepspeed_dir(dir),
        Some(Ok(tag)) if name.starts_with("global_step") => {
            return Err(Incomplete::new(format!(
                "DeepSpeed checkpoint directory is not the one `latest` names (`{tag}`): its save \
                 did not finish, or a later one superseded it"
            )));
        }
        Some(Err(incomplete)) if name.starts_with("global_step") => return Err(incomplete),
        None if name.starts_with("global_step") => {
            return Err(Incomplete::new(
                "DeepSpeed checkpoint directory has no `latest` file beside it naming it \
                 (DeepSpeed writes `latest` after the save; interrupted?)",
            ));
        }
        _ => {}
    }
    let has_trainer_state = dir.join("trainer_state.json").is_file();
    if has_trainer_state {
        return Ok(Format::HfTrainer);
    }
    if is_hf_checkpoint_name(&name) {
        return Err(Incomplete::new(
            "HF Trainer checkpoint directory has no trainer_state.json (the Trainer writes it at \
             the end of a save; interrupted?)",
        ));
    }
    if dir.join(".metadata").is_file() {
        return Ok(Format::Dcp);
    }
    if looks_like_dcp_dir(dir) {
        return Err(Incomplete::new(
            "torch.distributed.checkpoint directory has no .metadata (DCP writes it last; save \
             interrupted?)",
        ));
    }
    Err(Incomplete::new(
        "directory is not a recognised checkpoint: no trainer_state.json (HF Trainer), no \
         .metadata (torch.distributed.checkpoint), and no DeepSpeed `latest` naming it",
    ))
}

/// A DCP directory holds `.metadata` when complete and `*.distcp` shards in any case.
fn looks_like_dcp_dir(dir: &Path) -> bool {
    if dir.join(".metadata").is_file() {
        return true;
    }
    fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            Path::new(&e.file_name())
                .extension()
                .is_some_and(|ext| ext == "distcp")
        })
    })
}

/// Reads DeepSpeed's `latest` file in `dir`: `None` if there is none, else the tag it names
/// or why it names nothing usable.
fn read_deepspeed_latest(dir: &Path) -> Option<Result<String, Incomplete>> {
    let path = dir.join(DEEPSPEED_LATEST);
    if !path.is_file() {
        return None;
    }
    let mut text = Vec::new();
    let read = File::open(&path)
        .and_then(|f| f.take(DEEPSPEED_LATEST_MAX).read_to_end(&mut text))
        .map_err(|e| Incomplete::new(format!("DeepSpeed `latest` file cannot be read: {e}")));
    Some(read.and_then(|_| {
        let tag = String::from_utf8_lossy(&text).trim().to_owned();
        let single_name =
            !tag.is_empty() && tag != "." && tag != ".." && !tag.contains(['/', '\\', '\n', '\0']);
        if single_name {
            Ok(tag)
        } else {
            Err(Incomplete::new(
                "DeepSpeed `latest` file does not hold a checkpoint directory name (empty or \
                 garbled: interrupted write?)",
            ))
        }
    }))
}

fn validate_deepspeed_dir(dir: &Path) -> Result<Format, Incomplete> {
    let entries = fs::read_dir(dir).map_err(|e| {
        Incomplete::new(format!(
            "DeepSpeed checkpoint directory cannot be read: {e}"
        ))
    })?;
    let mut files = 0usize;
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        files += 1;
        if path.extension().is_some_and(|ext| ext == "pt") {
            validate_file(&path, meta.len()).map_err(|incomplete| {
                Incomplete::new(format!(
                    "DeepSpeed checkpoint file {}: {}",
                    entry.file_name().to_string_lossy(),
                    incomplete.reason
                ))
            })?;
        }
    }
    if files == 0 {
        return Err(Incomplete::new(
            "DeepSpeed checkpoint directory named by `latest` is empty",
        ));
    }
    Ok(Format::DeepSpeed)
}

/// Reads the first [`SNIFF_LEN`] bytes (fewer if the file is shorter).
fn sniff(path: &Path) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(SNIFF_LEN);
    File::open(path)?
        .take(SNIFF_LEN as u64)
        .read_to_end(&mut head)?;
    Ok(head)
}

/// Pickle protocol 2 or later (`\x80` + version), an optional protocol-4 frame header
/// (`\x95` + 8-byte length), then torch's magic number.
fn is_torch_legacy_header(head: &[u8]) -> bool {
    let [0x80, proto, rest @ ..] = head else {
        return false;
    };
    if !(2..=5).contains(proto) {
        return false;
    }
    let rest = match rest {
        [0x95, framed @ ..] if framed.len() >= 8 => &framed[8..],
        _ => rest,
    };
    rest.starts_with(&TORCH_LEGACY_MAGIC)
}

fn validate_file(path: &Path, len: u64) -> Result<Format, Incomplete> {
    let unreadable = |e: io::Error| Incomplete::new(format!("cannot be read: {e}"));
    if len == 0 {
        return Err(Incomplete::new(
            "file is empty (the save never wrote anything; interrupted?)",
        ));
    }
    let mut file = File::open(path).map_err(unreadable)?;
    let mut head = Vec::with_capacity(SNIFF_LEN);
    (&mut file)
        .take(SNIFF_LEN as u64)
        .read_to_end(&mut head)
        .map_err(unreadable)?;
    if head.starts_with(ZIP_LOCAL_HEADER) {
        check_zip(&mut file, len)?;
        return Ok(Format::TorchZip);
    }
    if is_torch_legacy_header(&head) {
        return Ok(Format::TorchLegacy);
    }
    let safetensors_ext = path
        .extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("safetensors"));
    // A safetensors header is JSON, so byte 8 is its opening brace.
    if safetensors_ext || head.get(8) == Some(&b'{') {
        check_safetensors(&mut file, len)?;
        return Ok(Format::Safetensors);
    }
    if len < TORCH_LEGACY_MAGIC.len() as u64 + 2 {
        return Err(Incomplete::new(format!(
            "file is only {len} bytes, too short for any checkpoint format (torn write?)"
        )));
    }
    Err(Incomplete::new(
        "not a recognised checkpoint: neither a torch.save file (zip or legacy) nor safetensors",
    ))
}

/// Reads exactly `buf.len()` bytes at `offset`.
fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

fn u16_le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_le(b: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(bytes)
}

/// Checks that a zip's end records are present and consistent. torch.save (miniz) writes the
/// central directory and end records after all entries, so they are the proof of a finished
/// save. The slices indexed here all have the record's full length by construction.
fn check_zip(file: &mut File, len: u64) -> Result<(), Incomplete> {
    let unreadable = |e: io::Error| Incomplete::new(format!("cannot be read: {e}"));
    let no_eocd =
        || Incomplete::new("torch.save zip has no end-of-central-directory record (torn write?)");
    if len < ZIP_EOCD_LEN {
        return Err(no_eocd());
    }
    let tail_len = len.min(ZIP_EOCD_SEARCH);
    let tail_start = len - tail_len;
    // tail_len <= 64 KiB + 22, so the conversion cannot truncate.
    let mut tail = vec![0u8; tail_len as usize];
    read_at(file, tail_start, &mut tail).map_err(unreadable)?;

    // The end record must end exactly at EOF (after its comment); searching from the back and
    // requiring that rejects a signature that happens to sit in tensor data or in a comment,
    // and a record cut short by a torn write.
    let eocd_at = memchr::memmem::rfind_iter(&tail, ZIP_EOCD)
        .find(|&at| {
            tail.len() - at >= ZIP_EOCD_LEN as usize
                && at + ZIP_EOCD_LEN as usize + usize::from(u16_le(&tail, at + 20)) == tail.len()
        })
        .ok_or_else(no_eocd)?;
    let eocd = &tail[eocd_at..eocd_at + ZIP_EOCD_LEN as usize];
    let eocd_pos = tail_start + eocd_at as u64;
    let mut entries = u64::from(u16_le(eocd, 10));
    let mut cd_size = u64::from(u32_le(eocd, 12));
    let mut cd_offset = u64::from(u32_le(eocd, 16));
    // The central directory must end before the records that follow it.
    let mut cd_limit = eocd_pos;

    // torch writes ZIP64 records for every archive (and needs them past 4 GiB): a locator right
    // before the end record, pointing at the ZIP64 end record, which holds the true values.
    let mut locator = [0u8; ZIP64_LOCATOR_LEN as usize];
    let has_locator = eocd_pos >= ZIP64_LOCATOR_LEN
        && read_at(file, eocd_pos - ZIP64_LOCATOR_LEN, &mut locator).is_ok()
        && locator.starts_with(ZIP64_LOCATOR);
    if has_locator {
        let record_pos = u64_le(&locator, 8);
        let locator_pos = eocd_pos - ZIP64_LOCATOR_LEN;
        let mut record = [0u8; ZIP64_EOCD_LEN as usize];
        let record_ok = record_pos
            .checked_add(ZIP64_EOCD_LEN)
            .is_some_and(|end| end <= locator_pos)
            && read_at(file, record_pos, &mut record).is_ok()
            && record.starts_with(ZIP64_EOCD);
        if !record_ok {
            return Err(Incomplete::new(format!(
                "torch.save zip's ZIP64 locator points at offset {record_pos}, where there is no \
                 ZIP64 end record (corrupt or torn)"
            )));
        }
        entries = u64_le(&record, 32);
        cd_size = u64_le(&record, 40);
        cd_offset = u64_le(&record, 48);
        cd_limit = record_pos;
    } else if entries == 0xFFFF || cd_size == 0xFFFF_FFFF || cd_offset == 0xFFFF_FFFF {
        return Err(Incomplete::new(
            "torch.save zip's end record defers to a ZIP64 record, but the ZIP64 locator is \
             missing (corrupt or torn)",
        ));
    }
    if entries == 0 {
        return Err(Incomplete::new(
            "zip archive has no entries, so it is not a torch.save checkpoint",
        ));
    }
    let inside = cd_offset
        .checked_add(cd_size)
        .is_some_and(|end| end <= cd_limit);
    let mut signature = [0u8; 4];
    if !inside
        || read_at(file, cd_offset, &mut signature).is_err()
        || &signature != ZIP_CENTRAL_HEADER
    {
        return Err(Incomplete::new(format!(
            "torch.save zip's end record points at a central directory (offset {cd_offset}, \
             {cd_size} bytes) that is not there (corrupt or torn)"
        )));
    }
    Ok(())
}

/// Checks that a safetensors file is exactly as long as its header says.
fn check_safetensors(file: &mut File, len: u64) -> Result<(), Incomplete> {
    let unreadable = |e: io::Error| Incomplete::new(format!("cannot be read: {e}"));
    let mut prefix = [0u8; 8];
    if len < 8 {
        return Err(Incomplete::new(format!(
            "safetensors file is only {len} bytes, shorter than its 8-byte header length \
             (torn write?)"
        )));
    }
    read_at(file, 0, &mut prefix).map_err(unreadable)?;
    let header_len = u64::from_le_bytes(prefix);
    // Check the length before allocating anything: a garbage length could be petabytes.
    if header_len > SAFETENSORS_MAX_HEADER {
        return Err(Incomplete::new(format!(
            "safetensors header length {header_len} is over the format's 100 MB limit (corrupt, \
             or not a safetensors file)"
        )));
    }
    if header_len > len - 8 {
        return Err(Incomplete::new(format!(
            "safetensors header claims {header_len} bytes but the file has only {} after the \
             length (torn write?)",
            len - 8
        )));
    }
    // header_len <= 100 MB, so this cannot truncate.
    let mut header = vec![0u8; header_len as usize];
    read_at(file, 8, &mut header).map_err(unreadable)?;
    let entries: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| {
            Incomplete::new(format!(
                "safetensors header is not a JSON object ({e}); corrupt or torn"
            ))
        })?;
    let mut data_len = 0u64;
    for (name, entry) in &entries {
        if name == "__metadata__" {
            continue;
        }
        let offsets = entry
            .get("data_offsets")
            .and_then(serde_json::Value::as_array)
            .and_then(|o| match o.as_slice() {
                [start, end] => Some((start.as_u64()?, end.as_u64()?)),
                _ => None,
            });
        match offsets {
            Some((start, end)) if start <= end => data_len = data_len.max(end),
            _ => {
                return Err(Incomplete::new(format!(
                    "safetensors header entry `{name}` has no valid data_offsets (corrupt)"
                )));
            }
        }
    }
    // Offsets come from the file, so a corrupt header may overflow the sum.
    let expected = (8 + header_len).checked_add(data_len).ok_or_else(|| {
        Incomplete::new("safetensors header has data_offsets beyond any file size (corrupt)")
    })?;
    if len < expected {
        return Err(Incomplete::new(format!(
            "safetensors file is {len} bytes but its header describes {expected} (torn write?)"
        )));
    }
    if len > expected {
        return Err(Incomplete::new(format!(
            "safetensors file has {} bytes after the last tensor its header describes (corrupt)",
            len - expected
        )));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The real checkpoints written by PyTorch, Lightning, transformers and safetensors
    /// (see its README.md), plus the ZIP64 fixture.
    const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/checkpoints");

    fn data(rel: &str) -> PathBuf {
        Path::new(DATA).join(rel)
    }

    fn name_of(path: &Path) -> String {
        path.file_name().unwrap().to_string_lossy().into_owned()
    }

    /// Copies a fixture into a fresh writable file (the fixtures may be read-only).
    fn copy(rel: &str, to: &Path) {
        fs::write(to, fs::read(data(rel)).unwrap()).unwrap();
    }

    /// Writes the first `len` bytes of a fixture: a save cut short.
    fn copy_prefix(rel: &str, to: &Path, len: usize) {
        fs::write(to, &fs::read(data(rel)).unwrap()[..len]).unwrap();
    }

    fn set_mtime(path: &Path, secs: u64) {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs);
        File::open(path).unwrap().set_modified(at).unwrap();
    }

    fn discover_path(path: &Path) -> Discovery {
        discover(path.to_str().unwrap()).unwrap()
    }

    fn newest_name(found: &Discovery) -> String {
        name_of(&found.newest.as_ref().expect("a complete checkpoint").path)
    }

    fn skipped_names(found: &Discovery) -> Vec<String> {
        found.skipped.iter().map(|s| name_of(&s.path)).collect()
    }

    /// Discovers `root` and checks, by file name, the checkpoint it chose and the newer ones it
    /// reported skipping: the two answers every discovery test is about.
    #[track_caller]
    fn assert_found(root: &Path, newest: &str, skipped: &[&str]) {
        let found = discover_path(root);
        assert_eq!(newest_name(&found), newest);
        assert_eq!(skipped_names(&found), skipped);
    }

    /// The name and step number of the checkpoint that discovery chooses in `root`.
    fn newest_step(root: &Path) -> (String, Option<u64>) {
        let newest = discover_path(root).newest.expect("a complete checkpoint");
        (name_of(&newest.path), newest.step)
    }

    fn reason(path: &Path) -> String {
        validate(path).expect_err("incomplete").reason
    }

    #[test]
    fn step_numbers_come_from_names() {
        let cases = [
            ("ckpt-step00015.pt", Some(15)),
            ("epoch=0-step=8.ckpt", Some(8)),
            ("global_step100", Some(100)),
            ("checkpoint-9", Some(9)),
            ("step-20-torn", Some(20)),
            ("cuda-tensors-step00020.pt", Some(20)),
            ("Step_42.safetensors", Some(42)),
            ("epoch=2-step=300-v1.ckpt", Some(300)),
            // Lightning's monitored-metric names: the epoch, never the metric.
            ("epoch=3-val_loss=0.50.ckpt", Some(3)),
            ("epoch=4-val_loss=0.45.ckpt", Some(4)),
            ("epoch_12-acc_0.91.pt", Some(12)),
            ("model_epoch7.pth.tar", Some(7)),
            ("checkpoint-9-best", Some(9)),
            ("iter_2000.pt", Some(2000)),
            ("ITERATION-5.pth", Some(5)),
            ("model-iter=300-loss=1.5.pt", Some(300)),
            // The only number in the name.
            ("model_1000.pt", Some(1000)),
            ("ckpt-300", Some(300)),
            ("ckpt.1000", Some(1000)),
            ("writer3.pt", Some(3)),
            // No step: ordered by mtime.
            ("last.ckpt", None),
            ("last-v1.ckpt", None),
            ("model-v2.pt", None),
            ("model.safetensors", None),
            ("pytorch_model.bin", None),
            ("step.pt", None),
            ("val_loss=0.50.ckpt", None),
            ("resnet50-finetune2.pt", None),
            ("filter64-run3.pt", None),
        ];
        for (name, step) in cases {
            assert_eq!(step_from_name(name), step, "{name}");
        }
    }

    #[test]
    fn torch_save_files_are_told_complete_or_torn() {
        let ok = |rel: &str| validate(&data(rel));
        assert_eq!(ok("torch_save/ckpt-step00015.pt"), Ok(Format::TorchZip));
        assert_eq!(
            ok("torch_save/cuda-tensors-step00020.pt"),
            Ok(Format::TorchZip)
        );
        assert_eq!(
            ok("torch_save/legacy-step00010.pt"),
            Ok(Format::TorchLegacy)
        );
        for torn in [
            "torch_save/torn-step00017.pt",
            "torch_save/torn-tail-step00018.pt",
        ] {
            assert_eq!(
                reason(&data(torn)),
                "torch.save zip has no end-of-central-directory record (torn write?)",
                "{torn}"
            );
        }
    }

    #[test]
    fn zip_cut_anywhere_is_torn() {
        let dir = tempfile::tempdir().unwrap();
        let full = fs::read(data("torch_save/ckpt-step00015.pt"))
            .unwrap()
            .len();
        for keep in [
            full - 1,
            full - 22,
            full - 23,
            full - 42,
            full - 100,
            4000,
            30,
            4,
        ] {
            let path = dir.path().join("cut.pt");
            copy_prefix("torch_save/ckpt-step00015.pt", &path, keep);
            assert!(validate(&path).is_err(), "kept {keep} of {full} bytes");
        }
    }

    #[test]
    fn zip_end_record_must_point_at_a_central_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad-cd.pt");
        let mut bytes = fs::read(data("torch_save/ckpt-step00015.pt")).unwrap();
        // torch's ZIP64 end record sits before the 20-byte locator and 22-byte end record;
        // move its central-directory offset (at +48) off by one.
        let record = bytes.len() - 22 - 20 - 56;
        assert_eq!(&bytes[record..record + 4], ZIP64_EOCD);
        bytes[record + 48] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(reason(&path).contains("central directory"));
    }

    #[test]
    fn zip64_archives_are_read_through_their_zip64_records() {
        let fixture = "zip64/zip64-step00030.pt";
        assert_eq!(validate(&data(fixture)), Ok(Format::TorchZip));

        let dir = tempfile::tempdir().unwrap();
        let bytes = fs::read(data(fixture)).unwrap();
        // Its classic end record is saturated, as torch writes it past 4 GiB.
        assert_eq!(&bytes[bytes.len() - 6..bytes.len() - 2], &[0xff; 4]);
        let no_locator = dir.path().join("no-locator.pt");
        let mut patched = bytes.clone();
        let locator = bytes.len() - 22 - 20;
        patched[locator..locator + 4].copy_from_slice(b"XXXX");
        fs::write(&no_locator, &patched).unwrap();
        assert!(reason(&no_locator).contains("ZIP64 locator is missing"));

        let torn = dir.path().join("torn.pt");
        copy_prefix(fixture, &torn, bytes.len() - 30);
        assert!(validate(&torn).is_err());
    }

    #[test]
    fn legacy_files_are_accepted_on_their_header() {
        let dir = tempfile::tempdir().unwrap();
        // The documented limit: a cut legacy file still passes, its end is not checkable.
        let cut = dir.path().join("legacy-cut.pt");
        copy_prefix("torch_save/legacy-step00010.pt", &cut, 200);
        assert_eq!(validate(&cut), Ok(Format::TorchLegacy));
        let stub = dir.path().join("legacy-stub.pt");
        copy_prefix("torch_save/legacy-step00010.pt", &stub, 5);
        assert!(reason(&stub).contains("too short"));
        // Protocol 4 frames its pickles; the magic number follows the frame header.
        let mut framed = vec![0x80, 4, 0x95];
        framed.extend_from_slice(&[0x20, 0, 0, 0, 0, 0, 0, 0]);
        framed.extend_from_slice(&TORCH_LEGACY_MAGIC);
        assert!(is_torch_legacy_header(&framed));
        assert!(!is_torch_legacy_header(b"\x80\x02K\x01."));
    }

    #[test]
    fn safetensors_size_must_match_its_header() {
        assert_eq!(
            validate(&data("safetensors/model.safetensors")),
            Ok(Format::Safetensors)
        );
        assert!(reason(&data("safetensors/torn.safetensors")).contains("torn write?"));

        let dir = tempfile::tempdir().unwrap();
        let longer = dir.path().join("longer.safetensors");
        let mut bytes = fs::read(data("safetensors/model.safetensors")).unwrap();
        bytes.extend_from_slice(b"junk");
        fs::write(&longer, &bytes).unwrap();
        assert!(reason(&longer).contains("after the last tensor"));

        // Absurd header lengths are refused before anything is allocated.
        let huge = dir.path().join("huge.safetensors");
        let mut bytes = (1u64 << 60).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        fs::write(&huge, &bytes).unwrap();
        assert!(reason(&huge).contains("100 MB"));
        let beyond = dir.path().join("beyond.safetensors");
        let mut bytes = 1000u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        fs::write(&beyond, &bytes).unwrap();
        assert!(reason(&beyond).contains("claims 1000 bytes"));
    }

    /// Copies the fixture files of `rel_dir` into `to` with these mtimes: a git checkout gives
    /// the committed files checkout-time mtimes, maybe all equal, so no test may read theirs.
    fn copy_with_mtimes(rel_dir: &str, to: &Path, files: &[(&str, u64)]) {
        for &(name, at) in files {
            copy(&format!("{rel_dir}/{name}"), &to.join(name));
            set_mtime(&to.join(name), at);
        }
    }

    #[test]
    fn safetensors_dir_uses_the_complete_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let model = root.join("model.safetensors");
        let torn = root.join("torn.safetensors");
        copy_with_mtimes(
            "safetensors",
            root,
            &[("model.safetensors", 10), ("torn.safetensors", 20)],
        );
        let found = discover_path(root);
        assert_eq!(newest_name(&found), "model.safetensors");
        let newest = found.newest.as_ref().unwrap();
        assert_eq!((newest.step, newest.format), (None, Format::Safetensors));
        // The torn file is newer: reported.
        assert_eq!(skipped_names(&found), ["torn.safetensors"]);
        assert!(found.skipped[0].reason.contains("torn write?"));

        // Older than the complete file, it would have lost anyway: not reported.
        set_mtime(&torn, 5);
        assert_found(root, "model.safetensors", &[]);

        // Just as new (a git checkout, or two saves in one second on a coarse filesystem): the
        // complete file is used, and the torn one reported since it may be the later save.
        set_mtime(&torn, 10);
        set_mtime(&model, 10);
        assert_found(root, "model.safetensors", &["torn.safetensors"]);
    }

    #[test]
    fn an_exact_mtime_tie_reports_the_torn_file_whatever_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // Named so the torn file sorts on either side of the complete one.
        for (torn, complete) in [
            ("a-torn.safetensors", "model.safetensors"),
            ("z-torn.safetensors", "model.safetensors"),
            ("a-torn.pt", "b.pt"),
            ("b-torn.pt", "a.pt"),
        ] {
            for entry in fs::read_dir(root).unwrap() {
                fs::remove_file(entry.unwrap().path()).unwrap();
            }
            if torn.ends_with(".pt") {
                copy("torch_save/torn-step00017.pt", &root.join(torn));
                copy("torch_save/ckpt-step00015.pt", &root.join(complete));
            } else {
                copy("safetensors/torn.safetensors", &root.join(torn));
                copy("safetensors/model.safetensors", &root.join(complete));
            }
            set_mtime(&root.join(torn), 10);
            set_mtime(&root.join(complete), 10);
            let found = discover_path(root);
            assert_eq!(newest_name(&found), complete, "{torn} vs {complete}");
            assert_eq!(skipped_names(&found), [torn], "{torn} vs {complete}");
        }

        // The same for numbered files of one step: `-v1` is Lightning's second save of a name.
        for entry in fs::read_dir(root).unwrap() {
            fs::remove_file(entry.unwrap().path()).unwrap();
        }
        copy_with_mtimes(
            "lightning",
            root,
            &[("epoch=0-step=8.ckpt", 10), ("epoch=0-step=4.ckpt", 5)],
        );
        let torn = root.join("epoch=0-step=8-v1.ckpt");
        copy("torch_save/torn-step00017.pt", &torn);
        set_mtime(&torn, 10);
        assert_found(root, "epoch=0-step=8.ckpt", &["epoch=0-step=8-v1.ckpt"]);
        // A second later it is simply the newer save of step 8, torn.
        set_mtime(&torn, 11);
        assert_eq!(
            skipped_names(&discover_path(root)),
            ["epoch=0-step=8-v1.ckpt"]
        );
        // A second earlier it lost to the complete step 8 anyway.
        set_mtime(&torn, 9);
        assert!(discover_path(root).skipped.is_empty());
    }

    #[test]
    fn torch_save_dir_resumes_from_step_20() {
        let found = discover_path(&data("torch_save"));
        let newest = found.newest.unwrap();
        assert_eq!(name_of(&newest.path), "cuda-tensors-step00020.pt");
        assert_eq!((newest.step, newest.format), (Some(20), Format::TorchZip));
        // The torn steps 17 and 18 are older than 20, so nothing newer was skipped.
        assert!(found.skipped.is_empty(), "{:?}", found.skipped);
    }

    #[test]
    fn glob_skips_torn_newer_files() {
        let pattern = format!("{}/torch_save/*-step0001*.pt", glob::Pattern::escape(DATA));
        let found = discover(&pattern).unwrap();
        assert_eq!(newest_name(&found), "ckpt-step00015.pt");
        assert_eq!(found.newest.as_ref().unwrap().step, Some(15));
        assert_eq!(
            skipped_names(&found),
            ["torn-tail-step00018.pt", "torn-step00017.pt"]
        );
        assert!(
            found
                .skipped
                .iter()
                .all(|s| s.reason.contains("torn write?"))
        );
    }

    #[test]
    fn dcp_needs_its_metadata() {
        assert_eq!(validate(&data("dcp/step-15")), Ok(Format::Dcp));
        assert!(reason(&data("dcp/step-20-torn")).contains("no .metadata"));
        let found = discover_path(&data("dcp"));
        let newest = found.newest.as_ref().unwrap();
        assert_eq!(name_of(&newest.path), "step-15");
        assert_eq!((newest.step, newest.format), (Some(15), Format::Dcp));
        assert_eq!(skipped_names(&found), ["step-20-torn"]);
    }

    #[test]
    fn hf_trainer_dir_skips_checkpoint_without_trainer_state() {
        let found = discover_path(&data("hf"));
        let newest = found.newest.as_ref().unwrap();
        assert_eq!(name_of(&newest.path), "checkpoint-6");
        assert_eq!((newest.step, newest.format), (Some(6), Format::HfTrainer));
        assert_eq!(skipped_names(&found), ["checkpoint-9"]);
        assert!(found.skipped[0].reason.contains("trainer_state.json"));
    }

    #[test]
    fn lightning_dir_resumes_from_step_8() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // As ModelCheckpoint(save_last=True) writes them: last.ckpt in the same second as step 8.
        copy_with_mtimes(
            "lightning",
            root,
            &[
                ("epoch=0-step=4.ckpt", 10),
                ("epoch=0-step=8.ckpt", 20),
                ("last.ckpt", 20),
            ],
        );
        let found = discover_path(root);
        assert!(found.skipped.is_empty(), "{:?}", found.skipped);
        let newest = found.newest.unwrap();
        assert_eq!(
            (name_of(&newest.path), newest.step, newest.format),
            ("epoch=0-step=8.ckpt".into(), Some(8), Format::TorchZip)
        );
    }

    /// Regression: `val_loss=0.50` was read as step 50, so epoch 3 beat the newer epoch 4.
    #[test]
    fn lightning_metric_names_are_ordered_by_epoch_not_by_the_metric() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (name, at) in [
            ("epoch=2-val_loss=0.61.ckpt", 10),
            ("epoch=3-val_loss=0.50.ckpt", 20),
            ("epoch=4-val_loss=0.45.ckpt", 30),
        ] {
            copy("lightning/epoch=0-step=8.ckpt", &root.join(name));
            set_mtime(&root.join(name), at);
        }
        assert_eq!(
            newest_step(root),
            ("epoch=4-val_loss=0.45.ckpt".into(), Some(4))
        );
        // Copied back from a backup, epoch 4 is older on disk; its name still says it is newest.
        set_mtime(&root.join("epoch=4-val_loss=0.45.ckpt"), 1);
        assert_eq!(
            newest_name(&discover_path(root)),
            "epoch=4-val_loss=0.45.ckpt"
        );

        // Names with several unrelated numbers have no step and go by mtime.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (name, at) in [("val_loss=0.50.ckpt", 30), ("val_loss=0.45.ckpt", 20)] {
            copy("lightning/epoch=0-step=8.ckpt", &root.join(name));
            set_mtime(&root.join(name), at);
        }
        assert_eq!(newest_step(root), ("val_loss=0.50.ckpt".into(), None));
    }

    #[test]
    fn unnumbered_last_ckpt_wins_only_when_strictly_newer() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for name in ["epoch=0-step=4.ckpt", "epoch=0-step=8.ckpt", "last.ckpt"] {
            copy(&format!("lightning/{name}"), &root.join(name));
        }
        set_mtime(&root.join("epoch=0-step=4.ckpt"), 10);
        set_mtime(&root.join("epoch=0-step=8.ckpt"), 20);
        let last = root.join("last.ckpt");
        for (last_at, winner) in [
            (20, "epoch=0-step=8.ckpt"),
            (21, "last.ckpt"),
            (5, "epoch=0-step=8.ckpt"),
        ] {
            set_mtime(&last, last_at);
            assert_eq!(
                newest_name(&discover_path(root)),
                winner,
                "last at {last_at}"
            );
        }

        // A torn step 12 older than last.ckpt would have lost to it anyway: not reported.
        let torn = root.join("epoch=1-step=12.ckpt");
        copy("torch_save/torn-step00017.pt", &torn);
        set_mtime(&torn, 25);
        set_mtime(&last, 30);
        assert_found(root, "last.ckpt", &[]);
        // As new as last.ckpt, it would have won the tie: reported.
        set_mtime(&torn, 30);
        assert_found(root, "last.ckpt", &["epoch=1-step=12.ckpt"]);

        // A torn last.ckpt newer than step 8 is skipped for step 8.
        fs::remove_file(&torn).unwrap();
        copy("torch_save/torn-tail-step00018.pt", &last);
        set_mtime(&last, 30);
        assert_found(root, "epoch=0-step=8.ckpt", &["last.ckpt"]);
        // Older than step 8, it would have lost anyway: not reported.
        set_mtime(&last, 15);
        assert_found(root, "epoch=0-step=8.ckpt", &[]);
    }

    #[test]
    fn unnumbered_files_are_ordered_by_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        copy("torch_save/ckpt-step00015.pt", &root.join("a.pt"));
        copy("torch_save/legacy-step00010.pt", &root.join("b.pth"));
        copy("safetensors/model.safetensors", &root.join("c.safetensors"));
        set_mtime(&root.join("a.pt"), 10);
        set_mtime(&root.join("b.pth"), 30);
        set_mtime(&root.join("c.safetensors"), 20);
        let found = discover_path(root);
        assert_eq!(newest_name(&found), "b.pth");
        assert_eq!(found.newest.unwrap().format, Format::TorchLegacy);

        copy("torch_save/torn-step00017.pt", &root.join("d.pt"));
        set_mtime(&root.join("d.pt"), 40);
        assert_found(root, "b.pth", &["d.pt"]);
    }

    #[test]
    fn last_ckpt_symlinks_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        copy(
            "lightning/epoch=0-step=8.ckpt",
            &root.join("epoch=0-step=8.ckpt"),
        );
        copy("torch_save/torn-step00017.pt", &root.join("torn.ckpt"));
        let last = root.join("last.ckpt");
        std::os::unix::fs::symlink("epoch=0-step=8.ckpt", &last).unwrap();
        assert_eq!(validate(&last), Ok(Format::TorchZip));
        fs::remove_file(&last).unwrap();
        std::os::unix::fs::symlink("torn.ckpt", &last).unwrap();
        assert!(reason(&last).contains("torn write?"));
        fs::remove_file(&last).unwrap();
        std::os::unix::fs::symlink("gone.ckpt", &last).unwrap();
        assert!(reason(&last).contains("symlink"));

        // A dangling last.ckpt (just created, so newest) is reported, and step 8 is used.
        fs::remove_file(root.join("torn.ckpt")).unwrap();
        set_mtime(&root.join("epoch=0-step=8.ckpt"), 10);
        assert_found(root, "epoch=0-step=8.ckpt", &["last.ckpt"]);
    }

    /// DeepSpeed's layout: `latest` names the tag directory of the last finished save.
    fn deepspeed_layout(root: &Path) {
        fs::write(root.join("latest"), "global_step100\n").unwrap();
        fs::write(
            root.join("zero_to_fp32.py"),
            "# DeepSpeed's helper script\n",
        )
        .unwrap();
        for (tag, at) in [
            ("global_step50", 10),
            ("global_step100", 20),
            ("global_step200", 30),
        ] {
            let tag_dir = root.join(tag);
            fs::create_dir(&tag_dir).unwrap();
            copy(
                "torch_save/ckpt-step00015.pt",
                &tag_dir.join("mp_rank_00_model_states.pt"),
            );
            copy(
                "torch_save/ckpt-step00015.pt",
                &tag_dir.join("zero_pp_rank_0_mp_rank_00_optim_states.pt"),
            );
            set_mtime(&tag_dir, at);
        }
    }

    #[test]
    fn deepspeed_uses_only_the_tag_named_by_latest() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        deepspeed_layout(root);
        let found = discover_path(root);
        let newest = found.newest.as_ref().unwrap();
        assert_eq!(newest.path, root.join("global_step100"));
        assert_eq!((newest.step, newest.format), (Some(100), Format::DeepSpeed));
        // global_step200 is an unfinished save (latest not updated): not a candidate at all.
        assert!(found.skipped.is_empty(), "{:?}", found.skipped);
        assert!(reason(&root.join("global_step200")).contains("`latest` names"));

        // Through a glob, the unfinished newer tag is a candidate, and reported.
        let pattern = format!(
            "{}/global_step*",
            glob::Pattern::escape(root.to_str().unwrap())
        );
        let found = discover(&pattern).unwrap();
        assert_eq!(newest_name(&found), "global_step100");
        assert_eq!(skipped_names(&found), ["global_step200"]);
    }

    #[test]
    fn deepspeed_tag_with_a_torn_shard_or_missing_dir_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        deepspeed_layout(root);
        let shard = root.join("global_step100/zero_pp_rank_0_mp_rank_00_optim_states.pt");
        copy_prefix("torch_save/ckpt-step00015.pt", &shard, 9000);
        let found = discover_path(root);
        assert_eq!(found.newest, None);
        assert_eq!(skipped_names(&found), ["global_step100"]);
        assert!(found.skipped[0].reason.contains("zero_pp_rank_0"));

        fs::write(root.join("latest"), "global_step300").unwrap();
        let found = discover_path(root);
        assert_eq!(found.newest, None);
        assert!(found.skipped[0].reason.contains("no such directory"));
    }

    #[test]
    fn temp_names_and_other_files_never_count() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        copy(
            "torch_save/ckpt-step00015.pt",
            &root.join("ckpt-step00015.pt"),
        );
        for temp in [
            "ckpt-step00099.pt.tmp",
            "ckpt-step00098.pt.partial",
            ".ckpt-step00097.pt",
            "ckpt-step00096.zip",
        ] {
            copy("torch_save/ckpt-step00015.pt", &root.join(temp));
        }
        let hf_tmp = root.join("tmp-checkpoint-95");
        fs::create_dir(&hf_tmp).unwrap();
        fs::write(hf_tmp.join("trainer_state.json"), "{}").unwrap();
        fs::write(root.join("train-step00094.log"), "loss 0.1\n").unwrap();
        fs::write(root.join("config-step00093.json"), "{}").unwrap();
        fs::write(root.join("notes-step00092"), "not a checkpoint\n").unwrap();
        fs::create_dir(root.join("logs-step00091")).unwrap();
        assert_found(root, "ckpt-step00015.pt", &[]);

        // An extensionless file that starts like a torch.save archive does count.
        copy(
            "torch_save/ckpt-step00015.pt",
            &root.join("model-step00016"),
        );
        assert_eq!(newest_name(&discover_path(root)), "model-step00016");
    }

    #[test]
    fn missing_directory_means_no_checkpoint_yet() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("not-yet");
        assert_eq!(discover_path(&missing), Discovery::default());
        let pattern = format!("{}/ckpt-*.pt", missing.to_str().unwrap());
        assert_eq!(discover(&pattern).unwrap(), Discovery::default());
        let empty = dir.path().join("empty");
        fs::create_dir(&empty).unwrap();
        assert_eq!(discover_path(&empty), Discovery::default());
    }

    #[test]
    fn the_run_dir_never_decides_whether_a_spec_is_a_glob() {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().join("runs[3");
        let ckpt = run_dir.join("checkpoints");
        fs::create_dir_all(&ckpt).unwrap();
        copy(
            "safetensors/model.safetensors",
            &ckpt.join("m-step00015.safetensors"),
        );
        // A plain spec stays a path, even before the directory exists.
        let later = Spec::new("{run_dir}/later", Some(&run_dir), dir.path()).unwrap();
        assert_eq!(later, Spec::Path(run_dir.join("later")));
        for spec in [
            "{run_dir}/checkpoints",
            "{run_dir}/checkpoints/*.safetensors",
        ] {
            let found = Spec::new(spec, Some(&run_dir), dir.path())
                .unwrap()
                .discover()
                .unwrap();
            assert_eq!(newest_name(&found), "m-step00015.safetensors", "{spec}");
        }
    }

    #[test]
    fn bad_glob_is_an_error_that_says_how_to_fix_it() {
        let err = discover("/nonexistent/ckpt-[0-9.pt").unwrap_err();
        assert!(matches!(err, CheckpointError::BadPattern { .. }));
        assert!(err.to_string().contains("[[]"), "{err}");
    }

    #[test]
    fn a_single_file_spec_is_the_only_candidate() {
        let found = discover_path(&data("torch_save/legacy-step00010.pt"));
        assert_eq!(newest_name(&found), "legacy-step00010.pt");
        let found = discover_path(&data("torch_save/torn-step00017.pt"));
        assert_eq!(found.newest, None);
        assert_eq!(skipped_names(&found), ["torn-step00017.pt"]);
    }
}
