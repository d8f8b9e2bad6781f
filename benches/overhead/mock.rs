//! The mock upstream, in this process, on a thread of its own: one replica for the one-endpoint
//! rows, and two more beside it (same thread) for the rows with a pool of three.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Context as _;
use bench_support::procfs::ThreadCpu;
use mock_upstream::{MockOptions, MockUpstream};

/// Replicas of the mock: the pool of the three-endpoint rows.
pub const REPLICAS: usize = 3;

/// The running mock.
pub struct Mock {
    pub addr: SocketAddr,
    pub url: String,
    /// Every replica, `addr` first: the endpoints of the three-endpoint rows.
    pub replicas: Vec<SocketAddr>,
    /// The mock's thread, for its CPU time.
    pub cpu: ThreadCpu,
}

/// Starts the mock upstream in this process, on its own OS thread with its own current-thread
/// tokio runtime.
///
/// Why in-process rather than the `mock_upstream` example binary as a child: `cargo bench` builds
/// no examples, so a child would need a build step of its own; in-process there is no process to
/// manage or leak. Its own thread and runtime keep it from sharing an event loop with the load
/// generator (their tasks never delay each other's polls), and its CPU time is still its own to
/// read (`/proc/self/task/<tid>/stat`). It shares the machine's cores with everything else, as a
/// separate process would.
pub fn start() -> anyhow::Result<Mock> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("mock-upstream".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = tx.send(Err(anyhow::Error::from(error)));
                    return;
                }
            };
            runtime.block_on(async move {
                let cpu = ThreadCpu::current();
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
                let mut mocks = Vec::with_capacity(REPLICAS);
                for _ in 0..REPLICAS {
                    match MockUpstream::start_on(addr, MockOptions::default()).await {
                        Ok(mock) => {
                            // Benchmarks must not keep every request in memory.
                            mock.set_recording(false);
                            mocks.push(mock);
                        }
                        Err(error) => {
                            let _ =
                                tx.send(Err(anyhow::Error::from(error).context("mock upstream")));
                            return;
                        }
                    }
                }
                let replicas = mocks.iter().map(MockUpstream::addr).collect();
                let _ = tx.send(Ok((mocks[0].addr(), mocks[0].url(), replicas, cpu)));
                // Serve until the process ends.
                std::future::pending::<()>().await;
            });
        })?;
    let (addr, url, replicas, cpu) = rx.recv().context("mock upstream thread died")??;
    Ok(Mock {
        addr,
        url,
        replicas,
        cpu,
    })
}
