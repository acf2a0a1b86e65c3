//! `--device` and `--dtype` on a machine without a GPU: the errors say what to do.

mod common;
use common::{asset, mfn, stderr};

fn png() -> String {
    asset("golden/images/Abel_Pacheco_0001.png")
        .display()
        .to_string()
}

fn bin() -> String {
    asset("lfw/lfw-20pairs-protocol2.bin").display().to_string()
}

/// Without the `cuda` feature, `--device cuda` names the feature; with it (and no GPU
/// here), it says that the device cannot be opened. Either way: exit 2, no output.
#[test]
fn device_cuda_is_a_clear_error_without_a_gpu_build_or_device() {
    let dir = tempfile::tempdir().unwrap();
    let out_json = dir.path().join("out.json");
    let out_json = out_json.to_str().unwrap();
    let runs: [Vec<String>; 3] = [
        ["embed", "--device", "cuda", "--json", out_json, &png()]
            .map(String::from)
            .to_vec(),
        [
            "eval",
            "--device",
            "cuda",
            "--bin",
            &bin(),
            "--json",
            out_json,
        ]
        .map(String::from)
        .to_vec(),
        ["train", "--device", "cuda", "--steps", "1"]
            .map(String::from)
            .to_vec(),
    ];
    for args in runs {
        let out = mfn(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        if cfg!(feature = "cuda") {
            assert!(err.contains("CUDA device"), "{args:?}: {err}");
        } else {
            assert!(
                err.contains("--features cuda") && err.contains("without CUDA support"),
                "{args:?}: {err}"
            );
        }
        assert!(
            !std::path::Path::new(out_json).exists(),
            "{args:?} wrote output"
        );
    }
}

#[test]
fn reduced_precision_needs_the_gpu() {
    for dtype in ["f16", "bf16"] {
        let out = mfn(&["embed", "--dtype", dtype, &png()]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains(&format!("--dtype {dtype}")) && err.contains("--device cuda"),
            "{err}"
        );
    }
    // Explicit defaults are fine.
    let out = mfn(&["embed", "--device", "cpu", "--dtype", "f32", &png()]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn unknown_devices_and_dtypes_list_the_choices() {
    for (flag, value, choices) in [
        ("--device", "gpu", "cpu, cuda"),
        ("--dtype", "f64", "f32, f16, bf16"),
    ] {
        let out = mfn(&["embed", flag, value, &png()]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(choices), "{flag} {value}: {err}");
    }
    let out = mfn(&["train", "--device", "tpu"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("cpu, cuda"), "{}", stderr(&out));
}

#[test]
fn eval_rejects_a_zero_batch() {
    let out = mfn(&["eval", "--bin", &bin(), "--batch", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--batch"), "{}", stderr(&out));
}
