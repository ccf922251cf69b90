//! Who is calling. Every control API route but the open ones (`/health`, `/ready`,
//! `/metrics`, the index and the OpenAPI document) takes its caller from a request
//! signature ([`aigrid_api::signature`]): [`Caller`] for requests without a body,
//! [`Signed`] and [`SignedOptional`] for JSON bodies, [`signed_bytes`] for raw ones.
//! An unsigned, badly signed, stale or replayed request is answered 401 before its
//! handler runs; a signed one that its signer may not make, 403 ([`Caller::require`]).
//! Either way nothing changes.
//!
//! The signature over a request's headers is checked once, at the edge ([`identify`],
//! outside the rate limit, so a signer is limited per identity wherever it connects
//! from); the extractors then tie the body to the signed digest and spend the nonce.
//!
//! The identities a server was started with (`--admin`) become the cluster's admins
//! the first time one of them calls a cluster that has none (and when this server
//! first leads): the command is idempotent, and a cluster that has an admin ignores it.

use aigrid_api::signature::{
    ParsedSignature, CONTENT_DIGEST_HEADER, SIGNATURE_HEADER, SIGNATURE_INPUT_HEADER,
};
use aigrid_api::{AuthError, ErrorCode, IdentityId, KeyRef, PublicKey};
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, OriginalUri, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, Uri};
use axum::middleware::Next;
use axum::response::Response;
use serde::de::DeserializeOwned;

use super::plumbing::{
    body_bytes, decode_json, propose, unauthorized, ApiError, ApiState, RateKey,
};
use super::replay::NonceError;
use crate::state::{Action, ClusterState, Command, Principal};

/// Who a request comes from, its signature checked.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The signer.
    pub principal: Principal,
    /// True when the signer is this server's own identity (its repair loop): a
    /// server is trusted with the whole state already, so it may do anything here.
    pub server: bool,
}

impl Caller {
    /// The identity to hold answerable in a command, checked where it applies;
    /// none for a server (trusted with the whole state) or a node.
    pub fn identity(&self) -> Option<&IdentityId> {
        match &self.principal {
            Principal::Identity(id) if !self.server => Some(id),
            _ => None,
        }
    }

    /// 403 unless the caller may do `action`. A refusal is confirmed with a
    /// linearizable read, so a role granted a moment ago on another server counts.
    pub async fn require(&self, state: &ApiState, action: Action<'_>) -> Result<(), ApiError> {
        if self.server || state.raft.read_local(|s| s.allows(&self.principal, action)) {
            return Ok(());
        }
        let who = self.principal.clone();
        let owned = OwnedAction::from(action);
        let allowed = state
            .raft
            .read(move |s| s.allows(&who, owned.as_action()))
            .await?;
        if allowed {
            Ok(())
        } else {
            Err(forbidden(&self.principal, action))
        }
    }

    /// Whether the caller may do `action`, from this server's state (for filtering
    /// what a read shows).
    pub fn may(&self, state: &ApiState, action: Action<'_>) -> bool {
        self.server || state.raft.read_local(|s| s.allows(&self.principal, action))
    }
}

/// An [`Action`] that can move into a read closure.
enum OwnedAction {
    Admin,
    ReadCluster,
    Circle(Option<String>, aigrid_api::Role),
}

impl From<Action<'_>> for OwnedAction {
    fn from(a: Action<'_>) -> Self {
        match a {
            Action::Admin => OwnedAction::Admin,
            Action::ReadCluster => OwnedAction::ReadCluster,
            Action::Circle(c, r) => OwnedAction::Circle(c.map(str::to_owned), r),
        }
    }
}

impl OwnedAction {
    fn as_action(&self) -> Action<'_> {
        match self {
            OwnedAction::Admin => Action::Admin,
            OwnedAction::ReadCluster => Action::ReadCluster,
            OwnedAction::Circle(c, r) => Action::Circle(c.as_deref(), *r),
        }
    }
}

