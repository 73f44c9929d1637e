//! End to end, the flow lifecycle (issue 8) with the agent binary in
//! namespaces: SNAT ports come back once flows end, a UDP client with a
//! fixed source port follows its replaced backend (also from a connected
//! socket with socket-LB on, a pod's and the node's own), a deleted Service's
//! flows stop in both directions and a recreated one starts afresh, a
//! kept-alive connection survives many times the conntrack capacity of
//! short connections, and host sockets never share a tuple with SNATed
//! flows. Long-running behaviour is tested by running more flows than a
//! table holds, with test flags shortening the timeouts.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use service_common::{CT_DIR_SNAT_REPLY, map_addr_v4_octets};
use service_tests::{
    agent::{conntrack_entries, list_json, listed_backends, metric, wait_for_backends},
    cgroup::TestCgroup,
    netns::NetNs,
    require_root,
    scenario::{
        BACKEND_HTTP_PORT, BACKEND_UDP_PORT, ClusterIpScenario, TwoNodeScenario, backend_name,
        http_frontend, udp_frontend, web_service_yaml,
    },
    topology::NODE_A_EXTERNAL_IP,
    traffic::{
        CLIENT_TIMEOUT, HttpConnection, get_once, host_client_command, host_client_report,
        http_get, http_get_with_local_port, spread, udp_request, udp_stream_across_change,
    },
};

const NODE_PORT_TCP: u16 = 30080;
const NODE_PORT_UDP: u16 = 30007;

fn tcp_node_port() -> SocketAddr {
    SocketAddr::from((NODE_A_EXTERNAL_IP, NODE_PORT_TCP))
}

fn udp_node_port() -> SocketAddr {
    SocketAddr::from((NODE_A_EXTERNAL_IP, NODE_PORT_UDP))
}

/// The address of pod `index` of node B.
fn pod_b(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 202, index, 2)
}

/// Service "web" of type NodePort (HTTP and UDP echo) with the ready
/// endpoints `pods_b` (indexes of node B's pods).
fn node_port_yaml(pods_b: &[u8]) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: demo}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  ports:\n  - {{name: http, protocol: TCP, port: 80, targetPort: {BACKEND_HTTP_PORT}, nodePort: {NODE_PORT_TCP}}}\n  - {{name: echo, protocol: UDP, port: 7, targetPort: {BACKEND_UDP_PORT}, nodePort: {NODE_PORT_UDP}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: demo\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports:\n- {{name: http, protocol: TCP, port: {BACKEND_HTTP_PORT}}}\n- {{name: echo, protocol: UDP, port: {BACKEND_UDP_PORT}}}\nendpoints:\n"
    );
    for pod in pods_b {
        yaml.push_str(&format!(
            "- {{addresses: [\"{}\"], nodeName: node-b, conditions: {{ready: true}}}}\n",
            pod_b(*pod)
        ));
    }
    yaml
}

/// Runs `count` flows with `attempt`, each tried again (as a new flow) until
/// it is answered, at most `tries` times; returns the answers and how many
/// tries failed.
fn finish_flows(
    count: usize,
    tries: usize,
    attempt: impl Fn() -> anyhow::Result<String>,
) -> anyhow::Result<(Vec<String>, usize)> {
    let mut answers = Vec::new();
    let mut failed = 0;
    for flow in 0..count {
        let mut last = None;
        for _ in 0..tries {
            match attempt() {
                Ok(answer) => {
                    answers.push(answer);
                    last = None;
                    break;
                }
                Err(e) => {
                    failed += 1;
                    last = Some(e);
                }
            }
        }
        if let Some(e) = last {
            anyhow::bail!("flow {flow} failed {tries} times: {e:#}");
        }
    }
    Ok((answers, failed))
}

