//! Watching the plugin directory: file events that can change a plugin file are debounced
//! and then trigger a reload of the changed plugin files.

use std::sync::{Arc, Weak};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::error::PluginError;
use crate::host::Inner;

/// Starts watching `inner`'s plugin directory. The watcher lives in `inner`; the
/// reload task ends when `inner` is dropped.
pub(crate) fn start(inner: &Arc<Inner>) -> Result<(), PluginError> {
    let dir = inner.directory().to_path_buf();
    let watch_error = |e: notify::Error| PluginError::Watch {
        path: dir.clone(),
        message: e.to_string(),
    };
    // Capacity 1: a pending message already means "rescan"; more would be redundant.
    let (tx, rx) = mpsc::channel::<()>(1);
    // The file names to react to, captured by value: the callback must not hold (or
    // upgrade) the host, or the host could end up dropped on the watcher's own thread.
    let names = inner.file_names();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match &event {
            Ok(event) if !may_change_content(&event.kind) => false,
            Ok(event) => {
                event.paths.is_empty()
                    || event.paths.iter().any(|p| {
                        p.file_name().is_none_or(|n| {
                            names.contains(n) || n.to_string_lossy().ends_with(".wasm")
                        })
                    })
            }
            // On watcher errors rescan, to be safe.
            Err(_) => true,
        };
        if relevant {
            let _ = tx.try_send(());
        }
    })
    .map_err(watch_error)?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(watch_error)?;
    *inner.watcher.lock().unwrap_or_else(|e| e.into_inner()) = Some(watcher);
    tokio::spawn(reload_loop(Arc::downgrade(inner), rx, inner.debounce()));
    Ok(())
}

/// Whether an event of this kind can change what a file holds (or whether it exists): created,
/// written (data, or closed after writing), renamed, removed, or an unclassified event or a
/// rescan request (the backend lost events). Opening, reading and closing a file without
/// writing, and metadata changes are not: on Linux, inotify reports the watcher's own
/// reads of the files it watches (`IN_OPEN`), so reacting to them made every rescan start
/// the next.
pub fn may_change_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(access) => matches!(access, AccessKind::Close(AccessMode::Write)),
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Create(_)
        | EventKind::Modify(_)
        | EventKind::Remove(_)
        | EventKind::Any
        | EventKind::Other => true,
    }
}

/// Waits for the next change notification on `rx`, then for a quiet period of `quiet` that
/// every further notification restarts (an editor's or a copy's several writes); false once
/// the sender is gone.
pub async fn settled(rx: &mut mpsc::Receiver<()>, quiet: Duration) -> bool {
    if rx.recv().await.is_none() {
        return false;
    }
    loop {
        match tokio::time::timeout(quiet, rx.recv()).await {
            Ok(Some(())) => continue,
            Ok(None) => return false,
            Err(_elapsed) => return true,
        }
    }
}

/// Waits for change notifications, lets them settle for `debounce`, then reloads.
async fn reload_loop(inner: Weak<Inner>, mut rx: mpsc::Receiver<()>, debounce: Duration) {
    while settled(&mut rx, debounce).await {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.reload_all().await;
    }
}

#[cfg(test)]
mod tests {
    use super::may_change_content;
    use notify::event::{
        AccessKind, AccessMode, CreateKind, DataChange, EventKind, MetadataKind, ModifyKind,
        RemoveKind, RenameMode,
    };

    #[test]
    fn reads_do_not_count_as_changes_writes_renames_and_removals_do() {
        let reads = [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Access(AccessKind::Read),
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
        ];
        for kind in reads {
            assert!(!may_change_content(&kind), "{kind:?}");
        }
        let changes = [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
            EventKind::Remove(RemoveKind::File),
            EventKind::Other,
        ];
        for kind in changes {
            assert!(may_change_content(&kind), "{kind:?}");
        }
    }
}
