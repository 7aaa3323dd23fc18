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
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, poll};

use super::handle::{Handle, Patience};
use crate::rules::{Fault, RuleSet, Stream};

/// Bytes of one line matched at a time. A longer line (progress dots with the fault at their
/// end) is matched in windows of this size, each starting [`OVERLAP`] bytes before the previous
/// one ended: every byte of the line is seen, in bounded memory, however long the line.
pub const MATCH_CAP: usize = 8 * 1024;

/// How much of a window is seen again at the start of the next: a fault message shorter than
/// this that straddles a window's edge is still seen whole.
pub const OVERLAP: usize = 1024;

const CHUNK: usize = 256 * 1024;

/// The most often a pump reports [`OutputEvent::Progress`]. It is also how late the supervisor
/// may learn of the last output, so it must stay well below the shortest stall timeout a user
/// may give (a learned one can be 1 s): at 1 s, a job printing every 100 ms under a 1 s timeout
/// was stopped as stalled mid-stream (benches/supervisor.rs `stall`). Ten events a second per
/// stream cost the loop nothing measurable, a flood included.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(100);

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
    /// New output arrived at `at`: the job is alive. Sent at most once per
    /// [`PROGRESS_EVERY`]; output held back by that limit is reported as soon as the limit
    /// allows, so the supervisor always learns the time of the last output within
    /// [`PROGRESS_EVERY`].
    Progress {
        at: Instant,
    },
    /// End of file: every process holding the pipe has closed it.
    Closed,
    /// Writing the log failed; pass-through goes on, but the user must know.
    LogFailed(io::Error),
    /// With a heartbeat regex: the median time between two heartbeat lines, over `heartbeats`
    /// of them. Sent once, after [`STEP_SAMPLE`] heartbeats (or at the end, with at least two).
    StepInterval {
        heartbeats: u64,
        median: Duration,
    },
}

/// Heartbeats after which the step interval is reported.
pub const STEP_SAMPLE: usize = 10;

/// Times heartbeat lines until the step interval is known.
#[derive(Debug, Default)]
struct Steps {
    times: Vec<Instant>,
    reported: bool,
}

impl Steps {
    /// Notes a heartbeat at `now`; answers the interval when it is time to report it (`end`:
    /// the stream is over, report what there is).
    fn beat(&mut self, now: Option<Instant>, end: bool) -> Option<OutputEvent> {
        if self.reported {
            return None;
        }
        self.times.extend(now);
        if self.times.len() < 2 || (!end && self.times.len() < STEP_SAMPLE) {
            return None;
        }
        self.reported = true;
        let mut gaps: Vec<Duration> = self.times.windows(2).map(|w| w[1] - w[0]).collect();
        gaps.sort_unstable();
        Some(OutputEvent::StepInterval {
            heartbeats: self.times.len() as u64,
            median: gaps[gaps.len() / 2],
        })
    }
}

/// Splits a byte stream into lines for matching, holding at most [`MATCH_CAP`] bytes: a longer
/// line is handed on in overlapping windows. A carriage return also ends a line, so a fault
/// printed after a `\r` progress bar is seen.
///
/// `on_line` returns whether it found a fault: a window with one is not seen again in part by
/// the next (one fault, one report).
#[derive(Debug, Default)]
pub struct LineSplitter {
    line: Vec<u8>,
    /// Bytes of `line` not yet seen by `on_line` (all of it unless a window was handed on).
    fresh: usize,
}

impl LineSplitter {
    /// Feeds a chunk; calls `on_line` with each complete line (without its terminator) and
    /// each full window of a long one.
    pub fn feed(&mut self, mut chunk: &[u8], mut on_line: impl FnMut(&[u8]) -> bool) {
        while let Some(i) = memchr::memchr2(b'\n', b'\r', chunk) {
            self.push(&chunk[..i], &mut on_line);
            self.end_line(&mut on_line);
            chunk = &chunk[i + 1..];
        }
        self.push(chunk, &mut on_line);
    }

    /// The last line when the stream ends without a newline.
    pub fn finish(&mut self, mut on_line: impl FnMut(&[u8]) -> bool) {
        self.end_line(&mut on_line);
    }

    fn end_line(&mut self, on_line: &mut impl FnMut(&[u8]) -> bool) {
        if self.fresh > 0 {
            on_line(&self.line);
        }
        self.line.clear();
        self.fresh = 0;
    }

