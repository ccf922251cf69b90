//! Client subcommands: `job`, `node`, `cluster`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::time::Duration;

use aigrid_agent::client::ControlClient;
use aigrid_agent::identity::Identity;
use aigrid_api::{
    AllocState, Allocation, AllocationReport, ClusterStatus, CreateJoinToken, CreatedJoinToken,
    DeleteJobResponse, DiskMib, DrainSpec, GpuHealth, Heartbeat, HeartbeatResponse, Job, JobSpec,
    JobSummary, JoinRequest, JoinToken, JoinTokenInfo, MemoryMib, MilliCpu, Node, NodeId, NodeKey,
    NodePublicKey, NodeRegistration, NodeResources, NodeTelemetry, RegisterNodeResponse,
    SubmitJobResponse,
};
use anyhow::{anyhow, Context};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde::Serialize;

use crate::client::{path_segment, Client};
use crate::output::count;
use crate::{logs, placement};

/// `aigrid job ...`
#[derive(Subcommand)]
pub enum JobCommand {
    /// Submit a job from a JSON or TOML file (`-` reads JSON from stdin).
    ///
    /// Then waits a few seconds for the placement and says where the job was
    /// placed (its nodes) or why not (the planner's reasons); an identical
    /// resubmit says it is unchanged.
    Submit {
        /// The job file; `.toml` files are read as TOML, others as JSON.
        file: PathBuf,
        /// Seconds to wait for the placement (0: answer once the job is committed).
        #[arg(long, default_value_t = 5)]
        wait_secs: u64,
    },
    /// List jobs.
    Ls,
    /// Show a job with its allocations and unplaced instances.
    Status {
        /// The job id or name.
        id: String,
    },
    /// Remove a job; its instances are stopped.
    Rm {
        /// The job id or name.
        id: String,
    },
    /// Print the output of a job's allocations, as their agents last shipped it.
    Logs {
        /// The job id or name.
        id: String,
        /// Print standard error instead of standard output.
        #[arg(long)]
        stderr: bool,
        /// Keep printing output as it arrives, until Ctrl-C.
        #[arg(short, long)]
        follow: bool,
    },
}

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

/// `aigrid alloc ...`
#[derive(Subcommand)]
pub enum AllocCommand {
    /// Print the end of an allocation's output, as its agent last shipped it.
    Logs {
        /// The allocation id, or a prefix of it that names one allocation.
        id: String,
        /// Print standard error instead of standard output.
        #[arg(long)]
        stderr: bool,
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

/// `aigrid cluster ...`
#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Show the leader, term, indices and members.
    Status,
    /// Add a server (started with `--join` or with an empty data dir) as a voter.
    Join {
        /// The new server's id.
        #[arg(long)]
        id: u64,
        /// Its HOST:PORT.
        #[arg(long)]
        addr: String,
    },
    /// Remove a server from the voters.
    Leave {
        /// The server's id.
        id: u64,
    },
}

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints `rows` under `header`, `indent` spaces in, each column as wide as its
/// widest cell.
fn print_table(indent: usize, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let print_row = |cells: &mut dyn Iterator<Item = &str>| {
        let line: Vec<String> = cells
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{:indent$}{}", "", line.join("  ").trim_end());
    };
    print_row(&mut header.iter().copied());
    for row in rows {
        print_row(&mut row.iter().map(String::as_str));
    }
}

/// `-` for an empty list, the items joined by `,` otherwise.
fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(",")
    }
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

/// Reads a job spec from JSON or TOML, so mistakes are reported before any request.
pub fn read_spec(path: &Path) -> anyhow::Result<JobSpec> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading the job from stdin")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    let is_toml = path.extension().is_some_and(|e| e == "toml");
    let spec: JobSpec = if is_toml {
        toml::from_str(&text)
            .map_err(|e| anyhow!("{}: {}", path.display(), e.message().replace('\n', " ")))?
    } else {
        let de = &mut serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(de)
            .map_err(|e| anyhow!("{}: {}: {}", path.display(), e.path(), e.inner()))?
    };
    spec.validate()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(spec)
}

