//! The kernel log as a source: follows `/dev/kmsg` live from the moment the run starts, and
//! reads the whole buffer once for `gpuwarden scan --kernel`.
//!
//! Amdgpu page faults, ring timeouts, GPU resets and NVIDIA Xid lines reach the kernel log, not
//! the job's stderr, so the follower turns each new record into an event. It decides nothing:
//! a caller-supplied classifier (the rules) says which records matter, and the supervisor says
//! what they mean.
//!
//! # How the follower works
//!
//! - **From now on.** `/dev/kmsg` is opened non-blocking and seeked to its end (`SEEK_END`)
//!   before [`follow`] returns, so boot messages and faults of earlier runs are never replayed,
//!   and a record logged after `follow` returns is always seen.
//! - **One read, one record.** Each `read()` returns one whole record with its dictionary lines;
//!   the buffer is 16 KiB because the kernel refuses (`EINVAL`) a buffer smaller than the record,
//!   and formatted records reach 8 KiB. [`super::kmsg::parse_record`] parses it.
//! - **Losses are reported, never fatal.** When the kernel's ring buffer overwrites records
//!   before we read them, `read()` fails with `EPIPE` once and goes on with the oldest record
//!   left; the gap in sequence numbers is reported as [`KernelEvent::Lost`].
//! - **Never blocked by the consumer.** The classifier runs on the reader thread, so a flood of
//!   irrelevant lines (50,000 in a few seconds) costs a parse and a match each and never reaches
//!   the channel. What the classifier keeps goes out with `try_send`; while the channel is full
//!   it waits in a bounded outbox ([`FollowConfig::held_records`]), and what does not fit is
//!   counted and reported as [`KernelEvent::Dropped`]. The oldest records are the ones kept:
//!   the first fault line of an incident is the one that explains it.
//! - **Restarted, not lost.** A read error or a panic (in the parser or the classifier) restarts
//!   the reader and says so ([`KernelEvent::Restarted`]); too many restarts in a window end it
//!   with [`KernelEvent::GaveUp`]. The thread catches the panic and runs its read loop again
//!   (reopening the source after an I/O error), so the classifier, the channel and the count
//!   of sequence numbers survive the restart and records missed meanwhile are reported lost.
//! - **Blocks are decided whole.** A classifier may hold a record back ([`Classify`]) until the
//!   lines that complete it arrive (an amdgpu fault names its process a line later); the reader
//!   wakes at the classifier's deadline to hand it on even when no record comes.
//! - **Degrade, don't die.** Without permission to read `/dev/kmsg` (or without the device), the
//!   follower says so once ([`KernelEvent::Unavailable`]) and does nothing more.
//! - **Stops promptly.** [`Handle::stop`] wakes the reader through a pipe it polls with the
//!   device, so the run never waits on the next kernel message.
//!
//! Why not the `rmesg` crate: its follower always replays the whole backlog (no seek to the
//! end), returns dictionary lines as separate entries without a facility and does not undo the
//! `\xNN` escaping; its one-shot read uses a 1 KiB buffer, so a single record longer than that
//! in the buffer fails the whole read with `EINVAL` (checked on this machine with a 900-byte
//! message of control characters), and an overrun (`EPIPE`) ends it too. Reading `/dev/kmsg`
//! directly is a few lines, uses the same parser for both paths, and adds no dependency.
//!
//! A file of records in `/dev/kmsg` format (one record a line, dictionary lines after it) can
//! stand in for the device ([`KernelSource::File`]): tests use it, with the same parser.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::marker::PhantomData;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::libc;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::handle::{Ask, Handle, Patience};
use super::kmsg::{FileRecords, ParseError, Piece, Record, SHOWN, parse_record};

/// Where the kernel log is on Linux.
pub const DEV_KMSG: &str = "/dev/kmsg";

/// Read buffer for `/dev/kmsg`: at least 8 KiB or long records fail with `EINVAL`.
const READ_BUF: usize = 16 * 1024;

/// Records read (or file chunks) between two looks at the stop flag and the outbox.
const BATCH: usize = 256;

/// How often a full outbox tries the channel again.
const RETRY: Duration = Duration::from_millis(20);

/// How often a file source looks for new lines once at its end.
const FILE_POLL: Duration = Duration::from_millis(50);

/// Records `read_all` takes at most: under an endless flood it must still end.
const MAX_BACKLOG: usize = 1_000_000;

/// Where the kernel log comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSource {
    /// The kernel's own log device, normally [`DEV_KMSG`].
    Kmsg(PathBuf),
    /// A file of records in `/dev/kmsg` format, one a line, each followed by its dictionary
    /// lines (which start with a space). The follower tails it from its end, or from its start
    /// when `from_start` is set.
    File { path: PathBuf, from_start: bool },
    /// No kernel log: the follower delivers nothing (tests, `--no-kernel`).
    Noop,
}

impl KernelSource {
    /// The kernel's own log, `/dev/kmsg`.
    pub fn kmsg() -> Self {
        KernelSource::Kmsg(PathBuf::from(DEV_KMSG))
    }

    fn path(&self) -> &Path {
        match self {
            KernelSource::Kmsg(path) | KernelSource::File { path, .. } => path,
            KernelSource::Noop => Path::new(""),
        }
    }
}

