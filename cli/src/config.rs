//! The server roles' configuration: flags (each with an `AIGRID_*` variable) over an
//! optional TOML file over defaults, resolved and checked once before anything
//! starts. Unknown keys in the file are an error.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aigrid_scheduler::server::ServerConfig;
use aigrid_store::backend::BackendConfig;
use anyhow::{anyhow, bail};
use clap::Args;
use serde::Deserialize;

use crate::files::{read_store_file, read_toml};

/// Flags of `aigrid server`; the same names, with `_`, are the keys of its TOML file.
#[derive(Args, Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct ServerArgs {
    /// This server's Raft id (non-zero, unique in the cluster).
    #[arg(long, env = "AIGRID_ID")]
    id: Option<u64>,
    /// Address for the control API and Raft traffic.
    #[arg(long, env = "AIGRID_LISTEN")]
    listen: Option<SocketAddr>,
    /// Address peers use to reach this server (default: the listen address).
    #[arg(long, env = "AIGRID_ADVERTISE")]
    advertise: Option<String>,
    /// Initial voters of a new cluster: `1=host:port,2=host:port,3=host:port`.
    #[arg(long, env = "AIGRID_PEERS")]
    peers: Option<String>,
    /// URL of a server of an existing cluster to join (instead of --peers).
    #[arg(long, env = "AIGRID_JOIN")]
    join: Option<String>,
    /// Directory for the Raft log and snapshots.
    #[arg(long, env = "AIGRID_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// TOML file with any of these settings (flags and variables win).
    #[arg(long, env = "AIGRID_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Length of a Raft tick in milliseconds.
    #[arg(long, env = "AIGRID_TICK_MS")]
    tick_ms: Option<u64>,
    /// Ticks without a leader before an election.
    #[arg(long, env = "AIGRID_ELECTION_TICKS")]
    election_ticks: Option<usize>,
    /// Applied entries between snapshots (log compaction).
    #[arg(long, env = "AIGRID_SNAPSHOT_ENTRIES")]
    snapshot_entries: Option<u64>,
    /// Applied bytes between snapshots.
    #[arg(long, env = "AIGRID_SNAPSHOT_BYTES")]
    snapshot_bytes: Option<u64>,
    /// Entries kept behind a snapshot for lagging followers.
    #[arg(long, env = "AIGRID_COMPACT_KEEP")]
    compact_keep: Option<u64>,
    /// Milliseconds a write may wait for a commit before answering 503.
    #[arg(long, env = "AIGRID_REQUEST_TIMEOUT_MS")]
    request_timeout_ms: Option<u64>,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, env = "AIGRID_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// Largest body of a model registration or locations update in bytes (413
    /// beyond); manifests of large models run to several MiB.
    #[arg(long, env = "AIGRID_MAX_MODEL_BODY_BYTES")]
    max_model_body_bytes: Option<usize>,
    /// Requests served at once (429 beyond).
    #[arg(long, env = "AIGRID_MAX_IN_FLIGHT")]
    max_in_flight: Option<usize>,
    /// Milliseconds a node may go without a heartbeat before it is marked down and
    /// its work rescheduled.
    #[arg(long, env = "AIGRID_NODE_TTL_MS")]
    node_ttl_ms: Option<u64>,
    /// TOML file describing the dispersed store (backends, k, m, policy) this server
    /// tells clients about at `GET /api/v1/storage`; never its credentials. In the
    /// config file, a relative path is relative to that file.
    #[arg(long, env = "AIGRID_STORE")]
    store: Option<PathBuf>,
    /// Seconds between scrub-and-repair rounds over every model while this server
    /// leads and has a store (default 600; 0: never). Credentials come from this
    /// process's environment.
    #[arg(long, env = "AIGRID_REPAIR_INTERVAL_SECS")]
    repair_interval_secs: Option<u64>,
}

