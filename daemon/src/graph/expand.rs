//! Import-time expansion of composite operators into standard ONNX operators.
//!
//! `FlexAttention` (`ai.onnx.preview`, opset 1) carries two GRAPH attributes, `score_mod` and
//! `prob_mod`: arbitrary ONNX graphs over standard operators that modify the attention scores
//! and probabilities. A plugin kernel sees attributes, not a runtime: it cannot run those
//! graphs. So the daemon rewrites every `FlexAttention` node, right after import, into the
//! standard operators its ONNX function body describes, with the modifier graphs' nodes
//! inlined in place. Every backend that runs `MatMul`/`Softmax` then runs it, and the graph
//! passes (constant folding, fusion, dead-node removal) see and optimize the whole
//! computation.
//!
//! The expansion follows the reference implementation's numerics:
//!
//! ```text
//! s      = sqrt(float32(scale)) cast to Q's type      (scale defaults to 1/sqrt(E))
//! scores = MatMul(Q * s, Transpose(repeat(K * s), [0,1,3,2]))
//! scores = Cast(scores, softmax type)                  (default: float32 for 16-bit
//!                                                       inputs, else Q's type)
//! scores = score_mod(scores)                           (inlined)
//! probs  = Softmax(scores, axis = -1)
//! probs  = prob_mod(probs)                             (inlined)
//! Y      = Cast(MatMul(probs, repeat(Cast(V, softmax type))), Q's type)
//! ```
//!
//! `repeat` shares each K/V head between `Hq / Hkv` consecutive query heads (grouped-query
//! attention): `Unsqueeze` a unit axis after the heads, `Expand` it to the group size and
//! `Reshape` the two axes into one, with sizes from `Shape` where the model leaves them
//! symbolic. It is left out where both head counts are known and equal.

// Model data reaches this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use super::{
    import::{import_subgraph, Dim, Model, Node, Subgraph},
    GraphError,
};
use half::{bf16, f16};
use opreg_sdk::{host::HostTensor, kernel::Attribute, AttrValue, DType};
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

/// The domain of the operators expanded here.
const PREVIEW: &str = "ai.onnx.preview";

fn is_flex(n: &Node) -> bool {
    n.domain == PREVIEW && n.op_type == "FlexAttention"
}

/// Rewrites every `FlexAttention` node of `model` into standard ONNX operators, in place of
/// the node, and likewise in its control-flow subgraphs (`If` branches, `Loop`/`Scan`
/// bodies, at any depth: their FlexAttention nodes may read values of the enclosing graphs,
/// whose types the expansion needs). Other nodes are left untouched; a no-op when the model
/// has none. Run once, on the top-level model.
pub(super) fn expand(model: &mut Model) -> Result<(), GraphError> {
    expand_in(model, &[], None, &HashSet::new())
}

fn has_flex(model: &Model) -> bool {
    model
        .nodes
        .iter()
        .any(|n| is_flex(n) || n.subgraphs.iter().any(|g| has_flex(&g.model)))
}

