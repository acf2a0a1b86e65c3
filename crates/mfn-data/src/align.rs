//! Face alignment: five landmarks in a photo, a similarity transform onto a template, and
//! the warped crop the network expects.
//!
//! This reproduces insightface's `norm_crop`: `estimate_norm` fits a similarity from the
//! landmarks to the template the way `skimage.transform.SimilarityTransform.estimate` does
//! (Umeyama 1991, never a reflection), and `cv2.warpAffine(img, M, (w, h), borderValue=0)`
//! samples the photo bilinearly. Both use pixel centres at integer coordinates: output pixel
//! `(x, y)` takes the photo's colour at `M⁻¹ (x, y)`, and a sample between a border pixel and
//! the outside blends that pixel with black.

use std::path::{Path, PathBuf};

use image::{Rgb, Rgb32FImage, RgbImage};
use imageproc::geometric_transformations::{warp_into, Interpolation, Projection};

use crate::error::quote;
use crate::{Error, Result};

/// Five facial landmarks in pixels, `[x, y]` each, in this order: left eye, right eye, nose
/// tip, left mouth corner, right mouth corner. "Left" is the image's left, not the person's.
pub type Landmarks = [[f32; 2]; 5];

/// insightface's `arcface_dst`: where the landmarks go in a 112x112 ArcFace crop, the layout
/// MobileFaceNet and the other ArcFace-family models were trained on.
pub const ARCFACE_112: Landmarks = [
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
];

/// The SphereFace / CosFace layout for 96 wide by 112 high crops: the ArcFace layout moved
/// 8 pixels left.
pub const SPHEREFACE_96X112: Landmarks = [
    [30.2946, 51.6963],
    [65.5318, 51.5014],
    [48.0252, 71.7366],
    [33.5493, 92.3655],
    [62.7299, 92.2041],
];

/// Below this ratio of the thinnest to the widest spread (standard deviation across versus
/// along the main axis), three or more source points count as lying on one line.
///
/// A face has its eyes well above its mouth: the ArcFace template is at 0.80, the 100 LFW
/// photos of the test assets at 0.57 to 0.98, and insightface's full-profile template still at
/// 0.45. Points this flat come from a broken detection, and fitting a face to them would only
/// produce a confident-looking wrong crop.
pub const MIN_SPREAD_RATIO: f64 = 0.05;

/// Points whose spread is below this fraction of their largest coordinate (taken as at
/// least 1) count as one point: f32 landmarks carry about 7 significant digits.
const COINCIDENT_TOLERANCE: f64 = 1e-6;

/// A rotation, uniform scale and translation: `p ↦ scale · R(rotation) · p + (tx, ty)`.
///
/// It is never a reflection: the determinant of its linear part is `scale² ≥ 0`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Similarity {
    /// Uniform scale factor, positive for every estimate.
    pub scale: f32,
    /// Rotation in radians, turning the x axis towards +y: clockwise on screen, where rows
    /// grow downwards.
    pub rotation: f32,
    /// Translation along x, applied after scaling and rotating.
    pub tx: f32,
    /// Translation along y, applied after scaling and rotating.
    pub ty: f32,
}

impl Similarity {
    /// The transform that leaves every point where it is.
    pub const IDENTITY: Similarity = Similarity {
        scale: 1.0,
        rotation: 0.0,
        tx: 0.0,
        ty: 0.0,
    };

    /// The 2x3 matrix `[[a, -b, tx], [b, a, ty]]` with `a = scale·cos`, `b = scale·sin`:
    /// the `M` that `cv2.warpAffine` takes.
    pub fn matrix(&self) -> [[f32; 3]; 2] {
        let m = Sim64::from_public(self);
        [
            [m.a as f32, -m.b as f32, m.tx as f32],
            [m.b as f32, m.a as f32, m.ty as f32],
        ]
    }

    /// Maps a point.
    pub fn apply(&self, p: [f32; 2]) -> [f32; 2] {
        let [x, y] = Sim64::from_public(self).apply([p[0] as f64, p[1] as f64]);
        [x as f32, y as f32]
    }

