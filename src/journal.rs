//! The run directory and its journal: `RUN_DIR/journal.jsonl`, one JSON object per line.
//!
//! The journal is the truth about a run: every decision the supervisor makes becomes one line,
//! written, flushed and fsynced before gpuwarden acts on the next event, so an overnight run can
//! be read in the morning even when the machine died at 3 a.m. Lines are only ever appended;
//! nothing here rewrites or truncates an existing journal.
//!
//! Each line has `at` (RFC 3339, UTC) and `event` (the record's kind), then the record's fields.
//! The job's own output is logged beside it, byte-exact, by `crate::sources::output`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Serialize, Serializer};

use crate::gpu::JobGpu;
use crate::job::JobExit;
use crate::rules::{Action, FaultClass, Severity, Stream};

/// An exit status as the journal writes it: `{"code": 1}` or `{"signal": 6, "name": "SIGABRT"}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ExitRecord {
    Code { code: i32 },
    Signal { signal: i32, name: &'static str },
}

impl From<JobExit> for ExitRecord {
    fn from(e: JobExit) -> ExitRecord {
        match e {
            JobExit::Code(code) => ExitRecord::Code { code },
            JobExit::Signal(signal) => ExitRecord::Signal {
                signal,
                name: crate::job::signal_name(signal),
            },
        }
    }
}

/// A path or argument as the journal writes it, losslessly: a JSON string when it is UTF-8
/// (almost always), else `{"lossy": "ckpt-\u{fffd}.pt", "hex": "636b70742dff2e7074"}`, the
/// bytes in hex beside a readable form. A file name that is not UTF-8 must not stop a run from
/// being recorded, nor be recorded as a different name.
pub struct Lossless<'a>(pub &'a [u8]);

impl Serialize for Lossless<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(self.0) {
            Ok(text) => s.serialize_str(text),
            Err(_) => {
                use serde::ser::SerializeMap;
                let hex: String = self.0.iter().map(|b| format!("{b:02x}")).collect();
                let mut map = s.serialize_map(Some(2))?;
                map.serialize_entry("lossy", &String::from_utf8_lossy(self.0))?;
                map.serialize_entry("hex", &hex)?;
                map.end()
            }
        }
    }
}

/// Reads back what [`Lossless`] wrote.
pub fn lossless_bytes(value: &serde_json::Value) -> Option<Vec<u8>> {
    match value {
        serde_json::Value::String(text) => Some(text.as_bytes().to_vec()),
        serde_json::Value::Object(map) => {
            let hex = map.get("hex")?.as_str()?;
            (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
                .collect()
        }
        _ => None,
    }
}

fn lossless_argv<S: Serializer>(argv: &[OsString], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(argv.iter().map(|a| Lossless(a.as_bytes())))
}

fn lossless_path<S: Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
    Lossless(path.as_os_str().as_bytes()).serialize(s)
}

fn lossless_opt_path<S: Serializer>(path: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    match path {
        Some(p) => lossless_path(p, s),
        None => s.serialize_none(),
    }
}

