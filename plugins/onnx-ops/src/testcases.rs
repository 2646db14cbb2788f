//! Test-only: runs kernels on the official ONNX node test cases (`model.onnx` +
//! `test_data_set_*/{input,output}_K.pb`), decoding the protobufs by hand so the plugin needs
//! no protobuf dependency. It reads string tensors (compared exactly), `TENSOR` and `STRINGS`
//! attributes and nodes of any domain (`ai.onnx.ml` included). The suite lives in
//! `$OPREG_ONNX_NODE_TESTS/node`; without the variable the sweep is skipped locally (the
//! hand-written tests still run) and fails on CI, where a silently empty sweep would hide
//! regressions.

use opreg_sdk::{
    host::HostTensor,
    prelude::*,
    testkit::{run_kernel_opt, NodeSpec},
};
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

/// The conformance runner's tolerances, so a kernel passing here passes there too.
const RTOL: f64 = 1e-3;
const ATOL: f64 = 1e-7;

enum Val<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint too long".into())
}

fn take<const N: usize>(buf: &[u8], pos: &mut usize) -> Result<[u8; N], String> {
    let b = buf.get(*pos..*pos + N).ok_or("truncated fixed field")?;
    *pos += N;
    b.try_into()
        .map_err(|_| "truncated fixed field".to_string())
}

/// The fields of one protobuf message, in order.
fn fields(buf: &[u8]) -> Result<Vec<(u64, Val<'_>)>, String> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        let val = match key & 7 {
            0 => Val::Varint(varint(buf, &mut pos)?),
            1 => Val::Fixed64(u64::from_le_bytes(take(buf, &mut pos)?)),
            2 => {
                let len = varint(buf, &mut pos)? as usize;
                let b = buf.get(pos..pos + len).ok_or("truncated bytes")?;
                pos += len;
                Val::Bytes(b)
            }
            5 => Val::Fixed32(u32::from_le_bytes(take(buf, &mut pos)?)),
            w => return Err(format!("wire type {w}")),
        };
        out.push((key >> 3, val));
    }
    Ok(out)
}

fn string(v: &Val<'_>) -> String {
    match v {
        Val::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        _ => String::new(),
    }
}

/// Repeated varints, packed or not.
fn push_varints(v: &Val<'_>, out: &mut Vec<u64>) -> Result<(), String> {
    match v {
        Val::Varint(x) => out.push(*x),
        Val::Bytes(b) => {
            let mut pos = 0;
            while pos < b.len() {
                out.push(varint(b, &mut pos)?);
            }
        }
        _ => {}
    }
    Ok(())
}

fn push_fixed32(v: &Val<'_>, out: &mut Vec<u32>) {
    match v {
        Val::Fixed32(x) => out.push(*x),
        Val::Bytes(b) => out.extend(
            b.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        _ => {}
    }
}

fn push_fixed64(v: &Val<'_>, out: &mut Vec<u64>) {
    match v {
        Val::Fixed64(x) => out.push(*x),
        Val::Bytes(b) => out.extend(
            b.chunks_exact(8)
                .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])),
        ),
        _ => {}
    }
}