/// What the follower reports. `T` is what the classifier made of a record it kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelEvent<T> {
    /// A record the classifier kept.
    Record(T),
    /// Records that never reached the reader: overwritten in the kernel's buffer before they
    /// were read (`EPIPE`), or logged while the reader was restarting. `None` when the loss came
    /// before the first record read, so that no sequence number tells how many.
    Lost { records: Option<u64> },
    /// Records the classifier kept (or `Malformed` reports) that were dropped because the
    /// consumer fell behind.
    Dropped { records: u64 },
    /// A record that could not be parsed: its raw text (cut to 256 bytes) and why.
    Malformed { raw: String, error: String },
    /// The kernel log cannot be read (no permission, no device); nothing more will come.
    Unavailable { reason: String },
    /// The reader failed (`error`) and was started again; `restarts` counts every restart so
    /// far.
    Restarted { error: String, restarts: u32 },
    /// The reader failed too often and stopped for good; nothing more will come.
    GaveUp { error: String },
}

/// How to follow the kernel log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowConfig {
    pub source: KernelSource,
    /// Restarts allowed within [`FollowConfig::restart_window`]; one failure more gives up.
    pub max_restarts: u32,
    pub restart_window: Duration,
    /// Kept records held while the channel is full; more are dropped and counted.
    pub held_records: usize,
}

impl FollowConfig {
    /// Five restarts a minute and 1024 held records: a reader failing more often than every
    /// twelve seconds is broken, not unlucky.
    pub fn new(source: KernelSource) -> Self {
        FollowConfig {
            source,
            max_restarts: 5,
            restart_window: Duration::from_secs(60),
            held_records: 1024,
        }
    }
}

/// Why the kernel log could not be read once ([`read_all`]).
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot open the kernel log {path}: {source}; {hint}", hint = open_hint(source))]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot read the kernel log {path}: {source}; try again, or check `dmesg`")]
    Read { path: PathBuf, source: io::Error },
}

/// What to do about a failed open, for the user.
fn open_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => {
            "run gpuwarden as root or with CAP_SYSLOG, or allow it with `sysctl kernel.dmesg_restrict=0`"
        }
        Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => {
            "this system (or container) has no kernel log device; GPU faults are still caught in the job's output"
        }
        _ => "check that the path is the kernel log device or a readable file",
    }
}

/// Whether a failed open means "this will not work here" rather than a passing failure.
fn is_unavailable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EACCES | libc::EPERM | libc::ENOENT | libc::ENODEV | libc::ENXIO)
    )
}

/// A running follower; stops (and joins its thread) on [`Handle::stop`] or when dropped. The
/// reader never blocks on the device or on the channel, so the join takes at most one
/// classifier call.
pub type Follower = Handle;

/// What a classifier keeps of a record, and whether it may be dropped when the consumer falls
/// behind.
#[derive(Debug)]
pub enum Kept<T> {
    /// Must reach the consumer: it waits in the outbox (beside notices) however long the
    /// consumer is away. For the few records that concern the job: the classifier decided whose
    /// they are before the queue, so only foreign ones can ever be dropped.
    Must(T),
    /// May be dropped (and counted) when the outbox is full.
    May(T),
}

/// A classifier that may hold a record back until the lines that complete it have come: an
/// amdgpu fault names its process a line later (`ring gfx_0.0.0 timeout` ... then ` Process
/// python3 pid 2113 thread ...`), and whose fault it is can only be decided on the whole block.
///
/// The reader thread hands it every record, and asks it for what is due whenever its
/// [`Classify::deadline`] passes, even when no record comes. What it returns in `out` is handed
/// on in that order.
pub trait Classify<T>: Send + 'static {
    /// One record read at `now`: push what is ready to go (possibly a block it was holding,
    /// which this record ends, then this one).
    fn record(&mut self, record: Record, now: Instant, out: &mut Vec<Kept<T>>);
    /// When what it holds must be decided even if no record comes; `None` when it holds nothing.
    fn deadline(&self) -> Option<Instant>;
    /// Pushes what is due at `now` (everything, when `now` is past every deadline).
    fn due(&mut self, now: Instant, out: &mut Vec<Kept<T>>);
}

/// A plain function of one record is a classifier that decides each record on its own and
/// holds nothing; what it keeps may be dropped when the consumer falls behind. Most followers
/// (the `ui`, the tests) need no more than this, so they pass a closure straight to [`follow`].
impl<T, F> Classify<T> for F
where
    F: FnMut(Record) -> Option<T> + Send + 'static,
{
    fn record(&mut self, record: Record, _now: Instant, out: &mut Vec<Kept<T>>) {
        out.extend(self(record).map(Kept::May));
    }

    fn deadline(&self) -> Option<Instant> {
        None
    }

    fn due(&mut self, _now: Instant, _out: &mut Vec<Kept<T>>) {}
}

/// Starts following the kernel log.
///
/// `classify` runs on the reader thread for every record and says what to forward: a closure
/// returning `None` to let the record go, or a [`Classify`] that may hold records back and say
/// which must not be dropped. `wrap` turns a [`KernelEvent`] into the channel's type. The
/// device is opened and seeked to its end before this returns; an open that fails for lack of
/// permission or of the device becomes one [`KernelEvent::Unavailable`] event, not an error.
/// The error is for what prevents starting at all (no pipe, no thread).
pub fn follow<T, E, C, W>(
    config: FollowConfig,
    classify: C,
    tx: SyncSender<E>,
    wrap: W,
) -> io::Result<Follower>
where
    T: 'static,
    E: Send + 'static,
    C: Classify<T>,
    W: Fn(KernelEvent<T>) -> E + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    if config.source == KernelSource::Noop {
        return Ok(Handle::noop("kernel-log"));
    }
    let (wake_rx, wake_tx) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    let mut progress = Progress::default();
    let first = open(&config.source, &mut progress);
    let worker = Worker {
        outbox: Outbox::new(config.held_records),
        config,
        classify,
        wrap,
        tx,
        stop: Arc::clone(&stop),
        wake: wake_rx,
        progress,
        failures: VecDeque::new(),
        restarts: 0,
        disconnected: false,
        _record: PhantomData,
    };
    let ask: Ask = Box::new(move || {
        stop.store(true, Ordering::SeqCst);
        // One byte makes the pipe readable for good; the flag says why.
        let _ = nix::unistd::write(&wake_tx, &[1]);
    });
    Handle::spawn("kernel-log", Some(ask), Patience::Join, move || {
        worker.run(first)
    })
}

