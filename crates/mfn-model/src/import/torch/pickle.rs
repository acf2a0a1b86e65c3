//! The pickle interpreter for PyTorch state dicts.
//!
//! It understands the opcodes `torch.save` emits for a state dict (protocols 2 to 5) and
//! the handful of globals a state dict names; anything else is refused with its name and
//! byte offset. Nothing is ever called: the globals are tags that `REDUCE` matches.
//!
//! Bounds, so that a hostile pickle can neither exhaust memory nor the stack:
//! - no recursion anywhere: containers hold indices into one object table, so a memo
//!   reference shares its object instead of copying it (a "billion laughs" costs its
//!   opcodes, not its expansion), and cycles are harmless;
//! - every allocation is charged to a budget proportional to the pickle's length
//!   ([`MEMORY_PER_BYTE`] bytes per input byte plus [`MEMORY_SLACK`]);
//! - the stack, the marks, the memo and a tensor's rank are capped;
//! - a string's declared length is checked against what is left of the input before
//!   anything is allocated;
//! - a tensor's view (offset, shape, stride) is checked against its storage's declared
//!   element count, with checked arithmetic, when the tensor is rebuilt.

use std::collections::HashMap;
use std::ops::Range;

/// Items the stack may hold at once. `torch.save` batches dict items by 1,000.
const MAX_STACK: usize = 1 << 20;
/// Nested `MARK`s. A state dict nests three or four.
const MAX_MARKS: usize = 1 << 12;
/// Memo entries.
const MAX_MEMO: usize = 1 << 20;
/// Dimensions of a tensor. State dicts hold at most five (3-d convolutions).
pub(crate) const MAX_RANK: usize = 16;
/// Bytes of memory the interpreter may hold per byte of pickle: objects, container items,
/// strings, memo entries and tensor views all count. A real state dict uses about a tenth
/// of it.
const MEMORY_PER_BYTE: usize = 64;
/// Bytes of memory any pickle may use, however short.
const MEMORY_SLACK: usize = 1 << 20;

/// The element types of the storages a state dict may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    /// The storage class `torch.<name>` (also `torch.cuda.<name>`) of each type.
    fn from_storage(name: &str) -> Option<Self> {
        Some(match name {
            "DoubleStorage" => Self::F64,
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    /// PyTorch's name of the type.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::F64 => "float64",
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
            Self::I64 => "int64",
            Self::I32 => "int32",
            Self::I16 => "int16",
            Self::I8 => "int8",
            Self::U8 => "uint8",
            Self::Bool => "bool",
        }
    }

    /// Bytes per element.
    pub(crate) fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    /// Whether the reader keeps tensors of this type (as `f32`).
    pub(crate) fn is_float(self) -> bool {
        matches!(self, Self::F64 | Self::F32 | Self::F16 | Self::BF16)
    }
}

/// The globals a state dict may name. Each is only ever matched by `REDUCE`, never called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Global {
    /// `collections.OrderedDict`, reduced with no arguments: an empty dict.
    OrderedDict,
    /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
    /// backward_hooks[, metadata])`.
    RebuildTensorV2,
    /// `torch._utils._rebuild_tensor(storage, offset, size, stride)`.
    RebuildTensor,
    /// `torch._utils._rebuild_parameter(data, requires_grad, backward_hooks)`.
    RebuildParameter,
    /// `torch.FloatStorage` and the like, named in a storage's persistent id.
    Storage(Dtype),
}

impl Global {
    /// Its Python name.
    fn name(self) -> String {
        match self {
            Self::OrderedDict => "collections.OrderedDict".into(),
            Self::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2".into(),
            Self::RebuildTensor => "torch._utils._rebuild_tensor".into(),
            Self::RebuildParameter => "torch._utils._rebuild_parameter".into(),
            Self::Storage(dtype) => format!("the {} storage type", dtype.name()),
        }
    }

    /// The whitelist.
    fn resolve(module: &str, name: &str) -> Option<Self> {
        Some(match (module, name) {
            ("collections", "OrderedDict") => Self::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Self::RebuildTensorV2,
            ("torch._utils", "_rebuild_tensor") => Self::RebuildTensor,
            ("torch._utils", "_rebuild_parameter") => Self::RebuildParameter,
            ("torch" | "torch.cuda", storage) => Self::Storage(Dtype::from_storage(storage)?),
            _ => return None,
        })
    }
}

