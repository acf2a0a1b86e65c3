//! The pointwise products `out = epilogue(a @ w)` of quantised 1x1 convs and linear layers.
//!
//! The weights are packed once, when the engine is built, for the kernel that will run:
//! AVX-512 VNNI wants each 64-byte vector to hold 4 consecutive `k` of 16 output columns
//! (what one `vpdpbusd` consumes), AVX-VNNI the same of 8 columns per 32 bytes, AVX2 wants 2 consecutive `k` of 8 columns widened to
//! i16 (what one `vpmaddwd` consumes), and the portable loop wants plain `[k][n]`. Every
//! path accumulates the exact i32 sum, so the choice of kernel never changes the result
//! beyond the f32 rounding of the epilogue.

#[cfg(target_arch = "x86_64")]
use super::{avx2, avx_vnni, vnni};

/// The instruction sets with an int8 kernel, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// `vpdpbusd` on 512-bit vectors: 64 multiply-adds of u8 by i8 into i32 per
    /// instruction, with no intermediate that can saturate.
    Avx512Vnni,
    /// `vpdpbusd` on 256-bit vectors (VEX-encoded AVX-VNNI): CPUs with VNNI but no
    /// AVX-512.
    AvxVnni,
    /// Both operands widened to i16 and `vpmaddwd`: exact, where `vpmaddubsw` is not.
    Avx2,
    /// Plain loops, for any CPU.
    Portable,
}

impl Isa {
    /// Every instruction set, best first.
    pub const ALL: [Isa; 4] = [Isa::Avx512Vnni, Isa::AvxVnni, Isa::Avx2, Isa::Portable];

    /// The best kernel this CPU runs. Cheap enough to call per product: std caches the
    /// feature checks.
    pub fn detect() -> Isa {
        Isa::ALL
            .into_iter()
            .find(|isa| isa.supported())
            .unwrap_or(Isa::Portable)
    }

    /// Whether this CPU runs the kernel, so tests can cover every path it has.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Isa::Avx512Vnni => has!("avx512f") && has!("avx512bw") && has!("avx512vnni"),
                Isa::AvxVnni => has!("avx2") && has!("fma") && has!("avxvnni"),
                Isa::Avx2 => has!("avx2") && has!("fma"),
                Isa::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }

    /// The name reported by [`kernel_name`] and in benchmarks.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::AvxVnni => "avx-vnni",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }
}

/// Which kernel [`matmul`] runs on this CPU, for logs and benchmark reports.
#[allow(dead_code)] // Reported by benchmarks and diagnostics, not by the engine itself.
pub(crate) fn kernel_name() -> &'static str {
    Isa::detect().name()
}

/// `k x n` i8 weights (symmetric, one scale per output column, applied by the caller
/// through [`QEpilogue::scale`]), packed for one kernel.
#[derive(Clone, Debug)]
pub(crate) struct QWeights {
    k: usize,
    n: usize,
    k_stride: usize,
    #[allow(dead_code)] // For callers with one zero point per tensor.
    col_sums: Vec<i32>,
    layout: Layout,
}

/// The weights as one kernel reads them.
#[derive(Debug)]
enum Layout {
    /// `[k][n]`, row-major, for the portable loop.
    Plain(Vec<i8>),
    /// Panels of [`vnni::PANEL`] columns (the last one narrower), each with the panel's
    /// width rounded up to 16 (`stride`) and `k_stride / 4` groups of `stride x 4` bytes:
    /// column `c`, row `4g + j` at `g * stride * 4 + c * 4 + j`. Zero-padded; the first
    /// panel starts at `data[offset]`, 64-byte aligned.
    #[cfg(target_arch = "x86_64")]
    Vnni { data: Vec<i8>, offset: usize },
    /// As `Vnni` with panels of [`avx_vnni::PANEL`] columns, widths rounded up to 8,
    /// 32-byte aligned.
    #[cfg(target_arch = "x86_64")]
    AvxVnni { data: Vec<i8>, offset: usize },
    /// Panels of [`avx2::PANEL`] columns, each with the width rounded up to 8 (`stride`)
    /// and `k_stride / 2` pairs of `stride x 2` i16: column `c`, row `2p + j` at
    /// `p * stride * 2 + c * 2 + j`. Zero-padded; the first panel starts at
    /// `data[offset]`, 32-byte aligned.
    #[cfg(target_arch = "x86_64")]
    Avx2 { data: Vec<i16>, offset: usize },
    /// As `Avx2` but i8, for weights of more than [`avx2::NARROW_ABOVE`] elements, and
    /// 16-byte aligned.
    #[cfg(target_arch = "x86_64")]
    Avx2Narrow { data: Vec<i8>, offset: usize },
}

