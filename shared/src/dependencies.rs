//! Declared fan-out and order: which services a changed path reaches besides the service whose
//! directory it is in, and which services must have synced before another starts.
//!
//! Declarations come from the dependency manifest (`DEPENDENCIES_FILE`, read at the synced
//! commit) in the original runner's format, with `after` added:
//!
//! ```yaml
//! version: 1
//! services:
//!   platform/alerting:
//!     depends_on: [libs/**, platform/*/deploy.py]   # repository-relative globs
//!     after: [platform/postgres]                      # service keys
//! ```
//!
//! and from the same fields in an `IAC_RULES` file (`[services."platform/alerting"]`). Globs
//! match as the original's fnmatch did: `*` also matches `/`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::Deserialize;

use crate::events::is_valid_service_key;
use crate::rules::Service;

/// The manifest version this runner reads.
pub const MANIFEST_VERSION: u64 = 1;

/// The declarations of one service, as written in a manifest or rules file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Declared {
    /// Globs of repository paths whose change must sync this service.
    #[serde(default, deserialize_with = "null_is_empty")]
    pub depends_on: Vec<String>,
    /// Services of the same sync that must have synced before this one starts.
    #[serde(default, deserialize_with = "null_is_empty")]
    pub after: Vec<String>,
}

/// `depends_on:` with nothing after it is YAML's null: an empty list, as the original read it.
fn null_is_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    version: Option<yaml_serde::Value>,
    #[serde(default)]
    services: Option<BTreeMap<String, Option<Declared>>>,
}

/// A manifest or declaration that cannot be used; the message says what is wrong and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DependencyError {
    #[error("not valid YAML: {0}")]
    Yaml(String),
    #[error("version is missing; expected `version: {MANIFEST_VERSION}`")]
    NoVersion,
    #[error("version {0} is not supported; this runner reads version {MANIFEST_VERSION}")]
    Version(String),
    #[error("services.{service}: {problem}")]
    Service { service: String, problem: String },
    #[error("services.{service}.after names {unknown}, which is not a service at this commit")]
    UnknownAfter { service: String, unknown: String },
    #[error("`after` makes a cycle: {0}")]
    Cycle(String),
}

/// Compiled declarations: the globs of every service in one set, and the order.
#[derive(Debug, Clone)]
pub struct Dependencies {
    declared: BTreeMap<String, Declared>,
    globs: GlobSet,
    /// For each glob of `globs`, by index: the service declaring it and the pattern as written.
    owners: Vec<(String, String)>,
}

impl Default for Dependencies {
    fn default() -> Self {
        Dependencies::new(BTreeMap::new()).expect("no declarations are valid")
    }
}

impl Dependencies {
    /// Reads a manifest: `version: 1` and a `services` map.
    pub fn from_yaml(text: &str) -> Result<Self, DependencyError> {
        let file: ManifestFile =
            yaml_serde::from_str(text).map_err(|e| DependencyError::Yaml(e.to_string()))?;
        match file.version {
            None => return Err(DependencyError::NoVersion),
            Some(yaml_serde::Value::Number(n)) if n.as_u64() == Some(MANIFEST_VERSION) => {}
            Some(other) => {
                let shown = yaml_serde::to_string(&other).unwrap_or_default();
                return Err(DependencyError::Version(shown.trim().to_string()));
            }
        }
        let services = file
            .services
            .unwrap_or_default()
            .into_iter()
            .map(|(key, declared)| (key, declared.unwrap_or_default()))
            .collect();
        Dependencies::new(services)
    }

