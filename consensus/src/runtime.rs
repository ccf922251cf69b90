//! Runs a [`Replica`] on its own thread and gives async code a handle to it.
//!
//! The replica's thread owns raft-rs and the log; it blocks on fsync, so it never runs
//! on the server's async runtime. It drives a single-threaded runtime of its own,
//! which carries the peer traffic: the senders to each peer and the peer listener's
//! established connections (their handshakes stay on the server's runtime) run
//! there, whenever the replica waits for input and whenever it has messages that
//! must leave before it writes or applies. A message from a peer thus
//! reaches the replica, and the replica's answer reaches the peer's socket, without a
//! hand-off to another thread. A server may run more there ([`RaftNode::runtime_handle`]):
//! a client's write served on this runtime is proposed, committed and answered
//! without a hand-off either; whatever runs there must not block, since it holds up
//! the replica.
//!
//! When a pass had input, the thread keeps running the peer traffic and looking
//! at its queue for a moment ([`NodeConfig::spin`]) before it parks: while writes
//! come, the next message is usually there within a few hundred microseconds, and
//! a parked thread costs whoever wakes it an interrupt to another CPU (on a
//! virtual machine whose idle CPUs halt, a trip through the hypervisor at both
//! ends).
//!
//! Requests reach it through one bounded channel: when the channel is full, callers
//! get [`RaftError::Busy`] (an HTTP 429) rather than an unbounded queue. Every pass
//! drains everything queued before handling one `Ready`, so many proposals share one
//! fsync.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use raft::prelude::Message;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::Sender;
use tokio::sync::oneshot;

use crate::log_file::FileLog;
use crate::log_store::LogStore;
use crate::metrics::RaftMetrics;
use crate::replica::{
    Applied, MembershipChange, ProposeError, Replica, ReplicaConfig, ReplicaError, ReplicaStatus,
    RequestId,
};
use crate::state_machine::StateMachine;
use crate::transport::{Feedback, Inbox, Transport};

/// How one server runs its replica.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Replica tunables (id, election and snapshot thresholds).
    pub replica: ReplicaConfig,
    /// Length of one Raft tick.
    pub tick: Duration,
    /// Where the log lives.
    pub data_dir: PathBuf,
    /// This server's certificate (its id is `replica.id`) and the cluster CA: what
    /// it dials peers with and what its peer listener requires of them.
    pub identity: Arc<aigrid_tls::ServerIdentity>,
    /// Voters of a new cluster; empty for a server that joins an existing one.
    pub initial_members: BTreeMap<u64, String>,
    /// How long a client request may wait for a commit before it is answered 503.
    pub request_timeout: Duration,
    /// Capacity of the request queue in front of the replica.
    pub queue_capacity: usize,
    /// How long the replica's thread keeps polling its queue and its peers' sockets,
    /// after a pass that had input, before it parks until the next input or tick
    /// ([`DEFAULT_SPIN`]; zero parks at once; at most [`QUIET_SPIN`] when the last
    /// polling ran out with nothing arriving). Waking a parked thread costs the
    /// thread that wakes it an interrupt to another CPU, and on a virtual machine
    /// whose idle CPUs halt a trip through the hypervisor, at both ends of every
    /// hand-off of a write; while writes come, the next input (an acknowledgement,
    /// the next proposal) usually arrives within a few hundred microseconds.
    pub spin: Duration,
}

