//! `gpuwarden scan`: find the GPU faults in a log that already exists (dmesg output, `journalctl
//! -k`, a training log) and print them as findings.
//!
//! The log is read in large blocks and searched block-wise for the catalog's required literals
//! (one automaton over every rule's, `RuleSet::candidate_lines`), the way ripgrep searches:
//! benign lines are never split, decoded or matched one by one. Live input (a pipe, a terminal)
//! is searched as it arrives, and a finding is printed once the input pauses (`scan_live`). Only the lines the prefilter stops at are classified and grouped
//! (`rules::group`) into findings. Lines are numbered from 1 per input.
//!
//! This module reads and reports; it does not act on anything. The supervisor reads live streams
//! through `sources`.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::BorrowedFd;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, poll};

use serde::Serialize;

use crate::rules::group::{Finding, Grouper};
use crate::rules::{Action, FaultClass, RuleSet, Severity, Stream};

/// How much of the log is read at a time.
const BLOCK: usize = 4 << 20;

/// The longest line classified whole. A longer one (a progress bar without newlines, a binary
/// blob) is classified on its first `MAX_LINE` bytes; the rest of it is skipped.
pub const MAX_LINE: usize = 1 << 20;

/// One finding as `scan --json` prints it: one JSON object per line.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    /// The input: a file as named on the command line, or `-` for standard input.
    pub file: &'a str,
    /// First and last line of the finding, 1-based.
    pub line: usize,
    pub end_line: usize,
    pub class: FaultClass,
    pub rule: &'a str,
    pub severity: Severity,
    pub action: Action,
    /// How many times the fault line repeated within the finding.
    pub count: u64,
    /// The fault line as logged.
    pub text: &'a str,
    pub stream: Stream,
    pub captures: &'a std::collections::BTreeMap<String, String>,
    pub advice: &'a str,
}

impl<'a> Record<'a> {
    pub fn new(file: &'a str, finding: &'a Finding) -> Record<'a> {
        let fault = &finding.fault;
        Record {
            file,
            line: finding.line,
            end_line: finding.end_line,
            class: fault.class,
            rule: &fault.rule,
            severity: fault.severity,
            action: fault.action,
            count: finding.count,
            text: &fault.line,
            stream: fault.stream,
            captures: &fault.captures,
            advice: &fault.advice,
        }
    }
}

/// What scanning one input found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub lines: usize,
    pub findings: usize,
}

/// Scans `input` with `rules` (every rule when `stream` is `None`) and hands each finding to
/// `found` as soon as it is complete, in the order of its first line.
pub fn scan(
    rules: &RuleSet,
    stream: Option<Stream>,
    input: impl Read,
    found: impl FnMut(&Finding) -> io::Result<()>,
) -> io::Result<Summary> {
    scan_live(rules, stream, input, None, found)
}

/// How long live input (a pipe, a terminal: `dmesg -w | gpuwarden scan`) may be quiet before the
/// findings open so far are printed: a finding can still grow by its context lines and repeats,
/// which come within milliseconds of the fault line, but a person watching must not wait for
/// the next 64 lines to see it. A repeat after such a pause starts a new finding.
pub const LIVE_IDLE: Duration = Duration::from_millis(100);

