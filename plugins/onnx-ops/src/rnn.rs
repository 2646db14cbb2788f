//! Recurrent operators: RNN, GRU and LSTM (forward, reverse, bidirectional; `layout` 0 and 1;
//! per-batch `sequence_lens`; optional initial states and outputs). The directions are
//! independent recurrences, so they run in parallel; within one, the batch steps together.
//! Each type computes in itself, as the ONNX reference and ONNX Runtime do: the input
//! projection `W x` of every step at once (one gemm in the BLAS backend for f32), then per step
//! `R h` of every batch entry (one gemm for f32 batches) and the gates as vector passes over
//! the hidden units, the activations chosen once per pass so that each loop vectorizes.

use opreg_sdk::{
    alloc::{checked_numel, try_vec, try_with_capacity},
    prelude::*,
    PackedB,
};
use std::sync::{Arc, Mutex};

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
    /// A constant f32 W packed per direction at load as the right operand of the input
    /// projection `X W_d^T` (a CRNN's BiLSTM packed 2 x 2 MB of weights on every call).
    packed_w: Vec<Arc<PackedB>>,
    /// A constant f32 R packed per direction at load, the right operand of each step's `H
    /// R_d^T` over the batch.
    packed_r: Vec<Arc<PackedB>>,
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
        packed_w: pack_per_direction(node, 1, num_dir).unwrap_or_default(),
        packed_r: pack_per_direction(node, 2, num_dir).unwrap_or_default(),
    }))
}

/// W (input 1, `[num_dir, gates * hidden, input]`) or R (input 2, `[num_dir, gates * hidden,
/// hidden]`) packed per direction, when it is a constant f32 tensor of that rank and the
/// backend packs.
fn pack_per_direction(
    node: &NodeInfo<'_>,
    index: usize,
    num_dir: usize,
) -> Option<Vec<Arc<PackedB>>> {
    let w = node.inputs.get(index)?.constant?;
    let (&[nd, gh, input], DType::F32) = (w.shape(), w.dtype) else {
        return None;
    };
    let data = w.as_slice::<f32>().ok()?;
    if nd != num_dir || gh == 0 || input == 0 {
        return None;
    }
    data.chunks_exact(gh * input)
        .map(|wd| crate::nn::pack_constant_b(node, wd, input, gh, true))
        .collect()
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

fn input<'a>(inputs: &[TensorView<'a>], i: usize) -> Option<TensorView<'a>> {
    inputs.get(i).copied().filter(|t| !t.is_absent())
}

/// The element types the recurrences compute in (each in itself).
trait Elem:
    Element
    + Copy
    + PartialOrd
    + Send
    + Sync
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
{
    const ZERO: Self;
    const ONE: Self;
    fn of(v: f64) -> Self;
    /// `v[i] = act(v[i])`.
    fn activate(act: Act, v: &mut [Self]);
    /// `out[g] = sum_k m[g * cols + k] * v[k]` for `rows` rows (`cols = v.len()`).
    fn matvec(m: &[Self], v: &[Self], rows: usize, out: &mut [Self]);
    /// `out[b] = m v_b` for `batch` vectors `vs` (one after another, `cols` values each) and
    /// the `rows` rows of `m` (`rows x cols`): `out` is `batch x rows`. `packed`: `m` packed
    /// at load as a right operand (f32 only).
    #[allow(clippy::too_many_arguments)]
    fn matvecs(
        ctx: &KernelContext<'_>,
        op: &str,
        m: &[Self],
        vs: &[Self],
        batch: usize,
        rows: usize,
        out: &mut [Self],
        packed: Option<&PackedB>,
    ) -> Result<(), PluginError> {
        let _ = (ctx, op, packed);
        matvec_each(m, vs, batch, rows, out);
        Ok(())
    }
    /// `out = x w^T`: `x` is `n x k`, `w` is `m x k`, `out` is `n x m` (all row-major);
    /// `packed`: `w` packed at load (f32 only).
    #[allow(clippy::too_many_arguments)]
    fn project(
        ctx: &KernelContext<'_>,
        op: &str,
        x: &[Self],
        w: &[Self],
        n: usize,
        m: usize,
        out: &mut [Self],
        packed: Option<&PackedB>,
    ) -> Result<(), PluginError> {
        let _ = (ctx, op, packed);
        project_rows(x, w, n, m, out);
        Ok(())
    }
}

