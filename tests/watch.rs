//! `gpuwarden watch` for real: the binary in a tmux pane over a copy of the simulated RX 6800
//! sysfs tree and a file-backed kernel log, read back with `capture-pane`; and `watch --once
//! --json`, which needs no terminal.
//!
//! The tmux tests need tmux. Without it they say so on stderr and pass, except under `CI=true`,
//! where a test that cannot run is a failure.
#![allow(clippy::unwrap_used)]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_gpuwarden");

/// The RX 6800's PCI device directory in the simulated tree.
const DEVICE_DIR: &str = "devices/pci0000:00/0000:00:03.1/0000:0b:00.0";

/// A copy of `tests/data/sysfs` (links kept) that a test may change.
fn sysfs_copy(to: &Path) -> PathBuf {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            let kind = entry.file_type().unwrap();
            if kind.is_symlink() {
                std::os::unix::fs::symlink(std::fs::read_link(entry.path()).unwrap(), &target)
                    .unwrap();
            } else if kind.is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
    }
    let root = to.join("sys");
    copy(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sysfs"),
        &root,
    );
    root
}

fn set_busy(sysfs: &Path, percent: u32) {
    // Written to a new file and renamed in, so the sampler never reads half a number.
    let dir = sysfs.join(DEVICE_DIR);
    let tmp = dir.join("gpu_busy_percent.new");
    std::fs::write(&tmp, format!("{percent}\n")).unwrap();
    std::fs::rename(&tmp, dir.join("gpu_busy_percent")).unwrap();
}

/// Whether tmux can be used; says so loudly when not, and fails under `CI=true`.
fn tmux_or_skip(test: &str) -> bool {
    let ok = Command::new("tmux")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let message = format!(
            "\n!!! {test}: SKIPPED: tmux is not installed, so the real-terminal test of `gpuwarden watch` did not run\n"
        );
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{message}(CI=true: install tmux)"
        );
        eprintln!("{message}");
    }
    ok
}

