use super::*;
use crate::util::testing::{run, t};
use opreg_sdk::{
    host::HostTensor,
    testkit::{run_kernel_opt, NodeSpec},
};

fn close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= tol, "{got:?} vs {want:?}");
    }
}

#[test]
fn cumprod_modes() {
    let x = t(&[3], &[1.0f32, 2.0, 3.0]);
    let axis = t::<i64>(&[], &[0]);
    let case = |ex: i64, rev: i64| {
        let node = NodeSpec::onnx("CumProd", 26)
            .attr("exclusive", AttrValue::Int(ex))
            .attr("reverse", AttrValue::Int(rev));
        run(cumprod_factory, node, &[Some(&x), Some(&axis)]).unwrap()[0]
            .to_vec::<f32>()
            .unwrap()
    };
    // Operators.md examples.
    assert_eq!(case(0, 0), vec![1.0, 2.0, 6.0]);
    assert_eq!(case(1, 0), vec![1.0, 1.0, 2.0]);
    assert_eq!(case(0, 1), vec![6.0, 6.0, 3.0]);
    assert_eq!(case(1, 1), vec![6.0, 3.0, 1.0]);
    // 2-D, negative axis, int32 axis input, i64 data.
    let x = t(&[2, 3], &[1i64, 2, 3, 4, 5, 6]);
    let axis = t::<i32>(&[], &[-1]);
    let out = run(
        cumprod_factory,
        NodeSpec::onnx("CumProd", 26),
        &[Some(&x), Some(&axis)],
    )
    .unwrap();
    assert_eq!(out[0].to_vec::<i64>().unwrap(), vec![1, 2, 6, 4, 20, 120]);
    let axis = t::<i64>(&[], &[0]);
    let out = run(
        cumprod_factory,
        NodeSpec::onnx("CumProd", 26),
        &[Some(&x), Some(&axis)],
    )
    .unwrap();
    assert_eq!(out[0].to_vec::<i64>().unwrap(), vec![1, 2, 3, 4, 10, 18]);
    let x = t(&[2, 2], &[2i32, 3, 4, 5]);
    let node = NodeSpec::onnx("CumProd", 26).attr("exclusive", AttrValue::Int(1));
    let out = run(cumprod_factory, node, &[Some(&x), Some(&axis)]).unwrap();
    assert_eq!(out[0].to_vec::<i32>().unwrap(), vec![1, 1, 2, 3]);
}

#[test]
fn bitcast_reinterprets_bits() {
    let x = t(&[2], &[1.0f32, -2.0]);
    let node = NodeSpec::onnx("BitCast", 26).attr("to", AttrValue::Int(6));
    let out = run(bitcast_factory, node, &[Some(&x)]).unwrap();
    assert_eq!(
        out[0].to_vec::<i32>().unwrap(),
        vec![0x3f80_0000, 0xc000_0000u32 as i32]
    );
    let b = HostTensor::from_bytes(DType::Bool, &[4], &[1, 0, 1, 0]).unwrap();
    let node = NodeSpec::onnx("BitCast", 26).attr("to", AttrValue::Int(2));
    let out = run(bitcast_factory, node, &[Some(&b)]).unwrap();
    assert_eq!(out[0].to_vec::<u8>().unwrap(), vec![1, 0, 1, 0]);
    // Different widths are refused.
    let node = NodeSpec::onnx("BitCast", 26).attr("to", AttrValue::Int(7));
    assert!(run(bitcast_factory, node, &[Some(&x)]).is_err());
}

