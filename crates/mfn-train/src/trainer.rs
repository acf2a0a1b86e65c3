//! The training loop: a MobileFaceNet and a margin head trained with an [`Optimizer`] on
//! [`TrainBatches`], evaluated and checkpointed as it goes.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use mfn_data::Dataset;
use mfn_loss::{CombinedMargin, MarginHead};
use mfn_model::{Checkpoint, Config, MobileFaceNet};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::data::{BatchPlan, TrainBatches};
use crate::eval::{EvalResult, EvalSet};
use crate::optim::{Optimizer, OptimizerKind, WeightDecay};
use crate::schedule::LrSchedule;
use crate::{Error, Result};

/// Metadata key of the training settings in a training checkpoint.
pub const TRAIN_CONFIG_KEY: &str = "mfn.train.config";
/// Metadata key of the number of steps done.
pub const TRAIN_STEP_KEY: &str = "mfn.train.step";
/// Metadata key of the run's data settings ([`DataSettings`]), when it has them.
pub const TRAIN_DATA_KEY: &str = "mfn.train.data";
/// Name of the margin head's centres in a training checkpoint.
pub const HEAD_WEIGHT: &str = "head.weight";
/// Prefix of the optimiser's state tensors in a training checkpoint.
pub const OPTIM_PREFIX: &str = "optim.";

/// Everything that defines a training run. Saved in every checkpoint, so that a resumed run
/// continues with the same settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The network.
    pub model: Config,
    /// The margin of the loss.
    pub margin: CombinedMargin,
    /// Centres per class (sub-center ArcFace); 1 for plain margins.
    pub sub_centers: usize,
    /// Number of classes of the training set.
    pub classes: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Steps of the whole run.
    pub steps: usize,
    /// Seed of the initial weights, the shuffles and the flips.
    pub seed: u64,
    /// Mirror training images at random.
    pub flip: bool,
    /// The update rule.
    pub optimizer: OptimizerKind,
    /// Weight decay per parameter group.
    pub weight_decay: WeightDecay,
    /// The learning rate of each step.
    pub schedule: LrSchedule,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_every: usize,
}

/// The data settings of a run, as its command line gave them ([`Trainer::set_data`]): the
/// loop does not read them, a checkpoint carries them (under [`TRAIN_DATA_KEY`]) so that
/// a resume finds the same classes and evaluation sets.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DataSettings {
    /// The training images (a folder or a `.rec` file), as an absolute path.
    pub path: Option<PathBuf>,
    /// Identities with fewer images were left out.
    pub min_images: usize,
    /// Identities held out of training and scored as all-pairs sets.
    pub hold_out: Option<usize>,
    /// insightface `.bin` sets scored during training.
    pub eval_bins: Vec<PathBuf>,
    /// An LFW-style pairs file scored during training.
    pub eval_pairs: Option<PathBuf>,
    /// The images `eval_pairs` names.
    pub eval_images: Option<PathBuf>,
}

impl TrainConfig {
    /// Checks the settings that the types do not.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.batch_size < 2 {
            return bad(format!(
                "batch size {} is too small for BatchNorm in train mode",
                self.batch_size
            ));
        }
        if self.steps == 0 || self.classes < 2 || self.sub_centers == 0 {
            return bad(format!(
                "need steps > 0 ({}), classes >= 2 ({}) and sub-centers >= 1 ({})",
                self.steps, self.classes, self.sub_centers
            ));
        }
        let lr = self.schedule.base_lr;
        if !(lr.is_finite() && lr > 0.0) {
            return bad(format!("learning rate {lr} is not positive"));
        }
        self.margin.validate()?;
        Ok(())
    }
}

/// One training step's figures.
#[derive(Clone, Debug, Serialize)]
pub struct StepMetrics {
    /// The step (1-based: the number of updates made).
    pub step: usize,
    /// Cross-entropy of the margin logits.
    pub loss: f32,
    /// Fraction of the batch whose nearest class centre is its own class.
    pub accuracy: f32,
    /// Learning rate used.
    pub lr: f64,
    /// Images per second of this step, data waiting included.
    pub images_per_sec: f64,
}

