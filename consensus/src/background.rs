//! Threads for work that may wait: a snapshot's serialisation, the log's rewrite
//! behind it and freeing the entries it dropped run at the lowest CPU priority, so
//! on a busy server they take the cycles the request path leaves rather than
//! competing with it.
//!
//! Serialising the state of 100,000 jobs takes a core for about a second. At the
//! default priority, on the 2-core development machine under 64 clients, that
//! second halved the request path's share of the CPU and showed as the benchmark's
//! p99; the work is not urgent (the log keeps every entry until the snapshot is
//! stored), so it yields. RocksDB lowers its compaction threads the same way.

// Unsafe: one `setpriority(2)` call for the calling thread, which std and nix do
// not offer.
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

/// Lowers the calling thread's CPU priority. Failing to is harmless (the work runs
/// at the usual priority) and only logged.
fn lower_priority() {
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
