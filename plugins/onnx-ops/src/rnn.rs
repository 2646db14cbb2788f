//! Recurrent operators: RNN, GRU and LSTM (forward, reverse, bidirectional; `layout` 0 and 1;
//! per-batch `sequence_lens`; optional initial states and outputs). Each (direction, batch)
//! pair is an independent recurrence, so they run in parallel; the arithmetic is f64 for f32
//! and f64 tensors alike.

use opreg_sdk::{
    alloc::{checked_numel, try_vec, try_with_capacity},
    prelude::*,
};
use std::{
    borrow::Cow,
    sync::{Arc, Mutex},
};

/// An activation function of the recurrent cells, with its alpha and beta.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Act {
    Relu,
    Tanh,
    Sigmoid,
    Affine(f64, f64),
    LeakyRelu(f64),
    ThresholdedRelu(f64),
    ScaledTanh(f64, f64),
    HardSigmoid(f64, f64),
    Elu(f64),
    Softsign,
    Softplus,
}

impl Act {
    #[inline]
    fn apply(self, x: f64) -> f64 {
        match self {
            Act::Relu => x.max(0.0),
            Act::Tanh => x.tanh(),
            Act::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Act::Affine(a, b) => a * x + b,
            Act::LeakyRelu(a) => {
                if x >= 0.0 {
                    x
                } else {
                    a * x
                }
            }
            Act::ThresholdedRelu(a) => {
                if x > a {
                    x
                } else {
                    0.0
                }
            }
            Act::ScaledTanh(a, b) => a * (b * x).tanh(),
            Act::HardSigmoid(a, b) => (a * x + b).clamp(0.0, 1.0),
            Act::Elu(a) => {
                if x >= 0.0 {
                    x
                } else {
                    a * (x.exp() - 1.0)
                }
            }
            Act::Softsign => x / (1.0 + x.abs()),
            Act::Softplus => {
                if x > 30.0 {
                    x
                } else {
                    x.exp().ln_1p()
                }
            }
        }
    }
}

/// Parses `activations` (case-insensitive), consuming `activation_alpha` / `activation_beta`
/// in order by the functions that take them (as ONNX Runtime does); absent values take the
/// ONNX operators' defaults.
fn parse_acts(
    op: &str,
    names: &[String],
    alphas: &[f32],
    betas: &[f32],
) -> Result<Vec<Act>, PluginError> {
    let (mut ai, mut bi) = (alphas.iter(), betas.iter());
    let mut alpha = |d: f64| ai.next().map_or(d, |&v| v as f64);
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let act = match name.to_ascii_lowercase().as_str() {
            "relu" => Act::Relu,
            "tanh" => Act::Tanh,
            "sigmoid" => Act::Sigmoid,
            "affine" => {
                let a = alpha(1.0);
                Act::Affine(a, bi.next().map_or(0.0, |&v| v as f64))
            }
            "leakyrelu" => Act::LeakyRelu(alpha(0.01)),
            "thresholdedrelu" => Act::ThresholdedRelu(alpha(1.0)),
            "scaledtanh" => {
                let a = alpha(1.0);
                Act::ScaledTanh(a, bi.next().map_or(1.0, |&v| v as f64))
            }
            "hardsigmoid" => {
                let a = alpha(0.2);
                Act::HardSigmoid(a, bi.next().map_or(0.5, |&v| v as f64))
            }
            "elu" => Act::Elu(alpha(1.0)),
            "softsign" => Act::Softsign,
            "softplus" => Act::Softplus,
            other => {
                return Err(PluginError::invalid(format!(
                    "{op}: unknown activation '{other}' in attribute 'activations'"
                )))
            }
        };
        out.push(act);
    }
    Ok(out)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cell {
    Rnn,
    Gru,
    Lstm,
}

impl Cell {
    fn name(self) -> &'static str {
        match self {
            Cell::Rnn => "RNN",
            Cell::Gru => "GRU",
            Cell::Lstm => "LSTM",
        }
    }

    /// Gates per cell (rows of W per hidden unit).
    fn gates(self) -> usize {
        match self {
            Cell::Rnn => 1,
            Cell::Gru => 3,
            Cell::Lstm => 4,
        }
    }

    fn default_acts(self) -> &'static [Act] {
        match self {
            Cell::Rnn => &[Act::Tanh],
            Cell::Gru => &[Act::Sigmoid, Act::Tanh],
            Cell::Lstm => &[Act::Sigmoid, Act::Tanh, Act::Tanh],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Forward,
    Reverse,
    Bidirectional,
}

