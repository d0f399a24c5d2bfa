//! A private 3-node RabbitMQ cluster for the cluster suite, driven through
//! `scripts/rabbitmq-cluster.sh`: its own node names, ports and data, beside (never
//! touching) the machine's default node. [`Cluster`] stops the nodes and removes their
//! data when dropped, also when a test fails.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::{Connection, ConnectionProperties};

use crate::Broker;

/// AMQP port of node 1 is `BASE_PORT + 1`; distribution ports are `BASE_PORT + 20001..`.
pub const BASE_PORT: u16 = 5780;

/// Serializes the tests of the cluster binary: they share the node names and ports.
pub static CLUSTER_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Why a partitionable cluster cannot run here (`None`: it can): it needs root and
/// iproute2's `ip netns`.
pub fn netns_unavailable() -> Option<String> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        return Some("network namespaces need root".into());
    }
    let ip = Command::new("ip")
        .args(["netns", "list"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!ip).then(|| "`ip netns` (iproute2) is not available".into())
}

/// A running private cluster; stopped and removed on drop.
pub struct Cluster {
    root: PathBuf,
    /// Each node in its own network namespace (`RMQ_CLUSTER_NETNS=1`): node `i` is
    /// `rmqc<i>@h<i>` at 10.77.0.`i`, and can be cut off ([`Cluster::partition`]).
    netns: bool,
    /// The node cut off by [`Cluster::partition`], if any: the CLI is not run on it (a
    /// cluster-wide listing there waits for peers it cannot reach).
    cut: std::sync::Mutex<Option<usize>>,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/rabbitmq-cluster.sh")
}

impl Cluster {
    /// Start the three nodes and cluster them (about 20-40 s). Leftovers of an earlier run
    /// that died before its cleanup are stopped first.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// [`Cluster::start`] with each node in its own network namespace, on a bridge, so
    /// that one can be cut off from its peers and clients and connected again (needs root
    /// and iproute2); distribution ticks every 10 s and partitions are handled with
    /// `pause_minority` (`scripts/rabbitmq-cluster.sh`, `RMQ_CLUSTER_NETNS`).
    pub fn start_partitionable() -> Self {
        Self::start_with(true)
    }

    fn start_with(netns: bool) -> Self {
        let root = std::env::temp_dir().join("reliable-mq-test-cluster");
        // Leftovers of either kind: a run that died before its cleanup.
        for leftover in [false, true] {
            Self {
                root: root.clone(),
                netns: leftover,
                cut: Default::default(),
            }
            .run(&["stop"]);
        }
        let cluster = Self {
            root,
            netns,
            cut: Default::default(),
        };
        assert!(cluster.run(&["start"]), "the private cluster started");
        cluster
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(script());
        c.args(args)
            .env("RMQ_CLUSTER_ROOT", &self.root)
            .env("RMQ_CLUSTER_BASE_PORT", BASE_PORT.to_string())
            .env("RMQ_CLUSTER_NETNS", if self.netns { "1" } else { "0" });
        c
    }

