//! A model's bytes as import reads them, and the one case where import may give memory back
//! while it runs: a model file read into memory this process owns alone.
//!
//! Import decodes initializers as slices of the model's buffer and copies each into its
//! tensor. The buffer stays whole until the last slice is dropped, so a model's load peaked at
//! two copies of its weights (a 265 MB BERT-style encoder: 520 MiB before compiling). When
//! import holds the only handle to a buffer [`ModelBytes::read`] filled, it returns the pages
//! of each initializer's bytes to the OS as soon as they are copied: the load then peaks at
//! about one copy.
//!
//! The buffer is an anonymous private mapping, not the allocator's memory (the pages are
//! dropped with `MADV_DONTNEED`, which the allocator would not expect) and not the file mapped
//! (a file truncated on disk while mapped makes reads fault: a daemon crash from outside).
//! Dropped pages read as zeros if touched again, so only whole pages inside one initializer's
//! bytes are dropped, after those bytes were taken out of the decoded model (a later reader
//! finds them empty, an error, never zeros) and when no handle to the buffer escaped.

use prost::bytes::Bytes;
use std::{io::Read, path::Path, ptr::NonNull};

/// A model's serialized bytes, and whether import may return their pages to the OS as it
/// copies initializers out (see the module docs).
pub struct ModelBytes {
    bytes: Bytes,
    /// The address range of a buffer [`ModelBytes::read`] filled, while no other handle to it
    /// exists.
    owned: Option<Owned>,
}

impl ModelBytes {
    /// Reads the file at `path` into memory of its own, which import may give back as it goes.
    /// A file of more than `max_bytes` is refused before anything is allocated (the caller's
    /// size check may have seen a smaller file: it can change in between).
    pub fn read(path: &Path, max_bytes: u64) -> std::io::Result<ModelBytes> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        if len > max_bytes {
            return Err(std::io::Error::other(format!(
                "the file has {len} bytes, more than the limit of {max_bytes}"
            )));
        }
        let len = usize::try_from(len)
            .map_err(|_| std::io::Error::other("the file is larger than the address space"))?;
        if len == 0 {
            return Ok(ModelBytes::from(Bytes::new()));
        }
        let mut map = Mapping::new(len)?;
        let mut filled = 0;
        while filled < len {
            // SAFETY: the mapping is ours alone until it becomes a `Bytes` below.
            let rest = unsafe { map.as_mut_slice() }
                .get_mut(filled..)
                .unwrap_or_default();
            match file.read(rest) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // A file that grew or shrank while read is refused rather than half decoded.
        if filled < len || file.read(&mut [0u8])? != 0 {
            return Err(std::io::Error::other("the file changed while it was read"));
        }
        let owned = Owned {
            start: map.ptr.as_ptr() as usize,
            end: map.ptr.as_ptr() as usize + len,
        };
        Ok(ModelBytes {
            bytes: Bytes::from_owner(map),
            owned: Some(owned),
        })
    }

    /// The bytes, to read.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// A handle to the bytes that outlives this value. Import then gives nothing back: the
    /// handle may read any part of them later.
    pub fn shared(&mut self) -> Bytes {
        self.owned = None;
        self.bytes.clone()
    }

    /// The bytes to decode, and the range import may give back.
    pub(super) fn into_parts(self) -> (Bytes, Option<Owned>) {
        (self.bytes, self.owned)
    }
}

impl From<Bytes> for ModelBytes {
    fn from(bytes: Bytes) -> Self {
        ModelBytes { bytes, owned: None }
    }
}

impl From<Vec<u8>> for ModelBytes {
    fn from(bytes: Vec<u8>) -> Self {
        ModelBytes::from(Bytes::from(bytes))
    }
}

/// The address range of a buffer import holds the only handle to.
#[derive(Clone, Copy, Debug)]
pub(super) struct Owned {
    start: usize,
    end: usize,
}

impl Owned {
    /// Gives the whole pages inside `data` back to the OS. `data` must be a slice of this
    /// buffer that nothing reads again; it is dropped first.
    pub(super) fn give_back(&self, data: Bytes) {
        let (start, end) = (data.as_ptr() as usize, data.as_ptr() as usize + data.len());
        drop(data);
        if start < self.start || end > self.end {
            return;
        }
        let page = page_size();
        let (lo, hi) = (start.next_multiple_of(page), end / page * page);
        if hi > lo {
            // SAFETY: `lo..hi` lies inside the mapping (checked above), wholly inside `data`'s
            // bytes, which no handle reads any more (the caller's contract, and no handle to
            // the buffer escaped import); dropping the pages changes nothing anything reads.
            unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_DONTNEED) };
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|&s| s > 0)
        .unwrap_or(4096)
}

