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
use std::io::Write;

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

/// The textual `type` of [`shown_payload`]'s value and the hash of its canonical
/// JSON, which every applied control change records. Written straight from the
/// command where `canonical` can ([`shown_payload`] replaces a model registration,
/// which goes the value's way); debug builds check both ways agree.
fn shown_payload_hash(command: &Command, salt: &str) -> (Option<String>, [u8; 32]) {
    let by_value = || {
        let payload = shown_payload(command, salt);
        let kind = payload
            .get("type")
            .and_then(|t| t.as_str())
            .map(str::to_owned);
        (kind, human::payload_hash(&payload))
    };
    if matches!(command, Command::RegisterModel { .. }) {
        return by_value();
    }
    let direct = canonical::shown_canonical_with(command, salt, |json, kind| {
        let direct = (kind, sha2::Sha256::digest(json).into());
        debug_assert_eq!(direct, by_value(), "{}", String::from_utf8_lossy(json));
        direct
    });
    direct.unwrap_or_else(|_| by_value())
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
    pub(super) fn change_event(&self, index: u64, command: &Command) -> Option<ChangeEvent> {
        let at = command.control_time()?;
        if self.is_echo(command) {
            return None;
        }
        let (kind, hash) = shown_payload_hash(command, &index.to_string());
        Some(ChangeEvent {
            at,
            command: kind,
            payload_hash: hash,
            by: command.actor().map(ToString::to_string),
        })
    }

    /// After a direct command applied: moves its target's version and logs its
    /// event, if it has one.
    pub(super) fn record_change(
        &mut self,
        index: u64,
        event: Option<ChangeEvent>,
        change: Option<Change>,
    ) {
        if let Some(change) = &change {
            self.tables.chain.set_revision(&change.target, index);
        }
        if let Some(event) = event {
            self.tables.chain.append(event.leaf(index, change.as_ref()));
        }
    }
}

/// The audit record of a direct control change: what [`ClusterState::audit`] would
/// record of `{"event": "change", "command", "payload_hash", "by"}` and its change's
/// `target` and `circle`, kept as its fields. Every job submission on every replica
/// records one, and writing its leaf straight (keys in their canonical order) spares
/// building, sorting and dropping a JSON object for each.
#[derive(Debug)]
pub(super) struct ChangeEvent {
    at: Timestamp,
    /// The payload's `type`; `null` in the leaf where it has none.
    command: Option<String>,
    payload_hash: [u8; 32],
    /// Who asked for it, where the command names someone.
    by: Option<String>,
}

impl ChangeEvent {
    /// The leaf's canonical JSON at log `index`, of the command making `change`: the
    /// bytes `human::canonical_json` writes for the event's object (keys sorted by
    /// their bytes).
    fn leaf(&self, index: u64, change: Option<&Change>) -> String {
        /// Writes `,"key":` and then `value` as a JSON string.
        fn text(out: &mut Vec<u8>, key: &str, value: &str) {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\":");
            // Writing a string to a Vec cannot fail.
            serde_json::to_writer(&mut *out, value).expect("a string serialises");
        }
        let mut out = Vec::with_capacity(256);
        // Writing to a Vec cannot fail.
        let _ = write!(out, "{{\"at\":{}", self.at.as_millis());
        if let Some(by) = &self.by {
            text(&mut out, "by", by);
        }
        if let Some(change) = change {
            text(&mut out, "circle", &change.circle);
        }
        match &self.command {
            Some(kind) => text(&mut out, "command", kind),
            None => out.extend_from_slice(b",\"command\":null"),
        }
        let _ = write!(out, ",\"event\":\"change\",\"index\":{index}");
        let mut hash = [0; 64];
        hex::encode_to_slice(self.payload_hash, &mut hash).expect("64 digits for 32 bytes");
        out.extend_from_slice(b",\"payload_hash\":\"");
        out.extend_from_slice(&hash);
        out.push(b'"');
        if let Some(change) = change {
            text(&mut out, "target", &change.target);
        }
        out.push(b'}');
        String::from_utf8(out).expect("JSON is UTF-8")
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The leaf as the audit log recorded it before: the event as a JSON object,
    /// its index and time added, in canonical JSON.
    fn as_object(event: &ChangeEvent, index: u64, change: Option<&Change>) -> String {
        let mut object = serde_json::json!({
            "event": "change",
            "command": event.command,
            "payload_hash": hex::encode(event.payload_hash),
        });
        if let Some(change) = change {
            object["target"] = change.target.clone().into();
            object["circle"] = change.circle.clone().into();
        }
        if let Some(by) = &event.by {
            object["by"] = by.clone().into();
        }
        object["index"] = index.into();
        object["at"] = event.at.as_millis().into();
        String::from_utf8(human::canonical_json(&object)).unwrap()
    }

    #[test]
    fn a_change_leaf_is_the_canonical_json_of_its_event() {
        let awkward = "quote \" back \\ newline \n tab \t bell \u{7} é 🚀".to_owned();
        for command in [None, Some("submit_job".to_owned()), Some(awkward.clone())] {
            for change in [
                None,
                Some(Change {
                    circle: "ml".to_owned(),
                    kind: ChangeKind::JobCreate,
                    target: "job:web".to_owned(),
                }),
                Some(Change {
                    circle: awkward.clone(),
                    kind: ChangeKind::JobCreate,
                    target: awkward.clone(),
                }),
            ] {
                for by in [None, Some("ed25519:abc".to_owned()), Some(awkward.clone())] {
                    let event = ChangeEvent {
                        at: Timestamp::from_millis(1_764_000_000_123),
                        command: command.clone(),
                        payload_hash: [0xa5; 32],
                        by,
                    };
                    for index in [0, 7, u64::MAX] {
                        let leaf = event.leaf(index, change.as_ref());
                        assert_eq!(leaf, as_object(&event, index, change.as_ref()));
                        let parsed: serde_json::Value = serde_json::from_str(&leaf).unwrap();
                        assert_eq!(parsed["index"], index);
                    }
                }
            }
        }
    }
}
