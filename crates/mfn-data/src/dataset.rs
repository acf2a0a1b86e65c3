//! Labelled face images for training: a folder per identity ([`ImageFolder`]) or an MXNet
//! RecordIO file ([`RecordDataset`]), behind one [`Dataset`] trait.

use std::fs;
use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::image::decode_rgb_bytes;
use crate::recordio::{as_index, InsightfaceHeader, Record, RecordReader, RecordWriter};
use crate::{decode_rgb, Error, Result};

/// Images with a class each, read by position.
pub trait Dataset {
    /// Number of images.
    fn len(&self) -> usize;

    /// Whether there are no images.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of classes; every class returned by [`get`](Self::get) is below it.
    fn num_classes(&self) -> usize;

    /// The `index`-th image, decoded, and its class.
    fn get(&self, index: usize) -> Result<(RgbImage, usize)>;
}

/// File extensions (compared without case) that [`ImageFolder`] takes for images: the
/// formats [`decode_rgb`] reads.
pub const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "bmp", "webp"];

/// A folder with one sub-folder of images per identity, like torchvision's `ImageFolder`.
///
/// Classes are numbered in the sorted order of the sub-folder names and images are sorted
/// by file name within each class, so the numbering does not depend on the file system.
/// Names starting with `.` are skipped (macOS leaves `._name.jpg` files that are not
/// images), as are files without an image extension.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    samples: Vec<(PathBuf, usize)>,
}

