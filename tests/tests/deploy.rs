//! What can be checked of `deploy/` without a container engine: the compose files parse and
//! give each service only its own secrets, the images' entrypoints are binaries this workspace
//! builds, and the cluster configuration forms a real three-node JetStream cluster that keeps
//! the users of the single server and takes only authenticated routes; the operator commands
//! `deploy/README.md` gives are ones the binaries take.

use std::time::Duration;

use async_nats::jetstream;
use iac_shared::names::EVENTS_STREAM;
use iac_shared::nats::{ConsumerSettings, StreamSettings, events_stream_config, provision_all};
use iac_tests::nats::{CLUSTER_USERS, NatsCluster};
use iac_tests::tools::{project_binary, workspace_root};
use iac_tests::wait_for;
use serde_yaml::Value;

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(workspace_root().join(path)).expect(path);
    let mut value: Value =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path} is not valid YAML: {e}"));
    // Once per level of nesting: a merged anchor may itself merge another, as Compose allows.
    for _ in 0..3 {
        value.apply_merge().expect("YAML merge keys resolve");
    }
    value
}

fn env_names(service: &Value) -> Vec<String> {
    service["environment"]
        .as_mapping()
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn compose_runs_nats_and_the_three_services_each_with_only_its_own_secrets() {
    let compose = yaml("deploy/compose.yaml");
    let services = compose["services"].as_mapping().expect("services");
    let names: Vec<&str> = services.keys().filter_map(|k| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "nats",
            "provision",
            "gateway",
            "worker",
            "reporter",
            "nats-box"
        ]
    );

    let gateway = env_names(&compose["services"]["gateway"]);
    let worker = env_names(&compose["services"]["worker"]);
    let reporter = env_names(&compose["services"]["reporter"]);
    assert!(gateway.contains(&"WEBHOOK_SECRET".into()));
    assert!(worker.contains(&"GIT_REPO_URL".into()));
    assert!(reporter.contains(&"GITHUB_TOKEN".into()));
    for (service, env, forbidden) in [
        ("gateway", &gateway, ["GITHUB_TOKEN", "GIT_REPO_URL"]),
        ("worker", &worker, ["GITHUB_TOKEN", "WEBHOOK_SECRET"]),
        ("reporter", &reporter, ["WEBHOOK_SECRET", "GIT_REPO_URL"]),
    ] {
        for secret in forbidden {
            assert!(
                !env.contains(&secret.to_string()),
                "{service} gets {secret}"
            );
        }
    }
}

#[test]
fn compose_keeps_the_original_traefik_route_and_healthchecks() {
    let compose = yaml("deploy/compose.yaml");
    let labels: Vec<String> = compose["services"]["gateway"]["labels"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect();
    assert!(
        labels
            .iter()
            .any(|l| l.contains("Host(`iac.${INTERNAL_DOMAIN}`)"))
    );
    assert!(labels.iter().any(|l| l.ends_with("server.port=8080")));
    for service in ["gateway", "worker", "reporter"] {
        let test = format!("{:?}", compose["services"][service]["healthcheck"]["test"]);
        let expected = if service == "gateway" {
            "/health"
        } else {
            "/ready"
        };
        assert!(test.contains(expected), "{service} healthcheck: {test}");
        assert!(compose["services"][service]["restart"].as_str().is_some());
    }
    let volume = format!("{:?}", compose["services"]["nats"]["volumes"]);
    assert!(
        volume.contains("nats-data:/data"),
        "JetStream on a named volume: {volume}"
    );
}

#[test]
fn image_entrypoints_are_binaries_this_workspace_builds() {
    let dockerfile = std::fs::read_to_string(workspace_root().join("deploy/Dockerfile")).unwrap();
    let entrypoints: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("ENTRYPOINT [\"/usr/local/bin/"))
        .map(|rest| rest.trim_end_matches("\"]"))
        .collect();
    assert_eq!(entrypoints, ["iac-gateway", "iac-worker", "iac-reporter"]);
    for binary in entrypoints {
        let crate_dir = binary.trim_start_matches("iac-");
        let manifest =
            std::fs::read_to_string(workspace_root().join(crate_dir).join("Cargo.toml")).unwrap();
        assert!(
            manifest.contains(&format!("name = \"{binary}\"")),
            "{crate_dir}/Cargo.toml builds no {binary}"
        );
    }
    for base in dockerfile.lines().filter(|l| l.starts_with("FROM ")) {
        let image = base.split_whitespace().nth(1).unwrap();
        let pinned = image.contains(':') && !image.ends_with(":latest");
        assert!(
            pinned || !image.contains('/') && !image.contains(':') && image != "debian",
            "{base}"
        );
    }
    assert!(
        dockerfile.contains("USER iac"),
        "images run as a non-root user"
    );
    assert!(dockerfile.contains("invoke==3.0.3"));
}