#[derive(Clone, Debug)]
struct Recurrent {
    cell: Cell,
    direction: Direction,
    hidden: Option<usize>,
    /// `gates_acts` per direction, forward first.
    acts: Vec<Act>,
    clip: Option<f64>,
    layout: usize,
    linear_before_reset: bool,
    input_forget: bool,
    /// Constant W and R as f64, converted once at load instead of on every call (a CRNN's
    /// two BiLSTMs spent 7 % of the model converting them).
    w64: Option<Arc<Vec<f64>>>,
    r64: Option<Arc<Vec<f64>>>,
}

/// Constant input `i` of `node` as f64 values, when it is a float constant.
fn constant_f64(node: &NodeInfo<'_>, i: usize) -> Option<Arc<Vec<f64>>> {
    let t = node.inputs.get(i)?.constant?;
    read_f64(node.op_type, &t, "").ok().map(Arc::new)
}

/// `cached` when it holds as many values as `t`, else `t` converted now.
fn f64s<'c>(
    op: &str,
    cached: &'c Option<Arc<Vec<f64>>>,
    t: &TensorView<'_>,
    name: &str,
) -> Result<Cow<'c, [f64]>, PluginError> {
    match cached {
        Some(c) if c.len() == t.len() => Ok(Cow::Borrowed(c.as_slice())),
        _ => read_f64(op, t, name).map(Cow::Owned),
    }
}

fn factory(cell: Cell, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let op = cell.name();
    let direction = match node.string_or("direction", "forward")?.as_str() {
        "forward" => Direction::Forward,
        "reverse" => Direction::Reverse,
        "bidirectional" => Direction::Bidirectional,
        other => {
            return Err(PluginError::invalid(format!(
                "{op}: attribute 'direction' must be forward, reverse or bidirectional, got \
                 '{other}'"
            )))
        }
    };
    let num_dir = if direction == Direction::Bidirectional {
        2
    } else {
        1
    };
    let hidden = match node.int_or("hidden_size", -1)? {
        -1 => None,
        h if h > 0 => Some(h as usize),
        h => {
            return Err(PluginError::invalid(format!(
                "{op}: attribute 'hidden_size' must be positive, got {h}"
            )))
        }
    };
    let per_dir = cell.default_acts().len();
    let acts = match node.attr("activations") {
        None => {
            let mut v = Vec::new();
            for _ in 0..num_dir {
                v.extend_from_slice(cell.default_acts());
            }
            v
        }
        Some(AttrValue::Strings(names)) => {
            let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
            let alphas = node.floats("activation_alpha")?.unwrap_or_default();
            let betas = node.floats("activation_beta")?.unwrap_or_default();
            let mut acts = parse_acts(op, &names, &alphas, &betas)?;
            if acts.len() == per_dir && num_dir == 2 {
                acts.extend_from_within(..);
            }
            if acts.len() != per_dir * num_dir {
                return Err(PluginError::invalid(format!(
                    "{op}: attribute 'activations' has {} functions, expected {}",
                    acts.len(),
                    per_dir * num_dir
                )));
            }
            acts
        }
        Some(other) => {
            return Err(PluginError::invalid(format!(
                "{op}: attribute 'activations' must be STRINGS, got {other:?}"
            )))
        }
    };
    let clip = match node.attr("clip") {
        None => None,
        Some(AttrValue::Float(c)) if *c > 0.0 => Some(*c as f64),
        Some(other) => {
            return Err(PluginError::invalid(format!(
                "{op}: attribute 'clip' must be a positive FLOAT, got {other:?}"
            )))
        }
    };
    let layout = match node.int_or("layout", 0)? {
        0 => 0,
        1 => 1,
        l => {
            return Err(PluginError::invalid(format!(
                "{op}: attribute 'layout' must be 0 or 1, got {l}"
            )))
        }
    };
    Ok(Box::new(Recurrent {
        cell,
        direction,
        hidden,
        acts,
        clip,
        layout,
        linear_before_reset: node.int_or("linear_before_reset", 0)? != 0,
        input_forget: node.int_or("input_forget", 0)? != 0,
        w64: constant_f64(node, 1),
        r64: constant_f64(node, 2),
    }))
}

