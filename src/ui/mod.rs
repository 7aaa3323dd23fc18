//! The live display: `gpuwarden watch` and `gpuwarden run --ui`.
//!
//! Three rooms, as bottom (btm) keeps them apart:
//! - [`collect`] fills a [`Board`](crate::snapshot::Board) from the health sampler and the
//!   kernel-log follower, on their own threads (`watch`; during a run the executor does it);
//! - this module draws one [`Snapshot`] copy into a ratatui frame, and nothing else: [`draw`] is a
//!   pure function of the snapshot and the [`View`], so tests render it into a `TestBackend`;
//! - [`terminal`] owns the real terminal (raw mode, alternate screen, cursor, panic hook) and the
//!   loop that redraws a few times a second and turns keys into [`Key`]s.
//!
//! Beside them, [`console`] routes the job's output to the display while it is up, and
//! [`history`] writes the run's GPU health to `health.jsonl` (with or without the display).
//!
//! It is not for decisions: a key that asks for something (stop the job) goes back to whoever
//! owns the run, never into the snapshot.

pub mod collect;
pub mod console;
pub mod history;
pub mod simulated;
pub mod terminal;

use std::time::{Duration, Instant, SystemTime};

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Sparkline, Wrap};

use crate::rules::Severity;
use crate::snapshot::{FaultNote, GpuState, JobInfo, JobState, KernelState, Snapshot};
use crate::sources::health::{GpuSample, Value};

/// What the view needs besides the snapshot: the clocks (passed in, so a render is
/// reproducible) and the display's own state.
#[derive(Clone, Debug)]
pub struct View {
    /// "now" for ages (last sample, uptime).
    pub now: Instant,
    /// "now" for the clock in the title and checkpoint ages.
    pub wall: SystemTime,
    /// `watch` or `run`.
    pub title: String,
    /// The output pane and the fault feed stop following new lines.
    pub paused: bool,
    pub help: bool,
    /// `s` was pressed: the stop question is on screen.
    pub confirm_stop: bool,
    /// `f` was pressed: the fallback question is on screen.
    pub confirm_fallback: bool,
    /// A short notice in the bottom line (what the last key did).
    pub notice: Option<String>,
}

impl View {
    pub fn new(title: &str) -> View {
        View {
            now: Instant::now(),
            wall: SystemTime::now(),
            title: title.to_string(),
            paused: false,
            help: false,
            confirm_stop: false,
            confirm_fallback: false,
            notice: None,
        }
    }
}

/// What a key asks for, decided by [`key`] from the view's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Key {
    Nothing,
    Quit,
    /// Stop the job gracefully (confirmed): what SIGTERM does.
    Stop,
    /// Stop the live attempt and restart it one tier down the ladder (confirmed).
    Fallback,
    /// Ctrl-C during a run: what Ctrl-C does without the display (SIGINT; twice kills).
    Interrupt,
}

/// Applies one key press to the view and says what it asks for. `job` is whether there is a job
/// to stop (`run --ui`); without one `s` does nothing.
pub fn key(view: &mut View, c: char, ctrl: bool, job: bool) -> Key {
    if ctrl && c == 'c' {
        if job {
            view.notice = Some("interrupting the job (Ctrl-C again kills it)".into());
            return Key::Interrupt;
        }
        return Key::Quit;
    }
    if view.confirm_stop {
        view.confirm_stop = false;
        return if c == 'y' {
            view.notice = Some("stopping the job (as SIGTERM would)".into());
            Key::Stop
        } else {
            view.notice = Some("the job keeps running".into());
            Key::Nothing
        };
    }
    if view.confirm_fallback {
        view.confirm_fallback = false;
        return if c == 'y' {
            view.notice = Some("falling back: the supervisor says what it does".into());
            Key::Fallback
        } else {
            view.notice = Some("the job keeps running on its tier".into());
            Key::Nothing
        };
    }
    match c {
        'q' => return Key::Quit,
        '?' | 'h' => view.help = !view.help,
        'p' => {
            view.paused = !view.paused;
            view.notice = Some(if view.paused { "paused" } else { "following" }.into());
        }
        's' if job => view.confirm_stop = true,
        'f' if job => view.confirm_fallback = true,
        _ => {}
    }
    Key::Nothing
}