/// The services of `deploy/compose.yaml` that run iac-runner or NATS.
const CONTAINERS: [&str; 6] = [
    "nats",
    "provision",
    "gateway",
    "worker",
    "reporter",
    "nats-box",
];

#[test]
fn every_container_runs_without_privileges_on_a_read_only_root_with_rotated_logs() {
    let compose = yaml("deploy/compose.yaml");
    for name in CONTAINERS {
        let service = &compose["services"][name];
        let security = format!("{:?}", service["security_opt"]);
        assert!(
            security.contains("no-new-privileges:true"),
            "{name}: {security}"
        );
        let caps: Vec<&str> = service["cap_drop"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{name} drops no capabilities"))
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(caps, ["ALL"], "{name}");
        assert_eq!(service["read_only"].as_bool(), Some(true), "{name}");
        let logging = &service["logging"];
        assert_eq!(logging["driver"].as_str(), Some("json-file"), "{name}");
        assert!(logging["options"]["max-size"].as_str().is_some(), "{name}");
        assert!(logging["options"]["max-file"].as_str().is_some(), "{name}");
    }
    let worker = &compose["services"]["worker"];
    assert_eq!(
        worker["init"].as_bool(),
        Some(true),
        "the worker reaps its tasks' children"
    );
    let tmpfs = format!("{:?}", worker["tmpfs"]);
    assert!(
        tmpfs.contains("/tmp"),
        "the worker has a writable /tmp: {tmpfs}"
    );
    let volumes = format!("{:?}", worker["volumes"]);
    assert!(volumes.contains("workspace:/workspace"), "{volumes}");
}

#[test]
fn traefik_routes_only_the_public_endpoints_never_metrics() {
    let compose = yaml("deploy/compose.yaml");
    let rule = compose["services"]["gateway"]["labels"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .find_map(|l| l.strip_prefix("traefik.http.routers.iac-runner.rule="))
        .expect("the iac-runner router has a rule");
    let paths = rule
        .strip_prefix("Host(`iac.${INTERNAL_DOMAIN}`) && (")
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("not a host with an allow-list of paths: {rule}"));
    let allowed: Vec<&str> = paths
        .split(" || ")
        .map(|p| {
            p.strip_prefix("Path(`")
                .and_then(|p| p.strip_suffix("`)"))
                .unwrap_or_else(|| panic!("not an exact path: {p}"))
        })
        .collect();
    assert_eq!(
        allowed,
        ["/webhook", "/sync", "/deploy", "/deploy/status", "/health"]
    );
}

/// `.dockerignore` patterns as Docker reads them: one per line, without comments, leading or
/// trailing slashes.
fn docker_ignored(path: &str, patterns: &[String]) -> bool {
    let mut ignored = false;
    for pattern in patterns {
        let (negated, pattern) = match pattern.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, pattern.as_str()),
        };
        let matches = match pattern.strip_prefix("**/") {
            Some(name) => path == name || path.ends_with(&format!("/{name}")),
            None => path == pattern,
        };
        if matches {
            ignored = !negated;
        }
    }
    ignored
}

#[test]
fn the_image_build_context_leaves_out_build_output_tools_git_and_secrets() {
    let text = std::fs::read_to_string(workspace_root().join(".dockerignore"))
        .expect("a .dockerignore beside Cargo.toml");
    let patterns: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_matches('/').to_string())
        .collect();
    for path in ["target", ".venv", ".git", "deploy/.env", "deploy/secrets"] {
        assert!(
            docker_ignored(path, &patterns),
            "{path} goes into the image build"
        );
    }
    for path in [
        "Cargo.toml",
        "Cargo.lock",
        "gateway",
        "shared",
        "tests",
        "deploy",
    ] {
        assert!(!docker_ignored(path, &patterns), "the build needs {path}");
    }
}

