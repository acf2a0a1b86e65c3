//! The server store: PostgreSQL with pgvector, for a gallery many machines share.
//!
//! Schema (format version 1), in the connection's current schema (`search_path`):
//!
//! ```sql
//! CREATE TABLE mfn_meta  (key text PRIMARY KEY, value text NOT NULL);
//! CREATE TABLE mfn_faces (id bigserial PRIMARY KEY,
//!                         label text NOT NULL CHECK (octet_length(label) BETWEEN 1 AND 1024),
//!                         embedding vector(DIM) NOT NULL,
//!                         source text CHECK (octet_length(source) <= 4096),
//!                         time bigint NOT NULL);
//! CREATE INDEX mfn_faces_label ON mfn_faces (label);
//! ALTER TABLE mfn_faces ALTER COLUMN embedding SET STORAGE PLAIN;  -- DIM <= 2000
//! CREATE INDEX mfn_faces_embedding ON mfn_faces
//!     USING hnsw (embedding vector_ip_ops) WITH (m = 16, ef_construction = 200);
//! ```
//!
//! `mfn_meta` holds the same keys as the SQLite store's `meta`: `format` (`mfn-gallery`),
//! `version`, `fingerprint`, `dim` and `created`. Embeddings are unit length, so the
//! inner product is the cosine; ids come from a sequence and are never reused (a batch
//! rolled back leaves a gap). Embeddings are kept in the row, uncompressed, so that scans
//! read them in place.
//!
//! Search runs on the server ([`Store::search`]): with [`ServerSearch::Hnsw`], pgvector's
//! HNSW index ordered by negative inner product (`<#>`) under `SET hnsw.ef_search`; with
//! [`ServerSearch::Exact`], a sequential scan (index scans off for that one transaction)
//! that scores every face. pgvector indexes at most 2000 dimensions: a gallery with more
//! gets no HNSW index and every search is exact.
//!
//! The connection is plain TCP or a unix socket, without TLS: use it on a trusted network,
//! a unix socket or a tunnel. The password in a URL never appears in messages.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ::postgres::{Client, Config, IsolationLevel, NoTls, Row, Statement};
use pgvector::Vector;

use crate::gallery::Hit;
use crate::store::{
    check_enrollment, format_version_for, redact, Enrollment, Face, Meta, ServerSearch, Store,
    FORMAT_VERSION, MAX_DIM,
};
use crate::{Error, Fingerprint, Result, Storage};

/// The value of the `format` key in `mfn_meta`.
const FORMAT_NAME: &str = "mfn-gallery";

/// The widest vector pgvector's HNSW index takes.
pub const MAX_HNSW_DIM: usize = 2000;

/// The largest `hnsw.ef_search` pgvector accepts; deeper searches are exact.
pub const MAX_EF_SEARCH: u32 = 1000;

/// HNSW's graph degree (`m`) and build beam (`ef_construction`).
const HNSW_WITH: &str = "m = 16, ef_construction = 200";

/// Rows per `INSERT` statement of an enrollment batch.
const INSERT_CHUNK: usize = 256;

/// The longest meta value read.
const MAX_META_BYTES: i32 = 256;

/// How long connecting may take unless the URL says (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The non-embedding columns [`PgStore::face`] reads. Text is fetched only within its
/// bound: a hostile table cannot make a read allocate more than that.
const FACE_COLUMNS: &str = "id, \
    octet_length(label), CASE WHEN octet_length(label) <= 1024 THEN label END, \
    octet_length(source), CASE WHEN octet_length(source) <= 4096 THEN source END, \
    time";

const _: () = assert!(crate::store::MAX_LABEL_BYTES == 1024);
const _: () = assert!(crate::store::MAX_SOURCE_BYTES == 4096);

/// A gallery in a PostgreSQL database with the pgvector extension.
pub struct PgStore {
    url: String,
    conn: Mutex<Conn>,
    meta: Meta,
}

/// The connection and what this session has set on it.
struct Conn {
    client: Client,
    /// The session's `hnsw.ef_search`, once set.
    ef_search: Option<u32>,
    /// Prepared search statements by (exact, k).
    searches: HashMap<(bool, usize), Statement>,
}

