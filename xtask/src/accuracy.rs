//! `cargo xtask accuracy`: the accuracy gate.
//!
//! Every entry of the expectation file (`xtask/accuracy.json`) names a model, a data set,
//! the flip test on or off, a protocol, the accuracy expected and a tolerance. Each
//! (model, data set, flip) is embedded once, however many protocols its entries check, and
//! the command exits non-zero naming every entry whose accuracy left its tolerance, in
//! either direction: a gain nobody recorded is as suspicious as a loss, and recording it
//! keeps the file true.
//!
//! A model is a path under the assets folder or a registry name (`mfn-hub`), which the
//! hub resolves (assets folder, cache, download) and converts once; a data set is a pair
//! protocol with its images, an insightface `.bin` under the assets folder, or a registry
//! verification set.
//!
//! An entry may also name a `reference`, a number inside a JSON file of the assets folder
//! (such as ONNX Runtime's figures in `golden/lfw-y1-reference.json`): the committed
//! expectation must then agree with it, so the file cannot drift from the reference.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use mfn_eval::{PairScores, Protocol};
use mfn_hub::pretrained::THRESHOLD_KEY;
use mfn_hub::Hub;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::eval::{self, DataSet};

/// How far a committed expectation may be from its reference number. References are
/// rounded to 5 decimals; anything beyond that is a stale expectation.
const REFERENCE_SLACK: f64 = 5e-6;

/// Arguments of `cargo xtask accuracy`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The expectation file [default: xtask/accuracy.json in the workspace].
    #[arg(long)]
    file: Option<PathBuf>,
    /// Run only the entries with this name, or whose name starts with `NAME/`
    /// (repeatable).
    #[arg(long, value_name = "NAME")]
    only: Vec<String>,
    /// Run only the entries marked quick (seconds, not minutes).
    #[arg(long)]
    quick: bool,
    /// Evaluate this model instead of each entry's own (a native `.safetensors`, an MXNet
    /// `*-symbol.json` or an `.onnx` model), against the entries' expectations.
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// The assets folder that entries' paths are relative to, and where registry models
    /// and sets are looked for first [default: $MFN_ASSETS].
    #[arg(long, value_name = "DIR")]
    assets: Option<PathBuf>,
    /// Only the entries without the flip test.
    #[arg(long, conflicts_with = "flip_only")]
    no_flip: bool,
    /// Only the entries with the flip test.
    #[arg(long)]
    flip_only: bool,
    /// Write every entry's result as JSON into this folder (`accuracy.json`).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Threads for the network [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// List the selected entries and exit.
    #[arg(long)]
    list: bool,
}

/// The expectation file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expectations {
    /// Free text for readers of the file.
    #[serde(default, rename = "_about")]
    _about: Option<Value>,
    entries: Vec<Entry>,
}

/// One expected accuracy.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    model: ModelRef,
    data: DataRef,
    flip: bool,
    protocol: EntryProtocol,
    /// For the `threshold` protocol: the cosine threshold [default: the model's
    /// `mfn.threshold` metadata].
    #[serde(default)]
    threshold: Option<f64>,
    /// Mean accuracy as a fraction.
    expected: f64,
    /// Allowed distance from `expected`, as a fraction.
    tolerance: f64,
    #[serde(default)]
    reference: Option<Reference>,
    /// Fast enough for `--quick`.
    #[serde(default)]
    quick: bool,
    /// Run the CPU engine in int8, calibrated on these faces (after any int8 half the
    /// model file has is dropped, so that the entry always measures this calibration).
    #[serde(default)]
    int8: Option<Int8Calibration>,
    /// Free text for readers of the file.
    #[serde(default, rename = "note")]
    _note: Option<String>,
}

/// The faces an int8 entry calibrates on.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
struct Int8Calibration {
    /// A folder of aligned faces, relative to the assets folder.
    calib: PathBuf,
    /// How many of its faces (see `mfn_data::calibration`).
    images: usize,
}

/// A model: a path relative to the assets folder, or a registry model (`{"registry":
/// NAME}`), converted by the hub on first use.
#[derive(Debug, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
enum ModelRef {
    Asset(PathBuf),
    Registry { registry: String },
}

