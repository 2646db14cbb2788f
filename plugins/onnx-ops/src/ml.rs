//! `ai.onnx.ml` operators: LabelEncoder, Binarizer, ArrayFeatureExtractor and TreeEnsemble.

use crate::util::numel;
use opreg_sdk::{
    abi_stable::std_types::RString,
    alloc::try_vec,
    half::{bf16, f16},
    prelude::*,
};
use std::collections::HashMap;

const ML: &str = "ai.onnx.ml";

type Factory = fn(&NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError>;

/// The numbers of a numeric attribute tensor, as f64.
fn tensor_f64s(op: &str, name: &str, t: &OwnedTensor) -> Result<Vec<f64>, PluginError> {
    Ok(match t.dtype {
        DType::F32 => t.to_vec::<f32>()?.into_iter().map(f64::from).collect(),
        DType::F64 => t.to_vec::<f64>()?,
        DType::F16 => t.to_vec::<f16>()?.into_iter().map(f64::from).collect(),
        DType::BF16 => t.to_vec::<bf16>()?.into_iter().map(f64::from).collect(),
        _ => tensor_i64s(op, name, t)?
            .into_iter()
            .map(|v| v as f64)
            .collect(),
    })
}

/// The integers of an integer attribute tensor, as i64.
fn tensor_i64s(op: &str, name: &str, t: &OwnedTensor) -> Result<Vec<i64>, PluginError> {
    Ok(match t.dtype {
        DType::Bool | DType::U8 => t.to_vec::<u8>()?.into_iter().map(i64::from).collect(),
        DType::I8 => t.to_vec::<i8>()?.into_iter().map(i64::from).collect(),
        DType::U16 => t.to_vec::<u16>()?.into_iter().map(i64::from).collect(),
        DType::I16 => t.to_vec::<i16>()?.into_iter().map(i64::from).collect(),
        DType::U32 => t.to_vec::<u32>()?.into_iter().map(i64::from).collect(),
        DType::I32 => t.to_vec::<i32>()?.into_iter().map(i64::from).collect(),
        DType::U64 => t.to_vec::<u64>()?.into_iter().map(|v| v as i64).collect(),
        DType::I64 => t.to_vec::<i64>()?,
        other => {
            return Err(PluginError::invalid(format!(
                "{op}: attribute '{name}' is a {other} tensor, expected integers"
            )))
        }
    })
}

fn tensor_attr<'a>(
    node: &'a NodeInfo<'_>,
    name: &str,
) -> Result<Option<&'a OwnedTensor>, PluginError> {
    match node.attr(name) {
        None => Ok(None),
        Some(AttrValue::Tensor(t)) => Ok(Some(t)),
        Some(other) => Err(PluginError::invalid(format!(
            "{}: attribute '{name}' must be TENSOR, got {other:?}",
            node.op_type
        ))),
    }
}

fn strings_attr(node: &NodeInfo<'_>, name: &str) -> Result<Option<Vec<String>>, PluginError> {
    match node.attr(name) {
        None => Ok(None),
        Some(AttrValue::Strings(v)) => Ok(Some(v.iter().map(|s| s.to_string()).collect())),
        Some(other) => Err(PluginError::invalid(format!(
            "{}: attribute '{name}' must be STRINGS, got {other:?}",
            node.op_type
        ))),
    }
}

/// A numeric input as f64 values.
fn input_f64s(op: &str, t: &TensorView<'_>) -> Result<Vec<f64>, PluginError> {
    Ok(match t.dtype {
        DType::F32 => t.as_slice::<f32>()?.iter().map(|&v| v as f64).collect(),
        DType::F64 => t.as_slice::<f64>()?.to_vec(),
        DType::F16 => t.as_slice::<f16>()?.iter().map(|v| v.to_f64()).collect(),
        DType::BF16 => t.as_slice::<bf16>()?.iter().map(|v| v.to_f64()).collect(),
        DType::Bool
        | DType::U8
        | DType::I8
        | DType::U16
        | DType::I16
        | DType::U32
        | DType::I32
        | DType::U64
        | DType::I64 => t.to_i64s()?.into_iter().map(|v| v as f64).collect(),
        other => {
            return Err(PluginError::invalid(format!(
                "{op}: input of type {other} is not numeric"
            )))
        }
    })
}

