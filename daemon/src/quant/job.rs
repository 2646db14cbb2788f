//! One quantization run, end to end: the float version's model → the strategy's observations →
//! calibration → the strategy's plan → the quantized model, checked on held-out samples → a
//! new version of the model in the repository, with its report.
//!
//! The float version keeps serving throughout. The new version becomes visible only complete:
//! the report is written into a fresh version folder first, then the model is checked,
//! compiled and written atomically by the repository's load, and only then served. A run that
//! fails removes its folder; a run killed midway leaves a folder without `model.onnx`, which
//! is not a version (and whose number is never reused).

// Model and request data reach this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use super::{
    adaptive::{Adaptive, Policy},
    apply::{self, Applied},
    calibrate::{Calibrator, ObserverFactory},
    data::Sample,
    evaluate::Heldout,
    prepare,
    reconstruct::Grams,
    report::{self, Report},
    view::{Facts, View},
    QuantError,
};
use crate::{
    graph::{self, Model},
    plugin::LoadedPlugin,
    registry::Registry,
    repo::Repository,
};
use opreg_sdk::{
    abi_stable::{
        sabi_trait::TD_Opaque,
        std_types::{RResult, RSome},
        RRef,
    },
    quant::{FfiEvaluator, FfiEvaluator_TO, KeyValue},
    Device, Evaluation, GraphPlan, Observation, PluginError, QuantRequest, TensorObservation,
    TimedEvaluation,
};
use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{atomic::AtomicU32, Arc},
    time::Instant,
};

/// The strategy name that picks one by the model's kind.
pub const AUTO: &str = "auto";

/// Held-out samples taken from the calibration stream when no evaluation set is given: every
/// `HELDOUT_EVERY`-th sample, at most `MAX_HELDOUT`.
const HELDOUT_EVERY: u64 = 5;
const MAX_HELDOUT: usize = 16;

/// What to quantize, and how.
#[derive(Clone, Debug)]
pub struct Request {
    pub model: String,
    /// `""`: the newest ready version.
    pub version: String,
    pub strategy: String,
    pub options: Vec<(String, String)>,
}

/// One sample of the stream: calibration data, or held-out data for the evaluation.
pub struct Incoming {
    pub sample: Sample,
    pub heldout: bool,
}

/// Most held-out samples a run keeps (they are kept whole, unlike calibration samples).
pub const MAX_EXPLICIT_HELDOUT: usize = 256;

/// Progress, for the caller's display.
#[derive(Clone, Debug)]
pub enum Progress {
    /// A stage started.
    Stage(String),
    /// Calibration samples done so far.
    Calibrated(u64),
}

/// The result of a run.
pub struct Outcome {
    pub report: Report,
    /// Where the new version's folder is (none without a repository folder).
    pub dir: Option<PathBuf>,
    pub model_bytes: usize,
}

/// Where the strategy lives.
pub(super) struct Strategy {
    plugin: Arc<LoadedPlugin>,
    index: usize,
    minor: u32,
}

pub(super) fn find_strategy(registry: &Registry, name: &str) -> Result<Strategy, QuantError> {
    let snapshot = registry.snapshot();
    for plugin in snapshot.plugins.values() {
        if let Some(index) = plugin.quantizers.iter().position(|q| q.desc.name == name) {
            let minor = plugin
                .abi_version
                .split('.')
                .nth(1)
                .and_then(|m| m.parse().ok())
                .unwrap_or(0);
            return Ok(Strategy {
                plugin: plugin.clone(),
                index,
                minor,
            });
        }
    }
    Err(QuantError::UnknownStrategy(name.into()))
}

/// The host's evaluator of candidate plans (see [`opreg_sdk::Evaluator`]).
struct HostEvaluator<'a> {
    model: &'a Model,
    grams: &'a Grams<'a>,
    /// The served model's name (for messages).
    model_name: &'a str,
    heldout: &'a Heldout,
    registry: &'a Registry,
    devices: &'a [Device],
    max_folded: usize,
    strategy: &'a str,
    calls: AtomicU32,
}

