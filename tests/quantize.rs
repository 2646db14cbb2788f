//! Quantization as a service, on a real model and real data: the LeNet-5-style CNN trained on
//! scikit-learn's handwritten digits (`tests/data/digits`), quantized by the strategy plugins
//! through `opreg.v1.Registry/Quantize`, served as a new version, compared with the float
//! version and loaded in onnxruntime; and every refusal, with the model left as it was.

use opreg_proto::{
    inference as pb,
    opreg::v1::{self as reg, quantize_request::Msg},
};
use opreg_tests::*;
use std::path::{Path, PathBuf};
use tonic::Code;

fn digits() -> PathBuf {
    workspace().join("tests/data/digits")
}

/// A repository holding the float LeNet as version 1 of `lenet`.
fn repo() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("repo");
    let v1 = dir.path().join("lenet/1");
    std::fs::create_dir_all(&v1).expect("version folder");
    std::fs::copy(digits().join("lenet.onnx"), v1.join("model.onnx")).expect("model");
    dir
}

fn daemon(repo: &Path, extra: &[PathBuf]) -> (Daemon, tempfile::TempDir) {
    let mut files = vec![
        plugin("onnx_ops"),
        plugin("blas_cpu"),
        plugin("quant_static"),
        plugin("quant_dynamic"),
        plugin("quant_mixed"),
        plugin("quant_prune"),
        plugin("quant_adaptive"),
    ];
    files.extend_from_slice(extra);
    let plugins = plugin_dir(&files);
    let d = Daemon::start(&[
        "--plugin-dir",
        plugins.path().to_str().expect("utf8"),
        "--model-repo",
        repo.to_str().expect("utf8"),
    ]);
    (d, plugins)
}

fn job(
    strategy: &str,
    options: &[(&str, &str)],
    data: &Path,
    eval: Option<&Path>,
) -> reg::QuantizeJob {
    reg::QuantizeJob {
        model: "lenet".into(),
        version: "1".into(),
        strategy: strategy.into(),
        options: options
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        data_dir: data.display().to_string(),
        eval_dir: eval.map(|e| e.display().to_string()).unwrap_or_default(),
    }
}

/// Runs one Quantize call: the job, then `samples`; the result, or the status it failed with.
/// Progress events must come before the result.
async fn quantize(
    d: &Daemon,
    job: reg::QuantizeJob,
    samples: Vec<reg::CalibrationSample>,
) -> Result<(reg::QuantizeResult, Vec<String>), tonic::Status> {
    let mut messages = vec![reg::QuantizeRequest {
        msg: Some(Msg::Job(job)),
    }];
    messages.extend(samples.into_iter().map(|s| reg::QuantizeRequest {
        msg: Some(Msg::Sample(s)),
    }));
    let mut events = d
        .registry()
        .await
        .quantize(tokio_stream::iter(messages))
        .await?
        .into_inner();
    let mut stages = Vec::new();
    let mut result = None;
    while let Some(e) = events.message().await? {
        match e.event {
            Some(reg::quantize_event::Event::Progress(p)) => {
                assert!(result.is_none(), "progress after the result");
                if stages.last() != Some(&p.stage) {
                    stages.push(p.stage);
                }
            }
            Some(reg::quantize_event::Event::Result(r)) => result = Some(r),
            None => {}
        }
    }
    Ok((result.expect("a result event"), stages))
}

fn npy_f32(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let t = opregd::quant::data::read_npy(path).expect("npy");
    (t.shape().to_vec(), t.to_vec::<f32>().expect("f32"))
}

fn labels() -> Vec<i64> {
    let t = opregd::quant::data::read_npy(&digits().join("test/digits.labels.npy")).expect("npy");
    t.to_vec::<i64>().expect("i64")
}

/// The served version's logits on the test set, over gRPC.
async fn logits(d: &Daemon, version: &str) -> Vec<f32> {
    let (shape, x) = npy_f32(&digits().join("test/digits.npy"));
    infer(d, version, &shape, &x).await.expect("infer")
}

