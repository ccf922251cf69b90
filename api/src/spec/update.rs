//! A group's `update` block: how a new version of a service replaces the running
//! one (Nomad's `update` block, Kubernetes' progress deadline, Argo Rollouts'
//! canary weight and analysis).

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::ToSchema;

use crate::error::ValidationError;

/// A span of time written as people write it (`500ms`, `5s`, `5m`, `1h30m`), kept
/// in whole milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Span(u64);

impl Span {
    /// The span of `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Span(ms)
    }

    /// The span of `secs` seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Span(secs.saturating_mul(1000))
    }

    /// Its length in milliseconds.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// Its length.
    pub const fn duration(self) -> Duration {
        Duration::from_millis(self.0)
    }
}

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 == 0 {
            return f.write_str("0s");
        }
        write!(f, "{}", humantime::format_duration(self.duration()))
    }
}

impl std::str::FromStr for Span {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let trimmed = text.trim();
        if trimmed == "0" {
            return Ok(Span(0));
        }
        let parsed = humantime::parse_duration(trimmed)
            .map_err(|e| format!("`{text}` is not a span of time like `5s` or `5m` ({e})"))?;
        u64::try_from(parsed.as_millis())
            .map(Span)
            .map_err(|_| format!("`{text}` is too long"))
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A ratio between 0 and 1, kept in parts per million so specs compare exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Ratio(u32);

impl Ratio {
    /// The ratio as a fraction.
    pub fn get(self) -> f64 {
        f64::from(self.0) / 1e6
    }

    /// `fraction`, which must lie in `0..=1`.
    pub fn new(fraction: f64) -> Option<Self> {
        if !(0.0..=1.0).contains(&fraction) {
            return None;
        }
        // Within 0..=1e6 by the check above.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Some(Ratio((fraction * 1e6).round() as u32))
    }
}

impl Serialize for Ratio {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.get())
    }
}

impl<'de> Deserialize<'de> for Ratio {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let fraction = f64::deserialize(deserializer)?;
        Ratio::new(fraction).ok_or_else(|| {
            serde::de::Error::custom(format!("a ratio lies between 0 and 1, got {fraction}"))
        })
    }
}

/// How a new version of a service group replaces the running one. A group with
/// this block rolls out under a deployment: canaries first (beside the running
/// instances, taking `canary_weight` of the traffic by name), then `max_parallel`
/// instances at a time, each batch healthy for `min_healthy_time` before the next;
/// an instance not healthy within `healthy_deadline`, or no instance turning
/// healthy for `progress_deadline`, fails the deployment, and `auto_revert` then
/// runs the last version that deployed successfully.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdatePolicy {
    /// Instances replaced at once, each batch waiting for the previous to be healthy.
    #[serde(default = "one")]
    #[schema(default = 1, minimum = 1)]
    pub max_parallel: u32,
    /// New-version instances started beside the running ones before any is
    /// replaced; the rollout then waits for promotion. At most the group's count.
    #[serde(default)]
    pub canary: u32,
    /// How long an instance must run (and, for a model server, answer ready)
    /// before it counts as healthy.
    #[serde(default = "default_min_healthy")]
    #[schema(value_type = String, example = "10s")]
    pub min_healthy_time: Span,
    /// How long after it is placed an instance may take to turn healthy.
    #[serde(default = "default_healthy_deadline")]
    #[schema(value_type = String, example = "5m")]
    pub healthy_deadline: Span,
    /// How long the rollout may go without an instance turning healthy; `0`
    /// waits for ever.
    #[serde(default = "default_progress_deadline")]
    #[schema(value_type = String, example = "10m")]
    pub progress_deadline: Span,
    /// Run the last successfully deployed version again when the rollout fails.
    #[serde(default)]
    pub auto_revert: bool,
    /// Promote once every canary is healthy, without waiting for anyone.
    #[serde(default)]
    pub auto_promote: bool,
    /// Percent of the requests naming the model that go to the canaries while they
    /// wait for promotion; absent, the canaries' share of all instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 100)]
    pub canary_weight: Option<u8>,
    /// Checks on the gateway's own measurements of the canaries that fail them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checks: Option<CanaryChecks>,
}

/// Limits on what the gateway measured of a canary's requests over a window; a
/// canary past one is unhealthy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CanaryChecks {
    /// The window measured, ending now.
    #[serde(default = "default_window")]
    #[schema(value_type = String, example = "60s")]
    pub window: Span,
    /// Largest share of requests answered with a server error (5xx) or not at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<f64>, minimum = 0, maximum = 1)]
    pub max_error_ratio: Option<Ratio>,
    /// Largest 99th-percentile time to the answer's first byte.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "2s")]
    pub max_p99: Option<Span>,
    /// Requests the window must hold before the checks judge.
    #[serde(default = "default_min_requests")]
    #[schema(default = 20)]
    pub min_requests: u32,
}

