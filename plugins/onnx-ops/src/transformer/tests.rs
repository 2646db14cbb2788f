use super::*;
use crate::testcases::run_cases;

#[test]
fn conformance_attention() {
    run_cases(&["test_attention"], attention_factory);
}

#[test]
fn conformance_rms_normalization() {
    run_cases(&["test_rms_normalization"], rms_factory);
}

#[test]
fn conformance_rotary_embedding() {
    run_cases(&["test_rotary_embedding"], rotary_factory);
}

#[test]
fn conformance_lp_and_mvn() {
    run_cases(&["test_lpnormalization"], lp_factory);
    run_cases(&["test_mvn"], mvn_factory);
}

use opreg_sdk::{
    host::HostTensor,
    testkit::{run_kernel_opt, NodeSpec},
};

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 2000) as f32 / 1000.0 - 1.0
        })
        .collect()
}

/// softmax(Q K^T * scale + mask) V for 4-D (B, H, S, D) operands, kv heads shared by
/// groups of query heads; `mask[i][j]` is additive, and `causal` uses a frontier offset by
/// the past length `t - s`.
#[allow(clippy::too_many_arguments)]
fn naive(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (b, hq, hkv, s, t, d, dv): (usize, usize, usize, usize, usize, usize, usize),
    scale: f32,
    mask: Option<&[f32]>,
    causal: bool,
) -> Vec<f32> {
    let mut y = vec![0.0; b * hq * s * dv];
    for bi in 0..b {
        for h in 0..hq {
            let kh = bi * hkv + h / (hq / hkv);
            for i in 0..s {
                let mut sc: Vec<f32> = (0..t)
                    .map(|j| {
                        let dot: f32 = (0..d)
                            .map(|x| q[((bi * hq + h) * s + i) * d + x] * k[(kh * t + j) * d + x])
                            .sum();
                        let mut l = dot * scale + mask.map_or(0.0, |m| m[i * t + j]);
                        if causal && j > i + (t - s) {
                            l = f32::NEG_INFINITY;
                        }
                        l
                    })
                    .collect();
                let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                sc.iter_mut().for_each(|l| *l = (*l - max).exp());
                let sum: f32 = sc.iter().sum();
                for x in 0..dv {
                    y[((bi * hq + h) * s + i) * dv + x] =
                        (0..t).map(|j| sc[j] / sum * v[(kh * t + j) * dv + x]).sum();
                }
            }
        }
    }
    y
}

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 + 1e-4 * b.abs(),
            "element {i}: {a} vs {b}"
        );
    }
}

