//! `gpuwarden scan` throughput against ripgrep and GNU grep with the same patterns, over 1 GB of
//! realistic log lines.
//!
//! Run with `cargo bench --bench scan` (release build of the binary; `rg` and `grep` on PATH).
//! The log is generated once into `target/scan-bench/` from the corpus's benign lines, typical
//! training output (step lines, tqdm bars, warnings) and kernel chatter with dmesg stamps, with a
//! real fault line from the corpus every 20,000 lines. Patterns are the catalog's own regexes
//! (rules and contexts): ripgrep reads them as they are (same regex dialect); for grep they are
//! translated to POSIX ERE (named and non-capturing groups to plain groups, `\d` to `[0-9]`,
//! `(?i)` to bracketed letter pairs, lazy quantifiers to greedy ones). gpuwarden and ripgrep run
//! twice each over the whole log, the faster run counting; GNU grep, two orders of magnitude
//! slower with this many patterns, runs once over the first `GREP_MB` (100) megabytes. Set
//! `SCAN_BENCH_MB` to change the size of the log.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use gpuwarden::rules::RuleSet;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("target/scan-bench");
    fs::create_dir_all(&dir).expect("create target/scan-bench");
    let mb: u64 = std::env::var("SCAN_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let log = dir.join(format!("realistic-{mb}MB.log"));
    let (lines, faults) = generate(&root, &log, mb << 20);
    let bytes = fs::metadata(&log).expect("log written").len();
    println!(
        "log: {} ({:.0} MB, {lines} lines, {faults} fault lines)",
        log.display(),
        bytes as f64 / 1e6
    );

    let rules = RuleSet::builtin().expect("built-in rules load");
    let patterns: Vec<String> = rules
        .rules()
        .iter()
        .map(|r| r.regex().to_string())
        .chain(rules.contexts().iter().map(|c| c.regex().to_string()))
        .collect();
    // ripgrep joins its patterns into one regex, where two groups may not share a name: the
    // same regexes with plain groups.
    let rust_patterns = dir.join("patterns.rust");
    let unnamed: Vec<String> = patterns.iter().map(|p| without_names(p)).collect();
    fs::write(&rust_patterns, unnamed.join("\n") + "\n").expect("write patterns");
    let ere_patterns = dir.join("patterns.ere");
    let ere: Vec<String> = patterns.iter().map(|p| to_ere(p)).collect();
    fs::write(&ere_patterns, ere.join("\n") + "\n").expect("write patterns");
    println!("patterns: {} (rules and contexts)", patterns.len());

    let exe = build_release(&root);
    println!("\n{:<44} {:>9} {:>10}  output", "tool", "seconds", "MB/s");
    let report = |name: &str, bytes: u64, (secs, out, _): &(f64, String, u64)| {
        println!(
            "{name:<44} {secs:>9.2} {:>10.0}  {out}",
            bytes as f64 / 1e6 / secs
        );
        bytes as f64 / secs
    };
    let scan = time(
        "gpuwarden scan --json",
        2,
        1,
        Command::new(&exe).args(["scan", "--json"]).arg(&log),
    );
    let scan_rate = report("gpuwarden scan --json", bytes, &scan);
    let rg = time(
        "rg -c -f",
        2,
        0,
        // ASCII classes, as gpuwarden matches (with Unicode classes ripgrep needs more than ten
        // minutes for 100 MB with these patterns); size limits raised for a few hundred rules.
        Command::new("rg")
            .args([
                "--no-config",
                "--no-unicode",
                "--regex-size-limit",
                "1G",
                "--dfa-size-limit",
                "1G",
                "-c",
                "-f",
            ])
            .arg(&rust_patterns)
            .arg(&log),
    );
    let rg_rate = report("rg --no-unicode -c -f (same regexes)", bytes, &rg);
    // GNU grep with a few hundred extended regexes is two orders of magnitude slower: it runs
    // once, over the first GREP_MB megabytes of the same log.
    let grep_mb: u64 = std::env::var("GREP_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let slice = dir.join(format!("realistic-first-{grep_mb}MB.log"));
    write_prefix(&log, &slice, grep_mb << 20);
    let slice_bytes = fs::metadata(&slice).expect("slice written").len();
    let grep = time(
        "grep -E -c -f",
        1,
        0,
        Command::new("grep")
            .env("LC_ALL", "C")
            .args(["-E", "-c", "-f"])
            .arg(&ere_patterns)
            .arg(&slice),
    );
    report(
        &format!("LC_ALL=C grep -E -c -f (ERE; first {grep_mb} MB)"),
        slice_bytes,
        &grep,
    );
    // The same log, the same regexes: each finding of scan holds at least one line rg matches
    // (rg counts context lines too), and a log with fault lines in it has findings.
    assert!(
        scan.2 > 0 && rg.2 >= scan.2,
        "scan found {} and rg matched {} lines, for {faults} fault lines written",
        scan.2,
        rg.2
    );
    println!(
        "\ngpuwarden scan runs at {:.0}% of ripgrep's throughput",
        100.0 * scan_rate / rg_rate
    );
}

/// The first `size` bytes of `log`, cut at a line end.
fn write_prefix(log: &Path, slice: &Path, size: u64) {
    if fs::metadata(slice).is_ok() {
        return;
    }
    let data = fs::read(log).expect("read log");
    let cut = (size as usize).min(data.len());
    let end = data[..cut]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(cut, |i| i + 1);
    fs::write(slice, &data[..end]).expect("write slice");
}

/// Builds the release binary (cargo bench builds the library, not necessarily the binary).
fn build_release(root: &Path) -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--bin", "gpuwarden"])
        .current_dir(root)
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build --release failed");
    root.join("target/release/gpuwarden")
}