/// Polls `condition` every 200 ms until it holds; fails after `within`
/// with `what` and the last value seen.
fn wait_until<T: std::fmt::Debug>(
    within: Duration,
    what: &str,
    mut condition: impl FnMut() -> (bool, T),
) -> T {
    let deadline = Instant::now() + within;
    loop {
        let (done, seen) = condition();
        if done {
            return seen;
        }
        assert!(Instant::now() < deadline, "{what}: still {seen:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A metric of the agent in `node`, 0 when not exported yet.
fn metric_or_zero(node: &NetNs, series: &str) -> f64 {
    metric(node, series).ok().flatten().unwrap_or(0.0)
}

/// Acceptance 1: a NodePort whose only backend is on the other node, 3x
/// the SNAT port range of finished UDP and TCP flows, then 20 of 20 new
/// requests of each answered and conntrack empty again.
#[test]
fn snat_ports_come_back_after_three_times_the_range_of_finished_flows() {
    require_root!();
    /// A small SNAT range: the flows need every port three times over.
    const SNAT_PORTS: usize = 32;
    let setup = TwoNodeScenario::start(
        "snatgc",
        1,
        &node_port_yaml(&[0]),
        &[
            "--snat-port-range",
            "20000-20031",
            "--ct-timeout-udp",
            "1",
            "--ct-timeout-tcp-syn",
            "2",
            "--ct-timeout-tcp-fin",
            "2",
            "--ct-timeout-tcp-close",
            "1",
            "--ct-gc-max-interval-secs",
            "1",
        ],
        |_| Ok(()),
        (tcp_node_port(), "TCP", 1),
    )
    .expect("scenario");
    let client = &setup.topology.client;

    // Each UDP flow is one request and its answer from a new socket; each
    // TCP flow one request on a connection closed by both sides. A flow
    // that finds no free port is dropped (counted) and tried again as a
    // new flow, as a client would.
    let flows = 3 * SNAT_PORTS;
    let (udp, udp_failed) = client
        .run(move || finish_flows(flows, 10, || udp_request(udp_node_port())))
        .unwrap()
        .unwrap_or_else(|e| panic!("UDP: {e:#}\n{}", setup.logs()));
    let (tcp, tcp_failed) = client
        .run(move || finish_flows(flows, 10, || http_get(tcp_node_port())))
        .unwrap()
        .unwrap_or_else(|e| panic!("TCP: {e:#}\n{}", setup.logs()));
    assert!(udp.iter().chain(&tcp).all(|answer| answer == "web-b0"));
    let node_a = &setup.topology.node_a;
    let counters = list_json(setup.pins[0].path()).unwrap()["counters"].clone();
    eprintln!(
        "{flows} UDP and {flows} TCP flows through {SNAT_PORTS} SNAT ports: {udp_failed} UDP and {tcp_failed} TCP tries refused on the way; datapath counters {counters}"
    );

    // Once the flows' timeouts passed, the collector has emptied conntrack.
    let left = wait_until(Duration::from_secs(30), "conntrack entries left", || {
        let entries = conntrack_entries(setup.pins[0].path()).unwrap();
        let metric = metric_or_zero(node_a, r#"service_agent_map_entries{map="conntrack"}"#);
        // What is left, by (protocol, direction, state bits), if anything.
        let mut kinds = BTreeMap::new();
        for (key, value) in &entries {
            *kinds
                .entry((key.proto, key.direction, value.state))
                .or_insert(0) += 1;
        }
        (
            entries.len() <= 2 && metric <= 2.0,
            (entries.len(), metric, kinds),
        )
    });
    eprintln!("conntrack entries left (map, metric, kinds): {left:?}");
    let expired = metric_or_zero(
        node_a,
        "service_agent_conntrack_gc_deleted_entries_total{reason=\"expired\"}",
    );
    assert!(expired > 0.0, "the collector deleted nothing");

    // 20 of 20 new requests of each protocol, each answered at its first try.
    let (answers, failures) = spread(client, 20, udp_node_port(), udp_request).unwrap();
    assert!(
        failures.is_empty(),
        "UDP after: {failures:?}\n{}",
        setup.logs()
    );
    assert_eq!(answers.get("web-b0"), Some(&20));
    // With only 32 SNAT ports, each new connection's port was used within
    // the minute: the backend, which closed first, may still hold it in
    // TIME_WAIT and answer the SYN with an ACK; the client's RST ends that
    // and its next SYN gets through. A connect therefore waits as long as a
    // client normally does for a few SYN retransmissions.
    let (answers, failures) = spread(client, 20, tcp_node_port(), patient_http_get).unwrap();
    assert!(
        failures.is_empty(),
        "TCP after: {failures:?}\n{}",
        setup.logs()
    );
    assert_eq!(answers.get("web-b0"), Some(&20));
}

/// One HTTP GET on a new connection whose connect waits up to 10 s (SYN
/// retransmissions at 1 and 3 s included).
fn patient_http_get(target: SocketAddr) -> anyhow::Result<String> {
    let stream = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(10))?;
    get_once(stream)
}

/// What one datagram of a fixed-port client got.
#[derive(Debug)]
struct Datagram {
    /// When it was sent, relative to the change (negative: before).
    sent: f64,
    /// The backend that answered, if any.
    answer: Option<String>,
}

/// Sends a datagram to `target` every 100 ms from one socket bound to
/// `port` in `ns`, from `before` until `after` past the moment `change`
/// returned; returns every datagram with its answer.
fn fixed_port_stream(
    ns: &NetNs,
    port: u16,
    target: SocketAddr,
    before: Duration,
    after: Duration,
    change: impl FnOnce(),
) -> Vec<Datagram> {
    let stop = Arc::new(AtomicBool::new(false));
    let stop_sender = stop.clone();
    let sender = ns
        .spawn(move || {
            let socket = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], port))).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(90)))
                .unwrap();
            let mut sent = Vec::new();
            let mut buf = [0u8; 512];
            while !stop_sender.load(Ordering::Relaxed) {
                let at = Instant::now();
                socket.send_to(b"which backend?\n", target).unwrap();
                let mut answer = None;
                while at.elapsed() < Duration::from_millis(90) {
                    match socket.recv_from(&mut buf) {
                        Ok((n, from)) if from == target => {
                            answer = Some(String::from_utf8_lossy(&buf[..n]).trim().to_owned());
                            break;
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                sent.push((at, answer));
                std::thread::sleep(Duration::from_millis(100).saturating_sub(at.elapsed()));
            }
            sent
        })
        .unwrap();
    std::thread::sleep(before);
    change();
    let changed = Instant::now();
    std::thread::sleep(after);
    stop.store(true, Ordering::Relaxed);
    sender
        .join()
        .unwrap()
        .into_iter()
        .map(|(at, answer)| Datagram {
            sent: if at >= changed {
                (at - changed).as_secs_f64()
            } else {
                -(changed - at).as_secs_f64()
            },
            answer,
        })
        .collect()
}

