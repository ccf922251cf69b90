//! Client subcommands: `job`, `node`, `cluster`.

use std::path::{Path, PathBuf};

use aigrid_api::{
    ClusterStatus, DeleteJobResponse, Job, JobSpec, JobSummary, JoinRequest, Node,
    SubmitJobResponse,
};
use anyhow::{anyhow, bail, Context};
use clap::Subcommand;
use reqwest::Method;
use serde::Serialize;

use crate::client::Client;

/// `aigrid job ...`
#[derive(Subcommand)]
pub enum JobCommand {
    /// Submit a job from a JSON or TOML file (`-` reads JSON from stdin).
    Submit {
        /// The job file; `.toml` files are read as TOML, others as JSON.
        file: PathBuf,
    },
    /// List jobs.
    Ls,
    /// Show a job with its allocations and unplaced instances.
    Status {
        /// The job id.
        id: String,
    },
    /// Remove a job; its instances are stopped.
    Rm {
        /// The job id.
        id: String,
    },
}

/// `aigrid node ...`
#[derive(Subcommand)]
pub enum NodeCommand {
    /// List nodes.
    Ls,
    /// Show one node.
    Status {
        /// The node id.
        id: String,
    },
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

fn path_segment(id: &str) -> anyhow::Result<&str> {
    if id.is_empty() || id.contains(['/', '?', '#', '%']) || id.chars().any(char::is_whitespace) {
        bail!("`{id}` is not a valid id");
    }
    Ok(id)
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
        JobCommand::Submit { file } => {
            let spec = read_spec(&file)?;
            let resp: SubmitJobResponse = client
                .call(Method::POST, "/api/v1/jobs", Some(&spec))
                .await?;
            if json {
                return print_json(&resp);
            }
            let verb = if resp.created { "created" } else { "updated" };
            println!(
                "job {} {verb}: id {} version {} (evaluation {})",
                spec.name, resp.id, resp.version, resp.eval_id
            );
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
                for a in &job.allocations {
                    println!(
                        "  {}  {}[{}]  node {}  gpus [{}]  {} (desired {})",
                        a.id,
                        a.group,
                        a.index,
                        a.node_id,
                        a.gpus.join(", "),
                        a.state,
                        a.desired
                    );
                }
            }
            for u in &job.unplaced {
                println!("unplaced    {} x{}: {}", u.group, u.missing, u.reason);
            }
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
            println!(
                "{:<24} {:<10} {:>8} {:>10} {:>5}",
                "ID", "STATUS", "CPU(m)", "MEM(MiB)", "GPUS"
            );
            for n in &nodes {
                println!(
                    "{:<24} {:<10} {:>8} {:>10} {:>5}",
                    n.id,
                    n.status.to_string(),
                    n.resources.cpu_millis.0,
                    n.resources.memory_mib.0,
                    n.resources.gpus.len()
                );
            }
        }
        NodeCommand::Status { id } => {
            let path = format!("/api/v1/nodes/{}", path_segment(&id)?);
            let node: Node = client.call::<(), _>(Method::GET, &path, None).await?;
            print_json(&node)?;
        }
    }
    Ok(())
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
