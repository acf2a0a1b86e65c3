//! MXNet RecordIO: exact round trips (magic words in payloads included), dmlc's framing
//! byte for byte, clear errors for every kind of damage, and image datasets over real LFW
//! faces.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::asset;
use mfn_data::dataset::write_insightface;
use mfn_data::recordio::{
    idx_path, pack, unpack, InsightfaceHeader, IrHeader, Record, RecordReader, RecordWriter, MAGIC,
};
use mfn_data::{decode_rgb, Dataset, Error, ImageFolder, RecordDataset};

const M: [u8; 4] = MAGIC.to_le_bytes();

/// A frame as dmlc writes it, built by hand from the format description.
fn frame(cflag: u32, part: &[u8]) -> Vec<u8> {
    let mut v = M.to_vec();
    v.extend_from_slice(&((cflag << 29) | part.len() as u32).to_le_bytes());
    v.extend_from_slice(part);
    v.resize(v.len().next_multiple_of(4), 0);
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Payloads that exercise the framing: the magic word at aligned and unaligned positions
/// of the record, at its start and end, repeated, alone; every length modulo 4; empty.
fn tricky_payloads() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = vec![
        vec![],
        vec![1],
        vec![1, 2],
        vec![1, 2, 3],
        vec![1, 2, 3, 4],
        vec![1, 2, 3, 4, 5],
        M.to_vec(),
        cat(&[&M, &M]),
        cat(&[&M, &M, &M, &[9]]),
        cat(&[&[1, 2, 3, 4], &M, &[5, 6]]),
        cat(&[&[1, 2, 3, 4], &M]),
        cat(&[&[1], &M, &[2, 3, 4]]),
        cat(&[&[1, 2], &M]),
        cat(&[&[1, 2, 3], &M, &[0; 7]]),
        cat(&[&M, &[7; 4], &M, &[8; 5], &M[..3]]),
    ];
    // Pseudo-random bulk with magic words sprinkled at every residue modulo 4.
    let mut x = 0x9e37_79b9_u32;
    let mut big: Vec<u8> = (0..5000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    for at in [0usize, 101, 402, 1003, 2004, 4095, 4996] {
        big[at..at + 4].copy_from_slice(&M);
    }
    v.push(big);
    v
}

fn tricky_records() -> Vec<Record> {
    let mut records = Vec::new();
    for (i, p) in tricky_payloads().into_iter().enumerate() {
        let i = i as u64;
        records.push(Record::new(i as f32 + 0.5, 1000 + i, p.clone()));
        // One label makes the image start 4 bytes later: still aligned. Labels holding the
        // magic word's bit pattern are split too.
        records.push(Record::with_labels(
            vec![f32::from_bits(MAGIC)],
            i,
            p.clone(),
        ));
        records.push(Record::with_labels(vec![-1.0, 2.5, 1e9], i, p));
    }
    records.push(Record {
        header: IrHeader {
            flag: 0,
            label: -3.25,
            id: u64::MAX,
            id2: 0x0123_4567_89ab_cdef,
        },
        labels: vec![],
        payload: b"id2 set".to_vec(),
    });
    // An id whose low word is the magic: the split falls inside the header.
    records.push(Record::new(1.0, u64::from(MAGIC), vec![5; 3]));
    records
}

fn write_files(dir: &Path, records: &[(u64, Record)]) -> (PathBuf, PathBuf, Vec<u64>) {
    let rec = dir.join("data.rec");
    let idx = idx_path(&rec);
    let mut w = RecordWriter::create(&rec, Some(&idx)).unwrap();
    let offsets = records
        .iter()
        .map(|(k, r)| w.write(*k, r).unwrap())
        .collect();
    assert_eq!(w.len(), records.len());
    w.finish().unwrap();
    (rec, idx, offsets)
}

fn keyed(records: Vec<Record>) -> Vec<(u64, Record)> {
    // Keys out of order and not contiguous, as the .idx allows.
    records
        .into_iter()
        .enumerate()
        .map(|(i, r)| (((i as u64) * 7919) % 1009 + 3, r))
        .collect()
}

#[test]
fn round_trip_is_exact_by_index_key_and_in_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let records = keyed(tricky_records());
    let (rec, idx, offsets) = write_files(dir.path(), &records);

    let r = RecordReader::open(&rec, Some(&idx)).unwrap();
    assert_eq!(r.len(), records.len());
    assert_eq!(
        r.keys().collect::<Vec<_>>(),
        records.iter().map(|(k, _)| *k).collect::<Vec<_>>()
    );
    for (i, (key, want)) in records.iter().enumerate() {
        let mut want = want.clone();
        want.header.flag = want.labels.len() as u32;
        assert_eq!(r.location(i), Some((*key, offsets[i])));
        assert_eq!(r.read_at(i).unwrap(), want, "record {i} by position");
        assert_eq!(r.read_key(*key).unwrap(), want, "record {i} by key");
        assert_eq!(r.header_at(i).unwrap(), (want.header, want.labels.clone()));
        assert_eq!(unpack(&r.read_raw_at(i).unwrap()).unwrap(), want);
    }
    let seq: Vec<Record> = r.iter().collect::<Result<_, _>>().unwrap();
    assert_eq!(
        seq,
        r.keys()
            .enumerate()
            .map(|(i, _)| r.read_at(i).unwrap())
            .collect::<Vec<_>>()
    );

    // Without the .idx the file is scanned: same records, keys in file order.
    let scanned = RecordReader::open(&rec, None).unwrap();
    assert_eq!(scanned.len(), records.len());
    assert!(scanned.keys().eq(0..records.len() as u64));
    for (i, want) in seq.iter().enumerate() {
        assert_eq!(&scanned.read_at(i).unwrap(), want);
    }

    // In memory, through the bytes API, the same again.
    let mem =
        RecordReader::from_bytes(fs::read(&rec).unwrap(), Some(&fs::read(&idx).unwrap())).unwrap();
    assert_eq!(mem.iter().collect::<Result<Vec<_>, _>>().unwrap(), seq);
}