/// A storage named by a persistent id: `('storage', torch.FloatStorage, key, location,
/// numel[, view_metadata])`. Its bytes live outside the pickle (a zip member, or after the
/// pickles in the legacy layout), where the layout readers check them against `numel`.
#[derive(Clone, Debug)]
pub(crate) struct Storage {
    pub(crate) key: String,
    pub(crate) dtype: Dtype,
    pub(crate) numel: usize,
}

/// A tensor: a view of a storage. When it is built, every element it reaches is known to
/// lie inside the storage's declared `numel`.
#[derive(Clone, Debug)]
pub(crate) struct View {
    /// Index into [`Parsed::storages`].
    pub(crate) storage: usize,
    /// In elements.
    pub(crate) offset: usize,
    pub(crate) shape: Vec<usize>,
    /// In elements.
    pub(crate) stride: Vec<usize>,
    /// The product of `shape`.
    pub(crate) numel: usize,
}

/// A value the pickle builds. Containers hold indices into [`Parsed::objs`].
#[derive(Debug)]
pub(crate) enum Obj {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// An integer wider than 64 bits: kept as a placeholder, useless as an argument.
    BigInt,
    Str(String),
    /// A byte string, as its range in the input.
    Bytes(Range<usize>),
    List(Vec<usize>),
    Tuple(Vec<usize>),
    Dict(Vec<(usize, usize)>),
    Global(Global),
    /// Index into [`Parsed::storages`].
    Storage(usize),
    /// Index into [`Parsed::views`].
    Tensor(usize),
}

/// What a pickle built.
pub(crate) struct Parsed {
    pub(crate) objs: Vec<Obj>,
    /// The object `STOP` returned.
    pub(crate) root: usize,
    pub(crate) storages: Vec<Storage>,
    pub(crate) views: Vec<View>,
    /// The offset just past `STOP`.
    pub(crate) end: usize,
}

impl Parsed {
    /// The string an object holds, if it is one.
    pub(crate) fn str(&self, id: usize) -> Option<&str> {
        match self.objs.get(id) {
            Some(Obj::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// The items of a dict object.
    pub(crate) fn dict(&self, id: usize) -> Option<&[(usize, usize)]> {
        match self.objs.get(id) {
            Some(Obj::Dict(items)) => Some(items),
            _ => None,
        }
    }

    /// What an object is, for error messages.
    pub(crate) fn kind(&self, id: usize) -> String {
        kind(&self.objs, &self.views, id)
    }
}

/// A refusal: where in the input and why.
#[derive(Debug)]
pub(crate) struct Fault {
    /// The offset of the opcode that failed.
    pub(crate) at: usize,
    pub(crate) message: String,
}

/// Runs the pickle that starts at `data[start]` up to its `STOP`.
pub(crate) fn unpickle(data: &[u8], start: usize) -> Result<Parsed, Fault> {
    let left = data.len().saturating_sub(start);
    let mut u = Unpickler {
        data,
        pos: start,
        at: start,
        objs: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        storages: Vec::new(),
        storage_keys: HashMap::new(),
        views: Vec::new(),
        rebuilt: HashMap::new(),
        budget: left
            .saturating_mul(MEMORY_PER_BYTE)
            .saturating_add(MEMORY_SLACK),
    };
    let root = u.run()?;
    Ok(Parsed {
        objs: u.objs,
        root,
        storages: u.storages,
        views: u.views,
        end: u.pos,
    })
}

/// Pickle opcodes.
mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const EMPTY_LIST: u8 = b']';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const BINFLOAT: u8 = b'G';
    pub const PROTO: u8 = 0x80;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;

    /// The name of any pickle opcode, for refusing the ones a state dict does not use.
    pub fn name(code: u8) -> Option<&'static str> {
        Some(match code {
            b'(' => "MARK",
            b'.' => "STOP",
            b'0' => "POP",
            b'1' => "POP_MARK",
            b'2' => "DUP",
            b'F' => "FLOAT",
            b'I' => "INT",
            b'J' => "BININT",
            b'K' => "BININT1",
            b'L' => "LONG",
            b'M' => "BININT2",
            b'N' => "NONE",
            b'P' => "PERSID",
            b'Q' => "BINPERSID",
            b'R' => "REDUCE",
            b'S' => "STRING",
            b'T' => "BINSTRING",
            b'U' => "SHORT_BINSTRING",
            b'V' => "UNICODE",
            b'X' => "BINUNICODE",
            b'a' => "APPEND",
            b'b' => "BUILD",
            b'c' => "GLOBAL",
            b'd' => "DICT",
            b'}' => "EMPTY_DICT",
            b'e' => "APPENDS",
            b'g' => "GET",
            b'h' => "BINGET",
            b'i' => "INST",
            b'j' => "LONG_BINGET",
            b'l' => "LIST",
            b']' => "EMPTY_LIST",
            b'o' => "OBJ",
            b'p' => "PUT",
            b'q' => "BINPUT",
            b'r' => "LONG_BINPUT",
            b's' => "SETITEM",
            b't' => "TUPLE",
            b')' => "EMPTY_TUPLE",
            b'u' => "SETITEMS",
            b'G' => "BINFLOAT",
            0x80 => "PROTO",
            0x81 => "NEWOBJ",
            0x82 => "EXT1",
            0x83 => "EXT2",
            0x84 => "EXT4",
            0x85 => "TUPLE1",
            0x86 => "TUPLE2",
            0x87 => "TUPLE3",
            0x88 => "NEWTRUE",
            0x89 => "NEWFALSE",
            0x8a => "LONG1",
            0x8b => "LONG4",
            b'B' => "BINBYTES",
            b'C' => "SHORT_BINBYTES",
            0x8c => "SHORT_BINUNICODE",
            0x8d => "BINUNICODE8",
            0x8e => "BINBYTES8",
            0x8f => "EMPTY_SET",
            0x90 => "ADDITEMS",
            0x91 => "FROZENSET",
            0x92 => "NEWOBJ_EX",
            0x93 => "STACK_GLOBAL",
            0x94 => "MEMOIZE",
            0x95 => "FRAME",
            0x96 => "BYTEARRAY8",
            0x97 => "NEXT_BUFFER",
            0x98 => "READONLY_BUFFER",
            _ => return None,
        })
    }
}

/// Memory charged per object and per container item (an index, or a key/value pair).
const OBJ_COST: usize = std::mem::size_of::<Obj>();
const ITEM_COST: usize = std::mem::size_of::<usize>();
const MEMO_COST: usize = 4 * std::mem::size_of::<usize>();

/// Which tensor rebuild a `REDUCE` ran, with its arguments' object: the same call on the
/// same (immutable) arguments gives the same tensor, shared.
type RebuildKey = (u8, usize);

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    /// Where the opcode being run starts.
    at: usize,
    objs: Vec<Obj>,
    stack: Vec<usize>,
    marks: Vec<usize>,
    memo: HashMap<u32, usize>,
    storages: Vec<Storage>,
    storage_keys: HashMap<String, usize>,
    views: Vec<View>,
    rebuilt: HashMap<RebuildKey, usize>,
    /// Bytes the interpreter may still allocate.
    budget: usize,
}

