//! The control channel between a connection's task and the answers it serves: an answer can ask
//! for its connection to close after the response (close-after-stream), to drop at once, or to
//! end with an RST (reset-before-headers).

use std::sync::atomic::AtomicBool;

use tokio::sync::Notify;

#[derive(Default)]
pub(crate) struct ConnCtl {
    /// Graceful close after the current response (close-after-stream).
    pub(crate) close: Notify,
    /// Drop the connection right now.
    pub(crate) kill: Notify,
    /// Close with RST (SO_LINGER 0) instead of FIN when the socket is dropped.
    pub(crate) reset: AtomicBool,
}
