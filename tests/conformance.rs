//! ONNX conformance: every official node test case, through the real daemon over gRPC.
//!
//! Cases come from `OPREG_ONNX_NODE_TESTS` (written by `scripts/test` with the pinned `onnx`
//! wheel and `shared/tools/gen_onnx_node_tests.py`). Each case's model is submitted with
//! `RepositoryModelLoad`, each data set inferred with `ModelInfer`, and the outputs compared
//! with the ONNX backend runner's tolerances (rtol 1e-3, atol 1e-7). The run ends with
//! `conformance: N passed, M failed`, and fails if a case listed in
//! `conformance/expected_passes.txt` no longer passes (`OPREG_CONFORMANCE_UPDATE=1` rewrites
//! the list from this run).

use opreg_proto::{inference as pb, onnx};
use opreg_tests::*;
use prost::Message;
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
};

const RTOL: f64 = 1e-3;
const ATOL: f64 = 1e-7;

fn kserve_type(code: i32) -> Option<(&'static str, usize)> {
    Some(match code {
        1 => ("FP32", 4),
        2 => ("UINT8", 1),
        3 => ("INT8", 1),
        4 => ("UINT16", 2),
        5 => ("INT16", 2),
        6 => ("INT32", 4),
        7 => ("INT64", 8),
        8 => ("BYTES", 0),
        9 => ("BOOL", 1),
        10 => ("FP16", 2),
        11 => ("FP64", 8),
        12 => ("UINT32", 4),
        13 => ("UINT64", 8),
        16 => ("BF16", 2),
        // opreg's names for the sub-16-bit types: one byte per element on the wire.
        17 => ("FP8E4M3FN", 1),
        18 => ("FP8E4M3FNUZ", 1),
        19 => ("FP8E5M2", 1),
        20 => ("FP8E5M2FNUZ", 1),
        21 => ("UINT4", 1),
        22 => ("INT4", 1),
        23 => ("FP4E2M1", 1),
        24 => ("FP8E8M0", 1),
        25 => ("UINT2", 1),
        26 => ("INT2", 1),
        _ => return None,
    })
}

/// A test tensor as KServe raw contents.
fn raw_contents(t: &onnx::TensorProto) -> Result<(&'static str, Vec<u8>), String> {
    let (name, size) = kserve_type(t.data_type)
        .ok_or_else(|| format!("element type {} not in KServe", t.data_type))?;
    let numel: usize = t.dims.iter().map(|&d| d as usize).product();
    let packed_bits = match t.data_type {
        21..=23 => Some(4u32),
        25 | 26 => Some(2),
        _ => None,
    };
    let bytes = if let Some(bits) = packed_bits {
        // ONNX packs these low bits first; the wire carries one (sign-extended) element per byte.
        let src: Vec<u8> = if t.raw_data.is_empty() {
            t.int32_data.iter().map(|&v| v as u8).collect()
        } else {
            t.raw_data.to_vec()
        };
        let per = (8 / bits) as usize;
        let mask = (1u8 << bits) - 1;
        let signed = matches!(t.data_type, 22 | 26);
        (0..numel)
            .map(|i| {
                let v =
                    (src.get(i / per).copied().unwrap_or(0) >> ((i % per) as u32 * bits)) & mask;
                if signed && v & (1 << (bits - 1)) != 0 {
                    v | !mask
                } else {
                    v
                }
            })
            .collect()
    } else if t.data_type == 8 {
        let mut out = Vec::new();
        for s in &t.string_data {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s);
        }
        out
    } else if !t.raw_data.is_empty() || numel == 0 {
        t.raw_data.to_vec()
    } else if !t.float_data.is_empty() {
        t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect()
    } else if !t.double_data.is_empty() {
        t.double_data.iter().flat_map(|v| v.to_le_bytes()).collect()
    } else if !t.int64_data.is_empty() {
        t.int64_data.iter().flat_map(|v| v.to_le_bytes()).collect()
    } else if !t.uint64_data.is_empty() {
        t.uint64_data
            .iter()
            .flat_map(|v| v.to_le_bytes().into_iter().take(size))
            .collect()
    } else {
        t.int32_data
            .iter()
            .flat_map(|v| v.to_le_bytes().into_iter().take(size))
            .collect()
    };
    Ok((name, bytes))
}

fn close(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= ATOL + RTOL * b.abs()
}

