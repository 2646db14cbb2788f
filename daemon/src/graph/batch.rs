//! Image-parallel runs: a batch of a graph whose images never meet, split image by image and
//! the images run side by side, one whole sub-run per thread, each kernel on one thread.
//!
//! Why: a CNN at batch 8 runs every layer over the whole batch with both threads inside each
//! kernel. Each layer's output (14 MB for MobileNetV2's 56x56x144 expansions at batch 8) then
//! leaves the cores' caches before the next layer reads it, and every kernel pays its
//! parallel hand-offs. One image per thread keeps an image's activations in its core's L2
//! and needs no hand-off at all: measured, two single-thread batch-1 runs side by side took
//! 7.8 (MobileNetV2) and 7.2 ms (SqueezeNet) each, so eight images 31 and 29 ms, against
//! 43 and 44 ms for the batch-8 run on two threads (ONNX Runtime 39 and 36).
//!
//! Only graphs proven batch-separable take this path ([`separable`]): every node that runs
//! (not folded) is of a kind that maps the leading axis of its inputs to the leading axis of
//! its outputs sample by sample (convolutions, pools, activations, elementwise ops with
//! constants that do not vary along the batch, `Flatten`, a `Gemm` over constant weights, …),
//! so that by induction from the inputs every value's leading axis is the batch. Anything
//! else (reshapes, attention, recurrences, control flow, reductions over the batch) runs
//! whole, as before. A split run whose outputs do not come back with the batch leading is
//! run again whole rather than answered.

use super::{
    compiled::Plan,
    import::Model,
    run::{run_part, Outputs, RunControl},
    GraphError,
};
use opreg_sdk::{
    host::{self, HostTensor},
    AttrValue, DType,
};
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

/// Most images a batch is split into; a larger batch runs whole. (Each part costs a result
/// slot, and a copy of any input whose images are not aligned; past a few hundred images the
/// split gains nothing more.)
const MAX_PARTS: usize = 1024;

/// Kinds without an arm of their own in [`separable`] that keep samples apart once their inputs
/// past the first are constant: pools and elementwise functions of one tensor.
const PER_SAMPLE: &[&str] = &[
    "AveragePool",
    "GlobalAveragePool",
    "GlobalAveragePoolNhwc",
    "GlobalMaxPool",
    "QLinearGlobalAveragePool",
    "Relu",
    "Sigmoid",
    "Tanh",
    "HardSigmoid",
    "HardSwish",
    "LeakyRelu",
    "Elu",
    "Selu",
    "Softplus",
    "Gelu",
    "Erf",
    "Abs",
    "Neg",
    "Exp",
    "Log",
    "Sqrt",
    "Identity",
    "Cast",
];

