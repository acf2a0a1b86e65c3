//! The public, read-only ONNX graph view: what it reads from a real export, and how it
//! treats crafted files.

mod common;

use std::path::Path;

use common::asset;
use mfn_model::import::onnx::{self, parse_graph, read_graph, TensorValues};
use mfn_model::Error;

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_bytes(n: u64, b: &[u8], out: &mut Vec<u8>) {
    varint(n << 3 | 2, out);
    varint(b.len() as u64, out);
    out.extend_from_slice(b);
}

fn field_int(n: u64, v: u64, out: &mut Vec<u8>) {
    varint(n << 3, out);
    varint(v, out);
}

/// A TensorProto of `dtype` with `raw` data.
fn tensor(name: &str, dims: &[u64], dtype: u64, raw: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    for d in dims {
        field_int(1, *d, &mut t);
    }
    field_int(2, dtype, &mut t);
    field_bytes(8, name.as_bytes(), &mut t);
    field_bytes(9, raw, &mut t);
    t
}

fn model(nodes: &[Vec<u8>], inits: &[Vec<u8>], inputs: &[&str], outputs: &[&str]) -> Vec<u8> {
    let mut g = Vec::new();
    for n in nodes {
        field_bytes(1, n, &mut g);
    }
    for i in inits {
        field_bytes(5, i, &mut g);
    }
    for (field, names) in [(11, inputs), (12, outputs)] {
        for name in names {
            let mut vi = Vec::new();
            field_bytes(1, name.as_bytes(), &mut vi);
            field_bytes(field, &vi, &mut g);
        }
    }
    let mut opset = Vec::new();
    field_int(2, 13, &mut opset);
    let mut m = Vec::new();
    field_int(1, 7, &mut m);
    field_bytes(8, &opset, &mut m);
    field_bytes(7, &g, &mut m);
    m
}

fn message(e: &Error) -> String {
    let text = e.to_string();
    assert!(matches!(e, Error::Onnx { .. }), "{e:?}");
    text
}

#[test]
fn the_scrfd_export_reads_in_full() {
    let path = asset("models/scrfd-500m/scrfd_500m_bnkps.onnx");
    let g = read_graph(&path).unwrap();
    assert_eq!(g.path(), path.as_path());
    assert_eq!(g.opset(), Some(11));
    assert_eq!(g.inputs(), ["input.1"]);
    let outputs: Vec<String> = ["score", "bbox", "kps"]
        .iter()
        .flat_map(|k| [8, 16, 32].map(|s| format!("{k}_{s}")))
        .collect();
    assert_eq!(g.outputs(), outputs.as_slice());
    assert_eq!(g.node_count(), 191);
    assert_eq!(g.nodes().len(), 191);
    assert_eq!(g.nodes().filter(|n| n.op() == "Conv").count(), 60);

    let conv = g.nodes().find(|n| n.name() == "Conv_0").unwrap();
    assert_eq!(conv.inputs()[0], "input.1");
    assert_eq!(conv.attr_ints("strides").unwrap(), Some(vec![2, 2]));
    assert_eq!(conv.attr_int("group").unwrap(), Some(1));
    assert_eq!(conv.attr_int("no such").unwrap(), None);
    let w = g.initializer(&conv.inputs()[1]).unwrap();
    assert_eq!(w.dims(), [16, 3, 3, 3]);
    assert_eq!(w.as_f32().unwrap().len(), 16 * 27);
    assert!(w.as_i64().is_none());

    let resize = g.nodes().find(|n| n.op() == "Resize").unwrap();
    assert_eq!(
        resize.attr_string("mode").unwrap().as_deref(),
        Some("nearest")
    );
    assert_eq!(resize.attr_float("cubic_coeff_a").unwrap(), Some(-0.75));
    // A string is not an int, and the error says where.
    let err = resize.attr_int("mode").unwrap_err();
    let text = message(&err);
    assert!(text.contains("Resize") && text.contains("`mode`"), "{text}");

    // Constants keep their int64 values exact.
    let gather = g.nodes().find(|n| n.op() == "Gather").unwrap();
    let index = g
        .nodes()
        .find(|n| n.op() == "Constant" && n.outputs()[0] == gather.inputs()[1])
        .unwrap();
    let t = index.attr_tensor("value").unwrap().unwrap();
    assert_eq!(t.dims(), [] as [usize; 0]);
    assert_eq!(t.values(), &TensorValues::I64(vec![2]));
    assert!(index.attr_tensor("other").unwrap().is_none());
    assert!(index.attr_ints("value").is_err());
    let shape = g.initializer("677").unwrap();
    assert_eq!(shape.as_i64(), Some(&[-1i64][..]));

    // The MobileFaceNet walk over the same parse is unchanged: this is not one.
    let bytes = std::fs::read(&path).unwrap();
    assert!(onnx::check(&bytes, &path).is_err());
    assert_eq!(
        parse_graph(&bytes, &path).unwrap().node_count(),
        g.node_count()
    );
}

