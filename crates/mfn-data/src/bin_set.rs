//! insightface verification sets (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...).
//!
//! Such a file is a Python pickle of `(bins, issame_list)`: `bins` holds the encoded images
//! (JPEG or PNG files, byte for byte), two per pair in pair order, and `issame_list` one
//! bool per pair. Pickles can name any Python callable, so loading one with Python runs
//! whatever it says. This reader is a small interpreter of its own that builds nothing but
//! plain data (None, bools, ints, bytes, strings, lists and tuples) and refuses every other
//! object with the file and byte offset of the opcode.
//!
//! One callable is understood without being called: Python 3 writes `bytes` for protocol 2
//! as `_codecs.encode(str, 'latin1')`, so the global `_codecs encode`, reduced over exactly
//! a string and `'latin1'`, turns the string's code points (all `<= 255`) back into bytes.
//!
//! Lengths are checked against what is left of the file before anything is allocated, the
//! stack, memo and object count are bounded, and nothing recurses, so a corrupt or hostile
//! file gives an error rather than a panic or an outsized allocation.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::image::load_batch_encoded;
use crate::{Error, Pairs, Result};

/// `.bin` files longer than this are refused before they are read: the largest public
/// sets (`cfp_fp.bin`, `agedb_30.bin`) are a few hundred MB.
pub const MAX_BIN_FILE_BYTES: u64 = 4 << 30;

/// A verification set: encoded images, two per pair, and whether each pair shows one
/// person.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BinSet {
    /// Encoded images (JPEG, PNG, ...), as stored: pair `i` is images `2i` and `2i + 1`.
    pub images: Vec<Vec<u8>>,
    /// `true` when pair `i` shows the same person.
    pub issame: Vec<bool>,
}

impl BinSet {
    /// Reads a `.bin` file of at most [`MAX_BIN_FILE_BYTES`]. A file whose first byte
    /// starts no pickle is refused as soon as it is read.
    pub fn read(path: &Path) -> Result<Self> {
        let first_byte = |b: &[u8], start: usize| match (start, b.first()) {
            (0, Some(&first)) if first != op::PROTO && !first.is_ascii_graphic() => {
                Err(Error::Pickle {
                    path: path.to_path_buf(),
                    offset: 0,
                    message: format!(
                        "not a pickle: no pickle starts with byte {first:#04x} (a .bin set \
                         starts with the PROTO opcode 0x80)"
                    ),
                })
            }
            _ => Ok(()),
        };
        let bytes = crate::text::read_capped(path, MAX_BIN_FILE_BYTES, ".bin set", first_byte)?;
        Self::parse(&bytes, path)
    }

    /// Parses the bytes of a `.bin` file; `path` is only used in error messages.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        let mut vm = Unpickler::new(bytes, path);
        let top = vm.run()?;
        vm.into_set(top)
    }

    /// Number of pairs.
    pub fn pairs(&self) -> usize {
        self.issame.len()
    }

    /// Packs the images of a pair list, file bytes as they are, in pair order: each pair's
    /// two images, even where pairs share an image. Fails before reading anything when an
    /// image is missing.
    pub fn from_pairs(pairs: &Pairs, root: &Path, ext: &str) -> Result<Self> {
        Self::from_pairs_with_progress(pairs, root, ext, |_| {})
    }

    /// [`BinSet::from_pairs`], calling `read(bytes)` after each image file is read (from
    /// several threads), for a progress bar.
    pub fn from_pairs_with_progress(
        pairs: &Pairs,
        root: &Path,
        ext: &str,
        read: impl Fn(usize) + Sync,
    ) -> Result<Self> {
        let paths: Vec<PathBuf> = pairs
            .pairs
            .iter()
            .flat_map(|p| [p.a.path(root, ext), p.b.path(root, ext)])
            .collect();
        let mut missing = crate::missing_files(&paths);
        if !missing.is_empty() {
            missing.sort();
            missing.dedup();
            return Err(Error::MissingImages {
                root: root.to_path_buf(),
                paths: missing,
            });
        }
        let images = paths
            .par_iter()
            .map(|path| {
                let bytes = std::fs::read(path).map_err(|source| Error::Io {
                    path: path.clone(),
                    source,
                })?;
                read(bytes.len());
                Ok(bytes)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            images,
            issame: pairs.labels(),
        })
    }

    /// Checks what [`BinSet::parse`] insists on: at least one pair, and two images per pair.
    /// `path` names the set in the error.
    pub fn validate(&self, path: &Path) -> Result<()> {
        check_counts(self.images.len(), self.issame.len(), path)
    }

    /// The set as a protocol-4 pickle of `(list of bytes, list of bools)`, which Python's
    /// `pickle.load` (and so insightface) reads, with or without `encoding='bytes'`.
    pub fn to_pickle(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(self.images.iter().map(|i| i.len() + 9).sum::<usize>() + 64);
        // No FRAME opcodes: framing is an optional read-ahead hint, and pickle.load accepts
        // protocol-4 data without it.
        out.extend_from_slice(&[op::PROTO, 4, op::EMPTY_LIST]);
        for chunk in self.images.chunks(APPENDS_BATCH) {
            out.push(op::MARK);
            for image in chunk {
                write_bytes(&mut out, image);
            }
            out.push(op::APPENDS);
        }
        out.push(op::EMPTY_LIST);
        for chunk in self.issame.chunks(APPENDS_BATCH) {
            out.push(op::MARK);
            out.extend(
                chunk
                    .iter()
                    .map(|&s| if s { op::NEWTRUE } else { op::NEWFALSE }),
            );
            out.push(op::APPENDS);
        }
        out.extend_from_slice(&[op::TUPLE2, op::STOP]);
        out
    }

    /// Writes the set as a `.bin` file (see [`BinSet::to_pickle`]) after
    /// [`BinSet::validate`], so that every file written can be read back.
    pub fn write(&self, path: &Path) -> Result<()> {
        self.validate(path)?;
        std::fs::write(path, self.to_pickle()).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Decodes the images of the pairs in `pairs` into one `[2n, 3, H, W]` tensor of RGB
    /// pixels in `0..=255`, two rows per pair. Every image must be `size` (width x height)
    /// already, as for [`crate::load_batch`]; `path` names the set in errors.
    pub fn load_pairs(
        &self,
        pairs: Range<usize>,
        path: &Path,
        size: [usize; 2],
        device: &Device,
    ) -> Result<Tensor> {
        if pairs.start > pairs.end || pairs.end > self.pairs() {
            return Err(bin_error(
                path,
                format!(
                    "pairs {}..{} asked for, the set has {}",
                    pairs.start,
                    pairs.end,
                    self.pairs()
                ),
            ));
        }
        let images = 2 * pairs.start..2 * pairs.end;
        let first = images.start;
        load_batch_encoded(&self.images[images], first, path, size, device)
    }
}

