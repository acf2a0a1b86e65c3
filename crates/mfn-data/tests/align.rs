//! Face alignment: the similarity fit, the templates, the warp, and real LFW photos.

mod common;

use std::f64::consts::PI;
use std::path::Path;

use common::asset;
use image::{Rgb, RgbImage};
use mfn_data::align::{
    align, align_arcface, estimate_similarity, parse_landmarks, read_landmarks_file, template,
    Landmarks, Similarity, Template, ARCFACE_112, SPHEREFACE_96X112,
};
use mfn_data::{decode_rgb, Error};

/// Deterministic xorshift generator, so that failures reproduce.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    fn points(&mut self, n: usize, lo: f64, hi: f64) -> Vec<[f32; 2]> {
        (0..n)
            .map(|_| [self.range(lo, hi) as f32, self.range(lo, hi) as f32])
            .collect()
    }
}

/// Applies `[[a, -b, tx], [b, a, ty]]` in f64.
fn map(m: [[f64; 3]; 2], p: [f32; 2]) -> [f32; 2] {
    let (x, y) = (p[0] as f64, p[1] as f64);
    [
        (m[0][0] * x + m[0][1] * y + m[0][2]) as f32,
        (m[1][0] * x + m[1][1] * y + m[1][2]) as f32,
    ]
}

fn similarity_matrix(scale: f64, rotation: f64, tx: f64, ty: f64) -> [[f64; 3]; 2] {
    let (a, b) = (scale * rotation.cos(), scale * rotation.sin());
    [[a, -b, tx], [b, a, ty]]
}

fn max_abs_diff(a: [[f32; 3]; 2], b: [[f64; 3]; 2]) -> f64 {
    (0..2)
        .flat_map(|r| (0..3).map(move |c| (r, c)))
        .map(|(r, c)| (a[r][c] as f64 - b[r][c]).abs())
        .fold(0.0, f64::max)
}

fn det(m: [[f32; 3]; 2]) -> f32 {
    m[0][0] * m[1][1] - m[0][1] * m[1][0]
}

fn landmarks(points: &[[f32; 2]]) -> Landmarks {
    points.try_into().unwrap()
}

/// Sum of squared distances of the best similarity with rotation `theta` (scale ≥ 0), the
/// brute-force check of the least-squares optimum.
fn cost_at_rotation(src: &[[f32; 2]], dst: &[[f32; 2]], theta: f64) -> f64 {
    let n = src.len() as f64;
    let mean = |p: &[[f32; 2]], k: usize| p.iter().map(|q| q[k] as f64).sum::<f64>() / n;
    let (ms, md) = ([mean(src, 0), mean(src, 1)], [mean(dst, 0), mean(dst, 1)]);
    let (c, s) = (theta.cos(), theta.sin());
    let rotated: Vec<[f64; 2]> = src
        .iter()
        .map(|p| {
            let (x, y) = (p[0] as f64 - ms[0], p[1] as f64 - ms[1]);
            [c * x - s * y, s * x + c * y]
        })
        .collect();
    let centred: Vec<[f64; 2]> = dst
        .iter()
        .map(|q| [q[0] as f64 - md[0], q[1] as f64 - md[1]])
        .collect();
    let num: f64 = rotated
        .iter()
        .zip(&centred)
        .map(|(r, q)| r[0] * q[0] + r[1] * q[1])
        .sum();
    let den: f64 = rotated.iter().map(|r| r[0] * r[0] + r[1] * r[1]).sum();
    let scale = (num / den).max(0.0);
    rotated
        .iter()
        .zip(&centred)
        .map(|(r, q)| (scale * r[0] - q[0]).powi(2) + (scale * r[1] - q[1]).powi(2))
        .sum()
}

