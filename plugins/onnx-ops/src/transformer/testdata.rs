//! Test-only: runs a kernel on an official ONNX node test case (model.onnx + test_data_set_0),
//! decoding the protobufs by hand. Cases come from `$OPREG_ONNX_NODE_TESTS/node` (default: the
//! main checkout's generated suite); a missing suite skips the check.

use opreg_sdk::{
    host::HostTensor,
    prelude::*,
    testkit::{run_kernel_opt, NodeSpec},
};
use std::path::PathBuf;

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

enum Val<'a> {
    Int(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// The fields of one protobuf message, in order.
fn fields(buf: &[u8]) -> Result<Vec<(u64, Val<'_>)>, String> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        let val = match key & 7 {
            0 => Val::Int(varint(buf, &mut pos)?),
            1 => {
                pos += 8;
                Val::Int(0)
            }
            2 => {
                let len = varint(buf, &mut pos)? as usize;
                let b = buf.get(pos..pos + len).ok_or("truncated bytes")?;
                pos += len;
                Val::Bytes(b)
            }
            5 => {
                let b = buf.get(pos..pos + 4).ok_or("truncated fixed32")?;
                pos += 4;
                Val::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            w => return Err(format!("wire type {w}")),
        };
        out.push((key >> 3, val));
    }
    Ok(out)
}

/// Repeated varint field values (packed or not).
fn ints(v: &Val<'_>) -> Result<Vec<u64>, String> {
    match v {
        Val::Int(i) => Ok(vec![*i]),
        Val::Bytes(b) => {
            let mut pos = 0;
            let mut out = Vec::new();
            while pos < b.len() {
                out.push(varint(b, &mut pos)?);
            }
            Ok(out)
        }
        Val::Fixed32(_) => Err("fixed32 where varint expected".into()),
    }
}

fn floats(v: &Val<'_>) -> Vec<f32> {
    match v {
        Val::Fixed32(x) => vec![f32::from_bits(*x)],
        Val::Bytes(b) => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Val::Int(_) => vec![],
    }
}

fn string(v: &Val<'_>) -> String {
    match v {
        Val::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        _ => String::new(),
    }
}

/// Decodes a TensorProto.
pub fn tensor(buf: &[u8]) -> Result<HostTensor, String> {
    let mut dims = Vec::new();
    let mut code = 0i32;
    let mut raw: Option<&[u8]> = None;
    let (mut f32s, mut i32s, mut i64s, mut f64s) = (vec![], vec![], vec![], vec![]);
    for (f, v) in fields(buf)? {
        match f {
            1 => dims.extend(ints(&v)?.into_iter().map(|d| d as usize)),
            2 => code = ints(&v)?[0] as i32,
            4 => f32s.extend(floats(&v)),
            5 => i32s.extend(ints(&v)?),
            7 => i64s.extend(ints(&v)?),
            9 => raw = if let Val::Bytes(b) = v { Some(b) } else { None },
            10 => {
                if let Val::Bytes(b) = v {
                    f64s.extend(b.chunks_exact(8).map(|c| {
                        f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
                    }));
                }
            }
            _ => {}
        }
    }
    let dtype = DType::from_onnx_code(code).ok_or(format!("onnx type {code}"))?;
    if let Some(bits) = dtype.packed_bits() {
        // Sub-byte types: packed low bits first (in raw_data, or one byte per int32_data
        // entry); held unpacked, signed ones sign-extended.
        let packed: Vec<u8> = match raw {
            Some(r) => r.to_vec(),
            None => i32s.iter().map(|&x| x as u8).collect(),
        };
        let n: usize = dims.iter().product();
        let per = (8 / bits) as usize;
        let signed = matches!(dtype, DType::I4 | DType::I2);
        let bytes: Vec<u8> = (0..n)
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
        return HostTensor::from_bytes(dtype, &dims, &bytes).map_err(|e| e.message.to_string());
    }
    let bytes: Vec<u8> = if let Some(r) = raw {
        r.to_vec()
    } else {
        match dtype {
            DType::F32 => f32s.iter().flat_map(|x| x.to_le_bytes()).collect(),
            DType::F64 => f64s.iter().flat_map(|x| x.to_le_bytes()).collect(),
            DType::I64 => i64s
                .iter()
                .flat_map(|&x| (x as i64).to_le_bytes())
                .collect(),
            DType::I32 => i32s
                .iter()
                .flat_map(|&x| (x as i32).to_le_bytes())
                .collect(),
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => i32s
                .iter()
                .flat_map(|&x| (x as u16).to_le_bytes())
                .collect(),
            DType::Bool | DType::U8 | DType::I8 => i32s.iter().map(|&x| x as u8).collect(),
            d if d.size() == 1 => i32s.iter().map(|&x| x as u8).collect(),
            other => return Err(format!("no decoder for {other}")),
        }
    };
    HostTensor::from_bytes(dtype, &dims, &bytes).map_err(|e| e.message.to_string())
}

