//! Loading checkpoints into a [`Model`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::component::{Component, Entry, Part};
use crate::config::{ClipVisionConfig, DpirConfig, MmditConfig, VaeConfig};
use crate::file::{SafetensorsFile, TensorInfo};
use crate::layout::{classify, Comp, FileKind, Hints, Op, Target};
use crate::spec::{
    check_spec, clip_vision_spec, detect_clip_vision, detect_dpir, detect_mmdit, detect_vae,
    dpir_spec, mmdit_spec, vae_spec,
};
use crate::{io_err, LoadError};

/// Which source layout a component was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Layout {
    /// SD3 original names, optionally under a prefix (`model.diffusion_model.`,
    /// `first_stage_model.`); LDM names for the VAE.
    Original { prefix: &'static str },
    /// diffusers `SD3Transformer2DModel` / `AutoencoderKL` names.
    Diffusers,
    /// Hugging Face `CLIPVisionModel` names.
    HfClipVision,
    /// DPIR's own names (`docs/WEIGHTS.md`).
    Dpir,
}

/// One component: its detected config, its tensors (canonical names) and the layout read.
#[derive(Debug, Clone)]
pub struct Loaded<C> {
    pub config: C,
    pub weights: Component,
    pub layout: Layout,
    /// Files the tensors came from.
    pub files: Vec<PathBuf>,
}

/// Tensors that were recognised and skipped (text encoders), per group.
#[derive(Debug, Clone, PartialEq)]
pub struct Ignored {
    /// `text_encoders.clip_l`, `conditioner`, a diffusers sub-folder, ...
    pub group: String,
    pub tensors: usize,
    pub params: usize,
}

/// Everything found in the given paths.
#[derive(Debug, Clone, Default)]
pub struct Model {
    pub mmdit: Option<Loaded<MmditConfig>>,
    pub vae: Option<Loaded<VaeConfig>>,
    pub clip_vision: Option<Loaded<ClipVisionConfig>>,
    pub dpir: Option<Loaded<DpirConfig>>,
    /// DPIR's robust VAE encoder, under canonical `encoder.*` names.
    pub robust_encoder: Option<Loaded<VaeConfig>>,
    pub ignored: Vec<Ignored>,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Layout::Original { prefix: "" } => f.write_str("original (SD3 / LDM names)"),
            Layout::Original { prefix } => write!(f, "original (SD3 / LDM names under `{prefix}`)"),
            Layout::Diffusers => f.write_str("diffusers"),
            Layout::HfClipVision => f.write_str("Hugging Face CLIPVisionModel"),
            Layout::Dpir => f.write_str("dpir"),
        }
    }
}

/// Config values that shapes cannot show, read from `config.json` files when present.
#[derive(Debug, Clone, Copy, Default)]
struct ConfigHints {
    clip_heads: Option<usize>,
    clip_eps: Option<f32>,
    vae_groups: Option<usize>,
    vae_scale: Option<f32>,
    vae_shift: Option<f32>,
}

impl ConfigHints {
    fn read(&mut self, path: &Path) -> Result<(), LoadError> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| LoadError::File {
            path: path.to_path_buf(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let usize_of =
            |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize);
        let f32_of =
            |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_f64()).map(|x| x as f32);
        let model_type = v.get("model_type").and_then(|x| x.as_str()).unwrap_or("");
        let vision = if let Some(vc) = v.get("vision_config") {
            Some(vc)
        } else if model_type == "clip_vision_model" {
            Some(&v)
        } else {
            None
        };
        if let Some(vc) = vision {
            self.clip_heads = usize_of(vc, "num_attention_heads").or(self.clip_heads);
            self.clip_eps = f32_of(vc, "layer_norm_eps").or(self.clip_eps);
        }
        if v.get("_class_name").and_then(|x| x.as_str()) == Some("AutoencoderKL") {
            self.vae_groups = usize_of(&v, "norm_num_groups").or(self.vae_groups);
            self.vae_scale = f32_of(&v, "scaling_factor").or(self.vae_scale);
            self.vae_shift = f32_of(&v, "shift_factor").or(self.vae_shift);
        }
        Ok(())
    }
}

