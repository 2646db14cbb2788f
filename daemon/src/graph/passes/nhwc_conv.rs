//! `nhwc-conv`: the values between f32 1x1 and depthwise convolutions (a MobileNet block's
//! expand -> depthwise -> project chain) kept channels-last.
//!
//! The depthwise kernel computes with the channels in the lanes: on an NCHW value it copies
//! its input channels-last and turns each tile of its output back (profiled on MobileNetV2:
//! as long as the taps themselves). A 1x1 convolution is a gemm that reads and writes either
//! layout at the same cost (the layout is only the operands' strides). So a value that a 1x1
//! or depthwise f32 convolution produces and that only such convolutions read (as their X) is
//! made channels-last: its producer becomes `opreg::FusedConvNhwc` with `y_nhwc = 1`, its
//! readers with `x_nhwc = 1`, and the value is renamed `<name>_nhwc` (its layout is not the
//! one its old name had). No transpose is added: every value entering or leaving the
//! channels-last region is converted inside a convolution.
//!
//! ```text
//! x -> Conv1x1 -> FusedConv(dw, Clip) -> Conv1x1 -> y   ==>
//! x -> FusedConvNhwc(y_nhwc) -> FusedConvNhwc(x_nhwc, y_nhwc) -> FusedConvNhwc(x_nhwc) -> y
//! ```
//!
//! A network's first layer (any other convolution of one group, which the kernel computes from
//! an NCHW X) writes channels-last too when only depthwise convolutions read its output (the
//! stem of MobileNet and EfficientNet): its tiles are stored as they are, and the depthwise
//! layer reads them in place, where both had turned the tiles around.
//!
//! Runs after `conv-add` and `conv-activation` (their fused nodes are what it converts) and
//! only where the kernels have `FusedConvNhwc` (see [`Pass::fuses`]). A fused sum (Z) has
//! Y's layout: a convolution with a Z writes channels-last only where its Z is channels-last,
//! and a value read as a Z only where its reader writes channels-last, so a residual chain
//! (MobileNetV2's 24- to 160-channel bottleneck values, each read by the next block's
//! expansion and, as Z, by its projection) goes channels-last as a whole. Kept NCHW, those
//! values cost every projection a column-major store and every expansion a transposing
//! pack (MobileNetV2's narrow projections ran at 1.7-1.95x ONNX Runtime's time). Results
//! do not change: the kernels compute the same sums in the same order (their tests hold
//! them to it).

use super::{super::import::Model, fresh, value_names, Fusion, Pass};
use crate::graph::{import::Node, subgraphs::outer_reads, GraphError};
use opreg_sdk::{kernel::Attribute, AttrValue, DType};
use std::collections::{HashMap, HashSet};

/// Channels-last values between 1x1 and depthwise convolutions (see the module docs).
pub struct NhwcConv;

