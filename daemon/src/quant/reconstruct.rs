//! Pruning with reconstruction: the weights a mask keeps are re-fitted so that the layer's
//! output on the calibration inputs stays as close as it can to the unpruned layer's.
//!
//! For one output row `w` (a Conv filter flattened as `(channel, ky, kx)`, a MatMul column)
//! and the layer's inputs `X` (im2col patches, or rows), the error of a pruned `ŵ` is
//! `(w - ŵ)ᵀ H (w - ŵ)` with `H = XᵀX`, the input's Gram matrix, accumulated during
//! calibration (memory `K²`, whatever the number of samples). Zeroing the pruned entries one
//! at a time in input order and moving each one's error onto the entries after it through the
//! upper Cholesky factor `U` of `H⁻¹` (`w[j] -= w[i] / U[i,i] · U[i,j]`, `j > i`) is the
//! optimal-brain-surgeon update SparseGPT uses (Frantar & Alistarh, 2023), here with the
//! strategy's mask instead of one chosen on the way: `O(K³)` once per layer, then `O(K²)` per
//! row. `H` is damped by 1 % of its mean diagonal (inputs that never vary make it singular).

// Model and request data reach this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use super::QuantError;
use crate::graph::{Model, Node};
use opreg_sdk::AttrValue;

/// The input Gram matrices of a run, by weight: how the product reads its input, and `XᵀX`.
pub type Grams<'a> = std::collections::HashMap<String, (&'a Rows, &'a Gram)>;

/// Largest row length (`K`) a Gram matrix is kept for: `K²` f64 = 128 MiB.
pub const MAX_K: usize = 4096;

/// How one product reads its input, as rows of `K` values.
#[derive(Clone, Debug, PartialEq)]
pub enum Rows {
    /// `MatMul`: the input's last axis.
    Matrix { k: usize },
    /// A 2-D `Conv` with one group: im2col patches `(channel, ky, kx)`.
    Conv2d {
        channels: usize,
        kernel: [usize; 2],
        strides: [usize; 2],
        dilations: [usize; 2],
        pads: [usize; 2],
    },
}

impl Rows {
    /// The rows of the product reading `weight` in `model`, and the input they come from;
    /// `Err` says why there are none (an operator or layout this does not take).
    pub fn of(model: &Model, weight: &str) -> Result<(Rows, String), String> {
        let node = model
            .nodes
            .iter()
            .find(|n| {
                n.domain.is_empty()
                    && matches!(n.op_type.as_str(), "Conv" | "MatMul")
                    && n.inputs.get(1).is_some_and(|w| w == weight)
            })
            .ok_or_else(|| format!("no Conv or MatMul reads '{weight}' as its weight"))?;
        let input = node
            .inputs
            .first()
            .cloned()
            .ok_or_else(|| format!("the node reading '{weight}' has no input"))?;
        let shape = model
            .initializers
            .get(weight)
            .map(|t| t.shape().to_vec())
            .ok_or_else(|| format!("'{weight}' is not a constant"))?;
        let rows = match (node.op_type.as_str(), shape.as_slice()) {
            ("MatMul", &[k, _]) => Rows::Matrix { k },
            ("Conv", &[_, c, kh, kw]) => conv_rows(node, c, [kh, kw])?,
            (op, s) => return Err(format!("{op} with a weight of shape {s:?}")),
        };
        if rows.k() > MAX_K {
            return Err(format!(
                "'{weight}' has rows of {} values, more than {MAX_K}",
                rows.k()
            ));
        }
        Ok((rows, input))
    }

    /// Values per row.
    pub fn k(&self) -> usize {
        match self {
            Rows::Matrix { k } => *k,
            Rows::Conv2d {
                channels, kernel, ..
            } => channels * kernel[0] * kernel[1],
        }
    }
}

