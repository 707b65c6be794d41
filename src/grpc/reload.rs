//! Files the gateway reads again when they change (its TLS certificate, its policy): each
//! owner says how to reload itself, and one loop looks at it every few seconds.

use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Something read from files that can be read again.
pub(crate) trait Reload: Send + Sync + 'static {
    /// Reads the files again if they changed; whether something new is in force. A change
    /// that does not load is the owner's to log; the last good state stays.
    fn reload_if_changed(&self) -> bool;
}

/// Looks at `target`'s files every `every` until `stop`.
pub(crate) async fn watch(target: Arc<dyn Reload>, every: Duration, stop: CancellationToken) {
    let mut every = crate::every::Every::new(every, stop);
    while every.tick().await {
        target.reload_if_changed();
    }
}
