//! `--watch-plugins`: a new or replaced plugin file in a plugin folder is swapped in (or, for
//! a plugin not loaded yet, loaded) once it is completely written.
//!
//! "Completely written" is judged by the file itself, not by the event that announced it: a
//! file is taken when its size and modification time have not changed for the settle time.
//! An atomic rename into the folder settles at once; a slow copy does not settle until its
//! last chunk is written, however long the gaps between chunks are, as long as each gap is
//! shorter than the settle time. Polling (rather than inotify through the `notify` crate):
//! the settle rule needs a clock per file anyway, and polling a handful of files a few times
//! a second costs nothing and behaves the same on every filesystem (NFS, overlayfs).
//!
//! A file whose content is already loaded is ignored (the folder's own start-up files); a
//! file whose content was refused is not retried until it changes.

use super::{swap, SwapOptions};
use crate::{app::App, plugin, registry::SwapError};
use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Weak,
    time::{Duration, Instant, SystemTime},
};

/// What was last seen of one file.
struct Seen {
    len: u64,
    modified: Option<SystemTime>,
    since: Instant,
    /// Taken (swapped, loaded, ignored or refused) in this state.
    handled: bool,
}

/// Watches the app's plugin folders until the app is dropped (the daemon stops).
pub async fn run(app: Weak<App>, settle: Duration) {
    let interval = (settle / 4).clamp(Duration::from_millis(20), Duration::from_millis(500));
    let mut seen: HashMap<PathBuf, Seen> = HashMap::new();
    if let Some(app) = app.upgrade() {
        tracing::info!(
            folders = ?app.config.plugin_dirs,
            settle_ms = settle.as_millis() as u64,
            "watching plugin folders"
        );
    }
    loop {
        tokio::time::sleep(interval).await;
        let Some(app) = app.upgrade() else {
            return;
        };
        let mut files = Vec::new();
        for dir in &app.config.plugin_dirs {
            match plugin::scan_dir(dir) {
                Ok(f) => files.extend(f),
                Err(e) => tracing::warn!(folder = %dir.display(), "cannot read plugin folder: {e}"),
            }
        }
        seen.retain(|p, _| files.contains(p));
        for path in files {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let (len, modified) = (meta.len(), meta.modified().ok());
            let entry = seen.entry(path.clone()).or_insert(Seen {
                len,
                modified,
                since: Instant::now(),
                handled: false,
            });
            if entry.len != len || entry.modified != modified {
                *entry = Seen {
                    len,
                    modified,
                    since: Instant::now(),
                    handled: false,
                };
                continue;
            }
            if entry.handled || entry.since.elapsed() < settle {
                continue;
            }
            entry.handled = true;
            let app = app.clone();
            let taken = tokio::task::spawn_blocking(move || take(&app, path)).await;
            if let Err(e) = taken {
                tracing::error!("plugin watcher task failed: {e}");
            }
        }
    }
}

/// Swaps in, loads, or ignores one settled file.
fn take(app: &App, path: PathBuf) {
    let Ok(sha256) = plugin::sha256_file(&path) else {
        return;
    };
    let snapshot = app.registry.snapshot();
    if snapshot.plugins.values().any(|p| p.sha256 == sha256) {
        return;
    }
    drop(snapshot);
    if app.registry.was_refused(&sha256) {
        tracing::debug!(file = %path.display(), "watcher: content refused before, not retried");
        return;
    }
    tracing::info!(file = %path.display(), "watcher: plugin file settled");
    let options = SwapOptions {
        tolerance: super::Tolerance::configured(&app.config.swap),
        ..SwapOptions::default()
    };
    match swap(app, &path, &options) {
        Ok(r) => tracing::info!(
            plugin = %r.plugin.name,
            version = %r.plugin.version,
            generation = r.generation,
            models_checked = r.checks.len(),
            verify_ms = r.verify.as_secs_f64() * 1e3,
            "watcher: plugin swapped"
        ),
        // Not loaded yet: a new plugin joins.
        Err(SwapError::NotLoaded { .. }) => match app.registry.load(&path) {
            Ok((p, generation)) => {
                tracing::info!(plugin = %p.name, generation, "watcher: plugin loaded")
            }
            Err(e) => {
                tracing::error!("watcher: refused plugin: {e}");
                super::remember(app, &path, e.to_string());
            }
        },
        // Remembered by `swap`.
        Err(e) => tracing::warn!("watcher: refused plugin: {e}"),
    }
}
