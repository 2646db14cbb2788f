//! Repository polling (`--model-control-mode poll`, Triton's mode): the model repository is
//! scanned every `--repository-poll-secs`; a model folder that is new, changed or removed is
//! loaded, reloaded or unloaded in the background.
//!
//! A folder is taken only once it has looked the same on two scans in a row (file names,
//! sizes and modification times), so a model still being copied in is never loaded
//! half-written. A reload that fails keeps the versions that were ready serving (the
//! repository's rule); the failure is logged and listed in the repository index.

use super::CONFIG_FILE;
use crate::app::App;
use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Weak},
    time::{Duration, SystemTime},
};

/// What a model folder looks like: every file under it (up to its version folders' files),
/// with size and modification time.
type Fingerprint = Vec<(String, u64, SystemTime)>;

/// Files deeper than this under a model folder are not looked at (versions hold the model and
/// its external data).
const MAX_DEPTH: usize = 3;

fn fingerprint(dir: &Path) -> Fingerprint {
    fn walk(dir: &Path, rel: &str, depth: usize, out: &mut Fingerprint) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            // Temporary files of uploads in progress are not part of the model.
            if name.starts_with('.') {
                continue;
            }
            let path = format!("{rel}/{name}");
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                if depth < MAX_DEPTH {
                    walk(&e.path(), &path, depth + 1, out);
                }
            } else {
                out.push((
                    path,
                    meta.len(),
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                ));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, "", 1, &mut out);
    out.sort();
    out
}

/// Whether a folder holds something to serve: a version folder or a config.
fn has_model(fp: &Fingerprint) -> bool {
    fp.iter()
        .any(|(p, _, _)| p.ends_with(".onnx") || p.ends_with(CONFIG_FILE))
}

/// The repository as it looks now: model name -> fingerprint.
fn scan(app: &App) -> BTreeMap<String, Fingerprint> {
    let (Some(root), Ok(names)) = (app.config.model_repo.as_ref(), app.repo.on_disk()) else {
        return BTreeMap::new();
    };
    names
        .into_iter()
        .map(|n| {
            let fp = fingerprint(&root.join(&n));
            (n, fp)
        })
        .filter(|(_, fp)| has_model(fp))
        .collect()
}

/// Polls until the app is gone. The repository as loaded at start-up is the baseline.
pub async fn run(app: Weak<App>, interval: Duration) {
    let Some(baseline) = app.upgrade().map(|a| scan(&a)) else {
        return;
    };
    // What was last acted on, and what the previous scan saw.
    let mut acted = baseline.clone();
    let mut previous = baseline;
    loop {
        tokio::time::sleep(interval).await;
        let Some(a) = app.upgrade() else { return };
        let now = scan(&a);
        // Settled: the same on this scan and the previous one.
        let settled = |name: &str| now.get(name) == previous.get(name);
        let changed: Vec<String> = now
            .iter()
            .filter(|(n, fp)| acted.get(*n) != Some(*fp) && settled(n))
            .map(|(n, _)| n.clone())
            .collect();
        let removed: Vec<String> = acted
            .keys()
            .filter(|n| !now.contains_key(*n) && settled(n))
            .cloned()
            .collect();
        for name in changed {
            let fp = now.get(&name).cloned().unwrap_or_default();
            load(&a, &name).await;
            acted.insert(name, fp);
        }
        for name in removed {
            match a.repo.unload(&name) {
                Ok(()) => tracing::info!(model = %name, "poll: model folder removed; unloaded"),
                Err(e) => tracing::warn!(model = %name, "poll: cannot unload: {e}"),
            }
            acted.remove(&name);
        }
        previous = now;
    }
}

async fn load(app: &Arc<App>, name: &str) {
    let a = app.clone();
    let n = name.to_string();
    match app
        .compute
        .run(move || a.repo.load(&n, Default::default(), &a.registry))
        .await
    {
        Ok(Ok(versions)) => tracing::info!(model = %name, ?versions, "poll: model (re)loaded"),
        Ok(Err(e)) => tracing::error!(
            model = %name,
            "poll: load failed (versions that were ready keep serving): {e}"
        ),
        Err(e) => tracing::error!(model = %name, "poll: load failed: {e}"),
    }
}
