//! MXNet RecordIO: the `.rec` + `.idx` pairs that insightface's training sets ship as.
//!
//! A `.rec` file is a sequence of frames, each a little-endian `u32` magic word
//! ([`MAGIC`]), a `u32` whose top 3 bits are a continuation flag and low 29 bits a length,
//! then that many payload bytes padded with zeros to a multiple of 4. A payload that holds
//! the magic word at a 4-aligned position is cut there into several frames (flags 1 = start,
//! 2 = middle, 3 = end; 0 = a whole record) and the magic word itself is dropped, so that
//! a reader that lost its place can find the next record by scanning for the magic word;
//! reading puts it back between the parts. This is dmlc-core's `RecordIOWriter` and
//! `RecordIOReader`.
//!
//! Image records put MXNet's [`IrHeader`] (24 bytes) in front of the encoded image, with
//! `flag` extra `f32` labels between the two when `flag > 0` (`mxnet.recordio.pack`).
//!
//! The `.idx` file maps record keys to byte offsets, one `key\toffset` line per record
//! (`mxnet.recordio.MXIndexedRecordIO`). [`RecordReader::open_with_index`] (and so
//! [`RecordDataset::open`](crate::RecordDataset::open) without an explicit index) uses
//! `X.idx` when it exists beside `X.rec`, checking every offset against the size of the
//! `.rec`, and scans the `.rec` when it does not.
//!
//! Every malformed byte is an [`Error`] naming the file and the byte offset (or the `.idx`
//! line); lengths read from a file are checked against the file's size before anything is
//! allocated for them.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::error::quote;
use crate::{Error, Result};

/// The little-endian word that starts every frame (dmlc-core's `kMagic`).
pub const MAGIC: u32 = 0xced7_230a;

/// Records must be shorter than this (2^29 bytes): a frame stores its length in 29 bits,
/// and dmlc's writer refuses anything longer even when it would be split.
pub const MAX_RECORD_LEN: usize = 1 << 29;

/// Size of [`IrHeader`] on disk.
pub const IR_HEADER_LEN: usize = 24;

const LENGTH_MASK: u32 = (1 << 29) - 1;
const FRAME_HEADER_LEN: u64 = 8;

/// Name used in errors for data that does not come from a file.
const MEMORY: &str = "<memory>";

/// The header in front of each image record, MXNet's `IRHeader`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct IrHeader {
    /// How many extra `f32` labels follow the header; 0 when `label` alone is the label.
    pub flag: u32,
    /// The label when `flag` is 0 (MXNet writes 0 here when there is a label array).
    pub label: f32,
    /// A free id; im2rec and insightface store the record's key.
    pub id: u64,
    /// A second free id, usually 0.
    pub id2: u64,
}

/// One image record: its header, its label array and the encoded image.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Record {
    /// The header as stored; after [`unpack`], `header.flag == labels.len()`.
    pub header: IrHeader,
    /// The label array (`flag` values), empty when `flag` is 0.
    pub labels: Vec<f32>,
    /// What follows the header and labels: an encoded JPEG or PNG for image records.
    pub payload: Vec<u8>,
}

impl Record {
    /// A record with a single label, as `pack(IRHeader(0, label, id, 0), payload)` makes.
    pub fn new(label: f32, id: u64, payload: Vec<u8>) -> Self {
        Self {
            header: IrHeader {
                flag: 0,
                label,
                id,
                id2: 0,
            },
            labels: Vec::new(),
            payload,
        }
    }

    /// A record with a label array, as `pack(IRHeader(0, labels, id, 0), payload)` makes.
    pub fn with_labels(labels: Vec<f32>, id: u64, payload: Vec<u8>) -> Self {
        Self {
            header: IrHeader {
                flag: labels.len() as u32,
                label: 0.0,
                id,
                id2: 0,
            },
            labels,
            payload,
        }
    }

