//! Hostile files: crafted and mutated pairs files, `.bin` sets, RecordIO files and their
//! indexes, landmarks files and images. Every one must give an error quickly, without a
//! panic or an outsized allocation, and the error must name the file (and the line or
//! byte offset where there is one); text from the file must come back escaped and short.

mod common;

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::asset;
use mfn_data::align::{parse_landmarks, read_landmarks_file};
use mfn_data::dataset::write_insightface;
use mfn_data::image::{MAX_IMAGE_BYTES, MAX_IMAGE_SIDE};
use mfn_data::recordio::{idx_path, Record, RecordReader, RecordWriter};
use mfn_data::{
    decode_rgb, decode_rgb_bytes, decode_rgb_sized, load_batch, BinSet, Dataset, Error,
    ImageFolder, Pairs, RecordDataset, VerificationSet,
};

/// The most a hostile input may take to be refused.
const QUICK: Duration = Duration::from_secs(5);

/// Runs `f`, which must fail within [`QUICK`]; returns the error's message.
fn refused<T: std::fmt::Debug>(what: &str, f: impl FnOnce() -> Result<T, Error>) -> String {
    let start = Instant::now();
    let result = f();
    let took = start.elapsed();
    assert!(took < QUICK, "{what}: took {took:?}");
    match result {
        Ok(v) => panic!("{what}: accepted: {v:?}"),
        Err(e) => e.to_string(),
    }
}

/// Checks that a message names `file` (by its file name), holds `needle`, is short, and
/// shows no raw control character.
fn check_message(what: &str, msg: &str, file: &Path, needle: &str) {
    let name = file.file_name().unwrap().to_string_lossy();
    assert!(
        msg.contains(name.as_ref()),
        "{what}: must name {name}: {msg}"
    );
    assert!(msg.contains(needle), "{what}: must say {needle:?}: {msg}");
    assert!(msg.len() < 600, "{what}: {} bytes of message", msg.len());
    assert!(
        !msg.chars().any(char::is_control),
        "{what}: raw control character in {msg:?}"
    );
}

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, bytes).unwrap();
    p
}

/// An aligned LFW face, as JPEG bytes.
fn face_jpeg(name: &str) -> Vec<u8> {
    fs::read(asset("lfw/aligned-112x112").join(format!("{name}/{name}_0001.jpg"))).unwrap()
}

// ---------------------------------------------------------------------------------------
// pairs.txt

#[test]
fn pairs_headers_cannot_ask_for_more_than_the_file_has() {
    let dir = tempfile::tempdir().unwrap();
    for (i, header) in ["4294967295 4294967295", "10000 10000", "4294967295", "3 1"]
        .iter()
        .enumerate()
    {
        let p = write(
            dir.path(),
            &format!("huge{i}.txt"),
            format!("{header}\nA 1 2\nA 1 B 1\n"),
        );
        let msg = refused(header, || Pairs::read(&p));
        check_message(header, &msg, &p, ":1: the header promises");
        let msg = refused(header, || VerificationSet::pairs(&p, dir.path(), "jpg"));
        check_message(header, &msg, &p, ":1:");
    }
    // More lines than promised: the first extra line is named.
    let p = write(dir.path(), "long.txt", "1 1\nA 1 2\nA 1 B 1\nC 1 2\n");
    let msg = refused("extra line", || Pairs::read(&p));
    check_message("extra line", &msg, &p, ":4: the header promises 2 pairs");
    // A View 1 file (one fold) cannot be a k-fold set.
    let p = write(
        dir.path(),
        "view1.txt",
        "1\nAaron_Peirsol 1 2\nAaron_Peirsol 1 Abel_Pacheco 1\n",
    );
    let lfw = asset("lfw/aligned-112x112");
    let msg = refused("one fold", || VerificationSet::pairs(&p, &lfw, "jpg"));
    check_message("one fold", &msg, &p, "at least 2");
}

#[test]
fn pairs_names_stay_inside_the_images_folder() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    fs::create_dir(&images).unwrap();
    // A file the escape would reach, so that only the name check can refuse it.
    fs::create_dir_all(dir.path().join("secret")).unwrap();
    fs::write(
        dir.path().join("secret/secret_0001.jpg"),
        face_jpeg("Aaron_Peirsol"),
    )
    .unwrap();
    let outside = dir.path().join("secret").display().to_string();
    for (i, (name, why)) in [
        (outside.as_str(), "path separator"),
        ("..", "would leave the folder"),
        ("../secret", "path separator"),
        ("/etc", "path separator"),
        ("a\\..\\b", "path separator"),
    ]
    .into_iter()
    .enumerate()
    {
        for (j, text) in [
            format!("2 1\n{name} 1 1\nA 1 B 1\nC 1 2\nD 1 E 1\n"),
            format!("2 1\nA 1 2\nA 1 B 1\nC 1 2\nD 1 {name} 1\n"),
        ]
        .into_iter()
        .enumerate()
        {
            let p = write(dir.path(), &format!("escape{i}-{j}.txt"), text);
            let line = if j == 0 { ":2:" } else { ":5:" };
            let msg = refused(name, || VerificationSet::pairs(&p, &images, "jpg"));
            check_message(name, &msg, &p, line);
            assert!(msg.contains(why), "{name}: {msg}");
        }
    }
}