    /// Run the script; whether it succeeded.
    pub fn run(&self, args: &[&str]) -> bool {
        self.command(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Run the script and return its standard output.
    pub fn output(&self, args: &[&str]) -> String {
        self.command(args)
            .stderr(std::process::Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// The AMQP URL of node `i` (1..=3).
    pub fn url_of(&self, i: usize) -> String {
        let host = if self.netns {
            format!("10.77.0.{i}")
        } else {
            "127.0.0.1".to_owned()
        };
        format!("amqp://guest:guest@{host}:{}/%2f", BASE_PORT as usize + i)
    }

    /// All three nodes, comma-separated: what `AMQP_URL` holds for a cluster.
    pub fn url(&self) -> String {
        (1..=3)
            .map(|i| self.url_of(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The Erlang node name of node `i`.
    pub fn node_name(&self, i: usize) -> String {
        if self.netns {
            format!("rmqc{i}@h{i}")
        } else {
            format!("rmqc{i}@localhost")
        }
    }

    /// Cut node `i` off from its peers and its clients (a partitionable cluster only):
    /// the host end of its veth pair goes down, so nothing it sends arrives and nothing
    /// reaches it, with no reset.
    pub fn partition(&self, i: usize) -> bool {
        *self.cut.lock().unwrap_or_else(|e| e.into_inner()) = Some(i);
        self.run(&["partition", &i.to_string()])
    }

    /// Connect node `i` again after [`Cluster::partition`].
    pub fn heal(&self, i: usize) -> bool {
        let healed = self.run(&["heal", &i.to_string()]);
        *self.cut.lock().unwrap_or_else(|e| e.into_inner()) = None;
        healed
    }

    /// SIGKILL node `i`: a crash.
    pub fn kill(&self, i: usize) -> bool {
        self.run(&["kill-node", &i.to_string()])
    }

    /// Stop node `i` gracefully.
    pub fn stop(&self, i: usize) -> bool {
        self.run(&["stop-node", &i.to_string()])
    }

    /// Start node `i` again and wait until it runs (it rejoins the cluster).
    pub fn start_node(&self, i: usize) -> bool {
        self.run(&["start-node", &i.to_string()])
    }

    /// Run the script with `args` against the first running node that answers; the output.
    fn on_some_node(&self, sub: &str, args: &[&str]) -> Option<String> {
        let cut = *self.cut.lock().unwrap_or_else(|e| e.into_inner());
        (1..=3).filter(|i| Some(*i) != cut).find_map(|i| {
            let n = i.to_string();
            let mut all = vec![sub, n.as_str()];
            all.extend_from_slice(args);
            let out = self
                .command(&all)
                .stderr(std::process::Stdio::null())
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        })
    }

    /// `rabbitmqctl` on a running node; its output (empty if no node answers).
    pub fn ctl(&self, args: &[&str]) -> String {
        self.on_some_node("ctl", args).unwrap_or_default()
    }

    /// `rabbitmq-queues` on a running node; whether it succeeded.
    pub fn queues(&self, args: &[&str]) -> bool {
        self.on_some_node("queues", args).is_some()
    }

    /// The node (1..=3) hosting `queue`'s leader (quorum) or the queue itself (classic).
    pub fn leader(&self, queue: &str) -> Option<usize> {
        let out = self.ctl(&["list_queues", "name", "leader", "pid", "--no-table-headers"]);
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(queue))
            .and_then(|l| (1..=3).find(|i| l.contains(&self.node_name(*i))))
    }

    /// The node (1..=3) holding the connection whose client-given name contains `part`.
    pub fn connection_node(&self, part: &str) -> Option<usize> {
        let out = self.ctl(&[
            "list_connections",
            "port",
            "client_properties",
            "--no-table-headers",
        ]);
        out.lines().filter(|l| l.contains(part)).find_map(|l| {
            let port: usize = l.split_whitespace().next()?.parse().ok()?;
            (1..=3).find(|i| BASE_PORT as usize + i == port)
        })
    }

    /// What the cluster says about `queue`, its connections and consumers, for a failure
    /// message: which nodes run, the queue's leader, members and online members, its
    /// message counts, and where each connection is.
    pub fn describe(&self, queue: &str) -> String {
        let nodes = self.output(&["status"]);
        let queues = self.ctl(&[
            "list_queues",
            "name",
            "type",
            "leader",
            "members",
            "online",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ]);
        let quorum = self
            .on_some_node("queues", &["quorum_status", queue])
            .unwrap_or_default();
        let connections = self.ctl(&[
            "list_connections",
            "user_provided_name",
            "port",
            "state",
            "channels",
        ]);
        let consumers = self.ctl(&[
            "list_consumers",
            "queue_name",
            "channel_pid",
            "ack_required",
        ]);
        format!(
            "nodes:\n{nodes}\nqueues:\n{queues}\nquorum_status {queue}:\n{quorum}\n\
             connections:\n{connections}\nconsumers:\n{consumers}"
        )
    }

    /// Move `queue`'s leader off node `from` by removing that member (the others elect a
    /// new leader) and adding it back as a follower.
    pub fn move_leader_off(&self, queue: &str, from: usize) -> bool {
        let node = self.node_name(from);
        self.queues(&["delete_member", queue, &node]) && self.queues(&["add_member", queue, &node])
    }

    /// A raw connection to the first node that accepts one.
    pub async fn broker(&self) -> Option<Broker> {
        for i in 1..=3 {
            let Ok(connection) =
                Connection::connect(&self.url_of(i), ConnectionProperties::default()).await
            else {
                continue;
            };
            let Ok(channel) = connection.create_channel().await else {
                continue;
            };
            if channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .is_err()
            {
                continue;
            }
            return Some(Broker {
                connection,
                channel,
            });
        }
        None
    }

    /// Wait until `queue` (quorum) has all three members online, so the next fault starts
    /// from a whole cluster.
    pub async fn await_members(&self, queue: &str, within: Duration) -> bool {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < within {
            let out = self.ctl(&["list_queues", "name", "online", "--no-table-headers"]);
            if out
                .lines()
                .find(|l| l.split_whitespace().next() == Some(queue))
                .is_some_and(|l| (1..=3).all(|i| l.contains(&self.node_name(i))))
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        false
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.run(&["stop"]);
    }
}
