//! Watching the plugin directory: file events are debounced and then trigger a reload
//! of the changed plugin files.

use std::sync::{Arc, Weak};
use std::time::Duration;

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