#[test]
fn readers_and_datasets_can_be_shared_between_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<RecordReader>();
    shared::<RecordDataset>();
    shared::<ImageFolder>();
    let r = RecordReader::from_bytes(two_records(), None).unwrap();
    let r = &r;
    let labels: Vec<f32> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|i| s.spawn(move || r.read_at(i).unwrap().header.label))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(labels, [1.0, 2.0]);
    let seq: Vec<f32> = r.into_iter().map(|x| x.unwrap().header.label).collect();
    assert_eq!(seq, [1.0, 2.0]);
}

#[test]
fn raw_payloads_round_trip_through_memory() {
    let payloads = tricky_payloads();
    let mut w = RecordWriter::new(Vec::new(), Some(Vec::new()));
    for (k, p) in payloads.iter().enumerate() {
        w.write_raw(k as u64, p).unwrap();
    }
    let (rec, idx) = w.finish().unwrap();
    let idx = idx.unwrap();
    assert_eq!(rec.len() % 4, 0, "frames are padded to 4 bytes");

    let r = RecordReader::from_bytes(rec.clone(), Some(&idx)).unwrap();
    for (i, p) in payloads.iter().enumerate() {
        assert_eq!(&r.read_raw_at(i).unwrap(), p, "payload {i}");
    }
    let seq: Vec<Vec<u8>> = r.iter_raw().map(|x| x.unwrap().1).collect();
    assert_eq!(seq, payloads);

    // dmlc's guarantee: every aligned magic word in the file starts a frame, so a reader
    // can resynchronise anywhere. Walk the frames and compare.
    let mut starts = Vec::new();
    let mut pos = 0;
    while pos < rec.len() {
        starts.push(pos);
        let lrec = u32::from_le_bytes(rec[pos + 4..pos + 8].try_into().unwrap());
        pos += 8 + ((lrec & ((1 << 29) - 1)) as usize).next_multiple_of(4);
    }
    let aligned: Vec<usize> = (0..rec.len())
        .step_by(4)
        .filter(|&i| rec[i..i + 4] == M)
        .collect();
    assert_eq!(aligned, starts);
}

