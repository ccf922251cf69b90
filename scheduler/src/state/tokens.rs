//! Join tokens: created by an operator, spent by nodes joining with a new key.

use aigrid_api::{JoinTokenInfo, Timestamp};
use serde::{Deserialize, Serialize};

use super::*;

/// A join token presented with a registration: its id and the hash of the secret
/// presented, compared with the stored hash when the registration applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUse {
    /// The token's public id.
    pub id: String,
    /// BLAKE3 of the presented secret, hex.
    pub secret_hash: String,
}

impl ClusterState {
    /// Every join token, by id; never their secrets.
    pub fn join_tokens(&self) -> Vec<JoinTokenInfo> {
        self.tables
            .join_tokens
            .values()
            .map(|t| t.info.clone())
            .collect()
    }

    pub(super) fn create_join_token(
        &mut self,
        id: String,
        secret_hash: String,
        ttl_secs: u64,
        max_uses: Option<u32>,
        description: Option<String>,
        at: Timestamp,
    ) -> CommandOutput {
        if let Some(existing) = self.tables.join_tokens.get(&id) {
            // A replay of the same command answers the same.
            if existing.secret_hash == secret_hash && existing.info.created_at == at {
                return Ok(Applied::JoinTokenCreated(existing.info.clone()));
            }
            return Err(StateError::conflict(format!("join token `{id}` exists")));
        }
        let info = JoinTokenInfo {
            id: id.clone(),
            created_at: at,
            expires_at: Timestamp::from_millis(
                at.as_millis().saturating_add(ttl_secs.saturating_mul(1000)),
            ),
            max_uses,
            uses: 0,
            description,
        };
        self.tables.join_tokens.insert(
            id,
            TokenRecord {
                info: info.clone(),
                secret_hash,
            },
        );
        Ok(Applied::JoinTokenCreated(info))
    }
}
