//! Who may call `/v1`: an OpenAI client presents a circle's API key as
//! `Authorization: Bearer aigrid-key....`, and sees and calls only the models that
//! jobs of that circle deploy. A server listening beyond loopback requires a key;
//! on loopback a request without one (or with something that is not an aigrid key,
//! as OpenAI's clients always send one) sees every model; an aigrid key that is
//! unknown or revoked is refused everywhere.

use std::collections::{HashMap, HashSet};

use aigrid_api::ApiKey;
use axum::http::{header, HeaderMap};

use super::error::GatewayError;

/// What a request may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Every model: no key, on a loopback-only server.
    All,
    /// The models a circle's jobs deploy.
    Circle(String),
}

impl Scope {
    /// Whether a model deployed by jobs of `circles` is visible.
    pub(crate) fn sees(&self, circles: Option<&HashSet<Option<String>>>) -> bool {
        match self {
            Scope::All => true,
            Scope::Circle(c) => circles.is_some_and(|set| set.contains(&Some(c.clone()))),
        }
    }
}

/// Per model digest, the circles of the live jobs that deploy it (`None` for jobs
/// without a circle).
pub(crate) type DeployedBy = HashMap<String, HashSet<Option<String>>>;

/// The scope of a request: from its API key (checked against the hashes the state
/// keeps), or everything when no key is given and none is required.
pub(crate) fn scope(
    headers: &HeaderMap,
    required: bool,
    lookup: impl FnOnce(&ApiKey) -> Option<String>,
) -> Result<Scope, GatewayError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return if required {
            Err(GatewayError::MissingApiKey)
        } else {
            Ok(Scope::All)
        };
    };
    let key: Option<ApiKey> = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|v| v.trim().parse().ok());
    let Some(key) = key else {
        // OpenAI's clients always send some key; where none is required, one that
        // is not an aigrid key is no key at all.
        return if required {
            Err(GatewayError::InvalidApiKey)
        } else {
            Ok(Scope::All)
        };
    };
    lookup(&key)
        .map(Scope::Circle)
        .ok_or(GatewayError::InvalidApiKey)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_scope_requests_to_their_circle() {
        let key = ApiKey::from_random([1; 8], [2; 32]);
        let mut headers = HeaderMap::new();
        assert_eq!(scope(&headers, false, |_| None), Ok(Scope::All));
        assert_eq!(
            scope(&headers, true, |_| None),
            Err(GatewayError::MissingApiKey)
        );
        headers.insert(
            header::AUTHORIZATION,
            format!("Bearer {key}").parse().unwrap(),
        );
        let found = scope(&headers, true, |k| (k == &key).then(|| "lab".to_owned())).unwrap();
        assert_eq!(found, Scope::Circle("lab".into()));
        assert_eq!(
            scope(&headers, false, |_| None),
            Err(GatewayError::InvalidApiKey)
        );
        headers.insert(header::AUTHORIZATION, "Bearer sk-nonsense".parse().unwrap());
        assert_eq!(
            scope(&headers, true, |_| None),
            Err(GatewayError::InvalidApiKey)
        );
        assert_eq!(scope(&headers, false, |_| None), Ok(Scope::All));
        let lab: HashSet<Option<String>> = [Some("lab".to_owned()), None].into();
        assert!(found.sees(Some(&lab)));
        assert!(!Scope::Circle("other".into()).sees(Some(&lab)));
        assert!(!found.sees(None));
        assert!(Scope::All.sees(None));
    }
}