/// One line of the journal.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Record {
    RunStarted {
        command: Vec<String>,
        ladder: Vec<String>,
        checkpoints: Option<String>,
        max_restarts: u32,
        grace_seconds: f64,
        rules: usize,
        gpuwarden_pid: u32,
        version: &'static str,
        /// gpuwarden's own command line as given (lossy UTF-8) and its working directory:
        /// what `gpuwarden resume` starts again from.
        #[serde(default)]
        argv: Vec<String>,
        cwd: Option<PathBuf>,
        /// The config file that was read, if any.
        config_file: Option<PathBuf>,
        stall_timeout_seconds: Option<f64>,
        restart_window_seconds: Option<f64>,
    },
    /// The pre-flight probe's verdict (rules/quirks.toml), when a known GPU problem applies:
    /// the tier attempt 1 starts on, the tiers skipped, and the problems behind it.
    Preflight(crate::verdict::Verdict),
    /// An incomplete checkpoint that would have been newer than the one resumed from.
    CheckpointSkipped {
        attempt: u32,
        #[serde(serialize_with = "lossless_path")]
        path: PathBuf,
        reason: String,
    },
    AttemptStarted {
        attempt: u32,
        tier: String,
        device: String,
        /// The GPUs the attempt sees, in its ordinal order (absent where it sees none known).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        gpus: Vec<JobGpu>,
        #[serde(serialize_with = "lossless_opt_path")]
        checkpoint: Option<PathBuf>,
        #[serde(serialize_with = "lossless_argv")]
        argv: Vec<OsString>,
        pid: u32,
        #[serde(serialize_with = "lossless_path")]
        stdout_log: PathBuf,
        #[serde(serialize_with = "lossless_path")]
        stderr_log: PathBuf,
    },
    Fault {
        attempt: u32,
        class: FaultClass,
        rule: String,
        severity: Severity,
        action: Action,
        stream: Stream,
        line: String,
        captures: BTreeMap<String, String>,
        /// Kernel-log faults: the record's facility (`kernel`, or `user` for records written
        /// into /dev/kmsg by a program).
        #[serde(skip_serializing_if = "Option::is_none")]
        facility: Option<String>,
        /// Kernel-log and health faults: why the fault was judged to concern the job.
        #[serde(skip_serializing_if = "Option::is_none")]
        attribution: Option<String>,
        /// Whether it starts an incident of the attempt or follows from an earlier fault
        /// (`crate::incident`), and which.
        #[serde(skip_serializing_if = "Option::is_none")]
        incident: Option<crate::incident::Role>,
        /// The GPUs of the attempt the fault names, with the ordinal the job knows each by.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        gpus: Vec<JobGpu>,
    },
    /// A fault of `attempt` named some of its GPUs: they are hidden from every later attempt,
    /// which restarts on the same tier with the others (issue 14).
    GpusExcluded {
        attempt: u32,
        tier: String,
        rule: String,
        class: FaultClass,
        /// The GPUs excluded now, as `attempt` saw them.
        gpus: Vec<JobGpu>,
        /// Every GPU excluded so far in the run, by vendor index.
        excluded: Vec<u32>,
        /// The GPUs the next attempt keeps, by vendor index, in the job's order.
        remaining: Vec<u32>,
    },
    /// A kernel-log or health fault that does not concern the job (another process, a device
    /// the job does not use, or nothing to tell): shown and recorded, never acted on.
    ForeignFault {
        class: FaultClass,
        rule: String,
        severity: Severity,
        line: String,
        captures: BTreeMap<String, String>,
        /// `kernel` or `user` (the kernel record's facility), or `health`.
        facility: String,
        /// The kernel record's sequence number (0 for health faults).
        seq: u64,
        reason: String,
        /// For a late line about a process of an attempt that has ended: that attempt.
        #[serde(skip_serializing_if = "Option::is_none")]
        attempt: Option<u32>,
    },
    /// Foreign faults of one rule counted in a window after the first few were journaled in
    /// full (a neighbour's flood is a few lines, not one per record).
    ForeignRepeats {
        rule: String,
        class: FaultClass,
        /// Faults counted in the window.
        count: u64,
        /// How many different processes or devices they named (at most 1000 are told apart).
        whom: usize,
        seconds: f64,
    },
    /// The leader exited but processes of its group kept the output open and were killed.
    Leftovers { attempt: u32 },
    AttemptEnded {
        attempt: u32,
        tier: String,
        status: Option<ExitRecord>,
        ended_by: String,
        /// Faults seen in the attempt, by rule, with how often each was seen.
        faults: BTreeMap<String, u64>,
        seconds: f64,
    },
    RestartScheduled {
        attempt: u32,
        tier: String,
        reason: String,
        delay_seconds: f64,
        restarts_left: u32,
    },
    /// A new complete checkpoint appeared while `attempt` ran (seen through a file event in the
    /// checkpoint location, or by its rescan every 2 s): progress the run can keep.
    CheckpointSaved {
        attempt: u32,
        path: PathBuf,
        #[serde(skip_serializing_if = "Option::is_none")]
        step: Option<u64>,
    },
    /// The job's Python stacks, captured before a stalled attempt was stopped.
    StacksCaptured {
        attempt: u32,
        /// The file written (py-spy's output), or why none was.
        path: Option<PathBuf>,
        detail: String,
    },
    /// `gpuwarden resume` took this run over after the gpuwarden that ran it died.
    RunResumed {
        /// The attempt the new gpuwarden starts (one after the last one journaled).
        attempt: u32,
        tier: String,
        restarts_left: u32,
        checkpoint: Option<PathBuf>,
        gpuwarden_pid: u32,
        /// Why the previous gpuwarden is taken to be gone.
        reason: String,
    },
    /// A signal for the job (SIGUSR1/SIGUSR2: Slurm's checkpoint-before-preemption request)
    /// that gpuwarden passed to the attempt's process group; supervision went on.
    SignalForwarded { attempt: u32, signal: String },
    /// With `--progress`: how often the job's heartbeat lines came (the median time between
    /// two, over `heartbeats` of them), once per attempt, to size `--stall-timeout` by.
    StepInterval {
        attempt: u32,
        heartbeats: u64,
        median_seconds: f64,
    },
    /// The user forced a fallback from the live display (`f`): `attempt` (the live one, stopped
    /// for it, or the one waiting out its backoff) gives way to the tier `to`.
    FallbackForced {
        attempt: u32,
        from: String,
        to: String,
    },
    /// After a transient fall, the lower tier's `attempt` saved `checkpoint`, newer than the
    /// one the fall left at (`fell_at`): it is stopped and the run climbs back from tier `from`
    /// to tier `to`, the tier that faulted with `class`.
    ClimbBack {
        attempt: u32,
        from: String,
        to: String,
        #[serde(serialize_with = "lossless_path")]
        checkpoint: PathBuf,
        #[serde(serialize_with = "lossless_opt_path")]
        fell_at: Option<PathBuf>,
        class: crate::rules::FaultClass,
        reason: String,
        climbs_left: u32,
    },
    /// Before `attempt` on a GPU tier after a faulted GPU attempt: how long gpuwarden waited
    /// for the GPUs (vendor indexes) to show the ended attempt's memory released, and how it
    /// ended (`released`, `timed_out`, `unknown` where nothing could be read).
    GpuMemoryWait {
        attempt: u32,
        gpus: Vec<u32>,
        waited_ms: u64,
        outcome: String,
        detail: String,
    },
    /// With `--progress` and no explicit numeric `--stall-timeout`: the stall timeout of
    /// `attempt` learned from its heartbeats (5x the median interval, within the floor and the
    /// ceiling).
    StallTimeoutLearned {
        attempt: u32,
        heartbeats: u64,
        median_seconds: f64,
        timeout_seconds: f64,
        floor_seconds: f64,
        ceiling_seconds: f64,
    },
    /// Something gpuwarden could not do but worked around (a source that is unavailable...).
    Warning { message: String },
    RunFinished {
        outcome: String,
        detail: String,
        attempts: u32,
        restarts: u32,
        exit_code: i32,
    },
}

