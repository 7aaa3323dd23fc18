//! Process lifetime: spawning the job in its own process group, running a short-lived helper
//! (an `env_script`, a vendor GPU tool) under a deadline with its output captured, signalling
//! process groups, turning signals sent to gpuwarden into events, and the guard that kills the
//! job if gpuwarden dies.
//!
//! All `unsafe` and every raw signal call of gpuwarden lives in this file. It decides nothing:
//! when to signal whom is the supervisor's business. The job and every helper go through
//! `own_group`: a process group of its own, so that killing the group reaches everything it
//! starts, and no signal blocked, so that it can be stopped at all.
//!
//! Why a guard process: `PR_SET_PDEATHSIG` reaches only the job's direct child, so after a
//! `kill -9` of gpuwarden the job's workers (torchrun spawns many, dataloaders spawn more) would
//! keep the GPU busy forever. The guard is a tiny copy of gpuwarden (`gpuwarden __guard`) in its
//! own process group, told the job's process group id over a pipe. When gpuwarden dies, for any
//! reason, the pipe closes, and the guard sends SIGTERM to the group, waits a moment, then
//! SIGKILL. It needs no privilege (unlike a PID namespace or a cgroup).

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::SyncSender;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::libc;
use nix::poll::{PollFd, PollFlags, poll};
use nix::sys::signal::{self, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;

use crate::job::{JobExit, Sig};

/// Signals that end a run, and those that are a message for the job. The guard ignores both.
const ENDING: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];
const PASSED_ON: [Signal; 4] = [
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGCONT,
    Signal::SIGWINCH,
];

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
        for sig in ENDING.into_iter().chain(PASSED_ON) {
            if !is_ignored(sig) {
                set.add(sig);
            }
        }
        set
    })
}

/// What the dispositions gpuwarden inherited mean for the run, one sentence each, to be said
/// at the start: ignored signals stay ignored (for gpuwarden and, inherited, for the job), as
/// they do for any program a shell starts, and two of them change what the user can expect.
pub fn inherited_notices() -> Vec<String> {
    let mut out = Vec::new();
    if is_ignored(Signal::SIGINT) {
        out.push(
            "SIGINT is ignored in this gpuwarden (inherited: a script's background job, `cmd &`), \
             and the job inherits it: Ctrl-C stops neither; stop the run with `kill PID` (SIGTERM)"
                .to_string(),
        );
    }
    if terminal_reads_fail() {
        out.push(
            "stdin is a terminal and SIGTTIN is ignored (inherited): the job runs in a process \
             group of its own, so if it reads from the terminal the read fails with EIO \
             (`Input/output error`); a restart cannot cure that, so an attempt that fails that \
             way stops the run; give the job its input another way (`< file`, `< /dev/null`)"
                .to_string(),
        );
    }
    out
}

