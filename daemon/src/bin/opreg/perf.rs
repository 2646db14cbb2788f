//! `opreg perf MODEL`: a load generator in the manner of Triton's `perf_analyzer`, speaking only
//! the KServe v2 gRPC protocol (`ModelMetadata`, `ModelInfer`), so it measures opregd, Triton
//! or any other v2 server alike.
//!
//! Inputs come from the model's metadata (random or zero data of the declared type and shape,
//! `-1` dimensions from `--shape` or the batch size) or from `.npy` files; one request is built
//! once and sent over and over. Two modes:
//!
//! - concurrency (closed loop): N clients, each sending its next request as soon as the previous
//!   one answers, for N over `--concurrency-range`;
//! - request rate (open loop): requests started on a schedule (Poisson or evenly spaced)
//!   whatever the server's pace, for each rate of `--request-rate-range`.
//!
//! Each step runs a warm-up, then a measurement window; the requests that complete inside the
//! window give the throughput and the latency percentiles. Steps print as a table, or with
//! `--json` as one JSON object per line.

use super::Token;
use anyhow::{anyhow, bail, Context};
use opreg_proto::inference::{
    self as pb, grpc_inference_service_client::GrpcInferenceServiceClient,
};
use serde::Serialize;
use std::{
    io::{IsTerminal, Write},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};
use tokio::{sync::mpsc, time::Instant};
use tonic::service::interceptor::InterceptedService;

type Client = GrpcInferenceServiceClient<InterceptedService<super::Conn, Token>>;

#[derive(clap::Args)]
pub struct PerfArgs {
    /// The model to measure.
    pub model: String,
    /// The model version (default: the one the server picks).
    #[arg(long, default_value = "", hide_default_value = true)]
    pub model_version: String,
    /// Concurrency sweep START:END[:STEP] (STEP defaults to 1): that many clients, each sending
    /// its next request as soon as the previous one answers. The default mode, with 1:4.
    #[arg(long, conflicts_with = "request_rate_range")]
    pub concurrency_range: Option<String>,
    /// Request-rate sweep START:END[:STEP] in requests per second (STEP defaults to START):
    /// requests started on schedule whatever the server's pace (open loop).
    #[arg(long)]
    pub request_rate_range: Option<String>,
    /// How request-rate mode spaces its requests: `poisson` (exponential gaps) or `constant`.
    #[arg(long, default_value = "poisson", value_parser = ["poisson", "constant"])]
    pub request_distribution: String,
    /// Request-rate mode: the most requests in flight; a request due while that many are
    /// outstanding waits for one to finish and counts as delayed.
    #[arg(long, default_value_t = 256)]
    pub max_outstanding: usize,
    /// Length of each step's measurement window.
    #[arg(long, default_value_t = 2000)]
    pub measurement_interval_ms: u64,
    /// Load applied before each step's window, not measured.
    #[arg(long, default_value_t = 500)]
    pub warmup_ms: u64,
    /// The value of a variable (-1) first dimension; throughput counts B inferences per request.
    #[arg(short = 'b', long, default_value_t = 1)]
    pub batch_size: i64,
    /// NAME:D1xD2x...: the full shape of an input whose metadata has variable (-1) dimensions
    /// (the others take the batch size, first, or 1).
    #[arg(long = "shape", value_name = "NAME:DIMS")]
    pub shapes: Vec<String>,
    /// NAME=FILE.npy: send this array as the input instead of generated data.
    #[arg(long = "input", value_name = "NAME=FILE.npy")]
    pub inputs: Vec<String>,
    /// Generated data: `random` (floats in [0, 1), integers and booleans 0 or 1, 8-letter
    /// strings) or `zero`.
    #[arg(long, default_value = "random", value_parser = ["random", "zero"])]
    pub input_data: String,
    /// Seed of the generated data and of the Poisson schedule.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// One JSON object per step instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `opreg perf` on a runtime of its own with a worker per core (the CLI's runtime is
/// single-threaded, and the clients should not queue behind one another's encoding).
pub async fn run(
    args: PerfArgs,
    addr: String,
    ca_cert: Option<PathBuf>,
    token: Option<String>,
) -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("opreg-perf".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the load generator's runtime")
                .and_then(|rt| {
                    rt.block_on(async move {
                        let (channel, token) =
                            super::connect(&addr, ca_cert.as_deref(), token.as_deref()).await?;
                        let client = GrpcInferenceServiceClient::with_interceptor(channel, token)
                            .max_decoding_message_size(usize::MAX)
                            .max_encoding_message_size(usize::MAX);
                        perf(args, client).await
                    })
                });
            let _ = tx.send(result);
        })
        .context("starting the load generator's thread")?;
    rx.await
        .map_err(|_| anyhow!("the load generator stopped without a result"))?
}

