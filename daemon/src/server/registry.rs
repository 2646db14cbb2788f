//! `opreg.v1.Registry`: plugins, kernels, backends, quantizers.

// Request and model data reach this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use super::tensor;
use crate::{
    app::App,
    exec::{self, KernelCall},
    plugin::LoadedPlugin,
    registry::Snapshot,
    swap,
};
use opreg_proto::opreg::v1::{self as pb, registry_server::Registry};
use opreg_sdk::{kernel::Attribute, AttrValue, Device, DeviceKind, ObservationKind};
use std::{path::PathBuf, sync::Arc};
use tonic::{Request, Response, Status};

pub struct RegistryApi {
    pub app: Arc<App>,
}

/// Most outputs a `RunKernel` call may ask for (ONNX operators have a handful; Split may
/// have many).
const MAX_KERNEL_OUTPUTS: usize = 4096;

fn plugin_info(p: &LoadedPlugin) -> pb::PluginInfo {
    pb::PluginInfo {
        name: p.name.clone(),
        version: p.version.clone(),
        abi_version: p.abi_version.clone(),
        source_file: p.source.display().to_string(),
        sha256: p.sha256.clone(),
        generation: p.generation,
        description: p.description.clone(),
        kernels: p.kernels.len() as u32,
        backends: p.backends.len() as u32,
        quantizers: p.quantizers.len() as u32,
        loaded_copy: p.loaded_copy().display().to_string(),
        quarantined: false,
        recent_faults: 0,
    }
}

fn kernels(snapshot: &Snapshot, op_type: &str, domain: &str) -> Vec<pb::KernelInfo> {
    let mut out = Vec::new();
    for p in snapshot.plugins.values() {
        for k in &p.kernels {
            let d = &k.desc;
            if (!op_type.is_empty() && d.op_type.as_str() != op_type)
                || (!domain.is_empty() && d.domain.as_str() != domain)
            {
                continue;
            }
            out.push(pb::KernelInfo {
                domain: d.domain.to_string(),
                op_type: d.op_type.to_string(),
                since_version: d.since_version,
                end_version: d.end_version,
                type_constraints: d
                    .type_constraints
                    .iter()
                    .map(|c| pb::TypeConstraint {
                        name: c.name.to_string(),
                        types: c
                            .types
                            .iter()
                            .map(|t| t.kserve_name().to_string())
                            .collect(),
                    })
                    .collect(),
                device: d.device.to_string(),
                priority: d.priority,
                plugin: p.name.clone(),
                generation: p.generation,
            });
        }
    }
    out.sort_by(|a, b| {
        (&a.domain, &a.op_type, &a.device, -a.priority).cmp(&(
            &b.domain,
            &b.op_type,
            &b.device,
            -b.priority,
        ))
    });
    out
}

fn parse_device(name: &str) -> Result<Device, Status> {
    if name.is_empty() {
        return Ok(Device::CPU);
    }
    let (kind, ordinal) = match name.split_once(':') {
        Some((k, o)) => (
            k,
            o.parse()
                .map_err(|_| Status::invalid_argument(format!("bad device ordinal in '{name}'")))?,
        ),
        None => (name, 0),
    };
    let kind = DeviceKind::from_name(kind)
        .ok_or_else(|| Status::invalid_argument(format!("unknown device '{name}'")))?;
    Ok(Device { kind, ordinal })
}

fn attribute(a: pb::Attribute) -> Result<Attribute, Status> {
    use pb::attribute::Value;
    let value = match a.value {
        Some(Value::I(v)) => AttrValue::Int(v),
        Some(Value::F(v)) => AttrValue::Float(v),
        Some(Value::S(v)) => AttrValue::String(v),
        Some(Value::Ints(v)) => AttrValue::Ints(v.values),
        Some(Value::Floats(v)) => AttrValue::Floats(v.values),
        Some(Value::Strings(v)) => AttrValue::Strings(v.values),
        None => {
            return Err(Status::invalid_argument(format!(
                "attribute '{}' has no value",
                a.name
            )))
        }
    };
    Ok(Attribute {
        name: a.name,
        value,
    })
}

