//! `gpuwarden resume RUN_DIR`: continue a run whose gpuwarden died. The journal says how the
//! run was started (`run_started`: gpuwarden's argv and working directory) and where it stopped
//! (the last attempt, its tier, the restarts used); the run goes on in the same directory,
//! appending to the same journal after a `run_resumed` record.

use std::path::Path;

use clap::Parser;
use gpuwarden::executor::Resume;
use gpuwarden::exit;
use gpuwarden::report::strings_of;

use super::error;
use super::journal::{RunJournal, event};
use crate::cli::{Cli, Command};

pub fn resume(run_dir: &Path) -> i32 {
    match plan_resume(run_dir) {
        Ok((args, resume)) => super::run::run_with(args, Some(resume)),
        Err(message) => {
            error(message);
            exit::USAGE
        }
    }
}

/// Reads the journal; answers the original run's flags (pointed at this run directory) and
/// where to continue, or why the run cannot be resumed.
fn plan_resume(run_dir: &Path) -> Result<(crate::cli::RunArgs, Resume), String> {
    let run_dir = std::path::absolute(run_dir).map_err(|e| e.to_string())?;
    let journal = RunJournal::read(&run_dir)?;
    let records = &journal.records;
    let started = journal
        .started()
        .map_err(|e| format!("{e}: nothing to resume"))?;
    if let Some(done) = journal.finished() {
        return Err(format!(
            "the run in {} is over ({}: {}); start a new one with `gpuwarden run`",
            run_dir.display(),
            done["outcome"].as_str().unwrap_or("?"),
            done["detail"].as_str().unwrap_or("")
        ));
    }
    // The gpuwarden that ran it last must be gone, or two would drive one job.
    let last_pid = journal.last_gpuwarden_pid();
    if let Some(pid) = last_pid
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("gpuwarden"))
    {
        return Err(format!(
            "gpuwarden (pid {pid}) is still running this run; stop it first, or let it go on"
        ));
    }
    let argv = strings_of(started, "argv");
    if argv.is_empty() {
        return Err(format!(
            "{} was written by a gpuwarden that did not record its command line; it cannot be resumed",
            journal.path.display()
        ));
    }
    let cli = Cli::try_parse_from(&argv)
        .map_err(|e| format!("cannot read the original command line again: {e}"))?;
    let Command::Run(mut args) = cli.command else {
        return Err("only runs started with `gpuwarden run` can be resumed".into());
    };
    if let Some(cwd) = started["cwd"].as_str() {
        // Relative paths of the command, the config and the checkpoints mean what they meant.
        std::env::set_current_dir(cwd)
            .map_err(|e| format!("cannot enter the run's working directory {cwd}: {e}"))?;
    }
    args.run_dir = Some(run_dir.clone());

    // Where it stopped: a scheduled restart not yet started, or the attempt that was running.
    let mut attempt = 1;
    let mut tier = started["ladder"][0].as_str().unwrap_or("").to_string();
    for r in records {
        match event(r) {
            "attempt_started" => {
                attempt = r["attempt"].as_u64().unwrap_or(0) as u32 + 1;
                tier = r["tier"].as_str().unwrap_or("").to_string();
            }
            "restart_scheduled" | "run_resumed" => {
                attempt = r["attempt"].as_u64().unwrap_or(1) as u32;
                tier = r["tier"].as_str().unwrap_or("").to_string();
            }
            _ => {}
        }
    }
    let restarts = records
        .iter()
        .filter(|r| event(r) == "restart_scheduled")
        .count() as u32;
    // GPUs excluded after a fault stay excluded (issue 14), named by PCI address.
    let excluded_pci = records
        .iter()
        .filter(|r| event(r) == "gpus_excluded")
        .flat_map(|r| r["gpus"].as_array().cloned().unwrap_or_default())
        .filter_map(|g| {
            let ordinal = g["ordinal"].as_u64().and_then(|o| u32::try_from(o).ok())?;
            Some((g["pci"].as_str()?.to_string(), ordinal))
        })
        .collect();
    let reason = match last_pid {
        Some(pid) => format!("gpuwarden pid {pid} is gone and the journal has no end"),
        None => "the journal has no end".to_string(),
    };
    Ok((
        args,
        Resume {
            attempt,
            tier,
            restarts,
            reason,
            excluded_pci,
        },
    ))
}
