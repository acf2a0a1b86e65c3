use std::f64::consts::PI;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use mfn_loss::{cross_entropy, CombinedMargin, Error, Fallback, MarginHead};

fn t1(v: &[f64]) -> Tensor {
    Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap()
}

fn target_logits(m: &CombinedMargin, cos: &[f64]) -> Vec<f64> {
    m.target_logit(&t1(cos)).unwrap().to_vec1::<f64>().unwrap()
}

fn close(a: f64, b: f64, tol: f64) {
    assert!((a - b).abs() <= tol, "{a} vs {b} (tol {tol})");
}

#[test]
fn arcface_known_value() {
    let m = CombinedMargin::arcface(64.0, 0.5);
    // cos(acos(0.8) + 0.5) = 0.8 cos 0.5 - 0.6 sin 0.5
    let want = 64.0 * (0.8 * 0.5f64.cos() - 0.6 * 0.5f64.sin());
    close(target_logits(&m, &[0.8])[0], want, 1e-9);
    close(want, 26.522_286_9, 1e-6);
    // Default is the same preset.
    assert_eq!(CombinedMargin::default(), m);
}

#[test]
fn arcface_linear_fallback_value() {
    let m = CombinedMargin::arcface(64.0, 0.5);
    // cos = -0.95 < c* = cos(pi - 0.5) = -cos 0.5 -> (cos - c*) - 1
    let want = 64.0 * (-0.95 + 0.5f64.cos() - 1.0);
    close(target_logits(&m, &[-0.95])[0], want, 1e-9);
}

#[test]
fn cosface_combined_sphereface_values() {
    let cf = CombinedMargin::cosface(64.0, 0.35);
    close(target_logits(&cf, &[0.7])[0], 64.0 * 0.35, 1e-9);
    close(target_logits(&cf, &[-0.99])[0], 64.0 * (-0.99 - 0.35), 1e-9);

    let cb = CombinedMargin::combined(64.0, 1.0, 0.3, 0.2);
    let want = 64.0 * (0.6 * 0.3f64.cos() - 0.8 * 0.3f64.sin() - 0.2);
    close(target_logits(&cb, &[0.6])[0], want, 1e-9);

    // sphereface m1 = 2: cos(2 theta) = 2 cos^2 - 1 for theta <= pi/2
    let sf = CombinedMargin::sphereface(30.0, 2.0);
    let got = target_logits(&sf, &[0.9, 0.2, -0.5]);
    close(got[0], 30.0 * (2.0 * 0.81 - 1.0), 1e-9);
    close(got[1], 30.0 * (2.0 * 0.04 - 1.0), 1e-9);
    // beyond theta* = pi/2 (c* = 0): (cos - 0) - 1
    close(got[2], 30.0 * (-0.5 - 1.0), 1e-9);

    // normalised softmax: s * cos
    let sm = CombinedMargin::softmax(10.0);
    let got = target_logits(&sm, &[0.3, -0.7]);
    close(got[0], 3.0, 1e-9);
    close(got[1], -7.0, 1e-9);
}

#[test]
fn linear_fallback_continuous_and_monotonic() {
    for m in [
        CombinedMargin::arcface(64.0, 0.5),
        CombinedMargin::combined(64.0, 1.2, 0.3, 0.1),
        CombinedMargin::sphereface(64.0, 3.0),
    ] {
        let ts = m.threshold_angle();
        assert!(ts < PI);
        let step = 1e-4;
        let thetas: Vec<f64> = (0..=1000).map(|i| ts - 0.05 + i as f64 * step).collect();
        let cos: Vec<f64> = thetas.iter().map(|t| t.cos()).collect();
        let v = target_logits(&m, &cos);
        for w in v.windows(2) {
            assert!(w[1] < w[0], "{m:?}: not strictly decreasing: {w:?}");
            // continuity: steps bounded by s * (max slope) * dtheta
            assert!(w[0] - w[1] < m.s * m.m1 * 2.0 * step, "{m:?}: jump {w:?}");
        }
        // value at the threshold is s(-1 - m3) from both sides
        let at = target_logits(&m, &[(ts - 1e-9).cos(), (ts + 1e-9).cos()]);
        close(at[0], m.s * (-1.0 - m.m3), 1e-4);
        close(at[1], m.s * (-1.0 - m.m3), 1e-4);
        // whole range [0, pi] monotone
        let cos: Vec<f64> = (0..=2000).map(|i| (i as f64 * PI / 2000.0).cos()).collect();
        let v = target_logits(&m, &cos);
        assert!(v.windows(2).all(|w| w[1] < w[0]), "{m:?}");
    }
}

