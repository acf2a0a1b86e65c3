//! A throwaway PostgreSQL server with pgvector for tests: `initdb` in a temporary folder,
//! `postgres` listening on 127.0.0.1 only (its unix socket inside that folder), stopped and
//! removed on drop, a panicking test included. It speaks to the server through `psql` only,
//! so that any crate's tests can include it (`#[path]`) without a PostgreSQL client crate.
//!
//! The binaries come from `MFN_PG_BIN` (a folder holding `initdb` and `postgres`, with
//! pgvector installed beside them), else from where `crates/mfn-gallery/scripts/pgserver.sh`
//! puts them: `${XDG_CACHE_HOME:-~/.cache}/mfn/pgserver/pgserver/pginstall/bin`. Without
//! either the tests fail, saying how to get them.
//!
//! PostgreSQL refuses to run as root: under root the server runs as `nobody` (uid 65534)
//! from a copy of the installation that user can read (with the wheel's `pgserver.libs`
//! beside it, where its programs look for libpq).

#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What to do when the binaries are missing.
const HOWTO: &str = "the PostgreSQL tests need PostgreSQL with pgvector. Run \
    `crates/mfn-gallery/scripts/pgserver.sh` once (it downloads the PyPI wheel pgserver 0.1.4, \
    PostgreSQL 16 with pgvector 0.6, into ~/.cache/mfn/pgserver, where these tests look), or \
    set MFN_PG_BIN to a folder holding `initdb` and `postgres` whose installation has \
    pgvector (`lib/postgresql/vector.so`)";

/// The unprivileged user the server runs as when the tests run as root.
const NOBODY: u32 = 65534;

/// How long the server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The superuser `initdb` makes.
pub const USER: &str = "mfn";

