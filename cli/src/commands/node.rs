//! `aigrid node`: list and inspect nodes, register and heartbeat nodes by hand,
//! drain and revoke them, manage join tokens.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aigrid_agent::client::ControlClient;
use aigrid_agent::identity::Identity;
use aigrid_api::{
    AllocState, Allocation, AllocationReport, CreateJoinToken, CreatedJoinToken, DiskMib,
    DrainSpec, GpuHealth, Heartbeat, HeartbeatResponse, JoinToken, JoinTokenInfo, MemoryMib,
    MilliCpu, Node, NodeId, NodeKey, NodePublicKey, NodeRegistration, NodeResources, NodeTelemetry,
    RegisterNodeResponse,
};
use anyhow::anyhow;
use clap::{Args, Subcommand};
use reqwest::Method;

use crate::client::{path_segment, proposed_or, Client};
use crate::output::{count, list_or_dash, ms_to_text, print_json, print_table};

/// `aigrid node ...`
#[derive(Subcommand)]
pub enum NodeCommand {
    /// List nodes with what their allocations hold.
    Ls,
    /// Show a node, its GPUs and its allocations.
    Status {
        /// The node id.
        id: String,
    },
    /// Register a node by hand, without an agent (to try placement, or in tests).
    Register(RegisterArgs),
    /// Manage join tokens, which let new agents register.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Revoke a node's key: its agent is refused from now on and its work moves.
    Revoke {
        /// The node id.
        id: String,
    },
    /// Send one heartbeat for a node, as its agent would: GPU health, allocation states.
    Heartbeat(HeartbeatArgs),
    /// Drain a node: it gets no new work and its allocations move elsewhere.
    Drain {
        /// The node id.
        id: String,
        /// Allocations on their way off the node at once.
        #[arg(long, default_value_t = DrainSpec::default().max_parallel)]
        max_parallel: u32,
    },
    /// End a node's drain: it takes new work again.
    Undrain {
        /// The node id.
        id: String,
    },
}

/// `aigrid node token ...`
#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a join token; it is printed once and only its hash is kept.
    Create {
        /// Lifetime in seconds (default 24 hours).
        #[arg(long)]
        ttl_secs: Option<u64>,
        /// How many nodes may join with it (default: unlimited).
        #[arg(long)]
        max_uses: Option<u32>,
        /// A note shown in listings.
        #[arg(long)]
        description: Option<String>,
    },
    /// List join tokens (never their secrets).
    Ls,
    /// Delete a join token; nodes that joined with it stay.
    Rm {
        /// The token id.
        id: String,
    },
}

/// Flags of `aigrid node register`.
#[derive(Args)]
pub struct RegisterArgs {
    /// The node id: 1 to 128 of `A-Z a-z 0-9 - _ .`.
    #[arg(long)]
    id: String,
    /// Directory holding the node's key, made on first use; later heartbeats are
    /// signed with it.
    #[arg(long, value_name = "DIR")]
    key_dir: PathBuf,
    /// The join token a new node presents (`aigrid node token create`).
    #[arg(long, env = "AIGRID_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// A human-friendly name (default: the id).
    #[arg(long)]
    name: Option<String>,
    /// An attribute constraints and spreads match on, `KEY=VALUE`; repeatable.
    #[arg(long = "attr", value_name = "KEY=VALUE")]
    attrs: Vec<String>,
    /// A simulated GPU inventory, `8xH100-80GB` or `4xH100-80GB,2xL4-24GB`; UUIDs are
    /// derived from the node id, so registering again reports the same GPUs.
    #[arg(long, value_name = "SPEC")]
    simulate_gpus: Option<String>,
    /// Allocatable CPU in thousandths of a core.
    #[arg(long, default_value_t = 64_000)]
    cpu_millis: u64,
    /// Allocatable memory in MiB.
    #[arg(long, default_value_t = 512 * 1024)]
    memory_mib: u64,
    /// Allocatable disk in MiB.
    #[arg(long, default_value_t = 1024 * 1024)]
    disk_mib: u64,
}