    /// The transform that undoes this one. A zero scale has no inverse and gives non-finite
    /// fields; [`estimate_similarity`] never returns one.
    pub fn inverse(&self) -> Similarity {
        Sim64::from_public(self).inverse().to_public()
    }

    /// Root-mean-square distance between the mapped `src` points and the `dst` points, in
    /// the units of `dst`.
    pub fn rms_error(&self, src: &[[f32; 2]], dst: &[[f32; 2]]) -> Result<f32> {
        check_pairs(src, dst)?;
        Ok(Sim64::from_public(self).rms_error(src, dst) as f32)
    }
}

/// The similarity in `[[a, -b, tx], [b, a, ty]]` form and in f64, so that fitting and
/// warping do not lose the precision that the public f32 fields would.
#[derive(Debug, Clone, Copy)]
struct Sim64 {
    a: f64,
    b: f64,
    tx: f64,
    ty: f64,
}

impl Sim64 {
    fn from_public(s: &Similarity) -> Sim64 {
        let (sin, cos) = (s.rotation as f64).sin_cos();
        let scale = s.scale as f64;
        Sim64 {
            a: scale * cos,
            b: scale * sin,
            tx: s.tx as f64,
            ty: s.ty as f64,
        }
    }

    fn to_public(self) -> Similarity {
        Similarity {
            scale: self.a.hypot(self.b) as f32,
            rotation: self.b.atan2(self.a) as f32,
            tx: self.tx as f32,
            ty: self.ty as f32,
        }
    }

    fn apply(&self, [x, y]: [f64; 2]) -> [f64; 2] {
        [
            self.a * x - self.b * y + self.tx,
            self.b * x + self.a * y + self.ty,
        ]
    }

    fn inverse(&self) -> Sim64 {
        // (a + ib)⁻¹ = (a - ib) / (a² + b²); the translation is mapped back through it.
        let n = self.a * self.a + self.b * self.b;
        let (a, b) = (self.a / n, -self.b / n);
        Sim64 {
            a,
            b,
            tx: -(a * self.tx - b * self.ty),
            ty: -(b * self.tx + a * self.ty),
        }
    }

    fn rms_error(&self, src: &[[f32; 2]], dst: &[[f32; 2]]) -> f64 {
        let sum: f64 = src
            .iter()
            .zip(dst)
            .map(|(p, q)| {
                let [x, y] = self.apply([p[0] as f64, p[1] as f64]);
                (x - q[0] as f64).powi(2) + (y - q[1] as f64).powi(2)
            })
            .sum();
        (sum / src.len().max(1) as f64).sqrt()
    }
}

/// The least-squares similarity that maps `src` points onto `dst` points (minimising the
/// sum of squared distances), as `skimage.transform.SimilarityTransform.estimate` and
/// insightface's `estimate_norm` compute it.
///
/// Umeyama's method centres both sets, takes the SVD `U S Vᵀ` of their covariance and forces
/// `det(R) = +1` with `D = diag(1, sign det)`. In 2D that is the same as solving the linear
/// least squares for `a = scale·cos θ`, `b = scale·sin θ`, `tx`, `ty` of the matrix
/// `[[a, -b, tx], [b, a, ty]]`, which has a closed form after centring and cannot express a
/// reflection; this function solves it that way, in f64.
///
/// Errors: fewer than two pairs or sets of different lengths ([`Error::Alignment`]); a
/// non-finite coordinate, source points that coincide, three or more source points on (nearly)
/// one line (see [`MIN_SPREAD_RATIO`]), or destination points that coincide
/// ([`Error::DegenerateLandmarks`]). Two points always lie on a line and are accepted, since
/// they define a similarity exactly. When no similarity does better than collapsing every
/// point onto one (mirror-image sets can do that), the fit has scale 0 and is refused too.
pub fn estimate_similarity(src: &[[f32; 2]], dst: &[[f32; 2]]) -> Result<Similarity> {
    estimate(src, dst).map(Sim64::to_public)
}

