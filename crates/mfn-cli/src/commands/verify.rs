//! `mfn-cli verify`: do two photos show the same person?

use std::path::PathBuf;

use anyhow::{Context, Result};
use mfn_detect::{Decision, EmbeddedFace, Pick};
use serde_json::json;

use super::{args, check_output, load_checkpoint, write_atomic, DetectorArgs, PickArg};

/// Arguments of `mfn-cli verify`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model: a file (native `.safetensors`, MXNet `*-symbol.json`, `.onnx`, `.pt`) or a
    /// registry name [default: w600k_mbf].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Cosine threshold; "same" when the cosine is at least this [default: the model's
    /// `mfn.threshold` metadata, else the registry's threshold for its weights]; a cosine
    /// in -1..=1.
    #[arg(long, allow_negative_numbers = true, value_parser = args::cosine)]
    threshold: Option<f64>,
    /// The photos are already aligned crops at the model's input size: skip detection.
    #[arg(long)]
    aligned: bool,
    /// Embed each face alone, without adding its mirror image.
    #[arg(long)]
    no_flip: bool,
    /// Also write the decision as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    detector: DetectorArgs,
    /// First photo.
    a: PathBuf,
    /// Second photo.
    b: PathBuf,
}

/// Runs the command; `Ok(true)` when both photos show the same person.
pub fn run(args: Args) -> Result<bool> {
    if let Some(path) = &args.json {
        check_output(path, "--json")?;
    }
    if args.detector.pick == PickArg::All {
        anyhow::bail!("--pick all: verify compares one face per photo; use central or largest");
    }
    let ckpt = load_checkpoint(args.model.clone(), None)?;
    let mut builder = args
        .detector
        .builder()?
        .checkpoint(ckpt)
        .flip(!args.no_flip);
    if let Some(t) = args.threshold {
        builder = builder.threshold(t);
    }
    if args.aligned {
        builder = builder.without_detector();
    }
    let pipeline = builder.build().context("loading the pipeline")?;
    let threshold = pipeline.threshold().with_context(|| {
        format!(
            "{} has no verification threshold: neither its metadata nor the registry (by the \
             sha256 of its weights) gives one. Pass --threshold, or measure one with \
             `mfn-cli convert` then `mfn-cli eval --model MODEL.safetensors --save-threshold`",
            pipeline.model_source().display()
        )
    })?;
    eprintln!(
        "threshold {:.4} from {}",
        threshold.cosine, threshold.source
    );
    let (decision, faces): (Decision, Option<[EmbeddedFace; 2]>) = if args.aligned {
        // Crops at the network's input size; another size is an error naming the file.
        let [h, w] = pipeline.model().config().input_size;
        let a = mfn_data::decode_rgb_sized(&args.a, [w, h])?;
        let b = mfn_data::decode_rgb_sized(&args.b, [w, h])?;
        let e = pipeline.embed_crops(&[&a, &b], &args.a)?;
        (pipeline.decide(&e[0], &e[1])?, None)
    } else {
        let a = pipeline.face(&args.a)?;
        let b = pipeline.face(&args.b)?;
        (pipeline.decide(&a.embedding, &b.embedding)?, Some([a, b]))
    };
    let (cosine, t) = (decision.cosine, decision.threshold);
    if decision.same {
        println!("same person: yes  (cosine {cosine:.2} ≥ threshold {t:.2})");
    } else {
        println!("same person: no   (cosine {cosine:.2} < threshold {t:.2})");
    }
    if let Some(path) = &args.json {
        let face = |f: &EmbeddedFace| json!({"bbox": f.bbox, "score": f.score, "landmarks": f.landmarks, "picked_by": f.picked_by.name()});
        let mut out = json!({
            "model": pipeline.model_source().display().to_string(),
            "a": args.a.display().to_string(),
            "b": args.b.display().to_string(),
            "cosine": decision.cosine,
            "threshold": decision.threshold,
            "threshold_source": decision.threshold_source,
            "threshold_derivation": decision.threshold_derivation,
            "same": decision.same,
        });
        if let Some([a, b]) = &faces {
            out["detector"] = json!(pipeline.aligner()?.detector().name());
            out["pick"] = json!(Pick::name(a.picked_by));
            out["face_a"] = face(a);
            out["face_b"] = face(b);
        }
        write_atomic(path, serde_json::to_string_pretty(&out)?.as_bytes())?;
    }
    Ok(decision.same)
}
