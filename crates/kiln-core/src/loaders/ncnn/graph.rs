//! Symbolic dataflow graphs: one built from an ncnn `.param`, one from an [`SrSpec`]; matched
//! node by node so that each ncnn layer with weights is mapped to the basicsr tensor name it
//! computes — by structure, not by file order — and any difference is reported precisely.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::Path;

use super::param::{weights_err, Layer};
use crate::error::{Error, Result};
use crate::models::sr::{SrArch, SrSpec, SrvggAct};

/// An operation, independent of how the converter spelled it.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Input,
    /// 3x3, stride 1, padding 1, with bias.
    Conv {
        cin: usize,
        cout: usize,
    },
    /// LeakyReLU (slope 0 = ReLU).
    Leaky(f32),
    Prelu(usize),
    Concat,
    /// Weighted sum; one coefficient per input.
    Add(Vec<f32>),
    /// Multiplication by a constant (folded into `Add` where it feeds one).
    Scale(f32),
    UpsampleNearest(usize),
    PixelShuffle(usize),
    PixelUnshuffle(usize),
    /// Bicubic resample by a factor (ncnn `Interp` type 3).
    ResizeBicubic(f32),
}

impl Op {
    fn describe(&self) -> String {
        match self {
            Op::Conv { cin, cout } => format!("3x3 conv {cin}->{cout}"),
            Op::Leaky(s) if *s == 0.0 => "ReLU".into(),
            Op::Leaky(s) => format!("LeakyReLU({s})"),
            Op::Prelu(n) => format!("PReLU({n})"),
            Op::Add(c) => format!("sum with coefficients {c:?}"),
            other => format!("{other:?}"),
        }
    }

    fn hash_into(&self, h: &mut DefaultHasher) {
        let q = |x: f32| (f64::from(x) * 1e5).round() as i64;
        std::mem::discriminant(self).hash(h);
        match self {
            Op::Conv { cin, cout } => (cin, cout).hash(h),
            Op::Leaky(s) | Op::Scale(s) | Op::ResizeBicubic(s) => q(*s).hash(h),
            Op::Prelu(n) | Op::UpsampleNearest(n) | Op::PixelShuffle(n) | Op::PixelUnshuffle(n) => n.hash(h),
            Op::Input | Op::Concat | Op::Add(_) => {}
        }
    }
}

#[derive(Debug, Clone)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<usize>,
    /// ncnn: index of the layer that holds this node's weights. Expected graph: unused.
    pub layer: Option<usize>,
    /// Human-readable origin: ncnn layer name, or the basicsr module name.
    pub label: String,
}

/// A dataflow graph in topological order with a single output.
#[derive(Debug, Default)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub output: usize,
}

impl Graph {
    fn push(&mut self, op: Op, inputs: Vec<usize>, layer: Option<usize>, label: impl Into<String>) -> usize {
        // A constant factor feeding a sum becomes that input's coefficient.
        let (op, inputs) = match op {
            Op::Add(coeffs) => {
                let mut new_coeffs = Vec::with_capacity(coeffs.len());
                let mut new_inputs = Vec::with_capacity(inputs.len());
                for (c, i) in coeffs.into_iter().zip(inputs) {
                    match (&self.nodes[i].op, self.nodes[i].inputs.first()) {
                        (Op::Scale(s), Some(&src)) => {
                            new_coeffs.push(c * s);
                            new_inputs.push(src);
                        }
                        _ => {
                            new_coeffs.push(c);
                            new_inputs.push(i);
                        }
                    }
                }
                (Op::Add(new_coeffs), new_inputs)
            }
            op => (op, inputs),
        };
        self.nodes.push(Node { op, inputs, layer, label: label.into() });
        self.nodes.len() - 1
    }

    /// Structural signature of every node (children first; sums are order-independent).
    fn signatures(&self) -> Vec<u64> {
        let mut sigs: Vec<u64> = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            let mut h = DefaultHasher::new();
            node.op.hash_into(&mut h);
            if let Op::Add(coeffs) = &node.op {
                let mut terms: Vec<(i64, u64)> = coeffs
                    .iter()
                    .zip(&node.inputs)
                    .map(|(c, &i)| ((f64::from(*c) * 1e5).round() as i64, sigs[i]))
                    .collect();
                terms.sort_unstable();
                terms.hash(&mut h);
            } else {
                for &i in &node.inputs {
                    sigs[i].hash(&mut h);
                }
            }
            sigs.push(h.finish());
        }
        sigs
    }

    fn convs(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.nodes.iter().filter_map(|n| match n.op {
            Op::Conv { cin, cout } => Some((cin, cout)),
            _ => None,
        })
    }
}

