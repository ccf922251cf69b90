//! Fleet rollouts over the real state machine: nodes chosen by attributes, cut
//! into waves; each wave starts once the last is done; attestations are checked
//! against the node key and the rollout's digest; failures and timeouts past the
//! abort threshold stop the rollout mid-wave.

use aigrid_api::auth::NodeKey;
use aigrid_api::rollout::attestation_message;
use aigrid_api::{
    CreateRollout, FleetRollout, ModelReport, NodeId, NodeRegistration, NodeStageState,
    OriginShare, RolloutState, Timestamp,
};
use aigrid_consensus::state_machine::StateMachine;
use aigrid_scheduler::state::{Applied, ClusterState, Command, CommandOutput, TokenUse};
use aigrid_scheduler::testkit::model_registration;
use serde_json::json;

struct Fleet {
    state: ClusterState,
    index: u64,
    now: u64,
}

fn key(n: usize) -> NodeKey {
    NodeKey::from_secret([u8::try_from(n).unwrap() + 1; 32])
}

fn node(n: usize) -> NodeId {
    NodeId::new(format!("cam-{n:02}"))
}

impl Fleet {
    /// `sites[n]` is node n's site; every node has its own key.
    fn new(sites: &[&str]) -> (Fleet, String) {
        let mut fleet = Fleet {
            state: ClusterState::default(),
            index: 0,
            now: 1_000,
        };
        let at = fleet.at();
        fleet
            .apply(Command::CreateJoinToken {
                id: "t1".into(),
                secret_hash: aigrid_api::auth::hash_secret("s3cret"),
                ttl_secs: 3600,
                max_uses: None,
                description: None,
                at,
            })
            .unwrap();
        for (n, site) in sites.iter().enumerate() {
            let mut reg: NodeRegistration = serde_json::from_value(json!({
                "id": node(n), "name": node(n),
                "attributes": {"site": site, "country": "BE"},
                "resources": {"cpu_millis": 4000, "memory_mib": 8192, "disk_mib": 100000, "gpus": []}
            }))
            .unwrap();
            reg.public_key = Some(key(n).public());
            reg.data_port = Some(7100 + u16::try_from(n).unwrap());
            let at = fleet.at();
            fleet
                .apply(Command::RegisterNode {
                    node: reg,
                    join_token: Some(TokenUse {
                        id: "t1".into(),
                        secret_hash: aigrid_api::auth::hash_secret("s3cret"),
                    }),
                    address: Some(std::net::Ipv4Addr::new(10, 0, 0, 1).into()),
                    at,
                })
                .unwrap();
        }
        let registration = model_registration("detector", 3, 1);
        let digest = registration.manifest.manifest.digest().to_string();
        let at = fleet.at();
        fleet
            .apply(Command::RegisterModel { registration, at })
            .unwrap();
        (fleet, digest)
    }

    fn at(&self) -> Timestamp {
        Timestamp::from_millis(self.now)
    }

    fn apply(&mut self, command: Command) -> CommandOutput {
        self.index += 1;
        let out = self.state.apply(self.index, command);
        self.state.check_invariants().unwrap();
        out
    }

    fn create(&mut self, request: serde_json::Value) -> CommandOutput {
        let request: CreateRollout = serde_json::from_value(request).unwrap();
        let at = self.at();
        self.apply(Command::CreateRollout {
            id: "r1".into(),
            request,
            at,
            by: None,
        })
    }

    fn rollout(&self) -> FleetRollout {
        self.state.rollout("r1").unwrap()
    }

    /// Node `n` reports `digest` active, signed with `signer`'s key.
    fn attest(&mut self, n: usize, digest: &str, signer: usize) {
        let message = attestation_message("r1", &node(n), digest);
        let signature = hex::encode(key(signer).sign_bytes(&message));
        self.report(
            n,
            ModelReport {
                rollout: "r1".into(),
                digest: digest.into(),
                state: NodeStageState::Active,
                reason: None,
                signature: Some(signature),
            },
        );
    }

    fn fail(&mut self, n: usize, digest: &str) {
        self.report(
            n,
            ModelReport {
                rollout: "r1".into(),
                digest: digest.into(),
                state: NodeStageState::Failed,
                reason: Some("chunk 7 does not match the manifest".into()),
                signature: None,
            },
        );
    }