/// Rows of one GPU at least: the numbers, then the 60 s history.
const GPU_ROWS: u16 = 2;

/// Rows each GPU gets: the history grows taller (up to 3 rows) where the screen has room and
/// the fault feed keeps at least 8.
/// A GPU with processes gets one row more for them.
fn gpu_rows(area: Rect, snap: &Snapshot) -> u16 {
    let n = snap.gpus.len().max(1) as u16;
    let fixed = 1 + 1 + 2 + if snap.job.is_some() { 4 + 6 } else { 0 };
    let processes = u16::from(snap.gpus.iter().any(|g| !g.processes.is_empty()));
    let room = area.height.saturating_sub(fixed + 8) / n;
    room.clamp(GPU_ROWS + processes, GPU_ROWS + 2 + processes)
}

/// Draws everything. Pure: what it shows comes from `snap` and `view` only.
pub fn draw(frame: &mut Frame<'_>, snap: &Snapshot, view: &View) {
    let area = frame.area();
    let per_gpu = gpu_rows(area, snap);
    let gpu_rows = (snap.gpus.len().max(1) as u16) * per_gpu + 2;
    let job_rows = if snap.job.is_some() { 4 } else { 0 };
    let [title, gpus, job, rest, bottom] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Max(gpu_rows),
        Constraint::Length(job_rows),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(area);
    draw_title(frame, title, snap, view);
    draw_gpus(frame, gpus, per_gpu, snap);
    if let Some(info) = &snap.job {
        draw_job(frame, job, info, view);
        let [output, faults] =
            Layout::vertical([Constraint::Percentage(60), Constraint::Percentage(40)]).areas(rest);
        draw_output(frame, output, snap, view);
        draw_faults(frame, faults, snap);
    } else {
        draw_faults(frame, rest, snap);
    }
    draw_sources(frame, bottom, snap, view);
    if view.help {
        draw_help(frame, area, snap.job.is_some());
    } else if view.confirm_stop {
        draw_confirm(frame, area);
    } else if view.confirm_fallback {
        draw_confirm_fallback(frame, area);
    }
}

fn clock(t: SystemTime) -> String {
    crate::time::rfc3339(t)[11..19].to_string()
}

fn draw_title(frame: &mut Frame<'_>, area: Rect, snap: &Snapshot, view: &View) {
    let mut spans = vec![
        Span::styled(
            format!(" gpuwarden {} ", view.title),
            Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED),
        ),
        Span::raw(format!(
            " {} GPU(s)  {} UTC",
            snap.gpus.len(),
            clock(view.wall)
        )),
    ];
    if view.paused {
        spans.push(Span::styled("  PAUSED", Style::new().fg(Color::Yellow)));
    }
    spans.push(Span::styled(
        "  q quit  ? help",
        Style::new().fg(Color::DarkGray),
    ));
    frame.render_widget(Line::from(spans), area);
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// A value as text: the number, `-` when not reported, `ERR` when the source failed.
fn shown<T: Copy>(value: &Value<T>, f: impl Fn(T) -> String) -> String {
    match value {
        Value::Known(v) => f(*v),
        Value::Unknown => "-".into(),
        Value::Error(_) => "ERR".into(),
    }
}

