//! File events in the checkpoint location (inotify through the `notify` crate): a hint that a
//! checkpoint may just have been completed, so the executor looks at once instead of at its
//! next rescan (every 2 s).
//!
//! A hint is only a hint. FACTS.md: an atomic save ends with `Name(To)` on the final name, a
//! plain `torch.save` in place with `Close(Write)` (its `Create` comes while the file is still
//! incomplete), and the files of a directory renamed into place are never reported, only the
//! rename. So the events that can end a save are hints, and the executor confirms each by
//! discovering and validating the newest checkpoint as the rescan does. The rescan stays: where
//! inotify is unavailable (out of watches, a network file system that reports nothing) it is
//! all there is, and it catches whatever events were missed.
//!
//! At most one hint waits in the executor's queue at a time: a job writing many files in a burst
//! causes one look, not one per event, and never fills the queue.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};

use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};

use crate::checkpoints::Spec;

/// A running watch; dropping it ends it.
pub struct CheckpointWatch {
    dir: PathBuf,
    _watcher: RecommendedWatcher,
    queued: Arc<AtomicBool>,
}

impl fmt::Debug for CheckpointWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointWatch")
            .field("dir", &self.dir)
            .finish()
    }
}

impl CheckpointWatch {
    /// The directory watched.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Called when the hint has been taken from the queue: the next event may queue another.
    pub fn taken(&self) {
        self.queued.store(false, Ordering::Release);
    }
}

/// Starts watching the directory `spec` designates, one level: the names in it. A save that
/// ends at that level (a file renamed or closed, `tmp-checkpoint-N/` renamed to `checkpoint-N/`,
/// DeepSpeed's `latest`) is seen at once; one that ends deeper (DCP's `.metadata` written last
/// inside its directory) is seen by the rescan. Not recursive on purpose: adding a watch for
/// every directory under a location that holds a dataset would take the loop's time and the
/// user's inotify watches. `Ok(None)` when that directory does not exist yet (the job makes it
/// at its first save): the caller asks again later. An error means inotify is not usable here.
pub fn watch<E: Send + 'static>(
    spec: &Spec,
    tx: SyncSender<E>,
    hint: impl Fn() -> E + Send + 'static,
) -> notify::Result<Option<CheckpointWatch>> {
    let dir = watched_dir(spec);
    if !dir.is_dir() {
        return Ok(None);
    }
    let queued = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&queued);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        // An error (the kernel's queue overflowed) may have hidden a save: look anyway.
        if event.as_ref().is_ok_and(|e| !may_end_a_save(e)) {
            return;
        }
        if flag.swap(true, Ordering::AcqRel) {
            return;
        }
        // Never block inotify's thread on a full queue: the rescan finds what this would have.
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send(hint()) {
            flag.store(false, Ordering::Release);
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(Some(CheckpointWatch {
        dir,
        _watcher: watcher,
        queued,
    }))
}

/// The events after which a checkpoint can be complete: a name appearing (a rename into place,
/// a directory made or moved in) or a file closed after writing, unless the name is one writers
/// use while a save is in flight (`*.tmp`, `tmp-checkpoint-N`): the look it caused would come
/// too early and find nothing.
fn may_end_a_save(event: &Event) -> bool {
    let ends = matches!(
        event.kind,
        EventKind::Create(_)
            | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
    );
    // For a rename, the last path is the new name.
    let temp = event
        .paths
        .last()
        .and_then(|p| p.file_name())
        .is_some_and(|n| crate::checkpoints::is_temp_name(&n.to_string_lossy()));
    ends && !temp
}

/// The directory to watch: the spec's directory, the directory of a single checkpoint file, or
/// the part of a glob before its first wildcard.
fn watched_dir(spec: &Spec) -> PathBuf {
    match spec {
        Spec::Path(path) if path.is_dir() => path.clone(),
        Spec::Path(path) => parent_or_dot(path),
        Spec::Glob(pattern) => {
            let mut dir = PathBuf::new();
            for part in Path::new(pattern).components() {
                if let Component::Normal(name) = part
                    && name.to_string_lossy().contains(['*', '?', '['])
                {
                    break;
                }
                dir.push(part);
            }
            if dir.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                dir
            }
        }
    }
}

fn parent_or_dot(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    #[test]
    fn a_glob_is_watched_from_its_literal_part() {
        let spec = Spec::Glob("/data/run/ckpt-*/model.pt".into());
        assert_eq!(watched_dir(&spec), PathBuf::from("/data/run"));
        assert_eq!(watched_dir(&Spec::Glob("*.pt".into())), PathBuf::from("."));
        let file = Spec::Path("/nowhere/last.ckpt".into());
        assert_eq!(watched_dir(&file), PathBuf::from("/nowhere"));
    }

    #[test]
    fn a_rename_into_place_is_one_hint_until_taken() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = mpsc::sync_channel(8);
        let Ok(Some(w)) = watch(&Spec::Path(dir.path().into()), tx, || ()) else {
            eprintln!("skipped: inotify is not usable here");
            return;
        };
        let tmp = dir.path().join("a.pt.tmp");
        std::fs::write(&tmp, b"x").unwrap();
        // The temporary name's events are no hint.
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        let written = Instant::now();
        std::fs::rename(&tmp, dir.path().join("a.pt")).unwrap();
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        eprintln!("rename -> hint {:?}", written.elapsed());
        // More events before the hint is taken queue nothing more.
        std::fs::write(dir.path().join("b.pt"), b"y").unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        w.taken();
        std::fs::write(dir.path().join("c.pt"), b"z").unwrap();
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
    }
}
