//! Static type and shape inference for every operator of this plugin (ABI 1.1's
//! [`KernelFactory::infer`](opreg_sdk::KernelFactory::infer)): the daemon asks the kernel it
//! resolved for a node what the node's outputs will be, and this is the one table of rules the
//! plugin answers with (registered for all its kernels through
//! [`Registrar::infer_with`](opreg_sdk::Registrar::infer_with)).
//!
//! Inference never fails a node: a rule that cannot tell (an unknown input, a declared shape
//! the operator cannot take, an attribute out of range) answers "unknown" and leaves the
//! kernel to refuse the node with its own message when it is instantiated or run.

// Attributes and declared shapes come from models: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

mod shapes;
mod types;

use opreg_sdk::prelude::*;

/// What `node`'s outputs will be: a type and a shape per output, each possibly unknown.
pub(crate) fn infer(node: &NodeInfo<'_>) -> Result<Vec<OutputFact>, PluginError> {
    let in_types: Vec<Option<DType>> = node
        .inputs
        .iter()
        .map(|v| (v.present && v.dtype != DType::UNDEFINED).then_some(v.dtype))
        .collect();
    let shapes = shapes::infer(node);
    Ok((0..node.outputs.len())
        .map(|k| OutputFact {
            dtype: types::output_type(node, k, &in_types),
            shape: shapes.get(k).cloned().flatten(),
        })
        .collect())
}

#[cfg(test)]
mod tests;