#[derive(Serialize)]
struct Line<'a> {
    at: String,
    #[serde(flatten)]
    record: &'a Record,
}

/// Records kept in memory at most while the journal cannot be written (a full disk).
pub const HELD_MAX: usize = 10_000;

/// An open journal. A `write` is durable when it returns [`Written::Durable`].
///
/// It degrades instead of failing: when a line cannot be written (a full disk, a quota, an I/O
/// error) the file is cut back to its last whole line, the record is kept in memory (up to
/// [`HELD_MAX`]; past that, counted), and the held records are written, in order, with their
/// own times, as soon as a write succeeds again. A line is whole or absent.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
    /// The length of the file up to its last whole line.
    len: u64,
    /// Serialized lines not written yet, oldest first.
    held: std::collections::VecDeque<Vec<u8>>,
    /// Records dropped because `held` was full.
    lost: u64,
}

/// What became of a record.
#[derive(Debug)]
#[must_use]
pub enum Written {
    /// On disk and fsynced (with every record held before it).
    Durable,
    /// Kept in memory because the journal cannot be written; `first` is true for the first
    /// record of a stretch of failures (say so once), `error` says why.
    Held { first: bool, error: io::Error },
    /// The records held in memory were just written after a stretch of failures: `held` were
    /// written late, `lost` were dropped for lack of memory.
    Recovered { held: usize, lost: u64 },
}