    /// The record's label: the first of the label array when there is one, else
    /// `header.label` (what insightface's `arcface_torch` takes as the class).
    pub fn label(&self) -> Option<f32> {
        if self.header.flag > 0 {
            self.labels.first().copied()
        } else {
            Some(self.header.label)
        }
    }
}

/// Serialises a record as `mxnet.recordio.pack` does: header, label array, payload.
///
/// The stored `flag` is `labels.len()` whatever `header.flag` says, because readers take
/// the label count from it.
pub fn pack(record: &Record) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(IR_HEADER_LEN + 4 * record.labels.len() + record.payload.len());
    let h = &record.header;
    out.extend_from_slice(&(record.labels.len() as u32).to_le_bytes());
    out.extend_from_slice(&h.label.to_le_bytes());
    out.extend_from_slice(&h.id.to_le_bytes());
    out.extend_from_slice(&h.id2.to_le_bytes());
    for l in &record.labels {
        out.extend_from_slice(&l.to_le_bytes());
    }
    out.extend_from_slice(&record.payload);
    out
}

/// Parses a record as `mxnet.recordio.unpack` does. Errors name `<memory>` at offset 0;
/// [`RecordReader`] reports the file and offset instead.
pub fn unpack(bytes: &[u8]) -> Result<Record> {
    unpack_inner(bytes).map_err(|message| Error::RecordIo {
        path: PathBuf::from(MEMORY),
        offset: 0,
        message,
    })
}

fn unpack_inner(bytes: &[u8]) -> std::result::Result<Record, String> {
    let (header, rest) = parse_header(bytes)?;
    let n = labels_len(&header, rest.len())?;
    let labels = parse_labels(&rest[..n]);
    Ok(Record {
        header,
        labels,
        payload: rest[n..].to_vec(),
    })
}

fn parse_header(bytes: &[u8]) -> std::result::Result<(IrHeader, &[u8]), String> {
    if bytes.len() < IR_HEADER_LEN {
        return Err(format!(
            "record is {} byte(s), shorter than the {IR_HEADER_LEN}-byte image record header",
            bytes.len()
        ));
    }
    let u32_at =
        |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let u64_at = |i: usize| u64::from(u32_at(i)) | u64::from(u32_at(i + 4)) << 32;
    let header = IrHeader {
        flag: u32_at(0),
        label: f32::from_bits(u32_at(4)),
        id: u64_at(8),
        id2: u64_at(16),
    };
    Ok((header, &bytes[IR_HEADER_LEN..]))
}

/// Bytes taken by the label array, checked against what follows the header.
fn labels_len(header: &IrHeader, available: usize) -> std::result::Result<usize, String> {
    let n = (header.flag as usize).saturating_mul(4);
    if n > available {
        return Err(format!(
            "header declares {} labels ({n} bytes) but only {available} byte(s) follow it",
            header.flag
        ));
    }
    Ok(n)
}

fn parse_labels(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Longest `.idx` file read for a `.rec` of `rec_len` bytes: a line of at most 64 bytes
/// (two 20-digit numbers, a tab, line ends, some blanks) for each record the `.rec` can
/// hold (8 bytes each at least), and 64 KiB of slack.
pub fn max_idx_bytes(rec_len: u64) -> u64 {
    (rec_len / FRAME_HEADER_LEN)
        .saturating_mul(64)
        .saturating_add(64 << 10)
}

/// The `.idx` file insightface and im2rec put beside `name.rec`: `name.idx`.
pub fn idx_path(rec: &Path) -> PathBuf {
    rec.with_extension("idx")
}

/// Record 0 of an insightface training set (`train.rec`): no image, two labels giving the
/// key ranges of the image records and of the identity records.
///
/// Identity record `images.end + c` describes class `c`; its two labels are the key range
/// of that class's images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsightfaceHeader {
    /// Keys of the image records, `1..first identity key`.
    pub images: Range<u64>,
    /// Keys of the identity records, one per class in class order.
    pub identities: Range<u64>,
}

