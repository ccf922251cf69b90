//! Placement policies as data: which backends may hold a stripe's shards. A policy
//! filters backends by their attributes (`country in BE,NL`) and caps how many shards
//! of one stripe may share an attribute value (`max 1 per site`), so losing a whole
//! site costs a stripe at most that many shards. A manifest carries its policy; the
//! algorithm that places shards by it lives with the store.
//!
//! The names `Constraint` and `Spread` are also job-spec types, so this module's are
//! reached through the module (`placement::Constraint`) rather than the crate root.

use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// How a constraint matches an attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// The backend has the attribute with one of the values.
    In,
    /// The backend lacks the attribute or has none of the values.
    NotIn,
}

/// A filter on backend attributes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Constraint {
    /// The attribute, e.g. `country`.
    pub attribute: String,
    /// How it matches.
    pub op: Op,
    /// The values.
    pub values: Vec<String>,
}

/// A cap on the shards of one stripe that may share an attribute value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Spread {
    /// The attribute, e.g. `site`. A backend without it cannot be used.
    pub attribute: String,
    /// Most shards of a stripe per value.
    pub max: usize,
}

/// Where a model's shards may go. The empty policy allows every backend, one shard of
/// a stripe per backend.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Every constraint must hold for a backend to be used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<Constraint>,
    /// Every cap must hold for each stripe.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spread: Vec<Spread>,
}

/// A policy rule that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid placement policy `{text}`: {reason}")]
pub struct PolicySyntaxError {
    /// The rule.
    pub text: String,
    /// What is wrong.
    pub reason: String,
}

impl Policy {
    /// Reads rules separated by `;` (each string may hold several):
    /// `ATTR in A,B`, `ATTR not in A,B`, `ATTR = A`, `max N per ATTR`.
    pub fn parse<S: AsRef<str>>(rules: &[S]) -> Result<Policy, PolicySyntaxError> {
        let mut policy = Policy::default();
        for text in rules
            .iter()
            .flat_map(|r| r.as_ref().split(';'))
            .map(str::trim)
            .filter(|r| !r.is_empty())
        {
            let bad = |reason: &str| PolicySyntaxError {
                text: text.to_owned(),
                reason: reason.to_owned(),
            };
            let words: Vec<&str> = text.split_whitespace().collect();
            let values = |list: &str| -> Result<Vec<String>, PolicySyntaxError> {
                let values: Vec<String> = list
                    .split(',')
                    .map(|v| v.trim().to_owned())
                    .filter(|v| !v.is_empty())
                    .collect();
                if values.is_empty() {
                    return Err(bad("no values"));
                }
                Ok(values)
            };
            match words.as_slice() {
                ["max", n, "per", attribute] => {
                    let max: usize = n
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| bad("the cap must be a positive integer"))?;
                    policy.spread.push(Spread {
                        attribute: (*attribute).to_owned(),
                        max,
                    });
                }
                [attribute, "in", rest @ ..] if !rest.is_empty() => {
                    policy.constraints.push(Constraint {
                        attribute: (*attribute).to_owned(),
                        op: Op::In,
                        values: values(&rest.join(""))?,
                    })
                }
                [attribute, "not", "in", rest @ ..] if !rest.is_empty() => {
                    policy.constraints.push(Constraint {
                        attribute: (*attribute).to_owned(),
                        op: Op::NotIn,
                        values: values(&rest.join(""))?,
                    })
                }
                [attribute, "=", value] => policy.constraints.push(Constraint {
                    attribute: (*attribute).to_owned(),
                    op: Op::In,
                    values: values(value)?,
                }),
                _ => {
                    return Err(bad(
                        "expected `ATTR in A,B`, `ATTR not in A,B`, `ATTR = A` or `max N per ATTR`",
                    ))
                }
            }
        }
        Ok(policy)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rules: Vec<String> = self
            .constraints
            .iter()
            .map(|c| {
                let op = match c.op {
                    Op::In => "in",
                    Op::NotIn => "not in",
                };
                format!("{} {op} {}", c.attribute, c.values.join(","))
            })
            .collect();
        rules.extend(
            self.spread
                .iter()
                .map(|s| format!("max {} per {}", s.max, s.attribute)),
        );
        if rules.is_empty() {
            return f.write_str("any backend");
        }
        f.write_str(&rules.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_print_back() {
        let p = Policy::parse(&["country in BE, NL; max 1 per site", "tier not in cold"]).unwrap();
        assert_eq!(p.constraints.len(), 2);
        assert_eq!(
            p.spread,
            vec![Spread {
                attribute: "site".into(),
                max: 1
            }]
        );
        assert_eq!(
            p.to_string(),
            "country in BE,NL; tier not in cold; max 1 per site"
        );
        assert_eq!(Policy::parse(&[p.to_string()]).unwrap(), p);
        for bad in [
            "country",
            "max 0 per site",
            "max x per site",
            "country in ,",
            "a b c",
        ] {
            assert!(
                matches!(Policy::parse(&[bad]), Err(PolicySyntaxError { .. })),
                "{bad}"
            );
        }
        assert_eq!(
            Policy::parse::<&str>(&[]).unwrap().to_string(),
            "any backend"
        );
    }
}
