//! What happens to each element of a product before it is stored: bias, activation, and for
//! the integer flavours dequantization and requantization. One place, so the f32 and integer
//! paths cannot drift apart.

use opreg_sdk::numeric::Real;
use opreg_sdk::prelude::*;

/// The activations this backend knows (see [`supported`]).
pub(crate) fn supported(e: Epilogue) -> bool {
    matches!(
        e,
        Epilogue::NONE | Epilogue::RELU | Epilogue::GELU | Epilogue::SILU | Epilogue::RELU6
    )
}

/// Applies `e` to one value. The formulas (and so the bits) are those of `onnx-ops`' fused
/// activations (`Activation::apply`): a Conv or MatMul gives the same result whether its
/// epilogue runs here or in the operator. `#[inline(always)]`: the tile loops call it with
/// `e` fixed outside the loop and must see through it to vectorize (the exponential and erf
/// of [`Real`] included).
#[inline(always)]
pub(crate) fn activate(e: Epilogue, x: f32) -> f32 {
    match e {
        // f32::max(NaN, 0) is 0, as the operators' ReLU.
        Epilogue::RELU => x.max(0.0),
        Epilogue::GELU => 0.5 * x * (1.0 + Real::erf(x * std::f64::consts::FRAC_1_SQRT_2 as f32)),
        Epilogue::SILU => x * x.sigmoid(),
        // As ONNX Clip (and `f32::clamp`): NaN stays NaN, -0 stays -0.
        Epilogue::RELU6 => x.clamp(0.0, 6.0),
        _ => x,
    }
}

/// `round_half_even(x / scale) + zp`, saturated to `[lo, hi]`.
#[inline]
pub(crate) fn requantize(x: f32, inv_scale: f32, zp: i32, lo: i32, hi: i32) -> i32 {
    let q = (x * inv_scale).round_ties_even();
    // `as` saturates (and maps NaN to 0) before the zero point is added.
    (q as i32).saturating_add(zp).clamp(lo, hi)
}

/// The bias and activation of an f32 product, applied tile by tile by the gemm driver right
/// after a tile's last depth block, while the tile is in L1 (a pass over C afterwards read
/// and wrote all of C again: a convolution's output, megabytes).
#[derive(Clone, Copy, Debug)]
pub(crate) struct TileEpilogue {
    /// One f32 per row (`per_row`) or per column of C, or null.
    pub bias: *const f32,
    pub per_row: bool,
    pub act: Epilogue,
}

// SAFETY: the bias is only read, and outlives the gemm call (the caller's contract).
unsafe impl Send for TileEpilogue {}
unsafe impl Sync for TileEpilogue {}

impl TileEpilogue {
    /// The epilogue of `g` (None when it has none), for a problem whose rows are `g`'s rows,
    /// or its columns when `transposed`.
    pub(crate) fn of(g: &GemmArgs, transposed: bool) -> Option<Self> {
        if g.bias.is_null() && g.epilogue == Epilogue::NONE {
            return None;
        }
        Some(TileEpilogue {
            bias: g.bias.cast(),
            per_row: (g.flags & GemmArgs::BIAS_PER_ROW != 0) != transposed,
            act: g.epilogue,
        })
    }

    /// `v = act(v + bias)` over the `mr x nr` tile at `c` (strides `rsc`, `csc`) whose first
    /// element is C's `(row0, col0)`, with the activation chosen once outside the loops.
    /// Called inside a function compiled for the kernel's instruction set (see
    /// `MicroKernel::finish`), so that the loops vectorize for it.
    ///
    /// # Safety
    /// The tile lies in C and is writable; the bias, when not null, covers row `row0 + mr - 1`
    /// (`per_row`) or column `col0 + nr - 1`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn apply(
        &self,
        c: *mut f32,
        rsc: usize,
        csc: usize,
        row0: usize,
        col0: usize,
        mr: usize,
        nr: usize,
    ) {
        // The inner loop runs along the contiguous direction of C (rows of a row-major C,
        // columns of a column-major one: a convolution computed as pixels x channels), so
        // that it vectorizes; the bias is then either one value for the whole run or a
        // contiguous run of values.
        let (outer, inner, so, si) = if csc <= rsc {
            (mr, nr, rsc, csc)
        } else {
            (nr, mr, csc, rsc)
        };
        // The bias along the outer direction (one value per run), or along the inner one.
        let bias_outer = self.per_row == (csc <= rsc);
        let (bo, bi) = if csc <= rsc {
            (row0, col0)
        } else {
            (col0, row0)
        };
        macro_rules! each {
            ($act:expr) => {{
                let act = $act;
                for o in 0..outer {
                    // SAFETY (whole block): the caller's tile and bias ranges.
                    unsafe {
                        let run = c.add(o * so);
                        let bias = (!self.bias.is_null() && !bias_outer)
                            .then(|| std::slice::from_raw_parts(self.bias.add(bi), inner));
                        let b = if self.bias.is_null() || !bias_outer {
                            0.0
                        } else {
                            *self.bias.add(bo + o)
                        };
                        if si == 1 {
                            // A slice: the loop vectorizes (a runtime stride would not). Plain
                            // `for` loops: `for_each` was compiled out of line, outside the
                            // kernel's instruction set (SiLU then cost 0.85 ms on 1.2 M values
                            // at 2 threads, 4.5 cycles each).
                            let run = std::slice::from_raw_parts_mut(run, inner);
                            match bias {
                                Some(bias) => {
                                    for (v, &b) in run.iter_mut().zip(bias) {
                                        *v = activate(act, *v + b);
                                    }
                                }
                                None => {
                                    for v in run.iter_mut() {
                                        *v = activate(act, *v + b);
                                    }
                                }
                            }
                        } else {
                            for i in 0..inner {
                                let p = run.add(i * si);
                                *p = activate(act, *p + bias.map_or(b, |s| s[i]));
                            }
                        }
                    }
                }
            }};
        }
        match self.act {
            Epilogue::RELU => each!(Epilogue::RELU),
            Epilogue::GELU => each!(Epilogue::GELU),
            Epilogue::SILU => each!(Epilogue::SILU),
            Epilogue::RELU6 => each!(Epilogue::RELU6),
            _ => each!(Epilogue::NONE),
        }
    }
}

/// A pointer tasks share, each writing its own rows.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);
// SAFETY: tasks write disjoint parts of the buffer, which outlives the parallel loop.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}
