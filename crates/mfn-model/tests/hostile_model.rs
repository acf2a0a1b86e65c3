//! Hostile model files: natives with bad configs or tensors, ONNX models with malformed
//! attributes or external data that is no plain file beside them, weights that are not
//! finite, truncations, and a deterministic mutation loop over real files. Every one must
//! be refused quickly with an error that names the file, or load into a network that
//! builds: never a panic, a hang or an allocation the file cannot back.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::asset;
use mfn_model::import::{mxnet, onnx};
use mfn_model::{Checkpoint, Config, Error, MobileFaceNet, CONFIG_KEY, FORMAT_KEY, FORMAT_VERSION};
use serde_json::{json, Value};

fn y1_symbol() -> PathBuf {
    asset("models/mobilefacenet-y1/model-symbol.json")
}

fn y1_params() -> PathBuf {
    asset("models/mobilefacenet-y1/model-0000.params")
}

fn y1_onnx() -> PathBuf {
    asset("models/mobilefacenet-y1/mobilefacenet-y1.onnx")
}

/// insightface's y1 from its MXNet files, loaded once.
fn y1() -> &'static Checkpoint {
    static Y1: OnceLock<Checkpoint> = OnceLock::new();
    Y1.get_or_init(|| Checkpoint::load(&y1_symbol(), None, &Device::Cpu).unwrap())
}

/// Runs `f` on its own thread; fails the test if it panics or takes longer than `limit`.
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: no answer within {limit:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: panicked"),
    }
}

/// Loads `path` within 10 s and returns the error, which must name the file.
fn refused(path: &Path) -> Error {
    let p = path.to_path_buf();
    let what = format!("loading {}", path.display());
    let result = within(Duration::from_secs(10), &what, move || {
        Checkpoint::load(&p, None, &Device::Cpu).map(|_| ())
    });
    let err = result.expect_err(&format!("{what} must fail"));
    let name = path.file_name().unwrap().to_string_lossy();
    assert!(
        err.to_string().contains(name.as_ref()),
        "the error must name {name}: {err}"
    );
    err
}

fn message_has(err: &Error, parts: &[&str]) {
    let msg = err.to_string();
    for p in parts {
        assert!(msg.contains(p), "`{p}` missing from: {msg}");
    }
}

/// Writes a native file with the given config JSON and tensors, as `Checkpoint::save`
/// would but without any check.
fn write_native(path: &Path, config: &Value, tensors: &HashMap<String, Tensor>) {
    let meta: HashMap<String, String> = [
        (FORMAT_KEY.to_string(), FORMAT_VERSION.to_string()),
        (CONFIG_KEY.to_string(), config.to_string()),
    ]
    .into();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let data: Vec<(&str, Tensor)> = names
        .into_iter()
        .map(|n| (n.as_str(), tensors[n].clone()))
        .collect();
    std::fs::write(path, safetensors::serialize(data, Some(meta)).unwrap()).unwrap();
}

fn y1_config_json() -> Value {
    serde_json::to_value(&y1().config).unwrap()
}

/// `tensors` with one value of `name` replaced.
fn with_value(
    tensors: &HashMap<String, Tensor>,
    name: &str,
    index: usize,
    value: f32,
) -> HashMap<String, Tensor> {
    let mut out = tensors.clone();
    let t = &tensors[name];
    let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    v[index] = value;
    out.insert(
        name.to_string(),
        Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap(),
    );
    out
}

type Edit = fn(&mut Value);