fn rnn_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    factory(Cell::Rnn, node)
}

fn gru_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    factory(Cell::Gru, node)
}

fn lstm_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    factory(Cell::Lstm, node)
}

/// A float input as f64 values (contiguous, row-major).
fn read_f64(op: &str, t: &TensorView<'_>, name: &str) -> Result<Vec<f64>, PluginError> {
    // Twice an f32 input's size: reserved fallibly.
    let mut out = try_with_capacity(t.len())?;
    match t.dtype {
        DType::F32 => out.extend(t.as_slice::<f32>()?.iter().map(|&v| v as f64)),
        DType::F64 => out.extend_from_slice(t.as_slice::<f64>()?),
        other => {
            return Err(PluginError::unimplemented(format!(
                "{op}: input '{name}' of type {other} is not supported (f32, f64)"
            )))
        }
    }
    Ok(out)
}

fn input<'a>(inputs: &[TensorView<'a>], i: usize) -> Option<TensorView<'a>> {
    inputs.get(i).copied().filter(|t| !t.is_absent())
}

/// What one (direction, batch) recurrence produced: its Y rows (`seq * hidden`, zero past its
/// length), final H and final C.
struct Track {
    y: Vec<f64>,
    h: Vec<f64>,
    c: Vec<f64>,
}

/// Per-direction parameters, borrowed from the inputs.
struct Params<'p> {
    w: &'p [f64],
    r: &'p [f64],
    /// `2 * gates * hidden` (Wb then Rb); zeros when B is absent.
    b: &'p [f64],
    /// `3 * hidden` (i, o, f) for LSTM; zeros when P is absent.
    p: &'p [f64],
    acts: &'p [Act],
}

crate::simd::simd_fn! {
    /// `out[g] = sum_k m[g * cols + k] * v[k]` for `rows` rows (`cols = v.len()`). Each dot
    /// product runs in 8 independent partial sums, so it vectorizes and is not one chain of
    /// dependent adds (a single running sum kept the recurrences at ~4 cycles per
    /// multiply-add: a CRNN's two BiLSTMs took 43 ms, 7x onnxruntime's whole model).
    fn matvec(m: &[f64], v: &[f64], rows: usize, out: &mut [f64]) {
        const LANES: usize = 8;
        let cols = v.len();
        for (g, o) in out[..rows].iter_mut().enumerate() {
            let row = &m[g * cols..(g + 1) * cols];
            let mut acc = [0.0f64; LANES];
            let (rc, rt) = row.split_at(cols - cols % LANES);
            let (vc, vt) = v.split_at(cols - cols % LANES);
            for (a, b) in rc.chunks_exact(LANES).zip(vc.chunks_exact(LANES)) {
                for l in 0..LANES {
                    acc[l] += a[l] * b[l];
                }
            }
            let tail: f64 = rt.iter().zip(vt).map(|(a, b)| a * b).sum();
            *o = acc.iter().sum::<f64>() + tail;
        }
    }
}

