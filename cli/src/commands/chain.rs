//! The Human Chain from the command line: governed circles (`aigrid circle create |
//! member add | member rm | policy set`) and proposals (`aigrid proposal ls | show |
//! approve | reject | veto`); the audit log is [`super::audit`]'s.
//!
//! A decision is signed here, with the caller's identity key, over the digest this
//! command recomputes from what the proposal shows: a server that showed one change
//! and asked for another to be signed is refused before anything is signed.

use std::collections::BTreeMap;

use aigrid_api::{
    ChangeKind, CircleGovernance, CirclePolicy, CreateCircle, Decision, Governance, IdentityId,
    IdentityInfo, PolicyMember, ProposalInfo, ProposalState, PublicKey, Role,
};
use aigrid_consensus::human;
use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::Value;

use crate::client::{path_segment, proposed_or, Client};
use crate::output::{ms_to_text, print_json, print_table, say};

/// A member on the command line: `PUBLIC_KEY[:WEIGHT]`.
#[derive(Debug, Clone)]
pub struct MemberArg {
    key: PublicKey,
    weight: u32,
}

impl std::str::FromStr for MemberArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        // A public key is `ALGORITHM:BASE64`; a weight is a short decimal after it.
        let (key, weight) = match text.rsplit_once(':') {
            Some((key, w)) if key.contains(':') && !w.is_empty() && w.len() <= 4 => {
                let weight = w
                    .parse()
                    .map_err(|_| format!("`{w}` is not a weight (1 to 1000)"))?;
                (key, weight)
            }
            _ => (text, 1),
        };
        let key: PublicKey = key.parse()?;
        Ok(MemberArg { key, weight })
    }
}

/// Policy settings `circle create` and `policy set` take.
#[derive(Debug, Clone, Default, Args)]
pub struct PolicyArgs {
    /// Kinds of change that need the quorum (repeat, or comma-separated), in place
    /// of the default: job.create, job.update, job.delete, job.scale, model.register,
    /// model.delete, rollout.promote, api_keys, node.revoke, cluster.membership,
    /// circle.members, circle.policy.
    #[arg(long, value_delimiter = ',')]
    guard: Vec<ChangeKind>,
    /// Kinds of change that no longer need the quorum.
    #[arg(long, value_delimiter = ',')]
    unguard: Vec<ChangeKind>,
    /// Members (identity id or public key) who may veto on their own.
    #[arg(long)]
    veto: Vec<String>,
    /// Members who may no longer veto.
    #[arg(long)]
    no_veto: Vec<String>,
    /// Seconds a proposal stays open at least, so every member sees it in time.
    #[arg(long, value_name = "SECS")]
    min_window: Option<u64>,
    /// Seconds after which an unapplied proposal expires.
    #[arg(long, value_name = "SECS")]
    max_window: Option<u64>,
    /// Approvals must be hybrid-signed (ed25519 + ML-DSA-65): true or false.
    #[arg(long, value_name = "BOOL")]
    require_hybrid: Option<bool>,
    /// The circle's models must have hybrid-signed manifests (`model push --hybrid`):
    /// true or false.
    #[arg(long, value_name = "BOOL")]
    require_hybrid_manifests: Option<bool>,
    /// With job.scale guarded: instances a job may reach without the quorum.
    #[arg(long)]
    scale_limit: Option<u32>,
    /// With treasury.spend guarded: credits per hour the circle's jobs may cost
    /// (at the highest prices nodes ask) without the quorum.
    #[arg(long, value_name = "CREDITS")]
    spend_limit: Option<aigrid_api::Credits>,
}

/// `aigrid circle member ...`
#[derive(Subcommand)]
pub enum MemberCommand {
    /// Add a member (or change its weight or role): a proposal when the circle
    /// guards its members.
    Add {
        /// The circle.
        circle: String,
        /// The member: PUBLIC_KEY[:WEIGHT].
        member: MemberArg,
        /// Its role: viewer, operator or owner.
        #[arg(long, default_value = "owner")]
        role: Role,
        /// The circle's new threshold.
        #[arg(long)]
        threshold: Option<u32>,
    },
    /// Remove a member: a proposal when the circle guards its members.
    Rm {
        /// The circle.
        circle: String,
        /// The member's identity id or public key.
        member: String,
        /// The circle's new threshold.
        #[arg(long)]
        threshold: Option<u32>,
    },
}