#[test]
fn recovers_random_similarities_from_five_points() {
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    for trial in 0..500 {
        let (scale, rotation) = (rng.range(0.3, 3.0), rng.range(-PI, PI));
        let (tx, ty) = (rng.range(-150.0, 150.0), rng.range(-150.0, 150.0));
        let truth = similarity_matrix(scale, rotation, tx, ty);
        // Random points are now and then nearly collinear, which is refused; draw again.
        let src = loop {
            let src = rng.points(5, 0.0, 250.0);
            if estimate_similarity(&src, &src).is_ok() {
                break src;
            }
        };
        let dst: Vec<_> = src.iter().map(|&p| map(truth, p)).collect();

        let fit = estimate_similarity(&src, &dst).unwrap();
        let err = max_abs_diff(fit.matrix(), truth);
        assert!(err < 1e-4, "trial {trial}: matrix off by {err}: {fit:?}");
        assert!((fit.scale as f64 - scale).abs() < 1e-4 * scale);
        let dtheta = (fit.rotation as f64 - rotation + PI).rem_euclid(2.0 * PI) - PI;
        assert!(
            dtheta.abs() < 1e-4,
            "trial {trial}: rotation off by {dtheta}"
        );
        assert!(fit.rms_error(&src, &dst).unwrap() < 1e-4);

        // apply, matrix and inverse describe the same map.
        let m = fit.matrix().map(|r| r.map(f64::from));
        let inv = fit.inverse();
        for &p in &src {
            let q = fit.apply(p);
            let r = map(m, p);
            assert!((q[0] - r[0]).abs() < 1e-3 && (q[1] - r[1]).abs() < 1e-3);
            let back = inv.apply(q);
            assert!((back[0] - p[0]).abs() < 1e-3 && (back[1] - p[1]).abs() < 1e-3);
        }
    }
}

#[test]
fn two_points_define_a_similarity_exactly() {
    let truth = similarity_matrix(1.7, 2.5, -30.0, 12.0);
    let src = [[10.0, 20.0], [60.0, 5.0]];
    let dst = src.map(|p| map(truth, p));
    let fit = estimate_similarity(&src, &dst).unwrap();
    assert!(max_abs_diff(fit.matrix(), truth) < 1e-4, "{fit:?}");
}

#[test]
fn mirrored_points_give_the_best_proper_rotation_not_the_mirror() {
    let mut rng = Rng(0xFACE_0000_0000_0042);
    for trial in 0..100 {
        let src = rng.points(5, -100.0, 100.0);
        let dst: Vec<[f32; 2]> = src.iter().map(|p| [-p[0], p[1]]).collect();
        let fit = estimate_similarity(&src, &dst).unwrap();
        assert!(det(fit.matrix()) > 0.0, "trial {trial}: {fit:?}");

        // The mirror fits exactly, so any residual left means it was not returned.
        let spread = src.iter().map(|p| p[0].hypot(p[1])).fold(0.0, f32::max);
        let rms = fit.rms_error(&src, &dst).unwrap();
        assert!(rms > 1e-3 * spread, "trial {trial}: rms {rms}");

        // No proper similarity does better: a fine search over the rotation finds nothing
        // lower than the closed form.
        let ours = rms as f64 * rms as f64 * 5.0;
        let best = (0..36_000)
            .map(|i| cost_at_rotation(&src, &dst, -PI + i as f64 * PI / 18_000.0))
            .fold(f64::INFINITY, f64::min);
        assert!(
            ours <= best * (1.0 + 1e-5) + 1e-6,
            "trial {trial}: {ours} > {best}"
        );
    }
}

#[test]
fn mirror_symmetric_square_has_no_useful_similarity() {
    // Every rotation fits the mirrored square equally badly; the optimum collapses the
    // points onto their centre, which is not an alignment.
    let src = [[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]];
    let dst = src.map(|p| [-p[0], p[1]]);
    let err = estimate_similarity(&src, &dst).unwrap_err();
    assert!(matches!(err, Error::Alignment { .. }), "{err}");
}

