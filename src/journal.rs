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

/// Arguments as the journal shows them: UTF-8 where they are, lossy otherwise (the job itself
/// always receives the exact bytes).
fn lossy_argv<S: Serializer>(argv: &[OsString], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(
        argv.iter()
            .map(|a| String::from_utf8_lossy(a.as_bytes()).into_owned()),
    )
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
    },
    /// The pre-flight probe's verdict (rules/quirks.toml), when a known GPU problem applies:
    /// the tier attempt 1 starts on, the tiers skipped, and the problems behind it.
    Preflight(crate::probe::Verdict),
    /// An incomplete checkpoint that would have been newer than the one resumed from.
    CheckpointSkipped {
        attempt: u32,
        path: PathBuf,
        reason: String,
    },
    AttemptStarted {
        attempt: u32,
        tier: String,
        device: String,
        checkpoint: Option<PathBuf>,
        #[serde(serialize_with = "lossy_argv")]
        argv: Vec<OsString>,
        pid: u32,
        stdout_log: PathBuf,
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
    /// A signal for the job (SIGUSR1/SIGUSR2: Slurm's checkpoint-before-preemption request)
    /// that gpuwarden passed to the attempt's process group; supervision went on.
    SignalForwarded { attempt: u32, signal: String },
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

/// An open journal. Every `write` is durable when it returns.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
}

impl Journal {
    /// Creates `run_dir/journal.jsonl`. An existing journal is never reused or truncated: two
    /// runs given the same directory get `AlreadyExists` for the second, atomically.
    pub fn create(run_dir: &Path) -> io::Result<Journal> {
        let path = run_dir.join("journal.jsonl");
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        Ok(Journal { file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record stamped with `at`, then fsyncs: the journal must survive a power cut
    /// or a kernel panic caused by the very GPU fault it records.
    pub fn write(&mut self, record: &Record, at: SystemTime) -> io::Result<()> {
        let line = Line {
            at: crate::time::rfc3339(at),
            record,
        };
        let mut bytes = serde_json::to_vec(&line).map_err(io::Error::other)?;
        bytes.push(b'\n');
        // One write of the whole line: O_APPEND keeps concurrent appenders from interleaving.
        self.file.write_all(&bytes)?;
        self.file.sync_data()
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
    fn lines_are_appended_with_at_and_event() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::create(dir.path()).unwrap();
        j.write(&Record::Leftovers { attempt: 1 }, std::time::UNIX_EPOCH)
            .unwrap();
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
