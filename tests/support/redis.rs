//! Private Redis nodes for the tests that must not touch the machine's Redis on 6379 (a
//! Sentinel setup, a Cluster, a Redis to stop): the machine's `redis-server`, daemonized on
//! free loopback ports without persistence, its pid and log files in a temp directory of
//! its own. The guard kills every node it started (by its pid file, so only ours) and
//! removes the directory when it drops, also when the test fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The nodes of one test, on the ports it chose (see [`free_ports`]).
#[derive(Debug)]
pub struct RedisNodes {
    dir: PathBuf,
    ports: Vec<u16>,
}

impl RedisNodes {
    /// A fresh directory named after `name`, for nodes on `ports`; nothing started yet.
    pub fn new(name: &str, ports: &[u16]) -> Self {
        let dir = std::env::temp_dir().join(crate::unique(name));
        std::fs::create_dir_all(&dir).expect("temp dir");
        // Redis reports its directory resolved: compare like with like in `is_ours`.
        let dir = std::fs::canonicalize(&dir).expect("temp dir path");
        Self {
            dir,
            ports: ports.to_vec(),
        }
    }

    /// One plain node on a free port, started and answering.
    pub fn one(name: &str) -> Self {
        Self::one_with(name, &[])
    }

    /// One node as [`RedisNodes::one`], started with the `extra` arguments.
    pub fn one_with(name: &str, extra: &[&str]) -> Self {
        let [port] = free_ports(false);
        let nodes = Self::new(name, &[port]);
        nodes.start(port, extra);
        nodes.wait_ours(port);
        nodes
    }

    /// The directory the nodes run in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The ports, in the order given.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// The first node's port (the only one of [`RedisNodes::one`]).
    pub fn port(&self) -> u16 {
        self.ports[0]
    }

    /// `redis://127.0.0.1:{port}` of the first node.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port())
    }

    /// `redis-cli` against the first node: its output, trimmed, if the command succeeded.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port().to_string()])
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Start a plain-text node on `port` with `extra` arguments (e.g. `--replicaof`).
    pub fn start(&self, port: u16, extra: &[&str]) {
        self.launch(port, &["--port", &port.to_string()], extra);
    }

    /// Start a node listening only with TLS on `port`; `extra` names the certificates.
    pub fn start_tls(&self, port: u16, extra: &[&str]) {
        self.launch(
            port,
            &["--port", "0", "--tls-port", &port.to_string()],
            extra,
        );
    }

    /// Start every node as a Redis Cluster node, in plain text, or with `tls` (the options
    /// naming the certificates) listening only with TLS.
    pub fn start_cluster_nodes(&self, tls: Option<&[&str]>) {
        for &p in &self.ports {
            let conf = format!("nodes-{p}.conf");
            let mut args = vec![
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &conf,
                "--cluster-node-timeout",
                "5000",
            ];
            match tls {
                None => self.start(p, &args),
                Some(tls) => {
                    args.extend_from_slice(tls);
                    self.start_tls(p, &args);
                }
            }
        }
    }

    fn launch(&self, port: u16, listen: &[&str], extra: &[&str]) {
        let started = Command::new("redis-server")
            .args(listen)
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--pidfile")
            .arg(self.pidfile(port))
            .arg("--logfile")
            .arg(self.dir.join(format!("{port}.log")))
            .args(["--save", "", "--appendonly", "no", "--daemonize", "yes"])
            .args(extra)
            .status()
            .expect("redis-server must be installed");
        assert!(
            started.success(),
            "redis-server on port {port} did not start"
        );
    }

    /// Wait until the plain-text node on `port` answers from our directory.
    pub fn wait_ours(&self, port: u16) {
        assert!(
            wait_for(Duration::from_secs(10), || self.is_ours(port)),
            "redis node {port} does not answer (or is not ours); log: {}",
            self.log(port)
        );
    }

    /// Where the process on `port` writes its pid (a sentinel's config must name it).
    pub fn pidfile(&self, port: u16) -> PathBuf {
        self.dir.join(format!("{port}.pid"))
    }

    /// The node's log so far.
    pub fn log(&self, port: u16) -> String {
        std::fs::read_to_string(self.dir.join(format!("{port}.log"))).unwrap_or_default()
    }

    /// Whether the process on `port` answers and is ours: a server reports our directory;
    /// a sentinel (which refuses `CONFIG GET`) answers `PING` and wrote our pid file.
    pub fn is_ours(&self, port: u16) -> bool {
        let dir = self.dir.to_string_lossy();
        cli(port, &["config", "get", "dir"]).contains(dir.trim_end_matches('/'))
            || (self.pidfile(port).exists() && cli(port, &["ping"]).contains("PONG"))
    }

    /// Send `signal` (`-STOP`, `-CONT`, `-9`...) to the process on `port`, by its pid file.
    pub fn signal(&self, port: u16, signal: &str) -> bool {
        let Ok(pid) = std::fs::read_to_string(self.pidfile(port)) else {
            return false;
        };
        Command::new("kill")
            .args([signal, pid.trim()])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Join the nodes into a cluster of primaries only (`cli_args`: e.g. TLS options for
    /// `redis-cli`) and wait until every node reports `cluster_state:ok`.
    pub fn create_cluster(&self, cli_args: &[String]) {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .args(cli_args)
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for &p in &self.ports {
            let info = || cli_with(cli_args, p, &["cluster", "info"]);
            assert!(
                wait_for(Duration::from_secs(30), || info()
                    .contains("cluster_state:ok")),
                "cluster not ok on node {p}: {}",
                info()
            );
        }
    }
}

impl Drop for RedisNodes {
    fn drop(&mut self) {
        for &p in &self.ports {
            // A stopped node must run again to die; one already gone has nothing to kill.
            self.signal(p, "-CONT");
            self.signal(p, "-9");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `N` consecutive free loopback ports in 21000..24000 (with `bus`, their cluster bus
/// ports, +10000, free too), never handed out twice in this process: the tests of one
/// binary run side by side.
pub fn free_ports<const N: usize>(bus: bool) -> [u16; N] {
    static TAKEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut taken = TAKEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let slots = 3000 / N as u128;
    for _ in 0..100 {
        let r = uuid::Uuid::new_v4().as_u128();
        let base = 21000 + u16::try_from(N as u128 * (r % slots)).expect("< 3000");
        let ports: [u16; N] = std::array::from_fn(|i| base + i as u16);
        let free = ports.iter().all(|p| {
            !taken.contains(p)
                && std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok()
                && (!bus || std::net::TcpListener::bind(("127.0.0.1", *p + 10000)).is_ok())
        });
        if free {
            taken.extend(ports);
            return ports;
        }
    }
    panic!("no {N} free ports for private Redis nodes in 21000..24000");
}

/// `redis-cli -p port args...`'s output ("" if it could not run).
pub fn cli(port: u16, args: &[&str]) -> String {
    cli_with(&[], port, args)
}

/// `redis-cli` with `options` (e.g. TLS ones) against the node on `port`.
pub fn cli_with(options: &[String], port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(options)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Poll `check` every 100 ms (blocking) until it holds or `within` has passed.
pub fn wait_for(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