/// VRAM as a bar of `width` cells and `used/total G`.
fn vram_gauge(sample: &GpuSample, width: usize) -> (String, String, Color) {
    let (used, total) = (
        sample.vram_used_bytes.known(),
        sample.vram_total_bytes.known(),
    );
    let fraction = match (used, total) {
        (Some(u), Some(t)) if t > 0 => Some((u as f64 / t as f64).clamp(0.0, 1.0)),
        _ => None,
    };
    let filled = fraction.map_or(0, |f| (f * width as f64).round() as usize);
    let bar = format!("{}{}", "█".repeat(filled), "░".repeat(width - filled));
    let text = match (used, total) {
        (Some(u), Some(t)) => format!("{:>4.1}/{:.1}G", gib(u), gib(t)),
        (None, Some(t)) => format!("   ?/{:.1}G", gib(t)),
        (Some(u), None) => format!("{:>4.1}G", gib(u)),
        (None, None) => "-".into(),
    };
    let color = match fraction {
        Some(f) if f >= 0.95 => Color::Red,
        Some(f) if f >= 0.80 => Color::Yellow,
        _ => Color::Green,
    };
    (bar, text, color)
}

fn ecc_text(sample: &GpuSample) -> (String, Style) {
    if sample.ecc.is_empty() {
        return ("-".into(), Style::new());
    }
    let sum = |f: fn(&crate::sources::health::EccCount) -> &Value<u64>| -> u64 {
        sample.ecc.iter().filter_map(|c| f(c).known()).sum()
    };
    let (ue, ce) = (sum(|c| &c.uncorrectable), sum(|c| &c.correctable));
    let style = if ue > 0 {
        Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)
    } else if ce > 0 {
        Style::new().fg(Color::Yellow)
    } else {
        Style::new()
    };
    (format!("{ue}/{ce}"), style)
}

fn temperature_style(c: Option<f64>) -> Style {
    match c {
        Some(c) if c >= 90.0 => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        Some(c) if c >= 80.0 => Style::new().fg(Color::Yellow),
        _ => Style::new(),
    }
}

/// Cuts `text` to `width` characters, padded.
fn fit(text: &str, width: usize) -> String {
    let cut: String = text.chars().take(width).collect();
    format!("{cut:<width$}")
}