/// A data set: paths relative to the assets folder, or a registry verification set
/// (`{"set": NAME}`, insightface's `.bin` format in 10 folds).
#[derive(Debug, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
enum DataRef {
    Set {
        set: String,
    },
    Bin {
        bin: PathBuf,
        #[serde(default = "ten")]
        folds: usize,
    },
    Pairs {
        pairs: PathBuf,
        images: PathBuf,
        #[serde(default = "jpg")]
        ext: String,
    },
}

fn ten() -> usize {
    10
}

fn jpg() -> String {
    "jpg".into()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
enum EntryProtocol {
    /// insightface's 10-fold protocol (distance grid).
    Insightface,
    /// 10-fold with the exact best threshold.
    Exact,
    /// One fixed cosine threshold over all pairs.
    Threshold,
}

/// A number in a JSON file of the assets folder, by JSON pointer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Reference {
    file: PathBuf,
    pointer: String,
}

/// An entry with its paths resolved.
struct Job<'a> {
    entry: &'a Entry,
    model: PathBuf,
    data: DataSet,
    expected: f64,
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    if let Some(n) = args.threads {
        mfn_model::set_num_threads(n);
    }
    let file = args
        .file
        .clone()
        .unwrap_or_else(|| crate::workspace_root().join("xtask/accuracy.json"));
    let expectations: Expectations = crate::read_json(&file)?;
    validate(&expectations, &file)?;
    let selected = select(&expectations.entries, &args, &file)?;
    if args.list {
        for e in &selected {
            println!("{}{}", e.name, if e.quick { "  (quick)" } else { "" });
        }
        return Ok(());
    }

    let mut sources = Sources {
        assets: crate::assets(args.assets.as_deref()).map_err(|e| format!("{e:#}")),
        hub: None,
    };
    let jobs = selected
        .iter()
        .map(|e| resolve(e, &args, &mut sources, &file))
        .collect::<Result<Vec<_>>>()?;

    type Key = (PathBuf, DataSet, bool, Option<Int8Calibration>);
    let mut scores: HashMap<Key, PairScores> = HashMap::new();
    let mut thresholds: HashMap<PathBuf, Option<f64>> = HashMap::new();
    let mut failures = Vec::new();
    let mut rows = Vec::new();
    println!(
        "{:<40} {:>9}  {:>9}  {:>7}",
        "entry", "accuracy", "expected", "± tol"
    );
    for job in &jobs {
        let e = job.entry;
        let key = (job.model.clone(), job.data.clone(), e.flip, e.int8.clone());
        if !scores.contains_key(&key) {
            let (ckpt, model) = eval::load_model(&job.model)?;
            let model = match &e.int8 {
                None => model,
                Some(c) => {
                    let dir = crate::assets(args.assets.as_deref())?.join(&c.calib);
                    mfn_data::calibration::quantize(
                        &model,
                        &dir,
                        c.images,
                        mfn_model::quant::QuantizeOptions::default(),
                        |_, _| {},
                    )
                    .with_context(|| {
                        format!("entry `{}`: calibrating on {}", e.name, dir.display())
                    })?
                    .0
                }
            };
            let stored = ckpt
                .metadata
                .get(THRESHOLD_KEY)
                .and_then(|t| t.parse::<f64>().ok());
            thresholds.insert(job.model.clone(), stored);
            let s = eval::score(&model, &job.data, e.flip).with_context(|| {
                format!(
                    "entry `{}`: evaluating {} on {}",
                    e.name,
                    job.model.display(),
                    job.data.path().display()
                )
            })?;
            scores.insert(key.clone(), s);
        }
        let s = &scores[&key];
        let (have, threshold) = match e.protocol {
            EntryProtocol::Insightface => eval::kfold(s, Protocol::Insightface)?,
            EntryProtocol::Exact => eval::kfold(s, Protocol::Exact)?,
            EntryProtocol::Threshold => {
                let t = e
                    .threshold
                    .or(thresholds.get(&job.model).copied().flatten())
                    .with_context(|| {
                        format!(
                            "entry `{}` in {}: the threshold protocol needs a `threshold`, \
                             or a model with `{}` metadata, and {} has none",
                            e.name,
                            file.display(),
                            THRESHOLD_KEY,
                            job.model.display()
                        )
                    })?;
                (eval::at_threshold(s, t), t)
            }
        };
        let diff = have - job.expected;
        let verdict = if diff.abs() <= e.tolerance + 1e-9 {
            "ok"
        } else {
            let moved = if diff < 0.0 { "fell to" } else { "rose to" };
            failures.push(format!(
                "`{}` {moved} {:.3}% (expected {:.3}% ± {:.3}) with {}",
                e.name,
                have * 100.0,
                job.expected * 100.0,
                e.tolerance * 100.0,
                job.model.display()
            ));
            if diff < 0.0 {
                "FELL"
            } else {
                "ROSE"
            }
        };
        println!(
            "{:<40} {:>8.3}%  {:>8.3}%  {:>6.3}   {verdict}",
            e.name,
            have * 100.0,
            job.expected * 100.0,
            e.tolerance * 100.0
        );
        rows.push(json!({
            "name": e.name,
            "model": job.model,
            "data": job.data.path(),
            "flip": e.flip,
            "precision": if e.int8.is_some() { "int8" } else { "f32" },
            "protocol": e.protocol,
            "accuracy": have,
            "threshold_cosine": threshold,
            "expected": job.expected,
            "tolerance": e.tolerance,
            "ok": verdict == "ok",
        }));
    }
    if let Some(dir) = &args.out {
        crate::write_json(&dir.join("accuracy.json"), &rows)?;
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} entries left their tolerance:\n  {}",
            failures.len(),
            jobs.len(),
            failures.join("\n  ")
        );
    }
    println!("all {} entries within tolerance", jobs.len());
    Ok(())
}

