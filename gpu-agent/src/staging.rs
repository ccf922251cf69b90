//! Models staged for fleet rollouts. The control plane names, in a node's
//! assignments, the models its rollouts' waves ask it to stage; the agent has a
//! [`ModelStager`] fetch every chunk and check it against the signed manifest
//! into the node's cache, activate the model (the version before it kept for an
//! instant revert), and then reports it active in its heartbeats with an
//! attestation: the digest, signed with the node key. A staging that fails is
//! reported with its reason. Nothing here listens: the work arrives in the
//! assignments the agent polls for.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use aigrid_api::rollout::attestation_message;
use aigrid_api::{ModelAssignment, ModelReport, NodeStageState};
use parking_lot::Mutex;

use crate::identity::Identity;

/// What staging one model comes to.
pub type Staged = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Fetches, checks and activates models on this node.
pub trait ModelStager: Send + Sync + 'static {
    /// Fetches every chunk of the assignment's model from its peers and its share
    /// from the store the servers at `servers` describe, checks each against the
    /// signed manifest, keeps them in the node's cache, and makes the model the
    /// node's active version of its name, the one before kept beside it.
    fn stage(&self, servers: String, model: ModelAssignment) -> Staged;
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    Staging,
    Active,
    Failed(String),
}

#[derive(Debug)]
struct Entry {
    digest: String,
    status: Status,
}

/// The models this node was asked to stage, by rollout.
pub struct Staging {
    stager: Option<Arc<dyn ModelStager>>,
    entries: Arc<Mutex<HashMap<String, Entry>>>,
    /// Bumped whenever a staging ends, so the agent reports it at once.
    ended: Arc<tokio::sync::watch::Sender<u64>>,
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staging")
            .field("stager", &self.stager.is_some())
            .field("entries", &self.entries.lock().len())
            .finish()
    }
}

impl Staging {
    /// Staging through `stager`; without one, every model asked for fails with
    /// the reason.
    pub fn new(stager: Option<Arc<dyn ModelStager>>) -> Self {
        Staging {
            stager,
            entries: Arc::new(Mutex::new(HashMap::new())),
            ended: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    /// Changes whenever a staging ends.
    pub fn ended(&self) -> tokio::sync::watch::Receiver<u64> {
        self.ended.subscribe()
    }

    /// Starts staging what `models` asks for and this node has not started, and
    /// forgets the rollouts no longer asked for.
    pub fn apply(&self, servers: &str, models: &[ModelAssignment]) {
        let mut entries = self.entries.lock();
        entries.retain(|rollout, _| models.iter().any(|m| m.rollout == *rollout));
        for model in models {
            if entries.contains_key(&model.rollout) {
                continue;
            }
            let Some(stager) = self.stager.clone() else {
                entries.insert(
                    model.rollout.clone(),
                    Entry {
                        digest: model.digest.clone(),
                        status: Status::Failed(
                            "this agent has no model store to stage from".to_owned(),
                        ),
                    },
                );
                continue;
            };
            entries.insert(
                model.rollout.clone(),
                Entry {
                    digest: model.digest.clone(),
                    status: Status::Staging,
                },
            );
            let table = self.entries.clone();
            let ended = self.ended.clone();
            let (rollout, digest) = (model.rollout.clone(), model.digest.clone());
            let staged = stager.stage(servers.to_owned(), model.clone());
            tokio::spawn(async move {
                let result = staged.await;
                if let Err(e) = &result {
                    tracing::warn!(%rollout, model = %digest, error = %e, "staging a model failed");
                }
                if let Some(entry) = table.lock().get_mut(&rollout) {
                    entry.status = match result {
                        Ok(()) => Status::Active,
                        Err(e) => Status::Failed(e),
                    };
                }
                ended.send_modify(|n| *n += 1);
            });
        }
    }

    /// What to report: every model staged (with its attestation, signed by
    /// `identity`) or failed, for the rollouts still asking.
    pub fn reports(&self, identity: &Identity) -> Vec<ModelReport> {
        let entries = self.entries.lock();
        let mut reports: Vec<ModelReport> = entries
            .iter()
            .filter_map(|(rollout, entry)| {
                let (state, reason, signature) = match &entry.status {
                    Status::Staging => return None,
                    Status::Active => {
                        let message =
                            attestation_message(rollout, &identity.node_id, &entry.digest);
                        let signature = hex_encode(&identity.key.sign_bytes(&message));
                        (NodeStageState::Active, None, Some(signature))
                    }
                    Status::Failed(reason) => (NodeStageState::Failed, Some(reason.clone()), None),
                };
                Some(ModelReport {
                    rollout: rollout.clone(),
                    digest: entry.digest.clone(),
                    state,
                    reason: reason.map(|r| r.chars().take(1000).collect()),
                    signature,
                })
            })
            .collect();
        reports.sort_by(|a, b| a.rollout.cmp(&b.rollout));
        reports.truncate(aigrid_api::node::MAX_HEARTBEAT_LOGS);
        reports
    }
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use aigrid_api::NodeId;

    struct Instant;
    impl ModelStager for Instant {
        fn stage(&self, _: String, model: ModelAssignment) -> Staged {
            Box::pin(async move {
                if model.digest.starts_with('b') {
                    Err("chunk 3 does not match the manifest".to_owned())
                } else {
                    Ok(())
                }
            })
        }
    }

    fn asked(rollout: &str, digest: &str) -> ModelAssignment {
        ModelAssignment {
            rollout: rollout.into(),
            digest: digest.into(),
            name: "m".into(),
            peers: Vec::new(),
            origin_share: None,
        }
    }

    #[tokio::test]
    async fn staged_models_are_attested_with_the_node_key_and_failures_say_why() {
        let identity = Identity::new(NodeId::new("n1"), [7; 32]);
        let staging = Staging::new(Some(Arc::new(Instant)));
        let models = [asked("r1", &"a".repeat(64)), asked("r2", &"b".repeat(64))];
        staging.apply("http://s", &models);
        for _ in 0..100 {
            if staging.reports(&identity).len() == 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
        let reports = staging.reports(&identity);
        assert_eq!(reports.len(), 2, "{reports:?}");
        assert_eq!(reports[0].state, NodeStageState::Active);
        let signature: Vec<u8> = (0..reports[0].signature.as_ref().unwrap().len())
            .step_by(2)
            .map(|i| {
                u8::from_str_radix(&reports[0].signature.as_ref().unwrap()[i..i + 2], 16).unwrap()
            })
            .collect();
        let message = attestation_message("r1", &identity.node_id, &"a".repeat(64));
        assert!(identity.key.public().verify_bytes(&message, &signature));
        assert_eq!(reports[1].state, NodeStageState::Failed);
        assert!(reports[1].reason.as_deref().unwrap().contains("chunk 3"));
        // A rollout no longer asking is forgotten.
        staging.apply("http://s", &models[..1]);
        assert_eq!(staging.reports(&identity).len(), 1);

        // Without a stager, the node says why it cannot.
        let none = Staging::new(None);
        none.apply("http://s", &models[..1]);
        let reports = none.reports(&identity);
        assert!(reports[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("no model store"));
    }
}