#[test]
fn integers_keep_every_bit_and_int32_is_read() {
    let big = tensor("end", &[1], 7, &i64::MAX.to_le_bytes());
    let small = tensor(
        "i32",
        &[2],
        6,
        &[(-3i32).to_le_bytes(), 5i32.to_le_bytes()].concat(),
    );
    // int32 in int32_data (field 5), as varints of the sign-extended value.
    let mut typed = Vec::new();
    field_int(1, 2, &mut typed);
    field_int(2, 6, &mut typed);
    field_bytes(8, b"typed", &mut typed);
    field_int(5, (-7i64) as u64, &mut typed);
    field_int(5, 9, &mut typed);
    let bytes = model(&[], &[big, small, typed], &["x"], &["y"]);
    let g = parse_graph(&bytes, Path::new("ints.onnx")).unwrap();
    assert_eq!(
        g.initializer("end").unwrap().as_i64(),
        Some(&[i64::MAX][..])
    );
    assert_eq!(g.initializer("i32").unwrap().as_i64(), Some(&[-3, 5][..]));
    assert_eq!(g.initializer("typed").unwrap().as_i64(), Some(&[-7, 9][..]));
    assert_eq!(g.initializers().count(), 3);
    assert_eq!(g.inputs(), ["x"]);
    assert_eq!(g.outputs(), ["y"]);
    assert_eq!(g.opset(), Some(13));
    // The MobileFaceNet reader refuses int32 weights as it always has.
    let err = onnx::check(&bytes, Path::new("ints.onnx")).unwrap_err();
    assert!(message(&err).contains("not float"), "{err}");
}

#[test]
fn malformed_graphs_are_errors_naming_the_file() {
    for (bytes, what) in [
        (vec![0xffu8; 64], "not an ONNX model"),
        (Vec::new(), "no graph"),
        // A tensor whose dims need more data than it holds.
        (
            model(&[], &[tensor("w", &[4, 4], 1, &[0; 12])], &["x"], &["y"]),
            "`w`",
        ),
        // A float16 tensor: not a type the view reads.
        (
            model(&[], &[tensor("h", &[2], 10, &[0; 4])], &["x"], &["y"]),
            "data type 10",
        ),
    ] {
        let err = parse_graph(&bytes, Path::new("bad.onnx")).unwrap_err();
        let text = message(&err);
        assert!(text.contains("bad.onnx") && text.contains(what), "{text}");
    }
    // A Constant whose tensor is malformed: the error names the node and attribute.
    let mut attr = Vec::new();
    field_bytes(1, b"value", &mut attr);
    field_bytes(5, &tensor("", &[3], 7, &[0; 8]), &mut attr);
    field_int(20, 4, &mut attr);
    let mut node = Vec::new();
    field_bytes(2, b"c", &mut node);
    field_bytes(3, b"const_0", &mut node);
    field_bytes(4, b"Constant", &mut node);
    field_bytes(5, &attr, &mut node);
    let bytes = model(&[node], &[], &["x"], &["c"]);
    let g = parse_graph(&bytes, Path::new("bad.onnx")).unwrap();
    let n = g.nodes().next().unwrap();
    assert_eq!((n.name(), n.op(), n.domain()), ("const_0", "Constant", ""));
    assert_eq!(n.attribute_names().collect::<Vec<_>>(), ["value"]);
    let text = message(&n.attr_tensor("value").unwrap_err());
    assert!(
        text.contains("const_0") && text.contains("`value`") && text.contains("8 bytes"),
        "{text}"
    );
    // Every cut of a real model is an error or a smaller graph, never a panic.
    let bytes = std::fs::read(asset("models/scrfd-500m/scrfd_500m_bnkps.onnx")).unwrap();
    for cut in (0..bytes.len()).step_by(bytes.len() / 97) {
        let _ = parse_graph(&bytes[..cut], Path::new("cut.onnx"));
    }
    let dir = tempfile::tempdir().unwrap();
    assert!(read_graph(dir.path()).is_err());
}
