//! Dead-node removal: nodes none of whose outputs a graph output depends on, and initializers
//! nothing reads.

use super::{super::import::Model, reads, Pass};
use crate::graph::GraphError;
use std::collections::HashSet;

pub struct DeadNodes;

impl Pass for DeadNodes {
    fn name(&self) -> &'static str {
        "dead-nodes"
    }

    fn run(&self, model: &mut Model) -> Result<usize, GraphError> {
        let producer = model.producers();
        let mut live = vec![false; model.nodes.len()];
        let mut stack: Vec<String> = model.outputs.iter().map(|o| o.name.clone()).collect();
        let mut seen = HashSet::new();
        while let Some(v) = stack.pop() {
            if !seen.insert(v.clone()) {
                continue;
            }
            let Some(&i) = producer.get(v.as_str()) else {
                continue;
            };
            let (Some(l), Some(n)) = (live.get_mut(i), model.nodes.get(i)) else {
                continue;
            };
            if !*l {
                *l = true;
                stack.extend(n.inputs.iter().filter(|x| !x.is_empty()).cloned());
                stack.extend(super::super::subgraphs::outer_reads(n));
            }
        }
        let before = model.nodes.len();
        let dead: Vec<bool> = live.iter().map(|l| !l).collect();
        super::remove_nodes(model, &dead);
        let read = reads(model)?;
        let outputs: HashSet<&str> = model.outputs.iter().map(|o| o.name.as_str()).collect();
        model
            .initializers
            .retain(|name, _| read.contains_key(name) || outputs.contains(name.as_str()));
        Ok(before - model.nodes.len())
    }
}