/// Checks the issue's bound: every datagram sent more than 1 s after the
/// change was answered by `new`, and most before it by `old`.
fn assert_followed(datagrams: &[Datagram], old: &str, new: &str, logs: &str) {
    let before: Vec<&Datagram> = datagrams.iter().filter(|d| d.sent < 0.0).collect();
    let old_answers = before
        .iter()
        .filter(|d| d.answer.as_deref() == Some(old))
        .count();
    assert!(
        old_answers * 10 >= before.len() * 8,
        "before the change: {before:?}"
    );
    let late: Vec<&Datagram> = datagrams.iter().filter(|d| d.sent > 1.0).collect();
    assert!(
        late.len() >= 15,
        "too few datagrams after the change: {late:?}"
    );
    let wrong: Vec<&&Datagram> = late
        .iter()
        .filter(|d| d.answer.as_deref() != Some(new))
        .collect();
    assert!(
        wrong.is_empty(),
        "sent more than 1 s after the change, not answered by {new}: {wrong:?}\nall: {datagrams:?}\n{logs}"
    );
    let first = datagrams
        .iter()
        .find(|d| d.sent >= 0.0 && d.answer.as_deref() == Some(new));
    eprintln!(
        "{} datagrams; the first answered by {new} was sent {:?} s after the change",
        datagrams.len(),
        first.map(|d| d.sent)
    );
}

/// Acceptance 2, ClusterIP: one UDP socket with a fixed source port sends
/// every 100 ms while its only endpoint is replaced by another.
#[test]
fn a_fixed_port_udp_client_follows_its_replaced_backend_through_a_cluster_ip() {
    require_root!();
    fixed_port_client_follows_web_1_to_web_2("udpfix", web_service_yaml);
}