#[test]
fn easy_margin_rule() {
    let m = CombinedMargin::arcface(64.0, 0.5).with_fallback(Fallback::EasyMargin);
    let got = target_logits(&m, &[0.3, -0.3, 0.0, -0.95]);
    let margin = |c: f64| 64.0 * (c * 0.5f64.cos() - (1.0 - c * c).sqrt() * 0.5f64.sin());
    close(got[0], margin(0.3), 1e-9);
    close(got[1], 64.0 * -0.3, 1e-9);
    close(got[2], 0.0, 1e-9);
    close(got[3], 64.0 * -0.95, 1e-9);
    // Differs from Linear in the negative region.
    let lin = target_logits(&CombinedMargin::arcface(64.0, 0.5), &[-0.3]);
    assert!((lin[0] - got[1]).abs() > 1.0);
}

#[test]
fn logits_non_target_is_s_cos() {
    let m = CombinedMargin::arcface(64.0, 0.5);
    let cos = Tensor::new(&[[0.8f64, 0.1, -0.2], [0.3, 0.5, 0.9]], &Device::Cpu).unwrap();
    let labels = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
    let l = m.logits(&cos, &labels).unwrap().to_vec2::<f64>().unwrap();
    close(l[0][1], 6.4, 1e-9);
    close(l[0][2], -12.8, 1e-9);
    close(l[1][0], 19.2, 1e-9);
    close(l[1][1], 32.0, 1e-9);
    close(
        l[0][0],
        64.0 * (0.8 * 0.5f64.cos() - 0.6 * 0.5f64.sin()),
        1e-9,
    );
    let c9 = 0.9f64;
    close(
        l[1][2],
        64.0 * (c9 * 0.5f64.cos() - (1.0 - c9 * c9).sqrt() * 0.5f64.sin()),
        1e-9,
    );
}

#[test]
fn sub_center_max_picks_right_centre() {
    let dev = Device::Cpu;
    // 2 classes x 3 sub-centres in 3-d; row c*3 + j
    let w = Tensor::new(
        &[
            [1.0f64, 0.0, 0.0],
            [0.0, 1.0, 0.0],
            [0.0, 0.0, -1.0],
            [-1.0, 0.0, 0.0],
            [0.0, 0.0, 2.0], // class 1, sub-centre 1: aligned with e
            [0.0, -1.0, 0.0],
        ],
        &dev,
    )
    .unwrap();
    let e = Tensor::new(&[[0.0f64, 0.6, 0.8]], &dev).unwrap();
    let head = MarginHead::from_weight(w, 3, CombinedMargin::softmax(1.0)).unwrap();
    assert_eq!(head.classes(), 2);
    let cos = head.cosine(&e).unwrap().to_vec2::<f64>().unwrap();
    close(cos[0][0], 0.6, 1e-9); // max(0, 0.6, -0.8)
    close(cos[0][1], 0.8, 1e-9); // max(0, 0.8, -0.6)
}

