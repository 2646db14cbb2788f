//! The KServe v2 REST/JSON protocol (`--http-listen`), so `curl` and `tritonclient.http` work
//! unchanged: health, server and model metadata, readiness, inference with JSON tensors and
//! the binary-data extension, statistics, and the repository extension (index, load, unload).
//!
//! Every route translates its request into the gRPC service's message and calls the same
//! implementation ([`InferenceApi`]), so both protocols check, run and answer alike; only the
//! encoding differs. Authorization is the gRPC policy's, applied to the HTTP headers.

// Request data reaches this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use super::{
    auth::{Access, Policy},
    inference::InferenceApi,
    receive,
};
use crate::app::App;
use axum::{
    body::{Body, Bytes},
    extract::{Path, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Router,
};
use opreg_proto::inference::{self as pb, grpc_inference_service_server::GrpcInferenceService};
use opreg_sdk::DType;
use serde_json::{json, Map, Value};
use std::{collections::HashMap, pin::Pin, sync::Weak};
use tonic::{Code, Status};

/// The binary-data extension's header: the length of the JSON part of a body.
const HEADER_LENGTH: &str = "inference-header-content-length";

/// Largest request body (the gRPC message limit).
const MAX_BODY: usize = super::MAX_MESSAGE_BYTES;

#[derive(Clone)]
struct Ctx {
    app: Weak<App>,
    policy: Policy,
}

/// An HTTP error in KServe's shape: `{"error": "..."}` with the status the gRPC code maps to.
struct HttpError(Status);

impl From<Status> for HttpError {
    fn from(s: Status) -> Self {
        HttpError(s)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let code = match self.0.code() {
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                StatusCode::BAD_REQUEST
            }
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (code, axum::Json(json!({ "error": self.0.message() }))).into_response()
    }
}

type Reply = Result<Response, HttpError>;

impl Ctx {
    /// The service, after the access check.
    fn api(&self, access: Access, headers: &HeaderMap) -> Result<InferenceApi, HttpError> {
        self.policy.check(access, headers)?;
        let app = self
            .app
            .upgrade()
            .ok_or_else(|| Status::unavailable("the server is shutting down"))?;
        Ok(InferenceApi { app })
    }
}

fn bad(msg: impl Into<String>) -> HttpError {
    HttpError(Status::invalid_argument(msg.into()))
}

/// The router of every v2 route.
pub fn router(app: Weak<App>, policy: Policy) -> Router {
    let ctx = Ctx { app, policy };
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/{model}", get(model_metadata))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(model_metadata_v),
        )
        .route("/v2/models/{model}/ready", get(model_ready))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(model_ready_v),
        )
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer_v))
        .route("/v2/models/{model}/stats", get(stats))
        .route("/v2/models/{model}/versions/{version}/stats", get(stats_v))
        .route("/v2/repository/index", post(index))
        .route("/v2/repository/models/{model}/load", post(load))
        .route("/v2/repository/models/{model}/unload", post(unload))
        .with_state(ctx)
}

/// Serves the router on `listener`.
pub async fn serve(
    app: Weak<App>,
    policy: Policy,
    listener: tokio::net::TcpListener,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Small JSON requests must not wait for Nagle (as on the gRPC listener).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("HTTP: cannot set TCP_NODELAY: {e}");
        }
    });
    axum::serve(listener, router(app, policy)).await
}

async fn live(State(c): State<Ctx>, h: HeaderMap) -> Reply {
    let r = c
        .api(Access::Open, &h)?
        .server_live(tonic::Request::new(pb::ServerLiveRequest {}))
        .await?
        .into_inner();
    Ok(status_only(r.live))
}

async fn ready(State(c): State<Ctx>, h: HeaderMap) -> Reply {
    let r = c
        .api(Access::Open, &h)?
        .server_ready(tonic::Request::new(pb::ServerReadyRequest {}))
        .await?
        .into_inner();
    Ok(status_only(r.ready))
}

/// 200 when `ok`, else 400 (KServe's readiness answers).
fn status_only(ok: bool) -> Response {
    if ok {
        StatusCode::OK.into_response()
    } else {
        StatusCode::BAD_REQUEST.into_response()
    }
}

