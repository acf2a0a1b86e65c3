//! Helpers of the PostgreSQL tests: a throwaway server, random unit vectors.

#![allow(dead_code)]

pub mod pg;

/// A client of database `db` of `server`.
pub fn client(server: &pg::PgServer, db: &str) -> postgres::Client {
    postgres::Client::connect(&server.url(db), postgres::NoTls)
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", server.url(db)))
}

/// A small deterministic generator (xorshift), so the tests need no extra crate.
pub struct Rng(pub u64);

impl Rng {
    /// Uniform in `-1..1`.
    pub fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// A random unit vector.
    pub fn unit(&mut self, dim: usize) -> Vec<f32> {
        let v: Vec<f32> = (0..dim).map(|_| self.next()).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    }
}