/// Writes `v` into output `i` of numeric `dtype`, converting.
fn write_f64s(
    ctx: &KernelContext<'_>,
    i: usize,
    dtype: DType,
    shape: &[usize],
    v: impl Iterator<Item = f64>,
) -> Result<(), PluginError> {
    macro_rules! put {
        ($t:ty, $conv:expr) => {{
            let out = ctx.output_slice::<$t>(i, shape)?;
            for (o, x) in out.iter_mut().zip(v) {
                *o = $conv(x);
            }
        }};
    }
    match dtype {
        DType::F32 => put!(f32, |x: f64| x as f32),
        DType::F64 => put!(f64, |x: f64| x),
        DType::F16 => put!(f16, f16::from_f64),
        DType::BF16 => put!(bf16, bf16::from_f64),
        DType::I64 => put!(i64, |x: f64| x as i64),
        DType::I32 => put!(i32, |x: f64| x as i32),
        DType::I16 => put!(i16, |x: f64| x as i16),
        DType::I8 => put!(i8, |x: f64| x as i8),
        DType::U64 => put!(u64, |x: f64| x as u64),
        DType::U32 => put!(u32, |x: f64| x as u32),
        DType::U16 => put!(u16, |x: f64| x as u16),
        DType::U8 | DType::Bool => {
            let out = ctx.output(i, dtype, shape)?.into_bytes()?;
            for (o, x) in out.iter_mut().zip(v) {
                *o = x as u8;
            }
        }
        other => {
            return Err(PluginError::unimplemented(format!(
                "write_f64s: {other} output"
            )));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- LabelEncoder

/// A lookup key: strings, integers, or floats (by canonical bits: every NaN is one key, and
/// -0.0 is 0.0).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Str(String),
    Int(i64),
    Float(u64),
}

fn float_key(v: f64) -> Key {
    if v.is_nan() {
        Key::Float(f64::NAN.to_bits())
    } else if v == 0.0 {
        Key::Float(0f64.to_bits())
    } else {
        Key::Float(v.to_bits())
    }
}

/// The values a LabelEncoder maps to, with the output type.
#[derive(Clone, Debug)]
enum Values {
    Strings(Vec<String>, String),
    /// Numbers (exact for every integer the attributes can hold up to 2^53), with the
    /// output dtype.
    Numbers(Vec<f64>, f64, DType),
}

#[derive(Clone, Debug)]
struct LabelEncoder {
    map: HashMap<Key, usize>,
    values: Values,
    /// Whether the keys are floats (numeric inputs are looked up as float keys).
    float_keys: bool,
}

fn keys_from_tensor(t: &OwnedTensor) -> Result<(Vec<Key>, bool), PluginError> {
    Ok(match t.dtype {
        DType::String => (
            t.strings.iter().map(|s| Key::Str(s.to_string())).collect(),
            false,
        ),
        DType::F32 | DType::F64 | DType::F16 | DType::BF16 => (
            tensor_f64s("LabelEncoder", "keys_tensor", t)?
                .into_iter()
                .map(float_key)
                .collect(),
            true,
        ),
        _ => (
            tensor_i64s("LabelEncoder", "keys_tensor", t)?
                .into_iter()
                .map(Key::Int)
                .collect(),
            false,
        ),
    })
}

fn label_encoder_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let op = "LabelEncoder";
    let (keys, float_keys) = if let Some(k) = strings_attr(node, "keys_strings")? {
        (k.into_iter().map(Key::Str).collect::<Vec<_>>(), false)
    } else if let Some(k) = node.ints("keys_int64s")? {
        (k.into_iter().map(Key::Int).collect(), false)
    } else if let Some(k) = node.floats("keys_floats")? {
        (k.into_iter().map(|v| float_key(v as f64)).collect(), true)
    } else if let Some(t) = tensor_attr(node, "keys_tensor")? {
        keys_from_tensor(t)?
    } else {
        return Err(PluginError::invalid(format!(
            "{op}: one of keys_strings, keys_int64s, keys_floats, keys_tensor is required"
        )));
    };
    let values = if let Some(v) = strings_attr(node, "values_strings")? {
        Values::Strings(v, node.string_or("default_string", "_Unused")?)
    } else if let Some(v) = node.ints("values_int64s")? {
        Values::Numbers(
            v.into_iter().map(|x| x as f64).collect(),
            node.int_or("default_int64", -1)? as f64,
            DType::I64,
        )
    } else if let Some(v) = node.floats("values_floats")? {
        Values::Numbers(
            v.into_iter().map(f64::from).collect(),
            f64::from(node.float_or("default_float", -0.0)?),
            DType::F32,
        )
    } else if let Some(t) = tensor_attr(node, "values_tensor")? {
        let default = tensor_attr(node, "default_tensor")?;
        if let Some(d) = default {
            if d.dtype != t.dtype || d.len() != 1 {
                return Err(PluginError::invalid(format!(
                    "{op}: attribute 'default_tensor' must hold one {} value",
                    t.dtype
                )));
            }
        }
        if t.dtype == DType::String {
            let dv = default
                .and_then(|d| d.strings.first())
                .map_or("_Unused".to_string(), |s| s.to_string());
            Values::Strings(t.strings.iter().map(|s| s.to_string()).collect(), dv)
        } else {
            let dv = match default {
                Some(d) => tensor_f64s(op, "default_tensor", d)?[0],
                None if t.dtype.is_float() => -0.0,
                None => -1.0,
            };
            Values::Numbers(tensor_f64s(op, "values_tensor", t)?, dv, t.dtype)
        }
    } else {
        return Err(PluginError::invalid(format!(
            "{op}: one of values_strings, values_int64s, values_floats, values_tensor is \
             required"
        )));
    };
    let n_values = match &values {
        Values::Strings(v, _) => v.len(),
        Values::Numbers(v, _, _) => v.len(),
    };
    if n_values != keys.len() {
        return Err(PluginError::invalid(format!(
            "{op}: {} keys but {n_values} values",
            keys.len()
        )));
    }
    let mut map = HashMap::with_capacity(keys.len());
    for (i, k) in keys.into_iter().enumerate() {
        map.entry(k).or_insert(i);
    }
    Ok(Box::new(LabelEncoder {
        map,
        values,
        float_keys,
    }))
}

impl Kernel for LabelEncoder {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = crate::util::input("LabelEncoder", inputs, 0, "X")?;
        let keys: Vec<Key> = match x.dtype {
            DType::String => x
                .as_strings()?
                .iter()
                .map(|s| Key::Str(s.to_string()))
                .collect(),
            t if t.is_float() || self.float_keys => input_f64s("LabelEncoder", &x)?
                .into_iter()
                .map(float_key)
                .collect(),
            _ => x.to_i64s()?.into_iter().map(Key::Int).collect(),
        };
        let idx = keys.iter().map(|k| self.map.get(k).copied());
        match &self.values {
            Values::Strings(v, d) => {
                let out = ctx.output(0, DType::String, x.shape())?.into_strings()?;
                for (o, i) in out.iter_mut().zip(idx) {
                    *o = RString::from(i.map_or(d.as_str(), |i| v[i].as_str()));
                }
            }
            Values::Numbers(v, d, dtype) => {
                write_f64s(
                    ctx,
                    0,
                    *dtype,
                    x.shape(),
                    idx.map(|i| i.map_or(*d, |i| v[i])),
                )?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- Binarizer

#[derive(Clone)]
struct Binarizer {
    threshold: f64,
}

fn binarizer_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Binarizer {
        threshold: f64::from(node.float_or("threshold", 0.0)?),
    }))
}

impl Kernel for Binarizer {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = crate::util::input("Binarizer", inputs, 0, "X")?;
        let v = input_f64s("Binarizer", &x)?;
        let t = self.threshold;
        write_f64s(
            ctx,
            0,
            x.dtype,
            x.shape(),
            v.into_iter().map(|e| if e > t { 1.0 } else { 0.0 }),
        )
    }
}

