//! Prometheus metrics of the cluster state and the scheduling loop.
//!
//! Object counts are read from the applied state when Prometheus scrapes, so they
//! cost nothing between scrapes and are never stale; the loop's own work is counted
//! as it happens.

use aigrid_consensus::RaftNode;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Opts, Registry};

use crate::state::ClusterState;

/// Exports [`ClusterState::counts`] as gauges at scrape time.
struct StateCollector {
    raft: RaftNode<ClusterState>,
    descs: Vec<Desc>,
    gauges: Vec<IntGauge>,
}

const STATE_GAUGES: [(&str, &str); 9] = [
    ("aigrid_jobs", "Live jobs"),
    ("aigrid_nodes", "Known nodes"),
    ("aigrid_nodes_ready", "Nodes accepting new work"),
    (
        "aigrid_allocations",
        "Allocations kept, including ones being stopped",
    ),
    (
        "aigrid_allocations_live",
        "Allocations wanted and not finished",
    ),
    ("aigrid_evaluations", "Evaluations kept"),
    (
        "aigrid_evaluations_pending",
        "Evaluations waiting for the planner",
    ),
    (
        "aigrid_evaluations_blocked",
        "Evaluations waiting for capacity",
    ),
    ("aigrid_models", "Registered models"),
];

impl Collector for StateCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let c = self.raft.read_local(ClusterState::counts);
        let values = [
            c.jobs,
            c.nodes,
            c.nodes_ready,
            c.allocations,
            c.allocations_live,
            c.evaluations,
            c.evaluations_pending,
            c.evaluations_blocked,
            c.models,
        ];
        for (gauge, value) in self.gauges.iter().zip(values) {
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        }
        self.gauges.iter().flat_map(|g| g.collect()).collect()
    }
}

/// Registers the state gauges, read from `raft`'s applied state at each scrape.
pub fn register_state(registry: &Registry, raft: RaftNode<ClusterState>) -> prometheus::Result<()> {
    let gauges = STATE_GAUGES
        .iter()
        .map(|(name, help)| IntGauge::with_opts(Opts::new(*name, *help)))
        .collect::<prometheus::Result<Vec<_>>>()?;
    let descs = gauges
        .iter()
        .flat_map(|g| g.desc().into_iter().cloned())
        .collect();
    registry.register(Box::new(StateCollector {
        raft,
        descs,
        gauges,
    }))
}

/// What the leader's scheduling loop did.
#[derive(Clone)]
pub struct WorkerMetrics {
    /// Scheduling passes that planned something.
    pub passes: IntCounter,
    /// Seconds per pass, from reading the state to the last commit.
    pub pass_seconds: Histogram,
    /// Instances placed (committed).
    pub placed: IntCounter,
    /// Allocations stopped by plans (scale-down, preemption, migration).
    pub stopped: IntCounter,
    /// Job plans the applier refused because the state had moved on.
    pub refused: IntCounter,
    /// Nodes marked down for silence.
    pub nodes_expired: IntCounter,
}

impl WorkerMetrics {
    /// Creates and registers the metrics.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::with_opts(Opts::new(name, help))?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let buckets = prometheus::exponential_buckets(0.001, 2.0, 16)?;
        let pass_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "aigrid_scheduler_pass_seconds",
                "Seconds per scheduling pass, from reading the state to the last commit",
            )
            .buckets(buckets),
        )?;
        registry.register(Box::new(pass_seconds.clone()))?;
        Ok(Self {
            passes: counter(
                "aigrid_scheduler_passes_total",
                "Scheduling passes that planned something",
            )?,
            pass_seconds,
            placed: counter(
                "aigrid_scheduler_placements_total",
                "Instances placed and committed",
            )?,
            stopped: counter(
                "aigrid_scheduler_stops_total",
                "Allocations stopped by plans (scale-down, preemption, migration)",
            )?,
            refused: counter(
                "aigrid_scheduler_plans_refused_total",
                "Job plans the applier refused because the state had moved on",
            )?,
            nodes_expired: counter(
                "aigrid_scheduler_nodes_expired_total",
                "Nodes marked down after missing heartbeats past the TTL",
            )?,
        })
    }
}