/// What the loop reports as it goes.
#[derive(Clone, Debug)]
pub enum Event {
    /// A step is done.
    Step(StepMetrics),
    /// An evaluation is done.
    Eval {
        /// The step after which it ran.
        step: usize,
        /// Its results, one per set.
        results: Vec<EvalResult>,
    },
    /// A checkpoint was written.
    Saved {
        /// The step it holds.
        step: usize,
        /// Where.
        path: PathBuf,
    },
}

/// When [`Trainer::fit`] stops before the configured number of steps.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Budget {
    /// Stop after this many steps of this call.
    pub steps: Option<usize>,
    /// Stop at the first step boundary after this much wall time in this call.
    pub time: Option<std::time::Duration>,
}

/// A model, a head and an optimiser, at some step of a run.
pub struct Trainer {
    config: TrainConfig,
    vars: VarMap,
    model: MobileFaceNet,
    head: MarginHead,
    optimizer: Optimizer,
    step: usize,
    device: Device,
    data: Option<DataSettings>,
}

/// What a training checkpoint says about its run, read from its header alone
/// ([`Trainer::saved_settings`]).
#[derive(Clone, Debug, PartialEq)]
pub struct SavedRun {
    /// The run's settings.
    pub config: TrainConfig,
    /// Steps done.
    pub step: usize,
    /// Where its data came from, if recorded.
    pub data: Option<DataSettings>,
}

/// Standard deviation of the seeded initial weights: He for convs, `1/sqrt(fan_in)` for
/// the embedding layer, 0.01 for class centres, as the builders' own hints.
fn init_std(name: &str, dims: &[usize]) -> Option<f64> {
    let fan_in: usize = dims.iter().skip(1).product();
    if name.ends_with("_conv2d_weight") {
        Some((2.0 / fan_in.max(1) as f64).sqrt())
    } else if name == mfn_model::config::EmbeddingSpec::WEIGHT {
        Some((1.0 / fan_in.max(1) as f64).sqrt())
    } else if name == HEAD_WEIGHT {
        Some(0.01)
    } else {
        None
    }
}

impl Trainer {
    /// A run from scratch: weights drawn from `config.seed`, or taken from `init` (a
    /// pretrained model to fine-tune, whose config must equal `config.model`).
    pub fn new(config: TrainConfig, init: Option<&Checkpoint>, device: &Device) -> Result<Self> {
        config.validate()?;
        let vars = VarMap::new();
        let (model, head) = build(&config, &vars, device)?;
        {
            // candle's CPU generator cannot be seeded, so the initial weights are redrawn
            // here from the run's seed.
            let data = vars.data().lock().map_err(|_| poisoned())?;
            let mut names: Vec<&String> = data.keys().collect();
            names.sort();
            let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
            for name in names {
                let var = &data[name];
                if let Some(std) = init_std(name, var.dims()) {
                    let normal = Normal::new(0.0f32, std as f32)
                        .map_err(|e| Error::Config(e.to_string()))?;
                    let v: Vec<f32> = (0..var.elem_count())
                        .map(|_| normal.sample(&mut rng))
                        .collect();
                    var.set(&Tensor::from_vec(v, var.dims(), device)?)?;
                }
            }
        }
        if let Some(ckpt) = init {
            if ckpt.config != config.model {
                return Err(Error::Checkpoint {
                    path: ckpt.source.clone(),
                    message: format!(
                        "its config `{}` differs from the run's `{}`",
                        ckpt.config.name, config.model.name
                    ),
                });
            }
            set_vars(&vars, &ckpt.tensors, &ckpt.source, false)?;
        }
        let optimizer = optimizer(&config, &vars)?;
        Ok(Self {
            config,
            vars,
            model,
            head,
            optimizer,
            step: 0,
            device: device.clone(),
            data: None,
        })
    }

