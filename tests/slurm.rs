//! `examples/slurm/train.sbatch` on a real single-node Slurm (Debian's slurm-wlm with munge),
//! started by this test on private ports and torn down after it: SIGUSR1 to the batch shell (what
//! `--signal=B:USR1@90` sends before the time limit) reaches the trainer through srun and
//! gpuwarden, the script requeues the job, and the requeued run resumes from the checkpoint and
//! finishes.
//!
//! Needs root (slurmd launches jobs), `slurmctld`, `slurmd`, `munged`, `sbatch` and a munge key
//! (`apt-get install slurm-wlm munge`; `.ci/run` installs them). Without them the test says why
//! and skips; under CI (`CI=true`) that is a failure.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn skip(why: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(!ci, "the Slurm test cannot run under CI: {why}");
    eprintln!("SKIPPED the Slurm test: {why}");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private Slurm: munged, slurmctld and slurmd in the foreground, killed when dropped.
struct Cluster {
    dir: PathBuf,
    daemons: Vec<Child>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

impl Cluster {
    fn start(dir: &Path) -> Cluster {
        let munge = dir.join("munge");
        for d in ["state", "spool", "munge"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::set_permissions(&munge, std::fs::Permissions::from_mode(0o755)).unwrap();
        // munged running as root wants a key owned by root: a private copy of the system's.
        let key = munge.join("munge.key");
        std::fs::copy("/etc/munge/munge.key", &key).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let host = text(&Command::new("hostname").arg("-s").output().unwrap().stdout)
            .trim()
            .to_string();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let d = dir.display();
        let conf = format!(
            "ClusterName=gwtest\nSlurmctldHost={host}\nSlurmctldPort={}\nSlurmdPort={}\n\
SlurmUser=root\nSlurmdUser=root\nAuthType=auth/munge\nCredType=cred/munge\n\
AuthInfo=socket={d}/munge/munge.socket\nStateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\n\
SlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd.pid\n\
SlurmctldLogFile={d}/slurmctld.log\nSlurmdLogFile={d}/slurmd.log\n\
ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nSelectType=select/cons_tres\n\
SelectTypeParameters=CR_CPU\nSchedulerType=sched/builtin\nMpiDefault=none\n\
JobCompType=jobcomp/none\nAccountingStorageType=accounting_storage/none\nReturnToService=2\n\
KillWait=15\nMinJobAge=600\n\
NodeName={host} CPUs={cpus} RealMemory=1000 State=UNKNOWN\n\
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n",
            free_port(),
            free_port()
        );
        std::fs::write(dir.join("slurm.conf"), conf).unwrap();
        let mut cluster = Cluster {
            dir: dir.to_path_buf(),
            daemons: Vec::new(),
        };
        let spawn = |cmd: &mut Command| {
            cmd.env("SLURM_CONF", dir.join("slurm.conf"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        };
        cluster.daemons.push(spawn(
            Command::new("munged")
                .arg("-F")
                .arg(format!("--socket={}", munge.join("munge.socket").display()))
                .arg(format!("--pid-file={}", munge.join("munged.pid").display()))
                .arg(format!("--log-file={}", munge.join("munged.log").display()))
                .arg(format!("--seed-file={}", munge.join("seed").display()))
                .arg(format!("--key-file={}", key.display())),
        ));
        std::thread::sleep(Duration::from_millis(300));
        cluster
            .daemons
            .push(spawn(Command::new("slurmctld").args(["-D", "-i"])));
        std::thread::sleep(Duration::from_millis(500));
        cluster
            .daemons
            .push(spawn(Command::new("slurmd").arg("-D")));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = cluster.cmd("sinfo", &["-h", "-o", "%T"]);
            if text(&out.stdout).trim() == "idle" {
                return cluster;
            }
            assert!(
                Instant::now() < deadline,
                "the private Slurm did not come up: {}{}\nlogs in {}",
                text(&out.stdout),
                text(&out.stderr),
                cluster.dir.display()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn cmd(&self, program: &str, args: &[&str]) -> Output {
        Command::new(program)
            .args(args)
            .env("SLURM_CONF", self.dir.join("slurm.conf"))
            .output()
            .unwrap()
    }

    /// `scontrol show job` as key=value words.
    fn job_field(&self, job: &str, key: &str) -> String {
        let out = text(&self.cmd("scontrol", &["show", "job", job]).stdout);
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")).map(str::to_string))
            .unwrap_or_default()
    }
}

fn wait_for_or(what: &str, say: &dyn Fn() -> String, limit: Duration, ready: impl FnMut() -> bool) {
    if !wait_until(limit, ready) {
        panic!("timed out waiting for {what}\n{}", say());
    }
}

fn wait_until(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if ready() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    ready()
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn the_example_requeues_on_sigusr1_and_resumes_from_the_checkpoint() {
    // One private cluster on the machine at a time (see `machine_turn`).
    let _turn = machine_turn("slurm");
    let missing: Vec<&str> = ["slurmctld", "slurmd", "munged", "sbatch", "scontrol"]
        .into_iter()
        .filter(|p| {
            Command::new("sh")
                .args(["-c", &format!("command -v {p}")])
                .stdout(Stdio::null())
                .status()
                .map_or(true, |s| !s.success())
        })
        .collect();
    if !missing.is_empty() {
        return skip(&format!(
            "{} not found (apt-get install -y slurm-wlm munge)",
            missing.join(", ")
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { nix::libc::geteuid() } != 0 {
        return skip("slurmd must run as root to launch jobs");
    }
    if !Path::new("/etc/munge/munge.key").exists() {
        return skip("no /etc/munge/munge.key (the munge package creates it)");
    }
    let scene = Scene::new();
    let cluster = Cluster::start(&scene.path("slurm"));

    // The example runs `gpuwarden` and `python train.py` from PATH: the binary under test, and
    // the fake trainer slowed down, noting SIGUSR1.
    let submit = scene.path("submit");
    let bin = submit.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(BIN, bin.join("gpuwarden")).unwrap();
    std::fs::copy(trainer(), submit.join("train.py")).unwrap();
    let record = submit.join("record.jsonl");
    std::fs::write(
        bin.join("python"),
        format!(
            "#!/bin/sh\nexec python3 \"$@\" --sleep 0.3 --steps 40 --note-usr1 --record {}\n",
            record.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(bin.join("python"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/slurm/train.sbatch");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    // This node has no GPU and few CPUs: those two requests of the script are overridden.
    let out = Command::new("sbatch")
        .args(["--parsable", "-c", "1", "--gpus-per-node=0"])
        .arg(&script)
        .current_dir(&submit)
        .env("SLURM_CONF", cluster.dir.join("slurm.conf"))
        .env("PATH", &path)
        .env("SAVE_SECONDS", "3")
        .output()
        .unwrap();
    assert!(out.status.success(), "sbatch: {}", text(&out.stderr));
    let job = text(&out.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_string();

    let starts = || {
        read_jsonl(&record)
            .into_iter()
            .filter(|r| r.get("argv").is_some())
            .count()
    };
    wait_for(
        "the first start of the job",
        Duration::from_secs(60),
        || starts() == 1,
    );
    // What --signal=B:USR1@90 does 90 s before the time limit: SIGUSR1 to the batch shell.
    let pids = text(&cluster.cmd("scontrol", &["listpids", &job]).stdout);
    let shell = pids
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("batch"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<i32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("slurm_script"))
        })
        .expect("the batch shell's pid");
    send(shell, nix::sys::signal::Signal::SIGUSR1);

    wait_for("the requeue", Duration::from_secs(60), || {
        cluster.job_field(&job, "Restarts") == "1"
    });
    // Slurm holds a requeued job for two minutes; this test does not wait that long. The hold
    // is set once the old run has ended (the job is PENDING with Reason=BeginTime).
    let outputs = || {
        let mut all = text(&cluster.cmd("scontrol", &["show", "job", &job]).stdout);
        for entry in std::fs::read_dir(&submit).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("slurm-") {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                all.push_str(&format!("--- {name}\n{text}"));
            }
        }
        all
    };
    let relaunched = std::cell::Cell::new(false);
    wait_for_or(
        "the requeued job to finish",
        &outputs,
        Duration::from_secs(120),
        || {
            let state = cluster.job_field(&job, "JobState");
            // Seen twice in seven runs here: Slurm relaunches the requeued batch script in the
            // very second the old step is cancelled, and the launch fails (exit 1, not one line
            // of the script's output, so before the script or gpuwarden ran). That is this
            // single-node test cluster's trouble, not the example's: requeue it once more.
            if state == "FAILED" && !relaunched.get() && starts() == 1 {
                relaunched.set(true);
                cluster.cmd("scontrol", &["requeue", &job]);
            }
            if state == "PENDING" && cluster.job_field(&job, "Reason") == "BeginTime" {
                cluster.cmd(
                    "scontrol",
                    &["update", &format!("jobid={job}"), "StartTime=now"],
                );
            }
            state == "COMPLETED"
        },
    );
    assert_eq!(cluster.job_field(&job, "ExitCode"), "0:0");

    let records = read_jsonl(&record);
    let usr1 = records.iter().filter(|r| r["signal"] == 10).count();
    assert!(usr1 >= 1, "SIGUSR1 never reached the trainer: {records:?}");
    let argvs: Vec<_> = records.iter().filter(|r| r.get("argv").is_some()).collect();
    assert_eq!(argvs.len(), 2, "{records:?}");
    assert_eq!(arg_after(argvs[0], "--resume"), None);
    let resumed = arg_after(argvs[1], "--resume").expect("the second start resumes");
    assert!(resumed.contains("ckpt-step"), "{resumed}");

    let runs = submit.join("gpuwarden-runs");
    let host = text(&Command::new("hostname").arg("-s").output().unwrap().stdout)
        .trim()
        .to_string();
    let first = read_jsonl(
        &runs
            .join(format!("{job}.0"))
            .join(&host)
            .join("journal.jsonl"),
    );
    // SLURM_RESTART_COUNT names the run directory: 1 after the requeue, more when a relaunch
    // failed and was requeued again (above, or by Slurm itself: seen once in five runs, an
    // in-between run whose gpuwarden was killed before it could finish its journal). The run
    // that completed the job is the last one.
    let last_restart = (1..10)
        .rev()
        .find(|n| runs.join(format!("{job}.{n}")).exists())
        .expect("a run directory after the requeue");
    if relaunched.get() {
        assert!(last_restart >= 2, "the extra requeue left no run directory");
    }
    let second = read_jsonl(
        &runs
            .join(format!("{job}.{last_restart}"))
            .join(&host)
            .join("journal.jsonl"),
    );
    let kinds = events(&first);
    assert!(kinds.contains(&"signal_forwarded".to_string()), "{kinds:?}");
    // The requeue's SIGTERM: gpuwarden forwarded it and ended as documented, if srun let it.
    if let Some(last) = first.last().filter(|r| r["event"] == "run_finished") {
        assert_eq!(last["exit_code"], 143);
    }
    assert_eq!(second.last().unwrap()["exit_code"], 0);
    let attempt = second
        .iter()
        .find(|r| r["event"] == "attempt_started")
        .unwrap();
    assert_eq!(attempt["checkpoint"], resumed);
    for (name, journal) in [("first", &first), ("second", &second)] {
        println!("== {name} run's journal");
        for r in journal {
            println!("{r}");
        }
    }
}
