//! Channel-vector loops for the window convs (depthwise and dense) and the row epilogues, compiled once plainly and once with AVX2 + FMA, chosen at run
//! time, so that one binary runs everywhere and uses FMA where the CPU has it.
//!
//! Channels are processed in blocks of [`BLOCK`]; a full block is a fixed-size array,
//! which the compiler keeps in vector registers across all taps of a kernel.

/// Channels per register block: 8 AVX2 registers.
const BLOCK: usize = 64;

/// `acc[i] += x[i] * w[i]`, fused where the target allows it.
#[inline(always)]
fn madd<const FMA: bool>(acc: &mut [f32], x: &[f32], w: &[f32]) {
    for ((a, x), w) in acc.iter_mut().zip(x).zip(w) {
        *a = if FMA { x.mul_add(*w, *a) } else { *a + x * w };
    }
}

/// [`madd`] on a full block, with the length known at compile time.
#[inline(always)]
fn madd_block<const FMA: bool>(acc: &mut [f32; BLOCK], x: &[f32], w: &[f32]) {
    let (Ok(x), Ok(w)) = (<&[f32; BLOCK]>::try_from(x), <&[f32; BLOCK]>::try_from(w)) else {
        return madd::<FMA>(acc, x, w);
    };
    for i in 0..BLOCK {
        acc[i] = if FMA {
            x[i].mul_add(w[i], acc[i])
        } else {
            acc[i] + x[i] * w[i]
        };
    }
}

/// `acc[i] += s * w[i]` on a full block.
#[inline(always)]
fn saxpy_block<const FMA: bool>(acc: &mut [f32; BLOCK], s: f32, w: &[f32]) {
    let Ok(w) = <&[f32; BLOCK]>::try_from(w) else {
        for (a, w) in acc.iter_mut().zip(w) {
            *a = if FMA { s.mul_add(*w, *a) } else { *a + s * w };
        }
        return;
    };
    for i in 0..BLOCK {
        acc[i] = if FMA {
            s.mul_add(w[i], acc[i])
        } else {
            acc[i] + s * w[i]
        };
    }
}

/// Branch-free PReLU, so that it vectorises.
#[inline(always)]
fn prelu(y: f32, a: f32) -> f32 {
    y.max(0.0) + a * y.min(0.0)
}

/// Bias then optional PReLU on rows of `bias.len()` channels.
#[inline(always)]
fn bias_prelu_impl<const FMA: bool>(rows: &mut [f32], bias: &[f32], slope: Option<&[f32]>) {
    for row in rows.chunks_exact_mut(bias.len()) {
        match slope {
            Some(a) => {
                for ((v, b), a) in row.iter_mut().zip(bias).zip(a) {
                    *v = prelu(*v + b, *a);
                }
            }
            None => row.iter_mut().zip(bias).for_each(|(v, b)| *v += b),
        }
    }
}

/// Residual plus bias: `dst = src + bias`, row by row.
#[inline(always)]
fn add_bias_impl<const FMA: bool>(dst: &mut [f32], src: &[f32], bias: &[f32]) {
    for (d, s) in dst
        .chunks_exact_mut(bias.len())
        .zip(src.chunks_exact(bias.len()))
    {
        for ((d, s), b) in d.iter_mut().zip(s).zip(bias) {
            *d = s + b;
        }
    }
}

/// Stores a block, with PReLU when given.
#[inline(always)]
fn store(out: &mut [f32], acc: &[f32], slope: Option<&[f32]>) {
    match slope {
        Some(a) => {
            for ((o, v), a) in out.iter_mut().zip(acc).zip(a) {
                *o = prelu(*v, *a);
            }
        }
        None => out.copy_from_slice(acc),
    }
}

/// The range of kernel taps `k` for which `o * stride + k - pad` lies in `0..size`.
#[inline(always)]
fn valid_taps(o: usize, stride: usize, pad: usize, k: usize, size: usize) -> (usize, usize, isize) {
    let start = (o * stride) as isize - pad as isize;
    let lo = (-start).max(0) as usize;
    let hi = (size as isize - start).clamp(0, k as isize) as usize;
    (lo.min(hi), hi, start)
}