impl Pass for NhwcConv {
    fn name(&self) -> &'static str {
        "nhwc-conv"
    }

    fn fuses(&self) -> Option<Fusion> {
        Some(Fusion {
            original: "Conv",
            domain: "opreg",
            fused: "FusedConvNhwc",
            also: &[],
        })
    }

    fn run(&self, model: &mut Model) -> Result<usize, GraphError> {
        let kinds: Vec<Option<Kind>> = model.nodes.iter().map(|n| kind(model, n)).collect();
        let reads =
            |j: usize| matches!(kinds.get(j), Some(Some(Kind::Pointwise | Kind::Depthwise)));
        // Readers of each value by (node, input slot); values read where the pass cannot
        // follow (graph outputs, subgraphs) are left alone.
        let mut readers: HashMap<&str, Vec<(usize, usize)>> = HashMap::new();
        let mut pinned: HashSet<String> = model.outputs.iter().map(|o| o.name.clone()).collect();
        for (i, n) in model.nodes.iter().enumerate() {
            for (k, v) in n.inputs.iter().enumerate().filter(|(_, v)| !v.is_empty()) {
                readers.entry(v.as_str()).or_default().push((i, k));
            }
            pinned.extend(outer_reads(n));
        }
        // Candidates: producer -> its output's readers (node, slot).
        let mut found: HashMap<usize, Vec<(usize, usize)>> = HashMap::new();
        let mut producer: HashMap<&str, usize> = HashMap::new();
        for (i, n) in model.nodes.iter().enumerate() {
            let ([y], Some(Some(k))) = (n.outputs.as_slice(), kinds.get(i)) else {
                continue;
            };
            producer.insert(y.as_str(), i);
            if pinned.contains(y) {
                continue;
            }
            let Some(rs) = readers.get(y.as_str()) else {
                continue;
            };
            // Another convolution writes channels-last only for depthwise readers, whose
            // channels-last copy it then saves (a first layer's NCHW output took the
            // depthwise layer after it a transpose, and its own tiles one). A value read as
            // a fused sum (Z, slot 3) takes its reader's Y layout: checked below.
            let fits = |j: usize, slot: usize| match (k, slot) {
                (Kind::General, 0) => matches!(kinds.get(j), Some(Some(Kind::Depthwise))),
                (Kind::Pointwise | Kind::Depthwise, 0 | 3) => reads(j),
                _ => false,
            };
            if rs.iter().all(|&(j, slot)| fits(j, slot)) {
                found.insert(i, rs.clone());
            }
        }
        // A fused sum has Y's layout: a convolution with a Z writes channels-last only where
        // its Z is channels-last, and a value read as a Z is channels-last only where its
        // reader writes so (a residual chain of MobileNetV2 goes channels-last as a whole,
        // or stays NCHW). Removing one candidate can undo others: until nothing changes.
        loop {
            let undone: Vec<usize> = found
                .iter()
                .filter(|&(&i, rs)| {
                    let node = model.nodes.get(i);
                    let z = node.and_then(|n| n.inputs.get(3)).filter(|z| !z.is_empty());
                    let z_fits = z.is_none_or(|z| {
                        producer.get(z.as_str()).is_some_and(|p| {
                            found.contains_key(p) && same_shape(model, &producer, i, *p)
                        })
                    });
                    let readers_fit = rs
                        .iter()
                        .all(|&(j, slot)| slot != 3 || found.contains_key(&j));
                    !(z_fits && readers_fit)
                })
                .map(|(&i, _)| i)
                .collect();
            if undone.is_empty() {
                break;
            }
            for i in undone {
                found.remove(&i);
            }
        }
        if found.is_empty() {
            return Ok(0);
        }
        let mut taken = value_names(model);
        let mut layouts: HashMap<usize, (bool, bool)> = HashMap::new();
        let mut found: Vec<(usize, Vec<(usize, usize)>)> = found.into_iter().collect();
        // In graph order, so that the fresh names do not depend on the map's.
        found.sort_unstable_by_key(|&(i, _)| i);
        for (i, rs) in found {
            let Some(y) = model.nodes.get(i).and_then(|n| n.outputs.first()).cloned() else {
                continue;
            };
            let t = fresh(&mut taken, &format!("{y}_nhwc"));
            if let Some(slot) = model.nodes.get_mut(i).and_then(|n| n.outputs.first_mut()) {
                *slot = t.clone();
            }
            layouts.entry(i).or_default().1 = true;
            for (j, k) in rs {
                if let Some(slot) = model.nodes.get_mut(j).and_then(|n| n.inputs.get_mut(k)) {
                    *slot = t.clone();
                }
                // Read as X: the reader's X is channels-last; as Z, its Y is (a candidate).
                if k == 0 {
                    layouts.entry(j).or_default().0 = true;
                }
            }
        }
        for (&i, &(x_nhwc, y_nhwc)) in &layouts {
            let Some(n) = model.nodes.get_mut(i) else {
                continue;
            };
            n.domain = "opreg".into();
            n.op_type = "FusedConvNhwc".into();
            n.attributes
                .retain(|a| a.name != "x_nhwc" && a.name != "y_nhwc");
            for (name, on) in [("x_nhwc", x_nhwc), ("y_nhwc", y_nhwc)] {
                n.attributes.push(Attribute {
                    name: name.into(),
                    value: AttrValue::Int(on as i64),
                });
            }
        }
        model.opsets.entry("opreg".into()).or_insert(1);
        Ok(layouts.len())
    }
}

/// Whether node `at`'s output provably has the shape of node `z`'s (its fused sum), so that
/// a channels-last Z needs no broadcast (the channels-last kernel adds a Z of Y's shape only;
/// `conv-add` fuses any broadcasting Add, and the graph carries no shapes here): `at`'s X
/// reached back from `at` through convolutions that keep the spatial size (1x1, or
/// depthwise stride 1 padded by `k - 1`) is `z`'s output, and both write as many channels.
/// A residual block (expand, depthwise, project over the block's input) is such a path.
fn same_shape(model: &Model, producer: &HashMap<&str, usize>, at: usize, z: usize) -> bool {
    let out_channels = |i: usize| {
        let n = model.nodes.get(i)?;
        let w = model.initializers.get(n.inputs.get(1)?)?;
        w.shape().first().copied()
    };
    let Some(zy) = model.nodes.get(z).and_then(|n| n.outputs.first()) else {
        return false;
    };
    if out_channels(at).is_none() || out_channels(at) != out_channels(z) {
        return false;
    }
    // A MobileNet block is three convolutions; a few more allow for longer chains.
    let mut i = at;
    for _ in 0..8 {
        let Some(n) = model.nodes.get(i) else {
            return false;
        };
        if !keeps_size(model, n) {
            return false;
        }
        let Some(x) = n.inputs.first() else {
            return false;
        };
        if x == zy {
            return true;
        }
        let Some(&p) = producer.get(x.as_str()) else {
            return false;
        };
        i = p;
    }
    false
}

