use super::*;
use crate::testcases::run_cases_min;
use crate::util::testing::{assert_close, t};
use opreg_sdk::{
    host::HostTensor,
    testkit::{run_kernel, NodeSpec},
};

#[test]
fn conformance_optimizers() {
    run_cases_min(&["test_adagrad"], 2, adagrad_factory);
    run_cases_min(&["test_adam"], 2, adam_factory);
    run_cases_min(
        &["test_momentum", "test_nesterov_momentum"],
        3,
        momentum_factory,
    );
}

fn node(op: &str, outputs: usize, attrs: &[(&str, f32)]) -> NodeSpec {
    attrs.iter().fold(
        NodeSpec::onnx(op, 1).domain(DOMAIN).outputs(outputs),
        |n, &(name, v)| n.attr(name, AttrValue::Float(v)),
    )
}

fn momentum(mode: &str, outputs: usize) -> NodeSpec {
    node(
        "Momentum",
        outputs,
        &[("alpha", 0.5), ("beta", 2.0), ("norm_coefficient", 0.5)],
    )
    .attr("mode", AttrValue::String(mode.into()))
}

fn scalars(r: f32, step: i64) -> (HostTensor, HostTensor) {
    (t::<f32>(&[], &[r]), t::<i64>(&[], &[step]))
}

fn f32s(out: &HostTensor) -> Vec<f32> {
    out.to_vec::<f32>().expect("f32 output")
}

fn run(
    factory: Factory,
    spec: &NodeSpec,
    inputs: &[&HostTensor],
) -> Result<Vec<HostTensor>, PluginError> {
    run_kernel(factory, spec, inputs, None)
}

fn assert_invalid(r: Result<Vec<HostTensor>, PluginError>, op: &str, what: &str) {
    let e = r.expect_err("must be refused");
    assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
    assert!(e.message.contains(op) && e.message.contains(what), "{e}");
}

#[test]
fn adagrad_two_tensors_by_hand() {
    // r = 1 / (1 + 1 * 1) = 0.5; H += G^2; X -= r * G / sqrt(H).
    let spec = node(
        "Adagrad",
        4,
        &[
            ("decay_factor", 1.0),
            ("epsilon", 0.0),
            ("norm_coefficient", 0.0),
        ],
    );
    let (r, step) = scalars(1.0, 1);
    let (x1, x2) = (t(&[1], &[1.0f32]), t(&[2], &[2.0f32, -1.0]));
    let (g1, g2) = (t(&[1], &[3.0f32]), t(&[2], &[4.0f32, 0.0]));
    let (h1, h2) = (t(&[1], &[16.0f32]), t(&[2], &[9.0f32, 1.0]));
    let out = run(
        adagrad_factory,
        &spec,
        &[&r, &step, &x1, &x2, &g1, &g2, &h1, &h2],
    )
    .expect("run");
    assert_eq!(out.len(), 4);
    assert_close(&f32s(&out[0]), &[0.7], 1e-6);
    assert_close(&f32s(&out[1]), &[1.6, -1.0], 1e-6);
    assert_close(&f32s(&out[2]), &[25.0], 1e-6);
    assert_close(&f32s(&out[3]), &[25.0, 1.0], 1e-6);
    assert_eq!(out[1].shape(), &[2]);
}

#[test]
fn adagrad_in_double_with_regularization() {
    // G' = 0.5 * 2 + 1 = 2; H = 0 + 4; X = 2 - 0.25 * 2 / (2 + 0) = 1.75 (t = 0: no decay).
    let spec = node(
        "Adagrad",
        2,
        &[
            ("decay_factor", 3.0),
            ("epsilon", 0.0),
            ("norm_coefficient", 0.5),
        ],
    );
    let r = t::<f64>(&[], &[0.25]);
    let step = t::<i64>(&[], &[0]);
    let (x, g, h) = (t(&[1], &[2.0f64]), t(&[1], &[1.0f64]), t(&[1], &[0.0f64]));
    let out = run(adagrad_factory, &spec, &[&r, &step, &x, &g, &h]).expect("run");
    assert_eq!(out[0].to_vec::<f64>().expect("x"), vec![1.75]);
    assert_eq!(out[1].to_vec::<f64>().expect("h"), vec![4.0]);
}

