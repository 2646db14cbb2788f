//! One served model version: the imported model, its settings, its plan, its statistics.

use super::RepoError;
use crate::{
    graph::{self, Model, Plan},
    registry::Snapshot,
};
use opreg_sdk::{host::HostTensor, Device, DeviceKind};
use serde::Deserialize;
use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap, VecDeque},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

/// One request's inputs, by name (shared with the request, not copied).
pub type Feeds = HashMap<String, Arc<HostTensor>>;

/// Recent requests kept per model version for verifying a plugin swap.
const RECENT_REQUESTS: usize = 4;
/// After the first few, one request in this many is kept: a kept request's inputs stay alive
/// for its whole run (the run would otherwise release them after their last reader).
const RECENT_SAMPLE_EVERY: u64 = 16;
/// A request larger than this is not kept (bounds what a model holds for verification).
const RECENT_MAX_BYTES: usize = 16 << 20;

/// `<repo>/<model>/config.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSettings {
    /// Devices in order of preference; each node runs on the first that has a kernel for it.
    pub backends: Vec<String>,
    /// Largest batch (first dimension) a request may carry; 0: the model is not batched.
    pub max_batch_size: i32,
    /// `[pin]`: plugin name -> the build this version runs on, by version or sha256. The
    /// version loads only when that build is loaded, and stays on it when a swap replaces it
    /// (its plan keeps the pinned build mapped) until a build matching the pin is back.
    pub pin: std::collections::BTreeMap<String, String>,
    /// A folder (relative to the model's folder) of warm-up input samples, in the layout of a
    /// calibration folder: read at load (the first few), and what a plugin swap is verified on
    /// before any request was recorded.
    pub warmup: Option<std::path::PathBuf>,
    /// `[dynamic_batching]`: concurrent requests are merged along the batch dimension into
    /// one run (needs `max_batch_size` > 0).
    pub dynamic_batching: Option<DynamicBatching>,
    /// Runs of this version at once (Triton's instance count); more wait. 0: no limit.
    pub instance_count: usize,
}

/// `[dynamic_batching]` of a model's `config.toml` (Triton's names).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DynamicBatching {
    /// Batch sizes dispatched as soon as they are reached (else at `max_batch_size` or when the
    /// delay runs out).
    pub preferred_batch_sizes: Vec<usize>,
    /// How long the first request of a batch waits for others, in microseconds.
    pub max_queue_delay_us: u64,
    /// Requests waiting for a batch; more are refused with `UNAVAILABLE`.
    pub max_queue_size: usize,
}

impl Default for DynamicBatching {
    fn default() -> Self {
        DynamicBatching {
            preferred_batch_sizes: Vec::new(),
            max_queue_delay_us: 100,
            max_queue_size: 1024,
        }
    }
}

impl Default for ModelSettings {
    fn default() -> Self {
        ModelSettings {
            backends: vec!["cpu".into()],
            max_batch_size: 0,
            pin: Default::default(),
            warmup: None,
            dynamic_batching: None,
            instance_count: 0,
        }
    }
}

impl ModelSettings {
    pub fn read(path: &Path) -> Result<Self, RepoError> {
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(path).map_err(|source| RepoError::Io {
            path: path.to_owned(),
            source,
        })?;
        let s: ModelSettings = toml::from_str(&text)
            .map_err(|e| RepoError::Config(format!("{}: {e}", path.display())))?;
        s.devices()?;
        s.check_batching()
            .map_err(|why| RepoError::Config(format!("{}: {why}", path.display())))?;
        Ok(s)
    }

    /// Dynamic batching needs a batch dimension and sizes that fit it.
    fn check_batching(&self) -> Result<(), String> {
        let Some(b) = &self.dynamic_batching else {
            return Ok(());
        };
        if self.max_batch_size <= 0 {
            return Err(
                "[dynamic_batching] needs max_batch_size > 0 (the model's first dimension is its batch)"
                    .into(),
            );
        }
        let max = self.max_batch_size as usize;
        if let Some(p) = b.preferred_batch_sizes.iter().find(|&&p| p == 0 || p > max) {
            return Err(format!(
                "preferred batch size {p} is not within 1..={max} (max_batch_size)"
            ));
        }
        if b.max_queue_size == 0 {
            return Err("max_queue_size must be at least 1".into());
        }
        if b.max_queue_delay_us > 10_000_000 {
            return Err(format!(
                "max_queue_delay_us {} is over 10 s",
                b.max_queue_delay_us
            ));
        }
        Ok(())
    }

