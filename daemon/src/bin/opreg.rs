//! opreg: command-line client of opregd (gRPC).
//!
//! ```text
//! opreg plugins                        list loaded plugins
//! opreg kernels [--op Conv]            list registered kernels
//! opreg load-plugin PATH               load (or hot-swap) a plugin
//! opreg unload-plugin NAME
//! opreg models                         the repository index
//! opreg load-model NAME [FILE]         submit FILE as version 1 (or reload NAME from the repository)
//! opreg unload-model NAME
//! opreg placement NAME                 which kernel and device each node got, and the copies
//! opreg infer NAME --input x=FP32:2x3:1,2,3,4,5,6
//! opreg optimize MODEL.onnx OUT.onnx      standard graph passes, written back as ONNX (local)
//! opreg stats [NAME]
//! opreg profile NAME [--runs N] [--batch B]  per-step time, kernel, device, bytes
//! opreg quantize NAME --method quant-static --data DIR [--eval DIR] [--option k=v ...]
//!                                      a new, quantized version of NAME, with a report
//! opreg report PATH                    a quantization report's summary (local file/folder)
//! opreg perf NAME [--concurrency-range 1:4 | --request-rate-range 100:400:100] [--json]
//!                                      load generator (KServe v2 ModelInfer): throughput, p50/p90/p99
//! opreg bench FILE.onnx [--batch 8] [--profile] [--json]
//!                                      the model run in-process (no daemon): median/p90, RSS, profile
//! ```

#[path = "opreg/bench.rs"]
mod bench;
#[path = "opreg/perf.rs"]
mod perf;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use opreg_proto::{
    inference::{self as pb, grpc_inference_service_client::GrpcInferenceServiceClient},
    opreg::v1::{self as reg, registry_client::RegistryClient},
};
use opregd::server::receive::{self, ReceivingResponses};
use std::collections::HashMap;
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::Interceptor,
    transport::{Certificate, Channel, ClientTlsConfig},
    Request, Status,
};