/// Builds the dataflow graph of an ncnn model. Unsupported layers are refused here.
pub fn from_ncnn(layers: &[Layer], path: &Path) -> Result<Graph> {
    let mut g = Graph::default();
    let mut blobs: HashMap<&str, usize> = HashMap::new();
    let mut consumed: HashMap<&str, usize> = HashMap::new();
    for (index, layer) in layers.iter().enumerate() {
        let bad = |msg: String| weights_err(path, format!("layer `{}` ({}): {msg}", layer.name, layer.kind));
        let mut inputs = Vec::with_capacity(layer.inputs.len());
        for b in &layer.inputs {
            let id = *blobs
                .get(b.as_str())
                .ok_or_else(|| bad(format!("input blob `{b}` is not produced earlier")))?;
            *consumed.entry(b.as_str()).or_default() += 1;
            inputs.push(id);
        }
        let arity = |n: usize| -> Result<()> {
            if inputs.len() != n || layer.outputs.len() != 1 {
                return Err(bad(format!("expected {n} input(s) and 1 output")));
            }
            Ok(())
        };
        let node = match layer.kind.as_str() {
            "Input" => g.push(Op::Input, vec![], None, &layer.name),
            "Split" => {
                let [src] = inputs[..] else { return Err(bad("expected one input".into())) };
                for out in &layer.outputs {
                    blobs.insert(out.as_str(), src);
                }
                continue;
            }
            "Convolution" => {
                arity(1)?;
                let cout = layer.size(0, 0, path)?;
                let kw = layer.int(1, 0);
                let kh = layer.int(11, kw);
                let (dw, dh) = (layer.int(2, 1), layer.int(12, layer.int(2, 1)));
                let (sw, sh) = (layer.int(3, 1), layer.int(13, layer.int(3, 1)));
                let pl = layer.int(4, 0);
                let pads = [pl, layer.int(14, pl), layer.int(15, pl), layer.int(16, layer.int(14, pl))];
                if (kw, kh, dw, dh, sw, sh) != (3, 3, 1, 1, 1, 1) || pads != [1; 4] {
                    return Err(bad(format!(
                        "only 3x3 stride-1 padding-1 convolutions are supported (kernel {kw}x{kh}, stride {sw}x{sh}, dilation {dw}x{dh}, pads {pads:?})"
                    )));
                }
                if layer.int(5, 0) != 1 {
                    return Err(bad("convolution without bias is not part of these architectures".into()));
                }
                if layer.int(8, 0) != 0 || layer.int(19, 0) != 0 {
                    return Err(bad("int8 or dynamic-weight convolutions are not supported".into()));
                }
                let size = layer.size(6, 0, path)?;
                if cout == 0 || size % (cout * 9) != 0 {
                    return Err(bad(format!("weight size {size} is not a multiple of {cout}x3x3")));
                }
                let conv = g.push(Op::Conv { cin: size / (cout * 9), cout }, inputs, Some(index), &layer.name);
                match layer.int(9, 0) {
                    0 => conv,
                    1 => g.push(Op::Leaky(0.0), vec![conv], None, &layer.name),
                    2 => {
                        let slope = layer.array(10).first().copied().unwrap_or(0.0);
                        g.push(Op::Leaky(slope), vec![conv], None, &layer.name)
                    }
                    a => return Err(Error::Unsupported(format!("ncnn fused activation type {a} in layer `{}`", layer.name))),
                }
            }
            "ReLU" => {
                arity(1)?;
                g.push(Op::Leaky(layer.float(0, 0.0)), inputs, None, &layer.name)
            }
            "PReLU" => {
                arity(1)?;
                g.push(Op::Prelu(layer.size(0, 0, path)?), inputs, Some(index), &layer.name)
            }
            "Concat" => {
                if layer.int(0, 0) != 0 || layer.outputs.len() != 1 {
                    return Err(bad("only channel concatenation (axis 0) is supported".into()));
                }
                g.push(Op::Concat, inputs, None, &layer.name)
            }
            "Eltwise" => {
                if layer.int(0, 1) != 1 || layer.outputs.len() != 1 {
                    return Err(bad("only the sum operation is supported".into()));
                }
                let mut coeffs = layer.array(1).to_vec();
                if coeffs.is_empty() {
                    coeffs = vec![1.0; inputs.len()];
                }
                if coeffs.len() != inputs.len() {
                    return Err(bad(format!("{} coefficients for {} inputs", coeffs.len(), inputs.len())));
                }
                g.push(Op::Add(coeffs), inputs, None, &layer.name)
            }
            "BinaryOp" => match (layer.int(0, 0), layer.int(1, 0), inputs.len()) {
                (0, 0, 2) => g.push(Op::Add(vec![1.0, 1.0]), inputs, None, &layer.name),
                (2, 1, 1) => g.push(Op::Scale(layer.float(2, 0.0)), inputs, None, &layer.name),
                (op, scalar, n) => {
                    return Err(bad(format!("unsupported BinaryOp (op_type {op}, with_scalar {scalar}, {n} inputs)")))
                }
            },
            "Interp" => {
                arity(1)?;
                let (hs, ws) = (layer.float(1, 1.0), layer.float(2, 1.0));
                if hs != ws || layer.int(3, 0) != 0 || layer.int(4, 0) != 0 {
                    return Err(bad("only uniform scale-factor resizes are supported".into()));
                }
                match layer.int(0, 0) {
                    1 if ws >= 1.0 && ws.fract() == 0.0 => {
                        g.push(Op::UpsampleNearest(ws as usize), inputs, None, &layer.name)
                    }
                    3 if layer.int(6, 0) == 0 => g.push(Op::ResizeBicubic(ws), inputs, None, &layer.name),
                    t => return Err(bad(format!("unsupported resize type {t} with scale {ws}"))),
                }
            }
            "PixelShuffle" => {
                arity(1)?;
                if layer.int(1, 0) != 0 {
                    return Err(bad("only PixelShuffle mode 0 (PyTorch order) is supported".into()));
                }
                g.push(Op::PixelShuffle(layer.size(0, 1, path)?), inputs, None, &layer.name)
            }
            other => {
                return Err(Error::Unsupported(format!(
                    "ncnn layer type `{other}` (layer `{}` in {}); super-resolution graphs use Convolution, PReLU, ReLU, Concat, Eltwise, BinaryOp, Interp, PixelShuffle",
                    layer.name,
                    path.display()
                )))
            }
        };
        for out in &layer.outputs {
            blobs.insert(out.as_str(), node);
        }
    }
    let outputs: Vec<&str> = layers
        .iter()
        .filter(|l| l.kind != "Split")
        .flat_map(|l| l.outputs.iter().map(String::as_str))
        .filter(|b| !consumed.contains_key(b))
        .collect();
    let [out] = outputs[..] else {
        return Err(weights_err(
            path,
            format!("expected one output blob, found {}: {outputs:?}", outputs.len()),
        ));
    };
    g.output = blobs[out];
    Ok(g)
}