#[test]
fn deploy_readme_gives_each_operator_command_through_docker_compose_exec() {
    let readme = std::fs::read_to_string(workspace_root().join("deploy/README.md")).unwrap();
    let mut in_code = false;
    let mut commands = 0;
    for line in readme.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        let line = line.trim();
        if !in_code || !(line.contains("iac-worker ") || line.contains("iac-reporter ")) {
            continue;
        }
        if line.starts_with("docker build") || line.starts_with("FROM ") {
            continue;
        }
        commands += 1;
        let service = if line.contains("iac-worker ") {
            "worker"
        } else {
            "reporter"
        };
        let expected = format!("docker compose -f deploy/compose.yaml exec {service} iac-");
        assert!(
            line.starts_with(&expected),
            "not run in its container: {line}"
        );
        // The command as the binary reads it: a flag or value it does not take fails here, and
        // a trailing --help keeps it from connecting anywhere.
        let command = line.split('#').next().unwrap_or_default();
        let mut words = command
            .split_whitespace()
            .skip_while(|w| !w.starts_with("iac-"));
        let binary = words.next().expect("the binary");
        let args: Vec<&str> = words.collect();
        let parsed = std::process::Command::new(project_binary(binary))
            .args(&args)
            .arg("--help")
            .env_clear()
            .output()
            .expect("the binary runs");
        assert!(
            parsed.status.success(),
            "{binary} does not take {args:?}: {}",
            String::from_utf8_lossy(&parsed.stderr)
        );
    }
    assert!(
        commands >= 3,
        "deploy/README.md shows the status and replay commands"
    );
}

#[test]
fn compose_provisions_once_as_admin_before_the_services_start() {
    let compose = yaml("deploy/compose.yaml");
    let provision = &compose["services"]["provision"];
    assert_eq!(provision["command"][0].as_str(), Some("provision"));
    assert_eq!(
        provision["image"], compose["services"]["worker"]["image"],
        "provision runs the worker's image"
    );
    assert_eq!(
        provision["environment"]["NATS_USER"].as_str(),
        Some("admin")
    );
    assert_eq!(
        provision["environment"]["NATS_PASSWORD"].as_str(),
        Some("${NATS_ADMIN_PASSWORD}")
    );
    let nats_env = env_names(&compose["services"]["nats"]);
    assert!(nats_env.contains(&"NATS_ADMIN_PASSWORD".to_string()));
    for service in ["gateway", "worker", "reporter"] {
        let condition = &compose["services"][service]["depends_on"]["provision"]["condition"];
        assert_eq!(
            condition.as_str(),
            Some("service_completed_successfully"),
            "{service} starts before provisioning"
        );
        let env = format!("{:?}", compose["services"][service]["environment"]);
        assert!(
            !env.contains("NATS_ADMIN_PASSWORD"),
            "{service} gets the admin password"
        );
    }
}

#[tokio::test]
async fn the_cluster_configuration_forms_a_three_node_jetstream_cluster() {
    let cluster = NatsCluster::start();
    let js = jetstream::new(cluster.connect_as("admin").await);
    let settings = StreamSettings {
        replicas: 3,
        ..Default::default()
    };
    // The cluster elects a JetStream meta leader after the routes connect.
    wait_for("an R3 IAC_EVENTS stream", Duration::from_secs(30), || {
        let js = js.clone();
        let settings = settings.clone();
        async move {
            provision_all(&js, &settings, &ConsumerSettings::default())
                .await
                .ok()
        }
    })
    .await;
    let mut stream = js.get_stream(EVENTS_STREAM).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.num_replicas, 3);
    let cluster_info = info.cluster.clone().expect("cluster info");
    assert_eq!(cluster_info.replicas.len(), 2, "a leader and two replicas");
    assert!(cluster_info.leader.is_some());
}

