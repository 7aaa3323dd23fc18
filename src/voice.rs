//! gpuwarden's own voice on the console: one line at a time on stderr, never blocking the
//! event loop.

use std::io::{self, Write};
use std::sync::OnceLock;
use std::sync::mpsc::{self, SyncSender};
use std::thread;
use std::time::Duration;

/// gpuwarden's own voice: always stderr, so stdout carries only the job's stdout.
///
/// During a run the lines go through a writer thread with a bounded queue: the job's stderr pump
/// shares the stderr lock, and when nobody reads our stderr (Ctrl-S in a terminal, `2>&1 | less`)
/// the pump blocks holding it. The event loop must not block with it, or a job that ignores
/// SIGTERM would never get its SIGKILL; a line that does not fit the queue is dropped (the
/// journal has the facts). Write errors are ignored: a closed stderr (a dropped ssh session)
/// must not stop the supervision, where `eprintln!` would panic.
pub fn say(message: &str) {
    say_raw(&format!("gpuwarden: {message}\n"));
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
        None => {
            let _ = io::stderr().lock().write_all(text.as_bytes());
        }
    }
}

/// Starts the writer thread behind [`say`] (for a run). Failing that, `say` writes directly.
pub fn start() {
    let (tx, rx) = mpsc::sync_channel::<Voice>(256);
    let started = thread::Builder::new().name("voice".into()).spawn(move || {
        for msg in rx {
            match msg {
                Voice::Line(line) => {
                    let _ = io::stderr().lock().write_all(line.as_bytes());
                }
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