/// Everything gathered from the paths before mapping.
#[derive(Default)]
struct Gathered {
    files: Vec<SafetensorsFile>,
    hints: ConfigHints,
    ignored_folders: Vec<String>,
}

impl Gathered {
    fn add_file(&mut self, path: &Path) -> Result<(), LoadError> {
        if self.files.iter().any(|f| f.path == path) {
            return Ok(());
        }
        self.files.push(SafetensorsFile::open(path)?);
        Ok(())
    }

    fn add_index(&mut self, path: &Path) -> Result<Vec<PathBuf>, LoadError> {
        let bad = |msg: String| LoadError::File {
            path: path.to_path_buf(),
            msg,
        };
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| bad(format!("index is not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("index has no `weight_map` object".into()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut shards: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(format!("`weight_map` entry `{name}` is not a file name")))?;
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(bad(format!(
                    "shard `{file}` must be a file name in the index's folder"
                )));
            }
            shards.entry(file.to_string()).or_default().push(name);
        }
        let mut paths = Vec::new();
        for (file, names) in shards {
            let shard = dir.join(&file);
            self.add_file(&shard)?;
            let Some(opened) = self.files.iter().find(|f| f.path == shard) else {
                continue;
            };
            for n in names {
                if !opened.tensors.iter().any(|t| t.name == n) {
                    return Err(bad(format!(
                        "tensor `{n}` is mapped to `{file}`, which does not hold it"
                    )));
                }
            }
            paths.push(shard);
        }
        Ok(paths)
    }

    /// A folder of safetensors files and/or sharded indexes (shards listed by an index are
    /// read once).
    fn add_plain_dir(&mut self, dir: &Path) -> Result<(), LoadError> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io_err(dir))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(io_err(dir))?;
        entries.sort();
        let name_of = |p: &Path| {
            p.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_string()
        };
        let mut covered = Vec::new();
        let mut found = false;
        for p in entries
            .iter()
            .filter(|p| name_of(p).ends_with(".safetensors.index.json"))
        {
            covered.extend(self.add_index(p)?);
            found = true;
        }
        // diffusers "variants" (`X.fp16.safetensors` beside `X.safetensors`) hold the same
        // tensors again: read the plain file only.
        let is_variant = |p: &Path| {
            let name = name_of(p);
            let stem = name.trim_end_matches(".safetensors");
            stem.rsplit_once('.').is_some_and(|(base, _)| {
                entries
                    .iter()
                    .any(|q| name_of(q) == format!("{base}.safetensors"))
            })
        };
        for p in entries
            .iter()
            .filter(|p| name_of(p).ends_with(".safetensors"))
        {
            if is_variant(p) {
                self.ignored_folders
                    .push(format!("{} (variant of a file already read)", p.display()));
                continue;
            }
            if !covered.contains(p) {
                self.add_file(p)?;
                found = true;
            }
        }
        if !found {
            return Err(LoadError::File {
                path: dir.to_path_buf(),
                msg: "folder holds no .safetensors files".into(),
            });
        }
        let config = dir.join("config.json");
        if config.is_file() {
            self.hints.read(&config)?;
        }
        Ok(())
    }

    fn add_path(&mut self, path: &Path) -> Result<(), LoadError> {
        let meta = std::fs::metadata(path).map_err(io_err(path))?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !meta.is_dir() {
            if name.ends_with(".index.json") {
                self.add_index(path)?;
                if let Some(config) = path.parent().map(|d| d.join("config.json")) {
                    if config.is_file() {
                        self.hints.read(&config)?;
                    }
                }
                return Ok(());
            }
            return self.add_file(path);
        }
        if name.ends_with(".safetensors") {
            return Err(LoadError::File {
                path: path.to_path_buf(),
                msg: "is a directory, expected a .safetensors file".into(),
            });
        }
        if path.join("model_index.json").is_file() {
            let mut any = false;
            for sub in ["transformer", "vae"] {
                let d = path.join(sub);
                if d.is_dir() {
                    self.add_plain_dir(&d)?;
                    any = true;
                }
            }
            if !any {
                return Err(LoadError::File {
                    path: path.to_path_buf(),
                    msg: "diffusers folder has neither `transformer/` nor `vae/`".into(),
                });
            }
            let mut others: Vec<String> = std::fs::read_dir(path)
                .map_err(io_err(path))?
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| n.starts_with("text_encoder"))
                .collect();
            others.sort();
            self.ignored_folders
                .extend(others.into_iter().map(|n| format!("{n}/ (not read)")));
            return Ok(());
        }
        self.add_plain_dir(path)
    }
}

