//! gpuwarden's own voice on the console: one line at a time on stderr, never blocking the
//! event loop; in colour where stderr is a terminal (never with `NO_COLOR`); commands quoted so
//! they can be copied back into a shell, and paths as seen from where the user stands.

use std::borrow::Cow;
use std::ffi::OsString;
use std::io::{self, IsTerminal, Write};
use std::os::fd::AsFd;
use std::path::Path;
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
    if stderr_is_terminal() {
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
    // Not while the live display holds the terminal: its pane shows text, not escape codes.
    let colour = colour() && !crate::ui::console::taken();
    let prefix = paint(colour, Tone::Name, "gpuwarden:");
    let message = match tone_of(message) {
        Some(tone) => paint(colour, tone, message),
        None => Cow::Borrowed(message),
    };
    say_raw(&format!("{}{prefix} {message}\n", stamp()));
}

fn stderr_is_terminal() -> bool {
    static TERMINAL: OnceLock<bool> = OnceLock::new();
    *TERMINAL.get_or_init(|| io::stderr().is_terminal())
}

/// Whether gpuwarden's lines are coloured: stderr is a terminal and `NO_COLOR` is unset or
/// empty (<https://no-color.org>). A log file or a pipe never gets escape codes.
pub fn colour() -> bool {
    static COLOUR: OnceLock<bool> = OnceLock::new();
    *COLOUR.get_or_init(|| {
        colour_wanted(
            stderr_is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        )
    })
}

fn colour_wanted(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// What a line is, for its colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tone {
    /// The `gpuwarden:` prefix: bold, so gpuwarden's lines stand out among the job's.
    Name,
    /// A fault acted on, giving up: red.
    Bad,
    /// A stop, a restart, a warning: yellow.
    Caution,
    /// The job finished: green.
    Good,
}

/// Wraps `text` in the escape codes of `tone` when `colour` is on.
pub fn paint(colour: bool, tone: Tone, text: &str) -> Cow<'_, str> {
    if !colour {
        return Cow::Borrowed(text);
    }
    let code = match tone {
        Tone::Name => "1",
        Tone::Bad => "1;31",
        Tone::Caution => "33",
        Tone::Good => "32",
    };
    Cow::Owned(format!("\x1b[{code}m{text}\x1b[0m"))
}

/// The tone of one of gpuwarden's messages, by how it opens. The supervisor speaks in plain
/// strings (it does no I/O and knows nothing of terminals); these openings are its vocabulary.
fn tone_of(message: &str) -> Option<Tone> {
    const BAD: [&str; 3] = ["fault in attempt", "gave up", "giving up"];
    const CAUTION: [&str; 6] = [
        "stopping",
        "warning",
        "cannot",
        "could not",
        "restarting",
        "falling back",
    ];
    if BAD.iter().any(|p| message.starts_with(p)) {
        Some(Tone::Bad)
    } else if CAUTION.iter().any(|p| message.starts_with(p)) || message.contains("): restarting") {
        Some(Tone::Caution)
    } else if message.starts_with("the job finished") {
        Some(Tone::Good)
    } else {
        None
    }
}

/// The job as the console names it: the command, quoted; the demo's job (gpuwarden running
/// itself as `__demo-job`, an internal subcommand) by what it is.
pub fn job_line(command: &[OsString]) -> String {
    if command.get(1).is_some_and(|w| w == "__demo-job") {
        "the demo's training job (a small EEG model on synthetic data)".to_string()
    } else {
        shell_line(command)
    }
}

/// A command line as a POSIX shell reads it back: words with nothing special stay as they are,
/// others go in single quotes (a `'` inside as `'\''`). Placeholders (`{device}`) stay bare:
/// a brace without a comma or `..` inside is not expanded by any shell.
pub fn shell_line(words: &[OsString]) -> String {
    words
        .iter()
        .map(|w| shell_word(&w.to_string_lossy()).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn shell_word(word: &str) -> Cow<'_, str> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./:=@%+,".contains(c);
    let braces_safe = !word.contains(',') && !word.contains("..");
    if !word.is_empty()
        && word
            .chars()
            .all(|c| plain(c) || (braces_safe && (c == '{' || c == '}')))
    {
        Cow::Borrowed(word)
    } else {
        Cow::Owned(format!("'{}'", word.replace('\'', "'\\''")))
    }
}

/// A path as the user would write it from the directory gpuwarden was started in: relative
/// when it lies under it (`gpuwarden-runs/20261205T105616Z`), else as it is.
pub fn shown_path(path: &Path) -> String {
    static CWD: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    let cwd = CWD.get_or_init(|| std::env::current_dir().ok());
    relative_to(path, cwd.as_deref())
}

fn relative_to(path: &Path, cwd: Option<&Path>) -> String {
    match cwd.and_then(|c| path.strip_prefix(c).ok()) {
        Some(rest) if !rest.as_os_str().is_empty() => rest.display().to_string(),
        _ => path.display().to_string(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_quoted_so_they_can_be_pasted_back() {
        let words: Vec<OsString> = [
            "python3",
            "train.py",
            "--device",
            "{device}",
            "--resume",
            "{checkpoint}",
            "--name",
            "my run; rm -rf x",
            "--it's",
            "",
            "{a,b}",
            "--lr=3e-4",
        ]
        .map(OsString::from)
        .to_vec();
        assert_eq!(
            shell_line(&words),
            "python3 train.py --device {device} --resume {checkpoint} --name 'my run; rm -rf x' \
             '--it'\\''s' '' '{a,b}' --lr=3e-4"
        );
    }

    #[test]
    fn paths_under_the_current_directory_are_shown_relative() {
        let cwd = Path::new("/home/me/job");
        assert_eq!(
            relative_to(Path::new("/home/me/job/gpuwarden-runs/x"), Some(cwd)),
            "gpuwarden-runs/x"
        );
        assert_eq!(
            relative_to(Path::new("/data/ckpt/a.pt"), Some(cwd)),
            "/data/ckpt/a.pt"
        );
        assert_eq!(relative_to(cwd, Some(cwd)), "/home/me/job");
        assert_eq!(relative_to(Path::new("rel/x"), None), "rel/x");
    }

    #[test]
    fn colour_only_on_a_terminal_and_never_with_no_color() {
        use std::ffi::OsStr;
        assert!(colour_wanted(true, None));
        assert!(colour_wanted(true, Some(OsStr::new(""))));
        assert!(!colour_wanted(true, Some(OsStr::new("1"))));
        assert!(!colour_wanted(false, None));
        assert_eq!(paint(false, Tone::Bad, "x"), "x");
        assert_eq!(paint(true, Tone::Bad, "x"), "\x1b[1;31mx\x1b[0m");
        assert_eq!(tone_of("fault in attempt 1: gpu_hang"), Some(Tone::Bad));
        assert_eq!(
            tone_of("gpu_memory_fault (x): restarting as attempt 2 on tier `cpu` in 1.0s"),
            Some(Tone::Caution)
        );
        assert_eq!(
            tone_of("the job finished after 2 attempts"),
            Some(Tone::Good)
        );
        assert_eq!(tone_of("attempt 2 on tier `cpu`"), None);
    }
}
