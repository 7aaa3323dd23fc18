//! `gpuwarden drill RUN_DIR [--kind kernel|output]`: a fire drill for the night. It injects a
//! fault into a live run by the road a real one takes, so what follows (the stop, the fallback,
//! the notifications, the report) is what a real fault would cause:
//!
//! - `kernel`: an NVRM Xid 31 record (the MMU fault FACTS.md quotes from an H100) naming the live
//!   attempt's pid, into the kernel log the run follows: appended to a `--kernel-log FILE`, or
//!   written into /dev/kmsg (root only; the kernel files it under the user facility, which the
//!   rules accept). Every write ends with a newline: the kernel holds an unfinished line back.
//! - `output`: the CUDA illegal-address line, written into the job's own stderr pipe through
//!   `/proc/PID/fd/2`: the pump reads it exactly as if the job had printed it. The job itself
//!   is not harmed; gpuwarden stops it as it would a real fault.
//!
//! The live attempt comes from the journal (`attempt_started.pid`, not yet `attempt_ended`);
//! it, and the gpuwarden driving the run, must be alive. Nothing is written into the journal by
//! the drill: the run's own gpuwarden records what it sees.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use clap::Parser;
use gpuwarden::exit;
use gpuwarden::report::strings_of;

use super::error;
use super::journal::{RunJournal, event};
use crate::cli::{Cli, Command, DrillKind};

pub fn drill(run_dir: &Path, kind: DrillKind) -> i32 {
    match live_attempt(run_dir).and_then(|live| inject(&live, kind)) {
        Ok(said) => {
            println!("{said}");
            exit::SUCCESS
        }
        Err(message) => {
            error(message);
            exit::USAGE
        }
    }
}

/// What the journal says of the live run.
struct Live {
    run_dir: PathBuf,
    attempt: u64,
    pid: i32,
    /// The original `gpuwarden run` flags, and the directory they were relative to.
    argv: Vec<String>,
    cwd: Option<PathBuf>,
}

fn live_attempt(run_dir: &Path) -> Result<Live, String> {
    let journal = RunJournal::read(run_dir)?;
    let records = &journal.records;
    let started = journal.started()?;
    if let Some(done) = journal.finished() {
        return Err(format!(
            "the run in {} is over ({}); a drill needs a live run",
            run_dir.display(),
            done["outcome"].as_str().unwrap_or("?")
        ));
    }
    let gpuwarden = journal.last_gpuwarden_pid().unwrap_or(0) as i32;
    if !alive(gpuwarden) {
        return Err(format!(
            "the gpuwarden of this run (pid {gpuwarden}) is gone: nobody would see the drill; `gpuwarden resume {}` first",
            run_dir.display()
        ));
    }
    let last = records
        .iter()
        .rev()
        .find(|r| event(r) == "attempt_started")
        .ok_or("no attempt has started yet; try again in a moment")?;
    let attempt = last["attempt"].as_u64().unwrap_or(0);
    let ended = records
        .iter()
        .any(|r| event(r) == "attempt_ended" && r["attempt"].as_u64() == Some(attempt));
    let pid = last["pid"].as_i64().unwrap_or(0) as i32;
    if ended || !alive(pid) {
        return Err(format!(
            "attempt {attempt} (pid {pid}) is not running (the run is between attempts); try again in a moment"
        ));
    }
    Ok(Live {
        run_dir: run_dir.to_path_buf(),
        attempt,
        pid,
        argv: strings_of(started, "argv"),
        cwd: started["cwd"].as_str().map(PathBuf::from),
    })
}

/// Whether `pid` names a live process (a zombie is not).
fn alive(pid: i32) -> bool {
    pid > 0
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            // The state follows the command name, which is in parentheses and may hold spaces.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X")
        })
}

fn inject(live: &Live, kind: DrillKind) -> Result<String, String> {
    match kind {
        DrillKind::Kernel => kernel(live),
        DrillKind::Output => output(live),
    }
}