#[test]
fn unique_sorted_unsorted_and_axis() {
    let x = t(&[6], &[2.0f32, 1.0, 1.0, 3.0, 4.0, 3.0]);
    let node = NodeSpec::onnx("Unique", 11)
        .attr("sorted", AttrValue::Int(0))
        .outputs(4);
    let out = run(unique_factory, node, &[Some(&x)]).unwrap();
    assert_eq!(out[0].to_vec::<f32>().unwrap(), vec![2.0, 1.0, 3.0, 4.0]);
    assert_eq!(out[1].to_vec::<i64>().unwrap(), vec![0, 1, 3, 4]);
    assert_eq!(out[2].to_vec::<i64>().unwrap(), vec![0, 1, 1, 2, 3, 2]);
    assert_eq!(out[3].to_vec::<i64>().unwrap(), vec![1, 2, 2, 1]);
    let out = run(
        unique_factory,
        NodeSpec::onnx("Unique", 11).outputs(4),
        &[Some(&x)],
    )
    .unwrap();
    assert_eq!(out[0].to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    assert_eq!(out[1].to_vec::<i64>().unwrap(), vec![1, 0, 3, 4]);
    assert_eq!(out[2].to_vec::<i64>().unwrap(), vec![1, 0, 0, 2, 3, 2]);
    assert_eq!(out[3].to_vec::<i64>().unwrap(), vec![2, 1, 2, 1]);
    // Conformance test_unique_sorted_with_axis.
    let x = t(&[3, 3], &[1.0f32, 0.0, 0.0, 1.0, 0.0, 0.0, 2.0, 3.0, 4.0]);
    let node = NodeSpec::onnx("Unique", 11)
        .attr("axis", AttrValue::Int(0))
        .outputs(4);
    let out = run(unique_factory, node, &[Some(&x)]).unwrap();
    assert_eq!(out[0].shape(), &[2, 3]);
    assert_eq!(
        out[0].to_vec::<f32>().unwrap(),
        vec![1.0, 0.0, 0.0, 2.0, 3.0, 4.0]
    );
    assert_eq!(out[1].to_vec::<i64>().unwrap(), vec![0, 2]);
    assert_eq!(out[2].to_vec::<i64>().unwrap(), vec![0, 0, 1]);
    assert_eq!(out[3].to_vec::<i64>().unwrap(), vec![2, 1]);
    // Axis 1 of a [2, 3] int tensor: columns [1,4], [0,5], [1,4] -> [[0,1],[5,4]].
    let x = t(&[2, 3], &[1i32, 0, 1, 4, 5, 4]);
    let node = NodeSpec::onnx("Unique", 11)
        .attr("axis", AttrValue::Int(-1))
        .outputs(3);
    let out = run(unique_factory, node, &[Some(&x)]).unwrap();
    assert_eq!(out[0].shape(), &[2, 2]);
    assert_eq!(out[0].to_vec::<i32>().unwrap(), vec![0, 1, 5, 4]);
    assert_eq!(out[2].to_vec::<i64>().unwrap(), vec![1, 0, 1]);
    // Bool, Y only.
    let b = HostTensor::from_bytes(DType::Bool, &[3], &[1, 0, 1]).unwrap();
    let out = run(unique_factory, NodeSpec::onnx("Unique", 11), &[Some(&b)]).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].bytes(), &[0, 1]);
}

#[test]
fn det_batched() {
    // Conformance test_det_nd.
    let x = t(
        &[3, 2, 2],
        &[
            1.0f32, 2.0, 3.0, 4.0, 1.0, 2.0, 2.0, 1.0, 1.0, 3.0, 3.0, 1.0,
        ],
    );
    let out = run_kernel_opt(
        stateless(Det),
        &NodeSpec::onnx("Det", 22),
        &[Some(&x)],
        None,
    )
    .unwrap();
    assert_eq!(out[0].shape(), &[3]);
    close(&out[0].to_vec::<f32>().unwrap(), &[-2.0, -3.0, -8.0], 1e-5);
    // Needs pivoting; singular gives 0.
    let x = t(
        &[2, 3, 3],
        &[
            0.0f64, 2.0, 1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 3.0, 1.0, 2.0, 3.0, 2.0, 4.0, 6.0, 1.0, 0.0,
            1.0,
        ],
    );
    let out = run_kernel_opt(
        stateless(Det),
        &NodeSpec::onnx("Det", 11),
        &[Some(&x)],
        None,
    )
    .unwrap();
    let d = out[0].to_vec::<f64>().unwrap();
    assert!((d[0] - -3.0).abs() < 1e-12 && d[1].abs() < 1e-12, "{d:?}");
}

#[test]
fn windows() {
    let size = t::<i32>(&[], &[10]);
    let hamming: Factory = |n| window_factory(WindowKind::Hamming, n);
    let out = run(hamming, NodeSpec::onnx("HammingWindow", 17), &[Some(&size)]).unwrap();
    close(
        &out[0].to_vec::<f32>().unwrap(),
        &[
            0.086_956_52,
            0.174_144_42,
            0.402_405_3,
            0.684_551_2,
            0.912_812_1,
            1.0,
            0.912_812_1,
            0.684_551_1,
            0.402_405_2,
            0.174_144_42,
        ],
        1e-6,
    );
    let blackman: Factory = |n| window_factory(WindowKind::Blackman, n);
    let node = NodeSpec::onnx("BlackmanWindow", 17).attr("periodic", AttrValue::Int(0));
    let out = run(blackman, node, &[Some(&size)]).unwrap();
    close(
        &out[0].to_vec::<f32>().unwrap(),
        &[
            0.0,
            0.050_869_636,
            0.258_000_5,
            0.63,
            0.951_13,
            0.951_13,
            0.63,
            0.258_000_4,
            0.050_869_6,
            0.0,
        ],
        1e-6,
    );
    let hann: Factory = |n| window_factory(WindowKind::Hann, n);
    let node = NodeSpec::onnx("HannWindow", 17).attr("output_datatype", AttrValue::Int(11));
    let size = t::<i64>(&[], &[4]);
    let out = run(hann, node, &[Some(&size)]).unwrap();
    let w = out[0].to_vec::<f64>().unwrap();
    assert!(
        w.iter()
            .zip([0.0, 0.5, 1.0, 0.5])
            .all(|(a, b)| (a - b).abs() < 1e-12),
        "{w:?}"
    );
}