/// A status as a one-line error naming the model.
fn status_error(model: &str, what: &str, s: &tonic::Status) -> anyhow::Error {
    anyhow!("model '{model}': {what}: {:?}: {}", s.code(), s.message())
}

async fn perf(args: PerfArgs, mut client: Client) -> anyhow::Result<()> {
    if args.measurement_interval_ms == 0 {
        bail!("--measurement-interval-ms must be positive");
    }
    if args.batch_size < 1 {
        bail!("--batch-size must be at least 1");
    }
    let mode = match (&args.concurrency_range, &args.request_rate_range) {
        (_, Some(r)) => Mode::Rate(parse_rates(r)?),
        (Some(c), None) => Mode::Concurrency(parse_concurrency(c)?),
        (None, None) => Mode::Concurrency(vec![1, 2, 3, 4]),
    };
    let meta = client
        .model_metadata(pb::ModelMetadataRequest {
            name: args.model.clone(),
            version: args.model_version.clone(),
        })
        .await
        .map_err(|s| status_error(&args.model, "metadata", &s))?
        .into_inner();
    let request = Arc::new(build_request(&args, &meta)?);
    // One request before anything is measured: a model that refuses the generated inputs
    // fails here, with the server's reason, instead of as a table of errors.
    client
        .model_infer((*request).clone())
        .await
        .map_err(|s| status_error(&args.model, "the first inference failed", &s))?;

    let warmup = Duration::from_millis(args.warmup_ms);
    let window = Duration::from_millis(args.measurement_interval_ms);
    let describe: Vec<String> = request
        .inputs
        .iter()
        .map(|i| {
            let dims: Vec<String> = i.shape.iter().map(|d| d.to_string()).collect();
            format!("{} {} [{}]", i.name, i.datatype, dims.join("x"))
        })
        .collect();
    let mut out = std::io::stdout().lock();
    if !args.json {
        writeln!(
            out,
            "model {}{} ({}); {} ms per step after {} ms of warm-up",
            meta.name,
            if args.model_version.is_empty() {
                String::new()
            } else {
                format!(" version {}", args.model_version)
            },
            describe.join(", "),
            args.measurement_interval_ms,
            args.warmup_ms
        )?;
        match &mode {
            Mode::Concurrency(_) => writeln!(
                out,
                "{:>11}  {:>10}  {:>9}  {:>9}  {:>9}  {:>9}  {:>8}  {:>6}",
                "concurrency",
                "infer/s",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "avg ms",
                "requests",
                "errors"
            )?,
            Mode::Rate(_) => writeln!(
                out,
                "{:>10}  {:>10}  {:>9}  {:>9}  {:>9}  {:>9}  {:>8}  {:>6}  {:>7}",
                "rate req/s",
                "infer/s",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "avg ms",
                "requests",
                "errors",
                "delayed"
            )?,
        }
        out.flush()?;
    }
    let load = Load {
        client,
        request,
        warmup,
        window,
        bar: Bar {
            visible: std::io::stdout().is_terminal(),
        },
    };
    let steps: Vec<Setting> = match &mode {
        Mode::Concurrency(c) => c.iter().map(|&c| Setting::Concurrency(c)).collect(),
        Mode::Rate(r) => r.iter().map(|&r| Setting::Rate(r)).collect(),
    };
    let mut total_errors = 0;
    for (i, setting) in steps.into_iter().enumerate() {
        let run = match setting {
            Setting::Concurrency(c) => load.closed_loop(c).await,
            Setting::Rate(r) => {
                load.open_loop(
                    r,
                    args.request_distribution == "poisson",
                    args.max_outstanding.max(1),
                    args.seed.wrapping_add(i as u64),
                )
                .await
            }
        };
        let step = run.summarize(&args, setting, window);
        total_errors += step.errors;
        if args.json {
            writeln!(out, "{}", serde_json::to_string(&step)?)?;
        } else {
            let ms = |us: Option<u64>| {
                us.map(|u| format!("{:.3}", u as f64 / 1e3))
                    .unwrap_or_else(|| "-".into())
            };
            let head = match setting {
                Setting::Concurrency(c) => format!("{c:>11}"),
                Setting::Rate(r) => format!("{r:>10.1}"),
            };
            write!(
                out,
                "{head}  {:>10.1}  {:>9}  {:>9}  {:>9}  {:>9}  {:>8}  {:>6}",
                step.throughput,
                ms(step.p50_us),
                ms(step.p90_us),
                ms(step.p99_us),
                ms(step.avg_us),
                step.requests,
                step.errors
            )?;
            if let Some(d) = step.delayed {
                write!(out, "  {d:>7}")?;
            }
            writeln!(out)?;
        }
        out.flush()?;
        if let Some(e) = &run.first_error {
            if step.requests == 0 {
                bail!(
                    "model '{}': every request of the step failed; the first: {e}",
                    args.model
                );
            }
            eprintln!("warning: {} failed requests; the first: {e}", step.errors);
        } else if step.requests == 0 {
            eprintln!(
                "warning: no request completed within the {} ms window; lengthen --measurement-interval-ms",
                args.measurement_interval_ms
            );
        }
        if step.delayed.unwrap_or(0) > 0 {
            eprintln!(
                "warning: {} requests waited for one of the {} outstanding to finish (--max-outstanding): the server falls behind this rate",
                step.delayed.unwrap_or(0),
                args.max_outstanding
            );
        }
    }
    if total_errors > 0 && !args.json {
        eprintln!("{total_errors} requests failed in all");
    }
    Ok(())
}