/// What survives a restart of the reader.
#[derive(Debug, Default)]
struct Progress {
    /// Sequence number of the last record read: the next one tells how many were lost.
    last_seq: Option<u64>,
    /// `EPIPE` was seen and no record has been read since.
    overrun: bool,
    /// For a file: where the first record not yet handed on starts (`None` before the first
    /// open).
    file_offset: Option<u64>,
}

/// An opened source.
enum Input {
    Kmsg(File),
    File(Tail),
}

/// A file being tailed: where we are, and the lines not yet made into records.
struct Tail {
    file: File,
    lines: FileRecords,
    /// The end of the file was reached once with a record still open: if nothing more comes
    /// by the next look, the record is complete.
    quiet: bool,
}

fn open(source: &KernelSource, progress: &mut Progress) -> io::Result<Input> {
    match source {
        KernelSource::Kmsg(path) => {
            let mut file = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)?;
            file.seek(SeekFrom::End(0))?;
            Ok(Input::Kmsg(file))
        }
        KernelSource::File { path, from_start } => {
            let mut file = File::open(path)?;
            let offset = match progress.file_offset {
                Some(offset) => file.seek(SeekFrom::Start(offset))?,
                None if *from_start => 0,
                None => file.seek(SeekFrom::End(0))?,
            };
            progress.file_offset = Some(offset);
            Ok(Input::File(Tail {
                file,
                lines: FileRecords::new(offset),
                quiet: false,
            }))
        }
        KernelSource::Noop => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the no-op kernel source has nothing to open",
        )),
    }
}

/// How a pump ended without failing.
enum Exit {
    Stopped,
    Disconnected,
}

/// The reader thread's state.
struct Worker<T, E, C, W> {
    config: FollowConfig,
    classify: C,
    wrap: W,
    tx: SyncSender<E>,
    outbox: Outbox<E>,
    stop: Arc<AtomicBool>,
    wake: OwnedFd,
    progress: Progress,
    /// When recent failures happened, for the restart budget.
    failures: VecDeque<Instant>,
    restarts: u32,
    disconnected: bool,
    _record: PhantomData<fn() -> T>,
}

