//! What `/healthz` and `/livez` answer, like kube-proxy's.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use axum::http::StatusCode;

/// What `/healthz` reports, like kube-proxy's: healthy once the maps have
/// been fully synced and while the sync loop keeps running.
#[derive(Debug, Default)]
pub struct Health {
    synced: AtomicBool,
    last_updated: Mutex<Option<SystemTime>>,
}

/// How long the sync loop may stay silent before `/healthz` answers 503.
const HEALTH_STALE_AFTER: Duration = Duration::from_secs(60);

impl Health {
    /// Records that the loop ran; `synced` once the first full sync is done.
    pub fn beat(&self, synced: bool) {
        if synced {
            self.synced.store(true, Ordering::Relaxed);
        }
        *self.last_updated.lock().expect("health lock") = Some(SystemTime::now());
    }

    /// The status code and JSON body of `/healthz`.
    pub fn report(&self) -> (StatusCode, String) {
        let now = SystemTime::now();
        let last = *self.last_updated.lock().expect("health lock");
        let healthy = self.synced.load(Ordering::Relaxed)
            && last.is_some_and(|t| now.duration_since(t).unwrap_or_default() < HEALTH_STALE_AFTER);
        let body = serde_json::json!({
            "lastUpdated": last.map(rfc3339).unwrap_or_default(),
            "currentTime": rfc3339(now),
            "nodeEligible": true,
        });
        let code = if healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (code, body.to_string())
    }
}

fn rfc3339(time: SystemTime) -> String {
    jiff::Timestamp::try_from(time)
        .map(|t| t.to_string())
        .unwrap_or_default()
}
