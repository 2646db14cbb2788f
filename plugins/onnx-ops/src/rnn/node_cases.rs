//! Test-only: runs official ONNX node test cases (`model.onnx` + `test_data_set_*`) through a
//! kernel factory, decoding the protobufs by hand. Unlike the other families' helpers this one
//! reads string tensors, `STRINGS` / `TENSOR` attributes and non-default domains (the text and
//! `ai.onnx.ml` operators need them). Cases come from `$OPREG_ONNX_NODE_TESTS/node` (or the
//! variable itself when it names the `node` folder; default: the main checkout's suite); a
//! missing suite skips the check.

use opreg_sdk::{
    abi_stable::std_types::RString,
    host::HostTensor,
    prelude::*,
    testkit::{run_kernel_opt, NodeSpec},
};
use std::{collections::HashMap, path::PathBuf};

const RTOL: f64 = 1e-3;
const ATOL: f64 = 1e-7;

enum Val<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

fn varint(b: &[u8], p: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*p).ok_or("truncated varint")?;
        *p += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint too long".into())
}

fn fields(b: &[u8]) -> Result<Vec<(u64, Val<'_>)>, String> {
    let mut p = 0;
    let mut out = Vec::new();
    while p < b.len() {
        let key = varint(b, &mut p)?;
        let mut take = |n: usize| -> Result<&[u8], String> {
            let s = b.get(p..p + n).ok_or("truncated field")?;
            p += n;
            Ok(s)
        };
        let val = match key & 7 {
            0 => Val::Varint(varint(b, &mut p)?),
            1 => Val::Fixed64(u64::from_le_bytes(
                take(8)?.try_into().map_err(|_| "fixed64")?,
            )),
            2 => {
                let n = varint(b, &mut p)? as usize;
                let s = b.get(p..p + n).ok_or("truncated bytes")?;
                p += n;
                Val::Bytes(s)
            }
            5 => Val::Fixed32(u32::from_le_bytes(
                take(4)?.try_into().map_err(|_| "fixed32")?,
            )),
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

fn push_varints(v: &Val<'_>, out: &mut Vec<u64>) -> Result<(), String> {
    match v {
        Val::Varint(x) => out.push(*x),
        Val::Bytes(b) => {
            let mut p = 0;
            while p < b.len() {
                out.push(varint(b, &mut p)?);
            }
        }
        _ => return Err("expected varints".into()),
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
        Val::Bytes(b) => out.extend(b.chunks_exact(8).map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_le_bytes(a)
        })),
        _ => {}
    }
}

/// A `TensorProto`: its name, dtype, shape, and bytes (or strings).
struct Proto {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    bytes: Vec<u8>,
    strings: Vec<Vec<u8>>,
}

fn proto(b: &[u8]) -> Result<Proto, String> {
    let (mut dims, mut code, mut name) = (Vec::new(), 0u64, String::new());
    let (mut raw, mut f32s, mut i32s, mut i64s, mut f64s, mut u64s, mut strings) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for (f, v) in fields(b)? {
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
                if let Val::Bytes(s) = v {
                    strings.push(s.to_vec());
                }
            }
            7 => push_varints(&v, &mut i64s)?,
            8 => name = string(&v),
            9 => {
                if let Val::Bytes(r) = v {
                    raw = r.to_vec();
                }
            }
            10 => push_fixed64(&v, &mut f64s),
            11 => push_varints(&v, &mut u64s)?,
            _ => {}
        }
    }
    let dtype = DType::from_onnx_code(code as i32).ok_or(format!("onnx type {code}"))?;
    let shape: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
    let size = dtype.size();
    let numel: usize = shape.iter().product();
    let bytes = if dtype == DType::String || !raw.is_empty() || numel == 0 {
        raw
    } else if !f32s.is_empty() {
        f32s.iter().flat_map(|v| v.to_le_bytes()).collect()
    } else if !f64s.is_empty() {
        f64s.iter().flat_map(|v| v.to_le_bytes()).collect()
    } else if !i64s.is_empty() {
        i64s.iter().flat_map(|v| v.to_le_bytes()).collect()
    } else if !u64s.is_empty() {
        u64s.iter().flat_map(|v| v.to_le_bytes()).collect()
    } else {
        i32s.iter()
            .flat_map(|&v| (v as u32).to_le_bytes().into_iter().take(size))
            .collect()
    };
    Ok(Proto {
        name,
        dtype,
        shape,
        bytes,
        strings,
    })
}

