//! The Human Chain, replicated: governed circles (members with weights, and a
//! policy), proposals for guarded changes with their signed decisions, the version of
//! every target a proposal can be based on, and the audit log of every applied
//! control change and proposal event.
//!
//! Every rule is checked here, as commands apply, so every server checks every
//! decision again (rule 6): the edge's own checks only answer early. The rules that
//! need no state (digests, counting) are `aigrid_consensus::human`'s.
//!
//! A guarded change travels as [`Command::Propose`] carrying the command it stands
//! for. The circle's version, the target's version, the signers with their weights,
//! the threshold and the window are taken from the state as the proposal applies,
//! never from the proposer (rules 2 and 3). The change applies once, at the decision
//! (or the [`Command::SettleProposals`] after its minimum window) that completes its
//! quorum, and only if its target is unchanged since (rule 5).

use std::collections::BTreeMap;

use aigrid_api::chain::ROOT_CIRCLE;
use aigrid_api::{
    CircleGovernance, DecisionRecord, Governance, IdentityId, ProposalInfo, ProposalState,
    SignedDecision, Signer, Timestamp,
};
use aigrid_consensus::human::audit::AuditLog;
use aigrid_consensus::human::{self, Ballot, ChainError, Count, DigestInput};
use serde::{Deserialize, Serialize};

use super::trail::{shown_payload, Change};
use super::*;

/// Proposals kept once final; older final ones are forgotten first, so the state
/// cannot grow without bound (the audit log keeps their story).
pub const FINAL_PROPOSALS_KEPT: usize = 1_000;
/// Proposals open at once across the cluster; more are refused (429-like conflict).
pub const MAX_OPEN_PROPOSALS: usize = 1_000;
/// Largest change one proposal may carry, encoded (a model's manifest is the
/// largest: a 70 GB model's is a few MiB).
pub const MAX_PROPOSED_BYTES: u64 = 16 << 20;
/// Bytes of changes all open proposals may carry together.
pub const MAX_OPEN_PROPOSED_BYTES: u64 = 256 << 20;

/// The replicated Human Chain tables.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Chain {
    /// Names this cluster in every digest; set once, by [`Command::InitCluster`].
    #[serde(default)]
    cluster_id: String,
    /// The seed of the cluster's audit key (hex), which checkpoints are signed with.
    /// Servers hold the whole state already; no read of the API shows it.
    #[serde(default)]
    audit_seed: String,
    /// Governed circles: their version, members' weights and policy. Their roles
    /// live in the access tables, kept equal to the members here.
    governed: BTreeMap<String, Governed>,
    /// Proposals by id.
    proposals: BTreeMap<String, ProposalRecord>,
    /// Per target (`job:NAME`, `circle:NAME`, ...), the log index of its last change.
    revisions: BTreeMap<String, u64>,
    /// The audit log.
    audit: AuditLog,
    /// Server changes allowed and not made yet, by server id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    grants: BTreeMap<u64, ServerChange>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Governed {
    version: u64,
    governance: Governance,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProposalRecord {
    info: ProposalInfo,
    /// The command it applies: the real one, with the secret values the shown
    /// payload only commits to.
    command: Box<Command>,
    /// The command's encoded size, counted against [`MAX_OPEN_PROPOSED_BYTES`].
    #[serde(default)]
    bytes: u64,
}

impl Chain {
    pub(super) fn governed_names(&self) -> impl Iterator<Item = &str> {
        self.governed.keys().map(String::as_str)
    }

    /// Records that `target` changed at log `index`.
    pub(super) fn set_revision(&mut self, target: &str, index: u64) {
        self.revisions.insert(target.to_owned(), index);
    }

    /// Appends a leaf to the audit log.
    pub(super) fn append(&mut self, leaf: String) {
        self.audit.append(leaf);
    }

    pub(super) fn check(&self) -> Result<(), String> {
        for (name, g) in &self.governed {
            g.governance
                .validate()
                .map_err(|e| format!("governed circle `{name}`: {e}"))?;
        }
        let open = self
            .proposals
            .values()
            .filter(|p| !p.info.state.is_final())
            .count();
        if open > MAX_OPEN_PROPOSALS {
            return Err(format!("{open} open proposals"));
        }
        Ok(())
    }
}

