//! Who may do what, replicated: the identities the cluster knows (and which are
//! admins), circles' members with their roles, and circles' API keys (their secrets'
//! hashes only). The edge asks [`ClusterState::allows`] before it proposes a change
//! or answers a read; the rules that keep the cluster governable (there is always an
//! admin once there was one) hold here, where commands apply.

use std::collections::BTreeMap;

use aigrid_api::{
    ApiKeyInfo, CircleInfo, CircleMember, CircleRole, IdentityId, IdentityInfo, NodeId, PublicKey,
    Role, Timestamp,
};
use serde::{Deserialize, Serialize};

use super::*;

/// Who a request comes from, once its signature is checked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// A known identity.
    Identity(IdentityId),
    /// A node's agent.
    Node(NodeId),
}

/// What a request wants to do, as far as access is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<'a> {
    /// Cluster-wide changes and reads of cluster-wide secrets: admins only.
    Admin,
    /// Reads of the cluster's shape (nodes, members, models): any known identity.
    ReadCluster,
    /// Needs at least `role` in the circle; circle-less objects are the admins'.
    Circle(Option<&'a str>, Role),
}

/// The access tables.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Access {
    identities: BTreeMap<IdentityId, IdentityInfo>,
    circles: BTreeMap<String, BTreeMap<IdentityId, Role>>,
    api_keys: BTreeMap<String, ApiKeyRecord>,
}

/// An API key as the state keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeyRecord {
    info: ApiKeyInfo,
    secret_hash: String,
}

impl Access {
    /// Replaces a circle's roles whole (a governed circle's members changed).
    pub(super) fn set_roles(&mut self, circle: &str, roles: BTreeMap<IdentityId, Role>) {
        if roles.is_empty() {
            self.circles.remove(circle);
        } else {
            self.circles.insert(circle.to_owned(), roles);
        }
    }

    fn admins(&self) -> usize {
        self.identities.values().filter(|i| i.admin).count()
    }

    pub(super) fn check(&self) -> Result<(), String> {
        for (circle, members) in &self.circles {
            if let Some(id) = members.keys().find(|id| !self.identities.contains_key(*id)) {
                return Err(format!("circle `{circle}` has unknown member `{id}`"));
            }
        }
        if let Some((id, _)) = self
            .identities
            .iter()
            .find(|(id, info)| info.public_key.id() != **id)
        {
            return Err(format!("identity `{id}` does not match its key"));
        }
        Ok(())
    }
}

impl ClusterState {
    /// The public key and admin flag of an identity.
    pub fn identity(&self, id: &IdentityId) -> Option<&IdentityInfo> {
        self.tables.access.identities.get(id)
    }

    /// Every known identity.
    pub fn identities(&self) -> Vec<IdentityInfo> {
        self.tables.access.identities.values().cloned().collect()
    }

    /// True once the cluster has an admin.
    pub fn has_admin(&self) -> bool {
        self.tables.access.admins() > 0
    }

    /// Whether `who` may do `action`.
    pub fn allows(&self, who: &Principal, action: Action<'_>) -> bool {
        let Principal::Identity(id) = who else {
            // Nodes act only through the agent routes, which check their own node.
            return false;
        };
        let Some(identity) = self.identity(id) else {
            return false;
        };
        if identity.admin {
            return true;
        }
        match action {
            Action::Admin => false,
            Action::ReadCluster => true,
            Action::Circle(None, _) => false,
            Action::Circle(Some(circle), role) => self.role_in(id, circle) >= Some(role),
        }
    }

    /// Why `who` may not do `action`: the message of a 403, the same from the edge's
    /// check and from a command's.
    pub fn denial(who: &Principal, action: Action<'_>) -> String {
        let who = match who {
            Principal::Identity(id) => format!("identity `{id}`"),
            Principal::Node(node) => format!("node `{node}`"),
        };
        let what = match action {
            Action::Admin => "this needs a cluster admin".to_owned(),
            Action::ReadCluster => "this needs a known identity".to_owned(),
            Action::Circle(None, _) => "objects without a circle belong to the admins".to_owned(),
            Action::Circle(Some(circle), role) => {
                format!("this needs the role `{role}` or above in circle `{circle}`")
            }
        };
        format!("{who} may not do this: {what}")
    }

