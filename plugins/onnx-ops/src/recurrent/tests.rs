use super::*;
use crate::testcases::run_cases_min;
use crate::util::testing::{assert_close, run, t};
use opreg_sdk::testkit::NodeSpec;

#[test]
fn conformance_linear_attention() {
    run_cases_min(&["test_linear_attention"], 14, linear_attention_factory);
}

#[test]
fn conformance_causal_conv_with_state() {
    run_cases_min(&["test_causal_conv_with_state"], 13, causal_conv_factory);
}

fn la_node(rule: &str, hq: i64, hk: i64) -> NodeSpec {
    NodeSpec::onnx("LinearAttention", 27)
        .attr("q_num_heads", AttrValue::Int(hq))
        .attr("kv_num_heads", AttrValue::Int(hk))
        .attr("update_rule", AttrValue::String(rule.into()))
        .outputs(2)
}

/// The gated-delta recurrence for one batch, one kv head shared by two query heads, d_k =
/// d_v = 1, written out by hand: S ← e^g·S; v' = β(v − S·k); S ← S + k·v'; o = scale·q·S.
#[test]
fn gated_delta_gqa_by_hand() {
    let q = [1.0f32, 2.0, -1.0, 0.5]; // (1, 2, 2·1): t0 heads (1, 2), t1 heads (−1, 0.5)
    let k = [0.5f32, 1.0];
    let v = [2.0f32, -1.0];
    let g = [0.0f32, -0.5];
    let beta = [1.0f32, 0.5];
    let scale = 2.0f32;
    let mut s = 0.0f32;
    let mut want = Vec::new();
    for step in 0..2 {
        s *= g[step].exp();
        let vp = beta[step] * (v[step] - s * k[step]);
        s += k[step] * vp;
        want.push(scale * q[2 * step] * s);
        want.push(scale * q[2 * step + 1] * s);
    }
    let node = la_node("gated_delta", 2, 1).attr("scale", AttrValue::Float(scale));
    let out = run(
        linear_attention_factory,
        node,
        &[
            Some(&t(&[1, 2, 2], &q)),
            Some(&t(&[1, 2, 1], &k)),
            Some(&t(&[1, 2, 1], &v)),
            None,
            Some(&t(&[1, 2, 1], &g)),
            Some(&t(&[1, 2, 1], &beta)),
        ],
    )
    .unwrap();
    assert_eq!(out[0].shape(), &[1, 2, 2]);
    assert_close(&out[0].to_vec::<f32>().unwrap(), &want, 1e-6);
    assert_eq!(out[1].shape(), &[1, 1, 1, 1]);
    assert_close(&out[1].to_vec::<f32>().unwrap(), &[s], 1e-6);
}

/// Running a sequence in one call equals running it in two, carrying the state.
#[test]
fn state_carries_across_calls() {
    let (b, t_len, h, d) = (2usize, 4usize, 2usize, 3usize);
    let n = b * t_len * h * d;
    let vals = |seed: u32| -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                ((i + 1).wrapping_mul(2_654_435_761u32.wrapping_add(seed)) % 1000) as f32 / 500.0
                    - 1.0
            })
            .collect()
    };
    let (q, k, v) = (vals(1), vals(2), vals(3));
    let shape = [b, t_len, h * d];
    let node = || la_node("linear", h as i64, h as i64);
    let full = run(
        linear_attention_factory,
        node(),
        &[
            Some(&t(&shape, &q)),
            Some(&t(&shape, &k)),
            Some(&t(&shape, &v)),
        ],
    )
    .unwrap();
    // Split the length in halves.
    let half = |x: &[f32], second: bool| -> Vec<f32> {
        x.chunks(t_len * h * d)
            .flat_map(|bt| {
                let m = t_len / 2 * h * d;
                if second {
                    bt[m..].to_vec()
                } else {
                    bt[..m].to_vec()
                }
            })
            .collect()
    };
    let hs = [b, t_len / 2, h * d];
    let first = run(
        linear_attention_factory,
        node(),
        &[
            Some(&t(&hs, &half(&q, false))),
            Some(&t(&hs, &half(&k, false))),
            Some(&t(&hs, &half(&v, false))),
        ],
    )
    .unwrap();
    let second = run(
        linear_attention_factory,
        node(),
        &[
            Some(&t(&hs, &half(&q, true))),
            Some(&t(&hs, &half(&k, true))),
            Some(&t(&hs, &half(&v, true))),
            Some(&first[1]),
        ],
    )
    .unwrap();
    assert_close(
        &second[1].to_vec::<f32>().unwrap(),
        &full[1].to_vec::<f32>().unwrap(),
        1e-5,
    );
    let y = full[0].to_vec::<f32>().unwrap();
    assert_close(&second[0].to_vec::<f32>().unwrap(), &half(&y, true), 1e-5);
}

