//! Who may do what: identities known to the cluster, circles' members and their
//! roles, and circles' OpenAI API keys, as the control API takes and shows them.
//!
//! | role | may |
//! |---|---|
//! | admin (cluster-wide) | everything |
//! | circle owner | what an operator may, and manage the circle's members and API keys |
//! | circle operator | submit, update and delete the circle's jobs; read its logs |
//! | circle viewer | read the circle's jobs, allocations and logs |
//!
//! Any known identity may read the cluster's shape (nodes, members, models, storage).
//! Jobs without a circle belong to the admins.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{hash_secret, hex, unhex};
use crate::identity::{IdentityId, PublicKey};
use crate::units::Timestamp;
use crate::ValidationError;

wire_enum!(
    /// A member's role in a circle; each includes the ones below it.
    Role {
        /// Reads the circle's jobs, allocations and logs.
        Viewer => "viewer",
        /// Also submits, updates and deletes the circle's jobs.
        Operator => "operator",
        /// Also manages the circle's members and API keys.
        Owner => "owner",
    }
);

/// Longest identity or API key name.
pub const MAX_NAME_LEN: usize = 64;

fn check_label(field: &str, name: &str) -> Result<(), ValidationError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!("1 to {MAX_NAME_LEN} characters of letters, digits, `-`, `_`, `.` or `@`"),
        ))
    }
}

/// `POST /api/v1/identities`: make a public key known, as an admin or not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddIdentity {
    /// A name for listings (`alice`).
    pub name: String,
    /// The identity's public key (`aigrid key show` prints it).
    pub public_key: PublicKey,
    /// Whether it is a cluster admin.
    #[serde(default)]
    pub admin: bool,
}

impl AddIdentity {
    /// Checks the name.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_label("name", &self.name)
    }
}

/// An identity as the cluster knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IdentityInfo {
    /// Its id: what its requests carry as their key id.
    pub id: IdentityId,
    /// Its name.
    pub name: String,
    /// Its public key.
    pub public_key: PublicKey,
    /// Whether it is a cluster admin.
    pub admin: bool,
    /// When it was added.
    pub created_at: Timestamp,
}

/// `PUT /api/v1/circles/{circle}/members/{identity}`: give a member a role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetMember {
    /// The role.
    pub role: Role,
}

/// One member of a circle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CircleMember {
    /// The member.
    pub identity: IdentityId,
    /// Its name, as the identity was added.
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// A circle: a name on jobs, with members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CircleInfo {
    /// The circle's name.
    pub name: String,
    /// Its members, by identity id.
    pub members: Vec<CircleMember>,
}

/// `POST /api/v1/circles/{circle}/api-keys`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    /// A name for listings (`chat-frontend`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl CreateApiKey {
    /// Checks the name.
    pub fn validate(&self) -> Result<(), ValidationError> {
        match &self.name {
            Some(name) => check_label("name", name),
            None => Ok(()),
        }
    }
}

/// An API key as listings show it: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiKeyInfo {
    /// The key's public id.
    pub id: String,
    /// The circle whose models it may call.
    pub circle: String,
    /// Its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// When it was made.
    pub created_at: Timestamp,
}

/// The answer to `POST /api/v1/circles/{circle}/api-keys`: the only time the key
/// is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreatedApiKey {
    /// `aigrid-key.<id>.<secret>`, for `Authorization: Bearer` on `/v1`.
    pub key: String,
    /// The key as listings show it.
    #[serde(flatten)]
    pub info: ApiKeyInfo,
}

/// Prefix of every API key, so a leaked one is recognisable in logs and scanners.
pub const API_KEY_PREFIX: &str = "aigrid-key";

/// An API key as a client presents it: `aigrid-key.<id>.<secret>`. Only the
/// secret's BLAKE3 hash is stored.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Public part: 16 hex characters.
    pub id: String,
    /// Secret part: 64 hex characters.
    pub secret: String,
}

impl ApiKey {
    /// A key from fresh random bytes.
    pub fn from_random(id: [u8; 8], secret: [u8; 32]) -> Self {
        ApiKey {
            id: hex(&id),
            secret: hex(&secret),
        }
    }

    /// The stored form of the secret.
    pub fn secret_hash(&self) -> String {
        hash_secret(&self.secret)
    }
}

impl std::fmt::Display for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{API_KEY_PREFIX}.{}.{}", self.id, self.secret)
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey({}, secret redacted)", self.id)
    }
}

impl std::str::FromStr for ApiKey {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const SHAPE: &str = "an API key looks like aigrid-key.<16 hex>.<64 hex>";
        let mut parts = s.trim().split('.');
        let (Some(API_KEY_PREFIX), Some(id), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(SHAPE);
        };
        unhex::<8>(id).ok_or(SHAPE)?;
        unhex::<32>(secret).ok_or(SHAPE)?;
        Ok(ApiKey {
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }
}

/// `GET /api/v1/whoami`: who the server takes the caller for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    /// The key id the request was signed with.
    pub key_id: String,
    /// The identity's name, when it is a known identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Whether it is a cluster admin.
    pub admin: bool,
    /// Its roles, by circle.
    pub circles: Vec<CircleRole>,
}

/// One circle role of an identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CircleRole {
    /// The circle.
    pub circle: String,
    /// The role in it.
    pub role: Role,
}

/// What reads show in place of a secret value (a task's `env` values).
pub const REDACTED: &str = "<redacted>";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_order_and_api_keys_round_trip_without_printing_secrets() {
        assert!(Role::Owner > Role::Operator && Role::Operator > Role::Viewer);
        assert_eq!(
            serde_json::to_string(&Role::Operator).unwrap(),
            "\"operator\""
        );
        let key = ApiKey::from_random([1; 8], [2; 32]);
        let shown = key.to_string();
        assert!(shown.starts_with("aigrid-key.0101010101010101."));
        assert_eq!(shown.parse::<ApiKey>().unwrap(), key);
        assert!(!format!("{key:?}").contains(&key.secret));
        for bad in [
            "",
            "aigrid-key.zz.00",
            "aigrid-join.0101010101010101.00",
            &shown[1..],
        ] {
            assert!(bad.parse::<ApiKey>().is_err(), "{bad}");
        }
        assert!(CreateApiKey {
            name: Some("a b".into())
        }
        .validate()
        .is_err());
    }
}
