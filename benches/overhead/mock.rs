//! The mock upstream, in this process, on a thread of its own.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Context as _;
use bench_support::procfs::ThreadCpu;
use mock_upstream::{MockOptions, MockUpstream};

/// The running mock.
pub struct Mock {
    pub addr: SocketAddr,
    pub url: String,
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
                match MockUpstream::start_on(addr, MockOptions::default()).await {
                    Ok(mock) => {
                        // Benchmarks must not keep every request in memory.
                        mock.set_recording(false);
                        let _ = tx.send(Ok((mock.addr(), mock.url(), cpu)));
                        // Serve until the process ends.
                        std::future::pending::<()>().await;
                    }
                    Err(error) => {
                        let _ = tx.send(Err(anyhow::Error::from(error).context("mock upstream")));
                    }
                }
            });
        })?;
    let (addr, url, cpu) = rx.recv().context("mock upstream thread died")??;
    Ok(Mock { addr, url, cpu })
}
