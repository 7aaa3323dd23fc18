//! Sources turn the outside world into events for the supervisor. Each owns its thread and its
//! I/O and decides nothing.

pub mod health;
pub mod kernel;
pub mod kmsg;
pub mod output;
