//! Where model code gets its weights: a name → f32 tensor source in the canonical
//! layout (see docs/WEIGHTS.md). The loader's components implement it; tests use a
//! `HashMap`. Model code never sees file layouts, prefixes or dtypes.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

pub trait WeightSource {
    /// The tensor `name` in f32 (cast from f16/bf16 as needed).
    fn tensor(&self, name: &str) -> Result<Tensor>;
    /// Whether `name` exists.
    fn contains(&self, name: &str) -> bool;
    /// Shape of `name` without materialising it.
    fn shape(&self, name: &str) -> Result<Vec<usize>>;

    /// `tensor(name)`, checked against an expected shape.
    fn tensor_shaped(&self, name: &str, expected: &[usize]) -> Result<Tensor> {
        let t = self.tensor(name)?;
        if t.shape != expected {
            return Err(Error::Shape {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: t.shape,
            });
        }
        Ok(t)
    }
}

impl WeightSource for HashMap<String, Tensor> {
    fn tensor(&self, name: &str) -> Result<Tensor> {
        self.get(name)
            .cloned()
            .ok_or_else(|| Error::MissingTensor(name.to_string()))
    }
    fn contains(&self, name: &str) -> bool {
        self.contains_key(name)
    }
    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        self.get(name)
            .map(|t| t.shape.clone())
            .ok_or_else(|| Error::MissingTensor(name.to_string()))
    }
}

/// A view of another source under a name prefix (`"joint_blocks.3."`).
pub struct Prefixed<'a> {
    pub inner: &'a dyn WeightSource,
    pub prefix: String,
}

impl WeightSource for Prefixed<'_> {
    fn tensor(&self, name: &str) -> Result<Tensor> {
        self.inner.tensor(&format!("{}{name}", self.prefix))
    }
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(&format!("{}{name}", self.prefix))
    }
    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        self.inner.shape(&format!("{}{name}", self.prefix))
    }
}

/// Loaded checkpoints: tensors in the canonical layout, converted to f32 on demand
/// (F32 tensors are copied straight out of the mapped file).
impl WeightSource for dpir_loader::Component {
    fn tensor(&self, name: &str) -> Result<Tensor> {
        let shape = dpir_loader::Component::shape(self, name)
            .ok_or_else(|| Error::MissingTensor(name.to_string()))?
            .to_vec();
        let data = self.f32(name)?.into_owned();
        Tensor::new(&shape, data)
    }
    fn contains(&self, name: &str) -> bool {
        dpir_loader::Component::contains(self, name)
    }
    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        dpir_loader::Component::shape(self, name)
            .map(<[usize]>::to_vec)
            .ok_or_else(|| Error::MissingTensor(name.to_string()))
    }
}

/// Seeded random weights for a `(name, shape)` spec (the loader's `*_spec` functions), at the
/// scales a trained model has: biases ~0.02, norm weights ~1, other vectors and embeddings
/// ~0.1, matrices and convolutions ~1/√fan_in, `lq_align.gate` ~0.5 (so the LQ branch is
/// live). For tests and benches of whole models where real checkpoints are absent.
pub fn seeded_random_weights(spec: Vec<(String, Vec<usize>)>, seed: u64) -> Vec<(String, Tensor)> {
    let mut rng = crate::pipeline::rng::Rng::new(seed);
    spec.into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let g = rng.normal_vec(n);
            let norm_like = ["norm", "ln_", "layernorm", "layer_norm"]
                .iter()
                .any(|k| name.contains(k));
            let data: Vec<f32> = if name.ends_with("bias") {
                g.iter().map(|v| 0.02 * v).collect()
            } else if name == "lq_align.gate" {
                g.iter().map(|v| 0.5 * v).collect()
            } else if shape.len() == 1 && norm_like {
                g.iter().map(|v| 1.0 + 0.1 * v).collect()
            } else if shape.len() == 1 || name.contains("embed") {
                g.iter().map(|v| 0.1 * v).collect()
            } else {
                let fan_in: usize = shape[1..].iter().product();
                g.iter().map(|v| v / (fan_in as f32).sqrt()).collect()
            };
            (name, Tensor { shape, data })
        })
        .collect()
}