/// Runs the agent on `yaml(&[1])` (web's endpoints: web-1), streams from
/// a fixed client port to web's UDP ClusterIP while the file becomes
/// `yaml(&[2])`, and checks the stream followed web-1 to web-2.
fn fixed_port_client_follows_web_1_to_web_2(tag: &str, yaml: impl Fn(&[usize]) -> String) {
    let scenario = ClusterIpScenario::start(tag, &yaml(&[1]), 1).expect("scenario");
    let datagrams = fixed_port_stream(
        scenario.client(),
        40_000,
        udp_frontend(),
        Duration::from_secs(1),
        Duration::from_secs(3),
        || scenario.rewrite_yaml(&yaml(&[2])).unwrap(),
    );
    assert_followed(
        &datagrams,
        &backend_name(1),
        &backend_name(2),
        &scenario.agent.log(),
    );
}

/// Service "all" over backend pods `pods`, beside "web" (another
/// ClusterIP, the same pods and ports): what keeps a backend that leaves
/// "web" in the backends map.
fn all_service_yaml(pods: &[usize]) -> String {
    web_service_yaml(pods)
        .replace(
            "{name: web, namespace: demo}",
            "{name: all, namespace: demo}",
        )
        .replace("10.96.0.10", "10.96.0.30")
        .replace("name: web-7x2kq", "name: all-7x2kq")
        .replace("service-name: web}", "service-name: all}")
}

/// Acceptance 2 when the backend stays in the cluster: web's endpoints
/// switch from web-1 to web-2 (a blue/green switch of its selector) while
/// Service "all" keeps both, so web-1 is still a backend. The fixed-port
/// client of web's ClusterIP follows the switch all the same: the sync
/// reports web-1 as gone from web's frontend, whose UDP flows to it are
/// reaped at once.
#[test]
fn a_fixed_port_udp_client_follows_a_switch_to_another_backend_that_another_service_keeps() {
    require_root!();
    fixed_port_client_follows_web_1_to_web_2("udpsw", |web| {
        format!(
            "{}---\n{}",
            web_service_yaml(web),
            all_service_yaml(&[1, 2])
        )
    });
}

/// Acceptance 2 with socket-LB on (as the DaemonSet runs it): a pod's UDP
/// socket *connected* to the ClusterIP, which no socket hook sees again
/// after `connect`, follows its replaced backend too: socket-LB leaves
/// pods' connected UDP sockets to the packet hooks and their conntrack.
#[test]
fn a_pods_connected_udp_socket_follows_its_replaced_backend_with_socket_lb_on() {
    require_root!();
    let cgroup = TestCgroup::create().expect("test cgroup");
    let cgroup_path = cgroup.path().to_str().expect("UTF-8 path").to_owned();
    let scenario = ClusterIpScenario::start_with_agent_args(
        "udpconn",
        &web_service_yaml(&[1]),
        1,
        &["--cgroup-path", &cgroup_path],
    )
    .expect("scenario");
    // 40 datagrams, 100 ms apart, from one connected socket of a process
    // in the client pod's namespace and in the cgroup socket-LB serves.
    let (run, changed_ms) = udp_stream_across_change(
        env!("CARGO_BIN_EXE_host-client"),
        scenario.client(),
        Some(&cgroup),
        udp_frontend(),
        40,
        || scenario.rewrite_yaml(&web_service_yaml(&[2])).unwrap(),
    );
    assert_followed(
        &stream_datagrams(&run, changed_ms),
        &backend_name(1),
        &backend_name(2),
        &scenario.agent.log(),
    );
}

/// The datagrams of a `udp-stream` run of `host-client`, sent times
/// relative to `changed_ms` (ms since the Unix epoch).
fn stream_datagrams(run: &serde_json::Value, changed_ms: f64) -> Vec<Datagram> {
    run["datagrams"]
        .as_array()
        .expect("datagrams")
        .iter()
        .map(|d| Datagram {
            sent: (d[0].as_f64().unwrap() - changed_ms) / 1000.0,
            answer: d[1].as_str().map(str::to_owned),
        })
        .collect()
}

