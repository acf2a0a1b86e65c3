//! What a benchmark ran on: CPU model, cores and GPUs, read from the operating system so
//! results and baselines carry their machine.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The machine a measurement was taken on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// CPU model name (`model name` in `/proc/cpuinfo`).
    pub cpu: String,
    /// Logical cores available to this process.
    pub cores: usize,
    /// GPU names, empty when there is none.
    #[serde(default)]
    pub gpus: Vec<String>,
    /// Operating system and architecture.
    #[serde(default)]
    pub os: String,
}

impl Machine {
    /// Describes the machine this process runs on.
    pub fn detect() -> Self {
        Self {
            cpu: cpu_model(Path::new("/proc/cpuinfo")).unwrap_or_else(|| "unknown CPU".into()),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            gpus: gpus(),
            os: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
        }
    }

    /// A file-name-safe name for the machine: the CPU model in lower case with runs of
    /// other characters turned into `-`, then the core count, then the first GPU if any
    /// (`amd-epyc-2c`).
    pub fn slug(&self) -> String {
        let mut s = slugify(&self.cpu);
        s.push_str(&format!("-{}c", self.cores));
        if let Some(gpu) = self.gpus.first() {
            s.push('-');
            s.push_str(&slugify(gpu));
        }
        s
    }
}

fn slugify(text: &str) -> String {
    // Marketing suffixes add nothing that tells two machines apart.
    let cleaned = text
        .replace("(R)", "")
        .replace("(TM)", "")
        .replace("(tm)", "")
        .replace(" CPU", "")
        .replace(" Processor", "");
    let mut out = String::new();
    for c in cleaned.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    let trimmed = out.trim_end_matches('-');
    if trimmed.is_empty() {
        "unknown".into()
    } else {
        trimmed.into()
    }
}

fn cpu_model(cpuinfo: &Path) -> Option<String> {
    let text = std::fs::read_to_string(cpuinfo).ok()?;
    // x86 says `model name`; some ARM kernels only give `Hardware` or `Processor`.
    ["model name", "Hardware", "Processor", "cpu model"]
        .iter()
        .find_map(|key| {
            text.lines().find_map(|line| {
                let (k, v) = line.split_once(':')?;
                (k.trim() == *key && !v.trim().is_empty()).then(|| v.trim().to_string())
            })
        })
}

/// NVIDIA GPUs as the kernel driver lists them; without the driver there are none.
fn gpus() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc/driver/nvidia/gpus") else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("information")).ok())
        .filter_map(|info| {
            info.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "Model").then(|| v.trim().to_string())
            })
        })
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_file_name_safe() {
        let m = Machine {
            cpu: "Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz".into(),
            cores: 16,
            gpus: vec!["NVIDIA H100 80GB HBM3".into()],
            os: String::new(),
        };
        assert_eq!(
            m.slug(),
            "intel-xeon-platinum-8480-2-00ghz-16c-nvidia-h100-80gb-hbm3"
        );
        let m = Machine {
            cpu: "AMD EPYC".into(),
            cores: 2,
            gpus: vec![],
            os: String::new(),
        };
        assert_eq!(m.slug(), "amd-epyc-2c");
    }

    #[test]
    fn reads_the_cpu_model() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cpuinfo");
        std::fs::write(
            &p,
            "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n",
        )
        .unwrap();
        assert_eq!(cpu_model(&p).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(cpu_model(&dir.path().join("missing")), None);
    }
}
