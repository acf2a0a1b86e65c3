//! Training batches: shuffled per epoch, randomly mirrored, decoded in parallel and
//! prefetched on a background thread while the model computes.
//!
//! The order and the flips of every epoch follow from the seed and the epoch number alone,
//! so a run resumed at step `s` sees exactly the batches an uninterrupted run sees.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use mfn_data::Dataset;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::{Error, Result};

/// One step's images and labels.
#[derive(Debug)]
pub struct TrainBatch {
    /// The step it is for (0-based).
    pub step: usize,
    /// `[n, 3, H, W]` RGB pixels in `0..=255`.
    pub images: Tensor,
    /// `[n]` class indices (u32).
    pub labels: Tensor,
}

/// How batches are drawn.
#[derive(Clone, Debug)]
pub struct BatchPlan {
    /// Images per step; the last partial batch of an epoch is dropped, so that every
    /// BatchNorm step sees the same number of images.
    pub batch_size: usize,
    /// Seed of the shuffles and flips.
    pub seed: u64,
    /// Whether to mirror each image with probability 1/2.
    pub flip: bool,
    /// Width and height every image must have.
    pub size: [usize; 2],
}

impl BatchPlan {
    /// Full batches per epoch of `len` images.
    pub fn steps_per_epoch(&self, len: usize) -> usize {
        len / self.batch_size.max(1)
    }

    /// The order and flips of `epoch`.
    pub fn epoch(&self, len: usize, epoch: usize) -> (Vec<usize>, Vec<bool>) {
        // Mixing the epoch into the seed (rather than drawing epochs in sequence) lets a
        // resumed run jump straight to its epoch.
        let mut rng = ChaCha8Rng::seed_from_u64(
            self.seed ^ (epoch as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        let mut order: Vec<usize> = (0..len).collect();
        order.shuffle(&mut rng);
        let flips = (0..len)
            .map(|_| self.flip && rng.random_bool(0.5))
            .collect();
        (order, flips)
    }
}

/// An endless iterator of [`TrainBatch`]es from `start_step` on, decoded ahead of time.
pub struct TrainBatches {
    rx: Receiver<Result<TrainBatch>>,
    worker: Option<JoinHandle<()>>,
}

impl TrainBatches {
    /// Starts decoding. At most `prefetch` batches wait decoded.
    pub fn new(
        dataset: Arc<dyn Dataset + Send + Sync>,
        plan: BatchPlan,
        start_step: usize,
        prefetch: usize,
        device: Device,
    ) -> Result<Self> {
        let len = dataset.len();
        let per_epoch = plan.steps_per_epoch(len);
        if plan.batch_size == 0 || per_epoch == 0 {
            return Err(Error::Config(format!(
                "batch size {} does not fit a data set of {len} images",
                plan.batch_size
            )));
        }
        let (tx, rx) = sync_channel(prefetch.max(1));
        let worker = std::thread::spawn(move || {
            let mut current: Option<(usize, Vec<usize>, Vec<bool>)> = None;
            for step in start_step.. {
                let epoch = step / per_epoch;
                if current.as_ref().map(|c| c.0) != Some(epoch) {
                    let (order, flips) = plan.epoch(len, epoch);
                    current = Some((epoch, order, flips));
                }
                let (_, order, flips) = current.as_ref().expect("set just above");
                let at = (step % per_epoch) * plan.batch_size;
                let picks: Vec<(usize, bool)> = order[at..at + plan.batch_size]
                    .iter()
                    .zip(&flips[at..at + plan.batch_size])
                    .map(|(&i, &f)| (i, f))
                    .collect();
                let batch =
                    build(&*dataset, &picks, &plan, &device).map(|(images, labels)| TrainBatch {
                        step,
                        images,
                        labels,
                    });
                let failed = batch.is_err();
                if tx.send(batch).is_err() || failed {
                    return;
                }
            }
        });
        Ok(Self {
            rx,
            worker: Some(worker),
        })
    }
}

fn build(
    dataset: &(dyn Dataset + Send + Sync),
    picks: &[(usize, bool)],
    plan: &BatchPlan,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let [w, h] = plan.size;
    let plane = w * h;
    let images: Vec<(Vec<f32>, u32)> = picks
        .par_iter()
        .map(|&(index, flip)| {
            let (img, class) = dataset.get(index)?;
            if img.width() as usize != w || img.height() as usize != h {
                return Err(Error::Sample {
                    index,
                    message: format!(
                        "{}x{} pixels, the model takes {w}x{h} aligned faces",
                        img.width(),
                        img.height()
                    ),
                });
            }
            let mut chw = vec![0f32; 3 * plane];
            for (x, y, px) in img.enumerate_pixels() {
                let x = if flip { w - 1 - x as usize } else { x as usize };
                let at = y as usize * w + x;
                for c in 0..3 {
                    chw[c * plane + at] = px.0[c] as f32;
                }
            }
            Ok((chw, class as u32))
        })
        .collect::<Result<_>>()?;
    let n = images.len();
    let mut pixels = Vec::with_capacity(n * 3 * plane);
    let mut labels = Vec::with_capacity(n);
    for (p, l) in images {
        pixels.extend_from_slice(&p);
        labels.push(l);
    }
    Ok((
        Tensor::from_vec(pixels, (n, 3, h, w), device)?,
        Tensor::from_vec(labels, n, device)?,
    ))
}

impl Iterator for TrainBatches {
    type Item = Result<TrainBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.rx.recv().ok()
    }
}

impl Drop for TrainBatches {
    fn drop(&mut self) {
        // Hanging up makes the worker's next send fail, so it stops; join it so no
        // decoding outlives the run.
        let (_, dead) = sync_channel(1);
        drop(std::mem::replace(&mut self.rx, dead));
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