fn host(p: &Proto) -> Result<HostTensor, String> {
    if p.dtype == DType::String {
        let refs: Vec<&[u8]> = p.strings.iter().map(|s| s.as_slice()).collect();
        HostTensor::from_strings(&p.shape, &refs)
    } else {
        HostTensor::from_bytes(p.dtype, &p.shape, &p.bytes)
    }
    .map_err(|e| e.message.to_string())
}

fn owned(p: &Proto) -> OwnedTensor {
    OwnedTensor {
        dtype: p.dtype,
        shape: p.shape.clone().into(),
        data: p.bytes.clone().into(),
        strings: p
            .strings
            .iter()
            .map(|s| RString::from(String::from_utf8_lossy(s).into_owned()))
            .collect(),
    }
}

fn attribute(b: &[u8]) -> Result<(String, AttrValue), String> {
    let (mut name, mut ty) = (String::new(), 0u64);
    let (mut f, mut i, mut s, mut t) = (0f32, 0i64, String::new(), None);
    let (mut floats, mut ints, mut strings) = (Vec::new(), Vec::new(), Vec::new());
    for (field, v) in fields(b)? {
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
                    t = Some(owned(&proto(b)?));
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
        3 => AttrValue::String(s.into()),
        4 => AttrValue::Tensor(t.ok_or(format!("attribute {name}: no tensor"))?),
        6 => AttrValue::Floats(floats.iter().map(|&x| f32::from_bits(x)).collect()),
        7 => AttrValue::Ints(ints.iter().map(|&x| x as i64).collect()),
        8 => AttrValue::Strings(strings.into_iter().map(RString::from).collect()),
        t => return Err(format!("attribute {name}: type {t} not handled")),
    };
    Ok((name, value))
}

fn to_f64s(t: &HostTensor) -> Result<Vec<f64>, String> {
    let e = |e: PluginError| e.message.to_string();
    Ok(match t.dtype() {
        DType::F32 => t
            .to_vec::<f32>()
            .map_err(e)?
            .iter()
            .map(|&v| v as f64)
            .collect(),
        DType::F64 => t.to_vec::<f64>().map_err(e)?,
        DType::Bool | DType::U8 => t.bytes().iter().map(|&v| v as f64).collect(),
        DType::I8 => t
            .to_vec::<i8>()
            .map_err(e)?
            .iter()
            .map(|&v| v as f64)
            .collect(),
        DType::I16 => t
            .to_vec::<i16>()
            .map_err(e)?
            .iter()
            .map(|&v| v as f64)
            .collect(),
        DType::I32 => t
            .to_vec::<i32>()
            .map_err(e)?
            .iter()
            .map(|&v| v as f64)
            .collect(),
        DType::I64 => t
            .to_vec::<i64>()
            .map_err(e)?
            .iter()
            .map(|&v| v as f64)
            .collect(),
        DType::U64 => t
            .to_vec::<u64>()
            .map_err(e)?
            .iter()
            .map(|&v| v as f64)
            .collect(),
        other => return Err(format!("no comparison for {other}")),
    })
}

fn compare(got: &HostTensor, want: &HostTensor) -> Result<(), String> {
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
        for (i, (a, b)) in got.strings().iter().zip(want.strings()).enumerate() {
            if a != b {
                return Err(format!("[{i}]: got {a:?}, want {b:?}"));
            }
        }
        return Ok(());
    }
    let (g, w) = (to_f64s(got)?, to_f64s(want)?);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let ok = (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= ATOL + RTOL * b.abs();
        if !ok {
            return Err(format!("[{i}]: got {a}, want {b}"));
        }
    }
    Ok(())
}

fn suite() -> Option<PathBuf> {
    let root = std::env::var_os("OPREG_ONNX_NODE_TESTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/work/main/target/onnx-node-tests"));
    [root.join("node"), root].into_iter().find(|p| {
        p.is_dir()
            && std::fs::read_dir(p).is_ok_and(|mut rd| {
                rd.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("test_")))
            })
    })
}