#[test]
fn filter_threshold_drops_non_target() {
    let dev = Device::Cpu;
    let w = Var::new(&[[1.0f64, 0.0], [0.0, 1.0], [0.6, 0.8]], &dev).unwrap();
    let head = MarginHead::from_weight(w.as_tensor().clone(), 1, CombinedMargin::arcface(8.0, 0.5))
        .unwrap()
        .with_filter_threshold(Some(0.7))
        .unwrap();
    let e = Var::new(&[[0.6f64, 0.8]], &dev).unwrap();
    let labels = Tensor::new(&[0u32], &dev).unwrap();
    // cos = [0.6, 0.8, 1.0]: class 1 (0.8) and 2 (1.0) are non-target and above 0.7.
    let l = head
        .forward(e.as_tensor(), &labels)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    assert!(l[0][1] == f64::NEG_INFINITY && l[0][2] == f64::NEG_INFINITY);
    assert!(l[0][0].is_finite());
    let loss = head.loss(e.as_tensor(), &labels).unwrap();
    close(loss.to_scalar::<f64>().unwrap(), 0.0, 1e-12);
    let g = loss.backward().unwrap();
    for v in [&e, &w] {
        let gv = g
            .get(v)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!(gv.iter().all(|x| x.is_finite()), "{gv:?}");
    }
    // The target itself is never filtered.
    let labels = Tensor::new(&[2u32], &dev).unwrap();
    let l = head
        .forward(e.as_tensor(), &labels)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    assert!(l[0][2].is_finite() && l[0][1] == f64::NEG_INFINITY && l[0][0].is_finite());
}

#[test]
fn cross_entropy_hand_value() {
    let dev = Device::Cpu;
    let logits = Tensor::new(&[[1.0f64, 2.0, 3.0], [0.0, 0.0, 0.0]], &dev).unwrap();
    let labels = Tensor::new(&[2u32, 0], &dev).unwrap();
    let e = std::f64::consts::E;
    let row0 = (e + e * e + e * e * e).ln() - 3.0;
    let row1 = 3f64.ln();
    let got = cross_entropy(&logits, &labels)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    close(got, (row0 + row1) / 2.0, 1e-12);
    close(row0, 0.407_605_964_4, 1e-9);
}

// ---- gradient checks ----

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.next()).collect()
    }
}

const N: usize = 4;
const DIM: usize = 5;
const C: usize = 3;

fn eval(
    m: &CombinedMargin,
    k: usize,
    e: &[f64],
    w: &[f64],
    labels: &[u32],
    r: &[f64],
    ce: bool,
) -> f64 {
    let dev = Device::Cpu;
    let et = Tensor::from_slice(e, (N, DIM), &dev).unwrap();
    let wt = Tensor::from_slice(w, (C * k, DIM), &dev).unwrap();
    let lt = Tensor::from_slice(labels, N, &dev).unwrap();
    let head = MarginHead::from_weight(wt, k, *m).unwrap();
    if ce {
        head.loss(&et, &lt).unwrap().to_scalar::<f64>().unwrap()
    } else {
        let rt = Tensor::from_slice(r, (N, C), &dev).unwrap();
        (head.forward(&et, &lt).unwrap() * rt)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }
}

/// True when no cosine is near a non-differentiable point.
fn safe_case(m: &CombinedMargin, k: usize, e: &[f64], w: &[f64], labels: &[u32]) -> bool {
    let dev = Device::Cpu;
    let et = Tensor::from_slice(e, (N, DIM), &dev).unwrap();
    let wt = Tensor::from_slice(w, (C * k, DIM), &dev).unwrap();
    let head = MarginHead::from_weight(wt.clone(), k, *m).unwrap();
    let cos = head.cosine(&et).unwrap().to_vec2::<f64>().unwrap();
    let ts = m.threshold_angle();
    for (i, row) in cos.iter().enumerate() {
        let t = row[labels[i] as usize];
        if ts < PI && (t - ts.cos()).abs() < 0.05 {
            return false;
        }
        if m.fallback == Fallback::EasyMargin && t.abs() < 0.05 {
            return false;
        }
    }
    if k > 1 {
        let raw = MarginHead::from_weight(wt, 1, *m)
            .unwrap()
            .cosine(&et)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        for row in raw {
            for c in 0..C {
                let mut s: Vec<f64> = row[c * k..(c + 1) * k].to_vec();
                s.sort_by(|a, b| b.partial_cmp(a).unwrap());
                if s[0] - s[1] < 0.02 {
                    return false;
                }
            }
        }
    }
    true
}

