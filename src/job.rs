//! The job's vocabulary, shared by every room that starts, signals or records a job: the
//! signals gpuwarden forwards or sends, and how a job's process ended. A leaf: it imports
//! nothing of gpuwarden's, so the process, journal, ladder and tool modules need not import the
//! supervisor to speak of a job.

use std::fmt;

use serde::Serialize;

/// A signal gpuwarden received (and forwards), or sends to the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sig {
    Interrupt,
    Terminate,
    Hangup,
    Kill,
    /// SIGUSR1: what Slurm's `--signal=USR1@90`, Lightning and submitit send before preemption
    /// so the job can checkpoint. Forwarded, never a reason to stop.
    User1,
    /// SIGUSR2: like SIGUSR1, for jobs that use it.
    User2,
    /// SIGCONT: a job control resume (`fg`, Slurm's `scontrol resume`). Forwarded.
    Continue,
    /// SIGWINCH: the terminal changed size. Forwarded, as a terminal would.
    WindowChange,
}

impl Sig {
    /// The signal number on Linux.
    pub fn number(self) -> i32 {
        match self {
            Sig::Hangup => 1,
            Sig::Interrupt => 2,
            Sig::Kill => 9,
            Sig::User1 => 10,
            Sig::User2 => 12,
            Sig::Terminate => 15,
            Sig::Continue => 18,
            Sig::WindowChange => 28,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Sig::Hangup => "SIGHUP",
            Sig::Interrupt => "SIGINT",
            Sig::Kill => "SIGKILL",
            Sig::Terminate => "SIGTERM",
            Sig::User1 => "SIGUSR1",
            Sig::User2 => "SIGUSR2",
            Sig::Continue => "SIGCONT",
            Sig::WindowChange => "SIGWINCH",
        }
    }

    /// Whether gpuwarden only passes this signal on to the job, and it never stops the run.
    /// SIGINT, SIGTERM and SIGHUP ask the run to end; the others are messages for the job
    /// (a checkpoint request before preemption, a resize, a resume).
    pub fn forward_only(self) -> bool {
        matches!(
            self,
            Sig::User1 | Sig::User2 | Sig::Continue | Sig::WindowChange
        )
    }
}

/// How a job's leader process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobExit {
    Code(i32),
    Signal(i32),
}

impl JobExit {
    pub fn success(self) -> bool {
        self == JobExit::Code(0)
    }
}

impl fmt::Display for JobExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            JobExit::Code(c) => write!(f, "exit status {c}"),
            JobExit::Signal(s) => write!(f, "killed by signal {s} ({})", signal_name(s)),
        }
    }
}

/// The conventional name of a signal number, for messages.
pub fn signal_name(n: i32) -> &'static str {
    nix::sys::signal::Signal::try_from(n).map_or("signal", |s| s.as_str())
}