impl PgStore {
    /// Creates a gallery for embeddings of `dim` values from the model `fingerprint` in the
    /// database at `url` (`postgres://user:password@host:port/database`), with its HNSW
    /// index. The pgvector extension is created when missing (which takes a role allowed
    /// to); a database that already holds a gallery is refused.
    pub fn create(url: &str, fingerprint: &Fingerprint, dim: usize) -> Result<Self> {
        if !(1..=MAX_DIM).contains(&dim) {
            return Err(Error::Invalid(format!(
                "an embedding dimension of {dim}: expected 1..={MAX_DIM}"
            )));
        }
        let mut client = connect(url)?;
        let pg = pg_error(url);
        if tables(&mut client).map_err(&pg)? != (false, false) {
            return Err(Error::File {
                path: redact(url).into(),
                message: "already holds a gallery (`mfn_meta`, `mfn_faces`): open it instead \
                          of creating it"
                    .into(),
            });
        }
        let has_vector = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector')",
                &[],
            )
            .map_err(&pg)?
            .get::<_, bool>(0);
        if !has_vector {
            client
                .batch_execute("CREATE EXTENSION IF NOT EXISTS vector")
                .map_err(|e| Error::Server {
                    location: redact(url),
                    message: format!(
                        "the pgvector extension is not installed in this database, and \
                         creating it failed ({}): run `CREATE EXTENSION vector` as a role \
                         allowed to",
                        scrub(url, &describe(&e))
                    ),
                })?;
        }
        let created = crate::sqlite::now();
        let index = if dim <= MAX_HNSW_DIM {
            format!(
                "CREATE INDEX mfn_faces_embedding ON mfn_faces \
                 USING hnsw (embedding vector_ip_ops) WITH ({HNSW_WITH});"
            )
        } else {
            String::new()
        };
        // An embedding kept in the row, uncompressed, rather than TOASTed out of it (512
        // values are just past TOAST's threshold): scans read it in place. Up to 2000
        // values fit a page.
        let plain = if dim <= MAX_HNSW_DIM {
            "ALTER TABLE mfn_faces ALTER COLUMN embedding SET STORAGE PLAIN;"
        } else {
            ""
        };
        let mut tx = client.transaction().map_err(&pg)?;
        tx.batch_execute(&format!(
            "CREATE TABLE mfn_meta (key text PRIMARY KEY, value text NOT NULL);
             CREATE TABLE mfn_faces (
                 id bigserial PRIMARY KEY,
                 label text NOT NULL CHECK (octet_length(label) BETWEEN 1 AND 1024),
                 embedding vector({dim}) NOT NULL,
                 source text CHECK (octet_length(source) <= 4096),
                 time bigint NOT NULL);
             CREATE INDEX mfn_faces_label ON mfn_faces (label);
             {plain}
             {index}"
        ))
        .map_err(&pg)?;
        let put = tx
            .prepare("INSERT INTO mfn_meta (key, value) VALUES ($1, $2)")
            .map_err(&pg)?;
        for (key, value) in [
            ("format", FORMAT_NAME.to_string()),
            ("version", format_version_for(Storage::F32).to_string()),
            ("fingerprint", fingerprint.hex()),
            ("dim", dim.to_string()),
            ("created", created.to_string()),
        ] {
            tx.execute(&put, &[&key, &value]).map_err(&pg)?;
        }
        tx.commit().map_err(&pg)?;
        Ok(Self::new(
            url,
            client,
            Meta {
                format_version: format_version_for(Storage::F32),
                fingerprint: *fingerprint,
                dim,
                created,
                storage: Storage::F32,
            },
        ))
    }

    /// Opens the gallery in the database at `url`. A database without one, one whose
    /// tables are not a gallery's (other columns, another dimension), one of a newer
    /// format, or one whose meta values do not parse is refused with an error that names
    /// it (without its password).
    pub fn open(url: &str) -> Result<Self> {
        let mut client = connect(url)?;
        let pg = pg_error(url);
        let location = redact(url);
        let not_a_gallery = |message: String| Error::NotAGallery {
            path: location.clone().into(),
            message,
        };
        let corrupt = |message: String| Error::Corrupt {
            path: location.clone().into(),
            row: None,
            message,
        };
        match tables(&mut client).map_err(&pg)? {
            (true, true) => {}
            (meta, faces) => {
                let missing: Vec<&str> = [(meta, "mfn_meta"), (faces, "mfn_faces")]
                    .into_iter()
                    .filter(|(there, _)| !there)
                    .map(|(_, name)| name)
                    .collect();
                return Err(not_a_gallery(format!(
                    "a PostgreSQL database without a gallery's {} table{} (create one with \
                     `Gallery::create`, or enroll into it with `mfn-cli gallery enroll`)",
                    missing.join(" and "),
                    if missing.len() > 1 { "s" } else { "" }
                )));
            }
        }
        let mut get = |key: &str| -> Result<Option<String>> {
            let row = client
                .query_opt(
                    "SELECT octet_length(value), \
                     CASE WHEN octet_length(value) <= $2 THEN value END \
                     FROM mfn_meta WHERE key = $1",
                    &[&key, &MAX_META_BYTES],
                )
                .map_err(|e| match e.code() {
                    // `mfn_meta` without the columns this reads: another program's table.
                    Some(c) if c.code().starts_with("42") => Error::NotAGallery {
                        path: redact(url).into(),
                        message: format!(
                            "its `mfn_meta` table is not a gallery's ({})",
                            scrub(url, &describe(&e))
                        ),
                    },
                    _ => pg(e),
                })?;
            match row {
                None => Ok(None),
                Some(r) => {
                    let value: Option<String> = r.try_get(1).map_err(&pg)?;
                    match value {
                        Some(v) => Ok(Some(v)),
                        None => Err(Error::Corrupt {
                            path: redact(url).into(),
                            row: None,
                            message: format!(
                                "the meta value `{key}` is null or longer than \
                                 {MAX_META_BYTES} bytes"
                            ),
                        }),
                    }
                }
            }
        };
        match get("format")? {
            Some(f) if f == FORMAT_NAME => {}
            other => {
                return Err(not_a_gallery(format!(
                    "a PostgreSQL database whose `mfn_meta` table has format {} rather than \
                     `{FORMAT_NAME}`",
                    other.map_or("(none)".into(), |f| format!("`{}`", f.escape_debug()))
                )))
            }
        }
        let version = get("version")?
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|v| *v >= 1)
            .ok_or_else(|| {
                corrupt("the format version in `mfn_meta` is missing or malformed".into())
            })?;
        if version > FORMAT_VERSION {
            return Err(Error::NewerFormat {
                path: location.clone().into(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let fingerprint = get("fingerprint")?
            .and_then(|f| Fingerprint::from_hex(&f))
            .ok_or_else(|| {
                corrupt(
                    "the model fingerprint in `mfn_meta` is missing or not 64 hex digits".into(),
                )
            })?;
        let dim = get("dim")?
            .and_then(|d| d.parse::<usize>().ok())
            .filter(|d| (1..=MAX_DIM).contains(d))
            .ok_or_else(|| {
                corrupt(format!(
                    "the embedding dimension in `mfn_meta` is missing or not in 1..={MAX_DIM}"
                ))
            })?;
        let created = get("created")?.and_then(|c| c.parse().ok()).unwrap_or(0);
        match get("storage")? {
            None => {}
            Some(name) if name == Storage::F32.name() => {}
            Some(name) => {
                return Err(corrupt(format!(
                    "the storage in `mfn_meta` is `{}`: a PostgreSQL gallery stores f32 \
                     (pgvector's `vector`)",
                    name.escape_debug()
                )))
            }
        }
        check_columns(&mut client, dim).map_err(|e| match e {
            Ok(message) => corrupt(message),
            Err(e) => pg(e),
        })?;
        Ok(Self::new(
            url,
            client,
            Meta {
                format_version: version,
                fingerprint,
                dim,
                created,
                storage: Storage::F32,
            },
        ))
    }

    /// Whether the database at `url` holds a gallery (its `mfn_meta` and `mfn_faces`
    /// tables); an error when it cannot be reached.
    pub fn exists(url: &str) -> Result<bool> {
        let mut client = connect(url)?;
        let (meta, faces) = tables(&mut client).map_err(pg_error(url))?;
        Ok(meta || faces)
    }

    fn new(url: &str, client: Client, meta: Meta) -> Self {
        Self {
            url: url.to_string(),
            conn: Mutex::new(Conn {
                client,
                ef_search: None,
                searches: HashMap::new(),
            }),
            meta,
        }
    }

    /// Whether the HNSW index is there.
    pub fn has_search_index(&self) -> Result<bool> {
        let mut c = self.lock();
        let row = c
            .client
            .query_one("SELECT to_regclass('mfn_faces_embedding') IS NOT NULL", &[])
            .map_err(self.pg())?;
        Ok(row.get(0))
    }

    /// Drops the HNSW index, for a bulk load: inserting into a table without it is much
    /// faster, and [`PgStore::build_search_index`] builds it in one pass afterwards.
    /// Searches meanwhile are sequential scans, exact whatever they ask.
    pub fn drop_search_index(&mut self) -> Result<()> {
        let mut c = self.lock();
        c.client
            .batch_execute("DROP INDEX IF EXISTS mfn_faces_embedding")
            .map_err(self.pg())
    }

    /// Builds the HNSW index when it is not there (`m = 16, ef_construction = 200`). The
    /// build uses the server's `maintenance_work_mem` and parallel maintenance workers; it
    /// is much faster when the graph fits in the former.
    pub fn build_search_index(&mut self) -> Result<()> {
        if self.meta.dim > MAX_HNSW_DIM {
            return Err(Error::Invalid(format!(
                "pgvector's HNSW index takes at most {MAX_HNSW_DIM} dimensions, not {}",
                self.meta.dim
            )));
        }
        let mut c = self.lock();
        c.client
            .batch_execute(&format!(
                "CREATE INDEX IF NOT EXISTS mfn_faces_embedding ON mfn_faces \
                 USING hnsw (embedding vector_ip_ops) WITH ({HNSW_WITH})"
            ))
            .map_err(self.pg())
    }

    fn lock(&self) -> MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pg(&self) -> impl Fn(::postgres::Error) -> Error + '_ {
        pg_error(&self.url)
    }

    fn corrupt(&self, row: i64, message: String) -> Error {
        Error::Corrupt {
            path: redact(&self.url).into(),
            row: Some(row),
            message,
        }
    }

    /// Reads and checks the columns [`FACE_COLUMNS`] selects, from `at` on.
    fn face(&self, r: &Row) -> Result<Face> {
        let pg = self.pg();
        let id: i64 = r.try_get(0).map_err(&pg)?;
        let label_len: Option<i32> = r.try_get(1).map_err(&pg)?;
        let label: Option<String> = r.try_get(2).map_err(&pg)?;
        let label = match label {
            Some(l) if !l.is_empty() => l,
            _ => {
                return Err(self.corrupt(
                    id,
                    format!(
                        "the label is {}: expected text of 1..=1024 bytes",
                        label_len.map_or("null".into(), |n| format!("{n} bytes"))
                    ),
                ))
            }
        };
        let source_len: Option<i32> = r.try_get(3).map_err(&pg)?;
        let source: Option<String> = r.try_get(4).map_err(&pg)?;
        if let (Some(n), None) = (source_len, &source) {
            return Err(self.corrupt(
                id,
                format!("the source is {n} bytes: expected at most 4096"),
            ));
        }
        let time: i64 = r.try_get(5).map_err(&pg)?;
        Ok(Face {
            id,
            label,
            source,
            time,
        })
    }

    /// A search statement for `k` results, prepared once per session.
    fn statement(&self, c: &mut Conn, exact: bool, k: usize) -> Result<Statement> {
        if let Some(s) = c.searches.get(&(exact, k)) {
            return Ok(s.clone());
        }
        // `k` is written into the text so that the planner sees the limit; HNSW serves
        // only `ORDER BY distance LIMIT k`, without a second key (ties are put in id order
        // here afterwards).
        let order = if exact {
            "embedding <#> $1, id"
        } else {
            "embedding <#> $1"
        };
        let sql = format!(
            "SELECT id, octet_length(label), \
             CASE WHEN octet_length(label) <= 1024 THEN label END, embedding <#> $1 \
             FROM mfn_faces ORDER BY {order} LIMIT {k}"
        );
        let s = c.client.prepare(&sql).map_err(self.pg())?;
        if c.searches.len() > 64 {
            c.searches.clear();
        }
        c.searches.insert((exact, k), s.clone());
        Ok(s)
    }

    fn hits(&self, rows: Vec<Row>) -> Result<Vec<Hit>> {
        let pg = self.pg();
        let mut hits = Vec::with_capacity(rows.len());
        for r in rows {
            let id: i64 = r.try_get(0).map_err(&pg)?;
            let len: Option<i32> = r.try_get(1).map_err(&pg)?;
            let label: Option<String> = r.try_get(2).map_err(&pg)?;
            let distance: Option<f64> = r.try_get(3).map_err(&pg)?;
            let Some(label) = label.filter(|l| !l.is_empty()) else {
                return Err(self.corrupt(
                    id,
                    format!(
                        "the label is {}: expected text of 1..=1024 bytes",
                        len.map_or("null".into(), |n| format!("{n} bytes"))
                    ),
                ));
            };
            let score = match distance {
                Some(d) if d.is_finite() => (-d) as f32,
                other => {
                    return Err(
                        self.corrupt(id, format!("the inner product with the query is {other:?}"))
                    )
                }
            };
            hits.push(Hit { id, label, score });
        }
        // Best first, ties by id, as the in-memory index orders them.
        hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id)));
        Ok(hits)
    }
}

impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn location(&self) -> String {
        redact(&self.url)
    }

    fn meta(&self) -> &Meta {
        &self.meta
    }

    fn insert(&mut self, faces: &[Enrollment], time: i64) -> Result<Vec<i64>> {
        let dim = self.meta.dim;
        let pg = pg_error(&self.url);
        let mut c = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        // Rolled back when dropped without commit: nothing of the batch stays.
        let mut tx = c.client.transaction().map_err(&pg)?;
        let mut ids = Vec::with_capacity(faces.len());
        let mut full: Option<Statement> = None;
        let mut start = 0;
        while start < faces.len() {
            let chunk = &faces[start..faces.len().min(start + INSERT_CHUNK)];
            let mut vectors = Vec::with_capacity(chunk.len());
            for (i, face) in chunk.iter().enumerate() {
                check_enrollment(start + i, face, dim)?;
                vectors.push(Vector::from(face.embedding.clone()));
            }
            let statement = match &full {
                Some(s) if chunk.len() == INSERT_CHUNK => s.clone(),
                _ => {
                    let s = tx.prepare(&insert_sql(chunk.len())).map_err(&pg)?;
                    if chunk.len() == INSERT_CHUNK {
                        full = Some(s.clone());
                    }
                    s
                }
            };
            let mut params: Vec<&(dyn ::postgres::types::ToSql + Sync)> =
                Vec::with_capacity(1 + 3 * chunk.len());
            params.push(&time);
            for (face, vector) in chunk.iter().zip(&vectors) {
                params.push(&face.label);
                params.push(vector);
                params.push(&face.source);
            }
            let rows = tx.query(&statement, &params).map_err(&pg)?;
            // The sequence hands out increasing ids as the VALUES rows are read, in order:
            // sorted, the returned ids are the batch's, in order.
            let mut chunk_ids = rows
                .iter()
                .map(|r| r.try_get::<_, i64>(0))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(&pg)?;
            chunk_ids.sort_unstable();
            ids.extend(chunk_ids);
            start += chunk.len();
        }
        tx.commit().map_err(&pg)?;
        Ok(ids)
    }

    fn remove_label(&mut self, label: &str) -> Result<Vec<i64>> {
        let pg = self.pg();
        let mut c = self.lock();
        let rows = c
            .client
            .query(
                "DELETE FROM mfn_faces WHERE label = $1 RETURNING id",
                &[&label],
            )
            .map_err(&pg)?;
        let mut ids = rows
            .iter()
            .map(|r| r.try_get::<_, i64>(0))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(&pg)?;
        ids.sort_unstable();
        Ok(ids)
    }

    fn remove_ids(&mut self, ids: &[i64]) -> Result<Vec<i64>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let pg = self.pg();
        let mut c = self.lock();
        // One statement: all or none.
        let rows = c
            .client
            .query(
                "DELETE FROM mfn_faces WHERE id = ANY($1) RETURNING id",
                &[&ids],
            )
            .map_err(&pg)?;
        let mut gone = rows
            .iter()
            .map(|r| r.try_get::<_, i64>(0))
            .collect::<std::result::Result<HashSet<_>, _>>()
            .map_err(&pg)?;
        // In the order asked, each once, as the SQLite store answers.
        Ok(ids.iter().copied().filter(|id| gone.remove(id)).collect())
    }

    fn count(&self) -> Result<u64> {
        let mut c = self.lock();
        let n: i64 = c
            .client
            .query_one("SELECT count(*) FROM mfn_faces", &[])
            .map_err(self.pg())?
            .get(0);
        Ok(n.max(0) as u64)
    }

    fn faces(&self) -> Result<Vec<Face>> {
        let rows = {
            let mut c = self.lock();
            c.client
                .query(
                    &format!("SELECT {FACE_COLUMNS} FROM mfn_faces ORDER BY id"),
                    &[],
                )
                .map_err(self.pg())?
        };
        rows.iter().map(|r| self.face(r)).collect()
    }

    fn labels(&self) -> Result<Vec<(String, u64)>> {
        let mut c = self.lock();
        // Byte order of UTF-8, as SQLite's: the same list from either store.
        let rows = c
            .client
            .query(
                "SELECT CASE WHEN octet_length(label) <= 1024 THEN label END, count(*) \
                 FROM mfn_faces GROUP BY label ORDER BY label COLLATE \"C\"",
                &[],
            )
            .map_err(self.pg())?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let label: Option<String> = r.try_get(0).map_err(self.pg())?;
            let n: i64 = r.try_get(1).map_err(self.pg())?;
            out.push((label.unwrap_or_default(), n.max(0) as u64));
        }
        Ok(out)
    }

    fn scan(&self, visit: &mut dyn FnMut(Face, &[f32]) -> Result<()>) -> Result<()> {
        use ::postgres::fallible_iterator::FallibleIterator;
        let dim = self.meta.dim;
        let pg = self.pg();
        let mut c = self.lock();
        // One snapshot, streamed: rows arrive as they are read, not all at once.
        let mut tx = c
            .client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .map_err(&pg)?;
        let dim_param = dim as i32;
        let mut rows = tx
            .query_raw(
                &format!(
                    "SELECT {FACE_COLUMNS}, vector_dims(embedding), \
                     CASE WHEN vector_dims(embedding) = $1 THEN embedding END \
                     FROM mfn_faces ORDER BY id"
                ),
                [&dim_param as &(dyn ::postgres::types::ToSql + Sync)],
            )
            .map_err(&pg)?;
        while let Some(r) = rows.next().map_err(&pg)? {
            let face = self.face(&r)?;
            let id = face.id;
            let embedding: Option<Vector> = r.try_get(7).map_err(&pg)?;
            let Some(embedding) = embedding else {
                let found: Option<i32> = r.try_get(6).map_err(&pg)?;
                return Err(self.corrupt(
                    id,
                    format!(
                        "the embedding has {} values; the gallery's have {dim}",
                        found.map_or("no".into(), |n| n.to_string())
                    ),
                ));
            };
            let values = embedding.as_slice();
            if values.len() != dim {
                return Err(self.corrupt(
                    id,
                    format!(
                        "the embedding has {} values; the gallery's have {dim}",
                        values.len()
                    ),
                ));
            }
            if let Some(j) = values.iter().position(|v| !v.is_finite()) {
                return Err(
                    self.corrupt(id, format!("value {j} of the embedding is {}", values[j]))
                );
            }
            visit(face, values)?;
        }
        drop(rows);
        tx.commit().map_err(&pg)
    }

    fn search(&self, query: &[f32], k: usize, how: ServerSearch) -> Result<Option<Vec<Hit>>> {
        if k == 0 {
            return Ok(Some(Vec::new()));
        }
        let pg = self.pg();
        let vector = Vector::from(query.to_vec());
        let exact = match how {
            ServerSearch::Exact => true,
            // pgvector's HNSW returns at most `ef_search` rows: deeper is exact.
            ServerSearch::Hnsw { .. } if k > MAX_EF_SEARCH as usize => true,
            ServerSearch::Hnsw { .. } => self.meta.dim > MAX_HNSW_DIM,
        };
        let mut c = self.lock();
        let statement = self.statement(&mut c, exact, k)?;
        let rows = if exact {
            let mut tx = c.client.transaction().map_err(&pg)?;
            tx.batch_execute("SET LOCAL enable_indexscan = off; SET LOCAL enable_bitmapscan = off")
                .map_err(&pg)?;
            let rows = tx.query(&statement, &[&vector]).map_err(&pg)?;
            tx.commit().map_err(&pg)?;
            rows
        } else {
            let ServerSearch::Hnsw { ef_search } = how else {
                unreachable!("exact above")
            };
            let ef = ef_search.max(k as u32).clamp(1, MAX_EF_SEARCH);
            if c.ef_search != Some(ef) {
                c.client
                    .batch_execute(&format!("SET hnsw.ef_search = {ef}"))
                    .map_err(&pg)?;
                c.ef_search = Some(ef);
            }
            c.client.query(&statement, &[&vector]).map_err(&pg)?
        };
        drop(c);
        self.hits(rows).map(Some)
    }
}