enum Mode {
    Concurrency(Vec<u32>),
    Rate(Vec<f64>),
}

#[derive(Clone, Copy)]
enum Setting {
    Concurrency(u32),
    Rate(f64),
}

fn split_range(spec: &str, flag: &str) -> anyhow::Result<Vec<String>> {
    let parts: Vec<String> = spec.split(':').map(|p| p.trim().to_string()).collect();
    if parts.is_empty() || parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
        bail!("{flag} '{spec}': expected START[:END[:STEP]]");
    }
    Ok(parts)
}

/// `START[:END[:STEP]]` clients.
fn parse_concurrency(spec: &str) -> anyhow::Result<Vec<u32>> {
    let flag = "--concurrency-range";
    let nums: Vec<u32> = split_range(spec, flag)?
        .iter()
        .map(|p| {
            p.parse::<u32>()
                .with_context(|| format!("{flag} '{spec}': '{p}' is not a whole number"))
        })
        .collect::<Result<_, _>>()?;
    let start = nums[0];
    let end = nums.get(1).copied().unwrap_or(start);
    let step = nums.get(2).copied().unwrap_or(1);
    if start == 0 || step == 0 || end < start {
        bail!("{flag} '{spec}': needs 1 <= START <= END and STEP >= 1");
    }
    let steps: Vec<u32> = (start..=end).step_by(step as usize).collect();
    if steps.len() > 1000 {
        bail!("{flag} '{spec}': {} steps; at most 1000", steps.len());
    }
    Ok(steps)
}

/// `START[:END[:STEP]]` requests per second.
fn parse_rates(spec: &str) -> anyhow::Result<Vec<f64>> {
    let flag = "--request-rate-range";
    let nums: Vec<f64> = split_range(spec, flag)?
        .iter()
        .map(|p| {
            p.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .with_context(|| format!("{flag} '{spec}': '{p}' is not a number"))
        })
        .collect::<Result<_, _>>()?;
    let start = nums[0];
    let end = nums.get(1).copied().unwrap_or(start);
    let step = nums.get(2).copied().unwrap_or(start);
    if start <= 0.0 || step <= 0.0 || end < start {
        bail!("{flag} '{spec}': needs 0 < START <= END and STEP > 0");
    }
    let count = ((end - start) / step + 1e-9).floor() as u64 + 1;
    if count > 1000 {
        bail!("{flag} '{spec}': {count} steps; at most 1000");
    }
    Ok((0..count).map(|i| start + i as f64 * step).collect())
}

