//! The real terminal: taken over (raw mode, alternate screen, hidden cursor) by a guard that
//! gives it back on drop and on panic, and the loop that redraws from board copies and reads
//! keys.
//!
//! Redraws come at most [`FRAME`] apart, plus one right after a key or a resize; ratatui writes
//! only the cells that changed, so a quiet screen costs little.

use std::io::{self, IsTerminal, Stdout};
use std::sync::Once;
use std::time::{Duration, Instant, SystemTime};

use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::crossterm::{cursor, execute, terminal};

use super::{Key, View, draw, key};
use crate::snapshot::Board;

/// The time between two timed redraws (four a second).
pub const FRAME: Duration = Duration::from_millis(250);

/// The shortest time between two redraws, keys and resizes included: a held key or a window
/// being dragged does not redraw more than ten times a second.
const MIN_FRAME: Duration = Duration::from_millis(100);

/// Why the full-screen display cannot start here, or `None` when it can: it needs a terminal on
/// both stdin (keys) and stdout (the screen).
pub fn unusable() -> Option<&'static str> {
    if !io::stdout().is_terminal() {
        Some("standard output is not a terminal")
    } else if !io::stdin().is_terminal() {
        Some("standard input is not a terminal")
    } else {
        None
    }
}

/// Gives the terminal back: raw mode off, main screen, cursor shown. Safe to call twice.
fn restore() {
    let _ = terminal::disable_raw_mode();
    let _ = execute!(io::stdout(), terminal::LeaveAlternateScreen, cursor::Show);
}

/// Restores the terminal before the panic message is printed, so it is readable and the shell
/// is usable afterwards.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
}

/// Owns the terminal while the display is up; dropping it gives the terminal back.
pub struct TerminalGuard {
    pub terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl TerminalGuard {
    pub fn enter() -> io::Result<TerminalGuard> {
        install_panic_hook();
        terminal::enable_raw_mode()?;
        let taken = execute!(io::stdout(), terminal::EnterAlternateScreen, cursor::Hide)
            .and_then(|()| Terminal::new(CrosstermBackend::new(io::stdout())));
        match taken {
            Ok(terminal) => Ok(TerminalGuard { terminal }),
            Err(e) => {
                restore();
                Err(e)
            }
        }
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore();
    }
}

/// Runs the display until `q`/Ctrl-C or until `finished` says so. `on_key` hears what keys ask
/// for beyond the view itself (stopping the job); `job` says whether there is one.
pub fn run(
    board: &Board,
    mut view: View,
    job: bool,
    finished: impl Fn() -> bool,
    mut on_key: impl FnMut(Key),
) -> io::Result<()> {
    let mut guard = TerminalGuard::enter()?;
    // What the feeds showed when `p` was pressed: they stay still while GPU rows go on.
    let mut frozen = None;
    let mut due = Instant::now();
    let mut drawn = Instant::now();
    loop {
        let now = Instant::now();
        if now >= due {
            let mut snap = board.read();
            if view.paused {
                let (output, faults) =
                    frozen.get_or_insert_with(|| (snap.output.clone(), snap.faults.clone()));
                snap.output.clone_from(output);
                snap.faults.clone_from(faults);
            } else {
                frozen = None;
            }
            view.now = now;
            view.wall = SystemTime::now();
            guard.terminal.draw(|frame| draw(frame, &snap, &view))?;
            drawn = now;
            due = now + FRAME;
        }
        if finished() {
            return Ok(());
        }
        if !event::poll(due.saturating_duration_since(Instant::now()))? {
            continue;
        }
        match event::read()? {
            Event::Key(k) if k.kind != KeyEventKind::Release => {
                let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
                let c = match k.code {
                    KeyCode::Char(c) => c,
                    KeyCode::Esc => '\u{1b}',
                    _ => continue,
                };
                match key(&mut view, c, ctrl, job) {
                    Key::Quit => return Ok(()),
                    Key::Nothing => {}
                    asked => on_key(asked),
                }
                due = drawn + MIN_FRAME;
            }
            Event::Resize(..) => due = drawn + MIN_FRAME,
            _ => {}
        }
    }
}
