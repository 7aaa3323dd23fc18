//! Starting an attempt: the newest complete checkpoint, the tier's argv and environment, the
//! logs, the process group, its output pumps and its waiter.

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use super::{Executor, Input, RunError, lock};
use crate::attribution;
use crate::cgroup::Cgroup;
use crate::checkpoints;
use crate::devices;
use crate::job::Sig;
use crate::journal::Record;
use crate::ladder::{self, Placeholders};
use crate::process::{self, GroupEvent, JobSpec};
use crate::rules::Stream;
use crate::sources::output;
use crate::supervisor::Event;
use crate::voice::say;

/// How often a waiter looks whether the attempt's cgroup is empty once its process group is.
const CGROUP_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Incomplete checkpoints reported one by one in a run; the rest are counted.
const SKIPS_SHOWN: usize = 5;

/// Incomplete checkpoints remembered as reported (so later attempts do not repeat them).
const MAX_SKIPS_REMEMBERED: usize = 100_000;

impl Executor<'_> {
    /// Starts an attempt; returns the answer to `Spawn`. Streams whose reader could not be
    /// started are reported closed through `closed`.
    pub(super) fn spawn(
        &mut self,
        attempt: u32,
        tier_index: usize,
        exclude: &[usize],
        closed: &mut Vec<Event>,
    ) -> Result<Event, RunError> {
        let plan = self.plan;
        let Some(tier) = plan.ladder.get(tier_index) else {
            return Ok(Event::SpawnFailed {
                attempt,
                error: format!("no tier #{tier_index} on the ladder"),
            });
        };
        let checkpoint = match self.find_checkpoint(attempt)? {
            Ok(c) => c,
            Err(error) => return Ok(Event::SpawnFailed { attempt, error }),
        };
        // The GPUs the attempt sees: the tier's selection (or the user's), less the excluded.
        let tier_env = devices::read_env(|name| {
            if tier.unset_env.iter().any(|n| n == name) {
                return None;
            }
            tier.set_env
                .get(name)
                .map(OsString::from)
                .or_else(|| std::env::var_os(name))
        });
        let (sight, narrowed) = if !tier.uses_gpu {
            (devices::Sight::default(), Vec::new())
        } else {
            let before = devices::sight(&self.gpus, &tier_env);
            if exclude.is_empty() {
                (before, Vec::new())
            } else {
                let vars = devices::narrowed(&self.gpus, &before, exclude, &tier_env);
                let mut env = tier_env.clone();
                env.extend(vars.iter().cloned());
                (devices::sight(&self.gpus, &env), vars)
            }
        };
        let gpus = sight.list();
        if tier.uses_gpu && sight.gpus.is_empty() && !self.gpus_unknown_warned {
            let names_gpus = |arg: &[u8]| {
                arg.windows(7).any(|w| w == b"{nproc}") || arg.windows(6).any(|w| w == b"{gpus}")
            };
            use std::os::unix::ffi::OsStrExt;
            if plan.command.iter().any(|a| names_gpus(a.as_bytes()))
                || tier.args.iter().any(|a| names_gpus(a.as_bytes()))
            {
                self.gpus_unknown_warned = true;
                self.warn(format!(
                    "tier `{}` uses a GPU, but gpuwarden found no GPU it can see (`gpuwarden probe` says what it looked at): {{nproc}} is 1 and {{gpus}} is empty",
                    tier.name
                ))?;
            }
        }
        let placeholders = Placeholders {
            device: &tier.device,
            checkpoint: checkpoint.as_deref(),
            tier: &tier.name,
            attempt,
            run_dir: &self.run_dir,
            gpus: &gpus,
            nproc: sight.nproc(),
        };
        let mut launch = ladder::launch(
            &plan.command,
            tier,
            &placeholders,
            std::env::var_os("PYTHONUNBUFFERED").is_some(),
        );
        for (name, value) in &narrowed {
            launch.set_var(name, value);
        }
        let stdout_log = self.run_dir.join(format!("attempt-{attempt}.stdout.log"));
        let stderr_log = self.run_dir.join(format!("attempt-{attempt}.stderr.log"));
        // `create_new`: a log is never overwritten, whatever is in the run directory.
        let open = |path: &PathBuf| {
            File::options()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|source| RunError::Log {
                    path: path.clone(),
                    source,
                })
        };
        let (out_log, err_log) = (open(&stdout_log)?, open(&stderr_log)?);
        // A cgroup of its own where one can be made: every process the attempt starts stays
        // the attempt's, whatever group or session it moves to.
        let cgroup = self
            .run_cgroup
            .as_ref()
            .and_then(|run| run.attempt(attempt).ok());
        let joining = cgroup.as_ref().and_then(|c| c.procs_for_joining().ok());
        let spec = JobSpec {
            argv: &launch.argv,
            set_env: &launch.set_env,
            unset_env: &launch.unset_env,
            cgroup: joining.as_ref(),
        };
        // What the GPUs hold before the attempt: after a fault of it, its memory is released
        // when they are back to this (where per-process data is missing).
        self.memory_before(attempt, &sight.gpus);
        let mut child = match process::spawn_job(&spec) {
            Ok(child) => child,
            Err(e) => {
                let program = launch.argv.first().cloned().unwrap_or_default();
                return Ok(Event::SpawnFailed {
                    attempt,
                    error: format!("{}: {e}", program.to_string_lossy()),
                });
            }
        };
        let pid = child.id();
        // The job leads its own group, so the group id is its pid.
        self.groups.insert(attempt, pid);
        self.memory_leader(attempt, pid);
        let usable = sight
            .gpus
            .iter()
            .filter_map(|g| g.pci.as_deref().and_then(attribution::pci_slot))
            .collect();
        lock(&self.view).attempt_started(attempt, pid, usable);
        self.refreshed = Instant::now();
        if let Some(cg) = &cgroup {
            self.cgroups.insert(attempt, cg.clone());
        }
        if let Some(guard) = &mut self.guard
            && let Err(e) = guard.watch(pid).and_then(|()| {
                cgroup
                    .as_ref()
                    .map_or(Ok(()), |c| guard.watch_cgroup(c.path()))
            })
        {
            self.guard = None;
            self.warn(format!(
                "the guard process is gone ({e}): if gpuwarden is killed, the job may survive it"
            ))?;
        }
        // As plain files: one type for both pipes, readable and pollable.
        let pumps = [
            (
                child.stdout.take().map(|p| File::from(OwnedFd::from(p))),
                Stream::Stdout,
                out_log,
            ),
            (
                child.stderr.take().map(|p| File::from(OwnedFd::from(p))),
                Stream::Stderr,
                err_log,
            ),
        ];
        for (pipe, stream, log) in pumps {
            let started = pipe.map(|pipe| {
                output::spawn(
                    pipe,
                    stream,
                    log,
                    Arc::clone(&self.rules),
                    self.plan.progress.clone(),
                    self.tx.clone(),
                    move |event| Input::Output {
                        attempt,
                        stream,
                        event,
                    },
                )
            });
            match started {
                Some(Ok(pump)) => self.pumps.entry(attempt).or_default().push(pump),
                _ => {
                    // Without a reader the supervisor would wait for this stream forever.
                    // Queued directly: the loop must never block sending into its own channel.
                    closed.push(Event::StreamClosed { attempt, stream });
                }
            }
        }
        // The std handle is not waited on: `wait_group` reaps the leader and its orphans.
        drop(child);
        let tx = self.tx.clone();
        let waiter = thread::Builder::new()
            .name(format!("wait-{attempt}"))
            .spawn(move || {
                let send = |event| {
                    let _ = tx.send(Input::Group { attempt, event });
                };
                let populated = || cgroup.as_ref().is_some_and(Cgroup::populated);
                process::wait_group(pid, |event| match event {
                    // Workers that left the group (`setsid`) are still the attempt's.
                    GroupEvent::LeaderExited {
                        status,
                        group_alive,
                    } => send(GroupEvent::LeaderExited {
                        status,
                        group_alive: group_alive || populated(),
                    }),
                    // Said once the cgroup is empty too.
                    GroupEvent::Empty => {}
                    other => send(other),
                });
                while populated() {
                    thread::sleep(CGROUP_POLL);
                }
                send(GroupEvent::Empty);
            });
        if let Err(e) = waiter {
            // Without a waiter the exit would never be seen: stop this attempt now.
            let _ = process::signal_group(pid, Sig::Kill);
            return Ok(Event::SpawnFailed {
                attempt,
                error: format!("cannot start a thread to wait for the job: {e}"),
            });
        }
        let excluded = match exclude.is_empty() {
            true => String::new(),
            false => format!(
                ", GPU(s) {} (GPU(s) {} excluded)",
                if gpus.is_empty() { "none" } else { &gpus },
                exclude
                    .iter()
                    .filter_map(|&key| self.gpus.get(key))
                    .map(|g| g.index.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        };
        say(&format!(
            "attempt {attempt} on tier `{}` (device {}{excluded}){}",
            tier.name,
            tier.device,
            match &checkpoint {
                Some(c) => format!(", resuming from {}", crate::voice::shown_path(c)),
                None => String::new(),
            }
        ));
        self.journal(&Record::AttemptStarted {
            attempt,
            tier: tier.name.clone(),
            device: tier.device.clone(),
            gpus: sight.gpus.clone(),
            checkpoint: checkpoint.clone(),
            argv: launch.argv.clone(),
            pid,
            stdout_log,
            stderr_log,
        })?;
        // The rescan reports checkpoints newer than the one resumed from.
        self.checkpoints_seen.newest = checkpoint.clone().map(|c| (c, None));
        let seen = sight.gpus.clone();
        self.sights.insert(attempt, sight);
        Ok(Event::Spawned {
            attempt,
            checkpoint,
            gpus: seen,
        })
    }

    /// The newest complete checkpoint, journaling the incomplete ones it skipped. The inner
    /// error says why the checkpoints could not be looked at; the attempt is then not started,
    /// since starting from scratch could overwrite the progress that is there.
    fn find_checkpoint(
        &mut self,
        attempt: u32,
    ) -> Result<Result<Option<PathBuf>, String>, RunError> {
        let Some(spec) = &self.plan.checkpoints else {
            return Ok(Ok(None));
        };
        // Relative specs are relative to gpuwarden's (and so the job's) working directory.
        let found = checkpoints::Spec::new(spec, Some(&self.run_dir), Path::new(""))
            .and_then(|s| s.discover());
        match found {
            Ok(found) => {
                // Each incomplete checkpoint is reported once per run, and only the first few
                // one by one: a directory of 10,000 torn files is a count, not 10,000 lines in
                // every attempt.
                let new: Vec<_> = found
                    .skipped
                    .into_iter()
                    .filter(|s| !self.skips_reported.contains(&s.path))
                    .collect();
                let mut unlisted = 0;
                for skipped in new {
                    let listed_before = self.skips_reported.len();
                    if listed_before < MAX_SKIPS_REMEMBERED {
                        self.skips_reported.insert(skipped.path.clone());
                    }
                    if listed_before >= SKIPS_SHOWN {
                        unlisted += 1;
                        continue;
                    }
                    say(&format!(
                        "skipping checkpoint {}: {}",
                        crate::voice::shown_path(&skipped.path),
                        skipped.reason
                    ));
                    self.journal(&Record::CheckpointSkipped {
                        attempt,
                        path: skipped.path,
                        reason: skipped.reason,
                    })?;
                }
                if unlisted > 0 {
                    self.warn(format!(
                        "attempt {attempt}: {unlisted} more incomplete checkpoints were skipped (not listed one by one)"
                    ))?;
                }
                Ok(Ok(found.newest.map(|c| c.path)))
            }
            Err(e) => Ok(Err(format!(
                "cannot look for checkpoints in `{spec}`: {e:#}; not starting from scratch over them"
            ))),
        }
    }
}

