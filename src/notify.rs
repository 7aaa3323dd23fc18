//! Telling someone: a command run with the event as JSON on its stdin (`--notify-cmd`), and an
//! HTTP POST of the same JSON with a `text` field (`--webhook`), for the journal records a person
//! wants to be woken for (a fault acted on, a fallback, giving up, the end of the run).
//!
//! The executor hands every journal record to [`Notifier::offer`]; the few that are chosen go
//! through a bounded queue to one delivery thread. Supervision never waits for a delivery: a full
//! queue drops the notification (counted, and said at the end), a slow or failing endpoint is
//! retried with backoff on the delivery thread, and a delivery that finally fails is a warning in
//! the journal (appended by this thread as one whole line), never an error of the run.
//!
//! Not for: deciding anything (which records matter is a fixed mapping, [`kind_of`]), or TLS.
//! Webhooks are plain `http://`; for an `https://` endpoint (Slack, ntfy.sh) use the command with
//! curl: `--notify-cmd curl --notify-arg=-sS --notify-arg=--data-binary --notify-arg=@- ...`.
//! Commands are an argv and never go through a shell.

use std::ffi::OsString;
use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::journal::Record;
use crate::rules::{Action, FaultClass, Stream};

/// The kinds of notification, named as in `--notify-on` and `[notify] events`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A fault the supervisor acted on (restart, fallback or stop; not a `note`), other than
    /// a stall.
    Fault,
    /// The job made no progress (no output, no new checkpoint) for the stall timeout and was
    /// stopped: told apart from other faults because a hang at 2 a.m. is what people most want
    /// to hear about, and a silent job never says so itself.
    Stall,
    /// A restart scheduled on a different (lower) tier of the ladder.
    Fallback,
    /// A restart on the same tier.
    Restart,
    /// A signal passed to the job (SIGUSR1 before a Slurm preemption).
    Signal,
    /// The run ended without the job finishing: budget spent, ladder exhausted, a `stop` fault.
    GaveUp,
    /// The run ended because gpuwarden was asked to stop (SIGTERM, Ctrl-C).
    Interrupted,
    /// The job finished (exit status 0).
    Finished,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Fault,
        Kind::Stall,
        Kind::Fallback,
        Kind::Restart,
        Kind::Signal,
        Kind::GaveUp,
        Kind::Interrupted,
        Kind::Finished,
    ];

    /// What is sent when nothing is chosen: what someone watching overnight needs to know.
    pub const DEFAULT: [Kind; 5] = [
        Kind::Fault,
        Kind::Fallback,
        Kind::Stall,
        Kind::GaveUp,
        Kind::Finished,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Fault => "fault",
            Kind::Stall => "stall",
            Kind::Fallback => "fallback",
            Kind::Restart => "restart",
            Kind::Signal => "signal",
            Kind::GaveUp => "gave_up",
            Kind::Interrupted => "interrupted",
            Kind::Finished => "finished",
        }
    }

    pub fn parse(name: &str) -> Result<Kind, String> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == name)
            .ok_or_else(|| {
                format!(
                    "unknown notification event `{name}`; choose from {}",
                    Kind::ALL.map(Kind::as_str).join(", ")
                )
            })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A plain-HTTP endpoint, parsed once when the plan is made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Webhook {
    pub url: String,
    host: String,
    port: u16,
    path: String,
}

