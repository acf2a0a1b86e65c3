//! Finding a pinned file: the assets folder, then the cache, then a download, each copy
//! checked against the pin before anyone reads it.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::error::io;
use crate::registry::{hub_url, url_cache_path, Entry, RepoType, Source};
use crate::{Error, Result};

/// The environment variable of the assets folder, a local override of every source.
pub const ASSETS_ENV: &str = "MFN_ASSETS";
/// The environment variable of a mirror that serves every source from one base URL.
pub const MIRROR_ENV: &str = "MFN_MIRROR";
/// The environment variable of MFN's own cache folder (converted models, URL downloads,
/// and the Hub cache under `hub/`).
pub const HOME_ENV: &str = "MFN_HOME";
/// The Hub's own switch for offline use, honoured here too.
pub const OFFLINE_ENV: &str = "HF_HUB_OFFLINE";
/// The Hub's base URL, as `huggingface_hub` reads it.
pub const ENDPOINT_ENV: &str = "HF_ENDPOINT";
/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where a resolved file came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The assets folder.
    Assets,
    /// The cache, from an earlier download.
    Cache,
    /// Downloaded just now.
    Download,
}

/// A pinned file on disk, checked.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The file.
    pub path: PathBuf,
    /// Where it came from.
    pub origin: Origin,
}

/// Finds pinned files: the assets folder when it holds them, else the cache, else a
/// download (unless offline). Every copy's size and sha256 are checked before the path
/// is handed out.
#[derive(Clone, Debug)]
pub struct Resolver {
    /// The assets folder, when it exists.
    pub assets: Option<PathBuf>,
    /// Why there is no assets folder (`MFN_ASSETS` unset, or naming a missing folder).
    pub assets_note: Option<String>,
    /// The Hub cache (the layout `huggingface_hub` and `hf-hub` share).
    pub hub_cache: PathBuf,
    /// MFN's own cache: URL downloads under `urls/`, converted models under `models/`.
    pub cache: PathBuf,
    /// The Hub's base URL.
    pub endpoint: String,
    /// A mirror of every source: Hub files in the Hub's layout, URL files under
    /// `{mirror}/urls/{host}/{path}`.
    pub mirror: Option<String>,
    /// Why downloads are off, when they are.
    pub offline: Option<String>,
    /// Show a progress bar while downloading (drawn only on a terminal).
    pub progress: bool,
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

impl Resolver {
    /// Settings from the environment: `MFN_ASSETS`, `MFN_HOME`, `MFN_MIRROR`,
    /// `HF_ENDPOINT`, `HF_HUB_OFFLINE`, and the Hub cache as `huggingface_hub` finds it
    /// (`HF_HUB_CACHE`, `HF_HOME/hub`, `~/.cache/huggingface/hub`; `MFN_HOME/hub` first).
    pub fn from_env() -> Result<Self> {
        let (assets, assets_note) = match env_path(ASSETS_ENV) {
            Some(p) if p.is_dir() => (Some(p), None),
            Some(p) => (
                None,
                Some(format!(
                    "{ASSETS_ENV}={} is not a folder, so pinned files come from the cache or \
                     their public sources",
                    p.display()
                )),
            ),
            None => (
                None,
                Some(format!(
                    "{ASSETS_ENV} is not set, so pinned files come from the cache or their \
                     public sources"
                )),
            ),
        };
        let home = env_path("HOME");
        let cache = match (env_path(HOME_ENV), &home) {
            (Some(h), _) => h,
            (None, Some(h)) => h.join(".cache/mfn"),
            (None, None) => {
                return Err(Error::Setting(format!(
                    "neither {HOME_ENV} nor HOME is set: set {HOME_ENV} to a cache folder"
                )))
            }
        };
        let hub_cache = if let Some(h) = env_path(HOME_ENV) {
            h.join("hub")
        } else if let Some(p) = env_path("HF_HUB_CACHE") {
            p
        } else if let Some(p) = env_path("HF_HOME") {
            p.join("hub")
        } else {
            // `cache` exists only when HOME does, checked above.
            home.map(|h| h.join(".cache/huggingface/hub"))
                .unwrap_or_else(|| cache.join("hub"))
        };
        let mirror = std::env::var(MIRROR_ENV).ok().filter(|m| !m.is_empty());
        let offline = env_flag(OFFLINE_ENV).then(|| format!("{OFFLINE_ENV} is set"));
        Ok(Self {
            assets,
            assets_note,
            hub_cache,
            cache,
            endpoint: std::env::var(ENDPOINT_ENV)
                .ok()
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            mirror,
            offline,
            progress: true,
        })
    }

