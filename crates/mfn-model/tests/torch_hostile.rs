//! PyTorch checkpoints built to hurt the reader: every one must be refused with an error
//! that names the file, quickly, and within a small, bounded amount of memory; none may
//! panic. Real checkpoints, mutated thousands of times, must never make it panic either.
//!
//! The files are built here, by hand: pickles opcode by opcode, the legacy layout byte by
//! byte, zip archives with the `zip` crate.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Cursor, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use common::asset;
use mfn_model::import::torch::{read_state_dict, read_state_dict_bytes};

// ---------------------------------------------------------------------------------------
// Memory: the allocations each thread makes, so that a test can bound a read's peak.

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| {
            if now > peak.get() {
                peak.set(now);
            }
        });
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            track(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            track(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        track(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            track(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the most memory this thread held meanwhile, beyond
/// what it held before.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get);
    (out, (peak - base).max(0) as usize)
}

/// Memory a refusal may take beyond the file's own bytes.
const REFUSAL_MEMORY: usize = 16 << 20;

/// Writes `bytes` as `name` in `dir`, reads it with [`read_state_dict`] and checks the
/// refusal: an error naming the file, within a second or so and [`REFUSAL_MEMORY`] beyond
/// twice the file's size. Returns the message.
fn refused(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let start = Instant::now();
    let (result, peak) = peak_of(|| read_state_dict(&path, &Device::Cpu));
    let elapsed = start.elapsed();
    let err = match result {
        Ok(t) => panic!("{name} was accepted: {:?}", t.keys().collect::<Vec<_>>()),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(name), "the message must name {name}: {err}");
    assert!(
        elapsed < Duration::from_secs(5),
        "{name} took {elapsed:?} to refuse"
    );
    assert!(
        peak < REFUSAL_MEMORY + 2 * bytes.len(),
        "{name} took {peak} bytes of memory to refuse ({} byte file): {err}",
        bytes.len()
    );
    err
}

// ---------------------------------------------------------------------------------------
// Pickles by hand.

const MARK: u8 = b'(';
const STOP: u8 = b'.';
const TUPLE: u8 = b't';
const EMPTY_TUPLE: u8 = b')';
const EMPTY_LIST: u8 = b']';
const EMPTY_DICT: u8 = b'}';
const REDUCE: u8 = b'R';
const BINPERSID: u8 = b'Q';
const SETITEM: u8 = b's';
const SETITEMS: u8 = b'u';
const APPEND: u8 = b'a';
const APPENDS: u8 = b'e';
const NEWTRUE: u8 = 0x88;
const NEWFALSE: u8 = 0x89;
const TUPLE1: u8 = 0x85;
const BINPUT: u8 = b'q';
const BINGET: u8 = b'h';

/// A pickle, opcode by opcode. Protocol 2 as `torch.save` writes it by default, or
/// protocol 4 (short strings, `STACK_GLOBAL`, `MEMOIZE`, one `FRAME`).
struct Pickle {
    body: Vec<u8>,
    v4: bool,
}

impl Pickle {
    fn new() -> Self {
        Self {
            body: Vec::new(),
            v4: false,
        }
    }

    fn v4() -> Self {
        Self {
            body: Vec::new(),
            v4: true,
        }
    }

    fn op(&mut self, code: u8) -> &mut Self {
        self.body.push(code);
        self
    }

    fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.body.extend_from_slice(bytes);
        self
    }

    fn str(&mut self, s: &str) -> &mut Self {
        if self.v4 && s.len() < 256 {
            self.op(0x8c).op(s.len() as u8).raw(s.as_bytes()).op(0x94)
        } else {
            self.op(b'X')
                .raw(&(s.len() as u32).to_le_bytes())
                .raw(s.as_bytes())
        }
    }

    fn int(&mut self, v: i64) -> &mut Self {
        if (0..256).contains(&v) {
            self.op(b'K').op(v as u8)
        } else if let Ok(v) = i32::try_from(v) {
            self.op(b'J').raw(&v.to_le_bytes())
        } else {
            self.op(0x8a).op(8).raw(&v.to_le_bytes())
        }
    }

    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        if self.v4 {
            self.str(module).str(name).op(0x93).op(0x94)
        } else {
            self.op(b'c')
                .raw(module.as_bytes())
                .op(b'\n')
                .raw(name.as_bytes())
                .op(b'\n')
        }
    }

    fn ints(&mut self, values: &[i64]) -> &mut Self {
        self.op(MARK);
        for &v in values {
            self.int(v);
        }
        self.op(TUPLE)
    }

    /// The pickle, ended by `STOP`.
    fn stop(&mut self) -> Vec<u8> {
        self.op(STOP);
        if self.v4 {
            let mut out = vec![0x80, 4, 0x95];
            out.extend((self.body.len() as u64).to_le_bytes());
            out.extend(&self.body);
            out
        } else {
            let mut out = vec![0x80, 2];
            out.extend(&self.body);
            out
        }
    }
}

/// A storage: its key, type name, element count and bytes.
#[derive(Clone)]
struct Stored {
    key: String,
    kind: &'static str,
    numel: i64,
    bytes: Vec<u8>,
}

fn floats(key: &str, values: &[f32]) -> Stored {
    Stored {
        key: key.into(),
        kind: "FloatStorage",
        numel: values.len() as i64,
        bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// A state-dict entry: a name and a view of a storage.
#[derive(Clone)]
struct Entry {
    name: String,
    kind: &'static str,
    key: String,
    numel: i64,
    offset: i64,
    shape: Vec<i64>,
    stride: Vec<i64>,
}

fn entry(name: &str, s: &Stored, offset: i64, shape: &[i64], stride: &[i64]) -> Entry {
    Entry {
        name: name.into(),
        kind: s.kind,
        key: s.key.clone(),
        numel: s.numel,
        offset,
        shape: shape.to_vec(),
        stride: stride.to_vec(),
    }
}

/// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`.
fn tensor(p: &mut Pickle, e: &Entry) {
    p.global("torch._utils", "_rebuild_tensor_v2").op(MARK);
    p.op(MARK)
        .str("storage")
        .global("torch", e.kind)
        .str(&e.key)
        .str("cpu")
        .int(e.numel)
        .op(TUPLE)
        .op(BINPERSID);
    p.int(e.offset).ints(&e.shape).ints(&e.stride).op(NEWFALSE);
    p.global("collections", "OrderedDict")
        .op(EMPTY_TUPLE)
        .op(REDUCE);
    p.op(TUPLE).op(REDUCE);
}

/// An `OrderedDict` of the entries, as `torch.save(model.state_dict())` pickles it.
fn state_dict(mut p: Pickle, entries: &[Entry]) -> Vec<u8> {
    p.global("collections", "OrderedDict")
        .op(EMPTY_TUPLE)
        .op(REDUCE)
        .op(MARK);
    for e in entries {
        p.str(&e.name);
        tensor(&mut p, e);
    }
    p.op(SETITEMS).stop()
}

const LEGACY_MAGIC: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e,
];

/// The legacy layout around a state-dict pickle: magic, protocol, system info, the pickle,
/// the key list, then each storage's element count and bytes.
fn legacy(sd: &[u8], storages: &[Stored]) -> Vec<u8> {
    let mut out = LEGACY_MAGIC.to_vec();
    out.extend(Pickle::new().int(1001).stop());
    let mut info = Pickle::new();
    info.op(EMPTY_DICT).op(MARK);
    info.str("protocol_version").int(1001);
    info.str("little_endian").op(NEWTRUE);
    info.str("type_sizes").op(EMPTY_DICT).op(MARK);
    info.str("short")
        .int(2)
        .str("int")
        .int(4)
        .str("long")
        .int(4);
    info.op(SETITEMS).op(SETITEMS);
    out.extend(info.stop());
    out.extend(sd);
    let mut keys = Pickle::new();
    keys.op(EMPTY_LIST).op(MARK);
    for s in storages {
        keys.str(&s.key);
    }
    out.extend(keys.op(APPENDS).stop());
    for s in storages {
        out.extend((s.numel as u64).to_le_bytes());
        out.extend(&s.bytes);
    }
    out
}

/// The zip layout: `archive/data.pkl`, `archive/byteorder`, `archive/data/<key>`, ...
fn zipped(sd: &[u8], storages: &[Stored]) -> Vec<u8> {
    zipped_with(sd, storages, zip::CompressionMethod::Stored)
}

fn zipped_with(sd: &[u8], storages: &[Stored], method: zip::CompressionMethod) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let pkl = zip::write::SimpleFileOptions::default().compression_method(method);
    w.start_file("archive/data.pkl", pkl).unwrap();
    w.write_all(sd).unwrap();
    w.start_file("archive/byteorder", stored).unwrap();
    w.write_all(b"little").unwrap();
    for s in storages {
        w.start_file(format!("archive/data/{}", s.key), stored)
            .unwrap();
        w.write_all(&s.bytes).unwrap();
    }
    w.start_file("archive/version", stored).unwrap();
    w.write_all(b"3\n").unwrap();
    w.finish().unwrap().into_inner()
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A zip header for a stored member: local (`PK\x03\x04`) or, with the offset of the
/// local one, central (`PK\x01\x02`).
fn zip_header(name: &str, data: &[u8], central: Option<u32>) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend(if central.is_some() {
        b"PK\x01\x02"
    } else {
        b"PK\x03\x04"
    });
    if central.is_some() {
        h.extend(20u16.to_le_bytes()); // made by
    }
    h.extend(20u16.to_le_bytes()); // needed
    h.extend([0u8; 4]); // flags, method: stored
    h.extend([0u8; 4]); // time, date
    h.extend(crc32(data).to_le_bytes());
    h.extend((data.len() as u32).to_le_bytes());
    h.extend((data.len() as u32).to_le_bytes());
    h.extend((name.len() as u16).to_le_bytes());
    h.extend(0u16.to_le_bytes()); // extra
    if let Some(offset) = central {
        h.extend([0u8; 10]); // comment, disk, attributes
        h.extend(offset.to_le_bytes());
    }
    h.extend(name.as_bytes());
    h
}

/// A zip in which `archive/data/0` .. `archive/data/{n-1}` are all the same stored bytes:
/// one local member, `n` central directory entries pointing at it.
fn overlapping_zip(pickle: &[u8], data: &[u8], n: usize) -> Vec<u8> {
    let mut out = zip_header("archive/data.pkl", pickle, None);
    out.extend(pickle);
    let mut central = zip_header("archive/data.pkl", pickle, Some(0));
    let at = out.len() as u32;
    out.extend(zip_header("archive/data/0", data, None));
    out.extend(data);
    for i in 0..n {
        central.extend(zip_header(&format!("archive/data/{i}"), data, Some(at)));
    }
    let start = out.len() as u32;
    out.extend(&central);
    out.extend(b"PK\x05\x06");
    out.extend([0u8; 4]);
    out.extend(((n + 1) as u16).to_le_bytes());
    out.extend(((n + 1) as u16).to_le_bytes());
    out.extend((central.len() as u32).to_le_bytes());
    out.extend(start.to_le_bytes());
    out.extend(0u16.to_le_bytes());
    out
}

/// A small, valid checkpoint: one 2x3 float tensor.
fn small() -> (Vec<u8>, Vec<Stored>) {
    let s = floats("0", &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let sd = state_dict(Pickle::new(), &[entry("w", &s, 0, &[2, 3], &[3, 1])]);
    (sd, vec![s])
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

// ---------------------------------------------------------------------------------------
// What the reader must accept.

#[test]
fn crafted_checkpoints_read_back_in_both_layouts() {
    let s0 = floats("0", &(0..12).map(|i| i as f32).collect::<Vec<_>>());
    let half = |bits: &[u16], key: &str, kind: &'static str| Stored {
        key: key.into(),
        kind,
        numel: bits.len() as i64,
        bytes: bits.iter().flat_map(|b| b.to_le_bytes()).collect(),
    };
    let s1 = half(&[0x3c00, 0xc000, 0x3800, 0x7bff], "1", "HalfStorage");
    let s2 = half(&[0x3fc0, 0xc040], "2", "BFloat16Storage");
    let s3 = Stored {
        key: "3".into(),
        kind: "DoubleStorage",
        numel: 2,
        bytes: [0.25f64, 1e10]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    };
    let s4 = Stored {
        key: "4".into(),
        kind: "LongStorage",
        numel: 1,
        bytes: 7i64.to_le_bytes().to_vec(),
    };
    let entries = [
        entry("module.a", &s0, 0, &[3, 4], &[4, 1]),
        entry("b", &s0, 0, &[4, 3], &[1, 4]),
        entry("c", &s0, 2, &[5], &[2]),
        entry("scalar", &s0, 11, &[], &[]),
        entry("bcast", &s0, 5, &[2, 3], &[0, 1]),
        entry("empty", &s0, 12, &[0, 3], &[3, 1]),
        entry("h", &s1, 0, &[4], &[1]),
        entry("bf", &s2, 0, &[2], &[1]),
        entry("d", &s3, 0, &[2], &[1]),
        entry("n", &s4, 0, &[], &[]),
    ];
    let storages = [s0, s1, s2, s3, s4];
    let dir = tempfile::tempdir().unwrap();
    let files = [
        (
            "legacy.pt",
            legacy(&state_dict(Pickle::new(), &entries), &storages),
        ),
        (
            "zip2.pt",
            zipped(&state_dict(Pickle::new(), &entries), &storages),
        ),
        (
            "zip4.pt",
            zipped(&state_dict(Pickle::v4(), &entries), &storages),
        ),
        (
            "legacy4.pt",
            legacy(&state_dict(Pickle::v4(), &entries), &storages),
        ),
    ];
    for (name, bytes) in files {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        let sd = read_state_dict(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
        let mut names: Vec<_> = sd.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(
            names,
            ["a", "b", "bcast", "bf", "c", "d", "empty", "h", "scalar"],
            "{name}"
        );
        assert_eq!(sd["a"].dims(), &[3, 4]);
        assert_eq!(
            values(&sd["a"]),
            (0..12).map(|i| i as f32).collect::<Vec<_>>()
        );
        let b: Vec<f32> = (0..4)
            .flat_map(|i| (0..3).map(move |j| (j * 4 + i) as f32))
            .collect();
        assert_eq!(values(&sd["b"]), b, "{name}: the transposed view");
        assert_eq!(values(&sd["c"]), [2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(sd["scalar"].rank(), 0);
        assert_eq!(values(&sd["scalar"]), [11.0]);
        assert_eq!(values(&sd["bcast"]), [5.0, 6.0, 7.0, 5.0, 6.0, 7.0]);
        assert_eq!(sd["empty"].dims(), &[0, 3]);
        assert_eq!(values(&sd["h"]), [1.0, -2.0, 0.5, 65504.0]);
        assert_eq!(values(&sd["bf"]), [1.5, -3.0]);
        assert_eq!(values(&sd["d"]), [0.25, 1e10]);
    }

    // A training checkpoint: the weights under "state_dict", beside other values.
    let s = floats("0", &[1.0, 2.0]);
    let mut p = Pickle::new();
    p.op(EMPTY_DICT)
        .op(MARK)
        .str("epoch")
        .int(3)
        .str("best_acc");
    p.op(b'G').raw(&0.99f64.to_be_bytes());
    p.str("state_dict");
    let inner = state_dict(Pickle::new(), &[entry("w", &s, 0, &[2], &[1])]);
    // The inner pickle without its PROTO and STOP.
    p.raw(&inner[2..inner.len() - 1]);
    let nested = p.op(SETITEMS).stop();
    let sd =
        read_state_dict_bytes(&legacy(&nested, &[s]), Path::new("ckpt.pth"), &Device::Cpu).unwrap();
    assert_eq!(values(&sd["w"]), [1.0, 2.0]);
}

#[test]
fn a_tensor_shared_under_many_names_is_not_copied() {
    // 1,500 names for one memoised tensor object: one tensor, shared.
    let s = floats("0", &vec![0.5; 1 << 16]);
    let mut p = Pickle::new();
    p.global("collections", "OrderedDict")
        .op(EMPTY_TUPLE)
        .op(REDUCE)
        .op(MARK);
    p.str("w0");
    tensor(&mut p, &entry("w0", &s, 0, &[1 << 16], &[1]));
    p.op(BINPUT).op(1);
    for i in 1..1500 {
        p.str(&format!("w{i}")).op(BINGET).op(1);
    }
    let bytes = legacy(&p.op(SETITEMS).stop(), &[s]);
    let (sd, peak) =
        peak_of(|| read_state_dict_bytes(&bytes, Path::new("shared.pt"), &Device::Cpu).unwrap());
    assert_eq!(sd.len(), 1500);
    assert!(peak < 8 << 20, "{peak} bytes");
}

// ---------------------------------------------------------------------------------------
// What it must refuse.

#[test]
fn rebuild_with_too_few_arguments_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // The 83-byte shape of it: `_rebuild_tensor_v2()` with one argument.
    let mut p = Pickle::new();
    p.global("collections", "OrderedDict")
        .op(EMPTY_TUPLE)
        .op(REDUCE);
    p.str("w")
        .global("torch._utils", "_rebuild_tensor_v2")
        .int(0)
        .op(TUPLE1)
        .op(REDUCE)
        .op(SETITEM);
    let sd = p.stop();
    let err = refused(dir.path(), "few.pt", &legacy(&sd, &[]));
    assert!(
        err.contains("_rebuild_tensor_v2") && err.contains("byte offset"),
        "{err}"
    );
    let err = refused(dir.path(), "few.zip.pt", &zipped(&sd, &[]));
    assert!(err.contains("archive/data.pkl"), "{err}");

    // Arguments of the wrong kinds: an int as the storage, a string as the size.
    let s = floats("0", &[1.0]);
    let mut e = entry("w", &s, 0, &[1], &[1]);
    let mut p = Pickle::new();
    p.global("collections", "OrderedDict")
        .op(EMPTY_TUPLE)
        .op(REDUCE);
    p.str("w")
        .global("torch._utils", "_rebuild_tensor_v2")
        .op(MARK);
    p.int(5)
        .int(0)
        .ints(&[1])
        .ints(&[1])
        .op(NEWFALSE)
        .op(EMPTY_DICT)
        .op(TUPLE);
    p.op(REDUCE).op(SETITEM);
    let err = refused(dir.path(), "int-storage.pt", &legacy(&p.stop(), &[]));
    assert!(err.contains("not a storage"), "{err}");
    e.shape = vec![-1];
    let err = refused(
        dir.path(),
        "negative.pt",
        &legacy(&state_dict(Pickle::new(), &[e]), &[s]),
    );
    assert!(err.contains("non-negative"), "{err}");
}

#[test]
fn deep_nesting_is_refused_without_recursion() {
    let dir = tempfile::tempdir().unwrap();
    // 200,000 nested MARKs.
    let mut p = Pickle::new();
    p.raw(&vec![MARK; 200_000]);
    let err = refused(dir.path(), "marks.pt", &legacy(&p.stop(), &[]));
    assert!(err.contains("nested MARKs"), "{err}");

    // A tuple nested 200,000 deep, and a list: built without recursion, dropped without
    // it, refused for what they are.
    let mut p = Pickle::new();
    p.op(EMPTY_TUPLE).raw(&vec![TUPLE1; 200_000]);
    let err = refused(dir.path(), "tuples.pt", &legacy(&p.stop(), &[]));
    assert!(err.contains("not a state_dict"), "{err}");
    let mut p = Pickle::new();
    p.op(EMPTY_DICT).str("x");
    p.raw(&vec![EMPTY_LIST; 200_000])
        .raw(&vec![APPEND; 199_999]);
    p.op(SETITEM);
    let err = refused(dir.path(), "lists.pt", &zipped(&p.stop(), &[]));
    assert!(err.contains("no floating-point tensors"), "{err}");
}

#[test]
fn memo_billion_laughs_costs_its_opcodes_only() {
    let dir = tempfile::tempdir().unwrap();
    // Each level a list of ten references to the level below, 10^40 items if copied; every
    // level a value of the root dict.
    let mut p = Pickle::new();
    p.op(EMPTY_DICT).op(MARK);
    p.str("l0").op(EMPTY_LIST).op(BINPUT).op(0);
    for level in 1..=40u8 {
        p.str(&format!("l{level}")).op(EMPTY_LIST).op(MARK);
        for _ in 0..10 {
            p.op(BINGET).op(level - 1);
        }
        p.op(APPENDS).op(BINPUT).op(level);
    }
    p.op(SETITEMS);
    let bytes = legacy(&p.stop(), &[]);
    let err = refused(dir.path(), "laughs.pt", &bytes);
    assert!(err.contains("no floating-point tensors"), "{err}");

    // The same through tuples, beside a real tensor: accepted, at the cost of its opcodes.
    let s = floats("0", &[1.0]);
    let mut p = Pickle::new();
    p.global("collections", "OrderedDict")
        .op(EMPTY_TUPLE)
        .op(REDUCE)
        .op(MARK);
    p.str("t0").op(EMPTY_TUPLE).op(BINPUT).op(0);
    for level in 1..=40u8 {
        p.str(&format!("t{level}")).op(MARK);
        for _ in 0..10 {
            p.op(BINGET).op(level - 1);
        }
        p.op(TUPLE).op(BINPUT).op(level);
    }
    p.str("w");
    tensor(&mut p, &entry("w", &s, 0, &[1], &[1]));
    let bytes = zipped(&p.op(SETITEMS).stop(), &[s]);
    let start = Instant::now();
    let (sd, peak) = peak_of(|| {
        read_state_dict_bytes(&bytes, Path::new("laughs.zip.pt"), &Device::Cpu).unwrap()
    });
    assert_eq!(sd.len(), 1);
    assert!(peak < 1 << 20, "{peak} bytes");
    assert!(start.elapsed() < Duration::from_secs(1));
}

#[test]
fn huge_string_lengths_are_checked_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, Vec<u8>); 5] = [
        (
            "unicode4g.pt",
            [&[b'X'][..], &u32::MAX.to_le_bytes()].concat(),
        ),
        (
            "unicode8.pt",
            [&[0x8d][..], &u64::MAX.to_le_bytes()].concat(),
        ),
        (
            "unicode8-1t.pt",
            [&[0x8d][..], &(1u64 << 40).to_le_bytes()].concat(),
        ),
        (
            "bytes4g.pt",
            [&[b'B'][..], &u32::MAX.to_le_bytes()].concat(),
        ),
        (
            "frame.pt",
            [&[0x95][..], &(1u64 << 50).to_le_bytes()].concat(),
        ),
    ];
    for (name, op) in cases {
        let mut p = Pickle::new();
        let pickle = p.raw(&op).raw(b"abc").stop();
        let err = refused(dir.path(), name, &legacy(&pickle, &[]));
        assert!(err.contains("truncated") || err.contains("memory"), "{err}");
        let err = refused(dir.path(), &format!("z-{name}"), &zipped(&pickle, &[]));
        assert!(err.contains("truncated") || err.contains("memory"), "{err}");
    }
}

#[test]
fn views_outside_their_storage_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let one = floats("0", &[1.0]);
    let cases = [
        (
            "huge-shape.pt",
            entry("w", &one, 0, &[100_000, 100_000], &[100_000, 1]),
        ),
        ("offset.pt", entry("w", &one, 1, &[1], &[1])),
        ("stride.pt", entry("w", &one, 0, &[2], &[i64::MAX])),
        (
            "overflow.pt",
            entry("w", &one, i64::MAX, &[2, 2], &[i64::MAX, i64::MAX]),
        ),
        ("elements.pt", entry("w", &one, 0, &[1 << 20; 5], &[0; 5])),
        ("negative-stride.pt", entry("w", &one, 0, &[1], &[-1])),
        ("rank.pt", entry("w", &one, 0, &[1; 40], &[1; 40])),
        (
            "empty-huge.pt",
            entry("w", &one, 0, &[0, 1 << 40, 1 << 40], &[0, 0, 0]),
        ),
    ];
    for (name, e) in cases {
        let sd = state_dict(Pickle::new(), std::slice::from_ref(&e));
        let err = refused(dir.path(), name, &zipped(&sd, std::slice::from_ref(&one)));
        assert!(err.contains("byte offset"), "{err}");
        refused(
            dir.path(),
            &format!("legacy-{name}"),
            &legacy(&sd, std::slice::from_ref(&one)),
        );
    }
    // A storage that declares more elements than its member holds.
    let mut big = one.clone();
    big.numel = 1 << 40;
    let sd = state_dict(
        Pickle::new(),
        &[entry("w", &big, 0, &[1 << 20, 1 << 20], &[1 << 20, 1])],
    );
    let err = refused(
        dir.path(),
        "declared.pt",
        &zipped(&sd, std::slice::from_ref(&one)),
    );
    assert!(err.contains("archive/data/0"), "{err}");
    // The storage type named in the pid and the one a second pid gives disagree.
    let mut other = one.clone();
    other.kind = "HalfStorage";
    let sd = state_dict(
        Pickle::new(),
        &[
            entry("a", &one, 0, &[1], &[1]),
            entry("b", &other, 0, &[1], &[1]),
        ],
    );
    let err = refused(dir.path(), "twice.pt", &zipped(&sd, &[one]));
    assert!(err.contains("declared twice"), "{err}");
}

