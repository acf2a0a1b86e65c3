//! Optimisers over named parameters: SGD with momentum and AdamW, each with weight decay
//! chosen per parameter group.
//!
//! candle-nn's `SGD` has neither momentum nor weight decay, and its `AdamW` applies one
//! decay to every parameter. Face models want three groups (see [`ParamGroup`]), so the
//! optimisers here take names with their `Var`s, and keep their state by name so that it
//! can be saved and restored with a checkpoint.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Which weight decay a parameter gets, decided by its checkpoint name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamGroup {
    /// Conv weights of the body.
    Body,
    /// The layers after the global depthwise conv: the embedding layer and the class
    /// centres of the margin head. The paper decays them ten times harder.
    Head,
    /// BatchNorm scales and shifts, PReLU slopes and biases: no decay.
    NoDecay,
    /// BatchNorm running statistics: updated by the forward pass, never by the optimiser.
    Buffer,
}

impl ParamGroup {
    /// The group of a parameter named as in a MobileFaceNet checkpoint (head centres are
    /// `head.weight`).
    pub fn of(name: &str) -> Self {
        if name.ends_with("_moving_mean") || name.ends_with("_moving_var") {
            Self::Buffer
        } else if name.ends_with("_gamma") || name.ends_with("_beta") || name.ends_with("_bias") {
            // `_relu_gamma` (PReLU) and `fc1_gamma` (BatchNorm) included.
            Self::NoDecay
        } else if name.starts_with("head.") || name == mfn_model::config::EmbeddingSpec::WEIGHT {
            Self::Head
        } else {
            Self::Body
        }
    }
}

/// Weight decay of each group.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightDecay {
    /// For [`ParamGroup::Body`] (4e-5 in the paper).
    pub body: f64,
    /// For [`ParamGroup::Head`] (4e-4 in the paper).
    pub head: f64,
}

impl Default for WeightDecay {
    fn default() -> Self {
        Self {
            body: 4e-5,
            head: 4e-4,
        }
    }
}

impl WeightDecay {
    fn of(&self, group: ParamGroup) -> f64 {
        match group {
            ParamGroup::Body => self.body,
            ParamGroup::Head => self.head,
            ParamGroup::NoDecay | ParamGroup::Buffer => 0.0,
        }
    }
}

/// The update rule.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum OptimizerKind {
    /// SGD with (PyTorch-style) momentum and L2 weight decay added to the gradient.
    Sgd {
        /// Momentum (0.9 in the paper).
        momentum: f64,
    },
    /// Adam with decoupled weight decay (Loshchilov and Hutter).
    AdamW {
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Added to the root of the second moment.
        eps: f64,
    },
}

/// An optimiser over named `Var`s with per-group weight decay and named state.
pub struct Optimizer {
    kind: OptimizerKind,
    decay: WeightDecay,
    params: Vec<(String, Var, ParamGroup)>,
    /// First moment (momentum buffer for SGD) and, for AdamW, second moment.
    state: BTreeMap<String, Tensor>,
    steps: usize,
}