    /// The URL `entry` is downloaded from: its source, or the mirror's copy of it.
    pub fn url(&self, entry: &Entry) -> String {
        match (&entry.source, &self.mirror) {
            (Source::Hub(h), Some(m)) => hub_url(m, h),
            (Source::Hub(h), None) => hub_url(&self.endpoint, h),
            (Source::Url(u), Some(m)) => {
                let rest = u.url.split_once("://").map_or(u.url.as_str(), |(_, r)| r);
                format!("{}/urls/{rest}", m.trim_end_matches('/'))
            }
            (Source::Url(u), None) => u.url.clone(),
        }
    }

    /// Where the cache keeps (or would keep) `entry`'s file.
    pub fn cache_path(&self, entry: &Entry) -> PathBuf {
        match &entry.source {
            Source::Hub(h) => {
                let repo = hub_repo(h);
                let cache = Cache::new(self.hub_cache.clone());
                let r = cache.repo(repo.clone());
                if let Some(p) = r.get(&h.path) {
                    return p;
                }
                let folder = self.hub_cache.join(repo.folder_name());
                folder.join("snapshots").join(&h.revision).join(&h.path)
            }
            Source::Url(u) => {
                let archive = url_cache_path(&self.cache, &u.url);
                match &u.member {
                    Some(m) => member_path(&archive, m),
                    None => archive,
                }
            }
        }
    }

    /// Whether `entry`'s file is in the assets folder or the cache, so that
    /// [`Resolver::resolve`] needs no download (its checksum is not checked here).
    pub fn at_hand(&self, entry: &Entry) -> bool {
        let in_assets = match (&self.assets, &entry.assets) {
            (Some(root), Some(rel)) => root.join(rel).is_file(),
            _ => false,
        };
        in_assets || self.cache_path(entry).is_file()
    }

    /// The file of `entry`, checked against its pin.
    pub fn resolve(&self, entry: &Entry) -> Result<Resolved> {
        if let (Some(root), Some(rel)) = (&self.assets, &entry.assets) {
            let p = root.join(rel);
            if p.is_file() {
                verify(
                    entry,
                    &p,
                    "the assets copy",
                    &format!(
                    "; the assets folder ({ASSETS_ENV}={}) holds another file than the pinned one",
                    root.display()
                ),
                )?;
                return Ok(Resolved {
                    path: p,
                    origin: Origin::Assets,
                });
            }
            tracing::info!(
                "{} is not under {ASSETS_ENV}; looking in the cache",
                p.display()
            );
        }
        let cached = self.cache_path(entry);
        if cached.is_file() {
            verify(
                entry,
                &cached,
                "the cached copy",
                &format!(
                    "; delete {} (and the file it links to) to download it again",
                    cached.display()
                ),
            )?;
            return Ok(Resolved {
                path: cached,
                origin: Origin::Cache,
            });
        }
        if let Some(reason) = &self.offline {
            return Err(Error::Offline {
                name: entry.name.clone(),
                url: self.url(entry),
                cache_path: cached,
                reason: reason.clone(),
                assets: match &entry.assets {
                    Some(rel) => format!(", or set {ASSETS_ENV} to a folder that holds {rel}"),
                    None => String::new(),
                },
            });
        }
        let path = match &entry.source {
            Source::Hub(_) => self.download_hub(entry)?,
            Source::Url(_) => self.download_url(entry)?,
        };
        Ok(Resolved {
            path,
            origin: Origin::Download,
        })
    }

    fn download_error(&self, entry: &Entry, message: String) -> Error {
        Error::Download {
            name: entry.name.clone(),
            url: self.url(entry),
            cache_path: self.cache_path(entry),
            message,
        }
    }

