//! The routing table: every registered model by name, digest or digest prefix, the
//! endpoints of its replicas, and the models being deployed.

use std::collections::{HashMap, HashSet};

use super::error::GatewayError;

/// Shortest digest prefix a request may name a model by.
pub const MIN_DIGEST_PREFIX: usize = 6;
use crate::state::models::ModelName;

/// The inference routes, as metrics label them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    Models,
    Completions,
    ChatCompletions,
    Embeddings,
    Other,
}

impl Route {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Route::Models => "models",
            Route::Completions => "completions",
            Route::ChatCompletions => "chat_completions",
            Route::Embeddings => "embeddings",
            Route::Other => "other",
        }
    }

    /// The path a replica serves this route at.
    pub(crate) fn path(self) -> &'static str {
        match self {
            Route::Models => "/v1/models",
            Route::Completions => "/v1/completions",
            Route::ChatCompletions => "/v1/chat/completions",
            Route::Embeddings => "/v1/embeddings",
            Route::Other => "/v1",
        }
    }
}

/// What the gateway routes by, rebuilt from the applied state when it moves.
#[derive(Debug, Default)]
pub(crate) struct Routes {
    /// The applied index it was built at; `None` before the first build.
    pub(crate) applied: Option<u64>,
    /// Every registered model, newest first (ties by digest).
    pub(crate) models: Vec<ModelName>,
    /// Per model digest, the endpoints of its replicas, sorted and distinct.
    pub(crate) replicas: HashMap<String, Vec<String>>,
    /// The digests live jobs deploy, whether or not a replica runs yet.
    pub(crate) deployed: HashSet<String>,
    /// Per digest, the circles of the jobs that deploy it: who may call it.
    pub(crate) deployed_by: super::keys::DeployedBy,
    /// Per model name, how requests by that name split while a rollout's canaries
    /// wait.
    pub(crate) splits: HashMap<String, Split>,
    /// Per digest, the scaled groups serving it: a request for it with no ready
    /// replica waits for one.
    pub(crate) elastic: HashMap<String, Vec<Elastic>>,
}

/// A scaled group serving a model: a request for the model with no ready replica
/// waits for one, and wakes the group when it is at zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Elastic {
    pub(crate) job_id: aigrid_api::JobId,
    pub(crate) group: String,
    pub(crate) count: u32,
    pub(crate) min: u32,
}

/// How requests naming one model split between a rollout's canaries and the
/// instances they would replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Split {
    pub(crate) canary: Vec<String>,
    pub(crate) stable: Vec<String>,
    pub(crate) percent: u8,
}

/// How a request's `model` resolved.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Resolution<'a> {
    Found(&'a ModelName),
    Unknown,
    Ambiguous(usize),
}

impl Routes {
    pub(crate) fn build(
        applied: u64,
        mut models: Vec<ModelName>,
        servers: Vec<(&str, String)>,
        deployed: HashSet<String>,
    ) -> Self {
        models.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| a.digest.cmp(&b.digest))
        });
        let mut replicas: HashMap<String, Vec<String>> = HashMap::new();
        for (digest, endpoint) in servers {
            replicas
                .entry(digest.to_ascii_lowercase())
                .or_default()
                .push(endpoint);
        }
        for endpoints in replicas.values_mut() {
            endpoints.sort();
            endpoints.dedup();
        }
        Routes {
            applied: Some(applied),
            models,
            replicas,
            deployed,
            deployed_by: Default::default(),
            splits: HashMap::new(),
            elastic: HashMap::new(),
        }
    }

    /// Adds the rollouts' splits, each under the name of its canaries' model.
    pub(crate) fn with_splits(mut self, splits: Vec<crate::state::TrafficSplit>) -> Self {
        for split in splits {
            let Some(model) = self.models.iter().find(|m| m.digest == split.digest) else {
                continue;
            };
            self.splits.insert(
                model.name.clone(),
                Split {
                    canary: split.canary,
                    stable: split.stable,
                    percent: split.percent,
                },
            );
        }
        self
    }

    /// Whether a request of `scope` may see the model of `digest`.
    pub(crate) fn visible(&self, scope: &super::keys::Scope, digest: &str) -> bool {
        scope.sees(self.deployed_by.get(digest))
    }

    pub(crate) fn replicas(&self, digest: &str) -> &[String] {
        self.replicas.get(digest).map_or(&[], Vec::as_slice)
    }

    /// Why `model` cannot take a request now, `unreachable` of its replicas having
    /// been tried in vain.
    pub(crate) fn not_ready(&self, model: &ModelName, unreachable: usize) -> GatewayError {
        GatewayError::NotReady {
            model: model.name.clone(),
            replicas: self.replicas(&model.digest).len(),
            unreachable,
            deploying: self.deployed.contains(&model.digest),
        }
    }

    /// Resolves a request's `model`: a name (the newest model of that name that has
    /// a replica, else the newest of that name), a full digest, or a digest prefix of
    /// at least [`MIN_DIGEST_PREFIX`] hex characters that only one model has.
    pub(crate) fn resolve(&self, asked: &str) -> Resolution<'_> {
        let mut named = self.models.iter().filter(|m| m.name == asked).peekable();
        if named.peek().is_some() {
            let named: Vec<&ModelName> = named.collect();
            let served = named.iter().find(|m| !self.replicas(&m.digest).is_empty());
            return Resolution::Found(served.unwrap_or(&named[0]));
        }
        let lower = asked.to_ascii_lowercase();
        if lower.len() < MIN_DIGEST_PREFIX || !lower.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Resolution::Unknown;
        }
        let mut matching = self.models.iter().filter(|m| m.digest.starts_with(&lower));
        match (matching.next(), matching.count()) {
            (None, _) => Resolution::Unknown,
            (Some(m), 0) => Resolution::Found(m),
            (Some(_), more) => Resolution::Ambiguous(more + 1),
        }
    }
}
