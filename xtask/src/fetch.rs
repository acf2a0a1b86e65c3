//! `cargo xtask fetch`: pretrained models from the Hugging Face Hub, pinned, checked and
//! converted to the native format.
//!
//! Each model of the committed list (`xtask/models.json`), or the one `--repo/--file`
//! names, is looked up in the Hub cache (the layout `huggingface_hub` and `hf-hub` share:
//! `models--org--name/{blobs,snapshots/COMMIT,refs/REVISION}`) and downloaded into it with
//! `hf-hub` when missing. Its sha256 must equal the pinned one before anything reads it;
//! then it is converted (`mfn_model::Checkpoint`) to `<out>/<name>.safetensors` with the
//! input normalisation in its config, the verification threshold under `mfn.threshold` and
//! where it came from under `mfn.source.*`.
//!
//! With `HF_HUB_OFFLINE=1` (or `--offline`) nothing is downloaded: a model missing from the
//! cache is an error that says which file to download and where to put it.

use std::io::{IsTerminal, Read};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use hf_hub::{Cache, Repo, RepoType};
use mfn_model::{Checkpoint, Config, InputNorm};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::eval::{self, DataSet};

/// The metadata key of a model's verification threshold (a cosine), as `mfn-cli` reads it.
pub const THRESHOLD_KEY: &str = "mfn.threshold";

/// Environment variable of this project's own folder: the Hub cache goes to `hub/` and the
/// converted models to `models/` inside it.
const MFN_HOME: &str = "MFN_HOME";

/// Where the Hub is, as `huggingface_hub` reads it.
const HF_ENDPOINT: &str = "HF_ENDPOINT";
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Arguments of `cargo xtask fetch`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The models list [default: xtask/models.json in the workspace].
    #[arg(long, value_name = "PATH")]
    models: Option<PathBuf>,
    /// Fetch only this entry of the list (repeatable).
    #[arg(long, value_name = "NAME", conflicts_with = "repo")]
    only: Vec<String>,
    /// Fetch from this Hub model repository (`org/name`) instead of the list.
    #[arg(long, value_name = "ORG/NAME", requires = "file")]
    repo: Option<String>,
    /// With --repo: the file inside the repository (an `.onnx` or native `.safetensors`).
    #[arg(long, value_name = "PATH", requires = "repo")]
    file: Option<String>,
    /// With --repo: the branch, tag or commit [default: main].
    #[arg(long, requires = "repo")]
    revision: Option<String>,
    /// With --repo: the file's expected sha256 (64 hex digits).
    #[arg(long, value_name = "HEX", requires = "repo")]
    sha256: Option<String>,
    /// With --repo: the converted model's name [default: the repository's name].
    #[arg(long, requires = "repo")]
    name: Option<String>,
    /// With --repo: the config preset the graph must match [default: every preset in turn].
    #[arg(long, requires = "repo")]
    preset: Option<String>,
    /// With --repo: the verification threshold (cosine) to store.
    #[arg(long, requires = "repo")]
    threshold: Option<f64>,
    /// The Hub cache [default: $MFN_HOME/hub, else $HF_HUB_CACHE, else $HF_HOME/hub, else
    /// ~/.cache/huggingface/hub].
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Where converted models go [default: $MFN_HOME/models, else ~/.cache/mfn/models].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Never download; the same as HF_HUB_OFFLINE=1.
    #[arg(long)]
    offline: bool,
    /// Accept a file whose entry has no sha256 pin (its sha256 is printed).
    #[arg(long)]
    allow_unpinned: bool,
    /// The assets folder, for entries whose threshold is measured on a verification set
    /// [default: $MFN_ASSETS].
    #[arg(long, value_name = "DIR")]
    assets: Option<PathBuf>,
}

/// The models list.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelList {
    #[serde(default, rename = "_about")]
    _about: Option<serde_json::Value>,
    models: Vec<ModelEntry>,
}