/// `aigrid circle policy ...`
#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Change the circle's policy: a proposal when the circle guards its policy.
    Set {
        /// The circle.
        circle: String,
        /// Total weight of approvals a guarded change needs.
        #[arg(long)]
        threshold: Option<u32>,
        #[command(flatten)]
        policy: PolicyArgs,
    },
}

/// `aigrid proposal ...`
#[derive(Subcommand)]
pub enum ProposalCommand {
    /// List the proposals you may see, newest first.
    Ls {
        /// Only those in this state (pending, approved, applied, rejected, vetoed,
        /// expired, stale).
        #[arg(long)]
        state: Option<ProposalState>,
        /// Only those of this circle.
        #[arg(long)]
        circle: Option<String>,
        /// Wait until something changes (at most SECS seconds), then list.
        #[arg(long, value_name = "SECS")]
        watch: Option<u64>,
    },
    /// Show a proposal: what it changes (as a diff against what runs now), the
    /// digest to be signed, its signers and decisions.
    Show {
        /// The proposal id.
        id: String,
    },
    /// Approve a proposal, signing its digest with your identity key.
    Approve {
        /// The proposal id.
        id: String,
    },
    /// Reject a proposal, signed like an approval.
    Reject {
        /// The proposal id.
        id: String,
    },
    /// Veto a proposal (members of the circle's veto set only).
    Veto {
        /// The proposal id.
        id: String,
    },
}

/// The identity a member argument names: an identity id, or a public key's id.
fn member_id(text: &str) -> anyhow::Result<IdentityId> {
    let id = IdentityId::new(text);
    if id.is_well_formed() {
        return Ok(id);
    }
    let key: PublicKey = text
        .parse()
        .map_err(|e| anyhow!("`{text}` is neither an identity id nor a public key: {e}"))?;
    Ok(key.id())
}

/// Makes the keys the cluster does not know yet known (as non-admin identities),
/// when the caller may list identities (admins); otherwise the servers answer for
/// unknown members.
async fn make_known(client: &Client, keys: &[&PublicKey]) -> anyhow::Result<()> {
    let Ok(known) = client
        .call::<(), Vec<IdentityInfo>>(Method::GET, "/api/v1/identities", None)
        .await
    else {
        return Ok(());
    };
    for key in keys {
        let id = key.id();
        if known.iter().any(|i| i.id == id) {
            continue;
        }
        let request = aigrid_api::AddIdentity {
            name: format!("member-{}", &id.as_str()[..8]),
            public_key: (*key).clone(),
            admin: false,
        };
        let _: Value = client
            .call(Method::POST, "/api/v1/identities", Some(&request))
            .await
            .with_context(|| format!("adding identity {id}"))?;
    }
    Ok(())
}

fn apply_policy(
    policy: &mut CirclePolicy,
    threshold: Option<u32>,
    args: PolicyArgs,
) -> anyhow::Result<()> {
    if let Some(t) = threshold {
        policy.threshold = t;
    }
    if !args.guard.is_empty() {
        policy.guarded = args.guard.into_iter().collect();
    }
    for kind in args.unguard {
        policy.guarded.remove(&kind);
    }
    for v in &args.veto {
        let id = member_id(v)?;
        if !policy.veto.contains(&id) {
            policy.veto.push(id);
        }
    }
    for v in &args.no_veto {
        let id = member_id(v)?;
        policy.veto.retain(|x| *x != id);
    }
    if let Some(w) = args.min_window {
        policy.min_window_secs = w;
    }
    if let Some(w) = args.max_window {
        policy.max_window_secs = w;
    }
    if let Some(h) = args.require_hybrid {
        policy.require_hybrid = h;
    }
    if let Some(h) = args.require_hybrid_manifests {
        policy.require_hybrid_manifests = h;
    }
    if args.scale_limit.is_some() {
        policy.scale_limit = args.scale_limit;
    }
    if args.spend_limit.is_some() {
        policy.spend_limit = args.spend_limit;
    }
    Ok(())
}

/// `aigrid circle create`: an admin makes a governed circle.
pub async fn create(
    client: &Client,
    name: String,
    members: Vec<MemberArg>,
    threshold: u32,
    policy_args: PolicyArgs,
    json: bool,
) -> anyhow::Result<()> {
    if members.is_empty() {
        bail!("a circle needs at least one --member PUBLIC_KEY[:WEIGHT]");
    }
    let mut policy = CirclePolicy::new(threshold);
    apply_policy(&mut policy, None, policy_args)?;
    let request = CreateCircle {
        name,
        members: members
            .iter()
            .map(|m| PolicyMember {
                identity: m.key.id(),
                weight: m.weight,
                role: Role::Owner,
            })
            .collect(),
        policy,
    };
    Governance {
        members: request.members.clone(),
        policy: request.policy.clone(),
    }
    .validate()
    .map_err(|e| anyhow!("{e}"))?;
    make_known(client, &members.iter().map(|m| &m.key).collect::<Vec<_>>()).await?;
    let made: CircleGovernance = client
        .call(Method::POST, "/api/v1/circles", Some(&request))
        .await?;
    if json {
        return print_json(&made);
    }
    print_governance(&made);
    Ok(())
}

