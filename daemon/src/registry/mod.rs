//! The registry: every loaded plugin and what it registered, as an immutable snapshot.
//!
//! Snapshots are published through `ArcSwap`. Loading, unloading or replacing a plugin builds a
//! new snapshot with the next generation; a request holds the snapshot it started with, so
//! in-flight work finishes on the kernels it bound and new work binds the new ones. A retired
//! plugin is released (and its library closed) when the last snapshot or request holding it
//! drops.

mod candidate;
mod resolve;

pub use candidate::{Candidate, Refused, SwapError};
pub use resolve::{KernelQuery, KernelRef, ResolveError};

use crate::device::DeviceHandle;
use crate::plugin::{self, kernel_label, LoadError, LoadedPlugin};
use arc_swap::ArcSwap;
use opreg_sdk::{blas::FfiBlasBox, Device};
use std::{
    collections::VecDeque,
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// One immutable state of the registry.
#[derive(Default)]
pub struct Snapshot {
    pub generation: u64,
    pub plugins: BTreeMap<String, Arc<LoadedPlugin>>,
    /// Plugins whose kernels are skipped after repeated faults (they stay loaded; nodes fall
    /// back to the next provider). Cleared by a new build of the plugin or by an RPC.
    pub quarantined: BTreeSet<String>,
    /// Kernels by (domain, op type), so resolving a node costs what its own op has registered,
    /// not what every plugin has.
    index: resolve::Index,
}

impl Snapshot {
    /// The snapshot of `plugins` at `generation`, with its kernel index.
    pub fn new(generation: u64, plugins: BTreeMap<String, Arc<LoadedPlugin>>) -> Self {
        Self::with_quarantined(generation, plugins, BTreeSet::new())
    }

    /// The snapshot of `plugins` at `generation` with the kernels of `quarantined` skipped
    /// (names not in `plugins` are dropped).
    pub fn with_quarantined(
        generation: u64,
        plugins: BTreeMap<String, Arc<LoadedPlugin>>,
        mut quarantined: BTreeSet<String>,
    ) -> Self {
        quarantined.retain(|n| plugins.contains_key(n));
        let index = resolve::Index::build(&plugins, &quarantined);
        Snapshot {
            generation,
            plugins,
            quarantined,
            index,
        }
    }

    /// The next snapshot: `plugins` at `generation`, keeping this one's quarantine except for
    /// the plugins named in `fresh` (a new build starts with a clean record).
    pub fn succeed(
        &self,
        generation: u64,
        plugins: BTreeMap<String, Arc<LoadedPlugin>>,
        fresh: &[&str],
    ) -> Self {
        let mut quarantined = self.quarantined.clone();
        for n in fresh {
            quarantined.remove(*n);
        }
        Self::with_quarantined(generation, plugins, quarantined)
    }

    /// The highest-priority BLAS backend for `device`.
    pub fn blas_for(&self, device: Device) -> Option<&FfiBlasBox> {
        self.plugins
            .values()
            .flat_map(|p| p.backends.iter())
            .filter(|b| b.desc.device == device)
            .max_by_key(|b| b.desc.priority)
            .map(|b| &b.backend)
    }

    /// `device` as the first plugin (by name) that provides it.
    pub fn device(&self, device: Device) -> Option<DeviceHandle> {
        self.plugins.values().find_map(|p| {
            let owner: Arc<dyn Send + Sync> = p.clone();
            p.devices
                .iter()
                .find_map(|d| DeviceHandle::new(d, device, &p.name, owner.clone()))
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnloadError {
    #[error("no plugin named '{0}' is loaded")]
    NotLoaded(String),
}

/// The registry: the current snapshot, and the lock that serialises writers.
pub struct Registry {
    current: ArcSwap<Snapshot>,
    writer: Mutex<()>,
    stage_dir: PathBuf,
    /// Configuration text per plugin name, handed to the plugin's `init`.
    configs: BTreeMap<String, String>,
    /// The build each replaced plugin had, for `RollbackPlugin`, until its grace period ends
    /// (it stays mapped until then: that is what makes a rollback instant).
    previous: Mutex<BTreeMap<String, Retired>>,
    grace: Duration,
    /// Candidates refused by a verified swap, newest last (bounded).
    refused: Mutex<VecDeque<Refused>>,
    /// Recent kernel faults per plugin, and how many within which window quarantine it.
    faults: Mutex<HashMap<String, VecDeque<Instant>>>,
    quarantine_after: Option<(usize, Duration)>,
}

/// A replaced build kept for rollback.
struct Retired {
    plugin: Arc<LoadedPlugin>,
    until: Instant,
}

/// How long a replaced build stays loaded for rollback by default.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(600);

/// Kernel faults within a window that quarantine a plugin by default.
pub const DEFAULT_QUARANTINE: (usize, Duration) = (5, Duration::from_secs(60));

/// Most refused candidates remembered.
const MAX_REFUSED: usize = 64;

impl Registry {
    /// An empty registry that stages plugin copies in `stage_dir` and gives each plugin the
    /// configuration text `configs` holds under its name. A replaced build is kept loaded for
    /// [`DEFAULT_GRACE`] so that it can be rolled back to (see [`with_grace`](Self::with_grace)).
    pub fn new(stage_dir: PathBuf, configs: BTreeMap<String, String>) -> Self {
        Registry {
            current: ArcSwap::from_pointee(Snapshot::default()),
            writer: Mutex::new(()),
            stage_dir,
            configs,
            previous: Mutex::new(BTreeMap::new()),
            grace: DEFAULT_GRACE,
            refused: Mutex::new(VecDeque::new()),
            faults: Mutex::new(HashMap::new()),
            quarantine_after: Some(DEFAULT_QUARANTINE),
        }
    }

    /// Quarantines a plugin after `faults` kernel faults within `window` (`None`: never).
    pub fn with_quarantine(mut self, after: Option<(usize, Duration)>) -> Self {
        self.quarantine_after = after;
        self
    }

    /// Counts a fault (a kernel that panicked or failed with an internal error on a served
    /// model) against `plugin`. True when this fault reaches the quarantine threshold and the
    /// plugin is not quarantined yet: the caller then quarantines it.
    pub fn record_fault(&self, plugin: &str) -> bool {
        let Some((limit, window)) = self.quarantine_after else {
            return false;
        };
        let now = Instant::now();
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        let recent = faults.entry(plugin.to_string()).or_default();
        recent.push_back(now);
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            recent.pop_front();
        }
        if recent.len() < limit || self.snapshot().quarantined.contains(plugin) {
            return false;
        }
        recent.clear();
        true
    }

    /// Faults counted against `plugin` within the quarantine window.
    pub fn recent_faults(&self, plugin: &str) -> usize {
        let window = self.quarantine_after.map_or(Duration::ZERO, |(_, w)| w);
        let faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        faults
            .get(plugin)
            .map_or(0, |f| f.iter().filter(|t| t.elapsed() <= window).count())
    }

    /// Quarantines plugin `name` (`on`), or lifts its quarantine, in a new generation.
    pub fn set_quarantine(&self, name: &str, on: bool) -> Result<u64, UnloadError> {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.current.load_full();
        if !old.plugins.contains_key(name) {
            return Err(UnloadError::NotLoaded(name.to_string()));
        }
        let mut quarantined = old.quarantined.clone();
        if on {
            quarantined.insert(name.to_string());
        } else {
            quarantined.remove(name);
            let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
            faults.remove(name);
        }
        let generation = old.generation + 1;
        self.current.store(Arc::new(Snapshot::with_quarantined(
            generation,
            old.plugins.clone(),
            quarantined,
        )));
        Ok(generation)
    }

    /// Keeps a replaced build loaded for `grace` (zero: released at once, no rollback).
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Releases replaced builds whose grace period is over (their libraries unmap once no
    /// request holds them). Called by every writer and periodically by the daemon.
    pub fn expire_previous(&self) {
        let now = Instant::now();
        let expired: Vec<Arc<LoadedPlugin>> = {
            let mut previous = self.previous.lock().unwrap_or_else(|p| p.into_inner());
            let names: Vec<String> = previous
                .iter()
                .filter(|(_, r)| r.until <= now)
                .map(|(n, _)| n.clone())
                .collect();
            names
                .iter()
                .filter_map(|n| previous.remove(n))
                .map(|r| r.plugin)
                .collect()
        };
        for p in expired {
            tracing::info!(plugin = %p.name, generation = p.generation, "rollback grace period over: previous build released");
        }
    }

    /// The builds kept for rollback.
    pub fn previous(&self) -> Vec<Arc<LoadedPlugin>> {
        let previous = self.previous.lock().unwrap_or_else(|p| p.into_inner());
        previous.values().map(|r| r.plugin.clone()).collect()
    }

    fn retire(&self, old: Option<&Arc<LoadedPlugin>>) {
        if let Some(old) = old.filter(|_| !self.grace.is_zero()) {
            let mut previous = self.previous.lock().unwrap_or_else(|p| p.into_inner());
            previous.insert(
                old.name.clone(),
                Retired {
                    plugin: old.clone(),
                    until: Instant::now() + self.grace,
                },
            );
        }
    }

    /// Remembers a refused candidate (the watcher does not retry its content).
    pub fn remember_refused(&self, refused: Refused) {
        let mut list = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|r| r.sha256 != refused.sha256);
        if list.len() >= MAX_REFUSED {
            list.pop_front();
        }
        list.push_back(refused);
    }

    /// The refused candidates, oldest first.
    pub fn refused(&self) -> Vec<Refused> {
        let list = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        list.iter().cloned().collect()
    }

    /// Whether a candidate with this content was refused.
    pub fn was_refused(&self, sha256: &str) -> bool {
        let list = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        list.iter().any(|r| r.sha256 == sha256)
    }

    fn config_of(&self, plugin: &str) -> String {
        self.configs.get(plugin).cloned().unwrap_or_default()
    }

    /// The snapshot to use for one request.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Loads every file in `paths` into one new generation. A file that fails is reported and
    /// skipped; the others load.
    pub fn load_all(
        &self,
        paths: &[PathBuf],
    ) -> Vec<(PathBuf, Result<Arc<LoadedPlugin>, LoadError>)> {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.current.load_full();
        let generation = old.generation + 1;
        let mut plugins = old.plugins.clone();
        let mut results = Vec::new();
        for path in paths {
            let r = plugin::load(path, &self.stage_dir, generation, &|n| self.config_of(n))
                .and_then(|p| admit(&plugins, p))
                .map(|p| {
                    let p = Arc::new(p);
                    plugins.insert(p.name.clone(), p.clone());
                    p
                });
            results.push((path.clone(), r));
        }
        let fresh: Vec<&str> = results
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok().map(|p| p.name.as_str()))
            .collect();
        self.current
            .store(Arc::new(old.succeed(generation, plugins, &fresh)));
        results
    }

    /// Loads (maps, initialises, self-tests) the plugin at `path` without publishing it.
    /// Reading, mapping and checking a file may take long (a slow disk, a large library): it
    /// happens before the writer lock, so a slow load holds up no other load or unload. The
    /// generation is fixed when the new snapshot is published.
    fn load_unpublished(&self, path: &Path) -> Result<LoadedPlugin, LoadError> {
        plugin::load(
            path,
            &self.stage_dir,
            self.snapshot().generation + 1,
            &|n| self.config_of(n),
        )
    }

    /// Loads one plugin. A plugin with the name of a loaded one replaces it (hot swap): the
    /// old one serves the requests that already hold it and is released after them.
    pub fn load(&self, path: &Path) -> Result<(Arc<LoadedPlugin>, u64), LoadError> {
        let mut loaded = self.load_unpublished(path)?;
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.current.load_full();
        let generation = old.generation + 1;
        loaded.generation = generation;
        let p = Arc::new(admit(&old.plugins, loaded)?);
        let mut plugins = old.plugins.clone();
        let replaced = plugins.insert(p.name.clone(), p.clone());
        self.current
            .store(Arc::new(old.succeed(generation, plugins, &[&p.name])));
        self.retire(replaced.as_ref());
        drop(old);
        self.expire_previous();
        Ok((p, generation))
    }

    /// Unloads the plugin `name`; returns the new generation.
    pub fn unload(&self, name: &str) -> Result<u64, UnloadError> {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.current.load_full();
        if !old.plugins.contains_key(name) {
            return Err(UnloadError::NotLoaded(name.to_string()));
        }
        let mut plugins = old.plugins.clone();
        plugins.remove(name);
        let generation = old.generation + 1;
        self.current
            .store(Arc::new(old.succeed(generation, plugins, &[name])));
        // An unloaded plugin has nothing to roll back to.
        let kept = {
            let mut previous = self.previous.lock().unwrap_or_else(|p| p.into_inner());
            previous.remove(name)
        };
        drop(kept);
        Ok(generation)
    }
}

/// Checks that `new` does not make kernel resolution ambiguous or shadow a backend or
/// quantizer of another plugin. A plugin of the same name is about to be replaced, so it is
/// not compared against.
fn admit(
    loaded: &BTreeMap<String, Arc<LoadedPlugin>>,
    new: LoadedPlugin,
) -> Result<LoadedPlugin, LoadError> {
    for other in loaded.values().filter(|o| o.name != new.name) {
        let conflict = |what: String| LoadError::Conflict {
            path: new.source.clone(),
            plugin: new.name.clone(),
            other: other.name.clone(),
            what,
        };
        for k in &new.kernels {
            if let Some(o) = other
                .kernels
                .iter()
                .find(|o| resolve::ambiguous(&k.desc, &o.desc))
            {
                return Err(conflict(format!(
                    "both register {} at priority {} for the same types (give one a higher priority to override)",
                    kernel_label(&k.desc),
                    o.desc.priority
                )));
            }
        }
        for b in &new.backends {
            if other.backends.iter().any(|o| o.desc.name == b.desc.name) {
                return Err(conflict(format!(
                    "both register a BLAS backend named '{}'",
                    b.desc.name
                )));
            }
        }
        for q in &new.quantizers {
            if other.quantizers.iter().any(|o| o.desc.name == q.desc.name) {
                return Err(conflict(format!(
                    "both register a quantizer named '{}'",
                    q.desc.name
                )));
            }
        }
    }
    Ok(new)
}
