//! The table printed when a run ends: one row per attempt, with its tier, what it resumed
//! from, how it ended and how long it took.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::config::Plan;
use crate::supervisor::{AttemptSummary, Outcome, Supervisor};
use crate::voice::{say, say_raw};

/// The table printed when the run ends.
pub fn print(sup: &Supervisor, plan: &Plan, outcome: &Outcome, journal: &Path) {
    let attempts = sup.attempts();
    // Wall time of the whole run, backoff waits included.
    let total = match (attempts.first(), attempts.last()) {
        (Some(first), Some(last)) => last
            .ended
            .unwrap_or_else(Instant::now)
            .saturating_duration_since(first.started),
        _ => Duration::ZERO,
    };
    let restarts = attempts.len().saturating_sub(1);
    say(&format!(
        "{outcome} after {} attempt{} ({} restart{}) in {:.1} s; journal: {}",
        attempts.len(),
        if attempts.len() == 1 { "" } else { "s" },
        restarts,
        if restarts == 1 { "" } else { "s" },
        total.as_secs_f64(),
        journal.display()
    ));
    // Once a GPU was excluded, which GPUs each attempt ran on is part of its story.
    let excluded = sup.excluded();
    let rows: Vec<[String; 5]> = attempts
        .iter()
        .map(|a| {
            let tier = plan
                .ladder
                .get(a.tier)
                .map_or_else(|| format!("#{}", a.tier), |t| t.name.clone());
            let tier = match excluded.is_empty() || a.gpus.is_empty() {
                true => tier,
                false => format!(
                    "{tier} (GPUs {})",
                    a.gpus
                        .iter()
                        .map(|g| g.index.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            };
            [
                a.attempt.to_string(),
                tier,
                a.checkpoint
                    .as_ref()
                    .map_or_else(|| "-".to_string(), |c| c.display().to_string()),
                a.ending.to_string(),
                format!("{:.1} s", attempt_time(a).as_secs_f64()),
            ]
        })
        .collect();
    let header = [
        "attempt".to_string(),
        "tier".into(),
        "resumed from".into(),
        "ended by".into(),
        "time".into(),
    ];
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        say_raw(&format!("  {}\n", line.join("  ").trim_end()));
    }
    if !excluded.is_empty() {
        let list: Vec<String> = excluded.iter().map(|g| g.to_string()).collect();
        say(&format!(
            "excluded after a fault, for the rest of the run: {}",
            list.join(", ")
        ));
    }
}

fn attempt_time(a: &AttemptSummary) -> Duration {
    a.ended
        .unwrap_or_else(Instant::now)
        .saturating_duration_since(a.started)
}
