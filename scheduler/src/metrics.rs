//! Prometheus metrics of the cluster state and the scheduling loop.
//!
//! Object counts are read from the applied state when Prometheus scrapes, so they
//! cost nothing between scrapes and are never stale; the loop's own work is counted
//! as it happens.

use aigrid_consensus::RaftNode;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry};

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

/// The Human Chain's metrics, read from the applied state at scrape time:
/// proposals by state, the audit log's size, and how long applied proposals took
/// from being made to applying (each observed once, at the first scrape that sees
/// it applied).
struct ChainCollector {
    raft: RaftNode<ClusterState>,
    proposals: IntGaugeVec,
    audit: IntGauge,
    approval: Histogram,
    /// Applied proposals already observed, pruned to those the state still keeps.
    seen: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl Collector for ChainCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.proposals.desc();
        descs.extend(self.audit.desc());
        descs.extend(self.approval.desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let (by_state, audit, applied) = self.raft.read_local(|s| {
            let mut by_state = std::collections::BTreeMap::new();
            for state in aigrid_api::ProposalState::ALL {
                by_state.insert(state.as_str(), 0i64);
            }
            let mut applied = Vec::new();
            for p in s.proposal_infos() {
                *by_state.entry(p.state.as_str()).or_default() += 1;
                if let (aigrid_api::ProposalState::Applied, Some(closed)) = (p.state, p.closed_at) {
                    let ms = closed.as_millis().saturating_sub(p.created_at.as_millis());
                    applied.push((p.id.clone(), ms));
                }
            }
            (by_state, s.audit_log().len(), applied)
        });
        for (state, n) in by_state {
            self.proposals.with_label_values(&[state]).set(n);
        }
        self.audit.set(i64::try_from(audit).unwrap_or(i64::MAX));
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let kept: std::collections::BTreeSet<String> =
            applied.iter().map(|(id, _)| id.clone()).collect();
        for (id, ms) in applied {
            if !seen.contains(&id) {
                self.approval.observe(ms as f64 / 1000.0);
            }
        }
        *seen = kept;
        let mut out = self.proposals.collect();
        out.extend(self.audit.collect());
        out.extend(self.approval.collect());
        out
    }
}

/// Registers the Human Chain's metrics, read from `raft`'s applied state.
pub fn register_chain(registry: &Registry, raft: RaftNode<ClusterState>) -> prometheus::Result<()> {
    let proposals = IntGaugeVec::new(
        Opts::new("aigrid_proposals", "Proposals kept, by state"),
        &["state"],
    )?;
    let audit = IntGauge::with_opts(Opts::new(
        "aigrid_audit_entries",
        "Entries in the Human Chain's audit log",
    ))?;
    let approval = Histogram::with_opts(
        HistogramOpts::new(
            "aigrid_proposal_approval_seconds",
            "Seconds from a proposal being made to its change applying",
        )
        .buckets(prometheus::exponential_buckets(1.0, 4.0, 12)?),
    )?;
    registry.register(Box::new(ChainCollector {
        raft,
        proposals,
        audit,
        approval,
        seen: std::sync::Mutex::default(),
    }))
}

/// Registers gauges of rollouts, read from `raft`'s applied state at each scrape:
/// `aigrid_deployments{state}` (jobs by the state of their latest rollout),
/// `aigrid_fleet_rollouts{state}` and `aigrid_fleet_rollout_nodes{state}` (the
/// nodes of running fleet rollouts by stage).
pub fn register_rollouts(
    registry: &Registry,
    raft: RaftNode<ClusterState>,
) -> prometheus::Result<()> {
    let gauge = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["state"]);
    registry.register(Box::new(RolloutCollector {
        raft,
        deployments: gauge(
            "aigrid_deployments",
            "Jobs by the state of their latest rollout",
        )?,
        rollouts: gauge("aigrid_fleet_rollouts", "Fleet rollouts kept, by state")?,
        nodes: gauge(
            "aigrid_fleet_rollout_nodes",
            "Nodes of running fleet rollouts, by stage",
        )?,
    }))
}

struct RolloutCollector {
    raft: RaftNode<ClusterState>,
    deployments: IntGaugeVec,
    rollouts: IntGaugeVec,
    nodes: IntGaugeVec,
}

