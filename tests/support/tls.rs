//! TLS terminators for the TLS tests: certificates made at test time with the `openssl`
//! CLI, and `socat` listening with TLS on a free port and forwarding in plain text to the
//! machine's RabbitMQ or Redis. Every process is killed when its guard drops.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::redis::{RedisNodes, cli_with, free_ports, wait_for};

/// A directory of PEM files made for one test, removed on drop.
///
/// - `ca.pem`: the test CA; `server.pem`/`server.key`: signed by it for `localhost` and
///   `127.0.0.1`; `client.pem`/`client.key`: a client certificate signed by it.
/// - `other-ca.pem`: a CA that signed nothing the servers present.
/// - `expired.pem`/`expired.key`: signed by the test CA for the same names, expired.
/// - `elsewhere.pem`/`elsewhere.key`: signed by the test CA for `elsewhere.example` only.
#[derive(Debug)]
pub struct Certs {
    dir: PathBuf,
}

impl Certs {
    /// Make the certificates (a few EC P-256 keys: fast).
    pub fn generate() -> Self {
        let dir = std::env::temp_dir().join(format!("reliable-mq-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let certs = Self { dir };
        certs.ca("ca", "reliable-mq test CA");
        certs.ca("other-ca", "some other CA");
        certs.leaf("server", "localhost", "DNS:localhost,IP:127.0.0.1", "30");
        certs.leaf("client", "reliable-mq test client", "DNS:client", "30");
        // A validity ending before it starts: expired from the moment it is made.
        certs.leaf("expired", "localhost", "DNS:localhost,IP:127.0.0.1", "-1");
        certs.leaf(
            "elsewhere",
            "elsewhere.example",
            "DNS:elsewhere.example",
            "30",
        );
        certs
    }

    /// The path of `name` (`ca.pem`, `client.key`, ...) as a string for a URL query.
    pub fn path(&self, name: &str) -> String {
        let p = self.dir.join(name);
        assert!(p.exists(), "{} was not generated", p.display());
        p.to_string_lossy().into_owned()
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("the openssl CLI must be installed");
        assert!(
            out.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn ca(&self, name: &str, cn: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "30",
            "-subj",
            &format!("/CN={cn}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
    }

    fn leaf(&self, name: &str, cn: &str, san: &str, days: &str) {
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ]);
        let ext = format!("{name}.ext");
        std::fs::write(
            self.dir.join(&ext),
            format!("subjectAltName={san}\nbasicConstraints=CA:FALSE\n"),
        )
        .expect("write extension file");
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            days,
            "-extfile",
            &ext,
        ]);
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How the terminator treats client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// No client certificate asked for.
    None,
    /// A client certificate signed by the test CA is required.
    Required,
}

/// `socat` terminating TLS on a free local port and forwarding to `127.0.0.1:{upstream}`.
/// Killed (and reaped) on drop.
#[derive(Debug)]
pub struct TlsProxy {
    child: Child,
    /// The TLS port.
    pub port: u16,
}

impl TlsProxy {
    /// Listen with the certificate `{cert}.pem`/`{cert}.key` of `certs`, forwarding to
    /// `upstream` (5672 for RabbitMQ, 6379 for Redis).
    pub fn start(certs: &Certs, cert: &str, client_auth: ClientAuth, upstream: u16) -> Self {
        let port = free_port();
        let verify = match client_auth {
            ClientAuth::None => "verify=0".to_owned(),
            ClientAuth::Required => format!("verify=1,cafile={}", certs.path("ca.pem")),
        };
        let listen = format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},{verify}",
            certs.path(&format!("{cert}.pem")),
            certs.path(&format!("{cert}.key")),
        );
        let child = Command::new("socat")
            .args([listen, format!("TCP:127.0.0.1:{upstream}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat must be installed");
        let proxy = Self { child, port };
        wait_listening(port);
        proxy
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

fn wait_listening(port: u16) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("socat did not listen on port {port} within 10 s");
}

/// A private 3-primary Redis Cluster speaking only TLS (clients and cluster bus), with the
/// server certificate of `certs` and client certificates required. Its nodes are killed
/// and its directory removed on drop, even when the test fails.
#[derive(Debug)]
pub struct TlsRedisCluster {
    nodes: RedisNodes,
    /// The TLS ports of the three primaries.
    pub ports: [u16; 3],
    ca: String,
    cert: String,
    key: String,
}

impl TlsRedisCluster {
    /// Start the nodes, create the cluster and wait until every node says it is ok.
    pub fn start(certs: &Certs) -> Self {
        let ports = free_ports(true);
        let cluster = Self {
            nodes: RedisNodes::new("rmq-tls-cluster", &ports),
            ports,
            ca: certs.path("ca.pem"),
            cert: certs.path("client.pem"),
            key: certs.path("client.key"),
        };
        let (server, key, ca) = (
            certs.path("server.pem"),
            certs.path("server.key"),
            certs.path("ca.pem"),
        );
        cluster.nodes.start_cluster_nodes(Some(&[
            "--tls-cert-file",
            &server,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "yes",
            "--tls-cluster",
            "yes",
        ]));
        for p in ports {
            assert!(
                wait_for(Duration::from_secs(10), || cluster
                    .cli(p, &["ping"])
                    .contains("PONG")),
                "TLS redis node {p} does not answer; log: {}",
                cluster.nodes.log(p)
            );
        }
        cluster.nodes.create_cluster(&cluster.tls_args());
        cluster
    }

    fn tls_args(&self) -> Vec<String> {
        [
            "--tls", "--cacert", &self.ca, "--cert", &self.cert, "--key", &self.key,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    /// `redis-cli` over TLS, in cluster mode, against the node on `port` ("" if it could
    /// not run).
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let mut options = self.tls_args();
        options.push("-c".into());
        cli_with(&options, port, args)
    }
}
