//! `aigrid rollout`: a model sent to the nodes chosen by attributes, in waves,
//! each node staging (fetching and checking every chunk) before it activates the
//! model and attests, signed with its node key, the digest it runs.

use std::collections::BTreeMap;
use std::time::Duration;

use aigrid_api::{
    AbortAfter, CreateRollout, FleetRollout, NodeStageState, RolloutState, Span, Waves,
};
use anyhow::anyhow;
use clap::Subcommand;
use reqwest::Method;

use crate::client::{path_segment, proposed_or, Client};
use crate::output::{ms_to_text, print_json, print_table};

/// `aigrid rollout ...`
#[derive(Subcommand)]
pub enum RolloutCommand {
    /// Send a model to the nodes whose attributes match, in waves; prints the
    /// rollout's id.
    Create {
        /// The model: its digest, or a prefix of it that names one model.
        #[arg(long)]
        model: String,
        /// A node attribute the nodes must have (`site=ghent-1`); repeat for more.
        #[arg(long = "select", value_name = "KEY=VALUE")]
        select: Vec<String>,
        /// The waves: counts of nodes, `all` last (`1,10,100,all`), or `exp` (1, 2,
        /// 4, ... doubling).
        #[arg(long, default_value = "1,10,100,all")]
        waves: Waves,
        /// Stop after this many failed or timed-out nodes (`3`) or this share
        /// (`10%`); by default the first failure stops it.
        #[arg(long)]
        abort_after: Option<AbortAfter>,
        /// How long a node may take to stage and activate the model.
        #[arg(long, default_value = "10m")]
        node_timeout: Span,
        /// Wait until the rollout ends, printing its waves as they move.
        #[arg(long)]
        wait: bool,
    },
    /// Show a rollout: its waves, every node's stage and attested digest.
    Status {
        /// The rollout id.
        id: String,
        /// Follow it until it ends.
        #[arg(short, long)]
        watch: bool,
    },
    /// List rollouts, newest first.
    Ls,
}

fn parse_select(pairs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .filter(|(k, _)| !k.trim().is_empty())
                .ok_or_else(|| anyhow!("--select {pair}: expected KEY=VALUE"))?;
            Ok((k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect()
}

/// Runs a `rollout` subcommand.
pub async fn rollout(client: &Client, cmd: RolloutCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        RolloutCommand::Create {
            model,
            select,
            waves,
            abort_after,
            node_timeout,
            wait,
        } => {
            let request = CreateRollout {
                model: crate::model::resolve(client, &model).await?,
                select: parse_select(&select)?,
                waves,
                abort_after,
                node_timeout,
            };
            request.validate()?;
            let answer = client
                .call_guarded(Method::POST, "/api/v1/rollouts", Some(&request))
                .await?;
            let Some(created): Option<FleetRollout> = proposed_or(answer, json)? else {
                return Ok(());
            };
            if !wait {
                if json {
                    return print_json(&created);
                }
                println!("{}", created.id);
                return Ok(());
            }
            follow(client, created, json).await
        }
        RolloutCommand::Status { id, watch } => {
            let rollout = fetch(client, &id).await?;
            if watch {
                return follow(client, rollout, json).await;
            }
            if json {
                return print_json(&rollout);
            }
            show(&rollout);
            Ok(())
        }
        RolloutCommand::Ls => {
            let all: Vec<FleetRollout> = client
                .call::<(), _>(Method::GET, "/api/v1/rollouts", None)
                .await?;
            if json {
                return print_json(&all);
            }
            let rows: Vec<Vec<String>> = all
                .iter()
                .map(|r| {
                    vec![
                        r.id.clone(),
                        r.name.clone(),
                        crate::model::short(&r.model).to_owned(),
                        r.state.to_string(),
                        progress(r),
                        ms_to_text(r.created_at.0),
                    ]
                })
                .collect();
            print_table(
                0,
                &["ID", "MODEL", "DIGEST", "STATE", "NODES", "CREATED"],
                &rows,
            );
            Ok(())
        }
    }
}

async fn fetch(client: &Client, id: &str) -> anyhow::Result<FleetRollout> {
    let path = format!("/api/v1/rollouts/{}", path_segment(id)?);
    client.call::<(), _>(Method::GET, &path, None).await
}

/// Prints the rollout as it moves until it ends.
async fn follow(client: &Client, mut rollout: FleetRollout, json: bool) -> anyhow::Result<()> {
    let mut last = String::new();
    loop {
        let line = format!(
            "{} {}: {}",
            rollout.state,
            progress(&rollout),
            rollout.description
        );
        if line != last {
            if json {
                print_json(&rollout)?;
            } else {
                println!("{line}");
            }
            last = line;
        }
        if rollout.state != RolloutState::Running {
            if !json {
                show(&rollout);
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        rollout = fetch(client, &rollout.id).await?;
    }
}

/// `12/40 active, 1 failed, 0 timed out`.
fn progress(r: &FleetRollout) -> String {
    let total: usize = r.waves.iter().map(|w| w.nodes.len()).sum();
    format!(
        "{}/{total} active, {} failed, {} timed out",
        r.count(NodeStageState::Active),
        r.count(NodeStageState::Failed),
        r.count(NodeStageState::TimedOut)
    )
}

fn show(r: &FleetRollout) {
    println!("rollout     {}", r.id);
    println!("model       {} ({})", r.name, r.model);
    let select: Vec<String> = r.select.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "select      {}",
        if select.is_empty() {
            "every node".to_owned()
        } else {
            select.join(" ")
        }
    );
    println!(
        "waves       {} (node timeout {})",
        r.waves_asked, r.node_timeout
    );
    if let Some(a) = r.abort_after {
        println!("abort after {a}");
    }
    println!("state       {}: {}", r.state, r.description);
    let rows: Vec<Vec<String>> = r
        .waves
        .iter()
        .flat_map(|w| {
            w.nodes.iter().map(move |n| {
                vec![
                    (w.index + 1).to_string(),
                    n.node.to_string(),
                    n.state.to_string(),
                    n.attested
                        .as_deref()
                        .map_or("-".to_owned(), |d| crate::model::short(d).to_owned()),
                    n.reason.clone().unwrap_or_else(|| "-".to_owned()),
                ]
            })
        })
        .collect();
    print_table(0, &["WAVE", "NODE", "STATE", "ATTESTED", "REASON"], &rows);
}
