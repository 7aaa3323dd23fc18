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
//! The regex syntax is the `regex` crate's, matched on bytes with Unicode classes off: `\w`, `\d`,
//! `\s`, `\b` and `(?i)` are ASCII, and `.` matches any byte but a newline. Unicode classes make
//! a catalog of hundreds of rules huge and slow, and log lines are matched for ASCII words; a
//! non-ASCII character written in a pattern still matches itself. A pattern is matched against the
//! message with its prefixes stripped (`prefix::strip`), so `^` means the start of the message.
//!
//! Named captures may be `pid`, `process`, `pci`, `node`, `xid` and `address`. When several rules
//! match a line, the one with the highest severity wins, ties going to the rule defined first
//! (built-in files first, then each extra directory in order, files sorted by name).

mod error;
mod fault;
mod file;
pub mod group;
pub mod prefix;
pub mod toml_file;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use regex::bytes::{Regex, RegexSet, RegexSetBuilder};
use regex_automata::meta;
use regex_syntax::hir::{
    Class, ClassBytes, ClassBytesRange, ClassUnicode, ClassUnicodeRange, Hir, HirKind, Look,
    Repetition,
};
use serde::Serialize;

pub use error::RuleError;
pub use fault::{Action, Fault, FaultClass, Severity, Stream};
pub use toml_file::{Location, Origin};

/// The built-in rule files, in the order their rules rank on ties. A test checks that every
/// `rules/*.toml` is listed here, so a new file cannot be forgotten.
const BUILTIN: [(&str, &str); 9] = [
    (
        "rules/amd-kernel.toml",
        include_str!("../../rules/amd-kernel.toml"),
    ),
    (
        "rules/amd-runtime.toml",
        include_str!("../../rules/amd-runtime.toml"),
    ),
    (
        "rules/nvidia-xid.toml",
        include_str!("../../rules/nvidia-xid.toml"),
    ),
    (
        "rules/nvidia-driver.toml",
        include_str!("../../rules/nvidia-driver.toml"),
    ),
    (
        "rules/cuda-runtime.toml",
        include_str!("../../rules/cuda-runtime.toml"),
    ),
    (
        "rules/pytorch.toml",
        include_str!("../../rules/pytorch.toml"),
    ),
    ("rules/nccl.toml", include_str!("../../rules/nccl.toml")),
    ("rules/host.toml", include_str!("../../rules/host.toml")),
    ("rules/tools.toml", include_str!("../../rules/tools.toml")),
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
    /// The regex as matched, on bytes with ASCII classes (`file::ascii_regex`).
    regex: Regex,
    examples: Vec<String>,
    counterexamples: Vec<String>,
}

impl Rule {
    /// The regex as written in the rule file.
    pub fn regex(&self) -> &str {
        &self.pattern
    }

    /// Whether this rule's regex matches the line's message (prefixes stripped), whatever its
    /// streams and whatever other rules would say.
    pub fn is_match(&self, line: &str) -> bool {
        self.regex
            .is_match(prefix::strip(line_body(line)).body.as_bytes())
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

/// Which finding a context line joins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Joins {
    /// The finding just before it (the detail lines of an amdgpu page fault, hint lines after a
    /// CUDA error).
    After,
    /// The finding that follows it (the first lines of a message whose fault words come later).
    Before,
}

impl Joins {
    pub const ALL: [Joins; 2] = [Joins::After, Joins::Before];

    pub fn as_str(self) -> &'static str {
        match self {
            Joins::After => "after",
            Joins::Before => "before",
        }
    }

    pub fn from_name(name: &str) -> Option<Joins> {
        Joins::ALL.into_iter().find(|j| j.as_str() == name)
    }
}

/// A `[[context]]` entry: lines that only accompany a fault. They never start a finding; they
/// join one (extending its span, filling in its missing captures), so that a ten-line amdgpu
/// page fault or a CUDA error with its hints is one finding, not ten.
#[derive(Clone, Debug)]
pub struct Context {
    pub id: String,
    pub streams: Vec<Stream>,
    pub joins: Joins,
    /// The classes of findings it may join; empty means any class.
    pub classes: Vec<FaultClass>,
    pub origin: Origin,
    pattern: String,
    regex: Regex,
    examples: Vec<String>,
    counterexamples: Vec<String>,
}

