//! `nhwc-conv`: the values between f32 convolutions (a MobileNet block's expand -> depthwise
//! -> project chain, a ResNet's 1x1 -> 3x3 -> 1x1 bottlenecks) kept channels-last.
//!
//! The depthwise kernel computes with the channels in the lanes: on an NCHW value it copies
//! its input channels-last and turns each tile of its output back (profiled on MobileNetV2:
//! as long as the taps themselves). The direct kernel of the other convolutions past 1x1
//! (a ResNet's 3x3 layers) copies its input channels-last too, 16 channels at a time, and
//! turns its tiles back likewise. A 1x1 convolution is a gemm that reads and writes either
//! layout (the layout is only the operands' strides), faster channels-last where its depth
//! is large: ResNet-50's 1x1 layers of 512-1024 input channels took 13-21 % less time so
//! (per node, alternating builds), its 3x3 layers the same (±3 %). So a value that an f32
//! convolution produces and that only convolutions read (as their X) is made channels-last:
//! its producer becomes `opreg::FusedConvNhwc` with `y_nhwc = 1`, its readers with
//! `x_nhwc = 1`, and the value is renamed `<name>_nhwc` (its layout is not the one its old
//! name had). A GlobalAveragePool reader (a network's head) becomes
//! `opreg::GlobalAveragePoolNhwc`, whose output is the pool's own `[N, C, 1, 1]`. A 2-D
//! MaxPool between such values (ResNet's 3x3/2 pool after the stem: made by a convolution,
//! read by convolutions) goes channels-last with them, as `opreg::MaxPoolNhwc`: in NCHW each
//! row of its stride-2 windows is split into even and odd columns, channels-last every tap is
//! a run of channels (nine vector maxima per 16 channels of a 3x3 window, as in ONNX
//! Runtime's NCHWc pool). Not where a 1x1 reader of the pool would write NCHW: that reader
//! storing NCHW from a channels-last X, and the stem turning its tiles, cost more than the
//! pool gained. A Concat along the channels of such values (SqueezeNet's Fire modules: two
//! expand layers, then the Concat, read by the next module) goes with them as a Concat along
//! axis 3. No transpose is added: every value entering or leaving the channels-last region is
//! converted inside a convolution.
//!
//! ```text
//! x -> Conv1x1 -> FusedConv(dw, Clip) -> Conv1x1 -> y   ==>
//! x -> FusedConvNhwc(y_nhwc) -> FusedConvNhwc(x_nhwc, y_nhwc) -> FusedConvNhwc(x_nhwc) -> y
//! ```
//!
//! One exception: a 1x1 reader whose own output must stay NCHW (a Concat or a pool reads it)
//! computes from a channels-last X into NCHW by storing its tiles column by column, slower
//! than the NCHW product; so a value such a reader takes stays NCHW unless a depthwise layer
//! writes it (whose NCHW output costs more). (SqueezeNet's Fire modules stayed NCHW so until
//! the Concat went channels-last: their layers then ran at 1.3-2.6x ONNX Runtime's time,
//! 1.0-1.5x channels-last, the Concats' copies added 0.24 ms of the 0.73 ms saved.)
//!
//! Runs after `conv-add` and `conv-activation` (their fused nodes are what it converts) and
//! only where the kernels have `FusedConvNhwc` (see [`Pass::fuses`]). A fused sum (Z) has
//! Y's layout: a convolution with a Z writes channels-last only where its Z is channels-last,
//! and a value read as a Z only where its reader writes channels-last, so a residual chain
//! (MobileNetV2's 24- to 160-channel bottleneck values, a ResNet stage's block outputs, each
//! read by the next block's first layer and, as Z, by its projection) goes channels-last as a
//! whole. Kept NCHW, those values cost every projection a column-major store and every
//! expansion a transposing pack (MobileNetV2's narrow projections ran at 1.7-1.95x ONNX
//! Runtime's time). Results do not change: the kernels compute the same sums in the same
//! order (their tests hold them to it).

use super::{super::import::Model, fresh, value_names, Fusion, Pass};
use crate::graph::{import::Node, subgraphs::outer_reads, GraphError};
use opreg_sdk::{kernel::Attribute, AttrValue, DType};
use std::collections::{HashMap, HashSet};