fn attribute(buf: &[u8]) -> Result<(String, AttrValue), String> {
    let (mut name, mut ty) = (String::new(), 0);
    let (mut f, mut i, mut s) = (0.0f32, 0i64, String::new());
    let (mut is, mut fs) = (Vec::<i64>::new(), Vec::<f32>::new());
    for (k, v) in fields(buf)? {
        match k {
            1 => name = string(&v),
            2 => f = floats(&v).first().copied().unwrap_or(0.0),
            3 => i = ints(&v)?[0] as i64,
            4 => s = string(&v),
            7 => fs.extend(floats(&v)),
            8 => is.extend(ints(&v)?.into_iter().map(|x| x as i64)),
            20 => ty = ints(&v)?[0],
            _ => {}
        }
    }
    let value = match ty {
        1 => AttrValue::Float(f),
        2 => AttrValue::Int(i),
        3 => AttrValue::String(s.as_str().into()),
        6 => AttrValue::Floats(fs.into()),
        7 => AttrValue::Ints(is.into()),
        t => return Err(format!("attribute {name}: type {t}")),
    };
    Ok((name, value))
}

/// The suite's `node` folder, if present.
pub fn suite() -> Option<PathBuf> {
    let root = std::env::var_os("OPREG_ONNX_NODE_TESTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/work/main/target/onnx-node-tests"));
    let node = root.join("node");
    node.is_dir().then_some(node)
}

/// Names of the (non-expanded) cases starting with `prefix`.
pub fn cases(prefix: &str) -> Vec<String> {
    let Some(dir) = suite() else { return vec![] };
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix) && !n.contains("_expanded"))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn close(got: &HostTensor, want: &HostTensor) -> Result<(), String> {
    if got.shape() != want.shape() || got.dtype() != want.dtype() {
        return Err(format!(
            "got {} {:?}, want {} {:?}",
            got.dtype(),
            got.shape(),
            want.dtype(),
            want.shape()
        ));
    }
    if !got.dtype().is_float() {
        // Integers, bool and the low-bit codes: exact.
        let bytes = |t: &HostTensor| t.view().as_bytes().map(<[u8]>::to_vec);
        let (g, w) = (bytes(got), bytes(want));
        return match (g, w) {
            (Ok(g), Ok(w)) if g == w => Ok(()),
            (Ok(g), Ok(w)) => {
                let i = g.iter().zip(&w).position(|(a, b)| a != b).unwrap_or(0);
                Err(format!(
                    "element {i}: got byte {:#x}, want {:#x}",
                    g[i], w[i]
                ))
            }
            (Err(e), _) | (_, Err(e)) => Err(e.message.to_string()),
        };
    }
    let as_f32 = |t: &HostTensor| -> Result<Vec<f32>, String> {
        crate::transformer::read_f32(&t.view(), "out").map_err(|e| e.message.to_string())
    };
    let (g, w) = (as_f32(got)?, as_f32(want)?);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let ok = (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= 1e-7 + 1e-3 * b.abs();
        if !ok {
            return Err(format!("element {i}: got {a}, want {b}"));
        }
    }
    Ok(())
}

