//! Batches decoded on a background thread while the caller runs the model on the previous
//! one.

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};

use crate::image::load_batch;
use crate::Result;

/// One batch: the position of its first image in the path list, and the pixels.
#[derive(Debug)]
pub struct Batch {
    /// Index of the batch's first image in the list the loader was given.
    pub start: usize,
    /// `[n, 3, H, W]` RGB pixels in `0..=255`.
    pub images: Tensor,
}

/// An iterator of [`Batch`]es decoded ahead of time.
///
/// Up to `prefetch` batches wait decoded while the consumer works; each batch is decoded
/// in parallel on rayon's pool. The first error ends the iteration.
pub struct BatchLoader {
    rx: Receiver<Result<Batch>>,
    worker: Option<JoinHandle<()>>,
}

impl BatchLoader {
    /// Starts decoding `paths` in batches of `batch_size` images of `size` (width x height).
    pub fn new(
        paths: Vec<PathBuf>,
        batch_size: usize,
        prefetch: usize,
        size: [usize; 2],
        device: Device,
    ) -> Self {
        let batch_size = batch_size.max(1);
        let (tx, rx) = sync_channel(prefetch.max(1));
        let worker = std::thread::spawn(move || {
            for (i, chunk) in paths.chunks(batch_size).enumerate() {
                let batch = load_batch(chunk, size, &device).map(|images| Batch {
                    start: i * batch_size,
                    images,
                });
                let failed = batch.is_err();
                // A closed channel means the consumer stopped early: nothing left to do.
                if tx.send(batch).is_err() || failed {
                    break;
                }
            }
        });
        Self {
            rx,
            worker: Some(worker),
        }
    }
}

impl Iterator for BatchLoader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.rx.recv().ok()
    }
}

impl Drop for BatchLoader {
    fn drop(&mut self) {
        // Dropping the receiver first lets a blocked worker see the closed channel and exit.
        let (_, dummy) = sync_channel(1);
        drop(std::mem::replace(&mut self.rx, dummy));
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// Runs `embed` over every image in `paths`, in batches decoded ahead on a background
/// thread, and returns one row per image in path order. `progress` is called with the
/// number of images finished after each batch.
///
/// `embed` maps an `[n, 3, H, W]` batch of RGB pixels to an `[n, d]` tensor, typically a
/// model's embedding function.
pub fn embed_images<E>(
    paths: &[PathBuf],
    batch_size: usize,
    size: [usize; 2],
    device: &Device,
    mut embed: impl FnMut(&Tensor) -> std::result::Result<Tensor, E>,
    mut progress: impl FnMut(usize),
) -> std::result::Result<Vec<Vec<f32>>, E>
where
    E: From<crate::Error>,
{
    let loader = BatchLoader::new(paths.to_vec(), batch_size, 2, size, device.clone());
    let mut rows = Vec::with_capacity(paths.len());
    for batch in loader {
        let batch = batch?;
        let n = batch.images.dim(0).map_err(crate::Error::from)?;
        let out = embed(&batch.images)?;
        let out: Vec<Vec<f32>> = out
            .to_dtype(candle_core::DType::F32)
            .and_then(|t| t.to_vec2())
            .map_err(crate::Error::from)?;
        if out.len() != n {
            return Err(crate::Error::from(candle_core::Error::Msg(format!(
                "embedding function returned {} rows for a batch of {n}",
                out.len()
            )))
            .into());
        }
        rows.extend(out);
        progress(rows.len());
    }
    Ok(rows)
}