#[test]
fn pairs_echoes_are_escaped_and_short() {
    let dir = tempfile::tempdir().unwrap();
    // Terminal escapes and a bell in a field.
    let p = write(dir.path(), "ctl.txt", "1 1\nA 1\u{1b}[2J\u{7} 2\nA 1 B 1\n");
    let msg = refused("control characters", || Pairs::read(&p));
    check_message(
        "control characters",
        &msg,
        &p,
        ":2: photo number `1\\u{1b}[2J\\u{7}`",
    );
    let p = write(
        dir.path(),
        "ctlname.txt",
        "1 1\nA\u{1b}]0;x\u{7} 1 2\nA 1 B 1\n",
    );
    let msg = refused("control characters in a name", || Pairs::read(&p));
    check_message("control name", &msg, &p, "control character");
    // A 10 MB field.
    let field = "7".repeat(10 << 20);
    let p = write(
        dir.path(),
        "big.txt",
        format!("1 1\nA {field} 2\nA 1 B 1\n"),
    );
    let msg = refused("10 MB field", || Pairs::read(&p));
    check_message("10 MB field", &msg, &p, ":2: photo number `777");
    assert!(msg.contains('…'), "{msg}");
    let p = write(
        dir.path(),
        "bigname.txt",
        format!("1 1\nA 1 2\n{field} 1 B 1\n"),
    );
    let msg = refused("10 MB name", || Pairs::read(&p));
    check_message("10 MB name", &msg, &p, ":3: name `777");
    // Not UTF-8: the line is named.
    let p = write(dir.path(), "latin1.txt", b"1 1\nA 1 2\nJos\xe9 1 B 1\n");
    let msg = refused("latin1", || Pairs::read(&p));
    check_message("latin1", &msg, &p, ":3: byte 4 of the line");
    // A device that never ends.
    #[cfg(unix)]
    {
        let zero = Path::new("/dev/zero");
        let msg = refused("/dev/zero", || Pairs::read(zero));
        check_message(
            "/dev/zero",
            &msg,
            zero,
            ":1: byte 1 of the line (offset 0 in the file) is NUL",
        );
    }
}

// ---------------------------------------------------------------------------------------
// .bin sets

/// A pickle: PROTO 4, then `body`, then STOP.
fn pickle(body: &[u8]) -> Vec<u8> {
    let mut v = vec![0x80, 4];
    v.extend_from_slice(body);
    v.push(b'.');
    v
}

#[test]
fn bin_sets_with_huge_or_inconsistent_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let mut huge8 = vec![b']', b'(', 0x8e];
    huge8.extend_from_slice(&(1u64 << 62).to_le_bytes());
    let mut huge4 = vec![b']', b'(', b'B'];
    huge4.extend_from_slice(&u32::MAX.to_le_bytes());
    let mut frame = vec![0x95];
    frame.extend_from_slice(&u64::MAX.to_le_bytes());
    let mut long4 = vec![0x8b];
    long4.extend_from_slice(&i32::MAX.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("BINBYTES8 of 2^62", pickle(&huge8), "byte 4: truncated"),
        ("BINBYTES of 4 GiB", pickle(&huge4), "byte 4: truncated"),
        ("FRAME of 2^64", pickle(&frame), "byte 2:"),
        ("LONG4 of 2 GiB", pickle(&long4), "byte 2:"),
        // Three images for one pair.
        (
            "3 images, 1 pair",
            pickle(b"](C\x01aC\x01bC\x01ce](\x88e\x86"),
            "3 images for 1 pairs",
        ),
        // Two images, no pairs.
        (
            "2 images, 0 pairs",
            pickle(b"](C\x01aC\x01be]\x86"),
            "no pairs",
        ),
        // One image repeated through the memo far past the file's size.
        ("memo bomb", memo_bomb(), "more than 4 times"),
    ];
    for (what, bytes, needle) in cases {
        let p = write(
            dir.path(),
            &format!("{}.bin", what.replace(' ', "_")),
            &bytes,
        );
        let msg = refused(what, || BinSet::read(&p));
        check_message(what, &msg, &p, needle);
        let msg = refused(what, || VerificationSet::bin(&p, 10));
        check_message(what, &msg, &p, needle);
    }
    // Devices and files that are no pickle at all, refused from their first byte.
    #[cfg(unix)]
    {
        let zero = Path::new("/dev/zero");
        let msg = refused("/dev/zero", || BinSet::read(zero));
        check_message("/dev/zero", &msg, zero, "byte 0: not a pickle");
    }
    let p = write(dir.path(), "elf.bin", b"\x7fELF\x02\x01\x01");
    let msg = refused("ELF", || VerificationSet::bin(&p, 10));
    check_message("ELF", &msg, &p, "byte 0: not a pickle");
    // A sound set that has fewer pairs than folds, or one fold.
    let p = asset("lfw/lfw-20pairs-protocol2.bin");
    for folds in [0, 1, 21] {
        let msg = refused("folds", || VerificationSet::bin(&p, folds));
        check_message("folds", &msg, &p, "cannot be split");
    }
}