/// Acceptance 2 with socket-LB on, for a process in the node's own
/// namespace (a statsd, syslog or DNS-forwarder socket): its UDP socket
/// connected to the ClusterIP from a fixed source port is translated once,
/// at `connect`, and no packet hook sees the node's own traffic. When its
/// backend is replaced, the agent destroys the socket (`SOCK_DESTROY`),
/// the client sees the error and connects again, and lands on the new
/// backend. A socket of the same cgroup connected to the old backend's
/// address directly is left alone.
#[test]
fn a_node_process_s_connected_udp_socket_follows_its_replaced_backend_with_socket_lb_on() {
    require_root!();
    node_socket_follows_its_backend("udphost", &web_service_yaml(&[2]));
}

/// The same when the backend stays listed but stops serving (`ready:
/// false, serving: false`) while another is ready: socket-LB would keep a
/// reconnect of the same socket on it (a backend still in the map) unless
/// the destroyed socket's entries went with it.
#[test]
fn a_node_process_s_connected_udp_socket_leaves_a_backend_that_stops_serving() {
    require_root!();
    let yaml = web_service_yaml(&[1, 2]);
    let pod1 = "- addresses: [\"10.200.1.2\"]\n  conditions: {ready: true}\n";
    assert!(yaml.contains(pod1), "{yaml}");
    let yaml = yaml.replace(
        pod1,
        "- addresses: [\"10.200.1.2\"]\n  conditions: {ready: false, serving: false}\n",
    );
    node_socket_follows_its_backend("udphostns", &yaml);
}