impl<T, E, C, W> Worker<T, E, C, W>
where
    C: Classify<T>,
    W: Fn(KernelEvent<T>) -> E,
{
    fn run(mut self, first: io::Result<Input>) {
        let path = self.config.source.path().display().to_string();
        let mut input = None;
        let mut failure = None;
        match first {
            Ok(opened) => input = Some(opened),
            Err(e) if is_unavailable(&e) => {
                let reason = format!(
                    "cannot open the kernel log {path}: {e}; {}; supervising without it",
                    open_hint(&e)
                );
                self.notice(KernelEvent::Unavailable { reason });
                self.deliver_last();
                return;
            }
            Err(e) => failure = Some(format!("cannot open {path}: {e}")),
        }
        loop {
            if let Some(error) = failure.take()
                && !self.restart(error)
            {
                return;
            }
            let mut current = match input.take() {
                Some(opened) => opened,
                None => match open(&self.config.source, &mut self.progress) {
                    Ok(opened) => opened,
                    Err(e) => {
                        failure = Some(format!("cannot reopen {path}: {e}"));
                        continue;
                    }
                },
            };
            match catch_unwind(AssertUnwindSafe(|| self.pump(&mut current))) {
                Ok(Ok(Exit::Stopped | Exit::Disconnected)) => return,
                Ok(Err(e)) => failure = Some(format!("reading {path} failed: {e}")),
                Err(panic) => {
                    failure = Some(format!(
                        "the kernel log reader panicked: {}",
                        panic_message(panic.as_ref())
                    ));
                    // A panic leaves `/dev/kmsg` itself fine (one read is one record, nothing
                    // half-done lives in user space): keep reading where it was instead of
                    // seeking to the end again. A file's line buffer may be half-updated, so it
                    // is reopened at the last record handed on.
                    if let Input::Kmsg(_) = current {
                        input = Some(current);
                    }
                }
            }
        }
    }

    /// Counts a failure against the budget and says so. False when the follower gave up (or
    /// must stop).
    fn restart(&mut self, error: String) -> bool {
        let now = Instant::now();
        let window = self.config.restart_window;
        self.failures.retain(|&t| now.duration_since(t) < window);
        self.failures.push_back(now);
        if self.failures.len() > self.config.max_restarts as usize {
            self.notice(KernelEvent::GaveUp { error });
            self.deliver_last();
            return false;
        }
        self.restarts += 1;
        self.notice(KernelEvent::Restarted {
            error,
            restarts: self.restarts,
        });
        // Back off a little more on each failure in the window, so a failing device is not
        // hammered; at most a second, so a passing problem costs little.
        let failures = u32::try_from(self.failures.len()).unwrap_or(u32::MAX);
        let backoff = Duration::from_millis(50)
            .saturating_mul(1 << failures.min(5))
            .min(Duration::from_secs(1));
        let until = Instant::now() + backoff;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            self.flush();
            if self.disconnected || self.wait(left.min(RETRY)) {
                return false;
            }
        }
        true
    }

    fn pump(&mut self, input: &mut Input) -> io::Result<Exit> {
        match input {
            Input::Kmsg(file) => self.pump_kmsg(file),
            Input::File(tail) => self.pump_file(tail),
        }
    }

    fn pump_kmsg(&mut self, file: &mut File) -> io::Result<Exit> {
        let mut buf = vec![0u8; READ_BUF];
        loop {
            self.release(Instant::now());
            self.flush();
            if let Some(exit) = self.exit() {
                return Ok(exit);
            }
            // Wait for a record or the stop byte; while the outbox holds something, wake up
            // in a while to offer it again, and when the classifier holds a block, by its
            // deadline.
            let mut timeout = if self.outbox.is_empty() {
                None
            } else {
                Some(RETRY)
            };
            if let Some(left) = self.held_for() {
                timeout = Some(timeout.map_or(left, |t| t.min(left)));
            }
            let timeout = timeout.map_or(PollTimeout::NONE, poll_timeout_ceil);
            let mut fds = [
                PollFd::new(file.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.wake.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            for _ in 0..BATCH {
                match file.read(&mut buf) {
                    Ok(0) => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the kernel log device reported an end of file",
                        ));
                    }
                    Ok(n) => self.take(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // Overrun: the records after our position were overwritten. The next read
                    // returns the oldest record left; its sequence number tells how many.
                    Err(e) if e.raw_os_error() == Some(libc::EPIPE) => self.progress.overrun = true,
                    Err(e) => return Err(e),
                }
                if self.stop.load(Ordering::Relaxed) || self.disconnected {
                    break;
                }
            }
        }
    }

    fn pump_file(&mut self, tail: &mut Tail) -> io::Result<Exit> {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            self.release(Instant::now());
            self.flush();
            if let Some(exit) = self.exit() {
                return Ok(exit);
            }
            let mut got = false;
            for _ in 0..BATCH {
                let n = match tail.file.read(&mut chunk) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                if n == 0 {
                    break;
                }
                got = true;
                self.feed(&mut tail.lines, &chunk[..n], false);
                if self.stop.load(Ordering::Relaxed) || self.disconnected {
                    break;
                }
            }
            if got {
                tail.quiet = false;
                continue;
            }
            // At the end of the file. A record whose header came in the last read may still be
            // getting its dictionary lines; it is complete once a quiet interval has passed.
            if tail.quiet {
                self.feed(&mut tail.lines, &[], true);
                tail.quiet = false;
            } else if tail.lines.holds_record() {
                tail.quiet = true;
            }
            let mut pause = if self.outbox.is_empty() {
                FILE_POLL
            } else {
                RETRY
            };
            if let Some(left) = self.held_for() {
                pause = pause.min(left.max(Duration::from_millis(1)));
            }
            if self.wait(pause) {
                return Ok(Exit::Stopped);
            }
        }
    }

    /// Feeds file bytes to the line splitter and takes each complete record.
    fn feed(&mut self, lines: &mut FileRecords, bytes: &[u8], close_record: bool) {
        let mut pieces = Vec::new();
        lines.feed(bytes, &mut |piece| pieces.push(piece));
        if close_record {
            lines.close_record(&mut |piece| pieces.push(piece));
        }
        for piece in pieces {
            // Hand-on point first: a classifier that panics on this record must not get it
            // again after the restart.
            self.progress.file_offset = Some(piece.end());
            match piece {
                Piece::Record { raw, .. } => self.take(&raw),
                Piece::Bad { line, why, .. } => self.malformed(&line, why),
            }
        }
    }

    /// One raw record: parse, account for its sequence number, classify, forward.
    fn take(&mut self, raw: &[u8]) {
        let record = match parse_record(raw) {
            Ok(record) => record,
            Err(e) => return self.malformed(raw, e.to_string()),
        };
        if let Some(records) = gap(&mut self.progress, record.seq) {
            self.outbox.lost(records);
            self.flush();
        }
        let mut out = Vec::new();
        self.classify.record(record, Instant::now(), &mut out);
        self.hand_on(out);
    }

    fn hand_on(&mut self, kept: Vec<Kept<T>>) {
        for kept in kept {
            match kept {
                Kept::Must(kept) => self.notice(KernelEvent::Record(kept)),
                Kept::May(kept) => self.forward(KernelEvent::Record(kept)),
            }
        }
    }

    /// Hands on what the classifier holds and is due at `now`.
    fn release(&mut self, now: Instant) {
        if self.classify.deadline().is_some_and(|d| d <= now) {
            let mut out = Vec::new();
            self.classify.due(now, &mut out);
            self.hand_on(out);
        }
    }

    /// How long until the classifier's deadline, if it holds anything.
    fn held_for(&self) -> Option<Duration> {
        self.classify
            .deadline()
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// A bad record is reported like a kept one, and dropped like one: a file of garbage must
    /// not fill memory while the consumer is away.
    fn malformed(&mut self, raw: &[u8], error: String) {
        let shown = &raw[..raw.len().min(SHOWN)];
        self.forward(KernelEvent::Malformed {
            raw: String::from_utf8_lossy(shown).into_owned(),
            error,
        });
    }

    fn forward(&mut self, event: KernelEvent<T>) {
        if self.outbox.has_room() {
            self.outbox.push_record((self.wrap)(event));
        } else {
            self.outbox.drop_record();
        }
        self.flush();
    }

    fn notice(&mut self, event: KernelEvent<T>) {
        self.outbox.push_notice((self.wrap)(event));
        self.flush();
    }

    fn flush(&mut self) {
        if !self.disconnected && self.outbox.flush(&self.tx, &self.wrap) {
            self.disconnected = true;
        }
    }

    fn exit(&self) -> Option<Exit> {
        if self.stop.load(Ordering::SeqCst) {
            Some(Exit::Stopped)
        } else if self.disconnected {
            Some(Exit::Disconnected)
        } else {
            None
        }
    }

    /// The reader is ending (`Unavailable`, `GaveUp`): hand on what is held, waiting for room
    /// as long as it takes, but never past a stop.
    fn deliver_last(&mut self) {
        // A block the classifier holds is decided now: nothing more will complete it.
        if self.classify.deadline().is_some() {
            let mut out = Vec::new();
            self.classify.due(far_future(), &mut out);
            self.hand_on(out);
        }
        loop {
            self.flush();
            if self.outbox.is_empty() || self.disconnected || self.wait(RETRY) {
                return;
            }
        }
    }

    /// Sleeps up to `pause`, or until stopped; true when stopped.
    fn wait(&self, pause: Duration) -> bool {
        if self.stop.load(Ordering::SeqCst) {
            return true;
        }
        let mut fds = [PollFd::new(self.wake.as_fd(), PollFlags::POLLIN)];
        // Woken early or interrupted: the flag decides either way.
        let _ = poll(&mut fds, poll_timeout(pause));
        self.stop.load(Ordering::SeqCst)
    }
}

