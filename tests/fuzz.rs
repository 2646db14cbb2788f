//! Bounded fuzzing of what the wire and models reach: the ONNX importer + compile + run, the
//! KServe request decoder, and the model-upload path through a real daemon.
//!
//! cargo-fuzz needs a nightly toolchain; these harnesses run on stable as ordinary tests, so
//! CI runs them on every submission. Each target mutates seeds (a committed corpus taken from
//! the ONNX node cases, plus every node case when `OPREG_ONNX_NODE_TESTS` names them) with
//! byte-level and structure-aware mutations (extreme dimensions and attribute values), for at
//! most `OPREG_FUZZ_SECONDS` seconds (default 20) or `OPREG_FUZZ_EXECS` executions (default
//! a million), from seed `OPREG_FUZZ_SEED` (fixed by default, so a CI run is reproducible).
//!
//! A panic that reaches the harness is a crash: its input is written to
//! `target/fuzz-crashes/` and the test fails. An execution that runs past `OPREG_FUZZ_HANG_S`
//! seconds (default 10) is a hang: a watchdog saves its input the same way and ends the
//! process. An abort (allocation failure) kills the test process, which fails it too. Kernel panics the SDK caught at the plugin boundary are
//! counted and reported: the daemon survives them, but each is a bug to fix.

use opreg_proto::{inference as pb, onnx};
use opreg_sdk::{host::HostTensor, ErrorCode};
use opreg_tests::*;
use opregd::{
    graph::{self, GraphError, RunControl},
    registry::{Registry, Snapshot},
    repo::{ModelSettings, ServedModel},
    server::infer::decode_inputs,
};
use prost::Message;
use std::{
    collections::HashMap,
    panic::{catch_unwind, AssertUnwindSafe},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

/// xorshift64*: small, seedable, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// Values that break size arithmetic.
const INTERESTING: &[i64] = &[
    0,
    1,
    -1,
    2,
    3,
    -2,
    255,
    65_536,
    1 << 31,
    1 << 32,
    1 << 40,
    i32::MAX as i64,
    i64::MAX,
    i64::MIN,
];

struct Budget {
    until: Instant,
    execs: usize,
    seed: u64,
}

fn budget() -> Budget {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    Budget {
        until: Instant::now() + Duration::from_secs(env("OPREG_FUZZ_SECONDS", 20)),
        execs: env("OPREG_FUZZ_EXECS", 1_000_000) as usize,
        seed: env("OPREG_FUZZ_SEED", 0x5eed_0bad_cafe_f00d) | 1,
    }
}

/// Model seeds: the committed corpus, plus the node cases when generated.
fn model_seeds() -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(workspace().join("tests/fuzz/corpus/models"))
        .expect("committed corpus")
        .map(|e| e.expect("entry").path())
        .collect();
    if let Some(dir) = std::env::var_os("OPREG_ONNX_NODE_TESTS") {
        if let Ok(rd) = std::fs::read_dir(PathBuf::from(dir).join("node")) {
            files.extend(
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path().join("model.onnx")),
            );
        }
    }
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().filter_map(|f| std::fs::read(f).ok()).collect();
    assert!(seeds.len() >= 10, "the seed corpus is missing");
    seeds
}

fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..=rng.below(4) {
        let len = data.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = [0, 0xFF, 0x7F, 0x80, 0x01][rng.below(5)];
            }
            2 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                data.splice(i..i, bytes);
            }
            3 if len > 1 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(16));
                data.drain(i..i + n);
            }
            4 if len > 0 => data.truncate(rng.below(len)),
            5 if !other.is_empty() => {
                let i = rng.below(len + 1);
                let j = rng.below(other.len());
                let n = 1 + rng.below((other.len() - j).min(64));
                data.splice(i..i, other[j..j + n].iter().copied());
            }
            _ => {}
        }
    }
}

fn interesting(rng: &mut Rng) -> i64 {
    INTERESTING[rng.below(INTERESTING.len())]
}

