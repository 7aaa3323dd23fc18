//! Who owns the console while `run --ui` shows the display: the job's output and gpuwarden's
//! own lines must not be written raw over the screen.
//!
//! While [`take`] is in force, the job's output pumps hand their chunks to [`job_output`]
//! (split into lines for the output pane; the pumps still log every byte), and gpuwarden's voice
//! hands its lines to [`voice`] (shown in the pane, and kept to be printed when the display
//! closes, so the terminal's scrollback still tells the run's story). [`give_back`] ends it.
//!
//! This is process-wide because the terminal is: one display at most.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::snapshot::Board;

/// A line of output longer than this is cut in the pane (the log keeps it whole).
const LINE_CAP: usize = 4096;

/// gpuwarden's lines kept for after the display, at most.
const SAID_CAP: usize = 2000;

/// Read on every chunk of the job's output: a plain load when the display is off.
static TAKEN: AtomicBool = AtomicBool::new(false);

static STATE: Mutex<Option<Console>> = Mutex::new(None);

#[derive(Debug)]
struct Console {
    board: Board,
    /// The open (unterminated) line of stdout and of stderr.
    partial: [Vec<u8>; 2],
    said: Vec<String>,
    said_dropped: usize,
}

/// The display takes the console: from now on output goes to `board`'s output tail.
pub fn take(board: &Board) {
    *STATE.lock().unwrap_or_else(PoisonError::into_inner) = Some(Console {
        board: board.clone(),
        partial: [Vec::new(), Vec::new()],
        said: Vec::new(),
        said_dropped: 0,
    });
    TAKEN.store(true, Ordering::SeqCst);
}

/// The display gives the console back; returns gpuwarden's lines said meanwhile, for the caller
/// to print now that the terminal is its own again.
pub fn give_back() -> Vec<String> {
    TAKEN.store(false, Ordering::SeqCst);
    let state = STATE.lock().unwrap_or_else(PoisonError::into_inner).take();
    match state {
        Some(mut console) => {
            if console.said_dropped > 0 {
                console.said.push(format!(
                    "gpuwarden: ({} more lines were shown in the display only; the journal has the facts)\n",
                    console.said_dropped
                ));
            }
            console.said
        }
        None => Vec::new(),
    }
}

/// Whether the display holds the console.
pub fn taken() -> bool {
    TAKEN.load(Ordering::Relaxed)
}

/// A chunk of the job's output. Returns false when the display does not hold the console (the
/// caller writes it to the terminal as usual).
pub fn job_output(stderr: bool, bytes: &[u8]) -> bool {
    if !taken() {
        return false;
    }
    let mut state = STATE.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(console) = state.as_mut() else {
        return false;
    };
    let board = console.board.clone();
    let partial = &mut console.partial[usize::from(stderr)];
    let mut lines = Vec::new();
    for piece in bytes.split_inclusive(|&b| b == b'\n') {
        let (body, ended) = match piece.strip_suffix(b"\n") {
            Some(body) => (body, true),
            None => (piece, false),
        };
        // A carriage return redraws the line (progress bars): keep what follows the last one.
        match memchr::memrchr(b'\r', body) {
            Some(i) => {
                partial.clear();
                partial.extend_from_slice(&body[i + 1..]);
            }
            None => {
                let room = LINE_CAP.saturating_sub(partial.len());
                partial.extend_from_slice(&body[..body.len().min(room)]);
            }
        }
        if ended {
            lines.push(std::mem::take(partial));
        }
    }
    drop(state);
    if !lines.is_empty() {
        board.update(|s| {
            for line in &lines {
                s.add_output(stderr, line);
            }
        });
    }
    true
}

/// One of gpuwarden's own lines. Returns false when the display does not hold the console.
pub fn voice(text: &str) -> bool {
    if !taken() {
        return false;
    }
    let mut state = STATE.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(console) = state.as_mut() else {
        return false;
    };
    if console.said.len() < SAID_CAP {
        console.said.push(text.to_string());
    } else {
        console.said_dropped += 1;
    }
    let board = console.board.clone();
    drop(state);
    board.update(|s| {
        for line in text.lines() {
            s.add_output(true, line.as_bytes());
        }
    });
    true
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// One test for the whole module: the state is process-wide.
    #[test]
    fn lines_go_to_the_board_while_taken_and_voice_lines_come_back() {
        assert!(!job_output(false, b"not taken\n"));
        let board = Board::new();
        take(&board);
        assert!(job_output(false, b"step 1\nstep"));
        assert!(job_output(false, b" 2\n"));
        assert!(job_output(true, b"10%\r50%\r100%\n"));
        assert!(voice("gpuwarden: attempt 1 started\n"));
        let said = give_back();
        assert!(!job_output(false, b"after\n"));
        let out: Vec<(bool, String)> = board.read().output.into_iter().collect();
        assert_eq!(
            out,
            vec![
                (false, "step 1".to_string()),
                (false, "step 2".to_string()),
                (true, "100%".to_string()),
                (true, "gpuwarden: attempt 1 started".to_string()),
            ]
        );
        assert_eq!(said, vec!["gpuwarden: attempt 1 started\n".to_string()]);
    }
}
