//! The model repository: a Triton-like folder, `<repo>/<model>/<version>/model.onnx` with an
//! optional `<repo>/<model>/config.toml`, and the models loaded from it.
//!
//! Models submitted over gRPC are checked (imported and compiled) before anything is written,
//! then written atomically (a uniquely named temporary file, fsync, rename, fsync of the
//! folder), so a restart serves them again, a bad upload leaves the repository as it was, and
//! a kill at any point leaves the old version or the new one, never a broken one. Loads of one
//! model are serialized; temporary files a kill left behind are removed at start-up.

// Request and model data reach this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

mod model;
pub mod poll;

pub use model::{DynamicBatching, Feeds, ModelSettings, Prepared, ServedModel};

use crate::{config::Limits, graph, quant::adaptive::Adaptive, registry::Registry};
use std::{
    collections::{BTreeMap, VecDeque},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, RwLock,
    },
};

pub const MODEL_FILE: &str = "model.onnx";
pub const CONFIG_FILE: &str = "config.toml";

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("unknown model '{0}'")]
    UnknownModel(String),
    #[error("model '{name}' has no ready version{}", version.as_ref().map(|v| format!(" '{v}'")).unwrap_or_default())]
    NotReady {
        name: String,
        version: Option<String>,
    },
    #[error("invalid model name '{0}': use 1 to {MAX_NAME_LEN} letters, digits, '-', '_' and '.'")]
    BadName(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{running} model loads are running, the limit (max_concurrent_loads); retry later")]
    Busy { running: usize },
    #[error("model '{name}' version {version}: {source}")]
    Graph {
        name: String,
        version: u64,
        #[source]
        source: graph::GraphError,
    },
    #[error("model '{0}' has no version folder with a {MODEL_FILE}")]
    NoVersions(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("the daemon has no model repository (--model-repo)")]
    NoRepository,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    /// A version whose plan freed weights after packing them re-reads its file to compile a
    /// new plan (after a plugin swap): the file no longer holds those weights.
    #[error("model '{name}' version {version}: {reason}; reload the model to serve its file as it is now")]
    Changed {
        name: String,
        version: u64,
        reason: String,
    },
}

/// Where one model version is in its life cycle (Triton's model states).
#[derive(Clone)]
pub enum VersionState {
    /// Being read and compiled; not served yet.
    Loading,
    /// Served.
    Ready(Arc<ServedModel>),
    /// Unloaded, with requests that started before still running on it.
    Unloading(std::sync::Weak<ServedModel>),
    /// Not served, and why.
    Unavailable(String),
}

impl VersionState {
    /// The state's name and reason, as `RepositoryIndex` reports them.
    pub fn describe(&self) -> (&'static str, String) {
        match self {
            VersionState::Loading => ("LOADING", String::new()),
            VersionState::Ready(_) => ("READY", String::new()),
            // Once the last request on it is done, it is simply unloaded.
            VersionState::Unloading(w) if w.strong_count() > 0 => {
                ("UNLOADING", "unloaded; requests in flight".into())
            }
            VersionState::Unloading(_) => ("UNAVAILABLE", "unloaded".into()),
            VersionState::Unavailable(reason) => ("UNAVAILABLE", reason.clone()),
        }
    }

    fn ready(&self) -> Option<&Arc<ServedModel>> {
        match self {
            VersionState::Ready(m) => Some(m),
            _ => None,
        }
    }
}

/// A failed load: the version that failed (when one did), and why.
type VersionError = (Option<u64>, RepoError);

/// One model's entry in the index: each known version's state, and why the model as a whole
/// is unavailable when no version could even be listed.
#[derive(Clone)]
pub struct Entry {
    pub versions: BTreeMap<u64, VersionState>,
    pub reason: String,
}

impl Entry {
    fn empty(reason: &str) -> Entry {
        Entry {
            versions: BTreeMap::new(),
            reason: reason.into(),
        }
    }

    fn has_ready(&self) -> bool {
        self.versions.values().any(|v| v.ready().is_some())
    }
}

