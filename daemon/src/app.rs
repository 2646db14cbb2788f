//! The daemon's shared state: configuration, registry, compute pool, readiness.

use crate::{config::Config, exec::ComputePool, registry::Registry, repo::Repository};
use anyhow::Context;
use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

pub struct App {
    pub config: Config,
    pub registry: Registry,
    pub compute: ComputePool,
    pub repo: Repository,
    pub metrics: crate::metrics::Metrics,
    /// Dynamic batching queues, per model version.
    pub batchers: crate::server::batch::Batchers,
    /// The request bytes being received, gRPC messages and REST bodies together
    /// (`--max-receiving-bytes`).
    pub receiving: std::sync::Arc<crate::server::receive::Budget>,
    ready: AtomicBool,
    // Declared last: the registry (and the plugin copies it maps) must go first.
    _runtime_dir: RuntimeDir,
}

impl App {
    pub fn new(config: Config) -> anyhow::Result<App> {
        let runtime_dir = RuntimeDir::create(config.runtime_dir.clone())?;
        Ok(App {
            registry: Registry::new(
                runtime_dir.path().join("plugins"),
                config.plugin_config.clone(),
            )
            .with_grace(config.swap.grace)
            .with_quarantine(config.swap.quarantine),
            compute: ComputePool::new(config.threads)?.spinning(!config.no_spin),
            repo: Repository::new(config.model_repo.clone(), config.limits.clone()),
            metrics: crate::metrics::Metrics::new(),
            batchers: Default::default(),
            receiving: crate::server::receive::Budget::new(
                config.limits.max_receiving_bytes,
                config.limits.receive_idle_timeout(),
            ),
            ready: AtomicBool::new(false),
            _runtime_dir: runtime_dir,
            config,
        })
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }
}

/// The folder for private plugin copies. One created here (not configured) is removed when
/// dropped: at shutdown, or at the end of `opreg bench`.
pub struct RuntimeDir {
    path: PathBuf,
    owned: bool,
}

impl RuntimeDir {
    /// `configured`, or a new `opreg-<pid>` folder under the system temporary folder.
    pub fn create(configured: Option<PathBuf>) -> anyhow::Result<RuntimeDir> {
        let (path, owned) = match configured {
            Some(p) => (p, false),
            None => (
                std::env::temp_dir().join(format!("opreg-{}", std::process::id())),
                true,
            ),
        };
        std::fs::create_dir_all(&path)
            .with_context(|| format!("creating runtime folder {}", path.display()))?;
        Ok(RuntimeDir { path, owned })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        if self.owned {
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove runtime folder");
            }
        }
    }
}
