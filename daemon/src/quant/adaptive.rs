//! Adaptive serving: an int8 model whose activation ranges follow its live traffic.
//!
//! A strategy marks its plan [`GraphPlan::ADAPTIVE`] (`quant-adaptive` does). The quantization
//! job then writes two more files into the new version's folder: `float.onnx`, the float model
//! the plan was made on, and `adaptive.toml`, the [`Policy`]. A version loaded with them serves
//! its int8 model as usual and, on the side:
//!
//! 1. **Samples** its requests: every `sample_every`-th request's inputs join a window of the
//!    most recent `window` samples (at most `max_window_bytes`; the window shares the request's
//!    tensors, it does not copy them).
//! 2. **Checks** after every `check_every` samples, on the compute pool, one check at a time
//!    per version, never on a request's path: the strategy observes and plans again, over the
//!    window (calibration runs the float model), and the new activation ranges are compared
//!    with the served ones. The drift is the largest move of a range's end, as a fraction of
//!    the served range (0.5: an end moved by half the range).
//! 3. **Verifies** a plan whose drift passes `drift`: the candidate int8 model and the served
//!    one both run the window, against the float model; the candidate must gain at least
//!    `min_gain_db` of output SQNR.
//! 4. **Swaps** it in: the served version's plan is replaced under its lock. Requests running
//!    finish on the plan they started with; none is dropped or fails.
//!
//! Re-derived parameters live in memory only: after a restart the version starts again from
//! the calibrated ones in `model.onnx` (the file a client downloaded stays what it was), and
//! re-adapts at its first check if the traffic is still drifted. Cost: a check runs the float
//! model twice and the int8 models once over the window, so `sample_every × check_every`
//! requests pay for `4 × window` runs; the defaults spend about 1 % of the serving work.

// Request and model data reach this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use super::{
    apply,
    data::Sample,
    evaluate::Heldout,
    job::{find_strategy, Planner},
    QuantError,
};
use crate::{
    app::App,
    graph::{self, Model},
    repo::{RepoError, ServedModel},
};
use opreg_sdk::{host::HostTensor, DType, DirectiveKind, GraphPlan};
use serde::{Deserialize, Serialize};
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

/// The policy's file in an adaptive version's folder.
pub const POLICY_FILE: &str = "adaptive.toml";
/// The float model an adaptive version re-derives its parameters from.
pub const FLOAT_FILE: &str = "float.onnx";
/// The subject of the annotations in which a strategy sets the policy.
pub const POLICY_SUBJECT: &str = "adaptive";

/// How an adaptive version follows its traffic (`adaptive.toml`; editable, read at load).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// The strategy that re-derives the parameters, and its options.
    pub strategy: String,
    pub options: Vec<(String, String)>,
    /// Largest move of an activation range's end, as a fraction of the served range, that is
    /// still not drift.
    pub drift: f64,
    /// Recent samples kept.
    pub window: usize,
    /// One request in this many is sampled.
    pub sample_every: u64,
    /// Samples between two checks.
    pub check_every: u64,
    /// Output SQNR a candidate must gain over the served parameters, in dB.
    pub min_gain_db: f64,
    /// Most bytes the window holds; a larger request is not sampled.
    pub max_window_bytes: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            strategy: "quant-adaptive".into(),
            options: Vec::new(),
            drift: 0.5,
            window: 64,
            sample_every: 16,
            check_every: 64,
            min_gain_db: 1.0,
            max_window_bytes: 64 << 20,
        }
    }
}

impl Policy {
    /// The policy a plan asks for: the host's defaults, with the strategy's annotations on
    /// [`POLICY_SUBJECT`] over them.
    pub fn from_plan(
        strategy: &str,
        options: &[(String, String)],
        plan: &GraphPlan,
    ) -> Result<Policy, QuantError> {
        let mut p = Policy {
            strategy: strategy.into(),
            options: options.to_vec(),
            ..Policy::default()
        };
        let bad = |reason: String| QuantError::BadPlan {
            strategy: strategy.into(),
            reason,
        };
        for a in plan
            .annotations
            .iter()
            .filter(|a| a.subject.as_str() == POLICY_SUBJECT)
        {
            let v = a.value;
            let count = || {
                (v.is_finite() && v >= 1.0 && v.fract() == 0.0)
                    .then_some(v as u64)
                    .ok_or_else(|| bad(format!("adaptive policy {}={v}: not a count", a.key)))
            };
            match a.key.as_str() {
                "drift" => p.drift = v,
                "min_gain_db" => p.min_gain_db = v,
                "window" => p.window = usize::try_from(count()?).unwrap_or(usize::MAX),
                "sample_every" => p.sample_every = count()?,
                "check_every" => p.check_every = count()?,
                "max_window_bytes" => p.max_window_bytes = count()?,
                other => return Err(bad(format!("unknown adaptive policy key '{other}'"))),
            }
        }
        p.check().map_err(bad)?;
        Ok(p)
    }