impl HostEvaluator<'_> {
    /// `plan` applied to the float model and compiled; `served` also runs the standard passes a
    /// loaded version gets (for timing: the candidate as it would be served).
    fn compile(&self, plan: &GraphPlan, served: bool) -> Result<graph::Plan, QuantError> {
        let mut applied = apply::apply_with(self.model, plan, self.strategy, self.grams)
            .map_err(|e| e.of_model(self.model_name))?;
        if served {
            graph::optimize(&mut applied.model)?;
        }
        Ok(graph::compile(
            &applied.model,
            self.registry.snapshot(),
            self.devices,
            self.max_folded,
        )?)
    }

    fn evaluate_plan(&self, plan: &GraphPlan) -> Result<(Evaluation, Option<f64>), QuantError> {
        self.heldout.compare(&self.compile(plan, false)?)
    }

    fn evaluate_timed_plan(&self, plan: &GraphPlan) -> Result<TimedEvaluation, QuantError> {
        let compiled = self.compile(plan, true)?;
        let (evaluation, _) = self.heldout.compare(&compiled)?;
        let (latency_ms, passes) = self.heldout.time(&compiled)?;
        Ok(TimedEvaluation {
            evaluation,
            latency_ms,
            passes,
            flags: 0,
        })
    }
}

impl FfiEvaluator for HostEvaluator<'_> {
    fn evaluate(&self, plan: &GraphPlan) -> RResult<Evaluation, PluginError> {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.evaluate_plan(plan)
            .map(|(e, _)| e)
            .map_err(|e| PluginError::invalid(e.to_string()))
            .into()
    }

    fn evaluate_timed(&self, plan: &GraphPlan) -> RResult<TimedEvaluation, PluginError> {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.evaluate_timed_plan(plan)
            .map_err(|e| PluginError::invalid(e.to_string()))
            .into()
    }
}

/// One strategy's part of a run, shared by a quantization job and an adaptive model's
/// re-derivation: which tensors to observe, the calibration, the plan.
pub(super) struct Planner<'a> {
    /// The served model's name (for messages).
    pub model_name: &'a str,
    pub strategy: &'a Strategy,
    /// The strategy's name (for messages).
    pub name: &'a str,
    pub options: Vec<KeyValue>,
    pub registry: &'a Registry,
    pub devices: &'a [Device],
    pub max_folded: usize,
}

impl Planner<'_> {
    fn quantizer(&self) -> Result<&opreg_sdk::module::QuantizerRegistration, QuantError> {
        self.strategy
            .plugin
            .quantizers
            .get(self.strategy.index)
            .ok_or_else(|| QuantError::UnknownStrategy(self.name.into()))
    }

    fn strategy_err(&self, e: PluginError) -> QuantError {
        QuantError::Strategy {
            strategy: self.name.into(),
            code: e.code,
            message: e.message.to_string(),
        }
    }

    /// The tensors the strategy observes on `model` (prepared), and how.
    pub fn observations(&self, model: &Model) -> Result<Vec<TensorObservation>, QuantError> {
        let quantizer = self.quantizer()?;
        let view = View::new(model, &Facts::new());
        let asked: Vec<TensorObservation> = quantizer
            .quantizer
            .observe(&view.graph(), self.options.as_slice().into())
            .into_result()
            .map_err(|e| self.strategy_err(e))?
            .into_iter()
            .collect();
        if !asked.is_empty() {
            return Ok(asked);
        }
        // The host's default (1.0 strategies): every activation of the products, observed as
        // the strategy's `observation()` says.
        let how: Observation = quantizer.quantizer.observation();
        Ok(view
            .graph()
            .activations_of(&["Conv", "MatMul", "Gemm"])
            .into_iter()
            .map(|n| TensorObservation::new(n, how))
            .collect())
    }

    /// `model` compiled to observe `observations`.
    pub fn calibrator(
        &self,
        model: &Model,
        observations: &[TensorObservation],
    ) -> Result<Calibrator, QuantError> {
        // The strategy's own observers: made through its plugin, which the factory keeps
        // loaded for as long as the calibrator holds them.
        let plugin = Arc::clone(&self.strategy.plugin);
        let index = self.strategy.index;
        let options = self.options.clone();
        let strategy = self.name.to_string();
        let factory: ObserverFactory = Box::new(move |tensor, observation| {
            let q = plugin
                .quantizers
                .get(index)
                .ok_or_else(|| QuantError::UnknownStrategy(strategy.clone()))?;
            q.quantizer
                .observer(tensor.into(), observation, options.as_slice().into())
                .into_result()
                .map_err(|e| QuantError::Strategy {
                    strategy: strategy.clone(),
                    code: e.code,
                    message: format!("observer of '{tensor}': {}", e.message),
                })
        });
        Calibrator::new(
            model,
            observations,
            self.registry.snapshot(),
            self.devices,
            self.max_folded,
            self.name,
            Some(factory),
        )
    }

    /// The strategy's plan from `calibrator`'s statistics; its evaluator measures candidates
    /// on `heldout`. Also returns the statistics the strategy saw.
    pub fn plan(
        &self,
        model: &Model,
        calibrator: &Calibrator,
        heldout: &Heldout,
    ) -> Result<(GraphPlan, Vec<opreg_sdk::TensorStats>), QuantError> {
        let quantizer = self.quantizer()?;
        let facts = calibrator.facts();
        let mut stats = calibrator.stats();
        if self.strategy.minor < 2 {
            // 1.0/1.1 strategies read weights from their statistics (copies).
            add_weight_stats(model, &mut stats);
        }
        let request = QuantRequest {
            tensors: stats.clone().into_iter().collect(),
            options: self.options.iter().cloned().collect(),
        };
        let grams = calibrator.grams();
        let evaluator = HostEvaluator {
            model,
            grams: &grams,
            model_name: self.model_name,
            heldout,
            registry: self.registry,
            devices: self.devices,
            max_folded: self.max_folded,
            strategy: self.name,
            calls: AtomicU32::new(0),
        };
        let view = View::new(model, &facts);
        let observed = calibrator.observer_outputs()?;
        let ffi = FfiEvaluator_TO::from_ptr(RRef::new(&evaluator), TD_Opaque);
        let plan = quantizer
            .quantizer
            .plan_observed(&view.graph(), &request, observed.as_slice().into(), ffi)
            .into_result()
            .map_err(|e| self.strategy_err(e))?;
        Ok((plan, stats))
    }
}