fn bin_error(path: &Path, message: String) -> Error {
    Error::BinSet {
        path: path.to_path_buf(),
        message,
    }
}

/// Python's pickler appends at most this many items per `APPENDS`.
const APPENDS_BATCH: usize = 1000;

fn write_bytes(out: &mut Vec<u8>, data: &[u8]) {
    if let Ok(n) = u8::try_from(data.len()) {
        out.extend_from_slice(&[op::SHORT_BINBYTES, n]);
    } else if let Ok(n) = u32::try_from(data.len()) {
        out.push(op::BINBYTES);
        out.extend_from_slice(&n.to_le_bytes());
    } else {
        out.push(op::BINBYTES8);
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    }
    out.extend_from_slice(data);
}

/// Pickle opcodes (CPython's `Lib/pickle.py`).
mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const FLOAT: u8 = b'F';
    pub const INT: u8 = b'I';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const LONG: u8 = b'L';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const PERSID: u8 = b'P';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const STRING: u8 = b'S';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const UNICODE: u8 = b'V';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const DICT: u8 = b'd';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const GET: u8 = b'g';
    pub const BINGET: u8 = b'h';
    pub const INST: u8 = b'i';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const EMPTY_LIST: u8 = b']';
    pub const OBJ: u8 = b'o';
    pub const PUT: u8 = b'p';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const BINFLOAT: u8 = b'G';
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const EXT1: u8 = 0x82;
    pub const EXT2: u8 = 0x83;
    pub const EXT4: u8 = 0x84;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const EMPTY_SET: u8 = 0x8f;
    pub const ADDITEMS: u8 = 0x90;
    pub const FROZENSET: u8 = 0x91;
    pub const NEWOBJ_EX: u8 = 0x92;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
    pub const BYTEARRAY8: u8 = 0x96;
    pub const NEXT_BUFFER: u8 = 0x97;
    pub const READONLY_BUFFER: u8 = 0x98;

    /// The name of a known opcode the reader refuses, for the error message.
    pub fn refused(code: u8) -> Option<&'static str> {
        Some(match code {
            FLOAT => "FLOAT",
            INT => "INT",
            LONG => "LONG",
            PERSID => "PERSID",
            BINPERSID => "BINPERSID",
            STRING => "STRING",
            UNICODE => "UNICODE",
            BUILD => "BUILD",
            DICT => "DICT",
            EMPTY_DICT => "EMPTY_DICT",
            GET => "GET",
            OBJ => "OBJ",
            PUT => "PUT",
            SETITEM => "SETITEM",
            SETITEMS => "SETITEMS",
            BINFLOAT => "BINFLOAT",
            NEWOBJ => "NEWOBJ",
            EXT1 => "EXT1",
            EXT2 => "EXT2",
            EXT4 => "EXT4",
            EMPTY_SET => "EMPTY_SET",
            ADDITEMS => "ADDITEMS",
            FROZENSET => "FROZENSET",
            NEWOBJ_EX => "NEWOBJ_EX",
            NEXT_BUFFER => "NEXT_BUFFER",
            READONLY_BUFFER => "READONLY_BUFFER",
            _ => return None,
        })
    }
}

/// Limits that keep a hostile file from exhausting memory. A real set needs a handful of
/// objects per image (`lfw.bin`: about 12,000 of each), far below all of them.
const MAX_STACK: usize = 1 << 20;
const MAX_MARKS: usize = 1 << 16;
const MAX_MEMO: usize = 1 << 22;
const MAX_OBJECTS: usize = 1 << 22;
/// Byte strings may take at most this many times the file's size in all: the file's own
/// data, the latin1 conversions, and copies of an image that several pairs reference.
const MAX_EXPANSION: usize = 4;

/// A value the pickle builds. Containers hold indices into the object table, so that
/// shared references cost nothing, cycles are harmless and nothing recurses.
#[derive(Debug)]
enum Obj {
    None,
    Bool(bool),
    Int(i64),
    Bytes(Vec<u8>),
    Str(String),
    List(Vec<usize>),
    Tuple(Vec<usize>),
    /// The global `_codecs encode`: only ever reduced, never called.
    Codecs,
}

const NONE: usize = 0;
const FALSE: usize = 1;
const TRUE: usize = 2;
const CODECS: usize = 3;