/// [`Elem::matvecs`] as one matrix-vector product per vector (no columns: `out` is zeros).
fn matvec_each<T: Elem>(m: &[T], vs: &[T], batch: usize, rows: usize, out: &mut [T]) {
    let cols = vs.len() / batch.max(1);
    if cols == 0 || rows == 0 {
        out.fill(T::ZERO);
        return;
    }
    for (v, o) in vs.chunks_exact(cols).zip(out.chunks_exact_mut(rows)) {
        T::matvec(m, v, rows, o);
    }
}

/// [`Elem::project`] as one matrix-vector product per row of `x` (no input features: `x` is
/// empty and `out` keeps its zeros).
fn project_rows<T: Elem>(x: &[T], w: &[T], n: usize, m: usize, out: &mut [T]) {
    let k = w.len() / m.max(1);
    if k == 0 {
        return;
    }
    for (xr, o) in x.chunks_exact(k).zip(out.chunks_exact_mut(m)).take(n) {
        T::matvec(w, xr, m, o);
    }
}

impl Elem for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    fn of(v: f64) -> f64 {
        v
    }
    fn activate(act: Act, v: &mut [f64]) {
        v.iter_mut().for_each(|x| *x = act.apply(*x));
    }
    fn matvec(m: &[f64], v: &[f64], rows: usize, out: &mut [f64]) {
        matvec64(m, v, rows, out)
    }
}

impl Elem for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
    fn of(v: f64) -> f32 {
        v as f32
    }
    fn activate(act: Act, v: &mut [f32]) {
        activate32(act, v)
    }
    fn matvec(m: &[f32], v: &[f32], rows: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx512()
            && rows.checked_mul(v.len()).is_some_and(|n| m.len() >= n)
            && out.len() >= rows
        {
            // SAFETY: the CPU has AVX-512 F (checked); `m` holds `rows` rows of `v.len()`.
            unsafe { matvec32_rows4(m, v, rows, out) };
            return;
        }
        matvec32(m, v, rows, out)
    }
    fn project(
        ctx: &KernelContext<'_>,
        op: &str,
        x: &[f32],
        w: &[f32],
        n: usize,
        m: usize,
        out: &mut [f32],
        packed: Option<&PackedB>,
    ) -> Result<(), PluginError> {
        if ctx.blas().is_none() {
            // No backend (a kernel run on its own): the per-row products.
            project_rows(x, w, n, m, out);
            return Ok(());
        }
        let k = w.len() / m.max(1);
        crate::nn::gemm_f32(ctx, op, false, true, n, m, k, 1.0, x, w, 0.0, out, packed)
    }
    fn matvecs(
        ctx: &KernelContext<'_>,
        op: &str,
        m: &[f32],
        vs: &[f32],
        batch: usize,
        rows: usize,
        out: &mut [f32],
        packed: Option<&PackedB>,
    ) -> Result<(), PluginError> {
        let cols = vs.len() / batch.max(1);
        if batch < 2 || ctx.blas().is_none() || cols == 0 || rows == 0 {
            // One vector (batch 1 keeps its matrix-vector loop), or no backend.
            matvec_each(m, vs, batch, rows, out);
            return Ok(());
        }
        // `vs m^T`: the batch as the rows of one product.
        crate::nn::gemm_f32(
            ctx, op, false, true, batch, rows, cols, 1.0, vs, m, 0.0, out, packed,
        )
    }
}