    /// Checks and compiles declarations: keys, globs, and an `after` order without cycles.
    pub fn new(declared: BTreeMap<String, Declared>) -> Result<Self, DependencyError> {
        let mut builder = GlobSetBuilder::new();
        let mut owners = Vec::new();
        for (key, service) in &declared {
            let problem = |problem: String| DependencyError::Service {
                service: key.clone(),
                problem,
            };
            if !is_valid_service_key(key) {
                return Err(problem(
                    "not a service key (layer/name of letters, digits, '-', '_', '.')".into(),
                ));
            }
            for pattern in &service.depends_on {
                let glob = GlobBuilder::new(pattern)
                    .literal_separator(false)
                    .build()
                    .map_err(|e| problem(format!("bad depends_on pattern {pattern:?}: {e}")))?;
                builder.add(glob);
                owners.push((key.clone(), pattern.clone()));
            }
            if let Some(bad) = service.after.iter().find(|k| !is_valid_service_key(k)) {
                return Err(problem(format!(
                    "after names {bad:?}, which is not a service key"
                )));
            }
        }
        let globs = builder.build().map_err(|e| DependencyError::Service {
            service: "*".into(),
            problem: e.to_string(),
        })?;
        if let Some(cycle) = find_cycle(&declared) {
            return Err(DependencyError::Cycle(cycle.join(" → ")));
        }
        Ok(Dependencies {
            declared,
            globs,
            owners,
        })
    }

    /// These declarations together with `other`'s (both lists of a service kept).
    pub fn merged(&self, other: &Dependencies) -> Result<Self, DependencyError> {
        let mut declared = self.declared.clone();
        for (key, more) in &other.declared {
            let entry = declared.entry(key.clone()).or_default();
            for pattern in &more.depends_on {
                if !entry.depends_on.contains(pattern) {
                    entry.depends_on.push(pattern.clone());
                }
            }
            for after in &more.after {
                if !entry.after.contains(after) {
                    entry.after.push(after.clone());
                }
            }
        }
        Dependencies::new(declared)
    }

    /// Every `after` must name a service found at the commit (a typo would silently drop an
    /// order the user asked for).
    pub fn check_services(&self, discovered: &[Service]) -> Result<(), DependencyError> {
        let known: BTreeSet<&str> = discovered.iter().map(|s| s.key.as_str()).collect();
        for (key, service) in &self.declared {
            if let Some(unknown) = service.after.iter().find(|k| !known.contains(k.as_str())) {
                return Err(DependencyError::UnknownAfter {
                    service: key.clone(),
                    unknown: unknown.clone(),
                });
            }
        }
        Ok(())
    }

    /// Declared services that are not services at the commit (removed, or misspelt).
    pub fn undiscovered<'a>(&'a self, discovered: &[Service]) -> Vec<&'a str> {
        let known: BTreeSet<&str> = discovered.iter().map(|s| s.key.as_str()).collect();
        self.declared
            .keys()
            .map(String::as_str)
            .filter(|k| !known.contains(k))
            .collect()
    }

    /// The services that declare a dependency matching `path`, with the matching pattern.
    pub fn dependents<'a>(&'a self, path: &str) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.globs.matches(path).into_iter().map(|i| {
            let (key, pattern) = &self.owners[i];
            (key.as_str(), pattern.as_str())
        })
    }

    /// The services `key` comes after.
    pub fn after(&self, key: &str) -> &[String] {
        self.declared.get(key).map_or(&[], |d| d.after.as_slice())
    }

    pub fn is_empty(&self) -> bool {
        self.declared.is_empty()
    }
}

