//! `mfn-cli gallery`: 1:N identification against a gallery of labelled faces
//! (`mfn-gallery`): enroll, search, identify, remove, list, stats, and the LFW open-set
//! protocol.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use mfn_detect::Pipeline;
use mfn_gallery::{Enrollment, Fingerprint, Gallery, Hit, Identity, IndexKind, Location, Storage};
use serde_json::{json, Value};

use super::{
    args, asset_or, check_output, image_size, load_checkpoint, progress, write_atomic,
    write_atomic_with, DetectorArgs, PickArg,
};

/// The false alarm rates `gallery eval` reports DIR at.
const FARS: [f64; 2] = [1e-2, 1e-3];

/// The image files `--from-dir` enrolls.
const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "bmp", "webp"];

/// Arguments of `mfn-cli gallery`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Enrolls labelled faces: photos (the face each is about) or aligned crops, all in one
    /// transaction; creates the gallery if needed.
    Enroll(EnrollArgs),
    /// The k most similar enrolled faces for each photo.
    Search(SearchArgs),
    /// Who each photo shows, or "unknown" when no enrolled face clears the threshold.
    Identify(IdentifyArgs),
    /// Removes the faces of a label, or one face by id.
    Remove(RemoveArgs),
    /// Lists the enrolled faces.
    List(DbArgs),
    /// What the gallery holds and which model it belongs to.
    Stats(DbArgs),
    /// The LFW open-set protocol: rank-1, CMC and DIR at FAR 1e-2 and 1e-3.
    Eval(EvalArgs),
}

/// `--db` and `--json`, shared by every command but `eval`.
#[derive(clap::Args, Debug)]
struct DbArgs {
    /// The gallery: a SQLite file (`faces.db` or `sqlite:faces.db`), or a PostgreSQL
    /// database with pgvector (`postgres://user:password@host:port/db`); `enroll`
    /// creates it when it is not there.
    #[arg(long)]
    db: String,
    /// Also write the table as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// How `search`, `identify` and `eval` search the gallery.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
enum IndexArg {
    /// Every face scored: the true top-k.
    #[default]
    Exact,
    /// An HNSW graph (M 16, ef_construction 200, ef_search 384): approximate, much faster
    /// on large galleries; kept in `<db>.hnsw` beside a SQLite gallery, built on first use
    /// and brought up to date with later enrollments.
    Hnsw,
}

impl IndexArg {
    fn kind(self) -> IndexKind {
        match self {
            Self::Exact => IndexKind::Exact,
            Self::Hnsw => IndexKind::hnsw(),
        }
    }
}

/// How a new gallery stores its embeddings.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
enum StorageArg {
    /// 4 bytes a value: exact.
    #[default]
    F32,
    /// 2 bytes a value (IEEE half precision).
    F16,
    /// 1 byte a value and a scale per face.
    Int8,
}

impl StorageArg {
    fn storage(self) -> Storage {
        match self {
            Self::F32 => Storage::F32,
            Self::F16 => Storage::F16,
            Self::Int8 => Storage::Int8,
        }
    }
}

/// The model and how faces are found in photos.
#[derive(clap::Args, Debug)]
struct ModelArgs {
    /// Model: a file (native `.safetensors`, MXNet `*-symbol.json`, `.onnx`, `.pt`) or a
    /// registry name [default: w600k_mbf]. A gallery belongs to the model that enrolled it.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The images are aligned crops at the model's input size: skip detection.
    #[arg(long)]
    aligned: bool,
    /// Embed each face alone, without adding its mirror image.
    #[arg(long)]
    no_flip: bool,
    #[command(flatten)]
    detector: DetectorArgs,
}

#[derive(clap::Args, Debug)]
struct EnrollArgs {
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// Who the photos show.
    #[arg(
        long,
        required_unless_present = "from_dir",
        conflicts_with = "from_dir"
    )]
    label: Option<String>,
    /// A folder with one sub-folder of images per person, named after the person.
    #[arg(long)]
    from_dir: Option<PathBuf>,
    /// Photos (or aligned crops with --aligned) of the person --label names.
    #[arg(required_unless_present = "from_dir", conflicts_with = "from_dir")]
    photos: Vec<PathBuf>,
    /// How a gallery created by this command stores embeddings: f16 and int8 take a half
    /// and about a quarter of the room of f32, at a small cost in recall; recorded in the
    /// gallery (SQLite only: PostgreSQL stores f32) [default: f32].
    #[arg(long, value_enum)]
    storage: Option<StorageArg>,
}

