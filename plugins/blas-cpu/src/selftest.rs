//! The backend's self-test: a few products through every path (plain, transposed, column-major,
//! pre-packed), compared with a plain reference. The micro-kernel is chosen from the CPU at run
//! time, so this is what tells a machine where the chosen kernel computes wrong (an emulator,
//! a CPU flag that lies) before any model is served with it.

use opreg_sdk::prelude::*;

/// `(m, n, k)`: tails in every dimension for every kernel width, and more than one depth block.
const SHAPES: [(usize, usize, usize); 3] = [(3, 5, 7), (17, 33, 65), (37, 70, 300)];

/// A deterministic operand: small integers, so every product is exact in f32.
fn operand(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + seed * 13) % 11) as f32 - 5.0)
        .collect()
}

/// `C[i][j] = sum_p A(i, p) * B(p, j)` over row-major `a` (`m x k`) and `b` (`k x n`).
fn reference(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
    let mut c = vec![0.0f32; m * n];
    for (i, row) in c.chunks_mut(n).enumerate() {
        for (j, out) in row.iter_mut().enumerate() {
            *out = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
        }
    }
    c
}

/// `x` (`rows x cols`, row-major) transposed.
fn transposed(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = x[r * cols + c];
        }
    }
    t
}

pub(crate) fn run(blas: &impl Blas, ctx: &KernelContext<'_>) -> Result<(), PluginError> {
    for (m, n, k) in SHAPES {
        let (a, b) = (operand(m * k, 1), operand(k * n, 2));
        let want = reference(m, n, k, &a, &b);
        let (at, bt) = (transposed(&a, m, k), transposed(&b, k, n));
        for (trans_a, trans_b) in [
            (Transpose::NO, Transpose::NO),
            (Transpose::YES, Transpose::NO),
            (Transpose::NO, Transpose::YES),
            (Transpose::YES, Transpose::YES),
        ] {
            let a_op = if trans_a == Transpose::YES { &at } else { &a };
            let b_op = if trans_b == Transpose::YES { &bt } else { &b };
            let mut c = vec![f32::NAN; m * n];
            let mut args = GemmArgs::f32(m, n, k, a_op, b_op, &mut c)?;
            args.trans_a = trans_a;
            args.trans_b = trans_b;
            args.lda = if trans_a == Transpose::YES { m } else { k };
            args.ldb = if trans_b == Transpose::YES { k } else { n };
            blas.gemm(ctx, &args)?;
            compare(&format!("{m}x{n}x{k} {trans_a:?}/{trans_b:?}"), &c, &want)?;
        }
        // Column-major: A's memory is row-major A^T, and C's is row-major C^T.
        let mut c = vec![f32::NAN; m * n];
        let mut args = GemmArgs::f32(m, n, k, &at, &bt, &mut c)?;
        args.layout = Layout::COL_MAJOR;
        args.lda = m;
        args.ldb = k;
        args.ldc = m;
        blas.gemm(ctx, &args)?;
        compare(
            &format!("{m}x{n}x{k} column-major"),
            &c,
            &transposed(&want, m, n),
        )?;
        // Pre-packed B, as MatMul and Gemm use it for weights.
        let mut c = vec![f32::NAN; m * n];
        let args = GemmArgs::f32(m, n, k, &a, &b, &mut c)?;
        let packed = blas.pack_b(ctx, &args)?;
        blas.gemm_packed(ctx, &args, &packed)?;
        compare(&format!("{m}x{n}x{k} packed"), &c, &want)?;
        integer(blas, ctx, m, n, k)?;
    }
    Ok(())
}

/// u8 x i8 -> i32 with zero points on both sides, plain and pre-packed: the integer kernels
/// are chosen from the CPU too (VNNI, AVX2, portable).
fn integer(
    blas: &impl Blas,
    ctx: &KernelContext<'_>,
    m: usize,
    n: usize,
    k: usize,
) -> Result<(), PluginError> {
    let a: Vec<u8> = (0..m * k).map(|i| ((i * 37 + 11) % 256) as u8).collect();
    let b: Vec<i8> = (0..k * n)
        .map(|i| ((i * 53 + 7) % 256) as u8 as i8)
        .collect();
    let (za, zb) = (131i32, -3i32);
    let want: Vec<i32> = (0..m * n)
        .map(|e| {
            let (i, j) = (e / n, e % n);
            (0..k)
                .map(|p| (a[i * k + p] as i32 - za) * (b[p * n + j] as i32 - zb))
                .sum()
        })
        .collect();
    let mut g = GemmArgs::new(
        GemmTypes {
            a: DType::U8,
            b: DType::I8,
            c: DType::I32,
        },
        m,
        n,
        k,
    );
    g.a = a.as_ptr();
    g.b = b.as_ptr().cast();
    g.a_zero_point = za;
    g.b_zero_points = &zb;
    for packed in [false, true] {
        let mut c = vec![i32::MIN; m * n];
        g.c = c.as_mut_ptr().cast();
        if packed {
            let p = blas.pack_b(ctx, &g)?;
            blas.gemm_packed(ctx, &g, &p)?;
        } else {
            blas.gemm(ctx, &g)?;
        }
        if let Some(i) = c.iter().zip(&want).position(|(g, w)| g != w) {
            return Err(PluginError::internal(format!(
                "cpu blas computes the {m}x{n}x{k} u8 x i8 gemm (packed: {packed}) wrong on this \
                 machine: element {i} is {}, expected {}",
                c[i], want[i]
            )));
        }
    }
    Ok(())
}

fn compare(case: &str, got: &[f32], want: &[f32]) -> Result<(), PluginError> {
    match got.iter().zip(want).position(|(g, w)| g != w) {
        None => Ok(()),
        Some(i) => Err(PluginError::internal(format!(
            "cpu blas computes {case} wrong on this machine: element {i} is {}, expected {}",
            got[i], want[i]
        ))),
    }
}
