//! Another export of the same network must load and give the same anchors.
//!
//! insightface's own `det_500m.onnx` is not in the assets, so its differences from
//! `scrfd_500m_bnkps.onnx` are made here, in pure Rust, by rewriting the protobuf of the
//! asset: every tensor renamed to an opaque number, the outputs listed in another order
//! and without their batch dim (`[N, C]`, as insightface's export has them), the input
//! behind an Identity, shape constants as initializers rather than Constant nodes, and
//! the first conv's bias turned into a BatchNormalization after it (with the weights
//! rescaled to match).

mod common;

use std::collections::HashMap;

use candle_core::Device;
use common::asset;
use mfn_detect::scrfd::{Anchor, Scrfd};

/// One protobuf field's value.
#[derive(Clone, Debug)]
enum Raw {
    Varint(u64),
    I64([u8; 8]),
    Len(Vec<u8>),
    I32([u8; 4]),
}

fn read_varint(b: &[u8], pos: &mut usize) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = b[*pos];
        *pos += 1;
        v |= ((byte & 0x7f) as u64) << shift;
        if byte & 0x80 == 0 {
            break;
        }
    }
    v
}

/// The fields of a message, in order (the asset is well-formed, so this may panic).
fn fields(b: &[u8]) -> Vec<(u32, Raw)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < b.len() {
        let key = read_varint(b, &mut pos);
        let raw = match key & 7 {
            0 => Raw::Varint(read_varint(b, &mut pos)),
            1 => {
                pos += 8;
                Raw::I64(b[pos - 8..pos].try_into().unwrap())
            }
            2 => {
                let len = read_varint(b, &mut pos) as usize;
                pos += len;
                Raw::Len(b[pos - len..pos].to_vec())
            }
            5 => {
                pos += 4;
                Raw::I32(b[pos - 4..pos].try_into().unwrap())
            }
            w => panic!("wire type {w}"),
        };
        out.push(((key >> 3) as u32, raw));
    }
    out
}