    /// `id`'s role in `circle`, if any.
    pub fn role_in(&self, id: &IdentityId, circle: &str) -> Option<Role> {
        self.tables
            .access
            .circles
            .get(circle)
            .and_then(|m| m.get(id))
            .copied()
    }

    /// `id`'s roles, by circle.
    pub fn roles_of(&self, id: &IdentityId) -> Vec<CircleRole> {
        self.tables
            .access
            .circles
            .iter()
            .filter_map(|(circle, members)| {
                members.get(id).map(|role| CircleRole {
                    circle: circle.clone(),
                    role: *role,
                })
            })
            .collect()
    }

    /// A circle and its members; `None` for a circle nobody was ever given a role in.
    pub fn circle(&self, name: &str) -> Option<CircleInfo> {
        let members = self.tables.access.circles.get(name)?;
        Some(CircleInfo {
            name: name.to_owned(),
            members: members
                .iter()
                .map(|(id, role)| CircleMember {
                    identity: id.clone(),
                    name: self
                        .identity(id)
                        .map(|i| i.name.clone())
                        .unwrap_or_default(),
                    role: *role,
                })
                .collect(),
        })
    }

    /// Every circle with members.
    pub fn circles(&self) -> Vec<CircleInfo> {
        self.tables
            .access
            .circles
            .keys()
            .filter_map(|name| self.circle(name))
            .collect()
    }

    /// The API keys of `circle` (every key when `None`), never their secrets.
    pub fn api_keys(&self, circle: Option<&str>) -> Vec<ApiKeyInfo> {
        self.tables
            .access
            .api_keys
            .values()
            .filter(|k| circle.is_none_or(|c| k.info.circle == c))
            .map(|k| k.info.clone())
            .collect()
    }