    /// Whether `snapshot` has every build this version pins; the first mismatch when not.
    pub fn pins_met(&self, snapshot: &Snapshot) -> Result<(), String> {
        for (name, want) in &self.pin {
            match snapshot.plugins.get(name) {
                None => {
                    return Err(format!(
                        "pins plugin '{name}' at '{want}', which is not loaded"
                    ))
                }
                Some(p) if p.version == *want || p.sha256.eq_ignore_ascii_case(want) => {}
                Some(p) => {
                    return Err(format!(
                        "pins plugin '{name}' at '{want}', but the loaded build is {} (sha256 {})",
                        p.version, p.sha256
                    ))
                }
            }
        }
        Ok(())
    }

    pub fn devices(&self) -> Result<Vec<Device>, RepoError> {
        let mut out: Vec<Device> = self
            .backends
            .iter()
            .map(|b| {
                DeviceKind::from_name(b)
                    .map(|kind| Device { kind, ordinal: 0 })
                    .ok_or_else(|| {
                        RepoError::Config(format!("unknown backend '{b}' (cpu, cuda, mock)"))
                    })
            })
            .collect::<Result<_, _>>()?;
        // The CPU is always the last fallback.
        if !out.contains(&Device::CPU) {
            out.push(Device::CPU);
        }
        Ok(out)
    }
}

/// Cumulative statistics in the shape of KServe's `ModelStatistics`.
#[derive(Default, Clone, Copy, Debug)]
pub struct Stats {
    pub last_inference_ms: u64,
    pub inference_count: u64,
    pub execution_count: u64,
    pub success: (u64, u64),
    pub fail: (u64, u64),
    /// Waiting for the compute pool.
    pub queue: (u64, u64),
    pub compute_input: (u64, u64),
    pub compute_infer: (u64, u64),
    pub compute_output: (u64, u64),
    /// Copy steps at device boundaries executed, and the bytes they moved.
    pub device_copies: u64,
    pub device_copy_bytes: u64,
}

pub struct ServedModel {
    pub name: String,
    pub version: u64,
    /// The graph after the standard passes. Its initializers lack those the plan freed after
    /// packing them (see [`full_model`](Self::full_model)): what reads weights goes through
    /// `full_model`; inputs, outputs and nodes are all here.
    pub model: Model,
    /// The initializers `model` lacks, and where they come back from.
    evicted: Option<Evicted>,
    pub settings: ModelSettings,
    devices: Vec<Device>,
    current: Mutex<Current>,
    max_folded_bytes: usize,
    pub stats: Mutex<Stats>,
    /// Set for a version served adaptively (its folder has `adaptive.toml`).
    pub adaptive: Option<crate::quant::adaptive::Adaptive>,
    /// The inputs of a few recent successful requests: what a plugin swap is verified on.
    recent: Mutex<VecDeque<Feeds>>,
    /// Requests offered to `recent` so far (for sampling).
    offered: std::sync::atomic::AtomicU64,
    /// The warm-up samples of its settings (verified on first).
    warmup: Vec<Feeds>,
    /// Permits for its runs when `instance_count` limits them.
    pub instances: Option<Arc<tokio::sync::Semaphore>>,
}

/// Initializers a version's plan freed once its kernels had packed them (ABI 1.8 `absorbed`,
/// [`graph::compile_owned`]): a BERT-base encoder's MatMul weights, 170 MB of its 265, are
/// otherwise held twice for the life of the version. A new plan (after a plugin swap) or a
/// quantization job needs the whole graph again: the version's file is imported once more,
/// and these are taken from it, each checked against its checksum at load.
struct Evicted {
    file: PathBuf,
    /// The file's size at load (a larger file is refused before it is read).
    len: u64,
    /// Name -> CRC-32 of its element type, shape and bytes.
    sums: BTreeMap<String, u32>,
}