/// One request of `x` (images of `shape`) to `lenet`: its logits.
async fn infer(
    d: &Daemon,
    version: &str,
    shape: &[usize],
    x: &[f32],
) -> Result<Vec<f32>, tonic::Status> {
    let r = d
        .inference()
        .await
        .model_infer(pb::ModelInferRequest {
            model_name: "lenet".into(),
            model_version: version.into(),
            inputs: vec![pb::model_infer_request::InferInputTensor {
                name: "image".into(),
                datatype: "FP32".into(),
                shape: shape.iter().map(|&d| d as i64).collect(),
                ..Default::default()
            }],
            raw_input_contents: vec![f32_bytes(x).into()],
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(f32_values(&r.raw_output_contents[0]))
}

fn accuracy(logits: &[f32], labels: &[i64]) -> f64 {
    let classes = logits.len() / labels.len();
    let correct = logits
        .chunks(classes)
        .zip(labels)
        .filter(|(row, &l)| {
            let arg = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as i64);
            arg == Some(l)
        })
        .count();
    correct as f64 / labels.len() as f64
}

/// A daemon serving the float LeNet from `repo`, the digits' labels, the float model's
/// accuracy on them, and the calibration and held-out folders.
struct Served {
    d: Daemon,
    plugins: tempfile::TempDir,
    labels: Vec<i64>,
    float: f64,
    calib: PathBuf,
    eval: PathBuf,
}

async fn served(repo: &Path) -> Served {
    let (d, plugins) = daemon(repo, &[]);
    let labels = labels();
    let float = accuracy(&logits(&d, "1").await, &labels);
    Served {
        d,
        plugins,
        labels,
        float,
        calib: digits().join("calib"),
        eval: digits().join("test"),
    }
}

/// onnxruntime's run of `model` on the digits test set (`quant_ort.py`: the operators, the
/// logits and the accuracy), or `None` without the Python environment.
fn onnxruntime_on_digits(model: &Path) -> Option<serde_json::Value> {
    let out = run_python(
        "quant_ort.py",
        &[
            &model,
            &digits().join("test/digits.npy"),
            &digits().join("test/digits.labels.npy"),
        ],
    )?;
    Some(serde_json::from_str(&out).expect("json"))
}

fn report(r: &reg::QuantizeResult) -> serde_json::Value {
    serde_json::from_str(&r.report_json).expect("report JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lenet_quantized_by_each_method_stays_within_a_point_of_f32_and_runs_in_onnxruntime() {
    let repo = repo();
    let Served {
        d,
        plugins: _plugins,
        labels,
        float,
        calib,
        eval,
    } = served(repo.path()).await;
    assert!(float > 0.95, "the float LeNet scores {float}");

    // (strategy, options, an operator the output must contain)
    type Method<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let methods: &[Method] = &[
        // The default calibrator, `auto`: each of the three below measured, the best kept.
        ("quant-static", &[], "QuantizeLinear"),
        ("quant-static", &[("calibrator", "kl")], "QuantizeLinear"),
        (
            "quant-static",
            &[("calibrator", "minmax")],
            "QuantizeLinear",
        ),
        (
            "quant-static",
            &[("calibrator", "percentile")],
            "QuantizeLinear",
        ),
        ("quant-dynamic", &[], "MatMulInteger"),
        // A target the all-int8 plan misses: some layers stay in f32.
        ("quant-mixed", &[("target_sqnr_db", "60")], "QuantizeLinear"),
        // Every product (and the ReLUs and pools between them) in float16.
        ("quant-mixed", &[("lowered", "f16")], "Cast"),
    ];
    let mut versions = Vec::new();
    // quant-static's held-out SQNR per calibrator option ("" for the default).
    let mut static_sqnr: Vec<(String, f64)> = Vec::new();
    for (strategy, options, op) in methods {
        let what = format!("{strategy} {options:?}");
        let (r, stages) = quantize(&d, job(strategy, options, &calib, Some(&eval)), vec![])
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:?}\n{}", d.log()));
        assert!(
            stages.contains(&"calibrating".to_string()),
            "{what}: {stages:?}"
        );
        assert!(r.version > 1, "{what}: a new version, got {}", r.version);
        assert!(
            !versions.contains(&r.version),
            "{what}: a fresh version number"
        );
        versions.push(r.version);
        let rep = report(&r);
        assert_eq!(
            rep["calibration"]["samples"], 8,
            "{what}: all 8 batches calibrate"
        );

        // The new version is served next to the float one, and its accuracy is ours to
        // measure, not only the report's.
        let v = r.version.to_string();
        let ours = accuracy(&logits(&d, &v).await, &labels);
        assert!(
            ours >= float - 0.01,
            "{what}: accuracy {ours} vs f32 {float}\n{}",
            r.report_json
        );
        let reported = rep["accuracy"]["quantized"]
            .as_f64()
            .expect("accuracy in the report");
        assert!(
            (reported - ours).abs() < 1e-9,
            "{what}: report {reported}, served {ours}"
        );
        assert!(
            rep["error"]["sqnr_db"].as_f64().expect("sqnr") > 20.0,
            "{what}: {}",
            r.report_json
        );

        if *strategy == "quant-mixed" && options == &[("lowered", "f16")] {
            // The 4 products and the 7 nodes between them (ReLUs, pools, Flatten, a bias Add)
            // computed in f16, casts only at the chain's ends (the input, and the head's
            // MatMul before its f32 bias), half the weight bytes.
            let lowered = rep["nodes"]["lowered"].as_object().expect("lowered");
            assert_eq!(lowered.len(), 11, "{}", r.report_json);
            assert!(lowered.values().all(|t| t == "float16"), "{lowered:?}");
            assert!(rep["error"]["sqnr_db"].as_f64().expect("sqnr") > 50.0);
            let float_bytes = std::fs::metadata(digits().join("lenet.onnx"))
                .expect("float model")
                .len();
            assert!(
                (r.model_bytes as f64) < 0.6 * float_bytes as f64,
                "{} bytes vs {float_bytes}",
                r.model_bytes
            );
            let m = std::fs::read(repo.path().join("lenet").join(&v).join("model.onnx"))
                .expect("model");
            let casts = opregd::graph::import(&m, None)
                .expect("import")
                .nodes
                .iter()
                .filter(|n| n.op_type == "Cast")
                .count();
            assert_eq!(casts, 2, "one cast in, one out");
        } else if *strategy == "quant-mixed" {
            // Every quantized layer's sensitivity was measured, and the most sensitive ones
            // kept in float (the budget is a quarter of the 4 layers: one).
            let layers = rep["layers"].as_array().expect("layers");
            assert_eq!(layers.len(), 4, "{}", r.report_json);
            assert!(layers
                .iter()
                .all(|l| l["figures"]["sensitivity_db"].is_number()));
            assert_eq!(
                rep["nodes"]["excluded"].as_array().expect("excluded").len(),
                1
            );
            let svg = repo
                .path()
                .join("lenet")
                .join(r.version.to_string())
                .join("quantization/sensitivity.svg");
            assert!(svg.is_file(), "the sensitivity plot");
        }
        // The version is standard ONNX with the report beside it.
        let dir = repo.path().join("lenet").join(&v);
        let model = dir.join("model.onnx");
        assert!(dir.join("quantization/report.json").is_file(), "{what}");
        if *strategy == "auto" {
            assert_eq!(rep["strategy"], "quant-static", "{}", r.report_json);
        }
        if *strategy == "quant-static" {
            let calibrator = options.first().map_or("", |o| o.1);
            let sqnr = rep["error"]["sqnr_db"].as_f64().expect("sqnr");
            static_sqnr.push((calibrator.to_string(), sqnr));
            if calibrator.is_empty() {
                let notes = rep["strategy_notes"].as_str().expect("strategy notes");
                assert!(
                    notes.starts_with("calibrator auto (percentile "),
                    "the default measures the calibrators: {notes}"
                );
            }
        }
        if *strategy == "quant-static" && options == &[("calibrator", "kl")] {
            let plots = rep["plots"].as_array().expect("plots");
            assert!(!plots.is_empty(), "KL calibration plots its histograms");
            let svg =
                std::fs::read_to_string(dir.join(plots[0].as_str().expect("path"))).expect("svg");
            assert!(svg.contains("threshold"), "the threshold is marked");
        }

        // onnxruntime loads it and agrees with our run: its evaluation of the graph as written
        // within a point; its optimised integer kernels (which saturate u8 x s8 products on
        // AVX2/AVX-512, see quant_ort.py) within two.
        let Some(ort) = onnxruntime_on_digits(&model) else {
            continue;
        };
        let ops: Vec<&str> = ort["ops"]
            .as_array()
            .expect("ops")
            .iter()
            .filter_map(|o| o.as_str())
            .collect();
        assert!(ops.contains(op), "{what}: {op} in {ops:?}");
        let ort_acc = ort["accuracy"].as_f64().expect("accuracy");
        assert!(
            (ort_acc - ours).abs() <= 0.01,
            "{what}: onnxruntime {ort_acc}, opreg {ours}"
        );
        let ort_optimized = ort["optimized_accuracy"].as_f64().expect("accuracy");
        assert!(
            (ort_optimized - ours).abs() <= 0.02,
            "{what}: onnxruntime optimised {ort_optimized}, opreg {ours}"
        );
        let ort_logits: Vec<f32> = ort["logits"]
            .as_array()
            .expect("logits")
            .iter()
            .map(|v| v.as_f64().expect("f64") as f32)
            .collect();
        let ours_logits = logits(&d, &v).await;
        let agree = ours_logits
            .chunks(10)
            .zip(ort_logits.chunks(10))
            .filter(|(a, b)| accuracy(a, &[argmax(b)]) == 1.0)
            .count();
        assert!(
            agree as f64 >= 0.98 * labels.len() as f64,
            "{what}: top-1 agrees with onnxruntime on {agree} of {}",
            labels.len()
        );
    }
    // The default calibrator kept the best of the three on the same held-out samples.
    let best = static_sqnr
        .iter()
        .filter(|(c, _)| !c.is_empty())
        .map(|(_, s)| *s)
        .fold(f64::NEG_INFINITY, f64::max);
    let auto = static_sqnr
        .iter()
        .find(|(c, _)| c.is_empty())
        .expect("default")
        .1;
    assert!(
        auto >= best - 1e-9,
        "auto {auto} dB, best calibrator {best} dB: {static_sqnr:?}"
    );
    // The float version still serves, unchanged.
    assert_eq!(accuracy(&logits(&d, "1").await, &labels), float);
}

/// The error-budget mode (`quant-mixed lowered=auto`): each layer in int8, f16 or f32, the
/// SQNR target met on the held-out samples, the uniform candidates measured beside the mix;
/// a target the all-int8 plan misses keeps some layer above int8, and onnxruntime runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_error_budget_mode_meets_its_target_and_lists_each_measured_candidate() {
    let repo = repo();
    let Served {
        d,
        plugins: _plugins,
        labels,
        float,
        calib,
        eval,
    } = served(repo.path()).await;
    for target in [30.0, 60.0] {
        let t = target.to_string();
        let options = [("lowered", "auto"), ("target_sqnr_db", t.as_str())];
        let (r, _) = quantize(
            &d,
            job("quant-mixed", &options, &calib, Some(&eval)),
            vec![],
        )
        .await
        .unwrap_or_else(|e| panic!("target {target}: {e:?}\n{}", d.log()));
        let rep = report(&r);
        let notes = rep["strategy_notes"].as_str().expect("strategy notes");
        assert!(notes.starts_with("error budget"), "{notes}");
        // "candidates: LABEL SQNR dB LATENCY ms[ (misses)]; ...": the uniform plans are
        // always measured, and the chosen one is the fastest that meets the target.
        let candidates: Vec<(&str, f64, f64, bool)> = notes
            .split_once("candidates: ")
            .expect("candidates listed")
            .1
            .split("; ")
            .filter_map(|c| {
                let (label, rest) = c.split_once(" dB ").and_then(|(l, r)| {
                    let (label, sqnr) = l.rsplit_once(' ')?;
                    Some((label, (sqnr, r)))
                })?;
                let (sqnr, rest) = rest;
                let ms = rest.split(" ms").next()?.parse::<f64>().ok()?;
                let sqnr = if sqnr == "inf" {
                    f64::INFINITY
                } else {
                    sqnr.parse().ok()?
                };
                Some((label, sqnr, ms, !rest.contains("(misses)")))
            })
            .collect();
        for label in ["all f32", "all int8", "all f16"] {
            assert!(
                candidates.iter().any(|c| c.0 == label),
                "{label} measured: {notes}"
            );
        }
        // (The notes round the SQNR to 0.01 dB: a figure that close to the target is not
        // judged from them.)
        for c in candidates.iter().filter(|c| (c.1 - target).abs() > 0.01) {
            assert_eq!(c.3, c.1 >= target || c.0 == "all f32", "{c:?}: {notes}");
        }
        let chosen = notes
            .split_once("latency: ")
            .and_then(|(_, r)| r.split(" (").next())
            .expect("the chosen candidate");
        let fastest = candidates
            .iter()
            .filter(|c| c.3)
            .min_by(|a, b| a.2.total_cmp(&b.2))
            .expect("a candidate meets the target");
        assert_eq!(chosen, fastest.0, "{notes}");
        let layers = rep["layers"].as_array().expect("layers");
        assert_eq!(layers.len(), 4, "{}", r.report_json);
        let bits: Vec<f64> = layers
            .iter()
            .map(|l| {
                let f = &l["figures"];
                assert!(
                    f["sensitivity_db"].is_number() && f["sensitivity_f16_db"].is_number(),
                    "each layer measured alone in int8 and f16: {f}"
                );
                f["precision_bits"].as_f64().expect("precision_bits")
            })
            .collect();
        assert!(
            bits.iter().all(|b| [8.0, 16.0, 32.0].contains(b)),
            "{bits:?}"
        );
        // The report measures the saved version on the same held-out samples the search did.
        let sqnr = rep["error"]["sqnr_db"].as_f64().unwrap_or(f64::INFINITY);
        assert!(sqnr >= target - 0.5, "target {target}: {sqnr} dB\n{notes}");
        let v = r.version.to_string();
        let ours = accuracy(&logits(&d, &v).await, &labels);
        assert!(
            ours >= float - 0.01,
            "target {target}: {ours} vs f32 {float}"
        );
        if target == 60.0 {
            let int8 = notes
                .split("; ")
                .find_map(|c| c.strip_prefix("all int8 "))
                .and_then(|c| c.split(' ').next())
                .and_then(|x| x.parse::<f64>().ok())
                .expect("the all-int8 candidate's SQNR");
            assert!(
                int8 < 60.0,
                "the all-int8 plan meets 60 dB already: {notes}"
            );
            assert!(bits.iter().any(|&b| b > 8.0), "{bits:?}: {notes}");
            // Whatever was chosen, the file is standard ONNX that onnxruntime runs alike.
            let model = repo.path().join("lenet").join(&v).join("model.onnx");
            let Some(ort) = onnxruntime_on_digits(&model) else {
                continue;
            };
            let ort_acc = ort["accuracy"].as_f64().expect("accuracy");
            assert!(
                (ort_acc - ours).abs() <= 0.01,
                "onnxruntime {ort_acc}, opreg {ours}"
            );
        }
    }
}