/// Runs one quantization. `samples` yields the samples (read or received one at a time):
/// held-out ones form the evaluation set; without any, every fifth calibration sample is held
/// out, up to 16. `cancelled` is polled between samples. Blocking: call it on the compute
/// pool.
pub fn run(
    req: &Request,
    samples: &mut dyn Iterator<Item = Result<Incoming, QuantError>>,
    registry: &Registry,
    repo: &Repository,
    progress: &mut dyn FnMut(Progress),
    cancelled: &dyn Fn() -> bool,
) -> Result<Outcome, QuantError> {
    let started = Instant::now();
    let served = repo.get(&req.model, &req.version)?;
    let devices = served.settings.devices()?;
    let max_folded = usize::try_from(repo.limits().max_folded_bytes).unwrap_or(usize::MAX);
    // `auto`: static for convolutional models, dynamic for the rest (transformers, RNNs),
    // where run-time ranges beat any calibrated one (measured: README, "Quantization").
    let resolved;
    let req = if req.strategy == AUTO {
        let conv = served
            .model
            .nodes
            .iter()
            .any(|n| n.domain.is_empty() && n.op_type == "Conv");
        resolved = Request {
            strategy: if conv {
                "quant-static"
            } else {
                "quant-dynamic"
            }
            .into(),
            ..req.clone()
        };
        &resolved
    } else {
        req
    };
    let strategy = find_strategy(registry, &req.strategy)?;
    let planner = Planner {
        model_name: &req.model,
        strategy: &strategy,
        name: &req.strategy,
        options: req
            .options
            .iter()
            .map(|(k, v)| KeyValue {
                key: k.as_str().into(),
                value: v.as_str().into(),
            })
            .collect(),
        registry,
        devices: &devices,
        max_folded,
    };

    progress(Progress::Stage("preparing".into()));
    let model = prepare::prepare(&*served.full_model()?);
    let observations = planner.observations(&model)?;

    progress(Progress::Stage("calibrating".into()));
    let mut calibrator = planner.calibrator(&model, &observations)?;
    let mut explicit_heldout = false;
    let mut heldout = Vec::new();
    let mut seen = 0u64;
    // Samples wait here until there is one per calibration lane (they run side by side).
    let mut pending = Vec::new();
    for incoming in samples {
        if cancelled() {
            return Err(QuantError::Cancelled);
        }
        let Incoming {
            sample,
            heldout: held,
        } = incoming?;
        super::data::check(&sample, &served.model.inputs)?;
        if held {
            if !explicit_heldout {
                explicit_heldout = true;
                heldout.clear();
            }
            if heldout.len() >= MAX_EXPLICIT_HELDOUT {
                return Err(QuantError::Data(format!(
                    "more than {MAX_EXPLICIT_HELDOUT} held-out samples: batch them"
                )));
            }
            heldout.push(sample);
            continue;
        }
        seen += 1;
        if !explicit_heldout && seen.is_multiple_of(HELDOUT_EVERY) && heldout.len() < MAX_HELDOUT {
            heldout.push(sample);
            continue;
        }
        pending.push(sample);
        if pending.len() >= calibrator.lanes() {
            calibrator.feed(&pending)?;
            pending.clear();
            progress(Progress::Calibrated(calibrator.samples()));
        }
    }
    if !pending.is_empty() {
        calibrator.feed(&pending)?;
        progress(Progress::Calibrated(calibrator.samples()));
    }
    if calibrator.samples() == 0 {
        return Err(QuantError::EmptyCalibration);
    }
    let calibration_seconds = started.elapsed().as_secs_f64();

    progress(Progress::Stage("planning".into()));
    let float_plan = graph::compile(&model, registry.snapshot(), &devices, max_folded)?;
    let heldout = Heldout::new(&float_plan, heldout)?;
    let (plan, stats) = planner.plan(&model, &calibrator, &heldout)?;
    let adaptive = (plan.flags & GraphPlan::ADAPTIVE != 0)
        .then(|| Policy::from_plan(&req.strategy, &req.options, &plan))
        .transpose()?;

    progress(Progress::Stage("applying".into()));
    let mut applied = apply::apply_with(&model, &plan, &req.strategy, &calibrator.grams())
        .map_err(|e| e.of_model(&req.model))?;
    applied.notes.extend(calibrator.skipped().iter().cloned());
    let quantized_plan = graph::compile(&applied.model, registry.snapshot(), &devices, max_folded)?;
    progress(Progress::Stage("evaluating".into()));
    let (error, accuracy) = heldout.compare(&quantized_plan)?;

    let exported = graph::export(&applied.model, None)?;
    let version = repo
        .model_dir(&req.model)
        .map(|_| repo.next_version(&req.model));
    let mut report = build_report(
        req,
        &served,
        &strategy,
        &applied,
        &plan,
        &stats,
        Summary {
            version,
            samples: calibrator.samples(),
            heldout: heldout.samples.len(),
            seconds: calibration_seconds,
            statistics_bytes: calibrator.stats_bytes(),
            error,
            accuracy: heldout.float_accuracy.zip(accuracy),
        },
    );

    progress(Progress::Stage("saving".into()));
    let dir = match (repo.model_dir(&req.model), version) {
        (Some(model_dir), Some(v)) => {
            let dir = model_dir.join(v.to_string());
            let saved = save(&dir, &mut report, &stats)
                .and_then(|()| match &adaptive {
                    Some(policy) => Adaptive::save(&dir, &model, policy),
                    None => Ok(()),
                })
                .and_then(|()| {
                    repo.load(
                        &req.model,
                        [(v, exported.model.clone())].into_iter().collect(),
                        registry,
                    )
                    .map_err(QuantError::from)
                });
            if let Err(e) = saved {
                // Never leave a half-written version behind.
                if !dir.join(crate::repo::MODEL_FILE).exists() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                return Err(e);
            }
            Some(dir)
        }
        _ => None,
    };
    Ok(Outcome {
        report,
        dir,
        model_bytes: exported.model.len(),
    })
}