impl Webhook {
    /// Parses `http://host[:port][/path]` (an IPv6 host in brackets).
    pub fn parse(url: &str) -> Result<Webhook, String> {
        let rest = if let Some(rest) = url.strip_prefix("http://") {
            rest
        } else if url.starts_with("https://") {
            return Err(format!(
                "webhook `{url}`: https is not supported (gpuwarden has no TLS); use a plain http:// relay on this machine, or --notify-cmd curl --notify-arg=-sS --notify-arg=--data-binary --notify-arg=@- --notify-arg={url}"
            ));
        } else {
            return Err(format!(
                "webhook `{url}` must start with http://, e.g. http://127.0.0.1:8080/hook"
            ));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        if authority.contains('@') {
            return Err(format!(
                "webhook `{url}`: user:password@ is not supported; put a token in the path or query"
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("webhook `{url}`: unclosed `[` in the host"))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            None => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("webhook `{url}`: `{p}` is not a port number"))?,
        };
        if host.is_empty() || path.bytes().any(|b| b.is_ascii_whitespace() || b < 0x20) {
            return Err(format!("webhook `{url}`: no host, or a space in the URL"));
        }
        Ok(Webhook {
            url: url.to_string(),
            host: host.to_string(),
            port,
            path,
        })
    }

    fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 80 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// Where notifications go, checked (config file and flags merged by `crate::config`).
#[derive(Clone, Debug, PartialEq)]
pub struct NotifyPlan {
    /// Program and arguments; the event JSON is its stdin.
    pub command: Option<Vec<OsString>>,
    pub webhooks: Vec<Webhook>,
    pub kinds: Vec<Kind>,
}

impl Default for NotifyPlan {
    fn default() -> NotifyPlan {
        NotifyPlan {
            command: None,
            webhooks: Vec::new(),
            kinds: Kind::DEFAULT.to_vec(),
        }
    }
}

impl NotifyPlan {
    pub fn is_empty(&self) -> bool {
        self.command.is_none() && self.webhooks.is_empty()
    }
}

/// Which notification a journal record is, if any. `tier` follows the tier of the running
/// attempt (from `attempt_started`), so that a restart on another tier is told as a fallback.
pub fn kind_of(record: &Record, tier: &mut Option<String>) -> Option<Kind> {
    match record {
        Record::AttemptStarted { tier: t, .. } => {
            *tier = Some(t.clone());
            None
        }
        Record::Fault { action, .. } if *action == Action::Note => None,
        // A stall is the supervisor's own fault (stream `progress`, rule `stall-timeout`):
        // `gpu_hang` on a GPU tier, `job_stalled` elsewhere. A `gpu_hang` the kernel log or the
        // job reported (a ring timeout) is a fault like any other.
        Record::Fault { stream, class, .. }
            if *stream == Stream::Progress || *class == FaultClass::JobStalled =>
        {
            Some(Kind::Stall)
        }
        Record::Fault { .. } => Some(Kind::Fault),
        Record::RestartScheduled { tier: next, .. } => {
            if tier.as_deref().is_some_and(|t| t != next) {
                Some(Kind::Fallback)
            } else {
                Some(Kind::Restart)
            }
        }
        // The ladder's first step down: the GPUs that did not fault (issue 14).
        Record::GpusExcluded { .. } => Some(Kind::Fallback),
        Record::SignalForwarded { .. } => Some(Kind::Signal),
        Record::RunFinished { exit_code, .. } => Some(match *exit_code {
            crate::exit::SUCCESS => Kind::Finished,
            c if c > 128 => Kind::Interrupted,
            _ => Kind::GaveUp,
        }),
        _ => None,
    }
}

/// One line a person can read in a chat window.
fn text_of(kind: Kind, record: &Record, host: &str) -> String {
    let what = match record {
        Record::Fault {
            attempt,
            class,
            rule,
            action,
            line,
            ..
        } => {
            let mut line: String = line.chars().take(200).collect();
            if line.len() < record_line_len(record) {
                line.push('…');
            }
            if kind == Kind::Stall {
                format!(
                    "attempt {attempt} stalled ({class}), action {}: {line}",
                    action.as_str()
                )
            } else {
                format!(
                    "attempt {attempt}: {class} ({rule}), action {}: {line}",
                    action.as_str()
                )
            }
        }
        Record::RestartScheduled {
            attempt,
            tier,
            reason,
            delay_seconds,
            restarts_left,
        } => format!(
            "{} to tier `{tier}` as attempt {attempt} in {delay_seconds:.0} s ({reason}); {restarts_left} restarts left",
            if kind == Kind::Fallback {
                "falling back"
            } else {
                "restarting"
            }
        ),
        Record::SignalForwarded { attempt, signal } => {
            format!("{signal} passed to the job (attempt {attempt})")
        }
        Record::GpusExcluded {
            attempt,
            class,
            rule,
            gpus,
            remaining,
            ..
        } => format!(
            "excluding {} after {class} ({rule}) in attempt {attempt}; going on with GPU(s) {}",
            gpus.iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(" and "),
            remaining
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
        Record::RunFinished {
            outcome,
            detail,
            attempts,
            restarts,
            exit_code,
        } => format!(
            "run over: {outcome} ({detail}); {attempts} attempts, {restarts} restarts, exit code {exit_code}"
        ),
        _ => kind.to_string(),
    };
    format!("gpuwarden on {host}: {what}")
}

fn record_line_len(record: &Record) -> usize {
    match record {
        Record::Fault { line, .. } => line.len(),
        _ => 0,
    }
}

#[derive(Serialize)]
struct Stamped<'a> {
    at: String,
    #[serde(flatten)]
    record: &'a Record,
}

/// What is delivered: Slack, Mattermost, Discord-compatible and ntfy endpoints read `text`;
/// the rest is for programs.
#[derive(Serialize)]
struct Payload<'a> {
    text: String,
    kind: Kind,
    host: &'a str,
    run_dir: &'a Path,
    record: Stamped<'a>,
}

/// Deliveries a notification gets before it is given up: the first try and retries after 0.5,
/// 1 and 2 s.
const TRIES: u32 = 4;
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// One try (connect, send, status line; or the command's whole run) may take this long.
const TRY_TIMEOUT: Duration = Duration::from_secs(5);
/// Notifications waiting for the delivery thread; more are dropped, not waited for.
const QUEUE: usize = 64;

/// The executor's end: offers records, never blocks.
#[derive(Debug)]
pub struct Notifier {
    tx: Option<SyncSender<Vec<u8>>>,
    done: Receiver<()>,
    kinds: Vec<Kind>,
    tier: Option<String>,
    host: String,
    run_dir: PathBuf,
    journal: PathBuf,
    dropped: u64,
}

impl Notifier {
    /// Starts the delivery thread, or returns `None` when nothing is to be notified.
    pub fn start(plan: &NotifyPlan, run_dir: &Path, journal: &Path) -> Option<Notifier> {
        if plan.is_empty() || plan.kinds.is_empty() {
            return None;
        }
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(QUEUE);
        let (done_tx, done) = mpsc::channel();
        let delivery = Delivery {
            command: plan.command.clone(),
            webhooks: plan.webhooks.clone(),
            journal: journal.to_path_buf(),
        };
        let started = thread::Builder::new().name("notify".into()).spawn(move || {
            for body in rx {
                delivery.deliver(&body);
            }
            let _ = done_tx.send(());
        });
        if let Err(e) = started {
            warn(
                journal,
                &format!("cannot start the notification thread ({e}); no notifications"),
            );
            return None;
        }
        Some(Notifier {
            tx: Some(tx),
            done,
            kinds: plan.kinds.clone(),
            tier: None,
            host: hostname(),
            run_dir: run_dir.to_path_buf(),
            journal: journal.to_path_buf(),
            dropped: 0,
        })
    }

