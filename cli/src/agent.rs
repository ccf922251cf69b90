//! `aigrid agent`: flags over their `AIGRID_*` variables over an optional TOML file
//! ([`crate::layers`]), then one agent, or a simulated fleet of them, until SIGINT
//! or SIGTERM. Stopping the agent leaves its workloads running; the next start
//! reattaches.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aigrid_agent::agent::{Agent, AgentConfig};
use aigrid_agent::client::{parse_servers, plain_beyond_loopback, ControlClient};
use aigrid_agent::discovery::{Discovery, DiscoveryOptions};
use aigrid_agent::driver::ExecDriver;
use aigrid_agent::fleet::{self, FleetConfig};
use aigrid_agent::identity::Identity;
use aigrid_agent::metrics::AgentMetrics;
use aigrid_agent::runner::{Runner, RunnerConfig, SupervisorLaunch};
use aigrid_agent::sandbox::SandboxConfig;
use aigrid_api::JoinToken;
use anyhow::{anyhow, bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::data_port::{DataIdentity, DataPort};
use crate::layers::{process_env, Layers};

/// Flags of `aigrid agent`; the same names, with `_`, are the keys of its TOML file,
/// and upper-cased after `AIGRID_`, its variables.
#[derive(Args, Serialize, Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct AgentArgs {
    /// Control-plane server URLs, comma-separated; the agent moves between them on
    /// its own.
    #[arg(long)]
    servers: Option<String>,
    /// Join token for the first registration (`aigrid node token create`).
    #[arg(long)]
    join_token: Option<String>,
    /// Directory for the node's identity, allocations, logs and artifact cache.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A node attribute, `KEY=VALUE`; repeatable (`AIGRID_ATTRS` takes a comma list).
    #[arg(long = "attr", value_name = "KEY=VALUE", value_delimiter = ',')]
    #[serde(default)]
    attr: Vec<String>,
    /// The ports the control plane may assign this node's listening workloads
    /// (model servers), `FIRST-LAST` (default 20000-32767, below Linux's ephemeral
    /// ports). The servers reach them at the address this agent connects from.
    #[arg(long, value_name = "FIRST-LAST")]
    ports: Option<String>,
    /// What circles' treasuries pay per hour of this node's work, in credits:
    /// `gpu.MODEL=2.5,gpu.*=1,cpu=0.04,memory_gib=0.005` (per GPU, core and GiB
    /// reserved). Without it the node's work is free.
    #[arg(long, value_name = "PRICES")]
    price: Option<String>,
    /// The farmer (an identity id, `aigrid identity show`) whose account is paid
    /// for this node's work; the node's own account (`node:ID`) without it.
    #[arg(long, value_name = "IDENTITY")]
    farmer: Option<String>,
    /// The node id on first start (default: the host name and a random suffix).
    #[arg(long)]
    node_id: Option<String>,
    /// Simulated GPUs instead of NVML, e.g. `4xH100-80GB,2xL4-24GB`; faults are
    /// injected through `<data-dir>/simulated-gpu-faults`.
    #[arg(long)]
    simulate_gpus: Option<String>,
    /// Run N simulated agents in this process (simulated GPUs, a driver that only
    /// records), to load-test the control plane.
    #[arg(long, value_name = "N")]
    simulate_fleet: Option<usize>,
    /// Milliseconds over which a simulated fleet's agents start.
    #[arg(long)]
    fleet_ramp_ms: Option<u64>,
    /// Milliseconds between heartbeats (default 10000).
    #[arg(long)]
    heartbeat_interval_ms: Option<u64>,
    /// Longest a long poll for assignments is held, in milliseconds (default 30000).
    #[arg(long)]
    poll_wait_ms: Option<u64>,
    /// Serve Prometheus `/metrics` on this address; nothing listens otherwise.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Serve this node's data port (its shards, and model chunks to its peers) on
    /// this address (the node's private address; port 0 picks one); nothing listens
    /// otherwise. Beyond loopback it serves TLS under a certificate from the
    /// cluster CA, asked for with the registration.
    #[arg(long)]
    shard_listen: Option<SocketAddr>,
    /// Serve the data port over TLS on loopback too.
    #[arg(long)]
    #[serde(default)]
    data_tls: bool,
    /// A directory with the data port's certificate issued ahead (`node.pem`,
    /// `node.key`, from `aigrid ca issue --node`), for servers that do not hold the
    /// CA key.
    #[arg(long, value_name = "DIR")]
    data_tls_dir: Option<PathBuf>,
    /// A host name or address the data port's certificate names besides the host
    /// name, loopback and the listen address; repeatable.
    #[arg(long = "data-host", value_name = "HOST", value_delimiter = ',')]
    #[serde(default)]
    data_host: Vec<String>,
    /// Directory the shard service keeps shards in (default `<data-dir>/shards`).
    #[arg(long)]
    shard_dir: Option<PathBuf>,
    /// Model chunks served to peers at once on the shard port, from the node's
    /// model cache; more are refused so the peer asks another (default 4).
    #[arg(long)]
    peer_uploads: Option<usize>,
    /// Upload rate to peers on the shard port, in Mbit/s (default: unlimited).
    #[arg(long, value_name = "MBIT")]
    peer_upload_mbit: Option<f64>,
    /// Uids (and gids) workloads run under when the agent is root, `FIRST-LAST`
    /// (default 200000-265535): each allocation takes its own; the first is the
    /// model servers' shared group.
    #[arg(long, value_name = "FIRST-LAST")]
    workload_uids: Option<String>,
    /// A directory model servers may read (a local store's backend); repeatable
    /// (`AIGRID_MODEL_READ_DIRS` takes a comma list). Nothing else outside their
    /// allocation, the system and the model cache is visible to them.
    #[arg(long = "model-read-dir", value_name = "DIR", value_delimiter = ',')]
    #[serde(default)]
    model_read_dirs: Vec<PathBuf>,
    /// Talk to servers over plain HTTP beyond loopback, the node's requests readable
    /// by anyone on the network, and serve the data port plain beyond loopback
    /// (warned at every start). Without it, such a `--servers` URL is refused: use
    /// `https://`.
    #[arg(long)]
    #[serde(default)]
    insecure: bool,
    /// TOML file with any of these settings (flags and variables win).
    #[arg(long, env = "AIGRID_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
}

