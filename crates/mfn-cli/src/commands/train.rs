//! `mfn-cli train`: trains a MobileFaceNet with a margin loss, or fine-tunes one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use mfn_data::{Dataset, ImageFolder, RecordDataset};
use mfn_loss::CombinedMargin;
use mfn_model::{Checkpoint, Config};
use mfn_train::{
    Budget, Decay, EvalSet, Event, LrSchedule, OptimizerKind, TrainConfig, Trainer, WeightDecay,
};

use super::{asset_or, open_device, DeviceKind};

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
    /// MXNet `.rec` file (its `.idx` beside it).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Keep only identities with at least this many images.
    #[arg(long, default_value_t = 1)]
    min_images: usize,
    /// Hold out this many identities (spread over the sorted list) from training and score
    /// all pairs among their images during training.
    #[arg(long)]
    hold_out: Option<usize>,
    /// Where checkpoints (`last.safetensors`) and `metrics.jsonl` go.
    #[arg(long, default_value = "runs/train")]
    out: PathBuf,
    /// Continue a run from its checkpoint; its saved settings are used.
    #[arg(long, conflicts_with = "init")]
    resume: Option<PathBuf>,
    /// Start from this model (any format `--model` takes elsewhere) instead of random
    /// weights: fine-tuning. Its config is used.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Network preset for training from scratch.
    #[arg(long, default_value = "paper")]
    preset: String,
    /// Width multiplier for training from scratch (0.25 .. 1).
    #[arg(long, default_value_t = 1.0)]
    width: f64,
    /// Steps to train; --epochs is an alternative.
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<usize>,
    /// Epochs to train.
    #[arg(long)]
    epochs: Option<f64>,
    /// Stop after this many minutes (checkpoint and evaluation still happen).
    #[arg(long)]
    minutes: Option<f64>,
    /// Images per step.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Learning rate after the warm-up.
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    /// Steps of linear warm-up.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Decay after the warm-up.
    #[arg(long, value_enum, default_value_t = ScheduleKind::Cosine)]
    schedule: ScheduleKind,
    /// Milestone steps of `--schedule step`, comma-separated.
    #[arg(long, value_delimiter = ',')]
    milestones: Vec<usize>,
    /// Factor of each `--schedule step` drop.
    #[arg(long, default_value_t = 0.1)]
    gamma: f64,
    /// Update rule.
    #[arg(long, value_enum, default_value_t = OptimizerChoice::Sgd)]
    optimizer: OptimizerChoice,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// Weight decay of the body's weights.
    #[arg(long, default_value_t = 4e-5)]
    wd: f64,
    /// Weight decay of the layers after the global depthwise conv and the class centres.
    #[arg(long, default_value_t = 4e-4)]
    wd_head: f64,
    /// Margin of the loss.
    #[arg(long, value_enum, default_value_t = MarginKind::Arcface)]
    margin: MarginKind,
    /// Scale s of the logits.
    #[arg(long, default_value_t = 64.0)]
    scale: f64,
    /// m1 (multiplicative angular) of `--margin combined` or `sphereface`.
    #[arg(long)]
    m1: Option<f64>,
    /// m2 (additive angular) of `--margin arcface` or `combined`.
    #[arg(long)]
    m2: Option<f64>,
    /// m3 (additive cosine) of `--margin cosface` or `combined`.
    #[arg(long)]
    m3: Option<f64>,
    /// Centres per class (sub-center ArcFace).
    #[arg(long, default_value_t = 1)]
    sub_centers: usize,
    /// Seed of the initial weights, shuffles and flips.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Do not mirror training images at random.
    #[arg(long)]
    no_flip: bool,
    /// Verification sets (insightface `.bin`) to score during training.
    #[arg(long = "eval-bin")]
    eval_bin: Vec<PathBuf>,
    /// An LFW-style pairs file to score during training (with --eval-images).
    #[arg(long, requires = "eval_images")]
    eval_pairs: Option<PathBuf>,
    /// The aligned images --eval-pairs names.
    #[arg(long)]
    eval_images: Option<PathBuf>,
    /// Evaluate every this many steps (0: at the end only).
    #[arg(long, default_value_t = 0)]
    eval_every: usize,
    /// Checkpoint every this many steps (0: at the end only).
    #[arg(long, default_value_t = 500)]
    save_every: usize,
    /// Device to train on.
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    device: DeviceKind,
}

