#![allow(clippy::indexing_slicing)]

use super::infer;
use opreg_sdk::{host::HostTensor, prelude::*, testkit::NodeSpec, ValueInfo};
use std::borrow::Cow;

/// Infers `spec` over inputs given as (type, shape) with `-1` for run-time dims.
fn run(
    spec: &NodeSpec,
    inputs: &[(DType, Option<&[i64]>)],
    consts: &[Option<&HostTensor>],
) -> Vec<OutputFact> {
    let infos = inputs
        .iter()
        .enumerate()
        .map(|(i, &(dtype, shape))| ValueInfo {
            name: "",
            present: true,
            dtype,
            shape,
            constant: consts.get(i).copied().flatten().map(|t| t.view()),
        })
        .collect();
    let node = NodeInfo {
        name: "n",
        domain: spec.domain.as_str(),
        op_type: spec.op_type.as_str(),
        opset: spec.opset,
        device: Device::CPU,
        attributes: Cow::Borrowed(spec.attributes.as_slice()),
        inputs: infos,
        outputs: (0..spec.num_outputs)
            .map(|_| ValueInfo {
                name: "",
                present: true,
                dtype: DType::UNDEFINED,
                shape: None,
                constant: None,
            })
            .collect(),
        blas: None,
        context: None,
    };
    infer(&node).expect("infer")
}

fn shape(spec: &NodeSpec, inputs: &[&[i64]]) -> Option<Vec<i64>> {
    let inputs: Vec<(DType, Option<&[i64]>)> =
        inputs.iter().map(|&s| (DType::F32, Some(s))).collect();
    run(spec, &inputs, &[])[0].shape.clone()
}

#[test]
fn run_time_batch_flows_through_an_mlp() {
    let mm = shape(&NodeSpec::onnx("MatMul", 13), &[&[-1, 784], &[784, 512]]);
    assert_eq!(mm, Some(vec![-1, 512]));
    let add = shape(&NodeSpec::onnx("Add", 14), &[&[-1, 512], &[512]]);
    assert_eq!(add, Some(vec![-1, 512]));
    assert_eq!(
        shape(&NodeSpec::onnx("Relu", 14), &[&[-1, 512]]),
        Some(vec![-1, 512])
    );
    // Broadcasting that visibly fails yields no shape (the kernel reports the error).
    assert_eq!(shape(&NodeSpec::onnx("Add", 14), &[&[2, 3], &[4, 3]]), None);
    // A run-time dimension against a fixed one takes the fixed extent.
    assert_eq!(
        shape(&NodeSpec::onnx("Mul", 14), &[&[-1, 3], &[5, 1]]),
        Some(vec![5, 3])
    );
}

#[test]
fn convolution_and_pooling_windows_use_the_kernels_geometry() {
    let conv = NodeSpec::onnx("Conv", 11)
        .attr("pads", AttrValue::Ints(vec![1, 1, 1, 1]))
        .attr("strides", AttrValue::Ints(vec![2, 2]));
    assert_eq!(
        shape(&conv, &[&[-1, 3, 64, 63], &[16, 3, 3, 3]]),
        Some(vec![-1, 16, 32, 32])
    );
    let pool = NodeSpec::onnx("MaxPool", 12)
        .attr("kernel_shape", AttrValue::Ints(vec![2, 2]))
        .attr("strides", AttrValue::Ints(vec![2, 2]))
        .attr("ceil_mode", AttrValue::Int(1));
    assert_eq!(shape(&pool, &[&[1, 8, 5, 5]]), Some(vec![1, 8, 3, 3]));
    let same = NodeSpec::onnx("AveragePool", 11)
        .attr("kernel_shape", AttrValue::Ints(vec![3]))
        .attr("strides", AttrValue::Ints(vec![2]))
        .attr("auto_pad", AttrValue::String("SAME_UPPER".into()));
    assert_eq!(shape(&same, &[&[1, 2, 7]]), Some(vec![1, 2, 4]));
    let gap = shape(&NodeSpec::onnx("GlobalAveragePool", 1), &[&[-1, 8, 5, 5]]);
    assert_eq!(gap, Some(vec![-1, 8, 1, 1]));
    // opreg's fused convolution has Conv's shape.
    let fused = NodeSpec::onnx("FusedConv", 1).domain("opreg");
    assert_eq!(
        shape(&fused, &[&[2, 3, 8, 8], &[4, 3, 3, 3]]),
        Some(vec![2, 4, 6, 6])
    );
}

#[test]
fn declared_shapes_that_do_not_fit_the_op_give_no_shape() {
    assert_eq!(shape(&NodeSpec::onnx("MatMul", 13), &[&[], &[3, 4]]), None);
    assert_eq!(
        shape(&NodeSpec::onnx("Conv", 11), &[&[1, 3, 8, 8], &[3]]),
        None
    );
    let huge = NodeSpec::onnx("Conv", 11)
        .attr("pads", AttrValue::Ints(vec![i64::MAX, 0]))
        .attr("dilations", AttrValue::Ints(vec![i64::MAX]));
    assert_eq!(
        shape(&huge, &[&[1, 1, 8], &[1, 1, 3]]),
        Some(vec![1, 1, -1])
    );
    // 2^64 overflows: unknown, not a panic (debug) or a wrapped size (release).
    let flat = shape(
        &NodeSpec::onnx("Flatten", 13),
        &[&[1 << 32, 1 << 32, 1 << 32]],
    );
    assert_eq!(flat, Some(vec![1 << 32, -1]));
    assert!(run(
        &NodeSpec::onnx("Relu", 14).outputs(0),
        &[(DType::F32, Some(&[1]))],
        &[]
    )
    .is_empty());
}

#[test]
fn reshape_reduce_types_and_unknown_ops() {
    let target = HostTensor::from_vec(&[2], &[0i64, -1]).expect("shape");
    let r = run(
        &NodeSpec::onnx("Reshape", 14),
        &[(DType::F32, Some(&[4, 3, 2])), (DType::I64, Some(&[2]))],
        &[None, Some(&target)],
    );
    assert_eq!(r[0], OutputFact::new(Some(DType::F32), Some(vec![4, 6])));
    let red = NodeSpec::onnx("ReduceMean", 13)
        .attr("axes", AttrValue::Ints(vec![-1]))
        .attr("keepdims", AttrValue::Int(0));
    assert_eq!(shape(&red, &[&[-1, 7]]), Some(vec![-1]));
    let cast = NodeSpec::onnx("Cast", 19).attr("to", AttrValue::Int(7));
    assert_eq!(
        run(&cast, &[(DType::F32, Some(&[3]))], &[])[0].dtype,
        Some(DType::I64)
    );
    let top = NodeSpec::onnx("TopK", 11).outputs(2);
    let facts = run(&top, &[(DType::F16, None), (DType::I64, Some(&[1]))], &[]);
    assert_eq!(
        (facts[0].dtype, facts[1].dtype),
        (Some(DType::F16), Some(DType::I64))
    );
    // An input of unknown type gives an output of unknown type, not a guess.
    assert_eq!(
        run(
            &NodeSpec::onnx("Relu", 14),
            &[(DType::UNDEFINED, None)],
            &[]
        )[0],
        OutputFact::unknown()
    );
    assert_eq!(shape(&NodeSpec::onnx("NoSuchOp", 1), &[&[1]]), None);
    assert_eq!(
        run(
            &NodeSpec::onnx("X", 1).domain("com.example"),
            &[(DType::F32, None)],
            &[]
        )[0],
        OutputFact::unknown()
    );
}
