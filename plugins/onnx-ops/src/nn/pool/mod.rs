//! Pooling: MaxPool (with Indices), AveragePool, LpPool, GlobalAveragePool, GlobalMaxPool.

mod nhwc;
mod separable;
mod stride2;

use super::{
    not_implemented_for, register_versions, Arith, Disjoint, Geometry, Real, Scalar, WindowAttrs,
    FLOATS,
};
use crate::util::{input, product_sat, row_major_strides, TaskScratch};
use opreg_sdk::half::{bf16, f16};
use opreg_sdk::{
    alloc::{checked_numel, try_with_capacity},
    prelude::*,
};
use separable::{avg_plane_separable, max_plane_rows, max_plane_separable, Separable};

#[cfg(test)]
thread_local! {
    /// Set by tests to run the AVX fast loops ([`stride2`], [`nhwc`]) where the CPU also has
    /// AVX-512.
    pub(super) static TEST_AVX: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The vector loops this CPU runs for the pools' fast paths: AVX-512 (`Some(true)`), AVX
/// (`Some(false)`), or none.
fn fast_loops() -> Option<bool> {
    #[cfg(target_arch = "x86_64")]
    {
        #[cfg(test)]
        if TEST_AVX.get() && std::arch::is_x86_feature_detected!("avx") {
            return Some(false);
        }
        if crate::simd::has_avx512() {
            return Some(true);
        }
        if std::arch::is_x86_feature_detected!("avx") {
            return Some(false);
        }
    }
    None
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Max,
    Avg { count_include_pad: bool },
    Lp(f64),
}

#[derive(Clone)]
struct Pool {
    op: &'static str,
    kind: Kind,
    window: WindowAttrs,
    storage_order: bool,
}

fn window(node: &NodeInfo<'_>) -> Result<WindowAttrs, PluginError> {
    let w = WindowAttrs::from_node(node)?;
    if w.kernel_shape.is_none() {
        return Err(PluginError::invalid(format!(
            "{}: attribute 'kernel_shape' is required",
            node.op_type
        )));
    }
    Ok(w)
}

pub(in crate::nn) fn max_pool_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Pool {
        op: "MaxPool",
        kind: Kind::Max,
        window: window(node)?,
        storage_order: node.int_or("storage_order", 0)? != 0,
    }))
}

fn avg_pool_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Pool {
        op: "AveragePool",
        kind: Kind::Avg {
            count_include_pad: node.int_or("count_include_pad", 0)? != 0,
        },
        window: window(node)?,
        storage_order: false,
    }))
}

/// `p` is a FLOAT in LpPool-1 and an INT later.
fn lp_norm(node: &NodeInfo<'_>) -> Result<f64, PluginError> {
    let p = match node.attr("p") {
        None => 2.0,
        Some(AttrValue::Int(p)) => *p as f64,
        Some(AttrValue::Float(p)) => *p as f64,
        Some(other) => {
            return Err(PluginError::invalid(format!(
                "{}: attribute 'p' must be INT, got {other:?}",
                node.op_type
            )))
        }
    };
    if p <= 0.0 {
        return Err(PluginError::invalid(format!(
            "{}: attribute 'p' must be positive, got {p}",
            node.op_type
        )));
    }
    Ok(p)
}

fn lp_pool_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Pool {
        op: "LpPool",
        kind: Kind::Lp(lp_norm(node)?),
        window: window(node)?,
        storage_order: false,
    }))
}

/// The in-range taps of one spatial dimension, as offsets into the input plane, for every
/// output position; and how many taps fall inside the padded extent.
struct Taps {
    /// All positions' taps, back to back.
    flat: Vec<usize>,
    /// `flat[start[o]..start[o + 1]]` are position `o`'s taps.
    start: Vec<usize>,
    padded: Vec<usize>,
}

impl Taps {
    /// The taps of spatial dimension `d`. Pads, kernel and output extents come from the
    /// model and can make this table far larger than X or Y, so it is counted first and then
    /// allocated in one fallible piece. Each position's taps are a range of kernel indices,
    /// worked out arithmetically: walking every kernel tap would take as long as the kernel
    /// extent (an attribute, up to 2^63) per output position.
    fn new(
        g: &Geometry,
        spatial: &[usize],
        in_stride: usize,
        d: usize,
    ) -> Result<Self, PluginError> {
        let (out, extent) = (g.out[d], spatial[d] as i128);
        let pb = g.pad_begin[d] as i128;
        let pe = g.pad_end[d] as i128;
        let (st, dil, kernel) = (
            g.strides[d] as i128,
            g.dilations[d] as i128,
            g.kernel[d] as i128,
        );
        // Kernel indices k of output position `o` whose input position
        // `o * st + k * dil - pb` lies in `[lo, hi)`, as the range `k0..k1` (empty when
        // `k1 <= k0`). In i128: the attributes are arbitrary (resolve bounds them by isize).
        let taps = |o: usize, lo: i128, hi: i128| {
            let base = o as i128 * st - pb;
            let k0 = (lo - base + dil - 1).div_euclid(dil).max(0);
            let k1 = ((hi - base - 1).div_euclid(dil) + 1).min(kernel);
            (k0, k1.max(k0))
        };
        let mut start = try_with_capacity(out + 1)?;
        let mut padded = try_with_capacity(out)?;
        start.push(0usize);
        for o in 0..out {
            let (k0, k1) = taps(o, 0, extent);
            let (p0, p1) = taps(o, -pb, extent + pe);
            // At most `extent` taps are inside (distinct positions), at most the kernel
            // extent inside the padding: both fit a usize.
            let next = start[o].checked_add((k1 - k0) as usize).ok_or_else(|| {
                PluginError::new(
                    ErrorCode::ResourceExhausted,
                    "pooling window table overflows",
                )
            })?;
            start.push(next);
            padded.push((p1 - p0) as usize);
        }
        let mut flat = try_with_capacity(start[out])?;
        for o in 0..out {
            let (k0, k1) = taps(o, 0, extent);
            let base = o as i128 * st - pb;
            flat.extend((k0..k1).map(|k| (base + k * dil) as usize * in_stride));
        }
        Ok(Taps {
            flat,
            start,
            padded,
        })
    }

    fn of(&self, o: usize) -> &[usize] {
        &self.flat[self.start[o]..self.start[o + 1]]
    }
}

/// Calls `f` with the sum of one entry of each list, for every combination.
fn for_each_tap(lists: &[&[usize]], f: &mut impl FnMut(usize)) {
    match lists {
        [a] => a.iter().for_each(|&a| f(a)),
        [a, b] => {
            for &a in *a {
                for &b in *b {
                    f(a + b);
                }
            }
        }
        [a, b, c] => {
            for &a in *a {
                for &b in *b {
                    for &c in *c {
                        f(a + b + c);
                    }
                }
            }
        }
        _ => for_each_tap_dyn(lists, f),
    }
}

