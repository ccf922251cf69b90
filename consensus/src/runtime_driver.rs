//! The replica's thread (see the parent module): its loop, the sink each `Ready`
//! goes through, and the log write it serves its connections around.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use raft::prelude::Message;
use tokio::sync::mpsc::Receiver;
use tokio::sync::oneshot;

use super::{Input, COMMIT_NOTICE_HOLD, QUIET_SPIN, WAITER_TTL};
use crate::log_store::LogStoreError;
use crate::metrics::RaftMetrics;
use crate::replica::{
    Applied, ProposeError, ReadyOutput, ReadySink, Replica, ReplicaStatus, RequestId,
};
use crate::state_machine::StateMachine;
use crate::transport::{Feedback, Transport};

type Waiter<O> = (oneshot::Sender<Result<Applied<O>, ProposeError>>, Instant);

struct Waiters<O> {
    writes: HashMap<RequestId, Waiter<O>>,
    reads: HashMap<RequestId, (oneshot::Sender<Result<(), ProposeError>>, Instant)>,
}

/// The replica's thread: the replica, its input, and the runtime its peer traffic
/// runs on.
pub(super) struct Driver<S: StateMachine> {
    replica: Replica<S>,
    rx: Receiver<Input<S::Output>>,
    runtime: tokio::runtime::Runtime,
    /// The thread a batch of several entries is written on (see [`persist_serving`]).
    writer: rayon::ThreadPool,
    transport: Arc<Transport>,
    stop: Arc<AtomicBool>,
    waiters: Waiters<S::Output>,
}

/// Passes a `Ready`'s messages to the transport, runs the peer traffic when they must
/// leave, and answers the waiters of what was applied.
struct Sink<'a, O> {
    runtime: &'a tokio::runtime::Runtime,
    writer: &'a rayon::ThreadPool,
    spin: Duration,
    transport: &'a Transport,
    waiters: &'a mut Waiters<O>,
    unsent: bool,
}

impl<O> ReadySink<O> for Sink<'_, O> {
    fn send(&mut self, msg: Message) {
        self.transport.send(msg);
        self.unsent = true;
    }

    fn flush(&mut self) {
        if std::mem::take(&mut self.unsent) {
            run_peer_traffic(self.runtime);
        }
    }

    fn persist(
        &mut self,
        entries: usize,
        write: &mut (dyn FnMut() -> Result<(), LogStoreError> + Send),
    ) -> Result<(), LogStoreError> {
        persist_serving(self.runtime, self.writer, self.spin, entries, write)
    }

    fn answer(&mut self, out: ReadyOutput<O>) {
        for (id, applied) in out.applied {
            if let Some((reply, _)) = self.waiters.writes.remove(&id) {
                let _ = reply.send(Ok(applied));
            }
        }
        for id in out.reads {
            if let Some((reply, _)) = self.waiters.reads.remove(&id) {
                let _ = reply.send(Ok(()));
            }
        }
    }
}

/// Runs every peer task that is ready (senders writing what was queued, connections
/// reading what arrived), and polls the sockets once, without waiting.
fn run_peer_traffic(runtime: &tokio::runtime::Runtime) {
    runtime.block_on(tokio::task::yield_now());
}

/// Runs the peer traffic until `ready` holds or `spin` has passed, giving the CPU
/// to whatever else is ready between looks; answers whether `ready` holds.
fn poll_until(
    runtime: &tokio::runtime::Runtime,
    spin: Duration,
    mut ready: impl FnMut() -> bool,
) -> bool {
    if ready() {
        return true;
    }
    if spin.is_zero() {
        return false;
    }
    let until = Instant::now() + spin;
    loop {
        run_peer_traffic(runtime);
        if ready() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::yield_now();
    }
}

impl<S: StateMachine> Driver<S> {
    pub(super) fn new(
        replica: Replica<S>,
        rx: Receiver<Input<S::Output>>,
        runtime: tokio::runtime::Runtime,
        writer: rayon::ThreadPool,
        transport: Arc<Transport>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        Driver {
            replica,
            rx,
            runtime,
            writer,
            transport,
            stop,
            waiters: Waiters {
                writes: HashMap::new(),
                reads: HashMap::new(),
            },
        }
    }

