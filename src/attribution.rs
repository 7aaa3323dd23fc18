//! Attribution: does a process named by a kernel line belong to the job?
//!
//! A kernel fault line names a pid (`NVRM: Xid (...): 31, pid=447`, amdgpu's `Process python3
//! pid 2113 thread python3 pid 2120`). The fault is the job's only if that pid is in the job's
//! process tree: the process groups of its attempts (each attempt's leader is its own group),
//! and every descendant of a member, including workers that moved to a group or session of
//! their own. gpuwarden itself and its other children (tool calls such as `rocm-smi`) are not
//! the job.
//!
//! The faulting process is often gone by the time the kernel line is read (the fault killed
//! it), so [`JobTree::refresh`] scans `/proc` (cheap enough to call every second) and remembers
//! every member it sees, with its start time so that a reused pid is not mistaken for it. A
//! dead pid that was seen is answered from memory; one that never was is
//! [`Membership::Unknown`], and what to do with that is the supervisor's decision, not this
//! module's.
//!
//! Pids are those of the pid namespace gpuwarden runs in; the kernel logs pids of the initial
//! namespace, so inside a container with its own pid namespace they do not match, and answers
//! are `Foreign` or `Unknown`.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::PathBuf;

pub use crate::procfs::{ProcStat, StatError, parse_stat, processes};
use crate::procfs::{read_stat, snapshot};
use crate::rules::Fault;
use crate::supervisor::outside::{Facts, Membership, PidFacts, Slot};

/// Ancestors followed at most when walking up from a pid (real trees are a few deep; the bound
/// also ends a loop in a corrupt or racing snapshot).
const MAX_DEPTH: usize = 64;

/// Dead members remembered at most; past it the ones not seen for longest are forgotten. A job
/// that forks short-lived processes all night must not grow gpuwarden without bound.
const MAX_REMEMBERED: usize = 65_536;

/// A member seen alive.
#[derive(Debug, Clone)]
struct Seen {
    start_time: u64,
    /// The job group (an attempt's process group) it belonged to.
    group: u32,
    /// When it was last seen, in refresh counts, for forgetting the oldest.
    refresh: u64,
}

/// The job's process tree, as far as `/proc` shows it and memory keeps it.
#[derive(Debug)]
pub struct JobTree {
    own_pid: u32,
    groups: HashSet<u32>,
    seen: HashMap<u32, Seen>,
    refreshes: u64,
    proc_root: PathBuf,
}

impl JobTree {
    /// A tree with no groups yet; `own_pid` is gpuwarden's pid (`std::process::id()`).
    pub fn new(own_pid: u32) -> Self {
        Self::with_proc_root(own_pid, PathBuf::from("/proc"))
    }

    fn with_proc_root(own_pid: u32, proc_root: PathBuf) -> Self {
        JobTree {
            own_pid,
            groups: HashSet::new(),
            seen: HashMap::new(),
            refreshes: 0,
            proc_root,
        }
    }

    /// Adds an attempt's process group (its leader's pid). Groups stay: a late kernel line
    /// about an earlier attempt is still the job's.
    pub fn add_group(&mut self, pgid: u32) {
        self.groups.insert(pgid);
    }

    /// Forgets an attempt's process group once it is empty: its number may then be reused by
    /// an unrelated group. The members seen in it stay remembered, so late kernel lines about
    /// them still count as the job's.
    pub fn remove_group(&mut self, pgid: u32) {
        self.groups.remove(&pgid);
    }

