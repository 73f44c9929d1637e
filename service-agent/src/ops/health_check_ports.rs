//! The health-check node ports of `externalTrafficPolicy: Local` Services,
//! as kube-proxy serves them (pkg/proxy/healthcheck): a cloud load balancer
//! probes `spec.healthCheckNodePort` on every node and sends traffic only to
//! the nodes that answer 200, the ones with a ready endpoint of the Service.
//! Any path answers: 200 when this node has at least one ready local
//! endpoint and the agent is healthy, else 503, with the JSON body
//! `{"service":{"namespace","name"},"localEndpoints","serviceProxyHealthy"}`
//! and the header `X-Load-Balancing-Endpoint-Weight` (the local endpoint
//! count). The pipeline opens a port when a Service gets one and closes it
//! when the Service goes or its policy returns to `Cluster`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse};

use log::{info, warn};

use super::health::{Health, Probe};
use crate::error::Context as _;

/// The header carrying the local endpoint count, as kube-proxy sends it
/// (`X-Load-Balancing-Endpoint-Weight`; header names are case-insensitive).
pub const WEIGHT_HEADER: &str = "x-load-balancing-endpoint-weight";

/// What one health-check port reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortHealth {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// This node's ready endpoints of the Service.
    pub local_endpoints: usize,
}

/// One open port: what it reports (shared with its server) and the server.
struct OpenPort {
    report: Arc<Mutex<PortHealth>>,
    /// One server per listening address.
    servers: Vec<tokio::task::JoinHandle<()>>,
}

impl OpenPort {
    fn close(&self) {
        for server in &self.servers {
            server.abort();
        }
    }
}

/// The open health-check ports, by port number.
pub struct HealthCheckPorts {
    /// Addresses each port listens on (`0.0.0.0` unless
    /// `--nodeport-addresses` names CIDRs, as kube-proxy).
    addresses: Vec<IpAddr>,
    /// The agent's health: `serviceProxyHealthy`.
    health: Arc<Health>,
    open: Mutex<BTreeMap<u16, OpenPort>>,
}

impl HealthCheckPorts {
    /// No port open yet; ports will listen on `addresses` (every address
    /// when empty).
    pub fn new(addresses: Vec<IpAddr>, health: Arc<Health>) -> Self {
        let addresses = if addresses.is_empty() {
            vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)]
        } else {
            addresses
        };
        HealthCheckPorts {
            addresses,
            health,
            open: Mutex::new(BTreeMap::new()),
        }
    }

    /// The ports open now.
    pub fn ports(&self) -> Vec<u16> {
        self.lock().keys().copied().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u16, OpenPort>> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes the open ports `wanted`: opens the new ones, updates what the
    /// others report, closes the ones no longer wanted. A port that cannot
    /// be opened (in use) is logged and tried again on the next update.
    /// Must run inside the tokio runtime.
    pub fn update(&self, wanted: BTreeMap<u16, PortHealth>) {
        let mut open = self.lock();
        open.retain(|port, served| {
            let keep = wanted.contains_key(port);
            if !keep {
                served.close();
                info!("health-check node port {port} closed");
            }
            keep
        });
        for (port, health) in wanted {
            if let Some(served) = open.get(&port) {
                *served
                    .report
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = health;
                continue;
            }
            let service = format!("{}/{}", health.namespace, health.name);
            let report = Arc::new(Mutex::new(health));
            match self.listen(port, report.clone()) {
                Ok(servers) => {
                    info!("health-check node port {port} open for Service {service}");
                    open.insert(port, OpenPort { report, servers });
                }
                Err(e) => warn!(
                    "health-check node port {port} of Service {service} cannot be opened: {}; retried with the next change or repair",
                    e.report()
                ),
            }
        }
    }

    /// Binds every address at `port` and serves them in one task.
    fn listen(
        &self,
        port: u16,
        report: Arc<Mutex<PortHealth>>,
    ) -> crate::Result<Vec<tokio::task::JoinHandle<()>>> {
        let mut listeners = Vec::new();
        for addr in &self.addresses {
            let addr = SocketAddr::new(*addr, port);
            let socket = match addr {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.set_reuseaddr(true)?;
            socket
                .bind(addr)
                .with_context(|| format!("binding {addr}"))?;
            listeners.push(socket.listen(128)?);
        }
        let router = Router::new()
            .fallback(answer)
            .with_state((report, self.health.clone()));
        Ok(listeners
            .into_iter()
            .map(|listener| {
                let router = router.clone();
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(listener, router).await {
                        warn!("health-check node port {port} stopped: {e}");
                    }
                })
            })
            .collect())
    }
}