/// Compares an output with the expected tensor.
fn compare(
    datatype: &str,
    shape: &[i64],
    got: &[u8],
    want: &onnx::TensorProto,
) -> Result<(), String> {
    let (want_type, want_bytes) = raw_contents(want)?;
    if datatype != want_type {
        return Err(format!("output type {datatype}, expected {want_type}"));
    }
    if shape != want.dims.as_slice() {
        return Err(format!("output shape {shape:?}, expected {:?}", want.dims));
    }
    let floats = |b: &[u8], f: fn(&[u8]) -> f64, size: usize| -> Vec<f64> {
        b.chunks_exact(size).map(f).collect()
    };
    let (g, w): (Vec<f64>, Vec<f64>) = match datatype {
        "FP32" => {
            let f = |c: &[u8]| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64;
            (floats(got, f, 4), floats(&want_bytes, f, 4))
        }
        "FP64" => {
            let f = |c: &[u8]| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            (floats(got, f, 8), floats(&want_bytes, f, 8))
        }
        "FP16" => {
            let f = |c: &[u8]| half_to_f64(u16::from_le_bytes([c[0], c[1]]));
            (floats(got, f, 2), floats(&want_bytes, f, 2))
        }
        "BF16" => {
            let f =
                |c: &[u8]| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) as f64;
            (floats(got, f, 2), floats(&want_bytes, f, 2))
        }
        _ => {
            return if got == want_bytes.as_slice() {
                Ok(())
            } else {
                Err("values differ".into())
            };
        }
    };
    if g.len() != w.len() {
        return Err(format!("{} values, expected {}", g.len(), w.len()));
    }
    match g.iter().zip(&w).position(|(a, b)| !close(*a, *b)) {
        None => Ok(()),
        Some(i) => Err(format!("value {i}: {} vs expected {}", g[i], w[i])),
    }
}

fn half_to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as f64;
    sign * match exp {
        0 => frac * 2f64.powi(-24),
        31 if frac == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
    }
}

/// Runs one case; `Ok` when every data set matches.
/// `repo`, with the backends to prefer: each case is written there with a `config.toml` and
/// loaded by name (`OPREG_CONFORMANCE_BACKENDS=cuda,cpu` runs the suite on the CUDA plugin).
async fn run_case(
    d: &Daemon,
    dir: PathBuf,
    name: &str,
    repo: Option<(&std::path::Path, &str)>,
) -> Result<(), String> {
    let bytes = std::fs::read(dir.join("model.onnx")).map_err(|e| e.to_string())?;
    let model = onnx::ModelProto::decode(bytes.as_slice()).map_err(|e| format!("decode: {e}"))?;
    let graph = model.graph.clone().unwrap_or_default();
    let inits: BTreeSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<&str> = graph
        .input
        .iter()
        .map(|v| v.name.as_str())
        .filter(|n| !inits.contains(n))
        .collect();
    let outputs: Vec<&str> = graph.output.iter().map(|v| v.name.as_str()).collect();
    let mut c = d.inference().await;
    let mut params = HashMap::new();
    if let Some((repo, backends)) = repo {
        let at = repo.join(name);
        std::fs::create_dir_all(at.join("1")).map_err(|e| e.to_string())?;
        std::fs::write(at.join("1/model.onnx"), &bytes).map_err(|e| e.to_string())?;
        let list: Vec<String> = backends
            .split(',')
            .map(|b| format!("{:?}", b.trim()))
            .collect();
        std::fs::write(
            at.join("config.toml"),
            format!("backends = [{}]\n", list.join(", ")),
        )
        .map_err(|e| e.to_string())?;
    } else {
        params.insert(
            "file:1/model.onnx".to_string(),
            pb::ModelRepositoryParameter {
                parameter_choice: Some(
                    pb::model_repository_parameter::ParameterChoice::BytesParam(bytes),
                ),
            },
        );
    }
    // Loads past the daemon's `max_concurrent_loads` are refused with RESOURCE_EXHAUSTED
    // ("retry later"): do that.
    let mut tries = 0;
    loop {
        let load = c
            .repository_model_load(pb::RepositoryModelLoadRequest {
                model_name: name.into(),
                parameters: params.clone(),
                ..Default::default()
            })
            .await;
        match load {
            Err(e) if e.code() == tonic::Code::ResourceExhausted && tries < 600 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => return Err(format!("load: {:?}: {}", e.code(), e.message())),
            Ok(_) => break,
        }
    }
    let mut sets: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    sets.sort();
    let mut checked = 0;
    let result = async {
        for set in sets {
            let read = |kind: &str, k: usize| -> Option<onnx::TensorProto> {
                let b = std::fs::read(set.join(format!("{kind}_{k}.pb"))).ok()?;
                onnx::TensorProto::decode(b.as_slice()).ok()
            };
            let ins: Option<Vec<_>> = (0..inputs.len()).map(|k| read("input", k)).collect();
            let outs: Option<Vec<_>> = (0..outputs.len()).map(|k| read("output", k)).collect();
            let (Some(ins), Some(outs)) = (ins, outs) else {
                continue;
            };
            let mut req = pb::ModelInferRequest {
                model_name: name.into(),
                ..Default::default()
            };
            for (k, t) in ins.iter().enumerate() {
                let (datatype, raw) = raw_contents(t)?;
                req.inputs.push(pb::model_infer_request::InferInputTensor {
                    name: inputs[k].into(),
                    datatype: datatype.into(),
                    shape: t.dims.clone(),
                    ..Default::default()
                });
                req.raw_input_contents.push(raw.into());
            }
            let r = c
                .model_infer(req)
                .await
                .map_err(|e| format!("infer: {:?}: {}", e.code(), e.message()))?
                .into_inner();
            for (k, want) in outs.iter().enumerate() {
                let got = r
                    .outputs
                    .get(k)
                    .ok_or_else(|| format!("output {k} missing"))?;
                compare(&got.datatype, &got.shape, &r.raw_output_contents[k], want)
                    .map_err(|e| format!("output '{}': {e}", got.name))?;
            }
            checked += 1;
        }
        if checked == 0 {
            Err("no data set with plain tensors".to_string())
        } else {
            Ok(())
        }
    }
    .await;
    let _ = c
        .repository_model_unload(pb::RepositoryModelUnloadRequest {
            model_name: name.into(),
            ..Default::default()
        })
        .await;
    result
}