fn validate(x: &Expectations, file: &Path) -> Result<()> {
    if x.entries.is_empty() {
        bail!("{} has no entries", file.display());
    }
    let mut seen = std::collections::HashSet::new();
    for e in &x.entries {
        let bad =
            |what: String| anyhow::anyhow!("entry `{}` in {}: {what}", e.name, file.display());
        if e.name.is_empty() {
            bail!("{}: an entry has an empty name", file.display());
        }
        if !seen.insert(e.name.as_str()) {
            return Err(bad("the name is used twice".into()));
        }
        if !(0.0..=1.0).contains(&e.expected) {
            return Err(bad(format!(
                "`expected` is {}, not a fraction in 0..1",
                e.expected
            )));
        }
        if !(0.0..=1.0).contains(&e.tolerance) {
            return Err(bad(format!(
                "`tolerance` is {}, not a fraction in 0..1",
                e.tolerance
            )));
        }
        if e.threshold.is_some() && e.protocol != EntryProtocol::Threshold {
            return Err(bad(
                "`threshold` only applies to the `threshold` protocol".into()
            ));
        }
        if let Some(t) = e.threshold {
            if !t.is_finite() {
                return Err(bad(format!("`threshold` {t} is not a number")));
            }
        }
    }
    Ok(())
}

fn select<'a>(entries: &'a [Entry], args: &Args, file: &Path) -> Result<Vec<&'a Entry>> {
    for name in &args.only {
        if !entries.iter().any(|e| matches(&e.name, name)) {
            bail!(
                "--only {name}: no entry of {} has that name or starts with `{name}/`; \
                 `cargo xtask accuracy --list` lists them",
                file.display()
            );
        }
    }
    let selected: Vec<&Entry> = entries
        .iter()
        .filter(|e| args.only.is_empty() || args.only.iter().any(|n| matches(&e.name, n)))
        .filter(|e| !args.quick || e.quick)
        .filter(|e| {
            if e.flip {
                !args.no_flip
            } else {
                !args.flip_only
            }
        })
        .collect();
    if selected.is_empty() {
        bail!("no entry of {} matches the filters", file.display());
    }
    Ok(selected)
}

