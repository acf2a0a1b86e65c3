//! `mfn-cli train`: trains a MobileFaceNet with a margin loss, or fine-tunes one.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use mfn_data::{Dataset, ImageFolder, RecordDataset};
use mfn_loss::CombinedMargin;
use mfn_model::{Checkpoint, Config};
use mfn_train::atomic::{check_writable, folder};
use mfn_train::{
    Budget, DataSettings, Decay, EvalSet, Event, LrSchedule, OptimizerKind, SavedRun, TrainConfig,
    Trainer, WeightDecay,
};

use super::{args, asset_or, open_device, DeviceKind};

/// Without a terminal (output piped to a file), a progress line at least this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Most centres per class: the head holds classes x centres x embedding values.
const MAX_SUB_CENTERS: usize = 64;

/// The folder a run writes when neither --out nor --resume names one.
const DEFAULT_OUT: &str = "runs/train";

/// The margin of the loss.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum MarginKind {
    /// cos(θ + m2), the default (m2 = 0.5).
    Arcface,
    /// cos θ - m3 (m3 = 0.35).
    Cosface,
    /// cos(m1 θ) (m1 = 1.35, insightface's SphereFace setting).
    Sphereface,
    /// cos(m1 θ + m2) - m3 with all three given.
    Combined,
    /// Plain normalised softmax.
    Softmax,
}

/// How the learning rate decays after the warm-up.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ScheduleKind {
    /// Constant.
    Constant,
    /// Times --gamma at each of --milestones.
    Step,
    /// (1 - t)^2.
    Poly,
    /// Half a cosine down to 0.
    Cosine,
}

/// The update rule.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum OptimizerChoice {
    /// SGD with momentum (--momentum).
    Sgd,
    /// AdamW (betas 0.9, 0.999).
    Adamw,
}