/// Flags of `aigrid node heartbeat`.
#[derive(Args)]
pub struct HeartbeatArgs {
    /// The node id.
    id: String,
    /// Directory holding the node's key (as given to `node register`).
    #[arg(long, value_name = "DIR")]
    key_dir: PathBuf,
    /// Mark a GPU unhealthy, by UUID or index, with an optional reason; repeatable.
    #[arg(long, value_name = "GPU[:REASON]")]
    gpu_unhealthy: Vec<String>,
    /// Mark a GPU healthy again, by UUID or index; repeatable.
    #[arg(long, value_name = "GPU")]
    gpu_healthy: Vec<String>,
    /// Report an allocation's state (`running`, `complete`, `failed`, ...); repeatable.
    #[arg(long = "alloc", value_name = "ALLOC=STATE")]
    allocs: Vec<String>,
}

/// The attributes a node listing shows: where the node is.
fn key_attributes(attrs: &BTreeMap<String, String>) -> String {
    let shown: Vec<String> = ["country", "site"]
        .iter()
        .filter_map(|k| attrs.get(*k).map(|v| format!("{k}={v}")))
        .collect();
    if shown.is_empty() {
        "-".to_owned()
    } else {
        shown.join(" ")
    }
}

/// Runs a `node` subcommand.
pub async fn node(client: &Client, cmd: NodeCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        NodeCommand::Ls => {
            let nodes: Vec<Node> = client
                .call::<(), _>(Method::GET, "/api/v1/nodes", None)
                .await?;
            if json {
                return print_json(&nodes);
            }
            print_nodes(&nodes);
        }
        NodeCommand::Status { id } => {
            let path = format!("/api/v1/nodes/{}", path_segment(&id)?);
            let node: Node = client.call::<(), _>(Method::GET, &path, None).await?;
            if json {
                return print_json(&node);
            }
            let allocs: Vec<Allocation> = client
                .call::<(), _>(Method::GET, &format!("{path}/allocations"), None)
                .await?;
            print_node(&node, &allocs);
        }
        NodeCommand::Register(args) => {
            let token = args
                .join_token
                .as_deref()
                .map(str::parse::<JoinToken>)
                .transpose()
                .map_err(|e| anyhow!("--join-token: {e}"))?;
            // Checked before a key is made, so a mistake leaves nothing behind.
            let key_dir = args.key_dir.clone();
            let mut reg = args.registration(NodeKey::from_secret([0; 32]).public())?;
            let signer = signer(client, &key_dir, reg.id.as_str())?;
            reg.public_key = Some(signer.identity().key.public());
            let resp: RegisterNodeResponse = signer
                .send(
                    Method::POST,
                    "/api/v1/nodes",
                    Some(serde_json::to_vec(&reg)?),
                    token.as_ref(),
                    Duration::from_secs(30),
                )
                .await?;
            if json {
                return print_json(&resp);
            }
            let verb = if resp.created {
                "registered"
            } else {
                "refreshed"
            };
            println!(
                "node {} {verb}: {}, {} CPU millis, {} MiB memory{}",
                resp.id,
                count(reg.resources.gpus.len(), "GPU"),
                reg.resources.cpu_millis.0,
                reg.resources.memory_mib.0,
                evaluations_note(resp.eval_ids.len())
            );
        }
        NodeCommand::Heartbeat(args) => {
            let path = format!("/api/v1/nodes/{}", path_segment(&args.id)?);
            let hb = args.heartbeat(client, &path).await?;
            let signer = signer(client, &args.key_dir, &args.id)?;
            let resp: HeartbeatResponse = signer
                .send(
                    Method::POST,
                    &format!("{path}/heartbeat"),
                    Some(serde_json::to_vec(&hb)?),
                    None,
                    Duration::from_secs(30),
                )
                .await?;
            if json {
                return print_json(&resp);
            }
            println!(
                "node {} {}{}",
                resp.id,
                resp.status,
                evaluations_note(resp.eval_ids.len())
            );
        }
        NodeCommand::Drain { id, max_parallel } => {
            let path = format!("/api/v1/nodes/{}/drain", path_segment(&id)?);
            let spec = DrainSpec { max_parallel };
            spec.validate()
                .map_err(|e| anyhow!("--max-parallel {}", e.message))?;
            let node: Node = client.call(Method::POST, &path, Some(&spec)).await?;
            if json {
                return print_json(&node);
            }
            let allocations = node.usage.map_or(0, |u| u.allocations);
            let noun = if allocations == 1 {
                "allocation"
            } else {
                "allocations"
            };
            println!(
                "node {} {}: {allocations} {noun} to move, at most {max_parallel} at a time",
                node.id, node.status
            );
        }
        NodeCommand::Token(cmd) => token(client, cmd, json).await?,
        NodeCommand::Revoke { id } => {
            let path = format!("/api/v1/nodes/{}/revoke", path_segment(&id)?);
            let answer = client
                .call_guarded::<(), _>(Method::POST, &path, None)
                .await?;
            let Some(node): Option<Node> = proposed_or(answer, json)? else {
                return Ok(());
            };
            if json {
                return print_json(&node);
            }
            println!(
                "node {} revoked; it is {} and its work moves elsewhere",
                node.id, node.status
            );
        }
        NodeCommand::Undrain { id } => {
            let path = format!("/api/v1/nodes/{}/drain", path_segment(&id)?);
            let node: Node = client.call::<(), _>(Method::DELETE, &path, None).await?;
            if json {
                return print_json(&node);
            }
            println!("node {} {}", node.id, node.status);
        }
    }
    Ok(())
}