/// splitmix64: small, seeded, good enough for test data and arrival times.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `NAME:D1xD2` as a name and dimensions.
fn parse_shape(spec: &str) -> anyhow::Result<(String, Vec<i64>)> {
    let (name, dims) = spec
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("--shape '{spec}': expected NAME:D1xD2x..."))?;
    let dims = if dims.is_empty() {
        vec![]
    } else {
        dims.split('x')
            .map(|d| {
                d.trim()
                    .parse::<i64>()
                    .ok()
                    .filter(|&d| d >= 0)
                    .ok_or_else(|| anyhow!("--shape '{spec}': bad dimension '{d}'"))
            })
            .collect::<Result<_, _>>()?
    };
    Ok((name.to_string(), dims))
}

/// The request sent throughout: every input of the model, from a file or generated.
fn build_request(
    args: &PerfArgs,
    meta: &pb::ModelMetadataResponse,
) -> anyhow::Result<pb::ModelInferRequest> {
    let names: Vec<&str> = meta.inputs.iter().map(|i| i.name.as_str()).collect();
    let known = |name: &str, flag: &str| -> anyhow::Result<()> {
        if names.contains(&name) {
            Ok(())
        } else {
            bail!(
                "{flag}: model '{}' has no input '{name}' (its inputs: {})",
                args.model,
                names.join(", ")
            )
        }
    };
    let mut shapes = std::collections::HashMap::new();
    for s in &args.shapes {
        let (name, dims) = parse_shape(s)?;
        known(&name, "--shape")?;
        shapes.insert(name, dims);
    }
    let mut files = std::collections::HashMap::new();
    for spec in &args.inputs {
        let (name, path) = spec
            .split_once('=')
            .ok_or_else(|| anyhow!("--input '{spec}': expected NAME=FILE.npy"))?;
        known(name, "--input")?;
        files.insert(name.to_string(), PathBuf::from(path));
    }
    let mut rng = Rng(args.seed);
    let zero = args.input_data == "zero";
    let mut req = pb::ModelInferRequest {
        model_name: args.model.clone(),
        model_version: args.model_version.clone(),
        ..Default::default()
    };
    for input in &meta.inputs {
        let (shape, raw, datatype) = if let Some(path) = files.get(&input.name) {
            let t = opregd::quant::data::read_npy(path)
                .with_context(|| format!("input '{}'", input.name))?;
            let datatype = t.dtype().kserve_name().to_string();
            if datatype != input.datatype {
                bail!(
                    "input '{}': {} holds {datatype}, the model takes {}",
                    input.name,
                    path.display(),
                    input.datatype
                );
            }
            let shape = t.shape().iter().map(|&d| d as i64).collect();
            (shape, t.bytes().to_vec(), datatype)
        } else {
            let shape = resolve_shape(input, shapes.get(&input.name), args.batch_size)?;
            let numel = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(usize::try_from(d).ok()?))
                .ok_or_else(|| anyhow!("input '{}': the shape is too large", input.name))?;
            let raw = generate(&input.datatype, numel, zero, &mut rng)
                .with_context(|| format!("input '{}'", input.name))?;
            (shape, raw, input.datatype.clone())
        };
        req.inputs.push(pb::model_infer_request::InferInputTensor {
            name: input.name.clone(),
            datatype,
            shape,
            ..Default::default()
        });
        req.raw_input_contents.push(raw.into());
    }
    Ok(req)
}

