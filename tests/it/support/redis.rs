//! Real `redis-server` processes for tests, on free loopback ports, started and stopped by
//! the tests themselves. Each runs under a small shell watchdog that kills it when the
//! test process is gone, so a panicking test leaves nothing behind. Tests never flush a
//! server: they isolate themselves by key prefix or by their own server.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 64];
    stream.write_all(b"PING\r\n").is_ok()
        && stream
            .read(&mut buf)
            .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
}

/// One `redis-server` process.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    /// A configuration file's text, written into `dir` and read first (Sentinel needs
    /// a file of its own to rewrite).
    config: Option<String>,
    watchdog: Option<Child>,
}

impl RedisServer {
    /// A standalone server on a free port, no persistence.
    pub fn start() -> Self {
        Self::start_with(&Vec::new)
    }

    /// A replica of the server on `port` (`replicaof`, asynchronous as always).
    pub fn replica_of(port: u16) -> Self {
        Self::start_with(&|| vec!["--replicaof".into(), "127.0.0.1".into(), port.to_string()])
    }

    /// A Sentinel watching the primary on `primary_port` as `name`, alone (quorum 1): it
    /// calls the primary down after `down_after` without answers and fails over.
    pub fn sentinel(name: &str, primary_port: u16, down_after: Duration) -> Self {
        let config = format!(
            "sentinel monitor {name} 127.0.0.1 {primary_port} 1\n\
             sentinel down-after-milliseconds {name} {}\n\
             sentinel failover-timeout {name} 10000\n\
             sentinel parallel-syncs {name} 1\n",
            down_after.as_millis()
        );
        Self::start_configured(&Vec::new, Some(config))
    }

    /// Starts a server with the flags `extra` makes (called again, for new ports, when a
    /// port turns out to be taken).
    pub fn start_with(extra: &dyn Fn() -> Vec<String>) -> Self {
        Self::start_configured(extra, None)
    }

    fn start_configured(extra: &dyn Fn() -> Vec<String>, config: Option<String>) -> Self {
        for _ in 0..5 {
            let mut server = Self {
                port: free_port(),
                dir: tempfile::tempdir().expect("temp dir"),
                extra: extra(),
                config: config.clone(),
                watchdog: None,
            };
            if server.launch() {
                return server;
            }
        }
        panic!("redis-server did not start on 5 free ports");
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.path().join("redis.pid")
    }

