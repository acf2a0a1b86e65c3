//! `mfn-cli eval`: the pair protocols on a model, over one verification set or several.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use mfn_data::VerificationSet;
use mfn_eval::{KFoldReport, PairScores, Report};
use serde_json::{json, Value};

use mfn_hub::pretrained::{THRESHOLD_KEY, THRESHOLD_PAIRS_KEY, THRESHOLD_SOURCE_KEY};

use super::{
    args, asset_or, check_output, hub, image_size, pinned_file, write_atomic, write_atomic_with,
    DeviceKind, RunArgs,
};

/// The false accept rates reported.
const FARS: [f64; 4] = [1e-1, 1e-2, 1e-3, 1e-4];

/// The false accept rate of the sets table's TAR column.
const TABLE_FAR: f64 = 1e-3;

/// How `--save-threshold` picks the threshold it stores.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ThresholdRule {
    /// The mean of the exact-protocol fold thresholds (best accuracy).
    Best,
    /// The lowest cosine whose false accept rate over all pairs stays within this.
    Far(f64),
}

impl std::str::FromStr for ThresholdRule {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "best" {
            return Ok(Self::Best);
        }
        let far = s
            .strip_prefix("far=")
            .and_then(|f| f.parse::<f64>().ok())
            .filter(|f| f.is_finite() && *f > 0.0 && *f < 1.0);
        far.map(Self::Far)
            .ok_or_else(|| format!("`{s}`: expected `best` or `far=F` with 0 < F < 1"))
    }
}

/// Arguments of `mfn-cli eval`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model: a file (native `.safetensors`, MXNet `*-symbol.json`, `.onnx`, `.pt`) or a
    /// registry name [default: w600k_mbf].
    #[arg(long)]
    model: Option<PathBuf>,
    /// LFW `pairs.txt` [default: $MFN_ASSETS/lfw/pairs.txt, else the registry's `lfw_pairs`].
    #[arg(long)]
    pairs: Option<PathBuf>,
    /// Folder of aligned faces, `<Name>/<Name>_<NNNN>.<ext>`
    /// [default: $MFN_ASSETS/lfw/aligned-112x112].
    #[arg(long)]
    images: Option<PathBuf>,
    /// An insightface verification set (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...)
    /// instead of a pairs file and image folder.
    #[arg(long, conflicts_with_all = ["pairs", "images", "sets"])]
    bin: Option<PathBuf>,
    /// Pinned verification sets by name, comma-separated (`lfw,agedb_30,cfp_fp,calfw,cplfw,
    /// cfp_ff`), or `all`: each comes from $MFN_ASSETS, the cache or the Hub, and the report
    /// is one table, a row per set [default, with no data flags: LFW's pairs.txt and
    /// aligned images under $MFN_ASSETS, else `lfw`].
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["pairs", "images"])]
    sets: Vec<String>,
    /// With --bin or --sets: the number of folds of consecutive pairs, as insightface
    /// splits them, at least 2 [default: 10].
    #[arg(long, allow_negative_numbers = true, value_parser = args::count(2, usize::MAX))]
    folds: Option<usize>,
    /// Extension of the image files.
    #[arg(long, default_value = "jpg", value_parser = args::extension)]
    ext: String,
    /// Embed each face alone, without adding its mirror image.
    #[arg(long)]
    no_flip: bool,
    /// Images per batch (each runs twice with the flip test) [default: 8 on the CPU, where
    /// small batches keep the activations in cache; 256 on a GPU; at most 1024].
    #[arg(long, allow_negative_numbers = true, value_parser = args::count(1, args::MAX_BATCH))]
    batch: Option<usize>,
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw the ROC curve (`.svg` or `.png`).
    #[arg(long, value_parser = args::plot_file)]
    roc: Option<PathBuf>,
    /// Store a threshold in the model's metadata (`mfn.threshold`), where `mfn-cli verify`
    /// finds it: `best` (the mean exact-protocol fold threshold) or `far=1e-3` (the lowest
    /// cosine whose false accept rate stays within 1e-3). Needs a native `.safetensors`
    /// model, or a registry model (its converted copy is updated).
    #[arg(long, value_name = "RULE", num_args = 0..=1, default_missing_value = "best")]
    save_threshold: Option<ThresholdRule>,
    /// With --save-threshold: replace a stored threshold that was measured on more pairs.
    #[arg(long, requires = "save_threshold")]
    force: bool,
    #[command(flatten)]
    run: RunArgs,
}

/// One verification set to score, by name.
struct Named {
    name: String,
    set: VerificationSet,
}