/// Signs requests as the node whose key is in `key_dir` (made there if missing).
fn signer(client: &Client, key_dir: &Path, id: &str) -> anyhow::Result<ControlClient> {
    let identity = Identity::load_or_create(key_dir, Some(id), id)?;
    Ok(ControlClient::new(
        client.servers().to_vec(),
        crate::client::http_builder()?.build()?,
        Arc::new(identity),
        0,
    ))
}

async fn token(client: &Client, cmd: TokenCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create {
            ttl_secs,
            max_uses,
            description,
        } => {
            let request = CreateJoinToken {
                ttl_secs,
                max_uses,
                description,
            };
            request
                .validate()
                .map_err(|e| anyhow!("--{}", e.to_string().replace('_', "-")))?;
            let created: CreatedJoinToken = client
                .call(Method::POST, "/api/v1/join-tokens", Some(&request))
                .await?;
            if json {
                return print_json(&created);
            }
            println!("{}", created.token);
            eprintln!(
                "join token {} expires {}; it is shown only now. Start agents with
  aigrid agent --servers URL --join-token {} --data-dir DIR",
                created.info.id,
                ms_to_text(created.info.expires_at.as_millis()),
                created.token
            );
        }
        TokenCommand::Ls => {
            let tokens: Vec<JoinTokenInfo> = client
                .call::<(), _>(Method::GET, "/api/v1/join-tokens", None)
                .await?;
            if json {
                return print_json(&tokens);
            }
            let rows: Vec<Vec<String>> = tokens
                .iter()
                .map(|t| {
                    vec![
                        t.id.clone(),
                        ms_to_text(t.expires_at.as_millis()),
                        match t.max_uses {
                            Some(max) => format!("{}/{max}", t.uses),
                            None => t.uses.to_string(),
                        },
                        t.description.clone().unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            print_table(0, &["ID", "EXPIRES", "USES", "DESCRIPTION"], &rows);
        }
        TokenCommand::Rm { id } => {
            let path = format!("/api/v1/join-tokens/{}", path_segment(&id)?);
            client.call_no_content(Method::DELETE, &path).await?;
            if !json {
                println!("join token {id} deleted");
            }
        }
    }
    Ok(())
}

fn evaluations_note(n: usize) -> String {
    match n {
        0 => String::new(),
        n => format!(" ({} re-evaluated)", count(n, "job")),
    }
}

fn print_nodes(nodes: &[Node]) {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let (used, free) = n.usage.map_or(("-".into(), "-".into()), |u| {
                (u.gpus_used.to_string(), u.gpus_free.to_string())
            });
            let usage = n.usage.unwrap_or_default();
            vec![
                n.id.to_string(),
                n.name.clone(),
                n.status.to_string(),
                n.resources.gpus.len().to_string(),
                used,
                free,
                format!("{}/{}", usage.cpu_millis.0, n.resources.cpu_millis.0),
                format!("{}/{}", usage.memory_mib.0, n.resources.memory_mib.0),
                usage.allocations.to_string(),
                key_attributes(&n.attributes),
            ]
        })
        .collect();
    print_table(
        0,
        &[
            "ID",
            "NAME",
            "STATUS",
            "GPUS",
            "USED",
            "FREE",
            "CPU(m)",
            "MEM(MiB)",
            "ALLOCS",
            "ATTRIBUTES",
        ],
        &rows,
    );
}