    fn check(&self) -> Result<(), String> {
        if !(self.drift.is_finite() && self.drift > 0.0) {
            return Err(format!("drift={}: expected a positive number", self.drift));
        }
        if !(self.min_gain_db.is_finite() && self.min_gain_db >= 0.0) {
            return Err(format!(
                "min_gain_db={}: expected 0 or more",
                self.min_gain_db
            ));
        }
        if !(1..=MAX_WINDOW).contains(&self.window) {
            return Err(format!("window={}: expected 1..={MAX_WINDOW}", self.window));
        }
        if self.sample_every == 0 || self.check_every == 0 || self.max_window_bytes == 0 {
            return Err("sample_every, check_every and max_window_bytes must be 1 or more".into());
        }
        Ok(())
    }

    /// Reads and checks `dir`'s policy file.
    fn read(dir: &Path) -> Result<Policy, RepoError> {
        let path = dir.join(POLICY_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| RepoError::Io {
            path: path.clone(),
            source,
        })?;
        let p: Policy = toml::from_str(&text)
            .map_err(|e| RepoError::Config(format!("{}: {e}", path.display())))?;
        p.check()
            .map_err(|e| RepoError::Config(format!("{}: {e}", path.display())))?;
        Ok(p)
    }

    /// The policy file's text.
    pub fn to_toml(&self) -> String {
        // A struct of plain fields always serializes.
        toml::to_string(self).unwrap_or_default()
    }
}

/// Most samples a window may keep (each is a whole request).
const MAX_WINDOW: usize = 4096;

/// An activation's served range: `[lo, hi]`, the values its scale and zero point represent.
type Ranges = BTreeMap<String, (f64, f64)>;

/// The activation ranges a plan gives (per-tensor directives of non-weights).
fn plan_ranges(plan: &GraphPlan, float: &Model) -> Ranges {
    plan.tensors
        .iter()
        .filter(|t| {
            t.directive.kind == DirectiveKind::PER_TENSOR
                && !float.initializers.contains_key(t.name.as_str())
        })
        .filter_map(|t| {
            let scale = f64::from(*t.directive.scales.first()?);
            let zp = f64::from(t.directive.zero_points.first().copied().unwrap_or(0));
            Some((t.name.to_string(), range(t.directive.dtype, scale, zp)?))
        })
        .collect()
}

fn range(dtype: DType, scale: f64, zero_point: f64) -> Option<(f64, f64)> {
    let (qmin, qmax) = match dtype {
        DType::U8 => (0.0, 255.0),
        DType::I8 => (-128.0, 127.0),
        DType::U16 => (0.0, 65535.0),
        DType::I16 => (-32768.0, 32767.0),
        _ => return None,
    };
    (scale.is_finite() && scale > 0.0)
        .then_some(((qmin - zero_point) * scale, (qmax - zero_point) * scale))
}

/// The activation ranges of a QDQ model: each `QuantizeLinear` of a computed value, read from
/// its constant scale and zero point.
fn model_ranges(model: &Model) -> Ranges {
    let scalar = |name: Option<&String>| {
        let t = model.initializers.get(name?)?;
        (t.len() == 1).then_some(t)
    };
    model
        .nodes
        .iter()
        .filter(|n| n.domain.is_empty() && n.op_type == "QuantizeLinear")
        .filter_map(|n| {
            let x = n.inputs.first()?;
            if model.initializers.contains_key(x) {
                return None;
            }
            let scale = f64::from(*scalar(n.inputs.get(1))?.to_vec::<f32>().ok()?.first()?);
            let (dtype, zp) = match scalar(n.inputs.get(2).filter(|z| !z.is_empty())) {
                Some(z) => (
                    z.dtype(),
                    match z.dtype() {
                        DType::U8 => f64::from(*z.to_vec::<u8>().ok()?.first()?),
                        DType::I8 => f64::from(*z.to_vec::<i8>().ok()?.first()?),
                        DType::U16 => f64::from(*z.to_vec::<u16>().ok()?.first()?),
                        DType::I16 => f64::from(*z.to_vec::<i16>().ok()?.first()?),
                        _ => return None,
                    },
                ),
                None => (DType::U8, 0.0),
            };
            Some((x.clone(), range(dtype, scale, zp)?))
        })
        .collect()
}