/// One stored piece of a fused tensor: its bytes, header entry and file.
type PartOf = (Part, TensorInfo, PathBuf);

#[derive(Default)]
struct Pending {
    entries: BTreeMap<String, Entry>,
    /// Fused tensors waiting for all their parts: canonical name → parts by index.
    parts: BTreeMap<String, Vec<Option<PartOf>>>,
    layouts: BTreeMap<Layout, usize>,
    files: Vec<PathBuf>,
}

fn origin_of(stored: &str, path: &Path) -> String {
    format!("`{stored}` in {}", path.display())
}

impl Pending {
    fn insert(&mut self, comp: Comp, name: String, entry: Entry) -> Result<(), LoadError> {
        let _ = comp;
        if let Some(prev) = self.entries.get(&name) {
            return Err(LoadError::Duplicate {
                name,
                first: prev.origin.clone(),
                second: entry.origin,
            });
        }
        self.entries.insert(name, entry);
        Ok(())
    }

    fn finish_parts(&mut self, comp: Comp) -> Result<(), LoadError> {
        let component = comp.name();
        for (name, parts) in std::mem::take(&mut self.parts) {
            let mut got = Vec::with_capacity(parts.len());
            for (k, p) in parts.into_iter().enumerate() {
                match p {
                    Some(p) => got.push(p),
                    None => {
                        return Err(LoadError::Config(format!(
                            "{component}: cannot build `{name}`: part {} of 3 (q, k, v) is missing",
                            k + 1
                        )))
                    }
                }
            }
            let (_, first, first_path) = &got[0];
            let origin = format!(
                "{} (+{} parts)",
                origin_of(&first.name, first_path),
                got.len() - 1
            );
            let mut rows = 0;
            for (_, t, path) in &got {
                if t.shape.is_empty() || t.shape[1..] != first.shape[1..] || t.dtype != first.dtype
                {
                    return Err(LoadError::Shape {
                        component,
                        name: name.clone(),
                        origin: format!(" (part `{}` in {})", t.name, path.display()),
                        expected: format!(
                            "a {} part shaped like `{}` {:?}",
                            first.dtype, first.name, first.shape
                        ),
                        found: t.shape.clone(),
                    });
                }
                rows += t.shape[0];
            }
            let mut shape = first.shape.clone();
            shape[0] = rows;
            let entry = Entry {
                dtype: first.dtype,
                shape,
                parts: got.iter().map(|(p, _, _)| p.clone()).collect(),
                origin,
            };
            self.insert(comp, name, entry)?;
        }
        Ok(())
    }
}

