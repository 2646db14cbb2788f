//! The bf16 flavour against a plain reference, on every path this CPU runs: operands of a
//! few bits (multiples of 1/8 below 2), so that every product and sum is exact in f32 and the
//! paths must agree bit for bit with the reference whatever their order of additions.

use super::*;
use crate::epilogue::activate;
use crate::CpuBlas;
use opreg_sdk::{blas::into_ffi_blas, host::CallFrame, LogLevel};

/// The paths to test: `vdpbf16ps` where the CPU has it, and widening to each f32 kernel.
fn paths() -> Vec<Path> {
    let mut v: Vec<Path> = KernelKind::ALL
        .into_iter()
        .filter(|k| k.available())
        .map(Path::Widen)
        .collect();
    if Path::best(KernelKind::Portable) == Path::Pairs {
        v.push(Path::Pairs);
    }
    v
}

fn run<R>(path: Path, f: impl FnOnce(&KernelContext<'_>, opreg_sdk::blas::BlasRef<'_>) -> R) -> R {
    let kind = match path {
        Path::Widen(kind) => kind,
        Path::Pairs => KernelKind::best(),
    };
    let blas = into_ffi_blas(CpuBlas { kind, bf16: path });
    let log = |_: LogLevel, _: &str| {};
    let frame = CallFrame::new(0, Device::CPU, Some(&blas), &log);
    frame.with_context(|ctx| f(ctx, ctx.blas().expect("blas")))
}

/// Deterministic bf16 values `i / 8` with `i` in -15..=15.
fn values(len: usize, seed: usize) -> Vec<u16> {
    (0..len)
        .map(|i| {
            let v = ((i * 37 + seed * 11 + 5) % 31) as f32 - 15.0;
            bf16::from_f32(v / 8.0).to_bits()
        })
        .collect()
}

fn f(x: u16) -> f32 {
    bf16::from_bits(x).to_f32()
}

/// One product's description.
#[derive(Clone, Copy, Debug)]
struct Case {
    m: usize,
    n: usize,
    k: usize,
    col_major: bool,
    ta: bool,
    tb: bool,
    c16: bool,
    alpha: f32,
    beta: f32,
    epi: Epilogue,
    bias: bool,
    /// The bias per row of C (`BIAS_PER_ROW`) instead of per column.
    row_bias: bool,
    packed: bool,
    /// A packed instead of B ([`GemmArgs::PACKED_A`], row-major only).
    packed_a: bool,
}