/// 403 naming what was refused.
fn forbidden(who: &Principal, action: Action<'_>) -> ApiError {
    ApiError::new(ErrorCode::Forbidden, ClusterState::denial(who, action))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The signature headers of a request, read.
pub(crate) fn parse_signature(headers: &HeaderMap) -> Result<ParsedSignature, ApiError> {
    Ok(ParsedSignature::parse(
        header(headers, CONTENT_DIGEST_HEADER),
        header(headers, SIGNATURE_INPUT_HEADER),
        header(headers, SIGNATURE_HEADER),
    )?)
}

/// The target a signature covers: the path and query as the client sent them.
fn target(uri: &Uri) -> &str {
    uri.path_and_query().map_or(uri.path(), |p| p.as_str())
}

/// A signature [`identify`] found good over a request's headers, before its body
/// was read: the extractor then checks only the body's digest and the nonce.
#[derive(Debug, Clone)]
pub(crate) struct EdgeVerified {
    signature: Vec<u8>,
    key: PublicKey,
}

/// The public key of a signer this server already knows, without a read through Raft.
fn local_key(state: &ApiState, key: &KeyRef) -> Option<PublicKey> {
    match key {
        KeyRef::Identity(id) if state.server_key.as_ref().is_some_and(|k| k.id() == *id) => {
            state.server_key.clone()
        }
        KeyRef::Identity(id) => state
            .raft
            .read_local(|s| s.identity(id).map(|i| i.public_key.clone())),
        KeyRef::Node(node) => match state.raft.read_local(|s| s.node_key(node)) {
            Some((Some(key), false)) => Some(key.into()),
            _ => None,
        },
    }
}

/// Middleware, outside the rate limit: a request whose header signature verifies
/// under a key this server knows is counted under its signer ([`RateKey`]) and
/// marked so its handler (people's extractors and the agent routes alike) does not
/// verify it again. Anything else passes on
/// unmarked, counted under its address, and its handler answers 401.
pub(crate) async fn identify(
    State(state): State<ApiState>,
    mut req: Request,
    next: Next,
) -> Response {
    if let Ok(sig) = parse_signature(req.headers()) {
        if let Ok(key_ref) = sig.key() {
            if let Some(key) = local_key(&state, &key_ref) {
                let now = state.clock.now().as_millis() / 1000;
                let verified =
                    match sig.signed_base(req.method().as_str(), target(req.uri()), &key, now) {
                        Ok(base) => {
                            state
                                .verifier
                                .verify(key.clone(), base, sig.signature_bytes().to_vec())
                                .await
                        }
                        Err(e) => Err(e),
                    };
                if verified.is_ok() {
                    let extensions = req.extensions_mut();
                    extensions.insert(RateKey(key_ref.to_string()));
                    extensions.insert(EdgeVerified {
                        signature: sig.signature_bytes().to_vec(),
                        key,
                    });
                }
            }
        }
    }
    next.run(req).await
}

/// Checks `sig` over the request with `key` (its headers only when [`identify`]
/// already did, with this key), then spends its nonce.
pub(crate) fn check_signature(
    state: &ApiState,
    sig: &ParsedSignature,
    request: (&Method, &Uri, Option<&EdgeVerified>),
    body: &[u8],
    key: &PublicKey,
) -> Result<(), ApiError> {
    let (method, uri, edge) = request;
    let now = state.clock.now().as_millis() / 1000;
    let checked_at_edge =
        edge.is_some_and(|v| v.key == *key && v.signature == sig.signature_bytes());
    if checked_at_edge {
        sig.verify_body(body)?;
    } else {
        sig.verify(method.as_str(), target(uri), body, key, now)?;
    }
    state
        .nonces
        .accept(
            &sig.params.key_id,
            &sig.params.nonce,
            sig.params.created,
            now,
        )
        .map_err(|e| match e {
            NonceError::Replayed => ApiError::from(AuthError::Replayed),
            NonceError::Full => ApiError::new(
                ErrorCode::RateLimited,
                "too many signed requests in the replay window; retry later",
            ),
        })
}

/// The public key of a signer, looked up in this server's state and, when absent,
/// confirmed with a linearizable read (a server that lags must not refuse a key
/// added a moment ago). A configured bootstrap admin calling a cluster without
/// admins makes them admins first.
pub(crate) async fn key_of(state: &ApiState, key: &KeyRef) -> Result<PublicKey, ApiError> {
    match key {
        KeyRef::Identity(id) if state.server_key.as_ref().is_some_and(|k| k.id() == *id) => {
            Ok(state.server_key.clone().expect("checked just above"))
        }
        KeyRef::Identity(id) => {
            if let Some(info) = state.raft.read_local(|s| s.identity(id).cloned()) {
                return Ok(info.public_key);
            }
            let looked = id.clone();
            let (known, has_admin) = state
                .raft
                .read(move |s| (s.identity(&looked).cloned(), s.has_admin()))
                .await?;
            if let Some(info) = known {
                return Ok(info.public_key);
            }
            if !has_admin && state.bootstrap_admins.iter().any(|(_, k)| k.id() == *id) {
                bootstrap_admins(state).await?;
                if let Some(info) = state.raft.read_local(|s| s.identity(id).cloned()) {
                    return Ok(info.public_key);
                }
            }
            Err(unauthorized(format!(
                "identity `{id}` is not known to this cluster"
            )))
        }
        KeyRef::Node(node) => {
            let mut found = state.raft.read_local(|s| s.node_key(node));
            if !matches!(found, Some((Some(_), false))) {
                let looked = node.clone();
                found = state.raft.read(move |s| s.node_key(&looked)).await?;
            }
            match found {
                Some((Some(key), false)) => Ok(key.into()),
                Some((_, true)) => Err(ApiError::new(
                    ErrorCode::KeyRevoked,
                    format!("the key of node `{node}` was revoked"),
                )),
                Some((None, false)) | None => Err(ApiError::new(
                    ErrorCode::UnknownNode,
                    format!("node `{node}` has no registered key"),
                )),
            }
        }
    }
}

/// Proposes this server's bootstrap admins (a no-op once the cluster has an admin).
pub(crate) async fn bootstrap_admins(state: &ApiState) -> Result<(), ApiError> {
    if state.bootstrap_admins.is_empty() {
        return Ok(());
    }
    propose(
        state,
        Command::BootstrapAdmins {
            admins: state.bootstrap_admins.as_ref().clone(),
            at: state.clock.now(),
        },
    )
    .await
    .map(|_| ())
}

/// Checks a request's signature and answers who made it.
pub(crate) async fn authenticate(
    state: &ApiState,
    head: (&Method, &Uri, &HeaderMap, Option<&EdgeVerified>),
    body: &[u8],
) -> Result<Caller, ApiError> {
    let (method, uri, headers, edge) = head;
    let sig = parse_signature(headers)?;
    let key = sig.key()?;
    let public = key_of(state, &key).await?;
    check_signature(state, &sig, (method, uri, edge), body, &public)?;
    let server = state.server_key.as_ref() == Some(&public);
    Ok(Caller {
        principal: match key {
            KeyRef::Identity(id) => Principal::Identity(id),
            KeyRef::Node(node) => Principal::Node(node),
        },
        server,
    })
}

fn request_uri(parts: &Parts) -> Uri {
    parts
        .extensions
        .get::<OriginalUri>()
        .map_or_else(|| parts.uri.clone(), |o| o.0.clone())
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    /// For requests without a body: the signature covers an empty one.
    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let uri = request_uri(parts);
        let edge = parts.extensions.get::<EdgeVerified>();
        authenticate(state, (&parts.method, &uri, &parts.headers, edge), &[]).await
    }
}

