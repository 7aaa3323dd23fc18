//! The fault catalog: rules that turn one log line into a `Fault` (class, severity, action,
//! captures, advice), loaded from TOML files and compiled once.
//!
//! The built-in rules are `rules/*.toml`, embedded at build time; a user adds more with rule
//! directories of their own. `RuleSet::classify` is the hot path: every line of the job's output
//! and of the kernel log goes through it, and a benign line costs one pass of one `RegexSet`.
//!
//! This module is not policy. It does not attribute a fault to a process or device, de-duplicate
//! an incident seen on two streams, or count repeats: the supervisor does, using the class's
//! `default_action`, `escalates_on_repeat` and `skips_gpu_tiers`. It reads no streams either; the
//! caller caps lines (8 KiB) and decodes them lossily.
//!
//! # Rule file format
//!
//! ```toml
//! [[rule]]
//! id = "hsa-memory-access-fault"     # unique across all files; a-z, 0-9 and -
//! class = "gpu_memory_fault"         # one of the 16 classes (FaultClass)
//! streams = ["stderr", "stdout"]     # stdout, stderr, kernel, tool
//! regex = '''Memory access fault by GPU node-(?P<node>\d+)'''
//! severity = "critical"              # info, warning, error, critical
//! action = "fallback"                # optional: note, restart, fallback, stop; default: the class's
//! advice = "What a person can do about it."
//! examples = ["a real line that must match"]       # at least one
//! counterexamples = ["a real line that must not"]  # optional
//! ```
//!
//! The regex syntax is the `regex` crate's, with one difference: `\b` and `\B` are ASCII word
//! boundaries, as if written `(?-u:\b)`, because a Unicode word boundary makes every line with
//! non-ASCII text (progress bars) take the slow path.
//!
//! Named captures may be `pid`, `process`, `pci`, `node`, `xid` and `address`. When several rules
//! match a line, the one with the highest severity wins, ties going to the rule defined first
//! (built-in files first, then each extra directory in order, files sorted by name).

mod error;
mod fault;
mod file;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use regex::{Regex, RegexSet, RegexSetBuilder};
use serde::Serialize;

pub use error::{Location, Origin, RuleError};
pub use fault::{Action, Fault, FaultClass, Severity, Stream};

/// The built-in rule files, in the order their rules rank on ties. A test checks that every
/// `rules/*.toml` is listed here, so a new file cannot be forgotten.
const BUILTIN: [(&str, &str); 3] = [
    (
        "rules/amd-runtime.toml",
        include_str!("../../rules/amd-runtime.toml"),
    ),
    (
        "rules/cuda-runtime.toml",
        include_str!("../../rules/cuda-runtime.toml"),
    ),
    (
        "rules/pytorch.toml",
        include_str!("../../rules/pytorch.toml"),
    ),
];

/// How much memory one stream's compiled `RegexSet` may take. The regex crate's default (10 MiB)
/// is meant for one regex; a set holds the whole catalog, which is expected to grow to a few
/// hundred rules. Each rule's own regex keeps the default limit, which stops a single runaway
/// pattern early.
const SET_SIZE_LIMIT: usize = 256 << 20;

/// One rule of the catalog, validated and compiled.
#[derive(Clone, Debug)]
pub struct Rule {
    pub id: String,
    pub class: FaultClass,
    pub severity: Severity,
    /// The rule's own action, or its class's default action when the file names none.
    pub action: Action,
    pub streams: Vec<Stream>,
    pub advice: String,
    pub origin: Origin,
    /// The regex as written in the rule file.
    pattern: String,
    /// The regex as matched: `pattern` with ASCII word boundaries (`file::ascii_word_boundaries`).
    regex: Regex,
    examples: Vec<String>,
    counterexamples: Vec<String>,
}

impl Rule {
    /// The regex as written in the rule file.
    pub fn regex(&self) -> &str {
        &self.pattern
    }

    /// Whether this rule's regex matches the line, whatever its streams and whatever other rules
    /// would say.
    pub fn is_match(&self, line: &str) -> bool {
        self.regex.is_match(line_body(line))
    }

    /// Real lines this rule must match.
    pub fn examples(&self) -> &[String] {
        &self.examples
    }

    /// Lines this rule must not match.
    pub fn counterexamples(&self) -> &[String] {
        &self.counterexamples
    }
}

/// The rules that apply to one stream, compiled into one set. `rules[i]` is the index in
/// `RuleSet::rules` of the set's pattern `i`; it is ascending, so the first match in set order is
/// the earliest defined rule.
#[derive(Clone, Debug)]
struct Matcher {
    set: RegexSet,
    rules: Vec<usize>,
}

