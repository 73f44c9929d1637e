//! What `/healthz` and `/livez` answer, like kube-proxy's: healthy once the
//! maps have been fully synced, while the sync loop keeps running and while
//! the source keeps delivering; `/healthz` also turns unhealthy while this
//! node is being deleted (so load balancers drain it), `/livez` does not.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use axum::http::StatusCode;

/// Which check a health answer is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// `/healthz`: also checks that this node is not being deleted.
    Healthz,
    /// `/livez`: the agent itself only.
    Livez,
}

/// A watch that has not failed for this long is taken as recovered even
/// without an event (kube-rs reconnects a watch silently; its retries,
/// while failing, come at most 30 s apart).
const RECOVERED_AFTER: Duration = Duration::from_secs(60);

/// The agent's health, fed by the sync loop, the sources and the Node.
#[derive(Debug)]
pub struct Health {
    /// How long the sync loop may stay silent, or a source keep failing,
    /// before the agent is unhealthy (kube-proxy: twice its sync period).
    bound: Duration,
    state: Mutex<HealthState>,
}

#[derive(Debug, Default)]
struct HealthState {
    /// The first full sync is done.
    synced: bool,
    /// When the sync loop last ran.
    last_updated: Option<(SystemTime, Instant)>,
    /// Per watch that failed since it last delivered: when it started
    /// failing, and its last failure.
    failing: BTreeMap<&'static str, (Instant, Instant)>,
    /// This node has a deletionTimestamp or the
    /// `ToBeDeletedByClusterAutoscaler` taint.
    node_being_deleted: bool,
}

impl Health {
    /// Health with this bound (see [`Health::bound`]).
    pub fn new(bound: Duration) -> Self {
        Health {
            bound,
            state: Mutex::new(HealthState::default()),
        }
    }

    /// How long the sync loop may stay silent, or a source keep failing,
    /// before the agent is unhealthy.
    pub fn bound(&self) -> Duration {
        self.bound
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HealthState> {
        // A panic while holding the lock leaves plain data behind: use it.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records that the sync loop ran; `synced` once the first full sync is done.
    pub fn beat(&self, synced: bool) {
        let mut state = self.state();
        state.synced |= synced;
        state.last_updated = Some((SystemTime::now(), Instant::now()));
    }

    /// Records that the watch `what` (e.g. `Service`) delivered: an event,
    /// a list, or a re-established watch.
    pub fn delivered(&self, what: &'static str) {
        self.state().failing.remove(what);
    }

    /// Records that the watch `what` failed; it counts as failing until it
    /// delivers again, or stops failing for a minute.
    pub fn failed(&self, what: &'static str) {
        let now = Instant::now();
        self.state()
            .failing
            .entry(what)
            .and_modify(|(_, last)| *last = now)
            .or_insert((now, now));
    }

    /// Records whether this node is being deleted.
    pub fn set_node_being_deleted(&self, deleting: bool) {
        self.state().node_being_deleted = deleting;
    }

    /// The status code and JSON body of `/healthz` or `/livez`.
    pub fn report(&self, probe: Probe) -> (StatusCode, String) {
        let state = self.state();
        let now = Instant::now();
        let loop_alive = state
            .last_updated
            .is_some_and(|(_, at)| now.duration_since(at) < self.bound);
        let stalled: Vec<&str> = state
            .failing
            .iter()
            .filter(|(_, (since, last))| {
                now.duration_since(*since) >= self.bound
                    && now.duration_since(*last) < RECOVERED_AFTER
            })
            .map(|(what, _)| *what)
            .collect();
        let node_eligible = !state.node_being_deleted;
        let healthy = state.synced
            && loop_alive
            && stalled.is_empty()
            && (probe == Probe::Livez || node_eligible);
        let mut body = serde_json::json!({
            "lastUpdated": state.last_updated.map(|(t, _)| rfc3339(t)).unwrap_or_default(),
            "currentTime": rfc3339(SystemTime::now()),
            "nodeEligible": node_eligible,
        });
        if !stalled.is_empty() {
            body["failingWatches"] = serde_json::json!(stalled);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_only_once_synced_and_while_watches_deliver_and_the_node_stays() {
        // A zero bound: any failure, or any silence, is too long.
        let health = Health::new(Duration::ZERO);
        assert_eq!(
            health.report(Probe::Healthz).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        let health = Health::new(Duration::from_secs(3600));
        health.beat(false);
        assert_eq!(
            health.report(Probe::Healthz).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        health.beat(true);
        assert_eq!(health.report(Probe::Healthz).0, StatusCode::OK);

        health.set_node_being_deleted(true);
        let (code, body) = health.report(Probe::Healthz);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains(r#""nodeEligible":false"#), "{body}");
        assert_eq!(health.report(Probe::Livez).0, StatusCode::OK);
        health.set_node_being_deleted(false);
        assert_eq!(health.report(Probe::Healthz).0, StatusCode::OK);
    }

    #[test]
    fn a_watch_failing_past_the_bound_is_unhealthy_until_it_delivers() {
        let health = Health::new(Duration::from_millis(1));
        let mut state = health.state();
        state.synced = true;
        // A loop beat "in the future" stays fresh for this test.
        state.last_updated = Some((SystemTime::now(), Instant::now() + Duration::from_secs(600)));
        drop(state);
        health.failed("Service");
        std::thread::sleep(Duration::from_millis(5));
        let (code, body) = health.report(Probe::Livez);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains(r#""failingWatches":["Service"]"#), "{body}");
        health.delivered("Service");
        assert_eq!(health.report(Probe::Livez).0, StatusCode::OK);
    }
}
