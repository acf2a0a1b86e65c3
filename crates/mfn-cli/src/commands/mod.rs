//! One module per subcommand, plus the argument handling they share.

pub mod convert;
pub mod embed;
pub mod eval;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use mfn_model::{Checkpoint, Config, MobileFaceNet};

use mfn_data::assets::ENV as ASSETS_ENV;

/// `explicit`, or `$MFN_ASSETS/<rel>` when it is absent; `flag` names the option in the
/// message when neither is there.
pub fn asset_or(explicit: Option<PathBuf>, rel: &str, flag: &str) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    match mfn_data::assets::root() {
        Some(root) => Ok(root.join(rel)),
        None => bail!(
            "no {flag} given and {ASSETS_ENV} is not set: pass {flag} PATH, or set {ASSETS_ENV} \
             to an assets folder that holds {rel}"
        ),
    }
}

/// The default model: insightface's MobileFaceNet y1 under the assets folder.
pub const DEFAULT_MODEL: &str = "models/mobilefacenet-y1/model-symbol.json";

/// Loads a checkpoint by path (`--preset` picks the config an MXNet symbol is checked
/// against) and builds the network on the CPU.
pub fn load_model(
    model: Option<PathBuf>,
    preset: Option<&str>,
) -> Result<(Checkpoint, MobileFaceNet)> {
    let path = asset_or(model, DEFAULT_MODEL, "--model")?;
    let config = match preset {
        Some(name) => Some(Config::preset(name).with_context(|| {
            format!(
                "unknown preset `{name}`; known: {}",
                Config::PRESETS.join(", ")
            )
        })?),
        None => None,
    };
    let device = Device::Cpu;
    let ckpt = Checkpoint::load(&path, config.as_ref(), &device)
        .with_context(|| format!("loading model {}", path.display()))?;
    let model = ckpt
        .build(&device)
        .with_context(|| format!("building model from {}", path.display()))?;
    Ok((ckpt, model))
}

/// The input size of a model as width x height, the order image files use.
pub fn image_size(config: &Config) -> [usize; 2] {
    let [h, w] = config.input_size;
    [w, h]
}