#[derive(clap::Args, Debug)]
struct SearchArgs {
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// How many faces to list per photo (1..=1000).
    #[arg(long, default_value_t = 5, allow_negative_numbers = true, value_parser = args::count(1, 1000))]
    k: usize,
    /// The search index.
    #[arg(long, value_enum, default_value_t)]
    index: IndexArg,
    /// Photos to search for (aligned crops with --aligned).
    #[arg(required = true)]
    photos: Vec<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct IdentifyArgs {
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// Cosine a match must reach, in -1..=1 [default: the model's verification threshold:
    /// its `mfn.threshold` metadata, else the registry's for its weights].
    #[arg(long, allow_negative_numbers = true, value_parser = args::cosine)]
    threshold: Option<f64>,
    /// The search index.
    #[arg(long, value_enum, default_value_t)]
    index: IndexArg,
    /// Photos to identify (aligned crops with --aligned).
    #[arg(required = true)]
    photos: Vec<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct RemoveArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Removes every face with this label.
    #[arg(long, required_unless_present = "id", conflicts_with = "id")]
    label: Option<String>,
    /// Removes the face with this id.
    #[arg(long)]
    id: Option<i64>,
}

#[derive(clap::Args, Debug)]
struct EvalArgs {
    /// Model: a file or a registry name [default: w600k_mbf].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Folder of aligned faces, `<Name>/<Name>_<NNNN>.<ext>`
    /// [default: $MFN_ASSETS/lfw/aligned-112x112].
    #[arg(long)]
    images: Option<PathBuf>,
    /// Extension of the image files.
    #[arg(long, default_value = "jpg", value_parser = args::extension)]
    ext: String,
    /// Deepest rank of the CMC curve (1..=1000).
    #[arg(long, default_value_t = 10, allow_negative_numbers = true, value_parser = args::count(1, 1000))]
    k: usize,
    /// The index the gallery is searched with (built in memory here).
    #[arg(long, value_enum, default_value_t)]
    index: IndexArg,
    /// The precision the enrolled embeddings are kept in, as a gallery created with
    /// `enroll --storage` would keep them (probes stay f32).
    #[arg(long, value_enum, default_value_t)]
    storage: StorageArg,
    /// Run the protocol through a real gallery: enroll the gallery images into this new
    /// one (a SQLite file or `postgres://...`; it must not exist), then search every probe
    /// through it with --index, so each backend's own search is measured. Without it the
    /// index is built in memory.
    #[arg(long)]
    db: Option<String>,
    /// Write the embeddings (unit length, little-endian f32, one row per image in the
    /// protocol's order: gallery, known probes, unknown probes) to this file.
    #[arg(long, conflicts_with = "load_embeddings")]
    save_embeddings: Option<PathBuf>,
    /// Read the embeddings from a file written by --save-embeddings with the same model
    /// and images instead of embedding the images again.
    #[arg(long)]
    load_embeddings: Option<PathBuf>,
    /// Embed each face alone, without adding its mirror image.
    #[arg(long)]
    no_flip: bool,
    /// Images per batch (1..=1024).
    #[arg(long, default_value_t = 8, allow_negative_numbers = true, value_parser = args::count(1, args::MAX_BATCH))]
    batch: usize,
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw the CMC curve (`.svg` or `.png`).
    #[arg(long, value_parser = args::plot_file)]
    cmc: Option<PathBuf>,
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Enroll(a) => enroll(a),
        Command::Search(a) => search(a),
        Command::Identify(a) => identify(a),
        Command::Remove(a) => remove(a),
        Command::List(a) => list(a),
        Command::Stats(a) => stats(a),
        Command::Eval(a) => eval(a),
    }
}

/// The model, its fingerprint and dimension, the gallery checked against them, and the
/// pipeline; `threshold` as the caller gives it.
struct Loaded {
    pipeline: Pipeline,
    gallery: Gallery,
    fingerprint: Fingerprint,
    aligned: bool,
}