#[test]
fn attention_4d_gqa_causal_with_past_matches_naive() {
    let (b, hq, hkv, s, p, d, dv) = (2, 4, 2, 3, 2, 5, 3);
    let t = s + p;
    let q = values(b * hq * s * d, 1);
    let k = values(b * hkv * s * d, 2);
    let v = values(b * hkv * s * dv, 3);
    let pk = values(b * hkv * p * d, 4);
    let pv = values(b * hkv * p * dv, 5);
    let mask = values(s * t, 6);
    let qt = HostTensor::from_vec(&[b, hq, s, d], &q).unwrap();
    let kt = HostTensor::from_vec(&[b, hkv, s, d], &k).unwrap();
    let vt = HostTensor::from_vec(&[b, hkv, s, dv], &v).unwrap();
    let pkt = HostTensor::from_vec(&[b, hkv, p, d], &pk).unwrap();
    let pvt = HostTensor::from_vec(&[b, hkv, p, dv], &pv).unwrap();
    let mt = HostTensor::from_vec(&[s, t], &mask).unwrap();
    let spec = NodeSpec::onnx("Attention", 23)
        .attr("is_causal", AttrValue::Int(1))
        .outputs(3);
    let out = run_kernel_opt(
        attention_factory,
        &spec,
        &[
            Some(&qt),
            Some(&kt),
            Some(&vt),
            Some(&mt),
            Some(&pkt),
            Some(&pvt),
        ],
        None,
    )
    .unwrap();
    // The reference works on the concatenated caches.
    let cat = |past: &[f32], cur: &[f32], w: usize| -> Vec<f32> {
        (0..b * hkv)
            .flat_map(|bh| {
                past[bh * p * w..(bh + 1) * p * w]
                    .iter()
                    .chain(&cur[bh * s * w..(bh + 1) * s * w])
                    .copied()
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let (kc, vc) = (cat(&pk, &k, d), cat(&pv, &v, dv));
    let want = naive(
        &q,
        &kc,
        &vc,
        (b, hq, hkv, s, t, d, dv),
        1.0 / (d as f32).sqrt(),
        Some(&mask),
        true,
    );
    assert_eq!(out[0].shape(), &[b, hq, s, dv]);
    assert_close(&out[0].to_vec::<f32>().unwrap(), &want);
    assert_eq!(out[1].shape(), &[b, hkv, t, d]);
    assert_eq!(out[1].to_vec::<f32>().unwrap(), kc);
    assert_eq!(out[2].shape(), &[b, hkv, t, dv]);
    assert_eq!(out[2].to_vec::<f32>().unwrap(), vc);
}

#[test]
fn attention_3d_matches_4d() {
    // 3-D (B, S, H*D) inputs are the 4-D computation with heads split out of the hidden axis.
    let (b, h, s, d) = (1, 2, 3, 2);
    let q = values(b * s * h * d, 7);
    let k = values(b * s * h * d, 8);
    let v = values(b * s * h * d, 9);
    let t3 = |x: &[f32]| HostTensor::from_vec(&[b, s, h * d], x).unwrap();
    let spec = NodeSpec::onnx("Attention", 23)
        .attr("q_num_heads", AttrValue::Int(h as i64))
        .attr("kv_num_heads", AttrValue::Int(h as i64))
        .attr("scale", AttrValue::Float(0.5));
    let out = run_kernel_opt(
        attention_factory,
        &spec,
        &[Some(&t3(&q)), Some(&t3(&k)), Some(&t3(&v))],
        None,
    )
    .unwrap();
    let split = |x: &[f32]| super::split_heads(x, b, s, h, d);
    let want4 = naive(
        &split(&q),
        &split(&k),
        &split(&v),
        (b, h, h, s, s, d, d),
        0.5,
        None,
        false,
    );
    // Back to (B, S, H*D).
    let mut want = vec![0.0; want4.len()];
    for hi in 0..h {
        for si in 0..s {
            for x in 0..d {
                want[(si * h + hi) * d + x] = want4[(hi * s + si) * d + x];
            }
        }
    }
    assert_eq!(out[0].shape(), &[b, s, h * d]);
    assert_close(&out[0].to_vec::<f32>().unwrap(), &want);
}

#[test]
fn attention_bool_mask_and_qk_outputs_by_hand() {
    // One head, d = 1: scores are q * k. Q = [1, 1], K = [0, ln 3], V = [10, 20].
    let q = HostTensor::from_vec(&[1, 1, 2, 1], &[1.0f32, 1.0]).unwrap();
    let k = HostTensor::from_vec(&[1, 1, 2, 1], &[0.0f32, 3f32.ln()]).unwrap();
    let v = HostTensor::from_vec(&[1, 1, 2, 1], &[10.0f32, 20.0]).unwrap();
    // Row 0 attends both keys, row 1 only the first.
    let m = HostTensor::from_bytes(DType::Bool, &[2, 2], &[1, 1, 1, 0]).unwrap();
    let run = |mode: i64| {
        let spec = NodeSpec::onnx("Attention", 23)
            .attr("scale", AttrValue::Float(1.0))
            .attr("qk_matmul_output_mode", AttrValue::Int(mode))
            .outputs(4);
        run_kernel_opt(
            attention_factory,
            &spec,
            &[Some(&q), Some(&k), Some(&v), Some(&m)],
            None,
        )
        .unwrap()
    };
    let out = run(3);
    // Row 0: weights 1/4, 3/4 -> 17.5; row 1: only the first key -> 10.
    assert_close(&out[0].to_vec::<f32>().unwrap(), &[17.5, 10.0]);
    assert_close(&out[3].to_vec::<f32>().unwrap(), &[0.25, 0.75, 1.0, 0.0]);
    let raw = run(0)[3].to_vec::<f32>().unwrap();
    assert_close(&raw, &[0.0, 3f32.ln(), 0.0, 3f32.ln()]);
    let biased = run(2)[3].to_vec::<f32>().unwrap();
    assert_eq!(biased[3], f32::NEG_INFINITY);
}

#[test]
fn attention_fully_masked_row_is_zero_and_bad_heads_error() {
    let q = HostTensor::from_vec(&[1, 1, 1, 2], &[1.0f32, 2.0]).unwrap();
    let k = HostTensor::from_vec(&[1, 1, 2, 2], &[1.0f32, 0.0, 0.0, 1.0]).unwrap();
    let v = HostTensor::from_vec(&[1, 1, 2, 2], &[5.0f32, 6.0, 7.0, 8.0]).unwrap();
    let m = HostTensor::from_bytes(DType::Bool, &[1, 2], &[0, 0]).unwrap();
    let out = run_kernel_opt(
        attention_factory,
        &NodeSpec::onnx("Attention", 24),
        &[Some(&q), Some(&k), Some(&v), Some(&m)],
        None,
    )
    .unwrap();
    assert_eq!(out[0].to_vec::<f32>().unwrap(), vec![0.0, 0.0]);

    // 3 query heads cannot share 2 kv heads.
    let q = HostTensor::from_vec(&[1, 3, 1, 2], &[0.0f32; 6]).unwrap();
    let k = HostTensor::from_vec(&[1, 2, 1, 2], &[0.0f32; 4]).unwrap();
    let err = run_kernel_opt(
        attention_factory,
        &NodeSpec::onnx("Attention", 23),
        &[Some(&q), Some(&k), Some(&k)],
        None,
    )
    .unwrap_err();
    assert!(err.message.contains("not a multiple"), "{}", err.message);
}

#[test]
fn rms_normalization_by_hand() {
    // rows [3, 4] and [0, 0]: rms = sqrt(12.5 + eps), and 0 stays 0 (with eps > 0).
    let x = HostTensor::from_vec(&[2, 2], &[3.0f32, 4.0, 0.0, 0.0]).unwrap();
    let w = HostTensor::from_vec(&[2], &[1.0f32, 2.0]).unwrap();
    let out = run_kernel_opt(
        rms_factory,
        &NodeSpec::onnx("RMSNormalization", 23).attr("epsilon", AttrValue::Float(0.5)),
        &[Some(&x), Some(&w)],
        None,
    )
    .unwrap();
    let r = 13f32.sqrt();
    assert_close(
        &out[0].to_vec::<f32>().unwrap(),
        &[3.0 / r, 8.0 / r, 0.0, 0.0],
    );
}

#[test]
fn rotary_embedding_rotates_pairs() {
    // One position, one head, d = 4 (halves [x0, x1] / [x2, x3]), angle 90 degrees on pair 0
    // and 0 degrees on pair 1.
    let x = HostTensor::from_vec(&[1, 1, 1, 4], &[1.0f32, 2.0, 3.0, 4.0]).unwrap();
    let cos = HostTensor::from_vec(&[1, 1, 2], &[0.0f32, 1.0]).unwrap();
    let sin = HostTensor::from_vec(&[1, 1, 2], &[1.0f32, 0.0]).unwrap();
    let out = run_kernel_opt(
        rotary_factory,
        &NodeSpec::onnx("RotaryEmbedding", 23),
        &[Some(&x), Some(&cos), Some(&sin)],
        None,
    )
    .unwrap();
    // pair (x0, x2) = (1, 3) -> (-3, 1); pair (x1, x3) = (2, 4) unchanged.
    assert_eq!(out[0].to_vec::<f32>().unwrap(), vec![-3.0, 2.0, 1.0, 4.0]);
    // Interleaved pairs are (x0, x1) and (x2, x3).
    let out = run_kernel_opt(
        rotary_factory,
        &NodeSpec::onnx("RotaryEmbedding", 23).attr("interleaved", AttrValue::Int(1)),
        &[Some(&x), Some(&cos), Some(&sin)],
        None,
    )
    .unwrap();
    assert_eq!(out[0].to_vec::<f32>().unwrap(), vec![-2.0, 1.0, 3.0, 4.0]);
}

#[test]
fn rms_normalization_output_takes_the_scale_type() {
    use opreg_sdk::half::f16;
    let x = HostTensor::from_vec(&[1, 2], &[3.0f32, 4.0]).unwrap();
    let w = HostTensor::from_vec(&[2], &[f16::from_f32(1.0), f16::from_f32(1.0)]).unwrap();
    let out = run_kernel_opt(
        rms_factory,
        &NodeSpec::onnx("RMSNormalization", 23),
        &[Some(&x), Some(&w)],
        None,
    )
    .unwrap();
    assert_eq!(out[0].dtype(), DType::F16);
}

/// Empty Q, K and V (head size 0) with 2^20-long sequences ask for 2^40 attention scores:
/// refused as too large instead of aborting. An empty X of a huge batch normalises to an
/// empty Y without per-position tables.
#[test]
fn empty_heads_with_huge_sequences() {
    let e = |s: &[usize]| HostTensor::from_vec::<f32>(s, &[]).unwrap();
    let (q, k) = (e(&[1, 1, 1 << 20, 0]), e(&[1, 1, 1 << 20, 0]));
    let err = run_kernel_opt(
        attention_factory,
        &NodeSpec::onnx("Attention", 23),
        &[Some(&q), Some(&k), Some(&k)],
        None,
    )
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::ResourceExhausted, "{}", err.message);

    let x = e(&[1 << 30, 0, 1 << 30]);
    let out = run_kernel_opt(
        mvn_factory,
        &NodeSpec::onnx("MeanVarianceNormalization", 13).attr("axes", AttrValue::Ints(vec![0])),
        &[Some(&x)],
        None,
    )
    .unwrap();
    assert_eq!(out[0].shape(), &[1 << 30, 0, 1 << 30]);
}