/// A `TensorProto` as a host tensor, with its name.
fn tensor(buf: &[u8]) -> Result<(String, HostTensor), String> {
    let (mut dims, mut code, mut name) = (Vec::new(), 0u64, String::new());
    let (mut raw, mut f32s, mut i32s, mut i64s, mut f64s) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut strings: Vec<&[u8]> = Vec::new();
    for (f, v) in fields(buf)? {
        match f {
            1 => push_varints(&v, &mut dims)?,
            2 => {
                if let Val::Varint(x) = v {
                    code = x;
                }
            }
            4 => push_fixed32(&v, &mut f32s),
            5 => push_varints(&v, &mut i32s)?,
            6 => {
                if let Val::Bytes(b) = v {
                    strings.push(b);
                }
            }
            // int64_data and uint64_data share the same little-endian encoding.
            7 | 11 => push_varints(&v, &mut i64s)?,
            8 => name = string(&v),
            9 => {
                if let Val::Bytes(b) = v {
                    raw = b.to_vec();
                }
            }
            10 => push_fixed64(&v, &mut f64s),
            _ => {}
        }
    }
    let dtype = DType::from_onnx_code(code as i32).ok_or(format!("onnx type {code}"))?;
    let shape: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
    if dtype == DType::String {
        let t = HostTensor::from_strings(&shape, &strings).map_err(|e| e.message.to_string())?;
        return Ok((name, t));
    }
    let size = dtype.size();
    let numel: usize = shape.iter().product();
    if let Some(bits) = dtype.packed_bits() {
        // Sub-byte types: packed low bits first (in raw_data, or one byte per int32_data
        // entry); held unpacked, signed ones sign-extended.
        let packed: Vec<u8> = if raw.is_empty() {
            i32s.iter().map(|&x| x as u8).collect()
        } else {
            raw
        };
        let per = (8 / bits) as usize;
        let signed = matches!(dtype, DType::I4 | DType::I2);
        let bytes: Vec<u8> = (0..numel)
            .map(|i| {
                let b = packed.get(i / per).copied().unwrap_or(0);
                let v = (b >> ((i % per) as u32 * bits)) & ((1u8 << bits) - 1);
                if signed {
                    (((v << (8 - bits)) as i8) >> (8 - bits)) as u8
                } else {
                    v
                }
            })
            .collect();
        let t = HostTensor::from_bytes(dtype, &shape, &bytes).map_err(|e| e.message.to_string())?;
        return Ok((name, t));
    }
    let bytes = if !raw.is_empty() || numel == 0 {
        raw
    } else if !f32s.is_empty() {
        f32s.iter().flat_map(|v| v.to_le_bytes()).collect()
    } else if !f64s.is_empty() {
        f64s.iter().flat_map(|v| v.to_le_bytes()).collect()
    } else if matches!(dtype, DType::I64 | DType::U64) {
        i64s.iter().flat_map(|v| v.to_le_bytes()).collect()
    } else {
        // int32_data carries every narrower type too (bool, 8/16-bit ints, f16/bf16 bits):
        // its low `size` bytes are the element.
        i32s.iter()
            .flat_map(|&v| (v as u32).to_le_bytes().into_iter().take(size))
            .collect()
    };
    let t = HostTensor::from_bytes(dtype, &shape, &bytes).map_err(|e| e.message.to_string())?;
    Ok((name, t))
}

/// A `TENSOR` attribute's value.
fn owned(t: HostTensor) -> OwnedTensor {
    let string = t.dtype() == DType::String;
    OwnedTensor {
        dtype: t.dtype(),
        shape: t.shape().to_vec().into(),
        data: if string {
            Vec::new()
        } else {
            t.bytes().to_vec()
        }
        .into(),
        strings: t.strings().iter().cloned().collect(),
    }
}

fn attribute(buf: &[u8]) -> Result<(String, AttrValue), String> {
    let (mut name, mut ty) = (String::new(), 0u64);
    let (mut f, mut i, mut s, mut t) = (0f32, 0i64, String::new(), None);
    let (mut floats, mut ints, mut strings) = (Vec::new(), Vec::new(), Vec::new());
    for (field, v) in fields(buf)? {
        match field {
            1 => name = string(&v),
            2 => {
                if let Val::Fixed32(x) = v {
                    f = f32::from_bits(x);
                }
            }
            3 => {
                if let Val::Varint(x) = v {
                    i = x as i64;
                }
            }
            4 => s = string(&v),
            5 => {
                if let Val::Bytes(b) = v {
                    t = Some(owned(tensor(b)?.1));
                }
            }
            7 => push_fixed32(&v, &mut floats),
            8 => push_varints(&v, &mut ints)?,
            9 => strings.push(string(&v)),
            20 => {
                if let Val::Varint(x) = v {
                    ty = x;
                }
            }
            _ => {}
        }
    }
    let value = match ty {
        1 => AttrValue::Float(f),
        2 => AttrValue::Int(i),
        3 => AttrValue::String(s),
        4 => AttrValue::Tensor(t.ok_or(format!("attribute {name}: no tensor"))?),
        6 => AttrValue::Floats(floats.iter().map(|&x| f32::from_bits(x)).collect()),
        7 => AttrValue::Ints(ints.iter().map(|&x| x as i64).collect()),
        8 => AttrValue::Strings(strings.into_iter().collect()),
        t => return Err(format!("attribute {name}: type {t} not handled")),
    };
    Ok((name, value))
}

/// Elements widened to f64, so every numeric output is compared with one rule.
fn to_f64s(t: &HostTensor) -> Result<Vec<f64>, String> {
    use opreg_sdk::half::{bf16, f16};
    fn widen<T: Element>(t: &HostTensor, f: impl Fn(T) -> f64) -> Result<Vec<f64>, String> {
        let v = t.to_vec::<T>().map_err(|e| e.message.to_string())?;
        Ok(v.into_iter().map(f).collect())
    }
    match t.dtype() {
        DType::F32 => widen(t, |v: f32| v as f64),
        DType::F64 => widen(t, |v: f64| v),
        DType::F16 => widen(t, |v: f16| v.to_f64()),
        DType::BF16 => widen(t, |v: bf16| v.to_f64()),
        DType::U8 => widen(t, |v: u8| v as f64),
        DType::I8 => widen(t, |v: i8| v as f64),
        DType::I32 => widen(t, |v: i32| v as f64),
        DType::I64 => widen(t, |v: i64| v as f64),
        other => Err(format!("no comparison for {other}")),
    }
}