/// The metadata's shape with its variable dimensions filled: from `--shape` when given (same
/// rank, the fixed dimensions equal), else the batch size for the first and 1 for the others.
fn resolve_shape(
    input: &pb::model_metadata_response::TensorMetadata,
    given: Option<&Vec<i64>>,
    batch: i64,
) -> anyhow::Result<Vec<i64>> {
    match given {
        Some(dims) => {
            if dims.len() != input.shape.len() {
                bail!(
                    "--shape for '{}' has {} dimensions; the model declares {} ({:?})",
                    input.name,
                    dims.len(),
                    input.shape.len(),
                    input.shape
                );
            }
            for (i, (&g, &m)) in dims.iter().zip(&input.shape).enumerate() {
                if m >= 0 && g != m {
                    bail!(
                        "--shape for '{}': dimension {i} is fixed at {m}, not {g}",
                        input.name
                    );
                }
            }
            Ok(dims.clone())
        }
        None => Ok(input
            .shape
            .iter()
            .enumerate()
            .map(|(i, &d)| match d {
                d if d >= 0 => d,
                _ if i == 0 => batch,
                _ => 1,
            })
            .collect()),
    }
}

/// `numel` elements of a KServe datatype as raw little-endian bytes (`BYTES`: each element a
/// 4-byte length and its bytes).
fn generate(datatype: &str, numel: usize, zero: bool, rng: &mut Rng) -> anyhow::Result<Vec<u8>> {
    macro_rules! fill {
        ($width:expr, $f:expr) => {{
            let mut v = Vec::with_capacity(numel * $width);
            for _ in 0..numel {
                v.extend_from_slice(&$f(rng));
            }
            Ok(v)
        }};
    }
    let float = |rng: &mut Rng| if zero { 0.0 } else { rng.unit() };
    let bit = |rng: &mut Rng| {
        if zero {
            0u8
        } else {
            (rng.next_u64() >> 63) as u8
        }
    };
    match datatype {
        "FP32" => fill!(4, |r: &mut Rng| (float(r) as f32).to_le_bytes()),
        "FP64" => fill!(8, |r: &mut Rng| float(r).to_le_bytes()),
        "FP16" => fill!(2, |r: &mut Rng| half::f16::from_f64(float(r)).to_le_bytes()),
        "BF16" => fill!(2, |r: &mut Rng| half::bf16::from_f64(float(r))
            .to_le_bytes()),
        "BOOL" | "INT8" | "UINT8" => fill!(1, |r: &mut Rng| [bit(r)]),
        "INT16" | "UINT16" => fill!(2, |r: &mut Rng| u16::from(bit(r)).to_le_bytes()),
        "INT32" | "UINT32" => fill!(4, |r: &mut Rng| u32::from(bit(r)).to_le_bytes()),
        "INT64" | "UINT64" => fill!(8, |r: &mut Rng| u64::from(bit(r)).to_le_bytes()),
        "BYTES" => {
            let mut v = Vec::new();
            for _ in 0..numel {
                let s: Vec<u8> = if zero {
                    Vec::new()
                } else {
                    (0..8).map(|_| b'a' + (rng.next_u64() % 26) as u8).collect()
                };
                v.extend_from_slice(&(s.len() as u32).to_le_bytes());
                v.extend_from_slice(&s);
            }
            Ok(v)
        }
        other => {
            bail!("datatype {other} cannot be generated; give the input with --input NAME=FILE.npy")
        }
    }
}

/// One finished request.
struct Record {
    done: Instant,
    latency: Duration,
    error: Option<tonic::Status>,
}

/// What a step collected.
struct Run {
    /// The records of requests completed inside the measurement window.
    records: Vec<Record>,
    first_error: Option<String>,
    delayed: Option<u64>,
}

/// One step's figures; a JSON line with `--json`.
#[derive(Serialize)]
struct Step {
    model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    concurrency: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_rate: Option<f64>,
    batch_size: i64,
    /// Inferences per second: successful requests in the window times the batch size.
    throughput: f64,
    /// Successful requests completed in the window.
    requests: u64,
    errors: u64,
    p50_us: Option<u64>,
    p90_us: Option<u64>,
    p99_us: Option<u64>,
    avg_us: Option<u64>,
    min_us: Option<u64>,
    max_us: Option<u64>,
    /// Request-rate mode: requests that had to wait for a free slot (`--max-outstanding`).
    #[serde(skip_serializing_if = "Option::is_none")]
    delayed: Option<u64>,
}

