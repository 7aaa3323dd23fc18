//! Requests a viewer (the live display's keys) hands to a running run's loop.

use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex, PoisonError};

use super::Input;

/// What the user can ask of a run besides what a signal says (keys of `run --ui`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Stop the live attempt and go on one tier down the ladder (`f`).
    ForceFallback,
}

/// Where [`Request`]s reach a run: cloned into the display before the run starts, connected
/// by [`super::run`] to its loop. Before that, and after the run, a request goes nowhere.
#[derive(Clone, Debug, Default)]
pub struct Requests(Arc<Mutex<Option<SyncSender<Input>>>>);

impl Requests {
    /// Hands `request` to the run; false when no run listens.
    pub fn send(&self, request: Request) -> bool {
        let tx = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        tx.is_some_and(|tx| tx.send(Input::Request(request)).is_ok())
    }

    pub(super) fn connect(&self, tx: SyncSender<Input>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
    }
}
