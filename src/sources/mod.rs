//! Sources turn the outside world into events for the supervisor. Each owns its thread and its
//! I/O and decides nothing. All have one shape: a thread behind a [`handle::Handle`] that
//! stops it, events wrapped into the consumer's type by a function it hands in, and a no-op
//! variant ([`handle::Handle::noop`]) for a source that is switched off and for tests.

pub mod checkpoint_files;
pub mod handle;
pub mod health;
pub mod kernel;
pub mod kmsg;
pub mod output;