/// The governance of a governed circle.
pub async fn governance(client: &Client, circle: &str) -> anyhow::Result<CircleGovernance> {
    let path = format!("/api/v1/circles/{}/governance", path_segment(circle)?);
    client.call::<(), _>(Method::GET, &path, None).await
}

pub fn print_governance(g: &CircleGovernance) {
    let p = &g.governance.policy;
    let total = g.governance.total_weight();
    let mut guarded: Vec<&str> = p.guarded.iter().map(|k| k.as_str()).collect();
    guarded.sort_unstable();
    say(&format!(
        "circle {} (version {})\nthreshold {} of {total} weight{}\nguarded {}\nwindow {}s to {}s\n",
        g.name,
        g.version,
        p.threshold,
        match (p.require_hybrid, p.require_hybrid_manifests) {
            (true, true) => ", hybrid signatures on approvals and manifests",
            (true, false) => ", hybrid signatures on approvals",
            (false, true) => ", hybrid signatures on manifests",
            (false, false) => "",
        },
        if guarded.is_empty() {
            "-".to_owned()
        } else {
            guarded.join(", ")
        },
        p.min_window_secs,
        p.max_window_secs,
    ));
    let rows: Vec<Vec<String>> = g
        .governance
        .members
        .iter()
        .map(|m| {
            vec![
                m.identity.to_string(),
                m.weight.to_string(),
                m.role.to_string(),
                if p.veto.contains(&m.identity) {
                    "yes"
                } else {
                    "-"
                }
                .to_owned(),
            ]
        })
        .collect();
    print_table(2, &["IDENTITY", "WEIGHT", "ROLE", "VETO"], &rows);
}

/// Sends a circle's new governance: applied, or proposed when guarded.
async fn send_governance(
    client: &Client,
    circle: &str,
    governance: Governance,
    json: bool,
) -> anyhow::Result<()> {
    governance.validate().map_err(|e| anyhow!("{e}"))?;
    let path = format!("/api/v1/circles/{}/governance", path_segment(circle)?);
    let answer = client
        .call_guarded::<_, CircleGovernance>(Method::PUT, &path, Some(&governance))
        .await?;
    if let Some(done) = proposed_or(answer, json)? {
        if json {
            return print_json(&done);
        }
        print_governance(&done);
    }
    Ok(())
}

/// `aigrid circle member add | rm`.
pub async fn member(client: &Client, cmd: MemberCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        MemberCommand::Add {
            circle,
            member,
            role,
            threshold,
        } => {
            let mut g = governance(client, &circle).await?.governance;
            make_known(client, &[&member.key]).await?;
            let id = member.key.id();
            g.members.retain(|m| m.identity != id);
            g.members.push(PolicyMember {
                identity: id,
                weight: member.weight,
                role,
            });
            if let Some(t) = threshold {
                g.policy.threshold = t;
            }
            send_governance(client, &circle, g, json).await
        }
        MemberCommand::Rm {
            circle,
            member,
            threshold,
        } => {
            let mut g = governance(client, &circle).await?.governance;
            let id = member_id(&member)?;
            let before = g.members.len();
            g.members.retain(|m| m.identity != id);
            if g.members.len() == before {
                bail!("`{id}` is not a member of circle `{circle}`");
            }
            g.policy.veto.retain(|v| *v != id);
            if let Some(t) = threshold {
                g.policy.threshold = t;
            }
            send_governance(client, &circle, g, json).await
        }
    }
}

/// `aigrid circle policy set`.
pub async fn policy(client: &Client, cmd: PolicyCommand, json: bool) -> anyhow::Result<()> {
    let PolicyCommand::Set {
        circle,
        threshold,
        policy,
    } = cmd;
    let mut g = governance(client, &circle).await?.governance;
    apply_policy(&mut g.policy, threshold, policy)?;
    send_governance(client, &circle, g, json).await
}

