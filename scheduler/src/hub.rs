//! What a server holds for the agents talking to it, beside the replicated state:
//! the [`NodeWatch`] that wakes their long polls when the state emits a change for
//! their node, the batch of plain heartbeats waiting to be committed as one
//! [`Command::NodesSeen`], their latest host and GPU readings, and the long-poll
//! slots. It answers no request itself; the agent routes in [`crate::http`] do.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use aigrid_api::{ErrorCode, Node, NodeId, NodeTelemetry, Timestamp};
use aigrid_consensus::RaftNode;
use parking_lot::{Mutex, RwLock};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::Semaphore;

use crate::state::{ClusterState, Command, EventSink, StateEvent};

/// Why the hub refuses an agent's request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    /// This server cannot vouch for its state: no leader, or its heartbeats do not commit.
    #[error("this server cannot reach a quorum; try another")]
    NoQuorum,
    /// The node holds all its long-poll slots.
    #[error("node `{0}` already holds {POLLS_PER_NODE} long polls")]
    TooManyPolls(NodeId),
    /// The server holds as many long polls as it allows.
    #[error("too many long polls held; retry later")]
    LongPollsFull,
}

impl HubError {
    /// The control API's code for it.
    pub fn code(&self) -> ErrorCode {
        match self {
            HubError::NoQuorum => ErrorCode::NoQuorum,
            HubError::TooManyPolls(_) | HubError::LongPollsFull => ErrorCode::RateLimited,
        }
    }
}

/// Wakes agents' long polls when their node's assignments change. Not part of the
/// replicated state: each server hands one to its [`ClusterState`] as an
/// [`EventSink`] and wakes the polls it holds as the state emits [`StateEvent`]s.
#[derive(Default)]
pub struct NodeWatch {
    senders: parking_lot::Mutex<std::collections::HashMap<NodeId, tokio::sync::watch::Sender<u64>>>,
}

impl std::fmt::Debug for NodeWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeWatch({} nodes watched)", self.senders.lock().len())
    }
}

impl NodeWatch {
    /// A receiver that changes when `node`'s assignments change. Subscribe before
    /// reading the state so no change between the read and the wait is missed.
    pub fn subscribe(&self, node: &NodeId) -> tokio::sync::watch::Receiver<u64> {
        self.senders
            .lock()
            .entry(node.clone())
            .or_insert_with(|| tokio::sync::watch::channel(0).0)
            .subscribe()
    }

    fn touch(&self, node: &NodeId, index: u64) {
        let mut senders = self.senders.lock();
        if let Some(tx) = senders.get(node) {
            if tx.receiver_count() == 0 {
                senders.remove(node);
            } else {
                tx.send_replace(index);
            }
        }
    }

    fn touch_all(&self, index: u64) {
        let mut senders = self.senders.lock();
        senders.retain(|_, tx| tx.receiver_count() > 0);
        for tx in senders.values() {
            tx.send_replace(index);
        }
    }
}

impl EventSink for NodeWatch {
    fn publish(&self, event: StateEvent) {
        match event {
            StateEvent::AssignmentsChanged { node, index } => self.touch(&node, index),
            StateEvent::Restored => self.touch_all(u64::MAX),
        }
    }
}

/// What a server holds for the agents talking to it, beside the replicated state.
pub struct AgentHub {
    watch: Arc<NodeWatch>,
    seen: Mutex<SeenBatch>,
    telemetry: RwLock<HashMap<NodeId, NodeTelemetry>>,
    long_polls: Arc<Semaphore>,
    /// Long polls held per node; a node may hold [`POLLS_PER_NODE`].
    polls_by_node: Mutex<HashMap<NodeId, usize>>,
    /// False after a batch of heartbeats failed to commit, until one commits: this
    /// server may be cut off from the leader, so it sends agents elsewhere.
    flushing: std::sync::atomic::AtomicBool,
    metrics: AgentMetrics,
}

/// Long polls one node may hold at once (an agent holds one; the second covers a
/// poll that is being replaced).
pub const POLLS_PER_NODE: usize = 2;

/// Nodes heard from since the last flush, and when the first of them was.
#[derive(Default)]
struct SeenBatch {
    nodes: HashSet<NodeId>,
    earliest: Option<Timestamp>,
}

#[derive(Clone)]
struct AgentMetrics {
    heartbeats: IntCounterVec,
    heartbeat_seconds: Histogram,
    long_polls: IntGauge,
    seen_flushes: IntCounter,
}

impl AgentMetrics {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let heartbeats = IntCounterVec::new(
            Opts::new(
                "aigrid_agent_heartbeats_total",
                "Agent heartbeats by outcome: seen (batched), committed, rejected",
            ),
            &["outcome"],
        )?;
        let heartbeat_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "aigrid_agent_heartbeat_seconds",
                "Time to answer an agent heartbeat",
            )
            .buckets(prometheus::exponential_buckets(0.000_05, 2.0, 18)?),
        )?;
        let long_polls = IntGauge::new(
            "aigrid_agent_long_polls",
            "Agents' assignment long polls held open",
        )?;
        let seen_flushes = IntCounter::new(
            "aigrid_agent_seen_flushes_total",
            "Batches of plain heartbeats committed",
        )?;
        registry.register(Box::new(heartbeats.clone()))?;
        registry.register(Box::new(heartbeat_seconds.clone()))?;
        registry.register(Box::new(long_polls.clone()))?;
        registry.register(Box::new(seen_flushes.clone()))?;
        Ok(AgentMetrics {
            heartbeats,
            heartbeat_seconds,
            long_polls,
            seen_flushes,
        })
    }
}

