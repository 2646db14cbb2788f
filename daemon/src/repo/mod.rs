//! The model repository: a Triton-like folder, `<repo>/<model>/<version>/model.onnx` with an
//! optional `<repo>/<model>/config.toml`, and the models loaded from it.
//!
//! Models submitted over gRPC are checked (imported and compiled) before anything is written,
//! then written atomically (temporary file + rename), so a restart serves them again and a
//! bad upload leaves the repository as it was.

mod model;

pub use model::{ModelSettings, ServedModel};

use crate::{graph, registry::Registry};
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
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
    #[error("invalid model name '{0}': use letters, digits, '-', '_' and '.'")]
    BadName(String),
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
}

/// One model's entry in the index.
#[derive(Clone)]
pub struct Entry {
    pub versions: BTreeMap<u64, Arc<ServedModel>>,
    pub state: &'static str,
    pub reason: String,
}

pub struct Repository {
    root: Option<PathBuf>,
    models: RwLock<BTreeMap<String, Entry>>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl Repository {
    pub fn new(root: Option<PathBuf>) -> Self {
        Repository {
            root,
            models: RwLock::new(BTreeMap::new()),
        }
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
            .ok_or_else(|| RepoError::UnknownModel(name.into()))?;
        let not_ready = || RepoError::NotReady {
            name: name.into(),
            version: (!version.is_empty()).then(|| version.to_string()),
        };
        if entry.state != "READY" {
            return Err(not_ready());
        }
        if version.is_empty() {
            return entry
                .versions
                .values()
                .next_back()
                .cloned()
                .ok_or_else(not_ready);
        }
        let v: u64 = version.parse().map_err(|_| not_ready())?;
        entry.versions.get(&v).cloned().ok_or_else(not_ready)
    }

    /// The loaded versions of `name` (in memory only: no repository I/O on a request path).
    pub fn versions(&self, name: &str) -> Vec<u64> {
        self.read()
            .get(name)
            .map(|e| e.versions.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Every model known, loaded or not.
    pub fn index(&self) -> Vec<(String, Entry)> {
        let mut out: BTreeMap<String, Entry> = self.read().clone();
        if let Ok(names) = self.on_disk() {
            for n in names {
                out.entry(n).or_insert(Entry {
                    versions: BTreeMap::new(),
                    state: "UNAVAILABLE",
                    reason: "not loaded".into(),
                });
            }
        }
        out.into_iter().collect()
    }

    /// Every ready model version.
    pub fn ready(&self) -> Vec<Arc<ServedModel>> {
        self.read()
            .values()
            .filter(|e| e.state == "READY")
            .flat_map(|e| e.versions.values().cloned())
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
        if !valid_name(name) {
            return Err(RepoError::BadName(name.into()));
        }
        let result = self.load_inner(name, files, registry);
        if let Err(e) = &result {
            // A failed reload keeps serving what was ready; a failed first load is recorded.
            let mut models = self.write();
            let entry = models.entry(name.to_string()).or_insert(Entry {
                versions: BTreeMap::new(),
                state: "UNAVAILABLE",
                reason: String::new(),
            });
            if entry.versions.is_empty() {
                entry.state = "UNAVAILABLE";
                entry.reason = e.to_string();
            }
        }
        result
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
        let snapshot = registry.snapshot();
        let mut loaded = BTreeMap::new();
        if files.is_empty() {
            let dir = model_dir.ok_or(RepoError::NoRepository)?;
            for (version, path) in versions_on_disk(&dir)? {
                let bytes = std::fs::read(&path).map_err(|source| RepoError::Io {
                    path: path.clone(),
                    source,
                })?;
                let m = ServedModel::build(
                    name,
                    version,
                    &bytes,
                    path.parent(),
                    settings.clone(),
                    snapshot.clone(),
                )?;
                loaded.insert(version, Arc::new(m));
            }
            if loaded.is_empty() {
                return Err(RepoError::NoVersions(name.into()));
            }
        } else {
            // Check every submitted version before writing any of them.
            for (&version, bytes) in &files {
                let m = ServedModel::build(
                    name,
                    version,
                    bytes,
                    None,
                    settings.clone(),
                    snapshot.clone(),
                )?;
                loaded.insert(version, Arc::new(m));
            }
            if let Some(dir) = &model_dir {
                for (version, bytes) in &files {
                    write_atomically(&dir.join(version.to_string()), MODEL_FILE, bytes)?;
                }
            }
        }
        let versions: Vec<u64> = loaded.keys().copied().collect();
        let mut models = self.write();
        let entry = models.entry(name.to_string()).or_insert(Entry {
            versions: BTreeMap::new(),
            state: "READY",
            reason: String::new(),
        });
        if files.is_empty() {
            entry.versions = loaded;
        } else {
            entry.versions.extend(loaded);
        }
        entry.state = "READY";
        entry.reason.clear();
        Ok(versions)
    }

    /// Stops serving `name`; its files stay in the repository.
    pub fn unload(&self, name: &str) -> Result<(), RepoError> {
        let mut models = self.write();
        let entry = models
            .get_mut(name)
            .ok_or_else(|| RepoError::UnknownModel(name.into()))?;
        entry.versions.clear();
        entry.state = "UNAVAILABLE";
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

fn write_atomically(dir: &Path, file: &str, bytes: &[u8]) -> Result<(), RepoError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| RepoError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = dir.join(format!(".{file}.{}.tmp", std::process::id()));
    let target = dir.join(file);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, &target).map_err(io(&target))
}