/// The body of a signed request, with its signer; the body's size limits and type
/// checks are [`body_bytes`]'s.
pub(crate) async fn signed_bytes(
    state: &ApiState,
    req: Request,
) -> Result<(Caller, Bytes), ApiError> {
    let (parts, body) = req.into_parts();
    let uri = request_uri(&parts);
    let (method, headers) = (parts.method.clone(), parts.headers.clone());
    let edge = parts.extensions.get::<EdgeVerified>().cloned();
    let bytes = body_bytes(Request::from_parts(parts, body), &()).await?;
    let head = (&method, &uri, &headers, edge.as_ref());
    let caller = authenticate(state, head, &bytes).await?;
    Ok((caller, bytes))
}

/// A signed request's JSON body and its signer.
pub struct Signed<T>(pub Caller, pub T);

impl<T: DeserializeOwned> FromRequest<ApiState> for Signed<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &ApiState) -> Result<Self, ApiError> {
        let (caller, bytes) = signed_bytes(state, req).await?;
        Ok(Signed(caller, decode_json(&bytes)?))
    }
}

/// Like [`Signed`], but an empty body stands for `T::default()`.
pub struct SignedOptional<T>(pub Caller, pub T);

impl<T: DeserializeOwned + Default> FromRequest<ApiState> for SignedOptional<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &ApiState) -> Result<Self, ApiError> {
        let (caller, bytes) = signed_bytes(state, req).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(SignedOptional(caller, T::default()));
        }
        Ok(SignedOptional(caller, decode_json(&bytes)?))
    }
}