fn assert_degenerate(result: mfn_data::Result<Similarity>, what: &str) {
    match result {
        Err(Error::DegenerateLandmarks { message }) => {
            assert!(
                message.contains(what),
                "{message:?} should mention {what:?}"
            )
        }
        other => panic!("expected degenerate landmarks ({what}), got {other:?}"),
    }
}

#[test]
fn degenerate_landmarks_are_errors() {
    let same = [[50.0, 60.0]; 5];
    assert_degenerate(estimate_similarity(&same, &ARCFACE_112), "coincide");

    let line: Vec<[f32; 2]> = (0..5)
        .map(|i| [10.0 + 20.0 * i as f32, 30.0 + 7.0 * i as f32])
        .collect();
    assert_degenerate(estimate_similarity(&line, &ARCFACE_112), "one line");

    // Half a pixel off a line 80 pixels long is still no face.
    let mut nearly = line.clone();
    nearly[2][1] += 0.5;
    assert_degenerate(estimate_similarity(&nearly, &ARCFACE_112), "one line");

    let mut nan = ARCFACE_112;
    nan[3][0] = f32::NAN;
    assert_degenerate(estimate_similarity(&nan, &ARCFACE_112), "point 3");
    let mut inf = ARCFACE_112;
    inf[1][1] = f32::INFINITY;
    assert_degenerate(
        estimate_similarity(&ARCFACE_112, &inf),
        "destination point 1",
    );
    assert_degenerate(estimate_similarity(&ARCFACE_112, &same), "coincide");

    // The same through align, which must not warp garbage.
    let img = RgbImage::new(64, 64);
    for lmk in [same, landmarks(&line), nan] {
        let err = align_arcface(&img, &lmk).unwrap_err();
        assert!(matches!(err, Error::DegenerateLandmarks { .. }), "{err}");
    }
}

#[test]
fn bad_point_sets_and_sizes_are_errors() {
    let alignment = |r: mfn_data::Result<Similarity>| {
        assert!(
            matches!(r, Err(Error::Alignment { .. })),
            "expected an alignment error, got {r:?}"
        )
    };
    alignment(estimate_similarity(&[[1.0, 2.0]], &[[3.0, 4.0]]));
    alignment(estimate_similarity(&[], &[]));
    alignment(estimate_similarity(&ARCFACE_112, &ARCFACE_112[..4]));
    assert!(Similarity::IDENTITY
        .rms_error(&ARCFACE_112[..3], &ARCFACE_112)
        .is_err());

    let empty = RgbImage::new(0, 10);
    let err = align_arcface(&empty, &ARCFACE_112).unwrap_err();
    assert!(matches!(err, Error::Alignment { .. }), "{err}");
    let img = RgbImage::new(10, 10);
    let err = align(&img, &ARCFACE_112, &ARCFACE_112, [112, 0]).unwrap_err();
    assert!(matches!(err, Error::Alignment { .. }), "{err}");
}

#[test]
fn templates_scale_like_insightface() {
    assert_eq!(
        template(Template::Arcface, [112, 112]).unwrap(),
        ARCFACE_112
    );
    let t224 = template(Template::Arcface, [224, 224]).unwrap();
    let t128 = template(Template::Arcface, [128, 128]).unwrap();
    let t256 = template(Template::Arcface, [256, 256]).unwrap();
    for i in 0..5 {
        for k in 0..2 {
            assert_eq!(t224[i][k], ARCFACE_112[i][k] * 2.0);
            let shift = [8.0, 0.0][k];
            assert_eq!(t128[i][k], ARCFACE_112[i][k] + shift);
            assert_eq!(t256[i][k], ARCFACE_112[i][k] * 2.0 + 2.0 * shift);
        }
    }
    assert_eq!(t128[0], [46.2946, 51.6963]);
    assert_eq!(
        template(Template::Sphereface, [96, 112]).unwrap(),
        SPHEREFACE_96X112
    );
    assert_eq!(SPHEREFACE_96X112[0], [30.2946, 51.6963]);

    for (kind, size) in [
        (Template::Arcface, [100, 100]),
        (Template::Arcface, [112, 128]),
        (Template::Arcface, [0, 0]),
        (Template::Arcface, [96, 112]),
        (Template::Sphereface, [112, 112]),
        (Template::Sphereface, [112, 96]),
    ] {
        let err = template(kind, size).unwrap_err();
        assert!(matches!(err, Error::Alignment { .. }), "{kind:?} {size:?}");
        assert!(err
            .to_string()
            .contains(&format!("{}x{}", size[0], size[1])));
    }
}

