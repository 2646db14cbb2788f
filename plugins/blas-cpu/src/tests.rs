//! Correctness against a naive f64 product, for every kernel this CPU has.

use super::*;
use crate::gemm::{depth_block, split};
use crate::kernels::MicroKernel;
use opreg_sdk::{
    blas::{into_ffi_blas, FfiBlasBox},
    host::CallFrame,
    LogLevel,
};

/// Deterministic values in [-1, 1).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A matrix `op(X)` of `rows x cols` stored per layout and transpose with `pad` extra
/// elements per leading dimension.
struct Stored {
    data: Vec<f32>,
    ld: usize,
    layout: Layout,
    trans: Transpose,
}

impl Stored {
    fn new(
        layout: Layout,
        trans: Transpose,
        rows: usize,
        cols: usize,
        pad: usize,
        seed: u64,
    ) -> Self {
        let (sr, sc) = if trans == Transpose::YES {
            (cols, rows)
        } else {
            (rows, cols)
        };
        let (ld, outer) = if layout == Layout::COL_MAJOR {
            (sr + pad, sc)
        } else {
            (sc + pad, sr)
        };
        Stored {
            data: values(ld * outer.max(1), seed),
            ld,
            layout,
            trans,
        }
    }

    /// Index of `op(X)(i, j)`.
    fn at(&self, i: usize, j: usize) -> usize {
        let (r, c) = if self.trans == Transpose::YES {
            (j, i)
        } else {
            (i, j)
        };
        if self.layout == Layout::COL_MAJOR {
            r + c * self.ld
        } else {
            r * self.ld + c
        }
    }
}