fn draw_gpus(frame: &mut Frame<'_>, area: Rect, rows: u16, snap: &Snapshot) {
    let block = Block::new().borders(Borders::ALL).title(Line::from(vec![
        Span::styled(" GPUs ", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw("util / VRAM / temp over 60 s "),
    ]));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    if snap.gpus.is_empty() {
        let text = if snap.sources.health.is_empty() {
            "no GPU found (no amdgpu device in sysfs, no nvidia-smi)"
        } else {
            "waiting for the first sample"
        };
        frame.render_widget(Paragraph::new(text), inner);
        return;
    }
    for (i, gpu) in snap.gpus.iter().enumerate() {
        let top = inner.y + (i as u16) * rows;
        if top + rows > inner.y + inner.height {
            let more = snap.gpus.len() - i;
            if top < inner.y + inner.height {
                let row = Rect::new(inner.x, top, inner.width, 1);
                frame.render_widget(Line::from(format!(" ... {more} more GPU(s)")), row);
            }
            break;
        }
        let excluded = snap
            .job
            .as_ref()
            .is_some_and(|job| job.excludes(&gpu.sample.device));
        draw_gpu(
            frame,
            Rect::new(inner.x, top, inner.width, rows),
            gpu,
            excluded,
        );
    }
}

/// One GPU's line and history; an `excluded` GPU (hidden from the job after a fault) says so
/// in place of part of its name.
fn draw_gpu(frame: &mut Frame<'_>, area: Rect, gpu: &GpuState, excluded: bool) {
    let s = &gpu.sample;
    let width = area.width as usize;
    // Fixed columns: index 3, arch 9, util 5, VRAM text 12, temperature 6, power 6, ECC 6.
    let fixed = 3 + 9 + 5 + 1 + 12 + 6 + 6 + 6;
    let bar_width = if width >= 96 { 16 } else { 8 };
    let tag = if excluded { "EXCLUDED " } else { "" };
    let name_width = width
        .saturating_sub(fixed + bar_width + 1 + tag.len())
        .clamp(6, 28);
    let index = s.device.index.map_or("?".into(), |i| i.to_string());
    let name = s.name.clone().unwrap_or_else(|| "unknown GPU".into());
    let arch = s.arch.clone().unwrap_or_else(|| "-".into());
    let (bar, vram, vram_color) = vram_gauge(s, bar_width);
    let temperature = s.temperature_c.known();
    let (ecc, ecc_style) = ecc_text(s);
    let mut spans = vec![
        Span::styled(
            format!("{index:>2} "),
            Style::new().add_modifier(Modifier::BOLD),
        ),
        Span::styled(
            tag,
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        ),
        Span::raw(fit(&name, name_width)),
        Span::styled(format!(" {}", fit(&arch, 8)), Style::new().fg(Color::Cyan)),
        Span::styled(
            format!(
                "{:>5}",
                shown(&s.utilization_percent, |u| format!("{u:.0}%"))
            ),
            Style::new().add_modifier(Modifier::BOLD),
        ),
        Span::raw(" "),
        Span::styled(bar, Style::new().fg(vram_color)),
        Span::raw(format!("{vram:>12}")),
        Span::styled(
            format!("{:>6}", shown(&s.temperature_c, |c| format!("{c:.0}°C"))),
            temperature_style(temperature),
        ),
        Span::raw(format!("{:>6}", shown(&s.power_w, |w| format!("{w:.0}W")))),
        Span::styled(format!(" {:>5}", ecc), ecc_style),
    ];
    if !s.present {
        spans = vec![
            Span::styled(
                format!("{index:>2} "),
                Style::new().add_modifier(Modifier::BOLD),
            ),
            Span::raw(fit(&name, name_width)),
            Span::styled(
                " GONE: the device left sysfs",
                Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
            ),
        ];
    }
    frame.render_widget(Line::from(spans), Rect::new(area.x, area.y, area.width, 1));
    let mut rows = area.height - 1;
    if !gpu.processes.is_empty() && rows >= 2 {
        rows -= 1;
        let line = Rect::new(area.x, area.y + area.height - 1, area.width, 1);
        frame.render_widget(process_line(gpu, area.width as usize), line);
    }
    let history = Rect::new(area.x, area.y + 1, area.width, rows);
    draw_history(frame, history, gpu);
}

/// `procs python3 4242 8.9G  rccl 77 0.2G  +3 more`, as many as fit.
fn process_line(gpu: &GpuState, width: usize) -> Line<'static> {
    let mut text = String::from("   procs");
    let mut shown = 0;
    for p in &gpu.processes {
        let item = format!(
            "  {} {} {:.1}G",
            p.name.as_deref().unwrap_or("pid"),
            p.pid,
            gib(p.vram_bytes)
        );
        if text.chars().count() + item.chars().count() + 10 > width {
            break;
        }
        text.push_str(&item);
        shown += 1;
    }
    if shown < gpu.processes.len() {
        text.push_str(&format!("  +{} more", gpu.processes.len() - shown));
    }
    Line::styled(text, Style::new().fg(Color::Gray))
}