/// Reads checkpoints: `.safetensors` files, `*.safetensors.index.json` indexes, diffusers
/// folders, Hugging Face CLIP vision folders and plain folders of safetensors files.
/// Every header is validated before any tensor is used; tensors stay in the mapped files.
pub fn load(paths: &[PathBuf]) -> Result<Model, LoadError> {
    let mut g = Gathered::default();
    for p in paths {
        g.add_path(p)?;
    }
    let mut hints = Hints::default();
    for f in &g.files {
        for t in &f.tensors {
            hints.observe(&t.name);
        }
    }
    let mut pending: BTreeMap<Comp, Pending> = BTreeMap::new();
    let mut ignored: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for f in &g.files {
        let kind = FileKind::of(f.tensors.iter().map(|t| t.name.as_str()));
        for t in &f.tensors {
            let (comp, layout, name, op) = match classify(&t.name, kind, hints) {
                Target::Tensor {
                    comp,
                    layout,
                    name,
                    op,
                } => (comp, layout, name, op),
                Target::Ignored(group) => {
                    let e = ignored.entry(group).or_default();
                    e.0 += 1;
                    e.1 += t.shape.iter().product::<usize>();
                    continue;
                }
                Target::Unknown => {
                    return Err(LoadError::Unrecognised {
                        path: f.path.clone(),
                        name: t.name.clone(),
                    })
                }
            };
            if !t.dtype.is_weight() {
                return Err(LoadError::Tensor {
                    path: f.path.clone(),
                    name: t.name.clone(),
                    msg: format!(
                        "dtype {} cannot be a model weight (use F32, F16 or BF16)",
                        t.dtype
                    ),
                });
            }
            if t.shape.contains(&0) {
                return Err(LoadError::Tensor {
                    path: f.path.clone(),
                    name: t.name.clone(),
                    msg: format!("shape {:?} has a zero dimension", t.shape),
                });
            }
            let p = pending.entry(comp).or_default();
            *p.layouts.entry(layout).or_default() += 1;
            if !p.files.contains(&f.path) {
                p.files.push(f.path.clone());
            }
            let part = Part {
                storage: f.storage.clone(),
                range: t.range.clone(),
            };
            let origin = origin_of(&t.name, &f.path);
            let swap = match op {
                Op::SwapHalves => true,
                Op::SwapHalvesIfLast(i) => i == hints.last_block,
                _ => false,
            };
            let entry = match op {
                Op::Part { index, of } => {
                    let slots = p
                        .parts
                        .entry(name.clone())
                        .or_insert_with(|| vec![None; of]);
                    if let Some(prev) = &slots[index] {
                        return Err(LoadError::Duplicate {
                            name: t.name.clone(),
                            first: origin_of(&prev.1.name, &prev.2),
                            second: origin,
                        });
                    }
                    slots[index] = Some((part, t.clone(), f.path.clone()));
                    continue;
                }
                _ if swap => {
                    if t.shape.first().is_none_or(|d| d % 2 != 0) {
                        return Err(LoadError::Shape {
                            component: comp.name(),
                            name,
                            origin: format!(" (stored as {origin})"),
                            expected: "an even first dimension (two adaLN halves)".into(),
                            found: t.shape.clone(),
                        });
                    }
                    let mid = t.range.start + t.range.len() / 2;
                    Entry {
                        dtype: t.dtype,
                        shape: t.shape.clone(),
                        parts: vec![
                            Part {
                                storage: f.storage.clone(),
                                range: mid..t.range.end,
                            },
                            Part {
                                storage: f.storage.clone(),
                                range: t.range.start..mid,
                            },
                        ],
                        origin,
                    }
                }
                Op::Conv1x1 if t.shape.len() == 2 => Entry {
                    dtype: t.dtype,
                    shape: vec![t.shape[0], t.shape[1], 1, 1],
                    parts: vec![part],
                    origin,
                },
                _ => Entry {
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    parts: vec![part],
                    origin,
                },
            };
            p.insert(comp, name, entry)?;
        }
    }
    let mut model = Model {
        ignored: ignored
            .into_iter()
            .map(|(group, (tensors, params))| Ignored {
                group,
                tensors,
                params,
            })
            .chain(g.ignored_folders.iter().map(|f| Ignored {
                group: f.clone(),
                tensors: 0,
                params: 0,
            }))
            .collect(),
        ..Model::default()
    };
    let vae_hints = (
        g.hints.vae_groups.unwrap_or(32),
        g.hints.vae_scale.unwrap_or(1.5305),
        g.hints.vae_shift.unwrap_or(0.0609),
    );
    for (comp, mut p) in pending {
        p.finish_parts(comp)?;
        let layout = p
            .layouts
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(l, _)| *l)
            .unwrap_or(Layout::Dpir);
        let weights = Component { tensors: p.entries };
        let shapes = weights.shapes();
        let origin = |n: &str| {
            weights
                .origin(n)
                .map(|o| format!(" (stored as {o})"))
                .unwrap_or_default()
        };
        let files = p.files.clone();
        match comp {
            Comp::Mmdit => {
                let config = detect_mmdit(&shapes)?;
                check_spec(comp.name(), &shapes, &mmdit_spec(&config), &origin)?;
                model.mmdit = Some(Loaded {
                    config,
                    weights,
                    layout,
                    files,
                });
            }
            Comp::Vae | Comp::RobustEncoder => {
                let config = detect_vae(&shapes, comp.name(), vae_hints)?;
                check_spec(comp.name(), &shapes, &vae_spec(&config), &origin)?;
                let loaded = Some(Loaded {
                    config,
                    weights,
                    layout,
                    files,
                });
                if comp == Comp::Vae {
                    model.vae = loaded;
                } else {
                    model.robust_encoder = loaded;
                }
            }
            Comp::ClipVision => {
                let config = detect_clip_vision(&shapes, g.hints.clip_heads, g.hints.clip_eps)?;
                check_spec(comp.name(), &shapes, &clip_vision_spec(&config), &origin)?;
                model.clip_vision = Some(Loaded {
                    config,
                    weights,
                    layout,
                    files,
                });
            }
            Comp::Dpir => {
                let config = detect_dpir(&shapes)?;
                check_spec(comp.name(), &shapes, &dpir_spec(&config), &origin)?;
                model.dpir = Some(Loaded {
                    config,
                    weights,
                    layout,
                    files,
                });
            }
        }
    }
    if let Some(d) = &mut model.dpir {
        d.config.has_robust_encoder = model.robust_encoder.is_some();
    }
    check_consistent(&model)?;
    Ok(model)
}