/// Every leaf of a JSON value by its path (`spec.groups[0].count`).
fn flatten(value: &Value, path: String, out: &mut BTreeMap<String, Value>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                flatten(v, p, out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for (i, v) in items.iter().enumerate() {
                flatten(v, format!("{path}[{i}]"), out);
            }
        }
        leaf => {
            out.insert(path, leaf.clone());
        }
    }
}

/// A line-per-leaf diff of `old` (what runs now) and `new` (what the proposal
/// makes it), `-` for what goes and `+` for what comes; secret values, which
/// neither side shows, are named without being compared.
pub fn diff(old: &Value, new: &Value) -> String {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten(old, String::new(), &mut a);
    flatten(new, String::new(), &mut b);
    let mut out = String::new();
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for k in keys {
        match (a.get(k), b.get(k)) {
            (Some(x), Some(y)) if x == y => {}
            (Some(Value::String(x)), Some(Value::String(y)))
                if x == aigrid_api::access::REDACTED && y.starts_with("<secret sha256:") =>
            {
                out.push_str(&format!(
                    "~ {k}: a secret (only its commitment {y} is shown)\n"
                ));
            }
            (x, y) => {
                if let Some(x) = x {
                    out.push_str(&format!("- {k}: {x}\n"));
                }
                if let Some(y) = y {
                    out.push_str(&format!("+ {k}: {y}\n"));
                }
            }
        }
    }
    if out.is_empty() {
        out.push_str("  (no difference from what runs now)\n");
    }
    out
}

/// What `proposal` changes, as `(now, after)`: the target as it is now and as the
/// proposal would make it, where the CLI knows how to read the target.
async fn before_after(client: &Client, p: &ProposalInfo) -> Option<(Value, Value)> {
    let (kind, name) = p.target.split_once(':')?;
    match kind {
        "job" => {
            let path = format!("/api/v1/jobs/{}", path_segment(name).ok()?);
            let now = client
                .call::<(), Value>(Method::GET, &path, None)
                .await
                .ok()
                .map_or(Value::Null, |job| job["spec"].clone());
            let after = if p.kind == ChangeKind::JobDelete {
                Value::Null
            } else {
                p.payload["spec"].clone()
            };
            Some((now, after))
        }
        "circle" => {
            let now = governance(client, name)
                .await
                .ok()
                .map_or(Value::Null, |g| {
                    serde_json::to_value(g.governance).unwrap_or_default()
                });
            Some((now, p.payload["governance"].clone()))
        }
        _ => None,
    }
}

fn print_proposal(p: &ProposalInfo, change: Option<String>) {
    let weight = match (p.new_threshold, p.new_approved_weight) {
        (Some(t), Some(w)) => format!(
            "{} of {} (and {w} of {t} under the new governance)",
            p.approved_weight, p.threshold
        ),
        _ => format!("{} of {}", p.approved_weight, p.threshold),
    };
    let mut text = format!(
        "proposal   {}\nstate      {}{}\ncircle     {} (version {})\nkind       {}\ntarget     {} (version {})\nproposer   {}\ncreated    {}\napplies    not before {}\nexpires    {}\napproved   {weight}{}\ndigest     {}\n",
        p.id,
        p.state,
        p.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default(),
        p.circle,
        p.circle_version,
        p.kind,
        p.target,
        p.base_version,
        p.proposer,
        ms_to_text(p.created_at.0),
        ms_to_text(p.not_before.0),
        ms_to_text(p.expires_at.0),
        if p.require_hybrid { ", hybrid signatures required" } else { "" },
        p.digest,
    );
    match change {
        Some(diff) => text.push_str(&format!("change\n{diff}")),
        None => text.push_str(&format!(
            "payload\n{}\n",
            serde_json::to_string_pretty(&p.payload).unwrap_or_default()
        )),
    }
    say(&text);
    let rows: Vec<Vec<String>> = p
        .signers
        .iter()
        .map(|s| {
            let decided = p
                .decisions
                .iter()
                .find(|d| d.identity == s.identity)
                .map_or("-".to_owned(), |d| d.decision.to_string());
            vec![
                s.identity.to_string(),
                s.weight.to_string(),
                if s.veto { "yes" } else { "-" }.to_owned(),
                decided,
            ]
        })
        .collect();
    print_table(2, &["SIGNER", "WEIGHT", "VETO", "DECISION"], &rows);
}

async fn get_proposal(client: &Client, id: &str) -> anyhow::Result<ProposalInfo> {
    let path = format!("/api/v1/proposals/{}", path_segment(id)?);
    client.call::<(), _>(Method::GET, &path, None).await
}

