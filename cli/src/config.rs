//! Server configuration: flags (each with an `AIGRID_*` variable) over an optional TOML
//! file over defaults. Unknown keys in the file are an error. Also the dispersed
//! store's file ([`read_store_file`]), which `aigrid server --store` and the model
//! commands read.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aigrid_api::{StorageBackend, StorageInfo};
use aigrid_scheduler::server::{Server, ServerConfig};
use aigrid_store::backend::BackendConfig;
use aigrid_store::placement::Policy;
use anyhow::{anyhow, bail, Context};
use clap::Args;
use serde::Deserialize;

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
    listen: SocketAddr,
    /// Data directory (default: `aigrid` under the user's data directory).
    #[arg(long, env = "AIGRID_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Give the embedded agent simulated GPUs instead of NVML, e.g. `2xH100-80GB`.
    #[arg(long, env = "AIGRID_SIMULATE_GPUS")]
    simulate_gpus: Option<String>,
    /// The dispersed store's file (see `aigrid server --store`); default: six local
    /// directories under the data directory standing in for six sites, coded 4+2,
    /// at most one shard of a stripe per site.
    #[arg(long, env = "AIGRID_STORE")]
    store: Option<PathBuf>,
    /// Seconds between scrub-and-repair rounds over every model (0: never).
    #[arg(long, env = "AIGRID_REPAIR_INTERVAL_SECS", default_value_t = 600)]
    repair_interval_secs: u64,
    /// Do not push and deploy the tiny demo model (`tiny-llama`, random weights) that
    /// otherwise answers on `/v1` once its server is ready.
    #[arg(long, env = "AIGRID_NO_DEMO_MODEL")]
    no_demo_model: bool,
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

/// Reads a role's TOML configuration file; unknown keys are an error.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        anyhow!(
            "config file {}: {}",
            path.display(),
            e.to_string().replace('\n', " ")
        )
    })
}

/// A dispersed store's file, as written:
///
/// ```toml
/// k = 4
/// m = 2
/// policy = ["max 1 per site"]
/// [[backends]]
/// name = "site-0"
/// url = "file:///var/lib/aigrid/store/site-0"
/// attributes = { site = "a", country = "BE" }
/// ```
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    k: usize,
    m: usize,
    #[serde(default)]
    policy: Vec<String>,
    #[serde(default)]
    backends: Vec<BackendConfig>,
}

/// What clients are told about a backend: its name, URL and attributes, never its
/// options (they may hold credentials).
fn told(b: &BackendConfig) -> StorageBackend {
    StorageBackend {
        name: b.name.clone(),
        url: b.url.clone(),
        attributes: b.attributes.clone(),
    }
}

