//! opregd as a library: the daemon's stages, usable in-process (benchmarks, embedding).
//!
//! The data's way, folder by folder: `config` → `plugin` (load and check libraries) →
//! `registry` (immutable snapshots of what plugins registered; `device`: the devices they
//! provide) → `exec` (run kernels on the
//! compute pool) → `graph` (import, plan, run ONNX models) → `repo` (the model repository)
//! → `server` (gRPC). `swap` verifies a new plugin build against the served models before
//! the registry publishes it.

pub mod app;
pub mod config;
pub mod device;
pub mod exec;
pub mod feeds;
pub mod graph;
pub mod heap;
pub mod metrics;
pub mod plugin;
pub mod quant;
pub mod registry;
pub mod repo;
pub mod server;
pub mod swap;