fn conv_rows(node: &Node, channels: usize, kernel: [usize; 2]) -> Result<Rows, String> {
    let ints = |name: &str| {
        node.attributes
            .iter()
            .find(|a| a.name == name)
            .map(|a| match &a.value {
                AttrValue::Ints(v) => v.iter().map(|&x| usize::try_from(x).ok()).collect(),
                AttrValue::Int(v) => usize::try_from(*v).ok().map(|x| vec![x]),
                _ => None,
            })
    };
    let pair = |name: &str, default: usize| -> Result<[usize; 2], String> {
        match ints(name) {
            None => Ok([default; 2]),
            Some(Some(v)) if v.len() == 2 => Ok([
                v.first().copied().unwrap_or(default),
                v.get(1).copied().unwrap_or(default),
            ]),
            _ => Err(format!(
                "Conv '{}': attribute {name} is not two values",
                node.name
            )),
        }
    };
    let one_group = match ints("group") {
        None => true,
        Some(Some(g)) => g.first().is_none_or(|&g| g == 1),
        Some(None) => false,
    };
    if !one_group {
        return Err(format!("Conv '{}' has groups", node.name));
    }
    let auto_pad = node.attributes.iter().find(|a| a.name == "auto_pad");
    if auto_pad.is_some_and(|a| !matches!(&a.value, AttrValue::String(s) if s == "NOTSET")) {
        return Err(format!("Conv '{}' pads automatically", node.name));
    }
    let pads = match ints("pads") {
        None => [0, 0],
        Some(Some(p)) if p.len() == 4 && p.first() == p.get(2) && p.get(1) == p.get(3) => [
            p.first().copied().unwrap_or(0),
            p.get(1).copied().unwrap_or(0),
        ],
        _ => return Err(format!("Conv '{}' pads unevenly", node.name)),
    };
    let (strides, dilations) = (pair("strides", 1)?, pair("dilations", 1)?);
    if strides.contains(&0) || dilations.contains(&0) || kernel.contains(&0) {
        return Err(format!(
            "Conv '{}' has a zero stride, dilation or kernel extent",
            node.name
        ));
    }
    Ok(Rows::Conv2d {
        channels,
        kernel,
        strides,
        dilations,
        pads,
    })
}

/// `XᵀX` over every row seen (f64, full `K x K`).
#[derive(Clone, Debug)]
pub struct Gram {
    pub k: usize,
    /// Row-major `K x K`; only the upper triangle is accumulated until [`Gram::matrix`].
    sums: Vec<f64>,
    pub rows: u64,
}

impl Gram {
    /// A Gram matrix for rows of `k` values, allocated fallibly.
    pub fn new(k: usize) -> Result<Self, String> {
        let len = k.checked_mul(k).ok_or("Gram matrix size overflows")?;
        let mut sums = Vec::new();
        sums.try_reserve_exact(len)
            .map_err(|_| format!("cannot allocate a {k}x{k} Gram matrix"))?;
        sums.resize(len, 0.0);
        Ok(Gram { k, sums, rows: 0 })
    }

    pub fn bytes(&self) -> usize {
        self.sums.len() * 8
    }

    fn add_row(&mut self, row: &[f64]) {
        let k = self.k;
        for (i, &a) in row.iter().enumerate() {
            if a == 0.0 {
                continue;
            }
            let Some(out) = self.sums.get_mut(i * k + i..(i + 1) * k) else {
                continue;
            };
            for (o, &b) in out.iter_mut().zip(row.get(i..).unwrap_or(&[])) {
                *o += a * b;
            }
        }
        self.rows += 1;
    }