fn close(got: &HostTensor, want: &HostTensor) -> Result<(), String> {
    if got.dtype() != want.dtype() || got.shape() != want.shape() {
        return Err(format!(
            "got {} {:?}, want {} {:?}",
            got.dtype(),
            got.shape(),
            want.dtype(),
            want.shape()
        ));
    }
    if got.dtype() == DType::String {
        return match got
            .strings()
            .iter()
            .zip(want.strings())
            .position(|(a, b)| a != b)
        {
            None => Ok(()),
            Some(i) => Err(format!(
                "element {i}: got {:?}, want {:?}",
                got.strings()[i],
                want.strings()[i]
            )),
        };
    }
    if !got.dtype().is_float() {
        // Integers, bool and the 8-, 4- and 2-bit codes: exact.
        return match got
            .bytes()
            .iter()
            .zip(want.bytes())
            .position(|(a, b)| a != b)
        {
            None => Ok(()),
            Some(i) => Err(format!(
                "element {i}: got byte {:#x}, want {:#x}",
                got.bytes()[i],
                want.bytes()[i]
            )),
        };
    }
    let (g, w) = (to_f64s(got)?, to_f64s(want)?);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let ok = (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= ATOL + RTOL * b.abs();
        if !ok {
            return Err(format!("element {i}: got {a}, want {b}"));
        }
    }
    Ok(())
}

/// One decoded single-node case.
struct Case {
    spec: NodeSpec,
    /// The node's input names; empty for an omitted optional input.
    inputs: Vec<String>,
    outputs: Vec<String>,
    graph_inputs: Vec<String>,
    graph_outputs: Vec<String>,
    initializers: HashMap<String, HostTensor>,
}

/// The default domain's two spellings as one.
fn domain_name(d: String) -> String {
    if d == "ai.onnx" {
        String::new()
    } else {
        d
    }
}

fn decode_model(model: &[u8]) -> Result<Case, String> {
    let mut graph = None;
    let mut opsets: HashMap<String, i32> = HashMap::new();
    for (f, v) in fields(model)? {
        match (f, v) {
            (7, Val::Bytes(b)) => graph = Some(b),
            (8, Val::Bytes(b)) => {
                let (mut domain, mut version) = (String::new(), 0);
                for (f, v) in fields(b)? {
                    match (f, v) {
                        (1, v) => domain = string(&v),
                        (2, Val::Varint(x)) => version = x as i32,
                        _ => {}
                    }
                }
                opsets.insert(domain_name(domain), version);
            }
            _ => {}
        }
    }
    let graph = graph.ok_or("no graph")?;
    let value_name = |b: &[u8]| -> Result<String, String> {
        Ok(fields(b)?
            .iter()
            .find(|(f, _)| *f == 1)
            .map(|(_, v)| string(v))
            .unwrap_or_default())
    };
    let (mut nodes, mut graph_inputs, mut graph_outputs) = (Vec::new(), Vec::new(), Vec::new());
    let mut initializers = HashMap::new();
    for (f, v) in fields(graph)? {
        let Val::Bytes(b) = v else { continue };
        match f {
            1 => nodes.push(b),
            5 => {
                let (n, t) = tensor(b)?;
                initializers.insert(n, t);
            }
            11 => graph_inputs.push(value_name(b)?),
            12 => graph_outputs.push(value_name(b)?),
            _ => {}
        }
    }
    // A multi-node graph is a function expansion; running only its first node would compare
    // against the wrong outputs.
    let [node] = nodes[..] else {
        return Err(format!("{} nodes", nodes.len()));
    };
    let (mut inputs, mut outputs, mut op, mut domain, mut attrs) = (
        Vec::new(),
        Vec::new(),
        String::new(),
        String::new(),
        Vec::new(),
    );
    for (f, v) in fields(node)? {
        match f {
            1 => inputs.push(string(&v)),
            2 => outputs.push(string(&v)),
            4 => op = string(&v),
            5 => {
                if let Val::Bytes(b) = v {
                    attrs.push(attribute(b)?);
                }
            }
            7 => domain = string(&v),
            _ => {}
        }
    }
    let domain = domain_name(domain);
    let opset = *opsets
        .get(&domain)
        .ok_or(format!("no opset for domain {domain:?}"))?;
    let mut spec = NodeSpec::onnx(&op, opset)
        .domain(&domain)
        .outputs(outputs.len());
    for (n, v) in attrs {
        spec = spec.attr(&n, v);
    }
    Ok(Case {
        spec,
        inputs,
        outputs,
        graph_inputs,
        graph_outputs,
        initializers,
    })
}

fn read_tensor(path: &Path) -> Result<HostTensor, String> {
    let b = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(tensor(&b)?.1)
}

