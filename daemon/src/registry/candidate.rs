//! A generation prepared but not yet published: a verified swap builds one, checks it, and
//! publishes it or drops it.
//!
//! A [`Candidate`] holds the registry's writer lock from the moment its snapshot is built
//! until it is published or dropped, so the snapshot it was verified as is exactly the one
//! published: no load, unload or other swap can slip in between. Dropping it unpublished
//! releases the candidate build (its library unmaps; the serving generation never saw it).

use super::{admit, Registry, Snapshot};
use crate::plugin::{LoadError, LoadedPlugin};
use std::{
    path::Path,
    sync::{Arc, MutexGuard},
};

/// Why a swap or rollback was refused. The serving generation is untouched in every case.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{path}: registers plugin '{found}', but the swap was asked to replace '{expected}'")]
    WrongName {
        path: std::path::PathBuf,
        expected: String,
        found: String,
    },
    #[error("{path}: plugin '{name}' is not loaded, so there is nothing to swap (use LoadPlugin for a new plugin)")]
    NotLoaded {
        path: std::path::PathBuf,
        name: String,
    },
    #[error("no plugin named '{0}' is loaded")]
    NothingToRollBack(String),
    #[error("plugin '{0}' has no previous build to roll back to (none replaced it, or its grace period is over)")]
    NoPrevious(String),
    /// A served model's outputs changed, or it failed, on the candidate.
    #[error("{0}")]
    Verification(String),
}

/// A refused candidate, remembered so that the watcher does not retry the same file.
#[derive(Clone, Debug)]
pub struct Refused {
    pub path: String,
    pub sha256: String,
    pub reason: String,
    pub unix_ms: u64,
}

/// The next generation, built and held unpublished.
pub struct Candidate<'r> {
    registry: &'r Registry,
    _writer: MutexGuard<'r, ()>,
    /// The generation serving now.
    pub serving: Arc<Snapshot>,
    /// The generation to publish.
    pub snapshot: Arc<Snapshot>,
    /// The build it brings in.
    pub plugin: Arc<LoadedPlugin>,
    /// The build it replaces.
    pub replaces: Arc<LoadedPlugin>,
}

impl Registry {
    /// Loads `path` (reading, mapping, `init`, self-tests) and prepares the generation in
    /// which it replaces the loaded plugin of the same name. `expected`: the name it must
    /// register. Nothing is published.
    pub fn prepare_swap(
        &self,
        path: &Path,
        expected: Option<&str>,
    ) -> Result<Candidate<'_>, SwapError> {
        let mut loaded = self.load_unpublished(path)?;
        if let Some(expected) = expected.filter(|e| *e != loaded.name) {
            return Err(SwapError::WrongName {
                path: path.to_owned(),
                expected: expected.to_string(),
                found: loaded.name.clone(),
            });
        }
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let serving = self.current.load_full();
        let Some(replaces) = serving.plugins.get(&loaded.name).cloned() else {
            return Err(SwapError::NotLoaded {
                path: path.to_owned(),
                name: loaded.name.clone(),
            });
        };
        let generation = serving.generation + 1;
        loaded.generation = generation;
        let plugin = Arc::new(admit(&serving.plugins, loaded)?);
        Ok(self.candidate(writer, serving, plugin, replaces))
    }

    /// Prepares the generation in which plugin `name` returns to the build it replaced.
    pub fn prepare_rollback(&self, name: &str) -> Result<Candidate<'_>, SwapError> {
        self.expire_previous();
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let serving = self.current.load_full();
        let Some(replaces) = serving.plugins.get(name).cloned() else {
            return Err(SwapError::NothingToRollBack(name.to_string()));
        };
        let previous = {
            let previous = self.previous.lock().unwrap_or_else(|p| p.into_inner());
            previous.get(name).map(|r| r.plugin.clone())
        };
        let plugin = previous.ok_or_else(|| SwapError::NoPrevious(name.to_string()))?;
        Ok(self.candidate(writer, serving, plugin, replaces))
    }

    fn candidate<'r>(
        &'r self,
        writer: MutexGuard<'r, ()>,
        serving: Arc<Snapshot>,
        plugin: Arc<LoadedPlugin>,
        replaces: Arc<LoadedPlugin>,
    ) -> Candidate<'r> {
        let mut plugins = serving.plugins.clone();
        plugins.insert(plugin.name.clone(), plugin.clone());
        Candidate {
            registry: self,
            _writer: writer,
            snapshot: Arc::new(serving.succeed(serving.generation + 1, plugins, &[&plugin.name])),
            serving,
            plugin,
            replaces,
        }
    }
}

impl Candidate<'_> {
    /// Publishes the candidate generation; the replaced build is kept for rollback. Returns
    /// the new generation.
    pub fn publish(self) -> u64 {
        let generation = self.snapshot.generation;
        self.registry.current.store(self.snapshot.clone());
        self.registry.retire(Some(&self.replaces));
        generation
    }
}
