//! Hostile PyTorch checkpoints through the command line: memo "billion laughs", a string
//! that declares 4 GB, nesting 200,000 deep, a forbidden global, a tensor rebuilt with too
//! few arguments, a view over far more than its storage, 1,500 views of one storage.
//! `embed` and `convert` must refuse each with exit status 2 and a message naming the file,
//! within 2 GiB of address space and 30 s, and write nothing.

use std::path::{Path, PathBuf};

mod common;
use common::{assert_refused, asset, mfn_bounded, stderr};

const MARK: u8 = b'(';
const STOP: u8 = b'.';
const TUPLE: u8 = b't';
const TUPLE1: u8 = 0x85;
const EMPTY_TUPLE: u8 = b')';
const EMPTY_LIST: u8 = b']';
const EMPTY_DICT: u8 = b'}';
const REDUCE: u8 = b'R';
const SETITEM: u8 = b's';
const SETITEMS: u8 = b'u';
const APPENDS: u8 = b'e';
const BINPUT: u8 = b'q';
const BINGET: u8 = b'h';

/// A protocol-2 pickle, opcode by opcode.
#[derive(Default)]
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, code: u8) -> &mut Self {
        self.0.push(code);
        self
    }

    fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }

    fn str(&mut self, s: &str) -> &mut Self {
        self.op(b'X')
            .raw(&(s.len() as u32).to_le_bytes())
            .raw(s.as_bytes())
    }

    fn int(&mut self, v: u32) -> &mut Self {
        self.op(b'J').raw(&v.to_le_bytes())
    }

    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(b'c').raw(format!("{module}\n{name}\n").as_bytes())
    }

    fn ints(&mut self, values: &[u32]) -> &mut Self {
        self.op(MARK);
        for &v in values {
            self.int(v);
        }
        self.op(TUPLE)
    }

    fn ordered_dict(&mut self) -> &mut Self {
        self.global("collections", "OrderedDict")
            .op(EMPTY_TUPLE)
            .op(REDUCE)
    }

    /// `_rebuild_tensor_v2` of a view of float storage `key` (of `numel` elements).
    fn tensor(&mut self, key: &str, numel: u32, shape: &[u32], stride: &[u32]) -> &mut Self {
        self.global("torch._utils", "_rebuild_tensor_v2").op(MARK);
        self.op(MARK)
            .str("storage")
            .global("torch", "FloatStorage")
            .str(key)
            .str("cpu")
            .int(numel)
            .op(TUPLE)
            .op(b'Q');
        self.int(0).ints(shape).ints(stride).op(0x89).ordered_dict();
        self.op(TUPLE).op(REDUCE)
    }

    fn stop(&mut self) -> Vec<u8> {
        let mut out = vec![0x80, 2];
        out.extend(&self.0);
        out.push(STOP);
        out
    }
}