    fn download_hub(&self, entry: &Entry) -> Result<PathBuf> {
        let Source::Hub(h) = &entry.source else {
            unreachable!("download_hub is called for Hub entries")
        };
        let endpoint = self.mirror.clone().unwrap_or_else(|| self.endpoint.clone());
        let api = hf_hub::api::sync::ApiBuilder::from_cache(Cache::new(self.hub_cache.clone()))
            .with_endpoint(endpoint.trim_end_matches('/').to_string())
            .with_progress(false)
            // A dropped connection resumes from what has arrived.
            .with_retries(3)
            .build()
            .map_err(|e| self.download_error(entry, e.to_string()))?;
        let repo = api.repo(hub_repo(h));
        tracing::info!("downloading {} ({} bytes)", self.url(entry), entry.size);
        let bar = Bar::new(self.progress, entry);
        let path = repo
            .download_with_progress(&h.path, bar)
            .map_err(|e| self.download_error(entry, e.to_string()))?;
        if let Err(e) = verify(entry, &path, "the download", "; it was deleted") {
            // The snapshot entry and the blob it links to, so that the next try starts over.
            if let Ok(blob) = std::fs::canonicalize(&path) {
                let _ = std::fs::remove_file(blob);
            }
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(path)
    }

    fn download_url(&self, entry: &Entry) -> Result<PathBuf> {
        let Source::Url(u) = &entry.source else {
            unreachable!("download_url is called for URL entries")
        };
        let url = self.url(entry);
        let archive_path = url_cache_path(&self.cache, &u.url);
        match (&u.member, &u.archive_sha256, u.archive_size) {
            (Some(member), Some(sha), Some(size)) => {
                let archive = Entry {
                    name: format!("{} (archive)", entry.name),
                    sha256: sha.clone(),
                    size,
                    model: None,
                    ..entry.clone()
                };
                if !archive_path.is_file() || verify(&archive, &archive_path, "", "").is_err() {
                    fetch_url(self, &archive, &url, &archive_path)?;
                }
                let out = member_path(&archive_path, member);
                extract_member(entry, &archive_path, member, &out)?;
                Ok(out)
            }
            _ => {
                fetch_url(self, entry, &url, &archive_path)?;
                Ok(archive_path)
            }
        }
    }
}

fn hub_repo(h: &crate::registry::HubFile) -> Repo {
    let t = match h.repo_type {
        RepoType::Model => hf_hub::RepoType::Model,
        RepoType::Dataset => hf_hub::RepoType::Dataset,
    };
    Repo::with_revision(h.repo.clone(), t, h.revision.clone())
}

fn member_path(archive: &Path, member: &str) -> PathBuf {
    let mut dir = archive.as_os_str().to_owned();
    dir.push(".d");
    let mut p = PathBuf::from(dir);
    for part in member.split('/') {
        p.push(part);
    }
    p
}

/// Downloads `url` to `dest` through a temporary file beside it: a failed or cut-off
/// download leaves nothing at `dest`; a finished one is checked, synced and renamed.
fn fetch_url(r: &Resolver, entry: &Entry, url: &str, dest: &Path) -> Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let err = |message: String| Error::Download {
        name: entry.name.clone(),
        url: url.to_string(),
        cache_path: dest.to_path_buf(),
        message,
    };
    tracing::info!("downloading {url} ({} bytes)", entry.size);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(3600)))
        .build()
        .into();
    let response = agent.get(url).call().map_err(|e| err(e.to_string()))?;
    let mut body = response.into_body().into_reader();
    let mut tmp = tempfile_in(dir)?;
    let received = copy_checked(entry, &mut body, &mut tmp, r.progress);
    if received.is_err() {
        let _ = std::fs::remove_file(&tmp.0);
    }
    let (total, actual) = match received {
        Ok(v) => v,
        Err(Ok(message)) => return Err(err(message)),
        Err(Err(e)) => return Err(e),
    };
    if total != entry.size || actual != entry.sha256 {
        let _ = std::fs::remove_file(&tmp.0);
        return Err(Error::Mismatch(Box::new(crate::error::Mismatch {
            name: entry.name.clone(),
            path: dest.to_path_buf(),
            what: "the download",
            expected: entry.sha256.clone(),
            actual,
            expected_size: entry.size,
            actual_size: total,
            hint: "; nothing was kept".into(),
        })));
    }
    persist(tmp, dest)
}