fn check_pairs(src: &[[f32; 2]], dst: &[[f32; 2]]) -> Result<()> {
    if src.len() != dst.len() {
        return Err(Error::Alignment {
            message: format!(
                "{} source points but {} destination points; they must pair up",
                src.len(),
                dst.len()
            ),
        });
    }
    Ok(())
}

fn check_finite(points: &[[f32; 2]], which: &str) -> Result<()> {
    match points
        .iter()
        .position(|p| !(p[0].is_finite() && p[1].is_finite()))
    {
        Some(i) => Err(Error::DegenerateLandmarks {
            message: format!(
                "{which} point {i} is ({}, {}), not finite",
                points[i][0], points[i][1]
            ),
        }),
        None => Ok(()),
    }
}

/// Mean and the centred second moments (xx, yy, xy) of a point set.
fn moments(points: &[[f32; 2]]) -> ([f64; 2], [f64; 3]) {
    let n = points.len() as f64;
    let mut mean = [0.0; 2];
    for p in points {
        mean[0] += p[0] as f64 / n;
        mean[1] += p[1] as f64 / n;
    }
    let mut m = [0.0; 3];
    for p in points {
        let (x, y) = (p[0] as f64 - mean[0], p[1] as f64 - mean[1]);
        m[0] += x * x / n;
        m[1] += y * y / n;
        m[2] += x * y / n;
    }
    (mean, m)
}

fn check_spread(points: &[[f32; 2]], which: &str, reject_collinear: bool) -> Result<()> {
    let (_, [xx, yy, xy]) = moments(points);
    let magnitude = points
        .iter()
        .flat_map(|p| [p[0].abs(), p[1].abs()])
        .fold(1.0f32, f32::max) as f64;
    if (xx + yy).sqrt() <= COINCIDENT_TOLERANCE * magnitude {
        return Err(Error::DegenerateLandmarks {
            message: format!(
                "all {} {which} points coincide at ({}, {})",
                points.len(),
                points[0][0],
                points[0][1]
            ),
        });
    }
    if reject_collinear && points.len() >= 3 {
        // Eigenvalues of the 2x2 covariance: the variances along and across the main axis.
        let half_trace = (xx + yy) / 2.0;
        let root = (((xx - yy) / 2.0).powi(2) + xy * xy).sqrt();
        let (major, minor) = (half_trace + root, (half_trace - root).max(0.0));
        let ratio = (minor / major).sqrt();
        if ratio < MIN_SPREAD_RATIO {
            return Err(Error::DegenerateLandmarks {
                message: format!(
                    "the {} {which} points lie on (nearly) one line: their spread across it is \
                     {ratio:.4} of their spread along it, below {MIN_SPREAD_RATIO}",
                    points.len()
                ),
            });
        }
    }
    Ok(())
}

fn estimate(src: &[[f32; 2]], dst: &[[f32; 2]]) -> Result<Sim64> {
    check_pairs(src, dst)?;
    if src.len() < 2 {
        return Err(Error::Alignment {
            message: format!(
                "a similarity needs at least 2 point pairs, got {}",
                src.len()
            ),
        });
    }
    check_finite(src, "source")?;
    check_finite(dst, "destination")?;
    check_spread(src, "source", true)?;
    check_spread(dst, "destination", false)?;

    let (ms, [sxx, syy, _]) = moments(src);
    let (md, [dxx, dyy, _]) = moments(dst);
    // Σ p·q and Σ p×q of the centred pairs: the projections of the covariance onto the
    // rotations, which are all a reflection-free fit can use.
    let (mut dot, mut cross) = (0.0, 0.0);
    for (p, q) in src.iter().zip(dst) {
        let (x, y) = (p[0] as f64 - ms[0], p[1] as f64 - ms[1]);
        let (u, v) = (q[0] as f64 - md[0], q[1] as f64 - md[1]);
        dot += x * u + y * v;
        cross += x * v - y * u;
    }
    let var = (sxx + syy) * src.len() as f64;
    let (a, b) = (dot / var, cross / var);
    let scale = a.hypot(b);
    // Scale relative to the ratio of the two spreads, so that the test does not depend on
    // the units of either set.
    let spread_ratio = ((dxx + dyy) / (sxx + syy)).sqrt();
    if !(scale.is_finite() && scale > 1e-9 * spread_ratio) {
        return Err(Error::Alignment {
            message: "no rotation brings the points closer than collapsing them onto one \
                      (the best similarity has scale 0): the point sets do not correspond"
                .into(),
        });
    }
    Ok(Sim64 {
        a,
        b,
        tx: md[0] - (a * ms[0] - b * ms[1]),
        ty: md[1] - (b * ms[0] + a * ms[1]),
    })
}