/// Arguments of `mfn-cli train`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Training images: a folder with one sub-folder of aligned faces per identity, or an
    /// MXNet `.rec` file (its `.idx` beside it) [default, on a resume: the run's].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Keep only identities with at least this many images [default, on a resume: the
    /// run's].
    #[arg(long, default_value_t = 1, allow_negative_numbers = true, value_parser = args::count(1, usize::MAX))]
    min_images: usize,
    /// Hold out this many identities (spread over the sorted list) from training and score
    /// all pairs among their images during training [default, on a resume: the run's].
    #[arg(long, allow_negative_numbers = true, value_parser = args::count(1, usize::MAX))]
    hold_out: Option<usize>,
    /// Where checkpoints (`last.safetensors`) and `metrics.jsonl` go [default: the folder
    /// of the --resume checkpoint, else runs/train].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Replace the run that --out holds (its checkpoint and metrics) with a new one.
    #[arg(long)]
    overwrite: bool,
    /// Continue a run from its checkpoint, with the run's settings and data; --steps or
    /// --epochs set a new total, --eval-every and --save-every new intervals.
    #[arg(long, conflicts_with = "init")]
    resume: Option<PathBuf>,
    /// Start from this model (any format `--model` takes elsewhere) instead of random
    /// weights: fine-tuning. Its config is used.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Network preset for training from scratch.
    #[arg(long, default_value = "paper")]
    preset: String,
    /// Width multiplier for training from scratch, in (0, 4].
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true, value_parser = args::width)]
    width: f64,
    /// Steps to train (the whole run's, on a resume too); --epochs is an alternative.
    #[arg(long, conflicts_with = "epochs", allow_negative_numbers = true, value_parser = args::count(1, usize::MAX))]
    steps: Option<usize>,
    /// Epochs to train.
    #[arg(long, allow_negative_numbers = true, value_parser = args::epochs)]
    epochs: Option<f64>,
    /// Stop after this many minutes (checkpoint and evaluation still happen).
    #[arg(long, allow_negative_numbers = true, value_parser = args::minutes)]
    minutes: Option<f64>,
    /// Images per step, 2..=1024 (BatchNorm needs two).
    #[arg(long, default_value_t = 64, allow_negative_numbers = true, value_parser = args::count(2, args::MAX_BATCH))]
    batch: usize,
    /// Learning rate after the warm-up.
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true, value_parser = args::positive)]
    lr: f64,
    /// Steps of linear warm-up.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    warmup: usize,
    /// Decay after the warm-up.
    #[arg(long, value_enum, default_value_t = ScheduleKind::Cosine)]
    schedule: ScheduleKind,
    /// Milestone steps of `--schedule step`, comma-separated.
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true, value_parser = args::count(1, usize::MAX))]
    milestones: Vec<usize>,
    /// Factor of each `--schedule step` drop.
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true, value_parser = args::positive)]
    gamma: f64,
    /// Update rule.
    #[arg(long, value_enum, default_value_t = OptimizerChoice::Sgd)]
    optimizer: OptimizerChoice,
    /// SGD momentum, in [0, 1).
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true, value_parser = args::momentum)]
    momentum: f64,
    /// Weight decay of the body's weights.
    #[arg(long, default_value_t = 4e-5, allow_negative_numbers = true, value_parser = args::non_negative)]
    wd: f64,
    /// Weight decay of the layers after the global depthwise conv and the class centres.
    #[arg(long, default_value_t = 4e-4, allow_negative_numbers = true, value_parser = args::non_negative)]
    wd_head: f64,
    /// Margin of the loss.
    #[arg(long, value_enum, default_value_t = MarginKind::Arcface)]
    margin: MarginKind,
    /// Scale s of the logits.
    #[arg(long, default_value_t = 64.0, allow_negative_numbers = true, value_parser = args::positive)]
    scale: f64,
    /// m1 (multiplicative angular) of `--margin combined` or `sphereface`.
    #[arg(long, allow_negative_numbers = true, value_parser = args::positive)]
    m1: Option<f64>,
    /// m2 (additive angular) of `--margin arcface` or `combined`.
    #[arg(long, allow_negative_numbers = true, value_parser = args::non_negative)]
    m2: Option<f64>,
    /// m3 (additive cosine) of `--margin cosface` or `combined`.
    #[arg(long, allow_negative_numbers = true, value_parser = args::finite)]
    m3: Option<f64>,
    /// Centres per class (sub-center ArcFace), 1..=64.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true, value_parser = args::count(1, MAX_SUB_CENTERS))]
    sub_centers: usize,
    /// Seed of the initial weights, shuffles and flips.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    seed: u64,
    /// Do not mirror training images at random.
    #[arg(long)]
    no_flip: bool,
    /// Verification sets (insightface `.bin`) to score during training [default, on a
    /// resume: the run's].
    #[arg(long = "eval-bin")]
    eval_bin: Vec<PathBuf>,
    /// An LFW-style pairs file to score during training (with --eval-images) [default, on
    /// a resume: the run's].
    #[arg(long, requires = "eval_images")]
    eval_pairs: Option<PathBuf>,
    /// The aligned images --eval-pairs names.
    #[arg(long)]
    eval_images: Option<PathBuf>,
    /// Evaluate every this many steps (0: at the end only).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    eval_every: usize,
    /// Checkpoint every this many steps (0: at the end only).
    #[arg(long, default_value_t = 500, allow_negative_numbers = true)]
    save_every: usize,
    /// Device to train on.
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    device: DeviceKind,
}

/// The options the command line gave (clap ids), as opposed to defaults.
struct Given<'a>(&'a [String]);

impl Given<'_> {
    fn has(&self, id: &str) -> bool {
        self.0.iter().any(|g| g == id)
    }

    fn any(&self, ids: &[&str]) -> bool {
        ids.iter().any(|id| self.has(id))
    }
}

fn margin(args: &Args, s: f64) -> CombinedMargin {
    match args.margin {
        MarginKind::Arcface => CombinedMargin::arcface(s, args.m2.unwrap_or(0.5)),
        MarginKind::Cosface => CombinedMargin::cosface(s, args.m3.unwrap_or(0.35)),
        MarginKind::Sphereface => CombinedMargin::sphereface(s, args.m1.unwrap_or(1.35)),
        MarginKind::Combined => CombinedMargin::combined(
            s,
            args.m1.unwrap_or(1.0),
            args.m2.unwrap_or(0.3),
            args.m3.unwrap_or(0.2),
        ),
        MarginKind::Softmax => CombinedMargin::softmax(s),
    }
}