/// The sets the arguments ask for, read and checked before the model is loaded.
fn data_sets(args: &Args) -> Result<Vec<Named>> {
    let folds = args.folds.unwrap_or(10);
    if args.folds.is_some() && args.bin.is_none() && args.sets.is_empty() {
        anyhow::bail!("--folds applies to --bin and --sets, whose pairs come in consecutive folds");
    }
    if let Some(path) = &args.bin {
        let set = VerificationSet::bin(path, folds).context("reading the verification set")?;
        return Ok(vec![Named {
            name: path.display().to_string(),
            set,
        }]);
    }
    let explicit_pairs = args.pairs.is_some() || args.images.is_some();
    let assets_lfw = mfn_data::assets::root()
        .filter(|r| r.join("lfw/pairs.txt").is_file() && r.join("lfw/aligned-112x112").is_dir());
    let names: Vec<String> = if !args.sets.is_empty() {
        if args.sets.iter().any(|s| s == "all") {
            mfn_hub::SETS.iter().map(|s| s.to_string()).collect()
        } else {
            args.sets.clone()
        }
    } else if explicit_pairs || assets_lfw.is_some() {
        // LFW's pairs.txt is public: without --pairs or an assets copy, the pinned one.
        let path = match (&args.pairs, &assets_lfw) {
            (Some(p), _) => p.clone(),
            (None, Some(root)) => root.join("lfw/pairs.txt"),
            (None, None) => pinned_file(&hub()?, "lfw_pairs")?,
        };
        let root = asset_or(args.images.clone(), "lfw/aligned-112x112", "--images")?;
        let set = VerificationSet::pairs(&path, &root, &args.ext)
            .with_context(|| format!("reading {} and its images", path.display()))?;
        return Ok(vec![Named {
            name: "lfw (pairs.txt)".into(),
            set,
        }]);
    } else {
        eprintln!(
            "note: no --pairs/--images/--bin/--sets and no LFW folder under {}; evaluating \
             the pinned `lfw` set",
            mfn_data::assets::ENV
        );
        vec!["lfw".into()]
    };
    let hub = hub()?;
    let mut out = Vec::new();
    for name in names {
        hub.registry
            .get_kind(&name, mfn_hub::Kind::Set)
            .with_context(|| format!("--sets {name}"))?;
        let path = pinned_file(&hub, &name)?;
        let set = VerificationSet::bin(&path, folds)
            .with_context(|| format!("reading the set `{name}`"))?;
        out.push(Named { name, set });
    }
    Ok(out)
}

/// One set's results.
struct Scored {
    name: String,
    source: PathBuf,
    scores: PairScores,
    report: Report,
    images: usize,
    seconds: f64,
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    // Every output is checked before the long work, not found unwritable after it.
    if let Some(path) = &args.json {
        check_output(path, "--json")?;
    }
    if let Some(path) = &args.roc {
        check_output(path, "--roc")?;
    }
    let sets = data_sets(&args)?;
    if sets.len() > 1 && (args.save_threshold.is_some() || args.roc.is_some()) {
        anyhow::bail!(
            "--save-threshold and --roc take one set; --sets names {}",
            sets.len()
        );
    }
    let (device, mut ckpt, model) = args.run.load(args.model.clone())?;
    let batch = match (args.batch, args.run.device) {
        (Some(b), _) => b,
        (None, DeviceKind::Cpu) => 8,
        (None, DeviceKind::Cuda) => 256,
    };
    if args.save_threshold.is_some()
        && ckpt.source.extension().and_then(|e| e.to_str()) != Some("safetensors")
    {
        anyhow::bail!(
            "--save-threshold writes into a native model: convert {} with `mfn-cli convert` first",
            ckpt.source.display()
        );
    }
    if args.save_threshold.is_some() {
        check_output(&ckpt.source, "--save-threshold")?;
    }
    let flip = !args.no_flip;
    let mut scored = Vec::new();
    for Named { name, set } in sets {
        let images = set.images();
        let bar = ProgressBar::new(images as u64).with_style(
            ProgressStyle::with_template(
                "{spinner} {msg} [{bar:40}] {pos}/{len} faces  {per_sec}  eta {eta}",
            )?
            .progress_chars("=> "),
        );
        bar.set_message(name.clone());
        let start = Instant::now();
        // Batches are decoded on the CPU and moved to the device here, on this thread.
        let embeddings = set.embed(
            batch,
            image_size(model.config()),
            &Device::Cpu,
            |x| -> Result<_> { Ok(model.embed(&x.to_device(&device)?, flip)?) },
            |done| bar.set_position(done as u64),
        )?;
        let cosines = mfn_eval::pair_cosines(&embeddings, set.pair_index())
            .with_context(|| format!("scoring {}", set.source().display()))?;
        let folds = set
            .folds()
            .with_context(|| format!("{} has no folds", set.source().display()))?
            .to_vec();
        let scores = PairScores::new(cosines, set.labels().to_vec(), folds)
            .with_context(|| format!("scoring {}", set.source().display()))?;
        let seconds = start.elapsed().as_secs_f64();
        bar.finish_and_clear();
        let report = mfn_eval::evaluate(&scores, &FARS)
            .with_context(|| format!("evaluating {}", set.source().display()))?;
        for w in report.warnings() {
            eprintln!("warning: {name}: {w}");
        }
        scored.push(Scored {
            name,
            source: set.source().to_path_buf(),
            scores,
            report,
            images,
            seconds,
        });
    }
    let model_name = ckpt.source.display().to_string();

