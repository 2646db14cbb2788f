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
//! only where the kernels have `FusedConvNhwc` (see [`Pass::fuses`]). A convolution with a
//! fused sum (Z, which has Y's layout) keeps an NCHW output. Results do not change: the
//! kernels compute the same sums in the same order (their tests hold them to it).

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
        let mut found: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, n) in model.nodes.iter().enumerate() {
            let ([y], Some(Some(k))) = (n.outputs.as_slice(), kinds.get(i)) else {
                continue;
            };
            // A fused sum has Y's layout: such an output stays NCHW.
            if n.inputs.get(3).is_some_and(|z| !z.is_empty()) || pinned.contains(y) {
                continue;
            }
            let Some(rs) = readers.get(y.as_str()) else {
                continue;
            };
            // Another convolution writes channels-last only for depthwise readers, whose
            // channels-last copy it then saves (a first layer's NCHW output took the
            // depthwise layer after it a transpose, and its own tiles one).
            let fits = |j: usize| match k {
                Kind::General => matches!(kinds.get(j), Some(Some(Kind::Depthwise))),
                Kind::Pointwise | Kind::Depthwise => reads(j),
            };
            if rs.iter().all(|&(j, slot)| slot == 0 && fits(j)) {
                found.push((i, rs.iter().map(|&(j, _)| j).collect()));
            }
        }
        if found.is_empty() {
            return Ok(0);
        }
        let mut taken = value_names(model);
        let mut layouts: HashMap<usize, (bool, bool)> = HashMap::new();
        for (i, rs) in found {
            let Some(y) = model.nodes.get(i).and_then(|n| n.outputs.first()).cloned() else {
                continue;
            };
            let t = fresh(&mut taken, &format!("{y}_nhwc"));
            if let Some(slot) = model.nodes.get_mut(i).and_then(|n| n.outputs.first_mut()) {
                *slot = t.clone();
            }
            layouts.entry(i).or_default().1 = true;
            for j in rs {
                if let Some(slot) = model.nodes.get_mut(j).and_then(|n| n.inputs.first_mut()) {
                    *slot = t.clone();
                }
                layouts.entry(j).or_default().0 = true;
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