fn gradient(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (2 * x % 256) as u8,
            (2 * y % 256) as u8,
            ((x * 7 + y * 13) % 256) as u8,
        ])
    })
}

fn noise(w: u32, h: u32, seed: u64) -> RgbImage {
    let mut rng = Rng(seed);
    RgbImage::from_fn(w, h, |_, _| {
        Rgb([0; 3].map(|_: u8| (rng.unit() * 256.0) as u8))
    })
}

/// OpenCV's `warpAffine` with `INTER_LINEAR` and a black constant border, in f64: output
/// pixel (x, y) samples the source at `transform⁻¹ (x, y)`, pixel centres at integer
/// coordinates, pixels outside the image black.
fn reference_warp(img: &RgbImage, transform: &Similarity, [w, h]: [u32; 2]) -> RgbImage {
    let inv = transform.inverse().matrix().map(|r| r.map(f64::from));
    let px = |x: i64, y: i64, c: usize| -> f64 {
        if x < 0 || y < 0 || x >= img.width() as i64 || y >= img.height() as i64 {
            0.0
        } else {
            img.get_pixel(x as u32, y as u32)[c] as f64
        }
    };
    RgbImage::from_fn(w, h, |x, y| {
        let (x, y) = (x as f64, y as f64);
        let sx = inv[0][0] * x + inv[0][1] * y + inv[0][2];
        let sy = inv[1][0] * x + inv[1][1] * y + inv[1][2];
        let (x0, y0) = (sx.floor(), sy.floor());
        let (fx, fy) = (sx - x0, sy - y0);
        let (x0, y0) = (x0 as i64, y0 as i64);
        Rgb([0, 1, 2].map(|c| {
            let top = px(x0, y0, c) * (1.0 - fx) + px(x0 + 1, y0, c) * fx;
            let bottom = px(x0, y0 + 1, c) * (1.0 - fx) + px(x0 + 1, y0 + 1, c) * fx;
            (top * (1.0 - fy) + bottom * fy).round().clamp(0.0, 255.0) as u8
        }))
    })
}

/// The largest per-channel difference and how many channels differ at all.
fn compare(a: &RgbImage, b: &RgbImage) -> (u8, usize) {
    assert_eq!(a.dimensions(), b.dimensions());
    let diffs = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(p, q)| p.abs_diff(*q));
    diffs.fold((0, 0), |(max, n), d| (max.max(d), n + (d > 0) as usize))
}

#[test]
fn template_landmarks_give_the_identity_warp() {
    let img = gradient(112, 112);
    let aligned = align_arcface(&img, &ARCFACE_112).unwrap();
    assert_eq!(aligned.image.dimensions(), (112, 112));
    assert!(aligned.residual < 1e-4, "residual {}", aligned.residual);
    assert!(
        max_abs_diff(
            aligned.transform.matrix(),
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
        ) < 1e-4
    );
    // The last row and column too: samples on the image's edge are not border.
    let (max, _) = compare(&aligned.image, &img);
    assert!(max <= 1, "identity warp differs by {max} levels");
}