impl Recurrent {
    /// Runs one recurrence over `xs` (`seq` rows of `input` values, already in time order of
    /// the input), for `len` steps, in the direction given by `reverse`.
    #[allow(clippy::too_many_arguments)]
    fn track(
        &self,
        prm: &Params<'_>,
        xs: &[Vec<f64>],
        len: usize,
        reverse: bool,
        hidden: usize,
        h0: Vec<f64>,
        c0: Vec<f64>,
    ) -> Result<Track, PluginError> {
        let seq = xs.len();
        let g = self.cell.gates();
        let gh = g * hidden;
        // `seq * hidden` is not bounded by X's size (X may have no input features).
        let mut y = try_vec(checked_numel(&[seq, hidden])?, 0.0)?;
        let (mut h, mut c) = (h0, c0);
        let mut wx = vec![0.0; gh];
        let mut rh = vec![0.0; gh];
        let mut tmp = vec![0.0; hidden];
        let clip = |v: f64| match self.clip {
            Some(t) => v.clamp(-t, t),
            None => v,
        };
        let (wb, rb) = prm.b.split_at(gh);
        for step in 0..len {
            let t = if reverse { len - 1 - step } else { step };
            matvec(prm.w, &xs[t], gh, &mut wx);
            match self.cell {
                Cell::Rnn => {
                    matvec(prm.r, &h, gh, &mut rh);
                    let f = prm.acts[0];
                    for j in 0..hidden {
                        h[j] = f.apply(clip(wx[j] + rh[j] + wb[j] + rb[j]));
                    }
                }
                Cell::Gru => {
                    let (f, gact) = (prm.acts[0], prm.acts[1]);
                    // z and r from the full R h; h~ depends on linear_before_reset.
                    matvec(prm.r, &h, 2 * hidden, &mut rh);
                    let mut z = vec![0.0; hidden];
                    let mut r = vec![0.0; hidden];
                    for j in 0..hidden {
                        z[j] = f.apply(clip(wx[j] + rh[j] + wb[j] + rb[j]));
                        let k = hidden + j;
                        r[j] = f.apply(clip(wx[k] + rh[k] + wb[k] + rb[k]));
                    }
                    let rh_rows = &prm.r[2 * hidden * hidden..];
                    let o = 2 * hidden;
                    if self.linear_before_reset {
                        matvec(rh_rows, &h, hidden, &mut tmp);
                        for j in 0..hidden {
                            let k = o + j;
                            let hh = gact.apply(clip(wx[k] + r[j] * (tmp[j] + rb[k]) + wb[k]));
                            h[j] = (1.0 - z[j]) * hh + z[j] * h[j];
                        }
                    } else {
                        let rhp: Vec<f64> = r.iter().zip(&h).map(|(a, b)| a * b).collect();
                        matvec(rh_rows, &rhp, hidden, &mut tmp);
                        for j in 0..hidden {
                            let k = o + j;
                            let hh = gact.apply(clip(wx[k] + tmp[j] + rb[k] + wb[k]));
                            h[j] = (1.0 - z[j]) * hh + z[j] * h[j];
                        }
                    }
                }
                Cell::Lstm => {
                    let (f, gact, hact) = (prm.acts[0], prm.acts[1], prm.acts[2]);
                    matvec(prm.r, &h, gh, &mut rh);
                    let pre = |k: usize| wx[k] + rh[k] + wb[k] + rb[k];
                    let (pi, po, pf) = (
                        &prm.p[..hidden],
                        &prm.p[hidden..2 * hidden],
                        &prm.p[2 * hidden..],
                    );
                    for j in 0..hidden {
                        let i = f.apply(clip(pre(j) + pi[j] * c[j]));
                        let fg = if self.input_forget {
                            1.0 - i
                        } else {
                            f.apply(clip(pre(2 * hidden + j) + pf[j] * c[j]))
                        };
                        let cc = gact.apply(clip(pre(3 * hidden + j)));
                        let cn = fg * c[j] + i * cc;
                        let o = f.apply(clip(pre(hidden + j) + po[j] * cn));
                        c[j] = cn;
                        h[j] = o * hact.apply(cn);
                    }
                }
            }
            y[t * hidden..(t + 1) * hidden].copy_from_slice(&h);
        }
        Ok(Track { y, h, c })
    }
}

