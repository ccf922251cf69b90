//! One control-plane server: its Raft replica, its two listeners (the control API
//! and `/v1` gateway; the peer listener, Raft over mutual TLS), its certificate
//! ([`crate::certs`]), and their lifecycle.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aigrid_api::StorageInfo;
use aigrid_consensus::metrics::RaftMetrics;
use aigrid_consensus::transport::PeerLimits;
use aigrid_consensus::{NodeConfig, RaftNode, ReplicaConfig};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::clock::{SharedClock, SystemClock};
use crate::gateway::{Gateway, GatewayConfig};
use crate::http::{self, ApiLimits, MAX_MODEL_BODY_LIMIT};
use crate::listener::ListenerMetrics;
use crate::state::ClusterState;

/// Everything a server needs, validated by [`ServerConfig::validate`] before start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// This server's Raft id (non-zero).
    pub id: u64,
    /// Address the control API listens on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Address of the peer listener (Raft over mutual TLS); `None`: the API's host
    /// and the API's port + 1 (a free port when the API's is 0).
    pub peer_listen: Option<SocketAddr>,
    /// Address peers reach this server's peer listener at; defaults to the bound
    /// peer listen address.
    pub advertise: Option<String>,
    /// The cluster CA's directory: with `ca.key` the server issues its own leaf at
    /// start; without, it must hold `ca.pem`, `server.pem` and `server.key` made for
    /// this server. `None` only for a one-server cluster, which makes its CA under
    /// its data directory at first start.
    pub ca_dir: Option<PathBuf>,
    /// Serve the control API over HTTPS on loopback too (it always is beyond).
    pub api_https: bool,
    /// Serve the control API over plain HTTP beyond loopback (warned at every start).
    pub insecure: bool,
    /// The control API's TLS configuration; `None`: built from this server's leaf when
    /// the API is served over HTTPS (see `api_https`, `insecure`).
    pub api_tls: Option<Arc<rustls::ServerConfig>>,
    /// Initial voters (`id -> peer host:port`) of a new cluster. Empty with `joining` set
    /// for a server that joins an existing cluster; empty otherwise for a one-server
    /// cluster of this server alone.
    pub peers: BTreeMap<u64, String>,
    /// True when this server will be added to an existing cluster and must wait for
    /// the leader's snapshot rather than bootstrap a cluster of its own.
    pub joining: bool,
    /// Where the Raft log and snapshots live.
    pub data_dir: PathBuf,
    /// One Raft tick.
    pub tick: Duration,
    /// Ticks without a leader before an election.
    pub election_ticks: usize,
    /// Applied entries between snapshots.
    pub snapshot_entries: u64,
    /// Applied bytes between snapshots.
    pub snapshot_bytes: u64,
    /// Entries kept behind a snapshot for lagging followers.
    pub compact_keep: u64,
    /// How long a write may wait for a commit before answering 503.
    pub request_timeout: Duration,
    /// Request queue in front of the replica (429 beyond it).
    pub queue_capacity: usize,
    /// Control API limits.
    pub limits: ApiLimits,
    /// How long a node may stay silent before it is marked down and its work
    /// rescheduled.
    pub node_ttl: Duration,
    /// The dispersed store this server tells clients about (`GET /api/v1/storage`);
    /// no backends when it has none.
    pub storage: StorageInfo,
    /// The `/v1` inference gateway's limits and probing.
    pub gateway: GatewayConfig,
    /// The admins of a new cluster and this server's own identity.
    pub access: http::ServerAccess,
}

impl ServerConfig {
    /// A configuration with defaults for everything but identity and storage.
    pub fn new(id: u64, listen: SocketAddr, data_dir: PathBuf) -> Self {
        ServerConfig {
            id,
            listen,
            peer_listen: None,
            advertise: None,
            ca_dir: None,
            api_https: false,
            insecure: false,
            api_tls: None,
            peers: BTreeMap::new(),
            joining: false,
            data_dir,
            tick: Duration::from_millis(100),
            election_ticks: 10,
            // etcd's defaults: a snapshot serialises the whole state, so it is taken
            // rarely, and enough entries stay behind it for followers that lag a bit.
            snapshot_entries: 100_000,
            snapshot_bytes: 64 << 20,
            compact_keep: 5_000,
            request_timeout: Duration::from_secs(10),
            queue_capacity: 65_536,
            limits: ApiLimits::default(),
            node_ttl: crate::worker::WorkerConfig::default().node_ttl,
            storage: StorageInfo::default(),
            gateway: GatewayConfig::default(),
            access: http::ServerAccess::default(),
        }
    }

