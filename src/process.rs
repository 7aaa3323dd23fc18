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
use std::sync::OnceLock;
use std::sync::mpsc::SyncSender;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::libc;
use nix::sys::signal::{self, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::job::{JobExit, Sig};

/// The signals gpuwarden turns into events (and forwards to the job): SIGINT, SIGTERM and SIGHUP,
/// which end the run, and SIGUSR1, SIGUSR2, SIGCONT and SIGWINCH, which are only passed on
/// (Slurm's `--signal=USR1@90` asks the job to checkpoint before preemption: left to its default
/// action, SIGUSR1 would kill gpuwarden with status 138, and the job with it), except those
/// gpuwarden was started with ignored. `nohup gpuwarden run ...` ignores SIGHUP and
/// a script's `gpuwarden run ... &` ignores SIGINT; a blocked signal stays pending even when
/// ignored, so blocking it and waiting for it would undo what the user asked for. Decided once,
/// at the first call, before anything changes the dispositions.
fn handled_signals() -> SigSet {
    static HANDLED: OnceLock<SigSet> = OnceLock::new();
    *HANDLED.get_or_init(|| {
        let mut set = SigSet::empty();
        for sig in [
            Signal::SIGINT,
            Signal::SIGTERM,
            Signal::SIGHUP,
            Signal::SIGUSR1,
            Signal::SIGUSR2,
            Signal::SIGCONT,
            Signal::SIGWINCH,
        ] {
            if !is_ignored(sig) {
                set.add(sig);
            }
        }
        set
    })
}

/// Whether `sig`'s disposition is "ignore" (inherited across exec from whoever started us).
fn is_ignored(sig: Signal) -> bool {
    let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: a null new action only reads the current one into `old`, which is zeroed memory
    // of the right type and is read only when the call succeeds.
    unsafe {
        libc::sigaction(sig as libc::c_int, std::ptr::null(), old.as_mut_ptr()) == 0
            && old.assume_init().sa_sigaction == libc::SIG_IGN
    }
}

/// A signal that arrived while it was blocked and nobody waited for it yet (during the
/// env_script capture, say), taken without waiting. The run must then end before the job starts.
/// Forward-only signals pending then are dropped: there was no job to pass them to.
pub fn take_pending_signal() -> Option<Sig> {
    let set = handled_signals();
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        // SAFETY: `set` is a valid sigset for the call's duration; no info struct is requested.
        let n = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &zero) };
        match sig_of(n) {
            Some(sig) if sig.forward_only() => continue,
            other => return other,
        }
    }
}

fn sig_of(n: libc::c_int) -> Option<Sig> {
    match Signal::try_from(n) {
        Ok(Signal::SIGINT) => Some(Sig::Interrupt),
        Ok(Signal::SIGTERM) => Some(Sig::Terminate),
        Ok(Signal::SIGHUP) => Some(Sig::Hangup),
        Ok(Signal::SIGUSR1) => Some(Sig::User1),
        Ok(Signal::SIGUSR2) => Some(Sig::User2),
        Ok(Signal::SIGCONT) => Some(Sig::Continue),
        Ok(Signal::SIGWINCH) => Some(Sig::WindowChange),
        _ => None,
    }
}