impl Collector for RolloutCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.deployments.desc();
        descs.extend(self.rollouts.desc());
        descs.extend(self.nodes.desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let (deployments, (rollouts, nodes)) = self
            .raft
            .read_local(|s| (s.deployment_counts(), s.rollout_counts()));
        let count = |n: Option<&usize>| i64::try_from(n.copied().unwrap_or(0)).unwrap_or(i64::MAX);
        for state in aigrid_api::DeploymentState::ALL {
            self.deployments
                .with_label_values(&[state.as_str()])
                .set(count(deployments.get(state)));
        }
        for state in aigrid_api::RolloutState::ALL {
            self.rollouts
                .with_label_values(&[state.as_str()])
                .set(count(rollouts.get(state)));
        }
        for state in aigrid_api::NodeStageState::ALL {
            self.nodes
                .with_label_values(&[state.as_str()])
                .set(count(nodes.get(state)));
        }
        let mut out = self.deployments.collect();
        out.extend(self.rollouts.collect());
        out.extend(self.nodes.collect());
        out
    }
}

/// The dispersed store's health as the repair loop last reported it per model, read
/// from the applied state at scrape time: `aigrid_store_shards{state}` (healthy,
/// missing, corrupt, unreachable: summed over every model's last scrub),
/// `aigrid_store_stripes_lost` (stripes with fewer than k intact shards) and
/// `aigrid_store_models{health}` (healthy, degraded, lost, unchecked).
pub fn register_store(registry: &Registry, raft: RaftNode<ClusterState>) -> prometheus::Result<()> {
    registry.register(Box::new(StoreCollector {
        raft,
        shards: IntGaugeVec::new(
            Opts::new(
                "aigrid_store_shards",
                "Shards by what the last scrub of their model found",
            ),
            &["state"],
        )?,
        lost: IntGauge::with_opts(Opts::new(
            "aigrid_store_stripes_lost",
            "Stripes with fewer than k intact shards at their model's last scrub",
        ))?,
        models: IntGaugeVec::new(
            Opts::new(
                "aigrid_store_models",
                "Models by the health of their shards",
            ),
            &["health"],
        )?,
    }))
}

struct StoreCollector {
    raft: RaftNode<ClusterState>,
    shards: IntGaugeVec,
    lost: IntGauge,
    models: IntGaugeVec,
}