/// A clone's buffer is a new allocation, so its panels are moved to that allocation's
/// aligned offset. (The kernels' loads do not need the alignment; it keeps each weight
/// vector in one cache line.)
impl Clone for Layout {
    fn clone(&self) -> Self {
        match self {
            Layout::Plain(w) => Layout::Plain(w.clone()),
            #[cfg(target_arch = "x86_64")]
            Layout::Vnni { data, offset } => {
                let (data, offset) = realign(data, *offset, 64);
                Layout::Vnni { data, offset }
            }
            #[cfg(target_arch = "x86_64")]
            Layout::AvxVnni { data, offset } => {
                let (data, offset) = realign(data, *offset, 32);
                Layout::AvxVnni { data, offset }
            }
            #[cfg(target_arch = "x86_64")]
            Layout::Avx2 { data, offset } => {
                let (data, offset) = realign(data, *offset, 32);
                Layout::Avx2 { data, offset }
            }
            #[cfg(target_arch = "x86_64")]
            Layout::Avx2Narrow { data, offset } => {
                let (data, offset) = realign(data, *offset, 16);
                Layout::Avx2Narrow { data, offset }
            }
        }
    }
}

/// A copy of packed `data` whose panels start at `offset`, with the panels moved to the
/// copy's first `align`-byte boundary, as [`pack`] places them.
#[cfg(target_arch = "x86_64")]
fn realign<T: Copy + Default>(data: &[T], offset: usize, align: usize) -> (Vec<T>, usize) {
    let slack = align / std::mem::size_of::<T>();
    let len = data.len() - slack;
    let mut copy = vec![T::default(); data.len()];
    let at = copy.as_ptr().align_offset(align).min(slack);
    copy[at..at + len].copy_from_slice(&data[offset..offset + len]);
    (copy, at)
}

/// `(first column, columns)` of each `panel`-wide slice of an `n`-column matrix.
pub(super) fn panels(n: usize, panel: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n.div_ceil(panel)).map(move |p| (p * panel, panel.min(n - p * panel)))
}

/// What the kernels consume of `k` at once: the VNNI kernel takes 4 rows per
/// instruction. Every layout uses the same stride, so one quantised activation buffer
/// feeds any kernel.
const K_STEP: usize = 4;

impl QWeights {
    /// From `[k][n]` row-major i8 weights (values in `-127..=127`; -128 is exact too),
    /// packed for the best kernel this CPU runs.
    pub fn new(w: &[i8], k: usize, n: usize) -> Self {
        Self::for_isa(Isa::detect(), w, k, n)
    }