/// [`for_each_tap`] for rank 4 and above.
fn for_each_tap_dyn(lists: &[&[usize]], f: &mut dyn FnMut(usize)) {
    match lists {
        [] => f(0),
        [first, rest @ ..] => {
            for &a in *first {
                for_each_tap_dyn(rest, &mut |o| f(a + o));
            }
        }
    }
}

impl Pool {
    fn run<T: PoolElem>(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let xv = input(self.op, inputs, 0, "X")?;
        let xs = xv.shape();
        if xs.len() < 3 {
            return Err(PluginError::invalid(format!(
                "{}: X must have rank >= 3 (N, C, spatial...), got {xs:?}",
                self.op
            )));
        }
        let g = self.window.resolve(self.op, &xs[2..], None)?;
        let mut out_shape = xs[..2].to_vec();
        out_shape.extend_from_slice(&g.out);
        let x = xv.as_slice::<T>()?;
        // The outputs before anything sized by the geometry: the host refuses outputs past
        // its limit. Not zeroed: every path below writes every output element (and every
        // index) of every plane, windows wholly in the padding included.
        let y = ctx.output_slice_to_overwrite::<T>(0, &out_shape)?;
        let want_indices = self.kind == Kind::Max && ctx.num_outputs() > 1;
        let indices = if want_indices {
            Some(ctx.output_slice_to_overwrite::<i64>(1, &out_shape)?)
        } else {
            None
        };
        self.pool(ctx, (x, xs), &g, y, indices)
    }

    /// The pool of `x` (shape `xs`, `N x C x spatial`) in geometry `g` into `y` (and the
    /// indices, for a MaxPool asked for them).
    fn pool<T: PoolElem>(
        &self,
        ctx: &KernelContext<'_>,
        (x, xs): (&[T], &[usize]),
        g: &Geometry,
        y: &mut [T],
        indices: Option<&mut [i64]>,
    ) -> Result<(), PluginError> {
        let spatial = xs.get(2..).unwrap_or(&[]);
        let s = spatial.len();
        let want_indices = indices.is_some();
        let mut no_indices: [i64; 0] = [];
        let indices = indices.unwrap_or(&mut no_indices[..]);
        if y.is_empty() {
            return Ok(());
        }
        // Non-empty y: N and C are not zero, so X's plane is its size over N * C (zero when a
        // spatial extent is); the output's extents multiply without overflow.
        let in_plane = product_sat(spatial);
        let out_plane: usize = g.out.iter().product();
        let in_strides = row_major_strides(spatial);
        // Per dimension and output position: the in-range taps (as offsets) and the number
        // of taps inside the padded extent.
        let taps = (0..s)
            .map(|d| Taps::new(g, spatial, in_strides[d], d))
            .collect::<Result<Vec<_>, _>>()?;
        let indices = Disjoint::new(indices);
        // Column-major strides of the spatial dims, for storage_order = 1.
        let mut col_strides = vec![1usize; s];
        for d in 1..s {
            col_strides[d] = col_strides[d - 1].saturating_mul(spatial[d - 1]);
        }
        let grain = (4096 / out_plane.max(1)).max(1) * out_plane;
        // The separable MaxPool's row maxima (input rows x output columns) and one output
        // row's accumulator; `None` when they cannot be had (then the direct loop runs).
        let separable = s == 2
            && !want_indices
            && matches!(self.kind, Kind::Max | Kind::Avg { .. })
            && spatial[1] > 0;
        let h_len = if separable {
            spatial[0]
                .checked_mul(g.out[1])
                .and_then(|n| n.checked_mul(2))
        } else {
            None
        };
        let hbufs = TaskScratch::<T::C>::new(ctx, h_len.unwrap_or(0));
        // A window one column wide over every column as it is: rows only (see
        // `max_plane_rows`).
        let rows_only = separable
            && g.kernel[1] == 1
            && g.strides[1] == 1
            && g.pad_begin[1] == 0
            && g.out[1] == spatial[1];
        // A 2-D window's separable geometry (its column stepping when constant and its
        // interior columns worked out once, not per plane).
        let geometry = match (taps.as_slice(), spatial) {
            ([rows_of, cols_of], &[_, w_in]) => {
                let fast = (g.dilations[1] == 1).then(|| (g.kernel[1], g.strides[1]));
                Some(Separable {
                    w_in,
                    rows_of,
                    cols_of,
                    out_w: g.out[1],
                    fast,
                    interior: separable::interior(cols_of, g.out[1], fast),
                })
            }
            _ => None,
        };
        ctx.parallel_chunks(y, grain, |start, chunk| {
            // Reused scratch (the row pass writes all of it before the column pass reads):
            // no zeroed allocation per task; taken when a plane first needs it.
            let mut hbuf = None;
            let mut acc = Vec::new();
            let mut oid = vec![0usize; s];
            let mut lists: Vec<&[usize]> = Vec::with_capacity(s);
            for (pi, yp) in chunk.chunks_mut(out_plane).enumerate() {
                let plane = start / out_plane + pi;
                let xp = &x[plane * in_plane..(plane + 1) * in_plane];
                let mut ip = if want_indices {
                    // SAFETY: each plane's indices are written by this task only.
                    Some(unsafe { indices.part(plane * out_plane, out_plane) })
                } else {
                    None
                };
                // 2-D max without indices: the element type's own kernel, else separable
                // when its row buffer could be had (else the general walk below).
                if let (Some(geometry), None, Kind::Max) = (&geometry, &ip, self.kind) {
                    if T::max_plane_own(xp, geometry, yp) {
                        continue;
                    }
                    if rows_only {
                        max_plane_rows::<T>(xp, &taps[0], g.out[1], &mut acc, yp);
                        continue;
                    }
                    if hbuf.is_none() {
                        hbuf = h_len.and_then(|_| hbufs.take().ok());
                    }
                    if let Some(h) = hbuf.as_deref_mut() {
                        max_plane_separable::<T>(xp, geometry, h, &mut acc, yp);
                        continue;
                    }
                }
                if let (Some(geometry), None, Kind::Avg { count_include_pad }) =
                    (&geometry, &ip, self.kind)
                {
                    // Separable when its row sums' scratch could be had.
                    if hbuf.is_none() {
                        hbuf = h_len.and_then(|_| hbufs.take().ok());
                    }
                    if let Some(h) = hbuf.as_deref_mut() {
                        avg_plane_separable::<T>(xp, geometry, count_include_pad, h, &mut acc, yp);
                        continue;
                    }
                    // Else a plain loop over the window's rows and columns (the general walk
                    // below costs ~3x more per tap).
                    let (rows_of, cols_of) = (&taps[0], &taps[1]);
                    for (oh, yrow) in yp.chunks_mut(g.out[1]).enumerate() {
                        let rows = rows_of.of(oh);
                        for (ow, yv) in yrow.iter_mut().enumerate() {
                            let cols = cols_of.of(ow);
                            let mut sum = <T::C as Arith>::ZERO;
                            for &r in rows {
                                for &c in cols {
                                    sum += xp[r + c].load();
                                }
                            }
                            let n = if count_include_pad {
                                rows_of.padded[oh] * cols_of.padded[ow]
                            } else {
                                rows.len() * cols.len()
                            };
                            *yv = T::store(sum / <T::C as Real>::from_usize(n.max(1)));
                        }
                    }
                    continue;
                }
                oid.fill(0);
                for (i, yv) in yp.iter_mut().enumerate() {
                    lists.clear();
                    lists.extend((0..s).map(|d| taps[d].of(oid[d])));
                    match self.kind {
                        Kind::Max => {
                            let mut best = <T::C as Real>::NEG_INFINITY;
                            let mut at = usize::MAX;
                            for_each_tap(&lists, &mut |o| {
                                let v = xp[o].load();
                                if v > best || at == usize::MAX {
                                    best = v;
                                    at = o;
                                }
                            });
                            *yv = T::store(best);
                            if let Some(ip) = ip.as_deref_mut() {
                                let off = if at == usize::MAX { 0 } else { at };
                                let sp = if self.storage_order {
                                    (0..s)
                                        .map(|d| {
                                            // max(1): X may be empty (all taps padding).
                                            (off / in_strides[d].max(1)) % spatial[d].max(1)
                                                * col_strides[d]
                                        })
                                        .sum()
                                } else {
                                    off
                                };
                                ip[i] = (plane * in_plane + sp) as i64;
                            }
                        }
                        Kind::Avg { count_include_pad } => {
                            let mut sum = <T::C as Arith>::ZERO;
                            let mut n = 0usize;
                            for_each_tap(&lists, &mut |o| {
                                sum += xp[o].load();
                                n += 1;
                            });
                            if count_include_pad {
                                n = (0..s).map(|d| taps[d].padded[oid[d]]).product();
                            }
                            *yv = T::store(sum / <T::C as Real>::from_usize(n.max(1)));
                        }
                        Kind::Lp(p) => {
                            let pc = <T::C as Scalar>::from_f64(p);
                            let mut sum = <T::C as Arith>::ZERO;
                            for_each_tap(&lists, &mut |o| {
                                sum += xp[o].load().abs().powf(pc);
                            });
                            *yv = T::store(sum.powf(<T::C as Arith>::ONE / pc));
                        }
                    }
                    for d in (0..s).rev() {
                        oid[d] += 1;
                        if oid[d] < g.out[d] {
                            break;
                        }
                        oid[d] = 0;
                    }
                }
            }
        })
    }
}