    if let [one] = scored.as_slice() {
        print_table(
            &model_name,
            &one.report,
            one.images,
            flip,
            one.seconds,
            one.images as f64 / one.seconds,
        );
    } else {
        print_sets_table(&model_name, &scored, flip);
    }

    if let Some(path) = &args.json {
        let per_set: Vec<Value> = scored
            .iter()
            .map(|s| {
                let mut v = report_json(
                    &model_name,
                    &s.report,
                    flip,
                    s.images,
                    s.seconds,
                    s.images as f64 / s.seconds,
                );
                v["set"] = json!(s.name);
                v["source"] = json!(s.source.display().to_string());
                v
            })
            .collect();
        let out = match per_set.as_slice() {
            [one] => one.clone(),
            _ => json!({ "model": model_name, "flip": flip, "sets": per_set }),
        };
        write_atomic(path, serde_json::to_string_pretty(&out)?.as_bytes())?;
    }
    if let (Some(rule), [one]) = (args.save_threshold, scored.as_slice()) {
        save_threshold(&mut ckpt, rule, one, flip, args.force)?;
    }
    if let (Some(path), [one]) = (&args.roc, scored.as_slice()) {
        let curve = mfn_eval::roc(&one.scores.scores, &one.scores.labels)?;
        let title = format!(
            "{} on {} ({} pairs)",
            ckpt.config.name,
            one.source.display(),
            one.report.pairs
        );
        write_atomic_with(path, |tmp| mfn_eval::plot_roc(&curve, tmp, &title))?;
    }
    Ok(())
}

/// Stores the threshold `rule` picks into the native model, unless it would replace one
/// measured on more pairs without `force`.
fn save_threshold(
    ckpt: &mut mfn_model::Checkpoint,
    rule: ThresholdRule,
    s: &Scored,
    flip: bool,
    force: bool,
) -> Result<()> {
    let r = &s.report;
    let flip_word = if flip { "on" } else { "off" };
    let (t, how) = match rule {
        ThresholdRule::Best => (
            r.exact.mean_threshold_cosine,
            format!(
                "mean of the {} exact-protocol fold thresholds on {} ({} pairs), flip test {flip_word}",
                r.folds,
                s.source.display(),
                r.pairs
            ),
        ),
        ThresholdRule::Far(far) => {
            let roc = mfn_eval::roc(&s.scores.scores, &s.scores.labels)?;
            let op = mfn_eval::tar_at_far(&roc, far)?;
            (
                op.threshold,
                format!(
                    "lowest cosine with FAR <= {far} on {} ({} pairs: {} of {} different-person \
                     pairs accepted, TAR {:.3}%), flip test {flip_word}",
                    s.source.display(),
                    r.pairs,
                    op.false_accepts,
                    op.negatives,
                    op.tar * 100.0
                ),
            )
        }
    };
    let stored_pairs = ckpt
        .metadata
        .get(THRESHOLD_PAIRS_KEY)
        .and_then(|p| p.parse::<usize>().ok());
    if let (Some(old), false) = (stored_pairs, force) {
        if old > r.pairs {
            anyhow::bail!(
                "{} holds a threshold measured on {old} pairs ({}); this run has {} pairs. \
                 Pass --force to replace it anyway",
                ckpt.source.display(),
                ckpt.metadata
                    .get(THRESHOLD_SOURCE_KEY)
                    .map_or("no derivation", String::as_str),
                r.pairs
            );
        }
    }
    ckpt.metadata.insert(THRESHOLD_KEY.into(), format!("{t}"));
    ckpt.metadata.insert(THRESHOLD_SOURCE_KEY.into(), how);
    ckpt.metadata
        .insert(THRESHOLD_PAIRS_KEY.into(), r.pairs.to_string());
    let path = ckpt.source.clone();
    write_atomic_with(&path, |tmp| ckpt.save(tmp))
        .with_context(|| format!("storing the threshold in {}", path.display()))?;
    println!("stored threshold {t:.4} in {}", path.display());
    Ok(())
}

