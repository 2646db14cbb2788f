//! `nhwc`: the integer convolutions of a quantized CNN, and what joins them, run channels-last.
//!
//! An NCHW `QLinearConv` multiplies positions by channels: its kernel transposes x to HWC
//! before the product and the product back to NCHW after it, for every convolution — a
//! quarter of a quantized ResNet-50's time (measured: the transposes, their buffers and the
//! separate requantizing pass). Like ONNX Runtime's layout transformer, this pass gives the
//! graph's 2-D `QLinearConv` nodes ONNX Runtime's channels-last form
//! (`com.microsoft::QLinearConv`, `channels_last = 1`), carries the channels-last values
//! through what commutes with the layout (`QLinearAdd`, whose operands are both
//! channels-last; a u8/i8 `MaxPool`, as `com.microsoft::NhwcMaxPool`), and transposes only
//! where a value enters the channels-last region or leaves it (a graph input, a
//! `DequantizeLinear`, a graph output): a chain of convolutions transposes nothing in between.
//!
//! ```text
//! x -> QLinearConv -> QLinearAdd -> MaxPool -> DQ     ==>   x -> Transpose(0,2,3,1) ->
//!                  \-> QLinearConv -/                         QLinearConv' -> QLinearAdd ->
//!                                                             NhwcMaxPool -> Transpose(0,3,1,2) -> DQ
//! ```
//!
//! The channels-last nodes compute the same bytes as the ones they replace (the kernels'
//! tests hold them to it), so results do not change. Conditions: a `QLinearConv` whose weight
//! is a 4-D constant (2-D convolution); `QLinearAdd` and `MaxPool` (one output, 2-D window)
//! only where their data inputs are channels-last already, so that the pass never adds a
//! transpose to carry them. Nodes are visited in a topological order; a graph it cannot order
//! (the compiler reports why) is left as it is.

use super::{super::import::Model, Fusion, Pass};
use crate::graph::{import::Node, subgraphs::outer_reads, GraphError};
use opreg_sdk::{kernel::Attribute, AttrValue};
use std::collections::{HashMap, HashSet};

/// NCHW to NHWC.
const TO_NHWC: [i64; 4] = [0, 2, 3, 1];
/// NHWC to NCHW.
const TO_NCHW: [i64; 4] = [0, 3, 1, 2];

/// Integer convolutions and their joins channels-last (see the module documentation).
pub struct Nhwc;

impl Pass for Nhwc {
    fn name(&self) -> &'static str {
        "nhwc"
    }

    fn fuses(&self) -> Option<Fusion> {
        Some(Fusion {
            original: "QLinearConv",
            domain: "com.microsoft",
            fused: "QLinearConv",
            also: &[("com.microsoft", "NhwcMaxPool"), ("", "Transpose")],
        })
    }

    fn run(&self, model: &mut Model) -> Result<usize, GraphError> {
        let Some(order) = topological(model) else {
            return Ok(0);
        };
        if !model
            .nodes
            .iter()
            .any(|n| n.domain.is_empty() && n.op_type == "QLinearConv" && conv_2d(model, n))
        {
            return Ok(0);
        }
        let taken = super::value_names(model);
        let mut w = Walk {
            twin: HashMap::new(),
            pending: HashSet::new(),
            taken,
            nodes: Vec::with_capacity(model.nodes.len() + 8),
            converted: 0,
        };
        let mut old: Vec<Option<Node>> = std::mem::take(&mut model.nodes)
            .into_iter()
            .map(Some)
            .collect();
        for i in order {
            let Some(mut n) = old.get_mut(i).and_then(Option::take) else {
                continue;
            };
            let layout_inputs: &[usize] = match (n.domain.as_str(), n.op_type.as_str()) {
                ("", "QLinearConv") if conv_2d(model, &n) => &[0],
                ("", "MaxPool") if max_pool_2d(&n) && w.is_nhwc(&n, &[0]) => &[0],
                ("com.microsoft", "QLinearAdd") if w.is_nhwc(&n, &[0, 3]) => &[0, 3],
                _ => &[],
            };
            if layout_inputs.is_empty() {
                // A reader of NCHW values: the pending ones are transposed back first.
                let reads: Vec<String> = n.inputs.iter().cloned().chain(outer_reads(&n)).collect();
                for v in reads {
                    w.materialize(&v);
                }
                w.nodes.push(n);
                continue;
            }
            for &k in layout_inputs {
                if let Some(x) = n.inputs.get(k).cloned() {
                    let t = w.nhwc_of(&x);
                    if let Some(slot) = n.inputs.get_mut(k) {
                        *slot = t;
                    }
                }
            }
            match n.op_type.as_str() {
                "QLinearConv" => {
                    n.domain = "com.microsoft".into();
                    n.attributes.retain(|a| a.name != "channels_last");
                    n.attributes.push(Attribute {
                        name: "channels_last".into(),
                        value: AttrValue::Int(1),
                    });
                }
                "MaxPool" => {
                    n.domain = "com.microsoft".into();
                    n.op_type = "NhwcMaxPool".into();
                    // Indices are not produced (one output); the order only affects them.
                    n.attributes.retain(|a| a.name != "storage_order");
                }
                _ => {}
            }
            if let Some(y) = n.outputs.first_mut() {
                let nchw = std::mem::take(y);
                *y = w.fresh(&format!("{nchw}_nhwc"));
                w.twin.insert(nchw.clone(), y.clone());
                w.pending.insert(nchw);
            }
            w.converted += 1;
            w.nodes.push(n);
        }
        let outputs: Vec<String> = model.outputs.iter().map(|o| o.name.clone()).collect();
        for o in outputs {
            w.materialize(&o);
        }
        model.nodes = w.nodes;
        if w.converted > 0 {
            model.opsets.entry("com.microsoft".into()).or_insert(1);
        }
        Ok(w.converted)
    }
}

