//! A `nats-server -js` process the tests start on a free loopback port, kill and start
//! again (on the same port and store directory), never one they did not start.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::redis::free_port;

pub struct NatsServer {
    pub port: u16,
    dir: tempfile::TempDir,
    watchdog: Option<Child>,
}

impl NatsServer {
    /// Starts one, or `None` when `nats-server` is not installed (outside CI; under CI
    /// its absence fails the test).
    pub fn start() -> Option<Self> {
        if !crate::grpcurl::tool_available(
            "nats-server",
            "--version",
            "apt-get install nats-server",
        ) {
            return None;
        }
        for _ in 0..5 {
            let mut server = Self {
                port: free_port(),
                dir: tempfile::tempdir().expect("temp dir"),
                watchdog: None,
            };
            if server.launch() {
                return Some(server);
            }
        }
        panic!("nats-server did not start on 5 free ports");
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server under a watchdog that kills it when the test process is gone.
    fn launch(&mut self) -> bool {
        let dir = self.dir.path().display().to_string();
        let script = format!(
            "nats-server -js -a 127.0.0.1 -p {port} -sd '{dir}/js' >'{dir}/nats.log' 2>&1 & n=$!; \
             echo $n > '{dir}/nats.pid'; \
             while kill -0 {me} 2>/dev/null && kill -0 $n 2>/dev/null; do sleep 0.2; done; \
             kill -9 $n 2>/dev/null",
            port = self.port,
            me = std::process::id(),
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .spawn()
            .expect("sh");
        self.watchdog = Some(child);
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
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
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Kills it at once (SIGKILL, like a crash); its stored streams stay on disk.
    pub fn kill(&mut self) {
        let pid_file = self.dir.path().join("nats.pid");
        if let Ok(pid) = std::fs::read_to_string(&pid_file) {
            let _ = std::fs::remove_file(&pid_file);
            let _ = Command::new("kill")
                .args(["-9", pid.trim()])
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.wait();
        }
    }

    /// Starts it again on the same port, with what it had stored.
    pub fn restart(&mut self) {
        self.kill();
        assert!(self.launch(), "nats-server did not start again");
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