/// [`scan`], and when `live` is the input's descriptor, the findings still open are handed out
/// whenever the input is quiet for [`LIVE_IDLE`] (instead of at the end of the input).
pub fn scan_live(
    rules: &RuleSet,
    stream: Option<Stream>,
    mut input: impl Read,
    live: Option<BorrowedFd<'_>>,
    mut found: impl FnMut(&Finding) -> io::Result<()>,
) -> io::Result<Summary> {
    let mut grouper = Grouper::new();
    let mut summary = Summary::default();
    // One buffer for the whole input: reads fill its free end, searched lines leave its front.
    // Reads take what is there (a pipe gives 64 KiB at a time), so lines are examined as they
    // arrive, not when a block is full.
    let mut buf: Vec<u8> = vec![0; BLOCK];
    let mut filled = 0usize;
    // Lines before `buf[0]`; `buf` always starts at the start of a line.
    let mut lines_before = 0usize;
    // Inside a line longer than MAX_LINE whose head was already classified.
    let mut skipping = false;
    let mut eof = false;
    while !eof {
        if let Some(fd) = live
            && grouper.has_open()
            && !readable(fd, LIVE_IDLE)?
        {
            grouper.close_open();
            emit(&mut grouper, &mut summary, &mut found)?;
        }
        let n = read_some(&mut input, &mut buf[filled..])?;
        filled += n;
        eof = n == 0;
        if skipping {
            match memchr::memchr(b'\n', &buf[..filled]) {
                Some(end) => {
                    // The line was counted when its head was classified.
                    buf.copy_within(end + 1..filled, 0);
                    filled -= end + 1;
                    skipping = false;
                }
                None => {
                    filled = 0;
                    continue;
                }
            }
        }
        // Search the complete lines; keep the partial last one for the next read.
        let complete = if eof {
            filled
        } else {
            match memchr::memrchr(b'\n', &buf[..filled]) {
                Some(last) => last + 1,
                None if filled >= MAX_LINE => {
                    // One line fills the block: classify its head, skip its tail.
                    let head = &buf[..MAX_LINE];
                    lines_before += 1;
                    push_line(&mut grouper, rules, stream, lines_before, head);
                    emit(&mut grouper, &mut summary, &mut found)?;
                    filled = 0;
                    skipping = true;
                    continue;
                }
                None => continue,
            }
        };
        lines_before = search_block(
            rules,
            stream,
            &buf[..complete],
            lines_before,
            &mut grouper,
            &mut summary,
            &mut found,
        )?;
        buf.copy_within(complete..filled, 0);
        filled -= complete;
    }
    summary.lines = lines_before;
    for finding in grouper.finish() {
        summary.findings += 1;
        found(&finding)?;
    }
    Ok(summary)
}

/// Whether `fd` has input (or its end) within `wait`.
fn readable(fd: BorrowedFd<'_>, wait: Duration) -> io::Result<bool> {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let millis = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
    loop {
        match poll(&mut fds, millis) {
            Ok(n) => return Ok(n > 0),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Searches a block of whole lines (the last may lack its newline at the end of the input) and
/// returns the number of lines counted so far.
fn search_block(
    rules: &RuleSet,
    stream: Option<Stream>,
    block: &[u8],
    mut lines_before: usize,
    grouper: &mut Grouper,
    summary: &mut Summary,
    found: &mut impl FnMut(&Finding) -> io::Result<()>,
) -> io::Result<usize> {
    let mut pos = 0;
    let mut candidates = rules.candidate_lines();
    while pos < block.len() {
        let Some(hit) = candidates.next(block, pos) else {
            break;
        };
        let start = memchr::memrchr(b'\n', &block[pos..hit]).map_or(pos, |i| pos + i + 1);
        let end = memchr::memchr(b'\n', &block[hit..]).map_or(block.len(), |i| hit + i);
        lines_before += count_newlines(&block[pos..start]) + 1;
        let line = &block[start..end.min(start + MAX_LINE)];
        push_line(grouper, rules, stream, lines_before, line);
        emit(grouper, summary, found)?;
        pos = end + 1;
    }
    if pos < block.len() {
        lines_before += count_newlines(&block[pos..]);
        if block.last() != Some(&b'\n') {
            // The input's last line, without a newline.
            lines_before += 1;
        }
    }
    Ok(lines_before)
}

fn push_line(
    grouper: &mut Grouper,
    rules: &RuleSet,
    stream: Option<Stream>,
    number: usize,
    line: &[u8],
) {
    let text = String::from_utf8_lossy(line);
    grouper.push(rules, stream, number, &text);
}

fn emit(
    grouper: &mut Grouper,
    summary: &mut Summary,
    found: &mut impl FnMut(&Finding) -> io::Result<()>,
) -> io::Result<()> {
    for finding in grouper.ready() {
        summary.findings += 1;
        found(&finding)?;
    }
    Ok(())
}

/// Newlines in `bytes`. A plain counting loop, which the compiler vectorises; it runs over every
/// byte that the prefilter skipped, so it must keep up with it.
fn count_newlines(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&b| b == b'\n').count()
}

/// One read (what the input has, up to `buf`'s length); retries interrupted reads.
fn read_some(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match input.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            result => return result,
        }
    }
}

/// Writes one finding as `scan` prints it: one JSON object on a line (`json`), or for people.
/// `file` names the input; people see it only when `show_file` (several inputs).
pub fn write_finding(
    out: &mut impl Write,
    json: bool,
    file: &str,
    show_file: bool,
    finding: &Finding,
) -> io::Result<()> {
    if json {
        serde_json::to_writer(&mut *out, &Record::new(file, finding)).map_err(io::Error::other)?;
        writeln!(out)
    } else {
        write_human(out, show_file.then_some(file), finding)
    }
}