fn matches(name: &str, pattern: &str) -> bool {
    let pattern = pattern.trim_end_matches('/');
    name == pattern
        || name
            .strip_prefix(pattern)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Where entries' files come from: the assets folder (or why there is none) and, made on
/// first need, the registry's hub, which looks in the same assets folder first.
struct Sources {
    assets: std::result::Result<PathBuf, String>,
    hub: Option<Hub>,
}

impl Sources {
    fn assets(&self) -> Result<&Path> {
        self.assets.as_deref().map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Why the hub cannot look in an assets folder, for errors: empty when it can.
    fn no_assets(&self) -> String {
        match &self.assets {
            Ok(_) => String::new(),
            Err(why) => format!(" (no assets folder to take it from: {why})"),
        }
    }

    fn hub(&mut self) -> Result<&Hub> {
        if self.hub.is_none() {
            let mut hub = Hub::from_env().context("reading the registry of pinned sources")?;
            if let Ok(a) = &self.assets {
                hub.resolver.assets = Some(a.clone());
                hub.resolver.assets_note = None;
            }
            self.hub = Some(hub);
        }
        Ok(self.hub.as_ref().expect("set above"))
    }
}

fn resolve<'a>(e: &'a Entry, args: &Args, sources: &mut Sources, file: &Path) -> Result<Job<'a>> {
    let in_entry = |what: &str| format!("entry `{}` in {}: {what}", e.name, file.display());
    // The reference first: a stale expectation is refused before any model is fetched.
    let expected = match &e.reference {
        None => e.expected,
        Some(r) => {
            let path = sources
                .assets()
                .with_context(|| in_entry("its reference"))?
                .join(&r.file);
            let doc: Value = crate::read_json(&path).with_context(|| in_entry("its reference"))?;
            let want = doc
                .pointer(&r.pointer)
                .and_then(Value::as_f64)
                .with_context(|| {
                    in_entry(&format!(
                        "{} has no number at {}",
                        path.display(),
                        r.pointer
                    ))
                })?;
            if (want - e.expected).abs() > REFERENCE_SLACK {
                bail!(
                    "{}",
                    in_entry(&format!(
                        "expects {} but its reference {} says {want} at {}",
                        e.expected,
                        path.display(),
                        r.pointer
                    ))
                );
            }
            want
        }
    };
    let model = match (&args.model, &e.model) {
        (Some(p), _) => p.clone(),
        (None, ModelRef::Asset(p)) => sources
            .assets()
            .with_context(|| in_entry("its model"))?
            .join(p),
        (None, ModelRef::Registry { registry }) => {
            let whence = format!("the registry model `{registry}`{}", sources.no_assets());
            sources
                .hub()?
                .model(registry)
                .with_context(|| in_entry(&whence))?
                .native
        }
    };
    if !model.exists() {
        bail!(
            "{}",
            in_entry(&format!("the model {} does not exist", model.display()))
        );
    }
    let data = match &e.data {
        DataRef::Set { set } => DataSet::Bin {
            path: {
                let whence = format!("the registry set `{set}`{}", sources.no_assets());
                sources
                    .hub()?
                    .set(set)
                    .with_context(|| in_entry(&whence))?
                    .path
            },
            folds: 10,
        },
        DataRef::Bin { bin, folds } => DataSet::Bin {
            path: sources
                .assets()
                .with_context(|| in_entry("its data"))?
                .join(bin),
            folds: *folds,
        },
        DataRef::Pairs { pairs, images, ext } => {
            let assets = sources.assets().with_context(|| in_entry("its data"))?;
            DataSet::Pairs {
                pairs: assets.join(pairs),
                images: assets.join(images),
                ext: ext.clone(),
            }
        }
    };
    let needed: Vec<&Path> = match &data {
        DataSet::Bin { path, .. } => vec![path],
        DataSet::Pairs { pairs, images, .. } => vec![pairs, images],
    };
    for p in needed {
        if !p.exists() {
            bail!(
                "{}",
                in_entry(&format!("the data {} does not exist", p.display()))
            );
        }
    }
    Ok(Job {
        entry: e,
        model,
        data,
        expected,
    })
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn only_matches_whole_name_or_path_prefix() {
        assert!(matches("y1/lfw/flip/exact", "y1/lfw/flip/exact"));
        assert!(matches("y1/lfw/flip/exact", "y1/lfw"));
        assert!(matches("y1/lfw/flip/exact", "y1/lfw/"));
        assert!(!matches("y1/lfw-fold1-bin/flip/exact", "y1/lfw"));
        assert!(!matches("y1/lfw", "y1/lfw/flip"));
    }
}