/// Everything an agent process needs, checked before anything starts.
struct Resolved {
    servers: Vec<String>,
    /// A plain `http://` server beyond loopback, allowed by `--insecure`.
    insecure_server: Option<String>,
    data_dir: PathBuf,
    node_id: Option<String>,
    simulate_gpus: Option<String>,
    fleet: Option<(usize, Duration)>,
    metrics_listen: Option<SocketAddr>,
    /// Where the shard service listens and the directory it keeps.
    shards: Option<(SocketAddr, PathBuf)>,
    /// How the data port is secured.
    data_tls: crate::data_port::DataTlsChoice,
    peer_uploads: usize,
    peer_upload_mbit: Option<f64>,
    agent: AgentConfig,
    sandbox: SandboxConfig,
}

/// Parses `--attr KEY=VALUE` flags into node attributes.
pub fn parse_attrs(attrs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for attr in attrs {
        let (k, v) = attr
            .split_once('=')
            .ok_or_else(|| anyhow!("--attr `{attr}` must be KEY=VALUE"))?;
        let k = k.trim();
        if k.is_empty() {
            return Err(anyhow!("--attr `{attr}`: the key is empty"));
        }
        out.insert(k.to_owned(), v.trim().to_owned());
    }
    Ok(out)
}

/// The node's offer from `--price` and `--farmer`; none when neither is given.
pub(crate) fn offer(
    price: Option<&str>,
    farmer: Option<&str>,
) -> anyhow::Result<Option<aigrid_api::NodeOffer>> {
    if price.is_none() && farmer.is_none() {
        return Ok(None);
    }
    let prices = aigrid_api::Prices::parse(price.unwrap_or_default())
        .map_err(|e| anyhow!("--price: {e}"))?;
    let farmer = farmer
        .map(|f| {
            let id = aigrid_api::IdentityId::new(f.trim());
            if id.is_well_formed() {
                Ok(id)
            } else {
                Err(anyhow!(
                    "--farmer `{f}`: an identity id, 32 lowercase hex characters"
                ))
            }
        })
        .transpose()?;
    Ok(Some(aigrid_api::NodeOffer { farmer, prices }))
}

