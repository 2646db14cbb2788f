//! Keeping the compute pool's other workers awake for the length of one run.
//!
//! A model runs as a chain of kernels, most of them one or two parallel loops of well under a
//! millisecond. Between two loops rayon lets an idle worker go to sleep (a few dozen rounds of
//! looking for work, then a futex wait), and the next loop has to wake it: on a virtual
//! machine the wake-up is an inter-processor interrupt through the hypervisor, tens of
//! microseconds before the helper takes its first chunk. MobileNetV2 at batch 1 slept and woke
//! about 78 times per inference (`perf stat`: 15 915 context switches over 205 runs), and
//! 17 % of its samples were the scheduler's. ONNX Runtime's pool spins between loops for the
//! same reason.
//!
//! So while a run executes, each other worker polls the pool for jobs ([`rayon::yield_now`],
//! which runs whatever job it finds: a chunk of this run's loops, or another request's work)
//! and spins between polls, yielding the CPU to other threads after a while without work. The
//! helpers stop when the run ends, panics included. Cost: up to `threads - 1` cores stay busy
//! during a run's serial stretches, as in ONNX Runtime (whose `allow_spinning` is on by
//! default); `--no-spin` turns it off. Measured on MobileNetV2, batch 1, 2 threads, adjacent
//! runs: median 7.3 ms against 8.7 ms sleeping.

use std::sync::atomic::{AtomicBool, Ordering};

/// Whether runs keep the other workers polling (`--no-spin` turns it off).
static SPIN: AtomicBool = AtomicBool::new(true);

/// Turns the polling on or off for the runs that start afterwards.
pub(super) fn set_spinning(on: bool) {
    SPIN.store(on, Ordering::Relaxed);
}

/// Polls without work this many times before also yielding the CPU between polls (about
/// 0.1-1 ms: longer than the gaps between one run's loops).
const SPIN_POLLS: u32 = 1_000;
/// Spin hints between two polls: a poll is a steal attempt on every worker's queue (atomic
/// operations on shared lines, measured 13 % of MobileNetV2's samples when polling back to
/// back), and the waiting should leave the core's resources to a sibling hyperthread.
const PAUSES: u32 = 16;

/// Runs `f` on the current compute-pool worker with the pool's other workers polling for work
/// until it returns. Outside a rayon pool, or with one worker, just runs `f`.
pub fn with_workers_awake<R>(f: impl FnOnce() -> R) -> R {
    let helpers = rayon::current_num_threads().saturating_sub(1);
    if helpers == 0 || rayon::current_thread_index().is_none() || !SPIN.load(Ordering::Relaxed) {
        return f();
    }
    let done = AtomicBool::new(false);
    // `in_place_scope`: `f` runs on this thread (it need not be `Send`); the scope returns once
    // every helper has seen `done`. A helper no worker took yet is run by this thread at the
    // scope's end, and returns at once.
    rayon::in_place_scope(|s| {
        for _ in 0..helpers {
            s.spawn(|_| poll(&done));
        }
        /// Sets `done` however `f` ends: a panic unwinding through the scope would otherwise
        /// wait forever for the helpers.
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let _stop = Stop(&done);
        f()
    })
}

/// One helper: runs the pool's jobs as they appear until `done`.
fn poll(done: &AtomicBool) {
    let mut idle = 0u32;
    while !done.load(Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => idle = 0,
            _ if idle < SPIN_POLLS => {
                idle += 1;
                for _ in 0..PAUSES {
                    std::hint::spin_loop();
                }
            }
            _ => std::thread::yield_now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::sync::atomic::AtomicUsize;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool")
    }

    #[test]
    fn helpers_run_the_loops_and_stop_with_the_run() {
        let pool = pool(3);
        // Loops one after another in one run, until a helper took a chunk of one (on a busy
        // machine its thread may not be scheduled for a while) or 10 s passed.
        let on_others = pool.install(|| {
            let me = rayon::current_thread_index();
            let others = AtomicUsize::new(0);
            let start = std::time::Instant::now();
            with_workers_awake(|| {
                for round in 0.. {
                    let sum = (0..1000usize)
                        .into_par_iter()
                        .with_max_len(10)
                        .map(|i| {
                            if rayon::current_thread_index() != me {
                                others.fetch_add(1, Ordering::Relaxed);
                            }
                            i * round
                        })
                        .sum::<usize>();
                    assert_eq!(sum, 499_500 * round);
                    if others.load(Ordering::Relaxed) > 0 || start.elapsed().as_secs() >= 10 {
                        break;
                    }
                }
            });
            others.into_inner()
        });
        assert!(on_others > 0, "no chunk ran on a helper");
        // The helpers returned: the pool runs further work (a helper still spinning on the
        // only other worker would leave these jobs to this thread, but they would still run;
        // `with_workers_awake` returning at all shows the scope saw every helper stop).
        assert_eq!(pool.install(|| (0..100).into_par_iter().sum::<i32>()), 4950);
    }

    #[test]
    fn a_panic_in_the_run_stops_the_helpers() {
        let pool = pool(2);
        let caught = pool.install(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                with_workers_awake(|| panic!("kernel bug"))
            }))
        });
        assert!(caught.is_err());
        assert_eq!(pool.install(|| with_workers_awake(|| 7)), 7);
    }

    #[test]
    fn outside_a_pool_it_just_runs() {
        assert_eq!(with_workers_awake(|| 5), 5);
    }
}