/// `create`: make the gallery when it is not there, storing embeddings as it says (a
/// storage other than an existing gallery's is refused).
fn load(
    db: &DbArgs,
    m: &ModelArgs,
    create: Option<Option<Storage>>,
    threshold: Option<f64>,
) -> Result<Loaded> {
    if let Some(path) = &db.json {
        check_output(path, "--json")?;
    }
    if m.detector.pick == PickArg::All {
        bail!("--pick all: the gallery takes one face per photo; use central or largest");
    }
    let ckpt = load_checkpoint(m.model.clone(), None)?;
    let fingerprint = Fingerprint::of(&ckpt)
        .with_context(|| format!("fingerprinting {}", ckpt.source.display()))?;
    let dim = ckpt.config.embedding_size;
    // Another model's gallery is refused before any work.
    let location = Location::parse(&db.db);
    let exists = create.is_none() || Gallery::exists(&location).context("opening the gallery")?;
    let gallery = if exists {
        let g = Gallery::open_for(location.clone(), &fingerprint, dim)
            .context("opening the gallery")?;
        if let Some(Some(want)) = create {
            if g.storage() != want {
                bail!(
                    "--storage {want}: {} exists and stores {} embeddings; the storage is \
                     chosen when a gallery is created",
                    g.location(),
                    g.storage()
                );
            }
        }
        Some(g)
    } else {
        None
    };
    let mut builder = m.detector.builder()?.checkpoint(ckpt).flip(!m.no_flip);
    if let Some(t) = threshold {
        builder = builder.threshold(t);
    }
    if m.aligned {
        builder = builder.without_detector();
    }
    let pipeline = builder.build().context("loading the pipeline")?;
    // A new gallery only once the pipeline has loaded: a failed load leaves no file.
    let gallery = match gallery {
        Some(g) => g,
        None => {
            let storage = create.flatten().unwrap_or_default();
            Gallery::create_with(location, &fingerprint, dim, storage)
                .context("creating the gallery")?
        }
    };
    Ok(Loaded {
        pipeline,
        gallery,
        fingerprint,
        aligned: m.aligned,
    })
}

impl Loaded {
    /// The embedding of the face a photo is about, or of an aligned crop.
    fn embed(&self, photo: &Path) -> Result<Vec<f32>> {
        if self.aligned {
            Ok(mfn_gallery::embed_crop(&self.pipeline, photo)?)
        } else {
            Ok(self.pipeline.face(photo)?.embedding)
        }
    }

    /// Embeddings of `photos`, with a progress bar when there are several.
    fn embed_all(&self, photos: &[PathBuf], what: &str) -> Result<Vec<Vec<f32>>> {
        let missing = mfn_data::missing_files(photos);
        if !missing.is_empty() {
            let list: Vec<String> = missing.iter().map(|p| p.display().to_string()).collect();
            bail!(
                "{} image(s) not found:\n  {}",
                missing.len(),
                list.join("\n  ")
            );
        }
        let bar = progress(photos.len(), what);
        if photos.len() < 4 {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let mut out = Vec::with_capacity(photos.len());
        for p in photos {
            out.push(self.embed(p)?);
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok(out)
    }

    fn header(&self) -> Value {
        json!({
            "db": self.gallery.location(),
            "model": self.pipeline.model_source().display().to_string(),
            "fingerprint": self.fingerprint.hex(),
        })
    }
}

/// `(label, image)` for every image of every sub-folder of `dir`, by name.
fn from_dir(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let read = |d: &Path| -> Result<Vec<PathBuf>> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(d).with_context(|| format!("reading {}", d.display()))? {
            v.push(
                e.with_context(|| format!("reading {}", d.display()))?
                    .path(),
            );
        }
        v.sort();
        Ok(v)
    };
    let mut out = Vec::new();
    for person in read(dir)?.into_iter().filter(|p| p.is_dir()) {
        let label = person
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{}: the folder name is not UTF-8", person.display()))?
            .to_string();
        for image in read(&person)? {
            let ext = image
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase);
            if image.is_file() && ext.is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str())) {
                out.push((label.clone(), image));
            }
        }
    }
    if out.is_empty() {
        bail!(
            "--from-dir {}: no images ({}) in its sub-folders; expected one sub-folder per \
             person, named after the person",
            dir.display(),
            IMAGE_EXTENSIONS.join(", ")
        );
    }
    Ok(out)
}

