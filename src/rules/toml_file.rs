//! The TOML files of the `rules/` directory, rule files and quirk files alike: where in a file
//! something is, and the loading steps both formats share.
//!
//! Both formats are lists of tables (`[[rule]]` and `[[context]]`, or `[[quirk]]`), each with an
//! `id`, and both are read in two passes. The first parses plain TOML with byte spans: it catches
//! syntax errors and keys the format does not have, and notes where each table starts and what
//! its id is. The second deserializes the typed structure, every value with its span; a missing
//! field or a value of the wrong type is then reported with the table it is in. Whatever a file
//! gets wrong is said as `FILE:LINE: NOUN `ID`: PROBLEM; HINT`, so a person can jump to the line
//! and knows what to change. What a table's values mean (a class, a version requirement) is for
//! `rules::file` and `crate::quirks` to check.

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::DeTable;

/// Where a rule or quirk is defined: the file (as the user named it, or `rules/NAME.toml` for a
/// built-in file) and the 1-based line of its table header.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Origin {
    pub file: String,
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// Where in a rule or quirk file a problem is: file, 1-based line, and the id of the table it is
/// in when that is known (a syntax error before the first table, or a table without an `id`, has
/// none). Shown as `FILE:LINE: NOUN `ID``.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: String,
    pub line: usize,
    pub noun: Noun,
    /// Boxed, not a `String`: see [`Noun`].
    pub id: Option<Box<str>>,
}

/// What a file calls its tables in messages. An enum rather than the word itself, and the id a
/// `Box<str>`, because every error carries a [`Location`]: eight bytes more make the largest
/// rule error too large to return cheaply (clippy's `result_large_err`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Noun {
    /// A rule file's `[[rule]]`, and its `[[context]]` too.
    Rule,
    Quirk,
}

impl fmt::Display for Noun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Noun::Rule => "rule",
            Noun::Quirk => "quirk",
        })
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)?;
        if let Some(id) = &self.id {
            write!(f, ": {} `{id}`", self.noun)?;
        }
        Ok(())
    }
}

/// One format of data file: what its tables are called, which keys it has, and the hints its
/// errors end with.
pub struct Format {
    /// What a table is called in messages.
    pub noun: Noun,
    /// The top-level keys, each an array of tables, with the fields those tables may have.
    /// `None` leaves unknown fields to the typed pass (serde's `deny_unknown_fields`), whose
    /// message lists the expected fields itself.
    pub tables: &'static [(&'static str, Option<&'static [&'static str]>)],
    /// What a file may hold, said after an unknown top-level key.
    pub holds: &'static str,
    /// What a table needs, said after a missing field or a value of the wrong type.
    pub needs: &'static str,
}

impl Format {
    /// The location of table `id` defined at `origin`, for problems found after loading (a
    /// duplicate id across files).
    pub fn at(&self, origin: &Origin, id: Option<&str>) -> Location {
        Location {
            file: origin.file.clone(),
            line: origin.line,
            noun: self.noun,
            id: id.map(Box::from),
        }
    }
}

/// What any rule or quirk file can get wrong, whatever its format. Like the format's own errors,
/// each one stops gpuwarden before a job starts.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{at}: not valid TOML: {message}; fix the syntax on that line")]
    Syntax { at: Location, message: String },

    #[error("{at}: unknown top-level key `{key}`; {holds}")]
    UnknownTopLevel {
        at: Location,
        key: String,
        holds: &'static str,
    },

    #[error("{at}: unknown field `{field}`; this table may have only {allowed}")]
    UnknownField {
        at: Location,
        field: String,
        allowed: String,
    },

    #[error("{at}: {message}; {needs}")]
    Malformed {
        at: Location,
        message: String,
        needs: &'static str,
    },

    #[error("{at}: invalid id `{id}`; use only lowercase letters, digits and `-`")]
    BadId { at: Location, id: String },

    #[error("{at}: `{field}` is empty; write a sentence a person can act on")]
    Empty { at: Location, field: &'static str },
}