/// MaxPool of f32 `x` (shape `xs`, `N x C x spatial`) in geometry `g` into `y`, without
/// indices: what `opreg::FusedConvMaxPool` runs over a convolution it computed whole.
pub(in crate::nn) fn max_pool_f32(
    ctx: &KernelContext<'_>,
    (x, xs): (&[f32], &[usize]),
    g: &Geometry,
    y: &mut [f32],
) -> Result<(), PluginError> {
    let pool = Pool {
        op: "MaxPool",
        kind: Kind::Max,
        // Only `g` is used: the window is resolved already.
        window: WindowAttrs {
            kernel_shape: None,
            strides: None,
            dilations: None,
            pads: None,
            auto_pad: super::AutoPad::NotSet,
            ceil_mode: false,
        },
        storage_order: false,
    };
    pool.pool(ctx, (x, xs), g, y, None)
}

/// A 2-D f32 MaxPool computed a band of output rows at a time, from a plane of which only
/// the input rows those windows read need hold values: `opreg::FusedConvMaxPool` pools the
/// rows of its convolution while they are in cache (see `conv::stem`).
pub(in crate::nn) struct MaxRows {
    rows_of: Taps,
    cols_of: Taps,
    w_in: usize,
    out_w: usize,
    fast: Option<(usize, usize)>,
    interior: Option<(usize, usize, usize)>,
}

impl MaxRows {
    /// The pool of geometry `g` (2-D) over planes of `h x w`.
    pub(in crate::nn) fn new(g: &Geometry, (h, w): (usize, usize)) -> Result<Self, PluginError> {
        let (Some(&out_w), Some(&dilation), Some(&kw), Some(&sw)) = (
            g.out.get(1),
            g.dilations.get(1),
            g.kernel.get(1),
            g.strides.get(1),
        ) else {
            return Err(PluginError::internal("MaxRows: the window is not 2-D"));
        };
        let spatial = [h, w];
        let cols_of = Taps::new(g, &spatial, 1, 1)?;
        let fast = (dilation == 1).then_some((kw, sw));
        Ok(MaxRows {
            rows_of: Taps::new(g, &spatial, w, 0)?,
            interior: separable::interior(&cols_of, out_w, fast),
            cols_of,
            w_in: w,
            out_w,
            fast,
        })
    }

    fn geometry(&self) -> Separable<'_> {
        Separable {
            w_in: self.w_in,
            rows_of: &self.rows_of,
            cols_of: &self.cols_of,
            out_w: self.out_w,
            fast: self.fast,
            interior: self.interior,
        }
    }

    /// Whether [`rows`](Self::rows) computes this pool on this CPU (windows stepping 2
    /// columns over 2 or 3, AVX-512 or AVX: [`stride2`]).
    pub(in crate::nn) fn in_bands(&self) -> bool {
        stride2::takes(&self.geometry())
    }

    /// The input rows that output rows `rows` read (empty where every window lies in the
    /// padding).
    pub(in crate::nn) fn input_rows(&self, rows: std::ops::Range<usize>) -> std::ops::Range<usize> {
        let w = self.w_in.max(1);
        let read = rows.flat_map(|o| self.rows_of.of(o).iter().map(|&off| off / w));
        let (lo, hi) = read.fold((usize::MAX, 0), |(lo, hi), r| (lo.min(r), hi.max(r + 1)));
        lo.min(hi)..hi
    }

    /// Output rows from `first` into `out` (whole rows of the output's width) from the plane
    /// `xp`, of which only [`input_rows`](Self::input_rows) are read; `false` (nothing
    /// written) where not [`in_bands`](Self::in_bands).
    pub(in crate::nn) fn rows(&self, xp: &[f32], first: usize, out: &mut [f32]) -> bool {
        stride2::max_rows_stride2_f32(xp, &self.geometry(), first, out)
    }
}