fn enroll(a: EnrollArgs) -> Result<()> {
    let items: Vec<(String, PathBuf)> = match (&a.from_dir, &a.label) {
        (Some(dir), _) => from_dir(dir)?,
        (None, Some(label)) => a
            .photos
            .iter()
            .map(|p| (label.clone(), p.clone()))
            .collect(),
        (None, None) => bail!("give --label NAME with photos, or --from-dir DIR"),
    };
    let storage = a.storage.map(StorageArg::storage);
    let mut l = load(&a.db, &a.model, Some(storage), None)?;
    let photos: Vec<PathBuf> = items.iter().map(|(_, p)| p.clone()).collect();
    let embeddings = l.embed_all(&photos, "embedding")?;
    let faces: Vec<Enrollment> = items
        .into_iter()
        .zip(embeddings)
        .map(|((label, photo), embedding)| Enrollment {
            label,
            embedding,
            source: Some(photo.display().to_string()),
        })
        .collect();
    let ids = l.gallery.enroll(&faces).context("enrolling")?;
    println!("{:>6}  {:<24}  source", "id", "label");
    for (id, f) in ids.iter().zip(&faces) {
        println!(
            "{id:>6}  {:<24}  {}",
            f.label,
            f.source.as_deref().unwrap_or("")
        );
    }
    let total = l.gallery.len()?;
    println!();
    println!(
        "enrolled {} face(s) into {}; it holds {total}",
        ids.len(),
        l.gallery.location()
    );
    if let Some(path) = &a.db.json {
        let mut out = l.header();
        out["enrolled"] = ids
            .iter()
            .zip(&faces)
            .map(|(id, f)| json!({"id": id, "label": f.label, "source": f.source}))
            .collect();
        out["faces"] = json!(total);
        write_atomic(path, serde_json::to_string_pretty(&out)?.as_bytes())?;
    }
    Ok(())
}

fn hit_json(h: &Hit) -> Value {
    json!({"id": h.id, "label": h.label, "score": h.score})
}

fn search(a: SearchArgs) -> Result<()> {
    let mut l = load(&a.db, &a.model, None, None)?;
    l.gallery.set_index_kind(a.index.kind());
    let embeddings = l.embed_all(&a.photos, "searching")?;
    let mut results = Vec::new();
    println!(
        "{:>4}  {:>6}  {:<24}  {:>7}  photo",
        "rank", "id", "label", "cosine"
    );
    for (photo, e) in a.photos.iter().zip(&embeddings) {
        let hits = l.gallery.search(e, a.k)?;
        if hits.is_empty() {
            println!(
                "{:>4}  {:>6}  {:<24}  {:>7}  {}",
                "-",
                "-",
                "(empty gallery)",
                "-",
                photo.display()
            );
        }
        for (rank, h) in hits.iter().enumerate() {
            println!(
                "{:>4}  {:>6}  {:<24}  {:>7.4}  {}",
                rank + 1,
                h.id,
                h.label,
                h.score,
                photo.display()
            );
        }
        results.push(json!({
            "photo": photo.display().to_string(),
            "hits": hits.iter().map(hit_json).collect::<Vec<_>>(),
        }));
    }
    if let Some(path) = &a.db.json {
        let mut out = l.header();
        out["k"] = json!(a.k);
        out["results"] = json!(results);
        write_atomic(path, serde_json::to_string_pretty(&out)?.as_bytes())?;
    }
    Ok(())
}

fn identify(a: IdentifyArgs) -> Result<()> {
    let mut l = load(&a.db, &a.model, None, a.threshold)?;
    l.gallery.set_index_kind(a.index.kind());
    let threshold = l.pipeline.threshold().with_context(|| {
        format!(
            "{} has no verification threshold: neither its metadata nor the registry (by the \
             sha256 of its weights) gives one. Pass --threshold",
            l.pipeline.model_source().display()
        )
    })?;
    eprintln!(
        "threshold {:.4} from {}",
        threshold.cosine, threshold.source
    );
    let embeddings = l.embed_all(&a.photos, "identifying")?;
    let mut results = Vec::new();
    println!(
        "{:<24}  {:>7}  {:<24}  photo",
        "identity", "cosine", "closest"
    );
    for (photo, e) in a.photos.iter().zip(&embeddings) {
        let answer = l.gallery.identify(e, threshold.cosine as f32)?;
        let best = answer.best();
        println!(
            "{:<24}  {:>7}  {:<24}  {}",
            answer.label().unwrap_or("unknown"),
            best.map_or("-".into(), |h| format!("{:.4}", h.score)),
            best.map_or("-", |h| h.label.as_str()),
            photo.display(),
        );
        results.push(json!({
            "photo": photo.display().to_string(),
            "known": matches!(answer, Identity::Known(_)),
            "label": answer.label(),
            "best": best.map(hit_json),
        }));
    }
    if let Some(path) = &a.db.json {
        let mut out = l.header();
        out["threshold"] = json!(threshold.cosine);
        out["threshold_source"] = json!(threshold.source);
        out["threshold_derivation"] = json!(threshold.derivation);
        out["results"] = json!(results);
        write_atomic(path, serde_json::to_string_pretty(&out)?.as_bytes())?;
    }
    Ok(())
}

