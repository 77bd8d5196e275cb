//! A real `nats-server` per test: JetStream on, a port on loopback the server picks itself (so
//! no other test can take it between choosing and binding), a temporary store, and its log in a
//! file that is printed when the test fails.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::{free_port, tools};

/// How long a `nats-server` may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `nats-server`, killed when dropped.
pub struct NatsServer {
    child: Option<Child>,
    /// Picked by the server at its first start, then kept so clients reconnect after a restart.
    port: Option<u16>,
    store: TempDir,
    extra_config: Option<String>,
    jetstream_options: String,
    env: Vec<(String, String)>,
}

impl NatsServer {
    /// Starts a server with JetStream on a port of its choosing and waits until it accepts
    /// connections.
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
        Self::start_configured(
            extra_config.map(str::to_string),
            String::new(),
            env.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// Starts a server with extra options inside its `jetstream { }` block
    /// (e.g. `sync_interval: always`).
    pub fn start_with_jetstream_options(options: &str) -> Self {
        Self::start_configured(None, options.to_string(), Vec::new())
    }

    fn start_configured(
        extra_config: Option<String>,
        jetstream_options: String,
        env: Vec<(String, String)>,
    ) -> Self {
        let mut server = NatsServer {
            child: None,
            port: None,
            store: tempfile::tempdir().expect("a temporary JetStream store"),
            extra_config,
            jetstream_options,
            env,
        };
        server.spawn();
        server
    }

    pub fn port(&self) -> u16 {
        self.port
            .expect("the port is known once the server has started")
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port())
    }

    /// The server's process id while it runs (for CPU and memory readings).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// Everything the server logged, over all its starts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
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

    fn log_path(&self) -> PathBuf {
        self.store.path().join("nats-server.log")
    }

    fn spawn(&mut self) {
        let store = self.store.path().join("jetstream");
        // -1: the server binds a free port itself and reports it in its ports file.
        let port = self.port.map_or(-1, i32::from);
        let config = format!(
            "listen: 127.0.0.1:{port}\nmax_payload: 1MB\njetstream {{\n  store_dir: {store:?}\n  {options}\n}}\n{extra}\n",
            options = self.jetstream_options,
            extra = self.extra_config.as_deref().unwrap_or("")
        );
        std::fs::write(self.config_path(), config).expect("writing nats-server config");
        let mut command = Command::new(tools::nats_server());
        command
            .arg("-c")
            .arg(self.config_path())
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let (child, ports) =
            spawn_logged(command, &self.log_path(), &self.store.path().join("ports"));
        self.child = Some(child);
        self.port = Some(ports.client);
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            print_log("nats-server", &self.log_path());
        }
    }
}

/// Where a started `nats-server` listens, as it reports in its ports file.
struct Ports {
    client: u16,
    monitor: Option<u16>,
}

/// Starts `command` (a `nats-server`) with its output appended to `log`, and waits until it
/// reports its ports; panics with the log when it exits or stays silent instead.
fn spawn_logged(mut command: Command, log: &Path, ports_dir: &Path) -> (Child, Ports) {
    std::fs::create_dir_all(ports_dir).expect("a folder for nats-server's ports file");
    let file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .expect("a log file for nats-server");
    let mut child = command
        .arg("--ports_file_dir")
        .arg(ports_dir)
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("a second handle on the log file"))
        .stderr(file)
        .spawn()
        .expect("starting nats-server");
    let deadline = Instant::now() + START_TIMEOUT;
    let ports = loop {
        if let Some(ports) = read_ports(ports_dir, child.id()) {
            break ports;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "nats-server exited at start ({status}); its log {}:\n{}",
                log.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "nats-server reported no ports after {START_TIMEOUT:?}; its log {}:\n{}",
                log.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    wait_for_port(ports.client, START_TIMEOUT);
    (child, ports)
}

/// The ports in `<exe>_<pid>.ports` (written once every listener is up), if it is there yet.
fn read_ports(dir: &Path, pid: u32) -> Option<Ports> {
    let suffix = format!("_{pid}.ports");
    let path = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.to_string_lossy().ends_with(&suffix))?;
    // Read until it parses: the file may be caught half-written.
    let ports: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let port_of = |key: &str| -> Option<u16> {
        let url = ports[key][0].as_str()?;
        url.rsplit(':').next()?.parse().ok()
    };
    Some(Ports {
        client: port_of("nats")?,
        monitor: port_of("monitoring"),
    })
}

fn print_log(what: &str, log: &Path) {
    eprintln!(
        "--- {what} log ({}) ---\n{}--- end of {what} log ---",
        log.display(),
        std::fs::read_to_string(log).unwrap_or_default()
    );
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
///
/// Each node picks its client and monitoring ports itself at its first start and keeps them
/// when started again. The route ports must be known before any node starts (every node lists
/// every route), so those are still chosen by binding and releasing.
/// The NATS users a [`NatsCluster`] starts with (`deploy/nats/permissions.conf`): user, the
/// variable the node reads the password from, and the password.
pub const CLUSTER_USERS: [(&str, &str, &str); 4] = [
    ("admin", "NATS_ADMIN_PASSWORD", "cluster-admin-0"),
    ("gateway", "NATS_GATEWAY_PASSWORD", "cluster-gateway-1"),
    ("worker", "NATS_WORKER_PASSWORD", "cluster-worker-2"),
    ("reporter", "NATS_REPORTER_PASSWORD", "cluster-reporter-3"),
];

/// The password the nodes of a [`NatsCluster`] ask of each other's routes.
pub const CLUSTER_ROUTE_PASSWORD: &str = "cluster-route-9";

/// The password of a [`NatsCluster`]'s `user`.
pub fn cluster_password(user: &str) -> &'static str {
    CLUSTER_USERS
        .iter()
        .find(|(u, _, _)| *u == user)
        .unwrap_or_else(|| panic!("no cluster user {user}"))
        .2
}