#[derive(Parser)]
#[command(version, about = "Command-line client of opregd")]
struct Cli {
    /// Daemon address (`https://...` for a TLS listener).
    #[arg(
        long,
        global = true,
        env = "OPREG_ADDR",
        default_value = "http://127.0.0.1:8001"
    )]
    addr: String,
    /// Admin token, sent with every call (management calls need it when the daemon has one).
    #[arg(long, global = true, env = "OPREG_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM CA certificate that signed the daemon's TLS certificate.
    #[arg(long, global = true, env = "OPREG_CA_CERT")]
    ca_cert: Option<std::path::PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List loaded plugins.
    Plugins,
    /// List registered kernels.
    Kernels {
        #[arg(long)]
        op: Option<String>,
    },
    /// Load a plugin file on the daemon's machine (a loaded name is replaced unverified).
    LoadPlugin { path: String },
    /// Replace a loaded plugin with a new build, verified against the served models first.
    SwapPlugin {
        path: String,
        /// The plugin name the build must register.
        #[arg(long)]
        name: Option<String>,
        /// Outputs agree when |new - old| <= abs + rel * |old| (defaults 1e-4, 1e-3).
        #[arg(long)]
        abs_tolerance: Option<f64>,
        #[arg(long)]
        rel_tolerance: Option<f64>,
        /// Verify only; publish nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Return a plugin to the build it replaced (within the swap grace period).
    RollbackPlugin { name: String },
    /// Lift the quarantine of a plugin whose kernels faulted repeatedly.
    ReleaseQuarantine { name: String },
    /// Unload a plugin by name.
    UnloadPlugin { name: String },
    /// The model repository index.
    Models,
    /// Submit an ONNX file as a model version, or reload a model from the repository.
    LoadModel {
        name: String,
        file: Option<std::path::PathBuf>,
        #[arg(long, default_value_t = 1)]
        version: u64,
    },
    /// Stop serving a model.
    UnloadModel { name: String },
    /// Show which kernel and device each node of a model got.
    Placement { name: String },
    /// Run one inference; inputs as NAME=DTYPE:DIMS:VALUES (dims joined by 'x', values by ',').
    Infer {
        name: String,
        #[arg(long = "input", required = true)]
        inputs: Vec<String>,
    },
    /// Inference statistics.
    Stats { name: Option<String> },
    /// Run a model on zero inputs and show each step's time, kernel, device and output size.
    Profile {
        name: String,
        #[arg(long, default_value_t = 10)]
        runs: u32,
        /// The value of the dimensions the model leaves symbolic.
        #[arg(long, default_value_t = 1)]
        batch: i64,
    },
    /// Quantize a served model with a strategy plugin: calibration data streamed from a local
    /// folder (or read by the daemon with --on-daemon); the result becomes a new version.
    Quantize {
        name: String,
        /// The strategy (`opreg quantizers`): quant-static, quant-dynamic, quant-mixed,
        /// quant-prune, … or `auto`: quant-static for models with convolutions, quant-dynamic
        /// for the others (transformers, RNNs).
        #[arg(long, default_value = "auto")]
        method: String,
        /// Calibration samples: `*.npy` batches (single-input models) or one subfolder per
        /// sample with `INPUT.npy` / `input_K.pb` files.
        #[arg(long)]
        data: std::path::PathBuf,
        /// Held-out samples for the error figures (with `*.labels.npy`, the accuracy).
        #[arg(long)]
        eval: Option<std::path::PathBuf>,
        /// Strategy options, `key=value` (e.g. calibrator=minmax).
        #[arg(long = "option")]
        options: Vec<String>,
        /// The folders are on the daemon's machine: send their paths, not their samples.
        #[arg(long)]
        on_daemon: bool,
        /// The float version to quantize (default: the newest).
        #[arg(long, default_value = "")]
        version: String,
    },
    /// Print the summary of a quantization report (`report.json`, or a version folder).
    Report { path: std::path::PathBuf },
    /// List the quantization strategies.
    Quantizers,
    /// How an adaptive version (`--method quant-adaptive`) follows its traffic.
    Adaptation {
        name: String,
        /// The version (default: the newest ready one).
        #[arg(long, default_value = "")]
        version: String,
    },
    /// Rewrite an ONNX file with the graph passes whose result is standard ONNX (no daemon
    /// needed); prints each pass's node counts.
    Optimize {
        model: std::path::PathBuf,
        out: std::path::PathBuf,
        /// Initializers of at least this many bytes go to `<OUT>.data` (ONNX external data).
        #[arg(long, default_value_t = 1 << 20)]
        external_data_threshold: usize,
        /// `standard`: only passes whose result is standard ONNX; `all`: also fusions into
        /// opreg's own operators (domain `opreg`, which only opreg runs).
        #[arg(long, default_value = "standard", value_parser = ["standard", "all"])]
        level: String,
    },
    /// Measure throughput and latency under load, like Triton's perf_analyzer: a concurrency
    /// sweep (closed loop) or a request-rate sweep (open loop) of `ModelInfer` calls with
    /// inputs generated from the model's metadata; works against any KServe v2 gRPC server.
    Perf(perf::PerfArgs),
    /// Run a model in this process (no daemon) as opregd would, on inputs made from its
    /// declared shapes or given: median and p90 latency, peak RSS, and with --profile the time
    /// per operator and node.
    Bench(bench::BenchArgs),
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
struct Token(Option<MetadataValue<Ascii>>);

impl Interceptor for Token {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// `x=FP32:2x3:1,2,3,4,5,6` as a KServe input and its raw bytes.
fn parse_input(spec: &str) -> anyhow::Result<(pb::model_infer_request::InferInputTensor, Vec<u8>)> {
    let (name, rest) = spec
        .split_once('=')
        .ok_or_else(|| anyhow!("input '{spec}': expected NAME=DTYPE:DIMS:VALUES"))?;
    let mut parts = rest.splitn(3, ':');
    let (Some(dtype), Some(dims), Some(values)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("input '{spec}': expected NAME=DTYPE:DIMS:VALUES");
    };
    let shape: Vec<i64> = if dims.is_empty() {
        vec![]
    } else {
        dims.split('x')
            .map(|d| {
                d.parse()
                    .with_context(|| format!("input '{name}': bad dimension '{d}'"))
            })
            .collect::<Result<_, _>>()?
    };
    let vals: Vec<&str> = if values.is_empty() {
        vec![]
    } else {
        values.split(',').collect()
    };
    macro_rules! enc {
        ($t:ty) => {
            vals.iter()
                .map(|v| {
                    v.trim()
                        .parse::<$t>()
                        .map(|x| x.to_le_bytes().to_vec())
                        .with_context(|| format!("input '{name}': bad value '{v}'"))
                })
                .collect::<Result<Vec<_>, _>>()?
                .concat()
        };
    }
    let raw = match dtype {
        "FP32" => enc!(f32),
        "FP64" => enc!(f64),
        "INT64" => enc!(i64),
        "INT32" => enc!(i32),
        "INT8" => enc!(i8),
        "UINT8" => enc!(u8),
        "BOOL" => vals.iter().map(|v| matches!(v.trim(), "1" | "true") as u8).collect(),
        other => bail!("input '{name}': datatype {other} is not supported by the CLI (FP32, FP64, INT64, INT32, INT8, UINT8, BOOL)"),
    };
    Ok((
        pb::model_infer_request::InferInputTensor {
            name: name.into(),
            datatype: dtype.into(),
            shape,
            ..Default::default()
        },
        raw,
    ))
}

fn format_values(datatype: &str, raw: &[u8]) -> String {
    macro_rules! dec {
        ($t:ty, $n:expr) => {
            raw.chunks_exact($n)
                .map(|c| <$t>::from_le_bytes(c.try_into().unwrap_or_default()).to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
    }
    match datatype {
        "FP32" => dec!(f32, 4),
        "FP64" => dec!(f64, 8),
        "INT64" => dec!(i64, 8),
        "INT32" => dec!(i32, 4),
        "INT8" => dec!(i8, 1),
        "UINT8" | "BOOL" => dec!(u8, 1),
        _ => format!("<{} bytes>", raw.len()),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // A server error is the whole story: print its code and message, not a trace.
            match e.downcast_ref::<tonic::Status>() {
                Some(s) => eprintln!("error: {:?}: {}", s.code(), s.message()),
                None => eprintln!("error: {e:#}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// `opreg optimize`: import, run the standard passes, export.
fn optimize(
    model: &std::path::Path,
    out: &std::path::Path,
    threshold: usize,
    all: bool,
) -> anyhow::Result<()> {
    let bytes = opregd::graph::ModelBytes::read(model, u64::MAX)
        .with_context(|| format!("reading {}", model.display()))?;
    let mut m = opregd::graph::import_owned(bytes, model.parent())
        .with_context(|| format!("importing {}", model.display()))?;
    let mut reports = opregd::graph::optimize(&mut m)?;
    if all {
        reports.extend(opregd::graph::fuse(&mut m)?);
    }
    for r in reports {
        println!("{}\t{} -> {} nodes", r.pass, r.nodes_before, r.nodes_after);
    }
    let file_name = out
        .file_name()
        .and_then(|n| n.to_str())
        .context("the output path has no file name")?;
    let external = opregd::graph::ExternalData {
        location: format!("{file_name}.data"),
        threshold,
    };
    let exported = opregd::graph::export(&m, Some(&external))?;
    std::fs::write(out, &exported.model).with_context(|| format!("writing {}", out.display()))?;
    let data_path = out.with_file_name(&external.location);
    if exported.external.is_empty() {
        // A stale data file from an earlier run would mislead a reader of the folder.
        let _ = std::fs::remove_file(&data_path);
    } else {
        std::fs::write(&data_path, &exported.external)
            .with_context(|| format!("writing {}", data_path.display()))?;
    }
    println!("wrote {} ({} nodes)", out.display(), m.nodes.len());
    Ok(())
}

fn report(path: &std::path::Path) -> anyhow::Result<()> {
    let file = if path.is_dir() {
        path.join("quantization").join("report.json")
    } else {
        path.to_path_buf()
    };
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let r: opregd::quant::report::Report = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a quantization report", file.display()))?;
    print!("{}", r.summary());
    Ok(())
}

/// The model's inputs as the daemon declares them.
async fn model_inputs(
    inference: &mut GrpcInferenceServiceClient<
        tonic::service::interceptor::InterceptedService<Conn, Token>,
    >,
    name: &str,
    version: &str,
) -> anyhow::Result<Vec<opregd::graph::IoSpec>> {
    let m = inference
        .model_metadata(pb::ModelMetadataRequest {
            name: name.into(),
            version: version.into(),
        })
        .await?
        .into_inner();
    m.inputs
        .into_iter()
        .map(|i| {
            let dtype = opreg_sdk::DType::from_kserve_name(&i.datatype)
                .ok_or_else(|| anyhow!("input '{}': datatype {} unknown", i.name, i.datatype))?;
            let shape = i
                .shape
                .iter()
                .map(|&d| match usize::try_from(d) {
                    Ok(n) => opregd::graph::Dim::Fixed(n),
                    Err(_) => opregd::graph::Dim::Symbolic(String::new()),
                })
                .collect();
            Ok(opregd::graph::IoSpec {
                name: i.name,
                dtype,
                shape: Some(shape),
            })
        })
        .collect()
}

/// A sample as the request carries it.
fn sample_message(s: opregd::quant::data::Sample, heldout: bool) -> reg::QuantizeRequest {
    let mut inputs: Vec<reg::Tensor> = s
        .feeds
        .into_iter()
        .map(|(name, t)| reg::Tensor {
            name,
            datatype: t.dtype().kserve_name().into(),
            shape: t.shape().iter().map(|&d| d as i64).collect(),
            raw: t.bytes().to_vec(),
        })
        .collect();
    inputs.sort_by(|a, b| a.name.cmp(&b.name));
    reg::QuantizeRequest {
        msg: Some(reg::quantize_request::Msg::Sample(reg::CalibrationSample {
            inputs,
            labels: s.labels.unwrap_or_default(),
            heldout,
        })),
    }
}

/// The largest HTTP/2 frame the client accepts (the protocol allows 16 KiB to 16 MiB - 1).
const CLIENT_MAX_FRAME_BYTES: u32 = 1 << 20;
/// The client's flow-control windows for one call's response and for the connection.
const CLIENT_STREAM_WINDOW_BYTES: u32 = 8 << 20;
const CLIENT_CONNECTION_WINDOW_BYTES: u32 = 16 << 20;

/// A connection to the daemon as the clients use it: its responses admitted as they arrive.
type Conn = ReceivingResponses<Channel>;

/// A channel to the daemon, and the interceptor that sends the token with every call.
async fn connect(
    addr: &str,
    ca_cert: Option<&std::path::Path>,
    token: Option<&str>,
) -> anyhow::Result<(Conn, Token)> {
    // Responses of tensors are large: with HTTP/2's defaults a 600 KB output reached the
    // client as ~40 frames of 16 KiB, within flow-control windows the client reopens as it
    // reads. Frames of up to 1 MiB and windows past a batch's tensors let the daemon send it at
    // once: the serving overhead of a Relu on a 600 KB image (opreg perf, back to back) went
    // from 0.76-0.92 to 0.48-0.56 ms over gRPC.
    let mut endpoint = Channel::from_shared(addr.to_string())?
        .max_frame_size(CLIENT_MAX_FRAME_BYTES)
        .initial_stream_window_size(CLIENT_STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CLIENT_CONNECTION_WINDOW_BYTES);
    if let Some(ca) = ca_cert {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    // A response whose declared length cannot be reserved fails its call instead of
    // aborting the client (tonic reserves it infallibly; see `server::receive`).
    let channel = ReceivingResponses::new(channel, receive::Budget::new(u64::MAX, None));
    let token = Token(
        token
            .map(|t| format!("Bearer {t}").parse())
            .transpose()
            .context("the token is not a valid header value")?,
    );
    Ok((channel, token))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Cli {
        addr,
        token,
        ca_cert,
        cmd: Cmd::Perf(args),
    } = cli
    {
        return perf::run(args, addr, ca_cert, token).await;
    }
    if let Cmd::Bench(args) = cli.cmd {
        return bench::run(args);
    }
    if let Cmd::Report { path } = &cli.cmd {
        return report(path);
    }
    if let Cmd::Optimize {
        model,
        out,
        external_data_threshold,
        level,
    } = &cli.cmd
    {
        return optimize(model, out, *external_data_threshold, level == "all");
    }
    let (channel, token) = connect(&cli.addr, cli.ca_cert.as_deref(), cli.token.as_deref()).await?;
    let mut registry = RegistryClient::with_interceptor(channel.clone(), token.clone());
    let mut inference = GrpcInferenceServiceClient::with_interceptor(channel, token)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    match cli.cmd {
        Cmd::Plugins => {
            let list = registry
                .list_plugins(reg::ListPluginsRequest {})
                .await?
                .into_inner();
            for p in &list.plugins {
                println!(
                    "{}{}\t{}\tabi {}\tgen {}\t{} kernels, {} backends, {} quantizers\t{}",
                    p.name,
                    if p.quarantined { " (QUARANTINED)" } else { "" },
                    p.version,
                    p.abi_version,
                    p.generation,
                    p.kernels,
                    p.backends,
                    p.quantizers,
                    p.source_file
                );
            }
            for p in &list.previous {
                println!(
                    "(previous) {}\t{}\tgen {}\t{}",
                    p.name, p.version, p.generation, p.source_file
                );
            }
            for r in &list.refused {
                println!("(refused) {}\t{}\t{}", r.path, r.sha256, r.reason);
            }
        }
        Cmd::Kernels { op } => {
            let r = registry
                .list_kernels(reg::ListKernelsRequest {
                    op_type: op.unwrap_or_default(),
                    domain: String::new(),
                })
                .await?
                .into_inner();
            for k in r.kernels {
                let end = if k.end_version == i32::MAX {
                    String::new()
                } else {
                    k.end_version.to_string()
                };
                let types: Vec<String> = k
                    .type_constraints
                    .iter()
                    .map(|c| format!("{}={}", c.name, c.types.join("|")))
                    .collect();
                println!(
                    "{}::{}\t{}..{}\t{}\tprio {}\t{}\t{}",
                    if k.domain.is_empty() {
                        "ai.onnx"
                    } else {
                        &k.domain
                    },
                    k.op_type,
                    k.since_version,
                    end,
                    k.device,
                    k.priority,
                    k.plugin,
                    types.join(" ")
                );
            }
        }
        Cmd::LoadPlugin { path } => {
            let r = registry
                .load_plugin(reg::LoadPluginRequest { path })
                .await?
                .into_inner();
            let p = r.plugin.unwrap_or_default();
            println!(
                "loaded {} {} (generation {})",
                p.name, p.version, r.generation
            );
        }
        Cmd::SwapPlugin {
            path,
            name,
            abs_tolerance,
            rel_tolerance,
            dry_run,
        } => {
            let r = registry
                .swap_plugin(reg::SwapPluginRequest {
                    path,
                    name: name.unwrap_or_default(),
                    abs_tolerance: abs_tolerance.unwrap_or(0.0),
                    rel_tolerance: rel_tolerance.unwrap_or(0.0),
                    dry_run,
                })
                .await?
                .into_inner();
            let p = r.plugin.unwrap_or_default();
            println!(
                "{} {} {} (generation {}, replaced the build of generation {}; {} plans compiled, verified in {:.1} ms)",
                if dry_run { "would swap in" } else { "swapped in" },
                p.name,
                p.version,
                r.generation,
                r.replaced_generation,
                r.plans_compiled,
                r.verify_ns as f64 / 1e6
            );
            for c in r.checks {
                println!(
                    "  {} v{}: {} input sets ({}), max |diff| {:.3e} ({})",
                    c.model,
                    c.version,
                    c.inputs,
                    if c.recorded {
                        "recorded"
                    } else {
                        "synthesized"
                    },
                    c.max_abs_diff,
                    c.worst_output
                );
            }
        }
        Cmd::ReleaseQuarantine { name } => {
            let r = registry
                .release_quarantine(reg::ReleaseQuarantineRequest { name })
                .await?
                .into_inner();
            println!("quarantine lifted (generation {})", r.generation);
        }
        Cmd::RollbackPlugin { name } => {
            let r = registry
                .rollback_plugin(reg::RollbackPluginRequest { name })
                .await?
                .into_inner();
            let p = r.plugin.unwrap_or_default();
            println!(
                "rolled back to {} {} (generation {})",
                p.name, p.version, r.generation
            );
        }
        Cmd::UnloadPlugin { name } => {
            let r = registry
                .unload_plugin(reg::UnloadPluginRequest { name })
                .await?
                .into_inner();
            println!("unloaded (generation {})", r.generation);
        }
        Cmd::Models => {
            for m in inference
                .repository_index(pb::RepositoryIndexRequest::default())
                .await?
                .into_inner()
                .models
            {
                println!("{}\t{}\t{}\t{}", m.name, m.version, m.state, m.reason);
            }
        }
        Cmd::LoadModel {
            name,
            file,
            version,
        } => {
            let mut parameters = HashMap::new();
            if let Some(f) = file {
                let bytes =
                    std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
                parameters.insert(
                    format!("file:{version}/model.onnx"),
                    pb::ModelRepositoryParameter {
                        parameter_choice: Some(
                            pb::model_repository_parameter::ParameterChoice::BytesParam(bytes),
                        ),
                    },
                );
            }
            inference
                .repository_model_load(pb::RepositoryModelLoadRequest {
                    model_name: name.clone(),
                    parameters,
                    ..Default::default()
                })
                .await?;
            println!("loaded {name}");
        }
        Cmd::UnloadModel { name } => {
            inference
                .repository_model_unload(pb::RepositoryModelUnloadRequest {
                    model_name: name.clone(),
                    ..Default::default()
                })
                .await?;
            println!("unloaded {name}");
        }
        Cmd::Placement { name } => {
            let r = registry
                .model_placement(reg::ModelPlacementRequest {
                    name,
                    version: String::new(),
                })
                .await?
                .into_inner();
            println!(
                "{} version {} (registry generation {})",
                r.name, r.version, r.generation
            );
            for n in r.nodes {
                println!(
                    "{}\t{}\t{}\t{}\t{}{}",
                    if n.node.is_empty() {
                        "<unnamed>"
                    } else {
                        &n.node
                    },
                    n.op_type,
                    n.device,
                    n.plugin,
                    n.kernel,
                    if n.folded { "\t(folded)" } else { "" }
                );
            }
            for c in r.copies {
                println!("copy\t{}\t{} -> {}", c.value, c.from, c.to);
            }
        }
        Cmd::Infer { name, inputs } => {
            let mut req = pb::ModelInferRequest {
                model_name: name,
                ..Default::default()
            };
            for spec in &inputs {
                let (t, raw) = parse_input(spec)?;
                req.inputs.push(t);
                req.raw_input_contents.push(raw.into());
            }
            let r = inference.model_infer(req).await?.into_inner();
            for (o, raw) in r.outputs.iter().zip(&r.raw_output_contents) {
                let dims: Vec<String> = o.shape.iter().map(|d| d.to_string()).collect();
                println!(
                    "{} {} [{}]: {}",
                    o.name,
                    o.datatype,
                    dims.join("x"),
                    format_values(&o.datatype, raw)
                );
            }
        }
        Cmd::Profile { name, runs, batch } => {
            let r = registry
                .profile_model(reg::ProfileModelRequest {
                    name,
                    version: String::new(),
                    runs,
                    batch,
                })
                .await?
                .into_inner();
            let total: u64 = r.steps.iter().map(|s| s.total_ns).sum();
            println!(
                "{} version {}: {} runs, {:.3} ms per run",
                r.name,
                r.version,
                r.runs,
                r.mean_run_ns as f64 / 1e6
            );
            println!("ms/call\t%\tbytes out\tdevice\tkernel\tstep");
            for s in &r.steps {
                let per_call = s.total_ns as f64 / s.calls.max(1) as f64 / 1e6;
                let share = 100.0 * s.total_ns as f64 / total.max(1) as f64;
                println!(
                    "{per_call:.3}\t{share:.1}\t{}\t{}\t{}\t{}",
                    s.output_bytes, s.device, s.kernel, s.step
                );
            }
        }
        // Local: done above, before connecting.
        Cmd::Optimize { .. } | Cmd::Report { .. } | Cmd::Perf(_) | Cmd::Bench(_) => {}
        Cmd::Adaptation { name, version } => {
            let r = registry
                .model_adaptation(reg::ModelAdaptationRequest { name, version })
                .await?
                .into_inner();
            if !r.adaptive {
                println!(
                    "{} version {}: fixed parameters (not adaptive)",
                    r.name, r.version
                );
            } else {
                println!(
                    "{} version {} ({}): {} sampled, {} in the window, {} checks, {} adaptations, {} refused",
                    r.name, r.version, r.strategy, r.sampled, r.window, r.checks, r.adaptations, r.refused
                );
                if r.checks > 0 {
                    println!("last check: {}", r.last_outcome);
                }
            }
        }
        Cmd::Quantizers => {
            let r = registry
                .list_quantizers(reg::ListQuantizersRequest {})
                .await?
                .into_inner();
            for q in r.quantizers {
                println!(
                    "{}\t{}\tobserves {}\tgen {}\t{}",
                    q.name, q.plugin, q.observes, q.generation, q.description
                );
            }
        }
        Cmd::Quantize {
            name,
            method,
            data,
            eval,
            options,
            on_daemon,
            version,
        } => {
            let options = options
                .iter()
                .map(|o| {
                    o.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .ok_or_else(|| anyhow!("option '{o}': expected key=value"))
                })
                .collect::<anyhow::Result<HashMap<_, _>>>()?;
            let absolute = |p: &std::path::Path| {
                std::path::absolute(p)
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|_| p.display().to_string())
            };
            let job = reg::QuantizeJob {
                model: name.clone(),
                version: version.clone(),
                strategy: method,
                options,
                data_dir: if on_daemon {
                    absolute(&data)
                } else {
                    String::new()
                },
                eval_dir: match (&eval, on_daemon) {
                    (Some(e), true) => absolute(e),
                    _ => String::new(),
                },
            };
            // Local folders: entries are read one at a time while the daemon works through
            // the previous ones (a small channel between them).
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(reg::QuantizeRequest {
                msg: Some(reg::quantize_request::Msg::Job(job)),
            })
            .await
            .map_err(|_| anyhow!("the request stream closed"))?;
            let mut total = 0u64;
            if !on_daemon {
                let inputs = model_inputs(&mut inference, &name, &version).await?;
                let eval_entries = match &eval {
                    Some(e) => opregd::quant::data::entries(e)?,
                    None => Vec::new(),
                };
                let entries = opregd::quant::data::entries(&data)?;
                if entries.is_empty() {
                    bail!(
                        "{} holds no samples (*.npy files or sample folders)",
                        data.display()
                    );
                }
                total = entries.len() as u64;
                tokio::task::spawn_blocking(move || {
                    let all = eval_entries
                        .into_iter()
                        .map(|e| (e, true))
                        .chain(entries.into_iter().map(|e| (e, false)));
                    for (entry, heldout) in all {
                        let msg = match opregd::quant::data::read(&entry, &inputs) {
                            Ok(s) => sample_message(s, heldout),
                            Err(e) => {
                                eprintln!("error: {e}");
                                return;
                            }
                        };
                        if tx.blocking_send(msg).is_err() {
                            return;
                        }
                    }
                });
            } else {
                drop(tx);
            }
            let mut events = registry
                .quantize(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {msg:12} [{bar:40}] {pos}/{len} samples {elapsed}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let mut result = None;
            while let Some(e) = events.message().await? {
                match e.event {
                    Some(reg::quantize_event::Event::Progress(p)) => {
                        bar.set_message(p.stage);
                        if p.samples > 0 {
                            bar.set_position(p.samples);
                        }
                    }
                    Some(reg::quantize_event::Event::Result(r)) => result = Some(r),
                    None => {}
                }
            }
            bar.finish_and_clear();
            let r = result.ok_or_else(|| anyhow!("the daemon sent no result"))?;
            let report: opregd::quant::report::Report = serde_json::from_str(&r.report_json)
                .context("the daemon's report is not valid JSON")?;
            print!("{}", report.summary());
            if r.version > 0 {
                println!(
                    "\nserving {} version {} ({} bytes), report in {}",
                    r.model, r.version, r.model_bytes, r.directory
                );
            }
        }
        Cmd::Stats { name } => {
            let r = inference
                .model_statistics(pb::ModelStatisticsRequest {
                    name: name.unwrap_or_default(),
                    version: String::new(),
                })
                .await?
                .into_inner();
            for s in r.model_stats {
                let st = s.inference_stats.unwrap_or_default();
                let avg = |d: Option<pb::StatisticDuration>| {
                    d.filter(|d| d.count > 0)
                        .map(|d| format!("{:.3} ms", d.ns as f64 / d.count as f64 / 1e6))
                        .unwrap_or_else(|| "-".into())
                };
                println!(
                    "{} v{}: {} inferences, {} ok, {} failed, avg infer {}",
                    s.name,
                    s.version,
                    s.inference_count,
                    st.success.map(|d| d.count).unwrap_or(0),
                    st.fail.map(|d| d.count).unwrap_or(0),
                    avg(st.compute_infer)
                );
            }
        }
    }
    Ok(())
}