#[test]
fn broadcast_and_aliasing_views_are_held_to_a_budget() {
    let dir = tempfile::tempdir().unwrap();
    // Stride 0: (100000, 100000) over one element, 40 GB as f32.
    let one = floats("0", &[1.0]);
    let sd = state_dict(
        Pickle::new(),
        &[entry("w", &one, 0, &[100_000, 100_000], &[0, 0])],
    );
    let err = refused(
        dir.path(),
        "stride0.pt",
        &zipped(&sd, std::slice::from_ref(&one)),
    );
    assert!(err.contains("stride 0"), "{err}");
    refused(dir.path(), "stride0-legacy.pt", &legacy(&sd, &[one]));

    // 1,500 entries, each its own full view of one 256 KiB storage: 384 MiB.
    let s = floats("0", &vec![0.25; 1 << 16]);
    let entries: Vec<Entry> = (0..1500)
        .map(|i| entry(&format!("w{i}"), &s, 0, &[1 << 16], &[1]))
        .collect();
    let sd = state_dict(Pickle::new(), &entries);
    let err = refused(
        dir.path(),
        "aliases.pt",
        &zipped(&sd, std::slice::from_ref(&s)),
    );
    assert!(err.contains("(1500 of them)"), "{err}");
    refused(
        dir.path(),
        "aliases-legacy.pt",
        &legacy(&sd, std::slice::from_ref(&s)),
    );
    // 1,500 storages, each its own zip member, all over the same bytes of the file.
    let storages: Vec<Stored> = (0..1500)
        .map(|i| {
            let mut t = s.clone();
            t.key = i.to_string();
            t
        })
        .collect();
    let separate: Vec<Entry> = storages
        .iter()
        .map(|t| entry(&format!("w{}", t.key), t, 0, &[1 << 16], &[1]))
        .collect();
    let bytes = overlapping_zip(&state_dict(Pickle::new(), &separate), &s.bytes, 1500);
    let err = refused(dir.path(), "overlapping.pt", &bytes);
    assert!(err.contains("overlap"), "{err}");
    // The same writer with one entry per member reads (so the layout is sound).
    let bytes = overlapping_zip(&state_dict(Pickle::new(), &separate[..1]), &s.bytes, 1);
    let ok = read_state_dict_bytes(&bytes, Path::new("overlap1.pt"), &Device::Cpu);
    assert_eq!(ok.unwrap().len(), 1);
    // A handful of them fits the budget.
    let sd = state_dict(Pickle::new(), &entries[..3]);
    let ok = read_state_dict_bytes(&zipped(&sd, &[s]), Path::new("few.pt"), &Device::Cpu);
    assert_eq!(ok.unwrap().len(), 3);
}