    /// Looks at a record just journaled; queues a notification when it is a chosen kind.
    pub fn offer(&mut self, record: &Record, at: SystemTime) {
        let Some(kind) = kind_of(record, &mut self.tier) else {
            return;
        };
        if !self.kinds.contains(&kind) {
            return;
        }
        let payload = Payload {
            text: text_of(kind, record, &self.host),
            kind,
            host: &self.host,
            run_dir: &self.run_dir,
            record: Stamped {
                at: crate::time::rfc3339(at),
                record,
            },
        };
        let Ok(body) = serde_json::to_vec(&payload) else {
            return;
        };
        if let Some(tx) = &self.tx {
            match tx.try_send(body) {
                Ok(()) => {}
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped += 1,
            }
        }
    }

    /// Lets the queued notifications go out (the run's last one is usually among them), waiting
    /// at most `within`; what is still undelivered then is abandoned.
    pub fn close(mut self, within: Duration) {
        drop(self.tx.take());
        if self.done.recv_timeout(within).is_err() {
            warn(
                &self.journal,
                &format!("notifications still undelivered after {within:?} were abandoned"),
            );
        }
        if self.dropped > 0 {
            warn(
                &self.journal,
                &format!(
                    "{} notifications were dropped because delivery fell behind",
                    self.dropped
                ),
            );
        }
    }
}

/// The delivery thread's state.
struct Delivery {
    command: Option<Vec<OsString>>,
    webhooks: Vec<Webhook>,
    journal: PathBuf,
}

impl Delivery {
    fn deliver(&self, body: &[u8]) {
        let kind = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["kind"].as_str().map(str::to_string))
            .unwrap_or_default();
        if let Some(argv) = &self.command {
            let program = argv
                .first()
                .map(|p| p.to_string_lossy())
                .unwrap_or_default();
            let what = format!("notify command `{program}`");
            self.with_retries(&what, || run_command(argv, body, &kind, TRY_TIMEOUT));
        }
        for hook in &self.webhooks {
            let what = format!("webhook {}", hook.url);
            self.with_retries(&what, || post(hook, body, TRY_TIMEOUT));
        }
    }