/// Copies a download body into `tmp`, hashing as it goes, never past the pinned size.
/// Returns the byte count and sha256; a failure is `Ok(message)` for the network side and
/// `Err(error)` for the local one.
fn copy_checked(
    entry: &Entry,
    body: &mut impl Read,
    tmp: &mut (PathBuf, File),
    progress: bool,
) -> std::result::Result<(u64, String), std::result::Result<String, Error>> {
    let mut bar = Bar::new(progress, entry);
    hf_hub::api::Progress::init(&mut bar, entry.size as usize, entry.file_name());
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = body.read(&mut buf).map_err(|e| Ok(e.to_string()))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        // A server that sends more than the pin allows is not serving the pinned file.
        if total > entry.size {
            return Err(Ok(format!(
                "the server sent more than the pinned {} bytes",
                entry.size
            )));
        }
        hasher.update(&buf[..n]);
        tmp.1.write_all(&buf[..n]).map_err(|e| {
            Err(Error::Io {
                path: tmp.0.clone(),
                source: e,
            })
        })?;
        hf_hub::api::Progress::update(&mut bar, n);
    }
    hf_hub::api::Progress::finish(&mut bar);
    Ok((total, hex(&hasher.finalize())))
}

/// A new temporary file in `dir` (created exclusively).
fn tempfile_in(dir: &Path) -> Result<(PathBuf, File)> {
    for i in 0..1000u32 {
        let p = dir.join(format!(".mfn-download-{}-{i}.part", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(f) => return Ok((p, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::Io { path: p, source: e }),
        }
    }
    Err(Error::Setting(format!(
        "cannot create a temporary file in {}",
        dir.display()
    )))
}

/// fsync, rename into place, fsync the folder.
fn persist((tmp, file): (PathBuf, File), dest: &Path) -> Result<()> {
    let res = file
        .sync_all()
        .and_then(|_| std::fs::rename(&tmp, dest))
        .map_err(io(dest));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res?;
    if let Some(dir) = dest.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn extract_member(entry: &Entry, archive: &Path, member: &str, out: &Path) -> Result<()> {
    let bad = |message: String| Error::Archive {
        path: archive.to_path_buf(),
        message,
    };
    let file = File::open(archive).map_err(io(archive))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(e.to_string()))?;
    let mut m = zip
        .by_name(member)
        .map_err(|e| bad(format!("member {member}: {e}")))?;
    if m.size() != entry.size {
        return Err(bad(format!(
            "member {member} is {} bytes, the pin says {}",
            m.size(),
            entry.size
        )));
    }
    let dir = out.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut tmp = tempfile_in(dir)?;
    // Bounded by the pinned size: a member that inflates further is cut off and fails the
    // hash check below.
    let copied = std::io::copy(&mut (&mut m).take(entry.size + 1), &mut tmp.1);
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&tmp.0);
        return Err(bad(format!("member {member}: {e}")));
    }
    if let Err(e) = verify(entry, &tmp.0, "the archive member", "") {
        let _ = std::fs::remove_file(&tmp.0);
        return Err(e);
    }
    persist(tmp, out)
}

/// Checks `path` against `entry`'s size and sha256; `what` and `hint` word the error.
pub fn verify(entry: &Entry, path: &Path, what: &'static str, hint: &str) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    if !meta.is_file() {
        return Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        });
    }
    let actual = sha256_file(path)?;
    if meta.len() != entry.size || actual != entry.sha256 {
        return Err(Error::Mismatch(Box::new(crate::error::Mismatch {
            name: entry.name.clone(),
            path: path.to_path_buf(),
            what,
            expected: entry.sha256.clone(),
            actual,
            expected_size: entry.size,
            actual_size: meta.len(),
            hint: hint.to_string(),
        })));
    }
    Ok(())
}

/// The sha256 of a file, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A download progress bar (drawn on stderr when it is a terminal).
struct Bar(Option<ProgressBar>);

impl Bar {
    fn new(show: bool, entry: &Entry) -> Self {
        if !show {
            return Self(None);
        }
        let bar = ProgressBar::new(entry.size);
        if let Ok(style) = ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(format!("downloading {}", entry.name));
        Self(Some(bar))
    }
}

impl hf_hub::api::Progress for Bar {
    fn init(&mut self, size: usize, _filename: &str) {
        if let Some(b) = &self.0 {
            b.set_length(size as u64);
            b.set_position(0);
        }
    }

    fn update(&mut self, size: usize) {
        if let Some(b) = &self.0 {
            b.inc(size as u64);
        }
    }

    fn finish(&mut self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}