impl RegistryApi {
    /// When a call must be done: the client's `grpc-timeout`, bounded by the server's.
    fn deadline(&self, metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Instant> {
        self.app
            .config
            .limits
            .call_timeout(super::infer::client_timeout(metadata))
            .map(|t| std::time::Instant::now() + t)
    }
}

#[tonic::async_trait]
impl Registry for RegistryApi {
    async fn list_plugins(
        &self,
        _: Request<pb::ListPluginsRequest>,
    ) -> Result<Response<pb::ListPluginsResponse>, Status> {
        let s = self.app.registry.snapshot();
        Ok(Response::new(pb::ListPluginsResponse {
            plugins: s
                .plugins
                .values()
                .map(|p| pb::PluginInfo {
                    quarantined: s.quarantined.contains(&p.name),
                    recent_faults: self.app.registry.recent_faults(&p.name) as u32,
                    ..plugin_info(p)
                })
                .collect(),
            generation: s.generation,
            previous: self
                .app
                .registry
                .previous()
                .iter()
                .map(|p| plugin_info(p))
                .collect(),
            refused: self
                .app
                .registry
                .refused()
                .into_iter()
                .map(|r| pb::RefusedSwap {
                    path: r.path,
                    sha256: r.sha256,
                    reason: r.reason,
                    unix_ms: r.unix_ms,
                })
                .collect(),
        }))
    }

    async fn swap_plugin(
        &self,
        req: Request<pb::SwapPluginRequest>,
    ) -> Result<Response<pb::SwapPluginResponse>, Status> {
        let r = req.into_inner();
        if r.path.is_empty() {
            return Err(Status::invalid_argument("SwapPlugin needs a path"));
        }
        let tolerance = |v: f64, default: f64, what: &str| match v {
            0.0 => Ok(default),
            v if v.is_finite() && v > 0.0 => Ok(v),
            v => Err(Status::invalid_argument(format!(
                "{what} {v} must be a positive number (0: the default {default})"
            ))),
        };
        let defaults = swap::Tolerance::configured(&self.app.config.swap);
        let options = swap::SwapOptions {
            expected: Some(r.name).filter(|n| !n.is_empty()),
            tolerance: swap::Tolerance {
                abs: tolerance(r.abs_tolerance, defaults.abs, "abs_tolerance")?,
                rel: tolerance(r.rel_tolerance, defaults.rel, "rel_tolerance")?,
            },
            dry_run: r.dry_run,
        };
        let path = PathBuf::from(r.path);
        let app = self.app.clone();
        let report = tokio::task::spawn_blocking(move || swap::swap(&app, &path, &options))
            .await
            .map_err(|e| Status::internal(format!("plugin swap task failed: {e}")))??;
        tracing::info!(
            plugin = %report.plugin.name,
            version = %report.plugin.version,
            generation = report.generation,
            models_checked = report.checks.len(),
            plans = report.plans_compiled,
            verify_ms = report.verify.as_secs_f64() * 1e3,
            dry_run = r.dry_run,
            "plugin swapped"
        );
        Ok(Response::new(pb::SwapPluginResponse {
            plugin: Some(plugin_info(&report.plugin)),
            generation: report.generation,
            replaced_generation: report.replaced_generation,
            checks: report
                .checks
                .into_iter()
                .map(|c| pb::SwapCheck {
                    model: c.model,
                    version: c.version.to_string(),
                    inputs: c.inputs,
                    max_abs_diff: c.max_abs_diff,
                    worst_output: c.worst_output,
                    recorded: c.recorded,
                })
                .collect(),
            plans_compiled: report.plans_compiled,
            verify_ns: report.verify.as_nanos() as u64,
        }))
    }

    async fn release_quarantine(
        &self,
        req: Request<pb::ReleaseQuarantineRequest>,
    ) -> Result<Response<pb::ReleaseQuarantineResponse>, Status> {
        let name = req.into_inner().name;
        let app = self.app.clone();
        let generation =
            tokio::task::spawn_blocking(move || swap::quarantine::set(&app, &name, false))
                .await
                .map_err(|e| Status::internal(format!("quarantine task failed: {e}")))??;
        Ok(Response::new(pb::ReleaseQuarantineResponse { generation }))
    }

    async fn rollback_plugin(
        &self,
        req: Request<pb::RollbackPluginRequest>,
    ) -> Result<Response<pb::RollbackPluginResponse>, Status> {
        let name = req.into_inner().name;
        let app = self.app.clone();
        let report = tokio::task::spawn_blocking(move || swap::rollback(&app, &name))
            .await
            .map_err(|e| Status::internal(format!("plugin rollback task failed: {e}")))??;
        tracing::info!(
            plugin = %report.plugin.name,
            version = %report.plugin.version,
            generation = report.generation,
            "plugin rolled back"
        );
        Ok(Response::new(pb::RollbackPluginResponse {
            plugin: Some(plugin_info(&report.plugin)),
            generation: report.generation,
        }))
    }

