//! String operators: StringNormalizer, StringConcat, StringSplit, RegexFullMatch (with
//! `regex-lite`, whose ASCII `\w` / `\b` / `\s` match RE2's defaults) and TfIdfVectorizer.

use crate::util::{broadcast_shapes, broadcast_strides, input, required, walk_offsets};
use opreg_sdk::{abi_stable::std_types::RString, alloc::try_with_capacity, prelude::*};
use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
};

type Factory = fn(&NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError>;

/// A `STRINGS` attribute, if present.
fn strings_attr(node: &NodeInfo<'_>, name: &str) -> Result<Option<Vec<String>>, PluginError> {
    match node.attr(name) {
        None => Ok(None),
        Some(AttrValue::Strings(v)) => Ok(Some(v.iter().map(|s| s.to_string()).collect())),
        Some(other) => Err(PluginError::invalid(format!(
            "{}: attribute '{name}' must be STRINGS, got {other:?}",
            node.op_type
        ))),
    }
}

// ---------------------------------------------------------------- StringNormalizer

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CaseChange {
    None,
    Lower,
    Upper,
}

#[derive(Clone, Debug)]
struct StringNormalizer {
    case: CaseChange,
    case_sensitive: bool,
    /// Lowercased when not case-sensitive.
    stopwords: Vec<String>,
}

fn string_normalizer_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let case = match node.string_or("case_change_action", "NONE")?.as_str() {
        "NONE" => CaseChange::None,
        "LOWER" => CaseChange::Lower,
        "UPPER" => CaseChange::Upper,
        other => {
            return Err(PluginError::invalid(format!(
                "StringNormalizer: attribute 'case_change_action' must be NONE, LOWER or \
                 UPPER, got '{other}'"
            )))
        }
    };
    let case_sensitive = node.int_or("is_case_sensitive", 0)? != 0;
    let mut stopwords = strings_attr(node, "stopwords")?.unwrap_or_default();
    if !case_sensitive {
        stopwords.iter_mut().for_each(|s| *s = s.to_lowercase());
    }
    // `locale` only selects how case is changed; Unicode default casing is used here.
    Ok(Box::new(StringNormalizer {
        case,
        case_sensitive,
        stopwords,
    }))
}

impl Kernel for StringNormalizer {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = input("StringNormalizer", inputs, 0, "X")?;
        let two_d = match x.shape() {
            [_] => false,
            [1, _] => true,
            s => {
                return Err(PluginError::invalid(format!(
                    "StringNormalizer: input 'X' must be [C] or [1, C], got {s:?}"
                )))
            }
        };
        let kept: Vec<String> = x
            .as_strings()?
            .iter()
            .filter(|s| {
                let s = s.as_str();
                if self.case_sensitive {
                    !self.stopwords.iter().any(|w| w == s)
                } else {
                    let l = s.to_lowercase();
                    !self.stopwords.contains(&l)
                }
            })
            .map(|s| match self.case {
                CaseChange::None => s.to_string(),
                CaseChange::Lower => s.to_lowercase(),
                CaseChange::Upper => s.to_uppercase(),
            })
            .collect();
        // Everything filtered out: one empty string, as the reference does.
        let n = kept.len().max(1);
        let shape: Vec<usize> = if two_d { vec![1, n] } else { vec![n] };
        let out = ctx.output(0, DType::String, &shape)?.into_strings()?;
        for (o, s) in out.iter_mut().zip(kept) {
            *o = RString::from(s);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- StringConcat

#[derive(Clone)]
struct StringConcat;

impl Kernel for StringConcat {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let [x, y] = required("StringConcat", inputs, ["X", "Y"])?;
        let shape = broadcast_shapes(&[x.shape(), y.shape()]).map_err(|_| {
            PluginError::invalid(format!(
                "StringConcat: shapes {:?} and {:?} do not broadcast",
                x.shape(),
                y.shape()
            ))
        })?;
        let (xs, ys) = (x.as_strings()?, y.as_strings()?);
        // Broadcasting can make the output far larger than X and Y: the output first (the
        // host refuses sizes past its limit), then the offset tables, fallibly.
        let out = ctx.output(0, DType::String, &shape)?.into_strings()?;
        let n = out.len();
        let mut xo = try_with_capacity(n)?;
        walk_offsets(&shape, &broadcast_strides(x.shape(), &shape), 0, n, |o| {
            xo.push(o)
        });
        let mut yo = try_with_capacity(n)?;
        walk_offsets(&shape, &broadcast_strides(y.shape(), &shape), 0, n, |o| {
            yo.push(o)
        });
        for ((o, &i), &j) in out.iter_mut().zip(&xo).zip(&yo) {
            let (a, b) = (xs[i].as_str(), ys[j].as_str());
            let mut s = String::with_capacity(a.len() + b.len());
            s.push_str(a);
            s.push_str(b);
            *o = RString::from(s);
        }
        Ok(())
    }
}

fn string_concat_factory(_: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(StringConcat))
}