/// Structure-aware: extreme dimensions, attributes and opsets in a decodable model.
fn mutate_model(rng: &mut Rng, m: &mut onnx::ModelProto) {
    let Some(g) = m.graph.as_mut() else { return };
    for _ in 0..=rng.below(3) {
        match rng.below(6) {
            0 => {
                if let Some(n) = pick(rng, &mut g.node) {
                    if let Some(a) = pick(rng, &mut n.attribute) {
                        a.i = interesting(rng);
                        if let Some(v) = pick(rng, &mut a.ints) {
                            *v = interesting(rng);
                        }
                    }
                }
            }
            1 => {
                let v = if rng.chance(2) {
                    pick(rng, &mut g.input)
                } else {
                    pick(rng, &mut g.output)
                };
                if let Some(v) = v {
                    set_dim(rng, v);
                }
            }
            2 => {
                if let Some(t) = pick(rng, &mut g.initializer) {
                    if let Some(d) = pick(rng, &mut t.dims) {
                        *d = interesting(rng);
                    }
                }
            }
            3 => {
                if let Some(n) = pick(rng, &mut g.node) {
                    match rng.below(3) {
                        0 => {
                            n.input.pop();
                        }
                        1 => n.output.push(String::new()),
                        _ => n.input.push(String::new()),
                    }
                }
            }
            4 => {
                if let Some(o) = pick(rng, &mut m.opset_import) {
                    o.version = [1, 6, 7, 11, 13, 18, 22, 23, 99, -1][rng.below(10)];
                }
                return;
            }
            _ => {
                if let Some(v) = pick(rng, &mut g.input) {
                    if let Some(onnx::type_proto::Value::TensorType(t)) =
                        v.r#type.as_mut().and_then(|t| t.value.as_mut())
                    {
                        t.elem_type = rng.below(27) as i32;
                    }
                }
            }
        }
    }
}

fn set_dim(rng: &mut Rng, v: &mut onnx::ValueInfoProto) {
    use onnx::tensor_shape_proto::{dimension::Value, Dimension};
    let Some(onnx::type_proto::Value::TensorType(t)) =
        v.r#type.as_mut().and_then(|t| t.value.as_mut())
    else {
        return;
    };
    let shape = t.shape.get_or_insert_with(Default::default);
    match rng.below(3) {
        0 => shape.dim.clear(),
        1 => shape.dim.push(Dimension {
            value: Some(Value::DimValue(interesting(rng))),
            denotation: String::new(),
        }),
        _ => {
            if let Some(d) = pick(rng, &mut shape.dim) {
                d.value = Some(Value::DimValue(interesting(rng)));
            }
        }
    }
}

fn pick<'a, T>(rng: &mut Rng, v: &'a mut [T]) -> Option<&'a mut T> {
    let i = rng.below(v.len());
    v.get_mut(i)
}

/// Ends the process when one execution runs too long, after saving its input: a hang must
/// fail the run, not stall CI until its time limit.
struct Watchdog {
    current: Arc<std::sync::Mutex<Running>>,
}

/// The execution in progress: when it started, and its input.
type Running = Option<(Instant, Vec<u8>)>;

impl Watchdog {
    fn start(target: &'static str) -> Watchdog {
        let limit = Duration::from_secs(
            std::env::var("OPREG_FUZZ_HANG_S")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(10),
        );
        let current: Arc<std::sync::Mutex<Running>> = Default::default();
        let watched = Arc::downgrade(&current);
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(250));
            let Some(current) = watched.upgrade() else {
                return;
            };
            let guard = current.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((started, input)) = guard.as_ref() {
                if started.elapsed() > limit {
                    let mut t = Tally::default();
                    t.crash(&format!("{target}-hang"), input);
                    eprintln!(
                        "fuzz {target}: one execution ran past {limit:?}; input saved as {:?}",
                        t.crashes
                    );
                    std::process::exit(3);
                }
            }
        });
        Watchdog { current }
    }

    fn begin(&self, input: &[u8]) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), input.to_vec()));
    }
}

