//! The integer flavours of the gemm API (u8/i8 x u8/i8 -> i32, dequantized f32, or
//! requantized u8/i8): argument checks, batches and the per-element output stage around the
//! exact integer kernels of [`crate::int8`].

use crate::epilogue::{activate, requantize, SendPtr};
use crate::float::offset;
use crate::int8::{self, ByteC, IntA, IntC, Requant};
use opreg_sdk::prelude::*;

/// B packed for the integer kernels, with the zero points it was packed for (the kernels fold
/// them into the panels' column sums, so a later call must use the same ones).
pub(crate) struct PackedInt {
    inner: int8::PackedB,
    b_type: DType,
    zero_points: Vec<i32>,
}

impl PackedInt {
    pub(crate) fn bytes(&self) -> usize {
        self.inner.size_bytes()
    }
}

/// Whether this backend runs the integer `g` (types, layout, output stage).
pub(crate) fn supports(g: &GemmArgs) -> bool {
    let requant = g.flags & GemmArgs::REQUANT_MULTIPLIER != 0;
    let out_ok = match g.types.c {
        DType::U8 | DType::I8 if requant => {
            let zp_range = if g.types.c == DType::I8 {
                -128..=127
            } else {
                0..=255
            };
            g.epilogue == Epilogue::NONE
                && g.alpha == 1.0
                && g.beta == 0.0
                && zp_range.contains(&g.c_zero_point)
        }
        _ if requant => false,
        DType::I32 => g.epilogue == Epilogue::NONE && g.alpha == 1.0 && g.beta == 0.0,
        DType::F32 => true,
        DType::U8 | DType::I8 => {
            g.alpha == 1.0 && g.beta == 0.0 && g.c_scale > 0.0 && g.c_scale.is_finite()
        }
        _ => false,
    };
    out_ok
        && g.layout == Layout::ROW_MAJOR
        && g.trans_a == Transpose::NO
        && matches!(g.trans_b, Transpose::NO | Transpose::YES)
        && g.compute == DType::I32
        && (g.b_quant_len == 1 || g.b_quant_len == g.n)
}

fn err(e: String) -> PluginError {
    PluginError::invalid(format!("cpu blas: {e}"))
}

/// Reads `len` values of `T` at `ptr`, or `default` when `ptr` is null.
///
/// # Safety
/// A non-null `ptr` must address `len` values.
unsafe fn read<T: Copy>(ptr: *const T, len: usize, default: T) -> Vec<T> {
    if ptr.is_null() {
        vec![default; len]
    } else {
        // SAFETY: per the contract.
        unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec()
    }
}

/// Bytes a row-major `rows x cols` matrix with leading dimension `ld` spans.
fn span(rows: usize, cols: usize, ld: usize) -> Result<usize, PluginError> {
    if rows == 0 || cols == 0 {
        return Ok(0);
    }
    (rows - 1)
        .checked_mul(ld)
        .and_then(|v| v.checked_add(cols))
        .ok_or_else(|| PluginError::invalid("cpu blas: operand span overflows"))
}

/// B's bytes and zero points for one product of the batch.
///
/// # Safety
/// `g.b` (offset by `p` matrices) must cover `op(B)` as `g` describes it.
unsafe fn pack(g: &GemmArgs, p: usize, zero_points: &[i32]) -> Result<PackedInt, PluginError> {
    let transposed = g.trans_b == Transpose::YES;
    let (rows, cols) = if transposed { (g.n, g.k) } else { (g.k, g.n) };
    let len = span(rows, cols, g.ldb)?;
    let b = offset(g.b, p, g.stride_b, 1)?;
    if b.is_null() && len > 0 {
        return Err(PluginError::invalid("cpu blas: b is null"));
    }
    let b: &[u8] = if len == 0 {
        &[]
    } else {
        // SAFETY: per the contract, B spans `len` bytes.
        unsafe { std::slice::from_raw_parts(b, len) }
    };
    let inner = int8::pack_b(
        b,
        g.types.b == DType::I8,
        g.k,
        g.n,
        g.ldb,
        transposed,
        zero_points,
    )
    .map_err(err)?;
    Ok(PackedInt {
        inner,
        b_type: g.types.b,
        zero_points: zero_points.to_vec(),
    })
}

/// Packs B of an integer gemm for repeated use.
pub(crate) fn pack_b(g: &GemmArgs) -> Result<PackedInt, PluginError> {
    if !supports(g) {
        return Err(PluginError::unimplemented(format!(
            "cpu blas: cannot pack {} B",
            g.types
        )));
    }
    let q = g.quant_len()?;
    // SAFETY: the caller guarantees the zero points and B cover what `g` describes.
    unsafe {
        let zps = read(g.b_zero_points, q, 0);
        pack(g, 0, &zps)
    }
}

