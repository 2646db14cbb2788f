//! Kernel resolution: which registered kernel runs a node.
//!
//! As in ONNX Runtime: candidates are the kernels of the node's (domain, op_type) on the
//! requested device whose opset range covers the node's resolved opset and whose type
//! constraints accept the node's input types; the highest priority wins.

use super::Snapshot;
use crate::plugin::{kernel_label, LoadedPlugin};
use opreg_sdk::{module::KernelRegistration, DType, Device, KernelDesc};
use std::sync::Arc;

/// What a node needs.
pub struct KernelQuery<'a> {
    pub domain: &'a str,
    pub op_type: &'a str,
    pub opset: i32,
    pub device: Device,
    /// Input types by position; `None` for an absent optional input.
    pub inputs: &'a [Option<DType>],
}

/// A resolved kernel. Holds its plugin, so the library stays mapped while it is in use.
#[derive(Clone)]
pub struct KernelRef {
    pub plugin: Arc<LoadedPlugin>,
    index: usize,
}

impl KernelRef {
    pub fn registration(&self) -> &KernelRegistration {
        &self.plugin.kernels[self.index]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("no kernel for {domain}::{op_type} (opset {opset}, inputs [{types}]) on {device}: no plugin registers this op{near}")]
    NoKernel {
        domain: String,
        op_type: String,
        opset: i32,
        device: Device,
        types: String,
        near: String,
    },
}

fn normalise(domain: &str) -> &str {
    if domain == "ai.onnx" {
        ""
    } else {
        domain
    }
}

impl Snapshot {
    /// The best kernel for `q`, or an error that says what was close.
    pub fn resolve(&self, q: &KernelQuery<'_>) -> Result<KernelRef, ResolveError> {
        let domain = normalise(q.domain);
        let mut best: Option<(i32, KernelRef)> = None;
        let mut near = Vec::new();
        for plugin in self.plugins.values() {
            for (index, k) in plugin.kernels.iter().enumerate() {
                let d = &k.desc;
                if normalise(d.domain.as_str()) != domain || d.op_type.as_str() != q.op_type {
                    continue;
                }
                let why_not = if d.device != q.device {
                    Some(format!("{} is on {}", kernel_label(d), d.device))
                } else if !d.covers(q.opset) {
                    Some(format!(
                        "{} does not cover opset {}",
                        kernel_label(d),
                        q.opset
                    ))
                } else {
                    d.accepts(q.inputs)
                        .err()
                        .map(|e| format!("{}: {e}", kernel_label(d)))
                };
                if let Some(w) = why_not {
                    near.push(w);
                    continue;
                }
                if best.as_ref().is_none_or(|(p, _)| d.priority > *p) {
                    best = Some((
                        d.priority,
                        KernelRef {
                            plugin: plugin.clone(),
                            index,
                        },
                    ));
                }
            }
        }
        best.map(|(_, k)| k).ok_or_else(|| ResolveError::NoKernel {
            domain: if domain.is_empty() {
                "ai.onnx".into()
            } else {
                domain.into()
            },
            op_type: q.op_type.into(),
            opset: q.opset,
            device: q.device,
            types: q
                .inputs
                .iter()
                .map(|t| t.map_or("absent", |t| t.kserve_name()))
                .collect::<Vec<_>>()
                .join(", "),
            near: if near.is_empty() {
                String::new()
            } else {
                format!(" that matches; candidates: {}", near.join("; "))
            },
        })
    }
}

/// True when two registrations could both be chosen for one node with nothing to prefer one.
pub(super) fn ambiguous(a: &KernelDesc, b: &KernelDesc) -> bool {
    normalise(a.domain.as_str()) == normalise(b.domain.as_str())
        && a.op_type == b.op_type
        && a.device == b.device
        && a.priority == b.priority
        && a.since_version <= b.end_version
        && b.since_version <= a.end_version
        && types_overlap(a, b)
}

fn types_overlap(a: &KernelDesc, b: &KernelDesc) -> bool {
    let first = |d: &KernelDesc| -> Option<Vec<DType>> {
        let name = d.input_constraints.first()?;
        let c = d.type_constraints.iter().find(|c| &c.name == name)?;
        Some(c.types.to_vec())
    };
    match (first(a), first(b)) {
        (Some(x), Some(y)) => x.iter().any(|t| y.contains(t)),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opreg_sdk::OPEN_END;

    #[test]
    fn ambiguity_needs_same_priority_overlapping_ranges_and_types() {
        let a = KernelDesc::onnx("Relu", 6, 13)
            .constraint("T", &[DType::F32])
            .inputs(&["T"]);
        let b = KernelDesc::onnx("Relu", 13, OPEN_END)
            .constraint("T", &[DType::F32, DType::F16])
            .inputs(&["T"]);
        assert!(ambiguous(&a, &b));
        assert!(!ambiguous(&a, &b.clone().priority(1)));
        assert!(!ambiguous(&a, &KernelDesc::onnx("Relu", 14, OPEN_END)));
        let f16 = KernelDesc::onnx("Relu", 6, 13)
            .constraint("T", &[DType::F16])
            .inputs(&["T"]);
        assert!(!ambiguous(&a, &f16));
        assert!(ambiguous(&a, &KernelDesc::new("ai.onnx", "Relu", 1, 6)));
    }
}