impl Journal {
    /// Opens the existing `run_dir/journal.jsonl` of a run to continue it (`gpuwarden resume`):
    /// appended to, never rewritten. A torn last line (the old gpuwarden died mid-write) is
    /// closed with a newline first, so every new record stands on a line of its own.
    pub fn append_to(run_dir: &Path) -> io::Result<Journal> {
        let path = run_dir.join("journal.jsonl");
        let mut file = OpenOptions::new().append(true).open(&path)?;
        let bytes = std::fs::read(&path)?;
        let mut len = bytes.len() as u64;
        if bytes.last().is_some_and(|b| *b != b'\n') {
            file.write_all(b"\n")?;
            file.sync_data()?;
            len += 1;
        }
        Ok(Journal {
            file,
            path,
            len,
            held: Default::default(),
            lost: 0,
        })
    }

    /// Creates `run_dir/journal.jsonl`. An existing journal is never reused or truncated: two
    /// runs given the same directory get `AlreadyExists` for the second, atomically.
    pub fn create(run_dir: &Path) -> io::Result<Journal> {
        let path = run_dir.join("journal.jsonl");
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        Ok(Journal {
            file,
            path,
            len: 0,
            held: Default::default(),
            lost: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records waiting in memory for the disk.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Appends one record stamped with `at`, then fsyncs: the journal must survive a power cut
    /// or a kernel panic caused by the very GPU fault it records. The error is for a record
    /// that cannot be serialized (a bug); trouble with the disk is [`Written::Held`].
    pub fn write(&mut self, record: &Record, at: SystemTime) -> io::Result<Written> {
        let line = Line {
            at: crate::time::rfc3339(at),
            record,
        };
        let mut bytes = serde_json::to_vec(&line).map_err(io::Error::other)?;
        bytes.push(b'\n');
        let first = self.held.is_empty();
        if self.held.len() < HELD_MAX {
            self.held.push_back(bytes);
        } else {
            self.lost += 1;
        }
        Ok(match self.flush() {
            Ok(0) => Written::Durable,
            Ok(held) => Written::Recovered {
                held,
                lost: std::mem::take(&mut self.lost),
            },
            Err(error) => Written::Held { first, error },
        })
    }

    /// Tries again to write what is held. `Ok(n)`: `n` late records written (0 when nothing
    /// was held but the last one).
    pub fn retry(&mut self) -> Option<Written> {
        if self.held.is_empty() {
            return None;
        }
        Some(match self.flush() {
            Ok(held) => Written::Recovered {
                held: held + 1,
                lost: std::mem::take(&mut self.lost),
            },
            Err(error) => Written::Held {
                first: false,
                error,
            },
        })
    }

    /// Writes the held lines in order; returns how many were written before the newest one.
    fn flush(&mut self) -> io::Result<usize> {
        let mut written: usize = 0;
        while let Some(bytes) = self.held.front() {
            // One write of the whole line: O_APPEND keeps concurrent appenders from
            // interleaving. A short or failed write is cut back, so no torn line stays.
            if let Err(e) = self.file.write_all(bytes) {
                let _ = self.file.set_len(self.len);
                return Err(e);
            }
            self.len += bytes.len() as u64;
            self.held.pop_front();
            written += 1;
        }
        // The lines are whole in the page cache; a failed fsync cannot be mended by writing
        // them again (the kernel has dropped its error state by now).
        let _ = self.file.sync_data();
        Ok(written.saturating_sub(1))
    }
}

/// Creates the run directory. A directory that already holds a journal is never reused for the
/// default (timestamped) name: a suffix `-2`, `-3`... is added instead, so two runs started in
/// the same second keep separate journals. An explicitly named directory is used as given
/// (its journal must not exist yet: see [`Journal::create`]).
pub fn create_run_dir(dir: &Path, explicit: bool) -> io::Result<PathBuf> {
    if explicit {
        std::fs::create_dir_all(dir)?;
        return Ok(dir.to_path_buf());
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut candidate = dir.to_path_buf();
    for n in 2.. {
        match std::fs::create_dir(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => {
                let mut name = dir.as_os_str().to_owned();
                name.push(format!("-{n}"));
                candidate = PathBuf::from(name);
            }
            Err(e) => return Err(e),
        }
    }
    unreachable!("the loop returns")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_holds_records_in_memory_and_writes_them_whole_when_space_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let mut j = Journal::create(dir.path()).unwrap();
        let _ = j.write(&Record::Leftovers { attempt: 1 }, std::time::UNIX_EPOCH);
        let real = std::mem::replace(
            &mut j.file,
            OpenOptions::new().write(true).open("/dev/full").unwrap(),
        );
        let first = j.write(&Record::Leftovers { attempt: 2 }, std::time::UNIX_EPOCH);
        assert!(
            matches!(first, Ok(Written::Held { first: true, ref error }) if error.raw_os_error() == Some(nix::libc::ENOSPC)),
            "{first:?}"
        );
        let second = j.write(&Record::Leftovers { attempt: 3 }, std::time::UNIX_EPOCH);
        assert!(matches!(second, Ok(Written::Held { first: false, .. })));
        assert_eq!(j.held(), 2);
        assert!(matches!(j.retry(), Some(Written::Held { .. })));
        // Space returns.
        j.file = real;
        assert!(matches!(
            j.retry(),
            Some(Written::Recovered { held: 2, lost: 0 })
        ));
        assert!(j.retry().is_none());
        let text = std::fs::read_to_string(&path).unwrap();
        let attempts: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["attempt"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(attempts, [1, 2, 3]);
    }

    #[test]
    fn records_past_the_memory_bound_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::create(dir.path()).unwrap();
        let real = std::mem::replace(
            &mut j.file,
            OpenOptions::new().write(true).open("/dev/full").unwrap(),
        );
        for attempt in 0..(HELD_MAX as u32 + 5) {
            let _ = j.write(&Record::Leftovers { attempt }, std::time::UNIX_EPOCH);
        }
        j.file = real;
        assert!(matches!(
            j.retry(),
            Some(Written::Recovered { held, lost: 5 }) if held == HELD_MAX
        ));
    }

    #[test]
    fn paths_that_are_not_utf8_are_journaled_losslessly() {
        use std::os::unix::ffi::OsStrExt;
        let name = std::ffi::OsStr::from_bytes(b"/ckpt/step-\xff.pt");
        let record = Record::CheckpointSkipped {
            attempt: 1,
            path: PathBuf::from(name),
            reason: "torn".into(),
        };
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["path"]["lossy"], "/ckpt/step-\u{fffd}.pt");
        assert_eq!(lossless_bytes(&json["path"]).unwrap(), name.as_bytes());
        let plain = serde_json::to_value(Lossless(b"/ckpt/a b.pt")).unwrap();
        assert_eq!(plain, "/ckpt/a b.pt");
        assert_eq!(lossless_bytes(&plain).unwrap(), b"/ckpt/a b.pt");
    }

    #[test]
    fn lines_are_appended_with_at_and_event() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::create(dir.path()).unwrap();
        assert!(matches!(
            j.write(&Record::Leftovers { attempt: 1 }, std::time::UNIX_EPOCH)
                .unwrap(),
            Written::Durable
        ));
        // A second journal in the same directory is refused, not truncated or interleaved.
        let again = Journal::create(dir.path()).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
        j.write(
            &Record::AttemptEnded {
                attempt: 1,
                tier: "gpu".into(),
                status: Some(JobExit::Signal(6).into()),
                ended_by: "gpu_memory_fault (x)".into(),
                faults: BTreeMap::new(),
                seconds: 1.5,
            },
            std::time::UNIX_EPOCH,
        )
        .map(|_| ())
        .unwrap();
        let text = std::fs::read_to_string(dir.path().join("journal.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "leftovers");
        assert_eq!(lines[0]["at"], "1970-01-01T00:00:00.000000Z");
        assert_eq!(lines[1]["event"], "attempt_ended");
        assert_eq!(lines[1]["status"]["signal"], 6);
        assert_eq!(lines[1]["status"]["name"], "SIGABRT");
    }

    #[test]
    fn default_run_dirs_never_collide() {
        let root = tempfile::tempdir().unwrap();
        let want = root.path().join("runs").join("20261126T000000Z");
        let a = create_run_dir(&want, false).unwrap();
        let b = create_run_dir(&want, false).unwrap();
        assert_eq!(a, want);
        assert_eq!(b, root.path().join("runs").join("20261126T000000Z-2"));
        // An explicit directory is reused.
        assert_eq!(create_run_dir(&want, true).unwrap(), want);
    }
}
