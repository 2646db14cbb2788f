//! Subgraphs of control-flow nodes (`If`, `Loop`, `Scan`): which attributes hold them, and
//! which outer values they read. Used by compilation and by the graph passes.

use super::{
    import::{import_subgraph, FormalInputs, Model, Node},
    GraphError,
};
use opreg_sdk::{AttrValue, DType};
use std::collections::{HashMap, HashSet};

/// The control-flow operators the runtime runs itself, with their subgraph attributes.
pub(super) const CONTROL: &[(&str, &[&str])] = &[
    ("If", &["then_branch", "else_branch"]),
    ("Loop", &["body"]),
    ("Scan", &["body"]),
];

/// The subgraphs of a control node, imported.
pub(super) struct Subgraphs {
    pub graphs: Vec<(Model, FormalInputs)>,
    /// Outer values they read, in first-use order.
    pub free: Vec<String>,
}

fn control_attrs(op_type: &str) -> Option<&'static [&'static str]> {
    CONTROL
        .iter()
        .find(|(op, _)| *op == op_type)
        .map(|(_, a)| *a)
}

pub(super) fn subgraphs(
    node: &super::import::Node,
    opsets: &HashMap<String, i64>,
) -> Result<Option<Subgraphs>, GraphError> {
    if !node.domain.is_empty() {
        return Ok(None);
    }
    let Some(attrs) = control_attrs(&node.op_type) else {
        return Ok(None);
    };
    let mut graphs = Vec::new();
    let mut free = Vec::new();
    for a in attrs {
        let bytes = match node
            .attributes
            .iter()
            .find(|x| x.name.as_str() == *a)
            .map(|x| &x.value)
        {
            Some(AttrValue::Graph(b)) => b,
            _ => {
                return Err(GraphError::Invalid(format!(
                    "node {}: missing subgraph attribute '{a}'",
                    node.label()
                )))
            }
        };
        let (m, formal) = import_subgraph(bytes, opsets)
            .map_err(|e| GraphError::Invalid(format!("node {} '{a}': {e}", node.label())))?;
        for v in free_vars(&m, &formal)? {
            if !free.contains(&v) {
                free.push(v);
            }
        }
        graphs.push((m, formal));
    }
    Ok(Some(Subgraphs { graphs, free }))
}

/// Names a graph reads that it does not define (its outer-scope references).
pub(super) fn free_vars(
    model: &Model,
    formal: &[(String, Option<DType>)],
) -> Result<Vec<String>, GraphError> {
    let mut defined: HashSet<&str> = formal.iter().map(|(n, _)| n.as_str()).collect();
    defined.extend(model.initializers.keys().map(|k| k.as_str()));
    for n in &model.nodes {
        defined.extend(n.outputs.iter().map(|o| o.as_str()));
    }
    let mut free = Vec::new();
    let add = |v: &str, free: &mut Vec<String>| {
        if !v.is_empty() && !defined.contains(v) && !free.iter().any(|f| f == v) {
            free.push(v.to_string());
        }
    };
    for n in &model.nodes {
        for i in &n.inputs {
            add(i, &mut free);
        }
        if let Some(sub) = subgraphs(n, &model.opsets)? {
            for v in &sub.free {
                add(v, &mut free);
            }
        }
    }
    Ok(free)
}

/// The outer values `node`'s subgraphs read (empty for other nodes).
pub(super) fn outer_reads(
    node: &Node,
    opsets: &HashMap<String, i64>,
) -> Result<Vec<String>, GraphError> {
    Ok(subgraphs(node, opsets)?.map(|s| s.free).unwrap_or_default())
}