fn write_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn encode(fields: &[(u32, Raw)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (n, raw) in fields {
        let wire = match raw {
            Raw::Varint(_) => 0,
            Raw::I64(_) => 1,
            Raw::Len(_) => 2,
            Raw::I32(_) => 5,
        };
        write_varint(((*n as u64) << 3) | wire, &mut out);
        match raw {
            Raw::Varint(v) => write_varint(*v, &mut out),
            Raw::I64(b) => out.extend_from_slice(b),
            Raw::Len(b) => {
                write_varint(b.len() as u64, &mut out);
                out.extend_from_slice(b);
            }
            Raw::I32(b) => out.extend_from_slice(b),
        }
    }
    out
}

fn text(s: &str) -> Raw {
    Raw::Len(s.as_bytes().to_vec())
}

fn as_text(r: &Raw) -> String {
    match r {
        Raw::Len(b) => String::from_utf8(b.clone()).unwrap(),
        other => panic!("not a string: {other:?}"),
    }
}

/// A node: its inputs and outputs by name, its op, and every other field as it was.
struct Node {
    op: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
    rest: Vec<(u32, Raw)>,
}

impl Node {
    fn parse(b: &[u8]) -> Self {
        let mut n = Node {
            op: String::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            rest: Vec::new(),
        };
        for (f, r) in fields(b) {
            match f {
                1 => n.inputs.push(as_text(&r)),
                2 => n.outputs.push(as_text(&r)),
                4 => n.op = as_text(&r),
                _ => n.rest.push((f, r)),
            }
        }
        n
    }

    fn new(op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<Vec<u8>>) -> Self {
        Node {
            op: op.into(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            rest: attrs.into_iter().map(|a| (5, Raw::Len(a))).collect(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut f: Vec<(u32, Raw)> = self.inputs.iter().map(|s| (1, text(s))).collect();
        f.extend(self.outputs.iter().map(|s| (2, text(s))));
        f.push((4, text(&self.op)));
        f.extend(self.rest.iter().cloned());
        encode(&f)
    }

    /// A tensor attribute's bytes (a Constant's `value`).
    fn tensor_attr(&self) -> Option<Vec<u8>> {
        self.rest.iter().find_map(|(f, r)| match (f, r) {
            (5, Raw::Len(a)) => {
                let af = fields(a);
                let is_value = af
                    .iter()
                    .any(|(n, r)| *n == 1 && matches!(r, Raw::Len(s) if s == b"value"));
                af.into_iter().find_map(|(n, r)| match (n, r) {
                    (5, Raw::Len(t)) if is_value => Some(t),
                    _ => None,
                })
            }
            _ => None,
        })
    }
}

/// A float initializer.
fn float_tensor(name: &str, dims: &[usize], values: &[f32]) -> Vec<u8> {
    let mut f: Vec<(u32, Raw)> = dims.iter().map(|d| (1, Raw::Varint(*d as u64))).collect();
    f.push((2, Raw::Varint(1)));
    f.push((8, text(name)));
    f.push((
        9,
        Raw::Len(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
    ));
    encode(&f)
}

/// A tensor's name, dims and float data (raw_data).
fn read_float_tensor(b: &[u8]) -> (String, Vec<usize>, Vec<f32>) {
    let (mut name, mut dims, mut data) = (String::new(), Vec::new(), Vec::new());
    for (f, r) in fields(b) {
        match (f, r) {
            (1, Raw::Varint(d)) => dims.push(d as usize),
            (8, r) => name = as_text(&r),
            (9, Raw::Len(raw)) => {
                data = raw
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect()
            }
            _ => {}
        }
    }
    (name, dims, data)
}

fn ints_attr(name: &str, values: &[i64]) -> Vec<u8> {
    let mut f = vec![(1, text(name))];
    f.extend(values.iter().map(|v| (8, Raw::Varint(*v as u64))));
    f.push((20, Raw::Varint(7)));
    encode(&f)
}

fn float_attr(name: &str, v: f32) -> Vec<u8> {
    encode(&[
        (1, text(name)),
        (2, Raw::I32(v.to_le_bytes())),
        (20, Raw::Varint(1)),
    ])
}

fn value_info(name: &str) -> Vec<u8> {
    encode(&[(1, text(name))])
}

/// The asset rewritten as another exporter might have written it; `order` lists the
/// original outputs' positions in the order the variant lists them.
fn variant(model: &[u8], order: &[usize]) -> Vec<u8> {
    let mut top = fields(model);
    let gi = top.iter().position(|(f, _)| *f == 7).unwrap();
    let Raw::Len(graph) = &top[gi].1 else {
        panic!("graph")
    };
    let mut nodes = Vec::new();
    let mut inits: Vec<Vec<u8>> = Vec::new();
    let (mut inputs, mut outputs, mut other) = (Vec::new(), Vec::new(), Vec::new());
    for (f, r) in fields(graph) {
        match (f, &r) {
            (1, Raw::Len(b)) => nodes.push(Node::parse(b)),
            (5, Raw::Len(b)) => inits.push(b.clone()),
            (11, Raw::Len(b)) => inputs.push(b.clone()),
            (12, Raw::Len(b)) => outputs.push(b.clone()),
            // Value infos name tensors this rewrite renames: drop them.
            (13, _) => {}
            _ => other.push((f, r)),
        }
    }
    let name_of = |vi: &[u8]| {
        fields(vi)
            .into_iter()
            .find_map(|(f, r)| (f == 1).then(|| as_text(&r)))
            .unwrap()
    };
    let input = name_of(&inputs[0]);
    let out_names: Vec<String> = outputs.iter().map(|o| name_of(o)).collect();

    // Constant nodes become initializers.
    let mut kept = Vec::new();
    for n in nodes {
        if n.op == "Constant" {
            let mut t = fields(&n.tensor_attr().expect("a Constant with a tensor"));
            t.retain(|(f, _)| *f != 8);
            t.push((8, text(&n.outputs[0])));
            inits.push(encode(&t));
        } else {
            kept.push(n);
        }
    }
    let mut nodes = kept;

    // The first conv's bias becomes a BatchNormalization after it.
    let ci = nodes.iter().position(|n| n.op == "Conv").unwrap();
    let (wname, bname) = (nodes[ci].inputs[1].clone(), nodes[ci].inputs[2].clone());
    let find = |inits: &[Vec<u8>], name: &str| {
        inits
            .iter()
            .position(|b| read_float_tensor(b).0 == name)
            .unwrap()
    };
    let (_, wdims, mut w) = read_float_tensor(&inits[find(&inits, &wname)]);
    let (_, _, bias) = read_float_tensor(&inits[find(&inits, &bname)]);
    let cout = wdims[0];
    let per = w.len() / cout;
    let eps = 1e-3f32;
    let (mut gamma, mut beta, mut mean, mut var) = (vec![], vec![], vec![], vec![]);
    for c in 0..cout {
        let (g, m, v) = (
            0.5 + 0.25 * (c % 4) as f64,
            0.1 * c as f64,
            0.2 + 0.05 * c as f64,
        );
        let sigma = (v + eps as f64).sqrt();
        for x in &mut w[c * per..(c + 1) * per] {
            *x = (*x as f64 * sigma / g) as f32;
        }
        gamma.push(g as f32);
        mean.push(m as f32);
        var.push(v as f32);
        beta.push((bias[c] as f64 + g * m / sigma) as f32);
    }
    let wi = find(&inits, &wname);
    inits[wi] = float_tensor(&wname, &wdims, &w);
    for (name, v) in [
        ("bn_gamma", &gamma),
        ("bn_beta", &beta),
        ("bn_mean", &mean),
        ("bn_var", &var),
    ] {
        inits.push(float_tensor(name, &[cout], v));
    }
    let conv_out = nodes[ci].outputs[0].clone();
    nodes[ci].inputs.truncate(2);
    nodes[ci].outputs[0] = "conv0_raw".into();
    let bn = Node::new(
        "BatchNormalization",
        &["conv0_raw", "bn_gamma", "bn_beta", "bn_mean", "bn_var"],
        &[&conv_out],
        vec![float_attr("epsilon", eps)],
    );
    nodes.insert(ci + 1, bn);

    // The input behind an Identity.
    nodes.insert(0, Node::new("Identity", &["data"], &[&input], vec![]));

    // Outputs without the batch dim.
    for o in &out_names {
        let p = nodes
            .iter_mut()
            .find(|n| n.outputs.first() == Some(o))
            .unwrap();
        let batched = format!("{o}_batched");
        p.outputs[0] = batched.clone();
        nodes.push(Node::new(
            "Squeeze",
            &[&batched],
            &[o],
            vec![ints_attr("axes", &[0])],
        ));
    }

    // Every tensor renamed to an opaque number.
    let mut rename: HashMap<String, String> = HashMap::new();
    let fresh = |s: &str, rename: &mut HashMap<String, String>| -> String {
        if s.is_empty() {
            return String::new();
        }
        let next = (rename.len() + 400).to_string();
        rename.entry(s.to_string()).or_insert(next).clone()
    };
    let data = fresh("data", &mut rename);
    for n in &mut nodes {
        for s in n.inputs.iter_mut().chain(n.outputs.iter_mut()) {
            *s = fresh(s, &mut rename);
        }
        // Node names too: nothing may rely on them.
        n.rest.retain(|(f, _)| *f != 3);
    }
    let inits: Vec<Vec<u8>> = inits
        .into_iter()
        .map(|b| {
            let mut t = fields(&b);
            for (f, r) in &mut t {
                if *f == 8 {
                    *r = text(&fresh(&as_text(r), &mut rename));
                }
            }
            encode(&t)
        })
        .collect();

    let mut g = Vec::new();
    for n in &nodes {
        g.push((1, Raw::Len(n.encode())));
    }
    g.extend(inits.into_iter().map(|b| (5, Raw::Len(b))));
    g.push((11, Raw::Len(value_info(&data))));
    for &i in order {
        g.push((12, Raw::Len(value_info(&rename[&out_names[i]]))));
    }
    g.extend(other);
    top[gi].1 = Raw::Len(encode(&g));
    encode(&top)
}

fn anchors(det: &Scrfd, img: &image::RgbImage) -> Vec<Anchor> {
    let mut a = det.anchors(img, 0.02).unwrap();
    a.sort_by_key(|a| (a.stride, a.index));
    a
}

#[test]
fn a_rewritten_export_gives_the_same_anchors() {
    let path = asset("models/scrfd-500m/scrfd_500m_bnkps.onnx");
    let bytes = std::fs::read(&path).unwrap();
    let original = Scrfd::load(&path, &Device::Cpu).unwrap();
    let img = image::open(asset("golden/scrfd-inputs/Ariel_Sharon_0002_640.png"))
        .unwrap()
        .to_rgb8();
    let want = anchors(&original, &img);
    assert!(want.len() > 50);
    let dir = tempfile::tempdir().unwrap();
    // insightface's order, then one that only the channel counts and anchor counts can
    // sort out.
    for (k, order) in [
        vec![0, 1, 2, 3, 4, 5, 6, 7, 8],
        vec![8, 0, 4, 2, 6, 3, 1, 7, 5],
    ]
    .into_iter()
    .enumerate()
    {
        let rewritten = variant(&bytes, &order);
        let file = dir.path().join(format!("variant-{k}.onnx"));
        std::fs::write(&file, &rewritten).unwrap();
        let graph = mfn_model::import::onnx::read_graph(&file).unwrap();
        assert!(graph.nodes().any(|n| n.op() == "BatchNormalization"));
        assert!(graph.nodes().all(|n| n.op() != "Constant"));
        assert!(graph.outputs().iter().all(|o| o.parse::<u32>().is_ok()));
        let det = Scrfd::load(&file, &Device::Cpu).unwrap();
        let got = anchors(&det, &img);
        let (mut ds, mut dp) = (0f32, 0f32);
        for (a, b) in got.iter().zip(&want) {
            assert_eq!((a.stride, a.index), (b.stride, b.index));
            ds = ds.max((a.face.score - b.face.score).abs());
            for (x, y) in a
                .face
                .bbox
                .iter()
                .chain(a.face.landmarks.iter().flatten())
                .zip(b.face.bbox.iter().chain(b.face.landmarks.iter().flatten()))
            {
                dp = dp.max((x - y).abs());
            }
        }
        eprintln!(
            "variant {k}: {} anchors, score diff {ds:.1e}, position diff {dp:.1e} px",
            got.len()
        );
        assert_eq!(got.len(), want.len());
        assert!(ds < 1e-4 && dp < 1e-2, "score {ds}, position {dp}");
    }
}

/// A model of the given nodes and float initializers, one input `x`, opset 11.
fn tiny(nodes: Vec<Node>, inits: Vec<Vec<u8>>, inputs: &[&str], outputs: &[&str]) -> Vec<u8> {
    let mut g: Vec<(u32, Raw)> = nodes.iter().map(|n| (1, Raw::Len(n.encode()))).collect();
    g.extend(inits.into_iter().map(|b| (5, Raw::Len(b))));
    g.extend(inputs.iter().map(|i| (11, Raw::Len(value_info(i)))));
    g.extend(outputs.iter().map(|o| (12, Raw::Len(value_info(o)))));
    let opset = encode(&[(1, text("")), (2, Raw::Varint(11))]);
    encode(&[
        (1, Raw::Varint(7)),
        (8, Raw::Len(opset)),
        (7, Raw::Len(encode(&g))),
    ])
}

fn int_tensor(name: &str, values: &[i64]) -> Vec<u8> {
    let mut f = vec![(1, Raw::Varint(values.len() as u64)), (2, Raw::Varint(7))];
    f.push((8, text(name)));
    f.push((
        9,
        Raw::Len(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
    ));
    encode(&f)
}

/// Loading `model` fails with a detector error that says each of `parts`.
fn refused(model: &[u8], parts: &[&str]) {
    let err = Scrfd::load_bytes(model, std::path::Path::new("tiny.onnx"), &Device::Cpu)
        .expect_err("a refusal");
    assert!(matches!(err, mfn_detect::Error::Detector { .. }), "{err:?}");
    let text = err.to_string();
    eprintln!("{text}");
    for p in ["tiny.onnx"].iter().chain(parts) {
        assert!(text.contains(p), "`{text}` does not say `{p}`");
    }
}

#[test]
fn hostile_graphs_are_refused_before_they_allocate() {
    let w3 = float_tensor("w", &[4, 3, 3, 3], &[0.1; 108]);
    // A resize a million times larger.
    let scales = float_tensor("s", &[4], &[1.0, 1.0, 1000.0, 1000.0]);
    let empty = float_tensor("roi", &[0], &[]);
    refused(
        &tiny(
            vec![Node::new("Resize", &["x", "roi", "s"], &["y"], vec![])],
            vec![scales, empty],
            &["x"],
            &["y"],
        ),
        &["node `y` (Resize)", "more than"],
    );
    // Broadcasting a column against a row squares the image's size.
    refused(
        &tiny(
            vec![
                Node::new("Reshape", &["x", "col"], &["c"], vec![]),
                Node::new("Reshape", &["x", "row"], &["r"], vec![]),
                Node::new("Add", &["c", "r"], &["y"], vec![]),
            ],
            vec![int_tensor("col", &[-1, 1]), int_tensor("row", &[1, -1])],
            &["x"],
            &["y"],
        ),
        &["(Add)", "more than"],
    );
    // Doubling by concatenation.
    let mut nodes = Vec::new();
    let mut last = "x".to_string();
    for i in 0..40 {
        let next = format!("d{i}");
        nodes.push(Node::new(
            "Concat",
            &[&last, &last],
            &[&next],
            vec![encode(&[
                (1, text("axis")),
                (3, Raw::Varint(0)),
                (20, Raw::Varint(2)),
            ])],
        ));
        last = next;
    }
    refused(
        &tiny(nodes, vec![], &["x"], &[&last]),
        &["(Concat)", "more than"],
    );
    // A cycle: each node reads the other's output.
    refused(
        &tiny(
            vec![
                Node::new("Relu", &["b"], &["a"], vec![]),
                Node::new("Relu", &["a"], &["b"], vec![]),
            ],
            vec![],
            &["x"],
            &["b"],
        ),
        &["reads `b`"],
    );
    // An op SCRFD does not use.
    refused(
        &tiny(
            vec![Node::new("LSTM", &["x"], &["y"], vec![])],
            vec![],
            &["x"],
            &["y"],
        ),
        &["node `y` (LSTM)", "op `LSTM`"],
    );
    // A conv whose weight takes 3 channels on an image... of 3 channels, then another
    // whose weight takes 3 on the first one's 4.
    refused(
        &tiny(
            vec![
                Node::new("Conv", &["x", "w"], &["a"], vec![]),
                Node::new("Conv", &["a", "w"], &["y"], vec![]),
            ],
            vec![w3.clone()],
            &["x"],
            &["y"],
        ),
        &["node `y` (Conv)", "4 channels"],
    );
    // A valid graph that is not SCRFD: its output is named.
    refused(
        &tiny(
            vec![Node::new("Conv", &["x", "w"], &["y"], vec![])],
            vec![w3.clone()],
            &["x"],
            &["y"],
        ),
        &["output `y`"],
    );
    // Two inputs, no input.
    refused(
        &tiny(
            vec![Node::new("Add", &["x", "z"], &["y"], vec![])],
            vec![],
            &["x", "z"],
            &["y"],
        ),
        &["2 inputs"],
    );
    refused(&tiny(vec![], vec![], &[], &[]), &["0 inputs"]);
    // A reshape the data does not fill, an axis past the rank.
    refused(
        &tiny(
            vec![Node::new("Reshape", &["x", "bad"], &["y"], vec![])],
            vec![int_tensor("bad", &[7, -1])],
            &["x"],
            &["y"],
        ),
        &["(Reshape)", "cannot reshape"],
    );
    refused(
        &tiny(
            vec![Node::new(
                "Transpose",
                &["x"],
                &["y"],
                vec![ints_attr("perm", &[0, 1, 2, 9])],
            )],
            vec![],
            &["x"],
            &["y"],
        ),
        &["(Transpose)", "axis 9"],
    );
}
