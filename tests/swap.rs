//! Verified hot swap through the real daemon: swaps under load, refusals that change nothing,
//! rollback, and the plugin-folder watcher.
//!
//! Two builds of the same plugin differ observably: `mock-good` computes
//! `MockScale(x) = x * scale`, `mock-good-v2` computes `x * scale + 0.5`. Every response
//! names the generation that computed it (`opreg_generation`), so each answer is checked
//! against the build of its own generation.

use opreg_proto::{inference as ipb, opreg::v1 as pb};
use opreg_tests::*;
use prost::Message;
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use tonic::Code;

const SCALE: f32 = 3.0;

/// `X[1,4] -> opreg.mock::<op> -> Y` with `attributes`.
fn mock_model(op: &str, attributes: Vec<opreg_proto::onnx::AttributeProto>) -> Vec<u8> {
    let mut node = opreg_tests::onnx::node(op, &["X"], &["Y"]);
    node.domain = "opreg.mock".into();
    node.attribute = attributes;
    opreg_proto::onnx::ModelProto {
        ir_version: 8,
        opset_import: ["", "opreg.mock"]
            .iter()
            .map(|d| opreg_proto::onnx::OperatorSetIdProto {
                domain: d.to_string(),
                version: if d.is_empty() { 17 } else { 1 },
            })
            .collect(),
        graph: Some(opreg_proto::onnx::GraphProto {
            node: vec![node],
            name: "g".into(),
            input: vec![opreg_tests::onnx::value("X", 1, &[1, 4])],
            output: vec![opreg_tests::onnx::value("Y", 1, &[1, 4])],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

/// `X[1,4] -> opreg.mock::MockScale(scale=3) -> Y`.
fn scale_model() -> Vec<u8> {
    mock_model(
        "MockScale",
        vec![opreg_proto::onnx::AttributeProto {
            name: "scale".into(),
            r#type: 1,
            f: SCALE,
            ..Default::default()
        }],
    )
}

/// `X[1,4] -> opreg.mock::MockFlaky -> Y` (mock-panic's panics; mock-good's is the identity).
fn flaky_model() -> Vec<u8> {
    mock_model("MockFlaky", Vec::new())
}

fn infer_request(x: &[f32]) -> ipb::ModelInferRequest {
    ipb::ModelInferRequest {
        model_name: "scale".into(),
        inputs: vec![ipb::model_infer_request::InferInputTensor {
            name: "X".into(),
            datatype: "FP32".into(),
            shape: vec![1, 4],
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(x).into()],
        ..Default::default()
    }
}

/// What build `b` answers for `x` (0: mock-good, 1: mock-good-v2).
fn expected(build: usize, x: &[f32]) -> Vec<f32> {
    let offset = [0.0, 0.5][build];
    x.iter().map(|v| v * SCALE + offset).collect()
}

/// A daemon serving `scale` on `mock-good` (v1), from a plugin folder of its own.
async fn serving(extra: &[&str]) -> (Daemon, tempfile::TempDir) {
    let dir = plugin_dir(&[plugin("mock_good")]);
    let mut args = vec!["--plugin-dir", dir.path().to_str().expect("utf8")];
    args.extend_from_slice(extra);
    let d = Daemon::start(&args);
    d.inference()
        .await
        .repository_model_load(load_request("scale", scale_model()))
        .await
        .expect("load model");
    (d, dir)
}

fn swap_request(path: &Path, abs_tolerance: f64) -> pb::SwapPluginRequest {
    pb::SwapPluginRequest {
        path: path.display().to_string(),
        name: "mock-good".into(),
        abs_tolerance,
        ..Default::default()
    }
}

async fn generation(d: &Daemon) -> u64 {
    d.registry()
        .await
        .list_plugins(pb::ListPluginsRequest {})
        .await
        .expect("list")
        .into_inner()
        .generation
}

/// One client's record: (generation, input, output) per answer, and the failures.
#[derive(Default)]
struct Record {
    answers: Vec<(u64, Vec<f32>, Vec<f32>)>,
    failures: Vec<String>,
    latencies_us: Vec<u64>,
}

/// Runs `clients` clients until `stop`; each sends distinct inputs.
fn start_clients(
    d: &Daemon,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Record>> {
    (0..clients)
        .map(|c| {
            let url = d.url();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut client =
                    ipb::grpc_inference_service_client::GrpcInferenceServiceClient::connect(url)
                        .await
                        .expect("connect");
                let mut record = Record::default();
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    // Small values: 0.5 (the builds' difference) is far beyond the default
                    // relative tolerance on them.
                    let x: Vec<f32> = (0..4)
                        .map(|k| (c * 4 + k) as f32 * 0.01 + (i % 16) as f32 * 0.001)
                        .collect();
                    let started = Instant::now();
                    match client.model_infer(infer_request(&x)).await {
                        Ok(r) => {
                            record
                                .latencies_us
                                .push(started.elapsed().as_micros() as u64);
                            let r = r.into_inner();
                            let y = f32_values(&r.raw_output_contents[0]);
                            record
                                .answers
                                .push((generation_of(&r).expect("generation"), x, y));
                        }
                        Err(e) => record
                            .failures
                            .push(format!("{:?}: {}", e.code(), e.message())),
                    }
                }
                record
            })
        })
        .collect()
}

async fn collect(handles: Vec<tokio::task::JoinHandle<Record>>) -> Record {
    let mut all = Record::default();
    for h in handles {
        let r = h.await.expect("client task");
        all.answers.extend(r.answers);
        all.failures.extend(r.failures);
        all.latencies_us.extend(r.latencies_us);
    }
    all
}

fn percentile(v: &mut [u64], p: f64) -> u64 {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// The first KiB of `file`: an ELF header whose sections are missing, not a loadable library.
fn truncated(file: &Path, dir: &Path) -> PathBuf {
    let bytes = std::fs::read(file).expect("read");
    let to = dir.join("libopreg_truncated.so");
    std::fs::write(&to, &bytes[..1024]).expect("write");
    to
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn swaps_under_load_fail_no_request_and_each_answer_matches_its_generation() {
    const CLIENTS: usize = 4;
    const SWAPS: usize = 100;
    let (d, _dir) = serving(&[]).await;
    let builds = [plugin("mock_good"), plugin("mock_good_v2")];
    let first = generation(&d).await;
    let mut build_of: HashMap<u64, usize> = HashMap::from([(first, 0)]);

    // Without swaps first, then the same load during swaps: request latency side by side.
    let stop = Arc::new(AtomicBool::new(false));
    let clients = start_clients(&d, CLIENTS, stop.clone());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut quiet = collect(clients).await;
    assert!(quiet.failures.is_empty(), "{:?}", quiet.failures);

    let scratch = tempfile::tempdir().expect("tempdir");
    let broken = truncated(&builds[1], scratch.path());
    let stop = Arc::new(AtomicBool::new(false));
    let clients = start_clients(&d, CLIENTS, stop.clone());
    let mut reg = d.registry().await;
    let mut swap_us = Vec::new();
    let mut current = 0usize;
    for i in 0..SWAPS {
        if i == SWAPS / 2 {
            // In the middle: a build that diverges beyond the default tolerance, and a file
            // that is not a plugin. Both refused; the serving generation is untouched.
            let before = generation(&d).await;
            let other = 1 - current;
            let e = reg
                .swap_plugin(swap_request(&builds[other], 0.0))
                .await
                .expect_err("diverging build");
            assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
            assert!(
                e.message().contains("model 'scale' version 1, output 'Y'")
                    && e.message().contains("max |new - old| = 5.000000e-1"),
                "{}",
                e.message()
            );
            eprintln!("a refused verification prints: {}", e.message());
            let e = reg
                .swap_plugin(swap_request(&broken, 1.0))
                .await
                .expect_err("not a plugin");
            assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
            assert!(
                e.message().contains("not a loadable shared library"),
                "{}",
                e.message()
            );
            assert_eq!(generation(&d).await, before, "a refusal changed nothing");
            let list = reg
                .list_plugins(pb::ListPluginsRequest {})
                .await
                .expect("list")
                .into_inner();
            assert_eq!(list.refused.len(), 2, "{:?}", list.refused);
            assert_eq!(list.refused[0].sha256, sha256(&builds[other]));
            assert_eq!(list.refused[1].sha256, sha256(&broken));
        }
        let next = 1 - current;
        let started = Instant::now();
        let r = reg
            .swap_plugin(swap_request(&builds[next], 1.0))
            .await
            .unwrap_or_else(|e| panic!("swap {i}: {e}"))
            .into_inner();
        swap_us.push(started.elapsed().as_micros() as u64);
        // The model was compared (on recorded requests) and its plan compiled before publishing.
        assert_eq!(r.plans_compiled, 1);
        let check = r.checks.first().expect("the model was checked");
        assert!(check.recorded && check.inputs > 0, "{check:?}");
        assert!(
            (check.max_abs_diff - 0.5).abs() < 1e-6,
            "the builds differ by 0.5: {check:?}"
        );
        build_of.insert(r.generation, next);
        current = next;
    }
    stop.store(true, Ordering::Relaxed);
    let mut during = collect(clients).await;

    assert!(
        during.failures.is_empty(),
        "{} failed requests during swaps: {:?}",
        during.failures.len(),
        &during.failures[..during.failures.len().min(5)]
    );
    let mut per_build = [0usize; 2];
    for (generation, x, y) in quiet.answers.iter().chain(&during.answers) {
        let build = *build_of
            .get(generation)
            .unwrap_or_else(|| panic!("answer from generation {generation}, never published"));
        assert_eq!(y, &expected(build, x), "generation {generation}");
        per_build[build] += 1;
    }
    assert!(
        per_build.iter().all(|&n| n > 0),
        "both builds answered: {per_build:?}"
    );
    eprintln!(
        "swap: {SWAPS} verified swaps, {} requests during them, 0 failed; swap call p50 {} us, p99 {} us; \
         request latency without swaps p50 {} us p99 {} us ({} requests), during swaps p50 {} us p99 {} us",
        during.answers.len(),
        percentile(&mut swap_us, 0.5),
        percentile(&mut swap_us, 0.99),
        percentile(&mut quiet.latencies_us, 0.5),
        percentile(&mut quiet.latencies_us, 0.99),
        quiet.answers.len(),
        percentile(&mut during.latencies_us, 0.5),
        percentile(&mut during.latencies_us, 0.99),
    );
}

#[tokio::test]
async fn rollback_returns_to_the_previous_build_and_a_dry_run_publishes_nothing() {
    let (d, _dir) = serving(&[]).await;
    let mut reg = d.registry().await;
    let mut inf = d.inference().await;
    let x = [1.0, 2.0, 3.0, 4.0];
    let answer = |r: ipb::ModelInferResponse| f32_values(&r.raw_output_contents[0]);

    // No model has served a request yet: the swap is verified on synthesized inputs.
    let dry = reg
        .swap_plugin(pb::SwapPluginRequest {
            dry_run: true,
            ..swap_request(&plugin("mock_good_v2"), 1.0)
        })
        .await
        .expect("dry run")
        .into_inner();
    let check = dry.checks.first().expect("checked");
    assert!(!check.recorded && check.inputs == 1, "{check:?}");
    assert_eq!(
        dry.generation,
        generation(&d).await,
        "dry run publishes nothing"
    );
    let r = inf.model_infer(infer_request(&x)).await.expect("infer");
    assert_eq!(answer(r.into_inner()), expected(0, &x));

    let swapped = reg
        .swap_plugin(swap_request(&plugin("mock_good_v2"), 1.0))
        .await
        .expect("swap")
        .into_inner();
    assert!(swapped.plugin.expect("info").version.ends_with("+v2"));
    let r = inf.model_infer(infer_request(&x)).await.expect("infer");
    assert_eq!(answer(r.into_inner()), expected(1, &x));

    let back = reg
        .rollback_plugin(pb::RollbackPluginRequest {
            name: "mock-good".into(),
        })
        .await
        .expect("rollback")
        .into_inner();
    assert!(back.generation > swapped.generation);
    assert!(!back.plugin.expect("info").version.ends_with("+v2"));
    let r = inf
        .model_infer(infer_request(&x))
        .await
        .expect("infer")
        .into_inner();
    assert_eq!(generation_of(&r), Some(back.generation));
    assert_eq!(answer(r), expected(0, &x));
    // The build rolled back from is kept in turn: a second rollback goes forward again.
    let list = reg
        .list_plugins(pb::ListPluginsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.previous.len(), 1);
    assert!(list.previous[0].version.ends_with("+v2"));
    reg.rollback_plugin(pb::RollbackPluginRequest {
        name: "mock-good".into(),
    })
    .await
    .expect("roll forward");
    let r = inf.model_infer(infer_request(&x)).await.expect("infer");
    assert_eq!(answer(r.into_inner()), expected(1, &x));

    // Refusals: a build registering another name, a name that is not loaded, nothing to
    // roll back to.
    let e = reg
        .swap_plugin(pb::SwapPluginRequest {
            name: "other".into(),
            ..swap_request(&plugin("mock_good"), 1.0)
        })
        .await
        .expect_err("wrong name");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("registers plugin 'mock-good'"),
        "{}",
        e.message()
    );
    let e = reg
        .swap_plugin(pb::SwapPluginRequest {
            name: String::new(),
            ..swap_request(&plugin("mock_device"), 1.0)
        })
        .await
        .expect_err("not loaded");
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("is not loaded"), "{}", e.message());
    // Builds for another ABI major or a newer minor: refused by the loader, named, remembered.
    let before = generation(&d).await;
    for (file, why) in [
        ("mock_abi_major", "is not compatible with this daemon's ABI"),
        ("mock_newer_minor", "newer than this daemon's"),
    ] {
        let e = reg
            .swap_plugin(swap_request(&plugin(file), 1.0))
            .await
            .expect_err(file);
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains(why), "{}", e.message());
    }
    assert_eq!(generation(&d).await, before);
    let refused: Vec<String> = reg
        .list_plugins(pb::ListPluginsRequest {})
        .await
        .expect("list")
        .into_inner()
        .refused
        .into_iter()
        .map(|r| r.sha256)
        .collect();
    for file in ["mock_abi_major", "mock_newer_minor"] {
        assert!(
            refused.contains(&sha256(&plugin(file))),
            "{file} remembered"
        );
    }
    reg.unload_plugin(pb::UnloadPluginRequest {
        name: "mock-good".into(),
    })
    .await
    .expect("unload");
    let e = reg
        .rollback_plugin(pb::RollbackPluginRequest {
            name: "mock-good".into(),
        })
        .await
        .expect_err("unloaded");
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn without_a_grace_period_there_is_nothing_to_roll_back_to() {
    let (d, _dir) = serving(&["--swap-grace-s", "0"]).await;
    let mut reg = d.registry().await;
    reg.swap_plugin(swap_request(&plugin("mock_good_v2"), 1.0))
        .await
        .expect("swap");
    let e = reg
        .rollback_plugin(pb::RollbackPluginRequest {
            name: "mock-good".into(),
        })
        .await
        .expect_err("nothing kept");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("no previous build"), "{}", e.message());
    // Nothing kept, so the replaced library is released at once.
    d.wait_log("plugin library released and unmapped");
}

#[tokio::test]
async fn the_watcher_takes_a_file_only_once_it_is_completely_written() {
    // The two builds differ by 0.5: the daemon's tolerance lets the watcher accept that.
    let (d, dir) = serving(&[
        "--watch-plugins",
        "--watch-settle-ms",
        "800",
        "--swap-abs-tolerance",
        "1",
    ])
    .await;
    let mut inf = d.inference().await;
    let x = [0.5, 1.0, 1.5, 2.0];
    let r = inf.model_infer(infer_request(&x)).await.expect("infer");
    assert_eq!(
        f32_values(&r.into_inner().raw_output_contents[0]),
        expected(0, &x)
    );
    let start = generation(&d).await;

    // A slow copy in 8 chunks, 300 ms apart: never still for the settle time until done.
    let bytes = std::fs::read(plugin("mock_good_v2")).expect("read");
    let target = dir.path().join("libopreg_mock_good_next.so");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&target).expect("create");
        for chunk in bytes.chunks(bytes.len().div_ceil(8)) {
            f.write_all(chunk).expect("write");
            f.flush().expect("flush");
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(generation(&d).await, start, "taken before it was complete");
        }
    }
    let log = d.wait_log("watcher: plugin swapped");
    assert!(!log.contains("swap refused"), "{log}");
    assert!(generation(&d).await > start);
    let r = inf.model_infer(infer_request(&x)).await.expect("infer");
    assert_eq!(
        f32_values(&r.into_inner().raw_output_contents[0]),
        expected(1, &x)
    );

    // A file that is not a plugin is refused once and not retried while it stays the same.
    std::fs::write(dir.path().join("libopreg_junk.so"), b"not a library").expect("write");
    d.wait_log("watcher: refused plugin");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(d.log().matches("watcher: refused plugin").count(), 1);
    assert!(d.log().contains("libopreg_junk.so: not a loadable"));
}

