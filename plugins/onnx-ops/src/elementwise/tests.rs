//! Tests through the registration table: each case resolves the kernel the way the host does
//! (op type, opset, input types) and runs it with the test kit. Expected values are computed
//! by hand (or from reference values of the functions), not by the code under test.

use super::*;
use crate::util::testing::{t, Registered};
use opreg_sdk::half::{bf16, f16};
use opreg_sdk::{
    host::HostTensor,
    testkit::{run_kernel_opt, NodeSpec},
    ErrorCode,
};

/// The registered factory for `op` at `opset` accepting these input types.
fn resolve(op: &str, opset: i32, inputs: &[Option<&HostTensor>]) -> Option<Registered> {
    let types: Vec<Option<DType>> = inputs.iter().map(|t| t.map(|t| t.dtype())).collect();
    opreg_sdk::module::collect_from(register)
        .expect("registration")
        .kernels
        .into_iter()
        .find(|k| {
            k.desc.domain.is_empty()
                && k.desc.op_type.as_str() == op
                && k.desc.covers(opset)
                && k.desc.accepts(&types).is_ok()
        })
        .map(|k| Registered(k.factory))
}

fn run_opt(
    op: &str,
    opset: i32,
    attrs: &[(&str, AttrValue)],
    inputs: &[Option<&HostTensor>],
) -> Result<HostTensor, PluginError> {
    let factory = resolve(op, opset, inputs)
        .ok_or_else(|| PluginError::unimplemented(format!("no kernel for {op} v{opset}")))?;
    let mut spec = NodeSpec::onnx(op, opset);
    for (name, value) in attrs {
        spec = spec.attr(name, value.clone());
    }
    let mut out = run_kernel_opt(factory, &spec, inputs, None)?;
    Ok(out.remove(0))
}

fn run(op: &str, opset: i32, attrs: &[(&str, AttrValue)], inputs: &[&HostTensor]) -> HostTensor {
    let inputs: Vec<_> = inputs.iter().map(|&t| Some(t)).collect();
    run_opt(op, opset, attrs, &inputs).expect(op)
}

fn b(shape: &[usize], v: &[u8]) -> HostTensor {
    HostTensor::from_bytes(DType::Bool, shape, v).expect("bool tensor")
}

fn f32s(h: &HostTensor) -> Vec<f32> {
    h.to_vec::<f32>().expect("f32 output")
}

fn f64s(h: &HostTensor) -> Vec<f64> {
    h.to_vec::<f64>().expect("f64 output")
}

fn close32(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0) || (g.is_nan() && w.is_nan()),
            "{got:?} vs {want:?}"
        );
    }
}

fn close64(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1e-300) || (g.is_nan() && w.is_nan()),
            "{got:?} vs {want:?}"
        );
    }
}

fn float(v: f32) -> AttrValue {
    AttrValue::Float(v)
}

fn int(v: i64) -> AttrValue {
    AttrValue::Int(v)
}

fn string(v: &str) -> AttrValue {
    AttrValue::String(v.into())
}

#[test]
fn relu_floats_and_signed_ints() {
    let x = t(&[5], &[-1.0f32, 0.0, 2.5, -0.0, f32::NAN]);
    let y = f32s(&run("Relu", 14, &[], &[&x]));
    assert_eq!(&y[..4], &[0.0, 0.0, 2.5, 0.0]);
    assert!(y[4].is_nan());
    let xi = t(&[3], &[-5i32, 0, 7]);
    assert_eq!(
        run("Relu", 14, &[], &[&xi]).to_vec::<i32>().expect("i32"),
        vec![0, 0, 7]
    );
    // Integer Relu exists from opset 14 only.
    assert!(resolve("Relu", 13, &[Some(&xi)]).is_none());
    assert!(resolve("Relu", 6, &[Some(&x)]).is_some());
}

#[test]
fn f32_activations_and_exp_tanh_match_their_formulas_over_wide_and_edge_inputs() {
    // The f32 loops compiled for AVX-512 / AVX2: long enough for full vectors and a
    // remainder, with the edge values among them (NaN, signed zeros, infinities, subnormals,
    // overflow of exp).
    let mut xs: Vec<f32> = (0..1037).map(|i| (i as f32 - 518.0) * 0.173).collect();
    xs.extend([
        f32::NAN,
        -0.0,
        0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-40,
        -1e-40,
        88.8,
        -104.5,
        20.0,
    ]);
    let x = t(&[xs.len()], &xs);
    let same = |op: &str, attrs: &[(&str, AttrValue)], f: &dyn Fn(f32) -> f32| {
        let got = f32s(&run(op, 14, attrs, &[&x]));
        for (&g, &v) in got.iter().zip(&xs) {
            let w = f(v);
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "{op}({v:e}) = {g:e}, want {w:e}"
            );
        }
    };
    same("Relu", &[], &|v| if v < 0.0 { 0.0 } else { v });
    same("LeakyRelu", &[("alpha", float(0.1))], &|v| {
        if v < 0.0 {
            0.1 * v
        } else {
            v
        }
    });
    let hs = |v: f32, a: f32, b: f32| (a * v + b).clamp(0.0, 1.0);
    same(
        "HardSigmoid",
        &[("alpha", float(0.3)), ("beta", float(0.4))],
        &|v| if v.is_nan() { v } else { hs(v, 0.3, 0.4) },
    );
    same("HardSwish", &[], &|v| {
        if v.is_nan() {
            v
        } else {
            v * hs(v, (1.0f64 / 6.0) as f32, 0.5)
        }
    });
    same("Floor", &[], &f32::floor);
    same("Ceil", &[], &f32::ceil);
    same("Round", &[], &f32::round_ties_even);
    // Exp, Tanh and Sigmoid within a few ulp of the correctly rounded value (f64 rounded to f32),
    // exact at the special values.
    let near = |op: &str, f: &dyn Fn(f64) -> f64| {
        let got = f32s(&run(op, 13, &[], &[&x]));
        for (&g, &v) in got.iter().zip(&xs) {
            let w = f(f64::from(v)) as f32;
            let ulp = (w.abs().max(f32::MIN_POSITIVE) * f32::EPSILON).max(1e-45);
            assert!(
                g == w
                    || (g.is_nan() && w.is_nan())
                    || (f64::from(g) - f64::from(w)).abs() <= 4.0 * f64::from(ulp),
                "{op}({v:e}) = {g:e}, want {w:e}"
            );
        }
    };
    near("Exp", &f64::exp);
    near("Tanh", &f64::tanh);
    near("Sigmoid", &|v| 1.0 / (1.0 + (-v).exp()));
}

