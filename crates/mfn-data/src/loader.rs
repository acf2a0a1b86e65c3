//! Batches decoded on a background thread while the caller runs the model on the previous
//! one.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};

use crate::image::{load_batch, load_batch_encoded};
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
        Self::from_fn(paths.len(), batch_size, prefetch, move |r| {
            load_batch(&paths[r], size, &device)
        })
    }

    /// Starts decoding encoded images held in memory (a `.bin` set's, say) in batches of
    /// `batch_size` images of `size` (width x height). `container` names them in errors.
    pub fn encoded(
        images: Arc<[Vec<u8>]>,
        container: &Path,
        batch_size: usize,
        prefetch: usize,
        size: [usize; 2],
        device: Device,
    ) -> Self {
        let container = container.to_path_buf();
        Self::from_fn(images.len(), batch_size, prefetch, move |r| {
            let first = r.start;
            load_batch_encoded(&images[r], first, &container, size, &device)
        })
    }

    /// Starts calling `load` on a background thread for consecutive ranges of at most
    /// `batch_size` of the indices `0..len`; each call returns that range's `[n, 3, H, W]`
    /// pixels.
    pub fn from_fn(
        len: usize,
        batch_size: usize,
        prefetch: usize,
        mut load: impl FnMut(Range<usize>) -> Result<Tensor> + Send + 'static,
    ) -> Self {
        let batch_size = batch_size.max(1);
        let (tx, rx) = sync_channel(prefetch.max(1));
        let worker = std::thread::spawn(move || {
            for start in (0..len).step_by(batch_size) {
                let batch = load(start..(start + batch_size).min(len))
                    .map(|images| Batch { start, images });
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
    embed: impl FnMut(&Tensor) -> std::result::Result<Tensor, E>,
    progress: impl FnMut(usize),
) -> std::result::Result<Vec<Vec<f32>>, E>
where
    E: From<crate::Error>,
{
    let loader = BatchLoader::new(paths.to_vec(), batch_size, 2, size, device.clone());
    embed_batches(loader, paths.len(), embed, progress)
}

/// [`embed_images`] for encoded images held in memory, such as a `.bin` set's;
/// `container` names them in errors.
pub fn embed_encoded<E>(
    images: Arc<[Vec<u8>]>,
    container: &Path,
    batch_size: usize,
    size: [usize; 2],
    device: &Device,
    embed: impl FnMut(&Tensor) -> std::result::Result<Tensor, E>,
    progress: impl FnMut(usize),
) -> std::result::Result<Vec<Vec<f32>>, E>
where
    E: From<crate::Error>,
{
    let len = images.len();
    let loader = BatchLoader::encoded(images, container, batch_size, 2, size, device.clone());
    embed_batches(loader, len, embed, progress)
}

/// Runs `embed` over every batch of `loader` (which yields `len` images) and returns one
/// row per image in order; `progress` as in [`embed_images`].
pub fn embed_batches<E>(
    loader: BatchLoader,
    len: usize,
    mut embed: impl FnMut(&Tensor) -> std::result::Result<Tensor, E>,
    mut progress: impl FnMut(usize),
) -> std::result::Result<Vec<Vec<f32>>, E>
where
    E: From<crate::Error>,
{
    let mut rows = Vec::with_capacity(len);
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