fn open_any(db: &DbArgs) -> Result<Gallery> {
    if let Some(path) = &db.json {
        check_output(path, "--json")?;
    }
    Gallery::open(db.db.as_str()).context("opening the gallery")
}

fn remove(a: RemoveArgs) -> Result<()> {
    let mut g = open_any(&a.db)?;
    let (what, removed) = match (&a.label, a.id) {
        (Some(label), _) => (format!("label `{label}`"), g.remove_label(label)?),
        (None, Some(id)) => (format!("id {id}"), g.remove_id(id)? as usize),
        (None, None) => bail!("give --label NAME or --id N"),
    };
    if removed == 0 {
        bail!("{}: no face with {what}", g.location());
    }
    let left = g.len()?;
    println!(
        "removed {removed} face(s) with {what}; {} holds {left}",
        g.location()
    );
    if let Some(path) = &a.db.json {
        let out = json!({"db": g.location(), "label": a.label, "id": a.id,
                         "removed": removed, "faces": left});
        write_atomic(path, serde_json::to_string_pretty(&out)?.as_bytes())?;
    }
    Ok(())
}

fn list(a: DbArgs) -> Result<()> {
    let g = open_any(&a)?;
    let faces = g.list()?;
    println!("{:>6}  {:<24}  {:>10}  source", "id", "label", "enrolled");
    for f in &faces {
        println!(
            "{:>6}  {:<24}  {:>10}  {}",
            f.id,
            f.label,
            f.time,
            f.source.as_deref().unwrap_or("")
        );
    }
    println!();
    println!("{} face(s) in {}", faces.len(), g.location());
    if let Some(path) = &a.json {
        let out = json!({"db": g.location(), "faces": faces});
        write_atomic(path, serde_json::to_string_pretty(&out)?.as_bytes())?;
    }
    Ok(())
}

