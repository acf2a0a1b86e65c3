//! How a gallery stores its embeddings: [`Storage`], f32 (exact), f16 or int8.
//!
//! The precision is chosen when a gallery is created and recorded with it (the `storage`
//! key of its meta table). An embedding is stored as:
//!
//! | storage | bytes | encoding |
//! | --- | --- | --- |
//! | `f32` | `4 dim` | the values, little-endian IEEE binary32 |
//! | `f16` | `2 dim` | the values rounded to IEEE binary16 (nearest, ties to even), little-endian |
//! | `int8` | `4 + dim` | a scale `s` (f32, little-endian), then `round(v / s)` as signed bytes, `s = max abs v / 127` |
//!
//! Searching dequantises: the in-memory index holds the decoded f32 values, and the
//! scores are those of the decoded vectors. What a lower precision costs in recall is
//! measured in `tests/storage.rs` and given in the crate's README.

use crate::{Error, Result};

/// The precision a gallery stores its embeddings in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// 4 bytes a value: exact.
    #[default]
    F32,
    /// 2 bytes a value (IEEE binary16): a relative error of at most 2^-11 per value.
    F16,
    /// 1 byte a value and a 4-byte scale per embedding (symmetric, per vector): an error of
    /// at most half a step (`max abs v / 254`) per value.
    Int8,
}

impl Storage {
    /// Every kind, for messages and tests.
    pub const ALL: [Storage; 3] = [Storage::F32, Storage::F16, Storage::Int8];

    /// Its name (`f32`, `f16`, `int8`), as written in a gallery's meta table.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Int8 => "int8",
        }
    }

    /// Parses a name written by [`Storage::name`].
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "storage `{}`: expected f32, f16 or int8",
                    name.escape_debug()
                ))
            })
    }

    /// The bytes one embedding of `dim` values takes.
    pub fn bytes(self, dim: usize) -> usize {
        match self {
            Self::F32 => 4 * dim,
            Self::F16 => 2 * dim,
            Self::Int8 => 4 + dim,
        }
    }

    /// Appends the encoding of `values` (finite) to `out`.
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        match self {
            Self::F32 => {
                for v in values {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Self::F16 => {
                for v in values {
                    out.extend_from_slice(&f32_to_f16(*v).to_le_bytes());
                }
            }
            Self::Int8 => {
                let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = max / 127.0;
                out.extend_from_slice(&scale.to_le_bytes());
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                for v in values {
                    out.push((v * inv).round().clamp(-127.0, 127.0) as i8 as u8);
                }
            }
        }
    }

    /// Decodes `bytes` into `out` (`out.len()` values); `false` when `bytes` is not
    /// [`Storage::bytes`] long. Values may come out non-finite from a damaged file: the
    /// caller checks.
    pub fn decode(self, bytes: &[u8], out: &mut [f32]) -> bool {
        if bytes.len() != self.bytes(out.len()) {
            return false;
        }
        match self {
            Self::F32 => {
                for (v, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Self::F16 => {
                for (v, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *v = f16_to_f32(u16::from_le_bytes([c[0], c[1]]));
                }
            }
            Self::Int8 => {
                let scale = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                for (v, c) in out.iter_mut().zip(&bytes[4..]) {
                    *v = (*c as i8) as f32 * scale;
                }
            }
        }
        true
    }

    /// `values` as they come back from the store: encoded and decoded.
    pub fn round_trip(self, values: &[f32]) -> Vec<f32> {
        if self == Self::F32 {
            return values.to_vec();
        }
        let mut bytes = Vec::with_capacity(self.bytes(values.len()));
        self.encode(values, &mut bytes);
        let mut out = vec![0f32; values.len()];
        self.decode(&bytes, &mut out);
        out
    }
}

impl std::fmt::Display for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Storage {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

/// `v` as IEEE binary16 bits, rounded to nearest, ties to even; beyond the largest half
/// it is infinite, below the smallest subnormal zero.
pub fn f32_to_f16(v: f32) -> u16 {
    let x = v.to_bits();
    let sign = ((x >> 16) & 0x8000) as u16;
    let exp = ((x >> 23) & 0xff) as i32;
    let man = x & 0x007f_ffff;
    if exp == 0xff {
        // Infinity or NaN (a quiet NaN keeps a payload bit).
        return sign | 0x7c00 | if man != 0 { 0x0200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        // Subnormal half, or zero.
        if e < -10 {
            return sign;
        }
        let m = man | 0x0080_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rest = m & ((1u32 << shift) - 1);
        let mut out = m >> shift;
        if rest > half || (rest == half && out & 1 == 1) {
            out += 1;
        }
        return sign | out as u16;
    }
    let mut out = ((e as u32) << 10) | (man >> 13);
    let rest = man & 0x1fff;
    if rest > 0x1000 || (rest == 0x1000 && out & 1 == 1) {
        // A carry into the exponent is right, up to infinity.
        out += 1;
    }
    sign | out as u16
}

/// The f32 value of IEEE binary16 bits (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x03ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: normalise.
            let mut e = 127 - 15 + 1;
            let mut m = man;
            while m & 0x0400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | ((e as u32) << 23) | ((m & 0x03ff) << 13)
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, _) => sign | 0x7fc0_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_round_trips_every_half_and_rounds_to_nearest_even() {
        for h in 0..=u16::MAX {
            let v = f16_to_f32(h);
            if v.is_nan() {
                assert!(f16_to_f32(f32_to_f16(v)).is_nan());
            } else {
                assert_eq!(f32_to_f16(v), h, "{h:#06x} = {v}");
            }
        }
        assert_eq!(f16_to_f32(f32_to_f16(1.0 + 1.0 / 4096.0)), 1.0); // tie, to even
        assert_eq!(
            f16_to_f32(f32_to_f16(1.0 + 3.0 / 4096.0)),
            1.0 + 4.0 / 4096.0
        );
        assert_eq!(f32_to_f16(70000.0), 0x7c00);
        assert_eq!(f32_to_f16(-1e-9), 0x8000);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        // Halfway between the largest subnormal and the smallest normal: to even.
        assert_eq!(f32_to_f16(2f32.powi(-14) - 2f32.powi(-25)), 0x0400);
    }

    #[test]
    fn encodings_have_their_length_and_error_bound() {
        let v: Vec<f32> = (0..512).map(|i| ((i as f32) * 0.37).sin() / 16.0).collect();
        let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        for s in Storage::ALL {
            let mut bytes = Vec::new();
            s.encode(&v, &mut bytes);
            assert_eq!(bytes.len(), s.bytes(v.len()));
            let back = s.round_trip(&v);
            if s != Storage::Int8 {
                // What was decoded comes back as it is.
                assert_eq!(s.round_trip(&back), back, "{s}");
            }
            for (a, b) in v.iter().zip(&back) {
                let bound = match s {
                    Storage::F32 => 0.0,
                    Storage::F16 => a.abs() / 2048.0 + 1e-7,
                    Storage::Int8 => max / 254.0 * 1.0001,
                };
                assert!((a - b).abs() <= bound, "{s}: {a} -> {b}");
            }
            assert!(!s.decode(&bytes[1..], &mut vec![0f32; v.len()]));
            assert_eq!(Storage::parse(s.name()).unwrap(), s);
        }
        assert!(Storage::parse("f64").is_err());
        assert_eq!(Storage::Int8.round_trip(&[0.0; 4]), [0.0; 4]);
    }
}