/// Config edits, each with the text its error must contain.
const BAD_CONFIGS: &[(&str, Edit)] = &[
    ("`stem_channels`", |c| c["stem_channels"] = json!(0)),
    ("`stem_groups`", |c| c["stem_groups"] = json!(0)),
    ("`stem_groups`", |c| c["stem_groups"] = json!(3)),
    ("`blocks[0].t`", |c| c["blocks"][0]["t"] = json!(0)),
    ("`blocks[2].c`", |c| c["blocks"][2]["c"] = json!(0)),
    ("`blocks[1].n`", |c| c["blocks"][1]["n"] = json!(0)),
    ("`blocks[0].n`", |c| {
        c["blocks"][0]["n"] = json!(100_000_000)
    }),
    ("`blocks[0].s`", |c| c["blocks"][0]["s"] = json!(3)),
    ("`blocks[1].hidden`", |c| {
        c["blocks"][1]["hidden"] = json!(0)
    }),
    ("`blocks[3].c`", |c| c["blocks"][3]["c"] = json!(1_000_000)),
    ("`blocks[1].t`", |c| c["blocks"][1]["t"] = json!(u64::MAX)),
    ("`last_channels`", |c| c["last_channels"] = json!(0)),
    ("`embedding_size`", |c| c["embedding_size"] = json!(0)),
    ("`input_size[0]`", |c| c["input_size"] = json!([0, 112])),
    ("`input_size[1]`", |c| c["input_size"] = json!([112, 65536])),
    ("`bn_eps`", |c| c["bn_eps"] = json!(-1.0)),
    ("`mfn.config`", |c| c["bn_eps"] = Value::Null), // NaN, as JSON writes it
    ("`head.bn_eps`", |c| c["head"]["bn_eps"] = json!(0.0)),
    ("`input_norm.scale[1]`", |c| {
        c["input_norm"]["scale"] = json!([0.0078125, 0.0, 0.0078125])
    }),
    ("`head.pool.conv_reduce.channels`", |c| {
        c["head"]["pool"] = json!({"conv_reduce": {"channels": 0}})
    }),
    ("parameters", |c| {
        for row in 1..5 {
            c["blocks"][row]["c"] = json!(2048);
        }
    }),
    ("multiply-adds", |c| {
        c["input_size"] = json!([1024, 1024]);
        c["stem_channels"] = json!(128);
        for (row, w) in [256, 512, 512, 512, 512].iter().enumerate() {
            c["blocks"][row]["c"] = json!(w);
        }
    }),
];

#[test]
fn native_configs_that_describe_no_network_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (expect, edit)) in BAD_CONFIGS.iter().enumerate() {
        let mut config = y1_config_json();
        edit(&mut config);
        let path = dir.path().join(format!("bad-config-{i}.safetensors"));
        write_native(&path, &config, &y1().tensors);
        let t = Instant::now();
        let err = refused(&path);
        message_has(&err, &[expect]);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{expect}: {:?}",
            t.elapsed()
        );
        // The same config built from scratch (training's `--init`/`--resume` path): an
        // error, before anything is sized from it.
        if let Ok(config) = serde_json::from_value::<Config>(config) {
            let vars = VarMap::new();
            let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
            match MobileFaceNet::new(&config, vb) {
                Err(Error::Config {
                    path: None,
                    message,
                }) => assert!(message.contains(expect), "{expect}: {message}"),
                Err(e) => panic!("{expect}: not a config error: {e}"),
                Ok(_) => panic!("{expect}: built"),
            }
        }
    }
}

#[test]
fn presets_and_widths_validate() {
    for name in Config::PRESETS {
        let c = Config::preset(name).unwrap();
        c.validate().unwrap();
        for w in [0.25, 0.5, 1.0, 2.0] {
            c.with_width(w).validate().unwrap();
        }
        for w in [f64::INFINITY, 1e9] {
            let err = c.with_width(w).validate().unwrap_err();
            assert!(matches!(err, Error::Config { .. }), "{err}");
        }
        // Nothing panics on a width that is no number.
        let _ = c.with_width(f64::NAN).validate();
        let _ = c.with_width(-1.0).validate();
    }
}

#[test]
fn native_tensor_list_must_match_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = y1_config_json();
    let base = &y1().tensors;
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();

    let mut t = base.clone();
    t.insert("conv_1_conv2d_weight".into(), zeros(&[64, 3, 3, 2]));
    let path = dir.path().join("shape.safetensors");
    write_native(&path, &config, &t);
    let err = refused(&path);
    assert!(matches!(err, Error::WeightShape { .. }), "{err}");
    message_has(&err, &["conv_1_conv2d_weight", "[64, 3, 3, 2]"]);

    let mut t = base.clone();
    t.remove("fc1_beta");
    let path = dir.path().join("missing.safetensors");
    write_native(&path, &config, &t);
    let err = refused(&path);
    assert!(matches!(err, Error::MissingWeight { .. }), "{err}");
    message_has(&err, &["fc1_beta"]);

    let mut t = base.clone();
    t.insert("surprise".into(), zeros(&[3]));
    let path = dir.path().join("extra.safetensors");
    write_native(&path, &config, &t);
    let err = refused(&path);
    message_has(&err, &["surprise", "not a weight"]);

    let mut t = base.clone();
    t.insert(
        "fc1_beta".into(),
        Tensor::zeros(128, DType::U8, &Device::Cpu).unwrap(),
    );
    let path = dir.path().join("dtype.safetensors");
    write_native(&path, &config, &t);
    message_has(&refused(&path), &["fc1_beta", "dtype"]);

    // A training checkpoint's state may travel along; it must be finite too.
    let mut t = base.clone();
    t.insert("head.weight".into(), zeros(&[10, 128]));
    t.insert("optim.momentum.fc1_beta".into(), zeros(&[128]));
    let path = dir.path().join("training.safetensors");
    write_native(&path, &config, &t);
    let ckpt = Checkpoint::load(&path, None, &Device::Cpu).unwrap();
    ckpt.build(&Device::Cpu).unwrap();
    let t = with_value(&t, "optim.momentum.fc1_beta", 7, f32::NAN);
    let path = dir.path().join("training-nan.safetensors");
    write_native(&path, &config, &t);
    let err = refused(&path);
    assert!(matches!(err, Error::NonFinite { index: 7, .. }), "{err}");
    message_has(&err, &["optim.momentum.fc1_beta"]);
}

