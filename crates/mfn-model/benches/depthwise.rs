//! Forward and backward time of a depthwise conv: candle's grouped `conv2d` against
//! `mfn_model::depthwise_conv2d`, on the shapes MobileFaceNet trains with.
//!
//! `cargo bench -p mfn-model --bench depthwise`. candle's backward takes seconds on the
//! large batches, so its runs stop once a time budget is spent.

use std::time::{Duration, Instant};

use candle_core::{Device, Result, Tensor, Var};

/// Forward, backward and their sum, in seconds.
type Times = [f64; 3];

/// One forward and backward pass; gradients flow to both the input and the weights.
fn pass(x: &Var, w: &Var, conv: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>) -> Result<Times> {
    let t0 = Instant::now();
    let y = conv(x.as_tensor(), w.as_tensor())?;
    let t1 = Instant::now();
    let grads = y.backward()?;
    let t2 = Instant::now();
    std::hint::black_box((grads.get(x.as_tensor()), grads.get(w.as_tensor())));
    Ok([t1 - t0, t2 - t1, t2 - t0].map(|d| d.as_secs_f64()))
}

/// Median times after one warm-up pass, over at most `max_runs` passes or until `budget`
/// is spent; a warm-up slower than the budget is the only sample.
fn measure(
    x: &Var,
    w: &Var,
    max_runs: usize,
    budget: Duration,
    conv: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<(Times, usize)> {
    let start = Instant::now();
    let warm = pass(x, w, conv)?;
    let mut samples = Vec::new();
    if start.elapsed() > budget {
        samples.push(warm);
    } else {
        let start = Instant::now();
        while samples.len() < max_runs && (samples.is_empty() || start.elapsed() < budget) {
            samples.push(pass(x, w, conv)?);
        }
    }
    let median = |i: usize| {
        let mut v: Vec<f64> = samples.iter().map(|s| s[i]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(([median(0), median(1), median(2)], samples.len()))
}

fn main() -> Result<()> {
    let device = Device::Cpu;
    let cases: [(&str, [usize; 4], usize, usize, usize); 4] = [
        ("1x128x56x56 3x3 s1", [1, 128, 56, 56], 3, 1, 1),
        ("64x128x56x56 3x3 s1", [64, 128, 56, 56], 3, 1, 1),
        ("64x256x14x14 3x3 s2", [64, 256, 14, 14], 3, 2, 1),
        ("64x512x7x7 7x7 GDConv", [64, 512, 7, 7], 7, 1, 0),
    ];
    println!(
        "threads: {}; times in ms (median), speedup = candle / native",
        rayon::current_num_threads()
    );
    println!(
        "{:<24} {:>6} | {:>10} {:>9} {:>8} | {:>10} {:>9} {:>8} | {:>10} {:>9} {:>8}",
        "case",
        "runs",
        "candle fwd",
        "ours fwd",
        "speedup",
        "candle bwd",
        "ours bwd",
        "speedup",
        "candle f+b",
        "ours f+b",
        "speedup"
    );
    for (name, dims, k, stride, pad) in cases {
        let c = dims[1];
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, &dims[..], &device)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.3, (c, 1, k, k), &device)?)?;
        let (ours, ours_runs) = measure(&x, &w, 15, Duration::from_secs(3), &|x, w| {
            mfn_model::depthwise_conv2d(x, w, stride, [pad, pad])
        })?;
        let (candle, candle_runs) = measure(&x, &w, 5, Duration::from_secs(20), &|x, w| {
            x.conv2d(w, pad, stride, 1, c)
        })?;
        let ms = |s: f64| format!("{:.2}", s * 1e3);
        let ratio = |i: usize| format!("{:.1}x", candle[i] / ours[i]);
        println!(
            "{:<24} {:>6} | {:>10} {:>9} {:>8} | {:>10} {:>9} {:>8} | {:>10} {:>9} {:>8}",
            name,
            format!("{candle_runs}/{ours_runs}"),
            ms(candle[0]),
            ms(ours[0]),
            ratio(0),
            ms(candle[1]),
            ms(ours[1]),
            ratio(1),
            ms(candle[2]),
            ms(ours[2]),
            ratio(2),
        );
    }
    Ok(())
}