/// Blocks the signals of [`handled_signals`] in the calling thread and every thread it spawns later, so
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
                let Some(sig) = set.wait().ok().and_then(|s| sig_of(s as libc::c_int)) else {
                    continue;
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
        Sig::User1 => Signal::SIGUSR1,
        Sig::User2 => Signal::SIGUSR2,
        Sig::Continue => Signal::SIGCONT,
        Sig::WindowChange => Signal::SIGWINCH,
    };
    match signal::killpg(Pid::from_raw(pgid as i32), signal) {
        Ok(()) => {
            // A stopped process (SIGTTIN, SIGSTOP) acts on SIGTERM only once continued: like a
            // shell's `kill`, follow the signal with SIGCONT so stopping works on it too. A
            // forwarded message (SIGUSR1, SIGWINCH) must not resume a job someone stopped.
            if matches!(sig, Sig::Interrupt | Sig::Terminate | Sig::Hangup) {
                let _ = signal::killpg(Pid::from_raw(pgid as i32), Signal::SIGCONT);
            }
            Ok(true)
        }
        Err(Errno::ESRCH) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// True while any process (a zombie included) is in the group.
pub fn group_alive(pgid: u32) -> bool {
    alive(pgid as i32)
}

fn alive(pgid: i32) -> bool {
    !matches!(signal::killpg(Pid::from_raw(pgid), None), Err(Errno::ESRCH))
}

/// Makes gpuwarden the parent of every orphan the job leaves behind (a worker whose parent
/// died), so that [`wait_group`] can reap them: otherwise they linger as zombies of init and the
/// group never looks empty (FACTS.md).
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// Reaps the zombies of processes gpuwarden adopted as subreaper that belong to no watched
/// group: daemons the job started in a new session (`setsid`, `start_new_session=True`).
/// `keep` lists process groups whose members [`wait_group`] reaps and pids reaped elsewhere
/// (the guard). Reads `/proc`; call it when an attempt ends, not on a hot path.
pub fn reap_strays(keep_groups: &[u32], keep_pids: &[u32]) {
    let me = std::process::id();
    let Ok(procs) = crate::attribution::processes() else {
        return;
    };
    for stat in procs.values() {
        if stat.state == 'Z'
            && stat.ppid == me
            && !keep_groups.contains(&stat.pgid)
            && !keep_pids.contains(&stat.pid)
        {
            let _ = waitpid(Pid::from_raw(stat.pid as i32), Some(WaitPidFlag::WNOHANG));
        }
    }
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
        let group_alive = alive(leader.as_raw());
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
                // Members whose parent dies meanwhile are adopted (we are the subreaper) and
                // must be reaped here, or their zombies keep the group alive.
                while alive(leader.as_raw()) {
                    let _ = waitpid(group, Some(WaitPidFlag::WNOHANG));
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

    /// The guard's pid (reaped by [`Guard::close`], not by [`reap_strays`]).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// From now on, the guard kills group `pgid` if gpuwarden dies.
    pub fn watch(&mut self, pgid: u32) -> io::Result<()> {
        writeln!(self.pipe, "watch {pgid}")
    }

    /// Group `pgid` is empty: its id may be reused by an unrelated process, so the guard must
    /// forget it.
    pub fn unwatch(&mut self, pgid: u32) -> io::Result<()> {
        writeln!(self.pipe, "unwatch {pgid}")
    }

    /// Ends the guard after a normal run; groups still watched are left alone.
    pub fn close(mut self) {
        // Best effort: a guard that already died has nothing left to do.
        let _ = writeln!(self.pipe, "clear");
        drop(self.pipe);
        let _ = self.child.wait();
    }
}

/// The body of `gpuwarden __guard`. Returns the process exit code.
pub fn guard_main(grace: Duration) -> i32 {
    // The guard must outlive gpuwarden: `pkill gpuwarden` or a terminal hangup must not take it
    // down before it has done its one job. Slurm signals every process of the step (its cgroup),
    // the guard included: the SIGUSR1 of `--signal=USR1@90` must not end it either.
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        // SAFETY: installing SIG_IGN involves no handler code.
        let _ = unsafe { signal::signal(sig, SigHandler::SigIgn) };
    }
    let mut groups: Vec<i32> = Vec::new();
    let stdin = io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let mut words = line.split_whitespace();
        let pgid = |w: Option<&str>| w.and_then(|n| n.parse::<i32>().ok()).filter(|&n| n > 1);
        match (words.next(), words.next()) {
            (Some("watch"), n) => groups.extend(pgid(n)),
            (Some("unwatch"), n) => groups.retain(|&g| Some(g) != pgid(n)),
            (Some("clear"), _) => groups.clear(),
            _ => {}
        }
    }
    // End of input: gpuwarden is gone (or finished, in which case nothing is watched).
    groups.retain(|&g| alive(g));
    for &g in &groups {
        let _ = signal::killpg(Pid::from_raw(g), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && groups.iter().any(|&g| alive(g)) {
        thread::sleep(Duration::from_millis(20));
    }
    for &g in &groups {
        let _ = signal::killpg(Pid::from_raw(g), Signal::SIGKILL);
    }
    0
}