fn add_weight_stats(model: &Model, stats: &mut Vec<opreg_sdk::TensorStats>) {
    use opreg_sdk::abi_stable::std_types::{RString, RVec};
    let mut names: Vec<&String> = model
        .nodes
        .iter()
        .filter(|n| n.domain.is_empty() && matches!(n.op_type.as_str(), "Conv" | "MatMul"))
        .filter_map(|n| n.inputs.get(1))
        .filter(|w| model.initializers.contains_key(*w))
        .collect();
    names.sort();
    names.dedup();
    for name in names {
        let Some(t) = model.initializers.get(name) else {
            continue;
        };
        let Ok(values) = t.to_vec::<f32>() else {
            continue;
        };
        let (min, max) = values
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        let Ok(owned) = opreg_sdk::OwnedTensor::from_vec(t.shape().to_vec(), values) else {
            continue;
        };
        stats.push(opreg_sdk::TensorStats {
            name: RString::from(name.as_str()),
            dtype: t.dtype(),
            is_weight: true,
            min,
            max,
            histogram: RVec::new(),
            hist_max: 0.0,
            weight: RSome(owned),
        });
    }
}

/// True when `name` is a node of the quantized model (figures about nodes, not tensors).
fn served_or_prepared_node(applied: &Applied, name: &str) -> bool {
    applied.model.nodes.iter().any(|n| n.name == name)
}