/// The digest a proposal stores (hex, written by `propose`); all zeroes, which
/// no signature is over, if it were ever unreadable.
fn stored_digest(info: &ProposalInfo) -> [u8; 32] {
    hex::decode(&info.digest)
        .ok()
        .and_then(|d| d.try_into().ok())
        .unwrap_or_default()
}

/// The ballot of a proposal: its frozen signers and policy, and its decisions.
fn ballot<'a>(info: &'a ProposalInfo, digest: &'a [u8; 32]) -> Ballot<'a> {
    Ballot {
        signers: &info.signers,
        threshold: info.threshold,
        new_threshold: info.new_threshold,
        require_hybrid: info.require_hybrid,
        digest,
        decisions: &info.decisions,
    }
}

fn chain_error(e: ChainError) -> StateError {
    StateError::Chain(e)
}

impl ClusterState {
    /// The cluster's id, once set.
    pub fn cluster_id(&self) -> &str {
        &self.tables.chain.cluster_id
    }

    /// The cluster's audit key, once the cluster is initialised.
    pub fn audit_key(&self) -> Option<aigrid_api::IdentityKey> {
        let seed: [u8; 32] = hex::decode(&self.tables.chain.audit_seed)
            .ok()?
            .try_into()
            .ok()?;
        Some(aigrid_api::IdentityKey::from_seed(
            aigrid_api::KeyAlgorithm::Ed25519MlDsa65,
            seed,
        ))
    }

    /// The audit log.
    pub fn audit_log(&self) -> &AuditLog {
        &self.tables.chain.audit
    }

    /// A governed circle.
    pub fn governance(&self, circle: &str) -> Option<CircleGovernance> {
        self.tables
            .chain
            .governed
            .get(circle)
            .map(|g| CircleGovernance {
                name: circle.to_owned(),
                version: g.version,
                governance: g.governance.clone(),
            })
    }

    /// A governed circle's members and policy, borrowed: what the apply path reads.
    pub fn governing(&self, circle: &str) -> Option<&Governance> {
        self.tables
            .chain
            .governed
            .get(circle)
            .map(|g| &g.governance)
    }

    /// Every proposal kept, in id order, borrowed (for counting without copying).
    pub fn proposal_infos(&self) -> impl Iterator<Item = &ProposalInfo> {
        self.tables.chain.proposals.values().map(|p| &p.info)
    }

    /// A proposal.
    pub fn proposal(&self, id: &str) -> Option<&ProposalInfo> {
        self.tables.chain.proposals.get(id).map(|p| &p.info)
    }

    /// Proposals whose circle passes `keep`, newest first.
    pub fn proposals_where(&self, keep: impl Fn(&ProposalInfo) -> bool) -> Vec<ProposalInfo> {
        let mut out: Vec<ProposalInfo> = self
            .tables
            .chain
            .proposals
            .values()
            .map(|p| &p.info)
            .filter(|p| keep(p))
            .cloned()
            .collect();
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
        out
    }

    /// The version of a target a proposal would be based on now.
    pub fn revision(&self, target: &str) -> u64 {
        self.tables
            .chain
            .revisions
            .get(target)
            .copied()
            .unwrap_or(0)
    }

    /// Whether something is due: a pending or approved proposal past its expiry, or
    /// an approved one past its minimum window. The leader proposes
    /// [`Command::SettleProposals`] when it is.
    pub fn proposals_due(&self, now: Timestamp) -> bool {
        self.tables.chain.proposals.values().any(|p| {
            let i = &p.info;
            (!i.state.is_final() && now > i.expires_at)
                || (i.state == ProposalState::Approved && now >= i.not_before)
        })
    }

    /// Whether `change` needs its circle's quorum: its circle is governed and its
    /// policy guards the kind. The root circle guards nothing while it has a single
    /// member (its admin acts alone until there are others to ask).
    pub fn is_guarded(&self, change: &Change) -> bool {
        let Some(g) = self.tables.chain.governed.get(&change.circle) else {
            return false;
        };
        if change.circle == ROOT_CIRCLE && g.governance.members.len() < 2 {
            return false;
        }
        g.governance.policy.guards(change.kind)
    }