/// Runs every data set of the case in `dir`, each kernel given the BLAS backend `blas`
/// returns; `Err` describes the first mismatch.
fn run_case<F: KernelFactory + Clone>(dir: &Path, factory: &F, blas: Blas) -> Result<(), String> {
    let model = std::fs::read(dir.join("model.onnx")).map_err(|e| e.to_string())?;
    let case = decode_model(&model)?;
    let mut sets: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    sets.sort();
    for set in sets {
        let mut fed = HashMap::new();
        for (k, name) in case.graph_inputs.iter().enumerate() {
            let p = set.join(format!("input_{k}.pb"));
            // Graph inputs backed by an initializer may have no data file.
            if p.exists() {
                fed.insert(name.as_str(), read_tensor(&p)?);
            }
        }
        let inputs = case
            .inputs
            .iter()
            .map(|n| match n.as_str() {
                "" => Ok(None),
                n => fed
                    .get(n)
                    .or_else(|| case.initializers.get(n))
                    .map(Some)
                    .ok_or(format!("no value for input {n}")),
            })
            .collect::<Result<Vec<_>, String>>()?;
        let got = run_kernel_opt(factory.clone(), &case.spec, &inputs, blas())
            .map_err(|e| format!("kernel error: {}", e.message))?;
        for (k, name) in case.graph_outputs.iter().enumerate() {
            let want = read_tensor(&set.join(format!("output_{k}.pb")))?;
            let pos = case
                .outputs
                .iter()
                .position(|o| o == name)
                .ok_or(format!("output {name} not in node"))?;
            close(&got[pos], &want).map_err(|e| format!("output {k} ({name}): {e}"))?;
        }
    }
    Ok(())
}

/// The suite's `node` folder, or `None` (after saying so) when the sweep should be skipped.
fn suite() -> Option<PathBuf> {
    let Some(root) = std::env::var_os("OPREG_ONNX_NODE_TESTS") else {
        if std::env::var_os("CI").is_some() {
            panic!(
                "OPREG_ONNX_NODE_TESTS is not set: on CI the ONNX node test cases must run \
                 (point it at the folder that contains node/)"
            );
        }
        eprintln!("ONNX node test cases skipped: set OPREG_ONNX_NODE_TESTS");
        return None;
    };
    let node = PathBuf::from(root).join("node");
    // A set but wrong path would otherwise pass with zero cases run.
    assert!(
        node.is_dir(),
        "OPREG_ONNX_NODE_TESTS: {} is not a folder",
        node.display()
    );
    Some(node)
}

/// Runs `factory` on every non-expanded case whose name starts with one of `prefixes`, then
/// panics listing the failures. The kernels get no BLAS backend; see [`run_cases_with`].
pub(crate) fn run_cases<F: KernelFactory + Clone>(prefixes: &[&str], factory: F) {
    run_cases_with(prefixes, factory, || None);
}

/// A BLAS backend for each kernel run (`None`: none).
pub(crate) type Blas = fn() -> Option<Box<dyn opreg_sdk::blas::Blas>>;

/// [`run_cases`] with every kernel run given the BLAS backend `blas` returns (the gemm-based
/// kernels: MatMul, Conv, Einsum).
pub(crate) fn run_cases_with<F: KernelFactory + Clone>(prefixes: &[&str], factory: F, blas: Blas) {
    sweep(prefixes, 1, factory, blas);
}

/// [`run_cases`], also failing when fewer than `min_cases` cases match (a renamed or
/// dropped case would otherwise go unnoticed).
pub(crate) fn run_cases_min<F: KernelFactory + Clone>(
    prefixes: &[&str],
    min_cases: usize,
    factory: F,
) {
    sweep(prefixes, min_cases, factory, || None);
}

fn sweep<F: KernelFactory + Clone>(prefixes: &[&str], min_cases: usize, factory: F, blas: Blas) {
    let Some(root) = suite() else { return };
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .expect("read the node test folder")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| prefixes.iter().any(|p| n.starts_with(p)) && !n.contains("_expanded"))
        .collect();
    names.sort();
    let failures: Vec<String> = names
        .iter()
        .filter_map(|n| {
            run_case(&root.join(n), &factory, blas)
                .err()
                .map(|e| format!("{n}: {e}"))
        })
        .collect();
    eprintln!(
        "{}: {} of {} conformance cases pass",
        prefixes.join(", "),
        names.len() - failures.len(),
        names.len()
    );
    assert!(!names.is_empty(), "no cases match {prefixes:?}");
    assert!(
        names.len() >= min_cases,
        "{prefixes:?}: only {} cases, want at least {min_cases}",
        names.len()
    );
    assert!(
        failures.is_empty(),
        "failed cases:\n{}",
        failures.join("\n")
    );
}
