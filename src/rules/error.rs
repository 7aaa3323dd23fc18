//! Errors from loading rule files, and where in a file they are.
//!
//! Every error that comes from a file's content says `FILE:LINE: rule `ID`: PROBLEM; HINT`, so a
//! person can jump to the line and knows what to change. Failures of `RuleSet::check` (an example
//! that does not match) are not errors: they live in `mod.rs` as `CheckFailure`, because the rules
//! still load and work.

use std::fmt;
use std::io;
use std::path::PathBuf;

use serde::Serialize;

/// Where a rule is defined: the file (as the user named it, or `rules/NAME.toml` for a built-in
/// file) and the 1-based line of its `[[rule]]` header.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Origin {
    pub file: String,
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// Where in a rule file a problem is: file, 1-based line, and the id of the rule when it is
/// known (a syntax error before the first `[[rule]]`, or in a rule without an `id`, has none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: String,
    pub line: usize,
    pub rule: Option<String>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)?;
        if let Some(rule) = &self.rule {
            write!(f, ": rule `{rule}`")?;
        }
        Ok(())
    }
}

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

    #[error("{at}: not valid TOML: {message}; fix the syntax on that line")]
    Syntax { at: Location, message: String },

    #[error("{at}: unknown field `{field}`; this table may have only {allowed}")]
    UnknownField {
        at: Location,
        field: String,
        allowed: String,
    },

    #[error(
        "{at}: unknown top-level key `{key}`; a rule file holds only `[[rule]]` and \
         `[[context]]` tables"
    )]
    UnknownTopLevel { at: Location, key: String },

    #[error(
        "{at}: {message}; every `[[rule]]` needs id, class, streams, regex, severity, advice and \
         examples (a `[[context]]`: id, streams, regex, joins and examples), with strings quoted \
         and streams and examples as lists"
    )]
    Malformed { at: Location, message: String },

    #[error("{at}: invalid id `{id}`; use only lowercase letters, digits and `-`")]
    BadId { at: Location, id: String },

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

    #[error("{at}: `advice` is empty; write a sentence a person can act on")]
    EmptyAdvice { at: Location },

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
            RuleError::Read { .. } => None,
            RuleError::Syntax { at, .. }
            | RuleError::UnknownField { at, .. }
            | RuleError::UnknownTopLevel { at, .. }
            | RuleError::Malformed { at, .. }
            | RuleError::BadId { at, .. }
            | RuleError::UnknownName { at, .. }
            | RuleError::NoStreams { at }
            | RuleError::BadRegex { at, .. }
            | RuleError::MatchesEmpty { at }
            | RuleError::UnknownCapture { at, .. }
            | RuleError::NoExamples { at }
            | RuleError::EmptyAdvice { at }
            | RuleError::DuplicateId { at, .. }
            | RuleError::TooLarge { at, .. } => Some(at),
        }
    }
}
