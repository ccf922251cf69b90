//! Where a role's settings come from, highest first: its flags, its `AIGRID_*`
//! environment variables, its TOML file (`--config`), and the defaults the role
//! applies to whatever no layer set. [`figment`] merges the layers, keeps which one
//! gave each value (so an error names the flag, the variable or the file), and
//! extracts the role's struct, which refuses keys it does not know.
//!
//! The names follow the flags: `--data-dir` is `AIGRID_DATA_DIR` and `data_dir` in the
//! file; the repeatable `--attr` is `AIGRID_ATTRS`, a comma-separated list, and
//! `attr = [...]` in the file. The variables are read as text, as a shell sets them,
//! and converted to each key's type on extraction (`AIGRID_NO_DEMO_MODEL=1` is true),
//! which is why extraction is figment's lossy one. Only the variables naming one of
//! the role's flags are read: `AIGRID_LOG`, `AIGRID_SERVER` and the others belong to
//! someone else.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::anyhow;
use figment::error::Kind;
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// What a role's `--help` says of its variables and file.
pub(crate) const HELP: &str = "Every flag has an AIGRID_* environment variable named after it \
(--data-dir: AIGRID_DATA_DIR; --attr: AIGRID_ATTRS and --admin: AIGRID_ADMINS, comma-separated lists) and a key in the \
--config TOML file (data_dir, attr = [...]); unknown keys in the file are an error. \
Flags win over variables, variables over the file, the file over the defaults.";

/// Flags whose variable is not the flag's name upper-cased.
const RENAMED: &[(&str, &str)] = &[("attr", "AIGRID_ATTRS"), ("admin", "AIGRID_ADMINS")];

/// Flags that are not settings: the file's own path (read by clap, with
/// `AIGRID_CONFIG`) and clap's own.
const NOT_SETTINGS: &[&str] = &["config", "help", "version"];

/// One setting as a flag, a variable and a key.
#[derive(Debug, Clone)]
struct Setting {
    /// The key, as in the file: the flag's name with `_`.
    key: String,
    /// The flag, `--data-dir`.
    flag: String,
    /// The variable, `AIGRID_DATA_DIR`.
    variable: String,
    /// A repeatable flag: its variable is a comma-separated list.
    list: bool,
}

/// The settings a role's flags declare.
fn settings<A: clap::Args>() -> Vec<Setting> {
    let command = A::augment_args(clap::Command::new("role"));
    command
        .get_arguments()
        .filter(|arg| !NOT_SETTINGS.contains(&arg.get_id().as_str()))
        .filter_map(|arg| {
            let key = arg.get_id().as_str().to_owned();
            let flag = format!("--{}", arg.get_long()?);
            let variable = RENAMED
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| (*v).to_owned())
                .unwrap_or_else(|| format!("AIGRID_{}", key.to_ascii_uppercase()));
            let list = matches!(arg.get_action(), clap::ArgAction::Append);
            Some(Setting {
                key,
                flag,
                variable,
                list,
            })
        })
        .collect()
}

/// The variables a role reads, with their names, in `Setting` order.
pub(crate) fn variables<A: clap::Args>() -> Vec<String> {
    settings::<A>().into_iter().map(|s| s.variable).collect()
}

/// The role's variables in this process's environment; one of them that is not
/// UTF-8 is an error, the others are none of the role's business.
pub(crate) fn process_env<A: clap::Args>() -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for name in variables::<A>() {
        if let Some(value) = std::env::var_os(&name) {
            let value = value
                .into_string()
                .map_err(|_| anyhow!("{name} is not valid UTF-8"))?;
            out.push((name, value));
        }
    }
    Ok(out)
}

/// A role's layers, merged.
pub(crate) struct Layers {
    figment: Figment,
}

impl Layers {
    /// `flags` over the variables in `env` over the TOML file at `file`.
    pub(crate) fn new<A: clap::Args + Serialize>(
        flags: &A,
        env: &[(String, String)],
        file: Option<&Path>,
    ) -> Self {
        let settings = settings::<A>();
        let mut figment = Figment::new();
        if let Some(path) = file {
            figment = figment.merge(ConfigFile(path.to_path_buf()));
        }
        let figment = figment
            .merge(Variables::new(&settings, env))
            .merge(Flags::new(&settings, flags));
        Layers { figment }
    }

    /// The role's settings, each from the highest layer that set it; an unknown key
    /// or a value of the wrong type is an error naming where it came from.
    pub(crate) fn extract<T: DeserializeOwned>(&self) -> anyhow::Result<T> {
        self.figment.extract_lossy().map_err(|e| self.explain(e))
    }

