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
//!
//! With `--marks FILE` the load runs until a script, disrupting the cluster
//! meanwhile (killing its leader, changing its members), appends the `end` mark to
//! FILE (see `aigrid_benchmarks::timeline`). The report then also says how writes
//! fared from the first mark to `end`: `resume_ms` (first acknowledged write sent
//! after the first mark), `max_gap_ms` (longest stretch without an
//! acknowledgement over the interval), `watched_acks` and `watched_errors`. In
//! that mode a client also moves to the next endpoint when a server refuses a
//! write, as a client of a cluster in flux would, and `--probe-ms N` adds a
//! probe that sends one write every N ms without waiting for the earlier ones,
//! counted on the timeline only.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aigrid_benchmarks::timeline::{self, Ack, Mark};
use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use clap::{Parser, ValueEnum};
use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

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

    /// PEM file of a CA to trust for `https://` endpoints (repeatable). Given any,
    /// the clients trust these alone, not the system's roots.
    #[arg(long)]
    ca_cert: Vec<PathBuf>,

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

    /// File of `LABEL UNIX_SECONDS` lines a script appends while the load runs;
    /// the load stops at the `end` mark (or after --warmup-secs plus
    /// --duration-secs, an error then) and reports on the marked interval.
    #[arg(long)]
    marks: Option<PathBuf>,

    /// With --marks, also send one write every this many milliseconds without
    /// waiting for earlier ones (0: none); they count on the timeline only.
    #[arg(long, default_value_t = 0)]
    probe_ms: u64,
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
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    watched: Option<Watched>,
}

/// How writes fared over the marked interval.
#[derive(Serialize)]
struct Watched {
    /// `null` when no write sent after the first mark was acknowledged.
    resume_ms: Option<f64>,
    max_gap_ms: f64,
    watched_acks: usize,
    watched_errors: usize,
}

/// What one client measured inside the window.
#[derive(Default)]
struct ClientStats {
    /// Latency of every successful request, in microseconds.
    latencies_us: Vec<u64>,
    errors: u64,
    /// With a timeline: every acknowledged write, warm-up included.
    acks: Vec<Ack>,
    /// With a timeline: when every failed request ended.
    failures: Vec<Duration>,
}

impl ClientStats {
    /// Puts one request on the timeline.
    fn record(
        &mut self,
        clock: &WallClock,
        outcome: &Outcome,
        started: Instant,
        finished: Instant,
    ) {
        match outcome {
            Outcome::Ok => self.acks.push(Ack {
                sent: clock.wall(started),
                acked: clock.wall(finished),
            }),
            Outcome::Rejected | Outcome::Unreachable => self.failures.push(clock.wall(finished)),
        }
    }
}

/// Wall-clock times of the load's monotonic instants, to compare them with the
/// marks a script writes.
#[derive(Copy, Clone)]
struct WallClock {
    anchor: Instant,
    /// The anchor's time since the Unix epoch.
    anchor_wall: Duration,
}

impl WallClock {
    fn now() -> Result<WallClock> {
        let anchor = Instant::now();
        let anchor_wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("the system clock is before 1970")?;
        Ok(WallClock {
            anchor,
            anchor_wall,
        })
    }

    fn wall(&self, at: Instant) -> Duration {
        self.anchor_wall + at.saturating_duration_since(self.anchor)
    }
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
    /// Move to the next endpoint when a server refuses a write, not only when
    /// it cannot be reached.
    rotate_on_rejection: bool,
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
        let mut req = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        req = req.body(body);
        // aigrid takes only signed writes: sign as the identity the servers were
        // started with as their admin, as the CLI does, on every request.
        if let (Target::Aigrid, Some(key)) = (&self.target, admin_key()) {
            req = aigrid_scheduler::testkit::Sign::signed_by(req, key);
        }
        let sent = req.send().await;
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

    /// The submitter of the `n`th probe: this one's client, sequence `n`, endpoint
    /// `n` in turn.
    fn probe(&self, n: u64) -> Submitter {
        let len = self.endpoints.len() as u64;
        Submitter {
            target: self.target,
            http: self.http.clone(),
            endpoints: Arc::clone(&self.endpoints),
            client_id: self.client_id,
            current: usize::try_from(n % len).expect("an endpoint index"),
            seq: n,
            rotate_on_rejection: self.rotate_on_rejection,
        }
    }

    fn next_endpoint(&mut self) {
        self.current = (self.current + 1) % self.endpoints.len();
    }
}

