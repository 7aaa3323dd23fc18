//! Reading one rule file: TOML text in, validated `Rule`s out, or a `RuleError` that names the
//! file, the line and the rule.
//!
//! Loading happens in two stages, like ripgrep's low-level and high-level arguments: `RawRule` is
//! exactly what the file says (strings with their byte spans), and `validate` turns it into a
//! `Rule` with a compiled regex and checked names. Reading the TOML itself (syntax, unknown keys,
//! types, lines) is `toml_file`'s, shared with the quirks file. This file knows nothing about
//! other files: duplicate ids across files, and matching, are `RuleSet`'s business in `mod.rs`.

use regex::bytes::{Regex, RegexBuilder};
use serde::Deserialize;
use std::sync::OnceLock;
use toml::Spanned;

use super::toml_file::{self, Format, Location, Noun, TomlFile, regex_problem};
use super::{
    Action, Context, FaultClass, Joins, Loaded, Pattern, Rule, RuleError, Severity, Stream,
    literals,
};

/// The fields a `[[rule]]` table may have, in the order the format documents them.
pub(super) const FIELDS: [&str; 9] = [
    "id",
    "class",
    "streams",
    "regex",
    "severity",
    "action",
    "advice",
    "examples",
    "counterexamples",
];

/// The fields a `[[context]]` table may have.
pub(super) const CONTEXT_FIELDS: [&str; 7] = [
    "id",
    "streams",
    "regex",
    "joins",
    "classes",
    "examples",
    "counterexamples",
];

/// The rule file format: `[[rule]]` and `[[context]]` tables, both with their fields checked
/// before the typed pass so that a misspelt field is named with the fields there are.
pub(super) const FORMAT: Format = Format {
    noun: Noun::Rule,
    tables: &[("rule", Some(&FIELDS)), ("context", Some(&CONTEXT_FIELDS))],
    holds: "a rule file holds only `[[rule]]` and `[[context]]` tables",
    needs: "every `[[rule]]` needs id, class, streams, regex, severity, advice and examples (a \
            `[[context]]`: id, streams, regex, joins and examples), with strings quoted and \
            streams and examples as lists",
};

/// The capture group names a regex may use. The supervisor reads these to attribute a fault to a
/// process (`pid`, `process`) or a device (`pci`, `node`, `xid`, `address`); any other name is
/// almost always a typo that would silently drop that attribution.
pub(super) const CAPTURES: [&str; 6] = ["pid", "process", "pci", "node", "xid", "address"];

/// A rule file as written: a list of `[[rule]]` tables and a list of `[[context]]` tables.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
    #[serde(default)]
    context: Vec<Spanned<RawContext>>,
}

/// One `[[context]]` table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawContext {
    id: Spanned<String>,
    streams: Spanned<Vec<Spanned<String>>>,
    regex: Spanned<String>,
    joins: Spanned<String>,
    #[serde(default)]
    classes: Vec<Spanned<String>>,
    #[serde(default)]
    examples: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    counterexamples: Vec<String>,
}

/// One `[[rule]]` table as written, every value with its byte span so errors can name the line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: Spanned<String>,
    class: Spanned<String>,
    streams: Spanned<Vec<Spanned<String>>>,
    regex: Spanned<String>,
    severity: Spanned<String>,
    #[serde(default)]
    action: Option<Spanned<String>>,
    advice: Spanned<String>,
    // Optional here so that a rule without examples gets our own error, which says why examples
    // are required, instead of serde's bare "missing field".
    #[serde(default)]
    examples: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    counterexamples: Vec<String>,
}

/// Whether a file's regexes are compiled as it loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Compile {
    /// Compile and check every regex now: a user's file, or `rules check`.
    Now,
    /// Compile each regex when a line first needs it: the built-in files at run time, whose
    /// regexes the test suite and `rules check` compile and check (a start then parses no
    /// regex: compiling the catalog's was most of a 200-450 ms start, and of 72 MB of RSS).
    OnFirstUse,
}

/// Parses and validates the rule file `text`, compiling every regex; `file` is the name used in
/// origins and errors.
pub(super) fn parse(file: &str, text: &str) -> Result<Loaded, RuleError> {
    parse_with(file, text, Compile::Now)
}

/// [`parse`], compiling the regexes now or on first use.
pub(super) fn parse_with(file: &str, text: &str, when: Compile) -> Result<Loaded, RuleError> {
    let file = TomlFile {
        name: file,
        text,
        format: &FORMAT,
    };
    let raw: RawFile = file.load()?;
    let rules = raw
        .rule
        .into_iter()
        .map(|raw| validate(&file, raw, when))
        .collect::<Result<Vec<_>, _>>()?;
    let contexts = raw
        .context
        .into_iter()
        .map(|raw| validate_context(&file, raw, when))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Loaded { rules, contexts })
}

/// The streams of a rule or context: known names, at least one, no repeats.
fn streams(
    raw: &Spanned<Vec<Spanned<String>>>,
    at: &impl Fn(usize) -> Location,
) -> Result<Vec<Stream>, RuleError> {
    let mut streams = Vec::new();
    for stream in raw.get_ref() {
        let stream = named(stream, "stream", Stream::from_name, at, || {
            Stream::ALL.map(Stream::as_str).join(", ")
        })?;
        if !streams.contains(&stream) {
            streams.push(stream);
        }
    }
    if streams.is_empty() {
        return Err(RuleError::NoStreams {
            at: at(raw.span().start),
        });
    }
    Ok(streams)
}