/// Runs `factory` on the case folder `dir`, every data set; `Err` names the first mismatch.
fn run_case<F: KernelFactory + Clone>(dir: &std::path::Path, factory: F) -> Result<(), String> {
    let model = std::fs::read(dir.join("model.onnx")).map_err(|e| e.to_string())?;
    let mut graph: &[u8] = &[];
    let mut opsets: HashMap<String, i32> = HashMap::new();
    for (f, v) in fields(&model)? {
        match (f, v) {
            (7, Val::Bytes(b)) => graph = b,
            (8, Val::Bytes(b)) => {
                let (mut domain, mut version) = (String::new(), 0);
                for (f, v) in fields(b)? {
                    match (f, v) {
                        (1, v) => domain = string(&v),
                        (2, Val::Varint(x)) => version = x as i32,
                        _ => {}
                    }
                }
                if domain == "ai.onnx" {
                    domain.clear();
                }
                opsets.insert(domain, version);
            }
            _ => {}
        }
    }
    let (mut nodes, mut graph_inputs, mut graph_outputs) = (Vec::new(), Vec::new(), Vec::new());
    let mut init: HashMap<String, HostTensor> = HashMap::new();
    for (f, v) in fields(graph)? {
        let Val::Bytes(b) = v else { continue };
        let name = || -> Result<String, String> {
            Ok(fields(b)?
                .iter()
                .find(|(f, _)| *f == 1)
                .map(|(_, v)| string(v))
                .unwrap_or_default())
        };
        match f {
            1 => nodes.push(b),
            5 => {
                let p = proto(b)?;
                init.insert(p.name.clone(), host(&p)?);
            }
            11 => graph_inputs.push(name()?),
            12 => graph_outputs.push(name()?),
            _ => {}
        }
    }
    if nodes.len() != 1 {
        return Err(format!("{} nodes", nodes.len()));
    }
    let (mut ins, mut outs, mut op, mut domain, mut attrs) =
        (vec![], vec![], String::new(), String::new(), vec![]);
    for (f, v) in fields(nodes[0])? {
        match f {
            1 => ins.push(string(&v)),
            2 => outs.push(string(&v)),
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
    if domain == "ai.onnx" {
        domain.clear();
    }
    let opset = *opsets
        .get(&domain)
        .ok_or("no opset for the node's domain")?;
    let mut spec = NodeSpec::onnx(&op, opset)
        .domain(&domain)
        .outputs(outs.len());
    for (n, v) in attrs {
        spec = spec.attr(&n, v);
    }
    let mut sets: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    sets.sort();
    for set in sets {
        let mut values: HashMap<String, HostTensor> = HashMap::new();
        for (k, name) in graph_inputs.iter().enumerate() {
            if let Ok(b) = std::fs::read(set.join(format!("input_{k}.pb"))) {
                values.insert(name.clone(), host(&proto(&b)?)?);
            }
        }
        let inputs: Vec<Option<&HostTensor>> = ins
            .iter()
            .map(|n| {
                if n.is_empty() {
                    None
                } else {
                    values.get(n).or_else(|| init.get(n))
                }
            })
            .collect();
        let got = run_kernel_opt(factory.clone(), &spec, &inputs, None)
            .map_err(|e| format!("kernel error: {}", e.message))?;
        for (k, name) in graph_outputs.iter().enumerate() {
            let b = std::fs::read(set.join(format!("output_{k}.pb"))).map_err(|e| e.to_string())?;
            let want = host(&proto(&b)?)?;
            let pos = outs
                .iter()
                .position(|o| o == name)
                .ok_or("output not in node")?;
            compare(&got[pos], &want).map_err(|e| format!("output {pos} ({name}): {e}"))?;
        }
    }
    Ok(())
}

/// Runs every non-expanded case named `prefix*` for each prefix; returns how many ran and
/// the failures. Empty when the suite is missing.
pub(crate) fn sweep<F: KernelFactory + Clone>(
    prefixes: &[&str],
    factory: F,
) -> (usize, Vec<String>) {
    let Some(root) = suite() else {
        eprintln!("ONNX node test cases not found: skipped");
        return (0, vec![]);
    };
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| prefixes.iter().any(|p| n.starts_with(p)) && !n.ends_with("_expanded"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let failures = names
        .iter()
        .filter_map(|n| {
            run_case(&root.join(n), factory.clone())
                .err()
                .map(|e| format!("{n}: {e}"))
        })
        .collect();
    (names.len(), failures)
}

/// [`sweep`], asserting that every case passes and that at least `min_cases` ran when the
/// suite is present.
pub(crate) fn check<F: KernelFactory + Clone>(prefixes: &[&str], min_cases: usize, factory: F) {
    if suite().is_none() {
        eprintln!("ONNX node test cases not found: skipped");
        return;
    }
    let (n, failures) = sweep(prefixes, factory);
    eprintln!("{prefixes:?}: {n} cases, {} failed", failures.len());
    assert!(
        failures.is_empty(),
        "failed cases:\n{}",
        failures.join("\n")
    );
    assert!(n >= min_cases, "{prefixes:?}: only {n} cases found");
}