/// Writes a finding for people: where, what, how often, the line, and the advice.
pub fn write_human(out: &mut impl Write, file: Option<&str>, finding: &Finding) -> io::Result<()> {
    let fault = &finding.fault;
    let lines = if finding.end_line > finding.line {
        format!("{}-{}", finding.line, finding.end_line)
    } else {
        finding.line.to_string()
    };
    let place = match file {
        Some(file) => format!("{file}:{lines}"),
        None => lines,
    };
    let count = if finding.count > 1 {
        format!("  x{}", finding.count)
    } else {
        String::new()
    };
    writeln!(
        out,
        "{place:<12} {:<22} {:<8} {}{count}",
        fault.class.as_str(),
        fault.severity.as_str(),
        fault.rule
    )?;
    writeln!(out, "{:12} {}", "", Shortened(&fault.line, 160))?;
    writeln!(out, "{:12} advice: {}", "", fault.advice)
}

/// A line cut to at most `.1` characters, with an ellipsis.
struct Shortened<'a>(&'a str, usize);

impl fmt::Display for Shortened<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(self.1) {
            Some((cut, _)) => write!(f, "{}...", &self.0[..cut]),
            None => f.write_str(self.0),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rules() -> RuleSet {
        RuleSet::builtin().unwrap()
    }

    fn findings(rules: &RuleSet, text: &[u8]) -> (Vec<(usize, usize, String)>, Summary) {
        let mut out = Vec::new();
        let summary = scan(rules, None, text, |f| {
            out.push((f.line, f.end_line, f.fault.rule.clone()));
            Ok(())
        })
        .unwrap();
        (out, summary)
    }

    const FAULT: &str = "Memory access fault by GPU node-1 (Agent handle: 0x1f829860) on address 0x7a8a4be00000. Reason: Page not present or supervisor privilege.";

    #[test]
    fn line_numbers_count_every_line_with_or_without_a_final_newline() {
        let rules = rules();
        let text = format!("epoch 1\nepoch 2\n{FAULT}\nepoch 3\n");
        let (found, summary) = findings(&rules, text.as_bytes());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, 3);
        assert_eq!(
            summary,
            Summary {
                lines: 4,
                findings: 1
            }
        );
        let text = format!("epoch 1\n{FAULT}");
        let (found, summary) = findings(&rules, text.as_bytes());
        assert_eq!((found[0].0, summary.lines), (2, 2));
        assert_eq!(findings(&rules, b"").1, Summary::default());
        assert_eq!(findings(&rules, b"a\n\nb").1.lines, 3);
    }

    #[test]
    fn lines_split_across_reads_are_found_with_the_right_numbers() {
        // A reader that returns a few bytes at a time splits lines at every possible place.
        struct Trickle<'a>(&'a [u8], usize);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.1.min(self.0.len()).min(buf.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let rules = rules();
        let mut text = String::new();
        for i in 0..2000 {
            text.push_str(&format!("step {i} loss 0.{i}\n"));
            if i % 500 == 7 {
                text.push_str(FAULT);
                text.push('\n');
            }
        }
        let whole = findings(&rules, text.as_bytes());
        let mut out = Vec::new();
        let summary = scan(&rules, None, Trickle(text.as_bytes(), 7), |f| {
            out.push((f.line, f.end_line, f.fault.rule.clone()));
            Ok(())
        })
        .unwrap();
        assert_eq!(out, whole.0);
        assert_eq!(summary, whole.1);
        assert_eq!(out.len(), 4);
        assert_eq!(out[0].0, 9);
    }

    #[test]
    fn a_line_longer_than_the_limit_is_classified_on_its_head_and_counted_once() {
        let rules = rules();
        let mut text = Vec::new();
        text.extend_from_slice(FAULT.as_bytes());
        text.extend(std::iter::repeat_n(b'x', 3 * MAX_LINE + 17));
        text.extend_from_slice(b"\nnext line\n");
        text.extend_from_slice(FAULT.as_bytes());
        text.push(b'\n');
        let (found, summary) = findings(&rules, &text);
        let lines: Vec<usize> = found.iter().map(|f| f.0).collect();
        assert_eq!(lines, vec![1], "a storm within the gap: {found:?}");
        assert_eq!(summary.lines, 3);
    }

    #[test]
    fn invalid_utf8_does_not_hide_a_fault() {
        let rules = rules();
        let mut text = b"\xff\xfe garbage \xc3\n".to_vec();
        text.extend_from_slice(b"\xff ");
        text.extend_from_slice(FAULT.as_bytes());
        text.push(b'\n');
        let (found, _) = findings(&rules, &text);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, 2);
    }
}