fn stats(a: DbArgs) -> Result<()> {
    let g = open_any(&a)?;
    let s = g.stats()?;
    println!("gallery      {} ({})", s.location, s.backend);
    println!("format       version {}", s.format_version);
    println!("model        fingerprint {}", s.fingerprint);
    println!("dimension    {}", s.dim);
    println!("storage      {}", s.storage);
    println!("faces        {}", s.faces);
    println!(
        "labels       {} (at most {} faces under one)",
        s.labels, s.max_faces_per_label
    );
    println!("created      {} (unix seconds)", s.created);
    if let Some(bytes) = s.file_bytes {
        println!("file         {bytes} bytes");
    }
    if let Some(path) = &a.json {
        write_atomic(path, serde_json::to_string_pretty(&s)?.as_bytes())?;
    }
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    if let Some(path) = &a.json {
        check_output(path, "--json")?;
    }
    if let Some(path) = &a.cmc {
        check_output(path, "--cmc")?;
    }
    let root = asset_or(a.images.clone(), "lfw/aligned-112x112", "--images")?;
    let split = mfn_gallery::OpenSetSplit::from_folder(&root, &a.ext)
        .with_context(|| format!("reading the people of {}", root.display()))?;
    if let Some(path) = &a.save_embeddings {
        check_output(path, "--save-embeddings")?;
    }
    let (ckpt, model) = super::load_model(a.model.clone(), None)?;
    let flip = !a.no_flip;
    let images = split.images();
    let start = Instant::now();
    let dim = model.config().embedding_size;
    let mut embeddings = match &a.load_embeddings {
        Some(path) => read_embeddings(path, images.len(), dim)?,
        None => {
            let bar = progress(images.len(), "embedding");
            let e = mfn_data::embed_images(
                &images,
                a.batch,
                image_size(model.config()),
                &Device::Cpu,
                |x| -> Result<_> { Ok(model.embed(x, flip)?) },
                |done| bar.set_position(done as u64),
            )?;
            bar.finish_and_clear();
            e
        }
    };
    if let Some(path) = &a.save_embeddings {
        let bytes: Vec<u8> = embeddings
            .iter()
            .flat_map(|e| unit(e))
            .flat_map(f32::to_le_bytes)
            .collect();
        write_atomic(path, &bytes)?;
    }
    let embed_seconds = start.elapsed().as_secs_f64();
    let storage = a.storage.storage();
    if storage != Storage::F32 {
        // The enrolled faces come first; they are kept as a gallery would keep them.
        for e in embeddings.iter_mut().take(split.gallery.len()) {
            *e = storage.round_trip(&unit(e));
        }
    }
    let search_start = Instant::now();
    let fingerprint = Fingerprint::of(&ckpt)
        .with_context(|| format!("fingerprinting {}", ckpt.source.display()))?;
    let report = match (&a.db, a.index) {
        (Some(db), _) => evaluate_in_gallery(
            &split,
            &embeddings,
            a.k,
            db,
            &fingerprint,
            a.index.kind(),
            storage,
        )
        .with_context(|| format!("evaluating {} through the gallery {db}", root.display()))?,
        (None, IndexArg::Exact) => split
            .evaluate(&embeddings, a.k, &FARS)
            .with_context(|| format!("evaluating {}", root.display()))?,
        (None, IndexArg::Hnsw) => evaluate_with(&split, &embeddings, a.k, a.index.kind())
            .with_context(|| format!("evaluating {}", root.display()))?,
    };
    let search_seconds = search_start.elapsed().as_secs_f64();
    let model_name = ckpt.source.display().to_string();
    println!("model      {model_name}");
    println!("index      {}", a.index.kind().name());
    println!("storage    {storage}");
    if let Some(db) = &a.db {
        println!("backend    {}", Location::parse(db));
    }
    println!(
        "images     {} under {}, flip test {}",
        images.len(),
        root.display(),
        if flip { "on" } else { "off" }
    );
    println!(
        "gallery    {} people (first image of each with 2 or more)",
        split.gallery.len()
    );
    println!(
        "probes     {} known (their other images), {} unknown (people with one image)",
        report.known_probes, report.unknown_probes
    );
    println!();
    println!("rank-1     {:>8.3}%", report.rank1 * 100.0);
    for r in [5, 10].into_iter().filter(|r| *r <= report.cmc.len()) {
        println!("rank-{r:<5} {:>8.3}%", report.cmc[r - 1] * 100.0);
    }
    for d in &report.dir_at_far {
        println!(
            "DIR@FAR={:<6} {:>8.3}%   at cosine {:.4}: {} of {} unknown probes accepted",
            d.far,
            d.dir * 100.0,
            d.threshold,
            d.false_alarms,
            d.unknown_probes
        );
    }
    println!();
    println!(
        "wall {:.1} s: embedding {embed_seconds:.1} s ({:.1} faces/s), search and scoring {search_seconds:.2} s",
        embed_seconds + search_seconds,
        images.len() as f64 / embed_seconds
    );
    if let Some(path) = &a.json {
        let out = json!({
            "model": model_name,
            "images": images.len(),
            "root": root.display().to_string(),
            "flip": flip,
            "gallery": split.gallery.len(),
            "index": a.index.kind().name(),
            "storage": storage,
            "db": a.db.as_deref().map(|d| Location::parse(d).to_string()),
            "report": report,
            "embed_seconds": embed_seconds,
            "search_seconds": search_seconds,
        });
        write_atomic(path, serde_json::to_string_pretty(&out)?.as_bytes())?;
    }
    if let Some(path) = &a.cmc {
        let title = format!(
            "{} on {}: LFW open set ({} enrolled)",
            ckpt.config.name,
            root.display(),
            split.gallery.len()
        );
        write_atomic_with(path, |tmp| {
            mfn_eval::open_set::plot_cmc(&report, tmp, &title)
        })?;
    }
    Ok(())
}

