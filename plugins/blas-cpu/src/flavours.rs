//! Tests of the gemm API's v1 parts against plain references: batches with shared operands,
//! bias and activation epilogues, and the integer flavours (i32, dequantized f32, requantized
//! u8/i8; per-tensor and per-column B parameters; plain and pre-packed B).

use super::*;
use crate::epilogue::{activate, requantize};
use opreg_sdk::{blas::into_ffi_blas, host::CallFrame, LogLevel};

fn run(f: impl FnOnce(&KernelContext<'_>, opreg_sdk::blas::BlasRef<'_>)) {
    let blas = into_ffi_blas(CpuBlas::detect());
    let log = |_: LogLevel, _: &str| {};
    let frame = CallFrame::new(0, Device::CPU, Some(&blas), &log);
    frame.with_context(|ctx| f(ctx, ctx.blas().expect("blas")));
}

/// Deterministic bytes.
fn bytes(len: usize, seed: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 131 + seed * 71 + 17) % 251) as u8)
        .collect()
}

fn floats(len: usize, seed: usize) -> Vec<f32> {
    bytes(len, seed)
        .iter()
        .map(|&b| b as f32 / 64.0 - 2.0)
        .collect()
}

#[test]
fn batched_f32_with_shared_b_bias_and_activations() {
    let (batch, m, n, k) = (3, 5, 7, 9);
    let a = floats(batch * m * k, 1);
    let b = floats(k * n, 2);
    let bias = floats(n, 3);
    for epi in [Epilogue::NONE, Epilogue::RELU, Epilogue::GELU] {
        let mut c = vec![f32::NAN; batch * m * n];
        let mut g = GemmArgs::new(GemmTypes::F32, m, n, k);
        g.batch = batch;
        (g.a, g.stride_a) = (a.as_ptr().cast(), m * k);
        (g.b, g.stride_b) = (b.as_ptr().cast(), 0);
        (g.c, g.stride_c) = (c.as_mut_ptr().cast(), m * n);
        g.bias = bias.as_ptr().cast();
        g.epilogue = epi;
        run(|ctx, blas| {
            assert!(blas.supports(&g));
            blas.gemm(ctx, &g).expect("gemm");
        });
        for p in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    let dot: f64 = (0..k)
                        .map(|q| a[p * m * k + i * k + q] as f64 * b[q * n + j] as f64)
                        .sum();
                    let want = activate(epi, dot as f32 + bias[j]);
                    let got = c[p * m * n + i * n + j];
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "epilogue {} batch {p} ({i},{j}): {got} vs {want}",
                        epi.0
                    );
                }
            }
        }
    }
}

/// The integer product with zero points, exact.
#[allow(clippy::too_many_arguments)]
fn acc(
    a: &[u8],
    sa: bool,
    za: i32,
    b: &[u8],
    sb: bool,
    zb: &[i32],
    m: usize,
    n: usize,
    k: usize,
    tb: bool,
) -> Vec<i32> {
    let v = |x: u8, signed: bool| if signed { x as i8 as i32 } else { x as i32 };
    (0..m * n)
        .map(|e| {
            let (i, j) = (e / n, e % n);
            let z = zb[j.min(zb.len() - 1)];
            (0..k)
                .map(|q| {
                    let bv = if tb { b[j * k + q] } else { b[q * n + j] };
                    (v(a[i * k + q], sa) - za) * (v(bv, sb) - z)
                })
                .sum()
        })
        .collect()
}

/// An integer gemm of `types` over row-major A (`m x k`, zero point `za`) and B (`k x n`, or
/// `n x k` when `trans_b`; zero points `zb`), C to be set by the caller.
fn int_args(
    types: GemmTypes,
    (m, n, k): (usize, usize, usize),
    (a, za): (&[u8], i32),
    (b, zb): (&[u8], &[i32]),
    trans_b: bool,
) -> GemmArgs {
    let mut g = GemmArgs::new(types, m, n, k);
    g.a = a.as_ptr();
    g.b = b.as_ptr();
    if trans_b {
        g.trans_b = Transpose::YES;
        g.ldb = k;
    }
    g.a_zero_point = za;
    g.b_zero_points = zb.as_ptr();
    g.b_quant_len = zb.len();
    g
}