fn one() -> u32 {
    1
}
fn default_min_healthy() -> Span {
    Span::from_secs(10)
}
fn default_healthy_deadline() -> Span {
    Span::from_secs(300)
}
fn default_progress_deadline() -> Span {
    Span::from_secs(600)
}
fn default_window() -> Span {
    Span::from_secs(60)
}
fn default_min_requests() -> u32 {
    20
}

impl UpdatePolicy {
    /// Checks the rules serde cannot express for a group of `count` instances.
    pub(super) fn validate_at(&self, path: &str, count: u32) -> Result<(), ValidationError> {
        let fail = |field: &str, message: String| {
            Err(ValidationError::new(format!("{path}.{field}"), message))
        };
        if self.max_parallel == 0 {
            return fail("max_parallel", "must be at least 1".into());
        }
        if self.canary > count {
            return fail(
                "canary",
                format!(
                    "must be at most the group's count ({count}), got {}",
                    self.canary
                ),
            );
        }
        if self.healthy_deadline <= self.min_healthy_time {
            return fail(
                "healthy_deadline",
                format!(
                    "must be longer than min_healthy_time ({}), got {}",
                    self.min_healthy_time, self.healthy_deadline
                ),
            );
        }
        if self.progress_deadline.as_millis() != 0 && self.progress_deadline < self.healthy_deadline
        {
            return fail(
                "progress_deadline",
                format!(
                    "must be 0 (none) or at least healthy_deadline ({}), got {}",
                    self.healthy_deadline, self.progress_deadline
                ),
            );
        }
        if let Some(weight) = self.canary_weight {
            if self.canary == 0 {
                return fail("canary_weight", "needs `canary` of at least 1".into());
            }
            if !(1..=100).contains(&weight) {
                return fail(
                    "canary_weight",
                    format!("must be between 1 and 100, got {weight}"),
                );
            }
        }
        if let Some(checks) = &self.checks {
            if self.canary == 0 {
                return fail(
                    "checks",
                    "judge canaries: needs `canary` of at least 1".into(),
                );
            }
            if checks.window.as_millis() < 1000 {
                return fail("checks.window", "must be at least 1s".into());
            }
            if checks.window >= self.healthy_deadline {
                return fail(
                    "checks.window",
                    format!(
                        "must be shorter than healthy_deadline ({}): a canary is judged over \
                         the window before its deadline",
                        self.healthy_deadline
                    ),
                );
            }
            if checks.max_error_ratio.is_none() && checks.max_p99.is_none() {
                return fail("checks", "set `max_error_ratio`, `max_p99` or both".into());
            }
        }
        Ok(())
    }

    /// The canaries' share of the requests by name while they wait, in percent.
    pub fn canary_percent(&self, count: u32) -> u8 {
        self.canary_weight.unwrap_or_else(|| {
            let total = u64::from(count) + u64::from(self.canary);
            let share = (u64::from(self.canary) * 100).div_ceil(total.max(1));
            u8::try_from(share.clamp(1, 100)).unwrap_or(100)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_as_people_write_them_and_print_back() {
        for (text, ms) in [
            ("500ms", 500),
            ("5s", 5000),
            ("5m", 300_000),
            ("1h 30m", 5_400_000),
            ("0", 0),
        ] {
            let span: Span = text.parse().unwrap();
            assert_eq!(span.as_millis(), ms, "{text}");
            let again: Span = span.to_string().parse().unwrap();
            assert_eq!(again, span);
        }
        assert!("five seconds".parse::<Span>().is_err());
        assert!("-5s".parse::<Span>().is_err());
    }

    #[test]
    fn ratios_outside_zero_to_one_are_refused() {
        assert!(serde_json::from_str::<Ratio>("0.05").is_ok());
        assert!(serde_json::from_str::<Ratio>("1.5").is_err());
        assert!(serde_json::from_str::<Ratio>("-0.1").is_err());
    }

    #[test]
    fn the_canary_share_defaults_to_their_share_of_instances() {
        let policy: UpdatePolicy = serde_json::from_str(r#"{"canary": 1}"#).unwrap();
        assert_eq!(policy.canary_percent(3), 25);
        let weighted: UpdatePolicy =
            serde_json::from_str(r#"{"canary": 1, "canary_weight": 10}"#).unwrap();
        assert_eq!(weighted.canary_percent(3), 10);
    }
}
