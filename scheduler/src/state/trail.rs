//! What the record keeps of each command: the change it makes as governance sees
//! it ([`ClusterState::change_of`]: circle, kind, target), the payload a proposal
//! shows (its secrets as commitments), which commands are control changes the audit
//! log records and who asked for them, and the appending itself. Kept apart from
//! the governance rules in `chain`, which call it.

use aigrid_api::chain::ROOT_CIRCLE;
use aigrid_api::manifest::Registration;
use aigrid_api::{ChangeKind, IdentityId, Timestamp};
use aigrid_consensus::human;
use sha2::Digest;

use super::canonical;
use super::*;

/// A change a command makes, as far as governance is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The circle whose policy decides (`root` for cluster-wide changes).
    pub circle: String,
    /// The kind of change.
    pub kind: ChangeKind,
    /// What it changes.
    pub target: String,
}

/// Replaces each value of every `env` object with a commitment to it, so a payload
/// can be shown to every signer without its secrets, and the digest still binds them.
pub(super) fn commit_secrets(value: &mut serde_json::Value, salt: &str) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if key == "env" {
                    if let serde_json::Value::Object(env) = v {
                        for secret in env.values_mut() {
                            let text = secret.as_str().unwrap_or_default();
                            *secret = canonical::commitment(salt, text).into();
                        }
                        continue;
                    }
                }
                commit_secrets(v, salt);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| commit_secrets(v, salt)),
        _ => {}
    }
}

/// The payload a proposal shows and hashes: the command, its secrets committed. A
/// model's registration shows as what identifies it (its digest commits to the
/// whole manifest, which its signature covers) and a hash of its locations, not
/// as the manifest's thousands of chunk entries, which are never serialised here:
/// that would cost as much as checking the manifest does.
pub(super) fn shown_payload(command: &Command, proposal_id: &str) -> serde_json::Value {
    let mut value = match command {
        Command::RegisterModel { registration, at } => serde_json::json!({
            "type": "register_model",
            "registration": shown_registration(registration),
            "at": at,
        }),
        _ => serde_json::to_value(command).unwrap_or(serde_json::Value::Null),
    };
    commit_secrets(&mut value, proposal_id);
    value
}

/// What a proposal shows of a model's registration.
fn shown_registration(registration: &Registration) -> serde_json::Value {
    let signed = &registration.manifest;
    let locations = serde_json::to_value(&registration.locations).unwrap_or_default();
    serde_json::json!({
        "digest": signed.manifest.digest().to_string(),
        "name": signed.manifest.name,
        "publisher": signed.publisher,
        "signature": signed.scheme(),
        "circle": registration.circle,
        "files": signed.manifest.files.len(),
        "size": signed.manifest.size(),
        "locations_sha256": hex::encode(sha2::Sha256::digest(human::canonical_json(&locations))),
    })
}

/// The `type` of [`shown_payload`]'s value (`null` where it has none) and the hash of
/// its canonical JSON, which every applied control change records. Written straight
/// from the command where `canonical` can ([`shown_payload`] replaces a model
/// registration, which goes the value's way); debug builds check both ways agree.
fn shown_payload_hash(command: &Command, salt: &str) -> (serde_json::Value, [u8; 32]) {
    let by_value = || {
        let payload = shown_payload(command, salt);
        let kind = payload.get("type").cloned().unwrap_or_default();
        (kind, human::payload_hash(&payload))
    };
    if matches!(command, Command::RegisterModel { .. }) {
        return by_value();
    }
    let Ok((json, kind)) = canonical::shown_canonical(command, salt) else {
        return by_value();
    };
    let direct = (
        kind.map_or(serde_json::Value::Null, serde_json::Value::String),
        sha2::Sha256::digest(&json).into(),
    );
    debug_assert_eq!(direct, by_value(), "{}", String::from_utf8_lossy(&json));
    direct
}