/// `(images, issame)` where the images list holds one 100 KB bytes object 2,000 times (2
/// pairs' worth x 1,000): 200 MB of copies from a 100 KB file.
fn memo_bomb() -> Vec<u8> {
    let mut body = vec![b']', b'(', b'B'];
    body.extend_from_slice(&100_000u32.to_le_bytes());
    body.extend(std::iter::repeat_n(7u8, 100_000));
    body.extend_from_slice(&[b'q', 0]); // BINPUT 0
    for _ in 0..1999 {
        body.extend_from_slice(&[b'h', 0]); // BINGET 0
    }
    body.extend_from_slice(b"e](");
    body.extend(std::iter::repeat_n(0x88u8, 1000));
    body.extend_from_slice(b"e\x86");
    pickle(&body)
}

// ---------------------------------------------------------------------------------------
// RecordIO

fn rec_with(records: &[(u64, Record)], idx: bool) -> (Vec<u8>, Option<Vec<u8>>) {
    let mut w = RecordWriter::new(Vec::new(), idx.then(Vec::new));
    for (key, r) in records {
        w.write(*key, r).unwrap();
    }
    w.finish().unwrap()
}

#[test]
fn recordio_counts_come_from_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let jpg = face_jpeg("Aaron_Peirsol");
    // An insightface header claiming a billion identities, over one image.
    let header = Record::with_labels(vec![2.0, 1e9], 0, Vec::new());
    let (rec, _) = rec_with(&[(0, header), (1, Record::new(0.0, 1, jpg.clone()))], false);
    let p = write(dir.path(), "billion.rec", &rec);
    let msg = refused("1e9 identities", || RecordDataset::open(&p, None));
    check_message("1e9 identities", &msg, &p, "1000000000");
    // A header whose image range runs far past the records.
    let header = Record::with_labels(vec![1e18, 1e18], 0, Vec::new());
    let (rec, _) = rec_with(&[(0, header), (1, Record::new(0.0, 1, jpg.clone()))], false);
    let p = write(dir.path(), "images.rec", &rec);
    let msg = refused("1e18 images", || RecordDataset::open(&p, None));
    check_message("1e18 images", &msg, &p, "no record 2");
    // No header, a label of a billion.
    let (rec, _) = rec_with(
        &[
            (0, Record::new(0.0, 0, jpg.clone())),
            (1, Record::new(1e9, 1, jpg.clone())),
        ],
        false,
    );
    let p = write(dir.path(), "label.rec", &rec);
    let msg = refused("label 1e9", || RecordDataset::open(&p, None));
    let second = 8 + (24 + jpg.len()).next_multiple_of(4);
    check_message(
        "label 1e9",
        &msg,
        &p,
        &format!("byte {second}: record 1: class 1000000000 is too large"),
    );
}

#[test]
fn recordio_damage_names_the_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let jpg = face_jpeg("Aaron_Peirsol");
    let (rec, _) = rec_with(
        &[
            (0, Record::new(0.0, 0, jpg.clone())),
            (1, Record::new(1.0, 1, jpg.clone())),
        ],
        false,
    );
    let second = 8 + (24 + jpg.len()).next_multiple_of(4);
    // Cut inside the second record.
    let p = write(dir.path(), "cut.rec", &rec[..second + 100]);
    let msg = refused("truncated", || RecordDataset::open(&p, None));
    check_message(
        "truncated",
        &msg,
        &p,
        &format!("byte {second}: record declares"),
    );
    // Bad magic on the second record.
    let mut bad = rec.clone();
    bad[second] ^= 0xFF;
    let p = write(dir.path(), "magic.rec", &bad);
    let msg = refused("bad magic", || RecordDataset::open(&p, None));
    check_message("bad magic", &msg, &p, &format!("byte {second}: bad magic"));
    // The image itself cut short: found when it is decoded.
    let mut w = RecordWriter::new(Vec::new(), None);
    w.write(0, &Record::new(0.0, 0, jpg[..jpg.len() / 2].to_vec()))
        .unwrap();
    let p = write(dir.path(), "half.rec", w.finish().unwrap().0);
    let ds = RecordDataset::open(&p, None).unwrap();
    let msg = refused("half a JPEG", || ds.get(0));
    check_message(
        "half a JPEG",
        &msg,
        &p,
        "byte 0: record 0: cannot decode image",
    );
}