/// Whether `n` is a convolution whose output has its input's spatial size: 1x1 (stride 1,
/// no padding: [`Kind::Pointwise`]), or depthwise with stride and dilation 1 and `k - 1`
/// padding along each axis.
fn keeps_size(model: &Model, n: &Node) -> bool {
    match kind(model, n) {
        Some(Kind::Pointwise) => true,
        Some(Kind::Depthwise) => {
            let Some(w) = n.inputs.get(1).and_then(|w| model.initializers.get(w)) else {
                return false;
            };
            let &[_, _, kh, kw] = w.shape() else {
                return false;
            };
            let ints = |name: &str| {
                n.attributes
                    .iter()
                    .find(|a| a.name == name)
                    .map(|a| match &a.value {
                        AttrValue::Ints(v) => Some(v.clone()),
                        _ => None,
                    })
            };
            let ones = |name: &str| match ints(name) {
                None => true,
                Some(Some(v)) => v.iter().all(|&x| x == 1),
                Some(None) => false,
            };
            // Padding `k - 1` along an axis (the sums checked: pads come from the model).
            let keeps = |a: i64, b: i64, k: usize| {
                i64::try_from(k).is_ok_and(|k| a.checked_add(b) == Some(k - 1))
            };
            let pads_keep = match ints("pads") {
                Some(Some(p)) => match p.as_slice() {
                    &[t, l, b, r] => keeps(t, b, kh) && keeps(l, r, kw),
                    _ => false,
                },
                None => (kh, kw) == (1, 1),
                Some(None) => false,
            };
            let no_auto_pad = n.attributes.iter().all(|a| {
                a.name != "auto_pad"
                    || matches!(&a.value, AttrValue::String(s) if s.is_empty() || s == "NOTSET")
            });
            ones("strides") && ones("dilations") && pads_keep && no_auto_pad
        }
        _ => false,
    }
}

/// What an f32 2-D convolution is to the channels-last kernel.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// 1x1, stride 1, no padding, one group: reads and writes either layout.
    Pointwise,
    /// One input and one output channel per group: reads and writes either layout.
    Depthwise,
    /// Any other of one group: writes either layout, reads NCHW only.
    General,
}

/// The [`Kind`] of `n` when it is an f32 convolution the channels-last kernel computes: a
/// `Conv` or `opreg::FusedConv` over 2 spatial dimensions.
fn kind(model: &Model, n: &Node) -> Option<Kind> {
    let conv = (n.domain.is_empty() && n.op_type == "Conv")
        || (n.domain == "opreg" && n.op_type == "FusedConv");
    let w = n.inputs.get(1).and_then(|w| model.initializers.get(w))?;
    let &[m, cg, kh, kw] = w.shape() else {
        return None;
    };
    if !conv || w.dtype() != DType::F32 || n.outputs.len() != 1 {
        return None;
    }
    let ints = |name: &str| {
        n.attributes
            .iter()
            .find(|a| a.name == name)
            .map(|a| match &a.value {
                AttrValue::Ints(v) => Some(v.clone()),
                _ => None,
            })
    };
    let group = match n.attributes.iter().find(|a| a.name == "group") {
        None => 1,
        Some(Attribute {
            value: AttrValue::Int(g),
            ..
        }) => *g,
        Some(_) => return None,
    };
    let all = |name: &str, v: i64| match ints(name) {
        None => true,
        Some(Some(xs)) => xs.iter().all(|&x| x == v),
        Some(None) => false,
    };
    // A kernel_shape attribute, if any, is W's.
    let kernel_ok = match ints("kernel_shape") {
        None => true,
        Some(Some(k)) => k.len() == 2 && k.iter().zip([kh, kw]).all(|(&a, b)| a == b as i64),
        Some(None) => false,
    };
    let auto_pad = n.attributes.iter().find(|a| a.name == "auto_pad");
    let no_auto_pad = match auto_pad.map(|a| &a.value) {
        None => true,
        Some(AttrValue::String(s)) => s.is_empty() || s == "NOTSET",
        Some(_) => false,
    };
    let pointwise =
        group == 1 && (kh, kw) == (1, 1) && all("strides", 1) && all("pads", 0) && no_auto_pad;
    let depthwise = cg == 1 && m > 1 && i64::try_from(m).is_ok_and(|m| m == group);
    let general = group == 1 && no_auto_pad && (kh, kw) != (1, 1);
    if !kernel_ok {
        None
    } else if pointwise {
        Some(Kind::Pointwise)
    } else if depthwise {
        Some(Kind::Depthwise)
    } else if general {
        Some(Kind::General)
    } else {
        None
    }
}
