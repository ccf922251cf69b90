//! The roles that run a control-plane server: `aigrid server` (one server of a
//! cluster, with its repair loop and, when asked, its join) and `aigrid up` (one
//! server of a one-server cluster, this machine's agent, the local store and the demo
//! model, all stopped together on Ctrl-C or SIGTERM).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aigrid_api::{IdentityKey, StorageInfo};
use aigrid_scheduler::server::{Server, ServerConfig};
use aigrid_store::backend::BackendConfig;
use anyhow::{anyhow, Context};

use aigrid_agent::agent::OnShutdown;
use aigrid_agent::sandbox::SandboxConfig;

use crate::config::{ResolvedServer, ServerArgs, UpArgs};
use crate::files::{local_store, read_store_file};
use crate::output::{count, say};
use crate::shutdown::shutdown_signal;

/// Asks an existing cluster to add this server, retrying until it is a member. The
/// request is signed with `key`, which must be an admin's. First it reads the
/// cluster's members (over TLS under the cluster CA), so that it can answer the
/// leader before the first snapshot tells it the configuration.
async fn join_cluster(
    url: String,
    key: Arc<IdentityKey>,
    id: u64,
    addr: String,
    raft: aigrid_consensus::RaftNode<aigrid_scheduler::state::ClusterState>,
) {
    let client = match crate::client::Client::new(&url, Some(key)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot join");
            return;
        }
    };
    let body = aigrid_api::JoinRequest { id, addr };
    loop {
        let status: anyhow::Result<aigrid_api::ClusterStatus> = client
            .call::<(), _>(reqwest::Method::GET, "/api/v1/cluster", None)
            .await;
        let members = match status {
            Ok(status) => status
                .members
                .into_iter()
                .map(|m| (m.id, m.addr))
                .collect::<std::collections::BTreeMap<_, _>>(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the cluster's members; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        raft.seed_peers(&members);
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
            Err(e) if e.to_string().contains("is already a member") => {
                tracing::info!("already a member of the cluster");
                return;
            }
            Err(e)
                if e.to_string().contains("(forbidden)")
                    || e.to_string().contains("(unauthorized)") =>
            {
                tracing::error!(error = %e, "cannot join: the join must be signed by an admin's identity (--identity FILE)");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "join failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// This server's own identity, made in its data dir on first start: what its own
/// loops (repairs, `up`'s agent token and demo) sign with. Only this server accepts
/// it, as itself.
fn server_identity(data_dir: &Path, id: u64) -> anyhow::Result<Arc<IdentityKey>> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let (_, key) = crate::keys::ensure_key(
        &data_dir.join(SERVER_IDENTITY_FILE),
        &format!("server-{id}"),
    )?;
    Ok(Arc::new(key))
}

/// Where a server keeps its own identity, in its data dir.
const SERVER_IDENTITY_FILE: &str = "server-identity.json";

/// `aigrid server`.
pub async fn run_server(args: ServerArgs, identity: Option<&Path>) -> anyhow::Result<()> {
    let ResolvedServer {
        mut config,
        join,
        repair_interval,
        backends,
    } = args.resolve()?;
    let own = server_identity(&config.data_dir, config.id)?;
    config.access.server_key = Some(own.public());
    if config.access.admins.is_empty() && !config.joining {
        tracing::warn!(
            "no --admin given: a new cluster has no admin until a server started with --admin leads"
        );
    }
    // Joining is an admin's act: sign it with the operator's identity.
    let join_key = match &join {
        Some(_) => Some(crate::keys::client_key(identity)?.ok_or_else(|| {
            anyhow!("--join must be signed by an admin: make or pass an identity (--identity FILE)")
        })?),
        None => None,
    };
    let id = config.id;
    let data_dir = config.data_dir.clone();
    let advertise = config.advertise.clone();
    let storage = config.storage.clone();
    let server = Server::start(config).await.map_err(|e| anyhow!("{e}"))?;
    // This process's own calls (repairs, the join) trust the cluster's CA.
    crate::client::trust(aigrid_tls::ApiTrust::CaCert(
        server.identity.ca_cert().clone(),
    ));
    tracing::info!(
        id,
        api = %server.url(),
        peers = %server.peer_addr,
        ca = %server.identity.fingerprint(),
        data_dir = %data_dir.display(),
        "server started"
    );
    let (_stop_repairs, repairs_stopped) = tokio::sync::watch::channel(false);
    spawn_repairs(
        &storage,
        &backends,
        &server,
        own,
        Some(id),
        repair_interval,
        repairs_stopped,
    )?;
    if let (Some(url), Some(key)) = (join, join_key) {
        let addr = advertise.unwrap_or_else(|| server.peer_addr.to_string());
        tokio::spawn(join_cluster(url, key, id, addr, server.raft.clone()));
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

/// Starts the periodic scrub-and-repair loop of `server` when there is a store and an
/// interval, its metrics on the server's `/metrics`; with `leader_only`, a round runs
/// only while that server leads.
fn spawn_repairs(
    storage: &StorageInfo,
    backends: &[BackendConfig],
    server: &Server,
    key: Arc<IdentityKey>,
    leader_only: Option<u64>,
    interval: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    if !storage.is_configured() || interval.is_zero() {
        return Ok(());
    }
    let store = std::sync::Arc::new(crate::model::store_from(backends)?);
    let metrics = crate::model::RepairMetrics::register(&server.registry)?;
    tokio::spawn(crate::model::repair_loop(
        server.url(),
        key,
        store,
        leader_only,
        interval,
        metrics,
        stop,
    ));
    Ok(())
}

/// Waits until the server at `base` answers a linearizable read: a restarted server
/// replays its log first, and until then it does not know the nodes it registered,
/// so an agent heard before that would be refused as a stranger.
async fn caught_up(base: &str, key: Arc<IdentityKey>, limit: Duration) -> anyhow::Result<()> {
    let client = crate::client::Client::new(base, Some(key))?;
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

/// What `aigrid up`'s workloads may not see (its server's Raft files, the demo
/// model's publisher key) and what its model servers may read: the store's local
/// backends.
fn up_sandbox(data_dir: &Path, backends: &[BackendConfig]) -> SandboxConfig {
    let model_reads = backends
        .iter()
        .filter_map(|b| {
            let path = b.url.strip_prefix("file://").unwrap_or(&b.url);
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    SandboxConfig {
        model_reads,
        protected: vec![data_dir.join("server"), data_dir.join("demo-model")],
        ..SandboxConfig::default()
    }
}

/// `aigrid up`: one server of a one-server cluster and this machine's agent,
/// kept running until Ctrl-C or SIGTERM, which stop its workloads and model
/// servers with it.
pub async fn run_up(args: UpArgs, identity: Option<&Path>) -> anyhow::Result<()> {
    let up = args.resolve()?;
    // Heard from the first moment: a signal during the start still stops, in order,
    // whatever has started by then.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    let data_dir = match up.data_dir {
        Some(d) => d,
        None => default_data_dir()?,
    };
    let (storage, backends) = match &up.store {
        Some(path) => read_store_file(path)?,
        None => local_store(&data_dir.join("store"))?,
    };
    // Workloads run under their own uids and reach their own directories under
    // the agent's by name; nothing here is listed to them.
    aigrid_agent::sandbox::make_searchable(&data_dir)
        .with_context(|| format!("data dir {}", data_dir.display()))?;
    let sandbox = up_sandbox(&data_dir, &backends);
    let mut config = ServerConfig::new(1, up.listen, data_dir.join("server"));
    config.storage = storage.clone();
    // The local user is the admin of the cluster `up` makes: their identity is made
    // on first run, and every `aigrid` command signs with it.
    let admin_path = crate::keys::key_path(identity)?;
    let user = std::env::var("USER").unwrap_or_else(|_| "admin".into());
    let (admin, _) = crate::keys::ensure_key(&admin_path, &user)?;
    tracing::info!(identity = %admin.id, file = %admin_path.display(), "local admin identity");
    config.access.admins = vec![(admin.name.clone(), admin.public_key.clone())];
    let own = server_identity(&config.data_dir, 1)?;
    config.access.server_key = Some(own.public());
    let server = Server::start(config).await.map_err(|e| anyhow!("{e}"))?;
    // `up` and its agent call its own API: under its own CA when it is HTTPS.
    crate::client::trust(aigrid_tls::ApiTrust::CaCert(
        server.identity.ca_cert().clone(),
    ));
    let base = server.url();
    let (stop_repairs, repairs_stopped) = tokio::sync::watch::channel(false);
    spawn_repairs(
        &storage,
        &backends,
        &server,
        own.clone(),
        None,
        up.repair_interval,
        repairs_stopped,
    )?;
    caught_up(&base, own.clone(), Duration::from_secs(30)).await?;
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
        let created: aigrid_api::CreatedJoinToken =
            crate::client::Client::new(&base, Some(own.clone()))?
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
        crate::agent::load_identity(&agent_dir, None)?,
        up.simulate_gpus,
        aigrid_agent::agent::AgentConfig {
            join_token,
            attributes: up.attributes,
            offer: up.offer,
            // What `up` starts goes with it.
            on_shutdown: OnShutdown::StopWorkloads,
            // Its model servers call its API under its CA when that is HTTPS.
            cluster_ca: server.https.then(|| server.identity.ca_pem()),
            ..Default::default()
        },
        sandbox,
        metrics,
        crate::staging::StoreStager::new(agent_dir.join(aigrid_agent::model_server::CACHE_DIR)),
    )
    .await?;
    let agent_task = tokio::spawn(agent.run(stopped.clone()));
    // In the background: `up` is usable before the demo model is, and a demo that
    // fails to deploy says so in one log line without stopping anything.
    let demo_watch = if up.no_demo_model {
        None
    } else {
        let store = crate::model::StoreArgs {
            store: up.store.clone(),
        };
        tokio::spawn(crate::demo::deploy(
            base.clone(),
            own.clone(),
            data_dir.join("demo-model"),
            store,
        ));
        Some(tokio::spawn(crate::demo::announce(
            base.clone(),
            stopped.clone(),
        )))
    };
    let demo = if up.no_demo_model {
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
        "aigrid is up (one server and this machine's agent, data in {})\n  control API  {base}/api/v1\n  OpenAPI      {base}/api/v1/openapi.json\n  metrics      {base}/metrics\n  store        {}, {}+{} ({})\n  try          aigrid job submit examples/job.json --server {base}\n               aigrid model push DIR --name NAME --server {base}\n{demo}Press Ctrl-C to stop.\n",
        data_dir.display(),
        count(storage.backends.len(), "backend"),
        storage.k,
        storage.m,
        if storage.policy.is_empty() { "any backend".to_owned() } else { storage.policy.join("; ") },
    );
    say(&banner);
    let _ = stopped.clone().wait_for(|stop| *stop).await;
    let _ = stop_repairs.send(true);
    let demo_was_ready = match demo_watch {
        Some(watch) => watch.await.unwrap_or(false),
        None => false,
    };
    let agent_result = agent_task.await;
    if demo_was_ready {
        say(&crate::demo::stopped_line());
    }
    server.stop().await;
    match agent_result {
        Ok(result) => result.map_err(|e| anyhow!("{e}")),
        Err(e) => Err(anyhow!("the agent task failed: {e}")),
    }
}
