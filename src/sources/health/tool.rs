//! Running a vendor tool (`nvidia-smi`, `rocm-smi`, `amd-smi`) with a deadline, without ever
//! blocking on it.
//!
//! These tools go through the GPU driver, and a wedged driver leaves them stuck in the kernel
//! (state D) where no signal reaches them until the driver lets go, possibly never. So the
//! caller never waits for the child unconditionally: its pipes are polled in slices of at most
//! [`SLICE`], the stop flag and the deadline are checked between slices, and past the deadline
//! the tool's process group gets SIGKILL and is left behind. A child that does not die of that
//! is kept and reaped later; while it lingers the tool is not run again, so a stuck driver costs
//! one stuck process, not one a second.
//!
//! Not here: what the output means (the parsers) or what a hang means (the tracker).

use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, poll};

use super::sampler::StopFlag;
use crate::job::Sig;
use crate::process::signal_group;

/// The longest the runner goes without looking at the stop flag and the deadline.
const SLICE: Duration = Duration::from_millis(20);

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
    /// its own process group, for at most the timeout.
    pub(crate) fn run(&mut self, args: &[&str], stop: &StopFlag) -> ToolOutcome {
        self.hung
            .retain_mut(|(child, _)| matches!(child.try_wait(), Ok(None)));
        if let Some((_, since)) = self.hung.first() {
            return ToolOutcome::StillHung { since: *since };
        }
        let start = Instant::now();
        let mut child = match Command::new(&self.program)
            .args(args)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
        {
            Ok(child) => child,
            Err(e) => return ToolOutcome::SpawnFailed(e),
        };
        let deadline = start + self.timeout;
        let mut out = Pipe::new(child.stdout.take());
        let mut err = Pipe::new(child.stderr.take());
        loop {
            if stop.is_set() {
                self.abandon(child, start);
                return ToolOutcome::Stopped;
            }
            let now = Instant::now();
            if now >= deadline {
                self.abandon(child, start);
                return ToolOutcome::TimedOut { took: now - start };
            }
            let slice = SLICE.min(deadline - now);
            if out.is_open() || err.is_open() {
                poll_pipes(&mut out, &mut err, slice);
                continue;
            }
            // Both pipes closed: the tool is exiting (or stuck after its last write).
            match child.try_wait() {
                Ok(Some(status)) => {
                    return ToolOutcome::Finished {
                        code: status.code(),
                        stdout: out.data,
                        stderr: err.data,
                    };
                }
                Ok(None) => {
                    stop.wait(Duration::from_millis(1).min(slice));
                }
                Err(_) => {
                    // Reaped by someone else (gpuwarden is a subreaper that collects strays):
                    // the tool is gone, its output is all there is.
                    return ToolOutcome::Finished {
                        code: None,
                        stdout: out.data,
                        stderr: err.data,
                    };
                }
            }
        }
    }

    /// Kills the call's process group and keeps the child to be reaped later, without waiting
    /// for it: a process stuck in the driver does not die until the driver lets go.
    fn abandon(&mut self, mut child: Child, started: Instant) {
        let _ = signal_group(child.id(), Sig::Kill);
        if !matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
            self.hung.push((child, started));
        }
    }
}

/// One of the child's output pipes and what came out of it.
struct Pipe<R> {
    reader: Option<R>,
    data: Vec<u8>,
}

impl<R: Read + AsFd> Pipe<R> {
    fn new(reader: Option<R>) -> Pipe<R> {
        Pipe {
            reader,
            data: Vec::new(),
        }
    }

    fn is_open(&self) -> bool {
        self.reader.is_some()
    }

    /// Reads what is there (poll said so); closes the pipe at end of file or on an error.
    fn drain(&mut self) {
        let Some(reader) = self.reader.as_mut() else {
            return;
        };
        let mut buf = [0u8; 16 * 1024];
        match reader.read(&mut buf) {
            Ok(0) => self.reader = None,
            Ok(n) => {
                let room = MAX_OUTPUT.saturating_sub(self.data.len());
                self.data.extend_from_slice(&buf[..n.min(room)]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => self.reader = None,
        }
    }
}

/// Waits up to `slice` for either pipe to have data or close, then drains the ready ones.
fn poll_pipes(out: &mut Pipe<ChildStdout>, err: &mut Pipe<ChildStderr>, slice: Duration) {
    let ms = u16::try_from(slice.as_millis().max(1)).unwrap_or(u16::MAX);
    let (out_ready, err_ready) = {
        let mut fds = Vec::with_capacity(2);
        if let Some(r) = &out.reader {
            fds.push(PollFd::new(r.as_fd(), PollFlags::POLLIN));
        }
        if let Some(r) = &err.reader {
            fds.push(PollFd::new(r.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, ms) {
            Ok(n) if n > 0 => {
                let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
                let first = fds.first().is_some_and(ready);
                let second = fds.get(1).is_some_and(ready);
                match (out.is_open(), err.is_open()) {
                    (true, true) => (first, second),
                    (true, false) => (first, false),
                    (false, _) => (false, first),
                }
            }
            // Timeout, EINTR or a poll failure: look again next slice.
            _ => (false, false),
        }
    };
    if out_ready {
        out.drain();
    }
    if err_ready {
        err.drain();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sh(timeout: Duration) -> ToolRunner {
        ToolRunner::new(PathBuf::from("/bin/sh"), timeout)
    }

    #[test]
    fn output_and_exit_code_of_a_quick_tool() {
        let mut r = sh(Duration::from_secs(5));
        match r.run(
            &["-c", "echo out; echo err >&2; exit 3"],
            &StopFlag::default(),
        ) {
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
        let outcome = r.run(&["-c", "sleep 30 & sleep 30"], &StopFlag::default());
        assert!(
            matches!(outcome, ToolOutcome::TimedOut { .. }),
            "{outcome:?}"
        );
        let took = start.elapsed();
        assert!(took < Duration::from_secs(2), "took {took:?}");
        // Killed processes are reaped at the next call, which then runs normally.
        std::thread::sleep(Duration::from_millis(100));
        let outcome = r.run(&["-c", "echo again"], &StopFlag::default());
        assert!(
            matches!(outcome, ToolOutcome::Finished { code: Some(0), .. }),
            "{outcome:?}"
        );
    }

    #[test]
    fn stop_ends_a_running_call_promptly() {
        let mut r = sh(Duration::from_secs(30));
        let stop = StopFlag::default();
        let setter = stop.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            setter.set();
        });
        let start = Instant::now();
        let outcome = r.run(&["-c", "sleep 30"], &stop);
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
        assert!(matches!(
            r.run(&[], &StopFlag::default()),
            ToolOutcome::SpawnFailed(_)
        ));
    }

    #[test]
    fn a_flood_of_output_does_not_block_the_tool() {
        let mut r = sh(Duration::from_secs(20));
        match r.run(
            &["-c", "head -c 10000000 /dev/zero; echo done >&2"],
            &StopFlag::default(),
        ) {
            ToolOutcome::Finished { stdout, stderr, .. } => {
                assert_eq!(stdout.len(), MAX_OUTPUT);
                assert_eq!(stderr, b"done\n");
            }
            other => panic!("{other:?}"),
        }
    }
}
