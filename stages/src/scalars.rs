//! Step scalars: read from a training stage's `metrics` JSONL (one object per step, nested
//! objects flattened to dotted names), and written as TensorBoard event files.
//!
//! The event file writer is written here because no maintained crate does it: the Rust
//! TensorBoard writers on the registry are years stale and pull an old protobuf runtime
//! for three message types. The format is small and fixed (TensorFlow's
//! `core/util/event.proto`, `summary.proto` and the TFRecord framing of
//! `core/lib/io/record_writer.cc`): each record is its length (u64 LE), the masked
//! CRC-32C of those 8 bytes, the bytes, and their masked CRC-32C; the first event carries
//! `file_version: "brain.Event:2"`, the others a wall time, a step and a summary of
//! `simple_value` scalars. A test reads the files back with the `tensorboard` package.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// One scalar of one step.
#[derive(Debug, Clone, PartialEq)]
pub struct Scalar {
    /// Optimizer step.
    pub step: u64,
    /// Name (`loss`, `eval.eval_accuracy`).
    pub tag: String,
    /// Value.
    pub value: f64,
}

/// Dotted paths to the leaves of an object (arrays are leaves).
pub fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (k, x) in map {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, x, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// The finite numeric fields of each line that has a `step`, in file order; lines that are
/// not JSON objects with a step (a summary line, a blank) are passed over.
pub fn from_jsonl(text: &str) -> Vec<Scalar> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let Some(step) = v.get("step").and_then(Value::as_u64) else {
            continue;
        };
        let mut flat = BTreeMap::new();
        flatten("", &v, &mut flat);
        for (tag, x) in flat {
            if tag == "step" {
                continue;
            }
            if let Some(value) = x.as_f64().filter(|y| y.is_finite()) {
                out.push(Scalar { step, tag, value });
            }
        }
    }
    out
}

fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited protobuf field.
fn bytes_field(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// `Event { wall_time, step, file_version | summary }`.
fn event(wall_time: f64, step: Option<u64>, file_version: Option<&str>, summary: &[u8]) -> Vec<u8> {
    let mut e = Vec::new();
    e.push(0x09); // field 1, fixed64
    e.extend_from_slice(&wall_time.to_le_bytes());
    if let Some(s) = step {
        e.push(0x10); // field 2, varint
        varint(s, &mut e);
    }
    if let Some(v) = file_version {
        bytes_field(3, v.as_bytes(), &mut e);
    }
    if !summary.is_empty() {
        bytes_field(5, summary, &mut e);
    }
    e
}

/// `Summary { value: [Value { tag, simple_value }] }`.
fn summary(values: &[&Scalar]) -> Vec<u8> {
    let mut s = Vec::new();
    for v in values {
        let mut item = Vec::new();
        bytes_field(1, v.tag.as_bytes(), &mut item);
        item.push(0x15); // field 2, fixed32
        item.extend_from_slice(&(v.value as f32).to_le_bytes());
        bytes_field(1, &item, &mut s);
    }
    s
}

fn record(data: &[u8], out: &mut Vec<u8>) {
    let len = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
}

/// The bytes of an event file holding `scalars` (one event per step, in step order).
pub fn tfevents_bytes(scalars: &[Scalar], wall_time: f64) -> Vec<u8> {
    let mut out = Vec::new();
    record(
        &event(wall_time, None, Some("brain.Event:2"), &[]),
        &mut out,
    );
    let mut by_step: BTreeMap<u64, Vec<&Scalar>> = BTreeMap::new();
    for s in scalars {
        by_step.entry(s.step).or_default().push(s);
    }
    for (step, values) in by_step {
        record(
            &event(wall_time, Some(step), None, &summary(&values)),
            &mut out,
        );
    }
    out
}

/// Writes `scalars` as one event file in `dir` (created), named as TensorFlow names them
/// (`events.out.tfevents.<seconds>.<host>`), so `tensorboard --logdir` finds it.
pub fn write_tfevents(dir: &Path, scalars: &[Scalar]) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let path = dir.join(format!("events.out.tfevents.{}.pipe", now as u64));
    crate::fsio::write_atomic(&path, &tfevents_bytes(scalars, now))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the records back, checking both CRCs of each.
    fn records(mut b: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let len = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            assert_eq!(
                u32::from_le_bytes(b[8..12].try_into().unwrap()),
                masked_crc(&b[..8])
            );
            let data = &b[12..12 + len];
            assert_eq!(
                u32::from_le_bytes(b[12 + len..16 + len].try_into().unwrap()),
                masked_crc(data)
            );
            out.push(data.to_vec());
            b = &b[16 + len..];
        }
        out
    }

    #[test]
    fn crc32c_and_its_mask_are_tensorflows() {
        // The CRC-32C check value, and record_writer.cc's mask of it,
        // ((c >> 15) | (c << 17)) + 0xa282ead8, worked out by hand.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xC78A_B0E5);
    }

    #[test]
    fn events_are_framed_records_with_a_version_then_one_summary_per_step() {
        let s = from_jsonl(
            "{\"step\":1,\"loss\":2.5,\"lr\":0.1}\n{\"step\":2,\"loss\":2.0,\"eval\":{\"acc\":0.5}}\n{\"summary\":1}\n",
        );
        assert_eq!(s.len(), 4);
        assert_eq!(s[2].tag, "eval.acc");
        let recs = records(&tfevents_bytes(&s, 1.5));
        assert_eq!(recs.len(), 3);
        // First: wall_time (tag 0x09) then file_version (field 3).
        assert_eq!(recs[0][0], 0x09);
        assert_eq!(f64::from_le_bytes(recs[0][1..9].try_into().unwrap()), 1.5);
        assert!(recs[0].ends_with(b"brain.Event:2"));
        // Second: step 1 (0x10 0x01), a summary holding "loss" and 2.5 as f32.
        assert_eq!(&recs[1][9..11], &[0x10, 0x01]);
        let tail = &recs[1][11..];
        assert_eq!(tail[0], 0x2a);
        let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
        assert!(find(tail, b"loss"));
        assert!(find(tail, &2.5f32.to_le_bytes()));
        assert!(find(&recs[2], b"eval.acc"));
    }
}