/// Runs a command `runs` times with its output to a pipe; the fastest wall time, a summary of
/// what it printed (findings for scan, the sum of the counts for rg/grep) and that number. A
/// run that does not exit with `expect` (scan: 1 = findings; rg and grep: 0 = matches) is a
/// failed measurement, not a fast one.
fn time(name: &str, runs: usize, expect: i32, command: &mut Command) -> (f64, String, u64) {
    let mut best = f64::INFINITY;
    let mut summary = String::new();
    let mut count = 0;
    for _ in 0..runs {
        let started = Instant::now();
        let out = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap_or_else(|e| panic!("{name}: cannot run: {e}"));
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(
            out.status.code(),
            Some(expect),
            "{name} exited {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        best = best.min(secs);
        let text = String::from_utf8_lossy(&out.stdout);
        (count, summary) = if name.starts_with("gpuwarden") {
            let n = text.lines().count() as u64;
            (n, format!("{n} findings"))
        } else {
            let n: u64 = text
                .lines()
                .filter_map(|l| l.rsplit(':').next()?.trim().parse::<u64>().ok())
                .sum();
            (n, format!("{n} matching lines"))
        };
    }
    (best, summary, count)
}

/// Writes the log unless a file of that size is already there. Returns (lines, fault lines).
fn generate(root: &Path, path: &Path, size: u64) -> (u64, u64) {
    let corpus = fs::read_to_string(root.join("tests/data/corpus/lines.jsonl")).expect("corpus");
    let mut benign = Vec::new();
    let mut faults = Vec::new();
    for line in corpus.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("corpus json");
        let text = v["line"].as_str().unwrap_or_default().to_string();
        match v["fault_class"].as_str() {
            Some("benign") => benign.push(text),
            Some(_) => faults.push(text),
            None => {}
        }
    }
    let mut lines = 0u64;
    let mut fault_lines = 0u64;
    if fs::metadata(path).is_ok_and(|m| m.len() >= size) {
        // Count what is there rather than regenerate 1 GB.
        let data = fs::read(path).expect("read log");
        lines = data.iter().filter(|&&b| b == b'\n').count() as u64;
        return (lines, lines / 20_000);
    }
    let file = fs::File::create(path).expect("create log");
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut written = 0u64;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let kernel = [
        "usb 1-1.2: new high-speed USB device number 5 using xhci_hcd",
        "EXT4-fs (nvme0n1p2): mounted filesystem with ordered data mode. Quota mode: none.",
        "audit: type=1400 audit(1700000000.123:45): apparmor=\"STATUS\" operation=\"profile_load\"",
        "IPv6: ADDRCONF(NETDEV_CHANGE): eno1: link becomes ready",
        "systemd[1]: Started Session 42 of User researcher.",
        "nvme nvme0: 8/0/0 default/read/poll queues",
    ];
    let mut line = String::new();
    while written < size {
        line.clear();
        let r = rand();
        let step = lines % 100_000;
        if lines % 20_000 == 19_999 {
            line.push_str(&faults[(r % faults.len() as u64) as usize]);
            fault_lines += 1;
        } else {
            match r % 10 {
                0..=4 => {
                    let _ = write!(
                        line,
                        "epoch {} step {step}/100000 loss={:.4} lr=3.0e-04 grad_norm={:.3} samples/s={}",
                        lines / 100_000,
                        (r % 10_000) as f64 / 7_000.0,
                        (r % 3_000) as f64 / 1_000.0,
                        800 + r % 400
                    );
                }
                5 => {
                    let pct = step % 100;
                    let _ = write!(
                        line,
                        " {pct:>3}%|{:<20}| {step}/100000 [01:{:02}<02:{:02}, 11.{}it/s]",
                        "#".repeat((pct / 5) as usize),
                        r % 60,
                        (r >> 8) % 60,
                        r % 10
                    );
                }
                6 | 7 => {
                    let _ = write!(
                        line,
                        "[{:>5}.{:06}] {}",
                        lines / 1_000,
                        r % 1_000_000,
                        kernel[(r >> 20) as usize % kernel.len()]
                    );
                }
                _ => line.push_str(&benign[(r >> 4) as usize % benign.len()]),
            }
        }
        line.push('\n');
        out.write_all(line.as_bytes()).expect("write log");
        written += line.len() as u64;
        lines += 1;
    }
    out.flush().expect("flush log");
    (lines, fault_lines)
}