#[test]
fn native_headers_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    // A header size of a terabyte, with nothing after it.
    let path = dir.path().join("huge-header.safetensors");
    std::fs::write(&path, (1u64 << 40).to_le_bytes()).unwrap();
    message_has(&refused(&path), &["header"]);
    // A config of 2 MiB.
    let mut config = y1_config_json();
    config["name"] = json!("x".repeat(2 << 20));
    let path = dir.path().join("huge-config.safetensors");
    write_native(&path, &config, &y1().tensors);
    message_has(&refused(&path), &["mfn.config", "bytes"]);
    // Header offsets past the data: the safetensors reader refuses them.
    let good = dir.path().join("good.safetensors");
    y1().save(&good).unwrap();
    let mut bytes = std::fs::read(&good).unwrap();
    bytes.truncate(bytes.len() - 1);
    let path = dir.path().join("short.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    message_has(&refused(&path), &["safetensors"]);
}

#[test]
fn non_finite_native_weights_name_the_tensor_index_and_file() {
    let dir = tempfile::tempdir().unwrap();
    for (name, index, value) in [
        ("conv_1_conv2d_weight", 5, f32::NAN),
        ("fc1_beta", 0, f32::INFINITY),
        (
            "dconv_23_conv_dw_batchnorm_moving_var",
            17,
            f32::NEG_INFINITY,
        ),
    ] {
        let mut ckpt = y1().clone();
        ckpt.tensors = with_value(&ckpt.tensors, name, index, value);
        // Built in memory: refused too.
        let err = ckpt.build(&Device::Cpu).unwrap_err();
        assert!(matches!(err, Error::NonFinite { .. }), "{err}");
        let path = dir.path().join(format!("{name}.safetensors"));
        ckpt.save(&path).unwrap();
        let err = refused(&path);
        match &err {
            Error::NonFinite {
                name: n, index: i, ..
            } => assert_eq!((n.as_str(), *i), (name, index)),
            other => panic!("{other}"),
        }
        message_has(&err, &[name, &format!("index {index}")]);
    }
    // In half precision, and an f64 value no f32 holds.
    for (dtype, value) in [(DType::F16, f32::INFINITY), (DType::F64, 0.0)] {
        let mut ckpt = y1().clone();
        let t = &ckpt.tensors["fc1_moving_mean"];
        let t = if dtype == DType::F64 {
            let mut v: Vec<f64> = t.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
            v[3] = 1e300;
            Tensor::from_vec(v, 128, &Device::Cpu).unwrap()
        } else {
            let mut v: Vec<f32> = t.to_vec1().unwrap();
            v[3] = value;
            Tensor::from_vec(v, 128, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        ckpt.tensors.insert("fc1_moving_mean".into(), t);
        let path = dir.path().join(format!("{dtype:?}.safetensors"));
        ckpt.save(&path).unwrap();
        let err = refused(&path);
        assert!(matches!(err, Error::NonFinite { index: 3, .. }), "{err}");
    }
    // A variance below -eps would put a NaN in every output.
    let mut ckpt = y1().clone();
    ckpt.tensors = with_value(&ckpt.tensors, "fc1_moving_var", 2, -1.0);
    let path = dir.path().join("negative-variance.safetensors");
    ckpt.save(&path).unwrap();
    message_has(&refused(&path), &["fc1_moving_var", "variance"]);
}

/// The byte offset of the first occurrence of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("pattern in the file")
}

/// The little-endian bytes of the first `n` values of a y1 weight.
fn weight_bytes(name: &str, n: usize) -> Vec<u8> {
    let v: Vec<f32> = y1().tensors[name].flatten_all().unwrap().to_vec1().unwrap();
    v[..n].iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn non_finite_onnx_and_mxnet_weights_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let name = "conv_1_conv2d_weight";
    let pattern = weight_bytes(name, 8);

    let mut bytes = std::fs::read(y1_onnx()).unwrap();
    let at = find(&bytes, &pattern);
    bytes[at + 8..at + 12].copy_from_slice(&f32::NAN.to_le_bytes());
    let path = dir.path().join("nan.onnx");
    std::fs::write(&path, &bytes).unwrap();
    let err = refused(&path);
    assert!(matches!(err, Error::NonFinite { index: 2, .. }), "{err}");
    message_has(&err, &[name]);

    let mxnet_dir = dir.path().join("mxnet");
    std::fs::create_dir(&mxnet_dir).unwrap();
    std::fs::copy(y1_symbol(), mxnet_dir.join("model-symbol.json")).unwrap();
    let mut bytes = std::fs::read(y1_params()).unwrap();
    let at = find(&bytes, &pattern);
    bytes[at + 4..at + 8].copy_from_slice(&f32::INFINITY.to_le_bytes());
    let params = mxnet_dir.join("model-0000.params");
    std::fs::write(&params, &bytes).unwrap();
    let err = within(Duration::from_secs(10), "mxnet", {
        let s = mxnet_dir.join("model-symbol.json");
        move || Checkpoint::load(&s, None, &Device::Cpu).map(|_| ())
    })
    .unwrap_err();
    assert!(matches!(err, Error::NonFinite { index: 1, .. }), "{err}");
    message_has(&err, &[name, "model-0000.params"]);
}

// ---- ONNX, crafted: a small protobuf writer ----

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

fn field_float(n: u64, v: f32, out: &mut Vec<u8>) {
    varint(n << 3 | 5, out);
    out.extend_from_slice(&v.to_le_bytes());
}

/// An attribute: `(name, writer of its value fields)`.
fn attribute(name: &str, value: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut a = Vec::new();
    field_bytes(1, name.as_bytes(), &mut a);
    value(&mut a);
    a
}

fn node(op: &str, inputs: &[&str], outputs: &[&str], attrs: &[Vec<u8>]) -> Vec<u8> {
    let mut n = Vec::new();
    for i in inputs {
        field_bytes(1, i.as_bytes(), &mut n);
    }
    for o in outputs {
        field_bytes(2, o.as_bytes(), &mut n);
    }
    field_bytes(3, format!("{op}_0").as_bytes(), &mut n);
    field_bytes(4, op.as_bytes(), &mut n);
    for a in attrs {
        field_bytes(5, a, &mut n);
    }
    n
}

/// A float initializer, raw or (with `external`) as external data entries.
fn initializer(name: &str, dims: &[u64], external: Option<&[(&str, &str)]>) -> Vec<u8> {
    let mut t = Vec::new();
    for d in dims {
        field_int(1, *d, &mut t);
    }
    field_int(2, 1, &mut t);
    field_bytes(8, name.as_bytes(), &mut t);
    match external {
        None => {
            let n: u64 = dims.iter().product();
            field_bytes(9, &vec![0u8; 4 * n as usize], &mut t);
        }
        Some(entries) => {
            for (k, v) in entries {
                let mut e = Vec::new();
                field_bytes(1, k.as_bytes(), &mut e);
                field_bytes(2, v.as_bytes(), &mut e);
                field_bytes(13, &e, &mut t);
            }
            field_int(14, 1, &mut t);
        }
    }
    t
}

fn model(nodes: &[Vec<u8>], inits: &[Vec<u8>]) -> Vec<u8> {
    let mut g = Vec::new();
    for n in nodes {
        field_bytes(1, n, &mut g);
    }
    for i in inits {
        field_bytes(5, i, &mut g);
    }
    let mut m = Vec::new();
    field_int(1, 7, &mut m);
    field_bytes(7, &g, &mut m);
    m
}

/// A Conv with the given attributes on an 8x3x3x3 weight.
fn conv_model(attrs: &[Vec<u8>]) -> Vec<u8> {
    model(
        &[node("Conv", &["x", "w"], &["y"], attrs)],
        &[initializer("w", &[8, 3, 3, 3], None)],
    )
}

#[test]
fn onnx_attributes_of_the_wrong_type_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "group",
            attribute("group", |a| {
                field_float(2, 1.0, a);
                field_int(20, 1, a);
            }),
        ),
        ("group", attribute("group", |a| field_bytes(4, b"one", a))),
        ("group", attribute("group", |_| {})),
        (
            "group",
            attribute("group", |a| {
                field_int(8, 1, a);
                field_int(20, 7, a);
            }),
        ),
        (
            "kernel_shape",
            attribute("kernel_shape", |a| field_float(2, 3.0, a)),
        ),
        ("pads", attribute("pads", |a| field_int(3, 1, a))),
        ("strides", attribute("strides", |a| field_int(20, 2, a))),
    ];
    for (i, (attr, a)) in cases.into_iter().enumerate() {
        let bytes = conv_model(&[a]);
        let path = dir.path().join(format!("attr-{i}.onnx"));
        let err = onnx::check(&bytes, &path).unwrap_err();
        message_has(&err, &[&format!("attribute `{attr}`"), "Conv_0"]);
        std::fs::write(&path, &bytes).unwrap();
        message_has(&refused(&path), &[&format!("attribute `{attr}`")]);
    }
    // A negative group or pad is no size.
    let bytes = conv_model(&[attribute("group", |a| field_int(3, (-4i64) as u64, a))]);
    message_has(
        &onnx::check(&bytes, Path::new("neg.onnx")).unwrap_err(),
        &["group"],
    );
    let bytes = conv_model(&[attribute("pads", |a| {
        for p in [1i64, -1, 1, 1] {
            field_int(8, p as u64, a);
        }
    })]);
    message_has(
        &onnx::check(&bytes, Path::new("neg.onnx")).unwrap_err(),
        &["pads"],
    );
    // BatchNormalization's epsilon as an int.
    let bytes = model(
        &[
            node("Conv", &["x", "w"], &["y"], &[]),
            node(
                "BatchNormalization",
                &["y", "w", "w", "w", "w"],
                &["z"],
                &[attribute("epsilon", |a| field_int(3, 1, a))],
            ),
        ],
        &[initializer("w", &[8, 3, 3, 3], None)],
    );
    message_has(
        &onnx::check(&bytes, Path::new("eps.onnx")).unwrap_err(),
        &["attribute `epsilon`"],
    );
    // Dims whose product overflows, or that the data does not fill.
    let mut t = Vec::new();
    for d in [u32::MAX as u64, u32::MAX as u64, 16] {
        field_int(1, d, &mut t);
    }
    field_int(2, 1, &mut t);
    field_bytes(8, b"w", &mut t);
    field_bytes(9, &[0; 16], &mut t);
    let bytes = model(&[node("Conv", &["x", "w"], &["y"], &[])], &[t]);
    message_has(
        &onnx::check(&bytes, Path::new("dims.onnx")).unwrap_err(),
        &["`w`"],
    );
    let mut t = Vec::new();
    field_int(1, 5, &mut t);
    field_int(2, 1, &mut t);
    field_bytes(8, b"w", &mut t);
    field_bytes(9, &[0; 21], &mut t);
    let bytes = model(&[], &[t]);
    message_has(
        &onnx::check(&bytes, Path::new("short.onnx")).unwrap_err(),
        &["`w`", "21 bytes"],
    );
}

