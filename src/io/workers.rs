//! A small pool of worker threads for the CPU-heavy work an event loop must not do inline:
//! applying a batch to a large key tree, laying out, signing and FEC-encoding a message.
//!
//! Jobs go in over a crossbeam channel; a job hands its result back over a channel of the
//! caller's and wakes the caller's `mio::Poll` through its [`mio::Waker`], so the loop sleeps
//! until the result is there. A job that panics is caught and reported as an error result; the
//! worker thread survives it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed pool of named worker threads.
#[derive(Debug)]
pub struct WorkerPool {
    jobs: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

/// The pool is shut down: the job was not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("worker pool is shut down")]
pub struct PoolClosed;

/// A job that panicked, with the panic's message when it was a string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("worker job panicked: {0}")]
pub struct JobPanicked(pub String);

impl WorkerPool {
    /// A pool of `threads` workers (at least one) named `name-N`.
    pub fn new(threads: usize, name: &str) -> std::io::Result<Self> {
        let (jobs, queue) = crossbeam_channel::unbounded::<Job>();
        let mut handles = Vec::new();
        for index in 0..threads.max(1) {
            let queue: Receiver<Job> = queue.clone();
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || {
                    while let Ok(job) = queue.recv() {
                        job();
                    }
                })?;
            handles.push(handle);
        }
        Ok(Self {
            jobs: Some(jobs),
            threads: handles,
        })
    }

    /// The number of worker threads.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Runs `job` on a worker, sends its result (or the panic) to `results` and wakes `waker`.
    pub fn spawn<R, F>(
        &self,
        job: F,
        results: Sender<Result<R, JobPanicked>>,
        waker: Arc<mio::Waker>,
    ) -> Result<(), PoolClosed>
    where
        R: Send + 'static,
        F: FnOnce() -> R + Send + 'static,
    {
        let jobs = self.jobs.as_ref().ok_or(PoolClosed)?;
        let wrapped: Job = Box::new(move || {
            let outcome = catch_unwind(AssertUnwindSafe(job)).map_err(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic".to_string());
                JobPanicked(message)
            });
            // The loop may have shut down and dropped its receiver: nothing to deliver to.
            if results.send(outcome).is_ok() {
                let _ = waker.wake();
            }
        });
        jobs.send(wrapped).map_err(|_| PoolClosed)
    }
}

impl WorkerPool {
    /// Closes the pool without waiting for its threads: the queued jobs still run, and each
    /// thread ends after the last. For a loop that must end at once.
    pub fn detach(mut self) {
        self.jobs = None;
        self.threads.clear();
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        // Closing the channel ends every worker's loop once the queued jobs are done.
        self.jobs = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use mio::{Events, Poll, Token, Waker};

    use super::*;

    #[test]
    fn results_come_back_and_wake_the_loop() {
        let mut poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(7)).unwrap());
        let pool = WorkerPool::new(2, "test-worker").unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..10u64 {
            pool.spawn(move || i * i, tx.clone(), Arc::clone(&waker))
                .unwrap();
        }
        let mut got = Vec::new();
        let mut events = Events::with_capacity(8);
        for _ in 0..1_000 {
            if got.len() == 10 {
                break;
            }
            poll.poll(&mut events, Some(Duration::from_millis(100)))
                .unwrap();
            got.extend(rx.try_iter().map(Result::unwrap));
        }
        got.sort_unstable();
        assert_eq!(got, (0..10u64).map(|i| i * i).collect::<Vec<_>>());
    }

    #[test]
    fn a_panicking_job_is_reported_and_the_worker_survives() {
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(1)).unwrap());
        let pool = WorkerPool::new(1, "test-panic").unwrap();
        let (tx, rx) = crossbeam_channel::unbounded::<Result<u32, JobPanicked>>();
        pool.spawn(|| panic!("boom"), tx.clone(), Arc::clone(&waker))
            .unwrap();
        pool.spawn(|| 5, tx, waker).unwrap();
        let first = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(first, Err(JobPanicked("boom".into())));
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), Ok(5));
    }
}
