//! Which services a changed path affects, and which directories are services.
//!
//! The default rules reproduce the original runner's table:
//!
//! | path | effect |
//! | --- | --- |
//! | `bootstrap/**` | never synced automatically |
//! | `libs/**` | every discovered service |
//! | `platform/{nn}.{name}/**` | service `platform/{name}`, task `{name}.sync` |
//! | `finance_report/finance_report/{nn}.{name}/**` | service `finance_report/{name}`, task `fr-{name}.sync` |
//! | anything else | ignored |
//!
//! `IAC_RULES` may name a TOML file that replaces them (see [`Rules::from_toml`]). With
//! declared dependencies ([`crate::dependencies`]), [`Rules::fan_out`] selects the services a
//! sync runs and says why.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use foldhash::HashMap as FoldHashMap;
use globset::{Glob, GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

use crate::dependencies::{Declared, Dependencies, DependencyError, Reason};
use crate::events::is_valid_service_key;

/// What [`Rules::map_paths`] shows for "every service" in a preview (as the original did).
pub const ALL_SERVICES: &str = "__all__";

/// A service found at a commit: a directory matching a service rule that holds `deploy.py`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Service {
    /// `platform/postgres`
    pub key: String,
    /// `postgres.sync`
    pub task: String,
    /// `platform/01.postgres`
    pub dir: String,
    /// Why the service must not run, when it must not: its task is also the task of a
    /// directory that is never synced automatically, or its directory starts with `-`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// The effect of one changed path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The path belongs to this service (key).
    Service(String),
    /// The path is shared by every service (`libs/**`).
    All,
    /// The path must never trigger a sync (`bootstrap/**`).
    Never,
    /// The path belongs to nothing the runner deploys.
    Nothing,
}

/// The services a set of paths maps to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mapping {
    /// Service keys named by their own directories.
    pub services: BTreeSet<String>,
    /// Some path affects every service.
    pub all: bool,
}

impl Mapping {
    /// The preview the gateway answers with: the keys, plus [`ALL_SERVICES`] when `all`.
    pub fn preview(&self) -> Vec<String> {
        let mut keys: Vec<String> = Vec::with_capacity(self.services.len() + 1);
        if self.all {
            keys.push(ALL_SERVICES.to_string());
        }
        keys.extend(self.services.iter().cloned());
        keys
    }

    pub fn is_empty(&self) -> bool {
        !self.all && self.services.is_empty()
    }

    /// The discovered services this mapping selects, in key order.
    pub fn select<'a>(&self, discovered: &'a [Service]) -> Vec<&'a Service> {
        discovered
            .iter()
            .filter(|s| self.all || self.services.contains(&s.key))
            .collect()
    }
}

/// What a set of changed paths selects (see [`Rules::fan_out`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FanOut {
    /// The selected services in key order, each with why.
    pub selected: Vec<(Service, Reason)>,
    /// Changed paths that select no service, in the order they came.
    pub unselected: Vec<String>,
}

/// A rules file that could not be used; the message points at the bad rule.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("cannot read rules file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("rules file is not valid TOML: {0}")]
    Toml(String),
    #[error("{rule}: {problem}")]
    Rule { rule: String, problem: String },
    #[error("{0}")]
    Dependencies(#[from] DependencyError),
}

/// The rules file format (`IAC_RULES`).
///
/// ```toml
/// never = ["bootstrap/**"]
/// all = ["libs/**"]
///
/// [[service]]
/// dir = "platform/*"          # a directory matching this, holding deploy.py, is a service
/// key = "platform/{name}"     # {name}: the directory's last component without its "NN." prefix
/// task = "{name}.sync"        # {dir}: that last component as it is
///
/// [services."platform/alerting"]  # declared dependencies, as in DEPENDENCIES_FILE
/// depends_on = ["libs/**"]
/// after = ["platform/postgres"]
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    never: Vec<String>,
    #[serde(default)]
    all: Vec<String>,
    #[serde(default)]
    service: Vec<ServiceRuleFile>,
    services: Option<BTreeMap<String, Declared>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceRuleFile {
    dir: String,
    key: String,
    task: String,
}

#[derive(Debug, Clone)]
struct ServiceRule {
    dir: DirPattern,
    depth: usize,
    key: String,
    task: String,
}