impl InsightfaceHeader {
    /// Number of identities, which image labels index.
    pub fn num_classes(&self) -> u64 {
        self.identities.end - self.identities.start
    }

    /// The header record itself, key 0 in the file.
    pub fn record(&self) -> Record {
        Record::with_labels(
            vec![self.images.end as f32, self.identities.end as f32],
            0,
            Vec::new(),
        )
    }

    /// Reads a header from record 0, or `None` when it is an ordinary record.
    ///
    /// insightface's readers only test `flag > 0`, which a multi-label image set also
    /// passes; asking for exactly two integral labels in order and no image keeps such a
    /// set from being taken for a header.
    pub fn from_record(record: &Record) -> Option<Self> {
        if record.header.flag != 2 || record.labels.len() != 2 || !record.payload.is_empty() {
            return None;
        }
        let start = as_index(record.labels[0])?;
        let end = as_index(record.labels[1])?;
        (start >= 1 && end >= start).then_some(Self {
            images: 1..start,
            identities: start..end,
        })
    }
}

/// The integer a float label stands for, if it is one.
pub(crate) fn as_index(x: f32) -> Option<u64> {
    // 2^64 is exactly representable; anything at or above it does not fit in a u64.
    (x.is_finite() && x >= 0.0 && x.fract() == 0.0 && x < 18_446_744_073_709_551_616.0)
        .then_some(x as u64)
}

/// Positional reads, so that one reader can serve several threads without a lock.
trait Source: Send + Sync {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

#[cfg(unix)]
struct FileSource(File);

#[cfg(unix)]
impl Source for FileSource {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.0, buf, offset)
    }
}

#[cfg(not(unix))]
struct FileSource(std::sync::Mutex<File>);

#[cfg(not(unix))]
impl Source for FileSource {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        // A poisoned lock only means another reader panicked mid-read; seeking resets state.
        let mut f = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(buf)
    }
}

impl Source for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).ok().filter(|&s| s <= self.len());
        match start.and_then(|s| self.get(s..s.checked_add(buf.len())?)) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

/// Where a record is: its key and byte offset, and the `.idx` line that said so (0 when
/// the file was scanned).
#[derive(Debug, Clone, Copy)]
struct Entry {
    key: u64,
    offset: u64,
    line: usize,
}

/// Reads records from a `.rec` file, by position or key through its `.idx`, or in file
/// order.
///
/// Without an `.idx`, opening scans the frame headers once (no payloads) to find every
/// record, giving keys `0, 1, 2, ...` in file order. Reads take `&self` and are positional,
/// so a reader can be shared between threads.
pub struct RecordReader {
    path: PathBuf,
    idx: Option<PathBuf>,
    source: Box<dyn Source>,
    file_len: u64,
    entries: Vec<Entry>,
    by_key: HashMap<u64, usize>,
}

impl std::fmt::Debug for RecordReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordReader")
            .field("path", &self.path)
            .field("idx", &self.idx)
            .field("file_len", &self.file_len)
            .field("records", &self.entries.len())
            .finish()
    }
}

