//! The graph runtime: import an ONNX model, compile it once per registry generation into a
//! plan (dead-node removal, constant folding, kernel placement and binding, buffer liveness),
//! then run the plan concurrently from many requests.

mod copies;
mod copy;
mod import;
mod plan;
mod run;
mod shapes;
mod types;

pub use copies::{CopyInfo, Place};
pub use import::{import, Dim, IoSpec, Model};
pub use plan::{compile, Plan};
pub use run::{run, run_profiled, run_with_control, RunControl};
pub use shapes::Shape;

use opreg_sdk::ErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("not a valid ONNX model: {0}")]
    Decode(String),
    #[error("invalid model: {0}")]
    Invalid(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("node {node}: {reason}")]
    NoKernel { node: String, reason: String },
    #[error("node {node}: kernel of plugin '{plugin}' refused it: {message}")]
    Instantiate {
        node: String,
        plugin: String,
        code: ErrorCode,
        message: String,
    },
    #[error("node {node}: kernel of plugin '{plugin}' failed: {message}")]
    Kernel {
        node: String,
        plugin: String,
        code: ErrorCode,
        message: String,
    },
    #[error("input '{name}': {reason}")]
    Input { name: String, reason: String },
    #[error("request cancelled at node {node}: the client went away")]
    Cancelled { node: String },
    #[error("deadline exceeded at node {node}")]
    DeadlineExceeded { node: String },
    #[error("node {node}: {reason}")]
    Limit { node: String, reason: String },
}
