//! Process lifetime: spawning the job in its own process group, signalling that group, turning
//! signals sent to gpuwarden into events, and the guard that kills the job if gpuwarden dies.
//!
//! All `unsafe` and every raw signal call of gpuwarden lives in this file. It decides nothing:
//! when to signal whom is the supervisor's business.
//!
//! Why a guard process: `PR_SET_PDEATHSIG` reaches only the job's direct child, so after a
//! `kill -9` of gpuwarden the job's workers (torchrun spawns many, dataloaders spawn more) would
//! keep the GPU busy forever. The guard is a tiny copy of gpuwarden (`gpuwarden __guard`) in its
//! own process group, told the job's process group id over a pipe. When gpuwarden dies, for any
//! reason, the pipe closes, and the guard sends SIGTERM to the group, waits a moment, then
//! SIGKILL. It needs no privilege (unlike a PID namespace or a cgroup).

use std::ffi::OsString;
use std::io::{self, BufRead, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::SyncSender;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{self, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::supervisor::{JobExit, Sig};

/// The signals gpuwarden turns into events (and forwards to the job).
fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread and every thread it spawns later, so
/// they can be received synchronously by [`spawn_signal_thread`]. Call it first thing on the
/// main thread, before any other thread exists. The mask is inherited across fork and exec, so
/// [`spawn_job`] clears it in the child (seen here: without that the job ignores SIGTERM).
pub fn block_signals() -> io::Result<()> {
    signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&handled_signals()), None)
        .map_err(io::Error::from)
}

/// Receives the blocked signals one at a time and sends each to `tx` as it comes.
pub fn spawn_signal_thread<E: Send + 'static>(
    tx: SyncSender<E>,
    wrap: fn(Sig) -> E,
) -> io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let set = handled_signals();
            loop {
                let sig = match set.wait() {
                    Ok(Signal::SIGINT) => Sig::Interrupt,
                    Ok(Signal::SIGTERM) => Sig::Terminate,
                    Ok(Signal::SIGHUP) => Sig::Hangup,
                    Ok(_) | Err(_) => continue,
                };
                if tx.send(wrap(sig)).is_err() {
                    return;
                }
            }
        })
}

/// Makes a child of `cmd` start with no signal blocked. gpuwarden blocks the signals it
/// forwards (see [`block_signals`]), the mask survives fork and exec, and the standard library
/// does not reset it (seen here: a job started without this ignored SIGTERM). Every process
/// gpuwarden starts must go through this.
pub fn unblock_signals_in_child(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and calls only sigprocmask, which is
    // async-signal-safe, without allocating.
    unsafe {
        cmd.pre_exec(|| {
            signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
                .map_err(io::Error::from)
        });
    }
}

/// What to start.
#[derive(Debug)]
pub struct JobSpec<'a> {
    pub argv: &'a [OsString],
    pub set_env: &'a [(OsString, OsString)],
    pub unset_env: &'a [OsString],
}