impl RecordReader {
    /// Opens `rec`, with the record index from `idx` (see [`idx_path`]) or, without one, by
    /// scanning the file.
    ///
    /// Index lines are checked here (syntax, repeated keys, offsets past the end of the
    /// file); whether an offset really starts a record is found when it is read.
    pub fn open(rec: &Path, idx: Option<&Path>) -> Result<Self> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        let file = File::open(rec).map_err(io(rec))?;
        let file_len = file.metadata().map_err(io(rec))?.len();
        #[cfg(unix)]
        let source = FileSource(file);
        #[cfg(not(unix))]
        let source = FileSource(std::sync::Mutex::new(file));
        let idx_text = match idx {
            Some(p) => Some(crate::text::read_capped(
                p,
                max_idx_bytes(file_len),
                "RecordIO index of this .rec",
                |_, _| Ok(()),
            )?),
            None => None,
        };
        Self::build(
            rec.to_path_buf(),
            idx.map(Path::to_path_buf),
            Box::new(source),
            file_len,
            idx_text.as_deref(),
        )
    }

    /// Opens `rec` with the index beside it, [`idx_path`]`(rec)` (`X.idx` for `X.rec`), when
    /// that file exists, else by scanning `rec` (see [`RecordReader::open`]). An index that
    /// exists but is malformed, or points outside the `.rec`, is an error that names its
    /// line: a stale index is not silently replaced by a scan.
    pub fn open_with_index(rec: &Path) -> Result<Self> {
        let idx = idx_path(rec);
        if idx != rec && idx.is_file() {
            Self::open(rec, Some(&idx))
        } else {
            Self::open(rec, None)
        }
    }

    /// A reader over a `.rec` file's bytes and, optionally, its `.idx` text; errors name
    /// `<memory>`. Useful for data that is not in a file, and for fuzzing.
    pub fn from_bytes(rec: Vec<u8>, idx: Option<&[u8]>) -> Result<Self> {
        let file_len = rec.len() as u64;
        if let Some(text) = idx {
            let max = max_idx_bytes(file_len);
            if text.len() as u64 > max {
                return Err(Error::RecordIndex {
                    path: PathBuf::from(format!("{MEMORY}.idx")),
                    line: 1,
                    message: format!(
                        "the index is {} bytes, more than the {max} an index of a {file_len}-byte \
                         .rec can need",
                        text.len()
                    ),
                });
            }
        }
        Self::build(
            PathBuf::from(MEMORY),
            idx.map(|_| PathBuf::from(format!("{MEMORY}.idx"))),
            Box::new(rec),
            file_len,
            idx,
        )
    }

    fn build(
        path: PathBuf,
        idx: Option<PathBuf>,
        source: Box<dyn Source>,
        file_len: u64,
        idx_text: Option<&[u8]>,
    ) -> Result<Self> {
        let mut reader = Self {
            path,
            idx,
            source,
            file_len,
            entries: Vec::new(),
            by_key: HashMap::new(),
        };
        match idx_text {
            Some(text) => reader.parse_idx(text)?,
            None => reader.scan()?,
        }
        Ok(reader)
    }

    fn parse_idx(&mut self, text: &[u8]) -> Result<()> {
        let idx_path = self.idx.clone().unwrap_or_else(|| PathBuf::from(MEMORY));
        let bad = |line: usize, message: String| Error::RecordIndex {
            path: idx_path.clone(),
            line,
            message,
        };
        for (i, line) in text.split(|&b| b == b'\n').enumerate() {
            let n = i + 1;
            let line = std::str::from_utf8(line)
                .map_err(|_| bad(n, "line is not UTF-8 text".into()))?
                .trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.splitn(3, '\t').collect();
            let [key, offset] = fields[..] else {
                return Err(bad(
                    n,
                    format!("expected `index<TAB>offset`, found \"{}\"", quote(line)),
                ));
            };
            let key: u64 = key.trim().parse().map_err(|_| {
                bad(
                    n,
                    format!("index \"{}\" is not a non-negative integer", quote(key)),
                )
            })?;
            let offset: u64 = offset.trim().parse().map_err(|_| {
                bad(
                    n,
                    format!("offset \"{}\" is not a non-negative integer", quote(offset)),
                )
            })?;
            if offset >= self.file_len {
                return Err(bad(
                    n,
                    format!(
                        "offset {offset} is past the end of {} ({} bytes)",
                        self.path.display(),
                        self.file_len
                    ),
                ));
            }
            if self.file_len - offset < FRAME_HEADER_LEN {
                return Err(bad(
                    n,
                    format!(
                        "offset {offset} leaves no room for a record header in {} ({} bytes)",
                        self.path.display(),
                        self.file_len
                    ),
                ));
            }
            if self.entries.len() as u64 >= self.file_len / FRAME_HEADER_LEN {
                return Err(bad(
                    n,
                    format!(
                        "more index lines than {} ({} bytes) can hold records, at {} bytes \
                         each at least",
                        self.path.display(),
                        self.file_len,
                        FRAME_HEADER_LEN
                    ),
                ));
            }
            if let Some(&prev) = self.by_key.get(&key) {
                let prev = self.entries[prev].line;
                return Err(bad(n, format!("index {key} repeats line {prev}")));
            }
            self.by_key.insert(key, self.entries.len());
            self.entries.push(Entry {
                key,
                offset,
                line: n,
            });
        }
        Ok(())
    }

    fn scan(&mut self) -> Result<()> {
        let mut pos = 0;
        while pos < self.file_len {
            let key = self.entries.len() as u64;
            self.by_key.insert(key, self.entries.len());
            self.entries.push(Entry {
                key,
                offset: pos,
                line: 0,
            });
            pos = self.walk(pos, None)?;
        }
        Ok(())
    }

    fn err(&self, offset: u64, message: String) -> Error {
        Error::RecordIo {
            path: self.path.clone(),
            offset,
            message,
        }
    }

    fn read_bytes(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.source
            .read_exact_at(buf, offset)
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Reads and checks the frame header at `pos`: `(continuation flag, payload length)`.
    /// The payload and its padding are known to lie inside the file afterwards.
    fn frame_header(&self, pos: u64) -> Result<(u32, u32)> {
        if pos > self.file_len {
            return Err(self.err(
                pos,
                format!(
                    "offset is past the end of the file ({} bytes)",
                    self.file_len
                ),
            ));
        }
        let left = self.file_len - pos;
        if left < FRAME_HEADER_LEN {
            return Err(self.err(
                pos,
                format!("truncated record header: {left} byte(s) left, a header takes 8"),
            ));
        }
        let mut h = [0u8; 8];
        self.read_bytes(&mut h, pos)?;
        let magic = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        if magic != MAGIC {
            return Err(self.err(
                pos,
                format!(
                    "bad magic {magic:#010x}, expected {MAGIC:#010x}: not the start of a record"
                ),
            ));
        }
        let lrec = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let (cflag, len) = (lrec >> 29, lrec & LENGTH_MASK);
        if cflag > 3 {
            return Err(self.err(pos, format!("unknown continuation flag {cflag}")));
        }
        let padded = (u64::from(len) + 3) & !3;
        let room = left - FRAME_HEADER_LEN;
        if padded > room {
            return Err(self.err(
                pos,
                format!(
                    "record declares {len} payload byte(s) ({padded} padded) but only {room} \
                     byte(s) are left in the file: truncated or corrupt"
                ),
            ));
        }
        Ok((cflag, len))
    }

    /// Follows the frames of the record at `offset`, appending its bytes to `out` (with the
    /// magic words dmlc's writer cut out put back), and returns where the next record starts.
    fn walk(&self, offset: u64, mut out: Option<&mut Vec<u8>>) -> Result<u64> {
        let mut pos = offset;
        let mut first = true;
        loop {
            let (cflag, len) = self.frame_header(pos)?;
            // dmlc's stream reader does not check the order of parts, but its chunk reader
            // does; a part out of order means the file (or the .idx offset) is wrong.
            match (first, cflag) {
                (true, 2 | 3) => {
                    return Err(self.err(
                        pos,
                        format!("continuation part (flag {cflag}) where a record should start"),
                    ))
                }
                (false, 0 | 1) => {
                    return Err(self.err(
                        pos,
                        format!(
                            "part with flag {cflag} inside the split record that starts at byte {offset}"
                        ),
                    ))
                }
                _ => {}
            }
            if let Some(out) = out.as_deref_mut() {
                let start = out.len();
                out.resize(start + len as usize, 0);
                self.read_bytes(&mut out[start..], pos + FRAME_HEADER_LEN)?;
            }
            pos += FRAME_HEADER_LEN + ((u64::from(len) + 3) & !3);
            if cflag == 0 || cflag == 3 {
                return Ok(pos);
            }
            if let Some(out) = out.as_deref_mut() {
                out.extend_from_slice(&MAGIC.to_le_bytes());
            }
            first = false;
        }
    }

    fn entry(&self, index: usize) -> Result<Entry> {
        self.entries
            .get(index)
            .copied()
            .ok_or_else(|| Error::NoSuchItem {
                path: self.path.clone(),
                message: format!("no record {index}: there are {}", self.entries.len()),
            })
    }

    /// Names the `.idx` line an offset came from, for errors at that offset.
    fn with_origin(&self, e: Entry, err: Error) -> Error {
        match (err, &self.idx) {
            (
                Error::RecordIo {
                    path,
                    offset,
                    message,
                },
                Some(idx),
            ) if e.line > 0 => Error::RecordIo {
                path,
                offset,
                message: format!(
                    "{message} (record {} from {}:{})",
                    e.key,
                    idx.display(),
                    e.line
                ),
            },
            (err, _) => err,
        }
    }

    fn raw(&self, e: Entry) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.walk(e.offset, Some(&mut out))
            .map_err(|err| self.with_origin(e, err))?;
        Ok(out)
    }

    fn unpack_at(&self, offset: u64, bytes: &[u8]) -> Result<Record> {
        unpack_inner(bytes).map_err(|m| self.err(offset, m))
    }

    /// The `.rec` file (`<memory>` for [`RecordReader::from_bytes`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `.idx` file, if the records were indexed from one.
    pub fn idx(&self) -> Option<&Path> {
        self.idx.as_deref()
    }

    /// Number of records (lines of the `.idx`, or records found by scanning).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no records.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Record keys in index order: the `.idx`'s first column, or `0..len` when scanned.
    pub fn keys(&self) -> impl ExactSizeIterator<Item = u64> + '_ {
        self.entries.iter().map(|e| e.key)
    }

    /// Position (for [`read_at`](Self::read_at)) of the record with `key`.
    pub fn position(&self, key: u64) -> Option<usize> {
        self.by_key.get(&key).copied()
    }

    /// Key and byte offset of the `index`-th record.
    pub fn location(&self, index: usize) -> Option<(u64, u64)> {
        self.entries.get(index).map(|e| (e.key, e.offset))
    }

    /// The `index`-th record's bytes, without interpreting them as an image record.
    pub fn read_raw_at(&self, index: usize) -> Result<Vec<u8>> {
        self.raw(self.entry(index)?)
    }

    /// The `index`-th record (in `.idx` order), unpacked.
    pub fn read_at(&self, index: usize) -> Result<Record> {
        let e = self.entry(index)?;
        let bytes = self.raw(e)?;
        self.unpack_at(e.offset, &bytes)
            .map_err(|err| self.with_origin(e, err))
    }

    /// The record with `key` (`MXIndexedRecordIO.read_idx(key)`), unpacked.
    pub fn read_key(&self, key: u64) -> Result<Record> {
        let index = self.position(key).ok_or_else(|| Error::NoSuchItem {
            path: self.idx.clone().unwrap_or_else(|| self.path.clone()),
            message: format!("no record with index {key}"),
        })?;
        self.read_at(index)
    }

    /// The header and label array of the `index`-th record, reading only their bytes when
    /// the record is not split.
    pub fn header_at(&self, index: usize) -> Result<(IrHeader, Vec<f32>)> {
        let e = self.entry(index)?;
        let (cflag, len) = self
            .frame_header(e.offset)
            .map_err(|err| self.with_origin(e, err))?;
        if cflag != 0 {
            let r = self.read_at(index)?;
            return Ok((r.header, r.labels));
        }
        let data = e.offset + FRAME_HEADER_LEN;
        let len = len as usize;
        let mut head = vec![0u8; len.min(IR_HEADER_LEN)];
        self.read_bytes(&mut head, data)?;
        let origin = |m: String| self.with_origin(e, self.err(e.offset, m));
        let (header, _) = parse_header(&head).map_err(origin)?;
        let n = labels_len(&header, len - IR_HEADER_LEN).map_err(origin)?;
        let mut labels = vec![0u8; n];
        self.read_bytes(&mut labels, data + IR_HEADER_LEN as u64)?;
        Ok((header, parse_labels(&labels)))
    }

    /// insightface's header record (key 0), if the file has one; see [`InsightfaceHeader`].
    pub fn insightface_header(&self) -> Result<Option<InsightfaceHeader>> {
        let Some(index) = self.position(0) else {
            return Ok(None);
        };
        let bytes = self.raw(self.entries[index])?;
        // Record 0 of a plain RecordIO file need not be an image record at all.
        Ok(unpack_inner(&bytes)
            .ok()
            .and_then(|r| InsightfaceHeader::from_record(&r)))
    }

    /// Records in file order from the start, ignoring the `.idx`
    /// (`MXRecordIO.read` in a loop). The first error ends the iteration.
    pub fn iter(&self) -> Records<'_> {
        Records {
            raw: self.iter_raw(),
        }
    }

    /// Raw records in file order as `(byte offset, bytes)`, without unpacking them.
    pub fn iter_raw(&self) -> RawRecords<'_> {
        RawRecords {
            reader: self,
            pos: 0,
            done: false,
        }
    }
}