/// Runs every product of the integer batch `g` describes.
pub(crate) fn gemm(
    ctx: &KernelContext<'_>,
    g: &GemmArgs,
    packed: Option<&PackedInt>,
) -> Result<(), PluginError> {
    let q = g.quant_len()?;
    // SAFETY: the caller guarantees the quantization parameters and bias cover what `g`
    // describes (`q` and `n` entries).
    let (zps, scales) = unsafe { (read(g.b_zero_points, q, 0), read(g.b_scales, q, 1.0)) };
    if let Some(p) = packed {
        if (p.inner.k(), p.inner.n()) != (g.k, g.n) || p.b_type != g.types.b || p.zero_points != zps
        {
            return Err(PluginError::invalid(format!(
                "cpu blas: B packed as {} {}x{} with other zero points than this {} {}x{} gemm",
                p.b_type,
                p.inner.k(),
                p.inner.n(),
                g.types.b,
                g.k,
                g.n
            )));
        }
    }
    if g.batch > 1 && g.stride_c == 0 && g.m > 0 && g.n > 0 {
        return Err(PluginError::invalid(
            "cpu blas: a batch needs a non-zero C stride",
        ));
    }
    let c_size = g.types.c.size().max(1);
    let a_len = span(g.m, g.k, g.lda)?;
    let c_len = span(g.m, g.n, g.ldc)?;
    let mut shared: Option<PackedInt> = None;
    for p in 0..g.batch {
        let b = match packed {
            Some(b) => b,
            None if g.stride_b == 0 && shared.is_some() => shared.as_ref().expect("checked"),
            None => {
                // SAFETY: the caller guarantees B covers what `g` describes.
                let b = unsafe { pack(g, p, &zps)? };
                &*shared.insert(b)
            }
        };
        let a = offset(g.a, p, g.stride_a, 1)?;
        let c = offset(g.c.cast_const(), p, g.stride_c, c_size)?.cast_mut();
        if (a.is_null() && a_len > 0) || (c.is_null() && c_len > 0) {
            return Err(PluginError::invalid("cpu blas: a or c is null"));
        }
        // SAFETY: the caller guarantees A covers `m x k` with `lda` (its span is `a_len`).
        let a: &[u8] = if a_len == 0 {
            &[]
        } else {
            unsafe { std::slice::from_raw_parts(a, a_len) }
        };
        let a = IntA {
            a,
            signed: g.types.a == DType::I8,
            lda: g.lda,
            zp: g.a_zero_point,
        };
        // SAFETY: C covers `c_len` elements of `types.c` (the caller's contract).
        unsafe { one(ctx, g, &a, b, c, c_len, &scales)? };
    }
    Ok(())
}

