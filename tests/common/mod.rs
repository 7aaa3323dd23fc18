//! Helpers shared by the integration tests: run the real `gpuwarden` binary over the fake
//! trainer in `tests/fixtures/trainer.py`, and read what it left in the run directory.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_gpuwarden");

pub fn trainer() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trainer.py")
}

pub fn shared_checkpoints() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/checkpoints")
}

/// A scratch directory with `ckpt/`, `run/` and a record file for the trainer.
pub struct Scene {
    pub dir: tempfile::TempDir,
}

impl Scene {
    /// A config file for quick rescues: restarts 50 ms apart (at most 0.2 s), and no climbing
    /// back up the ladder, since a test of one fall and its rescue would see a climb as an
    /// extra attempt (tests/overnight.rs tests the climb); `extra` is appended. Returns its path.
    pub fn fast_config(&self, extra: &str) -> String {
        let path = self.path("fast.toml");
        std::fs::write(
            &path,
            format!("backoff = {{ initial = 0.05, max = 0.2 }}\nclimb_back = \"off\"\n{extra}"),
        )
        .unwrap();
        path.to_string_lossy().into_owned()
    }

    pub fn new() -> Scene {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("ckpt")).unwrap();
        Scene { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn ckpt(&self) -> PathBuf {
        self.path("ckpt")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.path("run")
    }

    /// `gpuwarden run --run-dir RUN --checkpoints CKPT <extra> -- python3 trainer.py <job>`,
    /// with the trainer recording each start.
    pub fn command(&self, extra: &[&str], job: &[&str]) -> Command {
        self.command_with(Path::new(BIN), &trainer(), extra, job)
    }

    /// Like [`Scene::command`], with the binary and the trainer copied into the scene first, so
    /// that another user can run them when the checkout lies where only root may enter (a clone
    /// under `/root`). The scene directory must be opened to that user by the caller.
    pub fn command_for_another_user(&self, extra: &[&str], job: &[&str]) -> Command {
        use std::os::unix::fs::PermissionsExt;
        let bin = self.path("gpuwarden");
        let script = self.path("trainer.py");
        std::fs::copy(BIN, &bin).unwrap();
        std::fs::copy(trainer(), &script).unwrap();
        for (file, mode) in [(&bin, 0o755), (&script, 0o644)] {
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        self.command_with(&bin, &script, extra, job)
    }

    fn command_with(&self, bin: &Path, trainer: &Path, extra: &[&str], job: &[&str]) -> Command {
        let mut cmd = Command::new(bin);
        cmd.current_dir(self.dir.path())
            .arg("run")
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--checkpoints")
            .arg(self.ckpt())
            .args(extra)
            .arg("--")
            .arg("python3")
            .arg(trainer)
            .arg("--record")
            .arg(self.path("record.jsonl"))
            .arg("--ckpt-dir")
            .arg(self.ckpt())
            .args(job)
            .stdin(Stdio::null())
            // Learned tiers stay in the scene: one test's faults never move another's start.
            .env("XDG_STATE_HOME", self.path("state"));
        cmd
    }

    pub fn run(&self, extra: &[&str], job: &[&str]) -> Output {
        self.command(extra, job).output().unwrap()
    }

    /// The trainer's start records (one per attempt), without its signal notes.
    pub fn starts(&self) -> Vec<serde_json::Value> {
        self.records()
            .into_iter()
            .filter(|r| r.get("argv").is_some())
            .collect()
    }

    pub fn records(&self) -> Vec<serde_json::Value> {
        read_jsonl(&self.path("record.jsonl"))
    }

    /// The journal without `checkpoint_saved` records, whose number and place depend on when
    /// the periodic checkpoint scan looked (see [`events`]); [`Scene::full_journal`] has them.
    pub fn journal(&self) -> Vec<serde_json::Value> {
        self.full_journal()
            .into_iter()
            .filter(|r| r["event"] != "checkpoint_saved")
            .collect()
    }

    pub fn full_journal(&self) -> Vec<serde_json::Value> {
        read_jsonl(&self.run_dir().join("journal.jsonl"))
    }
}

pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// The journal's events in order, without `checkpoint_saved`: how many of those a run gets
/// depends on when the periodic checkpoint scan happens to look (tests/overnight.rs checks them).
pub fn events(journal: &[serde_json::Value]) -> Vec<String> {
    journal
        .iter()
        .map(|r| r["event"].as_str().unwrap().to_string())
        .filter(|e| e != "checkpoint_saved")
        .collect()
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The value after `flag` in a recorded argv.
pub fn arg_after<'a>(start: &'a serde_json::Value, flag: &str) -> Option<&'a str> {
    let argv = start["argv"].as_array().unwrap();
    argv.iter()
        .position(|a| a == flag)
        .and_then(|i| argv.get(i + 1))
        .map(|v| v.as_str().unwrap())
}

/// True when `pid` is gone or a zombie (dead but not yet reaped by its new parent).
pub fn dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .map(|rest| rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
    }
}