fn poll_timeout(d: Duration) -> PollTimeout {
    PollTimeout::from(u16::try_from(d.as_millis()).unwrap_or(u16::MAX))
}

/// A time past any deadline a classifier can set.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}

/// Like [`poll_timeout`], rounding up: a deadline a fraction of a millisecond away must not
/// become a busy loop of zero-length polls.
fn poll_timeout_ceil(d: Duration) -> PollTimeout {
    poll_timeout(d.saturating_add(Duration::from_micros(999)))
}

/// Records the sequence number of a record just read; returns the loss it reveals, if any:
/// `Some(Some(n))` for a gap of `n`, `Some(None)` for an overrun before any record was read.
fn gap(progress: &mut Progress, seq: u64) -> Option<Option<u64>> {
    let lost = match progress.last_seq {
        Some(last) if seq > last.saturating_add(1) => Some(Some(seq - last - 1)),
        None if progress.overrun => Some(None),
        _ => None,
    };
    progress.last_seq = Some(seq);
    progress.overrun = false;
    lost
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Events waiting for room in the channel, already wrapped, in order.
struct Outbox<E> {
    queue: VecDeque<Slot<E>>,
    /// Records among the queued slots.
    records: usize,
    cap: usize,
}

enum Slot<E> {
    Event {
        event: E,
        record: bool,
    },
    /// Records dropped here for lack of room; wrapped into an event when its turn comes.
    Dropped(u64),
    /// Records lost here (see [`KernelEvent::Lost`]), merged while the consumer is away.
    Lost(Option<u64>),
}

impl<E> Outbox<E> {
    fn new(cap: usize) -> Self {
        Outbox {
            queue: VecDeque::new(),
            records: 0,
            cap,
        }
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    fn has_room(&self) -> bool {
        self.records < self.cap
    }

    fn push_record(&mut self, event: E) {
        self.records += 1;
        self.queue.push_back(Slot::Event {
            event,
            record: true,
        });
    }

    /// Notices (unavailable, restarts) are few and each one matters: they always get a slot.
    fn push_notice(&mut self, event: E) {
        self.queue.push_back(Slot::Event {
            event,
            record: false,
        });
    }

    fn drop_record(&mut self) {
        match self.queue.back_mut() {
            Some(Slot::Dropped(n)) => *n += 1,
            _ => self.queue.push_back(Slot::Dropped(1)),
        }
    }

    /// Losses always get a slot; successive ones merge (an unknown count stays unknown), so
    /// an overrun every few seconds for as long as the consumer is away takes one slot.
    fn lost(&mut self, records: Option<u64>) {
        match self.queue.back_mut() {
            Some(Slot::Lost(n)) => *n = n.zip(records).map(|(a, b)| a.saturating_add(b)),
            _ => self.queue.push_back(Slot::Lost(records)),
        }
    }

    /// Sends what the channel takes, in order, without blocking. True when the receiver is
    /// gone.
    fn flush<T>(&mut self, tx: &SyncSender<E>, wrap: &impl Fn(KernelEvent<T>) -> E) -> bool {
        while let Some(slot) = self.queue.pop_front() {
            let (event, record) = match slot {
                Slot::Event { event, record } => (event, record),
                Slot::Dropped(records) => (wrap(KernelEvent::Dropped { records }), false),
                Slot::Lost(records) => (wrap(KernelEvent::Lost { records }), false),
            };
            match tx.try_send(event) {
                Ok(()) => {
                    if record {
                        self.records -= 1;
                    }
                }
                Err(TrySendError::Full(event)) => {
                    self.queue.push_front(Slot::Event { event, record });
                    return false;
                }
                Err(TrySendError::Disconnected(_)) => {
                    self.queue.clear();
                    self.records = 0;
                    return true;
                }
            }
        }
        false
    }
}

/// The whole kernel log buffer, read once.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Backlog {
    /// Every record in the buffer, oldest first.
    pub records: Vec<Record>,
    /// Records overwritten while they were being read (a gap in sequence numbers).
    pub lost: u64,
    /// Records that could not be parsed, with why.
    pub malformed: Vec<(String, String)>,
}

/// Reads the whole buffer once (for `gpuwarden scan --kernel`): every record still in the
/// kernel's ring buffer, or every record of a file. Reads `/dev/kmsg` non-blocking until it
/// has nothing more (`EAGAIN`), with the same parser as the follower.
pub fn read_all(source: &KernelSource) -> Result<Backlog, KernelError> {
    let path = source.path().to_path_buf();
    let mut backlog = Backlog::default();
    let mut progress = Progress::default();
    let add = |backlog: &mut Backlog, progress: &mut Progress, raw: &[u8]| match parse_record(raw) {
        Ok(record) => {
            if let Some(Some(n)) = gap(progress, record.seq) {
                backlog.lost += n;
            }
            backlog.records.push(record);
        }
        Err(e) => backlog.malformed.push(malformed_entry(raw, &e)),
    };
    match source {
        KernelSource::Noop => {}
        KernelSource::Kmsg(_) => {
            // Opened without seeking: the position is the oldest record in the buffer.
            let mut file = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path)
                .map_err(|source| KernelError::Open {
                    path: path.clone(),
                    source,
                })?;
            let mut buf = vec![0u8; READ_BUF];
            while backlog.records.len() < MAX_BACKLOG {
                match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => add(&mut backlog, &mut progress, &buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.raw_os_error() == Some(libc::EPIPE) => progress.overrun = true,
                    Err(source) => return Err(KernelError::Read { path, source }),
                }
            }
        }
        KernelSource::File { .. } => {
            let bytes = std::fs::read(&path).map_err(|source| KernelError::Open {
                path: path.clone(),
                source,
            })?;
            let mut lines = FileRecords::new(0);
            let mut pieces = Vec::new();
            lines.feed(&bytes, &mut |p| pieces.push(p));
            lines.finish(&mut |p| pieces.push(p));
            for piece in pieces {
                match piece {
                    Piece::Record { raw, .. } => add(&mut backlog, &mut progress, &raw),
                    Piece::Bad { line, why, .. } => {
                        let shown = &line[..line.len().min(SHOWN)];
                        backlog
                            .malformed
                            .push((String::from_utf8_lossy(shown).into_owned(), why));
                    }
                }
            }
        }
    }
    Ok(backlog)
}

