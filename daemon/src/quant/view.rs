//! The read-only [`GraphView`] a strategy plans on, built from the prepared model.
//!
//! Weights are [`TensorView`](opreg_sdk::TensorView)s of the model's own initializers, valid
//! while the [`View`] lives (the strategy's call): nothing is copied. Intermediate values carry
//! the type and shape calibration saw (for the tensors it observed); others read `UNDEFINED`.

// Model and request data reach this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use crate::graph::{Dim, Model};
use opreg_sdk::{
    abi_stable::std_types::{RNone, ROption, RSome, RString, RVec},
    DType, GraphView, NodeView, ValueView,
};
use std::collections::HashMap;

/// What calibration learnt about a value: its type and shape on the first batch.
pub type Facts = HashMap<String, (DType, Vec<i64>)>;

/// The owned parts of a [`GraphView`] of one model.
pub struct View<'m> {
    nodes: Vec<NodeView>,
    values: Vec<ValueView<'m>>,
    inputs: Vec<RString>,
    outputs: Vec<RString>,
}

fn strings(v: &[String]) -> RVec<RString> {
    v.iter().map(|s| RString::from(s.as_str())).collect()
}

fn dims(shape: &Option<Vec<Dim>>) -> ROption<RVec<i64>> {
    match shape {
        Some(d) => RSome(
            d.iter()
                .map(|d| match d {
                    Dim::Fixed(n) => i64::try_from(*n).unwrap_or(-1),
                    Dim::Symbolic(_) => -1,
                })
                .collect(),
        ),
        None => RNone,
    }
}

impl<'m> View<'m> {
    /// The view of `model`, with `facts` for intermediate values.
    pub fn new(model: &'m Model, facts: &Facts) -> Self {
        let nodes = model
            .nodes
            .iter()
            .map(|n| NodeView {
                name: n.name.as_str().into(),
                domain: n.domain.as_str().into(),
                op_type: n.op_type.as_str().into(),
                inputs: strings(&n.inputs),
                outputs: strings(&n.outputs),
                flags: 0,
            })
            .collect();
        let mut values: Vec<ValueView<'m>> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for io in model.inputs.iter().chain(&model.outputs) {
            if seen.insert(io.name.as_str()) && !model.initializers.contains_key(&io.name) {
                values.push(ValueView {
                    name: io.name.as_str().into(),
                    dtype: io.dtype,
                    shape: dims(&io.shape),
                    weight: RNone,
                    flags: 0,
                });
            }
        }
        let mut names: Vec<&String> = model.initializers.keys().collect();
        names.sort();
        for name in names {
            let Some(t) = model.initializers.get(name) else {
                continue;
            };
            if !seen.insert(name.as_str()) {
                continue;
            }
            values.push(ValueView {
                name: name.as_str().into(),
                dtype: t.dtype(),
                shape: RSome(
                    t.shape()
                        .iter()
                        .map(|d| i64::try_from(*d).unwrap_or(-1))
                        .collect(),
                ),
                // Only host tensors can be read by a strategy.
                weight: if t.on_host() { RSome(t.view()) } else { RNone },
                flags: 0,
            });
        }
        for n in &model.nodes {
            for o in n.outputs.iter().filter(|o| !o.is_empty()) {
                if !seen.insert(o.as_str()) {
                    continue;
                }
                let (dtype, shape) = match facts.get(o) {
                    Some((t, s)) => (*t, RSome(s.iter().copied().collect())),
                    None => (DType::UNDEFINED, RNone),
                };
                values.push(ValueView {
                    name: o.as_str().into(),
                    dtype,
                    shape,
                    weight: RNone,
                    flags: 0,
                });
            }
        }
        View {
            nodes,
            values,
            inputs: model
                .inputs
                .iter()
                .filter(|i| !model.initializers.contains_key(&i.name))
                .map(|i| i.name.as_str().into())
                .collect(),
            outputs: model
                .outputs
                .iter()
                .map(|o| o.name.as_str().into())
                .collect(),
        }
    }

    /// The view, borrowed for one strategy call.
    pub fn graph(&self) -> GraphView<'_> {
        GraphView {
            nodes: self.nodes.as_slice().into(),
            values: self.values.as_slice().into(),
            inputs: self.inputs.as_slice().into(),
            outputs: self.outputs.as_slice().into(),
            flags: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::indexing_slicing)] // tests index what they just built
    use super::*;
    use crate::graph::{IoSpec, Node};
    use opreg_sdk::host::HostTensor;
    use std::sync::Arc;

    fn node(op: &str, inputs: &[&str], output: &str) -> Node {
        Node {
            name: format!("{op}_{output}"),
            domain: String::new(),
            op_type: op.into(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec![output.to_string()],
            attributes: Vec::new(),
            subgraphs: Vec::new(),
        }
    }

    /// Conv -> bias Add -> `activation` -> Conv: which tensors the products' activations are.
    fn activations(activation: Node) -> Vec<String> {
        let f = |v: f32| Arc::new(HostTensor::from_vec(&[], &[v]).unwrap());
        let model = Model {
            opsets: [(String::new(), 17)].into(),
            inputs: vec![IoSpec {
                name: "x".into(),
                dtype: DType::F32,
                shape: None,
            }],
            outputs: vec![IoSpec {
                name: "y".into(),
                dtype: DType::F32,
                shape: None,
            }],
            initializers: [
                ("w".to_string(), f(1.0)),
                ("b".to_string(), f(0.5)),
                ("lo".to_string(), f(0.0)),
                ("hi".to_string(), f(6.0)),
            ]
            .into(),
            nodes: vec![
                node("Conv", &["x", "w"], "c"),
                node("Add", &["c", "b"], "cb"),
                activation,
                node("Conv", &["a", "w"], "y"),
            ],
        };
        View::new(&model, &Facts::new())
            .graph()
            .activations_of(&["Conv"])
    }

    #[test]
    fn a_products_output_is_quantized_after_its_bias_and_a_relu_or_constant_clip() {
        for rectifier in [
            node("Relu", &["cb"], "a"),
            node("Clip", &["cb", "lo", "hi"], "a"),
            node("Clip", &["cb", "lo"], "a"),
        ] {
            let what = format!("{:?}", rectifier.inputs);
            assert_eq!(activations(rectifier), ["x", "a", "y"], "{what}");
        }
        // A Clip with a computed bound, or none at all, is not a rectifier: quantized before.
        assert_eq!(
            activations(node("Clip", &["cb", "x"], "a")),
            ["x", "cb", "a", "y"]
        );
        assert_eq!(
            activations(node("Clip", &["cb"], "a")),
            ["x", "cb", "a", "y"]
        );
        assert_eq!(
            activations(node("Sigmoid", &["cb"], "a")),
            ["x", "cb", "a", "y"]
        );
    }
}