fn ms_to_text(millis: u64) -> String {
    let secs = millis / 1000;
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    let days_since_epoch = d;
    // Civil date from days since the Unix epoch (proleptic Gregorian).
    let z = days_since_epoch as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02}:{s:02}Z")
}

/// Runs a `job` subcommand.
pub async fn job(client: &Client, cmd: JobCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        JobCommand::Submit { file, wait_secs } => {
            let spec = read_spec(&file)?;
            // The version before: an unchanged resubmit answers the version it found.
            let before = placement::current_version(client, &spec.name).await;
            let resp: SubmitJobResponse = client
                .call(Method::POST, "/api/v1/jobs", Some(&spec))
                .await?;
            if json {
                return print_json(&resp);
            }
            let verb = match (resp.created, before) {
                (true, _) => "created",
                (false, Some(v)) if v == resp.version => "unchanged",
                (false, _) => "updated",
            };
            println!(
                "job {} {verb}: id {} version {} (evaluation {})",
                spec.name, resp.id, resp.version, resp.eval_id
            );
            if wait_secs > 0 {
                let outcome = placement::wait(
                    client,
                    &resp.id,
                    resp.version,
                    Duration::from_secs(wait_secs),
                )
                .await?;
                print!("{}", outcome.describe(&spec.name, wait_secs));
            }
        }
        JobCommand::Ls => {
            let jobs: Vec<JobSummary> = client
                .call::<(), _>(Method::GET, "/api/v1/jobs", None)
                .await?;
            if json {
                return print_json(&jobs);
            }
            println!(
                "{:<36}  {:<24} {:<9} {:>4} {:>4}  {:<8} {:>9}  SUBMITTED",
                "ID", "NAME", "KIND", "PRIO", "VER", "STATUS", "RUNNING"
            );
            for j in &jobs {
                println!(
                    "{:<36}  {:<24} {:<9} {:>4} {:>4}  {:<8} {:>9}  {}",
                    j.id,
                    j.name,
                    j.kind.to_string(),
                    j.priority,
                    j.version,
                    j.status.to_string(),
                    format!("{}/{}", j.running, j.instances),
                    ms_to_text(j.submitted_at.0)
                );
            }
        }
        JobCommand::Status { id } => {
            let path = format!("/api/v1/jobs/{}", path_segment(&id)?);
            let job: Job = client.call::<(), _>(Method::GET, &path, None).await?;
            if json {
                return print_json(&job);
            }
            println!("id          {}", job.id);
            println!("name        {}", job.name);
            println!("kind        {}", job.spec.kind);
            println!("priority    {}", job.spec.priority);
            println!("version     {}", job.version);
            println!("status      {}", job.status);
            println!("submitted   {}", ms_to_text(job.submitted_at.0));
            println!("updated     {}", ms_to_text(job.updated_at.0));
            for g in &job.spec.groups {
                println!("group       {} x{}", g.name, g.count);
            }
            if job.allocations.is_empty() {
                println!("allocations none");
            } else {
                println!("allocations");
                let mut allocs: Vec<&Allocation> = job.allocations.iter().collect();
                allocs.sort_by(|a, b| (&a.group, a.index).cmp(&(&b.group, b.index)));
                let rows: Vec<Vec<String>> = allocs
                    .iter()
                    .map(|a| {
                        vec![
                            a.id.to_string(),
                            a.node_id.to_string(),
                            format!("{}[{}]", a.group, a.index),
                            list_or_dash(&a.gpus),
                            format!("{}/{}", a.state, a.desired),
                            match a.restarts {
                                0 => "-".to_owned(),
                                n => n.to_string(),
                            },
                            a.reason.clone().unwrap_or_else(|| "-".to_owned()),
                        ]
                    })
                    .collect();
                print_table(
                    2,
                    &[
                        "ID",
                        "NODE",
                        "GROUP[INDEX]",
                        "GPUS",
                        "STATE/DESIRED",
                        "RESTARTS",
                        "REASON",
                    ],
                    &rows,
                );
            }
            for u in &job.unplaced {
                println!("unplaced    {} x{}: {}", u.group, u.count, u.reason);
            }
        }
        JobCommand::Logs { id, stderr, follow } => {
            logs::job_logs(client, &id, stderr, follow).await?;
        }
        JobCommand::Rm { id } => {
            let path = format!("/api/v1/jobs/{}", path_segment(&id)?);
            let resp: DeleteJobResponse = client.call::<(), _>(Method::DELETE, &path, None).await?;
            if json {
                return print_json(&resp);
            }
            println!("job {} removed (evaluation {})", resp.id, resp.eval_id);
        }
    }
    Ok(())
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
            let node: Node = client.call::<(), _>(Method::POST, &path, None).await?;
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
        reqwest::Client::new(),
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

