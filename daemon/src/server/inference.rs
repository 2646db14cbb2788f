//! `inference.GRPCInferenceService`: the KServe v2 / Open Inference Protocol.
//!
//! Server health and metadata are served here; model calls answer UNIMPLEMENTED until the
//! graph runtime is in place.

use crate::app::App;
use opreg_proto::inference::{self as pb, grpc_inference_service_server::GrpcInferenceService};
use std::{pin::Pin, sync::Arc};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

pub struct InferenceApi {
    pub app: Arc<App>,
}

/// Extensions of the protocol this server implements, as `ServerMetadata` reports them.
/// perf-style clients read `ModelStatistics` only when `statistics` is listed.
pub const EXTENSIONS: &[&str] = &[];

fn not_yet(call: &str) -> Status {
    Status::unimplemented(format!(
        "{call} is not available yet: this opreg build serves plugins only (no graph runtime)"
    ))
}

type Stream_ = Pin<Box<dyn Stream<Item = Result<pb::ModelStreamInferResponse, Status>> + Send>>;

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
        _: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        Err(not_yet("ModelReady"))
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
        _: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        Err(not_yet("ModelMetadata"))
    }

    async fn model_infer(
        &self,
        _: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        Err(not_yet("ModelInfer"))
    }

    type ModelStreamInferStream = Stream_;

    async fn model_stream_infer(
        &self,
        _: Request<Streaming<pb::ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        Err(not_yet("ModelStreamInfer"))
    }

    async fn model_config(
        &self,
        _: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        Err(not_yet("ModelConfig"))
    }

    async fn model_statistics(
        &self,
        _: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        Err(not_yet("ModelStatistics"))
    }

    async fn repository_index(
        &self,
        _: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        Err(not_yet("RepositoryIndex"))
    }

    async fn repository_model_load(
        &self,
        _: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        Err(not_yet("RepositoryModelLoad"))
    }

    async fn repository_model_unload(
        &self,
        _: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        Err(not_yet("RepositoryModelUnload"))
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
