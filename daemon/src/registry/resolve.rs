//! Kernel resolution: which registered kernel runs a node.
//!
//! As in ONNX Runtime (`kernel_registry.cc`): candidates are the kernels registered for the
//! node's (domain, op type), found through an index; among those on the requested device whose
//! opset range covers the node's opset and whose type constraints accept its input types, the
//! highest priority wins. An open-ended kernel (`OPEN_END`) covers opsets up to the newest
//! schema this daemon knows for a standard domain, not opsets that do not exist yet: their
//! operators may change meaning.

use super::Snapshot;
use crate::plugin::{kernel_label, LoadedPlugin};
use opreg_sdk::{module::KernelRegistration, DType, Device, KernelDesc, OPEN_END};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

/// The newest opset of each standard domain this daemon knows (the schemas of onnx 1.23.2).
const LATEST_KNOWN: &[(&str, i32)] = &[
    ("", 28),
    ("ai.onnx.ml", 5),
    ("ai.onnx.preview", 1),
    ("ai.onnx.preview.training", 1),
];

/// The newest opset of `domain` this daemon knows, for standard domains.
pub fn latest_known(domain: &str) -> Option<i32> {
    let domain = normalise(domain);
    LATEST_KNOWN
        .iter()
        .find(|(d, _)| *d == domain)
        .map(|&(_, v)| v)
}

/// Whether `d` covers `opset`, with open ends closed at the newest known opset.
fn covers(d: &KernelDesc, opset: i32) -> bool {
    let end = match (d.end_version, latest_known(&d.domain)) {
        (OPEN_END, Some(latest)) => latest,
        (end, _) => end,
    };
    d.since_version <= opset && opset <= end
}

/// A registered kernel: its plugin and its position in the plugin's kernels.
type Entry = (Arc<LoadedPlugin>, usize);

/// Kernels by (normalised domain, op type).
#[derive(Default)]
pub(super) struct Index(HashMap<(String, String), Vec<Entry>>);

impl Index {
    /// The index of every kernel of `plugins` but those of the `quarantined` ones.
    pub(super) fn build(
        plugins: &BTreeMap<String, Arc<LoadedPlugin>>,
        quarantined: &BTreeSet<String>,
    ) -> Self {
        let mut map: HashMap<(String, String), Vec<Entry>> = HashMap::new();
        for p in plugins.values().filter(|p| !quarantined.contains(&p.name)) {
            for (i, k) in p.kernels.iter().enumerate() {
                map.entry((
                    normalise(&k.desc.domain).to_string(),
                    k.desc.op_type.clone(),
                ))
                .or_default()
                .push((p.clone(), i));
            }
        }
        Index(map)
    }

    fn get(&self, domain: &str, op: &str) -> &[Entry] {
        // A lookup without allocating a key per query would need a borrowed-key map; one
        // small String pair per resolved node is noise next to instantiating its kernel.
        self.0
            .get(&(domain.to_string(), op.to_string()))
            .map_or(&[], Vec::as_slice)
    }
}

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
        for (plugin, index) in self.index.get(domain, q.op_type) {
            let index = *index;
            let Some(k) = plugin.kernels.get(index) else {
                continue;
            };
            let d = &k.desc;
            let why_not = if d.device != q.device {
                Some(format!("{} is on {}", kernel_label(d), d.device))
            } else if !covers(d, q.opset) {
                Some(match latest_known(domain) {
                    Some(latest) if q.opset > latest => format!(
                        "{} does not cover opset {}: the newest this daemon knows is {latest}",
                        kernel_label(d),
                        q.opset
                    ),
                    _ => format!("{} does not cover opset {}", kernel_label(d), q.opset),
                })
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

    #[test]
    fn open_ends_stop_at_the_newest_known_opset_of_standard_domains() {
        let relu = KernelDesc::onnx("Relu", 14, OPEN_END);
        assert!(covers(&relu, 14) && covers(&relu, 28));
        assert!(!covers(&relu, 29), "an opset that does not exist yet");
        assert!(!covers(&relu, 13));
        let ml = KernelDesc::new("ai.onnx.ml", "LinearClassifier", 1, OPEN_END);
        assert!(covers(&ml, 5) && !covers(&ml, 6));
        // Custom domains have no known newest version: open means open.
        let custom = KernelDesc::new("my.ops", "Fancy", 1, OPEN_END);
        assert!(covers(&custom, 1000));
        assert!(covers(&KernelDesc::new("ai.onnx", "Relu", 6, 13), 13));
    }

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