impl FileError {
    /// Where in the file the problem is.
    pub fn location(&self) -> &Location {
        match self {
            FileError::Syntax { at, .. }
            | FileError::UnknownTopLevel { at, .. }
            | FileError::UnknownField { at, .. }
            | FileError::Malformed { at, .. }
            | FileError::BadId { at, .. }
            | FileError::Empty { at, .. } => at,
        }
    }
}

/// One rule or quirk file being loaded: its name (as errors and origins show it), its text and
/// its format. TOML spans are byte offsets; this turns them into lines.
pub struct TomlFile<'a> {
    pub name: &'a str,
    pub text: &'a str,
    pub format: &'static Format,
}

impl TomlFile<'_> {
    /// The 1-based line of byte `offset`.
    pub fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    /// The location of byte `offset`, in the table `id` when it is known.
    pub fn at(&self, offset: usize, id: Option<&str>) -> Location {
        Location {
            file: self.name.to_string(),
            line: self.line_of(offset),
            noun: self.format.noun,
            id: id.map(Box::from),
        }
    }

    /// Where the table whose header is at byte `offset` is defined.
    pub fn origin(&self, offset: usize) -> Origin {
        Origin {
            file: self.name.to_string(),
            line: self.line_of(offset),
        }
    }

    /// Parses the file as `T` (its typed, spanned form), after checking its syntax and keys.
    pub fn load<T: DeserializeOwned>(&self) -> Result<T, FileError> {
        // First pass: plain TOML with spans. It catches syntax errors and unknown keys, and
        // records where each table starts and what its id is, so that a type error of the second
        // pass can name the table.
        let doc = DeTable::parse(self.text).map_err(|err| FileError::Syntax {
            at: self.at(err.span().map_or(0, |s| s.start), None),
            message: err.message().to_string(),
        })?;
        let starts = self.tables(doc.get_ref())?;

        // Second pass: the typed structure. What remains are missing fields, values of the wrong
        // type, and unknown fields where the format leaves them to serde.
        toml::from_str(self.text).map_err(|err| {
            let offset = err.span().map_or(0, |s| s.start);
            let id = starts
                .iter()
                .rev()
                .find(|(start, _)| *start <= offset)
                .and_then(|(_, id)| id.as_deref());
            FileError::Malformed {
                at: self.at(offset, id),
                message: err.message().trim_end().to_string(),
                needs: self.format.needs,
            }
        })
    }

    /// Rejects keys that are not part of the format, and returns the start offset and id (when
    /// it is a string) of every table, sorted by start.
    fn tables(&self, doc: &DeTable<'_>) -> Result<Vec<(usize, Option<String>)>, FileError> {
        let mut starts = Vec::new();
        for (key, value) in doc {
            let Some((_, fields)) = self
                .format
                .tables
                .iter()
                .find(|(name, _)| *name == key.get_ref().as_ref())
            else {
                return Err(FileError::UnknownTopLevel {
                    at: self.at(key.span().start, None),
                    key: key.get_ref().to_string(),
                    holds: self.format.holds,
                });
            };
            // A key that is not an array of tables is left to the typed pass, which says what it
            // expected.
            let elements = value
                .get_ref()
                .as_array()
                .into_iter()
                .flat_map(|a| a.iter());
            for element in elements {
                let table = element.get_ref().as_table();
                let id = table
                    .and_then(|t| t.get("id"))
                    .and_then(|v| v.get_ref().as_str())
                    .map(str::to_string);
                if let (Some(table), Some(fields)) = (table, fields)
                    && let Some((field, _)) = table
                        .iter()
                        .find(|(k, _)| !fields.contains(&k.get_ref().as_ref()))
                {
                    return Err(FileError::UnknownField {
                        at: self.at(field.span().start, id.as_deref()),
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

    /// Checks a table's id: lowercase letters, digits and `-`.
    pub fn id<'s>(&self, id: &'s Spanned<String>) -> Result<&'s str, FileError> {
        let text = id.get_ref().as_str();
        if text.is_empty()
            || !text
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(FileError::BadId {
                at: self.at(id.span().start, None),
                id: text.to_string(),
            });
        }
        Ok(text)
    }

    /// Checks that the text `field` of table `id` says something (`advice`, `summary`).
    pub fn not_blank(
        &self,
        field: &'static str,
        value: &Spanned<String>,
        id: &str,
    ) -> Result<(), FileError> {
        if value.get_ref().trim().is_empty() {
            return Err(FileError::Empty {
                at: self.at(value.span().start, Some(id)),
                field,
            });
        }
        Ok(())
    }
}

/// A list a table must have at least one of (`examples`): its items, or the offset to blame,
/// the empty list's or, when the list is missing, the table header's.
///
/// Such a list is optional in the raw form so that a table without it gets the format's own
/// error, which says why it is required, instead of serde's bare "missing field".
pub fn required<T>(list: Option<Spanned<Vec<T>>>, header: usize) -> Result<Vec<T>, usize> {
    match list {
        Some(list) if !list.get_ref().is_empty() => Ok(list.into_inner()),
        Some(list) => Err(list.span().start),
        None => Err(header),
    }
}

/// The short reason from a regex error. The regex crate's syntax errors span several lines (the
/// pattern, a caret, then `error: REASON`); only the reason fits on one line after `FILE:LINE:`.
pub fn regex_problem(err: &regex::Error) -> String {
    match err {
        regex::Error::Syntax(text) => text
            .rsplit_once("error: ")
            .map_or(text.as_str(), |(_, reason)| reason)
            .trim()
            .to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const FORMAT: Format = Format {
        noun: Noun::Quirk,
        tables: &[("thing", Some(&["id", "n"])), ("loose", None)],
        holds: "a test file holds only `[[thing]]` and `[[loose]]` tables",
        needs: "a [[thing]] has id and n",
    };

    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Raw {
        #[serde(default)]
        thing: Vec<Thing>,
        #[serde(default)]
        loose: Vec<toml::Table>,
    }

    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Thing {
        id: String,
        n: u32,
    }

    fn error(text: &str) -> String {
        let file = TomlFile {
            name: "t.toml",
            text,
            format: &FORMAT,
        };
        file.load::<Raw>().err().unwrap().to_string()
    }

    #[test]
    fn problems_name_the_line_and_the_table() {
        assert_eq!(
            error("[[thing]]\nid = \"a\"\nn = 1\n\n[[thing]]\nid = \"b\"\nn = \"x\"\n"),
            "t.toml:7: quirk `b`: invalid type: string \"x\", expected u32; a [[thing]] has id and n"
        );
        assert_eq!(
            error("[[thing]]\nid = \"a\"\nm = 1\n"),
            "t.toml:3: quirk `a`: unknown field `m`; this table may have only id, n"
        );
        // Unknown fields of a `None` table are left to the typed pass.
        assert!(
            error("[[loose]]\nm = 1\n[[thing]]\nid = 5\n").starts_with("t.toml:4: invalid type")
        );
        assert_eq!(
            error("\n[stuff]\n"),
            "t.toml:2: unknown top-level key `stuff`; a test file holds only `[[thing]]` and \
             `[[loose]]` tables"
        );
        assert!(error("[[thing]\n").starts_with("t.toml:1: not valid TOML: "));
        // An element that is not a table is not part of the table before it.
        assert!(
            error("thing = [{ id = \"a\", n = 1 }, 5]\n")
                .starts_with("t.toml:1: invalid type: integer `5`"),
        );
    }

    #[test]
    fn a_location_without_an_id_is_the_file_and_line() {
        let file = TomlFile {
            name: "t.toml",
            text: "a\nb\nc",
            format: &FORMAT,
        };
        assert_eq!(file.at(4, None).to_string(), "t.toml:3");
        assert_eq!(file.at(99, Some("x")).to_string(), "t.toml:3: quirk `x`");
        assert_eq!(file.origin(0).to_string(), "t.toml:1");
    }

    #[test]
    fn a_regex_syntax_error_is_cut_to_its_reason() {
        // Built at run time: clippy rejects an invalid regex literal.
        let pattern = String::from("(unclosed");
        let err = regex::Regex::new(&pattern).unwrap_err();
        assert_eq!(regex_problem(&err), "unclosed group");
    }
}