#[test]
fn activations_match_reference_values() {
    let x = t(&[3], &[-1.0f64, 0.0, 2.0]);
    let e1 = (-1.0f64).exp_m1(); // e^-1 - 1 = -0.6321205588285577
    close64(
        &f64s(&run("LeakyRelu", 16, &[("alpha", float(0.1))], &[&x])),
        &[-0.1f32 as f64, 0.0, 2.0],
        1e-15,
    );
    close64(&f64s(&run("Elu", 6, &[], &[&x])), &[e1, 0.0, 2.0], 1e-15);
    let (a, g) = (1.673_263_2_f32 as f64, 1.050_701_f32 as f64);
    close64(
        &f64s(&run("Selu", 6, &[], &[&x])),
        &[g * a * e1, 0.0, 2.0 * g],
        1e-15,
    );
    // Celu alpha 2: 2 * (e^(-1/2) - 1).
    close64(
        &f64s(&run("Celu", 12, &[("alpha", float(2.0))], &[&x])),
        &[-0.786_938_680_574_733_2, 0.0, 2.0],
        1e-15,
    );
    close64(
        &f64s(&run("Sigmoid", 13, &[], &[&x])),
        &[0.268_941_421_369_995_1, 0.5, 0.880_797_077_977_882_3],
        1e-15,
    );
    close64(
        &f64s(&run("Tanh", 13, &[], &[&x])),
        &[-0.761_594_155_955_764_9, 0.0, 0.964_027_580_075_817],
        1e-15,
    );
    close64(
        &f64s(&run("Softplus", 1, &[], &[&x])),
        &[
            0.313_261_687_518_222_8,
            std::f64::consts::LN_2,
            2.126_928_011_042_972_5,
        ],
        1e-15,
    );
    close64(
        &f64s(&run("Softsign", 1, &[], &[&x])),
        &[-0.5, 0.0, 2.0 / 3.0],
        1e-15,
    );
    // Mish(x) = x * tanh(softplus(x)).
    close64(
        &f64s(&run("Mish", 18, &[], &[&x])),
        &[-0.303_401_461_374_108_95, 0.0, 1.943_958_959_533_994_6],
        1e-14,
    );
    // Gelu(x) = x * Phi(x); tanh form per the spec's formula.
    close64(
        &f64s(&run("Gelu", 20, &[], &[&x])),
        &[-0.158_655_253_931_457_05, 0.0, 1.954_499_736_103_642],
        1e-14,
    );
    close64(
        &f64s(&run("Gelu", 20, &[("approximate", string("tanh"))], &[&x])),
        &[-0.158_808_009_391_723_24, 0.0, 1.954_597_694_087_775],
        1e-14,
    );
    assert!(run_opt("Gelu", 20, &[("approximate", string("fast"))], &[Some(&x)]).is_err());
    assert!(resolve("Gelu", 19, &[Some(&x)]).is_none());

    let h = t(&[5], &[-4.0f32, -3.0, 0.0, 1.0, 4.0]);
    close32(
        &f32s(&run("HardSigmoid", 6, &[], &[&h])),
        &[0.0, 0.0, 0.5, 0.7, 1.0],
        1e-7,
    );
    close32(
        &f32s(&run("HardSwish", 14, &[], &[&h])),
        &[0.0, 0.0, 0.0, 2.0 / 3.0, 4.0],
        1e-7,
    );
    let th = t(&[3], &[0.5f32, 1.0, 2.0]);
    assert_eq!(
        f32s(&run("ThresholdedRelu", 10, &[], &[&th])),
        vec![0.0, 0.0, 2.0]
    );
}