/// Runs the node-process tests above: backend 1 alone, then `after`
/// (backend 2 taking new flows, backend 1 gone or not serving).
fn node_socket_follows_its_backend(tag: &str, after: &str) {
    let cgroup = TestCgroup::create().expect("test cgroup");
    let cgroup_path = cgroup.path().to_str().expect("UTF-8 path").to_owned();
    let scenario = ClusterIpScenario::start_with_agent_args(
        tag,
        &web_service_yaml(&[1]),
        1,
        &["--cgroup-path", &cgroup_path],
    )
    .expect("scenario");
    let node = &scenario.topology.node;
    let direct = SocketAddr::from((scenario.topology.pods[1].ip, BACKEND_UDP_PORT));
    let spawn = |kind: &str, target: SocketAddr| {
        host_client_command(
            env!("CARGO_BIN_EXE_host-client"),
            node,
            Some(&cgroup),
            &[kind.to_owned(), target.to_string(), "40".to_owned()],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting host-client")
    };
    // 40 datagrams each, 100 ms apart: one socket connected to the
    // ClusterIP (reconnecting on errors), one to backend 1's address.
    let through_service = spawn("udp-stream-reconnect", udp_frontend());
    let to_backend = spawn("udp-stream", direct);
    std::thread::sleep(Duration::from_secs(1));
    scenario.rewrite_yaml(after).unwrap();
    let changed_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as f64;
    let report = host_client_report(&through_service.wait_with_output().expect("host-client"));
    let direct_report = host_client_report(&to_backend.wait_with_output().expect("host-client"));
    let logs = scenario.agent.log();
    let run = &report["runs"][0];
    assert_followed(
        &stream_datagrams(run, changed_ms),
        &backend_name(1),
        &backend_name(2),
        &logs,
    );
    // The client met the destroyed socket's error and connected again.
    let errors: Vec<&str> = run["datagrams"]
        .as_array()
        .expect("datagrams")
        .iter()
        .filter_map(|d| d[2].as_str())
        .collect();
    let aborted = format!("(os error {})", libc::ECONNABORTED);
    assert!(
        errors.iter().any(|e| e.ends_with(&aborted)),
        "errors seen by the client: {errors:?}\n{logs}"
    );
    // The socket connected to the old backend directly kept talking to it.
    let direct_datagrams = stream_datagrams(&direct_report["runs"][0], changed_ms);
    let unanswered: Vec<&Datagram> = direct_datagrams
        .iter()
        .filter(|d| d.answer.as_deref() != Some(backend_name(1).as_str()))
        .collect();
    assert!(
        unanswered.is_empty(),
        "the socket connected to {direct} directly: {unanswered:?}\n{logs}"
    );
    assert!(
        logs.contains("connected UDP sockets of backends gone or not serving"),
        "{logs}"
    );
    let destroyed = metric_or_zero(node, "service_agent_conntrack_gc_destroyed_sockets_total");
    assert_eq!(destroyed, 1.0, "{logs}");
    eprintln!("errors seen by the client: {errors:?}; sockets destroyed: {destroyed}");
}

/// Acceptance 2, NodePort from the external client, to a backend on the
/// other node (SNATed) replaced by another one there.
#[test]
fn a_fixed_port_udp_client_follows_its_replaced_backend_through_a_node_port() {
    require_root!();
    let setup = TwoNodeScenario::start(
        "udpfixnp",
        2,
        &node_port_yaml(&[0]),
        &[],
        |_| Ok(()),
        (udp_node_port(), "UDP", 1),
    )
    .expect("scenario");
    let datagrams = fixed_port_stream(
        &setup.topology.client,
        40_000,
        udp_node_port(),
        Duration::from_secs(1),
        Duration::from_secs(3),
        || setup.rewrite_yaml(&node_port_yaml(&[1])).unwrap(),
    );
    assert_followed(&datagrams, "web-b0", "web-b1", &setup.logs());
}

/// Counts the IPv4 packets that reach a namespace from any of a set of
/// source addresses (an `AF_PACKET` socket sees them before any socket
/// of the namespace does); stopped on drop.
struct SourceWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SourceWatch {
    fn start(ns: &NetNs, sources: Vec<Ipv4Addr>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicU64::new(0));
        let total = Arc::new(AtomicU64::new(0));
        let (thread_stop, thread_seen, thread_total) = (stop.clone(), seen.clone(), total.clone());
        let (ready_sender, ready) = std::sync::mpsc::channel();
        let thread = ns
            .spawn(move || {
                // SAFETY: plain socket calls on a descriptor this thread
                // owns; the buffer outlives every recv into it.
                let fd = unsafe {
                    libc::socket(
                        libc::AF_PACKET,
                        libc::SOCK_DGRAM,
                        i32::from((libc::ETH_P_IP as u16).to_be()),
                    )
                };
                assert!(fd >= 0, "AF_PACKET socket");
                let timeout = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 100_000,
                };
                // SAFETY: as above.
                unsafe {
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_RCVTIMEO,
                        &timeout as *const libc::timeval as *const libc::c_void,
                        std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                    );
                }
                ready_sender.send(()).unwrap();
                let mut buf = [0u8; 2048];
                while !thread_stop.load(Ordering::Relaxed) {
                    // SAFETY: as above.
                    let n = unsafe {
                        libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0)
                    };
                    if n < 20 {
                        continue;
                    }
                    thread_total.fetch_add(1, Ordering::Relaxed);
                    let source = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
                    if sources.contains(&source) {
                        thread_seen.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // SAFETY: closes the descriptor opened above.
                unsafe { libc::close(fd) };
            })
            .unwrap();
        ready.recv().unwrap();
        SourceWatch {
            stop,
            seen,
            total,
            thread: Some(thread),
        }
    }

    /// Packets from the watched sources, and packets seen in all.
    fn counts(&self) -> (u64, u64) {
        (
            self.seen.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }
}

impl Drop for SourceWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A UDP request on `socket` to `target`: the answer, or `None` within
/// the client timeout.
fn ask(socket: &UdpSocket, target: SocketAddr) -> Option<String> {
    socket.send_to(b"which backend?\n", target).ok()?;
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok((n, from)) = socket.recv_from(&mut buf)
            && from == target
        {
            return Some(String::from_utf8_lossy(&buf[..n]).trim().to_owned());
        }
    }
    None
}

