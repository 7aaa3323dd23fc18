//! `gpuwarden scan`: find GPU faults in existing logs, or in the kernel's log buffer with
//! `--kernel`, and answer like grep (0 nothing found, 1 found, 2 error).

use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;

use gpuwarden::incident::{Linker, Role, SCAN_WINDOW_LINES};
use gpuwarden::rules::RuleSet;
use gpuwarden::rules::group::Finding;
use gpuwarden::sources::kernel::KernelSource;

use super::error;
use crate::cli::ScanArgs;

/// Exit codes of `scan`, like grep's.
mod scan_exit {
    pub const NOTHING: i32 = 0;
    pub const FOUND: i32 = 1;
    pub const ERROR: i32 = 2;
}

pub fn scan(args: ScanArgs) -> i32 {
    use gpuwarden::rules::Stream;
    use gpuwarden::scan;

    let stream = match args.stream.as_deref().map(|s| (s, Stream::from_name(s))) {
        None => None,
        Some((_, Some(stream))) => Some(stream),
        Some((name, None)) => {
            error(format_args!(
                "unknown stream `{name}`; use one of: stdout, stderr, kernel, tool"
            ));
            return scan_exit::ERROR;
        }
    };
    let rules = if args.no_builtin_rules {
        RuleSet::from_dirs(&args.rules)
    } else {
        RuleSet::load(&args.rules)
    };
    let rules = match rules {
        Ok(rules) => rules.for_bulk_search(),
        Err(e) => {
            error(e);
            return scan_exit::ERROR;
        }
    };
    if args.kernel {
        return scan_kernel(&rules, stream, args.json);
    }
    let files: Vec<PathBuf> = if args.files.is_empty() {
        vec![PathBuf::from("-")]
    } else {
        args.files
    };
    let many = files.len() > 1;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut found = 0usize;
    let mut failed = false;
    for path in &files {
        let name = path.display().to_string();
        let input = if name == "-" {
            Input::Stdin(std::io::stdin())
        } else {
            match std::fs::File::open(path) {
                Ok(file) => Input::File(file),
                Err(e) => {
                    error(format_args!("{name}: cannot read: {e}"));
                    failed = true;
                    continue;
                }
            }
        };
        let mut incidents = Linker::new(SCAN_WINDOW_LINES);
        let fd = match &input {
            Input::Stdin(stdin) => stdin.as_fd(),
            Input::File(file) => file.as_fd(),
        };
        // A pipe or a terminal (`dmesg -w | gpuwarden scan`): findings go out as they are found,
        // not when a buffer of output fills or the input ends.
        let live = is_live(fd);
        let reader: Box<dyn std::io::Read> = match &input {
            Input::Stdin(stdin) => Box::new(stdin.lock()),
            Input::File(file) => Box::new(file),
        };
        let result = scan::scan_live(&rules, stream, reader, live.then_some(fd), |finding| {
            write_linked(&mut out, args.json, &name, many, finding, &mut incidents)?;
            if live { out.flush() } else { Ok(()) }
        });
        match result {
            Ok(summary) => {
                found += summary.findings;
                if !args.json {
                    let _ = writeln!(
                        std::io::stderr(),
                        "{name}: {} finding(s) in {} line(s)",
                        summary.findings,
                        summary.lines
                    );
                }
            }
            // `gpuwarden scan log | head`: the reader left after a finding was written to it.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return scan_exit::FOUND,
            Err(e) => {
                error(format_args!("{name}: {e}"));
                failed = true;
            }
        }
    }
    if let Err(e) = out.flush()
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        error(format_args!("cannot write the findings: {e}"));
        failed = true;
    }
    if failed {
        scan_exit::ERROR
    } else if found > 0 {
        scan_exit::FOUND
    } else {
        scan_exit::NOTHING
    }
}

/// Where a scan reads from.
enum Input {
    Stdin(std::io::Stdin),
    File(std::fs::File),
}

/// Whether `fd` is live input that may pause: a pipe, a socket or a terminal, not a file.
fn is_live(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use nix::sys::stat::{SFlag, fstat};
    fstat(fd).is_ok_and(|st| {
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        kind == SFlag::S_IFIFO || kind == SFlag::S_IFSOCK || kind == SFlag::S_IFCHR
    })
}

/// `scan --kernel`: the records still in the kernel's buffer, as dmesg would print them, through
/// the kernel-log rules (or `stream`'s).
fn scan_kernel(rules: &RuleSet, stream: Option<gpuwarden::rules::Stream>, json: bool) -> i32 {
    use gpuwarden::sources::kernel;
    let backlog = match kernel::read_all(&KernelSource::kmsg()) {
        Ok(backlog) => backlog,
        Err(e) => {
            error(format_args!("cannot read the kernel log: {e}"));
            return scan_exit::ERROR;
        }
    };
    if backlog.lost > 0 {
        let _ = writeln!(
            std::io::stderr(),
            "gpuwarden: {} kernel records were overwritten while the buffer was read",
            backlog.lost
        );
    }
    let mut text = Vec::new();
    for record in &backlog.records {
        let _ = writeln!(
            text,
            "[{:>5}.{:06}] {}",
            record.ts_us / 1_000_000,
            record.ts_us % 1_000_000,
            record.text()
        );
    }
    let name = kernel::DEV_KMSG;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut incidents = Linker::new(SCAN_WINDOW_LINES);
    let result = gpuwarden::scan::scan(
        rules,
        stream.or(Some(gpuwarden::rules::Stream::Kernel)),
        text.as_slice(),
        |finding| write_linked(&mut out, json, name, false, finding, &mut incidents),
    );
    let _ = out.flush();
    match result {
        Ok(summary) => {
            if !json {
                let _ = writeln!(
                    std::io::stderr(),
                    "{name}: {} finding(s) in {} record(s)",
                    summary.findings,
                    summary.lines
                );
            }
            if summary.findings > 0 {
                scan_exit::FOUND
            } else {
                scan_exit::NOTHING
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => scan_exit::FOUND,
        Err(e) => {
            error(e);
            scan_exit::ERROR
        }
    }
}

/// A finding as `scan --json` prints it, with its place in its incident.
#[derive(serde::Serialize)]
struct Linked<'a> {
    #[serde(flatten)]
    record: gpuwarden::scan::Record<'a>,
    incident: &'a Role,
}

/// Writes a finding with what it is in its incident: a cause (`root`), or a fault that follows
/// from an earlier finding (`cascade`, naming it), so that one incident names one cause.
fn write_linked(
    out: &mut impl Write,
    json: bool,
    file: &str,
    show_file: bool,
    finding: &Finding,
    incidents: &mut Linker,
) -> std::io::Result<()> {
    let role = incidents.link(&finding.fault, finding.line as f64, Some(finding.line));
    if json {
        let linked = Linked {
            record: gpuwarden::scan::Record::new(file, finding),
            incident: &role,
        };
        serde_json::to_writer(&mut *out, &linked).map_err(std::io::Error::other)?;
        return writeln!(out);
    }
    gpuwarden::scan::write_human(out, show_file.then_some(file), finding)?;
    if let Role::Cascade { root, why } = &role {
        match root.as_ref().and_then(|r| r.at_line.map(|l| (l, r))) {
            Some((line, root)) => writeln!(
                out,
                "             follows from line {line} ({}): {why}",
                root.rule
            ),
            None => writeln!(out, "             follows from an earlier fault: {why}"),
        }?;
    }
    Ok(())
}
