//! The deployment examples stay valid: the systemd unit passes `systemd-analyze verify`, the
//! Slurm batch script parses and asks for what the README promises.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn example(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// Says loudly why a check cannot run; under CI (`CI=true`) that is a failure.
fn skip(why: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(!ci, "cannot run under CI: {why}");
    eprintln!("SKIPPED: {why}");
}

#[test]
fn the_systemd_unit_verifies() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        return skip("systemd-analyze not found (Debian package `systemd`)");
    }
    let unit = example("examples/systemd/gpuwarden@.service");
    assert!(unit.contains("KillMode=mixed"));
    assert!(unit.contains("SuccessExitStatus=143"));
    assert!(unit.contains("RestartPreventExitStatus=2 3"));
    // verify checks that ExecStart's program exists: point it at the binary under test, and
    // give the template an instance name.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpuwarden@demo.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/gpuwarden", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{said}");
    assert!(!said.contains("gpuwarden@demo.service"), "{said}");
}

#[test]
fn the_slurm_script_parses_and_forwards_usr1_then_requeues() {
    let script = example("examples/slurm/train.sbatch");
    for want in [
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@90",
        "kill -USR1 \"$step\"",
        "srun ",
        "--resume {checkpoint}",
        "scontrol requeue",
    ] {
        assert!(script.contains(want), "missing {want}");
    }
    let out = Command::new("bash")
        .arg("-n")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/slurm/train.sbatch"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}
