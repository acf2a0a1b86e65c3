//! `cargo xtask bench`: CPU latency and throughput of the inference path, per thread count
//! and batch size, with the time split by layer kind, gated against a committed baseline.
//! Without `--model` it times the two models people deploy, y1 (from the assets folder) and
//! insightface's `w600k_mbf` (through the registry: assets folder, cache or download);
//! `--model PATH`, once or more, times those files instead.
//! `--device cuda` (a build with `--features cuda`) times the GPU path instead, at batches
//! 1, 256 and 1024 by default and in `--dtype` f32, f16 or bf16: the input already on the
//! GPU, each pass timed to the end of its last kernel.
//!
//! Each (threads, batch) row is timed in `--rounds` rounds of `--runs` forward passes; a
//! row's figure is the median over the rounds of each round's median, so one noisy round
//! cannot move it. Every round also times a fixed reference workload (a candle matrix
//! product) on the same threads, and each row keeps its ratio to it: a figure that stays
//! comparable when the whole machine is faster or slower than when the baseline was taken.
//!
//! The gate reads `bench/baselines/<device>.json` (`<device>` names the CPU model, the
//! core count and the GPU if any, then `-cuda-<dtype>` for GPU runs; `--machine NAME`
//! replaces it) or `--baseline PATH`. The file holds every model's rows (`models`, each
//! named by its path in the assets layout and its MACs per face); the gate compares each
//! model benched with its own rows and fails when a row is slower than its baseline by more
//! than the tolerance: in ms per batch (`--metric time`) or in the ratio to the reference
//! (`--metric ratio`). `--update-baseline` rewrites the rows of the models benched and keeps
//! the others. `--json` rows use the same keys as ONNX Runtime's peer benchmark (`threads`,
//! `batch`, `median_ms`, `faces_per_s`), plus `model`, so the two compare directly.
//!
//! The `% f32 peak` column divides GMAC/s by the threads times one core's multiply-add peak,
//! measured with the widest FMA the f32 engine runs: AVX-512 (16 lanes) where the CPU has
//! it, else AVX2 (8 lanes).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use mfn_hub::{Hub, Kind, Registry};
use mfn_model::{Checkpoint, LayerKind, LayerTimes, MobileFaceNet};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::machine::Machine;

/// Tolerance of a new baseline: a row may be this much slower (as a fraction).
const DEFAULT_TOLERANCE: f64 = 0.15;

/// The reference workload: one `N x N` by `N x N` f32 matrix product.
const REFERENCE_N: usize = 384;

/// The reference workload on a GPU, where a 384 product is all launch overhead.
const GPU_REFERENCE_N: usize = 2048;

/// y1, as a plain `cargo xtask bench` times it: its path in the assets layout.
const Y1: &str = "models/mobilefacenet-y1/model-symbol.json";

/// insightface's `w600k_mbf`, as a plain `cargo xtask bench` times it: a registry name.
const W600K_MBF: &str = "w600k_mbf";

/// The largest baseline file read: a few models of a few dozen rows are kilobytes.
const MAX_BASELINE_BYTES: u64 = 4 << 20;

/// The most models, and rows per model, a baseline may hold.
const MAX_BASELINE_MODELS: usize = 64;
const MAX_BASELINE_ROWS: usize = 1024;

/// Where the network runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchDevice {
    /// The CPU engine, per thread count.
    Cpu,
    /// The first CUDA GPU (needs `--features cuda`).
    Cuda,
}

/// Precision of the GPU inference path.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchDtype {
    /// 32-bit floats.
    F32,
    /// 16-bit IEEE floats.
    F16,
    /// bfloat16.
    Bf16,
}

/// `--precision`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum BenchPrecision {
    /// f32 throughout.
    F32,
    /// int8 1x1 convs and embedding layer.
    Int8,
}

impl BenchPrecision {
    fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Int8 => "int8",
        }
    }
}

impl BenchDtype {
    fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }
}

/// Opens the device `--device` names; CUDA in a build without it is an error that says how
/// to get one.
pub fn open_device(kind: BenchDevice) -> Result<Device> {
    match kind {
        BenchDevice::Cpu => Ok(Device::Cpu),
        BenchDevice::Cuda if !cfg!(feature = "cuda") => bail!(
            "--device cuda: xtask was built without CUDA support; run it as \
             `cargo run --release -p xtask --features cuda -- ...` (needs the CUDA toolkit)"
        ),
        BenchDevice::Cuda => {
            Device::new_cuda(0).context("--device cuda: cannot open CUDA device 0")
        }
    }
}

/// The GPU's name and architecture, for the machine record.
pub fn gpu_name(device: &Device) -> Option<String> {
    #[cfg(feature = "cuda")]
    {
        mfn_model::cuda::describe(device)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        None
    }
}

/// Arguments of `cargo xtask bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model to time, repeatable [default: y1 at
    /// $MFN_ASSETS/models/mobilefacenet-y1/model-symbol.json and the registry's
    /// `w600k_mbf`, from the assets folder, the cache or downloaded].
    #[arg(long, value_name = "PATH")]
    model: Vec<PathBuf>,
    /// Thread counts, comma separated [default: the baseline's, else 1,2].
    #[arg(long, value_delimiter = ',', value_name = "N,..")]
    threads: Vec<usize>,
    /// Batch sizes, comma separated [default: the baseline's, else 1,32].
    #[arg(long, value_delimiter = ',', value_name = "N,..")]
    batches: Vec<usize>,
    /// Timed forward passes per row and round.
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// Rounds per row; the gate compares the median of the rounds' medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Write the rows, each with its machine, as JSON.
    #[arg(long, value_name = "OUT")]
    json: Option<PathBuf>,
    /// The baseline file [default: bench/baselines/DEVICE.json in the workspace].
    #[arg(long, value_name = "PATH")]
    baseline: Option<PathBuf>,
    /// The machine name that picks the default baseline file [default: from the CPU model,
    /// core count and GPU, plus `-cuda-<dtype>` with --device cuda].
    #[arg(long = "machine", value_name = "NAME")]
    machine_name: Option<String>,
    /// Where the network runs: the CPU engine, or the GPU path (`--features cuda`).
    #[arg(long, value_enum, default_value_t = BenchDevice::Cpu)]
    device: BenchDevice,
    /// Precision of the GPU path; f16 and bf16 need --device cuda.
    #[arg(long, value_enum, default_value_t = BenchDtype::F32)]
    dtype: BenchDtype,
    /// Precision of the CPU engine's 1x1 convs and embedding layer: `int8` uses the
    /// model's int8 half, or calibrates one on `--calib`; the baseline is then
    /// `DEVICE-int8.json` [default: f32, even for a model with an int8 half].
    #[arg(long, value_enum, default_value_t = BenchPrecision::F32)]
    precision: BenchPrecision,
    /// Aligned faces to calibrate the int8 half on, when the model has none
    /// [default: $MFN_ASSETS/lfw/aligned-112x112].
    #[arg(long, value_name = "DIR")]
    calib: Option<PathBuf>,
    /// Rewrite the baseline's rows of the models timed with this run's figures instead of
    /// comparing; the file's other models keep theirs.
    #[arg(long)]
    update_baseline: bool,
    /// How much slower than the baseline still passes, as a fraction [default: the
    /// baseline's; 0.15 for a new one].
    #[arg(long)]
    tolerance: Option<f64>,
    /// What the gate compares.
    #[arg(long, value_enum, default_value_t = Metric::Time)]
    metric: Metric,
    /// Only report: read no baseline and never fail on speed.
    #[arg(long, conflicts_with = "update_baseline")]
    no_gate: bool,
    /// Skip the time per layer kind.
    #[arg(long)]
    no_layers: bool,
}