/// A compiled catalog of rules.
#[derive(Clone, Debug)]
pub struct RuleSet {
    rules: Vec<Rule>,
    /// One matcher per stream, indexed by `Stream as usize`.
    matchers: [Matcher; 4],
}

/// An example that a rule does not match, or a counterexample that it does: the rule loads, but
/// it is wrong about the lines it was written for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckFailure {
    pub rule: String,
    pub origin: Origin,
    pub problem: String,
}

impl fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: rule `{}`: {}", self.origin, self.rule, self.problem)
    }
}

/// What `gpuwarden rules check` found in a directory of rule files, or in the built-in files.
///
/// Unlike loading (which stops at the first broken file, since a run must not start with a rule
/// missing), a check looks at everything, so one pass shows every problem to fix.
#[derive(Debug)]
pub struct DirCheck {
    /// The rule files looked at.
    pub files: usize,
    /// The rules that loaded and whose examples were checked: those of the files without an
    /// error, less any that reuse an id defined before them.
    pub rules: usize,
    /// One error per file that cannot be loaded on its own (the first problem in it), then a
    /// `DuplicateId` for each rule of a good file that reuses an id of an earlier good file. A
    /// directory that cannot be listed is the only error.
    pub errors: Vec<RuleError>,
    /// Examples and counterexamples that the loaded rules get wrong.
    pub failures: Vec<CheckFailure>,
}

impl DirCheck {
    /// Whether every file loaded and every rule passed its own examples.
    pub fn passed(&self) -> bool {
        self.errors.is_empty() && self.failures.is_empty()
    }

    /// Checks files loaded one by one, in the order they rank on ties.
    fn of_files(loaded: Vec<Result<Vec<Rule>, RuleError>>) -> DirCheck {
        let files = loaded.len();
        let mut errors = Vec::new();
        let mut rules: Vec<Rule> = Vec::new();
        let mut seen: HashMap<String, Origin> = HashMap::new();
        // A file is loaded on its own first: a duplicate id inside it makes the file broken,
        // exactly as `from_files` with that file alone would say.
        for file in loaded {
            let file_rules = match file.and_then(|rules| unique_ids(&rules).map(|()| rules)) {
                Ok(rules) => rules,
                Err(err) => {
                    errors.push(err);
                    continue;
                }
            };
            for rule in file_rules {
                if let Some(first) = seen.get(&rule.id) {
                    // Keep checking the rest; the later definition is the one that is dropped,
                    // as `load` would name it.
                    errors.push(duplicate_id(&rule, first));
                    continue;
                }
                seen.insert(rule.id.clone(), rule.origin.clone());
                rules.push(rule);
            }
        }
        let count = rules.len();
        let failures = match RuleSet::build(rules.clone()) {
            Ok(set) => set.check(),
            Err(err) => {
                // Only size can fail here (ids are unique by now). The examples can still be
                // held against their own rule, without asking which rule would win.
                errors.push(err);
                rules
                    .iter()
                    .flat_map(|rule| rule_failures(rule, None))
                    .collect()
            }
        };
        DirCheck {
            files,
            rules: count,
            errors,
            failures,
        }
    }
}

impl RuleSet {
    /// Checks every `*.toml` file of `dir` (sorted by name) without the built-in rules: each file
    /// is loaded on its own, ids must be unique across the files, and every rule that loaded is
    /// checked against its examples ([`RuleSet::check`]). This is `gpuwarden rules check DIR`.
    pub fn check_dir(dir: &Path) -> DirCheck {
        match toml_files(dir) {
            Ok(paths) => DirCheck::of_files(paths.iter().map(|path| file_rules(path)).collect()),
            Err(err) => DirCheck {
                files: 0,
                rules: 0,
                errors: vec![err],
                failures: Vec::new(),
            },
        }
    }

    /// [`RuleSet::check_dir`] for the built-in rule files: `gpuwarden rules check`.
    pub fn check_builtin() -> DirCheck {
        DirCheck::of_files(
            BUILTIN
                .iter()
                .map(|(name, text)| file::parse(name, text))
                .collect(),
        )
    }

    /// The built-in rules, `rules/*.toml` as embedded at build time.
    pub fn builtin() -> Result<RuleSet, RuleError> {
        RuleSet::build(builtin_rules()?)
    }

