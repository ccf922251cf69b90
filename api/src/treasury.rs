//! Circles' treasuries as the control API shows them: balances in credits (the
//! grid's internal unit), the prices a farmer sets for what a node offers, the
//! double-entry ledger that moves credits, and the requests that deposit and
//! transfer them.
//!
//! Every amount is an exact count of micro-credits ([`Credits`]); on the wire it is
//! a decimal string (`"12.5"`) so no float ever rounds a balance.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::ToSchema;

use crate::{IdentityId, Timestamp, ValidationError};

/// Micro-credits in one credit.
pub const MICRO: i64 = 1_000_000;
/// The largest amount one deposit, transfer or price may name: a trillion credits.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000 * MICRO;

/// An amount of credits, exact to the micro-credit; negative for a debt (a circle
/// that used more than it held) and for the outside world's account.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, ToSchema)]
#[schema(value_type = String, example = "12.5")]
pub struct Credits(i64);

impl Credits {
    /// Zero credits.
    pub const ZERO: Credits = Credits(0);

    /// `micro` micro-credits.
    pub const fn from_micro(micro: i64) -> Credits {
        Credits(micro)
    }

    /// The amount in micro-credits.
    pub const fn micro(self) -> i64 {
        self.0
    }

    /// The sum, saturating (balances stay far below the bounds).
    pub fn plus(self, other: Credits) -> Credits {
        Credits(self.0.saturating_add(other.0))
    }

    /// The difference, saturating.
    pub fn minus(self, other: Credits) -> Credits {
        Credits(self.0.saturating_sub(other.0))
    }

    /// Whether the amount is above zero.
    pub fn is_positive(self) -> bool {
        self.0 > 0
    }

    /// Checks an amount someone asks to move or charge: above zero (or zero, when
    /// `zero_ok`) and at most [`MAX_AMOUNT`].
    pub fn check(self, field: &str, zero_ok: bool) -> Result<(), ValidationError> {
        if self.0 < 0 || (self.0 == 0 && !zero_ok) || self.0 > MAX_AMOUNT {
            let low = if zero_ok { "0" } else { "above 0" };
            return Err(ValidationError::new(
                field,
                format!("{low} and at most {} credits", MAX_AMOUNT / MICRO),
            ));
        }
        Ok(())
    }
}

impl fmt::Display for Credits {
    /// `12.5`, `-0.000001`, `3`: the shortest exact decimal.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let (whole, frac) = (abs / MICRO as u64, abs % MICRO as u64);
        if frac == 0 {
            return write!(f, "{sign}{whole}");
        }
        let digits = format!("{frac:06}");
        write!(f, "{sign}{whole}.{}", digits.trim_end_matches('0'))
    }
}

impl std::str::FromStr for Credits {
    type Err = String;

    /// A decimal with at most six places: `12`, `12.5`, `-3.000001`.
    fn from_str(s: &str) -> Result<Credits, String> {
        let bad = || format!("`{s}` is not an amount: a decimal with at most 6 places");
        let t = s.trim();
        let (negative, t) = match t.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, t),
        };
        let (whole, frac) = t.split_once('.').unwrap_or((t, "0"));
        let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
        if !digits(whole) || !digits(frac) || frac.len() > 6 {
            return Err(bad());
        }
        let whole: i64 = whole.parse().map_err(|_| bad())?;
        let frac: i64 = format!("{frac:0<6}").parse().map_err(|_| bad())?;
        let micro = whole
            .checked_mul(MICRO)
            .and_then(|w| w.checked_add(frac))
            .filter(|m| *m <= MAX_AMOUNT)
            .ok_or_else(|| format!("`{s}` is above {} credits", MAX_AMOUNT / MICRO))?;
        Ok(Credits(if negative { -micro } else { micro }))
    }
}

impl Serialize for Credits {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Credits {
    /// A decimal string (`"12.5"`), or a JSON number written the same way.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Credits, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Text(String),
            Whole(i64),
            Number(f64),
        }
        let text = match Wire::deserialize(d)? {
            Wire::Text(t) => t,
            Wire::Whole(n) => n.to_string(),
            Wire::Number(n) if n.is_finite() => format!("{n}"),
            Wire::Number(_) => return Err(serde::de::Error::custom("not a finite amount")),
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What a node asks per hour of what it offers, set by its farmer: per whole GPU of
/// a model (a memory slice pays its share), per CPU core and per GiB of memory
/// reserved. What has no price is free.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    /// Per GPU-hour, by GPU model (`H100-80GB`); `*` for any model not listed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gpu_hour: BTreeMap<String, Credits>,
    /// Per core-hour of CPU reserved.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cpu_core_hour: Credits,
    /// Per GiB-hour of memory reserved.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub memory_gib_hour: Credits,
}

fn is_zero(c: &Credits) -> bool {
    *c == Credits::ZERO
}

impl Prices {
    /// The price of an hour of one GPU of `model`.
    pub fn gpu(&self, model: &str) -> Credits {
        self.gpu_hour
            .get(model)
            .or_else(|| self.gpu_hour.get("*"))
            .copied()
            .unwrap_or_default()
    }

