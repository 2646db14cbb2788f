//! Sequence and optional values inside graphs: the runtime's values are tensors, sequences of
//! tensors, or empty optionals, and the sequence and optional operators run on the host, like
//! control flow (an optional holding a value is that value).
//!
//! Why the daemon and not a plugin: the kernel ABI hands kernels tensors. A sequence is a
//! list of tensors the runtime already holds (`Arc`s); the operators on it build, index and
//! take apart lists — they move no element data except `SplitToSequence` and
//! `ConcatFromSequence`, which copy bytes once. Keeping them here means a sequence never
//! crosses the ABI and a plugin never has to know the type.
//!
//! KServe v2 carries tensors only, so a model whose inputs or outputs are sequences is
//! refused at load (import says so); inside the graph — `SplitToSequence` →
//! `ConcatFromSequence`, `SequenceConstruct` → `SequenceAt`, sequences carried through `Loop`
//! — they run. Bad positions and mismatched element types fail the request with the node
//! named.

// Request and model data reach this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use super::{axis, compiled::Step, import::Node, values::Values, GraphError};
use opreg_sdk::{host::HostTensor, AttrValue, DType};
use std::sync::Arc;

/// Most elements a sequence may hold. Each element is a tensor the runtime tracks (a few
/// hundred bytes even when empty), and an element count can come from data (an empty tensor
/// with a huge extent split per element), so it is bounded on its own.
pub const MAX_SEQUENCE_LEN: usize = 1 << 20;

/// A sequence of tensors of one element type.
#[derive(Debug)]
pub struct Sequence {
    /// The element type (declared by `SequenceEmpty`, else its elements').
    pub dtype: DType,
    pub items: Vec<Arc<HostTensor>>,
}

/// A runtime value: a tensor, a sequence of tensors, or an optional without a value (an
/// optional with one is its value).
#[derive(Clone, Debug)]
pub enum Slot {
    Tensor(Arc<HostTensor>),
    Seq(Arc<Sequence>),
    Empty,
}

impl Slot {
    /// Bytes the value holds (a sequence: its elements').
    pub fn byte_len(&self) -> usize {
        match self {
            Slot::Tensor(t) => t.byte_len(),
            Slot::Seq(s) => s.items.iter().map(|t| t.byte_len()).sum(),
            Slot::Empty => 0,
        }
    }

    /// The tensor, or an error naming what wanted one.
    pub fn tensor(&self, what: impl FnOnce() -> String) -> Result<&Arc<HostTensor>, GraphError> {
        match self {
            Slot::Tensor(t) => Ok(t),
            Slot::Seq(_) => Err(GraphError::Invalid(format!(
                "{} is a sequence, where a tensor is needed",
                what()
            ))),
            Slot::Empty => Err(GraphError::Invalid(format!(
                "{} is an empty optional, where a tensor is needed",
                what()
            ))),
        }
    }
}

/// The sequence operators, lowered.
#[derive(Clone, Debug)]
pub(super) enum SeqOp {
    Empty(DType),
    Construct,
    Insert,
    Erase,
    At,
    Length,
    Split {
        axis: i64,
        keepdims: bool,
    },
    Concat {
        axis: i64,
        new_axis: bool,
    },
    /// `Identity` of a sequence.
    Identity,
    /// `Optional(x)`: `x`; without an input, an empty optional.
    Optional,
    /// `OptionalHasElement`: whether the input is present and not empty.
    HasElement,
    /// `OptionalGetElement`: the value, or an error when empty.
    GetElement,
}

impl SeqOp {
    /// Whether output 0 is a sequence, given whether input 0 is one.
    pub fn makes_sequence(&self, input_is_seq: bool) -> bool {
        match self {
            SeqOp::Empty(_)
            | SeqOp::Construct
            | SeqOp::Insert
            | SeqOp::Erase
            | SeqOp::Split { .. }
            | SeqOp::Identity => true,
            SeqOp::Optional | SeqOp::GetElement => input_is_seq,
            SeqOp::At | SeqOp::Length | SeqOp::Concat { .. } | SeqOp::HasElement => false,
        }
    }
}

