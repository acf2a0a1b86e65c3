//! Hostile data files through the command line: pairs files with huge headers, names that
//! leave the images folder, terminal escapes and a 10 MB field; `.bin` sets that ask for
//! more than they hold; images that claim 100000x100000 pixels or have the wrong size;
//! landmarks that are not numbers; RecordIO files that claim a billion identities or whose
//! `.idx` points past the end. Every run must end with exit status 2 and a message naming
//! the file, within bounded memory and time.

use std::fs;
use std::path::{Path, PathBuf};

mod common;
use common::{assert_refused, asset, mfn_bounded, stderr};

use mfn_data::recordio::{idx_path, Record, RecordWriter};

fn model() -> String {
    asset("models/mobilefacenet-y1/model-symbol.json")
        .to_str()
        .unwrap()
        .to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, bytes).unwrap();
    p
}

/// Runs `args`, which must be refused naming `file`; `needle` must be in the message, which
/// must be short and free of raw control characters.
fn refused(args: &[&str], file: &Path, needle: &str) {
    let run = mfn_bounded(args);
    let err = stderr(&run);
    eprintln!("{} {}: {}", args[0], file.display(), err.trim());
    assert_refused(&run, file);
    assert!(err.contains(needle), "{args:?}: must say {needle:?}: {err}");
    assert!(err.len() < 2000, "{args:?}: {} bytes of message", err.len());
    assert!(
        !err.trim_end().chars().any(|c| c.is_control() && c != '\n'),
        "{args:?}: raw control character in {err:?}"
    );
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG whose header says `w` x `h` RGB, with an empty image stream.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8; 4], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    out
}

#[test]
fn eval_refuses_hostile_pairs_files() {
    let dir = tempfile::tempdir().unwrap();
    let images = asset("lfw/aligned-112x112");
    let m = model();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "huge.txt",
            "4294967295 4294967295\nA 1 2\nA 1 B 1\n".into(),
            "huge.txt:1: the header promises",
        ),
        (
            "big.txt",
            "10000 10000\nA 1 2\nA 1 B 1\n".into(),
            "huge.txt:1:",
        ),
        (
            "absolute.txt",
            format!(
                "2 1\nAaron_Peirsol 1 2\n{} 1 Abel_Pacheco 1\nAaron_Peirsol 1 3\nA 1 B 1\n",
                images.join("Aaron_Peirsol").display()
            ),
            "absolute.txt:3: name",
        ),
        (
            "dotdot.txt",
            "2 1\n.. 1 2\nA 1 B 1\nC 1 2\nD 1 E 1\n".into(),
            "dotdot.txt:2:",
        ),
        (
            "escape.txt",
            format!(
                "2 1\nA 1\u{1b}]0;pwned\u{7}{} 2\nA 1 B 1\nC 1 2\nD 1 E 1\n",
                "9".repeat(10 << 20)
            ),
            "escape.txt:2: photo number `1\\u{1b}]0;pwned\\u{7}999",
        ),
        (
            "view1.txt",
            "1\nAaron_Peirsol 1 2\nAaron_Peirsol 1 Abel_Pacheco 1\n".into(),
            "at least 2",
        ),
    ];
    for (name, text, needle) in cases {
        let p = write(dir.path(), name, text);
        let needle = needle.replace("huge.txt", name);
        refused(
            &[
                "eval",
                "--model",
                &m,
                "--pairs",
                s(&p),
                "--images",
                s(&images),
            ],
            &p,
            &needle,
        );
    }
}

/// A pickle: PROTO 4, then `body`, then STOP.
fn pickle(body: &[u8]) -> Vec<u8> {
    let mut v = vec![0x80, 4];
    v.extend_from_slice(body);
    v.push(b'.');
    v
}

#[test]
fn eval_refuses_hostile_bin_sets() {
    let dir = tempfile::tempdir().unwrap();
    let m = model();
    let mut huge = vec![b']', b'(', 0x8e];
    huge.extend_from_slice(&(1u64 << 62).to_le_bytes());
    let mut bomb = vec![b']', b'(', b'B'];
    bomb.extend_from_slice(&100_000u32.to_le_bytes());
    bomb.extend(std::iter::repeat_n(7u8, 100_000));
    bomb.extend_from_slice(&[b'q', 0]);
    for _ in 0..19_999 {
        bomb.extend_from_slice(&[b'h', 0]);
    }
    bomb.extend_from_slice(b"e](");
    bomb.extend(std::iter::repeat_n(0x88u8, 10_000));
    bomb.extend_from_slice(b"e\x86");
    for (name, bytes, needle) in [
        ("huge.bin", pickle(&huge), "byte 4: truncated"),
        (
            "uneven.bin",
            pickle(b"](C\x01aC\x01bC\x01ce](\x88e\x86"),
            "3 images for 1 pairs",
        ),
        ("bomb.bin", pickle(&bomb), "more than 4 times"),
    ] {
        let p = write(dir.path(), name, bytes);
        refused(&["eval", "--model", &m, "--bin", s(&p)], &p, needle);
    }
}