/// Guesses the architecture an ncnn graph implements; [`match_graphs`] then verifies it.
pub fn infer_spec(g: &Graph, path: &Path) -> Result<SrSpec> {
    let convs: Vec<(usize, usize)> = g.convs().collect();
    let bad = |msg: String| weights_err(path, msg);
    let (Some(&(first_in, num_feat)), Some(&(_, last_out))) = (convs.first(), convs.last()) else {
        return Err(bad("graph has no convolutions".into()));
    };
    let has = |f: &dyn Fn(&Op) -> bool| g.nodes.iter().any(|n| f(&n.op));
    if has(&|op| matches!(op, Op::Concat)) {
        let num_grow_ch = convs.get(1).map_or(0, |c| c.1);
        if convs.len() < 6 + 15 || (convs.len() - 6) % 15 != 0 {
            return Err(bad(format!(
                "{} convolutions do not form an RRDBNet (6 + 15 per block)",
                convs.len()
            )));
        }
        let scale = match first_in / last_out.max(1) {
            1 => 4,
            4 => 2,
            16 => 1,
            _ => {
                return Err(bad(format!(
                    "first conv takes {first_in} channels for {last_out} output channels"
                )))
            }
        };
        let config = crate::models::sr::RrdbConfig {
            num_in_ch: last_out,
            num_out_ch: last_out,
            scale,
            num_feat,
            num_block: (convs.len() - 6) / 15,
            num_grow_ch,
        };
        return Ok(SrSpec { arch: SrArch::Rrdbnet(config), output_scale: None });
    }
    let shuffle = g.nodes.iter().find_map(|n| match n.op {
        Op::PixelShuffle(s) => Some(s),
        _ => None,
    });
    if let Some(upscale) = shuffle {
        let act_type = if has(&|op| matches!(op, Op::Prelu(_))) {
            SrvggAct::Prelu
        } else if has(&|op| matches!(op, Op::Leaky(s) if *s > 0.0)) {
            SrvggAct::Leakyrelu
        } else {
            SrvggAct::Relu
        };
        let output_scale = match g.nodes.get(g.output).map(|n| &n.op) {
            Some(Op::ResizeBicubic(f)) => {
                let s = upscale as f32 * f;
                if (s - s.round()).abs() > 1e-4 || s.round() < 1.0 {
                    return Err(bad(format!("final resize by {f} gives a non-integer scale {s}")));
                }
                Some(s.round() as usize)
            }
            _ => None,
        };
        let config = crate::models::sr::SrvggConfig {
            num_in_ch: first_in,
            num_out_ch: first_in,
            num_feat,
            num_conv: convs.len().saturating_sub(2),
            upscale,
            act_type,
        };
        return Ok(SrSpec { arch: SrArch::Srvgg(config), output_scale });
    }
    Err(bad("graph matches neither RRDBNet (no Concat) nor SRVGGNetCompact (no PixelShuffle)".into()))
}

