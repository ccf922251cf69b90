//! The server roles' configuration: flags over their `AIGRID_*` variables over an
//! optional TOML file over defaults ([`crate::layers`]), resolved and checked once
//! before anything starts. Unknown keys in the file are an error.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use aigrid_scheduler::server::ServerConfig;
use aigrid_store::backend::BackendConfig;
use anyhow::{anyhow, bail};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::files::read_store_file;
use crate::layers::{process_env, Layers};

/// Where a server or `up` listens when nothing says otherwise.
const DEFAULT_LISTEN: ([u8; 4], u16) = ([127, 0, 0, 1], 7700);

/// Seconds between scrub-and-repair rounds when nothing says otherwise.
const DEFAULT_REPAIR_INTERVAL_SECS: u64 = 600;

/// Flags of `aigrid server`; the same names, with `_`, are the keys of its TOML file,
/// and upper-cased after `AIGRID_`, its variables.
#[derive(Args, Serialize, Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct ServerArgs {
    /// This server's Raft id (non-zero, unique in the cluster).
    #[arg(long)]
    id: Option<u64>,
    /// Address for the control API (and the `/v1` gateway): HTTPS with this
    /// server's certificate beyond loopback, plain HTTP on loopback unless --api-tls.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address of the peer listener, where Raft runs over mutual TLS with the
    /// cluster CA (default: the --listen host and the --listen port + 1; port 0
    /// picks a free port).
    #[arg(long)]
    peer_listen: Option<SocketAddr>,
    /// Address peers reach this server's peer listener at (default: the peer listen
    /// address).
    #[arg(long)]
    advertise: Option<String>,
    /// Initial voters of a new cluster, at their peer listeners:
    /// `1=host:port,2=host:port,3=host:port`.
    #[arg(long)]
    peers: Option<String>,
    /// The cluster CA's directory (`aigrid ca init --dir DIR`). Holding `ca.key`, the
    /// server issues its own certificate (its id, its hosts) into its data dir at
    /// start; otherwise it must hold `ca.pem`, `server.pem` and `server.key` made for
    /// this server (`aigrid ca issue`). Needed by every server of a cluster of
    /// several; a one-server cluster without it makes its CA in its data dir.
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// Serve the control API over HTTPS on loopback too.
    #[arg(long)]
    #[serde(default)]
    api_tls: bool,
    /// Serve the control API over plain HTTP even beyond loopback, readable by anyone
    /// on the network (warned at every start). Raft keeps mutual TLS.
    #[arg(long)]
    #[serde(default)]
    insecure: bool,
    /// URL of a server of an existing cluster to join (instead of --peers); the join
    /// is signed with the operator's identity (--identity), which must be an admin's.
    #[arg(long)]
    join: Option<String>,
    /// An admin of a new cluster: `PUBLIC_KEY` or `NAME=PUBLIC_KEY` (`aigrid key
    /// show` prints one); repeatable or comma-separated. Used only while the cluster
    /// has no admin; later, `aigrid identity` manages them.
    #[arg(
        long = "admin",
        value_name = "[NAME=]PUBLIC_KEY",
        value_delimiter = ','
    )]
    #[serde(default)]
    admin: Vec<String>,
    /// Directory for the Raft log and snapshots.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// TOML file with any of these settings (flags and variables win).
    #[arg(long, env = "AIGRID_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Length of a Raft tick in milliseconds.
    #[arg(long)]
    tick_ms: Option<u64>,
    /// Ticks without a leader before an election.
    #[arg(long)]
    election_ticks: Option<usize>,
    /// Applied entries between snapshots (log compaction).
    #[arg(long)]
    snapshot_entries: Option<u64>,
    /// Applied bytes between snapshots.
    #[arg(long)]
    snapshot_bytes: Option<u64>,
    /// Entries kept behind a snapshot for lagging followers.
    #[arg(long)]
    compact_keep: Option<u64>,
    /// Milliseconds a write may wait for a commit before answering 503.
    #[arg(long)]
    request_timeout_ms: Option<u64>,
    /// Microseconds the Raft thread keeps polling for the next message after one
    /// arrived, before it sleeps, while messages keep coming (default 1000, and
    /// at most 500 after a message that came alone; 0 sleeps at once; at most
    /// 10000).
    /// Polling spares each hand-off of a write a wake-up of a sleeping CPU, at the
    /// cost of up to this much CPU after the last message.
    #[arg(long)]
    raft_spin_us: Option<u64>,
    /// Largest request body in bytes (413 beyond).
    #[arg(long)]
    max_body_bytes: Option<usize>,
    /// Largest body of a model registration or locations update in bytes (413
    /// beyond); manifests of large models run to several MiB.
    #[arg(long)]
    max_model_body_bytes: Option<usize>,
    /// Requests served at once (429 beyond).
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// Milliseconds a node may go without a heartbeat before it is marked down and
    /// its work rescheduled.
    #[arg(long)]
    node_ttl_ms: Option<u64>,
    /// Milliseconds between the leader's meters of what running allocations hold
    /// (default 10000; 100 to 60000).
    #[arg(long)]
    meter_every_ms: Option<u64>,
    /// Milliseconds between the leader's settlements of circles' use with the
    /// farmers, on multiples since the epoch (default 3600000: on the hour; 1000
    /// to 86400000).
    #[arg(long)]
    settle_every_ms: Option<u64>,
    /// Milliseconds a circle whose treasury is spent keeps its running work before
    /// it is stopped (default 3600000; at most 30 days).
    #[arg(long)]
    treasury_grace_ms: Option<u64>,
    /// Milliseconds between the leader's looks at scaled groups' load (default
    /// 1000; 100 to 60000).
    #[arg(long)]
    autoscale_every_ms: Option<u64>,
    /// Seconds a request for a scaled model with no ready replica waits for one
    /// before 503 with Retry-After (default 60).
    #[arg(long)]
    gateway_hold_timeout_secs: Option<u64>,
    /// Requests this server's gateway holds at once for models to scale up
    /// (default 256; 429 beyond).
    #[arg(long)]
    gateway_max_held: Option<usize>,
    /// TOML file describing the dispersed store (backends, k, m, policy) this server
    /// tells clients about at `GET /api/v1/storage`; never its credentials. In the
    /// config file, a relative path is relative to that file.
    #[arg(long)]
    store: Option<PathBuf>,
    /// Seconds between scrub-and-repair rounds over every model while this server
    /// leads and has a store (default 600; 0: never). Credentials come from this
    /// process's environment.
    #[arg(long)]
    repair_interval_secs: Option<u64>,
}