impl<'a> IntoIterator for &'a RecordReader {
    type Item = Result<Record>;
    type IntoIter = Records<'a>;

    fn into_iter(self) -> Records<'a> {
        self.iter()
    }
}

/// Raw records of a [`RecordReader`] in file order; see [`RecordReader::iter_raw`].
#[derive(Debug)]
pub struct RawRecords<'a> {
    reader: &'a RecordReader,
    pos: u64,
    done: bool,
}

impl Iterator for RawRecords<'_> {
    type Item = Result<(u64, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.pos >= self.reader.file_len {
            return None;
        }
        let offset = self.pos;
        let mut out = Vec::new();
        match self.reader.walk(offset, Some(&mut out)) {
            Ok(next) => {
                self.pos = next;
                Some(Ok((offset, out)))
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Unpacked records of a [`RecordReader`] in file order; see [`RecordReader::iter`].
#[derive(Debug)]
pub struct Records<'a> {
    raw: RawRecords<'a>,
}

impl Iterator for Records<'_> {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        let item = self.raw.next()?;
        let result = item.and_then(|(offset, bytes)| self.raw.reader.unpack_at(offset, &bytes));
        if result.is_err() {
            self.raw.done = true;
        }
        Some(result)
    }
}

/// Writes records in dmlc's framing, and the `.idx` lines for them.
///
/// [`RecordWriter::create`] writes files; [`RecordWriter::new`] writes to any sinks, such
/// as `Vec<u8>`s. Call [`finish`](Self::finish): dropping the writer flushes but loses
/// errors.
#[derive(Debug)]
pub struct RecordWriter<W: Write = BufWriter<File>> {
    rec: W,
    idx: Option<W>,
    rec_path: PathBuf,
    idx_path: PathBuf,
    offset: u64,
    count: usize,
    keys: HashSet<u64>,
}