/// The graph an [`SrSpec`] computes, with basicsr module names as labels of weighted nodes.
pub fn expected(spec: &SrSpec) -> Graph {
    let mut g = Graph::default();
    let x = g.push(Op::Input, vec![], None, "input");
    let conv = |g: &mut Graph, input: usize, cin: usize, cout: usize, key: String| {
        g.push(Op::Conv { cin, cout }, vec![input], None, key)
    };
    match &spec.arch {
        SrArch::Rrdbnet(c) => {
            let (f, gc) = (c.num_feat, c.num_grow_ch);
            let u = c.unshuffle();
            let inp = if u > 1 { g.push(Op::PixelUnshuffle(u), vec![x], None, "pixel_unshuffle") } else { x };
            let feat = conv(&mut g, inp, c.first_in_ch(), f, "conv_first".into());
            let mut h = feat;
            for b in 0..c.num_block {
                let block_in = h;
                for r in 1..=3 {
                    let prefix = format!("body.{b}.rdb{r}");
                    let mut feats = vec![h];
                    for k in 1..=4 {
                        let cat = if feats.len() == 1 {
                            h
                        } else {
                            g.push(Op::Concat, feats.clone(), None, "concat")
                        };
                        let y = conv(&mut g, cat, f + (k - 1) * gc, gc, format!("{prefix}.conv{k}"));
                        feats.push(g.push(Op::Leaky(0.2), vec![y], None, "lrelu"));
                    }
                    let cat = g.push(Op::Concat, feats, None, "concat");
                    let x5 = conv(&mut g, cat, f + 4 * gc, f, format!("{prefix}.conv5"));
                    h = g.push(Op::Add(vec![0.2, 1.0]), vec![x5, h], None, format!("{prefix} residual"));
                }
                h = g.push(Op::Add(vec![0.2, 1.0]), vec![h, block_in], None, format!("body.{b} residual"));
            }
            let body = conv(&mut g, h, f, f, "conv_body".into());
            let mut y = g.push(Op::Add(vec![1.0, 1.0]), vec![feat, body], None, "trunk residual");
            for name in ["conv_up1", "conv_up2"] {
                let up = g.push(Op::UpsampleNearest(2), vec![y], None, "upsample");
                let cv = conv(&mut g, up, f, f, name.into());
                y = g.push(Op::Leaky(0.2), vec![cv], None, "lrelu");
            }
            let hr = conv(&mut g, y, f, f, "conv_hr".into());
            let hr = g.push(Op::Leaky(0.2), vec![hr], None, "lrelu");
            g.output = conv(&mut g, hr, f, c.num_out_ch, "conv_last".into());
        }
        SrArch::Srvgg(c) => {
            let mut h = x;
            let mut index = 0;
            for i in 0..c.num_conv + 2 {
                let cin = if i == 0 { c.num_in_ch } else { c.num_feat };
                let last = i == c.num_conv + 1;
                let cout = if last { c.num_out_ch * c.upscale * c.upscale } else { c.num_feat };
                h = conv(&mut g, h, cin, cout, format!("body.{index}"));
                index += 1;
                if !last {
                    let op = match c.act_type {
                        SrvggAct::Prelu => Op::Prelu(c.num_feat),
                        SrvggAct::Relu => Op::Leaky(0.0),
                        SrvggAct::Leakyrelu => Op::Leaky(0.1),
                    };
                    h = g.push(op, vec![h], None, format!("body.{index}"));
                    index += 1;
                }
            }
            let shuffled = g.push(Op::PixelShuffle(c.upscale), vec![h], None, "pixel_shuffle");
            let base = g.push(Op::UpsampleNearest(c.upscale), vec![x], None, "nearest upsample of the input");
            let mut out = g.push(Op::Add(vec![1.0, 1.0]), vec![shuffled, base], None, "output sum");
            if let Some(s) = spec.output_scale {
                out =
                    g.push(Op::ResizeBicubic(s as f32 / c.upscale as f32), vec![out], None, "output resize");
            }
            g.output = out;
        }
    }
    g
}