#[tokio::test]
async fn the_cluster_keeps_the_users_and_their_limits_of_the_single_server() {
    let cluster = NatsCluster::start();
    let anonymous = async_nats::ConnectOptions::new()
        .max_reconnects(Some(1))
        .connect(cluster.node_url(0))
        .await;
    assert!(anonymous.is_err(), "a client without a user connected");
    assert_eq!(CLUSTER_USERS.len(), 4);
    let admin = jetstream::new(cluster.connect_as("admin").await);
    wait_for("the streams provisioned", Duration::from_secs(30), || {
        let admin = admin.clone();
        async move {
            provision_all(
                &admin,
                &StreamSettings::default(),
                &ConsumerSettings::default(),
            )
            .await
            .ok()
        }
    })
    .await;
    let mut gateway = jetstream::new(cluster.connect_as("gateway").await);
    gateway.set_timeout(Duration::from_secs(2));
    let mut shrunk = events_stream_config(&StreamSettings::default());
    shrunk.max_messages = 1;
    assert!(
        gateway.update_stream(&shrunk).await.is_err(),
        "the gateway updated a stream"
    );
    let mut events = admin.get_stream(EVENTS_STREAM).await.unwrap();
    assert_eq!(events.info().await.unwrap().config.max_messages, -1);
}

#[tokio::test]
async fn a_node_without_the_route_password_cannot_join_the_cluster() {
    let cluster = NatsCluster::start();
    wait_for("three nodes routed", Duration::from_secs(30), || async {
        let names = cluster.routed_names(0).await?;
        (names.len() >= 2).then_some(())
    })
    .await;
    let outsider = iac_tests::nats::NatsServer::start_with_config(Some(&format!(
        "server_name: outsider\ncluster {{\n  name: iac\n  listen: 127.0.0.1:-1\n  routes: [nats-route://{}]\n}}\n",
        cluster.cluster_listen(0)
    )));
    // Refused: the outsider says so, and the node it asked never lists it among its routes
    // (the route count alone moves while the three nodes settle their own routes).
    wait_for("the outsider refused", Duration::from_secs(10), || async {
        let log = outsider.log();
        (log.contains("Authorization Violation") || log.contains("authorization")).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let names = cluster
        .routed_names(0)
        .await
        .expect("node 0 answers /routez");
    assert!(
        !names.iter().any(|n| n == "outsider"),
        "a node without the route password was routed: {names:?}"
    );
    assert!(
        names.iter().any(|n| n == cluster.node_name(1)),
        "node 0 names its routes: {names:?}"
    );
}

#[test]
fn the_cluster_overlay_runs_three_nodes_and_points_the_services_at_all_of_them() {
    let compose = yaml("deploy/nats-cluster/compose.yaml");
    for node in ["nats-1", "nats-2", "nats-3"] {
        let env = &compose["services"][node]["environment"];
        assert_eq!(env["NATS_SERVER_NAME"].as_str(), Some(node));
        assert_eq!(
            env["NATS_ROUTE_3"].as_str(),
            Some("nats-route://route:${NATS_ROUTE_PASSWORD}@nats-3:6222")
        );
    }
    for service in ["gateway", "worker", "reporter"] {
        let env = &compose["services"][service]["environment"];
        assert_eq!(env["STREAM_REPLICAS"].as_str(), Some("3"));
        assert_eq!(env["NATS_URL"].as_str().unwrap().split(',').count(), 3);
    }
}

#[test]
fn the_nats_box_tool_runs_the_cli_as_admin_only_on_demand() {
    let compose = yaml("deploy/compose.yaml");
    let tools = &compose["services"]["nats-box"];
    let profiles = format!("{:?}", tools["profiles"]);
    assert!(
        profiles.contains("tools"),
        "started only on demand: {profiles}"
    );
    assert_eq!(tools["environment"]["NATS_USER"].as_str(), Some("admin"));
    assert_eq!(
        tools["environment"]["NATS_PASSWORD"].as_str(),
        Some("${NATS_ADMIN_PASSWORD}")
    );
    assert_eq!(
        tools["environment"]["NATS_URL"].as_str(),
        Some("nats://nats:4222")
    );
    let readme = std::fs::read_to_string(workspace_root().join("deploy/README.md")).unwrap();
    assert!(
        readme.contains("--profile tools run --rm nats-box"),
        "deploy/README.md runs the nats commands through it"
    );
}