// ---------------------------------------------------------------- ArrayFeatureExtractor

#[derive(Clone)]
struct ArrayFeatureExtractor;

impl Kernel for ArrayFeatureExtractor {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let [x, y] = crate::util::required("ArrayFeatureExtractor", inputs, ["X", "Y"])?;
        let idx = y.to_i64s()?;
        let shape = x.shape();
        let Some(&last) = shape.last() else {
            return Err(PluginError::invalid(
                "ArrayFeatureExtractor: input 'X' must have rank >= 1",
            ));
        };
        let idx: Vec<usize> = idx
            .iter()
            .map(|&i| {
                if (0..last as i64).contains(&i) {
                    Ok(i as usize)
                } else {
                    Err(PluginError::invalid(format!(
                        "ArrayFeatureExtractor: index {i} in 'Y' is outside [0, {last})"
                    )))
                }
            })
            .collect::<Result<_, _>>()?;
        let out_shape: Vec<usize> = if shape.len() == 1 {
            vec![1, idx.len()]
        } else {
            let mut s = shape[..shape.len() - 1].to_vec();
            s.push(idx.len());
            s
        };
        let rows = x.len().checked_div(last).unwrap_or(0);
        if x.dtype == DType::String {
            let xs = x.as_strings()?;
            let out = ctx.output(0, DType::String, &out_shape)?.into_strings()?;
            for r in 0..rows {
                for (k, &i) in idx.iter().enumerate() {
                    out[r * idx.len() + k] = xs[r * last + i].clone();
                }
            }
        } else {
            let size = x.dtype.size();
            let xb = x.as_bytes()?;
            let out = ctx.output(0, x.dtype, &out_shape)?.into_bytes()?;
            for r in 0..rows {
                for (k, &i) in idx.iter().enumerate() {
                    let (o, s) = ((r * idx.len() + k) * size, (r * last + i) * size);
                    out[o..o + size].copy_from_slice(&xb[s..s + size]);
                }
            }
        }
        Ok(())
    }
}

fn array_feature_extractor_factory(_: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(ArrayFeatureExtractor))
}

// ---------------------------------------------------------------- TreeEnsemble

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Aggregate {
    Average,
    Sum,
    Min,
    Max,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PostTransform {
    None,
    Softmax,
    Logistic,
    SoftmaxZero,
    Probit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Leq,
    Lt,
    Gte,
    Gt,
    Eq,
    Neq,
    Member,
}

/// Where a branch goes: another node or a leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    Node(usize),
    Leaf(usize),
}

