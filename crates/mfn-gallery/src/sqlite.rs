//! The embedded store: one SQLite file.
//!
//! Schema (format version 1):
//!
//! ```sql
//! CREATE TABLE meta  (key TEXT PRIMARY KEY, value TEXT NOT NULL);
//! CREATE TABLE faces (id INTEGER PRIMARY KEY AUTOINCREMENT, label TEXT NOT NULL,
//!                     embedding BLOB NOT NULL, source TEXT, time INTEGER NOT NULL);
//! CREATE INDEX faces_label ON faces (label);
//! ```
//!
//! `meta` holds `format` (`mfn-gallery`), `version`, `fingerprint` (64 hex digits, see
//! [`crate::Fingerprint`]), `dim`, `created` (unix seconds) and, from format version 2,
//! `storage` (`f32`, `f16` or `int8`; absent means f32). An embedding is a unit-length
//! vector of `dim` values encoded as [`crate::Storage`] says: a BLOB of exactly
//! `Storage::bytes(dim)` bytes (`4 dim` for f32, little-endian). An f32 gallery is written
//! as format version 1, which older builds read; f16 and int8 as version 2. Ids are never
//! reused (`AUTOINCREMENT`). The file runs in WAL mode, so readers do not block a writer.

use std::path::{Path, PathBuf};

use rusqlite::limits::Limit;
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::store::{
    check_enrollment, format_version_for, Enrollment, Face, Meta, Store, FORMAT_VERSION, MAX_DIM,
    MAX_LABEL_BYTES, MAX_SOURCE_BYTES,
};
use crate::{Error, Fingerprint, Result, Storage};

/// The value of the `format` key in `meta`.
const FORMAT_NAME: &str = "mfn-gallery";

/// SQLite's 16-byte header.
const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

/// The longest string or BLOB SQLite may hand us: the largest embedding, with room to
/// spare. Larger values are SQLite errors, not allocations.
const MAX_VALUE_BYTES: i32 = 1 << 20;

/// How long a write waits for another process's write to finish.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A gallery in one SQLite file.
pub struct SqliteStore {
    path: PathBuf,
    conn: Connection,
    meta: Meta,
}

impl SqliteStore {
    /// Creates a new gallery file at `path` for embeddings of `dim` values from the model
    /// `fingerprint`, stored as f32; an existing file is refused.
    pub fn create(path: &Path, fingerprint: &Fingerprint, dim: usize) -> Result<Self> {
        Self::create_with(path, fingerprint, dim, Storage::F32)
    }