async fn server_metadata(State(c): State<Ctx>, h: HeaderMap) -> Reply {
    let r = c
        .api(Access::Read, &h)?
        .server_metadata(tonic::Request::new(pb::ServerMetadataRequest {}))
        .await?
        .into_inner();
    Ok(
        axum::Json(json!({"name": r.name, "version": r.version, "extensions": r.extensions}))
            .into_response(),
    )
}

async fn model_metadata(s: State<Ctx>, h: HeaderMap, Path(model): Path<String>) -> Reply {
    metadata(s, h, model, String::new()).await
}

async fn model_metadata_v(
    s: State<Ctx>,
    h: HeaderMap,
    Path((model, version)): Path<(String, String)>,
) -> Reply {
    metadata(s, h, model, version).await
}

async fn metadata(State(c): State<Ctx>, h: HeaderMap, name: String, version: String) -> Reply {
    let r = c
        .api(Access::Read, &h)?
        .model_metadata(tonic::Request::new(pb::ModelMetadataRequest {
            name,
            version,
        }))
        .await?
        .into_inner();
    let tensors = |ts: &[pb::model_metadata_response::TensorMetadata]| -> Vec<Value> {
        ts.iter()
            .map(|t| json!({"name": t.name, "datatype": t.datatype, "shape": t.shape}))
            .collect()
    };
    Ok(axum::Json(json!({
        "name": r.name,
        "versions": r.versions,
        "platform": r.platform,
        "inputs": tensors(&r.inputs),
        "outputs": tensors(&r.outputs),
    }))
    .into_response())
}

async fn model_ready(s: State<Ctx>, h: HeaderMap, Path(model): Path<String>) -> Reply {
    readiness(s, h, model, String::new()).await
}

async fn model_ready_v(
    s: State<Ctx>,
    h: HeaderMap,
    Path((model, version)): Path<(String, String)>,
) -> Reply {
    readiness(s, h, model, version).await
}

async fn readiness(State(c): State<Ctx>, h: HeaderMap, name: String, version: String) -> Reply {
    let r = c
        .api(Access::Read, &h)?
        .model_ready(tonic::Request::new(pb::ModelReadyRequest { name, version }))
        .await?
        .into_inner();
    Ok(status_only(r.ready))
}

async fn stats(s: State<Ctx>, h: HeaderMap, Path(model): Path<String>) -> Reply {
    statistics(s, h, model, String::new()).await
}

async fn stats_v(
    s: State<Ctx>,
    h: HeaderMap,
    Path((model, version)): Path<(String, String)>,
) -> Reply {
    statistics(s, h, model, version).await
}

async fn statistics(State(c): State<Ctx>, h: HeaderMap, name: String, version: String) -> Reply {
    let r = c
        .api(Access::Read, &h)?
        .model_statistics(tonic::Request::new(pb::ModelStatisticsRequest {
            name,
            version,
        }))
        .await?
        .into_inner();
    let d = |d: &Option<pb::StatisticDuration>| {
        let (count, ns) = d.as_ref().map_or((0, 0), |d| (d.count, d.ns));
        json!({"count": count, "ns": ns})
    };
    let models: Vec<Value> = r
        .model_stats
        .iter()
        .map(|m| {
            let s = m.inference_stats.unwrap_or_default();
            json!({
                "name": m.name,
                "version": m.version,
                "last_inference": m.last_inference,
                "inference_count": m.inference_count,
                "execution_count": m.execution_count,
                "inference_stats": {
                    "success": d(&s.success),
                    "fail": d(&s.fail),
                    "queue": d(&s.queue),
                    "compute_input": d(&s.compute_input),
                    "compute_infer": d(&s.compute_infer),
                    "compute_output": d(&s.compute_output),
                },
            })
        })
        .collect();
    Ok(axum::Json(json!({ "model_stats": models })).into_response())
}