#[test]
fn erf_is_accurate_across_its_ranges() {
    let cases = [
        (1e-10, 1.128_379_167_095_512_6e-10),
        (0.1, 0.112_462_916_018_284_9),
        (0.5, 0.520_499_877_813_046_5),
        (1.0, 0.842_700_792_949_714_9),
        (1.5, 0.966_105_146_475_310_7),
        (2.0, 0.995_322_265_018_952_7),
        (2.5, 0.999_593_047_982_555),
        (3.0, 0.999_977_909_503_001_4),
        (3.5, 0.999_999_256_901_627_7),
        (4.0, 0.999_999_984_582_742_1),
        (7.0, 1.0),
    ];
    for (x, want) in cases {
        for (x, want) in [(x, want), (-x, -want)] {
            let got = opreg_sdk::numeric::erf64(x);
            assert!(
                (got - want).abs() <= 2e-16 + 2e-15 * want.abs(),
                "erf({x}) = {got}, want {want}"
            );
        }
    }
    let x = t(&[3], &[0.5f32, -1.0, f32::NAN]);
    let y = f32s(&run("Erf", 13, &[], &[&x]));
    close32(&y[..2], &[0.520_499_9, -0.842_700_8], 1e-7);
    assert!(y[2].is_nan());
}

#[test]
fn float_math() {
    let x = t(&[4], &[1.0f64, 4.0, 0.25, 2.0]);
    close64(
        &f64s(&run("Exp", 13, &[], &[&x])),
        &[
            std::f64::consts::E,
            54.598_150_033_144_236,
            1.284_025_416_687_741_5,
            7.389_056_098_930_65,
        ],
        1e-15,
    );
    close64(
        &f64s(&run("Log", 13, &[], &[&x])),
        &[
            0.0,
            2.0 * std::f64::consts::LN_2,
            -2.0 * std::f64::consts::LN_2,
            std::f64::consts::LN_2,
        ],
        1e-15,
    );
    assert_eq!(
        f64s(&run("Sqrt", 13, &[], &[&x])),
        vec![1.0, 2.0, 0.5, std::f64::consts::SQRT_2]
    );
    assert_eq!(
        f64s(&run("Reciprocal", 13, &[], &[&x])),
        vec![1.0, 0.25, 4.0, 0.5]
    );

    let r = t(&[8], &[0.5f32, 1.5, 2.5, -0.5, -1.5, 2.6, -2.4, 3.0]);
    assert_eq!(
        f32s(&run("Round", 11, &[], &[&r])),
        vec![0.0, 2.0, 2.0, -0.0, -2.0, 3.0, -2.0, 3.0]
    );
    assert_eq!(
        f32s(&run("Floor", 13, &[], &[&r])),
        vec![0.0, 1.0, 2.0, -1.0, -2.0, 2.0, -3.0, 3.0]
    );
    assert_eq!(
        f32s(&run("Ceil", 13, &[], &[&r])),
        vec![1.0, 2.0, 3.0, -0.0, -1.0, 3.0, -2.0, 3.0]
    );

    use std::f64::consts::{FRAC_PI_2, FRAC_PI_4, FRAC_PI_6};
    let one = t(&[1], &[1.0f64]);
    let half = t(&[1], &[0.5f64]);
    let cases: &[(&str, &HostTensor, f64)] = &[
        ("Sin", &half, 0.479_425_538_604_203),
        ("Cos", &half, 0.877_582_561_890_372_8),
        ("Tan", &one, 1.557_407_724_654_902_3),
        ("Asin", &half, FRAC_PI_6),
        ("Acos", &half, std::f64::consts::FRAC_PI_3),
        ("Atan", &one, FRAC_PI_4),
        ("Sinh", &one, 1.175_201_193_643_801_4),
        ("Cosh", &one, 1.543_080_634_815_243_7),
        ("Asinh", &one, 0.881_373_587_019_543),
        ("Acosh", &one, 0.0),
        ("Atanh", &half, 0.549_306_144_334_054_8),
    ];
    for &(op, x, want) in cases {
        close64(&f64s(&run(op, 9, &[], &[x])), &[want], 4e-16);
    }
    let pi2 = t(&[1], &[FRAC_PI_2 as f32]);
    close32(&f32s(&run("Sin", 7, &[], &[&pi2])), &[1.0], 1e-7);
}

#[test]
fn abs_neg_sign_on_ints_and_floats() {
    let i = t(&[4], &[-3i64, 0, 5, i64::MIN + 1]);
    assert_eq!(
        run("Abs", 13, &[], &[&i]).to_vec::<i64>().expect("i64"),
        vec![3, 0, 5, i64::MAX]
    );
    assert_eq!(
        run("Neg", 13, &[], &[&i]).to_vec::<i64>().expect("i64"),
        vec![3, 0, -5, i64::MAX]
    );
    assert_eq!(
        run("Sign", 13, &[], &[&i]).to_vec::<i64>().expect("i64"),
        vec![-1, 0, 1, -1]
    );
    let u = t(&[3], &[0u8, 7, 255]);
    assert_eq!(run("Sign", 13, &[], &[&u]).bytes(), &[0, 1, 1]);
    assert_eq!(run("Abs", 13, &[], &[&u]).bytes(), &[0, 7, 255]);
    assert!(resolve("Neg", 13, &[Some(&u)]).is_none());
    let f = t(&[4], &[-2.5f32, 0.0, 3.0, f32::NAN]);
    let s = f32s(&run("Sign", 13, &[], &[&f]));
    assert_eq!(&s[..3], &[-1.0, 0.0, 1.0]);
    assert!(s[3].is_nan());
    assert_eq!(&f32s(&run("Neg", 13, &[], &[&f]))[..3], &[2.5, -0.0, -3.0]);
}

