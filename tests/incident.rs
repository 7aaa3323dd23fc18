//! Root cause or cascade (issue 13), through the real binary: `scan --json` says of each finding
//! whether it starts an incident or follows from an earlier one, and names that one.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use serde_json::Value;

#[test]
fn scan_names_one_cause_per_incident() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("dmesg.log");
    // An Xid 79 and what followed on the same GPU, then a fault of another GPU.
    std::fs::write(
        &log,
        "[ 100.000001] NVRM: Xid (PCI:0000:06:00): 79, pid=4721, name=python3, GPU has fallen off the bus.\n\
         [ 100.000002] NVRM: GPU 0000:06:00.0: GPU has fallen off the bus.\n\
         [ 100.500000] NVRM: Xid (PCI:0000:06:00): 45, pid=4721, name=python3, Ch 00000010, Preemptive Cleanup, due to previous errors\n\
         [ 101.000000] NVRM: Xid (PCI:0000:86:00): 31, pid=99, name=python3, Ch 00000008, intr 00000000. MMU Fault: ENGINE GRAPHICS GPCCLIENT_T1_8 faulted @ 0x73ac_1c000000. Fault is of type FAULT_PDE ACCESS_TYPE_VIRT_WRITE\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gpuwarden"))
        .args(["scan", "--json"])
        .arg(&log)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let findings: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let roles: Vec<(&str, &str)> = findings
        .iter()
        .map(|f| {
            (
                f["rule"].as_str().unwrap(),
                f["incident"]["role"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        roles,
        [
            ("xid-79", "root"),
            ("nv-fallen-off-bus", "cascade"),
            ("xid-45", "cascade"),
            ("xid-31", "root"),
        ]
    );
    for cascade in &findings[1..3] {
        assert_eq!(cascade["incident"]["root"]["rule"], "xid-79");
        assert_eq!(cascade["incident"]["root"]["at_line"], 1);
    }
}
