//! A real `redis-server` on a free port, started by the test and killed when dropped. Under CI
//! (`CI` set) a missing `redis-server` is a failure, not a skip: `.ci/run` installs it.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one, or returns `None` (outside CI) when `redis-server` is not installed.
    pub fn start() -> Option<RedisServer> {
        let port = super::closed_port();
        let mut server = RedisServer { port, child: None };
        match server.spawn() {
            Ok(()) => Some(server),
            Err(error) if std::env::var_os("CI").is_none() => {
                eprintln!("redis-server unavailable ({error}); skipping outside CI");
                None
            }
            Err(error) => panic!("redis-server must run under CI: {error}"),
        }
    }

    fn spawn(&mut self) -> Result<(), String> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run redis-server: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err("redis-server did not start listening".into())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills it (SIGKILL: no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (empty: it keeps nothing on disk).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn().expect("redis-server restarts");
    }

    /// A plain connection for looking at what the gateway stored.
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("redis client")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP proxy in front of a Redis server that passes commands through at once and holds every
/// reply back for `delay`: a slow Redis, over real sockets. Stops when dropped.
pub struct SlowProxy {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl SlowProxy {
    pub async fn start(target_port: u16, delay: Duration) -> SlowProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, target_port, delay));
            }
        });
        SlowProxy { port, task }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One connection: client → server at once; server → client each read `delay` after it came.
async fn relay(client: tokio::net::TcpStream, target_port: u16, delay: Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let upstream = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
    });
    let reader = tokio::spawn(async move {
        let mut buffer = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = server_read.read(&mut buffer).await {
            if tx
                .send((tokio::time::Instant::now(), buffer[..n].to_vec()))
                .is_err()
            {
                break;
            }
        }
    });
    while let Some((read_at, bytes)) = rx.recv().await {
        tokio::time::sleep_until(read_at + delay).await;
        if client_write.write_all(&bytes).await.is_err() {
            break;
        }
    }
    upstream.abort();
    reader.abort();
}
