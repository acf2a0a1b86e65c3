//! Which model a gallery's embeddings come from.

use std::fmt;

use candle_core::DType;
use mfn_model::Checkpoint;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::Result;

/// The identity of a recognition model: sha256 over its config (as canonical JSON: keys
/// sorted, no whitespace) and its weights (every tensor's name, shape and f32
/// little-endian bytes, in sorted name order). Metadata such as a stored threshold or the
/// file it was read from does not count, so the same weights read from ONNX or from the
/// converted `.safetensors` file have the same fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of a loaded model.
    pub fn of(checkpoint: &Checkpoint) -> Result<Self> {
        let mut h = Sha256::new();
        h.update(b"mfn-gallery fingerprint v1\0config\0");
        let config = serde_json::to_value(&checkpoint.config)
            .map_err(|e| crate::Error::Invalid(format!("serialising the model config: {e}")))?;
        let mut text = String::new();
        canonical_json(&config, &mut text);
        h.update((text.len() as u64).to_le_bytes());
        h.update(text.as_bytes());
        let mut names: Vec<&String> = checkpoint.tensors.keys().collect();
        names.sort();
        h.update(b"\0weights\0");
        h.update((names.len() as u64).to_le_bytes());
        for name in names {
            let t = &checkpoint.tensors[name];
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            let dims = t.dims();
            h.update((dims.len() as u64).to_le_bytes());
            for &d in dims {
                h.update((d as u64).to_le_bytes());
            }
            let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let mut bytes = Vec::with_capacity(values.len() * 4);
            for v in values {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            h.update(&bytes);
        }
        Ok(Self(h.finalize().into()))
    }

    /// A fingerprint from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex, 64 characters.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The first 12 hex characters, for messages.
    pub fn short(&self) -> String {
        self.hex()[..12].to_string()
    }

    /// Parses [`Fingerprint::hex`]; `None` unless it is 64 hex digits.
    pub fn from_hex(text: &str) -> Option<Self> {
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(out))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.short())
    }
}

/// JSON with object keys sorted and no whitespace, whatever order the map keeps them in.
fn canonical_json(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical_json(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_canonical_order() {
        let f = Fingerprint::from_bytes([0xab; 32]);
        assert_eq!(Fingerprint::from_hex(&f.hex()), Some(f));
        assert_eq!(f.short(), "abababababab");
        assert_eq!(Fingerprint::from_hex("xyz"), None);
        let v: Value = serde_json::from_str(r#"{"b":[1,{"z":1,"a":2}],"a":1.5}"#).unwrap();
        let mut s = String::new();
        canonical_json(&v, &mut s);
        assert_eq!(s, r#"{"a":1.5,"b":[1,{"a":2,"z":1}]}"#);
    }
}