struct Unpickler<'a> {
    path: &'a Path,
    data: &'a [u8],
    pos: usize,
    /// Where the opcode being run starts, for error messages.
    at: usize,
    objs: Vec<Obj>,
    stack: Vec<usize>,
    marks: Vec<usize>,
    memo: HashMap<u32, usize>,
    /// Bytes that byte strings may still allocate.
    budget: usize,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8], path: &'a Path) -> Self {
        Self {
            path,
            data,
            pos: 0,
            at: 0,
            objs: vec![Obj::None, Obj::Bool(false), Obj::Bool(true), Obj::Codecs],
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            budget: data
                .len()
                .saturating_mul(MAX_EXPANSION)
                .saturating_add(4096),
        }
    }

    fn err(&self, message: impl Into<String>) -> Error {
        Error::Pickle {
            path: self.path.to_path_buf(),
            offset: self.at as u64,
            message: message.into(),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let left = self.data.len() - self.pos;
        if n > left {
            return Err(self.err(format!(
                "truncated: {what} needs {n} bytes, only {left} left (file is {} bytes)",
                self.data.len()
            )));
        }
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &str) -> Result<usize> {
        Ok(self.array::<1>(what)?[0] as usize)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A length as `usize`; `take` then checks it against what is left of the file.
    fn len64(&mut self, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        usize::try_from(n).map_err(|_| self.err(format!("{what} {n} does not fit in memory")))
    }

    /// A newline-terminated line, for the text arguments of `GLOBAL` and `INST`.
    fn line(&mut self, what: &str) -> Result<&'a [u8]> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return Err(self.err(format!("truncated: {what} has no end of line")));
        };
        self.pos += n + 1;
        Ok(&rest[..n])
    }

    /// `n` bytes of data, counted against the budget. `take` checks `n` against the file
    /// first, so a huge declared length fails before anything is allocated.
    fn payload(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let raw = self.take(n, what)?;
        self.spend(n)?;
        Ok(raw)
    }

    fn spend(&mut self, n: usize) -> Result<()> {
        if n > self.budget {
            return Err(self.err(format!(
                "the pickle's byte strings would take more than {MAX_EXPANSION} times the \
                 file's size ({} bytes): too many references to the same data",
                self.data.len()
            )));
        }
        self.budget -= n;
        Ok(())
    }

    fn new_obj(&mut self, obj: Obj) -> Result<usize> {
        if self.objs.len() >= MAX_OBJECTS {
            return Err(self.err(format!("more than {MAX_OBJECTS} objects")));
        }
        self.objs.push(obj);
        Ok(self.objs.len() - 1)
    }

    fn push(&mut self, id: usize) -> Result<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.err(format!("stack deeper than {MAX_STACK} items")));
        }
        self.stack.push(id);
        Ok(())
    }

    fn push_new(&mut self, obj: Obj) -> Result<()> {
        let id = self.new_obj(obj)?;
        self.push(id)
    }

    fn pop(&mut self, what: &str) -> Result<usize> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err(format!("{what}: the stack is empty")));
        }
        Ok(self.stack.pop().unwrap_or(NONE))
    }

    fn top(&self, what: &str) -> Result<usize> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err(format!("{what}: the stack is empty")));
        }
        Ok(self.stack[self.stack.len() - 1])
    }

    /// The items pushed since the last `MARK`, which is removed.
    fn pop_mark(&mut self, what: &str) -> Result<Vec<usize>> {
        let Some(mark) = self.marks.pop() else {
            return Err(self.err(format!("{what} without a MARK")));
        };
        Ok(self.stack.split_off(mark))
    }

    fn memo_put(&mut self, index: u32) -> Result<()> {
        let id = self.top("memo put")?;
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&index) {
            return Err(self.err(format!("more than {MAX_MEMO} memo entries")));
        }
        self.memo.insert(index, id);
        Ok(())
    }

    fn memo_get(&mut self, index: u32) -> Result<()> {
        match self.memo.get(&index) {
            Some(&id) => self.push(id),
            None => Err(self.err(format!("memo entry {index} was never stored"))),
        }
    }

    fn string(&mut self, n: usize) -> Result<()> {
        let raw = self.payload(n, "string")?;
        let s = std::str::from_utf8(raw)
            .map_err(|e| self.err(format!("string is not valid UTF-8: {e}")))?;
        self.push_new(Obj::Str(s.to_owned()))
    }

    fn bytes(&mut self, n: usize) -> Result<()> {
        let raw = self.payload(n, "byte string")?.to_vec();
        self.push_new(Obj::Bytes(raw))
    }

    /// A little-endian two's complement integer of `n` bytes (`LONG1`, `LONG4`).
    fn long(&mut self, n: usize) -> Result<()> {
        if n > 8 {
            return Err(self.err(format!(
                "a {n}-byte integer is larger than a verification set needs"
            )));
        }
        let raw = self.take(n, "integer")?;
        let mut buf = if raw.last().is_some_and(|&b| b & 0x80 != 0) {
            [0xFF; 8]
        } else {
            [0; 8]
        };
        buf[..n].copy_from_slice(raw);
        self.push_new(Obj::Int(i64::from_le_bytes(buf)))
    }

    fn tuple(&mut self, n: usize, what: &str) -> Result<()> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() < floor + n {
            return Err(self.err(format!("{what} needs {n} items on the stack")));
        }
        let items = self.stack.split_off(self.stack.len() - n);
        self.push_new(Obj::Tuple(items))
    }

    fn append(&mut self, items: Vec<usize>, what: &str) -> Result<()> {
        let list = self.top(what)?;
        let kind = self.kind(list);
        match &mut self.objs[list] {
            Obj::List(v) => {
                v.extend(items);
                Ok(())
            }
            _ => Err(self.err(format!("{what} onto {kind}, which is not a list"))),
        }
    }

    /// Refuses a global: only `_codecs encode` may be named, and only to be reduced.
    fn global(&mut self, module: &[u8], name: &[u8], how: &str) -> Result<()> {
        if how != "INST" && module == b"_codecs" && name == b"encode" {
            return self.push(CODECS);
        }
        Err(self.err(format!(
            "forbidden global `{} {}` ({how}): a verification set holds only bytes and \
             bools, and this reader runs no Python code",
            shown(module),
            shown(name)
        )))
    }

    /// `_codecs.encode(s, 'latin1')`: Python 3's protocol-2 spelling of `bytes`.
    fn reduce(&mut self) -> Result<()> {
        let args = self.pop("REDUCE")?;
        let callable = self.pop("REDUCE")?;
        if !matches!(self.objs[callable], Obj::Codecs) {
            return Err(self.err(format!(
                "REDUCE calls {}; only the global `_codecs encode` may be reduced",
                self.kind(callable)
            )));
        }
        let bad_args = |me: &Self, why: &str| {
            me.err(format!(
                "forbidden call of global `_codecs encode` with {}: {why}; only \
                 `_codecs.encode(str, 'latin1')` (bytes pickled by Python 3) is understood",
                me.kind(args)
            ))
        };
        let (text, encoding) = match &self.objs[args] {
            Obj::Tuple(items) if items.len() == 2 => (items[0], items[1]),
            _ => return Err(bad_args(self, "expected a tuple of two strings")),
        };
        match &self.objs[encoding] {
            Obj::Str(e) if e == "latin1" => {}
            Obj::Str(e) => {
                let why = format!("encoding `{}` is not 'latin1'", shown(e.as_bytes()));
                return Err(bad_args(self, &why));
            }
            _ => return Err(bad_args(self, "the encoding is not a string")),
        }
        let Obj::Str(text) = &self.objs[text] else {
            return Err(bad_args(self, "the first argument is not a string"));
        };
        let out = text
            .chars()
            .map(|c| u8::try_from(u32::from(c)).ok())
            .collect::<Option<Vec<u8>>>();
        let Some(out) = out else {
            return Err(bad_args(
                self,
                "a character is beyond latin1 (above U+00FF)",
            ));
        };
        // Paid after the fact: the output is never longer than the string, which was paid
        // for when it was read.
        self.spend(out.len())?;
        self.push_new(Obj::Bytes(out))
    }

    /// Runs the opcodes up to `STOP` and returns the object it leaves.
    fn run(&mut self) -> Result<usize> {
        loop {
            self.at = self.pos;
            let Some(&code) = self.data.get(self.pos) else {
                return Err(self.err(format!(
                    "truncated: the file ends ({} bytes) before the pickle's STOP",
                    self.data.len()
                )));
            };
            self.pos += 1;
            match code {
                op::PROTO => {
                    let v = self.u8("protocol version")?;
                    if !(2..=5).contains(&v) {
                        return Err(self.err(format!(
                            "pickle protocol {v}; only protocols 2 to 5 are supported"
                        )));
                    }
                }
                op::FRAME => {
                    let n = self.len64("frame length")?;
                    let left = self.data.len() - self.pos;
                    if n > left {
                        return Err(
                            self.err(format!("truncated: a frame of {n} bytes, only {left} left"))
                        );
                    }
                }
                op::STOP => {
                    let top = self.pop("STOP")?;
                    if self.pos != self.data.len() {
                        tracing::warn!(
                            "{}: {} bytes after the pickle's STOP are ignored",
                            self.path.display(),
                            self.data.len() - self.pos
                        );
                    }
                    return Ok(top);
                }
                op::MARK => {
                    if self.marks.len() >= MAX_MARKS {
                        return Err(self.err(format!("more than {MAX_MARKS} nested MARKs")));
                    }
                    self.marks.push(self.stack.len());
                }
                op::POP => {
                    self.pop("POP")?;
                }
                op::POP_MARK => {
                    self.pop_mark("POP_MARK")?;
                }
                op::DUP => {
                    let id = self.top("DUP")?;
                    self.push(id)?;
                }
                op::NONE => self.push(NONE)?,
                op::NEWTRUE => self.push(TRUE)?,
                op::NEWFALSE => self.push(FALSE)?,
                op::BININT => {
                    let v = i32::from_le_bytes(self.array("BININT")?);
                    self.push_new(Obj::Int(v.into()))?;
                }
                op::BININT1 => {
                    let v = self.u8("BININT1")?;
                    self.push_new(Obj::Int(v as i64))?;
                }
                op::BININT2 => {
                    let v = u16::from_le_bytes(self.array("BININT2")?);
                    self.push_new(Obj::Int(v.into()))?;
                }
                op::LONG1 => {
                    let n = self.u8("LONG1 length")?;
                    self.long(n)?;
                }
                op::LONG4 => {
                    let n = i32::from_le_bytes(self.array("LONG4 length")?);
                    let n = usize::try_from(n)
                        .map_err(|_| self.err(format!("negative LONG4 length {n}")))?;
                    self.long(n)?;
                }
                op::SHORT_BINBYTES | op::SHORT_BINSTRING => {
                    let n = self.u8("length")?;
                    self.bytes(n)?;
                }
                // Python 2's `str`, which insightface's own sets hold, is BINSTRING; Python
                // 3 reads it as bytes with `encoding='bytes'`, as insightface does.
                op::BINSTRING => {
                    let n = i32::from_le_bytes(self.array("BINSTRING length")?);
                    let n = usize::try_from(n)
                        .map_err(|_| self.err(format!("negative BINSTRING length {n}")))?;
                    self.bytes(n)?;
                }
                op::BINBYTES => {
                    let n = self.u32("BINBYTES length")? as usize;
                    self.bytes(n)?;
                }
                op::BINBYTES8 | op::BYTEARRAY8 => {
                    let n = self.len64("length")?;
                    self.bytes(n)?;
                }
                op::SHORT_BINUNICODE => {
                    let n = self.u8("length")?;
                    self.string(n)?;
                }
                op::BINUNICODE => {
                    let n = self.u32("BINUNICODE length")? as usize;
                    self.string(n)?;
                }
                op::BINUNICODE8 => {
                    let n = self.len64("BINUNICODE8 length")?;
                    self.string(n)?;
                }
                op::EMPTY_LIST => self.push_new(Obj::List(Vec::new()))?,
                op::LIST => {
                    let items = self.pop_mark("LIST")?;
                    self.push_new(Obj::List(items))?;
                }
                op::APPEND => {
                    let item = self.pop("APPEND")?;
                    self.append(vec![item], "APPEND")?;
                }
                op::APPENDS => {
                    let items = self.pop_mark("APPENDS")?;
                    self.append(items, "APPENDS")?;
                }
                op::EMPTY_TUPLE => self.push_new(Obj::Tuple(Vec::new()))?,
                op::TUPLE => {
                    let items = self.pop_mark("TUPLE")?;
                    self.push_new(Obj::Tuple(items))?;
                }
                op::TUPLE1 => self.tuple(1, "TUPLE1")?,
                op::TUPLE2 => self.tuple(2, "TUPLE2")?,
                op::TUPLE3 => self.tuple(3, "TUPLE3")?,
                op::MEMOIZE => {
                    let index = u32::try_from(self.memo.len())
                        .map_err(|_| self.err("memo index overflows"))?;
                    self.memo_put(index)?;
                }
                op::BINPUT => {
                    let i = self.u8("BINPUT index")?;
                    self.memo_put(i as u32)?;
                }
                op::LONG_BINPUT => {
                    let i = self.u32("LONG_BINPUT index")?;
                    self.memo_put(i)?;
                }
                op::BINGET => {
                    let i = self.u8("BINGET index")?;
                    self.memo_get(i as u32)?;
                }
                op::LONG_BINGET => {
                    let i = self.u32("LONG_BINGET index")?;
                    self.memo_get(i)?;
                }
                op::GLOBAL | op::INST => {
                    let how = if code == op::GLOBAL { "GLOBAL" } else { "INST" };
                    let module = self.line("module name")?;
                    let name = self.line("global name")?;
                    self.global(module, name, how)?;
                }
                op::STACK_GLOBAL => {
                    let name = self.pop("STACK_GLOBAL")?;
                    let module = self.pop("STACK_GLOBAL")?;
                    match (&self.objs[module], &self.objs[name]) {
                        (Obj::Str(m), Obj::Str(n)) => {
                            let (m, n) = (m.clone(), n.clone());
                            self.global(m.as_bytes(), n.as_bytes(), "STACK_GLOBAL")?;
                        }
                        _ => {
                            return Err(self.err(format!(
                                "STACK_GLOBAL of {} and {}, not two strings",
                                self.kind(module),
                                self.kind(name)
                            )))
                        }
                    }
                }
                op::REDUCE => self.reduce()?,
                other => {
                    return Err(match op::refused(other) {
                        Some(name) => self.err(format!(
                            "opcode {name} is not allowed: a verification set holds only \
                             lists of bytes and bools"
                        )),
                        None => self.err(format!("unknown opcode {other:#04x}")),
                    })
                }
            }
        }
    }

    /// What an object is, for error messages.
    fn kind(&self, id: usize) -> String {
        match &self.objs[id] {
            Obj::None => "None".into(),
            Obj::Bool(b) => format!("the bool {}", if *b { "True" } else { "False" }),
            Obj::Int(i) => format!("the int {i}"),
            Obj::Bytes(b) => format!("bytes ({} of them)", b.len()),
            Obj::Str(s) => format!("a str ({} chars)", s.chars().count()),
            Obj::List(v) => format!("a list of {} items", v.len()),
            Obj::Tuple(v) => format!("a tuple of {} items", v.len()),
            Obj::Codecs => "the global `_codecs encode`".into(),
        }
    }

    /// Checks that `top` is `(list of bytes, list of bools)` and takes the data out.
    fn into_set(mut self, top: usize) -> Result<BinSet> {
        let path = self.path;
        let structure = |message: String| bin_error(path, message);
        let [images, issame] = match &self.objs[top] {
            Obj::Tuple(items) if items.len() == 2 => [items[0], items[1]],
            _ => {
                return Err(structure(format!(
                    "the pickle holds {}, not the 2-tuple (images, issame_list)",
                    self.kind(top)
                )))
            }
        };
        let list = |me: &Self, id: usize, what: &str| match &me.objs[id] {
            Obj::List(v) => Ok(v.clone()),
            _ => Err(structure(format!("{what} is {}, not a list", me.kind(id)))),
        };
        let image_ids = list(&self, images, "the first element (images)")?;
        let flag_ids = list(&self, issame, "the second element (issame_list)")?;
        let issame = flag_ids
            .iter()
            .enumerate()
            .map(|(i, &id)| match self.objs[id] {
                Obj::Bool(b) => Ok(b),
                _ => Err(structure(format!(
                    "issame_list[{i}] is {}, not a bool",
                    self.kind(id)
                ))),
            })
            .collect::<Result<Vec<bool>>>()?;
        // Checked before the images are taken out, so that nothing is copied for nothing.
        check_counts(image_ids.len(), issame.len(), path)?;
        let mut out: Vec<Vec<u8>> = Vec::with_capacity(image_ids.len());
        let mut taken: HashMap<usize, usize> = HashMap::new();
        for (i, &id) in image_ids.iter().enumerate() {
            if let Some(&first) = taken.get(&id) {
                // Several pairs may share one bytes object through the memo: each gets a
                // copy, paid for from the budget.
                let n = out[first].len();
                self.spend(n).map_err(|_| {
                    structure(format!(
                        "images[{i}] repeats images[{first}] once too often: the copies would \
                         take more than {MAX_EXPANSION} times the file's size"
                    ))
                })?;
                out.push(out[first].clone());
                continue;
            }
            match &mut self.objs[id] {
                Obj::Bytes(b) => out.push(std::mem::take(b)),
                _ => {
                    return Err(structure(format!(
                        "images[{i}] is {}, not bytes",
                        self.kind(id)
                    )))
                }
            }
            taken.insert(id, i);
        }
        Ok(BinSet {
            images: out,
            issame,
        })
    }
}

