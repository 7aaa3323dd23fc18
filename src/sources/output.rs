//! The job's stdout and stderr: passed through byte-exact, logged byte-exact, and classified line
//! by line.
//!
//! One thread per stream reads the pipe in chunks. Each chunk is first written to gpuwarden's
//! own stdout or stderr (so the user sees progress bars and partial lines as soon as the job
//! prints them), then appended to the attempt's log file, then fed to a line splitter whose
//! lines go to the rules. Only the copy used for matching is capped ([`MATCH_CAP`] bytes per
//! line): a 100 MB line without a newline passes through whole while the splitter holds at most
//! the cap. Nothing decides here: a matching line becomes an event for the supervisor.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::mpsc::SyncSender;
use std::thread;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, poll};

use crate::rules::{Fault, RuleSet, Stream};

/// Bytes of one line kept for matching. Fault messages are far shorter; what is past the cap is
/// still passed through and logged, just not matched.
pub const MATCH_CAP: usize = 8 * 1024;

const CHUNK: usize = 256 * 1024;

/// Pipe capacity asked for (the default `/proc/sys/fs/pipe-max-size` allows 1 MiB).
const PIPE_SIZE: i32 = 1024 * 1024;

/// Silence after which a pump says its pipe is empty (and says it again each time as long as
/// the silence lasts). The supervisor uses it to close an attempt whose output is held open by a
/// process outside its group, without ever dropping output a slow reader has not taken yet.
pub const IDLE_AFTER: Duration = Duration::from_secs(1);

/// What a pump reports.
#[derive(Debug)]
pub enum OutputEvent {
    Fault(Fault),
    /// The pipe was seen empty at `at` after [`IDLE_AFTER`] without data: everything written
    /// before `at` has been passed through, logged and classified (and its faults sent first).
    Idle {
        at: Instant,
    },
    /// End of file: every process holding the pipe has closed it.
    Closed,
    /// Writing the log failed; pass-through goes on, but the user must know.
    LogFailed(io::Error),
}

/// Splits a byte stream into lines for matching, keeping at most [`MATCH_CAP`] bytes of a line.
/// A carriage return also ends a line, so a fault printed after a `\r` progress bar is seen.
#[derive(Debug, Default)]
pub struct LineSplitter {
    line: Vec<u8>,
}

impl LineSplitter {
    /// Feeds a chunk; calls `on_line` with each complete line (without its terminator).
    pub fn feed(&mut self, mut chunk: &[u8], mut on_line: impl FnMut(&[u8])) {
        while let Some(i) = memchr::memchr2(b'\n', b'\r', chunk) {
            self.push(&chunk[..i]);
            if !self.line.is_empty() {
                on_line(&self.line);
            }
            self.line.clear();
            chunk = &chunk[i + 1..];
        }
        self.push(chunk);
    }

    /// The last line when the stream ends without a newline.
    pub fn finish(&mut self, mut on_line: impl FnMut(&[u8])) {
        if !self.line.is_empty() {
            on_line(&self.line);
        }
        self.line.clear();
    }

    fn push(&mut self, bytes: &[u8]) {
        let room = MATCH_CAP.saturating_sub(self.line.len());
        self.line.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

/// Starts the pump of one stream of one attempt: the job's stdout goes to gpuwarden's stdout,
/// anything else to its stderr. `wrap` turns an [`OutputEvent`] into the executor's event type.
pub fn spawn<R, E, F>(
    mut pipe: R,
    stream: Stream,
    mut log: File,
    rules: Arc<RuleSet>,
    tx: SyncSender<E>,
    wrap: F,
) -> io::Result<thread::JoinHandle<()>>
where
    R: Read + AsFd + Send + 'static,
    E: Send + 'static,
    F: Fn(OutputEvent) -> E + Send + 'static,
{
    thread::Builder::new()
        .name(format!("output-{stream}"))
        .spawn(move || {
            // A bigger pipe than the default 64 KiB: a job printing fast blocks less often, and
            // each wakeup moves more. Best effort: the limit for unprivileged users may refuse.
            let _ = nix::fcntl::fcntl(&pipe, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
            // The regex engines keep a search cache per thread, sized by the whole catalog:
            // made now, while the job starts up, not on its first fault line (milliseconds).
            rules.prepare_thread(stream);
            let mut buf = vec![0u8; CHUNK];
            let mut splitter = LineSplitter::default();
            let mut passing = true;
            let mut logging = true;
            let classify = |line: &[u8]| {
                let text = String::from_utf8_lossy(line);
                if let Some(fault) = rules.classify(stream, &text) {
                    // The receiver is gone only when the run is over.
                    let _ = tx.send(wrap(OutputEvent::Fault(fault)));
                }
            };
            let report = |e: OutputEvent| {
                let _ = tx.send(wrap(e));
            };
            let mut classify = classify;
            let idle_ms = u16::try_from(IDLE_AFTER.as_millis()).unwrap_or(u16::MAX);
            // While reads fill the buffer, data is flowing and the pipe cannot be idle: poll
            // only after a short read, which keeps the flood path at one syscall a chunk.
            let mut drained = true;
            loop {
                if drained {
                    let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
                    match poll(&mut fds, idle_ms) {
                        Ok(0) => {
                            report(OutputEvent::Idle { at: Instant::now() });
                            continue;
                        }
                        Err(nix::errno::Errno::EINTR) => continue,
                        // Readable, hung up or failed: `read` tells which.
                        Ok(_) | Err(_) => {}
                    }
                }
                let n = match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        drained = n < buf.len();
                        n
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // A read error on a pipe means it is unusable: treat it as closed.
                    Err(_) => break,
                };
                let bytes = &buf[..n];
                if passing && pass_through(stream, bytes).is_err() {
                    // Our own stdout went away (`gpuwarden run ... | head`): keep logging and
                    // watching; the job must not die of our closed pipe.
                    passing = false;
                }
                if logging && let Err(e) = log.write_all(bytes) {
                    logging = false;
                    report(OutputEvent::LogFailed(e));
                }
                splitter.feed(bytes, &mut classify);
            }
            splitter.finish(&mut classify);
            let _ = log.sync_data();
            report(OutputEvent::Closed);
        })
}

fn pass_through(stream: Stream, bytes: &[u8]) -> io::Result<()> {
    if stream == Stream::Stdout {
        let mut out = io::stdout().lock();
        out.write_all(bytes)?;
        // Stdout is line-buffered; a progress bar without a newline must show now.
        out.flush()
    } else {
        io::stderr().lock().write_all(bytes)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn lines(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, |l| out.push(l.to_vec()));
        }
        s.finish(|l| out.push(l.to_vec()));
        out
    }

    #[test]
    fn splits_across_chunks_and_on_carriage_returns() {
        assert_eq!(
            lines(&[
                b"ab",
                b"c\nde",
                b"f\r\n",
                b"10%\r20%\rMemory access fault\n",
                b"tail"
            ]),
            vec![
                b"abc".to_vec(),
                b"def".to_vec(),
                b"10%".to_vec(),
                b"20%".to_vec(),
                b"Memory access fault".to_vec(),
                b"tail".to_vec()
            ]
        );
    }

    #[test]
    fn long_lines_are_capped_for_matching_only() {
        let big = vec![b'x'; MATCH_CAP * 3];
        let got = lines(&[&big, &big, b"\nnext\n"]);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].len(), MATCH_CAP);
        assert_eq!(got[1], b"next");
    }
}
