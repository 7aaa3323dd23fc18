//! `scan` on live input: a finding comes out while the input is still open
//! (`dmesg -w | gpuwarden scan`), not when a block fills or the input ends. Issue 13.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const FAULT: &str = "Memory access fault by GPU node-2 (Agent handle: 0x38b6960) on address 0x1000. Reason: Page not present or supervisor privilege.";

#[test]
fn scan_on_a_pipe_prints_a_finding_before_its_input_ends() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpuwarden"))
        .args(["scan", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start gpuwarden scan");
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.expect("read scan output")).is_err() {
                break;
            }
        }
    });
    writeln!(stdin, "epoch 1 step 10 loss 0.5").expect("write to scan");
    writeln!(stdin, "{FAULT}").expect("write to scan");
    stdin.flush().expect("flush");
    // The input stays open: the finding must come anyway.
    let finding = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("a finding while the input is still open");
    assert!(
        finding.contains("\"rule\":\"hsa-memory-access-fault\""),
        "{finding}"
    );
    assert!(finding.contains("\"line\":2"), "{finding}");
    // Only now does the input end; nothing more is found, and scan says it found something.
    drop(stdin);
    let status = child.wait().expect("scan exits");
    assert_eq!(status.code(), Some(1), "grep-like: 1 means found");
    assert!(rx.recv_timeout(Duration::from_secs(5)).is_err());
}
