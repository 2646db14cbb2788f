//! The value table of one graph being lowered: a slot per value (initializers, inputs, node
//! outputs), with what is known statically about each — element type, shape, constant.

use super::{
    import::{Dim, Model, Shape},
    GraphError,
};
use opreg_sdk::{host::HostTensor, DType};
use std::{collections::HashMap, sync::Arc};

pub(super) struct Values {
    pub slot_of: HashMap<String, usize>,
    pub types: Vec<Option<DType>>,
    pub shapes: Vec<Shape>,
    /// Initializers and folded results, by slot.
    pub constants: HashMap<usize, Arc<HostTensor>>,
    /// Formal inputs first, then captured outer values.
    pub inputs: Vec<(String, usize)>,
    /// Slots holding sequences (their `types` entry is the element type).
    pub seqs: std::collections::HashSet<usize>,
}

/// The shape of a tensor whose extents are all known.
pub(super) fn fixed(t: &HostTensor) -> Shape {
    Some(t.shape().iter().map(|&d| Dim::Fixed(d)).collect())
}

impl Values {
    /// Slots for `model`'s initializers, its inputs (`formal`, then the outer values it
    /// `captured`) and every node output. An input shadows an initializer of the same name
    /// (ONNX's default-value inputs).
    pub fn new(
        model: &Model,
        initializers: HashMap<String, Arc<HostTensor>>,
        formal: &[(String, Option<DType>)],
        captured: &[(String, Option<DType>)],
    ) -> Result<Self, GraphError> {
        let mut v = Values {
            slot_of: HashMap::new(),
            types: Vec::new(),
            shapes: Vec::new(),
            constants: HashMap::new(),
            inputs: Vec::new(),
            seqs: Default::default(),
        };
        for (name, t) in initializers {
            let s = v.push(Some(t.dtype()), fixed(&t));
            v.slot_of.insert(name, s);
            v.constants.insert(s, t);
        }
        for (name, t) in formal.iter().chain(captured) {
            let declared = model
                .inputs
                .iter()
                .find(|i| i.name == *name)
                .and_then(|i| i.shape.clone());
            let s = v.push(*t, declared);
            if let Some(old) = v.slot_of.insert(name.clone(), s) {
                v.constants.remove(&old);
            }
            v.inputs.push((name.clone(), s));
        }
        for n in &model.nodes {
            for o in n.outputs.iter().filter(|o| !o.is_empty()) {
                if v.slot_of.contains_key(o) {
                    return Err(GraphError::Invalid(format!(
                        "value '{o}' is produced twice (node {})",
                        n.label()
                    )));
                }
                let s = v.push(None, None);
                v.slot_of.insert(o.clone(), s);
            }
        }
        Ok(v)
    }

    fn push(&mut self, dtype: Option<DType>, shape: Shape) -> usize {
        self.types.push(dtype);
        self.shapes.push(shape);
        self.types.len() - 1
    }

    /// The slots of `names` (`None` for an absent optional value, `""`).
    pub fn slots(&self, names: &[String]) -> Vec<Option<usize>> {
        names
            .iter()
            .map(|x| {
                if x.is_empty() {
                    None
                } else {
                    self.slot_of.get(x).copied()
                }
            })
            .collect()
    }

    pub fn types_of(&self, slots: &[Option<usize>]) -> Vec<Option<DType>> {
        slots
            .iter()
            .map(|s| s.and_then(|s| self.types[s]))
            .collect()
    }

    /// Records what is known about the value in `slot`.
    pub fn set(&mut self, slot: usize, dtype: Option<DType>, shape: Shape) {
        self.types[slot] = dtype;
        self.shapes[slot] = shape;
    }

    /// Makes the value in `slot` a constant (a folded result).
    pub fn set_constant(&mut self, slot: usize, t: Arc<HostTensor>) {
        self.set(slot, Some(t.dtype()), fixed(&t));
        self.constants.insert(slot, t);
    }
}