impl ImageFolder {
    /// Lists `root`. It is an error for `root` to be missing, to hold no sub-folders, or
    /// for a sub-folder to hold no images: an identity without images would be a class
    /// no training step can see.
    pub fn open(root: &Path) -> Result<Self> {
        let mut classes = Vec::new();
        let mut samples = Vec::new();
        for dir in sorted_entries(root)?.into_iter().filter(|p| p.is_dir()) {
            let class = classes.len();
            let before = samples.len();
            samples.extend(
                sorted_entries(&dir)?
                    .into_iter()
                    .filter(|p| p.is_file() && has_image_extension(p))
                    .map(|p| (p, class)),
            );
            if samples.len() == before {
                return Err(Error::ImageFolder {
                    path: dir,
                    message: format!(
                        "class folder holds no images ({})",
                        IMAGE_EXTENSIONS.join(", ")
                    ),
                });
            }
            classes.push(file_name(&dir));
        }
        if classes.is_empty() {
            return Err(Error::ImageFolder {
                path: root.to_path_buf(),
                message: "no class folders: expected one sub-folder of images per identity".into(),
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
            classes,
            samples,
        })
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Class names (sub-folder names), in class order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Every image file and its class, sorted by class then file name.
    pub fn samples(&self) -> &[(PathBuf, usize)] {
        &self.samples
    }

    /// Keeps the classes for which `keep(class index, image count)` holds, numbered anew
    /// in their old order. It is an error for none to remain.
    pub fn retain_classes(self, mut keep: impl FnMut(usize, usize) -> bool) -> Result<Self> {
        let mut counts = vec![0usize; self.classes.len()];
        for (_, c) in &self.samples {
            counts[*c] += 1;
        }
        let mut renumber = vec![None; self.classes.len()];
        let mut classes = Vec::new();
        for (i, name) in self.classes.into_iter().enumerate() {
            if keep(i, counts[i]) {
                renumber[i] = Some(classes.len());
                classes.push(name);
            }
        }
        if classes.is_empty() {
            return Err(Error::ImageFolder {
                path: self.root,
                message: "no class is left after filtering".into(),
            });
        }
        let samples = self
            .samples
            .into_iter()
            .filter_map(|(p, c)| renumber[c].map(|n| (p, n)))
            .collect();
        Ok(Self {
            root: self.root,
            classes,
            samples,
        })
    }

    /// Only the identities with at least `min` images (LFW's 158 people with 10 or more,
    /// say).
    pub fn with_min_images(self, min: usize) -> Result<Self> {
        self.retain_classes(|_, n| n >= min)
    }

    /// Splits off `count` identities, spread evenly over the sorted class list, as a
    /// held-out set: returns `(rest, held_out)`. Both must keep at least one class.
    pub fn hold_out(self, count: usize) -> Result<(Self, Self)> {
        let total = self.classes.len();
        if count == 0 || count >= total {
            return Err(Error::ImageFolder {
                path: self.root,
                message: format!("cannot hold out {count} of {total} identities"),
            });
        }
        let held: std::collections::BTreeSet<usize> = (0..count)
            .map(|i| i * total / count + total / (2 * count))
            .collect();
        let rest = self.clone().retain_classes(|i, _| !held.contains(&i))?;
        let held_out = self.retain_classes(|i, _| held.contains(&i))?;
        Ok((rest, held_out))
    }

    /// Writes the images to `rec` and `idx` in insightface's layout (see
    /// [`write_insightface`]).
    pub fn write_record_file(&self, rec: &Path, idx: &Path) -> Result<InsightfaceHeader> {
        let mut writer = RecordWriter::create(rec, Some(idx))?;
        let header = write_insightface(self, &mut writer)?;
        writer.finish()?;
        Ok(header)
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.samples.len()
    }

    fn num_classes(&self) -> usize {
        self.classes.len()
    }

    fn get(&self, index: usize) -> Result<(RgbImage, usize)> {
        let (path, class) = self.samples.get(index).ok_or_else(|| Error::NoSuchItem {
            path: self.root.clone(),
            message: format!("no image {index}: there are {}", self.samples.len()),
        })?;
        Ok((decode_rgb(path)?, *class))
    }
}

/// Entries of a folder sorted by name, skipping hidden ones.
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let io = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        if !entry.file_name().as_encoded_bytes().starts_with(b".") {
            entries.push(entry.path());
        }
    }
    entries.sort();
    Ok(entries)
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Writes `folder` as insightface's `face2rec2.py` lays out a training set, so that
/// insightface's and `arcface_torch`'s loaders read it: record 0 is the
/// [`InsightfaceHeader`]; keys `1..=n` are the images, copied byte for byte, each with its
/// class as label and its key as `id`; then one identity record per class whose two labels
/// are the key range of its images.
///
/// Keys and classes are stored as `f32`, exact only up to 2^24, so larger sets are refused.
pub fn write_insightface<W: std::io::Write>(
    folder: &ImageFolder,
    writer: &mut RecordWriter<W>,
) -> Result<InsightfaceHeader> {
    const F32_EXACT: u64 = 1 << 24;
    let n = folder.samples.len() as u64;
    let classes = folder.classes.len() as u64;
    let header = InsightfaceHeader {
        images: 1..n + 1,
        identities: n + 1..n + 1 + classes,
    };
    if header.identities.end > F32_EXACT {
        return Err(Error::ImageFolder {
            path: folder.root.clone(),
            message: format!(
                "{n} images in {classes} classes: insightface's f32 labels hold keys only up \
                 to {F32_EXACT} exactly"
            ),
        });
    }
    writer.write(0, &header.record())?;
    let mut ranges = vec![(u64::MAX, 0); folder.classes.len()];
    for (key, (path, class)) in (1..).zip(&folder.samples) {
        let bytes = fs::read(path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        writer.write(key, &Record::new(*class as f32, key, bytes))?;
        let r = &mut ranges[*class];
        *r = (r.0.min(key), key + 1);
    }
    for (key, (start, end)) in header.identities.clone().zip(ranges) {
        let labels = vec![start as f32, end as f32];
        writer.write(key, &Record::with_labels(labels, key, Vec::new()))?;
    }
    Ok(header)
}

/// Most classes a [`RecordDataset`] may have: 2^24, where `f32` labels stop holding every
/// integer (insightface stores classes as `f32`; the largest public sets have about 2
/// million identities).
pub const MAX_CLASSES: usize = 1 << 24;

/// Without an insightface header, the number of classes is one more than the largest
/// label; a subset of a bigger set may leave classes without images, but at most this
/// many per image, so that a stray label cannot ask a training head for billions of rows.
pub const MAX_CLASSES_PER_IMAGE: usize = 1024;

/// Classes `images` images without an insightface header may number.
fn max_classes(images: usize) -> usize {
    images
        .max(1)
        .saturating_mul(MAX_CLASSES_PER_IMAGE)
        .min(MAX_CLASSES)
}

/// Images and classes from an MXNet RecordIO file.
///
/// With an insightface header (record 0, see [`InsightfaceHeader`]) the images are keys
/// `1..` the first identity key and there are as many classes as identity records; the
/// header and identity records are not images. Without one every record is an image and
/// the number of classes is one more than the largest label, found by reading every
/// record's header once.
///
/// A record's class is its label ([`Record::label`]: the first of a label array), which
/// must be a non-negative integer.
///
/// Counts come from the data, never from a number alone: a header's images and identities
/// must all be records of the file, and without a header the classes are bounded by
/// [`MAX_CLASSES_PER_IMAGE`] per image and [`MAX_CLASSES`].
#[derive(Debug)]
pub struct RecordDataset {
    reader: RecordReader,
    images: Vec<usize>,
    num_classes: usize,
    header: Option<InsightfaceHeader>,
}

impl RecordDataset {
    /// Opens `rec` with its index `idx`. Without one, the index beside it
    /// ([`idx_path`](crate::recordio::idx_path)`(rec)`, `X.idx` for `X.rec`) is used when it
    /// exists, and the `.rec` is scanned when it does not (see
    /// [`RecordReader::open_with_index`]).
    pub fn open(rec: &Path, idx: Option<&Path>) -> Result<Self> {
        match idx {
            Some(idx) => Self::new(RecordReader::open(rec, Some(idx))?),
            None => Self::new(RecordReader::open_with_index(rec)?),
        }
    }

    /// A dataset over the records of `reader`.
    pub fn new(reader: RecordReader) -> Result<Self> {
        let header = reader.insightface_header()?;
        let (images, num_classes) = match &header {
            Some(h) => {
                let images = h
                    .images
                    .clone()
                    .map(|key| {
                        reader.position(key).ok_or_else(|| Error::NoSuchItem {
                            path: reader.idx().unwrap_or(reader.path()).to_path_buf(),
                            message: format!(
                                "the insightface header names images 1..{} but there is no \
                                 record {key}",
                                h.images.end
                            ),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                // Each identity is a record of its own too, so the class count is backed by
                // data: a key missing is found after at most as many look-ups as there are
                // records.
                if let Some(key) = h.identities.clone().find(|&k| reader.position(k).is_none()) {
                    return Err(Error::NoSuchItem {
                        path: reader.idx().unwrap_or(reader.path()).to_path_buf(),
                        message: format!(
                            "the insightface header names {} identities, keys {}..{}, but \
                             there is no record {key}",
                            h.num_classes(),
                            h.identities.start,
                            h.identities.end
                        ),
                    });
                }
                let classes = usize::try_from(h.num_classes()).map_err(|_| Error::RecordIo {
                    path: reader.path().to_path_buf(),
                    offset: 0,
                    message: format!("{} classes do not fit in memory", h.num_classes()),
                })?;
                (images, classes)
            }
            None => {
                let limit = max_classes(reader.len());
                let mut classes = 0;
                for i in 0..reader.len() {
                    let (h, labels) = reader.header_at(i)?;
                    let record = Record {
                        header: h,
                        labels,
                        payload: Vec::new(),
                    };
                    let class = class_of(&reader, i, &record)?;
                    if class >= limit {
                        let (key, offset) = reader.location(i).unwrap_or_default();
                        return Err(Error::RecordIo {
                            path: reader.path().to_path_buf(),
                            offset,
                            message: format!(
                                "record {key}: class {class} is too large: {} images may number \
                                 at most {limit} classes (at most {MAX_CLASSES_PER_IMAGE} per \
                                 image, and below {MAX_CLASSES})",
                                reader.len()
                            ),
                        });
                    }
                    classes = classes.max(class + 1);
                }
                ((0..reader.len()).collect(), classes)
            }
        };
        Ok(Self {
            reader,
            images,
            num_classes,
            header,
        })
    }

    /// The reader underneath.
    pub fn reader(&self) -> &RecordReader {
        &self.reader
    }

    /// The insightface header, if the file has one.
    pub fn insightface_header(&self) -> Option<&InsightfaceHeader> {
        self.header.as_ref()
    }

    /// The `index`-th image's record, undecoded.
    pub fn record(&self, index: usize) -> Result<Record> {
        self.reader.read_at(self.position(index)?)
    }

    fn position(&self, index: usize) -> Result<usize> {
        self.images
            .get(index)
            .copied()
            .ok_or_else(|| Error::NoSuchItem {
                path: self.reader.path().to_path_buf(),
                message: format!("no image {index}: there are {}", self.images.len()),
            })
    }
}

/// The class a record's label stands for, or an error at the record's offset.
fn class_of(reader: &RecordReader, position: usize, record: &Record) -> Result<usize> {
    let (key, offset) = reader.location(position).unwrap_or_default();
    let bad = |message: String| Error::RecordIo {
        path: reader.path().to_path_buf(),
        offset,
        message: format!("record {key}: {message}"),
    };
    let label = record
        .label()
        .ok_or_else(|| bad("the label array is empty".into()))?;
    as_index(label)
        .and_then(|c| usize::try_from(c).ok())
        .ok_or_else(|| bad(format!("label {label} is not a class number")))
}

impl Dataset for RecordDataset {
    fn len(&self) -> usize {
        self.images.len()
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn get(&self, index: usize) -> Result<(RgbImage, usize)> {
        let position = self.position(index)?;
        let record = self.reader.read_at(position)?;
        let (key, offset) = self.reader.location(position).unwrap_or_default();
        let class = class_of(&self.reader, position, &record)?;
        let at = |message: String| Error::RecordIo {
            path: self.reader.path().to_path_buf(),
            offset,
            message: format!("record {key}: {message}"),
        };
        if class >= self.num_classes {
            return Err(at(format!(
                "class {class} is not below the {} classes of the insightface header",
                self.num_classes
            )));
        }
        let image = decode_rgb_bytes(&record.payload, self.reader.path()).map_err(|e| match e {
            Error::Decode { message, .. } => at(format!("cannot decode image: {message}")),
            e => e,
        })?;
        Ok((image, class))
    }
}
