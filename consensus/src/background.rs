//! Threads for work that may wait: a snapshot's serialisation, the log's rewrite
//! behind it and freeing the entries it dropped run in the kernel's idle
//! scheduling class, so on a busy server they take the cycles the request path
//! leaves rather than competing with it.
//!
//! Serialising the state of 100,000 jobs takes a core for about a second. At the
//! default priority, on the 2-core development machine under 64 clients, that
//! second halved the request path's share of the CPU and showed as the benchmark's
//! p99; the work is not urgent (the log keeps every entry until the snapshot is
//! stored), so it yields. RocksDB lowers its compaction threads the same way.
//!
//! The lowest nice value was not enough: a replica's thread that gives up its CPU
//! between inputs (see `runtime`) handed it to the serialising thread, which then
//! held it for its slice, and the snapshot threads took 14% of the CPU while
//! 64 clients wrote. In the idle class a thread that wakes takes the CPU from it at
//! once. On a CPU that is never idle it still runs, with a small share (the idle
//! class weighs 3 against a default thread's 1,024), so a snapshot is stored in
//! the end and the log compacted behind it. With snapshots falling in the load
//! (64 clients after 16 s of 16), three pairs alternated on a 2-core AMD EPYC
//! gave 5,251 / 4,994, 4,817 / 5,776 and 5,107 / 5,514 writes a second, nice 19 /
//! idle class, and a p99 of 28-34 ms against 25-27.

// Unsafe: `sched_setscheduler(2)` and `setpriority(2)` for the calling thread,
// which std and nix do not offer.
#![allow(unsafe_code)]

/// The nice value of a background thread: the lowest priority.
const BACKGROUND_NICE: libc::c_int = 19;

/// Starts `work` on a thread named `name` at the lowest CPU priority.
pub fn spawn<T: Send + 'static>(
    name: String,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    std::thread::Builder::new().name(name).spawn(move || {
        lower_priority();
        work()
    })
}

/// Lowers the calling thread's CPU priority: the idle scheduling class, which runs
/// it only on a CPU nothing else wants and lets any other thread that wakes take the
/// CPU from it at once, and the lowest nice value where that class is refused.
/// Failing to is harmless (the work runs at the usual priority) and only logged.
fn lower_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler reads the parameter we pass and touches no other
    // memory of ours; pid 0 is the calling thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0 {
        return;
    }
    // SAFETY: gettid and setpriority take plain integers and touch no memory of
    // ours; on Linux, PRIO_PROCESS with a thread id sets that thread's nice value.
    let set = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICE)
    };
    if set != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "cannot lower a background thread's priority"
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn background_work_runs_in_the_idle_class() {
        let policy = super::spawn("background-test".into(), || {
            // SAFETY: reads the calling thread's policy; touches no memory of ours.
            unsafe { libc::sched_getscheduler(0) }
        })
        .unwrap()
        .join()
        .unwrap();
        assert_eq!(policy, libc::SCHED_IDLE);
    }
}