#[test]
fn writer_frames_exactly_like_dmlc() {
    let write = |payload: &[u8]| {
        let mut w = RecordWriter::new(Vec::new(), None);
        w.write_raw(0, payload).unwrap();
        w.finish().unwrap().0
    };
    // Whole record, padded.
    assert_eq!(write(b"abcde"), frame(0, b"abcde"));
    assert_eq!(write(b""), frame(0, b""));
    // Magic at an aligned position: cut out, start + end parts.
    assert_eq!(
        write(&cat(&[b"abcd", &M, b"ef"])),
        cat(&[&frame(1, b"abcd"), &frame(3, b"ef")])
    );
    // Magic alone: an empty start part and an empty end part.
    assert_eq!(write(&M), cat(&[&frame(1, b""), &frame(3, b"")]));
    // Three magics: start, two middles, end.
    assert_eq!(
        write(&cat(&[&M, b"wxyz", &M, &M, b"q"])),
        cat(&[
            &frame(1, b""),
            &frame(2, b"wxyz"),
            &frame(2, b""),
            &frame(3, b"q")
        ])
    );
    // Unaligned magic stays inside one frame.
    let unaligned = cat(&[b"a", &M, b"bcd"]);
    assert_eq!(write(&unaligned), frame(0, &unaligned));
    // A magic in the last, partial word is not aligned within lower_align: not cut.
    let tail = cat(&[b"abcdef", &M]);
    assert_eq!(write(&tail), frame(0, &tail));
}

#[test]
fn pack_matches_mxnet_layout() {
    // struct.pack('IfQQ', 0, 3.0, 7, 9) + payload
    let packed = pack(&Record {
        header: IrHeader {
            flag: 0,
            label: 3.0,
            id: 7,
            id2: 9,
        },
        labels: vec![],
        payload: b"jpg".to_vec(),
    });
    let want = cat(&[
        &0u32.to_le_bytes(),
        &3.0f32.to_le_bytes(),
        &7u64.to_le_bytes(),
        &9u64.to_le_bytes(),
        b"jpg",
    ]);
    assert_eq!(packed, want);
    // Label array: flag = count, then the floats before the payload.
    let packed = pack(&Record::with_labels(vec![1.0, 2.0], 5, b"x".to_vec()));
    assert_eq!(&packed[..4], &2u32.to_le_bytes());
    assert_eq!(
        &packed[24..32],
        &cat(&[&1f32.to_le_bytes(), &2f32.to_le_bytes()])
    );
    assert_eq!(&packed[32..], b"x");
}

fn err_text<T: std::fmt::Debug>(r: Result<T, Error>) -> (Error, String) {
    let e = r.expect_err("expected an error");
    let s = e.to_string();
    (e, s)
}

fn two_records() -> Vec<u8> {
    let mut w = RecordWriter::new(Vec::new(), None);
    w.write(0, &Record::new(1.0, 0, b"first!".to_vec()))
        .unwrap();
    w.write(1, &Record::new(2.0, 1, b"second".to_vec()))
        .unwrap();
    w.finish().unwrap().0
}

#[test]
fn truncated_files_name_the_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let good = two_records();
    let second = 8 + (24usize + 6).next_multiple_of(4); // where record 1 starts: 40
    assert_eq!(second, 40);
    let cases: [(&str, usize, &str); 3] = [
        (
            "cut in the header",
            second + 5,
            "truncated record header: 5 byte(s) left",
        ),
        (
            "cut in the payload",
            second + 8 + 10,
            "only 10 byte(s) are left",
        ),
        (
            "cut in the padding",
            good.len() - 1,
            "(32 padded) but only 31 byte(s)",
        ),
    ];
    for (what, len, message) in cases {
        let path = dir.path().join(format!("{}.rec", what.replace(' ', "_")));
        fs::write(&path, &good[..len]).unwrap();
        let (e, s) = err_text(RecordReader::open(&path, None));
        assert!(
            matches!(e, Error::RecordIo { offset, .. } if offset == second as u64),
            "{what}: {e:?}"
        );
        assert!(
            s.starts_with(&format!("{}: byte 40: ", path.display())),
            "{what}: {s}"
        );
        assert!(s.contains(message), "{what}: {s}");

        // Reading in sequence gives record 0, then the error, then stops.
        let idx = dir.path().join("one.idx");
        fs::write(&idx, "0\t0\n").unwrap();
        let r = RecordReader::open(&path, Some(&idx)).unwrap();
        let items: Vec<_> = r.iter().collect();
        assert_eq!(items.len(), 2, "{what}");
        assert_eq!(items[0].as_ref().unwrap().payload, b"first!");
        assert!(items[1].as_ref().unwrap_err().to_string().contains(message));
    }
}