crate::simd::simd_fn! {
    /// `out[g] = sum_k m[g * cols + k] * v[k]` in f64, each dot product in 8 independent
    /// partial sums so that it vectorizes (a single running sum is one chain of dependent adds).
    fn matvec64(m: &[f64], v: &[f64], rows: usize, out: &mut [f64]) {
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

crate::simd::simd_fn! {
    /// [`matvec64`] in f32, 16 partial sums (one AVX-512 register).
    fn matvec32(m: &[f32], v: &[f32], rows: usize, out: &mut [f32]) {
        const LANES: usize = 16;
        let cols = v.len();
        for (g, o) in out[..rows].iter_mut().enumerate() {
            let row = &m[g * cols..(g + 1) * cols];
            let mut acc = [0.0f32; LANES];
            let (rc, rt) = row.split_at(cols - cols % LANES);
            let (vc, vt) = v.split_at(cols - cols % LANES);
            for (a, b) in rc.chunks_exact(LANES).zip(vc.chunks_exact(LANES)) {
                for l in 0..LANES {
                    acc[l] += a[l] * b[l];
                }
            }
            let tail: f32 = rt.iter().zip(vt).map(|(a, b)| a * b).sum();
            *o = acc.iter().sum::<f32>() + tail;
        }
    }
}

/// [`matvec32`] with AVX-512, four rows at a time: four independent chains of multiply-adds
/// over the row (one row at a time, each step of its single chain waits on the last; a
/// batch-1 LSTM step's `R h`, 1024 x 256, was half of a bidirectional 256-unit LSTM's time
/// at one thread).
///
/// # Safety
/// The CPU has AVX-512 F; `m` holds `rows` rows of `v.len()` values and `out` `rows` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn matvec32_rows4(m: &[f32], v: &[f32], rows: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let cols = v.len();
    let body = cols - cols % 16;
    let tail =
        |row: &[f32]| -> f32 { row[body..].iter().zip(&v[body..]).map(|(a, b)| a * b).sum() };
    let mut g = 0;
    while g + 4 <= rows {
        let p = m.as_ptr().add(g * cols);
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut c = 0;
        while c < body {
            let x = _mm512_loadu_ps(v.as_ptr().add(c));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(_mm512_loadu_ps(p.add(r * cols + c)), x, *a);
            }
            c += 16;
        }
        for (r, a) in acc.iter().enumerate() {
            let row = &m[(g + r) * cols..(g + r + 1) * cols];
            out[g + r] = _mm512_reduce_add_ps(*a) + tail(row);
        }
        g += 4;
    }
    if g < rows {
        matvec32(&m[g * cols..], v, rows - g, &mut out[g..]);
    }
}

crate::simd::simd_fn! {
    /// `v[i] = act(v[i])` in f32, the activation chosen outside the loop: the sigmoid and tanh
    /// of the gates through `exp32`-based polynomials, so that each loop vectorizes; the rarer
    /// activations through the f64 definitions.
    fn activate32(act: Act, v: &mut [f32]) {
        use opreg_sdk::numeric::{tanh32, Real};
        // Plain loops: a `for_each` may be compiled out of line, outside the instruction set
        // this function is compiled for (see blas-cpu's epilogue).
        macro_rules! each {
            (|$x:ident| $e:expr) => {
                for $x in v.iter_mut() {
                    *$x = $e;
                }
            };
        }
        match act {
            Act::Sigmoid => each!(|x| Real::sigmoid(*x)),
            Act::Tanh => each!(|x| tanh32(*x)),
            Act::Relu => each!(|x| x.max(0.0)),
            other => each!(|x| other.apply(f64::from(*x)) as f32),
        }
    }
}

/// What one (direction, batch) recurrence produced: its Y rows (`seq * hidden`, zero past its
/// length), final H and final C.
struct Track<T> {
    y: Vec<T>,
    h: Vec<T>,
    c: Vec<T>,
}

/// Which final state of a recurrence an output takes.
#[derive(Clone, Copy)]
enum Pick {
    H,
    C,
}

/// Per-direction parameters, borrowed from the inputs.
struct Params<'p, T> {
    r: &'p [T],
    /// `2 * gates * hidden` (Wb then Rb); zeros when B is absent.
    b: &'p [T],
    /// `3 * hidden` (i, o, f) for LSTM; zeros when P is absent.
    p: &'p [T],
    acts: &'p [Act],
}

impl Recurrent {
    /// `v = clip(v)` with the `clip` attribute.
    fn clip<T: Elem>(&self, v: &mut [T]) {
        if let Some(t) = self.clip {
            let (lo, hi) = (T::of(-t), T::of(t));
            // As f64::clamp: NaN stays NaN.
            for x in v {
                *x = if *x < lo {
                    lo
                } else if *x > hi {
                    hi
                } else {
                    *x
                };
            }
        }
    }