/// The largest move of a range's end between `served` and `new`, as a fraction of the served
/// range, over the tensors both have (0 when they share none).
pub fn drift(served: &Ranges, new: &Ranges) -> f64 {
    served
        .iter()
        .filter_map(|(name, &(lo, hi))| {
            let &(nlo, nhi) = new.get(name)?;
            let span = hi - lo;
            (span > 0.0).then(|| (nlo - lo).abs().max((nhi - hi).abs()) / span)
        })
        .fold(0.0, f64::max)
}

/// What the checks found so far (`opreg.v1.Registry/ModelAdaptation`).
#[derive(Clone, Debug, Default)]
pub struct Status {
    pub sampled: u64,
    pub window: usize,
    pub checks: u64,
    pub adaptations: u64,
    pub refused: u64,
    pub last_drift: f64,
    pub current_sqnr_db: f64,
    pub candidate_sqnr_db: f64,
    pub last_outcome: String,
}

struct Window {
    samples: VecDeque<(Sample, u64)>,
    bytes: u64,
    requests: u64,
    since_check: u64,
}

/// The adaptive side of a served version.
pub struct Adaptive {
    pub policy: Policy,
    /// The float model the strategy plans on (as the quantization job prepared it).
    float: Model,
    window: Mutex<Window>,
    /// The served activation ranges.
    ranges: Mutex<Ranges>,
    checking: AtomicBool,
    status: Mutex<Status>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Clears the "a check is running" mark however the check ends (error or panic included).
struct Running<'a>(&'a AtomicBool);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Adaptive {
    /// Whether the version in `dir` is adaptive (its folder has a policy file).
    pub fn wanted(dir: &Path) -> bool {
        dir.join(POLICY_FILE).exists()
    }

    /// The adaptive side of the version in `dir`, when its folder has a policy file;
    /// `model` is the version's model as written (its QDQ parameters are the served ranges).
    /// A float model larger than `max_bytes` is refused.
    pub fn read(
        dir: &Path,
        model: &prost::bytes::Bytes,
        max_bytes: u64,
    ) -> Result<Option<Adaptive>, RepoError> {
        if !Adaptive::wanted(dir) {
            return Ok(None);
        }
        let policy = Policy::read(dir)?;
        let float = {
            let path = dir.join(FLOAT_FILE);
            let io = |source| RepoError::Io {
                path: path.clone(),
                source,
            };
            let len = std::fs::metadata(&path).map_err(io)?.len();
            if len > max_bytes {
                return Err(RepoError::TooLarge(format!(
                    "{} has {len} bytes, more than the limit of {max_bytes} (max_model_bytes)",
                    path.display()
                )));
            }
            let bytes = std::fs::read(&path).map_err(io)?;
            graph::import_owned(bytes, Some(dir))
                .map_err(|e| RepoError::Config(format!("{}: {e}", path.display())))?
        };
        let served = graph::import_owned(model.clone(), Some(dir))
            .map_err(|e| RepoError::Config(format!("{}: {e}", dir.display())))?;
        let ranges = model_ranges(&served);
        Ok(Some(Adaptive {
            policy,
            float,
            window: Mutex::new(Window {
                samples: VecDeque::new(),
                bytes: 0,
                requests: 0,
                since_check: 0,
            }),
            ranges: Mutex::new(ranges),
            checking: AtomicBool::new(false),
            status: Mutex::new(Status::default()),
        }))
    }

    /// Writes an adaptive version's extra files into its folder `dir`.
    pub fn save(dir: &Path, float: &Model, policy: &Policy) -> Result<(), QuantError> {
        let exported = graph::export(float, None)?;
        for (file, bytes) in [
            (FLOAT_FILE, exported.model),
            (POLICY_FILE, policy.to_toml().into_bytes()),
        ] {
            let path = dir.join(file);
            std::fs::write(&path, bytes).map_err(|source| QuantError::Io { path, source })?;
        }
        Ok(())
    }

    pub fn status(&self) -> Status {
        let mut s = lock(&self.status).clone();
        s.window = lock(&self.window).samples.len();
        s
    }

