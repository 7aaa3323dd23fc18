//! gpuwarden's own voice on the console: one line at a time on stderr, never blocking the
//! event loop.

use std::io::{self, IsTerminal, Write};
use std::os::fd::AsFd;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::thread;
use std::time::{Duration, SystemTime};

/// Whether the last byte the job wrote through gpuwarden to stdout / stderr left a line open
/// (a progress bar, a message cut by a crash). gpuwarden's own lines must start at a line
/// boundary of what the terminal shows, not in the middle of the job's
/// (`Memory accesgpuwarden: fault in attempt 1`).
static OPEN_LINE: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];

/// Notes what the job's output pump just passed through (`stdout` or stderr), under that
/// stream's lock.
pub fn passed(stdout: bool, bytes: &[u8]) {
    if let Some(&last) = bytes.last() {
        let open = last != b'\n';
        if shared_console() {
            // One file: the line the terminal shows is whatever either stream wrote last.
            OPEN_LINE[0].store(open, Ordering::Relaxed);
            OPEN_LINE[1].store(open, Ordering::Relaxed);
        } else {
            OPEN_LINE[usize::from(!stdout)].store(open, Ordering::Relaxed);
        }
    }
}

/// Whether stdout and stderr are the same file (one terminal, `2>&1`): then a line the job left
/// open on stdout is open on what gpuwarden writes too.
fn shared_console() -> bool {
    static SAME: OnceLock<bool> = OnceLock::new();
    *SAME.get_or_init(|| {
        let stat = |fd: std::os::fd::BorrowedFd<'_>| nix::sys::stat::fstat(fd).ok();
        match (stat(io::stdout().as_fd()), stat(io::stderr().as_fd())) {
            (Some(a), Some(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
            _ => false,
        }
    })
}

/// Writes one of gpuwarden's lines on stderr, after a newline if the job left a line open.
fn write_line(text: &str) {
    // `run --ui`: the display holds the terminal; the line is shown there (and printed after).
    if crate::ui::console::voice(text) {
        return;
    }
    let mut err = io::stderr().lock();
    let open = OPEN_LINE[1].load(Ordering::Relaxed)
        || (shared_console() && OPEN_LINE[0].load(Ordering::Relaxed));
    if open {
        let _ = err.write_all(b"\n");
    }
    let _ = err.write_all(text.as_bytes());
    if text.ends_with('\n') {
        OPEN_LINE[1].store(false, Ordering::Relaxed);
        if shared_console() {
            OPEN_LINE[0].store(false, Ordering::Relaxed);
        }
    }
}

/// When stderr is not a terminal (nohup, a log file, journald), each line carries the time, so
/// an overnight log can be read the next morning.
fn stamp() -> String {
    static TERMINAL: OnceLock<bool> = OnceLock::new();
    if *TERMINAL.get_or_init(|| io::stderr().is_terminal()) {
        String::new()
    } else {
        format!("{} ", crate::time::rfc3339(SystemTime::now()))
    }
}

/// gpuwarden's own voice: always stderr, so stdout carries only the job's stdout.
///
/// During a run the lines go through a writer thread with a bounded queue: the job's stderr pump
/// shares the stderr lock, and when nobody reads our stderr (Ctrl-S in a terminal, `2>&1 | less`)
/// the pump blocks holding it. The event loop must not block with it, or a job that ignores
/// SIGTERM would never get its SIGKILL; a line that does not fit the queue is dropped (the
/// journal has the facts). Write errors are ignored: a closed stderr (a dropped ssh session)
/// must not stop the supervision, where `eprintln!` would panic.
pub fn say(message: &str) {
    say_raw(&format!("{}gpuwarden: {message}\n", stamp()));
}

enum Voice {
    Line(String),
    Flush(mpsc::Sender<()>),
}

static VOICE: OnceLock<SyncSender<Voice>> = OnceLock::new();

/// Like [`say`], without the `gpuwarden:` prefix (the summary table).
pub fn say_raw(text: &str) {
    match VOICE.get() {
        Some(tx) => {
            let _ = tx.try_send(Voice::Line(text.to_string()));
        }
        None => write_line(text),
    }
}

/// Starts the writer thread behind [`say`] (for a run). Failing that, `say` writes directly.
pub fn start() {
    let (tx, rx) = mpsc::sync_channel::<Voice>(256);
    let started = thread::Builder::new().name("voice".into()).spawn(move || {
        for msg in rx {
            match msg {
                Voice::Line(line) => write_line(&line),
                Voice::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
    });
    if started.is_ok() {
        let _ = VOICE.set(tx);
    }
}

/// Waits (a bounded time) until every line said so far is written.
pub fn flush() {
    if let Some(tx) = VOICE.get() {
        let (done, wait) = mpsc::channel();
        if tx.send(Voice::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(Duration::from_secs(2));
        }
    }
}