/// Flags of `aigrid up`; as for `aigrid server`, the same names are the keys of its
/// TOML file and, upper-cased after `AIGRID_`, its variables.
#[derive(Args, Serialize, Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct UpArgs {
    /// Address for the control API (default 127.0.0.1:7700).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory (default: `aigrid` under the user's data directory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Give the embedded agent simulated GPUs instead of NVML, e.g. `2xH100-80GB`.
    #[arg(long)]
    simulate_gpus: Option<String>,
    /// An attribute of the embedded agent's node, `KEY=VALUE` (`country=BE`), that
    /// constraints and spreads match on; repeatable (`AIGRID_ATTRS` takes a comma
    /// list), as for `aigrid agent`.
    #[arg(long = "attr", value_name = "KEY=VALUE", value_delimiter = ',')]
    #[serde(default)]
    attr: Vec<String>,
    /// What circles' treasuries pay per hour of the embedded agent's work, as for
    /// `aigrid agent --price` (`gpu.*=2,cpu=0.04`); free without it.
    #[arg(long, value_name = "PRICES")]
    price: Option<String>,
    /// The farmer paid for the embedded agent's work, as for `aigrid agent
    /// --farmer`; the node's own account without it.
    #[arg(long, value_name = "IDENTITY")]
    farmer: Option<String>,
    /// The dispersed store's file (see `aigrid server --store`); default: six local
    /// directories under the data directory standing in for six sites, coded 4+2,
    /// at most one shard of a stripe per site. In the config file, a relative path
    /// is relative to that file.
    #[arg(long)]
    store: Option<PathBuf>,
    /// Seconds between scrub-and-repair rounds over every model (default 600; 0:
    /// never).
    #[arg(long)]
    repair_interval_secs: Option<u64>,
    /// Do not push and deploy the tiny demo model (`tiny-llama`, random weights) that
    /// otherwise answers on `/v1` once its server is ready.
    #[arg(long)]
    #[serde(default)]
    no_demo_model: bool,
    /// TOML file with any of these settings (flags and variables win).
    #[arg(long, env = "AIGRID_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
}