fn mkfifo(path: &Path) {
    let ok = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("running mkfifo")
        .success();
    assert!(ok, "mkfifo {}", path.display());
}

/// A label, the external data entries of the tensor, and what the error must say.
type ExternalCase<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);

#[test]
fn onnx_external_data_must_be_a_regular_file_inside_the_folder() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    // 8x3x3x3 floats = 864 bytes.
    std::fs::write(dir.join("w.bin"), vec![0u8; 864]).unwrap();
    std::fs::write(root.path().join("outside.bin"), vec![0u8; 864]).unwrap();
    mkfifo(&dir.join("fifo.bin"));
    std::os::unix::fs::symlink("/dev/zero", dir.join("zero.bin")).unwrap();
    std::os::unix::fs::symlink("../outside.bin", dir.join("link-out.bin")).unwrap();
    std::os::unix::fs::symlink("fifo.bin", dir.join("link-fifo.bin")).unwrap();
    let outside = root.path().join("outside.bin");
    let outside = outside.to_str().unwrap();
    let cases: &[ExternalCase] = &[
        ("fifo", &[("location", "fifo.bin")], "regular file"),
        (
            "link-fifo",
            &[("location", "link-fifo.bin")],
            "regular file",
        ),
        ("zero", &[("location", "zero.bin")], "outside"),
        ("climb", &[("location", "../outside.bin")], "outside"),
        ("absolute", &[("location", outside)], "outside"),
        ("link-out", &[("location", "link-out.bin")], "outside"),
        ("missing", &[("location", "nothing.bin")], "cannot resolve"),
        ("no-location", &[("offset", "0")], "no location"),
        (
            "long",
            &[("location", "w.bin"), ("length", "100000")],
            "past the end",
        ),
        (
            "offset",
            &[("location", "w.bin"), ("offset", "865")],
            "past the end",
        ),
        (
            "huge-offset",
            &[("location", "w.bin"), ("offset", "18446744073709551615")],
            "past the end",
        ),
        (
            "short",
            &[("location", "w.bin"), ("offset", "4")],
            "needs 864",
        ),
        (
            "bad-number",
            &[("location", "w.bin"), ("length", "-1")],
            "not a byte count",
        ),
    ];
    for (label, entries, expect) in cases {
        let bytes = model(
            &[node("Conv", &["x", "w"], &["y"], &[])],
            &[initializer("w", &[8, 3, 3, 3], Some(entries))],
        );
        let path = dir.join(format!("{label}.onnx"));
        std::fs::write(&path, &bytes).unwrap();
        let err = refused(&path);
        message_has(&err, &["external data", expect]);
    }
    // The same file, where it is: read, and then the graph is what fails.
    let bytes = model(
        &[node("Conv", &["x", "w"], &["y"], &[])],
        &[initializer(
            "w",
            &[8, 3, 3, 3],
            Some(&[("location", "w.bin"), ("length", "864")]),
        )],
    );
    let path = dir.join("fine.onnx");
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(onnx::check(&bytes, &path).unwrap(), 1);
    let err = refused(&path);
    assert!(!err.to_string().contains("external data"), "{err}");
}

