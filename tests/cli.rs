//! The command line as a new user meets it: the real binary, its error messages and exit codes.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};

use common::*;

fn gpuwarden(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (out.status.code(), text(&out.stderr))
}

#[test]
fn a_command_without_the_double_dash_is_told_where_to_go() {
    let (code, stderr) = gpuwarden(&["run", "--grace", "3", "python", "-u", "x y.py"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("put the command to supervise after `--`"),
        "{stderr}"
    );
    // The corrected line, quoted so it can be pasted.
    assert!(
        stderr.contains("gpuwarden run --grace 3 -- python -u 'x y.py'"),
        "{stderr}"
    );
    // Nothing else: an unknown option is still clap's business.
    let (code, stderr) = gpuwarden(&["run", "--gracee", "3", "--", "true"]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("unexpected argument '--gracee'"),
        "{stderr}"
    );
}

#[test]
fn durations_with_units_and_plain_seconds() {
    for (grace, seconds) in [
        ("10", 10.0),
        ("10s", 10.0),
        ("20m", 1200.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
    ] {
        let scene = Scene::new();
        let out = scene.run(
            &[
                "--grace",
                grace,
                "--health-interval",
                "500ms",
                "--no-kernel-log",
            ],
            &["--steps", "1"],
        );
        assert_eq!(out.status.code(), Some(0), "{grace}: {}", text(&out.stderr));
        let started = &scene.journal()[0];
        assert_eq!(started["event"], "run_started");
        assert_eq!(started["grace_seconds"], seconds, "{grace}");
    }
    let (code, stderr) = gpuwarden(&["run", "--grace", "10x", "--", "true"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("unknown unit `x`"), "{stderr}");
    assert!(stderr.contains("1h30m"), "{stderr}");
    // Still checked against the one-day limit, as the file's `grace` is.
    let (code, stderr) = gpuwarden(&["run", "--grace", "2d", "--", "true"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--grace"), "{stderr}");
    let (code, stderr) = gpuwarden(&["run", "--health-interval", "0s", "--", "true"]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("between 0 (exclusive) and one day"),
        "{stderr}"
    );
}

#[test]
fn a_mistyped_subcommand_gets_a_suggestion() {
    for (typed, meant) in [
        ("rnu", "run"),
        ("rn", "run"),
        ("porbe", "probe"),
        ("demp", "demo"),
    ] {
        let (code, stderr) = gpuwarden(&[typed]);
        assert_eq!(code, Some(2), "{typed}");
        assert!(
            stderr.contains(&format!("a similar subcommand exists: '{meant}'")),
            "{typed}: {stderr}"
        );
    }
}