    /// Whether nothing has a price.
    pub fn is_free(&self) -> bool {
        self == &Prices::default()
    }

    /// Checks every price: 0 to [`MAX_AMOUNT`], at most 64 GPU models of 1 to 64
    /// characters.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.gpu_hour.len() > 64 {
            return Err(ValidationError::new("prices.gpu_hour", "at most 64 models"));
        }
        for (model, price) in &self.gpu_hour {
            if model.is_empty() || model.len() > 64 || model.chars().any(char::is_control) {
                return Err(ValidationError::new(
                    "prices.gpu_hour",
                    "a GPU model is 1 to 64 printable characters",
                ));
            }
            price.check(&format!("prices.gpu_hour.{model}"), true)?;
        }
        self.cpu_core_hour.check("prices.cpu_core_hour", true)?;
        self.memory_gib_hour.check("prices.memory_gib_hour", true)
    }

    /// The prices as the agent's `--price` list writes them; `free` for none.
    pub fn summary(&self) -> String {
        let mut items: Vec<String> = self
            .gpu_hour
            .iter()
            .map(|(model, price)| format!("gpu.{model}={price}"))
            .collect();
        if self.cpu_core_hour != Credits::ZERO {
            items.push(format!("cpu={}", self.cpu_core_hour));
        }
        if self.memory_gib_hour != Credits::ZERO {
            items.push(format!("memory_gib={}", self.memory_gib_hour));
        }
        if items.is_empty() {
            "free".to_owned()
        } else {
            items.join(",")
        }
    }

    /// Parses the agent's `--price` list: `gpu.H100-80GB=2.5,gpu.*=1,cpu=0.04,memory_gib=0.005`.
    pub fn parse(list: &str) -> Result<Prices, String> {
        let mut prices = Prices::default();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| format!("`{item}`: expected KEY=CREDITS"))?;
            let amount: Credits = value.parse()?;
            match key.trim() {
                "cpu" => prices.cpu_core_hour = amount,
                "memory_gib" => prices.memory_gib_hour = amount,
                k => match k.strip_prefix("gpu.") {
                    Some(model) => {
                        prices.gpu_hour.insert(model.to_owned(), amount);
                    }
                    None => {
                        return Err(format!(
                            "`{k}`: a price is for gpu.MODEL, gpu.*, cpu or memory_gib"
                        ))
                    }
                },
            }
        }
        prices.validate().map_err(|e| e.to_string())?;
        Ok(prices)
    }
}

/// What a node offers the grid's treasuries: its prices and who is paid.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeOffer {
    /// The farmer paid for the node's work; the node's own account (`node:ID`)
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub farmer: Option<IdentityId>,
    /// Its prices.
    #[serde(default)]
    pub prices: Prices,
}

/// Why a ledger entry moved credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// Credits came in from outside the grid (an admin recorded a payment).
    Deposit,
    /// A circle paid a farmer for what its allocations used on the farmer's node.
    Settlement,
    /// A circle's quorum moved credits out.
    Transfer,
}

/// One ledger entry: `amount` moved from one account to another. Accounts are
/// `circle:NAME`, `farmer:IDENTITY`, `node:ID` (a node that names no farmer) and
/// `external` (the world outside, whose balance is minus everything deposited).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LedgerEntry {
    /// Its position in the ledger, from 1.
    pub seq: u64,
    /// When it was recorded.
    pub at: Timestamp,
    /// Why.
    pub kind: EntryKind,
    /// The account debited.
    pub from: String,
    /// The account credited.
    pub to: String,
    /// How much.
    pub amount: Credits,
    /// What it was for: the node and period settled, or the requester's memo.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub memo: String,
}

/// `GET /api/v1/treasury/{circle}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TreasuryView {
    /// The circle.
    pub circle: String,
    /// Whether it has a treasury: opened by its first deposit. Use of a circle
    /// without one is metered but not charged.
    pub open: bool,
    /// Its balance as settled.
    pub balance: Credits,
    /// What its allocations used since the last settlement, at their nodes'
    /// prices: settled at the next one.
    pub accrued: Credits,
    /// Balance less accrued: what it can still spend.
    pub available: Credits,
    /// What its running allocations cost per hour at their nodes' prices now.
    pub rate_per_hour: Credits,
    /// Settled and transferred out in the last 24 hours.
    pub spent_24h: Credits,
    /// Since when its available balance has been exhausted, if it is: new
    /// placements are held from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exhausted_since: Option<Timestamp>,
    /// When its running allocations are stopped if no deposit comes first (the
    /// grace period's end); or when they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stops_at: Option<Timestamp>,
    /// Why new work is not placed, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<String>,
    /// When use was last settled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled_until: Option<Timestamp>,
}

