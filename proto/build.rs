//! Compiles the .proto files with protox (a protobuf compiler in pure Rust), so a machine with
//! only the Rust toolchain builds the workspace: no system `protoc` is needed.

use prost::Message;
use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "inference/grpc_service.proto",
    "inference/model_config.proto",
    "opreg/v1/registry.proto",
    "onnx/onnx.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // The descriptor set also feeds gRPC server reflection.
    std::fs::write(out.join("opreg_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Initializer bytes decode as slices of the model file's buffer (zero copy) when the
        // model is decoded from `Bytes`: the weights are most of a model's size.
        .bytes(".onnx.TensorProto.raw_data")
        // Tensor contents as `Bytes`: a request's decode slices them out of tonic's receive
        // buffer instead of copying each into a `Vec` (600 KB per image, ~10 % of the serving
        // overhead), and a client that resends one request clones a reference, not the data.
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .bytes(".inference.ModelInferResponse.raw_output_contents")
        // Buffers sized to the message (see `src/codec.rs`).
        .codec_path("crate::codec::TensorCodec")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
