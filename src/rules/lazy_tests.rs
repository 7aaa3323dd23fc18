//! Tests of the catalog compiled on first use (issue 13): the build-time literals, and that a
//! benign line compiles nothing.

use super::*;

#[test]
fn every_builtin_regex_compiles() {
    // The built-in regexes are not compiled at load; this is what stands for that check.
    let rules = RuleSet::builtin().unwrap();
    for rule in rules.rules() {
        assert!(file::ascii_regex(rule.regex()).is_ok(), "{}", rule.id);
    }
    for context in rules.contexts() {
        assert!(file::ascii_regex(context.regex()).is_ok(), "{}", context.id);
    }
}

#[test]
fn the_build_time_literals_are_what_the_loader_would_find() {
    let rules = RuleSet::builtin().unwrap();
    let patterns = rules
        .rules()
        .iter()
        .map(|r| r.regex())
        .chain(rules.contexts().iter().map(|c| c.regex()));
    for pattern in patterns {
        assert_eq!(
            builtin_cover(pattern),
            Some(literals::cover_of_pattern(pattern)),
            "{pattern}"
        );
    }
}

#[test]
fn every_example_holds_one_of_its_rules_literals() {
    let rules = RuleSet::builtin().unwrap();
    let entries = rules
        .rules()
        .iter()
        .map(|r| (&r.id, &r.pattern, r.examples()))
        .chain(
            rules
                .contexts()
                .iter()
                .map(|c| (&c.id, &c.pattern, c.examples())),
        );
    for (id, pattern, examples) in entries {
        let Some(cover) = &pattern.cover else {
            continue;
        };
        for example in examples {
            let line = example.to_ascii_lowercase();
            assert!(
                cover.iter().any(|lit| {
                    let lit = lit.bytes.to_ascii_lowercase();
                    memchr::memmem::find(line.as_bytes(), &lit).is_some()
                }),
                "{id}: {example:?} holds none of {cover:?}"
            );
        }
    }
}

#[test]
fn a_benign_line_compiles_no_rule() {
    let rules = RuleSet::builtin().unwrap();
    rules.prepare(&[Stream::Stdout, Stream::Stderr, Stream::Kernel]);
    for line in [
        "epoch 3 step 1200/100000 loss=0.4312 lr=3.0e-04 grad_norm=0.812 samples/s=912",
        "[  12.345678] usb 1-1.2: new high-speed USB device number 5 using xhci_hcd",
    ] {
        assert!(rules.classify(Stream::Stdout, line).is_none());
        assert!(rules.classify(Stream::Kernel, line).is_none());
    }
    let compiled = rules
        .rules()
        .iter()
        .filter(|r| r.pattern.regex.get().is_some())
        .count();
    assert_eq!(compiled, 0);
    // A fault line compiles the few rules whose literals it holds, not the catalog.
    let fault = "NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, GPU has fallen off the bus.";
    assert!(rules.classify(Stream::Kernel, fault).is_some());
    let compiled = rules
        .rules()
        .iter()
        .filter(|r| r.pattern.regex.get().is_some())
        .count();
    assert!(compiled < rules.rules().len() / 2, "{compiled} compiled");
}
