//! Issue 8: no import cycle among the files of `src/`. A file depends on another when its code
//! (not its comments, not its test module) names a path into it with `crate::` or `super::`.
//! A cycle is reported with the files on it, so whoever adds one sees where.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path of each source file (`sources::health::tool`), and its code outside tests and
/// comments.
fn modules() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    let root = stack[0].clone();
    // The test module and what follows it (attributes between `cfg(test)` and `mod` allowed).
    let tests = regex::Regex::new(r"#\[cfg\(test\)\]\s*(#\[[^\]]*\]\s*)*mod ").unwrap();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&root).unwrap().with_extension("");
            let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into()).collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            let name = match parts.join("::").as_str() {
                "lib" => "crate".to_string(),
                other => other.to_string(),
            };
            let text = std::fs::read_to_string(&path).unwrap();
            let code = match tests.find(&text) {
                Some(at) => &text[..at.start()],
                None => &text[..],
            };
            let code: String = code
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            out.insert(name, code);
        }
    }
    out
}

/// The longest module path among `known` that `path` starts with.
fn resolve<'a>(known: &'a BTreeMap<String, String>, path: &[&str]) -> Option<&'a str> {
    (1..=path.len()).rev().find_map(|n| {
        let candidate = path[..n].join("::");
        known.get_key_value(&candidate).map(|(k, _)| k.as_str())
    })
}

fn edges(known: &BTreeMap<String, String>) -> BTreeMap<&str, BTreeSet<&str>> {
    let path_re = regex::Regex::new(r"\b(crate|super)((?:::\w+)+)").unwrap();
    let mut out: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (name, code) in known {
        let here: Vec<&str> = name.split("::").collect();
        let deps = out.entry(name.as_str()).or_default();
        for cap in path_re.captures_iter(code) {
            let tail: Vec<&str> = cap[2].trim_start_matches("::").split("::").collect();
            let mut full: Vec<&str> = match &cap[1] {
                "crate" => Vec::new(),
                // `super` of `a::b` is `a`, whether it is `a/b.rs` or `a/b/mod.rs`.
                _ => here[..here.len().saturating_sub(1)].to_vec(),
            };
            full.extend(tail);
            if let Some(target) = resolve(known, &full)
                && target != name
            {
                deps.insert(target);
            }
        }
    }
    out
}

/// A cycle through `start`, if there is one: depth-first from each dependency back to it.
fn cycle_through<'a>(
    graph: &BTreeMap<&'a str, BTreeSet<&'a str>>,
    start: &'a str,
) -> Option<Vec<&'a str>> {
    let mut seen = BTreeSet::new();
    let mut stack: Vec<Vec<&str>> = vec![vec![start]];
    while let Some(path) = stack.pop() {
        let last = *path.last().unwrap();
        for &next in graph.get(last).into_iter().flatten() {
            if next == start {
                return Some(path.clone());
            }
            if seen.insert(next) {
                let mut longer = path.clone();
                longer.push(next);
                stack.push(longer);
            }
        }
    }
    None
}

#[test]
fn no_import_cycle_among_source_files() {
    let known = modules();
    assert!(known.len() > 50, "src/ was not read: {} files", known.len());
    let graph = edges(&known);
    // The graph is read at all: the executor depends on the supervisor.
    assert!(
        graph["executor"].contains("supervisor"),
        "{:?}",
        graph["executor"]
    );
    let cycles: Vec<String> = graph
        .keys()
        .filter_map(|&m| cycle_through(&graph, m))
        .map(|c| c.join(" -> "))
        .collect();
    assert!(
        cycles.is_empty(),
        "import cycles among src files:\n{}",
        cycles.join("\n")
    );
}