#[test]
fn linear_attention_refuses_bad_input() {
    let x = t(&[1, 2, 4], &[0.0f32; 8]);
    // gated needs decay.
    let err = run(
        linear_attention_factory,
        la_node("gated", 2, 2),
        &[Some(&x), Some(&x), Some(&x)],
    )
    .unwrap_err();
    assert!(
        err.message.contains("requires the decay"),
        "{}",
        err.message
    );
    // key heads·d_k mismatch.
    let k = t(&[1, 2, 3], &[0.0f32; 6]);
    let err = run(
        linear_attention_factory,
        la_node("linear", 2, 2),
        &[Some(&x), Some(&k), Some(&x)],
    )
    .unwrap_err();
    assert!(err.message.contains("key's last extent"), "{}", err.message);
    // Wrong past_state shape.
    let p = t(&[1, 2, 2, 3], &[0.0f32; 12]);
    let err = run(
        linear_attention_factory,
        la_node("linear", 2, 2),
        &[Some(&x), Some(&x), Some(&x), Some(&p)],
    )
    .unwrap_err();
    assert!(err.message.contains("past_state"), "{}", err.message);
    // Attributes.
    let e = |node: NodeSpec| {
        run(linear_attention_factory, node, &[])
            .unwrap_err()
            .message
    };
    assert!(e(la_node("linear", 3, 2)).contains("multiple"));
    assert!(e(la_node("fast", 2, 2)).contains("update_rule"));
    assert!(e(NodeSpec::onnx("LinearAttention", 27)).contains("required"));
}

#[test]
fn causal_conv_streams_like_one_call() {
    // Channels 2, kernel 3: a sequence of 5 in one call equals 2 + 3 carrying the state.
    let x: Vec<f32> = (0..10).map(|i| i as f32 * 0.25 - 1.0).collect();
    let w = t(&[2, 1, 3], &[0.5f32, -1.0, 2.0, 1.0, 0.25, -0.5]);
    let bias = t(&[2], &[0.1f32, -0.2]);
    let node = || {
        NodeSpec::onnx("CausalConvWithState", 27)
            .attr("activation", AttrValue::String("silu".into()))
            .outputs(2)
    };
    let full = run(
        causal_conv_factory,
        node(),
        &[Some(&t(&[1, 2, 5], &x)), Some(&w), Some(&bias)],
    )
    .unwrap();
    let part = |r: std::ops::Range<usize>| -> Vec<f32> {
        [&x[r.clone()], &x[5 + r.start..5 + r.end]].concat()
    };
    let a = run(
        causal_conv_factory,
        node(),
        &[Some(&t(&[1, 2, 2], &part(0..2))), Some(&w), Some(&bias)],
    )
    .unwrap();
    let b = run(
        causal_conv_factory,
        node(),
        &[
            Some(&t(&[1, 2, 3], &part(2..5))),
            Some(&w),
            Some(&bias),
            Some(&a[1]),
        ],
    )
    .unwrap();
    let y = full[0].to_vec::<f32>().unwrap();
    let ya = a[0].to_vec::<f32>().unwrap();
    let yb = b[0].to_vec::<f32>().unwrap();
    let joined: Vec<f32> = [&ya[..2], &yb[..3], &ya[2..], &yb[3..]].concat();
    assert_close(&joined, &y, 1e-6);
    assert_eq!(b[1].shape(), &[1, 2, 2]);
    assert_close(
        &b[1].to_vec::<f32>().unwrap(),
        &[-0.25, 0.0, 1.0, 1.25],
        1e-6,
    );
    // By hand, channel 0 position 0 with no past: only w[2]·x[0] + bias, then SiLU.
    let v = 2.0 * x[0] + 0.1;
    assert!((y[0] - v / (1.0 + (-v).exp())).abs() < 1e-6);
}

#[test]
fn causal_conv_refuses_bad_shapes() {
    let x = t(&[1, 2, 4], &[0.0f32; 8]);
    let e = |inputs: &[Option<&opreg_sdk::host::HostTensor>]| {
        run(
            causal_conv_factory,
            NodeSpec::onnx("CausalConvWithState", 27),
            inputs,
        )
        .unwrap_err()
        .message
    };
    assert!(e(&[Some(&x), Some(&t(&[3, 1, 2], &[0.0f32; 6]))]).contains("weight"));
    let w = t(&[2, 1, 3], &[0.0f32; 6]);
    assert!(
        e(&[Some(&x), Some(&w), None, Some(&t(&[1, 2, 3], &[0.0f32; 6]))]).contains("past_state")
    );
    assert!(e(&[Some(&t(&[2, 4], &[0.0f32; 8])), Some(&w)]).contains("rank 3"));
    let err = run(
        causal_conv_factory,
        NodeSpec::onnx("CausalConvWithState", 27)
            .attr("activation", AttrValue::String("relu".into())),
        &[],
    )
    .unwrap_err();
    assert!(err.message.contains("activation"));
}
