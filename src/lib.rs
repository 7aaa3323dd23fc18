//! gpuwarden supervises GPU training jobs: it runs the training command, watches its output
//! for GPU faults, and when one appears stops the job and restarts it from the last complete
//! checkpoint, one step down a fallback ladder (all GPUs, the GPUs that did not fault, safer settings, CPU).
//!
//! # Theory of operation
//!
//! ```text
//!  sources (threads)                  core (pure)                   effects (app.rs)
//!  ─────────────────                  ───────────                   ────────────────
//!  job stdout/stderr ─ rules ─┐
//!  job exit (waiter)         ─┼─ Event ──> Supervisor::step ─ Effect ──> spawn attempt
//!  signals to gpuwarden      ─┘            (no I/O, time            ├──> signal job's group
//!                                           passed in)              ├──> journal.jsonl (fsync)
//!                                                                   └──> messages, summary
//! ```
//!
//! - [`sources`] turn the outside world into events; they never decide anything.
//! - [`rules`] (data in `rules/*.toml`) classify a line into a [`rules::Fault`].
//! - [`supervisor`] is a state machine: restart budget, backoff, grace, the ladder.
//! - [`app`] is the executor: it carries out effects and runs the one event loop.
//! - [`checkpoints`] finds the newest *complete* checkpoint; [`ladder`] turns a tier and a
//!   checkpoint into a concrete argv and environment; [`config`] builds the validated plan.
//! - [`devices`] says which GPUs an attempt sees and by what ordinal, which of them a fault
//!   names, and how to hide the ones the supervisor excludes.
//! - [`process`] holds every signal and process-group call, and the guard that kills the job
//!   when gpuwarden itself is killed.

pub mod attribution;
pub mod cgroup;
pub mod checkpoints;
pub mod config;
pub mod demo;
pub mod devices;
pub mod executor;
pub mod exit;
pub mod gpu;
pub mod job;
pub mod journal;
pub mod ladder;
pub mod metrics;
pub mod notify;
pub mod probe;
pub mod process;
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
pub mod voice;