    /// The job's process groups.
    pub fn groups(&self) -> impl Iterator<Item = u32> + '_ {
        self.groups.iter().copied()
    }

    /// Scans `/proc` and remembers every live member. Returns how many are alive. It reads
    /// one stat line per process, about 40 µs each (5 ms for 130 processes on a small VM):
    /// fine to call every second while an attempt runs.
    pub fn refresh(&mut self) -> io::Result<usize> {
        let procs = snapshot(&self.proc_root)?;
        let members = members(&procs, &self.groups, self.own_pid);
        self.refreshes += 1;
        for &pid in &members {
            if let (Some(stat), Some(group)) =
                (procs.get(&pid), group_in(&procs, &self.groups, pid))
            {
                self.remember(pid, stat.start_time, group);
            }
        }
        if self.seen.len() > MAX_REMEMBERED {
            let mut by_age: Vec<(u64, u32)> =
                self.seen.iter().map(|(&pid, s)| (s.refresh, pid)).collect();
            by_age.sort_unstable();
            let excess = self.seen.len() - MAX_REMEMBERED;
            for &(_, pid) in &by_age[..excess] {
                self.seen.remove(&pid);
            }
        }
        Ok(members.len())
    }

    /// Whether `pid` is the job's. A live pid is checked against `/proc` now (and remembered
    /// when it is a member); a dead one is answered from what [`JobTree::refresh`] saw.
    pub fn membership(&mut self, pid: u32) -> Membership {
        if pid == self.own_pid {
            return Membership::Foreign;
        }
        let Some(stat) = self.read_stat(pid) else {
            return if self.seen.contains_key(&pid) {
                Membership::Job
            } else {
                Membership::Unknown
            };
        };
        if let Some(group) = self.live_group(&stat) {
            self.remember(pid, stat.start_time, group);
            return Membership::Job;
        }
        // Alive but no longer linked to the job (its parent died and it was reparented, and it
        // had left the group): a member all the same if it is the very process seen before.
        match self.seen.get(&pid) {
            Some(seen) if seen.start_time == stat.start_time => Membership::Job,
            _ => Membership::Foreign,
        }
    }

    fn remember(&mut self, pid: u32, start_time: u64, group: u32) {
        self.seen.insert(
            pid,
            Seen {
                start_time,
                group,
                refresh: self.refreshes,
            },
        );
    }

    /// The members seen in job group `group` (alive or not since).
    pub fn members_of(&self, group: u32) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .seen
            .iter()
            .filter(|(_, s)| s.group == group)
            .map(|(&pid, _)| pid)
            .collect();
        pids.sort_unstable();
        pids
    }

    /// The job group (an attempt's process group id) a member was seen in, even after the group
    /// ended: a kernel line about a process of an earlier attempt is not about the running one.
    pub fn group_of(&self, pid: u32) -> Option<u32> {
        self.seen.get(&pid).map(|seen| seen.group)
    }

    /// The job group of a live process: its own group if that is a job group, else the group
    /// of its nearest ancestor that is a member (live or remembered); `None` if it is not one.
    fn live_group(&self, stat: &ProcStat) -> Option<u32> {
        if self.groups.contains(&stat.pgid) {
            return Some(stat.pgid);
        }
        let mut parent = stat.ppid;
        for _ in 0..MAX_DEPTH {
            if parent <= 1 || parent == self.own_pid {
                return None;
            }
            let up = self.read_stat(parent)?;
            if self.groups.contains(&up.pgid) {
                return Some(up.pgid);
            }
            if let Some(seen) = self.seen.get(&up.pid)
                && seen.start_time == up.start_time
            {
                return Some(seen.group);
            }
            parent = up.ppid;
        }
        None
    }
    fn read_stat(&self, pid: u32) -> Option<ProcStat> {
        read_stat(&self.proc_root, pid)
    }
}

/// The members among `procs`: those in a job group, and their descendants. gpuwarden
/// (`own_pid`) and what hangs only from it or from init are not members.
/// The job group a member of a snapshot belongs to: the first job group met walking up from it.
fn group_in(procs: &HashMap<u32, ProcStat>, groups: &HashSet<u32>, pid: u32) -> Option<u32> {
    let mut at = pid;
    for _ in 0..=MAX_DEPTH {
        let stat = procs.get(&at)?;
        if groups.contains(&stat.pgid) {
            return Some(stat.pgid);
        }
        at = stat.ppid;
    }
    None
}

pub fn members(
    procs: &HashMap<u32, ProcStat>,
    groups: &HashSet<u32>,
    own_pid: u32,
) -> HashSet<u32> {
    let mut known: HashMap<u32, bool> = HashMap::new();
    for &pid in procs.keys() {
        // Walk up until an answer, then give it to the whole path walked.
        let mut path = Vec::new();
        let mut at = pid;
        let answer = loop {
            if let Some(&k) = known.get(&at) {
                break k;
            }
            if at == own_pid || path.len() > MAX_DEPTH {
                break false;
            }
            let Some(stat) = procs.get(&at) else {
                break false;
            };
            if groups.contains(&stat.pgid) {
                path.push(at);
                break true;
            }
            path.push(at);
            if stat.ppid <= 1 {
                break false;
            }
            at = stat.ppid;
        };
        for p in path {
            known.insert(p, answer);
        }
    }
    known
        .into_iter()
        .filter(|&(pid, member)| member && pid != own_pid)
        .map(|(pid, _)| pid)
        .collect()
}

/// The slot (domain, bus, device) of a PCI address in any spelling (`crate::gpu::PciAddress`).
pub fn pci_slot(text: &str) -> Option<(u32, u8, u8)> {
    crate::gpu::PciAddress::parse(text).map(crate::gpu::PciAddress::slot)
}