/// [`expand`] for a graph whose formal inputs are `formal` (none for the top-level graph),
/// inside `parent`, where the enclosing graphs use the names `outer`.
fn expand_in(
    model: &mut Model,
    formal: &[(String, Option<DType>)],
    parent: Option<&Scope<'_>>,
    outer: &HashSet<String>,
) -> Result<(), GraphError> {
    if !has_flex(model) {
        return Ok(());
    }
    let mut names = Names::of(model, formal, outer);
    if model.nodes.iter().any(is_flex) {
        let mut initializers = HashMap::new();
        let mut expansions: HashMap<usize, Vec<Node>> = HashMap::new();
        {
            let scope = Scope::new(model, formal, parent);
            for (i, node) in model.nodes.iter().enumerate() {
                if !is_flex(node) {
                    continue;
                }
                let mut x = Expander {
                    scope: &scope,
                    names: &mut names,
                    initializers: &mut initializers,
                    node,
                    prefix: if node.name.is_empty() {
                        "FlexAttention".to_string()
                    } else {
                        node.name.clone()
                    },
                    out: Vec::new(),
                };
                x.flex_attention()?;
                expansions.insert(i, x.out);
            }
        }
        let old = std::mem::take(&mut model.nodes);
        for (i, node) in old.into_iter().enumerate() {
            match expansions.remove(&i) {
                Some(nodes) => model.nodes.extend(nodes),
                None => model.nodes.push(node),
            }
        }
        model.initializers.extend(initializers);
    }

    // Subgraphs, with this graph (as expanded) as their enclosing scope.
    let mut rewritten = Vec::new();
    {
        let scope = Scope::new(model, formal, parent);
        for (i, node) in model.nodes.iter().enumerate() {
            for (j, g) in node.subgraphs.iter().enumerate() {
                if !has_flex(&g.model) {
                    continue;
                }
                let mut sub = g.model.clone();
                expand_in(&mut sub, &g.formal, Some(&scope), &names.0).map_err(|e| {
                    let at = format!("node {} '{}'", node.label(), g.attr);
                    match e {
                        GraphError::Invalid(m) => GraphError::Invalid(format!("{at}: {m}")),
                        GraphError::Unsupported(m) => GraphError::Unsupported(format!("{at}: {m}")),
                        other => other,
                    }
                })?;
                let sub = Subgraph {
                    attr: g.attr.clone(),
                    model: sub,
                    formal: g.formal.clone(),
                };
                rewritten.push((i, j, Arc::new(sub)));
            }
        }
    }
    for (i, j, g) in rewritten {
        if let Some(slot) = model.nodes.get_mut(i).and_then(|n| n.subgraphs.get_mut(j)) {
            *slot = g;
        }
    }
    Ok(())
}

/// The value names in use, to hand out unused ones.
struct Names(HashSet<String>);

impl Names {
    /// The names `model` (its subgraphs included), its formal inputs and the enclosing
    /// graphs (`outer`) use: a new value must shadow none that a subgraph may read.
    fn of(model: &Model, formal: &[(String, Option<DType>)], outer: &HashSet<String>) -> Self {
        fn add(set: &mut HashSet<String>, model: &Model) {
            set.extend(model.initializers.keys().cloned());
            set.extend(model.inputs.iter().map(|i| i.name.clone()));
            set.extend(model.outputs.iter().map(|o| o.name.clone()));
            for n in &model.nodes {
                set.extend(n.inputs.iter().chain(&n.outputs).cloned());
                for g in &n.subgraphs {
                    set.extend(g.formal.iter().map(|(f, _)| f.clone()));
                    add(set, &g.model);
                }
            }
        }
        let mut set = outer.clone();
        set.extend(formal.iter().map(|(f, _)| f.clone()));
        add(&mut set, model);
        Names(set)
    }

    /// `base`, else `base_1`, `base_2`, … : the first one not taken (as
    /// [`Model::fresh_name`] does), now taken.
    fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut k = 1;
        while self.0.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        self.0.insert(name.clone());
        name
    }
}

/// A graph with the graphs enclosing it: where the values a node reads are defined.
struct Scope<'a> {
    model: &'a Model,
    producers: HashMap<&'a str, usize>,
    /// A subgraph's formal inputs, with the types it declares.
    formal: &'a [(String, Option<DType>)],
    parent: Option<&'a Scope<'a>>,
}