    /// Continues a run from a checkpoint written by [`Trainer::save`]: weights, head,
    /// optimiser state, step and settings. The settings must describe the tensors the file
    /// holds (the head's shape, the network's size), so that a damaged or hostile file
    /// cannot make this allocate more than the file itself holds.
    pub fn resume(path: &Path, device: &Device) -> Result<Self> {
        let ckpt = Checkpoint::load(path, None, device)?;
        let bad = |message: String| Error::Checkpoint {
            path: path.to_path_buf(),
            message,
        };
        let SavedRun { config, step, data } = settings_from(&ckpt.metadata, path)?;
        config.validate()?;
        if config.model != ckpt.config {
            return Err(bad(format!(
                "its training settings and its model metadata describe different networks \
                 (`{}`, `{}`)",
                config.model.name, ckpt.config.name
            )));
        }
        let rows = config
            .classes
            .checked_mul(config.sub_centers)
            .ok_or_else(|| bad("its class count overflows".into()))?;
        let want = [rows, config.model.embedding_size];
        match ckpt.tensors.get(HEAD_WEIGHT) {
            Some(t) if t.dims() == want => {}
            Some(t) => {
                return Err(bad(format!(
                    "`{HEAD_WEIGHT}` has shape {:?}, its settings ({} classes x {} centres of \
                     {}) need {want:?}",
                    t.dims(),
                    config.classes,
                    config.sub_centers,
                    config.model.embedding_size
                )))
            }
            None => return Err(bad(format!("no tensor `{HEAD_WEIGHT}`"))),
        }
        let stored: usize = ckpt
            .tensors
            .iter()
            .filter(|(k, _)| !k.starts_with(OPTIM_PREFIX) && k.as_str() != HEAD_WEIGHT)
            .map(|(_, t)| t.elem_count())
            .sum();
        let params = config.model.complexity().params;
        if params > stored as u64 {
            return Err(bad(format!(
                "its network `{}` has {params} parameters, the file holds {stored} values",
                config.model.name
            )));
        }
        let vars = VarMap::new();
        let (model, head) = build(&config, &vars, device)?;
        let (optim, weights): (HashMap<_, _>, HashMap<_, _>) = ckpt
            .tensors
            .into_iter()
            .partition(|(k, _)| k.starts_with(OPTIM_PREFIX));
        set_vars(&vars, &weights, path, true)?;
        let mut optimizer = optimizer(&config, &vars)?;
        let state: BTreeMap<String, Tensor> = optim
            .into_iter()
            .map(|(k, v)| (k[OPTIM_PREFIX.len()..].to_string(), v))
            .collect();
        optimizer
            .restore(state, step)
            .map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            config,
            vars,
            model,
            head,
            optimizer,
            step,
            device: device.clone(),
            data,
        })
    }

    /// The settings, step and data settings of a training checkpoint, read from its header
    /// only (no tensor is loaded): what a resume will continue, for checking its data first.
    pub fn saved_settings(path: &Path) -> Result<SavedRun> {
        let metadata = header_metadata(path)?;
        settings_from(&metadata, path)
    }

    /// Sets the number of steps of the whole run (the learning-rate schedule then spans
    /// them): extends a resumed run, or shortens one that has not got there yet.
    pub fn set_steps(&mut self, steps: usize) -> Result<()> {
        if steps <= self.step {
            return Err(Error::Config(format!(
                "the run is at step {} already; {steps} steps would add none",
                self.step
            )));
        }
        self.config.steps = steps;
        self.config.schedule.total_steps = steps;
        Ok(())
    }

    /// Sets how often the loop evaluates and checkpoints (0: at the end only); they do
    /// not change what it computes.
    pub fn set_intervals(&mut self, eval_every: usize, save_every: usize) {
        self.config.eval_every = eval_every;
        self.config.save_every = save_every;
    }

    /// Sets the data settings recorded in later checkpoints.
    pub fn set_data(&mut self, data: Option<DataSettings>) {
        self.data = data;
    }

    /// The data settings recorded in checkpoints, if any.
    pub fn data(&self) -> Option<&DataSettings> {
        self.data.as_ref()
    }

    /// The run's settings.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Steps done.
    pub fn step(&self) -> usize {
        self.step
    }

    /// One update on a batch; returns its figures.
    pub fn train_step(&mut self, images: &Tensor, labels: &Tensor) -> Result<StepMetrics> {
        let start = Instant::now();
        let lr = self.config.schedule.lr(self.step);
        let embeddings = self.model.forward_t(images, true)?;
        let logits = self.head.forward(&embeddings, labels)?;
        let loss = mfn_loss::cross_entropy(&logits, labels)?;
        let grads = loss.backward()?;
        // Nearest centre before the update, as the loss saw it.
        let nearest = self.head.cosine(&embeddings.detach())?.argmax(D::Minus1)?;
        self.optimizer.step(&grads, lr)?;
        self.step += 1;
        let loss_value = loss.to_scalar::<f32>()?;
        if !loss_value.is_finite() {
            return Err(Error::Config(format!(
                "the loss became {loss_value} at step {}: lower the learning rate",
                self.step
            )));
        }
        let hits = nearest
            .eq(labels)?
            .to_dtype(DType::F32)?
            .mean_all()?
            .to_scalar::<f32>()?;
        Ok(StepMetrics {
            step: self.step,
            loss: loss_value,
            accuracy: hits,
            lr,
            images_per_sec: images.dim(0)? as f64 / start.elapsed().as_secs_f64(),
        })
    }

    /// The model's weights as they are now (running statistics included), detached.
    pub fn model_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let data = self.vars.data().lock().map_err(|_| poisoned())?;
        data.iter()
            .filter(|(k, _)| k.as_str() != HEAD_WEIGHT)
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
            .collect()
    }

    /// The network as it is now, built for inference (BatchNorm folded).
    pub fn inference_model(&self) -> Result<MobileFaceNet> {
        let vb = VarBuilder::from_tensors(self.model_tensors()?, DType::F32, &self.device);
        Ok(MobileFaceNet::new(&self.config.model, vb)?)
    }

    /// Scores the current model on each set (flip test on).
    pub fn evaluate(&self, sets: &[EvalSet]) -> Result<Vec<EvalResult>> {
        let model = self.inference_model()?;
        sets.iter().map(|s| s.evaluate(&model, 64, true)).collect()
    }

    /// Writes a training checkpoint: the model under its checkpoint names (so the file is
    /// also a native model for `Checkpoint::load`), the head, the optimiser state, the step
    /// and the settings. The write is atomic: a crash leaves the previous file intact.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = self.model_tensors()?;
        {
            let data = self.vars.data().lock().map_err(|_| poisoned())?;
            if let Some(h) = data.get(HEAD_WEIGHT) {
                tensors.insert(HEAD_WEIGHT.into(), h.as_tensor().copy()?);
            }
        }
        for (k, v) in self.optimizer.state() {
            tensors.insert(format!("{OPTIM_PREFIX}{k}"), v.copy()?);
        }
        let mut metadata = BTreeMap::new();
        metadata.insert(
            TRAIN_CONFIG_KEY.to_string(),
            serde_json::to_string(&self.config).map_err(|e| Error::Config(e.to_string()))?,
        );
        metadata.insert(TRAIN_STEP_KEY.to_string(), self.step.to_string());
        if let Some(d) = &self.data {
            metadata.insert(
                TRAIN_DATA_KEY.to_string(),
                serde_json::to_string(d).map_err(|e| Error::Config(e.to_string()))?,
            );
        }
        let ckpt = Checkpoint {
            config: self.config.model.clone(),
            tensors,
            metadata,
            source: path.to_path_buf(),
            int8: None,
        };
        crate::atomic::write_with(path, |tmp| ckpt.save(tmp)).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Trains up to the configured number of steps on `data`, evaluating on `eval` and
    /// checkpointing to `out` (`{out}/last.safetensors`) on the configured schedule, and at
    /// the end. `budget` can end the loop early (still saving, evaluating and reporting as
    /// at the end); a later call, or [`Trainer::resume`], continues. `on_event` sees every
    /// step, evaluation and save.
    ///
    /// `{out}/metrics.jsonl` logs every step and evaluation. It is first cut to the lines of
    /// the steps this trainer has done (none for a fresh run), so that a run resumed
    /// from a checkpoint older than its log logs each step once.
    pub fn fit(
        &mut self,
        data: Arc<dyn Dataset + Send + Sync>,
        eval: &[EvalSet],
        out: &Path,
        budget: Budget,
        mut on_event: impl FnMut(&Event),
    ) -> Result<()> {
        if data.num_classes() != self.config.classes {
            return Err(Error::Config(format!(
                "the data set has {} classes, the head {}",
                data.num_classes(),
                self.config.classes
            )));
        }
        std::fs::create_dir_all(out).map_err(|source| Error::Io {
            path: out.to_path_buf(),
            source,
        })?;
        let [h, w] = self.config.model.input_size;
        let plan = BatchPlan {
            batch_size: self.config.batch_size,
            seed: self.config.seed,
            flip: self.config.flip,
            size: [w, h],
        };
        let mut metrics = MetricsLog::open(&out.join("metrics.jsonl"), self.step)?;
        let batches = TrainBatches::new(data, plan, self.step, 2, self.device.clone())?;
        let first = self.step;
        let ckpt = out.join("last.safetensors");
        let started = Instant::now();
        let mut last_tick = Instant::now();
        let out_of_budget = |step: usize| {
            budget.steps.is_some_and(|n| step - first >= n)
                || budget.time.is_some_and(|t| started.elapsed() >= t)
        };
        if self.step == 0 && !eval.is_empty() {
            // The untrained network's scores: the baseline the run is measured against.
            let results = self.evaluate(eval)?;
            metrics.write(&serde_json::json!({"event": "eval", "step": 0, "results": &results}))?;
            on_event(&Event::Eval { step: 0, results });
        }
        for batch in batches {
            if self.step >= self.config.steps {
                break;
            }
            let batch = batch?;
            debug_assert_eq!(batch.step, self.step);
            let mut m = self.train_step(&batch.images, &batch.labels)?;
            // Wall time per step including the wait for data, which is what a user sees.
            m.images_per_sec = batch.images.dim(0)? as f64 / last_tick.elapsed().as_secs_f64();
            last_tick = Instant::now();
            metrics.write(&serde_json::json!({"event": "step", "metrics": &m}))?;
            tracing::debug!(step = m.step, loss = m.loss, lr = m.lr, "step");
            on_event(&Event::Step(m));
            let end = self.step >= self.config.steps || out_of_budget(self.step);
            let every = |n: usize| n > 0 && self.step.is_multiple_of(n);
            if !eval.is_empty() && (every(self.config.eval_every) || end) {
                let results = self.evaluate(eval)?;
                for r in &results {
                    tracing::info!(step = self.step, set = %r.set, auc = r.auc, accuracy = ?r.accuracy, "eval");
                }
                metrics.write(
                    &serde_json::json!({"event": "eval", "step": self.step, "results": &results}),
                )?;
                on_event(&Event::Eval {
                    step: self.step,
                    results,
                });
                last_tick = Instant::now();
            }
            if every(self.config.save_every) || end {
                // The log on disk covers at least what the checkpoint holds.
                metrics.sync()?;
                self.save(&ckpt)?;
                on_event(&Event::Saved {
                    step: self.step,
                    path: ckpt.clone(),
                });
                last_tick = Instant::now();
            }
            if end {
                break;
            }
        }
        Ok(())
    }
}