/// One output row of a depthwise conv in NHWC.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn depthwise_row_impl<const FMA: bool>(
    out: &mut [f32],
    input: &[f32],
    (h, w, c): (usize, usize, usize),
    oy: usize,
    weights: &[f32],
    bias: &[f32],
    slope: Option<&[f32]>,
    (kh, kw, stride, ph, pw): (usize, usize, usize, usize, usize),
) {
    let wo = out.len() / c;
    let (ky_lo, ky_hi, iy0) = valid_taps(oy, stride, ph, kh, h);
    for ox in 0..wo {
        let (kx_lo, kx_hi, ix0) = valid_taps(ox, stride, pw, kw, w);
        let o = &mut out[ox * c..(ox + 1) * c];
        let mut c0 = 0;
        while c0 < c {
            let n = BLOCK.min(c - c0);
            let mut acc = [0f32; BLOCK];
            acc[..n].copy_from_slice(&bias[c0..c0 + n]);
            for ky in ky_lo..ky_hi {
                let iy = (iy0 + ky as isize) as usize;
                for kx in kx_lo..kx_hi {
                    let at = (iy * w + (ix0 + kx as isize) as usize) * c + c0;
                    let tap = (ky * kw + kx) * c + c0;
                    madd_block::<FMA>(&mut acc, &input[at..at + n], &weights[tap..tap + n]);
                }
            }
            store(&mut o[c0..c0 + n], &acc[..n], slope.map(|a| &a[c0..c0 + n]));
            c0 += n;
        }
    }
}

/// One output row of a dense conv in NHWC, accumulating each input value times its
/// output-channel weight vector.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn dense_row_impl<const FMA: bool>(
    out: &mut [f32],
    input: &[f32],
    (h, w, cin): (usize, usize, usize),
    oy: usize,
    weights: &[f32],
    bias: &[f32],
    slope: Option<&[f32]>,
    (kh, kw, stride, ph, pw): (usize, usize, usize, usize, usize),
) {
    let cout = bias.len();
    let wo = out.len() / cout;
    let (ky_lo, ky_hi, iy0) = valid_taps(oy, stride, ph, kh, h);
    for ox in 0..wo {
        let (kx_lo, kx_hi, ix0) = valid_taps(ox, stride, pw, kw, w);
        let o = &mut out[ox * cout..(ox + 1) * cout];
        let mut c0 = 0;
        while c0 < cout {
            let n = BLOCK.min(cout - c0);
            let mut acc = [0f32; BLOCK];
            acc[..n].copy_from_slice(&bias[c0..c0 + n]);
            for ky in ky_lo..ky_hi {
                let iy = (iy0 + ky as isize) as usize;
                for kx in kx_lo..kx_hi {
                    let at = (iy * w + (ix0 + kx as isize) as usize) * cin;
                    for ci in 0..cin {
                        let wt = ((ky * kw + kx) * cin + ci) * cout + c0;
                        saxpy_block::<FMA>(&mut acc, input[at + ci], &weights[wt..wt + n]);
                    }
                }
            }
            store(&mut o[c0..c0 + n], &acc[..n], slope.map(|a| &a[c0..c0 + n]));
            c0 += n;
        }
    }
}

/// Defines `$name`, which runs `$impl::<true>` compiled with AVX2 + FMA where the CPU
/// has them and `$impl::<false>` elsewhere.
macro_rules! dispatch {
    ($name:ident, $impl:ident, ($($arg:ident: $ty:ty),*)) => {
        #[allow(clippy::too_many_arguments)]
        pub fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn fast($($arg: $ty),*) {
                    $impl::<true>($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports the features `fast` is compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            $impl::<false>($($arg),*)
        }
    };
}

dispatch!(depthwise_row, depthwise_row_impl, (
    out: &mut [f32], input: &[f32], shape: (usize, usize, usize), oy: usize,
    weights: &[f32], bias: &[f32], slope: Option<&[f32]>,
    geometry: (usize, usize, usize, usize, usize)
));
dispatch!(dense_row, dense_row_impl, (
    out: &mut [f32], input: &[f32], shape: (usize, usize, usize), oy: usize,
    weights: &[f32], bias: &[f32], slope: Option<&[f32]>,
    geometry: (usize, usize, usize, usize, usize)
));
dispatch!(bias_prelu, bias_prelu_impl, (rows: &mut [f32], bias: &[f32], slope: Option<&[f32]>));
dispatch!(add_bias, add_bias_impl, (dst: &mut [f32], src: &[f32], bias: &[f32]));
