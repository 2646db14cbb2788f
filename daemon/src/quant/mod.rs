//! Quantization as a service: a strategy plugin plans, the host calibrates, applies, checks
//! and saves.
//!
//! The data's way, file by file: `prepare` (the float model in the form strategies plan on:
//! every node named, `Gemm` with a constant weight as `MatMul` + `Add`) → `view` (the
//! read-only [`GraphView`](opreg_sdk::GraphView) a strategy sees, weights borrowed) →
//! `data` (calibration samples from a folder or a request, checked against the model's
//! inputs) → `calibrate` (the model compiled with every observed tensor as an output; each
//! batch updates `observe`'s bounded statistics and is dropped) → the strategy's plan →
//! `prune` (structured pruning removes channels where the graph allows, masks zero weights;
//! `reconstruct` re-fits what a mask keeps to the calibration inputs) → `lower` (nodes computed
//! in float16/bfloat16) →
//! `apply` (the plan as standard ONNX: QDQ, integer ops for dynamic quantization) →
//! `evaluate` (the float and quantized models on held-out samples) → `report` (JSON and SVG
//! histograms) → `job` (one quantization run end to end; the result becomes a new version of
//! the model, written only once complete) → `adaptive` (a version whose strategy asked for it
//! follows its traffic: sampled requests, re-derived ranges, verified swaps).

pub mod adaptive;
pub mod apply;
pub mod calibrate;
pub mod data;
pub mod evaluate;
pub mod job;
pub mod lower;
pub mod observe;
pub mod prepare;
pub mod prune;
pub mod reconstruct;
pub mod report;
pub mod view;

use crate::{graph::GraphError, repo::RepoError};

/// Why a quantization run failed. Every variant names what was wrong (tensor, node, strategy,
/// file); the float model is never touched.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("no quantization strategy named '{0}' is loaded (ListQuantizers lists them)")]
    UnknownStrategy(String),
    #[error("calibration data: {0}")]
    Data(String),
    #[error("the calibration set is empty: give at least one sample (a folder of .npy/.pb tensors, or samples in the request)")]
    EmptyCalibration,
    #[error("strategy '{strategy}' failed: {message}")]
    Strategy {
        strategy: String,
        code: opreg_sdk::ErrorCode,
        message: String,
    },
    #[error("strategy '{strategy}' returned a malformed plan: {reason}")]
    BadPlan { strategy: String, reason: String },
    #[error("strategy '{strategy}' asks for {what}, which this daemon does not implement yet")]
    Unimplemented { strategy: String, what: String },
    #[error("model '{model}': {reason}")]
    Model { model: String, reason: String },
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("quantization cancelled: the client went away")]
    Cancelled,
}

impl QuantError {
    /// Names the model in an error raised where its name is not known (`model: ""`).
    pub fn of_model(self, name: &str) -> Self {
        match self {
            QuantError::Model { model, reason } if model.is_empty() => QuantError::Model {
                model: name.into(),
                reason,
            },
            e => e,
        }
    }
}