#[test]
fn integer_flavours_match_the_reference() {
    let (m, n, k) = (9, 13, 21);
    let cases = [
        (DType::U8, DType::I8, DType::I32),
        (DType::U8, DType::U8, DType::I32),
        (DType::I8, DType::I8, DType::I32),
        (DType::I8, DType::U8, DType::I32),
        (DType::U8, DType::I8, DType::F32),
        (DType::U8, DType::I8, DType::U8),
        (DType::I8, DType::I8, DType::I8),
    ];
    let a = bytes(m * k, 4);
    let b = bytes(k * n, 5);
    let bias = floats(n, 6);
    for (ta, tb_type, tc) in cases {
        let (sa, sb) = (ta == DType::I8, tb_type == DType::I8);
        let za = if sa { -7 } else { 128 };
        for per_column in [false, true] {
            for trans_b in [false, true] {
                for packed in [false, true] {
                    let zb: Vec<i32> = if per_column {
                        (0..n as i32)
                            .map(|j| if sb { j - 6 } else { j * 9 })
                            .collect()
                    } else {
                        vec![if sb { 3 } else { 250 }]
                    };
                    let scales: Vec<f32> = (0..zb.len()).map(|j| 0.01 + j as f32 * 0.003).collect();
                    let want_acc = acc(&a, sa, za, &b, sb, &zb, m, n, k, trans_b);
                    let types = GemmTypes {
                        a: ta,
                        b: tb_type,
                        c: tc,
                    };
                    let mut g = int_args(types, (m, n, k), (&a, za), (&b, &zb), trans_b);
                    g.a_scale = 0.5;
                    g.b_scales = scales.as_ptr();
                    g.c_scale = 0.25;
                    g.c_zero_point = if tc == DType::U8 { 100 } else { -5 };
                    if tc != DType::I32 {
                        g.bias = bias.as_ptr().cast();
                        g.epilogue = Epilogue::RELU;
                    }
                    let mut c = vec![0u8; m * n * 4];
                    g.c = c.as_mut_ptr();
                    run(|ctx, blas| {
                        assert!(blas.supports(&g), "{}", g.types);
                        if packed {
                            let p = blas.pack_b(ctx, &g).expect("pack");
                            blas.gemm_packed(ctx, &g, &p).expect("gemm packed");
                        } else {
                            blas.gemm(ctx, &g).expect("gemm");
                        }
                    });
                    for (e, &acc) in want_acc.iter().enumerate() {
                        let j = e % n;
                        let s = scales[j.min(scales.len() - 1)];
                        let y = activate(
                            g.epilogue,
                            acc as f32 * (g.a_scale * s)
                                + if g.bias.is_null() { 0.0 } else { bias[j] },
                        );
                        let case = format!("{} per_column {per_column} trans_b {trans_b} packed {packed} element {e}", g.types);
                        match tc {
                            DType::I32 => {
                                let got =
                                    i32::from_le_bytes(c[4 * e..4 * e + 4].try_into().unwrap());
                                assert_eq!(got, acc, "{case}");
                            }
                            DType::F32 => {
                                let got =
                                    f32::from_le_bytes(c[4 * e..4 * e + 4].try_into().unwrap());
                                assert!(
                                    (got - y).abs() <= 1e-5 * (1.0 + y.abs()),
                                    "{case}: {got} vs {y}"
                                );
                            }
                            DType::U8 => {
                                assert_eq!(c[e] as i32, requantize(y, 4.0, 100, 0, 255), "{case}")
                            }
                            _ => assert_eq!(
                                c[e] as i8 as i32,
                                requantize(y, 4.0, -5, -128, 127),
                                "{case}"
                            ),
                        }
                    }
                }
            }
        }
    }
}