/// Signs and sends the caller's decision on proposal `id`.
async fn decide(client: &Client, id: &str, decision: Decision, json: bool) -> anyhow::Result<()> {
    let key = client
        .key()
        .ok_or_else(|| anyhow!("deciding needs your identity key (aigrid key new)"))?;
    let proposal = get_proposal(client, id).await?;
    let digest = human::recompute_digest(&proposal).map_err(|e| {
        anyhow!("refusing to sign: the proposal does not hash to the digest the server shows ({e})")
    })?;
    let signed = human::sign_decision(key, &digest, decision);
    let path = format!("/api/v1/proposals/{}/approvals", path_segment(id)?);
    let now: ProposalInfo = client.call(Method::POST, &path, Some(&signed)).await?;
    if json {
        return print_json(&now);
    }
    let verb = match decision {
        Decision::Approve => "approved",
        Decision::Reject => "rejected",
        Decision::Veto => "vetoed",
    };
    say(&format!(
        "{verb} proposal {}: it is {} ({} of {} weight approved){}\n",
        now.id,
        now.state,
        now.approved_weight,
        now.threshold,
        now.reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    ));
    Ok(())
}

/// Runs `aigrid proposal`.
pub async fn proposal(client: &Client, cmd: ProposalCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        ProposalCommand::Ls {
            state,
            circle,
            watch,
        } => {
            let mut query = Vec::new();
            if let Some(s) = state {
                query.push(format!("state={s}"));
            }
            if let Some(c) = circle {
                query.push(format!("circle={}", path_segment(&c)?));
            }
            if let Some(secs) = watch {
                query.push(format!("watch=true&wait={secs}"));
            }
            let path = if query.is_empty() {
                "/api/v1/proposals".to_owned()
            } else {
                format!("/api/v1/proposals?{}", query.join("&"))
            };
            let list: Vec<ProposalInfo> = client.call::<(), _>(Method::GET, &path, None).await?;
            if json {
                return print_json(&list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|p| {
                    vec![
                        p.id.clone(),
                        p.state.to_string(),
                        p.circle.clone(),
                        p.kind.to_string(),
                        p.target.clone(),
                        format!("{}/{}", p.approved_weight, p.threshold),
                        ms_to_text(p.created_at.0),
                    ]
                })
                .collect();
            print_table(
                0,
                &[
                    "ID", "STATE", "CIRCLE", "KIND", "TARGET", "APPROVED", "CREATED",
                ],
                &rows,
            );
        }
        ProposalCommand::Show { id } => {
            let p = get_proposal(client, &id).await?;
            if json {
                let mut value = serde_json::to_value(&p)?;
                value["approvals"] = serde_json::to_value(&p.decisions)?;
                return print_json(&value);
            }
            let change = before_after(client, &p)
                .await
                .map(|(now, after)| diff(&now, &after));
            print_proposal(&p, change);
            if let Err(e) = human::recompute_digest(&p) {
                bail!("the proposal does not hash to its digest: do not approve it ({e})");
            }
        }
        ProposalCommand::Approve { id } => decide(client, &id, Decision::Approve, json).await?,
        ProposalCommand::Reject { id } => decide(client, &id, Decision::Reject, json).await?,
        ProposalCommand::Veto { id } => decide(client, &id, Decision::Veto, json).await?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_argument_takes_an_optional_weight() {
        let key =
            aigrid_api::IdentityKey::from_seed(aigrid_api::KeyAlgorithm::Ed25519, [7; 32]).public();
        let m: MemberArg = key.to_string().parse().unwrap();
        assert_eq!((m.key.id(), m.weight), (key.id(), 1));
        let m: MemberArg = format!("{key}:3").parse().unwrap();
        assert_eq!((m.key.id(), m.weight), (key.id(), 3));
        assert!(format!("{key}:x").parse::<MemberArg>().is_err());
        assert!("ed25519:nope".parse::<MemberArg>().is_err());
    }

    #[test]
    fn the_diff_names_what_changes() {
        let old = serde_json::json!({"groups": [{"count": 1, "env": {"K": "<redacted>"}}]});
        let new = serde_json::json!({"groups": [{"count": 3, "env": {"K": "<secret sha256:ab>"}}]});
        let d = diff(&old, &new);
        assert!(
            d.contains("- groups[0].count: 1\n+ groups[0].count: 3\n"),
            "{d}"
        );
        assert!(d.contains("~ groups[0].env.K: a secret"), "{d}");
        assert!(diff(&old, &old).contains("no difference"));
        assert!(diff(&Value::Null, &new).contains("+ groups[0].count: 3"));
    }
}