/// Whether a job that reads its standard input gets EIO instead of input: stdin is a terminal
/// and SIGTTIN is ignored (inherited: tmux `new-session 'cmd'`), so a read from the job's own
/// process group, which is not the terminal's foreground group, fails at once.
pub fn terminal_reads_fail() -> bool {
    is_ignored(Signal::SIGTTIN) && io::stdin().is_terminal()
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

/// Blocks the signals gpuwarden handles (SIGINT, SIGTERM, SIGHUP, SIGUSR1/2, SIGCONT, SIGWINCH,
/// less those inherited as ignored) in the calling thread and every thread it spawns later, so
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

/// Makes a child of `cmd` the leader of a new process group and start with no signal blocked.
/// The job and every helper gpuwarden starts go through this (the guard alone does not, see
/// [`Guard::spawn`]).
///
/// The group: a timeout or a stop kills the whole group, so whatever the child started (a
/// script's `sleep &`, torchrun's workers) goes too. The signal mask: gpuwarden blocks the
/// signals it forwards (see [`block_signals`]), the mask survives fork and exec, and the
/// standard library does not reset it (seen here: a job started without this ignored SIGTERM).
pub fn own_group(cmd: &mut Command) {
    cmd.process_group(0);
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
    /// The attempt's `cgroup.procs` (see `crate::cgroup`): the job joins it before exec, so
    /// every process it starts is the attempt's whatever group or session it moves to.
    pub cgroup: Option<&'a std::fs::File>,
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
        .stderr(Stdio::piped());
    for key in spec.unset_env {
        cmd.env_remove(key);
    }
    for (key, value) in spec.set_env {
        cmd.env(key, value);
    }
    own_group(&mut cmd);
    let parent = nix::unistd::getpid();
    let cgroup = spec.cgroup.map(std::os::fd::AsRawFd::as_raw_fd);
    // SAFETY: the closure runs between fork and exec in the child and calls only
    // async-signal-safe functions (write, prctl, getppid) without allocating.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = cgroup {
                // Pid 0 is "the writer". Failing that, the job runs in gpuwarden's cgroup and
                // is watched through its process group only, as where no cgroup can be made.
                let _ = nix::libc::write(fd, b"0".as_ptr().cast(), 1);
            }
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

/// Which part of an output stream [`run_captured`] keeps. The rest is read and dropped, so the
/// child never blocks on a full pipe and a flood of output cannot fill gpuwarden's memory.
#[derive(Clone, Copy, Debug)]
pub enum Keep {
    /// The first bytes (a tool's answer comes first).
    First(usize),
    /// The last bytes (why a script failed is at the end of its stderr).
    Last(usize),
}

/// How the program of [`run_captured`] ended.
#[derive(Debug)]
pub enum Ended {
    /// It exited. `None` when its exit status was collected by someone else (gpuwarden is a
    /// subreaper that reaps strays, see [`reap_strays`]).
    Exited(Option<ExitStatus>),
    /// It ran past the deadline; its process group was killed.
    TimedOut,
    /// Stop was asked while it ran; its process group was killed.
    Stopped,
}

/// What [`run_captured`] saw.
#[derive(Debug)]
pub struct Captured {
    pub ended: Ended,
    /// What it wrote, as much as [`Keep`] allows; partial when it was killed.
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// From the start until it exited or was killed.
    pub took: Duration,
    /// A killed leader that had not died yet, most likely stuck in the kernel (a wedged GPU
    /// driver lets no signal through until it lets go). Keep it and `try_wait` it later, or
    /// drop it and leave its zombie to [`reap_strays`]; waiting for it could block for good.
    pub unreaped: Option<Child>,
}

/// A program [`run_captured`] could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start {}: {cause}", program.display())]
pub struct SpawnError {
    pub program: PathBuf,
    pub cause: io::Error,
}

/// The longest [`run_captured`] goes without looking at the stop request and the deadline.
const SLICE: Duration = Duration::from_millis(20);

/// How long [`run_captured`] still reads after the leader exited and its group was killed:
/// something it started outside its group (a daemon that called `setsid`) may hold the pipes
/// open for good.
const LINGER: Duration = Duration::from_secs(2);

/// How long a killed leader gets to die before [`run_captured`] hands it back unreaped.
const REAP_WAIT: Duration = Duration::from_millis(100);

/// Runs `cmd` with stdin closed and its stdout and stderr captured, in a process group of its
/// own and with no signal blocked, until it exits, `deadline` passes or `stop` returns true.
///
/// Never waits on the child unconditionally: the pipes are polled in slices of at most 20 ms,
/// and stop and the deadline are checked between slices. When the leader exits, its group is
/// killed (whatever it left running in the background would outlive the call and hold the
/// pipes), and what is still in the pipes is read for at most 2 s (or until stop is asked; the
/// program still counts as exited, with what was read). Past the deadline or on stop, the group
/// gets SIGKILL and the leader is reaped if it dies at once, or else handed back in
/// [`Captured::unreaped`].
pub fn run_captured(
    mut cmd: Command,
    stdout: Keep,
    stderr: Keep,
    deadline: Instant,
    stop: &dyn Fn() -> bool,
) -> Result<Captured, SpawnError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    own_group(&mut cmd);
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|cause| SpawnError {
        program: PathBuf::from(cmd.get_program()),
        cause,
    })?;
    let mut pipes = [
        Pipe::new(child.stdout.take().map(OwnedFd::from), stdout),
        Pipe::new(child.stderr.take().map(OwnedFd::from), stderr),
    ];
    let leader = Pid::from_raw(child.id() as i32);
    let mut exited: Option<(Option<ExitStatus>, Instant)> = None;
    loop {
        let now = Instant::now();
        let until = match exited {
            None => {
                if let Some(status) = end_if_exited(&mut child, leader) {
                    exited = Some((status, now));
                    continue;
                }
                let ended = if stop() {
                    Some(Ended::Stopped)
                } else if now >= deadline {
                    Some(Ended::TimedOut)
                } else {
                    None
                };
                if let Some(ended) = ended {
                    let [out, err] = pipes;
                    return Ok(Captured {
                        ended,
                        stdout: out.data,
                        stderr: err.data,
                        took: now - start,
                        unreaped: kill_leader_group(child, leader),
                    });
                }
                deadline
            }
            Some((status, at)) => {
                let open = pipes.iter().any(Pipe::is_open);
                if !open || now >= at + LINGER || stop() {
                    let [out, err] = pipes;
                    return Ok(Captured {
                        ended: Ended::Exited(status),
                        stdout: out.data,
                        stderr: err.data,
                        took: at - start,
                        unreaped: None,
                    });
                }
                at + LINGER
            }
        };
        let slice = SLICE.min(until.saturating_duration_since(now));
        if !poll_pipes(&mut pipes, slice) {
            // Both pipes closed: the leader is exiting (or stuck after its last write).
            thread::sleep(slice.min(Duration::from_millis(1)));
        }
    }
}