    pub(super) fn run(
        mut self,
        status: Arc<RwLock<ReplicaStatus>>,
        metrics: Arc<RaftMetrics>,
        tick: Duration,
        spin: Duration,
    ) {
        let mut next_tick = Instant::now() + tick;
        // Whether the last pass had input: only then does the thread poll before
        // it parks, so a pass woken by its tick alone parks at once.
        let mut busy = false;
        // Whether the last polling ended with input arriving: only then may the next
        // one last the whole spin.
        let mut streaming = false;
        let mut members = self.replica.members().clone();
        let mut last_leader = self.replica.leader();
        let mut commit_notice_at: Option<Instant> = None;
        'outer: loop {
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            // Waits for input until the next tick (or a held commit notice is due),
            // serving the peers meanwhile; peer tasks that are ready run first even
            // when input is already queued.
            let wake = commit_notice_at.map_or(next_tick, |at| at.min(next_tick));
            if busy {
                let spin = if streaming {
                    spin
                } else {
                    spin.min(QUIET_SPIN)
                };
                streaming = self
                    .poll_before_parking(spin.min(wake.saturating_duration_since(Instant::now())));
            }
            let deadline = tokio::time::Instant::from_std(wake);
            let rx = &mut self.rx;
            let first = self.runtime.block_on(async {
                tokio::task::yield_now().await;
                tokio::time::timeout_at(deadline, rx.recv()).await
            });
            busy = matches!(first, Ok(Some(_)));
            match first {
                Ok(Some(input)) => {
                    if !self.handle_input(input) {
                        break 'outer;
                    }
                    for _ in 0..16_384 {
                        let Ok(input) = self.rx.try_recv() else {
                            break;
                        };
                        if !self.handle_input(input) {
                            break 'outer;
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => {}
            }
            let now = Instant::now();
            if now >= next_tick {
                self.replica.tick();
                next_tick = (next_tick + tick).max(now);
                self.waiters
                    .writes
                    .retain(|_, (_, at)| now.duration_since(*at) < WAITER_TTL);
                self.waiters
                    .reads
                    .retain(|_, (_, at)| now.duration_since(*at) < WAITER_TTL);
            }
            if commit_notice_at.is_some_and(|at| now >= at) {
                commit_notice_at = None;
                self.replica.send_commit_notice();
            }
            if self.replica.has_ready() {
                let mut sink = Sink {
                    runtime: &self.runtime,
                    writer: &self.writer,
                    spin,
                    transport: &self.transport,
                    waiters: &mut self.waiters,
                    unsent: false,
                };
                if let Err(e) = self.replica.handle_ready_answering(&mut sink) {
                    tracing::error!(error = %e, "raft replica stopped");
                    break;
                }
            }
            commit_notice_at = self
                .replica
                .commit_notice_pending()
                .then(|| commit_notice_at.unwrap_or_else(|| Instant::now() + COMMIT_NOTICE_HOLD));
            if self.replica.members() != &members {
                members = self.replica.members().clone();
                self.transport.set_members(&members);
            }
            let current = self.replica.status();
            if current.leader != last_leader {
                // Proposals forwarded to a former leader may be lost: let every waiting
                // request propose again now instead of at its next attempt deadline.
                // Commands are idempotent under their request, so a duplicate is
                // harmless.
                last_leader = current.leader;
                for (_, (reply, _)) in self.waiters.writes.drain() {
                    let _ = reply.send(Err(ProposeError::NoLeader));
                }
                for (_, (reply, _)) in self.waiters.reads.drain() {
                    let _ = reply.send(Err(ProposeError::NoLeader));
                }
            }
            metrics.term.set(current.term as i64);
            metrics.leader.set(current.leader.unwrap_or(0) as i64);
            metrics.is_leader.set(i64::from(self.replica.is_leader()));
            metrics.commit_index.set(current.commit_index as i64);
            metrics.applied_index.set(current.applied_index as i64);
            *status.write() = current;
        }
        // Closing the queue first answers every request still waiting on it (they
        // see the replica stopped); dropping the runtime then ends the peer traffic.
        self.rx.close();
    }

    /// Runs the peer traffic and looks at the queue until input arrives or `spin`
    /// has passed ([`poll_until`]). True when input arrived.
    fn poll_before_parking(&mut self, spin: Duration) -> bool {
        let rx = &self.rx;
        poll_until(&self.runtime, spin, || !rx.is_empty())
    }

    /// Handles one queued input; false means shut down.
    fn handle_input(&mut self, input: Input<S::Output>) -> bool {
        let now = Instant::now();
        let (replica, waiters) = (&mut self.replica, &mut self.waiters);
        match input {
            Input::Propose { id, data, reply } => match replica.propose(id, data) {
                Ok(()) => {
                    waiters.writes.insert(id, (reply, now));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Input::Membership { id, change, reply } => {
                match replica.propose_membership(id, &change) {
                    Ok(()) => {
                        waiters.writes.insert(id, (reply, now));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Input::Read { id, reply } => match replica.read_index(id) {
                Ok(()) => {
                    waiters.reads.insert(id, (reply, now));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Input::Step(messages) => {
                for msg in messages {
                    replica.step(msg);
                }
            }
            Input::Feedback(Feedback::Unreachable(id)) => replica.report_unreachable(id),
            Input::Feedback(Feedback::Snapshot(id, ok)) => replica.report_snapshot(id, ok),
            Input::TransferLeader(to) => replica.transfer_leader(to),
            Input::Shutdown => return false,
        }
        true
    }
}

/// Fewest entries in a batch that is written on the writer thread while the
/// replica's thread serves its connections ([`persist_serving`]).
const WRITE_APART_FROM: usize = 2;

/// Runs `write`, the log write of a batch of `entries` entries, for the replica's
/// thread.
///
/// A batch of one entry is written on this thread: one client's write waits on it,
/// and handing it to another thread would add that thread's wake-up to the commit.
/// A batch of several means several clients are writing and the next ones'
/// requests are arriving meanwhile: it is written on the `writer` thread while this
/// one serves the peers and the clients' connections that run on `runtime`
/// (reading, checking and decoding the next requests, which queue their proposals
/// for the next pass) instead of leaving them unread for the fsync's duration. It
/// polls them for up to `spin`, as between passes, then parks until the write
/// returns. Those tasks reach the replica only through its queue, so the replica
/// stays as the write left it until the write returns.
///
/// On a 2-core virtual machine (three replicas, loopback, alternated pairs of 5 s)
/// 16 clients went from 4,046 / 4,148 / 4,374 writes/s to 4,408 / 4,418 / 4,601,
/// one client the same within the noise.
fn persist_serving(
    runtime: &tokio::runtime::Runtime,
    writer: &rayon::ThreadPool,
    spin: Duration,
    entries: usize,
    write: &mut (dyn FnMut() -> Result<(), LogStoreError> + Send),
) -> Result<(), LogStoreError> {
    if entries < WRITE_APART_FROM {
        return write();
    }
    let written = tokio::sync::Notify::new();
    let done = AtomicBool::new(false);
    let mut result = None;
    writer.in_place_scope(|scope| {
        scope.spawn(|_| {
            result = Some(write());
            done.store(true, Ordering::Release);
            written.notify_one();
        });
        if !poll_until(runtime, spin, || done.load(Ordering::Acquire)) {
            runtime.block_on(written.notified());
        }
    });
    // The scope returns once the write has: it ran (a panic in it goes on from here).
    result.unwrap_or_else(|| Err(LogStoreError::Database("the log write did not run".into())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::DEFAULT_SPIN;

    fn writer() -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
    }

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_batch_of_several_is_written_while_the_replicas_connections_are_served() {
        let runtime = current_thread();
        let writer = writer();
        // A connection's task: it runs only when the replica's thread drives the
        // runtime, and the write waits for it, so the write returns only if the
        // thread served its connections while it was being written.
        let (served_tx, served_rx) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            served_tx.send(()).unwrap();
        });
        let caller = std::thread::current().id();
        for spin in [
            Duration::ZERO,
            Duration::from_millis(1),
            Duration::from_secs(5),
        ] {
            let (tx, rx) = std::sync::mpsc::channel();
            let mut write = || {
                tx.send(std::thread::current().id()).unwrap();
                Ok(())
            };
            persist_serving(&runtime, &writer, spin, 3, &mut write).unwrap();
            assert_ne!(rx.recv().unwrap(), caller, "written on the writer thread");
        }
        let mut waited = false;
        let mut served_rx = Some(served_rx);
        let mut write = || {
            let served = served_rx.take().unwrap();
            waited = served.recv_timeout(Duration::from_secs(10)).is_ok();
            Ok(())
        };
        persist_serving(&runtime, &writer, Duration::ZERO, 2, &mut write).unwrap();
        assert!(
            waited,
            "the connection's task ran while the batch was written"
        );
    }

    #[test]
    fn a_batch_of_one_is_written_on_the_replicas_thread_and_errors_come_back() {
        let runtime = current_thread();
        let writer = writer();
        let caller = std::thread::current().id();
        let mut on = None;
        let mut write = || {
            on = Some(std::thread::current().id());
            Ok(())
        };
        persist_serving(&runtime, &writer, DEFAULT_SPIN, 1, &mut write).unwrap();
        assert_eq!(on, Some(caller));
        for entries in [0, 1, 5] {
            let mut failing = || Err(LogStoreError::Database("disk full".into()));
            let err = persist_serving(&runtime, &writer, DEFAULT_SPIN, entries, &mut failing)
                .unwrap_err();
            assert!(err.to_string().contains("disk full"), "{err}");
        }
    }
}
