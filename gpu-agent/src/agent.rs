//! The pull loop: the whole of an agent's conversation with the control plane, and
//! all of it outbound. The agent registers (with a join token the first time),
//! then runs two loops until it is told to stop:
//!
//! - heartbeat: every interval, or at once when an allocation changes state, it
//!   sends GPU health, host and GPU readings, allocation states and fresh log tails;
//! - poll: it long-polls its node's assignments and hands each answer to the
//!   [`Runner`], which starts, stops and restarts processes to match.
//!
//! Either loop failing to reach a server retries with backoff, moving to the next
//! server. The servers refusing the node's key (it was revoked) stops the
//! agent's workloads and ends the agent.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aigrid_api::allocation::MAX_LOG_TAIL_BYTES;
use aigrid_api::node::{MAX_HEARTBEAT_ENTRIES, MAX_HEARTBEAT_LOGS};
use aigrid_api::{
    Heartbeat, HeartbeatResponse, JoinToken, LimitsEnforcement, NodeAssignments, NodeRegistration,
    RegisterNodeResponse,
};
use parking_lot::Mutex;
use reqwest::{Method, StatusCode};
use tokio::sync::watch;

use crate::client::{ClientError, ControlClient};
use crate::discovery::Discovery;
use crate::metrics::AgentMetrics;
use crate::runner::Runner;

/// How an agent talks to the control plane.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Presented when the node registers for the first time (or after its key
    /// was revoked); known nodes re-register with their key alone.
    pub join_token: Option<JoinToken>,
    /// Operator-given facts for constraints and spreads (`country`, `site`).
    /// Where the servers reach this node's workloads is not among them: it is
    /// the address the registration comes from.
    pub attributes: BTreeMap<String, String>,
    /// The ports the control plane may assign this node's listening workloads;
    /// the servers' default ([`aigrid_api::PortRange::DEFAULT`]) when `None`.
    pub ports: Option<aigrid_api::PortRange>,
    /// The port of this node's private data port (its shard service), where its
    /// peers fetch model chunks it holds; at the node's address.
    pub data_port: Option<u16>,
    /// Set when the data port serves TLS: peers dial it `https://`.
    pub data_tls: Option<DataTls>,
    /// The cluster CA's certificate (PEM), when the agent knows it: model servers
    /// trust it for the control plane and the store's data ports. A certificate
    /// issued with the registration brings it too.
    pub cluster_ca: Option<String>,
    /// Time between heartbeats when nothing changes.
    pub heartbeat_interval: Duration,
    /// Longest a long poll is held by the server.
    pub poll_wait: Duration,
    /// Bound on every other request.
    pub request_timeout: Duration,
    /// What becomes of this node's workloads when the agent is asked to stop.
    pub on_shutdown: OnShutdown,
    /// The farmer's prices for this node's work and who is paid; free when `None`.
    pub offer: Option<aigrid_api::NodeOffer>,
}

/// The data port's TLS, as the registration carries it.
#[derive(Debug, Clone)]
pub struct DataTls {
    /// A certificate request for the data port's key, which the server answering
    /// the registration issues; `None` when the node holds a certificate already.
    pub csr: Option<String>,
    /// Where the certificate chain issued for `csr` is handed over (PEM).
    pub issued: std::sync::Arc<watch::Sender<Option<String>>>,
}

impl DataTls {
    /// TLS with a certificate the node holds already.
    pub fn held() -> Self {
        DataTls {
            csr: None,
            issued: std::sync::Arc::new(watch::channel(None).0),
        }
    }

    /// TLS with a certificate asked for with `csr`; the receiver sees it issued.
    pub fn requested(csr: String) -> (Self, watch::Receiver<Option<String>>) {
        let (issued, rx) = watch::channel(None);
        let tls = DataTls {
            csr: Some(csr),
            issued: std::sync::Arc::new(issued),
        };
        (tls, rx)
    }
}

/// What becomes of a node's workloads when its agent is asked to stop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnShutdown {
    /// They keep running, and the next agent on the same data dir reattaches to
    /// them: restarting or upgrading an agent (`aigrid agent`) must not kill work.
    #[default]
    KeepWorkloads,
    /// They are stopped, each within its task's grace period, before the agent
    /// returns: `aigrid up` owns what it starts, and nothing outlives it.
    StopWorkloads,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            join_token: None,
            attributes: BTreeMap::new(),
            ports: None,
            data_port: None,
            data_tls: None,
            cluster_ca: None,
            heartbeat_interval: Duration::from_secs(10),
            poll_wait: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            on_shutdown: OnShutdown::default(),
            offer: None,
        }
    }
}