    /// The guarded change `command` would make, if any: a direct command that makes
    /// one is refused as it applies.
    pub fn guarded_change(&self, command: &Command) -> Option<Change> {
        self.change_of(command).filter(|c| self.is_guarded(c))
    }

    /// Whether `id` is a member of a governed circle (it cannot be removed then,
    /// except by a governance proposal first).
    fn governs(&self, id: &IdentityId) -> Option<&str> {
        self.tables
            .chain
            .governed
            .iter()
            .find(|(_, g)| g.governance.members.iter().any(|m| m.identity == *id))
            .map(|(name, _)| name.as_str())
    }

    pub(super) fn refuse_if_governing(&self, id: &IdentityId) -> Result<(), StateError> {
        match self.governs(id) {
            Some(circle) => Err(StateError::conflict(format!(
                "`{id}` is a member of governed circle `{circle}`: remove it there first \
                 (aigrid circle member rm)"
            ))),
            None => Ok(()),
        }
    }

    pub(super) fn is_governed(&self, circle: &str) -> bool {
        self.tables.chain.governed.contains_key(circle)
    }

    /// The server change allowed for server `id`, if any.
    pub fn membership_grant(&self, id: u64) -> Option<&ServerChange> {
        self.tables.chain.grants.get(&id)
    }

    pub(super) fn grant_membership(&mut self, change: ServerChange) -> Applied {
        self.tables.chain.grants.insert(change.id(), change.clone());
        Applied::MembershipGranted(change)
    }

    pub(super) fn use_membership_grant(&mut self, id: u64) -> Applied {
        Applied::MembershipGrantUsed(self.tables.chain.grants.remove(&id).is_some())
    }

    pub(super) fn init_cluster(&mut self, cluster_id: String, audit_seed: String) -> CommandOutput {
        let chain = &mut self.tables.chain;
        if chain.cluster_id.is_empty() {
            chain.cluster_id = cluster_id;
            chain.audit_seed = audit_seed;
        }
        Ok(Applied::ClusterInitialized {
            cluster_id: chain.cluster_id.clone(),
        })
    }

    /// Checks a governance against the identities the cluster knows: every member
    /// known, and no two members sharing a key (one person, counted once).
    fn check_members(&self, governance: &Governance) -> Result<(), StateError> {
        governance.validate()?;
        let mut keys = Vec::new();
        for m in &governance.members {
            let info = self
                .identity(&m.identity)
                .ok_or_else(|| StateError::not_found(ObjectKind::Identity, &m.identity))?;
            // The ed25519 half: an ed25519 key and the hybrid grown from it are one.
            let ed = info.public_key.ed25519_bytes();
            if keys.contains(&ed) {
                return Err(StateError::Invalid(aigrid_api::ValidationError::new(
                    "members",
                    format!("`{}` shares its key with another member", m.identity),
                )));
            }
            keys.push(ed);
        }
        Ok(())
    }

    /// Makes `circle` governed with `governance`, or replaces its governance (a
    /// direct change when the policy does not guard it, or a proposal applying).
    pub(super) fn set_governance(
        &mut self,
        circle: String,
        governance: Governance,
        create: bool,
    ) -> CommandOutput {
        aigrid_api::spec::check_name("circle", &circle)?;
        self.check_members(&governance)?;
        let exists = self.tables.chain.governed.get(&circle);
        if create && exists.is_some() {
            return Err(StateError::conflict(format!(
                "circle `{circle}` exists; change it with aigrid circle member or policy"
            )));
        }
        if !create && exists.is_none() {
            return Err(StateError::not_found(ObjectKind::Circle, &circle));
        }
        if exists.is_some_and(|g| g.governance == governance) {
            return Ok(Applied::CircleGoverned(
                self.governance(&circle).expect("checked just above"),
            ));
        }
        let version = exists.map_or(1, |g| g.version + 1);
        let roles = governance
            .members
            .iter()
            .map(|m| (m.identity.clone(), m.role))
            .collect();
        self.tables.access.set_roles(&circle, roles);
        self.tables.chain.governed.insert(
            circle.clone(),
            Governed {
                version,
                governance,
            },
        );
        Ok(Applied::CircleGoverned(
            self.governance(&circle).expect("inserted just above"),
        ))
    }