    /// Offers a request's inputs. True when a check is due now (the caller runs
    /// [`Adaptive::check`], off the request's path); false most of the time.
    pub fn offer(&self, feeds: &HashMap<String, Arc<HostTensor>>) -> bool {
        let mut w = lock(&self.window);
        w.requests += 1;
        if !(w.requests - 1).is_multiple_of(self.policy.sample_every) {
            return false;
        }
        let bytes: u64 = feeds.values().map(|t| t.byte_len() as u64).sum();
        if bytes > self.policy.max_window_bytes {
            return false;
        }
        let origin = format!("sampled request {}", w.requests);
        w.samples.push_back((
            Sample {
                origin,
                feeds: feeds.clone(),
                labels: None,
            },
            bytes,
        ));
        w.bytes += bytes;
        while w.samples.len() > self.policy.window || w.bytes > self.policy.max_window_bytes {
            match w.samples.pop_front() {
                Some((_, b)) => w.bytes -= b,
                None => break,
            }
        }
        lock(&self.status).sampled += 1;
        w.since_check += 1;
        if w.since_check >= self.policy.check_every && !self.checking.swap(true, Ordering::AcqRel) {
            w.since_check = 0;
            return true;
        }
        false
    }

    /// One check (see the module's documentation): re-derives the parameters over the window
    /// and swaps them into `served` when they drifted and verify better. Blocking: call it on
    /// the compute pool, after [`Adaptive::offer`] said so.
    pub fn check(&self, app: &App, served: &ServedModel) -> Result<String, QuantError> {
        let _running = Running(&self.checking);
        let outcome = self.derive_and_swap(app, served);
        let mut s = lock(&self.status);
        s.checks += 1;
        s.last_outcome = match &outcome {
            Ok(o) => o.clone(),
            Err(e) => format!("failed: {e}"),
        };
        outcome
    }

    fn derive_and_swap(&self, app: &App, served: &ServedModel) -> Result<String, QuantError> {
        let samples: Vec<Sample> = lock(&self.window)
            .samples
            .iter()
            .map(|(s, _)| s.clone())
            .collect();
        let p = &self.policy;
        let strategy = find_strategy(&app.registry, &p.strategy)?;
        let devices = served.settings.devices()?;
        let max_folded = usize::try_from(app.repo.limits().max_folded_bytes).unwrap_or(usize::MAX);
        let planner = Planner {
            model_name: &served.name,
            strategy: &strategy,
            name: &p.strategy,
            options: p
                .options
                .iter()
                .map(|(k, v)| opreg_sdk::quant::KeyValue {
                    key: k.as_str().into(),
                    value: v.as_str().into(),
                })
                .collect(),
            registry: &app.registry,
            devices: &devices,
            max_folded,
        };
        let observations = planner.observations(&self.float)?;
        let mut calibrator = planner.calibrator(&self.float, &observations)?;
        calibrator.feed(&samples)?;
        let float_plan =
            graph::compile(&self.float, app.registry.snapshot(), &devices, max_folded)?;
        let heldout = Heldout::new(&float_plan, samples)?;
        let (plan, _) = planner.plan(&self.float, &calibrator, &heldout)?;
        let new_ranges = plan_ranges(&plan, &self.float);
        let moved = drift(&lock(&self.ranges), &new_ranges);
        lock(&self.status).last_drift = moved;
        if moved <= p.drift {
            return Ok(format!("steady: drift {moved:.3} <= {}", p.drift));
        }

        // A candidate, served exactly as a loaded version would be: exported, imported and
        // optimized (the QDQ patterns fuse into integer kernels), then compiled.
        let applied =
            apply::apply(&self.float, &plan, &p.strategy).map_err(|e| e.of_model(&served.name))?;
        let exported = graph::export(&applied.model, None)?;
        let mut candidate = graph::import_owned(exported.model, None)?;
        graph::optimize(&mut candidate)?;
        let snapshot = app.registry.snapshot();
        let candidate_plan = Arc::new(graph::compile(
            &candidate,
            snapshot.clone(),
            &devices,
            max_folded,
        )?);
        let served_plan = served.plan(&snapshot)?;
        let (current, _) = heldout.compare(&served_plan)?;
        let (proposed, _) = heldout.compare(&candidate_plan)?;
        {
            let mut s = lock(&self.status);
            s.current_sqnr_db = current.sqnr_db;
            s.candidate_sqnr_db = proposed.sqnr_db;
        }
        // Served parameters already exact (infinite SQNR) cannot be beaten; NaN never verifies.
        let better =
            current.sqnr_db.is_finite() && proposed.sqnr_db >= current.sqnr_db + p.min_gain_db;
        if !better {
            lock(&self.status).refused += 1;
            return Ok(format!(
                "refused: drift {moved:.3}, but the candidate's {:.2} dB does not beat the served {:.2} dB by {} dB",
                proposed.sqnr_db, current.sqnr_db, p.min_gain_db
            ));
        }
        served.replace(Arc::new(candidate), candidate_plan);
        *lock(&self.ranges) = new_ranges;
        lock(&self.status).adaptations += 1;
        Ok(format!(
            "adapted: drift {moved:.3}; output SQNR on the last {} samples {:.2} dB -> {:.2} dB",
            heldout.samples.len(),
            current.sqnr_db,
            proposed.sqnr_db
        ))
    }
}