/// Runs `case` on `path` and compares with the reference; the operands' leading dimensions
/// are padded by 3 so that no path can rely on dense storage.
fn check(path: Path, case: Case) {
    let Case { m, n, k, .. } = case;
    let pad = 3;
    // op(A) is m x k: stored as m x k (or k x m when transposed), in the layout's order.
    let stored = |rows: usize, cols: usize, t: bool| if t { (cols, rows) } else { (rows, cols) };
    let (ar, ac) = stored(m, k, case.ta);
    let (br, bc) = stored(k, n, case.tb);
    // The leading dimension covers the contiguous dimension: columns (row-major) or rows.
    let ld = |rows: usize, cols: usize| if case.col_major { rows } else { cols } + pad;
    let (lda, ldb, ldc) = (ld(ar, ac), ld(br, bc), ld(m, n));
    let span = |rows: usize, cols: usize, ld: usize| {
        if case.col_major {
            cols.max(1) * ld
        } else {
            rows.max(1) * ld
        }
    };
    let a = values(span(ar, ac, lda), 1);
    let b = values(span(br, bc, ldb), 2);
    let at = |x: &[u16], ld: usize, i: usize, j: usize, t: bool| {
        let (r, c) = if t { (j, i) } else { (i, j) };
        if case.col_major {
            f(x[c * ld + r])
        } else {
            f(x[r * ld + c])
        }
    };
    let c_index = |i: usize, j: usize| {
        if case.col_major {
            j * ldc + i
        } else {
            i * ldc + j
        }
    };
    let c_len = span(m, n, ldc);
    let c0: Vec<f32> = values(c_len, 3).into_iter().map(f).collect();
    let bias: Vec<f32> = (0..m.max(n)).map(|j| j as f32 * 0.25 - 1.0).collect();
    let mut g = GemmArgs::new(
        GemmTypes {
            a: DType::BF16,
            b: DType::BF16,
            c: if case.c16 { DType::BF16 } else { DType::F32 },
        },
        m,
        n,
        k,
    );
    g.layout = if case.col_major {
        Layout::COL_MAJOR
    } else {
        Layout::ROW_MAJOR
    };
    g.trans_a = if case.ta {
        Transpose::YES
    } else {
        Transpose::NO
    };
    g.trans_b = if case.tb {
        Transpose::YES
    } else {
        Transpose::NO
    };
    (g.a, g.lda, g.b, g.ldb, g.ldc) = (a.as_ptr().cast(), lda, b.as_ptr().cast(), ldb, ldc);
    (g.alpha, g.beta, g.epilogue) = (case.alpha, case.beta, case.epi);
    if case.bias {
        g.bias = bias.as_ptr().cast();
        if case.row_bias {
            g.flags = GemmArgs::BIAS_PER_ROW;
        }
    }
    let mut c32 = c0.clone();
    let mut c16: Vec<u16> = c0.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
    g.c = if case.c16 {
        c16.as_mut_ptr().cast()
    } else {
        c32.as_mut_ptr().cast()
    };
    run(path, |ctx, blas| {
        assert!(blas.supports(&g), "{case:?}");
        let mut g = g;
        if case.packed_a {
            g.flags |= GemmArgs::PACKED_A;
            assert!(blas.supports(&g), "{case:?}");
            let p = blas.pack_b(ctx, &g).expect("pack A");
            // A is taken from the packing only.
            g.a = std::ptr::null();
            blas.gemm_packed(ctx, &g, &p).expect("gemm_packed A");
        } else if case.packed {
            let p = blas.pack_b(ctx, &g).expect("pack");
            blas.gemm_packed(ctx, &g, &p).expect("gemm_packed");
        } else {
            blas.gemm(ctx, &g).expect("gemm");
        }
    });
    for i in 0..m {
        for j in 0..n {
            let dot: f32 = (0..k)
                .map(|q| at(&a, lda, i, q, case.ta) * at(&b, ldb, q, j, case.tb))
                .sum();
            let mut want = case.alpha * dot + case.beta * c0[c_index(i, j)];
            if case.bias {
                want += bias[if case.row_bias { i } else { j }];
            }
            want = activate(case.epi, want);
            let got = if case.c16 {
                want = bf16::from_f32(want).to_f32();
                f(c16[c_index(i, j)])
            } else {
                c32[c_index(i, j)]
            };
            // Exact but for GELU, whose erf may round differently vectorized.
            let tol = if case.epi == Epilogue::GELU {
                1e-6 * (1.0 + want.abs())
            } else {
                0.0
            };
            assert!(
                (got - want).abs() <= tol,
                "{path:?} {case:?} ({i},{j}): {got} vs {want}"
            );
        }
    }
    // Padding between rows is never written.
    let written = |idx: usize| {
        let (outer, inner) = (idx / ldc, idx % ldc);
        let extent = if case.col_major { m } else { n };
        inner < extent && outer < if case.col_major { n } else { m }
    };
    for idx in (0..c_len).filter(|&i| !written(i)) {
        let got = if case.c16 { f(c16[idx]) } else { c32[idx] };
        assert_eq!(got, c0[idx], "{path:?} {case:?}: padding {idx} written");
    }
}

const BASE: Case = Case {
    m: 1,
    n: 1,
    k: 1,
    col_major: false,
    ta: false,
    tb: false,
    c16: false,
    alpha: 1.0,
    beta: 0.0,
    epi: Epilogue::NONE,
    bias: false,
    row_bias: false,
    packed: false,
    packed_a: false,
};

