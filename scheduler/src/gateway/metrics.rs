//! The gateway's Prometheus series: requests by route, model and status, latency,
//! requests outstanding per replica.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
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
        })
    }
}
