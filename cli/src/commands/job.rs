//! `aigrid job` (submit, list, inspect, remove jobs) and `aigrid alloc` (an
//! allocation's output).

use std::path::{Path, PathBuf};
use std::time::Duration;

use aigrid_api::{
    Allocation, DeleteJobResponse, Job, JobSpec, JobSummary, JobVersion, RevertJob,
    SubmitJobResponse,
};
use anyhow::{anyhow, Context};
use clap::Subcommand;
use reqwest::Method;

use crate::client::{path_segment, proposed_or, Client};
use crate::output::{list_or_dash, ms_to_text, print_json, print_table};
use crate::{logs, placement};

/// `aigrid job ...`
#[derive(Subcommand)]
pub enum JobCommand {
    /// Submit a job from a JSON or TOML file (`-` reads JSON from stdin).
    ///
    /// Then waits a few seconds for the placement and says where the job was
    /// placed (its nodes) or why not (the planner's reasons); an identical
    /// resubmit says it is unchanged. Submitting a job whose name is live makes
    /// its next version (`job update` says the same); a group with an `update`
    /// block then rolls out under it (`aigrid deployment status NAME`).
    #[command(visible_alias = "update")]
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
    /// List the versions of a job kept (the running one and up to ten before it).
    History {
        /// The job id or name.
        id: String,
    },
    /// Show what changed between two versions of a job.
    Diff {
        /// The job id or name.
        id: String,
        /// The older version.
        from: u64,
        /// The newer version.
        to: u64,
    },
    /// Run a kept version of a job again, as a new version.
    Revert {
        /// The job id or name.
        id: String,
        /// The version to run again.
        #[arg(value_name = "VERSION")]
        kept: u64,
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

/// Runs a `job` subcommand.
pub async fn job(client: &Client, cmd: JobCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        JobCommand::Submit { file, wait_secs } => {
            let spec = read_spec(&file)?;
            // The version before: an unchanged resubmit answers the version it found.
            let before = placement::current_version(client, &spec.name).await;
            let answer = client
                .call_guarded(Method::POST, "/api/v1/jobs", Some(&spec))
                .await?;
            let Some(resp): Option<SubmitJobResponse> = proposed_or(answer, json)? else {
                return Ok(());
            };
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
                match &g.scaling {
                    Some(s) => println!(
                        "group       {} x{} (scales {}..{} at {} per replica)",
                        g.name,
                        g.count,
                        s.min,
                        s.max,
                        s.targets()
                    ),
                    None => println!("group       {} x{}", g.name, g.count),
                }
            }
            // The latest few changes of count, newest last, each with its reason.
            let shown = job.scale_events.len().saturating_sub(5);
            for e in &job.scale_events[shown..] {
                println!(
                    "scaled      {} {} -> {} at {}: {}",
                    e.group,
                    e.from,
                    e.to,
                    ms_to_text(e.at.0),
                    e.reason
                );
            }
            if let Some(d) = &job.deployment {
                println!(
                    "rollout     version {} {} ({}/{} healthy): {} (aigrid deployment status {})",
                    d.version, d.state, d.healthy, d.desired, d.description, job.name
                );
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
                            format!(
                                "{}/{}{}",
                                a.state,
                                a.desired,
                                if a.canary { " (canary)" } else { "" }
                            ),
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
        JobCommand::History { id } => {
            let versions = versions(client, &id).await?;
            if json {
                return print_json(&versions);
            }
            let rows: Vec<Vec<String>> = versions
                .iter()
                .map(|v| {
                    vec![
                        v.version.to_string(),
                        ms_to_text(v.submitted_at.0),
                        v.by.as_ref().map_or("-".to_owned(), ToString::to_string),
                        if v.current { "running" } else { "-" }.to_owned(),
                        v.spec.instance_count().to_string(),
                    ]
                })
                .collect();
            print_table(
                0,
                &["VERSION", "SUBMITTED", "BY", "STATE", "INSTANCES"],
                &rows,
            );
        }
        JobCommand::Diff { id, from, to } => {
            let versions = versions(client, &id).await?;
            let spec = |n: u64| {
                versions
                    .iter()
                    .find(|v| v.version == n)
                    .map(|v| serde_json::to_value(&v.spec))
                    .transpose()?
                    .ok_or_else(|| {
                        anyhow!("version {n} of `{id}` is not kept (aigrid job history {id})")
                    })
            };
            let (old, new) = (spec(from)?, spec(to)?);
            if json {
                return print_json(&serde_json::json!({"from": old, "to": new}));
            }
            print!("{}", super::chain::diff(&old, &new));
        }
        JobCommand::Revert { id, kept: version } => {
            let path = format!("/api/v1/jobs/{}/revert", path_segment(&id)?);
            let answer = client
                .call_guarded(Method::POST, &path, Some(&RevertJob { version }))
                .await?;
            let Some(resp): Option<SubmitJobResponse> = proposed_or(answer, json)? else {
                return Ok(());
            };
            if json {
                return print_json(&resp);
            }
            println!(
                "job {id} runs version {version} again, as version {} (evaluation {})",
                resp.version, resp.eval_id
            );
        }
        JobCommand::Logs { id, stderr, follow } => {
            logs::job_logs(client, &id, stderr, follow).await?;
        }
        JobCommand::Rm { id } => {
            let path = format!("/api/v1/jobs/{}", path_segment(&id)?);
            let answer = client
                .call_guarded::<(), _>(Method::DELETE, &path, None)
                .await?;
            let Some(resp): Option<DeleteJobResponse> = proposed_or(answer, json)? else {
                return Ok(());
            };
            if json {
                return print_json(&resp);
            }
            println!("job {} removed (evaluation {})", resp.id, resp.eval_id);
        }
    }
    Ok(())
}

/// The versions of job `id` kept, newest first.
async fn versions(client: &Client, id: &str) -> anyhow::Result<Vec<JobVersion>> {
    let path = format!("/api/v1/jobs/{}/versions", path_segment(id)?);
    client.call::<(), _>(Method::GET, &path, None).await
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

#[cfg(test)]
mod tests {
    use super::*;

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