/// The agent's latest host and GPU readings, as the answering server holds them.
fn print_readings(t: &NodeTelemetry) {
    println!(
        "readings    {}: cpu {} millis busy, memory {} MiB used, disk {} MiB free",
        ms_to_text(t.at.as_millis()),
        t.cpu_used_millis,
        t.memory_used_mib,
        t.disk_free_mib
    );
    if t.gpus.is_empty() {
        return;
    }
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
    let rows: Vec<Vec<String>> = t
        .gpus
        .iter()
        .map(|g| {
            vec![
                g.uuid.clone(),
                format!("{} MiB", g.memory_used_mib),
                opt(g.utilization_percent.map(|u| format!("{u}%"))),
                opt(g.temperature_c.map(|c| format!("{c} C"))),
                opt(g
                    .power_mw
                    .map(|p| format!("{:.1} W", f64::from(p) / 1000.0))),
                opt(g.ecc_uncorrected.map(|e| e.to_string())),
                opt(g.last_xid.map(|x| x.to_string())),
            ]
        })
        .collect();
    print_table(
        2,
        &[
            "UUID", "MEM USED", "UTIL", "TEMP", "POWER", "ECC", "LAST XID",
        ],
        &rows,
    );
}

fn print_node(node: &Node, allocs: &[Allocation]) {
    println!("id          {}", node.id);
    println!("name        {}", node.name);
    match node.drain {
        Some(d) => println!(
            "status      {} (at most {} moving at a time)",
            node.status,
            count(d.max_parallel, "allocation")
        ),
        None => println!("status      {}", node.status),
    }
    let attrs: Vec<String> = node
        .attributes
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "attributes  {}",
        if attrs.is_empty() {
            "none".to_owned()
        } else {
            attrs.join(" ")
        }
    );
    match &node.protections {
        Some(p) => println!("sandbox     {}", p.summary()),
        None => println!("sandbox     not reported by its agent"),
    }
    match &node.offer {
        Some(offer) => println!(
            "prices      {} credits per hour, paid to {}",
            offer.prices.summary(),
            offer
                .farmer
                .as_ref()
                .map_or_else(|| format!("node:{}", node.id), |f| format!("farmer:{f}"))
        ),
        None => println!("prices      free (its agent sets no --price)"),
    }
    match node.address {
        Some(address) => println!("address     {address} (workload ports {})", node.ports),
        None => println!("address     none (its workloads are not routed to)"),
    }
    println!("registered  {}", ms_to_text(node.registered_at.0));
    println!("last seen   {}", ms_to_text(node.last_seen.0));
    let usage = node.usage.unwrap_or_default();
    let res = &node.resources;
    println!(
        "cpu         {}/{} millis reserved",
        usage.cpu_millis.0, res.cpu_millis.0
    );
    println!(
        "memory      {}/{} MiB reserved",
        usage.memory_mib.0, res.memory_mib.0
    );
    if res.gpus.is_empty() {
        println!("gpus        none");
    } else {
        println!(
            "gpus        {} used, {} free of {}",
            usage.gpus_used,
            usage.gpus_free,
            res.gpus.len()
        );
        let rows: Vec<Vec<String>> = res
            .gpus
            .iter()
            .map(|g| {
                let health = match (g.healthy, &g.health_reason) {
                    (true, _) => "healthy".to_owned(),
                    (false, Some(reason)) => format!("unhealthy: {reason}"),
                    (false, None) => "unhealthy".to_owned(),
                };
                let holders: Vec<String> = allocs
                    .iter()
                    .filter(|a| !a.state.is_terminal() && a.gpus.contains(&g.uuid))
                    .map(|a| {
                        if a.is_live() {
                            a.id.to_string()
                        } else {
                            format!("{} (stopping)", a.id)
                        }
                    })
                    .collect();
                vec![
                    g.index.to_string(),
                    g.uuid.clone(),
                    g.model.clone(),
                    format!("{} MiB", g.memory_mib.0),
                    health,
                    list_or_dash(&holders),
                ]
            })
            .collect();
        print_table(
            2,
            &["INDEX", "UUID", "MODEL", "MEMORY", "HEALTH", "ALLOCATION"],
            &rows,
        );
    }
    if let Some(t) = &node.telemetry {
        print_readings(t);
    }
    if allocs.is_empty() {
        println!("allocations none");
        return;
    }
    println!("allocations");
    let rows: Vec<Vec<String>> = allocs
        .iter()
        .map(|a| {
            vec![
                a.id.to_string(),
                a.job_id.to_string(),
                format!("{}[{}]", a.group, a.index),
                list_or_dash(&a.gpus),
                format!("{}/{}", a.state, a.desired),
            ]
        })
        .collect();
    print_table(
        2,
        &["ID", "JOB", "GROUP[INDEX]", "GPUS", "STATE/DESIRED"],
        &rows,
    );
}

