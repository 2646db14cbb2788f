//! Which nodes run and in what order: dead-node removal (keep what the outputs depend on)
//! and a topological order (Kahn's, in model order among ready nodes).

use super::{import::Model, values::Values, GraphError};
use std::collections::{HashSet, VecDeque};

/// The nodes the outputs need, in an order where each runs after what it reads. `reads(i)`
/// is what node `i` reads: its inputs and the outer values of its subgraphs.
pub(super) fn schedule<'m>(
    model: &'m Model,
    values: &Values,
    reads: impl Fn(usize) -> Vec<&'m str>,
) -> Result<Vec<usize>, GraphError> {
    let needed = needed(model, values, &reads)?;
    let mut available: HashSet<usize> = values
        .constants
        .keys()
        .copied()
        .chain(values.inputs.iter().map(|(_, s)| *s))
        .collect();
    let mut pending: VecDeque<usize> = (0..model.nodes.len()).filter(|&i| needed[i]).collect();
    let mut order = Vec::new();
    let mut stalled = 0;
    while let Some(i) = pending.pop_front() {
        let n = &model.nodes[i];
        let mut ready = true;
        for x in reads(i) {
            match values.slot_of.get(x) {
                Some(s) if available.contains(s) => {}
                Some(_) => ready = false,
                None => {
                    return Err(GraphError::Invalid(format!(
                        "node {} reads '{x}', which is never defined",
                        n.label()
                    )))
                }
            }
        }
        if ready {
            order.push(i);
            available.extend(
                n.outputs
                    .iter()
                    .filter_map(|o| values.slot_of.get(o).copied()),
            );
            stalled = 0;
        } else {
            pending.push_back(i);
            stalled += 1;
            if stalled > pending.len() {
                return Err(GraphError::Invalid(format!(
                    "the graph has a cycle through node {}",
                    n.label()
                )));
            }
        }
    }
    Ok(order)
}

/// Per node: whether an output depends on it.
fn needed<'m>(
    model: &'m Model,
    values: &Values,
    reads: &impl Fn(usize) -> Vec<&'m str>,
) -> Result<Vec<bool>, GraphError> {
    let producer = model.producers();
    let mut needed = vec![false; model.nodes.len()];
    let mut stack: Vec<&str> = model.outputs.iter().map(|o| o.name.as_str()).collect();
    let mut seen: HashSet<&str> = HashSet::new();
    while let Some(v) = stack.pop() {
        if !seen.insert(v) {
            continue;
        }
        match (producer.get(v), values.slot_of.contains_key(v)) {
            (Some(&i), _) => {
                if !needed[i] {
                    needed[i] = true;
                    stack.extend(reads(i));
                }
            }
            (None, true) => {}
            (None, false) => {
                return Err(GraphError::Invalid(format!(
                    "value '{v}' is used but never defined"
                )))
            }
        }
    }
    Ok(needed)
}