/// `GemmArgs::REQUANT_MULTIPLIER` through the registered backend: exactly `requant_byte` of
/// the exact sum plus the i32 bias, per column multipliers, u8 and i8 results, B plain or
/// transposed, per tensor or per column zero points, and B packed for an i32 C (the flag's
/// contract) or not packed at all.
#[test]
fn requantization_by_multipliers_matches_requant_byte() {
    let (m, n, k) = (19, 37, 45);
    let a = bytes(m * k, 8);
    let b = bytes(k * n, 9);
    let bias: Vec<i32> = (0..n as i32).map(|j| j * 97 - 1800).collect();
    let mult: Vec<f32> = (0..n).map(|j| 0.0005 + j as f32 * 0.0001).collect();
    for (ta, tb, tc) in [
        (DType::U8, DType::I8, DType::U8),
        (DType::I8, DType::U8, DType::I8),
    ] {
        let (sa, sb) = (ta == DType::I8, tb == DType::I8);
        let za = if sa { 5 } else { 131 };
        for (per_column, trans_b, packed) in (0..8).map(|v| (v & 1 != 0, v & 2 != 0, v & 4 != 0)) {
            let zb: Vec<i32> = if per_column {
                (0..n as i32)
                    .map(|j| if sb { j - 20 } else { j * 5 })
                    .collect()
            } else {
                vec![if sb { 0 } else { 128 }]
            };
            let want_acc = acc(&a, sa, za, &b, sb, &zb, m, n, k, trans_b);
            let types = GemmTypes {
                a: ta,
                b: tb,
                c: DType::I32,
            };
            let g = int_args(types, (m, n, k), (&a, za), (&b, &zb), trans_b);
            let mut c = vec![0u8; m * n];
            run(|ctx, blas| {
                // Packed for i32 sums, as an operator packs its weights at load.
                let p = packed.then(|| blas.pack_b(ctx, &g).expect("pack"));
                let mut r = g;
                r.types.c = tc;
                r.flags = GemmArgs::REQUANT_MULTIPLIER;
                r.b_scales = mult.as_ptr();
                r.bias = bias.as_ptr().cast();
                r.c_zero_point = if tc == DType::U8 { 120 } else { -3 };
                r.c = c.as_mut_ptr();
                assert!(blas.supports(&r));
                match &p {
                    Some(p) => blas.gemm_packed(ctx, &r, p).expect("gemm packed"),
                    None => blas.gemm(ctx, &r).expect("gemm"),
                }
            });
            let (zp, lo, hi) = if tc == DType::U8 {
                (120, 0, 255)
            } else {
                (-3, -128, 127)
            };
            for (e, &s) in want_acc.iter().enumerate() {
                let j = e % n;
                let want = opreg_sdk::numeric::requant_byte(
                    s + bias[j],
                    mult[j],
                    zp,
                    (lo - zp) as f32,
                    (hi - zp) as f32,
                );
                assert_eq!(
                    c[e], want,
                    "{ta}x{tb}->{tc} per_column {per_column} trans_b {trans_b} packed {packed} element {e}"
                );
            }
        }
    }
}

#[test]
fn supports_refuses_what_it_cannot_run() {
    let mut g = GemmArgs::new(GemmTypes::F32, 2, 2, 2);
    run(|_, blas| {
        assert!(blas.supports(&g));
        g.flags = 8;
        assert!(!blas.supports(&g), "unknown flag bits");
        g.flags = GemmArgs::PACKED_A | 8;
        assert!(!blas.supports(&g), "a known bit beside an unknown one");
        g.flags = GemmArgs::REQUANT_MULTIPLIER;
        assert!(!blas.supports(&g), "requantization of an f32 gemm");
        g.flags = GemmArgs::PACKED_A | GemmArgs::BIAS_PER_ROW;
        assert!(blas.supports(&g), "both known f32 bits");
        g.flags = 0;
        g.epilogue = Epilogue(77);
        assert!(!blas.supports(&g), "unknown epilogue");
        g.epilogue = Epilogue::NONE;
        g.types = GemmTypes {
            a: DType::U8,
            b: DType::I8,
            c: DType::I32,
        };
        g.compute = DType::I32;
        assert!(blas.supports(&g));
        g.flags = GemmArgs::BIAS_PER_ROW;
        assert!(!blas.supports(&g), "a bias per row of an integer gemm");
        g.flags = 0;
        g.layout = Layout::COL_MAJOR;
        assert!(!blas.supports(&g), "integer column-major");
        g.layout = Layout::ROW_MAJOR;
        g.b_quant_len = 3;
        assert!(!blas.supports(&g), "3 zero points for 2 columns");
        g.b_quant_len = 1;
        g.types.c = DType::F16;
        assert!(!blas.supports(&g), "f16 result of an integer gemm");
        g.flags = GemmArgs::REQUANT_MULTIPLIER;
        assert!(!blas.supports(&g), "an f16 result by multipliers");
        g.types.c = DType::I32;
        assert!(!blas.supports(&g), "i32 sums by multipliers");
        g.types.c = DType::U8;
        assert!(blas.supports(&g), "u8 by multipliers");
        g.c_zero_point = 256;
        assert!(!blas.supports(&g), "a u8 zero point of 256");
        g.types.c = DType::I8;
        g.c_zero_point = -128;
        assert!(blas.supports(&g), "i8 by multipliers");
        g.epilogue = Epilogue::RELU;
        assert!(!blas.supports(&g), "an activation with multipliers");
        g.epilogue = Epilogue::NONE;
        g.flags |= GemmArgs::PACKED_A;
        assert!(!blas.supports(&g), "multipliers with a packed A");
    });
}

#[test]
fn unsupported_arguments_fail_with_unimplemented() {
    let a = [1.0f32; 4];
    let mut c = [0.0f32; 4];
    let mut g = GemmArgs::f32(2, 2, 2, &a, &a, &mut c).expect("args");
    g.epilogue = Epilogue(99);
    run(|ctx, blas| {
        let e = blas.gemm(ctx, &g).expect_err("unknown epilogue");
        assert_eq!(e.code, ErrorCode::Unimplemented, "{e:?}");
    });
}