/// The training settings, step and data settings in a checkpoint's metadata.
fn settings_from(metadata: &BTreeMap<String, String>, path: &Path) -> Result<SavedRun> {
    let bad = |message: String| Error::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    let config: TrainConfig =
        serde_json::from_str(metadata.get(TRAIN_CONFIG_KEY).ok_or_else(|| {
            bad(format!(
                "no `{TRAIN_CONFIG_KEY}`: not a training checkpoint"
            ))
        })?)
        .map_err(|e| bad(format!("bad `{TRAIN_CONFIG_KEY}`: {e}")))?;
    let step: usize = metadata
        .get(TRAIN_STEP_KEY)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("no valid `{TRAIN_STEP_KEY}`")))?;
    let data = metadata
        .get(TRAIN_DATA_KEY)
        .map(|d| serde_json::from_str(d))
        .transpose()
        .map_err(|e| bad(format!("bad `{TRAIN_DATA_KEY}`: {e}")))?;
    Ok(SavedRun { config, step, data })
}

/// The string metadata of a safetensors file, from its header alone.
fn header_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    use std::io::Read;
    // safetensors' own bound on the header.
    const MAX_HEADER: u64 = 100_000_000;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let bad = |message: String| Error::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    // Checked before opening: opening a FIFO for reading blocks until a writer comes.
    mfn_model::import::check_regular_file(path, mfn_model::import::MAX_FILE_BYTES)?;
    let mut file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut size = [0u8; 8];
    file.read_exact(&mut size)
        .map_err(|_| bad(format!("{len} bytes: not a safetensors file")))?;
    let n = u64::from_le_bytes(size);
    if n > MAX_HEADER || n > len.saturating_sub(8) {
        return Err(bad(format!(
            "its header claims {n} bytes, the file has {len}: not a safetensors file"
        )));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).map_err(io)?;
    #[derive(Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__", default)]
        metadata: BTreeMap<String, String>,
    }
    let h: Header = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("not a safetensors header: {e}")))?;
    Ok(h.metadata)
}

