//! Free local ports, for the processes a bench starts.
//!
//! The port is bound and released at once, so another process could take it before the child
//! binds it: a race every bench here accepts, on a machine where nothing else grabs ports.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// `127.0.0.1:<a free port>`.
pub fn free_addr() -> io::Result<SocketAddr> {
    Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)))
}