impl Kernel for Pool {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let dtype = input(self.op, inputs, 0, "X")?.dtype;
        match (self.kind, dtype) {
            // MaxPool takes 8-bit integers from opset 12.
            (Kind::Max, DType::U8) => self.run::<u8>(ctx, inputs),
            (Kind::Max, DType::I8) => self.run::<i8>(ctx, inputs),
            _ => {
                opreg_sdk::dispatch!(dtype, FLOATS, |T| self.run::<T>(ctx, inputs), other => Err(not_implemented_for(self.op, other)))
            }
        }
    }
}

/// An element the pools read and write through a float compute type: the floats, in their
/// SDK compute type, and (MaxPool from opset 12) 8-bit integers compared in f32, exact for
/// every value. Local because only the pools compute integers in a float.
trait PoolElem: Element + Default {
    type C: Real;
    fn load(self) -> Self::C;
    fn store(v: Self::C) -> Self;
    /// A 2-D MaxPool plane without indices in a kernel of this type's own, where it has one
    /// for this window; `false` when it has none (nothing written).
    #[inline(always)]
    fn max_plane_own(xp: &[Self], geometry: &Separable<'_>, yp: &mut [Self]) -> bool {
        let _ = (xp, geometry, yp);
        false
    }
}

/// The floats, in their SDK compute type.
macro_rules! float_elem {
    ($($t:ty),*) => {$(
        impl PoolElem for $t {
            type C = <$t as Scalar>::Compute;
            #[inline(always)]
            fn load(self) -> Self::C {
                Scalar::load(self)
            }
            #[inline(always)]
            fn store(v: Self::C) -> Self {
                Scalar::store(v)
            }
        }
    )*};
}
float_elem!(f16, bf16, f64);

impl PoolElem for f32 {
    type C = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn store(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn max_plane_own(xp: &[f32], geometry: &Separable<'_>, yp: &mut [f32]) -> bool {
        stride2::max_plane_stride2_f32(xp, geometry, yp)
    }
}

/// 8-bit integers for MaxPool, compared in f32 (exact for every value).
macro_rules! int8_float {
    ($($t:ty),*) => {$(
        impl PoolElem for $t {
            type C = f32;
            #[inline(always)]
            fn load(self) -> f32 {
                self as f32
            }
            #[inline(always)]
            fn store(v: f32) -> Self {
                v as $t
            }
        }
    )*};
}
int8_float!(u8, i8);

#[derive(Clone)]
struct GlobalPool {
    op: &'static str,
    max: bool,
}

impl GlobalPool {
    fn run<T: PoolElem>(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let xv = input(self.op, inputs, 0, "X")?;
        let xs = xv.shape();
        if xs.len() < 2 {
            return Err(PluginError::invalid(format!(
                "{}: X must have rank >= 2, got {xs:?}",
                self.op
            )));
        }
        let x = xv.as_slice::<T>()?;
        let mut out_shape = xs[..2].to_vec();
        out_shape.resize(xs.len(), 1);
        let plane = product_sat(&xs[2..]);
        let y = ctx.output_slice_to_overwrite::<T>(0, &out_shape)?;
        let grain = (16 * 1024 / plane.max(1)).max(1);
        ctx.parallel_chunks(y, grain, |start, chunk| {
            for (i, yv) in chunk.iter_mut().enumerate() {
                let p = &x[(start + i) * plane..(start + i + 1) * plane];
                *yv = T::store(if self.max {
                    p.iter().fold(<T::C as Real>::NEG_INFINITY, |m, v| {
                        let v = v.load();
                        if v > m {
                            v
                        } else {
                            m
                        }
                    })
                } else {
                    // In 8 partial sums: one running sum is a chain of dependent adds (4
                    // cycles each), which kept EfficientNet's 17 squeeze-excite pools at 7 %
                    // of the model.
                    let zero = <T::C as Arith>::ZERO;
                    let mut acc = [zero; 8];
                    let mut runs = p.chunks_exact(8);
                    for run in &mut runs {
                        for (a, v) in acc.iter_mut().zip(run) {
                            *a += v.load();
                        }
                    }
                    let tail = runs.remainder().iter().fold(zero, |s, v| s + v.load());
                    let sum = acc.iter().fold(zero, |s, &a| s + a) + tail;
                    sum / <T::C as Real>::from_usize(plane)
                });
            }
        })
    }
}

impl Kernel for GlobalPool {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let dtype = input(self.op, inputs, 0, "X")?.dtype;
        opreg_sdk::dispatch!(dtype, FLOATS, |T| self.run::<T>(ctx, inputs), other => Err(not_implemented_for(self.op, other)))
    }
}

fn global_avg_factory(_: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(GlobalPool {
        op: "GlobalAveragePool",
        max: false,
    }))
}

/// `opreg::GlobalAveragePoolNhwc`: GlobalAveragePool of a channels-last f32 X (`[N, H, W,
/// C]`, written by the graph pass `nhwc-conv` where a network's last convolution feeds its
/// pool) into the pool's own `[N, C, 1, 1]`. Each channel's sum is taken in the order
/// [`GlobalPool`] takes it over a plane (8 running sums over the pixels by their index mod 8,
/// the pixels past the last whole 8 after; the same bits), the channels in the lanes.
struct GlobalAverageNhwc;

impl Kernel for GlobalAverageNhwc {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        const OP: &str = "GlobalAveragePoolNhwc";
        let xv = input(OP, inputs, 0, "X")?;
        let &[n, h, w, c] = xv.shape() else {
            return Err(PluginError::invalid(format!(
                "{OP}: X must be [N, H, W, C], got {:?}",
                xv.shape()
            )));
        };
        let x = xv.as_slice::<f32>()?;
        let y = ctx.output_slice_to_overwrite::<f32>(0, &[n, c, 1, 1])?;
        let plane = h.saturating_mul(w);
        let image = plane.saturating_mul(c);
        if y.is_empty() {
            return Ok(());
        }
        if x.len() < n.saturating_mul(image) {
            return Err(PluginError::internal(format!(
                "{OP}: X is shorter than its shape"
            )));
        }
        // Tasks of one image's block of channels (each channel's sum is its own, so any split
        // gives the same bits): one thread summing a batch of 8 SqueezeNet 13x13x1000 maps
        // took 0.12-0.22 ms, ONNX Runtime 0.07.
        let block = CHANNEL_BLOCK.min(c).max(1);
        let blocks = c.div_ceil(block);
        let tasks = n.saturating_mul(blocks);
        let sums = TaskScratch::<f32>::new(ctx, checked_numel(&[9, block])?);
        let yd = Disjoint::new(y);
        let whole = plane / 8 * 8;
        let count = plane as f32;
        ctx.parallel_for(tasks, 1, |range| {
            let mut sums = sums.take()?;
            for t in range {
                let (b, c0) = (t / blocks, t % blocks * block);
                let cn = block.min(c - c0);
                // acc[j * cn + ch]: channel c0 + ch's sum over the pixels p = j (mod 8)
                // before `whole`; then, past it, the tail's sum.
                let (acc, tail) = sums[..9 * cn].split_at_mut(8 * cn);
                acc.fill(0.0);
                tail.fill(0.0);
                let xb = &x[b * image..(b + 1) * image];
                for (p, px) in xb.chunks_exact(c).enumerate() {
                    let into = if p < whole {
                        &mut acc[(p % 8) * cn..(p % 8 + 1) * cn]
                    } else {
                        &mut tail[..]
                    };
                    for (a, v) in into.iter_mut().zip(&px[c0..c0 + cn]) {
                        *a += v;
                    }
                }
                // SAFETY: each (image, block) writes its own channels of y.
                let yb = unsafe { yd.part(b * c + c0, cn) };
                for (ch, out) in yb.iter_mut().enumerate() {
                    let sum = (0..8).fold(0.0f32, |s, j| s + acc[j * cn + ch]) + tail[ch];
                    *out = sum / count;
                }
            }
            Ok(())
        })
    }
}

