//! gpuwarden supervises GPU training jobs: it runs the training command, watches its output
//! for GPU faults, and when one appears stops the job and restarts it from the last complete
//! checkpoint, one step down a fallback ladder (all GPUs, the GPUs that did not fault, safer settings, CPU).
//!
//! # Theory of operation
//!
//! ```text
//!  sources (threads, one Handle each)   core (pure)                   effects (executor)
//!  ──────────────────────────────────   ───────────                   ──────────────────
//!  job stdout/stderr ─ rules ─────┐
//!  kernel log ─ rules ─ whose? ───┤
//!  GPU health (sysfs, tools) ─────┼─ Event ──> Supervisor::step ─ Effect ──> spawn attempt
//!  job exit (waiter)              │            (no I/O, time             ├──> signal group/cgroup
//!  signals to gpuwarden ──────────┘             passed in)               ├──> journal.jsonl (fsync)
//!                                                                        ├──> Board (snapshot)
//!                                                                        └──> messages, summary
//!  readers of the Board: the live display (ui), metrics, health.jsonl; the notifier reads the
//!  journal's records.
//! ```
//!
//! - [`sources`] turn the outside world into events; they never decide anything. Each runs
//!   behind a [`sources::handle::Handle`].
//! - [`rules`] (data in `rules/*.toml`) classify a line into a [`rules::Fault`].
//! - [`supervisor`] is a state machine: restart budget, backoff, grace, the ladder, stalls and
//!   crash loops; [`supervisor::outside`] decides, purely, whether a kernel or health fault
//!   concerns the job ([`supervisor::outside::whose`]) from facts [`attribution`] gathers.
//! - [`executor`] carries out effects and runs the one event loop; [`snapshot`] is what it
//!   publishes for views ([`ui`], [`metrics`]); [`journal`] is the record of the run, read back by
//!   [`report`] and `gpuwarden resume`.
//! - [`learned`] remembers, per job and machine, which tiers faulted or finished, so the next run
//!   starts where it will work.
//! - [`checkpoints`] finds the newest *complete* checkpoint; [`ladder`] turns a tier and a
//!   checkpoint into a concrete argv and environment; [`config`] builds the validated plan;
//!   [`probe`] decides the starting tier before the run ([`verdict`]) from [`quirks`].
//! - [`devices`] says which GPUs an attempt sees and by what ordinal, which of them a fault
//!   names, and how to hide the ones the supervisor excludes.
//! - [`process`] holds every signal, process-group and helper-process call, and the guard that
//!   kills the job when gpuwarden itself is killed; [`cgroup`] the per-attempt cgroup; [`procfs`]
//!   reads `/proc`. [`job`] is the job's vocabulary (signals, exits), a leaf every module may use.

pub mod attribution;
pub mod cgroup;
pub mod checkpoints;
pub mod config;
pub mod demo;
pub mod devices;
pub mod executor;
pub mod exit;
pub mod gpu;
pub mod incident;
pub mod job;
pub mod journal;
pub mod ladder;
pub mod learned;
pub mod metrics;
pub mod notify;
pub mod probe;
pub mod process;
pub mod procfs;
pub mod quirks;
pub mod report;
pub mod rules;
pub mod scan;
pub mod snapshot;
pub mod sources;
pub mod summary;
pub mod supervisor;
pub mod time;
#[cfg(feature = "torch")]
pub mod torch;
pub mod ui;
pub mod verdict;
pub mod voice;
