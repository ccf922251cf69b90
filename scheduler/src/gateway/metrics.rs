//! The gateway's Prometheus series: requests by route, model and status, latency,
//! requests outstanding per replica, requests held while a model scales from zero.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// The gateway's Prometheus metrics.
#[derive(Clone)]
pub(crate) struct GatewayMetrics {
    pub(crate) requests: IntCounterVec,
    pub(crate) seconds: HistogramVec,
    pub(crate) retries: IntCounter,
    pub(crate) outstanding: IntGaugeVec,
    pub(crate) replicas: IntGaugeVec,
    pub(crate) replicas_ready: IntGaugeVec,
    pub(crate) held: IntGauge,
    pub(crate) held_outcomes: IntCounterVec,
    pub(crate) held_seconds: Histogram,
    pub(crate) wakes: IntCounter,
    pub(crate) rebuilds: IntCounter,
}

impl GatewayMetrics {
    pub(crate) fn register(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "aigrid_gateway_requests_total",
                "Inference gateway requests, by route and answered status",
            ),
            &["route", "status"],
        )?;
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "aigrid_gateway_request_seconds",
                "Time until the inference gateway answered a request's status",
            )
            .buckets(prometheus::exponential_buckets(0.000_5, 2.0, 18)?),
            &["route"],
        )?;
        let retries = IntCounter::with_opts(Opts::new(
            "aigrid_gateway_retries_total",
            "Requests moved to another replica after one could not be reached",
        ))?;
        let outstanding = IntGaugeVec::new(
            Opts::new(
                "aigrid_gateway_outstanding_requests",
                "Requests relayed by this server and not yet finished, per model",
            ),
            &["model", "digest"],
        )?;
        let replicas = IntGaugeVec::new(
            Opts::new(
                "aigrid_gateway_replicas",
                "Model server replicas running with an endpoint, per model",
            ),
            &["model", "digest"],
        )?;
        let replicas_ready = IntGaugeVec::new(
            Opts::new(
                "aigrid_gateway_replicas_ready",
                "Model server replicas whose /ready answered 200 at the last probe, per model",
            ),
            &["model", "digest"],
        )?;
        let held = IntGauge::with_opts(Opts::new(
            "aigrid_gateway_held_requests",
            "Requests waiting for a model with no ready replica to scale up",
        ))?;
        let held_outcomes = IntCounterVec::new(
            Opts::new(
                "aigrid_gateway_held_total",
                "Requests held for a model to scale up, by outcome \
                 (served, timed_out, refused: the queue was full)",
            ),
            &["outcome"],
        )?;
        let held_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "aigrid_gateway_held_seconds",
                "How long a held request waited for a ready replica",
            )
            .buckets(prometheus::exponential_buckets(0.01, 2.0, 16)?),
        )?;
        let wakes = IntCounter::with_opts(Opts::new(
            "aigrid_gateway_wakes_total",
            "Groups at zero this server asked to scale to their first replica",
        ))?;
        let rebuilds = IntCounter::with_opts(Opts::new(
            "aigrid_gateway_route_rebuilds_total",
            "Times the routing table was rebuilt from the applied state",
        ))?;
        registry.register(Box::new(rebuilds.clone()))?;
        registry.register(Box::new(held.clone()))?;
        registry.register(Box::new(held_outcomes.clone()))?;
        registry.register(Box::new(held_seconds.clone()))?;
        registry.register(Box::new(wakes.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(outstanding.clone()))?;
        registry.register(Box::new(replicas.clone()))?;
        registry.register(Box::new(replicas_ready.clone()))?;
        Ok(GatewayMetrics {
            requests,
            seconds,
            retries,
            outstanding,
            replicas,
            replicas_ready,
            held,
            held_outcomes,
            held_seconds,
            wakes,
            rebuilds,
        })
    }
}
