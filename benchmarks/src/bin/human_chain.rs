//! The Human Chain's costs, in process, on the replicated apply path every server
//! runs (no network, Raft or disk in the way):
//!
//! - **approvals verified per second**: signed decisions applied to pending
//!   proposals (digest, signer, signature, counting, the audit entry), ed25519 and
//!   hybrid ed25519 + ML-DSA-65, beside the bound of verifying the same signatures
//!   alone;
//! - **job submissions per second with the audit log** beside the same submissions
//!   applied without it, in the same run.
//!
//! Prints a markdown table of each.

use std::time::Instant;

use aigrid_api::{
    CirclePolicy, Decision, EvalId, Governance, IdentityKey, JobId, JobSpec, KeyAlgorithm,
    PolicyMember, ProposalInfo, Role, Timestamp,
};
use aigrid_consensus::human::{decision_message, sign_decision};
use aigrid_consensus::StateMachine;
use aigrid_scheduler::state::{Applied, ClusterState, Command};
use anyhow::{bail, Context, Result};
use base64::Engine;
use clap::Parser;

/// The allocator the server runs with (see the `aigrid` binary), so the state's
/// growth costs here what it costs there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "human_chain",
    about = "Approvals verified per second and the audit log's cost on job submissions"
)]
struct Args {
    /// Proposals decided on per key type (at most 1000 are open at once).
    #[arg(long, default_value_t = 1000)]
    proposals: usize,
    /// Job submissions applied, with and without the audit log.
    #[arg(long, default_value_t = 20_000)]
    submissions: usize,
    /// Rounds of each measurement; the best is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// A state with an admin, the cluster's id and the people of `keys` as identities.
struct Bench {
    state: ClusterState,
    index: u64,
}

impl Bench {
    fn new(keys: &[IdentityKey]) -> Result<Self> {
        let mut b = Bench {
            state: ClusterState::default(),
            index: 0,
        };
        b.apply(Command::InitCluster {
            cluster_id: "bench".into(),
            audit_seed: "42".repeat(32),
            at: at(0),
        })?;
        b.apply(Command::BootstrapAdmins {
            admins: vec![(
                "admin".into(),
                IdentityKey::from_seed(KeyAlgorithm::Ed25519, [200; 32]).public(),
            )],
            at: at(0),
        })?;
        for (i, k) in keys.iter().enumerate() {
            b.apply(Command::PutIdentity {
                name: format!("p{i}"),
                public_key: k.public(),
                admin: false,
                at: at(0),
            })?;
        }
        Ok(b)
    }

    fn apply(&mut self, command: Command) -> Result<Applied> {
        self.index += 1;
        self.state
            .apply(self.index, command)
            .map_err(|e| anyhow::anyhow!("{e}"))
    }
}

fn at(ms: u64) -> Timestamp {
    Timestamp::from_millis(1_000 + ms)
}

fn spec(name: &str, circle: Option<&str>) -> JobSpec {
    serde_json::from_value(serde_json::json!({
        "name": name, "kind": "service", "circle": circle,
        "groups": [{
            "name": "main", "count": 2,
            "resources": {"cpu_millis": 500, "memory_mib": 512},
            "task": {"driver": "exec", "command": "/usr/bin/serve", "args": ["--port", "8080"],
                     "env": {"TOKEN": "a-secret-value"}}
        }]
    }))
    .expect("a valid spec")
}

/// Decisions applied per second (`ours`), and signatures verified per second alone
/// (`bound`), for a 3-of-3 circle of `algorithm` keys: each of `n` proposals gets
/// two approvals, so every decision is checked and counted and none applies a job.
fn approvals(algorithm: KeyAlgorithm, n: usize) -> Result<(f64, f64)> {
    let keys: Vec<IdentityKey> = (1..=3u8)
        .map(|i| IdentityKey::from_seed(algorithm, [i; 32]))
        .collect();
    let mut b = Bench::new(&keys)?;
    b.apply(Command::SetGovernance {
        circle: "lab".into(),
        governance: Governance {
            members: keys
                .iter()
                .map(|k| PolicyMember {
                    identity: k.id(),
                    weight: 1,
                    role: Role::Owner,
                })
                .collect(),
            policy: CirclePolicy::new(3),
        },
        create: true,
        by: None,
        at: at(0),
    })?;
    let mut proposals: Vec<ProposalInfo> = Vec::with_capacity(n);
    for i in 0..n {
        let command = Command::SubmitJob {
            job_id: JobId::new(format!("job-{i}")),
            eval_id: EvalId::new(format!("eval-{i}")),
            spec: spec(&format!("j{i}"), Some("lab")),
            at: at(1),
            by: Some(keys[0].id()),
        };
        match b.apply(Command::Propose {
            id: format!("p{i}"),
            command: Box::new(command),
            by: keys[0].id(),
            at: at(1),
        })? {
            Applied::Proposed(p) => proposals.push(p),
            other => bail!("expected a proposal, got {other:?}"),
        }
    }
    // Signing is the members' work, on their own machines: done before the clock.
    let mut decisions = Vec::with_capacity(2 * n);
    for p in &proposals {
        let digest: [u8; 32] = hex::decode(&p.digest)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("a digest of 32 bytes"))?;
        for key in &keys[..2] {
            decisions.push((
                p.id.clone(),
                key,
                sign_decision(key, &digest, Decision::Approve),
                digest,
            ));
        }
    }
    // The bound: the signatures verified, nothing else.
    let started = Instant::now();
    for (_, key, signed, digest) in &decisions {
        let signature =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&signed.signature)?;
        key.public()
            .verify(&decision_message(digest, Decision::Approve), &signature)
            .context("a signature that verifies")?;
    }
    let bound = decisions.len() as f64 / started.elapsed().as_secs_f64();
    // Ours: the decisions applied, as every server applies them.
    let started = Instant::now();
    for (proposal, key, signed, _) in decisions {
        match b.apply(Command::Decide {
            proposal,
            by: key.id(),
            signed,
            at: at(2),
        })? {
            Applied::Decided(p) if p.state == aigrid_api::ProposalState::Pending => {}
            other => bail!("expected a pending proposal, got {other:?}"),
        }
    }
    let ours = (2 * n) as f64 / started.elapsed().as_secs_f64();
    Ok((ours, bound))
}