/// The legacy layout around a state-dict pickle and float storages `(key, numel)` of zeros.
fn legacy(sd: &[u8], storages: &[(&str, u32)]) -> Vec<u8> {
    let mut out = vec![
        0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e,
    ];
    out.extend(Pickle::default().int(1001).stop());
    out.extend(
        Pickle::default()
            .op(EMPTY_DICT)
            .str("little_endian")
            .op(0x88)
            .op(SETITEM)
            .stop(),
    );
    out.extend(sd);
    let mut keys = Pickle::default();
    keys.op(EMPTY_LIST).op(MARK);
    for (key, _) in storages {
        keys.str(key);
    }
    out.extend(keys.op(APPENDS).stop());
    for &(_, n) in storages {
        out.extend(u64::from(n).to_le_bytes());
        out.extend(vec![0u8; 4 * n as usize]);
    }
    out
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

/// A zip archive of stored members, as `torch.save` writes one (without its padding).
fn zip(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in members {
        let offset = out.len() as u32;
        let crc = crc32(data);
        let size = data.len() as u32;
        let fields = |sig: &[u8], central: bool| {
            let mut h = sig.to_vec();
            if central {
                h.extend(20u16.to_le_bytes());
            }
            h.extend(20u16.to_le_bytes()); // version needed
            h.extend(0u16.to_le_bytes()); // flags
            h.extend(0u16.to_le_bytes()); // stored
            h.extend(0u32.to_le_bytes()); // time, date
            h.extend(crc.to_le_bytes());
            h.extend(size.to_le_bytes());
            h.extend(size.to_le_bytes());
            h.extend((name.len() as u16).to_le_bytes());
            h.extend(0u16.to_le_bytes()); // extra
            if central {
                h.extend([0u8; 6]); // comment, disk, internal attributes
                h.extend(0u32.to_le_bytes()); // external attributes
                h.extend(offset.to_le_bytes());
            }
            h.extend(name.as_bytes());
            h
        };
        out.extend(fields(b"PK\x03\x04", false));
        out.extend_from_slice(data);
        central.extend(fields(b"PK\x01\x02", true));
    }
    let start = out.len() as u32;
    out.extend(&central);
    out.extend(b"PK\x05\x06");
    out.extend([0u8; 4]);
    out.extend((members.len() as u16).to_le_bytes());
    out.extend((members.len() as u16).to_le_bytes());
    out.extend((central.len() as u32).to_le_bytes());
    out.extend(start.to_le_bytes());
    out.extend(0u16.to_le_bytes());
    out
}

/// The crafted checkpoints: file name, bytes, and a phrase of the refusal.
fn hostile() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let mut files = Vec::new();

    // Forty levels of lists, each ten references to the one below.
    let mut p = Pickle::default();
    p.op(EMPTY_DICT).op(MARK);
    p.str("l0").op(EMPTY_LIST).op(BINPUT).op(0);
    for level in 1..=40u8 {
        p.str(&format!("l{level}")).op(EMPTY_LIST).op(MARK);
        for _ in 0..10 {
            p.op(BINGET).op(level - 1);
        }
        p.op(APPENDS).op(BINPUT).op(level);
    }
    files.push((
        "laughs.pt",
        legacy(&p.op(SETITEMS).stop(), &[]),
        "no floating-point tensors",
    ));

    // A string that declares 4 GB.
    let mut p = Pickle::default();
    p.op(EMPTY_DICT).op(b'X').raw(&u32::MAX.to_le_bytes());
    files.push((
        "huge-string.pt",
        legacy(&p.stop(), &[]),
        "needs 4294967295 bytes",
    ));

    // A tuple nested 200,000 deep.
    let mut p = Pickle::default();
    p.op(EMPTY_TUPLE).raw(&vec![TUPLE1; 200_000]);
    files.push(("deep.pt", legacy(&p.stop(), &[]), "not a state_dict"));

    // os.system, reduced.
    let mut p = Pickle::default();
    p.global("os", "system")
        .str("echo pwned")
        .op(TUPLE1)
        .op(REDUCE);
    files.push((
        "system.pt",
        legacy(&p.stop(), &[]),
        "`os.system` is not allowed",
    ));

    // _rebuild_tensor_v2 with a single argument.
    let mut p = Pickle::default();
    p.ordered_dict().str("w");
    p.global("torch._utils", "_rebuild_tensor_v2")
        .int(0)
        .op(TUPLE1)
        .op(REDUCE)
        .op(SETITEM);
    files.push((
        "few-args.pt",
        legacy(&p.stop(), &[]),
        "reduced with 1 arguments",
    ));

    // Shape (100000, 100000) over one element, as a view and as a broadcast (stride 0).
    for (name, stride, why) in [
        ("outside.zip.pt", [100_000, 1], "outside the storage"),
        ("broadcast.zip.pt", [0, 0], "stride 0"),
    ] {
        let mut p = Pickle::default();
        p.ordered_dict().str("w");
        p.tensor("0", 1, &[100_000, 100_000], &stride).op(SETITEM);
        let pickle = p.stop();
        let members: [(&str, &[u8]); 3] = [
            ("archive/data.pkl", &pickle),
            ("archive/byteorder", b"little"),
            ("archive/data/0", &[0u8; 4]),
        ];
        files.push((name, zip(&members), why));
    }

    // 1,500 entries, each a full view of one 256 KiB storage: 384 MiB.
    let mut p = Pickle::default();
    p.ordered_dict().op(MARK);
    for i in 0..1500 {
        p.str(&format!("w{i}"))
            .tensor("0", 1 << 16, &[1 << 16], &[1]);
    }
    let aliases = legacy(&p.op(SETITEMS).stop(), &[("0", 1 << 16)]);
    files.push(("aliases.pt", aliases, "(1500 of them)"));
    files
}

#[test]
fn hostile_checkpoints_are_refused_by_embed_and_convert() {
    let dir = tempfile::tempdir().unwrap();
    let image = asset("golden/images/Abel_Pacheco_0001.png");
    for (name, bytes, why) in hostile() {
        let file = dir.path().join(name);
        std::fs::write(&file, &bytes).unwrap();
        let model = file.to_str().unwrap();
        let json = dir.path().join(format!("{name}.json"));
        let run = mfn_bounded(&[
            "embed",
            "--model",
            model,
            "--json",
            json.to_str().unwrap(),
            image.to_str().unwrap(),
        ]);
        assert_refused(&run, &file);
        assert!(stderr(&run).contains(why), "{name}: {}", stderr(&run));
        assert!(!json.exists(), "{name}: embed wrote {}", json.display());

        let out: PathBuf = dir.path().join(format!("{name}.safetensors"));
        let run = mfn_bounded(&["convert", model, out.to_str().unwrap()]);
        assert_refused(&run, &file);
        assert!(stderr(&run).contains(why), "{name}: {}", stderr(&run));
        assert!(!out.exists(), "{name}: convert wrote {}", out.display());
    }
}

#[test]
fn the_crafted_zip_layout_is_a_checkpoint_the_reader_understands() {
    // The same writer with a sound view: the refusals above are for what the files hold,
    // not for how they are laid out.
    let mut p = Pickle::default();
    p.ordered_dict().str("w");
    p.tensor("0", 4, &[2, 2], &[1, 2]).op(SETITEM);
    let pickle = p.stop();
    let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let bytes = zip(&[
        ("archive/data.pkl", &pickle),
        ("archive/byteorder", b"little"),
        ("archive/data/0", &data),
    ]);
    let sd = mfn_model::import::torch::read_state_dict_bytes(
        &bytes,
        Path::new("sound.zip.pt"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let w: Vec<Vec<f32>> = sd["w"].to_vec2().unwrap();
    assert_eq!(w, [[1.0, 3.0], [2.0, 4.0]]);
    let bytes = legacy(&pickle, &[("0", 4)]);
    let sd = mfn_model::import::torch::read_state_dict_bytes(
        &bytes,
        Path::new("sound.pt"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(sd["w"].dims(), &[2, 2]);
}