impl ClusterState {
    /// What `command` changes, as governance sees it; `None` for what no policy
    /// guards (the cluster's own bookkeeping, agents' reports).
    pub fn change_of(&self, command: &Command) -> Option<Change> {
        let (circle, kind, target) = match command {
            Command::SubmitJob { spec, .. } => {
                let spec = &*self.as_it_will_run(spec);
                let live = self.live_spec(&spec.name);
                if live == Some(spec) {
                    // An unchanged resubmit changes nothing.
                    return None;
                }
                let circle = spec.circle.clone()?;
                let policy = self.governing(&circle).map(|g| &g.policy);
                let guards = |k| policy.is_some_and(|p| p.guards(k));
                let kind = match live {
                    None => ChangeKind::JobCreate,
                    Some(old) => {
                        let limit = policy.and_then(|p| p.scale_limit);
                        let grows = spec.instance_count() > old.instance_count();
                        let over = limit.is_some_and(|l| spec.instance_count() > u64::from(l));
                        if !guards(ChangeKind::JobUpdate) && grows && over {
                            ChangeKind::JobScale
                        } else {
                            ChangeKind::JobUpdate
                        }
                    }
                };
                let spends = policy
                    .and_then(|p| p.spend_limit)
                    .is_some_and(|limit| self.raises_spend_above(&circle, spec, live, limit));
                let kind = if !guards(kind) && guards(ChangeKind::TreasurySpend) && spends {
                    ChangeKind::TreasurySpend
                } else {
                    kind
                };
                (circle, kind, format!("job:{}", spec.name))
            }
            Command::SteerDeployment {
                job_id,
                action: aigrid_api::DeploymentAction::Promote,
                ..
            } => {
                let job = self.tables.jobs.get(job_id)?;
                (
                    job.spec.circle.clone()?,
                    ChangeKind::RolloutPromote,
                    format!("job:{}", job.spec.name),
                )
            }
            Command::CreateRollout { request, .. } => {
                let model = self.tables.models.summary(&request.model)?;
                (
                    model.circle?,
                    ChangeKind::RolloutPromote,
                    format!("rollout:{}", model.digest),
                )
            }
            Command::DeleteJob { job_id, .. } => {
                let job = self.tables.jobs.get(job_id)?;
                (
                    job.spec.circle.clone()?,
                    ChangeKind::JobDelete,
                    format!("job:{}", job.spec.name),
                )
            }
            Command::CreateApiKey { info, .. } => (
                info.circle.clone(),
                ChangeKind::ApiKeys,
                format!("api-keys:{}", info.circle),
            ),
            Command::RevokeApiKey { id, .. } => {
                let circle = self
                    .api_keys(None)
                    .into_iter()
                    .find(|k| k.id == *id)?
                    .circle;
                let target = format!("api-keys:{circle}");
                (circle, ChangeKind::ApiKeys, target)
            }
            Command::SetGovernance {
                circle, governance, ..
            } => {
                let members_change = self
                    .governing(circle)
                    .is_none_or(|g| g.members != governance.members);
                let kind = if members_change {
                    ChangeKind::CircleMembers
                } else {
                    ChangeKind::CirclePolicy
                };
                (circle.clone(), kind, format!("circle:{circle}"))
            }
            Command::RegisterModel { registration, .. } => {
                let digest = registration.manifest.manifest.digest().to_string();
                if self.tables.models.summary(&digest).is_some() {
                    // Registered already: the command changes nothing.
                    return None;
                }
                (
                    registration.circle.clone()?,
                    ChangeKind::ModelRegister,
                    format!("model:{digest}"),
                )
            }
            Command::DeleteModel { digest, .. } => (
                self.tables.models.summary(digest)?.circle?,
                ChangeKind::ModelDelete,
                format!("model:{digest}"),
            ),
            Command::GrantMembership { change, .. } => (
                ROOT_CIRCLE.to_owned(),
                ChangeKind::ClusterMembership,
                format!("server:{}", change.id()),
            ),
            Command::RevokeNode { node_id, .. } => (
                ROOT_CIRCLE.to_owned(),
                ChangeKind::NodeRevoke,
                format!("node:{node_id}"),
            ),
            Command::PutIdentity {
                public_key, admin, ..
            } => {
                let id = public_key.id();
                let was = self.identity(&id).is_some_and(|i| i.admin);
                if was == *admin {
                    return None;
                }
                (
                    ROOT_CIRCLE.to_owned(),
                    ChangeKind::ClusterMembership,
                    format!("identity:{id}"),
                )
            }
            Command::ScaleGroup {
                job_id, group, to, ..
            } => return self.scale_change(job_id, group, *to),
            Command::Transfer { circle, .. } => (
                circle.clone(),
                ChangeKind::TreasuryTransfer,
                format!("treasury:{circle}"),
            ),
            Command::RemoveIdentity { id, .. } => {
                if !self.identity(id).is_some_and(|i| i.admin) {
                    return None;
                }
                (
                    ROOT_CIRCLE.to_owned(),
                    ChangeKind::ClusterMembership,
                    format!("identity:{id}"),
                )
            }
            _ => return None,
        };
        Some(Change {
            circle,
            kind,
            target,
        })
    }

