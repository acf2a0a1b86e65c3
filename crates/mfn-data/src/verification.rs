//! Verification sets: labelled pairs of face images, from an insightface `.bin` file, an
//! LFW-style `pairs.txt` over a folder, or every pair among some identities, embedded once
//! per image.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::{BinSet, Error, ImageFolder, Pairs, Result};

/// Where a set's images come from.
#[derive(Clone, Debug)]
enum Images {
    /// Files, each embedded once however many pairs name it.
    Files(Vec<PathBuf>),
    /// Encoded images held in memory (a `.bin` set's), in file order.
    Encoded(Arc<[Vec<u8>]>),
}

/// Labelled pairs of images and the folds of the 10-fold protocol.
#[derive(Clone, Debug)]
pub struct VerificationSet {
    source: PathBuf,
    images: Images,
    pairs: Vec<[usize; 2]>,
    labels: Vec<bool>,
    folds: Option<Vec<usize>>,
}

/// Fewest folds a set with folds may have: k-fold cross-validation fits each fold's
/// threshold on the others, so one fold leaves nothing to fit on.
pub const MIN_FOLDS: usize = 2;

/// Fold of each of `n` pairs cut into `k` consecutive runs, as scikit-learn's
/// `KFold(shuffle=False)` (insightface's split of `.bin` sets): the first `n % k` folds get
/// one pair more.
pub fn contiguous_folds(n: usize, k: usize) -> Vec<usize> {
    let (base, extra) = (n / k.max(1), n % k.max(1));
    (0..k)
        .flat_map(|fold| std::iter::repeat_n(fold, base + usize::from(fold < extra)))
        .collect()
}

impl VerificationSet {
    /// An insightface `.bin` file: pair `i` is images `2i` and `2i + 1`, split into `folds`
    /// consecutive folds.
    pub fn bin(path: &Path, folds: usize) -> Result<Self> {
        let set = BinSet::read(path)?;
        Self::from_bin(set, path, folds)
    }

    /// A parsed `.bin` set; `path` names it in messages.
    pub fn from_bin(set: BinSet, path: &Path, folds: usize) -> Result<Self> {
        let n = set.pairs();
        set.validate(path)?;
        if folds < MIN_FOLDS || folds > n {
            return Err(Error::Verification {
                path: path.to_path_buf(),
                message: format!(
                    "has {n} pairs, which cannot be split into {folds} folds (the k-fold \
                     protocol needs at least {MIN_FOLDS}, and a pair in each)"
                ),
            });
        }
        Ok(Self {
            source: path.to_path_buf(),
            pairs: (0..n).map(|i| [2 * i, 2 * i + 1]).collect(),
            labels: set.issame,
            images: Images::Encoded(set.images.into()),
            folds: Some(contiguous_folds(n, folds)),
        })
    }

    /// An LFW-style `pairs.txt` over `root/<Name>/<Name>_<NNNN>.<ext>`, with its folds (at
    /// least [`MIN_FOLDS`]). All missing images are reported at once, before anything is
    /// decoded.
    pub fn pairs(pairs: &Path, root: &Path, ext: &str) -> Result<Self> {
        let list = Pairs::read(pairs)?;
        let (unique, index) = list.index();
        let files: Vec<PathBuf> = unique.iter().map(|r| r.path(root, ext)).collect();
        let missing = crate::missing_files(&files);
        if !missing.is_empty() {
            return Err(Error::MissingImages {
                root: root.to_path_buf(),
                paths: missing,
            });
        }
        if list.folds < MIN_FOLDS {
            return Err(Error::Verification {
                path: pairs.to_path_buf(),
                message: format!(
                    "has {} fold(s): the k-fold protocol needs at least {MIN_FOLDS} (a header \
                     `folds pairs_per_fold`, as View 2's `10 300`)",
                    list.folds
                ),
            });
        }
        Ok(Self {
            source: pairs.to_path_buf(),
            images: Images::Files(files),
            pairs: index,
            labels: list.labels(),
            folds: Some(list.fold_ids()),
        })
    }