#[test]
fn half_types_compute_in_f32_and_round_trip() {
    let a = t(
        &[3],
        &[
            f16::from_f32(1.5),
            f16::from_f32(-2.0),
            f16::from_f32(65504.0),
        ],
    );
    let c = t(&[1], &[f16::from_f32(2.25)]);
    let y = run("Add", 14, &[], &[&a, &c]).to_vec::<f16>().expect("f16");
    // 65504 + 2.25 rounds back to 65504 (next f16 is 65536 -> inf boundary at 65520).
    assert_eq!(
        y,
        vec![
            f16::from_f32(3.75),
            f16::from_f32(0.25),
            f16::from_f32(65504.0)
        ]
    );
    let r = run("Relu", 14, &[], &[&a]).to_vec::<f16>().expect("f16");
    assert_eq!(
        r,
        vec![f16::from_f32(1.5), f16::ZERO, f16::from_f32(65504.0)]
    );
    // f32 -> f16 -> f32.
    let x = t(&[4], &[1.5f32, 65504.0, 1e-8, 0.1]);
    let h = run("Cast", 13, &[("to", int(10))], &[&x]);
    assert_eq!(h.dtype(), DType::F16);
    let back = f32s(&run("Cast", 13, &[("to", int(1))], &[&h]));
    assert_eq!(back, vec![1.5, 65504.0, 0.0, 0.099_975_586]);
    // bf16 math.
    let bx = t(&[2], &[bf16::from_f32(1.0), bf16::from_f32(-1.0)]);
    let by = run("Sigmoid", 13, &[], &[&bx])
        .to_vec::<bf16>()
        .expect("bf16");
    assert_eq!(
        by,
        vec![bf16::from_f32(0.730_468_75), bf16::from_f32(0.269_531_25)]
    );
    let thirds = t(&[1], &[1.0f64 / 3.0]);
    let bt = run("Cast", 13, &[("to", int(16))], &[&thirds]);
    assert_eq!(
        bt.to_vec::<bf16>().expect("bf16"),
        vec![bf16::from_f32(0.333_984_38)]
    );
}