/// The folder holding `initdb` and `postgres`.
pub fn bin_dir() -> PathBuf {
    let check = |dir: PathBuf, from: &str| -> PathBuf {
        for exe in ["initdb", "postgres", "pg_ctl", "psql"] {
            if !dir.join(exe).is_file() {
                panic!("{from} {}: no `{exe}` there; {HOWTO}", dir.display());
            }
        }
        dir
    };
    if let Some(dir) = std::env::var_os("MFN_PG_BIN").filter(|d| !d.is_empty()) {
        return check(PathBuf::from(dir), "MFN_PG_BIN is");
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    match cache.map(|c| c.join("mfn/pgserver/pgserver/pginstall/bin")) {
        Some(dir) if dir.join("postgres").is_file() => check(dir, "the cached server at"),
        Some(dir) => panic!(
            "MFN_PG_BIN is not set and {} holds no PostgreSQL: {HOWTO}",
            dir.display()
        ),
        None => panic!("MFN_PG_BIN is not set and there is no HOME: {HOWTO}"),
    }
}

/// A running server; stopped, and its folder removed, on drop.
pub struct PgServer {
    child: Child,
    port: u16,
    /// The installation's programs, as the user running the tests reads them.
    tools: PathBuf,
    /// The programs the server runs from (a copy under root).
    bin: PathBuf,
    data: PathBuf,
    run_as: Option<u32>,
    // Last: removed after the server has stopped.
    dir: tempfile::TempDir,
}

impl PgServer {
    /// A server with the test settings (no fsync).
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A server with extra `-c name=value` settings.
    pub fn start_with(settings: &[(&str, &str)]) -> Self {
        let installed = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("mfn-pg-")
            .tempdir()
            .expect("a temporary folder");
        let root = std::fs::metadata(dir.path()).expect("stat").uid() == 0;
        let (bin, run_as) = if root {
            // `nobody` cannot read root's home: the server runs from a copy, laid out as
            // the wheel's (`pgserver/pginstall/bin/../../../pgserver.libs`).
            let install = installed.parent().expect("bin has a parent");
            let copy = dir.path().join("pgserver/pginstall");
            for part in ["bin", "lib", "share"] {
                if install.join(part).is_dir() {
                    copy_tree(&install.join(part), &copy.join(part));
                }
            }
            let libs = install.join("../../pgserver.libs");
            if libs.is_dir() {
                copy_tree(&libs, &dir.path().join("pgserver.libs"));
            }
            chown_tree(dir.path(), NOBODY);
            (copy.join("bin"), Some(NOBODY))
        } else {
            (installed.clone(), None)
        };
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        std::fs::create_dir(&sock).expect("socket folder");
        if let Some(uid) = run_as {
            std::os::unix::fs::chown(&sock, Some(uid), Some(uid)).expect("chown");
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                USER,
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .stdin(Stdio::null());
        as_user(&mut initdb, run_as);
        let out = initdb
            .output()
            .unwrap_or_else(|e| panic!("running {}/initdb: {e}; {HOWTO}", bin.display()));
        assert!(
            out.status.success(),
            "initdb failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let log_path = dir.path().join("postgres.log");
        for attempt in 0..5 {
            let port = free_port();
            let log = std::fs::File::create(&log_path).expect("log file");
            let mut cmd = Command::new(bin.join("postgres"));
            cmd.arg("-D")
                .arg(&data)
                .args([
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-k",
                ])
                .arg(&sock)
                .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
                .args(["-c", "full_page_writes=off", "-c", "max_connections=40"]);
            for (name, value) in settings {
                cmd.arg("-c").arg(format!("{name}={value}"));
            }
            cmd.stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log);
            as_user(&mut cmd, run_as);
            let mut child = cmd.spawn().expect("starting postgres");
            match wait_ready(&mut child, &installed, port, &log_path) {
                Ok(()) => {
                    let server = Self {
                        child,
                        port,
                        tools: installed,
                        bin,
                        data,
                        run_as,
                        dir,
                    };
                    server.setup();
                    return server;
                }
                Err(log) => {
                    stop(&mut child, &bin, &data, run_as);
                    // Another process may take the port between the probe and the bind.
                    if !(attempt < 4 && log.contains("could not bind")) {
                        panic!("postgres did not start: {log}");
                    }
                }
            }
        }
        unreachable!("returned or panicked above")
    }

    /// A URL of database `db` on this server, as the superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs `sql` in database `db` with `psql`; its output (unaligned, tuples only).
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = psql(&self.tools, self.port, db)
            .args(["-c", sql])
            .output()
            .expect("running psql");
        assert!(
            out.status.success(),
            "psql -d {db} -c {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Creates database `name` (with pgvector, from `template1`); returns its URL.
    pub fn database(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(name)
    }

    /// pgvector in `template1` (so every database made afterwards has it) and `postgres`.
    fn setup(&self) {
        for db in ["template1", "postgres"] {
            self.psql(db, "CREATE EXTENSION IF NOT EXISTS vector");
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        stop(&mut self.child, &self.bin, &self.data, self.run_as);
    }
}

/// `psql` on database `db` of the server on `port`, stopping at the first error.
fn psql(tools: &Path, port: u16, db: &str) -> Command {
    let mut cmd = Command::new(tools.join("psql"));
    cmd.args([
        "-X",
        "-q",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        "127.0.0.1",
    ])
    .args(["-p", &port.to_string(), "-U", USER, "-d", db])
    .env("PGCONNECT_TIMEOUT", "2")
    .stdin(Stdio::null());
    cmd
}

/// Waits until the server on `port` accepts connections; its log when it exits or takes
/// too long.
fn wait_ready(child: &mut Child, tools: &Path, port: u16, log: &Path) -> Result<(), String> {
    let log = || std::fs::read_to_string(log).unwrap_or_default();
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("it exited ({status}): {}", log()));
        }
        let ready = psql(tools, port, "postgres")
            .args(["-c", "SELECT 1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("running {}/psql: {e}", tools.display()))?;
        if ready.success() {
            return Ok(());
        }
        if start.elapsed() > READY_TIMEOUT {
            return Err(format!(
                "not accepting connections after {READY_TIMEOUT:?}: {}",
                log()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops the server: `pg_ctl stop -m immediate` (which lets it clean up its shared
/// memory), then kill, and waits for it.
fn stop(child: &mut Child, bin: &Path, data: &Path, run_as: Option<u32>) {
    if let Ok(None) = child.try_wait() {
        let mut pg_ctl = Command::new(bin.join("pg_ctl"));
        pg_ctl
            .args(["stop", "-m", "immediate", "-w", "-t", "10", "-D"])
            .arg(data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        as_user(&mut pg_ctl, run_as);
        let _ = pg_ctl.status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `cmd` as `uid` (its group the same number) when given.
fn as_user(cmd: &mut Command, uid: Option<u32>) {
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
}

/// A port free on 127.0.0.1 right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Copies a folder, keeping modes and symbolic links.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("{}: {e}", to.display()));
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{}: {e}", from.display())) {
        let entry = entry.expect("read_dir");
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().expect("file type");
        if kind.is_symlink() {
            let target = std::fs::read_link(&src).expect("read_link");
            std::os::unix::fs::symlink(target, &dst).expect("symlink");
        } else if kind.is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        }
    }
}

/// Gives a folder and everything in it to `uid`.
fn chown_tree(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    if std::fs::symlink_metadata(path).expect("stat").is_dir() {
        for entry in std::fs::read_dir(path).expect("read_dir") {
            chown_tree(&entry.expect("entry").path(), uid);
        }
    }
}