#[test]
fn image_commands_refuse_hostile_images() {
    let dir = tempfile::tempdir().unwrap();
    let m = model();
    let ok = asset("lfw/aligned-112x112/Aaron_Peirsol/Aaron_Peirsol_0001.jpg");
    let huge = write(dir.path(), "big.png", png_claiming(100_000, 100_000));
    let jpg = fs::read(&ok).unwrap();
    let cut = write(dir.path(), "cut.jpg", &jpg[..jpg.len() / 2]);
    let photo = asset("lfw-raw-subset/images/Ariel_Sharon/Ariel_Sharon_0001.jpg");
    refused(&["embed", "--model", &m, s(&huge)], &huge, "100000x100000");
    refused(&["embed", "--model", &m, s(&cut)], &cut, "truncated JPEG");
    refused(&["embed", "--model", &m, s(&photo)], &photo, "[250, 250]");
    let verify = |a: &Path, b: &Path| {
        mfn_bounded(&[
            "verify",
            "--model",
            &m,
            "--threshold",
            "0.3",
            "--aligned",
            s(a),
            s(b),
        ])
    };
    for (a, b, bad, needle) in [
        (&huge, &ok, &huge, "100000x100000"),
        (&ok, &cut, &cut, "truncated JPEG"),
    ] {
        let run = verify(a, b);
        eprintln!("verify: {}", stderr(&run).trim());
        assert_refused(&run, bad);
        assert!(stderr(&run).contains(needle), "{}", stderr(&run));
    }
}

/// `verify --aligned` takes crops at the model's input size; a photo of another size must
/// be named, with both sizes, before the network sees it.
#[test]
fn verify_aligned_names_a_photo_of_the_wrong_size() {
    let m = model();
    let ok = asset("lfw/aligned-112x112/Aaron_Peirsol/Aaron_Peirsol_0001.jpg");
    let photo = asset("lfw-raw-subset/images/Ariel_Sharon/Ariel_Sharon_0001.jpg");
    let other = asset("lfw-raw-subset/images/Ariel_Sharon/Ariel_Sharon_0002.jpg");
    for (a, b) in [(&photo, &ok), (&ok, &photo), (&photo, &other)] {
        refused(
            &[
                "verify",
                "--model",
                &m,
                "--threshold",
                "0.3",
                "--aligned",
                s(a),
                s(b),
            ],
            &photo,
            "[250, 250]",
        );
    }
}

#[test]
fn align_refuses_hostile_landmarks() {
    let dir = tempfile::tempdir().unwrap();
    let photo = asset("lfw-raw-subset/images/Ariel_Sharon/Ariel_Sharon_0001.jpg");
    let out = dir.path().join("out");
    for (name, text, needle) in [
        (
            "nan.txt",
            "Ariel_Sharon_0001.jpg\t103\t110\tNaN\t114\t126\t145\t98\t153\t143\t158\n".to_string(),
            "nan.txt:1: field 4 (right eye x) is not a finite number: `NaN`",
        ),
        (
            "long.txt",
            format!(
                "x.jpg\t1\t2\t3\t4\t5\t6\t7\t8\t9\t10\nx{}y\n",
                "\t".repeat(10 << 20)
            ),
            "long.txt:2: the line is",
        ),
        (
            "ctl.txt",
            "Ariel_Sharon_0001.jpg\t1\u{1b}[2J\t110\t149\t114\t126\t145\t98\t153\t143\t158\n"
                .to_string(),
            "ctl.txt:1: field 2 (left eye x) is not a finite number: `1\\u{1b}[2J`",
        ),
    ] {
        let p = write(dir.path(), name, text);
        refused(
            &["align", "--landmarks", s(&p), "--out", s(&out), s(&photo)],
            &p,
            needle,
        );
    }
    let huge = write(
        dir.path(),
        "Ariel_Sharon_0001.png",
        png_claiming(100_000, 100_000),
    );
    let p = write(
        dir.path(),
        "ok.txt",
        "Ariel_Sharon_0001.png\t103\t110\t149\t114\t126\t145\t98\t153\t143\t158\n",
    );
    refused(
        &["align", "--landmarks", s(&p), "--out", s(&out), s(&huge)],
        &huge,
        "100000x100000",
    );
}

#[test]
fn train_refuses_hostile_record_files() {
    let dir = tempfile::tempdir().unwrap();
    let jpg = fs::read(asset(
        "lfw/aligned-112x112/Aaron_Peirsol/Aaron_Peirsol_0001.jpg",
    ))
    .unwrap();
    let rec_file = |name: &str, records: &[(u64, Record)]| {
        let mut w = RecordWriter::new(Vec::new(), Some(Vec::new()));
        for (k, r) in records {
            w.write(*k, r).unwrap();
        }
        let (rec, idx) = w.finish().unwrap();
        (write(dir.path(), name, rec), idx.unwrap())
    };
    let run_dir = dir.path().join("run");
    let train = |rec: &Path| {
        vec![
            "train".to_string(),
            "--data".into(),
            s(rec).into(),
            "--steps".into(),
            "1".into(),
            "--out".into(),
            s(&run_dir).into(),
        ]
    };
    // A header claiming a billion identities over one image.
    let (rec, _) = rec_file(
        "billion.rec",
        &[
            (0, Record::with_labels(vec![2.0, 1e9], 0, Vec::new())),
            (1, Record::new(0.0, 1, jpg.clone())),
        ],
    );
    let args = train(&rec);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    refused(&args, &rec, "1000000000");
    // No header, a label of a billion.
    let (rec, _) = rec_file(
        "label.rec",
        &[
            (0, Record::new(0.0, 0, jpg.clone())),
            (1, Record::new(1e9, 1, jpg.clone())),
        ],
    );
    let args = train(&rec);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    refused(&args, &rec, "class 1000000000 is too large");
    // The .idx beside the .rec is used, and its offsets are checked against the .rec.
    let (rec, idx) = rec_file(
        "indexed.rec",
        &[
            (0, Record::new(0.0, 0, jpg.clone())),
            (1, Record::new(1.0, 1, jpg.clone())),
        ],
    );
    let mut text = String::from_utf8(idx).unwrap();
    text.push_str("2\t987654321\n");
    fs::write(idx_path(&rec), text).unwrap();
    let args = train(&rec);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    refused(
        &args,
        &idx_path(&rec),
        "indexed.idx:3: offset 987654321 is past the end",
    );
}