/// One pinned model.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelEntry {
    /// The converted file is `<out>/<name>.safetensors`.
    name: String,
    /// Hub model repository, `org/name`.
    repo: String,
    /// File inside the repository.
    file: String,
    /// Branch, tag or (best) commit hash.
    revision: String,
    /// sha256 of the file, lower-case hex; `null` until someone records it from the Hub.
    sha256: Option<String>,
    /// Config preset the graph must match.
    #[serde(default)]
    preset: Option<String>,
    /// Input normalisation, when neither the graph nor the preset gives the right one.
    #[serde(default)]
    input_norm: Option<InputNorm>,
    /// Verification threshold (cosine) to store.
    #[serde(default)]
    threshold: Option<f64>,
    /// Or: a verification set under the assets folder to measure the threshold on (the mean
    /// exact-protocol fold threshold with the flip test, as `mfn-cli eval
    /// --save-threshold` measures it).
    #[serde(default)]
    threshold_set: Option<PathBuf>,
    /// Free text for readers of the file.
    #[serde(default, rename = "note")]
    _note: Option<String>,
}

/// Where things go, and whether the network may be used.
struct Settings {
    cache: PathBuf,
    out: PathBuf,
    offline: bool,
    offline_reason: &'static str,
    allow_unpinned: bool,
    assets: Option<PathBuf>,
    list: Option<PathBuf>,
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    let (entries, list) = match &args.repo {
        Some(repo) => (vec![adhoc_entry(&args, repo)?], None),
        None => {
            let path = args
                .models
                .clone()
                .unwrap_or_else(|| crate::workspace_root().join("xtask/models.json"));
            let list: ModelList = crate::read_json(&path)?;
            let mut entries = list.models;
            // Two entries of one name would write one file.
            let mut names = std::collections::HashSet::new();
            if let Some(dup) = entries.iter().find(|e| !names.insert(e.name.as_str())) {
                bail!("{} lists the name `{}` twice", path.display(), dup.name);
            }
            if !args.only.is_empty() {
                for n in &args.only {
                    if !entries.iter().any(|e| &e.name == n) {
                        bail!("--only {n}: {} has no model of that name", path.display());
                    }
                }
                entries.retain(|e| args.only.contains(&e.name));
            }
            if entries.is_empty() {
                bail!("{} lists no models", path.display());
            }
            (entries, Some(path))
        }
    };
    for e in &entries {
        validate(e, list.as_deref())?;
    }
    let env_offline = env_flag("HF_HUB_OFFLINE");
    let ctx = Settings {
        cache: match &args.cache {
            Some(c) => c.clone(),
            None => default_cache_dir()?,
        },
        out: match &args.out {
            Some(o) => o.clone(),
            None => default_out_dir()?,
        },
        offline: args.offline || env_offline,
        offline_reason: if args.offline {
            "--offline"
        } else {
            "HF_HUB_OFFLINE is set"
        },
        allow_unpinned: args.allow_unpinned,
        assets: args.assets.clone(),
        list,
    };
    for e in &entries {
        let path = fetch_one(e, &ctx).with_context(|| format!("fetching `{}`", e.name))?;
        println!("{}: {}", e.name, path.display());
    }
    Ok(())
}

/// `$MFN_HOME/hub`, else the Hub's own cache as `huggingface_hub` finds it.
fn default_cache_dir() -> Result<PathBuf> {
    if let Some(home) = env_path(MFN_HOME) {
        return Ok(home.join("hub"));
    }
    if let Some(p) = env_path("HF_HUB_CACHE") {
        return Ok(p);
    }
    if let Some(p) = env_path("HF_HOME") {
        return Ok(p.join("hub"));
    }
    let home =
        env_path("HOME").context("no HOME, HF_HOME, HF_HUB_CACHE or MFN_HOME: pass --cache DIR")?;
    Ok(home.join(".cache/huggingface/hub"))
}

/// Where `fetch` writes converted models: `$MFN_HOME/models`, else `~/.cache/mfn/models`.
pub fn default_out_dir() -> Result<PathBuf> {
    if let Some(home) = env_path(MFN_HOME) {
        return Ok(home.join("models"));
    }
    let home = env_path("HOME").context("no HOME or MFN_HOME: pass the models folder")?;
    Ok(home.join(".cache/mfn/models"))
}

/// The converted model called `name` in `dir`.
pub fn converted_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.safetensors"))
}