fn protocol_json(k: &KFoldReport) -> Value {
    json!({
        "mean": k.mean,
        "std": k.std,
        "folds": k.folds.iter().map(|f| f.accuracy).collect::<Vec<_>>(),
        "thresholds": k.folds.iter().map(|f| f.threshold).collect::<Vec<_>>(),
        "thresholds_cosine": k.folds.iter().map(|f| f.threshold_cosine).collect::<Vec<_>>(),
        "mean_threshold_cosine": k.mean_threshold_cosine,
    })
}

fn report_json(
    model: &str,
    r: &Report,
    flip: bool,
    images: usize,
    seconds: f64,
    faces_per_second: f64,
) -> Value {
    let tar: serde_json::Map<String, Value> = r
        .tar_at_far
        .iter()
        .map(|t| (format!("{}", t.far), json!(t.tar)))
        .collect();
    json!({
        "model": model,
        "pairs": r.pairs,
        "folds": r.folds,
        "positives": r.positives,
        "negatives": r.negatives,
        "flip": flip,
        "accuracy": {
            "insightface": protocol_json(&r.insightface),
            "exact": protocol_json(&r.exact),
        },
        "auc": r.auc,
        "eer": r.eer,
        "eer_threshold": r.eer_threshold,
        "tar_at_far": tar,
        "tar_at_far_detail": r.tar_at_far,
        "warnings": r.warnings(),
        "images": images,
        "seconds": seconds,
        "faces_per_second": faces_per_second,
    })
}

fn print_table(
    model: &str,
    r: &Report,
    images: usize,
    flip: bool,
    seconds: f64,
    faces_per_second: f64,
) {
    println!("model      {model}");
    println!(
        "pairs      {} in {} folds ({} same, {} different), {} images, flip test {}",
        r.pairs,
        r.folds,
        r.positives,
        r.negatives,
        images,
        if flip { "on" } else { "off" }
    );
    println!();
    println!("protocol       accuracy     std   threshold (cosine)");
    for (name, k) in [("insightface", &r.insightface), ("exact", &r.exact)] {
        println!(
            "{name:<12} {:>9.3}% {:>6.3}%   {:.4}",
            k.mean * 100.0,
            k.std * 100.0,
            k.mean_threshold_cosine
        );
    }
    println!();
    println!(
        "AUC {:.5}   EER {:.3}% (cosine {:.4})",
        r.auc,
        r.eer * 100.0,
        r.eer_threshold
    );
    for t in &r.tar_at_far {
        let floor = if (t.far * t.negatives as f64) < 1.0 {
            " (fewer negatives than 1/FAR: no false accept allowed)"
        } else {
            ""
        };
        println!(
            "TAR@FAR={:<6} {:>8.3}%   at cosine {:.4}: {} of {} different-person pairs accepted, \
             {} of {} same-person pairs{floor}",
            t.far,
            t.tar * 100.0,
            t.threshold,
            t.false_accepts,
            t.negatives,
            (t.tar * r.positives as f64).round() as usize,
            r.positives,
        );
    }
    println!();
    println!("wall {seconds:.1} s, {faces_per_second:.1} faces/s");
}

fn print_sets_table(model: &str, sets: &[Scored], flip: bool) {
    println!("model  {model}");
    println!("flip test {}", if flip { "on" } else { "off" });
    println!();
    println!(
        "{:<12} {:>6}  {:>16}  {:>16}  {:>8}  {:>7}  {:>14}",
        "set", "pairs", "insightface %", "exact %", "AUC", "EER %", "TAR@FAR=1e-3 %"
    );
    for s in sets {
        let r = &s.report;
        let tar = r
            .tar_at_far
            .iter()
            .find(|t| t.far == TABLE_FAR)
            .map_or(f64::NAN, |t| t.tar * 100.0);
        println!(
            "{:<12} {:>6}  {:>8.3} ± {:<5.3}  {:>8.3} ± {:<5.3}  {:>8.5}  {:>7.3}  {:>14.3}",
            s.name,
            r.pairs,
            r.insightface.mean * 100.0,
            r.insightface.std * 100.0,
            r.exact.mean * 100.0,
            r.exact.std * 100.0,
            r.auc,
            r.eer * 100.0,
            tar
        );
    }
    let images: usize = sets.iter().map(|s| s.images).sum();
    let seconds: f64 = sets.iter().map(|s| s.seconds).sum();
    println!();
    println!(
        "wall {seconds:.1} s, {:.1} faces/s over {images} images",
        images as f64 / seconds
    );
}