/// One product into C of `types.c`.
///
/// # Safety
/// `c` must cover `c_len` elements of `g.types.c`; `g.bias` (when not null) `n` values.
unsafe fn one(
    ctx: &KernelContext<'_>,
    g: &GemmArgs,
    a: &IntA<'_>,
    b: &PackedInt,
    c: *mut u8,
    c_len: usize,
    scales: &[f32],
) -> Result<(), PluginError> {
    let (m, n) = (g.m, g.n);
    if m == 0 || n == 0 {
        return Ok(());
    }
    let grain = b.inner.rows_per_task(m, ctx.num_threads());
    // Tasks over blocks of rows and columns (columns only split for products of few rows).
    let (task_rows, task_cols) = b.inner.tasks(m, ctx.num_threads());
    let (row_tasks, col_tasks) = (m.div_ceil(task_rows), n.div_ceil(task_cols));
    let block = |t: usize| {
        let (r, j) = (t / col_tasks, t % col_tasks);
        (
            r * task_rows..((r + 1) * task_rows).min(m),
            j * task_cols..((j + 1) * task_cols).min(n),
        )
    };
    if g.flags & GemmArgs::REQUANT_MULTIPLIER != 0 {
        // SAFETY: C covers `c_len` bytes (contract); tasks write disjoint rows.
        let out = unsafe { std::slice::from_raw_parts_mut(c, c_len) };
        let out = ByteC::new(out, g.ldc);
        // SAFETY: `b_scales` holds `n` multipliers under this flag, `bias` (when not null)
        // `n` i32 (the caller's contract).
        let (mult, bias) = unsafe {
            if g.b_scales.is_null() {
                return Err(PluginError::invalid(
                    "cpu blas: REQUANT_MULTIPLIER needs n multipliers in b_scales",
                ));
            }
            (
                std::slice::from_raw_parts(g.b_scales, n),
                read(g.bias.cast::<i32>(), n, 0),
            )
        };
        let zp = g.c_zero_point;
        let (lo, hi) = opreg_sdk::numeric::requant_bounds(g.types.c == DType::I8, zp);
        let rq = Requant {
            bias: &bias,
            mult,
            zp,
            lo,
            hi,
        };
        return ctx.parallel_for(row_tasks * col_tasks, 1, |tasks| {
            for t in tasks {
                let (rows, cols) = block(t);
                // SAFETY: the tasks' blocks are disjoint; the tables hold `n` values.
                unsafe { int8::gemm_block_requant(a, m, rows, cols, &b.inner, out, &rq) }
                    .map_err(err)?;
            }
            Ok(())
        });
    }
    if g.types.c == DType::I32 {
        // SAFETY: C covers `c_len` i32 values (contract); tasks write disjoint rows.
        let out = unsafe { std::slice::from_raw_parts_mut(c.cast::<i32>(), c_len) };
        let out = IntC::new(out, g.ldc);
        let bias: Option<Vec<i32>> =
            (!g.bias.is_null()).then(|| unsafe { read(g.bias.cast::<i32>(), n, 0) });
        let base = SendPtr(c.cast::<i32>());
        return ctx.parallel_for(row_tasks * col_tasks, 1, |tasks| {
            for t in tasks {
                let (rows, cols) = block(t);
                // SAFETY: the tasks' blocks are disjoint.
                unsafe { int8::gemm_block(a, m, rows.clone(), cols.clone(), &b.inner, out) }
                    .map_err(err)?;
                if let Some(bias) = &bias {
                    for i in rows {
                        // SAFETY: row i of C lies in the checked span; this task owns its
                        // columns `cols`.
                        let row =
                            unsafe { std::slice::from_raw_parts_mut(base.get().add(i * g.ldc), n) };
                        row[cols.clone()]
                            .iter_mut()
                            .zip(&bias[cols.clone()])
                            .for_each(|(v, b)| *v = v.wrapping_add(*b));
                    }
                }
            }
            Ok(())
        });
    }
    let bias: Option<Vec<f32>> =
        (!g.bias.is_null()).then(|| unsafe { read(g.bias.cast::<f32>(), n, 0.0) });
    // alpha scales the product (not the bias) of an f32 result; requantized results take none.
    let alpha = if g.types.c == DType::F32 {
        g.alpha
    } else {
        1.0
    };
    let per_column: Vec<f32> = (0..n)
        .map(|j| alpha * g.a_scale * scales.get(j).or(scales.first()).copied().unwrap_or(1.0))
        .collect();
    let base = SendPtr(c);
    ctx.parallel_for(m, grain, |rows| {
        let mut acc = Vec::new();
        acc.try_reserve_exact(rows.len() * n).map_err(|_| {
            PluginError::new(ErrorCode::ResourceExhausted, "cpu blas: accumulator buffer")
        })?;
        acc.resize(rows.len() * n, 0i32);
        let start = rows.start * a.lda;
        let sub = IntA {
            a: a.a.get(start..).unwrap_or(&[]),
            ..*a
        };
        int8::gemm_rows_mut(&sub, rows.len(), 0..rows.len(), &b.inner, &mut acc, n).map_err(err)?;
        for (r, i) in rows.enumerate() {
            let acc = &acc[r * n..(r + 1) * n];
            for (j, &v) in acc.iter().enumerate() {
                let mut x = v as f32 * per_column[j];
                if let Some(bias) = &bias {
                    x += bias[j];
                }
                // SAFETY: (i, j) lies in C's span; rows are disjoint between tasks.
                unsafe {
                    match g.types.c {
                        DType::F32 => {
                            let out = base.get().cast::<f32>().add(i * g.ldc + j);
                            if g.beta != 0.0 {
                                x += g.beta * *out;
                            }
                            *out = activate(g.epilogue, x);
                        }
                        DType::U8 => {
                            let y = activate(g.epilogue, x);
                            *base.get().add(i * g.ldc + j) =
                                requantize(y, 1.0 / g.c_scale, g.c_zero_point, 0, 255) as u8;
                        }
                        _ => {
                            let y = activate(g.epilogue, x);
                            *base.get().cast::<i8>().add(i * g.ldc + j) =
                                requantize(y, 1.0 / g.c_scale, g.c_zero_point, -128, 127) as i8;
                        }
                    }
                }
            }
        }
        Ok(())
    })
}