impl Optimizer {
    /// An optimiser over `params`; running statistics among them are left alone.
    pub fn new(
        kind: OptimizerKind,
        decay: WeightDecay,
        params: impl IntoIterator<Item = (String, Var)>,
    ) -> Result<Self> {
        match kind {
            OptimizerKind::Sgd { momentum } if !(0.0..1.0).contains(&momentum) => {
                return Err(Error::Config(format!("momentum {momentum} is not in 0..1")))
            }
            OptimizerKind::AdamW { beta1, beta2, eps }
                if !(0.0..1.0).contains(&beta1) || !(0.0..1.0).contains(&beta2) || eps <= 0.0 =>
            {
                return Err(Error::Config(format!(
                    "AdamW betas ({beta1}, {beta2}) must lie in 0..1 and eps {eps} be positive"
                )))
            }
            _ => {}
        }
        let mut params: Vec<(String, Var, ParamGroup)> = params
            .into_iter()
            .map(|(n, v)| {
                let g = ParamGroup::of(&n);
                (n, v, g)
            })
            .filter(|(_, _, g)| *g != ParamGroup::Buffer)
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self {
            kind,
            decay,
            params,
            state: BTreeMap::new(),
            steps: 0,
        })
    }

    /// The parameters it updates, with their groups, by name.
    pub fn params(&self) -> impl Iterator<Item = (&str, ParamGroup)> {
        self.params.iter().map(|(n, _, g)| (n.as_str(), *g))
    }

    /// Updates made so far.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// One update with learning rate `lr`. Parameters without a gradient are skipped.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        for (name, var, group) in &self.params {
            let Some(g) = grads.get(var) else {
                continue;
            };
            let wd = self.decay.of(*group);
            let p = var.as_tensor();
            match self.kind {
                OptimizerKind::Sgd { momentum } => {
                    let g = if wd > 0.0 {
                        (g + (p * wd)?)?
                    } else {
                        g.clone()
                    };
                    let key = format!("{name}.momentum");
                    let buf = match self.state.get(&key) {
                        Some(b) if momentum > 0.0 => ((b * momentum)? + g)?,
                        _ => g,
                    };
                    var.set(&(p - (&buf * lr)?)?)?;
                    if momentum > 0.0 {
                        self.state.insert(key, buf);
                    }
                }
                OptimizerKind::AdamW { beta1, beta2, eps } => {
                    let (mk, vk) = (format!("{name}.m"), format!("{name}.v"));
                    let m = match self.state.get(&mk) {
                        Some(m) => ((m * beta1)? + (g * (1.0 - beta1))?)?,
                        None => (g * (1.0 - beta1))?,
                    };
                    let v = match self.state.get(&vk) {
                        Some(v) => ((v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?,
                        None => (g.sqr()? * (1.0 - beta2))?,
                    };
                    let m_hat = (&m / (1.0 - beta1.powi(t)))?;
                    let v_hat = (&v / (1.0 - beta2.powi(t)))?;
                    let update = (m_hat / (v_hat.sqrt()? + eps)?)?;
                    let decayed = if wd > 0.0 {
                        (p * (1.0 - lr * wd))?
                    } else {
                        p.clone()
                    };
                    var.set(&(decayed - (update * lr)?)?)?;
                    self.state.insert(mk, m);
                    self.state.insert(vk, v);
                }
            }
        }
        Ok(())
    }

    /// The state to save: moment tensors by `{param}.momentum` / `.m` / `.v`.
    pub fn state(&self) -> &BTreeMap<String, Tensor> {
        &self.state
    }

    /// Restores saved state and the update count (AdamW's bias correction needs it).
    pub fn restore(&mut self, state: BTreeMap<String, Tensor>, steps: usize) -> Result<()> {
        for (key, t) in &state {
            let param = key.rsplit_once('.').map(|(p, _)| p).unwrap_or(key);
            let Some((_, var, _)) = self.params.iter().find(|(n, _, _)| n == param) else {
                return Err(Error::Config(format!(
                    "optimiser state `{key}` belongs to no parameter of this model"
                )));
            };
            if t.dims() != var.dims() {
                return Err(Error::Config(format!(
                    "optimiser state `{key}` has shape {:?}, its parameter {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
        }
        self.state = state;
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(v: &[f32]) -> Var {
        Var::new(v, &Device::Cpu).unwrap()
    }

    fn values(v: &Var) -> Vec<f32> {
        v.as_tensor().to_vec1().unwrap()
    }

    #[test]
    fn groups_follow_the_names() {
        assert_eq!(ParamGroup::of("conv_1_conv2d_weight"), ParamGroup::Body);
        assert_eq!(
            ParamGroup::of("conv_1_batchnorm_gamma"),
            ParamGroup::NoDecay
        );
        assert_eq!(ParamGroup::of("conv_1_relu_gamma"), ParamGroup::NoDecay);
        assert_eq!(ParamGroup::of("pre_fc1_bias"), ParamGroup::NoDecay);
        assert_eq!(ParamGroup::of("fc1_beta"), ParamGroup::NoDecay);
        assert_eq!(ParamGroup::of("fc1_weight"), ParamGroup::Head);
        assert_eq!(ParamGroup::of("head.weight"), ParamGroup::Head);
        assert_eq!(ParamGroup::of("fc1_moving_var"), ParamGroup::Buffer);
    }

    /// Loss `sum(w * x)`: the gradient of `w` is `x`.
    fn grads_for(w: &Var, x: &[f32]) -> GradStore {
        let x = Tensor::new(x, &Device::Cpu).unwrap();
        (w.as_tensor() * x)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    }

    #[test]
    fn sgd_momentum_and_decay_match_hand_computation() {
        let w = var(&[1.0, -2.0]);
        let mut opt = Optimizer::new(
            OptimizerKind::Sgd { momentum: 0.9 },
            WeightDecay {
                body: 0.1,
                head: 0.0,
            },
            [("conv_x_conv2d_weight".to_string(), w.clone())],
        )
        .unwrap();
        // Step 1: g = x + 0.1 w = [0.6, 0.3]; buf = g; w -= 0.5 buf.
        opt.step(&grads_for(&w, &[0.5, 0.5]), 0.5).unwrap();
        let w1 = values(&w);
        assert!(
            (w1[0] - 0.7).abs() < 1e-6 && (w1[1] + 2.15).abs() < 1e-6,
            "{w1:?}"
        );
        // Step 2: g = x + 0.1 w1; buf = 0.9 buf + g.
        opt.step(&grads_for(&w, &[0.5, 0.5]), 0.5).unwrap();
        let g = [0.5 + 0.1 * 0.7, 0.5 + 0.1 * -2.15];
        let buf = [0.9 * 0.6 + g[0], 0.9 * 0.3 + g[1]];
        let want = [0.7 - 0.5 * buf[0], -2.15 - 0.5 * buf[1]];
        let w2 = values(&w);
        for i in 0..2 {
            assert!((w2[i] - want[i] as f32).abs() < 1e-5, "{w2:?} vs {want:?}");
        }
    }

    #[test]
    fn no_decay_group_and_missing_gradients_are_respected() {
        let (a, b) = (var(&[1.0]), var(&[1.0]));
        let mut opt = Optimizer::new(
            OptimizerKind::Sgd { momentum: 0.0 },
            WeightDecay {
                body: 1.0,
                head: 1.0,
            },
            [
                ("x_batchnorm_gamma".to_string(), a.clone()),
                ("y_conv2d_weight".to_string(), b.clone()),
            ],
        )
        .unwrap();
        // Only `a` takes part in the loss: no decay on it, and `b` stays as it is.
        opt.step(&grads_for(&a, &[0.0]), 0.5).unwrap();
        assert_eq!(values(&a), [1.0]);
        assert_eq!(values(&b), [1.0]);
    }

    #[test]
    fn adamw_first_step_moves_by_the_learning_rate() {
        let w = var(&[1.0, 1.0]);
        let mut opt = Optimizer::new(
            OptimizerKind::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            WeightDecay {
                body: 0.0,
                head: 0.0,
            },
            [("conv_conv2d_weight".to_string(), w.clone())],
        )
        .unwrap();
        // Bias-corrected Adam's first step is lr * sign(g).
        opt.step(&grads_for(&w, &[3.0, -0.01]), 0.1).unwrap();
        let v = values(&w);
        assert!(
            (v[0] - 0.9).abs() < 1e-5 && (v[1] - 1.1).abs() < 1e-4,
            "{v:?}"
        );
    }

    #[test]
    fn bad_settings_and_state_are_errors() {
        let w = var(&[1.0]);
        let params = || [("a_conv2d_weight".to_string(), w.clone())];
        assert!(Optimizer::new(
            OptimizerKind::Sgd { momentum: 1.5 },
            WeightDecay::default(),
            params()
        )
        .is_err());
        let mut opt = Optimizer::new(
            OptimizerKind::Sgd { momentum: 0.9 },
            WeightDecay::default(),
            params(),
        )
        .unwrap();
        let wrong = Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = opt
            .restore(
                [("a_conv2d_weight.momentum".to_string(), wrong.clone())].into(),
                1,
            )
            .unwrap_err();
        assert!(err.to_string().contains("shape"), "{err}");
        let err = opt
            .restore([("nope.momentum".to_string(), wrong)].into(), 1)
            .unwrap_err();
        assert!(err.to_string().contains("no parameter"), "{err}");
    }
}
