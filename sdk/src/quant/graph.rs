//! The read-only view of a float model a strategy plans on (ABI 1.2).
//!
//! The view is built by the host for one call and borrowed by the strategy: weights are
//! [`TensorView`]s of the host's initializers, never copies (a BERT-base encoder's weights are
//! hundreds of megabytes; a strategy reads the few it needs).

use crate::{DType, TensorView};
use abi_stable::{
    std_types::{ROption, RSlice, RString, RVec},
    StableAbi,
};

/// One node of the model, in execution order.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct NodeView {
    /// Node name (unique; the host names unnamed nodes).
    pub name: RString,
    /// Operator domain (`""` for ONNX).
    pub domain: RString,
    /// Operator type, e.g. `Conv`.
    pub op_type: RString,
    /// Input value names (`""` for an omitted optional input).
    pub inputs: RVec<RString>,
    /// Output value names.
    pub outputs: RVec<RString>,
    /// Reserved for properties added in later minors (0 today).
    pub flags: u64,
}

/// One value of the model: a graph input, a node output or a weight.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct ValueView<'a> {
    /// Value name.
    pub name: RString,
    /// Element type (`UNDEFINED` when the host does not know it).
    pub dtype: DType,
    /// Dimensions (-1 for a symbolic one); `None` when even the rank is unknown.
    pub shape: ROption<RVec<i64>>,
    /// The weight's data, for initializers.
    pub weight: ROption<TensorView<'a>>,
    /// Reserved for properties added in later minors (0 today).
    pub flags: u64,
}

/// A read-only view of a model: its nodes in execution order and its values.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct GraphView<'a> {
    /// Nodes in execution order.
    pub nodes: RSlice<'a, NodeView>,
    /// Every value with a known name.
    pub values: RSlice<'a, ValueView<'a>>,
    /// The model's input names (weights excluded).
    pub inputs: RSlice<'a, RString>,
    /// The model's output names.
    pub outputs: RSlice<'a, RString>,
    /// Reserved for properties added in later minors (0 today).
    pub flags: u64,
}

impl<'a> GraphView<'a> {
    /// The value named `name`.
    pub fn value(&self, name: &str) -> Option<&'a ValueView<'a>> {
        self.values.as_slice().iter().find(|v| v.name == name)
    }

    /// The weight named `name`, when `name` is an initializer.
    pub fn weight(&self, name: &str) -> Option<TensorView<'a>> {
        self.value(name).and_then(|v| v.weight.into_option())
    }

    /// True when `name` is an initializer.
    pub fn is_weight(&self, name: &str) -> bool {
        self.value(name).is_some_and(|v| v.weight.is_some())
    }

    /// The node that writes `name` (none for graph inputs and weights).
    pub fn producer(&self, name: &str) -> Option<&'a NodeView> {
        self.nodes
            .as_slice()
            .iter()
            .find(|n| n.outputs.iter().any(|o| o == name))
    }

    /// The nodes that read `name`.
    pub fn consumers<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'a NodeView> + 's {
        self.nodes
            .as_slice()
            .iter()
            .filter(move |n| n.inputs.iter().any(|i| i == name))
    }

    /// True when `name` is one of the model's outputs.
    pub fn is_output(&self, name: &str) -> bool {
        self.outputs.as_slice().iter().any(|o| o == name)
    }

    /// The activations (inputs that are not weights, and outputs) of every node whose
    /// `op_type` is in `ops`, in first-use order and without repeats — the tensors a
    /// strategy usually observes. A node's output is followed through the bias `Add` and the
    /// `Relu` (or `Clip` with constant bounds: ReLU6) that alone read it
    /// ([`rectified`](GraphView::rectified)): the quantized range of a rectified tensor lies
    /// within the activation's, and the integer kernel absorbs the activation into its output
    /// clamp.
    pub fn activations_of(&self, ops: &[&str]) -> Vec<String> {
        self.activations_where(|n| n.domain.is_empty() && ops.contains(&n.op_type.as_str()))
    }

    /// Like [`activations_of`](GraphView::activations_of), for the nodes `pick` selects.
    pub fn activations_where(&self, pick: impl Fn(&NodeView) -> bool) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut push = |name: &str| {
            if !name.is_empty() && !out.iter().any(|o| o == name) {
                out.push(name.to_string());
            }
        };
        for n in self.nodes.as_slice() {
            if !pick(n) {
                continue;
            }
            for i in n.inputs.iter().filter(|i| !self.is_weight(i)) {
                push(i);
            }
            for o in n.outputs.iter() {
                push(&self.rectified(o));
            }
        }
        out
    }

    /// `name`, or what it becomes through the per-channel bias `Add` (a constant added) and
    /// the `Relu` or constant-bound `Clip` that alone read it (see
    /// [`activations_of`](GraphView::activations_of)): the bias belongs to the product
    /// (quantizing before it adds an extra rounding, which onnxruntime's `Gemm` does not
    /// have), and the rectified range lies within the activation's bounds.
    pub fn rectified(&self, name: &str) -> String {
        let mut current = name.to_string();
        let mut bias_taken = false;
        while !self.is_output(&current) {
            let single = {
                let mut readers = self.consumers(&current);
                match (readers.next(), readers.next()) {
                    (Some(r), None) => Some(r),
                    _ => None,
                }
            };
            let Some(r) = single else {
                break;
            };
            let is_bias = !bias_taken
                && r.domain.is_empty()
                && r.op_type == "Add"
                && r.inputs.iter().any(|i| i != &current && self.is_weight(i));
            // A Clip with constant bounds (ReLU6) rectifies as a Relu does; the integer
            // kernel absorbs it when the quantized range lies within its bounds.
            let constant_or_absent = |i: usize| {
                r.inputs
                    .get(i)
                    .is_none_or(|b| b.is_empty() || self.is_weight(b))
            };
            let is_relu = r.domain.is_empty()
                && (r.op_type == "Relu"
                    || r.op_type == "Clip"
                        && r.inputs.get(1).is_some_and(|b| !b.is_empty())
                        && constant_or_absent(1)
                        && constant_or_absent(2));
            let next = match r.outputs.first() {
                Some(o) if is_bias || is_relu => o.to_string(),
                _ => break,
            };
            current = next;
            if is_relu {
                break;
            }
            bias_taken = true;
        }
        current
    }
}
