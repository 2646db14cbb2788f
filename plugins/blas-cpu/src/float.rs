//! The f32 flavour of the gemm API: argument checks, batches and pre-packed operands; the
//! epilogue (bias and activation) goes to the blocked product, which applies it tile by tile.

use crate::epilogue::TileEpilogue;
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

/// Checks one operand of elements `elem` bytes wide: `op(X)` is `rows x cols`; its leading
/// dimension must cover the contiguous dimension of the stored matrix, and the pointer must be
/// a valid, aligned address. Returns `op(X)`'s (row, column) strides in elements.
pub(crate) fn check_strided(
    name: &str,
    ptr: *const u8,
    (layout, trans, ld): (Layout, Transpose, usize),
    rows: usize,
    cols: usize,
    elem: usize,
) -> Result<(usize, usize), PluginError> {
    let (rs, cs) = strides(layout, trans, ld);
    if rows == 0 || cols == 0 {
        return Ok((rs, cs));
    }
    // The contiguous dimension of op(X) is the one with stride 1.
    let inner = if cs == 1 { cols } else { rows };
    let outer = if cs == 1 { rows } else { cols };
    if outer > 1 && ld < inner {
        return Err(PluginError::invalid(format!(
            "cpu blas: ld{name} = {ld} is less than {inner}"
        )));
    }
    if ptr.is_null() || !(ptr as usize).is_multiple_of(elem) {
        return Err(PluginError::invalid(format!(
            "cpu blas: {name} is null or not aligned to its {elem}-byte elements"
        )));
    }
    Ok((rs, cs))
}

/// [`check_strided`] for an f32 operand.
fn check_operand(
    name: &str,
    ptr: *const u8,
    layout: Layout,
    trans: Transpose,
    rows: usize,
    cols: usize,
    ld: usize,
) -> Result<Mat, PluginError> {
    let (rs, cs) = check_strided(name, ptr, (layout, trans, ld), rows, cols, 4)?;
    Ok(Mat {
        ptr: ptr.cast(),
        rs,
        cs,
    })
}

/// Validates A and C of `g` (A only unless `a_packed`, B only unless `b` is given) and maps
/// them onto a row-oriented problem.
fn problem(
    g: &GemmArgs,
    a_packed: Option<(*const f32, usize)>,
    b: Option<BSource>,
) -> Result<Problem, PluginError> {
    let reads = g.k > 0 && g.alpha != 0.0;
    let (ar, ac) = if reads && a_packed.is_none() {
        (g.m, g.k)
    } else {
        (0, 0)
    };
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
        a_packed,
        b,
        c: c.ptr.cast_mut(),
        rsc: c.rs,
        csc: c.cs,
        epi: TileEpilogue::of(g, false),
    })
}

/// An operand packed for one f32 micro-kernel, cut in depth blocks of `kc`: B (`k x n`,
/// padded to whole `NR` panels) or, with `a`, A (`n` rows x `k`, padded to whole `MR` panels;
/// see [`GemmArgs::PACKED_A`]).
pub(crate) struct PackedF32 {
    kind: KernelKind,
    a: bool,
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
        let panel = if self.a {
            gemm::panel_height(self.kind)
        } else {
            gemm::panel_width(self.kind).0
        };
        self.k * self.n.div_ceil(panel) * panel * 4
    }
}