/// Job submissions applied per second to a fresh state, with the audit log or
/// without it.
fn submissions(n: usize, with_log: bool) -> Result<f64> {
    let commands: Vec<Command> = (0..n)
        .map(|i| Command::SubmitJob {
            job_id: JobId::new(format!("job-{i}")),
            eval_id: EvalId::new(format!("eval-{i}")),
            spec: spec(&format!("j{i}"), None),
            at: at(i as u64),
            by: None,
        })
        .collect();
    let mut b = Bench::new(&[])?;
    let started = Instant::now();
    for c in commands {
        if with_log {
            b.apply(c)?;
        } else {
            b.index += 1;
            b.state
                .apply_without_audit(b.index, c)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let entries = b.state.audit_log().len();
    if with_log && entries < n as u64 {
        bail!("the audit log holds {entries} entries for {n} submissions");
    }
    Ok(rate)
}

fn best(rounds: usize, f: impl Fn() -> Result<(f64, f64)>) -> Result<(f64, f64)> {
    let mut best = (0.0f64, 0.0f64);
    for _ in 0..rounds.max(1) {
        let (a, b) = f()?;
        best = (best.0.max(a), best.1.max(b));
    }
    Ok(best)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let n = args.proposals.clamp(1, 1000);
    let (ed, ed_bound) = best(args.rounds, || approvals(KeyAlgorithm::Ed25519, n))?;
    let (hy, hy_bound) = best(args.rounds, || approvals(KeyAlgorithm::Ed25519MlDsa65, n))?;
    println!(
        "### Approvals verified per second ({} decisions per key type, best of {})\n",
        2 * n,
        args.rounds
    );
    println!("| key type | aigrid: decisions applied/s | bound: signatures verified alone/s | aigrid / bound |");
    println!("|---|---:|---:|---:|");
    for (name, ours, bound) in [
        ("ed25519", ed, ed_bound),
        ("ed25519 + ML-DSA-65", hy, hy_bound),
    ] {
        println!("| {name} | {ours:.0} | {bound:.0} | {:.2} |", ours / bound);
    }
    // Alternated, each on a fresh state, so neither gains from memory the other freed.
    let (mut with, mut without) = (0.0f64, 0.0f64);
    for round in 0..args.rounds.max(1) {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for with_log in order {
            let rate = submissions(args.submissions, with_log)?;
            if with_log {
                with = with.max(rate);
            } else {
                without = without.max(rate);
            }
        }
    }
    println!(
        "\n### Job submissions applied per second ({} submissions, best of {})\n",
        args.submissions, args.rounds
    );
    println!("| aigrid with the audit log | aigrid without it | cost of the log | µs per submission, with / without |");
    println!("|---:|---:|---:|---:|");
    println!(
        "| {with:.0} | {without:.0} | {:.1}% | {:.1} / {:.1} |",
        (1.0 - with / without) * 100.0,
        1e6 / with,
        1e6 / without
    );
    Ok(())
}