#[test]
fn bad_magic_and_bad_flags_are_errors() {
    let mut bytes = two_records();
    bytes[40] ^= 0xff;
    let (_, s) = err_text(RecordReader::from_bytes(bytes, None));
    assert_eq!(
        s,
        "<memory>: byte 40: bad magic 0xced723f5, expected 0xced7230a: not the start of a record"
    );

    // A continuation part where a record should start.
    let (_, s) = err_text(RecordReader::from_bytes(frame(2, b"abcd"), None));
    assert!(s.contains("byte 0: continuation part (flag 2)"), "{s}");
    // A new record inside a split one.
    let bytes = cat(&[&frame(1, b"abcd"), &frame(0, b"ef")]);
    let (_, s) = err_text(RecordReader::from_bytes(bytes, None));
    assert!(
        s.contains("byte 12: part with flag 0 inside the split record that starts at byte 0"),
        "{s}"
    );
    // A split record that never ends.
    let (_, s) = err_text(RecordReader::from_bytes(frame(1, b"abcd"), None));
    assert!(
        s.contains("byte 12: truncated record header: 0 byte(s) left"),
        "{s}"
    );
    // Flags 4..7 do not exist.
    let (_, s) = err_text(RecordReader::from_bytes(frame(5, b""), None));
    assert!(s.contains("byte 0: unknown continuation flag 5"), "{s}");
}