#[test]
fn unknown_globals_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    for (module, name) in [
        ("os", "system"),
        ("builtins", "eval"),
        ("__builtin__", "eval"),
        ("posix", "system"),
        ("subprocess", "Popen"),
        ("_codecs", "encode"),
        ("torch", "load"),
        ("torch._utils", "_rebuild_qtensor"),
        ("collections", "defaultdict"),
    ] {
        for v4 in [false, true] {
            let mut p = if v4 { Pickle::v4() } else { Pickle::new() };
            p.global(module, name)
                .str("echo pwned")
                .op(TUPLE1)
                .op(REDUCE);
            let file = format!("{module}-{name}-{v4}.pt");
            let err = refused(dir.path(), &file, &legacy(&p.stop(), &[]));
            assert!(
                err.contains(&format!("`{module}.{name}` is not allowed"))
                    && err.contains("byte offset"),
                "{err}"
            );
        }
    }
}

#[test]
fn unknown_opcodes_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    for (code, name) in [
        (b'i', "INST"),
        (b'o', "OBJ"),
        (0x81, "NEWOBJ"),
        (0x92, "NEWOBJ_EX"),
        (0x8b, "LONG4"),
        (b'0', "POP"),
        (b'2', "DUP"),
        (b'V', "UNICODE"),
        (b'P', "PERSID"),
        (0x82, "EXT1"),
        (0xff, "0xff"),
    ] {
        let mut p = Pickle::new();
        p.op(EMPTY_DICT).op(code).raw(b"os\nsystem\n");
        let file = format!("op-{code:02x}.pt");
        let err = refused(dir.path(), &file, &zipped(&p.stop(), &[]));
        assert!(err.contains(name) && err.contains("byte offset 3"), "{err}");
    }
    // A protocol past 5.
    let err = refused(dir.path(), "proto.pt", &zipped(&[0x80, 6, b'N', STOP], &[]));
    assert!(err.contains("protocol 6"), "{err}");
}

