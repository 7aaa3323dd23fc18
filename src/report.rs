//! The morning-after view of a run: `journal.jsonl` lines in, one [`Report`] out.
//!
//! Pure: it takes the journal's text and returns a value; reading the file and printing are the
//! CLI's job (`gpuwarden report`). It reads the journal as plain JSON objects keyed by `event`,
//! not through [`crate::journal::Record`], so that a journal written by an older or newer
//! gpuwarden still reports: a line that is not JSON (a torn last line after a power cut) or an
//! event this version does not know is skipped and listed in [`Report::skipped`], never fatal.
//!
//! # Goodput
//!
//! Goodput is the share of the run's wall time that produced progress the run kept:
//!
//! - **wall time** runs from the `run_started` record to the `run_finished` record (or, for a
//!   run still going or whose gpuwarden died, the last record of the journal). Backoff waits,
//!   stops and gaps between attempts count, since the night passes during them too.
//! - **kept time** is, per attempt, the time from its start to the last checkpoint it wrote that
//!   the run kept: a checkpoint is kept when a later attempt resumed from it or from a newer
//!   checkpoint of the same attempt, or, for the last attempt, when it is on disk at the end. An
//!   attempt that finished the job (exit 0) is kept whole. Work after an attempt's last kept
//!   checkpoint (lost to the fault) and before its first one that did not count is not kept.
//! - **goodput** = kept time ÷ wall time, between 0 and 1.
//!
//! Checkpoint times come from `checkpoint_saved` records. A journal without them (an older
//! gpuwarden) cannot say when a checkpoint was written; then an attempt whose successor
//! resumed from a checkpoint newer than its own starting point counts as kept up to its end,
//! and the report says the figure is an upper bound ([`Goodput::basis`]).

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use serde::Serialize;
use serde_json::Value;

/// The whole run, as the report shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    /// The command as the user gave it (from `run_started`).
    pub command: Vec<String>,
    pub ladder: Vec<String>,
    pub started_at: Option<String>,
    /// The time of the `run_finished` record, or of the last record when there is none.
    pub ended_at: Option<String>,
    /// `run_finished`'s outcome (`succeeded`, `ladder_exhausted`...), or `None` when the journal
    /// has no end (gpuwarden died, or the run is still going).
    pub outcome: Option<String>,
    pub detail: Option<String>,
    pub exit_code: Option<i64>,
    /// How often `gpuwarden resume` continued this run.
    pub resumed: u32,
    pub wall_seconds: f64,
    pub attempts: Vec<AttemptReport>,
    /// Time spent running attempts, per tier, in ladder order (then any other tier seen).
    pub tiers: Vec<TierTime>,
    pub checkpoints_written: Vec<CheckpointWritten>,
    pub goodput: Goodput,
    /// Faults outside the job (other processes, devices it does not use), by rule.
    pub foreign: Vec<ForeignSummary>,
    /// Faults that came from the GPU health sampler, acted on or not.
    pub health: HealthSummary,
    pub warnings: Vec<String>,
    /// Lines the report could not use, with why.
    pub skipped: Vec<SkippedLine>,
    /// Journal lines read (including skipped ones).
    pub lines: usize,
}

/// One attempt.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct AttemptReport {
    pub attempt: u32,
    pub tier: String,
    pub device: String,
    /// The checkpoint it resumed from; `None` for a fresh start.
    pub checkpoint: Option<String>,
    pub pid: Option<u64>,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    /// `None` while the journal has no `attempt_ended` for it.
    pub seconds: Option<f64>,
    /// `attempt_ended`'s `ended_by` (`gpu_memory_fault (rule)`, `finished (exit status 0)`...).
    pub ended_by: Option<String>,
    /// The exit status: `code 1`, `signal 6 (SIGABRT)`.
    pub status: Option<String>,
    /// The first fault that stopped it (the one acted on), with its line.
    pub fault: Option<FaultLine>,
    /// Every fault seen, by rule, with how often.
    pub faults: BTreeMap<String, u64>,
    /// The attempt's faults as incidents: one cause each, with how many of the faults
    /// journaled after it followed from it (`crate::incident`). Noted faults start none.
    pub incidents: Vec<IncidentReport>,
    /// How many checkpoints it wrote (`checkpoint_saved` records).
    pub checkpoints_written: u32,
    /// Seconds of this attempt that count as kept (see the module documentation).
    pub kept_seconds: f64,
    /// The GPUs it saw, by vendor index, in its order (from `attempt_started`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<u64>,
    /// The GPUs excluded after its fault (`gpus_excluded`): `GPU 1 (0000:0c:00.0)`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<String>,
    /// The tier the run climbed back to by stopping it (`climb_back`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub climbed_to: Option<String>,
    /// The wait before it for the GPUs to free the faulted attempt's memory
    /// (`gpu_memory_wait`): `0.4 s for GPU(s) 0: released`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_wait: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FaultLine {
    pub class: String,
    pub rule: String,
    pub action: String,
    pub stream: String,
    pub line: String,
}