fn margin(args: &Args) -> CombinedMargin {
    let s = args.scale;
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

/// The training images and, when identities are held out, their all-pairs set.
fn data(args: &Args) -> Result<(Arc<dyn Dataset + Send + Sync>, Option<EvalSet>)> {
    let path = asset_or(args.data.clone(), "lfw/aligned-112x112", "--data")?;
    if path.extension().is_some_and(|e| e == "rec") {
        if args.hold_out.is_some() || args.min_images > 1 {
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
        .with_min_images(args.min_images)
        .with_context(|| {
            format!(
                "keeping identities of {} with >= {} images",
                path.display(),
                args.min_images
            )
        })?;
    match args.hold_out {
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

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    let device = open_device(args.device)?;
    let (train_set, held_out) = data(&args)?;
    let mut eval = Vec::new();
    eval.extend(held_out);
    for bin in &args.eval_bin {
        eval.push(EvalSet::bin(bin, 10).with_context(|| format!("reading {}", bin.display()))?);
    }
    if let (Some(pairs), Some(images)) = (&args.eval_pairs, &args.eval_images) {
        eval.push(
            EvalSet::pairs(pairs, images, "jpg")
                .with_context(|| format!("reading {}", pairs.display()))?,
        );
    }

    let mut trainer = match &args.resume {
        Some(path) => Trainer::resume(path, &device)
            .with_context(|| format!("resuming from {}", path.display()))?,
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
                None => {
                    let base = Config::preset(&args.preset).with_context(|| {
                        format!(
                            "unknown preset `{}`; known: {}",
                            args.preset,
                            Config::PRESETS.join(", ")
                        )
                    })?;
                    if args.width == 1.0 {
                        base
                    } else {
                        anyhow::ensure!(
                            args.width > 0.0 && args.width <= 4.0,
                            "--width {} is not in (0, 4]",
                            args.width
                        );
                        base.with_width(args.width)
                    }
                }
            };
            let per_epoch = (train_set.len() / args.batch.max(1)).max(1);
            let steps = match (args.steps, args.epochs) {
                (Some(s), _) => s,
                (None, Some(e)) => ((e * per_epoch as f64).round() as usize).max(1),
                (None, None) => per_epoch,
            };
            let config = TrainConfig {
                model,
                margin: margin(&args),
                sub_centers: args.sub_centers,
                classes: train_set.num_classes(),
                batch_size: args.batch,
                steps,
                seed: args.seed,
                flip: !args.no_flip,
                optimizer: match args.optimizer {
                    OptimizerChoice::Sgd => OptimizerKind::Sgd {
                        momentum: args.momentum,
                    },
                    OptimizerChoice::Adamw => OptimizerKind::AdamW {
                        beta1: 0.9,
                        beta2: 0.999,
                        eps: 1e-8,
                    },
                },
                weight_decay: WeightDecay {
                    body: args.wd,
                    head: args.wd_head,
                },
                schedule: LrSchedule {
                    base_lr: args.lr,
                    warmup_steps: args.warmup,
                    total_steps: steps,
                    decay: match args.schedule {
                        ScheduleKind::Constant => Decay::Constant,
                        ScheduleKind::Step => Decay::Step {
                            milestones: args.milestones.clone(),
                            gamma: args.gamma,
                        },
                        ScheduleKind::Poly => Decay::Poly { power: 2.0 },
                        ScheduleKind::Cosine => Decay::Cosine { min_lr: 0.0 },
                    },
                },
                eval_every: args.eval_every,
                save_every: args.save_every,
            };
            Trainer::new(config, init.as_ref(), &device)?
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
    let budget = Budget {
        steps: None,
        time: args.minutes.map(|m| Duration::from_secs_f64(m * 60.0)),
    };
    trainer.fit(train_set, &eval, &args.out, budget, |event| match event {
        Event::Step(m) => {
            bar.set_position(m.step as u64);
            bar.set_message(format!(
                "loss {:.3}  acc {:.1}%  lr {:.4}  {:.1} img/s",
                m.loss,
                100.0 * m.accuracy,
                m.lr,
                m.images_per_sec
            ));
        }
        Event::Eval { step, results } => {
            for r in results {
                let acc = r
                    .accuracy
                    .map(|a| format!("  accuracy {:.3}%", 100.0 * a))
                    .unwrap_or_default();
                bar.println(format!(
                    "step {step}: {}  AUC {:.5}{acc}  ({} pairs)",
                    r.set, r.auc, r.pairs
                ));
            }
        }
        Event::Saved { step, path } => {
            tracing::info!(step, path = %path.display(), "checkpoint");
        }
    })?;
    bar.finish();
    eprintln!(
        "step {}: checkpoint {}",
        trainer.step(),
        args.out.join("last.safetensors").display()
    );
    Ok(())
}