/// The Xid 31 record of a real MMU fault (FACTS.md), naming `pid`.
fn xid31(pid: i32) -> String {
    let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| "python3".into());
    format!(
        "NVRM: Xid (PCI:0000:00:00): 31, pid={pid}, name={name}, channel 0x0000000a, intr 00000000. MMU Fault: ENGINE GRAPHICS GPC1 GPCCLIENT_T1_8 faulted @ 0x7f7c_9fe00000. Fault is of type FAULT_PDE ACCESS_TYPE_VIRT_WRITE (gpuwarden drill)"
    )
}

fn kernel(live: &Live) -> Result<String, String> {
    let args = match Cli::try_parse_from(&live.argv) {
        Ok(Cli {
            command: Command::Run(args),
            ..
        }) => args,
        _ => return Err("cannot read the run's command line from its journal".into()),
    };
    if args.no_kernel_log {
        return Err(
            "the run does not follow a kernel log (--no-kernel-log): a kernel drill cannot reach it; try --kind output".into(),
        );
    }
    let path = match &live.cwd {
        Some(cwd) => cwd.join(&args.kernel_log),
        None => args.kernel_log.clone(),
    };
    let message = xid31(live.pid);
    let is_device = std::fs::metadata(&path).is_ok_and(|m| m.file_type().is_char_device());
    let record = if is_device {
        // One write, one record; the kernel parses the level and ends it at the newline.
        format!("<3>{message}\n")
    } else {
        file_record(&path, &message)?
    };
    let mut file = OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(|e| match e.kind() {
            ErrorKind::PermissionDenied if is_device => format!(
                "writing into {} needs root: run the drill with sudo, or start runs you want to drill with --kernel-log FILE",
                path.display()
            ),
            _ => format!("cannot open the run's kernel log {}: {e}", path.display()),
        })?;
    file.write_all(record.as_bytes())
        .map_err(|e| format!("cannot write into {}: {e}", path.display()))?;
    Ok(format!(
        "drill: an Xid 31 record naming pid {} (attempt {}) went into {}; the run should stop the attempt and fall back (`gpuwarden report {}`)",
        live.pid,
        live.attempt,
        path.display(),
        live.run_dir.display()
    ))
}

/// A /dev/kmsg-format record (`level,seq,usec,flags;message`) following the file's last one.
fn file_record(path: &Path, message: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the run's kernel log {}: {e}", path.display()))?;
    let last = text.lines().rev().find_map(|line| {
        let mut fields = line.split(';').next()?.split(',');
        let _level = fields.next()?;
        let seq: u64 = fields.next()?.parse().ok()?;
        let usec: u64 = fields.next()?.parse().ok()?;
        Some((seq, usec))
    });
    let (seq, usec) = match last {
        Some((seq, usec)) => (seq + 1, usec + 1),
        None => {
            let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
            let secs: f64 = uptime
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0.0);
            (1, (secs * 1e6) as u64)
        }
    };
    Ok(format!("3,{seq},{usec},-;{message}\n"))
}

fn output(live: &Live) -> Result<String, String> {
    let fd = PathBuf::from(format!("/proc/{}/fd/2", live.pid));
    let is_pipe = std::fs::metadata(&fd).is_ok_and(|m| m.file_type().is_fifo());
    if !is_pipe {
        return Err(format!(
            "the job's stderr ({}) is not gpuwarden's pipe; cannot drill through it",
            fd.display()
        ));
    }
    // Under PIPE_BUF: one write, never interleaved with the job's own output.
    let line = "torch.AcceleratorError: CUDA error: an illegal memory access was encountered (gpuwarden drill)\n";
    OpenOptions::new()
        .write(true)
        .open(&fd)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .map_err(|e| format!("cannot write into the job's stderr {}: {e}", fd.display()))?;
    Ok(format!(
        "drill: a CUDA illegal-address line went into the stderr of pid {} (attempt {}); the run should stop the attempt and fall back (`gpuwarden report {}`)",
        live.pid,
        live.attempt,
        live.run_dir.display()
    ))
}