/// The flags over the variables in `env` over the file over the defaults.
fn resolve(flags: AgentArgs, env: &[(String, String)]) -> anyhow::Result<Resolved> {
    let args: AgentArgs = Layers::new(&flags, env, flags.config.as_deref()).extract()?;
    let servers = parse_servers(
        args.servers
            .as_deref()
            .ok_or_else(|| anyhow!("--servers is required (or AIGRID_SERVERS)"))?,
    )
    .map_err(|e| anyhow!(e))?;
    let insecure_server = plain_beyond_loopback(&servers).map(str::to_owned);
    if let (Some(url), false) = (&insecure_server, args.insecure) {
        bail!(
            "--servers `{url}` is plain HTTP beyond loopback: use https:// (servers serve \
             it beyond loopback), or --insecure to send the node's requests readable"
        );
    }
    let data_dir = args
        .data_dir
        .ok_or_else(|| anyhow!("--data-dir is required (or AIGRID_DATA_DIR)"))?;
    let join_token = args
        .join_token
        .as_deref()
        .map(str::parse::<JoinToken>)
        .transpose()
        .map_err(|e| anyhow!("--join-token: {e}"))?;
    let ms = |name: &str, v: Option<u64>, default: u64, min: u64| -> anyhow::Result<Duration> {
        let v = v.unwrap_or(default);
        if v < min {
            return Err(anyhow!("--{name} must be at least {min}"));
        }
        Ok(Duration::from_millis(v))
    };
    let agent = AgentConfig {
        join_token,
        attributes: parse_attrs(&args.attr)?,
        heartbeat_interval: ms(
            "heartbeat-interval-ms",
            args.heartbeat_interval_ms,
            10_000,
            100,
        )?,
        poll_wait: ms("poll-wait-ms", args.poll_wait_ms, 30_000, 100)?,
        ports: args
            .ports
            .as_deref()
            .map(str::parse::<aigrid_api::PortRange>)
            .transpose()
            .map_err(|e| anyhow!("--ports: {}", e.message))?,
        offer: offer(args.price.as_deref(), args.farmer.as_deref())?,
        ..AgentConfig::default()
    };
    let fleet = match args.simulate_fleet {
        Some(0) => return Err(anyhow!("--simulate-fleet must be at least 1")),
        Some(n) => Some((n, ms("fleet-ramp-ms", args.fleet_ramp_ms, 10_000, 0)?)),
        None => None,
    };
    if let Some(spec) = &args.simulate_gpus {
        aigrid_agent::simulated::parse(spec, "check")?;
    }
    if let Some(mbit) = args
        .peer_upload_mbit
        .filter(|m| !(m.is_finite() && *m > 0.0))
    {
        bail!("--peer-upload-mbit must be a positive number of Mbit/s, got {mbit}");
    }
    let shards = args.shard_listen.map(|addr| {
        let dir = args
            .shard_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("shards"));
        (addr, dir)
    });
    crate::data_port::check_held(&args.data_tls_dir)?;
    let data_tls = match &shards {
        Some((addr, _)) => crate::data_port::DataTlsChoice::resolve(
            *addr,
            args.data_tls,
            args.data_tls_dir.clone(),
            args.insecure,
            &args.data_host,
        ),
        None => crate::data_port::DataTlsChoice::Plain,
    };
    if fleet.is_some() && data_tls != crate::data_port::DataTlsChoice::Plain {
        bail!(
            "--simulate-fleet serves its data port over plain HTTP: listen on loopback \
             (or pass --insecure)"
        );
    }
    let mut sandbox = SandboxConfig {
        model_reads: args.model_read_dirs,
        ..SandboxConfig::default()
    };
    if let Some(range) = &args.workload_uids {
        sandbox.uids = range.parse().map_err(|e| anyhow!("--workload-uids {e}"))?;
    }
    Ok(Resolved {
        sandbox,
        shards,
        data_tls,
        peer_uploads: args.peer_uploads.unwrap_or(4).max(1),
        peer_upload_mbit: args.peer_upload_mbit,
        servers,
        insecure_server,
        data_dir,
        node_id: args.node_id,
        simulate_gpus: args.simulate_gpus,
        fleet,
        metrics_listen: args.metrics_listen,
        agent,
    })
}

/// Serves `/metrics` (and nothing else) on `addr`.
async fn serve_metrics(addr: SocketAddr, registry: prometheus::Registry) -> anyhow::Result<()> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics-listen {addr}"))?;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut out = Vec::new();
                let _ = prometheus::Encoder::encode(
                    &prometheus::TextEncoder::new(),
                    &registry.gather(),
                    &mut out,
                );
                out
            }
        }),
    );
    tracing::info!(%addr, "serving agent metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics listener stopped");
        }
    });
    Ok(())
}

