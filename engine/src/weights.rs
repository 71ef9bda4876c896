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

/// The scale a trained model has for a tensor of this name and shape, applied to a
/// standard normal draw: biases ~0.02, norm weights ~1, other vectors and embeddings ~0.1,
/// matrices and convolutions ~1/√fan_in, `lq_align.gate` ~0.5 (so the LQ branch is live).
fn scale_like_trained(name: &str, shape: &[usize], g: &mut [f32]) {
    let norm_like = ["norm", "ln_", "layernorm", "layer_norm"]
        .iter()
        .any(|k| name.contains(k));
    let (mul, add) = if name.ends_with("bias") {
        (0.02, 0.0)
    } else if name == "lq_align.gate" {
        (0.5, 0.0)
    } else if shape.len() == 1 && norm_like {
        (0.1, 1.0)
    } else if shape.len() == 1 || name.contains("embed") {
        (0.1, 0.0)
    } else {
        let fan_in: usize = shape[1..].iter().product();
        (1.0 / (fan_in as f32).sqrt(), 0.0)
    };
    g.iter_mut().for_each(|v| *v = add + mul * *v);
}

/// Seeded random weights for a `(name, shape)` spec (the loader's `*_spec` functions), at the
/// scales a trained model has (see `scale_like_trained`). For tests and benches of whole
/// models where real checkpoints are absent.
pub fn seeded_random_weights(spec: Vec<(String, Vec<usize>)>, seed: u64) -> Vec<(String, Tensor)> {
    let mut rng = crate::pipeline::rng::Rng::new(seed);
    spec.into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let mut data = rng.normal_vec(n);
            scale_like_trained(&name, &shape, &mut data);
            (name, Tensor { shape, data })
        })
        .collect()
}

/// Random weights of a spec made on demand, one tensor at a time (for benches of models
/// too large to hold twice in f32, such as SD3-medium's 2.1 B parameters): each tensor is a
/// function of (seed, name) alone, drawn in parallel chunks, at the scales of
/// [`seeded_random_weights`] (but not the same values).
pub struct RandomWeights {
    shapes: HashMap<String, Vec<usize>>,
    seed: u64,
}

impl RandomWeights {
    pub fn new(spec: Vec<(String, Vec<usize>)>, seed: u64) -> Self {
        Self {
            shapes: spec.into_iter().collect(),
            seed,
        }
    }
}

/// FNV-1a of a name, for per-tensor seeds.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl WeightSource for RandomWeights {
    fn tensor(&self, name: &str) -> Result<Tensor> {
        use rayon::prelude::*;
        let shape = self.shape(name)?;
        let n: usize = shape.iter().product();
        const CHUNK: usize = 1 << 16;
        let base = self.seed ^ name_hash(name);
        let mut data = vec![0f32; n];
        data.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
            let mut rng = crate::pipeline::rng::Rng::new(base.wrapping_add(i as u64));
            c.copy_from_slice(&rng.normal_vec(c.len()));
        });
        scale_like_trained(name, &shape, &mut data);
        Tensor::new(&shape, data)
    }
    fn contains(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }
    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        self.shapes
            .get(name)
            .cloned()
            .ok_or_else(|| Error::MissingTensor(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_weights_are_deterministic_per_name_and_scaled() {
        let spec = vec![
            ("a.weight".to_string(), vec![64, 256]),
            ("a.bias".to_string(), vec![64]),
            ("n.norm.weight".to_string(), vec![300_000]),
        ];
        let w = RandomWeights::new(spec.clone(), 3);
        let a = w.tensor("a.weight").unwrap();
        assert_eq!(a.shape, vec![64, 256]);
        assert_eq!(a.data, w.tensor("a.weight").unwrap().data);
        assert_ne!(
            a.data,
            RandomWeights::new(spec, 4).tensor("a.weight").unwrap().data
        );
        let rms = |v: &[f32], c: f32| {
            (v.iter().map(|x| (x - c).powi(2)).sum::<f32>() / v.len() as f32).sqrt()
        };
        // 1/√256 = 0.0625; bias 0.02; norm 1 ± 0.1 (several chunks).
        assert!((rms(&a.data, 0.0) - 0.0625).abs() < 0.004);
        assert!((rms(&w.tensor("a.bias").unwrap().data, 0.0) - 0.02).abs() < 0.006);
        let n = w.tensor("n.norm.weight").unwrap();
        assert!((rms(&n.data, 1.0) - 0.1).abs() < 0.002);
        assert_ne!(n.data[..100], n.data[1 << 16..(1 << 16) + 100]);
        assert!(matches!(w.tensor("nope"), Err(Error::MissingTensor(_))));
    }
}