/// Once the leader has exited: kills what is left of its group and reaps it, returning its
/// status (`Some(None)` when someone else reaped it). `None` while it runs.
fn end_if_exited(child: &mut Child, leader: Pid) -> Option<Option<ExitStatus>> {
    // WNOWAIT leaves the leader a zombie once it has exited: while it is unreaped its pid, which
    // is also the group's id, cannot be reused, so the killpg below cannot hit a stranger.
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    match waitid(Id::Pid(leader), flags) {
        Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => None,
        Ok(_) => {
            // The leader is done, but what it started in the background (an agent, a daemon, a
            // `sleep &`) would outlive the call and hold the pipes open: it goes with the group.
            let _ = signal::killpg(leader, Signal::SIGKILL);
            Some(child.wait().ok())
        }
        // Reaped by someone else: the group's id may already name a stranger, so it is left.
        Err(_) => Some(None),
    }
}

/// Kills the leader's group and the leader (which may have left the group: `set -m` in a
/// script), and reaps the leader if it dies within [`REAP_WAIT`]; else hands it back.
fn kill_leader_group(mut child: Child, leader: Pid) -> Option<Child> {
    // An already empty group is the good case; any other failure leaves nothing better to do.
    let _ = signal::killpg(leader, Signal::SIGKILL);
    let _ = child.kill();
    let until = Instant::now() + REAP_WAIT;
    loop {
        match child.try_wait() {
            Ok(None) if Instant::now() < until => thread::sleep(Duration::from_millis(2)),
            Ok(None) => return Some(child),
            // Exited, or reaped by someone else.
            Ok(Some(_)) | Err(_) => return None,
        }
    }
}

/// One of the child's output pipes and what was kept of it.
struct Pipe {
    file: Option<File>,
    keep: Keep,
    data: Vec<u8>,
}

impl Pipe {
    fn new(fd: Option<OwnedFd>, keep: Keep) -> Pipe {
        Pipe {
            file: fd.map(File::from),
            keep,
            data: Vec::new(),
        }
    }

    fn is_open(&self) -> bool {
        self.file.is_some()
    }

    /// Reads what is there (poll said so); closes the pipe at end of file or on an error.
    fn drain(&mut self) {
        let Some(file) = self.file.as_mut() else {
            return;
        };
        let mut buf = [0u8; 16 * 1024];
        match file.read(&mut buf) {
            Ok(0) => self.file = None,
            Ok(n) => match self.keep {
                Keep::First(max) => {
                    let room = max.saturating_sub(self.data.len());
                    self.data.extend_from_slice(&buf[..n.min(room)]);
                }
                Keep::Last(max) => {
                    self.data.extend_from_slice(&buf[..n]);
                    if self.data.len() > max {
                        self.data.drain(..self.data.len() - max);
                    }
                }
            },
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => self.file = None,
        }
    }
}