/// The figure the gate compares.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// Median ms per batch.
    Time,
    /// Median ms per batch over the reference workload's median ms, measured in the same
    /// rounds on the same threads.
    Ratio,
}

/// A baseline file: one device (and precision, or GPU dtype), every model's rows.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Baseline {
    /// The device name of the file.
    device: String,
    /// Where the figures were taken.
    machine: Machine,
    /// How much slower a row may be, as a fraction.
    tolerance: f64,
    /// What the reference workload is.
    reference: String,
    /// Runs and rounds of the last update.
    runs: usize,
    rounds: usize,
    /// Seconds since the Unix epoch of the last update.
    recorded_unix: u64,
    /// Each model's rows.
    models: Vec<ModelRows>,
}

/// One model's rows in a baseline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelRows {
    /// The model (see [`model_label`]): its path in the assets layout when it has one.
    model: String,
    /// Its multiply-adds per face: a different network is not compared.
    macs: u64,
    /// Seconds since the Unix epoch when these rows were taken.
    recorded_unix: u64,
    results: Vec<Row>,
}

/// A baseline file of the older layout: one model's rows at the top level. Read, and
/// rewritten in the current layout by the next `--update-baseline`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SingleModelBaseline {
    device: String,
    machine: Machine,
    model: String,
    macs: u64,
    tolerance: f64,
    reference: String,
    runs: usize,
    rounds: usize,
    recorded_unix: u64,
    results: Vec<Row>,
}

impl From<SingleModelBaseline> for Baseline {
    fn from(b: SingleModelBaseline) -> Self {
        Self {
            device: b.device,
            machine: b.machine,
            tolerance: b.tolerance,
            reference: b.reference,
            runs: b.runs,
            rounds: b.rounds,
            recorded_unix: b.recorded_unix,
            models: vec![ModelRows {
                model: b.model,
                macs: b.macs,
                recorded_unix: b.recorded_unix,
                results: b.results,
            }],
        }
    }
}

impl Baseline {
    /// The rows of the model labelled `label`; an error when the file has that model with
    /// other MACs (a different network under the same name).
    fn find(&self, label: &str, macs: u64, path: &Path) -> Result<Option<&ModelRows>> {
        match self.models.iter().find(|m| m.model == label) {
            Some(m) if m.macs != macs => bail!(
                "{label} has {macs} MACs per face, but {} recorded it with {}: a different \
                 network; record it again with --update-baseline, or pass another --baseline",
                path.display(),
                m.macs
            ),
            found => Ok(found),
        }
    }

    /// Puts `rows` in place of the rows of the same model, or after the others.
    fn record(&mut self, rows: ModelRows) {
        match self.models.iter_mut().find(|m| m.model == rows.model) {
            Some(m) => *m = rows,
            None => self.models.push(rows),
        }
    }

    /// Checks what a file may hold; errors name the file.
    fn validate(&self, path: &Path) -> Result<()> {
        let file = path.display();
        if !(self.tolerance.is_finite() && (0.0..=10.0).contains(&self.tolerance)) {
            bail!("{file}: tolerance {} is not a fraction", self.tolerance);
        }
        if self.models.len() > MAX_BASELINE_MODELS {
            bail!(
                "{file}: {} models, more than the {MAX_BASELINE_MODELS} a baseline may hold",
                self.models.len()
            );
        }
        for (i, m) in self.models.iter().enumerate() {
            if m.model.is_empty() {
                bail!("{file}: model {} has no name", i + 1);
            }
            if self.models[..i].iter().any(|o| o.model == m.model) {
                bail!("{file}: {} appears twice in `models`", m.model);
            }
            if m.results.len() > MAX_BASELINE_ROWS {
                bail!(
                    "{file}: {} has {} rows, more than the {MAX_BASELINE_ROWS} a model may have",
                    m.model,
                    m.results.len()
                );
            }
            for r in &m.results {
                let positive = |v: f64| v.is_finite() && v > 0.0;
                if !(positive(r.median_ms) && positive(r.ratio)) {
                    bail!(
                        "{file}: {} threads {} batch {}: median_ms {} and ratio {} must be \
                         positive numbers",
                        m.model,
                        r.threads,
                        r.batch,
                        r.median_ms,
                        r.ratio
                    );
                }
            }
        }
        Ok(())
    }
}

/// Parses a baseline file's text, of the current layout or the older single-model one;
/// the flag says which (true: the older). Errors name `path`.
fn parse_baseline(text: &str, path: &Path) -> Result<(Baseline, bool)> {
    let value: Value =
        serde_json::from_str(text).with_context(|| format!("parsing {}", path.display()))?;
    let single = value.get("models").is_none() && value.get("results").is_some();
    let b: Baseline = if single {
        serde_json::from_value::<SingleModelBaseline>(value)
            .with_context(|| {
                format!(
                    "parsing {} (one model's rows at the top level: the older layout)",
                    path.display()
                )
            })?
            .into()
    } else {
        serde_json::from_value(value).with_context(|| format!("parsing {}", path.display()))?
    };
    b.validate(path)?;
    Ok((b, single))
}

/// Reads a baseline file, at most [`MAX_BASELINE_BYTES`] of it.
fn read_baseline(path: &Path) -> Result<Baseline> {
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_BASELINE_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {}", path.display()))?;
    if text.len() as u64 > MAX_BASELINE_BYTES {
        bail!(
            "{} is larger than {MAX_BASELINE_BYTES} bytes: not a baseline",
            path.display()
        );
    }
    let (b, single) = parse_baseline(&text, path)?;
    if single {
        eprintln!(
            "note: {} holds one model's rows in the older layout; read as the rows of {} \
             (the next --update-baseline rewrites it with a `models` list)",
            path.display(),
            b.models[0].model
        );
    }
    Ok(b)
}

/// One measured (threads, batch) row.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Row {
    /// CPU threads; 0 for a GPU row.
    threads: usize,
    batch: usize,
    /// Median over rounds of the per-round median ms per batch.
    median_ms: f64,
    /// Smallest and largest per-round median.
    round_ms: [f64; 2],
    /// The reference workload's median ms on the same threads.
    reference_ms: f64,
    /// `median_ms / reference_ms`.
    ratio: f64,
    faces_per_s: f64,
}

