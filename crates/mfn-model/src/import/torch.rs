//! PyTorch `state_dict` files (`.pt`, `.pth`), read without Python.
//!
//! Both layouts `torch.save` has used are read: the zip archive of PyTorch >= 1.6, through
//! candle's pickle reader, and the older single-stream layout (a magic-number pickle, a
//! protocol pickle, a system-info pickle, the `state_dict` pickle, a pickle listing the
//! storage keys, then each storage as a little-endian element count and raw data). Only
//! the pickle opcodes needed for tensors are interpreted; nothing is executed.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// The pickled magic number that opens the legacy layout: protocol 2, a 10-byte LONG1
/// holding 0x1950a86a20f9469cfc6c, STOP.
const LEGACY_MAGIC: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e,
];

fn torch_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Torch {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Reads every floating-point tensor of a `state_dict` (as `f32`) by name. Integer
/// buffers such as BatchNorm's `num_batches_tracked` are left out.
pub fn read_state_dict(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let tensors = if bytes.starts_with(b"PK\x03\x04") {
        candle_core::pickle::read_all(path)
            .map_err(|e| torch_err(path, format!("cannot read the zip checkpoint: {e}")))?
    } else if bytes.starts_with(&LEGACY_MAGIC) {
        read_legacy(&bytes, path)?
    } else {
        return Err(torch_err(
            path,
            "not a PyTorch checkpoint: neither a zip archive nor the legacy pickle layout",
        ));
    };
    let mut out = HashMap::new();
    for (name, t) in tensors {
        if matches!(
            t.dtype(),
            DType::F32 | DType::F64 | DType::F16 | DType::BF16
        ) {
            let name = name.strip_prefix("module.").unwrap_or(&name).to_string();
            out.insert(name, t.to_dtype(DType::F32)?.to_device(device)?);
        }
    }
    if out.is_empty() {
        return Err(torch_err(
            path,
            "the checkpoint holds no floating-point tensors",
        ));
    }
    Ok(out)
}

fn read_pickle(cur: &mut Cursor<&[u8]>, path: &Path, what: &str) -> Result<Object> {
    let at = cur.position();
    let mut stack = Stack::empty();
    stack
        .read_loop(cur)
        .and_then(|_| stack.finalize())
        .map_err(|e| torch_err(path, format!("{what} pickle at byte offset {at}: {e}")))
}

fn read_legacy(bytes: &[u8], path: &Path) -> Result<Vec<(String, Tensor)>> {
    let mut cur = Cursor::new(bytes);
    cur.set_position(LEGACY_MAGIC.len() as u64);
    read_pickle(&mut cur, path, "protocol version")?;
    read_pickle(&mut cur, path, "system info")?;
    let root = read_pickle(&mut cur, path, "state_dict")?;
    let keys = read_pickle(&mut cur, path, "storage keys")?;

    let entries = match root {
        Object::Dict(entries) => entries,
        _ => {
            return Err(torch_err(
                path,
                "the checkpoint is not a state_dict (a dict of tensors)",
            ))
        }
    };
    // A training checkpoint may nest the weights under "state_dict".
    let entries = match entries
        .iter()
        .position(|(k, _)| *k == Object::Unicode("state_dict".into()))
    {
        Some(i) => match entries.into_iter().nth(i).map(|(_, v)| v) {
            Some(Object::Dict(inner)) => inner,
            _ => return Err(torch_err(path, "`state_dict` entry is not a dict")),
        },
        None => entries,
    };
    let infos: Vec<_> = entries
        .into_iter()
        .filter_map(|(name, value)| value.into_tensor_info(name, Path::new("")).transpose())
        .collect::<candle_core::Result<_>>()
        .map_err(|e| torch_err(path, format!("bad tensor entry: {e}")))?;
    let keys: Vec<String> = match keys {
        Object::List(items) => items
            .into_iter()
            .map(|k| {
                k.unicode()
                    .map_err(|_| torch_err(path, "storage key is not a string"))
            })
            .collect::<Result<_>>()?,
        _ => return Err(torch_err(path, "storage key list is not a list")),
    };
    let key_of = |info_path: &str| info_path.trim_start_matches('/').to_string();
    let dtype_of: HashMap<String, DType> =
        infos.iter().map(|i| (key_of(&i.path), i.dtype)).collect();

    // Storages follow the pickles back to back, in the order of the key list.
    let mut storages: HashMap<String, &[u8]> = HashMap::new();
    let mut pos = cur.position() as usize;
    for key in keys {
        let dtype = *dtype_of
            .get(&key)
            .ok_or_else(|| torch_err(path, format!("storage `{key}` is used by no tensor")))?;
        let head = bytes.get(pos..pos + 8).ok_or_else(|| {
            torch_err(
                path,
                format!("truncated: storage `{key}` header at byte offset {pos}"),
            )
        })?;
        let count = u64::from_le_bytes(head.try_into().unwrap_or_default()) as usize;
        let len = count
            .checked_mul(dtype.size_in_bytes())
            .ok_or_else(|| torch_err(path, format!("storage `{key}` size overflows")))?;
        let data = bytes.get(pos + 8..pos + 8 + len).ok_or_else(|| {
            torch_err(
                path,
                format!(
                    "truncated: storage `{key}` needs {len} bytes at byte offset {}, the file has {}",
                    pos + 8,
                    bytes.len()
                ),
            )
        })?;
        storages.insert(key, data);
        pos += 8 + len;
    }

    let mut out = Vec::with_capacity(infos.len());
    for info in infos {
        let data = storages[&key_of(&info.path)];
        let layout = &info.layout;
        let size = info.dtype.size_in_bytes();
        let outside = || {
            torch_err(
                path,
                format!("tensor `{}` lies outside its storage", info.name),
            )
        };
        let t = if layout.is_contiguous() {
            let start = layout.start_offset();
            let len = layout.shape().elem_count() * size;
            let raw = data.get(start..start + len).ok_or_else(outside)?;
            Tensor::from_raw_buffer(raw, info.dtype, layout.dims(), &Device::Cpu)?
        } else {
            // A view (e.g. a transposed weight): gather its elements from the storage.
            let storage =
                Tensor::from_raw_buffer(data, info.dtype, &[data.len() / size], &Device::Cpu)?;
            let first = layout.start_offset() / size;
            let mut index = Vec::with_capacity(layout.shape().elem_count());
            let dims = layout.dims();
            let mut at = vec![0usize; dims.len()];
            for _ in 0..layout.shape().elem_count() {
                let offset = first
                    + at.iter()
                        .zip(layout.stride())
                        .map(|(i, s)| i * s)
                        .sum::<usize>();
                if offset >= storage.elem_count() {
                    return Err(outside());
                }
                index.push(offset as u32);
                for d in (0..dims.len()).rev() {
                    at[d] += 1;
                    if at[d] < dims[d] {
                        break;
                    }
                    at[d] = 0;
                }
            }
            let index = Tensor::from_vec(index, layout.shape().elem_count(), &Device::Cpu)?;
            storage.index_select(&index, 0)?.reshape(dims)?
        };
        out.push((info.name, t));
    }
    Ok(out)
}
