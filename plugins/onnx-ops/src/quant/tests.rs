use super::*;
use crate::util::testing::t;
use opreg_sdk::{
    host::HostTensor,
    testkit::{run_kernel_opt, NodeSpec},
};

/// Runs a kernel three times, without a BLAS backend (the operators' own loops), with the
/// naive reference backend (the BLAS path) and with one that also requantizes (the path that
/// hands the requantization to the BLAS), and checks all give the same outputs, or all fail.
fn run(
    f: Factory,
    node: NodeSpec,
    inputs: &[Option<&HostTensor>],
) -> Result<Vec<HostTensor>, PluginError> {
    both(node, inputs, |node, inputs, blas| {
        run_kernel_opt(f, node, inputs, blas)
    })
}

fn both(
    node: NodeSpec,
    inputs: &[Option<&HostTensor>],
    run: impl Fn(
        &NodeSpec,
        &[Option<&HostTensor>],
        Option<Box<dyn Blas>>,
    ) -> Result<Vec<HostTensor>, PluginError>,
) -> Result<Vec<HostTensor>, PluginError> {
    let plain = run(&node, inputs, None);
    let backends: [Box<dyn Blas>; 2] = [
        Box::new(crate::nn::testblas::NaiveBlas),
        Box::new(crate::nn::testblas::NaiveRequantBlas),
    ];
    for backend in backends {
        let blas = run(&node, inputs, Some(backend));
        match (&plain, &blas) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a.len(), b.len());
                for (x, y) in a.iter().zip(b) {
                    assert_eq!((x.dtype(), x.shape()), (y.dtype(), y.shape()), "{node:?}");
                    assert_eq!(x.bytes(), y.bytes(), "{node:?}: BLAS path differs");
                }
            }
            (Err(_), Err(_)) => {}
            _ => panic!("{node:?}: without BLAS {plain:?}, with BLAS {blas:?}"),
        }
    }
    plain
}

fn quantize(node: NodeSpec, inputs: &[Option<&HostTensor>]) -> Vec<HostTensor> {
    run(quantize_factory, node, inputs).expect("QuantizeLinear")
}

fn dequantize(node: NodeSpec, inputs: &[Option<&HostTensor>]) -> Vec<HostTensor> {
    run(dequantize_factory, node, inputs).expect("DequantizeLinear")
}

#[test]
fn quantize_per_tensor_rounds_half_to_even_and_saturates() {
    // Operators.md / conformance test_quantizelinear.
    let x = t(&[6], &[0.0f32, 2.0, 3.0, 1000.0, -254.0, -1000.0]);
    let s = t::<f32>(&[], &[2.0]);
    let z = t::<u8>(&[], &[128]);
    let out = quantize(
        NodeSpec::onnx("QuantizeLinear", 21),
        &[Some(&x), Some(&s), Some(&z)],
    );
    assert_eq!(
        out[0].to_vec::<u8>().unwrap(),
        vec![128, 129, 130, 255, 1, 0]
    );
    // Ties go to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0, -1.5 -> -2.
    let x = t(&[5], &[0.5f32, 1.5, 2.5, -0.5, -1.5]);
    let s = t::<f32>(&[], &[1.0]);
    let z = t::<i8>(&[], &[0]);
    let out = quantize(
        NodeSpec::onnx("QuantizeLinear", 13),
        &[Some(&x), Some(&s), Some(&z)],
    );
    assert_eq!(out[0].to_vec::<i8>().unwrap(), vec![0, 2, 2, 0, -2]);
    // No zero point: uint8 with zero point 0.
    let x = t(&[3], &[-3.0f32, 3.0, 600.0]);
    let out = quantize(NodeSpec::onnx("QuantizeLinear", 10), &[Some(&x), Some(&s)]);
    assert_eq!(out[0].dtype(), DType::U8);
    assert_eq!(out[0].to_vec::<u8>().unwrap(), vec![0, 3, 255]);
}

#[test]
fn quantize_int8_with_negative_zero_point() {
    let x = t(&[4], &[0.0f32, 10.0, -300.0, 300.0]);
    let s = t::<f32>(&[], &[2.0]);
    let z = t::<i8>(&[], &[-10]);
    let out = quantize(
        NodeSpec::onnx("QuantizeLinear", 19),
        &[Some(&x), Some(&s), Some(&z)],
    );
    assert_eq!(out[0].to_vec::<i8>().unwrap(), vec![-10, -5, -128, 127]);
}

#[test]
fn quantize_per_axis() {
    // Conformance test_quantizelinear_axis.
    let x = t(
        &[1, 3, 3, 2],
        &[
            -162.0f32, 10.0, -100.0, 232.0, -20.0, -50.0, -76.0, 0.0, 0.0, 252.0, 32.0, -44.0,
            245.0, -485.0, -960.0, -270.0, -375.0, -470.0,
        ],
    );
    let s = t(&[3], &[2.0f32, 4.0, 5.0]);
    let z = t(&[3], &[84u8, 24, 196]);
    let out = quantize(
        NodeSpec::onnx("QuantizeLinear", 13),
        &[Some(&x), Some(&s), Some(&z)],
    );
    assert_eq!(out[0].shape(), &[1, 3, 3, 2]);
    assert_eq!(
        out[0].to_vec::<u8>().unwrap(),
        vec![3, 89, 34, 200, 74, 59, 5, 24, 24, 87, 32, 13, 245, 99, 4, 142, 121, 102]
    );
    // A scale that does not match the axis is refused.
    let bad = t(&[2], &[1.0f32, 2.0]);
    let badz = t(&[2], &[0u8, 0]);
    let err = run(
        quantize_factory,
        NodeSpec::onnx("QuantizeLinear", 13),
        &[Some(&x), Some(&bad), Some(&badz)],
    )
    .expect_err("bad scale");
    assert!(err.message.contains("scale"), "{}", err.message);
}

#[test]
fn quantize_blocked() {
    // Conformance test_quantizelinear_blocked_asymmetric.
    let x = t(
        &[3, 4],
        &[
            6.0f32, 12.0, 50.0, 5.0, 1.0, 8.0, 4.0, 5.0, 0.0, 20.0, 10.0, 4.0,
        ],
    );
    let s = t(&[3, 2], &[1.5f32, 2.5, 3.0, 4.9, 5.1, 6.9]);
    let z = t(&[3, 2], &[0u8, 1, 1, 0, 2, 3]);
    let node = NodeSpec::onnx("QuantizeLinear", 21)
        .attr("axis", AttrValue::Int(1))
        .attr("block_size", AttrValue::Int(2));
    let out = quantize(node, &[Some(&x), Some(&s), Some(&z)]);
    assert_eq!(
        out[0].to_vec::<u8>().unwrap(),
        vec![4, 8, 21, 3, 1, 4, 1, 1, 2, 6, 4, 4]
    );
    // A block size that does not divide the axis: the last block is short.
    let x = t(&[5], &[1.0f32, 2.0, 3.0, 8.0, 10.0]);
    let s = t(&[2], &[1.0f32, 2.0]);
    let node = NodeSpec::onnx("QuantizeLinear", 21)
        .attr("axis", AttrValue::Int(0))
        .attr("block_size", AttrValue::Int(3));
    let out = quantize(node, &[Some(&x), Some(&s)]);
    assert_eq!(out[0].to_vec::<u8>().unwrap(), vec![1, 2, 3, 4, 5]);
}

#[test]
fn quantize_int16_and_output_dtype() {
    // Conformance test_quantizelinear_int16.
    let x = t(
        &[16],
        &[
            0.0f32, -514.0, 3.0, -3.0, 2.9, -2.9, 3.1, -3.1, 65022.0, -66046.0, 65023.0, -66047.0,
            65024.0, -66048.0, 70000.0, -70000.0,
        ],
    );
    let s = t::<f32>(&[], &[2.0]);
    let z = t::<i16>(&[], &[256]);
    let out = quantize(
        NodeSpec::onnx("QuantizeLinear", 21),
        &[Some(&x), Some(&s), Some(&z)],
    );
    assert_eq!(
        out[0].to_vec::<i16>().unwrap(),
        vec![
            256, -1, 258, 254, 257, 255, 258, 254, 32767, -32767, 32767, -32768, 32767, -32768,
            32767, -32768
        ]
    );
    // output_dtype picks the type when there is no zero point.
    let x = t(&[3], &[-1.0f32, 70000.0, 5.0]);
    let s = t::<f32>(&[], &[1.0]);
    let node = NodeSpec::onnx("QuantizeLinear", 21).attr("output_dtype", AttrValue::Int(4));
    let out = quantize(node, &[Some(&x), Some(&s)]);
    assert_eq!(out[0].dtype(), DType::U16);
    assert_eq!(out[0].to_vec::<u16>().unwrap(), vec![0, 65535, 5]);
    // ... and must agree with the zero point's type.
    let z = t::<u8>(&[], &[0]);
    let node = NodeSpec::onnx("QuantizeLinear", 21).attr("output_dtype", AttrValue::Int(4));
    assert!(run(quantize_factory, node, &[Some(&x), Some(&s), Some(&z)]).is_err());
}