impl Row {
    fn get(&self, metric: Metric) -> f64 {
        match metric {
            Metric::Time => self.median_ms,
            Metric::Ratio => self.ratio,
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One core's multiply-add peak, measured with the widest FMA the f32 engine runs.
#[derive(Clone, Copy, Debug)]
struct Peak {
    /// The instructions: `AVX-512` (16 f32 lanes) or `AVX2` (8).
    isa: &'static str,
    /// GMAC/s; NaN when the CPU has neither.
    gmacs: f64,
}

/// Independent FMA chains per measurement: enough to cover the FMA latency on every pipe.
const FMA_CHAINS: usize = 12;

/// Single-core multiply-add peak in GMAC/s, measured with independent FMA chains of the
/// width the f32 engine's kernels use: AVX-512 where the CPU has AVX-512F (as the engine
/// picks), else AVX2.
fn fma_peak() -> Peak {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;

        #[target_feature(enable = "avx512f")]
        unsafe fn chains512(iters: u64) -> f32 {
            // black_box keeps the compiler from folding the whole chain into a constant.
            let a = _mm512_set1_ps(std::hint::black_box(0.999_9));
            let b = _mm512_set1_ps(std::hint::black_box(1e-4));
            let mut acc = [_mm512_set1_ps(std::hint::black_box(1.0)); FMA_CHAINS];
            for _ in 0..iters {
                for v in acc.iter_mut() {
                    *v = _mm512_fmadd_ps(*v, a, b);
                }
            }
            let mut s = _mm512_setzero_ps();
            for v in acc {
                s = _mm512_add_ps(s, v);
            }
            let mut out = [0f32; 16];
            _mm512_storeu_ps(out.as_mut_ptr(), s);
            out.iter().sum()
        }

        #[target_feature(enable = "avx2,fma")]
        unsafe fn chains256(iters: u64) -> f32 {
            let a = _mm256_set1_ps(std::hint::black_box(0.999_9));
            let b = _mm256_set1_ps(std::hint::black_box(1e-4));
            let mut acc = [_mm256_set1_ps(std::hint::black_box(1.0)); FMA_CHAINS];
            for _ in 0..iters {
                for v in acc.iter_mut() {
                    *v = _mm256_fmadd_ps(*v, a, b);
                }
            }
            let mut s = _mm256_setzero_ps();
            for v in acc {
                s = _mm256_add_ps(s, v);
            }
            let mut out = [0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), s);
            out.iter().sum()
        }

        /// The best of five timings of `f` over `iters` steps of `lanes`-wide chains: short
        /// tries, so that one of them likely runs without another process on the core.
        fn best(lanes: u64, f: impl Fn(u64) -> f32) -> f64 {
            let iters = 20_000_000u64;
            let mut best = 0f64;
            for _ in 0..5 {
                let t = Instant::now();
                let r = f(iters);
                let secs = t.elapsed().as_secs_f64();
                std::hint::black_box(r);
                best = best.max((iters * FMA_CHAINS as u64 * lanes) as f64 / secs / 1e9);
            }
            best
        }

        if std::arch::is_x86_feature_detected!("avx512f") {
            return Peak {
                isa: "AVX-512",
                // SAFETY: the CPU has AVX-512F.
                gmacs: best(16, |n| unsafe { chains512(n) }),
            };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Peak {
                isa: "AVX2",
                // SAFETY: the CPU has AVX2 and FMA.
                gmacs: best(8, |n| unsafe { chains256(n) }),
            };
        }
    }
    Peak {
        isa: "FMA",
        gmacs: f64::NAN,
    }
}

fn input(batch: usize) -> Result<Tensor> {
    let v: Vec<f32> = (0..batch * 3 * 112 * 112)
        .map(|i| ((i as u64).wrapping_mul(2_654_435_761) % 256) as f32)
        .collect();
    Ok(Tensor::from_vec(v, (batch, 3, 112, 112), &Device::Cpu)?)
}

/// Median ms of `runs` calls of `f`.
fn time_median(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(&mut ms))
}

/// The reference workload's operands: fixed, so every run multiplies the same numbers.
fn reference_operands() -> Result<(Tensor, Tensor)> {
    let n = REFERENCE_N;
    let v: Vec<f32> = (0..n * n)
        .map(|i| ((i % 251) as f32 - 125.0) / 125.0)
        .collect();
    let a = Tensor::from_vec(v, (n, n), &Device::Cpu)?;
    let b = a.t()?.contiguous()?;
    Ok((a, b))
}

fn layer_times(model: &MobileFaceNet, x: &Tensor, runs: usize) -> Result<Vec<(LayerKind, f64)>> {
    let mut per_kind: Vec<Vec<f64>> = vec![Vec::new(); LayerKind::ALL.len()];
    for _ in 0..runs.clamp(1, 10) {
        let (_, times): (_, LayerTimes) = model.forward_timed(x)?;
        for (i, k) in LayerKind::ALL.iter().enumerate() {
            per_kind[i].push(times.get(k).map_or(0.0, |d| d.as_secs_f64() * 1e3));
        }
    }
    Ok(LayerKind::ALL
        .iter()
        .zip(per_kind.iter_mut())
        .map(|(k, v)| (*k, median(v)))
        .collect())
}

/// Median ms per batch spent in each kind of layer.
type LayerMs = Vec<(LayerKind, f64)>;

/// Everything measured on one thread count: one row per batch size.
fn measure_threads(
    model: &MobileFaceNet,
    threads: usize,
    batches: &[usize],
    runs: usize,
    rounds: usize,
    layers: bool,
) -> Result<Vec<(Row, LayerMs)>> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("building a thread pool")?;
    pool.install(|| {
        let (a, b) = reference_operands()?;
        let inputs = batches
            .iter()
            .map(|&n| input(n))
            .collect::<Result<Vec<_>>>()?;
        // Warm-up: first calls allocate buffers and fault pages in.
        for x in &inputs {
            for _ in 0..2 {
                model.forward(x)?;
            }
        }
        for _ in 0..3 {
            std::hint::black_box(a.matmul(&b)?);
        }
        let mut reference = Vec::with_capacity(rounds);
        let mut per_row: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds); batches.len()];
        // Rounds interleave the reference and every row, so a slow spell of the machine
        // touches them all alike instead of one row.
        for _ in 0..rounds {
            reference.push(time_median(runs.max(10), || {
                std::hint::black_box(a.matmul(&b)?);
                Ok(())
            })?);
            for (x, ms) in inputs.iter().zip(per_row.iter_mut()) {
                ms.push(time_median(runs, || {
                    std::hint::black_box(model.forward(x)?);
                    Ok(())
                })?);
            }
        }
        let reference_ms = median(&mut reference);
        batches
            .iter()
            .zip(inputs.iter())
            .zip(per_row.iter_mut())
            .map(|((&batch, x), ms)| {
                let lo = ms.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = ms.iter().copied().fold(0.0, f64::max);
                let median_ms = median(ms);
                let kinds = if layers {
                    layer_times(model, x, runs)?
                } else {
                    Vec::new()
                };
                Ok((
                    Row {
                        threads,
                        batch,
                        median_ms,
                        round_ms: [lo, hi],
                        reference_ms,
                        ratio: median_ms / reference_ms,
                        faces_per_s: batch as f64 * 1e3 / median_ms,
                    },
                    kinds,
                ))
            })
            .collect()
    })
}