#[test]
fn recordio_uses_the_idx_beside_the_rec() {
    let dir = tempfile::tempdir().unwrap();
    let jpg = face_jpeg("Aaron_Peirsol");
    let records: Vec<(u64, Record)> = (0..3)
        .map(|k| (k, Record::new(k as f32, k, jpg.clone())))
        .collect();
    let (rec, idx) = rec_with(&records, true);
    let rec_path = write(dir.path(), "three.rec", &rec);
    let idx_text = String::from_utf8(idx.unwrap()).unwrap();
    // Without an index the file is scanned: three images.
    assert_eq!(RecordDataset::open(&rec_path, None).unwrap().len(), 3);
    // The index beside it lists two records, in another order: it is the one used.
    let lines: Vec<&str> = idx_text.lines().collect();
    fs::write(idx_path(&rec_path), format!("{}\n{}\n", lines[2], lines[0])).unwrap();
    let ds = RecordDataset::open(&rec_path, None).unwrap();
    assert_eq!(ds.reader().idx(), Some(idx_path(&rec_path).as_path()));
    assert_eq!((ds.len(), ds.get(0).unwrap().1), (2, 2));
    // An index pointing past the end of the .rec names its line.
    for (text, line, needle) in [
        (
            format!("{}\n1\t999999999\n", lines[0]),
            2,
            "past the end of",
        ),
        (
            format!("{}\n1\t{}\n", lines[0], rec.len() - 4),
            2,
            "no room",
        ),
        ("0\t0\n1\t\u{1b}[2J\n".to_string(), 2, "\\u{1b}[2J"),
        (format!("0\t{}\n", "9".repeat(2000)), 1, "…"),
    ] {
        fs::write(idx_path(&rec_path), &text).unwrap();
        let msg = refused("bad idx", || RecordDataset::open(&rec_path, None));
        check_message("bad idx", &msg, &idx_path(&rec_path), &format!(":{line}:"));
        assert!(msg.contains(needle), "{msg}");
    }
    // More index lines than the .rec can hold records.
    let many: String = (0..10_000).map(|k| format!("{k}\t0\n")).collect();
    fs::write(idx_path(&rec_path), many).unwrap();
    let msg = refused("long idx", || RecordDataset::open(&rec_path, None));
    check_message(
        "long idx",
        &msg,
        &idx_path(&rec_path),
        "more index lines than",
    );
    // An index far bigger than any index of this .rec: refused before it is read.
    fs::write(idx_path(&rec_path), vec![b'\n'; 8 << 20]).unwrap();
    let msg = refused("huge idx", || RecordDataset::open(&rec_path, None));
    check_message("huge idx", &msg, &idx_path(&rec_path), "more than");
    // A bad magic where an index line points: the record and the line are named.
    let mut bad = rec.clone();
    let second: usize = lines[1].split('\t').nth(1).unwrap().parse().unwrap();
    bad[second] ^= 0xFF;
    fs::write(&rec_path, &bad).unwrap();
    fs::write(idx_path(&rec_path), &idx_text).unwrap();
    let ds = RecordDataset::open(&rec_path, None);
    let msg = refused("bad record", || ds.and_then(|d| d.get(1)));
    check_message("bad record", &msg, &rec_path, "bad magic");
    assert!(msg.contains("three.idx:2"), "{msg}");
}

// ---------------------------------------------------------------------------------------
// Landmarks files

#[test]
fn landmarks_files_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = "a.jpg\t1\t2\t3\t4\t5\t6\t7\t8\t9\t10\n";
    let cases: Vec<(String, String)> = vec![
        (
            format!("{good}b.jpg\t1\t2\tNaN\t4\t5\t6\t7\t8\t9\t10\n"),
            ":2: field 4 (right eye x) is not a finite number: `NaN`".into(),
        ),
        (
            format!("{good}{good}b.jpg\t1\t2\t3\t4\tinf\t6\t7\t8\t9\t10\n"),
            ":3: field 6".into(),
        ),
        (
            format!("{good}b.jpg\t1\t2\t3\t4\t5\t6\t7\t8\t9\t1e39\n"),
            ":2: field 11".into(),
        ),
        (
            format!(
                "b.jpg\t1\t2\t3\t4\t5\t6\t7\t8\t9\t{}\n",
                "9".repeat(10 << 20)
            ),
            ":1: the line is 10485".into(),
        ),
        (
            format!("{good}x{}y\n", "\t".repeat(5000)),
            ":2: expected 11 tab-separated fields".into(),
        ),
        (
            "b.jpg\t1\t2\t3\t4\t5\t6\t7\t8\t9\t1\u{1b}[2J\n".to_string(),
            ":1: field 11 (right mouth corner y) is not a finite number: `1\\u{1b}[2J`".into(),
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let p = write(dir.path(), &format!("landmarks{i}.txt"), text);
        let msg = refused(needle, || read_landmarks_file(&p));
        check_message(needle, &msg, &p, needle);
    }
    let p = write(
        dir.path(),
        "latin1.txt",
        b"Jos\xe9.jpg\t1\t2\t3\t4\t5\t6\t7\t8\t9\t10\n",
    );
    let msg = refused("latin1", || read_landmarks_file(&p));
    check_message("latin1", &msg, &p, ":1: byte 4");
    #[cfg(unix)]
    {
        let zero = Path::new("/dev/zero");
        let msg = refused("/dev/zero", || read_landmarks_file(zero));
        check_message(
            "/dev/zero",
            &msg,
            zero,
            ":1: byte 1 of the line (offset 0 in the file) is NUL",
        );
    }
    assert_eq!(parse_landmarks(good, Path::new("x")).unwrap().len(), 1);
}