// ---------------------------------------------------------------- StringSplit

#[derive(Clone, Debug)]
struct StringSplit {
    /// `None`: split on runs of whitespace, ignoring leading and trailing whitespace.
    delimiter: Option<String>,
    maxsplit: Option<usize>,
}

fn string_split_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let delimiter = node.string_or("delimiter", "")?;
    let maxsplit = match node.attr("maxsplit") {
        None => None,
        Some(_) => {
            let m = node.int_or("maxsplit", -1)?;
            if m < 0 {
                None
            } else {
                Some(m as usize)
            }
        }
    };
    Ok(Box::new(StringSplit {
        delimiter: (!delimiter.is_empty()).then_some(delimiter),
        maxsplit,
    }))
}

/// Python's `str.split(None, maxsplit)`.
fn split_whitespace(s: &str, maxsplit: Option<usize>) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() {
        if maxsplit.is_some_and(|m| out.len() == m) {
            out.push(rest);
            break;
        }
        match rest.find(char::is_whitespace) {
            Some(end) => {
                out.push(&rest[..end]);
                rest = rest[end..].trim_start();
            }
            None => {
                out.push(rest);
                break;
            }
        }
    }
    out
}

impl StringSplit {
    fn split<'s>(&self, s: &'s str) -> Vec<&'s str> {
        match (&self.delimiter, self.maxsplit) {
            (None, m) => split_whitespace(s, m),
            (Some(d), None) => s.split(d.as_str()).collect(),
            (Some(d), Some(m)) => s.splitn(m + 1, d.as_str()).collect(),
        }
    }
}

