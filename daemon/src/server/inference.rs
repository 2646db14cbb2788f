//! `inference.GRPCInferenceService`: the KServe v2 / Open Inference Protocol.
//!
//! A thin layer: inference is in `infer`, the repository in `crate::repo`.

// Request and model data reach this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use super::infer::{client_timeout, infer};
use crate::{
    app::App,
    graph::IoSpec,
    repo::{clip, ServedModel},
};
use opreg_proto::inference::{self as pb, grpc_inference_service_server::GrpcInferenceService};
use opreg_sdk::DType;
use std::{collections::BTreeMap, collections::HashMap, pin::Pin, sync::Arc};
use tokio_stream::{wrappers::ReceiverStream, Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

pub struct InferenceApi {
    pub app: Arc<App>,
}

/// Extensions of the protocol this server implements, as `ServerMetadata` reports them.
/// perf-style clients read `ModelStatistics` only when `statistics` is listed.
pub const EXTENSIONS: &[&str] = &["model_repository", "model_configuration", "statistics"];

/// The platform name reported in metadata and configuration.
const PLATFORM: &str = "onnx";

type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<pb::ModelStreamInferResponse, Status>> + Send>>;

/// Triton's `DataType` enum value for a dtype (model_config.proto).
fn config_type(d: DType) -> i32 {
    use pb::DataType as T;
    (match d {
        DType::Bool => T::TypeBool,
        DType::U8 => T::TypeUint8,
        DType::U16 => T::TypeUint16,
        DType::U32 => T::TypeUint32,
        DType::U64 => T::TypeUint64,
        DType::I8 => T::TypeInt8,
        DType::I16 => T::TypeInt16,
        DType::I32 => T::TypeInt32,
        DType::I64 => T::TypeInt64,
        DType::F16 => T::TypeFp16,
        DType::F32 => T::TypeFp32,
        DType::F64 => T::TypeFp64,
        DType::String => T::TypeString,
        DType::BF16 => T::TypeBf16,
        // Triton's configuration has no names for the 8-, 4- and 2-bit types.
        _ => T::TypeInvalid,
    }) as i32
}

/// `--model-control-mode none`: the repository is fixed after start-up.
fn refuse_in_mode_none(app: &App) -> Result<(), Status> {
    if app.config.model_control == crate::config::ModelControl::None {
        return Err(Status::failed_precondition(
            "model control mode is 'none': models load at start-up only (start with --model-control-mode explicit or poll to load and unload)",
        ));
    }
    Ok(())
}

fn statistics(m: &ServedModel) -> pb::ModelStatistics {
    let s = *m.stats.lock().unwrap_or_else(|p| p.into_inner());
    let d = |(count, ns): (u64, u64)| Some(pb::StatisticDuration { count, ns });
    pb::ModelStatistics {
        name: m.name.clone(),
        version: m.version.to_string(),
        last_inference: s.last_inference_ms,
        inference_count: s.inference_count,
        execution_count: s.execution_count,
        device_copies: s.device_copies,
        device_copy_bytes: s.device_copy_bytes,
        inference_stats: Some(pb::InferStatistics {
            success: d(s.success),
            fail: d(s.fail),
            queue: d(s.queue),
            compute_input: d(s.compute_input),
            compute_infer: d(s.compute_infer),
            compute_output: d(s.compute_output),
            cache_hit: d((0, 0)),
            cache_miss: d((0, 0)),
        }),
        batch_stats: Vec::new(),
    }
}

/// `file:<version>/model.onnx` parameters of a load request, by version.
fn submitted_files(
    params: &HashMap<String, pb::ModelRepositoryParameter>,
) -> Result<BTreeMap<u64, Vec<u8>>, Status> {
    use pb::model_repository_parameter::ParameterChoice;
    let mut files = BTreeMap::new();
    for (key, value) in params {
        let shown = clip(key, 128);
        let Some(path) = key.strip_prefix("file:") else {
            if key == "config" {
                return Err(Status::invalid_argument(
                    "a 'config' override is not supported: put config.toml next to the model in the repository",
                ));
            }
            continue;
        };
        // Only the canonical spelling: `01` or `+1` would alias version 1.
        let version = path
            .strip_suffix("/model.onnx")
            .and_then(|v| v.parse::<u64>().ok().filter(|n| n.to_string() == v))
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "parameter '{shown}': expected 'file:<version>/model.onnx' with a version from 1, written without leading zeros"
                ))
            })?;
        match &value.parameter_choice {
            Some(ParameterChoice::BytesParam(b)) => {
                files.insert(version, b.clone());
            }
            _ => {
                return Err(Status::invalid_argument(format!(
                    "parameter '{shown}' must carry the model as bytes"
                )))
            }
        }
    }
    Ok(files)
}