/// What gpuwarden knows of the job's processes and GPUs, for answering "whose fault is it".
///
/// Shared (behind a mutex) between the executor, which keeps it current as attempts start and
/// end, and the kernel reader thread, which must gather a record's facts and have it judged
/// before its bounded queue can drop anything (a neighbour's flood must not push out the job's
/// own fault). It only gathers; `crate::supervisor::outside` decides.
#[derive(Debug)]
pub struct JobView {
    tree: JobTree,
    /// The attempt of every process group the job has had, ended ones included.
    attempt_of_group: HashMap<u32, u32>,
    /// The PCI slots of the GPUs each attempt can use (none on a CPU tier).
    usable: HashMap<u32, Vec<Slot>>,
    /// The attempt that is running or being stopped.
    live: Option<u32>,
}

impl JobView {
    /// A view with no attempt yet; `own_pid` is gpuwarden's pid.
    pub fn new(own_pid: u32) -> JobView {
        JobView {
            tree: JobTree::new(own_pid),
            attempt_of_group: HashMap::new(),
            usable: HashMap::new(),
            live: None,
        }
    }

    /// An attempt started as the process group `pgid`, able to use the GPUs `usable`.
    pub fn attempt_started(&mut self, attempt: u32, pgid: u32, usable: Vec<Slot>) {
        self.attempt_of_group.insert(pgid, attempt);
        self.usable.insert(attempt, usable);
        self.tree.add_group(pgid);
        let _ = self.tree.refresh();
    }

    /// The process group of an attempt is empty: its number may be reused by someone else.
    /// The processes seen in the attempt group `pgid` (`JobTree::members_of`).
    pub fn members_of(&self, pgid: u32) -> Vec<u32> {
        self.tree.members_of(pgid)
    }

    pub fn group_ended(&mut self, pgid: u32) {
        self.tree.remove_group(pgid);
    }

    /// The supervisor's live attempt changed (or not).
    pub fn set_live(&mut self, live: Option<u32>) {
        self.live = live;
    }

    pub fn live(&self) -> Option<u32> {
        self.live
    }

    /// Re-reads the job's processes from `/proc` (a process that faults and dies between two
    /// reads is attributed from memory only if a read saw it).
    pub fn refresh(&mut self) {
        let _ = self.tree.refresh();
    }

    /// The PCI slots of the GPUs the live attempt can use.
    pub fn usable_now(&self) -> Vec<Slot> {
        self.live
            .and_then(|a| self.usable.get(&a))
            .cloned()
            .unwrap_or_default()
    }