    /// Adds the rows of the product's input `x` (shape `shape`, f32).
    pub fn update(&mut self, rows: &Rows, x: &[f32], shape: &[usize]) -> Result<(), String> {
        let mut row = vec![0f64; self.k];
        match rows {
            Rows::Matrix { k } => {
                if shape.last() != Some(k) {
                    return Err(format!("input of shape {shape:?}, rows of {k} expected"));
                }
                for r in x.chunks_exact((*k).max(1)) {
                    for (o, &v) in row.iter_mut().zip(r) {
                        *o = f64::from(v);
                    }
                    self.add_row(&row);
                }
            }
            Rows::Conv2d {
                channels,
                kernel,
                strides,
                dilations,
                pads,
            } => {
                let &[n, c, h, w] = shape else {
                    return Err(format!("Conv input of shape {shape:?}, rank 4 expected"));
                };
                let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                if c != *channels || numel != Some(x.len()) {
                    return Err(format!(
                        "Conv input of shape {shape:?}, {channels} channels expected"
                    ));
                }
                // Strides, dilations and kernel extents are at least 1 (`conv_rows`).
                let out = |size: usize, k: usize, s: usize, d: usize, p: usize| -> usize {
                    let span = d * k.saturating_sub(1) + 1;
                    (size + 2 * p)
                        .checked_sub(span)
                        .map_or(0, |x| x / s.max(1) + 1)
                };
                let (oh, ow) = (
                    out(h, kernel[0], strides[0], dilations[0], pads[0]),
                    out(w, kernel[1], strides[1], dilations[1], pads[1]),
                );
                for b in 0..n {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let mut idx = 0;
                            for ch in 0..c {
                                for ky in 0..kernel[0] {
                                    let y = (oy * strides[0] + ky * dilations[0])
                                        .checked_sub(pads[0])
                                        .filter(|&y| y < h);
                                    for kx in 0..kernel[1] {
                                        let xx = (ox * strides[1] + kx * dilations[1])
                                            .checked_sub(pads[1])
                                            .filter(|&v| v < w);
                                        let v = match (y, xx) {
                                            (Some(y), Some(xx)) => x
                                                .get(((b * c + ch) * h + y) * w + xx)
                                                .copied()
                                                .unwrap_or(0.0),
                                            _ => 0.0,
                                        };
                                        if let Some(o) = row.get_mut(idx) {
                                            *o = f64::from(v);
                                        }
                                        idx += 1;
                                    }
                                }
                            }
                            self.add_row(&row);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The full symmetric matrix.
    fn matrix(&self) -> Vec<f64> {
        let k = self.k;
        let mut m = self.sums.clone();
        for i in 0..k {
            for j in 0..i {
                let v = m.get(j * k + i).copied().unwrap_or(0.0);
                if let Some(x) = m.get_mut(i * k + j) {
                    *x = v;
                }
            }
        }
        m
    }
}

/// Lower Cholesky factor of the symmetric `a` (`k x k`), in place; `false` if not positive
/// definite.
fn cholesky(a: &mut [f64], k: usize) -> bool {
    for j in 0..k {
        let mut d = a.get(j * k + j).copied().unwrap_or(0.0);
        for p in 0..j {
            let l = a.get(j * k + p).copied().unwrap_or(0.0);
            d -= l * l;
        }
        if d <= 0.0 || !d.is_finite() {
            return false;
        }
        let d = d.sqrt();
        if let Some(x) = a.get_mut(j * k + j) {
            *x = d;
        }
        for i in j + 1..k {
            let mut s = a.get(i * k + j).copied().unwrap_or(0.0);
            for p in 0..j {
                s -= a.get(i * k + p).copied().unwrap_or(0.0)
                    * a.get(j * k + p).copied().unwrap_or(0.0);
            }
            if let Some(x) = a.get_mut(i * k + j) {
                *x = s / d;
            }
        }
        for i in 0..j {
            if let Some(x) = a.get_mut(i * k + j) {
                *x = 0.0;
            }
        }
    }
    true
}

/// `H⁻¹` and its upper Cholesky factor `U` (`H⁻¹ = UᵀU`), with `H` damped until it factors.
fn inverse_factor(gram: &Gram) -> Option<(Vec<f64>, Vec<f64>)> {
    let k = gram.k;
    let h = gram.matrix();
    let mean_diag = (0..k)
        .map(|i| h.get(i * k + i).copied().unwrap_or(0.0))
        .sum::<f64>()
        / k.max(1) as f64;
    let mut damp = 0.01 * mean_diag.max(1e-12);
    for _ in 0..6 {
        let mut l = h.clone();
        for i in 0..k {
            if let Some(x) = l.get_mut(i * k + i) {
                *x += damp;
            }
        }
        if !cholesky(&mut l, k) {
            damp *= 10.0;
            continue;
        }
        // L⁻¹ by forward substitution (lower), then H⁻¹ = L⁻ᵀ L⁻¹.
        let mut inv = vec![0f64; k * k];
        for c in 0..k {
            for i in c..k {
                let mut s = if i == c { 1.0 } else { 0.0 };
                for p in c..i {
                    s -= l.get(i * k + p).copied().unwrap_or(0.0)
                        * inv.get(p * k + c).copied().unwrap_or(0.0);
                }
                let d = l.get(i * k + i).copied().unwrap_or(1.0);
                if let Some(x) = inv.get_mut(i * k + c) {
                    *x = s / d;
                }
            }
        }
        let mut hinv = vec![0f64; k * k];
        for i in 0..k {
            for j in i..k {
                let s: f64 = (j..k)
                    .map(|p| {
                        inv.get(p * k + i).copied().unwrap_or(0.0)
                            * inv.get(p * k + j).copied().unwrap_or(0.0)
                    })
                    .sum();
                if let Some(x) = hinv.get_mut(i * k + j) {
                    *x = s;
                }
                if let Some(x) = hinv.get_mut(j * k + i) {
                    *x = s;
                }
            }
        }
        // Upper factor of H⁻¹: the transpose of its lower factor.
        let mut l2 = hinv.clone();
        if !cholesky(&mut l2, k) {
            damp *= 10.0;
            continue;
        }
        let mut u = vec![0f64; k * k];
        for i in 0..k {
            for j in i..k {
                if let Some(x) = u.get_mut(i * k + j) {
                    *x = l2.get(j * k + i).copied().unwrap_or(0.0);
                }
            }
        }
        return Some((hinv, u));
    }
    None
}

/// Most pruned entries per row solved exactly (`O(P³)` per row); rows with more take the
/// sequential update.
const EXACT_MAX: usize = 384;

/// The least-squares optimum for one row with its pruned entries `p` fixed at 0 (the
/// multi-weight OBS step): `w -= H⁻¹[:, P] (H⁻¹[P, P])⁻¹ w_P`. `false` if `H⁻¹[P, P]` does
/// not factor (the caller falls back).
fn exact_row(row: &mut [f64], p: &[usize], hinv: &[f64], k: usize) -> bool {
    let n = p.len();
    let mut a = vec![0f64; n * n];
    for (r, &i) in p.iter().enumerate() {
        for (c, &j) in p.iter().enumerate() {
            if let Some(x) = a.get_mut(r * n + c) {
                *x = hinv.get(i * k + j).copied().unwrap_or(0.0);
            }
        }
    }
    if !cholesky(&mut a, n) {
        return false;
    }
    // Solve A z = w_P (L Lᵀ z = b).
    let mut z: Vec<f64> = p
        .iter()
        .map(|&i| row.get(i).copied().unwrap_or(0.0))
        .collect();
    for i in 0..n {
        let mut s = z.get(i).copied().unwrap_or(0.0);
        for q in 0..i {
            s -= a.get(i * n + q).copied().unwrap_or(0.0) * z.get(q).copied().unwrap_or(0.0);
        }
        if let Some(x) = z.get_mut(i) {
            *x = s / a.get(i * n + i).copied().unwrap_or(1.0);
        }
    }
    for i in (0..n).rev() {
        let mut s = z.get(i).copied().unwrap_or(0.0);
        for q in i + 1..n {
            s -= a.get(q * n + i).copied().unwrap_or(0.0) * z.get(q).copied().unwrap_or(0.0);
        }
        if let Some(x) = z.get_mut(i) {
            *x = s / a.get(i * n + i).copied().unwrap_or(1.0);
        }
    }
    for (j, x) in row.iter_mut().enumerate() {
        let hj = hinv.get(j * k..(j + 1) * k).unwrap_or(&[]);
        *x -= p
            .iter()
            .zip(&z)
            .map(|(&i, zi)| hj.get(i).copied().unwrap_or(0.0) * zi)
            .sum::<f64>();
    }
    true
}

/// `Σ_rows (w - v)ᵀ H (w - v)`: the layer's output error on the calibration inputs.
fn output_error(h: &[f64], k: usize, w: &[f32], v: &[f32]) -> f64 {
    let d: Vec<f64> = w
        .iter()
        .zip(v)
        .map(|(a, b)| f64::from(*a) - f64::from(*b))
        .collect();
    let mut total = 0.0;
    for row in d.chunks_exact(k.max(1)) {
        for (i, &a) in row.iter().enumerate() {
            if a == 0.0 {
                continue;
            }
            let hi = h.get(i * k..(i + 1) * k).unwrap_or(&[]);
            total += a * hi.iter().zip(row).map(|(x, y)| x * y).sum::<f64>();
        }
    }
    total
}

/// What reconstruction did to one weight.
#[derive(Clone, Copy, Debug)]
pub struct Refit {
    /// Output error on the calibration inputs, masked only and reconstructed.
    pub masked_error: f64,
    pub refit_error: f64,
}

/// Re-fits the weight `values` (of `shape`, read by a product as `rows`) to its `mask`
/// (1 keep, 0 prune): pruned entries become 0, kept ones absorb their error.
pub fn refit(
    values: &mut [f32],
    shape: &[usize],
    mask: &[u8],
    rows: &Rows,
    gram: &Gram,
) -> Result<Refit, QuantError> {
    let k = rows.k();
    let bad = |m: String| QuantError::Data(m);
    if gram.k != k || k == 0 || !values.len().is_multiple_of(k) || mask.len() != values.len() {
        return Err(bad(format!(
            "reconstruction: weight of shape {shape:?} does not fit rows of {k}"
        )));
    }
    let (hinv, u) = inverse_factor(gram)
        .ok_or_else(|| bad("reconstruction: the input's Gram matrix does not factor".into()))?;
    // Rows of `k` in the product's order: a Conv's filters are already, a MatMul's columns
    // are gathered.
    let (count, gather): (usize, Box<dyn Fn(usize, usize) -> usize>) = match rows {
        Rows::Conv2d { .. } => (values.len() / k, Box::new(move |r, i| r * k + i)),
        Rows::Matrix { .. } => {
            let n = values.len() / k;
            (n, Box::new(move |r, i| i * n + r))
        }
    };
    let original: Vec<f32> = values.to_vec();
    let mut masked = original.clone();
    for (v, &m) in masked.iter_mut().zip(mask) {
        if m == 0 {
            *v = 0.0;
        }
    }
    let mut row = vec![0f64; k];
    for r in 0..count {
        for (i, x) in row.iter_mut().enumerate() {
            *x = f64::from(original.get(gather(r, i)).copied().unwrap_or(0.0));
        }
        let pruned: Vec<usize> = (0..k)
            .filter(|&i| mask.get(gather(r, i)).copied().unwrap_or(1) == 0)
            .collect();
        let exact = pruned.len() <= EXACT_MAX && exact_row(&mut row, &pruned, &hinv, k);
        for &i in pruned.iter().filter(|_| !exact) {
            let d = u.get(i * k + i).copied().unwrap_or(1.0);
            let err = row.get(i).copied().unwrap_or(0.0) / d;
            let ui = u.get(i * k..(i + 1) * k).unwrap_or(&[]);
            for (j, x) in row.iter_mut().enumerate().skip(i + 1) {
                *x -= err * ui.get(j).copied().unwrap_or(0.0);
            }
            if let Some(x) = row.get_mut(i) {
                *x = 0.0;
            }
        }
        for (i, &x) in row.iter().enumerate() {
            let at = gather(r, i);
            if let Some(v) = values.get_mut(at) {
                *v = if mask.get(at).copied().unwrap_or(1) == 0 {
                    0.0
                } else {
                    x as f32
                };
            }
        }
    }
    let h = gram.matrix();
    let as_rows = |v: &[f32]| -> Vec<f32> {
        (0..count)
            .flat_map(|r| (0..k).map(move |i| (r, i)))
            .map(|(r, i)| v.get(gather(r, i)).copied().unwrap_or(0.0))
            .collect()
    };
    let (o, m, f) = (as_rows(&original), as_rows(&masked), as_rows(values));
    Ok(Refit {
        masked_error: output_error(&h, k, &o, &m),
        refit_error: output_error(&h, k, &o, &f),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::indexing_slicing)]
    use super::*;

    /// A least-squares check: with inputs where column 1 copies column 0, pruning entry 0 of
    /// `w = [1, 1]` is fully compensated by entry 1 (`ŵ = [0, 2]`), where masking loses it.
    #[test]
    fn a_pruned_entry_moves_onto_a_correlated_kept_one() {
        let rows = Rows::Matrix { k: 2 };
        let mut g = Gram::new(2).unwrap();
        let x: Vec<f32> = (0..50)
            .flat_map(|i| [i as f32 * 0.1, i as f32 * 0.1])
            .collect();
        g.update(&rows, &x, &[50, 2]).unwrap();
        // MatMul weight [K=2, N=1].
        let mut w = vec![1.0f32, 1.0];
        let fit = refit(&mut w, &[2, 1], &[0, 1], &rows, &g).unwrap();
        assert_eq!(w[0], 0.0);
        assert!((w[1] - 2.0).abs() < 0.05, "{w:?}");
        assert!(fit.refit_error < 0.01 * fit.masked_error, "{fit:?}");
    }

    #[test]
    fn conv_patches_match_a_direct_sum() {
        // 1 image, 2 channels 3x3, a 2x2 kernel, stride 1, pad 1: Gram diagonal entry of tap
        // (c=0, ky=0, kx=0) is the sum of squares of the values that tap sees.
        let rows = Rows::Conv2d {
            channels: 2,
            kernel: [2, 2],
            strides: [1, 1],
            dilations: [1, 1],
            pads: [1, 1],
        };
        let x: Vec<f32> = (0..18).map(|v| v as f32).collect();
        let mut g = Gram::new(8).unwrap();
        g.update(&rows, &x, &[1, 2, 3, 3]).unwrap();
        // Output 4x4; tap (0,0) reads x[oy-1][ox-1] of channel 0: every value of channel 0 once.
        let want: f64 = (0..9).map(|v| (v * v) as f64).sum();
        assert_eq!(g.matrix()[0], want);
        assert_eq!(g.rows, 16);
        assert!(Gram::new(1 << 40).is_err());
    }

    #[test]
    fn reconstruction_lowers_the_output_error_on_random_data() {
        // 64 rows of 8 correlated inputs; a [8, 3] MatMul weight pruned 2:4 along K.
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let x: Vec<f32> = (0..64)
            .flat_map(|_| {
                let b = rnd();
                (0..8).map(|_| b + 0.3 * rnd()).collect::<Vec<_>>()
            })
            .collect();
        let rows = Rows::Matrix { k: 8 };
        let mut g = Gram::new(8).unwrap();
        g.update(&rows, &x, &[64, 8]).unwrap();
        let w0: Vec<f32> = (0..24).map(|_| rnd()).collect();
        let mask: Vec<u8> = (0..24).map(|i| u8::from((i / 3) % 2 == 0)).collect();
        let mut w = w0.clone();
        let fit = refit(&mut w, &[8, 3], &mask, &rows, &g).unwrap();
        assert!(w.iter().zip(&mask).all(|(v, &m)| m == 1 || *v == 0.0));
        assert!(fit.refit_error < 0.5 * fit.masked_error, "{fit:?}");
    }
}
