//! What happens to each element of a product before it is stored: bias, activation, and for
//! the integer flavours dequantization and requantization. One place, so the f32 and integer
//! paths cannot drift apart.

use opreg_sdk::prelude::*;

/// The activations this backend knows (see [`supported`]).
pub(crate) fn supported(e: Epilogue) -> bool {
    matches!(e, Epilogue::NONE | Epilogue::RELU | Epilogue::GELU)
}

/// `erf(x)`, Abramowitz & Stegun 7.1.26 refined (|error| < 1.5e-7): `f32::erf` is not stable.
fn erf(x: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let y = 1.0
        - (((((1.061_405_4 * t - 1.453_152_1) * t) + 1.421_413_8) * t - 0.284_496_74) * t
            + 0.254_829_6)
            * t
            * (-x * x).exp();
    y.copysign(x)
}

/// Applies `e` to one value.
#[inline]
pub(crate) fn activate(e: Epilogue, x: f32) -> f32 {
    match e {
        Epilogue::RELU => x.max(0.0),
        Epilogue::GELU => 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)),
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

/// Adds the bias and applies the activation to an f32 C, in place.
///
/// # Safety
/// `g.c` must cover `m x n` elements at `i * rsc + j * csc`, and `g.bias` (when not null) `n`
/// f32 values.
pub(crate) unsafe fn apply_f32(
    ctx: &KernelContext<'_>,
    g: &GemmArgs,
    rsc: usize,
    csc: usize,
) -> Result<(), PluginError> {
    if g.m == 0 || g.n == 0 {
        return Ok(());
    }
    let bias: Option<&[f32]> = if g.bias.is_null() {
        None
    } else {
        // SAFETY: per the contract, `n` f32 values.
        Some(unsafe { std::slice::from_raw_parts(g.bias.cast::<f32>(), g.n) })
    };
    let c = SendPtr(g.c.cast::<f32>());
    let (n, e) = (g.n, g.epilogue);
    ctx.parallel_for(g.m, (16384 / n).max(1), |rows| {
        for i in rows {
            for j in 0..n {
                // SAFETY: (i, j) lies in C; rows are split between tasks.
                let v = unsafe { &mut *c.get().add(i * rsc + j * csc) };
                *v = activate(e, *v + bias.map_or(0.0, |b| b[j]));
            }
        }
        Ok(())
    })
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
