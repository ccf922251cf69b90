//! What became of a submitted job: waits, briefly and with a deadline, until the
//! planner has placed every instance of the submitted version or said why some do
//! not fit, and puts that in words.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aigrid_api::{DesiredState, Job, JobId, Unplaced};
use reqwest::Method;

use crate::client::{path_segment, Client};
use crate::output::count;

/// The version of the live job named `name`, if there is one.
pub async fn current_version(client: &Client, name: &str) -> Option<u64> {
    let path = format!("/api/v1/jobs/{}", path_segment(name).ok()?);
    let job: Job = client.call::<(), _>(Method::GET, &path, None).await.ok()?;
    Some(job.version)
}

/// Where the instances of one job version are, as far as the planner got.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Instances the version has in all.
    pub wanted: u32,
    /// Nodes holding its instances, with how many each holds.
    pub placed: BTreeMap<String, u32>,
    /// Groups whose instances do not fit, and why.
    pub unplaced: Vec<Unplaced>,
    /// The job moved on to a later version while we waited.
    pub superseded_by: Option<u64>,
}

impl Outcome {
    fn of(job: &Job, version: u64) -> Outcome {
        let mut placed = BTreeMap::new();
        for a in &job.allocations {
            if a.job_version == version && a.desired == DesiredState::Run {
                *placed.entry(a.node_id.to_string()).or_insert(0) += 1;
            }
        }
        Outcome {
            wanted: job.spec.groups.iter().map(|g| g.count).sum(),
            placed,
            unplaced: job.unplaced.clone(),
            superseded_by: (job.version != version).then_some(job.version),
        }
    }

    fn placed_count(&self) -> u32 {
        self.placed.values().sum()
    }

    /// Whether the planner has finished with the version: all placed, or told why not.
    fn decided(&self) -> bool {
        self.placed_count() >= self.wanted
            || !self.unplaced.is_empty()
            || self.superseded_by.is_some()
    }

    /// The outcome in lines, for the job called `name`.
    pub fn describe(&self, name: &str, waited_secs: u64) -> String {
        let mut out = String::new();
        if let Some(v) = self.superseded_by {
            out.push_str(&format!(
                "  superseded by version {v} while waiting: `aigrid job status {name}` shows it\n"
            ));
            return out;
        }
        let placed = self.placed_count();
        if placed > 0 {
            let nodes: Vec<String> = self
                .placed
                .iter()
                .map(|(node, n)| match n {
                    1 => node.clone(),
                    n => format!("{node} (x{n})"),
                })
                .collect();
            out.push_str(&format!(
                "  placed {} of {} on {}\n",
                placed,
                count(self.wanted, "instance"),
                nodes.join(", ")
            ));
        }
        for u in &self.unplaced {
            out.push_str(&format!(
                "  not placed: {} of group {}: {}\n",
                count(u.count, "instance"),
                u.group,
                u.reason
            ));
        }
        if !self.decided() {
            out.push_str(&format!(
                "  placement not decided within {}: `aigrid job status {name}` shows it\n",
                count(waited_secs, "second")
            ));
        }
        out
    }
}

/// Polls job `id` until the planner has decided on `version` or `limit` passes;
/// answers what it saw last.
pub async fn wait(
    client: &Client,
    id: &JobId,
    version: u64,
    limit: Duration,
) -> anyhow::Result<Outcome> {
    let path = format!("/api/v1/jobs/{}", path_segment(id.as_str())?);
    let deadline = Instant::now() + limit;
    loop {
        let job: Job = client.call::<(), _>(Method::GET, &path, None).await?;
        let outcome = Outcome::of(&job, version);
        if outcome.decided() || Instant::now() >= deadline {
            return Ok(outcome);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_names_nodes_reasons_or_the_wait() {
        let placed = Outcome {
            wanted: 3,
            placed: BTreeMap::from([("a".to_owned(), 2), ("b".to_owned(), 1)]),
            ..Outcome::default()
        };
        assert_eq!(
            placed.describe("j", 5),
            "  placed 3 of 3 instances on a (x2), b\n"
        );
        let refused = Outcome {
            wanted: 1,
            unplaced: vec![Unplaced {
                group: "g".into(),
                count: 1,
                reason: "no node with 1 free H100 GPU".into(),
            }],
            ..Outcome::default()
        };
        assert_eq!(
            refused.describe("j", 5),
            "  not placed: 1 instance of group g: no node with 1 free H100 GPU\n"
        );
        let pending = Outcome {
            wanted: 1,
            ..Outcome::default()
        };
        assert!(pending
            .describe("j", 1)
            .contains("not decided within 1 second:"));
    }
}