fn draw_history(frame: &mut Frame<'_>, area: Rect, gpu: &GpuState) {
    let label = match gpu.sample.hotspot_c.known() {
        Some(c) => format!("   hot {c:>3.0}°C"),
        None => String::new(),
    };
    let [label_area, util, vram, temp] = Layout::horizontal([
        Constraint::Length(12),
        Constraint::Fill(1),
        Constraint::Fill(1),
        Constraint::Fill(1),
    ])
    .spacing(1)
    .areas(area);
    frame.render_widget(
        Span::styled(label, temperature_style(gpu.sample.hotspot_c.known())),
        label_area,
    );
    let total = gpu.sample.vram_total_bytes.known().unwrap_or(0).max(1) as f64;
    let line = |pick: &dyn Fn(&crate::snapshot::Point) -> Option<u64>| -> Vec<u64> {
        gpu.history.iter().map(|p| pick(p).unwrap_or(0)).collect()
    };
    let series = [
        (
            "util",
            util,
            100,
            Color::Green,
            line(&|p| p.utilization_percent.map(|u| u.round() as u64)),
        ),
        (
            "vram",
            vram,
            100,
            Color::Magenta,
            line(&|p| p.vram_used_bytes.map(|b| (b as f64 * 100.0 / total) as u64)),
        ),
        (
            "temp",
            temp,
            80,
            Color::Yellow,
            // 20 °C to 100 °C: the range where a change means something.
            line(&|p| {
                p.temperature_c
                    .map(|c| (c - 20.0).round().clamp(0.0, 80.0) as u64)
            }),
        ),
    ];
    for (name, rect, max, color, points) in series {
        let [tag, line] =
            Layout::horizontal([Constraint::Length(5), Constraint::Fill(1)]).areas(rect);
        let tag = Rect::new(tag.x, tag.y + tag.height - 1, tag.width, 1);
        frame.render_widget(Span::styled(name, Style::new().fg(Color::DarkGray)), tag);
        // The newest points on the right, as many as fit.
        let skip = points.len().saturating_sub(line.width as usize);
        frame.render_widget(
            Sparkline::default()
                .data(&points[skip..])
                .max(max)
                .style(Style::new().fg(color)),
            line,
        );
    }
}

fn age(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

fn draw_job(frame: &mut Frame<'_>, area: Rect, job: &JobInfo, view: &View) {
    let (state, color) = match &job.state {
        JobState::Starting => ("starting".to_string(), Color::Cyan),
        JobState::Running => ("running".to_string(), Color::Green),
        JobState::Stopping => ("stopping".to_string(), Color::Yellow),
        JobState::Backoff => ("waiting to restart".to_string(), Color::Yellow),
        JobState::Finished(outcome) => (outcome.clone(), Color::Cyan),
    };
    let block = Block::new().borders(Borders::ALL).title(Line::from(vec![
        Span::styled(" Job ", Style::new().add_modifier(Modifier::BOLD)),
        Span::styled(format!("{state} "), Style::new().fg(color)),
    ]));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let uptime = job
        .started
        .and_then(|t| view.wall.duration_since(t).ok())
        .map_or("-".into(), age);
    let pid = job.pid.map_or("-".into(), |p| p.to_string());
    let budget = job.max_restarts.saturating_sub(job.restarts);
    let mut first = format!(
        "attempt {} on {} ({})  pid {pid}  up {uptime}  restarts {}/{} ({budget} left)",
        job.attempt, job.tier, job.device, job.restarts, job.max_restarts
    );
    if !job.excluded.is_empty() {
        let list = |gpus: &[crate::gpu::JobGpu]| {
            gpus.iter()
                .map(|g| g.index.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        first.push_str(&format!(
            "  GPUs {} (excluded {})",
            match job.gpus.is_empty() {
                true => "none".to_string(),
                false => list(&job.gpus),
            },
            list(&job.excluded)
        ));
    }
    let checkpoint = match &job.last_checkpoint {
        Some((path, at)) => {
            let ago = view.wall.duration_since(*at).map_or("-".into(), age);
            format!("checkpoint {} ({ago} ago)", path.display())
        }
        None => match &job.resumed_from {
            Some(path) => format!("resumed from {}", path.display()),
            None => "no checkpoint yet".into(),
        },
    };
    let command = job.command.join(" ");
    let lines = vec![
        Line::from(first),
        Line::from(vec![
            Span::raw(checkpoint),
            Span::styled(format!("  $ {command}"), Style::new().fg(Color::DarkGray)),
        ]),
    ];
    frame.render_widget(Paragraph::new(lines), inner);
}

fn draw_output(frame: &mut Frame<'_>, area: Rect, snap: &Snapshot, view: &View) {
    let title = if view.paused {
        " Output (paused) "
    } else {
        " Output "
    };
    let block = Block::new().borders(Borders::ALL).title(Span::styled(
        title,
        Style::new().add_modifier(Modifier::BOLD),
    ));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let rows = inner.height as usize;
    let lines: Vec<Line<'_>> = snap
        .output
        .iter()
        .skip(snap.output.len().saturating_sub(rows))
        .map(|(stderr, text)| {
            // gpuwarden's own lines (see `console::voice`) stand apart from the job's.
            if text.starts_with("gpuwarden:") {
                Line::styled(text.as_str(), Style::new().fg(Color::Cyan))
            } else if *stderr {
                Line::styled(text.as_str(), Style::new().fg(Color::LightRed))
            } else {
                Line::raw(text.as_str())
            }
        })
        .collect();
    frame.render_widget(Paragraph::new(lines), inner);
}

fn severity_style(s: Severity) -> Style {
    match s {
        Severity::Critical => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        Severity::Error => Style::new().fg(Color::LightRed),
        Severity::Warning => Style::new().fg(Color::Yellow),
        Severity::Info => Style::new().fg(Color::Blue),
    }
}

fn severity_tag(s: Severity) -> &'static str {
    match s {
        Severity::Critical => "CRIT",
        Severity::Error => "ERR ",
        Severity::Warning => "WARN",
        Severity::Info => "INFO",
    }
}

/// A fault in the feed: one line (header and message), or two where there is room (the
/// header with the reason a foreign fault was not acted on, then the message whole).
fn fault_lines(note: &FaultNote, job: bool, roomy: bool) -> Vec<Line<'_>> {
    let mut header = fault_line(note, job);
    if !roomy {
        return vec![header];
    }
    header.spans.pop();
    if let Some(reason) = &note.reason {
        header.spans.push(Span::styled(
            format!("  ({reason})"),
            Style::new().fg(Color::DarkGray),
        ));
    }
    let message = Line::styled(
        format!("    {}", note.line.trim()),
        Style::new().fg(Color::Gray),
    );
    vec![header, message]
}

fn fault_line(note: &FaultNote, job: bool) -> Line<'_> {
    let mut spans = vec![
        Span::raw(format!("{} ", clock(note.at))),
        Span::styled(severity_tag(note.severity), severity_style(note.severity)),
        Span::raw(format!(" {} [{}]", note.class, note.source)),
    ];
    if note.count > 1 {
        spans.push(Span::styled(
            format!(" x{}", note.count),
            Style::new().fg(Color::Yellow),
        ));
    }
    if job {
        match note.attempt {
            Some(a) => spans.push(Span::styled(
                format!(" attempt {a}"),
                Style::new().fg(Color::Cyan),
            )),
            None => spans.push(Span::styled(" foreign", Style::new().fg(Color::DarkGray))),
        }
    }
    spans.push(Span::styled(
        format!("  {}", note.line.trim()),
        Style::new().fg(Color::Gray),
    ));
    Line::from(spans)
}

