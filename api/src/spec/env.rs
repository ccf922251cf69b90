//! A task's environment variables ([`EnvVars`]): a map from name to value, kept as
//! one sorted list.

use std::fmt;
use std::ops::Index;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A task's environment: names to values, in name order, each name once. In JSON and
/// TOML it is an object, as a map's would be; a name given twice keeps its last value.
///
/// The state keeps every job's spec on every server for as long as the job lives,
/// and most tasks name a few variables or none. A `BTreeMap` puts even one variable
/// in a node with room for eleven (544 bytes); this keeps them in a list of exactly
/// their number (48 bytes for one). Lookups search the sorted list.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct EnvVars(Vec<(String, String)>);

impl EnvVars {
    /// No variables.
    pub const fn new() -> Self {
        Self(Vec::new())
    }

    /// How many variables there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sorted by name, a repeated name keeping the value given last, and without
    /// spare room.
    fn from_pairs(mut vars: Vec<(String, String)>) -> Self {
        // Stable: of equal names the one given last stays last. `dedup_by` keeps the
        // first of a run, so each later value is moved into it before it goes.
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(&mut later.1, &mut kept.1);
            }
            same
        });
        vars.shrink_to_fit();
        Self(vars)
    }

    fn position(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| n.as_str().cmp(name))
    }

    /// The value of `name`, if it is set.
    pub fn get(&self, name: &str) -> Option<&String> {
        self.position(name).ok().map(|i| &self.0[i].1)
    }

    /// Whether `name` is set.
    pub fn contains_key(&self, name: &str) -> bool {
        self.position(name).is_ok()
    }

    /// Sets `name` to `value`, returning the value it replaced.
    pub fn insert(&mut self, name: String, value: String) -> Option<String> {
        match self.position(&name) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (name, value));
                None
            }
        }
    }

    /// The variables, in name order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&String, &String)> + Clone {
        self.into_iter()
    }

    /// The variables in name order, their values writable.
    pub fn iter_mut(&mut self) -> impl ExactSizeIterator<Item = (&String, &mut String)> {
        self.0.iter_mut().map(|(n, v)| (&*n, v))
    }

    /// The names, in order.
    pub fn keys(&self) -> impl ExactSizeIterator<Item = &String> {
        self.0.iter().map(|(n, _)| n)
    }

    /// The values in name order, writable.
    pub fn values_mut(&mut self) -> impl ExactSizeIterator<Item = &mut String> {
        self.0.iter_mut().map(|(_, v)| v)
    }
}

impl fmt::Debug for EnvVars {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Index<&str> for EnvVars {
    type Output = String;

    /// The value of `name`; panics when it is not set, as a map's index does.
    fn index(&self, name: &str) -> &String {
        self.get(name)
            .unwrap_or_else(|| panic!("no variable `{name}` in the environment"))
    }
}

impl FromIterator<(String, String)> for EnvVars {
    /// In name order; of a name given more than once, the last value is kept.
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        Self::from_pairs(iter.into_iter().collect())
    }
}

impl<'a> IntoIterator for &'a EnvVars {
    type Item = (&'a String, &'a String);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, String)>,
        fn(&'a (String, String)) -> (&'a String, &'a String),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(n, v)| (n, v))
    }
}

impl Serialize for EnvVars {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self)
    }
}

impl<'de> Deserialize<'de> for EnvVars {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EnvVisitor;

        impl<'de> Visitor<'de> for EnvVisitor {
            type Value = EnvVars;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of variable names to string values")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<EnvVars, A::Error> {
                // The hint is the input's word, so it is capped; the list is cut to
                // its length once read.
                let mut vars = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
                while let Some(entry) = map.next_entry::<String, String>()? {
                    vars.push(entry);
                }
                Ok(EnvVars::from_pairs(vars))
            }
        }

        deserializer.deserialize_map(EnvVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> EnvVars {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn reads_and_writes_an_object_in_name_order_keeping_a_repeated_names_last_value() {
        let env: EnvVars = serde_json::from_str(r#"{"B":"2","A":"1","B":"3"}"#).unwrap();
        assert_eq!(env.len(), 2);
        assert_eq!(env["B"], "3");
        assert_eq!(serde_json::to_string(&env).unwrap(), r#"{"A":"1","B":"3"}"#);
        assert_eq!(env.0.capacity(), 2, "no room kept beyond the variables");
        let toml: EnvVars = toml::from_str("Z = \"z\"\nA = \"a\"").unwrap();
        assert_eq!(toml, vars(&[("A", "a"), ("Z", "z")]));
    }

    #[test]
    fn refuses_what_is_not_an_object_of_strings() {
        for bad in [r#"["A","1"]"#, r#"{"A":1}"#, r#"{"A":null}"#, r#""A=1""#] {
            assert!(serde_json::from_str::<EnvVars>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn looks_up_inserts_and_iterates_like_a_sorted_map() {
        let mut env = vars(&[("M", "1"), ("C", "2")]);
        assert_eq!(env.get("C").map(String::as_str), Some("2"));
        assert_eq!(env.get("X"), None);
        assert!(env.contains_key("M") && !env.contains_key("m"));
        assert_eq!(env.insert("A".into(), "0".into()), None);
        assert_eq!(env.insert("M".into(), "9".into()), Some("1".into()));
        assert_eq!(env.insert("Z".into(), "3".into()), None);
        let names: Vec<&String> = env.keys().collect();
        assert_eq!(names, ["A", "C", "M", "Z"]);
        for value in env.values_mut() {
            value.push('!');
        }
        let pairs: Vec<(&String, &String)> = env.iter().collect();
        assert_eq!(pairs[2], (&"M".to_owned(), &"9!".to_owned()));
        assert_eq!(
            format!("{env:?}"),
            r#"{"A": "0!", "C": "2!", "M": "9!", "Z": "3!"}"#
        );
        assert!(EnvVars::new().is_empty());
    }
}