/// Resolves once `stop` says true; never when its sender is gone without.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Sends one write every `every` without waiting for the earlier ones, to the
/// endpoints in turn, until `stop` says true, and puts the answered ones on the
/// timeline. Closed-loop clients all waiting on requests a cluster will never
/// answer cannot send the new ones it would; the probes still do.
async fn run_probes(
    template: Submitter,
    every: Duration,
    mut stop: watch::Receiver<bool>,
    clock: WallClock,
) -> ClientStats {
    let mut stats = ClientStats::default();
    let mut probes = JoinSet::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    for n in 0u64.. {
        tokio::select! {
            _ = tick.tick() => {}
            () = stopped(&mut stop) => break,
        }
        let mut probe = template.probe(n);
        probes.spawn(async move {
            let started = Instant::now();
            let outcome = probe.submit_once().await;
            (outcome, started, Instant::now())
        });
        while let Some(Ok((outcome, started, finished))) = probes.try_join_next() {
            stats.record(&clock, &outcome, started, finished);
        }
    }
    // Probes still waiting are abandoned, as the clients' requests are.
    probes.abort_all();
    while let Some(done) = probes.join_next().await {
        if let Ok((outcome, started, finished)) = done {
            stats.record(&clock, &outcome, started, finished);
        }
    }
    stats
}

