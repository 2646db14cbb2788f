//! ONNX standard operators, registered in one table per family (as tract does): elementwise,
//! shape / data movement, neural-network. Matrix products go through the node's BLAS backend.

use opreg_sdk::prelude::*;

mod bitcast;
mod cumulative;
mod elementwise;
mod image;
mod infer;
mod linalg;
mod loss;
mod lowbit;
#[cfg(test)]
mod malformed;
mod ml;
mod nn;
mod quant;
mod random;
mod recurrent;
mod reduce;
mod rnn;
mod shape;
mod signal;
mod simd;
mod spatial;
#[cfg(test)]
mod testcases;
mod text;
mod training;
mod transformer;
mod unique;
#[allow(dead_code)] // shared helpers; not every family uses every one
mod util;

/// Every standard non-string tensor type (bool, the integers, f16, bf16, f32, f64): what ONNX
/// schemas list as "all numeric types and bool".
pub(crate) const ALL_TYPES: &[DType] = opreg_sdk::numeric::ALL;

fn register(r: &mut Registrar) {
    // One table of type and shape rules answers for every kernel below (ABI 1.1).
    r.infer_with(infer::infer);
    elementwise::register(r);
    shape::register(r);
    nn::register(r);
    reduce::register(r);
    quant::register(r);
    cumulative::register(r);
    bitcast::register(r);
    unique::register(r);
    linalg::register(r);
    signal::register(r);
    spatial::register(r);
    transformer::register(r);
    loss::register(r);
    rnn::register(r);
    text::register(r);
    ml::register(r);
    image::register(r);
    random::register(r);
    recurrent::register(r);
    training::register(r);
}

opreg_sdk::export_plugin! {
    name: "onnx-ops",
    version: env!("CARGO_PKG_VERSION"),
    description: "ONNX standard operators",
    register: register,
}
