//! Hostile model files through the command line: a config that describes no network, a
//! weight that is not a number, ONNX attributes of the wrong type, external data that is a
//! FIFO, a model that is a device. Every command that loads a model must refuse each one
//! with exit status 2 and a message naming the file, within bounded memory and time.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use mfn_model::Checkpoint;

mod common;
use common::{assert_refused, asset, mfn_bounded};

fn y1() -> Checkpoint {
    Checkpoint::load(
        &asset("models/mobilefacenet-y1/model-symbol.json"),
        None,
        &Device::Cpu,
    )
    .unwrap()
}

// A minimal protobuf writer for crafted ONNX models.

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

/// One Conv on an 8x3x3x3 initializer `w`, with `attr` as its only attribute and `w`'s
/// data raw or, with `external`, in that file beside the model.
fn conv_model(attr: Option<Vec<u8>>, external: Option<&str>) -> Vec<u8> {
    let mut node = Vec::new();
    for (f, s) in [(1, "x"), (1, "w"), (2, "y"), (3, "conv0"), (4, "Conv")] {
        field_bytes(f, s.as_bytes(), &mut node);
    }
    if let Some(a) = attr {
        field_bytes(5, &a, &mut node);
    }
    let mut t = Vec::new();
    for d in [8, 3, 3, 3] {
        field_int(1, d, &mut t);
    }
    field_int(2, 1, &mut t);
    field_bytes(8, b"w", &mut t);
    match external {
        None => field_bytes(9, &[0; 864], &mut t),
        Some(location) => {
            let mut e = Vec::new();
            field_bytes(1, b"location", &mut e);
            field_bytes(2, location.as_bytes(), &mut e);
            field_bytes(13, &e, &mut t);
            field_int(14, 1, &mut t);
        }
    }
    let mut g = Vec::new();
    field_bytes(1, &node, &mut g);
    field_bytes(5, &t, &mut g);
    let mut m = Vec::new();
    field_int(1, 7, &mut m);
    field_bytes(7, &g, &mut m);
    m
}

fn mkfifo(path: &Path) {
    let ok = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("running mkfifo")
        .success();
    assert!(ok, "mkfifo {}", path.display());
}

/// The crafted files, in `dir`.
fn hostile_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let base = y1();

    let mut c = base.clone();
    c.config.last_channels = 0;
    files.push(dir.join("last-channels-0.safetensors"));
    c.save(files.last().unwrap()).unwrap();

    let mut c = base.clone();
    c.config.stem_groups = Some(0);
    files.push(dir.join("stem-groups-0.safetensors"));
    c.save(files.last().unwrap()).unwrap();

    let mut c = base.clone();
    c.config.blocks[0].n = 100_000_000;
    files.push(dir.join("n-1e8.safetensors"));
    c.save(files.last().unwrap()).unwrap();

    let mut c = base.clone();
    let w = &c.tensors["conv_1_conv2d_weight"];
    let mut v: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    v[9] = f32::NAN;
    let w = Tensor::from_vec(v, w.shape(), &Device::Cpu).unwrap();
    c.tensors.insert("conv_1_conv2d_weight".into(), w);
    files.push(dir.join("nan-weight.safetensors"));
    c.save(files.last().unwrap()).unwrap();

    // `group` as a float attribute (type FLOAT, value 1.0).
    let mut attr = Vec::new();
    field_bytes(1, b"group", &mut attr);
    varint(2 << 3 | 5, &mut attr);
    attr.extend_from_slice(&1f32.to_le_bytes());
    field_int(20, 1, &mut attr);
    files.push(dir.join("group-float.onnx"));
    std::fs::write(files.last().unwrap(), conv_model(Some(attr), None)).unwrap();

    mkfifo(&dir.join("data.fifo"));
    files.push(dir.join("external-fifo.onnx"));
    std::fs::write(files.last().unwrap(), conv_model(None, Some("data.fifo"))).unwrap();

    std::os::unix::fs::symlink("/dev/zero", dir.join("zero.bin")).unwrap();
    files.push(dir.join("external-zero.onnx"));
    std::fs::write(files.last().unwrap(), conv_model(None, Some("zero.bin"))).unwrap();

    files.push(dir.join("model-is-a-fifo.onnx"));
    mkfifo(files.last().unwrap());

    files.push(dir.join("model-is-dev-zero.safetensors"));
    std::os::unix::fs::symlink("/dev/zero", files.last().unwrap()).unwrap();
    files
}