#[test]
fn model_paths_that_are_no_regular_file_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "fifo.onnx",
        "fifo.safetensors",
        "fifo.pt",
        "fifo-symbol.json",
    ] {
        mkfifo(&dir.path().join(name));
        message_has(&refused(&dir.path().join(name)), &["regular file"]);
    }
    for name in [
        "zero.onnx",
        "zero.safetensors",
        "zero.pth",
        "zero-symbol.json",
    ] {
        let path = dir.path().join(name);
        std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
        message_has(&refused(&path), &["regular file"]);
    }
    // An MXNet symbol whose params are a FIFO, or /dev/zero.
    for (i, params) in ["fifo", "zero"].iter().enumerate() {
        let sub = dir.path().join(format!("mx{i}"));
        std::fs::create_dir(&sub).unwrap();
        std::fs::copy(y1_symbol(), sub.join("model-symbol.json")).unwrap();
        let p = sub.join("model-0000.params");
        if *params == "fifo" {
            mkfifo(&p);
        } else {
            std::os::unix::fs::symlink("/dev/zero", &p).unwrap();
        }
        let s = sub.join("model-symbol.json");
        let err = within(Duration::from_secs(10), "params", move || {
            Checkpoint::load(&s, None, &Device::Cpu).map(|_| ())
        })
        .unwrap_err();
        message_has(&err, &["model-0000.params", "regular file"]);
    }
}