impl Kernel for StringSplit {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = input("StringSplit", inputs, 0, "X")?;
        let parts: Vec<Vec<&str>> = x.as_strings()?.iter().map(|s| self.split(s)).collect();
        let width = parts.iter().map(Vec::len).max().unwrap_or(0);
        let mut shape = x.shape().to_vec();
        shape.push(width);
        let out = ctx.output(0, DType::String, &shape)?.into_strings()?;
        if width > 0 {
            for (row, p) in out.chunks_mut(width).zip(&parts) {
                for (o, s) in row.iter_mut().zip(p) {
                    *o = RString::from(*s);
                }
            }
        }
        if ctx.num_outputs() > 1 {
            let lens = ctx.output_slice::<i64>(1, x.shape())?;
            for (l, p) in lens.iter_mut().zip(&parts) {
                *l = p.len() as i64;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- RegexFullMatch

#[derive(Clone, Debug)]
struct RegexFullMatch {
    re: regex_lite::Regex,
}

fn regex_full_match_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let pattern = match node.attr("pattern") {
        Some(AttrValue::String(p)) => p.to_string(),
        Some(other) => {
            return Err(PluginError::invalid(format!(
                "RegexFullMatch: attribute 'pattern' must be STRING, got {other:?}"
            )))
        }
        None => {
            return Err(PluginError::invalid(
                "RegexFullMatch: attribute 'pattern' is required",
            ))
        }
    };
    let re = regex_lite::Regex::new(&format!(r"\A(?:{pattern})\z")).map_err(|e| {
        PluginError::invalid(format!(
            "RegexFullMatch: attribute 'pattern' is not a valid regex: {e}"
        ))
    })?;
    Ok(Box::new(RegexFullMatch { re }))
}

impl Kernel for RegexFullMatch {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = input("RegexFullMatch", inputs, 0, "X")?;
        let xs = x.as_strings()?;
        // Bool tensors are one byte per element, 0 or 1.
        let out = ctx.output(0, DType::Bool, x.shape())?.into_bytes()?;
        for (o, s) in out.iter_mut().zip(xs) {
            *o = u8::from(self.re.is_match(s.as_str()));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- TfIdfVectorizer

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Weighting {
    Tf,
    Idf,
    TfIdf,
}

/// The pool of n-grams: each maps to its output column.
#[derive(Clone, Debug)]
enum Pool {
    Ints(HashMap<Vec<i64>, usize>),
    Strings(HashMap<Vec<String>, usize>),
}

#[derive(Clone, Debug)]
struct TfIdf {
    min_n: usize,
    max_n: usize,
    max_skip: usize,
    mode: Weighting,
    weights: Option<Vec<f32>>,
    out_size: usize,
    pool: Pool,
}

/// Splits the flat pool into n-grams: `counts[k]` is where the (k+1)-grams start.
fn ngrams<T: Clone + Hash + Eq>(
    pool: &[T],
    counts: &[i64],
    indexes: &[i64],
) -> Result<HashMap<Vec<T>, usize>, PluginError> {
    let mut map = HashMap::new();
    let mut k = 0usize;
    for (level, &start) in counts.iter().enumerate() {
        let n = level + 1;
        let end = counts.get(level + 1).map_or(pool.len() as i64, |&e| e);
        if start < 0 || end < start || end as usize > pool.len() {
            return Err(PluginError::invalid(format!(
                "TfIdfVectorizer: attribute 'ngram_counts' {counts:?} does not fit a pool of {}",
                pool.len()
            )));
        }
        let items = &pool[start as usize..end as usize];
        if !items.len().is_multiple_of(n) {
            return Err(PluginError::invalid(format!(
                "TfIdfVectorizer: the {n}-gram part of the pool has {} items, not a multiple \
                 of {n}",
                items.len()
            )));
        }
        for g in items.chunks(n) {
            let &idx = indexes.get(k).ok_or_else(|| {
                PluginError::invalid(format!(
                    "TfIdfVectorizer: attribute 'ngram_indexes' has {} values, the pool more \
                     n-grams",
                    indexes.len()
                ))
            })?;
            if idx < 0 {
                return Err(PluginError::invalid(format!(
                    "TfIdfVectorizer: attribute 'ngram_indexes' holds {idx}"
                )));
            }
            map.insert(g.to_vec(), idx as usize);
            k += 1;
        }
    }
    Ok(map)
}

fn tfidf_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let pos = |name: &str, min: i64| -> Result<usize, PluginError> {
        let v = node.int_or(name, -1)?;
        if v < min {
            return Err(PluginError::invalid(format!(
                "TfIdfVectorizer: attribute '{name}' must be >= {min}, got {v}"
            )));
        }
        Ok(v as usize)
    };
    let min_n = pos("min_gram_length", 1)?;
    let max_n = pos("max_gram_length", 1)?;
    let max_skip = pos("max_skip_count", 0)?;
    if min_n > max_n {
        return Err(PluginError::invalid(format!(
            "TfIdfVectorizer: min_gram_length {min_n} exceeds max_gram_length {max_n}"
        )));
    }
    let mode = match node.string_or("mode", "")?.as_str() {
        "TF" => Weighting::Tf,
        "IDF" => Weighting::Idf,
        "TFIDF" => Weighting::TfIdf,
        other => {
            return Err(PluginError::invalid(format!(
                "TfIdfVectorizer: attribute 'mode' must be TF, IDF or TFIDF, got '{other}'"
            )))
        }
    };
    let counts = node.ints("ngram_counts")?.unwrap_or_default();
    let indexes = node.ints("ngram_indexes")?.unwrap_or_default();
    let out_size = indexes
        .iter()
        .copied()
        .max()
        .map_or(0, |m| m.saturating_add(1).max(0) as usize);
    let pool = match (
        node.ints("pool_int64s")?,
        strings_attr(node, "pool_strings")?,
    ) {
        (Some(p), None) => Pool::Ints(ngrams(&p, &counts, &indexes)?),
        (None, Some(p)) => Pool::Strings(ngrams(&p, &counts, &indexes)?),
        _ => {
            return Err(PluginError::invalid(
                "TfIdfVectorizer: exactly one of 'pool_int64s' and 'pool_strings' is required",
            ))
        }
    };
    let weights = node.floats("weights")?;
    if let Some(w) = &weights {
        if w.len() < out_size {
            return Err(PluginError::invalid(format!(
                "TfIdfVectorizer: attribute 'weights' has {} values, the output {out_size} \
                 columns",
                w.len()
            )));
        }
    }
    Ok(Box::new(TfIdf {
        min_n,
        max_n,
        max_skip,
        mode,
        weights,
        out_size,
        pool,
    }))
}

impl TfIdf {
    /// Adds the n-gram counts of `row` into `freq` (as ONNX Runtime counts: unigrams once,
    /// longer n-grams once per skip distance).
    /// `items` holds every element of the pool's n-grams: a gram holding anything else, and
    /// every longer gram from it, matches nothing (so a row of such values costs one lookup
    /// per position and skip, however long the grams and the skips).
    fn count<T: Hash + Eq + Clone>(
        &self,
        map: &HashMap<Vec<T>, usize>,
        items: &HashSet<&T>,
        row: &[T],
        freq: &mut [f32],
    ) {
        let mut start_n = self.min_n;
        // The gram lengths and skips are attributes: a gram never holds more than the row,
        // and no skip of the row's length or more fits a 2-gram.
        let mut gram: Vec<T> = Vec::with_capacity(self.max_n.min(row.len()));
        let in_pool: Vec<bool> = row.iter().map(|v| items.contains(v)).collect();
        let max_skip = self.max_skip.saturating_add(1).min(row.len().max(1));
        for skip in 1..=max_skip {
            for i in 0..row.len() {
                if i.saturating_add(skip.saturating_mul(start_n - 1)) >= row.len() {
                    break;
                }
                gram.clear();
                for n in 1..=self.max_n {
                    let at = i.saturating_add((n - 1).saturating_mul(skip));
                    if at >= row.len() || !in_pool[at] {
                        break;
                    }
                    gram.push(row[at].clone());
                    if n >= start_n {
                        if let Some(&idx) = map.get(&gram) {
                            if let Some(f) = freq.get_mut(idx) {
                                *f += 1.0;
                            }
                        }
                    }
                }
            }
            if start_n == 1 {
                start_n = 2;
                if start_n > self.max_n {
                    break;
                }
            }
        }
    }
}

impl Kernel for TfIdf {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = input("TfIdfVectorizer", inputs, 0, "X")?;
        let (rows, width, shape) = match x.shape() {
            &[c] => (1, c, vec![self.out_size]),
            &[n, c] => (n, c, vec![n, self.out_size]),
            s => {
                return Err(PluginError::invalid(format!(
                    "TfIdfVectorizer: input 'X' must be [C] or [N, C], got {s:?}"
                )))
            }
        };
        let y = ctx.output_slice::<f32>(0, &shape)?;
        if self.out_size == 0 {
            return Ok(());
        }
        match (&self.pool, x.dtype) {
            (Pool::Strings(map), DType::String) => {
                let xs: Vec<String> = x.as_strings()?.iter().map(|s| s.to_string()).collect();
                let items = map.keys().flatten().collect();
                for r in 0..rows {
                    let row = &xs[r * width..(r + 1) * width];
                    let freq = &mut y[r * self.out_size..(r + 1) * self.out_size];
                    self.count(map, &items, row, freq);
                }
            }
            (Pool::Ints(map), DType::I32 | DType::I64) => {
                let xs = x.to_i64s()?;
                let items = map.keys().flatten().collect();
                for r in 0..rows {
                    let row = &xs[r * width..(r + 1) * width];
                    let freq = &mut y[r * self.out_size..(r + 1) * self.out_size];
                    self.count(map, &items, row, freq);
                }
            }
            (_, t) => {
                return Err(PluginError::invalid(format!(
                    "TfIdfVectorizer: input 'X' of type {t} does not match the pool's type"
                )))
            }
        }
        let weight = |i: usize| self.weights.as_ref().map_or(1.0, |w| w[i]);
        match self.mode {
            Weighting::Tf => {}
            Weighting::Idf => {
                for row in y.chunks_mut(self.out_size) {
                    for (i, v) in row.iter_mut().enumerate() {
                        *v = if *v > 0.0 { weight(i) } else { 0.0 };
                    }
                }
            }
            Weighting::TfIdf => {
                for row in y.chunks_mut(self.out_size) {
                    for (i, v) in row.iter_mut().enumerate() {
                        *v *= weight(i);
                    }
                }
            }
        }
        Ok(())
    }
}

fn reg(
    r: &mut Registrar,
    op: &str,
    since: i32,
    constraints: &[(&str, &[DType])],
    inputs: &[&str],
    outputs: &[&str],
    f: Factory,
) {
    let mut desc = KernelDesc::onnx(op, since, OPEN_END)
        .inputs(inputs)
        .outputs(outputs);
    for (name, types) in constraints {
        desc = desc.constraint(name, types);
    }
    r.kernel(desc, f);
}

pub fn register(r: &mut Registrar) {
    let s: &[DType] = &[DType::String];
    reg(
        r,
        "StringNormalizer",
        10,
        &[("X", s)],
        &["X"],
        &["X"],
        string_normalizer_factory,
    );
    reg(
        r,
        "StringConcat",
        20,
        &[("T", s)],
        &["T", "T"],
        &["T"],
        string_concat_factory,
    );
    reg(
        r,
        "StringSplit",
        20,
        &[("T1", s), ("T2", s), ("T3", &[DType::I64])],
        &["T1"],
        &["T2", "T3"],
        string_split_factory,
    );
    reg(
        r,
        "RegexFullMatch",
        20,
        &[("T1", s), ("T2", &[DType::Bool])],
        &["T1"],
        &["T2"],
        regex_full_match_factory,
    );
    reg(
        r,
        "TfIdfVectorizer",
        9,
        &[
            ("T", &[DType::String, DType::I32, DType::I64]),
            ("T1", &[DType::F32]),
        ],
        &["T"],
        &["T1"],
        tfidf_factory,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testcases::run_cases_min;
    use opreg_sdk::{
        host::HostTensor,
        testkit::{run_kernel, NodeSpec},
    };

    #[test]
    fn official_cases() {
        run_cases_min(&["test_strnormalizer_"], 6, string_normalizer_factory);
        run_cases_min(&["test_string_concat"], 5, string_concat_factory);
        run_cases_min(&["test_string_split"], 6, string_split_factory);
        run_cases_min(&["test_regex_full_match"], 3, regex_full_match_factory);
        run_cases_min(&["test_tfidfvectorizer"], 7, tfidf_factory);
    }

    fn strings(shape: &[usize], v: &[&str]) -> HostTensor {
        let b: Vec<&[u8]> = v.iter().map(|s| s.as_bytes()).collect();
        HostTensor::from_strings(shape, &b).expect("strings")
    }

    #[test]
    fn whitespace_split_matches_python() {
        assert_eq!(split_whitespace("  a  b c ", None), vec!["a", "b", "c"]);
        assert_eq!(split_whitespace("  a  b c ", Some(1)), vec!["a", "b c "]);
        assert_eq!(split_whitespace("   ", None), Vec::<&str>::new());
        assert_eq!(split_whitespace("a b", Some(0)), vec!["a b"]);
    }

    #[test]
    fn normalizer_case_insensitive_lower() {
        let x = strings(&[3], &["Stop", "GO", "stop"]);
        let node = NodeSpec::onnx("StringNormalizer", 10)
            .attr("case_change_action", AttrValue::String("LOWER".into()))
            .attr("stopwords", AttrValue::Strings(vec!["STOP".into()]));
        let out = run_kernel(string_normalizer_factory, &node, &[&x], None).expect("run");
        assert_eq!(out[0].shape(), &[1]);
        assert_eq!(out[0].strings()[0].as_str(), "go");
    }

    #[test]
    fn tfidf_idf_and_tfidf_weights() {
        let x = strings(&[4], &["a", "b", "a", "b"]);
        for (mode, want) in [("IDF", [0.5f32, 2.0, 4.0]), ("TFIDF", [1.0, 4.0, 8.0])] {
            let node = NodeSpec::onnx("TfIdfVectorizer", 9)
                .attr("mode", AttrValue::String(mode.into()))
                .attr("min_gram_length", AttrValue::Int(1))
                .attr("max_gram_length", AttrValue::Int(2))
                .attr("max_skip_count", AttrValue::Int(0))
                .attr("ngram_counts", AttrValue::Ints(vec![0, 2]))
                .attr("ngram_indexes", AttrValue::Ints(vec![0, 1, 2]))
                .attr(
                    "pool_strings",
                    AttrValue::Strings(vec!["a".into(), "b".into(), "a".into(), "b".into()]),
                )
                .attr("weights", AttrValue::Floats(vec![0.5, 2.0, 4.0]));
            let out = run_kernel(tfidf_factory, &node, &[&x], None).expect("run");
            assert_eq!(out[0].to_vec::<f32>().expect("f32"), want, "{mode}");
        }
    }

    #[test]
    fn regex_requires_a_full_match() {
        let x = strings(&[2], &["abc", "xabc"]);
        let node =
            NodeSpec::onnx("RegexFullMatch", 20).attr("pattern", AttrValue::String("a.c|b".into()));
        let out = run_kernel(regex_full_match_factory, &node, &[&x], None).expect("run");
        assert_eq!(out[0].bytes(), &[1, 0]);
        let bad =
            NodeSpec::onnx("RegexFullMatch", 20).attr("pattern", AttrValue::String("(".into()));
        assert!(run_kernel(regex_full_match_factory, &bad, &[&x], None).is_err());
    }

    /// Broadcasting two 2^20-string tensors into 2^40 outputs is refused as too large (the
    /// offset tables used to be allocated first, infallibly); a huge max_gram_length does
    /// not reserve memory by itself.
    #[test]
    fn huge_broadcasts_and_gram_lengths() {
        let one: Vec<&[u8]> = vec![b"a"; 1 << 20];
        let x = HostTensor::from_strings(&[1 << 20, 1], &one).expect("x");
        let y = HostTensor::from_strings(&[1, 1 << 20], &one).expect("y");
        let e = run_kernel(
            string_concat_factory,
            &NodeSpec::onnx("StringConcat", 20),
            &[&x, &y],
            None,
        )
        .expect_err("too large");
        assert_eq!(e.code, ErrorCode::ResourceExhausted, "{}", e.message);

        let node = NodeSpec::onnx("TfIdfVectorizer", 9)
            .attr("min_gram_length", AttrValue::Int(1))
            .attr("max_gram_length", AttrValue::Int(1 << 62))
            .attr("max_skip_count", AttrValue::Int(1 << 62))
            .attr("mode", AttrValue::String("TF".into()))
            .attr("ngram_counts", AttrValue::Ints(vec![0]))
            .attr("ngram_indexes", AttrValue::Ints(vec![0, 1]))
            .attr("pool_int64s", AttrValue::Ints(vec![7, 8]));
        let x = HostTensor::from_vec(&[4], &[7i64, 8, 7, 9]).expect("x");
        let out = run_kernel(tfidf_factory, &node, &[&x], None).expect("run");
        assert_eq!(out[0].to_vec::<f32>().expect("f32"), vec![2.0, 1.0]);
    }
}