/// Which landmark layout to align to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Template {
    /// insightface's ArcFace layout ([`ARCFACE_112`]), at square sizes that are multiples of
    /// 112 or of 128.
    Arcface,
    /// The SphereFace layout ([`SPHEREFACE_96X112`]), at 96 wide by 112 high only.
    Sphereface,
}

/// The template landmarks for a crop of `size` (width, height).
///
/// ArcFace scales like insightface's `estimate_norm(lmk, image_size)`: a square size that is
/// a multiple of 112 scales [`ARCFACE_112`] by `size / 112`; otherwise a multiple of 128
/// scales it by `size / 128` and moves it `8 · size / 128` pixels right, since the 128 crops
/// add a margin of 8 on each side. Other sizes, non-square ArcFace sizes and SphereFace at
/// anything but 96x112 are an [`Error::Alignment`].
pub fn template(kind: Template, size: [usize; 2]) -> Result<Landmarks> {
    let unsupported = |why: &str| Error::Alignment {
        message: format!("no {kind:?} template for {}x{}: {why}", size[0], size[1]),
    };
    match kind {
        Template::Sphereface => {
            if size == [96, 112] {
                Ok(SPHEREFACE_96X112)
            } else {
                Err(unsupported("SphereFace crops are 96 wide by 112 high"))
            }
        }
        Template::Arcface => {
            let [w, h] = size;
            if w != h || w == 0 {
                return Err(unsupported("ArcFace crops are square"));
            }
            // Computed in f32 like insightface does with its float32 template.
            let (ratio, shift) = if w % 112 == 0 {
                ((w as f64 / 112.0) as f32, 0.0)
            } else if w % 128 == 0 {
                let ratio = w as f64 / 128.0;
                (ratio as f32, (8.0 * ratio) as f32)
            } else {
                return Err(unsupported("the size must be a multiple of 112 or of 128"));
            };
            Ok(ARCFACE_112.map(|[x, y]| [x * ratio + shift, y * ratio]))
        }
    }
}

/// A face warped onto a template.
#[derive(Debug, Clone)]
pub struct Aligned {
    /// The crop, exactly the size asked for.
    pub image: RgbImage,
    /// Maps source-image pixels to aligned-image pixels.
    pub transform: Similarity,
    /// Root-mean-square distance, in aligned-image pixels, between the transformed landmarks
    /// and the template: near 0 for a face shaped like the template, large when the landmarks
    /// are wrong. Callers reject bad alignments with it.
    pub residual: f32,
}

/// Warps the face with `landmarks` in `image` so that they land as close as a similarity
/// allows on `template`, in an output of `size` (width, height).
///
/// The same as insightface's `norm_crop`: the fit of [`estimate_similarity`], then
/// `cv2.warpAffine(image, M, size, borderValue=0)` with bilinear sampling (pixel centres at
/// integer coordinates, black outside the image, blended with the border pixels), rounded to
/// the nearest level. OpenCV quantises sample positions to 1/32 pixel and we do not, so the two
/// can differ by a level or so where the image has sharp edges.
///
/// Errors: an empty image or output size, non-finite or degenerate landmarks or template
/// (see [`estimate_similarity`]).
pub fn align(
    image: &RgbImage,
    landmarks: &Landmarks,
    template: &Landmarks,
    size: [u32; 2],
) -> Result<Aligned> {
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::Alignment {
            message: format!("the image is empty ({w}x{h})"),
        });
    }
    if size[0] == 0 || size[1] == 0 {
        return Err(Error::Alignment {
            message: format!("the output size {}x{} is empty", size[0], size[1]),
        });
    }
    let fit = estimate(landmarks, template)?;
    Ok(Aligned {
        image: warp(image, &fit, size)?,
        transform: fit.to_public(),
        residual: fit.rms_error(landmarks, template) as f32,
    })
}

