//! Closed-loop load generator for control-plane write throughput.
//!
//! Every client is an independent tokio task that submits one job, waits for
//! the answer and immediately submits the next. Against aigrid a submission is
//! `POST /api/v1/jobs`; against etcd it is one `put` of the same JSON document
//! through etcd's v3 JSON gateway (`POST /v3/kv/put`). Both systems fsync
//! their log before acknowledging, so the numbers compare like with like.
//!
//! The result is printed as one JSON line on stdout:
//! `{"target","clients","ops","errors","ops_per_sec","p50_ms","p99_ms"}`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use clap::{Parser, ValueEnum};
use serde::Serialize;
use serde_json::json;
use tokio::time::Instant;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Target {
    /// aigrid control API: `POST /api/v1/jobs`, success is HTTP 201.
    Aigrid,
    /// etcd v3 JSON gateway: `POST /v3/kv/put`, success is HTTP 200.
    Etcd,
}

#[derive(Parser, Debug)]
#[command(
    name = "control_plane",
    about = "Closed-loop job-submission load generator for aigrid and etcd"
)]
struct Args {
    /// System under test.
    #[arg(long, value_enum)]
    target: Target,

    /// Comma-separated base URLs, e.g. http://127.0.0.1:7701,http://127.0.0.1:7702.
    /// Client i starts on endpoint i % n.
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,

    /// Number of concurrent closed-loop clients.
    #[arg(long, default_value_t = 1)]
    clients: usize,

    /// Length of the measured window in seconds.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,

    /// Seconds of load before measuring starts (not counted).
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,

    /// Per-request timeout in seconds; a timed-out request counts as an error.
    #[arg(long, default_value_t = 10)]
    request_timeout_secs: u64,

    /// Tokio worker threads (default: number of CPUs).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Serialize)]
struct Report {
    target: Target,
    clients: usize,
    ops: u64,
    errors: u64,
    ops_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// What one client measured inside the window.
#[derive(Default)]
struct ClientStats {
    /// Latency of every successful request, in microseconds.
    latencies_us: Vec<u64>,
    errors: u64,
}

/// Time boundaries shared by all clients.
#[derive(Copy, Clone)]
struct Window {
    measure_from: Instant,
    stop_at: Instant,
}

impl Window {
    /// A request counts when it started and finished inside the window.
    fn contains(&self, started: Instant, finished: Instant) -> bool {
        started >= self.measure_from && finished <= self.stop_at
    }
}

enum Outcome {
    Ok,
    /// The server answered, but not with the success status.
    Rejected,
    /// No answer (refused, reset, timed out): try the next endpoint.
    Unreachable,
}

struct Submitter {
    target: Target,
    http: reqwest::Client,
    endpoints: Arc<Vec<String>>,
    client_id: usize,
    current: usize,
    seq: u64,
}

impl Submitter {
    fn job_body(&mut self) -> (String, Vec<u8>) {
        self.seq += 1;
        let name = format!(
            "bench-{}-{}-{:08x}",
            self.client_id,
            self.seq,
            rand::random::<u32>()
        );
        let body = json!({
            "name": name,
            "kind": "service",
            "priority": 50,
            "groups": [{
                "name": "replica",
                "count": 2,
                "resources": {
                    "cpu_millis": 2000,
                    "memory_mib": 8192,
                    "gpus": {"count": 1, "model": "H100", "min_memory_mib": 40000}
                },
                "task": {
                    "driver": "exec",
                    "command": "/usr/bin/python3",
                    "args": ["serve.py"],
                    "env": {"MODE": "prod"}
                }
            }]
        });
        let bytes = serde_json::to_vec(&body).expect("job body serializes");
        (name, bytes)
    }

    async fn submit_once(&mut self) -> Outcome {
        let (name, job) = self.job_body();
        let endpoint = self.endpoints[self.current].trim_end_matches('/');
        let (url, body, expect) = match self.target {
            Target::Aigrid => (
                format!("{endpoint}/api/v1/jobs"),
                job,
                reqwest::StatusCode::CREATED,
            ),
            Target::Etcd => {
                let put = json!({
                    "key": BASE64.encode(format!("/jobs/{name}")),
                    "value": BASE64.encode(&job),
                });
                (
                    format!("{endpoint}/v3/kv/put"),
                    serde_json::to_vec(&put).expect("put body serializes"),
                    reqwest::StatusCode::OK,
                )
            }
        };
        let sent = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        match sent {
            Ok(resp) => {
                let status = resp.status();
                // Drain the body so the connection goes back to the pool.
                match resp.bytes().await {
                    Ok(_) if status == expect => Outcome::Ok,
                    Ok(_) => Outcome::Rejected,
                    Err(_) => Outcome::Unreachable,
                }
            }
            Err(_) => Outcome::Unreachable,
        }
    }