    fn with_retries(&self, what: &str, mut attempt: impl FnMut() -> Result<(), String>) {
        let mut delay = FIRST_RETRY;
        let mut last = String::new();
        for n in 1..=TRIES {
            match attempt() {
                Ok(()) => return,
                Err(e) => last = e,
            }
            if n < TRIES {
                thread::sleep(delay);
                delay *= 2;
            }
        }
        warn(
            &self.journal,
            &format!("{what} failed {TRIES} times, last: {last}; the notification was dropped"),
        );
    }
}

/// Says a warning and appends it to the journal as one whole line (O_APPEND: it cannot
/// interleave with the executor's own lines). Best effort: a full disk loses it.
fn warn(journal: &Path, message: &str) {
    crate::voice::say(&format!("warning: {message}"));
    let record = Record::Warning {
        message: message.to_string(),
    };
    let line = Stamped {
        at: crate::time::rfc3339(SystemTime::now()),
        record: &record,
    };
    if let Ok(mut bytes) = serde_json::to_vec(&line) {
        bytes.push(b'\n');
        if let Ok(mut file) = OpenOptions::new().append(true).open(journal) {
            let _ = file.write_all(&bytes);
            let _ = file.sync_data();
        }
    }
}

/// Runs `argv` with `body` on its stdin and `GPUWARDEN_EVENT` set; success is exit status 0
/// within `timeout`.
fn run_command(
    argv: &[OsString],
    body: &[u8],
    kind: &str,
    timeout: Duration,
) -> Result<(), String> {
    let (program, args) = argv.split_first().ok_or("empty command")?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("GPUWARDEN_EVENT", kind)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    // Its own group: a Ctrl-C meant for the run must not kill a notification on its way.
    crate::process::own_group(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| format!("cannot start it: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its input is fine: a broken pipe is not a failure.
        let _ = stdin.write_all(body);
    }
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("it ended with {status}")),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("it did not end within {timeout:?} and was killed"));
            }
            Ok(None) => thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("cannot wait for it: {e}")),
        }
    }
}