// ---------------------------------------------------------------------------------------
// Images

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

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// A PNG whose header says `w` x `h` RGB, with a token of image data.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    // An empty zlib stream.
    png_chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// A baseline JPEG whose frame header says `w` x `h`, with no real image data.
fn jpeg_claiming(w: u16, h: u16) -> Vec<u8> {
    let mut out = vec![0xFF, 0xD8];
    // Quantisation table 0, all ones.
    out.extend_from_slice(&[0xFF, 0xDB, 0x00, 0x43, 0x00]);
    out.extend(std::iter::repeat_n(1u8, 64));
    // SOF0: 8 bits, h, w, 1 component.
    out.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x0B, 0x08]);
    out.extend_from_slice(&h.to_be_bytes());
    out.extend_from_slice(&w.to_be_bytes());
    out.extend_from_slice(&[0x01, 0x01, 0x11, 0x00]);
    // A DC and an AC Huffman table with one code each.
    for class in [0x00u8, 0x10] {
        out.extend_from_slice(&[0xFF, 0xC4, 0x00, 0x14, class, 1]);
        out.extend(std::iter::repeat_n(0u8, 15));
        out.push(0);
    }
    // SOS, a little data, EOI.
    out.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x08, 0x01, 0x01, 0x00, 0x00, 0x3F, 0x00]);
    out.extend_from_slice(&[0x00; 16]);
    out.extend_from_slice(&[0xFF, 0xD9]);
    out
}

/// A 24-bit BMP whose header says `w` x `h`, with no pixels.
fn bmp_claiming(w: i32, h: i32) -> Vec<u8> {
    let mut out = b"BM".to_vec();
    out.extend_from_slice(&(54u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&54u32.to_le_bytes());
    out.extend_from_slice(&40u32.to_le_bytes());
    out.extend_from_slice(&w.to_le_bytes());
    out.extend_from_slice(&h.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&24u16.to_le_bytes());
    out.extend_from_slice(&[0; 24]);
    out
}

#[test]
fn images_claiming_huge_sizes_are_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("huge.png", png_claiming(100_000, 100_000), "100000"),
        ("wide.png", png_claiming(u32::MAX >> 1, 1), ""),
        (
            "square.png",
            png_claiming(MAX_IMAGE_SIDE, MAX_IMAGE_SIDE),
            "16384x16384",
        ),
        ("huge.jpg", jpeg_claiming(65_535, 65_535), ""),
        ("tall.jpg", jpeg_claiming(1, 60_000), ""),
        ("huge.bmp", bmp_claiming(100_000, 100_000), ""),
        ("neg.bmp", bmp_claiming(100_000, -100_000), ""),
    ];
    for (name, bytes, needle) in cases {
        let p = write(dir.path(), name, &bytes);
        let msg = refused(name, || decode_rgb(&p));
        check_message(name, &msg, &p, needle);
        let msg = refused(name, || {
            load_batch(
                std::slice::from_ref(&p),
                [112, 112],
                &candle_core::Device::Cpu,
            )
        });
        check_message(name, &msg, &p, needle);
    }
    // Real images are far inside the limits.
    let png = decode_rgb(&asset("golden/images/Abel_Pacheco_0001.png")).unwrap();
    assert_eq!(png.dimensions(), (112, 112));
    assert!(u64::from(MAX_IMAGE_SIDE).pow(2) * 3 > MAX_IMAGE_BYTES);
}

