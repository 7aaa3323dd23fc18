//! `gpuwarden rules check` and `rules list`: verify the fault rules against their own examples,
//! and list them with where each is defined.

use std::io::Write;

use gpuwarden::exit;
use gpuwarden::rules::RuleSet;

use super::error;
use crate::cli::RulesCommand;

pub fn rules(cmd: RulesCommand) -> i32 {
    match cmd {
        RulesCommand::Check { dir } => {
            let check = match &dir {
                Some(dir) => RuleSet::check_dir(dir),
                None => RuleSet::check_builtin(),
            };
            for e in &check.errors {
                error(e);
            }
            for f in &check.failures {
                let _ = writeln!(std::io::stderr(), "{f}");
            }
            if check.passed() {
                println!(
                    "{} rules and context entries in {} files: every example matches, no \
                     counterexample does",
                    check.rules, check.files
                );
                exit::SUCCESS
            } else {
                error(format_args!(
                    "{} broken file(s) and {} failing example(s) among {} rules in {} files",
                    check.errors.len(),
                    check.failures.len(),
                    check.rules,
                    check.files
                ));
                exit::USAGE
            }
        }
        RulesCommand::List { rules } => match RuleSet::load(&rules) {
            Ok(set) => {
                // `rules list | head` closes the pipe: stop quietly, not with a panic.
                let _ = list_rules(&set);
                exit::SUCCESS
            }
            Err(e) => {
                error(e);
                exit::USAGE
            }
        },
    }
}

/// Writes `rules list`: one line per rule, then the context entries.
fn list_rules(set: &RuleSet) -> std::io::Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    writeln!(
        out,
        "{:<36} {:<24} {:<9} {:<9} streams",
        "id", "class", "severity", "action"
    )?;
    for r in set.rules() {
        let streams: Vec<String> = r.streams.iter().map(|s| s.to_string()).collect();
        writeln!(
            out,
            "{:<36} {:<24} {:<9} {:<9} {}  ({}:{})",
            r.id,
            r.class.as_str(),
            r.severity.to_string(),
            r.action.to_string(),
            streams.join(","),
            r.origin.file,
            r.origin.line
        )?;
    }
    writeln!(
        out,
        "\ncontext entries (lines that join a finding, never start one):"
    )?;
    for c in set.contexts() {
        let classes: Vec<&str> = c.classes.iter().map(|c| c.as_str()).collect();
        writeln!(
            out,
            "{:<36} joins {:<6} {:<24} ({}:{})",
            c.id,
            c.joins.as_str(),
            if classes.is_empty() {
                "any class".to_string()
            } else {
                classes.join(",")
            },
            c.origin.file,
            c.origin.line
        )?;
    }
    out.flush()
}
