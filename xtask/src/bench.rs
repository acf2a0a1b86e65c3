//! `cargo xtask bench`: CPU latency and throughput of the inference path, per thread count
//! and batch size, with the time split by layer kind, gated against a committed baseline.
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
//! replaces it) or `--baseline PATH`, and fails when a row is slower than
//! its baseline by more than the tolerance: in ms per batch (`--metric time`) or in the
//! ratio to the reference (`--metric ratio`). `--update-baseline` rewrites the file with
//! this run's figures. `--json` rows use the same keys as ONNX Runtime's peer benchmark
//! (`threads`, `batch`, `median_ms`, `faces_per_s`), so the two compare directly.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
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
    /// Model [default: $MFN_ASSETS/models/mobilefacenet-y1/model-symbol.json].
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
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
    /// Rewrite the baseline with this run's figures instead of comparing.
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

/// A baseline file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Baseline {
    /// The device name of the file.
    device: String,
    /// Where the figures were taken.
    machine: Machine,
    /// The model, as given (relative to the assets folder when it is inside it).
    model: String,
    /// Its multiply-adds per face: a different network is not compared.
    macs: u64,
    /// How much slower a row may be, as a fraction.
    tolerance: f64,
    /// What the reference workload is.
    reference: String,
    runs: usize,
    rounds: usize,
    /// Seconds since the Unix epoch when the figures were taken.
    recorded_unix: u64,
    results: Vec<Row>,
}

/// One measured (threads, batch) row.
#[derive(Clone, Debug, Serialize, Deserialize)]
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

/// Single-core multiply-add peak in GMAC/s, measured with independent FMA chains.
fn fma_peak() -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn chains(iters: u64) -> f32 {
            use std::arch::x86_64::*;
            // black_box keeps the compiler from folding the whole chain into a constant.
            let a = _mm256_set1_ps(std::hint::black_box(0.999_9));
            let b = _mm256_set1_ps(std::hint::black_box(1e-4));
            let mut acc = [_mm256_set1_ps(std::hint::black_box(1.0)); 12];
            for _ in 0..iters {
                for v in acc.iter_mut() {
                    *v = _mm256_fmadd_ps(*v, a, b);
                }
            }
            let mut out = [0f32; 8];
            let mut s = _mm256_setzero_ps();
            for v in acc {
                s = _mm256_add_ps(s, v);
            }
            _mm256_storeu_ps(out.as_mut_ptr(), s);
            out.iter().sum()
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            let iters = 50_000_000u64;
            let mut best = 0f64;
            for _ in 0..3 {
                let t = Instant::now();
                // SAFETY: the CPU has AVX2 and FMA.
                let r = unsafe { chains(iters) };
                let secs = t.elapsed().as_secs_f64();
                std::hint::black_box(r);
                best = best.max((iters * 12 * 8) as f64 / secs / 1e9);
            }
            return best;
        }
    }
    f64::NAN
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