/// The checksum [`Evicted`] keeps of one tensor.
fn tensor_sum(t: &HostTensor) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&t.dtype().0.to_le_bytes());
    for d in t.shape() {
        h.update(&(*d as u64).to_le_bytes());
    }
    if t.dtype() == opreg_sdk::DType::String {
        for v in t.strings() {
            h.update(&(v.len() as u64).to_le_bytes());
            h.update(v.as_bytes());
        }
    } else {
        h.update(t.bytes());
    }
    h.finalize()
}

/// A plan compiled ahead of publishing a generation, for [`ServedModel::install`].
pub struct Prepared {
    pub plan: Arc<Plan>,
    /// The graph it was compiled from (`None`: the version's own).
    source: Option<Arc<Model>>,
}

/// What requests run now: the plan, and the graph it was compiled from when an adaptive
/// version replaced `model`'s parameters (a re-bind after a plugin swap compiles that one).
struct Current {
    plan: Arc<Plan>,
    replaced: Option<Arc<Model>>,
}

impl ServedModel {
    /// Imports and compiles a model version. Blocking.
    ///
    /// `file`: where `bytes` were read from (external data is looked up beside it). A version
    /// built from a file frees the weights its plan packed (see [`Evicted`]); one built from
    /// bytes alone keeps them.
    pub fn build(
        name: &str,
        version: u64,
        bytes: graph::ModelBytes,
        file: Option<&Path>,
        settings: ModelSettings,
        snapshot: Arc<Snapshot>,
        max_folded_bytes: u64,
    ) -> Result<Self, RepoError> {
        let max_folded_bytes = usize::try_from(max_folded_bytes).unwrap_or(usize::MAX);
        let wrap = |source| RepoError::Graph {
            name: name.into(),
            version,
            source,
        };
        let len = bytes.len() as u64;
        let mut model = graph::import_owned(bytes, file.and_then(Path::parent)).map_err(wrap)?;
        // The standard passes run once per version; a re-bind after a hot swap starts from
        // their result.
        let reports = graph::optimize(&mut model).map_err(wrap)?;
        for r in reports.iter().filter(|r| r.nodes_after != r.nodes_before) {
            tracing::debug!(
                model = name,
                version,
                pass = r.pass,
                before = r.nodes_before,
                after = r.nodes_after,
                "graph pass"
            );
        }
        let devices = settings.devices()?;
        settings
            .pins_met(&snapshot)
            .map_err(|why| RepoError::Config(format!("model '{name}' version {version} {why}")))?;
        let (plan, evicted) = match file {
            Some(file) => {
                // The checksum of each weight the plan frees, taken as it lets go of it.
                let mut sums: HashMap<String, u32> = HashMap::new();
                let (plan, freed) = graph::compile_owned(
                    &mut model,
                    snapshot,
                    &devices,
                    max_folded_bytes,
                    &mut |name, t| {
                        sums.insert(name.to_string(), tensor_sum(t));
                    },
                )
                .map_err(wrap)?;
                let sums: BTreeMap<String, u32> = freed
                    .into_iter()
                    .filter_map(|n| sums.get(&n).map(|&s| (n, s)))
                    .collect();
                let evicted = (!sums.is_empty()).then(|| Evicted {
                    file: file.to_path_buf(),
                    len,
                    sums,
                });
                (plan, evicted)
            }
            None => (
                graph::compile(&model, snapshot, &devices, max_folded_bytes).map_err(wrap)?,
                None,
            ),
        };
        if let Some(e) = &evicted {
            tracing::debug!(
                model = name,
                version,
                freed = e.sums.len(),
                "weights packed by their kernels freed"
            );
        }
        // Output shapes the model leaves undeclared come from shape inference.
        for (o, inferred) in model.outputs.iter_mut().zip(&plan.output_shapes) {
            if o.shape.is_none() {
                o.shape = inferred.clone();
            }
        }
        let instances = (settings.instance_count > 0)
            .then(|| Arc::new(tokio::sync::Semaphore::new(settings.instance_count)));
        Ok(ServedModel {
            instances,
            name: name.into(),
            version,
            model,
            evicted,
            settings,
            devices,
            current: Mutex::new(Current {
                plan: Arc::new(plan),
                replaced: None,
            }),
            max_folded_bytes,
            stats: Mutex::new(Stats::default()),
            adaptive: None,
            recent: Mutex::new(VecDeque::new()),
            offered: Default::default(),
            warmup: Vec::new(),
        })
    }