fn check_counts(images: usize, pairs: usize, path: &Path) -> Result<()> {
    if pairs == 0 {
        return Err(bin_error(path, "the set has no pairs".into()));
    }
    if images != 2 * pairs {
        return Err(bin_error(
            path,
            format!(
                "{images} images for {pairs} pairs: a verification set holds two images per pair"
            ),
        ));
    }
    Ok(())
}

/// Text from the file, made safe and short for an error message.
fn shown(raw: &[u8]) -> String {
    let s: String = String::from_utf8_lossy(raw).escape_debug().collect();
    if s.chars().count() > 100 {
        format!("{}...", s.chars().take(100).collect::<String>())
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<BinSet> {
        BinSet::parse(bytes, Path::new("test.bin"))
    }

    /// The message and offset of a `Pickle` error.
    fn pickle_err(bytes: &[u8]) -> (String, u64) {
        match parse(bytes) {
            Err(Error::Pickle {
                offset, message, ..
            }) => (message, offset),
            other => panic!("expected a pickle error, got {other:?}"),
        }
    }

    fn structure_err(bytes: &[u8]) -> String {
        match parse(bytes) {
            Err(Error::BinSet { message, .. }) => message,
            other => panic!("expected a structure error, got {other:?}"),
        }
    }

    fn set(pairs: usize) -> BinSet {
        BinSet {
            images: (0..2 * pairs)
                .map(|i| (0..(i * 37) % 300).map(|b| (b * 7 + i) as u8).collect())
                .collect(),
            issame: (0..pairs).map(|i| i % 3 == 0).collect(),
        }
    }

    #[test]
    fn writer_round_trip_is_exact() {
        for pairs in [1, 3, 501, 1200] {
            let s = set(pairs);
            let back = parse(&s.to_pickle()).unwrap();
            assert_eq!(back, s, "{pairs} pairs");
            assert_eq!(back.pairs(), pairs);
        }
        // One image per length class: SHORT_BINBYTES, BINBYTES.
        let s = BinSet {
            images: vec![vec![], vec![0xAB; 70_000]],
            issame: vec![false],
        };
        let bytes = s.to_pickle();
        assert_eq!(&bytes[..3], &[op::PROTO, 4, op::EMPTY_LIST]);
        assert_eq!(&bytes[4..6], &[op::SHORT_BINBYTES, 0]);
        assert_eq!(bytes[6], op::BINBYTES);
        assert_eq!(parse(&bytes).unwrap(), s);
    }

    #[test]
    fn write_refuses_sets_it_could_not_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odd.bin");
        let odd = BinSet {
            images: vec![vec![1], vec![2], vec![3]],
            issame: vec![true],
        };
        assert!(matches!(odd.write(&path), Err(Error::BinSet { .. })));
        assert!(!path.exists());
        assert!(BinSet::default().write(&path).is_err());
        let good = set(2);
        good.write(&path).unwrap();
        assert_eq!(BinSet::read(&path).unwrap(), good);
    }

    /// Python 3's protocol 2: `_codecs.encode(str, 'latin1')` per byte string, memoized
    /// and fetched again as Python writes it.
    #[test]
    fn protocol2_latin1_bytes_are_understood() {
        let mut p = vec![op::PROTO, 2, op::EMPTY_LIST, op::BINPUT, 0, op::MARK];
        p.extend_from_slice(b"c_codecs\nencode\n");
        p.extend_from_slice(&[op::BINPUT, 1]);
        // "\xff\x00A" as UTF-8: U+00FF, U+0000, 'A'.
        p.extend_from_slice(&[op::BINUNICODE, 4, 0, 0, 0, 0xC3, 0xBF, 0x00, b'A']);
        p.extend_from_slice(&[op::BINPUT, 2, op::SHORT_BINUNICODE, 6]);
        p.extend_from_slice(b"latin1");
        p.extend_from_slice(&[op::BINPUT, 3, op::TUPLE2, op::REDUCE, op::BINPUT, 4]);
        p.extend_from_slice(&[op::BINGET, 1, op::SHORT_BINUNICODE, 0, op::BINGET, 3]);
        p.extend_from_slice(&[op::TUPLE2, op::REDUCE, op::APPENDS]);
        p.extend_from_slice(&[op::EMPTY_LIST, op::NEWTRUE, op::APPEND, op::TUPLE2]);
        p.push(op::STOP);
        let s = parse(&p).unwrap();
        assert_eq!(s.images, vec![vec![0xFF, 0x00, b'A'], vec![]]);
        assert_eq!(s.issame, vec![true]);
    }

    fn reduce_call(proto: u8, global: &[u8], arg: &str) -> Vec<u8> {
        let mut p = vec![op::PROTO, proto];
        p.extend_from_slice(global);
        p.push(op::SHORT_BINUNICODE);
        p.push(arg.len() as u8);
        p.extend_from_slice(arg.as_bytes());
        p.extend_from_slice(&[op::TUPLE1, op::REDUCE, op::STOP]);
        p
    }

    #[test]
    fn globals_other_than_codecs_encode_are_refused() {
        let (msg, at) = pickle_err(&reduce_call(2, b"cos\nsystem\n", "echo pwned"));
        assert!(msg.contains("forbidden global `os system`"), "{msg}");
        assert_eq!(at, 2);
        let (msg, _) = pickle_err(&reduce_call(2, b"cbuiltins\neval\n", "print(1)"));
        assert!(msg.contains("forbidden global `builtins eval`"), "{msg}");
        let (msg, _) = pickle_err(&reduce_call(2, b"c__builtin__\neval\n", "1"));
        assert!(msg.contains("`__builtin__ eval`"), "{msg}");
        // Protocol 4 names globals with STACK_GLOBAL.
        let mut p = vec![op::PROTO, 4, op::SHORT_BINUNICODE, 8];
        p.extend_from_slice(b"builtins");
        p.extend_from_slice(&[op::SHORT_BINUNICODE, 4]);
        p.extend_from_slice(b"exec");
        p.extend_from_slice(&[op::STACK_GLOBAL, op::STOP]);
        let (msg, at) = pickle_err(&p);
        assert!(msg.contains("forbidden global `builtins exec`"), "{msg}");
        assert_eq!(at, 18);
        // INST creates an instance even of the allowed global.
        let (msg, _) = pickle_err(b"\x80\x02(i_codecs\nencode\n.");
        assert!(
            msg.contains("forbidden global `_codecs encode` (INST)"),
            "{msg}"
        );
        // Names are escaped in the message.
        let (msg, _) = pickle_err(b"\x80\x02cos\x1b[31m\nsystem\n.");
        assert!(msg.contains("`os\\u{1b}[31m system`"), "{msg}");
    }

    #[test]
    fn codecs_encode_only_with_latin1() {
        let mut p = vec![op::PROTO, 2];
        p.extend_from_slice(b"c_codecs\nencode\n");
        p.extend_from_slice(&[op::SHORT_BINUNICODE, 1, b'x', op::SHORT_BINUNICODE, 5]);
        p.extend_from_slice(b"utf-8");
        p.extend_from_slice(&[op::TUPLE2, op::REDUCE, op::STOP]);
        let (msg, at) = pickle_err(&p);
        assert!(msg.contains("`_codecs encode`"), "{msg}");
        assert!(msg.contains("encoding `utf-8` is not 'latin1'"), "{msg}");
        assert_eq!(at as usize, p.len() - 2);
        // One argument only.
        let (msg, _) = pickle_err(&reduce_call(2, b"c_codecs\nencode\n", "abc"));
        assert!(msg.contains("`_codecs encode`"), "{msg}");
        // A code point beyond latin1.
        let mut p = vec![op::PROTO, 2];
        p.extend_from_slice(b"c_codecs\nencode\n");
        p.extend_from_slice(&[op::SHORT_BINUNICODE, 2, 0xC4, 0x80, op::SHORT_BINUNICODE, 6]);
        p.extend_from_slice(b"latin1");
        p.extend_from_slice(&[op::TUPLE2, op::REDUCE, op::STOP]);
        let (msg, _) = pickle_err(&p);
        assert!(msg.contains("beyond latin1"), "{msg}");
        // REDUCE of anything that is not the allowed global.
        let (msg, _) = pickle_err(b"\x80\x02]]R.");
        assert!(msg.contains("REDUCE calls a list"), "{msg}");
    }

    #[test]
    fn object_building_opcodes_are_refused() {
        for (bytes, name, offset) in [
            (&b"\x80\x02}."[..], "EMPTY_DICT", 2),
            (b"\x80\x02)\x81.", "NEWOBJ", 3),
            (b"\x80\x02N)b.", "BUILD", 4),
            (b"\x80\x02(o.", "OBJ", 3),
            (b"\x80\x02G\0\0\0\0\0\0\0\0.", "BINFLOAT", 2),
            (b"\x80\x02\x82\x01.", "EXT1", 2),
            (b"\x80\x02N\x51.", "BINPERSID", 3),
        ] {
            let (msg, at) = pickle_err(bytes);
            assert!(msg.contains(&format!("opcode {name} ")), "{msg}");
            assert_eq!(at, offset, "{name}");
        }
        let (msg, _) = pickle_err(b"\x80\x02\xff.");
        assert!(msg.contains("unknown opcode 0xff"), "{msg}");
        let (msg, _) = pickle_err(b"\x80\x01N.");
        assert!(msg.contains("protocol 1"), "{msg}");
    }

    #[test]
    fn every_truncation_is_an_error_with_its_offset() {
        let full = set(3).to_pickle();
        for n in 0..full.len() {
            let (msg, at) = pickle_err(&full[..n]);
            assert!(msg.starts_with("truncated"), "{n}: {msg}");
            assert!(at as usize <= n, "{n}: offset {at}");
        }
    }

    #[test]
    fn huge_declared_lengths_fail_before_allocating() {
        let cases: [&[u8]; 6] = [
            b"\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\xff",
            b"\x80\x04\x96\xff\xff\xff\xff\xff\xff\xff\x7f",
            b"\x80\x04\x8d\0\0\0\0\0\0\0\x01",
            b"\x80\x04B\xff\xff\xff\xff",
            b"\x80\x04X\xff\xff\xff\xffabc",
            b"\x80\x04\x95\xff\xff\xff\xff\xff\xff\xff\xff",
        ];
        for bytes in cases {
            let (msg, at) = pickle_err(bytes);
            assert!(msg.starts_with("truncated") || msg.contains("fit"), "{msg}");
            assert_eq!(at, 2);
        }
        let (msg, _) = pickle_err(b"\x80\x02T\xff\xff\xff\xff.");
        assert!(msg.contains("negative BINSTRING length"), "{msg}");
        let (msg, _) = pickle_err(b"\x80\x02\x8a\x09123456789.");
        assert!(msg.contains("9-byte integer"), "{msg}");
    }

    #[test]
    fn garbage_never_panics() {
        // A fixed pseudo-random stream, and the same stream behind a valid header.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for round in 0..2000 {
            let len = round % 200;
            let mut bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8
                })
                .collect();
            if round % 2 == 1 {
                bytes.splice(0..0, [op::PROTO, 4]);
            }
            assert!(parse(&bytes).is_err() || round % 2 == 1);
        }
        // Valid opcodes in a bad order.
        for bytes in [
            &b"."[..],
            b"e.",
            b"\x80\x02a.",
            b"\x80\x02Na.",
            b"\x80\x021.",
            b"\x80\x02\x86.",
            b"\x80\x02h\x05.",
            b"\x80\x02q\x00.",
            b"\x80\x02(\x86.",
            b"\x80\x02(\x93.",
        ] {
            assert!(
                matches!(parse(bytes), Err(Error::Pickle { .. })),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn wrong_structure_is_named() {
        let pickle = |body: &[u8]| {
            let mut p = vec![op::PROTO, 4];
            p.extend_from_slice(body);
            p.push(op::STOP);
            p
        };
        let msg = structure_err(&pickle(b"]"));
        assert!(
            msg.contains("holds a list of 0 items, not the 2-tuple"),
            "{msg}"
        );
        let msg = structure_err(&pickle(b"]]]\x87"));
        assert!(msg.contains("a tuple of 3 items"), "{msg}");
        let msg = structure_err(&pickle(b"N]\x86"));
        assert!(msg.contains("the first element (images) is None"), "{msg}");
        let msg = structure_err(&pickle(b"](C\x01aC\x01be](C\x01ce\x86"));
        assert!(msg.contains("issame_list[0] is bytes"), "{msg}");
        let msg = structure_err(&pickle(b"](C\x01aC\x01be](\x88\x89e\x86"));
        assert!(msg.contains("2 images for 2 pairs"), "{msg}");
        let msg = structure_err(&pickle(b"](K\x01C\x01be](\x88e\x86"));
        assert!(msg.contains("images[0] is the int 1, not bytes"), "{msg}");
        let msg = structure_err(&pickle(b"]]\x86"));
        assert!(msg.contains("no pairs"), "{msg}");
    }

    #[test]
    fn shared_images_are_copied_within_a_budget() {
        // One 100-byte string fetched from the memo for both images of a pair.
        let mut p = vec![
            op::PROTO,
            4,
            op::EMPTY_LIST,
            op::MARK,
            op::SHORT_BINBYTES,
            100,
        ];
        p.extend_from_slice(&[7; 100]);
        p.extend_from_slice(&[op::MEMOIZE, op::BINGET, 0, op::APPENDS]);
        p.extend_from_slice(&[
            op::EMPTY_LIST,
            op::NEWFALSE,
            op::APPEND,
            op::TUPLE2,
            op::STOP,
        ]);
        let s = parse(&p).unwrap();
        assert_eq!(s.images, vec![vec![7; 100]; 2]);

        // 40,000 references to one 10,000-byte string would be 400 MB from a file of 90 kB.
        let mut p = vec![op::PROTO, 4, op::EMPTY_LIST, op::MARK, op::BINBYTES];
        p.extend_from_slice(&10_000u32.to_le_bytes());
        p.extend_from_slice(&[1; 10_000]);
        p.push(op::MEMOIZE);
        for _ in 1..40_000 {
            p.extend_from_slice(&[op::BINGET, 0]);
        }
        p.extend_from_slice(&[op::APPENDS, op::EMPTY_LIST, op::MARK]);
        p.extend(std::iter::repeat_n(op::NEWTRUE, 20_000));
        p.extend_from_slice(&[op::APPENDS, op::TUPLE2, op::STOP]);
        let msg = structure_err(&p);
        assert!(msg.contains("repeats images[0]"), "{msg}");
    }

    #[test]
    fn cycles_and_deep_nesting_are_harmless() {
        // A list that holds itself, then the pair of it.
        let msg = structure_err(b"\x80\x04]\x94h\x00a\x94h\x01\x86.");
        assert!(msg.contains("issame_list"), "{msg}");
        // 200,000 nested lists: nothing recurses, to build or to drop them.
        let mut p = vec![op::PROTO, 4];
        p.extend(std::iter::repeat_n(op::EMPTY_LIST, 200_000));
        p.extend(std::iter::repeat_n(op::APPEND, 199_999));
        p.push(op::STOP);
        let msg = structure_err(&p);
        assert!(msg.contains("a list of 1 items"), "{msg}");
    }

    #[test]
    fn stack_and_marks_are_bounded() {
        let mut p = vec![op::PROTO, 4];
        p.extend(std::iter::repeat_n(op::NONE, MAX_STACK + 1));
        let (msg, at) = pickle_err(&p);
        assert!(msg.contains("stack deeper"), "{msg}");
        assert_eq!(at as usize, MAX_STACK + 2);
        let mut p = vec![op::PROTO, 4];
        p.extend(std::iter::repeat_n(op::MARK, MAX_MARKS + 1));
        let (msg, _) = pickle_err(&p);
        assert!(msg.contains("MARKs"), "{msg}");
    }
}
