//! The MXNet RecordIO reader on arbitrary `.rec` bytes and `.idx` text: every read must
//! return, never panic; and any bytes written as a record must read back unchanged.
//!
//! Input layout, so that a real `.rec` file is a useful seed after one leading byte:
//! byte 0 bit 0 set means an `.idx` follows as a little-endian `u16` length and that many
//! bytes; the rest is the `.rec`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mfn_data::recordio::{RecordReader, RecordWriter};
use mfn_data::{Dataset, RecordDataset};

/// Enough reads to cover every code path without spending the run on long inputs.
const READS: usize = 16;

fn split(data: &[u8]) -> (Option<&[u8]>, &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return (None, data);
    };
    if flags & 1 == 0 || rest.len() < 2 {
        return (None, rest);
    }
    let n = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
    (Some(&rest[2..2 + n]), &rest[2 + n..])
}

fuzz_target!(|data: &[u8]| {
    let (idx, rec) = split(data);

    if let Ok(reader) = RecordReader::from_bytes(rec.to_vec(), idx) {
        for i in 0..reader.len().min(READS) {
            let _ = reader.read_at(i);
            let _ = reader.header_at(i);
            let _ = reader.read_raw_at(i);
        }
        let _ = reader.read_at(reader.len());
        let _ = reader.read_key(u64::MAX);
        let _ = reader.insightface_header();
        for record in reader.iter().take(READS) {
            let _ = record;
        }
        if let Ok(set) = RecordDataset::new(reader) {
            for i in 0..set.len().min(2) {
                if let Ok((_, class)) = set.get(i) {
                    assert!(class < set.num_classes(), "class {class} out of range");
                }
            }
        }
    }

    // Whatever the bytes are, as a payload they must survive dmlc's framing exactly,
    // read by index and in sequence.
    let mut writer = RecordWriter::new(Vec::new(), Some(Vec::new()));
    writer.write_raw(0, rec).expect("writing to memory");
    writer.write_raw(1, b"next").expect("writing to memory");
    let (bytes, idx) = writer.finish().expect("writing to memory");
    let reader = RecordReader::from_bytes(bytes, idx.as_deref()).expect("reading what was written");
    assert_eq!(reader.len(), 2);
    assert_eq!(reader.read_raw_at(0).expect("record 0"), rec);
    assert_eq!(reader.read_raw_at(1).expect("record 1"), b"next");
    let seq: Vec<Vec<u8>> = reader
        .iter_raw()
        .map(|r| r.expect("sequential read").1)
        .collect();
    assert_eq!(seq, [rec, b"next"]);
});