#[test]
fn quantize_half_inputs_and_int32() {
    let x = t(
        &[3],
        &[f16::from_f32(1.0), f16::from_f32(-3.0), f16::from_f32(5.0)],
    );
    let s = t::<f16>(&[], &[f16::from_f32(2.0)]);
    let z = t::<i8>(&[], &[1]);
    let out = quantize(
        NodeSpec::onnx("QuantizeLinear", 19),
        &[Some(&x), Some(&s), Some(&z)],
    );
    // 0.5 -> 0, -1.5 -> -2, 2.5 -> 2; plus 1.
    assert_eq!(out[0].to_vec::<i8>().unwrap(), vec![1, -1, 3]);
    let x = t(
        &[3],
        &[
            bf16::from_f32(6.0),
            bf16::from_f32(-6.0),
            bf16::from_f32(7.0),
        ],
    );
    let s = t::<bf16>(&[], &[bf16::from_f32(4.0)]);
    let out = quantize(NodeSpec::onnx("QuantizeLinear", 21), &[Some(&x), Some(&s)]);
    assert_eq!(out[0].to_vec::<u8>().unwrap(), vec![2, 0, 2]);
    let x = t(&[3], &[10i32, 15, 1000]);
    let s = t::<f32>(&[], &[10.0]);
    let out = quantize(NodeSpec::onnx("QuantizeLinear", 10), &[Some(&x), Some(&s)]);
    assert_eq!(out[0].to_vec::<u8>().unwrap(), vec![1, 2, 100]);
}

#[test]
fn dequantize_per_tensor_axis_and_blocked() {
    // Operators.md example.
    let x = t(&[4], &[0u8, 3, 128, 255]);
    let s = t::<f32>(&[], &[2.0]);
    let z = t::<u8>(&[], &[128]);
    let out = dequantize(
        NodeSpec::onnx("DequantizeLinear", 10),
        &[Some(&x), Some(&s), Some(&z)],
    );
    assert_eq!(
        out[0].to_vec::<f32>().unwrap(),
        vec![-256.0, -250.0, 0.0, 254.0]
    );
    // int8 with a negative zero point, no zero point for int32.
    let x = t(&[3], &[-128i8, 0, 127]);
    let z = t::<i8>(&[], &[-8]);
    let out = dequantize(
        NodeSpec::onnx("DequantizeLinear", 13),
        &[Some(&x), Some(&s), Some(&z)],
    );
    assert_eq!(out[0].to_vec::<f32>().unwrap(), vec![-240.0, 16.0, 270.0]);
    let x = t(&[2], &[-7i32, 1 << 20]);
    let out = dequantize(
        NodeSpec::onnx("DequantizeLinear", 13),
        &[Some(&x), Some(&s)],
    );
    assert_eq!(out[0].to_vec::<f32>().unwrap(), vec![-14.0, 2097152.0]);
    // Per axis (axis 1 of [1, 3, 2]).
    let x = t(&[1, 3, 2], &[10u8, 20, 30, 40, 50, 60]);
    let s = t(&[3], &[1.0f32, 2.0, 0.5]);
    let z = t(&[3], &[0u8, 10, 50]);
    let out = dequantize(
        NodeSpec::onnx("DequantizeLinear", 13),
        &[Some(&x), Some(&s), Some(&z)],
    );
    assert_eq!(
        out[0].to_vec::<f32>().unwrap(),
        vec![10.0, 20.0, 40.0, 60.0, 0.0, 5.0]
    );
    // Blocked: conformance test_dequantizelinear_blocked.
    let x = t(
        &[1, 4, 3, 2],
        &[
            3u8, 89, 34, 200, 74, 59, 5, 24, 24, 87, 32, 13, 5, 12, 12, 33, 65, 42, 245, 99, 4,
            142, 121, 102,
        ],
    );
    let s = t(
        &[1, 2, 3, 2],
        &[
            3.0f32, 2.0, 4.0, 1.0, 2.0, 2.0, 5.0, 2.0, 4.0, 3.0, 5.0, 2.0,
        ],
    );
    let z = t(&[1, 2, 3, 2], &[1u8, 0, 0, 1, 2, 20, 3, 2, 4, 3, 15, 2]);
    let node = NodeSpec::onnx("DequantizeLinear", 21)
        .attr("axis", AttrValue::Int(1))
        .attr("block_size", AttrValue::Int(2));
    let out = dequantize(node, &[Some(&x), Some(&s), Some(&z)]);
    assert_eq!(
        out[0].to_vec::<f32>().unwrap(),
        vec![
            6.0, 178.0, 136.0, 199.0, 144.0, 78.0, 12.0, 48.0, 96.0, 86.0, 60.0, -14.0, 10.0, 20.0,
            32.0, 90.0, 250.0, 80.0, 1210.0, 194.0, 0.0, 417.0, 530.0, 200.0
        ]
    );
}

#[test]
fn dequantize_output_types() {
    let x = t(&[2], &[-32768i16, 32767]);
    let s = t::<f16>(&[], &[f16::from_f32(0.5)]);
    let out = dequantize(
        NodeSpec::onnx("DequantizeLinear", 21),
        &[Some(&x), Some(&s)],
    );
    assert_eq!(out[0].dtype(), DType::F16);
    assert_eq!(
        out[0].to_vec::<f16>().unwrap(),
        vec![f16::from_f32(-16384.0), f16::from_f32(16383.5)]
    );
    let x = t(&[2], &[65535u16, 1]);
    let s = t::<f32>(&[], &[1.0]);
    let z = t::<u16>(&[], &[1]);
    let node = NodeSpec::onnx("DequantizeLinear", 23).attr("output_dtype", AttrValue::Int(16));
    let out = dequantize(node, &[Some(&x), Some(&s), Some(&z)]);
    assert_eq!(out[0].dtype(), DType::BF16);
    assert_eq!(
        out[0].to_vec::<bf16>().unwrap(),
        vec![bf16::from_f32(65534.0), bf16::from_f32(0.0)]
    );
    // Zero point of another type than x.
    let z = t::<u8>(&[], &[1]);
    assert!(run(
        dequantize_factory,
        NodeSpec::onnx("DequantizeLinear", 21),
        &[Some(&x), Some(&s), Some(&z)]
    )
    .is_err());
}

#[test]
fn dynamic_quantize() {
    // Conformance test_dynamicquantizelinear_min_adjusted.
    let x = t(
        &[3, 4],
        &[
            1.0f32, 2.1, 1.3, 2.5, 3.34, 4.0, 1.5, 2.6, 3.9, 4.0, 3.0, 2.345,
        ],
    );
    let out = run_kernel_opt(
        stateless(DynamicQuantize),
        &NodeSpec::onnx("DynamicQuantizeLinear", 11).outputs(3),
        &[Some(&x)],
        None,
    )
    .expect("run");
    assert_eq!(
        out[0].to_vec::<u8>().unwrap(),
        vec![64, 134, 83, 159, 213, 255, 96, 166, 249, 255, 191, 149]
    );
    assert_eq!(out[1].to_vec::<f32>().unwrap(), vec![0.015_686_275]);
    assert_eq!(out[1].shape(), &[] as &[usize]);
    assert_eq!(out[2].to_vec::<u8>().unwrap(), vec![0]);
    // Operators.md example: x = [0, 2, -3, -2.5, 1.34, 0.5] -> scale 5/255, zero point 153.
    let x = t(&[6], &[0.0f32, 2.0, -3.0, -2.5, 1.34, 0.5]);
    let out = run_kernel_opt(
        stateless(DynamicQuantize),
        &NodeSpec::onnx("DynamicQuantizeLinear", 11).outputs(3),
        &[Some(&x)],
        None,
    )
    .expect("run");
    assert_eq!(
        out[0].to_vec::<u8>().unwrap(),
        vec![153, 255, 0, 26, 221, 179]
    );
    assert_eq!(out[2].to_vec::<u8>().unwrap(), vec![153]);
}