/// One incident of an attempt: its cause, and how many journaled faults followed from it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct IncidentReport {
    pub cause: FaultLine,
    pub followed: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TierTime {
    pub tier: String,
    pub attempts: u32,
    pub seconds: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CheckpointWritten {
    pub attempt: u32,
    pub path: String,
    pub step: Option<u64>,
    pub at: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Goodput {
    pub kept_seconds: f64,
    pub wall_seconds: f64,
    /// kept ÷ wall; `None` when the wall time is zero.
    pub ratio: Option<f64>,
    /// `checkpoint_times` when every kept span ends at a journaled checkpoint or a clean finish;
    /// `upper_bound` when some attempt had to be counted whole for lack of checkpoint records.
    pub basis: &'static str,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ForeignSummary {
    pub rule: String,
    pub class: String,
    /// Journaled in full plus counted in `foreign_repeats`.
    pub count: u64,
    /// One line of it, as an example.
    pub example: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HealthSummary {
    /// Health faults that concerned the job (acted on).
    pub job_faults: u64,
    /// Health faults of GPUs the job did not use.
    pub foreign_faults: u64,
    /// By class, both kinds together.
    pub by_class: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SkippedLine {
    /// 1-based line number in the journal.
    pub line: usize,
    pub reason: String,
}

/// Seconds since the Unix epoch of an RFC 3339 UTC time as the journal writes it
/// (`2026-11-26T01:02:03.123456Z`).
pub fn parse_time(text: &str) -> Option<f64> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || !text.ends_with('Z') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| text.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi) = (num(11..13)?, num(14..16)?);
    let secs: f64 = text.get(17..text.len() - 1)?.parse().ok()?;
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    // Days from the civil date (the inverse of `crate::time`'s conversion).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3_600 + mi * 60) as f64 + secs)
}

/// Events this version knows; any other is skipped (and said).
const KNOWN: &[&str] = &[
    "run_started",
    "run_resumed",
    "preflight",
    "checkpoint_skipped",
    "checkpoint_saved",
    "attempt_started",
    "fault",
    "foreign_fault",
    "foreign_repeats",
    "leftovers",
    "attempt_ended",
    "restart_scheduled",
    "gpus_excluded",
    "fallback_forced",
    "warning",
    "stacks_captured",
    "step_interval",
    "climb_back",
    "gpu_memory_wait",
    "stall_timeout_learned",
    "run_finished",
];

/// One journal line as a record: a JSON object, or why it is not one.
fn record(line: &str) -> Result<Value, String> {
    match serde_json::from_str(line) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err("not a JSON object".into()),
        Err(e) => Err(format!("not JSON (a torn line?): {e}")),
    }
}

/// The journal's records in order, for readers that want them all (`gpuwarden resume`,
/// `gpuwarden drill`). A line that is not a JSON object (a torn last line) is left out, as
/// [`build`] skips it.
pub fn records(journal: &str) -> Vec<Value> {
    journal.lines().filter_map(|l| record(l).ok()).collect()
}

/// Builds the report from the journal's text.
pub fn build(journal: &str) -> Report {
    let mut r = Report::default();
    // (attempt, at) of each record kind the goodput needs.
    let mut attempt_start: BTreeMap<u32, f64> = BTreeMap::new();
    let mut attempt_end: BTreeMap<u32, f64> = BTreeMap::new();
    let mut saved: Vec<(u32, String, f64)> = Vec::new();
    let mut first_at: Option<(f64, String)> = None;
    let mut last_at: Option<(f64, String)> = None;
    let mut finished_at: Option<(f64, String)> = None;
    let mut foreign: BTreeMap<String, ForeignSummary> = BTreeMap::new();
    // `gpu_memory_wait` comes before the `attempt_started` of the attempt it is for.
    let mut memory_waits: BTreeMap<u32, String> = BTreeMap::new();

    for (i, text) in journal.lines().enumerate() {
        r.lines += 1;
        let number = i + 1;
        if text.trim().is_empty() {
            continue;
        }
        let skip = |r: &mut Report, reason: String| {
            r.skipped.push(SkippedLine {
                line: number,
                reason,
            })
        };
        let v = match record(text) {
            Ok(v) => v,
            Err(reason) => {
                skip(&mut r, reason);
                continue;
            }
        };
        let event = str_of(&v, "event");
        if !KNOWN.contains(&event.as_str()) {
            skip(&mut r, format!("unknown event `{event}`"));
            continue;
        }
        let at_text = str_of(&v, "at");
        let at = parse_time(&at_text);
        if let Some(t) = at {
            if first_at.is_none() {
                first_at = Some((t, at_text.clone()));
            }
            last_at = Some((t, at_text.clone()));
        }
        let attempt = v.get("attempt").and_then(Value::as_u64).map(|a| a as u32);
        match event.as_str() {
            "run_started" => {
                r.command = strings_of(&v, "command");
                r.ladder = strings_of(&v, "ladder");
                r.started_at = Some(at_text);
            }
            "run_resumed" => r.resumed += 1,
            "attempt_started" => {
                let Some(n) = attempt else {
                    skip(&mut r, "attempt_started without an attempt number".into());
                    continue;
                };
                if let Some(t) = at {
                    attempt_start.insert(n, t);
                }
                r.attempts.push(AttemptReport {
                    attempt: n,
                    tier: str_of(&v, "tier"),
                    device: str_of(&v, "device"),
                    checkpoint: v
                        .get("checkpoint")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    pid: v.get("pid").and_then(Value::as_u64),
                    started_at: Some(at_text),
                    gpus: v
                        .get("gpus")
                        .and_then(Value::as_array)
                        .map(|gpus| gpus.iter().filter_map(|g| g["index"].as_u64()).collect())
                        .unwrap_or_default(),
                    memory_wait: memory_waits.remove(&n),
                    ..AttemptReport::default()
                });
            }
            "climb_back" => {
                if let Some(a) = attempt.and_then(|n| find(&mut r.attempts, n)) {
                    a.climbed_to = Some(str_of(&v, "to"));
                }
            }
            "gpu_memory_wait" => {
                if let Some(n) = attempt {
                    let gpus: Vec<String> = v
                        .get("gpus")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_u64)
                        .map(|g| g.to_string())
                        .collect();
                    let waited = v.get("waited_ms").and_then(Value::as_f64).unwrap_or(0.0);
                    memory_waits.insert(
                        n,
                        format!(
                            "{} for GPU(s) {}: {}",
                            duration_text(waited / 1000.0),
                            gpus.join(","),
                            str_of(&v, "outcome")
                        ),
                    );
                }
            }
            "fault" => {
                let Some(a) = attempt.and_then(|n| find(&mut r.attempts, n)) else {
                    continue;
                };
                link_incident(a, &v);
                if a.fault.is_none() && str_of(&v, "action") != "note" {
                    a.fault = Some(FaultLine {
                        class: str_of(&v, "class"),
                        rule: str_of(&v, "rule"),
                        action: str_of(&v, "action"),
                        stream: str_of(&v, "stream"),
                        line: str_of(&v, "line"),
                    });
                }
                if str_of(&v, "stream") == "tool" || str_of(&v, "facility") == "health" {
                    r.health.job_faults += 1;
                    *r.health.by_class.entry(str_of(&v, "class")).or_default() += 1;
                }
            }
            "attempt_ended" => {
                let Some(n) = attempt else {
                    continue;
                };
                if let Some(t) = at {
                    attempt_end.insert(n, t);
                }
                let Some(a) = find(&mut r.attempts, n) else {
                    skip(
                        &mut r,
                        format!("attempt_ended for attempt {n}, never started"),
                    );
                    continue;
                };
                a.ended_at = Some(at_text);
                a.seconds = v.get("seconds").and_then(Value::as_f64);
                a.ended_by = v
                    .get("ended_by")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                a.status = v.get("status").and_then(status_text);
                if let Some(Value::Object(faults)) = v.get("faults") {
                    a.faults = faults
                        .iter()
                        .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(1)))
                        .collect();
                }
            }
            "checkpoint_saved" => {
                let (Some(n), Some(t)) = (attempt, at) else {
                    continue;
                };
                let path = str_of(&v, "path");
                if let Some(a) = find(&mut r.attempts, n) {
                    a.checkpoints_written += 1;
                }
                saved.push((n, path.clone(), t));
                r.checkpoints_written.push(CheckpointWritten {
                    attempt: n,
                    path,
                    step: v.get("step").and_then(Value::as_u64),
                    at: at_text,
                });
            }
            "foreign_fault" => {
                foreign_of(&mut foreign, &v, str_of(&v, "line")).count += 1;
                if str_of(&v, "facility") == "health" {
                    r.health.foreign_faults += 1;
                    *r.health.by_class.entry(str_of(&v, "class")).or_default() += 1;
                }
            }
            "foreign_repeats" => {
                let count = v.get("count").and_then(Value::as_u64).unwrap_or(0);
                // A repeat count carries no line of its own; the example comes from the fault.
                foreign_of(&mut foreign, &v, String::new()).count += count;
            }
            "warning" => r.warnings.push(str_of(&v, "message")),
            "gpus_excluded" => {
                let Some(a) = attempt.and_then(|n| find(&mut r.attempts, n)) else {
                    continue;
                };
                for g in v
                    .get("gpus")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let index = g["index"].as_u64().map_or("?".into(), |i| i.to_string());
                    a.excluded.push(match g["pci"].as_str() {
                        Some(pci) => format!("GPU {index} ({pci})"),
                        None => format!("GPU {index}"),
                    });
                }
            }
            "run_finished" => {
                r.outcome = Some(str_of(&v, "outcome"));
                r.detail = Some(str_of(&v, "detail"));
                r.exit_code = v.get("exit_code").and_then(Value::as_i64);
                if let Some(t) = at {
                    finished_at = Some((t, at_text));
                }
            }
            // Known, and nothing the report shows.
            _ => {}
        }
    }

    let start = r
        .started_at
        .as_deref()
        .and_then(parse_time)
        .or(first_at.as_ref().map(|(t, _)| *t));
    let end = finished_at.clone().or(last_at);
    r.ended_at = end.as_ref().map(|(_, s)| s.clone());
    r.wall_seconds = match (start, &end) {
        (Some(s), Some((e, _))) => (e - s).max(0.0),
        _ => 0.0,
    };

    // Time per tier, in ladder order first.
    let mut tiers: Vec<TierTime> = r
        .ladder
        .iter()
        .map(|t| TierTime {
            tier: t.clone(),
            ..TierTime::default()
        })
        .collect();
    for a in &r.attempts {
        let seconds = a.seconds.unwrap_or_else(|| {
            // Still running (or gpuwarden died): up to the journal's end.
            match (attempt_start.get(&a.attempt), &end) {
                (Some(s), Some((e, _))) => (e - s).max(0.0),
                _ => 0.0,
            }
        });
        let i = match tiers.iter().position(|t| t.tier == a.tier) {
            Some(i) => i,
            None => {
                tiers.push(TierTime {
                    tier: a.tier.clone(),
                    ..TierTime::default()
                });
                tiers.len() - 1
            }
        };
        tiers[i].attempts += 1;
        tiers[i].seconds += seconds;
    }
    tiers.retain(|t| t.attempts > 0);
    r.tiers = tiers;

    r.goodput = goodput(
        &mut r,
        &attempt_start,
        &attempt_end,
        &saved,
        end.map(|e| e.0),
    );
    r.foreign = foreign.into_values().collect();
    r.foreign
        .sort_by(|a, b| b.count.cmp(&a.count).then(a.rule.cmp(&b.rule)));
    r
}

