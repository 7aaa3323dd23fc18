//! The table printed when a run ends: one row per attempt, with its tier, what it resumed
//! from, how it ended and how long it took, in 80 columns (long checkpoint paths lose their
//! start, long endings their end; the journal has them whole).

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
    // A climb back up the ladder starts an attempt too, but it is not a restart after a fault.
    let climbs = sup.climbs() as usize;
    let restarts = attempts.len().saturating_sub(1).saturating_sub(climbs);
    say(&format!(
        "{outcome} after {} attempt{} ({} restart{}{}) in {:.1} s; journal: {}",
        attempts.len(),
        if attempts.len() == 1 { "" } else { "s" },
        restarts,
        if restarts == 1 { "" } else { "s" },
        match climbs {
            0 => String::new(),
            1 => ", 1 climb back".to_string(),
            n => format!(", {n} climbs back"),
        },
        total.as_secs_f64(),
        crate::voice::shown_path(journal)
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
                    .map_or_else(|| "-".to_string(), |c| crate::voice::shown_path(c)),
                a.ending.to_string(),
                format!("{:.1} s", attempt_time(a).as_secs_f64()),
            ]
        })
        .collect();
    for line in table(&rows, WIDTH) {
        say_raw(&format!("{line}\n"));
    }
    if !excluded.is_empty() {
        let list: Vec<String> = excluded.iter().map(|g| g.to_string()).collect();
        say(&format!(
            "excluded after a fault, for the rest of the run: {}",
            list.join(", ")
        ));
    }
}

/// The width the table fits: the classic terminal's.
const WIDTH: usize = 80;
/// The narrowest a shortened column gets.
const MIN_COLUMN: usize = 12;
const HEADER: [&str; 5] = ["attempt", "tier", "resumed from", "ended by", "time"];

/// The table's lines, each at most `width` characters where the cells allow it: while too wide,
/// "ended by" drops the detail in parentheses, then "resumed from" is cut at its start (the file
/// name is what tells checkpoints apart), then "ended by" at its end.
fn table(rows: &[[String; 5]], width: usize) -> Vec<String> {
    let header = HEADER.map(String::from);
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    // Two spaces of indent, two between columns.
    let total = |w: &[usize; 5]| 2 + w.iter().sum::<usize>() + 2 * (w.len() - 1);
    // First "ended by" down to its endings without their parenthesised detail, then "resumed
    // from" (its start), then "ended by" again.
    let heads = rows
        .iter()
        .map(|r| r[3].split(" (").next().unwrap_or("").chars().count())
        .max()
        .unwrap_or(0);
    for (column, floor) in [
        (3, heads.max(HEADER[3].len())),
        (2, MIN_COLUMN),
        (3, MIN_COLUMN),
    ] {
        while total(&widths) > width && widths[column] > floor {
            widths[column] -= 1;
        }
    }
    std::iter::once(&header)
        .chain(rows)
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(i, cell)| {
                    let w = widths[i];
                    let cell = match i {
                        2 => cut_start(cell, w),
                        _ => cut_end(cell, w),
                    };
                    format!("{cell:<w$}")
                })
                .collect();
            format!("  {}", cells.join("  ").trim_end())
        })
        .collect()
}

fn cut_start(cell: &str, width: usize) -> String {
    let n = cell.chars().count();
    if n <= width {
        return cell.to_string();
    }
    let keep: String = cell.chars().skip(n - width + 1).collect();
    format!("…{keep}")
}

/// Cuts at the end; an ending with its detail in parentheses (`gpu_memory_fault
/// (hsa-memory-access-fault)`) loses the parentheses first.
fn cut_end(cell: &str, width: usize) -> String {
    if cell.chars().count() <= width {
        return cell.to_string();
    }
    if let Some((head, _)) = cell.split_once(" (")
        && head.chars().count() <= width
    {
        return head.to_string();
    }
    let keep: String = cell.chars().take(width - 1).collect();
    format!("{keep}…")
}

fn attempt_time(a: &AttemptSummary) -> Duration {
    a.ended
        .unwrap_or_else(Instant::now)
        .saturating_duration_since(a.started)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cells: [&str; 5]) -> [String; 5] {
        cells.map(String::from)
    }

    /// Issue 12: the demo's table was 150 columns wide (an absolute checkpoint path).
    #[test]
    fn the_table_fits_80_columns_and_keeps_the_file_name() {
        let rows = [
            row([
                "1",
                "gpu",
                "-",
                "gpu_memory_fault (hsa-memory-access-fault)",
                "0.9 s",
            ]),
            row([
                "2",
                "cpu",
                "gpuwarden-runs/20261205T105616Z/checkpoints/ckpt-step00015.safetensors",
                "finished (exit status 0)",
                "1.4 s",
            ]),
        ];
        let lines = table(&rows, 80);
        for line in &lines {
            assert!(line.chars().count() <= 80, "{line}");
        }
        assert!(lines[2].contains("…"), "{}", lines[2]);
        // The path keeps as much as the shortened ending leaves room for.
        assert!(
            lines[2].contains("heckpoints/ckpt-step00015"),
            "{}",
            lines[2]
        );
        assert!(
            lines[2].contains("ckpt-step00015.safetensors"),
            "{}",
            lines[2]
        );
        assert!(lines[1].contains("gpu_memory_fault "), "{}", lines[1]);
        assert!(!lines[1].contains("…"), "{}", lines[1]);
        assert!(lines[0].starts_with("  attempt  tier"));
        // A short table is left alone.
        let short = table(
            &[row(["1", "gpu", "-", "finished (exit status 0)", "2.0 s"])],
            80,
        );
        assert_eq!(
            short,
            [
                "  attempt  tier  resumed from  ended by                  time",
                "  1        gpu   -             finished (exit status 0)  2.0 s",
            ]
        );
    }
}
