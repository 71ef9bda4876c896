//! Safetensors files: memory mapping, full header validation, writing.
//!
//! Format: 8-byte little-endian header length `N`, `N` bytes of UTF-8 JSON mapping each
//! tensor name to `{dtype, shape, data_offsets: [begin, end]}` (offsets relative to the
//! data section that follows the header) plus an optional `__metadata__` string map.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};

use crate::dtype::DType;
use crate::{io_err, LoadError};

/// Bytes backing tensors: a read-only file mapping or an owned buffer.
pub(crate) enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// One validated header entry. `range` is absolute within the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub range: Range<usize>,
}

/// A mapped safetensors file whose header has been fully validated.
pub struct SafetensorsFile {
    pub path: PathBuf,
    /// Header entries in data-offset order.
    pub tensors: Vec<TensorInfo>,
    /// The `__metadata__` map (empty when absent).
    pub metadata: BTreeMap<String, String>,
    pub(crate) storage: Arc<Storage>,
}

impl SafetensorsFile {
    /// Maps `path` and validates its header. Only the header pages are read.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let meta = std::fs::metadata(path).map_err(io_err(path))?;
        if meta.is_dir() {
            return Err(file_err(
                path,
                "is a directory, expected a .safetensors file",
            ));
        }
        let len = meta.len();
        if len < 8 {
            return Err(if len == 0 {
                file_err(path, "empty file, not a safetensors file")
            } else {
                file_err(
                    path,
                    format!("file of {len} bytes is too short for a safetensors header"),
                )
            });
        }
        let file = File::open(path).map_err(io_err(path))?;
        // SAFETY: the mapping is read-only and lives as long as every view into it (held by
        // `Arc<Storage>`). As with any mmap, the file must not be truncated or rewritten by
        // another process while dpir runs; dpir itself never writes files it has mapped
        // (`write_safetensors` writes a new file and renames it over the old one).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
        let (tensors, metadata) = parse_header(path, &mmap)?;
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
            metadata,
            storage: Arc::new(Storage::Mmap(mmap)),
        })
    }

    /// The bytes of one tensor (a view of the mapping).
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        &self.storage.bytes()[t.range.clone()]
    }
}