/// Offsets to cut a file of `len` bytes at: dense at the start, spread over the rest.
fn cuts(len: usize, n: usize) -> Vec<usize> {
    let mut out: Vec<usize> = (0..n / 2).map(|i| i * 7).collect();
    out.extend((0..n / 2).map(|i| len * (i + 1) / (n / 2 + 1)));
    out.push(len - 1);
    out.retain(|c| *c < len);
    out
}

#[test]
fn truncated_files_are_refused_at_every_offset() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::Cpu;
    // ONNX: a cut past the graph (inside the trailing opset entry) still holds a model.
    let bytes = std::fs::read(y1_onnx()).unwrap();
    let path = dir.path().join("cut.onnx");
    for cut in cuts(bytes.len(), 80) {
        match onnx::load_bytes(&bytes[..cut], &path, None, None, &device) {
            Err(e) => assert!(e.to_string().contains("cut.onnx"), "{cut}: {e}"),
            Ok(_) => assert!(cut + 16 >= bytes.len(), "a cut at {cut} loaded"),
        }
    }
    for cut in [10, 20_000, bytes.len() / 2] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        refused(&path);
    }
    // MXNet params.
    let bytes = std::fs::read(y1_params()).unwrap();
    let path = dir.path().join("cut.params");
    for cut in cuts(bytes.len(), 80) {
        let err = mxnet::parse_params(&bytes[..cut], &path).unwrap_err();
        assert!(err.to_string().contains("cut.params"), "{cut}: {err}");
    }
    let mx = dir.path().join("mx");
    std::fs::create_dir(&mx).unwrap();
    std::fs::copy(y1_symbol(), mx.join("model-symbol.json")).unwrap();
    for cut in [0, 24, bytes.len() / 3, bytes.len() - 3] {
        std::fs::write(mx.join("model-0000.params"), &bytes[..cut]).unwrap();
        let err = Checkpoint::load(&mx.join("model-symbol.json"), None, &device).unwrap_err();
        assert!(
            err.to_string().contains("model-0000.params"),
            "{cut}: {err}"
        );
    }
    // MXNet symbol.
    let text = std::fs::read(y1_symbol()).unwrap();
    let path = dir.path().join("cut-symbol.json");
    for cut in cuts(text.len(), 40) {
        let err = mxnet::parse_symbol(&text[..cut], &path).unwrap_err();
        assert!(err.to_string().contains("cut-symbol.json"), "{cut}: {err}");
    }
    // Native.
    let native = dir.path().join("y1.safetensors");
    y1().save(&native).unwrap();
    let bytes = std::fs::read(&native).unwrap();
    let path = dir.path().join("cut.safetensors");
    for cut in cuts(bytes.len(), 80) {
        let err = Checkpoint::from_native_bytes(&bytes[..cut], &path, &device).unwrap_err();
        assert!(err.to_string().contains("cut.safetensors"), "{cut}: {err}");
    }
}