#[test]
fn integer_translation_shifts_pixels_exactly_and_fills_black() {
    let img = noise(150, 130, 7);
    let (dx, dy) = (7i64, -5i64);
    let lmk = ARCFACE_112.map(|[x, y]| [x + dx as f32, y + dy as f32]);
    let aligned = align(&img, &lmk, &ARCFACE_112, [160, 120]).unwrap();
    assert_eq!(aligned.image.dimensions(), (160, 120));
    let mut black = 0;
    for (x, y, p) in aligned.image.enumerate_pixels() {
        let (sx, sy) = (x as i64 + dx, y as i64 + dy);
        if (0..150).contains(&sx) && (0..130).contains(&sy) {
            assert_eq!(p, img.get_pixel(sx as u32, sy as u32), "at ({x}, {y})");
        } else {
            assert_eq!(*p, Rgb([0, 0, 0]), "border at ({x}, {y})");
            black += 1;
        }
    }
    // Rows 0..5 and columns 143..160 fall outside the source.
    assert_eq!(black, 5 * 160 + 17 * 115);
}

#[test]
fn samples_across_the_edge_blend_with_black_like_opencv() {
    // Half a pixel to the right: the last output column samples halfway between the last
    // source column and the black outside.
    let img = RgbImage::from_pixel(40, 30, Rgb([200, 100, 50]));
    let lmk = ARCFACE_112.map(|[x, y]| [x + 0.5, y]);
    let aligned = align(&img, &lmk, &ARCFACE_112, [40, 30]).unwrap();
    assert_eq!(*aligned.image.get_pixel(38, 10), Rgb([200, 100, 50]));
    assert_eq!(*aligned.image.get_pixel(39, 10), Rgb([100, 50, 25]));
}

#[test]
fn output_has_exactly_the_requested_size() {
    let img = noise(250, 250, 3);
    let lmk = [
        [100.0, 110.0],
        [150.0, 112.0],
        [126.0, 140.0],
        [104.0, 160.0],
        [145.0, 161.0],
    ];
    for size in [[112, 112], [96, 112], [200, 50], [1, 1], [300, 301]] {
        let t = ARCFACE_112.map(|[x, y]| [x * size[0] as f32 / 112.0, y * size[1] as f32 / 112.0]);
        let aligned = align(&img, &lmk, &t, size).unwrap();
        assert_eq!(aligned.image.dimensions(), (size[0], size[1]));
    }
    let out_of_view = align(
        &img,
        &lmk,
        &ARCFACE_112.map(|[x, y]| [x + 5000.0, y]),
        [50, 50],
    );
    let black = out_of_view.unwrap().image;
    assert!(black.pixels().all(|p| *p == Rgb([0, 0, 0])));
}

#[test]
fn warp_matches_an_independent_opencv_style_reference() {
    let mut rng = Rng(0xBEEF_0000_1111_2222);
    let img = noise(200, 180, 11);
    let mut differing = 0;
    for trial in 0..40 {
        // A face somewhere in the image, turned, scaled and partly outside.
        let truth = similarity_matrix(
            rng.range(0.4, 2.5),
            rng.range(-PI, PI),
            rng.range(-100.0, 200.0),
            rng.range(-100.0, 200.0),
        );
        let [[a, mb, tx], [b, _, ty]] = truth;
        let n = a * a + b * b;
        let inv = [
            [a / n, b / n, -(a * tx + b * ty) / n],
            [-b / n, a / n, (b * tx - a * ty) / n],
        ];
        assert!((mb + b).abs() < 1e-12);
        let lmk = ARCFACE_112.map(|p| map(inv, p));
        let aligned = align_arcface(&img, &lmk).unwrap();
        assert!(
            aligned.residual < 1e-3,
            "trial {trial}: {}",
            aligned.residual
        );
        let expected = reference_warp(&img, &aligned.transform, [112, 112]);
        let (max, n) = compare(&aligned.image, &expected);
        assert!(max <= 1, "trial {trial}: differs by {max}");
        differing += n;
    }
    // Off-by-one only where a value sits on a rounding boundary.
    assert!(
        differing < 40 * 112 * 112 * 3 / 1000,
        "{differing} values differ"
    );
}