    /// Every pair of images among the identities of `folder` (held-out identities, say).
    /// Such pairs have no folds. It takes at least two identities, for different-person
    /// pairs.
    pub fn all_pairs(folder: &ImageFolder) -> Result<Self> {
        let samples = folder.samples();
        if folder.classes().len() < 2 {
            return Err(Error::Verification {
                path: folder.root().to_path_buf(),
                message: "all pairs among identities need at least 2 of them".into(),
            });
        }
        let mut pairs = Vec::new();
        let mut labels = Vec::new();
        for a in 0..samples.len() {
            for b in a + 1..samples.len() {
                pairs.push([a, b]);
                labels.push(samples[a].1 == samples[b].1);
            }
        }
        Ok(Self {
            source: folder.root().to_path_buf(),
            images: Images::Files(samples.iter().map(|(p, _)| p.clone()).collect()),
            pairs,
            labels,
            folds: None,
        })
    }

    /// The file or folder the set came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Number of images [`Self::embed`] embeds.
    pub fn images(&self) -> usize {
        match &self.images {
            Images::Files(f) => f.len(),
            Images::Encoded(e) => e.len(),
        }
    }

    /// How errors name image `index` of the set (a position in what [`Self::embed`]
    /// returns): its file, or for a `.bin` set the set and the image's number in it.
    pub fn image_name(&self, index: usize) -> PathBuf {
        match &self.images {
            Images::Files(f) => f.get(index).cloned().unwrap_or_else(|| {
                PathBuf::from(format!("{}, image {index}", self.source.display()))
            }),
            Images::Encoded(_) => crate::image::member_name(&self.source, index),
        }
    }

    /// Checks that every embedding can be compared by cosine: finite and not all zeros. An
    /// error names the set and the image (see [`Self::image_name`]), which a model's
    /// embedding alone cannot.
    pub fn check_embeddings(&self, embeddings: &[Vec<f32>]) -> Result<()> {
        let bad = |i: usize, what: String| Error::Verification {
            path: self.source.clone(),
            message: format!(
                "the embedding of image {i} ({}) {what}",
                self.image_name(i).display()
            ),
        };
        if embeddings.len() != self.images() {
            return Err(Error::Verification {
                path: self.source.clone(),
                message: format!(
                    "{} embeddings for {} images",
                    embeddings.len(),
                    self.images()
                ),
            });
        }
        for (i, e) in embeddings.iter().enumerate() {
            if e.is_empty() {
                return Err(bad(i, "is empty".into()));
            }
            if let Some(k) = e.iter().position(|v| !v.is_finite()) {
                return Err(bad(i, format!("is not finite: component {k} is {}", e[k])));
            }
            if e.iter().all(|&v| v == 0.0) {
                return Err(bad(
                    i,
                    "is all zeros, so its cosine with anything is undefined".into(),
                ));
            }
        }
        Ok(())
    }

    /// Each pair's two positions in the embeddings [`Self::embed`] returns.
    pub fn pair_index(&self) -> &[[usize; 2]] {
        &self.pairs
    }

    /// `true` for each same-person pair.
    pub fn labels(&self) -> &[bool] {
        &self.labels
    }

    /// Each pair's fold, when the set has folds.
    pub fn folds(&self) -> Option<&[usize]> {
        self.folds.as_deref()
    }

    /// Decodes every image once, in batches of `batch` at `size` (width x height) decoded
    /// ahead on a background thread, and returns `embed`'s rows in image order. `progress`
    /// sees the count of images done.
    ///
    /// The rows are checked with [`Self::check_embeddings`], so that an embedding that is
    /// not finite or all zeros is an error naming its image here, not a nameless one when
    /// the pairs are scored.
    pub fn embed<E>(
        &self,
        batch: usize,
        size: [usize; 2],
        device: &Device,
        embed: impl FnMut(&Tensor) -> std::result::Result<Tensor, E>,
        progress: impl FnMut(usize),
    ) -> std::result::Result<Vec<Vec<f32>>, E>
    where
        E: From<Error>,
    {
        let rows = match &self.images {
            Images::Files(files) => {
                crate::embed_images(files, batch, size, device, embed, progress)
            }
            Images::Encoded(images) => crate::embed_encoded(
                images.clone(),
                &self.source,
                batch,
                size,
                device,
                embed,
                progress,
            ),
        }?;
        self.check_embeddings(&rows)?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_folds_are_sklearn_kfold() {
        assert_eq!(contiguous_folds(11, 3), [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]);
        let lfw = contiguous_folds(6000, 10);
        assert_eq!(lfw.len(), 6000);
        assert_eq!((lfw[599], lfw[600], lfw[5999]), (0, 1, 9));
    }
}
