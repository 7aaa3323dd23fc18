//! Required literals: for one regex, a few strings such that every match contains one of them.
//!
//! This is what lets the catalog cost nothing until a line could be a fault. A line that holds
//! none of a rule's required literals cannot match the rule, so the rule's regex is neither run
//! on it nor even compiled: `RuleSet` keeps one small literal searcher per stream and compiles a
//! rule's regex the first time one of its literals turns up. Finding the literals means parsing
//! the regex; for the built-in rules `build.rs` does that at build time (this file is compiled
//! into the build script too), so that a start parses no regex at all (measured: parsing the
//! catalog's ~350 regexes takes 15-40 ms, more than the whole start should).
//!
//! A cover is conservative: it may be weaker than the regex (a line with the literal may still
//! not match), never stronger. `(?i)` letters are kept lowercase with the literal marked
//! case-insensitive; a literal that joins case-insensitive and case-sensitive parts is searched
//! case-insensitively, which finds a superset of the lines.

use regex_syntax::hir::{Class, Hir, HirKind};

/// One required literal. When `ci`, `bytes` are lowercase and match ASCII-case-insensitively.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lit {
    pub bytes: Vec<u8>,
    pub ci: bool,
}

/// How many strings a finite set may hold while literals are joined; past it, a run of literals
/// is cut (a cut only makes the cover weaker).
const MAX_SET: usize = 32;
/// Longer literals are cut to this many bytes: a long literal is no more selective than its
/// first bytes, and cutting keeps the searcher small.
const MAX_LEN: usize = 24;

/// The required literals of a regex parsed with the catalog's flags (`unicode(false)`,
/// `utf8(false)`), or `None` when it can match without any literal of useful length (such a
/// regex is run on every line).
pub fn cover(hir: &Hir) -> Option<Vec<Lit>> {
    let info = info(hir);
    let mut best = info.cover;
    if let Some(exact) = info.exact {
        best = better(best, as_cover(exact));
    }
    best
}

/// What a piece of a regex says about literals.
struct Info {
    /// Every string the piece can match, when there are few (the empty string included).
    exact: Option<Vec<Lit>>,
    /// Literals of which every match of the piece contains one.
    cover: Option<Vec<Lit>>,
}

fn info(hir: &Hir) -> Info {
    match hir.kind() {
        HirKind::Empty | HirKind::Look(_) => Info {
            exact: Some(vec![empty()]),
            cover: None,
        },
        HirKind::Literal(lit) => Info {
            exact: Some(vec![Lit {
                bytes: lit.0.to_vec(),
                ci: false,
            }]),
            cover: None,
        },
        HirKind::Class(class) => Info {
            exact: class_strings(class),
            cover: None,
        },
        HirKind::Capture(capture) => info(&capture.sub),
        HirKind::Repetition(rep) => {
            if rep.min == 0 {
                return Info {
                    exact: None,
                    cover: None,
                };
            }
            let sub = info(&rep.sub);
            let exact = match (&sub.exact, rep.max) {
                (Some(exact), Some(max)) if max == rep.min && max <= 4 => {
                    let mut run = Some(vec![empty()]);
                    for _ in 0..max {
                        run = run.and_then(|run| cross(&run, exact));
                    }
                    run
                }
                _ => None,
            };
            // At least one copy of the piece: its own cover, or its strings, are required.
            let cover = better(sub.cover, sub.exact.and_then(as_cover));
            Info { exact, cover }
        }
        HirKind::Concat(subs) => {
            let mut best: Option<Vec<Lit>> = None;
            let mut run: Option<Vec<Lit>> = Some(vec![empty()]);
            let mut whole = true;
            for sub in subs {
                let sub = info(sub);
                best = better(best, sub.cover);
                match (run.take(), sub.exact) {
                    (Some(current), Some(exact)) => match cross(&current, &exact) {
                        Some(joined) => run = Some(joined),
                        None => {
                            whole = false;
                            best = better(best, as_cover(current));
                            run = Some(exact);
                        }
                    },
                    (current, exact) => {
                        whole = false;
                        if let Some(current) = current {
                            best = better(best, as_cover(current));
                        }
                        run = exact;
                    }
                }
            }
            if whole {
                return Info {
                    exact: run,
                    cover: best,
                };
            }
            if let Some(current) = run {
                best = better(best, as_cover(current));
            }
            Info {
                exact: None,
                cover: best,
            }
        }
        HirKind::Alternation(subs) => {
            let infos: Vec<Info> = subs.iter().map(info).collect();
            let mut exact = Some(Vec::new());
            let mut cover = Some(Vec::new());
            for sub in infos {
                exact = match (exact, &sub.exact) {
                    (Some(mut all), Some(these)) if all.len() + these.len() <= MAX_SET => {
                        all.extend(these.iter().cloned());
                        Some(all)
                    }
                    _ => None,
                };
                let mine = better(sub.cover, sub.exact.and_then(as_cover));
                cover = match (cover, mine) {
                    (Some(mut all), Some(these)) => {
                        all.extend(these);
                        Some(all)
                    }
                    _ => None,
                };
            }
            Info {
                exact: exact.map(dedup),
                cover: cover.map(dedup),
            }
        }
    }
}