impl Executor<'_> {
    /// The GPUs of this machine at the PCI addresses a resumed run had excluded.
    pub(super) fn still_excluded(&self, excluded: &[(String, u32)]) -> Vec<crate::gpu::JobGpu> {
        let slot = |text: &str| crate::attribution::pci_slot(text);
        let mut out = Vec::new();
        for (pci, ordinal) in excluded {
            let found = self.gpus.iter().enumerate().find(|(_, g)| {
                g.pci.as_deref().and_then(slot).is_some()
                    && g.pci.as_deref().and_then(slot) == slot(pci)
            });
            if let Some((key, g)) = found
                && !out.iter().any(|x: &crate::gpu::JobGpu| x.key == key)
            {
                out.push(crate::gpu::JobGpu {
                    key,
                    vendor: g.vendor,
                    index: g.index,
                    ordinal: *ordinal,
                    pci: g.pci.clone(),
                });
            }
        }
        out
    }

    /// Notes which of `attempt`'s GPUs `fault` names (`crate::devices::named`).
    pub(super) fn pin(&self, attempt: u32, fault: &mut crate::rules::Fault) {
        if let Some(sight) = self.sights.get(&attempt) {
            fault.gpus = crate::devices::named(fault, &self.gpus, sight);
        }
    }
}