fn model_config(args: &Args) -> Result<Config> {
    let base = Config::preset(&args.preset).with_context(|| {
        format!(
            "unknown preset `{}`; known: {}",
            args.preset,
            Config::PRESETS.join(", ")
        )
    })?;
    Ok(if args.width == 1.0 {
        base
    } else {
        base.with_width(args.width)
    })
}

fn decay(args: &Args) -> Decay {
    match args.schedule {
        ScheduleKind::Constant => Decay::Constant,
        ScheduleKind::Step => Decay::Step {
            milestones: args.milestones.clone(),
            gamma: args.gamma,
        },
        ScheduleKind::Poly => Decay::Poly { power: 2.0 },
        ScheduleKind::Cosine => Decay::Cosine { min_lr: 0.0 },
    }
}

fn optimizer(args: &Args) -> OptimizerKind {
    match args.optimizer {
        OptimizerChoice::Sgd => OptimizerKind::Sgd {
            momentum: args.momentum,
        },
        OptimizerChoice::Adamw => OptimizerKind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
    }
}

/// `v` as a checkpoint's settings hold it (through JSON), for comparing with them.
fn as_saved<T: serde::Serialize + serde::de::DeserializeOwned>(v: &T) -> Result<T> {
    Ok(serde_json::from_str(&serde_json::to_string(v)?)?)
}

/// A resume continues the run with its own settings: a flag that asks for another value
/// is refused rather than ignored.
fn check_resume_flags(args: &Args, given: &Given, run: &TrainConfig, path: &Path) -> Result<()> {
    let mut wrong = Vec::new();
    let mut check = |ids: &[&str], same: bool, asked: String, theirs: String| {
        if given.any(ids) && !same {
            let flags: Vec<String> = ids
                .iter()
                .filter(|id| given.has(id))
                .map(|id| format!("--{}", id.replace('_', "-")))
                .collect();
            wrong.push(format!(
                "{} asks for {asked}, the run has {theirs}",
                flags.join("/")
            ));
        }
    };
    if given.any(&["preset", "width"]) {
        let m = as_saved(&model_config(args)?)?;
        check(
            &["preset", "width"],
            m == run.model,
            format!("`{}`", m.name),
            format!("`{}`", run.model.name),
        );
    }
    let c = run;
    check(
        &["batch"],
        args.batch == c.batch_size,
        args.batch.to_string(),
        c.batch_size.to_string(),
    );
    check(
        &["lr"],
        as_saved(&args.lr)? == c.schedule.base_lr,
        args.lr.to_string(),
        c.schedule.base_lr.to_string(),
    );
    check(
        &["warmup"],
        args.warmup == c.schedule.warmup_steps,
        args.warmup.to_string(),
        c.schedule.warmup_steps.to_string(),
    );
    let d = as_saved(&decay(args))?;
    check(
        &["schedule", "milestones", "gamma"],
        d == c.schedule.decay,
        format!("{d:?}"),
        format!("{:?}", c.schedule.decay),
    );
    let o = as_saved(&optimizer(args))?;
    check(
        &["optimizer", "momentum"],
        o == c.optimizer,
        format!("{o:?}"),
        format!("{:?}", c.optimizer),
    );
    let wd = as_saved(&WeightDecay {
        body: args.wd,
        head: args.wd_head,
    })?;
    check(
        &["wd", "wd_head"],
        wd == c.weight_decay,
        format!("{wd:?}"),
        format!("{:?}", c.weight_decay),
    );
    check(
        &["scale"],
        as_saved(&args.scale)? == c.margin.s,
        args.scale.to_string(),
        c.margin.s.to_string(),
    );
    let m = as_saved(&margin(args, c.margin.s))?;
    let show = |m: &CombinedMargin| format!("m1 {} m2 {} m3 {}", m.m1, m.m2, m.m3);
    check(
        &["margin", "m1", "m2", "m3"],
        m == c.margin,
        show(&m),
        show(&c.margin),
    );
    check(
        &["sub_centers"],
        args.sub_centers == c.sub_centers,
        args.sub_centers.to_string(),
        c.sub_centers.to_string(),
    );
    check(
        &["seed"],
        args.seed == c.seed,
        args.seed.to_string(),
        c.seed.to_string(),
    );
    check(
        &["no_flip"],
        args.no_flip != c.flip,
        "no flips".into(),
        "flips".into(),
    );
    if !wrong.is_empty() {
        bail!(
            "--resume {} continues a run with its own settings, and {}; start a new run \
             (another --out, or --overwrite) to change them",
            path.display(),
            wrong.join("; ")
        );
    }
    Ok(())
}