pub struct NatsCluster {
    nodes: Vec<ClusterNode>,
    store: TempDir,
}

struct ClusterNode {
    name: String,
    /// Known once the node has started.
    client_port: Option<u16>,
    monitor_port: Option<u16>,
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
            .map(|p| format!("nats-route://route:{CLUSTER_ROUTE_PASSWORD}@127.0.0.1:{p}"))
            .collect();
        let nodes = (0..3)
            .map(|i| {
                let name = format!("nats-{}", i + 1);
                let mut env = vec![
                    ("NATS_SERVER_NAME".to_string(), name.clone()),
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
                env.push((
                    "NATS_ROUTE_PASSWORD".to_string(),
                    CLUSTER_ROUTE_PASSWORD.to_string(),
                ));
                for (_, var, password) in CLUSTER_USERS {
                    env.push((var.to_string(), password.to_string()));
                }
                ClusterNode {
                    name,
                    client_port: None,
                    monitor_port: None,
                    env,
                    child: None,
                }
            })
            .collect();
        let mut cluster = NatsCluster { nodes, store };
        for i in 0..3 {
            cluster.start_node(i);
        }
        cluster
    }

    /// `nats://…` of every node, comma-separated (the services' `NATS_URL`).
    pub fn urls(&self) -> String {
        (0..self.nodes.len())
            .map(|i| self.node_url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The client URL of node `i` alone.
    pub fn node_url(&self, i: usize) -> String {
        let port = self.nodes[i]
            .client_port
            .expect("a node's port is known once it has started");
        format!("nats://127.0.0.1:{port}")
    }

    /// A client connected to every node as `user` (see [`CLUSTER_USERS`]).
    pub async fn connect_as(&self, user: &str) -> async_nats::Client {
        let urls: Vec<async_nats::ServerAddr> = self
            .urls()
            .split(',')
            .map(|u| u.parse().expect("a node URL"))
            .collect();
        async_nats::ConnectOptions::with_user_and_password(
            user.to_string(),
            cluster_password(user).to_string(),
        )
        .custom_inbox_prefix(iac_shared::nats::inbox_prefix(user).expect("a token"))
        .connect(urls)
        .await
        .unwrap_or_else(|e| panic!("{user} cannot connect to the cluster: {e}"))
    }

    /// The address node `i` takes routes on (`host:port`).
    pub fn cluster_listen(&self, i: usize) -> &str {
        self.nodes[i]
            .env
            .iter()
            .find(|(k, _)| k == "NATS_CLUSTER_LISTEN")
            .map(|(_, v)| v.as_str())
            .expect("every node has a cluster address")
    }

    /// The routes node `i` has now (from its monitoring endpoint `/routez`).
    pub async fn route_count(&self, i: usize) -> Option<u64> {
        self.routez(i).await?["num_routes"].as_u64()
    }

    /// The names of the servers node `i` has routes to.
    pub async fn routed_names(&self, i: usize) -> Option<Vec<String>> {
        let routez = self.routez(i).await?;
        let routes = routez["routes"].as_array()?;
        Some(
            routes
                .iter()
                .filter_map(|r| r["remote_name"].as_str().map(str::to_string))
                .collect(),
        )
    }

    /// Node `i`'s monitoring answer on its routes.
    async fn routez(&self, i: usize) -> Option<serde_json::Value> {
        let port = self.nodes[i].monitor_port?;
        let url = format!("http://127.0.0.1:{port}/routez");
        crate::http().get(&url).send().await.ok()?.json().await.ok()
    }

    pub fn node_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The node a client with this connection name is connected to (from each running node's
    /// monitoring endpoint `/connz`).
    pub async fn node_of_client(&self, client_name: &str) -> Option<usize> {
        for (i, node) in self.nodes.iter().enumerate() {
            let (Some(_), Some(monitor_port)) = (&node.child, node.monitor_port) else {
                continue;
            };
            let url = format!("http://127.0.0.1:{monitor_port}/connz");
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

    /// Starts node `i` (again, on the ports it picked at its first start).
    pub fn start_node(&mut self, i: usize) {
        let config = tools::workspace_root().join("deploy/nats-cluster/node.conf");
        let log = self.log_path(i);
        let ports_dir = self
            .store
            .path()
            .join(format!("{}-ports", self.nodes[i].name));
        let node = &mut self.nodes[i];
        // -1: the node binds a free port itself and reports it in its ports file.
        let client_port = node.client_port.map_or(-1, i32::from);
        let monitor_port = node.monitor_port.map_or(-1, i32::from);
        let mut command = Command::new(tools::nats_server());
        command
            .arg("-c")
            .arg(&config)
            .arg("-m")
            .arg(monitor_port.to_string())
            .envs(node.env.iter().map(|(k, v)| (k, v)))
            .env("NATS_CLIENT_LISTEN", format!("127.0.0.1:{client_port}"));
        let (child, ports) = spawn_logged(command, &log, &ports_dir);
        node.child = Some(child);
        node.client_port = Some(ports.client);
        node.monitor_port = ports.monitor;
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.store
            .path()
            .join(format!("{}.log", self.nodes[i].name))
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
        if std::thread::panicking() {
            for i in 0..self.nodes.len() {
                print_log(&self.nodes[i].name, &self.log_path(i));
            }
        }
    }
}