/// Reads and checks a dispersed store's TOML file: what clients may be told about it
/// ([`StorageInfo`]: no credentials) and each backend's full configuration (its
/// `options` may hold credentials). Checked once here: k and m at least 1 and
/// within the codec's shard limit, backend names unique and non-empty, URLs without
/// credentials, the policy readable and able to place the k+m shards of a stripe on
/// the backends.
pub fn read_store_file(path: &Path) -> anyhow::Result<(StorageInfo, Vec<BackendConfig>)> {
    let file: StoreFile = read_toml(path)?;
    let context = |e: &dyn std::fmt::Display| anyhow!("store file {}: {e}", path.display());
    let info = StorageInfo {
        backends: file.backends.iter().map(told).collect(),
        k: file.k,
        m: file.m,
        policy: file.policy,
    };
    info.validate().map_err(|e| context(&e))?;
    let shards = info.k + info.m;
    if shards > aigrid_store::codec::MAX_SHARDS {
        return Err(context(&format!(
            "k+m = {shards} exceeds the codec's {} shards per stripe",
            aigrid_store::codec::MAX_SHARDS
        )));
    }
    let policy = Policy::parse(&info.policy).map_err(|e| context(&e))?;
    let attributes: Vec<_> = info.backends.iter().map(|b| &b.attributes).collect();
    policy
        .place(&attributes, shards, &[], 0)
        .map_err(|e| context(&e))?;
    Ok((info, file.backends))
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
    fn resolve_all(self) -> anyhow::Result<ResolvedServer> {
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
struct ResolvedServer {
    config: ServerConfig,
    /// The cluster to join, if any.
    join: Option<String>,
    /// Between scrub-and-repair rounds (zero: never).
    repair_interval: Duration,
    /// The store's backends, with their settings.
    backends: Vec<BackendConfig>,
}

pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Asks an existing cluster to add this server, retrying until it is a member.
async fn join_cluster(url: String, id: u64, addr: String) {
    let client = match crate::client::Client::new(&url) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot join");
            return;
        }
    };
    let body = aigrid_api::JoinRequest { id, addr };
    loop {
        let result: anyhow::Result<serde_json::Value> = client
            .call(
                reqwest::Method::POST,
                "/api/v1/cluster/members",
                Some(&body),
            )
            .await;
        match result {
            Ok(_) => {
                tracing::info!(%url, "joined the cluster");
                return;
            }
            Err(e) if e.to_string().contains("(conflict)") => {
                tracing::info!("already a member of the cluster");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "join failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// `aigrid server`.
pub async fn run_server(args: ServerArgs) -> anyhow::Result<()> {
    let ResolvedServer {
        config,
        join,
        repair_interval,
        backends,
    } = args.resolve_all()?;
    let id = config.id;
    let data_dir = config.data_dir.clone();
    let advertise = config.advertise.clone();
    let storage = config.storage.clone();
    let server = Server::start(config).await.map_err(|e| anyhow!("{e}"))?;
    tracing::info!(id, addr = %server.addr, data_dir = %data_dir.display(), "server started");
    let (_stop_repairs, repairs_stopped) = tokio::sync::watch::channel(false);
    spawn_repairs(
        &storage,
        &backends,
        format!("http://{}", server.addr),
        Some(id),
        repair_interval,
        repairs_stopped,
    )?;
    if let Some(url) = join {
        let addr = advertise.unwrap_or_else(|| server.addr.to_string());
        tokio::spawn(join_cluster(url, id, addr));
    }
    server.run_until(shutdown_signal()).await;
    tracing::info!("server stopped");
    Ok(())
}

fn default_data_dir() -> anyhow::Result<PathBuf> {
    let base =
        dirs::data_dir().ok_or_else(|| anyhow!("no user data directory; pass --data-dir"))?;
    Ok(base.join("aigrid"))
}

/// The embedded default store: six local directories standing in for six sites,
/// coded 4+2, at most one shard of a stripe per site.
pub fn local_store(dir: &Path) -> anyhow::Result<(StorageInfo, Vec<BackendConfig>)> {
    let mut backends = Vec::new();
    for i in 0..6 {
        let path = dir.join(format!("site-{i}"));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        let path = path
            .canonicalize()
            .with_context(|| format!("resolving {}", path.display()))?;
        backends.push(BackendConfig {
            name: format!("site-{i}"),
            url: path.display().to_string(),
            attributes: BTreeMap::from([("site".to_owned(), format!("site-{i}"))]),
            options: BTreeMap::new(),
        });
    }
    let info = StorageInfo {
        backends: backends.iter().map(told).collect(),
        k: 4,
        m: 2,
        policy: vec!["max 1 per site".to_owned()],
    };
    Ok((info, backends))
}

/// Starts the periodic scrub-and-repair loop when there is a store and an interval;
/// with `leader_only`, a round runs only while that server leads.
fn spawn_repairs(
    storage: &StorageInfo,
    backends: &[BackendConfig],
    base: String,
    leader_only: Option<u64>,
    interval: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    if !storage.is_configured() || interval.is_zero() {
        return Ok(());
    }
    let store = std::sync::Arc::new(crate::model::store_from(backends)?);
    tokio::spawn(crate::model::repair_loop(
        base,
        store,
        leader_only,
        interval,
        stop,
    ));
    Ok(())
}

/// Waits until the server at `base` answers a linearizable read: a restarted server
/// replays its log first, and until then it does not know the nodes it registered,
/// so an agent heard before that would be refused as a stranger.
async fn caught_up(base: &str, limit: Duration) -> anyhow::Result<()> {
    let client = crate::client::Client::new(base)?;
    let deadline = std::time::Instant::now() + limit;
    loop {
        let read: anyhow::Result<serde::de::IgnoredAny> = client
            .call::<(), _>(reqwest::Method::GET, "/api/v1/nodes", None)
            .await;
        match read {
            Ok(_) => return Ok(()),
            Err(e) if std::time::Instant::now() >= deadline => {
                return Err(e.context("the server did not catch up with its log"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// `aigrid up`: one server of a one-server cluster and this machine's agent,
/// kept running.
pub async fn run_up(args: UpArgs) -> anyhow::Result<()> {
    let data_dir = match args.data_dir {
        Some(d) => d,
        None => default_data_dir()?,
    };
    if let Some(spec) = &args.simulate_gpus {
        aigrid_agent::simulated::parse(spec, "check")?;
    }
    let (storage, backends) = match &args.store {
        Some(path) => read_store_file(path)?,
        None => local_store(&data_dir.join("store"))?,
    };
    let mut config = ServerConfig::new(1, args.listen, data_dir.join("server"));
    config.storage = storage.clone();
    let server = Server::start(config).await.map_err(|e| anyhow!("{e}"))?;
    let base = format!("http://{}", server.addr);
    let (stop_repairs, repairs_stopped) = tokio::sync::watch::channel(false);
    spawn_repairs(
        &storage,
        &backends,
        base.clone(),
        None,
        Duration::from_secs(args.repair_interval_secs),
        repairs_stopped,
    )?;
    caught_up(&base, Duration::from_secs(30)).await?;
    let agent_dir = data_dir.join("agent");
    let join_token = if agent_dir
        .join(aigrid_agent::identity::IDENTITY_FILE)
        .exists()
    {
        None
    } else {
        // First start: a token for this machine's agent alone, good for minutes.
        let request = aigrid_api::CreateJoinToken {
            ttl_secs: Some(600),
            max_uses: Some(1),
            description: Some("aigrid up: this machine's agent".into()),
        };
        let created: aigrid_api::CreatedJoinToken = crate::client::Client::new(&base)?
            .call(reqwest::Method::POST, "/api/v1/join-tokens", Some(&request))
            .await
            .context("creating the embedded agent's join token")?;
        Some(created.token.parse().map_err(|e| anyhow!("{e}"))?)
    };
    let registry = prometheus::Registry::new();
    let metrics = aigrid_agent::metrics::AgentMetrics::register(&registry, true)?;
    let agent = crate::agent::start_agent(
        vec![base.clone()],
        &agent_dir,
        None,
        args.simulate_gpus,
        aigrid_agent::agent::AgentConfig {
            join_token,
            ..Default::default()
        },
        metrics,
    )
    .await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let agent_task = tokio::spawn(agent.run(stopped));
    // In the background: `up` is usable before the demo model is, and a demo that
    // fails to deploy says so in one log line without stopping anything.
    if !args.no_demo_model {
        let store = crate::model::StoreArgs {
            store: args.store.clone(),
        };
        tokio::spawn(crate::demo::deploy(
            base.clone(),
            data_dir.join("demo-model"),
            store,
        ));
    }
    let demo = if args.no_demo_model {
        String::new()
    } else {
        format!(
            "  OpenAI API   {base}/v1 (routes by `model` to ready replicas)\n  demo model   {name}, being pushed and deployed: ready once `curl -s {base}/v1/models` lists it.\n               Its weights are random, so its answers are gibberish.\n  try          {curl}\n  real models  aigrid model push DIR --name NAME, then a job whose task is\n               {{\"driver\": \"model-server\", \"model\": \"DIGEST\"}} (README.md, Serving)\n",
            name = crate::demo::NAME,
            curl = crate::demo::curl_line(&base),
        )
    };
    // The banner is informational: a closed stdout must not stop the server.
    let banner = format!(
        "aigrid is up (one server and this machine's agent, data in {})\n  control API  {base}/api/v1\n  OpenAPI      {base}/api/v1/openapi.json\n  metrics      {base}/metrics\n  store        {} backends, {}+{} ({})\n  try          aigrid job submit examples/job.json --server {base}\n               aigrid model push DIR --name NAME --server {base}\n{demo}Press Ctrl-C to stop.\n",
        data_dir.display(),
        storage.backends.len(),
        storage.k,
        storage.m,
        if storage.policy.is_empty() { "any backend".to_owned() } else { storage.policy.join("; ") },
    );
    let mut out = std::io::stdout();
    let _ = std::io::Write::write_all(&mut out, banner.as_bytes());
    let _ = std::io::Write::flush(&mut out);
    shutdown_signal().await;
    let _ = stop.send(true);
    let _ = stop_repairs.send(true);
    let agent_result = agent_task.await;
    server.stop().await;
    match agent_result {
        Ok(result) => result.map_err(|e| anyhow!("{e}")),
        Err(e) => Err(anyhow!("the agent task failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    const STORE: &str = r#"
k = 2
m = 1
policy = ["max 1 per site"]
[[backends]]
name = "site-0"
url = "file:///var/lib/aigrid/store/site-0"
attributes = { site = "a", country = "BE" }
[[backends]]
name = "site-1"
url = "s3://models/site-1"
attributes = { site = "b", country = "NL" }
options = { endpoint = "http://10.0.0.2:9000", secret_access_key = "hunter2" }
[[backends]]
name = "site-2"
url = "http://10.0.0.3:7710/"
attributes = { site = "c", country = "BE" }
"#;

    #[test]
    fn a_store_file_is_read_checked_and_told_without_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.toml");
        std::fs::write(&path, STORE).unwrap();
        let (info, configs) = read_store_file(&path).unwrap();
        assert_eq!((info.k, info.m), (2, 1));
        assert_eq!(info.policy, ["max 1 per site"]);
        assert_eq!(info.backends.len(), 3);
        assert_eq!(info.backends[0].attributes["country"], "BE");
        assert_eq!(configs[1].options["endpoint"], "http://10.0.0.2:9000");
        let told = serde_json::to_string(&info).unwrap();
        assert!(
            !told.contains("hunter2") && !told.contains("options"),
            "{told}"
        );
        assert_eq!(read_store_file(&path).unwrap().0, info);

        for (edit, has) in [
            (STORE.replace("k = 2", "k = 0"), "k: must be at least 1"),
            (STORE.replace("m = 1", "m = 0"), "m: must be at least 1"),
            (STORE.replace("k = 2", "k = 300"), "exceeds"),
            (STORE.replace("site-2", "site-0"), "names two backends"),
            (STORE.replace(r#""site-1""#, r#""""#), "backends[1].name"),
            (
                STORE.replace("s3://models", "s3://key:secret@models"),
                "user or password",
            ),
            (
                STORE.replace("max 1 per site", "at most one"),
                "invalid placement policy",
            ),
            (
                STORE.replace("max 1 per site", "country = BE"),
                "needs 3 distinct backends",
            ),
            (STORE.replace("k = 2", "k = 2\nbogus = 1"), "bogus"),
        ] {
            std::fs::write(&path, &edit).unwrap();
            let err = format!("{:#}", read_store_file(&path).unwrap_err());
            assert!(err.contains(has), "`{err}` lacks `{has}`");
            assert!(err.contains("store.toml"), "{err}");
        }
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