fn poisoned() -> Error {
    Error::Config("a thread panicked while holding the weights".into())
}

/// The network and head over `vars` (created there with candle's initialisation).
fn build(
    config: &TrainConfig,
    vars: &VarMap,
    device: &Device,
) -> Result<(MobileFaceNet, MarginHead)> {
    let vb = VarBuilder::from_varmap(vars, DType::F32, device);
    let model = MobileFaceNet::new(&config.model, vb.clone())?;
    let head = MarginHead::new(
        vb.pp("head"),
        config.classes,
        config.model.embedding_size,
        config.sub_centers,
        config.margin,
    )?;
    Ok((model, head))
}

fn optimizer(config: &TrainConfig, vars: &VarMap) -> Result<Optimizer> {
    let data = vars.data().lock().map_err(|_| poisoned())?;
    let params: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    Optimizer::new(config.optimizer, config.weight_decay, params)
}

/// Copies `tensors` into `vars`. With `all`, every var must be present (a resume);
/// otherwise only the model's are (fine-tuning from a model file, head fresh).
fn set_vars(
    vars: &VarMap,
    tensors: &HashMap<String, Tensor>,
    path: &Path,
    all: bool,
) -> Result<()> {
    let data = vars.data().lock().map_err(|_| poisoned())?;
    for (name, var) in data.iter() {
        let Some(t) = tensors.get(name) else {
            if all || name != HEAD_WEIGHT {
                return Err(Error::Checkpoint {
                    path: path.to_path_buf(),
                    message: format!("no tensor `{name}`"),
                });
            }
            continue;
        };
        if t.dims() != var.dims() {
            return Err(Error::Checkpoint {
                path: path.to_path_buf(),
                message: format!(
                    "`{name}` has shape {:?}, the run needs {:?}",
                    t.dims(),
                    var.dims()
                ),
            });
        }
        var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
    }
    Ok(())
}