    /// Makes the proposal `id` for `command` (a guarded change), freezing the circle's
    /// signers, weights, threshold and window as they are now.
    pub(super) fn propose(
        &mut self,
        id: String,
        command: Command,
        by: IdentityId,
        at: Timestamp,
    ) -> CommandOutput {
        if let Some(existing) = self.tables.chain.proposals.get(&id) {
            // A replay of the same proposal answers the same.
            if *existing.command == command && existing.info.proposer == by {
                return Ok(Applied::Proposed(existing.info.clone()));
            }
            return Err(StateError::conflict(format!("proposal id `{id}` is used")));
        }
        if self.tables.chain.cluster_id.is_empty() {
            return Err(StateError::conflict(
                "the cluster has no id yet (its leader sets one at start); try again shortly",
            ));
        }
        let change = self.guarded_change(&command).ok_or_else(|| {
            StateError::conflict("nothing in this request is guarded: send it directly")
        })?;
        let open = self
            .tables
            .chain
            .proposals
            .values()
            .filter(|p| !p.info.state.is_final());
        let (count, open_bytes) = open.fold((0, 0), |(n, b), p| (n + 1, b + p.bytes));
        if count >= MAX_OPEN_PROPOSALS {
            return Err(StateError::conflict(format!(
                "{count} proposals are open; decide some before making more"
            )));
        }
        let bytes = serde_json::to_vec(&command).map_or(u64::MAX, |v| v.len() as u64);
        if bytes > MAX_PROPOSED_BYTES {
            return Err(StateError::Invalid(aigrid_api::ValidationError::new(
                "command",
                format!("a proposed change is at most {MAX_PROPOSED_BYTES} bytes, this is {bytes}"),
            )));
        }
        if open_bytes + bytes > MAX_OPEN_PROPOSED_BYTES {
            return Err(StateError::conflict(format!(
                "open proposals carry {open_bytes} bytes of changes; decide some before making more"
            )));
        }
        let governed = &self.tables.chain.governed[&change.circle];
        let policy = &governed.governance.policy;
        let mut signers: Vec<Signer> = Vec::new();
        for m in &governed.governance.members {
            let Some(info) = self.identity(&m.identity) else {
                continue;
            };
            signers.push(Signer {
                identity: m.identity.clone(),
                public_key: info.public_key.clone(),
                weight: m.weight,
                new_weight: 0,
                veto: policy.veto.contains(&m.identity),
            });
        }
        let mut new_threshold = None;
        if let Command::SetGovernance {
            governance: new, ..
        } = &command
        {
            if change.kind.changes_signers() {
                // Rule 4: the new governance's quorum must agree too.
                self.check_members(new)?;
                new_threshold = Some(new.policy.threshold);
                for m in &new.members {
                    match signers.iter_mut().find(|s| s.identity == m.identity) {
                        Some(s) => s.new_weight = m.weight,
                        None => {
                            let info = self.identity(&m.identity).ok_or_else(|| {
                                StateError::not_found(ObjectKind::Identity, &m.identity)
                            })?;
                            signers.push(Signer {
                                identity: m.identity.clone(),
                                public_key: info.public_key.clone(),
                                weight: 0,
                                new_weight: m.weight,
                                veto: false,
                            });
                        }
                    }
                }
            }
        }
        let payload = shown_payload(&command, &id);
        let payload_hash = human::payload_hash(&payload);
        let base_version = self.revision(&change.target);
        let expires_at = Timestamp::from_millis(
            at.as_millis()
                .saturating_add(policy.max_window_secs.saturating_mul(1000)),
        );
        let not_before = Timestamp::from_millis(
            at.as_millis()
                .saturating_add(policy.min_window_secs.saturating_mul(1000)),
        );
        let digest = human::proposal_digest(&DigestInput {
            cluster_id: &self.tables.chain.cluster_id,
            circle: &change.circle,
            circle_version: governed.version,
            kind: change.kind,
            payload_hash: &payload_hash,
            base_version,
            proposal_id: &id,
            expires_at,
        });
        let info = ProposalInfo {
            id: id.clone(),
            cluster_id: self.tables.chain.cluster_id.clone(),
            state: ProposalState::Pending,
            circle: change.circle.clone(),
            circle_version: governed.version,
            kind: change.kind,
            target: change.target,
            payload,
            payload_hash: hex::encode(payload_hash),
            base_version,
            proposer: by,
            created_at: at,
            not_before,
            expires_at,
            digest: hex::encode(digest),
            signers,
            threshold: policy.threshold,
            new_threshold,
            require_hybrid: policy.require_hybrid,
            decisions: Vec::new(),
            approved_weight: 0,
            new_approved_weight: new_threshold.map(|_| 0),
            reason: None,
            closed_at: None,
        };
        let event = serde_json::json!({
            "event": "proposed", "proposal": id, "circle": info.circle,
            "circle_version": info.circle_version, "kind": info.kind, "target": info.target,
            "base_version": base_version, "payload_hash": info.payload_hash,
            "digest": info.digest, "by": info.proposer,
        });
        self.audit(self.applying, at, event);
        self.tables.chain.proposals.insert(
            id,
            ProposalRecord {
                info: info.clone(),
                command: Box::new(command),
                bytes,
            },
        );
        self.trim_proposals();
        Ok(Applied::Proposed(info))
    }