#[test]
fn huge_declared_lengths_are_errors_not_allocations() {
    let mut bytes = M.to_vec();
    bytes.extend_from_slice(&((1u32 << 29) - 1).to_le_bytes());
    bytes.extend_from_slice(&[0; 16]);
    let (_, s) = err_text(RecordReader::from_bytes(bytes, None));
    assert!(
        s.contains(
            "byte 0: record declares 536870911 payload byte(s) (536870912 padded) but only 16"
        ),
        "{s}"
    );

    // A header declaring four billion labels in a tiny record.
    let mut packed = pack(&Record::new(0.0, 0, b"img".to_vec()));
    packed[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut w = RecordWriter::new(Vec::new(), Some(Vec::new()));
    w.write_raw(0, b"pad").unwrap();
    w.write_raw(1, &packed).unwrap();
    let (rec, idx) = w.finish().unwrap();
    let r = RecordReader::from_bytes(rec, idx.as_deref()).unwrap();
    for s in [err_text(r.read_at(1)).1, err_text(r.header_at(1)).1] {
        assert!(
            s.contains("byte 12: header declares 4294967295 labels"),
            "{s}"
        );
        assert!(s.contains("(record 1 from <memory>.idx:2)"), "{s}");
    }
    // A record too short for the image header.
    let (_, s) = err_text(r.read_at(0));
    assert!(
        s.contains("byte 0: record is 3 byte(s), shorter than the 24-byte image record header"),
        "{s}"
    );
    assert!(r.read_raw_at(0).is_ok(), "raw reads do not need a header");
}

#[test]
fn idx_errors_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("two.rec");
    fs::write(&rec, two_records()).unwrap();
    let idx = dir.path().join("two.idx");
    let open = |text: &str| {
        fs::write(&idx, text).unwrap();
        RecordReader::open(&rec, Some(&idx))
    };
    let at = |line: usize| format!("{}:{line}: ", idx.display());
    let cases = [
        ("0\t0\n1\t80\n", 2, "offset 80 is past the end of"),
        (
            "0\t0\n1\t12345678901\n",
            2,
            "offset 12345678901 is past the end of",
        ),
        (
            "0\t0\n1\t76\n",
            2,
            "offset 76 leaves no room for a record header",
        ),
        (
            "0\t0\nfoo\n",
            2,
            "expected `index<TAB>offset`, found \"foo\"",
        ),
        ("0\t0\n\n1 40\n", 3, "expected `index<TAB>offset`"),
        ("0\t0\t9\n", 1, "expected `index<TAB>offset`"),
        ("x\t0\n", 1, "index \"x\" is not a non-negative integer"),
        ("-1\t0\n", 1, "index \"-1\" is not a non-negative integer"),
        ("0\t4O\n", 1, "offset \"4O\" is not a non-negative integer"),
        ("0\t0\n7\t40\n0\t40\n", 3, "index 0 repeats line 1"),
    ];
    for (text, line, message) in cases {
        let (e, s) = err_text(open(text));
        assert!(
            matches!(e, Error::RecordIndex { line: l, .. } if l == line),
            "{text:?}: {e:?}"
        );
        assert!(s.starts_with(&at(line)), "{text:?}: {s}");
        assert!(s.contains(message), "{text:?}: {s}");
    }
    // Windows line ends and a blank last line are fine.
    let r = open("0\t0\r\n1\t40\r\n\r\n").unwrap();
    assert_eq!(r.len(), 2);

    // An offset that is inside the file but not at a record: found when read.
    let r = open("0\t0\n1\t44\n2\t12\n").unwrap();
    assert_eq!(r.read_at(0).unwrap().payload, b"first!");
    for (i, off) in [(1, 44), (2, 12)] {
        let (e, s) = err_text(r.read_at(i));
        assert!(
            matches!(e, Error::RecordIo { offset, .. } if offset == off),
            "{e:?}"
        );
        assert!(
            s.starts_with(&format!("{}: byte {off}: bad magic", rec.display())),
            "{s}"
        );
        assert!(
            s.ends_with(&format!("(record {i} from {}:{})", idx.display(), i + 1)),
            "{s}"
        );
    }
    // Asking for what is not there.
    assert!(matches!(r.read_at(3), Err(Error::NoSuchItem { .. })));
    let (_, s) = err_text(r.read_key(9));
    assert!(s.contains("no record with index 9"), "{s}");
    // Non-UTF-8 text.
    let (_, s) = err_text(RecordReader::from_bytes(
        two_records(),
        Some(b"0\t0\n\xff\t1\n"),
    ));
    assert_eq!(s, "<memory>.idx:2: line is not UTF-8 text");
}

#[test]
fn empty_files_have_no_records() {
    let r = RecordReader::from_bytes(Vec::new(), None).unwrap();
    assert!(r.is_empty());
    assert!(r.iter().next().is_none());
    assert_eq!(r.insightface_header().unwrap(), None);
    let r = RecordReader::from_bytes(Vec::new(), Some(b"")).unwrap();
    assert!(r.is_empty());
    let (_, s) = err_text(RecordReader::from_bytes(Vec::new(), Some(b"0\t0\n")));
    assert!(
        s.contains("offset 0 is past the end of <memory> (0 bytes)"),
        "{s}"
    );
}

#[test]
fn missing_files_are_io_errors() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("absent.rec");
    let (e, s) = err_text(RecordReader::open(&rec, None));
    assert!(
        matches!(e, Error::Io { ref path, .. } if *path == rec),
        "{e:?}"
    );
    assert!(s.contains("absent.rec"));
    fs::write(&rec, two_records()).unwrap();
    let idx = dir.path().join("absent.idx");
    let (e, _) = err_text(RecordReader::open(&rec, Some(&idx)));
    assert!(
        matches!(e, Error::Io { ref path, .. } if *path == idx),
        "{e:?}"
    );
}

#[test]
fn writer_refuses_repeated_keys() {
    let mut w = RecordWriter::new(Vec::new(), Some(Vec::new()));
    w.write_raw(5, b"a").unwrap();
    let (_, s) = err_text(w.write_raw(5, b"b"));
    assert_eq!(s, "<memory>.idx:2: index 5 is already written");
}