#[test]
fn residual_is_small_for_a_face_and_large_for_scrambled_landmarks() {
    let img = noise(250, 250, 5);
    let truth = similarity_matrix(0.6, 0.2, -20.0, -40.0);
    let lmk = ARCFACE_112.map(|p| map(truth, p));
    let good = align_arcface(&img, &lmk).unwrap();
    assert!(good.residual < 1e-3, "{}", good.residual);

    let scrambled = [lmk[3], lmk[1], lmk[4], lmk[0], lmk[2]];
    let bad = align_arcface(&img, &scrambled).unwrap();
    assert!(bad.residual > 10.0, "{}", bad.residual);
}

/// `skimage.transform.SimilarityTransform.estimate(lmk, arcface_dst).params[:2]` for the
/// first three faces of the landmarks file (landmarks as float64), with scikit-image 0.26.
const SKIMAGE_MATRICES: [(&str, [[f64; 3]; 2]); 3] = [
    (
        "Ariel_Sharon/Ariel_Sharon_0010.jpg",
        [
            [0.7845490406934694, 0.09357451244688252, -53.827143736779874],
            [
                -0.09357451244688249,
                0.7845490406934693,
                -23.213365169266666,
            ],
        ],
    ),
    (
        "Ariel_Sharon/Ariel_Sharon_0009.jpg",
        [
            [0.8105748717671991, -0.08453634575473688, -32.1676554588787],
            [0.08453634575473687, 0.8105748717671991, -47.259431325718694],
        ],
    ),
    (
        "Ariel_Sharon/Ariel_Sharon_0008.jpg",
        [
            [0.8319142118626247, 0.04714577788010132, -55.51742070813401],
            [
                -0.04714577788010131,
                0.8319142118626246,
                -31.943240762124532,
            ],
        ],
    ),
];

/// The mean and largest residual, in pixels of the 112x112 crop, of scikit-image's fit over
/// all 100 faces. These integer landmarks sit up to 7.3 px from the ArcFace layout even
/// under insightface's own fit, so the bound below is the data's, not a tolerance of ours.
const SKIMAGE_MEAN_RESIDUAL: f64 = 3.145392;
const SKIMAGE_MAX_RESIDUAL: f64 = 7.327696;