/// `GET /api/v1/treasury/{circle}/ledger`: the newest entries first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LedgerPage {
    /// The account.
    pub account: String,
    /// Its balance.
    pub balance: Credits,
    /// Entries debiting or crediting it, newest first.
    pub entries: Vec<LedgerEntry>,
}

/// `GET /api/v1/treasury`: every account (admins).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Accounts {
    /// Balances by account.
    pub balances: BTreeMap<String, Credits>,
    /// Their sum: zero, since every entry debits what it credits.
    pub sum: Credits,
    /// Entries recorded since the cluster began.
    pub entries: u64,
}

/// `POST /api/v1/treasury/{circle}/deposits`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Deposit {
    /// How much.
    pub amount: Credits,
    /// A note for the ledger (a payment reference), at most 200 characters.
    #[serde(default)]
    pub memo: String,
}

/// `POST /api/v1/treasury/{circle}/transfers`: always a guarded change of the
/// circle (`treasury.transfer`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Transfer {
    /// The account credited: `circle:NAME`, `farmer:IDENTITY`, `node:ID` or
    /// `external`.
    pub to: String,
    /// How much.
    pub amount: Credits,
    /// A note for the ledger, at most 200 characters.
    #[serde(default)]
    pub memo: String,
}

/// Longest memo.
pub const MAX_MEMO: usize = 200;

/// Checks a memo: at most [`MAX_MEMO`] characters, no control characters.
pub fn check_memo(memo: &str) -> Result<(), ValidationError> {
    if memo.chars().count() > MAX_MEMO || memo.chars().any(char::is_control) {
        return Err(ValidationError::new(
            "memo",
            format!("at most {MAX_MEMO} printable characters"),
        ));
    }
    Ok(())
}

/// Checks what every request moving credits names: a circle's name, an amount
/// above zero and within bounds, and a memo.
pub fn check_movement(circle: &str, amount: Credits, memo: &str) -> Result<(), ValidationError> {
    crate::spec::check_name("circle", circle)?;
    amount.check("amount", false)?;
    check_memo(memo)
}

/// Checks an account name: `external`, or `circle:`, `farmer:` or `node:` and a
/// name of 1 to 128 of `A-Z a-z 0-9 - _ .`.
pub fn check_account(account: &str) -> Result<(), ValidationError> {
    if account == "external" {
        return Ok(());
    }
    let name = ["circle:", "farmer:", "node:"]
        .iter()
        .find_map(|p| account.strip_prefix(p));
    let ok = name.is_some_and(|n| {
        !n.is_empty()
            && n.len() <= 128
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    });
    if !ok {
        return Err(ValidationError::new(
            "to",
            "an account: external, circle:NAME, farmer:IDENTITY or node:ID",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_read_and_print_exactly() {
        for (text, micro) in [
            ("12.5", 12_500_000),
            ("3", 3_000_000),
            ("-0.000001", -1),
            ("0.1", 100_000),
        ] {
            let c: Credits = text.parse().unwrap();
            assert_eq!(c.micro(), micro, "{text}");
            assert_eq!(c.to_string(), text);
        }
        for bad in [
            "",
            "1.",
            ".5",
            "1.0000001",
            "1e3",
            "abc",
            "1,5",
            "99999999999999",
        ] {
            assert!(bad.parse::<Credits>().is_err(), "{bad}");
        }
        let json: Credits = serde_json::from_str("2.25").unwrap();
        assert_eq!(json.micro(), 2_250_000);
        let json: Credits = serde_json::from_str("\"2.25\"").unwrap();
        assert_eq!(serde_json::to_string(&json).unwrap(), "\"2.25\"");
        assert!(Credits::ZERO.check("amount", false).is_err());
        assert!(Credits::from_micro(-5).check("amount", true).is_err());
    }

    #[test]
    fn an_agents_price_list_reads_into_prices() {
        let p = Prices::parse("gpu.H100-80GB=2.5, gpu.*=1,cpu=0.04,memory_gib=0.005").unwrap();
        assert_eq!(p.gpu("H100-80GB").to_string(), "2.5");
        assert_eq!(p.gpu("A100").to_string(), "1");
        assert_eq!(p.cpu_core_hour.to_string(), "0.04");
        assert_eq!(p.memory_gib_hour.to_string(), "0.005");
        assert!(Prices::parse("disk=1").is_err());
        assert!(Prices::parse("cpu=-1").is_err());
        assert!(Prices::parse("cpu").is_err());
        assert!(Prices::parse("").unwrap().is_free());
        let list = "gpu.*=1,gpu.H100-80GB=2.5,cpu=0.04,memory_gib=0.005";
        assert_eq!(Prices::parse(list).unwrap().summary(), list);
        assert_eq!(Prices::default().summary(), "free");
    }

    #[test]
    fn accounts_are_checked() {
        for ok in ["external", "circle:vision", "farmer:ab12", "node:n-1.x"] {
            assert!(check_account(ok).is_ok(), "{ok}");
        }
        for bad in ["", "circle:", "bank:x", "circle:a b", "external2"] {
            assert!(check_account(bad).is_err(), "{bad}");
        }
    }
}