fn file_err(path: &Path, msg: impl Into<String>) -> LoadError {
    LoadError::File {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn tensor_err(path: &Path, name: &str, msg: impl Into<String>) -> LoadError {
    LoadError::Tensor {
        path: path.to_path_buf(),
        name: name.to_string(),
        msg: msg.into(),
    }
}

/// Header entries in file order, duplicates kept (a `HashMap` would hide them).
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some(e) = map.next_entry::<String, serde_json::Value>()? {
                    v.push(e);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(serde::Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

/// Validates a whole safetensors image (`bytes` = the file) without touching tensor data:
/// header length within the file, UTF-8 JSON object, no duplicate names, known dtypes
/// (FP8 refused), shape × dtype size = byte length, offsets within the data section and
/// no two tensors overlapping.
pub fn parse_header(
    path: &Path,
    bytes: &[u8],
) -> Result<(Vec<TensorInfo>, BTreeMap<String, String>), LoadError> {
    let file_len = bytes.len();
    let Some(len_bytes) = bytes.first_chunk::<8>() else {
        return Err(file_err(
            path,
            format!("file of {file_len} bytes is too short for a safetensors header"),
        ));
    };
    let n = u64::from_le_bytes(*len_bytes);
    let avail = (file_len - 8) as u64;
    if n > avail {
        return Err(file_err(
            path,
            format!("header length {n} runs past the end of the file ({file_len} bytes)"),
        ));
    }
    let n = n as usize;
    let data_start = 8 + n;
    let data_len = file_len - data_start;
    let text = std::str::from_utf8(&bytes[8..data_start]).map_err(|e| {
        file_err(
            path,
            format!("header is not valid UTF-8 (byte {})", e.valid_up_to()),
        )
    })?;
    let entries: Entries = serde_json::from_str(text)
        .map_err(|e| file_err(path, format!("header is not valid JSON: {e}")))?;

    let mut seen = std::collections::HashSet::new();
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(entries.0.len());
    for (name, value) in entries.0 {
        if !seen.insert(name.clone()) {
            return Err(tensor_err(path, &name, "listed twice in the header"));
        }
        if name == "__metadata__" {
            metadata = serde_json::from_value(value)
                .map_err(|e| file_err(path, format!("`__metadata__` is not a string map: {e}")))?;
            continue;
        }
        let raw: RawInfo = serde_json::from_value(value)
            .map_err(|e| tensor_err(path, &name, format!("bad header entry: {e}")))?;
        let dtype = DType::parse(&raw.dtype)
            .ok_or_else(|| tensor_err(path, &name, format!("unknown dtype `{}`", raw.dtype)))?;
        if dtype.is_f8() {
            return Err(tensor_err(
                path,
                &name,
                format!("dtype {dtype} is not supported yet (convert the checkpoint to BF16, F16 or F32)"),
            ));
        }
        let [begin, end] = raw.data_offsets;
        if begin > end {
            return Err(tensor_err(
                path,
                &name,
                format!("data offsets [{begin}, {end}] are reversed"),
            ));
        }
        if end > data_len {
            return Err(tensor_err(
                path,
                &name,
                format!("data offsets [{begin}, {end}] run past the end of the data section ({data_len} bytes; truncated file?)"),
            ));
        }
        let need = raw
            .shape
            .iter()
            .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d));
        if need != Some(end - begin) {
            let need = need.map_or("more than usize::MAX".to_string(), |v| v.to_string());
            return Err(tensor_err(
                path,
                &name,
                format!(
                    "shape {:?} of {dtype} needs {need} bytes but data offsets [{begin}, {end}] hold {}",
                    raw.shape,
                    end - begin
                ),
            ));
        }
        tensors.push(TensorInfo {
            name,
            dtype,
            shape: raw.shape,
            range: data_start + begin..data_start + end,
        });
    }
    tensors.sort_by_key(|t| (t.range.start, t.range.end));
    for w in tensors.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if b.range.start < a.range.end {
            return Err(file_err(
                path,
                format!(
                    "tensors `{}` [{}, {}] and `{}` [{}, {}] overlap",
                    a.name,
                    a.range.start - data_start,
                    a.range.end - data_start,
                    b.name,
                    b.range.start - data_start,
                    b.range.end - data_start
                ),
            ));
        }
    }
    Ok((tensors, metadata))
}

/// Writes a safetensors file: `(name, shape, dtype, little-endian bytes)` per tensor, in
/// the given order. Writes `PATH.tmp` next to it first and renames it into place.
pub fn write_safetensors<N: AsRef<str>, B: AsRef<[u8]>>(
    path: &Path,
    tensors: &[(N, Vec<usize>, DType, B)],
) -> Result<(), LoadError> {
    write_safetensors_with_metadata(path, tensors, &BTreeMap::new())
}

/// [`write_safetensors`] with a `__metadata__` string map.
pub fn write_safetensors_with_metadata<N: AsRef<str>, B: AsRef<[u8]>>(
    path: &Path,
    tensors: &[(N, Vec<usize>, DType, B)],
    metadata: &BTreeMap<String, String>,
) -> Result<(), LoadError> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let m = metadata
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(m));
    }
    let mut offset = 0usize;
    for (name, shape, dtype, data) in tensors {
        let name = name.as_ref();
        let len = data.as_ref().len();
        let need = shape.iter().product::<usize>() * dtype.size();
        if need != len {
            return Err(tensor_err(
                path,
                name,
                format!("shape {shape:?} of {dtype} needs {need} bytes, got {len}"),
            ));
        }
        let entry = serde_json::json!({
            "dtype": dtype.as_str(),
            "shape": shape,
            "data_offsets": [offset, offset + len],
        });
        if header.insert(name.to_string(), entry).is_some() || name == "__metadata__" {
            return Err(tensor_err(path, name, "written twice"));
        }
        offset += len;
    }
    let mut json = serde_json::to_string(&header)
        .map_err(|e| file_err(path, format!("cannot encode header: {e}")))?
        .into_bytes();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let write = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(File::create(&tmp)?);
        f.write_all(&(json.len() as u64).to_le_bytes())?;
        f.write_all(&json)?;
        for (_, _, _, data) in tensors {
            f.write_all(data.as_ref())?;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        LoadError::Io {
            path: path.to_path_buf(),
            source: e,
        }
    })
}

/// Writes f32 tensors stored as `dtype` (`F32`, `F16` or `BF16`).
pub fn write_f32_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    dtype: DType,
) -> Result<(), LoadError> {
    let encoded = tensors
        .iter()
        .map(|(name, shape, values)| {
            let bytes = dtype.encode_f32(values).ok_or_else(|| {
                tensor_err(path, name, format!("cannot store f32 values as {dtype}"))
            })?;
            Ok((name.clone(), shape.clone(), dtype, bytes))
        })
        .collect::<Result<Vec<_>, LoadError>>()?;
    write_safetensors(path, &encoded)
}