fn run_stateless<K: Kernel + Clone>(
    k: K,
    node: NodeSpec,
    inputs: &[Option<&HostTensor>],
) -> Result<Vec<HostTensor>, PluginError> {
    both(node, inputs, |node, inputs, blas| {
        run_kernel_opt(stateless(k.clone()), node, inputs, blas)
    })
}

#[test]
fn matmul_integer() {
    let mm = |ins: &[Option<&HostTensor>]| {
        run_stateless(
            matmul::MatMulInteger,
            NodeSpec::onnx("MatMulInteger", 10),
            ins,
        )
    };
    // Conformance test_matmulinteger.
    let a = t(&[4, 3], &[11u8, 7, 3, 10, 6, 2, 9, 5, 1, 8, 4, 0]);
    let b = t(&[3, 2], &[1u8, 4, 2, 5, 3, 6]);
    let az = t(&[1], &[12u8]);
    let bz = t(&[1], &[0u8]);
    let out = mm(&[Some(&a), Some(&b), Some(&az), Some(&bz)]).unwrap();
    assert_eq!(out[0].shape(), &[4, 2]);
    assert_eq!(
        out[0].to_vec::<i32>().unwrap(),
        vec![-38, -83, -44, -98, -50, -113, -56, -128]
    );
    // Mixed i8 x u8, per-row A zero point, per-column B zero point, batch broadcast.
    let a = t(&[2, 2, 2], &[1i8, -2, 3, 4, -5, 6, 7, -8]);
    let b = t(&[2, 3], &[1u8, 2, 3, 4, 5, 6]);
    let az = t(&[2], &[1i8, -1]);
    let bz = t(&[3], &[1u8, 0, 2]);
    let out = mm(&[Some(&a), Some(&b), Some(&az), Some(&bz)]).unwrap();
    assert_eq!(out[0].shape(), &[2, 2, 3]);
    // A - az = [[0,-3],[4,5]], [[-6,5],[8,-7]]; B - bz = [[0,2,1],[3,5,4]].
    assert_eq!(
        out[0].to_vec::<i32>().unwrap(),
        vec![-9, -15, -12, 15, 33, 24, 15, 13, 14, -21, -19, -20]
    );
    // 1-D operands, no zero points.
    let a = t(&[2], &[2u8, 3]);
    let b = t(&[2, 2], &[1u8, 2, 3, 4]);
    let out = mm(&[Some(&a), Some(&b)]).unwrap();
    assert_eq!(out[0].shape(), &[2]);
    assert_eq!(out[0].to_vec::<i32>().unwrap(), vec![11, 16]);
    // Inner dimension mismatch.
    let b = t(&[3, 1], &[1u8, 2, 3]);
    assert!(mm(&[Some(&a), Some(&b)]).is_err());
}

#[test]
fn qlinear_matmul_conformance() {
    // Inputs: a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point.
    let qmm = |ins: [&HostTensor; 8], opset: i32| {
        run_stateless(
            matmul::QLinearMatMul,
            NodeSpec::onnx("QLinearMatMul", opset),
            &ins.map(Some),
        )
        .unwrap()
    };
    // test_qlinearmatmul_2D_uint8_float16 (scales in f16).
    let h = |v: f32| t::<f16>(&[1], &[f16::from_f32(v)]);
    let a = t(&[2, 4], &[208u8, 236, 0, 238, 3, 214, 255, 29]);
    let b = t(
        &[4, 3],
        &[152u8, 51, 244, 60, 26, 255, 0, 127, 246, 127, 254, 247],
    );
    let (as_, bs, ys) = (h(0.006_599_426), h(0.007_049_560_5), h(0.010_696_411));
    let (az, bz, yz) = (t(&[1], &[113u8]), t(&[1], &[114u8]), t(&[1], &[118u8]));
    let out = qmm([&a, &as_, &az, &b, &bs, &bz, &ys, &yz], 21);
    assert_eq!(
        out[0].to_vec::<u8>().unwrap(),
        vec![168, 115, 255, 1, 66, 151]
    );
    // test_qlinearmatmul_3D_int8_float32.
    let f = |v: f32| t::<f32>(&[1], &[v]);
    let a = t(
        &[2, 2, 4],
        &[
            81i8, 109, -127, 111, -124, 87, -128, -98, 81, 109, -127, 111, -124, 87, -128, -98,
        ],
    );
    let b = t(
        &[2, 4, 3],
        &[
            25i8, -76, 117, -67, -101, -128, -127, 0, 119, 0, 127, 120, 25, -76, 117, -67, -101,
            -128, -127, 0, 119, 0, 127, 120,
        ],
    );
    let (as_, bs, ys) = (f(0.0066), f(0.00705), f(0.0107));
    let (az, bz, yz) = (t(&[1], &[-14i8]), t(&[1], &[-13i8]), t(&[1], &[-9i8]));
    let out = qmm([&a, &as_, &az, &b, &bs, &bz, &ys, &yz], 10);
    assert_eq!(out[0].shape(), &[2, 2, 3]);
    assert_eq!(
        out[0].to_vec::<i8>().unwrap(),
        vec![41, -12, -9, 1, -75, -128, 41, -12, -9, 1, -75, -128]
    );
}

fn conv_node(op: &str, attrs: &[(&str, AttrValue)]) -> NodeSpec {
    attrs
        .iter()
        .fold(NodeSpec::onnx(op, 10), |n, (k, v)| n.attr(k, v.clone()))
}

#[test]
fn conv_integer_padding_and_per_channel_zero_point() {
    // Conformance test_convinteger_with_padding.
    let x = t(&[1, 1, 3, 3], &[2u8, 3, 4, 5, 6, 7, 8, 9, 10]);
    let w = t(&[2, 1, 2, 2], &[1u8; 8]);
    let xz = t::<u8>(&[], &[1]);
    let wz = t(&[2], &[0u8, 1]);
    let node = conv_node(
        "ConvInteger",
        &[("pads", AttrValue::Ints(vec![1, 1, 1, 1]))],
    );
    let out = run(
        conv::conv_integer_factory,
        node,
        &[Some(&x), Some(&w), Some(&xz), Some(&wz)],
    )
    .unwrap();
    assert_eq!(out[0].shape(), &[1, 2, 4, 4]);
    let mut want = vec![1, 3, 5, 3, 5, 12, 16, 9, 11, 24, 28, 15, 7, 15, 17, 9];
    want.extend([0; 16]);
    assert_eq!(out[0].to_vec::<i32>().unwrap(), want);
    // Without padding (test_convinteger_without_padding): [[12, 16], [24, 28]].
    let w = t(&[1, 1, 2, 2], &[1u8; 4]);
    let out = run(
        conv::conv_integer_factory,
        conv_node("ConvInteger", &[]),
        &[Some(&x), Some(&w), Some(&xz)],
    )
    .unwrap();
    assert_eq!(out[0].to_vec::<i32>().unwrap(), vec![12, 16, 24, 28]);
}

