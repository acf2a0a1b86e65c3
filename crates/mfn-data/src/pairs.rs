//! The LFW pair protocol: `pairs.txt` and the images it names.
//!
//! The file starts with a header `folds n` (View 2: `10 300`) or a single `n` (View 1),
//! followed, for each fold, by `n` same-person lines `name n1 n2` and `n`
//! different-person lines `name1 n1 name2 n2`. Fields are separated by tabs or spaces.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// One LFW image: a person's name and the 1-based photo number.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageRef {
    /// The person, as the folder is named (`Aaron_Peirsol`).
    pub name: String,
    /// The photo number (`1` for `Aaron_Peirsol_0001.jpg`).
    pub number: u32,
}

impl ImageRef {
    /// The file under an LFW image folder: `root/name/name_NNNN.ext`.
    pub fn path(&self, root: &Path, ext: &str) -> PathBuf {
        root.join(&self.name)
            .join(format!("{}_{:04}.{ext}", self.name, self.number))
    }
}

/// One line of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pair {
    /// The first image.
    pub a: ImageRef,
    /// The second image.
    pub b: ImageRef,
    /// Whether both show the same person.
    pub same: bool,
    /// 0-based fold index.
    pub fold: usize,
}

/// A parsed pairs file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pairs {
    /// All pairs in file order.
    pub pairs: Vec<Pair>,
    /// Number of folds.
    pub folds: usize,
}

fn parse_number(field: &str, path: &Path, line: usize, what: &str) -> Result<u32> {
    field.parse().map_err(|_| Error::Pairs {
        path: path.to_path_buf(),
        line,
        message: format!("{what} `{field}` is not a number"),
    })
}

impl Pairs {
    /// Reads and parses a pairs file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses the text of a pairs file; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let err = |line: usize, message: String| Error::Pairs {
            path: path.to_path_buf(),
            line,
            message,
        };
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty());
        let Some((hline, header)) = lines.next() else {
            return Err(Error::EmptyPairs {
                path: path.to_path_buf(),
            });
        };
        let h: Vec<&str> = header.split_whitespace().collect();
        let (folds, per_side) = match h.as_slice() {
            [n] => (1, parse_number(n, path, hline, "pair count")?),
            [f, n] => (
                parse_number(f, path, hline, "fold count")?,
                parse_number(n, path, hline, "pairs per fold")?,
            ),
            _ => {
                return Err(err(
                    hline,
                    format!(
                        "header must be `folds pairs_per_fold`, found {} fields",
                        h.len()
                    ),
                ))
            }
        };
        let (folds, per_side) = (folds as usize, per_side as usize);
        let per_fold = 2 * per_side;
        if folds == 0 || per_side == 0 {
            return Err(Error::EmptyPairs {
                path: path.to_path_buf(),
            });
        }
        let mut pairs = Vec::with_capacity(folds * per_fold);
        let mut last_line = hline;
        for (line, text) in lines {
            last_line = line;
            let f: Vec<&str> = text.split_whitespace().collect();
            let pair = match f.as_slice() {
                [name, n1, n2] => Pair {
                    a: ImageRef {
                        name: name.to_string(),
                        number: parse_number(n1, path, line, "photo number")?,
                    },
                    b: ImageRef {
                        name: name.to_string(),
                        number: parse_number(n2, path, line, "photo number")?,
                    },
                    same: true,
                    fold: pairs.len() / per_fold,
                },
                [name1, n1, name2, n2] => Pair {
                    a: ImageRef {
                        name: name1.to_string(),
                        number: parse_number(n1, path, line, "photo number")?,
                    },
                    b: ImageRef {
                        name: name2.to_string(),
                        number: parse_number(n2, path, line, "photo number")?,
                    },
                    same: false,
                    fold: pairs.len() / per_fold,
                },
                _ => {
                    return Err(err(
                        line,
                        format!(
                            "expected `name n1 n2` or `name1 n1 name2 n2`, found {} fields",
                            f.len()
                        ),
                    ))
                }
            };
            if pairs.len() == folds * per_fold {
                return Err(err(
                    line,
                    format!(
                        "the header promises {} pairs, this line is one more",
                        folds * per_fold
                    ),
                ));
            }
            pairs.push(pair);
        }
        if pairs.len() != folds * per_fold {
            return Err(err(
                last_line,
                format!(
                    "the header promises {folds} folds of {per_fold} pairs ({}), the file has {}",
                    folds * per_fold,
                    pairs.len()
                ),
            ));
        }
        Ok(Self { pairs, folds })
    }

    /// Every image the pairs use, once each, in order of first use.
    pub fn unique_images(&self) -> Vec<ImageRef> {
        self.index().0
    }

    /// The unique images and, for each pair, the positions of its two images in that list,
    /// so that each image is embedded once.
    pub fn index(&self) -> (Vec<ImageRef>, Vec<[usize; 2]>) {
        let mut unique: Vec<ImageRef> = Vec::new();
        let mut position: HashMap<ImageRef, usize> = HashMap::new();
        let mut slot = |r: &ImageRef| -> usize {
            if let Some(&i) = position.get(r) {
                return i;
            }
            unique.push(r.clone());
            position.insert(r.clone(), unique.len() - 1);
            unique.len() - 1
        };
        let idx = self
            .pairs
            .iter()
            .map(|p| [slot(&p.a), slot(&p.b)])
            .collect();
        (unique, idx)
    }

    /// Labels (`true` = same person) in pair order.
    pub fn labels(&self) -> Vec<bool> {
        self.pairs.iter().map(|p| p.same).collect()
    }

    /// Fold index of each pair, in pair order.
    pub fn fold_ids(&self) -> Vec<usize> {
        self.pairs.iter().map(|p| p.fold).collect()
    }
}
