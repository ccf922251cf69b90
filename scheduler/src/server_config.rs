//! What a server is started with ([`ServerConfig`]) and why it may fail to start
//! ([`ServerError`]): read by the server itself and by its certificates
//! ([`crate::certs`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aigrid_api::StorageInfo;

use crate::gateway::GatewayConfig;
use crate::http::{self, ApiLimits, MAX_MODEL_BODY_LIMIT};

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
    /// How long the replica's thread polls for more input before it parks
    /// (`aigrid_consensus::NodeConfig::spin`); at most
    /// `aigrid_consensus::MAX_SPIN`, zero parks at once.
    pub raft_spin: Duration,
    /// Control API limits.
    pub limits: ApiLimits,
    /// How long a node may stay silent before it is marked down and its work
    /// rescheduled.
    pub node_ttl: Duration,
    /// How often the leader meters what running allocations hold
    /// ([`crate::state::metering`]): the error of a count is at most this much per
    /// start or stop.
    pub meter_every: Duration,
    /// How often the leader settles circles' use with the farmers
    /// ([`crate::state::treasury`]); on multiples of it since the epoch.
    pub settle_every: Duration,
    /// How long a circle whose treasury is spent keeps its running work before
    /// it is stopped.
    pub treasury_grace: Duration,
    /// How often the leader's autoscaler looks at scaled groups' load
    /// ([`crate::autoscaler`]).
    pub autoscale_every: Duration,
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
            raft_spin: aigrid_consensus::DEFAULT_SPIN,
            limits: ApiLimits::default(),
            node_ttl: crate::worker::WorkerConfig::default().node_ttl,
            meter_every: Duration::from_millis(crate::state::metering::METER_EVERY_MS),
            settle_every: Duration::from_millis(crate::state::treasury::SETTLE_EVERY_MS),
            treasury_grace: Duration::from_millis(crate::state::treasury::GRACE_MS),
            autoscale_every: Duration::from_secs(1),
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
        let max_meter = Duration::from_millis(crate::state::metering::MAX_GAP_MS);
        if self.meter_every < Duration::from_millis(100) || self.meter_every > max_meter {
            return bad(format!(
                "the meter interval must be between 100ms and {}s",
                max_meter.as_secs()
            ));
        }
        if self.settle_every < Duration::from_secs(1)
            || self.settle_every > Duration::from_secs(86_400)
        {
            return bad("the settlement period must be between 1s and 24h".into());
        }
        if self.autoscale_every < Duration::from_millis(100)
            || self.autoscale_every > Duration::from_secs(60)
        {
            return bad("the autoscaler's interval must be between 100ms and 60s".into());
        }
        if self.treasury_grace > Duration::from_secs(30 * 86_400) {
            return bad("the treasury grace period must be at most 30 days".into());
        }
        if self.queue_capacity == 0 || self.limits.max_in_flight == 0 {
            return bad("queue capacity and max in-flight must be at least 1".into());
        }
        if self.raft_spin > aigrid_consensus::MAX_SPIN {
            return bad(format!(
                "the raft spin must be at most {} µs: longer, a replica holds a CPU \
                 through pauses that are not hand-offs",
                aigrid_consensus::MAX_SPIN.as_micros()
            ));
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