    fn push(&mut self, mut bytes: &[u8], on_line: &mut impl FnMut(&[u8]) -> bool) {
        while !bytes.is_empty() {
            let take = (MATCH_CAP - self.line.len()).min(bytes.len());
            self.line.extend_from_slice(&bytes[..take]);
            self.fresh += take;
            bytes = &bytes[take..];
            if self.line.len() == MATCH_CAP {
                if on_line(&self.line) {
                    self.line.clear();
                } else {
                    self.line.drain(..MATCH_CAP - OVERLAP);
                }
                self.fresh = 0;
            }
        }
    }
}

/// Starts the pump of one stream of one attempt: the job's stdout goes to gpuwarden's stdout,
/// anything else to its stderr. `wrap` turns an [`OutputEvent`] into the executor's event type.
/// `heartbeat` (`--progress`) is the regex of the lines that count as progress; without it,
/// any output does.
pub fn spawn<R, E, F>(
    mut pipe: R,
    stream: Stream,
    mut log: File,
    rules: Arc<RuleSet>,
    heartbeat: Option<regex::Regex>,
    tx: SyncSender<E>,
    wrap: F,
) -> io::Result<Handle>
where
    R: Read + AsFd + Send + 'static,
    E: Send + 'static,
    F: Fn(OutputEvent) -> E + Send + 'static,
{
    // Nothing to ask: a pump ends when the last writer of its pipe closes it. That can be a
    // daemon the job left behind, so stopping the handle never waits for an unfinished pump.
    Handle::spawn(
        format!("output-{stream}"),
        None,
        Patience::AtMost(Duration::ZERO),
        move || {
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
            // Whether a heartbeat line came in the chunk just fed (always, without a regex).
            let beat = std::cell::Cell::new(false);
            let classify = |line: &[u8]| {
                let text = String::from_utf8_lossy(line);
                if heartbeat.as_ref().is_some_and(|re| re.is_match(&text)) {
                    beat.set(true);
                }
                let Some(fault) = rules.classify(stream, &text) else {
                    return false;
                };
                // The receiver is gone only when the run is over.
                let _ = tx.send(wrap(OutputEvent::Fault(fault)));
                true
            };
            let report = |e: OutputEvent| {
                let _ = tx.send(wrap(e));
            };
            let mut classify = classify;
            let idle_ms = u16::try_from(IDLE_AFTER.as_millis()).unwrap_or(u16::MAX);
            // While reads fill the buffer, data is flowing and the pipe cannot be idle: poll
            // only after a short read, which keeps the flood path at one syscall a chunk.
            let mut drained = true;
            // Progress: when it was last reported, and output since then not yet reported.
            let mut progress_sent: Option<Instant> = None;
            let mut progress_held: Option<Instant> = None;
            let mut steps = Steps::default();
            loop {
                if drained {
                    // Held progress is due when the limit allows: wake for it then, not only
                    // when the pipe has been quiet for IDLE_AFTER.
                    let flush_in = progress_held.and(progress_sent).map(|sent| {
                        PROGRESS_EVERY
                            .saturating_sub(Instant::now().saturating_duration_since(sent))
                    });
                    let wait_ms = match flush_in {
                        Some(d) => u16::try_from(d.as_millis()).unwrap_or(idle_ms).min(idle_ms),
                        None => idle_ms,
                    };
                    let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
                    match poll(&mut fds, wait_ms) {
                        Ok(0) if flush_in.is_some() => {
                            if let Some(at) = progress_held.take() {
                                progress_sent = Some(Instant::now());
                                report(OutputEvent::Progress { at });
                            }
                            continue;
                        }
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
                if heartbeat.is_some() && !beat.replace(false) {
                    continue;
                }
                // After the pass-through: the terminal must never wait for the supervisor.
                let now = Instant::now();
                if heartbeat.is_some()
                    && let Some(interval) = steps.beat(Some(now), false)
                {
                    report(interval);
                }
                if progress_sent.is_none_or(|t| now.saturating_duration_since(t) >= PROGRESS_EVERY)
                {
                    progress_sent = Some(now);
                    progress_held = None;
                    report(OutputEvent::Progress { at: now });
                } else {
                    progress_held = Some(now);
                }
            }
            splitter.finish(&mut classify);
            if let Some(interval) = steps.beat(None, true) {
                report(interval);
            }
            let _ = log.sync_data();
            report(OutputEvent::Closed);
        },
    )
}

fn pass_through(stream: Stream, bytes: &[u8]) -> io::Result<()> {
    // `run --ui`: the display's output pane shows it instead (the log still gets every byte).
    if crate::ui::console::job_output(stream != Stream::Stdout, bytes) {
        return Ok(());
    }
    if stream == Stream::Stdout {
        let mut out = io::stdout().lock();
        out.write_all(bytes)?;
        crate::voice::passed(true, bytes);
        // Stdout is line-buffered; a progress bar without a newline must show now.
        out.flush()
    } else {
        let mut err = io::stderr().lock();
        err.write_all(bytes)?;
        crate::voice::passed(false, bytes);
        Ok(())
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
            s.feed(c, |l| {
                out.push(l.to_vec());
                false
            });
        }
        s.finish(|l| {
            out.push(l.to_vec());
            false
        });
        out
    }

    #[test]
    fn the_step_interval_is_the_median_gap_reported_once() {
        let t0 = Instant::now();
        let mut steps = Steps::default();
        let ms = |n: u64| Some(t0 + Duration::from_millis(n));
        // One slow step (an evaluation) does not move the median.
        for (i, at) in [0, 100, 200, 2200, 2300].into_iter().enumerate() {
            assert!(steps.beat(ms(at), false).is_none(), "beat {i}");
        }
        for at in [2400, 2500, 2600, 2700] {
            assert!(steps.beat(ms(at), false).is_none());
        }
        match steps.beat(ms(2800), false) {
            Some(OutputEvent::StepInterval { heartbeats, median }) => {
                assert_eq!(heartbeats, STEP_SAMPLE as u64);
                assert_eq!(median, Duration::from_millis(100));
            }
            other => panic!("{other:?}"),
        }
        assert!(steps.beat(ms(2900), true).is_none());
        // A short attempt reports what it has at its end.
        let mut short = Steps::default();
        short.beat(ms(0), false);
        short.beat(ms(300), false);
        assert!(matches!(
            short.beat(None, true),
            Some(OutputEvent::StepInterval { heartbeats: 2, .. })
        ));
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
    fn a_long_line_is_matched_whole_in_overlapping_windows_of_bounded_size() {
        // Issue 9.3: 9,000 progress dots, then the fault on the same line.
        let fault = b"Memory access fault by GPU node-1 (Agent handle: 0x1) on address 0x1000.";
        let mut line = vec![b'.'; 9000];
        line.extend_from_slice(fault);
        line.push(b'\n');
        let got = lines(&[&line, b"next\n"]);
        assert!(got.iter().all(|l| l.len() <= MATCH_CAP));
        assert!(
            got.iter()
                .any(|l| l.windows(fault.len()).any(|w| w == fault))
        );
        assert_eq!(got.last().unwrap(), b"next");
    }

    #[test]
    fn a_message_across_a_window_edge_is_seen_whole() {
        let fault = b"hipErrorInvalidDeviceFunction";
        for cut in [1, 10, fault.len() - 1] {
            let mut line = vec![b'.'; MATCH_CAP - cut];
            line.extend_from_slice(fault);
            line.extend(vec![b'.'; 3 * MATCH_CAP]);
            let got = lines(&[&line]);
            let seen = got
                .iter()
                .filter(|l| l.windows(fault.len()).any(|w| w == fault))
                .count();
            assert_eq!(seen, 1, "cut {cut}");
        }
    }

    #[test]
    fn a_window_with_a_fault_is_not_seen_again_by_the_next() {
        let mut s = LineSplitter::default();
        let mut windows = 0;
        let mut line = vec![b'x'; MATCH_CAP - 10];
        line.extend_from_slice(b"FAULT");
        line.extend(vec![b'x'; MATCH_CAP]);
        s.feed(&line, |l| {
            windows += 1;
            l.windows(5).any(|w| w == b"FAULT")
        });
        s.finish(|_| {
            windows += 1;
            false
        });
        // The first window found it and was dropped whole; what follows never repeats it.
        assert!(windows >= 2);
    }

    #[test]
    fn memory_stays_bounded_for_a_100_mb_line() {
        let mut s = LineSplitter::default();
        let chunk = vec![b'.'; 1 << 20];
        let mut found = false;
        for _ in 0..100 {
            s.feed(&chunk, |_| false);
            assert!(s.line.capacity() <= 2 * MATCH_CAP);
        }
        s.feed(b"HSA_STATUS_ERROR_MEMORY_APERTURE_VIOLATION\n", |l| {
            found |= l.ends_with(b"VIOLATION");
            found
        });
        assert!(found);
    }
}