struct Summary {
    version: Option<u64>,
    samples: u64,
    heldout: usize,
    seconds: f64,
    statistics_bytes: usize,
    error: Evaluation,
    accuracy: Option<(f64, f64)>,
}

fn build_report(
    req: &Request,
    served: &crate::repo::ServedModel,
    strategy: &Strategy,
    applied: &Applied,
    plan: &GraphPlan,
    stats: &[opreg_sdk::TensorStats],
    s: Summary,
) -> Report {
    let mut figures: BTreeMap<&str, BTreeMap<String, f64>> = BTreeMap::new();
    for a in plan.annotations.iter() {
        if a.value.is_finite() {
            figures
                .entry(a.subject.as_str())
                .or_default()
                .insert(a.key.to_string(), a.value);
        }
    }
    let layers = figures
        .iter()
        .filter(|(subject, _)| served_or_prepared_node(applied, subject))
        .map(|(subject, f)| report::LayerReport {
            node: subject.to_string(),
            figures: f.clone(),
        })
        .collect();
    let tensors = applied
        .tensors
        .iter()
        .map(|t| {
            let st = stats
                .iter()
                .find(|x| x.name.as_str() == t.name && !x.is_weight);
            report::TensorReport {
                name: t.name.clone(),
                role: t.role.into(),
                dtype: t.dtype.clone(),
                axis: t.axis,
                scales: t.scales.clone(),
                zero_points: t.zero_points.clone(),
                min: st.map(|x| x.min),
                max: st.map(|x| x.max),
                figures: figures.get(t.name.as_str()).cloned().unwrap_or_default(),
            }
        })
        .collect();
    Report {
        model: req.model.clone(),
        source_version: served.version,
        version: s.version,
        strategy: req.strategy.clone(),
        plugin: format!(
            "{} {} (abi {})",
            strategy.plugin.name, strategy.plugin.version, strategy.plugin.abi_version
        ),
        options: req.options.iter().cloned().collect(),
        calibration: report::Calibration {
            samples: s.samples,
            heldout_samples: s.heldout,
            seconds: s.seconds,
            statistics_bytes: s.statistics_bytes,
        },
        tensors,
        pruning: applied.pruning.clone(),
        layers,
        nodes: report::Nodes {
            total: served.model.nodes.len(),
            quantized: applied.quantized_nodes.clone(),
            excluded: applied.excluded_nodes.clone(),
            lowered: applied.lowered_nodes.iter().cloned().collect(),
        },
        error: report::Error {
            sqnr_db: s.error.sqnr_db.is_finite().then_some(s.error.sqnr_db),
            max_abs: s.error.max_abs,
            cosine: s.error.cosine,
            samples: s.error.samples,
        },
        accuracy: s
            .accuracy
            .map(|(float, quantized)| report::Accuracy { float, quantized }),
        notes: applied.notes.clone(),
        strategy_notes: plan.notes.to_string(),
        plots: Vec::new(),
    }
}

/// Writes the report and its plots into the new version's folder `dir` (created here).
fn save(
    dir: &std::path::Path,
    report: &mut Report,
    stats: &[opreg_sdk::TensorStats],
) -> Result<(), QuantError> {
    let io = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| QuantError::Io { path, source }
    };
    let qdir = dir.join("quantization");
    std::fs::create_dir_all(qdir.join("histograms")).map_err(io(&qdir))?;
    let mut plots = Vec::new();
    for (i, st) in stats.iter().filter(|s| !s.histogram.is_empty()).enumerate() {
        let threshold = report
            .tensors
            .iter()
            .find(|t| t.name == st.name.as_str())
            .and_then(|t| t.figures.get("threshold").copied());
        let svg = report::histogram_svg(&st.name, &st.histogram, st.hist_max, threshold);
        let rel = report::plot_name(i, &st.name);
        let path = qdir.join(&rel);
        std::fs::write(&path, svg).map_err(io(&path))?;
        plots.push(format!("quantization/{rel}"));
    }
    let sensitivity: Vec<(String, f64)> = report
        .layers
        .iter()
        .filter_map(|l| Some((l.node.clone(), *l.figures.get("sensitivity_db")?)))
        .collect();
    if !sensitivity.is_empty() {
        let rel = "sensitivity.svg";
        let path = qdir.join(rel);
        std::fs::write(&path, report::sensitivity_svg(&sensitivity)).map_err(io(&path))?;
        plots.push(format!("quantization/{rel}"));
    }
    report.plots = plots;
    let path = qdir.join("report.json");
    std::fs::write(&path, report.to_json()).map_err(io(&path))?;
    Ok(())
}