// ---- Mutation loop ----

/// xorshift64*: a fixed-seed generator, so every run tries the same mutants.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Values that stress counts, lengths and floats.
const INTERESTING: &[u32] = &[
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    0x7fc0_0000, // NaN
    0x7f80_0000, // inf
    0xff80_0000, // -inf
    0x0010_0000,
];

/// One to four mutations of `base`; positions fall in `hot` (where the structure is) with
/// probability 3/4.
fn mutate(rng: &mut Rng, base: &[u8], hot: std::ops::Range<usize>) -> Vec<u8> {
    let mut b = base.to_vec();
    for _ in 0..1 + rng.below(4) {
        if b.is_empty() {
            break;
        }
        let pos = if rng.below(4) > 0 && hot.start < hot.end.min(b.len()) {
            hot.start + rng.below(hot.end.min(b.len()) - hot.start)
        } else {
            rng.below(b.len())
        };
        match rng.below(6) {
            0 => b[pos] ^= 1 << rng.below(8),
            1 => b[pos] = rng.next() as u8,
            2 => {
                let v = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                let end = (pos + 4).min(b.len());
                b[pos..end].copy_from_slice(&v[..end - pos]);
            }
            3 => b.truncate(pos),
            4 => {
                // Duplicate a chunk in place.
                let len = 1 + rng.below(64);
                let from = rng.below(b.len());
                let chunk: Vec<u8> = b[from..(from + len).min(b.len())].to_vec();
                b.splice(pos..pos, chunk);
            }
            _ => {
                // A varint-like run of continuation bytes, or a removed range.
                if rng.below(2) == 0 {
                    let n = 1 + rng.below(10);
                    b.splice(pos..pos, std::iter::repeat_n(0xffu8, n));
                } else {
                    let end = (pos + 1 + rng.below(32)).min(b.len());
                    b.drain(pos..end);
                }
            }
        }
    }
    b
}

struct Format {
    name: &'static str,
    /// File the mutant is written to (others in its folder stay as they are).
    file: PathBuf,
    /// What `Checkpoint::load` is given.
    load: PathBuf,
    base: Vec<u8>,
    hot: std::ops::Range<usize>,
    mutants: usize,
}

