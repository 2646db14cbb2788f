//! Calibration and held-out samples: from a folder, or from a request, checked against the
//! model's inputs before anything runs.
//!
//! A folder holds one sample per entry, read one at a time (memory does not grow with the
//! number of samples):
//! - `NAME.npy` directly in the folder: a batch of the model's only input; an optional
//!   `NAME.labels.npy` (int64 or int32, one label per batch row) gives the task labels;
//! - a subfolder: one file per input, `INPUT.npy` or an ONNX `TensorProto` (`*.pb`, matched by
//!   the tensor's name, else by position as in ONNX's `input_K.pb` test data sets), and an
//!   optional `labels.npy`.
//!
//! Entries are taken in name order.

// Model and request data reach this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use super::QuantError;
use crate::graph::{Dim, IoSpec};
use opreg_sdk::{host::HostTensor, DType};
use prost::Message;
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

/// One sample: a tensor per model input, and optional labels (one per batch row).
#[derive(Clone)]
pub struct Sample {
    /// Where it came from, for messages.
    pub origin: String,
    pub feeds: HashMap<String, Arc<HostTensor>>,
    pub labels: Option<Vec<i64>>,
}

/// The largest tensor file read (a sample is one batch, not a dataset).
const MAX_FILE_BYTES: u64 = 1 << 31;

/// The entries of a calibration folder, in name order.
pub fn entries(dir: &Path) -> Result<Vec<PathBuf>, QuantError> {
    let io = |source| QuantError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') {
                return false;
            }
            p.is_dir() || (name.ends_with(".npy") && !name.ends_with(".labels.npy"))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Reads the sample at `entry` (see the module doc) for a model with `inputs`.
pub fn read(entry: &Path, inputs: &[IoSpec]) -> Result<Sample, QuantError> {
    let origin = entry.display().to_string();
    let mut feeds = HashMap::new();
    let labels = if entry.is_dir() {
        let pbs = read_pbs(&entries_in(entry)?)?;
        for (k, spec) in inputs.iter().enumerate() {
            let npy = entry.join(format!("{}.npy", spec.name));
            let t = if npy.is_file() {
                read_npy(&npy)?
            } else {
                find_pb(entry, &pbs, &spec.name, k)?.ok_or_else(|| {
                    QuantError::Data(format!(
                        "{origin}: no tensor for input '{}' (expected {}.npy or a .pb TensorProto named so)",
                        spec.name, spec.name
                    ))
                })?
            };
            feeds.insert(spec.name.clone(), Arc::new(t));
        }
        let l = entry.join("labels.npy");
        l.is_file().then(|| read_labels(&l)).transpose()?
    } else {
        let [spec] = inputs else {
            return Err(QuantError::Data(format!(
                "{origin}: a single .npy file feeds a model with one input; this model has {} — give one subfolder per sample with one file per input",
                inputs.len()
            )));
        };
        feeds.insert(spec.name.clone(), Arc::new(read_npy(entry)?));
        let stem = entry.to_string_lossy();
        let l = PathBuf::from(format!(
            "{}.labels.npy",
            stem.strip_suffix(".npy").unwrap_or(&stem)
        ));
        l.is_file().then(|| read_labels(&l)).transpose()?
    };
    let sample = Sample {
        origin,
        feeds,
        labels,
    };
    check(&sample, inputs)?;
    Ok(sample)
}

fn entries_in(dir: &Path) -> Result<Vec<PathBuf>, QuantError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| QuantError::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "pb"))
        .collect();
    files.sort();
    Ok(files)
}

fn read_file(path: &Path) -> Result<Vec<u8>, QuantError> {
    let io = |source| QuantError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_FILE_BYTES {
        return Err(QuantError::Data(format!(
            "{}: {len} bytes, more than the {MAX_FILE_BYTES} a calibration file may have (split it into batches)",
            path.display()
        )));
    }
    std::fs::read(path).map_err(io)
}

/// A sample folder's `.pb` tensors, each decoded once: (file name, tensor name, proto).
fn read_pbs(
    files: &[PathBuf],
) -> Result<Vec<(String, opreg_proto::onnx::TensorProto)>, QuantError> {
    files
        .iter()
        .map(|f| {
            let bytes = read_file(f)?;
            let proto = opreg_proto::onnx::TensorProto::decode(bytes.as_slice()).map_err(|e| {
                QuantError::Data(format!("{}: not an ONNX TensorProto: {e}", f.display()))
            })?;
            let file = f
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            Ok((file, proto))
        })
        .collect()
}