impl Run {
    fn summarize(&self, args: &PerfArgs, setting: Setting, window: Duration) -> Step {
        let mut ok: Vec<u64> = self
            .records
            .iter()
            .filter(|r| r.error.is_none())
            .map(|r| r.latency.as_micros() as u64)
            .collect();
        ok.sort_unstable();
        let errors = (self.records.len() - ok.len()) as u64;
        // Nearest rank: the smallest latency at least `p` percent of the requests reach.
        let pct = |p: f64| -> Option<u64> {
            let rank = ((p / 100.0) * ok.len() as f64).ceil() as usize;
            ok.get(rank.clamp(1, ok.len().max(1)) - 1).copied()
        };
        let (concurrency, request_rate) = match setting {
            Setting::Concurrency(c) => (Some(c), None),
            Setting::Rate(r) => (None, Some(r)),
        };
        Step {
            model: args.model.clone(),
            concurrency,
            request_rate,
            batch_size: args.batch_size,
            throughput: ok.len() as f64 * args.batch_size as f64 / window.as_secs_f64(),
            requests: ok.len() as u64,
            errors,
            p50_us: pct(50.0),
            p90_us: pct(90.0),
            p99_us: pct(99.0),
            avg_us: (!ok.is_empty()).then(|| ok.iter().sum::<u64>() / ok.len() as u64),
            min_us: ok.first().copied(),
            max_us: ok.last().copied(),
            delayed: self.delayed,
        }
    }
}

/// The progress display: on stderr, only when stdout is a terminal.
struct Bar {
    visible: bool,
}