    /// The built-in rules, then every `*.toml` file of each directory (sorted by name).
    pub fn load(extra_dirs: &[PathBuf]) -> Result<RuleSet, RuleError> {
        let mut rules = builtin_rules()?;
        for dir in extra_dirs {
            rules.extend(dir_rules(dir)?);
        }
        RuleSet::build(rules)
    }

    /// Only the `*.toml` files of `dir` (sorted by name), without the built-in rules. It stops at
    /// the first broken file; [`RuleSet::check_dir`] reports them all.
    pub fn from_dir(dir: &Path) -> Result<RuleSet, RuleError> {
        RuleSet::build(dir_rules(dir)?)
    }

    /// Only these rule files, in this order, without the built-in rules.
    pub fn from_files(files: &[PathBuf]) -> Result<RuleSet, RuleError> {
        let mut rules = Vec::new();
        for path in files {
            rules.extend(file_rules(path)?);
        }
        RuleSet::build(rules)
    }

    /// Classifies one line of one stream: the matching rule with the highest severity (ties go to
    /// the rule defined first), or `None` for a line no rule applies to. A trailing `\r` (or `\n`)
    /// is ignored.
    pub fn classify(&self, stream: Stream, line: &str) -> Option<Fault> {
        let line = line_body(line);
        let matcher = &self.matchers[stream as usize];
        // Most lines are benign: they cost this one pass over the set, and nothing else.
        // `is_match` may stop at the first match and skips tracking which patterns matched, so
        // it is faster than `matches` (about 30% on the corpus's benign lines).
        if !matcher.set.is_match(line) {
            return None;
        }
        let mut best: Option<&Rule> = None;
        for pattern in matcher.set.matches(line).iter() {
            let rule = &self.rules[matcher.rules[pattern]];
            // Strictly greater: on a tie the earlier rule, seen first, stays.
            if best.is_none_or(|best| rule.severity > best.severity) {
                best = Some(rule);
            }
        }
        let rule = best?;

        let mut captures = BTreeMap::new();
        if let Some(found) = rule.regex.captures(line) {
            for name in rule.regex.capture_names().flatten() {
                if let Some(value) = found.name(name) {
                    captures.insert(name.to_string(), value.as_str().to_string());
                }
            }
        }
        Some(Fault {
            rule: rule.id.clone(),
            class: rule.class,
            severity: rule.severity,
            action: rule.action,
            stream,
            line: line.to_string(),
            captures,
            advice: rule.advice.clone(),
        })
    }

    /// Every rule, in the order they rank on ties.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rule with this id.
    pub fn rule(&self, id: &str) -> Option<&Rule> {
        self.rules.iter().find(|rule| rule.id == id)
    }

    /// Checks every rule against its own lines: each example must match the rule, and on each of
    /// the rule's streams it must not be taken by a rule of another class (that rule would win,
    /// so the example would be misclassified); each counterexample must not match the rule.
    pub fn check(&self) -> Vec<CheckFailure> {
        self.rules
            .iter()
            .flat_map(|rule| rule_failures(rule, Some(self)))
            .collect()
    }

    /// Checks ids for duplicates and compiles one matcher per stream.
    fn build(rules: Vec<Rule>) -> Result<RuleSet, RuleError> {
        unique_ids(&rules)?;
        let matchers = [
            matcher(&rules, Stream::Stdout)?,
            matcher(&rules, Stream::Stderr)?,
            matcher(&rules, Stream::Kernel)?,
            matcher(&rules, Stream::Tool)?,
        ];
        Ok(RuleSet { rules, matchers })
    }
}

/// One rule against its own lines: each example must match it, and (given the whole set) on each
/// of the rule's streams must not be taken by a rule of another class, which would win and so
/// misclassify it; each counterexample must not match it.
fn rule_failures(rule: &Rule, set: Option<&RuleSet>) -> Vec<CheckFailure> {
    let mut failures = Vec::new();
    let mut fail = |problem: String| {
        failures.push(CheckFailure {
            rule: rule.id.clone(),
            origin: rule.origin.clone(),
            problem,
        });
    };
    for example in &rule.examples {
        if !rule.is_match(example) {
            fail(format!("example {} does not match", quoted(example)));
            continue;
        }
        let Some(set) = set else {
            continue;
        };
        let taken = rule.streams.iter().find_map(|&stream| {
            set.classify(stream, example)
                .filter(|fault| fault.rule != rule.id && fault.class != rule.class)
                .map(|fault| (stream, fault))
        });
        if let Some((stream, fault)) = taken {
            let winner = set.rule(&fault.rule).map(|w| &w.origin);
            fail(format!(
                "example {} matches, but on {stream} rule `{}`{} wins with class {} (higher \
                 severity, or same severity and defined earlier); make the regexes exclusive or \
                 raise this rule's severity",
                quoted(example),
                fault.rule,
                winner.map_or(String::new(), |o| format!(" ({o})")),
                fault.class,
            ));
        }
    }
    for counterexample in &rule.counterexamples {
        if rule.is_match(counterexample) {
            fail(format!("counterexample {} matches", quoted(counterexample)));
        }
    }
    failures
}

