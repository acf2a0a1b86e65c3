//! `cargo xtask fetch`: the pinned sources of the registry (`mfn-hub`), ready on disk.
//!
//! Each entry named (by default the default model and the `lfw` set) is found the way
//! every MFN tool finds it: under the assets folder (`MFN_ASSETS`), else in the cache,
//! else downloaded from its pinned source (`HF_ENDPOINT` and `MFN_MIRROR` move it), and
//! in each case checked against its size and sha256 before anything reads it. A model is
//! also converted once to the native format (`$MFN_HOME/models`, else
//! `~/.cache/mfn/models`, as `<name>-<sha256 prefix>.safetensors`), with the registry's
//! verification threshold under `mfn.threshold` and the source's sha256 under
//! `mfn.source.sha256`. `--list` prints the registry and what of it is on disk.
//!
//! With `HF_HUB_OFFLINE=1` (or `--offline`) nothing is downloaded: an entry missing from
//! the assets folder and the cache is an error that names its URL and the cache path.

use anyhow::{bail, Context, Result};
use mfn_hub::pretrained::{converted_path, THRESHOLD_KEY};
use mfn_hub::{Entry, Hub, Kind, Origin, Registry, Source};

/// An entry kind, as the command line spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KindArg {
    /// Face recognition models.
    Model,
    /// Face detectors.
    Detector,
    /// Verification sets.
    Set,
    /// Other files.
    File,
}

impl From<KindArg> for Kind {
    fn from(k: KindArg) -> Self {
        match k {
            KindArg::Model => Kind::Model,
            KindArg::Detector => Kind::Detector,
            KindArg::Set => Kind::Set,
            KindArg::File => Kind::File,
        }
    }
}

/// Arguments of `cargo xtask fetch`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Registry entries to fetch [default: the default model and the `lfw` set; with
    /// --kind, every entry of that kind].
    #[arg(value_name = "NAME", conflicts_with = "all")]
    names: Vec<String>,
    /// Every entry of the registry (with --kind, every entry of that kind).
    #[arg(long)]
    all: bool,
    /// Only entries of this kind; named entries must be of it.
    #[arg(long, value_enum)]
    kind: Option<KindArg>,
    /// Print the registry (or the selected entries) as a table, with what of it is on
    /// disk, and fetch nothing.
    #[arg(long)]
    list: bool,
    /// Never download; the same as HF_HUB_OFFLINE=1.
    #[arg(long)]
    offline: bool,
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    let mut hub = Hub::from_env().context("reading the registry of pinned sources")?;
    if args.offline {
        hub.resolver.offline = Some("--offline was given".into());
    }
    let entries = select(&hub.registry, &args)?;
    if args.list {
        print_table(&hub, &entries);
        return Ok(());
    }
    let mut failures = Vec::new();
    for e in &entries {
        if let Err(err) = fetch_one(&hub, e) {
            failures.push(format!("`{}`: {err:#}", e.name));
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} entries could not be fetched:\n  {}",
            failures.len(),
            entries.len(),
            failures.join("\n  ")
        );
    }
    Ok(())
}

/// The entries the arguments name, in the registry's order when not named one by one.
fn select<'r>(registry: &'r Registry, args: &Args) -> Result<Vec<&'r Entry>> {
    let kind = args.kind.map(Kind::from);
    let of_kind = |e: &Entry| kind.is_none_or(|k| e.kind == k);
    if !args.names.is_empty() {
        let mut out: Vec<&Entry> = Vec::new();
        for name in &args.names {
            let e = registry.get(name)?;
            if let Some(k) = kind.filter(|k| *k != e.kind) {
                bail!(
                    "`{name}` is a {}, not a {} (--kind {})",
                    e.kind.as_str(),
                    k.as_str(),
                    k.as_str()
                );
            }
            if !out.iter().any(|o| o.name == e.name) {
                out.push(e);
            }
        }
        return Ok(out);
    }
    if args.all || args.list || kind.is_some() {
        let out: Vec<&Entry> = registry.entries().filter(|e| of_kind(e)).collect();
        if out.is_empty() {
            bail!("the registry holds no entry of that kind");
        }
        return Ok(out);
    }
    Ok(vec![
        registry.get_kind(mfn_hub::DEFAULT_MODEL, Kind::Model)?,
        registry.get_kind("lfw", Kind::Set)?,
    ])
}