/// Matches `actual` (ncnn) against `expected`; returns, for each weighted ncnn layer index,
/// the basicsr module name it holds. Errors name the first point where the graphs differ.
pub fn match_graphs(
    expected: &Graph,
    actual: &Graph,
    what: &str,
    path: &Path,
) -> Result<HashMap<usize, String>> {
    let es = expected.signatures();
    let as_ = actual.signatures();
    let pair_children = |e: usize, a: usize| -> Vec<(usize, usize)> {
        let (en, an) = (&expected.nodes[e], &actual.nodes[a]);
        if let (Op::Add(ec), Op::Add(ac)) = (&en.op, &an.op) {
            let key = |c: f32, s: u64| ((f64::from(c) * 1e5).round() as i64, s);
            let mut et: Vec<_> = ec.iter().zip(&en.inputs).map(|(c, &i)| (key(*c, es[i]), i)).collect();
            let mut at: Vec<_> = ac.iter().zip(&an.inputs).map(|(c, &i)| (key(*c, as_[i]), i)).collect();
            et.sort_unstable();
            at.sort_unstable();
            et.into_iter().zip(at).map(|((_, i), (_, j))| (i, j)).collect()
        } else {
            en.inputs.iter().copied().zip(an.inputs.iter().copied()).collect()
        }
    };
    if es[expected.output] != as_[actual.output] {
        // Walk down to the first node whose own operation or arity differs.
        let (mut e, mut a) = (expected.output, actual.output);
        loop {
            let (en, an) = (&expected.nodes[e], &actual.nodes[a]);
            let same_op = std::mem::discriminant(&en.op) == std::mem::discriminant(&an.op)
                && match (&en.op, &an.op) {
                    (Op::Add(x), Op::Add(y)) => x.len() == y.len(),
                    (x, y) => x == y,
                };
            let next = if same_op && en.inputs.len() == an.inputs.len() {
                pair_children(e, a).into_iter().find(|&(i, j)| es[i] != as_[j])
            } else {
                None
            };
            match next {
                Some((i, j)) => (e, a) = (i, j),
                None => {
                    return Err(weights_err(
                        path,
                        format!(
                            "graph does not match {what}: at `{}` expected {} with {} input(s), found {} with {} input(s) (ncnn layer `{}`)",
                            en.label,
                            en.op.describe(),
                            en.inputs.len(),
                            an.op.describe(),
                            an.inputs.len(),
                            an.label
                        ),
                    ))
                }
            }
        }
    }
    let mut mapping = HashMap::new();
    let mut seen: HashMap<usize, usize> = HashMap::new();
    let mut stack = vec![(expected.output, actual.output)];
    while let Some((e, a)) = stack.pop() {
        if let Some(&prev) = seen.get(&e) {
            if prev != a {
                return Err(weights_err(
                    path,
                    format!("graph does not match {what}: `{}` is computed twice", expected.nodes[e].label),
                ));
            }
            continue;
        }
        seen.insert(e, a);
        if let Some(layer) = actual.nodes[a].layer {
            if let Some(old) = mapping.insert(layer, expected.nodes[e].label.clone()) {
                return Err(weights_err(
                    path,
                    format!(
                        "ncnn layer `{}` matches both `{old}` and `{}`",
                        actual.nodes[a].label, expected.nodes[e].label
                    ),
                ));
            }
        }
        stack.extend(pair_children(e, a));
    }
    Ok(mapping)
}