#[test]
fn mutated_real_files_never_panic() {
    let root = tempfile::tempdir().unwrap();
    let device = Device::Cpu;
    let sub = |name: &str| {
        let d = root.path().join(name);
        std::fs::create_dir(&d).unwrap();
        d
    };
    // MXNet: the params mutated beside the real symbol, and the symbol beside real params.
    let params_dir = sub("params");
    std::fs::copy(y1_symbol(), params_dir.join("model-symbol.json")).unwrap();
    let symbol_dir = sub("symbol");
    std::fs::copy(y1_params(), symbol_dir.join("model-0000.params")).unwrap();
    let native_dir = sub("native");
    let native = native_dir.join("y1.safetensors");
    y1().save(&native).unwrap();
    let native_bytes = std::fs::read(&native).unwrap();
    let native_header = 8 + u64::from_le_bytes(native_bytes[..8].try_into().unwrap()) as usize;
    let onnx_dir = sub("onnx");
    let onnx_bytes = std::fs::read(y1_onnx()).unwrap();
    let params_bytes = std::fs::read(y1_params()).unwrap();
    let symbol_bytes = std::fs::read(y1_symbol()).unwrap();
    let formats = [
        Format {
            name: "onnx (y1)",
            file: onnx_dir.join("y1.onnx"),
            load: onnx_dir.join("y1.onnx"),
            hot: 0..32 << 10,
            base: onnx_bytes,
            mutants: 600,
        },
        Format {
            name: "mxnet params (y1)",
            file: params_dir.join("model-0000.params"),
            load: params_dir.join("model-symbol.json"),
            hot: 0..params_bytes.len(),
            base: params_bytes,
            mutants: 600,
        },
        Format {
            name: "mxnet symbol (y1)",
            file: symbol_dir.join("model-symbol.json"),
            load: symbol_dir.join("model-symbol.json"),
            hot: 0..symbol_bytes.len(),
            base: symbol_bytes,
            mutants: 1500,
        },
        Format {
            name: "native (y1)",
            file: native.clone(),
            load: native.clone(),
            hot: 0..native_header,
            base: native_bytes,
            mutants: 1000,
        },
    ];
    let failures_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hostile-mutants");
    let mut failures = Vec::new();
    let start = Instant::now();
    for (k, f) in formats.iter().enumerate() {
        // Param files: the structure is the headers between the arrays and the names at
        // the end, so "hot" is everywhere but mutations land mostly in the data; biasing
        // every other mutant to the last 16 KiB reaches the names.
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (k as u64 + 1));
        let (mut accepted, mut rejected) = (0, 0);
        let t = Instant::now();
        for i in 0..f.mutants {
            let hot = if f.name.starts_with("mxnet params") && i % 2 == 1 {
                f.base.len() - (16 << 10)..f.base.len()
            } else {
                f.hot.clone()
            };
            let bytes = mutate(&mut rng, &f.base, hot);
            std::fs::write(&f.file, &bytes).unwrap();
            let load = f.load.clone();
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let ckpt = Checkpoint::load(&load, None, &device)?;
                ckpt.build(&device).map(|_| ())
            }));
            match outcome {
                Ok(Ok(())) => accepted += 1,
                Ok(Err(e)) => {
                    rejected += 1;
                    let msg = e.to_string();
                    // The mutated file, or the one beside it that it led to.
                    let dir = f.file.parent().unwrap();
                    let named = std::fs::read_dir(dir)
                        .unwrap()
                        .any(|e| msg.contains(e.unwrap().file_name().to_str().unwrap()));
                    if !named {
                        failures.push(format!(
                            "{} mutant {i}: the error names no file: {msg}",
                            f.name
                        ));
                    }
                }
                Err(_) => {
                    std::fs::create_dir_all(&failures_dir).unwrap();
                    let keep = failures_dir.join(format!("{}-{i}", k));
                    std::fs::write(&keep, &bytes).unwrap();
                    failures.push(format!(
                        "{} mutant {i} panicked: {}",
                        f.name,
                        keep.display()
                    ));
                }
            }
        }
        println!(
            "{}: {} mutants, {accepted} accepted, {rejected} rejected, {:.1} s",
            f.name,
            f.mutants,
            t.elapsed().as_secs_f64()
        );
    }
    println!("all mutants: {:.1} s", start.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
