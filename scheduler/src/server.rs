//! One control-plane server: its Raft replica, its two listeners (the control API
//! and `/v1` gateway; the peer listener, Raft over mutual TLS), its certificate
//! ([`crate::certs`]), and their lifecycle.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aigrid_consensus::metrics::RaftMetrics;
use aigrid_consensus::transport::PeerLimits;
use aigrid_consensus::{NodeConfig, RaftNode, ReplicaConfig};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::clock::{SharedClock, SystemClock};
use crate::gateway::Gateway;
use crate::http;
use crate::listener::ListenerMetrics;
use crate::state::ClusterState;

pub use crate::server_config::{ServerConfig, ServerError};

/// A started server.
pub struct Server {
    /// The address its control API listens on.
    pub addr: SocketAddr,
    /// The address its peer listener listens on.
    pub peer_addr: SocketAddr,
    /// Its certificate, naming its id, from the cluster CA.
    pub identity: Arc<aigrid_tls::ServerIdentity>,
    /// True when the control API is served over HTTPS.
    pub https: bool,
    /// Its replica.
    pub raft: RaftNode<ClusterState>,
    /// Its `/v1` inference gateway.
    pub gateway: Arc<Gateway>,
    /// What its `/metrics` exports; the process's own loops (repairs) add theirs.
    pub registry: Registry,
    http: JoinHandle<std::io::Result<()>>,
    peers: JoinHandle<std::io::Result<()>>,
    shutdown: tokio::sync::watch::Sender<bool>,
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServerError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServerError::Bind { addr, source })?;
    Ok((listener, bound))
}

impl Server {
    /// Binds the listener, opens the log, starts the replica and serves HTTP, on
    /// the machine's clock.
    pub async fn start(config: ServerConfig) -> Result<Self, ServerError> {
        Self::start_with_clock(config, Arc::new(SystemClock)).await
    }

