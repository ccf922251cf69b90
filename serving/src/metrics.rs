//! Prometheus metrics of one model server, in its own registry.

use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry,
};

/// Every metric a model server exports.
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Requests by route and status.
    pub requests: IntCounterVec,
    /// Requests accepted and not yet answered in full.
    pub in_flight: IntGauge,
    /// Requests waiting to enter a batch.
    pub queue_depth: IntGauge,
    /// Sequences in the running batch (prefilling or decoding).
    pub running_sequences: IntGauge,
    /// Seconds from arrival to the first token.
    pub time_to_first_token: Histogram,
    /// Seconds between tokens of one sequence.
    pub inter_token_latency: Histogram,
    /// Seconds from arrival to the last byte, by route.
    pub request_duration: HistogramVec,
    /// Prompt (or embedding input) tokens.
    pub tokens_in: IntCounter,
    /// Generated tokens.
    pub tokens_out: IntCounter,
    /// Sequences per generation step.
    pub generation_batch: Histogram,
    /// Tokens per generation step (prefill and decode).
    pub generation_step_tokens: Histogram,
    /// Inputs per embedding batch.
    pub embedding_batch: Histogram,
    /// Model bytes loaded, by source (`store` reads are verified chunk by chunk).
    pub loader_bytes: IntCounterVec,
    /// Seconds each loading phase took.
    pub loader_phase_seconds: IntGaugeVec,
    /// 1 when ready.
    pub ready: IntGauge,
}

impl Metrics {
    /// Fresh metrics in a new registry.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let latency = || exponential_buckets(0.0005, 2.0, 18).expect("valid buckets");
        let sizes = || exponential_buckets(1.0, 2.0, 12).expect("valid buckets");
        let metrics = Metrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "aigrid_serve_requests_total",
                    "Requests by route and status.",
                ),
                &["route", "status"],
            )
            .expect("valid metric"),
            in_flight: IntGauge::new("aigrid_serve_requests_in_flight", "Requests being served.")
                .expect("valid metric"),
            queue_depth: IntGauge::new(
                "aigrid_serve_queue_depth",
                "Requests waiting to enter a batch.",
            )
            .expect("valid metric"),
            running_sequences: IntGauge::new(
                "aigrid_serve_running_sequences",
                "Sequences in the running generation batch.",
            )
            .expect("valid metric"),
            time_to_first_token: Histogram::with_opts(
                HistogramOpts::new(
                    "aigrid_serve_time_to_first_token_seconds",
                    "Seconds from arrival to the first generated token.",
                )
                .buckets(latency()),
            )
            .expect("valid metric"),
            inter_token_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "aigrid_serve_inter_token_latency_seconds",
                    "Seconds between consecutive tokens of one sequence.",
                )
                .buckets(latency()),
            )
            .expect("valid metric"),
            request_duration: HistogramVec::new(
                HistogramOpts::new(
                    "aigrid_serve_request_duration_seconds",
                    "Seconds from arrival to the end of the answer.",
                )
                .buckets(latency()),
                &["route"],
            )
            .expect("valid metric"),
            tokens_in: IntCounter::new("aigrid_serve_prompt_tokens_total", "Input tokens.")
                .expect("valid metric"),
            tokens_out: IntCounter::new("aigrid_serve_generated_tokens_total", "Generated tokens.")
                .expect("valid metric"),
            generation_batch: Histogram::with_opts(
                HistogramOpts::new(
                    "aigrid_serve_generation_batch_sequences",
                    "Sequences in one generation step.",
                )
                .buckets(sizes()),
            )
            .expect("valid metric"),
            generation_step_tokens: Histogram::with_opts(
                HistogramOpts::new(
                    "aigrid_serve_generation_step_tokens",
                    "Tokens processed in one generation step.",
                )
                .buckets(sizes()),
            )
            .expect("valid metric"),
            embedding_batch: Histogram::with_opts(
                HistogramOpts::new(
                    "aigrid_serve_embedding_batch_inputs",
                    "Inputs embedded in one forward.",
                )
                .buckets(sizes()),
            )
            .expect("valid metric"),
            loader_bytes: IntCounterVec::new(
                Opts::new(
                    "aigrid_serve_loader_bytes_total",
                    "Model bytes loaded and verified.",
                ),
                &["source"],
            )
            .expect("valid metric"),
            loader_phase_seconds: IntGaugeVec::new(
                Opts::new(
                    "aigrid_serve_loader_phase_milliseconds",
                    "Milliseconds each loading phase took.",
                ),
                &["phase"],
            )
            .expect("valid metric"),
            ready: IntGauge::new("aigrid_serve_ready", "1 once the model answers.")
                .expect("valid metric"),
            registry,
        };
        let r = &metrics.registry;
        let all: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.requests.clone()),
            Box::new(metrics.in_flight.clone()),
            Box::new(metrics.queue_depth.clone()),
            Box::new(metrics.running_sequences.clone()),
            Box::new(metrics.time_to_first_token.clone()),
            Box::new(metrics.inter_token_latency.clone()),
            Box::new(metrics.request_duration.clone()),
            Box::new(metrics.tokens_in.clone()),
            Box::new(metrics.tokens_out.clone()),
            Box::new(metrics.generation_batch.clone()),
            Box::new(metrics.generation_step_tokens.clone()),
            Box::new(metrics.embedding_batch.clone()),
            Box::new(metrics.loader_bytes.clone()),
            Box::new(metrics.loader_phase_seconds.clone()),
            Box::new(metrics.ready.clone()),
        ];
        for c in all {
            r.register(c).expect("metric names are unique");
        }
        metrics
    }

    /// Requests answered so far, over every route and status.
    pub fn requests_answered(&self) -> u64 {
        use prometheus::core::Collector;
        self.requests
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding does not fail");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
