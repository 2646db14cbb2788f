//! Regression tests for the fuzzer's findings (`tests/fuzz.rs`): a malformed node (too few
//! inputs, absent required inputs, inputs of too low a rank, empty inputs, attribute lists
//! shorter than the spatial rank, attribute products that overflow) is refused with an
//! error naming the input or attribute at fault, never a panic that the SDK has to catch.
//! Kernels are resolved from the plugin's registration table, as the host resolves them.

use crate::util::testing::Shared;
use opreg_sdk::{
    host::HostTensor,
    kernel::FfiKernelFactoryBox,
    prelude::*,
    testkit::{run_kernel_opt, NodeSpec},
};
use std::sync::Arc;

/// Every kernel the plugin registers: its description and a factory shared by many runs.
fn registered() -> Vec<(KernelDesc, Arc<FfiKernelFactoryBox>)> {
    opreg_sdk::module::collect_from(crate::register)
        .expect("registration")
        .kernels
        .into_iter()
        .map(|k| (k.desc, Arc::new(k.factory)))
        .collect()
}

/// The element type a kernel accepts at input `i` (the first of its constraint's types).
fn input_type(desc: &KernelDesc, i: usize) -> DType {
    let Some(name) = desc
        .input_constraints
        .get(i.min(desc.input_constraints.len().saturating_sub(1)))
    else {
        return DType::F32;
    };
    if let Some(c) = desc.type_constraints.iter().find(|c| &c.name == name) {
        if let Some(&t) = c.types.first() {
            return t;
        }
    }
    match name.as_str() {
        n if n.contains("int64") => DType::I64,
        n if n.contains("string") => DType::String,
        _ => DType::F32,
    }
}

/// Runs the kernel of `reg` on `inputs` with `attrs`, with a BLAS backend.
fn run_reg(
    reg: &(KernelDesc, Arc<FfiKernelFactoryBox>),
    attrs: &[(&str, AttrValue)],
    inputs: &[Option<&HostTensor>],
) -> Result<Vec<HostTensor>, PluginError> {
    let d = &reg.0;
    let mut spec = NodeSpec::onnx(d.op_type.as_str(), d.since_version).domain(d.domain.as_str());
    spec.num_outputs = d.output_constraints.len().max(1);
    for (name, value) in attrs {
        spec = spec.attr(name, value.clone());
    }
    run_kernel_opt(
        Shared(reg.1.clone()),
        &spec,
        inputs,
        Some(Box::new(crate::nn::testblas::NaiveBlas)),
    )
}

fn ints(v: &[i64]) -> AttrValue {
    AttrValue::Ints(v.to_vec())
}

/// Attribute sets the sweep runs every kernel with: none, small ones that let window and
/// cast operators reach their computation, and extreme ones (lists shorter than any spatial
/// rank, values whose products overflow).
fn attr_sets() -> Vec<Vec<(&'static str, AttrValue)>> {
    let big = 1i64 << 40;
    vec![
        vec![],
        vec![
            ("kernel_shape", ints(&[1])),
            ("strides", ints(&[1])),
            ("pads", ints(&[0, 0])),
            ("dilations", ints(&[1])),
            ("to", AttrValue::Int(1)),
            ("blocksize", AttrValue::Int(2)),
            ("hidden_size", AttrValue::Int(1)),
            ("axis", AttrValue::Int(1)),
            ("axes", ints(&[0])),
            ("perm", ints(&[1, 0])),
            ("size", AttrValue::Int(1)),
            ("k", AttrValue::Int(1)),
        ],
        vec![
            ("kernel_shape", ints(&[big, big])),
            ("strides", ints(&[i64::MAX, 1])),
            ("pads", ints(&[big, 0, 0, big])),
            ("dilations", ints(&[big, big])),
            ("output_padding", ints(&[big, big])),
            ("output_shape", ints(&[big, big])),
            ("group", AttrValue::Int(1 << 62)),
            ("blocksize", AttrValue::Int(1 << 32)),
            ("hidden_size", AttrValue::Int(big)),
            ("axis", AttrValue::Int(i64::MIN)),
            ("to", AttrValue::Int(7)),
            ("size", AttrValue::Int(i64::MAX)),
            ("k", AttrValue::Int(big)),
        ],
    ]
}

