//! What a swap is verified on: a model's warm-up samples (its `config.toml`) and the inputs
//! of its recent requests, or, for a model with neither, inputs synthesized from its declared
//! shapes.

use crate::{
    graph::Dim,
    repo::{Feeds, ServedModel},
};
use opreg_sdk::{host::HostTensor, DType};
use std::sync::Arc;

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

/// One input set of the declared shapes (symbolic dimensions 1): floats spread over [-1, 1)
/// by a fixed sequence, so that a kernel that is wrong shows; integers and booleans zero and
/// strings empty, which every model accepts (an integer input is often an index).
fn synthesized(model: &ServedModel, max_tensor_bytes: usize) -> Option<Feeds> {
    let mut feeds = Feeds::new();
    for (k, input) in model.model.inputs.iter().enumerate() {
        let shape: Vec<usize> = input
            .shape
            .as_ref()?
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => *n,
                Dim::Symbolic(_) => 1,
            })
            .collect();
        let n = opreg_sdk::alloc::numel(&shape)?;
        if n.checked_mul(input.dtype.size())? > max_tensor_bytes {
            return None;
        }
        let mut t = HostTensor::zeroed(input.dtype, &shape).ok()?;
        fill(&mut t, k as u64 + 1);
        feeds.insert(input.name.clone(), Arc::new(t));
    }
    Some(feeds)
}

fn fill(t: &mut HostTensor, seed: u64) {
    let dtype = t.dtype();
    if !dtype.is_float() {
        return;
    }
    // xorshift64*: a fixed, portable sequence.
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let r = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
        (r as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    };
    let size = dtype.size();
    for e in t.bytes_mut().chunks_exact_mut(size) {
        let v = next();
        match dtype {
            DType::F32 => e.copy_from_slice(&(v as f32).to_le_bytes()),
            DType::F64 => e.copy_from_slice(&v.to_le_bytes()),
            DType::F16 => e.copy_from_slice(&half::f16::from_f64(v).to_le_bytes()),
            DType::BF16 => e.copy_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
            _ => {}
        }
    }
}