fn frame_run<R>(blas: &FfiBlasBox, f: impl FnOnce(&KernelContext<'_>) -> R) -> R {
    let log = |_: LogLevel, _: &str| {};
    let frame = CallFrame::new(0, Device::CPU, Some(blas), &log);
    frame.with_context(f)
}

#[derive(Clone, Copy, Debug)]
struct Case {
    layout: Layout,
    ta: Transpose,
    tb: Transpose,
    m: usize,
    n: usize,
    k: usize,
    pad: usize,
    alpha: f32,
    beta: f32,
    packed: bool,
    /// The activation, and a bias along C's rows or columns.
    epi: Epilogue,
    bias: BiasOn,
}

/// Where a case's bias lies.
#[derive(Clone, Copy, Debug, PartialEq)]
enum BiasOn {
    None,
    Rows,
    Cols,
}

const SENTINEL: f32 = 12345.0;

/// Runs one case with kernel `kind` and checks every element of C (and that C's padding is
/// untouched); a packed row-major case runs once with B packed and once with A packed.
fn check(kind: KernelKind, case: Case) {
    check_with(kind, case, false);
    if case.packed && case.layout == Layout::ROW_MAJOR {
        check_with(kind, case, true);
    }
}

/// [`check`], with the packed operand A when `pack_a`.
fn check_with(kind: KernelKind, case: Case, pack_a: bool) {
    let Case {
        layout,
        ta,
        tb,
        m,
        n,
        k,
        pad,
        alpha,
        beta,
        packed,
        epi,
        bias,
    } = case;
    let seed = (m * 1_000_003 + n * 1009 + k) as u64;
    let a = Stored::new(layout, ta, m, k, pad, seed);
    let b = Stored::new(layout, tb, k, n, pad + 1, seed + 1);
    let mut c = Stored::new(layout, Transpose::NO, m, n, pad, seed + 2);
    // Padding holds a sentinel; with beta == 0, the matrix itself holds NaN.
    let mut in_c = vec![false; c.data.len()];
    for i in 0..m {
        for j in 0..n {
            in_c[c.at(i, j)] = true;
        }
    }
    for (v, inside) in c.data.iter_mut().zip(&in_c) {
        if !inside {
            *v = SENTINEL;
        } else if beta == 0.0 {
            *v = f32::NAN;
        }
    }
    let c0 = c.data.clone();
    let bias_values = match bias {
        BiasOn::None => Vec::new(),
        BiasOn::Rows => values(m, seed + 3),
        BiasOn::Cols => values(n, seed + 3),
    };
    let mut args = GemmArgs::new(GemmTypes::F32, m, n, k);
    args.epilogue = epi;
    if bias != BiasOn::None {
        args.bias = bias_values.as_ptr().cast();
    }
    if bias == BiasOn::Rows {
        args.flags |= GemmArgs::BIAS_PER_ROW;
    }
    args.layout = layout;
    args.trans_a = ta;
    args.trans_b = tb;
    args.alpha = alpha;
    args.beta = beta;
    args.a = a.data.as_ptr().cast();
    args.lda = a.ld;
    args.b = b.data.as_ptr().cast();
    args.ldb = b.ld;
    args.c = c.data.as_mut_ptr().cast();
    args.ldc = c.ld;
    let blas = into_ffi_blas(CpuBlas::with_kernel(kind));
    frame_run(&blas, |ctx| {
        let blas = ctx.blas().expect("blas");
        if packed {
            let mut args = args;
            if pack_a {
                args.flags |= GemmArgs::PACKED_A;
                assert!(blas.supports(&args));
            }
            let pb = blas.pack_b(ctx, &args).expect("pack");
            if pack_a {
                // A is read from the handle only.
                args.a = std::ptr::null();
            }
            blas.gemm_packed(ctx, &args, &pb)
        } else {
            blas.gemm(ctx, &args)
        }
    })
    .unwrap_or_else(|e| panic!("{kind:?} {case:?}: {e:?}"));
    for i in 0..m {
        for j in 0..n {
            let (mut sum, mut mag) = (0f64, 0f64);
            for p in 0..k {
                let x = a.data[a.at(i, p)] as f64 * b.data[b.at(p, j)] as f64;
                sum += x;
                mag += x.abs();
            }
            let old = c0[c.at(i, j)] as f64;
            let (want, scale) = if beta == 0.0 {
                (alpha as f64 * sum, (alpha as f64 * mag).abs())
            } else {
                (
                    alpha as f64 * sum + beta as f64 * old,
                    (alpha as f64 * mag).abs() + (beta as f64 * old).abs(),
                )
            };
            let b = match bias {
                BiasOn::None => 0.0,
                BiasOn::Rows => bias_values[i] as f64,
                BiasOn::Cols => bias_values[j] as f64,
            };
            // The activations' slopes are within [-0.2, 1.2]; their f32 formulas add a few ulp.
            let want = epilogue::activate(epi, (want + b) as f32) as f64;
            let got = c.data[c.at(i, j)] as f64;
            assert!(
                (got - want).abs() <= 1.2e-5 * (scale + b.abs()).max(1e-30) + 4e-7 * want.abs(),
                "{kind:?} {case:?}: C[{i},{j}] = {got}, want {want}"
            );
        }
    }
    for (idx, inside) in in_c.iter().enumerate() {
        if !inside {
            assert_eq!(
                c.data[idx], SENTINEL,
                "{kind:?} {case:?}: padding {idx} written"
            );
        }
    }
}

fn kernels() -> Vec<KernelKind> {
    let ks: Vec<_> = KernelKind::ALL
        .into_iter()
        .filter(|k| k.available())
        .collect();
    eprintln!(
        "kernels on this CPU: {ks:?} (best {:?})",
        KernelKind::best()
    );
    ks
}

const LAYOUTS: [Layout; 2] = [Layout::ROW_MAJOR, Layout::COL_MAJOR];
const TRANS: [Transpose; 2] = [Transpose::NO, Transpose::YES];
/// (alpha, beta): overwrite (C holds NaN), accumulate, general.
const SCALES: [(f32, f32); 3] = [(1.0, 0.0), (1.0, 1.0), (-1.5, 0.5)];

fn sweep(shapes: &[(usize, usize, usize)], scales: &[(f32, f32)], pads: &[usize]) {
    for kind in kernels() {
        for &(m, n, k) in shapes {
            for layout in LAYOUTS {
                for ta in TRANS {
                    for tb in TRANS {
                        for &(alpha, beta) in scales {
                            for &pad in pads {
                                for packed in [false, true] {
                                    check(
                                        kind,
                                        Case {
                                            layout,
                                            ta,
                                            tb,
                                            m,
                                            n,
                                            k,
                                            pad,
                                            alpha,
                                            beta,
                                            packed,
                                            epi: Epilogue::NONE,
                                            bias: BiasOn::None,
                                        },
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn small_and_odd_shapes_all_layouts_transposes_and_scales() {
    let shapes = [
        (1, 1, 1),
        (7, 13, 5),
        (33, 65, 17),
        (150, 70, 33),
        (1, 50, 40),
        (17, 1, 30),
        (9, 33, 1),
        (6, 16, 8),
        (8, 32, 8),
        // Tiles of 2, 3 and 4 rows (the kernels of fewer rows), across a depth block.
        (2, 40, 19),
        (3, 70, 33),
        (4, 33, 300),
    ];
    sweep(&shapes, &SCALES, &[0, 3]);
}

#[test]
fn block_boundaries_in_every_loop() {
    // Crosses MC (rows), KC (depth, with a balanced last block) and NC (columns) for every
    // kernel, in parallel; B packed per task (few row blocks) and shared (200x230).
    sweep(
        &[(200, 45, 600), (5, 4200, 7), (200, 230, 20)],
        &[(1.0, 0.0), (-1.5, 0.5)],
        &[2],
    );
}

#[test]
fn conv_like_and_tall_shapes() {
    for kind in kernels() {
        for (m, n, k) in [(64, 3136, 576), (3136, 64, 576)] {
            for (layout, ta, tb, packed) in [
                (Layout::ROW_MAJOR, Transpose::NO, Transpose::NO, false),
                (Layout::ROW_MAJOR, Transpose::NO, Transpose::YES, true),
                (Layout::COL_MAJOR, Transpose::YES, Transpose::NO, false),
            ] {
                let case = Case {
                    layout,
                    ta,
                    tb,
                    m,
                    n,
                    k,
                    pad: 1,
                    alpha: 1.0,
                    beta: 0.0,
                    packed,
                    epi: Epilogue::NONE,
                    bias: BiasOn::None,
                };
                check(kind, case);
            }
        }
    }
}

/// Products of few rows with B packed and several depth blocks (`one_row_block`: a 7x7
/// layer's 49 positions), A read in place or packed: every row count up to the limit, so
/// that every balanced tile height and every split of the rows into parts is met, with
/// panel counts that do and do not share out over two threads.
#[test]
fn few_rows_packed_b_every_height_and_part() {
    for kind in kernels() {
        for m in (1..=64).filter(|m| m % 4 != 0 || *m == 64 || *m == 8) {
            for n in [16, 160, 200] {
                let case = Case {
                    layout: Layout::ROW_MAJOR,
                    ta: Transpose::NO,
                    tb: Transpose::NO,
                    m,
                    n,
                    k: 300,
                    pad: 1,
                    alpha: 1.0,
                    beta: 0.0,
                    packed: true,
                    epi: Epilogue::RELU,
                    bias: BiasOn::Cols,
                };
                check(kind, case);
            }
        }
    }
}

#[test]
fn row_tiles_cover_each_row_once_and_balance_in_place() {
    for mr in [6, 8] {
        for rows in 0..=200 {
            for balanced in [false, true] {
                let tiles: Vec<_> = crate::gemm::row_tiles(rows, mr, balanced).collect();
                assert_eq!(tiles.len(), rows.div_ceil(mr), "{rows} rows, mr {mr}");
                let mut next = 0;
                for &(first, len) in &tiles {
                    assert_eq!(first, next, "{rows} rows, mr {mr}, {balanced}: {tiles:?}");
                    assert!((1..=mr).contains(&len), "{rows} rows: {tiles:?}");
                    next += len;
                }
                assert_eq!(next, rows);
                let (lo, hi) = tiles
                    .iter()
                    .fold((usize::MAX, 0), |(lo, hi), t| (lo.min(t.1), hi.max(t.1)));
                if balanced && rows > 0 {
                    assert!(hi - lo <= 1, "{rows} rows, mr {mr}: {tiles:?}");
                } else if !balanced && rows > 0 {
                    // Packed panels: full tiles but the last.
                    assert!(tiles[..tiles.len() - 1].iter().all(|t| t.1 == mr));
                }
            }
        }
    }
    // 49 rows: 7 x 7 with 8-row tiles, 4 x 6 + 5 x 5 with 6-row ones.
    let heights = |mr| {
        crate::gemm::row_tiles(49, mr, true)
            .map(|t| t.1)
            .collect::<Vec<_>>()
    };
    assert_eq!(heights(8), vec![7; 7]);
    assert_eq!(heights(6), vec![6, 6, 6, 6, 5, 5, 5, 5, 5]);
}

#[test]
fn row_parts_even_out_the_units() {
    use crate::gemm::row_parts;
    // 5 panels on 2 threads: halves of the rows, 10 units.
    assert_eq!(row_parts(5, 7, 2), 2);
    // Even already, or many panels: whole rows.
    assert_eq!(row_parts(4, 7, 2), 1);
    assert_eq!(row_parts(9, 7, 2), 1);
    assert_eq!(row_parts(5, 7, 1), 1);
    // 5 panels on 4 threads: quarters; never more parts than tiles.
    assert_eq!(row_parts(5, 7, 4), 4);
    assert_eq!(row_parts(5, 1, 4), 1);
    assert_eq!(row_parts(3, 2, 4), 2);
}

#[test]
fn bias_and_activation_in_the_tiles() {
    // Edge tiles, several depth blocks (the epilogue must follow the last one only), column
    // blocks, every layout, B packed, A packed and neither; a bias per row and per column.
    let epis = [
        Epilogue::NONE,
        Epilogue::RELU,
        Epilogue::RELU6,
        Epilogue::SILU,
        Epilogue::GELU,
    ];
    for kind in kernels() {
        // (5 x 70 x 600 with B packed: the few-rows loop, its depth blocks on one tile;
        // 49 x 70 x 600 and 200 x 70 x 600 (two row blocks): each task takes every depth
        // block in turn, in one parallel loop, B packed at load or by the task.)
        for (m, n, k) in [
            (13, 37, 600),
            (9, 4150, 5),
            (70, 33, 40),
            (5, 70, 600),
            (49, 70, 600),
            (200, 70, 600),
        ] {
            for layout in LAYOUTS {
                for (i, &epi) in epis.iter().enumerate() {
                    for bias in [BiasOn::None, BiasOn::Rows, BiasOn::Cols] {
                        let (alpha, beta) = SCALES[i % 3];
                        let case = Case {
                            layout,
                            ta: TRANS[i % 2],
                            tb: TRANS[(i / 2) % 2],
                            m,
                            n,
                            k,
                            pad: 1,
                            // Values that reach past 6 and below 0 for ReLU6.
                            alpha: alpha * 8.0,
                            beta,
                            packed: (i + m) % 2 == 0 || m == 5 || m == 49 || bias == BiasOn::Rows,
                            epi,
                            bias,
                        };
                        check(kind, case);
                    }
                }
            }
        }
    }
}

#[test]
fn the_activations_formulas() {
    use epilogue::activate;
    let silu = |x: f32| x / (1.0 + (-x).exp());
    for x in [-9.0f32, -1.5, -0.1, 0.0, 0.3, 2.0, 7.5] {
        assert!((activate(Epilogue::SILU, x) - silu(x)).abs() <= 1e-6 * (1.0 + x.abs()));
        assert_eq!(activate(Epilogue::RELU6, x), x.clamp(0.0, 6.0));
        assert_eq!(activate(Epilogue::RELU, x), x.max(0.0));
    }
    assert!(activate(Epilogue::RELU6, f32::NAN).is_nan());
    // GELU(1) = Φ(1) = 0.841344746...
    assert!((activate(Epilogue::GELU, 1.0) - 0.841_344_7).abs() < 1e-6);
    assert_eq!(activate(Epilogue(77), 1.5), 1.5);
}

#[test]
fn empty_depth_and_zero_alpha_scale_c() {
    for kind in kernels() {
        for layout in LAYOUTS {
            for (k, alpha) in [(0, 1.0), (5, 0.0)] {
                for beta in [0.0, 2.0] {
                    for (epi, bias) in [
                        (Epilogue::NONE, BiasOn::None),
                        (Epilogue::RELU6, BiasOn::Rows),
                        (Epilogue::SILU, BiasOn::Cols),
                    ] {
                        let case = Case {
                            layout,
                            ta: Transpose::NO,
                            tb: Transpose::YES,
                            m: 5,
                            n: 6,
                            k,
                            pad: 1,
                            alpha,
                            beta,
                            packed: false,
                            epi,
                            bias,
                        };
                        check(kind, case);
                    }
                }
            }
        }
    }
}

#[test]
fn matches_naive_product_through_the_registered_backend() {
    use opreg_sdk::blas::into_ffi_blas;
    let (m, n, k) = (150, 70, 33);
    let a = values(m * k, 1);
    let b = values(k * n, 2);
    let mut c = vec![f32::NAN; m * n];
    let args = GemmArgs::f32(m, n, k, &a, &b, &mut c).expect("args");
    let blas = into_ffi_blas(CpuBlas::detect());
    frame_run(&blas, |ctx| ctx.blas().expect("blas").gemm(ctx, &args)).expect("gemm");
    for i in 0..m {
        for j in 0..n {
            let want: f64 = (0..k)
                .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                .sum();
            assert!((c[i * n + j] as f64 - want).abs() < 1e-4, "C[{i},{j}]");
        }
    }
}

/// A 4x3 by 3x5 product and its packed B, for the error tests.
fn packed_fixture(kind: KernelKind) -> (Vec<f32>, Vec<f32>, PackedB) {
    let a = values(12, 3);
    let b = values(15, 4);
    let mut c = vec![0f32; 20];
    let args = GemmArgs::f32(4, 5, 3, &a, &b, &mut c).expect("args");
    let blas = into_ffi_blas(CpuBlas::with_kernel(kind));
    let pb = frame_run(&blas, |ctx| ctx.blas().expect("blas").pack_b(ctx, &args)).expect("pack");
    (a, b, pb)
}

fn gemm_packed_with(
    kind: KernelKind,
    k: usize,
    a: &[f32],
    b: &[f32],
    pb: &PackedB,
) -> Result<Vec<f32>, PluginError> {
    let mut c = vec![0f32; 20];
    let args = GemmArgs::f32(4, 5, k, a, b, &mut c)?;
    let blas = into_ffi_blas(CpuBlas::with_kernel(kind));
    frame_run(&blas, |ctx| {
        ctx.blas().expect("blas").gemm_packed(ctx, &args, pb)
    })?;
    Ok(c)
}

#[test]
fn packed_b_is_a_checked_handle() {
    let ks = kernels();
    for &kind in &ks {
        let (a, b, pb) = packed_fixture(kind);
        let info = pb.info();
        assert_eq!((info.k, info.n, info.types), (3, 5, GemmTypes::F32));
        assert_eq!(info.bytes % 4, 0);
        assert!(info.bytes >= 3 * 5 * 4, "{info:?}");
        let want = gemm_packed_with(kind, 3, &a, &b, &pb).expect("packed gemm");
        // The handle names its kernel: another instance of the backend uses it too.
        for &other in &ks {
            assert_eq!(
                gemm_packed_with(other, 3, &a, &b, &pb).expect("other"),
                want
            );
        }
        // Another depth than it was packed for.
        assert!(gemm_packed_with(kind, 2, &a, &b, &pb).is_err());
        // A handle some other backend made (its own type inside).
        let foreign = PackedB::new(7u32, info);
        let e = gemm_packed_with(kind, 3, &a, &b, &foreign).expect_err("foreign");
        assert!(e.message.contains("another backend"), "{e:?}");
    }
}

#[test]
fn packed_a_is_a_checked_handle() {
    let a = values(12, 3);
    let b = values(15, 4);
    for kind in kernels() {
        let blas = into_ffi_blas(CpuBlas::with_kernel(kind));
        let mut c = vec![0f32; 20];
        let mut args = GemmArgs::f32(4, 5, 3, &a, &b, &mut c).expect("args");
        let want = {
            let mut plain = vec![0f32; 20];
            let g = GemmArgs::f32(4, 5, 3, &a, &b, &mut plain).expect("args");
            frame_run(&blas, |ctx| ctx.blas().expect("blas").gemm(ctx, &g)).expect("gemm");
            plain
        };
        args.flags = GemmArgs::PACKED_A;
        let pa =
            frame_run(&blas, |ctx| ctx.blas().expect("blas").pack_b(ctx, &args)).expect("pack");
        let info = pa.info();
        assert_eq!((info.k, info.n, info.flags), (3, 4, GemmArgs::PACKED_A));
        frame_run(&blas, |ctx| {
            ctx.blas().expect("blas").gemm_packed(ctx, &args, &pa)
        })
        .expect("packed A");
        assert_eq!(c, want, "{kind:?}");
        // Used as a packed B (flag missing), with another depth, or without a handle.
        let mut no_flag = args;
        no_flag.flags = 0;
        let e = frame_run(&blas, |ctx| {
            ctx.blas().expect("blas").gemm_packed(ctx, &no_flag, &pa)
        })
        .expect_err("as B");
        assert!(e.message.contains("not B"), "{e:?}");
        let mut deeper = args;
        deeper.k = 2;
        assert!(frame_run(&blas, |ctx| ctx
            .blas()
            .expect("blas")
            .gemm_packed(ctx, &deeper, &pa))
        .is_err());
        assert!(frame_run(&blas, |ctx| ctx.blas().expect("blas").gemm(ctx, &args)).is_err());
        // Column-major and integer products do not take it.
        let mut col = args;
        col.layout = Layout::COL_MAJOR;
        let mut int = args;
        int.types = GemmTypes {
            a: DType::U8,
            b: DType::I8,
            c: DType::I32,
        };
        int.compute = DType::I32;
        frame_run(&blas, |ctx| {
            let blas = ctx.blas().expect("blas");
            assert!(!blas.supports(&col) && !blas.supports(&int));
        });
    }
}

#[test]
fn refuses_other_types_and_short_leading_dimensions() {
    let a = values(12, 3);
    let b = values(15, 4);
    let mut c = vec![0f32; 20];
    let mut args = GemmArgs::f32(4, 5, 3, &a, &b, &mut c).expect("args");
    let blas = into_ffi_blas(CpuBlas::detect());
    args.lda = 2;
    let e = frame_run(&blas, |ctx| ctx.blas().expect("blas").gemm(ctx, &args)).expect_err("lda");
    assert_eq!(e.code, ErrorCode::InvalidArgument, "{e:?}");
    args.lda = 3;
    args.types.a = DType::F16;
    let e = frame_run(&blas, |ctx| ctx.blas().expect("blas").gemm(ctx, &args)).expect_err("f16");
    assert_eq!(e.code, ErrorCode::Unimplemented, "{e:?}");
}

#[test]
fn detection_prefers_the_widest_kernel() {
    let best = KernelKind::best();
    assert!(best.available());
    assert_eq!(
        Some(best),
        KernelKind::ALL.into_iter().find(|k| k.available())
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        assert_eq!(best, KernelKind::Avx512);
    }
}

#[test]
fn depth_blocks_are_balanced() {
    assert_eq!(depth_block(576, 256), 192);
    assert_eq!(depth_block(1024, 256), 256);
    assert_eq!(depth_block(100, 256), 100);
    assert_eq!(depth_block(0, 256), 1);
    assert_eq!(depth_block(600, 256), 200);
}

/// Tasks a block is split into for 2 threads.
fn tasks<K: MicroKernel>(m: usize, n: usize, k: usize) -> usize {
    let (rows, _, _, cols) = split::<K>(m, n.min(K::NC), depth_block(k, K::KC), 2);
    rows * cols
}

#[test]
fn two_threads_get_work_on_square_conv_like_and_tall_shapes() {
    fn all<K: MicroKernel>() {
        for (m, n, k) in [
            (1024, 1024, 1024),
            (64, 3136, 576),
            (3136, 64, 576),
            (128, 128, 128),
            // A batch-1 fully connected layer: one row, streaming B.
            (1, 1000, 2048),
        ] {
            let t = tasks::<K>(m, n, k);
            assert!(t >= 2, "{m}x{n}x{k}: {t} tasks");
        }
        let (rows, mc, chunk, cols) = split::<K>(64, 3136, 192, 2);
        assert!(cols >= 4 && rows == 1 && mc >= 64 && chunk * cols * K::NR >= 3136);
        let panels = 3136usize.div_ceil(K::NR);
        let (rows, mc, chunk, cols) = split::<K>(64, 3136, 192, 1);
        assert_eq!((rows, chunk, cols), (1, panels, 1));
        assert!(mc >= 64 && mc < 64 + K::MR);
        // Few panels (48 columns: 32 + 16 with AVX-512), many rows: the rows split, one block
        // per thread, instead of the two unequal panels.
        if 48usize.div_ceil(K::NR) < 4 {
            let (rows, mc, _, cols) = split::<K>(169, 48, 256, 2);
            assert!(
                rows >= 2 && cols == 1 && rows * mc >= 169,
                "{rows} x {mc}, {cols}"
            );
        }
        // Balanced row blocks, each at most MC rows, covering all rows.
        let (rows, mc, _, _) = split::<K>(1024, 1024, 256, 2);
        assert!(mc <= K::MC && mc % K::MR == 0 && rows * mc >= 1024 && (rows - 1) * mc < 1024);
        assert!(1024 - (rows - 1) * mc >= mc / 2, "{rows} x {mc}");
    }
    all::<kernels::Portable>();
    #[cfg(target_arch = "x86_64")]
    {
        all::<kernels::Avx512>();
        all::<kernels::Avx2>();
    }
}

#[test]
fn op_strides() {
    // op(A) = A^T with A stored k x m.
    use crate::float::strides;
    assert_eq!(strides(Layout::ROW_MAJOR, Transpose::YES, 5), (1, 5));
    assert_eq!(strides(Layout::COL_MAJOR, Transpose::NO, 5), (1, 5));
    assert_eq!(strides(Layout::ROW_MAJOR, Transpose::NO, 5), (5, 1));
    assert_eq!(strides(Layout::COL_MAJOR, Transpose::YES, 5), (5, 1));
}

/// Throughput per kernel on the benchmark shapes (`cargo test --release -p
/// opreg-plugin-blas-cpu -- --ignored --nocapture throughput`).
#[test]
#[ignore]
fn throughput() {
    let shapes = [
        (128, 128, 128),
        (256, 256, 256),
        (512, 512, 512),
        (1024, 1024, 1024),
        (64, 3136, 576),
        (3136, 64, 576),
    ];
    // BLAS_SHAPES="m,n,k;m,n,k" replaces the shapes; BLAS_KERNEL=Avx2 picks one kernel.
    let custom: Vec<(usize, usize, usize)> = std::env::var("BLAS_SHAPES")
        .unwrap_or_default()
        .split(';')
        .filter_map(|s| {
            let v: Vec<usize> = s.split(',').filter_map(|x| x.trim().parse().ok()).collect();
            (v.len() == 3).then(|| (v[0], v[1], v[2]))
        })
        .collect();
    let shapes = if custom.is_empty() {
        shapes.to_vec()
    } else {
        custom
    };
    let only = std::env::var("BLAS_KERNEL").ok();
    for kind in kernels() {
        if only.as_ref().is_some_and(|o| *o != format!("{kind:?}")) {
            continue;
        }
        let blas = into_ffi_blas(CpuBlas::with_kernel(kind));
        for &(m, n, k) in &shapes {
            let a = values(m * k, 1);
            let b = values(k * n, 2);
            let mut c = vec![0f32; m * n];
            let args = GemmArgs::f32(m, n, k, &a, &b, &mut c).expect("args");
            let pb =
                frame_run(&blas, |ctx| ctx.blas().expect("blas").pack_b(ctx, &args)).expect("pack");
            let mut best = [f64::MAX; 2];
            for (slot, packed) in [false, true].into_iter().enumerate() {
                let start = std::time::Instant::now();
                let mut runs = 0;
                while runs < 5 || (start.elapsed().as_secs_f64() < 0.5 && runs < 200) {
                    let t = std::time::Instant::now();
                    frame_run(&blas, |ctx| {
                        let blas = ctx.blas().expect("blas");
                        if packed {
                            blas.gemm_packed(ctx, &args, &pb)
                        } else {
                            blas.gemm(ctx, &args)
                        }
                    })
                    .expect("gemm");
                    best[slot] = best[slot].min(t.elapsed().as_secs_f64());
                    runs += 1;
                }
            }
            let gf = |t: f64| 2.0 * (m * n * k) as f64 / t / 1e9;
            eprintln!(
                "{kind:?} {m}x{n}x{k}: {:.1} GF/s, packed B {:.1} GF/s",
                gf(best[0]),
                gf(best[1])
            );
        }
    }
}

/// `tile_b_rows` (B's steps `ldb` apart, not packed) against `tile` on the same panel packed:
/// the same bits for a kernel that reads rows in place, within rounding for the step-by-step
/// default of the others (which the driver never sends rows to, but which must still be right).
#[test]
fn tiles_read_b_rows_in_place_as_packed() {
    fn one<K: MicroKernel>(exact: bool) {
        let (kc, ldb) = (37, K::NR + 19);
        let a = values(kc * K::MR, 1);
        let b = values(kc * ldb, 2);
        let packed: Vec<f32> = (0..kc)
            .flat_map(|p| b[p * ldb..p * ldb + K::NR].iter().copied())
            .collect();
        let c0 = values(K::MR * K::NR, 3);
        for (alpha, beta) in SCALES {
            let (mut c1, mut c2) = (c0.clone(), c0.clone());
            // SAFETY: the CPU has the kernel (callers check); the panels and tiles are whole.
            unsafe {
                let (nr, mr) = (K::NR, K::MR);
                K::tile(
                    kc,
                    a.as_ptr(),
                    packed.as_ptr(),
                    c1.as_mut_ptr(),
                    nr,
                    1,
                    alpha,
                    beta,
                    mr,
                    nr,
                );
                K::tile_b_rows(
                    kc,
                    a.as_ptr(),
                    b.as_ptr(),
                    ldb,
                    c2.as_mut_ptr(),
                    nr,
                    1,
                    alpha,
                    beta,
                    mr,
                    nr,
                );
            }
            for (i, (x, y)) in c1.iter().zip(&c2).enumerate() {
                let ok = if exact {
                    x.to_bits() == y.to_bits()
                } else {
                    (x - y).abs() <= 1e-4 * (1.0 + x.abs())
                };
                assert!(ok, "{i}: {x} vs {y} (alpha {alpha}, beta {beta})");
            }
        }
    }
    one::<crate::kernels::Portable>(false);
    #[cfg(target_arch = "x86_64")]
    {
        if KernelKind::Avx2.available() {
            one::<crate::kernels::Avx2>(true);
        }
        if KernelKind::Avx512.available() {
            one::<crate::kernels::Avx512>(true);
        }
    }
}