/// Flags of `aigrid up`.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// Address for the control API.
    #[arg(long, env = "AIGRID_LISTEN", default_value = "127.0.0.1:7700")]
    pub(crate) listen: SocketAddr,
    /// Data directory (default: `aigrid` under the user's data directory).
    #[arg(long, env = "AIGRID_DATA_DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// Give the embedded agent simulated GPUs instead of NVML, e.g. `2xH100-80GB`.
    #[arg(long, env = "AIGRID_SIMULATE_GPUS")]
    pub(crate) simulate_gpus: Option<String>,
    /// An attribute of the embedded agent's node, `KEY=VALUE` (`country=BE`), that
    /// constraints and spreads match on; repeatable (the variable takes a comma
    /// list), as for `aigrid agent`.
    #[arg(
        long = "attr",
        value_name = "KEY=VALUE",
        env = "AIGRID_ATTRS",
        value_delimiter = ','
    )]
    pub(crate) attr: Vec<String>,
    /// The dispersed store's file (see `aigrid server --store`); default: six local
    /// directories under the data directory standing in for six sites, coded 4+2,
    /// at most one shard of a stripe per site.
    #[arg(long, env = "AIGRID_STORE")]
    pub(crate) store: Option<PathBuf>,
    /// Seconds between scrub-and-repair rounds over every model (0: never).
    #[arg(long, env = "AIGRID_REPAIR_INTERVAL_SECS", default_value_t = 600)]
    pub(crate) repair_interval_secs: u64,
    /// Do not push and deploy the tiny demo model (`tiny-llama`, random weights) that
    /// otherwise answers on `/v1` once its server is ready.
    #[arg(long, env = "AIGRID_NO_DEMO_MODEL")]
    pub(crate) no_demo_model: bool,
}

/// Parses `1=host:port,2=host:port`.
pub fn parse_peers(text: &str) -> anyhow::Result<BTreeMap<u64, String>> {
    let mut peers = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| anyhow!("--peers entry `{part}` must be ID=HOST:PORT"))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| anyhow!("--peers entry `{part}`: `{id}` is not a server id"))?;
        if id == 0 {
            bail!("--peers entry `{part}`: server ids start at 1");
        }
        let addr = addr.trim();
        if addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            bail!("--peers entry `{part}`: `{addr}` is not HOST:PORT");
        }
        if peers.insert(id, addr.to_owned()).is_some() {
            bail!("--peers lists server {id} twice");
        }
    }
    Ok(peers)
}

impl ServerArgs {
    /// Fills every setting the flags left unset from `file`.
    fn or(self, file: ServerArgs) -> ServerArgs {
        ServerArgs {
            id: self.id.or(file.id),
            listen: self.listen.or(file.listen),
            advertise: self.advertise.or(file.advertise),
            peers: self.peers.or(file.peers),
            join: self.join.or(file.join),
            data_dir: self.data_dir.or(file.data_dir),
            config: self.config,
            tick_ms: self.tick_ms.or(file.tick_ms),
            election_ticks: self.election_ticks.or(file.election_ticks),
            snapshot_entries: self.snapshot_entries.or(file.snapshot_entries),
            snapshot_bytes: self.snapshot_bytes.or(file.snapshot_bytes),
            compact_keep: self.compact_keep.or(file.compact_keep),
            request_timeout_ms: self.request_timeout_ms.or(file.request_timeout_ms),
            max_body_bytes: self.max_body_bytes.or(file.max_body_bytes),
            max_model_body_bytes: self.max_model_body_bytes.or(file.max_model_body_bytes),
            max_in_flight: self.max_in_flight.or(file.max_in_flight),
            node_ttl_ms: self.node_ttl_ms.or(file.node_ttl_ms),
            store: self.store.or(file.store),
            repair_interval_secs: self.repair_interval_secs.or(file.repair_interval_secs),
        }
    }

    /// Merges flags over the file over defaults.
    #[cfg(test)]
    fn resolve(self) -> anyhow::Result<(ServerConfig, Option<String>)> {
        self.resolve_all().map(|r| (r.config, r.join))
    }

