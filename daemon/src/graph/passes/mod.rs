// Models reach these passes before anything checks them: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]
//! Graph passes: rewrites of an imported model before it is compiled, each a small [`Pass`],
//! run in one listed order ([`STANDARD`]) like tract's `optim` pipeline.
//!
//! Every pass here keeps the model standard ONNX, so what they produce can be exported
//! (`opreg optimize`) and loaded by any runtime. A pass logs what it changed at debug level;
//! `OPREG_DUMP_AFTER=<pass name>` (or `all`) prints the graph after it.

mod bn_fold;
mod conv_pool;
mod dead;
mod fuse;
mod gelu;
mod identity;
mod layout;
mod nhwc_conv;
mod qdq;

use super::{import::Model, GraphError};
use std::collections::HashSet;

/// One rewrite of a model.
pub trait Pass: Sync {
    /// Short name, for logs, reports and `OPREG_DUMP_AFTER`.
    fn name(&self) -> &'static str;
    /// Rewrites `model` in place; returns how many nodes it removed or fused away.
    fn run(&self, model: &mut Model) -> Result<usize, GraphError>;
    /// For fusions that depend on kernels: what they fuse into — the pass runs only where
    /// every device that has the original has the fused kernel too.
    fn fuses(&self) -> Option<Fusion> {
        None
    }
}

/// What a kernel-dependent fusion turns a node into.
#[derive(Clone, Copy, Debug)]
pub struct Fusion {
    /// The default-domain operator fused.
    pub original: &'static str,
    /// Domain and operator type of the result.
    pub domain: &'static str,
    pub fused: &'static str,
    /// Other operators (domain, type) the pass writes: some device must have each.
    pub also: &'static [(&'static str, &'static str)],
}

/// The passes whose result is standard ONNX, in the order they run.
pub const STANDARD: &[&dyn Pass] = &[
    &identity::Identities,
    &bn_fold::ConvBatchNorm,
    &dead::DeadNodes,
];

/// The fusions that depend on the registry's kernels, in the order they run: QDQ into
/// ONNX's integer operators (see [`qdq`]), those channels-last (see [`layout`]), then float
/// operators into opreg's own (see [`fuse`] and [`gelu`]; the GELU before `matmul-add`, which
/// takes it into the product's epilogue), the values between the fused 1x1 and depthwise
/// convolutions channels-last (see [`nhwc_conv`]), a first layer left NCHW with its pool (see
/// [`conv_pool`]).
pub const FUSIONS: &[&dyn Pass] = &[
    &qdq::QdqConv,
    &qdq::QdqMatMul,
    &qdq::QdqGemm,
    &qdq::QdqMaxPool,
    &qdq::QdqAdd,
    &layout::Nhwc,
    &fuse::ConvAdd,
    &fuse::ConvActivation,
    &nhwc_conv::NhwcConv,
    &conv_pool::ConvPool,
    &gelu::Gelu,
    &fuse::MatMulAdd,
];

/// Runs the standard passes (the ones whose result is standard ONNX) over `model`.
pub fn optimize(model: &mut Model) -> Result<Vec<PassReport>, GraphError> {
    run(model, STANDARD)
}

/// Runs the kernel-dependent fusions over `model` (for `opreg optimize --level all`; compiling
/// applies them itself when the kernels exist).
pub fn fuse(model: &mut Model) -> Result<Vec<PassReport>, GraphError> {
    run(model, FUSIONS)
}

/// What one pass did.
#[derive(Clone, Debug, PartialEq)]
pub struct PassReport {
    pub pass: &'static str,
    pub nodes_before: usize,
    pub nodes_after: usize,
}

/// Runs `passes` over `model` in order.
pub fn run(model: &mut Model, passes: &[&dyn Pass]) -> Result<Vec<PassReport>, GraphError> {
    let dump = std::env::var("OPREG_DUMP_AFTER").ok();
    let mut reports = Vec::with_capacity(passes.len());
    for pass in passes {
        let nodes_before = model.nodes.len();
        let changed = pass.run(model)?;
        tracing::debug!(
            pass = pass.name(),
            changed,
            nodes_before,
            nodes_after = model.nodes.len(),
            "graph pass"
        );
        if dump
            .as_deref()
            .is_some_and(|d| d == "all" || d == pass.name())
        {
            eprintln!("--- after {} ---", pass.name());
            for n in &model.nodes {
                eprintln!("{} {:?} -> {:?}", n.label(), n.inputs, n.outputs);
            }
        }
        reports.push(PassReport {
            pass: pass.name(),
            nodes_before,
            nodes_after: model.nodes.len(),
        });
    }
    Ok(reports)
}

/// Ends a fusion into opreg's own operators: removes the nodes flagged in `remove` and, when
/// `fused` nodes were made, imports the `opreg` domain they belong to. Returns `fused`.
fn finish_opreg_fusion(model: &mut Model, remove: &[bool], fused: usize) -> usize {
    if fused > 0 {
        model.opsets.insert("opreg".into(), 1);
    }
    remove_nodes(model, remove);
    fused
}

/// Flags the nodes at `positions` in `remove`.
fn flag(remove: &mut [bool], positions: impl IntoIterator<Item = usize>) {
    for i in positions {
        if let Some(r) = remove.get_mut(i) {
            *r = true;
        }
    }
}

/// Removes the nodes whose flag in `remove` is set (by position).
fn remove_nodes(model: &mut Model, remove: &[bool]) {
    let mut flags = remove.iter();
    model
        .nodes
        .retain(|_| !flags.next().copied().unwrap_or(false));
}

/// The (last) node reading each value: the one reader of a value read once, which is all the
/// fusions use it for.
fn readers(model: &Model) -> std::collections::HashMap<&str, usize> {
    let mut reader = std::collections::HashMap::new();
    for (i, n) in model.nodes.iter().enumerate() {
        for x in n.inputs.iter().filter(|x| !x.is_empty()) {
            reader.insert(x.as_str(), i);
        }
    }
    reader
}

/// Names every node reads: its inputs, and the outer values its subgraphs read.
fn reads(model: &Model) -> Result<std::collections::HashMap<String, usize>, GraphError> {
    let mut count = std::collections::HashMap::new();
    for n in &model.nodes {
        for i in n.inputs.iter().filter(|i| !i.is_empty()) {
            *count.entry(i.clone()).or_insert(0) += 1;
        }
        for v in super::subgraphs::outer_reads(n) {
            *count.entry(v).or_insert(0) += 1;
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests;

/// Every value name of `model` (initializers, graph inputs and outputs, node inputs and
/// outputs), for passes that add values ([`fresh`]).
fn value_names(model: &Model) -> HashSet<String> {
    model
        .initializers
        .keys()
        .chain(model.inputs.iter().map(|i| &i.name))
        .chain(model.outputs.iter().map(|o| &o.name))
        .chain(
            model
                .nodes
                .iter()
                .flat_map(|n| n.inputs.iter().chain(&n.outputs)),
        )
        .cloned()
        .collect()
}

/// A name for a new value (`base`, else `base_1`, …) not in `taken`, added to it.
fn fresh(taken: &mut HashSet<String>, base: &str) -> String {
    let mut name = base.to_string();
    let mut k = 1;
    while taken.contains(&name) {
        name = format!("{base}_{k}");
        k += 1;
    }
    taken.insert(name.clone());
    name
}