/// `aigrid up`'s settings, resolved and checked.
#[derive(Debug)]
pub(crate) struct Up {
    pub(crate) listen: SocketAddr,
    /// `None`: the user's data directory, found when `up` starts.
    pub(crate) data_dir: Option<PathBuf>,
    pub(crate) simulate_gpus: Option<String>,
    pub(crate) attributes: BTreeMap<String, String>,
    /// The embedded agent's prices and farmer.
    pub(crate) offer: Option<aigrid_api::NodeOffer>,
    pub(crate) store: Option<PathBuf>,
    /// Between scrub-and-repair rounds (zero: never).
    pub(crate) repair_interval: Duration,
    pub(crate) no_demo_model: bool,
}

impl UpArgs {
    /// The flags over this process's variables over the file over the defaults.
    pub(crate) fn resolve(self) -> anyhow::Result<Up> {
        self.resolve_in(&process_env::<UpArgs>()?)
    }

    /// The flags over the variables in `env` over the file over the defaults.
    fn resolve_in(self, env: &[(String, String)]) -> anyhow::Result<Up> {
        let layers = Layers::new(&self, env, self.config.as_deref());
        let args: UpArgs = layers.extract()?;
        if let Some(spec) = &args.simulate_gpus {
            aigrid_agent::simulated::parse(spec, "check")?;
        }
        Ok(Up {
            listen: args.listen.unwrap_or_else(|| DEFAULT_LISTEN.into()),
            data_dir: args.data_dir,
            simulate_gpus: args.simulate_gpus,
            attributes: crate::agent::parse_attrs(&args.attr)?,
            offer: crate::agent::offer(args.price.as_deref(), args.farmer.as_deref())?,
            store: args.store.map(|path| layers.path("store", path)),
            repair_interval: Duration::from_secs(
                args.repair_interval_secs
                    .unwrap_or(DEFAULT_REPAIR_INTERVAL_SECS),
            ),
            no_demo_model: args.no_demo_model,
        })
    }
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

/// `--admin` values: `PUBLIC_KEY` or `NAME=PUBLIC_KEY`.
fn parse_admins(values: &[String]) -> anyhow::Result<Vec<(String, aigrid_api::PublicKey)>> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let (name, key) = match v.split_once('=') {
                // A base64url key has no `=`; a name is before the first one.
                Some((name, key)) if !name.contains(':') => (name.to_owned(), key),
                _ => (format!("admin-{}", i + 1), v.as_str()),
            };
            let key = key.parse().map_err(|e| anyhow!("--admin `{v}`: {e}"))?;
            Ok((name, key))
        })
        .collect()
}

impl ServerArgs {
    /// The flags over this process's variables over the file over the defaults, with
    /// what the server's repair loop needs besides the scheduler's configuration.
    pub(crate) fn resolve(self) -> anyhow::Result<ResolvedServer> {
        self.resolve_in(&process_env::<ServerArgs>()?)
    }

