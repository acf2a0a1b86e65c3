//! Face-like test data: a small deterministic generator, clustered identities and
//! LFW-like galleries (skewed images per person), as unit-length rows.

#![allow(dead_code)]

/// A small deterministic generator (xorshift, Box-Muller), so the tests need no extra
/// crate.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn gauss(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }

    pub fn gauss_vec(&mut self, dim: usize, scale: f32) -> Vec<f32> {
        (0..dim).map(|_| self.gauss() * scale).collect()
    }
}

pub fn unit(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
    v
}

pub fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// `people` identity centres and `copies` noisy images of each (cosine about 0.7 with
/// the centre, 0.5 between two images, as a face model's embeddings of one person), plus
/// `probes` fresh images of random people. Row-major, unit length.
pub fn clustered(
    rng: &mut Rng,
    dim: usize,
    people: usize,
    copies: usize,
    probes: usize,
) -> (Vec<f32>, Vec<f32>) {
    let centres: Vec<Vec<f32>> = (0..people).map(|_| unit(rng.gauss_vec(dim, 1.0))).collect();
    let sigma = 1.0 / (dim as f32).sqrt();
    let image = |rng: &mut Rng, p: usize| unit(add(&centres[p], &rng.gauss_vec(dim, sigma)));
    let mut data = Vec::with_capacity(people * copies * dim);
    for p in 0..people {
        for _ in 0..copies {
            data.extend(image(rng, p));
        }
    }
    let mut queries = Vec::new();
    for _ in 0..probes {
        let p = rng.below(people);
        queries.extend(image(rng, p));
    }
    (data, queries)
}

/// LFW-like data: a skewed number of images per person (most have one, a few dozens),
/// identities spread over a low-dimensional part of the space and images varying along
/// a few more directions (pose, light), as a face model's embeddings do; `probes` fresh
/// images of random people, enrolled or not. Row-major, unit length.
pub fn lfw_like(rng: &mut Rng, dim: usize, people: usize, probes: usize) -> (Vec<f32>, Vec<f32>) {
    let basis = |rng: &mut Rng, rank: usize| -> Vec<Vec<f32>> {
        (0..rank).map(|_| unit(rng.gauss_vec(dim, 1.0))).collect()
    };
    let (who, how) = (basis(rng, 96), basis(rng, 32));
    let mix = |rng: &mut Rng, basis: &[Vec<f32>], scale: f32| -> Vec<f32> {
        let mut v = vec![0f32; dim];
        for b in basis {
            let c = rng.gauss() * scale;
            v.iter_mut().zip(b).for_each(|(x, y)| *x += c * y);
        }
        v
    };
    let centres: Vec<Vec<f32>> = (0..people).map(|_| unit(mix(rng, &who, 1.0))).collect();
    let image = |rng: &mut Rng, p: usize| {
        let pose = mix(rng, &how, 0.12);
        let noise = rng.gauss_vec(dim, 0.02);
        unit(add(&add(&centres[p], &pose), &noise))
    };
    let mut data = Vec::new();
    for p in 0..people {
        // 60 % one image, then a geometric tail up to 40.
        let mut n = 1;
        while n < 40 && rng.uniform() < if n == 1 { 0.4 } else { 0.8 } {
            n += 1;
        }
        for _ in 0..n {
            data.extend(image(rng, p));
        }
    }
    let mut queries = Vec::new();
    for _ in 0..probes {
        let p = rng.below(people + people / 4);
        if p < people {
            queries.extend(image(rng, p));
        } else {
            // Someone never enrolled.
            queries.extend(unit(mix(rng, &who, 1.0)));
        }
    }
    (data, queries)
}