impl RecordWriter<BufWriter<File>> {
    /// Creates (or truncates) `rec` and, if given, `idx`.
    pub fn create(rec: &Path, idx: Option<&Path>) -> Result<Self> {
        let create = |p: &Path| {
            File::create(p)
                .map(BufWriter::new)
                .map_err(|source| Error::Io {
                    path: p.to_path_buf(),
                    source,
                })
        };
        let rec_file = create(rec)?;
        let idx_file = idx.map(create).transpose()?;
        let mut w = Self::new(rec_file, idx_file);
        w.rec_path = rec.to_path_buf();
        w.idx_path = idx.map_or_else(|| PathBuf::from(MEMORY), Path::to_path_buf);
        Ok(w)
    }
}

impl<W: Write> RecordWriter<W> {
    /// Writes the records to `rec` and the index lines, if wanted, to `idx`.
    pub fn new(rec: W, idx: Option<W>) -> Self {
        Self {
            rec,
            idx,
            rec_path: PathBuf::from(MEMORY),
            idx_path: PathBuf::from(format!("{MEMORY}.idx")),
            offset: 0,
            count: 0,
            keys: HashSet::new(),
        }
    }

    /// Number of records written.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether nothing has been written.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Packs `record` (see [`pack`]) and writes it under `key`; returns its byte offset.
    pub fn write(&mut self, key: u64, record: &Record) -> Result<u64> {
        self.write_raw(key, &pack(record))
    }

