//! Learning-rate schedules: a linear warm-up, then step decay, polynomial decay or cosine.

use serde::{Deserialize, Serialize};

/// How the learning rate decays after the warm-up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Decay {
    /// Constant.
    Constant,
    /// Multiplied by `gamma` at each milestone step (counted from the start of training).
    Step {
        /// Steps at which the rate drops.
        milestones: Vec<usize>,
        /// The factor of each drop (0.1 in the paper).
        gamma: f64,
    },
    /// `(1 - t)^power` over the steps after the warm-up, as insightface's arcface_torch.
    Poly {
        /// The exponent (2 in arcface_torch).
        power: f64,
    },
    /// Half a cosine from the base rate down to `min_lr`.
    Cosine {
        /// The rate at the last step.
        min_lr: f64,
    },
}

/// A learning rate for every step of a run of `total_steps`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// The rate after the warm-up.
    pub base_lr: f64,
    /// Steps of linear warm-up from `base_lr / warmup_steps` to `base_lr`.
    pub warmup_steps: usize,
    /// Length of the run, for the decays that need it.
    pub total_steps: usize,
    /// The decay after the warm-up.
    pub decay: Decay,
}

impl LrSchedule {
    /// The rate of step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let t = ((step - self.warmup_steps) as f64 / span).clamp(0.0, 1.0);
        match &self.decay {
            Decay::Constant => self.base_lr,
            Decay::Step { milestones, gamma } => {
                let drops = milestones.iter().filter(|&&m| step >= m).count();
                self.base_lr * gamma.powi(drops as i32)
            }
            Decay::Poly { power } => self.base_lr * (1.0 - t).powf(*power),
            Decay::Cosine { min_lr } => {
                min_lr + 0.5 * (self.base_lr - min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(decay: Decay) -> LrSchedule {
        LrSchedule {
            base_lr: 0.1,
            warmup_steps: 10,
            total_steps: 110,
            decay,
        }
    }

    #[test]
    fn warmup_is_linear_and_reaches_the_base_rate() {
        let s = schedule(Decay::Constant);
        assert!((s.lr(0) - 0.01).abs() < 1e-12);
        assert!((s.lr(4) - 0.05).abs() < 1e-12);
        assert!((s.lr(9) - 0.1).abs() < 1e-12);
        assert_eq!(s.lr(50), 0.1);
    }

    #[test]
    fn decays_hit_their_end_points() {
        let step = schedule(Decay::Step {
            milestones: vec![50, 80],
            gamma: 0.1,
        });
        assert_eq!(step.lr(49), 0.1);
        assert!((step.lr(50) - 0.01).abs() < 1e-12);
        assert!((step.lr(100) - 0.001).abs() < 1e-12);
        let poly = schedule(Decay::Poly { power: 2.0 });
        assert_eq!(poly.lr(10), 0.1);
        assert!((poly.lr(60) - 0.025).abs() < 1e-12);
        assert_eq!(poly.lr(110), 0.0);
        let cos = schedule(Decay::Cosine { min_lr: 0.001 });
        assert_eq!(cos.lr(10), 0.1);
        assert!((cos.lr(60) - 0.0505).abs() < 1e-12);
        assert!((cos.lr(110) - 0.001).abs() < 1e-12);
        // Never increases after the warm-up.
        for s in [step, poly, cos] {
            for i in 10..120 {
                assert!(s.lr(i + 1) <= s.lr(i) + 1e-15);
            }
        }
    }
}