#[test]
fn conv_integer_strides_dilations_groups_auto_pad() {
    // 1-D, two groups, stride 2, dilation 2, SAME_UPPER.
    let x = t(&[1, 2, 5], &[1i8, 2, 3, 4, 5, 10, 20, 30, 40, 50]);
    let w = t(&[2, 1, 2], &[1i8, -1, 2, 1]);
    let node = conv_node(
        "ConvInteger",
        &[
            ("group", AttrValue::Int(2)),
            ("strides", AttrValue::Ints(vec![2])),
            ("dilations", AttrValue::Ints(vec![2])),
            ("auto_pad", AttrValue::String("SAME_UPPER".into())),
        ],
    );
    let out = run(conv::conv_integer_factory, node, &[Some(&x), Some(&w)]).unwrap();
    // out = ceil(5/2) = 3; extent 3, total pad = (3-1)*2 + 3 - 5 = 2 -> 1 before, 1 after.
    // Channel 0 taps at p-1, p+1 for p = 0, 2, 4: [0-2, 2-4, 4-0] = [-2, -2, 4].
    // Channel 1 (w = 2, 1) on [10..50]: [0+20, 40+40, 80+0] = [20, 80, 80].
    assert_eq!(out[0].shape(), &[1, 2, 3]);
    assert_eq!(out[0].to_vec::<i32>().unwrap(), vec![-2, -2, 4, 20, 80, 80]);
    // SAME_LOWER with an odd total pad puts the extra one in front.
    let x = t(&[1, 1, 4], &[1u8, 2, 3, 4]);
    let w = t(&[1, 1, 2], &[1u8, 10]);
    let node = conv_node(
        "ConvInteger",
        &[("auto_pad", AttrValue::String("SAME_LOWER".into()))],
    );
    let out = run(conv::conv_integer_factory, node, &[Some(&x), Some(&w)]).unwrap();
    assert_eq!(out[0].to_vec::<i32>().unwrap(), vec![10, 21, 32, 43]);
    let node = conv_node(
        "ConvInteger",
        &[("auto_pad", AttrValue::String("SAME_UPPER".into()))],
    );
    let out = run(conv::conv_integer_factory, node, &[Some(&x), Some(&w)]).unwrap();
    assert_eq!(out[0].to_vec::<i32>().unwrap(), vec![21, 32, 43, 4]);
}

#[test]
fn qlinear_conv_conformance_and_bias() {
    // Conformance test_qlinearconv.
    let x = t(
        &[1, 1, 7, 7],
        &[
            255u8, 174, 162, 25, 203, 168, 58, 15, 59, 237, 95, 129, 0, 64, 56, 242, 153, 221, 168,
            12, 166, 232, 178, 186, 195, 237, 162, 237, 188, 39, 124, 77, 80, 102, 43, 127, 230,
            21, 83, 41, 40, 134, 255, 154, 92, 141, 42, 148, 247,
        ],
    );
    let xs = t::<f32>(&[], &[0.003_692_047]);
    let xz = t::<u8>(&[], &[132]);
    let w = t(&[1, 1, 1, 1], &[0u8]);
    let ws = t(&[1], &[0.001_727_945_8f32]);
    let wz = t(&[1], &[255u8]);
    let ys = t::<f32>(&[], &[0.001_626_812_6]);
    let yz = t::<u8>(&[], &[123]);
    let ins = [
        Some(&x),
        Some(&xs),
        Some(&xz),
        Some(&w),
        Some(&ws),
        Some(&wz),
        Some(&ys),
        Some(&yz),
    ];
    let out = run(
        conv::qlinear_conv_factory,
        conv_node("QLinearConv", &[]),
        &ins,
    )
    .unwrap();
    assert_eq!(
        out[0].to_vec::<u8>().unwrap(),
        vec![
            0, 81, 93, 230, 52, 87, 197, 240, 196, 18, 160, 126, 255, 191, 199, 13, 102, 34, 87,
            243, 89, 23, 77, 69, 60, 18, 93, 18, 67, 216, 131, 178, 175, 153, 212, 128, 25, 234,
            172, 214, 215, 121, 0, 101, 163, 114, 213, 107, 8
        ]
    );
    // int8, per-channel w scale, bias.
    let x = t(&[1, 1, 2], &[4i8, -2]);
    let xs = t::<f32>(&[], &[0.5]);
    let xz = t::<i8>(&[], &[0]);
    let w = t(&[2, 1, 1], &[2i8, -3]);
    let ws = t(&[2], &[1.0f32, 2.0]);
    let wz = t(&[2], &[0i8, 0]);
    let ys = t::<f32>(&[], &[0.25]);
    let yz = t::<i8>(&[], &[-1]);
    let bias = t(&[2], &[1i32, 100]);
    let ins = [
        Some(&x),
        Some(&xs),
        Some(&xz),
        Some(&w),
        Some(&ws),
        Some(&wz),
        Some(&ys),
        Some(&yz),
        Some(&bias),
    ];
    let out = run(
        conv::qlinear_conv_factory,
        conv_node("QLinearConv", &[]),
        &ins,
    )
    .unwrap();
    // oc 0: (8+1, -4+1) * 2 - 1 = [17, -7]; oc 1: (-12+100, 6+100) * 4 - 1 = [351 -> 127, 423 -> 127].
    assert_eq!(out[0].to_vec::<i8>().unwrap(), vec![17, -7, 127, 127]);
}

/// Low-bit codes (one byte per element) as a host tensor.
fn codes(dtype: DType, shape: &[usize], v: &[u8]) -> HostTensor {
    HostTensor::from_bytes(dtype, shape, v).expect("codes")
}

fn bytes(t: &HostTensor) -> Vec<u8> {
    t.view().as_bytes().expect("bytes").to_vec()
}

#[test]
fn quantize_int4_uint2_saturate_and_round() {
    let x = t(&[6], &[0.0f32, 2.5, 3.5, 100.0, -100.0, -2.5]);
    let s = t::<f32>(&[], &[1.0]);
    let z = codes(DType::I4, &[], &[1]);
    let out = quantize(
        NodeSpec::onnx("QuantizeLinear", 21),
        &[Some(&x), Some(&s), Some(&z)],
    );
    assert_eq!(out[0].dtype(), DType::I4);
    // rint(x) + 1, clamped to [-8, 7]; stored as sign-extended bytes.
    let want: Vec<u8> = [1i8, 3, 5, 7, -8, -1].iter().map(|&v| v as u8).collect();
    assert_eq!(bytes(&out[0]), want);
    let out = quantize(
        NodeSpec::onnx("QuantizeLinear", 25).attr("output_dtype", AttrValue::Int(25)),
        &[Some(&x), Some(&s)],
    );
    assert_eq!(out[0].dtype(), DType::U2);
    assert_eq!(bytes(&out[0]), vec![0, 2, 3, 3, 0, 0]);
}

#[test]
fn quantize_float8_saturate_attribute() {
    let x = t(&[3], &[1000.0f32, -0.0, 3.0]);
    let s = t::<f32>(&[], &[1.0]);
    let z = codes(DType::F8E4M3FN, &[], &[0]);
    let sat = quantize(
        NodeSpec::onnx("QuantizeLinear", 21),
        &[Some(&x), Some(&s), Some(&z)],
    );
    // 448 (saturated), -0, 3.
    assert_eq!(bytes(&sat[0]), vec![0x7E, 0x80, 0x44]);
    let nosat = quantize(
        NodeSpec::onnx("QuantizeLinear", 21).attr("saturate", AttrValue::Int(0)),
        &[Some(&x), Some(&s), Some(&z)],
    );
    assert_eq!(bytes(&nosat[0]), vec![0x7F, 0x80, 0x44]);
}

#[test]
fn dequantize_float8_and_int2() {
    let x = codes(DType::F8E5M2, &[3], &[0x3C, 0xC0, 0x7C]);
    let s = t::<f32>(&[], &[2.0]);
    let out = dequantize(
        NodeSpec::onnx("DequantizeLinear", 21),
        &[Some(&x), Some(&s)],
    );
    assert_eq!(
        out[0].to_vec::<f32>().unwrap(),
        vec![2.0, -4.0, f32::INFINITY]
    );
    let x = codes(DType::I2, &[4], &[0xFE, 0xFF, 0, 1]);
    let z = codes(DType::I2, &[], &[0xFF]);
    let out = dequantize(
        NodeSpec::onnx("DequantizeLinear", 25),
        &[Some(&x), Some(&s), Some(&z)],
    );
    assert_eq!(out[0].to_vec::<f32>().unwrap(), vec![-2.0, 0.0, 2.0, 4.0]);
}

/// The official QuantizeLinear / DequantizeLinear cases, the 4-/2-bit, float8 and float4
/// ones included.
#[test]
fn onnx_quantize_dequantize_cases() {
    crate::testcases::run_cases(&["test_quantizelinear"], quantize_factory as Factory);
    crate::testcases::run_cases(&["test_dequantizelinear"], dequantize_factory as Factory);
}