/// Everything measured on a GPU: one row per batch size. Inputs live on the GPU; each
/// timed pass ends when the device has finished it.
fn measure_gpu(
    model: &MobileFaceNet,
    device: &Device,
    batches: &[usize],
    runs: usize,
    rounds: usize,
) -> Result<Vec<Row>> {
    let n = GPU_REFERENCE_N;
    let v: Vec<f32> = (0..n * n)
        .map(|i| ((i % 251) as f32 - 125.0) / 125.0)
        .collect();
    let a = Tensor::from_vec(v, (n, n), device)?;
    let b = a.t()?.contiguous()?;
    let inputs = batches
        .iter()
        .map(|&n| Ok(input(n)?.to_device(device)?))
        .collect::<Result<Vec<_>>>()?;
    let sync = || -> Result<()> { Ok(device.synchronize()?) };
    // Warm-up: kernel compilation and loading, cuBLAS heuristics, the memory pool.
    for x in &inputs {
        for _ in 0..3 {
            std::hint::black_box(model.forward(x)?);
        }
    }
    for _ in 0..3 {
        std::hint::black_box(a.matmul(&b)?);
    }
    sync()?;
    let mut reference = Vec::with_capacity(rounds);
    let mut per_row: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds); batches.len()];
    for _ in 0..rounds {
        reference.push(time_median(runs.max(10), || {
            std::hint::black_box(a.matmul(&b)?);
            sync()
        })?);
        for (x, ms) in inputs.iter().zip(per_row.iter_mut()) {
            ms.push(time_median(runs, || {
                std::hint::black_box(model.forward(x)?);
                sync()
            })?);
        }
    }
    let reference_ms = median(&mut reference);
    Ok(batches
        .iter()
        .zip(per_row.iter_mut())
        .map(|(&batch, ms)| {
            let lo = ms.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = ms.iter().copied().fold(0.0, f64::max);
            let median_ms = median(ms);
            Row {
                threads: 0,
                batch,
                median_ms,
                round_ms: [lo, hi],
                reference_ms,
                ratio: median_ms / reference_ms,
                faces_per_s: batch as f64 * 1e3 / median_ms,
            }
        })
        .collect())
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A model to time.
struct Subject {
    /// What the tables call it: its registry name when it has one, else its label.
    name: String,
    /// How baselines name it (see [`model_label`]).
    label: String,
    /// The file it was loaded from.
    path: PathBuf,
    /// What `--model` takes to time this model alone.
    arg: PathBuf,
    ckpt: Checkpoint,
}

/// The pinned model entry of the registry that `path` is a copy of: the converted copy the
/// hub keeps in its cache (`<name>-<sha256 prefix>.safetensors`), or a file with the pinned
/// size and sha256.
fn pinned_model<'a>(registry: &'a Registry, path: &Path) -> Option<&'a mfn_hub::Entry> {
    let file = path.file_name()?.to_str()?;
    let models = || registry.of_kind(Kind::Model);
    if let Some(e) = models().find(|e| {
        e.sha256
            .get(..12)
            .is_some_and(|h| file == format!("{}-{h}.safetensors", e.name))
    }) {
        return Some(e);
    }
    let len = std::fs::metadata(path).ok()?.len();
    if !models().any(|e| e.size == len) {
        return None;
    }
    let sha = mfn_hub::sha256_file(path).ok()?;
    registry
        .by_sha256(&sha)
        .filter(|e| e.kind == Kind::Model && e.sha256.eq_ignore_ascii_case(&sha))
}

/// The model as a baseline records it, the same on every machine: its path relative to the
/// assets folder when it lies inside it; for a copy of a registry model elsewhere (the
/// cache, a download), that model's path in the assets layout; else the path as given.
fn model_label(path: &Path, assets: Option<&Path>, registry: Option<&Registry>) -> String {
    let canonical = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    if let Some(root) = assets {
        if let Ok(rel) = canonical(path).strip_prefix(canonical(root)) {
            return rel.display().to_string();
        }
    }
    if let Some(e) = registry.and_then(|r| pinned_model(r, path)) {
        return e.assets.clone().unwrap_or_else(|| e.name.clone());
    }
    path.display().to_string()
}

/// The registry's name for the model labelled `label`, else the label.
fn model_name(label: &str, registry: Option<&Registry>) -> String {
    registry
        .and_then(|r| r.by_assets(label))
        .filter(|e| e.kind == Kind::Model)
        .map_or_else(|| label.to_string(), |e| e.name.clone())
}

/// The hub, looking in the assets folder first when there is one (as `cargo xtask
/// accuracy` resolves registry models).
fn hub(assets: Option<&Path>) -> Result<Hub> {
    let mut hub = Hub::from_env().context("reading the registry of pinned sources")?;
    if let Some(a) = assets {
        hub.resolver.assets = Some(a.to_path_buf());
        hub.resolver.assets_note = None;
    }
    Ok(hub)
}

/// The models to time: `--model`'s, else y1 and `w600k_mbf`.
fn subjects(models: &[PathBuf]) -> Result<Vec<Subject>> {
    let assets = crate::assets(None);
    let root = assets.as_deref().ok();
    let registry = Registry::from_env().ok();
    let mut out: Vec<Subject> = Vec::new();
    if models.is_empty() {
        let hub = hub(root)?;
        let no_assets = match (&assets, std::env::var_os(mfn_data::assets::ENV)) {
            (Ok(_), _) => String::new(),
            (Err(_), None) => format!(
                " (no assets folder to take it from: {} is not set)",
                mfn_data::assets::ENV
            ),
            (Err(_), Some(p)) => format!(
                " (no assets folder to take it from: {} is not a folder)",
                Path::new(&p).display()
            ),
        };
        // y1 from the assets folder, as ever; through the registry when the folder lacks it.
        let y1 = match root.map(|r| r.join(Y1)).filter(|p| p.is_file()) {
            Some(p) => p,
            None => hub
                .locate(Y1, None)
                .with_context(|| format!("finding y1 ({Y1}){no_assets}"))?,
        };
        let ckpt = Checkpoint::load(&y1, None, &Device::Cpu)
            .with_context(|| format!("loading {}", y1.display()))?;
        out.push(Subject {
            name: "y1".into(),
            label: Y1.into(),
            path: y1.clone(),
            arg: y1,
            ckpt,
        });
        let pretrained = hub
            .model(W600K_MBF)
            .with_context(|| format!("the registry model `{W600K_MBF}`{no_assets}"))?;
        let entry = hub.registry.get(W600K_MBF)?;
        out.push(Subject {
            name: W600K_MBF.into(),
            label: entry.assets.clone().unwrap_or_else(|| W600K_MBF.into()),
            path: pretrained.native,
            arg: pretrained.original.path,
            ckpt: pretrained.checkpoint,
        });
        return Ok(out);
    }
    for path in models {
        let label = model_label(path, root, registry.as_ref());
        if let Some(other) = out.iter().find(|s| s.label == label) {
            bail!(
                "--model {} and --model {} are the same model ({label})",
                other.path.display(),
                path.display()
            );
        }
        let ckpt = Checkpoint::load(path, None, &Device::Cpu)
            .with_context(|| format!("loading {}", path.display()))?;
        out.push(Subject {
            name: model_name(&label, registry.as_ref()),
            label,
            path: path.clone(),
            arg: path.clone(),
            ckpt,
        });
    }
    Ok(out)
}