    /// Checks the configuration as a whole; the message names the offending setting.
    pub fn validate(&self) -> Result<(), ServerError> {
        let bad = |m: String| Err(ServerError::Config(m));
        if self.id == 0 {
            return bad("id must be non-zero".into());
        }
        if !self.peers.is_empty() && !self.peers.contains_key(&self.id) {
            return bad(format!(
                "peers must include this server's own id {} (got ids {:?})",
                self.id,
                self.peers.keys().collect::<Vec<_>>()
            ));
        }
        if self.peer_listen.is_none() && self.listen.port() == u16::MAX {
            return bad(format!(
                "the peer listener defaults to the API port + 1, past {}: pass --peer-listen",
                u16::MAX
            ));
        }
        if self
            .peer_listen
            .is_some_and(|p| p == self.listen && p.port() != 0)
        {
            return bad("the peer listener needs an address of its own".into());
        }
        if self.joining && !self.peers.is_empty() {
            return bad("a joining server takes no peers: the cluster tells it its members".into());
        }
        if self.tick.is_zero() {
            return bad("tick must be positive".into());
        }
        if self.election_ticks < 3 {
            return bad("election ticks must be at least 3".into());
        }
        if self.snapshot_entries == 0 {
            return bad("snapshot entries must be at least 1".into());
        }
        if self.node_ttl < Duration::from_secs(1) {
            return bad("node TTL must be at least 1s".into());
        }
        if self.queue_capacity == 0 || self.limits.max_in_flight == 0 {
            return bad("queue capacity and max in-flight must be at least 1".into());
        }
        if self.limits.max_model_uploads == 0 {
            return bad("max model uploads must be at least 1".into());
        }
        if self.limits.max_model_body_bytes > MAX_MODEL_BODY_LIMIT {
            return bad(format!(
                "max model body bytes must be at most {MAX_MODEL_BODY_LIMIT}: a model write \
                 becomes one Raft entry"
            ));
        }
        if let Err(e) = self.gateway.validate() {
            return bad(e);
        }
        if let Err(e) = self.limits.listener.validate() {
            return bad(e);
        }
        if self.limits.rate_per_second > 0 && self.limits.rate_burst == 0 {
            return bad("rate burst must be at least 1 when a rate is set".into());
        }
        if self.storage != StorageInfo::default() {
            if let Err(e) = self.storage.validate() {
                return bad(format!("store: {e}"));
            }
        }
        Ok(())
    }
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The Raft replica could not start (log unreadable, locked by another process...).
    #[error("cannot start the raft replica: {0}")]
    Raft(#[from] aigrid_consensus::replica::ReplicaError),
    /// Metrics registration failed.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The inference gateway could not be set up.
    #[error(transparent)]
    Gateway(#[from] crate::gateway::GatewayBuildError),
    /// The server's certificates could not be made or read.
    #[error("certificates: {0}")]
    Tls(String),
}

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
            },
            ClusterState::default().with_events(watch.clone()),
            metrics,
        )?;
        crate::metrics::register_state(&registry, raft.clone())?;
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
        let gateway = Arc::new(Gateway::new(raft.clone(), &registry, gateway_config)?);
        let app = http::router(
            raft.clone(),
            registry,
            &config.limits,
            agents.clone(),
            config.storage.clone(),
            gateway.clone(),
            clock.clone(),
            config.access.clone(),
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
        let http = tokio::spawn(crate::listener::serve(
            listener,
            app,
            config.limits.listener.clone(),
            api_tls,
            listener_metrics,
            shutdown.subscribe(),
        ));
        Ok(Server {
            addr,
            peer_addr,
            identity,
            https,
            peers,
            raft,
            gateway,
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