/// Lets shard writes in flight finish (they are acknowledged only once durable).
async fn finish_shards(shards: Option<tokio::task::JoinHandle<()>>) {
    if let Some(handle) = shards {
        if tokio::time::timeout(Duration::from_secs(10), handle)
            .await
            .is_err()
        {
            tracing::warn!("shard requests still in flight after 10 s; stopping anyway");
        }
    }
}

/// The node's identity in `data_dir` (made there on first start, named `node_id`
/// or after the host).
pub fn load_identity(data_dir: &Path, node_id: Option<&str>) -> anyhow::Result<Identity> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    Ok(Identity::load_or_create(
        data_dir,
        node_id,
        &crate::data_port::hostname(),
    )?)
}

/// The cluster CA an agent trusts: `--ca-cert` first; else the CA the join token
/// pinned (or pinned before), remembered in `data_dir`.
pub fn control_trust(
    data_dir: &Path,
    token: Option<&JoinToken>,
) -> anyhow::Result<Option<aigrid_tls::ApiTrust>> {
    let pinned =
        aigrid_agent::client::pinned_ca(data_dir, token).context("the pinned cluster CA")?;
    Ok(crate::client::trusted().or(pinned.map(aigrid_tls::ApiTrust::Pinned)))
}

/// One real agent on this machine: discovery, exec runner, pull loop, staging
/// through `stager`, for the node `identity` names.
// Each argument is a part the caller chose; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub async fn start_agent(
    servers: Vec<String>,
    data_dir: &Path,
    identity: Identity,
    simulate_gpus: Option<String>,
    config: AgentConfig,
    sandbox: SandboxConfig,
    metrics: AgentMetrics,
    stager: crate::staging::StoreStager,
) -> anyhow::Result<Arc<Agent>> {
    let discovery = Discovery::open(DiscoveryOptions {
        simulate_gpus,
        data_dir: data_dir.to_path_buf(),
        seed: identity.node_id.to_string(),
    })?;
    let launch = SupervisorLaunch::current_exe().context("locating the aigrid binary")?;
    let mut runner_config = RunnerConfig::new(data_dir.to_path_buf(), launch);
    let uids = sandbox.uids;
    runner_config.sandbox = sandbox;
    let runner = Runner::open(runner_config, Arc::new(ExecDriver::new())).await?;
    let shared_gid = runner
        .protections()
        .is_some_and(|p| p.per_allocation_uid)
        .then(|| uids.shared_gid());
    stager
        .share_with(shared_gid)
        .context("making the model cache the model servers' shared directory")?;
    let (limits, why) = runner.limits_enforced();
    tracing::info!(
        node = %identity.node_id,
        gpus = discovery.resources().gpus.len(),
        gpu_source = discovery.gpu_source(),
        limits = %limits,
        why = why.as_deref().unwrap_or(""),
        sandbox = %runner.protections().map(|p| p.summary()).unwrap_or_default(),
        "agent starting"
    );
    let trust = control_trust(data_dir, config.join_token.as_ref())?;
    let http = aigrid_agent::client::http_client(trust.as_ref()).map_err(|e| anyhow!(e))?;
    // Agents start on different servers, so no one server carries them all.
    let start = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        identity.node_id.hash(&mut h);
        usize::try_from(h.finish() % 1024).unwrap_or(0)
    };
    let client = ControlClient::new(servers, http, Arc::new(identity), start);
    Ok(Arc::new(
        Agent::new(config, client, discovery, runner, metrics).with_stager(Arc::new(stager)),
    ))
}