impl RegisterArgs {
    /// The registration these flags describe, checked before any request.
    fn registration(self, key: NodePublicKey) -> anyhow::Result<NodeRegistration> {
        let mut attributes = BTreeMap::new();
        for attr in &self.attrs {
            let (k, v) = attr
                .split_once('=')
                .ok_or_else(|| anyhow!("--attr `{attr}` must be KEY=VALUE"))?;
            attributes.insert(k.trim().to_owned(), v.trim().to_owned());
        }
        let gpus = match &self.simulate_gpus {
            Some(spec) => aigrid_agent::simulated::parse(spec, &self.id)?,
            None => Vec::new(),
        };
        let reg = NodeRegistration {
            name: self.name.unwrap_or_else(|| self.id.clone()),
            id: NodeId::new(self.id),
            attributes,
            resources: NodeResources {
                cpu_millis: MilliCpu::new(self.cpu_millis),
                memory_mib: MemoryMib::new(self.memory_mib),
                disk_mib: DiskMib::new(self.disk_mib),
                gpus,
            },
            public_key: Some(key),
            protections: None,
            ports: None,
            data_port: None,
            data_tls: false,
            data_csr: None,
            offer: None,
        };
        reg.validate().map_err(|e| anyhow!("{e}"))?;
        Ok(reg)
    }
}

impl HeartbeatArgs {
    /// The heartbeat these flags describe. GPUs named by index are looked up on the
    /// node at `path`.
    async fn heartbeat(&self, client: &Client, path: &str) -> anyhow::Result<Heartbeat> {
        let mut named: Vec<(&str, bool, Option<String>)> = Vec::new();
        for flag in &self.gpu_unhealthy {
            let (gpu, reason) = match flag.split_once(':') {
                Some((gpu, reason)) => (gpu, Some(reason.trim().to_owned())),
                None => (flag.as_str(), None),
            };
            named.push((gpu.trim(), false, reason.filter(|r| !r.is_empty())));
        }
        for gpu in &self.gpu_healthy {
            named.push((gpu.trim(), true, None));
        }
        let node: Option<Node> = if named.iter().any(|(g, ..)| g.parse::<u32>().is_ok()) {
            Some(client.call::<(), _>(Method::GET, path, None).await?)
        } else {
            None
        };
        let mut gpus = Vec::new();
        for (gpu, healthy, reason) in named {
            let uuid = match (gpu.parse::<u32>(), &node) {
                (Ok(index), Some(node)) => node
                    .resources
                    .gpus
                    .iter()
                    .find(|g| g.index == index)
                    .map(|g| g.uuid.clone())
                    .ok_or_else(|| anyhow!("node {} has no GPU with index {index}", node.id))?,
                _ => gpu.to_owned(),
            };
            gpus.push(GpuHealth {
                uuid,
                healthy,
                reason,
            });
        }
        let mut allocations = Vec::new();
        for flag in &self.allocs {
            let (id, state) = flag
                .split_once('=')
                .ok_or_else(|| anyhow!("--alloc `{flag}` must be ALLOC=STATE"))?;
            let state: AllocState = state.trim().parse().map_err(|_| {
                let states: Vec<&str> = AllocState::ALL.iter().map(|s| s.as_str()).collect();
                anyhow!(
                    "--alloc `{flag}`: the state must be one of {}",
                    states.join(", ")
                )
            })?;
            allocations.push(AllocationReport::new(id.trim().into(), state));
        }
        let hb = Heartbeat {
            gpus,
            allocations,
            ..Heartbeat::default()
        };
        hb.validate().map_err(|e| anyhow!("{e}"))?;
        Ok(hb)
    }
}