    /// [`SqliteStore::create`] with embeddings stored as `storage`.
    pub fn create_with(
        path: &Path,
        fingerprint: &Fingerprint,
        dim: usize,
        storage: Storage,
    ) -> Result<Self> {
        if !(1..=MAX_DIM).contains(&dim) {
            return Err(Error::Invalid(format!(
                "an embedding dimension of {dim}: expected 1..={MAX_DIM}"
            )));
        }
        if path.exists() {
            return Err(Error::File {
                path: path.into(),
                message: "already exists: open it instead of creating it".into(),
            });
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(Error::File {
                path: path.into(),
                message: format!("the folder {} does not exist", dir.display()),
            });
        }
        let sql = |source| Error::Sqlite {
            path: path.into(),
            source: Box::new(source),
        };
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = Connection::open_with_flags(path, flags).map_err(sql)?;
        let created = now();
        let result = (|| -> rusqlite::Result<()> {
            configure(&conn)?;
            let tx = conn.transaction()?;
            tx.execute_batch(
                "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                 CREATE TABLE faces (id INTEGER PRIMARY KEY AUTOINCREMENT, label TEXT NOT NULL,
                                     embedding BLOB NOT NULL, source TEXT, time INTEGER NOT NULL);
                 CREATE INDEX faces_label ON faces (label);",
            )?;
            {
                let mut put = tx.prepare("INSERT INTO meta (key, value) VALUES (?1, ?2)")?;
                put.execute(params!["format", FORMAT_NAME])?;
                put.execute(params!["version", format_version_for(storage).to_string()])?;
                put.execute(params!["fingerprint", fingerprint.hex()])?;
                put.execute(params!["dim", dim.to_string()])?;
                put.execute(params!["created", created.to_string()])?;
                if storage != Storage::F32 {
                    put.execute(params!["storage", storage.name()])?;
                }
            }
            tx.commit()
        })();
        if let Err(e) = result {
            drop(conn);
            // A half-made gallery is no gallery.
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let mut p = path.as_os_str().to_owned();
                p.push(suffix);
                let _ = std::fs::remove_file(PathBuf::from(p));
            }
            return Err(sql(e));
        }
        Ok(Self {
            path: path.into(),
            conn,
            meta: Meta {
                format_version: format_version_for(storage),
                fingerprint: *fingerprint,
                dim,
                created,
                storage,
            },
        })
    }

    /// Opens an existing gallery file. A file that is not one (empty, not SQLite, a
    /// SQLite database without the gallery's tables), one of a newer format, or one whose
    /// meta values do not parse is refused with an error that names it.
    pub fn open(path: &Path) -> Result<Self> {
        check_header(path)?;
        let sql = |source| Error::Sqlite {
            path: path.into(),
            source: Box::new(source),
        };
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(sql)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
        limit(&conn);
        let tables: Vec<String> = (|| {
            let mut stmt = conn.prepare(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
                 ORDER BY name LIMIT 101",
            )?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })()
        .map_err(|e| not_a_gallery_or(path, e))?;
        if !(tables.iter().any(|t| t == "meta") && tables.iter().any(|t| t == "faces")) {
            let found = if tables.is_empty() {
                "no tables".to_string()
            } else {
                format!("tables {}", tables.join(", "))
            };
            return Err(Error::NotAGallery {
                path: path.into(),
                message: format!(
                    "a SQLite database without a gallery's `meta` and `faces` tables ({found})"
                ),
            });
        }
        let get = |key: &str| -> Result<Option<String>> {
            conn.query_row(
                "SELECT CAST(value AS TEXT) FROM meta WHERE key = ?1",
                [key],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()
            .map(Option::flatten)
            .map_err(|e| not_a_gallery_or(path, e))
        };
        let corrupt = |message: String| Error::Corrupt {
            path: path.into(),
            row: None,
            message,
        };
        match get("format")? {
            Some(f) if f == FORMAT_NAME => {}
            other => {
                return Err(Error::NotAGallery {
                    path: path.into(),
                    message: format!(
                        "a SQLite database whose `meta` table has format {} rather than \
                         `{FORMAT_NAME}`",
                        other.map_or("(none)".into(), |f| format!("`{}`", f.escape_debug()))
                    ),
                })
            }
        }
        let version = get("version")?
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|v| *v >= 1)
            .ok_or_else(|| {
                corrupt("the format version in `meta` is missing or malformed".into())
            })?;
        if version > FORMAT_VERSION {
            return Err(Error::NewerFormat {
                path: path.into(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let fingerprint = get("fingerprint")?
            .and_then(|f| Fingerprint::from_hex(&f))
            .ok_or_else(|| {
                corrupt("the model fingerprint in `meta` is missing or not 64 hex digits".into())
            })?;
        let dim = get("dim")?
            .and_then(|d| d.parse::<usize>().ok())
            .filter(|d| (1..=MAX_DIM).contains(d))
            .ok_or_else(|| {
                corrupt(format!(
                    "the embedding dimension in `meta` is missing or not in 1..={MAX_DIM}"
                ))
            })?;
        let created = get("created")?.and_then(|c| c.parse().ok()).unwrap_or(0);
        let storage = match get("storage")? {
            None => Storage::F32,
            Some(name) => Storage::parse(&name).map_err(|_| {
                corrupt(format!(
                    "the storage in `meta` is `{}`: expected f32, f16 or int8",
                    name.escape_debug()
                ))
            })?,
        };
        // Only now that the file is known to be ours: WAL is a property of the file.
        configure(&conn).map_err(sql)?;
        Ok(Self {
            path: path.into(),
            conn,
            meta: Meta {
                format_version: version,
                fingerprint,
                dim,
                created,
                storage,
            },
        })
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> Error + '_ {
        |source| Error::Sqlite {
            path: self.path.clone(),
            source: Box::new(source),
        }
    }

    fn corrupt(&self, row: i64, message: String) -> Error {
        Error::Corrupt {
            path: self.path.clone(),
            row: Some(row),
            message,
        }
    }

    /// Reads and checks the non-embedding columns of a row selected by [`FACE_COLUMNS`]:
    /// id, then type, byte length and (when within bounds) value of the label and of the
    /// source, then the time.
    fn face(&self, r: &rusqlite::Row<'_>) -> Result<Face> {
        let sql = self.sql();
        let id: i64 = r.get(0).map_err(&sql)?;
        let text = |at: usize, what: &str, max: usize, null_ok: bool| -> Result<Option<String>> {
            let kind: String = r.get(at).map_err(&sql)?;
            let len: i64 = r.get::<_, Option<i64>>(at + 1).map_err(&sql)?.unwrap_or(0);
            match (kind.as_str(), r.get_ref(at + 2).map_err(&sql)?) {
                ("null", _) if null_ok => Ok(None),
                ("text", ValueRef::Text(t)) if (1..=max).contains(&t.len()) || null_ok => Ok(Some(
                    std::str::from_utf8(t)
                        .map_err(|_| self.corrupt(id, format!("the {what} is not UTF-8")))?
                        .to_string(),
                )),
                (kind, _) => Err(self.corrupt(
                    id,
                    format!(
                        "the {what} is {} of {len} bytes: expected text of {}..={max} bytes",
                        if kind == "blob" { "a BLOB" } else { kind },
                        if null_ok { 0 } else { 1 },
                    ),
                )),
            }
        };
        let label = text(1, "label", MAX_LABEL_BYTES, false)?.unwrap_or_default();
        let source = text(4, "source", MAX_SOURCE_BYTES, true)?;
        let time = match r.get_ref(7).map_err(&sql)? {
            ValueRef::Integer(t) => t,
            other => {
                return Err(self.corrupt(
                    id,
                    format!("the time is {}: expected an integer", describe(other)),
                ))
            }
        };
        Ok(Face {
            id,
            label,
            source,
            time,
        })
    }
}

const _: () = assert!(MAX_LABEL_BYTES == 1024 && MAX_SOURCE_BYTES == 4096);

/// The columns [`SqliteStore::face`] reads. Text is fetched only within its bound, so a
/// hostile file cannot make a read allocate more than that.
const FACE_COLUMNS: &str = "id, \
    typeof(label), octet_length(label), \
    CASE WHEN typeof(label) = 'text' AND octet_length(label) <= 1024 THEN label END, \
    typeof(source), octet_length(source), \
    CASE WHEN typeof(source) = 'text' AND octet_length(source) <= 4096 THEN source END, \
    time";

impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }

    fn meta(&self) -> &Meta {
        &self.meta
    }

    fn insert(&mut self, faces: &[Enrollment], time: i64) -> Result<Vec<i64>> {
        let (dim, storage) = (self.meta.dim, self.meta.storage);
        let path = self.path.clone();
        let sql = |source| Error::Sqlite {
            path: path.clone(),
            source: Box::new(source),
        };
        // Dropped without commit on any error: nothing of the batch stays.
        let tx = self.conn.transaction().map_err(sql)?;
        let mut ids = Vec::with_capacity(faces.len());
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO faces (label, embedding, source, time) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(sql)?;
            let mut blob = Vec::with_capacity(storage.bytes(dim));
            for (i, face) in faces.iter().enumerate() {
                check_enrollment(i, face, dim)?;
                blob.clear();
                storage.encode(&face.embedding, &mut blob);
                stmt.execute(params![face.label, blob, face.source, time])
                    .map_err(sql)?;
                ids.push(tx.last_insert_rowid());
            }
        }
        tx.commit().map_err(sql)?;
        Ok(ids)
    }

    fn remove_label(&mut self, label: &str) -> Result<Vec<i64>> {
        let path = self.path.clone();
        let sql = |source| Error::Sqlite {
            path: path.clone(),
            source: Box::new(source),
        };
        let tx = self.conn.transaction().map_err(sql)?;
        let ids = {
            let mut stmt = tx
                .prepare_cached("DELETE FROM faces WHERE label = ?1 RETURNING id")
                .map_err(sql)?;
            let rows = stmt
                .query_map([label], |r| r.get::<_, i64>(0))
                .map_err(sql)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sql)?
        };
        tx.commit().map_err(sql)?;
        Ok(ids)
    }

    fn remove_ids(&mut self, ids: &[i64]) -> Result<Vec<i64>> {
        let path = self.path.clone();
        let sql = |source| Error::Sqlite {
            path: path.clone(),
            source: Box::new(source),
        };
        let tx = self.conn.transaction().map_err(sql)?;
        let mut gone = Vec::new();
        {
            let mut stmt = tx
                .prepare_cached("DELETE FROM faces WHERE id = ?1")
                .map_err(sql)?;
            for &id in ids {
                if stmt.execute([id]).map_err(sql)? > 0 {
                    gone.push(id);
                }
            }
        }
        tx.commit().map_err(sql)?;
        Ok(gone)
    }

    fn count(&self) -> Result<u64> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM faces", [], |r| r.get(0))
            .map_err(self.sql())?;
        Ok(n.max(0) as u64)
    }

    fn faces(&self) -> Result<Vec<Face>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {FACE_COLUMNS} FROM faces ORDER BY id"))
            .map_err(self.sql())?;
        let mut rows = stmt.query([]).map_err(self.sql())?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(self.sql())? {
            out.push(self.face(r)?);
        }
        Ok(out)
    }

    fn labels(&self) -> Result<Vec<(String, u64)>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT CAST(label AS TEXT), COUNT(*) FROM faces GROUP BY label ORDER BY label",
            )
            .map_err(self.sql())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, Option<String>>(0)?, r.get::<_, i64>(1)?))
            })
            .map_err(self.sql())?;
        let mut out = Vec::new();
        for row in rows {
            let (label, n) = row.map_err(self.sql())?;
            out.push((label.unwrap_or_default(), n.max(0) as u64));
        }
        Ok(out)
    }

    fn scan(&self, visit: &mut dyn FnMut(Face, &[f32]) -> Result<()>) -> Result<()> {
        let (dim, storage) = (self.meta.dim, self.meta.storage);
        let bytes = storage.bytes(dim);
        // One read transaction: a consistent snapshot even while another process writes.
        let tx = self.conn.unchecked_transaction().map_err(self.sql())?;
        {
            let mut stmt = tx
                .prepare_cached(&format!(
                    "SELECT {FACE_COLUMNS}, typeof(embedding), length(embedding), \
                     CASE WHEN typeof(embedding) = 'blob' AND length(embedding) = ?1 \
                     THEN embedding END FROM faces ORDER BY id"
                ))
                .map_err(self.sql())?;
            let mut rows = stmt.query([bytes as i64]).map_err(self.sql())?;
            let mut values = vec![0f32; dim];
            while let Some(r) = rows.next().map_err(self.sql())? {
                let face = self.face(r)?;
                let id = face.id;
                match r.get_ref(10).map_err(self.sql())? {
                    ValueRef::Blob(b) if storage.decode(b, &mut values) => {}
                    _ => {
                        let kind: String = r.get(8).map_err(self.sql())?;
                        let len: Option<i64> = r.get(9).map_err(self.sql())?;
                        let what = match kind.as_str() {
                            "blob" => format!("{} bytes", len.unwrap_or(0)),
                            "null" => "null".to_string(),
                            other => format!("{other}, not a BLOB"),
                        };
                        return Err(self.corrupt(
                            id,
                            format!(
                                "the embedding is {what}; the gallery's {dim}-value {storage} \
                                 embeddings take {bytes} bytes"
                            ),
                        ));
                    }
                }
                if let Some(j) = values.iter().position(|v| !v.is_finite()) {
                    return Err(
                        self.corrupt(id, format!("value {j} of the embedding is {}", values[j]))
                    );
                }
                visit(face, &values)?;
            }
        }
        tx.finish().map_err(self.sql())
    }
}