    /// Runs the recurrences of one direction for every batch entry together: `lens[b]` steps
    /// for entry `b`, in the direction given by `reverse`. `wx(t, b)` is entry `b`'s input
    /// projection `W x_t` (`gates * hidden` values); `h` and `c` hold every entry's initial
    /// state (`batch * hidden` each). Per step, `R h` of all entries is one product (one read
    /// of R for the batch: each entry on its own read R from L2 once per step, which made a
    /// CRNN's BiLSTMs at batch 8 twice ONNX Runtime's time), then each entry's gates.
    #[allow(clippy::too_many_arguments)]
    fn track<'w, T: Elem>(
        &self,
        ctx: &KernelContext<'_>,
        prm: &Params<'_, T>,
        packed_r: Option<&PackedB>,
        wx: impl Fn(usize, usize) -> &'w [T],
        seq: usize,
        lens: &[usize],
        reverse: bool,
        hidden: usize,
        (mut h, mut c): (Vec<T>, Vec<T>),
    ) -> Result<Vec<Track<T>>, PluginError> {
        let op = self.cell.name();
        let batch = lens.len();
        let g = self.cell.gates();
        let gh = g * hidden;
        // The rows of R each step multiplies by h: all, but GRU's candidate rows when they
        // multiply `r * h` (computed per entry below).
        let rows = if self.cell == Cell::Gru && !self.linear_before_reset {
            2 * hidden
        } else {
            gh
        };
        // `seq * hidden` is not bounded by X's size (X may have no input features).
        let mut ys = try_with_capacity(batch)?;
        for _ in 0..batch {
            ys.push(try_vec(checked_numel(&[seq, hidden])?, T::ZERO)?);
        }
        // The gates' pre-activations, then (in place) their values.
        let mut pre = try_vec(gh, T::ZERO)?;
        let mut rh = try_vec(checked_numel(&[batch, rows])?, T::ZERO)?;
        let mut tmp = try_vec(hidden, T::ZERO)?;
        let (wb, rb) = prm.b.split_at(gh);
        let steps = lens.iter().copied().max().unwrap_or(0);
        for step in 0..steps {
            T::matvecs(
                ctx,
                op,
                &prm.r[..rows * hidden],
                &h,
                batch,
                rows,
                &mut rh,
                packed_r.filter(|_| rows == gh),
            )?;
            for (b, &len) in lens.iter().enumerate() {
                if step >= len {
                    continue;
                }
                let t = if reverse { len - 1 - step } else { step };
                let wx = wx(t, b);
                let rh = &rh[b * rows..(b + 1) * rows];
                let h = &mut h[b * hidden..(b + 1) * hidden];
                let c = &mut c[b * hidden..(b + 1) * hidden];
                match self.cell {
                    Cell::Rnn => {
                        for j in 0..hidden {
                            h[j] = wx[j] + rh[j] + wb[j] + rb[j];
                        }
                        self.clip(h);
                        T::activate(prm.acts[0], h);
                    }
                    Cell::Gru => {
                        let (f, gact) = (prm.acts[0], prm.acts[1]);
                        // z and r from the first 2 * hidden rows of R h.
                        let h2 = 2 * hidden;
                        for k in 0..h2 {
                            pre[k] = wx[k] + rh[k] + wb[k] + rb[k];
                        }
                        self.clip(&mut pre[..h2]);
                        T::activate(f, &mut pre[..h2]);
                        let (zr, hh) = pre.split_at_mut(h2);
                        let (z, r) = zr.split_at(hidden);
                        let (wx, wb, rb) = (&wx[h2..], &wb[h2..], &rb[h2..]);
                        if self.linear_before_reset {
                            let rhh = &rh[h2..];
                            for j in 0..hidden {
                                hh[j] = wx[j] + r[j] * (rhh[j] + rb[j]) + wb[j];
                            }
                        } else {
                            let rh_rows = &prm.r[h2 * hidden..];
                            let rhp: Vec<T> =
                                r.iter().zip(h.iter()).map(|(&a, &b)| a * b).collect();
                            T::matvec(rh_rows, &rhp, hidden, &mut tmp);
                            for j in 0..hidden {
                                hh[j] = wx[j] + tmp[j] + rb[j] + wb[j];
                            }
                        }
                        self.clip(hh);
                        T::activate(gact, hh);
                        for j in 0..hidden {
                            h[j] = (T::ONE - z[j]) * hh[j] + z[j] * h[j];
                        }
                    }
                    Cell::Lstm => {
                        let (f, gact, hact) = (prm.acts[0], prm.acts[1], prm.acts[2]);
                        for k in 0..gh {
                            pre[k] = wx[k] + rh[k] + wb[k] + rb[k];
                        }
                        // Gates i, o, f, c; peepholes i and f read the old cell state.
                        let (pi, po, pf) = (
                            &prm.p[..hidden],
                            &prm.p[hidden..2 * hidden],
                            &prm.p[2 * hidden..],
                        );
                        let (i, rest) = pre.split_at_mut(hidden);
                        let (o, rest) = rest.split_at_mut(hidden);
                        let (fg, cc) = rest.split_at_mut(hidden);
                        for j in 0..hidden {
                            i[j] = i[j] + pi[j] * c[j];
                        }
                        self.clip(i);
                        T::activate(f, i);
                        if self.input_forget {
                            for j in 0..hidden {
                                fg[j] = T::ONE - i[j];
                            }
                        } else {
                            for j in 0..hidden {
                                fg[j] = fg[j] + pf[j] * c[j];
                            }
                            self.clip(fg);
                            T::activate(f, fg);
                        }
                        self.clip(cc);
                        T::activate(gact, cc);
                        for j in 0..hidden {
                            c[j] = fg[j] * c[j] + i[j] * cc[j];
                            o[j] = o[j] + po[j] * c[j];
                        }
                        self.clip(o);
                        T::activate(f, o);
                        tmp.copy_from_slice(c);
                        T::activate(hact, &mut tmp);
                        for j in 0..hidden {
                            h[j] = o[j] * tmp[j];
                        }
                    }
                }
                ys[b][t * hidden..(t + 1) * hidden].copy_from_slice(h);
            }
        }
        Ok(ys
            .into_iter()
            .enumerate()
            .map(|(b, y)| Track {
                y,
                h: h[b * hidden..(b + 1) * hidden].to_vec(),
                c: c[b * hidden..(b + 1) * hidden].to_vec(),
            })
            .collect())
    }

    fn run<T: Elem>(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let op = self.cell.name();
        let [x, w, r] = crate::util::required(op, inputs, ["X", "W", "R"])?;
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
            if t.shape() != want {
                return Err(PluginError::invalid(format!(
                    "{op}: input '{name}' has shape {:?}, expected {want:?}",
                    t.shape()
                )));
            }
            if t.dtype != x.dtype {
                return Err(PluginError::invalid(format!(
                    "{op}: input '{name}' is {} but X is {}",
                    t.dtype, x.dtype
                )));
            }
            Ok(())
        };
        expect("W", &w, &[num_dir, gh, input_size])?;
        expect("R", &r, &[num_dir, gh, hidden])?;
        let (xv, wv, rv) = (x.as_slice::<T>()?, w.as_slice::<T>()?, r.as_slice::<T>()?);
        let zeros_b;
        let bv = match input(inputs, 3) {
            Some(b) => {
                expect("B", &b, &[num_dir, 2 * gh])?;
                b.as_slice::<T>()?
            }
            None => {
                zeros_b = try_vec(bias_len, T::ZERO)?;
                &zeros_b[..]
            }
        };
        // Per-batch lengths; `None` (every batch runs `seq` steps) needs no batch-sized vector.
        let lens: Option<Vec<usize>> = match input(inputs, 4) {
            Some(s) => {
                if s.shape() != [batch] {
                    return Err(PluginError::invalid(format!(
                        "{op}: input 'sequence_lens' has shape {:?}, expected [{batch}]",
                        s.shape()
                    )));
                }
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
        let read_state = |i: usize, name: &str| -> Result<Option<&[T]>, PluginError> {
            match input(inputs, i) {
                Some(t) => {
                    expect(name, &t, &state_shape)?;
                    Ok(Some(t.as_slice::<T>()?))
                }
                None => Ok(None),
            }
        };
        let h0 = read_state(5, "initial_h")?;
        let zeros_p;
        let (c0, pv) = if self.cell == Cell::Lstm {
            let c0 = read_state(6, "initial_c")?;
            let pv = match input(inputs, 7) {
                Some(p) => {
                    expect("P", &p, &[num_dir, 3 * hidden])?;
                    p.as_slice::<T>()?
                }
                None => {
                    zeros_p = try_vec(peephole_len, T::ZERO)?;
                    &zeros_p[..]
                }
            };
            (c0, pv)
        } else {
            zeros_p = try_vec(peephole_len, T::ZERO)?;
            (None, &zeros_p[..])
        };
        // Outputs first, so that the host refuses sizes past its limit before any per-batch
        // work or state exists. Zero-filled: steps past a batch's length and states without
        // an initial value are zeros.
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
        let alloc = |i: usize, shape: &[usize]| -> Result<&mut [T], PluginError> {
            let s = ctx.output_slice::<T>(i, shape)?;
            s.fill(T::ZERO);
            Ok(s)
        };
        let mut y_out = (n_out > 0).then(|| alloc(0, &y_shape)).transpose()?;
        let mut h_out = (n_out > 1).then(|| alloc(1, &state_shape)).transpose()?;
        let mut c_out = (n_out > 2).then(|| alloc(2, &state_shape)).transpose()?;
        if seq == 0 {
            // No steps: Y is empty and the final states are the initial ones (zeros when
            // absent). Nothing per batch is allocated, however large the batch.
            for (out, init) in [(&mut h_out, h0), (&mut c_out, c0)] {
                if let (Some(out), Some(init)) = (out, init) {
                    out.copy_from_slice(init);
                }
            }
            return Ok(());
        }
        // Every step's input projection, per direction: X (all `seq * batch` rows, in X's
        // order) times W_d^T, one product instead of a matrix-vector product per step.
        let rows = checked_numel(&[seq, batch])?;
        let mut proj = try_vec(checked_numel(&[num_dir, rows, gh])?, T::ZERO)?;
        for (d, pd) in proj.chunks_exact_mut(rows * gh).enumerate() {
            let wd = &wv[d * gh * input_size..(d + 1) * gh * input_size];
            let packed = self.packed_w.get(d).map(|p| &**p);
            T::project(ctx, op, xv, wd, rows, gh, pd, packed)?;
        }
        let row_of = |t: usize, b: usize| {
            if self.layout == 0 {
                t * batch + b
            } else {
                b * seq + t
            }
        };
        let per_dir = self.cell.default_acts().len();
        // One task per direction, each running its batch together (see `track`).
        let mut slots = try_with_capacity(num_dir)?;
        slots.resize_with(num_dir, || None);
        let results: Mutex<Vec<Option<Vec<Track<T>>>>> = Mutex::new(slots);
        let all_lens = match lens {
            Some(l) => l,
            None => try_vec(batch, seq)?,
        };
        ctx.parallel_for(num_dir, 1, |range| {
            for d in range {
                let prm = Params {
                    r: &rv[d * gh * hidden..(d + 1) * gh * hidden],
                    b: &bv[d * 2 * gh..(d + 1) * 2 * gh],
                    p: &pv[d * 3 * hidden..(d + 1) * 3 * hidden],
                    acts: &self.acts[d * per_dir..(d + 1) * per_dir],
                };
                let reverse = self.direction == Direction::Reverse || d == 1;
                let pd = &proj[d * rows * gh..(d + 1) * rows * gh];
                let wx = |t: usize, b: usize| &pd[row_of(t, b) * gh..(row_of(t, b) + 1) * gh];
                let state0 = |v: Option<&[T]>| -> Result<Vec<T>, PluginError> {
                    let mut out = try_vec(checked_numel(&[batch, hidden])?, T::ZERO)?;
                    if let Some(v) = v {
                        for (b, o) in out.chunks_exact_mut(hidden.max(1)).enumerate() {
                            let s = st(d, b);
                            o.copy_from_slice(&v[s..s + hidden]);
                        }
                    }
                    Ok(out)
                };
                let state = (state0(h0)?, state0(c0)?);
                let packed_r = self.packed_r.get(d).map(|p| &**p);
                let tr = self.track(
                    ctx, &prm, packed_r, wx, seq, &all_lens, reverse, hidden, state,
                )?;
                results
                    .lock()
                    .map_err(|_| PluginError::internal(format!("{op}: result slots poisoned")))?
                    [d] = Some(tr);
            }
            Ok(())
        })?;
        let results = results
            .into_inner()
            .map_err(|_| PluginError::internal(format!("{op}: result slots poisoned")))?;
        // In (direction, batch) order.
        let mut tracks: Vec<Track<T>> = try_with_capacity(checked_numel(&[num_dir, batch])?)?;
        for r in results {
            tracks.extend(
                r.ok_or_else(|| PluginError::internal(format!("{op}: a recurrence did not run")))?,
            );
        }
        if let Some(y) = &mut y_out {
            for (task, tr) in tracks.iter().enumerate() {
                let (d, b) = (task / batch, task % batch);
                for t in 0..seq {
                    let o = if self.layout == 0 {
                        ((t * num_dir + d) * batch + b) * hidden
                    } else {
                        ((b * seq + t) * num_dir + d) * hidden
                    };
                    y[o..o + hidden].copy_from_slice(&tr.y[t * hidden..(t + 1) * hidden]);
                }
            }
        }
        for (out, pick) in [(&mut h_out, Pick::H), (&mut c_out, Pick::C)] {
            if let Some(out) = out {
                for (task, tr) in tracks.iter().enumerate() {
                    let s = st(task / batch, task % batch);
                    let v = match pick {
                        Pick::H => &tr.h,
                        Pick::C => &tr.c,
                    };
                    out[s..s + hidden].copy_from_slice(v);
                }
            }
        }
        Ok(())
    }
}