/// Acceptance 4: a Service deleted while a TCP connection and a UDP flow
/// are open: both directions stop together and no packet reaches the
/// client from a backend's own address; recreated with the same ClusterIP
/// and new backends, new flows reach only those.
#[test]
fn a_deleted_service_stops_both_directions_and_a_recreated_one_starts_afresh() {
    require_root!();
    let mut scenario =
        ClusterIpScenario::start("svcdel", &web_service_yaml(&[1]), 1).expect("scenario");
    let backends: Vec<Ipv4Addr> = (1..=3).map(|pod| Ipv4Addr::new(10, 200, pod, 2)).collect();
    let watch = SourceWatch::start(scenario.client(), backends);
    let node = &scenario.topology.node;

    let mut connection = HttpConnection::open(scenario.client(), http_frontend()).unwrap();
    assert_eq!(connection.get().unwrap(), backend_name(1));
    let udp = scenario
        .client()
        .run(|| {
            let socket = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 40_001))).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            socket
        })
        .unwrap();
    assert_eq!(ask(&udp, udp_frontend()).as_deref(), Some("web-1"));

    // Delete the Service (and its slice): its frontends go, its flows are
    // marked dead.
    scenario.rewrite_yaml("").unwrap();
    wait_until(Duration::from_secs(10), "frontend still listed", || {
        let listing = list_json(scenario.pin.path()).unwrap();
        (
            listed_backends(&listing, http_frontend(), "TCP").is_none(),
            (),
        )
    });
    wait_until(Duration::from_secs(10), "dead entries", || {
        let marked = metric_or_zero(node, "service_agent_conntrack_gc_marked_dead_entries_total");
        (marked >= 4.0, marked)
    });
    // Neither direction gets through any more.
    let after = connection.get();
    assert!(
        after.is_err(),
        "the deleted Service answered on TCP: {after:?}"
    );
    assert_eq!(
        ask(&udp, udp_frontend()),
        None,
        "the deleted Service answered on UDP"
    );

    // Recreated with the same ClusterIP and other backends.
    scenario.rewrite_yaml(&web_service_yaml(&[2, 3])).unwrap();
    wait_for_backends(
        &mut scenario.agent,
        scenario.pin.path(),
        http_frontend(),
        "TCP",
        2,
        Duration::from_secs(10),
    )
    .unwrap();
    let new: BTreeSet<String> = [backend_name(2), backend_name(3)].into();
    let (answers, failures) = spread(scenario.client(), 30, http_frontend(), http_get).unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(answers.keys().all(|b| new.contains(b)), "TCP: {answers:?}");
    let (answers, failures) = spread(scenario.client(), 30, udp_frontend(), udp_request).unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(answers.keys().all(|b| new.contains(b)), "UDP: {answers:?}");
    // The old UDP socket's next datagram is a new flow, to a new backend.
    let answer = ask(&udp, udp_frontend());
    assert!(
        answer.as_ref().is_some_and(|b| new.contains(b)),
        "old socket: {answer:?}"
    );
    let (from_backends, total) = watch.counts();
    assert!(total > 100, "the watch saw {total} packets");
    assert_eq!(
        from_backends, 0,
        "packets reached the client from a backend's own address"
    );
}