/// [`NodeConfig::spin`]'s default: polling stops at most 1 ms after the last input
/// while inputs keep coming, [`QUIET_SPIN`] after one that came alone, so an idle
/// replica costs a tick's pass and a short look after each heartbeat. Under load a
/// pause between inputs often passes 200 µs while the thread's CPU serves the
/// other replicas' threads and the clients; polling through it (yielding meanwhile)
/// spares the wake-up: on a 2-core virtual machine, three-replica cluster, 1 ms
/// against 200 µs gave 4-7% more writes at 16 and 64 clients and the same at one.
pub const DEFAULT_SPIN: Duration = Duration::from_millis(1);
/// The longest a replica polls after an input when its last polling ran out with
/// nothing arriving: a heartbeat alone, or the first write after a pause. It
/// spans more of the pauses between a replica's inputs while one client writes
/// (its answer leaves, then the client's next write arrives): on a 2-core AMD
/// EPYC, one client writing through a follower did 1,079 / 1,075 / 1,080 / 1,155
/// writes/s against 980 / 986 / 1,001 / 1,136 with 200 µs (alternated pairs), the
/// leader and 16 and 64 clients the same within the noise.
pub const QUIET_SPIN: Duration = Duration::from_micros(500);
/// The longest [`NodeConfig::spin`] a server takes: past it a replica would hold a
/// CPU through pauses that are no longer hand-offs.
pub const MAX_SPIN: Duration = Duration::from_millis(10);

/// Why a client request was not served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RaftError {
    /// No commit or read was possible before the deadline: no quorum, or no leader.
    #[error("no quorum: {0}")]
    NoQuorum(String),
    /// The request queue is full.
    #[error("the server is busy: request queue full")]
    Busy,
    /// This server was removed from the cluster.
    #[error("this server was removed from the cluster")]
    Removed,
    /// The replica stopped (fatal log error or shutdown).
    #[error("the raft replica is not running")]
    Stopped,
    /// Raft refused the request itself (e.g. an invalid membership change).
    #[error("rejected: {0}")]
    Rejected(String),
}

enum Input<O> {
    Propose {
        id: RequestId,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<Applied<O>, ProposeError>>,
    },
    Membership {
        id: RequestId,
        change: MembershipChange,
        reply: oneshot::Sender<Result<Applied<O>, ProposeError>>,
    },
    Read {
        id: RequestId,
        reply: oneshot::Sender<Result<(), ProposeError>>,
    },
    Step(Vec<Message>),
    Feedback(Feedback),
    TransferLeader(u64),
    /// Wakes the replica to see that it was asked to stop.
    Shutdown,
}