/// Finds (or downloads) one entry and, for a model, converts it; prints where it is.
fn fetch_one(hub: &Hub, e: &Entry) -> Result<()> {
    note_download(hub, e);
    if e.kind != Kind::Model {
        let got = hub.file(&e.name)?;
        println!(
            "{}: {} ({})",
            e.name,
            got.path.display(),
            origin(got.origin)
        );
        return Ok(());
    }
    for c in e.model.iter().flat_map(|m| &m.companions) {
        note_download(hub, hub.registry.get(c)?);
    }
    let native = converted_path(&hub.resolver, e);
    let converted_before = native.is_file();
    let m = hub.model(&e.name)?;
    println!(
        "{}: {} ({} from {}, {})",
        e.name,
        m.native.display(),
        if converted_before {
            "converted earlier"
        } else {
            "converted"
        },
        m.original.path.display(),
        origin(m.original.origin)
    );
    let c = &m.checkpoint;
    let n = &c.config.input_norm;
    println!(
        "{}: config `{}`, input (x - {:?}) * {:?}, threshold {}",
        e.name,
        c.config.name,
        n.mean,
        n.scale,
        c.metadata.get(THRESHOLD_KEY).map_or("none", String::as_str)
    );
    Ok(())
}

/// Where a resolved file came from, in one word.
fn origin(o: Origin) -> &'static str {
    match o {
        Origin::Assets => "assets",
        Origin::Cache => "cache",
        Origin::Download => "download",
    }
}

/// Whether the assets folder holds the entry's file (present, not checked).
fn in_assets(hub: &Hub, e: &Entry) -> bool {
    match (&hub.resolver.assets, &e.assets) {
        (Some(root), Some(rel)) => root.join(rel).is_file(),
        _ => false,
    }
}

/// Before a download: what comes from where, and how big it is.
fn note_download(hub: &Hub, e: &Entry) {
    let r = &hub.resolver;
    if in_assets(hub, e) || r.cache_path(e).is_file() || r.offline.is_some() {
        return;
    }
    eprintln!(
        "{}: downloading {} from {} into {}",
        e.name,
        human_size(e.size),
        r.url(e),
        r.cache_path(e).display()
    );
}

/// `13.6 MB`, `28.6 kB`: decimal units, as download sizes are usually given.
fn human_size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

/// The registry as a table: name, kind, size, sha256 prefix, what is on disk (the assets
/// folder's copy, the cache's, a converted model), and the source URL (wheel members with
/// their path inside the archive).
fn print_table(hub: &Hub, entries: &[&Entry]) {
    let rows: Vec<[String; 6]> = entries
        .iter()
        .map(|e| {
            let mut present = Vec::new();
            if in_assets(hub, e) {
                present.push("assets");
            }
            if hub.resolver.cache_path(e).is_file() {
                present.push("cache");
            }
            if e.kind == Kind::Model && converted_path(&hub.resolver, e).is_file() {
                present.push("converted");
            }
            let mut source = hub.resolver.url(e);
            if let Source::Url(u) = &e.source {
                if let Some(m) = &u.member {
                    source.push_str(&format!(" (member {m})"));
                }
            }
            [
                e.name.clone(),
                e.kind.as_str().to_string(),
                human_size(e.size),
                e.sha256[..12].to_string(),
                if present.is_empty() {
                    "-".to_string()
                } else {
                    present.join(",")
                },
                source,
            ]
        })
        .collect();
    let header = ["name", "kind", "size", "sha256", "present", "source"].map(String::from);
    let mut width = [0usize; 5];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        println!(
            "{:<w0$}  {:<w1$}  {:>w2$}  {:<w3$}  {:<w4$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2],
            w3 = width[3],
            w4 = width[4],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(names: &[&str], all: bool, kind: Option<KindArg>) -> Args {
        Args {
            names: names.iter().map(|s| s.to_string()).collect(),
            all,
            kind,
            list: false,
            offline: false,
        }
    }

    fn names(v: Vec<&Entry>) -> Vec<&str> {
        v.into_iter().map(|e| e.name.as_str()).collect()
    }

    #[test]
    fn selects_the_default_model_and_lfw_unless_told_otherwise() {
        let reg = Registry::builtin().unwrap();
        assert_eq!(
            names(select(&reg, &args(&[], false, None)).unwrap()),
            [mfn_hub::DEFAULT_MODEL, "lfw"]
        );
        let all = select(&reg, &args(&[], true, None)).unwrap();
        assert_eq!(all.len(), reg.entries().count());
        let sets = select(&reg, &args(&[], false, Some(KindArg::Set))).unwrap();
        assert!(!sets.is_empty());
        assert!(sets.iter().all(|e| e.kind == Kind::Set));
        assert_eq!(
            names(select(&reg, &args(&["lfw", "lfw"], false, Some(KindArg::Set))).unwrap()),
            ["lfw"]
        );
        let err = select(&reg, &args(&["lfw"], false, Some(KindArg::Model))).unwrap_err();
        assert!(err.to_string().contains("`lfw` is a set"), "{err}");
        let err = select(&reg, &args(&["no-such"], false, None)).unwrap_err();
        assert!(err.to_string().contains("no-such"), "{err}");
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_size(13_616_099), "13.6 MB");
        assert_eq!(human_size(28_570), "28.6 kB");
        assert_eq!(human_size(999), "999 B");
    }
}