    /// The flags over the variables in `env` over the file over the defaults.
    fn resolve_in(self, env: &[(String, String)]) -> anyhow::Result<ResolvedServer> {
        let layers = Layers::new(&self, env, self.config.as_deref());
        let args: ServerArgs = layers.extract()?;
        let id = args.id.ok_or_else(|| {
            anyhow!("--id is required (or AIGRID_ID, or `id` in the config file)")
        })?;
        let listen = args.listen.unwrap_or_else(|| DEFAULT_LISTEN.into());
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
        config.peer_listen = args.peer_listen;
        config.advertise = args.advertise;
        config.ca_dir = args.ca_dir.map(|dir| layers.path("ca_dir", dir));
        config.api_https = args.api_tls;
        config.insecure = args.insecure;
        config.peers = peers;
        config.joining = join.is_some();
        config.access.admins = parse_admins(&args.admin)?;
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
        if let Some(us) = args.raft_spin_us {
            config.raft_spin = Duration::from_micros(us);
        }
        if let Some(n) = args.max_body_bytes {
            config.limits.max_body_bytes = n;
        }
        if let Some(n) = args.max_model_body_bytes {
            config.limits.max_model_body_bytes = n;
        }
        let mut backends = Vec::new();
        if let Some(path) = args.store {
            let (info, configs) = read_store_file(&layers.path("store", path))?;
            config.storage = info;
            backends = configs;
        }
        if let Some(n) = args.max_in_flight {
            config.limits.max_in_flight = n;
        }
        if let Some(ms) = args.node_ttl_ms {
            config.node_ttl = Duration::from_millis(ms);
        }
        if let Some(ms) = args.meter_every_ms {
            config.meter_every = Duration::from_millis(ms);
        }
        if let Some(ms) = args.settle_every_ms {
            config.settle_every = Duration::from_millis(ms);
        }
        if let Some(ms) = args.treasury_grace_ms {
            config.treasury_grace = Duration::from_millis(ms);
        }
        if let Some(ms) = args.autoscale_every_ms {
            config.autoscale_every = Duration::from_millis(ms);
        }
        if let Some(secs) = args.gateway_hold_timeout_secs {
            config.gateway.hold_timeout = Duration::from_secs(secs);
        }
        if let Some(n) = args.gateway_max_held {
            config.gateway.max_held = n;
        }
        config.validate().map_err(|e| anyhow!("{e}"))?;
        Ok(ResolvedServer {
            config,
            join,
            repair_interval: Duration::from_secs(
                args.repair_interval_secs
                    .unwrap_or(DEFAULT_REPAIR_INTERVAL_SECS),
            ),
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
    use crate::layers::tests::env;

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
    fn the_roles_read_the_variables_they_always_did() {
        use crate::layers::variables;
        let server = [
            "ID",
            "LISTEN",
            "PEER_LISTEN",
            "ADVERTISE",
            "PEERS",
            "CA_DIR",
            "API_TLS",
            "INSECURE",
            "JOIN",
            "ADMINS",
            "DATA_DIR",
            "TICK_MS",
            "ELECTION_TICKS",
            "SNAPSHOT_ENTRIES",
            "SNAPSHOT_BYTES",
            "COMPACT_KEEP",
            "REQUEST_TIMEOUT_MS",
            "RAFT_SPIN_US",
            "MAX_BODY_BYTES",
            "MAX_MODEL_BODY_BYTES",
            "MAX_IN_FLIGHT",
            "NODE_TTL_MS",
            "METER_EVERY_MS",
            "SETTLE_EVERY_MS",
            "TREASURY_GRACE_MS",
            "AUTOSCALE_EVERY_MS",
            "GATEWAY_HOLD_TIMEOUT_SECS",
            "GATEWAY_MAX_HELD",
            "STORE",
            "REPAIR_INTERVAL_SECS",
        ];
        let up = [
            "LISTEN",
            "DATA_DIR",
            "SIMULATE_GPUS",
            "ATTRS",
            "PRICE",
            "FARMER",
            "STORE",
            "REPAIR_INTERVAL_SECS",
            "NO_DEMO_MODEL",
        ];
        let named = |names: &[&str]| -> Vec<String> {
            names.iter().map(|n| format!("AIGRID_{n}")).collect()
        };
        assert_eq!(variables::<ServerArgs>(), named(&server));
        assert_eq!(variables::<UpArgs>(), named(&up));
    }

    #[test]
    fn the_raft_spin_defaults_can_be_turned_off_and_has_a_ceiling() {
        let resolve = |spin: Option<u64>| {
            ServerArgs {
                id: Some(1),
                data_dir: Some("/tmp/x".into()),
                raft_spin_us: spin,
                ..Default::default()
            }
            .resolve_in(&[])
            .map(|resolved| resolved.config)
        };
        assert_eq!(
            resolve(None).unwrap().raft_spin,
            aigrid_consensus::DEFAULT_SPIN
        );
        assert_eq!(resolve(Some(0)).unwrap().raft_spin, Duration::ZERO);
        let ceiling = aigrid_consensus::MAX_SPIN.as_micros() as u64;
        assert_eq!(
            resolve(Some(ceiling)).unwrap().raft_spin,
            aigrid_consensus::MAX_SPIN
        );
        let err = resolve(Some(ceiling + 1)).unwrap_err().to_string();
        assert!(err.contains("raft spin must be at most 10000 µs"), "{err}");
    }

    #[test]
    fn a_server_flag_beats_its_variable_beats_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(
            &path,
            "id = 1\ndata_dir = \"/tmp/x\"\nsnapshot_entries = 5\nnode_ttl_ms = 90000\ntick_ms = 50\n",
        )
        .unwrap();
        let vars = env(&[
            ("AIGRID_ID", "2"),
            ("AIGRID_TICK_MS", "70"),
            ("AIGRID_NODE_TTL_MS", "60000"),
        ]);
        let args = ServerArgs {
            config: Some(path.clone()),
            id: Some(3),
            tick_ms: Some(80),
            ..Default::default()
        };
        let config = args.resolve_in(&vars).unwrap().config;
        assert_eq!(config.id, 3, "the flag beats the variable and the file");
        assert_eq!(config.tick, Duration::from_millis(80));
        assert_eq!(
            config.node_ttl,
            Duration::from_secs(60),
            "the variable beats the file"
        );
        assert_eq!(config.snapshot_entries, 5, "the file fills the rest");
        assert_eq!(
            config.listen,
            SocketAddr::from(DEFAULT_LISTEN),
            "then defaults"
        );

        let args = ServerArgs {
            config: Some(path),
            ..Default::default()
        };
        let resolved = args.resolve_in(&[]).unwrap();
        assert_eq!(resolved.config.id, 1);
        assert_eq!(resolved.config.tick, Duration::from_millis(50));
        assert!(resolved.join.is_none());
        assert!(!resolved.config.storage.is_configured());
    }

    #[test]
    fn the_peer_listener_and_the_ca_come_from_the_same_layers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(
            &path,
            "id = 1\ndata_dir = \"/tmp/x\"\nca_dir = \"ca\"\npeer_listen = \"127.0.0.1:7801\"\n",
        )
        .unwrap();
        let args = ServerArgs {
            config: Some(path.clone()),
            ..Default::default()
        };
        let config = args
            .resolve_in(&env(&[("AIGRID_INSECURE", "1")]))
            .unwrap()
            .config;
        assert_eq!(
            config.ca_dir,
            Some(dir.path().join("ca")),
            "relative to the file"
        );
        assert_eq!(config.peer_listen, Some("127.0.0.1:7801".parse().unwrap()));
        assert!(config.insecure && !config.api_https);
        let args = ServerArgs {
            id: Some(1),
            data_dir: Some("/tmp/x".into()),
            ca_dir: Some("/etc/aigrid/ca".into()),
            api_tls: true,
            ..Default::default()
        };
        let config = args.resolve_in(&[]).unwrap().config;
        assert_eq!(config.ca_dir, Some(PathBuf::from("/etc/aigrid/ca")));
        assert!(config.api_https);
    }

    #[test]
    fn config_file_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(&path, "id = 2\nbogus = 1\n").unwrap();
        let args = ServerArgs {
            config: Some(path.clone()),
            ..Default::default()
        };
        let err = args.resolve_in(&[]).err().unwrap().to_string();
        assert!(
            err.starts_with(&format!(
                "config file {}: unknown key `bogus`",
                path.display()
            )),
            "{err}"
        );
        std::fs::write(&path, "listen = 7\n").unwrap();
        let args = ServerArgs {
            config: Some(path),
            id: Some(1),
            ..Default::default()
        };
        let err = args.resolve_in(&[]).err().unwrap().to_string();
        assert!(err.contains("key `listen`"), "{err}");
    }