#[test]
fn every_truncation_of_a_small_checkpoint_is_refused() {
    let (sd, storages) = small();
    for (name, bytes) in [
        ("cut.pt", legacy(&sd, &storages)),
        ("cut.zip.pt", zipped(&sd, &storages)),
    ] {
        let whole = read_state_dict_bytes(&bytes, Path::new(name), &Device::Cpu).unwrap();
        assert_eq!(values(&whole["w"]), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        for n in 0..bytes.len() {
            let err = read_state_dict_bytes(&bytes[..n], Path::new(name), &Device::Cpu)
                .err()
                .unwrap_or_else(|| panic!("{name} cut to {n} bytes was accepted"))
                .to_string();
            assert!(err.contains(name), "{err}");
        }
    }
}

#[test]
fn legacy_storage_counts_are_checked_against_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (sd, storages) = small();
    let good = legacy(&sd, &storages);
    // The element count before the storage's bytes: 2^62, and one more than declared.
    let count_at = good.len() - 24 - 8;
    for (name, count) in [("count-huge.pt", 1u64 << 62), ("count-off.pt", 7)] {
        let mut bad = good.clone();
        bad[count_at..count_at + 8].copy_from_slice(&count.to_le_bytes());
        let err = refused(dir.path(), name, &bad);
        assert!(err.contains(&format!("holds {count} elements")), "{err}");
    }
    // A declared count of 2^60 elements that the file does not hold.
    let mut s = storages[0].clone();
    s.numel = 1 << 60;
    let sd = state_dict(Pickle::new(), &[entry("w", &s, 0, &[2, 3], &[3, 1])]);
    let err = refused(dir.path(), "declared-huge.pt", &legacy(&sd, &[s]));
    assert!(err.contains("truncated"), "{err}");
    // A key list naming a storage no tensor uses, or none at all.
    let (sd, mut storages) = small();
    storages[0].key = "elsewhere".into();
    let err = refused(dir.path(), "keys.pt", &legacy(&sd, &storages));
    assert!(err.contains("elsewhere"), "{err}");
    let (sd, _) = small();
    let err = refused(dir.path(), "no-keys.pt", &legacy(&sd, &[]));
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn zip_members_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (sd, storages) = small();
    let deflated = zipped_with(&sd, &storages, zip::CompressionMethod::Deflated);
    let err = refused(dir.path(), "deflated.pt", &deflated);
    assert!(
        err.contains("compressed") && err.contains("archive/data.pkl"),
        "{err}"
    );

    let mut short = storages.clone();
    short[0].bytes.truncate(20);
    let err = refused(dir.path(), "short.pt", &zipped(&sd, &short));
    assert!(err.contains("holds 20 bytes"), "{err}");

    let err = refused(dir.path(), "absent.pt", &zipped(&sd, &[]));
    assert!(err.contains("archive/data/0"), "{err}");

    // One flipped bit in the storage, then one in the pickle: CRC-32.
    let good = zipped(&sd, &storages);
    for (what, needle) in [
        ("storage", storages[0].bytes.clone()),
        ("pickle", b"storage".to_vec()),
    ] {
        let at = good
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap();
        let mut bad = good.clone();
        bad[at + 1] ^= 0x10;
        let err = refused(dir.path(), &format!("crc-{what}.pt"), &bad);
        assert!(err.contains("CRC-32"), "{err}");
    }

    // A big-endian archive, and one without data.pkl.
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let o =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    w.start_file("archive/data.pkl", o).unwrap();
    w.write_all(&sd).unwrap();
    w.start_file("archive/byteorder", o).unwrap();
    w.write_all(b"big").unwrap();
    let big = w.finish().unwrap().into_inner();
    let err = refused(dir.path(), "big.pt", &big);
    assert!(err.contains("little-endian"), "{err}");
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    w.start_file("weights.bin", o).unwrap();
    w.write_all(b"0123").unwrap();
    let other = w.finish().unwrap().into_inner();
    let err = refused(dir.path(), "other.pt", &other);
    assert!(err.contains("data.pkl"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Mutants of the real checkpoints.

/// xorshift64: deterministic and dependency-free.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The end of a legacy file's pickles (the key list ends with `APPENDS STOP`), where the
/// storages begin.
fn pickles_end(bytes: &[u8]) -> usize {
    let keys = bytes
        .windows(3)
        .position(|w| w == b"\x80\x02]")
        .unwrap_or(0);
    bytes[keys..]
        .windows(2)
        .position(|w| w == b"e.")
        .map_or(bytes.len(), |i| keys + i + 2)
}

/// One to three mutations, half of them where the structure is (`hot`).
fn mutate(rng: &mut XorShift, original: &[u8], hot: &[std::ops::Range<usize>]) -> Vec<u8> {
    let mut m = original.to_vec();
    for _ in 0..1 + rng.below(3) {
        if m.is_empty() {
            break;
        }
        let at = |rng: &mut XorShift, len: usize| {
            let r = &hot[rng.below(hot.len())];
            let p = if rng.below(2) == 0 {
                r.start + rng.below(r.len())
            } else {
                rng.below(len)
            };
            p.min(len - 1)
        };
        let p = at(rng, m.len());
        match rng.below(6) {
            0 => m[p] ^= 1 << rng.below(8),
            1 => m[p] = 0x00,
            2 => m[p] = 0xff,
            3 => m[p] = 0x7f,
            4 => m.truncate(p),
            _ => {
                let len = 1 + rng.below(64);
                let chunk = m[p..(p + len).min(m.len())].to_vec();
                let to = at(rng, m.len());
                m.splice(to..to, chunk);
            }
        }
    }
    m
}

/// pnet's tensors in the zip layout, so that mutants reach the zip reader too.
fn pnet_zipped() -> Vec<u8> {
    let sd = read_state_dict(&asset("models/mtcnn/pnet.pt"), &Device::Cpu).unwrap();
    let mut names: Vec<_> = sd.keys().cloned().collect();
    names.sort();
    let mut storages = Vec::new();
    let mut entries = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let t = &sd[name];
        let v = values(t);
        let s = floats(&i.to_string(), &v);
        let dims: Vec<i64> = t.dims().iter().map(|&d| d as i64).collect();
        let mut stride = vec![1i64; dims.len()];
        for d in (0..dims.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * dims[d + 1];
        }
        entries.push(entry(name, &s, 0, &dims, &stride));
        storages.push(s);
    }
    zipped(&state_dict(Pickle::new(), &entries), &storages)
}

/// A checkpoint to mutate: its bytes, where its structure lies, and how many mutants.
struct Subject {
    name: String,
    bytes: Vec<u8>,
    hot: Vec<std::ops::Range<usize>>,
    count: usize,
}

#[test]
fn mutants_of_the_real_checkpoints_never_panic() {
    let start = Instant::now();
    let mut files = Vec::new();
    for (rel, count) in [
        ("models/mtcnn/pnet.pt", 2000),
        ("models/mtcnn/rnet.pt", 1200),
        ("models/mtcnn/onet.pt", 800),
        ("models/foamliu-mobilefacenet/mobilefacenet.pt", 500),
    ] {
        let bytes = std::fs::read(asset(rel)).unwrap();
        assert!(
            bytes.starts_with(&LEGACY_MAGIC),
            "{rel} is in the legacy layout"
        );
        files.push(Subject {
            name: rel.to_string(),
            hot: std::iter::once(0..pickles_end(&bytes)).collect(),
            bytes,
            count,
        });
    }
    let zip = pnet_zipped();
    let len = zip.len();
    files.push(Subject {
        name: "pnet (zip layout)".into(),
        hot: vec![0..2048.min(len), len.saturating_sub(1024)..len],
        bytes: zip,
        count: 2000,
    });

    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let (mut accepted, mut refused) = (0usize, 0usize);
    for Subject {
        name,
        bytes,
        hot,
        count,
    } in &files
    {
        let whole = read_state_dict_bytes(bytes, Path::new("original.pt"), &Device::Cpu);
        assert!(whole.is_ok(), "{name}: {:?}", whole.err());
        let (mut ok, mut err) = (0usize, 0usize);
        for i in 0..*count {
            let m = mutate(&mut rng, bytes, hot);
            let read = std::panic::catch_unwind(|| {
                read_state_dict_bytes(&m, Path::new("mutant.pt"), &Device::Cpu).map(|t| t.len())
            });
            match read {
                Ok(Ok(_)) => ok += 1,
                Ok(Err(e)) => {
                    assert!(e.to_string().contains("mutant.pt"), "{e}");
                    err += 1;
                }
                Err(_) => panic!("{name}: mutant {i} made the reader panic"),
            }
        }
        eprintln!("{name}: {count} mutants, {ok} accepted, {err} refused");
        accepted += ok;
        refused += err;
    }
    let elapsed = start.elapsed();
    eprintln!(
        "{} mutants: {accepted} accepted, {refused} refused, in {elapsed:?}",
        accepted + refused
    );
    assert!(accepted > 0 && refused > 0);
    if !cfg!(debug_assertions) {
        assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");
    }
}