/// Whether every node of `model` that runs (not folded from constants) keeps samples apart
/// (see the module's documentation); `initializers` are its constants.
pub(super) fn separable(model: &Model, initializers: &HashMap<String, Arc<HostTensor>>) -> bool {
    if model.inputs.is_empty() || model.outputs.is_empty() || model.nodes.is_empty() {
        return false;
    }
    // Values known at compile time: initializers and whatever only they feed (in node order;
    // a graph listed out of order only makes this answer `false` more often).
    let mut constant: HashSet<&str> = initializers.keys().map(String::as_str).collect();
    for n in &model.nodes {
        let is_const = |x: &String| x.is_empty() || constant.contains(x.as_str());
        if !n.subgraphs.is_empty() {
            return false;
        }
        if n.inputs.iter().all(is_const) {
            constant.extend(n.outputs.iter().map(String::as_str));
            continue;
        }
        let input_const = |i: usize| n.inputs.get(i).is_none_or(is_const);
        // Whether input `i` is the same for every sample, or absent, or an activation (whose
        // leading axis is the batch): a constant must be an initializer of rank at most 1 or
        // with a leading 1 (a folded constant's shape is not known here: refused).
        let per_sample = |i: usize| match n.inputs.get(i) {
            None => true,
            Some(x) if x.is_empty() || !constant.contains(x.as_str()) => true,
            Some(x) => initializers
                .get(x)
                .is_some_and(|t| t.shape().len() <= 1 || t.shape().first() == Some(&1)),
        };
        let int = |name: &str| {
            n.attributes
                .iter()
                .find(|a| a.name == name)
                .map(|a| match &a.value {
                    AttrValue::Int(v) => Some(*v),
                    _ => None,
                })
        };
        let ok = match n.op_type.as_str() {
            // Weights and bias constant; a fused sum (FusedConv's Z) is an activation of the
            // same batch or a constant the same for every sample.
            "Conv" | "FusedConv" | "FusedConvNhwc" | "FusedConvMaxPool" => {
                input_const(1) && input_const(2) && per_sample(3) && n.outputs.len() == 1
            }
            "QLinearConv" => (1..n.inputs.len()).all(input_const),
            "QLinearAdd" | "QLinearMul" => {
                [1, 2, 4, 5, 6, 7].into_iter().all(input_const) && per_sample(0) && per_sample(3)
            }
            // Without the indices output (flat positions over the whole batch).
            "MaxPool" | "MaxPoolNhwc" | "NhwcMaxPool" => {
                n.outputs.iter().skip(1).all(String::is_empty)
            }
            // Inference only: training mode normalizes over the batch.
            "BatchNormalization" => {
                (1..n.inputs.len()).all(input_const)
                    && n.outputs.iter().skip(1).all(String::is_empty)
                    && int("training_mode").unwrap_or(Some(0)) == Some(0)
            }
            "Add" | "Sub" | "Mul" | "Div" | "Max" | "Min" | "PRelu" => {
                n.inputs.len() == 2 && per_sample(0) && per_sample(1)
            }
            "Clip" | "Dropout" => {
                (1..n.inputs.len()).all(input_const)
                    && n.outputs.iter().skip(1).all(String::is_empty)
            }
            "QuantizeLinear" | "DequantizeLinear" => {
                let per_tensor = n
                    .inputs
                    .get(1)
                    .and_then(|s| initializers.get(s))
                    .is_some_and(|t| t.len() <= 1);
                (1..n.inputs.len()).all(input_const)
                    && (per_tensor || int("axis").unwrap_or(Some(1)).is_some_and(|a| a >= 1))
            }
            "Flatten" => int("axis").unwrap_or(Some(1)).is_some_and(|a| a >= 1),
            // Activations only: a constant piece would have to match the batch.
            "Concat" => {
                int("axis").flatten().is_some_and(|a| a >= 1) && !n.inputs.iter().any(is_const)
            }
            "Softmax" | "LogSoftmax" => int("axis").flatten().is_some_and(|a| a >= 1),
            "Transpose" => {
                n.attributes.iter().find(|a| a.name == "perm").is_some_and(
                    |a| matches!(&a.value, AttrValue::Ints(p) if p.first() == Some(&0)),
                )
            }
            // Rows of A (the samples) times constant weights.
            "Gemm" => {
                int("transA").unwrap_or(Some(0)) == Some(0) && input_const(1) && per_sample(2)
            }
            "QGemm" => {
                int("transA").unwrap_or(Some(0)) == Some(0)
                    && (1..6).all(input_const)
                    && per_sample(6)
                    && (7..n.inputs.len()).all(input_const)
            }
            op => PER_SAMPLE.contains(&op) && (1..n.inputs.len()).all(input_const),
        };
        if !ok {
            return false;
        }
    }
    // A graph output that is a constant or an input passed through is not the batch's.
    let inputs: HashSet<&str> = model.inputs.iter().map(|i| i.name.as_str()).collect();
    model
        .outputs
        .iter()
        .all(|o| !constant.contains(o.name.as_str()) && !inputs.contains(o.name.as_str()))
}

