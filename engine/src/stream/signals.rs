//! What stops a stream: SIGINT, SIGTERM and `--for` all stop it the same way.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// SIGINT, SIGTERM and `--for` all stop the stream the same way.
pub(super) fn spawn_stoppers(stop: Arc<watch::Sender<bool>>, duration: Option<Duration>) {
    let s = stop.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    let _ = s.send(true);
                    return;
                }
            };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("stopping: finishing the batches in hand");
        let _ = s.send(true);
    });
    if let Some(d) = duration {
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            let _ = stop.send(true);
        });
    }
}