    /// Writes `payload` as one record under `key` (`MXIndexedRecordIO.write_idx`); returns
    /// its byte offset. Keys must be unique when there is an index.
    pub fn write_raw(&mut self, key: u64, payload: &[u8]) -> Result<u64> {
        if payload.len() >= MAX_RECORD_LEN {
            return Err(Error::RecordIo {
                path: self.rec_path.clone(),
                offset: self.offset,
                message: format!(
                    "record of {} bytes is too long: RecordIO holds records under 2^29 bytes",
                    payload.len()
                ),
            });
        }
        if self.idx.is_some() && !self.keys.insert(key) {
            return Err(Error::RecordIndex {
                path: self.idx_path.clone(),
                line: self.count + 1,
                message: format!("index {key} is already written"),
            });
        }
        let offset = self.offset;
        let written = write_frames(&mut self.rec, payload).map_err(|source| Error::Io {
            path: self.rec_path.clone(),
            source,
        })?;
        self.offset += written;
        if let Some(idx) = &mut self.idx {
            writeln!(idx, "{key}\t{offset}").map_err(|source| Error::Io {
                path: self.idx_path.clone(),
                source,
            })?;
        }
        self.count += 1;
        Ok(offset)
    }

    /// Flushes both sinks and returns them.
    pub fn finish(mut self) -> Result<(W, Option<W>)> {
        self.rec.flush().map_err(|source| Error::Io {
            path: self.rec_path.clone(),
            source,
        })?;
        if let Some(idx) = &mut self.idx {
            idx.flush().map_err(|source| Error::Io {
                path: self.idx_path.clone(),
                source,
            })?;
        }
        Ok((self.rec, self.idx))
    }
}