impl<'a> Unpickler<'a> {
    fn err(&self, message: impl Into<String>) -> Fault {
        Fault {
            at: self.at,
            message: message.into(),
        }
    }

    fn spend(&mut self, n: usize) -> Result<(), Fault> {
        if n > self.budget {
            let left = self.data.len().saturating_sub(self.at);
            return Err(self.err(format!(
                "the pickle would need more than {MEMORY_PER_BYTE} bytes of memory per byte \
                 of its own ({left} bytes left from here): it is not a state dict"
            )));
        }
        self.budget -= n;
        Ok(())
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], Fault> {
        let left = self.data.len().saturating_sub(self.pos);
        if n > left {
            return Err(self.err(format!(
                "truncated: {what} needs {n} bytes, only {left} left"
            )));
        }
        let out = self.data.get(self.pos..self.pos + n).unwrap_or_default();
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], Fault> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &str) -> Result<u8, Fault> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32, Fault> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    /// A length of 8 bytes, as `usize`; the caller's `take` checks it against the input.
    fn len64(&mut self, what: &str) -> Result<usize, Fault> {
        let n = u64::from_le_bytes(self.array(what)?);
        usize::try_from(n).map_err(|_| self.err(format!("{what} {n} does not fit in memory")))
    }

    /// A newline-terminated line (the text arguments of `GLOBAL`).
    fn line(&mut self, what: &str) -> Result<&'a [u8], Fault> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return Err(self.err(format!("truncated: {what} has no end of line")));
        };
        self.pos += n + 1;
        Ok(&rest[..n])
    }

    fn new_obj(&mut self, obj: Obj) -> Result<usize, Fault> {
        self.spend(OBJ_COST)?;
        self.objs.push(obj);
        Ok(self.objs.len() - 1)
    }

    fn push(&mut self, id: usize) -> Result<(), Fault> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.err(format!("the stack holds more than {MAX_STACK} items")));
        }
        self.stack.push(id);
        Ok(())
    }

    fn push_new(&mut self, obj: Obj) -> Result<(), Fault> {
        let id = self.new_obj(obj)?;
        self.push(id)
    }

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self, what: &str) -> Result<usize, Fault> {
        if self.stack.len() <= self.floor() {
            return Err(self.err(format!("{what} on an empty stack")));
        }
        self.stack
            .pop()
            .ok_or_else(|| self.err(format!("{what} on an empty stack")))
    }

    fn top(&self, what: &str) -> Result<usize, Fault> {
        if self.stack.len() <= self.floor() {
            return Err(self.err(format!("{what} on an empty stack")));
        }
        self.stack
            .last()
            .copied()
            .ok_or_else(|| self.err(format!("{what} on an empty stack")))
    }

    /// The items pushed since the last `MARK`, which is removed.
    fn pop_mark(&mut self, what: &str) -> Result<Vec<usize>, Fault> {
        let Some(mark) = self.marks.pop() else {
            return Err(self.err(format!("{what} without a MARK")));
        };
        Ok(self.stack.split_off(mark.min(self.stack.len())))
    }

    fn memo_put(&mut self, index: u32) -> Result<(), Fault> {
        let id = self.top("memo put")?;
        if !self.memo.contains_key(&index) {
            if self.memo.len() >= MAX_MEMO {
                return Err(self.err(format!("more than {MAX_MEMO} memo entries")));
            }
            self.spend(MEMO_COST)?;
        }
        self.memo.insert(index, id);
        Ok(())
    }

    fn memo_get(&mut self, index: u32) -> Result<(), Fault> {
        match self.memo.get(&index) {
            Some(&id) => self.push(id),
            None => Err(self.err(format!("memo entry {index} was never stored"))),
        }
    }

    /// A string of `n` bytes; the length is checked against the input before anything is
    /// allocated.
    fn string(&mut self, n: usize, what: &str) -> Result<(), Fault> {
        let raw = self.take(n, what)?;
        let s = std::str::from_utf8(raw)
            .map_err(|e| self.err(format!("{what} is not valid UTF-8: {e}")))?;
        self.spend(n)?;
        self.push_new(Obj::Str(s.to_owned()))
    }

    fn bytes(&mut self, n: usize, what: &str) -> Result<(), Fault> {
        let start = self.pos;
        self.take(n, what)?;
        self.push_new(Obj::Bytes(start..start + n))
    }

    /// A little-endian two's complement integer of `n` bytes (`LONG1`).
    fn long(&mut self, n: usize) -> Result<(), Fault> {
        let raw = self.take(n, "LONG1 integer")?;
        if n > 8 {
            return self.push_new(Obj::BigInt);
        }
        let mut buf = if raw.last().is_some_and(|&b| b & 0x80 != 0) {
            [0xFF; 8]
        } else {
            [0; 8]
        };
        buf[..n].copy_from_slice(raw);
        self.push_new(Obj::Int(i64::from_le_bytes(buf)))
    }

    fn tuple(&mut self, n: usize, what: &str) -> Result<(), Fault> {
        if self.stack.len() < self.floor() + n {
            return Err(self.err(format!("{what} needs {n} items on the stack")));
        }
        let items = self.stack.split_off(self.stack.len() - n);
        self.container(Obj::Tuple(items))
    }

    /// Pushes a new container, paying for its items.
    fn container(&mut self, obj: Obj) -> Result<(), Fault> {
        let items = match &obj {
            Obj::List(v) | Obj::Tuple(v) => v.len(),
            _ => 0,
        };
        self.spend(items.saturating_mul(ITEM_COST))?;
        self.push_new(obj)
    }

    fn append(&mut self, items: Vec<usize>, what: &str) -> Result<(), Fault> {
        let list = self.top(what)?;
        self.spend(items.len().saturating_mul(ITEM_COST))?;
        match self.objs.get_mut(list) {
            Some(Obj::List(v)) => {
                v.extend(items);
                Ok(())
            }
            _ => Err(self.err(format!(
                "{what} onto {}, which is not a list",
                self.kind(list)
            ))),
        }
    }

    fn set_items(&mut self, items: Vec<usize>, what: &str) -> Result<(), Fault> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err(format!(
                "{what} with {} items, not key/value pairs",
                items.len()
            )));
        }
        let dict = self.top(what)?;
        self.spend(items.len().saturating_mul(ITEM_COST))?;
        match self.objs.get_mut(dict) {
            Some(Obj::Dict(v)) => {
                v.extend(items.chunks_exact(2).map(|kv| (kv[0], kv[1])));
                Ok(())
            }
            _ => Err(self.err(format!(
                "{what} onto {}, which is not a dict",
                self.kind(dict)
            ))),
        }
    }

    fn global(&mut self, module: &str, name: &str, how: &str) -> Result<(), Fault> {
        match Global::resolve(module, name) {
            Some(g) => self.push_new(Obj::Global(g)),
            None => Err(self.err(format!(
                "{how} `{}.{}` is not allowed: a state dict names only \
                 collections.OrderedDict, torch._utils._rebuild_tensor_v2, \
                 torch._utils._rebuild_tensor, torch._utils._rebuild_parameter and the \
                 torch.*Storage types, and this reader runs no Python code",
                shown(module),
                shown(name)
            ))),
        }
    }

    /// `BINPERSID`: a storage's persistent id.
    fn persistent_id(&mut self) -> Result<(), Fault> {
        let pid = self.pop("BINPERSID")?;
        let bad = |me: &Self, why: String| {
            me.err(format!(
                "BINPERSID of {}: {why}; expected ('storage', torch.<Type>Storage, key, \
                 location, element count[, None])",
                me.kind(pid)
            ))
        };
        let items = match self.objs.get(pid) {
            Some(Obj::Tuple(items)) if items.len() == 5 || items.len() == 6 => items.clone(),
            _ => return Err(bad(self, "not a tuple of 5 or 6 items".into())),
        };
        let item = |i: usize| items.get(i).copied().unwrap_or(usize::MAX);
        if !matches!(self.objs.get(item(0)), Some(Obj::Str(s)) if s == "storage") {
            return Err(bad(self, "its first item is not 'storage'".into()));
        }
        let Some(Obj::Global(Global::Storage(dtype))) = self.objs.get(item(1)) else {
            return Err(bad(
                self,
                format!("its type is {}, not a storage type", self.kind(item(1))),
            ));
        };
        let dtype = *dtype;
        let Some(Obj::Str(key)) = self.objs.get(item(2)) else {
            return Err(bad(
                self,
                format!("its key is {}, not a string", self.kind(item(2))),
            ));
        };
        let key = key.clone();
        if !matches!(self.objs.get(item(3)), Some(Obj::Str(_))) {
            return Err(bad(self, "its location is not a string".into()));
        }
        let numel = match self.objs.get(item(4)) {
            Some(&Obj::Int(n)) if n >= 0 => usize::try_from(n).ok(),
            _ => None,
        };
        let Some(numel) = numel.filter(|n| n.checked_mul(dtype.size()).is_some()) else {
            return Err(bad(
                self,
                format!("its element count is {}, not a size", self.kind(item(4))),
            ));
        };
        if items.len() == 6 && !matches!(self.objs.get(item(5)), Some(Obj::None)) {
            return Err(bad(
                self,
                "it is a view of another storage (view metadata), which this reader does \
                 not support"
                    .into(),
            ));
        }
        let index = match self.storage_keys.get(&key) {
            Some(&i) => {
                let s = &self.storages[i];
                if s.dtype != dtype || s.numel != numel {
                    return Err(self.err(format!(
                        "storage `{}` is declared twice, as {numel} {} and as {} {} elements",
                        shown(&key),
                        dtype.name(),
                        s.numel,
                        s.dtype.name()
                    )));
                }
                i
            }
            None => {
                self.spend(2 * key.len() + std::mem::size_of::<Storage>() + MEMO_COST)?;
                self.storages.push(Storage {
                    key: key.clone(),
                    dtype,
                    numel,
                });
                self.storage_keys.insert(key, self.storages.len() - 1);
                self.storages.len() - 1
            }
        };
        self.push_new(Obj::Storage(index))
    }

    /// `REDUCE`: only the whitelisted globals, each matched, none called.
    fn reduce(&mut self) -> Result<(), Fault> {
        let args = self.pop("REDUCE")?;
        let callable = self.pop("REDUCE")?;
        let Some(&Obj::Global(global)) = self.objs.get(callable) else {
            return Err(self.err(format!(
                "REDUCE calls {}; only the whitelisted globals may be called",
                self.kind(callable)
            )));
        };
        let Some(Obj::Tuple(items)) = self.objs.get(args) else {
            return Err(self.err(format!(
                "REDUCE of {} with {} as its arguments, not a tuple",
                global.name(),
                self.kind(args)
            )));
        };
        let n = items.len();
        match global {
            Global::OrderedDict => {
                if n != 0 {
                    return Err(self.err(format!(
                        "collections.OrderedDict is reduced with {n} arguments; a state dict \
                         reduces it with none and fills it with SETITEMS"
                    )));
                }
                self.push_new(Obj::Dict(Vec::new()))
            }
            Global::RebuildTensorV2 | Global::RebuildTensor => {
                let (name, ok) = if global == Global::RebuildTensorV2 {
                    ("torch._utils._rebuild_tensor_v2", n == 6 || n == 7)
                } else {
                    ("torch._utils._rebuild_tensor", n == 4)
                };
                if !ok {
                    return Err(self.err(format!(
                        "{name} is reduced with {n} arguments; it takes (storage, storage \
                         offset, size, stride{})",
                        if global == Global::RebuildTensorV2 {
                            ", requires_grad, backward_hooks[, metadata]"
                        } else {
                            ""
                        }
                    )));
                }
                let key = (u8::from(global == Global::RebuildTensorV2), args);
                if let Some(&tensor) = self.rebuilt.get(&key) {
                    return self.push(tensor);
                }
                let view = self.view(args, name)?;
                self.spend(
                    std::mem::size_of::<View>() + 2 * ITEM_COST * view.shape.len() + 2 * MEMO_COST,
                )?;
                self.views.push(view);
                let tensor = self.new_obj(Obj::Tensor(self.views.len() - 1))?;
                self.rebuilt.insert(key, tensor);
                self.push(tensor)
            }
            Global::RebuildParameter => {
                let data = items.first().copied().unwrap_or(usize::MAX);
                if n != 3 || !matches!(self.objs.get(data), Some(Obj::Tensor(_))) {
                    return Err(self.err(format!(
                        "torch._utils._rebuild_parameter is reduced with {n} arguments \
                         starting with {}; it takes (tensor, requires_grad, backward_hooks)",
                        self.kind(data)
                    )));
                }
                self.push(data)
            }
            Global::Storage(dtype) => Err(self.err(format!(
                "REDUCE calls the {} storage type; storages come only from persistent ids",
                dtype.name()
            ))),
        }
    }

    /// The view a tensor rebuild describes, checked against its storage.
    fn view(&self, args: usize, name: &str) -> Result<View, Fault> {
        let items: &[usize] = match self.objs.get(args) {
            Some(Obj::Tuple(items)) => items,
            _ => &[],
        };
        let item = |i: usize| items.get(i).copied().unwrap_or(usize::MAX);
        let storage = match self.objs.get(item(0)) {
            Some(&Obj::Storage(s)) => s,
            _ => {
                return Err(self.err(format!(
                    "{name}: its storage argument is {}, not a storage (persistent id)",
                    self.kind(item(0))
                )))
            }
        };
        let size_of = |i: usize| -> Option<usize> {
            match self.objs.get(i) {
                Some(&Obj::Int(v)) => usize::try_from(v).ok(),
                _ => None,
            }
        };
        let offset = size_of(item(1)).ok_or_else(|| {
            self.err(format!(
                "{name}: its storage offset is {}, not a non-negative int",
                self.kind(item(1))
            ))
        })?;
        let dims = |i: usize, what: &str| -> Result<Vec<usize>, Fault> {
            let bad = |why: &str| {
                self.err(format!(
                    "{name}: its {what} is {}: {why}",
                    self.kind(item(i))
                ))
            };
            let Some(Obj::Tuple(ds)) = self.objs.get(item(i)) else {
                return Err(bad("expected a tuple of non-negative ints"));
            };
            if ds.len() > MAX_RANK {
                return Err(bad(&format!("more than {MAX_RANK} dimensions")));
            }
            ds.iter()
                .map(|&d| size_of(d).ok_or_else(|| bad("expected a tuple of non-negative ints")))
                .collect()
        };
        let shape = dims(2, "size")?;
        let stride = dims(3, "stride")?;
        if shape.len() != stride.len() {
            return Err(self.err(format!(
                "{name}: size {shape:?} and stride {stride:?} differ in length"
            )));
        }
        let s = self
            .storages
            .get(storage)
            .ok_or_else(|| self.err(format!("{name}: its storage is not declared")))?;
        let refuse = |what: String| {
            self.err(format!(
                "{name}: the view (offset {offset}, size {shape:?}, stride {stride:?}) of \
                 storage `{}` ({} elements) {what}",
                shown(&s.key),
                s.numel
            ))
        };
        // The product of the non-zero sizes must fit even when a zero makes the tensor
        // empty: the strides of its shape are such products.
        let nonzero = shape
            .iter()
            .filter(|&&d| d != 0)
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| isize::try_from(n).is_ok())
            .ok_or_else(|| refuse("has more elements than memory can address".into()))?;
        let numel = if shape.contains(&0) { 0 } else { nonzero };
        if numel > 0 {
            let last = shape.iter().zip(&stride).try_fold(offset, |a, (&d, &st)| {
                (d - 1).checked_mul(st).and_then(|x| a.checked_add(x))
            });
            match last {
                Some(last) if last < s.numel => {}
                Some(last) => {
                    return Err(refuse(format!(
                        "reaches element {last}, outside the storage"
                    )))
                }
                None => return Err(refuse("reaches past any address".into())),
            }
        }
        Ok(View {
            storage,
            offset,
            shape,
            stride,
            numel,
        })
    }

    fn kind(&self, id: usize) -> String {
        kind(&self.objs, &self.views, id)
    }

    /// Runs the opcodes up to `STOP` and returns the object it leaves.
    fn run(&mut self) -> Result<usize, Fault> {
        loop {
            self.at = self.pos;
            let Some(&code) = self.data.get(self.pos) else {
                return Err(self.err("truncated: the input ends before the pickle's STOP"));
            };
            self.pos += 1;
            match code {
                op::PROTO => {
                    let v = self.u8("PROTO version")?;
                    if !(2..=5).contains(&v) {
                        return Err(self.err(format!(
                            "pickle protocol {v}; torch.save writes protocols 2 to 5"
                        )));
                    }
                }
                op::FRAME => {
                    let n = self.len64("FRAME length")?;
                    let left = self.data.len() - self.pos;
                    if n > left {
                        return Err(
                            self.err(format!("truncated: a frame of {n} bytes, only {left} left"))
                        );
                    }
                }
                op::STOP => return self.pop("STOP"),
                op::MARK => {
                    if self.marks.len() >= MAX_MARKS {
                        return Err(self.err(format!("more than {MAX_MARKS} nested MARKs")));
                    }
                    self.marks.push(self.stack.len());
                }
                op::NONE => self.push_new(Obj::None)?,
                op::NEWTRUE => self.push_new(Obj::Bool(true))?,
                op::NEWFALSE => self.push_new(Obj::Bool(false))?,
                op::BININT => {
                    let v = i32::from_le_bytes(self.array("BININT")?);
                    self.push_new(Obj::Int(v.into()))?;
                }
                op::BININT1 => {
                    let v = self.u8("BININT1")?;
                    self.push_new(Obj::Int(v.into()))?;
                }
                op::BININT2 => {
                    let v = u16::from_le_bytes(self.array("BININT2")?);
                    self.push_new(Obj::Int(v.into()))?;
                }
                op::LONG1 => {
                    let n = self.u8("LONG1 length")?;
                    self.long(n.into())?;
                }
                op::BINFLOAT => {
                    let v = f64::from_be_bytes(self.array("BINFLOAT")?);
                    self.push_new(Obj::Float(v))?;
                }
                op::SHORT_BINUNICODE => {
                    let n = self.u8("SHORT_BINUNICODE length")?;
                    self.string(n.into(), "SHORT_BINUNICODE string")?;
                }
                op::BINUNICODE => {
                    let n = self.u32("BINUNICODE length")? as usize;
                    self.string(n, "BINUNICODE string")?;
                }
                op::BINUNICODE8 => {
                    let n = self.len64("BINUNICODE8 length")?;
                    self.string(n, "BINUNICODE8 string")?;
                }
                // Python 2's `str`, which torch.load decodes as text.
                op::SHORT_BINSTRING => {
                    let n = self.u8("SHORT_BINSTRING length")?;
                    self.string(n.into(), "SHORT_BINSTRING string")?;
                }
                op::BINSTRING => {
                    let n = i32::from_le_bytes(self.array("BINSTRING length")?);
                    let n = usize::try_from(n)
                        .map_err(|_| self.err(format!("negative BINSTRING length {n}")))?;
                    self.string(n, "BINSTRING string")?;
                }
                op::SHORT_BINBYTES => {
                    let n = self.u8("SHORT_BINBYTES length")?;
                    self.bytes(n.into(), "SHORT_BINBYTES bytes")?;
                }
                op::BINBYTES => {
                    let n = self.u32("BINBYTES length")? as usize;
                    self.bytes(n, "BINBYTES bytes")?;
                }
                op::EMPTY_DICT => self.push_new(Obj::Dict(Vec::new()))?,
                op::EMPTY_LIST => self.push_new(Obj::List(Vec::new()))?,
                op::EMPTY_TUPLE => self.push_new(Obj::Tuple(Vec::new()))?,
                op::TUPLE => {
                    let items = self.pop_mark("TUPLE")?;
                    self.container(Obj::Tuple(items))?;
                }
                op::TUPLE1 => self.tuple(1, "TUPLE1")?,
                op::TUPLE2 => self.tuple(2, "TUPLE2")?,
                op::TUPLE3 => self.tuple(3, "TUPLE3")?,
                op::APPEND => {
                    let item = self.pop("APPEND")?;
                    self.append(vec![item], "APPEND")?;
                }
                op::APPENDS => {
                    let items = self.pop_mark("APPENDS")?;
                    self.append(items, "APPENDS")?;
                }
                op::SETITEM => {
                    let value = self.pop("SETITEM")?;
                    let key = self.pop("SETITEM")?;
                    self.set_items(vec![key, value], "SETITEM")?;
                }
                op::SETITEMS => {
                    let items = self.pop_mark("SETITEMS")?;
                    self.set_items(items, "SETITEMS")?;
                }
                op::BINPUT => {
                    let i = self.u8("BINPUT index")?;
                    self.memo_put(i.into())?;
                }
                op::LONG_BINPUT => {
                    let i = self.u32("LONG_BINPUT index")?;
                    self.memo_put(i)?;
                }
                op::MEMOIZE => {
                    let i = u32::try_from(self.memo.len())
                        .map_err(|_| self.err("MEMOIZE: the memo index overflows"))?;
                    self.memo_put(i)?;
                }
                op::BINGET => {
                    let i = self.u8("BINGET index")?;
                    self.memo_get(i.into())?;
                }
                op::LONG_BINGET => {
                    let i = self.u32("LONG_BINGET index")?;
                    self.memo_get(i)?;
                }
                op::GLOBAL => {
                    let module = self.line("GLOBAL module name")?;
                    let name = self.line("GLOBAL name")?;
                    let module = String::from_utf8_lossy(module).into_owned();
                    let name = String::from_utf8_lossy(name).into_owned();
                    self.global(&module, &name, "global")?;
                }
                op::STACK_GLOBAL => {
                    let name = self.pop("STACK_GLOBAL")?;
                    let module = self.pop("STACK_GLOBAL")?;
                    match (self.objs.get(module), self.objs.get(name)) {
                        (Some(Obj::Str(m)), Some(Obj::Str(n))) => {
                            let (m, n) = (m.clone(), n.clone());
                            self.global(&m, &n, "STACK_GLOBAL")?;
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
                op::BUILD => {
                    // The state of an OrderedDict (its `_metadata`) or of a tensor: not
                    // needed, and applying it would mean running code. Ignored.
                    self.pop("BUILD")?;
                    self.top("BUILD")?;
                }
                op::BINPERSID => self.persistent_id()?,
                other => {
                    return Err(self.err(match op::name(other) {
                        Some(name) => format!(
                            "opcode {name} ({other:#04x}) is not one a state dict uses; \
                             this reader does not run it"
                        ),
                        None => format!("byte {other:#04x} is not a pickle opcode"),
                    }))
                }
            }
        }
    }
}

/// What an object is, for error messages.
fn kind(objs: &[Obj], views: &[View], id: usize) -> String {
    match objs.get(id) {
        None => "nothing".into(),
        Some(Obj::None) => "None".into(),
        Some(Obj::Bool(b)) => format!("the bool {}", if *b { "True" } else { "False" }),
        Some(Obj::Int(i)) => format!("the int {i}"),
        Some(Obj::Float(f)) => format!("the float {f}"),
        Some(Obj::BigInt) => "an int wider than 64 bits".into(),
        Some(Obj::Str(s)) => format!("the string '{}'", shown(s)),
        Some(Obj::Bytes(r)) => format!("bytes ({} of them)", r.len()),
        Some(Obj::List(v)) => format!("a list of {} items", v.len()),
        Some(Obj::Tuple(v)) => format!("a tuple of {} items", v.len()),
        Some(Obj::Dict(v)) => format!("a dict of {} items", v.len()),
        Some(Obj::Global(g)) => format!("the global {}", g.name()),
        Some(Obj::Storage(_)) => "a storage".into(),
        Some(Obj::Tensor(t)) => match views.get(*t) {
            Some(v) => format!("a tensor of size {:?}", v.shape),
            None => "a tensor".into(),
        },
    }
}

/// Text from a file, escaped and cut short for an error message.
pub(crate) fn shown(raw: &str) -> String {
    let s: String = raw.escape_debug().collect();
    if s.chars().count() > 100 {
        format!("{}...", s.chars().take(100).collect::<String>())
    } else {
        s
    }
}