/// The DPIR adapter must fit the backbone, VAE and CLIP tower it was loaded with.
fn check_consistent(m: &Model) -> Result<(), LoadError> {
    let Some(d) = &m.dpir else { return Ok(()) };
    let c = &d.config;
    let mismatch = |tensor: &str, what: &str, found: usize, other: &str, expected: usize| {
        if found == expected {
            Ok(())
        } else {
            Err(LoadError::Config(format!(
                "dpir: `{tensor}` gives {what} {found}, but {other} is {expected}"
            )))
        }
    };
    if let Some(mm) = &m.mmdit {
        let k = &mm.config;
        mismatch(
            "lq_branch.proj.weight",
            "hidden",
            c.hidden,
            "mmdit hidden",
            k.hidden,
        )?;
        mismatch(
            "lq_branch.proj.weight",
            "patch size",
            c.patch_size,
            "mmdit patch size",
            k.patch_size,
        )?;
        mismatch(
            "local_prompt.fc2.weight",
            "context width",
            c.context_dim,
            "mmdit context width",
            k.context_dim,
        )?;
        mismatch(
            "global_prompt.fc2.weight",
            "pooled width",
            c.pooled_dim,
            "mmdit pooled width",
            k.pooled_dim,
        )?;
    }
    if let Some(v) = &m.vae {
        mismatch(
            "lq_branch.conv_in.weight",
            "latent channels",
            c.latent_channels,
            "vae latent channels",
            v.config.latent_channels,
        )?;
    }
    if let Some(r) = &m.robust_encoder {
        mismatch(
            "lq_branch.conv_in.weight",
            "latent channels",
            c.latent_channels,
            "robust encoder latent channels",
            r.config.latent_channels,
        )?;
    }
    if let Some(cv) = &m.clip_vision {
        let k = &cv.config;
        mismatch(
            "local_prompt.fc1.weight",
            "input width",
            c.clip_dim,
            "clip_vision width",
            k.hidden,
        )?;
        let global = k.projection_dim.unwrap_or(k.hidden);
        mismatch(
            "global_prompt.fc1.weight",
            "input width",
            c.global_in,
            "clip_vision output width",
            global,
        )?;
    }
    Ok(())
}
