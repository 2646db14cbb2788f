//! Subgraphs of control-flow nodes (`If`, `Loop`, `Scan`, parsed at import): which outer
//! values they read. Used by compilation and by the graph passes.

use super::import::{FormalInputs, Model, Node, Subgraph};
use std::{collections::HashSet, sync::Arc};

/// The subgraphs of a control node.
pub(super) struct Subgraphs<'m> {
    pub graphs: &'m [Arc<Subgraph>],
    /// Outer values they read, in first-use order.
    pub free: Vec<String>,
}

/// `node`'s subgraphs with the outer values they read; `None` for a node without any.
pub(super) fn subgraphs(node: &Node) -> Option<Subgraphs<'_>> {
    if node.subgraphs.is_empty() {
        return None;
    }
    let mut free = Vec::new();
    for g in &node.subgraphs {
        for v in free_vars(&g.model, &g.formal) {
            if !free.contains(&v) {
                free.push(v);
            }
        }
    }
    Some(Subgraphs {
        graphs: &node.subgraphs,
        free,
    })
}

/// Names a graph reads that it does not define (its outer-scope references).
pub(super) fn free_vars(model: &Model, formal: &FormalInputs) -> Vec<String> {
    let mut defined: HashSet<&str> = formal.iter().map(|(n, _)| n.as_str()).collect();
    defined.extend(model.initializers.keys().map(|k| k.as_str()));
    for n in &model.nodes {
        defined.extend(n.outputs.iter().map(|o| o.as_str()));
    }
    let mut free = Vec::new();
    let mut add = |v: &str| {
        if !v.is_empty() && !defined.contains(v) && !free.iter().any(|f| f == v) {
            free.push(v.to_string());
        }
    };
    for n in &model.nodes {
        for i in &n.inputs {
            add(i);
        }
        if let Some(sub) = subgraphs(n) {
            for v in &sub.free {
                add(v);
            }
        }
    }
    free
}

/// The outer values `node`'s subgraphs read (empty for other nodes).
pub(super) fn outer_reads(node: &Node) -> Vec<String> {
    subgraphs(node).map(|s| s.free).unwrap_or_default()
}