/// Where a scope finds a value.
enum Found<'a> {
    Initializer(&'a HostTensor),
    Input(DType, Option<&'a Vec<Dim>>),
    /// A formal input of a subgraph, with its type where declared.
    Formal(Option<DType>),
    Node(&'a Scope<'a>, &'a Node),
}

impl<'a> Scope<'a> {
    fn new(
        model: &'a Model,
        formal: &'a [(String, Option<DType>)],
        parent: Option<&'a Scope<'a>>,
    ) -> Self {
        Scope {
            model,
            producers: model.producers(),
            formal,
            parent,
        }
    }

    /// Where `name` is defined: in this graph, else in the nearest enclosing one.
    fn find(&'a self, name: &str) -> Option<Found<'a>> {
        let m = self.model;
        if let Some(t) = m.initializers.get(name) {
            return Some(Found::Initializer(t));
        }
        if let Some(i) = m.inputs.iter().find(|i| i.name == name) {
            return Some(Found::Input(i.dtype, i.shape.as_ref()));
        }
        if let Some((_, t)) = self.formal.iter().find(|(f, _)| f == name) {
            return Some(Found::Formal(*t));
        }
        match self.producers.get(name) {
            Some(&i) => Some(Found::Node(self, m.nodes.get(i)?)),
            None => self.parent?.find(name),
        }
    }

    /// A value's shape as far as the model declares it (graph inputs and initializers).
    fn shape(&'a self, name: &str) -> Option<Vec<Dim>> {
        match self.find(name)? {
            Found::Initializer(t) => Some(t.shape().iter().map(|&d| Dim::Fixed(d)).collect()),
            Found::Input(_, shape) => shape.cloned(),
            _ => None,
        }
    }

    /// A value's element type, followed back through the operators whose output has the
    /// type of an input; `None` where that leads nowhere known.
    fn dtype(&'a self, name: &str) -> Option<DType> {
        let mut scope = self;
        let mut name = name.to_string();
        // Bounded: a malformed model may have a cycle.
        for _ in 0..256 {
            let (at, node) = match scope.find(&name)? {
                Found::Initializer(t) => return Some(t.dtype()),
                Found::Input(t, _) => return Some(t),
                Found::Formal(t) => return t,
                Found::Node(at, node) => (at, node),
            };
            let first = node.outputs.first().is_some_and(|o| *o == name);
            let next = if is_flex(node) {
                0
            } else if !node.domain.is_empty() {
                return None;
            } else {
                match node.op_type.as_str() {
                    "Cast" => {
                        return match attr(node, "to")? {
                            AttrValue::Int(c) => {
                                i32::try_from(*c).ok().and_then(DType::from_onnx_code)
                            }
                            _ => None,
                        }
                    }
                    "Constant" => {
                        return match attr(node, "value")? {
                            AttrValue::Tensor(t) => Some(t.dtype),
                            _ => None,
                        }
                    }
                    // The output has the type of the second input (DequantizeLinear: the
                    // scale's).
                    "CastLike" | "Where" | "DequantizeLinear" if first => 1,
                    "Split" => 0,
                    "Identity" | "Reshape" | "Transpose" | "Squeeze" | "Unsqueeze" | "Flatten"
                    | "Expand" | "Tile" | "Slice" | "Gather" | "Concat" | "Pad" | "Add" | "Sub"
                    | "Mul" | "Div" | "Pow" | "Neg" | "Abs" | "Relu" | "LeakyRelu" | "Gelu"
                    | "Sigmoid" | "Tanh" | "Erf" | "Exp" | "Log" | "Sqrt" | "Softmax"
                    | "LogSoftmax" | "MatMul" | "Gemm" | "Clip" | "Max" | "Min" | "Dropout"
                    | "LayerNormalization" | "RMSNormalization" | "BatchNormalization"
                        if first =>
                    {
                        0
                    }
                    _ => return None,
                }
            };
            name = node.inputs.get(next).filter(|s| !s.is_empty())?.clone();
            scope = at;
        }
        None
    }
}

fn attr<'a>(node: &'a Node, name: &str) -> Option<&'a AttrValue> {
    node.attributes
        .iter()
        .find(|a| a.name.as_str() == name)
        .map(|a| &a.value)
}

fn kind_name(v: &AttrValue) -> &'static str {
    match v {
        AttrValue::Int(_) => "INT",
        AttrValue::Float(_) => "FLOAT",
        AttrValue::String(_) => "STRING",
        AttrValue::Ints(_) => "INTS",
        AttrValue::Floats(_) => "FLOATS",
        AttrValue::Strings(_) => "STRINGS",
        AttrValue::Tensor(_) => "TENSOR",
        AttrValue::Graph(_) => "GRAPH",
        _ => "another kind",
    }
}

