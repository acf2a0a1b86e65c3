//! `cargo xtask bench-depthwise`: the training depthwise conv, forward and backward, as the
//! native op (`mfn_model::depthwise_conv2d`) and as candle's grouped `conv2d`, on the
//! depthwise layers of MobileFaceNet at one batch size: the time of each and whether they
//! agree. With `--device cuda` (a build with `--features cuda`) the native op runs the CUDA
//! kernels, and both are also checked against the native CPU op; then a whole training
//! step of the network (forward with batch statistics, backward) runs on the GPU and on
//! the CPU from the same weights, and every gradient is compared.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use mfn_model::{Config, MobileFaceNet};
use serde_json::{json, Value};

use crate::bench::{gpu_name, open_device, BenchDevice};

/// Arguments of `cargo xtask bench-depthwise`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where the ops run.
    #[arg(long, value_enum, default_value_t = BenchDevice::Cpu)]
    device: BenchDevice,
    /// Images per batch [default: 16 on the CPU, 128 on a GPU].
    #[arg(long)]
    batch: Option<usize>,
    /// Timed forward + backward passes per op and layer (after one warm-up pass).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Skip candle's grouped conv (very slow on the CPU at 256 channels and more).
    #[arg(long)]
    no_candle: bool,
    /// Skip the whole-network gradient check on the GPU.
    #[arg(long)]
    no_graph: bool,
    /// Write the results as JSON.
    #[arg(long, value_name = "OUT")]
    json: Option<PathBuf>,
}

/// A depthwise layer of MobileFaceNet's training graph at 112x112.
struct Layer {
    name: &'static str,
    channels: usize,
    size: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
}

const LAYERS: [Layer; 8] = [
    Layer {
        name: "conv_2_dw",
        channels: 64,
        size: 56,
        kernel: 3,
        stride: 1,
        pad: 1,
    },
    Layer {
        name: "dconv_23",
        channels: 128,
        size: 56,
        kernel: 3,
        stride: 2,
        pad: 1,
    },
    Layer {
        name: "res_3",
        channels: 128,
        size: 28,
        kernel: 3,
        stride: 1,
        pad: 1,
    },
    Layer {
        name: "dconv_34",
        channels: 256,
        size: 28,
        kernel: 3,
        stride: 2,
        pad: 1,
    },
    Layer {
        name: "res_4",
        channels: 256,
        size: 14,
        kernel: 3,
        stride: 1,
        pad: 1,
    },
    Layer {
        name: "dconv_45",
        channels: 512,
        size: 14,
        kernel: 3,
        stride: 2,
        pad: 1,
    },
    Layer {
        name: "res_5",
        channels: 256,
        size: 7,
        kernel: 3,
        stride: 1,
        pad: 1,
    },
    Layer {
        name: "conv_6dw7_7",
        channels: 512,
        size: 7,
        kernel: 7,
        stride: 1,
        pad: 0,
    },
];

/// Deterministic values in about -1..1.
fn noise(shape: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

fn max_abs(t: &Tensor) -> Result<f32> {
    Ok(t.abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F32)?
        .to_scalar()?)
}

/// Largest difference relative to the largest magnitude of `want`, on the CPU.
fn rel_diff(got: &Tensor, want: &Tensor) -> Result<f32> {
    let (got, want) = (got.to_device(&Device::Cpu)?, want.to_device(&Device::Cpu)?);
    if got.dims() != want.dims() {
        bail!("shapes {:?} and {:?} differ", got.dims(), want.dims());
    }
    Ok(max_abs(&(&got - &want)?)? / max_abs(&want)?.max(1e-12))
}