/// `INSERT` of `n` rows: `$1` is the time, then label, embedding and source per row.
fn insert_sql(n: usize) -> String {
    let mut sql = String::from("INSERT INTO mfn_faces (label, embedding, source, time) VALUES ");
    for i in 0..n {
        let p = 2 + 3 * i;
        if i > 0 {
            sql.push(',');
        }
        sql.push_str(&format!("(${p}, ${}, ${}, $1)", p + 1, p + 2));
    }
    sql.push_str(" RETURNING id");
    sql
}

/// Connects without TLS; the URL's own `connect_timeout` wins over the default.
fn connect(url: &str) -> Result<Client> {
    let mut config = Config::from_str(url).map_err(pg_error(url))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("mfn-gallery");
    }
    config.connect(NoTls).map_err(pg_error(url))
}

/// Whether `mfn_meta` and `mfn_faces` are there, in the current schema.
fn tables(client: &mut Client) -> std::result::Result<(bool, bool), ::postgres::Error> {
    let row = client.query_one(
        "SELECT to_regclass('mfn_meta') IS NOT NULL, to_regclass('mfn_faces') IS NOT NULL",
        &[],
    )?;
    Ok((row.get(0), row.get(1)))
}

/// Checks `mfn_faces`' columns and their types: `Err(Ok(message))` when they are not a
/// gallery's of `dim` values.
fn check_columns(
    client: &mut Client,
    dim: usize,
) -> std::result::Result<(), std::result::Result<String, ::postgres::Error>> {
    let rows = client
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
             WHERE attrelid = 'mfn_faces'::regclass AND attnum > 0 AND NOT attisdropped \
             ORDER BY attnum LIMIT 64",
            &[],
        )
        .map_err(Err)?;
    let found: HashMap<String, String> = rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    let vector = format!("vector({dim})");
    for (column, expected) in [
        ("id", "bigint"),
        ("label", "text"),
        ("embedding", vector.as_str()),
        ("source", "text"),
        ("time", "bigint"),
    ] {
        match found.get(column) {
            Some(t) if t == expected => {}
            Some(t) => {
                return Err(Ok(format!(
                    "the column `mfn_faces.{column}` is `{}`, not `{expected}`",
                    t.escape_debug()
                )))
            }
            None => {
                return Err(Ok(format!(
                    "the table `mfn_faces` has no `{column}` column ({expected})"
                )))
            }
        }
    }
    Ok(())
}