/// The `.pb` tensor for input `name` (at position `k`): by the tensor's name, else
/// `input_K.pb`.
fn find_pb(
    dir: &Path,
    pbs: &[(String, opreg_proto::onnx::TensorProto)],
    name: &str,
    k: usize,
) -> Result<Option<HostTensor>, QuantError> {
    let positional = format!("input_{k}.pb");
    let found = pbs
        .iter()
        .find(|(_, p)| p.name == name)
        .or_else(|| pbs.iter().find(|(f, _)| *f == positional));
    found
        .map(|(file, proto)| {
            crate::graph::tensor_from_proto(proto, None)
                .map_err(|e| QuantError::Data(format!("{}: {e}", dir.join(file).display())))
        })
        .transpose()
}

/// An `.npy` array (C order) as a host tensor of the same element type.
pub fn read_npy(path: &Path) -> Result<HostTensor, QuantError> {
    let bytes = read_file(path)?;
    npy_tensor(&bytes).map_err(|reason| QuantError::Data(format!("{}: {reason}", path.display())))
}

/// Decodes `.npy` bytes.
pub fn npy_tensor(bytes: &[u8]) -> Result<HostTensor, String> {
    let npy = npyz::NpyFile::new(bytes).map_err(|e| format!("not a .npy file: {e}"))?;
    if npy.order() != npyz::Order::C {
        return Err("Fortran-order arrays are not read; save with np.ascontiguousarray".into());
    }
    let shape: Vec<usize> = npy
        .shape()
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("dimension {d} is too large")))
        .collect::<Result<_, _>>()?;
    let type_str = match npy.dtype() {
        npyz::DType::Plain(t) => t.to_string(),
        other => return Err(format!("dtype {other:?} is not a plain numeric type")),
    };
    let (dtype, width) = match type_str.trim_start_matches(['<', '|', '=']) {
        "f4" => (DType::F32, 4),
        "f8" => (DType::F64, 8),
        "f2" => (DType::F16, 2),
        "i8" => (DType::I64, 8),
        "i4" => (DType::I32, 4),
        "i1" => (DType::I8, 1),
        "u1" => (DType::U8, 1),
        "b1" => (DType::Bool, 1),
        other => {
            return Err(format!(
                "dtype '{other}' is not supported (f4, f8, f2, i8, i4, i1, u1, b1, little-endian)"
            ))
        }
    };
    // The header's shape must be backed by the file's bytes before anything is allocated.
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("the shape's element count overflows")?;
    let data_len = numel
        .checked_mul(width)
        .ok_or("the shape's size overflows")?;
    if data_len > bytes.len() {
        return Err(format!(
            "the header declares {numel} elements ({data_len} bytes) but the file has {} bytes",
            bytes.len()
        ));
    }
    let header_len = bytes.len() - data_len;
    let data = bytes.get(header_len..).ok_or("truncated")?;
    HostTensor::from_bytes(dtype, &shape, data).map_err(|e| e.to_string())
}

fn read_labels(path: &Path) -> Result<Vec<i64>, QuantError> {
    let t = read_npy(path)?;
    let bad = |why: &str| QuantError::Data(format!("{}: labels {why}", path.display()));
    if t.shape().len() != 1 {
        return Err(bad("must be one-dimensional (one per batch row)"));
    }
    match t.dtype() {
        DType::I64 => t.to_vec::<i64>().map_err(|e| bad(&e.to_string())),
        DType::I32 => Ok(t
            .to_vec::<i32>()
            .map_err(|e| bad(&e.to_string()))?
            .into_iter()
            .map(i64::from)
            .collect()),
        other => Err(bad(&format!("must be int64 or int32, not {other:?}"))),
    }
}