#[test]
fn damaged_and_misfit_images_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let jpg = face_jpeg("Aaron_Peirsol");
    for (name, bytes, needle) in [
        ("cut.jpg", jpg[..jpg.len() / 2].to_vec(), "truncated JPEG"),
        ("head.jpg", jpg[..20].to_vec(), ""),
        ("empty.jpg", Vec::new(), ""),
        ("text.png", b"not an image at all".to_vec(), ""),
    ] {
        let p = write(dir.path(), name, &bytes);
        let msg = refused(name, || decode_rgb(&p));
        check_message(name, &msg, &p, needle);
    }
    // A 250x250 photo where a 112x112 aligned crop is wanted.
    let photo = asset("lfw-raw-subset/images/Ariel_Sharon/Ariel_Sharon_0001.jpg");
    let msg = refused("size", || decode_rgb_sized(&photo, [112, 112]));
    check_message(
        "size",
        &msg,
        &photo,
        "image is [250, 250] (width x height), expected [112, 112]",
    );
    let ok = asset("lfw/aligned-112x112/Aaron_Peirsol/Aaron_Peirsol_0001.jpg");
    decode_rgb_sized(&ok, [112, 112]).unwrap();
    let msg = refused("size in a batch", || {
        load_batch(
            &[ok.clone(), photo.clone()],
            [112, 112],
            &candle_core::Device::Cpu,
        )
    });
    check_message("size in a batch", &msg, &photo, "[250, 250]");
    #[cfg(unix)]
    {
        let zero = Path::new("/dev/zero");
        let msg = refused("/dev/zero", || decode_rgb(zero));
        check_message("/dev/zero", &msg, zero, "not an image");
    }
}

// ---------------------------------------------------------------------------------------
// Embeddings of a verification set

#[test]
fn bad_embeddings_name_the_set_and_the_image() {
    let bin = asset("lfw/lfw-20pairs-protocol2.bin");
    let set = VerificationSet::bin(&bin, 10).unwrap();
    let mut rows = vec![vec![1.0f32, 0.5]; set.images()];
    set.check_embeddings(&rows).unwrap();
    rows[7][1] = f32::NAN;
    let msg = set.check_embeddings(&rows).unwrap_err().to_string();
    check_message("NaN", &msg, &bin, "image 7 (");
    assert!(msg.contains("component 1 is NaN"), "{msg}");
    rows[7] = vec![0.0, 0.0];
    let msg = set.check_embeddings(&rows).unwrap_err().to_string();
    check_message("zero", &msg, &bin, "is all zeros");
    let msg = set.check_embeddings(&rows[1..]).unwrap_err().to_string();
    check_message("count", &msg, &bin, "39 embeddings for 40 images");

    // Through `embed`: a model that gives one image a zero embedding.
    let err = set
        .embed(
            8,
            [112, 112],
            &candle_core::Device::Cpu,
            |x| -> Result<candle_core::Tensor, Error> {
                let n = x.dim(0)?;
                let mut v = vec![1.0f32; n * 4];
                v[..4].fill(0.0);
                Ok(candle_core::Tensor::from_vec(v, (n, 4), x.device())?)
            },
            |_| {},
        )
        .unwrap_err()
        .to_string();
    check_message("embed", &err, &bin, "the embedding of image 0 (");
}

// ---------------------------------------------------------------------------------------
// Mutants of real files

/// xorshift64*: a fixed seed gives the same mutants on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Bytes that parsers treat specially, as text and as numbers.
const TOKENS: [&[u8]; 14] = [
    b"\t",
    b"\n",
    b" ",
    b"-1",
    b"..",
    b"/",
    b"NaN",
    b"inf",
    b"99999999999999999999",
    b"4294967295",
    b"\x00",
    b"\xff\xd9",
    b"\xff\xda",
    b"\x0a\x23\xd7\xce",
];

const WORDS: [u32; 8] = [
    0,
    1,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
    0x4E6E_6B28, // 1e9 as f32
    0xced7_230a, // RecordIO's magic
    0x1FFF_FFFF,
];

/// `base` with one to four random changes: a bit flipped, a byte set, a cut, a chunk
/// duplicated, a 32-bit word overwritten, a token inserted.
fn mutate(rng: &mut Rng, base: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..1 + rng.below(4) {
        if v.is_empty() {
            v.push(rng.next() as u8);
            continue;
        }
        let at = rng.below(v.len());
        match rng.below(7) {
            0 => v[at] ^= 1 << rng.below(8),
            1 => v[at] = [0x00, 0xFF, 0x7F, 0x80, rng.next() as u8][rng.below(5)],
            2 => v.truncate(at),
            3 => {
                let len = 1 + rng.below(v.len().min(4096));
                let start = rng.below(v.len() - len + 1);
                let chunk = v[start..start + len].to_vec();
                let to = rng.below(v.len() + 1);
                v.splice(to..to, chunk);
            }
            4 => {
                let w = WORDS[rng.below(WORDS.len())].to_le_bytes();
                let end = (at + 4).min(v.len());
                v[at..end].copy_from_slice(&w[..end - at]);
            }
            5 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                v.splice(at..at, t.iter().copied());
            }
            _ => {
                // Several bytes flipped near one another.
                for k in at..(at + 8).min(v.len()) {
                    v[k] ^= rng.next() as u8;
                }
            }
        }
    }
    v
}

/// Accepted and rejected counts of one format's mutants.
#[derive(Default)]
struct Tally {
    accepted: usize,
    rejected: usize,
}

