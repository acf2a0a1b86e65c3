//! The LFW open-set identification protocol: a gallery of one face per person, known
//! probes of enrolled people and unknown probes of people never enrolled, scored with
//! [`mfn_eval::open_set`].

use std::path::{Path, PathBuf};

use mfn_eval::open_set::{OpenSetReport, Probe};

use crate::index::{ExactIndex, Index};
use crate::{Error, Result};

/// Who is enrolled and who probes, from a folder of `<Name>/<Name>_<NNNN>.<ext>` faces.
///
/// The gallery holds the first image (by file name) of each person with two or more
/// images; the other images of those people are the known probes; the people with one
/// image are the unknown probes. On LFW's 13,233 images: 1,680 enrolled, 7,484 known
/// probes, 4,069 unknown probes.
#[derive(Clone, Debug, PartialEq)]
pub struct OpenSetSplit {
    /// The enrolled people's names; their identities are positions in this list.
    pub identities: Vec<String>,
    /// One image per enrolled identity, in identity order.
    pub gallery: Vec<PathBuf>,
    /// The other images of enrolled people, with their identity.
    pub known: Vec<(u32, PathBuf)>,
    /// The images of people never enrolled.
    pub unknown: Vec<PathBuf>,
}

impl OpenSetSplit {
    /// Reads the split from `root`: each sub-folder a person, its files with extension
    /// `ext` their images, in name order.
    pub fn from_folder(root: &Path, ext: &str) -> Result<Self> {
        let io = |path: &Path, source| Error::Io {
            path: path.into(),
            source,
        };
        let mut people: Vec<(String, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(root).map_err(|e| io(root, e))? {
            let entry = entry.map_err(|e| io(root, e))?;
            let path = entry.path();
            if path.is_dir() {
                if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                    people.push((name.to_string(), path));
                }
            }
        }
        people.sort();
        let mut split = Self {
            identities: Vec::new(),
            gallery: Vec::new(),
            known: Vec::new(),
            unknown: Vec::new(),
        };
        for (name, dir) in people {
            let mut images: Vec<PathBuf> = Vec::new();
            for entry in std::fs::read_dir(&dir).map_err(|e| io(&dir, e))? {
                let path = entry.map_err(|e| io(&dir, e))?.path();
                if path.is_file() && path.extension().and_then(|e| e.to_str()) == Some(ext) {
                    images.push(path);
                }
            }
            images.sort();
            match images.len() {
                0 => {}
                1 => split.unknown.push(images.remove(0)),
                _ => {
                    let id = split.identities.len() as u32;
                    split.identities.push(name);
                    split.gallery.push(images.remove(0));
                    split.known.extend(images.into_iter().map(|p| (id, p)));
                }
            }
        }
        if split.gallery.is_empty() {
            return Err(Error::File {
                path: root.into(),
                message: format!(
                    "no person with two or more `.{ext}` images in its sub-folder: expected \
                     `<Name>/<Name>_<NNNN>.{ext}`"
                ),
            });
        }
        Ok(split)
    }

    /// Every image: the gallery's, then the known probes', then the unknown probes', the
    /// order [`OpenSetSplit::evaluate`] takes their embeddings in.
    pub fn images(&self) -> Vec<PathBuf> {
        let mut out = self.gallery.clone();
        out.extend(self.known.iter().map(|(_, p)| p.clone()));
        out.extend(self.unknown.iter().cloned());
        out
    }

    /// Enrolls the gallery's embeddings, searches every probe for its `max_rank` best
    /// identities and reports rank-1, the CMC curve to `max_rank` and DIR at each of
    /// `fars`. `embeddings` are unit length, in the order of [`OpenSetSplit::images`].
    pub fn evaluate(
        &self,
        embeddings: &[Vec<f32>],
        max_rank: usize,
        fars: &[f64],
    ) -> Result<OpenSetReport> {
        let total = self.gallery.len() + self.known.len() + self.unknown.len();
        if embeddings.len() != total {
            return Err(Error::Invalid(format!(
                "{} embeddings for the split's {total} images",
                embeddings.len()
            )));
        }
        let dim = embeddings[0].len();
        if let Some(i) = embeddings.iter().position(|e| e.len() != dim) {
            return Err(Error::Invalid(format!(
                "embedding {i} has {} values, the first {dim}",
                embeddings[i].len()
            )));
        }
        let mut index = ExactIndex::with_capacity(dim, self.gallery.len());
        for (id, e) in embeddings[..self.gallery.len()].iter().enumerate() {
            index.push(id as i64, &unit(e))?;
        }
        let probes: Vec<f32> = embeddings[self.gallery.len()..]
            .iter()
            .flat_map(|e| unit(e))
            .collect();
        let ranked = index.search_many(&probes, max_rank);
        let candidates =
            |hits: &Vec<crate::Scored>| hits.iter().map(|s| (s.id as u32, s.score)).collect();
        let known = self.known.len();
        let probes: Vec<Probe> = ranked
            .iter()
            .enumerate()
            .map(|(i, hits)| match self.known.get(i) {
                Some((truth, _)) if i < known => Probe::known(*truth, candidates(hits)),
                _ => Probe::unknown(candidates(hits)),
            })
            .collect();
        Ok(mfn_eval::open_set::evaluate(&probes, fars, max_rank)?)
    }
}

fn unit(e: &[f32]) -> Vec<f32> {
    let norm = e.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
    if norm == 0.0 {
        return e.to_vec();
    }
    e.iter().map(|v| (*v as f64 / norm) as f32).collect()
}
