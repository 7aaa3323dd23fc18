//! Running a vendor tool (`nvidia-smi`, `rocm-smi`, `amd-smi`) with a deadline, without ever
//! blocking on it, and remembering the calls that hung.
//!
//! These tools go through the GPU driver, and a wedged driver leaves them stuck in the kernel
//! (state D) where no signal reaches them until the driver lets go, possibly never. The call
//! itself is [`process::run_captured`]: polled in slices, the stop request and the deadline
//! checked between them, and past the deadline the tool's process group gets SIGKILL. A child
//! that does not die of that is kept here and reaped later; while it lingers the tool is not run
//! again, so a stuck driver costs one stuck process, not one a second.
//!
//! Not here: what the output means (the parsers) or what a hang means (the tracker).

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::process::{self, Ended, Keep};

/// Output kept per stream; the rest is read and dropped so the tool never blocks on a full pipe.
const MAX_OUTPUT: usize = 4 << 20;

/// How a call ended.
#[derive(Debug)]
pub(crate) enum ToolOutcome {
    /// The tool exited. `code` is `None` when it was killed by a signal, or when its exit status
    /// was collected by someone else (a subreaper's `waitpid(-1)`).
    Finished {
        code: Option<i32>,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
    },
    /// It ran past the deadline and was killed.
    TimedOut { took: Duration },
    /// An earlier call hung and is still there (stuck in the driver): not called again.
    StillHung { since: Instant },
    /// Stop was asked while it ran; it was killed.
    Stopped,
    /// It could not be started at all.
    SpawnFailed(io::Error),
}

/// Runs one program, remembering calls that hung.
#[derive(Debug)]
pub(crate) struct ToolRunner {
    program: PathBuf,
    timeout: Duration,
    hung: Vec<(Child, Instant)>,
}

impl ToolRunner {
    pub(crate) fn new(program: PathBuf, timeout: Duration) -> ToolRunner {
        ToolRunner {
            program,
            timeout,
            hung: Vec::new(),
        }
    }

    pub(crate) fn program(&self) -> &Path {
        &self.program
    }

    /// Runs the program with `args`, stdin closed, `LC_ALL=C` (the parsers read English), in
    /// its own process group, for at most the timeout. `stop` is asked every few milliseconds
    /// while it runs; true kills the call.
    pub(crate) fn run(&mut self, args: &[&str], stop: &dyn Fn() -> bool) -> ToolOutcome {
        self.hung
            .retain_mut(|(child, _)| matches!(child.try_wait(), Ok(None)));
        if let Some((_, since)) = self.hung.first() {
            return ToolOutcome::StillHung { since: *since };
        }
        let start = Instant::now();
        let mut cmd = Command::new(&self.program);
        cmd.args(args).env("LC_ALL", "C");
        let run = match process::run_captured(
            cmd,
            Keep::First(MAX_OUTPUT),
            Keep::First(MAX_OUTPUT),
            start + self.timeout,
            stop,
        ) {
            Ok(run) => run,
            Err(e) => return ToolOutcome::SpawnFailed(e.cause),
        };
        if let Some(child) = run.unreaped {
            self.hung.push((child, start));
        }
        match run.ended {
            Ended::Exited(status) => ToolOutcome::Finished {
                code: status.and_then(|s| s.code()),
                stdout: run.stdout,
                stderr: run.stderr,
            },
            Ended::TimedOut => ToolOutcome::TimedOut { took: run.took },
            Ended::Stopped => ToolOutcome::Stopped,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn sh(timeout: Duration) -> ToolRunner {
        ToolRunner::new(PathBuf::from("/bin/sh"), timeout)
    }

    #[test]
    fn output_and_exit_code_of_a_quick_tool() {
        let mut r = sh(Duration::from_secs(5));
        match r.run(&["-c", "echo out; echo err >&2; exit 3"], &|| false) {
            ToolOutcome::Finished {
                code,
                stdout,
                stderr,
                ..
            } => {
                assert_eq!(code, Some(3));
                assert_eq!(stdout, b"out\n");
                assert_eq!(stderr, b"err\n");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_hung_tool_is_killed_at_its_deadline_with_its_children() {
        let mut r = sh(Duration::from_millis(300));
        let start = Instant::now();
        // The grandchild keeps the pipe open: only killing the whole group ends the call.
        let outcome = r.run(&["-c", "sleep 30 & sleep 30"], &|| false);
        assert!(
            matches!(outcome, ToolOutcome::TimedOut { .. }),
            "{outcome:?}"
        );
        let took = start.elapsed();
        assert!(took < Duration::from_secs(2), "took {took:?}");
        // Killed processes are reaped at the next call, which then runs normally.
        std::thread::sleep(Duration::from_millis(100));
        let outcome = r.run(&["-c", "echo again"], &|| false);
        assert!(
            matches!(outcome, ToolOutcome::Finished { code: Some(0), .. }),
            "{outcome:?}"
        );
    }

    #[test]
    fn stop_ends_a_running_call_promptly() {
        let mut r = sh(Duration::from_secs(30));
        let stop = Arc::new(AtomicBool::new(false));
        let setter = Arc::clone(&stop);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            setter.store(true, Ordering::Relaxed);
        });
        let start = Instant::now();
        let outcome = r.run(&["-c", "sleep 30"], &|| stop.load(Ordering::Relaxed));
        t.join().unwrap();
        assert!(matches!(outcome, ToolOutcome::Stopped), "{outcome:?}");
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_missing_program_fails_to_spawn() {
        let mut r = ToolRunner::new(
            PathBuf::from("/nonexistent/nvidia-smi"),
            Duration::from_secs(1),
        );
        assert!(matches!(r.run(&[], &|| false), ToolOutcome::SpawnFailed(_)));
    }

    #[test]
    fn a_flood_of_output_does_not_block_the_tool() {
        let mut r = sh(Duration::from_secs(20));
        match r.run(
            &["-c", "head -c 10000000 /dev/zero; echo done >&2"],
            &|| false,
        ) {
            ToolOutcome::Finished { stdout, stderr, .. } => {
                assert_eq!(stdout.len(), MAX_OUTPUT);
                assert_eq!(stderr, b"done\n");
            }
            other => panic!("{other:?}"),
        }
    }
}