/// Why an agent stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The servers refused this node's join token or key.
    #[error("the servers refused this node: {0}")]
    Refused(String),
}

/// One node's agent.
pub struct Agent {
    config: AgentConfig,
    client: ControlClient,
    discovery: Mutex<Discovery>,
    runner: Runner,
    metrics: AgentMetrics,
    /// Models staged for fleet rollouts.
    staging: crate::staging::Staging,
}

impl Agent {
    /// An agent that will talk through `client` and run work through `runner`.
    pub fn new(
        config: AgentConfig,
        client: ControlClient,
        discovery: Discovery,
        runner: Runner,
        metrics: AgentMetrics,
    ) -> Self {
        runner.set_control_server(&client.servers_from_current());
        if config.cluster_ca.is_some() {
            runner.set_cluster_ca(config.cluster_ca.clone());
        }
        Agent {
            config,
            client,
            discovery: Mutex::new(discovery),
            runner,
            metrics,
            staging: crate::staging::Staging::new(None),
        }
    }

    /// Stages the models fleet rollouts ask for through `stager` (without one,
    /// the node reports that it cannot).
    pub fn with_stager(mut self, stager: std::sync::Arc<dyn crate::staging::ModelStager>) -> Self {
        self.staging = crate::staging::Staging::new(Some(stager));
        self
    }

    /// The registration this agent sends.
    fn registration(&self) -> NodeRegistration {
        let discovery = self.discovery.lock();
        let mut attributes = self.config.attributes.clone();
        attributes.insert("gpu.source".into(), discovery.gpu_source().into());
        let (limits, _) = self.runner.limits_enforced();
        let limits = match limits {
            LimitsEnforcement::Enforced => "enforced",
            LimitsEnforcement::NotEnforced => "not_enforced",
        };
        attributes.insert("driver.exec.limits".into(), limits.into());
        let identity = self.client.identity();
        NodeRegistration {
            id: identity.node_id.clone(),
            name: discovery.hostname(),
            attributes,
            resources: discovery.resources(),
            public_key: Some(identity.key.public()),
            protections: self.runner.protections(),
            ports: self.config.ports,
            data_port: self.config.data_port,
            data_tls: self.config.data_tls.is_some(),
            data_csr: self.config.data_tls.as_ref().and_then(|t| t.csr.clone()),
            offer: self.config.offer.clone(),
        }
    }