/// The `dir` pattern of a service rule. The usual `parent/*` (no wildcard in `parent`) is a
/// prefix test plus "no further `/`", which matches what the glob matches at a fraction of
/// the cost; any other pattern is a compiled glob.
#[derive(Debug, Clone)]
enum DirPattern {
    /// `parent/` of a `parent/*` pattern.
    Children(String),
    Glob(GlobMatcher),
}

impl DirPattern {
    fn new(rule: &str, pattern: &str) -> Result<DirPattern, RulesError> {
        let glob = glob(rule, pattern)?;
        Ok(match literal_dir(pattern, "*") {
            Some(parent) => DirPattern::Children(parent.to_string()),
            None => DirPattern::Glob(glob.compile_matcher()),
        })
    }

    fn is_match(&self, dir: &str) -> bool {
        match self {
            DirPattern::Children(parent) => dir
                .strip_prefix(parent.as_str())
                .is_some_and(|child| !child.contains('/')),
            DirPattern::Glob(matcher) => matcher.is_match(dir),
        }
    }
}

/// Path-to-service rules, compiled once.
#[derive(Debug, Clone)]
pub struct Rules {
    never: PathSet,
    all: PathSet,
    services: Vec<ServiceRule>,
    /// The `services` table, when the file has one.
    dependencies: Option<Dependencies>,
}

/// A set of glob patterns. Patterns of the form `dir/**` (no wildcard in `dir`, like the
/// default `libs/**` and `bootstrap/**`) are kept as plain prefix tests, which match the same
/// paths as the glob and cost a fraction of it; the other patterns go through a [`GlobSet`].
#[derive(Debug, Clone)]
struct PathSet {
    /// `dir/` of every `dir/**` pattern.
    prefixes: Vec<String>,
    /// The other patterns; `None` when there are none.
    globs: Option<GlobSet>,
}

impl PathSet {
    fn new(rule: &str, patterns: &[String]) -> Result<PathSet, RulesError> {
        let mut prefixes = Vec::new();
        let mut others = Vec::new();
        for pattern in patterns {
            glob(rule, pattern)?;
            match literal_dir(pattern, "**") {
                Some(dir) => prefixes.push(dir.to_string()),
                None => others.push(pattern.clone()),
            }
        }
        let globs = if others.is_empty() {
            None
        } else {
            Some(glob_set(rule, &others)?)
        };
        Ok(PathSet { prefixes, globs })
    }

    fn is_match(&self, path: &str) -> bool {
        self.prefixes
            .iter()
            .any(|prefix| path.starts_with(prefix.as_str()))
            || self
                .globs
                .as_ref()
                .is_some_and(|globs| globs.is_match(path))
    }
}

/// Characters with a meaning in a glob; a pattern without them is literal text.
const GLOB_SYNTAX: &[char] = &['*', '?', '[', ']', '{', '}', '\\'];

/// `dir/` when `pattern` is `dir/` followed by `wildcard` and `dir` is literal text.
fn literal_dir<'p>(pattern: &'p str, wildcard: &str) -> Option<&'p str> {
    pattern
        .strip_suffix(wildcard)
        .filter(|dir| dir.ends_with('/') && !dir.contains(GLOB_SYNTAX))
}

const DEFAULT_RULES: &str = r#"
never = ["bootstrap/**"]
all = ["libs/**"]

[[service]]
dir = "platform/*"
key = "platform/{name}"
task = "{name}.sync"

[[service]]
dir = "finance_report/finance_report/*"
key = "finance_report/{name}"
task = "fr-{name}.sync"
"#;

impl Default for Rules {
    fn default() -> Self {
        Rules::from_toml(DEFAULT_RULES).expect("the default rules are valid")
    }
}

impl Rules {
    /// Reads a rules file.
    pub fn load(path: &Path) -> Result<Self, RulesError> {
        let text = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Rules::from_toml(&text)
    }

    /// The rules of `IAC_RULES`: the file when one is named, else the built-in table.
    pub fn load_or_default(path: Option<&Path>) -> Result<Self, RulesError> {
        match path {
            Some(path) => Rules::load(path),
            None => Ok(Rules::default()),
        }
    }