#[test]
fn aligns_real_lfw_photos_onto_the_template() {
    let faces = read_landmarks_file(&asset("lfw-raw-subset/landmarks.txt")).unwrap();
    assert_eq!(faces.len(), 100);
    let images = asset("lfw-raw-subset/images");

    for (path, matrix) in SKIMAGE_MATRICES {
        let (_, lmk) = faces.iter().find(|(p, _)| p == Path::new(path)).unwrap();
        let fit = estimate_similarity(lmk, &ARCFACE_112).unwrap();
        let err = max_abs_diff(fit.matrix(), matrix);
        assert!(err < 2e-5, "{path}: {err}");
    }

    let mut residuals = Vec::new();
    for (path, lmk) in &faces {
        let name = path.display();
        let img = decode_rgb(&images.join(path)).unwrap();
        assert_eq!(img.dimensions(), (250, 250), "{name}");
        let aligned = align_arcface(&img, lmk).unwrap();
        assert_eq!(aligned.image.dimensions(), (112, 112));
        let recomputed = aligned.transform.rms_error(lmk, &ARCFACE_112).unwrap();
        assert!((aligned.residual - recomputed).abs() < 1e-3, "{name}");
        assert!(
            aligned.residual < 8.0,
            "{name}: residual {}",
            aligned.residual
        );
        residuals.push(aligned.residual as f64);

        // The eyes, which the fit weighs most, land on the template's eyes: their midpoint
        // within 3.5 px (at most 3.33 with scikit-image), each eye within 7 px.
        let [l, r] = [0, 1].map(|i| aligned.transform.apply(lmk[i]));
        let mid = [(l[0] + r[0]) / 2.0, (l[1] + r[1]) / 2.0];
        let [tl, tr] = [ARCFACE_112[0], ARCFACE_112[1]];
        let tmid = [(tl[0] + tr[0]) / 2.0, (tl[1] + tr[1]) / 2.0];
        let off = (mid[0] - tmid[0]).hypot(mid[1] - tmid[1]);
        assert!(off < 3.5, "{name}: eyes' midpoint lands {off} px off");
        for (eye, target) in [(l, tl), (r, tr)] {
            let off = (eye[0] - target[0]).hypot(eye[1] - target[1]);
            assert!(off < 7.0, "{name}: an eye lands {off} px off");
        }

        // LFW faces sit in the middle of the photo: the crop is all picture, no border.
        let black = aligned
            .image
            .pixels()
            .filter(|p| **p == Rgb([0, 0, 0]))
            .count();
        assert!(black < 112 * 112 / 100, "{name}: {black} black pixels");
        let expected = reference_warp(&img, &aligned.transform, [112, 112]);
        let (max, _) = compare(&aligned.image, &expected);
        assert!(max <= 1, "{name}: differs from the reference by {max}");
    }
    let mean = residuals.iter().sum::<f64>() / residuals.len() as f64;
    let max = residuals.iter().copied().fold(0.0, f64::max);
    assert!(
        (mean - SKIMAGE_MEAN_RESIDUAL).abs() < 1e-3,
        "mean residual {mean}"
    );
    assert!(
        (max - SKIMAGE_MAX_RESIDUAL).abs() < 1e-3,
        "largest residual {max}"
    );
}

#[test]
fn landmark_file_errors_name_the_file_and_line() {
    let path = Path::new("faces/landmarks.txt");
    let good = "a/b_0001.jpg\t1\t2\t3\t4\t5\t6\t7\t8\t9\t10\n\nc/d.jpg\t1.5\t2\t3\t4\t5\t6\t7\t8\t9\t10\r\n";
    let faces = parse_landmarks(good, path).unwrap();
    assert_eq!(faces.len(), 2);
    assert_eq!(faces[0].0, Path::new("a/b_0001.jpg"));
    assert_eq!(
        faces[0].1,
        [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]
    );
    assert_eq!(faces[1].1[0], [1.5, 2.0]);

    let short = format!("{good}e.jpg\t1\t2\t3\t4\t5\t6\t7\t8\t9\n");
    match parse_landmarks(&short, path).unwrap_err() {
        e @ Error::LandmarksFile { line: 4, .. } => {
            let text = e.to_string();
            assert!(text.starts_with("faces/landmarks.txt:4:"), "{text}");
            assert!(text.contains("found 10"), "{text}");
        }
        e => panic!("wrong error: {e}"),
    }

    for bad in [
        "x\t1\t2\t3\tfour\t5\t6\t7\t8\t9\t10",
        "x\t1\t2\t3\tNaN\t5\t6\t7\t8\t9\t10",
    ] {
        match parse_landmarks(bad, path).unwrap_err() {
            e @ Error::LandmarksFile { line: 1, .. } => {
                let text = e.to_string();
                assert!(text.contains("field 5 (right eye y)"), "{text}");
            }
            e => panic!("wrong error: {e}"),
        }
    }

    let missing = Path::new("/nonexistent/mfn/landmarks.txt");
    match read_landmarks_file(missing).unwrap_err() {
        e @ Error::Io { .. } => assert!(e.to_string().contains("/nonexistent/mfn/landmarks.txt")),
        e => panic!("wrong error: {e}"),
    }

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("landmarks.txt");
    std::fs::write(&file, good).unwrap();
    assert_eq!(read_landmarks_file(&file).unwrap(), faces);
}
