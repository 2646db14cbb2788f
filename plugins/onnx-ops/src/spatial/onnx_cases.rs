//! Test helper: runs the official ONNX node test cases (`model.onnx` + `test_data_set_*`)
//! through a kernel factory, with the conformance runner's tolerances. The cases come from
//! `OPREG_ONNX_NODE_TESTS` or `/work/main/target/onnx-node-tests/node`; when neither exists
//! the check is skipped (the hand-written tests still run).

use opreg_sdk::{
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

struct Reader<'a> {
    b: &'a [u8],
    p: usize,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Self {
        Reader { b, p: 0 }
    }

    fn varint(&mut self) -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        while self.p < self.b.len() {
            let byte = self.b[self.p];
            self.p += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        v
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let s = &self.b[self.p..self.p + n];
        self.p += n;
        s
    }

    fn next(&mut self) -> Option<(u64, Val<'a>)> {
        if self.p >= self.b.len() {
            return None;
        }
        let key = self.varint();
        let val = match key & 7 {
            0 => Val::Varint(self.varint()),
            1 => Val::Fixed64(u64::from_le_bytes(self.take(8).try_into().expect("8"))),
            2 => {
                let n = self.varint() as usize;
                Val::Bytes(self.take(n))
            }
            5 => Val::Fixed32(u32::from_le_bytes(self.take(4).try_into().expect("4"))),
            w => panic!("wire type {w}"),
        };
        Some((key >> 3, val))
    }
}

fn fields(b: &[u8]) -> Vec<(u64, Val<'_>)> {
    let mut r = Reader::new(b);
    std::iter::from_fn(|| r.next()).collect()
}

fn string(v: &Val<'_>) -> String {
    match v {
        Val::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        _ => String::new(),
    }
}

/// Repeated varints, packed or not.
fn push_varints(v: &Val<'_>, out: &mut Vec<u64>) {
    match v {
        Val::Varint(x) => out.push(*x),
        Val::Bytes(b) => {
            let mut r = Reader::new(b);
            while r.p < b.len() {
                out.push(r.varint());
            }
        }
        _ => {}
    }
}

fn push_fixed32(v: &Val<'_>, out: &mut Vec<u32>) {
    match v {
        Val::Fixed32(x) => out.push(*x),
        Val::Bytes(b) => out.extend(
            b.chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4"))),
        ),
        _ => {}
    }
}

fn push_fixed64(v: &Val<'_>, out: &mut Vec<u64>) {
    match v {
        Val::Fixed64(x) => out.push(*x),
        Val::Bytes(b) => out.extend(
            b.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8"))),
        ),
        _ => {}
    }
}

/// A `TensorProto` as a host tensor, with its name.
fn tensor(b: &[u8]) -> (String, HostTensor) {
    let (mut dims, mut code, mut name) = (Vec::new(), 0u64, String::new());
    let (mut raw, mut f32s, mut i32s, mut i64s, mut f64s) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (f, v) in fields(b) {
        match f {
            1 => push_varints(&v, &mut dims),
            2 => {
                if let Val::Varint(x) = v {
                    code = x;
                }
            }
            4 => push_fixed32(&v, &mut f32s),
            5 => push_varints(&v, &mut i32s),
            7 => push_varints(&v, &mut i64s),
            8 => name = string(&v),
            9 => {
                if let Val::Bytes(b) = v {
                    raw = b.to_vec();
                }
            }
            10 => push_fixed64(&v, &mut f64s),
            11 => push_varints(&v, &mut i64s),
            _ => {}
        }
    }
    let dtype = DType::from_onnx_code(code as i32).expect("supported element type");
    let shape: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
    let size = dtype.size();
    let numel: usize = shape.iter().product();
    let bytes = if !raw.is_empty() || numel == 0 {
        raw
    } else if !f32s.is_empty() {
        f32s.iter().flat_map(|v| v.to_le_bytes()).collect()
    } else if !f64s.is_empty() {
        f64s.iter().flat_map(|v| v.to_le_bytes()).collect()
    } else if matches!(dtype, DType::I64 | DType::U64) {
        i64s.iter().flat_map(|v| v.to_le_bytes()).collect()
    } else {
        i32s.iter()
            .flat_map(|&v| (v as u32).to_le_bytes().into_iter().take(size))
            .collect()
    };
    (
        name,
        HostTensor::from_bytes(dtype, &shape, &bytes).expect("tensor bytes"),
    )
}