struct Shared<S: StateMachine> {
    tx: Sender<Input<S::Output>>,
    /// The replica thread's own runtime, where the peer traffic runs.
    peers_runtime: tokio::runtime::Handle,
    stop: Arc<AtomicBool>,
    state: Arc<RwLock<S>>,
    status: Arc<RwLock<ReplicaStatus>>,
    metrics: Arc<RaftMetrics>,
    transport: Arc<Transport>,
    identity: Arc<aigrid_tls::ServerIdentity>,
    seq: AtomicU64,
    id_base: u64,
    request_timeout: Duration,
    thread: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A running replica: clone it freely; all clones talk to the same thread.
pub struct RaftNode<S: StateMachine> {
    shared: Arc<Shared<S>>,
}

impl<S: StateMachine> Clone for RaftNode<S> {
    fn clone(&self) -> Self {
        RaftNode {
            shared: self.shared.clone(),
        }
    }
}

/// How long a request waits for an answer before it goes again.
const ATTEMPT: Duration = Duration::from_millis(1500);
/// What a request's first wait grows by per MiB it carries: every server decodes
/// and checks a large entry before its answer comes (a debug build on a busy
/// two-core machine takes about 1.5 s over a 3.5 MiB model manifest).
const ATTEMPT_PER_MIB: Duration = Duration::from_secs(1);

/// How long an attempt carrying `bytes` waits before it first goes again.
fn attempt_wait(bytes: usize) -> Duration {
    ATTEMPT + ATTEMPT_PER_MIB.mul_f64(bytes as f64 / f64::from(1u32 << 20))
}

/// How long a leader holds a commit notice back for an append to carry it. A
/// client writing to the leader sends its next write well within it (at one client
/// the next append leaves 0.3-0.5 ms after the commit), which then tells the
/// followers; a notice alone would cost each follower a wake-up, a message each
/// way and a pass of its replica. Followers' state lags the leader's by at most
/// this when writes stop (a follower waiting on a write it forwarded is told at
/// once).
const COMMIT_NOTICE_HOLD: Duration = Duration::from_millis(2);
const WAITER_TTL: Duration = Duration::from_secs(60);

impl<S: StateMachine> RaftNode<S> {
    /// Opens the log under `config.data_dir` and starts the replica's thread. Must be
    /// called inside a tokio runtime (the transport spawns its senders there).
    pub fn start(
        config: NodeConfig,
        state: S,
        metrics: Arc<RaftMetrics>,
    ) -> Result<Self, ReplicaError> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| crate::log_store::LogStoreError::Database(e.to_string()))?;
        let disk = FileLog::open_in(&config.data_dir)?;
        let store = LogStore::open(Box::new(disk))?;
        let mut replica = Replica::open(
            config.replica.clone(),
            store,
            state,
            &config.initial_members,
            Some(metrics.clone()),
        )?;
        let (tx, rx) = tokio::sync::mpsc::channel(config.queue_capacity.max(1));
        let feedback_tx = tx.clone();
        let feedback: Arc<dyn Fn(Feedback) + Send + Sync> = Arc::new(move |f| {
            let _ = feedback_tx.try_send(Input::Feedback(f));
        });
        if config.identity.id() != config.replica.id {
            return Err(ReplicaError::Config(format!(
                "the certificate is server {}'s, not server {}'s",
                config.identity.id(),
                config.replica.id
            )));
        }
        let peers_runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name(format!("raft-{}-peers", config.replica.id))
            .build()
            .map_err(|e| crate::log_store::LogStoreError::Database(e.to_string()))?;
        let writer_id = config.replica.id;
        let writer = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(move |_| format!("raft-{writer_id}-write"))
            .build()
            .map_err(|e| crate::log_store::LogStoreError::Database(e.to_string()))?;
        let transport = Arc::new(Transport::new(
            config.identity.clone(),
            peers_runtime.handle().clone(),
            feedback,
            metrics.clone(),
        ));
        transport.set_members(replica.members());
        if replica.members().len() == 1 && replica.members().contains_key(&replica.id()) {
            // A single voter need not wait an election timeout.
            replica.campaign()?;
        }
        let status = Arc::new(RwLock::new(replica.status()));
        let state = replica.state();
        let id_base = rand::random::<u64>();
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            tx,
            peers_runtime: peers_runtime.handle().clone(),
            stop: stop.clone(),
            state,
            status: status.clone(),
            metrics: metrics.clone(),
            transport: transport.clone(),
            identity: config.identity.clone(),
            seq: AtomicU64::new(0),
            id_base,
            request_timeout: config.request_timeout,
            thread: parking_lot::Mutex::new(None),
        });
        let tick = config.tick;
        let spin = config.spin.min(MAX_SPIN);
        let handle = std::thread::Builder::new()
            .name(format!("raft-{}", config.replica.id))
            .spawn(move || {
                Driver::new(replica, rx, peers_runtime, writer, transport, stop)
                    .run(status, metrics, tick, spin)
            })
            .map_err(|e| crate::log_store::LogStoreError::Database(e.to_string()))?;
        *shared.thread.lock() = Some(handle);
        Ok(RaftNode { shared })
    }

    fn next_id(&self) -> RequestId {
        let seq = self.shared.seq.fetch_add(1, Ordering::Relaxed);
        RequestId((u128::from(self.shared.id_base) << 64) | u128::from(seq))
    }

    fn submit(&self, input: Input<S::Output>) -> Result<(), RaftError> {
        match self.shared.tx.try_send(input) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(RaftError::Busy),
            Err(TrySendError::Closed(_)) => Err(RaftError::Stopped),
        }
    }

    fn no_quorum(&self) -> RaftError {
        let status = self.status();
        let reason = match status.leader {
            None => format!(
                "no leader elected in term {} ({} voters configured)",
                status.term,
                status.members.len()
            ),
            Some(l) => format!(
                "leader {l} did not commit within {:?}",
                self.shared.request_timeout
            ),
        };
        RaftError::NoQuorum(reason)
    }

    /// Submits the input `make` builds until it is answered or the request deadline
    /// passes. Every attempt reuses one request id, so a retry that races with a late
    /// commit is recognised as the same request.
    ///
    /// A leader change answers at once and the input goes again. An attempt that
    /// hears nothing was lost in transit or is still on its way: `bytes` (what it
    /// carries) and each silent attempt lengthen the wait before the next, since a
    /// retry re-sends it all and a duplicate is appended, replicated and applied by
    /// every server like the first.
    async fn until_answered<T>(
        &self,
        bytes: usize,
        make: impl Fn(RequestId, oneshot::Sender<Result<T, ProposeError>>) -> Input<S::Output>,
    ) -> Result<T, RaftError> {
        let id = self.next_id();
        let deadline = Instant::now() + self.shared.request_timeout;
        let mut attempt = attempt_wait(bytes);
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(self.no_quorum());
            }
            let (tx, rx) = oneshot::channel();
            self.submit(make(id, tx))?;
            match tokio::time::timeout(attempt.min(deadline - now), rx).await {
                Ok(Ok(Ok(answer))) => return Ok(answer),
                Ok(Ok(Err(ProposeError::Removed))) => return Err(RaftError::Removed),
                Ok(Ok(Err(ProposeError::NoLeader))) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Ok(Err(_)) if self.is_stopped() => return Err(RaftError::Stopped),
                // Dropped unanswered: try again under the same id; the first
                // application answers.
                Ok(Err(_)) => {}
                // Not committed yet, or lost: the same, after a longer wait.
                Err(_) => attempt *= 2,
            }
        }
    }

    async fn replicate(
        &self,
        bytes: usize,
        make: impl Fn(
            RequestId,
            oneshot::Sender<Result<Applied<S::Output>, ProposeError>>,
        ) -> Input<S::Output>,
    ) -> Result<Applied<S::Output>, RaftError> {
        self.shared.metrics.proposals.inc();
        let result = self.until_answered(bytes, make).await;
        if result.is_err() {
            self.shared.metrics.proposals_failed.inc();
        }
        result
    }

    /// Proposes `command` and waits until this server applied it: a success means the
    /// command is committed on a quorum and durable.
    pub async fn propose(&self, command: &S::Command) -> Result<S::Output, RaftError> {
        let data = serde_json::to_vec(command).map_err(|e| RaftError::Rejected(e.to_string()))?;
        match self
            .replicate(data.len(), |id, reply| Input::Propose {
                id,
                data: data.clone(),
                reply,
            })
            .await?
        {
            Applied::Command(output) => Ok(output),
            Applied::Membership(_) => Err(RaftError::Rejected("unexpected entry type".into())),
            Applied::Undecodable(e) => Err(RaftError::Rejected(e)),
        }
    }

    /// Adds or removes a voter and waits until the change is applied here.
    pub async fn change_membership(&self, change: MembershipChange) -> Result<(), RaftError> {
        match self
            .replicate(0, |id, reply| Input::Membership {
                id,
                change: change.clone(),
                reply,
            })
            .await?
        {
            Applied::Membership(Ok(())) => Ok(()),
            Applied::Membership(Err(e)) | Applied::Undecodable(e) => Err(RaftError::Rejected(e)),
            Applied::Command(_) => Err(RaftError::Rejected("unexpected entry type".into())),
        }
    }

    /// Asks the leader to hand leadership to `to`.
    pub fn transfer_leader(&self, to: u64) -> Result<(), RaftError> {
        self.submit(Input::TransferLeader(to))
    }

    /// Runs `f` on state that reflects every write committed before the call began
    /// (ReadIndex: confirmed with a quorum, then served locally once applied).
    pub async fn read<R>(&self, f: impl FnOnce(&S) -> R) -> Result<R, RaftError> {
        self.until_answered(0, |id, reply| Input::Read { id, reply })
            .await?;
        self.shared.metrics.reads.inc();
        Ok(f(&self.shared.state.read()))
    }

    /// Runs `f` on this server's applied state without contacting the leader; it may
    /// lag behind the cluster.
    pub fn read_local<R>(&self, f: impl FnOnce(&S) -> R) -> R {
        f(&self.shared.state.read())
    }

    /// The replica thread's own runtime, where the peer traffic runs. Its tasks run
    /// whenever the replica waits for input, not while it writes its log or
    /// applies.
    pub fn runtime_handle(&self) -> tokio::runtime::Handle {
        self.shared.peers_runtime.clone()
    }

    /// How long a request may wait for a commit.
    pub fn request_timeout(&self) -> Duration {
        self.shared.request_timeout
    }

    /// This server's latest view of the cluster.
    pub fn status(&self) -> ReplicaStatus {
        self.shared.status.read().clone()
    }

    /// The leader this server knows of, without copying the whole status: cheap
    /// enough for every request on a hot path.
    pub fn leader(&self) -> Option<u64> {
        self.shared.status.read().leader
    }

    /// True once the replica thread has exited.
    pub fn is_stopped(&self) -> bool {
        self.shared
            .thread
            .lock()
            .as_ref()
            .is_none_or(|t| t.is_finished())
    }

    /// Stops the replica thread and waits for it.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the replica if it waits for input; a full queue wakes it anyway.
        let _ = self.shared.tx.try_send(Input::Shutdown);
        if let Some(handle) = self.shared.thread.lock().take() {
            let _ = handle.join();
        }
    }

    /// The receiving end for the transport.
    pub fn inbox(&self) -> Arc<dyn Inbox> {
        Arc::new(NodeInbox {
            tx: self.shared.tx.clone(),
        })
    }

    /// Serves the peer listener (mutual TLS under the cluster CA) on `listener`
    /// until `shutdown` completes. Connections are accepted and their handshakes
    /// made on the caller's runtime; once established, they are served on the
    /// replica's own, so what peers send is read by the replica's thread. The
    /// handle answers once the listener stopped, or the replica did.
    pub fn serve_peers(
        &self,
        listener: tokio::net::TcpListener,
        limits: crate::transport::PeerLimits,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<std::io::Result<()>> {
        let id = self.shared.identity.id();
        let inbox = self.inbox();
        let metrics = self.shared.metrics.clone();
        let accepting =
            crate::transport::listen(listener, &self.shared.identity, metrics.clone(), &limits);
        self.shared.peers_runtime.spawn(async move {
            crate::transport::serve(accepting?, id, inbox, metrics, limits, shutdown).await
        })
    }

    /// The address this server dials server `id` at, if it knows one.
    pub fn peer_addr(&self, id: u64) -> Option<String> {
        self.shared.transport.addr_of(id)
    }

    /// Gives a server that joins an existing cluster its members' addresses, so it
    /// can answer the leader before the first snapshot tells it the configuration.
    /// Ignored once a configuration is applied.
    pub fn seed_peers(&self, members: &BTreeMap<u64, String>) {
        self.shared.transport.seed(members);
    }

    /// Checks that server `id` answers at `addr` on its peer listener with a
    /// certificate from the cluster CA naming it.
    pub async fn probe_peer(&self, id: u64, addr: &str, timeout: Duration) -> Result<(), String> {
        self.shared.transport.probe(id, addr, timeout).await
    }

    /// The cluster CA's fingerprint, as join tokens carry it.
    pub fn ca_fingerprint(&self) -> aigrid_tls::CaFingerprint {
        self.shared.identity.fingerprint()
    }
}

struct NodeInbox<O> {
    tx: Sender<Input<O>>,
}

impl<O: Send + 'static> Inbox for NodeInbox<O> {
    fn deliver(&self, messages: Vec<Message>) -> bool {
        // A full queue drops the batch: Raft retransmits, and the peer is not blocked.
        !matches!(
            self.tx.try_send(Input::Step(messages)),
            Err(TrySendError::Closed(_))
        )
    }
}

#[path = "runtime_driver.rs"]
mod driver;
use driver::Driver;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_waits_longer_before_it_goes_again_the_more_it_carries() {
        assert_eq!(attempt_wait(0), ATTEMPT);
        assert_eq!(attempt_wait(1 << 20), ATTEMPT + ATTEMPT_PER_MIB);
        assert!(attempt_wait(16 << 20) >= ATTEMPT + ATTEMPT_PER_MIB * 16);
    }
}
