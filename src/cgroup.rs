//! A cgroup (v2) per attempt: every process the job starts is the job's, whatever process group
//! or session it moves to (`setsid` daemons, `os.setpgrp()` workers, `set -m` shells).
//!
//! A process group is a convenience, not a boundary: a worker that calls `setsid` leaves it and
//! would outlive the attempt, still holding the GPU when the next attempt starts. A cgroup is a
//! boundary the job cannot leave without privileges: the attempt's leader joins its cgroup
//! between fork and exec, every descendant is born in it, `cgroup.events` tells when the last
//! one is gone, and `cgroup.kill` (Linux 5.14) kills them all at once.
//!
//! gpuwarden makes `gpuwarden-<pid>/attempt-<n>` under its own cgroup of the unified hierarchy
//! (`/sys/fs/cgroup` on a pure v2 system, `/sys/fs/cgroup/unified` on a hybrid one). Where none
//! is mounted or writable (an unprivileged user without a delegated subtree, a container), it
//! says so once and the attempt's process group, the subreaper and the `/proc` walk of
//! `crate::attribution` are all there is.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Where the unified hierarchy may be mounted, in order.
const MOUNTS: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];

/// The run's cgroup, parent of one cgroup per attempt.
#[derive(Debug)]
pub struct RunCgroup {
    path: PathBuf,
}

/// One attempt's cgroup.
#[derive(Debug, Clone)]
pub struct Cgroup {
    path: PathBuf,
}

/// The unified hierarchy's mount point: the first of [`MOUNTS`] that is a cgroup v2 root.
fn unified_mount() -> Option<PathBuf> {
    MOUNTS
        .iter()
        .map(PathBuf::from)
        .find(|m| m.join("cgroup.controllers").is_file())
}

/// This process's cgroup in the unified hierarchy, from `/proc/self/cgroup` (`0::/path`).
fn own_cgroup() -> Option<String> {
    fs::read_to_string("/proc/self/cgroup")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
}

impl RunCgroup {
    /// Makes `gpuwarden-<pid>` under gpuwarden's own cgroup. The error says why not (no unified
    /// hierarchy, no permission).
    pub fn create() -> io::Result<RunCgroup> {
        let mount = unified_mount().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "no cgroup v2 hierarchy is mounted")
        })?;
        let own = own_cgroup().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "this process is in no cgroup v2 (/proc/self/cgroup has no 0:: line)",
            )
        })?;
        let path = mount
            .join(own.trim_start_matches('/'))
            .join(format!("gpuwarden-{}", std::process::id()));
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        Ok(RunCgroup { path })
    }

    /// Makes the cgroup of `attempt`.
    pub fn attempt(&self, attempt: u32) -> io::Result<Cgroup> {
        let path = self.path.join(format!("attempt-{attempt}"));
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        Ok(Cgroup { path })
    }

    /// Removes the attempts' cgroups that are empty, then the run's (best effort: a cgroup that
    /// still holds a process that survived SIGKILL stays, and says so in `leftovers`).
    pub fn remove(&self) {
        if let Ok(entries) = fs::read_dir(&self.path) {
            for entry in entries.flatten() {
                if entry.path().is_dir() {
                    let _ = fs::remove_dir(entry.path());
                }
            }
        }
        let _ = fs::remove_dir(&self.path);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Cgroup {
    /// A cgroup at `path` (for the guard, which is told paths).
    pub fn at(path: PathBuf) -> Cgroup {
        Cgroup { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `cgroup.procs`, opened for the job to write `0` into between fork and exec: a process
    /// that writes its pid 0 there moves itself.
    pub fn procs_for_joining(&self) -> io::Result<File> {
        OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.procs"))
    }

    /// The processes in it now.
    pub fn pids(&self) -> Vec<u32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Whether any process is left in it (`cgroup.events`: `populated 1`). A cgroup that
    /// cannot be read counts as empty: it can tell nothing.
    pub fn populated(&self) -> bool {
        fs::read_to_string(self.path.join("cgroup.events")).is_ok_and(|text| {
            text.lines()
                .any(|l| l.split_whitespace().eq(["populated", "1"]))
        })
    }

    /// Sends `signal` (a number) to every process in it.
    pub fn signal(&self, signal: i32) {
        let Ok(sig) = nix::sys::signal::Signal::try_from(signal) else {
            return;
        };
        for pid in self.pids() {
            let Ok(pid) = i32::try_from(pid) else {
                continue;
            };
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }

    /// Kills every process in it at once (`cgroup.kill`), or one by one with SIGKILL on kernels
    /// before 5.14.
    pub fn kill(&self) {
        let killed = OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.kill"))
            .and_then(|mut f| f.write_all(b"1"));
        if killed.is_err() {
            self.signal(nix::libc::SIGKILL);
        }
    }

    /// Removes it once empty.
    pub fn remove(&self) -> io::Result<()> {
        fs::remove_dir(&self.path)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::{Duration, Instant};

    #[test]
    fn a_process_that_leaves_its_session_stays_in_the_cgroup_and_dies_with_it() {
        let run = match RunCgroup::create() {
            Ok(run) => run,
            Err(e) => {
                let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
                assert!(!ci, "no writable cgroup v2 under CI: {e}");
                eprintln!("SKIPPED cgroup test: {e}");
                return;
            }
        };
        let cg = run.attempt(1).unwrap();
        let procs = cg.procs_for_joining().unwrap();
        let mut cmd = Command::new("sh");
        // A daemon in a session of its own, and the shell exits at once.
        // Its output goes to /dev/null, or `output()` would wait for it to close our pipe.
        cmd.args(["-c", "setsid sleep 300 >/dev/null 2>&1 & echo $!"]);
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = procs.as_raw_fd();
        // SAFETY: write(2) is async-signal-safe; nothing is allocated.
        unsafe {
            cmd.pre_exec(move || {
                nix::libc::write(fd, b"0".as_ptr().cast(), 1);
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        let daemon: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let until = Instant::now() + Duration::from_secs(2);
        while !cg.pids().contains(&daemon) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(cg.populated(), "the daemon left the cgroup");
        assert!(cg.pids().contains(&daemon));
        cg.kill();
        let until = Instant::now() + Duration::from_secs(2);
        while cg.populated() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!cg.populated());
        // Reparented to init (or a subreaper) and killed: reap it if it is ours.
        cg.remove().unwrap();
        run.remove();
        assert!(!run.path().exists());
    }
}
