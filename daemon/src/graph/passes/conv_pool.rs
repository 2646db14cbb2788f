//! `conv-pool`: a network's first convolution and the MaxPool that alone reads it (SqueezeNet's
//! 3x3/2 stem -> ReLU -> 3x3/2 pool) become one `opreg::FusedConvMaxPool`, the pool's
//! attributes carried with a `pool_` prefix.
//!
//! The kernel computes the rows of the convolution that a band of the pool's windows read,
//! a few at a time, and pools them while they are in cache: the convolution's output (3.1 MB
//! per image on SqueezeNet, past L2) is never written to memory and read back. Only first
//! layers (at most [`MAX_CHANNELS`] input channels, one group): those are the ones whose rows
//! the plugin computes one at a time (its `stem` kernel); any other convolution the fused
//! kernel would compute whole before pooling, no faster than the two nodes. Runs after
//! `nhwc-conv`, which takes a stem whose pool feeds channels-last convolutions (ResNet's)
//! channels-last instead; what it leaves NCHW is fused here. No Z (a fused residual sum) and
//! no Indices output. Results do not change: the kernel computes the convolution's values as
//! the unfused node does and pools them with MaxPool's own kernel.
//!
//! ```text
//! x -> FusedConv(Relu) -> MaxPool -> p   ==>   x -> FusedConvMaxPool(Relu, pool_...) -> p
//! ```

use super::{super::import::Model, reads, Fusion, Pass};
use crate::graph::{import::Node, GraphError};
use opreg_sdk::{kernel::Attribute, AttrValue, DType};

/// Input channels up to which a convolution is a first layer (three colour planes, one grey,
/// four with alpha): the plugin's `stem` kernel's bound.
const MAX_CHANNELS: usize = 4;

/// The MaxPool attributes the fused node carries (prefixed `pool_`); `storage_order` only
/// concerns Indices, which a fused pool does not have.
const POOL_ATTRIBUTES: &[&str] = &[
    "kernel_shape",
    "strides",
    "pads",
    "dilations",
    "auto_pad",
    "ceil_mode",
];

pub struct ConvPool;

impl Pass for ConvPool {
    fn name(&self) -> &'static str {
        "conv-pool"
    }

    fn fuses(&self) -> Option<Fusion> {
        Some(Fusion {
            original: "Conv",
            domain: "opreg",
            fused: "FusedConvMaxPool",
            also: &[],
        })
    }

    fn run(&self, model: &mut Model) -> Result<usize, GraphError> {
        let read = reads(model)?;
        let reader = super::readers(model);
        let outputs: Vec<&str> = model.outputs.iter().map(|o| o.name.as_str()).collect();
        // (convolution, pool) positions.
        let mut pairs = Vec::new();
        for (ci, conv) in model.nodes.iter().enumerate() {
            let Some(y) = conv.outputs.first().filter(|_| first_layer(model, conv)) else {
                continue;
            };
            if read.get(y) != Some(&1) || outputs.contains(&y.as_str()) {
                continue;
            }
            let Some(&pi) = reader.get(y.as_str()) else {
                continue;
            };
            if model.nodes.get(pi).is_some_and(max_pool_2d) {
                pairs.push((ci, pi));
            }
        }
        let mut remove = vec![false; model.nodes.len()];
        for &(ci, pi) in &pairs {
            let Some(pool) = model.nodes.get(pi) else {
                continue;
            };
            let pooled = pool.outputs.clone();
            let carried: Vec<Attribute> = pool
                .attributes
                .iter()
                .filter(|a| POOL_ATTRIBUTES.contains(&a.name.as_str()))
                .map(|a| Attribute {
                    name: format!("pool_{}", a.name),
                    value: a.value.clone(),
                })
                .collect();
            let Some(conv) = model.nodes.get_mut(ci) else {
                continue;
            };
            conv.domain = "opreg".into();
            conv.op_type = "FusedConvMaxPool".into();
            conv.attributes.extend(carried);
            conv.outputs = pooled;
            super::flag(&mut remove, [pi]);
        }
        Ok(super::finish_opreg_fusion(model, &remove, pairs.len()))
    }
}

/// Whether `n` is a first layer this pass fuses: a `Conv` or `opreg::FusedConv` (no Z) with
/// one output, constant f32 weights of 2-D windows over at most [`MAX_CHANNELS`] input
/// channels, one group.
fn first_layer(model: &Model, n: &Node) -> bool {
    let conv = (n.domain.is_empty() && n.op_type == "Conv")
        || (n.domain == "opreg" && n.op_type == "FusedConv");
    let no_z = n.inputs.get(3).is_none_or(|z| z.is_empty());
    let one_group = n
        .attributes
        .iter()
        .find(|a| a.name == "group")
        .is_none_or(|a| matches!(a.value, AttrValue::Int(1)));
    let weights = n.inputs.get(1).and_then(|w| model.initializers.get(w));
    conv && no_z
        && one_group
        && n.outputs.len() == 1
        && weights.is_some_and(|w| {
            w.dtype() == DType::F32
                && matches!(w.shape(), &[_, c, _, _] if (1..=MAX_CHANNELS).contains(&c))
        })
}

/// Whether `n` is a default-domain MaxPool over 2 spatial dimensions without Indices.
fn max_pool_2d(n: &Node) -> bool {
    let two_d = n.attributes.iter().any(|a| {
        a.name == "kernel_shape" && matches!(&a.value, AttrValue::Ints(k) if k.len() == 2)
    });
    n.domain.is_empty()
        && n.op_type == "MaxPool"
        && two_d
        && n.inputs.len() == 1
        && n.outputs.len() == 1
}