/// An absolute form of `p`, as a checkpoint records it (a resume may run elsewhere).
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The data settings of this run: the command line's, else (on a resume) the run's, else
/// the defaults.
fn data_settings(args: &Args, given: &Given, saved: Option<&DataSettings>) -> Result<DataSettings> {
    let saved = saved.filter(|s| s.path.is_some());
    let own = |id: &str| given.has(id) || saved.is_none();
    let path = match saved.and_then(|s| s.path.clone()) {
        Some(p) if !given.has("data") => p,
        _ => absolute(&asset_or(
            args.data.clone(),
            "lfw/aligned-112x112",
            "--data",
        )?),
    };
    let s = saved.cloned().unwrap_or_default();
    let (eval_pairs, eval_images) = if own("eval_pairs") || own("eval_images") {
        (
            args.eval_pairs.as_deref().map(absolute),
            args.eval_images.as_deref().map(absolute),
        )
    } else {
        (s.eval_pairs.clone(), s.eval_images.clone())
    };
    Ok(DataSettings {
        path: Some(path),
        min_images: if own("min_images") {
            args.min_images
        } else {
            s.min_images
        },
        hold_out: if own("hold_out") {
            args.hold_out
        } else {
            s.hold_out
        },
        eval_bins: if own("eval_bin") {
            args.eval_bin.iter().map(|p| absolute(p)).collect()
        } else {
            s.eval_bins.clone()
        },
        eval_pairs,
        eval_images,
    })
}

/// The training images and, when identities are held out, their all-pairs set.
fn data(d: &DataSettings) -> Result<(Arc<dyn Dataset + Send + Sync>, Option<EvalSet>)> {
    let path = d.path.clone().unwrap_or_default();
    if path.extension().is_some_and(|e| e == "rec") {
        if d.hold_out.is_some() || d.min_images > 1 {
            bail!(
                "--hold-out and --min-images work on image folders, not on {}",
                path.display()
            );
        }
        let set = RecordDataset::open(&path, None)
            .with_context(|| format!("opening {}", path.display()))?;
        return Ok((Arc::new(set), None));
    }
    let folder = ImageFolder::open(&path)
        .with_context(|| format!("listing {}", path.display()))?
        .with_min_images(d.min_images)
        .with_context(|| {
            format!(
                "keeping identities of {} with >= {} images",
                path.display(),
                d.min_images
            )
        })?;
    match d.hold_out {
        Some(n) => {
            let (train, held) = folder.hold_out(n)?;
            tracing::info!(
                train = train.classes().len(),
                held_out = held.classes().len(),
                "identities"
            );
            let eval = EvalSet::all_pairs(&held)?;
            Ok((Arc::new(train), Some(eval)))
        }
        None => Ok((Arc::new(folder), None)),
    }
}

/// Where the run writes: refuses a folder that holds another run unless told to replace
/// it, and checks that it takes files before any work.
fn prepare_out(args: &Args) -> Result<PathBuf> {
    let out = match (&args.out, &args.resume) {
        (Some(o), _) => o.clone(),
        (None, Some(r)) => folder(r),
        (None, None) => PathBuf::from(DEFAULT_OUT),
    };
    if out.exists() && !out.is_dir() {
        bail!("--out {}: not a folder", out.display());
    }
    let same = |a: &Path, b: &Path| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    let its_own = args
        .resume
        .as_deref()
        .is_some_and(|r| same(&folder(r), &out));
    let holds: Vec<&str> = ["last.safetensors", "metrics.jsonl"]
        .into_iter()
        .filter(|f| out.join(f).exists())
        .collect();
    if !holds.is_empty() && !its_own && !args.overwrite {
        bail!(
            "--out {} holds a run already ({}): continue it with --resume {}, replace it with \
             --overwrite, or choose another --out",
            out.display(),
            holds.join(", "),
            out.join("last.safetensors").display()
        );
    }
    // The folder is made when training starts; what exists of it must take files now.
    let existing = out
        .ancestors()
        .find(|a| a.as_os_str().is_empty() || a.exists())
        .map(|a| {
            if a.as_os_str().is_empty() {
                Path::new(".")
            } else {
                a
            }
        })
        .unwrap_or(Path::new("."));
    if !existing.is_dir() {
        bail!(
            "--out {}: {} is not a folder",
            out.display(),
            existing.display()
        );
    }
    check_writable(existing).with_context(|| {
        format!(
            "--out {}: cannot create files in {}",
            out.display(),
            existing.display()
        )
    })?;
    Ok(out)
}