#[test]
fn adagrad_refuses_an_incomplete_group() {
    let spec = node("Adagrad", 2, &[]);
    let (r, step) = scalars(0.1, 0);
    let x = t(&[2], &[1.0f32, 2.0]);
    // X, G, H, and a stray fourth tensor.
    assert_invalid(
        run(adagrad_factory, &spec, &[&r, &step, &x, &x, &x, &x]),
        "Adagrad",
        "multiple of 3",
    );
    // Only R and T.
    assert_invalid(
        run(adagrad_factory, &spec, &[&r, &step]),
        "Adagrad",
        "at least 5",
    );
    // R must be one value.
    let r2 = t(&[2], &[0.1f32, 0.2]);
    assert_invalid(
        run(adagrad_factory, &spec, &[&r2, &step, &x, &x, &x]),
        "Adagrad",
        "'R' must be a scalar",
    );
    // The optimized tensors share one type.
    let xd = t(&[2], &[1.0f64, 2.0]);
    assert_invalid(
        run(adagrad_factory, &spec, &[&r, &step, &x, &xd, &x]),
        "Adagrad",
        "share one type",
    );
}

#[test]
fn adam_by_hand() {
    // V = 0.5 * 0 + 0.5 * 2 = 1; H = 0.75 * 0 + 0.25 * 4 = 1;
    // r = 0.1 * sqrt(1 - 0.75) / (1 - 0.5) = 0.1; X = (1 - 0.5) * (1 - 0.1 * 1 / 1) = 0.45.
    let spec = node(
        "Adam",
        3,
        &[
            ("alpha", 0.5),
            ("beta", 0.75),
            ("epsilon", 0.0),
            ("norm_coefficient", 0.0),
            ("norm_coefficient_post", 0.5),
        ],
    );
    let (r, step) = scalars(0.1, 1);
    let (x, g, v, h) = (
        t(&[1], &[1.0f32]),
        t(&[1], &[2.0f32]),
        t(&[1], &[0.0f32]),
        t(&[1], &[0.0f32]),
    );
    let out = run(adam_factory, &spec, &[&r, &step, &x, &g, &v, &h]).expect("run");
    assert_close(&f32s(&out[0]), &[0.45], 1e-6);
    assert_close(&f32s(&out[1]), &[1.0], 1e-6);
    assert_close(&f32s(&out[2]), &[1.0], 1e-6);
    // At t = 0 there is no bias correction: X = 0.5 * (1 - 0.1) with the same momentums.
    let step0 = t::<i64>(&[], &[0]);
    let out = run(adam_factory, &spec, &[&r, &step0, &x, &g, &v, &h]).expect("run");
    assert_close(&f32s(&out[0]), &[0.45], 1e-6);
    // At t = 2: r = 0.1 * sqrt(1 - 0.5625) / (1 - 0.25) = 0.0881917...
    let step2 = t::<i64>(&[], &[2]);
    let out = run(adam_factory, &spec, &[&r, &step2, &x, &g, &v, &h]).expect("run");
    let r2 = 0.1 * (1.0f64 - 0.5625).sqrt() / 0.75;
    assert_close(&f32s(&out[0]), &[(0.5 * (1.0 - r2)) as f32], 1e-6);
}

#[test]
fn adam_refuses_mismatched_shapes_and_outputs() {
    let (r, step) = scalars(0.1, 1);
    let x = t(&[2], &[1.0f32, 2.0]);
    let g = t(&[3], &[1.0f32, 2.0, 3.0]);
    assert_invalid(
        run(
            adam_factory,
            &node("Adam", 3, &[]),
            &[&r, &step, &x, &g, &x, &x],
        ),
        "Adam",
        "shape [3]",
    );
    // One optimized tensor gives three outputs, not two.
    assert_invalid(
        run(
            adam_factory,
            &node("Adam", 2, &[]),
            &[&r, &step, &x, &x, &x, &x],
        ),
        "Adam",
        "3 outputs",
    );
}