/// `aigrid agent`.
pub async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    let r = resolve(args, &process_env::<AgentArgs>()?)?;
    if let Some(url) = &r.insecure_server {
        tracing::warn!(
            server = %url,
            "talking to a server over plain HTTP beyond loopback (--insecure): the \
             node's requests cross the network readable by anyone on it"
        );
    }
    let registry = prometheus::Registry::new();
    let metrics = AgentMetrics::register(&registry, r.fleet.is_none())?;
    if let Some(addr) = r.metrics_listen {
        serve_metrics(addr, registry).await?;
    }
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        crate::shutdown::shutdown_signal().await;
        let _ = stop.send(true);
    });
    let mut config = r.agent;
    let port = match &r.shards {
        Some((addr, dir)) => {
            let uploads = (r.peer_uploads, r.peer_upload_mbit);
            let port = DataPort::bind(*addr, dir, &r.data_dir, uploads).await?;
            config.data_port = Some(port.port());
            Some(port)
        }
        None => None,
    };
    if let Some((count, ramp)) = r.fleet {
        let fleet = FleetConfig {
            count,
            gpus: r.simulate_gpus.unwrap_or_else(|| "8xH100-80GB".to_owned()),
            prefix: r
                .node_id
                .unwrap_or_else(|| format!("fleet-{}", crate::data_port::hostname())),
            seed: fleet::load_seed(&r.data_dir)?,
            ramp,
            servers: r.servers,
        };
        let served = port.map(|p| p.serve(None, shutdown.clone())).transpose()?;
        fleet::run(fleet, config, metrics, &r.data_dir, shutdown).await?;
        finish_shards(served).await;
        return Ok(());
    }
    let identity = load_identity(&r.data_dir, r.node_id.as_deref())?;
    let trust = control_trust(&r.data_dir, config.join_token.as_ref())?;
    let data = DataIdentity::prepare(&r.data_tls, identity.node_id.as_str(), trust.as_ref())?;
    let (data_tls, waiting) = data.registration();
    config.data_tls = data_tls;
    // Model servers trust what the agent trusts; a certificate issued with the
    // registration brings the CA along (see the agent's registration).
    config.cluster_ca = match &data {
        DataIdentity::Held(identity) => Some(identity.ca_pem()),
        _ => crate::client::trusted_pem(),
    };
    let stager =
        crate::staging::StoreStager::new(r.data_dir.join(aigrid_agent::model_server::CACHE_DIR));
    let agent = start_agent(
        r.servers,
        &r.data_dir,
        identity,
        r.simulate_gpus,
        config,
        r.sandbox,
        metrics,
        stager.clone(),
    )
    .await?;
    let mut run = tokio::spawn(agent.run(shutdown.clone()));
    let mut served = None;
    if let Some(port) = port {
        // The data port serves once its certificate is known: issued with the
        // registration, or held already.
        let identity = match data {
            DataIdentity::Plain => None,
            DataIdentity::Held(identity) => Some(identity),
            DataIdentity::Requested(request) => {
                let waiting = waiting.context("a requested certificate is waited for")?;
                let chain = tokio::select! {
                    chain = waiting.issued() => chain,
                    ended = &mut run => return agent_ended(ended),
                };
                let Some(chain) = chain else {
                    return agent_ended(run.await);
                };
                Some(
                    request
                        .accept(&chain, trust.as_ref())
                        .map_err(|e| anyhow!("{e}"))?,
                )
            }
        };
        if let Some(identity) = &identity {
            stager.present(identity)?;
            // Store backends on the grid's data ports are served under the CA
            // this certificate chains to (checked against the pin above).
            crate::client::trust(aigrid_tls::ApiTrust::CaCert(identity.ca_cert().clone()));
        }
        served = Some(port.serve(identity.as_ref(), shutdown.clone())?);
    }
    let ended = run.await;
    finish_shards(served).await;
    agent_ended(ended)?;
    tracing::info!("agent stopped; workloads keep running and are reattached on the next start");
    Ok(())
}

