//! Prometheus metrics of the Raft driver.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Opts, Registry};

/// Every metric the driver exports, registered once per process.
pub struct RaftMetrics {
    /// Current term.
    pub term: IntGauge,
    /// Known leader id (0 when none).
    pub leader: IntGauge,
    /// 1 on the leader, 0 elsewhere.
    pub is_leader: IntGauge,
    /// Highest committed index.
    pub commit_index: IntGauge,
    /// Highest applied index.
    pub applied_index: IntGauge,
    /// Proposals accepted from clients (each retry counts once).
    pub proposals: IntCounter,
    /// Proposals that ended without being applied (timeout, no leader).
    pub proposals_failed: IntCounter,
    /// Linearizable reads served.
    pub reads: IntCounter,
    /// Seconds spent applying one batch of committed entries.
    pub apply_seconds: Histogram,
    /// Seconds per durable log write (one fsync each).
    pub log_write_seconds: Histogram,
    /// Times a new leader became known.
    pub leader_changes: IntCounter,
    /// Snapshots taken locally (each compacts the log).
    pub snapshots_created: IntCounter,
    /// Snapshots received from a leader and installed.
    pub snapshots_installed: IntCounter,
    /// Entries a follower committed from its leader's persisted mark, before the
    /// leader's commit index told it.
    pub mark_commits: IntCounter,
    /// Raft messages dropped because a peer's queue was full.
    pub messages_dropped: IntCounter,
    /// Raft messages received and dropped because their `from` was not the server the
    /// connection's certificate names (or their `to` not this server).
    pub peer_messages_refused: IntCounter,
    /// Peer connections closed before HTTP: no certificate from the CA, no server id
    /// in it, a handshake past its deadline, or too many connections.
    pub peer_connections_refused: IntCounter,
}

fn gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::with_opts(Opts::new(name, help))?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

fn counter(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::with_opts(Opts::new(name, help))?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram(registry: &Registry, name: &str, help: &str) -> prometheus::Result<Histogram> {
    let buckets = prometheus::exponential_buckets(0.000_05, 2.0, 18)?;
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

impl RaftMetrics {
    /// Creates and registers the metrics.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        Ok(RaftMetrics {
            term: gauge(registry, "aigrid_raft_term", "Current Raft term")?,
            leader: gauge(
                registry,
                "aigrid_raft_leader_id",
                "Known leader id, 0 if none",
            )?,
            is_leader: gauge(registry, "aigrid_raft_is_leader", "1 if this server leads")?,
            commit_index: gauge(registry, "aigrid_raft_commit_index", "Committed index")?,
            applied_index: gauge(registry, "aigrid_raft_applied_index", "Applied index")?,
            proposals: counter(registry, "aigrid_raft_proposals_total", "Client proposals")?,
            proposals_failed: counter(
                registry,
                "aigrid_raft_proposals_failed_total",
                "Proposals that were not applied before their deadline",
            )?,
            reads: counter(registry, "aigrid_raft_reads_total", "Linearizable reads")?,
            apply_seconds: histogram(
                registry,
                "aigrid_raft_apply_seconds",
                "Time to apply a batch of committed entries",
            )?,
            log_write_seconds: histogram(
                registry,
                "aigrid_raft_log_write_seconds",
                "Time of one durable log write, fsync included",
            )?,
            leader_changes: counter(
                registry,
                "aigrid_raft_leader_changes_total",
                "Times a new leader became known",
            )?,
            snapshots_created: counter(
                registry,
                "aigrid_raft_snapshots_created_total",
                "Snapshots taken locally",
            )?,
            snapshots_installed: counter(
                registry,
                "aigrid_raft_snapshots_installed_total",
                "Snapshots received from a leader and installed",
            )?,
            mark_commits: counter(
                registry,
                "aigrid_raft_mark_commits_total",
                "Entries a follower committed from its leader's persisted mark, before the leader's commit index told it",
            )?,
            messages_dropped: counter(
                registry,
                "aigrid_raft_messages_dropped_total",
                "Raft messages dropped because a peer queue was full or the send failed",
            )?,
            peer_messages_refused: counter(
                registry,
                "aigrid_raft_peer_messages_refused_total",
                "Raft messages dropped because their sender is not the server the connection's certificate names",
            )?,
            peer_connections_refused: counter(
                registry,
                "aigrid_raft_peer_connections_refused_total",
                "Peer connections refused: no certificate from the cluster CA, no server id, handshake timeout, or too many",
            )?,
        })
    }
}
