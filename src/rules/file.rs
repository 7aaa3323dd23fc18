//! Reading one rule file: TOML text in, validated `Rule`s out, or a `RuleError` that names the
//! file, the line and the rule.
//!
//! Loading happens in two stages, like ripgrep's low-level and high-level arguments: `RawRule` is
//! exactly what the file says (strings with their byte spans), and `validate` turns it into a
//! `Rule` with a compiled regex and checked names. This file knows nothing about other files:
//! duplicate ids across files, and matching, are `RuleSet`'s business in `mod.rs`.

use regex::bytes::{Regex, RegexBuilder};
use serde::Deserialize;
use toml::Spanned;
use toml::de::DeTable;

use super::{
    Action, Context, FaultClass, Joins, Loaded, Location, Origin, Rule, RuleError, Severity, Stream,
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

/// The 1-based line of byte `offset` of `text` (TOML spans are byte offsets). Rule files and
/// the quirks file both name lines in their errors this way.
pub(crate) fn line_number(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The id of the table that holds byte `offset`, given where each table starts (sorted) and its
/// id: a type error of the typed pass is reported with the rule or quirk it is in.
pub(crate) fn table_at(starts: &[(usize, Option<String>)], offset: usize) -> Option<&str> {
    starts
        .iter()
        .rev()
        .find(|(start, _)| *start <= offset)
        .and_then(|(_, id)| id.as_deref())
}

/// Turns byte offsets into 1-based line numbers for one file.
struct Lines<'a> {
    file: &'a str,
    text: &'a str,
}

impl Lines<'_> {
    fn line_of(&self, offset: usize) -> usize {
        line_number(self.text, offset)
    }

    fn at(&self, offset: usize, rule: Option<&str>) -> Location {
        Location {
            file: self.file.to_string(),
            line: self.line_of(offset),
            rule: rule.map(str::to_string),
        }
    }
}

/// Parses and validates the rule file `text`; `file` is the name used in origins and errors.
pub(super) fn parse(file: &str, text: &str) -> Result<Loaded, RuleError> {
    let lines = Lines { file, text };
    // First pass: plain TOML with spans. It catches syntax errors and unknown keys, and records
    // where each rule starts and what its id is, so that a later type error can name the rule.
    let doc = DeTable::parse(text).map_err(|err| RuleError::Syntax {
        at: lines.at(err.span().map_or(0, |s| s.start), None),
        message: err.message().to_string(),
    })?;
    let starts = check_keys(&lines, doc.get_ref())?;

    // Second pass: the typed structure. deny_unknown_fields is already guaranteed by check_keys;
    // what remains are missing fields and values of the wrong type.
    let raw: RawFile = toml::from_str(text).map_err(|err| {
        let offset = err.span().map_or(0, |s| s.start);
        let rule = table_at(&starts, offset);
        RuleError::Malformed {
            at: lines.at(offset, rule),
            message: err.message().to_string(),
        }
    })?;

    let rules = raw
        .rule
        .into_iter()
        .map(|raw| validate(&lines, raw))
        .collect::<Result<Vec<_>, _>>()?;
    let contexts = raw
        .context
        .into_iter()
        .map(|raw| validate_context(&lines, raw))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Loaded { rules, contexts })
}

/// Rejects keys that are not part of the format, and returns the start offset and id (when it is
/// a string) of every `[[rule]]` and `[[context]]` table.
fn check_keys(
    lines: &Lines<'_>,
    doc: &DeTable<'_>,
) -> Result<Vec<(usize, Option<String>)>, RuleError> {
    let mut starts = Vec::new();
    for (key, value) in doc {
        let fields: &[&str] = match key.get_ref().as_ref() {
            "rule" => &FIELDS,
            "context" => &CONTEXT_FIELDS,
            _ => {
                return Err(RuleError::UnknownTopLevel {
                    at: lines.at(key.span().start, None),
                    key: key.get_ref().to_string(),
                });
            }
        };
        // A `rule` that is not an array of tables is left to the typed pass, which says what it
        // expected.
        let Some(array) = value.get_ref().as_array() else {
            continue;
        };
        for element in array.iter() {
            let Some(table) = element.get_ref().as_table() else {
                continue;
            };
            let id = table
                .get("id")
                .and_then(|v| v.get_ref().as_str())
                .map(str::to_string);
            if let Some((field, _)) = table
                .iter()
                .find(|(k, _)| !fields.contains(&k.get_ref().as_ref()))
            {
                return Err(RuleError::UnknownField {
                    at: lines.at(field.span().start, id.as_deref()),
                    field: field.get_ref().to_string(),
                    allowed: fields.join(", "),
                });
            }
            starts.push((element.span().start, id));
        }
    }
    starts.sort_by_key(|(start, _)| *start);
    Ok(starts)
}

/// Checks an id: lowercase letters, digits and `-`.
fn check_id<'a>(lines: &Lines<'_>, id: &'a Spanned<String>) -> Result<&'a str, RuleError> {
    let text = id.get_ref().as_str();
    if text.is_empty()
        || !text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(RuleError::BadId {
            at: lines.at(id.span().start, None),
            id: text.to_string(),
        });
    }
    Ok(text)
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
    match raw {
        Some(examples) if !examples.get_ref().is_empty() => Ok(examples.into_inner()),
        Some(examples) => Err(RuleError::NoExamples {
            at: at(examples.span().start),
        }),
        None => Err(RuleError::NoExamples { at: at(header) }),
    }
}

/// Checks one raw `[[context]]` and compiles its regex.
fn validate_context(lines: &Lines<'_>, raw: Spanned<RawContext>) -> Result<Context, RuleError> {
    let header = raw.span().start;
    let raw = raw.into_inner();
    let id = check_id(lines, &raw.id)?;
    let at = |offset: usize| lines.at(offset, Some(id));
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
    let regex = compile(&raw.regex, &at)?;
    Ok(Context {
        id: id.to_string(),
        streams,
        joins,
        classes,
        origin: Origin {
            file: lines.file.to_string(),
            line: lines.line_of(header),
        },
        pattern: raw.regex.into_inner(),
        regex,
        examples: examples(raw.examples, header, &at)?,
        counterexamples: raw.counterexamples,
    })
}

/// Checks one raw rule and compiles its regex.
fn validate(lines: &Lines<'_>, raw: Spanned<RawRule>) -> Result<Rule, RuleError> {
    let header = raw.span().start;
    let raw = raw.into_inner();
    let id = check_id(lines, &raw.id)?;
    let at = |offset: usize| lines.at(offset, Some(id));

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

    let regex = compile(&raw.regex, &at)?;
    let pattern = raw.regex.into_inner();

    if raw.advice.get_ref().trim().is_empty() {
        return Err(RuleError::EmptyAdvice {
            at: at(raw.advice.span().start),
        });
    }

    let examples = examples(raw.examples, header, &at)?;

    Ok(Rule {
        id: id.to_string(),
        class,
        severity,
        action,
        streams,
        advice: raw.advice.into_inner(),
        origin: Origin {
            file: lines.file.to_string(),
            line: lines.line_of(header),
        },
        pattern,
        regex,
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

/// The short reason from a regex error. The regex crate's syntax errors span several lines (the
/// pattern, a caret, then `error: REASON`); only the reason fits on one line after `FILE:LINE:`.
fn regex_problem(err: &regex::Error) -> String {
    match err {
        regex::Error::Syntax(text) => text
            .rsplit_once("error: ")
            .map_or(text.as_str(), |(_, reason)| reason)
            .trim()
            .to_string(),
        other => other.to_string(),
    }
}
