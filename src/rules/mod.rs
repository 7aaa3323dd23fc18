//! The fault catalog: rules that turn one log line into a `Fault` (class, severity, action,
//! captures, advice), loaded from TOML files and compiled once.
//!
//! The built-in rules are `rules/*.toml`, embedded at build time; a user adds more with rule
//! directories of their own. `RuleSet::classify` is the hot path: every line of the job's output
//! and of the kernel log goes through it, and a benign line costs one pass of one literal
//! searcher (`Matcher`). Loading compiles no regex of the built-in files: each rule's regex is
//! compiled the first time a line holds one of its required literals (`literals`, found at build
//! time), so a start costs a few milliseconds and a few megabytes, not the whole catalog.
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
pub mod literals;
pub mod prefix;
pub mod toml_file;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use regex::bytes::Regex;
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

/// How much memory the combined automata (the weak rules', `scan`'s union of every regex) may
/// take. The regex crate's default (10 MiB) is meant for one regex; the union holds the whole
/// catalog, which is expected to grow to a few hundred rules. Each rule's own regex keeps the default limit, which stops a single runaway
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
    /// The regex, as written and as matched.
    pattern: Pattern,
    examples: Vec<String>,
    counterexamples: Vec<String>,
}

/// A rule's or context's regex: the text as written in the rule file, its required literals,
/// and the compiled regex (on bytes with ASCII classes, `file::ascii_regex`), compiled when a
/// line first needs it unless the file was loaded with `file::Compile::Now`.
#[derive(Clone, Debug)]
struct Pattern {
    text: String,
    regex: OnceLock<Regex>,
    /// Literals of which every match holds one; `None` when the regex has no useful ones and is
    /// searched for whole.
    cover: Option<Vec<literals::Lit>>,
}

impl Pattern {
    /// The compiled regex. Patterns loaded without compiling are the built-in ones, which the
    /// test suite compiles and checks (`every_builtin_regex_compiles`).
    fn regex(&self) -> &Regex {
        self.regex.get_or_init(|| {
            file::ascii_regex(&self.text).expect("built-in regexes are checked by the tests")
        })
    }

    fn is_match(&self, body: &str) -> bool {
        self.regex().is_match(body.as_bytes())
    }
}

impl Rule {
    /// The regex as written in the rule file.
    pub fn regex(&self) -> &str {
        &self.pattern.text
    }

    /// Whether this rule's regex matches the line's message (prefixes stripped), whatever its
    /// streams and whatever other rules would say.
    pub fn is_match(&self, line: &str) -> bool {
        self.pattern.is_match(prefix::strip(line_body(line)).body)
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
    pattern: Pattern,
    examples: Vec<String>,
    counterexamples: Vec<String>,
}

impl Context {
    /// The regex as written in the rule file.
    pub fn regex(&self) -> &str {
        &self.pattern.text
    }

    /// Whether this context's regex matches the line's message (prefixes stripped).
    pub fn is_match(&self, line: &str) -> bool {
        self.pattern.is_match(prefix::strip(line_body(line)).body)
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

/// What a line's required literals point at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Rule(usize),
    Context(usize),
}

/// Finds the lines that may be fault or context lines, and the rules and contexts that may match
/// them, without running (or compiling) any rule's regex.
///
/// `literals` is one Aho-Corasick automaton over the required literals of every rule and context
/// (a literal many rules share, like `Xid (`, is in it once and points at all of them), and
/// `weak` one regex over the few rules and contexts without useful literals, searched for whole
/// with their anchors taken out. A line that neither matches is neither a fault nor context. Both
/// run over the raw line (or a whole buffer of lines, for `scan`): rules match the message after
/// its prefixes are stripped, and the message is the end of the line.
///
/// Why Aho-Corasick's contiguous NFA and not one `regex` over the literals: over the catalog's
/// ~800 literals (measured on the 2-core dev machine) it builds in 1.2 ms and takes 240 KB; the
/// regex crate's lazy DFA took 8-22 ms to build, aho-corasick's DFA 12 ms and 6 MB. Lines are
/// short, so its speed (~220 MB/s against ~400 MB/s for the DFA) matters only for `scan`, which
/// searches large buffers with `union` instead (`for_bulk_search`).
#[derive(Debug)]
struct Matcher {
    literals: aho_corasick::AhoCorasick,
    /// `literal_targets[pattern]`: what a literal found in a line points at.
    literal_targets: Vec<Vec<Target>>,
    weak: Option<meta::Regex>,
    weak_targets: Vec<Target>,
    /// For bulk search only: every regex, anchors taken out, in one automaton. Over a large log
    /// it stops only at lines that really match (measured on the 200 MB benchmark log: ~14,500
    /// lines, against ~83,500 that hold a literal), and its lazy DFA, once warm, outruns the two
    /// searches above together (0.9 s against 1.5 s of CPU). Its ~30 ms of parsing and its
    /// warm-up are what a start must not pay, so `run` never builds it.
    union: Option<meta::Regex>,
}

/// A compiled catalog of rules.
#[derive(Clone, Debug)]
pub struct RuleSet {
    rules: Vec<Rule>,
    contexts: Vec<Context>,
    /// Built on first use: `rules check` and `rules list` need none.
    matcher: std::sync::Arc<OnceLock<Matcher>>,
    /// Build the literal searcher for throughput rather than for a quick start.
    bulk: bool,
}

/// What one line is: a fault, a context line, or neither.
#[derive(Debug)]
pub enum Examined<'a> {
    Fault(Fault),
    Context(ContextMatch<'a>),
    Neither,
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
        match self.examine_in(Some(stream), line, false) {
            Examined::Fault(fault) => Some(fault),
            _ => None,
        }
    }

