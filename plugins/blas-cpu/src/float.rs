//! The f32 flavour of the gemm API: argument checks, batches, pre-packed B, and the epilogue
//! (bias and activation) applied to C after the blocked product.

use crate::epilogue;
use crate::gemm::{self, AlignedBuf, BSource, Mat, Problem};
use crate::kernels::KernelKind;
use opreg_sdk::prelude::*;

/// (row stride, column stride) of `op(X)` for a matrix stored with leading dimension `ld`.
pub(crate) fn strides(layout: Layout, trans: Transpose, ld: usize) -> (usize, usize) {
    let col_major = layout == Layout::COL_MAJOR;
    let transposed = trans == Transpose::YES;
    if col_major == transposed {
        (ld, 1)
    } else {
        (1, ld)
    }
}

/// Checks one operand: `op(X)` is `rows x cols`; its leading dimension must cover the
/// contiguous dimension of the stored matrix, and the pointer must be a valid f32 address.
fn check_operand(
    name: &str,
    ptr: *const u8,
    layout: Layout,
    trans: Transpose,
    rows: usize,
    cols: usize,
    ld: usize,
) -> Result<Mat, PluginError> {
    let (rs, cs) = strides(layout, trans, ld);
    if rows == 0 || cols == 0 {
        return Ok(Mat {
            ptr: ptr.cast(),
            rs,
            cs,
        });
    }
    // The contiguous dimension of op(X) is the one with stride 1.
    let inner = if cs == 1 { cols } else { rows };
    let outer = if cs == 1 { rows } else { cols };
    if outer > 1 && ld < inner {
        return Err(PluginError::invalid(format!(
            "cpu blas: ld{name} = {ld} is less than {inner}"
        )));
    }
    if ptr.is_null() || !(ptr as usize).is_multiple_of(std::mem::align_of::<f32>()) {
        return Err(PluginError::invalid(format!(
            "cpu blas: {name} is null or not f32-aligned"
        )));
    }
    Ok(Mat {
        ptr: ptr.cast(),
        rs,
        cs,
    })
}

/// Validates A and C of `g` (B too unless `packed`) and maps them onto a row-oriented problem.
fn problem(g: &GemmArgs, b: Option<BSource>) -> Result<Problem, PluginError> {
    let reads = g.k > 0 && g.alpha != 0.0;
    let (ar, ac) = if reads { (g.m, g.k) } else { (0, 0) };
    let a = check_operand("a", g.a, g.layout, g.trans_a, ar, ac, g.lda)?;
    let c = check_operand(
        "c",
        g.c.cast_const(),
        g.layout,
        Transpose::NO,
        g.m,
        g.n,
        g.ldc,
    )?;
    let b = match b {
        Some(b) => b,
        None => {
            let (br, bc) = if reads { (g.k, g.n) } else { (0, 0) };
            BSource::Strided(check_operand("b", g.b, g.layout, g.trans_b, br, bc, g.ldb)?)
        }
    };
    Ok(Problem {
        m: g.m,
        n: g.n,
        k: g.k,
        alpha: g.alpha,
        beta: g.beta,
        a,
        b,
        c: c.ptr.cast_mut(),
        rsc: c.rs,
        csc: c.cs,
    })
}

/// B packed for one f32 micro-kernel: `k x n` padded to whole panels, cut in depth blocks of
/// `kc`.
pub(crate) struct PackedF32 {
    kind: KernelKind,
    kc: usize,
    k: usize,
    n: usize,
    panels: AlignedBuf,
}

// SAFETY: the panels are written once when packing and only read afterwards.
unsafe impl Send for PackedF32 {}
unsafe impl Sync for PackedF32 {}

impl PackedF32 {
    pub(crate) fn bytes(&self) -> usize {
        let (nr, _) = gemm::panel_width(self.kind);
        self.k * self.n.div_ceil(nr) * nr * 4
    }
}

