//! `gpuwarden report RUN_DIR [--json]`: read the run's journal and show the night in one
//! screen (or as one JSON object). The report itself is built by `gpuwarden::report`.

use std::path::Path;

use gpuwarden::exit;

use super::error;

pub fn report(run_dir: &Path, json: bool) -> i32 {
    // A journal path is accepted too: `report run/journal.jsonl` means the same run.
    let path = if run_dir.is_dir() {
        run_dir.join("journal.jsonl")
    } else {
        run_dir.to_path_buf()
    };
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) => {
            error(format_args!(
                "cannot read the journal {}: {e}; give the run directory that `gpuwarden run` printed",
                path.display()
            ));
            return exit::USAGE;
        }
    };
    // Lossy: a line torn in the middle of a UTF-8 sequence must not hide the rest.
    let report = gpuwarden::report::build(&String::from_utf8_lossy(&bytes));
    let text = if json {
        match serde_json::to_string_pretty(&report) {
            Ok(t) => t,
            Err(e) => {
                error(format_args!("cannot write the report as JSON: {e}"));
                return exit::INTERNAL;
            }
        }
    } else {
        report.to_string()
    };
    use std::io::Write;
    // A closed stdout (`| head`) is not an error worth a panic.
    let _ = writeln!(std::io::stdout(), "{}", text.trim_end());
    exit::SUCCESS
}
