//! Reading a `.safetensors` file: an 8-byte little-endian header length, a JSON header, then the
//! tensor bytes.
//!
//! We parse the header ourselves rather than through the `safetensors` crate so that every defect
//! can be reported with the tensor it concerns and so that duplicate keys (which serde's maps
//! silently merge) are caught. The rules are the format's: offsets are relative to the end of the
//! header, every tensor's byte length equals its element count times the element size, and the
//! tensors tile the data area exactly, with no overlap, hole or trailing bytes.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{bail, Context, Result};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::dtype::DType;

/// Largest header we accept, as the reference implementation does (100 MB). It is checked before
/// anything is allocated.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor's entry in the header.
#[derive(Clone, Debug)]
pub struct HeaderTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Byte range in the file (already shifted past the header).
    pub start: usize,
    pub end: usize,
}

#[derive(Debug, Default)]
pub struct Header {
    /// Tensors in the order of their data.
    pub tensors: Vec<HeaderTensor>,
    pub metadata: BTreeMap<String, String>,
    /// Bytes before the data area (8 + header length).
    pub data_start: usize,
}

/// A JSON object read in document order, keeping duplicates so that we can refuse them.
struct OrderedObject(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for OrderedObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedObject;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = m.next_entry::<String, serde_json::Value>()? {
                    v.push((k, val));
                }
                Ok(OrderedObject(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// Element count of `shape`, or `None` when it overflows.
pub fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Parses and validates the header of a safetensors file whose whole content is `bytes`
/// (typically a memory map). Nothing is allocated in proportion to what the header claims before
/// that claim is checked against the file's real size.
pub fn parse_header(bytes: &[u8]) -> Result<Header> {
    let file_len = bytes.len() as u64;
    if file_len < 8 {
        bail!("truncated: {file_len} bytes, too short for a safetensors header");
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    if n > MAX_HEADER_LEN {
        bail!("header length {n} bytes is over the {MAX_HEADER_LEN}-byte limit (not a safetensors file, or a damaged one)");
    }
    if n > file_len - 8 {
        bail!(
            "truncated in the header: header length {n} bytes, but only {} bytes follow",
            file_len - 8
        );
    }
    let data_start = 8 + n as usize;
    let text = std::str::from_utf8(&bytes[8..data_start]).context("header is not UTF-8")?;
    if !text.trim_start().starts_with('{') {
        bail!("header is not a JSON object (not a safetensors file?)");
    }
    let object: OrderedObject = serde_json::from_str(text.trim_end_matches([' ', '\0']))
        .map_err(|e| anyhow::anyhow!("header is not valid JSON: {e}"))?;

    let data_len = bytes.len() - data_start;
    let mut header = Header {
        data_start,
        ..Header::default()
    };
    let mut seen = std::collections::HashSet::new();
    for (name, value) in object.0 {
        if !seen.insert(name.clone()) {
            bail!("header lists tensor {name} twice");
        }
        if name == "__metadata__" {
            header.metadata = parse_metadata(&value)?;
            continue;
        }
        header
            .tensors
            .push(parse_entry(&name, &value, data_start, data_len)?);
    }
    header.tensors.sort_by_key(|t| (t.start, t.end));
    let mut expected = data_start;
    let mut previous: Option<&HeaderTensor> = None;
    for t in &header.tensors {
        if t.start < expected {
            let p = previous.map(|p| p.name.as_str()).unwrap_or("?");
            bail!(
                "tensor {} overlaps tensor {p} (data offsets {}..{} start before {})",
                t.name,
                t.start - data_start,
                t.end - data_start,
                expected - data_start
            );
        }
        if t.start > expected {
            bail!(
                "tensor {}: data offsets leave a hole of {} bytes before it",
                t.name,
                t.start - expected
            );
        }
        expected = t.end;
        previous = Some(t);
    }
    if expected != bytes.len() {
        bail!(
            "{} bytes after the last tensor are not covered by any tensor",
            bytes.len() - expected
        );
    }
    Ok(header)
}

fn parse_metadata(value: &serde_json::Value) -> Result<BTreeMap<String, String>> {
    let obj = value
        .as_object()
        .context("__metadata__ is not a JSON object")?;
    obj.iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k.clone(), s.clone())),
            _ => bail!("__metadata__ entry {k} is not a string"),
        })
        .collect()
}