impl Bar {
    fn start(&self, label: String, warmup: Duration, window: Duration) -> indicatif::ProgressBar {
        if !self.visible {
            return indicatif::ProgressBar::hidden();
        }
        let bar = indicatif::ProgressBar::new((warmup + window).as_millis() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{prefix:>16} [{bar:30}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_prefix(label);
        bar
    }
}

struct Load {
    client: Client,
    request: Arc<pb::ModelInferRequest>,
    warmup: Duration,
    window: Duration,
    bar: Bar,
}

/// Sends the request once and times it.
async fn infer_once(client: &mut Client, request: &pb::ModelInferRequest) -> Record {
    let sent = Instant::now();
    let r = client.model_infer(request.clone()).await;
    let done = Instant::now();
    Record {
        done,
        latency: done - sent,
        error: r.err(),
    }
}

impl Load {
    /// `c` clients sending back to back until the window closes.
    async fn closed_loop(&self, c: u32) -> Run {
        let start = Instant::now();
        let end = start + self.warmup + self.window;
        let (tx, rx) = mpsc::unbounded_channel();
        for _ in 0..c {
            let tx = tx.clone();
            let mut client = self.client.clone();
            let request = self.request.clone();
            tokio::spawn(async move {
                while Instant::now() < end {
                    if tx.send(infer_once(&mut client, &request).await).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let bar = self
            .bar
            .start(format!("concurrency {c}"), self.warmup, self.window);
        self.collect(rx, start, bar, None).await
    }

    /// Requests started at `rate` per second until the window closes, at most `max` in flight.
    async fn open_loop(&self, rate: f64, poisson: bool, max: usize, seed: u64) -> Run {
        let start = Instant::now();
        let window_start = start + self.warmup;
        let end = window_start + self.window;
        let (tx, rx) = mpsc::unbounded_channel();
        let delayed = Arc::new(AtomicU64::new(0));
        let dispatch = {
            let delayed = delayed.clone();
            let client = self.client.clone();
            let request = self.request.clone();
            let slots = Arc::new(tokio::sync::Semaphore::new(max));
            let mut rng = Rng(seed);
            async move {
                let mut due = start;
                while due < end {
                    tokio::time::sleep_until(due).await;
                    let permit = match slots.clone().try_acquire_owned() {
                        Ok(p) => p,
                        Err(_) => {
                            if due >= window_start {
                                delayed.fetch_add(1, Ordering::Relaxed);
                            }
                            match slots.clone().acquire_owned().await {
                                Ok(p) => p,
                                Err(_) => return,
                            }
                        }
                    };
                    let (mut client, request, tx) = (client.clone(), request.clone(), tx.clone());
                    tokio::spawn(async move {
                        let _ = tx.send(infer_once(&mut client, &request).await);
                        drop(permit);
                    });
                    let gap = if poisson {
                        -(1.0 - rng.unit()).ln() / rate
                    } else {
                        1.0 / rate
                    };
                    match Duration::try_from_secs_f64(gap)
                        .ok()
                        .and_then(|g| due.checked_add(g))
                    {
                        Some(next) => due = next,
                        None => break,
                    }
                }
            }
        };
        tokio::spawn(dispatch);
        let bar = self
            .bar
            .start(format!("{rate:.1} req/s"), self.warmup, self.window);
        let mut run = self.collect(rx, start, bar, Some(delayed.clone())).await;
        run.delayed = Some(delayed.load(Ordering::Relaxed));
        run
    }

    /// Gathers the records of the requests completed inside the window while the bar shows
    /// the step's progress; returns when every sender has finished.
    async fn collect(
        &self,
        mut rx: mpsc::UnboundedReceiver<Record>,
        start: Instant,
        bar: indicatif::ProgressBar,
        delayed: Option<Arc<AtomicU64>>,
    ) -> Run {
        let window_start = start + self.warmup;
        let window_end = window_start + self.window;
        let mut records = Vec::new();
        let mut first_error = None;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => {
                        if r.done >= window_start && r.done <= window_end {
                            if first_error.is_none() {
                                if let Some(s) = &r.error {
                                    first_error = Some(format!("{:?}: {}", s.code(), s.message()));
                                }
                            }
                            records.push(r);
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    let now = Instant::now();
                    bar.set_position((now - start).as_millis() as u64);
                    let msg = if now < window_start {
                        "warm-up".to_string()
                    } else if now <= window_end {
                        let errors = records.iter().filter(|r| r.error.is_some()).count();
                        let mut m = format!("{} requests, {errors} errors", records.len());
                        if let Some(d) = &delayed {
                            m.push_str(&format!(", {} delayed", d.load(Ordering::Relaxed)));
                        }
                        m
                    } else {
                        "waiting for the last responses".to_string()
                    };
                    bar.set_message(msg);
                }
            }
        }
        bar.finish_and_clear();
        Run {
            records,
            first_error,
            delayed: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_concurrency("1:4").unwrap(), vec![1, 2, 3, 4]);
        assert_eq!(parse_concurrency("2:8:3").unwrap(), vec![2, 5, 8]);
        assert_eq!(parse_concurrency("3").unwrap(), vec![3]);
        assert!(parse_concurrency("0:2").is_err());
        assert!(parse_concurrency("4:2").is_err());
        assert!(parse_concurrency("1:x").is_err());
        assert_eq!(parse_rates("100:300").unwrap(), vec![100.0, 200.0, 300.0]);
        assert_eq!(parse_rates("10:20:5").unwrap(), vec![10.0, 15.0, 20.0]);
        assert!(parse_rates("0:10").is_err());
    }

    #[test]
    fn shapes_and_data() {
        let meta = pb::model_metadata_response::TensorMetadata {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![-1, 3, -1],
        };
        assert_eq!(resolve_shape(&meta, None, 4).unwrap(), vec![4, 3, 1]);
        assert_eq!(
            resolve_shape(&meta, Some(&vec![2, 3, 7]), 1).unwrap(),
            vec![2, 3, 7]
        );
        assert!(resolve_shape(&meta, Some(&vec![2, 4, 7]), 1).is_err());
        assert!(resolve_shape(&meta, Some(&vec![2, 3]), 1).is_err());
        assert_eq!(parse_shape("a:b:2x3").unwrap(), ("a:b".into(), vec![2, 3]));
        let mut rng = Rng(1);
        assert_eq!(generate("FP32", 6, false, &mut rng).unwrap().len(), 24);
        assert_eq!(generate("INT64", 2, true, &mut rng).unwrap(), vec![0; 16]);
        assert_eq!(generate("BYTES", 2, false, &mut rng).unwrap().len(), 24);
        assert!(generate("FP8E4M3FN", 2, false, &mut rng).is_err());
    }
}