    fn report(&mut self, n: usize, report: ModelReport) {
        let at = self.at();
        self.apply(Command::ReportModels {
            node_id: node(n),
            models: vec![report],
            at,
        })
        .unwrap();
    }

    /// The nodes in `state`, by number.
    fn nodes_in(&self, state: NodeStageState) -> Vec<usize> {
        let mut out: Vec<usize> = self
            .rollout()
            .waves
            .iter()
            .flat_map(|w| &w.nodes)
            .filter(|s| s.state == state)
            .map(|s| s.node.as_str()[4..].parse().unwrap())
            .collect();
        out.sort_unstable();
        out
    }

    fn asked(&self, n: usize) -> bool {
        !self.state.assignments(&node(n)).unwrap().models.is_empty()
    }
}

#[test]
fn waves_start_in_turn_and_every_node_attests_the_rollouts_digest() {
    let sites = ["a", "a", "b", "a", "a", "a", "a"];
    let (mut fleet, digest) = Fleet::new(&sites);
    let out = fleet.create(json!({"model": digest, "select": {"site": "a"}, "waves": "1,2,all"}));
    let Ok(Applied::RolloutChanged(r)) = out else {
        panic!("{out:?}")
    };
    let sizes: Vec<usize> = r.waves.iter().map(|w| w.nodes.len()).collect();
    assert_eq!(sizes, vec![1, 2, 3], "six nodes at site a");
    assert_eq!(fleet.nodes_in(NodeStageState::Staging), vec![0]);
    assert!(fleet.asked(0) && !fleet.asked(1) && !fleet.asked(2));
    let assigned = fleet.state.assignments(&node(0)).unwrap().models;
    assert_eq!(
        (assigned[0].digest.as_str(), assigned[0].name.as_str()),
        (digest.as_str(), "detector")
    );

    assert!(assigned[0].peers.is_empty(), "nobody holds it yet");
    assert_eq!(
        assigned[0].origin_share,
        Some(OriginShare { index: 0, of: 1 }),
        "alone, the whole model is its to fetch from the store"
    );
    fleet.now += 500;
    fleet.attest(0, &digest, 0);
    assert_eq!(fleet.nodes_in(NodeStageState::Staging), vec![1, 3]);
    // The next wave is told who holds the model already, and where, then who
    // stages it beside it (asked what it holds as it grows); the two share what
    // they fetch from the store.
    let shares: Vec<OriginShare> = [1, 3]
        .iter()
        .map(|n| {
            let models = fleet.state.assignments(&node(*n)).unwrap().models;
            let peers: Vec<(&str, bool, bool)> = models[0]
                .peers
                .iter()
                .map(|p| (p.url.as_str(), p.same_site, p.whole))
                .collect();
            let other = if *n == 1 {
                "http://10.0.0.1:7103"
            } else {
                "http://10.0.0.1:7101"
            };
            let expected = vec![("http://10.0.0.1:7100", true, true), (other, true, false)];
            assert_eq!(peers, expected, "node {n}");
            models[0].origin_share.unwrap()
        })
        .collect();
    assert_eq!(
        shares,
        vec![
            OriginShare { index: 0, of: 2 },
            OriginShare { index: 1, of: 2 }
        ]
    );
    assert!(!fleet.asked(0), "an active node is asked nothing more");
    fleet.attest(1, &digest, 1);
    assert_eq!(
        fleet.nodes_in(NodeStageState::Staging),
        vec![3],
        "the wave waits for all"
    );
    fleet.attest(3, &digest, 3);
    assert_eq!(fleet.nodes_in(NodeStageState::Staging), vec![4, 5, 6]);
    for n in [4, 5, 6] {
        fleet.attest(n, &digest, n);
    }
    let r = fleet.rollout();
    assert_eq!(r.state, RolloutState::Succeeded, "{r:?}");
    // Every node attests the digest approved, signed by its own key.
    for stage in r.waves.iter().flat_map(|w| &w.nodes) {
        assert_eq!(stage.attested.as_deref(), Some(digest.as_str()));
        let n: usize = stage.node.as_str()[4..].parse().unwrap();
        let signature = hex::decode(stage.signature.as_ref().unwrap()).unwrap();
        let message = attestation_message("r1", &stage.node, &digest);
        assert!(key(n).public().verify_bytes(&message, &signature));
    }
    // Replicas agree: a restored snapshot holds the same rollout.
    let mut other = ClusterState::default();
    other.restore(&fleet.state.snapshot().unwrap()).unwrap();
    assert_eq!(other.rollout("r1").unwrap(), r);
}