/// The sequence operator `n` is, when it is one: a default-domain sequence operator, or an
/// `Identity` whose input is a sequence (`input_is_seq`).
pub(super) fn op_of(n: &Node, input_is_seq: bool) -> Result<Option<SeqOp>, GraphError> {
    if !n.domain.is_empty() {
        return Ok(None);
    }
    let int = |name: &str, default: i64| match n
        .attributes
        .iter()
        .find(|a| a.name.as_str() == name)
        .map(|a| &a.value)
    {
        Some(AttrValue::Int(v)) => *v,
        _ => default,
    };
    Ok(Some(match n.op_type.as_str() {
        "SequenceEmpty" => {
            let code = int("dtype", 1);
            let dtype = i32::try_from(code)
                .ok()
                .and_then(DType::from_onnx_code)
                .ok_or_else(|| {
                    GraphError::Invalid(format!(
                        "node {}: dtype {code} is not a tensor element type",
                        n.label()
                    ))
                })?;
            SeqOp::Empty(dtype)
        }
        "SequenceConstruct" => SeqOp::Construct,
        "SequenceInsert" => SeqOp::Insert,
        "SequenceErase" => SeqOp::Erase,
        "SequenceAt" => SeqOp::At,
        "SequenceLength" => SeqOp::Length,
        "SplitToSequence" => SeqOp::Split {
            axis: int("axis", 0),
            keepdims: int("keepdims", 1) != 0,
        },
        "ConcatFromSequence" => SeqOp::Concat {
            axis: int("axis", 0),
            new_axis: int("new_axis", 0) != 0,
        },
        "Identity" if input_is_seq => SeqOp::Identity,
        "Optional" => SeqOp::Optional,
        "OptionalHasElement" => SeqOp::HasElement,
        "OptionalGetElement" => SeqOp::GetElement,
        _ => return Ok(None),
    }))
}

/// The element type of `op`'s output 0, from its inputs' types (`None`: unknown).
pub(super) fn output_type(op: &SeqOp, values: &Values, inputs: &[Option<usize>]) -> Option<DType> {
    let ty = |k: usize| {
        inputs
            .get(k)
            .copied()
            .flatten()
            .and_then(|s| values.types.get(s).copied().flatten())
    };
    match op {
        SeqOp::Empty(d) => Some(*d),
        SeqOp::Length => Some(DType::I64),
        SeqOp::HasElement => Some(DType::Bool),
        // The first of the inputs that says.
        SeqOp::Insert => ty(0).or_else(|| ty(1)),
        _ => ty(0),
    }
}

fn invalid(step: &Step, msg: impl std::fmt::Display) -> GraphError {
    GraphError::Invalid(format!("node {}: {msg}", step.label))
}

/// Input `k` as a sequence.
fn seq_in<'a>(
    step: &Step,
    ins: &'a [Option<Slot>],
    k: usize,
) -> Result<&'a Arc<Sequence>, GraphError> {
    match ins.get(k) {
        Some(Some(Slot::Seq(s))) => Ok(s),
        Some(Some(Slot::Tensor(_))) => Err(invalid(
            step,
            format!("input {k} must be a sequence, is a tensor"),
        )),
        Some(Some(Slot::Empty)) => Err(invalid(
            step,
            format!("input {k} (a sequence) is an empty optional"),
        )),
        _ => Err(invalid(step, format!("input {k} (a sequence) is missing"))),
    }
}

/// Input `k` as a tensor, `None` when absent.
fn tensor_in<'a>(
    step: &Step,
    ins: &'a [Option<Slot>],
    k: usize,
) -> Result<Option<&'a Arc<HostTensor>>, GraphError> {
    match ins.get(k) {
        Some(Some(s)) => s
            .tensor(|| format!("node {}: input {k}", step.label))
            .map(Some),
        _ => Ok(None),
    }
}

/// A position input (one integer), checked against `0..len` after adding `len` to a
/// negative one; `inclusive` allows `len` (insert at the end).
fn position(step: &Step, t: &HostTensor, len: usize, inclusive: bool) -> Result<usize, GraphError> {
    let v = t.view().to_i64s().map_err(|e| invalid(step, e.message))?;
    let [p] = v.as_slice() else {
        return Err(invalid(
            step,
            format!("position must be one integer, has {} elements", v.len()),
        ));
    };
    let n = len as i64;
    let idx = if *p < 0 { p + n } else { *p };
    let hi = if inclusive { n } else { n - 1 };
    if idx < 0 || idx > hi {
        return Err(invalid(
            step,
            format!(
                "position {p} is out of range for a sequence of {len} (allowed {}..={hi})",
                -n
            ),
        ));
    }
    Ok(idx as usize)
}