/// Fills each attempt's `kept_seconds` and sums them (see the module documentation).
fn goodput(
    r: &mut Report,
    starts: &BTreeMap<u32, f64>,
    ends: &BTreeMap<u32, f64>,
    saved: &[(u32, String, f64)],
    journal_end: Option<f64>,
) -> Goodput {
    let mut basis = "checkpoint_times";
    let resumed: Vec<(u32, Option<String>)> = r
        .attempts
        .iter()
        .map(|a| (a.attempt, a.checkpoint.clone()))
        .collect();
    let last = r.attempts.last().map(|a| a.attempt);
    let succeeded = r.outcome.as_deref() == Some("succeeded");
    let mut kept_total = 0.0;
    for a in &mut r.attempts {
        let Some(&start) = starts.get(&a.attempt) else {
            continue;
        };
        let end = ends.get(&a.attempt).copied().or(journal_end);
        let finished_clean = a
            .status
            .as_deref()
            .is_some_and(|s| s == "code 0" && a.fault.is_none());
        let kept_until = if finished_clean && (succeeded || Some(a.attempt) != last) {
            end
        } else {
            let mine: Vec<&(u32, String, f64)> =
                saved.iter().filter(|(n, _, _)| *n == a.attempt).collect();
            // Checkpoints of later attempts' starting points.
            let later: Vec<&String> = resumed
                .iter()
                .filter(|(n, _)| *n > a.attempt)
                .filter_map(|(_, c)| c.as_ref())
                .collect();
            if Some(a.attempt) == last {
                // What is on disk at the end is kept: the next `resume` starts from it.
                mine.last().map(|(_, _, t)| *t)
            } else if !mine.is_empty() {
                // The newest of its checkpoints that a later attempt resumed from; earlier ones
                // of the same attempt are implied by it.
                mine.iter()
                    .rev()
                    .find(|(_, p, _)| later.contains(&p))
                    .map(|(_, _, t)| *t)
            } else if saved.is_empty()
                && resumed
                    .iter()
                    .find(|(n, _)| *n > a.attempt)
                    .is_some_and(|(_, c)| c.is_some() && *c != a.checkpoint)
            {
                // An old journal without checkpoint times: it moved the run forward, but when
                // is unknown. Count it whole and say so.
                basis = "upper_bound";
                end
            } else {
                None
            }
        };
        a.kept_seconds = kept_until.map_or(0.0, |k| (k - start).max(0.0));
        kept_total += a.kept_seconds;
    }
    Goodput {
        kept_seconds: kept_total,
        wall_seconds: r.wall_seconds,
        ratio: (r.wall_seconds > 0.0).then(|| (kept_total / r.wall_seconds).min(1.0)),
        basis,
    }
}