fn empty() -> Lit {
    Lit {
        bytes: Vec::new(),
        ci: false,
    }
}

/// The strings of a small class: one byte, a letter in both cases (`(?i)`), or up to four bytes.
fn class_strings(class: &Class) -> Option<Vec<Lit>> {
    let Class::Bytes(class) = class else {
        return None;
    };
    let bytes: Vec<u8> = class
        .ranges()
        .iter()
        .flat_map(|r| r.start()..=r.end())
        .take(5)
        .collect();
    match bytes.as_slice() {
        [upper, lower] if upper.is_ascii_uppercase() && *lower == upper.to_ascii_lowercase() => {
            Some(vec![Lit {
                bytes: vec![*lower],
                ci: true,
            }])
        }
        b if !b.is_empty() && b.len() <= 4 => Some(
            b.iter()
                .map(|&b| Lit {
                    bytes: vec![b],
                    ci: false,
                })
                .collect(),
        ),
        _ => None,
    }
}

/// Every string of `a` followed by every string of `b`; `None` past `MAX_SET`.
fn cross(a: &[Lit], b: &[Lit]) -> Option<Vec<Lit>> {
    if a.len() * b.len() > MAX_SET {
        return None;
    }
    let mut out = Vec::with_capacity(a.len() * b.len());
    for x in a {
        for y in b {
            let ci = x.ci || y.ci;
            let mut bytes = x.bytes.clone();
            bytes.extend_from_slice(&y.bytes);
            if ci {
                bytes.make_ascii_lowercase();
            }
            // Past MAX_LEN a literal only gets longer, not better: keep its head, which every
            // longer string also starts with.
            bytes.truncate(MAX_LEN);
            out.push(Lit { bytes, ci });
        }
    }
    Some(dedup(out))
}

/// A set of strings as a cover: none may be empty.
fn as_cover(strings: Vec<Lit>) -> Option<Vec<Lit>> {
    (!strings.is_empty() && strings.iter().all(|l| !l.bytes.is_empty())).then_some(strings)
}

fn dedup(mut lits: Vec<Lit>) -> Vec<Lit> {
    lits.sort();
    lits.dedup();
    lits
}

/// How selective a cover is: its weakest literal decides (a line holding it makes the regex
/// run). Shorter is worse; case-insensitive counts a little worse; many literals a little worse.
fn score(cover: &[Lit]) -> i64 {
    let weakest = cover
        .iter()
        .map(|l| {
            let len = l.bytes.len().min(12) as i64;
            len * 4 - i64::from(l.ci)
        })
        .min()
        .unwrap_or(0);
    weakest * 8 - (cover.len() as i64).min(8)
}

fn better(a: Option<Vec<Lit>>, b: Option<Vec<Lit>>) -> Option<Vec<Lit>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if score(&b) > score(&a) { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// The cover of `pattern` as the catalog parses it, or `None` for no useful cover. A pattern
/// that does not parse has none (loading reports it).
#[allow(dead_code)] // build.rs uses only this function
pub fn cover_of_pattern(pattern: &str) -> Option<Vec<Lit>> {
    let hir = regex_syntax::ParserBuilder::new()
        .unicode(false)
        .utf8(false)
        .build()
        .parse(pattern)
        .ok()?;
    let cover = cover(&hir)?;
    // A literal of one or two bytes (`: `, `On`) is on a large share of lines: such a cover
    // saves nothing, and the regex is better searched for whole.
    cover
        .iter()
        .all(|l| l.bytes.len() >= MIN_LEN)
        .then_some(cover)
}

/// The shortest literal worth searching for.
pub const MIN_LEN: usize = 3;