fn attribute(b: &[u8]) -> (String, AttrValue) {
    let (mut name, mut ty) = (String::new(), 0u64);
    let (mut f, mut i, mut s) = (0f32, 0i64, String::new());
    let (mut floats, mut ints, mut strings) = (Vec::new(), Vec::new(), Vec::new());
    for (field, v) in fields(b) {
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
            7 => push_fixed32(&v, &mut floats),
            8 => push_varints(&v, &mut ints),
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
        6 => AttrValue::Floats(floats.iter().map(|&x| f32::from_bits(x)).collect()),
        7 => AttrValue::Ints(ints.iter().map(|&x| x as i64).collect()),
        8 => AttrValue::Strings(strings.into_iter().map(Into::into).collect()),
        t => panic!("attribute {name}: type {t} not handled"),
    };
    (name, value)
}

fn to_f64s(t: &HostTensor) -> Vec<f64> {
    use opreg_sdk::half::{bf16, f16};
    match t.dtype() {
        DType::F32 => t
            .to_vec::<f32>()
            .expect("f32")
            .iter()
            .map(|&v| v as f64)
            .collect(),
        DType::F64 => t.to_vec::<f64>().expect("f64"),
        DType::F16 => t
            .to_vec::<f16>()
            .expect("f16")
            .iter()
            .map(|v| v.to_f64())
            .collect(),
        DType::BF16 => t
            .to_vec::<bf16>()
            .expect("bf16")
            .iter()
            .map(|v| v.to_f64())
            .collect(),
        DType::U8 => t
            .to_vec::<u8>()
            .expect("u8")
            .iter()
            .map(|&v| v as f64)
            .collect(),
        DType::I8 => t
            .to_vec::<i8>()
            .expect("i8")
            .iter()
            .map(|&v| v as f64)
            .collect(),
        DType::I32 => t
            .to_vec::<i32>()
            .expect("i32")
            .iter()
            .map(|&v| v as f64)
            .collect(),
        DType::I64 => t
            .to_vec::<i64>()
            .expect("i64")
            .iter()
            .map(|&v| v as f64)
            .collect(),
        DType::I16 => ints::<i16>(t),
        DType::U16 => ints::<u16>(t),
        DType::U32 => ints::<u32>(t),
        DType::U64 => ints::<u64>(t),
        DType::Bool => t.bytes().iter().map(|&v| v as f64).collect(),
        other => panic!("compare {other}"),
    }
}

fn ints<T: opreg_sdk::Element + Into<i128>>(t: &HostTensor) -> Vec<f64> {
    let v = t.to_vec::<T>().expect("ints");
    v.into_iter().map(|x| x.into() as f64).collect()
}

fn cases_root() -> Option<PathBuf> {
    let root = std::env::var_os("OPREG_ONNX_NODE_TESTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/work/main/target/onnx-node-tests/node"));
    // Either the suite's root (holding `node/`) or its `node` folder itself.
    let node = root.join("node");
    if node.is_dir() {
        return Some(node);
    }
    root.is_dir().then_some(root)
}

