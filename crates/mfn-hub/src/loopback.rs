//! A small HTTP server on 127.0.0.1 that serves local files in the Hub's URL layout, with
//! the headers `hf-hub` reads: for tests of the download path, and for trying it without
//! a network.
//!
//! Routes map a URL path (`/org/name/resolve/REV/path`, `/datasets/org/name/resolve/...`,
//! `/urls/host/path`) to a file. Every response honours `Range: bytes=A-` and `A-B`,
//! carries `ETag`/`X-Linked-Etag` (the file's sha256, as the Hub gives for large files),
//! `X-Repo-Commit` and `Content-Range`. The server answers at most a bounded number of
//! requests and stops when dropped.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::registry::{Entry, HubFile, RepoType, Source};
use crate::resolve::sha256_file;
use crate::Result;

/// The commit the server claims for every repository.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Requests one server answers before it stops listening.
const MAX_REQUESTS: usize = 10_000;

#[derive(Clone)]
struct Route {
    file: PathBuf,
    sha256: String,
}

#[derive(Default)]
struct State {
    routes: HashMap<String, Route>,
    /// Paths whose next body is cut off after this many bytes.
    cut: HashMap<String, u64>,
    /// Paths requested, in order (the metadata probes included).
    log: Vec<String>,
}

/// A running loopback server. Dropping it stops it.
pub struct Server {
    addr: std::net::SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

/// The URL path a source is served at: the Hub's layout, or `/urls/{host}/{path}`.
pub fn route_path(entry: &Entry) -> String {
    match &entry.source {
        Source::Hub(HubFile {
            repo,
            repo_type,
            revision,
            path,
        }) => {
            let prefix = match repo_type {
                RepoType::Model => "",
                RepoType::Dataset => "/datasets",
            };
            format!(
                "{prefix}/{repo}/resolve/{}/{path}",
                revision.replace('/', "%2F")
            )
        }
        Source::Url(u) => {
            let rest = u.url.split_once("://").map_or(u.url.as_str(), |(_, r)| r);
            format!("/urls/{rest}")
        }
    }
}

impl Server {
    /// Starts a server on a free loopback port.
    pub fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(crate::error::io("127.0.0.1:0"))?;
        let addr = listener
            .local_addr()
            .map_err(crate::error::io("127.0.0.1:0"))?;
        listener
            .set_nonblocking(true)
            .map_err(crate::error::io("127.0.0.1:0"))?;
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (state, stop, served) = (state.clone(), stop.clone(), served.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) && served.load(Ordering::Relaxed) < MAX_REQUESTS
                {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            served.fetch_add(1, Ordering::Relaxed);
                            let _ = handle(stream, &state);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(_) => break,
                    }
                }
            })
        };
        Ok(Self {
            addr,
            state,
            stop,
            served,
            thread: Some(thread),
        })
    }

    /// The base URL: `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serves `file` at `url_path`.
    pub fn route(&self, url_path: &str, file: &Path) -> Result<()> {
        let sha256 = sha256_file(file)?;
        self.lock().routes.insert(
            url_path.to_string(),
            Route {
                file: file.to_path_buf(),
                sha256,
            },
        );
        Ok(())
    }

    /// Serves `file` where `entry`'s source lives.
    pub fn serve_entry(&self, entry: &Entry, file: &Path) -> Result<()> {
        self.route(&route_path(entry), file)
    }

    /// Cuts the next full body sent for `url_path` off after `bytes` bytes, closing the
    /// connection: a dropped download.
    pub fn cut_next(&self, url_path: &str, bytes: u64) {
        self.lock().cut.insert(url_path.to_string(), bytes);
    }

    /// The paths requested so far.
    pub fn requests(&self) -> Vec<String> {
        self.lock().log.clone()
    }

    /// Connections accepted so far.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn handle(stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    let mut request_line = String::new();
    // Lines are bounded: a request whose head passes 16 KiB is dropped.
    (&mut reader).take(8192).read_line(&mut request_line)?;
    let mut range: Option<(u64, Option<u64>)> = None;
    let mut head_bytes = request_line.len();
    loop {
        let mut line = String::new();
        let n = (&mut reader).take(8192).read_line(&mut line)?;
        head_bytes += n;
        if n == 0 || line == "\r\n" || line == "\n" || head_bytes > 16384 {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("range") {
                range = parse_range(v.trim());
            }
        }
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let target = parts.next().unwrap_or("").to_string();
    let (route, cut) = {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        s.log.push(target.clone());
        let route = s.routes.get(&target).cloned();
        // The metadata probe (`bytes=0-0`) is not the download the cut is meant for.
        let probe = matches!(range, Some((0, Some(0))));
        let cut = if probe { None } else { s.cut.remove(&target) };
        (route, cut)
    };
    let Some(route) = route.filter(|_| method == "GET" || method == "HEAD") else {
        let body = b"not found";
        write!(
            out,
            "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )?;
        out.write_all(body)?;
        return Ok(());
    };
    let mut file = std::fs::File::open(&route.file)?;
    let size = file.metadata()?.len();
    let (start, end) = match range {
        Some((a, b)) => (
            a,
            b.unwrap_or(size.saturating_sub(1))
                .min(size.saturating_sub(1)),
        ),
        None => (0, size.saturating_sub(1)),
    };
    if size == 0 || start > end {
        write!(
            out,
            "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{size}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        return Ok(());
    }
    let len = end - start + 1;
    let status = if range.is_some() {
        "206 Partial Content"
    } else {
        "200 OK"
    };
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Length: {len}\r\nContent-Range: bytes {start}-{end}/{size}\r\n\
         Accept-Ranges: bytes\r\nETag: \"{sha}\"\r\nX-Linked-Etag: \"{sha}\"\r\n\
         X-Linked-Size: {size}\r\nX-Repo-Commit: {COMMIT}\r\nConnection: close\r\n\r\n",
        sha = route.sha256
    )?;
    if method == "HEAD" {
        return Ok(());
    }
    file.seek(SeekFrom::Start(start))?;
    let send = cut.map_or(len, |c| c.min(len));
    std::io::copy(&mut (&mut file).take(send), &mut out)?;
    out.flush()?;
    if send < len {
        // Drop the connection without a clean close of the body.
        let _ = out.shutdown(std::net::Shutdown::Both);
    }
    Ok(())
}

fn parse_range(v: &str) -> Option<(u64, Option<u64>)> {
    let spec = v.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let a = a.trim().parse().ok()?;
    let b = if b.trim().is_empty() {
        None
    } else {
        Some(b.trim().parse().ok()?)
    };
    Some((a, b))
}