    /// Merges flags over the file over defaults, with what the server's repair loop
    /// needs besides the scheduler's configuration.
    pub(crate) fn resolve_all(self) -> anyhow::Result<ResolvedServer> {
        let file = match &self.config {
            Some(path) => {
                let mut file: ServerArgs = read_toml(path)?;
                let dir = path.parent().unwrap_or(Path::new(""));
                file.store = file.store.map(|store| dir.join(store));
                file
            }
            None => ServerArgs::default(),
        };
        let args = self.or(file);
        let id = args.id.ok_or_else(|| {
            anyhow!("--id is required (or AIGRID_ID, or `id` in the config file)")
        })?;
        let listen = args
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7700)));
        let data_dir = args
            .data_dir
            .ok_or_else(|| anyhow!("--data-dir is required (or AIGRID_DATA_DIR)"))?;
        let peers = match args.peers {
            Some(text) => parse_peers(&text)?,
            None => BTreeMap::new(),
        };
        let join = args.join;
        if join.is_some() && !peers.is_empty() {
            bail!("--join and --peers exclude each other: a joining server learns its peers");
        }
        let mut config = ServerConfig::new(id, listen, data_dir);
        config.advertise = args.advertise;
        config.peers = peers;
        config.joining = join.is_some();
        if let Some(ms) = args.tick_ms {
            config.tick = Duration::from_millis(ms);
        }
        if let Some(t) = args.election_ticks {
            config.election_ticks = t;
        }
        if let Some(n) = args.snapshot_entries {
            config.snapshot_entries = n;
        }
        if let Some(n) = args.snapshot_bytes {
            config.snapshot_bytes = n;
        }
        if let Some(n) = args.compact_keep {
            config.compact_keep = n;
        }
        if let Some(ms) = args.request_timeout_ms {
            config.request_timeout = Duration::from_millis(ms);
        }
        if let Some(n) = args.max_body_bytes {
            config.limits.max_body_bytes = n;
        }
        if let Some(n) = args.max_model_body_bytes {
            config.limits.max_model_body_bytes = n;
        }
        let mut backends = Vec::new();
        if let Some(path) = &args.store {
            let (info, configs) = read_store_file(path)?;
            config.storage = info;
            backends = configs;
        }
        if let Some(n) = args.max_in_flight {
            config.limits.max_in_flight = n;
        }
        if let Some(ms) = args.node_ttl_ms {
            config.node_ttl = Duration::from_millis(ms);
        }
        config.validate().map_err(|e| anyhow!("{e}"))?;
        Ok(ResolvedServer {
            config,
            join,
            repair_interval: Duration::from_secs(args.repair_interval_secs.unwrap_or(600)),
            backends,
        })
    }
}

/// A server's settings, resolved.
pub(crate) struct ResolvedServer {
    pub(crate) config: ServerConfig,
    /// The cluster to join, if any.
    pub(crate) join: Option<String>,
    /// Between scrub-and-repair rounds (zero: never).
    pub(crate) repair_interval: Duration,
    /// The store's backends, with their settings.
    pub(crate) backends: Vec<BackendConfig>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::tests::STORE;

    #[test]
    fn peers_parse_and_reject() {
        let p = parse_peers("1=127.0.0.1:7701, 2=127.0.0.1:7702").unwrap();
        assert_eq!(p[&2], "127.0.0.1:7702");
        assert!(parse_peers("1=127.0.0.1").is_err());
        assert!(parse_peers("x=127.0.0.1:1").is_err());
        assert!(parse_peers("0=127.0.0.1:1").is_err());
        assert!(parse_peers("1=a:1,1=b:2").is_err());
    }

    #[test]
    fn config_file_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(&path, "id = 2\nbogus = 1\n").unwrap();
        let err = read_toml::<ServerArgs>(&path).unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
        std::fs::write(
            &path,
            "id = 2\ndata_dir = \"/tmp/x\"\nsnapshot_entries = 5\nnode_ttl_ms = 90000\n",
        )
        .unwrap();
        let args = ServerArgs {
            config: Some(path),
            id: Some(3),
            ..Default::default()
        };
        let (config, join) = args.resolve().unwrap();
        assert_eq!(config.id, 3, "flags win over the file");
        assert_eq!(config.snapshot_entries, 5);
        assert_eq!(config.node_ttl, Duration::from_secs(90));
        assert!(join.is_none());
        assert!(!config.storage.is_configured());
    }

    #[test]
    fn the_server_serves_the_store_its_flag_or_file_names() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("store.toml"), STORE).unwrap();
        let config_path = dir.path().join("server.toml");
        std::fs::write(
            &config_path,
            "id = 1\ndata_dir = \"/tmp/x\"\nstore = \"store.toml\"\nmax_model_body_bytes = 1024\n",
        )
        .unwrap();
        let args = ServerArgs {
            config: Some(config_path.clone()),
            ..Default::default()
        };
        let (config, _) = args.resolve().unwrap();
        assert_eq!(
            config.storage.backends.len(),
            3,
            "relative to the config file"
        );
        assert_eq!(config.limits.max_model_body_bytes, 1024);

        std::fs::write(dir.path().join("bad.toml"), STORE.replace("m = 1", "m = 0")).unwrap();
        let args = ServerArgs {
            config: Some(config_path),
            store: Some(dir.path().join("bad.toml")),
            ..Default::default()
        };
        let err = args.resolve().unwrap_err().to_string();
        assert!(
            err.contains("bad.toml") && err.contains("m: must be"),
            "{err}"
        );
    }
}