/// `y`, `dx`, `dw` of `sum(conv(x, w) * r)`.
fn step(
    x: &Tensor,
    w: &Tensor,
    r: &Tensor,
    conv: &dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> Result<[Tensor; 3]> {
    let xv = Var::from_tensor(x)?;
    let wv = Var::from_tensor(w)?;
    let y = conv(xv.as_tensor(), wv.as_tensor())?;
    let grads = (&y * r)?.sum_all()?.backward()?;
    let dx = grads.get(xv.as_tensor()).cloned();
    let dw = grads.get(wv.as_tensor()).cloned();
    match (dx, dw) {
        (Some(dx), Some(dw)) => Ok([y, dx, dw]),
        _ => bail!("a gradient is missing"),
    }
}

/// Median ms of `runs` passes of `step` after one warm-up, each to the end of its kernels.
fn time(
    device: &Device,
    runs: usize,
    mut f: impl FnMut() -> Result<[Tensor; 3]>,
) -> Result<(f64, [Tensor; 3])> {
    let out = f()?;
    device.synchronize()?;
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        std::hint::black_box(f()?);
        device.synchronize()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok((ms[ms.len() / 2], out))
}

/// Runs the comparison.
pub fn run(args: Args) -> Result<()> {
    if args.runs == 0 || args.batch == Some(0) {
        bail!("--runs and --batch take positive numbers");
    }
    let device = open_device(args.device)?;
    let gpu = !device.is_cpu();
    let batch = args.batch.unwrap_or(if gpu { 128 } else { 16 });
    println!(
        "depthwise conv, forward + backward, batch {batch}, on {}",
        if gpu {
            gpu_name(&device).unwrap_or_else(|| "a CUDA GPU".into())
        } else {
            "the CPU".into()
        }
    );
    println!(
        "{:<12} {:>18} {:>10} {:>10} {:>8}   max rel diff (y, dx, dw)",
        "layer", "input", "native ms", "candle ms", "speedup"
    );
    let mut rows: Vec<Value> = Vec::new();
    let mut worst = 0f32;
    for (i, l) in LAYERS.iter().enumerate() {
        let seed = 10 * i as u64;
        let dims = [batch, l.channels, l.size, l.size];
        let x = noise(&dims, seed + 1, &device)?;
        let w = noise(&[l.channels, 1, l.kernel, l.kernel], seed + 2, &device)?;
        let out = (l.size + 2 * l.pad - l.kernel) / l.stride + 1;
        let r = noise(&[batch, l.channels, out, out], seed + 3, &device)?;
        let (stride, pad, c) = (l.stride, l.pad, l.channels);
        let native = |x: &Tensor, w: &Tensor| mfn_model::depthwise_conv2d(x, w, stride, [pad, pad]);
        let grouped = |x: &Tensor, w: &Tensor| x.conv2d(w, pad, stride, 1, c);
        let (native_ms, got) = time(&device, args.runs, || step(&x, &w, &r, &native))?;
        let mut candle_ms = f64::NAN;
        let mut diffs: Vec<(String, [f32; 3])> = Vec::new();
        if !args.no_candle {
            let (ms, want) = time(&device, args.runs, || step(&x, &w, &r, &grouped))?;
            candle_ms = ms;
            let mut d = [0f32; 3];
            for k in 0..3 {
                d[k] = rel_diff(&got[k], &want[k])?;
            }
            diffs.push(("candle".into(), d));
        }
        if gpu {
            // The native CPU op on the same numbers: the CUDA kernels' reference.
            let cpu = Device::Cpu;
            let [xc, wc, rc] = [&x, &w, &r].map(|t| t.to_device(&cpu));
            let want = step(&xc?, &wc?, &rc?, &native)?;
            let mut d = [0f32; 3];
            for k in 0..3 {
                d[k] = rel_diff(&got[k], &want[k])?;
            }
            diffs.push(("cpu".into(), d));
        }
        for (_, d) in &diffs {
            worst = d.iter().copied().fold(worst, f32::max);
        }
        println!(
            "{:<12} {:>18} {:>10.3} {:>10} {:>8}   {}",
            l.name,
            format!("{dims:?}"),
            native_ms,
            if candle_ms.is_finite() {
                format!("{candle_ms:.3}")
            } else {
                "-".into()
            },
            if candle_ms.is_finite() {
                format!("{:.1}x", candle_ms / native_ms)
            } else {
                "-".into()
            },
            diffs
                .iter()
                .map(|(what, d)| format!("{what}: {:.1e} {:.1e} {:.1e}", d[0], d[1], d[2]))
                .collect::<Vec<_>>()
                .join("; ")
        );
        rows.push(json!({
            "layer": l.name,
            "input": dims,
            "kernel": l.kernel,
            "stride": l.stride,
            "pad": l.pad,
            "native_ms": native_ms,
            "candle_ms": if candle_ms.is_finite() { json!(candle_ms) } else { Value::Null },
            "max_rel_diff": diffs.iter().map(|(what, d)| (what.clone(), json!(d))).collect::<serde_json::Map<_, _>>(),
        }));
    }
    let graph = if gpu && !args.no_graph {
        Some(graph_check(&device, batch)?)
    } else {
        None
    };
    if let Some(path) = &args.json {
        crate::write_json(
            path,
            &json!({
                "device": if gpu { "cuda" } else { "cpu" },
                "gpu": gpu_name(&device),
                "machine": crate::machine::Machine::detect(),
                "batch": batch,
                "runs": args.runs,
                "layers": rows,
                "graph": graph,
            }),
        )?;
    }
    // f32 sums in another order: a few ulps of the largest values, far below 1e-4.
    if worst > 1e-4 {
        bail!("the native op and a reference differ by {worst:.2e} (relative), above 1e-4");
    }
    println!("all layers agree within {worst:.1e} (relative to the largest value)");
    Ok(())
}

/// One training step of the paper network on the GPU and on the CPU from the same weights:
/// the loss and every gradient must agree. Returns the figures as JSON.
fn graph_check(device: &Device, batch: usize) -> Result<Value> {
    let config = Config::paper();
    let cpu = Device::Cpu;
    let build = |d: &Device| -> Result<(VarMap, MobileFaceNet)> {
        let map = VarMap::new();
        let model = MobileFaceNet::new(&config, VarBuilder::from_varmap(&map, DType::F32, d))?;
        Ok((map, model))
    };
    let (cpu_map, cpu_model) = build(&cpu)?;
    let (gpu_map, gpu_model) = build(device)?;
    let mut names: Vec<String> = cpu_map.data().lock().unwrap().keys().cloned().collect();
    names.sort();
    // He-scaled deterministic weights; PReLU slopes of 1 keep the network smooth, so that
    // rounding-level differences cannot flip an activation across its kink.
    for (i, name) in names.iter().enumerate() {
        let cpu_var = cpu_map.data().lock().unwrap()[name].clone();
        let t = cpu_var.as_tensor();
        let value = if name.ends_with("_relu_gamma") {
            t.ones_like()?
        } else if t.rank() > 1 {
            let fan_in = t.elem_count() / t.dim(0)?;
            let gain = (if t.rank() == 4 { 2.0 } else { 1.0 } * 3.0 / fan_in as f64).sqrt();
            (noise(t.dims(), 100 + i as u64, &cpu)? * gain)?
        } else {
            t.clone()
        };
        cpu_var.set(&value)?;
        gpu_map.data().lock().unwrap()[name].set(&value.to_device(device)?)?;
    }
    let [h, w] = config.input_size;
    let n = batch.min(32);
    let x = ((noise(&[n, 3, h, w], 40, &cpu)? + 1.0)? * 127.5)?;
    let r = noise(&[n, config.embedding_size], 41, &cpu)?;
    let run =
        |model: &MobileFaceNet, d: &Device| -> Result<(f32, candle_core::backprop::GradStore)> {
            let y = model.forward_graph(&x.to_device(d)?, true)?;
            let loss = (&y * &r.to_device(d)?)?.sum_all()?;
            let grads = loss.backward()?;
            Ok((loss.to_dtype(DType::F32)?.to_scalar()?, grads))
        };
    let (cpu_loss, cpu_grads) = run(&cpu_model, &cpu)?;
    let (gpu_loss, gpu_grads) = run(&gpu_model, device)?;
    let mut pairs = Vec::new();
    for name in &names {
        let cv = cpu_map.data().lock().unwrap()[name].clone();
        let gv = gpu_map.data().lock().unwrap()[name].clone();
        match (cpu_grads.get(cv.as_tensor()), gpu_grads.get(gv.as_tensor())) {
            (Some(want), Some(got)) => {
                pairs.push((name.clone(), got.to_device(&cpu)?, want.clone()))
            }
            (None, None) => {}
            _ => bail!("{name}: a gradient on one device only"),
        }
    }
    let mut global = 0f32;
    for (_, _, want) in &pairs {
        global = global.max(max_abs(want)?);
    }
    let mut worst = (String::new(), 0f32);
    for (name, got, want) in &pairs {
        let diff = max_abs(&(got - want)?)?;
        // Train-mode BatchNorm cancels constant shifts: those gradients are rounding noise,
        // so each is measured against the larger of its own scale and 1% of the largest.
        let scale = max_abs(want)?.max(1e-2 * global);
        if diff / scale > worst.1 {
            worst = (name.clone(), diff / scale);
        }
    }
    // Time the step on the GPU at the full batch.
    let xb = ((noise(&[batch, 3, h, w], 42, device)? + 1.0)? * 127.5)?;
    let rb = noise(&[batch, config.embedding_size], 43, device)?;
    let mut ms = Vec::new();
    for i in 0..4 {
        let t = Instant::now();
        let y = gpu_model.forward_graph(&xb, true)?;
        std::hint::black_box((&y * &rb)?.sum_all()?.backward()?);
        device.synchronize()?;
        if i > 0 {
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    ms.sort_by(f64::total_cmp);
    let step_ms = ms[ms.len() / 2];
    let loss_diff = (gpu_loss - cpu_loss).abs() / cpu_loss.abs().max(1e-6);
    println!(
        "\ntraining step of the paper network, {n} images, GPU against CPU: loss {gpu_loss:.6} \
         vs {cpu_loss:.6} (rel {loss_diff:.1e}); {} gradients, worst {} at {:.1e} of its scale",
        pairs.len(),
        worst.0,
        worst.1
    );
    println!(
        "training step (forward with batch statistics + backward) on the GPU, batch {batch}: \
         {step_ms:.2} ms, {:.0} images/s",
        batch as f64 * 1e3 / step_ms
    );
    if loss_diff > 1e-4 || worst.1 > 1e-3 {
        bail!(
            "GPU and CPU training steps disagree: loss rel {loss_diff:.2e}, {} at {:.2e}",
            worst.0,
            worst.1
        );
    }
    Ok(json!({
        "check_images": n,
        "loss_cpu": cpu_loss,
        "loss_gpu": gpu_loss,
        "gradients": pairs.len(),
        "worst_gradient": worst.0,
        "worst_rel_diff": worst.1,
        "step_batch": batch,
        "step_ms": step_ms,
    }))
}