fn draw_faults(frame: &mut Frame<'_>, area: Rect, snap: &Snapshot) {
    let job = snap.job.is_some();
    let total: u64 = snap.fault_counts.values().sum();
    let foreign: u64 = snap
        .fault_counts
        .iter()
        .filter(|((_, _, foreign), _)| *foreign)
        .map(|(_, n)| n)
        .sum::<u64>()
        + snap.sources.foreign_held;
    let storms = snap.faults.iter().filter(|n| n.count > 1).count();
    let mut title = vec![
        Span::styled(" Faults ", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(format!("{total} seen")),
    ];
    if job {
        title.push(Span::raw(format!(", {foreign} foreign")));
    }
    title.push(Span::raw(format!(", {storms} storm(s) ")));
    let block = Block::new().borders(Borders::ALL).title(Line::from(title));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    if snap.faults.is_empty() {
        let text = match snap.sources.kernel {
            KernelState::Off => "none (the kernel log is not followed)",
            _ => "none so far",
        };
        frame.render_widget(Span::styled(text, Style::new().fg(Color::DarkGray)), inner);
        return;
    }
    // Newest on top.
    let roomy = snap.faults.len() * 2 <= inner.height as usize;
    let lines: Vec<Line<'_>> = snap
        .faults
        .iter()
        .rev()
        .take(inner.height as usize)
        .flat_map(|n| fault_lines(n, job, roomy))
        .collect();
    frame.render_widget(Paragraph::new(lines), inner);
}

fn draw_sources(frame: &mut Frame<'_>, area: Rect, snap: &Snapshot, view: &View) {
    let src = &snap.sources;
    let (kernel, kernel_style) = match &src.kernel {
        KernelState::Off => (
            "kernel log off".to_string(),
            Style::new().fg(Color::DarkGray),
        ),
        KernelState::Following => (
            "kernel log followed".to_string(),
            Style::new().fg(Color::Green),
        ),
        KernelState::Unavailable(why) => (
            format!("kernel log unreadable: {why}"),
            Style::new().fg(Color::Yellow),
        ),
        KernelState::GaveUp(why) => (
            format!("kernel log given up: {why}"),
            Style::new().fg(Color::Red),
        ),
    };
    let sample = match snap.sample_age(view.now) {
        Some(a) => format!("{:.1}s ago", a.as_secs_f64()),
        None => "no sample yet".into(),
    };
    let health = if src.health.is_empty() {
        "no health source".to_string()
    } else {
        src.health.join("+")
    };
    let mut spans = Vec::new();
    if let Some(notice) = &view.notice {
        spans.push(Span::styled(
            format!("{notice} | "),
            Style::new().fg(Color::Cyan),
        ));
    }
    spans.push(Span::styled(kernel, kernel_style));
    if src.kernel_lost > 0 {
        spans.push(Span::styled(
            format!(" ({} records lost)", src.kernel_lost),
            Style::new().fg(Color::Yellow),
        ));
    }
    spans.push(Span::raw(format!(" | {health} {sample}")));
    let timeouts = Style::new().fg(if src.tool_timeouts > 0 {
        Color::Yellow
    } else {
        Color::Reset
    });
    spans.push(Span::styled(
        format!(" | {} tool timeouts", src.tool_timeouts),
        timeouts,
    ));
    if let Some(note) = &src.last_note {
        spans.push(Span::styled(
            format!(" | {note}"),
            Style::new().fg(Color::DarkGray),
        ));
    }
    frame.render_widget(Line::from(spans), area);
}

fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let w = width.min(area.width);
    let h = height.min(area.height);
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}