fn parse_entry(
    name: &str,
    value: &serde_json::Value,
    data_start: usize,
    data_len: usize,
) -> Result<HeaderTensor> {
    let obj = value
        .as_object()
        .with_context(|| format!("tensor {name}: entry is not a JSON object"))?;
    let dtype_name = obj
        .get("dtype")
        .and_then(|d| d.as_str())
        .with_context(|| format!("tensor {name}: no dtype"))?;
    let dtype = DType::from_name(dtype_name)
        .with_context(|| format!("tensor {name}: unknown dtype {dtype_name}"))?;
    let shape = obj
        .get("shape")
        .and_then(|s| s.as_array())
        .with_context(|| format!("tensor {name}: no shape"))?
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .with_context(|| format!("tensor {name}: shape is not a list of non-negative integers"))?;
    let offsets = obj
        .get("data_offsets")
        .and_then(|o| o.as_array())
        .filter(|o| o.len() == 2)
        .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
        .with_context(|| format!("tensor {name}: data_offsets is not a pair of integers"))?;
    let numel = checked_numel(&shape).with_context(|| {
        format!("tensor {name}: shape {shape:?} has more elements than can be addressed")
    })?;
    let nbytes = numel.checked_mul(dtype.size()).with_context(|| {
        format!("tensor {name}: shape {shape:?} has more bytes than can be addressed")
    })?;
    let (b, e) = offsets;
    if b > e {
        bail!("tensor {name}: data offsets {b}..{e} run backwards");
    }
    if e > data_len as u64 {
        bail!("tensor {name}: data offsets {b}..{e} are out of range (the data area has {data_len} bytes; file truncated?)");
    }
    if (e - b) as usize != nbytes {
        bail!(
            "tensor {name}: data offsets {b}..{e} hold {} bytes, but {dtype} {shape:?} needs {nbytes}",
            e - b
        );
    }
    Ok(HeaderTensor {
        name: name.to_string(),
        dtype,
        shape,
        start: data_start + b as usize,
        end: data_start + e as usize,
    })
}

/// A serialised header (length prefix included) and each tensor's byte range in the data area.
pub type HeaderLayout = (Vec<u8>, Vec<(usize, usize)>);

/// Serialises a header for the given tensors, laid out back to back in the given order, padded
/// with spaces so that the data area starts on an 8-byte boundary. Returns the header bytes
/// (length prefix included) and each tensor's byte offset within the data area.
pub fn build_header(
    tensors: &[(&str, DType, &[usize])],
    metadata: &BTreeMap<String, String>,
) -> Result<HeaderLayout> {
    let mut map = serde_json::Map::new();
    if !metadata.is_empty() {
        map.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    }
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut pos = 0usize;
    for (name, dtype, shape) in tensors {
        let n = checked_numel(shape)
            .and_then(|n| n.checked_mul(dtype.size()))
            .with_context(|| format!("tensor {name}: shape {shape:?} is too large"))?;
        offsets.push((pos, pos + n));
        map.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [pos, pos + n]}),
        );
        pos += n;
    }
    let mut json = serde_json::to_vec(&map)?;
    while (json.len() + 8) % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(json.len() + 8);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok((out, offsets))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.resize(v.len() + data, 0);
        v
    }

    #[test]
    fn round_trip() {
        let meta = BTreeMap::from([("a".to_string(), "b".to_string())]);
        let (h, offs) =
            build_header(&[("x", DType::F32, &[2, 3]), ("y", DType::I64, &[])], &meta).unwrap();
        assert_eq!(h.len() % 8, 0);
        let mut bytes = h.clone();
        bytes.resize(h.len() + 24 + 8, 0);
        let parsed = parse_header(&bytes).unwrap();
        assert_eq!(parsed.metadata, meta);
        assert_eq!(parsed.tensors.len(), 2);
        assert_eq!(parsed.tensors[0].name, "x");
        assert_eq!(parsed.tensors[1].start - parsed.data_start, offs[1].0);
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let h = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        let err = parse_header(&file(h, 1)).unwrap_err().to_string();
        assert!(err.contains("twice"), "{err}");
    }

    #[test]
    fn overflowing_shape_is_refused() {
        let h = r#"{"a":{"dtype":"F64","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}}"#;
        let err = parse_header(&file(h, 8)).unwrap_err().to_string();
        assert!(err.contains("more elements"), "{err}");
    }
}