#[test]
fn every_command_refuses_hostile_models() {
    let dir = tempfile::tempdir().unwrap();
    let image = asset("golden/images/Abel_Pacheco_0001.png");
    let image = image.to_str().unwrap();
    let bin = asset("lfw/lfw-20pairs-protocol2.bin");
    let bin = bin.to_str().unwrap();
    let out = dir.path().join("out.safetensors");
    let out = out.to_str().unwrap();
    for file in hostile_files(dir.path()) {
        let model = file.to_str().unwrap();
        for args in [
            vec!["embed", "--model", model, image],
            vec!["convert", model, out],
            vec!["eval", "--model", model, "--bin", bin, "--folds", "2"],
        ] {
            let run = mfn_bounded(&args);
            assert_refused(&run, &file);
        }
        assert!(!Path::new(out).exists(), "convert wrote {out} from {model}");
    }
}

/// A real training checkpoint: one step of a quarter-width network on two identities.
fn training_checkpoint(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    for name in ["Colin_Powell", "George_W_Bush"] {
        let to = data.join(name);
        std::fs::create_dir_all(&to).unwrap();
        for i in 1..=4 {
            let file = format!("{name}_{i:04}.jpg");
            std::fs::copy(
                asset(&format!("lfw/aligned-112x112/{name}/{file}")),
                to.join(&file),
            )
            .unwrap();
        }
    }
    let out = dir.join("run");
    let run = common::mfn(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--steps",
        "1",
        "--width",
        "0.25",
        "--batch",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    common::ok(run);
    out.join("last.safetensors")
}

#[test]
fn train_refuses_to_resume_from_a_hostile_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let good = training_checkpoint(dir.path());
    let base = Checkpoint::load(&good, None, &Device::Cpu).unwrap();
    let train_key = "mfn.train.config";
    let mut files = Vec::new();
    // The network's config, the run's copy of it, or both, with a zero width.
    for (label, native, run) in [
        ("native", true, false),
        ("run", false, true),
        ("both", true, true),
    ] {
        let mut c = base.clone();
        if native {
            c.config.last_channels = 0;
        }
        if run {
            let mut t: serde_json::Value = serde_json::from_str(&c.metadata[train_key]).unwrap();
            t["model"]["last_channels"] = 0.into();
            c.metadata.insert(train_key.into(), t.to_string());
        }
        let path = dir
            .path()
            .join(format!("resume-{label}-last-channels-0.safetensors"));
        c.save(&path).unwrap();
        files.push(path);
    }
    // A weight and an optimiser state that are not numbers.
    for name in [
        "conv_1_conv2d_weight".to_string(),
        base.tensors
            .keys()
            .find(|k| k.starts_with("optim."))
            .expect("optimiser state")
            .clone(),
    ] {
        let mut c = base.clone();
        let t = &c.tensors[&name];
        let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v[0] = f32::INFINITY;
        let t = Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap();
        c.tensors.insert(name.clone(), t);
        let path = dir
            .path()
            .join(format!("resume-inf-{}.safetensors", files.len()));
        c.save(&path).unwrap();
        files.push(path);
    }
    for file in files.iter().chain(
        hostile_files(dir.path())
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "safetensors")),
    ) {
        let run = mfn_bounded(&[
            "train",
            "--resume",
            file.to_str().unwrap(),
            "--out",
            dir.path().join("resumed").to_str().unwrap(),
        ]);
        assert_refused(&run, file);
    }
}