fn draw_help(frame: &mut Frame<'_>, area: Rect, job: bool) {
    let lines = if job {
        vec![
            Line::from("q          leave the display; the job goes on"),
            Line::from("s          stop the job gracefully (asks first)"),
            Line::from("Ctrl-C     interrupt the job, as without the display"),
            Line::from("p          pause / follow the output and faults"),
            Line::from("f          fall back one tier down (asks first)"),
            Line::from("?          this help"),
        ]
    } else {
        vec![
            Line::from("q, Ctrl-C  quit"),
            Line::from("p          pause / follow the fault feed"),
            Line::from("?          this help"),
        ]
    };
    let rect = centered(area, 56, lines.len() as u16 + 2);
    frame.render_widget(Clear, rect);
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(Block::new().borders(Borders::ALL).title(" Keys ")),
        rect,
    );
}

fn draw_confirm(frame: &mut Frame<'_>, area: Rect) {
    let rect = centered(area, 48, 3);
    frame.render_widget(Clear, rect);
    frame.render_widget(
        Paragraph::new("Stop the job now? y = stop, any other key = no")
            .block(Block::new().borders(Borders::ALL).title(" Stop ")),
        rect,
    );
}

fn draw_confirm_fallback(frame: &mut Frame<'_>, area: Rect) {
    let rect = centered(area, 64, 3);
    frame.render_widget(Clear, rect);
    frame.render_widget(
        Paragraph::new("Stop this attempt, go one tier down? y = yes, other = no")
            .block(Block::new().borders(Borders::ALL).title(" Fall back ")),
        rect,
    );
}

#[cfg(test)]
mod tests;
