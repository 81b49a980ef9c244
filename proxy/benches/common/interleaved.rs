//! Series of latency samples measured round by round: in each round every series takes one
//! sample, starting from a different series each round, so whatever else the machine does
//! hits every series alike and a ratio of two series measured together is fair.

use std::sync::mpsc;
use std::time::Duration;

use ferry_tests::Netns;

/// What one sample of a series does, timed by itself (only the part it times counts).
pub type Sample<'a> = Box<dyn FnMut() -> std::io::Result<Duration> + 'a>;

/// One series: where its thread runs, and how it starts. `start` runs once on that thread
/// (sockets opened there belong to `netns`) and returns the sample to repeat, so a series
/// can keep state between samples (e.g. one established connection).
pub struct Series<'a> {
    pub label: String,
    pub netns: &'a Netns,
    pub start: Box<dyn FnOnce() -> std::io::Result<Sample<'a>> + Send + 'a>,
}

/// `rounds` samples of each series after `warmup` untimed rounds; one thread per series
/// inside its netns, driven one sample at a time from here.
pub fn interleaved(series: Vec<Series<'_>>, warmup: usize, rounds: usize) -> Vec<Vec<Duration>> {
    std::thread::scope(|s| {
        let workers: Vec<_> = series
            .into_iter()
            .map(|Series { label, netns, start }| {
                let (job_tx, job_rx) = mpsc::channel::<()>();
                let (done_tx, done_rx) = mpsc::channel::<std::io::Result<Duration>>();
                let what = label.clone();
                s.spawn(move || {
                    netns.run(move || {
                        let mut sample = match start() {
                            Ok(sample) => sample,
                            Err(e) => {
                                let _ = done_tx.send(Err(e));
                                return;
                            }
                        };
                        for () in job_rx {
                            if done_tx.send(sample()).is_err() {
                                break;
                            }
                        }
                    })
                });
                (job_tx, done_rx, what)
            })
            .collect();
        let mut samples = vec![Vec::with_capacity(rounds); workers.len()];
        for round in 0..warmup + rounds {
            for k in 0..workers.len() {
                let k = (k + round) % workers.len();
                let (job, done, label) = &workers[k];
                // A worker that failed to start has answered already and gone.
                let _ = job.send(());
                let took = done
                    .recv()
                    .unwrap_or_else(|_| panic!("{label}: its thread ended (see the panic above)"))
                    .unwrap_or_else(|e| panic!("{label}: {e}"));
                if round >= warmup {
                    samples[k].push(took);
                }
            }
        }
        samples
        // The job senders drop here: the workers end and the scope joins them.
    })
}