/// What the agent's run task came to.
fn agent_ended(
    ended: Result<Result<(), aigrid_agent::agent::AgentError>, tokio::task::JoinError>,
) -> anyhow::Result<()> {
    ended.context("the agent's task")??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_reads_the_variables_it_always_did() {
        let names: Vec<String> = [
            "SERVERS",
            "JOIN_TOKEN",
            "DATA_DIR",
            "ATTRS",
            "PORTS",
            "PRICE",
            "FARMER",
            "NODE_ID",
            "SIMULATE_GPUS",
            "SIMULATE_FLEET",
            "FLEET_RAMP_MS",
            "HEARTBEAT_INTERVAL_MS",
            "POLL_WAIT_MS",
            "METRICS_LISTEN",
            "SHARD_LISTEN",
            "DATA_TLS",
            "DATA_TLS_DIR",
            "DATA_HOST",
            "SHARD_DIR",
            "PEER_UPLOADS",
            "PEER_UPLOAD_MBIT",
            "WORKLOAD_UIDS",
            "MODEL_READ_DIRS",
            "INSECURE",
        ]
        .iter()
        .map(|n| format!("AIGRID_{n}"))
        .collect();
        assert_eq!(crate::layers::variables::<AgentArgs>(), names);
    }

    #[test]
    fn flags_win_over_the_file_and_bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "servers = \"http://127.0.0.1:1\"\ndata_dir = \"/tmp/a\"\nattr = [\"site=x\"]\nheartbeat_interval_ms = 500\n",
        )
        .unwrap();
        let vars = crate::layers::tests::env(&[
            ("AIGRID_ATTRS", "site=z"),
            ("AIGRID_POLL_WAIT_MS", "700"),
        ]);
        let r = resolve(
            AgentArgs {
                config: Some(path.clone()),
                attr: vec!["site=y".into()],
                ..AgentArgs::default()
            },
            &vars,
        )
        .unwrap();
        assert_eq!(r.agent.attributes["site"], "y", "the flag beats the rest");
        assert_eq!(r.agent.poll_wait, Duration::from_millis(700));
        assert_eq!(r.agent.heartbeat_interval, Duration::from_millis(500));
        assert_eq!(r.agent.ports, None, "the servers' default");
        let ports = |value: &str| {
            let vars = crate::layers::tests::env(&[("AIGRID_PORTS", value)]);
            resolve(
                AgentArgs {
                    config: Some(path.clone()),
                    ..AgentArgs::default()
                },
                &vars,
            )
            .map(|r| r.agent.ports)
        };
        assert_eq!(
            ports("30000-30099").unwrap(),
            Some(aigrid_api::PortRange {
                first: 30_000,
                last: 30_099
            })
        );
        let err = ports("300-200").err().unwrap().to_string();
        assert!(err.contains("--ports"), "{err}");
        std::fs::write(&path, "servers = \"http://x\"\nbogus = 1\n").unwrap();
        let err = resolve(
            AgentArgs {
                config: Some(path),
                ..AgentArgs::default()
            },
            &[],
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("unknown key `bogus`"), "{err}");
        let bad = |args: AgentArgs| resolve(args, &[]).err().unwrap().to_string();
        let base = || AgentArgs {
            servers: Some("http://127.0.0.1:1".into()),
            data_dir: Some("/tmp/a".into()),
            ..AgentArgs::default()
        };
        assert!(bad(AgentArgs {
            servers: None,
            ..base()
        })
        .contains("--servers"));
        assert!(bad(AgentArgs {
            servers: Some("https://10.0.0.1:7700,http://10.0.0.2:7700".into()),
            ..base()
        })
        .contains("plain HTTP beyond loopback"));
        let allowed = resolve(
            AgentArgs {
                servers: Some("http://10.0.0.2:7700".into()),
                insecure: true,
                ..base()
            },
            &[],
        )
        .unwrap();
        assert_eq!(
            allowed.insecure_server.as_deref(),
            Some("http://10.0.0.2:7700")
        );
        assert!(bad(AgentArgs {
            join_token: Some("nope".into()),
            ..base()
        })
        .contains("--join-token"));
        assert!(bad(AgentArgs {
            attr: vec!["x".into()],
            ..base()
        })
        .contains("--attr"));
        assert!(bad(AgentArgs {
            simulate_fleet: Some(0),
            ..base()
        })
        .contains("--simulate-fleet"));
        assert!(bad(AgentArgs {
            workload_uids: Some("10-5".into()),
            ..base()
        })
        .contains("--workload-uids"));
        let r = resolve(
            AgentArgs {
                workload_uids: Some("300000-300099".into()),
                model_read_dirs: vec!["/srv/store".into()],
                ..base()
            },
            &[],
        )
        .unwrap();
        assert_eq!((r.sandbox.uids.first, r.sandbox.uids.count), (300_000, 100));
        assert_eq!(r.sandbox.model_reads, [PathBuf::from("/srv/store")]);
    }

    #[tokio::test]
    async fn the_shard_service_runs_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let base = || AgentArgs {
            servers: Some("http://127.0.0.1:1".into()),
            data_dir: Some(dir.path().to_path_buf()),
            ..AgentArgs::default()
        };
        assert!(resolve(base(), &[]).unwrap().shards.is_none());
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "shard_listen = \"127.0.0.1:0\"\n").unwrap();
        let (addr, shard_dir) = resolve(
            AgentArgs {
                config: Some(path),
                ..base()
            },
            &[],
        )
        .unwrap()
        .shards
        .unwrap();
        assert_eq!(shard_dir, dir.path().join("shards"));

        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let port = DataPort::bind(addr, &shard_dir, dir.path(), (4, None))
            .await
            .unwrap();
        let handle = port.serve(None, shutdown).unwrap();
        assert!(shard_dir.join(".tmp").is_dir());
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), handle)
            .await
            .unwrap()
            .unwrap();
    }
}