    #[test]
    fn up_reads_the_same_layers() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("store.toml"), STORE).unwrap();
        let path = dir.path().join("up.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:7801\"\nstore = \"store.toml\"\nattr = [\"site=a\"]\nrepair_interval_secs = 5\n",
        )
        .unwrap();
        let flags = UpArgs {
            config: Some(path.clone()),
            listen: Some("127.0.0.1:7803".parse().unwrap()),
            ..UpArgs::default()
        };
        let vars = env(&[
            ("AIGRID_LISTEN", "127.0.0.1:7802"),
            ("AIGRID_NO_DEMO_MODEL", "1"),
            ("AIGRID_ATTRS", "site=b,country=BE"),
        ]);
        let up = flags.resolve_in(&vars).unwrap();
        assert_eq!(up.listen.port(), 7803);
        assert!(up.no_demo_model);
        assert_eq!(up.attributes["site"], "b");
        assert_eq!(up.store, Some(dir.path().join("store.toml")));
        assert_eq!(up.repair_interval, Duration::from_secs(5));
        let up = UpArgs {
            config: Some(path.clone()),
            ..UpArgs::default()
        }
        .resolve_in(&vars)
        .unwrap();
        assert_eq!(up.listen.port(), 7802);
        let up = UpArgs::default().resolve_in(&[]).unwrap();
        assert_eq!(up.listen, SocketAddr::from(DEFAULT_LISTEN));
        assert_eq!(up.repair_interval, Duration::from_secs(600));
        assert!(!up.no_demo_model && up.store.is_none());

        std::fs::write(&path, "no_demo = true\n").unwrap();
        let err = UpArgs {
            config: Some(path),
            ..UpArgs::default()
        }
        .resolve_in(&[])
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown key `no_demo`"), "{err}");
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
        let config = args.resolve_in(&[]).unwrap().config;
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
        let err = args.resolve_in(&[]).err().unwrap().to_string();
        assert!(
            err.contains("bad.toml") && err.contains("m: must be"),
            "{err}"
        );
    }
}