/// Channels per task of [`GlobalAverageNhwc`].
const CHANNEL_BLOCK: usize = 256;

fn global_avg_nhwc_factory(_: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(GlobalAverageNhwc))
}

fn global_max_factory(_: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(GlobalPool {
        op: "GlobalMaxPool",
        max: true,
    }))
}

pub fn register(r: &mut Registrar) {
    nhwc::register(r);
    let t: &[(&str, &[DType])] = &[("T", FLOATS)];
    // MaxPool: int8 and uint8 from opset 12.
    let with_int8: Vec<DType> = FLOATS
        .iter()
        .copied()
        .chain([DType::I8, DType::U8])
        .collect();
    for (since, end, types) in [
        (1, 7, FLOATS),
        (8, 9, FLOATS),
        (10, 10, FLOATS),
        (11, 11, FLOATS),
        (12, 21, &with_int8[..]),
        (22, OPEN_END, &with_int8[..]),
    ] {
        r.kernel(
            KernelDesc::onnx("MaxPool", since, end)
                .constraint("T", types)
                .constraint("I", &[DType::I64])
                .inputs(&["T"])
                .outputs(&["T", "I"]),
            max_pool_factory,
        );
    }
    register_versions(
        r,
        "AveragePool",
        &[1, 7, 10, 11, 19, 22],
        t,
        &["T"],
        &["T"],
        avg_pool_factory,
    );
    register_versions(
        r,
        "LpPool",
        &[1, 2, 11, 18, 22],
        t,
        &["T"],
        &["T"],
        lp_pool_factory,
    );
    register_versions(
        r,
        "GlobalAveragePool",
        &[1, 22],
        t,
        &["T"],
        &["T"],
        global_avg_factory,
    );
    r.kernel(
        KernelDesc::new("opreg", "GlobalAveragePoolNhwc", 1, OPEN_END)
            .constraint("T", &[DType::F32])
            .inputs(&["T"])
            .outputs(&["T"]),
        global_avg_nhwc_factory,
    );
    register_versions(
        r,
        "GlobalMaxPool",
        &[1, 22],
        t,
        &["T"],
        &["T"],
        global_max_factory,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use opreg_sdk::{
        host::HostTensor,
        testkit::{run_kernel, NodeSpec},
    };

    fn ints(v: &[usize]) -> AttrValue {
        AttrValue::Ints(v.iter().map(|&x| x as i64).collect())
    }

    fn data(len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 29 % 31) as f32 - 15.0) / 4.0)
            .collect()
    }

    /// Naive 2-D pooling over explicit geometry: (values, argmax flat indices).
    #[allow(clippy::too_many_arguments)]
    fn naive_pool2(
        x: &[f32],
        [n, c, h, w]: [usize; 4],
        k: [usize; 2],
        st: [usize; 2],
        dil: [usize; 2],
        pads: [usize; 4],
        out: [usize; 2],
        kind: Kind,
    ) -> (Vec<f32>, Vec<i64>) {
        let mut y = Vec::new();
        let mut idx = Vec::new();
        for b in 0..n * c {
            for oy in 0..out[0] {
                for ox in 0..out[1] {
                    let (mut best, mut at, mut sum, mut cnt, mut cnt_pad) =
                        (f32::NEG_INFINITY, 0usize, 0.0f32, 0usize, 0usize);
                    for ky in 0..k[0] {
                        for kx in 0..k[1] {
                            let py = (oy * st[0] + ky * dil[0]) as isize - pads[0] as isize;
                            let px = (ox * st[1] + kx * dil[1]) as isize - pads[1] as isize;
                            if py >= -(pads[0] as isize)
                                && py < (h + pads[2]) as isize
                                && px >= -(pads[1] as isize)
                                && px < (w + pads[3]) as isize
                            {
                                cnt_pad += 1;
                            }
                            if py < 0 || px < 0 || py >= h as isize || px >= w as isize {
                                continue;
                            }
                            let i = b * h * w + py as usize * w + px as usize;
                            let v = x[i];
                            if v > best {
                                best = v;
                                at = i;
                            }
                            sum += match kind {
                                Kind::Lp(p) => v.abs().powf(p as f32),
                                _ => v,
                            };
                            cnt += 1;
                        }
                    }
                    y.push(match kind {
                        Kind::Max => best,
                        Kind::Avg { count_include_pad } => {
                            sum / if count_include_pad { cnt_pad } else { cnt } as f32
                        }
                        Kind::Lp(p) => sum.powf(1.0 / p as f32),
                    });
                    idx.push(at as i64);
                }
            }
        }
        (y, idx)
    }

    fn close(a: &[f32], b: &[f32]) {
        crate::util::testing::assert_close(a, b, 1e-5);
    }

    /// A 2-D pool case: kernel, strides, dilations, pads, ceil mode, the expected output's
    /// extents.
    type PoolCase = (
        [usize; 2],
        [usize; 2],
        [usize; 2],
        [usize; 4],
        bool,
        [usize; 2],
    );

    /// Every pool against direct loops, on small planes and on rows wider than a vector
    /// (the separable AveragePool's stride-1 windows of width 2 and 3 as shifted runs, with
    /// pads on either side and ceil mode; strided and dilated windows tap by tap).
    #[test]
    fn pools_match_naive_loops() {
        let small: ([usize; 4], Vec<PoolCase>) = (
            [2, 3, 7, 8],
            vec![
                ([3, 3], [1, 1], [1, 1], [1, 1, 1, 1], false, [7, 8]),
                ([2, 3], [2, 2], [1, 1], [0, 1, 1, 0], false, [4, 4]),
                ([2, 2], [2, 3], [1, 1], [0, 0, 0, 0], true, [4, 3]),
                ([3, 2], [2, 1], [2, 2], [1, 0, 2, 1], true, [4, 7]),
            ],
        );
        let wide: ([usize; 4], Vec<PoolCase>) = (
            [1, 2, 9, 40],
            vec![
                ([3, 3], [1, 1], [1, 1], [1, 1, 1, 1], false, [9, 40]),
                ([2, 2], [1, 1], [1, 1], [0, 1, 1, 0], false, [9, 40]),
                ([3, 3], [1, 1], [1, 1], [0, 2, 0, 0], true, [7, 40]),
                ([3, 3], [2, 2], [1, 1], [1, 1, 1, 1], true, [5, 21]),
                ([2, 3], [1, 1], [2, 2], [1, 2, 0, 1], false, [8, 39]),
            ],
        );
        for (xs, cases) in [small, wide] {
            let x = data(xs.iter().product());
            let tx = HostTensor::from_vec(&xs, &x).expect("x");
            pools_match_naive_loops_on(xs, &x, &tx, cases);
        }
    }

    fn pools_match_naive_loops_on(
        xs: [usize; 4],
        x: &[f32],
        tx: &HostTensor,
        cases: Vec<PoolCase>,
    ) {
        for (k, st, dil, pads, ceil, out) in cases {
            for (factory, kind, name) in [
                (
                    max_pool_factory as super::super::Factory,
                    Kind::Max,
                    "MaxPool",
                ),
                (
                    avg_pool_factory,
                    Kind::Avg {
                        count_include_pad: false,
                    },
                    "AveragePool",
                ),
                (
                    avg_pool_factory,
                    Kind::Avg {
                        count_include_pad: true,
                    },
                    "AveragePool",
                ),
                (lp_pool_factory, Kind::Lp(3.0), "LpPool"),
            ] {
                let mut node = NodeSpec::onnx(name, 19)
                    .attr("kernel_shape", ints(&k))
                    .attr("strides", ints(&st))
                    .attr("dilations", ints(&dil))
                    .attr("pads", ints(&pads))
                    .attr("ceil_mode", AttrValue::Int(ceil as i64));
                if let Kind::Avg { count_include_pad } = kind {
                    node = node.attr(
                        "count_include_pad",
                        AttrValue::Int(count_include_pad as i64),
                    );
                }
                if let Kind::Lp(p) = kind {
                    node = node.attr("p", AttrValue::Int(p as i64));
                }
                if kind == Kind::Max {
                    node = node.outputs(2);
                }
                let got = run_kernel(factory, &node, &[tx], None).expect("run");
                let (want, idx) = naive_pool2(x, xs, k, st, dil, pads, out, kind);
                assert_eq!(
                    got[0].shape(),
                    &[xs[0], xs[1], out[0], out[1]],
                    "{name} {k:?}"
                );
                close(&got[0].to_vec::<f32>().expect("f32"), &want);
                if kind == Kind::Max {
                    assert_eq!(got[1].to_vec::<i64>().expect("i64"), idx);
                }
            }
        }
    }

    /// The separable 2-D MaxPool (one output; f32 windows of stride 2 and width 2 or 3 run
    /// `stride2`'s kernels on AVX-512 and AVX) against the direct loop (asked for indices too),
    /// bit for bit, NaN included, but for the sign of a zero maximum (a window whose largest
    /// taps are 0.0 and -0.0 in different rows may give either: `stride2` folds down the rows
    /// before across the columns): a kernel width and stride of each specialized loop and
    /// others, dilated columns, pads on either side, ceil mode, rows wider than a vector.
    #[test]
    fn separable_max_pool_matches_the_direct_loop_with_nan() {
        // Widths with no full block of 16 row outputs, exactly 16 (a window ending on the
        // row's last column), a block and a tail, several blocks; NaN, -0.0 beside 0.0 and
        // -∞ spread over them.
        // Each with the best stride-2 loop and, where the CPU has AVX-512, the AVX one too.
        let runs = 1 + usize::from(crate::simd::has_avx512());
        for (w, avx) in [9usize, 33, 41, 70]
            .into_iter()
            .flat_map(|w| [(w, false), (w, true)].into_iter().take(runs))
        {
            TEST_AVX.set(avx);
            let xs = [1usize, 2, 9, w];
            let mut x = data(xs.iter().product());
            for i in (0..x.len()).step_by(13) {
                x[i] = f32::NAN;
            }
            for i in (5..x.len()).step_by(11) {
                x[i] = -0.0;
                x[i - 1] = 0.0;
            }
            for i in (3..x.len()).step_by(17) {
                x[i] = f32::NEG_INFINITY;
            }
            separable_matches_direct(&xs, &x);
        }
        TEST_AVX.set(false);
    }

    fn separable_matches_direct(xs: &[usize], x: &[f32]) {
        let tx = HostTensor::from_vec(xs, x).expect("x");
        // (kernel, strides, dilations, pads, ceil_mode)
        let cases = [
            (
                [3usize, 3],
                [2usize, 2],
                [1usize, 1],
                [1usize, 1, 1, 1],
                false,
            ),
            ([3, 3], [2, 2], [1, 1], [0, 0, 0, 0], true),
            ([2, 2], [2, 2], [1, 1], [0, 0, 0, 0], false),
            ([3, 3], [1, 1], [1, 1], [1, 1, 1, 1], false),
            ([2, 2], [2, 1], [1, 1], [0, 0, 1, 1], true),
            ([2, 4], [1, 3], [1, 1], [1, 2, 0, 3], true),
            ([3, 2], [2, 2], [1, 2], [1, 1, 0, 0], false),
            ([1, 1], [1, 1], [1, 1], [0, 0, 0, 0], false),
            // Down the columns only (a text recognizer's 2 x 1 pools; rows only, read in
            // place), with row pads and ceil mode, with a row dilation.
            ([2, 1], [2, 1], [1, 1], [0, 0, 0, 0], false),
            ([3, 1], [2, 1], [1, 1], [1, 0, 1, 0], true),
            ([2, 1], [1, 1], [2, 1], [0, 0, 1, 0], false),
        ];
        for (k, st, dil, pads, ceil) in cases {
            let node = NodeSpec::onnx("MaxPool", 19)
                .attr("kernel_shape", ints(&k))
                .attr("strides", ints(&st))
                .attr("dilations", ints(&dil))
                .attr("pads", ints(&pads))
                .attr("ceil_mode", AttrValue::Int(ceil as i64));
            let direct = run_kernel(max_pool_factory, &node.clone().outputs(2), &[&tx], None)
                .expect("direct");
            let separable = run_kernel(max_pool_factory, &node, &[&tx], None).expect("run");
            assert_eq!(separable[0].shape(), direct[0].shape(), "{k:?} {st:?}");
            let zero_signless = |t: &HostTensor| -> Vec<u32> {
                f32_bits(t)
                    .into_iter()
                    .map(|b| if b == (-0.0f32).to_bits() { 0 } else { b })
                    .collect()
            };
            assert_eq!(
                zero_signless(&separable[0]),
                zero_signless(&direct[0]),
                "{k:?} {st:?} {pads:?} {xs:?}"
            );
            assert!(
                separable[0]
                    .to_vec::<f32>()
                    .expect("f32")
                    .iter()
                    .any(|v| v.is_nan()),
                "a window starting on a NaN keeps it"
            );
        }
    }

    /// The rows-only MaxPool (one column wide over every column) under hostile windows: row
    /// pads of 2^40 refused as too large, a row stride of 2^40 (one output row, its window's
    /// first rows), and a window wholly in the top padding (-inf, as the direct loop).
    #[test]
    fn rows_only_max_pool_survives_hostile_windows() {
        let node = |pads: [i64; 4], strides: [i64; 2], k: [i64; 2]| {
            NodeSpec::onnx("MaxPool", 19)
                .attr("kernel_shape", AttrValue::Ints(k.to_vec()))
                .attr("strides", AttrValue::Ints(strides.to_vec()))
                .attr("pads", AttrValue::Ints(pads.to_vec()))
        };
        let xs = [1usize, 2, 5, 3];
        let x = data(xs.iter().product());
        let tx = HostTensor::from_vec(&xs, &x).expect("x");
        let e = run_kernel(
            max_pool_factory,
            &node([1 << 40, 0, 1 << 40, 0], [1, 1], [2, 1]),
            &[&tx],
            None,
        )
        .expect_err("huge row pads");
        assert_eq!(e.code, ErrorCode::ResourceExhausted, "{}", e.message);
        let y = run_kernel(
            max_pool_factory,
            &node([0; 4], [1 << 40, 1], [2, 1]),
            &[&tx],
            None,
        )
        .expect("huge row stride");
        assert_eq!(y[0].shape(), &[1, 2, 1, 3]);
        let want: Vec<f32> = (0..2)
            .flat_map(|c| {
                let x = &x;
                (0..3).map(move |j| x[c * 15 + j].max(x[c * 15 + 3 + j]))
            })
            .collect();
        assert_eq!(y[0].to_vec::<f32>().expect("f32"), want);
        let padded = node([1, 0, 0, 0], [1, 1], [1, 1]);
        let got = run_kernel(max_pool_factory, &padded, &[&tx], None).expect("padded");
        let direct =
            run_kernel(max_pool_factory, &padded.clone().outputs(2), &[&tx], None).expect("direct");
        assert_eq!(f32_bits(&got[0]), f32_bits(&direct[0]));
        assert_eq!(got[0].to_vec::<f32>().expect("f32")[0], f32::NEG_INFINITY);
    }

    #[test]
    fn max_pool_indices_column_major_and_same_pad() {
        let x: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let tx = HostTensor::from_vec(&[1, 1, 3, 4], &x).expect("x");
        let node = NodeSpec::onnx("MaxPool", 12)
            .attr("kernel_shape", ints(&[2, 2]))
            .attr("storage_order", AttrValue::Int(1))
            .outputs(2);
        let got = run_kernel(max_pool_factory, &node, &[&tx], None).expect("run");
        assert_eq!(
            got[0].to_vec::<f32>().expect("y"),
            vec![5., 6., 7., 9., 10., 11.]
        );
        // Row-major 5 = (1, 1) -> column-major 1 + 1 * 3 = 4.
        assert_eq!(got[1].to_vec::<i64>().expect("i"), vec![4, 7, 10, 5, 8, 11]);
        // SAME_UPPER, stride 2: out ceil(3/2) x ceil(4/2) = 2 x 2, pad end only.
        let node = NodeSpec::onnx("MaxPool", 12)
            .attr("kernel_shape", ints(&[2, 2]))
            .attr("strides", ints(&[2, 2]))
            .attr("auto_pad", AttrValue::String("SAME_UPPER".into()));
        let got = run_kernel(max_pool_factory, &node, &[&tx], None).expect("run");
        assert_eq!(got[0].shape(), &[1, 1, 2, 2]);
        assert_eq!(got[0].to_vec::<f32>().expect("y"), vec![5., 7., 9., 11.]);
        // SAME_LOWER pads the beginning: windows end at rows 0, 2 and columns 1, 3.
        let node = NodeSpec::onnx("AveragePool", 11)
            .attr("kernel_shape", ints(&[2, 2]))
            .attr("strides", ints(&[2, 2]))
            .attr("auto_pad", AttrValue::String("SAME_LOWER".into()));
        let got = run_kernel(avg_pool_factory, &node, &[&tx], None).expect("run");
        assert_eq!(got[0].to_vec::<f32>().expect("y"), vec![0.5, 2.5, 6.5, 8.5]);
    }

    #[test]
    fn pool_1d_3d_and_f64() {
        let x: Vec<f64> = (0..10).map(|i| (i as f64 - 4.0).powi(2)).collect();
        let tx = HostTensor::from_vec(&[1, 1, 10], &x).expect("x");
        let node = NodeSpec::onnx("MaxPool", 12)
            .attr("kernel_shape", ints(&[3]))
            .attr("strides", ints(&[3]));
        let got = run_kernel(max_pool_factory, &node, &[&tx], None).expect("run");
        assert_eq!(got[0].to_vec::<f64>().expect("y"), vec![16.0, 1.0, 16.0]);
        let x: Vec<f32> = (0..27).map(|i| i as f32).collect();
        let tx = HostTensor::from_vec(&[1, 1, 3, 3, 3], &x).expect("x");
        let node = NodeSpec::onnx("AveragePool", 19)
            .attr("kernel_shape", ints(&[2, 2, 2]))
            .attr("strides", ints(&[1, 1, 1]));
        let got = run_kernel(avg_pool_factory, &node, &[&tx], None).expect("run");
        assert_eq!(got[0].shape(), &[1, 1, 2, 2, 2]);
        // Mean of a 2x2x2 cube starting at (a,b,c) = start + (9 + 3 + 1) / 2.
        let want: Vec<f32> = [0., 1., 3., 4., 9., 10., 12., 13.]
            .iter()
            .map(|s| s + 6.5)
            .collect();
        close(&got[0].to_vec::<f32>().expect("y"), &want);
    }

    /// The bits of an f32 tensor's values (NaN payloads and signed zeros compared exactly).
    fn f32_bits(t: &HostTensor) -> Vec<u32> {
        t.to_vec::<f32>()
            .expect("f32")
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    /// The channels-last average equals the NCHW one bit for bit (pixels past a whole 8, two
    /// images, uneven values); a rank other than 4 is refused.
    #[test]
    fn channels_last_global_average_equals_the_nchw_one() {
        // 21 channels (one task per image), 300 (a block of 256 and a part: the tasks split
        // each image's channels), with planes of 21 pixels (a tail past 8 x 2) and of 3.
        let spec = NodeSpec::onnx("GlobalAveragePoolNhwc", 1).domain("opreg");
        let nchw_average = |x: &HostTensor| {
            let node = NodeSpec::onnx("GlobalAveragePool", 1);
            run_kernel(global_avg_factory, &node, &[x], None)
                .expect("nchw")
                .remove(0)
        };
        for (n, c, h, w) in [(2usize, 21usize, 3usize, 7usize), (3, 300, 1, 3)] {
            let x: Vec<f32> = (0..n * c * h * w)
                .map(|i| ((i * 7919) % 1013) as f32 * 0.37 - 90.0)
                .collect();
            let want = nchw_average(&HostTensor::from_vec(&[n, c, h, w], &x).expect("x"));
            let mut turned = vec![0f32; x.len()];
            for b in 0..n {
                for ch in 0..c {
                    for p in 0..h * w {
                        turned[(b * h * w + p) * c + ch] = x[(b * c + ch) * h * w + p];
                    }
                }
            }
            let nhwc = HostTensor::from_vec(&[n, h, w, c], &turned).expect("x");
            let got = run_kernel(global_avg_nhwc_factory, &spec, &[&nhwc], None)
                .expect("nhwc")
                .remove(0);
            assert_eq!(got.shape(), want.shape());
            assert_eq!(f32_bits(&got), f32_bits(&want), "{n}x{c}x{h}x{w}");
        }
        let (n, c) = (2, 21);
        let x = vec![0f32; n * c];
        let flat = HostTensor::from_vec(&[n, c], &x).expect("x");
        let e = run_kernel(global_avg_nhwc_factory, &spec, &[&flat], None).expect_err("rank 2");
        assert!(e.to_string().contains("[N, H, W, C]"), "{e}");
        // An empty plane (a zero height beside a width of 2^40): no data to read, the same
        // bits as the NCHW pool (0 / 0) for every channel of every image.
        let huge = 1usize << 40;
        let empty = HostTensor::from_vec(&[3, 0, huge, 5], &[] as &[f32]).expect("x");
        let got = run_kernel(global_avg_nhwc_factory, &spec, &[&empty], None).expect("empty");
        let want = nchw_average(&HostTensor::from_vec(&[3, 5, 0, huge], &[] as &[f32]).expect("x"));
        assert_eq!(got[0].shape(), &[3, 5, 1, 1]);
        assert_eq!(f32_bits(&got[0]), f32_bits(&want));
    }

    #[test]
    fn global_pools() {
        let x: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let tx = HostTensor::from_vec(&[1, 3, 2, 2], &x).expect("x");
        let got = run_kernel(
            global_avg_factory,
            &NodeSpec::onnx("GlobalAveragePool", 1),
            &[&tx],
            None,
        )
        .expect("run");
        assert_eq!(got[0].shape(), &[1, 3, 1, 1]);
        assert_eq!(got[0].to_vec::<f32>().expect("y"), vec![1.5, 5.5, 9.5]);
        let got = run_kernel(
            global_max_factory,
            &NodeSpec::onnx("GlobalMaxPool", 1),
            &[&tx],
            None,
        )
        .expect("run");
        assert_eq!(got[0].to_vec::<f32>().expect("y"), vec![3.0, 7.0, 11.0]);
        let xh: Vec<opreg_sdk::half::f16> = x
            .iter()
            .map(|&v| opreg_sdk::half::f16::from_f32(v))
            .collect();
        let tx = HostTensor::from_vec(&[1, 3, 2, 2], &xh).expect("x");
        let got = run_kernel(
            global_avg_factory,
            &NodeSpec::onnx("GlobalAveragePool", 1),
            &[&tx],
            None,
        )
        .expect("run");
        let y: Vec<f32> = got[0]
            .to_vec::<opreg_sdk::half::f16>()
            .expect("y")
            .iter()
            .map(|v| v.to_f32())
            .collect();
        assert_eq!(y, vec![1.5, 5.5, 9.5]);
        // Planes of 7 x 9 (whole runs of partial sums and a tail) against an f64 mean.
        let x: Vec<f32> = (0..2 * 63)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let tx = HostTensor::from_vec(&[1, 2, 7, 9], &x).expect("x");
        let got = run_kernel(
            global_avg_factory,
            &NodeSpec::onnx("GlobalAveragePool", 1),
            &[&tx],
            None,
        )
        .expect("run");
        for (p, &g) in x.chunks(63).zip(&got[0].to_vec::<f32>().expect("y")) {
            let want = p.iter().map(|&v| f64::from(v)).sum::<f64>() / 63.0;
            assert!((f64::from(g) - want).abs() < 1e-6, "{g} vs {want}");
        }
    }
}