impl Kernel for Recurrent {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let op = self.cell.name();
        let [x, w, r] = crate::util::required(op, inputs, ["X", "W", "R"])?;
        let dtype = x.dtype;
        let num_dir = if self.direction == Direction::Bidirectional {
            2
        } else {
            1
        };
        let &[d0, d1, input_size] = x.shape() else {
            return Err(PluginError::invalid(format!(
                "{op}: input 'X' must be 3-D, got {:?}",
                x.shape()
            )));
        };
        let (seq, batch) = if self.layout == 0 { (d0, d1) } else { (d1, d0) };
        let g = self.cell.gates();
        let hidden = match (self.hidden, r.shape()) {
            (Some(h), _) => h,
            (None, &[_, _, h]) => h,
            (None, s) => {
                return Err(PluginError::invalid(format!(
                    "{op}: input 'R' must be 3-D, got {s:?}"
                )))
            }
        };
        // Sizes from the `hidden_size` attribute and X's batch dimension are checked: X may be
        // empty with a huge batch, or hidden_size absurd; both fail here or at allocation.
        let gh = checked_numel(&[g, hidden])?;
        let bias_len = checked_numel(&[num_dir, 2, gh])?;
        let peephole_len = checked_numel(&[num_dir, 3, hidden])?;
        let expect = |name: &str, t: &TensorView<'_>, want: &[usize]| {
            if t.shape() == want {
                Ok(())
            } else {
                Err(PluginError::invalid(format!(
                    "{op}: input '{name}' has shape {:?}, expected {want:?}",
                    t.shape()
                )))
            }
        };
        expect("W", &w, &[num_dir, gh, input_size])?;
        expect("R", &r, &[num_dir, gh, hidden])?;
        let xv = read_f64(op, &x, "X")?;
        let wv = f64s(op, &self.w64, &w, "W")?;
        let rv = f64s(op, &self.r64, &r, "R")?;
        let bv = match input(inputs, 3) {
            Some(b) => {
                expect("B", &b, &[num_dir, 2 * gh])?;
                read_f64(op, &b, "B")?
            }
            None => try_vec(bias_len, 0.0)?,
        };
        // Per-batch lengths; `None` (every batch runs `seq` steps) needs no batch-sized vector.
        let lens: Option<Vec<usize>> = match input(inputs, 4) {
            Some(s) => {
                expect("sequence_lens", &s, &[batch])?;
                s.to_i64s()?
                    .iter()
                    .map(|&l| {
                        if (0..=seq as i64).contains(&l) {
                            Ok(l as usize)
                        } else {
                            Err(PluginError::invalid(format!(
                                "{op}: input 'sequence_lens' holds {l}, outside [0, {seq}]"
                            )))
                        }
                    })
                    .collect::<Result<_, _>>()
                    .map(Some)?
            }
            None => None,
        };
        let state_shape = if self.layout == 0 {
            [num_dir, batch, hidden]
        } else {
            [batch, num_dir, hidden]
        };
        // State index of (direction, batch).
        let st = |d: usize, b: usize| {
            if self.layout == 0 {
                (d * batch + b) * hidden
            } else {
                (b * num_dir + d) * hidden
            }
        };
        let read_state = |i: usize, name: &str| -> Result<Option<Vec<f64>>, PluginError> {
            match input(inputs, i) {
                Some(t) => {
                    expect(name, &t, &state_shape)?;
                    Ok(Some(read_f64(op, &t, name)?))
                }
                None => Ok(None),
            }
        };
        let h0 = read_state(5, "initial_h")?;
        let (c0, pv) = if self.cell == Cell::Lstm {
            let c0 = read_state(6, "initial_c")?;
            let pv = match input(inputs, 7) {
                Some(p) => {
                    expect("P", &p, &[num_dir, 3 * hidden])?;
                    read_f64(op, &p, "P")?
                }
                None => try_vec(peephole_len, 0.0)?,
            };
            (c0, pv)
        } else {
            (None, try_vec(peephole_len, 0.0)?)
        };
        // Outputs first, so that the host refuses sizes past its limit before any per-batch
        // work or state exists.
        let n_out = ctx.num_outputs();
        if n_out > 2 && self.cell != Cell::Lstm {
            return Err(PluginError::invalid(format!(
                "{op}: the node has {n_out} outputs, at most 2"
            )));
        }
        // Y: [seq, dir, batch, hidden] (layout 0) or [batch, seq, dir, hidden] (layout 1).
        let y_shape = if self.layout == 0 {
            [seq, num_dir, batch, hidden]
        } else {
            [batch, seq, num_dir, hidden]
        };
        let mut y_out = (n_out > 0)
            .then(|| Sink::alloc(ctx, 0, dtype, &y_shape))
            .transpose()?;
        let mut h_out = (n_out > 1)
            .then(|| Sink::alloc(ctx, 1, dtype, &state_shape))
            .transpose()?;
        let mut c_out = (n_out > 2)
            .then(|| Sink::alloc(ctx, 2, dtype, &state_shape))
            .transpose()?;
        if seq == 0 {
            // No steps: Y is empty and the final states are the initial ones (zeros when
            // absent). Nothing per batch is allocated, however large the batch.
            for (out, init) in [(&mut h_out, &h0), (&mut c_out, &c0)] {
                if let (Some(out), Some(init)) = (out, init) {
                    out.put(0, init);
                }
            }
            return Ok(());
        }
        let x_at = |t: usize, b: usize| {
            let row = if self.layout == 0 {
                t * batch + b
            } else {
                b * seq + t
            };
            xv[row * input_size..(row + 1) * input_size].to_vec()
        };
        let per_dir = self.cell.default_acts().len();
        let tasks = checked_numel(&[num_dir, batch])?;
        let mut slots = try_with_capacity(tasks)?;
        slots.resize_with(tasks, || None);
        let results: Mutex<Vec<Option<Track>>> = Mutex::new(slots);
        ctx.parallel_for(tasks, 1, |range| {
            for task in range {
                let (d, b) = (task / batch, task % batch);
                let prm = Params {
                    w: &wv[d * gh * input_size..(d + 1) * gh * input_size],
                    r: &rv[d * gh * hidden..(d + 1) * gh * hidden],
                    b: &bv[d * 2 * gh..(d + 1) * 2 * gh],
                    p: &pv[d * 3 * hidden..(d + 1) * 3 * hidden],
                    acts: &self.acts[d * per_dir..(d + 1) * per_dir],
                };
                let reverse = self.direction == Direction::Reverse || d == 1;
                let xs: Vec<Vec<f64>> = (0..seq).map(|t| x_at(t, b)).collect();
                let s = st(d, b);
                let state0 = |v: &Option<Vec<f64>>| match v {
                    Some(v) => Ok(v[s..s + hidden].to_vec()),
                    None => try_vec(hidden, 0.0),
                };
                let (h0, c0) = (state0(&h0)?, state0(&c0)?);
                let len = lens.as_ref().map_or(seq, |l| l[b]);
                let tr = self.track(&prm, &xs, len, reverse, hidden, h0, c0)?;
                results
                    .lock()
                    .map_err(|_| PluginError::internal(format!("{op}: result slots poisoned")))?
                    [task] = Some(tr);
            }
            Ok(())
        })?;
        let results = results
            .into_inner()
            .map_err(|_| PluginError::internal(format!("{op}: result slots poisoned")))?;
        let tracks: Vec<Track> = results
            .into_iter()
            .map(|t| {
                t.ok_or_else(|| PluginError::internal(format!("{op}: a recurrence did not run")))
            })
            .collect::<Result<_, _>>()?;
        if let Some(y) = &mut y_out {
            for (task, tr) in tracks.iter().enumerate() {
                let (d, b) = (task / batch, task % batch);
                for t in 0..seq {
                    let o = if self.layout == 0 {
                        ((t * num_dir + d) * batch + b) * hidden
                    } else {
                        ((b * seq + t) * num_dir + d) * hidden
                    };
                    y.put(o, &tr.y[t * hidden..(t + 1) * hidden]);
                }
            }
        }
        let states: [(_, Pick); 2] = [(&mut h_out, |t| &t.h), (&mut c_out, |t| &t.c)];
        for (out, pick) in states {
            if let Some(out) = out {
                for (task, tr) in tracks.iter().enumerate() {
                    out.put(st(task / batch, task % batch), pick(tr));
                }
            }
        }
        Ok(())
    }
}