    /// `path`, set for `key`, as its layer means it: a path in the config file is
    /// relative to the file, one from a flag or variable to the working directory.
    pub(crate) fn path(&self, key: &str, path: PathBuf) -> PathBuf {
        let file = self
            .figment
            .find_metadata(key)
            .and_then(|md| md.source.as_ref())
            .and_then(|source| source.file_path());
        match file {
            Some(file) => file.parent().unwrap_or(Path::new("")).join(path),
            None => path,
        }
    }

    /// One line saying what is wrong and where it was set.
    fn explain(&self, error: figment::Error) -> anyhow::Error {
        let Some(e) = error.into_iter().next() else {
            return anyhow!("invalid configuration");
        };
        let label = |md: Option<&Metadata>, path: &[String]| match md {
            Some(md) => md.interpolate(&Profile::Default, path),
            None => format!("configuration key `{}`", path.join(".")),
        };
        let text = match &e.kind {
            Kind::UnknownField(key, known) => {
                // The error's path ends in the key (figment puts it there).
                let mut path = e.path.clone();
                if path.last() != Some(key) {
                    path.push(key.clone());
                }
                let key = path.join(".");
                // Only the file has keys of its own choosing.
                let origin = match self
                    .figment
                    .find_metadata(&key)
                    .and_then(|md| md.source.as_ref())
                    .and_then(|source| source.file_path())
                {
                    Some(file) => format!("config file {}", file.display()),
                    None => "configuration".to_owned(),
                };
                let known = if known.is_empty() {
                    String::new()
                } else {
                    format!(" (known keys: {})", known.join(", "))
                };
                format!("{origin}: unknown key `{key}`{known}")
            }
            // A layer that could not be read says so in full.
            kind if e.path.is_empty() => kind.to_string(),
            kind => format!("{}: {kind}", label(e.metadata.as_ref(), &e.path)),
        };
        anyhow!(text.replace('\n', " "))
    }
}

/// A layer's metadata, whose errors name a key as that layer spells it
/// (`--data-dir`, `AIGRID_DATA_DIR`).
fn spelled(name: &'static str, spelling: BTreeMap<String, String>) -> Metadata {
    Metadata::named(name).interpolater(move |_: &Profile, keys: &[&str]| {
        let key = keys.join(".");
        spelling.get(&key).cloned().unwrap_or(key)
    })
}

/// The config file, read with the workspace's TOML parser.
struct ConfigFile(PathBuf);

impl Provider for ConfigFile {
    fn metadata(&self) -> Metadata {
        let path = self.0.clone();
        Metadata::from("config file", self.0.as_path()).interpolater(
            move |_: &Profile, keys: &[&str]| {
                format!("config file {}: key `{}`", path.display(), keys.join("."))
            },
        )
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let path = self.0.display();
        let text = std::fs::read_to_string(&self.0)
            .map_err(|e| figment::Error::from(format!("reading config file {path}: {e}")))?;
        let dict: Dict = toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map_or(1, |at| text[..at.start].matches('\n').count() + 1);
            figment::Error::from(format!("config file {path}, line {line}: {}", e.message()))
        })?;
        Ok(Profile::Default.collect(dict))
    }
}

/// The role's `AIGRID_*` variables, as text (lists split at commas); an empty one is
/// unset, as clap takes it.
struct Variables {
    dict: Dict,
    names: BTreeMap<String, String>,
}

impl Variables {
    fn new(settings: &[Setting], env: &[(String, String)]) -> Self {
        let mut dict = Dict::new();
        for setting in settings {
            let Some((_, text)) = env.iter().find(|(name, _)| *name == setting.variable) else {
                continue;
            };
            if text.is_empty() {
                continue;
            }
            let value = if setting.list {
                Value::from(text.split(',').map(str::to_owned).collect::<Vec<_>>())
            } else {
                Value::from(text.clone())
            };
            dict.insert(setting.key.clone(), value);
        }
        let names = settings
            .iter()
            .map(|s| (s.key.clone(), s.variable.clone()))
            .collect();
        Variables { dict, names }
    }
}

