//! A plain row-major f32 host tensor: the currency of the CPU reference backend and of
//! the pipeline (latents, images, embeddings). No strides, no views: ops that need a
//! layout change make it explicit.

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::Model(format!(
                "tensor of shape {shape:?} needs {n} values, got {}",
                data.len()
            )));
        }
        Ok(Self {
            shape: shape.to_vec(),
            data,
        })
    }

    pub fn zeros(shape: &[usize]) -> Self {
        let n = shape.iter().product();
        Self {
            shape: shape.to_vec(),
            data: vec![0.0; n],
        }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    pub fn dims(&self) -> &[usize] {
        &self.shape
    }

    /// Same data, new shape (must have the same element count).
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != self.data.len() {
            return Err(Error::Model(format!(
                "cannot reshape {:?} to {shape:?}",
                self.shape
            )));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// Largest |a - b| / max(|b|) over all elements; a standard check in tests.
    pub fn max_rel_err(&self, reference: &Tensor) -> f32 {
        assert_eq!(self.shape, reference.shape, "shape mismatch");
        let scale = reference
            .data
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()))
            .max(1e-30);
        self.data
            .iter()
            .zip(&reference.data)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale
    }
}
