//! Lowering of the control-flow nodes the runtime runs itself (`If`, `Loop`, `Scan`): their
//! subgraphs are compiled into nested plans (through the caller's `compile_body`, so this
//! module does not import the compiler), and the outer values a subgraph reads are bound to
//! it as extra inputs.

use super::compiled::{Plan, ScanSpec, Step, Work};
use super::{import::Node, subgraphs::Subgraphs, values::Values, GraphError};
use opreg_sdk::{AttrValue, DType, Device};
use std::collections::HashSet;

/// Typed names: a graph's formal inputs, or the outer values it captures.
pub(super) type Typed = Vec<(String, Option<DType>)>;

/// Compiles one subgraph given its formal inputs, its captured values, and which of those
/// (by name) hold sequences.
pub(super) type CompileBody<'c> = dyn FnMut(
        &super::import::Model,
        &[(String, Option<DType>)],
        &[(String, Option<DType>)],
        &HashSet<String>,
    ) -> Result<Plan, GraphError>
    + 'c;

/// Lowers control node `n` into a step; `inputs`/`outputs` are its value slots.
pub(super) fn lower(
    n: &Node,
    sub: &Subgraphs<'_>,
    values: &Values,
    inputs: Vec<Option<usize>>,
    outputs: Vec<Option<usize>>,
    compile_body: &mut CompileBody<'_>,
) -> Result<Step, GraphError> {
    let captured_slots: Vec<usize> = sub
        .free
        .iter()
        .map(|v| {
            values.slot_of.get(v).copied().ok_or_else(|| {
                GraphError::Invalid(format!(
                    "node {}: subgraph reads '{v}', which is never defined",
                    n.label()
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    let captured: Typed = sub
        .free
        .iter()
        .zip(&captured_slots)
        .map(|(v, &s)| (v.clone(), values.types[s]))
        .collect();
    let in_types = values.types_of(&inputs);
    let is_seq = |s: &Option<usize>| s.is_some_and(|s| values.seqs.contains(&s));
    let in_seqs: Vec<bool> = inputs.iter().map(is_seq).collect();
    let captured_seqs: HashSet<String> = sub
        .free
        .iter()
        .zip(&captured_slots)
        .filter(|(_, s)| values.seqs.contains(s))
        .map(|(v, _)| v.clone())
        .collect();
    // `formal_seqs[k]`: formal input k of the subgraph is bound to a sequence.
    let mut body = |g: usize,
                    formal_types: Vec<Option<DType>>,
                    formal_seqs: Vec<bool>|
     -> Result<Box<Plan>, GraphError> {
        let graph = sub.graphs.get(g).ok_or_else(|| {
            GraphError::Invalid(format!("node {}: subgraph {g} is missing", n.label()))
        })?;
        // Declared subgraph input types win; otherwise those the node binds.
        let formal: Typed = graph
            .formal
            .iter()
            .enumerate()
            .map(|(k, (name, t))| (name.clone(), t.or(formal_types.get(k).copied().flatten())))
            .collect();
        let mut seqs = captured_seqs.clone();
        seqs.extend(
            formal
                .iter()
                .zip(&formal_seqs)
                .filter(|(_, &s)| s)
                .map(|((name, _), _)| name.clone()),
        );
        compile_body(&graph.model, &formal, &captured, &seqs)
            .map(Box::new)
            .map_err(|e| GraphError::Invalid(format!("node {}: subgraph: {e}", n.label())))
    };
    let work = match n.op_type.as_str() {
        "If" => Work::If {
            then_branch: body(0, vec![], vec![])?,
            else_branch: body(1, vec![], vec![])?,
        },
        "Loop" => {
            let mut formal = vec![Some(DType::I64), Some(DType::Bool)];
            formal.extend(in_types.iter().skip(2).copied());
            let mut seqs = vec![false, false];
            seqs.extend(in_seqs.iter().skip(2).copied());
            let body = body(0, formal, seqs)?;
            // Body: (iteration, condition, carried...) -> (condition, carried..., scans...).
            let carried = inputs.len().saturating_sub(2);
            if body.formal_inputs != 2 + carried || body.outputs.len() < 1 + carried {
                return Err(GraphError::Invalid(format!(
                    "node {}: Loop carries {carried} values, so its body must take {} inputs and return at least {}; it takes {} and returns {}",
                    n.label(),
                    2 + carried,
                    1 + carried,
                    body.formal_inputs,
                    body.outputs.len()
                )));
            }
            Work::Loop { body }
        }
        "Scan" => {
            let body_outputs = sub.graphs.first().map_or(0, |g| g.model.outputs.len());
            let (axes, scanned) = scan_axes(n, inputs.len(), body_outputs)?;
            let body = body(0, in_types.clone(), in_seqs.clone())?;
            if body.formal_inputs != inputs.len() || axes.input_axes.len() != scanned {
                return Err(GraphError::Invalid(format!(
                    "node {}: Scan body takes {} inputs for {} node inputs; {} scan_input_axes for {scanned} scanned inputs",
                    n.label(),
                    body.formal_inputs,
                    inputs.len(),
                    axes.input_axes.len(),
                )));
            }
            Work::Scan(Box::new(ScanSpec {
                body: *body,
                states: axes.states,
                input_axes: axes.input_axes,
                input_reverse: axes.input_reverse,
                output_axes: axes.output_axes,
                output_reverse: axes.output_reverse,
            }))
        }
        "SequenceMap" => {
            // The body sees one element of each sequence input (a tensor of its element
            // type) and each tensor input whole.
            let body = body(0, in_types.clone(), vec![false; inputs.len()])?;
            if body.formal_inputs != inputs.len() || body.outputs.is_empty() {
                return Err(GraphError::Invalid(format!(
                    "node {}: SequenceMap's body must take {} inputs and return at least one; it takes {} and returns {}",
                    n.label(),
                    inputs.len(),
                    body.formal_inputs,
                    body.outputs.len()
                )));
            }
            Work::SequenceMap { body }
        }
        other => return Err(GraphError::Unsupported(format!("control op {other}"))),
    };
    Ok(Step {
        label: n.label(),
        work,
        device: Device::CPU,
        inputs,
        captured: captured_slots,
        outputs,
        release: Vec::new(),
        concat_axis: None,
    })
}

/// A Scan's state count, axes and directions (see [`ScanSpec`]).
struct ScanAxes {
    states: usize,
    input_axes: Vec<i64>,
    input_reverse: Vec<bool>,
    output_axes: Vec<i64>,
    output_reverse: Vec<bool>,
}

/// A Scan's axes and directions, and how many of its `num_inputs` are scanned.
fn scan_axes(
    n: &Node,
    num_inputs: usize,
    body_outputs: usize,
) -> Result<(ScanAxes, usize), GraphError> {
    let attr = |name: &str| {
        n.attributes
            .iter()
            .find(|a| a.name.as_str() == name)
            .map(|a| &a.value)
    };
    let attr_ints = |name: &str| -> Vec<i64> {
        match attr(name) {
            Some(AttrValue::Ints(v)) => v.to_vec(),
            _ => Vec::new(),
        }
    };
    let scanned = match attr("num_scan_inputs") {
        Some(AttrValue::Int(k)) if *k >= 1 && (*k as usize) <= num_inputs => *k as usize,
        _ => {
            return Err(GraphError::Invalid(format!(
                "node {}: Scan needs num_scan_inputs in 1..={num_inputs}",
                n.label(),
            )))
        }
    };
    let states = num_inputs - scanned;
    if body_outputs < states {
        return Err(GraphError::Invalid(format!(
            "node {}: Scan has {states} state values, so its body must return at least {states} outputs; it returns {body_outputs}",
            n.label()
        )));
    }
    let outs = body_outputs - states;
    let or_zero = |v: Vec<i64>, len: usize| if v.is_empty() { vec![0; len] } else { v };
    let directions = |name: &str, len: usize| -> Vec<bool> {
        or_zero(attr_ints(name), len)
            .into_iter()
            .map(|d| d != 0)
            .collect()
    };
    let output_axes = or_zero(attr_ints("scan_output_axes"), outs);
    if output_axes.len() != outs {
        return Err(GraphError::Invalid(format!(
            "node {}: Scan has {} scan_output_axes for {outs} scan outputs",
            n.label(),
            output_axes.len()
        )));
    }
    let axes = ScanAxes {
        states,
        input_axes: or_zero(attr_ints("scan_input_axes"), scanned),
        input_reverse: directions("scan_input_directions", scanned),
        output_axes,
        output_reverse: directions("scan_output_directions", outs),
    };
    Ok((axes, scanned))
}

/// Which of a control step's outputs are sequences: carried or branch results (scan outputs
/// are stacked tensors).
pub(super) fn output_seqs(work: &Work) -> Vec<bool> {
    match work {
        Work::If { then_branch, .. } => then_branch.output_seqs.clone(),
        Work::Loop { body } => body.output_seqs.iter().skip(1).copied().collect(),
        Work::Scan(s) => s.body.output_seqs.iter().take(s.states).copied().collect(),
        Work::SequenceMap { body } => vec![true; body.outputs.len()],
        Work::Kernel { .. } | Work::Copy { .. } | Work::Sequence(_) => Vec::new(),
    }
}

/// The element types of a control step's outputs, from its subgraphs' plans.
pub(super) fn output_types(work: &Work) -> Vec<Option<DType>> {
    match work {
        Work::If { then_branch, .. } => then_branch.output_types.clone(),
        // Body outputs: cond, carried..., scan outputs...
        Work::Loop { body } => body.output_types.iter().skip(1).copied().collect(),
        Work::Scan(s) => s.body.output_types.clone(),
        Work::SequenceMap { body } => body.output_types.clone(),
        Work::Kernel { .. } | Work::Copy { .. } | Work::Sequence(_) => Vec::new(),
    }
}