#[test]
fn binary_broadcasting() {
    let a = t(&[2, 3], &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let row = t(&[3], &[10.0f32, 20.0, 30.0]);
    let y = run("Add", 14, &[], &[&a, &row]);
    assert_eq!(y.shape(), &[2, 3]);
    assert_eq!(f32s(&y), vec![11.0, 22.0, 33.0, 14.0, 25.0, 36.0]);
    // Column times row: outer product.
    let col = t(&[2, 1], &[2.0f32, 3.0]);
    let y = run("Mul", 14, &[], &[&col, &row]);
    assert_eq!(y.shape(), &[2, 3]);
    assert_eq!(f32s(&y), vec![20.0, 40.0, 60.0, 30.0, 60.0, 90.0]);
    // Scalar on the left.
    let s = t(&[], &[100.0f32]);
    assert_eq!(
        f32s(&run("Sub", 14, &[], &[&s, &a])),
        vec![99.0, 98.0, 97.0, 96.0, 95.0, 94.0]
    );
    // Rank 3 against rank 2: [2,1,4] + [3,1] -> [2,3,4]; y[i,j,k] = a[i,k] + 10*b[j].
    let a3: Vec<i32> = (0..8).collect();
    let b3 = [0i32, 10, 20];
    let y = run("Add", 14, &[], &[&t(&[2, 1, 4], &a3), &t(&[3, 1], &b3)]);
    assert_eq!(y.shape(), &[2, 3, 4]);
    let mut want = Vec::new();
    for i in 0..2 {
        for bj in b3 {
            for k in 0..4 {
                want.push(a3[i * 4 + k] + bj);
            }
        }
    }
    assert_eq!(y.to_vec::<i32>().expect("i32"), want);
    // Large enough for several parallel chunks, with a broadcast inner dimension.
    let n = 40_000;
    let big: Vec<f32> = (0..2 * n).map(|i| i as f32).collect();
    let y = run(
        "Sub",
        14,
        &[],
        &[&t(&[2, n], &big), &t(&[2, 1], &[0.0f32, 1.0])],
    );
    let got = f32s(&y);
    assert_eq!(got[n - 1], (n - 1) as f32);
    assert_eq!(got[n], n as f32 - 1.0);
    assert_eq!(got[2 * n - 1], (2 * n - 1) as f32 - 1.0);
    // Shapes that do not broadcast, and mixed types, are errors.
    assert!(run_opt("Add", 14, &[], &[Some(&a), Some(&t(&[2], &[1.0f32, 2.0]))]).is_err());
    assert!(run_opt("Add", 14, &[], &[Some(&a), Some(&t(&[1], &[1i32]))]).is_err());
}

#[test]
fn integer_division_and_mod_sign_rules() {
    let a = t(&[4], &[7i32, -7, 7, -7]);
    let d = t(&[4], &[2i32, 2, -2, -2]);
    assert_eq!(
        run("Div", 14, &[], &[&a, &d]).to_vec::<i32>().expect("i32"),
        vec![3, -3, -3, 3]
    );
    let m = t(&[4], &[3i32, 3, -3, -3]);
    // fmod = 0: sign of the divisor.
    assert_eq!(
        run("Mod", 13, &[], &[&a, &m]).to_vec::<i32>().expect("i32"),
        vec![1, 2, -2, -1]
    );
    // fmod = 1: sign of the dividend.
    assert_eq!(
        run("Mod", 13, &[("fmod", int(1))], &[&a, &m])
            .to_vec::<i32>()
            .expect("i32"),
        vec![1, -1, 1, -1]
    );
    let zero = t(&[1], &[0i32]);
    let e = run_opt("Div", 14, &[], &[Some(&a), Some(&zero)]).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(run_opt("Mod", 13, &[], &[Some(&a), Some(&zero)]).is_err());
    // Floats: fmod = 1 is C's fmod (dividend's sign), fmod = 0 Python's % (divisor's sign).
    let fa = t(&[2], &[7.5f32, -7.5]);
    let fb = t(&[2], &[-2.0f32, 2.0]);
    assert_eq!(
        f32s(&run("Mod", 13, &[("fmod", int(1))], &[&fa, &fb])),
        vec![1.5, -1.5]
    );
    assert_eq!(f32s(&run("Mod", 13, &[], &[&fa, &fb])), vec![-0.5, 0.5]);
    // Float division by zero is IEEE.
    let q = f32s(&run("Div", 14, &[], &[&fa, &t(&[1], &[0.0f32])]));
    assert_eq!(q, vec![f32::INFINITY, f32::NEG_INFINITY]);
    // Unsigned arithmetic wraps.
    let u = run("Add", 14, &[], &[&t(&[1], &[250u8]), &t(&[1], &[10u8])]);
    assert_eq!(u.bytes(), &[4]);
    assert_eq!(
        run("Mod", 13, &[], &[&t(&[2], &[7u8, 9]), &t(&[1], &[4u8])]).bytes(),
        &[3, 1]
    );
}

#[test]
fn pow_with_mixed_types() {
    let x = t(&[3], &[2.0f32, 3.0, -2.0]);
    let e = t(&[], &[2i64]);
    assert_eq!(f32s(&run("Pow", 15, &[], &[&x, &e])), vec![4.0, 9.0, 4.0]);
    let xi = t(&[3], &[4i32, 9, 10]);
    let half = t(&[1], &[0.5f32]);
    let y = run("Pow", 15, &[], &[&xi, &half]);
    assert_eq!(y.dtype(), DType::I32);
    assert_eq!(y.to_vec::<i32>().expect("i32"), vec![2, 3, 3]);
    let b = t(&[4], &[2i64, -1, -1, 3]);
    let p = t(&[4], &[-1i64, -3, 62, 4]);
    assert_eq!(
        run("Pow", 15, &[], &[&b, &p]).to_vec::<i64>().expect("i64"),
        vec![0, -1, 1, 81]
    );
    // Broadcasting, f64 base and f32 exponent column.
    let base = t(&[2], &[2.0f64, 10.0]);
    let exps = t(&[2, 1], &[0.5f32, -1.0]);
    close64(
        &f64s(&run("Pow", 15, &[], &[&base, &exps])),
        &[std::f64::consts::SQRT_2, 10f64.sqrt(), 0.5, 0.1],
        1e-15,
    );
}

#[test]
fn bit_shift_and_bitwise() {
    let x = t(&[4], &[16u8, 4, 1, 1]);
    let s = t(&[4], &[1u8, 2, 3, 8]);
    let l = run("BitShift", 11, &[("direction", string("LEFT"))], &[&x, &s]);
    assert_eq!(l.bytes(), &[32, 16, 8, 0]);
    let r = run("BitShift", 11, &[("direction", string("RIGHT"))], &[&x, &s]);
    assert_eq!(r.bytes(), &[8, 1, 0, 0]);
    assert!(run_opt("BitShift", 11, &[], &[Some(&x), Some(&s)]).is_err());
    let xs = t(&[2], &[1u64 << 40, 3]);
    let ls = run(
        "BitShift",
        11,
        &[("direction", string("LEFT"))],
        &[&xs, &t(&[1], &[2u64])],
    );
    assert_eq!(ls.to_vec::<u64>().expect("u64"), vec![1u64 << 42, 12]);

    // Opset 28: signed, arithmetic right shift, out-of-range amounts give the sign fill.
    let xi = t(&[6], &[-16i8, -16, 64, -1, 5, -128]);
    let si = t(&[6], &[2i8, 8, 1, -1, 9, 7]);
    let r = run(
        "BitShift",
        28,
        &[("direction", string("RIGHT"))],
        &[&xi, &si],
    );
    assert_eq!(r.to_vec::<i8>().expect("i8"), vec![-4, -1, 32, -1, 0, -1]);
    let l = run(
        "BitShift",
        28,
        &[("direction", string("LEFT"))],
        &[&xi, &si],
    );
    assert_eq!(l.to_vec::<i8>().expect("i8"), vec![-64, 0, -128, 0, 0, 0]);
    let right = [("direction", string("RIGHT"))];
    assert!(run_opt("BitShift", 27, &right, &[Some(&xi), Some(&si)]).is_err());

    let a = t(&[3], &[0b1100i32, -1, 5]);
    let m = t(&[1], &[0b1010i32]);
    let get = |op| run(op, 18, &[], &[&a, &m]).to_vec::<i32>().expect("i32");
    assert_eq!(get("BitwiseAnd"), vec![0b1000, 0b1010, 0]);
    assert_eq!(get("BitwiseOr"), vec![0b1110, -1, 0b1111]);
    assert_eq!(get("BitwiseXor"), vec![0b0110, !0b1010, 0b1111]);
    assert_eq!(
        run("BitwiseNot", 18, &[], &[&t(&[2], &[0x0fu8, 0])]).bytes(),
        &[0xf0, 0xff]
    );
    assert_eq!(
        run("BitwiseNot", 18, &[], &[&t(&[2], &[0i32, 5])])
            .to_vec::<i32>()
            .expect("i32"),
        vec![-1, -6]
    );
}

#[test]
fn logic_and_comparisons() {
    let p = b(&[2, 2], &[0, 0, 1, 1]);
    let q = b(&[2], &[0, 1]);
    assert_eq!(run("And", 7, &[], &[&p, &q]).bytes(), &[0, 0, 0, 1]);
    assert_eq!(run("Or", 7, &[], &[&p, &q]).bytes(), &[0, 1, 1, 1]);
    assert_eq!(run("Xor", 7, &[], &[&p, &q]).bytes(), &[0, 1, 1, 0]);
    assert_eq!(run("Not", 1, &[], &[&q]).bytes(), &[1, 0]);
    assert!(resolve("And", 7, &[Some(&a_f32()), Some(&a_f32())]).is_none());

    let x = t(&[2, 3], &[1.0f32, 2.0, 3.0, f32::NAN, 5.0, 6.0]);
    let y = t(&[3], &[2.0f32, 2.0, 2.0]);
    let cmp = |op| {
        let out = run(op, 16, &[], &[&x, &y]);
        assert_eq!(out.dtype(), DType::Bool);
        assert_eq!(out.shape(), &[2, 3]);
        out.bytes().to_vec()
    };
    assert_eq!(cmp("Equal"), vec![0, 1, 0, 0, 0, 0]);
    assert_eq!(cmp("Less"), vec![1, 0, 0, 0, 0, 0]);
    assert_eq!(cmp("LessOrEqual"), vec![1, 1, 0, 0, 0, 0]);
    assert_eq!(cmp("Greater"), vec![0, 0, 1, 0, 1, 1]);
    assert_eq!(cmp("GreaterOrEqual"), vec![0, 1, 1, 0, 1, 1]);
    let e = run(
        "Equal",
        13,
        &[],
        &[&t(&[3], &[1i64, -2, 3]), &t(&[], &[-2i64])],
    );
    assert_eq!(e.bytes(), &[0, 1, 0]);
    assert_eq!(run("Equal", 13, &[], &[&p, &q]).bytes(), &[1, 0, 0, 1]);
    let u = run(
        "Less",
        13,
        &[],
        &[&t(&[2], &[200u8, 3]), &t(&[1], &[100u8])],
    );
    assert_eq!(u.bytes(), &[0, 1]);
}

fn a_f32() -> HostTensor {
    t(&[1], &[1.0f32])
}

#[test]
fn variadic_max_min_sum_mean() {
    let a = t(&[2, 2], &[1.0f32, 5.0, f32::NAN, -1.0]);
    let b2 = t(&[2], &[3.0f32, 0.0]);
    let c = t(&[], &[2.0f32]);
    let mx = f32s(&run("Max", 13, &[], &[&a, &b2, &c]));
    assert_eq!(mx[0], 3.0);
    assert_eq!(mx[1], 5.0);
    assert!(mx[2].is_nan());
    assert_eq!(mx[3], 2.0);
    let mn = f32s(&run("Min", 13, &[], &[&a, &b2, &c]));
    assert_eq!((mn[0], mn[1], mn[3]), (1.0, 0.0, -1.0));
    assert!(mn[2].is_nan());
    let s = f32s(&run(
        "Sum",
        13,
        &[],
        &[&t(&[2], &[1.0f32, 2.0]), &t(&[2, 1], &[10.0f32, 20.0])],
    ));
    assert_eq!(s, vec![11.0, 12.0, 21.0, 22.0]);
    let m = f32s(&run(
        "Mean",
        13,
        &[],
        &[
            &t(&[2], &[1.0f32, 2.0]),
            &t(&[2], &[3.0f32, 6.0]),
            &t(&[], &[5.0f32]),
        ],
    ));
    assert_eq!(m, vec![3.0, 13.0 / 3.0]);
    // One input: a copy.
    assert_eq!(f32s(&run("Sum", 13, &[], &[&b2])), vec![3.0, 0.0]);
    let i = run(
        "Max",
        13,
        &[],
        &[&t(&[3], &[1i64, -5, 9]), &t(&[1], &[0i64])],
    );
    assert_eq!(i.to_vec::<i64>().expect("i64"), vec![1, 0, 9]);
    assert!(resolve("Sum", 13, &[Some(&t(&[1], &[1i64]))]).is_none());
}

#[test]
fn where_broadcasts_three_inputs() {
    let c = b(&[2, 1], &[1, 0]);
    let x = t(&[1, 3], &[1i64, 2, 3]);
    let y = t(&[], &[-1i64]);
    let out = run("Where", 16, &[], &[&c, &x, &y]);
    assert_eq!(out.shape(), &[2, 3]);
    assert_eq!(out.to_vec::<i64>().expect("i64"), vec![1, 2, 3, -1, -1, -1]);
    let c2 = b(&[3], &[0, 1, 0]);
    let bx = b(&[3], &[1, 1, 1]);
    let by = b(&[3], &[0, 0, 0]);
    assert_eq!(run("Where", 16, &[], &[&c2, &bx, &by]).bytes(), &[0, 1, 0]);
}

/// Each of Where's three operands whole or one repeated value (every combination of
/// contiguous and broadcast runs, each its own loop) against element-by-element selection;
/// rows of 100 (past a vector), and a row broadcast along the columns for the strided case.
#[test]
fn where_with_each_operand_whole_or_repeated_selects_per_element() {
    let n = 3 * 100;
    let cond: Vec<u8> = (0..n).map(|i| ((i * 7) % 3 == 0) as u8).collect();
    let xs: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let ys: Vec<f32> = (0..n).map(|i| -(i as f32) - 0.5).collect();
    for mask in 0..8u8 {
        let whole = |bit: u8| mask & (1 << bit) != 0;
        let c = if whole(0) {
            b(&[3, 100], &cond)
        } else {
            b(&[1], &[1])
        };
        let x = if whole(1) {
            t(&[3, 100], &xs)
        } else {
            t(&[1], &[7.0f32])
        };
        let y = if whole(2) {
            t(&[3, 100], &ys)
        } else {
            t(&[], &[-7.0f32])
        };
        let got = run("Where", 16, &[], &[&c, &x, &y]);
        let want: Vec<f32> = (0..n)
            .map(|i| {
                let pick = if whole(0) { cond[i] != 0 } else { true };
                match (pick, whole(1), whole(2)) {
                    (true, true, _) => xs[i],
                    (true, false, _) => 7.0,
                    (false, _, true) => ys[i],
                    (false, _, false) => -7.0,
                }
            })
            .collect();
        let want_shape: &[usize] = if mask == 0 { &[1] } else { &[3, 100] };
        assert_eq!(got.shape(), want_shape, "mask {mask}");
        let got = f32s(&got);
        if mask == 0 {
            assert_eq!(got, vec![7.0]);
        } else {
            assert_eq!(got, want, "mask {mask}");
        }
    }
    // A column broadcast along rows: the value changes every row (stride 0 within a run).
    let col = t(&[3, 1], &[1.0f32, 2.0, 3.0]);
    let c = b(&[3, 100], &cond);
    let got = f32s(&run("Where", 16, &[], &[&c, &col, &t(&[3, 100], &ys)]));
    for (i, g) in got.iter().enumerate() {
        let want = if cond[i] != 0 {
            (i / 100 + 1) as f32
        } else {
            ys[i]
        };
        assert_eq!(*g, want, "{i}");
    }
}

#[test]
fn strings_in_equal_and_where() {
    let a = HostTensor::from_strings(&[2, 2], &[b"ab", b"cd", b"", b"x"]).expect("strings");
    let k = HostTensor::from_strings(&[2], &[b"ab", b"x"]).expect("strings");
    assert_eq!(run("Equal", 19, &[], &[&a, &k]).bytes(), &[1, 0, 0, 1]);
    let c = b(&[2], &[1, 0]);
    let w = run("Where", 16, &[], &[&c, &a, &k]);
    assert_eq!(w.dtype(), DType::String);
    assert_eq!(w.shape(), &[2, 2]);
    let got: Vec<&str> = w.strings().iter().map(|s| s.as_str()).collect();
    assert_eq!(got, vec!["ab", "x", "", "x"]);
}

#[test]
fn casts() {
    let x = t(&[5], &[1.9f32, -1.9, 2.5, -0.0, 300.0]);
    assert_eq!(
        run("Cast", 19, &[("to", int(6))], &[&x])
            .to_vec::<i32>()
            .expect("i32"),
        vec![1, -1, 2, 0, 300]
    );
    let flags = t(&[4], &[0.0f32, -0.0, 2.0, f32::NAN]);
    let bo = run("Cast", 19, &[("to", int(9))], &[&flags]);
    assert_eq!(bo.dtype(), DType::Bool);
    assert_eq!(bo.bytes(), &[0, 0, 1, 1]);
    assert_eq!(
        f64s(&run("Cast", 19, &[("to", int(11))], &[&bo])),
        vec![0.0, 0.0, 1.0, 1.0]
    );
    // Integer narrowing wraps like C.
    let i = t(&[3], &[-1i64, 256, 511]);
    assert_eq!(
        run("Cast", 19, &[("to", int(2))], &[&i]).bytes(),
        &[255, 0, 255]
    );
    let big = t(&[1], &[u64::MAX]);
    assert_eq!(
        run("Cast", 19, &[("to", int(7))], &[&big])
            .to_vec::<i64>()
            .expect("i64"),
        vec![-1]
    );
    // Integer to float.
    assert_eq!(
        f32s(&run("Cast", 19, &[("to", int(1))], &[&i])),
        vec![-1.0, 256.0, 511.0]
    );
    // CastLike takes the type of its second input.
    let like = t(&[1], &[0i16]);
    let cl = run("CastLike", 15, &[], &[&x, &like]);
    assert_eq!(cl.to_vec::<i16>().expect("i16"), vec![1, -1, 2, 0, 300]);
    // Missing or unknown `to`, and strings, are refused.
    assert!(run_opt("Cast", 19, &[], &[Some(&x)]).is_err());
    assert!(run_opt("Cast", 19, &[("to", int(99))], &[Some(&x)]).is_err());
    assert!(run_opt("Cast", 19, &[("to", int(8))], &[Some(&x)]).is_err());
}

#[test]
fn clip_attributes_and_optional_inputs() {
    let x = t(&[5], &[-3.0f32, -1.0, 0.5, 2.0, f32::INFINITY]);
    // Opset 6: attributes.
    let y = f32s(&run(
        "Clip",
        6,
        &[("min", float(-1.5)), ("max", float(1.0))],
        &[&x],
    ));
    assert_eq!(y, vec![-1.5, -1.0, 0.5, 1.0, 1.0]);
    let y = f32s(&run("Clip", 6, &[("min", float(0.0))], &[&x]));
    assert_eq!(y, vec![0.0, 0.0, 0.5, 2.0, f32::MAX]);
    // Opset 11+: min absent, max given.
    let max = t(&[], &[1.0f32]);
    let y = run_opt("Clip", 13, &[], &[Some(&x), None, Some(&max)]).expect("clip");
    assert_eq!(f32s(&y), vec![-3.0, -1.0, 0.5, 1.0, 1.0]);
    // Only min given; max missing from the slice altogether.
    let min = t(&[], &[0.0f32]);
    let y = run_opt("Clip", 13, &[], &[Some(&x), Some(&min)]).expect("clip");
    assert_eq!(f32s(&y), vec![0.0, 0.0, 0.5, 2.0, f32::MAX]);
    // Neither: the type's range.
    let y = run_opt("Clip", 13, &[], &[Some(&x)]).expect("clip");
    assert_eq!(f32s(&y), vec![-3.0, -1.0, 0.5, 2.0, f32::MAX]);
    // min > max: everything becomes max.
    let y = run_opt(
        "Clip",
        13,
        &[],
        &[Some(&x), Some(&t(&[], &[2.0f32])), Some(&max)],
    );
    assert_eq!(f32s(&y.expect("clip")), vec![1.0; 5]);
    // Integers (opset 12+).
    let xi = t(&[4], &[-10i32, 0, 5, 100]);
    let y = run_opt(
        "Clip",
        12,
        &[],
        &[Some(&xi), Some(&t(&[], &[-2i32])), Some(&t(&[], &[7i32]))],
    )
    .expect("clip");
    assert_eq!(y.to_vec::<i32>().expect("i32"), vec![-2, 0, 5, 7]);
    // A non-scalar bound is refused.
    let two = t(&[2], &[0.0f32, 1.0]);
    assert!(run_opt("Clip", 13, &[], &[Some(&x), Some(&two)]).is_err());
}

#[test]
fn prelu_broadcasts_slope() {
    let x = t(&[2, 3], &[-1.0f32, 2.0, -3.0, 4.0, -5.0, 0.0]);
    let slope = t(&[3], &[0.1f32, 0.2, 0.3]);
    close32(
        &f32s(&run("PRelu", 16, &[], &[&x, &slope])),
        &[-0.1, 2.0, -0.9, 4.0, -1.0, 0.0],
        1e-7,
    );
    let xi = t(&[3], &[-4i32, 4, -8]);
    let si = t(&[1], &[2i32]);
    assert_eq!(
        run("PRelu", 16, &[], &[&xi, &si])
            .to_vec::<i32>()
            .expect("i32"),
        vec![-8, 4, -16]
    );
    // The slope must broadcast to X, not the other way round.
    let wide = t(&[2, 2, 3], &[0.1f32; 12]);
    assert!(run_opt("PRelu", 16, &[], &[Some(&x), Some(&wide)]).is_err());
}

#[test]
fn isnan_isinf() {
    let x = t(&[4], &[1.0f32, f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
    assert_eq!(run("IsNaN", 13, &[], &[&x]).bytes(), &[0, 1, 0, 0]);
    assert_eq!(run("IsInf", 10, &[], &[&x]).bytes(), &[0, 0, 1, 1]);
    assert_eq!(
        run("IsInf", 10, &[("detect_negative", int(0))], &[&x]).bytes(),
        &[0, 0, 1, 0]
    );
    assert_eq!(
        run("IsInf", 10, &[("detect_positive", int(0))], &[&x]).bytes(),
        &[0, 0, 0, 1]
    );
    let h = t(&[2], &[f16::NAN, f16::INFINITY]);
    assert_eq!(run("IsNaN", 13, &[], &[&h]).bytes(), &[1, 0]);
}

#[test]
fn empty_tensors() {
    let e = t::<f32>(&[0, 3], &[]);
    let row = t(&[3], &[1.0f32, 2.0, 3.0]);
    let y = run("Add", 14, &[], &[&e, &row]);
    assert_eq!(y.shape(), &[0, 3]);
    assert!(f32s(&y).is_empty());
    assert!(f32s(&run("Exp", 13, &[], &[&e])).is_empty());
    let p = run("Pow", 15, &[], &[&t(&[1], &[2.0f32]), &t::<f32>(&[0], &[])]);
    assert_eq!(p.shape(), &[0]);
    let w = run("Where", 16, &[], &[&b(&[0, 1], &[]), &row, &row]);
    assert_eq!(w.shape(), &[0, 3]);
}

#[test]
fn bit_shift_official_cases() {
    crate::testcases::run_cases(&["test_bitshift_"], shift_factory);
}
