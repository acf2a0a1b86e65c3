//! Checks of argument values at parse time (clap `value_parser`s): a bad value is refused
//! with exit status 2 and a message naming the flag before any work starts.

use std::path::PathBuf;

/// Threads per core `--threads` may ask for. A few per core can help when image decoding
/// waits on the disk; beyond that threads only contend for the cores, and each holds its
/// own stack and scratch buffers, so huge counts exhaust memory before doing any work.
pub const THREADS_PER_CORE: usize = 8;

/// Most images per batch (`--batch` of eval, embed and train). One 112x112 image's
/// activations take a few MB in the network, so 1024 is some GB: more than any device
/// needs to be busy, and a typo such as 1000000 would otherwise try to allocate TBs.
pub const MAX_BATCH: usize = 1024;

/// Smallest and largest side of an `align --size` crop, in pixels.
pub const CROP_SIDES: std::ops::RangeInclusive<u32> = 16..=1024;

/// Longest `--minutes` (about two years): larger values overflow a `Duration`.
pub const MAX_MINUTES: f64 = 1e6;

fn number(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number"))?;
    if !v.is_finite() {
        return Err(format!("`{s}` is not a finite number"));
    }
    Ok(v)
}

/// `--threads`: 1 up to [`THREADS_PER_CORE`] per core of this machine.
pub fn threads(s: &str) -> Result<usize, String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let max = THREADS_PER_CORE * cores;
    let n: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number"))?;
    if !(1..=max).contains(&n) {
        return Err(format!(
            "{n} is not in 1..={max} ({THREADS_PER_CORE} per core of this machine's {cores}: \
             more threads only contend for the cores and each costs its own memory)"
        ));
    }
    Ok(n)
}

/// A cosine threshold: a finite number in -1..=1.
pub fn cosine(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if !(-1.0..=1.0).contains(&v) {
        return Err(format!("{v} is not a cosine in -1..=1"));
    }
    Ok(v)
}

/// A finite number greater than 0.
pub fn positive(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if v <= 0.0 {
        return Err(format!("{v} is not greater than 0"));
    }
    Ok(v)
}

/// A finite number, 0 or more.
pub fn non_negative(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if v < 0.0 {
        return Err(format!("{v} is negative"));
    }
    Ok(v)
}

/// Any finite number.
pub fn finite(s: &str) -> Result<f64, String> {
    number(s)
}

/// `--minutes`: finite, greater than 0, at most [`MAX_MINUTES`].
pub fn minutes(s: &str) -> Result<f64, String> {
    let v = positive(s)?;
    if v > MAX_MINUTES {
        return Err(format!("{v} is more than {MAX_MINUTES} minutes"));
    }
    Ok(v)
}

/// `--epochs`: finite, greater than 0, at most a million.
pub fn epochs(s: &str) -> Result<f64, String> {
    let v = positive(s)?;
    if v > 1e6 {
        return Err(format!("{v} is more than a million epochs"));
    }
    Ok(v)
}

/// SGD momentum: 0 <= m < 1 (1 or more never forgets a gradient and diverges).
pub fn momentum(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if !(0.0..1.0).contains(&v) {
        return Err(format!("{v} is not in 0..1 (0 included, 1 not)"));
    }
    Ok(v)
}

/// Width multiplier: greater than 0, at most 4.
pub fn width(s: &str) -> Result<f64, String> {
    let v = positive(s)?;
    if v > 4.0 {
        return Err(format!("{v} is not in (0, 4]"));
    }
    Ok(v)
}

/// A minimum face size in pixels: 0 up to 10000.
pub fn face_size(s: &str) -> Result<f32, String> {
    let v = non_negative(s)?;
    if v > 10_000.0 {
        return Err(format!("{v} is more than 10000 pixels"));
    }
    Ok(v as f32)
}

/// SCRFD's input sizing: `letterbox:N` or `fit:N` (see `InputSize`'s `FromStr`).
pub fn det_size(s: &str) -> Result<mfn_detect::scrfd::InputSize, String> {
    s.parse()
}

/// An image file extension: 1 to 8 letters or digits (it is joined to file names).
pub fn extension(s: &str) -> Result<String, String> {
    let ext = s.strip_prefix('.').unwrap_or(s);
    if ext.is_empty() || ext.len() > 8 || !ext.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(format!(
            "`{s}` is not a file extension (1 to 8 letters or digits)"
        ));
    }
    Ok(ext.to_string())
}

/// `WIDTHxHEIGHT`, each side within [`CROP_SIDES`].
pub fn crop_size(s: &str) -> Result<[u32; 2], String> {
    let bad = || format!("`{s}` is not WIDTHxHEIGHT");
    let (w, h) = s.split_once('x').ok_or_else(bad)?;
    let n = |v: &str| v.trim().parse::<u32>().map_err(|_| bad());
    let size = [n(w)?, n(h)?];
    if !size.iter().all(|v| CROP_SIDES.contains(v)) {
        return Err(format!(
            "{}x{}: each side must be {}..={} pixels",
            size[0],
            size[1],
            CROP_SIDES.start(),
            CROP_SIDES.end()
        ));
    }
    Ok(size)
}

/// An SVG or PNG file, by its extension (`--roc`).
pub fn plot_file(s: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(s);
    match p
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("svg" | "png") => Ok(p),
        _ => Err(format!("`{s}`: the plot is written as .svg or .png")),
    }
}

/// A native model file: `.safetensors`, the only format `mfn-cli` writes.
pub fn safetensors_file(s: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(s);
    if p.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        return Err(format!(
            "`{s}`: the native format is written to a `.safetensors` file"
        ));
    }
    Ok(p)
}

/// A whole number from `min` up to `max`, for `#[arg(value_parser = count(..))]`.
pub fn count(
    min: usize,
    max: usize,
) -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let n: usize = s
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a whole number"))?;
        if n < min {
            return Err(format!("{n} is less than {min}"));
        }
        if n > max {
            return Err(format!("{n} is more than {max}"));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_are_refused() {
        assert!(threads("0").is_err());
        assert!(threads("100000").is_err());
        assert_eq!(threads("1"), Ok(1));
        assert!(cosine("NaN").is_err() && cosine("1.5").is_err());
        assert_eq!(cosine("-1"), Ok(-1.0));
        assert!(minutes("NaN").is_err() && minutes("-1").is_err() && minutes("1e300").is_err());
        assert!(minutes("inf").is_err());
        assert!(positive("0").is_err());
        assert!(momentum("1").is_err());
        assert!(width("5").is_err() && width("0").is_err());
        assert!(crop_size("65536x65536").is_err() && crop_size("8x8").is_err());
        assert_eq!(crop_size("96x112"), Ok([96, 112]));
        assert!(extension("../x").is_err());
        assert_eq!(extension(".png"), Ok("png".into()));
        assert!(plot_file("r.pdf").is_err());
        assert!(safetensors_file("m.bin").is_err());
        let folds = count(2, usize::MAX);
        assert_eq!(folds("1"), Err("1 is less than 2".into()));
        assert_eq!(count(1, 4)("5"), Err("5 is more than 4".into()));
    }
}