impl Drop for HealthCheckPorts {
    fn drop(&mut self) {
        for served in self.lock().values() {
            served.close();
        }
    }
}

/// The answer to any request on a health-check port.
async fn answer(
    State((report, health)): State<(Arc<Mutex<PortHealth>>, Arc<Health>)>,
) -> impl IntoResponse {
    let report = report
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    // The agent's own health, as kube-proxy's `serviceProxyHealthy` (the
    // node being deleted is `/healthz`'s business, not this port's).
    let healthy = health.report(Probe::Livez).0 == StatusCode::OK;
    let (code, body) = response(&report, healthy);
    (
        code,
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/json".to_owned(),
            ),
            (
                axum::http::HeaderName::from_static(WEIGHT_HEADER),
                report.local_endpoints.to_string(),
            ),
        ],
        body,
    )
}

/// The status code and JSON body for `report` with the agent `healthy`.
fn response(report: &PortHealth, healthy: bool) -> (StatusCode, String) {
    let body = serde_json::json!({
        "service": {"namespace": report.namespace, "name": report.name},
        "localEndpoints": report.local_endpoints,
        "serviceProxyHealthy": healthy,
    });
    let code = if report.local_endpoints > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body.to_string())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use std::io::{Read as _, Write as _};

    use super::*;

    fn health(local_endpoints: usize) -> PortHealth {
        PortHealth {
            namespace: "shop".into(),
            name: "web".into(),
            local_endpoints,
        }
    }

    #[test]
    fn ok_only_with_local_endpoints_and_a_healthy_agent() {
        let (code, body) = response(&health(2), true);
        assert_eq!(code, StatusCode::OK);
        assert_eq!(
            body,
            r#"{"localEndpoints":2,"service":{"name":"web","namespace":"shop"},"serviceProxyHealthy":true}"#
        );
        assert_eq!(
            response(&health(0), true).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            response(&health(2), false).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    /// The status line and headers of a GET of `path` on loopback `port`,
    /// `None` when nothing listens.
    async fn get(port: u16, path: &str) -> Option<String> {
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            stream.write_all(request.as_bytes()).ok()?;
            let mut text = String::new();
            stream.read_to_string(&mut text).ok()?;
            Some(text)
        })
        .await
        .unwrap()
    }

    /// A port nothing listens on now.
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ports_open_answer_any_path_follow_updates_and_close() {
        let agent = Arc::new(Health::new(Duration::from_secs(60)));
        agent.beat(true);
        let ports = HealthCheckPorts::new(vec!["127.0.0.1".parse().unwrap()], agent);
        let port = free_port();
        ports.update([(port, health(1))].into());
        assert_eq!(ports.ports(), [port]);
        let text = get(port, "/any/path").await.unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("x-load-balancing-endpoint-weight: 1"),
            "{text}"
        );
        assert!(text.contains(r#""localEndpoints":1"#), "{text}");
        ports.update([(port, health(0))].into());
        let text = get(port, "/").await.unwrap();
        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
        ports.update(BTreeMap::new());
        assert!(ports.ports().is_empty());
        // The listener goes with its task.
        let mut closed = false;
        for _ in 0..50 {
            if get(port, "/").await.is_none() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(closed, "port {port} still answers");
    }
}