pub(crate) fn pack_b(kind: KernelKind, g: &GemmArgs) -> Result<PackedF32, PluginError> {
    let (k, n) = (g.k, g.n);
    let b = check_operand("b", g.b, g.layout, g.trans_b, k, n, g.ldb)?;
    let (nr, _) = gemm::panel_width(kind);
    let floats = n
        .div_ceil(nr)
        .checked_mul(nr)
        .and_then(|w| w.checked_mul(k))
        .ok_or_else(|| PluginError::invalid("cpu blas: packed B size overflows"))?;
    let mut panels = AlignedBuf::new(floats.max(1))?;
    // SAFETY: `panels` has room for `k * n_pad` floats at a 64-byte aligned address; B was
    // checked above.
    let kc = unsafe { gemm::pack_b_all_for(kind, b, k, n, panels.ptr()) };
    Ok(PackedF32 {
        kind,
        kc,
        k,
        n,
        panels,
    })
}

/// `p` elements of `bytes` each past `ptr`, refusing offsets that overflow.
pub(crate) fn offset(
    ptr: *const u8,
    p: usize,
    stride: usize,
    bytes: usize,
) -> Result<*const u8, PluginError> {
    p.checked_mul(stride)
        .and_then(|e| e.checked_mul(bytes))
        .map(|o| ptr.wrapping_add(o))
        .ok_or_else(|| PluginError::invalid("cpu blas: batch offset overflows"))
}

/// Runs every product of the batch `g` describes, then its epilogue.
pub(crate) fn gemm(
    ctx: &KernelContext<'_>,
    kind: KernelKind,
    g: &GemmArgs,
    packed: Option<&PackedF32>,
) -> Result<(), PluginError> {
    let packed = match packed {
        Some(p) => {
            if (p.k, p.n) != (g.k, g.n) {
                return Err(PluginError::invalid(format!(
                    "cpu blas: B packed as {}x{}, gemm wants {}x{}",
                    p.k, p.n, g.k, g.n
                )));
            }
            if !p.kind.available() {
                return Err(PluginError::invalid(
                    "cpu blas: packed B is for a kernel this CPU lacks",
                ));
            }
            Some((
                p.kind,
                BSource::Packed {
                    ptr: p.panels.as_ptr(),
                    kc: p.kc,
                },
            ))
        }
        None => None,
    };
    if g.batch > 1 && g.stride_c == 0 && g.m > 0 && g.n > 0 {
        return Err(PluginError::invalid(
            "cpu blas: a batch needs a non-zero C stride",
        ));
    }
    for p in 0..g.batch {
        let mut one = *g;
        one.a = offset(g.a, p, g.stride_a, 4)?;
        one.b = offset(g.b, p, g.stride_b, 4)?;
        one.c = offset(g.c.cast_const(), p, g.stride_c, 4)?.cast_mut();
        let (kind, mut prob) = match packed {
            Some((k, b)) => (k, problem(&one, Some(b))?),
            None => (kind, problem(&one, None)?),
        };
        if let (Layout::COL_MAJOR, BSource::Strided(b)) = (one.layout, prob.b) {
            // C^T = op(B)^T op(A)^T is the same product with a row-major C, which the kernels
            // store with full vectors.
            prob = Problem {
                m: prob.n,
                n: prob.m,
                a: Mat {
                    ptr: b.ptr,
                    rs: b.cs,
                    cs: b.rs,
                },
                b: BSource::Strided(Mat {
                    ptr: prob.a.ptr,
                    rs: prob.a.cs,
                    cs: prob.a.rs,
                }),
                rsc: prob.csc,
                csc: prob.rsc,
                ..prob
            };
        }
        // SAFETY: the caller guarantees the operands cover the matrices `g` describes (checked
        // for null, alignment and leading dimensions above); the kernel is available (chosen
        // by detection, or checked above for packed B).
        unsafe { gemm::gemm(ctx, kind, &prob)? };
        if !one.bias.is_null() || one.epilogue != Epilogue::NONE {
            let (rsc, csc) = strides(one.layout, Transpose::NO, one.ldc);
            // SAFETY: C was checked to cover `m x n` with these strides; bias has `n` f32s.
            unsafe { epilogue::apply_f32(ctx, &one, rsc, csc)? };
        }
    }
    Ok(())
}