#[test]
fn a_forged_or_wrong_attestation_fails_the_node() {
    let (mut fleet, digest) = Fleet::new(&["a", "a", "a"]);
    fleet
        .create(json!({"model": digest, "waves": "3", "abort_after": "3"}))
        .unwrap();
    // Signed by another node's key.
    fleet.attest(0, &digest, 1);
    // Honestly signed, but another digest.
    fleet.attest(1, &"f".repeat(64), 1);
    fleet.attest(2, &digest, 2);
    let r = fleet.rollout();
    let reason = |n: usize| r.waves[0].nodes[n].reason.clone().unwrap_or_default();
    assert_eq!(fleet.nodes_in(NodeStageState::Failed), vec![0, 1]);
    assert!(reason(0).contains("does not verify"), "{}", reason(0));
    assert!(reason(1).contains("not the rollout's"), "{}", reason(1));
    assert_eq!(
        r.state,
        RolloutState::Succeeded,
        "two failures stay under three"
    );
}

#[test]
fn the_abort_threshold_stops_a_wave_and_the_waves_after_it() {
    let sites = ["a"; 10];
    let (mut fleet, digest) = Fleet::new(&sites);
    fleet
        .create(
            json!({"model": digest, "waves": "2,8", "abort_after": "20%",
                       "node_timeout": "30s"}),
        )
        .unwrap();
    fleet.attest(0, &digest, 0);
    fleet.attest(1, &digest, 1);
    assert_eq!(
        fleet.nodes_in(NodeStageState::Staging),
        (2..10).collect::<Vec<_>>()
    );
    // One node fails: one of the two allowed (20% of 10).
    fleet.fail(2, &digest);
    assert_eq!(fleet.rollout().state, RolloutState::Running);
    // Another never answers: past its timeout, the leader says so.
    fleet.now += 29_000;
    assert!(fleet.state.rollouts_timing_out(fleet.at()).is_empty());
    for n in 4..10 {
        fleet.attest(n, &digest, n);
    }
    fleet.now += 2_000;
    assert_eq!(
        fleet.state.rollouts_timing_out(fleet.at()),
        vec!["r1".to_owned()]
    );
    let at = fleet.at();
    fleet
        .apply(Command::RolloutTimeouts {
            id: "r1".into(),
            at,
        })
        .unwrap();
    let r = fleet.rollout();
    assert_eq!(r.state, RolloutState::Aborted, "{r:?}");
    assert_eq!(fleet.nodes_in(NodeStageState::TimedOut), vec![3]);
    assert!(
        r.description.contains("threshold of 2"),
        "{}",
        r.description
    );

    // Mid-wave: with the first failure as the threshold, the wave's unfinished
    // nodes are skipped and no later wave starts.
    let (mut fleet, digest) = Fleet::new(&sites);
    fleet
        .create(json!({"model": digest, "waves": "4,all"}))
        .unwrap();
    fleet.attest(0, &digest, 0);
    fleet.fail(1, &digest);
    let r = fleet.rollout();
    assert_eq!(r.state, RolloutState::Aborted);
    assert_eq!(
        fleet.nodes_in(NodeStageState::Skipped),
        (2..10).collect::<Vec<_>>()
    );
    assert!(!fleet.asked(2), "a skipped node is asked nothing");
    // A late attestation from a skipped node changes nothing.
    fleet.attest(2, &digest, 2);
    assert_eq!(
        fleet.nodes_in(NodeStageState::Skipped),
        (2..10).collect::<Vec<_>>()
    );
}

#[test]
fn a_rollout_needs_a_registered_model_and_a_matching_node() {
    let (mut fleet, digest) = Fleet::new(&["a"]);
    let none = fleet.create(json!({"model": digest, "select": {"site": "z"}, "waves": "1"}));
    assert!(none.unwrap_err().to_string().contains("no live node"));
    let unknown = fleet.create(json!({"model": "e".repeat(64), "waves": "1"}));
    assert!(unknown.unwrap_err().to_string().contains("not found"));
    assert!(fleet.state.rollouts().is_empty());
}