/// The examples of a rule or context: at least one.
fn examples(
    raw: Option<Spanned<Vec<String>>>,
    header: usize,
    at: &impl Fn(usize) -> Location,
) -> Result<Vec<String>, RuleError> {
    toml_file::required(raw, header).map_err(|offset| RuleError::NoExamples { at: at(offset) })
}

/// Checks one raw `[[context]]` and compiles its regex.
fn validate_context(
    file: &TomlFile<'_>,
    raw: Spanned<RawContext>,
    when: Compile,
) -> Result<Context, RuleError> {
    let header = raw.span().start;
    let raw = raw.into_inner();
    let id = file.id(&raw.id)?;
    let at = |offset: usize| file.at(offset, Some(id));
    let joins = named(&raw.joins, "joins", Joins::from_name, &at, || {
        Joins::ALL.map(Joins::as_str).join(", ")
    })?;
    let mut classes = Vec::new();
    for class in &raw.classes {
        let class = named(class, "class", FaultClass::from_name, &at, || {
            FaultClass::ALL.map(FaultClass::as_str).join(", ")
        })?;
        if !classes.contains(&class) {
            classes.push(class);
        }
    }
    let streams = streams(&raw.streams, &at)?;
    let pattern = pattern(raw.regex, &at, when)?;
    Ok(Context {
        id: id.to_string(),
        streams,
        joins,
        classes,
        origin: file.origin(header),
        pattern,
        examples: examples(raw.examples, header, &at)?,
        counterexamples: raw.counterexamples,
    })
}

/// Checks one raw rule and compiles its regex.
fn validate(file: &TomlFile<'_>, raw: Spanned<RawRule>, when: Compile) -> Result<Rule, RuleError> {
    let header = raw.span().start;
    let raw = raw.into_inner();
    let id = file.id(&raw.id)?;
    let at = |offset: usize| file.at(offset, Some(id));

    let class = named(&raw.class, "class", FaultClass::from_name, &at, || {
        FaultClass::ALL.map(FaultClass::as_str).join(", ")
    })?;
    let severity = named(&raw.severity, "severity", Severity::from_name, &at, || {
        Severity::ALL.map(Severity::as_str).join(", ")
    })?;
    let action = match &raw.action {
        Some(action) => named(action, "action", Action::from_name, &at, || {
            Action::ALL.map(Action::as_str).join(", ")
        })?,
        None => class.default_action(),
    };

    let streams = streams(&raw.streams, &at)?;

    let pattern = pattern(raw.regex, &at, when)?;

    file.not_blank("advice", &raw.advice, id)?;

    let examples = examples(raw.examples, header, &at)?;

    Ok(Rule {
        id: id.to_string(),
        class,
        severity,
        action,
        streams,
        advice: raw.advice.into_inner(),
        origin: file.origin(header),
        pattern,
        examples,
        counterexamples: raw.counterexamples,
    })
}

/// Looks up a name (class, severity, action, stream) or says which names exist.
fn named<T>(
    value: &Spanned<String>,
    field: &'static str,
    lookup: impl Fn(&str) -> Option<T>,
    at: &impl Fn(usize) -> Location,
    allowed: impl Fn() -> String,
) -> Result<T, RuleError> {
    lookup(value.get_ref()).ok_or_else(|| RuleError::UnknownName {
        at: at(value.span().start),
        field,
        value: value.get_ref().clone(),
        allowed: allowed(),
    })
}

/// Compiles a pattern the way every rule is matched: on bytes, with ASCII classes.
///
/// With Unicode classes (the regex crate's default) `\w`, `\d`, `.` and `(?i)` compile to large
/// UTF-8 automata; a catalog of a few hundred rules then needs hundreds of megabytes, and its
/// lazy DFA gives up on ordinary lines and falls back to a slow engine (measured: 100 s for a
/// 1 MB log). Log lines are matched for ASCII words; non-ASCII text in a pattern still matches
/// as its UTF-8 bytes.
pub(super) fn ascii_regex(pattern: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(pattern).unicode(false).build()
}

/// A rule's regex with its required literals, compiled now or left for first use.
fn pattern(
    raw: Spanned<String>,
    at: &impl Fn(usize) -> Location,
    when: Compile,
) -> Result<Pattern, RuleError> {
    let regex = OnceLock::new();
    if when == Compile::Now {
        let _ = regex.set(compile(&raw, at)?);
    }
    let text = raw.into_inner();
    let cover = super::builtin_cover(&text).unwrap_or_else(|| literals::cover_of_pattern(&text));
    Ok(Pattern { text, regex, cover })
}

/// Compiles a rule's regex and checks what it can capture and that it needs some text to match.
fn compile(pattern: &Spanned<String>, at: &impl Fn(usize) -> Location) -> Result<Regex, RuleError> {
    let offset = pattern.span().start;
    let bad = |err: regex::Error| RuleError::BadRegex {
        at: at(offset),
        message: regex_problem(&err),
    };
    let regex = ascii_regex(pattern.get_ref()).map_err(bad)?;
    if let Some(name) = regex
        .capture_names()
        .flatten()
        .find(|name| !CAPTURES.contains(name))
    {
        return Err(RuleError::UnknownCapture {
            at: at(offset),
            name: name.to_string(),
        });
    }
    // A regex that matches the empty line (`.*`, `(foo)?`) matches every line there is.
    if regex.is_match(b"") {
        return Err(RuleError::MatchesEmpty { at: at(offset) });
    }
    Ok(regex)
}