/// A PostgreSQL error with the database's location, its password masked.
fn pg_error(url: &str) -> impl Fn(::postgres::Error) -> Error + '_ {
    move |e| Error::Postgres {
        location: redact(url),
        message: scrub(url, &describe(&e)),
        source: Box::new(e),
    }
}

/// The whole of an error: the server's message with its detail and hint, or the client's
/// with its causes.
fn describe(e: &::postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{}: {}", db.severity(), db.message());
        if let Some(detail) = db.detail() {
            s.push_str(&format!(" ({detail})"));
        }
        if let Some(hint) = db.hint() {
            s.push_str(&format!("; hint: {hint}"));
        }
        return s;
    }
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

/// `text` with any password of `url` replaced by `***`.
fn scrub(url: &str, text: &str) -> String {
    let mut out = text.to_string();
    for secret in passwords(url) {
        if secret.len() >= 2 {
            out = out.replace(&secret, "***");
        }
    }
    out
}

/// The passwords a URL holds, as written and percent-decoded.
fn passwords(url: &str) -> Vec<String> {
    let mut out = Vec::new();
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (authority, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    if let Some((user, _)) = authority.rsplit_once('@') {
        if let Some((_, password)) = user.split_once(':') {
            out.push(password.to_string());
        }
    }
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        if let Some(("password", value)) = pair.split_once('=') {
            out.push(value.to_string());
        }
    }
    let decoded: Vec<String> = out.iter().map(|p| percent_decode(p)).collect();
    out.extend(decoded);
    out
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_statements() {
        assert_eq!(
            insert_sql(2),
            "INSERT INTO mfn_faces (label, embedding, source, time) VALUES \
             ($2, $3, $4, $1),($5, $6, $7, $1) RETURNING id"
        );
    }

    #[test]
    fn passwords_are_scrubbed() {
        let url = "postgres://me:s%40cret@host/db?password=other&sslmode=disable";
        let text = "failed for s%40cret, s@cret and other";
        let s = scrub(url, text);
        assert!(!s.contains("cret") && !s.contains("other"), "{s}");
    }
}