/// Pads of 2^30 per side blow a 1x1 QLinearConv up to ~2^62 accumulators: refused as too
/// large (the accumulator used to be allocated infallibly); overflowing pads are invalid.
#[test]
fn qlinear_conv_huge_pads_are_refused() {
    let x = t(&[1, 1, 1, 1], &[3u8]);
    let (w, s, z) = (
        t(&[1, 1, 1, 1], &[2u8]),
        t::<f32>(&[], &[0.5]),
        t::<u8>(&[], &[0]),
    );
    let ins = [
        Some(&x),
        Some(&s),
        Some(&z),
        Some(&w),
        Some(&s),
        Some(&z),
        Some(&s),
        Some(&z),
    ];
    for (pad, code) in [
        (1i64 << 30, ErrorCode::ResourceExhausted),
        (i64::MAX, ErrorCode::InvalidArgument),
    ] {
        let node = conv_node("QLinearConv", &[("pads", AttrValue::Ints(vec![pad; 4]))]);
        let e = run(conv::qlinear_conv_factory, node, &ins).expect_err("too large");
        assert_eq!(e.code, code, "{}", e.message);
    }
}

/// The channels-last direct loops (depthwise, few input channels) against hostile windows:
/// huge dilations and pads, a kernel larger than x, an empty x. Each call returns a result
/// or a clear error, never a panic.
#[test]
fn channels_last_direct_loops_survive_hostile_windows() {
    let s = t::<f32>(&[], &[0.5]);
    let z = t::<u8>(&[], &[7]);
    // 64 channels: the VNNI depthwise loop where the CPU has it (symmetric i8 weights).
    for (c, m, group) in [(3usize, 4usize, 1usize), (16, 16, 16), (64, 64, 64)] {
        let w = t(&[m, c / group, 3, 3], &vec![1i8; m * (c / group) * 9]);
        let wz = t(&[m], &vec![0i8; m]);
        for (h, wd) in [(5usize, 6usize), (0, 4)] {
            let x = t(&[1, h, wd, c], &vec![9u8; h * wd * c]);
            let ins = [
                Some(&x),
                Some(&s),
                Some(&z),
                Some(&w),
                Some(&s),
                Some(&wz),
                Some(&s),
                Some(&z),
            ];
            for (dil, pad) in [(1i64 << 20, 0i64), (1, 1 << 20), (1 << 40, 1 << 41), (1, 0)] {
                let node = conv_node(
                    "QLinearConv",
                    &[
                        ("group", AttrValue::Int(group as i64)),
                        ("dilations", AttrValue::Ints(vec![dil, 1])),
                        ("pads", AttrValue::Ints(vec![pad; 4])),
                    ],
                )
                .domain("com.microsoft")
                .attr("channels_last", AttrValue::Int(1));
                for node in [node.clone(), node.constant(3).constant(5)] {
                    // Ok or an error: what matters is that it returns; the plain window over
                    // a real image must compute (x is 9 everywhere, its zero point 7, W 1:
                    // each 3x3 window sums 9 * 2 * (c / group), times 0.5 * 0.5 / 0.5).
                    let r = run(conv::qlinear_conv_factory, node, &ins);
                    if (dil, pad, h) == (1, 0, 5) {
                        let y = r.expect("plain window");
                        assert_eq!(y[0].shape(), &[1, 3, 4, m]);
                        let want = 7 + 9 * (c / group) as u8;
                        assert!(
                            y[0].bytes().iter().all(|&v| v == want),
                            "{:?}",
                            y[0].bytes()
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn per_tensor_fast_paths_match_the_formula_across_chunks_and_edge_values() {
    // Longer than one parallel chunk, with ties, saturation, infinities and NaN.
    let n = 3 * GRAIN + 17;
    let mut xs: Vec<f32> = (0..n).map(|i| (i as f32 - n as f32 / 2.0) * 0.37).collect();
    // Quotients of exact halves (0.25 / 0.5 = 0.5, ...) with odd zero points: rounding must
    // come before the zero point is added (ties to even move otherwise).
    xs[..11].copy_from_slice(&[
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.5,
        -2.5,
        1e30,
        0.25,
        0.75,
        -0.25,
        1.25,
        -1.75,
    ]);
    let x = t(&[n], &xs);
    let s = t::<f32>(&[], &[0.5]);
    for (zp, signed) in [(t::<u8>(&[], &[7]), false), (t::<i8>(&[], &[-3]), true)] {
        let q = quantize(
            NodeSpec::onnx("QuantizeLinear", 19),
            &[Some(&x), Some(&s), Some(&zp)],
        );
        let z = if signed { -3.0 } else { 7.0 };
        let want: Vec<u8> = xs
            .iter()
            .map(|&v| {
                let r = (v / 0.5).round_ties_even() as f64 + z;
                if signed {
                    (r as i8) as u8
                } else {
                    r as u8
                }
            })
            .collect();
        assert_eq!(q[0].bytes(), &want[..], "signed {signed}");
        // And back: (q - z) * s, for every element.
        let d = dequantize(
            NodeSpec::onnx("DequantizeLinear", 19),
            &[Some(&q[0]), Some(&s), Some(&zp)],
        );
        let back = d[0].to_vec::<f32>().unwrap();
        for (i, (&b, &c)) in back.iter().zip(q[0].bytes()).enumerate() {
            let code = if signed { c as i8 as f32 } else { c as f32 };
            assert_eq!(b, (code - z as f32) * 0.5, "element {i}");
        }
    }
}

/// The im2col shapes of the BLAS path (1x1 transposed in blocks, 2-D with strides, padding,
/// dilation and groups, any other rank) against the plain loops, on pseudo-random data, with
/// u8 and i8 outputs and a bias.
#[test]
fn qlinear_conv_blas_path_matches_the_loops_on_every_im2col_shape() {
    let bytes = |n: usize, seed: u32| -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
            .collect()
    };
    // (x shape, w shape, attributes)
    type Case<'a> = (Vec<usize>, Vec<usize>, Vec<(&'a str, AttrValue)>);
    let cases: Vec<Case> = vec![
        (vec![1, 70, 5, 6], vec![9, 70, 1, 1], vec![]),
        (
            vec![2, 4, 9, 8],
            vec![6, 2, 3, 3],
            vec![
                ("group", AttrValue::Int(2)),
                ("strides", AttrValue::Ints(vec![2, 1])),
                ("pads", AttrValue::Ints(vec![1, 2, 1, 0])),
                ("dilations", AttrValue::Ints(vec![1, 2])),
            ],
        ),
        (
            vec![1, 3, 11],
            vec![4, 3, 3],
            vec![("pads", AttrValue::Ints(vec![1, 1]))],
        ),
    ];
    for (k, (xs, wsh, attrs)) in cases.into_iter().enumerate() {
        let m = wsh[0];
        let x = t(&xs, &bytes(xs.iter().product(), k as u32));
        let w: Vec<i8> = bytes(wsh.iter().product(), 7 + k as u32)
            .into_iter()
            .map(|b| b as i8)
            .collect();
        let w = t(&wsh, &w);
        let bias: Vec<i32> = (0..m as i32).map(|i| i * 37 - 100).collect();
        let b = t(&[m], &bias);
        for signed_out in [false, true] {
            let xs_ = t::<f32>(&[], &[0.02]);
            let xz = t::<u8>(&[], &[120]);
            let ws = t(&[m], &vec![0.01f32; m]);
            let ys = t::<f32>(&[], &[0.5]);
            let yz_u = t::<u8>(&[], &[7]);
            let yz_i = t::<i8>(&[], &[-3]);
            let yz = if signed_out { &yz_i } else { &yz_u };
            let ins = [
                Some(&x),
                Some(&xs_),
                Some(&xz),
                Some(&w),
                Some(&ws),
                None,
                Some(&ys),
                Some(yz),
                Some(&b),
            ];
            // `run` checks the BLAS path against the loops byte for byte.
            let out = run(
                conv::qlinear_conv_factory,
                conv_node("QLinearConv", &attrs),
                &ins,
            )
            .unwrap_or_else(|e| panic!("case {k}: {e:?}"));
            assert_eq!(out[0].shape()[1], m, "case {k}");
        }
    }
}

/// QLinearAdd is `Q(DQ(A) + DQ(B))`: compared with this plugin's DequantizeLinear, an f32
/// add and its QuantizeLinear (equal but for rare ties, one step apart: the kernel computes
/// as ONNX Runtime's), for u8 and i8, equal shapes (the vectorized loop, over more than one
/// parallel chunk) and broadcast shapes, including values that saturate.
#[test]
fn qlinear_add_is_dequantize_add_quantize() {
    let bytes = |n: usize, seed: u32| -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 11) as u8)
            .collect()
    };
    let cases: [(&[usize], &[usize]); 3] = [
        (&[2, 3, 70, 90], &[2, 3, 70, 90]),
        (&[2, 4, 5, 6], &[4, 1, 1]),
        (&[1, 6], &[3, 1]),
    ];
    for signed in [false, true] {
        for (k, (sa, sb)) in cases.iter().enumerate() {
            let (na, nb) = (sa.iter().product(), sb.iter().product());
            let (ab, bb) = (bytes(na, k as u32), bytes(nb, 99 + k as u32));
            let q8 = |shape: &[usize], v: &[u8]| -> HostTensor {
                if signed {
                    let v: Vec<i8> = v.iter().map(|&b| b as i8).collect();
                    t(shape, &v)
                } else {
                    t(shape, v)
                }
            };
            let zp = |v: u8| {
                if signed {
                    q8(&[], &[v.wrapping_sub(128)])
                } else {
                    q8(&[], &[v])
                }
            };
            let (a, b) = (q8(sa, &ab), q8(sb, &bb));
            let (az, bz, cz) = (zp(120), zp(3), zp(200));
            let (as_, bs, cs) = (
                t::<f32>(&[], &[0.031]),
                t::<f32>(&[], &[0.007]),
                t::<f32>(&[], &[0.02]),
            );
            let fused = run(
                add::qlinear_add_factory,
                NodeSpec::onnx("QLinearAdd", 1).domain("com.microsoft"),
                &[
                    Some(&a),
                    Some(&as_),
                    Some(&az),
                    Some(&b),
                    Some(&bs),
                    Some(&bz),
                    Some(&cs),
                    Some(&cz),
                ],
            )
            .expect("QLinearAdd");
            let dq = |x: &HostTensor, s: &HostTensor, z: &HostTensor| {
                let f = dequantize(
                    NodeSpec::onnx("DequantizeLinear", 19),
                    &[Some(x), Some(s), Some(z)],
                );
                f[0].to_vec::<f32>().expect("f32")
            };
            let (fa, fb) = (dq(&a, &as_, &az), dq(&b, &bs, &bz));
            let shape = crate::util::broadcast_shapes(&[sa, sb]).expect("broadcast");
            let (ta, tb) = (
                crate::util::broadcast_strides(sa, &shape),
                crate::util::broadcast_strides(sb, &shape),
            );
            let n: usize = shape.iter().product();
            let (mut ia, mut ib) = (Vec::new(), Vec::new());
            crate::util::walk_offsets(&shape, &ta, 0, n, |o| ia.push(o));
            crate::util::walk_offsets(&shape, &tb, 0, n, |o| ib.push(o));
            let sum: Vec<f32> = ia.iter().zip(&ib).map(|(&i, &j)| fa[i] + fb[j]).collect();
            let want = quantize(
                NodeSpec::onnx("QuantizeLinear", 19),
                &[Some(&t(&shape, &sum)), Some(&cs), Some(&cz)],
            );
            assert_eq!(fused[0].shape(), &shape[..], "case {k}");
            assert_eq!(fused[0].dtype(), want[0].dtype(), "case {k}");
            // ONNX Runtime's arithmetic (scale ratios, fused multiply-adds): the unfused
            // graph's bytes but for rare ties, one step apart.
            let value = |v: u8| {
                if signed {
                    i32::from(v as i8)
                } else {
                    i32::from(v)
                }
            };
            let apart: Vec<i32> = fused[0]
                .bytes()
                .iter()
                .zip(want[0].bytes())
                .map(|(&f, &w)| (value(f) - value(w)).abs())
                .collect();
            assert!(
                apart.iter().all(|&d| d <= 1),
                "case {k}, signed {signed}: more than one step apart"
            );
            let ties = apart.iter().filter(|&&d| d == 1).count();
            assert!(
                ties * 50 <= n,
                "case {k}, signed {signed}: {ties} of {n} differ"
            );
            let (lo, hi) = if signed { (0x80, 0x7f) } else { (0, 255) };
            let saturated = want[0]
                .bytes()
                .iter()
                .filter(|&&v| v == lo || v == hi)
                .count();
            assert!(
                saturated > 0 || k > 0,
                "case {k}: the data should reach saturation"
            );
        }
    }
}

/// Depthwise 2-D convolutions (one input channel per group) take a direct loop: ConvInteger
/// against a naive convolution written here, and QLinearConv against requantizing that
/// ConvInteger result with its bias, over strides, asymmetric padding, dilation, a channel
/// multiplier of 2, u8 and i8 inputs and per-channel weight zero points.
#[test]
fn depthwise_convolutions_match_a_naive_convolution() {
    let bytes = |n: usize, seed: u32| -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 9) as u8)
            .collect()
    };
    // (x shape, output channels, kernel, strides, pads [top, left, bottom, right], dilations)
    type Case = (
        [usize; 4],
        usize,
        [usize; 2],
        [usize; 2],
        [usize; 4],
        [usize; 2],
    );
    let cases: [Case; 4] = [
        ([2, 3, 9, 11], 3, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
        ([1, 4, 10, 7], 8, [3, 3], [2, 2], [1, 0, 2, 1], [1, 1]),
        ([1, 2, 12, 300], 2, [3, 2], [1, 3], [0, 2, 1, 0], [2, 2]),
        ([1, 1, 5, 5], 1, [5, 5], [1, 1], [2, 2, 2, 2], [1, 1]),
    ];
    for (k, (xs, m, ks, st, pads, dil)) in cases.into_iter().enumerate() {
        let c = xs[1];
        let mg = m / c;
        for x_signed in [false, true] {
            let xb = bytes(xs.iter().product(), k as u32);
            let wb = bytes(m * ks[0] * ks[1], 50 + k as u32);
            let x = if x_signed {
                t(&xs, &xb.iter().map(|&b| b as i8).collect::<Vec<_>>())
            } else {
                t(&xs, &xb)
            };
            let xz_v: i32 = if x_signed { -7 } else { 131 };
            let xz = if x_signed {
                t::<i8>(&[], &[-7])
            } else {
                t::<u8>(&[], &[131])
            };
            let w = t(
                &[m, 1, ks[0], ks[1]],
                &wb.iter().map(|&b| b as i8).collect::<Vec<_>>(),
            );
            let wz_v: Vec<i8> = (0..m).map(|i| (i as i8) * 3 - 4).collect();
            let wz = t(&[m], &wz_v);
            let attrs = vec![
                ("group", AttrValue::Int(c as i64)),
                (
                    "kernel_shape",
                    AttrValue::Ints(ks.iter().map(|&v| v as i64).collect()),
                ),
                (
                    "strides",
                    AttrValue::Ints(st.iter().map(|&v| v as i64).collect()),
                ),
                (
                    "pads",
                    AttrValue::Ints(pads.iter().map(|&v| v as i64).collect()),
                ),
                (
                    "dilations",
                    AttrValue::Ints(dil.iter().map(|&v| v as i64).collect()),
                ),
            ];
            // The naive convolution.
            let oh = (xs[2] + pads[0] + pads[2] - (ks[0] - 1) * dil[0] - 1) / st[0] + 1;
            let ow = (xs[3] + pads[1] + pads[3] - (ks[1] - 1) * dil[1] - 1) / st[1] + 1;
            let xval = |i: usize| {
                if x_signed {
                    xb[i] as i8 as i32
                } else {
                    xb[i] as i32
                }
            };
            let mut want = Vec::new();
            for n in 0..xs[0] {
                for oc in 0..m {
                    let ic = oc / mg;
                    for y in 0..oh {
                        for xx in 0..ow {
                            let mut acc = 0i32;
                            for a in 0..ks[0] {
                                for b in 0..ks[1] {
                                    let iy = (y * st[0] + a * dil[0]) as isize - pads[0] as isize;
                                    let ix = (xx * st[1] + b * dil[1]) as isize - pads[1] as isize;
                                    if iy < 0
                                        || ix < 0
                                        || iy >= xs[2] as isize
                                        || ix >= xs[3] as isize
                                    {
                                        continue;
                                    }
                                    let xi =
                                        ((n * c + ic) * xs[2] + iy as usize) * xs[3] + ix as usize;
                                    let wv = wb[(oc * ks[0] + a) * ks[1] + b] as i8 as i32;
                                    acc += (xval(xi) - xz_v) * (wv - wz_v[oc] as i32);
                                }
                            }
                            want.push(acc);
                        }
                    }
                }
            }
            let got = run(
                conv::conv_integer_factory,
                conv_node("ConvInteger", &attrs),
                &[Some(&x), Some(&w), Some(&xz), Some(&wz)],
            )
            .unwrap_or_else(|e| panic!("case {k}: {e:?}"));
            assert_eq!(got[0].shape(), &[xs[0], m, oh, ow], "case {k}");
            assert_eq!(
                got[0].to_vec::<i32>().unwrap(),
                want,
                "case {k}, signed x {x_signed}"
            );

            // QLinearConv: the same sums, biased and requantized (x_s * w_s / y_s, + y_zp).
            let bias: Vec<i32> = (0..m as i32).map(|i| i * 211 - 300).collect();
            let (xsc, ysc) = (0.02f32, 0.3f32);
            let wsc: Vec<f32> = (0..m).map(|i| 0.01 + 0.002 * i as f32).collect();
            let y_zp = 9u8;
            let out = run(
                conv::qlinear_conv_factory,
                conv_node("QLinearConv", &attrs),
                &[
                    Some(&x),
                    Some(&t::<f32>(&[], &[xsc])),
                    Some(&xz),
                    Some(&w),
                    Some(&t(&[m], &wsc)),
                    Some(&wz),
                    Some(&t::<f32>(&[], &[ysc])),
                    Some(&t::<u8>(&[], &[y_zp])),
                    Some(&t(&[m], &bias)),
                ],
            )
            .unwrap_or_else(|e| panic!("case {k}: {e:?}"));
            let plane = oh * ow;
            let requantized: Vec<u8> = want
                .iter()
                .enumerate()
                .map(|(i, &a)| {
                    let oc = (i / plane) % m;
                    // The f32 product (as ONNX Runtime), plus the zero point, rounded half
                    // to even (as the ONNX reference).
                    let p = (a + bias[oc]) as f32 * (xsc * wsc[oc] / ysc);
                    let q = (f64::from(p) + f64::from(y_zp)).round_ties_even();
                    q.clamp(0.0, 255.0) as u8
                })
                .collect();
            assert_eq!(
                out[0].to_vec::<u8>().unwrap(),
                requantized,
                "case {k}, signed x {x_signed}"
            );
        }
    }
}

