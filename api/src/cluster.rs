//! The control plane's own membership and Raft progress, as `GET /api/v1/cluster`
//! reports it and `aigrid cluster` prints it. Server ids are Raft ids: non-zero.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ValidationError;

wire_enum!(
    /// Whether a server votes.
    MemberRole {
        /// Votes and counts toward quorum.
        Voter => "voter",
        /// Receives the log but does not vote (catching up before promotion).
        Learner => "learner",
    }
);

/// Raft status seen from the answering server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClusterStatus {
    /// The answering server's id.
    pub id: u64,
    /// The leader this server knows of, or `null` during an election.
    pub leader: Option<u64>,
    /// The current Raft term.
    pub term: u64,
    /// Highest log index known to be committed.
    pub commit_index: u64,
    /// Highest log index applied to this server's state.
    pub applied_index: u64,
    /// Every configured server.
    pub members: Vec<Member>,
}

/// One control-plane server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Member {
    /// Its Raft id.
    pub id: u64,
    /// Where its peers reach it (`127.0.0.1:7701`).
    pub addr: String,
    /// Whether it votes.
    pub role: MemberRole,
    /// True for the leader this server knows of.
    pub is_leader: bool,
}

/// Asks the cluster to add a server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The new server's Raft id; non-zero and not in use.
    pub id: u64,
    /// Where its peers reach it, as `host:port`.
    pub addr: String,
}

impl JoinRequest {
    /// Checks the id and that the address carries a port.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_server_id(self.id)?;
        let port = self
            .addr
            .rsplit_once(':')
            .filter(|(host, _)| !host.trim().is_empty())
            .and_then(|(_, port)| port.parse::<u16>().ok());
        match port {
            Some(p) if p != 0 => Ok(()),
            _ => Err(ValidationError::new(
                "addr",
                format!(
                    "must be host:port with a non-zero port, got `{}`",
                    self.addr
                ),
            )),
        }
    }
}

/// Asks the cluster to remove a server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaveRequest {
    /// The leaving server's Raft id.
    pub id: u64,
}

impl LeaveRequest {
    /// Checks the id.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_server_id(self.id)
    }
}

fn check_server_id(id: u64) -> Result<(), ValidationError> {
    if id == 0 {
        Err(ValidationError::new(
            "id",
            "must be non-zero (0 means no server in Raft)",
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_has_the_documented_shape() {
        let status = ClusterStatus {
            id: 1,
            leader: Some(2),
            term: 3,
            commit_index: 10,
            applied_index: 9,
            members: vec![Member {
                id: 2,
                addr: "127.0.0.1:7702".into(),
                role: MemberRole::Voter,
                is_leader: true,
            }],
        };
        let v = serde_json::to_value(&status).unwrap();
        assert_eq!(v["leader"], json!(2));
        assert_eq!(v["members"][0]["role"], json!("voter"));
        let none = ClusterStatus {
            leader: None,
            ..status
        };
        assert_eq!(serde_json::to_value(&none).unwrap()["leader"], json!(null));
    }

    #[test]
    fn join_and_leave_requests_are_checked() {
        let ok = JoinRequest {
            id: 4,
            addr: "10.0.0.4:7704".into(),
        };
        ok.validate().unwrap();
        for addr in ["10.0.0.4", ":7704", "10.0.0.4:0", "10.0.0.4:port"] {
            let bad = JoinRequest {
                id: 4,
                addr: addr.into(),
            };
            assert_eq!(bad.validate().unwrap_err().field, "addr", "{addr}");
        }
        assert_eq!(
            JoinRequest {
                id: 0,
                addr: "h:1".into()
            }
            .validate()
            .unwrap_err()
            .field,
            "id"
        );
        assert!(LeaveRequest { id: 0 }.validate().is_err());
        assert!(serde_json::from_value::<LeaveRequest>(json!({"id": 1, "x": 2})).is_err());
    }
}

/// What `GET /health` answers: the process serves HTTP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// What `GET /ready` answers when this server can serve: its replica runs, knows a
/// leader and has applied what it knows is committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    /// Always `ready`.
    pub status: String,
    /// The leader's server id.
    pub leader: Option<u64>,
}