/// An anonymous private mapping of `len > 0` bytes.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: plain memory owned by this value.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(len: usize) -> std::io::Result<Mapping> {
        // SAFETY: a fresh anonymous mapping; no address hint.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast()).ok_or_else(|| std::io::Error::other("mmap gave null"))?;
        Ok(Mapping { ptr, len })
    }

    /// # Safety
    /// No other reference to the mapping's bytes is alive.
    unsafe fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `len` bytes mapped readable and writable (caller: unaliased).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `len` bytes mapped readable for the mapping's life.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length; nothing refers to it any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_read_whole_and_pages_inside_a_slice_are_given_back() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("m.bin");
        let page = page_size();
        let data: Vec<u8> = (0..4 * page + 100).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&path, &data).expect("write");
        let (bytes, owned) = ModelBytes::read(&path, u64::MAX)
            .expect("read")
            .into_parts();
        assert_eq!(&bytes[..], &data[..]);
        let owned = owned.expect("owned");
        // A mapping starts on a page: a slice from 10 bytes into page 1 to 60 bytes into page
        // 3 holds page 2 whole, and no other.
        assert_eq!(bytes.as_ptr() as usize % page, 0);
        owned.give_back(bytes.slice(page + 10..3 * page + 60));
        // The bytes outside that page are intact; those inside read as zeros.
        let (lo, hi) = (2 * page, 3 * page);
        assert_eq!(&bytes[..lo], &data[..lo]);
        assert_eq!(&bytes[hi..], &data[hi..]);
        assert!(bytes[lo..hi].iter().all(|&b| b == 0));
        // A slice of another buffer is left alone.
        let other = Bytes::from(data.clone());
        owned.give_back(other.slice(..));
        assert_eq!(&other[..], &data[..]);
    }

    #[test]
    fn shared_bytes_give_nothing_back_and_empty_files_read() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("m.bin");
        std::fs::write(&path, [7u8; 10]).expect("write");
        let mut m = ModelBytes::read(&path, u64::MAX).expect("read");
        let kept = m.shared();
        assert!(m.into_parts().1.is_none());
        assert_eq!(&kept[..], &[7u8; 10]);
        std::fs::write(&path, []).expect("write");
        assert!(ModelBytes::read(&path, u64::MAX).expect("read").is_empty());
        std::fs::write(&path, [1u8; 11]).expect("write");
        let err = ModelBytes::read(&path, 10).err().expect("over the limit");
        assert!(
            err.to_string().contains("more than the limit of 10"),
            "{err}"
        );
        assert!(ModelBytes::read(&dir.path().join("none"), u64::MAX).is_err());
    }

    /// A model with initializers of several pages each, one of them a multiple of the page
    /// and some small ones between: imported from a file it owns (pages given back as the
    /// weights are copied), every weight is the same as imported from a shared buffer.
    #[test]
    fn a_model_imported_from_its_own_buffer_keeps_every_weight() {
        use opreg_proto::onnx::{
            tensor_proto::DataType, type_proto, GraphProto, ModelProto, NodeProto,
            OperatorSetIdProto, TensorProto, TypeProto, ValueInfoProto,
        };
        use prost::Message;
        let page = page_size();
        let weight = |name: &str, floats: usize, seed: u32| TensorProto {
            name: name.into(),
            dims: vec![floats as i64],
            data_type: DataType::Float as i32,
            raw_data: (0..floats)
                .flat_map(|i| (i as f32 * 0.37 + seed as f32).sin().to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
            ..Default::default()
        };
        let initializer = vec![
            weight("a", 3 * page / 4 + 17, 1),
            weight("b", 3, 2),
            weight("c", page, 3),
            weight("d", 5 * page / 4, 4),
            weight("e", 1, 5),
        ];
        let names: Vec<String> = initializer.iter().map(|t| t.name.clone()).collect();
        let node = NodeProto {
            op_type: "Concat".into(),
            input: names.clone(),
            output: vec!["y".into()],
            attribute: vec![opreg_proto::onnx::AttributeProto {
                name: "axis".into(),
                r#type: opreg_proto::onnx::attribute_proto::AttributeType::Int as i32,
                i: 0,
                ..Default::default()
            }],
            ..Default::default()
        };
        let model = ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            graph: Some(GraphProto {
                name: "g".into(),
                node: vec![node],
                initializer,
                output: vec![ValueInfoProto {
                    name: "y".into(),
                    r#type: Some(TypeProto {
                        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                            elem_type: DataType::Float as i32,
                            shape: None,
                        })),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec();
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("m.onnx");
        std::fs::write(&path, &model).expect("write");
        let own =
            super::super::import_owned(ModelBytes::read(&path, u64::MAX).expect("read"), None)
                .expect("own buffer");
        let shared = super::super::import(&model, None).expect("shared buffer");
        for name in &names {
            let (x, y) = (&own.initializers[name], &shared.initializers[name]);
            assert_eq!(x.shape(), y.shape(), "{name}");
            assert_eq!(x.to_vec::<f32>().ok(), y.to_vec::<f32>().ok(), "{name}");
            assert!(
                x.to_vec::<f32>().expect("f32").iter().any(|&v| v != 0.0),
                "{name}"
            );
        }
    }
}