/// Submits until the window closes or `stop` says true, which also abandons the
/// request in flight. With `timeline`, records every acknowledgement and failure.
async fn run_client(
    mut submitter: Submitter,
    window: Window,
    mut stop: watch::Receiver<bool>,
    timeline: Option<WallClock>,
) -> ClientStats {
    let mut stats = ClientStats::default();
    loop {
        let started = Instant::now();
        if started >= window.stop_at || *stop.borrow() {
            break;
        }
        let outcome = tokio::select! {
            outcome = submitter.submit_once() => outcome,
            () = stopped(&mut stop) => break,
        };
        let finished = Instant::now();
        let counted = window.contains(started, finished);
        if let Some(clock) = &timeline {
            stats.record(clock, &outcome, started, finished);
        }
        match outcome {
            Outcome::Ok => {
                if counted {
                    let us = finished.duration_since(started).as_micros();
                    stats
                        .latencies_us
                        .push(u64::try_from(us).unwrap_or(u64::MAX));
                }
            }
            Outcome::Rejected if !submitter.rotate_on_rejection => {
                if counted {
                    stats.errors += 1;
                }
            }
            Outcome::Rejected | Outcome::Unreachable => {
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

/// The certificates in each `--ca-cert` file, read once for every client.
fn read_ca_certs(paths: &[PathBuf]) -> Result<Vec<reqwest::Certificate>> {
    paths
        .iter()
        .map(|path| {
            let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("{} is not a PEM certificate", path.display()))
        })
        .collect()
}

/// One client's HTTP client, with its own connections. Given CAs, it trusts those
/// alone: the servers under test are the only ones it talks to, and reading the
/// system's roots for each of 64 clients took about a second of CPU on a slow
/// machine, beside the servers, while the load started.
fn build_http(timeout: Duration, ca_certs: &[reqwest::Certificate]) -> Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder();
    if !ca_certs.is_empty() {
        builder = builder.tls_certs_only(ca_certs.iter().cloned());
    }
    builder
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
    if args.probe_ms > 0 && args.marks.is_none() {
        bail!("--probe-ms needs --marks: probes only count on its timeline");
    }
    let endpoints = Arc::new(endpoints);
    let timeout = Duration::from_secs(args.request_timeout_secs.max(1));
    let ca_certs = read_ca_certs(&args.ca_cert)?;

    // With marks: where to read them, and the clock to compare them with.
    let watch = args
        .marks
        .as_deref()
        .map(|path| WallClock::now().map(|clock| (path, clock)))
        .transpose()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let submitter = |client_id: usize| -> Result<Submitter> {
        Ok(Submitter {
            target: args.target,
            http: build_http(timeout, &ca_certs)?,
            endpoints: Arc::clone(&endpoints),
            client_id,
            current: client_id % endpoints.len(),
            seq: 0,
            rotate_on_rejection: args.marks.is_some(),
        })
    };
    // Every client is made before the clock starts: they start together, and the
    // warm-up is spent on load alone.
    let submitters = (0..args.clients)
        .map(submitter)
        .collect::<Result<Vec<_>>>()?;
    let probe = match watch.filter(|_| args.probe_ms > 0) {
        Some((_, clock)) => Some((submitter(args.clients)?, clock)),
        None => None,
    };

    let start = Instant::now();
    let measure_from = start + Duration::from_secs(args.warmup_secs);
    let window = Window {
        measure_from,
        stop_at: measure_from + Duration::from_secs(args.duration_secs),
    };
    let mut handles = Vec::with_capacity(args.clients + 1);
    for submitter in submitters {
        handles.push(tokio::spawn(run_client(
            submitter,
            window,
            stop_rx.clone(),
            watch.map(|(_, clock)| clock),
        )));
    }
    if let Some((submitter, clock)) = probe {
        handles.push(tokio::spawn(run_probes(
            submitter,
            Duration::from_millis(args.probe_ms),
            stop_rx.clone(),
            clock,
        )));
    }

    // With marks, the load stops at the `end` mark.
    let marked = match watch {
        Some((path, clock)) => {
            let marks = watch_marks(path, window.stop_at).await;
            let stopped_at = Instant::now();
            stop_tx.send_replace(true);
            Some((path, clock, marks?, stopped_at))
        }
        None => None,
    };

    let mut latencies_us = Vec::new();
    let mut errors = 0u64;
    let mut acks = Vec::new();
    let mut failures = Vec::new();
    for handle in handles {
        let stats = handle.await.context("client task panicked")?;
        latencies_us.extend(stats.latencies_us);
        errors += stats.errors;
        acks.extend(stats.acks);
        failures.extend(stats.failures);
    }
    drop(stop_tx);
    latencies_us.sort_unstable();

    let mut measured_secs = args.duration_secs as f64;
    let mut watched = None;
    if let Some((path, clock, marks, stopped_at)) = marked {
        measured_secs = stopped_at
            .saturating_duration_since(measure_from)
            .as_secs_f64();
        let Some(interval) = timeline::interval(&marks)? else {
            bail!(
                "{} got no `{}` mark within --warmup-secs plus --duration-secs",
                path.display(),
                timeline::END
            );
        };
        let loaded = (clock.anchor_wall, clock.wall(stopped_at));
        let d = timeline::disruption(&acks, interval, loaded);
        let (from, to) = interval;
        watched = Some(Watched {
            resume_ms: d.resume.map(|r| round3(r.as_secs_f64() * 1000.0)),
            max_gap_ms: round3(d.max_gap.as_secs_f64() * 1000.0),
            watched_acks: d.acks,
            watched_errors: failures.iter().filter(|t| (from..=to).contains(*t)).count(),
        });
    }

    let ops = latencies_us.len() as u64;
    let ops_per_sec = if measured_secs > 0.0 {
        round3(ops as f64 / measured_secs)
    } else {
        0.0
    };
    Ok(Report {
        target: args.target,
        clients: args.clients,
        ops,
        errors,
        ops_per_sec,
        p50_ms: round3(percentile_ms(&latencies_us, 50.0)),
        p99_ms: round3(percentile_ms(&latencies_us, 99.0)),
        watched,
    })
}

/// Rereads the marks file until it holds the `end` mark or `limit` passes; a
/// file not yet created holds no marks.
async fn watch_marks(path: &Path, limit: Instant) -> Result<Vec<Mark>> {
    loop {
        let marks = match tokio::fs::read_to_string(path).await {
            Ok(text) => timeline::parse_marks(&text)
                .with_context(|| format!("reading marks from {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(e).with_context(|| format!("reading marks from {}", path.display()))
            }
        };
        if marks.iter().any(|m| m.label == timeline::END) || Instant::now() >= limit {
            return Ok(marks);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

/// The identity in the key file `AIGRID_IDENTITY` names (as `aigrid key new` writes
/// it), read once; none when the variable is unset.
fn admin_key() -> Option<&'static aigrid_api::IdentityKey> {
    static KEY: std::sync::OnceLock<Option<aigrid_api::IdentityKey>> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let path = std::env::var_os("AIGRID_IDENTITY")?;
        let text = std::fs::read_to_string(&path).ok()?;
        let file: aigrid_api::KeyFile = serde_json::from_str(&text).ok()?;
        file.key().ok()
    })
    .as_ref()
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
            rotate_on_rejection: false,
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

    #[tokio::test]
    async fn marks_are_read_until_the_end_mark_or_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("marks");
        let soon = Instant::now() + Duration::from_millis(100);
        // No file yet: no marks once the limit passes.
        assert!(watch_marks(&path, soon).await.unwrap().is_empty());
        std::fs::write(&path, "kill 10.5\n").unwrap();
        let marks = watch_marks(&path, soon).await.unwrap();
        assert_eq!(marks.len(), 1);
        // The end mark returns at once, however far the limit.
        std::fs::write(&path, "kill 10.5\nend 12\n").unwrap();
        let far = Instant::now() + Duration::from_secs(3600);
        let marks = watch_marks(&path, far).await.unwrap();
        assert_eq!(marks[1].label, timeline::END);
        std::fs::write(&path, "kill soon\n").unwrap();
        assert!(watch_marks(&path, far).await.is_err());
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
            rotate_on_rejection: false,
        };
        s.next_endpoint();
        assert_eq!(s.current, 0);
        // Probes take the endpoints in turn, each its own sequence number.
        let probes: Vec<(usize, u64)> = (3..6)
            .map(|n| s.probe(n))
            .map(|p| (p.current, p.seq))
            .collect();
        assert_eq!(probes, vec![(0, 3), (1, 4), (2, 5)]);
    }
}