/// A JSON-lines file of metrics, appended to as the run goes. A run that starts or resumes
/// at step `s` first cuts it to the lines of steps up to `s` (none for a fresh run), so
/// that steps a killed run logged after its last checkpoint, and run again now, appear
/// once; the cut is an atomic replacement.
struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsLog {
    fn open(path: &Path, step: usize) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::read(path) {
            Ok(old) => {
                let kept = kept_lines(&old, step);
                if kept.len() != old.len() {
                    crate::atomic::write(path, &kept).map_err(io)?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    fn write(&mut self, value: &serde_json::Value) -> Result<()> {
        // One write per line: a kill leaves whole lines, a torn last one at worst, which
        // the next open drops.
        let line = format!("{value}\n");
        self.file
            .write_all(line.as_bytes())
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                source,
            })
    }

    fn sync(&mut self) -> Result<()> {
        self.file.sync_data().map_err(|source| Error::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// The lines of a metrics log that belong to steps up to `step` (none when `step` is 0,
/// where the run starts over), in their order; lines that do not parse are dropped.
fn kept_lines(log: &[u8], step: usize) -> Vec<u8> {
    let mut out = Vec::new();
    if step == 0 {
        return out;
    }
    for line in log.split(|&b| b == b'\n') {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        let at = match v["event"].as_str() {
            Some("step") => v["metrics"]["step"].as_u64(),
            _ => v["step"].as_u64(),
        };
        if at.is_some_and(|s| s <= step as u64) {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::kept_lines;

    #[test]
    fn a_resumed_log_keeps_the_steps_up_to_the_checkpoint() {
        let log = concat!(
            "{\"event\":\"eval\",\"step\":0}\n",
            "{\"event\":\"step\",\"metrics\":{\"step\":1}}\n",
            "{\"event\":\"step\",\"metrics\":{\"step\":2}}\n",
            "{\"event\":\"eval\",\"step\":2}\n",
            "{\"event\":\"step\",\"metrics\":{\"step\":3}}\n",
            "{\"event\":\"step\",\"met"
        );
        let kept = String::from_utf8(kept_lines(log.as_bytes(), 2)).unwrap();
        assert_eq!(kept.lines().count(), 4, "{kept}");
        assert!(!kept.contains("\"step\":3"));
        assert!(kept_lines(log.as_bytes(), 0).is_empty());
        let all = kept_lines(log.as_bytes(), 9);
        assert_eq!(all, log.as_bytes()[..log.rfind('\n').unwrap() + 1]);
    }
}