fn grad_check(m: CombinedMargin, k: usize, ce: bool) {
    let mut rng = Lcg(0x5eed ^ (k as u64) ^ m.m1.to_bits() ^ m.m2.to_bits() ^ m.m3.to_bits());
    let labels = [0u32, 2, 1, 2];
    let (e, w, r) = loop {
        let e = rng.vec(N * DIM);
        let w = rng.vec(C * k * DIM);
        let r = rng.vec(N * C);
        if safe_case(&m, k, &e, &w, &labels) {
            break (e, w, r);
        }
    };
    let dev = Device::Cpu;
    let ev = Var::from_slice(&e, (N, DIM), &dev).unwrap();
    let wv = Var::from_slice(&w, (C * k, DIM), &dev).unwrap();
    let head = MarginHead::from_weight(wv.as_tensor().clone(), k, m).unwrap();
    let lt = Tensor::from_slice(&labels, N, &dev).unwrap();
    let loss = if ce {
        head.loss(ev.as_tensor(), &lt).unwrap()
    } else {
        let rt = Tensor::from_slice(&r, (N, C), &dev).unwrap();
        (head.forward(ev.as_tensor(), &lt).unwrap() * rt)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = loss.backward().unwrap();
    let ge = grads
        .get(&ev)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let gw = grads
        .get(&wv)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let h = 1e-6;
    let mut checked = 0;
    for i in 0..e.len() {
        let (mut ep, mut em) = (e.clone(), e.clone());
        ep[i] += h;
        em[i] -= h;
        let num = (eval(&m, k, &ep, &w, &labels, &r, ce) - eval(&m, k, &em, &w, &labels, &r, ce))
            / (2.0 * h);
        assert!(
            (num - ge[i]).abs() <= 1e-5 * (1.0 + num.abs()),
            "{m:?} k={k} de[{i}]: fd {num} vs ad {}",
            ge[i]
        );
        checked += 1;
    }
    for i in 0..w.len() {
        let (mut wp, mut wm) = (w.clone(), w.clone());
        wp[i] += h;
        wm[i] -= h;
        let num = (eval(&m, k, &e, &wp, &labels, &r, ce) - eval(&m, k, &e, &wm, &labels, &r, ce))
            / (2.0 * h);
        assert!(
            (num - gw[i]).abs() <= 1e-5 * (1.0 + num.abs()),
            "{m:?} k={k} dW[{i}]: fd {num} vs ad {}",
            gw[i]
        );
        checked += 1;
    }
    assert_eq!(checked, N * DIM + C * k * DIM);
    assert!(ge.iter().any(|g| g.abs() > 1e-6) && gw.iter().any(|g| g.abs() > 1e-6));
}

fn presets() -> Vec<CombinedMargin> {
    vec![
        CombinedMargin::softmax(64.0),
        CombinedMargin::sphereface(64.0, 1.35),
        CombinedMargin::sphereface(16.0, 4.0),
        CombinedMargin::arcface(64.0, 0.5),
        CombinedMargin::arcface(64.0, 0.5).with_fallback(Fallback::EasyMargin),
        CombinedMargin::cosface(64.0, 0.35),
        CombinedMargin::combined(64.0, 1.0, 0.3, 0.2),
        CombinedMargin::combined(32.0, 1.5, 0.8, 0.1),
    ]
}

#[test]
fn gradients_match_finite_differences() {
    for m in presets() {
        grad_check(m, 1, false);
    }
}

#[test]
fn gradients_match_finite_differences_sub_centres_and_ce() {
    for m in presets() {
        grad_check(m, 3, false);
    }
    grad_check(CombinedMargin::arcface(8.0, 0.5), 1, true);
    grad_check(CombinedMargin::cosface(8.0, 0.35), 2, true);
}

#[test]
fn gradient_through_linear_fallback_region() {
    // target cos well below c*: d logit / d cos = s (slope 1 in cos)
    let m = CombinedMargin::arcface(64.0, 0.5);
    let c = Var::new(&[-0.97f64, 0.2], &Device::Cpu).unwrap();
    let g = m
        .target_logit(c.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = g.get(&c).unwrap().to_vec1::<f64>().unwrap();
    close(g[0], 64.0, 1e-9);
    // above: d/dc cos(acos c + m) = cos m + c sin m / sqrt(1 - c^2)
    close(
        g[1],
        64.0 * (0.5f64.cos() + 0.2 * 0.5f64.sin() / (1.0f64 - 0.04).sqrt()),
        1e-7,
    );
}

// ---- errors ----

#[test]
fn error_cases() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let good = CombinedMargin::arcface(64.0, 0.5);
    assert!(matches!(
        MarginHead::new(vb.clone(), 3, 4, 0, good),
        Err(Error::ZeroSubCenters)
    ));
    assert!(matches!(
        MarginHead::new(vb.clone(), 3, 4, 1, CombinedMargin::arcface(0.0, 0.5)),
        Err(Error::NonPositiveScale(_))
    ));
    assert!(matches!(
        MarginHead::new(vb.clone(), 3, 4, 1, CombinedMargin::cosface(-1.0, 0.35)),
        Err(Error::NonPositiveScale(_))
    ));
    assert!(matches!(
        MarginHead::new(vb.clone(), 3, 4, 1, CombinedMargin::sphereface(64.0, 0.0)),
        Err(Error::InvalidMargin(_))
    ));
    assert!(matches!(
        MarginHead::new(vb.clone(), 0, 4, 1, good),
        Err(Error::EmptyHead)
    ));
    let head = MarginHead::new(vb.clone(), 3, 4, 2, good).unwrap();
    assert_eq!(head.weight().dims(), &[6, 4]);
    let e = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
    let e5 = Tensor::zeros((2, 5), DType::F32, &dev).unwrap();
    let ok = Tensor::new(&[0u32, 2], &dev).unwrap();
    assert!(head.forward(&e, &ok).is_ok());
    assert!(matches!(
        head.forward(&e5, &ok),
        Err(Error::DimMismatch {
            expected: 4,
            got: 5
        })
    ));
    assert!(matches!(
        head.forward(&e, &Tensor::new(&[0u32, 3], &dev).unwrap()),
        Err(Error::LabelOutOfRange {
            index: 1,
            label: 3,
            classes: 3
        })
    ));
    assert!(matches!(
        head.forward(&e, &Tensor::new(&[0i64, 1], &dev).unwrap()),
        Err(Error::LabelDType(DType::I64))
    ));
    assert!(matches!(
        head.forward(&e, &Tensor::new(&[0u32], &dev).unwrap()),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        head.clone().with_filter_threshold(Some(1.5)),
        Err(Error::InvalidFilterThreshold(_))
    ));
    assert!(matches!(
        MarginHead::from_weight(Tensor::zeros((5, 4), DType::F32, &dev).unwrap(), 2, good),
        Err(Error::WeightRows { rows: 5, k: 2 })
    ));
    // public fields are checked at use
    let bad = CombinedMargin {
        s: f64::NAN,
        ..good
    };
    assert!(matches!(
        bad.target_logit(&t1(&[0.5])),
        Err(Error::NonPositiveScale(_))
    ));
    let bad = CombinedMargin { m2: 4.0, ..good };
    assert!(matches!(
        bad.target(&t1(&[0.5])),
        Err(Error::InvalidMargin(_))
    ));
    let logits = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
    assert!(matches!(
        cross_entropy(&logits, &Tensor::new(&[0u32, 7], &dev).unwrap()),
        Err(Error::LabelOutOfRange { .. })
    ));
    assert!(matches!(
        cross_entropy(&t1(&[1.0]), &ok),
        Err(Error::Shape(_))
    ));
}

#[test]
fn works_in_f32_with_varmap() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let head = MarginHead::new(vb, 5, 8, 2, CombinedMargin::default()).unwrap();
    let e = Tensor::randn(0f32, 1.0, (3, 8), &dev).unwrap();
    let labels = Tensor::new(&[4u32, 0, 2], &dev).unwrap();
    let loss = head.loss(&e, &labels).unwrap();
    let v = loss.to_scalar::<f32>().unwrap();
    assert!(v.is_finite() && v > 0.0);
    let g = loss.backward().unwrap();
    let gw = g
        .get(head.weight())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(gw.iter().all(|x| x.is_finite()) && gw.iter().any(|x| *x != 0.0));
}