/// POSTs `body` to `hook`; success is a 2xx status.
fn post(hook: &Webhook, body: &[u8], timeout: Duration) -> Result<(), String> {
    let addrs = (hook.host.as_str(), hook.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", hook.host))?;
    let mut last = format!("{} has no address", hook.host);
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = format!("cannot connect to {addr}: {e}"),
        }
    }
    let mut stream = stream.ok_or(last)?;
    let io = |e: io::Error| format!("{e}");
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    let _ = stream.set_nodelay(true);
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: gpuwarden/{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        hook.path,
        hook.host_header(),
        env!("CARGO_PKG_VERSION"),
        body.len()
    );
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    stream.write_all(&request).map_err(io)?;
    // The status line is enough; the rest of the answer is not read.
    let mut answer = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !answer.contains(&b'\n') && answer.len() < 4096 {
        let n = stream.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    let status_line = String::from_utf8_lossy(&answer);
    let status_line = status_line.lines().next().unwrap_or("");
    let code = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok());
    match code {
        Some(200..=299) => Ok(()),
        Some(_) => Err(format!("answered `{status_line}`")),
        None => Err("no HTTP answer".into()),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls() {
        let w = Webhook::parse("http://127.0.0.1:9000/hook?t=1").unwrap();
        assert_eq!(
            (w.host.as_str(), w.port, w.path.as_str()),
            ("127.0.0.1", 9000, "/hook?t=1")
        );
        assert_eq!(w.host_header(), "127.0.0.1:9000");
        let w = Webhook::parse("http://example.org").unwrap();
        assert_eq!(
            (w.port, w.path.as_str(), w.host_header().as_str()),
            (80, "/", "example.org")
        );
        let w = Webhook::parse("http://[::1]:8080/x").unwrap();
        assert_eq!((w.host.as_str(), w.port), ("::1", 8080));
        assert_eq!(w.host_header(), "[::1]:8080");
        let w = Webhook::parse("http://h?x=1").unwrap();
        assert_eq!(w.path, "/?x=1");
        for bad in [
            "https://hooks.slack.com/x",
            "ftp://x",
            "http://:80/",
            "http://h:99999/",
            "http://u:p@h/",
            "http://h/a b",
        ] {
            assert!(Webhook::parse(bad).is_err(), "{bad}");
        }
        assert!(
            Webhook::parse("https://x")
                .unwrap_err()
                .contains("--notify-cmd curl")
        );
    }

    #[test]
    fn records_map_to_kinds_and_a_tier_change_is_a_fallback() {
        let mut tier = None;
        let started = |t: &str| Record::AttemptStarted {
            attempt: 1,
            tier: t.into(),
            device: "cuda".into(),
            gpus: Vec::new(),
            checkpoint: None,
            argv: Vec::new(),
            pid: 1,
            stdout_log: PathBuf::new(),
            stderr_log: PathBuf::new(),
        };
        let restart = |t: &str| Record::RestartScheduled {
            attempt: 2,
            tier: t.into(),
            reason: "r".into(),
            delay_seconds: 1.0,
            restarts_left: 4,
        };
        assert_eq!(kind_of(&started("gpu"), &mut tier), None);
        assert_eq!(kind_of(&restart("gpu"), &mut tier), Some(Kind::Restart));
        assert_eq!(kind_of(&restart("cpu"), &mut tier), Some(Kind::Fallback));
        let finished = |code| Record::RunFinished {
            outcome: "x".into(),
            detail: "y".into(),
            attempts: 1,
            restarts: 0,
            exit_code: code,
        };
        assert_eq!(kind_of(&finished(0), &mut tier), Some(Kind::Finished));
        assert_eq!(kind_of(&finished(3), &mut tier), Some(Kind::GaveUp));
        assert_eq!(kind_of(&finished(143), &mut tier), Some(Kind::Interrupted));
        assert_eq!(kind_of(&Record::Leftovers { attempt: 1 }, &mut tier), None);
        // Excluding a faulty GPU is the ladder's first step down.
        let excluded = Record::GpusExcluded {
            attempt: 1,
            tier: "gpu".into(),
            rule: "xid-79".into(),
            class: crate::rules::FaultClass::GpuLost,
            gpus: vec![crate::gpu::JobGpu {
                key: 1,
                vendor: crate::gpu::Vendor::Nvidia,
                index: 1,
                ordinal: 1,
                pci: Some("0000:86:00.0".into()),
            }],
            excluded: vec![1],
            remaining: vec![0],
        };
        assert_eq!(kind_of(&excluded, &mut tier), Some(Kind::Fallback));
        assert_eq!(
            text_of(Kind::Fallback, &excluded, "node7"),
            "gpuwarden on node7: excluding GPU 1 (0000:86:00.0, the job's cuda:1) after gpu_lost (xid-79) in attempt 1; going on with GPU(s) 0"
        );
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Ok(k));
        }
        assert!(Kind::DEFAULT.contains(&Kind::Stall));
        assert!(Kind::parse("fualt").unwrap_err().contains("gave_up"));
    }

    fn fault(class: FaultClass, stream: Stream, rule: &str) -> Record {
        Record::Fault {
            attempt: 1,
            class,
            rule: rule.into(),
            severity: crate::rules::Severity::Error,
            action: Action::Restart,
            stream,
            line: "no progress for 3.0 s".into(),
            captures: Default::default(),
            facility: None,
            attribution: None,
            incident: None,
            gpus: Vec::new(),
        }
    }

    /// A stall (the supervisor's own `stall-timeout` fault, `gpu_hang` on a GPU tier) is told
    /// as `stall`, which is on by default; a ring timeout the kernel reported is a `fault`.
    #[test]
    fn a_stall_is_its_own_kind_and_on_by_default() {
        let mut tier = None;
        let stall = crate::supervisor::stall_fault(
            true,
            std::time::Duration::from_secs(3),
            std::time::Duration::from_secs(3),
        );
        let record = fault(stall.class, stall.stream, &stall.rule);
        assert_eq!(kind_of(&record, &mut tier), Some(Kind::Stall));
        let cpu = crate::supervisor::stall_fault(
            false,
            std::time::Duration::from_secs(3),
            std::time::Duration::from_secs(3),
        );
        assert_eq!(cpu.class, FaultClass::JobStalled);
        let record = fault(cpu.class, cpu.stream, &cpu.rule);
        assert_eq!(kind_of(&record, &mut tier), Some(Kind::Stall));
        assert!(text_of(Kind::Stall, &record, "h").contains("attempt 1 stalled (job_stalled)"));
        let ring = fault(FaultClass::GpuHang, Stream::Kernel, "amdgpu-ring-timeout");
        assert_eq!(kind_of(&ring, &mut tier), Some(Kind::Fault));
        assert!(NotifyPlan::default().kinds.contains(&Kind::Stall));
        assert_eq!(Kind::parse("stall"), Ok(Kind::Stall));
    }
}