    async fn load_plugin(
        &self,
        req: Request<pb::LoadPluginRequest>,
    ) -> Result<Response<pb::LoadPluginResponse>, Status> {
        let path = PathBuf::from(req.into_inner().path);
        if path.as_os_str().is_empty() {
            return Err(Status::invalid_argument("LoadPlugin needs a path"));
        }
        let app = self.app.clone();
        let result = tokio::task::spawn_blocking(move || app.registry.load(&path))
            .await
            .map_err(|e| Status::internal(format!("plugin loader task failed: {e}")))?;
        match result {
            Ok((p, generation)) => {
                tracing::info!(plugin = %p.name, version = %p.version, source = %p.source.display(), generation, kernels = p.kernels.len(), "plugin loaded");
                Ok(Response::new(pb::LoadPluginResponse {
                    plugin: Some(plugin_info(&p)),
                    generation,
                }))
            }
            Err(e) => {
                tracing::error!("refused plugin: {e}");
                Err(e.into())
            }
        }
    }

    async fn unload_plugin(
        &self,
        req: Request<pb::UnloadPluginRequest>,
    ) -> Result<Response<pb::UnloadPluginResponse>, Status> {
        let name = req.into_inner().name;
        let generation = self.app.registry.unload(&name)?;
        tracing::info!(plugin = %name, generation, "plugin unloaded");
        Ok(Response::new(pb::UnloadPluginResponse { generation }))
    }