impl AgentHub {
    /// The hub of a server; [`run_flusher`] commits its batches.
    pub fn new(
        _raft: &RaftNode<ClusterState>,
        registry: &Registry,
        max_long_polls: usize,
        watch: Arc<NodeWatch>,
    ) -> prometheus::Result<Self> {
        let hub = AgentHub {
            watch,
            seen: Mutex::default(),
            telemetry: RwLock::default(),
            long_polls: Arc::new(Semaphore::new(max_long_polls.max(1))),
            polls_by_node: Mutex::default(),
            flushing: std::sync::atomic::AtomicBool::new(true),
            metrics: AgentMetrics::register(registry)?,
        };
        Ok(hub)
    }

    pub(crate) fn saw(&self, node: NodeId, at: Timestamp) {
        let mut seen = self.seen.lock();
        seen.nodes.insert(node);
        seen.earliest = Some(seen.earliest.map_or(at, |e| e.min(at)));
    }

    /// Commits the nodes heard from since the last call, as one entry. On failure
    /// the batch is kept for the next call.
    async fn flush(&self, raft: &RaftNode<ClusterState>) {
        let batch = std::mem::take(&mut *self.seen.lock());
        let Some(at) = batch.earliest else {
            return;
        };
        let nodes: Vec<NodeId> = batch.nodes.iter().cloned().collect();
        let command = Command::NodesSeen { nodes, at };
        match raft.propose(&command).await {
            Ok(_) => {
                self.metrics.seen_flushes.inc();
                self.flushing
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => {
                self.flushing
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(error = %e, "committing a batch of heartbeats failed; retrying");
                let mut seen = self.seen.lock();
                seen.nodes.extend(batch.nodes);
                seen.earliest = Some(seen.earliest.map_or(at, |e| e.min(at)));
            }
        }
    }

    /// Whether this server can vouch for what it answers agents from its own
    /// state: it knows a leader and its last batch of heartbeats committed. A server
    /// cut off from the majority answers 503 instead, so agents move to one that
    /// is not, rather than be kept running work the majority has moved.
    pub(crate) fn connected(&self, raft: &RaftNode<ClusterState>) -> Result<(), HubError> {
        let leader = raft.leader().is_some();
        if leader && self.flushing.load(std::sync::atomic::Ordering::Relaxed) {
            Ok(())
        } else {
            Err(HubError::NoQuorum)
        }
    }

    /// Takes one of `node`'s long-poll slots and one of the server's, or refuses
    /// when either is full. The slots are given back when the guard drops.
    pub(crate) fn hold_poll(self: &Arc<Self>, node: &NodeId) -> Result<impl Drop, HubError> {
        {
            let mut held = self.polls_by_node.lock();
            let n = held.entry(node.clone()).or_insert(0);
            if *n >= POLLS_PER_NODE {
                return Err(HubError::TooManyPolls(node.clone()));
            }
            *n += 1;
        }
        let hub = self.clone();
        let node = node.clone();
        let per_node = scopeguard(move || {
            let mut held = hub.polls_by_node.lock();
            if let Some(n) = held.get_mut(&node) {
                *n -= 1;
                if *n == 0 {
                    held.remove(&node);
                }
            }
        });
        let permit = self
            .long_polls
            .clone()
            .try_acquire_owned()
            .map_err(|_| HubError::LongPollsFull)?;
        self.metrics.long_polls.inc();
        let gauge = self.metrics.long_polls.clone();
        Ok(scopeguard(move || {
            gauge.dec();
            drop(permit);
            drop(per_node);
        }))
    }

    /// A receiver that changes when `node`'s assignments change (see
    /// [`NodeWatch::subscribe`]).
    pub(crate) fn subscribe(&self, node: &NodeId) -> tokio::sync::watch::Receiver<u64> {
        self.watch.subscribe(node)
    }

    /// Keeps the latest readings of `node`'s agent.
    pub(crate) fn report(&self, node: &NodeId, telemetry: NodeTelemetry) {
        self.telemetry.write().insert(node.clone(), telemetry);
    }

    /// Counts an answered heartbeat: `outcome` is `seen` (batched), `committed` or
    /// `rejected`.
    pub(crate) fn observe_heartbeat(&self, seconds: f64, outcome: &str) {
        self.metrics.heartbeat_seconds.observe(seconds);
        self.metrics.heartbeats.with_label_values(&[outcome]).inc();
    }

    /// The latest readings of a node's agent, if it reported to this server.
    pub fn telemetry(&self, node: &NodeId) -> Option<NodeTelemetry> {
        self.telemetry.read().get(node).cloned()
    }

    /// Fills in readings this server holds.
    pub(crate) fn with_telemetry(&self, mut node: Node) -> Node {
        node.telemetry = self.telemetry(&node.id);
        node
    }
}

/// Commits batches of plain heartbeats every `every` until `shutdown` turns true.
pub async fn run_flusher(
    raft: RaftNode<ClusterState>,
    hub: Arc<AgentHub>,
    every: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            _ = tokio::time::sleep(every) => {}
        }
        hub.flush(&raft).await;
    }
}

/// Runs `f` when dropped, so a gauge comes down however a handler ends.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