/// `(?P<name>...)` groups as `(?:...)`.
fn without_names(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len());
    let mut rest = pattern;
    while let Some(at) = rest.find("(?P<") {
        out.push_str(&rest[..at]);
        out.push_str("(?:");
        let after = &rest[at + 4..];
        rest = after.find('>').map_or(after, |end| &after[end + 1..]);
    }
    out.push_str(rest);
    out
}

/// A Rust-regex pattern as POSIX ERE for GNU grep, for the patterns the catalog uses.
fn to_ere(pattern: &str) -> String {
    let mut out = String::new();
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    let mut fold = false;
    let mut in_class = false;
    while i < chars.len() {
        let c = chars[i];
        let rest: String = chars[i..chars.len().min(i + 4)].iter().collect();
        if !in_class && rest.starts_with("(?i)") {
            fold = true;
            i += 4;
            continue;
        }
        if !in_class && rest.starts_with("(?:") {
            out.push('(');
            i += 3;
            continue;
        }
        if !in_class && rest.starts_with("(?P<") {
            let close = chars[i..].iter().position(|&c| c == '>').unwrap_or(0);
            out.push('(');
            i += close + 1;
            continue;
        }
        if c == '\\' && i + 1 < chars.len() {
            let e = chars[i + 1];
            match e {
                'd' => out.push_str(if in_class { "0-9" } else { "[0-9]" }),
                'D' => out.push_str("[^0-9]"),
                _ => {
                    out.push('\\');
                    out.push(e);
                }
            }
            i += 2;
            continue;
        }
        if !in_class
            && (c == '?' || c == '+' || c == '*' || c == '}')
            && chars.get(i + 1) == Some(&'?')
        {
            out.push(c);
            i += 2;
            continue;
        }
        match c {
            '[' if !in_class => {
                in_class = true;
                out.push(c);
                if chars.get(i + 1) == Some(&'^') {
                    out.push('^');
                    i += 1;
                }
                if chars.get(i + 1) == Some(&']') {
                    out.push(']');
                    i += 1;
                }
            }
            ']' if in_class => {
                in_class = false;
                out.push(c);
            }
            c if fold && !in_class && c.is_ascii_alphabetic() => {
                let _ = write!(
                    out,
                    "[{}{}]",
                    c.to_ascii_lowercase(),
                    c.to_ascii_uppercase()
                );
            }
            c if fold && in_class && c.is_ascii_alphabetic() => {
                out.push(c.to_ascii_lowercase());
                out.push(c.to_ascii_uppercase());
            }
            c => out.push(c),
        }
        i += 1;
    }
    out
}