/// Waits up to `slice` for an open pipe to have data or close, then drains the ready ones.
/// Returns false, at once, when both are closed.
fn poll_pipes(pipes: &mut [Pipe; 2], slice: Duration) -> bool {
    let ms = u16::try_from(slice.as_millis().max(1)).unwrap_or(u16::MAX);
    let mut ready = [false; 2];
    {
        let mut fds = Vec::with_capacity(2);
        let mut which = Vec::with_capacity(2);
        for (i, pipe) in pipes.iter().enumerate() {
            if let Some(file) = &pipe.file {
                fds.push(PollFd::new(file.as_fd(), PollFlags::POLLIN));
                which.push(i);
            }
        }
        if fds.is_empty() {
            return false;
        }
        // A timeout, EINTR or a poll failure: look again next slice.
        if let Ok(n) = poll(&mut fds, ms)
            && n > 0
        {
            for (fd, &i) in fds.iter().zip(&which) {
                ready[i] = fd.revents().is_some_and(|r| !r.is_empty());
            }
        }
    }
    for (pipe, ready) in pipes.iter_mut().zip(ready) {
        if ready {
            pipe.drain();
        }
    }
    true
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
    let Ok(procs) = crate::procfs::processes() else {
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
        // Its own group: Ctrl-C in the terminal and signals to gpuwarden's group miss it. Not
        // through [`own_group`]: the guard keeps gpuwarden's blocked mask on purpose, so that a
        // `pkill gpuwarden` between its exec and `guard_main` ignoring the signals stays pending
        // instead of killing it.
        let mut child = Command::new(exe)
            .arg(GUARD_SUBCOMMAND)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
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

    /// From now on, the guard also kills every process of the cgroup at `path` if gpuwarden
    /// dies (workers that left the job's process group).
    pub fn watch_cgroup(&mut self, path: &std::path::Path) -> io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        self.pipe.write_all(b"cgroup ")?;
        self.pipe.write_all(path.as_os_str().as_bytes())?;
        self.pipe.write_all(b"\n")
    }

    /// Whether the guard process still runs (someone may have killed it).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
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
    // SIGCONT and SIGWINCH harm nothing left at their defaults.
    for sig in ENDING.into_iter().chain([Signal::SIGUSR1, Signal::SIGUSR2]) {
        // SAFETY: installing SIG_IGN involves no handler code.
        let _ = unsafe { signal::signal(sig, SigHandler::SigIgn) };
    }
    let mut groups: Vec<i32> = Vec::new();
    let mut cgroups: Vec<crate::cgroup::Cgroup> = Vec::new();
    let stdin = io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        if let Some(path) = line.strip_prefix("cgroup ") {
            cgroups.push(crate::cgroup::Cgroup::at(path.into()));
            continue;
        }
        let mut words = line.split_whitespace();
        let pgid = |w: Option<&str>| w.and_then(|n| n.parse::<i32>().ok()).filter(|&n| n > 1);
        match (words.next(), words.next()) {
            (Some("watch"), n) => groups.extend(pgid(n)),
            (Some("unwatch"), n) => groups.retain(|&g| Some(g) != pgid(n)),
            (Some("clear"), _) => {
                groups.clear();
                cgroups.clear();
            }
            _ => {}
        }
    }
    // End of input: gpuwarden is gone (or finished, in which case nothing is watched).
    groups.retain(|&g| alive(g));
    for &g in &groups {
        let _ = signal::killpg(Pid::from_raw(g), Signal::SIGTERM);
    }
    for cgroup in &cgroups {
        cgroup.signal(nix::libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline
        && (groups.iter().any(|&g| alive(g)) || cgroups.iter().any(|c| c.populated()))
    {
        thread::sleep(Duration::from_millis(20));
    }
    for &g in &groups {
        let _ = signal::killpg(Pid::from_raw(g), Signal::SIGKILL);
    }
    // Whatever left the groups: the cgroups hold it.
    for cgroup in &cgroups {
        cgroup.kill();
    }
    0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(script);
        cmd
    }

    fn run(script: &str, timeout: Duration) -> Captured {
        let all = Keep::First(usize::MAX);
        run_captured(sh(script), all, all, Instant::now() + timeout, &|| false).unwrap()
    }

    /// Whether `pid` is gone: no such process, or a zombie nobody reaped yet (it holds no pipe
    /// and no GPU, and reaping it is its parent's business).
    fn gone(pid: &str) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())) {
            Err(_) => true,
            // The state follows the parenthesised command name, which may hold spaces.
            Ok(stat) => stat
                .rsplit(')')
                .next()
                .unwrap()
                .trim_start()
                .starts_with('Z'),
        }
    }

    /// Whether `pid` is gone within 2 s: SIGKILL is delivered asynchronously.
    pub(crate) fn gone_soon(pid: &str) -> bool {
        let until = Instant::now() + Duration::from_secs(2);
        while !gone(pid) && Instant::now() < until {
            thread::sleep(Duration::from_millis(20));
        }
        gone(pid)
    }

    #[test]
    fn output_and_exit_status_are_captured() {
        let run = run("echo out; echo err >&2; exit 3", Duration::from_secs(5));
        let Ended::Exited(Some(status)) = run.ended else {
            panic!("{run:?}");
        };
        assert_eq!(status.code(), Some(3));
        assert_eq!(run.stdout, b"out\n");
        assert_eq!(run.stderr, b"err\n");
        assert!(run.unreaped.is_none());
    }

    #[test]
    fn timeout_kills_the_whole_group_including_a_grandchild() {
        let start = Instant::now();
        // The grandchild keeps the pipes open: only killing the whole group ends the call.
        let run = run("sleep 30 & echo $!; sleep 30", Duration::from_millis(300));
        assert!(matches!(run.ended, Ended::TimedOut), "{run:?}");
        assert!(start.elapsed() < Duration::from_secs(2), "{run:?}");
        // Ran until the deadline, which was set before the spawn `took` is counted from.
        assert!(run.took >= Duration::from_millis(250), "{run:?}");
        // What it wrote before the deadline is kept.
        let grandchild = String::from_utf8(run.stdout).unwrap();
        assert!(gone_soon(&grandchild), "grandchild {grandchild} survived");
        assert!(run.unreaped.is_none(), "sh did not die of SIGKILL");
    }

    #[test]
    fn what_the_leader_leaves_behind_dies_when_it_exits() {
        let start = Instant::now();
        let run = run("sleep 30 & echo $!", Duration::from_secs(20));
        assert!(
            matches!(run.ended, Ended::Exited(Some(s)) if s.success()),
            "{run:?}"
        );
        // Had the sleep been left running it would hold stdout until the linger ran out.
        assert!(start.elapsed() < LINGER, "{:?}", start.elapsed());
        let grandchild = String::from_utf8(run.stdout).unwrap();
        assert!(gone_soon(&grandchild), "background {grandchild} survived");
    }

    #[test]
    fn a_missing_program_names_itself_in_the_error() {
        let cmd = Command::new("/nonexistent/gpuwarden-tool");
        let all = Keep::First(usize::MAX);
        let deadline = Instant::now() + Duration::from_secs(1);
        let err = run_captured(cmd, all, all, deadline, &|| false).unwrap_err();
        assert_eq!(err.cause.kind(), io::ErrorKind::NotFound, "{err}");
        let msg = err.to_string();
        assert!(
            msg.starts_with("cannot start /nonexistent/gpuwarden-tool: "),
            "{msg}"
        );
    }

    #[test]
    fn stop_kills_a_running_call_promptly() {
        let start = Instant::now();
        let stop = || start.elapsed() > Duration::from_millis(100);
        let all = Keep::First(usize::MAX);
        let deadline = start + Duration::from_secs(30);
        let run = run_captured(sh("sleep 30"), all, all, deadline, &stop).unwrap();
        assert!(matches!(run.ended, Ended::Stopped), "{run:?}");
        assert!(start.elapsed() < Duration::from_secs(1), "{run:?}");
    }

    #[test]
    fn keep_bounds_each_stream_from_its_own_end() {
        let script = "seq 1 100000; seq 1 100000 >&2";
        let deadline = Instant::now() + Duration::from_secs(20);
        let run = run_captured(sh(script), Keep::First(6), Keep::Last(7), deadline, &|| {
            false
        })
        .unwrap();
        assert!(
            matches!(run.ended, Ended::Exited(Some(s)) if s.success()),
            "{run:?}"
        );
        assert_eq!(run.stdout, b"1\n2\n3\n");
        assert_eq!(run.stderr, b"100000\n");
    }

    #[test]
    fn signals_blocked_in_gpuwarden_are_unblocked_in_the_child() {
        // gpuwarden blocks SIGTERM on every thread, and the mask survives fork and exec: a
        // child inheriting it would sit out the SIGTERM meant to stop it. Not through `sh`,
        // which clears its mask at startup and would hide the inherited one.
        let run = thread::spawn(|| {
            let mut term = SigSet::empty();
            term.add(Signal::SIGTERM);
            signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&term), None).unwrap();
            let mut cmd = Command::new("grep");
            cmd.args(["SigBlk", "/proc/self/status"]);
            let all = Keep::First(usize::MAX);
            let deadline = Instant::now() + Duration::from_secs(5);
            run_captured(cmd, all, all, deadline, &|| false).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&run.stdout),
            "SigBlk:\t0000000000000000\n",
            "{run:?}"
        );
    }
}