    /// The plan for a request that started at `snapshot`: the current one, or a new one
    /// compiled when plugins changed since (a plan bound to an older generation is re-bound
    /// lazily, on next use, unless a swap installed one first). A plan newer than the
    /// request's snapshot serves it: the request has not started computing. Blocking.
    pub fn plan(&self, snapshot: &Arc<Snapshot>) -> Result<Arc<Plan>, RepoError> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.plan.generation() < snapshot.generation && self.pinned_away(snapshot) {
            return Ok(current.plan.clone());
        }
        if current.plan.generation() < snapshot.generation {
            let plan = self.compile(current.replaced.as_deref(), snapshot)?;
            tracing::info!(model = %self.name, version = self.version, generation = snapshot.generation, "plan re-bound to new plugins");
            let old = std::mem::replace(&mut current.plan, Arc::new(plan));
            let plan = current.plan.clone();
            drop(current);
            drop(old);
            crate::heap::release_freed();
            return Ok(plan);
        }
        Ok(current.plan.clone())
    }

    /// Compiles `source` (the version's own graph when `None`) against `snapshot`. The
    /// version's own graph, when its weights were freed, is read again ([`full_model`](Self::full_model))
    /// and frees them again as it binds.
    fn compile(&self, source: Option<&Model>, snapshot: &Arc<Snapshot>) -> Result<Plan, RepoError> {
        let wrap = |source| RepoError::Graph {
            name: self.name.clone(),
            version: self.version,
            source,
        };
        let source = match source {
            Some(m) => Cow::Borrowed(m),
            None => self.full_model()?,
        };
        match source {
            Cow::Borrowed(m) => {
                graph::compile(m, snapshot.clone(), &self.devices, self.max_folded_bytes)
                    .map_err(wrap)
            }
            Cow::Owned(mut m) => graph::compile_owned(
                &mut m,
                snapshot.clone(),
                &self.devices,
                self.max_folded_bytes,
                &mut |_, _| {},
            )
            .map(|(plan, _)| plan)
            .map_err(wrap),
        }
    }

    /// The version's whole graph: [`model`](Self::model) itself, or, when its plan freed
    /// weights, a copy sharing its tensors with the freed ones read again from the version's
    /// file (imported and passed as at load; each checked against its checksum, so a file
    /// changed since is refused rather than served as this version). Blocking.
    pub fn full_model(&self) -> Result<Cow<'_, Model>, RepoError> {
        let Some(e) = &self.evicted else {
            return Ok(Cow::Borrowed(&self.model));
        };
        let changed = |reason: String| RepoError::Changed {
            name: self.name.clone(),
            version: self.version,
            reason,
        };
        let io = |source| RepoError::Io {
            path: e.file.clone(),
            source,
        };
        let len = std::fs::metadata(&e.file).map_err(io)?.len();
        if len != e.len {
            return Err(changed(format!(
                "its file has {len} bytes, {} when it was loaded (weights freed after packing are read from it again for a new plan)",
                e.len
            )));
        }
        let bytes = graph::ModelBytes::read(&e.file, e.len).map_err(io)?;
        let wrap = |source| RepoError::Graph {
            name: self.name.clone(),
            version: self.version,
            source,
        };
        let mut fresh = graph::import_owned(bytes, e.file.parent()).map_err(wrap)?;
        graph::optimize(&mut fresh).map_err(wrap)?;
        let mut full = self.model.clone();
        for (name, &sum) in &e.sums {
            let t = fresh
                .initializers
                .remove(name)
                .filter(|t| tensor_sum(t) == sum)
                .ok_or_else(|| {
                    changed(format!(
                        "its file no longer holds the weights '{name}' it was loaded with (freed after packing, read again for a new plan)"
                    ))
                })?;
            full.initializers.insert(name.clone(), t);
        }
        Ok(Cow::Owned(full))
    }

    /// Whether `snapshot` lacks a build this version pins: it then stays on its plan.
    pub fn pinned_away(&self, snapshot: &Snapshot) -> bool {
        self.settings.pins_met(snapshot).is_err()
    }

    /// A plan for `snapshot`, compiled but not installed (a swap verifies it first). Blocking.
    pub fn prepare(&self, snapshot: &Arc<Snapshot>) -> Result<Prepared, RepoError> {
        let source = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replaced
            .clone();
        let plan = self.compile(source.as_deref(), snapshot)?;
        Ok(Prepared {
            plan: Arc::new(plan),
            source,
        })
    }

    /// Serves `prepared` from the next request on, unless the version's graph was replaced
    /// (an adaptive update) since it was compiled or a newer plan is in place: then the next
    /// request re-binds as usual.
    pub fn install(&self, prepared: Prepared) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let same_source = match (&current.replaced, &prepared.source) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        if same_source && current.plan.generation() < prepared.plan.generation() {
            current.plan = prepared.plan;
        }
    }

    /// Whether to keep this request's inputs for verifying swaps: the first few requests,
    /// then one in [`RECENT_SAMPLE_EVERY`].
    pub fn sample_for_swaps(&self) -> bool {
        let n = self
            .offered
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        n < RECENT_REQUESTS as u64 || n.is_multiple_of(RECENT_SAMPLE_EVERY)
    }

    /// Keeps the inputs of a request that succeeded for verifying swaps (the last few kept,
    /// each under a size bound; shared with the request, not copied).
    pub fn remember(&self, feeds: &Feeds) {
        let bytes: usize = feeds.values().map(|t| t.byte_len()).sum();
        if bytes > RECENT_MAX_BYTES {
            return;
        }
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() >= RECENT_REQUESTS {
            recent.pop_front();
        }
        recent.push_back(feeds.clone());
    }

    /// Reads the warm-up samples of the settings' `warmup` folder (relative to `model_dir`):
    /// the first few entries, each checked against the model's inputs and size-bounded.
    pub fn read_warmup(&mut self, model_dir: &Path) -> Result<(), RepoError> {
        let Some(rel) = &self.settings.warmup else {
            return Ok(());
        };
        let dir = model_dir.join(rel);
        let bad = |e: crate::quant::QuantError| {
            RepoError::Config(format!(
                "model '{}' version {}: warm-up samples in {}: {e}",
                self.name,
                self.version,
                dir.display()
            ))
        };
        let mut samples = Vec::new();
        for entry in crate::quant::data::entries(&dir)
            .map_err(bad)?
            .iter()
            .take(RECENT_REQUESTS)
        {
            let sample = crate::quant::data::read(entry, &self.model.inputs).map_err(bad)?;
            crate::quant::data::check(&sample, &self.model.inputs).map_err(bad)?;
            let bytes: usize = sample.feeds.values().map(|t| t.byte_len()).sum();
            if bytes > RECENT_MAX_BYTES {
                return Err(RepoError::Config(format!(
                    "model '{}' version {}: warm-up sample {} has {bytes} bytes, more than {RECENT_MAX_BYTES}",
                    self.name, self.version, sample.origin
                )));
            }
            samples.push(sample.feeds);
        }
        self.warmup = samples;
        Ok(())
    }

    /// The warm-up samples from the settings.
    pub fn warmup_inputs(&self) -> &[Feeds] {
        &self.warmup
    }

    /// The inputs of recent requests, oldest first.
    pub fn recent_inputs(&self) -> Vec<Feeds> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.iter().cloned().collect()
    }

    /// The current plan, whatever its generation (for describing placement).
    pub fn current_plan(&self) -> Arc<Plan> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .plan
            .clone()
    }

    /// Serves `plan`, compiled from `model` (the same inputs and outputs as this version's,
    /// other parameters), from the next request on; requests running keep theirs.
    pub fn replace(&self, model: Arc<Model>, plan: Arc<Plan>) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        *current = Current {
            plan,
            replaced: Some(model),
        };
    }

    pub fn record(&self, f: impl FnOnce(&mut Stats)) {
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
    }
}