    fn next_endpoint(&mut self) {
        self.current = (self.current + 1) % self.endpoints.len();
    }
}

async fn run_client(mut submitter: Submitter, window: Window) -> ClientStats {
    let mut stats = ClientStats::default();
    loop {
        let started = Instant::now();
        if started >= window.stop_at {
            break;
        }
        let outcome = submitter.submit_once().await;
        let finished = Instant::now();
        let counted = window.contains(started, finished);
        match outcome {
            Outcome::Ok => {
                if counted {
                    let us = finished.duration_since(started).as_micros();
                    stats
                        .latencies_us
                        .push(u64::try_from(us).unwrap_or(u64::MAX));
                }
            }
            Outcome::Rejected => {
                if counted {
                    stats.errors += 1;
                }
            }
            Outcome::Unreachable => {
                if counted {
                    stats.errors += 1;
                }
                submitter.next_endpoint();
                // Avoid a hot loop of instant refusals while a node is down.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    stats
}

/// Nearest-rank percentile over a sorted slice, in milliseconds.
fn percentile_ms(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted_us.len() as f64).ceil() as usize;
    let idx = rank.clamp(1, sorted_us.len()) - 1;
    sorted_us[idx] as f64 / 1000.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn build_http(timeout: Duration) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .no_proxy()
        .pool_max_idle_per_host(4)
        .connect_timeout(Duration::from_secs(2))
        .timeout(timeout)
        .build()
        .context("building HTTP client")
}

async fn run(args: Args) -> Result<Report> {
    let endpoints: Vec<String> = args
        .endpoints
        .iter()
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    if endpoints.is_empty() {
        bail!("--endpoints must name at least one URL");
    }
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    if args.duration_secs == 0 {
        bail!("--duration-secs must be at least 1");
    }
    let endpoints = Arc::new(endpoints);
    let timeout = Duration::from_secs(args.request_timeout_secs.max(1));

    let start = Instant::now();
    let measure_from = start + Duration::from_secs(args.warmup_secs);
    let window = Window {
        measure_from,
        stop_at: measure_from + Duration::from_secs(args.duration_secs),
    };

    let mut handles = Vec::with_capacity(args.clients);
    for client_id in 0..args.clients {
        let submitter = Submitter {
            target: args.target,
            http: build_http(timeout)?,
            endpoints: Arc::clone(&endpoints),
            client_id,
            current: client_id % endpoints.len(),
            seq: 0,
        };
        handles.push(tokio::spawn(run_client(submitter, window)));
    }

    let mut latencies_us = Vec::new();
    let mut errors = 0u64;
    for handle in handles {
        let stats = handle.await.context("client task panicked")?;
        latencies_us.extend(stats.latencies_us);
        errors += stats.errors;
    }
    latencies_us.sort_unstable();

    let ops = latencies_us.len() as u64;
    Ok(Report {
        target: args.target,
        clients: args.clients,
        ops,
        errors,
        ops_per_sec: round3(ops as f64 / args.duration_secs as f64),
        p50_ms: round3(percentile_ms(&latencies_us, 50.0)),
        p99_ms: round3(percentile_ms(&latencies_us, 99.0)),
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(threads) = args.threads {
        builder.worker_threads(threads.max(1));
    }
    let runtime = builder.build().context("starting tokio runtime")?;
    let report = runtime.block_on(run(args))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile_ms(&v, 50.0), 50.0);
        assert_eq!(percentile_ms(&v, 99.0), 99.0);
        assert_eq!(percentile_ms(&[], 99.0), 0.0);
        assert_eq!(percentile_ms(&[2500], 50.0), 2.5);
    }

    #[test]
    fn job_names_are_unique_and_body_matches_schema() {
        let mut s = Submitter {
            target: Target::Aigrid,
            http: reqwest::Client::new(),
            endpoints: Arc::new(vec!["http://127.0.0.1:1".into()]),
            client_id: 3,
            current: 0,
            seq: 0,
        };
        let (a, body) = s.job_body();
        let (b, _) = s.job_body();
        assert_ne!(a, b);
        assert!(a.starts_with("bench-3-1-"));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["name"], a);
        assert_eq!(v["groups"][0]["resources"]["gpus"]["model"], "H100");
        assert_eq!(v["groups"][0]["count"], 2);
    }

    #[test]
    fn endpoints_rotate() {
        let mut s = Submitter {
            target: Target::Etcd,
            http: reqwest::Client::new(),
            endpoints: Arc::new(vec!["a".into(), "b".into(), "c".into()]),
            client_id: 2,
            current: 2,
            seq: 0,
        };
        s.next_endpoint();
        assert_eq!(s.current, 0);
    }
}
