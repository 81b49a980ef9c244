//! What the benchmarks share: sizes from the environment, and a table that prints two
//! columns of samples measured in the same run (Ferry and its baseline) with their ratio.

use std::time::Duration;

/// A size from the environment (e.g. `FERRY_BENCH_CALLS`), or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `p` quantile (0.5: median) of `samples`, which it sorts.
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

/// Prints `measure | ours | theirs | ratio` rows under a header naming both columns.
pub struct Comparison {
    pub ours: &'static str,
    pub theirs: &'static str,
}

impl Comparison {
    pub fn header(&self) {
        println!(
            "{:<28} {:>12} {:>12} {:>8}",
            "measure", self.ours, self.theirs, "ratio"
        );
    }

    /// One row: the `p` quantile of each column of samples, and ours / theirs.
    pub fn row(&self, label: &str, samples: &[Vec<Duration>; 2], p: f64) {
        let (mut a, mut b) = (samples[0].clone(), samples[1].clone());
        let (ours, theirs) = (percentile(&mut a, p), percentile(&mut b, p));
        println!(
            "{:<28} {:>9.2} ms {:>9.2} ms {:>7.2}x",
            label,
            ours.as_secs_f64() * 1e3,
            theirs.as_secs_f64() * 1e3,
            ours.as_secs_f64() / theirs.as_secs_f64()
        );
    }

    /// The table both CNI benchmarks print: the header, then ADD and DEL (median, p90)
    /// and the median of the rounds of parallel ADDs.
    pub fn print_add_del_parallel(
        &self,
        add: &[Vec<Duration>; 2],
        del: &[Vec<Duration>; 2],
        parallel: &[Vec<Duration>; 2],
    ) {
        self.header();
        let rows: [(&str, &[Vec<Duration>; 2], f64); 5] = [
            ("ADD median", add, 0.5),
            ("ADD p90", add, 0.9),
            ("DEL median", del, 0.5),
            ("DEL p90", del, 0.9),
            ("50 parallel ADDs (median)", parallel, 0.5),
        ];
        for (label, samples, p) in rows {
            self.row(label, samples, p);
        }
    }
}