/// [`align`] onto [`ARCFACE_112`] at 112x112, the input of MobileFaceNet.
pub fn align_arcface(image: &RgbImage, landmarks: &Landmarks) -> Result<Aligned> {
    align(image, landmarks, &ARCFACE_112, [112, 112])
}

/// Bilinear warp of `image` by `fit` into a `size` output, with OpenCV's conventions.
///
/// imageproc's bilinear sampler returns the default colour as soon as one of the four
/// neighbours is outside the image, where OpenCV blends the inside ones with the border
/// colour; it also truncates 8-bit results twice instead of rounding once. So the warp runs
/// on an f32 copy of just the part of the image the output can reach, padded with a ring of
/// black pixels, and the result is rounded at the end: the padding makes imageproc blend with
/// black exactly where OpenCV does.
fn warp(image: &RgbImage, fit: &Sim64, [w, h]: [u32; 2]) -> Result<RgbImage> {
    let (iw, ih) = image.dimensions();
    let inv = fit.inverse();
    let (right, bottom) = ((w - 1) as f64, (h - 1) as f64);
    let corners = [[0.0, 0.0], [right, 0.0], [0.0, bottom], [right, bottom]].map(|p| inv.apply(p));
    let lo = |k: usize| corners.iter().map(|c| c[k]).fold(f64::INFINITY, f64::min);
    let hi = |k: usize| {
        corners
            .iter()
            .map(|c| c[k])
            .fold(f64::NEG_INFINITY, f64::max)
    };
    // A sample at x reads columns floor(x) and floor(x) + 1; one more on each side absorbs
    // the f32 rounding of the mapping. Columns -1 and `len` are the black ring: nothing
    // further out can reach a sample.
    let span = |lo: f64, hi: f64, len: u32| {
        let first = (lo.floor() - 1.0).max(-1.0);
        let last = (hi.floor() + 2.0).min(len as f64);
        (first <= last).then_some((first as i64, last as i64))
    };
    let (Some((x0, x1)), Some((y0, y1))) = (span(lo(0), hi(0), iw), span(lo(1), hi(1), ih)) else {
        // The output lies wholly outside the image.
        return Ok(RgbImage::new(w, h));
    };
    let crop = Rgb32FImage::from_fn((x1 - x0 + 1) as u32, (y1 - y0 + 1) as u32, |i, j| {
        let (x, y) = (x0 + i as i64, y0 + j as i64);
        if (0..iw as i64).contains(&x) && (0..ih as i64).contains(&y) {
            let Rgb(c) = *image.get_pixel(x as u32, y as u32);
            Rgb(c.map(f32::from))
        } else {
            Rgb([0.0; 3])
        }
    });

    // imageproc inverts the projection it is given in f32 and samples through that inverse.
    // Handing it the output-to-crop map and inverting the projection makes it sample through
    // our f64 inverse, rounded once to f32, instead.
    let m = [
        inv.a,
        -inv.b,
        inv.tx - x0 as f64,
        inv.b,
        inv.a,
        inv.ty - y0 as f64,
        0.0,
        0.0,
        1.0,
    ]
    .map(|v| v as f32);
    let projection = m
        .iter()
        .all(|v| v.is_finite())
        .then(|| Projection::from_matrix(m))
        .flatten()
        .ok_or_else(|| Error::Alignment {
            message: format!("the transform {:?} cannot be inverted", fit.to_public()),
        })?
        .invert();
    let mut out = Rgb32FImage::new(w, h);
    warp_into(
        &crop,
        &projection,
        Interpolation::Bilinear,
        Rgb([0.0; 3]),
        &mut out,
    );
    Ok(RgbImage::from_fn(w, h, |x, y| {
        let Rgb(c) = *out.get_pixel(x, y);
        Rgb(c.map(|v| v.round().clamp(0.0, 255.0) as u8))
    }))
}