/// Every registered kernel, run on every short input list (none, fewer than declared, some
/// left out) of tensors of low rank (scalars, vectors, empty tensors), with each attribute
/// set of [`attr_sets`]: errors only, never a panic.
#[test]
fn no_kernel_panics_on_missing_or_low_rank_inputs() {
    let shapes: [&[usize]; 6] = [&[], &[0], &[1], &[2, 3], &[1, 0, 2], &[1, 1, 1, 1]];
    let attr_sets = attr_sets();
    let mut panics = Vec::new();
    for reg in registered() {
        let d = &reg.0;
        let declared = d.input_constraints.len().max(3);
        for arity in 0..=declared {
            for shape in shapes {
                let tensors: Vec<HostTensor> = (0..arity)
                    .map(|i| HostTensor::zeroed(input_type(d, i), shape).expect("tensor"))
                    .collect();
                // All given, then each one left out in turn.
                for hole in std::iter::once(None).chain((0..arity).map(Some)) {
                    let inputs: Vec<Option<&HostTensor>> = tensors
                        .iter()
                        .enumerate()
                        .map(|(i, t)| (Some(i) != hole).then_some(t))
                        .collect();
                    for (a, attrs) in attr_sets.iter().enumerate() {
                        if let Err(e) = run_reg(&reg, attrs, &inputs) {
                            if e.code == ErrorCode::Panic {
                                panics.push(format!(
                                    "{} v{}: {arity} inputs of shape {shape:?}, hole {hole:?}, \
                                     attribute set {a}: {}",
                                    d.op_type, d.since_version, e.message
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(
        panics.is_empty(),
        "{} panics:\n{}",
        panics.len(),
        panics.join("\n")
    );
}

/// Runs `op` (default domain unless `op` is `domain:op`) at `opset` as the host resolves it
/// for these inputs (`None`: left out), with a BLAS backend.
fn run_op(
    op: &str,
    opset: i32,
    attrs: &[(&str, AttrValue)],
    inputs: &[Option<&HostTensor>],
) -> Result<Vec<HostTensor>, PluginError> {
    let (domain, op) = op.rsplit_once(':').unwrap_or(("", op));
    let types: Vec<Option<DType>> = inputs.iter().map(|t| t.map(|t| t.dtype())).collect();
    let reg = registered()
        .into_iter()
        .find(|(d, _)| {
            d.op_type.as_str() == op
                && d.domain.as_str() == domain
                && d.covers(opset)
                && d.accepts(&types).is_ok()
        })
        .unwrap_or_else(|| panic!("no kernel for {op} v{opset} with {types:?}"));
    let mut spec = NodeSpec::onnx(op, opset).domain(domain);
    spec.num_outputs = reg.0.output_constraints.len().max(1);
    for (name, value) in attrs {
        spec = spec.attr(name, value.clone());
    }
    run_kernel_opt(
        Shared(reg.1),
        &spec,
        inputs,
        Some(Box::new(crate::nn::testblas::NaiveBlas)),
    )
}

/// Asserts a clean `InvalidArgument` whose message names `what` (not a caught panic).
#[track_caller]
fn assert_invalid(r: Result<Vec<HostTensor>, PluginError>, what: &str) {
    let e = r.expect_err("a malformed node must be refused");
    assert_eq!(e.code, ErrorCode::InvalidArgument, "{}", e.message);
    assert!(
        e.message.contains(what),
        "'{}' does not name {what}",
        e.message
    );
}

fn f32s(shape: &[usize]) -> HostTensor {
    HostTensor::zeroed(DType::F32, shape).expect("f32 tensor")
}

fn i64s(shape: &[usize], v: &[i64]) -> HostTensor {
    HostTensor::from_vec(shape, v).expect("i64 tensor")
}

/// RNN, GRU and LSTM with only X and W (R missing), or with R left out: the index of R
/// used to be out of bounds.
#[test]
fn recurrent_cells_need_x_w_and_r() {
    let x = f32s(&[1, 1, 1]);
    for (op, g) in [("RNN", 1), ("GRU", 3), ("LSTM", 4)] {
        let w = f32s(&[1, g, 1]);
        let attrs = [("hidden_size", AttrValue::Int(1))];
        assert_invalid(run_op(op, 14, &attrs, &[Some(&x), Some(&w)]), "'R'");
        assert_invalid(
            run_op(
                op,
                14,
                &attrs,
                &[Some(&x), Some(&w), None, Some(&f32s(&[1, 2 * g]))],
            ),
            "'R'",
        );
        assert_invalid(run_op(op, 14, &attrs, &[Some(&x)]), "'W'");
        assert_invalid(run_op(op, 14, &attrs, &[]), "'X'");
    }
}

/// Every pooling variant without X, with X of rank < 3, or with window attributes shorter
/// than the spatial rank.
#[test]
fn pooling_checks_x_and_window_lengths() {
    let x = f32s(&[1, 1, 4, 4]);
    for op in ["MaxPool", "AveragePool", "LpPool"] {
        let k2 = [("kernel_shape", ints(&[2, 2]))];
        assert_invalid(run_op(op, 18, &k2, &[]), "'X'");
        assert_invalid(run_op(op, 18, &k2, &[None]), "'X'");
        assert_invalid(run_op(op, 18, &k2, &[Some(&f32s(&[4]))]), "rank >= 3");
        assert_invalid(run_op(op, 18, &k2, &[Some(&f32s(&[]))]), "rank >= 3");
        let k1 = [("kernel_shape", ints(&[2]))];
        assert_invalid(run_op(op, 18, &k1, &[Some(&x)]), "kernel_shape");
        for attr in ["strides", "dilations", "pads"] {
            let attrs = [("kernel_shape", ints(&[2, 2])), (attr, ints(&[1]))];
            assert_invalid(run_op(op, 18, &attrs, &[Some(&x)]), attr);
        }
    }
    for op in ["GlobalAveragePool", "GlobalMaxPool"] {
        assert_invalid(run_op(op, 22, &[], &[]), "'X'");
        assert_invalid(run_op(op, 22, &[], &[Some(&f32s(&[3]))]), "rank >= 2");
    }
    assert_invalid(
        run_op(
            "MaxUnpool",
            22,
            &[("kernel_shape", ints(&[2]))],
            &[Some(&x)],
        ),
        "'I'",
    );
}

/// A SAME-padded window of 2^40 taps over 4 elements: the in-range taps are counted
/// arithmetically (walking every tap of every window used to run for hours).
#[test]
fn pooling_with_a_huge_same_window_is_quick() {
    let x = HostTensor::from_vec(&[1, 1, 4], &[1.0f32, 2.0, 3.0, 4.0]).expect("x");
    let started = std::time::Instant::now();
    for op in ["MaxPool", "AveragePool", "LpPool"] {
        let attrs = [
            ("kernel_shape", ints(&[1 << 40])),
            ("auto_pad", AttrValue::String("SAME_UPPER".into())),
        ];
        let y = run_op(op, 18, &attrs, &[Some(&x)]).expect("run");
        assert_eq!(y[0].shape(), &[1, 1, 4], "{op}");
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

/// Conv, ConvTranspose, DeformConv and the quantized convolutions without W (or offset),
/// and with a `group` whose product with the channel count overflows.
#[test]
fn convolutions_check_inputs_and_group() {
    let x = f32s(&[1, 1, 3, 3]);
    let w = f32s(&[1, 1, 1, 1]);
    assert_invalid(run_op("Conv", 22, &[], &[Some(&x)]), "'W'");
    assert_invalid(run_op("Conv", 22, &[], &[None, Some(&w)]), "'X'");
    assert_invalid(run_op("ConvTranspose", 22, &[], &[Some(&x)]), "'W'");
    assert_invalid(
        run_op("DeformConv", 22, &[], &[Some(&x), Some(&w)]),
        "'offset'",
    );
    // C = 0 divides by any group; W's 2^62 channels per group times the group overflow.
    let x0 = f32s(&[1, 0, 3, 3]);
    let group = [("group", AttrValue::Int(1 << 62))];
    let w0 = f32s(&[1, 4, 1, 1]);
    assert_invalid(run_op("Conv", 22, &group, &[Some(&x0), Some(&w0)]), "group");
    let wt = f32s(&[0, 4, 1, 1]);
    assert_invalid(
        run_op("ConvTranspose", 22, &group, &[Some(&x0), Some(&wt)]),
        "group",
    );
    let xq = HostTensor::from_vec(&[1, 1, 3, 3], &[0u8; 9]).expect("x");
    let wq = HostTensor::from_vec(&[1, 1, 1, 1], &[0u8]).expect("w");
    let s = HostTensor::from_vec(&[], &[1.0f32]).expect("scale");
    let z = HostTensor::from_vec(&[], &[0u8]).expect("zero point");
    assert_invalid(run_op("ConvInteger", 10, &[], &[Some(&xq)]), "'w'");
    let mut inputs = vec![Some(&xq), Some(&s), Some(&z), Some(&wq), None, Some(&z)];
    inputs.extend([Some(&s), Some(&z)]);
    assert_invalid(run_op("QLinearConv", 10, &[], &inputs), "'w_scale'");
    inputs[3] = None;
    assert_invalid(run_op("QLinearConv", 10, &[], &inputs), "'w'");
}

/// MatMul and Gemm with one operand; MatMulInteger and QLinearMatMul without B or a scale.
#[test]
fn matrix_products_need_both_operands() {
    let a = f32s(&[2, 2]);
    assert_invalid(run_op("MatMul", 13, &[], &[Some(&a)]), "'B'");
    assert_invalid(run_op("Gemm", 13, &[], &[Some(&a)]), "'B'");
    assert_invalid(run_op("Gemm", 13, &[], &[]), "'A'");
    let q = HostTensor::from_vec(&[2, 2], &[0u8; 4]).expect("q");
    assert_invalid(run_op("MatMulInteger", 10, &[], &[Some(&q)]), "'B'");
    let s = HostTensor::from_vec(&[], &[1.0f32]).expect("scale");
    let z = HostTensor::from_vec(&[], &[0u8]).expect("zero point");
    let mut inputs = vec![Some(&q), Some(&s), Some(&z), Some(&q), Some(&s), Some(&z)];
    inputs.extend([None, Some(&z)]);
    assert_invalid(run_op("QLinearMatMul", 21, &[], &inputs), "'y_scale'");
}

/// Single-input kernels with their input missing or left out.
#[test]
fn single_input_kernels_need_their_input() {
    type Attrs = Vec<(&'static str, AttrValue)>;
    let cases: [(&str, i32, Attrs); 12] = [
        ("Softmax", 13, vec![]),
        ("LogSoftmax", 13, vec![]),
        ("Hardmax", 13, vec![]),
        ("Cast", 21, vec![("to", AttrValue::Int(1))]),
        ("Unique", 11, vec![]),
        ("Neg", 13, vec![]),
        ("Celu", 12, vec![]),
        ("ReduceSum", 13, vec![]),
        ("ArgMax", 13, vec![]),
        ("TopK", 11, vec![]),
        ("LRN", 13, vec![("size", AttrValue::Int(1))]),
        ("LayerNormalization", 17, vec![]),
    ];
    for (op, opset, attrs) in cases {
        assert_invalid(run_op(op, opset, &attrs, &[]), "missing");
        assert_invalid(run_op(op, opset, &attrs, &[None]), "missing");
    }
    // CumSum: x missing, or its axis input left out.
    let x = f32s(&[3]);
    assert_invalid(run_op("CumSum", 14, &[], &[]), "'X'");
    assert_invalid(run_op("CumSum", 14, &[], &[Some(&x), None]), "'axis'");
    // LayerNormalization and BatchNormalization without their scale.
    assert_invalid(
        run_op("LayerNormalization", 17, &[], &[Some(&x)]),
        "'Scale'",
    );
    let xb = f32s(&[1, 2, 2]);
    assert_invalid(
        run_op(
            "BatchNormalization",
            15,
            &[],
            &[Some(&xb), Some(&f32s(&[2]))],
        ),
        "'B'",
    );
}

/// Quantize / Dequantize without their scale.
#[test]
fn quantizers_need_a_scale() {
    let x = f32s(&[2]);
    assert_invalid(run_op("QuantizeLinear", 21, &[], &[Some(&x)]), "'y_scale'");
    let q = HostTensor::from_vec(&[2], &[0u8; 2]).expect("q");
    assert_invalid(
        run_op("DequantizeLinear", 21, &[], &[Some(&q)]),
        "'x_scale'",
    );
}

/// The string kernels with an input missing.
#[test]
fn string_kernels_need_their_inputs() {
    let s = HostTensor::from_strings(&[1], &[b"a"]).expect("strings");
    assert_invalid(run_op("StringNormalizer", 10, &[], &[]), "'X'");
    assert_invalid(run_op("StringConcat", 20, &[], &[Some(&s)]), "'Y'");
    assert_invalid(run_op("StringSplit", 20, &[], &[None]), "'X'");
    let tfidf = [
        ("mode", AttrValue::String("TF".into())),
        ("min_gram_length", AttrValue::Int(1)),
        ("max_gram_length", AttrValue::Int(1)),
        ("max_skip_count", AttrValue::Int(0)),
        ("ngram_counts", ints(&[0])),
        ("ngram_indexes", ints(&[0])),
        ("pool_strings", AttrValue::Strings(vec!["a".into()])),
    ];
    assert_invalid(run_op("TfIdfVectorizer", 9, &tfidf, &[]), "'X'");
    // An output column index of i64::MAX: refused (the output size no longer overflows).
    let mut huge = tfidf.to_vec();
    huge[5] = ("ngram_indexes", ints(&[i64::MAX]));
    let e = run_op("TfIdfVectorizer", 9, &huge, &[Some(&s)]).expect_err("too large");
    assert_ne!(e.code, ErrorCode::Panic, "{}", e.message);
}

/// DepthToSpace with a blocksize whose square overflows; SpaceToDepth's output channels
/// overflowing.
#[test]
fn depth_to_space_blocksize_products_are_checked() {
    let x = f32s(&[1, 4, 1, 1]);
    let attrs = [("blocksize", AttrValue::Int(1 << 32))];
    assert_invalid(run_op("DepthToSpace", 13, &attrs, &[Some(&x)]), "blocksize");
    assert_invalid(run_op("DepthToSpace", 13, &attrs, &[]), "missing");
    let e = run_op(
        "SpaceToDepth",
        13,
        &attrs,
        &[Some(&f32s(&[1, 1 << 31, 0, 0]))],
    );
    assert_ne!(e.expect_err("refused").code, ErrorCode::Panic);
}

/// The integer-input kernels of CumProd, the windows and DFT with their second input missing.
#[test]
fn integer_input_kernels_need_their_inputs() {
    let x = f32s(&[3]);
    assert_invalid(run_op("CumProd", 26, &[], &[Some(&x)]), "'axis'");
    assert_invalid(
        run_op("STFT", 17, &[], &[Some(&f32s(&[1, 4, 1]))]),
        "'frame_step'",
    );
    let one = i64s(&[], &[1]);
    assert_invalid(
        run_op(
            "MelWeightMatrix",
            17,
            &[],
            &[Some(&one), Some(&one), Some(&one)],
        ),
        "'lower_edge_hertz'",
    );
}

/// TfIdfVectorizer over a row of 65536 values none of which is in the pool, with 256 skips:
/// a gram stops at the first value outside the pool (it used to look up every gram of every
/// skip, several seconds in a debug build).
#[test]
fn tfidf_skips_values_outside_the_pool_quickly() {
    let attrs = [
        ("mode", AttrValue::String("TF".into())),
        ("min_gram_length", AttrValue::Int(1)),
        ("max_gram_length", AttrValue::Int(2)),
        ("max_skip_count", AttrValue::Int(255)),
        ("ngram_counts", ints(&[0, 4])),
        ("ngram_indexes", ints(&[0, 1, 2, 3, 4, 5, 6])),
        ("pool_int64s", ints(&[2, 3, 5, 4, 5, 6, 7, 8, 6, 7])),
    ];
    let x = HostTensor::from_vec(&[65536], &vec![0i64; 65536]).expect("x");
    let started = std::time::Instant::now();
    let y = run_op("TfIdfVectorizer", 9, &attrs, &[Some(&x)]).expect("run");
    assert_eq!(y[0].to_vec::<f32>().expect("f32"), vec![0.0; 7]);
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

/// Attention on empty operands whose extents multiply past 2^64: no loop over those extents
/// (the product used to overflow, or the loop to run for ever).
#[test]
fn attention_on_empty_operands_with_huge_extents() {
    let q4 = f32s(&[1 << 20, 1 << 44, 0, 4]);
    let y = run_op("Attention", 23, &[], &[Some(&q4), Some(&q4), Some(&q4)]).expect("run");
    assert_eq!(y[0].shape(), &[1 << 20, 1 << 44, 0, 4]);
    let q3 = f32s(&[1 << 20, 1 << 44, 0]);
    let heads = [
        ("q_num_heads", AttrValue::Int(1)),
        ("kv_num_heads", AttrValue::Int(1)),
    ];
    // Heads split without walking the 2^64 (batch, sequence) pairs; the QK table of 2^108
    // entries is then refused as too large.
    let e =
        run_op("Attention", 23, &heads, &[Some(&q3), Some(&q3), Some(&q3)]).expect_err("too large");
    assert_eq!(e.code, ErrorCode::ResourceExhausted, "{}", e.message);
}