impl Context {
    /// The regex as written in the rule file.
    pub fn regex(&self) -> &str {
        &self.pattern
    }

    /// Whether this context's regex matches the line's message (prefixes stripped).
    pub fn is_match(&self, line: &str) -> bool {
        self.regex
            .is_match(prefix::strip(line_body(line)).body.as_bytes())
    }

    /// Whether it may join a finding of this class.
    pub fn joins_class(&self, class: FaultClass) -> bool {
        self.classes.is_empty() || self.classes.contains(&class)
    }

    pub fn examples(&self) -> &[String] {
        &self.examples
    }

    pub fn counterexamples(&self) -> &[String] {
        &self.counterexamples
    }
}

/// A line that a context entry recognised, with what it captured.
#[derive(Clone, Debug)]
pub struct ContextMatch<'a> {
    pub context: &'a Context,
    pub captures: BTreeMap<String, String>,
}

/// What one rule file (or several) holds.
#[derive(Clone, Debug, Default)]
pub(crate) struct Loaded {
    pub(crate) rules: Vec<Rule>,
    pub(crate) contexts: Vec<Context>,
}

impl Loaded {
    fn extend(&mut self, other: Loaded) {
        self.rules.extend(other.rules);
        self.contexts.extend(other.contexts);
    }

    /// Every id with where it is defined, rules first.
    fn ids(&self) -> impl Iterator<Item = (&str, &Origin)> {
        self.rules
            .iter()
            .map(|r| (r.id.as_str(), &r.origin))
            .chain(self.contexts.iter().map(|c| (c.id.as_str(), &c.origin)))
    }
}

/// The rules that apply to one stream, compiled into one set. `rules[i]` is the index in
/// `RuleSet::rules` of the set's pattern `i`; it is ascending, so the first match in set order is
/// the earliest defined rule.
///
/// `prefilter` is the union of the rules' and contexts' regexes with their `^`/`$` anchors taken
/// out, run over the raw line (or a whole buffer of lines, for `scan`): rules match the message
/// after its prefixes are stripped, and a regex that matches the message also matches, anchors
/// aside, the line that contains it. So a line the prefilter passes over is neither a fault nor
/// context, and costs one pass of one automaton; only the few it stops at are stripped and
/// matched rule by rule.
#[derive(Clone, Debug)]
struct Matcher {
    set: RegexSet,
    rules: Vec<usize>,
    context_set: RegexSet,
    contexts: Vec<usize>,
    prefilter: meta::Regex,
}