    /// Packed for the kernel of `isa`, which the CPU must run; tests use it to cover the
    /// paths the best one hides.
    pub fn for_isa(isa: Isa, w: &[i8], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "weights are not {k} x {n}");
        assert!(isa.supported(), "this CPU has no {} kernel", isa.name());
        let k_stride = k.next_multiple_of(K_STEP);
        let mut col_sums = vec![0i32; n];
        for row in w.chunks_exact(n.max(1)).take(k) {
            for (s, &v) in col_sums.iter_mut().zip(row) {
                *s += i32::from(v);
            }
        }
        let layout = match isa {
            Isa::Portable => Layout::Plain(w.to_vec()),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                let (data, offset) = pack(w, k, n, k_stride, vnni::PANEL, 16, 4, 64, 0i8, |v| v);
                Layout::Vnni { data, offset }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::AvxVnni => {
                let (data, offset) = pack(w, k, n, k_stride, avx_vnni::PANEL, 8, 4, 32, 0i8, |v| v);
                Layout::AvxVnni { data, offset }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 if k * n > avx2::NARROW_ABOVE => {
                let (data, offset) = pack(w, k, n, k_stride, avx2::PANEL, 8, 2, 16, 0i8, |v| v);
                Layout::Avx2Narrow { data, offset }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                let (data, offset) =
                    pack(w, k, n, k_stride, avx2::PANEL, 8, 2, 32, 0i16, i16::from);
                Layout::Avx2 { data, offset }
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("only the portable kernel exists off x86-64"),
        };
        Self {
            k,
            n,
            k_stride,
            col_sums,
            layout,
        }
    }

    /// Rows of the weights (input features), for callers' shape checks.
    #[allow(dead_code)]
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns of the weights (output features), for callers' shape checks.
    #[allow(dead_code)]
    pub fn n(&self) -> usize {
        self.n
    }

    /// Row length the activations must have: `k` rounded up to a multiple of 4, what the
    /// VNNI kernel consumes at once. The padding columns meet zero weights, so any value
    /// there is harmless; the engine's quantiser writes 0 there.
    pub fn k_stride(&self) -> usize {
        self.k_stride
    }

    /// Per output column, the sum over `k` of its weights: the product of a zero point `z`
    /// by column `j` is `z * col_sums[j]`, which the caller folds into
    /// [`QEpilogue::offset`] so the kernels never see the zero point.
    #[allow(dead_code)]
    pub fn col_sums(&self) -> &[i32] {
        &self.col_sums
    }

    /// Which kernel these weights were packed for, which is the one [`matmul`] runs.
    #[allow(dead_code)]
    pub fn isa(&self) -> Isa {
        match self.layout {
            Layout::Plain(_) => Isa::Portable,
            #[cfg(target_arch = "x86_64")]
            Layout::Vnni { .. } => Isa::Avx512Vnni,
            #[cfg(target_arch = "x86_64")]
            Layout::AvxVnni { .. } => Isa::AvxVnni,
            #[cfg(target_arch = "x86_64")]
            Layout::Avx2 { .. } | Layout::Avx2Narrow { .. } => Isa::Avx2,
        }
    }
}

/// Packs `[k][n]` weights into panels of `panel` columns (widths rounded up to `lanes`),
/// each row of a panel holding `group` consecutive `k` per column, and returns the data
/// with the offset of its first `align`-byte boundary.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn pack<T: Copy>(
    w: &[i8],
    k: usize,
    n: usize,
    k_stride: usize,
    panel: usize,
    lanes: usize,
    group: usize,
    align: usize,
    zero: T,
    widen: impl Fn(i8) -> T,
) -> (Vec<T>, usize) {
    let slack = align / std::mem::size_of::<T>();
    let padded: usize = panels(n, panel)
        .map(|(_, cols)| cols.next_multiple_of(lanes))
        .sum();
    let mut data = vec![zero; k_stride * padded + slack];
    let offset = data.as_ptr().align_offset(align).min(slack);
    let mut at = offset;
    for (c0, cols) in panels(n, panel) {
        let stride = cols.next_multiple_of(lanes);
        for kk in 0..k {
            let (g, j) = (kk / group, kk % group);
            let row = &w[kk * n + c0..kk * n + c0 + cols];
            for (c, &v) in row.iter().enumerate() {
                data[at + (g * stride + c) * group + j] = widen(v);
            }
        }
        at += k_stride * stride;
    }
    (data, offset)
}

/// What follows the integer product, per output row `r` of i32 accumulators `acc`:
/// `y[j] = acc[j] as f32 * (scale[j] * row_step[r]) + (row_low[r] * low_weight[j] + offset[j])`,
/// then PReLU with one slope per column when `slope` is given, then `min(y, cap)` when
/// `cap` is given, then `y += residual`.
///
/// Row `r`'s activations were quantised with its own `row_step` from its own `row_low`
/// (see `engine::quantize`). `scale` carries the column's weight scale, `low_weight` that
/// scale times the column's weight sum (the share of `row_low`), and `offset` the bias less
/// the calibrated zero points' share, so that the dequantisation costs two fused
/// multiply-adds while the tile is in registers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QEpilogue<'a> {
    /// `n` values.
    pub scale: &'a [f32],
    /// `n` values.
    pub offset: &'a [f32],
    /// `n` values.
    pub low_weight: &'a [f32],
    /// `rows` values.
    pub row_step: &'a [f32],
    /// `rows` values.
    pub row_low: &'a [f32],
    /// `n` values.
    pub slope: Option<&'a [f32]>,
    pub cap: Option<f32>,
    /// `rows x n`, laid out as the output.
    pub residual: Option<&'a [f32]>,
}

impl QEpilogue<'_> {
    /// Column `c` of row `r` before the activation: the one rounding every kernel repeats.
    #[inline(always)]
    pub(super) fn dequantise(&self, acc: i32, r: usize, c: usize) -> f32 {
        let shift = self.row_low[r].mul_add(self.low_weight[c], self.offset[c]);
        (acc as f32).mul_add(self.scale[c] * self.row_step[r], shift)
    }
}