pub struct Repository {
    root: Option<PathBuf>,
    limits: Limits,
    models: RwLock<BTreeMap<String, Entry>>,
    /// Names whose only entry is a failed load, oldest first: bounded by `max_failed_models`.
    failed: Mutex<VecDeque<String>>,
    /// Loads of one model run one at a time: a lock per name, striped so that the set of
    /// locks stays bounded whatever names clients send.
    name_locks: [Mutex<()>; NAME_LOCKS],
    loads_running: AtomicUsize,
}

/// Longest model name: a folder name on every common file system, with room to spare.
pub const MAX_NAME_LEN: usize = 200;
/// Longest failure reason the index keeps per model.
const MAX_REASON_LEN: usize = 1024;
/// Failed versions the index keeps per model (the newest).
const MAX_FAILED_VERSIONS: usize = 8;
const NAME_LOCKS: usize = 64;

/// Shortens client- or model-supplied text that goes into a message or the index.
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… ({} bytes)", &text[..cut], text.len())
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl Repository {
    pub fn new(root: Option<PathBuf>, limits: Limits) -> Self {
        Repository {
            root,
            limits,
            models: RwLock::new(BTreeMap::new()),
            failed: Mutex::new(VecDeque::new()),
            name_locks: std::array::from_fn(|_| Mutex::new(())),
            loads_running: AtomicUsize::new(0),
        }
    }

    /// The folder of model `name` in the repository (none without a repository folder).
    pub fn model_dir(&self, name: &str) -> Option<PathBuf> {
        valid_name(name)
            .then(|| self.root.as_ref().map(|r| r.join(name)))
            .flatten()
    }

    /// The repository's limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A version number above every version of `name` known in memory and every numbered
    /// folder on disk (complete or not: a folder a killed run left is never reused).
    pub fn next_version(&self, name: &str) -> u64 {
        let in_memory = self
            .read()
            .get(name)
            .and_then(|e| e.versions.keys().next_back().copied())
            .unwrap_or(0);
        let on_disk = self
            .model_dir(name)
            .and_then(|d| std::fs::read_dir(d).ok())
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        in_memory.max(on_disk).saturating_add(1)
    }

    /// Removes the temporary files of uploads that a kill interrupted (`.model.onnx.*.tmp` in
    /// version folders). Call it at start-up, before anything loads.
    pub fn remove_stale_uploads(&self) -> usize {
        let Some(root) = &self.root else { return 0 };
        let mut removed = 0;
        let dirs = |p: &Path| -> Vec<PathBuf> {
            std::fs::read_dir(p)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .map(|e| e.path())
                        .filter(|p| p.is_dir())
                        .collect()
                })
                .unwrap_or_default()
        };
        for model in dirs(root) {
            for version in dirs(&model) {
                let Ok(rd) = std::fs::read_dir(&version) else {
                    continue;
                };
                for e in rd.filter_map(|e| e.ok()) {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    if name.starts_with(&format!(".{MODEL_FILE}.")) && name.ends_with(".tmp") {
                        match std::fs::remove_file(e.path()) {
                            Ok(()) => removed += 1,
                            Err(err) => {
                                tracing::warn!(path = %e.path().display(), "cannot remove stale upload: {err}")
                            }
                        }
                    }
                }
            }
        }
        removed
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Entry>> {
        self.models.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Entry>> {
        self.models.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Names of the model folders on disk.
    pub fn on_disk(&self) -> Result<Vec<String>, RepoError> {
        let Some(root) = &self.root else {
            return Ok(Vec::new());
        };
        let io = |source| RepoError::Io {
            path: root.clone(),
            source,
        };
        let mut names: Vec<String> = std::fs::read_dir(root)
            .map_err(io)?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| valid_name(n))
            .collect();
        names.sort();
        Ok(names)
    }

    /// The ready version `version` of `name` (empty: the newest ready one).
    pub fn get(&self, name: &str, version: &str) -> Result<Arc<ServedModel>, RepoError> {
        let models = self.read();
        let entry = models
            .get(name)
            .ok_or_else(|| RepoError::UnknownModel(clip(name, 128)))?;
        let not_ready = || RepoError::NotReady {
            name: name.into(),
            version: (!version.is_empty()).then(|| clip(version, 32)),
        };
        if version.is_empty() {
            return entry
                .versions
                .values()
                .rev()
                .find_map(VersionState::ready)
                .cloned()
                .ok_or_else(not_ready);
        }
        let v: u64 = version.parse().map_err(|_| not_ready())?;
        entry
            .versions
            .get(&v)
            .and_then(VersionState::ready)
            .cloned()
            .ok_or_else(not_ready)
    }

    /// The loaded versions of `name` (in memory only: no repository I/O on a request path).
    pub fn versions(&self, name: &str) -> Vec<u64> {
        self.read()
            .get(name)
            .map(|e| {
                e.versions
                    .iter()
                    .filter(|(_, s)| s.ready().is_some())
                    .map(|(v, _)| *v)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every model known, loaded or not.
    pub fn index(&self) -> Vec<(String, Entry)> {
        let mut out: BTreeMap<String, Entry> = self.read().clone();
        if let Ok(names) = self.on_disk() {
            for n in names {
                out.entry(n).or_insert(Entry::empty("not loaded"));
            }
        }
        out.into_iter().collect()
    }

    /// Every ready model version.
    pub fn ready(&self) -> Vec<Arc<ServedModel>> {
        self.read()
            .values()
            .flat_map(|e| e.versions.values().filter_map(VersionState::ready).cloned())
            .collect()
    }

    /// Loads (or reloads) `name`. With `files` (version -> model bytes) the versions are
    /// checked, then written to the repository, then served; without, they are read from disk.
    /// Blocking: call it on the compute pool.
    pub fn load(
        &self,
        name: &str,
        files: BTreeMap<u64, Vec<u8>>,
        registry: &Registry,
    ) -> Result<Vec<u64>, RepoError> {
        // A name the repository could never hold is refused up front and not remembered.
        if !valid_name(name) {
            return Err(RepoError::BadName(clip(name, 64)));
        }
        let _slot = LoadSlot::take(&self.loads_running, self.limits.max_concurrent_loads)?;
        let _serial = self.lock_name(name);
        let result = self.load_inner(name, files, registry);
        match &result {
            Ok(_) => self.forget_failure(name),
            Err(e) => self.remember_failure(name, e),
        }
        result
    }

    fn lock_name(&self, name: &str) -> std::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        name.hash(&mut h);
        let stripe = (h.finish() % NAME_LOCKS as u64) as usize;
        #[allow(clippy::indexing_slicing)] // stripe < NAME_LOCKS = the array's length
        let lock = &self.name_locks[stripe];
        lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A failed reload keeps serving what was ready; a failed first load is recorded (the
    /// last failure per name, with a bounded reason, for at most `max_failed_models` names).
    fn remember_failure(&self, name: &str, e: &RepoError) {
        let mut models = self.write();
        let entry = models
            .entry(name.to_string())
            .or_insert_with(|| Entry::empty(""));
        if entry.has_ready() {
            return;
        }
        entry.reason = clip(&e.to_string(), MAX_REASON_LEN);
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        failed.retain(|n| n != name);
        failed.push_back(name.to_string());
        while failed.len() > self.limits.max_failed_models {
            if let Some(old) = failed.pop_front() {
                if models.get(&old).is_some_and(|e| !e.has_ready()) {
                    models.remove(&old);
                }
            }
        }
    }

    fn forget_failure(&self, name: &str) {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|n| n != name);
    }

    fn check_size(&self, what: &str, len: u64) -> Result<(), RepoError> {
        if len > self.limits.max_model_bytes {
            return Err(RepoError::TooLarge(format!(
                "{what} has {len} bytes, more than the limit of {} (max_model_bytes)",
                self.limits.max_model_bytes
            )));
        }
        Ok(())
    }

    fn load_inner(
        &self,
        name: &str,
        files: BTreeMap<u64, Vec<u8>>,
        registry: &Registry,
    ) -> Result<Vec<u64>, RepoError> {
        let model_dir = self.root.as_ref().map(|r| r.join(name));
        let settings = match &model_dir {
            Some(d) => ModelSettings::read(&d.join(CONFIG_FILE))?,
            None => ModelSettings::default(),
        };
        // The versions to load: submitted, or found on disk.
        let on_disk = if files.is_empty() {
            let dir = model_dir.as_ref().ok_or(RepoError::NoRepository)?;
            let found = versions_on_disk(dir)?;
            if found.is_empty() {
                return Err(RepoError::NoVersions(name.into()));
            }
            found
        } else {
            Vec::new()
        };
        let versions: Vec<u64> = if files.is_empty() {
            on_disk.iter().map(|(v, _)| *v).collect()
        } else {
            files.keys().copied().collect()
        };
        self.mark_loading(name, &versions);
        let built = self.build_versions(name, &files, &on_disk, &settings, registry);
        let loaded = match built {
            Ok(loaded) => loaded,
            Err(failed) => {
                let (version, e) = *failed;
                self.mark_failed(name, &versions, version, &e);
                return Err(e);
            }
        };
        if let Some(dir) = &model_dir {
            for (version, bytes) in &files {
                if let Err(e) = write_atomically(&dir.join(version.to_string()), MODEL_FILE, bytes)
                {
                    self.mark_failed(name, &versions, None, &e);
                    return Err(e);
                }
            }
        }
        let mut models = self.write();
        let entry = models
            .entry(name.to_string())
            .or_insert_with(|| Entry::empty(""));
        if files.is_empty() {
            // A reload from disk: versions no longer on disk go.
            entry.versions.retain(|v, _| loaded.contains_key(v));
        }
        for (v, m) in loaded {
            entry.versions.insert(v, VersionState::Ready(m));
        }
        entry.reason.clear();
        Ok(versions)
    }

    /// Versions about to load show `LOADING`, except ready ones: they serve until replaced.
    fn mark_loading(&self, name: &str, versions: &[u64]) {
        let mut models = self.write();
        let entry = models
            .entry(name.to_string())
            .or_insert_with(|| Entry::empty(""));
        for v in versions {
            let state = entry.versions.entry(*v).or_insert(VersionState::Loading);
            if state.ready().is_none() {
                *state = VersionState::Loading;
            }
        }
    }

    /// After a failed load: the version that failed (or, with `None`, every version still
    /// loading) is unavailable with the reason; the others that were loading are unavailable
    /// as not loaded. Ready versions stay ready.
    fn mark_failed(&self, name: &str, versions: &[u64], failed: Option<u64>, e: &RepoError) {
        let reason = clip(&e.to_string(), MAX_REASON_LEN);
        let mut models = self.write();
        let Some(entry) = models.get_mut(name) else {
            return;
        };
        for v in versions {
            if let Some(state) = entry.versions.get_mut(v) {
                if matches!(state, VersionState::Loading) {
                    *state = VersionState::Unavailable(if failed.is_none_or(|f| f == *v) {
                        reason.clone()
                    } else {
                        format!("not loaded: version {} failed", failed.unwrap_or(*v))
                    });
                }
            }
        }
        // Failed versions cost memory a client chooses (any version numbers, each with a
        // reason): a model keeps the newest few.
        let unavailable: Vec<u64> = entry
            .versions
            .iter()
            .filter(|(_, s)| matches!(s, VersionState::Unavailable(_)))
            .map(|(v, _)| *v)
            .collect();
        let excess = unavailable.len().saturating_sub(MAX_FAILED_VERSIONS);
        for v in unavailable.into_iter().take(excess) {
            entry.versions.remove(&v);
        }
    }

    /// Builds every version (checks all before anything is written or served). The error
    /// names the version that failed.
    fn build_versions(
        &self,
        name: &str,
        files: &BTreeMap<u64, Vec<u8>>,
        on_disk: &[(u64, PathBuf)],
        settings: &ModelSettings,
        registry: &Registry,
    ) -> Result<BTreeMap<u64, Arc<ServedModel>>, Box<VersionError>> {
        let snapshot = registry.snapshot();
        let mut loaded = BTreeMap::new();
        let build = |version: u64, mut bytes: graph::ModelBytes, file: Option<&Path>| {
            self.check_size(
                &format!("version {version} of model '{name}'"),
                bytes.len() as u64,
            )?;
            // The version's folder, also for a submitted version (its model is written there
            // once every version built): an adaptive version's extra files are there. Only
            // an adaptive version reads the model's bytes again after the build (which
            // otherwise gives their pages back as it copies the weights out).
            let vdir = self
                .root
                .as_ref()
                .map(|root| root.join(name).join(version.to_string()));
            let again = vdir
                .as_ref()
                .filter(|v| Adaptive::wanted(v))
                .map(|_| bytes.shared());
            let mut m = ServedModel::build(
                name,
                version,
                bytes,
                file,
                settings.clone(),
                snapshot.clone(),
                self.limits.max_folded_bytes,
            )?;
            if let (Some(root), Some(vdir)) = (&self.root, &vdir) {
                if let Some(again) = &again {
                    m.adaptive = Adaptive::read(vdir, again, self.limits.max_model_bytes)?;
                }
                m.read_warmup(&root.join(name))?;
            }
            Ok(m)
        };
        for (version, path) in on_disk {
            let io = |source| RepoError::Io {
                path: path.clone(),
                source,
            };
            let len = std::fs::metadata(path)
                .map_err(io)
                .map_err(|e| Box::new((Some(*version), e)))?
                .len();
            self.check_size(&format!("version {version} of model '{name}'"), len)
                .map_err(|e| Box::new((Some(*version), e)))?;
            let bytes = graph::ModelBytes::read(path, self.limits.max_model_bytes)
                .map_err(io)
                .map_err(|e| Box::new((Some(*version), e)))?;
            let m =
                build(*version, bytes, Some(path)).map_err(|e| Box::new((Some(*version), e)))?;
            loaded.insert(*version, Arc::new(m));
        }
        for (&version, bytes) in files {
            let bytes = prost::bytes::Bytes::copy_from_slice(bytes);
            let m = build(version, bytes.into(), None).map_err(|e| Box::new((Some(version), e)))?;
            loaded.insert(version, Arc::new(m));
        }
        Ok(loaded)
    }

    /// Stops serving `name`; its files stay in the repository.
    pub fn unload(&self, name: &str) -> Result<(), RepoError> {
        let mut models = self.write();
        let entry = models
            .get_mut(name)
            .ok_or_else(|| RepoError::UnknownModel(clip(name, 128)))?;
        // Requests already running hold their version: it shows UNLOADING until they finish.
        for state in entry.versions.values_mut() {
            if let Some(m) = state.ready() {
                *state = VersionState::Unloading(Arc::downgrade(m));
            }
        }
        entry.reason = "unloaded".into();
        Ok(())
    }
}

/// `(version, path of model.onnx)` for each numeric version folder of a model.
fn versions_on_disk(dir: &Path) -> Result<Vec<(u64, PathBuf)>, RepoError> {
    let rd = std::fs::read_dir(dir).map_err(|source| RepoError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let mut out: Vec<(u64, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u64 = e.file_name().to_str()?.parse().ok()?;
            let f = e.path().join(MODEL_FILE);
            f.is_file().then_some((v, f))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Holds one of the `max_concurrent_loads` load slots.
struct LoadSlot<'a>(&'a AtomicUsize);

impl<'a> LoadSlot<'a> {
    fn take(running: &'a AtomicUsize, max: usize) -> Result<Self, RepoError> {
        running
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map(|_| LoadSlot(running))
            .map_err(|n| RepoError::Busy { running: n })
    }
}

impl Drop for LoadSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Writes `dir/file` so that a reader (or a restart after a kill at any point) sees the old
/// file or the new one: a temporary name unique to this write, fsync, rename over the target,
/// fsync of the folder so the rename itself is durable.
fn write_atomically(dir: &Path, file: &str, bytes: &[u8]) -> Result<(), RepoError> {
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| RepoError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = dir.join(format!(
        ".{file}.{}.{}.tmp",
        std::process::id(),
        WRITES.fetch_add(1, Ordering::Relaxed)
    ));
    let target = dir.join(file);
    let written = (|| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &target).map_err(io(&target))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}