async fn index(State(c): State<Ctx>, h: HeaderMap) -> Reply {
    let r = c
        .api(Access::Read, &h)?
        .repository_index(tonic::Request::new(pb::RepositoryIndexRequest::default()))
        .await?
        .into_inner();
    let models: Vec<Value> = r
        .models
        .iter()
        .map(
            |m| json!({"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}),
        )
        .collect();
    Ok(axum::Json(Value::Array(models)).into_response())
}

/// `POST /v2/repository/models/{model}/load`, optionally with `{"parameters": {"file:1/model.onnx":
/// "<base64>"}}` as tritonclient.http sends model files.
async fn load(State(c): State<Ctx>, h: HeaderMap, Path(model): Path<String>, body: Body) -> Reply {
    use base64::Engine;
    let api = c.api(Access::Admin, &h)?;
    let (body, _held) = read_body(&api.app, &h, body).await?;
    let mut parameters = HashMap::new();
    if !body.is_empty() {
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| bad(format!("load request: not JSON: {e}")))?;
        if let Some(params) = v.get("parameters").and_then(Value::as_object) {
            for (k, v) in params {
                use pb::model_repository_parameter::ParameterChoice as P;
                let choice = match v {
                    Value::String(s) if k.starts_with("file:") => P::BytesParam(
                        base64::engine::general_purpose::STANDARD
                            .decode(s)
                            .map_err(|e| bad(format!("parameter '{k}': not base64: {e}")))?,
                    ),
                    Value::String(s) => P::StringParam(s.clone()),
                    Value::Bool(b) => P::BoolParam(*b),
                    Value::Number(n) => P::Int64Param(
                        n.as_i64()
                            .ok_or_else(|| bad(format!("parameter '{k}': not an integer")))?,
                    ),
                    _ => return Err(bad(format!("parameter '{k}': unsupported value"))),
                };
                parameters.insert(
                    k.clone(),
                    pb::ModelRepositoryParameter {
                        parameter_choice: Some(choice),
                    },
                );
            }
        }
    }
    api.repository_model_load(tonic::Request::new(pb::RepositoryModelLoadRequest {
        model_name: model,
        parameters,
        ..Default::default()
    }))
    .await?;
    Ok(StatusCode::OK.into_response())
}

async fn unload(State(c): State<Ctx>, h: HeaderMap, Path(model): Path<String>) -> Reply {
    c.api(Access::Admin, &h)?
        .repository_model_unload(tonic::Request::new(pb::RepositoryModelUnloadRequest {
            model_name: model,
            ..Default::default()
        }))
        .await?;
    Ok(StatusCode::OK.into_response())
}

async fn infer(s: State<Ctx>, h: HeaderMap, Path(model): Path<String>, body: Body) -> Reply {
    run_infer(s, h, model, String::new(), body).await
}

async fn infer_v(
    s: State<Ctx>,
    h: HeaderMap,
    Path((model, version)): Path<(String, String)>,
    body: Body,
) -> Reply {
    run_infer(s, h, model, version, body).await
}

/// A request body, read after the caller's access check (an extractor would read it before
/// the handler runs: a caller without the token could make the daemon hold bodies of up to
/// [`MAX_BODY`]): at most `MAX_BODY` bytes, into a buffer grown fallibly, and from
/// [`receive::COUNTED_FROM`] bytes on counted against the budget the gRPC listener shares
/// (`--max-receiving-bytes`), held until the returned guard drops.
async fn read_body(
    app: &App,
    headers: &HeaderMap,
    mut body: Body,
) -> Result<(Bytes, receive::Held), HttpError> {
    use http_body::Body as _;
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.trim().parse::<usize>().ok());
    let too_large = |n: usize| {
        HttpError(Status::out_of_range(format!(
            "a request body of {n} bytes is larger than the {MAX_BODY} bytes accepted"
        )))
    };
    if let Some(n) = declared.filter(|&n| n > MAX_BODY) {
        return Err(too_large(n));
    }
    let mut held = app.receiving.hold(declared.unwrap_or(0))?;
    let no_memory = |n: usize| {
        HttpError(Status::resource_exhausted(format!(
            "cannot reserve {n} bytes for a request body"
        )))
    };
    let mut buf = Vec::new();
    if let Some(n) = declared {
        buf.try_reserve_exact(n).map_err(|_| no_memory(n))?;
    }
    let idle = app.config.limits.receive_idle_timeout();
    loop {
        let next = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx));
        // A counted body that stops arriving gives its share back (as a gRPC message does).
        let frame = match idle.filter(|_| held.counted()) {
            Some(limit) => tokio::time::timeout(limit, next).await.map_err(|_| {
                HttpError(Status::deadline_exceeded(format!(
                    "no byte of the request body for {}s (--receive-idle-timeout-s)",
                    limit.as_secs_f64()
                )))
            })?,
            None => next.await,
        };
        let Some(frame) = frame else {
            break;
        };
        let frame = frame.map_err(|e| bad(format!("reading the request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let total = buf.len().saturating_add(data.len());
        if total > MAX_BODY {
            return Err(too_large(total));
        }
        if total > buf.capacity() {
            // (Doubling, as `Vec` would, with the budget taken for what is reserved.)
            let want = total.max(buf.capacity().saturating_mul(2)).min(MAX_BODY);
            held.grow(want)?;
            buf.try_reserve_exact(want - buf.len())
                .map_err(|_| no_memory(want))?;
        }
        buf.extend_from_slice(&data);
    }
    Ok((Bytes::from(buf), held))
}

/// The JSON part and the binary part of a body (binary-data extension).
fn split_body<'b>(headers: &HeaderMap, body: &'b [u8]) -> Result<(&'b [u8], &'b [u8]), HttpError> {
    match headers.get(HEADER_LENGTH) {
        None => Ok((body, &[])),
        Some(v) => {
            let n: usize = v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| bad(format!("{HEADER_LENGTH} is not a length")))?;
            if n > body.len() {
                return Err(bad(format!(
                    "{HEADER_LENGTH} is {n}, the body has {} bytes",
                    body.len()
                )));
            }
            Ok(body.split_at(n))
        }
    }
}