impl Kernel for Recurrent {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let op = self.cell.name();
        let [x] = crate::util::required(op, inputs, ["X"])?;
        match x.dtype {
            DType::F32 => self.run::<f32>(ctx, inputs),
            DType::F64 => self.run::<f64>(ctx, inputs),
            other => Err(PluginError::unimplemented(format!(
                "{op}: input 'X' of type {other} is not supported (f32, f64)"
            ))),
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
    use crate::nn::testblas::NaiveBlas;
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
    /// The f32 matrix-vector product (four rows at a time with AVX-512, the rest and other
    /// CPUs row by row) against an f64 reference, for row counts and widths that leave
    /// remainders of both.
    #[test]
    fn matvec_matches_the_f64_products_for_every_shape() {
        for rows in [1usize, 3, 4, 5, 17, 1024] {
            for cols in [1usize, 15, 16, 17, 256] {
                let m: Vec<f32> = (0..rows * cols)
                    .map(|i| ((i * 31 % 97) as f32 - 48.0) / 50.0)
                    .collect();
                let v: Vec<f32> = (0..cols)
                    .map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0)
                    .collect();
                let mut out = vec![f32::NAN; rows];
                <f32 as Elem>::matvec(&m, &v, rows, &mut out);
                for (g, o) in out.iter().enumerate() {
                    let want: f64 = m[g * cols..(g + 1) * cols]
                        .iter()
                        .zip(&v)
                        .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        .sum();
                    let tol = 1e-5 * (1.0 + want.abs()) * (cols as f64).sqrt();
                    assert!(
                        (f64::from(*o) - want).abs() <= tol,
                        "{rows}x{cols} row {g}: {o} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_batch_stepped_together_equals_each_entry_alone() {
        // Bidirectional, three entries of lengths 5, 2 and 0, initial states, biases and
        // peepholes: with a backend, each step multiplies R by the whole batch (a gemm);
        // without one, entry by entry (matrix-vector products). Both equal the per-entry
        // runs of a batch of one.
        let (seq, batch, input, hidden) = (5usize, 3usize, 4usize, 6usize);
        let vals = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| (((i * 37 + seed * 11) % 23) as f32 - 11.0) / 17.0)
                .collect()
        };
        let lens = HostTensor::from_vec(&[batch], &[5i32, 2, 0]).expect("lens");
        for (op, g) in [("LSTM", 4), ("GRU", 3), ("RNN", 1)] {
            let gh = g * hidden;
            let x = t(&[seq, batch, input], &vals(seq * batch * input, 1));
            let w = t(&[2, gh, input], &vals(2 * gh * input, 2));
            let r = t(&[2, gh, hidden], &vals(2 * gh * hidden, 3));
            let b = t(&[2, 2 * gh], &vals(4 * gh, 4));
            let h0 = t(&[2, batch, hidden], &vals(2 * batch * hidden, 5));
            let c0 = t(&[2, batch, hidden], &vals(2 * batch * hidden, 6));
            let p = t(&[2, 3 * hidden], &vals(6 * hidden, 7));
            let factory = match op {
                "LSTM" => lstm_factory,
                "GRU" => gru_factory,
                _ => rnn_factory,
            };
            for linear_before_reset in [false, true] {
                if op != "GRU" && linear_before_reset {
                    continue;
                }
                let outs = if op == "LSTM" { 3 } else { 2 };
                let node = NodeSpec::onnx(op, 14)
                    .outputs(outs)
                    .attr("hidden_size", AttrValue::Int(hidden as i64))
                    .attr("direction", AttrValue::String("bidirectional".into()))
                    .attr(
                        "linear_before_reset",
                        AttrValue::Int(linear_before_reset as i64),
                    );
                let mut ins = vec![
                    Some(&x),
                    Some(&w),
                    Some(&r),
                    Some(&b),
                    Some(&lens),
                    Some(&h0),
                ];
                if op == "LSTM" {
                    ins.extend([Some(&c0), Some(&p)]);
                }
                let with_blas = run_kernel_opt(factory, &node, &ins, Some(Box::new(NaiveBlas)))
                    .expect("with a backend");
                let without = run_kernel_opt(factory, &node, &ins, None).expect("without");
                for (o, (a, e)) in with_blas.iter().zip(&without).enumerate() {
                    let (a, e) = (a.to_vec::<f32>().unwrap(), e.to_vec::<f32>().unwrap());
                    crate::util::testing::assert_close(&a, &e, 1e-5);
                    assert!(a.iter().any(|&v| v != 0.0), "{op} output {o} is all zeros");
                }
                // Entry 1 alone (a batch of one, length 2) gives the batch's entry 1.
                let one = |tensor: &HostTensor, dims: &[usize], axis: usize| -> HostTensor {
                    let v = tensor.to_vec::<f32>().unwrap();
                    let shape = tensor.shape();
                    let inner: usize = shape[axis + 1..].iter().product();
                    let outer: usize = shape[..axis].iter().product();
                    let mut out = Vec::new();
                    for o in 0..outer {
                        let at = (o * shape[axis] + 1) * inner;
                        out.extend_from_slice(&v[at..at + inner]);
                    }
                    t(dims, &out)
                };
                let x1 = one(&x, &[seq, 1, input], 1);
                let (h1, c1) = (one(&h0, &[2, 1, hidden], 1), one(&c0, &[2, 1, hidden], 1));
                let len1 = HostTensor::from_vec(&[1], &[2i32]).expect("len");
                let mut ins1 = vec![
                    Some(&x1),
                    Some(&w),
                    Some(&r),
                    Some(&b),
                    Some(&len1),
                    Some(&h1),
                ];
                if op == "LSTM" {
                    ins1.extend([Some(&c1), Some(&p)]);
                }
                let alone = run_kernel_opt(factory, &node, &ins1, Some(Box::new(NaiveBlas)))
                    .expect("alone");
                let y_all = with_blas[0].to_vec::<f32>().unwrap();
                let y_one = alone[0].to_vec::<f32>().unwrap();
                // Y is [seq, 2, batch, hidden]: entry 1 of every (step, direction).
                let picked: Vec<f32> = (0..seq * 2)
                    .flat_map(|sd| {
                        y_all[(sd * batch + 1) * hidden..(sd * batch + 2) * hidden].to_vec()
                    })
                    .collect();
                crate::util::testing::assert_close(&picked, &y_one, 1e-5);
            }
        }
    }

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