#[test]
fn momentum_standard_and_nesterov_by_hand() {
    let (r, step) = scalars(0.5, 1);
    let (x, g, v) = (t(&[1], &[2.0f32]), t(&[1], &[1.0f32]), t(&[1], &[4.0f32]));
    // G' = 0.5 * 2 + 1 = 2; V = 0.5 * 4 + 2 * 2 = 6; X = 2 - 0.5 * 6 = -1.
    let out = run(
        momentum_factory,
        &momentum("standard", 2),
        &[&r, &step, &x, &g, &v],
    )
    .expect("run");
    assert_close(&f32s(&out[0]), &[-1.0], 1e-6);
    assert_close(&f32s(&out[1]), &[6.0], 1e-6);
    // Nesterov: X = 2 - 0.5 * (2 + 0.5 * 6) = -0.5.
    let out = run(
        momentum_factory,
        &momentum("nesterov", 2),
        &[&r, &step, &x, &g, &v],
    )
    .expect("run");
    assert_close(&f32s(&out[0]), &[-0.5], 1e-6);
    assert_close(&f32s(&out[1]), &[6.0], 1e-6);
    // At t = 0 the gradient's coefficient is 1: V = 2 + 2 = 4, X = 2 - 0.5 * 4 = 0.
    let step0 = t::<i64>(&[], &[0]);
    let out = run(
        momentum_factory,
        &momentum("standard", 2),
        &[&r, &step0, &x, &g, &v],
    )
    .expect("run");
    assert_close(&f32s(&out[0]), &[0.0], 1e-6);
    assert_close(&f32s(&out[1]), &[4.0], 1e-6);
}

#[test]
fn momentum_refuses_bad_attributes_and_shapes() {
    let (r, step) = scalars(0.5, 1);
    let x = t(&[2], &[1.0f32, 2.0]);
    let v = t(&[2, 1], &[1.0f32, 2.0]);
    assert_invalid(
        run(
            momentum_factory,
            &momentum("standard", 2),
            &[&r, &step, &x, &x, &v],
        ),
        "Momentum",
        "shape [2, 1]",
    );
    assert_invalid(
        run(
            momentum_factory,
            &momentum("sgd", 2),
            &[&r, &step, &x, &x, &x],
        ),
        "Momentum",
        "'mode'",
    );
    let no_alpha = node("Momentum", 2, &[("beta", 1.0), ("norm_coefficient", 0.0)])
        .attr("mode", AttrValue::String("standard".into()));
    assert_invalid(
        run(momentum_factory, &no_alpha, &[&r, &step, &x, &x, &x]),
        "Momentum",
        "'alpha' is required",
    );
}

#[test]
fn optimizers_are_registered_in_the_training_domain() {
    let reg = opreg_sdk::module::collect_from(register).expect("registration");
    let ops: Vec<(&str, &str, i32)> = reg
        .kernels
        .iter()
        .map(|k| {
            (
                k.desc.domain.as_str(),
                k.desc.op_type.as_str(),
                k.desc.since_version,
            )
        })
        .collect();
    for op in ["Adagrad", "Adam", "Momentum"] {
        assert!(ops.contains(&(DOMAIN, op, 1)), "{ops:?}");
    }
    // R, T, then any number of T3 tensors.
    let d = &reg.kernels[0].desc;
    assert!(d
        .accepts(&[
            Some(DType::F32),
            Some(DType::I64),
            Some(DType::F64),
            Some(DType::F64)
        ])
        .is_ok());
    assert!(d
        .accepts(&[Some(DType::F32), Some(DType::I32), Some(DType::F32)])
        .is_err());
}

#[test]
fn inference_gives_each_output_its_tensor_type_and_shape() {
    use opreg_sdk::ValueInfo;
    let value = |dtype: DType, shape: &'static [i64]| ValueInfo {
        name: "",
        present: true,
        dtype,
        shape: Some(shape),
        constant: None,
    };
    let spec = node("Adagrad", 4, &[]);
    let inputs = [
        value(DType::F32, &[]),
        value(DType::I64, &[]),
        value(DType::F64, &[1]),
        value(DType::F64, &[2, 3]),
        value(DType::F64, &[1]),
        value(DType::F64, &[2, 3]),
        value(DType::F64, &[1]),
        value(DType::F64, &[2, 3]),
    ];
    let info = NodeInfo {
        name: "n",
        domain: DOMAIN,
        op_type: "Adagrad",
        opset: 1,
        device: Device::CPU,
        attributes: std::borrow::Cow::Borrowed(spec.attributes.as_slice()),
        inputs: inputs.to_vec(),
        outputs: vec![value(DType::UNDEFINED, &[]); 4],
        blas: None,
        context: None,
    };
    let facts = crate::infer::infer(&info).expect("infer");
    let shapes: Vec<Option<Vec<i64>>> = facts.iter().map(|f| f.shape.clone()).collect();
    assert_eq!(
        shapes,
        vec![
            Some(vec![1]),
            Some(vec![2, 3]),
            Some(vec![1]),
            Some(vec![2, 3])
        ]
    );
    assert!(
        facts.iter().all(|f| f.dtype == Some(DType::F64)),
        "{facts:?}"
    );
}