    async fn list_kernels(
        &self,
        req: Request<pb::ListKernelsRequest>,
    ) -> Result<Response<pb::ListKernelsResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(pb::ListKernelsResponse {
            kernels: kernels(&self.app.registry.snapshot(), &r.op_type, &r.domain),
        }))
    }

    async fn list_backends(
        &self,
        _: Request<pb::ListBackendsRequest>,
    ) -> Result<Response<pb::ListBackendsResponse>, Status> {
        let s = self.app.registry.snapshot();
        let backends = s
            .plugins
            .values()
            .flat_map(|p| {
                p.backends.iter().map(move |b| pb::BackendInfo {
                    name: b.desc.name.to_string(),
                    device: b.desc.device.to_string(),
                    gemm_types: b.desc.types.iter().map(|t| t.to_string()).collect(),
                    priority: b.desc.priority,
                    plugin: p.name.clone(),
                    generation: p.generation,
                })
            })
            .collect();
        Ok(Response::new(pb::ListBackendsResponse { backends }))
    }

    async fn list_quantizers(
        &self,
        _: Request<pb::ListQuantizersRequest>,
    ) -> Result<Response<pb::ListQuantizersResponse>, Status> {
        let s = self.app.registry.snapshot();
        let quantizers = s
            .plugins
            .values()
            .flat_map(|p| {
                p.quantizers.iter().map(move |q| pb::QuantizerInfo {
                    name: q.desc.name.to_string(),
                    description: q.desc.description.to_string(),
                    observes: {
                        let o = q.quantizer.observation();
                        let v2 =
                            !p.abi_version.starts_with("1.0") && !p.abi_version.starts_with("1.1");
                        match o.kind {
                            // A 1.2 strategy chooses per tensor in `observe`.
                            ObservationKind::NOTHING if v2 => "chosen per tensor".into(),
                            ObservationKind::NOTHING => "nothing".into(),
                            ObservationKind::MIN_MAX => "min-max".into(),
                            ObservationKind::HISTOGRAM => format!("histogram({})", o.bins),
                            other => format!("unknown observation kind {}", other.0),
                        }
                    },
                    plugin: p.name.clone(),
                    generation: p.generation,
                })
            })
            .collect();
        Ok(Response::new(pb::ListQuantizersResponse { quantizers }))
    }

    async fn model_placement(
        &self,
        req: Request<pb::ModelPlacementRequest>,
    ) -> Result<Response<pb::ModelPlacementResponse>, Status> {
        let r = req.into_inner();
        let m = self.app.repo.get(&r.name, &r.version)?;
        let plan = m.current_plan();
        Ok(Response::new(pb::ModelPlacementResponse {
            name: m.name.clone(),
            version: m.version.to_string(),
            generation: plan.generation(),
            nodes: plan
                .placement
                .iter()
                .map(|p| pb::NodePlacement {
                    node: p.node.clone(),
                    op_type: p.op_type.clone(),
                    opset: p.opset,
                    kernel: p.kernel.clone(),
                    plugin: p.plugin.clone(),
                    device: p.device.to_string(),
                    folded: p.folded,
                })
                .collect(),
            copies: plan
                .copies
                .iter()
                .map(|c| pb::DeviceCopy {
                    value: c.value.clone(),
                    from: c.from.to_string(),
                    to: c.to.to_string(),
                })
                .collect(),
        }))
    }

    async fn model_adaptation(
        &self,
        req: Request<pb::ModelAdaptationRequest>,
    ) -> Result<Response<pb::ModelAdaptationResponse>, Status> {
        let r = req.into_inner();
        let m = self.app.repo.get(&r.name, &r.version)?;
        let mut resp = pb::ModelAdaptationResponse {
            name: m.name.clone(),
            version: m.version.to_string(),
            ..Default::default()
        };
        if let Some(a) = &m.adaptive {
            let s = a.status();
            resp.adaptive = true;
            resp.strategy = a.policy.strategy.clone();
            resp.sampled = s.sampled;
            resp.window = s.window as u64;
            resp.checks = s.checks;
            resp.adaptations = s.adaptations;
            resp.refused = s.refused;
            resp.last_drift = s.last_drift;
            resp.current_sqnr_db = s.current_sqnr_db;
            resp.candidate_sqnr_db = s.candidate_sqnr_db;
            resp.last_outcome = s.last_outcome;
        }
        Ok(Response::new(resp))
    }

    type QuantizeStream = super::quantize::Events;

    async fn quantize(
        &self,
        req: Request<tonic::Streaming<pb::QuantizeRequest>>,
    ) -> Result<Response<Self::QuantizeStream>, Status> {
        super::quantize::quantize(self.app.clone(), req.into_inner())
            .await
            .map(Response::new)
    }

    async fn profile_model(
        &self,
        req: Request<pb::ProfileModelRequest>,
    ) -> Result<Response<pb::ProfileModelResponse>, Status> {
        let deadline = self.deadline(req.metadata());
        super::profile::profile(&self.app, req.into_inner(), deadline)
            .await
            .map(Response::new)
    }

    async fn run_kernel(
        &self,
        req: Request<pb::RunKernelRequest>,
    ) -> Result<Response<pb::RunKernelResponse>, Status> {
        let deadline = self.deadline(req.metadata());
        let r = req.into_inner();
        if r.op_type.is_empty() {
            return Err(Status::invalid_argument("RunKernel needs an op_type"));
        }
        let max_tensor =
            usize::try_from(self.app.config.limits.max_tensor_bytes).unwrap_or(usize::MAX);
        let inputs = r
            .inputs
            .iter()
            .map(|t| {
                let name = crate::repo::clip(&t.name, 128);
                let dtype = tensor::dtype(&name, &crate::repo::clip(&t.datatype, 128))?;
                let shape = tensor::shape(&name, &t.shape)?;
                tensor::check_bytes(&name, dtype, &shape, max_tensor)?;
                tensor::from_raw(&name, dtype, &shape, &t.raw)
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let call = KernelCall {
            device: parse_device(&r.device)?,
            attributes: r
                .attributes
                .into_iter()
                .map(attribute)
                .collect::<Result<_, _>>()?,
            num_outputs: match r.num_outputs {
                0 => 1,
                n if n as usize <= MAX_KERNEL_OUTPUTS => n as usize,
                n => {
                    return Err(Status::invalid_argument(format!(
                        "num_outputs {n} is more than {MAX_KERNEL_OUTPUTS}"
                    )))
                }
            },
            opset: r.opset,
            domain: r.domain,
            op_type: r.op_type,
            inputs,
            max_tensor_bytes: max_tensor,
            deadline,
        };
        let snapshot = self.app.registry.snapshot();
        let result = self
            .app
            .compute
            .run(move || exec::run_kernel(&snapshot, &call))
            .await
            .and_then(|r| r);
        let result = result.map_err(|e| {
            tracing::warn!("RunKernel failed: {e}");
            Status::from(e)
        })?;
        Ok(Response::new(pb::RunKernelResponse {
            outputs: result
                .outputs
                .iter()
                .enumerate()
                .map(|(i, t)| pb::Tensor {
                    name: format!("output_{i}"),
                    datatype: t.dtype().kserve_name().into(),
                    shape: t.shape().iter().map(|&d| d as i64).collect(),
                    raw: tensor::to_raw(t),
                })
                .collect(),
            plugin: result.plugin,
            generation: result.generation,
        }))
    }
}