/// The model as a baseline records it: relative to the assets folder when inside it, so
/// the same file matches on every machine.
fn model_label(path: &Path) -> String {
    if let Some(root) = mfn_data::assets::root() {
        if let Ok(rel) = path.strip_prefix(&root) {
            return rel.display().to_string();
        }
    }
    path.display().to_string()
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
        // A file about to be replaced only lends its rows and tolerance; an unreadable one
        // must not stand in the way of replacing it.
        match crate::read_json(&baseline_path) {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("warning: replacing an unreadable baseline: {e:#}");
                None
            }
        }
    } else {
        Some(crate::read_json(&baseline_path)?)
    };
    if gate && !args.update_baseline && existing.is_none() {
        bail!(
            "no baseline for this device (`{device_name}`) at {}: record one with \
             `cargo xtask bench --update-baseline`, or pass --no-gate to only report",
            baseline_path.display()
        );
    }

    // Rows: as asked, else the baseline's, else the defaults.
    let from_baseline = |pick: fn(&Row) -> usize| -> Option<Vec<usize>> {
        let b = existing.as_ref()?;
        let mut v: Vec<usize> = b.results.iter().map(pick).collect();
        v.sort_unstable();
        v.dedup();
        (!v.is_empty()).then_some(v)
    };
    let threads = if gpu {
        vec![0]
    } else if args.threads.is_empty() {
        from_baseline(|r| r.threads).unwrap_or_else(|| vec![1, 2])
    } else {
        args.threads.clone()
    };
    let default_batches = if gpu { vec![1, 256, 1024] } else { vec![1, 32] };
    let batches = if args.batches.is_empty() {
        from_baseline(|r| r.batch).unwrap_or(default_batches)
    } else {
        args.batches.clone()
    };

    let model_path = match &args.model {
        Some(p) => p.clone(),
        None => crate::assets(None)?.join("models/mobilefacenet-y1/model-symbol.json"),
    };
    let ckpt = Checkpoint::load(&model_path, None, &Device::Cpu)
        .with_context(|| format!("loading {}", model_path.display()))?;
    let model = ckpt
        .build_with_dtype(&device, args.dtype.dtype())
        .with_context(|| format!("building {}", model_path.display()))?
        .dequantized()?;
    let model = match args.precision {
        BenchPrecision::F32 => model,
        BenchPrecision::Int8 => match &ckpt.int8 {
            Some(int8) => model.quantized(int8)?,
            None => {
                let dir = match &args.calib {
                    Some(d) => d.clone(),
                    None => crate::assets(None)?.join("lfw/aligned-112x112"),
                };
                let n = mfn_model::quant::DEFAULT_CALIBRATION_IMAGES;
                eprintln!("calibrating int8 on {n} faces of {}", dir.display());
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
    };
    let macs = ckpt.config.complexity().macs;
    if let Some(b) = existing.as_ref().filter(|_| !args.update_baseline) {
        if b.macs != macs {
            bail!(
                "{} is a different network ({} MACs per face) from the one {} was recorded \
                 with ({}, {} MACs): pass the same --model, or another --baseline",
                model_path.display(),
                macs,
                baseline_path.display(),
                b.model,
                b.macs
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
    let peak = if gpu { f64::NAN } else { fma_peak() };
    let layers = !args.no_layers && !gpu;
    let (reference_n, reference_where) = if gpu {
        (GPU_REFERENCE_N, "on the GPU")
    } else {
        (REFERENCE_N, "on the same threads")
    };
    println!(
        "model {} ({:.1}M MACs per face) on {} ({} cores{}); {}",
        model_path.display(),
        macs as f64 / 1e6,
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
        } else if peak.is_finite() {
            format!("single-core FMA peak {peak:.1} GMAC/s")
        } else {
            "single-core FMA peak unknown (no AVX2/FMA)".into()
        }
    );
    println!(
        "{:>7} {:>5} {:>11} {:>9} {:>8} {:>12} {:>8}   {}",
        "threads",
        "batch",
        "ms/batch",
        "faces/s",
        "GMAC/s",
        "% core peak",
        "ref ratio",
        if layers {
            LayerKind::ALL.map(|k| format!("{:>9}", k.name())).join(" ")
        } else {
            String::new()
        }
    );
    let mut rows: Vec<Row> = Vec::new();
    let mut json_rows: Vec<Value> = Vec::new();
    for &t in &threads {
        let measured = if gpu {
            measure_gpu(&model, &device, &batches, args.runs, args.rounds)?
                .into_iter()
                .map(|r| (r, Vec::new()))
                .collect()
        } else {
            measure_threads(&model, t, &batches, args.runs, args.rounds, layers)?
        };
        for (row, layers) in measured {
            let gmacs = macs as f64 * row.faces_per_s / 1e9;
            let pct = 100.0 * gmacs / (peak * t as f64);
            println!(
                "{:>7} {:>5} {:>11.3} {:>9.1} {:>8.1} {:>12} {:>9.2}   {}",
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
                "threads": row.threads,
                "batch": row.batch,
                "median_ms": row.median_ms,
                "round_ms": row.round_ms,
                "faces_per_s": row.faces_per_s,
                "gmac_per_s": gmacs,
                "peak_gmac_per_s_per_core": peak,
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
    if layers {
        println!("(layer columns: median ms per batch spent in each kind of layer)");
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
        let b = Baseline {
            device: device_name,
            machine,
            model: model_label(&model_path),
            macs,
            tolerance,
            reference: format!(
                "candle f32 matmul {reference_n}x{reference_n} by {reference_n}x{reference_n}{}",
                if gpu { " on the GPU" } else { "" }
            ),
            runs: args.runs,
            rounds: args.rounds,
            recorded_unix: now_unix(),
            results: rows,
        };
        crate::write_json(&baseline_path, &b)?;
        println!("baseline written to {}", baseline_path.display());
        return Ok(());
    }
    match &existing {
        Some(b) => compare(
            b,
            &rows,
            args.metric,
            args.tolerance.unwrap_or(b.tolerance),
            &baseline_path,
        ),
        None => Ok(()),
    }
}

fn compare(b: &Baseline, rows: &[Row], metric: Metric, tolerance: f64, path: &Path) -> Result<()> {
    let unit = match metric {
        Metric::Time => "ms/batch",
        Metric::Ratio => "ref ratio",
    };
    println!(
        "\ngate: {unit} against {} (tolerance {:.0}%)",
        path.display(),
        tolerance * 100.0
    );
    println!(
        "{:>7} {:>5} {:>11} {:>11} {:>8}",
        "threads", "batch", "now", "baseline", "change"
    );
    let mut slower = Vec::new();
    for r in rows {
        let Some(base) = b
            .results
            .iter()
            .find(|x| x.threads == r.threads && x.batch == r.batch)
        else {
            bail!(
                "{} has no row for threads {} batch {}: record it with --update-baseline",
                path.display(),
                r.threads,
                r.batch
            );
        };
        let (have, want) = (r.get(metric), base.get(metric));
        let change = have / want - 1.0;
        let ok = have.is_finite() && have <= want * (1.0 + tolerance);
        println!(
            "{:>7} {:>5} {:>11.3} {:>11.3} {:>+7.1}%   {}",
            r.threads,
            r.batch,
            have,
            want,
            change * 100.0,
            if ok { "ok" } else { "SLOWER" }
        );
        if !ok {
            slower.push(format!(
                "threads {} batch {}: {have:.3} {unit} against {want:.3} ({:+.1}%)",
                r.threads,
                r.batch,
                change * 100.0
            ));
        }
    }
    if !slower.is_empty() {
        bail!(
            "{} of {} rows are slower than the baseline {} by more than {:.0}%:\n  {}",
            slower.len(),
            rows.len(),
            path.display(),
            tolerance * 100.0,
            slower.join("\n  ")
        );
    }
    println!(
        "all {} rows within {:.0}% of the baseline",
        rows.len(),
        tolerance * 100.0
    );
    Ok(())
}