/// `out (rows x n) = epilogue(a (rows x k_stride) @ w)`, on the calling thread, with the
/// kernel `w` was packed for.
pub(crate) fn matmul(out: &mut [f32], a: &[u8], rows: usize, w: &QWeights, ep: QEpilogue) {
    let (ks, n) = (w.k_stride, w.n);
    assert!(
        out.len() >= rows * n && a.len() >= rows * ks,
        "operands too short"
    );
    assert!(
        ep.scale.len() >= n && ep.offset.len() >= n && ep.low_weight.len() >= n,
        "epilogue too short"
    );
    assert!(
        ep.row_step.len() >= rows && ep.row_low.len() >= rows,
        "row steps too short"
    );
    assert!(ep.slope.is_none_or(|s| s.len() >= n), "slopes too short");
    assert!(
        ep.residual.is_none_or(|r| r.len() >= rows * n),
        "residual too short"
    );
    if rows == 0 || n == 0 {
        return;
    }
    match &w.layout {
        Layout::Plain(wt) => portable(out, a, rows, w.k, ks, n, wt, ep),
        #[cfg(target_arch = "x86_64")]
        Layout::Vnni { data, offset } => {
            assert!(Isa::Avx512Vnni.supported());
            // SAFETY: the CPU has the kernel's features (checked above) and the operand
            // extents were checked against the packed shape.
            unsafe { vnni::matmul(out, a, rows, ks, n, &data[*offset..], ep) }
        }
        #[cfg(target_arch = "x86_64")]
        Layout::AvxVnni { data, offset } => {
            assert!(Isa::AvxVnni.supported());
            // SAFETY: the CPU has the kernel's features (checked above) and the operand
            // extents were checked against the packed shape.
            unsafe { avx_vnni::matmul(out, a, rows, ks, n, &data[*offset..], ep) }
        }
        #[cfg(target_arch = "x86_64")]
        Layout::Avx2 { data, offset } => {
            assert!(Isa::Avx2.supported());
            // SAFETY: as above.
            unsafe { avx2::matmul(out, a, rows, ks, n, &data[*offset..], ep) }
        }
        #[cfg(target_arch = "x86_64")]
        Layout::Avx2Narrow { data, offset } => {
            assert!(Isa::Avx2.supported());
            // SAFETY: as above.
            unsafe { avx2::matmul(out, a, rows, ks, n, &data[*offset..], ep) }
        }
    }
}

/// The epilogue on output row `r` (of `n` columns) from its finished accumulators `acc`.
fn epilogue_row(out: &mut [f32], acc: &[i32], ep: &QEpilogue, r: usize, n: usize) {
    for (c, (o, &v)) in out.iter_mut().zip(acc).enumerate() {
        let mut y = ep.dequantise(v, r, c);
        if let Some(s) = ep.slope {
            y = y.max(0.0) + s[c] * y.min(0.0);
        }
        if let Some(cap) = ep.cap {
            y = y.min(cap);
        }
        if let Some(res) = ep.residual {
            y += res[r * n + c];
        }
        *o = y;
    }
}

