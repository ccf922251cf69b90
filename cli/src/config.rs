//! Server configuration: flags (each with an `AIGRID_*` variable) over an optional TOML
//! file over defaults. Unknown keys in the file are an error.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aigrid_scheduler::server::{Server, ServerConfig};
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
    /// Requests served at once (429 beyond).
    #[arg(long, env = "AIGRID_MAX_IN_FLIGHT")]
    max_in_flight: Option<usize>,
    /// Milliseconds a node may go without a heartbeat before it is marked down and
    /// its work rescheduled.
    #[arg(long, env = "AIGRID_NODE_TTL_MS")]
    node_ttl_ms: Option<u64>,
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
            max_in_flight: self.max_in_flight.or(file.max_in_flight),
            node_ttl_ms: self.node_ttl_ms.or(file.node_ttl_ms),
        }
    }

    /// Merges flags over the file over defaults.
    fn resolve(self) -> anyhow::Result<(ServerConfig, Option<String>)> {
        let file = match &self.config {
            Some(path) => read_toml(path)?,
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
        if let Some(n) = args.max_in_flight {
            config.limits.max_in_flight = n;
        }
        if let Some(ms) = args.node_ttl_ms {
            config.node_ttl = Duration::from_millis(ms);
        }
        config.validate().map_err(|e| anyhow!("{e}"))?;
        Ok((config, join))
    }
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
    let (config, join) = args.resolve()?;
    let id = config.id;
    let data_dir = config.data_dir.clone();
    let advertise = config.advertise.clone();
    let server = Server::start(config).await.map_err(|e| anyhow!("{e}"))?;
    tracing::info!(id, addr = %server.addr, data_dir = %data_dir.display(), "server started");
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
    let config = ServerConfig::new(1, args.listen, data_dir.join("server"));
    let server = Server::start(config).await.map_err(|e| anyhow!("{e}"))?;
    let base = format!("http://{}", server.addr);
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
    // The banner is informational: a closed stdout must not stop the server.
    let banner = format!(
        "aigrid is up (one server and this machine's agent, data in {})\n  control API  {base}/api/v1\n  OpenAPI      {base}/api/v1/openapi.json\n  metrics      {base}/metrics\n  try          aigrid job submit examples/job.json --server {base}\nPress Ctrl-C to stop.\n",
        data_dir.display()
    );
    let mut out = std::io::stdout();
    let _ = std::io::Write::write_all(&mut out, banner.as_bytes());
    let _ = std::io::Write::flush(&mut out);
    shutdown_signal().await;
    let _ = stop.send(true);
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
    }
}