fn argmax(row: &[f32]) -> i64 {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(-1, |(i, _)| i as i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruned_filters_are_removed_where_the_graph_allows_and_the_model_runs_in_onnxruntime() {
    let repo = repo();
    let (d, _plugins) = daemon(repo.path(), &[]);
    let (r, _) = quantize(
        &d,
        job(
            "quant-prune",
            &[("method", "filters"), ("sparsity", "0.5")],
            &digits().join("calib"),
            Some(&digits().join("test")),
        ),
        vec![],
    )
    .await
    .unwrap_or_else(|e| panic!("{e:?}\n{}", d.log()));
    let rep = report(&r);
    let effects: Vec<(String, String)> = rep["pruning"]
        .as_array()
        .expect("pruning")
        .iter()
        .map(|p| {
            (
                p["weight"].as_str().expect("weight").to_string(),
                p["effect"].as_str().expect("effect").to_string(),
            )
        })
        .collect();
    // conv1 feeds conv2 through Relu and MaxPool: removed; conv2 feeds Flatten: zeroed; fc1
    // feeds fc2 through its bias and Relu: removed; fc2 is the head: not pruned.
    let expect = [
        ("conv1.w", "removed"),
        ("conv2.w", "zeroed"),
        ("fc1.w_transposed", "removed"),
    ];
    assert_eq!(
        effects,
        expect.map(|(w, e)| (w.to_string(), e.to_string())),
        "{}",
        r.report_json
    );
    // The layers really shrank in the model written.
    let model = repo
        .path()
        .join("lenet")
        .join(r.version.to_string())
        .join("model.onnx");
    let m = opregd::graph::import(&std::fs::read(&model).expect("model"), None).expect("import");
    let shape = |name: &str| {
        m.initializers
            .get(name)
            .map(|t| t.shape().to_vec())
            .unwrap_or_else(|| panic!("{name} in {:?}", m.initializers.keys()))
    };
    assert_eq!(shape("conv1.w_quantized"), [4, 1, 3, 3]);
    assert_eq!(shape("conv2.w_quantized"), [16, 4, 3, 3]);
    assert_eq!(shape("fc1.w_transposed_quantized"), [64, 16]);
    assert_eq!(shape("fc2.w_transposed_quantized"), [16, 10]);
    // onnxruntime runs the pruned, quantized model as we do.
    let ours = logits(&d, &r.version.to_string()).await;
    if let Some(ort) = onnxruntime_on_digits(&model) {
        let ort_acc = ort["accuracy"].as_f64().expect("accuracy");
        let our_acc = accuracy(&ours, &labels());
        assert!(
            (ort_acc - our_acc).abs() <= 0.01,
            "onnxruntime {ort_acc}, opreg {our_acc}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_samples_calibrate_like_a_folder_and_statistics_do_not_grow_with_samples() {
    let repo = repo();
    let (d, _plugins) = daemon(repo.path(), &[]);
    let calib = digits().join("calib");
    let entries = opregd::quant::data::entries(&calib).expect("entries");
    let sample = |path: &Path, heldout: bool| {
        let (shape, x) = npy_f32(path);
        reg::CalibrationSample {
            inputs: vec![reg::Tensor {
                name: "image".into(),
                datatype: "FP32".into(),
                shape: shape.iter().map(|&d| d as i64).collect(),
                raw: f32_bytes(&x),
            }],
            labels: vec![],
            heldout,
        }
    };
    // Held-out first, then the calibration batches, all in the request.
    let mut samples = vec![sample(&digits().join("test/digits.npy"), true)];
    samples.extend(entries.iter().map(|e| sample(e, false)));
    let empty = tempfile::tempdir().expect("empty");
    let mut streamed_job = job(
        "quant-static",
        &[("calibrator", "minmax")],
        empty.path(),
        None,
    );
    streamed_job.data_dir.clear();
    let (streamed, _) = quantize(&d, streamed_job, samples).await.expect("streamed");
    let (folder, _) = quantize(
        &d,
        job(
            "quant-static",
            &[("calibrator", "minmax")],
            &calib,
            Some(&digits().join("test")),
        ),
        vec![],
    )
    .await
    .expect("folder");
    let (s, f) = (report(&streamed), report(&folder));
    assert_eq!(s["calibration"]["samples"], 8);
    // The same data gives the same parameters, whichever way it came.
    assert_eq!(s["tensors"], f["tensors"]);

    // Two batches instead of eight: the statistics take the same bytes.
    let few = tempfile::tempdir().expect("few");
    for e in entries.iter().take(2) {
        std::fs::copy(e, few.path().join(e.file_name().expect("name"))).expect("copy");
    }
    let (r2, _) = quantize(
        &d,
        job(
            "quant-static",
            &[],
            few.path(),
            Some(&digits().join("test")),
        ),
        vec![],
    )
    .await
    .expect("two batches");
    let (r8, _) = quantize(
        &d,
        job("quant-static", &[], &calib, Some(&digits().join("test"))),
        vec![],
    )
    .await
    .expect("eight batches");
    assert_eq!(report(&r2)["calibration"]["samples"], 2);
    assert_eq!(
        report(&r2)["calibration"]["statistics_bytes"],
        report(&r8)["calibration"]["statistics_bytes"]
    );
}

/// A daemon on `threads` compute threads (so as many calibration lanes) serving the LeNet.
fn daemon_on(repo: &Path, threads: usize) -> (Daemon, tempfile::TempDir) {
    let plugins = plugin_dir(&[
        plugin("onnx_ops"),
        plugin("blas_cpu"),
        plugin("quant_static"),
        plugin("quant_mixed"),
    ]);
    let d = Daemon::start(&[
        "--plugin-dir",
        plugins.path().to_str().expect("utf8"),
        "--model-repo",
        repo.to_str().expect("utf8"),
        "--threads",
        &threads.to_string(),
    ]);
    (d, plugins)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strategys_own_observer_calibrates_and_lanes_merge_to_the_serial_statistics() {
    // The calibration batches rescaled by 1..4, so their ranges differ (the mean of the
    // batch ranges is then not the global range).
    let entries = opregd::quant::data::entries(&digits().join("calib")).expect("entries");
    let (test_shape, test_x) = npy_f32(&digits().join("test/digits.npy"));
    let tensor = |shape: &[usize], x: &[f32]| reg::Tensor {
        name: "image".into(),
        datatype: "FP32".into(),
        shape: shape.iter().map(|&d| d as i64).collect(),
        raw: f32_bytes(x),
    };
    let mut batch_ranges = Vec::new();
    let mut samples = vec![reg::CalibrationSample {
        inputs: vec![tensor(&test_shape, &test_x)],
        labels: vec![],
        heldout: true,
    }];
    for (i, e) in entries.iter().enumerate() {
        let (shape, x) = npy_f32(e);
        let k = (i % 4 + 1) as f32;
        let x: Vec<f32> = x.iter().map(|v| v * k).collect();
        let lo = x.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        batch_ranges.push((f64::from(lo), f64::from(hi)));
        samples.push(reg::CalibrationSample {
            inputs: vec![tensor(&shape, &x)],
            labels: vec![],
            heldout: false,
        });
    }
    let n = batch_ranges.len() as f64;
    let mean_lo = batch_ranges.iter().map(|r| r.0).sum::<f64>() / n;
    let mean_hi = batch_ranges.iter().map(|r| r.1).sum::<f64>() / n;
    let global_hi = batch_ranges.iter().map(|r| r.1).fold(f64::MIN, f64::max);
    assert!(
        mean_hi < 0.8 * global_hi,
        "the batches must differ in range"
    );

    let mut reports = Vec::new();
    for threads in [1, 3] {
        let repo = repo();
        let (d, _plugins) = daemon_on(repo.path(), threads);
        let mut per_calibrator = Vec::new();
        for (strategy, calibrator) in [
            ("quant-static", "average"),
            ("quant-static", "kl"),
            // A strategy composing quant-static passes its observers on.
            ("quant-mixed", "average"),
        ] {
            let mut j = job(strategy, &[("calibrator", calibrator)], Path::new(""), None);
            j.data_dir.clear();
            let (r, _) = quantize(&d, j, samples.clone())
                .await
                .unwrap_or_else(|e| panic!("{strategy} {calibrator} on {threads} threads: {e}"));
            let rep = report(&r);
            assert_eq!(rep["calibration"]["samples"], 8);
            per_calibrator.push(rep);
        }
        let image = |rep: &serde_json::Value| {
            rep["tensors"]
                .as_array()
                .expect("tensors")
                .iter()
                .find(|t| t["name"] == "image")
                .cloned()
                .expect("the input is quantized")
        };
        // The strategy's observer saw every batch once: the mean of their ranges, and the
        // input's parameters from it (u8, asymmetric; the range widened to hold zero).
        let img = image(&per_calibrator[0]);
        let f = |key: &str| img["figures"][key].as_f64().expect(key);
        assert!((f("average_min") - mean_lo).abs() < 1e-5, "{img}");
        assert!((f("average_max") - mean_hi).abs() < 1e-4 * mean_hi, "{img}");
        let scale = img["scales"][0].as_f64().expect("scale");
        let want = (mean_hi.max(0.0) - mean_lo.min(0.0)) / 255.0;
        assert!(
            (scale - want).abs() < 1e-6 * want,
            "scale {scale}, want {want}"
        );
        assert_eq!(image(&per_calibrator[2])["scales"], img["scales"]);
        reports.push(per_calibrator);
    }
    // One lane or three: the same statistics. Histograms merge exactly (the KL thresholds
    // are equal to the bit); the averages up to the order of a sum.
    let [one, three] = &reports[..] else {
        unreachable!()
    };
    assert_eq!(one[1]["tensors"], three[1]["tensors"]);
    for (a, b) in one.iter().zip(three) {
        let (ta, tb) = (
            a["tensors"].as_array().expect("tensors"),
            b["tensors"].as_array().expect("tensors"),
        );
        assert_eq!(ta.len(), tb.len());
        for (x, y) in ta.iter().zip(tb) {
            assert_eq!(x["name"], y["name"]);
            for key in ["average_min", "average_max"] {
                if let (Some(p), Some(q)) = (x["figures"][key].as_f64(), y["figures"][key].as_f64())
                {
                    assert!(
                        (p - q).abs() <= 1e-9 * p.abs().max(1.0),
                        "{key}: {x} vs {y}"
                    );
                }
            }
        }
    }
}

/// The version folders of `lenet` that hold a model.
fn versions(repo: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(repo.join("lenet"))
        .expect("model folder")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("model.onnx").is_file())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_quantization_requests_are_refused_by_name_and_leave_no_version() {
    let repo = repo();
    let (d, _plugins) = daemon(repo.path(), &[plugin("mock_panic"), plugin("mock_good")]);
    let calib = digits().join("calib");
    let empty = tempfile::tempdir().expect("empty");
    let wrong = tempfile::tempdir().expect("wrong");
    // float64 images: the most common mistake with numpy.
    {
        let src = std::fs::read(calib.join("batch_000.npy")).expect("npy");
        let t = opregd::quant::data::npy_tensor(&src).expect("decode");
        let as_f64: Vec<f64> = t
            .to_vec::<f32>()
            .expect("f32")
            .iter()
            .map(|&v| v.into())
            .collect();
        let mut header = format!(
            "{{'descr': '<f8', 'fortran_order': False, 'shape': ({}, 1, 8, 8), }}",
            t.shape()[0]
        );
        while (11 + header.len()) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        for v in as_f64 {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        std::fs::write(wrong.path().join("batch.npy"), bytes).expect("write");
    }
    let cases: Vec<(reg::QuantizeJob, Vec<reg::CalibrationSample>, Code, &str)> = vec![
        (
            job("quant-static", &[], empty.path(), None),
            vec![],
            Code::InvalidArgument,
            "empty",
        ),
        (
            job("quant-static", &[], wrong.path(), None),
            vec![],
            Code::InvalidArgument,
            "'image' is FP64",
        ),
        (
            job("no-such-strategy", &[], &calib, None),
            vec![],
            Code::NotFound,
            "no-such-strategy",
        ),
        (
            job("quant-static", &[("calibrator", "magic")], &calib, None),
            vec![],
            Code::InvalidArgument,
            "calibrator=magic",
        ),
        (
            job("quant-static", &[], &calib, None),
            vec![reg::CalibrationSample {
                inputs: vec![reg::Tensor {
                    name: "image".into(),
                    datatype: "FP32".into(),
                    shape: vec![1, 1, 8, 9],
                    raw: vec![0; 4 * 72],
                }],
                labels: vec![],
                heldout: false,
            }],
            Code::InvalidArgument,
            "has shape [1, 1, 8, 9]",
        ),
        (
            job("mock-panic-plan", &[], &calib, None),
            vec![],
            Code::Internal,
            "mock-panic-plan",
        ),
        (
            job("mock-minmax", &[("malformed", "yes")], &calib, None),
            vec![],
            Code::Internal,
            "malformed plan",
        ),
        // A strategy's own observer that cannot be made, panics or cannot merge: the error
        // names the strategy, the tensor and the call.
        (
            job("mock-bad-observer", &[("at", "create")], &calib, None),
            vec![],
            Code::InvalidArgument,
            "observer of 'image': mock: no observer today",
        ),
        (
            job("mock-bad-observer", &[("at", "update")], &calib, None),
            vec![],
            Code::Internal,
            "observer of 'image' failed in update: observer update panicked",
        ),
        (
            job("mock-bad-observer", &[("at", "finish")], &calib, None),
            vec![],
            Code::Internal,
            "observer of 'image' failed in finish",
        ),
    ];
    for (j, samples, code, needle) in cases {
        let what = format!("{} {:?}", j.strategy, j.options);
        let e = quantize(&d, j, samples)
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted"));
        assert_eq!(e.code(), code, "{what}: {}", e.message());
        assert!(
            e.message().contains(needle),
            "{what}: '{needle}' in {}",
            e.message()
        );
        // Nothing was written, and the float version serves on.
        assert_eq!(versions(repo.path()), ["1"], "{what}");
        let leftovers: Vec<_> = std::fs::read_dir(repo.path().join("lenet"))
            .expect("folder")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{what}: {leftovers:?}");
        assert!(logits(&d, "1").await.len() == labels().len() * 10);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strategy_built_against_the_1_0_sdk_quantizes_through_the_host_defaults() {
    let repo = repo();
    // A folder a killed run left behind (report, no model): not a version, never reused.
    std::fs::create_dir_all(repo.path().join("lenet/5/quantization")).expect("leftover");
    let (d, _plugins) = daemon(repo.path(), &[compat_plugin()]);
    let (r, _) = quantize(
        &d,
        job(
            "compat-minmax",
            &[],
            &digits().join("calib"),
            Some(&digits().join("test")),
        ),
        vec![],
    )
    .await
    .unwrap_or_else(|e| panic!("{e:?}\n{}", d.log()));
    assert_eq!(r.version, 6, "the number after the leftover folder");
    let rep = report(&r);
    assert!(rep["plugin"].as_str().expect("plugin").contains("abi 1.0"));
    // The 1.0 strategy saw the weights (copies in its statistics) and quantized them too.
    let weights = rep["tensors"]
        .as_array()
        .expect("tensors")
        .iter()
        .filter(|t| t["role"] == "weight")
        .count();
    assert!(weights >= 4, "{}", r.report_json);
    let acc = rep["accuracy"]["quantized"].as_f64().expect("accuracy");
    let float = rep["accuracy"]["float"].as_f64().expect("accuracy");
    assert!(
        acc >= float - 0.03,
        "per-tensor u8 min-max: {acc} vs {float}"
    );
    assert_eq!(versions(repo.path()), ["1", "6"]);
}

async fn adaptation(d: &Daemon, version: u64) -> reg::ModelAdaptationResponse {
    d.registry()
        .await
        .model_adaptation(reg::ModelAdaptationRequest {
            name: "lenet".into(),
            version: version.to_string(),
        })
        .await
        .expect("ModelAdaptation")
        .into_inner()
}

/// Sends the images of `x` (shape `[n, ...]`) to `version` in requests of 32, from 4 clients
/// at once; every request must succeed.
async fn traffic(d: &Daemon, version: u64, shape: &[usize], x: &[f32]) {
    let per_image: usize = shape[1..].iter().product();
    let chunks: Vec<Vec<f32>> = x.chunks(32 * per_image).map(<[f32]>::to_vec).collect();
    let mut clients = tokio::task::JoinSet::new();
    for part in 0..4 {
        let mine: Vec<Vec<f32>> = chunks.iter().skip(part).step_by(4).cloned().collect();
        let mut client = d.inference().await;
        let tail = shape[1..].to_vec();
        clients.spawn(async move {
            for c in mine {
                let mut shape = vec![(c.len() / per_image) as i64];
                shape.extend(tail.iter().map(|&d| d as i64));
                client
                    .model_infer(pb::ModelInferRequest {
                        model_name: "lenet".into(),
                        model_version: version.to_string(),
                        inputs: vec![pb::model_infer_request::InferInputTensor {
                            name: "image".into(),
                            datatype: "FP32".into(),
                            shape,
                            ..Default::default()
                        }],
                        raw_input_contents: vec![f32_bytes(&c).into()],
                        ..Default::default()
                    })
                    .await
                    .expect("every request succeeds, during a swap too");
            }
        });
    }
    while let Some(done) = clients.join_next().await {
        done.expect("client task");
    }
}

/// Waits (bounded) until `version`'s adaptation status satisfies `until`.
async fn wait_adaptation(
    d: &Daemon,
    version: u64,
    until: impl Fn(&reg::ModelAdaptationResponse) -> bool,
) -> reg::ModelAdaptationResponse {
    for _ in 0..600 {
        let s = adaptation(d, version).await;
        if until(&s) {
            return s;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!(
        "adaptation status never got there: {:?}\n{}",
        adaptation(d, version).await,
        d.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adaptive_model_follows_drifted_traffic_where_fixed_scales_lose_accuracy() {
    let repo = repo();
    let (d, _plugins) = daemon(repo.path(), &[]);
    let labels = labels();
    let calib = digits().join("calib");
    let (shape, x) = npy_f32(&digits().join("test/digits.npy"));
    // The drift: the same images, 4 times brighter (a camera's gain changed).
    let x4: Vec<f32> = x.iter().map(|v| v * 4.0).collect();

    let minmax = [("calibrator", "minmax")];
    let (fixed, _) = quantize(&d, job("quant-static", &minmax, &calib, None), vec![])
        .await
        .unwrap_or_else(|e| panic!("quant-static: {e:?}\n{}", d.log()));
    let policy = [
        ("calibrator", "minmax"),
        ("sample_every", "1"),
        ("check_every", "4"),
        ("window", "12"),
    ];
    let (adaptive, _) = quantize(&d, job("quant-adaptive", &policy, &calib, None), vec![])
        .await
        .unwrap_or_else(|e| panic!("quant-adaptive: {e:?}\n{}", d.log()));
    let dir = PathBuf::from(&adaptive.directory);
    for file in ["model.onnx", "float.onnx", "adaptive.toml"] {
        assert!(dir.join(file).is_file(), "{file} in {}", dir.display());
    }
    assert!(!adaptation(&d, fixed.version).await.adaptive);
    let s = adaptation(&d, adaptive.version).await;
    assert!(s.adaptive && s.strategy == "quant-adaptive", "{s:?}");

    let acc = |logits: &[f32]| accuracy(logits, &labels);
    let float4 = acc(&infer(&d, "1", &shape, &x4).await.expect("float"));
    let fixed4 = acc(&infer(&d, &fixed.version.to_string(), &shape, &x4)
        .await
        .expect("fixed"));
    assert!(
        fixed4 < float4 - 0.03,
        "fixed scales should lose accuracy on drifted inputs: {fixed4} vs float {float4}"
    );

    // Traffic like the calibration data: checks run, nothing moves.
    traffic(&d, adaptive.version, &shape, &x).await;
    let s = wait_adaptation(&d, adaptive.version, |s| s.checks >= 1).await;
    assert_eq!(s.adaptations, 0, "{s:?}");
    assert!(s.last_drift < 0.5, "{s:?}");
    assert!(s.last_outcome.starts_with("steady"), "{s:?}");
    assert!(s.sampled >= 15 && s.window == 12, "{s:?}");

    // Drifted traffic: the ranges are re-derived, verified and swapped in while requests run.
    let mut adapted = None;
    for _ in 0..10 {
        let before = adaptation(&d, adaptive.version).await.checks;
        traffic(&d, adaptive.version, &shape, &x4).await;
        let s = wait_adaptation(&d, adaptive.version, |s| s.checks > before).await;
        if s.adaptations > 0 {
            adapted = Some(s);
            break;
        }
    }
    let s = adapted.unwrap_or_else(|| panic!("no adaptation after drifted traffic\n{}", d.log()));
    // The check that adapted saw the drift (its log line); a later check may already have run
    // on the sampled traffic before this status was read, and then it must find the new ranges
    // steady on the same drifted inputs.
    let log = d.wait_log("adapted: drift ");
    let adapted_drift = log.lines().find_map(|l| {
        let after = l.split("adapted: drift ").nth(1)?;
        after.split(';').next()?.trim().parse::<f64>().ok()
    });
    assert!(adapted_drift.is_some_and(|v| v > 0.5), "{s:?}\n{log}");
    if s.last_outcome.starts_with("adapted") {
        assert!(s.last_drift > 0.5, "{s:?}");
    } else {
        assert!(
            s.last_outcome.starts_with("steady") && s.last_drift < 0.5,
            "{s:?}"
        );
    }
    assert!(s.candidate_sqnr_db > s.current_sqnr_db + 1.0, "{s:?}");
    let adapted4 = acc(&infer(&d, &adaptive.version.to_string(), &shape, &x4)
        .await
        .expect("adapted"));
    eprintln!(
        "drifted x4: float {float4:.4}, fixed scales {fixed4:.4}, adapted {adapted4:.4}; {s:?}"
    );
    assert!(
        adapted4 >= float4 - 0.01 && adapted4 > fixed4 + 0.03,
        "adapted {adapted4}, float {float4}, fixed {fixed4}"
    );
    // The fixed version and the float one are untouched.
    let fixed4_again = acc(&infer(&d, &fixed.version.to_string(), &shape, &x4)
        .await
        .expect("fixed"));
    assert_eq!(fixed4_again, fixed4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_precision_computes_layers_in_bfloat16_from_opset_22_and_refuses_it_below() {
    let repo = repo();
    // Version 2: the same LeNet declared at opset 22 (its operators are unchanged from 13),
    // where ONNX's Conv and MaxPool take bfloat16.
    let bytes = std::fs::read(digits().join("lenet.onnx")).expect("model");
    let mut m = opregd::graph::import(&bytes, None).expect("import");
    m.opsets.insert(String::new(), 22);
    let v2 = repo.path().join("lenet/2");
    std::fs::create_dir_all(&v2).expect("folder");
    std::fs::write(
        v2.join("model.onnx"),
        opregd::graph::export(&m, None).expect("export").model,
    )
    .expect("write");
    let Served {
        d,
        plugins: _plugins,
        labels,
        float,
        calib,
        eval,
    } = served(repo.path()).await;
    let bf16 = [("lowered", "bf16")];

    let e = quantize(&d, job("quant-mixed", &bf16, &calib, Some(&eval)), vec![])
        .await
        .expect_err("bfloat16 Conv at opset 13");
    // Raised in the strategy's evaluation of its candidate: the strategy's error.
    assert!(
        matches!(e.code(), Code::FailedPrecondition | Code::InvalidArgument),
        "{e:?}"
    );
    assert!(
        e.message().contains("'lenet'") && e.message().contains("opset 22"),
        "{e:?}"
    );

    let (r, _) = quantize(
        &d,
        reg::QuantizeJob {
            version: "2".into(),
            ..job("quant-mixed", &bf16, &calib, Some(&eval))
        },
        vec![],
    )
    .await
    .unwrap_or_else(|e| panic!("bf16: {e:?}\n{}", d.log()));
    let rep = report(&r);
    let lowered = rep["nodes"]["lowered"].as_object().expect("lowered");
    assert_eq!(lowered.len(), 11, "{}", r.report_json);
    assert!(lowered.values().all(|t| t == "bfloat16"), "{lowered:?}");
    let ours = accuracy(&logits(&d, &r.version.to_string()).await, &labels);
    let sqnr = rep["error"]["sqnr_db"].as_f64().expect("sqnr");
    eprintln!("bf16 LeNet: top-1 {ours:.4} (f32 {float:.4}), output SQNR {sqnr:.2} dB");
    assert!(ours >= float - 0.01, "bf16 {ours}, f32 {float}");
    // bfloat16 keeps 8 bits of mantissa: about 2^-9 relative error per value.
    assert!(sqnr > 30.0, "{}", r.report_json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_four_pruning_with_reconstruction_keeps_accuracy_where_masking_alone_loses_it() {
    let repo = repo();
    let Served {
        d,
        plugins: _plugins,
        labels,
        float,
        calib,
        eval,
    } = served(repo.path()).await;
    let mut results = Vec::new();
    for reconstruct in ["true", "false"] {
        let (r, _) = quantize(
            &d,
            job(
                "quant-prune",
                &[("reconstruct", reconstruct)],
                &calib,
                Some(&eval),
            ),
            vec![],
        )
        .await
        .unwrap_or_else(|e| panic!("reconstruct={reconstruct}: {e:?}\n{}", d.log()));
        let rep = report(&r);
        let pruning = rep["pruning"].as_array().expect("pruning").clone();
        // conv1 has one input channel (no group of 4); fc2 is the head: conv2 and fc1.
        assert_eq!(pruning.len(), 2, "{}", r.report_json);
        for p in &pruning {
            assert_eq!(p["sparsity"].as_f64(), Some(0.5), "{p}");
            let effect = p["effect"].as_str().expect("effect");
            assert_eq!(
                effect.contains("reconstructed"),
                reconstruct == "true",
                "{effect}"
            );
        }
        let ours = accuracy(&logits(&d, &r.version.to_string()).await, &labels);
        results.push((
            ours,
            rep["error"]["sqnr_db"].as_f64().unwrap_or(f64::INFINITY),
        ));
    }
    let [(rebuilt, rebuilt_db), (masked, masked_db)] = results[..] else {
        unreachable!()
    };
    eprintln!(
        "2:4 + int8 LeNet: f32 {float:.4}; masked {masked:.4} ({masked_db:.2} dB); reconstructed {rebuilt:.4} ({rebuilt_db:.2} dB)"
    );
    assert!(rebuilt_db > masked_db, "{rebuilt_db} vs {masked_db}");
    assert!(
        rebuilt >= float - 0.03,
        "2:4 + int8 within 3 points: {rebuilt} vs f32 {float}"
    );
}