/// A temp folder of real LFW faces: three classes created out of sorted order, one image
/// turned into a PNG, plus files that are not images.
fn face_folder(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    let lfw = asset("lfw/aligned-112x112");
    let picks = [
        ("zeta", "Abdullah_Gul", &[1, 2, 3][..]),
        ("Alpha", "Aaron_Peirsol", &[1, 2][..]),
        ("beta", "Abel_Pacheco", &[1][..]),
    ];
    let mut copied = Vec::new();
    for (class, person, numbers) in picks {
        let to = dir.join(class);
        fs::create_dir_all(&to).unwrap();
        for n in numbers {
            let name = format!("{person}_{n:04}.jpg");
            let from = lfw.join(person).join(&name);
            let dest = to.join(&name);
            fs::copy(&from, &dest).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
            copied.push((dest, class));
        }
        fs::write(to.join("notes.txt"), "not an image").unwrap();
        fs::write(to.join("._hidden.jpg"), "AppleDouble junk").unwrap();
    }
    // A PNG in class Alpha, sorting before the JPEGs by name.
    let png = dir.join("Alpha/0_converted.PNG");
    decode_rgb(&copied[0].0)
        .unwrap()
        .save_with_format(&png, image::ImageFormat::Png)
        .unwrap();
    copied.push((png, "Alpha"));
    fs::write(dir.join("README"), "a file at the top is not a class").unwrap();
    copied
}

#[test]
fn image_folder_numbers_classes_in_sorted_order() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("faces");
    face_folder(&root);
    let folder = ImageFolder::open(&root).unwrap();
    assert_eq!(folder.classes(), ["Alpha", "beta", "zeta"]);
    assert_eq!(folder.num_classes(), 3);
    let names: Vec<(String, usize)> = folder
        .samples()
        .iter()
        .map(|(p, c)| (p.file_name().unwrap().to_string_lossy().into_owned(), *c))
        .collect();
    let want = [
        ("0_converted.PNG", 0),
        ("Aaron_Peirsol_0001.jpg", 0),
        ("Aaron_Peirsol_0002.jpg", 0),
        ("Abel_Pacheco_0001.jpg", 1),
        ("Abdullah_Gul_0001.jpg", 2),
        ("Abdullah_Gul_0002.jpg", 2),
        ("Abdullah_Gul_0003.jpg", 2),
    ];
    assert_eq!(names, want.map(|(n, c)| (n.to_string(), c)));
    assert_eq!(folder.len(), 7);
    for (i, (path, class)) in folder.samples().iter().enumerate() {
        let (img, c) = folder.get(i).unwrap();
        assert_eq!(c, *class);
        assert_eq!(img.dimensions(), (112, 112));
        assert_eq!(img, decode_rgb(path).unwrap());
    }
    // The PNG holds the same pixels as the JPEG it was made from.
    assert_eq!(folder.get(0).unwrap().0, folder.get(4).unwrap().0);
    assert!(matches!(folder.get(7), Err(Error::NoSuchItem { .. })));
}

#[test]
fn image_folder_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (e, _) = err_text(ImageFolder::open(&dir.path().join("missing")));
    assert!(matches!(e, Error::Io { .. }), "{e:?}");

    let (e, s) = err_text(ImageFolder::open(dir.path()));
    assert!(matches!(e, Error::ImageFolder { .. }), "{e:?}");
    assert!(s.contains("no class folders"), "{s}");

    let empty = dir.path().join("someone");
    fs::create_dir(&empty).unwrap();
    fs::write(empty.join("notes.txt"), "x").unwrap();
    let (e, s) = err_text(ImageFolder::open(dir.path()));
    assert!(
        matches!(e, Error::ImageFolder { ref path, .. } if *path == empty),
        "{e:?}"
    );
    assert!(s.contains("class folder holds no images"), "{s}");
}

