//! The agent's Prometheus metrics, served only when the operator picks an address
//! with `--metrics-listen`. A fleet simulation shares one set among its agents, so
//! the histogram is the fleet's.

use aigrid_api::GpuTelemetry;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Counters and gauges of one agent, or of a whole simulated fleet.
#[derive(Clone)]
pub struct AgentMetrics {
    /// Heartbeats sent, by outcome (`ok`, `error`).
    pub heartbeats: IntCounterVec,
    /// Round trip of a heartbeat, as the agent sees it.
    pub heartbeat_seconds: Histogram,
    /// Assignment polls answered, by outcome (`changed`, `unchanged`, `error`).
    pub polls: IntCounterVec,
    /// Agents registered with the servers.
    pub registered: IntGauge,
    /// Per-GPU readings (not kept by fleet simulations).
    gpu: Option<GpuGauges>,
}

#[derive(Clone)]
struct GpuGauges {
    memory_used_mib: IntGaugeVec,
    utilization_percent: IntGaugeVec,
    temperature_c: IntGaugeVec,
    power_mw: IntGaugeVec,
    healthy: IntGaugeVec,
}

impl AgentMetrics {
    /// Registers the metrics; `per_gpu` adds one series per GPU and reading.
    pub fn register(registry: &Registry, per_gpu: bool) -> prometheus::Result<Self> {
        let heartbeats = IntCounterVec::new(
            Opts::new("aigrid_agent_heartbeats_sent_total", "Heartbeats sent"),
            &["outcome"],
        )?;
        let heartbeat_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "aigrid_agent_heartbeat_round_trip_seconds",
                "Heartbeat round trip seen by the agent",
            )
            .buckets(prometheus::exponential_buckets(0.000_1, 2.0, 18)?),
        )?;
        let polls = IntCounterVec::new(
            Opts::new("aigrid_agent_polls_total", "Assignment polls answered"),
            &["outcome"],
        )?;
        let registered = IntGauge::new(
            "aigrid_agent_registered",
            "Agents registered with the servers",
        )?;
        registry.register(Box::new(heartbeats.clone()))?;
        registry.register(Box::new(heartbeat_seconds.clone()))?;
        registry.register(Box::new(polls.clone()))?;
        registry.register(Box::new(registered.clone()))?;
        let gpu = if per_gpu {
            let gauge = |name: &str, help: &str| -> prometheus::Result<IntGaugeVec> {
                let g = IntGaugeVec::new(Opts::new(name, help), &["uuid"])?;
                registry.register(Box::new(g.clone()))?;
                Ok(g)
            };
            Some(GpuGauges {
                memory_used_mib: gauge("aigrid_gpu_memory_used_mib", "GPU memory in use")?,
                utilization_percent: gauge(
                    "aigrid_gpu_utilization_percent",
                    "GPU kernel time share",
                )?,
                temperature_c: gauge("aigrid_gpu_temperature_celsius", "GPU temperature")?,
                power_mw: gauge("aigrid_gpu_power_milliwatts", "GPU power draw")?,
                healthy: gauge("aigrid_gpu_healthy", "1 when the GPU is healthy")?,
            })
        } else {
            None
        };
        Ok(AgentMetrics {
            heartbeats,
            heartbeat_seconds,
            polls,
            registered,
            gpu,
        })
    }

    /// Records one sample's GPU readings.
    pub fn record_gpus(&self, readings: &[GpuTelemetry], health: &[aigrid_api::GpuHealth]) {
        let Some(g) = &self.gpu else {
            return;
        };
        for r in readings {
            let labels = [r.uuid.as_str()];
            let set = |v: &IntGaugeVec, x: Option<u64>| {
                if let Some(x) = x {
                    v.with_label_values(&labels)
                        .set(i64::try_from(x).unwrap_or(i64::MAX));
                }
            };
            set(&g.memory_used_mib, Some(r.memory_used_mib));
            set(&g.utilization_percent, r.utilization_percent.map(u64::from));
            set(&g.temperature_c, r.temperature_c.map(u64::from));
            set(&g.power_mw, r.power_mw.map(u64::from));
        }
        for h in health {
            g.healthy
                .with_label_values(&[h.uuid.as_str()])
                .set(i64::from(h.healthy));
        }
    }
}