fn seq(dtype: DType, items: Vec<Arc<HostTensor>>) -> Slot {
    Slot::Seq(Arc::new(Sequence { dtype, items }))
}

fn check_type(step: &Step, s: &Sequence, t: &HostTensor) -> Result<(), GraphError> {
    if t.dtype() != s.dtype {
        return Err(invalid(
            step,
            format!(
                "a {} tensor cannot join a sequence of {}",
                t.dtype(),
                s.dtype
            ),
        ));
    }
    Ok(())
}

/// Runs one sequence step.
pub(super) fn run(step: &Step, op: &SeqOp, ins: &[Option<Slot>]) -> Result<Vec<Slot>, GraphError> {
    let err = |e: opreg_sdk::PluginError| invalid(step, e.message);
    Ok(vec![match op {
        SeqOp::Empty(d) => seq(*d, Vec::new()),
        SeqOp::Identity => ins
            .first()
            .cloned()
            .flatten()
            .ok_or_else(|| invalid(step, "input 0 is missing"))?,
        SeqOp::Optional => ins.first().cloned().flatten().unwrap_or(Slot::Empty),
        SeqOp::HasElement => {
            let has = matches!(ins.first(), Some(Some(Slot::Tensor(_) | Slot::Seq(_))));
            Slot::Tensor(Arc::new(
                HostTensor::from_bytes(DType::Bool, &[], &[u8::from(has)]).map_err(err)?,
            ))
        }
        SeqOp::GetElement => match ins.first() {
            Some(Some(v @ (Slot::Tensor(_) | Slot::Seq(_)))) => v.clone(),
            _ => return Err(invalid(step, "the optional is empty")),
        },
        SeqOp::Construct => {
            let items: Vec<Arc<HostTensor>> = (0..ins.len())
                .map(|k| {
                    tensor_in(step, ins, k)?
                        .cloned()
                        .ok_or_else(|| invalid(step, format!("input {k} is missing")))
                })
                .collect::<Result<_, _>>()?;
            let Some(first) = items.first() else {
                return Err(invalid(step, "SequenceConstruct needs at least one tensor"));
            };
            let dtype = first.dtype();
            if let Some(t) = items.iter().find(|t| t.dtype() != dtype) {
                return Err(invalid(
                    step,
                    format!("elements differ in type ({dtype} and {})", t.dtype()),
                ));
            }
            seq(dtype, items)
        }
        SeqOp::Insert => {
            let s = seq_in(step, ins, 0)?;
            let t = tensor_in(step, ins, 1)?
                .ok_or_else(|| invalid(step, "the tensor to insert is missing"))?;
            check_type(step, s, t)?;
            if s.items.len() >= MAX_SEQUENCE_LEN {
                return Err(invalid(
                    step,
                    format!(
                        "the sequence already holds {MAX_SEQUENCE_LEN} elements, the most allowed"
                    ),
                ));
            }
            let at = match tensor_in(step, ins, 2)? {
                Some(p) => position(step, p, s.items.len(), true)?,
                None => s.items.len(),
            };
            let mut items = opreg_sdk::alloc::try_with_capacity(s.items.len() + 1).map_err(err)?;
            items.extend(s.items.iter().cloned());
            items.insert(at, t.clone());
            seq(s.dtype, items)
        }
        SeqOp::Erase => {
            let s = seq_in(step, ins, 0)?;
            if s.items.is_empty() {
                return Err(invalid(step, "cannot erase from an empty sequence"));
            }
            let at = match tensor_in(step, ins, 1)? {
                Some(p) => position(step, p, s.items.len(), false)?,
                None => s.items.len() - 1,
            };
            let mut items = s.items.clone();
            items.remove(at);
            seq(s.dtype, items)
        }
        SeqOp::At => {
            let s = seq_in(step, ins, 0)?;
            let p = tensor_in(step, ins, 1)?.ok_or_else(|| invalid(step, "position is missing"))?;
            let at = position(step, p, s.items.len(), false)?;
            Slot::Tensor(
                s.items
                    .get(at)
                    .cloned()
                    .ok_or_else(|| invalid(step, "position out of range"))?,
            )
        }
        SeqOp::Length => {
            let s = seq_in(step, ins, 0)?;
            Slot::Tensor(Arc::new(
                HostTensor::from_vec::<i64>(&[], &[s.items.len() as i64]).map_err(err)?,
            ))
        }
        SeqOp::Split { axis, keepdims } => {
            let x = tensor_in(step, ins, 0)?.ok_or_else(|| invalid(step, "input 0 is missing"))?;
            let split = tensor_in(step, ins, 1)?;
            split_to_sequence(step, x, split.map(|t| t.as_ref()), *axis, *keepdims)?
        }
        SeqOp::Concat { axis, new_axis } => {
            let s = seq_in(step, ins, 0)?;
            if s.items.is_empty() {
                return Err(invalid(step, "cannot concatenate an empty sequence"));
            }
            let rank = s.items.first().map_or(0, |t| t.shape().len());
            let axis = normalize(step, *axis, rank + usize::from(*new_axis))?;
            Slot::Tensor(Arc::new(
                axis::concat(&s.items, axis, *new_axis).map_err(|e| invalid(step, e))?,
            ))
        }
    }])
}