/// `x` (`[n, c, h, w]` bytes) transposed to channels-last `[n, h, w, c]`.
fn to_nhwc(x: &[u8], [_, c, h, w]: [usize; 4]) -> Vec<u8> {
    let mut out = vec![0; x.len()];
    for (i, &v) in x.iter().enumerate() {
        let (b, ch, p) = (i / (c * h * w), (i / (h * w)) % c, i % (h * w));
        out[(b * h * w + p) * c + ch] = v;
    }
    out
}

/// The channels-last `com.microsoft::QLinearConv` (what the layout pass compiles integer
/// convolutions into) gives exactly the NCHW operator's bytes, transposed: pointwise (read
/// in place), strided pointwise, 3x3 with padding, grouped, depthwise (its own loop; more
/// channels than one block), depthwise with a channel multiplier (through the product), u8
/// and i8, per-channel weight zero points, with and without a BLAS backend.
#[test]
fn channels_last_convolutions_equal_the_nchw_ones() {
    let bytes = |n: usize, seed: u32| -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 11) as u8)
            .collect()
    };
    // (x shape, output channels, group, kernel, strides, pads)
    type Case = ([usize; 4], usize, usize, [usize; 2], [usize; 2], [usize; 4]);
    let cases: [Case; 19] = [
        ([1, 16, 5, 7], 24, 1, [1, 1], [1, 1], [0, 0, 0, 0]),
        ([2, 8, 9, 6], 12, 1, [1, 1], [2, 2], [0, 0, 0, 0]),
        ([2, 8, 9, 6], 12, 1, [3, 3], [1, 1], [1, 1, 1, 1]),
        ([1, 8, 7, 7], 6, 2, [3, 3], [2, 1], [1, 0, 1, 2]),
        ([1, 6, 4, 4], 6, 2, [1, 1], [1, 1], [0, 0, 0, 0]),
        ([1, 20, 9, 8], 20, 20, [3, 3], [2, 2], [1, 1, 1, 1]),
        ([1, 300, 4, 5], 300, 300, [3, 3], [1, 1], [1, 1, 1, 1]),
        ([1, 4, 6, 6], 8, 4, [3, 3], [1, 1], [0, 1, 2, 1]),
        // Depthwise, a kernel wider than the padding on one side and uneven strides.
        ([2, 32, 7, 9], 32, 32, [5, 5], [1, 2], [2, 0, 1, 3]),
        ([1, 3, 3, 2], 3, 3, [3, 3], [1, 1], [2, 2, 2, 2]),
        // Depthwise rows wide enough for runs of four positions and a partial run, two
        // blocks of 16 channels and a partial one.
        ([1, 40, 6, 13], 40, 40, [3, 3], [1, 1], [1, 1, 1, 1]),
        // Two images framed in zero-point bytes (a small padded plane), uneven pads.
        ([2, 24, 7, 7], 24, 24, [3, 3], [1, 1], [2, 1, 0, 1]),
        ([2, 48, 11, 15], 48, 48, [3, 3], [2, 2], [0, 1, 1, 0]),
        // Depthwise over blocks of 64 channels (the VNNI loop, where the CPU has it) and a
        // remainder of 16, planes too large for the zero-point frame, so that the border
        // positions run too: 3x3, stride 2, and 5x5 (taps not a multiple of four).
        ([1, 144, 15, 14], 144, 144, [3, 3], [1, 1], [1, 1, 1, 1]),
        ([1, 64, 30, 31], 64, 64, [3, 3], [2, 2], [1, 1, 1, 1]),
        ([1, 80, 16, 15], 80, 80, [5, 5], [1, 1], [2, 2, 2, 2]),
        // Few input channels (a first layer's direct loop when the weights' zero points are
        // zero): 3x3 stride 2, 7x7 over 4 channels, fewer outputs than a block, 1 channel.
        ([2, 3, 9, 11], 20, 1, [3, 3], [2, 2], [1, 1, 1, 1]),
        ([1, 4, 12, 13], 40, 1, [7, 7], [2, 2], [3, 3, 3, 3]),
        ([1, 1, 5, 5], 3, 1, [2, 3], [1, 1], [0, 1, 1, 0]),
    ];
    for (k, (xs, m, group, ks, st, pads)) in cases.into_iter().enumerate() {
        let cg = xs[1] / group;
        for (x_signed, symmetric) in [(false, false), (true, false), (false, true), (true, true)] {
            let xb = bytes(xs.iter().product(), k as u32);
            let wb = bytes(m * cg * ks[0] * ks[1], 70 + k as u32);
            let x_of = |shape: &[usize], b: &[u8]| {
                if x_signed {
                    t(shape, &b.iter().map(|&v| v as i8).collect::<Vec<_>>())
                } else {
                    t(shape, b)
                }
            };
            let xz = if x_signed {
                t::<i8>(&[], &[-5])
            } else {
                t::<u8>(&[], &[121])
            };
            let w = t(
                &[m, cg, ks[0], ks[1]],
                &wb.iter().map(|&b| b as i8).collect::<Vec<_>>(),
            );
            // Per-channel weight zero points, or all zero (symmetric weights).
            let wz = t(
                &[m],
                &(0..m)
                    .map(|i| if symmetric { 0 } else { (i % 7) as i8 - 3 })
                    .collect::<Vec<_>>(),
            );
            let wsc: Vec<f32> = (0..m).map(|i| 0.003 + 0.0005 * (i % 11) as f32).collect();
            let bias: Vec<i32> = (0..m as i32).map(|i| i * 97 - 400).collect();
            let attrs = [
                ("group", AttrValue::Int(group as i64)),
                (
                    "kernel_shape",
                    AttrValue::Ints(ks.map(|v| v as i64).to_vec()),
                ),
                ("strides", AttrValue::Ints(st.map(|v| v as i64).to_vec())),
                ("pads", AttrValue::Ints(pads.map(|v| v as i64).to_vec())),
            ];
            let rest = [
                t::<f32>(&[], &[0.05]),
                xz,
                w,
                t(&[m], &wsc),
                wz,
                t::<f32>(&[], &[0.4]),
                t::<u8>(&[], &[17]),
                t(&[m], &bias),
            ];
            let conv = |node: NodeSpec, x: &HostTensor| {
                let mut inputs = vec![Some(x)];
                inputs.extend(rest.iter().map(Some));
                run(conv::qlinear_conv_factory, node, &inputs)
                    .unwrap_or_else(|e| panic!("case {k}: {e:?}"))
                    .remove(0)
            };
            let nchw = conv(conv_node("QLinearConv", &attrs), &x_of(&xs, &xb));
            // The weights and their zero point known at load (prepared then) or not.
            let constant = |node: NodeSpec| node.constant(3).constant(5);
            let [_, _, oh, ow] = nchw.shape() else {
                panic!("case {k}: output {:?}", nchw.shape());
            };
            let (oh, ow) = (*oh, *ow);
            let node = conv_node("QLinearConv", &attrs)
                .domain("com.microsoft")
                .attr("channels_last", AttrValue::Int(1));
            let [n, c, h, wd] = xs;
            let x_nhwc = x_of(&[n, h, wd, c], &to_nhwc(&xb, xs));
            for node in [node.clone(), constant(node)] {
                let calls = crate::nn::testblas::REQUANT_CALLS.with(|c| c.get());
                let nhwc = conv(node, &x_nhwc);
                // One group over more than a few channels: the requantizing BLAS path ran
                // (and `run` compared it with the loops).
                if group == 1 && xs[1] >= 8 {
                    assert!(
                        crate::nn::testblas::REQUANT_CALLS.with(|c| c.get()) > calls,
                        "case {k}: the BLAS did not requantize"
                    );
                }
                assert_eq!(nhwc.shape(), &[n, oh, ow, m], "case {k}");
                assert_eq!(
                    nhwc.bytes(),
                    to_nhwc(nchw.bytes(), [n, m, oh, ow]),
                    "case {k}, signed x {x_signed}, symmetric w {symmetric}"
                );
            }
        }
    }
}