/// The command that records the rows of `models` (all the defaults when empty) in the
/// baseline this run reads.
fn update_command(args: &Args, models: &[&Path]) -> String {
    let mut s = String::from("cargo xtask bench --update-baseline");
    for m in models {
        s.push_str(&format!(" --model {}", m.display()));
    }
    if args.device == BenchDevice::Cuda {
        s.push_str(" --device cuda");
    }
    if args.dtype != BenchDtype::F32 {
        s.push_str(&format!(" --dtype {}", args.dtype.name()));
    }
    if args.precision != BenchPrecision::F32 {
        s.push_str(&format!(" --precision {}", args.precision.name()));
    }
    if let Some(c) = &args.calib {
        s.push_str(&format!(" --calib {}", c.display()));
    }
    if let Some(b) = &args.baseline {
        s.push_str(&format!(" --baseline {}", b.display()));
    }
    if let Some(m) = &args.machine_name {
        s.push_str(&format!(" --machine {m}"));
    }
    let list = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
    if !args.threads.is_empty() {
        s.push_str(&format!(" --threads {}", list(&args.threads)));
    }
    if !args.batches.is_empty() {
        s.push_str(&format!(" --batches {}", list(&args.batches)));
    }
    s
}

/// Thread counts or batch sizes of a model: as asked, else its rows in the baseline, else
/// the rows of the baseline's other models, else `default`.
fn grid(
    asked: &[usize],
    own: Option<&ModelRows>,
    file: Option<&Baseline>,
    pick: fn(&Row) -> usize,
    default: &[usize],
) -> Vec<usize> {
    if !asked.is_empty() {
        return asked.to_vec();
    }
    let collect = |rows: &mut dyn Iterator<Item = &Row>| {
        let mut v: Vec<usize> = rows.map(pick).collect();
        v.sort_unstable();
        v.dedup();
        (!v.is_empty()).then_some(v)
    };
    own.and_then(|m| collect(&mut m.results.iter()))
        .or_else(|| file.and_then(|b| collect(&mut b.models.iter().flat_map(|m| &m.results))))
        .unwrap_or_else(|| default.to_vec())
}

/// Builds the network of `s` as `--device`, `--dtype` and `--precision` ask.
fn build(s: &Subject, device: &Device, args: &Args) -> Result<MobileFaceNet> {
    let model = s
        .ckpt
        .build_with_dtype(device, args.dtype.dtype())
        .with_context(|| format!("building {}", s.path.display()))?
        .dequantized()?;
    Ok(match args.precision {
        BenchPrecision::F32 => model,
        BenchPrecision::Int8 => match &s.ckpt.int8 {
            Some(int8) => model.quantized(int8)?,
            None => {
                let dir = match &args.calib {
                    Some(d) => d.clone(),
                    None => crate::assets(None)?.join("lfw/aligned-112x112"),
                };
                let n = mfn_model::quant::DEFAULT_CALIBRATION_IMAGES;
                eprintln!(
                    "calibrating int8 for {} on {n} faces of {}",
                    s.name,
                    dir.display()
                );
                mfn_data::calibration::quantize(
                    &model,
                    &dir,
                    n,
                    mfn_model::quant::QuantizeOptions::default(),
                    |_, _| {},
                )
                .with_context(|| format!("calibrating on {}", dir.display()))?
                .0
            }
        },
    })
}