/// The fallback: per row, the weights' rows scaled by each activation and summed into a
/// row of i32, which the compiler vectorises with whatever the baseline target offers.
#[allow(clippy::too_many_arguments)]
fn portable(
    out: &mut [f32],
    a: &[u8],
    rows: usize,
    k: usize,
    ks: usize,
    n: usize,
    w: &[i8],
    ep: QEpilogue,
) {
    let mut acc = vec![0i32; n];
    for r in 0..rows {
        acc.fill(0);
        for (&x, wr) in a[r * ks..r * ks + k].iter().zip(w.chunks_exact(n)) {
            let x = i32::from(x);
            for (s, &v) in acc.iter_mut().zip(wr) {
                *s += x * i32::from(v);
            }
        }
        epilogue_row(&mut out[r * n..(r + 1) * n], &acc, &ep, r, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (SplitMix64), so failures reproduce.
    pub(crate) struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Self {
            Self(seed)
        }

        pub fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Activations, a quarter of them at the extremes 0 and 255.
        pub fn u8s(&mut self, len: usize) -> Vec<u8> {
            (0..len)
                .map(|_| match self.next() % 8 {
                    0 => 255,
                    1 => 0,
                    _ => self.next() as u8,
                })
                .collect()
        }

        /// Weights in -127..=127, a quarter of them at the extremes.
        pub fn i8s(&mut self, len: usize) -> Vec<i8> {
            (0..len)
                .map(|_| match self.next() % 8 {
                    0 => 127,
                    1 => -127,
                    _ => ((self.next() % 255) as i32 - 127) as i8,
                })
                .collect()
        }

        pub fn f32s(&mut self, len: usize, lo: f32, hi: f32) -> Vec<f32> {
            (0..len)
                .map(|_| lo + (hi - lo) * (self.next() >> 40) as f32 / (1u64 << 24) as f32)
                .collect()
        }
    }

    /// The exact product in i64, `rows x n`.
    fn reference(a: &[u8], ks: usize, w: &[i8], rows: usize, k: usize, n: usize) -> Vec<i64> {
        let mut acc = vec![0i64; rows * n];
        for r in 0..rows {
            for kk in 0..k {
                let x = i64::from(a[r * ks + kk]);
                for c in 0..n {
                    acc[r * n + c] += x * i64::from(w[kk * n + c]);
                }
            }
        }
        acc
    }

    fn supported() -> Vec<Isa> {
        let isas: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.supported()).collect();
        eprintln!("int8 kernels tested: {isas:?}");
        isas
    }

    /// Activations `rows x k_stride` with random (not zero) padding: the padding must
    /// meet zero weights.
    fn activations(rng: &mut Rng, rows: usize, ks: usize) -> Vec<u8> {
        rng.u8s(rows * ks)
    }

    /// With a unit scale and no offset the output is the accumulator itself, rounded to
    /// f32 the same way as the reference; the sums stay below 2^24 where this is exact.
    fn check_exact(isa: Isa, rng: &mut Rng, rows: usize, k: usize, n: usize) {
        let wt = rng.i8s(k * n);
        let w = QWeights::for_isa(isa, &wt, k, n);
        assert_eq!((w.k(), w.n()), (k, n));
        let ks = w.k_stride();
        assert!(ks >= k && ks.is_multiple_of(K_STEP));
        let a = activations(rng, rows, ks);
        let ones = vec![1f32; n];
        let zeros = vec![0f32; n];
        let (row_ones, row_zeros) = (vec![1f32; rows], vec![0f32; rows]);
        let ep = QEpilogue {
            scale: &ones,
            offset: &zeros,
            low_weight: &zeros,
            row_step: &row_ones,
            row_low: &row_zeros,
            slope: None,
            cap: None,
            residual: None,
        };
        let mut out = vec![f32::NAN; rows * n + 3];
        matmul(&mut out, &a, rows, &w, ep);
        let want = reference(&a, ks, &wt, rows, k, n);
        for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
            assert_eq!(
                got,
                want as f32,
                "{isa:?} rows {rows} k {k} n {n}: row {} col {}",
                i / n,
                i % n
            );
        }
        assert!(
            out[rows * n..].iter().all(|v| v.is_nan()),
            "wrote past the end"
        );
    }

    #[test]
    fn col_sums_and_stride() {
        let mut rng = Rng::new(7);
        for isa in supported() {
            for (k, n) in [(1, 1), (5, 3), (70, 33)] {
                let wt = rng.i8s(k * n);
                let w = QWeights::for_isa(isa, &wt, k, n);
                assert_eq!(w.k_stride(), k.next_multiple_of(4));
                assert_eq!(w.isa(), isa);
                for c in 0..n {
                    let s: i32 = (0..k).map(|kk| i32::from(wt[kk * n + c])).sum();
                    assert_eq!(w.col_sums()[c], s);
                }
            }
        }
    }

    /// Odd shapes around every tile and panel edge.
    #[test]
    fn exact_on_odd_shapes() {
        let mut rng = Rng::new(1);
        for isa in supported() {
            for rows in 1..=13 {
                for (k, n) in [
                    (1, 1),
                    (3, 17),
                    (4, 16),
                    (7, 70),
                    (70, 64),
                    (33, 65),
                    (70, 5),
                ] {
                    check_exact(isa, &mut rng, rows, k, n);
                }
            }
            // The last two are big enough for the AVX2 kernel's i8 layout.
            for (rows, k, n) in [
                (13, 1155, 70),
                (7, 64, 512),
                (3, 70, 200),
                (1, 513, 9),
                (13, 4608, 230),
                (2, 25_088, 45),
            ] {
                check_exact(isa, &mut rng, rows, k, n);
            }
        }
    }

    /// All products at the extremes, with sums far beyond 2^15 per pair and near 2^30 in
    /// all: a saturating step anywhere would be off by far more than the f32 rounding.
    #[test]
    fn exact_at_the_extremes() {
        for isa in supported() {
            for (k, n, x, v) in [
                (1155, 20, 255u8, -127i8),
                (1155, 20, 255, 127),
                (25_088, 17, 255, -127),
                (25_088, 3, 255, 127),
            ] {
                let w = QWeights::for_isa(isa, &vec![v; k * n], k, n);
                let rows = 3;
                let a = vec![x; rows * w.k_stride()];
                let ones = vec![1f32; n];
                let zeros = vec![0f32; n];
                let (row_ones, row_zeros) = (vec![1f32; rows], vec![0f32; rows]);
                let ep = QEpilogue {
                    scale: &ones,
                    offset: &zeros,
                    low_weight: &zeros,
                    row_step: &row_ones,
                    row_low: &row_zeros,
                    slope: None,
                    cap: None,
                    residual: None,
                };
                let mut out = vec![0f32; rows * n];
                matmul(&mut out, &a, rows, &w, ep);
                let want = (k as i64 * i64::from(x) * i64::from(v)) as f32;
                assert!(out.iter().all(|&y| y == want), "{isa:?} k {k}: {out:?}");
            }
        }
    }

    /// Every epilogue, against the reference product followed by the scalar epilogue.
    #[test]
    fn epilogues() {
        let mut rng = Rng::new(3);
        for isa in supported() {
            for (rows, k, n) in [(1, 3, 5), (7, 37, 64), (13, 64, 70), (6, 128, 130)] {
                let wt = rng.i8s(k * n);
                let w = QWeights::for_isa(isa, &wt, k, n);
                let ks = w.k_stride();
                let a = activations(&mut rng, rows, ks);
                let scale = rng.f32s(n, 1e-4, 1e-3);
                let offset = rng.f32s(n, -2.0, 2.0);
                let low_weight = rng.f32s(n, -0.5, 0.5);
                let row_step = rng.f32s(rows, 0.25, 2.0);
                let row_low = rng.f32s(rows, -10.0, 200.0);
                let slope = rng.f32s(n, -0.5, 0.5);
                let res = rng.f32s(rows * n, -3.0, 3.0);
                let acc = reference(&a, ks, &wt, rows, k, n);
                for (slope, cap, residual) in [
                    (None, None, None),
                    (Some(&slope[..]), None, None),
                    (Some(&slope[..]), Some(0.5), None),
                    (None, Some(0.25), None),
                    (None, None, Some(&res[..])),
                    (Some(&slope[..]), Some(0.5), Some(&res[..])),
                ] {
                    let ep = QEpilogue {
                        scale: &scale,
                        offset: &offset,
                        low_weight: &low_weight,
                        row_step: &row_step,
                        row_low: &row_low,
                        slope,
                        cap,
                        residual,
                    };
                    let mut out = vec![f32::NAN; rows * n];
                    matmul(&mut out, &a, rows, &w, ep);
                    for r in 0..rows {
                        for c in 0..n {
                            let mut y =
                                acc[r * n + c] as f64 * scale[c] as f64 * row_step[r] as f64
                                    + row_low[r] as f64 * low_weight[c] as f64
                                    + offset[c] as f64;
                            if let Some(s) = slope {
                                y = y.max(0.0) + s[c] as f64 * y.min(0.0);
                            }
                            if let Some(cap) = cap {
                                y = y.min(cap as f64);
                            }
                            if let Some(res) = residual {
                                y += res[r * n + c] as f64;
                            }
                            let got = out[r * n + c] as f64;
                            assert!(
                                (got - y).abs() <= 1e-5 * (1.0 + y.abs()),
                                "{isa:?} rows {rows} k {k} n {n} ({r}, {c}): {got} vs {y}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The odd-shape tests cover both AVX2 layouts only if big weights take the i8 one.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn big_avx2_weights_stay_i8() {
        if !Isa::Avx2.supported() {
            return;
        }
        let (k, n) = (4608, 230);
        assert!(k * n > avx2::NARROW_ABOVE);
        let w = QWeights::for_isa(Isa::Avx2, &vec![1; k * n], k, n);
        assert!(matches!(w.layout, Layout::Avx2Narrow { .. }));
        let w = QWeights::for_isa(Isa::Avx2, &vec![1; 1155 * 70], 1155, 70);
        assert!(matches!(w.layout, Layout::Avx2 { .. }));
    }

    /// A clone lives in a new allocation, with its panels realigned.
    #[test]
    fn clones_compute_the_same() {
        let mut rng = Rng::new(11);
        let (rows, k, n) = (5, 70, 90);
        let wt = rng.i8s(k * n);
        for isa in supported() {
            let w = QWeights::for_isa(isa, &wt, k, n);
            let a = rng.u8s(rows * w.k_stride());
            let c = w.clone();
            drop(w);
            let ones = vec![1f32; n];
            let zeros = vec![0f32; n];
            let (row_ones, row_zeros) = (vec![1f32; rows], vec![0f32; rows]);
            let ep = QEpilogue {
                scale: &ones,
                offset: &zeros,
                low_weight: &zeros,
                row_step: &row_ones,
                row_low: &row_zeros,
                slope: None,
                cap: None,
                residual: None,
            };
            let mut out = vec![0f32; rows * n];
            matmul(&mut out, &a, rows, &c, ep);
            let want = reference(&a, c.k_stride(), &wt, rows, k, n);
            assert!(
                out.iter().zip(&want).all(|(&y, &w)| y == w as f32),
                "{isa:?}"
            );
        }
    }

    #[test]
    fn kernel_name_is_the_detected_one() {
        assert!(["avx512-vnni", "avx2", "portable"].contains(&kernel_name()));
        assert_eq!(kernel_name(), Isa::detect().name());
    }

    #[test]
    #[should_panic(expected = "operands too short")]
    fn short_activations_panic() {
        let w = QWeights::new(&[1; 6], 3, 2);
        let mut out = [0f32; 4];
        let ep = QEpilogue {
            scale: &[1.0; 2],
            offset: &[0.0; 2],
            low_weight: &[0.0; 2],
            row_step: &[1.0; 2],
            row_low: &[0.0; 2],
            slope: None,
            cap: None,
            residual: None,
        };
        // Two rows need `2 * k_stride` = 8 activations.
        matmul(&mut out, &[0; 6], 2, &w, ep);
    }
}

#[cfg(test)]
mod speed {
    use super::super::super::fp32;
    use super::*;

    /// Prints GMAC/s of every int8 kernel this CPU runs, of the engine's f32 kernel and of
    /// an f32 AVX2 kernel of the same design (the baseline of the int8 AVX2 path), on
    /// w600k_mbf's pointwise shapes (rows of one 112x112 image, a batch of 4 for the 7x7
    /// maps, and the embedding layer): `cargo test --release -p mfn-model int8 --
    /// --ignored --nocapture --test-threads=1`. Each rate is the best of many short runs, which is what
    /// survives other work on a shared machine.
    #[test]
    #[ignore]
    fn int8_gemm_speed() {
        println!("{}", Isa::detect().name());
        for (m, k, n) in [
            (3136, 64, 128),
            (3136, 128, 64),
            (784, 128, 256),
            (784, 256, 128),
            (784, 128, 512),
            (196, 256, 512),
            (196, 512, 128),
            (196, 128, 512),
            (49 * 4, 512, 1024),
            (4, 25_088, 512),
        ] {
            let macs = (m * k * n) as f64;
            let reps = (40_000_000 / (m * k * n)).max(1);
            let time = |f: &mut dyn FnMut()| {
                let mut best = f64::MAX;
                for _ in 0..60 {
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        f();
                    }
                    best = best.min(t.elapsed().as_secs_f64() / reps as f64);
                }
                macs / best / 1e9
            };
            let mut line = format!("{m:>5}x{k:>5}x{n:>5}");
            let x = vec![0.5f32; m * k];
            let bias = vec![0.0; n];
            let slope = vec![0.1; n];
            let fw = fp32::Weights::new(vec![0.25f32; k * n], k, n);
            let mut out = vec![0f32; m * n];
            let f32_rate = time(&mut || {
                let ep = fp32::Epilogue {
                    bias: &bias,
                    slope: Some(&slope),
                    cap: None,
                    residual: None,
                };
                fp32::matmul(&mut out, &x, m, &fw, ep);
            });
            line += &format!("  f32 {f32_rate:6.1}");
            #[cfg(target_arch = "x86_64")]
            let f32_avx2 = (Isa::Avx2.supported() && m >= 6).then(|| {
                let w = f32_avx2::pack(&vec![0.25f32; k * n], k, n);
                time(&mut || {
                    // SAFETY: the CPU has AVX2 and FMA; the operands have these shapes.
                    unsafe { f32_avx2::matmul(&mut out, &x, m, k, n, &w, &bias, &slope) }
                })
            });
            #[cfg(not(target_arch = "x86_64"))]
            let f32_avx2: Option<f64> = None;
            if let Some(r) = f32_avx2 {
                line += &format!("  f32-avx2 {r:6.1}");
            }
            let mut rng = tests::Rng::new(5);
            let wt = rng.i8s(k * n);
            let scale = vec![1e-4f32; n];
            let (row_step, row_low) = (vec![1f32; m], vec![0f32; m]);
            for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
                let w = QWeights::for_isa(isa, &wt, k, n);
                let a = rng.u8s(m * w.k_stride());
                let rate = time(&mut || {
                    let ep = QEpilogue {
                        scale: &scale,
                        offset: &bias,
                        low_weight: &bias,
                        row_step: &row_step,
                        row_low: &row_low,
                        slope: Some(&slope),
                        cap: None,
                        residual: None,
                    };
                    matmul(&mut out, &a, m, &w, ep);
                });
                let base = match (isa, f32_avx2) {
                    (Isa::Avx2 | Isa::AvxVnni, Some(r)) => r,
                    _ => f32_rate,
                };
                line += &format!("  {} {rate:6.1} ({:.2}x)", isa.name(), rate / base);
            }
            println!("{line}  GMAC/s");
        }
    }

    /// f32 with AVX2 and FMA, blocked as the int8 AVX2 kernel is (6 rows by 16 columns,
    /// packed panels, bias and PReLU on the registers): what that path is measured against.
    #[cfg(target_arch = "x86_64")]
    mod f32_avx2 {
        use std::arch::x86_64::*;

        /// Panels of 16 columns, `k x 16` each, zero-padded.
        pub fn pack(w: &[f32], k: usize, n: usize) -> Vec<f32> {
            let mut d = vec![0f32; k * n.next_multiple_of(16)];
            for (p, panel) in d.chunks_exact_mut(16 * k).enumerate() {
                for (kk, row) in panel.chunks_exact_mut(16).enumerate() {
                    for (c, v) in row.iter_mut().enumerate() {
                        if p * 16 + c < n {
                            *v = w[kk * n + p * 16 + c];
                        }
                    }
                }
            }
            d
        }

        /// Whole tiles only: `m` rows from 6 up and `n` a multiple of 16.
        ///
        /// # Safety
        /// The CPU has AVX2 and FMA; `out` is `m x n`, `x` `m x k`, `w` packed `k x n`.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn matmul(
            out: &mut [f32],
            x: &[f32],
            m: usize,
            k: usize,
            n: usize,
            w: &[f32],
            bias: &[f32],
            slope: &[f32],
        ) {
            assert!(n.is_multiple_of(16) && out.len() >= m * n && x.len() >= m * k);
            assert!(w.len() >= k * n && bias.len() >= n && slope.len() >= n);
            // SAFETY: the tiles stay within the shapes asserted above.
            unsafe {
                let zero = _mm256_setzero_ps();
                for r0 in (0..m.saturating_sub(5)).step_by(6) {
                    for p in 0..n / 16 {
                        let b = w.as_ptr().add(p * 16 * k);
                        let a = x.as_ptr().add(r0 * k);
                        let mut acc = [[zero; 2]; 6];
                        for kk in 0..k {
                            let w0 = _mm256_loadu_ps(b.add(kk * 16));
                            let w1 = _mm256_loadu_ps(b.add(kk * 16 + 8));
                            for (r, row) in acc.iter_mut().enumerate() {
                                let xv = _mm256_set1_ps(*a.add(r * k + kk));
                                row[0] = _mm256_fmadd_ps(xv, w0, row[0]);
                                row[1] = _mm256_fmadd_ps(xv, w1, row[1]);
                            }
                        }
                        for (r, row) in acc.iter().enumerate() {
                            for (v, &y) in row.iter().enumerate() {
                                let c = p * 16 + v * 8;
                                let y = _mm256_add_ps(y, _mm256_loadu_ps(bias.as_ptr().add(c)));
                                let s = _mm256_loadu_ps(slope.as_ptr().add(c));
                                let y = _mm256_fmadd_ps(
                                    s,
                                    _mm256_min_ps(y, zero),
                                    _mm256_max_ps(y, zero),
                                );
                                _mm256_storeu_ps(out.as_mut_ptr().add((r0 + r) * n + c), y);
                            }
                        }
                    }
                }
            }
        }
    }
}
