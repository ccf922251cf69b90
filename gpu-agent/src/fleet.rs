//! `aigrid agent --simulate-fleet N`: N agents in one process, each the real
//! [`Agent`] with its own identity, key, HTTP connection, heartbeat and long poll,
//! with simulated GPUs and a driver that only records what it is told to run. It
//! lets the control plane be tested at the scale of a grid on one machine.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aigrid_api::NodeId;
use tokio::sync::watch;

use crate::agent::{Agent, AgentConfig};
use crate::client::ControlClient;
use crate::config::{RunnerConfig, SupervisorLaunch};
use crate::discovery::Discovery;
use crate::driver::RecordingDriver;
use crate::identity::Identity;
use crate::metrics::AgentMetrics;
use crate::runner::Runner;

/// A simulated fleet.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// How many agents.
    pub count: usize,
    /// Each agent's GPUs, as `--simulate-gpus` takes them.
    pub gpus: String,
    /// Node ids are `<prefix>-<n>`.
    pub prefix: String,
    /// Keys derive from this seed and the agent's number, so a restarted fleet is
    /// the same nodes.
    pub seed: [u8; 32],
    /// Agents start evenly over this long, as machines of a real grid would.
    pub ramp: Duration,
    /// The servers.
    pub servers: Vec<String>,
}

/// Why a fleet could not start.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The GPU specification is invalid.
    #[error(transparent)]
    Discovery(#[from] crate::discovery::DiscoveryError),
    /// A runner could not open.
    #[error(transparent)]
    Runner(#[from] crate::runner::RunnerError),
    /// An HTTP client could not be built.
    #[error("building an HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    /// The seed file could not be read or written.
    #[error("fleet seed {path}: {source}")]
    Seed {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The fleet's seed, kept in `data_dir` so a restarted fleet keeps its identities.
pub fn load_seed(data_dir: &Path) -> Result<[u8; 32], FleetError> {
    let path = data_dir.join("fleet-seed");
    let err = |source| FleetError::Seed {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => aigrid_api::auth::unhex::<32>(text.trim()).ok_or_else(|| {
            err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not 64 hex characters",
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let seed: [u8; 32] = rand::random();
            std::fs::create_dir_all(data_dir).map_err(err)?;
            std::fs::write(&path, aigrid_api::auth::hex(&seed)).map_err(err)?;
            Ok(seed)
        }
        Err(e) => Err(err(e)),
    }
}

/// The identity of agent `n` of a fleet.
pub fn member_identity(fleet: &FleetConfig, n: usize) -> Identity {
    let mut material = fleet.seed.to_vec();
    material.extend_from_slice(&(n as u64).to_le_bytes());
    let secret = blake3::derive_key("aigrid fleet node key v1", &material);
    Identity::new(NodeId::new(format!("{}-{n:05}", fleet.prefix)), secret)
}

/// Runs the fleet until `shutdown` turns true.
pub async fn run(
    fleet: FleetConfig,
    agent: AgentConfig,
    metrics: AgentMetrics,
    data_dir: &Path,
    shutdown: watch::Receiver<bool>,
) -> Result<(), FleetError> {
    let driver = Arc::new(RecordingDriver::new());
    let launch = SupervisorLaunch {
        program: std::path::PathBuf::from("aigrid"),
        args: vec!["supervise".into()],
    };
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..fleet.count {
        let identity = Arc::new(member_identity(&fleet, n));
        let discovery = Discovery::fleet_member(&fleet.gpus, identity.node_id.as_str())?;
        let runner = Runner::open(
            RunnerConfig::new(data_dir.join("fleet"), launch.clone()),
            driver.clone(),
        )
        .await?;
        // One multiplexed connection per agent, as many agents as a real grid
        // has, without two sockets each.
        let http = reqwest::Client::builder()
            .http2_prior_knowledge()
            // Simulated agents speak plain HTTP: no root store per client.
            .tls_certs_only(std::iter::empty())
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        let client = ControlClient::new(fleet.servers.clone(), http, identity, n);
        let member = Arc::new(Agent::new(
            agent.clone(),
            client,
            discovery,
            runner,
            metrics.clone(),
        ));
        let delay = fleet.ramp.mul_f64(n as f64 / fleet.count.max(1) as f64);
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            if let Err(e) = member.run(shutdown).await {
                tracing::error!(error = %e, "a fleet agent stopped");
            }
        });
    }
    tracing::info!(agents = fleet.count, "fleet started");
    while tasks.join_next().await.is_some() {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_have_stable_distinct_identities() {
        let fleet = FleetConfig {
            count: 3,
            gpus: "1xH100-80GB".into(),
            prefix: "sim".into(),
            seed: [9; 32],
            ramp: Duration::ZERO,
            servers: vec!["http://127.0.0.1:1".into()],
        };
        let a = member_identity(&fleet, 1);
        assert_eq!(a.node_id.as_str(), "sim-00001");
        assert_eq!(a.key.public(), member_identity(&fleet, 1).key.public());
        assert_ne!(a.key.public(), member_identity(&fleet, 2).key.public());
        let dir = tempfile::tempdir().unwrap();
        let seed = load_seed(dir.path()).unwrap();
        assert_eq!(load_seed(dir.path()).unwrap(), seed);
    }
}