fn malformed_entry(raw: &[u8], e: &ParseError) -> (String, String) {
    let shown = &raw[..raw.len().min(SHOWN)];
    (String::from_utf8_lossy(shown).into_owned(), e.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::mpsc::{Receiver, sync_channel};
    use std::thread;

    type Ev = KernelEvent<Record>;

    /// A kernel log file holding `text` in a fresh directory (kept alive by the `TempDir`), and
    /// the source that follows it.
    fn kmsg_file(from_start: bool, text: &str) -> (tempfile::TempDir, PathBuf, KernelSource) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmsg.txt");
        append(&path, text);
        let source = KernelSource::File {
            path: path.clone(),
            from_start,
        };
        (dir, path, source)
    }

    fn append(path: &Path, text: &str) {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    fn next(rx: &Receiver<Ev>) -> Ev {
        rx.recv_timeout(Duration::from_secs(10))
            .expect("an event within 10 s")
    }

    fn message(ev: &Ev) -> String {
        match ev {
            KernelEvent::Record(r) => r.text().into_owned(),
            other => panic!("expected a record, got {other:?}"),
        }
    }

    fn start(config: FollowConfig, capacity: usize) -> (Follower, Receiver<Ev>) {
        let (tx, rx) = sync_channel(capacity);
        let f = follow(config, Some, tx, |e| e).unwrap();
        (f, rx)
    }

    #[test]
    fn tails_a_file_from_its_end_with_dictionaries() {
        let (_dir, path, source) = kmsg_file(false, "6,1,10,-;old boot line\n");
        let (follower, rx) = start(FollowConfig::new(source), 64);
        append(
            &path,
            "3,2,20,-;amdgpu 0000:03:00.0: amdgpu: [gfxhub] page fault\n SUBSYSTEM=pci\n DEVICE=+pci:0000:03:00.0\n12,3,30,-;trainer: step 10\n",
        );
        let ev = next(&rx);
        let KernelEvent::Record(r) = &ev else {
            panic!("{ev:?}")
        };
        assert_eq!(r.seq, 2);
        assert_eq!(r.dict_value("DEVICE"), Some("+pci:0000:03:00.0"));
        let ev = next(&rx);
        assert_eq!(message(&ev), "trainer: step 10");
        let KernelEvent::Record(r) = ev else { panic!() };
        assert_eq!((r.facility, r.level), (1, 4));
        follower.stop();
        assert!(rx.try_recv().is_err(), "the old line was never replayed");
    }

    #[test]
    fn a_record_whose_dictionary_comes_later_waits_for_it() {
        let (_dir, path, source) = kmsg_file(true, "3,5,20,-;page fault\n");
        let (follower, rx) = start(FollowConfig::new(source), 64);
        // Within the quiet interval the record is still open, so a dictionary line written
        // right after still belongs to it.
        append(&path, " DEVICE=+pci:0000:03:00.0\n");
        let KernelEvent::Record(r) = next(&rx) else {
            panic!()
        };
        assert_eq!(r.dict_value("DEVICE"), Some("+pci:0000:03:00.0"));
        follower.stop();
    }

    #[test]
    fn reads_from_the_start_when_asked_and_reports_gaps_and_bad_lines() {
        let (_dir, _path, source) = kmsg_file(
            true,
            " SUBSYSTEM=orphan\n6,1,10,-;one\n6,2,11,-;two\nnot a record\n6,7,12,-;seven\n",
        );
        let (follower, rx) = start(FollowConfig::new(source), 64);
        assert!(
            matches!(next(&rx), KernelEvent::Malformed { error, .. } if error.contains("dictionary line without a record"))
        );
        assert_eq!(message(&next(&rx)), "one");
        assert_eq!(message(&next(&rx)), "two");
        assert!(matches!(next(&rx), KernelEvent::Malformed { raw, .. } if raw == "not a record"));
        assert_eq!(next(&rx), KernelEvent::Lost { records: Some(4) });
        assert_eq!(message(&next(&rx)), "seven");
        follower.stop();
    }

    /// Holds each record until the next one or its deadline, like a block waiting for its
    /// process line.
    struct HoldOne {
        held: Option<(u64, Instant)>,
        hold: Duration,
    }

    impl Classify<u64> for HoldOne {
        fn record(&mut self, record: Record, now: Instant, out: &mut Vec<Kept<u64>>) {
            out.extend(self.held.take().map(|(seq, _)| Kept::Must(seq)));
            self.held = Some((record.seq, now + self.hold));
        }
        fn deadline(&self) -> Option<Instant> {
            self.held.map(|(_, until)| until)
        }
        fn due(&mut self, now: Instant, out: &mut Vec<Kept<u64>>) {
            if self.held.is_some_and(|(_, until)| until <= now) {
                out.extend(self.held.take().map(|(seq, _)| Kept::Must(seq)));
            }
        }
    }

    #[test]
    fn a_held_record_goes_out_at_the_next_record_or_at_its_deadline() {
        let (_dir, _path, source) = kmsg_file(true, "4,1,1,-;first\n4,2,2,-;second\n");
        let (tx, rx) = sync_channel(8);
        let hold = Duration::from_millis(100);
        let started = Instant::now();
        let follower = follow(
            FollowConfig::new(source),
            HoldOne { held: None, hold },
            tx,
            |e| e,
        )
        .unwrap();
        let seq = |rx: &Receiver<KernelEvent<u64>>| match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(KernelEvent::Record(seq)) => seq,
            other => panic!("{other:?}"),
        };
        // The first goes out when the second arrives; the second, with nothing after it, at
        // its deadline and not much later.
        assert_eq!(seq(&rx), 1);
        assert_eq!(seq(&rx), 2);
        let took = started.elapsed();
        assert!(took >= hold, "released before its deadline: {took:?}");
        assert!(
            took < Duration::from_secs(2),
            "held far past its deadline: {took:?}"
        );
        follower.stop();
    }

    #[test]
    fn the_classifier_decides_what_is_forwarded() {
        let mut text = String::new();
        for i in 1..=1000 {
            let msg = if i % 100 == 0 {
                "NVRM: Xid 79"
            } else {
                "noise"
            };
            text.push_str(&format!("4,{i},{i},-;{msg} {i}\n"));
        }
        let (_dir, _path, source) = kmsg_file(true, &text);
        let (tx, rx) = sync_channel(4);
        let follower = follow(
            FollowConfig::new(source),
            |r: Record| r.text().starts_with("NVRM").then_some(r.seq),
            tx,
            |e| e,
        )
        .unwrap();
        let mut seqs = Vec::new();
        while seqs.len() < 10 {
            match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
                KernelEvent::Record(seq) => seqs.push(seq),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(seqs, (1..=10).map(|i| i * 100).collect::<Vec<_>>());
        follower.stop();
    }

    #[test]
    fn a_slow_consumer_gets_drops_counted_and_the_reader_stays_live() {
        let mut text = String::new();
        for i in 1..=5000 {
            text.push_str(&format!("6,{i},{i},-;line {i}\n"));
        }
        let (_dir, path, source) = kmsg_file(true, &text);
        let mut config = FollowConfig::new(source);
        config.held_records = 100;
        let (follower, rx) = start(config, 10);
        // Nobody reads while the file is taken in: 10 in the channel, 100 held, the rest
        // dropped and counted.
        thread::sleep(Duration::from_millis(500));
        append(&path, "6,5001,5001,-;marker\n");
        let mut delivered = 0u64;
        let mut dropped = 0u64;
        loop {
            match next(&rx) {
                KernelEvent::Record(r) if r.text() == "marker" => break,
                KernelEvent::Record(_) => delivered += 1,
                KernelEvent::Dropped { records } => dropped += records,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(delivered + dropped, 5000);
        assert_eq!(delivered, 110, "the oldest records are the ones kept");
        follower.stop();
    }

    #[test]
    fn a_panicking_classifier_is_restarted_and_said_so() {
        let (_dir, _path, source) =
            kmsg_file(true, "6,1,1,-;before\n6,2,2,-;boom\n6,3,3,-;after\n");
        let (tx, rx) = sync_channel(64);
        let follower = follow(
            FollowConfig::new(source),
            |r: Record| {
                assert!(r.text() != "boom", "classifier bug");
                Some(r)
            },
            tx,
            |e| e,
        )
        .unwrap();
        assert_eq!(message(&next(&rx)), "before");
        match next(&rx) {
            KernelEvent::Restarted { error, restarts } => {
                assert!(error.contains("panicked: classifier bug"), "{error}");
                assert_eq!(restarts, 1);
            }
            other => panic!("{other:?}"),
        }
        // The record that panicked is not replayed; the one after it comes, with no loss.
        assert_eq!(message(&next(&rx)), "after");
        follower.stop();
    }

    #[test]
    fn gives_up_after_too_many_restarts_in_the_window() {
        let (_dir, path, source) = kmsg_file(true, "6,1,1,-;boom\n");
        let mut config = FollowConfig::new(source);
        config.max_restarts = 2;
        let (tx, rx) = sync_channel(64);
        let p = path.clone();
        let follower = follow(
            config,
            move |_r: Record| -> Option<Record> {
                // The file goes away, so every reopen fails too.
                let _ = std::fs::remove_file(&p);
                panic!("classifier bug")
            },
            tx,
            |e| e,
        )
        .unwrap();
        assert!(matches!(
            next(&rx),
            KernelEvent::Restarted { restarts: 1, .. }
        ));
        assert!(
            matches!(next(&rx), KernelEvent::Restarted { restarts: 2, error } if error.contains("cannot reopen"))
        );
        assert!(
            matches!(next(&rx), KernelEvent::GaveUp { error } if error.contains("cannot reopen"))
        );
        // The thread ends by itself, and nothing more comes.
        let t0 = Instant::now();
        while follower.is_running() && t0.elapsed() < Duration::from_secs(5) {
            thread::sleep(Duration::from_millis(10));
        }
        assert!(!follower.is_running());
        follower.stop();
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_missing_source_is_unavailable_once() {
        let dir = tempfile::tempdir().unwrap();
        let source = KernelSource::Kmsg(dir.path().join("no-kmsg-here"));
        let (follower, rx) = start(FollowConfig::new(source), 4);
        match next(&rx) {
            KernelEvent::Unavailable { reason } => {
                assert!(reason.contains("no-kmsg-here"), "{reason}");
                assert!(reason.contains("no kernel log device"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        follower.stop();
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn permission_errors_tell_the_user_how_to_get_access() {
        for errno in [libc::EACCES, libc::EPERM] {
            let e = io::Error::from_raw_os_error(errno);
            assert!(is_unavailable(&e));
            assert!(open_hint(&e).contains("CAP_SYSLOG"));
        }
        assert!(!is_unavailable(&io::Error::from_raw_os_error(libc::EIO)));
    }

    #[test]
    fn stop_is_prompt_while_idle() {
        let (_dir, _path, source) = kmsg_file(false, "");
        let (follower, _rx) = start(FollowConfig::new(source), 4);
        thread::sleep(Duration::from_millis(100));
        let t0 = Instant::now();
        follower.stop();
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "{:?}",
            t0.elapsed()
        );
    }

    #[test]
    fn a_gone_receiver_ends_the_reader() {
        let (_dir, path, source) = kmsg_file(false, "");
        let (follower, rx) = start(FollowConfig::new(source), 4);
        drop(rx);
        append(&path, "6,1,1,-;anyone?\n");
        let t0 = Instant::now();
        while follower.is_running() && t0.elapsed() < Duration::from_secs(5) {
            thread::sleep(Duration::from_millis(10));
        }
        assert!(!follower.is_running());
    }

    #[test]
    fn the_noop_source_delivers_nothing() {
        let (follower, rx) = start(FollowConfig::new(KernelSource::Noop), 4);
        assert!(!follower.is_running());
        follower.stop();
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
        assert_eq!(read_all(&KernelSource::Noop).unwrap(), Backlog::default());
    }

    #[test]
    fn overruns_count_from_the_sequence_gap() {
        // An overrun before any record: lost, count unknown.
        let mut p = Progress {
            overrun: true,
            ..Progress::default()
        };
        assert_eq!(gap(&mut p, 500), Some(None));
        assert_eq!(gap(&mut p, 501), None);
        p.overrun = true;
        assert_eq!(gap(&mut p, 700), Some(Some(198)));
        // A sequence number going back (a file written twice) is not a loss.
        assert_eq!(gap(&mut p, 3), None);
        assert_eq!(gap(&mut p, 4), None);
    }

    #[test]
    fn the_outbox_keeps_order_and_merges_losses_and_drops() {
        let (tx, rx) = sync_channel::<KernelEvent<u32>>(1);
        let wrap = |e: KernelEvent<u32>| e;
        let mut out = Outbox::new(2);
        out.push_record(KernelEvent::Record(1));
        out.lost(Some(3));
        out.lost(Some(2));
        out.push_record(KernelEvent::Record(2));
        assert!(!out.has_room());
        out.drop_record();
        out.drop_record();
        out.lost(None);
        out.lost(Some(7));
        out.push_notice(KernelEvent::GaveUp { error: "x".into() });
        let mut got = Vec::new();
        for _ in 0..20 {
            assert!(!out.flush(&tx, &wrap));
            got.extend(rx.try_recv().ok());
        }
        assert!(out.is_empty());
        assert!(out.has_room());
        assert_eq!(
            got,
            vec![
                KernelEvent::Record(1),
                KernelEvent::Lost { records: Some(5) },
                KernelEvent::Record(2),
                KernelEvent::Dropped { records: 2 },
                KernelEvent::Lost { records: None },
                KernelEvent::GaveUp { error: "x".into() },
            ]
        );
        drop(rx);
        out.push_record(KernelEvent::Record(3));
        assert!(out.flush(&tx, &wrap), "a gone receiver is reported");
        assert!(out.is_empty());
    }

    #[test]
    fn a_file_of_garbage_is_bounded_like_records() {
        let (_dir, path, source) = kmsg_file(true, &"garbage\n".repeat(3000));
        let mut config = FollowConfig::new(source);
        config.held_records = 10;
        let (follower, rx) = start(config, 5);
        thread::sleep(Duration::from_millis(300));
        append(&path, "6,1,1,-;marker\n");
        let mut malformed = 0;
        let mut dropped = 0;
        loop {
            match next(&rx) {
                KernelEvent::Record(r) if r.text() == "marker" => break,
                KernelEvent::Malformed { .. } => malformed += 1,
                KernelEvent::Dropped { records } => dropped += records,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(malformed, 15);
        assert_eq!(malformed + dropped, 3000);
        follower.stop();
    }

    #[test]
    fn read_all_of_a_file_parses_every_record() {
        let (_dir, _path, source) = kmsg_file(
            true,
            "6,1,1,-;one\n SUBSYSTEM=pci\n6,2,2,-;two\ngarbage\n6,9,3,-;nine",
        );
        let b = read_all(&source).unwrap();
        assert_eq!(
            b.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 9]
        );
        assert_eq!(b.records[0].dict_value("SUBSYSTEM"), Some("pci"));
        assert_eq!(b.lost, 6);
        assert_eq!(b.malformed.len(), 1);
        assert_eq!(b.malformed[0].0, "garbage");
    }

    #[test]
    fn read_all_of_a_missing_file_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_all(&KernelSource::Kmsg(dir.path().join("nope"))).unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("cannot open the kernel log"), "{text}");
        assert!(text.contains("no kernel log device"), "{text}");
    }
}