fn ints(name: &str, v: Vec<i64>) -> Attribute {
    Attribute {
        name: name.into(),
        value: AttrValue::Ints(v),
    }
}

fn int(name: &str, v: i64) -> Attribute {
    Attribute {
        name: name.into(),
        value: AttrValue::Int(v),
    }
}

/// Expands one node: collects the nodes replacing it in `out` and the constants they need in
/// `initializers`.
struct Expander<'a> {
    scope: &'a Scope<'a>,
    names: &'a mut Names,
    initializers: &'a mut HashMap<String, Arc<HostTensor>>,
    node: &'a Node,
    /// Names of the values and nodes added start with this.
    prefix: String,
    out: Vec<Node>,
}

/// How a value of the expansion gets the element type of an input.
#[derive(Clone, Copy)]
enum TypeOf {
    /// Known at import: a `Cast`, or a constant of that type.
    Known(DType),
    /// Known only at run time: a `CastLike` to the input (opset 15).
    Like,
}

impl Expander<'_> {
    fn invalid(&self, what: impl std::fmt::Display) -> GraphError {
        GraphError::Invalid(format!("node {}: {what}", self.node.label()))
    }

    fn unsupported(&self, what: impl std::fmt::Display) -> GraphError {
        GraphError::Unsupported(format!("node {}: {what}", self.node.label()))
    }

    /// A new initializer holding `t`.
    fn constant(&mut self, what: &str, t: HostTensor) -> String {
        let name = self.names.fresh(&format!("{}_{what}", self.prefix));
        self.initializers.insert(name.clone(), Arc::new(t));
        name
    }

    fn i64s(&mut self, what: &str, v: &[i64]) -> Result<String, GraphError> {
        let t = HostTensor::from_vec(&[v.len()], v)
            .map_err(|e| GraphError::Invalid(format!("constant {what}: {}", e.message)))?;
        Ok(self.constant(what, t))
    }

    /// A scalar of type `dtype` holding `v` (rounded as a cast from float32 rounds it).
    fn scalar(&mut self, what: &str, dtype: DType, v: f32) -> Result<String, GraphError> {
        let t = match dtype {
            DType::F16 => HostTensor::from_vec(&[], &[f16::from_f32(v)]),
            DType::BF16 => HostTensor::from_vec(&[], &[bf16::from_f32(v)]),
            DType::F64 => HostTensor::from_vec(&[], &[f64::from(v)]),
            _ => HostTensor::from_vec(&[], &[v]),
        }
        .map_err(|e| GraphError::Invalid(format!("constant {what}: {}", e.message)))?;
        Ok(self.constant(what, t))
    }

    /// Appends `op(inputs)` with one new output, whose name it returns (and the node's).
    fn op(&mut self, op: &str, what: &str, inputs: &[&str], attributes: Vec<Attribute>) -> String {
        let out = self.names.fresh(&format!("{}_{what}", self.prefix));
        self.op_into(op, out.clone(), inputs, attributes, out.clone());
        out
    }

    /// Appends node `name`, `op(inputs)` writing `out`.
    fn op_into(
        &mut self,
        op: &str,
        name: String,
        inputs: &[&str],
        attributes: Vec<Attribute>,
        out: String,
    ) {
        self.out.push(Node {
            name,
            domain: String::new(),
            op_type: op.into(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec![out],
            attributes,
            subgraphs: Vec::new(),
        });
    }

    /// `x` converted to `to`, where `like` is an input of that type: the value itself when
    /// its type is known to be `to` already.
    fn cast(&mut self, what: &str, x: &str, from: Option<DType>, to: TypeOf, like: &str) -> String {
        match to {
            TypeOf::Known(t) if from == Some(t) => x.to_string(),
            TypeOf::Known(t) => self.op("Cast", what, &[x], vec![int("to", t.onnx_code().into())]),
            TypeOf::Like => self.op("CastLike", what, &[x, like], Vec::new()),
        }
    }

    /// `Unsqueeze(x, [axis])` in the form of the model's opset.
    fn unsqueeze(
        &mut self,
        what: &str,
        x: &str,
        axis: i64,
        opset: i64,
    ) -> Result<String, GraphError> {
        if opset >= 13 {
            let axes = self.i64s(&format!("{what}_axes"), &[axis])?;
            Ok(self.op("Unsqueeze", what, &[x, &axes], Vec::new()))
        } else {
            Ok(self.op("Unsqueeze", what, &[x], vec![ints("axes", vec![axis])]))
        }
    }

    fn flex_attention(&mut self) -> Result<(), GraphError> {
        let node = self.node;
        let [q, k, v] = node.inputs.as_slice() else {
            return Err(self.invalid(format!(
                "FlexAttention takes 3 inputs (Q, K, V), the node has {}",
                node.inputs.len()
            )));
        };
        if q.is_empty() || k.is_empty() || v.is_empty() {
            return Err(self.invalid("Q, K and V are all required"));
        }
        let [y] = node.outputs.as_slice() else {
            return Err(self.invalid(format!(
                "FlexAttention has 1 output (Y), the node has {}",
                node.outputs.len()
            )));
        };
        if y.is_empty() {
            // Nothing reads the result: the node expands to nothing.
            return Ok(());
        }

        let mut scale = None;
        let mut precision = None;
        let mut score_mod = None;
        let mut prob_mod = None;
        for a in &node.attributes {
            match (a.name.as_str(), &a.value) {
                ("scale", AttrValue::Float(f)) => scale = Some(*f),
                ("softmax_precision", AttrValue::Int(p)) => precision = Some(*p),
                ("score_mod", AttrValue::Graph(g)) => score_mod = Some(g.as_slice()),
                ("prob_mod", AttrValue::Graph(g)) => prob_mod = Some(g.as_slice()),
                ("scale" | "softmax_precision" | "score_mod" | "prob_mod", other) => {
                    return Err(self.invalid(format!(
                        "attribute '{}' has the wrong type ({})",
                        a.name,
                        kind_name(other)
                    )))
                }
                (other, _) => {
                    return Err(self.invalid(format!("FlexAttention has no attribute '{other}'")))
                }
            }
        }
        if scale.is_some_and(|s| !s.is_finite()) {
            return Err(self.invalid("attribute 'scale' is not a finite number"));
        }

        // What the model declares of the shapes: ranks must be 4 and sizes agree.
        let shape = |name: &str| self.scope.shape(name);
        let (qs, ks, vs) = (shape(q), shape(k), shape(v));
        for (what, s) in [("Q", &qs), ("K", &ks), ("V", &vs)] {
            if let Some(s) = s {
                if s.len() != 4 {
                    return Err(self.invalid(format!(
                        "{what} must have rank 4 (batch, heads, sequence, head size), it has rank {}",
                        s.len()
                    )));
                }
            }
        }
        let fixed = |s: &Option<Vec<Dim>>, i: usize| match s.as_ref().and_then(|s| s.get(i)) {
            Some(Dim::Fixed(n)) => Some(*n),
            _ => None,
        };
        let agree = |what: &str, a: Option<usize>, b: Option<usize>| match (a, b) {
            (Some(a), Some(b)) if a != b => Err(self.invalid(format!("{what} ({a} and {b})"))),
            _ => Ok(()),
        };
        agree(
            "Q and K must have the same head size",
            fixed(&qs, 3),
            fixed(&ks, 3),
        )?;
        agree(
            "K and V must have the same number of heads",
            fixed(&ks, 1),
            fixed(&vs, 1),
        )?;
        agree(
            "K and V must have the same sequence length",
            fixed(&ks, 2),
            fixed(&vs, 2),
        )?;
        let hq = fixed(&qs, 1);
        let hkv = fixed(&ks, 1).or(fixed(&vs, 1));
        if let (Some(hq), Some(hkv)) = (hq, hkv) {
            if hq != hkv && (hkv == 0 || hq % hkv != 0) {
                return Err(self.invalid(format!(
                    "Q's {hq} heads are not a multiple of K and V's {hkv} heads"
                )));
            }
        }
        let head_size = fixed(&qs, 3).or(fixed(&ks, 3));

        // Element types: Q, K, V and Y share one.
        let dtype = [q, k, v].into_iter().find_map(|n| self.scope.dtype(n));
        if let Some(t) = dtype {
            if !matches!(t, DType::F16 | DType::BF16 | DType::F32 | DType::F64) {
                return Err(self.invalid(format!(
                    "FlexAttention takes float16, bfloat16, float or double inputs, not {t}"
                )));
            }
        }
        let softmax = match precision {
            Some(p) => match i32::try_from(p).ok().and_then(DType::from_onnx_code) {
                Some(t @ (DType::F16 | DType::BF16 | DType::F32 | DType::F64)) => t,
                _ => {
                    return Err(self.invalid(format!(
                        "softmax_precision {p} is not a floating-point type FlexAttention \
                         computes in (1 float, 10 float16, 11 double, 16 bfloat16)"
                    )))
                }
            },
            None => match dtype {
                Some(DType::F16 | DType::BF16) => DType::F32,
                Some(t) => t,
                None => {
                    return Err(self.unsupported(
                        "the element type of Q is not known at import, and the default \
                         softmax_precision depends on it: set softmax_precision",
                    ))
                }
            },
        };
        let opset = self.scope.model.opset("").ok_or_else(|| {
            self.unsupported(
                "the model imports no default-domain (ai.onnx) opset, which the expansion \
                 into standard operators needs",
            )
        })?;
        let input_type = match dtype {
            Some(t) => TypeOf::Known(t),
            None if opset >= 15 => TypeOf::Like,
            None => {
                return Err(self.unsupported(format!(
                    "the element type of Q is not known at import, and opset {opset} has no \
                     CastLike (opset 15) to convert to it at run time"
                )))
            }
        };
        let repeat = match (hq, hkv) {
            (Some(a), Some(b)) => a != b,
            _ => true,
        };
        if repeat && opset < 8 {
            return Err(self.unsupported(format!(
                "grouped-query attention needs Expand (opset 8); the model imports opset {opset}"
            )));
        }

        // sqrt(scale), in Q's type: Q and K are both scaled by it before the product, as the
        // reference computes. A negative scale has no square root: it scales Q alone.
        let scale = scale.or_else(|| head_size.map(|e| (1.0 / (e as f64).sqrt()) as f32));
        let q_only = scale.is_some_and(|s| s < 0.0);
        let root = match scale {
            Some(s) => {
                let r = if q_only { s } else { s.sqrt() };
                match input_type {
                    TypeOf::Known(t) => self.scalar("ScaleSqrt", t, r)?,
                    TypeOf::Like => {
                        let c = self.scalar("ScaleSqrtF32", DType::F32, r)?;
                        self.cast("ScaleSqrt", &c, Some(DType::F32), input_type, q)
                    }
                }
            }
            None => {
                // 1/sqrt(E) from Q's shape at run time, in double as the reference computes it.
                let shape = self.op("Shape", "QShape", &[q], Vec::new());
                let idx = self.i64s("HeadSizeIndex", &[3])?;
                let e = self.op("Gather", "HeadSize", &[&shape, &idx], vec![int("axis", 0)]);
                let e = self.op("Cast", "HeadSizeF64", &[&e], vec![int("to", 11)]);
                let e = self.op("Sqrt", "SqrtHeadSize", &[&e], Vec::new());
                let s = self.op("Reciprocal", "ScaleF64", &[&e], Vec::new());
                let s = self.op("Cast", "Scale", &[&s], vec![int("to", 1)]);
                let r = self.op("Sqrt", "ScaleSqrtF32", &[&s], Vec::new());
                self.cast("ScaleSqrt", &r, Some(DType::F32), input_type, q)
            }
        };

        // Grouped-query attention: the `Expand` shape `[1, 1, r, 1, 1]`, where r = Hq / Hkv
        // is how many query heads share each K/V head.
        let expand_shape = if !repeat {
            None
        } else if let (Some(hq), Some(hkv)) = (hq, hkv) {
            let r = (hq / hkv.max(1)) as i64;
            Some(self.i64s("RepeatShape", &[1, 1, r, 1, 1])?)
        } else {
            let qshape = self.op("Shape", "QShapeForHeads", &[q], Vec::new());
            let kshape = self.op("Shape", "KShapeForHeads", &[k], Vec::new());
            let one = self.i64s("HeadsIndex", &[1])?;
            let a = self.op(
                "Gather",
                "QNumHeads",
                &[&qshape, &one],
                vec![int("axis", 0)],
            );
            let b = self.op(
                "Gather",
                "KVNumHeads",
                &[&kshape, &one],
                vec![int("axis", 0)],
            );
            let r = self.op("Div", "KVRepeat", &[&a, &b], Vec::new());
            let ones = self.i64s("Ones", &[1, 1])?;
            Some(self.op(
                "Concat",
                "RepeatShape",
                &[&ones, &r, &ones],
                vec![int("axis", 0)],
            ))
        };
        // The number of query heads as a 1-D tensor, for the reshape after the repeat.
        let q_heads = match (&expand_shape, hq) {
            (None, _) => None,
            (Some(_), Some(hq)) => Some(self.i64s("QNumHeadsConst", &[hq as i64])?),
            (Some(_), None) => {
                let qshape = self.op("Shape", "QShapeAll", &[q], Vec::new());
                let one = self.i64s("QHeadsIndex", &[1])?;
                Some(self.op("Gather", "QHeads", &[&qshape, &one], vec![int("axis", 0)]))
            }
        };
        // `x` [B, Hkv, a, b] with each head repeated: [B, Hq, a, b].
        let repeat_heads = |this: &mut Self, what: &str, x: &str| -> Result<String, GraphError> {
            let (Some(expand_shape), Some(q_heads)) = (&expand_shape, &q_heads) else {
                return Ok(x.to_string());
            };
            let u = this.unsqueeze(&format!("{what}Unsqueezed"), x, 2, opset)?;
            let e = this.op(
                "Expand",
                &format!("{what}Expanded"),
                &[&u, expand_shape],
                Vec::new(),
            );
            let shape = this.op("Shape", &format!("{what}Shape"), &[x], Vec::new());
            let tail_idx = this.i64s(&format!("{what}TailIndex"), &[2, 3])?;
            let tail = this.op(
                "Gather",
                &format!("{what}Tail"),
                &[&shape, &tail_idx],
                vec![int("axis", 0)],
            );
            let zero = this.i64s(&format!("{what}Batch"), &[0])?;
            let target = this.op(
                "Concat",
                &format!("{what}AlignedShape"),
                &[&zero, q_heads, &tail],
                vec![int("axis", 0)],
            );
            Ok(this.op(
                "Reshape",
                &format!("{what}Aligned"),
                &[&e, &target],
                Vec::new(),
            ))
        };

        // Scores = (Q·s) @ repeat(K·s)^T, in Q's type. K is scaled and transposed before
        // the repeat: the same values, on Hkv heads rather than Hq.
        let q_scaled = self.op("Mul", "QScaled", &[q, &root], Vec::new());
        let k_scaled = if q_only {
            k.clone()
        } else {
            self.op("Mul", "KScaled", &[k, &root], Vec::new())
        };
        let k_t = self.op(
            "Transpose",
            "KTransposed",
            &[&k_scaled],
            vec![ints("perm", vec![0, 1, 3, 2])],
        );
        let k_t = repeat_heads(self, "KT", &k_t)?;
        let scores = self.op("MatMul", "Score", &[&q_scaled, &k_t], Vec::new());
        let softmax_type = TypeOf::Known(softmax);
        let scores = self.cast("ScoreCast", &scores, dtype, softmax_type, q);
        let scores = match score_mod {
            Some(g) => self.inline("score_mod", g, &scores)?,
            None => scores,
        };
        let probs = self.op("Softmax", "Prob", &[&scores], vec![int("axis", -1)]);
        let probs = match prob_mod {
            Some(g) => self.inline("prob_mod", g, &probs)?,
            None => probs,
        };
        let v_cast = self.cast("VCast", v, dtype, softmax_type, q);
        let v_aligned = repeat_heads(self, "V", &v_cast)?;
        let name = self.names.fresh(&format!("{}_Y", self.prefix));
        if dtype == Some(softmax) {
            self.op_into("MatMul", name, &[&probs, &v_aligned], Vec::new(), y.clone());
        } else {
            let out = self.op("MatMul", "YSoftmaxType", &[&probs, &v_aligned], Vec::new());
            match input_type {
                TypeOf::Known(t) => {
                    let to = vec![int("to", t.onnx_code().into())];
                    self.op_into("Cast", name, &[&out], to, y.clone())
                }
                TypeOf::Like => self.op_into("CastLike", name, &[&out, v], Vec::new(), y.clone()),
            }
        }
        Ok(())
    }

    /// Inlines the modifier graph of attribute `attr` applied to `input`: its nodes with its
    /// formal input read as `input`, its own values and initializers under fresh names.
    /// Returns the value holding its output.
    fn inline(&mut self, attr: &str, bytes: &[u8], input: &str) -> Result<String, GraphError> {
        let (graph, formal) = import_subgraph(bytes, &self.scope.model.opsets)
            .map_err(|e| self.invalid(format!("attribute '{attr}': {e}")))?;
        let [(formal, _)] = formal.as_slice() else {
            return Err(self.invalid(format!(
                "the '{attr}' graph must have exactly 1 input, it has {}",
                formal.len()
            )));
        };
        let [output] = graph.outputs.as_slice() else {
            return Err(self.invalid(format!(
                "the '{attr}' graph must have exactly 1 output, it has {}",
                graph.outputs.len()
            )));
        };
        if let Some(n) = graph.nodes.iter().find(|n| {
            !n.subgraphs.is_empty()
                || n.attributes
                    .iter()
                    .any(|a| matches!(a.value, AttrValue::Graph(_)))
        }) {
            return Err(self.unsupported(format!(
                "the '{attr}' graph's node {} has a subgraph of its own; subgraphs nested in \
                 FlexAttention modifiers are not supported",
                n.label()
            )));
        }
        let mut rename: HashMap<String, String> = HashMap::new();
        rename.insert(formal.clone(), input.to_string());
        let base = format!("{}_{attr}", self.prefix);
        for (name, t) in &graph.initializers {
            if name == formal {
                continue;
            }
            let fresh = self.names.fresh(&format!("{base}_{name}"));
            self.initializers.insert(fresh.clone(), t.clone());
            rename.insert(name.clone(), fresh);
        }
        // Values neither the graph's input, initializers nor nodes produce are read from the
        // enclosing graph, under their own names.
        let map = |rename: &HashMap<String, String>, n: &String| {
            rename.get(n).cloned().unwrap_or_else(|| n.clone())
        };
        // Every value a node produces is renamed before any is read, so that a node order
        // the graph does not keep topological still reads its own values.
        for o in graph.nodes.iter().flat_map(|n| &n.outputs) {
            if !o.is_empty() && !rename.contains_key(o) {
                let fresh = self.names.fresh(&format!("{base}_{o}"));
                rename.insert(o.clone(), fresh);
            }
        }
        for n in &graph.nodes {
            let label = match n.outputs.iter().find(|o| !o.is_empty()) {
                Some(o) => map(&rename, o),
                None => format!("{base}_{}", n.op_type),
            };
            self.out.push(Node {
                name: label,
                domain: n.domain.clone(),
                op_type: n.op_type.clone(),
                inputs: n.inputs.iter().map(|i| map(&rename, i)).collect(),
                outputs: n.outputs.iter().map(|o| map(&rename, o)).collect(),
                attributes: n.attributes.clone(),
                subgraphs: Vec::new(),
            });
        }
        Ok(map(&rename, &output.name))
    }
}

#[cfg(test)]
mod tests;