    /// Registers, retrying with backoff until a server accepts or refuses.
    async fn register(&self, shutdown: &mut watch::Receiver<bool>) -> Result<bool, AgentError> {
        let body = serde_json::to_vec(&self.registration()).expect("serialisable");
        let mut backoff = Backoff::new();
        loop {
            let sent: Result<RegisterNodeResponse, _> = self
                .client
                .send(
                    Method::POST,
                    "/api/v1/nodes",
                    Some(body.clone()),
                    self.config.join_token.as_ref(),
                    self.config.request_timeout,
                )
                .await;
            match sent {
                Ok(resp) => {
                    tracing::info!(
                        node = %resp.id,
                        created = resp.created,
                        address = ?resp.address,
                        "registered"
                    );
                    // Model servers started from now on listen where the servers
                    // will look for them.
                    self.runner.set_node_address(resp.address);
                    if let Some(tls) = &self.config.data_tls {
                        match resp.data_certificate {
                            Some(chain) => {
                                // The chain ends with the CA; model servers, started
                                // only once assignments arrive, trust it.
                                if let Some(ca) = aigrid_tls::ca::last_pem_certificate(&chain) {
                                    self.runner.set_cluster_ca(Some(ca));
                                }
                                tls.issued.send_replace(Some(chain));
                            }
                            None if tls.csr.is_some() => {
                                return Err(AgentError::Refused(
                                    "the server issued no data port certificate".into(),
                                ))
                            }
                            None => {}
                        }
                    }
                    return Ok(true);
                }
                // The registration itself is wrong (a bad field, or a certificate
                // request the servers cannot answer): asking again changes nothing.
                Err(ClientError::Refused {
                    status, message, ..
                }) if status == StatusCode::BAD_REQUEST || status == StatusCode::CONFLICT => {
                    return Err(AgentError::Refused(message));
                }
                Err(e) if e.is_unauthorized() => {
                    let hint = if self.config.join_token.is_none() {
                        "; a new node needs --join-token"
                    } else {
                        ""
                    };
                    return Err(AgentError::Refused(format!("{e}{hint}")));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "registration failed; retrying");
                    if !backoff.wait(shutdown).await {
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// Runs until `shutdown` turns true (workloads keep running, to be reattached
    /// by the next agent, unless [`AgentConfig::on_shutdown`] says to stop them) or
    /// the servers refuse the node (workloads are stopped).
    pub async fn run(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), AgentError> {
        if !self.register(&mut shutdown).await? {
            if self.config.on_shutdown == OnShutdown::StopWorkloads {
                self.stop_workloads().await;
            }
            self.runner.shutdown().await;
            return Ok(());
        }
        self.metrics.registered.inc();
        let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::channel::<AgentError>(2);
        let heartbeats = tokio::spawn(
            self.clone()
                .heartbeat_loop(shutdown.clone(), fatal_tx.clone()),
        );
        let polls = tokio::spawn(self.clone().poll_loop(shutdown.clone(), fatal_tx));
        let outcome = tokio::select! {
            _ = stopped(&mut shutdown) => Ok(()),
            Some(e) = fatal_rx.recv() => Err(e),
        };
        heartbeats.abort();
        polls.abort();
        self.metrics.registered.dec();
        // Refused: the control plane has rescheduled this node's work, so keeping it
        // running would run it twice.
        if outcome.is_err() || self.config.on_shutdown == OnShutdown::StopWorkloads {
            self.stop_workloads().await;
        }
        self.runner.shutdown().await;
        outcome
    }

    /// Stops every workload of this node and waits (a minute at most) until each
    /// has ended.
    async fn stop_workloads(&self) {
        self.runner.apply(&[]);
        self.wait_stopped(Duration::from_secs(60)).await;
    }

    async fn wait_stopped(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline
            && self.runner.reports().iter().any(|r| !r.state.is_terminal())
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// This heartbeat's contents; log tails only when `with_logs`.
    fn heartbeat(&self, with_logs: bool) -> Heartbeat {
        let sample = self.discovery.lock().sample();
        self.metrics
            .record_gpus(&sample.telemetry.gpus, &sample.health);
        let mut allocations = self.runner.reports();
        // Unfinished ones first, so the states that matter are never cut off.
        allocations.sort_by_key(|r| r.state.is_terminal());
        allocations.truncate(MAX_HEARTBEAT_ENTRIES);
        let mut logs = if with_logs {
            self.runner.log_tails(MAX_HEARTBEAT_LOGS)
        } else {
            Vec::new()
        };
        let mut budget = MAX_LOG_BYTES_PER_HEARTBEAT;
        logs.retain_mut(|tail| {
            clip_front(&mut tail.stdout, MAX_LOG_TAIL_BYTES);
            clip_front(&mut tail.stderr, MAX_LOG_TAIL_BYTES);
            // Control characters grow six-fold as JSON escapes; count that.
            let cost = json_len(&tail.stdout) + json_len(&tail.stderr);
            let fits = cost <= budget;
            budget = budget.saturating_sub(cost);
            fits
        });
        Heartbeat {
            gpus: sample.health,
            allocations,
            telemetry: Some(sample.telemetry),
            logs,
            models: self.staging.reports(self.client.identity()),
        }
    }

    async fn heartbeat_loop(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
        fatal: tokio::sync::mpsc::Sender<AgentError>,
    ) {
        let path = format!("/api/v1/nodes/{}/heartbeat", self.client.identity().node_id);
        let mut changes = self.runner.changes();
        let mut staged = self.staging.ended();
        let mut next = tokio::time::Instant::now();
        let mut backoff = Backoff::new();
        // Log tails are committed to the log: shipped at most this often, so a
        // chatty workload cannot turn every heartbeat into a large entry.
        let log_every = self.config.heartbeat_interval.max(MIN_LOG_INTERVAL);
        let mut logs_due = Instant::now();
        loop {
            tokio::select! {
                _ = stopped(&mut shutdown) => return,
                _ = tokio::time::sleep_until(next) => {}
                Ok(()) = changes.changed() => {
                    // Let a burst of changes settle into one heartbeat.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // A model staged (or failed): its attestation goes out now.
                Ok(()) = staged.changed() => {}
            }
            changes.borrow_and_update();
            staged.borrow_and_update();
            let with_logs = Instant::now() >= logs_due;
            let hb = self.heartbeat(with_logs);
            if !hb.logs.is_empty() {
                logs_due = Instant::now() + log_every;
            }
            let body = serde_json::to_vec(&hb).expect("serialisable");
            let started = Instant::now();
            let sent: Result<HeartbeatResponse, _> = self
                .client
                .send(
                    Method::POST,
                    &path,
                    Some(body),
                    None,
                    self.config.request_timeout,
                )
                .await;
            self.metrics
                .heartbeat_seconds
                .observe(started.elapsed().as_secs_f64());
            next = tokio::time::Instant::now() + jitter(self.config.heartbeat_interval);
            match sent {
                Ok(_) => {
                    self.metrics.heartbeats.with_label_values(&["ok"]).inc();
                    self.runner.mark_shipped(&hb.logs);
                    backoff = Backoff::new();
                }
                Err(e) => {
                    self.metrics.heartbeats.with_label_values(&["error"]).inc();
                    match refusal(&e) {
                        Refusal::Revoked => {
                            let _ = fatal.send(AgentError::Refused(e.to_string())).await;
                            return;
                        }
                        Refusal::Unknown => {
                            // The control plane forgot this node: join it again (with
                            // a new join token if its state was lost). A refusal here
                            // is logged and retried; it never stops running work.
                            tracing::warn!("the servers do not know this node; registering again");
                            if let Err(e) = self.register(&mut shutdown).await {
                                tracing::error!(error = %e, "registering again failed");
                            }
                        }
                        Refusal::Other if !hb.logs.is_empty() && e.is_client_error() => {
                            // Tails the servers will not take must never hold up
                            // liveness: drop them and heartbeat again at once.
                            tracing::warn!(error = %e, "heartbeat with log tails refused; dropping them");
                            self.runner.mark_shipped(&hb.logs);
                            next = tokio::time::Instant::now();
                            continue;
                        }
                        Refusal::Other => tracing::warn!(error = %e, "heartbeat failed"),
                    }
                    // Try again sooner than a whole interval later, backing off while
                    // the servers are in trouble.
                    let mut delay = backoff.step();
                    delay = delay.min(self.config.heartbeat_interval);
                    next = tokio::time::Instant::now() + delay;
                }
            }
        }
    }

    async fn poll_loop(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
        fatal: tokio::sync::mpsc::Sender<AgentError>,
    ) {
        let node = self.client.identity().node_id.clone();
        let wait_ms = u64::try_from(self.config.poll_wait.as_millis()).unwrap_or(u64::MAX);
        let mut index: Option<u64> = None;
        let mut backoff = Backoff::new();
        loop {
            let path = match index {
                None => format!("/api/v1/nodes/{node}/assignments"),
                Some(i) => format!("/api/v1/nodes/{node}/assignments?index={i}&wait_ms={wait_ms}"),
            };
            let polled: Result<NodeAssignments, ClientError> = tokio::select! {
                _ = stopped(&mut shutdown) => return,
                r = self.client.send(
                    Method::GET,
                    &path,
                    None,
                    None,
                    self.config.poll_wait + self.config.request_timeout,
                ) => r,
            };
            match polled {
                Ok(assignments) if index.is_some_and(|seen| assignments.index < seen) => {
                    // A server behind the one that answered before: its view is older
                    // than what was applied, so it is not acted on.
                    self.metrics.polls.with_label_values(&["behind"]).inc();
                    if !backoff.wait(&mut shutdown).await {
                        return;
                    }
                }
                Ok(assignments) => {
                    backoff = Backoff::new();
                    let changed = index != Some(assignments.index);
                    let outcome = if changed { "changed" } else { "unchanged" };
                    self.metrics.polls.with_label_values(&[outcome]).inc();
                    // Model servers started now load from the server that answered
                    // first, failing over to the others.
                    self.runner
                        .set_control_server(&self.client.servers_from_current());
                    self.runner.apply(&assignments.allocations);
                    self.staging
                        .apply(&self.client.servers_from_current(), &assignments.models);
                    index = Some(assignments.index);
                }
                Err(e) => {
                    self.metrics.polls.with_label_values(&["error"]).inc();
                    if refusal(&e) == Refusal::Revoked {
                        let _ = fatal.send(AgentError::Refused(e.to_string())).await;
                        return;
                    }
                    // An unknown node is registered again by the heartbeat loop.
                    tracing::warn!(error = %e, "polling for assignments failed");
                    if !backoff.wait(&mut shutdown).await {
                        return;
                    }
                }
            }
        }
    }
}

/// Least time between two heartbeats that carry log tails.
const MIN_LOG_INTERVAL: Duration = Duration::from_secs(5);
/// Most bytes of log tails (as JSON) one heartbeat carries, far under the servers'
/// body limit.
const MAX_LOG_BYTES_PER_HEARTBEAT: usize = 256 * 1024;

/// Keeps the last `max` bytes of `s`, cut on a character boundary: a tail stays a
/// tail however its bytes decoded.
fn clip_front(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s.drain(..start);
}

/// Bytes `s` takes as a JSON string.
fn json_len(s: &str) -> usize {
    s.chars()
        .map(|c| match c {
            '"' | '\\' => 2,
            c if (c as u32) < 0x20 => 6,
            c => c.len_utf8(),
        })
        .sum::<usize>()
        + 2
}

/// How a refusal bears on the agent.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// The node's key was revoked: its work is rescheduled elsewhere, so it stops.
    Revoked,
    /// The servers hold no key for this node: it registers again.
    Unknown,
    /// Anything else (a bad clock, a server error): logged and retried, since a
    /// passing fault must never stop the node's work.
    Other,
}

fn refusal(e: &ClientError) -> Refusal {
    match e.code() {
        Some(c) if c == aigrid_api::ErrorCode::KeyRevoked.as_str() => Refusal::Revoked,
        Some(c) if c == aigrid_api::ErrorCode::UnknownNode.as_str() => Refusal::Unknown,
        _ => Refusal::Other,
    }
}

/// Completes when `shutdown` turns true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// `d` give or take 10%, so a fleet started at once does not heartbeat in step.
fn jitter(d: Duration) -> Duration {
    let f = 0.9 + rand::random::<f64>() * 0.2;
    d.mul_f64(f)
}

/// Exponential retry delays from 200 ms up to 10 s, with jitter.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            next: Duration::from_millis(200),
        }
    }

    /// The next delay, doubling the one after.
    fn step(&mut self) -> Duration {
        let delay = jitter(self.next);
        self.next = (self.next * 2).min(Duration::from_secs(10));
        delay
    }

    /// Sleeps the next delay; false when shutdown came first.
    async fn wait(&mut self, shutdown: &mut watch::Receiver<bool>) -> bool {
        let delay = self.step();
        tokio::select! {
            _ = stopped(shutdown) => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: &str) -> ClientError {
        ClientError::Refused {
            status: reqwest::StatusCode::UNAUTHORIZED,
            code: code.to_owned(),
            message: String::new(),
        }
    }

    #[test]
    fn only_a_revoked_key_stops_the_node() {
        assert_eq!(refusal(&refused("key_revoked")), Refusal::Revoked);
        assert_eq!(refusal(&refused("unknown_node")), Refusal::Unknown);
        // A clock too far off, or a signature the server could not check, is a
        // fault to retry, never a reason to stop running work.
        assert_eq!(refusal(&refused("unauthorized")), Refusal::Other);
        assert_eq!(
            refusal(&ClientError::Unavailable("down".into())),
            Refusal::Other
        );
    }

    #[test]
    fn tails_are_clipped_from_the_front_on_a_character_boundary() {
        let mut s = "ab\u{00e9}cd".to_owned(); // é is two bytes
        clip_front(&mut s, 4);
        assert_eq!(s, "\u{00e9}cd");
        let mut s = "ab\u{00e9}cd".to_owned();
        clip_front(&mut s, 3);
        assert_eq!(s, "cd", "the cut never splits a character");
        let mut s = "xyz".to_owned();
        clip_front(&mut s, 5);
        assert_eq!(s, "xyz");
        // Replacement characters from undecodable bytes take three bytes each.
        let mut lossy = String::from_utf8_lossy(&[0xff; 100]).into_owned();
        clip_front(&mut lossy, 16);
        assert!(lossy.len() <= 16);
        assert_eq!(json_len("a\u{1b}\"b"), 1 + 6 + 2 + 1 + 2);
        assert_eq!(
            serde_json::to_string("a\u{1b}\"b").unwrap().len(),
            json_len("a\u{1b}\"b")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_to_ten_seconds_and_yields_to_shutdown() {
        let (stop, mut shutdown) = watch::channel(false);
        let mut backoff = Backoff::new();
        let started = tokio::time::Instant::now();
        assert!(backoff.wait(&mut shutdown).await);
        let first = started.elapsed();
        assert!(first >= Duration::from_millis(180) && first <= Duration::from_millis(220));
        for _ in 0..10 {
            backoff.wait(&mut shutdown).await;
        }
        assert_eq!(backoff.next, Duration::from_secs(10));
        stop.send(true).unwrap();
        assert!(!backoff.wait(&mut shutdown).await);
    }
}