fn normalize(step: &Step, axis: i64, rank: usize) -> Result<usize, GraphError> {
    let r = rank as i64;
    if axis < -r || axis >= r {
        return Err(invalid(
            step,
            format!("axis {axis} is out of range for rank {rank}"),
        ));
    }
    Ok(if axis < 0 {
        (axis + r) as usize
    } else {
        axis as usize
    })
}

fn split_to_sequence(
    step: &Step,
    x: &HostTensor,
    split: Option<&HostTensor>,
    axis: i64,
    keepdims: bool,
) -> Result<Slot, GraphError> {
    let axis = normalize(step, axis, x.shape().len())?;
    let extent = x.shape().get(axis).copied().unwrap_or(0);
    // Chunk lengths: one per element without `split` (then keepdims applies), a scalar chunk
    // size (the last chunk may be shorter), or explicit lengths summing to the extent.
    let (lens, keep): (Vec<usize>, bool) = match split {
        // The chunk count comes from data (an empty tensor may have a huge extent).
        None if extent > MAX_SEQUENCE_LEN => {
            return Err(invalid(
                step,
                format!(
                "splitting {extent} elements would make a sequence longer than {MAX_SEQUENCE_LEN}"
            ),
            ))
        }
        None => (
            opreg_sdk::alloc::try_vec(extent, 1usize).map_err(|e| invalid(step, e.message))?,
            keepdims,
        ),
        Some(s) => {
            let v = s.view().to_i64s().map_err(|e| invalid(step, e.message))?;
            if v.iter().any(|&l| l < 0) {
                return Err(invalid(
                    step,
                    format!("split lengths must not be negative, got {v:?}"),
                ));
            }
            if s.shape().is_empty() {
                let size = v.first().copied().unwrap_or(0) as usize;
                if size == 0 {
                    return Err(invalid(step, "split size must be positive"));
                }
                if extent.div_ceil(size) > MAX_SEQUENCE_LEN {
                    return Err(invalid(
                        step,
                        format!("splitting {extent} elements by {size} would make a sequence longer than {MAX_SEQUENCE_LEN}"),
                    ));
                }
                let mut lens = opreg_sdk::alloc::try_with_capacity(extent.div_ceil(size))
                    .map_err(|e| invalid(step, e.message))?;
                let mut left = extent;
                while left > 0 {
                    lens.push(size.min(left));
                    left -= size.min(left);
                }
                (lens, true)
            } else {
                let lens: Vec<usize> = v.iter().map(|&l| l as usize).collect();
                if lens.iter().sum::<usize>() != extent {
                    return Err(invalid(
                        step,
                        format!("split lengths {v:?} do not sum to the axis extent {extent}"),
                    ));
                }
                (lens, true)
            }
        }
    };
    let mut items =
        opreg_sdk::alloc::try_with_capacity(lens.len()).map_err(|e| invalid(step, e.message))?;
    let mut start = 0;
    for len in lens {
        items.push(Arc::new(
            axis::slice(x, axis, start, len, keep).map_err(|e| invalid(step, e))?,
        ));
        start += len;
    }
    Ok(seq(x.dtype(), items))
}