#[test]
fn dft_forward_inverse_onesided() {
    // Real signal [1, 2, 3, 4] as [1, 4, 1] along axis 1: X = [10, -2+2i, -2, -2-2i].
    let x = t(&[1, 4, 1], &[1.0f32, 2.0, 3.0, 4.0]);
    let out = run(dft_factory, NodeSpec::onnx("DFT", 17), &[Some(&x)]).unwrap();
    assert_eq!(out[0].shape(), &[1, 4, 2]);
    close(
        &out[0].to_vec::<f32>().unwrap(),
        &[10.0, 0.0, -2.0, 2.0, -2.0, 0.0, -2.0, -2.0],
        1e-5,
    );
    // Onesided, axis as an input (opset 20).
    let axis = t::<i64>(&[], &[-2]);
    let node = NodeSpec::onnx("DFT", 20).attr("onesided", AttrValue::Int(1));
    let out = run(dft_factory, node, &[Some(&x), None, Some(&axis)]).unwrap();
    assert_eq!(out[0].shape(), &[1, 3, 2]);
    close(
        &out[0].to_vec::<f32>().unwrap(),
        &[10.0, 0.0, -2.0, 2.0, -2.0, 0.0],
        1e-5,
    );
    // dft_length pads with zeros: [1, 2] with n = 4 -> [3, 1-2i, -1, 1+2i].
    let x2 = t(&[1, 2, 1], &[1.0f32, 2.0]);
    let n = t::<i64>(&[], &[4]);
    let out = run(
        dft_factory,
        NodeSpec::onnx("DFT", 20),
        &[Some(&x2), Some(&n)],
    )
    .unwrap();
    close(
        &out[0].to_vec::<f32>().unwrap(),
        &[3.0, 0.0, 1.0, -2.0, -1.0, 0.0, 1.0, 2.0],
        1e-5,
    );
    // Inverse of the full spectrum gives the signal back (complex, imaginary 0).
    let spec = t(
        &[1, 4, 2],
        &[10.0f64, 0.0, -2.0, 2.0, -2.0, 0.0, -2.0, -2.0],
    );
    let node = NodeSpec::onnx("DFT", 20).attr("inverse", AttrValue::Int(1));
    let out = run(dft_factory, node, &[Some(&spec)]).unwrap();
    let y = out[0].to_vec::<f64>().unwrap();
    let want = [1.0, 0.0, 2.0, 0.0, 3.0, 0.0, 4.0, 0.0];
    assert!(
        y.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12),
        "{y:?}"
    );
    // irfft of the one-sided spectrum: default n = 2 * (3 - 1) = 4, real output.
    let half = t(&[1, 3, 2], &[10.0f64, 0.0, -2.0, 2.0, -2.0, 0.0]);
    let node = NodeSpec::onnx("DFT", 20)
        .attr("inverse", AttrValue::Int(1))
        .attr("onesided", AttrValue::Int(1));
    let out = run(dft_factory, node, &[Some(&half)]).unwrap();
    assert_eq!(out[0].shape(), &[1, 4, 1]);
    let y = out[0].to_vec::<f64>().unwrap();
    assert!(
        y.iter()
            .zip([1.0, 2.0, 3.0, 4.0])
            .all(|(a, b)| (a - b).abs() < 1e-12),
        "{y:?}"
    );
    // The last axis is not a signal axis.
    let bad = t::<i64>(&[], &[-1]);
    assert!(run(
        dft_factory,
        NodeSpec::onnx("DFT", 20),
        &[Some(&x), None, Some(&bad)]
    )
    .is_err());
}

/// Unique along an axis of 2^40 on an empty X: the per-item tables are refused as too
/// large instead of aborting.
#[test]
fn unique_along_a_huge_empty_axis_is_resource_exhausted() {
    let x = t::<i32>(&[0, 1 << 40], &[]);
    let node = NodeSpec::onnx("Unique", 11).attr("axis", AttrValue::Int(1));
    let e = run(unique_factory, node, &[Some(&x)]).expect_err("too large");
    assert_eq!(e.code, ErrorCode::ResourceExhausted, "{}", e.message);
}