/// Runs the command; `given` lists the options the command line gave (clap ids).
pub fn run(args: Args, given: &[String]) -> Result<()> {
    let given = Given(given);
    let device = open_device(args.device)?;
    let saved = match &args.resume {
        Some(path) => {
            let run = Trainer::saved_settings(path)
                .with_context(|| format!("resuming from {}", path.display()))?;
            check_resume_flags(&args, &given, &run.config, path)?;
            Some(run)
        }
        None => None,
    };
    let out = prepare_out(&args)?;
    let saved_data = saved.as_ref().and_then(|s| s.data.as_ref());
    let settings = data_settings(&args, &given, saved_data)?;
    if let Some(d) = saved_data {
        if settings == *d {
            eprintln!(
                "data as the run had it: {}, --min-images {}{}",
                d.path.as_deref().unwrap_or(Path::new("?")).display(),
                d.min_images,
                d.hold_out
                    .map(|k| format!(", --hold-out {k}"))
                    .unwrap_or_default()
            );
        }
    }
    let (train_set, held_out) = data(&settings)?;
    if let Some(SavedRun { config: c, .. }) = &saved {
        if train_set.num_classes() != c.classes {
            bail!(
                "the data set ({}, --min-images {}, --hold-out {}) has {} classes, the run in {} \
                 has {}: resume with the run's --data, --min-images and --hold-out",
                settings.path.as_deref().unwrap_or(Path::new("?")).display(),
                settings.min_images,
                settings
                    .hold_out
                    .map_or_else(|| "none".to_string(), |k| k.to_string()),
                train_set.num_classes(),
                args.resume.as_deref().unwrap_or(Path::new("?")).display(),
                c.classes
            );
        }
    }
    let mut eval = Vec::new();
    eval.extend(held_out);
    for bin in &settings.eval_bins {
        eval.push(EvalSet::bin(bin, 10).with_context(|| format!("reading {}", bin.display()))?);
    }
    if let (Some(pairs), Some(images)) = (&settings.eval_pairs, &settings.eval_images) {
        eval.push(
            EvalSet::pairs(pairs, images, "jpg")
                .with_context(|| format!("reading {}", pairs.display()))?,
        );
    }

    let mut trainer = match &args.resume {
        Some(path) => resume(&args, &given, path, &device, &*train_set, settings)?,
        None => {
            let init = args
                .init
                .as_ref()
                .map(|p| {
                    Checkpoint::load(p, None, &device)
                        .with_context(|| format!("loading {}", p.display()))
                })
                .transpose()?;
            let model = match &init {
                Some(c) => c.config.clone(),
                None => model_config(&args)?,
            };
            let per_epoch = (train_set.len() / args.batch.max(1)).max(1);
            let steps = match (args.steps, args.epochs) {
                (Some(s), _) => s,
                (None, Some(e)) => ((e * per_epoch as f64).round() as usize).max(1),
                (None, None) => per_epoch,
            };
            let config = TrainConfig {
                model,
                margin: margin(&args, args.scale),
                sub_centers: args.sub_centers,
                classes: train_set.num_classes(),
                batch_size: args.batch,
                steps,
                seed: args.seed,
                flip: !args.no_flip,
                optimizer: optimizer(&args),
                weight_decay: WeightDecay {
                    body: args.wd,
                    head: args.wd_head,
                },
                schedule: LrSchedule {
                    base_lr: args.lr,
                    warmup_steps: args.warmup,
                    total_steps: steps,
                    decay: decay(&args),
                },
                eval_every: args.eval_every,
                save_every: args.save_every,
            };
            let mut t = Trainer::new(config, init.as_ref(), &device)?;
            t.set_data(Some(settings));
            t
        }
    };
    let c = trainer.config().clone();
    eprintln!(
        "training `{}` ({} parameters) on {} images of {} identities: {} steps of {}, from step {}",
        c.model.name,
        c.model.complexity().params,
        train_set.len(),
        c.classes,
        c.steps,
        c.batch_size,
        trainer.step()
    );
    let bar = ProgressBar::new(c.steps as u64).with_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg}  eta {eta}")?
            .progress_chars("=> "),
    );
    bar.set_position(trainer.step() as u64);
    // Without a terminal the bar draws nothing: the same figures go out as lines.
    let lines = !std::io::stderr().is_terminal() || bar.is_hidden();
    let say = |line: String| {
        if lines {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    };
    let first = trainer.step();
    let mut last_line: Option<Instant> = None;
    let budget = Budget {
        steps: None,
        time: args.minutes.map(|m| Duration::from_secs_f64(m * 60.0)),
    };
    trainer.fit(train_set, &eval, &out, budget, |event| match event {
        Event::Step(m) => {
            let figures = format!(
                "loss {:.3}  acc {:.1}%  lr {:.4}  {:.1} img/s",
                m.loss,
                100.0 * m.accuracy,
                m.lr,
                m.images_per_sec
            );
            let due = m.step == first + 1
                || m.step >= c.steps
                || last_line.is_none_or(|t| t.elapsed() >= LOG_EVERY);
            if lines && due {
                last_line = Some(Instant::now());
                say(format!("step {}/{}: {figures}", m.step, c.steps));
            }
            bar.set_position(m.step as u64);
            bar.set_message(figures);
        }
        Event::Eval { step, results } => {
            for r in results {
                let acc = r
                    .accuracy
                    .map(|a| format!("  accuracy {:.3}%", 100.0 * a))
                    .unwrap_or_default();
                say(format!(
                    "step {step}: {}  AUC {:.5}{acc}  ({} pairs)",
                    r.set, r.auc, r.pairs
                ));
            }
        }
        Event::Saved { step, path } => {
            tracing::info!(step, path = %path.display(), "checkpoint");
            if lines {
                say(format!("step {step}: saved {}", path.display()));
            }
        }
    })?;
    bar.finish();
    eprintln!(
        "step {}: checkpoint {}",
        trainer.step(),
        out.join("last.safetensors").display()
    );
    Ok(())
}