fn tensor_metadata(io: &IoSpec) -> pb::model_metadata_response::TensorMetadata {
    pb::model_metadata_response::TensorMetadata {
        name: io.name.clone(),
        datatype: io.dtype.kserve_name().into(),
        shape: io.kserve_shape(),
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceApi {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse {
            ready: self.app.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(pb::ModelReadyResponse {
            ready: self.app.repo.get(&r.name, &r.version).is_ok(),
        }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: "opreg".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: EXTENSIONS.iter().map(|e| e.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let r = req.into_inner();
        let m = self.app.repo.get(&r.name, &r.version)?;
        let versions = self
            .app
            .repo
            .versions(&m.name)
            .iter()
            .map(|v| v.to_string())
            .collect();
        Ok(Response::new(pb::ModelMetadataResponse {
            name: m.name.clone(),
            versions,
            platform: PLATFORM.into(),
            inputs: m.model.inputs.iter().map(tensor_metadata).collect(),
            outputs: m.model.outputs.iter().map(tensor_metadata).collect(),
        }))
    }

    async fn model_infer(
        &self,
        req: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        use tracing::Instrument;
        let deadline = client_timeout(req.metadata());
        // The client's request id (Triton's header, the common one, or the request's own id)
        // goes on every line logged while serving it.
        let header = |k: &str| {
            req.metadata()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(|s| clip(s, 128))
        };
        let id = header("triton-request-id")
            .or_else(|| header("x-request-id"))
            .unwrap_or_else(|| clip(&req.get_ref().id, 128));
        let span = tracing::info_span!(
            "infer",
            model = %clip(&req.get_ref().model_name, 128),
            request_id = %id
        );
        async move {
            let started = std::time::Instant::now();
            let result = infer(&self.app, req.into_inner(), deadline).await;
            match &result {
                Ok(_) => tracing::debug!(us = started.elapsed().as_micros() as u64, "request done"),
                Err(s) => tracing::info!(
                    us = started.elapsed().as_micros() as u64,
                    code = ?s.code(),
                    "request failed: {}",
                    s.message()
                ),
            }
            result.map(Response::new)
        }
        .instrument(span)
        .await
    }

    type ModelStreamInferStream = ResponseStream;

    async fn model_stream_infer(
        &self,
        req: Request<Streaming<pb::ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let mut requests = req.into_inner();
        let app = self.app.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        // Requests are answered in order. An error of one request travels in-band
        // (`error_message`), as Triton does, and the stream goes on. When the client goes
        // away, the request in progress is dropped, which cancels its run.
        tokio::spawn(async move {
            while let Some(next) = requests.next().await {
                let reply = match next {
                    Ok(r) => match tokio::select! {
                        r = infer(&app, r, None) => r,
                        _ = tx.closed() => break,
                    } {
                        Ok(resp) => pb::ModelStreamInferResponse {
                            error_message: String::new(),
                            infer_response: Some(resp),
                        },
                        Err(e) => pb::ModelStreamInferResponse {
                            error_message: e.message().to_string(),
                            infer_response: None,
                        },
                    },
                    Err(_) => break,
                };
                if tx.send(Ok(reply)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn model_config(
        &self,
        req: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let r = req.into_inner();
        let m = self.app.repo.get(&r.name, &r.version)?;
        let batched = m.settings.max_batch_size > 0;
        // With batching, Triton's dims leave out the batch dimension.
        let dims = |io: &IoSpec| {
            let s = io.kserve_shape();
            match s.split_first() {
                Some((_, rest)) if batched => rest.to_vec(),
                _ => s,
            }
        };
        Ok(Response::new(pb::ModelConfigResponse {
            config: Some(pb::ModelConfig {
                name: m.name.clone(),
                platform: PLATFORM.into(),
                backend: "opreg".into(),
                max_batch_size: m.settings.max_batch_size,
                input: m
                    .model
                    .inputs
                    .iter()
                    .map(|i| pb::ModelInput {
                        name: i.name.clone(),
                        data_type: config_type(i.dtype),
                        dims: dims(i),
                    })
                    .collect(),
                output: m
                    .model
                    .outputs
                    .iter()
                    .map(|o| pb::ModelOutput {
                        name: o.name.clone(),
                        data_type: config_type(o.dtype),
                        dims: dims(o),
                    })
                    .collect(),
            }),
        }))
    }

    async fn model_statistics(
        &self,
        req: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        let r = req.into_inner();
        let model_stats = if r.name.is_empty() {
            self.app
                .repo
                .ready()
                .iter()
                .map(|m| statistics(m))
                .collect()
        } else {
            let m = self.app.repo.get(&r.name, &r.version)?;
            vec![statistics(&m)]
        };
        Ok(Response::new(pb::ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        req: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        let ready_only = req.into_inner().ready;
        let mut models = Vec::new();
        for (name, entry) in self.app.repo.index() {
            if entry.versions.is_empty() {
                if !ready_only {
                    models.push(pb::repository_index_response::ModelIndex {
                        name,
                        version: String::new(),
                        state: "UNAVAILABLE".into(),
                        reason: entry.reason,
                    });
                }
                continue;
            }
            for (v, state) in &entry.versions {
                let (state, reason) = state.describe();
                if ready_only && state != "READY" {
                    continue;
                }
                models.push(pb::repository_index_response::ModelIndex {
                    name: name.clone(),
                    version: v.to_string(),
                    state: state.into(),
                    reason,
                });
            }
        }
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        req: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        refuse_in_mode_none(&self.app)?;
        let r = req.into_inner();
        let files = submitted_files(&r.parameters)?;
        let app = self.app.clone();
        let name = r.model_name.clone();
        let versions = self
            .app
            .compute
            .run(move || app.repo.load(&name, files, &app.registry))
            .await?
            .map_err(|e| {
                tracing::warn!(model = %clip(&r.model_name, 128), "model load failed: {e}");
                Status::from(e)
            })?;
        tracing::info!(model = %r.model_name, ?versions, "model loaded");
        Ok(Response::new(pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        req: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        refuse_in_mode_none(&self.app)?;
        let r = req.into_inner();
        self.app.repo.unload(&r.model_name)?;
        let r = pb::RepositoryModelUnloadRequest {
            model_name: clip(&r.model_name, 128),
            ..r
        };
        tracing::info!(model = %r.model_name, "model unloaded");
        Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
    }

    async fn system_shared_memory_status(
        &self,
        _: Request<pb::SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryStatusResponse>, Status> {
        Err(Status::unimplemented(
            "shared-memory extension is not supported",
        ))
    }

    async fn system_shared_memory_register(
        &self,
        _: Request<pb::SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryRegisterResponse>, Status> {
        Err(Status::unimplemented(
            "shared-memory extension is not supported",
        ))
    }

    async fn system_shared_memory_unregister(
        &self,
        _: Request<pb::SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryUnregisterResponse>, Status> {
        Err(Status::unimplemented(
            "shared-memory extension is not supported",
        ))
    }

    async fn cuda_shared_memory_status(
        &self,
        _: Request<pb::CudaSharedMemoryStatusRequest>,
    ) -> Result<Response<pb::CudaSharedMemoryStatusResponse>, Status> {
        Err(Status::unimplemented(
            "CUDA shared-memory extension is not supported",
        ))
    }

    async fn cuda_shared_memory_register(
        &self,
        _: Request<pb::CudaSharedMemoryRegisterRequest>,
    ) -> Result<Response<pb::CudaSharedMemoryRegisterResponse>, Status> {
        Err(Status::unimplemented(
            "CUDA shared-memory extension is not supported",
        ))
    }

    async fn cuda_shared_memory_unregister(
        &self,
        _: Request<pb::CudaSharedMemoryUnregisterRequest>,
    ) -> Result<Response<pb::CudaSharedMemoryUnregisterResponse>, Status> {
        Err(Status::unimplemented(
            "CUDA shared-memory extension is not supported",
        ))
    }

    async fn trace(
        &self,
        _: Request<pb::TraceRequest>,
    ) -> Result<Response<pb::TraceResponse>, Status> {
        Err(Status::unimplemented("trace extension is not supported"))
    }
}