fn binary_flag(params: Option<&Value>, key: &str) -> bool {
    params
        .and_then(|p| p.get(key))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

async fn run_infer(
    State(c): State<Ctx>,
    h: HeaderMap,
    model: String,
    version: String,
    body: Body,
) -> Reply {
    let api = c.api(Access::Read, &h)?;
    let (body, _held) = read_body(&api.app, &h, body).await?;
    let (head, mut binary) = split_body(&h, &body)?;
    let v: Value = serde_json::from_slice(head)
        .map_err(|e| bad(format!("inference request: not JSON: {e}")))?;
    let mut req = pb::ModelInferRequest {
        model_name: model,
        model_version: version,
        id: v
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        ..Default::default()
    };
    let inputs = v
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("inference request: 'inputs' must be an array"))?;
    for (k, input) in inputs.iter().enumerate() {
        let name = input
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("input {k}: 'name' is missing")))?;
        let datatype = input
            .get("datatype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("input '{name}': 'datatype' is missing")))?;
        let shape: Vec<i64> = input
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad(format!("input '{name}': 'shape' is missing")))?
            .iter()
            .map(|d| {
                d.as_i64()
                    .ok_or_else(|| bad(format!("input '{name}': shape must hold integers")))
            })
            .collect::<Result<_, _>>()?;
        let size = input
            .get("parameters")
            .and_then(|p| p.get("binary_data_size"))
            .and_then(Value::as_u64);
        let raw = match size {
            Some(n) => {
                let n = usize::try_from(n)
                    .map_err(|_| bad(format!("input '{name}': binary_data_size too large")))?;
                if n > binary.len() {
                    return Err(bad(format!(
                        "input '{name}': binary_data_size {n}, but only {} binary bytes remain",
                        binary.len()
                    )));
                }
                let (this, rest) = binary.split_at(n);
                binary = rest;
                this.to_vec()
            }
            None => {
                let data = input.get("data").ok_or_else(|| {
                    bad(format!(
                        "input '{name}': neither 'data' nor binary_data_size"
                    ))
                })?;
                json_to_raw(name, datatype, data)?
            }
        };
        req.inputs.push(pb::model_infer_request::InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            ..Default::default()
        });
        req.raw_input_contents.push(raw.into());
    }
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} binary bytes are left over after the inputs",
            binary.len()
        )));
    }
    // Which outputs, and which of them as binary.
    let all_binary = binary_flag(v.get("parameters"), "binary_data_output");
    let mut binary_outputs: HashMap<String, bool> = HashMap::new();
    if let Some(outs) = v.get("outputs").and_then(Value::as_array) {
        for o in outs {
            let name = o
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("an output has no 'name'"))?;
            binary_outputs.insert(
                name.to_string(),
                binary_flag(o.get("parameters"), "binary_data") || all_binary,
            );
            req.outputs
                .push(pb::model_infer_request::InferRequestedOutputTensor {
                    name: name.into(),
                    ..Default::default()
                });
        }
    }
    let mut grpc = tonic::Request::new(req);
    // A client deadline travels as grpc-timeout on the gRPC side; here as Triton's header.
    if let Some(t) = h.get("timeout").and_then(|v| v.to_str().ok()) {
        if let Ok(v) = format!("{t}u").parse() {
            grpc.metadata_mut().insert("grpc-timeout", v);
        }
    }
    let r = api.model_infer(grpc).await?.into_inner();
    let mut outputs = Vec::new();
    let mut tail: Vec<u8> = Vec::new();
    for (o, raw) in r.outputs.iter().zip(&r.raw_output_contents) {
        let as_binary = binary_outputs.get(&o.name).copied().unwrap_or(all_binary);
        let mut out = Map::new();
        out.insert("name".into(), json!(o.name));
        out.insert("datatype".into(), json!(o.datatype));
        out.insert("shape".into(), json!(o.shape));
        if as_binary {
            out.insert("parameters".into(), json!({"binary_data_size": raw.len()}));
            tail.extend_from_slice(raw);
        } else {
            out.insert("data".into(), raw_to_json(&o.name, &o.datatype, raw)?);
        }
        outputs.push(Value::Object(out));
    }
    let mut head = json!({
        "model_name": r.model_name,
        "model_version": r.model_version,
        "outputs": outputs,
    });
    if !r.id.is_empty() {
        if let Some(h) = head.as_object_mut() {
            h.insert("id".into(), json!(r.id));
        }
    }
    let head = serde_json::to_vec(&head).map_err(|e| HttpError(Status::internal(e.to_string())))?;
    if tail.is_empty() {
        return Ok((
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            head,
        )
            .into_response());
    }
    let n = head.len();
    let mut body = head;
    body.extend_from_slice(&tail);
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                header::HeaderName::from_static(HEADER_LENGTH),
                HeaderValue::from(n),
            ),
        ],
        body,
    )
        .into_response())
}