/// Counts a `fault` record into its attempt's incidents: a cascade (`incident.role`) adds to
/// the incident of the root it names, anything else acted on starts one. Journals written
/// before incidents were recorded have no `incident`: each acted-on fault is its own.
fn link_incident(a: &mut AttemptReport, v: &Value) {
    let incident = &v["incident"];
    if incident["role"] == "cascade" {
        let root = &incident["root"];
        let (rule, line) = (str_of(root, "rule"), str_of(root, "line"));
        if let Some(known) = a
            .incidents
            .iter_mut()
            .rev()
            .find(|i| !root.is_object() || (i.cause.rule == rule && i.cause.line == line))
        {
            known.followed += 1;
            return;
        }
        if root.is_object() {
            // Its root was not journaled as the job's (foreign, or only noted).
            a.incidents.push(IncidentReport {
                cause: FaultLine {
                    class: str_of(root, "class"),
                    rule,
                    line,
                    ..FaultLine::default()
                },
                followed: 1,
            });
            return;
        }
    }
    if str_of(v, "action") == "note" {
        return;
    }
    a.incidents.push(IncidentReport {
        cause: FaultLine {
            class: str_of(v, "class"),
            rule: str_of(v, "rule"),
            action: str_of(v, "action"),
            stream: str_of(v, "stream"),
            line: str_of(v, "line"),
        },
        followed: 0,
    });
}