#[test]
fn folder_to_rec_to_dataset_gives_the_same_images_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("faces");
    face_folder(&root);
    let folder = ImageFolder::open(&root).unwrap();
    let rec = dir.path().join("train.rec");
    let idx = idx_path(&rec);
    let header = folder.write_record_file(&rec, &idx).unwrap();
    assert_eq!(
        header,
        InsightfaceHeader {
            images: 1..8,
            identities: 8..11
        }
    );

    // insightface's layout, read back record by record.
    let r = RecordReader::open(&rec, Some(&idx)).unwrap();
    assert_eq!(r.len(), 11);
    assert_eq!(r.insightface_header().unwrap(), Some(header.clone()));
    let r0 = r.read_key(0).unwrap();
    assert_eq!(
        (r0.header.flag, r0.labels.as_slice()),
        (2, &[8.0, 11.0][..])
    );
    let ranges: Vec<Vec<f32>> = (8..11).map(|k| r.read_key(k).unwrap().labels).collect();
    assert_eq!(ranges, [vec![1.0, 4.0], vec![4.0, 5.0], vec![5.0, 8.0]]);
    for k in 1..8 {
        let rec = r.read_key(k).unwrap();
        assert_eq!(rec.header.id, k);
        assert_eq!(
            rec.payload,
            fs::read(&folder.samples()[k as usize - 1].0).unwrap()
        );
    }

    for ds in [
        RecordDataset::open(&rec, Some(&idx)).unwrap(),
        RecordDataset::open(&rec, None).unwrap(),
    ] {
        assert_eq!(ds.insightface_header(), Some(&header));
        assert_eq!(ds.len(), folder.len());
        assert_eq!(ds.num_classes(), 3);
        for i in 0..folder.len() {
            let (a, ca) = folder.get(i).unwrap();
            let (b, cb) = ds.get(i).unwrap();
            assert_eq!(ca, cb, "label of image {i}");
            assert!(a == b, "pixels of image {i}");
        }
        assert!(matches!(ds.get(7), Err(Error::NoSuchItem { .. })));
    }
}

#[test]
fn record_dataset_without_header_counts_classes_from_labels() {
    let lfw = asset("lfw/aligned-112x112");
    let jpg = fs::read(lfw.join("Aaron_Peirsol/Aaron_Peirsol_0001.jpg")).unwrap();
    let mut w = RecordWriter::new(Vec::new(), Some(Vec::new()));
    w.write(10, &Record::new(4.0, 0, jpg.clone())).unwrap();
    // arcface_torch takes the first of a label array as the class.
    w.write(11, &Record::with_labels(vec![1.0, 77.0], 0, jpg.clone()))
        .unwrap();
    let (rec, idx) = w.finish().unwrap();
    let ds = RecordDataset::new(RecordReader::from_bytes(rec, idx.as_deref()).unwrap()).unwrap();
    assert_eq!(ds.insightface_header(), None);
    assert_eq!((ds.len(), ds.num_classes()), (2, 5));
    assert_eq!(ds.get(0).unwrap().1, 4);
    assert_eq!(ds.get(1).unwrap().1, 1);
    assert_eq!(
        ds.get(0).unwrap().0,
        decode_rgb(&lfw.join("Aaron_Peirsol/Aaron_Peirsol_0001.jpg")).unwrap()
    );

    // A label that is no class number is an error at that record, found when opening.
    let mut w = RecordWriter::new(Vec::new(), None);
    w.write(0, &Record::new(0.0, 0, jpg.clone())).unwrap();
    w.write(1, &Record::new(2.5, 0, jpg.clone())).unwrap();
    let (rec, _) = w.finish().unwrap();
    let second = 8 + (24 + jpg.len()).next_multiple_of(4);
    let (_, s) = err_text(RecordDataset::new(
        RecordReader::from_bytes(rec, None).unwrap(),
    ));
    assert_eq!(
        s,
        format!("<memory>: byte {second}: record 1: label 2.5 is not a class number")
    );

    // An image that does not decode names its record.
    let mut w = RecordWriter::new(Vec::new(), None);
    w.write(0, &Record::new(0.0, 0, jpg[..jpg.len() / 2].to_vec()))
        .unwrap();
    let (rec, _) = w.finish().unwrap();
    let ds = RecordDataset::new(RecordReader::from_bytes(rec, None).unwrap()).unwrap();
    let (e, s) = err_text(ds.get(0));
    assert!(matches!(e, Error::RecordIo { offset: 0, .. }), "{e:?}");
    assert!(
        s.starts_with("<memory>: byte 0: record 0: cannot decode image: truncated JPEG"),
        "{s}"
    );
}