    /// The circle an API key serves, if `secret_hash` is the hash of its secret.
    pub fn api_key_circle(&self, id: &str, secret_hash: &str) -> Option<&str> {
        let record = self.tables.access.api_keys.get(id)?;
        let same = record.secret_hash.len() == secret_hash.len()
            && record
                .secret_hash
                .bytes()
                .zip(secret_hash.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        same.then_some(record.info.circle.as_str())
    }

    pub(super) fn bootstrap_admins(
        &mut self,
        admins: Vec<(String, PublicKey)>,
        at: Timestamp,
    ) -> CommandOutput {
        if self.has_admin() {
            return Ok(Applied::AdminsBootstrapped { added: 0 });
        }
        let mut added = 0;
        for (name, public_key) in admins {
            let id = public_key.id();
            self.tables.access.identities.insert(
                id.clone(),
                IdentityInfo {
                    id,
                    name,
                    public_key,
                    admin: true,
                    created_at: at,
                },
            );
            added += 1;
        }
        self.govern_root();
        Ok(Applied::AdminsBootstrapped { added })
    }

    /// Makes the root circle, which guards cluster-wide changes, with the first
    /// admins as its members (weight 1, owners) and a majority of them as its
    /// threshold. With one member it guards nothing (see `is_guarded`): the admin
    /// acts alone until it adds others to ask.
    fn govern_root(&mut self) {
        if self.is_governed(aigrid_api::chain::ROOT_CIRCLE) {
            return;
        }
        let members: Vec<aigrid_api::PolicyMember> = self
            .tables
            .access
            .identities
            .values()
            .filter(|i| i.admin)
            .take(aigrid_api::chain::MAX_MEMBERS)
            .map(|i| aigrid_api::PolicyMember {
                identity: i.id.clone(),
                weight: 1,
                role: Role::Owner,
            })
            .collect();
        if members.is_empty() {
            return;
        }
        let threshold = if members.len() == 1 {
            1
        } else {
            u32::try_from(members.len() / 2 + 1).unwrap_or(u32::MAX)
        };
        let mut policy = aigrid_api::CirclePolicy::new(threshold);
        policy.guarded = aigrid_api::ChangeKind::root_default();
        let governance = aigrid_api::Governance { members, policy };
        // Refused only for admins sharing one key (an ed25519 key and the hybrid grown
        // from it): the root circle is then left for `aigrid circle create root`.
        let _ = self.set_governance(aigrid_api::chain::ROOT_CIRCLE.to_owned(), governance, true);
    }

    pub(super) fn put_identity(
        &mut self,
        name: String,
        public_key: PublicKey,
        admin: bool,
        at: Timestamp,
    ) -> CommandOutput {
        let id = public_key.id();
        let access = &mut self.tables.access;
        if let Some(existing) = access.identities.get(&id) {
            if existing.admin && !admin && access.admins() == 1 {
                return Err(StateError::conflict(format!(
                    "`{id}` is the last admin; add another admin first"
                )));
            }
        }
        let created_at = access.identities.get(&id).map_or(at, |i| i.created_at);
        let info = IdentityInfo {
            id: id.clone(),
            name,
            public_key,
            admin,
            created_at,
        };
        access.identities.insert(id, info.clone());
        Ok(Applied::IdentityPut(info))
    }

    pub(super) fn remove_identity(&mut self, id: IdentityId) -> CommandOutput {
        self.refuse_if_governing(&id)?;
        let access = &mut self.tables.access;
        let Some(existing) = access.identities.get(&id) else {
            return Err(StateError::not_found(ObjectKind::Identity, id.as_str()));
        };
        if existing.admin && access.admins() == 1 {
            return Err(StateError::conflict(format!(
                "`{id}` is the last admin; add another admin first"
            )));
        }
        access.identities.remove(&id);
        for members in access.circles.values_mut() {
            members.remove(&id);
        }
        access.circles.retain(|_, members| !members.is_empty());
        Ok(Applied::IdentityRemoved { id })
    }

    pub(super) fn set_member(
        &mut self,
        circle: String,
        identity: IdentityId,
        role: Option<Role>,
    ) -> CommandOutput {
        if self.is_governed(&circle) {
            return Err(StateError::conflict(format!(
                "circle `{circle}` is governed: change its members with aigrid circle member \
                 add or rm (a governance change, proposed when its policy guards it)"
            )));
        }
        let access = &mut self.tables.access;
        if !access.identities.contains_key(&identity) {
            return Err(StateError::not_found(
                ObjectKind::Identity,
                identity.as_str(),
            ));
        }
        match role {
            Some(role) => {
                access
                    .circles
                    .entry(circle.clone())
                    .or_default()
                    .insert(identity, role);
            }
            None => {
                let removed = access
                    .circles
                    .get_mut(&circle)
                    .and_then(|m| m.remove(&identity));
                if removed.is_none() {
                    return Err(StateError::not_found(
                        ObjectKind::Member,
                        format!("{circle}/{identity}"),
                    ));
                }
                access.circles.retain(|_, members| !members.is_empty());
            }
        }
        let info = self.circle(&circle).unwrap_or(CircleInfo {
            name: circle,
            members: Vec::new(),
        });
        Ok(Applied::CircleChanged(info))
    }

    pub(super) fn create_api_key(
        &mut self,
        info: ApiKeyInfo,
        secret_hash: String,
    ) -> CommandOutput {
        let keys = &mut self.tables.access.api_keys;
        if let Some(existing) = keys.get(&info.id) {
            if existing.secret_hash == secret_hash && existing.info == info {
                return Ok(Applied::ApiKeyCreated(info));
            }
            return Err(StateError::conflict(format!(
                "API key `{}` exists",
                info.id
            )));
        }
        keys.insert(
            info.id.clone(),
            ApiKeyRecord {
                info: info.clone(),
                secret_hash,
            },
        );
        Ok(Applied::ApiKeyCreated(info))
    }

    pub(super) fn revoke_api_key(&mut self, id: String) -> CommandOutput {
        match self.tables.access.api_keys.remove(&id) {
            Some(record) => Ok(Applied::ApiKeyRevoked(record.info)),
            None => Err(StateError::not_found(ObjectKind::ApiKey, &id)),
        }
    }
}

#[cfg(test)]
mod tests {
    use aigrid_api::{IdentityKey, KeyAlgorithm};