/// Runs a due check of `model` on the compute pool, in the background; logs its outcome.
pub fn spawn_check(app: Arc<App>, model: Arc<ServedModel>) {
    tokio::spawn(async move {
        let (a, m) = (app.clone(), model.clone());
        let result = app
            .compute
            .run(move || m.adaptive.as_ref().map(|ad| ad.check(&a, &m)))
            .await;
        let (name, version) = (&model.name, model.version);
        match result {
            Ok(Some(Ok(outcome))) if outcome.starts_with("adapted") => {
                tracing::info!(model = %name, version, "adaptive: {outcome}")
            }
            Ok(Some(Ok(outcome))) => tracing::debug!(model = %name, version, "adaptive: {outcome}"),
            Ok(Some(Err(e))) => {
                tracing::warn!(model = %name, version, "adaptive check failed: {e}")
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(model = %name, version, "adaptive check failed: {e}"),
        }
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::indexing_slicing)]
    use super::*;
    use opreg_sdk::quant::Annotation;

    #[test]
    fn drift_is_the_largest_end_move_over_the_served_span() {
        let served: Ranges = [("a".into(), (0.0, 1.0)), ("b".into(), (-2.0, 2.0))].into();
        let same = served.clone();
        assert_eq!(drift(&served, &same), 0.0);
        // Inputs scaled by 4: a's top end moves by 3 spans.
        let scaled: Ranges = [("a".into(), (0.0, 4.0)), ("b".into(), (-2.0, 2.0))].into();
        assert!((drift(&served, &scaled) - 3.0).abs() < 1e-12);
        // Shrunk to a quarter: b's ends move 1.5 each, over a span of 4.
        let shrunk: Ranges = [("b".into(), (-0.5, 0.5))].into();
        assert!((drift(&served, &shrunk) - 0.375).abs() < 1e-12);
        // Tensors only one side has do not count.
        let other: Ranges = [("c".into(), (0.0, 100.0))].into();
        assert_eq!(drift(&served, &other), 0.0);
    }

    #[test]
    fn ranges_follow_the_quantized_type() {
        let (lo, hi) = range(DType::U8, 0.01, 0.0).unwrap();
        assert!(lo == 0.0 && (hi - 2.55).abs() < 1e-12, "{lo} {hi}");
        let (lo, hi) = range(DType::I8, 0.5, -28.0).unwrap();
        assert_eq!((lo, hi), (-50.0, 77.5));
        assert_eq!(range(DType::F32, 1.0, 0.0), None);
        assert_eq!(range(DType::U8, f64::NAN, 0.0), None);
    }

    #[test]
    fn a_plan_sets_the_policy_and_bad_values_are_refused_by_name() {
        let mut plan = GraphPlan {
            flags: GraphPlan::ADAPTIVE,
            annotations: vec![
                Annotation::new(POLICY_SUBJECT, "drift", 0.25),
                Annotation::new(POLICY_SUBJECT, "window", 8.0),
                Annotation::new("conv1", "threshold", 3.0),
            ]
            .into(),
            ..GraphPlan::default()
        };
        let p = Policy::from_plan("quant-adaptive", &[("k".into(), "v".into())], &plan).unwrap();
        assert_eq!(p.drift, 0.25);
        assert_eq!(p.window, 8);
        assert_eq!(p.sample_every, Policy::default().sample_every);
        assert_eq!(p.options, vec![("k".to_string(), "v".to_string())]);
        // It survives the file.
        let back: Policy = toml::from_str(&p.to_toml()).unwrap();
        assert_eq!(back, p);

        plan.annotations = vec![Annotation::new(POLICY_SUBJECT, "window", 2.5)].into();
        let e = Policy::from_plan("s", &[], &plan).unwrap_err().to_string();
        assert!(e.contains("window=2.5"), "{e}");
        plan.annotations = vec![Annotation::new(POLICY_SUBJECT, "colour", 1.0)].into();
        let e = Policy::from_plan("s", &[], &plan).unwrap_err().to_string();
        assert!(e.contains("'colour'"), "{e}");
        plan.annotations = vec![Annotation::new(POLICY_SUBJECT, "drift", -1.0)].into();
        assert!(Policy::from_plan("s", &[], &plan).is_err());
    }
}