/// How much of the end of an attempt's logs is searched for the EIO of a terminal read.
const TERMINAL_EIO_TAIL: u64 = 64 * 1024;

impl Executor<'_> {
    /// Where the job cannot read its terminal (`process::terminal_reads_fail`): an attempt whose
    /// leader failed with an EIO (`Input/output error`, Python's `[Errno 5]`) near the end of
    /// its output failed for that, and the supervisor is told so. Elsewhere nothing is read.
    pub(super) fn terminal_read_failed(&self, input: &Input) -> Option<Event> {
        let Input::Group {
            attempt,
            event: GroupEvent::LeaderExited { status, .. },
        } = input
        else {
            return None;
        };
        if !self.terminal_reads_fail || status.success() {
            return None;
        }
        let said = ["stderr", "stdout"].iter().any(|stream| {
            let path = self.run_dir.join(format!("attempt-{attempt}.{stream}.log"));
            tail(&path, TERMINAL_EIO_TAIL).is_some_and(|text| {
                text.contains("Input/output error") || text.contains("[Errno 5]")
            })
        });
        said.then_some(Event::TerminalReadFailed { attempt: *attempt })
    }
}

/// The last `bytes` of a file, as text (lossy).
fn tail(path: &Path, bytes: u64) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(bytes))).ok()?;
    let mut buf = Vec::new();
    file.take(bytes).read_to_end(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}