    use super::*;

    fn key(seed: u8) -> PublicKey {
        IdentityKey::from_seed(KeyAlgorithm::Ed25519, [seed; 32]).public()
    }

    fn at() -> Timestamp {
        Timestamp::from_millis(1)
    }

    #[test]
    fn roles_decide_and_the_last_admin_stays() {
        let mut s = ClusterState::default();
        let (admin, alice, bob) = (key(1), key(2), key(3));
        let who = |k: &PublicKey| Principal::Identity(k.id());
        // Before any admin, nobody may do anything.
        assert!(!s.allows(&who(&admin), Action::ReadCluster));
        s.bootstrap_admins(vec![("root".into(), admin.clone())], at())
            .unwrap();
        // A second bootstrap (another server's flags) changes nothing.
        assert_eq!(
            s.bootstrap_admins(vec![("evil".into(), bob.clone())], at()),
            Ok(Applied::AdminsBootstrapped { added: 0 })
        );
        assert!(s.allows(&who(&admin), Action::Admin));
        assert!(!s.allows(&who(&bob), Action::ReadCluster));
        s.put_identity("alice".into(), alice.clone(), false, at())
            .unwrap();
        s.set_member("lab".into(), alice.id(), Some(Role::Operator))
            .unwrap();
        let a = who(&alice);
        assert!(s.allows(&a, Action::ReadCluster));
        assert!(!s.allows(&a, Action::Admin));
        assert!(s.allows(&a, Action::Circle(Some("lab"), Role::Operator)));
        assert!(s.allows(&a, Action::Circle(Some("lab"), Role::Viewer)));
        assert!(!s.allows(&a, Action::Circle(Some("lab"), Role::Owner)));
        assert!(!s.allows(&a, Action::Circle(Some("other"), Role::Viewer)));
        assert!(!s.allows(&a, Action::Circle(None, Role::Viewer)));
        assert!(!s.allows(&Principal::Node(NodeId::new("n")), Action::ReadCluster));
        // Unknown members are refused; removing an identity drops its roles.
        assert!(s
            .set_member("lab".into(), bob.id(), Some(Role::Viewer))
            .is_err());
        s.remove_identity(alice.id()).unwrap();
        assert!(s.circle("lab").is_none());
        s.check_invariants().unwrap();
        // The last admin can be neither removed nor demoted.
        assert!(s.remove_identity(admin.id()).is_err());
        assert!(s
            .put_identity("root".into(), admin.clone(), false, at())
            .is_err());
        s.put_identity("bob".into(), bob.clone(), true, at())
            .unwrap();
        // The first admin is the root circle's member: it leaves the circle first.
        let root = aigrid_api::chain::ROOT_CIRCLE;
        assert_eq!(
            s.governance(root).unwrap().governance.members[0].identity,
            admin.id()
        );
        assert!(s.remove_identity(admin.id()).is_err());
        let mut g = s.governance(root).unwrap().governance;
        g.members[0].identity = bob.id();
        s.set_governance(root.into(), g, false).unwrap();
        s.remove_identity(admin.id()).unwrap();
        assert!(!s.allows(&who(&admin), Action::ReadCluster));
    }

    #[test]
    fn api_keys_match_their_hash_only() {
        let mut s = ClusterState::default();
        let info = ApiKeyInfo {
            id: "k1".into(),
            circle: "lab".into(),
            name: None,
            created_at: at(),
        };
        s.create_api_key(info.clone(), "ab".repeat(32)).unwrap();
        // A replay answers the same; another secret under the same id conflicts.
        s.create_api_key(info.clone(), "ab".repeat(32)).unwrap();
        assert!(s.create_api_key(info, "cd".repeat(32)).is_err());
        assert_eq!(s.api_key_circle("k1", &"ab".repeat(32)), Some("lab"));
        assert_eq!(s.api_key_circle("k1", &"ab".repeat(31)), None);
        assert_eq!(s.api_key_circle("k2", &"ab".repeat(32)), None);
        s.revoke_api_key("k1".into()).unwrap();
        assert_eq!(s.api_key_circle("k1", &"ab".repeat(32)), None);
    }
}