    /// The facts about what `fault` names, as of now. `health` marks a GPU health fault.
    pub fn facts(&mut self, fault: &Fault, health: bool) -> Facts {
        let pid = fault
            .captures
            .get("pid")
            .and_then(|p| p.trim().parse::<u32>().ok())
            .map(|pid| PidFacts {
                pid,
                membership: self.tree.membership(pid),
                attempt: self
                    .tree
                    .group_of(pid)
                    .and_then(|group| self.attempt_of_group.get(&group).copied()),
            });
        Facts {
            live: self.live,
            pid,
            usable: self.usable_now(),
            health,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::path::Path;
    use std::process::{Child, Command};
    use std::time::{Duration, Instant};

    fn stat_line(pid: u32, comm: &str, ppid: u32, pgid: u32, start: u64) -> String {
        // Fields 3..=22 of proc(5), the ones not read set to plausible values.
        format!(
            "{pid} ({comm}) S {ppid} {pgid} {pgid} 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 {start} 1000 100 18446744073709551615\n"
        )
    }

    fn stat(pid: u32, ppid: u32, pgid: u32) -> ProcStat {
        parse_stat(stat_line(pid, "p", ppid, pgid, 100 + u64::from(pid)).as_bytes()).unwrap()
    }

    #[test]
    fn parses_a_command_name_with_spaces_and_parentheses() {
        let s = parse_stat(stat_line(4242, "a) b (c)) S 9", 17, 4200, 777).as_bytes()).unwrap();
        assert_eq!(
            s,
            ProcStat {
                pid: 4242,
                comm: "a) b (c)) S 9".into(),
                state: 'S',
                ppid: 17,
                pgid: 4200,
                start_time: 777
            }
        );
    }

    #[test]
    fn parses_this_process_from_proc() {
        let me = std::process::id();
        let s = read_stat(Path::new("/proc"), me).unwrap();
        assert_eq!(s.pid, me);
        assert_eq!(s.ppid, nix::unistd::getppid().as_raw() as u32);
        assert_eq!(s.pgid, nix::unistd::getpgrp().as_raw() as u32);
    }

    #[test]
    fn rejects_lines_that_are_not_stat() {
        assert!(parse_stat(b"").is_err());
        assert!(parse_stat(b"12 (x S 1 2").is_err());
        assert!(parse_stat(b"12 (x) S 1 2 3").is_err(), "too few fields");
        assert!(parse_stat(stat_line(1, "x", 0, 1, 5).replace(" S ", " SS ").as_bytes()).is_err());
        let e = parse_stat(b"zz (x) S 1 2").unwrap_err();
        assert!(e.to_string().starts_with("malformed /proc stat line (pid)"));
    }

    #[test]
    fn members_are_the_groups_and_their_descendants_only() {
        let own = 100;
        let procs: HashMap<u32, ProcStat> = [
            stat(1, 0, 1),
            stat(own, 1, own),
            stat(200, own, 200), // attempt leader (its own group)
            stat(201, 200, 200), // worker in the group
            stat(202, 201, 202), // worker that called setsid: left the group, still the job's
            stat(203, 202, 202), // its child
            stat(300, own, own), // gpuwarden's rocm-smi call: not the job
            stat(400, 1, 400),   // someone else's process
            stat(401, 400, 400),
            stat(500, 1, 200), // reparented to init but still in the job's group
        ]
        .into_iter()
        .map(|s| (s.pid, s))
        .collect();
        let groups = HashSet::from([200]);
        let mut got: Vec<u32> = members(&procs, &groups, own).into_iter().collect();
        got.sort();
        assert_eq!(got, vec![200, 201, 202, 203, 500]);
    }

    #[test]
    fn members_survive_a_parent_loop() {
        // A snapshot taken while pids are recycled can show a loop; the walk must end.
        let procs: HashMap<u32, ProcStat> = [stat(10, 11, 10), stat(11, 10, 11)]
            .into_iter()
            .map(|s| (s.pid, s))
            .collect();
        assert!(members(&procs, &HashSet::from([99]), 1).is_empty());
    }

    /// A fake `/proc` with the given stat lines.
    fn fake_proc(lines: &[(u32, String)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (pid, line) in lines {
            write_stat(dir.path(), *pid, line);
        }
        std::fs::create_dir(dir.path().join("self")).unwrap();
        dir
    }

    fn write_stat(root: &Path, pid: u32, line: &str) {
        let d = root.join(pid.to_string());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("stat"), line).unwrap();
    }

    #[test]
    fn dead_members_are_remembered_and_reused_pids_are_not_confused() {
        let own = 100;
        let root = fake_proc(&[
            (own, stat_line(own, "gpuwarden", 1, own, 10)),
            (200, stat_line(200, "python3", own, 200, 20)),
            (250, stat_line(250, "pt_data_worker", 200, 250, 25)),
        ]);
        let mut tree = JobTree::with_proc_root(own, root.path().to_path_buf());
        tree.add_group(200);
        assert_eq!(tree.refresh().unwrap(), 2);

        // The worker faults and dies, then the leader: both answered from memory.
        std::fs::remove_dir_all(root.path().join("250")).unwrap();
        std::fs::remove_dir_all(root.path().join("200")).unwrap();
        assert_eq!(tree.membership(250), Membership::Job);
        assert_eq!(tree.membership(200), Membership::Job);
        // A pid nobody saw.
        assert_eq!(tree.membership(777), Membership::Unknown);
        // Pid 250 comes back as someone else's process (another start time): not the job.
        write_stat(root.path(), 250, &stat_line(250, "sshd", 1, 250, 99));
        assert_eq!(tree.membership(250), Membership::Foreign);
        // gpuwarden is never the job.
        assert_eq!(tree.membership(own), Membership::Foreign);

        // The attempt's group is empty and removed; an unrelated process that later gets the
        // leader's number as its group is not the job, while the dead leader still is.
        tree.remove_group(200);
        write_stat(root.path(), 300, &stat_line(300, "cron", 1, 200, 300));
        assert_eq!(tree.membership(300), Membership::Foreign);
        assert_eq!(tree.membership(200), Membership::Job);
        assert_eq!(tree.groups().count(), 0);
    }

    #[test]
    fn an_orphan_that_left_the_group_stays_the_jobs() {
        let own = 100;
        let root = fake_proc(&[
            (own, stat_line(own, "gpuwarden", 1, own, 10)),
            (200, stat_line(200, "torchrun", own, 200, 20)),
            (260, stat_line(260, "worker", 200, 260, 26)),
        ]);
        let mut tree = JobTree::with_proc_root(own, root.path().to_path_buf());
        tree.add_group(200);
        tree.refresh().unwrap();
        // torchrun dies; the worker (own session) is reparented to gpuwarden, the subreaper.
        std::fs::remove_dir_all(root.path().join("200")).unwrap();
        write_stat(root.path(), 260, &stat_line(260, "worker", own, 260, 26));
        assert_eq!(tree.membership(260), Membership::Job);
        // A child it starts now is the job's through it.
        write_stat(root.path(), 270, &stat_line(270, "worker2", 260, 260, 27));
        assert_eq!(tree.membership(270), Membership::Job);
        tree.refresh().unwrap();
        std::fs::remove_dir_all(root.path().join("270")).unwrap();
        assert_eq!(tree.membership(270), Membership::Job);
        // Remembered with the job group it was in, even once the group is gone.
        let group = tree.group_of(270);
        assert!(group.is_some());
        tree.remove_group(group.unwrap());
        assert_eq!(tree.group_of(270), group);
    }

    #[test]
    fn memory_is_bounded() {
        let own = 100;
        let root = fake_proc(&[(own, stat_line(own, "gpuwarden", 1, own, 10))]);
        let mut tree = JobTree::with_proc_root(own, root.path().to_path_buf());
        tree.add_group(200);
        for pid in 0..(MAX_REMEMBERED as u32 + 10) {
            tree.seen.insert(
                1000 + pid,
                Seen {
                    start_time: 1,
                    group: 200,
                    refresh: u64::from(pid),
                },
            );
        }
        tree.refresh().unwrap();
        assert_eq!(tree.seen.len(), MAX_REMEMBERED);
        // The oldest went first.
        assert!(!tree.seen.contains_key(&1000));
        assert!(tree.seen.contains_key(&(1000 + MAX_REMEMBERED as u32 + 9)));
    }

    /// Kills the child on drop, so a failing test leaves no process behind.
    struct Reaped(Child);

    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn children_of(pid: u32) -> Vec<ProcStat> {
        snapshot(Path::new("/proc"))
            .unwrap()
            .into_values()
            .filter(|s| s.ppid == pid)
            .collect()
    }

    fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !ready() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{what} did not happen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn real_processes_of_the_job_are_members_others_are_not() {
        let own = std::process::id();
        // The job: a shell leading its own group, one worker in the group and one that moved
        // to a session of its own.
        let job = Reaped(
            Command::new("sh")
                .args(["-c", "sleep 30 & setsid sleep 30 & wait"])
                .process_group(0)
                .spawn()
                .unwrap(),
        );
        let leader = job.0.id();
        // Not the job: another child of "gpuwarden" (this test process), like a tool call.
        let tool = Reaped(Command::new("sleep").arg("30").spawn().unwrap());

        let mut workers = Vec::new();
        wait_for("both workers start sleeping", || {
            workers = children_of(leader);
            workers.len() == 2 && workers.iter().all(|w| w.comm == "sleep")
        });
        let in_group = workers.iter().find(|w| w.pgid == leader).unwrap().pid;
        let own_session = workers.iter().find(|w| w.pgid != leader).unwrap().pid;

        let mut tree = JobTree::new(own);
        tree.add_group(leader);
        let t0 = Instant::now();
        assert_eq!(tree.refresh().unwrap(), 3);
        let took = t0.elapsed();
        assert!(took < Duration::from_millis(500), "a refresh took {took:?}");
        for pid in [leader, in_group, own_session] {
            assert_eq!(tree.membership(pid), Membership::Job, "pid {pid}");
        }
        assert_eq!(tree.membership(tool.0.id()), Membership::Foreign);
        assert_eq!(tree.membership(own), Membership::Foreign);
        assert_eq!(tree.membership(1), Membership::Foreign);

        // The whole job dies (as after a fatal fault): still the job's, from memory.
        nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(leader as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(own_session as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        drop(job);
        wait_for("the workers are gone or zombies", || {
            [in_group, own_session]
                .iter()
                .all(|&p| read_stat(Path::new("/proc"), p).is_none_or(|s| s.state == 'Z'))
        });
        for pid in [leader, in_group, own_session] {
            assert_eq!(tree.membership(pid), Membership::Job, "dead pid {pid}");
        }
        // A process that lived and died between two refreshes, outside the job: unknown.
        let mut brief = Command::new("true").spawn().unwrap();
        let brief_pid = brief.id();
        brief.wait().unwrap();
        assert_eq!(tree.membership(brief_pid), Membership::Unknown);
    }
}