/// The summary of the foreign rule that `v` names, made on its first record with `example`
/// (and its class) from that record; a later record only adds to the count.
fn foreign_of<'a>(
    foreign: &'a mut BTreeMap<String, ForeignSummary>,
    v: &Value,
    example: String,
) -> &'a mut ForeignSummary {
    let rule = str_of(v, "rule");
    foreign
        .entry(rule.clone())
        .or_insert_with(|| ForeignSummary {
            rule,
            class: str_of(v, "class"),
            count: 0,
            example,
        })
}

fn find(attempts: &mut [AttemptReport], n: u32) -> Option<&mut AttemptReport> {
    attempts.iter_mut().rev().find(|a| a.attempt == n)
}

fn str_of(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// The strings of the array `v[key]` (`run_started`'s `command`, `ladder`, `argv`); empty when
/// there is none.
pub fn strings_of(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn status_text(v: &Value) -> Option<String> {
    if let Some(code) = v.get("code").and_then(Value::as_i64) {
        return Some(format!("code {code}"));
    }
    let signal = v.get("signal").and_then(Value::as_i64)?;
    let name = v.get("name").and_then(Value::as_str).unwrap_or("?");
    Some(format!("signal {signal} ({name})"))
}

/// `95.0 s`, `12 min 05 s`, `3 h 02 min`.
fn duration_text(secs: f64) -> String {
    let s = secs.max(0.0);
    if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        format!("{} min {:02} s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{} h {:02} min",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

/// One attempt's lines in the report: what it ran on and for how long, how it ended, and what
/// happened around it (faults, exclusions, memory waits, a climb back).
fn write_attempt(f: &mut fmt::Formatter<'_>, a: &AttemptReport) -> fmt::Result {
    writeln!(
        f,
        "  #{} {} ({}) {} from {}",
        a.attempt,
        a.tier,
        a.device,
        a.seconds.map_or("still running".into(), duration_text),
        a.checkpoint.as_deref().unwrap_or("scratch"),
    )?;
    let mut end = a
        .ended_by
        .clone()
        .unwrap_or_else(|| "no end recorded".into());
    if let Some(s) = &a.status {
        let _ = write!(end, " [{s}]");
    }
    writeln!(
        f,
        "      ended: {end}; {} checkpoint(s) written, {} kept",
        a.checkpoints_written,
        duration_text(a.kept_seconds)
    )?;
    if !a.gpus.is_empty() {
        let gpus: Vec<String> = a.gpus.iter().map(u64::to_string).collect();
        writeln!(f, "      GPUs: {}", gpus.join(","))?;
    }
    if let Some(fault) = &a.fault {
        writeln!(
            f,
            "      fault: {} ({}) on {}",
            fault.class, fault.rule, fault.stream
        )?;
        writeln!(f, "      line:  {}", fault.line)?;
    }
    // One cause per incident; the faults that only followed from it are counted.
    if a.incidents.len() > 1 || a.incidents.iter().any(|i| i.followed > 0) {
        for i in &a.incidents {
            writeln!(
                f,
                "      incident: {} ({}); {} later fault(s) followed from it",
                i.cause.class, i.cause.rule, i.followed
            )?;
        }
    }
    if !a.excluded.is_empty() {
        writeln!(
            f,
            "      excluded for the rest of the run: {}",
            a.excluded.join(", ")
        )?;
    }
    if let Some(wait) = &a.memory_wait {
        writeln!(
            f,
            "      before it, waited {wait} (the faulted attempt's GPU memory)"
        )?;
    }
    if let Some(to) = &a.climbed_to {
        writeln!(
            f,
            "      climbed back to tier `{to}` from its newest checkpoint"
        )?;
    }
    Ok(())
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "command:  {}", self.command.join(" "))?;
        writeln!(
            f,
            "run:      {} -> {} ({})",
            self.started_at.as_deref().unwrap_or("?"),
            self.ended_at.as_deref().unwrap_or("?"),
            duration_text(self.wall_seconds)
        )?;
        match (&self.outcome, &self.detail) {
            (Some(o), Some(d)) => writeln!(
                f,
                "outcome:  {o}: {d} (exit code {})",
                self.exit_code.map_or("?".into(), |c| c.to_string())
            )?,
            _ => writeln!(
                f,
                "outcome:  none recorded: gpuwarden died or is still running (`gpuwarden resume` continues a dead one)"
            )?,
        }
        if self.resumed > 0 {
            writeln!(
                f,
                "resumed:  {} time(s) by `gpuwarden resume`",
                self.resumed
            )?;
        }
        let g = &self.goodput;
        writeln!(
            f,
            "goodput:  {} ({} of {} produced progress that was kept{})",
            g.ratio.map_or("-".into(), |r| format!("{:.0}%", r * 100.0)),
            duration_text(g.kept_seconds),
            duration_text(g.wall_seconds),
            if g.basis == "upper_bound" {
                "; an upper bound: this journal has no checkpoint times"
            } else {
                ""
            }
        )?;
        writeln!(f)?;
        writeln!(f, "attempts:")?;
        for a in &self.attempts {
            write_attempt(f, a)?;
        }
        writeln!(f)?;
        writeln!(f, "time per tier:")?;
        for t in &self.tiers {
            writeln!(
                f,
                "  {:<12} {:>3} attempt(s)  {}",
                t.tier,
                t.attempts,
                duration_text(t.seconds)
            )?;
        }
        writeln!(f)?;
        match self.checkpoints_written.last() {
            Some(last) => writeln!(
                f,
                "checkpoints: {} written; newest {} (attempt {})",
                self.checkpoints_written.len(),
                last.path,
                last.attempt
            )?,
            None => writeln!(f, "checkpoints: none recorded as written")?,
        }
        if self.foreign.is_empty() {
            writeln!(f, "foreign faults: none")?;
        } else {
            writeln!(f, "foreign faults (not the job's; never acted on):")?;
            for x in &self.foreign {
                writeln!(
                    f,
                    "  {:>6}x {} ({}): {}",
                    x.count, x.class, x.rule, x.example
                )?;
            }
        }
        let h = &self.health;
        if h.job_faults + h.foreign_faults > 0 {
            let classes: Vec<String> = h.by_class.iter().map(|(c, n)| format!("{c} {n}")).collect();
            writeln!(
                f,
                "GPU health: {} fault(s) on the job's GPUs, {} on others ({})",
                h.job_faults,
                h.foreign_faults,
                classes.join(", ")
            )?;
        } else {
            writeln!(f, "GPU health: no health faults recorded")?;
        }
        if !self.warnings.is_empty() {
            writeln!(f, "warnings: {}", self.warnings.len())?;
            for w in self.warnings.iter().take(5) {
                writeln!(f, "  {w}")?;
            }
        }
        if !self.skipped.is_empty() {
            writeln!(
                f,
                "skipped {} of {} journal line(s):",
                self.skipped.len(),
                self.lines
            )?;
            for s in &self.skipped {
                writeln!(f, "  line {}: {}", s.line, s.reason)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_with_the_journal_format() {
        for secs in [0u64, 951_782_400, 1_795_650_123, 4_107_456_000] {
            let t =
                std::time::UNIX_EPOCH + std::time::Duration::from_micros(secs * 1_000_000 + 250);
            let text = crate::time::rfc3339(t);
            let back = parse_time(&text).unwrap();
            assert!((back - secs as f64 - 0.000_25).abs() < 1e-6, "{text}");
        }
        assert_eq!(parse_time("yesterday"), None);
    }

    fn line(at: u32, body: &str) -> String {
        format!(
            "{{\"at\":\"2026-12-05T01:{:02}:{:02}.000000Z\",{body}}}",
            at / 60,
            at % 60
        )
    }

    /// A night: GPU attempt writes two checkpoints and faults; CPU attempt resumes from the
    /// second, writes one, finishes.
    fn night() -> String {
        [
            line(0, r#""event":"run_started","command":["python","train.py"],"ladder":["gpu","cpu"]"#),
            line(1, r#""event":"attempt_started","attempt":1,"tier":"gpu","device":"cuda","checkpoint":null,"pid":10"#),
            line(11, r#""event":"checkpoint_saved","attempt":1,"path":"ckpt/s2","step":2"#),
            line(21, r#""event":"checkpoint_saved","attempt":1,"path":"ckpt/s4","step":4"#),
            line(25, r#""event":"fault","attempt":1,"class":"gpu_memory_fault","rule":"hsa-x","action":"fallback","stream":"stderr","line":"Memory access fault by GPU node-1""#),
            line(26, r#""event":"attempt_ended","attempt":1,"tier":"gpu","status":{"signal":6,"name":"SIGABRT"},"ended_by":"gpu_memory_fault (hsa-x)","faults":{"hsa-x":1},"seconds":25.0"#),
            line(26, r#""event":"foreign_fault","class":"gpu_hang","rule":"amdgpu-ring","line":"ring gfx timeout","facility":"kernel","seq":4,"reason":"other pid""#),
            line(26, r#""event":"foreign_repeats","class":"gpu_hang","rule":"amdgpu-ring","count":9,"whom":1,"seconds":60.0"#),
            line(27, r#""event":"mystery_from_the_future","x":1"#),
            line(30, r#""event":"attempt_started","attempt":2,"tier":"cpu","device":"cpu","checkpoint":"ckpt/s4","pid":11"#),
            line(50, r#""event":"checkpoint_saved","attempt":2,"path":"ckpt/s6","step":6"#),
            line(60, r#""event":"attempt_ended","attempt":2,"tier":"cpu","status":{"code":0},"ended_by":"finished (exit status 0)","faults":{},"seconds":30.0"#),
            line(60, r#""event":"run_finished","outcome":"succeeded","detail":"the job finished","attempts":2,"restarts":1,"exit_code":0"#),
        ]
        .join("\n")
    }

    /// Issue 13: an Xid 79 and what followed from it (a second Xid 79, fallen off the bus, the
    /// NCCL watchdog's fallout) are one incident with one cause.
    #[test]
    fn an_incident_names_one_cause_and_counts_what_followed() {
        let root = r#""incident":{"role":"root"}"#;
        let cascade = r#""incident":{"role":"cascade","root":{"class":"gpu_lost","rule":"xid-79","line":"NVRM: Xid (PCI:0000:06:00): 79, GPU has fallen off the bus."},"why":"w"}"#;
        let journal = [
            line(0, r#""event":"run_started","command":["python","train.py"],"ladder":["gpu","cpu"]"#),
            line(1, r#""event":"attempt_started","attempt":1,"tier":"gpu","device":"cuda","checkpoint":null,"pid":10"#),
            line(5, &format!(r#""event":"fault","attempt":1,"class":"gpu_lost","rule":"xid-79","action":"fallback","stream":"kernel","line":"NVRM: Xid (PCI:0000:06:00): 79, GPU has fallen off the bus.",{root}"#)),
            line(5, &format!(r#""event":"fault","attempt":1,"class":"gpu_lost","rule":"nv-fallen-off-bus","action":"fallback","stream":"kernel","line":"NVRM: GPU 0000:06:00.0: GPU has fallen off the bus.",{cascade}"#)),
            line(6, &format!(r#""event":"fault","attempt":1,"class":"collective_failure","rule":"nccl-watchdog-exception","action":"restart","stream":"stderr","line":"watchdog",{cascade}"#)),
            line(7, r#""event":"attempt_ended","attempt":1,"tier":"gpu","status":{"signal":15,"name":"SIGTERM"},"ended_by":"gpu_lost (xid-79)","faults":{},"seconds":6.0"#),
        ]
        .join("\n");
        let r = build(&journal);
        let a = &r.attempts[0];
        assert_eq!(a.incidents.len(), 1, "{:?}", a.incidents);
        assert_eq!(a.incidents[0].cause.rule, "xid-79");
        assert_eq!(a.incidents[0].followed, 2);
        let text = r.to_string();
        assert!(
            text.contains("incident: gpu_lost (xid-79); 2 later fault(s) followed from it"),
            "{text}"
        );
    }

    #[test]
    fn a_night_in_one_report() {
        let mut text = night();
        text.push_str("\n{\"at\":\"2026-12-05T01:01:0"); // torn last line
        let r = build(&text);
        assert_eq!(r.attempts.len(), 2);
        assert_eq!(r.outcome.as_deref(), Some("succeeded"));
        assert_eq!(r.wall_seconds, 60.0);
        let a1 = &r.attempts[0];
        assert_eq!(a1.status.as_deref(), Some("signal 6 (SIGABRT)"));
        assert_eq!(
            a1.fault.as_ref().unwrap().line,
            "Memory access fault by GPU node-1"
        );
        assert_eq!(a1.checkpoints_written, 2);
        // Kept: start (1) to the checkpoint attempt 2 resumed from (21) = 20 s; then attempt 2
        // whole (30 s). Goodput 50/60.
        assert_eq!(a1.kept_seconds, 20.0);
        assert_eq!(r.attempts[1].kept_seconds, 30.0);
        assert_eq!(r.goodput.ratio, Some(50.0 / 60.0));
        assert_eq!(r.goodput.basis, "checkpoint_times");
        assert_eq!(r.tiers.len(), 2);
        assert_eq!(
            (r.tiers[0].tier.as_str(), r.tiers[0].seconds),
            ("gpu", 25.0)
        );
        assert_eq!(r.foreign.len(), 1);
        assert_eq!(r.foreign[0].count, 10);
        // The unknown event and the torn line are skipped, and said.
        assert_eq!(r.skipped.len(), 2);
        assert!(r.skipped[0].reason.contains("mystery_from_the_future"));
        assert!(r.skipped[1].reason.contains("torn"));
        let shown = r.to_string();
        assert!(shown.contains("goodput:  83%"), "{shown}");
        assert!(shown.contains("skipped 2 of 14"), "{shown}");
    }

    #[test]
    fn progress_lost_to_the_fault_is_not_kept() {
        // Attempt 2 resumes from s2, not from attempt 1's newer s4 (torn, say): only up to s2.
        let text = night().replace(
            r#""checkpoint":"ckpt/s4","pid":11"#,
            r#""checkpoint":"ckpt/s2","pid":11"#,
        );
        let r = build(&text);
        assert_eq!(r.attempts[0].kept_seconds, 10.0);
    }

    #[test]
    fn a_journal_without_an_end_still_reports() {
        let text: Vec<String> = night().lines().take(5).map(String::from).collect();
        let r = build(&text.join("\n"));
        assert_eq!(r.outcome, None);
        assert_eq!(r.attempts[0].seconds, None);
        // The last attempt keeps what it wrote to disk.
        assert_eq!(r.attempts[0].kept_seconds, 20.0);
        assert_eq!(r.tiers[0].seconds, 24.0);
        assert!(r.to_string().contains("none recorded"));
    }

    #[test]
    fn without_checkpoint_records_goodput_is_an_upper_bound() {
        let text: Vec<String> = night()
            .lines()
            .filter(|l| !l.contains("checkpoint_saved"))
            .map(String::from)
            .collect();
        let r = build(&text.join("\n"));
        assert_eq!(r.goodput.basis, "upper_bound");
        assert_eq!(r.attempts[0].kept_seconds, 25.0);
    }
}
