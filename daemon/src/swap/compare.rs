//! How far a candidate's output is from the serving generation's.

use opreg_sdk::{host::HostTensor, DType};

/// Outputs agree when `|new - old| <= abs + rel * |old|` element by element (floating
/// point); integers, booleans and strings must be equal.
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    pub abs: f64,
    pub rel: f64,
}

impl Default for Tolerance {
    /// [`DEFAULT_SWAP_TOLERANCE`](crate::config::DEFAULT_SWAP_TOLERANCE), what the daemon's
    /// flags default to.
    fn default() -> Self {
        let (abs, rel) = crate::config::DEFAULT_SWAP_TOLERANCE;
        Tolerance { abs, rel }
    }
}

impl Tolerance {
    /// The daemon's configured default (`--swap-abs-tolerance`, `--swap-rel-tolerance`).
    pub fn configured(settings: &crate::config::SwapSettings) -> Tolerance {
        Tolerance {
            abs: settings.abs_tolerance,
            rel: settings.rel_tolerance,
        }
    }

    /// The tolerance for one output type: f16 and bf16 carry 11 and 8 significant bits, so
    /// a relative 1e-3 is below their own rounding.
    fn for_dtype(self, dtype: DType) -> Tolerance {
        match dtype {
            DType::F16 | DType::BF16 => Tolerance {
                abs: self.abs.max(1e-2),
                rel: self.rel.max(1e-2),
            },
            _ => self,
        }
    }
}

/// The comparison of one output.
#[derive(Debug, PartialEq)]
pub enum Difference {
    /// Within tolerance; the largest |new - old| (0 for exact types).
    Within(f64),
    /// Out of tolerance: the largest |new - old|, and the first element past the tolerance.
    Beyond {
        max_abs: f64,
        index: usize,
        old: f64,
        new: f64,
    },
    /// Not comparable element by element.
    Structure(String),
}

/// Compares `new` with `old`.
pub fn compare(old: &HostTensor, new: &HostTensor, tolerance: Tolerance) -> Difference {
    if old.dtype() != new.dtype() {
        return Difference::Structure(format!("type {} became {}", old.dtype(), new.dtype()));
    }
    if old.shape() != new.shape() {
        return Difference::Structure(format!("shape {:?} became {:?}", old.shape(), new.shape()));
    }
    if old.dtype() == DType::String {
        return if old.strings() == new.strings() {
            Difference::Within(0.0)
        } else {
            Difference::Structure("strings differ".into())
        };
    }
    let Some(decode) = decoder(old.dtype()) else {
        return if old.bytes() == new.bytes() {
            Difference::Within(0.0)
        } else {
            Difference::Structure(format!("{} values differ", old.dtype()))
        };
    };
    let exact = !old.dtype().is_float();
    let t = tolerance.for_dtype(old.dtype());
    let size = old.dtype().size();
    let mut max_abs = 0f64;
    let mut first_beyond = None;
    let pairs = old
        .bytes()
        .chunks_exact(size)
        .zip(new.bytes().chunks_exact(size));
    for (i, (a, b)) in pairs.enumerate() {
        let (a, b) = (decode(a), decode(b));
        // NaN where NaN was, and the same infinity, agree.
        if a == b || (a.is_nan() && b.is_nan()) {
            continue;
        }
        let d = (a - b).abs();
        let d = if d.is_nan() { f64::INFINITY } else { d };
        max_abs = max_abs.max(d);
        let allowed = if exact { 0.0 } else { t.abs + t.rel * a.abs() };
        // An infinity or NaN that was not there before is beyond any tolerance.
        let beyond = !a.is_finite() || !b.is_finite() || d > allowed;
        if first_beyond.is_none() && beyond {
            first_beyond = Some((i, a, b));
        }
    }
    match first_beyond {
        None => Difference::Within(max_abs),
        Some((index, old, new)) => Difference::Beyond {
            max_abs,
            index,
            old,
            new,
        },
    }
}

/// Reads one little-endian element of `dtype` as f64 (integers up to 2⁵³ exactly; beyond,
/// equal bytes still compare equal because equal values decode equally).
fn decoder(dtype: DType) -> Option<fn(&[u8]) -> f64> {
    fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        a
    }
    Some(match dtype {
        DType::F32 => |b| f32::from_le_bytes(arr(b)) as f64,
        DType::F64 => |b| f64::from_le_bytes(arr(b)),
        DType::F16 => |b| half::f16::from_le_bytes(arr(b)).to_f64(),
        DType::BF16 => |b| half::bf16::from_le_bytes(arr(b)).to_f64(),
        DType::I8 => |b| i8::from_le_bytes(arr(b)) as f64,
        DType::U8 | DType::Bool => |b| u8::from_le_bytes(arr(b)) as f64,
        DType::I16 => |b| i16::from_le_bytes(arr(b)) as f64,
        DType::U16 => |b| u16::from_le_bytes(arr(b)) as f64,
        DType::I32 => |b| i32::from_le_bytes(arr(b)) as f64,
        DType::U32 => |b| u32::from_le_bytes(arr(b)) as f64,
        DType::I64 => |b| i64::from_le_bytes(arr(b)) as f64,
        DType::U64 => |b| u64::from_le_bytes(arr(b)) as f64,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(v: &[f32]) -> HostTensor {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        HostTensor::from_bytes(DType::F32, &[v.len()], &bytes).expect("tensor")
    }

    #[test]
    fn floats_agree_within_tolerance_and_report_the_first_element_beyond() {
        let t = Tolerance::default();
        let old = f32s(&[1.0, 100.0, f32::NAN, -2.0]);
        let near = f32s(&[1.00005, 100.05, f32::NAN, -2.0]);
        match compare(&old, &near, t) {
            Difference::Within(d) => assert!(d > 0.04 && d < 0.06, "{d}"),
            other => panic!("{other:?}"),
        }
        let far = f32s(&[1.0, 100.0, f32::NAN, -1.5]);
        assert_eq!(
            compare(&old, &far, t),
            Difference::Beyond {
                max_abs: 0.5,
                index: 3,
                old: -2.0,
                new: -1.5
            }
        );
        // A NaN where a number was is beyond any tolerance.
        let nan = f32s(&[f32::NAN, 100.0, f32::NAN, -2.0]);
        assert!(matches!(
            compare(&old, &nan, Tolerance { abs: 1e9, rel: 1e9 }),
            Difference::Beyond { index: 0, .. }
        ));
    }

    #[test]
    fn integers_must_be_equal_and_structure_must_match() {
        let i = |v: &[i64]| {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            HostTensor::from_bytes(DType::I64, &[v.len()], &bytes).expect("tensor")
        };
        let loose = Tolerance {
            abs: 10.0,
            rel: 1.0,
        };
        assert_eq!(
            compare(&i(&[1, 2]), &i(&[1, 2]), loose),
            Difference::Within(0.0)
        );
        assert!(matches!(
            compare(&i(&[1, 2]), &i(&[1, 3]), loose),
            Difference::Beyond { index: 1, .. }
        ));
        assert!(matches!(
            compare(&i(&[1, 2]), &i(&[1, 2, 3]), loose),
            Difference::Structure(_)
        ));
        assert!(matches!(
            compare(&f32s(&[1.0]), &i(&[1]), loose),
            Difference::Structure(_)
        ));
    }
}