/// Runs `factory` on case `name` and compares every output.
pub fn run_case<F: KernelFactory + Clone>(name: &str, factory: F) -> Result<(), String> {
    let dir = suite().ok_or("no suite")?.join(name);
    let model = std::fs::read(dir.join("model.onnx")).map_err(|e| e.to_string())?;
    let mut opset = 0;
    let mut graph: &[u8] = &[];
    let mfields = fields(&model)?;
    for (k, v) in &mfields {
        match (k, v) {
            (7, Val::Bytes(b)) => graph = b,
            (8, Val::Bytes(b)) => {
                let mut domain = String::new();
                let mut ver = 0;
                for (k2, v2) in fields(b)? {
                    match k2 {
                        1 => domain = string(&v2),
                        2 => ver = ints(&v2)?[0] as i32,
                        _ => {}
                    }
                }
                if domain.is_empty() || domain == "ai.onnx" {
                    opset = ver;
                }
            }
            _ => {}
        }
    }
    let (mut node, mut graph_inputs, mut graph_outputs) = (None, vec![], vec![]);
    let value_name = |b: &[u8]| -> Result<String, String> {
        Ok(fields(b)?
            .iter()
            .find(|(k, _)| *k == 1)
            .map(|(_, v)| string(v))
            .unwrap_or_default())
    };
    for (k, v) in fields(graph)? {
        match (k, v) {
            (1, Val::Bytes(b)) if node.is_none() => node = Some(b),
            (11, Val::Bytes(b)) => graph_inputs.push(value_name(b)?),
            (12, Val::Bytes(b)) => graph_outputs.push(value_name(b)?),
            _ => {}
        }
    }
    let node = node.ok_or("no node")?;
    let (mut op_type, mut ins, mut outs, mut attrs) = (String::new(), vec![], vec![], vec![]);
    for (k, v) in fields(node)? {
        match k {
            1 => ins.push(string(&v)),
            2 => outs.push(string(&v)),
            4 => op_type = string(&v),
            5 => {
                if let Val::Bytes(b) = v {
                    attrs.push(attribute(b)?);
                }
            }
            _ => {}
        }
    }
    let data = dir.join("test_data_set_0");
    let load = |kind: &str, i: usize| -> Result<HostTensor, String> {
        let b = std::fs::read(data.join(format!("{kind}_{i}.pb"))).map_err(|e| e.to_string())?;
        tensor(&b)
    };
    let mut inputs = Vec::new();
    for n in &ins {
        if n.is_empty() {
            inputs.push(None);
        } else {
            let i = graph_inputs
                .iter()
                .position(|g| g == n)
                .ok_or(format!("input {n}"))?;
            inputs.push(Some(load("input", i)?));
        }
    }
    let mut spec = NodeSpec::onnx(&op_type, opset).outputs(outs.len());
    for (n, v) in attrs {
        spec = spec.attr(&n, v);
    }
    let refs: Vec<Option<&HostTensor>> = inputs.iter().map(|t| t.as_ref()).collect();
    let got = run_kernel_opt(factory, &spec, &refs, None).map_err(|e| e.message.to_string())?;
    for (i, n) in outs.iter().enumerate() {
        if n.is_empty() {
            continue;
        }
        let gi = graph_outputs
            .iter()
            .position(|g| g == n)
            .ok_or(format!("output {n}"))?;
        close(&got[i], &load("output", gi)?).map_err(|e| format!("output {i} ({n}): {e}"))?;
    }
    Ok(())
}

/// Runs every case starting with `prefix`; returns the failures.
pub fn sweep<F: KernelFactory + Clone>(prefix: &str, factory: F) -> (usize, Vec<String>) {
    let all = cases(prefix);
    let failures = all
        .iter()
        .filter_map(|c| {
            run_case(c, factory.clone())
                .err()
                .map(|e| format!("{c}: {e}"))
        })
        .collect();
    (all.len(), failures)
}