fn one_line(s: &str) -> String {
    let s: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    s.chars().take(300).collect()
}

fn main() {
    let Some(root) = std::env::var_os("OPREG_ONNX_NODE_TESTS").map(PathBuf::from) else {
        if std::env::var_os("CI").is_some() {
            panic!("OPREG_ONNX_NODE_TESTS must name the generated ONNX node tests in CI");
        }
        eprintln!("SKIPPED: set OPREG_ONNX_NODE_TESTS (scripts/test does)");
        return;
    };
    let node_dir = root.join("node");
    let mut cases: Vec<String> = std::fs::read_dir(&node_dir)
        .unwrap_or_else(|e| panic!("{}: {e}", node_dir.display()))
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    cases.sort();
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if let Some(f) = &filter {
        cases.retain(|c| c.contains(f.as_str()));
    }

    let repo = tempfile::tempdir().expect("repo");
    let backends = std::env::var("OPREG_CONFORMANCE_BACKENDS").ok();
    let mut libs = vec![plugin("onnx_ops"), plugin("blas_cpu")];
    if backends.as_deref().is_some_and(|b| b.contains("cuda")) {
        libs.push(plugin("cuda"));
    }
    let plugins = plugin_dir(&libs);
    let d = Daemon::start_with(Options {
        args: vec![
            "--plugin-dir".into(),
            plugins.path().display().to_string(),
            "--model-repo".into(),
            repo.path().display().to_string(),
        ],
        env: vec![("RUST_LOG".into(), "error".into())],
        ..Options::default()
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let results: BTreeMap<String, Result<(), String>> = rt.block_on(async {
        let mut out = BTreeMap::new();
        for chunk in cases.chunks(4) {
            let at = backends.as_deref().map(|b| (repo.path(), b));
            let runs = chunk.iter().map(|c| run_case(&d, node_dir.join(c), c, at));
            let rs = futures_join(runs).await;
            for (c, r) in chunk.iter().zip(rs) {
                out.insert(c.clone(), r);
            }
        }
        out
    });

    let mut report = String::new();
    for (case, r) in &results {
        match r {
            Ok(()) => report.push_str(&format!("PASS {case}\n")),
            Err(e) => report.push_str(&format!("FAIL {case}: {}\n", one_line(e))),
        }
    }
    let report_path = artifacts().join("conformance-report.txt");
    let _ = std::fs::write(&report_path, &report);
    let passed: BTreeSet<&str> = results
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(c, _)| c.as_str())
        .collect();
    let failed = results.len() - passed.len();

    let list_path = workspace().join("tests/conformance/expected_passes.txt");
    let expected: BTreeSet<String> = std::fs::read_to_string(&list_path)
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let regressions: Vec<&String> = expected
        .iter()
        .filter(|c| results.contains_key(*c) && !passed.contains(c.as_str()))
        .collect();
    let new: Vec<&&str> = passed.iter().filter(|c| !expected.contains(**c)).collect();
    if filter.is_none() && std::env::var_os("OPREG_CONFORMANCE_UPDATE").is_some() {
        let mut text = String::from("# ONNX node cases that pass (onnx 1.23.2); CI fails if one stops passing.\n# Regenerate: OPREG_CONFORMANCE_UPDATE=1 ./scripts/test\n");
        for c in &passed {
            text.push_str(c);
            text.push('\n');
        }
        std::fs::write(&list_path, text).expect("write expected passes");
        println!(
            "rewrote {} with {} cases",
            list_path.display(),
            passed.len()
        );
    }
    println!("report: {}", report_path.display());
    if !new.is_empty() {
        println!("{} cases pass that are not in the expected list (OPREG_CONFORMANCE_UPDATE=1 adds them)", new.len());
    }
    for r in &regressions {
        println!(
            "REGRESSION {r}: {}",
            results[r.as_str()]
                .as_ref()
                .err()
                .map(|e| one_line(e))
                .unwrap_or_default()
        );
    }
    println!("conformance: {} passed, {} failed", passed.len(), failed);
    if !regressions.is_empty() {
        std::process::exit(1);
    }
}

/// Awaits futures concurrently, keeping their order (a tiny `join_all`).
async fn futures_join<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futs.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in pinned.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}