/// Runs one case directory; `Err` describes the first mismatch.
fn run_case<F>(dir: &std::path::Path, factory: &F, blas: Blas) -> Result<(), String>
where
    F: Fn(&NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> + Clone + Send + Sync + 'static,
{
    let model = std::fs::read(dir.join("model.onnx")).map_err(|e| e.to_string())?;
    let (mut graph, mut opset) = (None, 0i32);
    for (f, v) in fields(&model) {
        match (f, v) {
            (7, Val::Bytes(b)) => graph = Some(b),
            (8, Val::Bytes(b)) => {
                let (mut domain, mut version) = (String::new(), 0);
                for (f, v) in fields(b) {
                    match (f, v) {
                        (1, v) => domain = string(&v),
                        (2, Val::Varint(x)) => version = x as i32,
                        _ => {}
                    }
                }
                if domain.is_empty() || domain == "ai.onnx" {
                    opset = version;
                }
            }
            _ => {}
        }
    }
    let graph = graph.ok_or("no graph")?;
    let (mut nodes, mut graph_inputs, mut graph_outputs) = (Vec::new(), Vec::new(), Vec::new());
    let mut values: HashMap<String, HostTensor> = HashMap::new();
    for (f, v) in fields(graph) {
        let Val::Bytes(b) = v else { continue };
        let name = || {
            fields(b)
                .iter()
                .find(|(f, _)| *f == 1)
                .map(|(_, v)| string(v))
                .unwrap_or_default()
        };
        match f {
            1 => nodes.push(b),
            5 => {
                let (n, t) = tensor(b);
                values.insert(n, t);
            }
            11 => graph_inputs.push(name()),
            12 => graph_outputs.push(name()),
            _ => {}
        }
    }
    if nodes.len() != 1 {
        return Err(format!("{} nodes", nodes.len()));
    }
    let (mut ins, mut outs, mut op, mut attrs) = (Vec::new(), Vec::new(), String::new(), vec![]);
    for (f, v) in fields(nodes[0]) {
        match f {
            1 => ins.push(string(&v)),
            2 => outs.push(string(&v)),
            4 => op = string(&v),
            5 => {
                if let Val::Bytes(b) = v {
                    attrs.push(attribute(b));
                }
            }
            _ => {}
        }
    }
    let mut spec = NodeSpec::onnx(&op, opset).outputs(outs.len());
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
        let mut values = std::mem::take(&mut values);
        for (k, name) in graph_inputs.iter().enumerate() {
            let p = set.join(format!("input_{k}.pb"));
            if let Ok(b) = std::fs::read(&p) {
                values.insert(name.clone(), tensor(&b).1);
            }
        }
        let inputs: Vec<Option<&HostTensor>> = ins
            .iter()
            .map(|n| if n.is_empty() { None } else { values.get(n) })
            .collect();
        let got = run_kernel_opt(factory.clone(), &spec, &inputs, blas())
            .map_err(|e| format!("kernel error: {}", e.message))?;
        for (k, name) in graph_outputs.iter().enumerate() {
            let b = std::fs::read(set.join(format!("output_{k}.pb"))).map_err(|e| e.to_string())?;
            let want = tensor(&b).1;
            let pos = outs
                .iter()
                .position(|o| o == name)
                .ok_or("output not in node")?;
            let g = &got[pos];
            if g.dtype() != want.dtype() || g.shape() != want.shape() {
                return Err(format!(
                    "output {k}: got {} {:?}, want {} {:?}",
                    g.dtype(),
                    g.shape(),
                    want.dtype(),
                    want.shape()
                ));
            }
            let (gv, wv) = (to_f64s(g), to_f64s(&want));
            for (i, (a, b)) in gv.iter().zip(&wv).enumerate() {
                let ok =
                    (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= ATOL + RTOL * b.abs();
                if !ok {
                    return Err(format!("output {k}[{i}]: got {a}, want {b}"));
                }
            }
        }
    }
    Ok(())
}

/// Runs every non-expanded case whose name starts with one of `prefixes`; panics listing the
/// failures.
pub(crate) fn run_cases<F>(prefixes: &[&str], factory: F)
where
    F: Fn(&NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> + Clone + Send + Sync + 'static,
{
    run_cases_with(prefixes, factory, || None)
}

/// A BLAS backend for each kernel run.
pub(crate) type Blas = fn() -> Option<Box<dyn opreg_sdk::blas::Blas>>;

/// [`run_cases`] with the kernels given the BLAS backend `blas` returns.
pub(crate) fn run_cases_with<F>(prefixes: &[&str], factory: F, blas: Blas)
where
    F: Fn(&NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> + Clone + Send + Sync + 'static,
{
    let Some(root) = cases_root() else {
        eprintln!("ONNX node test cases not found: skipped");
        return;
    };
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .expect("read cases")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| prefixes.iter().any(|p| n.starts_with(p)) && !n.contains("_expanded"))
        .collect();
    names.sort();
    let mut failures = Vec::new();
    for n in &names {
        if let Err(e) = run_case(&root.join(n), &factory, blas) {
            failures.push(format!("{n}: {e}"));
        }
    }
    eprintln!("{} cases, {} failed", names.len(), failures.len());
    assert!(
        failures.is_empty(),
        "failed cases:\n{}",
        failures.join("\n")
    );
}
