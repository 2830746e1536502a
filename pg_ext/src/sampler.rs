//! Host CPU sampler: a background worker reads `/proc/stat` once a second and publishes the busy
//! share of all CPUs since its previous sample in shared memory; `dbopt.host_cpu_percent()` reads it.
//!
//! Why a worker and not a read inside the function: a utilisation figure needs two samples some time
//! apart. Sampling inside the call would add that interval to every `node_status()` (the router calls it
//! on every health check); the worker makes the call a single atomic load.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dbopt_hoststat::{utilisation_percent, CpuTimes};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PgAtomic};

/// How often the worker samples, and so the interval each figure covers.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// A figure older than this is not reported (the worker died or is stuck): NULL beats a stale number.
const MAX_AGE_SECS: i64 = 10;

/// Last CPU figure as `f64::to_bits`; NaN until the first two samples were taken.
static CPU_PERCENT_BITS: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"dbopt.cpu_percent") };
/// Unix time (seconds) of that figure; 0 = never.
static CPU_SAMPLED_AT: PgAtomic<AtomicI64> = unsafe { PgAtomic::new(c"dbopt.cpu_sampled_at") };

/// Registers the shared memory and the worker. Only valid from `_PG_init` while preloading.
pub fn init() {
    pg_shmem_init!(CPU_PERCENT_BITS = AtomicU64::new(f64::NAN.to_bits()));
    pg_shmem_init!(CPU_SAMPLED_AT = AtomicI64::new(0));
    BackgroundWorkerBuilder::new("dbopt cpu sampler")
        .set_type("dbopt cpu sampler")
        .set_library("dbopt")
        .set_function("dbopt_sampler_main")
        .enable_shmem_access(None)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn read_sample() -> Option<CpuTimes> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    match CpuTimes::parse(&text) {
        Ok(t) => Some(t),
        Err(e) => {
            warning!("dbopt cpu sampler: {e}");
            None
        }
    }
}

/// The worker's entry point (named in the registration above).
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn dbopt_sampler_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let mut previous = read_sample();
    while BackgroundWorker::wait_latch(Some(SAMPLE_INTERVAL)) {
        let current = read_sample();
        if let (Some(before), Some(after)) = (previous, current) {
            if let Some(pct) = utilisation_percent(before, after) {
                CPU_PERCENT_BITS
                    .get()
                    .store(pct.to_bits(), Ordering::Relaxed);
                CPU_SAMPLED_AT.get().store(unix_now(), Ordering::Release);
            }
        }
        previous = current;
    }
}

/// Busy share of all host CPUs over the last second, in percent; NULL when no fresh sample exists.
#[pg_extern(volatile, parallel_safe)]
pub fn host_cpu_percent() -> Option<f64> {
    let at = CPU_SAMPLED_AT.get().load(Ordering::Acquire);
    if at == 0 || unix_now() - at > MAX_AGE_SECS {
        return None;
    }
    let pct = f64::from_bits(CPU_PERCENT_BITS.get().load(Ordering::Relaxed));
    (!pct.is_nan()).then_some(pct)
}