/// Packs B (`k x n`, in `NR`-column panels), or with [`GemmArgs::PACKED_A`] `op(A)` (`m x k`,
/// row-major layout, in `MR`-row panels).
pub(crate) fn pack(kind: KernelKind, g: &GemmArgs) -> Result<PackedF32, PluginError> {
    let a = g.flags & GemmArgs::PACKED_A != 0;
    if a && g.layout != Layout::ROW_MAJOR {
        return Err(PluginError::invalid(
            "cpu blas: packed A needs a row-major layout",
        ));
    }
    // The operand, how many rows (A) or columns (B) it has, and their panel size.
    let (op, across, panel) = if a {
        let op = check_operand("a", g.a, g.layout, g.trans_a, g.m, g.k, g.lda)?;
        (op, g.m, gemm::panel_height(kind))
    } else {
        let op = check_operand("b", g.b, g.layout, g.trans_b, g.k, g.n, g.ldb)?;
        (op, g.n, gemm::panel_width(kind).0)
    };
    let floats = across
        .div_ceil(panel)
        .checked_mul(panel)
        .and_then(|w| w.checked_mul(g.k))
        .ok_or_else(|| PluginError::invalid("cpu blas: packed operand size overflows"))?;
    let mut panels = AlignedBuf::new(floats.max(1))?;
    // SAFETY: `panels` has room for `k` times the padded rows / columns at a 64-byte aligned
    // address; the operand was checked above.
    let kc = unsafe {
        if a {
            gemm::pack_a_all_for(kind, op, g.m, g.k, panels.ptr())
        } else {
            gemm::pack_b_all_for(kind, op, g.k, g.n, panels.ptr())
        }
    };
    Ok(PackedF32 {
        kind,
        a,
        kc,
        k: g.k,
        n: across,
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

/// Checks that an operand packed as A (`a`) or B with depth `k` and `n` rows (A) or columns
/// (B) is the one `g` asks for ([`GemmArgs::PACKED_A`] or not) at its sizes; returns its role
/// ("A" or "B") for later messages.
pub(crate) fn check_packed(
    g: &GemmArgs,
    a: bool,
    (k, n): (usize, usize),
) -> Result<&'static str, PluginError> {
    let wants_a = g.flags & GemmArgs::PACKED_A != 0;
    let (role, want) = if wants_a {
        ("A", (g.k, g.m))
    } else {
        ("B", (g.k, g.n))
    };
    if a != wants_a {
        return Err(PluginError::invalid(format!(
            "cpu blas: the packed operand is not {role}, as the flags say"
        )));
    }
    if (k, n) != want {
        return Err(PluginError::invalid(format!(
            "cpu blas: {role} packed for k {k} x {n}, gemm wants k {} x {}",
            want.0, want.1
        )));
    }
    Ok(role)
}

/// Runs every product of the batch `g` describes, then its epilogue.
pub(crate) fn gemm(
    ctx: &KernelContext<'_>,
    kind: KernelKind,
    g: &GemmArgs,
    packed: Option<&PackedF32>,
) -> Result<(), PluginError> {
    let wants_a = g.flags & GemmArgs::PACKED_A != 0;
    let packed = match packed {
        Some(p) => {
            let role = check_packed(g, p.a, (p.k, p.n))?;
            if !p.kind.available() {
                return Err(PluginError::invalid(format!(
                    "cpu blas: packed {role} is for a kernel this CPU lacks"
                )));
            }
            Some((p.kind, p.a, p.panels.as_ptr(), p.kc))
        }
        None if wants_a => {
            return Err(PluginError::invalid(
                "cpu blas: PACKED_A is for gemm_packed with a packed A",
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
            Some((k, true, ptr, kc)) => (k, problem(&one, Some((ptr, kc)), None)?),
            Some((k, false, ptr, kc)) => {
                (k, problem(&one, None, Some(BSource::Packed { ptr, kc }))?)
            }
            None => (kind, problem(&one, None, None)?),
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
                epi: TileEpilogue::of(&one, true),
                ..prob
            };
        }
        // SAFETY: the caller guarantees the operands cover the matrices `g` describes (checked
        // for null, alignment and leading dimensions above); the kernel is available (chosen
        // by detection, or checked above for packed B).
        // The bias (`n` or, per row, `m` f32s by the caller's contract) and the activation
        // go with the tiles.
        unsafe { gemm::gemm(ctx, kind, &prob)? };
    }
    Ok(())
}