    fn trim_proposals(&mut self) {
        let proposals = &mut self.tables.chain.proposals;
        let mut finals: Vec<(Timestamp, String)> = proposals
            .values()
            .filter(|p| p.info.state.is_final())
            .map(|p| {
                (
                    p.info.closed_at.unwrap_or(p.info.created_at),
                    p.info.id.clone(),
                )
            })
            .collect();
        if finals.len() <= FINAL_PROPOSALS_KEPT {
            return;
        }
        finals.sort();
        let excess = finals.len() - FINAL_PROPOSALS_KEPT;
        for (_, id) in finals.into_iter().take(excess) {
            proposals.remove(&id);
        }
    }

    /// Records `by`'s signed decision on proposal `id` after checking it, and applies
    /// the change if this decision completes its quorum (and its window allows).
    pub(super) fn decide(
        &mut self,
        index: u64,
        id: String,
        by: IdentityId,
        signed: SignedDecision,
        at: Timestamp,
    ) -> CommandOutput {
        let record = self
            .tables
            .chain
            .proposals
            .get(&id)
            .ok_or_else(|| StateError::not_found(ObjectKind::Proposal, &id))?;
        // A replay of a recorded decision answers the proposal as it is.
        if record.info.decisions.iter().any(|d| {
            d.identity == by && d.signature == signed.signature && d.decision == signed.decision
        }) {
            return Ok(Applied::Decided(record.info.clone()));
        }
        let info = &record.info;
        match info.state {
            ProposalState::Pending | ProposalState::Approved => {}
            ProposalState::Vetoed => return Err(chain_error(ChainError::Vetoed)),
            ProposalState::Expired => {
                return Err(chain_error(ChainError::Expired(info.expires_at)))
            }
            ProposalState::Stale => {
                return Err(chain_error(ChainError::Stale(
                    info.reason.clone().unwrap_or_default(),
                )))
            }
            state => return Err(chain_error(ChainError::Closed(state))),
        }
        if at > info.expires_at {
            // Refused without a change; the leader's settling marks it expired.
            return Err(chain_error(ChainError::Expired(info.expires_at)));
        }
        let digest = stored_digest(info);
        ballot(info, &digest)
            .admit(&by, &signed)
            .map_err(chain_error)?;
        let record = self
            .tables
            .chain
            .proposals
            .get_mut(&id)
            .expect("read above");
        record.info.decisions.push(DecisionRecord {
            identity: by.clone(),
            decision: signed.decision,
            signature: signed.signature.clone(),
            at,
        });
        self.audit(
            index,
            at,
            serde_json::json!({
                "event": "decision", "proposal": id, "by": by,
                "decision": signed.decision, "signature": signed.signature,
            }),
        );
        self.recount(index, &id, at);
        Ok(Applied::Decided(
            self.tables.chain.proposals[&id].info.clone(),
        ))
    }