/// What a harness saw.
#[derive(Default)]
struct Tally {
    execs: usize,
    refused: usize,
    ran: usize,
    kernel_panics: usize,
    crashes: Vec<PathBuf>,
}

impl Tally {
    fn crash(&mut self, target: &str, input: &[u8]) {
        use sha2::Digest;
        let dir = artifacts().parent().expect("target").join("fuzz-crashes");
        std::fs::create_dir_all(&dir).expect("crash dir");
        let path = dir.join(format!(
            "{target}-{}.bin",
            &hex::encode(sha2::Sha256::digest(input))[..16]
        ));
        std::fs::write(&path, input).expect("write crash");
        self.crashes.push(path);
    }

    fn report(&self, target: &str) {
        println!(
            "fuzz {target}: {} executions, {} refused, {} ran, {} kernel panics caught by the SDK, {} crashes",
            self.execs,
            self.refused,
            self.ran,
            self.kernel_panics,
            self.crashes.len()
        );
        assert!(
            self.crashes.is_empty(),
            "{target}: panics reached the harness; inputs saved: {:?}",
            self.crashes
        );
    }
}

fn snapshot() -> (Arc<Snapshot>, tempfile::TempDir) {
    let stage = tempfile::tempdir().expect("stage");
    let registry = Registry::new(stage.path().to_path_buf(), Default::default());
    for (path, r) in registry.load_all(&[plugin("onnx_ops"), plugin("blas_cpu")]) {
        r.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    (registry.snapshot(), stage)
}

fn is_kernel_panic(e: &GraphError) -> bool {
    matches!(e, GraphError::Kernel(k) if k.code() == Some(ErrorCode::Panic))
}

/// Zero-filled inputs of the declared shapes (symbolic dimensions: 1), when small.
fn feeds(model: &graph::Model) -> Option<HashMap<String, Arc<HostTensor>>> {
    model
        .inputs
        .iter()
        .map(|i| {
            let shape: Vec<usize> = i
                .shape
                .as_ref()?
                .iter()
                .map(|d| match d {
                    graph::Dim::Fixed(n) => *n,
                    graph::Dim::Symbolic(_) => 1,
                })
                .collect();
            let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
            if n > 1 << 16 {
                return None;
            }
            let t = HostTensor::zeroed(i.dtype, &shape).ok()?;
            Some((i.name.clone(), Arc::new(t)))
        })
        .collect()
}

#[test]
fn fuzz_importer_compile_and_run() {
    let b = budget();
    let (snap, _stage) = snapshot();
    let seeds = model_seeds();
    let mut rng = Rng(b.seed);
    let mut t = Tally::default();
    let watchdog = Watchdog::start("importer");
    while t.execs < b.execs && Instant::now() < b.until {
        t.execs += 1;
        let seed = &seeds[rng.below(seeds.len())];
        let input = match (rng.below(3), onnx::ModelProto::decode(seed.as_slice())) {
            (0 | 1, Ok(mut m)) => {
                mutate_model(&mut rng, &mut m);
                m.encode_to_vec()
            }
            _ => {
                let mut data = seed.clone();
                let other = &seeds[rng.below(seeds.len())];
                mutate_bytes(&mut rng, &mut data, other);
                data
            }
        };
        watchdog.begin(&input);
        // Small limits: each execution must stay short in a debug build.
        let outcome = catch_unwind(AssertUnwindSafe(|| -> Result<bool, GraphError> {
            let model = graph::import(&input, None)?;
            let plan = graph::compile(&model, snap.clone(), &[opreg_sdk::Device::CPU], 1 << 20)?;
            let Some(feeds) = feeds(&model) else {
                return Ok(false);
            };
            let control = RunControl::new(
                4 << 20,
                16 << 20,
                Some(Instant::now() + Duration::from_secs(2)),
            );
            graph::run_with_control(&plan, feeds, &control)?;
            Ok(true)
        }));
        match outcome {
            Ok(Ok(ran)) => t.ran += ran as usize,
            Ok(Err(e)) => {
                t.refused += 1;
                if is_kernel_panic(&e) {
                    t.kernel_panics += 1;
                    eprintln!("kernel panic caught by the SDK: {e}");
                }
            }
            Err(_) => t.crash("importer", &input),
        }
    }
    t.report("importer+compile+run");
}

#[test]
fn fuzz_request_decoder() {
    let b = budget();
    let (snap, _stage) = snapshot();
    use onnx_builders::*;
    let served: Vec<ServedModel> = [("mlp", mlp()), ("strings", strings()), ("mixed", mixed())]
        .into_iter()
        .map(|(name, bytes)| {
            ServedModel::build(
                name,
                1,
                bytes.into(),
                None,
                ModelSettings::default(),
                snap.clone(),
                1 << 20,
            )
            .expect("seed model")
        })
        .collect();
    let seeds: Vec<Vec<u8>> = seed_requests().iter().map(|r| r.encode_to_vec()).collect();
    let mut rng = Rng(b.seed);
    let mut t = Tally::default();
    let watchdog = Watchdog::start("decoder");
    while t.execs < b.execs * 10 && Instant::now() < b.until {
        t.execs += 1;
        let mut data = seeds[rng.below(seeds.len())].clone();
        let other = &seeds[rng.below(seeds.len())];
        let req = if rng.chance(2) {
            mutate_bytes(&mut rng, &mut data, other);
            match pb::ModelInferRequest::decode(data.as_slice()) {
                Ok(r) => r,
                Err(_) => {
                    t.refused += 1;
                    continue;
                }
            }
        } else {
            let mut r = pb::ModelInferRequest::decode(data.as_slice()).expect("seed");
            if let Some(i) = pick(&mut rng, &mut r.inputs) {
                match rng.below(3) {
                    0 => {
                        if let Some(d) = pick(&mut rng, &mut i.shape) {
                            *d = interesting(&mut rng);
                        }
                    }
                    1 => i.shape.push(interesting(&mut rng)),
                    _ => {
                        i.datatype = ["BYTES", "FP16", "BF16", "BOOL", "INT4", "FP32", ""]
                            [rng.below(7)]
                        .into()
                    }
                }
            }
            if let Some(raw) = pick(&mut rng, &mut r.raw_input_contents) {
                let mut bytes = raw.to_vec();
                mutate_bytes(&mut rng, &mut bytes, other);
                *raw = bytes.into();
            }
            r
        };
        data = req.encode_to_vec();
        watchdog.begin(&data);
        let model = &served[rng.below(served.len())];
        match catch_unwind(AssertUnwindSafe(|| decode_inputs(model, &req, 64 << 20))) {
            Ok(Ok(_)) => t.ran += 1,
            Ok(Err(_)) => t.refused += 1,
            Err(_) => t.crash("decoder", &data),
        }
    }
    t.report("request decoder");
}

fn seed_requests() -> Vec<pb::ModelInferRequest> {
    let input =
        |name: &str, datatype: &str, shape: &[i64]| pb::model_infer_request::InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            ..Default::default()
        };
    let mut bytes = Vec::new();
    for s in ["ab", "", "xyz"] {
        bytes.extend_from_slice(&(s.len() as u32).to_le_bytes());
        bytes.extend_from_slice(s.as_bytes());
    }
    vec![
        pb::ModelInferRequest {
            model_name: "mlp".into(),
            inputs: vec![input("x", "FP32", &[2, 3])],
            raw_input_contents: vec![f32_bytes(&[1.0; 6]).into()],
            ..Default::default()
        },
        pb::ModelInferRequest {
            model_name: "strings".into(),
            inputs: vec![input("s", "BYTES", &[3])],
            raw_input_contents: vec![bytes.into()],
            ..Default::default()
        },
        pb::ModelInferRequest {
            model_name: "mixed".into(),
            inputs: vec![
                pb::model_infer_request::InferInputTensor {
                    contents: Some(pb::InferTensorContents {
                        int64_contents: vec![1, 2],
                        ..Default::default()
                    }),
                    ..input("i", "INT64", &[2])
                },
                pb::model_infer_request::InferInputTensor {
                    contents: Some(pb::InferTensorContents {
                        bytes_contents: vec![b"a".to_vec(), b"bc".to_vec()],
                        ..Default::default()
                    }),
                    ..input("s", "BYTES", &[2])
                },
            ],
            ..Default::default()
        },
    ]
}