/// The walk's state: the nodes written so far and the values known channels-last.
struct Walk {
    /// NCHW value -> its channels-last twin (a value of the new graph).
    twin: HashMap<String, String>,
    /// NCHW values produced only channels-last so far (not yet transposed back).
    pending: HashSet<String>,
    /// Every value name of the model and of the nodes written so far.
    taken: HashSet<String>,
    nodes: Vec<Node>,
    converted: usize,
}

impl Walk {
    /// Whether inputs `ks` of `n` all have channels-last twins.
    fn is_nhwc(&self, n: &Node, ks: &[usize]) -> bool {
        ks.iter()
            .all(|&k| n.inputs.get(k).is_some_and(|x| self.twin.contains_key(x)))
    }

    /// The channels-last twin of `x`, transposing it on first use.
    fn nhwc_of(&mut self, x: &str) -> String {
        if let Some(t) = self.twin.get(x) {
            return t.clone();
        }
        let t = self.fresh(&format!("{x}_nhwc"));
        self.nodes.push(transpose(x, &t, TO_NHWC));
        self.twin.insert(x.into(), t.clone());
        t
    }

    /// A name for a new value (`base`, else `base_1`, …), unused by the model and by the
    /// nodes written so far.
    fn fresh(&mut self, base: &str) -> String {
        super::fresh(&mut self.taken, base)
    }

    /// Writes `v` in NCHW (a transpose of its twin) if only its twin exists so far.
    fn materialize(&mut self, v: &str) {
        if !self.pending.remove(v) {
            return;
        }
        if let Some(t) = self.twin.get(v) {
            self.nodes.push(transpose(t, v, TO_NCHW));
        }
    }
}

fn transpose(x: &str, y: &str, perm: [i64; 4]) -> Node {
    Node {
        name: format!("{y}_transpose"),
        domain: String::new(),
        op_type: "Transpose".into(),
        inputs: vec![x.into()],
        outputs: vec![y.into()],
        attributes: vec![Attribute {
            name: "perm".into(),
            value: AttrValue::Ints(perm.to_vec()),
        }],
        subgraphs: Vec::new(),
    }
}

/// A `QLinearConv` over 2 spatial dimensions: its weight (input 3) is a 4-D constant.
fn conv_2d(model: &Model, n: &Node) -> bool {
    n.inputs
        .get(3)
        .and_then(|w| model.initializers.get(w))
        .is_some_and(|w| w.shape().len() == 4)
        && n.outputs.len() == 1
}

/// A `MaxPool` with one output (no indices) and a 2-D `kernel_shape`.
fn max_pool_2d(n: &Node) -> bool {
    n.outputs.len() == 1
        && n.attributes.iter().any(|a| {
            a.name == "kernel_shape" && matches!(&a.value, AttrValue::Ints(k) if k.len() == 2)
        })
}

/// The nodes in an order where each comes after the producers of what it reads (Kahn's, in
/// model order among ready nodes); `None` when some node can never run (a cycle, or a read
/// of a value nothing defines), which compiling reports.
fn topological(model: &Model) -> Option<Vec<usize>> {
    let defined: HashSet<&str> = model
        .initializers
        .keys()
        .map(String::as_str)
        .chain(model.inputs.iter().map(|i| i.name.as_str()))
        .chain([""])
        .collect();
    let producer = model.producers();
    // Per node, how many of its reads are still to be produced; per node, its readers.
    let mut waiting = vec![0usize; model.nodes.len()];
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); model.nodes.len()];
    for (i, n) in model.nodes.iter().enumerate() {
        let reads: HashSet<String> = n.inputs.iter().cloned().chain(outer_reads(n)).collect();
        for v in reads.iter().filter(|v| !defined.contains(v.as_str())) {
            let p = *producer.get(v.as_str())?;
            readers.get_mut(p)?.push(i);
            *waiting.get_mut(i)? += 1;
        }
    }
    let mut ready: std::collections::BTreeSet<usize> = (0..model.nodes.len())
        .filter(|&i| waiting.get(i) == Some(&0))
        .collect();
    let mut order = Vec::with_capacity(model.nodes.len());
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &r in readers.get(i)? {
            let w = waiting.get_mut(r)?;
            *w -= 1;
            if *w == 0 {
                ready.insert(r);
            }
        }
    }
    (order.len() == model.nodes.len()).then_some(order)
}
