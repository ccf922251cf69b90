//! Rules on node attributes: constraints that must hold, affinities that attract or
//! repel, spreads over an attribute's values, and the checks on them.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use crate::error::ValidationError;

/// Largest compiled size of a constraint regex, so a hostile pattern cannot make
/// every server spend memory compiling it.
pub const MAX_REGEX_BYTES: usize = 256 * 1024;
/// Highest spread weight.
pub const MAX_SPREAD_WEIGHT: u32 = 100;
/// Largest magnitude of an affinity weight; negative weights repel.
pub const MAX_AFFINITY_WEIGHT: i32 = 100;

/// A rule on a node attribute (`country in [BE, NL]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Constraint {
    /// The node attribute the rule reads.
    pub attribute: String,
    /// How the attribute is compared with `value`.
    pub op: ConstraintOp,
    /// A string, or a list of strings for `in` and `not_in`.
    pub value: ConstraintValue,
}

wire_enum!(
    /// The comparison a [`Constraint`] makes. A node lacking the attribute matches only
    /// `!=` and `not_in`.
    ConstraintOp {
        /// The attribute equals the value.
        Eq => "=",
        /// The attribute differs from the value.
        Ne => "!=",
        /// The attribute is one of the listed values.
        In => "in",
        /// The attribute is none of the listed values.
        NotIn => "not_in",
        /// The attribute matches the regular expression (unanchored, `regex` crate
        /// syntax).
        Regex => "regex",
        /// The attribute, read as a number, is at least the value.
        Ge => ">=",
        /// The attribute, read as a number, is at most the value.
        Le => "<=",
    }
);

/// The right-hand side of a [`Constraint`]: one string or a list of strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum ConstraintValue {
    /// A single value, for every op except `in` and `not_in`.
    One(String),
    /// A list of values, for `in` and `not_in`.
    Many(Vec<String>),
}

impl ConstraintValue {
    /// The value when it is a single string.
    pub fn as_single(&self) -> Option<&str> {
        match self {
            Self::One(v) => Some(v),
            Self::Many(_) => None,
        }
    }

    /// The values when given as a list.
    pub fn as_list(&self) -> Option<&[String]> {
        match self {
            Self::One(_) => None,
            Self::Many(v) => Some(v),
        }
    }
}

// Written by hand rather than `#[serde(untagged)]` so a wrong type gets a message
// naming what is accepted instead of "data did not match any variant".
impl<'de> Deserialize<'de> for ConstraintValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ConstraintValue;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ConstraintValue::One(v.to_owned()))
            }

            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(ConstraintValue::One(v))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                while let Some(v) = seq.next_element::<String>()? {
                    values.push(v);
                }
                Ok(ConstraintValue::Many(values))
            }
        }

        deserializer.deserialize_any(Visitor)
    }
}

/// A weighted preference for nodes whose attribute satisfies a rule
/// (`site = ghent`, weight 50). Positive weights attract, negative ones repel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Affinity {
    /// The node attribute the rule reads.
    pub attribute: String,
    /// How the attribute is compared with `value`, as for a [`Constraint`].
    pub op: ConstraintOp,
    /// A string, or a list of strings for `in` and `not_in`.
    pub value: ConstraintValue,
    /// -100 to 100, not 0: how strongly matching nodes are preferred (or avoided).
    #[schema(minimum = -100, maximum = 100)]
    pub weight: i32,
}

/// Spread a group's instances evenly over the values of a node attribute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Spread {
    /// The node attribute whose values instances are spread over.
    pub attribute: String,
    /// 1 to 100: how much this spread counts against other placement preferences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 100)]
    pub weight: Option<u32>,
}

impl Constraint {
    pub(super) fn validate_at(&self, path: &str) -> Result<(), ValidationError> {
        check_rule(path, &self.attribute, self.op, &self.value)
    }
}

impl Affinity {
    pub(super) fn validate_at(&self, path: &str) -> Result<(), ValidationError> {
        check_rule(path, &self.attribute, self.op, &self.value)?;
        if self.weight == 0 || self.weight.abs() > MAX_AFFINITY_WEIGHT {
            return Err(ValidationError::new(
                format!("{path}.weight"),
                format!(
                    "must be between -{MAX_AFFINITY_WEIGHT} and {MAX_AFFINITY_WEIGHT} and not 0, got {}",
                    self.weight
                ),
            ));
        }
        Ok(())
    }
}

/// Checks an attribute rule, shared by constraints and affinities.
fn check_rule(
    path: &str,
    attribute: &str,
    op: ConstraintOp,
    value: &ConstraintValue,
) -> Result<(), ValidationError> {
    if attribute.trim().is_empty() {
        return Err(ValidationError::new(
            format!("{path}.attribute"),
            "must not be empty",
        ));
    }
    let field = format!("{path}.value");
    match op {
        ConstraintOp::In | ConstraintOp::NotIn => {
            let Some(values) = value.as_list() else {
                return Err(ValidationError::new(
                    field,
                    format!("`{op}` takes a list of values, e.g. [\"a\", \"b\"]"),
                ));
            };
            if values.is_empty() {
                return Err(ValidationError::new(
                    field,
                    format!("`{op}` needs at least one value"),
                ));
            }
        }
        ConstraintOp::Eq
        | ConstraintOp::Ne
        | ConstraintOp::Regex
        | ConstraintOp::Ge
        | ConstraintOp::Le => {
            let Some(value) = value.as_single() else {
                return Err(ValidationError::new(
                    field,
                    format!("`{op}` takes a single value, not a list"),
                ));
            };
            check_single_value(&field, op, value)?;
        }
    }
    Ok(())
}

fn check_single_value(field: &str, op: ConstraintOp, value: &str) -> Result<(), ValidationError> {
    match op {
        ConstraintOp::Regex => regex::RegexBuilder::new(value)
            .size_limit(MAX_REGEX_BYTES)
            .build()
            .map(drop)
            .map_err(|e| {
                ValidationError::new(field, format!("is not a valid regular expression: {e}"))
            }),
        ConstraintOp::Ge | ConstraintOp::Le => match value.trim().parse::<f64>() {
            Ok(n) if n.is_finite() => Ok(()),
            _ => Err(ValidationError::new(
                field,
                format!("`{op}` compares numbers; `{value}` is not a number"),
            )),
        },
        ConstraintOp::Eq | ConstraintOp::Ne | ConstraintOp::In | ConstraintOp::NotIn => Ok(()),
    }
}

impl Spread {
    pub(super) fn validate_at(&self, path: &str) -> Result<(), ValidationError> {
        if self.attribute.trim().is_empty() {
            return Err(ValidationError::new(
                format!("{path}.attribute"),
                "must not be empty",
            ));
        }
        match self.weight {
            Some(w) if w == 0 || w > MAX_SPREAD_WEIGHT => Err(ValidationError::new(
                format!("{path}.weight"),
                format!("must be between 1 and {MAX_SPREAD_WEIGHT}, got {w}"),
            )),
            _ => Ok(()),
        }
    }
}