/// Starts the job as the leader of a new process group, with its stdin inherited and its stdout
/// and stderr piped to gpuwarden.
///
/// Must be called from the main thread: the kernel sends `PR_SET_PDEATHSIG` when the *thread*
/// that forked the child exits, not the process (FACTS.md), so forking from a short-lived thread
/// would kill the job at once.
pub fn spawn_job(spec: &JobSpec<'_>) -> io::Result<Child> {
    let (program, args) = spec
        .argv
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::inherit())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for key in spec.unset_env {
        cmd.env_remove(key);
    }
    for (key, value) in spec.set_env {
        cmd.env(key, value);
    }
    unblock_signals_in_child(&mut cmd);
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs between fork and exec in the child and calls only
    // async-signal-safe functions (prctl, getppid) without allocating.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(io::Error::from)?;
            // If gpuwarden died between fork and prctl, no death signal will ever come.
            if nix::unistd::getppid() != parent {
                return Err(io::Error::other("gpuwarden exited while starting the job"));
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Sends `sig` to every process of the group `pgid`. Returns `Ok(false)` when the group is
/// already empty.
pub fn signal_group(pgid: u32, sig: Sig) -> io::Result<bool> {
    let signal = match sig {
        Sig::Interrupt => Signal::SIGINT,
        Sig::Terminate => Signal::SIGTERM,
        Sig::Hangup => Signal::SIGHUP,
        Sig::Kill => Signal::SIGKILL,
    };
    match signal::killpg(Pid::from_raw(pgid as i32), signal) {
        Ok(()) => {
            // A stopped process (SIGTTIN, SIGSTOP) acts on SIGTERM only once continued: like a
            // shell's `kill`, follow the signal with SIGCONT so stopping works on it too.
            if signal != Signal::SIGKILL {
                let _ = signal::killpg(Pid::from_raw(pgid as i32), Signal::SIGCONT);
            }
            Ok(true)
        }
        Err(Errno::ESRCH) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// True while any process (a zombie included) is in the group.
fn group_alive(pgid: i32) -> bool {
    !matches!(signal::killpg(Pid::from_raw(pgid), None), Err(Errno::ESRCH))
}

/// Makes gpuwarden the parent of every orphan the job leaves behind (a worker whose parent
/// died), so that [`wait_group`] can reap them: otherwise they linger as zombies of init and the
/// group never looks empty (FACTS.md).
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// What [`wait_group`] reports.
#[derive(Debug)]
pub enum GroupEvent {
    /// The group's leader (the job's main process) ended.
    LeaderExited { status: JobExit, group_alive: bool },
    /// A process of the group was stopped by the terminal: it tried to read from it (SIGTTIN)
    /// or write to it (SIGTTOU) while the job runs in the background of the terminal.
    TerminalStop { pid: i32, signal: i32 },
    /// No process of the group is left.
    Empty,
}

/// Waits for the process group led by `leader` until it is empty, reaping its members that are
/// gpuwarden's children (the leader, and orphans thanks to [`become_subreaper`]). Blocks: run
/// it on its own thread, one per attempt.
pub fn wait_group(leader: u32, mut report: impl FnMut(GroupEvent)) {
    let leader = Pid::from_raw(leader as i32);
    let group = Pid::from_raw(-leader.as_raw());
    let mut leader_done = false;
    let ended = |status: JobExit, report: &mut dyn FnMut(GroupEvent)| {
        // Reap members that already ended, so that their zombies do not count as alive.
        while let Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) =
            waitpid(group, Some(WaitPidFlag::WNOHANG))
        {}
        let group_alive = group_alive(leader.as_raw());
        report(GroupEvent::LeaderExited {
            status,
            group_alive,
        });
        group_alive
    };
    loop {
        match waitpid(group, Some(WaitPidFlag::WUNTRACED)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == leader => {
                leader_done = true;
                if !ended(JobExit::Code(code), &mut report) {
                    break;
                }
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == leader => {
                leader_done = true;
                if !ended(JobExit::Signal(sig as i32), &mut report) {
                    break;
                }
            }
            Ok(WaitStatus::Stopped(pid, sig @ (Signal::SIGTTIN | Signal::SIGTTOU))) => {
                report(GroupEvent::TerminalStop {
                    pid: pid.as_raw(),
                    signal: sig as i32,
                });
            }
            Ok(_) | Err(Errno::EINTR) => {}
            // No child of gpuwarden is left in the group. Members that are not our children
            // (their parent left the group and still lives) may remain: watch until they go.
            Err(_) => {
                if !leader_done {
                    // Reaped elsewhere, which gpuwarden never does: report an unknown status.
                    if !ended(JobExit::Code(-1), &mut report) {
                        break;
                    }
                }
                while group_alive(leader.as_raw()) {
                    thread::sleep(Duration::from_millis(50));
                }
                break;
            }
        }
    }
    report(GroupEvent::Empty);
}

/// The parent's end of the guard.
#[derive(Debug)]
pub struct Guard {
    child: Child,
    pipe: ChildStdin,
}

/// The hidden subcommand name the guard runs as.
pub const GUARD_SUBCOMMAND: &str = "__guard";

impl Guard {
    /// Starts `gpuwarden __guard` from the running executable.
    pub fn spawn() -> io::Result<Guard> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg(GUARD_SUBCOMMAND)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            // Its own group: Ctrl-C in the terminal and signals to gpuwarden's group miss it.
            .process_group(0)
            .spawn()?;
        let pipe = child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("the guard's stdin was not piped"))?;
        Ok(Guard { child, pipe })
    }

    /// From now on, the guard kills group `pgid` if gpuwarden dies.
    pub fn watch(&mut self, pgid: u32) -> io::Result<()> {
        writeln!(self.pipe, "watch {pgid}")
    }

    /// The group is gone; nothing to kill any more.
    pub fn clear(&mut self) -> io::Result<()> {
        writeln!(self.pipe, "clear")
    }

    /// Ends the guard after a normal run.
    pub fn close(mut self) {
        // Best effort: a guard that already died has nothing left to do.
        let _ = self.clear();
        drop(self.pipe);
        let _ = self.child.wait();
    }
}

/// The body of `gpuwarden __guard`. Returns the process exit code.
pub fn guard_main(grace: Duration) -> i32 {
    // The guard must outlive gpuwarden: `pkill gpuwarden` or a terminal hangup must not take it
    // down before it has done its one job.
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: installing SIG_IGN involves no handler code.
        let _ = unsafe { signal::signal(sig, SigHandler::SigIgn) };
    }
    let mut pgid: Option<i32> = None;
    let stdin = io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("watch"), Some(n)) => pgid = n.parse().ok().filter(|&n: &i32| n > 1),
            (Some("clear"), _) => pgid = None,
            _ => {}
        }
    }
    // End of input: gpuwarden is gone (or finished, in which case nothing is watched).
    if let Some(pgid) = pgid
        && group_alive(pgid)
    {
        let _ = signal::killpg(Pid::from_raw(pgid), Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && group_alive(pgid) {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = signal::killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
    0
}