const LANDMARK_NAMES: [&str; 5] = [
    "left eye",
    "right eye",
    "nose",
    "left mouth corner",
    "right mouth corner",
];

/// Landmarks files longer than this are refused before they are read (a line for each of
/// LFW's 13,233 photos takes about 1 MB).
pub const MAX_LANDMARKS_FILE_BYTES: u64 = 64 << 20;

/// Longest line of a landmarks file: a path (at most 4096 bytes on Linux) and ten numbers.
pub const MAX_LANDMARKS_LINE_BYTES: usize = 8192;

/// Most faces a landmarks file may list.
pub const MAX_LANDMARKS_FACES: usize = 1 << 20;

/// Reads a landmarks file: one face a line, tab-separated, an image path relative to some
/// image folder and then ten numbers, `x y` of the left eye, right eye, nose tip, left and
/// right mouth corners. Blank lines are skipped.
///
/// Errors name the file, and for a malformed line its 1-based number and what was wrong: a
/// missing file ([`Error::Io`]), a file over [`MAX_LANDMARKS_FILE_BYTES`], text that is not
/// UTF-8, a line over [`MAX_LANDMARKS_LINE_BYTES`], more than [`MAX_LANDMARKS_FACES`]
/// faces, a wrong field count or a field that is not a finite number
/// ([`Error::LandmarksFile`]).
pub fn read_landmarks_file(path: &Path) -> Result<Vec<(PathBuf, Landmarks)>> {
    let bad = |line, message| Error::LandmarksFile {
        path: path.to_path_buf(),
        line,
        message,
    };
    let text = crate::text::read_text(path, MAX_LANDMARKS_FILE_BYTES, "landmarks file", bad)?;
    parse_landmarks(&text, path)
}

/// Parses the text of a landmarks file (see [`read_landmarks_file`]); `path` only names the
/// file in errors, which show text from the file escaped and shortened.
pub fn parse_landmarks(text: &str, path: &Path) -> Result<Vec<(PathBuf, Landmarks)>> {
    let mut faces = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let bad = |message: String| Error::LandmarksFile {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        if line.trim().is_empty() {
            continue;
        }
        if line.len() > MAX_LANDMARKS_LINE_BYTES {
            return Err(bad(format!(
                "the line is {} bytes long; a path and ten numbers take at most \
                 {MAX_LANDMARKS_LINE_BYTES}",
                line.len()
            )));
        }
        if faces.len() == MAX_LANDMARKS_FACES {
            return Err(bad(format!(
                "more than {MAX_LANDMARKS_FACES} faces in one landmarks file"
            )));
        }
        let fields: Vec<&str> = line.splitn(12, '\t').map(str::trim).collect();
        if fields.len() != 11 {
            let found = if fields.len() == 12 {
                "more than 11".to_string()
            } else {
                fields.len().to_string()
            };
            return Err(bad(format!(
                "expected 11 tab-separated fields (image path, then x y for the left eye, \
                 right eye, nose, left and right mouth corners), found {found}"
            )));
        }
        if fields[0].is_empty() {
            return Err(bad("the image path is empty".into()));
        }
        let mut landmarks = [[0.0f32; 2]; 5];
        for (k, field) in fields[1..].iter().enumerate() {
            let value = field
                .parse::<f32>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| {
                    bad(format!(
                        "field {} ({} {}) is not a finite number: `{}`",
                        k + 2,
                        LANDMARK_NAMES[k / 2],
                        ["x", "y"][k % 2],
                        quote(field)
                    ))
                })?;
            landmarks[k / 2][k % 2] = value;
        }
        faces.push((PathBuf::from(fields[0]), landmarks));
    }
    Ok(faces)
}