    /// Parses and validates rules; an error names the rule and what is wrong with it.
    pub fn from_toml(text: &str) -> Result<Self, RulesError> {
        let file: RulesFile = toml::from_str(text).map_err(|e| RulesError::Toml(e.to_string()))?;
        let never = PathSet::new("never", &file.never)?;
        let all = PathSet::new("all", &file.all)?;
        let services = file
            .service
            .iter()
            .enumerate()
            .map(|(i, rule)| service_rule(&format!("service[{i}] (dir = {:?})", rule.dir), rule))
            .collect::<Result<Vec<_>, _>>()?;
        if services.is_empty() {
            return Err(RulesError::Rule {
                rule: "service".into(),
                problem: "at least one [[service]] rule is needed".into(),
            });
        }
        let dependencies = file.services.map(Dependencies::new).transpose()?;
        Ok(Rules {
            never,
            all,
            services,
            dependencies,
        })
    }

    /// The dependencies declared in the rules file (its `services` table), if it has any.
    pub fn dependencies(&self) -> Option<&Dependencies> {
        self.dependencies.as_ref()
    }

    /// The effect of one changed path. `never` wins over `all`, which wins over services.
    pub fn classify(&self, path: &str) -> Effect {
        if self.never.is_match(path) {
            return Effect::Never;
        }
        if self.all.is_match(path) {
            return Effect::All;
        }
        self.own_service(path)
            .map_or(Effect::Nothing, Effect::Service)
    }

    /// The service whose directory holds `path`, by the service rules alone.
    fn own_service(&self, path: &str) -> Option<String> {
        self.services.iter().find_map(|rule| {
            // The service directory is the path's first `depth` components; a file directly at
            // that depth (no directory below it) is not inside a service.
            let end = nth_slash(path, rule.depth)?;
            rule.key(&path[..end])
        })
    }

