//! Elementwise operators: activations, unary math, binary arithmetic, comparison and logic
//! with multidirectional broadcasting, variadic Sum/Mean/Max/Min, Where, Cast.
//!
//! Kernels are generic over the element type and dispatched once per call on the input's
//! dtype (`opreg_sdk::dispatch!`); f16 and bf16 compute in f32. All binary ops share one broadcasting
//! engine ([`engine`]).

use crate::util::Factory;
use opreg_sdk::dtype::names::*;
use opreg_sdk::numeric::{
    ALL_AND_STRING, BOOL, FLOATS, INTEGERS, NUMERIC, SIGNED_AND_FLOATS, UNSIGNED,
};
use opreg_sdk::prelude::*;

/// The error for a dtype an elementwise kernel has no implementation for (the fallback arm of
/// its `dispatch!`).
fn unsupported(what: impl std::fmt::Display, dtype: DType) -> PluginError {
    PluginError::unimplemented(format!("{what}: type {dtype} is not supported"))
}

mod binary;
mod cast;
mod engine;
mod gated;
mod unary;

use binary::{BinOp, Binary, Pow, VarOp, Variadic, Where};
use cast::Cast;
use unary::{Clip, FloatOp, FloatTest, FloatUnary, NumOp, NumUnary};

/// `n` inputs of type `T`, one output of type `T` (or `T1` when `out` is given).
fn desc(op: &str, since: i32, types: &[DType], n: usize, out: Option<&[DType]>) -> KernelDesc {
    let d = KernelDesc::onnx(op, since, OPEN_END).constraint("T", types);
    let d = d.inputs(&vec!["T"; n]);
    match out {
        None => d.outputs(&["T"]),
        Some(o) => d.constraint("T1", o).outputs(&["T1"]),
    }
}

fn float_op(
    node: &NodeInfo<'_>,
    f: fn(&NodeInfo<'_>) -> Result<FloatOp, PluginError>,
) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(FloatUnary(f(node)?)))
}

/// Gelu's `approximate` attribute.
fn gelu(n: &NodeInfo<'_>) -> Result<FloatOp, PluginError> {
    match n.string_or("approximate", "none")?.as_str() {
        "none" => Ok(FloatOp::Gelu { tanh: false }),
        "tanh" => Ok(FloatOp::Gelu { tanh: true }),
        other => Err(PluginError::invalid(format!(
            "Gelu: attribute 'approximate' must be \"none\" or \"tanh\", got {other:?}"
        ))),
    }
}

fn shift_factory(n: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    match n.string_or("direction", "")?.as_str() {
        "LEFT" => Ok(Box::new(Binary(BinOp::BitShift { left: true }))),
        "RIGHT" => Ok(Box::new(Binary(BinOp::BitShift { left: false }))),
        other => Err(PluginError::invalid(format!(
            "BitShift: attribute 'direction' must be \"LEFT\" or \"RIGHT\", got {other:?}"
        ))),
    }
}