/// Acceptance 5: with a conntrack map of 512 entries, one kept-alive TCP
/// connection keeps its backend while three times as many short, closed
/// connections pass.
#[test]
fn a_kept_alive_connection_outlives_three_times_the_conntrack_capacity_of_short_ones() {
    require_root!();
    const CAPACITY: usize = 512;
    let scenario = ClusterIpScenario::start_with_agent_args(
        "ctsmall",
        &web_service_yaml(&[1, 2, 3]),
        3,
        &[
            "--map-size-conntrack",
            "512",
            "--ct-timeout-tcp-close",
            "1",
            "--ct-timeout-tcp-fin",
            "2",
            "--ct-gc-max-interval-secs",
            "1",
        ],
    )
    .expect("scenario");
    let mut kept = HttpConnection::open(scenario.client(), http_frontend()).unwrap();
    let backend = kept.get().unwrap();
    let mut short = 0;
    let mut answers = BTreeMap::new();
    while short < 3 * CAPACITY {
        let (batch, failures) = spread(scenario.client(), 32, http_frontend(), http_get).unwrap();
        assert!(
            failures.is_empty(),
            "short connections failed: {failures:?}"
        );
        for (name, n) in batch {
            *answers.entry(name).or_insert(0) += n;
        }
        short += 32;
        let answer = kept.get();
        assert_eq!(
            answer.as_deref().ok(),
            Some(backend.as_str()),
            "the kept-alive connection after {short} short ones: {answer:?}\n{}",
            scenario.agent.log()
        );
    }
    let listing = list_json(scenario.pin.path()).unwrap();
    let flows = listing["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["port"] == 80)
        .unwrap()["stats"]["new_flows"]
        .as_u64()
        .unwrap();
    assert!(flows as usize > 3 * CAPACITY, "{flows} flows");
    eprintln!(
        "{short} short connections ({answers:?}) and one kept-alive connection on {backend} through a {CAPACITY}-entry conntrack map; collector deleted {} expired entries",
        metric_or_zero(
            &scenario.topology.node,
            "service_agent_conntrack_gc_deleted_entries_total{reason=\"expired\"}"
        )
    );
}

/// Acceptance 6: node A's ephemeral range widened over the SNAT range;
/// the agent reserves the SNAT ports, and many host connections and SNAT
/// flows to one backend never share a tuple.
#[test]
fn host_sockets_and_snated_flows_to_one_backend_never_share_a_tuple() {
    require_root!();
    const SNAT_MIN: u16 = 20_000;
    const SNAT_MAX: u16 = 20_127;
    let setup = TwoNodeScenario::start(
        "hostsnat",
        1,
        &node_port_yaml(&[0]),
        &["--snat-port-range", "20000-20127"],
        |topology| {
            // Half of this ephemeral range is the SNAT range.
            topology.node_a.exec(
                "sysctl",
                &["-qw", "net.ipv4.ip_local_port_range=20000 20255"],
            )?;
            Ok(())
        },
        (tcp_node_port(), "TCP", 1),
    )
    .expect("scenario");
    let reserved = setup
        .topology
        .node_a
        .exec("sysctl", &["-n", "net.ipv4.ip_local_reserved_ports"])
        .unwrap();
    assert!(
        reserved.trim().split(',').any(|r| r == "20000-20127"),
        "reserved: {reserved:?}\n{}",
        setup.logs()
    );

    // Host connections from node A (source: its node-network address, the
    // SNAT address) and SNATed flows from the client, to the same backend,
    // at the same time.
    let backend = SocketAddr::from((pod_b(0), BACKEND_HTTP_PORT));
    let host = setup
        .topology
        .node_a
        .spawn(move || {
            (0..60)
                .map(|_| http_get_with_local_port(backend))
                .collect::<Vec<_>>()
        })
        .unwrap();
    let (answers, failures) =
        spread(&setup.topology.client, 60, tcp_node_port(), http_get).unwrap();
    let host = host.join().unwrap();
    assert!(failures.is_empty(), "SNATed flows: {failures:?}");
    assert_eq!(answers.get("web-b0"), Some(&60));
    let mut host_ports = BTreeSet::new();
    for result in host {
        let (port, answer) = result.expect("host connection");
        assert_eq!(answer, "web-b0");
        host_ports.insert(port);
    }
    let snat_ports: BTreeSet<u16> = conntrack_entries(setup.pins[0].path())
        .unwrap()
        .into_iter()
        .filter(|(key, _)| {
            key.direction == CT_DIR_SNAT_REPLY
                && map_addr_v4_octets(&key.saddr) == pod_b(0).octets()
        })
        .map(|(key, _)| u16::from_be(key.dport))
        .collect();
    eprintln!(
        "host ports {:?}..{:?} ({} distinct), SNAT ports {:?}..{:?} ({} distinct)",
        host_ports.first(),
        host_ports.last(),
        host_ports.len(),
        snat_ports.first(),
        snat_ports.last(),
        snat_ports.len()
    );
    assert!(!snat_ports.is_empty(), "no SNATed flow in conntrack");
    assert!(snat_ports.iter().all(|p| (SNAT_MIN..=SNAT_MAX).contains(p)));
    assert!(
        host_ports
            .iter()
            .all(|p| !(SNAT_MIN..=SNAT_MAX).contains(p)),
        "host sockets picked SNAT ports: {host_ports:?}"
    );
    assert!(host_ports.is_disjoint(&snat_ports));
}