    /// The discovered services changed `paths` select, each with why, and the paths that
    /// select nothing.
    ///
    /// A path selects the service whose directory holds it and every service declaring a
    /// glob it matches. A path of the `all` rule selects every service without declarations
    /// (`deps` is `None`), and only the services declaring it with them. `never` paths
    /// select nothing. A service selected for several reasons keeps the strongest: its own
    /// change, then a declared dependency, then `all`, each naming the first such path.
    pub fn fan_out<'a>(
        &self,
        paths: impl IntoIterator<Item = &'a str>,
        discovered: &[Service],
        deps: Option<&Dependencies>,
    ) -> FanOut {
        let known: BTreeSet<&str> = discovered.iter().map(|s| s.key.as_str()).collect();
        let mut reasons: BTreeMap<String, Reason> = BTreeMap::new();
        let mut select = |key: &str, reason: Reason| {
            let kept = match reasons.remove(key) {
                Some(old) => old.strongest(reason),
                None => reason,
            };
            reasons.insert(key.to_string(), kept);
        };
        let mut all: Option<&str> = None;
        let mut unselected = Vec::new();
        for path in paths {
            if self.never.is_match(path) {
                unselected.push(path.to_string());
                continue;
            }
            let mut selected = false;
            if self.all.is_match(path) {
                if deps.is_none() {
                    all.get_or_insert(path);
                    selected = true;
                }
            } else if let Some(key) = self.own_service(path)
                && known.contains(key.as_str())
            {
                select(&key, Reason::Changed(path.to_string()));
                selected = true;
            }
            for (key, pattern) in deps.into_iter().flat_map(|deps| deps.dependents(path)) {
                if known.contains(key) {
                    let reason = Reason::DependsOn {
                        pattern: pattern.to_string(),
                        path: path.to_string(),
                    };
                    select(key, reason);
                    selected = true;
                }
            }
            if !selected {
                unselected.push(path.to_string());
            }
        }
        if let Some(path) = all {
            for service in discovered {
                select(&service.key, Reason::All(Some(format!("changed {path}"))));
            }
        }
        FanOut {
            selected: discovered
                .iter()
                .filter_map(|s| Some((s.clone(), reasons.remove(&s.key)?)))
                .collect(),
            unselected,
        }
    }

    /// Maps changed paths to services.
    ///
    /// Many paths share a service directory, so each directory is matched against the rules
    /// once (and a run of paths in the same directory, the usual order, costs one comparison
    /// each); the `never` and `all` sets are checked per path.
    pub fn map_paths<'a>(&self, paths: impl IntoIterator<Item = &'a str>) -> Mapping {
        let mut mapping = Mapping::default();
        let mut known: FoldHashMap<(usize, &'a str), bool> = FoldHashMap::default();
        // Per rule: the directory of the previous path and whether it is a service.
        let mut last: Vec<Option<(&'a str, bool)>> = vec![None; self.services.len()];
        for path in paths {
            if self.never.is_match(path) {
                continue;
            }
            if self.all.is_match(path) {
                mapping.all = true;
                continue;
            }
            for (i, rule) in self.services.iter().enumerate() {
                // Most paths of a push share the previous path's directory: `dir/` starting
                // the path is cheaper to test than finding the path's own directory.
                if let Some((previous, is_service)) = last[i]
                    && path.as_bytes().get(previous.len()) == Some(&b'/')
                    && path.starts_with(previous)
                {
                    if is_service {
                        break;
                    }
                    continue;
                }
                let Some(end) = nth_slash(path, rule.depth) else {
                    continue;
                };
                let dir = &path[..end];
                let is_service = match last[i] {
                    Some((previous, is_service)) if previous == dir => is_service,
                    _ => {
                        let is_service = *known.entry((i, dir)).or_insert_with(|| {
                            rule.key(dir)
                                .map(|key| mapping.services.insert(key))
                                .is_some()
                        });
                        last[i] = Some((dir, is_service));
                        is_service
                    }
                };
                if is_service {
                    break;
                }
            }
        }
        mapping
    }

    /// The service a directory is, if a service rule matches it exactly.
    pub fn service_for_dir(&self, dir: &str) -> Option<Service> {
        if self.never.is_match(dir) {
            return None;
        }
        self.services.iter().find_map(|rule| {
            (dir.split('/').count() == rule.depth)
                .then(|| rule.service(dir))
                .flatten()
        })
    }

    /// Services among repository files: each `<dir>/deploy.py` whose `<dir>` is a service.
    ///
    /// Sorted by key; when two directories give the same key the first in path order wins.
    /// A service that must not run is still found, with [`Service::refused`] saying why, so
    /// that its result tells the user.
    pub fn discover<'a>(&self, files: impl IntoIterator<Item = &'a str>) -> Vec<Service> {
        let mut by_key: BTreeMap<String, Service> = BTreeMap::new();
        let mut dirs: Vec<&str> = files
            .into_iter()
            .filter_map(|f| f.strip_suffix("/deploy.py"))
            .collect();
        dirs.sort_unstable();
        let never_tasks = self.never_tasks(&dirs);
        for dir in dirs {
            if let Some(mut service) = self.service_for_dir(dir) {
                service.refused = refusal(&service, &never_tasks);
                by_key.entry(service.key.clone()).or_insert(service);
            }
        }
        by_key.into_values().collect()
    }

    /// The task names each directory under a `never` path could answer to, with the first
    /// such directory: what a service rule of the same depth would call its task.
    ///
    /// The rules do not say how the repository names the tasks of those directories (the
    /// example's `tasks.py` gives `bootstrap/01.vault` the task `vault.sync`, as if it were
    /// under `platform/`), so every name a rule could give is taken to be theirs: a service
    /// with one of them could run a directory that must only ever run by hand.
    fn never_tasks<'a>(&self, dirs: &[&'a str]) -> BTreeMap<String, &'a str> {
        let mut tasks = BTreeMap::new();
        for &dir in dirs.iter().filter(|dir| self.never.is_match(dir)) {
            let Some((name, last)) = names(dir) else {
                continue;
            };
            let depth = dir.split('/').count();
            for rule in self.services.iter().filter(|rule| rule.depth == depth) {
                tasks.entry(fill(&rule.task, name, last)).or_insert(dir);
            }
        }
        tasks
    }
}

/// Why `service` must not run, if it must not. `never_tasks` comes from
/// [`Rules::never_tasks`].
fn refusal(service: &Service, never_tasks: &BTreeMap<String, &str>) -> Option<String> {
    let (name, last) = names(&service.dir)?;
    if last.starts_with('-') || name.starts_with('-') || service.task.starts_with('-') {
        return Some(format!(
            "refused: the service directory {} starts with '-', which a command would read \
             as an option; rename the directory",
            service.dir
        ));
    }
    let never = never_tasks.get(&service.task)?;
    Some(format!(
        "refused: the task {} of {} is also the task of {never}, which is never synced \
         automatically; rename one of the two directories",
        service.task, service.dir
    ))
}

impl ServiceRule {
    /// The service key of `dir`, when this rule makes it a service.
    fn key(&self, dir: &str) -> Option<String> {
        if !self.dir.is_match(dir) {
            return None;
        }
        let (name, last) = names(dir)?;
        let key = fill(&self.key, name, last);
        is_valid_service_key(&key).then_some(key)
    }