/// A compiled catalog of rules.
#[derive(Clone, Debug)]
pub struct RuleSet {
    rules: Vec<Rule>,
    contexts: Vec<Context>,
    /// The matcher for every rule of every stream (`scan` of a log whose stream is unknown).
    /// Built first: it holds every pattern, so if it fits, every stream's matcher fits.
    any: Matcher,
    /// One matcher per stream, indexed by `Stream as usize`, built when first used (`scan`
    /// needs none of them, `run` three of four).
    streams: [OnceLock<Matcher>; 4],
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
    /// The rules and contexts that loaded and whose examples were checked: those of the files
    /// without an error, less any that reuse an id defined before them.
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
    fn of_files(loaded: Vec<Result<Loaded, RuleError>>) -> DirCheck {
        let files = loaded.len();
        let mut errors = Vec::new();
        let mut kept = Loaded::default();
        let mut seen: HashMap<String, Origin> = HashMap::new();
        // A file is loaded on its own first: a duplicate id inside it makes the file broken,
        // exactly as `from_files` with that file alone would say.
        for file in loaded {
            let file = match file.and_then(|file| unique_ids(&file).map(|()| file)) {
                Ok(file) => file,
                Err(err) => {
                    errors.push(err);
                    continue;
                }
            };
            // Keep checking the rest; the later definition is the one that is dropped, as
            // `load` would name it.
            let mut fresh = |id: &str, origin: &Origin| match seen.get(id) {
                Some(first) => {
                    errors.push(duplicate_id(id, origin, first));
                    false
                }
                None => {
                    seen.insert(id.to_string(), origin.clone());
                    true
                }
            };
            for rule in file.rules {
                if fresh(&rule.id, &rule.origin) {
                    kept.rules.push(rule);
                }
            }
            for context in file.contexts {
                if fresh(&context.id, &context.origin) {
                    kept.contexts.push(context);
                }
            }
        }
        let count = kept.rules.len() + kept.contexts.len();
        let failures = match RuleSet::build(kept.clone()) {
            Ok(set) => set.check(),
            Err(err) => {
                // Only size can fail here (ids are unique by now). The examples can still be
                // held against their own rule, without asking which rule would win.
                errors.push(err);
                kept.rules
                    .iter()
                    .flat_map(|rule| rule_failures(rule, None))
                    .chain(
                        kept.contexts
                            .iter()
                            .flat_map(|context| context_failures(context, None)),
                    )
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

    /// Only the rule files of these directories, without the built-in rules (`scan
    /// --no-builtin-rules --rules DIR`).
    pub fn from_dirs(dirs: &[PathBuf]) -> Result<RuleSet, RuleError> {
        let mut rules = Loaded::default();
        for dir in dirs {
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
        let mut rules = Loaded::default();
        for path in files {
            rules.extend(file_rules(path)?);
        }
        RuleSet::build(rules)
    }

    /// Classifies one line of one stream: the matching rule with the highest severity (ties go to
    /// the rule defined first), or `None` for a line no rule applies to. Prefixes (timestamps,
    /// syslog headers, `[rank3]:`) are stripped before matching (`prefix::strip`); a trailing
    /// `\r` (or `\n`) is ignored.
    pub fn classify(&self, stream: Stream, line: &str) -> Option<Fault> {
        self.classify_in(self.matcher(Some(stream)), Some(stream), line)
    }

    /// Classifies a line whose stream is unknown (a log file given to `scan`) against every
    /// rule of every stream. The fault's stream is the winning rule's first stream.
    pub fn classify_any(&self, line: &str) -> Option<Fault> {
        self.classify_in(&self.any, None, line)
    }

    /// Compiles the matchers of these streams now and runs them once over the rules' examples,
    /// so that the first line of each does not wait for it (tens of milliseconds for a large
    /// catalog).
    pub fn prepare(&self, streams: &[Stream]) {
        for &stream in streams {
            // Each rule's first example once: the lazy DFAs build their states for real fault
            // lines now (a few milliseconds on the first match otherwise).
            for rule in self.rules.iter().filter(|r| r.streams.contains(&stream)) {
                if let Some(example) = rule.examples.first() {
                    self.classify(stream, example);
                }
            }
            self.classify(
                stream,
                "an ordinary line of training output: step 1 loss 0.5",
            );
        }
    }

    /// Makes the calling thread's search caches for `stream` (a few megabytes for a catalog
    /// of hundreds of rules), so that the thread's first real line does not wait for them.
    pub fn prepare_thread(&self, stream: Stream) {
        // One fault line and one ordinary line: enough to make the caches; the states for
        // every rule were built by `prepare` and are shared.
        if let Some(example) = self
            .rules
            .iter()
            .find(|r| r.streams.contains(&stream))
            .and_then(|r| r.examples.first())
        {
            self.classify(stream, example);
        }
        self.classify(
            stream,
            "an ordinary line of training output: step 1 loss 0.5",
        );
    }

    /// The matcher of one stream (built on first use), or of all of them.
    fn matcher(&self, stream: Option<Stream>) -> &Matcher {
        let Some(stream) = stream else {
            return &self.any;
        };
        self.streams[stream as usize].get_or_init(|| {
            matcher(&self.rules, &self.contexts, Some(stream))
                .expect("a stream's rules are a subset of the catalog, which compiled")
        })
    }

    fn classify_in(&self, matcher: &Matcher, stream: Option<Stream>, line: &str) -> Option<Fault> {
        let line = line_body(line);
        // Most lines are benign: they cost this one pass of the prefilter, and nothing else.
        if !matcher.prefilter.is_match(line) {
            return None;
        }
        let body = prefix::strip(line).body;
        let mut best: Option<&Rule> = None;
        // The set answers "any rule?" in one pass. Which rules, though, is asked of each
        // rule's own regex: the set's answer to that is an overlapping search of an automaton
        // of every rule, which on a fault line (where many rules match partway) falls back to
        // its slowest engine (measured: 0.5 ms a line, against 0.1 ms rule by rule).
        if !matcher.set.is_match(body.as_bytes()) {
            return None;
        }
        for rule in matcher.rules.iter().map(|&i| &self.rules[i]) {
            if !rule.regex.is_match(body.as_bytes()) {
                continue;
            }
            // Strictly greater: on a tie the earlier rule, seen first, stays.
            if best.is_none_or(|best| rule.severity > best.severity) {
                best = Some(rule);
            }
        }
        let rule = best?;
        Some(Fault {
            rule: rule.id.clone(),
            class: rule.class,
            severity: rule.severity,
            action: rule.action,
            stream: stream.unwrap_or(rule.streams[0]),
            line: line.to_string(),
            captures: captures(&rule.regex, body),
            advice: rule.advice.clone(),
            facility: None,
            attribution: None,
            gpus: Vec::new(),
        })
    }

    /// The context entry a line is, if it is one (the first defined wins). `stream` `None` means
    /// any stream. A line a rule matches is a fault line, so callers ask this only of lines that
    /// `classify` turned down.
    pub fn context(&self, stream: Option<Stream>, line: &str) -> Option<ContextMatch<'_>> {
        let matcher = self.matcher(stream);
        let line = line_body(line);
        if !matcher.prefilter.is_match(line) {
            return None;
        }
        let body = prefix::strip(line).body;
        let first = matcher.context_set.matches(body.as_bytes()).iter().next()?;
        let context = &self.contexts[matcher.contexts[first]];
        Some(ContextMatch {
            context,
            captures: captures(&context.regex, body),
        })
    }

    /// Where in `haystack`, at or after `start`, the first line that may be a fault or context
    /// line has a match; `None` when no line after `start` can be. For scanning whole buffers of
    /// lines: the caller takes the line around the offset, classifies it, and goes on from the
    /// next line. `stream` `None` means every rule.
    pub fn next_candidate(
        &self,
        stream: Option<Stream>,
        haystack: &[u8],
        start: usize,
    ) -> Option<usize> {
        let matcher = self.matcher(stream);
        let input = regex_automata::Input::new(haystack).range(start..);
        // The start of the match, not its end: a pattern with `\s` or a negated class can match
        // across a newline, and then the line where it starts is the one to check (checking it
        // finds any real match in it; the caller resumes at the next line, so none is skipped).
        matcher.prefilter.search(&input).map(|m| m.start())
    }

    /// Every rule, in the order they rank on ties.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rule with this id.
    pub fn rule(&self, id: &str) -> Option<&Rule> {
        self.rules.iter().find(|rule| rule.id == id)
    }

    /// Every context entry, in the order they were defined.
    pub fn contexts(&self) -> &[Context] {
        &self.contexts
    }

    /// Checks every rule against its own lines: each example must match the rule, and on each of
    /// the rule's streams it must not be taken by a rule of another class (that rule would win,
    /// so the example would be misclassified); each counterexample must not match the rule.
    /// Context examples must match their context and be no fault line of any rule (a line a rule
    /// takes is a fault, so the context would never apply to it).
    pub fn check(&self) -> Vec<CheckFailure> {
        self.rules
            .iter()
            .flat_map(|rule| rule_failures(rule, Some(self)))
            .chain(
                self.contexts
                    .iter()
                    .flat_map(|context| context_failures(context, Some(self))),
            )
            .collect()
    }

    /// Checks ids for duplicates and compiles one matcher per stream, and one for all.
    fn build(loaded: Loaded) -> Result<RuleSet, RuleError> {
        unique_ids(&loaded)?;
        let Loaded { rules, contexts } = loaded;
        let any = matcher(&rules, &contexts, None)?;
        Ok(RuleSet {
            rules,
            contexts,
            any,
            streams: Default::default(),
        })
    }
}

/// The named groups of `regex` that took part in its match on `body`.
fn captures(regex: &Regex, body: &str) -> BTreeMap<String, String> {
    let mut captures = BTreeMap::new();
    if let Some(found) = regex.captures(body.as_bytes()) {
        for name in regex.capture_names().flatten() {
            if let Some(value) = found.name(name) {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                captures.insert(name.to_string(), value);
            }
        }
    }
    captures
}

/// One context entry against its own lines.
fn context_failures(context: &Context, set: Option<&RuleSet>) -> Vec<CheckFailure> {
    let mut failures = Vec::new();
    let mut fail = |problem: String| {
        failures.push(CheckFailure {
            rule: context.id.clone(),
            origin: context.origin.clone(),
            problem,
        });
    };
    for example in &context.examples {
        if !context.is_match(example) {
            fail(format!("example {} does not match", quoted(example)));
            continue;
        }
        let Some(set) = set else {
            continue;
        };
        let taken = context
            .streams
            .iter()
            .find_map(|&stream| set.classify(stream, example).map(|fault| (stream, fault)));
        if let Some((stream, fault)) = taken {
            fail(format!(
                "example {} is a fault line on {stream} (rule `{}`), so this context never \
                 applies to it; narrow that rule or drop the example",
                quoted(example),
                fault.rule,
            ));
        }
    }
    for counterexample in &context.counterexamples {
        if context.is_match(counterexample) {
            fail(format!("counterexample {} matches", quoted(counterexample)));
        }
    }
    failures
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

/// The first rule or context that reuses an id defined before it, as an error.
fn unique_ids(loaded: &Loaded) -> Result<(), RuleError> {
    let mut seen: HashMap<&str, &Origin> = HashMap::new();
    for (id, origin) in loaded.ids() {
        if let Some(first) = seen.insert(id, origin) {
            return Err(duplicate_id(id, origin, first));
        }
    }
    Ok(())
}

/// `id`, defined at `origin`, reuses the id first defined at `first`; the error points at the
/// later definition.
fn duplicate_id(id: &str, origin: &Origin, first: &Origin) -> RuleError {
    RuleError::DuplicateId {
        at: file::FORMAT.at(origin, Some(id)),
        first: first.clone(),
    }
}

/// Compiles the rules and contexts that apply to `stream` (all of them for `None`) into sets and
/// one prefilter.
fn matcher(
    rules: &[Rule],
    contexts: &[Context],
    stream: Option<Stream>,
) -> Result<Matcher, RuleError> {
    let applies = |streams: &[Stream]| stream.is_none_or(|s| streams.contains(&s));
    let rule_indices: Vec<usize> = (0..rules.len())
        .filter(|&i| applies(&rules[i].streams))
        .collect();
    let context_indices: Vec<usize> = (0..contexts.len())
        .filter(|&i| applies(&contexts[i].streams))
        .collect();
    // The compiled regexes' own text: the rewritten form that `classify` must agree with.
    let rule_patterns: Vec<&str> = rule_indices
        .iter()
        .map(|&i| rules[i].regex.as_str())
        .collect();
    let context_patterns: Vec<&str> = context_indices
        .iter()
        .map(|&i| contexts[i].regex.as_str())
        .collect();
    // Blame the last entry, the one that tipped the set over.
    let too_large = |message: String| {
        let at = match rule_indices.last() {
            Some(&i) => file::FORMAT.at(&rules[i].origin, Some(&rules[i].id)),
            None => file::FORMAT.at(&Origin::default(), None),
        };
        RuleError::TooLarge {
            at,
            stream: stream.map_or_else(|| "any".to_string(), |s| s.to_string()),
            count: rule_indices.len() + context_indices.len(),
            message,
        }
    };
    let set_of = |patterns: &[&str]| {
        RegexSetBuilder::new(patterns)
            .unicode(false)
            .size_limit(SET_SIZE_LIMIT)
            // Its lazy DFA answers "which rules match" for a few hundred rules at once only
            // with room for its states; with the default 2 MiB it falls back to the PikeVM.
            .dfa_size_limit(PREFILTER_CACHE)
            .build()
            .map_err(|err| too_large(err.to_string()))
    };
    let set = set_of(&rule_patterns)?;
    let context_set = set_of(&context_patterns)?;
    let mut hirs = Vec::with_capacity(rule_patterns.len() + context_patterns.len());
    for pattern in rule_patterns.iter().chain(&context_patterns) {
        // Every pattern compiled with the regex crate already, whose parser this is.
        let hir = regex_syntax::ParserBuilder::new()
            .unicode(false)
            .utf8(false)
            .build()
            .parse(pattern)
            .map_err(|err| too_large(err.to_string()))?;
        hirs.push(unanchored(&hir));
    }
    let prefilter = meta::Builder::new()
        .configure(
            meta::Config::new()
                .nfa_size_limit(Some(SET_SIZE_LIMIT))
                .dfa_size_limit(Some(SET_SIZE_LIMIT))
                // The lazy DFA of a few hundred patterns needs room, or it keeps clearing its
                // cache and falls back to a slower engine on ordinary lines.
                .hybrid_cache_capacity(PREFILTER_CACHE)
                .which_captures(regex_automata::nfa::thompson::WhichCaptures::Implicit),
        )
        .build_many_from_hir(&hirs)
        .map_err(|err| too_large(err.to_string()))?;
    Ok(Matcher {
        set,
        rules: rule_indices,
        context_set,
        contexts: context_indices,
        prefilter,
    })
}

/// The lazy DFA cache of one prefilter.
const PREFILTER_CACHE: usize = 32 << 20;

/// `hir` without its start and end anchors, without capture groups, and with classes that do not
/// match a newline: on one line it matches wherever `hir` matches, and also where `hir` would have
/// matched but for an anchor. Rules match a message
/// after its prefix is stripped, so "start of the message" is not "start of the line"; the
/// prefilter, which sees whole lines, must not miss those lines.
fn unanchored(hir: &Hir) -> Hir {
    match hir.kind() {
        HirKind::Look(
            Look::Start | Look::End | Look::StartLF | Look::EndLF | Look::StartCRLF | Look::EndCRLF,
        ) => Hir::empty(),
        HirKind::Repetition(rep) => Hir::repetition(Repetition {
            min: rep.min,
            max: rep.max,
            greedy: rep.greedy,
            sub: Box::new(unanchored(&rep.sub)),
        }),
        HirKind::Capture(capture) => unanchored(&capture.sub),
        // Classes never match a newline here: `[^)]*` or `\s+` running across lines would make
        // a search over a whole block of lines try every line pair (measured: 287 s instead of
        // 31 s for 200,000 lines). A rule's match lies within one line anyway.
        HirKind::Class(Class::Bytes(class)) => {
            let mut class = class.clone();
            class.difference(&ClassBytes::new([ClassBytesRange::new(b'\n', b'\n')]));
            Hir::class(Class::Bytes(class))
        }
        HirKind::Class(Class::Unicode(class)) => {
            let mut class = class.clone();
            class.difference(&ClassUnicode::new([ClassUnicodeRange::new('\n', '\n')]));
            Hir::class(Class::Unicode(class))
        }
        HirKind::Concat(subs) => Hir::concat(subs.iter().map(unanchored).collect()),
        HirKind::Alternation(subs) => Hir::alternation(subs.iter().map(unanchored).collect()),
        _ => hir.clone(),
    }
}

/// The rules of the embedded `rules/*.toml` files.
fn builtin_rules() -> Result<Loaded, RuleError> {
    let mut rules = Loaded::default();
    for (name, text) in BUILTIN {
        rules.extend(file::parse(name, text)?);
    }
    Ok(rules)
}

/// The rules of every `*.toml` file in `dir`, files sorted by name.
fn dir_rules(dir: &Path) -> Result<Loaded, RuleError> {
    let mut rules = Loaded::default();
    for path in &toml_files(dir)? {
        rules.extend(file_rules(path)?);
    }
    Ok(rules)
}

/// The hardware quirks file that lives beside the rule files (`rules/quirks.toml`); it is read
/// by the pre-flight probe, not as rules.
pub const QUIRKS_FILE: &str = "quirks.toml";

/// The `*.toml` files in `dir` other than the quirks file, sorted by name.
fn toml_files(dir: &Path) -> Result<Vec<PathBuf>, RuleError> {
    let read_error = |source| RuleError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    // A directory of quirks alone is a rules directory too; one without any `*.toml` is a
    // mistyped path that would otherwise add nothing, silently.
    let mut any_toml = false;
    for entry in fs::read_dir(dir).map_err(read_error)? {
        let path = entry.map_err(read_error)?.path();
        if path.extension().is_some_and(|ext| ext == "toml") && path.is_file() {
            any_toml = true;
            if path.file_name().is_some_and(|name| name != QUIRKS_FILE) {
                files.push(path);
            }
        }
    }
    if !any_toml {
        return Err(RuleError::NoRuleFiles(dir.to_path_buf()));
    }
    files.sort();
    Ok(files)
}

/// The rules of one file on disk; errors name the file as the user's path spells it.
fn file_rules(path: &Path) -> Result<Loaded, RuleError> {
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