/// Channels-last values between convolutions (see the module docs).
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
            // `MaxPoolNhwc` came with `GlobalAveragePoolNhwc` (one plugin release): a
            // registry with the one has the other.
            also: &[("opreg", "GlobalAveragePoolNhwc"), ("opreg", "MaxPoolNhwc")],
        })
    }

    fn run(&self, model: &mut Model) -> Result<usize, GraphError> {
        let kinds: Vec<Option<Kind>> = model.nodes.iter().map(|n| kind(model, n)).collect();
        let reads = |j: usize| matches!(kinds.get(j), Some(Some(_)));
        let is_pool = |j: usize| matches!(kinds.get(j), Some(Some(Kind::Pool)));
        let is_concat = |j: usize| matches!(kinds.get(j), Some(Some(Kind::Concat)));
        // A network's final pool reads a channels-last X too (`opreg::GlobalAveragePoolNhwc`):
        // else its last residual chain stays NCHW, every projection of the stage storing
        // column-major (ResNet-50's 7x7 stage, 1.3-1.6x ONNX Runtime's time).
        let pools_at: Vec<bool> = model
            .nodes
            .iter()
            .map(|n| {
                n.domain.is_empty()
                    && n.op_type == "GlobalAveragePool"
                    && n.inputs.len() == 1
                    && n.outputs.len() == 1
            })
            .collect();
        let pool = |j: usize| pools_at.get(j).copied().unwrap_or(false);
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
            let ([y], Some(Some(_))) = (n.outputs.as_slice(), kinds.get(i)) else {
                continue;
            };
            producer.insert(y.as_str(), i);
            if pinned.contains(y) {
                continue;
            }
            let Some(rs) = readers.get(y.as_str()) else {
                continue;
            };
            // Read by convolutions only, as X or as a fused sum (Z, slot 3), which takes its
            // reader's Y layout (checked below), or by a channel Concat (any slot).
            let fits = |j: usize, slot: usize| {
                is_concat(j) || (matches!(slot, 0 | 3) && reads(j)) || (slot == 0 && pool(j))
            };
            if rs.iter().all(|&(j, slot)| fits(j, slot)) {
                found.insert(i, rs.clone());
            }
        }
        // A fused sum has Y's layout: a convolution with a Z writes channels-last only where
        // its Z is channels-last, and a value read as a Z is channels-last only where its
        // reader writes so (a residual chain of MobileNetV2 goes channels-last as a whole,
        // or stays NCHW). Removing one candidate can undo others: until nothing changes.
        let writers: HashSet<usize> = found.keys().copied().collect();
        loop {
            let undone: Vec<usize> = found
                .iter()
                .filter(|&(&i, rs)| {
                    let node = model.nodes.get(i);
                    let z = node
                        .filter(|_| !is_concat(i))
                        .and_then(|n| n.inputs.get(3))
                        .filter(|z| !z.is_empty());
                    let z_fits = z.is_none_or(|z| {
                        producer.get(z.as_str()).is_some_and(|p| {
                            found.contains_key(p) && same_shape(model, &producer, i, *p)
                        })
                    });
                    // A 1x1 reader whose output cannot go channels-last (a Concat or a
                    // pool reads it) would compute from a channels-last X into NCHW, its
                    // tiles stored column by column: SqueezeNet's expand layers ran 10-15 %
                    // slower so, their squeeze layer too (16-64 channels: the tiles half
                    // empty). Not after a depthwise layer, whose NCHW output costs more (its
                    // tiles turned back). Only such readers: one that merely lost its own
                    // candidacy to the fixed point would take every value upstream along.
                    let depthwise = matches!(kinds.get(i), Some(Some(Kind::Depthwise)));
                    let pointwise = |j: usize| matches!(kinds.get(j), Some(Some(Kind::Pointwise)));
                    let readers_fit = rs.iter().all(|&(j, slot)| match slot {
                        // A Concat reads and writes one layout: its output must go too.
                        _ if is_concat(j) => found.contains_key(&j),
                        3 => found.contains_key(&j),
                        // A MaxPool reads and writes one layout: its output must go too.
                        _ if is_pool(j) => found.contains_key(&j),
                        // A pool's 1x1 readers must stay channels-last themselves: SqueezeNet's
                        // squeeze layer after its first pool, storing NCHW from a
                        // channels-last X, lost what the pool gained (0.02 -> 0.028 ms).
                        _ if is_pool(i) || is_concat(i) => !pointwise(j) || found.contains_key(&j),
                        _ => depthwise || !pointwise(j) || writers.contains(&j),
                    });
                    // ... and its input must be channels-last for its output to be (every input
                    // of a Concat).
                    let channels_last = |x: &String| {
                        producer
                            .get(x.as_str())
                            .is_some_and(|p| found.contains_key(p))
                    };
                    let x_fits = if is_concat(i) {
                        node.is_some_and(|n| n.inputs.iter().all(channels_last))
                    } else {
                        !is_pool(i)
                            || node
                                .and_then(|n| n.inputs.first())
                                .is_some_and(channels_last)
                    };
                    !(z_fits && readers_fit && x_fits)
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
        let mut pools = Vec::new();
        let mut max_pools = Vec::new();
        let mut concats = Vec::new();
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
            if is_pool(i) {
                max_pools.push(i);
            } else if is_concat(i) {
                concats.push(i);
            } else {
                layouts.entry(i).or_default().1 = true;
            }
            for (j, k) in rs {
                if let Some(slot) = model.nodes.get_mut(j).and_then(|n| n.inputs.get_mut(k)) {
                    *slot = t.clone();
                }
                // Read as X: the reader's X is channels-last; as Z, its Y is (a candidate).
                if k == 0 && pool(j) {
                    pools.push(j);
                } else if k == 0 && !is_pool(j) && !is_concat(j) {
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
        for &j in &pools {
            if let Some(n) = model.nodes.get_mut(j) {
                n.domain = "opreg".into();
                n.op_type = "GlobalAveragePoolNhwc".into();
            }
        }
        for &j in &max_pools {
            if let Some(n) = model.nodes.get_mut(j) {
                n.domain = "opreg".into();
                n.op_type = "MaxPoolNhwc".into();
                // No Indices output (`kind`): no storage order.
                n.attributes.retain(|a| a.name != "storage_order");
            }
        }
        for &j in &concats {
            if let Some(n) = model.nodes.get_mut(j) {
                // The channels, axis 1 of NCHW, are axis 3 of NHWC.
                n.attributes.retain(|a| a.name != "axis");
                n.attributes.push(Attribute {
                    name: "axis".into(),
                    value: AttrValue::Int(3),
                });
            }
        }
        model.opsets.entry("opreg".into()).or_insert(1);
        Ok(layouts.len() + pools.len() + max_pools.len() + concats.len())
    }
}

/// Whether node `at`'s output provably has the shape of node `z`'s (its fused sum), so that
/// a channels-last Z needs no broadcast (the channels-last kernel adds a Z of Y's shape only;
/// `conv-add` fuses any broadcasting Add, and the graph carries no shapes here): both write
/// as many channels, and walking back through convolutions from each reaches one value along
/// paths that map spatial extents alike (the same sequence of [`SpatialMap`]s once the
/// size-keeping ones are left out). A residual block over its input (MobileNetV2's expand,
/// depthwise, project; a ResNet's 1x1, 3x3, 1x1) is such a pair, and so is a downsampling
/// ResNet block (3x3 stride 2 padded 1 on one path, 1x1 stride 2 on the shortcut: both
/// `(h - 1) / 2 + 1`).
fn same_shape(model: &Model, producer: &HashMap<&str, usize>, at: usize, z: usize) -> bool {
    // A pool has its input's channels: walk back to the convolution before it.
    let out_channels = |mut i: usize| {
        for _ in 0..8 {
            let n = model.nodes.get(i)?;
            if kind(model, n) != Some(Kind::Pool) {
                let w = model.initializers.get(n.inputs.get(1)?)?;
                return w.shape().first().copied();
            }
            i = *producer.get(n.inputs.first()?.as_str())?;
        }
        None
    };
    if out_channels(at).is_none() || out_channels(at) != out_channels(z) {
        return false;
    }
    let (Some(from_at), Some(from_z)) = (
        walk_back(model, producer, at),
        model
            .nodes
            .get(z)
            .and_then(|n| n.outputs.first())
            .and_then(|zy| {
                let mut path = walk_back(model, producer, z)?;
                path.insert(0, (zy.as_str(), Vec::new()));
                Some(path)
            }),
    ) else {
        return false;
    };
    from_at
        .iter()
        .any(|(v, maps)| from_z.iter().any(|(u, other)| u == v && other == maps))
}

/// A convolution's spatial extents, per axis: `out = (in + pads - span) / stride + 1` with
/// `span = dilation * (k - 1) + 1`, kept as `(pads - span, stride)`; two maps are the same
/// function of `in` exactly when these are equal.
type SpatialMap = Vec<(i64, i64)>;

/// The values reached walking back from node `from` through convolutions (X after X, at most
/// a few), each with the maps between it and `from`'s output (outermost first, those that
/// keep the size left out); `None` where `from` is not a convolution this pass knows.
fn walk_back<'m>(
    model: &'m Model,
    producer: &HashMap<&str, usize>,
    from: usize,
) -> Option<Vec<(&'m str, Vec<SpatialMap>)>> {
    let mut path = Vec::new();
    let mut maps = Vec::new();
    let mut i = from;
    // A MobileNet or ResNet block is three convolutions; a few more allow longer chains.
    for _ in 0..8 {
        let Some(n) = model.nodes.get(i) else {
            break;
        };
        let Some(map) = spatial_map(model, n) else {
            break;
        };
        if !map.iter().all(|&(d, s)| (d, s) == (-1, 1)) {
            maps.push(map);
        }
        let Some(x) = n.inputs.first() else {
            break;
        };
        path.push((x.as_str(), maps.clone()));
        let Some(&p) = producer.get(x.as_str()) else {
            break;
        };
        i = p;
    }
    (!path.is_empty()).then_some(path)
}

/// The [`SpatialMap`] of `n` when it is a 2-D convolution or MaxPool this pass knows (see
/// [`kind`]) with explicit (or no) pads, strides and dilations.
fn spatial_map(model: &Model, n: &Node) -> Option<SpatialMap> {
    let ints = |name: &str, default: Vec<i64>| match n.attributes.iter().find(|a| a.name == name) {
        None => Some(default),
        Some(Attribute {
            value: AttrValue::Ints(v),
            ..
        }) => Some(v.clone()),
        Some(_) => None,
    };
    let k = kind(model, n)?;
    if k == Kind::Concat {
        return None;
    }
    let (kh, kw) = if k == Kind::Pool {
        // A ceil-mode pool's extents are another function (rounded up, and a window may not
        // start in the end padding): not followed.
        let ceil = n
            .attributes
            .iter()
            .any(|a| a.name == "ceil_mode" && !matches!(a.value, AttrValue::Int(0)));
        match ints("kernel_shape", Vec::new())?.as_slice() {
            &[kh, kw] if !ceil => (usize::try_from(kh).ok()?, usize::try_from(kw).ok()?),
            _ => return None,
        }
    } else {
        let w = n.inputs.get(1).and_then(|w| model.initializers.get(w))?;
        let &[_, _, kh, kw] = w.shape() else {
            return None;
        };
        (kh, kw)
    };
    let no_auto_pad = n.attributes.iter().all(|a| {
        a.name != "auto_pad"
            || matches!(&a.value, AttrValue::String(s) if s.is_empty() || s == "NOTSET")
    });
    let (Some(&[t, l, bo, r]), Some(&[sh, sw]), Some(&[dh, dw])) = (
        ints("pads", vec![0; 4]).as_deref(),
        ints("strides", vec![1; 2]).as_deref(),
        ints("dilations", vec![1; 2]).as_deref(),
    ) else {
        return None;
    };
    if !no_auto_pad {
        return None;
    }
    [(kh, t, bo, sh, dh), (kw, l, r, sw, dw)]
        .into_iter()
        .map(|(k, begin, end, stride, dilation)| {
            let span = i64::try_from(k)
                .ok()?
                .checked_sub(1)?
                .checked_mul(dilation)?
                .checked_add(1)?;
            let d = begin.checked_add(end)?.checked_sub(span)?;
            (stride >= 1).then_some((d, stride))
        })
        .collect()
}

/// What an f32 2-D convolution is to the channels-last kernel.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// 1x1, no padding, one group (strided too: a ResNet's downsampling shortcut): reads and
    /// writes either layout.
    Pointwise,
    /// One input and one output channel per group: reads and writes either layout.
    Depthwise,
    /// Any other of one group (the direct kernel's): reads and writes either layout.
    General,
    /// A 2-D f32 MaxPool without indices, its X and Y in one layout (`opreg::MaxPoolNhwc`
    /// channels-last). f32 because what it reads is: it goes channels-last only after a
    /// convolution this pass converts.
    Pool,
    /// A Concat along the channels (axis 1 or -3) of values that all go channels-last (so
    /// 4-D: convolutions' and pools' outputs), its output read by such readers: axis 3 of
    /// the channels-last values (SqueezeNet's Fire modules, whose expand layers feed one).
    /// Kept NCHW, a Fire module's layers ran at 1.3-2.6x ONNX Runtime's time, each storing
    /// NCHW; channels-last, a Concat copies runs of channels per pixel.
    Concat,
}

/// The [`Kind`] of `n` when it is an f32 convolution the channels-last kernel computes: a
/// `Conv` or `opreg::FusedConv` over 2 spatial dimensions.
fn kind(model: &Model, n: &Node) -> Option<Kind> {
    if n.domain.is_empty() && n.op_type == "Concat" {
        let channels = n
            .attributes
            .iter()
            .any(|a| a.name == "axis" && matches!(a.value, AttrValue::Int(1) | AttrValue::Int(-3)));
        let inputs = !n.inputs.is_empty() && n.inputs.iter().all(|x| !x.is_empty());
        return (channels && inputs && n.outputs.len() == 1).then_some(Kind::Concat);
    }
    if n.domain.is_empty() && n.op_type == "MaxPool" {
        // One input, no Indices output, a 2-D window.
        let two_d = n.attributes.iter().any(|a| {
            a.name == "kernel_shape" && matches!(&a.value, AttrValue::Ints(k) if k.len() == 2)
        });
        return (two_d && n.inputs.len() == 1 && n.outputs.len() == 1).then_some(Kind::Pool);
    }
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
    let pointwise = group == 1 && (kh, kw) == (1, 1) && all("pads", 0) && no_auto_pad;
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
