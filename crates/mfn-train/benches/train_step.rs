//! Images per second of one training step (forward in train mode, ArcFace loss, backward,
//! SGD update) on random faces, for the paper's MobileFaceNet and a half-width one.
//!
//! `cargo bench -p mfn-train --bench train_step [-- BATCH [STEPS]]`

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use mfn_loss::{CombinedMargin, MarginHead};
use mfn_model::{Config, MobileFaceNet};
use mfn_train::{Optimizer, OptimizerKind, WeightDecay};

// As in `mfn-cli`: without it, page faults on freshly allocated activations dominate.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let batch: usize = args.first().map_or(Ok(64), |s| s.parse())?;
    let steps: usize = args.get(1).map_or(Ok(5), |s| s.parse())?;
    let device = Device::Cpu;
    println!(
        "{:<12} {:>6} {:>10} {:>10} {:>10} {:>10} {:>9}",
        "model", "batch", "forward", "backward", "update", "step", "images/s"
    );
    for config in [Config::paper(), Config::paper().with_width(0.5)] {
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &device);
        let model = MobileFaceNet::new(&config, vb.clone())?;
        let head = MarginHead::new(
            vb.pp("head"),
            1000,
            128,
            1,
            CombinedMargin::arcface(64.0, 0.5),
        )?;
        let params = vars
            .data()
            .lock()
            .map_err(|_| "poisoned")?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Vec<_>>();
        let mut opt = Optimizer::new(
            OptimizerKind::Sgd { momentum: 0.9 },
            WeightDecay::default(),
            params,
        )?;
        let x = (Tensor::rand(0f32, 255f32, (batch, 3, 112, 112), &device)?).detach();
        let labels = Tensor::from_vec(
            (0..batch as u32).map(|i| i % 1000).collect::<Vec<_>>(),
            batch,
            &device,
        )?;
        let (mut fwd, mut bwd, mut upd, mut all) = (vec![], vec![], vec![], vec![]);
        for i in 0..steps + 1 {
            let t0 = Instant::now();
            let loss = head.loss(&model.forward_t(&x, true)?, &labels)?;
            let t1 = Instant::now();
            let grads = loss.backward()?;
            let t2 = Instant::now();
            opt.step(&grads, 0.01)?;
            let t3 = Instant::now();
            if i > 0 {
                // The first step warms up allocations and caches.
                fwd.push(t1 - t0);
                bwd.push(t2 - t1);
                upd.push(t3 - t2);
                all.push(t3 - t0);
            }
        }
        let step = median(all);
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
        println!(
            "{:<12} {:>6} {:>10} {:>10} {:>10} {:>10} {:>9.1}",
            config.name,
            batch,
            ms(median(fwd)),
            ms(median(bwd)),
            ms(median(upd)),
            ms(step),
            batch as f64 / step.as_secs_f64()
        );
    }
    Ok(())
}