/// QGemm against its formula: u8/i8 A, i8/u8 B plain and transposed, per-column scales and
/// zero points, each form of C, alpha, f32 and u8/i8 outputs, 200 columns (two of the
/// kernel's packed blocks when B is constant), with and without a BLAS backend.
#[test]
fn qgemm_gives_the_formulas_values() {
    let (m, k, n) = (3usize, 7usize, 200usize);
    let value = |b: u8, signed: bool| if signed { b as i8 as i32 } else { b as i32 };
    for (a_signed, b_signed, trans_b) in [
        (false, true, true),
        (false, true, false),
        (true, false, true),
    ] {
        let ab: Vec<u8> = (0..m * k).map(|i| (i * 37 % 251) as u8).collect();
        let bb: Vec<u8> = (0..k * n).map(|i| (i * 91 % 253) as u8).collect();
        let typed = |shape: &[usize], bytes: &[u8], signed: bool| -> HostTensor {
            if signed {
                let v: Vec<i8> = bytes.iter().map(|&b| b as i8).collect();
                t(shape, &v)
            } else {
                t(shape, bytes)
            }
        };
        let a = typed(&[m, k], &ab, a_signed);
        let b_shape = if trans_b { [n, k] } else { [k, n] };
        let b = typed(&b_shape, &bb, b_signed);
        let a_zp_byte = 5u8;
        let a_zp = typed(&[], &[a_zp_byte], a_signed);
        let b_zp_bytes: Vec<u8> = (0..n).map(|j| (j % 7) as u8).collect();
        let b_zp = typed(&[n], &b_zp_bytes, b_signed);
        let a_s = 0.02f32;
        let b_s: Vec<f32> = (0..n).map(|j| 0.001 + 0.0001 * j as f32).collect();
        let (y_s, y_zp) = (0.07f32, 9u8);
        let alpha = 0.5f32;
        let sums: Vec<i32> = (0..m * n)
            .map(|ij| {
                let (i, j) = (ij / n, ij % n);
                (0..k)
                    .map(|kk| {
                        let bv = if trans_b {
                            bb[j * k + kk]
                        } else {
                            bb[kk * n + j]
                        };
                        (value(ab[i * k + kk], a_signed) - value(a_zp_byte, a_signed))
                            * (value(bv, b_signed) - value(b_zp_bytes[j], b_signed))
                    })
                    .sum()
            })
            .collect();
        let per_column: Vec<i32> = (0..n as i32).map(|j| j * 13 - 900).collect();
        let full: Vec<i32> = (0..(m * n) as i32).map(|v| v * 3 - 500).collect();
        type Bias<'b> = (Option<HostTensor>, Box<dyn Fn(usize) -> i32 + 'b>);
        let biases: [Bias<'_>; 4] = [
            (None, Box::new(|_| 0)),
            (
                Some(t(&[n], &per_column)),
                Box::new(|ij| per_column[ij % n]),
            ),
            (
                Some(t(&[1, n], &per_column)),
                Box::new(|ij| per_column[ij % n]),
            ),
            (Some(t(&[m, n], &full)), Box::new(|ij| full[ij])),
        ];
        for (c, bias) in &biases {
            let scale_t = t::<f32>(&[], &[a_s]);
            let b_scale = t(&[n], &b_s);
            let ys = t::<f32>(&[], &[y_s]);
            let yz = t::<u8>(&[], &[y_zp]);
            let node = NodeSpec::onnx("QGemm", 1)
                .domain("com.microsoft")
                .attr("alpha", AttrValue::Float(alpha))
                .attr("transB", AttrValue::Int(i64::from(trans_b)));
            for node in [node.clone(), node.constant(3).constant(5)] {
                let mut ins = vec![
                    Some(&a),
                    Some(&scale_t),
                    Some(&a_zp),
                    Some(&b),
                    Some(&b_scale),
                    Some(&b_zp),
                    c.as_ref(),
                ];
                // f32 out: the sums plus C, times alpha * a_s * b_s.
                let y = run(qgemm::factory, node.clone(), &ins).expect("QGemm f32");
                assert_eq!(y[0].shape(), &[m, n]);
                let got = y[0].to_vec::<f32>().unwrap();
                for (ij, &g) in got.iter().enumerate() {
                    let want = sums[ij].wrapping_add(bias(ij)) as f32 * (alpha * a_s * b_s[ij % n]);
                    assert_eq!(g, want, "f32 out at {ij}, trans_b {trans_b}");
                }
                // u8 out: requantized as QLinearConv (f32 product, + zero point, rounded).
                ins.extend([Some(&ys), Some(&yz)]);
                let y = run(qgemm::factory, node, &ins).expect("QGemm u8");
                assert_eq!(y[0].dtype(), DType::U8);
                for (ij, &g) in y[0].bytes().iter().enumerate() {
                    let p =
                        sums[ij].wrapping_add(bias(ij)) as f32 * (alpha * a_s * b_s[ij % n] / y_s);
                    let want = (f64::from(p) + f64::from(y_zp))
                        .round_ties_even()
                        .clamp(0.0, 255.0);
                    assert_eq!(g, want as u8, "u8 out at {ij}, trans_b {trans_b}");
                }
            }
        }
    }
    // A C that does not broadcast, A and B that do not multiply: errors, not panics.
    let a = t(&[2, 3], &[1u8; 6]);
    let b = t(&[3, 4], &[1i8; 12]);
    let s = t::<f32>(&[], &[1.0]);
    let z = t::<u8>(&[], &[0]);
    let zb = t::<i8>(&[], &[0]);
    let bad_c = t(&[2, 1], &[1i32, 2]);
    let node = NodeSpec::onnx("QGemm", 1).domain("com.microsoft");
    let ins = [
        Some(&a),
        Some(&s),
        Some(&z),
        Some(&b),
        Some(&s),
        Some(&zb),
        Some(&bad_c),
    ];
    assert!(run(qgemm::factory, node.clone(), &ins).is_err());
    let short = t(&[2, 4], &[1i8; 8]);
    let ins = [
        Some(&a),
        Some(&s),
        Some(&z),
        Some(&short),
        Some(&s),
        Some(&zb),
    ];
    assert!(run(qgemm::factory, node, &ins).is_err());
}
