//! Errors from loading rule files.
//!
//! Every error that comes from a file's content says `FILE:LINE: rule `ID`: PROBLEM; HINT`, so a
//! person can jump to the line and knows what to change; the problems quirk files share (syntax,
//! unknown keys, wrong types) are `toml_file::FileError`. Failures of `RuleSet::check` (an example
//! that does not match) are not errors: they live in `mod.rs` as `CheckFailure`, because the rules
//! still load and work.

use std::io;
use std::path::PathBuf;

use super::toml_file::{FileError, Location, Origin};

/// A rule file that cannot be used. A broken rule file ends the run: supervising with a rule
/// silently missing would miss the very fault it was written for.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error(
        "{}: cannot read rules: {source}; check that the path exists and is readable",
        path.display()
    )]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "{}: no `*.toml` rule files in this directory, so it adds no rules; point --rules at the \
         directory that holds them, or drop the flag",
        .0.display()
    )]
    NoRuleFiles(PathBuf),

    /// A problem any rule or quirk file can have: syntax, unknown keys, missing fields, wrong
    /// types, a bad id, an empty `advice`.
    #[error(transparent)]
    File(#[from] FileError),

    #[error("{at}: unknown {field} `{value}`; use one of: {allowed}")]
    UnknownName {
        at: Location,
        field: &'static str,
        value: String,
        allowed: String,
    },

    #[error(
        "{at}: `streams` is empty, so the rule could never fire; list at least one of stdout, \
         stderr, kernel, tool"
    )]
    NoStreams { at: Location },

    #[error("{at}: invalid regex: {message}; fix the `regex` value")]
    BadRegex { at: Location, message: String },

    #[error(
        "{at}: the regex matches an empty line, so it would fire on every line; make it require \
         the text of the fault"
    )]
    MatchesEmpty { at: Location },

    #[error(
        "{at}: unknown capture name `{name}`; name groups only pid, process, pci, node, xid or \
         address, or make the group unnamed with (?:...)"
    )]
    UnknownCapture { at: Location, name: String },

    #[error(
        "{at}: no examples; add at least one real log line to `examples` so that `gpuwarden \
         rules check` can show the rule matches"
    )]
    NoExamples { at: Location },

    #[error(
        "{at}: duplicate rule id, already defined at {first}; rename one of them (ids are unique \
         across all rule files, the built-in ones included)"
    )]
    DuplicateId { at: Location, first: Origin },

    #[error(
        "{at}: the {count} rules and contexts for the {stream} stream do not fit in one matcher ({message}); \
         remove rules or simplify their regexes (large counted repetitions such as \\w{{1000}} \
         are the usual cause)"
    )]
    TooLarge {
        at: Location,
        stream: String,
        count: usize,
        message: String,
    },
}

impl RuleError {
    /// Where in a rule file the problem is; `None` for a file or directory that cannot be read.
    pub fn location(&self) -> Option<&Location> {
        match self {
            RuleError::Read { .. } | RuleError::NoRuleFiles(_) => None,
            RuleError::File(err) => Some(err.location()),
            RuleError::UnknownName { at, .. }
            | RuleError::NoStreams { at }
            | RuleError::BadRegex { at, .. }
            | RuleError::MatchesEmpty { at }
            | RuleError::UnknownCapture { at, .. }
            | RuleError::NoExamples { at }
            | RuleError::DuplicateId { at, .. }
            | RuleError::TooLarge { at, .. } => Some(at),
        }
    }
}