/// A private tmux server (its own socket in a scratch directory) with one pane running `sh`.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn start(dir: &Path, width: u16, height: u16) -> Tmux {
        let tmux = Tmux {
            socket: dir.join("tmux.sock"),
        };
        let status = Command::new("tmux")
            .arg("-S")
            .arg(&tmux.socket)
            .args(["-f", "/dev/null", "new-session", "-d", "-s", "t"])
            .args(["-x", &width.to_string(), "-y", &height.to_string()])
            .args(["env", "PS1=PROMPT$ ", "sh"])
            .status()
            .unwrap();
        assert!(status.success());
        tmux.run(&["set-option", "-g", "status", "off"]);
        tmux
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn capture(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "t"])
    }

    fn type_line(&self, line: &str) {
        self.run(&["send-keys", "-t", "t", "-l", line]);
        self.run(&["send-keys", "-t", "t", "Enter"]);
    }

    fn display(&self, format: &str) -> String {
        self.run(&["display-message", "-p", "-t", "t", format])
            .trim()
            .to_string()
    }

    /// Waits until the pane shows what `done` wants; the last capture either way.
    fn wait_for(&self, within: Duration, done: impl Fn(&str) -> bool) -> (bool, String) {
        let end = Instant::now() + within;
        loop {
            let screen = self.capture();
            if done(&screen) {
                return (true, screen);
            }
            if Instant::now() > end {
                return (false, screen);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .stderr(Stdio::null())
            .status();
    }
}

/// Appends one record in `/dev/kmsg` format, in one write as the kernel's own are.
fn append_record(path: &Path, seq: u64, message: &str) {
    let record = format!("3,{seq},{},-;{message}\n", 6_137_826_155 + seq * 1000);
    OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap()
        .write_all(record.as_bytes())
        .unwrap();
}

const RING_TIMEOUT: &str =
    "amdgpu 0000:0b:00.0: amdgpu: ring gfx_0.0.0 timeout, signaled seq=1234, emitted seq=1236";

#[test]
fn watch_in_a_real_terminal_follows_sysfs_and_the_kernel_log_and_quits_cleanly() {
    if !tmux_or_skip("watch_in_a_real_terminal") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sysfs = sysfs_copy(dir.path());
    set_busy(&sysfs, 42);
    // This test's own process holds 3 GiB on the GPU, as KFD tells it (gpu_id 38442 is the
    // RX 6800's KFD node).
    let pid = std::process::id();
    let proc_dir = sysfs.join(format!("class/kfd/kfd/proc/{pid}"));
    std::fs::create_dir_all(&proc_dir).unwrap();
    std::fs::write(proc_dir.join("vram_38442"), "3221225472\n").unwrap();
    let kmsg = dir.path().join("kmsg");
    File::create(&kmsg).unwrap();
    let tmux = Tmux::start(dir.path(), 100, 30);
    assert_eq!(tmux.display("#{pane_width}x#{pane_height}"), "100x30");
    tmux.type_line(&format!(
        "{BIN} watch --sysfs-root {} --kernel-log {}",
        sysfs.display(),
        kmsg.display()
    ));

    let (ok, screen) = tmux.wait_for(Duration::from_secs(10), |s| {
        s.contains("AMD Radeon RX 6800") && s.contains("gfx1030") && s.contains("42%")
    });
    assert!(ok, "the GPU's name, gfx target and utilisation:\n{screen}");
    assert!(screen.contains("49°C"), "the temperature:\n{screen}");
    assert!(screen.contains("kernel log followed"), "{screen}");
    let (ok, screen) = tmux.wait_for(Duration::from_secs(3), |s| {
        s.contains("procs") && s.contains(&format!("{pid} 3.0G"))
    });
    assert!(ok, "the process from KFD with its VRAM:\n{screen}");

    // A new utilisation is on screen within 3 s (1 s samples, 4 redraws a second).
    set_busy(&sysfs, 87);
    let (ok, screen) = tmux.wait_for(Duration::from_secs(3), |s| s.contains("87%"));
    assert!(ok, "the new utilisation within 3 s:\n{screen}");

    // Smaller, down to 80x24: still drawn whole.
    tmux.run(&["resize-window", "-t", "t", "-x", "80", "-y", "24"]);
    // No figure to meet here, only the evidence: generous for a loaded machine.
    let (ok, screen) = tmux.wait_for(Duration::from_secs(10), |s| {
        let lines: Vec<&str> = s.lines().collect();
        lines.first().is_some_and(|l| l.contains("gpuwarden watch"))
            && s.contains("gfx1030")
            && lines.iter().any(|l| l.starts_with('└'))
            && lines.iter().all(|l| l.chars().count() <= 80)
    });
    assert!(ok, "the display at 80x24:\n{screen}");
    assert_eq!(tmux.display("#{pane_width}x#{pane_height}"), "80x24");

    // A fault in the kernel log reaches the feed.
    append_record(&kmsg, 5001, RING_TIMEOUT);
    let (ok, screen) = tmux.wait_for(Duration::from_secs(3), |s| {
        s.contains("gpu_hang") && s.contains("ring gfx_0.0.0")
    });
    assert!(ok, "the kernel fault in the feed:\n{screen}");

    // `q` gives the terminal back: main screen, cursor shown, the prompt on a clean screen.
    tmux.run(&["send-keys", "-t", "t", "q"]);
    let (ok, screen) = tmux.wait_for(Duration::from_secs(3), |s| {
        s.lines().rfind(|l| !l.trim().is_empty()) == Some("PROMPT$")
    });
    assert!(ok, "the shell prompt after q:\n{screen}");
    assert!(
        !screen.contains("GPUs") && !screen.contains('│'),
        "nothing of the display is left:\n{screen}"
    );
    assert_eq!(
        tmux.display("#{alternate_on}"),
        "0",
        "back on the main screen"
    );
    assert_eq!(tmux.display("#{cursor_flag}"), "1", "the cursor is shown");
    // The terminal is out of raw mode: a typed command runs.
    tmux.type_line("echo status=$?");
    let (ok, screen) = tmux.wait_for(Duration::from_secs(3), |s| s.contains("status=0"));
    assert!(
        ok,
        "gpuwarden watch exited 0 and the shell works:\n{screen}"
    );
}

#[test]
fn once_json_reports_utilisation_vram_and_temperature() {
    let dir = tempfile::tempdir().unwrap();
    let sysfs = sysfs_copy(dir.path());
    set_busy(&sysfs, 63);
    let out = Command::new(BIN)
        .args(["watch", "--once", "--json", "--sysfs-root"])
        .arg(&sysfs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let gpu = &v["gpus"][0];
    assert_eq!(gpu["name"], "AMD Radeon RX 6800", "{v}");
    assert_eq!(gpu["arch"], "gfx1030", "{v}");
    assert_eq!(gpu["device"]["pci"], "0000:0b:00.0", "{v}");
    assert_eq!(gpu["utilization_percent"], 63.0, "{v}");
    assert_eq!(gpu["vram_used_bytes"], 17_453_056, "{v}");
    assert_eq!(gpu["vram_total_bytes"], 17_163_091_968u64, "{v}");
    assert_eq!(gpu["temperature_c"], 49.0, "{v}");
    assert_eq!(v["sources"][0], "amd_sysfs", "{v}");
}

#[test]
fn once_prints_a_table() {
    let dir = tempfile::tempdir().unwrap();
    let sysfs = sysfs_copy(dir.path());
    set_busy(&sysfs, 5);
    let out = Command::new(BIN)
        .args(["watch", "--once", "--sysfs-root"])
        .arg(&sysfs)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let row = text.lines().nth(1).unwrap();
    for cell in [
        "0",
        "AMD Radeon RX 6800",
        "gfx1030",
        "5%",
        "17/16368 MiB",
        "49C",
    ] {
        assert!(row.contains(cell), "{cell} in {row:?}\n{text}");
    }
}

#[test]
fn the_live_display_without_a_terminal_says_why_and_exits_2() {
    let out = Command::new(BIN)
        .args(["watch", "--no-kernel-log", "--sysfs-root"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sysfs"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs a terminal") && err.contains("--once"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "no escape codes on a pipe");
}

#[test]
fn demo_ui_tells_the_story_in_the_display_and_logs_every_byte() {
    if !tmux_or_skip("demo_ui") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let tmux = Tmux::start(dir.path(), 100, 30);
    tmux.type_line(&format!(
        "{BIN} demo --ui --step-ms 150 --run-dir {}; echo status=$?",
        run.display()
    ));
    let (ok, screen) = tmux.wait_for(Duration::from_secs(15), |s| {
        s.contains("AMD Radeon RX 6800")
            && s.contains("attempt 1 on gpu")
            && s.contains("[demo] step")
    });
    assert!(ok, "the simulated GPU, the job and its output:\n{screen}");
    let (ok, screen) = tmux.wait_for(Duration::from_secs(20), |s| {
        s.contains("attempt 2 on cpu") && s.contains("gpu_memory_fault")
    });
    assert!(ok, "the fallback and the fault:\n{screen}");
    // At the end the display closes and what gpuwarden said is printed on the main screen.
    let (ok, screen) = tmux.wait_for(Duration::from_secs(20), |s| s.contains("status=0"));
    assert!(ok, "the demo ends well:\n{screen}");
    assert!(
        screen.contains("gpuwarden: the job finished after 2 attempts"),
        "{screen}"
    );
    assert!(!screen.contains('│'), "the display is gone:\n{screen}");
    assert!(
        !screen.contains("[demo] step"),
        "the job's output went to the pane, not raw to the terminal:\n{screen}"
    );
    let log = std::fs::read_to_string(run.join("attempt-1.stdout.log")).unwrap();
    assert!(log.contains("\n[demo] step 1/40  loss"), "{log}");
}

#[test]
fn run_ui_stops_the_job_with_s_after_asking() {
    if !tmux_or_skip("run_ui_stop") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sysfs = sysfs_copy(dir.path());
    let run = dir.path().join("run");
    let tmux = Tmux::start(dir.path(), 100, 30);
    tmux.type_line(&format!(
        "{BIN} run --ui --no-kernel-log --sysfs-root {} --run-dir {} -- sh -c 'echo started; sleep 60'; echo status=$?",
        sysfs.display(),
        run.display()
    ));
    let (ok, screen) = tmux.wait_for(Duration::from_secs(10), |s| {
        s.contains("attempt 1 on gpu") && s.contains("started")
    });
    assert!(ok, "{screen}");
    tmux.run(&["send-keys", "-t", "t", "s"]);
    let (ok, screen) = tmux.wait_for(Duration::from_secs(3), |s| s.contains("Stop the job now?"));
    assert!(ok, "s asks first:\n{screen}");
    tmux.run(&["send-keys", "-t", "t", "n"]);
    let (ok, screen) = tmux.wait_for(Duration::from_secs(3), |s| {
        s.contains("the job keeps running")
    });
    assert!(ok, "n keeps it running:\n{screen}");
    assert!(screen.contains("running"), "{screen}");
    tmux.run(&["send-keys", "-t", "t", "s"]);
    tmux.wait_for(Duration::from_secs(3), |s| s.contains("Stop the job now?"));
    tmux.run(&["send-keys", "-t", "t", "y"]);
    let (ok, screen) = tmux.wait_for(Duration::from_secs(15), |s| s.contains("status="));
    assert!(ok, "the run ends after y:\n{screen}");
    assert!(
        screen.contains("SIGTERM"),
        "stopped as SIGTERM would:\n{screen}"
    );
    let journal = std::fs::read_to_string(run.join("journal.jsonl")).unwrap();
    assert!(journal.contains("SIGTERM"), "{journal}");
}

#[test]
fn run_ui_forces_a_fallback_with_f_after_asking() {
    if !tmux_or_skip("run_ui_fallback") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sysfs = sysfs_copy(dir.path());
    let run = dir.path().join("run");
    let tmux = Tmux::start(dir.path(), 100, 30);
    tmux.type_line(&format!(
        "{BIN} run --ui --no-kernel-log --sysfs-root {} --run-dir {} -- sh -c 'echo on-$GPUWARDEN_TIER; sleep 60'; echo status=$?",
        sysfs.display(),
        run.display()
    ));
    let (ok, screen) = tmux.wait_for(Duration::from_secs(10), |s| s.contains("on-gpu"));
    assert!(ok, "{screen}");
    tmux.run(&["send-keys", "-t", "t", "f"]);
    let (ok, screen) = tmux.wait_for(Duration::from_secs(3), |s| s.contains("go one tier down?"));
    assert!(ok, "f asks first:\n{screen}");
    tmux.run(&["send-keys", "-t", "t", "n"]);
    let (ok, screen) = tmux.wait_for(Duration::from_secs(3), |s| {
        s.contains("keeps running on its tier")
    });
    assert!(ok, "n keeps it running:\n{screen}");
    tmux.run(&["send-keys", "-t", "t", "f"]);
    tmux.wait_for(Duration::from_secs(3), |s| s.contains("go one tier down?"));
    tmux.run(&["send-keys", "-t", "t", "y"]);
    // The attempt is stopped and the next one starts on the CPU tier after the 1 s backoff.
    let (ok, screen) = tmux.wait_for(Duration::from_secs(15), |s| s.contains("on-cpu"));
    assert!(ok, "attempt 2 runs on the CPU tier:\n{screen}");
    tmux.run(&["send-keys", "-t", "t", "s"]);
    tmux.wait_for(Duration::from_secs(3), |s| s.contains("Stop the job now?"));
    tmux.run(&["send-keys", "-t", "t", "y"]);
    let (ok, screen) = tmux.wait_for(Duration::from_secs(15), |s| s.contains("status="));
    assert!(ok, "the run ends after s, y:\n{screen}");
    assert!(screen.contains("fallback forced by the user"), "{screen}");
    let journal = std::fs::read_to_string(run.join("journal.jsonl")).unwrap();
    assert!(
        journal.contains(r#""event":"fallback_forced","attempt":1,"from":"gpu","to":"cpu""#),
        "{journal}"
    );
    assert!(
        journal.contains(r#""ended_by":"stopped to fall back (forced by the user)""#),
        "{journal}"
    );
    assert!(
        journal.contains(r#""reason":"fallback forced by the user""#),
        "{journal}"
    );
}

#[test]
fn run_ui_without_a_terminal_says_why_and_runs_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["run", "--ui", "--no-kernel-log", "--no-health", "--run-dir"])
        .arg(dir.path().join("run"))
        .args(["--", "sh", "-c", "echo plain output"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--ui: the live display needs a terminal"),
        "{err}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "plain output\n");
}

#[test]
fn watch_killed_with_sigterm_gives_the_terminal_back() {
    if !tmux_or_skip("watch_sigterm") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sysfs = sysfs_copy(dir.path());
    let tmux = Tmux::start(dir.path(), 100, 30);
    tmux.type_line(&format!(
        "{BIN} watch --no-kernel-log --sysfs-root {}",
        sysfs.display()
    ));
    let (ok, screen) = tmux.wait_for(Duration::from_secs(10), |s| s.contains("gfx1030"));
    assert!(ok, "{screen}");
    let shell = tmux.display("#{pane_pid}");
    let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children")).unwrap();
    let watch = children.split_whitespace().next().unwrap().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &watch])
        .status()
        .unwrap();
    assert!(status.success());
    // The shell's prompt is back on the last line (a loaded machine has been seen to draw it
    // twice on that line: `PROMPT$ PROMPT$`).
    let (ok, screen) = tmux.wait_for(Duration::from_secs(3), |s| {
        s.lines()
            .rfind(|l| !l.trim().is_empty())
            .is_some_and(|l| l.starts_with("PROMPT$") && l.trim_end().ends_with("PROMPT$"))
    });
    assert!(ok, "the prompt after SIGTERM:\n{screen}");
    assert_eq!(tmux.display("#{alternate_on}"), "0");
    assert_eq!(tmux.display("#{cursor_flag}"), "1");
}

#[test]
fn a_run_keeps_its_gpu_health_in_health_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let sysfs = sysfs_copy(dir.path());
    set_busy(&sysfs, 42);
    let run = dir.path().join("run");
    let out = Command::new(BIN)
        .args([
            "run",
            "--no-kernel-log",
            "--health-interval",
            "0.2",
            "--sysfs-root",
        ])
        .arg(&sysfs)
        .arg("--run-dir")
        .arg(&run)
        .args(["--", "sleep", "2.5"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(run.join("health.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["name"], "AMD Radeon RX 6800", "{text}");
    assert_eq!(first["utilization_percent"], 42.0, "{text}");
    assert_eq!(first["temperature_c"], 49.0, "{text}");
    assert_eq!(first["vram_used_bytes"], 17_453_056, "{text}");
    assert!(first["at"].is_string(), "{text}");
    // Nothing changed and 10 s did not pass: one line.
    assert_eq!(text.lines().count(), 1, "{text}");
}