    /// Appends an event to the audit log: canonical JSON with its log index and time.
    pub(super) fn audit(&mut self, index: u64, at: Timestamp, mut event: serde_json::Value) {
        if let serde_json::Value::Object(map) = &mut event {
            map.insert("index".into(), index.into());
            map.insert("at".into(), at.as_millis().into());
        }
        let leaf = String::from_utf8(human::canonical_json(&event)).expect("JSON is UTF-8");
        self.tables.chain.append(leaf);
    }

    /// Whether `command`, about to apply, would only repeat what the state holds (a
    /// re-proposed entry, an unchanged resubmit): the audit log records changes, not
    /// echoes.
    pub(super) fn is_echo(&self, command: &Command) -> bool {
        match command {
            Command::SubmitJob { eval_id, spec, .. } => {
                self.tables.evaluations.contains_key(eval_id)
                    || self.live_spec(&spec.name) == Some(&*self.as_it_will_run(spec))
            }
            Command::DeleteJob { eval_id, .. } => self.tables.evaluations.contains_key(eval_id),
            Command::BootstrapAdmins { .. } => self.has_admin(),
            Command::PutIdentity {
                name,
                public_key,
                admin,
                ..
            } => self
                .identity(&public_key.id())
                .is_some_and(|i| i.name == *name && i.admin == *admin),
            Command::CreateApiKey { info, .. } => self
                .api_keys(Some(&info.circle))
                .iter()
                .any(|k| k.id == info.id),
            Command::SetGovernance {
                circle, governance, ..
            } => self.governing(circle) == Some(governance),
            _ => false,
        }
    }

    /// The audit event a direct command makes if it applies: `None` for what the log
    /// does not record (bookkeeping, agents' reports, echoes). Made before the
    /// command is applied, which consumes it.
    pub(super) fn change_event(
        &self,
        index: u64,
        command: &Command,
        change: Option<&Change>,
    ) -> Option<(Timestamp, serde_json::Value)> {
        let at = command.control_time()?;
        if self.is_echo(command) {
            return None;
        }
        let (kind, hash) = shown_payload_hash(command, &index.to_string());
        let mut event = serde_json::json!({
            "event": "change",
            "command": kind,
            "payload_hash": hex::encode(hash),
        });
        if let Some(change) = change {
            event["target"] = change.target.clone().into();
            event["circle"] = change.circle.clone().into();
        }
        if let Some(by) = command.actor() {
            event["by"] = by.to_string().into();
        }
        Some((at, event))
    }

    /// After a direct command applied: moves its target's version and logs its
    /// event, if it has one.
    pub(super) fn record_change(
        &mut self,
        index: u64,
        event: Option<(Timestamp, serde_json::Value)>,
        change: Option<Change>,
    ) {
        if let Some(change) = &change {
            self.tables.chain.set_revision(&change.target, index);
        }
        if let Some((at, event)) = event {
            self.audit(index, at, event);
        }
    }
}

impl Command {
    /// When a control change (one the audit log records) was asked for; `None` for
    /// the cluster's own bookkeeping and agents' reports, and for the Human Chain's
    /// commands, which log their own events.
    pub(super) fn control_time(&self) -> Option<Timestamp> {
        match self {
            Command::SubmitJob { at, .. }
            | Command::DeleteJob { at, .. }
            | Command::RevokeNode { at, .. }
            | Command::CreateJoinToken { at, .. }
            | Command::DeleteJoinToken { at, .. }
            | Command::DrainNode { at, .. }
            | Command::RegisterModel { at, .. }
            | Command::DeleteModel { at, .. }
            | Command::BootstrapAdmins { at, .. }
            | Command::PutIdentity { at, .. }
            | Command::RemoveIdentity { at, .. }
            | Command::SetCircleMember { at, .. }
            | Command::RevokeApiKey { at, .. }
            | Command::SetGovernance { at, .. }
            | Command::GrantMembership { at, .. }
            | Command::UseMembershipGrant { at, .. }
            | Command::Deposit { at, .. }
            | Command::Transfer { at, .. }
            | Command::SetQuota { at, .. } => Some(*at),
            Command::CreateApiKey { info, .. } => Some(info.created_at),
            _ => None,
        }
    }

    /// The identity the command names as asking for it, where it names one.
    fn actor(&self) -> Option<&IdentityId> {
        match self {
            Command::SubmitJob { by, .. } => by.as_ref(),
            Command::SetGovernance { by, .. }
            | Command::GrantMembership { by, .. }
            | Command::Deposit { by, .. }
            | Command::Transfer { by, .. }
            | Command::SetQuota { by, .. } => by.as_ref(),
            _ => None,
        }
    }
}