/// `aigrid alloc ...`
pub async fn alloc(client: &Client, cmd: AllocCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        AllocCommand::Logs { id, stderr } => {
            let id = logs::resolve_alloc(client, &id).await?;
            let logs = logs::fetch(client, &id).await?;
            if json {
                return print_json(&logs);
            }
            let text = if stderr { &logs.stderr } else { &logs.stdout };
            print!("{text}");
            if logs.updated_at.is_none() {
                eprintln!("(no output shipped yet by node {})", logs.node_id);
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

fn print_cluster(status: &ClusterStatus) {
    println!("server        {}", status.id);
    match status.leader {
        Some(l) => println!("leader        {l}"),
        None => println!("leader        none (election in progress or no quorum)"),
    }
    println!("term          {}", status.term);
    println!("commit index  {}", status.commit_index);
    println!("applied index {}", status.applied_index);
    println!("members");
    for m in &status.members {
        let lead = if m.is_leader { "  leader" } else { "" };
        println!("  {:<4} {:<24} {}{lead}", m.id, m.addr, m.role);
    }
}

/// Runs a `cluster` subcommand.
pub async fn cluster(client: &Client, cmd: ClusterCommand, json: bool) -> anyhow::Result<()> {
    let status: ClusterStatus = match cmd {
        ClusterCommand::Status => {
            client
                .call::<(), _>(Method::GET, "/api/v1/cluster", None)
                .await?
        }
        ClusterCommand::Join { id, addr } => {
            let req = JoinRequest { id, addr };
            req.validate().map_err(|e| anyhow!("{e}"))?;
            client
                .call(Method::POST, "/api/v1/cluster/members", Some(&req))
                .await?
        }
        ClusterCommand::Leave { id } => {
            client
                .call::<(), _>(
                    Method::DELETE,
                    &format!("/api/v1/cluster/members/{id}"),
                    None,
                )
                .await?
        }
    };
    if json {
        return print_json(&status);
    }
    print_cluster(&status);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_render_as_utc() {
        assert_eq!(ms_to_text(0), "1970-01-01 00:00:00Z");
        assert_eq!(ms_to_text(1_795_000_000_000), "2026-11-18 11:06:40Z");
    }

    #[test]
    fn toml_and_json_specs_read_alike() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("job.json");
        std::fs::write(
            &json,
            r#"{"name":"a","kind":"batch","groups":[{"name":"g","resources":{"cpu_millis":100,"memory_mib":64},"task":{"driver":"exec","command":"/bin/true"}}]}"#,
        )
        .unwrap();
        let toml_path = dir.path().join("job.toml");
        std::fs::write(
            &toml_path,
            "name = \"a\"\nkind = \"batch\"\n[[groups]]\nname = \"g\"\n[groups.resources]\ncpu_millis = 100\nmemory_mib = 64\n[groups.task]\ndriver = \"exec\"\ncommand = \"/bin/true\"\n",
        )
        .unwrap();
        assert_eq!(read_spec(&json).unwrap(), read_spec(&toml_path).unwrap());
        std::fs::write(&json, r#"{"name":"a","kind":"batch","groups":[]}"#).unwrap();
        assert!(read_spec(&json).unwrap_err().to_string().contains("groups"));
    }
}