    /// Starts redis-server under its watchdog; false if it exited before answering.
    fn launch(&mut self) -> bool {
        let mut args = Vec::new();
        if let Some(config) = &self.config {
            let file = self.dir.path().join("redis.conf");
            std::fs::write(&file, config).expect("write the config file");
            args.push(file.display().to_string());
            args.push("--sentinel".to_owned());
        }
        args.extend([
            "--port".to_owned(),
            self.port.to_string(),
            "--bind".to_owned(),
            "127.0.0.1".to_owned(),
            "--save".to_owned(),
            String::new(),
            "--appendonly".to_owned(),
            "no".to_owned(),
            "--dir".to_owned(),
            self.dir.path().display().to_string(),
        ]);
        args.extend(self.extra.iter().cloned());
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        let script = format!(
            "redis-server {} >{}/redis.log 2>&1 & r=$!; echo $r > {}; \
             while kill -0 {} 2>/dev/null && kill -0 $r 2>/dev/null; do sleep 0.2; done; \
             kill -9 $r 2>/dev/null",
            quoted.join(" "),
            self.dir.path().display(),
            self.pid_file().display(),
            std::process::id(),
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH (Debian package redis-server)");
        let started = Instant::now();
        self.watchdog = Some(child);
        while !ping(self.port) {
            // The watchdog ends when redis-server does: the port was taken meanwhile.
            let exited = self
                .watchdog
                .as_mut()
                .is_some_and(|w| w.try_wait().ok().flatten().is_some());
            if exited {
                self.watchdog = None;
                return false;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server on port {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Kills the server at once (SIGKILL: no shutdown, like a crash).
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = std::fs::remove_file(self.pid_file());
            let _ = Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.wait();
        }
        while ping(self.port) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing answers, as in a
    /// network partition. `thaw` resumes it.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.pid().expect("a running server");
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.launch(),
            "redis-server did not restart on port {}",
            self.port
        );
    }

    /// The redis-server's process id.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.pid_file())
            .ok()
            .and_then(|pid| pid.trim().parse().ok())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs redis-cli against this server and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// redis-cli against `port` (following cluster redirects), its output trimmed.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-c", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli must be on PATH");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// A Redis Cluster of three masters, with or without a replica each.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Three masters, no replicas.
    pub fn start() -> Self {
        Self::start_nodes(3, 0)
    }

    /// Three masters with one replica each (six nodes).
    pub fn start_with_replicas() -> Self {
        Self::start_nodes(6, 1)
    }

    fn start_nodes(count: usize, replicas: usize) -> Self {
        let nodes: Vec<RedisServer> = (0..count)
            .map(|_| {
                RedisServer::start_with(&|| {
                    vec![
                        "--cluster-enabled".into(),
                        "yes".into(),
                        "--cluster-node-timeout".into(),
                        "2000".into(),
                        // A bus port of its own: the default, port + 10000, can be taken
                        // or beyond 65535 for ports from the ephemeral range.
                        "--cluster-port".into(),
                        free_port().to_string(),
                    ]
                })
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .expect("redis-cli");
        assert!(status.success(), "redis-cli --cluster create failed");
        let started = Instant::now();
        for node in &nodes {
            while !redis_cli(node.port, &["cluster", "info"]).contains("cluster_state:ok") {
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "cluster did not become ready"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        for node in &nodes {
            loop {
                let replication = redis_cli(node.port, &["info", "replication"]);
                if !replication.contains("role:slave")
                    || replication.contains("master_link_status:up")
                {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "replica {} did not sync",
                    node.port
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Self { nodes }
    }

    /// `redis-cluster://…` for usher's `--store`.
    pub fn store_url(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis-cluster://{}", nodes.join(","))
    }

    pub fn node_list(&self) -> Vec<(String, u16)> {
        self.nodes
            .iter()
            .map(|n| ("127.0.0.1".to_owned(), n.port))
            .collect()
    }
}

/// One standalone server shared by the tests of this process (isolated by key prefix).
pub fn shared_redis() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(RedisServer::start)
}

/// One cluster shared by the tests of this process (isolated by key prefix).
pub fn shared_cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(RedisCluster::start)
}

/// Every key starting with `prefix`, on every node of `ports`, but the store's own
/// bookkeeping, which no call writes: `<prefix>:meta` (partition count and key layout,
/// written at connect) and `<prefix>:probe` (the health probe's write).
pub fn keys_with_prefix(ports: &[u16], prefix: &str) -> Vec<String> {
    let pattern = format!("{prefix}*");
    let is_meta =
        |key: &str| !key.contains('{') && (key.ends_with(":meta") || key.ends_with(":probe"));
    let mut keys: Vec<String> = ports
        .iter()
        .flat_map(|port| {
            redis_cli(*port, &["--scan", "--pattern", &pattern])
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|k| !k.is_empty() && !is_meta(k))
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Every key starting with `prefix` and its serialized value (`DUMP`, which leaves TTLs
/// out): equal snapshots mean nothing was written.
pub fn dump_with_prefix(ports: &[u16], prefix: &str) -> Vec<(String, String)> {
    let Some(&port) = ports.first() else {
        return Vec::new();
    };
    keys_with_prefix(ports, prefix)
        .into_iter()
        .map(|key| {
            let dump = redis_cli(port, &["dump", &key]);
            (key, dump)
        })
        .collect()
}

/// A TCP relay in front of a Redis port, for a replica's link to its primary: while held,
/// nothing the primary sends goes through (the bytes wait in the relay's socket), so the
/// primary acknowledges writes its replica never gets, as over a lagging network link.
/// `cut` closes every relayed connection and discards what was held.
pub struct Relay {
    pub port: u16,
    held: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    pub fn to(target: u16) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let port = listener.local_addr().unwrap().port();
        let held = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicBool::new(false));
        let (held_flag, cut_flag) = (held.clone(), cut.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if cut_flag.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                // client -> server always flows; server -> client stops while held.
                let pump = |mut from: TcpStream,
                            mut to: TcpStream,
                            gate: Option<Arc<AtomicBool>>| {
                    let cut = cut_flag.clone();
                    std::thread::spawn(move || {
                        let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
                        let mut buf = vec![0u8; 64 * 1024];
                        while !cut.load(Ordering::Relaxed) {
                            if gate.as_ref().is_some_and(|g| g.load(Ordering::Relaxed)) {
                                std::thread::sleep(Duration::from_millis(5));
                                continue;
                            }
                            match from.read(&mut buf) {
                                Ok(0) => break,
                                // Held while the read was waiting: what it brought stays
                                // here (it was sent after the hold began).
                                Ok(_)
                                    if gate.as_ref().is_some_and(|g| g.load(Ordering::Relaxed)) => {
                                }
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => break,
                            }
                        }
                        let _ = from.shutdown(std::net::Shutdown::Both);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                };
                pump(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    None,
                );
                pump(server, client, Some(held_flag.clone()));
            }
        });
        Self { port, held, cut }
    }

    /// Stops relaying what the target sends.
    pub fn hold(&self) {
        self.held.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Closes every connection, dropping what was held, and accepts no more.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
    }
}