/// dmlc's `RecordIOWriter::WriteRecord`: one frame, or several when the payload holds the
/// magic word at 4-aligned positions. Returns the number of bytes written.
fn write_frames<W: Write>(w: &mut W, payload: &[u8]) -> std::io::Result<u64> {
    let magic = MAGIC.to_le_bytes();
    let mut frame = |cflag: u32, part: &[u8]| -> std::io::Result<u64> {
        // The caller keeps payloads under 2^29 bytes, so the length fits its 29 bits.
        let lrec = (cflag << 29) | part.len() as u32;
        w.write_all(&magic)?;
        w.write_all(&lrec.to_le_bytes())?;
        w.write_all(part)?;
        let pad = (4 - part.len() % 4) % 4;
        w.write_all(&[0u8; 3][..pad])?;
        Ok(FRAME_HEADER_LEN + (part.len() + pad) as u64)
    };
    let mut written = 0;
    let mut start = 0;
    let aligned_end = payload.len() / 4 * 4;
    for i in (0..aligned_end).step_by(4) {
        if payload[i..i + 4] == magic {
            written += frame(if start == 0 { 1 } else { 2 }, &payload[start..i])?;
            start = i + 4;
        }
    }
    written += frame(if start != 0 { 3 } else { 0 }, &payload[start..])?;
    Ok(written)
}