/// The run in `path`, with a new total of steps or new intervals where the command line
/// gives them, and this run's data settings recorded.
fn resume(
    args: &Args,
    given: &Given,
    path: &Path,
    device: &candle_core::Device,
    train_set: &dyn Dataset,
    settings: DataSettings,
) -> Result<Trainer> {
    let mut t = Trainer::resume(path, device)
        .with_context(|| format!("resuming from {}", path.display()))?;
    let (done, steps) = (t.step(), t.config().steps);
    let per_epoch = (train_set.len() / t.config().batch_size.max(1)).max(1);
    let total = match (args.steps, args.epochs) {
        (Some(s), _) => Some(("--steps", s.to_string(), s)),
        (None, Some(e)) => Some((
            "--epochs",
            e.to_string(),
            ((e * per_epoch as f64).round() as usize).max(1),
        )),
        (None, None) => None,
    };
    match total {
        Some((flag, value, n)) if n <= done => bail!(
            "{flag} {value} ({n} steps in all): the run in {} is at step {done} already; give a \
             larger total to extend it",
            path.display()
        ),
        Some((_, _, n)) if n != steps => {
            eprintln!(
                "the run now ends at step {n} (it was to end at {steps}); its learning-rate \
                 schedule spans the new total"
            );
            t.set_steps(n)?;
        }
        Some(_) => {}
        None if done >= steps => bail!(
            "the run in {} has done all its {steps} steps: pass --steps N (more than {done}) \
             or --epochs to extend it",
            path.display()
        ),
        None => {}
    }
    if given.any(&["eval_every", "save_every"]) {
        let c = t.config();
        let eval_every = if given.has("eval_every") {
            args.eval_every
        } else {
            c.eval_every
        };
        let save_every = if given.has("save_every") {
            args.save_every
        } else {
            c.save_every
        };
        t.set_intervals(eval_every, save_every);
    }
    t.set_data(Some(settings));
    Ok(t)
}
