//! What `drill` and `resume` read of a run's journal: its records, and the few of them both ask
//! after (how the run was started, whether it is over, which gpuwarden drove it last).

use std::path::{Path, PathBuf};

use serde_json::Value;

/// A run's `journal.jsonl`, read whole.
pub struct RunJournal {
    /// Where it was read from, for messages.
    pub path: PathBuf,
    pub records: Vec<Value>,
}

/// A record's `event`; empty for a record without one.
pub fn event(r: &Value) -> &str {
    r["event"].as_str().unwrap_or("")
}

impl RunJournal {
    /// Reads `run_dir/journal.jsonl`. Torn lines (a gpuwarden that died mid-write) are skipped,
    /// as `report` does.
    pub fn read(run_dir: &Path) -> Result<RunJournal, String> {
        let path = run_dir.join("journal.jsonl");
        let text = std::fs::read(&path)
            .map_err(|e| format!("cannot read the journal {}: {e}", path.display()))?;
        let records = gpuwarden::report::records(&String::from_utf8_lossy(&text));
        Ok(RunJournal { path, records })
    }

    /// The `run_started` record.
    pub fn started(&self) -> Result<&Value, String> {
        self.records
            .iter()
            .find(|r| event(r) == "run_started")
            .ok_or_else(|| format!("{} has no run_started record", self.path.display()))
    }

    /// The `run_finished` record, when the run is over.
    pub fn finished(&self) -> Option<&Value> {
        self.records.iter().find(|r| event(r) == "run_finished")
    }

    /// The pid of the gpuwarden that drove the run last (`run_started` or the latest
    /// `run_resumed`).
    pub fn last_gpuwarden_pid(&self) -> Option<u64> {
        self.records
            .iter()
            .rev()
            .find(|r| matches!(event(r), "run_started" | "run_resumed"))
            .and_then(|r| r["gpuwarden_pid"].as_u64())
    }
}
