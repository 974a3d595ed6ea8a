//! AdamW with PyTorch's semantics (decoupled weight decay, bias-corrected
//! moments), learning-rate schedules and gradient-norm clipping. Moments are
//! plain tensors so checkpoints can save and restore them exactly.

use std::collections::HashMap;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// Peak learning rate.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// β₁.
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// β₂.
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// ε.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    /// Peak learning rate of the trainable token rows (new special tokens), when it
    /// should differ from `lr` (Unsloth's `embedding_learning_rate`): rows that start at
    /// the vocabulary's mean need to move much further than a LoRA update does. It
    /// follows the same warmup and decay, scaled by `token_lr / lr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_lr: Option<f64>,
}

fn default_lr() -> f64 {
    2e-4
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: default_lr(),
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_eps(),
            weight_decay: 0.0,
            token_lr: None,
        }
    }
}

/// The optimizer and its state.
pub struct AdamW {
    cfg: AdamWConfig,
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Per variable, its learning rate as a multiple of the scheduled one.
    lr_scale: Vec<f64>,
    step: u64,
}

impl AdamW {
    /// An optimizer over named variables, moments at zero.
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<AdamW> {
        let m = vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        let lr_scale = vec![1.0; vars.len()];
        Ok(AdamW {
            cfg,
            vars,
            m,
            v,
            lr_scale,
            step: 0,
        })
    }

    /// Runs the variable `name` at `scale` × the scheduled learning rate (weight decay
    /// scaled alike). Returns whether there is such a variable.
    pub fn scale_lr(&mut self, name: &str, scale: f64) -> bool {
        match self.vars.iter().position(|(n, _)| n == name) {
            Some(i) => {
                self.lr_scale[i] = scale;
                true
            }
            None => false,
        }
    }

    /// Applies one update with learning rate `lr`; `grads` are keyed like the variables.
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(name) else { continue };
            let lr = lr * self.lr_scale[i];
            let m = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let p = var.as_tensor();
            let decayed = if self.cfg.weight_decay > 0.0 {
                (p * (1.0 - lr * self.cfg.weight_decay))?
            } else {
                p.clone()
            };
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.cfg.eps)?)?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Updates taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Moments and step as tensors (`m.NAME`, `v.NAME`, `step`).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        out.insert(
            "step".into(),
            Tensor::new(&[self.step as f64], &candle_core::Device::Cpu)?,
        );
        Ok(out)
    }

    /// Restores [`AdamW::state`].
    pub fn load_state(
        &mut self,
        state: &HashMap<String, Tensor>,
        source: &std::path::Path,
    ) -> Result<()> {
        let get = |k: &str| {
            state.get(k).ok_or_else(|| Error::Tensor {
                name: k.into(),
                path: source.into(),
                message: "missing from the optimizer state".into(),
            })
        };
        for (i, (name, var)) in self.vars.iter().enumerate() {
            self.m[i] = get(&format!("m.{name}"))?.to_device(var.device())?;
            self.v[i] = get(&format!("v.{name}"))?.to_device(var.device())?;
        }
        self.step = get("step")?.to_vec1::<f64>()?[0] as u64;
        Ok(())
    }
}

/// Learning-rate decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// Half-cosine to zero.
    Cosine,
    /// Straight line to zero.
    Linear,
    /// Stay at the peak.
    Constant,
}

/// Linear warmup then decay, as `transformers`' schedulers compute it.
pub fn lr_at(step: u64, peak: f64, warmup: u64, total: u64, decay: Decay) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    match decay {
        Decay::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        Decay::Linear => peak * (1.0 - progress),
        Decay::Constant => peak,
    }
}

/// Scales gradients so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut HashMap<String, Tensor>, max_norm: Option<f64>) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.values() {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    if let Some(max) = max_norm {
        if norm > max {
            let s = max / (norm + 1e-6);
            for g in grads.values_mut() {
                *g = (&*g * s)?;
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Reference from PyTorch 2.15:
    /// ```python
    /// p = torch.tensor([1.0, -2.0], requires_grad=True)
    /// opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.01)
    /// for g in ([0.5, -1.0], [0.25, 2.0]):
    ///     p.grad = torch.tensor(g); opt.step()
    /// print(p.tolist())  # [0.8048830628395081, -1.932712435722351]
    /// ```
    #[test]
    fn adamw_matches_pytorch() {
        let p = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("p".into(), p.clone())], cfg).unwrap();
        for g in [[0.5f32, -1.0], [0.25, 2.0]] {
            let grads = HashMap::from([("p".to_string(), Tensor::new(&g, &Device::Cpu).unwrap())]);
            opt.step(&grads, 0.1).unwrap();
        }
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        for (a, b) in got.iter().zip([0.804_883_06_f32, -1.932_712_4]) {
            assert!((a - b).abs() < 1e-6, "{got:?}");
        }
    }

    /// A scaled variable's update is the same Adam step at `scale × lr`: on the first
    /// step Adam moves every coordinate by `lr · g/|g|` (ε aside), so 10× here.
    #[test]
    fn a_scaled_variable_moves_at_its_own_rate() {
        let a = Var::new(&[1.0f32, 1.0], &Device::Cpu).unwrap();
        let b = Var::new(&[1.0f32, 1.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(
            vec![("a".into(), a.clone()), ("tok".into(), b.clone())],
            AdamWConfig::default(),
        )
        .unwrap();
        assert!(opt.scale_lr("tok", 10.0));
        assert!(!opt.scale_lr("missing", 10.0));
        let g = Tensor::new(&[0.5f32, -2.0], &Device::Cpu).unwrap();
        let grads = HashMap::from([("a".to_string(), g.clone()), ("tok".to_string(), g)]);
        opt.step(&grads, 1e-3).unwrap();
        let da: Vec<f32> = a.as_tensor().to_vec1().unwrap();
        let db: Vec<f32> = b.as_tensor().to_vec1().unwrap();
        for (x, want) in da.iter().zip([1.0 - 1e-3, 1.0 + 1e-3]) {
            assert!((x - want).abs() < 1e-6, "{da:?}");
        }
        for (x, want) in db.iter().zip([1.0 - 1e-2, 1.0 + 1e-2]) {
            assert!((x - want).abs() < 1e-6, "{db:?}");
        }
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert_eq!(lr_at(0, 1.0, 10, 110, Decay::Cosine), 0.0);
        assert_eq!(lr_at(5, 1.0, 10, 110, Decay::Cosine), 0.5);
        assert_eq!(lr_at(10, 1.0, 10, 110, Decay::Cosine), 1.0);
        assert!((lr_at(60, 1.0, 10, 110, Decay::Cosine) - 0.5).abs() < 1e-12);
        assert!(lr_at(110, 1.0, 10, 110, Decay::Cosine).abs() < 1e-12);
        assert!((lr_at(60, 1.0, 10, 110, Decay::Linear) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let mut g = HashMap::from([
            (
                "a".to_string(),
                Tensor::new(&[3.0f32], &Device::Cpu).unwrap(),
            ),
            (
                "b".to_string(),
                Tensor::new(&[4.0f32], &Device::Cpu).unwrap(),
            ),
        ]);
        let n = clip_grad_norm(&mut g, Some(1.0)).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        let a = g["a"].to_vec1::<f32>().unwrap()[0];
        assert!((a - 0.6).abs() < 1e-5);
    }
}
