//! Reading `/proc`: one process's `stat` line and every process's. A leaf: attribution (whose
//! is a fault) and the process module (what strays a job left) both read `/proc`, and neither
//! may depend on the other for it.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::Path;

/// The fields of `/proc/P/stat` gpuwarden needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    /// The command name as the kernel keeps it (at most 15 bytes; may hold spaces and
    /// parentheses).
    pub comm: String,
    /// `R`, `S`, `D`, `Z`, ...
    pub state: char,
    pub ppid: u32,
    pub pgid: u32,
    /// Start time in clock ticks after boot: with the pid, it names one process for good.
    pub start_time: u64,
}

/// Why a `/proc/P/stat` line could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "malformed /proc stat line ({0}); this kernel's /proc format is not supported, please report it"
)]
pub struct StatError(&'static str);

/// Parses the content of `/proc/P/stat`. The command name sits between the first `(` and the
/// *last* `)`, because the name itself may contain both, and spaces.
pub fn parse_stat(line: &[u8]) -> Result<ProcStat, StatError> {
    let open = memchr::memchr(b'(', line).ok_or(StatError("no `(` before the command name"))?;
    let close = memchr::memrchr(b')', line).ok_or(StatError("no `)` after the command name"))?;
    if close < open {
        return Err(StatError("`)` before `(`"));
    }
    let pid = field(&line[..open], "pid")?;
    let comm = String::from_utf8_lossy(&line[open + 1..close]).into_owned();
    // Fields after the name, numbered as in proc(5): 3 state, 4 ppid, 5 pgrp, ... 22 starttime.
    let rest = std::str::from_utf8(&line[close + 1..]).map_err(|_| StatError("not ASCII"))?;
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    let nth = |n: usize| {
        fields
            .get(n - 3)
            .copied()
            .ok_or(StatError("too few fields"))
    };
    let mut state = nth(3)?.chars();
    let state = match (state.next(), state.next()) {
        (Some(c), None) => c,
        _ => return Err(StatError("a state that is not one letter")),
    };
    Ok(ProcStat {
        pid,
        comm,
        state,
        ppid: field(nth(4)?.as_bytes(), "ppid")?,
        pgid: field(nth(5)?.as_bytes(), "pgrp")?,
        start_time: field(nth(22)?.as_bytes(), "starttime")?,
    })
}

fn field<T: std::str::FromStr>(bytes: &[u8], name: &'static str) -> Result<T, StatError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or(StatError(name))
}

pub(crate) fn read_stat(root: &Path, pid: u32) -> Option<ProcStat> {
    // A plain open and read into a stack buffer: `fs::read` would also ask for the size (which
    // /proc does not know), a syscall more per process on every refresh. A stat line is a few
    // hundred bytes; 4 KiB leaves room for any command name.
    let mut file = std::fs::File::open(root.join(pid.to_string()).join("stat")).ok()?;
    let mut buf = [0u8; 4096];
    let mut len = 0;
    while len < buf.len() {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => {
                len += n;
                // /proc hands the whole line to the first read that has room for it: a short
                // read is the end, and asking again would cost a syscall per process.
                if len < buf.len() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    parse_stat(&buf[..len]).ok()
}

/// Every process in `/proc` now. Processes that end during the scan are simply missing.
/// Every process of this machine's `/proc`, by pid.
pub fn processes() -> io::Result<HashMap<u32, ProcStat>> {
    snapshot(Path::new("/proc"))
}

pub(crate) fn snapshot(root: &Path) -> io::Result<HashMap<u32, ProcStat>> {
    let mut procs = HashMap::new();
    for entry in std::fs::read_dir(root)? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(stat) = read_stat(root, pid) {
            procs.insert(pid, stat);
        }
    }
    Ok(procs)
}