/// A u8 x i8 -> i32 product `C (m x n) = A (m x k) * B^T` (B stored `n x k`) with zero points
/// `zb` for B (one, or one per column).
fn u8_i8_args(
    (m, n, k): (usize, usize, usize),
    a: &[u8],
    b: &[u8],
    zb: &[i32],
    c: &mut [i32],
) -> GemmArgs {
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
    g.lda = k;
    g.b = b.as_ptr();
    g.ldb = k;
    g.trans_b = Transpose::YES;
    g.b_zero_points = zb.as_ptr();
    g.b_quant_len = zb.len();
    g.c = c.as_mut_ptr().cast();
    g.ldc = n;
    g
}

/// Throughput of the integer and float paths on a ResNet-50 1x1 convolution's product
/// (3136 x 256 x 64): a diagnostic, not a test (`--ignored --nocapture`, release).
#[test]
#[ignore]
fn int8_and_f32_throughput_on_a_pointwise_conv_shape() {
    let (m, n, k) = (3136usize, 256usize, 64usize);
    let a = bytes(m * k, 1);
    let b = bytes(n * k, 2);
    let af = floats(m * k, 1);
    let bf = floats(n * k, 2);
    let mut c = vec![0i32; m * n];
    let mut cf = vec![0f32; m * n];
    let zb = [0i32];
    let zbn = vec![0i32; n];
    run(|ctx, blas| {
        let g = u8_i8_args((m, n, k), &a, &b, &zb, &mut c);
        let mut gf = GemmArgs::new(GemmTypes::F32, m, n, k);
        gf.a = af.as_ptr().cast();
        gf.lda = k;
        gf.b = bf.as_ptr().cast();
        gf.ldb = k;
        gf.trans_b = Transpose::YES;
        gf.c = cf.as_mut_ptr().cast();
        gf.ldc = n;
        let mut gz = g;
        gz.b_zero_points = zbn.as_ptr();
        gz.b_quant_len = n;
        for (name, args) in [
            ("u8 x i8", &g),
            ("u8 x i8, zero point per column", &gz),
            ("f32", &gf),
        ] {
            blas.gemm(ctx, args).expect("gemm");
            let runs = 20;
            let t = std::time::Instant::now();
            for _ in 0..runs {
                blas.gemm(ctx, args).expect("gemm");
            }
            let s = t.elapsed().as_secs_f64() / runs as f64;
            println!(
                "{name}: {:.3} ms, {:.1} GMAC/s",
                s * 1e3,
                (m * n * k) as f64 / s / 1e9
            );
        }
    });
}

/// Throughput of the integer path on the products of ResNet-50's convolutions (im2col:
/// positions x output channels x C * taps), B pre-packed as for constant weights, one thread
/// (the call's context runs on the calling thread): a diagnostic for tuning the int8 tiles,
/// not a test (`--ignored --nocapture`, release).
#[test]
#[ignore]
fn int8_throughput_on_resnet50_conv_products() {
    let shapes = [
        (12544usize, 64usize, 147usize),
        (3136, 64, 256),
        (3136, 64, 576),
        (3136, 256, 64),
        (784, 128, 1152),
        (784, 512, 128),
        (196, 256, 2304),
        (196, 1024, 256),
        (49, 512, 4608),
        (49, 2048, 512),
    ];
    run(|ctx, blas| {
        // B's zero point 3: A is packed (with row sums); 0 (symmetric weights): read in place.
        for zb in [3, 0] {
            println!("B zero point {zb}:");
            let mut total = (0.0, 0.0);
            for (m, n, k) in shapes {
                let a = bytes(m * k, 1);
                let b = bytes(n * k, 2);
                let mut c = vec![0i32; m * n];
                let zbn = vec![zb; n];
                let mut g = u8_i8_args((m, n, k), &a, &b, &zbn, &mut c);
                g.a_zero_point = 100;
                let packed = blas.pack_b(ctx, &g).expect("pack");
                blas.gemm_packed(ctx, &g, &packed).expect("gemm");
                let runs = (2e9 / (m * n * k) as f64).ceil() as usize;
                let t = std::time::Instant::now();
                for _ in 0..runs {
                    blas.gemm_packed(ctx, &g, &packed).expect("gemm");
                }
                let s = t.elapsed().as_secs_f64() / runs as f64;
                total.0 += s;
                total.1 += (m * n * k) as f64;
                println!(
                    "{m:>6} x {n:>5} x {k:>5}: {:.3} ms, {:.1} GMAC/s",
                    s * 1e3,
                    (m * n * k) as f64 / s / 1e9
                );
            }
            println!("all: {:.1} GMAC/s", total.1 / total.0 / 1e9);
        }
    });
}
