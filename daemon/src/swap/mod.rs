//! Verified hot swap: a new build of a loaded plugin is published only after every served
//! model it touches gave the same answers on it as on the serving generation.
//!
//! The order matters and is the point of this module:
//! 1. the candidate is loaded and self-tested ([`Registry::prepare_swap`]), unpublished, with
//!    the registry's writer lock held until the end;
//! 2. every ready model version is compiled against the candidate snapshot, so no request
//!    pays for re-binding after the swap (a version pinned to the replaced build stays on it);
//! 3. each version whose plans bind a kernel of the plugin (or every version, when the
//!    plugin brings BLAS backends or devices, which any kernel may call) runs its warm-up
//!    samples and recorded request inputs on both plans, and the outputs are compared within a [`Tolerance`];
//! 4. only then are the plans installed and the generation published. Anything else (a
//!    load failure, a self-test, a compile error, a failure or panic on the candidate, an
//!    output beyond tolerance) refuses the candidate with the reason; the serving generation
//!    never saw it and its library unmaps. The refused file's hash is remembered.

mod compare;
mod inputs;
pub mod quarantine;
pub mod watch;

pub use compare::{compare, Difference, Tolerance};

use crate::{
    app::App,
    graph::{self, Plan, RunControl},
    plugin::LoadedPlugin,
    registry::{Candidate, Refused, SwapError},
    repo::{Feeds, Prepared, ServedModel},
};
use std::{
    collections::BTreeSet,
    path::Path,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// What a swap is asked to do.
#[derive(Clone, Debug, Default)]
pub struct SwapOptions {
    /// The plugin name the new build must register.
    pub expected: Option<String>,
    pub tolerance: Tolerance,
    /// Verify only; publish nothing.
    pub dry_run: bool,
}

/// One model version compared on the candidate.
#[derive(Clone, Debug)]
pub struct Check {
    pub model: String,
    pub version: u64,
    pub inputs: u32,
    pub max_abs_diff: f64,
    pub worst_output: String,
    pub recorded: bool,
}

/// A swap or rollback that was published (or, dry run, would have been).
#[derive(Debug)]
pub struct SwapReport {
    pub plugin: Arc<LoadedPlugin>,
    pub generation: u64,
    pub replaced_generation: u64,
    pub checks: Vec<Check>,
    pub plans_compiled: u32,
    pub verify: Duration,
}

/// Swaps in the build at `path`. Blocking: call it off the async runtime.
pub fn swap(app: &App, path: &Path, options: &SwapOptions) -> Result<SwapReport, SwapError> {
    let started = Instant::now();
    let result = app
        .registry
        .prepare_swap(path, options.expected.as_deref())
        .and_then(|candidate| verify_and_publish(app, candidate, options, started));
    match &result {
        Ok(r) => app
            .metrics
            .swaps
            .with_label_values(&[r.plugin.name.as_str()])
            .inc(),
        Err(e) => refuse(app, path, e),
    }
    // The replaced plans (or the refused candidate's) are gone, and the weights read again
    // to compile them.
    crate::heap::release_freed();
    result
}

/// Returns plugin `name` to the build it replaced, compiling plans first. The previous build
/// served before, so it is not compared again. Blocking.
pub fn rollback(app: &App, name: &str) -> Result<SwapReport, SwapError> {
    let started = Instant::now();
    let candidate = app.registry.prepare_rollback(name)?;
    let options = SwapOptions {
        expected: Some(name.to_string()),
        ..SwapOptions::default()
    };
    let prepared = prepare(app, &candidate)?;
    let report = publish(candidate, prepared, Vec::new(), &options, started);
    crate::heap::release_freed();
    app.metrics.rollbacks.with_label_values(&[name]).inc();
    Ok(report)
}

fn verify_and_publish(
    app: &App,
    candidate: Candidate<'_>,
    options: &SwapOptions,
    started: Instant,
) -> Result<SwapReport, SwapError> {
    let prepared = prepare(app, &candidate)?;
    let name = candidate.plugin.name.clone();
    let everything = !candidate.plugin.backends.is_empty()
        || !candidate.plugin.devices.is_empty()
        || !candidate.replaces.backends.is_empty()
        || !candidate.replaces.devices.is_empty();
    let mut checks = Vec::new();
    for (model, new) in &prepared {
        let old = model
            .plan(&candidate.serving)
            .map_err(|e| SwapError::Verification(e.to_string()))?;
        if everything || uses(&old, &name) || uses(&new.plan, &name) {
            checks.push(check(app, model, &old, &new.plan, options.tolerance)?);
        }
    }
    Ok(publish(candidate, prepared, checks, options, started))
}

/// Compiles every ready model version against the candidate.
fn prepare(
    app: &App,
    candidate: &Candidate<'_>,
) -> Result<Vec<(Arc<ServedModel>, Prepared)>, SwapError> {
    app.repo
        .ready()
        .into_iter()
        // A version pinned to the build being replaced stays on it: nothing to compile.
        .filter(|m| !m.pinned_away(&candidate.snapshot))
        .map(|m| {
            let p = app.compute.install(|| m.prepare(&candidate.snapshot));
            match p {
                Ok(p) => Ok((m, p)),
                Err(e) => Err(SwapError::Verification(format!(
                    "model '{}' version {} does not compile against the candidate: {e}",
                    m.name, m.version
                ))),
            }
        })
        .collect()
}

fn publish(
    candidate: Candidate<'_>,
    prepared: Vec<(Arc<ServedModel>, Prepared)>,
    checks: Vec<Check>,
    options: &SwapOptions,
    started: Instant,
) -> SwapReport {
    let plugin = candidate.plugin.clone();
    let replaced_generation = candidate.replaces.generation;
    let plans_compiled = prepared.len() as u32;
    let verify = started.elapsed();
    let generation = if options.dry_run {
        candidate.serving.generation
    } else {
        // Plans first: a request that still holds the serving snapshot takes an installed
        // plan as it is (it has not started computing), so none compiles after the swap.
        for (model, p) in prepared {
            model.install(p);
        }
        candidate.publish()
    };
    SwapReport {
        plugin,
        generation,
        replaced_generation,
        checks,
        plans_compiled,
        verify,
    }
}

/// Whether `plan` (its subgraphs and folded constants included) binds a kernel of `plugin`.
fn uses(plan: &Plan, plugin: &str) -> bool {
    let mut names = BTreeSet::new();
    plan.plugins(&mut names);
    names.contains(plugin)
}

/// Runs `model`'s verification inputs on the serving plan and the candidate's and compares.
fn check(
    app: &App,
    model: &ServedModel,
    old: &Plan,
    new: &Plan,
    tolerance: Tolerance,
) -> Result<Check, SwapError> {
    let limits = &app.config.limits;
    let max_tensor = usize::try_from(limits.max_tensor_bytes).unwrap_or(usize::MAX);
    let max_live = usize::try_from(limits.max_request_bytes).unwrap_or(usize::MAX);
    let sets = inputs::for_model(model, max_tensor);
    let recorded = sets.iter().any(|(_, o)| *o != inputs::Origin::Synthesized);
    let label = format!("model '{}' version {}", model.name, model.version);
    let mut result = Check {
        model: model.name.clone(),
        version: model.version,
        inputs: 0,
        max_abs_diff: 0.0,
        worst_output: String::new(),
        recorded,
    };
    let run = |plan: &Plan, feeds: &Feeds| {
        let control = RunControl::new(max_tensor, max_live, None);
        app.compute.install(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                graph::run_with_control(plan, feeds.clone(), &control)
            }))
        })
    };
    for (k, (feeds, origin)) in sets.iter().enumerate() {
        // An input the serving generation cannot run either says nothing about the candidate.
        let Ok(Ok(expected)) = run(old, feeds) else {
            continue;
        };
        let got = match run(new, feeds) {
            Ok(Ok(got)) => got,
            Ok(Err(e)) => {
                return Err(SwapError::Verification(format!(
                    "{label} fails on the candidate (input set {k}) where the serving generation succeeds: {e}"
                )))
            }
            Err(p) => {
                return Err(SwapError::Verification(format!(
                    "{label} panicked on the candidate (input set {k}): {}",
                    crate::exec::panic_message(p.as_ref())
                )))
            }
        };
        result.inputs += 1;
        for ((name, a), (_, b)) in expected.iter().zip(&got) {
            match compare(a, b, tolerance) {
                Difference::Within(d) => {
                    if d > result.max_abs_diff || result.worst_output.is_empty() {
                        result.max_abs_diff = result.max_abs_diff.max(d);
                        result.worst_output = name.clone();
                    }
                }
                Difference::Beyond {
                    max_abs,
                    index,
                    old,
                    new,
                } => {
                    return Err(SwapError::Verification(format!(
                        "{label}, output '{name}' (input set {k}, {origin}): max |new - old| = {max_abs:.6e}; element {index} was {old} and is {new} on the candidate, beyond the tolerance {} + {} * |old|",
                        tolerance.abs, tolerance.rel
                    )))
                }
                Difference::Structure(what) => {
                    return Err(SwapError::Verification(format!(
                        "{label}, output '{name}' (input set {k}): {what} on the candidate"
                    )))
                }
            }
        }
    }
    if result.inputs == 0 {
        tracing::warn!(model = %model.name, version = model.version, "swap: nothing to verify this model on (no warm-up sample or recorded request, and its inputs cannot be synthesized); compiled only");
    }
    Ok(result)
}

/// Logs and remembers a refused candidate.
fn refuse(app: &App, path: &Path, e: &SwapError) {
    if !matches!(e, SwapError::NotLoaded { .. }) {
        tracing::error!("swap refused: {e}");
    }
    // Refusals that are not about the file (nothing loaded to roll back, ...) are not
    // remembered against its content.
    if matches!(
        e,
        SwapError::NothingToRollBack(_) | SwapError::NoPrevious(_) | SwapError::NotLoaded { .. }
    ) {
        return;
    }
    app.metrics.swaps_refused.inc();
    remember(app, path, e.to_string());
}

/// Remembers that the content of `path` was refused, and why.
pub fn remember(app: &App, path: &Path, reason: String) {
    let sha256 = crate::plugin::sha256_file(path).unwrap_or_default();
    app.registry.remember_refused(Refused {
        path: path.display().to_string(),
        sha256,
        reason,
        unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    });
}
