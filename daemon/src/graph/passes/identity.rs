//! `Identity` (and `Dropout` in inference, without its mask output) forwards its input: the
//! readers of its output read the input instead. A node whose output is a graph output stays
//! (the output keeps its name).

use super::{super::import::Model, Pass};
use crate::graph::GraphError;
use std::collections::HashMap;

pub struct Identities;

impl Pass for Identities {
    fn name(&self) -> &'static str {
        "identities"
    }

    fn run(&self, model: &mut Model) -> Result<usize, GraphError> {
        let outputs: Vec<&str> = model.outputs.iter().map(|o| o.name.as_str()).collect();
        let mut forward: HashMap<String, String> = HashMap::new();
        let mut keep = Vec::with_capacity(model.nodes.len());
        let has_subgraphs = model.nodes.iter().any(|n| {
            n.attributes
                .iter()
                .any(|a| matches!(a.value, opreg_sdk::AttrValue::Graph(_)))
        });
        for n in std::mem::take(&mut model.nodes) {
            let (Some(input), Some(output)) = (n.inputs.first(), n.outputs.first()) else {
                keep.push(n);
                continue;
            };
            let forwards = n.domain.is_empty()
                && (n.op_type == "Identity"
                    || (n.op_type == "Dropout" && n.outputs.iter().skip(1).all(|o| o.is_empty())
                        && n.inputs.iter().skip(1).all(|i| i.is_empty())))
                && !input.is_empty()
                && !output.is_empty()
                && !outputs.contains(&output.as_str())
                // Subgraphs read outer values by name: renaming under them is not worth it.
                && !has_subgraphs;
            if forwards {
                let from = forward.get(input).cloned().unwrap_or_else(|| input.clone());
                forward.insert(output.clone(), from);
            } else {
                keep.push(n);
            }
        }
        let removed = forward.len();
        for n in &mut keep {
            for i in &mut n.inputs {
                if let Some(f) = forward.get(i) {
                    *i = f.clone();
                }
            }
        }
        model.nodes = keep;
        Ok(removed)
    }
}