#[cfg(test)]
mod int8_tests {
    use super::*;

    #[test]
    fn max_pool_official_cases() {
        crate::testcases::run_cases(&["test_maxpool_"], max_pool_factory);
    }

    /// Pads of 2^40 on a 2-element input: the output is refused as too large before any
    /// table sized by it (the window tables used to grow infallibly to 2^40 entries).
    #[test]
    fn huge_pads_are_resource_exhausted() {
        use opreg_sdk::{
            host::HostTensor,
            testkit::{run_kernel, NodeSpec},
        };
        let x = HostTensor::from_vec(&[1, 1, 2], &[1.0f32, 2.0]).expect("x");
        for (op, f) in [
            ("MaxPool", max_pool_factory as super::super::Factory),
            ("AveragePool", avg_pool_factory),
            ("LpPool", lp_pool_factory),
        ] {
            let node = NodeSpec::onnx(op, 18)
                .attr("kernel_shape", AttrValue::Ints(vec![1]))
                .attr("pads", AttrValue::Ints(vec![1 << 40, 1 << 40]));
            let e = run_kernel(f, &node, &[&x], None).expect_err(op);
            assert_eq!(e.code, ErrorCode::ResourceExhausted, "{op}: {}", e.message);
            // Pads past isize are invalid, not an overflow.
            let node = NodeSpec::onnx(op, 18)
                .attr("kernel_shape", AttrValue::Ints(vec![1]))
                .attr("pads", AttrValue::Ints(vec![i64::MAX, i64::MAX]));
            let e = run_kernel(f, &node, &[&x], None).expect_err(op);
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{op}: {}", e.message);
        }
    }
}
