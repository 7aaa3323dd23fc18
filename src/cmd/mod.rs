//! The subcommands' glue, one file each: turn the parsed flags of `cli` into calls of the
//! library, print what the user sees, and answer the exit code. No policy lives here.
//!
//! These are modules of the binary, not of the library, because they take `cli`'s clap types and
//! own the process's stdout, stderr and exit codes; the library stays free of both.

pub mod checkpoint;
pub mod demo;
pub mod drill;
mod journal;
pub mod learned;
pub mod probe;
pub mod report;
pub mod resume;
pub mod rules;
pub mod run;
pub mod scan;
pub mod watch;

use std::io::Write;
use std::path::PathBuf;

/// Reports a fatal error. A closed stderr must not turn it into a panic.
pub fn error(message: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr(), "gpuwarden: error: {message:#}");
}

/// The current directory, or `None` after saying why it cannot be read.
fn current_dir() -> Option<PathBuf> {
    std::env::current_dir()
        .map_err(|e| error(format_args!("cannot read the current directory: {e}")))
        .ok()
}

/// The kernel-log source `--kernel-log PATH` / `--no-kernel-log` ask for: none, a file of
/// /dev/kmsg-format records (a capture, a drill: followed from its end), or the device.
pub fn kernel_source(off: bool, path: PathBuf) -> Option<gpuwarden::sources::kernel::KernelSource> {
    use gpuwarden::sources::kernel::KernelSource;
    if off {
        None
    } else if path.is_file() {
        Some(KernelSource::File {
            path,
            from_start: false,
        })
    } else {
        Some(KernelSource::Kmsg(path))
    }
}