impl Collector for StoreCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.shards.desc();
        descs.extend(self.lost.desc());
        descs.extend(self.models.desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let reports: Vec<Option<aigrid_api::ShardHealth>> = self
            .raft
            .read_local(|s| s.models(None).into_iter().map(|m| m.health).collect());
        let mut shards = [0u64; 4];
        let mut models = [0i64; 4];
        let mut lost = 0u64;
        for report in &reports {
            let Some(h) = report else {
                models[3] += 1;
                continue;
            };
            for (total, n) in
                shards
                    .iter_mut()
                    .zip([h.healthy, h.missing, h.corrupt, h.unreachable])
            {
                *total += n;
            }
            lost += h.lost_stripes;
            models[if h.lost_stripes > 0 {
                2
            } else if h.is_healthy() {
                0
            } else {
                1
            }] += 1;
        }
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        for (state, n) in ["healthy", "missing", "corrupt", "unreachable"]
            .iter()
            .zip(shards)
        {
            self.shards.with_label_values(&[*state]).set(gauge(n));
        }
        for (health, n) in ["healthy", "degraded", "lost", "unchecked"]
            .iter()
            .zip(models)
        {
            self.models.with_label_values(&[*health]).set(n);
        }
        self.lost.set(gauge(lost));
        let mut out = self.shards.collect();
        out.extend(self.lost.collect());
        out.extend(self.models.collect());
        out
    }
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
    /// Of those, other jobs' allocations stopped to make room.
    pub preempted: IntCounter,
    /// Other jobs' allocations moved to make room.
    pub migrated: IntCounter,
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
            preempted: counter(
                "aigrid_scheduler_preemptions_total",
                "Allocations of lower-priority jobs stopped to make room",
            )?,
            migrated: counter(
                "aigrid_scheduler_migrations_total",
                "Allocations moved to another place to make room",
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

/// Registers the metered use, read from `raft`'s applied state at each scrape:
/// `aigrid_usage_gpu_seconds_total{circle,gpu_model}`,
/// `aigrid_usage_cpu_seconds_total{circle}` and
/// `aigrid_usage_memory_mib_seconds_total{circle}` (the admins' jobs under
/// `circle=""`), and `aigrid_usage_unmetered_seconds_total` (leaderless gaps not
/// counted); and the treasuries: `aigrid_treasury_balance_credits{account}`,
/// `aigrid_treasury_ledger_entries_total` and `aigrid_treasury_held_circles`
/// (circles whose new work is held for want of credits).
pub fn register_usage(registry: &Registry, raft: RaftNode<ClusterState>) -> prometheus::Result<()> {
    let counter = |name: &str, help: &str, labels: &[&str]| {
        prometheus::CounterVec::new(Opts::new(name, help), labels)
    };
    registry.register(Box::new(UsageCollector {
        raft,
        gpu: counter(
            "aigrid_usage_gpu_seconds_total",
            "GPU-seconds held by running allocations, by circle and GPU model",
            &["circle", "gpu_model"],
        )?,
        cpu: counter(
            "aigrid_usage_cpu_seconds_total",
            "CPU-seconds reserved by running allocations, by circle",
            &["circle"],
        )?,
        memory: counter(
            "aigrid_usage_memory_mib_seconds_total",
            "MiB-seconds of memory reserved by running allocations, by circle",
            &["circle"],
        )?,
        unmetered: prometheus::Counter::with_opts(Opts::new(
            "aigrid_usage_unmetered_seconds_total",
            "Seconds of gaps between meters (no leader) that were not counted",
        ))?,
        balance: prometheus::GaugeVec::new(
            Opts::new(
                "aigrid_treasury_balance_credits",
                "Balance of each treasury account (circle:, farmer:, node:, external), in credits",
            ),
            &["account"],
        )?,
        entries: prometheus::Counter::with_opts(Opts::new(
            "aigrid_treasury_ledger_entries_total",
            "Ledger entries recorded: deposits, settlements and transfers",
        ))?,
        held: prometheus::Gauge::with_opts(Opts::new(
            "aigrid_treasury_held_circles",
            "Circles whose treasury is spent, so their new work is not placed",
        ))?,
    }))
}

struct UsageCollector {
    raft: RaftNode<ClusterState>,
    gpu: prometheus::CounterVec,
    cpu: prometheus::CounterVec,
    memory: prometheus::CounterVec,
    unmetered: prometheus::Counter,
    balance: prometheus::GaugeVec,
    entries: prometheus::Counter,
    held: prometheus::Gauge,
}

impl Collector for UsageCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.gpu.desc();
        descs.extend(self.cpu.desc());
        descs.extend(self.memory.desc());
        descs.extend(self.unmetered.desc());
        descs.extend(self.balance.desc());
        descs.extend(self.entries.desc());
        descs.extend(self.held.desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let (totals, unmetered_ms, accounts, held) = self.raft.read_local(|s| {
            let held = s.placement_holds().len();
            (s.usage_totals(), s.unmetered_ms(), s.accounts(), held)
        });
        for family in [&self.gpu, &self.cpu, &self.memory] {
            family.reset();
        }
        for t in &totals {
            if !t.gpu_model.is_empty() {
                self.gpu
                    .with_label_values(&[&t.circle, &t.gpu_model])
                    .inc_by(t.amounts.gpu_seconds);
            }
            self.cpu
                .with_label_values(&[&t.circle])
                .inc_by(t.amounts.cpu_seconds);
            self.memory
                .with_label_values(&[&t.circle])
                .inc_by(t.amounts.memory_mib_seconds);
        }
        self.unmetered.reset();
        self.unmetered.inc_by(unmetered_ms as f64 / 1e3);
        let mut out = self.gpu.collect();
        out.extend(self.cpu.collect());
        out.extend(self.memory.collect());
        out.extend(self.unmetered.collect());
        self.balance.reset();
        // The outside world's account always exists: minus everything deposited.
        self.balance.with_label_values(&["external"]).set(0.0);
        for (account, credits) in &accounts.balances {
            self.balance
                .with_label_values(&[account])
                .set(credits.micro() as f64 / 1e6);
        }
        self.entries.reset();
        self.entries.inc_by(accounts.entries as f64);
        self.held.set(held as f64);
        out.extend(self.balance.collect());
        out.extend(self.entries.collect());
        out.extend(self.held.collect());
        out
    }
}