    /// Classifies a line whose stream is unknown (a log file given to `scan`) against every
    /// rule of every stream. The fault's stream is the winning rule's first stream.
    pub fn classify_any(&self, line: &str) -> Option<Fault> {
        match self.examine_in(None, line, false) {
            Examined::Fault(fault) => Some(fault),
            _ => None,
        }
    }

    /// The context entry a line is, if it is one (the first defined wins). `stream` `None` means
    /// any stream. A line a rule matches is a fault line, so callers ask this only of lines that
    /// `classify` turned down.
    pub fn context(&self, stream: Option<Stream>, line: &str) -> Option<ContextMatch<'_>> {
        let line = line_body(line);
        let candidates = self.candidates(line);
        self.context_of(&candidates, stream, line, None)
    }

    /// [`RuleSet::classify`] (or [`RuleSet::classify_any`] for `stream` `None`), then, for a line
    /// that is no fault, [`RuleSet::context`]: the same answers, for one search of the line.
    pub fn examine(&self, stream: Option<Stream>, line: &str) -> Examined<'_> {
        self.examine_in(stream, line, true)
    }

    /// Builds the literal searcher now, so that the first line does not wait for it (about a
    /// millisecond). No rule's regex is compiled: a regex is compiled when a line first holds
    /// its literals.
    pub fn prepare(&self, _streams: &[Stream]) {
        let _ = self.matcher();
    }

    /// Makes the calling thread's search caches, so that the thread's first real line does not
    /// wait for them.
    pub fn prepare_thread(&self, stream: Stream) {
        self.classify(
            stream,
            "an ordinary line of training output: step 1 loss 0.5",
        );
    }

    /// The same rules, with a searcher built for large buffers (`scan`): one automaton of every
    /// regex, which takes ~30 ms and tens of megabytes to build and warm, and then finds the
    /// lines that match much faster than the literal searcher (`Matcher::union`).
    pub fn for_bulk_search(mut self) -> RuleSet {
        if !self.bulk {
            self.bulk = true;
            self.matcher = Default::default();
        }
        self
    }

    /// The literal searcher, built on first use.
    fn matcher(&self) -> &Matcher {
        self.matcher
            .get_or_init(|| matcher(&self.rules, &self.contexts, self.bulk))
    }

    /// The rules and contexts that may match `line` (raw, without its line ending), in order:
    /// rules by index, then contexts by index. Empty for most lines, after one search.
    fn candidates(&self, line: &str) -> Vec<Target> {
        let matcher = self.matcher();
        let mut targets: Vec<Target> = Vec::new();
        for found in matcher.literals.find_overlapping_iter(line) {
            targets.extend_from_slice(&matcher.literal_targets[found.pattern().as_usize()]);
        }
        if let Some(weak) = &matcher.weak {
            let input = regex_automata::Input::new(line);
            if weak.is_match(input.clone()) {
                let mut found = regex_automata::PatternSet::new(weak.pattern_len());
                weak.which_overlapping_matches(&input, &mut found);
                targets.extend(found.iter().map(|p| matcher.weak_targets[p.as_usize()]));
            }
        }
        targets.sort_unstable();
        targets.dedup();
        targets
    }

    fn examine_in(&self, stream: Option<Stream>, line: &str, contexts: bool) -> Examined<'_> {
        let line = line_body(line);
        // Most lines are benign: they cost one pass of the literal searcher, and nothing else.
        let candidates = self.candidates(line);
        if candidates.is_empty() {
            return Examined::Neither;
        }
        let applies = |streams: &[Stream]| stream.is_none_or(|s| streams.contains(&s));
        let mut rules = candidates
            .iter()
            .filter_map(|target| match *target {
                Target::Rule(i) => Some(&self.rules[i]),
                Target::Context(_) => None,
            })
            .filter(|rule| applies(&rule.streams))
            .peekable();
        let mut body = None;
        if rules.peek().is_some() {
            let stripped = prefix::strip(line).body;
            body = Some(stripped);
            let mut best: Option<&Rule> = None;
            // In index order, so that on a tie of severity the earlier rule, seen first, stays.
            for rule in rules {
                if !rule.pattern.is_match(stripped) {
                    continue;
                }
                if best.is_none_or(|best| rule.severity > best.severity) {
                    best = Some(rule);
                }
            }
            if let Some(rule) = best {
                return Examined::Fault(Fault {
                    rule: rule.id.clone(),
                    class: rule.class,
                    severity: rule.severity,
                    action: rule.action,
                    stream: stream.unwrap_or(rule.streams[0]),
                    line: line.to_string(),
                    captures: captures(rule.pattern.regex(), stripped),
                    advice: rule.advice.clone(),
                    facility: None,
                    attribution: None,
                    gpus: Vec::new(),
                });
            }
        }
        if !contexts {
            return Examined::Neither;
        }
        match self.context_of(&candidates, stream, line, body) {
            Some(context) => Examined::Context(context),
            None => Examined::Neither,
        }
    }

    /// The first context among `candidates` that applies to `stream` and matches the line.
    fn context_of(
        &self,
        candidates: &[Target],
        stream: Option<Stream>,
        line: &str,
        body: Option<&str>,
    ) -> Option<ContextMatch<'_>> {
        let applies = |streams: &[Stream]| stream.is_none_or(|s| streams.contains(&s));
        let mut contexts = candidates
            .iter()
            .filter_map(|target| match *target {
                Target::Context(i) => Some(&self.contexts[i]),
                Target::Rule(_) => None,
            })
            .filter(|context| applies(&context.streams))
            .peekable();
        contexts.peek()?;
        let body = body.unwrap_or_else(|| prefix::strip(line).body);
        let context = contexts.find(|context| context.pattern.is_match(body))?;
        Some(ContextMatch {
            context,
            captures: captures(context.pattern.regex(), body),
        })
    }

    /// A search for the lines of a buffer that may be fault or context lines (`scan`).
    pub fn candidate_lines<'r>(&'r self) -> CandidateLines<'r> {
        CandidateLines {
            matcher: self.matcher(),
            weak_next: None,
        }
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
        Ok(RuleSet {
            rules,
            contexts,
            matcher: Default::default(),
            bulk: false,
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

/// Finds, in a buffer of lines, where the next line that may be a fault or context line is.
/// It remembers where the next whole-regex match of the weak rules is, so a buffer is searched
/// for them once, not again from every literal hit; use one per buffer.
pub struct CandidateLines<'r> {
    matcher: &'r Matcher,
    /// The next weak match at or after the last `start`: `Some(None)` for none in the buffer.
    weak_next: Option<Option<(usize, usize)>>,
}

impl CandidateLines<'_> {
    /// Where in `haystack`, at or after `start`, the first line that may be a fault or context
    /// line has a match; `None` when no line after `start` can be. The caller takes the line
    /// around the offset, examines it, and goes on from the next line, with the same haystack.
    pub fn next(&mut self, haystack: &[u8], start: usize) -> Option<usize> {
        if let Some(union) = &self.matcher.union {
            let input = regex_automata::Input::new(haystack).range(start..);
            return union.search(&input).map(|m| m.start());
        }
        let literal = self
            .matcher
            .literals
            .find(aho_corasick::Input::new(haystack).range(start..))
            .map(|m| m.start());
        let Some(weak) = &self.matcher.weak else {
            return literal;
        };
        let stale = match self.weak_next {
            None => true,
            Some(Some((at, _))) => at < start,
            Some(None) => false,
        };
        if stale {
            let input = regex_automata::Input::new(haystack).range(start..);
            // The start of the match, not its end: the line where it starts is the one to check.
            self.weak_next = Some(weak.search(&input).map(|m| (m.start(), m.end())));
        }
        let weak = self.weak_next.flatten().map(|(at, _)| at);
        match (literal, weak) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The lazy DFA cache of the bulk searcher.
const UNION_CACHE: usize = 32 << 20;

/// How much of a required literal the searcher looks for.
const SEARCHED_LEN: usize = 24;

/// Builds the literal searcher of every rule and context (`Matcher`).
fn matcher(rules: &[Rule], contexts: &[Context], bulk: bool) -> Matcher {
    let patterns = rules
        .iter()
        .enumerate()
        .map(|(i, rule)| (&rule.pattern, Target::Rule(i)))
        .chain(
            contexts
                .iter()
                .enumerate()
                .map(|(i, context)| (&context.pattern, Target::Context(i))),
        );
    let mut literal_index: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut literals: Vec<Vec<u8>> = Vec::new();
    let mut literal_targets: Vec<Vec<Target>> = Vec::new();
    let mut weak_hirs = Vec::new();
    let mut weak_targets = Vec::new();
    for (pattern, target) in patterns {
        match &pattern.cover {
            Some(cover) => {
                for lit in cover {
                    // Every literal is searched ASCII-case-insensitively (one automaton), which
                    // finds a superset of the lines a case-sensitive search would; measured on
                    // the benchmark log: the same 83,531 candidate lines either way.
                    let mut key = lit.bytes.to_ascii_lowercase();
                    // A literal's head is as required as the literal; a longer one is no more
                    // selective but makes the automaton larger.
                    key.truncate(SEARCHED_LEN);
                    let index = *literal_index.entry(key.clone()).or_insert_with(|| {
                        literals.push(key);
                        literal_targets.push(Vec::new());
                        literals.len() - 1
                    });
                    literal_targets[index].push(target);
                }
            }
            None => {
                // A valid regex (checked at load, or by the tests for the built-in ones).
                let hir = regex_syntax::ParserBuilder::new()
                    .unicode(false)
                    .utf8(false)
                    .build()
                    .parse(&pattern.text)
                    .expect("rule regexes were checked when loaded");
                weak_hirs.push(unanchored(&hir));
                weak_targets.push(target);
            }
        }
    }
    let literals = aho_corasick::AhoCorasick::builder()
        .kind(Some(aho_corasick::AhoCorasickKind::ContiguousNFA))
        .ascii_case_insensitive(true)
        .match_kind(aho_corasick::MatchKind::Standard)
        .build(&literals)
        .expect("a few hundred short literals fit an Aho-Corasick automaton");
    let weak = (!weak_hirs.is_empty()).then(|| {
        meta::Builder::new()
            .configure(
                meta::Config::new()
                    .nfa_size_limit(Some(SET_SIZE_LIMIT))
                    .dfa_size_limit(Some(SET_SIZE_LIMIT))
                    .which_captures(regex_automata::nfa::thompson::WhichCaptures::Implicit),
            )
            .build_many_from_hir(&weak_hirs)
            .expect("checked regexes compile")
    });
    let union = bulk.then(|| {
        let hirs: Vec<Hir> = rules
            .iter()
            .map(|rule| &rule.pattern.text)
            .chain(contexts.iter().map(|context| &context.pattern.text))
            .map(|text| {
                let hir = regex_syntax::ParserBuilder::new()
                    .unicode(false)
                    .utf8(false)
                    .build()
                    .parse(text)
                    .expect("rule regexes were checked when loaded");
                unanchored(&hir)
            })
            .collect();
        meta::Builder::new()
            .configure(
                meta::Config::new()
                    .nfa_size_limit(Some(SET_SIZE_LIMIT))
                    .dfa_size_limit(Some(SET_SIZE_LIMIT))
                    // The lazy DFA of a few hundred patterns needs room, or it keeps clearing
                    // its cache and falls back to a slower engine on ordinary lines.
                    .hybrid_cache_capacity(UNION_CACHE)
                    .which_captures(regex_automata::nfa::thompson::WhichCaptures::Implicit),
            )
            .build_many_from_hir(&hirs)
            .expect("checked regexes compile together")
    });
    Matcher {
        literals,
        literal_targets,
        weak,
        weak_targets,
        union,
    }
}

/// The built-in rules' required literals, found at build time (`build.rs`).
mod builtin_covers {
    /// A regex's literals: bytes, and whether they match ASCII-case-insensitively.
    pub(super) type Cover = &'static [(&'static [u8], bool)];
    include!(concat!(env!("OUT_DIR"), "/builtin_covers.rs"));
}

/// The literals build.rs found for `pattern`, when it is the regex of a built-in rule:
/// `Some(None)` for one with no useful literals, `None` for a regex it has not seen.
fn builtin_cover(pattern: &str) -> Option<Option<Vec<literals::Lit>>> {
    let table = builtin_covers::BUILTIN_COVERS;
    let at = table.binary_search_by(|(p, _)| (*p).cmp(pattern)).ok()?;
    Some(table[at].1.map(|lits| {
        lits.iter()
            .map(|&(bytes, ci)| literals::Lit {
                bytes: bytes.to_vec(),
                ci,
            })
            .collect()
    }))
}

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
        rules.extend(file::parse_with(name, text, file::Compile::OnFirstUse)?);
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod lazy_tests;