/// The first cycle of `after` edges, as the keys along it with the first repeated at the end;
/// keys are visited in order, so the same declarations always name the same cycle.
fn find_cycle(declared: &BTreeMap<String, Declared>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit<'a>(
        key: &'a str,
        declared: &'a BTreeMap<String, Declared>,
        marks: &mut BTreeMap<&'a str, Mark>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match marks.get(key) {
            Some(Mark::Done) => return None,
            Some(Mark::Visiting) => {
                let start = path.iter().position(|k| *k == key).unwrap_or(0);
                let mut cycle: Vec<String> = path[start..].iter().map(|k| k.to_string()).collect();
                cycle.push(key.to_string());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(key, Mark::Visiting);
        path.push(key);
        for next in declared.get(key).map(|d| d.after.as_slice()).unwrap_or(&[]) {
            if let Some(cycle) = visit(next, declared, marks, path) {
                return Some(cycle);
            }
        }
        path.pop();
        marks.insert(key, Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    declared
        .keys()
        .find_map(|key| visit(key, declared, &mut marks, &mut Vec::new()))
}

/// Why a service was selected for a sync, as results and the log say it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// A path in the service's own directory changed.
    Changed(String),
    /// A changed path matched a glob the service declares.
    DependsOn { pattern: String, path: String },
    /// Every service: a manual `{"all": true}`, a path of the `all` rule without
    /// declarations, or a push whose paths are unknown.
    All(Option<String>),
    /// A manual request named it.
    Manual,
}

impl Reason {
    /// The strongest reason wins when several apply: the service's own change first.
    fn rank(&self) -> u8 {
        match self {
            Reason::Manual | Reason::Changed(_) => 0,
            Reason::DependsOn { .. } => 1,
            Reason::All(_) => 2,
        }
    }

    /// Keeps the stronger of `self` and `other`.
    pub fn strongest(self, other: Reason) -> Reason {
        if other.rank() < self.rank() {
            other
        } else {
            self
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Changed(path) => write!(f, "changed {path}"),
            Reason::DependsOn { pattern, path } => write!(f, "depends on {pattern} via {path}"),
            Reason::All(None) => f.write_str("all"),
            Reason::All(Some(why)) => write!(f, "all ({why})"),
            Reason::Manual => f.write_str("manual"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entries of the original runner's manifest.
    const ORIGINAL: &str = "
version: 1
services:
  platform/alerting:
    depends_on:
      - libs/**
      - tools/**
      - platform/*/deploy.py
      - finance_report/finance_report/*/deploy.py
";

    #[test]
    fn the_original_manifest_reads_and_fans_libs_out_to_alerting_only() {
        let deps = Dependencies::from_yaml(ORIGINAL).unwrap();
        let hits: Vec<_> = deps.dependents("libs/common/deploy_utils.py").collect();
        assert_eq!(hits, [("platform/alerting", "libs/**")]);
        let hits: Vec<_> = deps.dependents("platform/01.postgres/deploy.py").collect();
        assert_eq!(hits, [("platform/alerting", "platform/*/deploy.py")]);
        assert_eq!(
            deps.dependents("platform/01.postgres/compose.yaml").count(),
            0
        );
        assert!(deps.after("platform/alerting").is_empty());
    }

    #[test]
    fn globs_match_like_fnmatch_with_star_crossing_slashes() {
        let deps = Dependencies::from_yaml(
            "version: 1\nservices:\n  a/b:\n    depends_on: ['tools/*', 'x/?.py']\n",
        )
        .unwrap();
        assert_eq!(deps.dependents("tools/deep/file.sh").count(), 1);
        assert_eq!(deps.dependents("x/a.py").count(), 1);
        assert_eq!(deps.dependents("x/ab.py").count(), 0);
    }

    #[test]
    fn empty_entries_and_an_empty_services_map_are_allowed() {
        let deps =
            Dependencies::from_yaml("version: 1\nservices:\n  a/b:\n  c/d:\n    depends_on:\n")
                .unwrap();
        assert_eq!(deps.dependents("anything").count(), 0);
        assert!(
            Dependencies::from_yaml("version: 1\nservices:\n")
                .unwrap()
                .is_empty()
        );
        assert!(Dependencies::from_yaml("version: 1\n").unwrap().is_empty());
    }

    #[test]
    fn bad_manifests_say_what_is_wrong() {
        let cases = [
            ("version: 1\nservices: [\n", "not valid YAML"),
            ("services: {}\n", "version is missing"),
            ("version: 2\nservices: {}\n", "version 2 is not supported"),
            ("version: '1'\n", "version '1' is not supported"),
            ("version: 1\nservice: {}\n", "unknown field `service`"),
            (
                "version: 1\nservices:\n  a/b:\n    depend_on: [x]\n",
                "unknown field `depend_on`",
            ),
            (
                "version: 1\nservices:\n  a/b:\n    depends_on: ['x/[']\n",
                "services.a/b: bad depends_on pattern",
            ),
            (
                "version: 1\nservices:\n  nokey:\n    after: []\n",
                "services.nokey: not a service key",
            ),
            (
                "version: 1\nservices:\n  a/b:\n    after: [a/c]\n  a/c:\n    after: [a/d]\n  a/d:\n    after: [a/b]\n",
                "`after` makes a cycle: a/b → a/c → a/d → a/b",
            ),
            (
                "version: 1\nservices:\n  a/b:\n    after: [a/b]\n",
                "a/b → a/b",
            ),
        ];
        for (text, expected) in cases {
            let err = Dependencies::from_yaml(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    fn service(key: &str) -> Service {
        Service {
            key: key.into(),
            task: "t".into(),
            dir: "d".into(),
            refused: None,
        }
    }

    #[test]
    fn after_must_name_a_service_of_the_commit() {
        let deps = Dependencies::from_yaml(
            "version: 1\nservices:\n  platform/app:\n    after: [platform/postgress]\n",
        )
        .unwrap();
        let err = deps
            .check_services(&[service("platform/app"), service("platform/postgres")])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "services.platform/app.after names platform/postgress, which is not a service at this commit"
        );
        assert!(
            deps.check_services(&[service("platform/postgress")])
                .is_ok()
        );
        assert_eq!(
            deps.undiscovered(&[service("platform/postgress")]),
            ["platform/app"]
        );
    }

    #[test]
    fn merged_declarations_keep_both_and_are_checked_again() {
        let a =
            Dependencies::from_yaml("version: 1\nservices:\n  a/x:\n    after: [a/y]\n").unwrap();
        let b = Dependencies::from_yaml(
            "version: 1\nservices:\n  a/x:\n    depends_on: [libs/**]\n  a/y:\n    after: [a/x]\n",
        )
        .unwrap();
        let err = a.merged(&b).unwrap_err().to_string();
        assert!(err.contains("cycle"), "{err}");
        let c =
            Dependencies::from_yaml("version: 1\nservices:\n  a/x:\n    depends_on: [libs/**]\n")
                .unwrap();
        let both = a.merged(&c).unwrap();
        assert_eq!(both.after("a/x"), ["a/y"]);
        assert_eq!(both.dependents("libs/q.py").count(), 1);
    }

    #[test]
    fn the_example_manifest_reads_and_orders_only_services_of_the_example() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/example-infra");
        let text = std::fs::read_to_string(format!("{root}/deploy-dependencies.yaml")).unwrap();
        let deps = Dependencies::from_yaml(&text).unwrap();
        let files: Vec<String> = [
            "platform/01.postgres",
            "platform/02.redis",
            "platform/03.grafana",
            "finance_report/finance_report/10.app",
            "finance_report/finance_report/20.worker",
        ]
        .iter()
        .map(|dir| format!("{dir}/deploy.py"))
        .filter(|file| std::path::Path::new(&format!("{root}/{file}")).exists())
        .collect();
        let found = crate::rules::Rules::default().discover(files.iter().map(String::as_str));
        assert_eq!(found.len(), 5, "{found:?}");
        deps.check_services(&found).unwrap();
        assert!(deps.undiscovered(&found).is_empty());
        assert_eq!(deps.after("finance_report/worker"), ["finance_report/app"]);
    }

    #[test]
    fn reasons_read_as_the_log_says_them() {
        assert_eq!(
            Reason::Changed("platform/01.postgres/compose.yaml".into()).to_string(),
            "changed platform/01.postgres/compose.yaml"
        );
        let depends = Reason::DependsOn {
            pattern: "libs/**".into(),
            path: "libs/common.py".into(),
        };
        assert_eq!(depends.to_string(), "depends on libs/** via libs/common.py");
        assert_eq!(Reason::Manual.to_string(), "manual");
        assert_eq!(Reason::All(None).to_string(), "all");
        let changed = Reason::Changed("x".into());
        assert_eq!(depends.clone().strongest(changed.clone()), changed);
        assert_eq!(Reason::All(None).strongest(depends.clone()), depends);
    }
}