/// Which final state of a recurrence an output takes.
type Pick = fn(&Track) -> &[f64];

/// An output tensor (f32 or f64) the recurrence writes f64 values into.
enum Sink<'a> {
    F32(&'a mut [f32]),
    F64(&'a mut [f64]),
}

impl<'a> Sink<'a> {
    /// Output `i`, zero-filled (states without an initial value start at zero).
    fn alloc(
        ctx: &'a KernelContext<'_>,
        i: usize,
        dtype: DType,
        shape: &[usize],
    ) -> Result<Self, PluginError> {
        Ok(match dtype {
            DType::F64 => {
                let s = ctx.output_slice::<f64>(i, shape)?;
                s.fill(0.0);
                Sink::F64(s)
            }
            _ => {
                let s = ctx.output_slice::<f32>(i, shape)?;
                s.fill(0.0);
                Sink::F32(s)
            }
        })
    }

    /// Writes `v` from element `at` on.
    fn put(&mut self, at: usize, v: &[f64]) {
        match self {
            Sink::F64(s) => s[at..at + v.len()].copy_from_slice(v),
            Sink::F32(s) => s[at..at + v.len()]
                .iter_mut()
                .zip(v)
                .for_each(|(o, &x)| *o = x as f32),
        }
    }
}

type Factory = fn(&NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError>;

fn register_op(
    r: &mut Registrar,
    op: &str,
    versions: &[i32],
    inputs: &[&str],
    outputs: &[&str],
    f: Factory,
) {
    for (i, &since) in versions.iter().enumerate() {
        let end = versions.get(i + 1).map_or(OPEN_END, |next| next - 1);
        let desc = KernelDesc::onnx(op, since, end)
            .constraint("T", &[DType::F32, DType::F64])
            .constraint("T1", &[DType::I32])
            .inputs(inputs)
            .outputs(outputs);
        r.kernel(desc, f);
    }
}

pub fn register(r: &mut Registrar) {
    // Before opset 7 the cells had an `output_sequence` attribute (Y is always produced
    // here when asked for); 14 added `layout`; 22 added bf16 (not accepted here).
    let common = ["T", "T", "T", "T", "T1", "T"];
    register_op(r, "RNN", &[1, 7, 14, 22], &common, &["T"], rnn_factory);
    register_op(r, "GRU", &[1, 3, 7, 14, 22], &common, &["T"], gru_factory);
    register_op(
        r,
        "LSTM",
        &[1, 7, 14, 22],
        &["T", "T", "T", "T", "T1", "T", "T", "T"],
        &["T"],
        lstm_factory,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use opreg_sdk::{
        host::HostTensor,
        testkit::{run_kernel_opt, NodeSpec},
    };

    #[test]
    fn official_cases() {
        crate::testcases::run_cases_min(&["test_rnn_", "test_simple_rnn_"], 6, rnn_factory);
        crate::testcases::run_cases_min(&["test_gru_"], 6, gru_factory);
        crate::testcases::run_cases_min(&["test_lstm_"], 6, lstm_factory);
    }

    fn t(shape: &[usize], v: &[f32]) -> HostTensor {
        HostTensor::from_vec(shape, v).expect("tensor")
    }

    /// One-unit RNN with Relu, identity weights: H accumulates the inputs.
    #[test]
    fn rnn_relu_sequence_lens_and_reverse() {
        let x = t(&[3, 2, 1], &[1.0, 1.0, 2.0, 2.0, 3.0, 3.0]);
        let w = t(&[1, 1, 1], &[1.0]);
        let r = t(&[1, 1, 1], &[1.0]);
        let lens = HostTensor::from_vec(&[2], &[3i32, 2]).expect("lens");
        for (dir, want_y) in [
            ("forward", vec![1.0, 1.0, 3.0, 3.0, 6.0, 0.0]),
            ("reverse", vec![6.0, 3.0, 5.0, 2.0, 3.0, 0.0]),
        ] {
            let node = NodeSpec::onnx("RNN", 14)
                .outputs(2)
                .attr("hidden_size", AttrValue::Int(1))
                .attr("direction", AttrValue::String(dir.into()))
                .attr("activations", AttrValue::Strings(vec!["Relu".into()]));
            let out = run_kernel_opt(
                rnn_factory,
                &node,
                &[Some(&x), Some(&w), Some(&r), None, Some(&lens)],
                None,
            )
            .expect("run");
            assert_eq!(out[0].shape(), &[3, 1, 2, 1]);
            assert_eq!(out[0].to_vec::<f32>().expect("y"), want_y, "{dir}");
            // Both directions end with the whole (or truncated) sum.
            assert_eq!(out[1].to_vec::<f32>().expect("h"), vec![6.0, 3.0], "{dir}");
        }
    }

    #[test]
    fn lstm_input_forget_and_clip() {
        // hidden 1, input 1: zero weights, so every gate sees only its bias.
        let x = t(&[1, 1, 1], &[0.0]);
        let w = t(&[1, 4, 1], &[0.0; 4]);
        let r = t(&[1, 4, 1], &[0.0; 4]);
        // Wb: i, o, f, c = 10 (clipped to 1), 0, -100, 10 (clipped to 1).
        let b = t(&[1, 8], &[10.0, 0.0, -100.0, 10.0, 0.0, 0.0, 0.0, 0.0]);
        let c0 = t(&[1, 1, 1], &[2.0]);
        let node = NodeSpec::onnx("LSTM", 14)
            .outputs(3)
            .attr("hidden_size", AttrValue::Int(1))
            .attr("clip", AttrValue::Float(1.0))
            .attr("input_forget", AttrValue::Int(1));
        let out = run_kernel_opt(
            lstm_factory,
            &node,
            &[
                Some(&x),
                Some(&w),
                Some(&r),
                Some(&b),
                None,
                None,
                Some(&c0),
            ],
            None,
        )
        .expect("run");
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        let i = sig(1.0);
        let c = (1.0 - i) * 2.0 + i * 1f64.tanh();
        let h = 0.5 * c.tanh();
        let got_c = out[2].to_vec::<f32>().expect("c")[0] as f64;
        let got_h = out[1].to_vec::<f32>().expect("h")[0] as f64;
        assert!((got_c - c).abs() < 1e-6, "{got_c} vs {c}");
        assert!((got_h - h).abs() < 1e-6, "{got_h} vs {h}");
    }

    /// X of shape [0, 2^40, 1]: no steps, a huge batch. Y is empty; asking for the final
    /// states (2^40 per direction) is refused as too large instead of aborting.
    #[test]
    fn zero_length_sequence_with_huge_batch() {
        let batch = 1usize << 40;
        let x = t(&[0, batch, 1], &[]);
        for (f, op, g) in [
            (rnn_factory as Factory, "RNN", 1),
            (gru_factory, "GRU", 3),
            (lstm_factory, "LSTM", 4),
        ] {
            let w = t(&[1, g, 1], &vec![0.5; g]);
            let r = t(&[1, g, 1], &vec![0.5; g]);
            let inputs = [Some(&x), Some(&w), Some(&r)];
            let out = run_kernel_opt(f, &NodeSpec::onnx(op, 14), &inputs, None).expect(op);
            assert_eq!(out[0].shape(), &[0, 1, batch, 1], "{op}");
            for n_out in [2, if op == "LSTM" { 3 } else { 2 }] {
                let err = run_kernel_opt(f, &NodeSpec::onnx(op, 14).outputs(n_out), &inputs, None)
                    .expect_err(op);
                assert_eq!(
                    err.code,
                    ErrorCode::ResourceExhausted,
                    "{op}: {}",
                    err.message
                );
            }
            // Layout 1 puts the batch first: [2^40, 0, 1].
            let x1 = t(&[batch, 0, 1], &[]);
            let node = NodeSpec::onnx(op, 14).attr("layout", AttrValue::Int(1));
            let out = run_kernel_opt(f, &node, &[Some(&x1), Some(&w), Some(&r)], None).expect(op);
            assert_eq!(out[0].shape(), &[batch, 0, 1, 1], "{op}");
        }
    }

    /// Without input features, X is empty however long the sequence and large the batch; the
    /// per-step outputs are refused as too large.
    #[test]
    fn no_input_features_with_huge_batch() {
        let x = t(&[4, 1 << 40, 0], &[]);
        let w = t(&[1, 1, 0], &[]);
        let r = t(&[1, 1, 1], &[0.5]);
        let err = run_kernel_opt(
            rnn_factory,
            &NodeSpec::onnx("RNN", 14),
            &[Some(&x), Some(&w), Some(&r)],
            None,
        )
        .expect_err("too large");
        assert_eq!(err.code, ErrorCode::ResourceExhausted, "{}", err.message);
    }

    /// A zero-length sequence gives back the initial states.
    #[test]
    fn zero_length_sequence_returns_initial_state() {
        let x = t(&[0, 2, 1], &[]);
        let w = t(&[1, 4, 1], &[0.5; 4]);
        let r = t(&[1, 4, 1], &[0.5; 4]);
        let h0 = t(&[1, 2, 1], &[1.5, -2.0]);
        let c0 = t(&[1, 2, 1], &[3.0, 4.0]);
        let out = run_kernel_opt(
            lstm_factory,
            &NodeSpec::onnx("LSTM", 14).outputs(3),
            &[
                Some(&x),
                Some(&w),
                Some(&r),
                None,
                None,
                Some(&h0),
                Some(&c0),
            ],
            None,
        )
        .expect("run");
        assert_eq!(out[0].shape(), &[0, 1, 2, 1]);
        assert_eq!(out[1].to_vec::<f32>().expect("h"), vec![1.5, -2.0]);
        assert_eq!(out[2].to_vec::<f32>().expect("c"), vec![3.0, 4.0]);
    }

    #[test]
    fn activations_consume_alpha_beta_in_order() {
        let names: Vec<String> = ["LeakyRelu", "Tanh", "HardSigmoid"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let acts = parse_acts("GRU", &names, &[0.1, 0.3], &[0.7]).expect("acts");
        assert_eq!(
            acts,
            vec![
                Act::LeakyRelu(0.1f32 as f64),
                Act::Tanh,
                Act::HardSigmoid(0.3f32 as f64, 0.7f32 as f64)
            ]
        );
        assert!(parse_acts("GRU", &["Bogus".to_string()], &[], &[]).is_err());
    }
}