/// Refuses, before SQLite sees it, what cannot be a SQLite database: a missing file, a
/// folder, an empty file, a file without SQLite's header.
fn check_header(path: &Path) -> Result<()> {
    use std::io::Read;
    let io = |source| Error::Io {
        path: path.into(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::File {
            path: path.into(),
            message: "no such gallery file".into(),
        },
        _ => io(e),
    })?;
    if !meta.is_file() {
        return Err(Error::File {
            path: path.into(),
            message: "not a regular file".into(),
        });
    }
    if meta.len() == 0 {
        return Err(Error::NotAGallery {
            path: path.into(),
            message: "the file is empty".into(),
        });
    }
    let mut head = [0u8; 16];
    let mut f = std::fs::File::open(path).map_err(io)?;
    let n = f.read(&mut head).map_err(io)?;
    if n < head.len() || &head != SQLITE_HEADER {
        return Err(Error::NotAGallery {
            path: path.into(),
            message: "not a SQLite database (it does not start with SQLite's header)".into(),
        });
    }
    Ok(())
}

/// SQLite's "not a database" and "malformed" as [`Error::NotAGallery`]; others as they are.
fn not_a_gallery_or(path: &Path, e: rusqlite::Error) -> Error {
    use rusqlite::ErrorCode;
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => Error::NotAGallery {
            path: path.into(),
            message: format!("a damaged or foreign SQLite file ({e})"),
        },
        _ => Error::Sqlite {
            path: path.into(),
            source: Box::new(e),
        },
    }
}

/// WAL mode, a busy timeout, and the value-size limit.
fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    limit(conn);
    // WAL needs shared memory; on a file system without it SQLite keeps its rollback
    // journal, which is as transactional, so the mode it answers is not checked.
    let _mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(())
}

fn limit(conn: &Connection) {
    let _ = conn.set_limit(Limit::SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES);
}

/// A SQLite value's type, for messages.
fn describe(v: ValueRef<'_>) -> String {
    match v {
        ValueRef::Null => "null".into(),
        ValueRef::Integer(i) => format!("the integer {i}"),
        ValueRef::Real(r) => format!("the real {r}"),
        ValueRef::Text(t) => format!("text of {} bytes", t.len()),
        ValueRef::Blob(b) => format!("a BLOB of {} bytes", b.len()),
    }
}

/// Now, in unix seconds.
pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