/// Checks a sample against the model's inputs: every input present with its element type and
/// rank, fixed dimensions equal, labels one per row of the first input's batch.
pub fn check(sample: &Sample, inputs: &[IoSpec]) -> Result<(), QuantError> {
    let at = &sample.origin;
    for name in sample.feeds.keys() {
        if !inputs.iter().any(|i| &i.name == name) {
            return Err(QuantError::Data(format!(
                "{at}: tensor '{name}' is not an input of the model (inputs: {})",
                inputs
                    .iter()
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    for spec in inputs {
        let t = sample
            .feeds
            .get(&spec.name)
            .ok_or_else(|| QuantError::Data(format!("{at}: input '{}' is missing", spec.name)))?;
        if t.dtype() != spec.dtype {
            return Err(QuantError::Data(format!(
                "{at}: input '{}' is {:?}, the model wants {:?}",
                spec.name,
                t.dtype(),
                spec.dtype
            )));
        }
        if let Some(dims) = &spec.shape {
            let ok = dims.len() == t.shape().len()
                && dims.iter().zip(t.shape()).all(|(d, n)| match d {
                    Dim::Fixed(f) => f == n,
                    Dim::Symbolic(_) => true,
                });
            if !ok {
                return Err(QuantError::Data(format!(
                    "{at}: input '{}' has shape {:?}, the model wants {:?}",
                    spec.name,
                    t.shape(),
                    spec.kserve_shape()
                )));
            }
        }
    }
    if let (Some(labels), Some(first)) = (&sample.labels, inputs.first()) {
        let rows = sample
            .feeds
            .get(&first.name)
            .and_then(|t| t.shape().first().copied());
        if rows != Some(labels.len()) {
            return Err(QuantError::Data(format!(
                "{at}: {} labels for a batch of {:?} rows",
                labels.len(),
                rows
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::indexing_slicing)] // tests index what they just built
    use super::*;

    fn npy(header_shape: &str, descr: &str, data: &[u8]) -> Vec<u8> {
        let mut header =
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {header_shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn npy_arrays_read_with_their_type_and_shape() {
        let data: Vec<u8> = [1f32, 2., 3., 4., 5., 6.]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let t = npy_tensor(&npy("(2, 3)", "<f4", &data)).unwrap();
        assert_eq!((t.dtype(), t.shape()), (DType::F32, &[2usize, 3][..]));
        assert_eq!(t.to_vec::<f32>().unwrap(), vec![1., 2., 3., 4., 5., 6.]);
    }

    #[test]
    fn a_sample_folder_of_pb_tensors_is_matched_by_name_then_by_position() {
        let dir = tempfile::tempdir().unwrap();
        let proto = |name: &str, v: &[f32]| opreg_proto::onnx::TensorProto {
            name: name.into(),
            dims: vec![1, v.len() as i64],
            data_type: 1,
            float_data: v.to_vec(),
            ..Default::default()
        };
        let sample = dir.path().join("s0");
        std::fs::create_dir(&sample).unwrap();
        // `b` by its tensor name (in a file named for another position), `a` by position.
        std::fs::write(
            sample.join("input_0.pb"),
            proto("", &[1., 2.]).encode_to_vec(),
        )
        .unwrap();
        std::fs::write(
            sample.join("input_9.pb"),
            proto("b", &[3., 4.]).encode_to_vec(),
        )
        .unwrap();
        let spec = |n: &str| IoSpec {
            name: n.into(),
            dtype: DType::F32,
            shape: Some(vec![Dim::Fixed(1), Dim::Fixed(2)]),
        };
        let s = read(&sample, &[spec("a"), spec("b")]).unwrap();
        assert_eq!(s.feeds["a"].to_vec::<f32>().unwrap(), vec![1., 2.]);
        assert_eq!(s.feeds["b"].to_vec::<f32>().unwrap(), vec![3., 4.]);
        let e = match read(&sample, &[spec("a"), spec("b"), spec("c")]) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("input 'c' has no file"),
        };
        assert!(e.contains("input 'c'"), "{e}");
    }

    #[test]
    fn a_header_larger_than_the_file_is_refused_before_allocating() {
        let e = npy_tensor(&npy("(1000000000000,)", "<f4", &[0; 8])).unwrap_err();
        assert!(e.contains("declares"), "{e}");
        let e = npy_tensor(&npy("(2,)", ">f4", &[0; 8])).unwrap_err();
        assert!(e.contains("not supported"), "{e}");
        assert!(npy_tensor(b"not numpy").is_err());
    }

    #[test]
    fn samples_of_the_wrong_type_or_shape_are_refused_naming_the_input() {
        let spec = IoSpec {
            name: "image".into(),
            dtype: DType::F32,
            shape: Some(vec![Dim::Symbolic("N".into()), Dim::Fixed(3)]),
        };
        let sample = |t: HostTensor| Sample {
            origin: "s0".into(),
            feeds: [("image".to_string(), Arc::new(t))].into(),
            labels: None,
        };
        let ok = sample(HostTensor::from_vec(&[2, 3], &[0f32; 6]).unwrap());
        check(&ok, std::slice::from_ref(&spec)).unwrap();
        let e = check(
            &sample(HostTensor::from_vec(&[2, 3], &[0f64; 6]).unwrap()),
            std::slice::from_ref(&spec),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("'image'") && e.contains("FP64"), "{e}");
        let e = check(
            &sample(HostTensor::from_vec(&[2, 4], &[0f32; 8]).unwrap()),
            std::slice::from_ref(&spec),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("shape [2, 4]"), "{e}");
        let mut labelled = ok.clone();
        labelled.labels = Some(vec![1]);
        assert!(check(&labelled, &[spec]).is_err());
    }
}