#[tokio::test]
async fn a_thousand_swaps_unmap_every_old_copy_and_keep_memory_bounded() {
    const SWAPS: usize = 1000;
    // No grace period: each replaced build is released as soon as no request holds it.
    let (d, _dir) = serving(&["--swap-grace-s", "0"]).await;
    let mut reg = d.registry().await;
    let mut inf = d.inference().await;
    let builds = [plugin("mock_good"), plugin("mock_good_v2")];
    let x = [0.25, 0.5, 0.75, 1.0];
    let mut rss = Vec::new();
    for i in 0..SWAPS {
        let next = (i + 1) % 2;
        reg.swap_plugin(swap_request(&builds[next], 1.0))
            .await
            .unwrap_or_else(|e| panic!("swap {i}: {e}"));
        let r = inf.model_infer(infer_request(&x)).await.expect("infer");
        assert_eq!(
            f32_values(&r.into_inner().raw_output_contents[0]),
            expected(next, &x)
        );
        if i % 100 == 99 || i == 9 {
            rss.push((i + 1, d.rss_kib()));
        }
    }
    eprintln!("swap memory: RSS KiB after N swaps {rss:?}");
    // After the first hundred (allocator arenas and caches warm up), growth must stay under
    // 2 MiB for the next 900 swaps: a leak of 2.3 KB per swap would pass it (measured: under
    // 0.1 KB per swap here, and a plateau of +1.3 MB over 1,000 swaps of the 1,000-kernel
    // onnx-ops); the ~125 KB per swap once seen would be 110 MB.
    let at = |n: usize| {
        rss.iter()
            .find(|(k, _)| *k == n)
            .map(|(_, r)| *r)
            .expect("sampled")
    };
    assert!(
        at(SWAPS) < at(100) + 2048,
        "RSS grew from {} to {} KiB over {} swaps",
        at(100),
        at(SWAPS),
        SWAPS - 100
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while d
        .log()
        .matches("plugin library released and unmapped")
        .count()
        < SWAPS
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = d.log();
    assert!(
        !log.contains("stayed mapped"),
        "a released library stayed mapped"
    );
    assert_eq!(
        log.matches("plugin library released and unmapped").count(),
        SWAPS
    );
}

#[tokio::test]
async fn a_model_pinned_to_a_build_stays_on_it_through_swaps() {
    let repo = tempfile::tempdir().expect("repo");
    for (name, pin) in [
        ("pinned", Some("0.1.0")),
        ("free", None),
        ("unmet", Some("9.9.9")),
    ] {
        std::fs::create_dir_all(repo.path().join(name).join("1")).expect("mkdir");
        std::fs::write(repo.path().join(name).join("1/model.onnx"), scale_model()).expect("model");
        if let Some(pin) = pin {
            std::fs::write(
                repo.path().join(name).join("config.toml"),
                format!("[pin]\n\"mock-good\" = \"{pin}\"\n"),
            )
            .expect("config");
        }
    }
    let dir = plugin_dir(&[plugin("mock_good")]);
    let d = Daemon::start(&[
        "--plugin-dir",
        dir.path().to_str().expect("utf8"),
        "--model-repo",
        repo.path().to_str().expect("utf8"),
    ]);
    let mut inf = d.inference().await;
    let mut reg = d.registry().await;
    let x = [1.0, 2.0, 3.0, 4.0];
    let ask = |model: &str| ipb::ModelInferRequest {
        model_name: model.into(),
        ..infer_request(&x)
    };

    // A pin the loaded build does not meet: the version does not load, and says why.
    let index = d.index().await;
    let unmet = index.iter().find(|m| m.name == "unmet").expect("listed");
    assert!(
        unmet
            .reason
            .contains("pins plugin 'mock-good' at '9.9.9', but the loaded build is 0.1.0"),
        "{unmet:?}"
    );

    let first = inf
        .model_infer(ask("pinned"))
        .await
        .expect("infer")
        .into_inner();
    let start = generation_of(&first).expect("generation");
    let swapped = reg
        .swap_plugin(swap_request(&plugin("mock_good_v2"), 1.0))
        .await
        .expect("swap")
        .into_inner();
    // Only the free model was compiled and compared; the pinned one stays on 0.1.0.
    assert_eq!(swapped.plans_compiled, 1);
    let free = inf
        .model_infer(ask("free"))
        .await
        .expect("infer")
        .into_inner();
    assert_eq!(f32_values(&free.raw_output_contents[0]), expected(1, &x));
    let pinned = inf
        .model_infer(ask("pinned"))
        .await
        .expect("infer")
        .into_inner();
    assert_eq!(generation_of(&pinned), Some(start));
    assert_eq!(f32_values(&pinned.raw_output_contents[0]), expected(0, &x));

    // A build that meets the pin again: the pinned model moves to it.
    let back = reg
        .swap_plugin(swap_request(&plugin("mock_good"), 1.0))
        .await
        .expect("swap back")
        .into_inner();
    assert_eq!(back.plans_compiled, 2);
    let pinned = inf
        .model_infer(ask("pinned"))
        .await
        .expect("infer")
        .into_inner();
    assert_eq!(generation_of(&pinned), Some(back.generation));
    assert_eq!(f32_values(&pinned.raw_output_contents[0]), expected(0, &x));
}

#[tokio::test]
async fn a_faulting_plugin_is_quarantined_and_nodes_fall_back() {
    let dir = plugin_dir(&[plugin("mock_good"), plugin("mock_panic")]);
    let d = Daemon::start(&[
        "--plugin-dir",
        dir.path().to_str().expect("utf8"),
        "--quarantine-faults",
        "3",
    ]);
    let mut inf = d.inference().await;
    let mut reg = d.registry().await;
    inf.repository_model_load(load_request("flaky", flaky_model()))
        .await
        .expect("load");
    let x = [1.0, -2.0, 3.0, -4.0];
    let ask = || ipb::ModelInferRequest {
        model_name: "flaky".into(),
        ..infer_request(&x)
    };
    // Each fault fails its own request with INTERNAL and the reason; the third quarantines.
    for _ in 0..3 {
        let e = inf.model_infer(ask()).await.expect_err("panics");
        assert_eq!(e.code(), Code::Internal);
        assert!(
            e.message().contains("mock-panic") && e.message().contains("on purpose"),
            "{}",
            e.message()
        );
    }
    d.wait_log("plugin quarantined after repeated kernel faults");
    let listed = |list: &pb::ListPluginsResponse, name: &str| {
        list.plugins
            .iter()
            .find(|p| p.name == name)
            .cloned()
            .expect("listed")
    };
    let list = reg
        .list_plugins(pb::ListPluginsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert!(listed(&list, "mock-panic").quarantined);
    assert!(!listed(&list, "mock-good").quarantined);
    // The node now runs on mock-good's MockFlaky.
    let r = inf
        .model_infer(ask())
        .await
        .expect("falls back")
        .into_inner();
    assert_eq!(f32_values(&r.raw_output_contents[0]), x.to_vec());

    // Lifted by RPC: the panicking kernel is back (and a request fails again).
    reg.release_quarantine(pb::ReleaseQuarantineRequest {
        name: "mock-panic".into(),
    })
    .await
    .expect("release");
    let e = inf.model_infer(ask()).await.expect_err("panics again");
    assert_eq!(e.code(), Code::Internal);
    let list = reg
        .list_plugins(pb::ListPluginsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert!(!listed(&list, "mock-panic").quarantined);
    assert_eq!(listed(&list, "mock-panic").recent_faults, 1);
}

#[tokio::test]
async fn warm_up_samples_from_the_model_config_verify_a_swap_before_any_request() {
    let repo = tempfile::tempdir().expect("repo");
    // `good` has one warm-up sample (an ONNX TensorProto, as in ONNX test data sets); `bad`
    // has one of the wrong shape, which fails its load with the reason.
    for (name, dims) in [("good", vec![1i64, 4]), ("bad", vec![1, 5])] {
        let dir = repo.path().join(name);
        std::fs::create_dir_all(dir.join("1")).expect("mkdir");
        std::fs::create_dir_all(dir.join("samples/s0")).expect("mkdir");
        std::fs::write(dir.join("1/model.onnx"), scale_model()).expect("model");
        std::fs::write(dir.join("config.toml"), "warmup = \"samples\"\n").expect("config");
        let n: i64 = dims.iter().product();
        let t = opreg_proto::onnx::TensorProto {
            name: "X".into(),
            dims,
            data_type: 1,
            float_data: (0..n).map(|i| i as f32 * 0.1).collect(),
            ..Default::default()
        };
        std::fs::write(dir.join("samples/s0/input_0.pb"), t.encode_to_vec()).expect("sample");
    }
    let dir = plugin_dir(&[plugin("mock_good")]);
    let d = Daemon::start(&[
        "--plugin-dir",
        dir.path().to_str().expect("utf8"),
        "--model-repo",
        repo.path().to_str().expect("utf8"),
    ]);
    let index = d.index().await;
    let bad = index.iter().find(|m| m.name == "bad").expect("listed");
    assert!(bad.reason.contains("warm-up samples in"), "{bad:?}");
    let mut reg = d.registry().await;
    let e = reg
        .swap_plugin(swap_request(&plugin("mock_good_v2"), 0.0))
        .await
        .expect_err("the warm-up sample shows the change");
    assert!(
        e.message()
            .contains("model 'good' version 1, output 'Y' (input set 0, a warm-up sample)"),
        "{}",
        e.message()
    );
    let ok = reg
        .swap_plugin(swap_request(&plugin("mock_good_v2"), 1.0))
        .await
        .expect("within tolerance")
        .into_inner();
    let check = ok.checks.first().expect("checked");
    assert!(check.recorded && check.inputs == 1, "{check:?}");
}

/// `y = x * W` (x 2x8, W 8x4), served from a repository file: the MatMul packs W and absorbs
/// it, so the version's plan frees it (ABI 1.8).
fn matmul_file_model(w: &[f32]) -> Vec<u8> {
    use opreg_tests::onnx::*;
    model(
        vec![node("MatMul", &["x", "w"], &["y"])],
        vec![value("x", 1, &[2, 8])],
        vec![value("y", 1, &[2, 4])],
        vec![f32_initializer("w", &[8, 4], w)],
        13,
    )
}

#[tokio::test]
async fn a_swap_recompiles_a_version_whose_packed_weights_were_freed_and_answers_the_same() {
    let w: Vec<f32> = (0..32).map(|i| (i % 7) as f32 - 3.0).collect();
    let x: Vec<f32> = (0..16).map(|i| i as f32 / 4.0).collect();
    let want: Vec<f32> = (0..8)
        .map(|i| (0..8).map(|k| x[i / 4 * 8 + k] * w[k * 4 + i % 4]).sum())
        .collect();
    let repo = tempfile::tempdir().expect("tempdir");
    let dir = repo.path().join("mm").join("1");
    std::fs::create_dir_all(&dir).expect("version folder");
    std::fs::write(dir.join("model.onnx"), matmul_file_model(&w)).expect("model");
    let (d, _plugins) = start_serving(repo.path(), &[]);
    let mut inf = d.inference().await;
    let request = || ipb::ModelInferRequest {
        model_name: "mm".into(),
        inputs: vec![ipb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![2, 8],
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(&x).into()],
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let first = loop {
        match inf.model_infer(request()).await {
            Ok(r) => break r.into_inner(),
            // Not loaded yet.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("mm never served: {e}\n{}", d.log()),
        }
    };
    let close = |got: &[f32]| {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{got:?} vs {want:?}"
            );
        }
    };
    close(&f32_values(&first.raw_output_contents[0]));
    // Swapping in the operators again compiles the version anew: its freed weights are read
    // from its file (a plan compiled from the version's graph as kept would lack `w` and fail
    // the swap), and the answer stays the same.
    let r = d
        .registry()
        .await
        .swap_plugin(pb::SwapPluginRequest {
            path: plugin("onnx_ops").display().to_string(),
            name: "onnx-ops".into(),
            abs_tolerance: 0.0,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("swap: {e}\n{}", d.log()))
        .into_inner();
    assert_eq!(r.plans_compiled, 1);
    let again = inf
        .model_infer(request())
        .await
        .expect("infer")
        .into_inner();
    close(&f32_values(&again.raw_output_contents[0]));
}
