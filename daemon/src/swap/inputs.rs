//! What a swap is verified on: a model's warm-up samples (its `config.toml`) and the inputs
//! of its recent requests, or, for a model with neither, inputs synthesized from its declared
//! shapes.

use crate::{
    feeds,
    repo::{Feeds, ServedModel},
};

/// Where a set of verification inputs came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Warmup,
    Request,
    Synthesized,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Origin::Warmup => "a warm-up sample",
            Origin::Request => "recorded from a request",
            Origin::Synthesized => "synthesized",
        })
    }
}

/// Inputs for verifying `model`: its warm-up samples and the inputs of its recent requests;
/// without either, one set synthesized from the declared shapes. Empty when there is nothing
/// to go on (no samples, no requests, an input without a declared shape).
pub fn for_model(model: &ServedModel, max_tensor_bytes: usize) -> Vec<(Feeds, Origin)> {
    let mut sets: Vec<(Feeds, Origin)> = model
        .warmup_inputs()
        .iter()
        .map(|f| (f.clone(), Origin::Warmup))
        .chain(
            model
                .recent_inputs()
                .into_iter()
                .map(|f| (f, Origin::Request)),
        )
        .collect();
    if sets.is_empty() {
        sets.extend(synthesized(model, max_tensor_bytes).map(|f| (f, Origin::Synthesized)));
    }
    sets
}

/// One input set of the declared shapes (symbolic dimensions 1), spread floats (see
/// [`feeds::Fill::Spread`]).
fn synthesized(model: &ServedModel, max_tensor_bytes: usize) -> Option<Feeds> {
    feeds::synthesize(
        &model.model.inputs,
        &feeds::Shapes::all(1),
        feeds::Fill::Spread,
        max_tensor_bytes,
    )
    .ok()
}