    fn service(&self, dir: &str) -> Option<Service> {
        let key = self.key(dir)?;
        let (name, last) = names(dir)?;
        Some(Service {
            key,
            task: fill(&self.task, name, last),
            dir: dir.to_string(),
            refused: None,
        })
    }
}

/// (`{name}`, `{dir}`) of a service directory: its last component without and with the
/// `NN.` prefix; none when the name would be empty.
fn names(dir: &str) -> Option<(&str, &str)> {
    let last = dir.rsplit('/').next().unwrap_or(dir);
    let name = strip_order_prefix(last);
    (!name.is_empty()).then_some((name, last))
}

/// `01.postgres` → `postgres`; names without a numeric prefix are kept.
fn strip_order_prefix(dir: &str) -> &str {
    match dir.split_once('.') {
        Some((prefix, rest))
            if !prefix.is_empty() && prefix.bytes().all(|b| b.is_ascii_digit()) =>
        {
            rest
        }
        _ => dir,
    }
}

/// `template` with `{name}` and `{dir}` replaced (in one pass: a name holding `{dir}` stays).
fn fill(template: &str, name: &str, dir: &str) -> String {
    let mut out = String::with_capacity(template.len() + dir.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        if let Some(after) = tail.strip_prefix("{name}") {
            out.push_str(name);
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{dir}") {
            out.push_str(dir);
            rest = after;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Byte index of the `n`-th `/` in `path` (1-based).
fn nth_slash(path: &str, n: usize) -> Option<usize> {
    memchr::memchr_iter(b'/', path.as_bytes()).nth(n - 1)
}

fn glob(rule: &str, pattern: &str) -> Result<Glob, RulesError> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map_err(|e| RulesError::Rule {
            rule: rule.to_string(),
            problem: format!("bad pattern {pattern:?}: {e}"),
        })
}

fn glob_set(rule: &str, patterns: &[String]) -> Result<GlobSet, RulesError> {
    let mut builder = GlobSetBuilder::new();
    for pattern in patterns {
        builder.add(glob(rule, pattern)?);
    }
    builder.build().map_err(|e| RulesError::Rule {
        rule: rule.to_string(),
        problem: e.to_string(),
    })
}

fn service_rule(name: &str, rule: &ServiceRuleFile) -> Result<ServiceRule, RulesError> {
    let problem = |problem: String| RulesError::Rule {
        rule: name.to_string(),
        problem,
    };
    if rule.dir.contains("**") {
        return Err(problem(
            "dir must name directories at one depth: use '*', not '**'".into(),
        ));
    }
    if rule.dir.starts_with('/') || rule.dir.ends_with('/') || rule.dir.is_empty() {
        return Err(problem(
            "dir must be a relative path without a trailing '/'".into(),
        ));
    }
    for (field, template) in [("key", &rule.key), ("task", &rule.task)] {
        if !template.contains("{name}") && !template.contains("{dir}") {
            return Err(problem(format!(
                "{field} {template:?} must contain {{name}} or {{dir}}"
            )));
        }
    }
    if !is_valid_service_key(&fill(&rule.key, "name", "01.name")) {
        return Err(problem(format!(
            "key {:?} must give layer/name keys (one '/', letters, digits, '-', '_', '.')",
            rule.key
        )));
    }
    Ok(ServiceRule {
        dir: DirPattern::new(name, &rule.dir)?,
        depth: rule.dir.split('/').count(),
        key: rule.key.clone(),
        task: rule.task.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(mapping: &Mapping) -> Vec<String> {
        mapping.preview()
    }

    #[test]
    fn the_original_table_is_the_default() {
        let rules = Rules::default();
        assert_eq!(
            rules.classify("platform/01.postgres/compose.yaml"),
            Effect::Service("platform/postgres".into())
        );
        assert_eq!(
            rules.classify("finance_report/finance_report/10.app/deploy.py"),
            Effect::Service("finance_report/app".into())
        );
        assert_eq!(rules.classify("libs/common/deploy_utils.py"), Effect::All);
        assert_eq!(
            rules.classify("bootstrap/01.vault/compose.yaml"),
            Effect::Never
        );
        assert_eq!(rules.classify("README.md"), Effect::Nothing);
        assert_eq!(rules.classify("platform/README.md"), Effect::Nothing);
        assert_eq!(rules.classify("finance_report/README.md"), Effect::Nothing);
    }

    #[test]
    fn paths_map_to_a_sorted_preview_with_all_first() {
        let rules = Rules::default();
        let mapping = rules.map_paths([
            "platform/02.redis/compose.yaml",
            "platform/01.postgres/deploy.py",
            "platform/01.postgres/compose.yaml",
            "docs/x.md",
        ]);
        assert_eq!(keys(&mapping), ["platform/postgres", "platform/redis"]);
        let mapping = rules.map_paths(["libs/x.py", "platform/01.postgres/a"]);
        assert_eq!(keys(&mapping), ["__all__", "platform/postgres"]);
        assert!(rules.map_paths(["bootstrap/01.vault/deploy.py"]).is_empty());
    }

    #[test]
    fn discovery_finds_services_by_deploy_py_and_skips_bootstrap() {
        let rules = Rules::default();
        let found = rules.discover([
            "platform/01.postgres/deploy.py",
            "platform/01.postgres/compose.yaml",
            "platform/02.redis/deploy.py",
            "platform/03.nodeploy/compose.yaml",
            "finance_report/finance_report/10.app/deploy.py",
            "bootstrap/01.vault/deploy.py",
            "platform/01.postgres/sub/deploy.py",
            "libs/deploy.py",
        ]);
        let tasks: Vec<(&str, &str)> = found
            .iter()
            .map(|s| (s.key.as_str(), s.task.as_str()))
            .collect();
        assert_eq!(
            tasks,
            [
                ("finance_report/app", "fr-app.sync"),
                ("platform/postgres", "postgres.sync"),
                ("platform/redis", "redis.sync"),
            ]
        );
        assert_eq!(found[1].dir, "platform/01.postgres");
    }

    #[test]
    fn a_service_sharing_its_task_with_a_bootstrap_directory_is_refused_naming_both() {
        let found = Rules::default().discover([
            "platform/50.vault/deploy.py",
            "platform/01.postgres/deploy.py",
            "finance_report/finance_report/10.vault/deploy.py",
            "bootstrap/01.vault/deploy.py",
            "bootstrap/01.vault/sub/postgres/deploy.py",
        ]);
        let refused: Vec<(&str, Option<&str>)> = found
            .iter()
            .map(|s| (s.key.as_str(), s.refused.as_deref()))
            .collect();
        assert_eq!(refused[0], ("finance_report/vault", None));
        assert_eq!(refused[1], ("platform/postgres", None));
        let (key, reason) = refused[2];
        assert_eq!(key, "platform/vault");
        let reason = reason.expect("platform/vault is refused");
        assert!(
            reason.contains("vault.sync")
                && reason.contains("platform/50.vault")
                && reason.contains("bootstrap/01.vault"),
            "{reason}"
        );
    }

    #[test]
    fn a_service_directory_starting_with_a_dash_is_refused() {
        let found =
            Rules::default().discover(["platform/-rf/deploy.py", "platform/01.--list/deploy.py"]);
        assert_eq!(found.len(), 2);
        for service in &found {
            let reason = service.refused.as_deref().unwrap_or_default();
            assert!(
                reason.contains(&service.dir) && reason.contains("'-'"),
                "{service:?}"
            );
        }
    }

    #[test]
    fn a_package_file_at_a_layer_root_is_not_a_service() {
        let rules = Rules::default();
        assert_eq!(rules.classify("platform/__init__.py"), Effect::Nothing);
        assert!(rules.map_paths(["platform/__init__.py"]).is_empty());
        assert!(
            rules
                .discover(["platform/__init__.py", "platform/deploy.py"])
                .is_empty()
        );
    }

    #[test]
    fn a_rules_file_replaces_the_defaults() {
        let rules = Rules::from_toml(
            r#"
            never = ["infra/secret/**"]
            all = ["shared/**"]
            [[service]]
            dir = "apps/*"
            key = "apps/{dir}"
            task = "deploy-{name}"
            "#,
        )
        .unwrap();
        assert_eq!(
            rules.classify("apps/web/x"),
            Effect::Service("apps/web".into())
        );
        assert_eq!(rules.classify("shared/a"), Effect::All);
        assert_eq!(rules.classify("libs/a"), Effect::Nothing);
        assert_eq!(
            rules.service_for_dir("apps/web").unwrap().task,
            "deploy-web"
        );
    }

    #[test]
    fn bad_rules_are_reported_with_the_rule_that_is_wrong() {
        let cases = [
            (
                "[[service]]\ndir = \"a/**\"\nkey = \"a/{name}\"\ntask = \"{name}\"",
                "service[0]",
            ),
            (
                "[[service]]\ndir = \"a/*\"\nkey = \"a/fixed\"\ntask = \"{name}\"",
                "must contain",
            ),
            (
                "[[service]]\ndir = \"a/*\"\nkey = \"{name}\"\ntask = \"{name}\"",
                "layer/name",
            ),
            (
                "never = [\"a/[\"]\n[[service]]\ndir = \"a/*\"\nkey = \"a/{name}\"\ntask = \"t\"",
                "never",
            ),
            (
                "[[service]]\ndir = \"a/*\"\nkey = \"a/{name}\"\ntask = \"{name}\"\ntypo = 1",
                "typo",
            ),
            ("never = []", "at least one"),
            ("not toml [", "TOML"),
        ];
        for (text, expected) in cases {
            let err = Rules::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn selecting_all_takes_every_discovered_service() {
        let rules = Rules::default();
        let found = rules.discover(["platform/01.a/deploy.py", "platform/02.b/deploy.py"]);
        let mapping = rules.map_paths(["libs/x"]);
        assert_eq!(mapping.select(&found).len(), 2);
        let mapping = rules.map_paths(["platform/02.b/x", "platform/09.gone/x"]);
        let selected: Vec<&str> = mapping
            .select(&found)
            .iter()
            .map(|s| s.key.as_str())
            .collect();
        assert_eq!(selected, ["platform/b"]);
    }

    fn fan_out_of(
        rules: &Rules,
        paths: &[&str],
        deps: Option<&Dependencies>,
    ) -> (Vec<(String, String)>, Vec<String>) {
        let found = rules.discover([
            "platform/01.postgres/deploy.py",
            "platform/02.redis/deploy.py",
            "platform/09.alerting/deploy.py",
        ]);
        let fan_out = rules.fan_out(paths.iter().copied(), &found, deps);
        let selected = fan_out
            .selected
            .iter()
            .map(|(s, reason)| (s.key.clone(), reason.to_string()))
            .collect();
        (selected, fan_out.unselected)
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected
            .iter()
            .map(|(k, r)| (k.to_string(), r.to_string()))
            .collect()
    }

    #[test]
    fn without_declarations_libs_select_every_service_saying_why() {
        let (selected, unselected) = fan_out_of(
            &Rules::default(),
            &[
                "docs/x.md",
                "libs/common.py",
                "platform/01.postgres/compose.yaml",
                "bootstrap/01.vault/x",
            ],
            None,
        );
        assert_eq!(
            selected,
            pairs(&[
                ("platform/alerting", "all (changed libs/common.py)"),
                (
                    "platform/postgres",
                    "changed platform/01.postgres/compose.yaml"
                ),
                ("platform/redis", "all (changed libs/common.py)"),
            ])
        );
        assert_eq!(unselected, ["docs/x.md", "bootstrap/01.vault/x"]);
    }

    #[test]
    fn with_declarations_libs_select_only_the_services_declaring_them() {
        let deps = Dependencies::from_yaml(
            "version: 1\nservices:\n  platform/alerting:\n    depends_on: [libs/**, 'platform/*/deploy.py']\n",
        )
        .unwrap();
        let (selected, unselected) = fan_out_of(
            &Rules::default(),
            &["libs/common.py", "libs/other.py", "tools/x.sh"],
            Some(&deps),
        );
        assert_eq!(
            selected,
            pairs(&[("platform/alerting", "depends on libs/** via libs/common.py")])
        );
        assert_eq!(unselected, ["tools/x.sh"]);

        // Its own change is the stronger reason; the other service's deploy.py reaches it too.
        let (selected, _) = fan_out_of(
            &Rules::default(),
            &[
                "platform/01.postgres/deploy.py",
                "platform/09.alerting/deploy.py",
            ],
            Some(&deps),
        );
        assert_eq!(
            selected,
            pairs(&[
                (
                    "platform/alerting",
                    "changed platform/09.alerting/deploy.py"
                ),
                (
                    "platform/postgres",
                    "changed platform/01.postgres/deploy.py"
                ),
            ])
        );

        // Nobody declares libs: a libs change selects nothing and is said to.
        let (selected, unselected) = fan_out_of(
            &Rules::default(),
            &["libs/common.py"],
            Some(&Dependencies::default()),
        );
        assert!(selected.is_empty());
        assert_eq!(unselected, ["libs/common.py"]);
    }

    #[test]
    fn a_rules_file_may_declare_dependencies_and_the_preview_is_unchanged() {
        let rules = Rules::from_toml(
            r#"
            all = ["libs/**"]
            [[service]]
            dir = "platform/*"
            key = "platform/{name}"
            task = "{name}.sync"
            [services."platform/alerting"]
            depends_on = ["libs/**"]
            after = ["platform/postgres"]
            [services."platform/redis"]
            "#,
        )
        .unwrap();
        let deps = rules.dependencies().expect("declared");
        assert_eq!(deps.after("platform/alerting"), ["platform/postgres"]);
        assert_eq!(keys(&rules.map_paths(["libs/x.py"])), ["__all__"]);
        assert!(Rules::default().dependencies().is_none());

        let err = Rules::from_toml(
            "[[service]]\ndir = \"a/*\"\nkey = \"a/{name}\"\ntask = \"t{name}\"\n[services.\"a/b\"]\nafter = [\"a/b\"]",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cycle: a/b → a/b"), "{err}");
    }

    proptest::proptest! {
        /// Mapping many paths at once (with its per-directory cache) gives what classifying
        /// each path on its own gives.
        #[test]
        fn mapping_paths_together_agrees_with_classifying_each(
            paths in proptest::collection::vec(
                "(platform|finance_report/finance_report|bootstrap|libs|docs)(/[0-9]{0,2}\\.?[a-z.]{0,6}){0,3}",
                0..40,
            )
        ) {
            let rules = Rules::default();
            let together = rules.map_paths(paths.iter().map(String::as_str));
            let mut each = Mapping::default();
            for path in &paths {
                match rules.classify(path) {
                    Effect::Service(key) => { each.services.insert(key); }
                    Effect::All => each.all = true,
                    Effect::Never | Effect::Nothing => {}
                }
            }
            proptest::prop_assert_eq!(together, each);
        }

        /// The shortcut for `parent/*` service directories matches exactly what the glob matches.
        #[test]
        fn child_patterns_match_what_their_globs_match(
            parent in "[a-z_.-]{0,3}(/[a-z.]{0,3}){0,2}/",
            dirs in proptest::collection::vec("[a-z./]{0,6}|/|\\.\\.|\\n", 1..6),
            noise in ".{0,12}",
        ) {
            let pattern = format!("{parent}*");
            let fast = DirPattern::new("test", &pattern).unwrap();
            proptest::prop_assert!(matches!(fast, DirPattern::Children(_)));
            let slow = glob("test", &pattern).unwrap().compile_matcher();
            let mut candidates: Vec<String> = dirs.iter().map(|d| format!("{parent}{d}")).collect();
            candidates.extend([parent.clone(), parent.trim_end_matches('/').to_string(), noise]);
            for dir in &candidates {
                proptest::prop_assert_eq!(fast.is_match(dir), slow.is_match(dir), "{:?} against {:?}", dir, pattern);
            }
        }

        /// The prefix shortcut for `dir/**` patterns matches exactly what the glob matches.
        #[test]
        fn prefix_patterns_match_what_their_globs_match(
            dirs in proptest::collection::vec("[a-z_./-]{0,3}(/[a-z.]{0,3}){0,2}/", 1..3),
            others in proptest::collection::vec("[a-z]{1,3}/\\*\\.md|\\*\\*/x", 0..2),
            tails in proptest::collection::vec("[a-z./]{0,6}|/|\\.\\.|\\n", 1..6),
            noise in ".{0,12}",
        ) {
            let patterns: Vec<String> = dirs
                .iter()
                .map(|dir| format!("{dir}**"))
                .chain(others)
                .collect();
            let fast = PathSet::new("test", &patterns).unwrap();
            let slow = glob_set("test", &patterns).unwrap();
            let mut paths: Vec<String> = dirs
                .iter()
                .flat_map(|dir| {
                    let mut candidates = vec![dir.clone(), dir.trim_end_matches('/').to_string()];
                    candidates.extend(tails.iter().map(|tail| format!("{dir}{tail}")));
                    candidates
                })
                .collect();
            paths.push(noise);
            for path in &paths {
                proptest::prop_assert_eq!(
                    fast.is_match(path),
                    slow.is_match(path),
                    "{:?} against {:?}",
                    path,
                    patterns
                );
            }
        }
    }
}
