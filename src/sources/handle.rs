//! The one shape every source has: a named thread that turns the outside world into events, and
//! a [`Handle`] that asks it to end and waits for it.
//!
//! The output pumps, the kernel-log follower and the GPU health sampler differ only in how they
//! are asked to end (a pump ends with its pipe, the follower is woken through a pipe of its own,
//! the sampler through a condition variable) and in how long their owner may wait (a sysfs read
//! of a wedged GPU can block in the kernel for good). Both are given to [`Handle::spawn`]; the
//! rest (the "done" signal however the thread ends, a panic included, the join, the no-op
//! variant for tests and for a source that is switched off) is here once.

use std::fmt;
use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// How the owner asks the thread to end.
pub type Ask = Box<dyn Fn() + Send>;

/// How long [`Handle::stop`] waits for the thread once asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Patience {
    /// Until it ends: the thread never blocks for long (the kernel follower polls a wake pipe).
    Join,
    /// At most this long; past it the thread is left to end on its own rather than hang
    /// gpuwarden. Zero: join only a thread that is already done (an output pump whose pipe a
    /// daemon of the job still holds).
    AtMost(Duration),
}

/// A running source. Dropping it stops it too.
pub struct Handle {
    name: String,
    thread: Option<JoinHandle<()>>,
    ask: Option<Ask>,
    patience: Patience,
    done: Arc<Done>,
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("name", &self.name)
            .field("running", &self.is_running())
            .field("patience", &self.patience)
            .finish()
    }
}

impl Handle {
    /// Starts `body` on a thread called `name`. `ask` (none for a source that ends by itself)
    /// is called once by [`Handle::stop`] before it waits as `patience` says.
    pub fn spawn(
        name: impl Into<String>,
        ask: Option<Ask>,
        patience: Patience,
        body: impl FnOnce() + Send + 'static,
    ) -> io::Result<Handle> {
        let name = name.into();
        let done = Arc::new(Done::default());
        let signal = Arc::clone(&done);
        let thread = thread::Builder::new().name(name.clone()).spawn(move || {
            let _done = MarkOnDrop(signal);
            body();
        })?;
        Ok(Handle {
            name,
            thread: Some(thread),
            ask,
            patience,
            done,
        })
    }

    /// A source that is not there: nothing runs, [`Handle::stop`] returns at once. For a source
    /// switched off (`--no-kernel-log`) and for tests.
    pub fn noop(name: impl Into<String>) -> Handle {
        let done = Arc::new(Done::default());
        done.mark();
        Handle {
            name: name.into(),
            thread: None,
            ask: None,
            patience: Patience::Join,
            done,
        }
    }

    /// The thread's name (`kernel-log`, `gpu-health`, `output-stdout`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the thread is still running.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Asks the thread to end and waits for it as its [`Patience`] says.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if let Some(ask) = self.ask.take() {
            ask();
        }
        let ended = match self.patience {
            Patience::Join => true,
            Patience::AtMost(limit) => self.done.wait(limit),
        };
        if ended && let Some(thread) = self.thread.take() {
            // A source catches and reports its own troubles; a join error (a panic) carries
            // nothing more to report.
            let _ = thread.join();
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The thread's "I am done", however it ends.
#[derive(Debug, Default)]
struct Done {
    flag: Mutex<bool>,
    cvar: Condvar,
}

impl Done {
    fn mark(&self) {
        *self.flag.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cvar.notify_all();
    }

    /// Waits up to `limit` for the thread to be done; true when it is.
    fn wait(&self, limit: Duration) -> bool {
        let guard = self.flag.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = self
            .cvar
            .wait_timeout_while(guard, limit, |done| !*done)
            .unwrap_or_else(|e| e.into_inner());
        *guard
    }
}

/// Marks the thread done when its body returns or unwinds.
struct MarkOnDrop(Arc<Done>);

impl Drop for MarkOnDrop {
    fn drop(&mut self) {
        self.0.mark();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    #[test]
    fn stop_asks_then_joins() {
        let flag = Arc::new(AtomicBool::new(false));
        let seen = Arc::clone(&flag);
        let asked = Arc::clone(&flag);
        let handle = Handle::spawn(
            "test-join",
            Some(Box::new(move || asked.store(true, Ordering::SeqCst))),
            Patience::Join,
            move || {
                while !seen.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(1));
                }
            },
        )
        .unwrap();
        assert!(handle.is_running());
        assert_eq!(handle.name(), "test-join");
        handle.stop();
        assert!(flag.load(Ordering::SeqCst));
    }

    #[test]
    fn a_thread_that_does_not_end_is_left_after_its_patience() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let handle = Handle::spawn(
            "test-stuck",
            None,
            Patience::AtMost(Duration::from_millis(50)),
            move || {
                // Blocks like a read of a wedged device, until the test lets it go.
                let _ = rx.recv();
            },
        )
        .unwrap();
        let start = Instant::now();
        handle.stop();
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(50), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
        drop(tx);
    }

    #[test]
    fn a_panicking_body_counts_as_done() {
        let handle = Handle::spawn(
            "test-panic",
            None,
            Patience::AtMost(Duration::from_secs(5)),
            || panic!("a source's bug"),
        )
        .unwrap();
        let start = Instant::now();
        handle.stop();
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn the_noop_handle_runs_nothing_and_stops_at_once() {
        let handle = Handle::noop("kernel-log");
        assert!(!handle.is_running());
        handle.stop();
    }
}
