//! A component's tensors in the canonical layout, as views of mapped files.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;

use crate::dtype::DType;
use crate::file::Storage;
use crate::spec::ShapeMap;
use crate::LoadError;

/// A byte range of some storage.
#[derive(Clone)]
pub(crate) struct Part {
    pub storage: Arc<Storage>,
    pub range: Range<usize>,
}

impl Part {
    fn bytes(&self) -> &[u8] {
        &self.storage.bytes()[self.range.clone()]
    }
}

/// One canonical tensor: the row-major concatenation of `parts` (one part for a renamed
/// tensor; several for a fused `qkv` or a swapped adaLN).
#[derive(Clone)]
pub(crate) struct Entry {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub parts: Vec<Part>,
    /// Where it came from, for messages: "`stored.name` in FILE".
    pub origin: String,
}

/// The tensors of one component (mmdit, vae, ...) under canonical names.
/// Cheap to clone (tensor data is shared).
#[derive(Clone, Default)]
pub struct Component {
    pub(crate) tensors: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Component")
            .field("tensors", &self.tensors.len())
            .field("params", &self.param_count())
            .finish()
    }
}

impl Component {
    /// Canonical names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|e| e.shape.as_slice())
    }

    /// Stored dtype of `name`.
    pub fn dtype(&self, name: &str) -> Option<DType> {
        self.tensors.get(name).map(|e| e.dtype)
    }

    /// Where `name` was read from: "`stored.name` in FILE".
    pub fn origin(&self, name: &str) -> Option<&str> {
        self.tensors.get(name).map(|e| e.origin.as_str())
    }

    /// All names and shapes.
    pub fn shapes(&self) -> ShapeMap {
        self.tensors
            .iter()
            .map(|(n, e)| (n.clone(), e.shape.clone()))
            .collect()
    }

    /// Number of tensors per stored dtype.
    pub fn dtype_counts(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for e in self.tensors.values() {
            *m.entry(e.dtype.as_str()).or_insert(0) += 1;
        }
        m
    }

    /// Total element count.
    pub fn param_count(&self) -> usize {
        self.tensors
            .values()
            .map(|e| e.shape.iter().product::<usize>())
            .sum()
    }

    /// Bytes the stored tensors take (sum of their byte lengths).
    pub fn stored_bytes(&self) -> usize {
        self.tensors
            .values()
            .map(|e| e.shape.iter().product::<usize>() * e.dtype.size())
            .sum()
    }

    fn entry(&self, name: &str) -> Result<&Entry, LoadError> {
        self.tensors
            .get(name)
            .ok_or_else(|| LoadError::NoSuchTensor(name.to_string()))
    }

    /// The stored bytes of `name` (little-endian) and their dtype: a view of the mapped
    /// file when the tensor is stored in one piece, else a concatenated copy.
    pub fn raw(&self, name: &str) -> Result<(DType, Cow<'_, [u8]>), LoadError> {
        let e = self.entry(name)?;
        let bytes = match e.parts.as_slice() {
            [one] => Cow::Borrowed(one.bytes()),
            parts => Cow::Owned(parts.iter().flat_map(|p| p.bytes()).copied().collect()),
        };
        Ok((e.dtype, bytes))
    }

    /// `name` as f32: a zero-copy view of the mapped file when it is stored as one
    /// 4-byte-aligned F32 piece (on little-endian hosts), else converted from F16/BF16
    /// or concatenated.
    pub fn f32(&self, name: &str) -> Result<Cow<'_, [f32]>, LoadError> {
        let e = self.entry(name)?;
        if let ([one], DType::F32, true) =
            (e.parts.as_slice(), e.dtype, cfg!(target_endian = "little"))
        {
            if let Ok(v) = bytemuck::try_cast_slice::<u8, f32>(one.bytes()) {
                return Ok(Cow::Borrowed(v));
            }
        }
        let n: usize = e.shape.iter().product();
        let mut out = Vec::with_capacity(n);
        for p in &e.parts {
            if !e.dtype.decode_into(p.bytes(), &mut out) {
                return Err(LoadError::Config(format!(
                    "tensor `{name}` ({}): dtype {} cannot be read as f32",
                    e.origin, e.dtype
                )));
            }
        }
        Ok(Cow::Owned(out))
    }

    /// Builds a component from in-memory f32 tensors (tests).
    pub fn from_f32(tensors: HashMap<String, (Vec<usize>, Vec<f32>)>) -> Result<Self, LoadError> {
        let raw = tensors
            .into_iter()
            .map(|(name, (shape, values))| {
                let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                (name, shape, DType::F32, bytes)
            })
            .collect();
        Self::from_raw(raw)
    }

    /// Builds a component from in-memory little-endian tensors of any weight dtype.
    pub fn from_raw(tensors: Vec<(String, Vec<usize>, DType, Vec<u8>)>) -> Result<Self, LoadError> {
        let mut c = Component::default();
        for (name, shape, dtype, bytes) in tensors {
            let need = shape.iter().product::<usize>() * dtype.size();
            if need != bytes.len() {
                return Err(LoadError::Config(format!(
                    "tensor `{name}`: shape {shape:?} of {dtype} needs {need} bytes, got {}",
                    bytes.len()
                )));
            }
            let len = bytes.len();
            let entry = Entry {
                dtype,
                shape,
                parts: vec![Part {
                    storage: Arc::new(Storage::Owned(bytes)),
                    range: 0..len,
                }],
                origin: "memory".into(),
            };
            if c.tensors.insert(name.clone(), entry).is_some() {
                return Err(LoadError::Duplicate {
                    name,
                    first: "memory".into(),
                    second: "memory".into(),
                });
            }
        }
        Ok(c)
    }
}