/// Sends `sig` to process `pid` (gpuwarden, in these tests).
pub fn send(pid: impl TryInto<i32>, sig: nix::sys::signal::Signal) {
    let pid = pid.try_into().ok().expect("a pid fits in i32");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}

/// Says why a test cannot check anything here, loudly (on stderr, which the harness shows with
/// the test's name). Under CI (`CI=true`), where every test must run, a skip is a failure.
pub fn skip(test: &str, why: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(!ci, "{test} cannot run under CI: {why}");
    eprintln!("SKIPPED {test}: {why}");
}

/// A gpuwarden started in the background of a test, its stdout and stderr in the scene's files
/// (`gpuwarden.stdout`, `gpuwarden.stderr`). Killed if the test ends first.
pub struct Running {
    pub child: Option<std::process::Child>,
    stderr: PathBuf,
    patience: std::time::Duration,
}

impl Running {
    /// Starts `cmd` without the GPU variables `unset` (a test's machine must not leak into it).
    pub fn start(
        mut cmd: std::process::Command,
        scene: &Scene,
        unset: &[&str],
        patience: std::time::Duration,
    ) -> Running {
        let stderr = scene.path("gpuwarden.stderr");
        for var in unset {
            cmd.env_remove(var);
        }
        let child = cmd
            .stdout(std::fs::File::create(scene.path("gpuwarden.stdout")).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Running {
            child: Some(child),
            stderr,
            patience,
        }
    }

    /// Waits for gpuwarden to end (at most its patience); returns its status and stderr.
    pub fn finish(mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let deadline = std::time::Instant::now() + self.patience;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "gpuwarden did not finish within {:?}; stderr:\n{}",
                    self.patience,
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        (status, std::fs::read_to_string(&self.stderr).unwrap())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The suite itself may be started with SIGINT ignored (a script's `cargo test &` leaves it so),
/// and every gpuwarden it starts would inherit that and rightly warn about it: one `warning` more
/// in each journal than a test started from a terminal sees. Each test binary that includes this
/// module takes the default disposition back before `main` (an `.init_array` entry: the test
/// harness owns `main`), so its children start as a terminal's would; the test of the inherited
/// case ignores the signal itself, in its child only.
#[used]
#[unsafe(link_section = ".init_array")]
static CHILDREN_GET_DEFAULT_SIGINT: extern "C" fn() = {
    extern "C" fn reset() {
        // SAFETY: SIG_DFL installs no handler code, and no other thread exists yet.
        unsafe { nix::libc::signal(nix::libc::SIGINT, nix::libc::SIG_DFL) };
    }
    reset
};

/// Polls `ready` every 20 ms until it gives a value; fails the test after `patience`, saying
/// what did not happen.
pub fn wait_for<T>(
    what: &str,
    patience: std::time::Duration,
    mut ready: impl FnMut() -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + patience;
    loop {
        if let Some(value) = ready() {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not happen"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A turn at something the whole machine shares, named `what`: tests in other test processes
/// (a second checkout's suite, CI beside a developer) wait for it too. It is an exclusive
/// `flock` on a file in the temp directory, which serialises threads (each takes its own open
/// file description) and processes alike, and ends when the holder drops it, or dies.
///
/// - `kmsg`: every record a test writes to the real `/dev/kmsg` is read by every other
///   gpuwarden on the machine as a foreign fault; two floods at once count each other's.
/// - `slurm`: two private single-node clusters on one machine number their jobs alike (job 1)
///   and share the node's cgroup paths, so one's step clean-up can end the other's job.
pub struct Turn {
    _file: std::fs::File,
}

pub fn machine_turn(what: &str) -> Turn {
    let path = std::env::temp_dir().join(format!("gpuwarden-tests-{what}.lock"));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .or_else(|_| std::fs::File::open(&path))
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this function owns; it blocks until the turn is ours. (Not
    // `File::lock`: the crate's minimum Rust version predates it.)
    let locked = unsafe { nix::libc::flock(file.as_raw_fd(), nix::libc::LOCK_EX) };
    assert_eq!(
        locked,
        0,
        "cannot lock {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    Turn { _file: file }
}
