//! The float model in the form strategies plan on and the host applies plans to.
//!
//! - Every node gets a unique name: plans name nodes.
//! - `Gemm` with a constant `B`, `alpha = beta = 1` and no `transA` becomes `MatMul` (with `B`
//!   transposed once here when `transB`) followed by `Add` of `C`. ONNX has integer forms of
//!   `MatMul` (`QLinearMatMul`, `MatMulInteger`) but not of `Gemm`, so this is what makes
//!   torch's `Linear` layers quantizable as standard ONNX; a per-channel weight scale then
//!   runs along `MatMul`'s last axis, which is what the strategy sees.

// Model and request data reach this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use crate::graph::{Model, Node};
use opreg_sdk::{host::HostTensor, AttrValue, DType};
use std::{collections::HashSet, sync::Arc};

/// The prepared copy of `model` (initializers shared, a transposed weight new).
pub fn prepare(model: &Model) -> Model {
    let mut m = model.clone();
    name_nodes(&mut m);
    let mut nodes = Vec::with_capacity(m.nodes.len());
    for n in std::mem::take(&mut m.nodes) {
        match gemm_as_matmul(&mut m, &n) {
            Some(replacement) => nodes.extend(replacement),
            None => nodes.push(n),
        }
    }
    m.nodes = nodes;
    m
}

fn name_nodes(m: &mut Model) {
    let mut taken: HashSet<String> = m
        .nodes
        .iter()
        .filter(|n| !n.name.is_empty())
        .map(|n| n.name.clone())
        .collect();
    let mut seen = HashSet::new();
    for (i, n) in m.nodes.iter_mut().enumerate() {
        if n.name.is_empty() || !seen.insert(n.name.clone()) {
            let mut k = i;
            let mut name = format!("{}_{k}", n.op_type);
            while taken.contains(&name) {
                k += 1;
                name = format!("{}_{k}", n.op_type);
            }
            taken.insert(name.clone());
            seen.insert(name.clone());
            n.name = name;
        }
    }
}

fn attr<'n>(n: &'n Node, name: &str) -> Option<&'n AttrValue> {
    n.attributes
        .iter()
        .find(|a| a.name == name)
        .map(|a| &a.value)
}

fn int_attr(n: &Node, name: &str, default: i64) -> i64 {
    match attr(n, name) {
        Some(AttrValue::Int(v)) => *v,
        _ => default,
    }
}

fn float_attr(n: &Node, name: &str, default: f32) -> f32 {
    match attr(n, name) {
        Some(AttrValue::Float(v)) => *v,
        _ => default,
    }
}

fn gemm_as_matmul(m: &mut Model, n: &Node) -> Option<Vec<Node>> {
    if !n.domain.is_empty() || n.op_type != "Gemm" {
        return None;
    }
    if int_attr(n, "transA", 0) != 0
        || float_attr(n, "alpha", 1.0) != 1.0
        || float_attr(n, "beta", 1.0) != 1.0
    {
        return None;
    }
    let (a, b) = (n.inputs.first()?, n.inputs.get(1)?);
    let y = n.outputs.first()?.clone();
    let w = m.initializers.get(b)?.clone();
    if w.dtype() != DType::F32 || w.shape().len() != 2 || !w.on_host() {
        return None;
    }
    let weight = if int_attr(n, "transB", 0) != 0 {
        let (rows, cols) = (*w.shape().first()?, *w.shape().get(1)?);
        let v = w.to_vec::<f32>().ok()?;
        let mut t = Vec::new();
        t.try_reserve_exact(v.len()).ok()?;
        for c in 0..cols {
            for r in 0..rows {
                t.push(*v.get(r * cols + c)?);
            }
        }
        let name = m.fresh_name(&format!("{b}_transposed"));
        let tensor = HostTensor::from_vec(&[cols, rows], &t).ok()?;
        m.initializers.insert(name.clone(), Arc::new(tensor));
        name
    } else {
        b.clone()
    };
    let bias = n.inputs.get(2).filter(|c| !c.is_empty());
    let product = if bias.is_some() {
        m.fresh_name(&format!("{y}_product"))
    } else {
        y.clone()
    };
    let mut out = vec![Node {
        name: n.name.clone(),
        domain: String::new(),
        op_type: "MatMul".into(),
        inputs: vec![a.clone(), weight],
        outputs: vec![product.clone()],
        attributes: Vec::new(),
        subgraphs: Vec::new(),
    }];
    if let Some(c) = bias {
        out.push(Node {
            name: format!("{}_bias", n.name),
            domain: String::new(),
            op_type: "Add".into(),
            inputs: vec![product, c.clone()],
            outputs: vec![y],
            attributes: Vec::new(),
            subgraphs: Vec::new(),
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::indexing_slicing)]
    use super::*;
    use crate::graph::IoSpec;
    use opreg_sdk::kernel::Attribute;

    #[test]
    fn a_gemm_with_a_constant_transposed_weight_becomes_matmul_and_add() {
        let io = |n: &str| IoSpec {
            name: n.into(),
            dtype: DType::F32,
            shape: None,
        };
        let model = Model {
            opsets: [(String::new(), 13)].into(),
            inputs: vec![io("x")],
            outputs: vec![io("y")],
            initializers: [
                (
                    "w".to_string(),
                    Arc::new(HostTensor::from_vec(&[2, 3], &[1f32, 2., 3., 4., 5., 6.]).unwrap()),
                ),
                (
                    "c".to_string(),
                    Arc::new(HostTensor::from_vec(&[2], &[0.5f32, -0.5]).unwrap()),
                ),
            ]
            .into(),
            nodes: vec![Node {
                name: String::new(),
                domain: String::new(),
                op_type: "Gemm".into(),
                inputs: vec!["x".into(), "w".into(), "c".into()],
                outputs: vec!["y".into()],
                attributes: vec![Attribute {
                    name: "transB".into(),
                    value: AttrValue::Int(1),
                }],
                subgraphs: Vec::new(),
            }],
        };
        let p = prepare(&model);
        let ops: Vec<&str> = p.nodes.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["MatMul", "Add"]);
        assert_eq!(p.nodes[0].name, "Gemm_0");
        assert_eq!(p.nodes[1].outputs, ["y"]);
        let w = &p.initializers[&p.nodes[0].inputs[1]];
        assert_eq!(w.shape(), &[3, 2]);
        assert_eq!(w.to_vec::<f32>().unwrap(), vec![1., 4., 2., 5., 3., 6.]);
        // The original is untouched.
        assert_eq!(model.nodes[0].op_type, "Gemm");
    }
}