#[test]
fn every_path_matches_the_reference_exactly() {
    // Edges of every tile size (8 x 48), odd depths, more than one unit of rows.
    let shapes = [
        (1, 1, 1),
        (3, 5, 7),
        (8, 48, 2),
        (9, 49, 3),
        (17, 100, 65),
        (37, 130, 300),
    ];
    for path in paths() {
        for &(m, n, k) in &shapes {
            for col_major in [false, true] {
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    for c16 in [false, true] {
                        for (packed, packed_a) in [(false, false), (true, false), (false, true)] {
                            if packed_a && col_major {
                                continue;
                            }
                            let case = Case {
                                m,
                                n,
                                k,
                                col_major,
                                ta,
                                tb,
                                c16,
                                packed,
                                packed_a,
                                ..BASE
                            };
                            check(path, case);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn scaling_accumulation_bias_and_activations() {
    for path in paths() {
        for c16 in [false, true] {
            for epi in [
                Epilogue::NONE,
                Epilogue::RELU,
                Epilogue::GELU,
                Epilogue::RELU6,
            ] {
                for (alpha, beta) in [(1.0, 0.0), (0.5, 2.0), (0.0, 1.0)] {
                    for (packed, row_bias, packed_a) in [
                        (false, false, false),
                        (true, false, false),
                        (false, true, false),
                        (false, true, true),
                    ] {
                        let case = Case {
                            m: 19,
                            n: 70,
                            k: 33,
                            c16,
                            alpha,
                            beta,
                            epi,
                            bias: true,
                            row_bias,
                            packed,
                            packed_a,
                            ..BASE
                        };
                        check(path, case);
                    }
                }
            }
            // No depth: C = beta * C + bias.
            check(
                path,
                Case {
                    m: 5,
                    n: 20,
                    k: 0,
                    c16,
                    beta: 0.5,
                    bias: true,
                    ..BASE
                },
            );
        }
    }
}

#[test]
fn batches_with_a_shared_b_and_a_b_packed_for_either_c() {
    let (batch, m, n, k) = (3, 6, 50, 11);
    let a = values(batch * m * k, 4);
    let b = values(k * n, 5);
    for path in paths() {
        let mut c = vec![0u16; batch * m * n];
        let mut c32 = vec![0f32; batch * m * n];
        let types = |c| GemmTypes {
            a: DType::BF16,
            b: DType::BF16,
            c,
        };
        let mut g = GemmArgs::new(types(DType::BF16), m, n, k);
        g.batch = batch;
        (g.a, g.stride_a) = (a.as_ptr().cast(), m * k);
        (g.b, g.stride_b) = (b.as_ptr().cast(), 0);
        (g.c, g.stride_c) = (c.as_mut_ptr().cast(), m * n);
        let mut g32 = g;
        g32.types = types(DType::F32);
        g32.c = c32.as_mut_ptr().cast();
        run(path, |ctx, blas| {
            // Packed for an f32 C, used for a bf16 one too.
            let p = blas.pack_b(ctx, &g32).expect("pack");
            blas.gemm_packed(ctx, &g, &p).expect("bf16 C");
            blas.gemm_packed(ctx, &g32, &p).expect("f32 C");
        });
        for p in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k)
                        .map(|q| f(a[p * m * k + i * k + q]) * f(b[q * n + j]))
                        .sum();
                    let e = p * m * n + i * n + j;
                    assert_eq!(c32[e], want, "{path:?} f32 batch {p} ({i},{j})");
                    assert_eq!(f(c[e]), bf16::from_f32(want).to_f32(), "{path:?} bf16");
                }
            }
        }
    }
}

#[test]
fn bad_arguments_are_refused() {
    let a = values(64, 1);
    let b = values(64, 2);
    let mut c = vec![0f32; 64];
    let bf = GemmTypes {
        a: DType::BF16,
        b: DType::BF16,
        c: DType::F32,
    };
    let cp = c.as_mut_ptr();
    let g = || {
        let mut g = GemmArgs::new(bf, 4, 4, 4);
        (g.a, g.b, g.c) = (a.as_ptr().cast(), b.as_ptr().cast(), cp.cast());
        g
    };
    for path in paths() {
        run(path, |ctx, blas| {
            let mut odd = g();
            odd.a = odd.a.wrapping_add(1);
            let e = blas.gemm(ctx, &odd).expect_err("misaligned A");
            assert!(e.to_string().contains("aligned"), "{e}");
            let mut short = g();
            short.lda = 3;
            let e = blas.gemm(ctx, &short).expect_err("lda");
            assert!(e.to_string().contains("lda = 3"), "{e}");
            let mut null_b = g();
            null_b.b = std::ptr::null();
            assert!(blas.gemm(ctx, &null_b).is_err());
            // Packed for another depth.
            let p = blas.pack_b(ctx, &g()).expect("pack");
            let mut deeper = g();
            (deeper.k, deeper.m, deeper.lda, deeper.ldb) = (8, 2, 8, 4);
            let e = blas.gemm_packed(ctx, &deeper, &p).expect_err("k");
            assert!(e.to_string().contains("packed"), "{e}");
            // f16 and an f16 accumulation are not supported.
            let mut half = g();
            half.compute = DType::F16;
            assert!(!blas.supports(&half));
            let mut flag = g();
            flag.flags = GemmArgs::REQUANT_MULTIPLIER;
            assert!(!blas.supports(&flag));
            let mut col_a = g();
            (col_a.flags, col_a.layout) = (GemmArgs::PACKED_A, Layout::COL_MAJOR);
            assert!(!blas.supports(&col_a));
            // A packed B given as A, and PACKED_A without a packing.
            let mut as_a = g();
            as_a.flags = GemmArgs::PACKED_A;
            let e = blas.gemm_packed(ctx, &as_a, &p).expect_err("B as A");
            assert!(e.to_string().contains("not A"), "{e}");
            let e = blas.gemm(ctx, &as_a).expect_err("no packing");
            assert!(e.to_string().contains("PACKED_A"), "{e}");
        });
    }
}

/// bf16 against f32 throughput on BERT-base's and ResNet-50's products, B pre-packed:
/// a diagnostic (`cargo test --release -p opreg-plugin-blas-cpu -- --ignored --nocapture
/// bf16_throughput`), not a test.
#[test]
#[ignore]
fn bf16_throughput() {
    let shapes = [
        (128, 768, 768),
        (128, 3072, 768),
        (128, 768, 3072),
        (3136, 64, 576),
        (49, 512, 4608),
        (512, 512, 512),
    ];
    let blas = into_ffi_blas(CpuBlas::detect());
    for &(m, n, k) in &shapes {
        let a = values(m * k, 1);
        let b = values(k * n, 2);
        let af: Vec<f32> = a.iter().map(|&x| f(x)).collect();
        let bfl: Vec<f32> = b.iter().map(|&x| f(x)).collect();
        let mut c = vec![0f32; m * n];
        let mut g = GemmArgs::new(
            GemmTypes {
                a: DType::BF16,
                b: DType::BF16,
                c: DType::F32,
            },
            m,
            n,
            k,
        );
        (g.a, g.b, g.c) = (a.as_ptr().cast(), b.as_ptr().cast(), c.as_mut_ptr().cast());
        let mut g32 = GemmArgs::new(GemmTypes::F32, m, n, k);
        (g32.a, g32.b, g32.c) = (
            af.as_ptr().cast(),
            bfl.as_ptr().cast(),
            c.as_mut_ptr().cast(),
        );
        let mut best = [f64::MAX; 2];
        let log = |_: LogLevel, _: &str| {};
        let frame = CallFrame::new(0, Device::CPU, Some(&blas), &log);
        frame.with_context(|ctx| {
            let blas = ctx.blas().expect("blas");
            for (slot, args) in [&g32, &g].into_iter().enumerate() {
                let p = blas.pack_b(ctx, args).expect("pack");
                for _ in 0..20 {
                    let t = std::time::Instant::now();
                    blas.gemm_packed(ctx, args, &p).expect("gemm");
                    best[slot] = best[slot].min(t.elapsed().as_secs_f64());
                }
            }
        });
        let gf = |t: f64| 2.0 * (m * n * k) as f64 / t / 1e9;
        eprintln!(
            "{m}x{n}x{k}: f32 {:.1} GF/s, bf16 {:.1} GF/s ({:?}): bf16/f32 time {:.2}",
            gf(best[0]),
            gf(best[1]),
            Path::best(KernelKind::best()),
            best[1] / best[0]
        );
    }
}