/// Flattens nested JSON arrays into their leaves, row-major.
fn leaves<'v>(v: &'v Value, out: &mut Vec<&'v Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| leaves(i, out)),
        other => out.push(other),
    }
}

/// JSON tensor data as KServe raw bytes of `datatype`.
fn json_to_raw(name: &str, datatype: &str, data: &Value) -> Result<Vec<u8>, HttpError> {
    let dtype = DType::from_kserve_name(datatype)
        .ok_or_else(|| bad(format!("input '{name}': unknown datatype '{datatype}'")))?;
    let mut items = Vec::new();
    leaves(data, &mut items);
    let wrong = |what: &str| bad(format!("input '{name}': {datatype} data must be {what}"));
    let mut out = Vec::with_capacity(items.len() * dtype.size().max(1));
    let int = |v: &Value| -> Result<i128, HttpError> {
        v.as_i64()
            .map(i128::from)
            .or_else(|| v.as_u64().map(i128::from))
            .ok_or_else(|| wrong("integers"))
    };
    let float = |v: &Value| v.as_f64().ok_or_else(|| wrong("numbers"));
    macro_rules! ints {
        ($t:ty) => {
            for v in &items {
                let x = <$t>::try_from(int(v)?)
                    .map_err(|_| wrong(concat!("integers in range of ", stringify!($t))))?;
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match dtype {
        DType::Bool => {
            for v in &items {
                let b = v
                    .as_bool()
                    .or_else(|| v.as_i64().map(|i| i != 0))
                    .ok_or_else(|| wrong("true/false"))?;
                out.push(u8::from(b));
            }
        }
        DType::U8 => ints!(u8),
        DType::I8 => ints!(i8),
        DType::U16 => ints!(u16),
        DType::I16 => ints!(i16),
        DType::U32 => ints!(u32),
        DType::I32 => ints!(i32),
        DType::U64 => ints!(u64),
        DType::I64 => ints!(i64),
        DType::F32 => {
            for v in &items {
                out.extend_from_slice(&(float(v)? as f32).to_le_bytes());
            }
        }
        DType::F64 => {
            for v in &items {
                out.extend_from_slice(&float(v)?.to_le_bytes());
            }
        }
        DType::F16 => {
            for v in &items {
                out.extend_from_slice(&half::f16::from_f64(float(v)?).to_le_bytes());
            }
        }
        DType::BF16 => {
            for v in &items {
                out.extend_from_slice(&half::bf16::from_f64(float(v)?).to_le_bytes());
            }
        }
        DType::String => {
            for v in &items {
                let s = v.as_str().ok_or_else(|| wrong("strings"))?;
                let len = u32::try_from(s.len()).map_err(|_| wrong("strings under 4 GiB"))?;
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
        }
        _ => {
            return Err(bad(format!(
                "input '{name}': {datatype} cannot be sent as JSON; use binary data"
            )))
        }
    }
    Ok(out)
}

/// KServe raw bytes of `datatype` as a flat JSON array.
fn raw_to_json(name: &str, datatype: &str, raw: &[u8]) -> Result<Value, HttpError> {
    let dtype = DType::from_kserve_name(datatype).ok_or_else(|| {
        HttpError(Status::internal(format!(
            "output '{name}': datatype {datatype}"
        )))
    })?;
    macro_rules! nums {
        ($t:ty, $n:expr) => {
            raw.chunks_exact($n)
                .map(|c| {
                    let mut b = [0u8; $n];
                    b.copy_from_slice(c);
                    json!(<$t>::from_le_bytes(b))
                })
                .collect::<Vec<Value>>()
        };
    }
    let items: Vec<Value> = match dtype {
        DType::Bool => raw.iter().map(|&b| json!(b != 0)).collect(),
        DType::U8 => raw.iter().map(|&b| json!(b)).collect(),
        DType::I8 => raw.iter().map(|&b| json!(b as i8)).collect(),
        DType::U16 => nums!(u16, 2),
        DType::I16 => nums!(i16, 2),
        DType::U32 => nums!(u32, 4),
        DType::I32 => nums!(i32, 4),
        DType::U64 => nums!(u64, 8),
        DType::I64 => nums!(i64, 8),
        // Non-finite values have no JSON number: null, as Triton writes them.
        DType::F32 => nums!(f32, 4),
        DType::F64 => nums!(f64, 8),
        DType::F16 => raw
            .chunks_exact(2)
            .map(|c| json!(half::f16::from_le_bytes([c.first().copied().unwrap_or(0), c.get(1).copied().unwrap_or(0)]).to_f32()))
            .collect(),
        DType::BF16 => raw
            .chunks_exact(2)
            .map(|c| json!(half::bf16::from_le_bytes([c.first().copied().unwrap_or(0), c.get(1).copied().unwrap_or(0)]).to_f32()))
            .collect(),
        DType::String => {
            let mut items = Vec::new();
            let mut rest = raw;
            while let Some((len, tail)) = rest.split_first_chunk::<4>() {
                let n = u32::from_le_bytes(*len) as usize;
                let (s, tail) = tail.split_at_checked(n).ok_or_else(|| HttpError(Status::internal("malformed BYTES output")))?;
                items.push(json!(String::from_utf8_lossy(s)));
                rest = tail;
            }
            items
        }
        _ => return Err(HttpError(Status::invalid_argument(format!(
            "output '{name}' is {datatype}, which JSON cannot carry; request it as binary data (\"binary_data\": true)"
        )))),
    };
    Ok(Value::Array(items))
}