/// The first rule that reuses an id defined before it in `rules`, as an error.
fn unique_ids(rules: &[Rule]) -> Result<(), RuleError> {
    let mut seen: HashMap<&str, &Origin> = HashMap::new();
    for rule in rules {
        if let Some(first) = seen.insert(&rule.id, &rule.origin) {
            return Err(duplicate_id(rule, first));
        }
    }
    Ok(())
}

/// `rule` reuses the id first defined at `first`; the error points at the later definition.
fn duplicate_id(rule: &Rule, first: &Origin) -> RuleError {
    RuleError::DuplicateId {
        at: Location {
            file: rule.origin.file.clone(),
            line: rule.origin.line,
            rule: Some(rule.id.clone()),
        },
        first: first.clone(),
    }
}

/// Compiles the rules that apply to `stream` into one `RegexSet`.
fn matcher(rules: &[Rule], stream: Stream) -> Result<Matcher, RuleError> {
    let indices: Vec<usize> = rules
        .iter()
        .enumerate()
        .filter(|(_, rule)| rule.streams.contains(&stream))
        .map(|(i, _)| i)
        .collect();
    // The compiled regexes' own text: the rewritten form that `classify` must agree with.
    let set = RegexSetBuilder::new(indices.iter().map(|&i| rules[i].regex.as_str()))
        .size_limit(SET_SIZE_LIMIT)
        .build()
        .map_err(|err| {
            // Every pattern compiled on its own, so only size can fail here; blame the last rule,
            // the one that tipped the set over.
            let last = indices.last().map(|&i| &rules[i]);
            RuleError::TooLarge {
                at: Location {
                    file: last.map_or_else(String::new, |r| r.origin.file.clone()),
                    line: last.map_or(0, |r| r.origin.line),
                    rule: last.map(|r| r.id.clone()),
                },
                stream,
                count: indices.len(),
                message: err.to_string(),
            }
        })?;
    Ok(Matcher {
        set,
        rules: indices,
    })
}

/// The rules of the embedded `rules/*.toml` files.
fn builtin_rules() -> Result<Vec<Rule>, RuleError> {
    let mut rules = Vec::new();
    for (name, text) in BUILTIN {
        rules.extend(file::parse(name, text)?);
    }
    Ok(rules)
}

/// The rules of every `*.toml` file in `dir`, files sorted by name.
fn dir_rules(dir: &Path) -> Result<Vec<Rule>, RuleError> {
    let mut rules = Vec::new();
    for path in &toml_files(dir)? {
        rules.extend(file_rules(path)?);
    }
    Ok(rules)
}

/// The `*.toml` files in `dir`, sorted by name.
fn toml_files(dir: &Path) -> Result<Vec<PathBuf>, RuleError> {
    let read_error = |source| RuleError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_error)? {
        let path = entry.map_err(read_error)?.path();
        if path.extension().is_some_and(|ext| ext == "toml") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The rules of one file on disk; errors name the file as the user's path spells it.
fn file_rules(path: &Path) -> Result<Vec<Rule>, RuleError> {
    let text = fs::read_to_string(path).map_err(|source| RuleError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    file::parse(&path.display().to_string(), &text)
}

/// The line without its line ending: sources split on `\n`, and CRLF output leaves a `\r`.
fn line_body(line: &str) -> &str {
    let line = line.strip_suffix('\n').unwrap_or(line);
    line.strip_suffix('\r').unwrap_or(line)
}

/// A line quoted for a message, shortened so one failure stays one readable line.
fn quoted(line: &str) -> String {
    const MAX: usize = 120;
    match line.char_indices().nth(MAX) {
        Some((cut, _)) => {
            // Keep the ellipsis inside the quotes: the Debug form always ends with `"`.
            let quoted = format!("{:?}", &line[..cut]);
            format!("{}...\"", quoted.trim_end_matches('"'))
        }
        None => format!("{line:?}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