    /// Counts a proposal's decisions again and moves it on: applies it when its
    /// quorum is complete and its minimum window has passed.
    fn recount(&mut self, index: u64, id: &str, at: Timestamp) {
        let info = &self.tables.chain.proposals[id].info;
        let count = ballot(info, &stored_digest(info)).count();
        let not_before = info.not_before;
        let record = self.tables.chain.proposals.get_mut(id).expect("read above");
        match count {
            Count::Pending { have, new, .. } => {
                record.info.approved_weight = have;
                record.info.new_approved_weight = new.map(|(h, _)| h);
            }
            Count::Rejected => self.close(
                id,
                ProposalState::Rejected,
                "the threshold is out of reach",
                at,
            ),
            Count::Vetoed => self.close(id, ProposalState::Vetoed, "vetoed", at),
            Count::Reached => {
                record.info.approved_weight = u64::from(record.info.threshold);
                record.info.new_approved_weight = record.info.new_threshold.map(u64::from);
                if at >= not_before {
                    self.apply_proposal(index, id, at);
                } else if record.info.state == ProposalState::Pending {
                    record.info.state = ProposalState::Approved;
                    self.audit(
                        index,
                        at,
                        serde_json::json!({"event": "proposal_approved", "proposal": id}),
                    );
                }
            }
        }
    }

    /// Applies an approved proposal's change, once, if its target is unchanged.
    fn apply_proposal(&mut self, index: u64, id: &str, at: Timestamp) {
        let record = &self.tables.chain.proposals[id];
        let current = self.revision(&record.info.target);
        if current != record.info.base_version {
            let reason = format!(
                "`{}` changed since the proposal was made (version {} then, {current} now)",
                record.info.target, record.info.base_version
            );
            self.close(id, ProposalState::Stale, &reason, at);
            return;
        }
        let command = (*record.command).clone();
        let change = self.change_of(&command);
        match self.dispatch(index, command.clone()) {
            Ok(_) => {
                if let Some(change) = &change {
                    self.tables
                        .chain
                        .revisions
                        .insert(change.target.clone(), index);
                }
                let record = self.tables.chain.proposals.get_mut(id).expect("read above");
                record.info.state = ProposalState::Applied;
                record.info.closed_at = Some(at);
                let hash = record.info.payload_hash.clone();
                self.audit(
                    index,
                    at,
                    serde_json::json!({"event": "proposal_applied", "proposal": id, "payload_hash": hash}),
                );
            }
            Err(e) => {
                let reason = format!("it no longer applies: {e}");
                self.close(id, ProposalState::Stale, &reason, at);
            }
        }
    }

    fn close(&mut self, id: &str, state: ProposalState, reason: &str, at: Timestamp) {
        let index = self.applying;
        if let Some(record) = self.tables.chain.proposals.get_mut(id) {
            record.info.state = state;
            record.info.reason = Some(reason.to_owned());
            record.info.closed_at = Some(at);
        }
        self.audit(
            index,
            at,
            serde_json::json!({"event": format!("proposal_{state}"), "proposal": id, "reason": reason}),
        );
    }

    /// Expires what is past its window and applies approved proposals whose minimum
    /// window has passed.
    pub(super) fn settle_proposals(&mut self, index: u64, at: Timestamp) -> CommandOutput {
        let due: Vec<(String, ProposalState, Timestamp, Timestamp)> = self
            .tables
            .chain
            .proposals
            .values()
            .filter(|p| !p.info.state.is_final())
            .map(|p| {
                (
                    p.info.id.clone(),
                    p.info.state,
                    p.info.expires_at,
                    p.info.not_before,
                )
            })
            .collect();
        let (mut applied, mut expired) = (0, 0);
        for (id, state, expires_at, not_before) in due {
            if at > expires_at {
                self.close(&id, ProposalState::Expired, "its window closed", at);
                expired += 1;
            } else if state == ProposalState::Approved && at >= not_before {
                self.apply_proposal(index, &id, at);
                applied += 1;
            }
        }
        Ok(Applied::ProposalsSettled { applied, expired })
    }
}
