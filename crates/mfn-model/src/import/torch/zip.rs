//! The zip archives `torch.save` writes (PyTorch >= 1.6): members stored uncompressed,
//! found through the central directory (ZIP64 records included), each checked against
//! the file's bounds and its CRC-32 before it is used.

use std::collections::HashMap;

use super::pickle::shown;

/// A fixed-size central directory entry, before its name, extra field and comment.
const CENTRAL_LEN: usize = 46;
/// A fixed-size local file header, before its name and extra field.
const LOCAL_LEN: usize = 30;
/// The end of central directory record, before its comment.
const EOCD_LEN: usize = 22;

/// An entry of the central directory, with where its data lies.
#[derive(Clone, Copy, Debug)]
struct Member {
    flags: u16,
    method: u16,
    crc: u32,
    compressed: u64,
    size: u64,
    /// The offset of its local header.
    local: usize,
    /// The offset of its data, after the local header.
    start: usize,
}

/// An archive's members by name, over the bytes of the file.
pub(crate) struct Archive<'a> {
    data: &'a [u8],
    members: HashMap<&'a str, Member>,
    /// Names in central directory order.
    order: Vec<&'a str>,
}

fn u16_at(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        data.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        data.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(data: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        data.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn offset(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

impl<'a> Archive<'a> {
    /// Reads the central directory. Errors say what was expected where.
    pub(crate) fn open(data: &'a [u8]) -> Result<Self, String> {
        let eocd = find_eocd(data).ok_or_else(|| {
            format!(
                "no end of central directory record in the last {} bytes: not a complete \
                 zip archive (truncated?)",
                data.len().min(EOCD_LEN + 0xFFFF)
            )
        })?;
        let field16 = |at: usize| u16_at(data, eocd + at).unwrap_or(0);
        let field32 = |at: usize| u32_at(data, eocd + at).unwrap_or(0);
        let mut entries = u64::from(field16(10));
        let mut cd_size = u64::from(field32(12));
        let mut cd_start = u64::from(field32(16));
        // A ZIP64 locator just before the record points at the ZIP64 record, which holds
        // the 64-bit counts (PyTorch always writes them).
        if let Some(locator) = eocd.checked_sub(20) {
            if data.get(locator..locator + 4) == Some(b"PK\x06\x07") {
                let at = u64_at(data, locator + 8).map(offset).unwrap_or(usize::MAX);
                if data.get(at..at.saturating_add(4)) != Some(b"PK\x06\x06") {
                    return Err(format!(
                        "the ZIP64 end of central directory locator at byte offset \
                         {locator} points at byte offset {at}, where there is no ZIP64 \
                         record"
                    ));
                }
                let missing = || format!("truncated ZIP64 record at byte offset {at}");
                entries = u64_at(data, at + 32).ok_or_else(missing)?;
                cd_size = u64_at(data, at + 40).ok_or_else(missing)?;
                cd_start = u64_at(data, at + 48).ok_or_else(missing)?;
            }
        }
        let start = offset(cd_start);
        let end = start.saturating_add(offset(cd_size));
        let directory = data.get(start..end).ok_or_else(|| {
            format!(
                "the central directory (byte offsets {cd_start} to {}) lies outside the file \
                 of {} bytes",
                cd_start.saturating_add(cd_size),
                data.len()
            )
        })?;
        // Each entry takes at least CENTRAL_LEN bytes, so the count cannot exceed that.
        if entries > (directory.len() / CENTRAL_LEN) as u64 {
            return Err(format!(
                "the central directory claims {entries} entries in {} bytes",
                directory.len()
            ));
        }
        let mut members = HashMap::new();
        let mut order = Vec::new();
        let mut pos = 0usize;
        for i in 0..entries {
            let at = start + pos;
            let bad = |why: &str| format!("central directory entry {i} at byte offset {at}: {why}");
            if directory.get(pos..pos + 4) != Some(b"PK\x01\x02") {
                return Err(bad("no entry signature"));
            }
            let get16 = |o: usize| u16_at(directory, pos + o).ok_or_else(|| bad("truncated"));
            let get32 = |o: usize| u32_at(directory, pos + o).ok_or_else(|| bad("truncated"));
            let flags = get16(8)?;
            let method = get16(10)?;
            let crc = get32(16)?;
            let mut compressed = u64::from(get32(20)?);
            let mut size = u64::from(get32(24)?);
            let name_len = usize::from(get16(28)?);
            let extra_len = usize::from(get16(30)?);
            let comment_len = usize::from(get16(32)?);
            let mut local = u64::from(get32(42)?);
            let name_at = pos + CENTRAL_LEN;
            let name = directory
                .get(name_at..name_at + name_len)
                .ok_or_else(|| bad("truncated name"))?;
            let extra = directory
                .get(name_at + name_len..name_at + name_len + extra_len)
                .ok_or_else(|| bad("truncated extra field"))?;
            // ZIP64 extended information: the saturated 32-bit fields, in this order.
            let mut e = 0;
            while let (Some(id), Some(len)) = (u16_at(extra, e), u16_at(extra, e + 2)) {
                let body = extra
                    .get(e + 4..e + 4 + usize::from(len))
                    .ok_or_else(|| bad("truncated extra field"))?;
                if id == 1 {
                    let mut k = 0;
                    for field in [&mut size, &mut compressed, &mut local] {
                        if *field == u64::from(u32::MAX) {
                            *field = u64_at(body, k)
                                .ok_or_else(|| bad("truncated ZIP64 extra field"))?;
                            k += 8;
                        }
                    }
                }
                e += 4 + usize::from(len);
            }
            pos = name_at + name_len + extra_len + comment_len;
            if pos > directory.len() {
                return Err(bad("truncated comment"));
            }
            let Ok(name) = std::str::from_utf8(name) else {
                continue;
            };
            if members.contains_key(name) {
                return Err(bad(&format!("a second member named `{}`", shown(name))));
            }
            let (local, start) = local_header(data, local)
                .map_err(|why| format!("zip member `{}`: {why}", shown(name)))?;
            order.push(name);
            members.insert(
                name,
                Member {
                    flags,
                    method,
                    crc,
                    compressed,
                    size,
                    local,
                    start,
                },
            );
        }
        // No two members may share bytes: each byte of the file is then read (and its
        // CRC-32 computed) at most once, however many entries the directory lists.
        let mut spans: Vec<(usize, usize, &str)> = members
            .iter()
            .map(|(name, m)| {
                let end = m.start.saturating_add(offset(m.compressed));
                (m.local, end, *name)
            })
            .collect();
        spans.sort_unstable();
        for pair in spans.windows(2) {
            let ((_, end, a), (start, _, b)) = (pair[0], pair[1]);
            if start < end {
                return Err(format!(
                    "zip members `{}` and `{}` overlap (byte offsets {start} to {end}): \
                     not an archive torch.save writes",
                    shown(a),
                    shown(b)
                ));
            }
        }
        Ok(Self {
            data,
            members,
            order,
        })
    }

    /// Member names in the order of the central directory.
    pub(crate) fn names(&self) -> &[&'a str] {
        &self.order
    }

    /// The size a member declares, if it exists.
    pub(crate) fn size(&self, name: &str) -> Option<u64> {
        self.members.get(name).map(|m| m.size)
    }

    /// A member's bytes, checked: stored (not compressed, not encrypted), inside the file,
    /// matching its CRC-32. `Ok(None)` when there is no such member.
    pub(crate) fn read(&self, name: &str) -> Result<Option<&'a [u8]>, String> {
        let Some(m) = self.members.get(name) else {
            return Ok(None);
        };
        let bad = |why: String| format!("zip member `{name}`: {why}");
        if m.flags & 1 != 0 {
            return Err(bad("it is encrypted".into()));
        }
        if m.method != 0 {
            return Err(bad(format!(
                "it is compressed (method {}); torch.save stores members uncompressed",
                m.method
            )));
        }
        if m.compressed != m.size {
            return Err(bad(format!(
                "stored, yet its compressed size {} differs from its size {}",
                m.compressed, m.size
            )));
        }
        let start = m.start;
        let end = start.saturating_add(offset(m.size));
        let bytes = self.data.get(start..end).ok_or_else(|| {
            bad(format!(
                "truncated: its {} bytes at byte offset {start} run past the end of the file \
                 ({} bytes)",
                m.size,
                self.data.len()
            ))
        })?;
        let crc = crc32(bytes);
        if crc != m.crc {
            return Err(bad(format!(
                "CRC-32 {crc:#010x} of its {} bytes at byte offset {start} differs from the \
                 {:#010x} the central directory records: the file is corrupt",
                m.size, m.crc
            )));
        }
        Ok(Some(bytes))
    }
}

/// The local header the central directory puts at `local`: its offset and that of the
/// data after it.
fn local_header(data: &[u8], local: u64) -> Result<(usize, usize), String> {
    let at = offset(local);
    if data.get(at..at.saturating_add(4)) != Some(b"PK\x03\x04") {
        return Err(format!(
            "no local header at byte offset {local}, where the central directory puts it"
        ));
    }
    let (Some(name_len), Some(extra_len)) = (u16_at(data, at + 26), u16_at(data, at + 28)) else {
        return Err(format!("truncated local header at byte offset {at}"));
    };
    Ok((
        at,
        at + LOCAL_LEN + usize::from(name_len) + usize::from(extra_len),
    ))
}

/// The offset of the end of central directory record: the last signature from which the
/// record, and its comment, fit in the file.
fn find_eocd(data: &[u8]) -> Option<usize> {
    let last = data.len().checked_sub(EOCD_LEN)?;
    let first = last.saturating_sub(0xFFFF);
    (first..=last).rev().find(|&at| {
        data.get(at..at + 4) == Some(b"PK\x05\x06")
            && u16_at(data, at + 20).is_some_and(|c| at + EOCD_LEN + usize::from(c) <= data.len())
    })
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// CRC-32 (IEEE), as zip records it.
fn crc32(bytes: &[u8]) -> u32 {
    !bytes.iter().fold(!0u32, |c, &b| {
        CRC_TABLE[usize::from((c as u8) ^ b)] ^ (c >> 8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }
}