#[derive(Clone, Debug)]
struct TreeNode {
    mode: Mode,
    feature: usize,
    split: f64,
    /// Index into `TreeEnsemble::members` for `Mode::Member`.
    members: usize,
    missing_true: bool,
    yes: Next,
    no: Next,
}

#[derive(Clone, Debug)]
struct TreeEnsemble {
    nodes: Vec<TreeNode>,
    members: Vec<Vec<f64>>,
    /// Where each tree starts.
    roots: Vec<Next>,
    leaf_targets: Vec<usize>,
    leaf_weights: Vec<f64>,
    n_targets: usize,
    n_features: usize,
    aggregate: Aggregate,
    post: PostTransform,
}

fn tree_ensemble_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let op = "TreeEnsemble";
    let ints = |name: &str| -> Result<Vec<i64>, PluginError> {
        node.ints(name)?
            .ok_or_else(|| PluginError::invalid(format!("{op}: attribute '{name}' is required")))
    };
    let tensor = |name: &str| -> Result<&OwnedTensor, PluginError> {
        tensor_attr(node, name)?
            .ok_or_else(|| PluginError::invalid(format!("{op}: attribute '{name}' is required")))
    };
    let featureids = ints("nodes_featureids")?;
    let n = featureids.len();
    let modes = tensor_i64s(op, "nodes_modes", tensor("nodes_modes")?)?;
    let splits = tensor_f64s(op, "nodes_splits", tensor("nodes_splits")?)?;
    let true_ids = ints("nodes_truenodeids")?;
    let false_ids = ints("nodes_falsenodeids")?;
    let true_leafs = ints("nodes_trueleafs")?;
    let false_leafs = ints("nodes_falseleafs")?;
    let missing = node.ints("nodes_missing_value_tracks_true")?;
    let leaf_targets = ints("leaf_targetids")?;
    let leaf_weights = tensor_f64s(op, "leaf_weights", tensor("leaf_weights")?)?;
    let roots = ints("tree_roots")?;
    let n_targets = node.int_or("n_targets", -1)?;
    if n_targets <= 0 {
        return Err(PluginError::invalid(format!(
            "{op}: attribute 'n_targets' must be positive, got {n_targets}"
        )));
    }
    let n_targets = n_targets as usize;
    for (name, len) in [
        ("nodes_modes", modes.len()),
        ("nodes_splits", splits.len()),
        ("nodes_truenodeids", true_ids.len()),
        ("nodes_falsenodeids", false_ids.len()),
        ("nodes_trueleafs", true_leafs.len()),
        ("nodes_falseleafs", false_leafs.len()),
        (
            "nodes_missing_value_tracks_true",
            missing.as_ref().map_or(n, Vec::len),
        ),
    ] {
        if len != n {
            return Err(PluginError::invalid(format!(
                "{op}: attribute '{name}' has {len} values, nodes_featureids {n}"
            )));
        }
    }
    if leaf_targets.len() != leaf_weights.len() {
        return Err(PluginError::invalid(format!(
            "{op}: leaf_targetids has {} values, leaf_weights {}",
            leaf_targets.len(),
            leaf_weights.len()
        )));
    }
    let n_leaves = leaf_targets.len();
    let next = |id: i64, leaf: i64, what: &str| -> Result<Next, PluginError> {
        let bound = if leaf != 0 { n_leaves } else { n };
        if id < 0 || id as usize >= bound {
            return Err(PluginError::invalid(format!(
                "{op}: {what} {id} is outside [0, {bound})"
            )));
        }
        Ok(if leaf != 0 {
            Next::Leaf(id as usize)
        } else {
            Next::Node(id as usize)
        })
    };
    // Set members: one NaN-terminated run per BRANCH_MEMBER node, in node order.
    let mut member_runs = Vec::new();
    if let Some(t) = tensor_attr(node, "membership_values")? {
        let mut cur = Vec::new();
        for v in tensor_f64s(op, "membership_values", t)? {
            if v.is_nan() {
                member_runs.push(std::mem::take(&mut cur));
            } else {
                cur.push(v);
            }
        }
        if !cur.is_empty() {
            member_runs.push(cur);
        }
    }
    let mut runs = member_runs.into_iter();
    let mut members = Vec::new();
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let mode = match modes[i] {
            0 => Mode::Leq,
            1 => Mode::Lt,
            2 => Mode::Gte,
            3 => Mode::Gt,
            4 => Mode::Eq,
            5 => Mode::Neq,
            6 => Mode::Member,
            m => {
                return Err(PluginError::invalid(format!(
                    "{op}: attribute 'nodes_modes' holds unknown mode {m}"
                )))
            }
        };
        let mut member_idx = 0;
        if mode == Mode::Member {
            let run = runs.next().ok_or_else(|| {
                PluginError::invalid(format!(
                    "{op}: attribute 'membership_values' has too few sets for the \
                     BRANCH_MEMBER nodes"
                ))
            })?;
            member_idx = members.len();
            members.push(run);
        }
        if featureids[i] < 0 {
            return Err(PluginError::invalid(format!(
                "{op}: attribute 'nodes_featureids' holds {}",
                featureids[i]
            )));
        }
        nodes.push(TreeNode {
            mode,
            feature: featureids[i] as usize,
            split: splits[i],
            members: member_idx,
            missing_true: missing.as_ref().is_some_and(|m| m[i] != 0),
            yes: next(true_ids[i], true_leafs[i], "nodes_truenodeids")?,
            no: next(false_ids[i], false_leafs[i], "nodes_falsenodeids")?,
        });
    }
    let roots = roots
        .iter()
        .map(|&r| {
            if r < 0 || r as usize >= n {
                return Err(PluginError::invalid(format!(
                    "{op}: attribute 'tree_roots' holds {r}, outside [0, {n})"
                )));
            }
            let r = r as usize;
            // A tree that is a single leaf: both branches go to the same leaf. As the
            // reference, the leaf is the one at the root's index.
            if true_leafs[r] != 0 && false_leafs[r] != 0 && true_ids[r] == false_ids[r] {
                if r >= n_leaves {
                    return Err(PluginError::invalid(format!(
                        "{op}: tree root {r} is a single leaf, but there are only {n_leaves} \
                         leaves"
                    )));
                }
                Ok(Next::Leaf(r))
            } else {
                Ok(Next::Node(r))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(i) = find_cycle(&nodes) {
        return Err(PluginError::invalid(format!(
            "{op}: nodes_truenodeids / nodes_falsenodeids form a cycle (node {i} is on it \
             or reached from it); the nodes must form trees"
        )));
    }
    if let Some(&t) = leaf_targets
        .iter()
        .find(|&&t| t < 0 || t as usize >= n_targets)
    {
        return Err(PluginError::invalid(format!(
            "{op}: attribute 'leaf_targetids' holds {t}, outside [0, {n_targets})"
        )));
    }
    let aggregate = match node.int_or("aggregate_function", 1)? {
        0 => Aggregate::Average,
        1 => Aggregate::Sum,
        2 => Aggregate::Min,
        3 => Aggregate::Max,
        a => {
            return Err(PluginError::invalid(format!(
                "{op}: attribute 'aggregate_function' holds unknown value {a}"
            )))
        }
    };
    let post = match node.int_or("post_transform", 0)? {
        0 => PostTransform::None,
        1 => PostTransform::Softmax,
        2 => PostTransform::Logistic,
        3 => PostTransform::SoftmaxZero,
        4 => PostTransform::Probit,
        p => {
            return Err(PluginError::invalid(format!(
                "{op}: attribute 'post_transform' holds unknown value {p}"
            )))
        }
    };
    let n_features = nodes.iter().map(|n| n.feature + 1).max().unwrap_or(0);
    Ok(Box::new(TreeEnsemble {
        nodes,
        members,
        roots,
        leaf_targets: leaf_targets.iter().map(|&t| t as usize).collect(),
        leaf_weights,
        n_targets,
        n_features,
        aggregate,
        post,
    }))
}

/// A node on or below a cycle of the branch graph, if there is one (`leaf` would never
/// return there). Kahn's algorithm: nodes whose predecessors are all removed are removed in
/// turn; whatever remains lies on, or downstream of, a cycle.
fn find_cycle(nodes: &[TreeNode]) -> Option<usize> {
    let children = |n: &TreeNode| {
        [n.yes, n.no].into_iter().filter_map(|c| match c {
            Next::Node(i) => Some(i),
            Next::Leaf(_) => None,
        })
    };
    let mut indegree = vec![0usize; nodes.len()];
    for n in nodes {
        for c in children(n) {
            indegree[c] += 1;
        }
    }
    let mut ready: Vec<usize> = (0..nodes.len()).filter(|&i| indegree[i] == 0).collect();
    let mut removed = 0;
    while let Some(i) = ready.pop() {
        removed += 1;
        for c in children(&nodes[i]) {
            indegree[c] -= 1;
            if indegree[c] == 0 {
                ready.push(c);
            }
        }
    }
    if removed == nodes.len() {
        return None;
    }
    indegree.iter().position(|&d| d > 0)
}

/// The inverse of the standard normal CDF (Acklam's rational approximation, refined by one
/// Halley step), as PROBIT uses.
fn probit(p: f64) -> f64 {
    if p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    let x = if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    };
    // One Halley step on erfc.
    let e = 0.5 * erfc(-x / std::f64::consts::SQRT_2) - p;
    let u = e * (2.0 * std::f64::consts::PI).sqrt() * (x * x / 2.0).exp();
    x - u / (1.0 + x * u / 2.0)
}

/// The complementary error function (fractional error below 1.2e-7).
fn erfc(x: f64) -> f64 {
    // A Chebyshev-fitted exponential (Numerical Recipes' erfcc).
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

impl TreeEnsemble {
    /// The leaf `x` reaches from `start`.
    fn leaf(&self, x: &[f64], start: Next) -> usize {
        let mut at = start;
        loop {
            match at {
                Next::Leaf(l) => return l,
                Next::Node(i) => {
                    let n = &self.nodes[i];
                    let v = x[n.feature];
                    let hit = (n.missing_true && v.is_nan())
                        || match n.mode {
                            Mode::Leq => v <= n.split,
                            Mode::Lt => v < n.split,
                            Mode::Gte => v >= n.split,
                            Mode::Gt => v > n.split,
                            Mode::Eq => v == n.split,
                            Mode::Neq => v != n.split,
                            Mode::Member => self.members[n.members].contains(&v),
                        };
                    at = if hit { n.yes } else { n.no };
                }
            }
        }
    }

    fn post_transform(&self, row: &mut [f64]) {
        match self.post {
            PostTransform::None => {}
            PostTransform::Logistic => {
                for v in row.iter_mut() {
                    *v = 1.0 / (1.0 + (-*v).exp());
                }
            }
            PostTransform::Softmax => {
                let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let mut s = 0.0;
                for v in row.iter_mut() {
                    *v = (*v - m).exp();
                    s += *v;
                }
                row.iter_mut().for_each(|v| *v /= s);
            }
            PostTransform::SoftmaxZero => {
                // Softmax over the non-zero entries; zeros stay zero.
                let m = row
                    .iter()
                    .copied()
                    .filter(|&v| v != 0.0)
                    .fold(f64::NEG_INFINITY, f64::max);
                let mut s = 0.0;
                for v in row.iter_mut() {
                    if *v != 0.0 {
                        *v = (*v - m).exp();
                        s += *v;
                    }
                }
                if s > 0.0 {
                    row.iter_mut().for_each(|v| *v /= s);
                }
            }
            PostTransform::Probit => {
                for v in row.iter_mut() {
                    *v = probit(*v);
                }
            }
        }
    }
}

impl Kernel for TreeEnsemble {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = crate::util::input("TreeEnsemble", inputs, 0, "X")?;
        let (rows, cols) = match x.shape() {
            &[n, f] => (n, f),
            &[f] => (1, f),
            s => {
                return Err(PluginError::invalid(format!(
                    "TreeEnsemble: input 'X' must be [N, F], got {s:?}"
                )))
            }
        };
        if cols < self.n_features {
            return Err(PluginError::invalid(format!(
                "TreeEnsemble: input 'X' has {cols} features, the trees read {}",
                self.n_features
            )));
        }
        if !matches!(x.dtype, DType::F32 | DType::F64 | DType::F16) {
            return Err(PluginError::invalid(format!(
                "TreeEnsemble: input 'X' of type {} is not supported (f32, f64, f16)",
                x.dtype
            )));
        }
        let xv = input_f64s("TreeEnsemble", &x)?;
        // The reference starts MIN / MAX from the type's finite extremes.
        let (lo, hi) = match x.dtype {
            DType::F32 => (f32::MIN as f64, f32::MAX as f64),
            DType::F16 => (f16::MIN.to_f64(), f16::MAX.to_f64()),
            _ => (f64::MIN, f64::MAX),
        };
        let init = match self.aggregate {
            Aggregate::Sum | Aggregate::Average => 0.0,
            Aggregate::Min => hi,
            Aggregate::Max => lo,
        };
        let nt = self.n_targets;
        // n_targets is an attribute, and X may be empty with a huge row count: fallible.
        let mut y = try_vec(numel(&[rows, nt])?, init)?;
        let trees = self.roots.len() as f64;
        for (r, out) in y.chunks_mut(nt).enumerate() {
            let xr = &xv[r * cols..(r + 1) * cols];
            for &root in &self.roots {
                let l = self.leaf(xr, root);
                let (t, w) = (self.leaf_targets[l], self.leaf_weights[l]);
                let o = &mut out[t];
                match self.aggregate {
                    Aggregate::Sum => *o += w,
                    Aggregate::Average => *o += w / trees,
                    Aggregate::Min => *o = o.min(w),
                    Aggregate::Max => *o = o.max(w),
                }
            }
            self.post_transform(out);
        }
        let shape = [rows, nt];
        write_f64s(ctx, 0, x.dtype, &shape, y.into_iter())
    }
}

fn reg(
    r: &mut Registrar,
    op: &str,
    versions: &[i32],
    constraints: &[(&str, &[DType])],
    inputs: &[&str],
    outputs: &[&str],
    f: Factory,
) {
    for (i, &since) in versions.iter().enumerate() {
        let end = versions.get(i + 1).map_or(OPEN_END, |next| next - 1);
        let mut desc = KernelDesc::new(ML, op, since, end)
            .inputs(inputs)
            .outputs(outputs);
        for (name, types) in constraints {
            desc = desc.constraint(name, types);
        }
        r.kernel(desc, f);
    }
}

pub fn register(r: &mut Registrar) {
    let num: &[DType] = &[DType::F32, DType::F64, DType::I64, DType::I32];
    reg(
        r,
        "Binarizer",
        &[1],
        &[("T", num)],
        &["T"],
        &["T"],
        binarizer_factory,
    );
    reg(
        r,
        "ArrayFeatureExtractor",
        &[1],
        &[
            (
                "T",
                &[
                    DType::F32,
                    DType::F64,
                    DType::I64,
                    DType::I32,
                    DType::String,
                ],
            ),
            ("Tind", &[DType::I64]),
        ],
        &["T", "Tind"],
        &["T"],
        array_feature_extractor_factory,
    );
    // 1 had classes_strings / default_*; 2 keys_* / values_*; 4 added tensors and more types.
    reg(
        r,
        "LabelEncoder",
        &[2, 4],
        &[],
        &["T1"],
        &["T2"],
        label_encoder_factory,
    );
    reg(
        r,
        "TreeEnsemble",
        &[5],
        &[("T", &[DType::F32, DType::F64, DType::F16])],
        &["T"],
        &["T"],
        tree_ensemble_factory,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testcases::run_cases_min;
    use opreg_sdk::{
        host::HostTensor,
        testkit::{run_kernel, NodeSpec},
    };

    #[test]
    fn official_cases() {
        run_cases_min(&["test_ai_onnx_ml_label_encoder"], 4, label_encoder_factory);
        run_cases_min(&["test_ai_onnx_ml_binarizer"], 1, binarizer_factory);
        run_cases_min(
            &["test_ai_onnx_ml_array_feature_extractor"],
            1,
            array_feature_extractor_factory,
        );
        run_cases_min(&["test_ai_onnx_ml_tree_ensemble"], 2, tree_ensemble_factory);
    }

    #[test]
    fn label_encoder_float_keys_to_strings() {
        let x = HostTensor::from_vec(&[3], &[1.5f32, f32::NAN, 7.0]).expect("x");
        let node = NodeSpec::onnx("LabelEncoder", 2)
            .domain(ML)
            .attr("keys_floats", AttrValue::Floats(vec![1.5, f32::NAN]))
            .attr(
                "values_strings",
                AttrValue::Strings(vec!["a".into(), "nan".into()]),
            );
        let out = run_kernel(label_encoder_factory, &node, &[&x], None).expect("run");
        let got: Vec<&str> = out[0].strings().iter().map(|s| s.as_str()).collect();
        assert_eq!(got, vec!["a", "nan", "_Unused"]);
    }

    fn tree(aggregate: i64, post: i64) -> NodeSpec {
        // One stump per tree: x0 <= 0.5 ? leaf 0 : leaf 1 (tree 0); x0 < 2 ? leaf 2 : leaf 3.
        NodeSpec::onnx("TreeEnsemble", 5)
            .domain(ML)
            .attr("n_targets", AttrValue::Int(2))
            .attr("aggregate_function", AttrValue::Int(aggregate))
            .attr("post_transform", AttrValue::Int(post))
            .attr("tree_roots", AttrValue::Ints(vec![0, 1]))
            .attr("nodes_featureids", AttrValue::Ints(vec![0, 0]))
            .attr(
                "nodes_modes",
                AttrValue::Tensor(OwnedTensor::from_vec(vec![2], vec![0u8, 1]).expect("m")),
            )
            .attr(
                "nodes_splits",
                AttrValue::Tensor(OwnedTensor::from_vec(vec![2], vec![0.5f32, 2.0]).expect("s")),
            )
            .attr("nodes_truenodeids", AttrValue::Ints(vec![0, 2]))
            .attr("nodes_falsenodeids", AttrValue::Ints(vec![1, 3]))
            .attr("nodes_trueleafs", AttrValue::Ints(vec![1, 1]))
            .attr("nodes_falseleafs", AttrValue::Ints(vec![1, 1]))
            .attr("leaf_targetids", AttrValue::Ints(vec![0, 1, 0, 1]))
            .attr(
                "leaf_weights",
                AttrValue::Tensor(
                    OwnedTensor::from_vec(vec![4], vec![1.0f32, 2.0, 4.0, 8.0]).expect("w"),
                ),
            )
    }

    #[test]
    fn tree_ensemble_aggregates_and_transforms() {
        let x = HostTensor::from_vec(&[2, 1], &[0.0f32, 1.0]).expect("x");
        let run = |agg, post| {
            run_kernel(tree_ensemble_factory, &tree(agg, post), &[&x], None)
                .expect("run")
                .remove(0)
                .to_vec::<f32>()
                .expect("f32")
        };
        // Row 0 reaches leaves 0 (t0, 1) and 2 (t0, 4); row 1 leaves 1 (t1, 2) and 2 (t0, 4).
        assert_eq!(run(1, 0), vec![5.0, 0.0, 4.0, 2.0]);
        assert_eq!(run(0, 0), vec![2.5, 0.0, 2.0, 1.0]);
        assert_eq!(run(2, 0), vec![1.0, f32::MAX, 4.0, 2.0]);
        assert_eq!(run(3, 0), vec![4.0, f32::MIN, 4.0, 2.0]);
        let l = run(1, 2);
        assert!((l[0] - 1.0 / (1.0 + (-5f32).exp())).abs() < 1e-6);
        let s = run(1, 1);
        assert!((s[0] + s[1] - 1.0).abs() < 1e-6 && s[0] > s[1]);
        assert!((probit(0.975) - 1.959_963_984_540_054).abs() < 1e-6);
        assert!(probit(0.5).abs() < 1e-6);
    }

    #[test]
    fn array_feature_extractor_strings_and_bounds() {
        let x = HostTensor::from_strings(&[2, 2], &[b"a", b"b", b"c", b"d"]).expect("x");
        let y = HostTensor::from_vec(&[1], &[1i64]).expect("y");
        let node = NodeSpec::onnx("ArrayFeatureExtractor", 1).domain(ML);
        let out = run_kernel(array_feature_extractor_factory, &node, &[&x, &y], None).expect("run");
        assert_eq!(out[0].shape(), &[2, 1]);
        let got: Vec<&str> = out[0].strings().iter().map(|s| s.as_str()).collect();
        assert_eq!(got, vec!["b", "d"]);
        let bad = HostTensor::from_vec(&[1], &[2i64]).expect("y");
        assert!(run_kernel(array_feature_extractor_factory, &node, &[&x, &bad], None).is_err());
    }

    /// `tree` with attribute `name` replaced.
    fn with(name: &str, value: AttrValue) -> NodeSpec {
        let mut node = tree(1, 0);
        node.attributes.retain(|a| a.name.as_str() != name);
        node.attr(name, value)
    }

    fn refused(node: &NodeSpec, what: &str) {
        let x = HostTensor::from_vec(&[1, 1], &[0.0f32]).expect("x");
        let e = run_kernel(tree_ensemble_factory, node, &[&x], None).expect_err("refused");
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{}", e.message);
        assert!(e.message.contains(what), "{}", e.message);
    }

    /// Node 0's true branch goes to node 1, whose false branch goes back to node 0: `leaf`
    /// used to loop forever on such a graph; the node is refused when instantiated.
    #[test]
    fn tree_ensemble_cycles_are_refused() {
        let ids = |v: &[i64]| AttrValue::Ints(v.to_vec());
        let mut node = with("nodes_truenodeids", ids(&[1, 2]));
        node.attributes.retain(|a| {
            !matches!(
                a.name.as_str(),
                "nodes_trueleafs" | "nodes_falsenodeids" | "nodes_falseleafs" | "tree_roots"
            )
        });
        let node = node
            .attr("nodes_trueleafs", ids(&[0, 1]))
            .attr("nodes_falsenodeids", ids(&[1, 0]))
            .attr("nodes_falseleafs", ids(&[1, 0]))
            .attr("tree_roots", ids(&[0]));
        refused(&node, "cycle");
        // A self-loop.
        let mut node = with("nodes_trueleafs", ids(&[0, 1]));
        node.attributes
            .retain(|a| a.name.as_str() != "nodes_truenodeids");
        refused(&node.attr("nodes_truenodeids", ids(&[0, 2])), "cycle");
    }

    /// Child ids past the node or leaf lists, and a single-leaf root past the leaves.
    #[test]
    fn tree_ensemble_out_of_range_ids_are_refused() {
        let ids = |v: &[i64]| AttrValue::Ints(v.to_vec());
        refused(
            &with("nodes_truenodeids", ids(&[0, 9])),
            "nodes_truenodeids",
        );
        refused(
            &with("nodes_falsenodeids", ids(&[-1, 3])),
            "nodes_falsenodeids",
        );
        refused(&with("tree_roots", ids(&[0, 5])), "tree_roots");
        // Root 1 is a single leaf (both branches to leaf 0) at index 1 of a 1-leaf list.
        let mut node = with("leaf_targetids", ids(&[0]));
        node.attributes.retain(|a| {
            !matches!(
                a.name.as_str(),
                "leaf_weights" | "nodes_truenodeids" | "nodes_falsenodeids"
            )
        });
        let node = node
            .attr(
                "leaf_weights",
                AttrValue::Tensor(OwnedTensor::from_vec(vec![1], vec![1.0f32]).expect("w")),
            )
            .attr("nodes_truenodeids", ids(&[0, 0]))
            .attr("nodes_falsenodeids", ids(&[0, 0]));
        refused(&node, "single leaf");
    }

    /// n_targets of 2^62 sizes the result rows: refused as too large instead of aborting.
    #[test]
    fn tree_ensemble_huge_n_targets_is_resource_exhausted() {
        let mut node = tree(1, 0);
        node.attributes.retain(|a| a.name.as_str() != "n_targets");
        let node = node.attr("n_targets", AttrValue::Int(1 << 62));
        let x = HostTensor::from_vec(&[2, 1], &[0.0f32, 1.0]).expect("x");
        let e = run_kernel(tree_ensemble_factory, &node, &[&x], None).expect_err("too large");
        assert_eq!(e.code, ErrorCode::ResourceExhausted, "{}", e.message);
    }
}
