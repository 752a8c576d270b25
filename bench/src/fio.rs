//! fio's JSON output, condensed to one number per job run.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The jobs `bench/run.sh` runs, in table order, with what each is scored by.
pub const JOBS: [(&str, &str); 4] =
    [("seq-read", "MiB/s"), ("seq-write", "MiB/s"), ("rand-read", "IOPS"), ("rand-write", "IOPS")];

/// Where the jobs run, in table order; the first is the reference.
pub const TARGETS: [&str; 4] = ["host", "dir", "loop-dio", "loop-nodio"];

/// One fio job on one target in one repetition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FioRun {
    /// One of [`TARGETS`].
    pub target: String,
    /// One of [`JOBS`].
    pub job: String,
    /// Repetition number.
    pub rep: u32,
    /// MiB/s for sequential jobs, IOPS for random ones.
    pub value: f64,
}

/// Reads every `<target>.<job>.<rep>.json` fio output in `dir`.
pub fn read_dir(dir: &Path) -> anyhow::Result<Vec<FioRun>> {
    let mut runs = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        let mut parts = name.split('.');
        let (Some(target), Some(job), Some(rep), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let text = std::fs::read_to_string(&path)?;
        let value = score(job, &text).with_context(|| path.display().to_string())?;
        runs.push(FioRun { target: target.into(), job: job.into(), rep: rep.parse()?, value });
    }
    runs.sort_by(|a, b| (&a.target, &a.job, a.rep).cmp(&(&b.target, &b.job, b.rep)));
    Ok(runs)
}

/// A job's score from fio's JSON: bandwidth in MiB/s or IOPS of its direction.
fn score(job: &str, text: &str) -> anyhow::Result<f64> {
    // fio may print warnings before the JSON document.
    let json: Value = serde_json::from_str(&text[text.find('{').context("no JSON")?..])?;
    let side = if job.ends_with("read") { "read" } else { "write" };
    let stats = &json["jobs"][0][side];
    let unit = JOBS.iter().find(|(j, _)| *j == job).map(|(_, u)| *u).context("unknown job")?;
    let value = if unit == "IOPS" { stats["iops"].as_f64() } else { stats["bw"].as_f64().map(|kib| kib / 1024.0) };
    value.context("no bandwidth or IOPS in fio output")
}

#[cfg(test)]
mod tests {
    use super::score;

    #[test]
    fn scores_the_jobs_direction() {
        let out = r#"note: both iodepth >= 1 and synchronous I/O engine
{"jobs":[{"read":{"bw":2048,"iops":2.0},"write":{"bw":0,"iops":0.0}}]}"#;
        assert_eq!(score("seq-read", out).unwrap(), 2.0);
        assert_eq!(score("rand-read", out).unwrap(), 2.0);
        assert_eq!(score("rand-write", out).unwrap(), 0.0);
    }
}