    /// As [`Server::start`], reading time from `clock`: every timestamp the
    /// server writes into a command comes from it.
    pub async fn start_with_clock(
        config: ServerConfig,
        clock: SharedClock,
    ) -> Result<Self, ServerError> {
        config.validate()?;
        let (listener, addr) = bind(config.listen).await?;
        let peer_listen = config.peer_listen.unwrap_or_else(|| {
            let port = if config.listen.port() == 0 {
                0
            } else {
                addr.port() + 1
            };
            SocketAddr::new(addr.ip(), port)
        });
        let (peer_listener, peer_addr) = bind(peer_listen).await?;
        let advertise = config
            .advertise
            .clone()
            .unwrap_or_else(|| peer_addr.to_string());
        let hosts = crate::certs::leaf_hosts(&config, addr, peer_addr);
        let identity = Arc::new(crate::certs::server_identity(&config, &hosts)?);
        let node_issuer = crate::certs::node_issuer(&config)?.map(Arc::new);
        let api_tls = match &config.api_tls {
            Some(tls) => Some(tls.clone()),
            None if crate::certs::api_wants_tls(&config, addr.ip()) => Some(
                identity
                    .api_server_config()
                    .map_err(|e| ServerError::Tls(e.to_string()))?,
            ),
            None => None,
        };
        if api_tls.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(
                %addr,
                "the control API is served over plain HTTP beyond loopback (--insecure): \
                 requests and their credentials cross the network readable by anyone on it"
            );
        }
        let initial_members = if !config.peers.is_empty() {
            config.peers.clone()
        } else if config.joining {
            BTreeMap::new()
        } else {
            BTreeMap::from([(config.id, advertise.clone())])
        };
        let registry = Registry::new();
        let metrics = std::sync::Arc::new(RaftMetrics::register(&registry)?);
        let listener_metrics = ListenerMetrics::register(&registry)?;
        let watch = Arc::new(crate::hub::NodeWatch::default());
        let raft = RaftNode::start(
            NodeConfig {
                replica: ReplicaConfig {
                    id: config.id,
                    election_tick: config.election_ticks,
                    heartbeat_tick: (config.election_ticks / 5).max(1),
                    snapshot_entries: config.snapshot_entries,
                    snapshot_bytes: config.snapshot_bytes,
                    compact_keep: config.compact_keep,
                    ..ReplicaConfig::default()
                },
                tick: config.tick,
                data_dir: config.data_dir.clone(),
                identity: identity.clone(),
                initial_members,
                request_timeout: config.request_timeout,
                queue_capacity: config.queue_capacity,
                spin: config.raft_spin,
            },
            ClusterState::default().with_events(watch.clone()),
            metrics,
        )?;
        crate::metrics::register_state(&registry, raft.clone())?;
        crate::metrics::register_chain(&registry, raft.clone())?;
        crate::metrics::register_rollouts(&registry, raft.clone())?;
        crate::metrics::register_store(&registry, raft.clone())?;
        crate::metrics::register_usage(&registry, raft.clone())?;
        let worker_metrics = crate::metrics::WorkerMetrics::register(&registry)?;
        let agents = std::sync::Arc::new(crate::hub::AgentHub::new(
            &raft,
            &registry,
            config.limits.max_long_polls,
            watch,
        )?);
        // Beyond loopback, `/v1` takes circles' API keys only.
        let mut gateway_config = config.gateway.clone();
        gateway_config.require_api_key |= !config.listen.ip().is_loopback();
        let gateway = Arc::new(
            Gateway::new(raft.clone(), &registry, gateway_config)?.with_clock(clock.clone()),
        );
        let autoscaler_metrics = crate::autoscaler::AutoscalerMetrics::register(&registry)?;
        let app = http::router(
            raft.clone(),
            registry.clone(),
            &config.limits,
            agents.clone(),
            config.storage.clone(),
            gateway.clone(),
            clock.clone(),
            http::ServerAccess {
                node_issuer,
                ..config.access.clone()
            },
        )?;
        let (shutdown, _) = tokio::sync::watch::channel(false);
        let max_entry = config
            .limits
            .max_model_body_bytes
            .max(config.limits.max_body_bytes);
        let peers = {
            let mut stop = shutdown.subscribe();
            raft.serve_peers(
                peer_listener,
                PeerLimits::for_entries(max_entry + max_entry / 4 + (64 << 10)),
                async move {
                    let _ = stop.wait_for(|stop| *stop).await;
                },
            )
        };
        tokio::spawn(gateway.clone().run(shutdown.subscribe()));
        tokio::spawn(bootstrap_admins(
            raft.clone(),
            config.access.admins.clone(),
            clock.clone(),
            shutdown.subscribe(),
        ));
        tokio::spawn(keep_chain(
            raft.clone(),
            clock.clone(),
            shutdown.subscribe(),
        ));
        tokio::spawn(meter(
            raft.clone(),
            clock.clone(),
            config.meter_every,
            shutdown.subscribe(),
        ));
        tokio::spawn(settle(
            raft.clone(),
            clock.clone(),
            config.settle_every,
            config.treasury_grace,
            shutdown.subscribe(),
        ));
        tokio::spawn(crate::autoscaler::run(
            raft.clone(),
            gateway.clone(),
            clock.clone(),
            autoscaler_metrics,
            config.autoscale_every,
            shutdown.subscribe(),
        ));
        tokio::spawn(crate::rollouts::watch(
            raft.clone(),
            gateway.clone(),
            clock.clone(),
            shutdown.subscribe(),
        ));
        // Plain heartbeats reach the log a few times per TTL, so a node's
        // `last_seen` lags its last heartbeat by a small part of the TTL.
        let flush_every = config
            .limits
            .seen_flush
            .min(config.node_ttl / 6)
            .max(Duration::from_millis(50));
        tokio::spawn(crate::hub::run_flusher(
            raft.clone(),
            agents,
            flush_every,
            shutdown.subscribe(),
        ));
        let worker = crate::worker::WorkerConfig {
            node_ttl: config.node_ttl,
            ..crate::worker::WorkerConfig::default()
        };
        tokio::spawn(crate::worker::run(
            raft.clone(),
            worker,
            worker_metrics,
            clock,
            shutdown.subscribe(),
        ));
        let https = api_tls.is_some();
        // Connections are served on the replica's thread, and there the control
        // API's small writes are handled: see `http::handled_on_the_replica`.
        let placement = {
            let raft = raft.clone();
            crate::listener::Placement {
                connections: Arc::new(move || (!raft.is_stopped()).then(|| raft.runtime_handle())),
                here: http::handled_on_the_replica,
            }
        };
        let http = tokio::spawn(crate::listener::serve_placed(
            listener,
            app,
            config.limits.listener.clone(),
            api_tls,
            listener_metrics,
            shutdown.subscribe(),
            Some(placement),
        ));
        Ok(Server {
            addr,
            peer_addr,
            identity,
            https,
            peers,
            raft,
            gateway,
            registry,
            http,
            shutdown,
        })
    }

    /// Serves until `signal` completes, then stops HTTP and the replica.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) {
        signal.await;
        self.stop().await;
    }

    /// The control API's base URL (`https://` when served over TLS); a wildcard listen
    /// address reads as loopback.
    pub fn url(&self) -> String {
        let mut addr = self.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{addr}")
    }

    /// Stops serving and shuts the replica down.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.http).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.peers).await;
        let raft = self.raft.clone();
        let _ = tokio::task::spawn_blocking(move || raft.shutdown()).await;
    }
}

