//! A service group's `scaling` block: how its instance count follows the load the
//! gateway and its replicas measure, between `min` and `max`, and when it may go
//! to zero.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::update::Span;
use super::MAX_GROUP_COUNT;
use crate::error::ValidationError;

/// Longest window a decision may look back over, and longest idle time before a
/// group goes to zero: the leader keeps a window's recommendations in memory.
pub const MAX_SCALING_WINDOW: Span = Span::from_secs(3600);

/// How a service group's instance count follows its load. The leader recommends
/// `ceil(load / target)` replicas (the larger of the two targets' answers when
/// both are set) and commits a change only when the window agrees:
///
/// - up, to the smallest recommendation of the last `scale_up_window`, so a spike
///   shorter than the window adds nothing;
/// - down, to the largest recommendation of the last `scale_down_window`, so the
///   count falls only once the load stayed low for the whole window;
/// - to zero (`min` 0), once no request arrived for `idle_to_zero`; until then
///   at least one replica stays.
///
/// With this block the group's `count` is where it starts; the leader moves it
/// from there, and a resubmitted spec keeps the count the leader reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Scaling {
    /// Fewest instances; 0 lets the group go to zero when idle.
    #[serde(default)]
    pub min: u32,
    /// Most instances.
    #[schema(minimum = 1)]
    pub max: u32,
    /// Requests in flight one replica should carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub target_concurrency: Option<u32>,
    /// Generated tokens per second one replica should produce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub target_tokens_per_second: Option<u32>,
    /// How long more replicas must be wanted before they are added.
    #[serde(default = "default_up_window")]
    #[schema(value_type = String, example = "10s")]
    pub scale_up_window: Span,
    /// How long fewer replicas must be enough before replicas are removed.
    #[serde(default = "default_down_window")]
    #[schema(value_type = String, example = "60s")]
    pub scale_down_window: Span,
    /// With `min` 0: how long without a request before the last replica goes;
    /// absent, the scale-down window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "120s")]
    pub idle_to_zero: Option<Span>,
}

fn default_up_window() -> Span {
    Span::from_secs(10)
}

fn default_down_window() -> Span {
    Span::from_secs(60)
}

impl Scaling {
    /// `count` kept within `min..=max`.
    pub fn clamp(&self, count: u32) -> u32 {
        count.clamp(self.min, self.max)
    }

    /// How long without a request before the group goes to zero; `None` when
    /// `min` keeps replicas.
    pub fn idle_limit(&self) -> Option<Span> {
        (self.min == 0).then(|| self.idle_to_zero.unwrap_or(self.scale_down_window))
    }

    /// The targets in words, as status lines show them (`8 requests in flight`).
    pub fn targets(&self) -> String {
        let mut parts = Vec::new();
        if let Some(c) = self.target_concurrency {
            parts.push(format!("{c} requests in flight"));
        }
        if let Some(t) = self.target_tokens_per_second {
            parts.push(format!("{t} tokens/s"));
        }
        parts.join(" or ")
    }

    pub(super) fn validate_at(&self, path: &str) -> Result<(), ValidationError> {
        let fail = |field: &str, message: String| {
            Err(ValidationError::new(format!("{path}.{field}"), message))
        };
        if self.max == 0 || self.max > MAX_GROUP_COUNT {
            return fail(
                "max",
                format!("must be between 1 and {MAX_GROUP_COUNT}, got {}", self.max),
            );
        }
        if self.min > self.max {
            return fail(
                "min",
                format!("must be at most max ({}), got {}", self.max, self.min),
            );
        }
        if self.target_concurrency.is_none() && self.target_tokens_per_second.is_none() {
            return fail(
                "target_concurrency",
                "a scaling block needs a target: `target_concurrency` or \
                 `target_tokens_per_second`"
                    .into(),
            );
        }
        for (field, target) in [
            ("target_concurrency", self.target_concurrency),
            ("target_tokens_per_second", self.target_tokens_per_second),
        ] {
            if target == Some(0) {
                return fail(field, "must be at least 1".into());
            }
        }
        let spans = [
            ("scale_up_window", Some(self.scale_up_window)),
            ("scale_down_window", Some(self.scale_down_window)),
            ("idle_to_zero", self.idle_to_zero),
        ];
        for (field, span) in spans {
            if span.is_some_and(|s| s > MAX_SCALING_WINDOW) {
                return fail(field, format!("must be at most {MAX_SCALING_WINDOW}"));
            }
        }
        if self.idle_to_zero.is_some() && self.min > 0 {
            return fail(
                "idle_to_zero",
                format!(
                    "goes to zero, which min {} forbids; set `min = 0` or remove it",
                    self.min
                ),
            );
        }
        if self.idle_to_zero == Some(Span::from_millis(0)) {
            return fail("idle_to_zero", "must be positive".into());
        }
        Ok(())
    }
}

/// One change of a scaled group's count, as `job status` lists them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ScaleEvent {
    /// When it was committed.
    pub at: crate::units::Timestamp,
    /// The group.
    pub group: String,
    /// The count before.
    pub from: u32,
    /// The count after.
    pub to: u32,
    /// Why, in words (`average 19.5 requests in flight over 10s, 8 per replica`).
    pub reason: String,
}
