//! A real `nats-server` per test: JetStream on, a free port on loopback, a temporary store.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::{free_port, tools};

/// A running `nats-server`, killed when dropped.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: TempDir,
    extra_config: Option<String>,
    jetstream_options: String,
    env: Vec<(String, String)>,
}

impl NatsServer {
    /// Starts a server with JetStream on a free port and waits until it accepts connections.
    pub fn start() -> Self {
        Self::start_with_config(None)
    }

    /// Starts a server with extra configuration appended (accounts, users, `sync_interval`).
    pub fn start_with_config(extra_config: Option<&str>) -> Self {
        Self::start_with_config_and_env(extra_config, &[])
    }

    /// Like [`NatsServer::start_with_config`], with environment variables for the server
    /// (configuration files may refer to them as `$NAME`).
    pub fn start_with_config_and_env(extra_config: Option<&str>, env: &[(&str, &str)]) -> Self {
        let mut server = NatsServer {
            child: None,
            port: free_port(),
            store: tempfile::tempdir().expect("a temporary JetStream store"),
            extra_config: extra_config.map(str::to_string),
            jetstream_options: String::new(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        server.spawn();
        server
    }

    /// Starts a server with extra options inside its `jetstream { }` block
    /// (e.g. `sync_interval: always`).
    pub fn start_with_jetstream_options(options: &str) -> Self {
        let mut server = NatsServer {
            child: None,
            port: free_port(),
            store: tempfile::tempdir().expect("a temporary JetStream store"),
            extra_config: None,
            jetstream_options: options.to_string(),
            env: Vec::new(),
        };
        server.spawn();
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process id while it runs (for CPU and memory readings).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// Kills the server (SIGKILL), keeping its store.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// A connected client (for assertions and hand-published messages).
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .expect("connecting to the test nats-server")
    }

    fn config_path(&self) -> PathBuf {
        self.store.path().join("server.conf")
    }

    fn spawn(&mut self) {
        let store = self.store.path().join("jetstream");
        let config = format!(
            "listen: 127.0.0.1:{port}\nmax_payload: 1MB\njetstream {{\n  store_dir: {store:?}\n  {options}\n}}\n{extra}\n",
            port = self.port,
            store = store,
            options = self.jetstream_options,
            extra = self.extra_config.as_deref().unwrap_or("")
        );
        std::fs::write(self.config_path(), config).expect("writing nats-server config");
        let child = Command::new(tools::nats_server())
            .arg("-c")
            .arg(self.config_path())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nats-server");
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10));
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Blocks until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on port {port} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Three `nats-server` nodes on loopback, clustered with JetStream, each started from
/// `deploy/nats-cluster/node.conf` (the file users deploy) with its own ports and store.
pub struct NatsCluster {
    nodes: Vec<ClusterNode>,
    _store: TempDir,
}

struct ClusterNode {
    name: String,
    client_port: u16,
    monitor_port: u16,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl NatsCluster {
    /// Starts three nodes and waits until each accepts client connections.
    pub fn start() -> Self {
        let store = tempfile::tempdir().expect("a temporary store for the cluster");
        let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes: Vec<String> = cluster_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect();
        let nodes = (0..3)
            .map(|i| {
                let name = format!("nats-{}", i + 1);
                let client_port = free_port();
                let mut env = vec![
                    ("NATS_SERVER_NAME".to_string(), name.clone()),
                    (
                        "NATS_CLIENT_LISTEN".to_string(),
                        format!("127.0.0.1:{client_port}"),
                    ),
                    (
                        "NATS_CLUSTER_LISTEN".to_string(),
                        format!("127.0.0.1:{}", cluster_ports[i]),
                    ),
                    (
                        "NATS_STORE_DIR".to_string(),
                        store.path().join(&name).display().to_string(),
                    ),
                ];
                for (j, route) in routes.iter().enumerate() {
                    env.push((format!("NATS_ROUTE_{}", j + 1), route.clone()));
                }
                ClusterNode {
                    name,
                    client_port,
                    monitor_port: free_port(),
                    env,
                    child: None,
                }
            })
            .collect();
        let mut cluster = NatsCluster {
            nodes,
            _store: store,
        };
        for i in 0..3 {
            cluster.start_node(i);
        }
        cluster
    }

    /// `nats://…` of every node, comma-separated (the services' `NATS_URL`).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The client URL of node `i` alone.
    pub fn node_url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client_port)
    }

    pub fn node_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The node a client with this connection name is connected to (from each running node's
    /// monitoring endpoint `/connz`).
    pub async fn node_of_client(&self, client_name: &str) -> Option<usize> {
        for (i, node) in self.nodes.iter().enumerate() {
            if node.child.is_none() {
                continue;
            }
            let url = format!("http://127.0.0.1:{}/connz", node.monitor_port);
            let Ok(response) = crate::http().get(&url).send().await else {
                continue;
            };
            let Ok(connz) = response.json::<serde_json::Value>().await else {
                continue;
            };
            let connected = connz["connections"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["name"].as_str() == Some(client_name));
            if connected {
                return Some(i);
            }
        }
        None
    }

    /// Kills node `i` (SIGKILL), keeping its store.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `i` (again).
    pub fn start_node(&mut self, i: usize) {
        let config = crate::tools::workspace_root().join("deploy/nats-cluster/node.conf");
        let node = &mut self.nodes[i];
        let child = Command::new(crate::tools::nats_server())
            .arg("-c")
            .arg(&config)
            .arg("-m")
            .arg(node.monitor_port.to_string())
            .envs(node.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting a cluster node");
        node.child = Some(child);
        wait_for_port(node.client_port, Duration::from_secs(10));
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
    }
}
