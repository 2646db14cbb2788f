//! The graph runtime: import an ONNX model, compile it once per registry generation into a
//! plan (dead-node removal, constant folding, kernel placement and binding, buffer liveness),
//! then run the plan concurrently from many requests.

mod axis;
mod batch;
mod compiled;
mod control;
mod copies;
mod copy;
mod expand;
mod export;
mod import;
mod legacy;
mod memory;
mod model_file;
mod passes;
mod plan;
mod run;
mod schedule;
mod sequence;
mod subgraphs;
mod values;

pub use compiled::{CopyInfo, Place, Placement, Plan, StepInfo};
pub use export::{export, Exported, ExternalData};
pub use import::{
    import, import_owned, tensor as tensor_from_proto, Dim, IoSpec, Model, Node, Shape,
};
pub use memory::MemoryStats;
pub use model_file::ModelBytes;
pub use passes::{fuse, optimize, PassReport};
pub use plan::{compile, compile_owned};
pub use run::{run, run_profiled, run_with_control, RunControl, StepTime};

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
    #[error(transparent)]
    Kernel(#[from] crate::exec::KernelError),
    #[error("input '{name}': {reason}")]
    Input { name: String, reason: String },
    #[error("request cancelled at node {node}: the client went away")]
    Cancelled { node: String },
    #[error("deadline exceeded at node {node}")]
    DeadlineExceeded { node: String },
    #[error("node {node}: {reason}")]
    Limit { node: String, reason: String },
}

impl GraphError {
    /// The plugin at fault when a kernel panicked or failed with an internal error: a fault of
    /// the plugin, not of the request (a kernel refusing bad input is not counted).
    pub fn plugin_fault(&self) -> Option<&str> {
        use opreg_sdk::ErrorCode;
        match self {
            GraphError::Kernel(crate::exec::KernelError::Failed { plugin, code, .. })
                if matches!(*code, ErrorCode::Panic | ErrorCode::Internal) =>
            {
                Some(plugin)
            }
            _ => None,
        }
    }
}