/// Runs `plan` on `feeds` split image by image over the pool's threads when the plan is
/// batch-separable, the batch gives every thread as many images or each at least two, and
/// everything is in host memory; `None` when it does not apply (the caller runs it whole).
pub(super) fn run_split(
    plan: &Plan,
    feeds: &HashMap<String, Arc<HostTensor>>,
    control: &RunControl,
) -> Option<Result<Outputs, GraphError>> {
    let threads = rayon::current_num_threads();
    if !plan.batch_split || threads < 2 || rayon::current_thread_index().is_none() {
        return None;
    }
    let batch = feeds.values().next()?.shape().first().copied()?;
    // Parts that share the threads evenly, or at least two per thread (five images on two
    // threads: three and two, still ahead of the whole batch; three: two and one, behind).
    // Measured at batch 2, one image per thread against the whole batch on both: MobileNetV2
    // 8.2 against 8.6 ms, SqueezeNet 7.6-8.0 against 8.2, MobileNetV2-QDQ 3.1 against 3.3,
    // ResNet-18 even. Every image of every input at least one byte: the parts (and their
    // result slots) are then bounded by the request's bytes, and capped besides (a larger
    // batch runs whole).
    let even = batch.is_multiple_of(threads) || batch >= 2 * threads;
    if !even
        || !(threads..=MAX_PARTS).contains(&batch)
        || feeds.values().any(|t| {
            t.shape().first() != Some(&batch)
                || t.byte_len() < batch
                || t.dtype() == DType::String
                || t.device_mem().is_some()
        })
    {
        return None;
    }
    // One image per part, each part's inputs a view of the batch's memory where the image
    // starts on an aligned boundary (an image of 600 KB), else copied out of it.
    let part = |i: usize| -> Result<HashMap<String, Arc<HostTensor>>, GraphError> {
        feeds
            .iter()
            .map(|(name, t)| {
                let per = t.byte_len() / batch;
                let bytes = t.bytes().get(i * per..(i + 1) * per).ok_or_else(|| {
                    GraphError::Invalid(format!("input '{name}': shorter than its batch"))
                })?;
                let mut shape = t.shape().to_vec();
                if let Some(d) = shape.first_mut() {
                    *d = 1;
                }
                let one = match image_view(t, &shape, bytes) {
                    Some(view) => view,
                    None => HostTensor::from_bytes(t.dtype(), &shape, bytes).map_err(|e| {
                        GraphError::Invalid(format!("input '{name}': {}", e.message))
                    })?,
                };
                Ok((name.clone(), Arc::new(one)))
            })
            .collect()
    };
    let results: Vec<Mutex<Option<Result<Outputs, GraphError>>>> =
        (0..batch).map(|_| Mutex::new(None)).collect();
    crate::exec::with_workers_awake(|| {
        opreg_sdk::host::run_parts(threads, batch, |i| {
            let out = part(i).and_then(|f| run_part(plan, f, control));
            if let Some(slot) = results.get(i) {
                if let Ok(mut s) = slot.lock() {
                    *s = Some(out);
                }
            }
        })
    });
    let mut parts = Vec::with_capacity(batch);
    for slot in results {
        match slot.into_inner().ok().flatten() {
            Some(Ok(out)) => parts.push(out),
            Some(Err(e)) => return Some(Err(e)),
            None => {
                return Some(Err(GraphError::Invalid(
                    "a part of a split batch did not run".into(),
                )))
            }
        }
    }
    // Each output back along the batch; one that did not come back per image (the analysis
    // was wrong about it) sends the request down the whole-batch path instead.
    let first = parts.first()?;
    let mut outputs = Vec::with_capacity(first.len());
    for (k, (name, t0)) in first.iter().enumerate() {
        let rest = t0.shape().get(1..)?.to_vec();
        let per = t0.byte_len();
        if t0.shape().first() != Some(&1) || t0.dtype() == DType::String {
            return None;
        }
        let mut shape = vec![batch];
        shape.extend_from_slice(&rest);
        let mut images = Vec::with_capacity(batch);
        for p in &parts {
            let (_, t) = p.get(k)?;
            if t.dtype() != t0.dtype() || t.shape() != t0.shape() || t.device_mem().is_some() {
                return None;
            }
            images.push(t.bytes());
        }
        // Copied once each into a buffer not zeroed first (a zeroed one cost the daemon a
        // pass over the batch's output before the copies).
        let whole = match HostTensor::from_byte_parts(t0.dtype(), &shape, &images) {
            Ok(t) => t,
            Err(e) => {
                return Some(Err(GraphError::Invalid(format!(
                    "output '{name}': {}",
                    e.message
                ))))
            }
        };
        debug_assert_eq!(whole.byte_len(), batch * per);
        outputs.push((name.clone(), Arc::new(whole)));
    }
    Some(Ok(outputs))
}

/// Image `bytes` (a part of `batch`'s memory) as a tensor of `shape` over that memory, kept
/// alive by `batch`: no copy. Only where the image starts on the alignment the kernels are
/// promised for planned ranges ([`host::ALIGN`]); `None` otherwise (and for strings).
///
/// The view is only read: it is a graph input of the part's run, which kernels see as an
/// input and never write, and nothing else holds it mutably.
fn image_view(batch: &Arc<HostTensor>, shape: &[usize], bytes: &[u8]) -> Option<HostTensor> {
    if bytes.is_empty()
        || !(bytes.as_ptr() as usize).is_multiple_of(host::ALIGN)
        || batch.dtype() == DType::String
    {
        return None;
    }
    let planned = host::PlannedBuf {
        ptr: std::ptr::NonNull::new(bytes.as_ptr().cast_mut())?,
        len: bytes.len(),
        keep: batch.clone(),
        holds_input: false,
    };
    HostTensor::over_planned(batch.dtype(), shape, &planned).ok()
}