/// [`mfn_gallery::OpenSetSplit::evaluate`] searching through an index of `kind`:
/// embeddings in the order of `split.images()`, the enrolled ones first.
fn evaluate_with(
    split: &mfn_gallery::OpenSetSplit,
    embeddings: &[Vec<f32>],
    max_rank: usize,
    kind: IndexKind,
) -> mfn_gallery::Result<mfn_eval::open_set::OpenSetReport> {
    use mfn_eval::open_set::Probe;
    let enrolled = split.gallery.len();
    let dim = embeddings.first().map_or(0, Vec::len);
    let mut index = kind.build(dim)?;
    let ids: Vec<i64> = (0..enrolled as i64).collect();
    let rows: Vec<f32> = embeddings[..enrolled]
        .iter()
        .flat_map(|e| unit(e))
        .collect();
    index.add(&ids, &rows)?;
    let probes: Vec<f32> = embeddings[enrolled..]
        .iter()
        .flat_map(|e| unit(e))
        .collect();
    let ranked = index.search_many(&probes, max_rank);
    let candidates = |hits: &Vec<mfn_gallery::Scored>| -> Vec<(u32, f32)> {
        hits.iter().map(|s| (s.id as u32, s.score)).collect()
    };
    let probes: Vec<Probe> = ranked
        .iter()
        .enumerate()
        .map(|(i, hits)| match split.known.get(i) {
            Some((truth, _)) => Probe::known(*truth, candidates(hits)),
            None => Probe::unknown(candidates(hits)),
        })
        .collect();
    Ok(mfn_eval::open_set::evaluate(&probes, &FARS, max_rank)?)
}

/// `e` scaled to unit length (a zero vector stays zero).
fn unit(e: &[f32]) -> Vec<f32> {
    let norm = e
        .iter()
        .map(|v| (*v as f64).powi(2))
        .sum::<f64>()
        .sqrt()
        .max(1e-12);
    e.iter().map(|v| (*v as f64 / norm) as f32).collect()
}

/// Embeddings written by `--save-embeddings`: exactly `rows` rows of `dim` finite
/// little-endian f32.
fn read_embeddings(path: &Path, rows: usize, dim: usize) -> Result<Vec<Vec<f32>>> {
    let want = (rows * dim * 4) as u64;
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len != want {
        bail!(
            "{}: {len} bytes, but {rows} embeddings of {dim} values take {want}: written for \
             another model or image set",
            path.display()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() as u64 != want {
        bail!("{}: it changed while being read", path.display());
    }
    let mut out = Vec::with_capacity(rows);
    for (r, row) in bytes.chunks_exact(dim * 4).enumerate() {
        let v: Vec<f32> = row
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if let Some(j) = v.iter().position(|x| !x.is_finite()) {
            bail!(
                "{}: byte offset {}: value {j} of embedding {r} is {}",
                path.display(),
                (r * dim + j) * 4,
                v[j]
            );
        }
        out.push(v);
    }
    Ok(out)
}

/// [`mfn_gallery::OpenSetSplit::evaluate`] through a new gallery at `db`: the gallery
/// images enrolled in one batch (labelled by their position in the split), every probe
/// searched through [`Gallery::search`] with the index `kind`.
fn evaluate_in_gallery(
    split: &mfn_gallery::OpenSetSplit,
    embeddings: &[Vec<f32>],
    max_rank: usize,
    db: &str,
    fingerprint: &Fingerprint,
    kind: IndexKind,
    storage: Storage,
) -> Result<mfn_eval::open_set::OpenSetReport> {
    use mfn_eval::open_set::Probe;
    let location = Location::parse(db);
    if Gallery::exists(&location)? {
        bail!("--db {location}: a gallery is already there; --db takes a new one");
    }
    let enrolled = split.gallery.len();
    let dim = embeddings.first().map_or(0, Vec::len);
    let mut gallery = Gallery::create_with(location, fingerprint, dim, storage)?;
    let faces: Vec<Enrollment> = embeddings[..enrolled]
        .iter()
        .enumerate()
        .map(|(i, e)| Enrollment {
            label: i.to_string(),
            embedding: e.clone(),
            source: None,
        })
        .collect();
    gallery.enroll(&faces)?;
    gallery.set_index_kind(kind);
    let bar = progress(embeddings.len() - enrolled, "searching");
    let mut probes = Vec::with_capacity(embeddings.len() - enrolled);
    for (i, e) in embeddings[enrolled..].iter().enumerate() {
        let candidates: Vec<(u32, f32)> = gallery
            .search(e, max_rank)?
            .into_iter()
            .map(|h| Ok((h.label.parse::<u32>()?, h.score)))
            .collect::<Result<_>>()?;
        probes.push(match split.known.get(i) {
            Some((truth, _)) => Probe::known(*truth, candidates),
            None => Probe::unknown(candidates),
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    gallery.flush()?;
    Ok(mfn_eval::open_set::evaluate(&probes, &FARS, max_rank)?)
}