pub fn register(r: &mut Registrar) {
    gated::register(r);
    // Float unary operators whose only state is their attributes.
    type OpOf = fn(&NodeInfo<'_>) -> Result<FloatOp, PluginError>;
    let float_ops: &[(&str, i32, OpOf)] = &[
        ("LeakyRelu", 6, |n| {
            Ok(FloatOp::LeakyRelu(n.float_or("alpha", 0.01)?))
        }),
        ("Elu", 6, |n| Ok(FloatOp::Elu(n.float_or("alpha", 1.0)?))),
        ("Selu", 6, |n| {
            Ok(FloatOp::Selu {
                alpha: n.float_or("alpha", 1.673_263_2)?,
                gamma: n.float_or("gamma", 1.050_701)?,
            })
        }),
        ("Celu", 12, |n| Ok(FloatOp::Celu(n.float_or("alpha", 1.0)?))),
        ("Sigmoid", 6, |_| Ok(FloatOp::Sigmoid)),
        ("HardSigmoid", 6, |n| {
            Ok(FloatOp::HardSigmoid {
                alpha: n.float_or("alpha", 0.2)?,
                beta: n.float_or("beta", 0.5)?,
            })
        }),
        ("HardSwish", 14, |_| Ok(FloatOp::HardSwish)),
        ("Softplus", 1, |_| Ok(FloatOp::Softplus)),
        ("Softsign", 1, |_| Ok(FloatOp::Softsign)),
        ("Tanh", 6, |_| Ok(FloatOp::Tanh)),
        ("Gelu", 20, gelu),
        ("Mish", 18, |_| Ok(FloatOp::Mish)),
        ("ThresholdedRelu", 10, |n| {
            Ok(FloatOp::ThresholdedRelu(n.float_or("alpha", 1.0)?))
        }),
        ("Exp", 6, |_| Ok(FloatOp::Exp)),
        ("Log", 6, |_| Ok(FloatOp::Log)),
        ("Sqrt", 6, |_| Ok(FloatOp::Sqrt)),
        ("Reciprocal", 6, |_| Ok(FloatOp::Reciprocal)),
        ("Floor", 6, |_| Ok(FloatOp::Floor)),
        ("Ceil", 6, |_| Ok(FloatOp::Ceil)),
        ("Round", 11, |_| Ok(FloatOp::Round)),
        ("Erf", 9, |_| Ok(FloatOp::Erf)),
        ("Sin", 7, |_| Ok(FloatOp::Sin)),
        ("Cos", 7, |_| Ok(FloatOp::Cos)),
        ("Tan", 7, |_| Ok(FloatOp::Tan)),
        ("Asin", 7, |_| Ok(FloatOp::Asin)),
        ("Acos", 7, |_| Ok(FloatOp::Acos)),
        ("Atan", 7, |_| Ok(FloatOp::Atan)),
        ("Sinh", 9, |_| Ok(FloatOp::Sinh)),
        ("Cosh", 9, |_| Ok(FloatOp::Cosh)),
        ("Asinh", 9, |_| Ok(FloatOp::Asinh)),
        ("Acosh", 9, |_| Ok(FloatOp::Acosh)),
        ("Atanh", 9, |_| Ok(FloatOp::Atanh)),
    ];
    for &(op, since, f) in float_ops {
        r.kernel(desc(op, since, FLOATS, 1, None), move |n: &NodeInfo<'_>| {
            float_op(n, f)
        });
    }
    // `opreg::Gelu`: ONNX's Gelu (opset 20) for models of any opset: the graph pass `gelu`
    // writes it for the erf-GELU as exporters spell it (Div, Erf, Add, Mul, Mul).
    r.kernel(
        KernelDesc::new("opreg", "Gelu", 1, OPEN_END)
            .constraint("T", FLOATS)
            .inputs(&["T"])
            .outputs(&["T"]),
        |n: &NodeInfo<'_>| float_op(n, gelu),
    );

    // Unary operators over integers too.
    let num_ops: &[(&str, i32, &[DType], NumOp)] = &[
        ("Relu", 6, FLOATS, NumOp::Relu),
        ("Relu", 14, &[I8, I16, I32, I64], NumOp::Relu),
        ("Abs", 6, NUMERIC, NumOp::Abs),
        ("Neg", 6, SIGNED_AND_FLOATS, NumOp::Neg),
        ("Sign", 9, NUMERIC, NumOp::Sign),
    ];
    for &(op, since, types, k) in num_ops {
        r.kernel(desc(op, since, types, 1, None), stateless(NumUnary(k)));
    }

    // Clip: attributes min/max up to opset 10, optional scalar inputs from 11.
    r.kernel(
        KernelDesc::onnx("Clip", 6, 10)
            .constraint("T", FLOATS)
            .inputs(&["T"])
            .outputs(&["T"]),
        |n: &NodeInfo<'_>| -> Result<Box<dyn Kernel>, PluginError> {
            let get = |name| match n.attr(name) {
                None => Ok(None),
                Some(_) => n.float_or(name, 0.0).map(Some),
            };
            Ok(Box::new(Clip {
                attrs: Some((get("min")?, get("max")?)),
            }))
        },
    );
    r.kernel(
        desc("Clip", 11, NUMERIC, 3, None),
        stateless(Clip { attrs: None }),
    );

    r.kernel(
        desc("IsNaN", 9, FLOATS, 1, Some(BOOL)),
        stateless(FloatTest::IsNaN),
    );
    r.kernel(
        desc("IsInf", 10, FLOATS, 1, Some(BOOL)),
        |n: &NodeInfo<'_>| -> Result<Box<dyn Kernel>, PluginError> {
            Ok(Box::new(FloatTest::IsInf {
                positive: n.int_or("detect_positive", 1)? != 0,
                negative: n.int_or("detect_negative", 1)? != 0,
            }))
        },
    );
    r.kernel(desc("Not", 1, BOOL, 1, None), stateless(unary::Not));
    r.kernel(
        desc("BitwiseNot", 18, INTEGERS, 1, None),
        stateless(unary::Not),
    );

    // Binary operators with multidirectional broadcasting.
    let bin_ops: &[(&str, i32, &[DType], BinOp, bool)] = &[
        ("Add", 7, NUMERIC, BinOp::Add, false),
        ("Sub", 7, NUMERIC, BinOp::Sub, false),
        ("Mul", 7, NUMERIC, BinOp::Mul, false),
        ("Div", 7, NUMERIC, BinOp::Div, false),
        (
            "PRelu",
            7,
            &[U32, U64, I32, I64, F16, BF16, F32, F64],
            BinOp::PRelu,
            false,
        ),
        ("And", 7, BOOL, BinOp::And, false),
        ("Or", 7, BOOL, BinOp::Or, false),
        ("Xor", 7, BOOL, BinOp::Xor, false),
        ("BitwiseAnd", 18, INTEGERS, BinOp::BitwiseAnd, false),
        ("BitwiseOr", 18, INTEGERS, BinOp::BitwiseOr, false),
        ("BitwiseXor", 18, INTEGERS, BinOp::BitwiseXor, false),
        ("Equal", 7, ALL_AND_STRING, BinOp::Equal, true),
        ("Less", 7, NUMERIC, BinOp::Less, true),
        ("LessOrEqual", 12, NUMERIC, BinOp::LessOrEqual, true),
        ("Greater", 7, NUMERIC, BinOp::Greater, true),
        ("GreaterOrEqual", 12, NUMERIC, BinOp::GreaterOrEqual, true),
    ];
    for &(op, since, types, k, to_bool) in bin_ops {
        let out = if to_bool { Some(BOOL) } else { None };
        r.kernel(desc(op, since, types, 2, out), stateless(Binary(k)));
    }
    let mod_factory: Factory = |n| {
        Ok(Box::new(Binary(BinOp::Mod {
            fmod: n.int_or("fmod", 0)? != 0,
        })))
    };
    r.kernel(desc("Mod", 10, NUMERIC, 2, None), mod_factory);
    // Signed types from opset 28.
    r.kernel(
        KernelDesc::onnx("BitShift", 11, 27)
            .constraint("T", UNSIGNED)
            .inputs(&["T", "T"])
            .outputs(&["T"]),
        shift_factory,
    );
    r.kernel(desc("BitShift", 28, INTEGERS, 2, None), shift_factory);
    r.kernel(
        KernelDesc::onnx("Pow", 7, OPEN_END)
            .constraint("T", &[I32, I64, F16, BF16, F32, F64])
            .constraint("T1", NUMERIC)
            .inputs(&["T", "T1"])
            .outputs(&["T"]),
        stateless(Pow),
    );

    // Variadic, broadcasting.
    for (op, types, k) in [
        ("Max", NUMERIC, VarOp::Max),
        ("Min", NUMERIC, VarOp::Min),
        ("Sum", FLOATS, VarOp::Sum),
        ("Mean", FLOATS, VarOp::Mean),
    ] {
        r.kernel(desc(op, 6, types, 1, None), stateless(Variadic(k)));
    }
    r.kernel(
        KernelDesc::onnx("Where", 9, OPEN_END)
            .constraint("B", BOOL)
            .constraint("T", ALL_AND_STRING)
            .inputs(&["B", "T", "T"])
            .outputs(&["T"]),
        stateless(Where),
    );

    r.kernel(
        KernelDesc::onnx("Cast", 6, OPEN_END)
            .constraint("T1", cast::CAST_TYPES)
            .constraint("T2", cast::CAST_TYPES)
            .inputs(&["T1"])
            .outputs(&["T2"]),
        Cast::from_node,
    );
    r.kernel(
        KernelDesc::onnx("CastLike", 15, OPEN_END)
            .constraint("T1", cast::CAST_TYPES)
            .constraint("T2", cast::CAST_TYPES)
            .inputs(&["T1", "T2"])
            .outputs(&["T2"]),
        Cast::like_from_node,
    );
}

#[cfg(test)]
mod tests;
