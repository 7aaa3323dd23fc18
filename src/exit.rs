//! The exit codes of `gpuwarden`, in one place so `--help`, the README and the code agree.
//!
//! Scripts that wrap gpuwarden (cron jobs, SLURM epilogues) branch on these, so they are part of
//! the interface: change them only with a changelog entry.

/// The job finished (exit status 0), possibly after restarts.
pub const SUCCESS: i32 = 0;
/// gpuwarden itself failed while running (the run directory or journal could not be written).
pub const INTERNAL: i32 = 1;
/// Usage, configuration or rule error: nothing was started.
pub const USAGE: i32 = 2;
/// gpuwarden gave up: restart budget spent, fallback ladder exhausted, or a fault whose action is `stop`.
pub const GAVE_UP: i32 = 3;

/// The exit code after SIGTERM, which is how Slurm (`scancel`, preemption, the time limit),
/// systemd and Kubernetes stop a job: 128 + 15. A requeue script tests for it
/// (`[ $? -eq 143 ] && scontrol requeue "$SLURM_JOB_ID"`). SIGUSR1 and SIGUSR2 never end a run:
/// they are passed to the job (a checkpoint request) and supervision goes on.
pub const PREEMPTED: i32 = 128 + 15;

/// The exit code when gpuwarden was asked to stop by signal `signal` (after forwarding it to the
/// job and waiting for the job to end): 128 + N, as a shell reports a process killed by N.
pub fn interrupted(signal: i32) -> i32 {
    128 + signal
}

/// The text `--help` and the README show.
pub const TABLE: &str = "\
EXIT CODES:
  0      the job finished (exit status 0), possibly after restarts
  1      gpuwarden itself failed (for example the run directory could not be written)
  2      usage, configuration or rule error; the job was not started
  3      gave up: restart budget spent, ladder exhausted, or a fault whose action is `stop`
  128+N  gpuwarden was stopped by signal N (forwarded to the job first): 130 for Ctrl-C, 143 for SIGTERM
         (how Slurm preempts or cancels: a requeue script tests for 143)

SIGNALS:
  SIGINT, SIGTERM, SIGHUP   forwarded to the job, then the run ends (a second one kills the job)
  SIGUSR1, SIGUSR2          forwarded to the job (Slurm's --signal=USR1@90: checkpoint now); the run goes on
  SIGCONT, SIGWINCH         forwarded to the job; the run goes on";
