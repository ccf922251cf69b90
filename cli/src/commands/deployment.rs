//! `aigrid deployment`: a service's rollout shown (once, or followed until it
//! settles) and steered: pause, resume, promote, abort.

use std::time::Duration;

use aigrid_api::{Deployment, DeploymentAction, DeploymentState, SteerDeployment};
use clap::Subcommand;
use reqwest::Method;

use crate::client::{path_segment, proposed_or, Client};
use crate::output::{ms_to_text, print_json, print_table};

/// `aigrid deployment ...`
#[derive(Subcommand)]
pub enum DeploymentCommand {
    /// Show a job's latest rollout: its state, canaries, instances placed and
    /// healthy per group, and the canaries' share of the traffic.
    Status {
        /// The job id or name.
        job: String,
        /// Follow it, printing each change, until it settles (successful, failed,
        /// reverted, cancelled) or waits for a promotion.
        #[arg(short, long)]
        watch: bool,
    },
    /// Stop replacing instances until resumed; a paused rollout stays paused across
    /// leader changes and never fails its progress deadline.
    Pause(Steer),
    /// Go on after a pause.
    Resume(Steer),
    /// Let the healthy canaries replace their instances and roll the rest; a
    /// proposal for the circle's quorum when its policy guards `rollout.promote`.
    Promote(Steer),
    /// Stop the rollout and run the last successful version again.
    Abort(Steer),
}

/// Which rollout to steer.
#[derive(clap::Args)]
pub struct Steer {
    /// The job id or name.
    job: String,
    /// The version meant; refused if another one is rolling out by now.
    #[arg(long, value_name = "VERSION")]
    rollout_version: Option<u64>,
}

/// Runs a `deployment` subcommand.
pub async fn deployment(client: &Client, cmd: DeploymentCommand, json: bool) -> anyhow::Result<()> {
    let (steer, action) = match cmd {
        DeploymentCommand::Status { job, watch } => return status(client, &job, watch, json).await,
        DeploymentCommand::Pause(s) => (s, DeploymentAction::Pause),
        DeploymentCommand::Resume(s) => (s, DeploymentAction::Resume),
        DeploymentCommand::Promote(s) => (s, DeploymentAction::Promote),
        DeploymentCommand::Abort(s) => (s, DeploymentAction::Abort),
    };
    let path = format!(
        "/api/v1/jobs/{}/deployment/{action}",
        path_segment(&steer.job)?
    );
    let body = SteerDeployment {
        version: steer.rollout_version,
    };
    let answer = client
        .call_guarded(Method::POST, &path, Some(&body))
        .await?;
    let Some(now): Option<Deployment> = proposed_or(answer, json)? else {
        return Ok(());
    };
    if json {
        return print_json(&now);
    }
    show(&now);
    Ok(())
}

async fn fetch(client: &Client, job: &str) -> anyhow::Result<Deployment> {
    let path = format!("/api/v1/jobs/{}/deployment", path_segment(job)?);
    client.call::<(), _>(Method::GET, &path, None).await
}

/// Whether a rollout waits for nothing but a person (or nothing at all).
fn settled(d: &Deployment) -> bool {
    !d.state.is_active() || d.state == DeploymentState::AwaitingPromotion
}

async fn status(client: &Client, job: &str, watch: bool, json: bool) -> anyhow::Result<()> {
    let mut last = fetch(client, job).await?;
    if !watch {
        if json {
            return print_json(&last);
        }
        show(&last);
        return Ok(());
    }
    if json {
        print_json(&last)?;
    } else {
        show(&last);
    }
    while !settled(&last) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = fetch(client, job).await?;
        let moved = (
            now.state,
            now.placed,
            now.healthy,
            now.unhealthy,
            &now.description,
        ) != (
            last.state,
            last.placed,
            last.healthy,
            last.unhealthy,
            &last.description,
        );
        if moved {
            if json {
                print_json(&now)?;
            } else {
                println!("{}", progress_line(&now));
            }
        }
        last = now;
    }
    Ok(())
}

/// `[#####-----] 5/10 healthy`, for `healthy` of `desired`.
fn bar(healthy: u32, desired: u32) -> String {
    const WIDTH: u32 = 20;
    let filled = (healthy.min(desired) * WIDTH)
        .checked_div(desired)
        .unwrap_or(WIDTH);
    let filled = usize::try_from(filled).unwrap_or(0);
    let empty = usize::try_from(WIDTH).unwrap_or(0).saturating_sub(filled);
    format!(
        "[{}{}] {healthy}/{desired} healthy",
        "#".repeat(filled),
        "-".repeat(empty)
    )
}

fn progress_line(d: &Deployment) -> String {
    format!(
        "{} {} ({} placed, {} unhealthy): {}",
        d.state,
        bar(d.healthy, d.desired),
        d.placed,
        d.unhealthy,
        d.description
    )
}

fn show(d: &Deployment) {
    let stable = d
        .stable_version
        .map_or(String::new(), |v| format!(", last successful {v}"));
    println!("job         {} (version {}{stable})", d.job, d.version);
    println!("state       {}: {}", d.state, d.description);
    println!("progress    {}", bar(d.healthy, d.desired));
    println!("started     {}", ms_to_text(d.created_at.0));
    if let Some(deadline) = d.progress_deadline_at {
        println!("deadline    {}", ms_to_text(deadline.0));
    }
    if let Some(v) = d.reverted_to {
        println!("reverted    as version {v}");
    }
    let rows: Vec<Vec<String>> = d
        .groups
        .iter()
        .map(|g| {
            vec![
                g.name.clone(),
                g.desired.to_string(),
                format!("{}/{}", g.canaries.len(), g.desired_canaries),
                g.placed.to_string(),
                g.healthy.to_string(),
                g.unhealthy.to_string(),
                if g.promoted { "yes" } else { "no" }.to_owned(),
                g.canary_percent
                    .map_or("-".to_owned(), |p| format!("{p}% to canaries")),
            ]
        })
        .collect();
    print_table(
        0,
        &[
            "GROUP",
            "DESIRED",
            "CANARIES",
            "PLACED",
            "HEALTHY",
            "UNHEALTHY",
            "PROMOTED",
            "TRAFFIC",
        ],
        &rows,
    );
}