mod onnx_builders {
    use opreg_tests::onnx::*;

    pub fn mlp() -> Vec<u8> {
        model(
            vec![node("MatMul", &["x", "w"], &["y"])],
            vec![value("x", 1, &[-1, 3])],
            vec![value("y", 1, &[-1, 2])],
            vec![f32_initializer("w", &[3, 2], &[1.0; 6])],
            17,
        )
    }

    pub fn strings() -> Vec<u8> {
        model(
            vec![node("Identity", &["s"], &["t"])],
            vec![value("s", 8, &[-1])],
            vec![value("t", 8, &[-1])],
            vec![],
            17,
        )
    }

    pub fn mixed() -> Vec<u8> {
        model(
            vec![
                node("Identity", &["i"], &["j"]),
                node("Identity", &["s"], &["t"]),
            ],
            vec![value("i", 7, &[2]), value("s", 8, &[2])],
            vec![value("j", 7, &[2]), value("t", 8, &[2])],
            vec![],
            17,
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_model_upload_through_the_daemon() {
    let b = budget();
    let repo = tempfile::tempdir().expect("repo");
    let plugins = plugin_dir(&[plugin("onnx_ops"), plugin("blas_cpu")]);
    let mut d = Daemon::start(&[
        "--plugin-dir",
        plugins.path().to_str().expect("utf8"),
        "--model-repo",
        repo.path().to_str().expect("utf8"),
        "--max-failed-models",
        "16",
    ]);
    let seeds = model_seeds();
    let mut rng = Rng(b.seed);
    let mut t = Tally::default();
    let mut c = d.inference().await;
    // Uploads are slower than in-process calls: a tenth of the executions.
    while t.execs < b.execs / 10 && Instant::now() < b.until {
        t.execs += 1;
        let mut bytes = seeds[rng.below(seeds.len())].clone();
        if let (true, Ok(mut m)) = (rng.chance(2), onnx::ModelProto::decode(bytes.as_slice())) {
            mutate_model(&mut rng, &mut m);
            bytes = m.encode_to_vec();
        } else {
            let other = &seeds[rng.below(seeds.len())];
            mutate_bytes(&mut rng, &mut bytes, other);
        }
        let mut req = load_request(&format!("m{}", rng.below(32)), bytes.clone());
        if rng.chance(8) {
            // Parameter keys and names are client data too.
            let (k, v) = req.parameters.drain().next().expect("file");
            let mut key = k.into_bytes();
            mutate_bytes(&mut rng, &mut key, b"file:1/model.onnx");
            req.parameters
                .insert(String::from_utf8_lossy(&key).into_owned(), v);
        }
        let mut call = tonic::Request::new(req);
        call.set_timeout(Duration::from_secs(30));
        match c.repository_model_load(call).await {
            Ok(_) => t.ran += 1,
            Err(e) if e.code() == tonic::Code::Unavailable || e.code() == tonic::Code::Unknown => {
                t.crash("upload", &bytes);
                break;
            }
            Err(e) => {
                t.refused += 1;
                if e.message().contains("panicked") {
                    t.kernel_panics += 1;
                    eprintln!("kernel panic caught by the SDK: {}", e.message());
                }
            }
        }
    }
    assert!(d.alive(), "the daemon died; log:\n{}", d.log());
    t.report("model upload");
}