fn env_path(key: &str) -> Option<PathBuf> {
    std::env::var_os(key)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `huggingface_hub`'s truthy values for its boolean variables.
fn env_flag(key: &str) -> bool {
    std::env::var(key).is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

fn adhoc_entry(args: &Args, repo: &str) -> Result<ModelEntry> {
    let file = args.file.clone().context("--repo needs --file")?;
    let name = match &args.name {
        Some(n) => n.clone(),
        None => repo.rsplit('/').next().unwrap_or(repo).to_string(),
    };
    Ok(ModelEntry {
        name,
        repo: repo.to_string(),
        file,
        revision: args.revision.clone().unwrap_or_else(|| "main".into()),
        sha256: args.sha256.as_ref().map(|s| s.to_ascii_lowercase()),
        preset: args.preset.clone(),
        input_norm: None,
        threshold: args.threshold,
        threshold_set: None,
        _note: None,
    })
}

fn validate(e: &ModelEntry, list: Option<&Path>) -> Result<()> {
    let whence = match list {
        Some(p) => format!("model `{}` in {}", e.name, p.display()),
        None => format!("model `{}`", e.name),
    };
    let safe_name = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if !safe_name(&e.name) {
        bail!("{whence}: the name may only hold letters, digits, `-`, `_` and `.`");
    }
    // The repository and file become paths inside the cache: nothing may climb out of it.
    let parts: Vec<&str> = e.repo.split('/').collect();
    if parts.len() != 2 || !parts.iter().all(|p| safe_name(p)) {
        bail!("{whence}: repo `{}` is not `org/name`", e.repo);
    }
    let file = Path::new(&e.file);
    if e.file.is_empty() || !file.components().all(|c| matches!(c, Component::Normal(_))) {
        bail!(
            "{whence}: file `{}` is not a relative path inside the repository",
            e.file
        );
    }
    if e.revision.is_empty()
        || e.revision.contains("..")
        || e.revision.starts_with('/')
        || e.revision.contains('\\')
    {
        bail!(
            "{whence}: revision `{}` is not a branch, tag or commit",
            e.revision
        );
    }
    if let Some(h) = &e.sha256 {
        if h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
            bail!("{whence}: sha256 `{h}` is not 64 hex digits");
        }
    }
    if let Some(p) = &e.preset {
        if Config::preset(p).is_none() {
            bail!(
                "{whence}: unknown preset `{p}`; known: {}",
                Config::PRESETS.join(", ")
            );
        }
    }
    if let Some(t) = e.threshold {
        if !(-1.0..=1.0).contains(&t) {
            bail!("{whence}: threshold {t} is not a cosine in -1..1");
        }
        if e.threshold_set.is_some() {
            bail!("{whence}: give `threshold` or `threshold_set`, not both");
        }
    }
    Ok(())
}

fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

/// The file in the cache, as `hf-hub` resolves it (`refs/REVISION` names the snapshot).
/// A commit-hash revision also finds its snapshot without a ref, as `huggingface_hub`
/// leaves it after `hf_hub_download(revision=COMMIT)`.
fn cached(cache: &Cache, e: &ModelEntry) -> Option<PathBuf> {
    let repo = cache.repo(Repo::with_revision(
        e.repo.clone(),
        RepoType::Model,
        e.revision.clone(),
    ));
    if let Some(p) = repo.get(&e.file) {
        return Some(p);
    }
    let snapshot = if is_commit(&e.revision) {
        e.revision.clone()
    } else {
        // A ref written by hand often ends in a newline, which `hf-hub` keeps.
        let folder = Repo::model(e.repo.clone()).folder_name();
        let r = cache.path().join(folder).join("refs").join(&e.revision);
        std::fs::read_to_string(r).ok()?.trim().to_string()
    };
    let p = repo.pointer_path(&snapshot).join(&e.file);
    p.exists().then_some(p)
}

/// What to download and where to put it, for a model missing from the cache.
fn missing_help(e: &ModelEntry, cache: &Path) -> String {
    let endpoint = std::env::var(HF_ENDPOINT).unwrap_or_else(|_| DEFAULT_ENDPOINT.into());
    let folder = cache.join(Repo::model(e.repo.clone()).folder_name());
    let place = if is_commit(&e.revision) {
        format!(
            "put it at {}",
            folder
                .join("snapshots")
                .join(&e.revision)
                .join(&e.file)
                .display()
        )
    } else {
        format!(
            "put it at {}, where <COMMIT> is the commit that `{}` names, and write that commit \
             hash into {}",
            folder.join("snapshots/<COMMIT>").join(&e.file).display(),
            e.revision,
            folder.join("refs").join(&e.revision).display()
        )
    };
    format!(
        "download {endpoint}/{}/resolve/{}/{} and {place}; or, with network access, run \
         `cargo xtask fetch` again, or `huggingface-cli download {} {} --revision {} \
         --cache-dir {}`",
        e.repo,
        e.revision,
        e.file,
        e.repo,
        e.file,
        e.revision,
        cache.display()
    )
}

fn fetch_one(e: &ModelEntry, ctx: &Settings) -> Result<PathBuf> {
    let cache = Cache::new(ctx.cache.clone());
    let path = match cached(&cache, e) {
        Some(p) => {
            println!(
                "{}: {}@{}:{} in the cache",
                e.name, e.repo, e.revision, e.file
            );
            p
        }
        None if ctx.offline => bail!(
            "{}@{}:{} is not in the Hub cache {} and downloads are off ({}): {}",
            e.repo,
            e.revision,
            e.file,
            ctx.cache.display(),
            ctx.offline_reason,
            missing_help(e, &ctx.cache)
        ),
        None => download(e, &cache).with_context(|| {
            format!(
                "downloading {}@{}:{} into {} failed: {}",
                e.repo,
                e.revision,
                e.file,
                ctx.cache.display(),
                missing_help(e, &ctx.cache)
            )
        })?,
    };
    let actual = sha256_file(&path)?;
    match &e.sha256 {
        Some(want) if want.eq_ignore_ascii_case(&actual) => {
            println!("{}: sha256 {actual} matches the pin", e.name)
        }
        Some(want) => bail!(
            "{} ({}@{}:{}) has sha256 {actual}, but the pin is {want}: the file is damaged or \
             was changed. Delete it (and the blob it links to) and fetch again; change the \
             pin only after checking the file on the Hub",
            path.display(),
            e.repo,
            e.revision,
            e.file
        ),
        None if ctx.allow_unpinned => eprintln!(
            "warning: {}@{}:{} is not pinned; its sha256 is {actual}",
            e.repo, e.revision, e.file
        ),
        None => bail!(
            "{}@{}:{} has no sha256 pin{}; the file in the cache ({}) has sha256 {actual}. Check \
             that against the file's page on the Hub and record it as the entry's `sha256` (and \
             its commit as `revision`), or pass --allow-unpinned",
            e.repo,
            e.revision,
            e.file,
            ctx.list
                .as_ref()
                .map(|l| format!(" in {}", l.display()))
                .unwrap_or_default(),
            path.display()
        ),
    }
    convert(e, &path, &actual, ctx)
}

fn download(e: &ModelEntry, cache: &Cache) -> Result<PathBuf> {
    let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .with_progress(std::io::stderr().is_terminal());
    if let Ok(endpoint) = std::env::var(HF_ENDPOINT) {
        builder = builder.with_endpoint(endpoint);
    }
    let api = builder.build().context("setting up the Hub client")?;
    let repo = api.repo(Repo::with_revision(
        e.repo.clone(),
        RepoType::Model,
        e.revision.clone(),
    ));
    println!("{}: downloading {}", e.name, repo.url(&e.file));
    Ok(repo.download(&e.file)?)
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The commit a cached file belongs to: the snapshot folder it sits in.
fn snapshot_commit(path: &Path, file: &str) -> Option<String> {
    let mut dir = path.to_path_buf();
    for _ in Path::new(file).components() {
        dir.pop();
    }
    let commit = dir.file_name()?.to_str()?.to_string();
    dir.pop();
    (dir.file_name()? == "snapshots").then_some(commit)
}

fn convert(e: &ModelEntry, path: &Path, sha256: &str, ctx: &Settings) -> Result<PathBuf> {
    let device = Device::Cpu;
    let preset = e.preset.as_deref().and_then(Config::preset);
    let mut ckpt = Checkpoint::load(path, preset.as_ref(), &device)
        .with_context(|| format!("reading {} as a MobileFaceNet", path.display()))?;
    if let Some(norm) = &e.input_norm {
        ckpt.config.input_norm = norm.clone();
    }
    let meta = &mut ckpt.metadata;
    meta.insert("mfn.name".into(), e.name.clone());
    meta.insert("mfn.source.repo".into(), e.repo.clone());
    meta.insert("mfn.source.file".into(), e.file.clone());
    meta.insert("mfn.source.revision".into(), e.revision.clone());
    if let Some(commit) = snapshot_commit(path, &e.file) {
        meta.insert("mfn.source.commit".into(), commit);
    }
    meta.insert("mfn.source.sha256".into(), sha256.to_string());

    match (e.threshold, &e.threshold_set) {
        (Some(t), _) => {
            ckpt.metadata.insert(THRESHOLD_KEY.into(), format!("{t}"));
            ckpt.metadata.insert(
                format!("{THRESHOLD_KEY}.source"),
                match &ctx.list {
                    Some(l) => format!("the models list {}", l.display()),
                    None => "given to `cargo xtask fetch --threshold`".into(),
                },
            );
        }
        (None, Some(set)) => {
            let assets = crate::assets(ctx.assets.as_deref()).with_context(|| {
                format!(
                    "the threshold of `{}` is measured on {}, under the assets folder",
                    e.name,
                    set.display()
                )
            })?;
            let set_path = assets.join(set);
            let model = ckpt
                .build(&device)
                .with_context(|| format!("building {}", path.display()))?;
            let data = DataSet::Bin {
                path: set_path.clone(),
                folds: 10,
            };
            let scores = eval::score(&model, &data, true)
                .with_context(|| format!("measuring the threshold on {}", set_path.display()))?;
            let (_, t) = eval::kfold(&scores, mfn_eval::Protocol::Exact)?;
            ckpt.metadata.insert(THRESHOLD_KEY.into(), format!("{t}"));
            ckpt.metadata.insert(
                format!("{THRESHOLD_KEY}.source"),
                format!(
                    "mean of the 10 exact-protocol fold thresholds on {} ({} pairs), flip test on",
                    set.display(),
                    scores.len()
                ),
            );
        }
        (None, None) => eprintln!(
            "warning: `{}` gets no verification threshold: measure one with `mfn-cli eval \
             --model MODEL.safetensors --save-threshold`",
            e.name
        ),
    }
    std::fs::create_dir_all(&ctx.out).with_context(|| format!("creating {}", ctx.out.display()))?;
    let out = converted_path(&ctx.out, &e.name);
    ckpt.save(&out)
        .with_context(|| format!("writing {}", out.display()))?;
    let n = &ckpt.config.input_norm;
    println!(
        "{}: config `{}`, input (x - {:?}) * {:?}, threshold {}",
        e.name,
        ckpt.config.name,
        n.mean,
        n.scale,
        ckpt.metadata
            .get(THRESHOLD_KEY)
            .map_or("none".to_string(), |t| t.clone())
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_commit_of_a_snapshot_path() {
        let p = Path::new("/c/models--a--b/snapshots/0123abcd/recognition/model.onnx");
        assert_eq!(
            snapshot_commit(p, "recognition/model.onnx").as_deref(),
            Some("0123abcd")
        );
        assert_eq!(
            snapshot_commit(Path::new("/x/model.onnx"), "model.onnx"),
            None
        );
    }

    #[test]
    fn rejects_entries_that_leave_the_cache() {
        let ok = ModelEntry {
            name: "m".into(),
            repo: "org/name".into(),
            file: "recognition/model.onnx".into(),
            revision: "main".into(),
            sha256: None,
            preset: None,
            input_norm: None,
            threshold: None,
            threshold_set: None,
            _note: None,
        };
        assert!(validate(&ok, None).is_ok());
        for bad in [
            ModelEntry {
                file: "../model.onnx".into(),
                ..ok.clone()
            },
            ModelEntry {
                file: "/etc/passwd".into(),
                ..ok.clone()
            },
            ModelEntry {
                repo: "../x".into(),
                ..ok.clone()
            },
            ModelEntry {
                revision: "../../x".into(),
                ..ok.clone()
            },
            ModelEntry {
                name: "a/b".into(),
                ..ok.clone()
            },
            ModelEntry {
                sha256: Some("abc".into()),
                ..ok.clone()
            },
        ] {
            assert!(validate(&bad, None).is_err(), "{bad:?}");
        }
    }
}