/// While the cluster has no admin, the leader among servers started with `--admin`
/// proposes them (an idempotent command: the first one committed wins, later ones
/// change nothing). Stops once the cluster has an admin.
async fn bootstrap_admins(
    raft: RaftNode<ClusterState>,
    admins: Vec<(String, aigrid_api::PublicKey)>,
    clock: SharedClock,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    if admins.is_empty() {
        return;
    }
    loop {
        if raft.read_local(|s| s.has_admin()) {
            return;
        }
        let status = raft.status();
        if status.leader == Some(status.id) {
            let command = crate::state::Command::BootstrapAdmins {
                admins: admins.clone(),
                at: clock.now(),
            };
            if let Err(e) = raft.propose(&command).await {
                tracing::debug!(error = %e, "proposing the bootstrap admins");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Every `pause` until `stop`, while this server leads: proposes the command
/// `due` makes of the moment, if it makes one. Every command proposed this way
/// is idempotent, so a leader that loses its place mid-way leaves nothing half
/// done and the next one picks up from what the state holds. `what` names the
/// work in the log.
async fn while_leading(
    raft: RaftNode<ClusterState>,
    pause: Duration,
    what: &str,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut due: impl FnMut(&RaftNode<ClusterState>) -> Option<crate::state::Command>,
) {
    loop {
        let status = raft.status();
        if status.leader == Some(status.id) {
            if let Some(command) = due(&raft) {
                if let Err(e) = raft.propose(&command).await {
                    tracing::debug!(error = %e, "{what}");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The leader's part in the Human Chain: names the cluster once (a random id that
/// every approval digest carries, and the seed of the audit key its checkpoints are
/// signed with), and settles proposals when some are due (expired, or approved and
/// past their minimum window).
async fn keep_chain(
    raft: RaftNode<ClusterState>,
    clock: SharedClock,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let pause = Duration::from_millis(250);
    while_leading(raft, pause, "keeping the Human Chain", stop, |raft| {
        let now = clock.now();
        let (named, due) = raft.read_local(|s| (!s.cluster_id().is_empty(), s.proposals_due(now)));
        if !named {
            let seed: [u8; 32] = crate::random_bytes();
            Some(crate::state::Command::InitCluster {
                cluster_id: crate::new_uuid().simple().to_string(),
                audit_seed: hex::encode(seed),
                at: now,
            })
        } else if due {
            Some(crate::state::Command::SettleProposals { at: now })
        } else {
            None
        }
    })
    .await;
}

/// The leader's meter: commits a [`crate::state::Command::Meter`] whenever `every`
/// has passed since the last one the state holds.
async fn meter(
    raft: RaftNode<ClusterState>,
    clock: SharedClock,
    every: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let every_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
    let pause = every.min(Duration::from_millis(500)) / 2;
    while_leading(raft, pause, "metering", stop, |raft| {
        let now = clock.now();
        let last = raft.read_local(ClusterState::metered_until);
        last.is_none_or(|l| now.as_millis() >= l.as_millis().saturating_add(every_ms))
            .then_some(crate::state::Command::Meter { at: now })
    })
    .await;
}

/// The leader's settlement: commits a [`crate::state::Command::Settle`] whenever
/// the clock crosses into a new settlement period (every `every` since the epoch,
/// so settlements fall on whole hours by default) or a spent circle's `grace`
/// ended.
async fn settle(
    raft: RaftNode<ClusterState>,
    clock: SharedClock,
    every: Duration,
    grace: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let every_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX).max(1);
    let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
    let pause = every.min(Duration::from_millis(1_000)) / 2;
    while_leading(raft, pause, "settling", stop, |raft| {
        let now = clock.now();
        let (last, grace_over) =
            raft.read_local(|s: &ClusterState| (s.settled_until(), s.grace_over(now, grace_ms)));
        let period_ended =
            last.is_none_or(|l| now.as_millis() / every_ms > l.as_millis() / every_ms);
        (period_ended || grace_over).then_some(crate::state::Command::Settle { at: now, grace_ms })
    })
    .await;
}