#[test]
fn insightface_header_checks() {
    let header = |labels: Vec<f32>, payload: Vec<u8>| {
        InsightfaceHeader::from_record(&Record::with_labels(labels, 0, payload))
    };
    assert_eq!(
        header(vec![3.0, 5.0], vec![]),
        Some(InsightfaceHeader {
            images: 1..3,
            identities: 3..5
        })
    );
    assert_eq!(
        header(vec![3.0, 5.0], vec![1]),
        None,
        "an image is no header"
    );
    assert_eq!(header(vec![3.0, 5.0, 1.0], vec![]), None);
    assert_eq!(header(vec![3.5, 5.0], vec![]), None);
    assert_eq!(header(vec![5.0, 3.0], vec![]), None);
    assert_eq!(header(vec![0.0, 3.0], vec![]), None);
    assert_eq!(header(vec![f32::NAN, 3.0], vec![]), None);
    assert_eq!(
        InsightfaceHeader::from_record(&Record::new(3.0, 0, vec![])),
        None
    );

    // A header naming images the file lacks.
    let mut w = RecordWriter::new(Vec::new(), Some(Vec::new()));
    let h = InsightfaceHeader {
        images: 1..3,
        identities: 3..4,
    };
    w.write(0, &h.record()).unwrap();
    w.write(1, &Record::new(0.0, 1, vec![])).unwrap();
    let (rec, idx) = w.finish().unwrap();
    let (_, s) = err_text(RecordDataset::new(
        RecordReader::from_bytes(rec, idx.as_deref()).unwrap(),
    ));
    assert_eq!(
        s,
        "<memory>.idx: the insightface header names images 1..3 but there is no record 2"
    );
}

#[test]
fn write_insightface_into_memory() {
    let dir = tempfile::tempdir().unwrap();
    face_folder(dir.path());
    let folder = ImageFolder::open(dir.path()).unwrap();
    let mut w = RecordWriter::new(Vec::new(), Some(Vec::new()));
    let header = write_insightface(&folder, &mut w).unwrap();
    assert_eq!(w.len(), 11);
    let (rec, idx) = w.finish().unwrap();
    let ds = RecordDataset::new(RecordReader::from_bytes(rec, idx.as_deref()).unwrap()).unwrap();
    assert_eq!(ds.insightface_header(), Some(&header));
    assert_eq!(ds.get(6).unwrap().1, 2);
}

#[test]
fn lfw_identities_filter_and_hold_out() {
    let root = asset("lfw/aligned-112x112");
    let all = ImageFolder::open(&root).unwrap();
    assert_eq!(all.classes().len(), 5749);
    assert_eq!(all.samples().len(), 13_233);
    let ten = all.with_min_images(10).unwrap();
    // LFW's well-known subset: 158 people with at least 10 images each.
    assert_eq!(ten.classes().len(), 158);
    assert_eq!(ten.samples().len(), 4324);
    assert_eq!(ten.num_classes(), 158);
    assert!(ten.samples().iter().all(|(_, c)| *c < 158));
    let (train, held) = ten.clone().hold_out(20).unwrap();
    assert_eq!((train.classes().len(), held.classes().len()), (138, 20));
    assert_eq!(train.samples().len() + held.samples().len(), 4324);
    assert!(held.classes().iter().all(|c| !train.classes().contains(c)));
    // Class numbers are dense again on both sides.
    assert_eq!(held.samples().iter().map(|(_, c)| *c).max(), Some(19));
    assert!(ten.clone().hold_out(0).is_err());
    assert!(ten.clone().hold_out(158).is_err());
    assert!(ten.with_min_images(10_000).is_err());
}
