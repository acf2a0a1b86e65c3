//! `cargo xtask bench`: CPU latency and throughput of the inference path, per thread count
//! and batch size, with the time split by layer kind.
//!
//! Speed is reported, never asserted. Rows written with `--json` use the same keys as
//! ONNX Runtime's peer benchmark (`threads`, `batch`, `median_ms`, `faces_per_s`), so the
//! two compare directly.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use mfn_model::{Checkpoint, LayerKind, LayerTimes, MobileFaceNet};
use serde_json::{json, Value};

struct Options {
    model: Option<PathBuf>,
    threads: Vec<usize>,
    batches: Vec<usize>,
    runs: usize,
    json: Option<PathBuf>,
}

fn list(s: &str, flag: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|p| {
            p.trim()
                .parse::<usize>()
                .ok()
                .filter(|v| *v > 0)
                .with_context(|| {
                    format!("{flag} takes positive numbers separated by commas, got `{s}`")
                })
        })
        .collect()
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        model: None,
        threads: vec![1, 2],
        batches: vec![1, 32],
        runs: 30,
        json: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--model" => o.model = Some(PathBuf::from(value()?)),
            "--threads" => o.threads = list(value()?, "--threads")?,
            "--batches" => o.batches = list(value()?, "--batches")?,
            "--runs" => {
                o.runs = value()?
                    .parse()
                    .ok()
                    .filter(|r| *r > 0)
                    .context("--runs takes a positive number")?
            }
            "--json" => o.json = Some(PathBuf::from(value()?)),
            other => bail!("unknown argument `{other}`"),
        }
    }
    Ok(o)
}

fn median(v: &mut [f64]) -> f64 {
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

fn time_one(
    model: &MobileFaceNet,
    x: &Tensor,
    runs: usize,
) -> Result<(f64, Vec<(LayerKind, f64)>)> {
    for _ in 0..3 {
        model.forward(x)?;
    }
    let mut total = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        std::hint::black_box(model.forward(x)?);
        total.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut per_kind: Vec<Vec<f64>> = vec![Vec::new(); LayerKind::ALL.len()];
    for _ in 0..runs.min(10) {
        let (_, times): (_, LayerTimes) = model.forward_timed(x)?;
        for (i, k) in LayerKind::ALL.iter().enumerate() {
            per_kind[i].push(times.get(k).map_or(0.0, |d| d.as_secs_f64() * 1e3));
        }
    }
    let layers = LayerKind::ALL
        .iter()
        .zip(per_kind.iter_mut())
        .map(|(k, v)| (*k, median(v)))
        .collect();
    Ok((median(&mut total), layers))
}

/// Runs the benchmark.
pub fn run(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let model_path = match o.model {
        Some(p) => p,
        None => crate::assets()?.join("models/mobilefacenet-y1/model-symbol.json"),
    };
    let device = Device::Cpu;
    let ckpt = Checkpoint::load(&model_path, None, &device)
        .with_context(|| format!("loading {}", model_path.display()))?;
    let model = ckpt.build(&device)?;
    let macs = ckpt.config.complexity().macs as f64;
    let peak = fma_peak();
    println!(
        "model {} ({:.1}M MACs per face); single-core FMA peak {peak:.1} GMAC/s",
        model_path.display(),
        macs / 1e6
    );
    println!(
        "{:>7} {:>5} {:>11} {:>9} {:>8} {:>12}   {}",
        "threads",
        "batch",
        "ms/batch",
        "faces/s",
        "GMAC/s",
        "% core peak",
        LayerKind::ALL.map(|k| format!("{:>9}", k.name())).join(" ")
    );
    let mut rows: Vec<Value> = Vec::new();
    for &threads in &o.threads {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .context("building a thread pool")?;
        for &batch in &o.batches {
            let x = input(batch)?;
            let (ms, layers) = pool.install(|| time_one(&model, &x, o.runs))?;
            let faces = batch as f64 * 1e3 / ms;
            let gmacs = macs * faces / 1e9;
            let pct = 100.0 * gmacs / (peak * threads as f64);
            println!(
                "{threads:>7} {batch:>5} {ms:>11.3} {faces:>9.1} {gmacs:>8.1} {pct:>11.1}%   {}",
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
            rows.push(json!({
                "engine": "mfn",
                "threads": threads,
                "batch": batch,
                "median_ms": ms,
                "faces_per_s": faces,
                "gmac_per_s": gmacs,
                "peak_gmac_per_s_per_core": peak,
                "percent_of_peak": pct,
                "layer_ms": layer_ms,
            }));
        }
    }
    println!("(layer columns: median ms per batch spent in each kind of layer)");
    if let Some(path) = &o.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
