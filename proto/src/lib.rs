//! Generated gRPC types and services of opreg.
//!
//! - [`inference`]: the KServe v2 / Open Inference Protocol (`inference.GRPCInferenceService`),
//!   wire-compatible with Triton's and KServe's definitions (same package, messages and field
//!   numbers), so existing clients such as Python's `tritonclient` work unchanged.
//! - [`opreg::v1`]: opreg's own `Registry` service (plugins, kernels, backends, quantizers).

#![allow(clippy::all, missing_docs)]

pub mod codec;

/// `package inference`: the KServe v2 / Open Inference Protocol.
pub mod inference {
    tonic::include_proto!("inference");
}

/// `package onnx`: the ONNX model format.
pub mod onnx {
    tonic::include_proto!("onnx");
}

/// `package opreg.*`.
pub mod opreg {
    /// `package opreg.v1`.
    pub mod v1 {
        tonic::include_proto!("opreg.v1");
    }
}

/// Encoded `FileDescriptorSet` of every service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/opreg_descriptor.bin"));
