//! Errors that end a run before or outside the supervisor's control, and their exit codes.

use std::io;
use std::path::PathBuf;

/// Errors that end a run before or outside the supervisor's control.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot create the run directory {path}: {source}; pick another with --run-dir")]
    RunDir { path: PathBuf, source: io::Error },
    #[error(
        "the run directory {0} already holds a journal; give a new --run-dir (or move the old run away)"
    )]
    RunDirInUse(PathBuf),
    #[error(
        "the run directory {} already holds the job's logs of another run ({}); give a new --run-dir (or move the old files away)",
        .0.display(), .1
    )]
    RunDirHasLogs(PathBuf, String),
    #[error(
        "cannot create the job's log {path}: {source}; check the space and permissions of the run directory"
    )]
    Log { path: PathBuf, source: io::Error },
    #[error(
        "cannot write the journal {path}: {source}; the run was stopped because it could not be recorded"
    )]
    Journal { path: PathBuf, source: io::Error },
    #[error(
        "cannot set up signal handling or process reaping: {0}; this is a bug or a very unusual system, please report it"
    )]
    Signals(io::Error),
}

impl RunError {
    /// The documented exit code: a run directory that is already taken is a usage error, the
    /// rest are failures of gpuwarden itself.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::RunDirInUse(_) | RunError::RunDirHasLogs(..) => crate::exit::USAGE,
            _ => crate::exit::INTERNAL,
        }
    }
}