impl Tally {
    /// Counts the mutant as accepted or rejected by `r`, which is checked as by
    /// [`Tally::check`].
    fn count<T>(&mut self, r: Result<T, Error>, file: &str, mutant: &[u8], what: &str) {
        if check(&r, file, mutant, what) {
            self.accepted += 1;
        } else {
            self.rejected += 1;
        }
    }
}

/// Whether `r` is `Ok`; an error must name `file`, be short, and show no raw control
/// character.
fn check<T>(r: &Result<T, Error>, file: &str, mutant: &[u8], what: &str) -> bool {
    match r {
        Ok(_) => true,
        Err(e) => {
            let msg = e.to_string();
            if !msg.contains(file) || msg.chars().any(char::is_control) || msg.len() > 2000 {
                let dump = save(what, mutant);
                panic!(
                    "{what}: the error must name {file}, short and escaped ({}): {msg:?}",
                    dump.display()
                );
            }
            false
        }
    }
}

/// Rewrites the CRC of every PNG chunk that lies wholly inside `png`, so that mutants get
/// past the CRC check to the parts of the decoder behind it.
fn fix_png_crcs(png: &mut [u8]) {
    let mut at = 8;
    while at + 12 <= png.len() {
        let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
        let Some(end) = (at + 8).checked_add(len).filter(|&e| e + 4 <= png.len()) else {
            return;
        };
        let crc = crc32(&png[at + 4..end]);
        png[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        at = end + 4;
    }
}

/// Keeps a mutant that broke a rule, for replaying.
fn save(what: &str, mutant: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hostile-mutants");
    fs::create_dir_all(&dir).unwrap();
    let p = dir.join(what.replace([' ', '/'], "_"));
    fs::write(&p, mutant).unwrap();
    p
}

/// Runs `f` on `count` mutants of `base`; a panic names the format, the mutant's number
/// and where the mutant was saved.
fn mutants(
    format: &str,
    seed: u64,
    base: &[u8],
    count: usize,
    report: &mut Vec<String>,
    mut f: impl FnMut(&[u8], &str, &mut Tally),
) {
    let mut rng = Rng(seed);
    let mut tally = Tally::default();
    let start = Instant::now();
    for i in 0..count {
        let m = mutate(&mut rng, base);
        let what = format!("{format} mutant {i}");
        let r = catch_unwind(AssertUnwindSafe(|| f(&m, &what, &mut tally)));
        if let Err(p) = r {
            let dump = save(&what, &m);
            let message = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!(
                "{what} (seed {seed}) panicked: {message}; saved as {}",
                dump.display()
            );
        }
    }
    report.push(format!(
        "{format:<58} {count:>5} mutants: {:>5} accepted, {:>5} rejected, {:.2} s",
        tally.accepted,
        tally.rejected,
        start.elapsed().as_secs_f64()
    ));
}

#[test]
fn mutants_of_real_files_never_panic() {
    let start = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut report = Vec::new();

    // pairs.txt: parsed from memory; through a file when it is not UTF-8.
    let pairs = fs::read(asset("lfw/pairs.txt")).unwrap();
    let path = dir.path().join("pairs.txt");
    mutants(
        "lfw/pairs.txt",
        1,
        &pairs,
        1500,
        &mut report,
        |m, what, t| {
            let r = match std::str::from_utf8(m) {
                Ok(text) => Pairs::parse(text, &path),
                Err(_) => {
                    fs::write(&path, m).unwrap();
                    Pairs::read(&path)
                }
            };
            if let Ok(p) = &r {
                let (unique, index) = p.index();
                assert!(index.iter().flatten().all(|&i| i < unique.len()));
                assert!(unique
                    .iter()
                    .all(|u| u.path(dir.path(), "jpg").starts_with(dir.path())));
            }
            t.count(r, "pairs.txt", m, what);
        },
    );

    // .bin sets: parsed, and the first pair of an accepted one decoded.
    for (rel, count, seed) in [
        ("lfw/lfw-20pairs-protocol2.bin", 1000, 2),
        ("lfw/lfw-fold1.bin", 300, 3),
    ] {
        let bytes = fs::read(asset(rel)).unwrap();
        let name = Path::new(rel)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let path = PathBuf::from(&name);
        mutants(rel, seed, &bytes, count, &mut report, |m, what, t| {
            let r = BinSet::parse(m, &path);
            if let Ok(set) = &r {
                assert_eq!(set.images.len(), 2 * set.pairs());
                for (i, img) in set.images.iter().take(2).enumerate() {
                    let r = decode_rgb_bytes(img, &mfn_data::image::member_name(&path, i));
                    check(&r, &name, img, what);
                }
            }
            t.count(
                r.and_then(|s| VerificationSet::from_bin(s, &path, 10)),
                &name,
                m,
                what,
            );
        });
    }

    // RecordIO: a small insightface set of real faces, mutated as .rec and as .idx.
    let faces = dir.path().join("faces");
    for (who, n) in [
        ("Aaron_Peirsol", 2),
        ("Abel_Pacheco", 2),
        ("Aaron_Sorkin", 1),
    ] {
        fs::create_dir_all(faces.join(who)).unwrap();
        for k in 1..=n {
            let src = asset("lfw/aligned-112x112").join(format!("{who}/{who}_{k:04}.jpg"));
            fs::copy(src, faces.join(format!("{who}/{who}_{k:04}.jpg"))).unwrap();
        }
    }
    let folder = ImageFolder::open(&faces).unwrap();
    let mut w = RecordWriter::new(Vec::new(), Some(Vec::new()));
    write_insightface(&folder, &mut w).unwrap();
    let (rec, idx) = w.finish().unwrap();
    let idx = idx.unwrap();
    let rec_path = dir.path().join("train.rec");
    // One mutant in eight goes through files (`train.rec`, and `train.idx` found beside
    // it), the others through memory (`<memory>`), which is quicker.
    let calls = std::cell::Cell::new(0usize);
    let read_set = |rec: &[u8], idx: Option<&[u8]>, t: &mut Tally, what: &str, m: &[u8]| {
        calls.set(calls.get() + 1);
        let (r, file) = if calls.get().is_multiple_of(8) {
            fs::write(&rec_path, rec).unwrap();
            match idx {
                Some(text) => fs::write(idx_path(&rec_path), text).unwrap(),
                None => {
                    let _ = fs::remove_file(idx_path(&rec_path));
                }
            }
            (RecordDataset::open(&rec_path, None), "train.")
        } else {
            let r = RecordReader::from_bytes(rec.to_vec(), idx).and_then(RecordDataset::new);
            (r, "<memory>")
        };
        if let Ok(ds) = &r {
            for i in 0..ds.len().min(6) {
                let got = ds.get(i);
                if let Ok((_, class)) = &got {
                    assert!(*class < ds.num_classes());
                }
                check(&got, file, m, what);
            }
            for record in ds.reader().iter().take(12) {
                check(&record, file, m, what);
            }
        }
        t.count(r, file, m, what);
    };
    mutants(
        "train.rec (scanned)",
        4,
        &rec,
        800,
        &mut report,
        |m, what, t| read_set(m, None, t, what, m),
    );
    mutants(
        "train.rec (with .idx)",
        5,
        &rec,
        500,
        &mut report,
        |m, what, t| read_set(m, Some(&idx), t, what, m),
    );
    mutants("train.idx", 6, &idx, 500, &mut report, |m, what, t| {
        read_set(&rec, Some(m), t, what, m)
    });

    // Landmarks files: parsed from memory; through a file when not UTF-8.
    let landmarks = fs::read(asset("lfw-raw-subset/landmarks.txt")).unwrap();
    let path = dir.path().join("landmarks.txt");
    mutants(
        "lfw-raw-subset/landmarks.txt",
        7,
        &landmarks,
        1000,
        &mut report,
        |m, what, t| {
            let r = match std::str::from_utf8(m) {
                Ok(text) => parse_landmarks(text, &path),
                Err(_) => {
                    fs::write(&path, m).unwrap();
                    read_landmarks_file(&path)
                }
            };
            if let Ok(faces) = &r {
                assert!(faces
                    .iter()
                    .flat_map(|f| f.1)
                    .flatten()
                    .all(|v| v.is_finite()));
            }
            t.count(r, "landmarks.txt", m, what);
        },
    );

    // Images: aligned JPEGs, a raw photo, PNGs.
    for (rel, seed) in [
        (
            "lfw/aligned-112x112/Aaron_Peirsol/Aaron_Peirsol_0001.jpg",
            8,
        ),
        ("lfw/aligned-112x112/Abel_Pacheco/Abel_Pacheco_0001.jpg", 9),
        (
            "lfw-raw-subset/images/Ariel_Sharon/Ariel_Sharon_0001.jpg",
            10,
        ),
        ("golden/images/Abel_Pacheco_0001.png", 11),
        ("golden/images/Abdul_Rahman_0001.png", 12),
    ] {
        let bytes = fs::read(asset(rel)).unwrap();
        let name = Path::new(rel)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let path = PathBuf::from(&name);
        let png = rel.ends_with(".png");
        mutants(rel, seed, &bytes, 600, &mut report, |m, what, t| {
            let mut m = m.to_vec();
            if png {
                fix_png_crcs(&mut m);
            }
            let m = &m[..];
            let r = decode_rgb_bytes(m, &path);
            if let Ok(img) = &r {
                assert!(img.width() <= MAX_IMAGE_SIDE && img.height() <= MAX_IMAGE_SIDE);
            }
            t.count(r, &name, m, what);
        });
    }

    let took = start.elapsed();
    println!("{}", report.join("\n"));
    println!("all mutants in {:.1} s", took.as_secs_f64());
    assert!(took < Duration::from_secs(60), "mutants took {took:?}");
}