impl Provider for Variables {
    fn metadata(&self) -> Metadata {
        spelled("environment variable", self.names.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

/// The flags given on the command line. A flag not given parses as `None`, `false`
/// or an empty list, and says nothing here: the layers below decide.
struct Flags {
    dict: Result<Dict, String>,
    flags: BTreeMap<String, String>,
}

impl Flags {
    fn new<A: Serialize>(settings: &[Setting], args: &A) -> Self {
        let dict = match Value::serialize(args) {
            Ok(Value::Dict(_, dict)) => Ok(dict
                .into_iter()
                .filter(|(_, v)| !matches!(v, Value::Empty(..) | Value::Bool(_, false)))
                .filter(|(_, v)| !matches!(v, Value::Array(_, items) if items.is_empty()))
                .collect()),
            Ok(_) => Err("the flags are not a table".to_owned()),
            Err(e) => Err(e.to_string()),
        };
        let flags = settings
            .iter()
            .map(|s| (s.key.clone(), s.flag.clone()))
            .collect();
        Flags { dict, flags }
    }
}

impl Provider for Flags {
    fn metadata(&self) -> Metadata {
        spelled("command line", self.flags.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        match &self.dict {
            Ok(dict) => Ok(Profile::Default.collect(dict.clone())),
            Err(e) => Err(figment::Error::from(e.clone())),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde::Deserialize;

    /// A role's flags, as the real ones are declared.
    #[derive(clap::Args, Serialize, Deserialize, Debug, Default)]
    #[serde(deny_unknown_fields)]
    struct Role {
        #[arg(long)]
        id: Option<u64>,
        #[arg(long)]
        node_id: Option<String>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long = "attr", value_delimiter = ',')]
        #[serde(default)]
        attr: Vec<String>,
        #[arg(long)]
        #[serde(default)]
        quiet: bool,
        #[arg(long, env = "AIGRID_CONFIG")]
        #[serde(skip)]
        config: Option<PathBuf>,
    }

    /// An environment of these variables, for a role's resolution.
    pub(crate) fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn each_flag_has_a_variable_named_after_it() {
        assert_eq!(
            variables::<Role>(),
            [
                "AIGRID_ID",
                "AIGRID_NODE_ID",
                "AIGRID_DATA_DIR",
                "AIGRID_ATTRS",
                "AIGRID_QUIET"
            ]
        );
    }

    #[test]
    fn a_flag_beats_a_variable_beats_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("role.toml");
        std::fs::write(
            &file,
            "id = 1\nnode_id = \"from-file\"\ndata_dir = \"file-dir\"\nattr = [\"site=file\"]\n",
        )
        .unwrap();
        let flags = Role {
            id: Some(3),
            ..Role::default()
        };
        let vars = env(&[
            ("AIGRID_ID", "2"),
            ("AIGRID_NODE_ID", "42"),
            ("AIGRID_QUIET", "1"),
            ("AIGRID_LOG", "debug"),
        ]);
        let layers = Layers::new(&flags, &vars, Some(&file));
        let got: Role = layers.extract().unwrap();
        assert_eq!(got.id, Some(3), "the flag beats the variable and the file");
        assert_eq!(
            got.node_id.as_deref(),
            Some("42"),
            "the variable beats the file, and stays text"
        );
        assert!(got.quiet, "a variable sets a switch");
        assert_eq!(
            got.attr,
            ["site=file"],
            "the file fills what nothing else set"
        );
        assert_eq!(
            layers.path("data_dir", got.data_dir.unwrap()),
            dir.path().join("file-dir"),
            "a path in the file is relative to the file"
        );

        // Without the flag, the variable wins; a list variable splits at commas.
        let vars = env(&[("AIGRID_ID", "2"), ("AIGRID_ATTRS", "a=1,b=2")]);
        let layers = Layers::new(&Role::default(), &vars, Some(&file));
        let got: Role = layers.extract().unwrap();
        assert_eq!(got.id, Some(2));
        assert_eq!(got.attr, ["a=1", "b=2"]);

        // Without either, the file; an empty variable is unset.
        let got: Role = Layers::new(&Role::default(), &env(&[("AIGRID_ID", "")]), Some(&file))
            .extract()
            .unwrap();
        assert_eq!(got.id, Some(1));
        let got: Role = Layers::new(&Role::default(), &[], None).extract().unwrap();
        assert_eq!(got.id, None, "no layer: the role's default applies");
    }

    #[test]
    fn an_unknown_key_or_a_bad_value_is_named_with_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("role.toml");
        std::fs::write(&file, "id = 1\nbogus = 2\n").unwrap();
        let err = Layers::new(&Role::default(), &[], Some(&file))
            .extract::<Role>()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("config file {}", file.display()))
                && err.contains("unknown key `bogus` (known keys: id, node_id,")
                && !err.contains('\n'),
            "{err}"
        );
        std::fs::write(&file, "config = \"other.toml\"\n").unwrap();
        let err = Layers::new(&Role::default(), &[], Some(&file))
            .extract::<Role>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown key `config`"), "{err}");

        let err = Layers::new(&Role::default(), &env(&[("AIGRID_ID", "seven")]), None)
            .extract::<Role>()
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("AIGRID_ID: "), "{err}");

        std::fs::write(&file, "id = [\n").unwrap();
        let err = Layers::new(&Role::default(), &[], Some(&file))
            .extract::<Role>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("role.toml") && !err.contains('\n'), "{err}");
        let missing = dir.path().join("missing.toml");
        let err = Layers::new(&Role::default(), &[], Some(&missing))
            .extract::<Role>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.toml"), "{err}");
    }
}