/// Runs the benchmark.
pub fn run(args: Args) -> Result<()> {
    if args.runs == 0 || args.rounds == 0 {
        bail!("--runs and --rounds take positive numbers");
    }
    if args.threads.contains(&0) || args.batches.contains(&0) {
        bail!("--threads and --batches take positive numbers");
    }
    if let Some(t) = args.tolerance {
        if !(0.0..=10.0).contains(&t) {
            bail!("--tolerance {t}: give a fraction such as 0.15");
        }
    }
    let device = open_device(args.device)?;
    let gpu = !device.is_cpu();
    if !gpu && args.dtype != BenchDtype::F32 {
        bail!(
            "--dtype {}: reduced precision runs on --device cuda only; the CPU engine computes \
             in f32",
            args.dtype.name()
        );
    }
    if gpu && args.precision == BenchPrecision::Int8 {
        bail!("--precision int8: the int8 path is the CPU engine's; drop --device cuda");
    }
    if gpu && !args.threads.is_empty() {
        eprintln!("warning: --threads is ignored with --device cuda");
    }
    let mut machine = Machine::detect();
    let gpu_label = gpu_name(&device);
    if let Some(name) = gpu_label.as_ref().filter(|_| machine.gpus.is_empty()) {
        // No driver listing under /proc (a container): record the device CUDA reports.
        machine.gpus.push(name.clone());
    }
    let device_name = args.machine_name.clone().unwrap_or_else(|| {
        if gpu {
            format!("{}-cuda-{}", machine.slug(), args.dtype.name())
        } else if args.precision == BenchPrecision::Int8 {
            format!("{}-int8", machine.slug())
        } else {
            machine.slug()
        }
    });
    let gate = !args.no_gate;
    let baseline_path = args.baseline.clone().unwrap_or_else(|| {
        crate::workspace_root()
            .join("bench/baselines")
            .join(format!("{device_name}.json"))
    });
    let existing: Option<Baseline> = if !gate || !baseline_path.exists() {
        None
    } else if args.update_baseline {
        // Its other models' rows are kept; an unreadable file, which has none to keep, must
        // not stand in the way of replacing it.
        match read_baseline(&baseline_path) {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("warning: replacing an unreadable baseline: {e:#}");
                None
            }
        }
    } else {
        Some(read_baseline(&baseline_path)?)
    };
    if gate && !args.update_baseline && existing.is_none() {
        bail!(
            "no baseline for this device (`{device_name}`) at {}: record one with `{}`, or \
             pass --no-gate to only report",
            baseline_path.display(),
            update_command(
                &args,
                &args.model.iter().map(PathBuf::as_path).collect::<Vec<_>>()
            )
        );
    }

    let subjects = subjects(&args.model)?;
    // Each model's rows in the baseline: all of them before anything is timed.
    let mut own: Vec<Option<&ModelRows>> = Vec::with_capacity(subjects.len());
    for s in &subjects {
        let macs = s.ckpt.config.complexity().macs;
        let found = match existing.as_ref().filter(|_| !args.update_baseline) {
            Some(b) => b.find(&s.label, macs, &baseline_path)?,
            None => None,
        };
        own.push(found);
    }
    if let Some(b) = existing.as_ref().filter(|_| !args.update_baseline) {
        let missing: Vec<String> = subjects
            .iter()
            .zip(&own)
            .filter(|(_, o)| o.is_none())
            .map(|(s, _)| {
                format!(
                    "{} ({}): record its rows with `{}`",
                    s.name,
                    s.label,
                    update_command(&args, &[&s.arg])
                )
            })
            .collect();
        if !missing.is_empty() {
            bail!(
                "{} has no rows for {} of the models timed (it has {}):\n  {}",
                baseline_path.display(),
                missing.len(),
                b.models
                    .iter()
                    .map(|m| m.model.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                missing.join("\n  ")
            );
        }
        if b.machine.cpu != machine.cpu || b.machine.cores != machine.cores {
            eprintln!(
                "warning: {} was recorded on {} ({} cores), this is {} ({} cores)",
                baseline_path.display(),
                b.machine.cpu,
                b.machine.cores,
                machine.cpu,
                machine.cores
            );
        }
    }

    // The CPU's FMA peak means nothing for a GPU run.
    let peak = if gpu {
        Peak {
            isa: "FMA",
            gmacs: f64::NAN,
        }
    } else {
        fma_peak()
    };
    let layers = !args.no_layers && !gpu;
    let (reference_n, reference_where) = if gpu {
        (GPU_REFERENCE_N, "on the GPU")
    } else {
        (REFERENCE_N, "on the same threads")
    };
    println!(
        "{} ({} cores{}); {}",
        machine.cpu,
        machine.cores,
        if machine.gpus.is_empty() {
            String::new()
        } else {
            format!(", GPU {}", machine.gpus.join(", "))
        },
        if gpu {
            format!(
                "running on CUDA: {} in {}",
                gpu_label.as_deref().unwrap_or("unknown GPU"),
                args.dtype.name()
            )
        } else if peak.gmacs.is_finite() {
            format!(
                "single-core {} FMA peak {:.1} GMAC/s; {} engine",
                peak.isa,
                peak.gmacs,
                args.precision.name()
            )
        } else {
            format!(
                "single-core FMA peak unknown (no AVX-512 or AVX2/FMA); {} engine",
                args.precision.name()
            )
        }
    );

    let mut measured: Vec<Vec<Row>> = Vec::with_capacity(subjects.len());
    let mut json_rows: Vec<Value> = Vec::new();
    for (s, own) in subjects.iter().zip(&own) {
        let macs = s.ckpt.config.complexity().macs;
        let threads = if gpu {
            vec![0]
        } else {
            grid(
                &args.threads,
                *own,
                existing.as_ref(),
                |r| r.threads,
                &[1, 2],
            )
        };
        let default_batches: &[usize] = if gpu { &[1, 256, 1024] } else { &[1, 32] };
        let batches = grid(
            &args.batches,
            *own,
            existing.as_ref(),
            |r| r.batch,
            default_batches,
        );
        let model = build(s, &device, &args)?;
        println!(
            "\n{} ({}, {:.1}M MACs per face)",
            s.name,
            s.path.display(),
            macs as f64 / 1e6
        );
        println!(
            "{:>7} {:>5} {:>11} {:>9} {:>8} {:>11} {:>9}   {}",
            "threads",
            "batch",
            "ms/batch",
            "faces/s",
            "GMAC/s",
            "% f32 peak",
            "ref ratio",
            if layers {
                LayerKind::ALL.map(|k| format!("{:>9}", k.name())).join(" ")
            } else {
                String::new()
            }
        );
        let mut rows: Vec<Row> = Vec::new();
        for &t in &threads {
            let timed = if gpu {
                measure_gpu(&model, &device, &batches, args.runs, args.rounds)?
                    .into_iter()
                    .map(|r| (r, Vec::new()))
                    .collect()
            } else {
                measure_threads(&model, t, &batches, args.runs, args.rounds, layers)?
            };
            for (row, layers) in timed {
                let gmacs = macs as f64 * row.faces_per_s / 1e9;
                let pct = 100.0 * gmacs / (peak.gmacs * t as f64);
                println!(
                    "{:>7} {:>5} {:>11.3} {:>9.1} {:>8.1} {:>11} {:>9.2}   {}",
                    if gpu {
                        "gpu".to_string()
                    } else {
                        row.threads.to_string()
                    },
                    row.batch,
                    row.median_ms,
                    row.faces_per_s,
                    gmacs,
                    if pct.is_finite() {
                        format!("{pct:.1}%")
                    } else {
                        "-".into()
                    },
                    row.ratio,
                    layers
                        .iter()
                        .map(|(_, v)| format!("{v:>9.3}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
                let layer_ms: serde_json::Map<String, Value> = layers
                    .iter()
                    .map(|(k, v)| (k.name().to_string(), json!(v)))
                    .collect();
                json_rows.push(json!({
                    "engine": "mfn",
                    "model": s.label,
                    "model_name": s.name,
                    "macs": macs,
                    "threads": row.threads,
                    "batch": row.batch,
                    "median_ms": row.median_ms,
                    "round_ms": row.round_ms,
                    "faces_per_s": row.faces_per_s,
                    "gmac_per_s": gmacs,
                    "peak_gmac_per_s_per_core": peak.gmacs,
                    "peak_isa": if gpu { None } else { Some(peak.isa) },
                    "percent_of_peak": pct,
                    "reference_ms": row.reference_ms,
                    "ratio": row.ratio,
                    "layer_ms": layer_ms,
                    "machine": machine,
                    "device": device_name,
                    "backend": if gpu { "cuda" } else { "cpu" },
                    "dtype": args.dtype.name(),
                    "precision": args.precision.name(),
                    "gpu": gpu_label,
                }));
                rows.push(row);
            }
        }
        measured.push(rows);
    }
    println!();
    if layers {
        println!("(layer columns: median ms per batch spent in each kind of layer)");
    }
    if !gpu {
        println!(
            "(% f32 peak: GMAC/s over the threads times one core's {} f32 FMA peak; int8 rows \
             count int8 multiply-adds, of which a core does more per cycle than f32 FMAs, so \
             they can pass 100%)",
            peak.isa
        );
    }
    println!(
        "(ref ratio: ms per batch over the ms of a {reference_n}x{reference_n} f32 matrix \
         product {reference_where}; medians over {} rounds of {} runs)",
        args.rounds, args.runs
    );
    if let Some(path) = &args.json {
        crate::write_json(path, &json_rows)?;
    }

    if args.update_baseline {
        let tolerance = args
            .tolerance
            .or(existing.as_ref().map(|b| b.tolerance))
            .unwrap_or(DEFAULT_TOLERANCE);
        let reference = format!(
            "candle f32 matmul {reference_n}x{reference_n} by {reference_n}x{reference_n}{}",
            if gpu { " on the GPU" } else { "" }
        );
        let now = now_unix();
        let mut b = match existing {
            Some(b) => {
                let kept: Vec<&str> = b
                    .models
                    .iter()
                    .filter(|m| subjects.iter().all(|s| s.label != m.model))
                    .map(|m| m.model.as_str())
                    .collect();
                if !kept.is_empty()
                    && (b.runs != args.runs || b.rounds != args.rounds || b.reference != reference)
                {
                    eprintln!(
                        "warning: {} keeps the rows of {}, taken with {} rounds of {} runs \
                         against `{}`; these are {} rounds of {} runs against `{reference}`",
                        baseline_path.display(),
                        kept.join(", "),
                        b.rounds,
                        b.runs,
                        b.reference,
                        args.rounds,
                        args.runs
                    );
                }
                b
            }
            None => Baseline {
                device: device_name.clone(),
                machine: machine.clone(),
                tolerance,
                reference: reference.clone(),
                runs: args.runs,
                rounds: args.rounds,
                recorded_unix: now,
                models: Vec::new(),
            },
        };
        b.device = device_name;
        b.machine = machine;
        b.tolerance = tolerance;
        b.reference = reference;
        b.runs = args.runs;
        b.rounds = args.rounds;
        b.recorded_unix = now;
        for (s, rows) in subjects.iter().zip(measured) {
            b.record(ModelRows {
                model: s.label.clone(),
                macs: s.ckpt.config.complexity().macs,
                recorded_unix: now,
                results: rows,
            });
        }
        b.validate(&baseline_path)?;
        crate::write_json(&baseline_path, &b)?;
        println!(
            "baseline written to {}: rows of {} ({} models in the file)",
            baseline_path.display(),
            subjects
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            b.models.len()
        );
        return Ok(());
    }
    let Some(b) = &existing else {
        return Ok(());
    };
    let tolerance = args.tolerance.unwrap_or(b.tolerance);
    let unit = match args.metric {
        Metric::Time => "ms/batch",
        Metric::Ratio => "ref ratio",
    };
    println!(
        "gate: {unit} against {} (tolerance {:.0}%)",
        baseline_path.display(),
        tolerance * 100.0
    );
    println!(
        "{:<12} {:>7} {:>5} {:>11} {:>11} {:>8}",
        "model", "threads", "batch", "now", "baseline", "change"
    );
    let mut slower = Vec::new();
    let mut total = 0;
    for ((s, rows), base) in subjects.iter().zip(&measured).zip(&own) {
        let base = base.expect("every model's rows were found above");
        for v in gate_rows(base, rows, args.metric, tolerance, &baseline_path)? {
            total += 1;
            println!(
                "{:<12} {:>7} {:>5} {:>11.3} {:>11.3} {:>+7.1}%   {}",
                s.name,
                v.threads,
                v.batch,
                v.have,
                v.want,
                v.change * 100.0,
                if v.ok { "ok" } else { "SLOWER" }
            );
            if !v.ok {
                slower.push(format!(
                    "{} threads {} batch {}: {:.3} {unit} against {:.3} ({:+.1}%)",
                    s.name,
                    v.threads,
                    v.batch,
                    v.have,
                    v.want,
                    v.change * 100.0
                ));
            }
        }
    }
    if !slower.is_empty() {
        bail!(
            "{} of {total} rows are slower than the baseline {} by more than {:.0}%:\n  {}",
            slower.len(),
            baseline_path.display(),
            tolerance * 100.0,
            slower.join("\n  ")
        );
    }
    println!(
        "all {total} rows within {:.0}% of the baseline ({})",
        tolerance * 100.0,
        subjects
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// One row of the gate.
#[derive(Debug, PartialEq)]
struct Verdict {
    threads: usize,
    batch: usize,
    have: f64,
    want: f64,
    change: f64,
    ok: bool,
}

/// Compares a model's rows with its baseline rows; a row the baseline lacks is an error.
fn gate_rows(
    base: &ModelRows,
    rows: &[Row],
    metric: Metric,
    tolerance: f64,
    path: &Path,
) -> Result<Vec<Verdict>> {
    rows.iter()
        .map(|r| {
            let Some(b) = base
                .results
                .iter()
                .find(|x| x.threads == r.threads && x.batch == r.batch)
            else {
                bail!(
                    "{} has no row for {} threads {} batch {}: record it with --update-baseline",
                    path.display(),
                    base.model,
                    r.threads,
                    r.batch
                );
            };
            let (have, want) = (r.get(metric), b.get(metric));
            Ok(Verdict {
                threads: r.threads,
                batch: r.batch,
                have,
                want,
                change: have / want - 1.0,
                ok: have.is_finite() && have <= want * (1.0 + tolerance),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(threads: usize, batch: usize, ms: f64) -> Row {
        Row {
            threads,
            batch,
            median_ms: ms,
            round_ms: [ms, ms],
            reference_ms: 1.0,
            ratio: ms,
            faces_per_s: batch as f64 * 1e3 / ms,
        }
    }

    fn rows(model: &str, macs: u64, ms: f64) -> ModelRows {
        ModelRows {
            model: model.into(),
            macs,
            recorded_unix: 1,
            results: vec![row(1, 1, ms), row(1, 32, 32.0 * ms)],
        }
    }

    fn baseline(models: Vec<ModelRows>) -> Baseline {
        Baseline {
            device: "amd-epyc-2c".into(),
            machine: Machine {
                cpu: "AMD EPYC".into(),
                cores: 2,
                gpus: vec![],
                os: "linux-x86_64".into(),
            },
            tolerance: 0.15,
            reference: "candle f32 matmul 384x384 by 384x384".into(),
            runs: 30,
            rounds: 3,
            recorded_unix: 2,
            models,
        }
    }

    const W600K: &str = "models/w600k-mbf/w600k_mbf.onnx";

    #[test]
    fn baselines_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.json");
        let b = baseline(vec![rows(Y1, 220, 2.0), rows(W600K, 470, 3.0)]);
        crate::write_json(&path, &b).unwrap();
        assert_eq!(read_baseline(&path).unwrap(), b);
    }

    /// Rewriting a committed baseline changes no byte: floats parse to the very value
    /// they were written from (serde_json's `float_roundtrip`), so `--update-baseline`
    /// diffs show only what was measured.
    #[test]
    fn committed_baselines_rewrite_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/baselines");
        let mut seen = 0;
        for entry in std::fs::read_dir(&committed).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let out = dir.path().join(path.file_name().unwrap());
            crate::write_json(&out, &read_baseline(&path).unwrap()).unwrap();
            assert_eq!(
                std::fs::read_to_string(&out).unwrap(),
                std::fs::read_to_string(&path).unwrap(),
                "{}",
                path.display()
            );
            seen += 1;
        }
        assert!(seen >= 2, "baselines in {}: {seen}", committed.display());
    }

    #[test]
    fn single_model_files_are_read_as_one_model() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.json");
        let old = json!({
            "device": "amd-epyc-2c",
            "machine": {"cpu": "AMD EPYC", "cores": 2, "gpus": [], "os": "linux-x86_64"},
            "model": Y1,
            "macs": 220,
            "tolerance": 0.15,
            "reference": "candle f32 matmul 384x384 by 384x384",
            "runs": 30,
            "rounds": 3,
            "recorded_unix": 1,
            "results": [row(1, 1, 2.0), row(1, 32, 64.0)],
        });
        std::fs::write(&path, old.to_string()).unwrap();
        let mut want = baseline(vec![rows(Y1, 220, 2.0)]);
        want.recorded_unix = 1;
        assert_eq!(read_baseline(&path).unwrap(), want);

        // A file of neither layout is refused, naming the file.
        let mut odd = old.clone();
        odd["extra"] = json!(1);
        std::fs::write(&path, odd.to_string()).unwrap();
        let e = format!("{:#}", read_baseline(&path).unwrap_err());
        assert!(e.contains("old.json") && e.contains("older layout"), "{e}");
        let mut both = serde_json::to_value(baseline(vec![])).unwrap();
        both["results"] = json!([]);
        std::fs::write(&path, both.to_string()).unwrap();
        let e = format!("{:#}", read_baseline(&path).unwrap_err());
        assert!(e.contains("old.json") && e.contains("results"), "{e}");
    }

    #[test]
    fn unreasonable_files_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.json");
        let check = |b: &Baseline, want: &str| {
            crate::write_json(&path, b).unwrap();
            let e = format!("{:#}", read_baseline(&path).unwrap_err());
            assert!(e.contains("bad.json") && e.contains(want), "{e}");
        };
        check(
            &baseline(vec![rows(Y1, 220, 2.0), rows(Y1, 220, 2.0)]),
            "twice",
        );
        check(&baseline(vec![rows(Y1, 220, -1.0)]), "positive");
        let mut b = baseline(vec![]);
        b.tolerance = -1.0;
        check(&b, "tolerance");
        check(
            &baseline(
                (0..=MAX_BASELINE_MODELS)
                    .map(|i| rows(&i.to_string(), 1, 1.0))
                    .collect(),
            ),
            "models",
        );
        std::fs::write(&path, " ".repeat(MAX_BASELINE_BYTES as usize + 1)).unwrap();
        let e = format!("{:#}", read_baseline(&path).unwrap_err());
        assert!(e.contains("bad.json") && e.contains("larger"), "{e}");
    }

    #[test]
    fn each_model_is_gated_against_its_own_rows() {
        let path = Path::new("b.json");
        let b = baseline(vec![rows(Y1, 220, 2.0), rows(W600K, 470, 3.0)]);
        let y1 = b.find(Y1, 220, path).unwrap().unwrap();
        let w600k = b.find(W600K, 470, path).unwrap().unwrap();
        assert_eq!(y1.model, Y1);
        assert_eq!(w600k.model, W600K);
        assert!(b.find("other.onnx", 470, path).unwrap().is_none());
        // The same name with other MACs is another network, not a match.
        let e = format!("{:#}", b.find(W600K, 220, path).unwrap_err());
        assert!(
            e.contains("different network") && e.contains("b.json"),
            "{e}"
        );

        // 2.9 ms is fine against w600k_mbf's 3.0 but 45% slower than y1's 2.0.
        let now = [row(1, 1, 2.9)];
        let v = gate_rows(w600k, &now, Metric::Time, 0.15, path).unwrap();
        assert!(v[0].ok && v[0].want == 3.0);
        let v = gate_rows(y1, &now, Metric::Time, 0.15, path).unwrap();
        assert!(!v[0].ok && (v[0].change - 0.45).abs() < 1e-9);
        // A row the model's baseline lacks is an error.
        let e = format!(
            "{:#}",
            gate_rows(y1, &[row(2, 1, 1.0)], Metric::Time, 0.15, path).unwrap_err()
        );
        assert!(e.contains("threads 2 batch 1"), "{e}");
    }

    #[test]
    fn updates_keep_the_other_models() {
        let mut b = baseline(vec![rows(Y1, 220, 2.0), rows(W600K, 470, 3.0)]);
        b.record(rows(W600K, 470, 2.5));
        assert_eq!(b.models, vec![rows(Y1, 220, 2.0), rows(W600K, 470, 2.5)]);
        b.record(rows("new.onnx", 100, 1.0));
        assert_eq!(b.models.len(), 3);
        assert_eq!(b.models[0], rows(Y1, 220, 2.0));

        let mut only_y1 = baseline(vec![rows(Y1, 220, 2.0)]);
        only_y1.record(rows(W600K, 470, 3.0));
        assert_eq!(
            only_y1.models,
            baseline(vec![rows(Y1, 220, 2.0), rows(W600K, 470, 3.0)]).models
        );
    }

    #[test]
    fn grids_come_from_the_model_then_the_file() {
        let mut b = baseline(vec![rows(Y1, 220, 2.0)]);
        b.models[0].results.push(row(2, 1, 1.0));
        let threads = |own: Option<&ModelRows>, file: Option<&Baseline>| {
            grid(&[], own, file, |r| r.threads, &[1, 2, 4])
        };
        assert_eq!(threads(Some(&b.models[0]), Some(&b)), vec![1, 2]);
        assert_eq!(threads(None, Some(&b)), vec![1, 2]);
        assert_eq!(threads(None, None), vec![1, 2, 4]);
        assert_eq!(grid(&[3], None, Some(&b), |r| r.threads, &[1]), vec![3]);
    }

    #[test]
    fn labels_are_relative_to_the_assets_folder() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("models/m/x.onnx");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, b"not a model").unwrap();
        assert_eq!(
            model_label(&file, Some(dir.path()), None),
            "models/m/x.onnx"
        );
        let elsewhere = tempfile::tempdir().unwrap();
        assert_eq!(
            model_label(&file, Some(elsewhere.path()), None),
            file.display().to_string()
        );
        // The hub's converted copy of a registry model is named as that model.
        let registry = Registry::builtin().unwrap();
        let e = registry.get(W600K_MBF).unwrap();
        let copy = elsewhere
            .path()
            .join(format!("{}-{}.safetensors", e.name, &e.sha256[..12]));
        assert_eq!(model_label(&copy, None, Some(&registry)), W600K);
        assert_eq!(model_name(W600K, Some(&registry)), W600K_MBF);
        assert_eq!(model_name(Y1, Some(&registry)), "y1");
    }
}
