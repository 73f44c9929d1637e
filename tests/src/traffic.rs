//! Real servers and clients inside namespaces: a small HTTP/1.1 server and
//! a UDP server that both answer with their backend's name, a UDP echo
//! server for large datagrams, and clients that report which backend
//! answered.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::netns::NetNs;

/// How long a client waits for a connection or an answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// The fixed source port of `host-client`'s `udp-stream-reconnect`
/// socket (a long-lived client such as a DNS forwarder's).
pub const RECONNECTING_STREAM_PORT: u16 = 40_000;

/// An HTTP server and a UDP server answering with `name`; stopped on drop.
pub struct BackendServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    tcp_addr: SocketAddr,
    ns_file: std::path::PathBuf,
}

impl BackendServer {
    /// Starts both servers in `ns`, HTTP on TCP `tcp_port` and UDP on
    /// `udp_port`, all IPv4 addresses.
    pub fn start(ns: &NetNs, name: &str, tcp_port: u16, udp_port: u16) -> anyhow::Result<Self> {
        Self::start_on(ns, name, IpAddr::from([0, 0, 0, 0]), tcp_port, udp_port)
    }

    /// Starts both servers in `ns` on address `ip` (e.g. a pod's IPv6
    /// address, beside a server on every IPv4 address), HTTP on TCP
    /// `tcp_port` and UDP on `udp_port`.
    pub fn start_on(
        ns: &NetNs,
        name: &str,
        ip: IpAddr,
        tcp_port: u16,
        udp_port: u16,
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let tcp_addr = SocketAddr::new(ip, tcp_port);
        let listener = ns
            .run(move || TcpListener::bind(tcp_addr))?
            .with_context(|| format!("binding HTTP server on {tcp_addr}"))?;
        let udp_addr = SocketAddr::new(ip, udp_port);
        let udp = ns
            .run(move || UdpSocket::bind(udp_addr))?
            .with_context(|| format!("binding UDP server on {udp_addr}"))?;
        udp.set_read_timeout(Some(Duration::from_millis(100)))?;

        let http_name = name.to_owned();
        let http_stop = stop.clone();
        let http = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if http_stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let name = http_name.clone();
                std::thread::spawn(move || serve_http(stream, &name));
            }
        });
        let answer = format!("{name}\n").into_bytes();
        let udp_thread = serve_udp(udp, stop.clone(), move |_| answer.clone());
        Ok(BackendServer {
            stop,
            threads: vec![http, udp_thread],
            tcp_addr: if ip.is_unspecified() {
                SocketAddr::from(([127, 0, 0, 1], tcp_port))
            } else {
                tcp_addr
            },
            ns_file: format!("/run/netns/{}", ns.name()).into(),
        })
    }
}

/// Answers every datagram `socket` receives with `answer(datagram)`, on a
/// thread of its own, until `stop` is set (`socket` has a read timeout).
fn serve_udp(
    socket: UdpSocket,
    stop: Arc<AtomicBool>,
    answer: impl Fn(&[u8]) -> Vec<u8> + Send + 'static,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; LARGEST_DATAGRAM];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&answer(&buf[..n]), peer);
            }
        }
    })
}

/// The largest UDP datagram the test servers and clients handle.
const LARGEST_DATAGRAM: usize = 65_535;

/// A UDP server that answers every datagram with the datagram itself
/// (so a 2000-byte request gets a 2000-byte answer); stopped on drop.
pub struct UdpEchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEchoServer {
    /// Starts the server in `ns` on UDP `port`, all IPv4 addresses.
    pub fn start(ns: &NetNs, port: u16) -> anyhow::Result<Self> {
        Self::start_on(ns, IpAddr::from([0, 0, 0, 0]), port)
    }

    /// Starts the server in `ns` on UDP `ip:port` (an IPv6 address, say).
    pub fn start_on(ns: &NetNs, ip: IpAddr, port: u16) -> anyhow::Result<Self> {
        let addr = SocketAddr::new(ip, port);
        let socket = ns
            .run(move || UdpSocket::bind(addr))?
            .with_context(|| format!("binding the UDP echo server on {addr}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = serve_udp(socket, stop.clone(), <[u8]>::to_vec);
        Ok(UdpEchoServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for UdpEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sends `payload` to `target` from a new socket (so a new flow) from
/// inside the calling thread's namespace and returns the answer, which
/// must come from `target`. Use through [`NetNs::run`].
pub fn udp_exchange(target: SocketAddr, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    let socket = UdpSocket::bind(unspecified_of(target))?;
    socket.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    socket.send_to(payload, target)?;
    read_udp_datagram(&socket, target)
}

/// Sends `count` datagrams of `len` bytes, each from a new socket (a new
/// flow) and each with content of its own, from inside `ns` to an echo
/// server behind `target`; returns one line per datagram whose answer did
/// not come back whole.
pub fn echo_large_datagrams(
    ns: &NetNs,
    target: SocketAddr,
    count: usize,
    len: usize,
) -> anyhow::Result<Vec<String>> {
    ns.run(move || {
        (0..count)
            .filter_map(|index| {
                let sent: Vec<u8> = (0..len)
                    .map(|i| ((i * 7 + index * 13) % 251) as u8)
                    .collect();
                match udp_exchange(target, &sent) {
                    Ok(answer) if answer == sent => None,
                    Ok(answer) => Some(format!(
                        "datagram {index}: an answer of {} bytes that differs",
                        answer.len()
                    )),
                    Err(e) => Some(format!("datagram {index}: {e:#}")),
                }
            })
            .collect()
    })
}

/// What `ns` counted against UDP datagrams it received: checksum errors
/// (`Udp InCsumErrors`) and failed reassemblies (`Ip ReasmFails`).
pub fn udp_receive_errors(ns: &NetNs) -> anyhow::Result<(u64, u64)> {
    ns.run(|| {
        Ok((
            snmp_counter("Udp", "InCsumErrors")?,
            snmp_counter("Ip", "ReasmFails")?,
        ))
    })?
}

/// What `ns` counted against IPv6 UDP datagrams it received: checksum
/// errors (`Udp6InCsumErrors`) and failed reassemblies (`Ip6ReasmFails`).
pub fn udp6_receive_errors(ns: &NetNs) -> anyhow::Result<(u64, u64)> {
    ns.run(|| {
        let snmp6 = std::fs::read_to_string("/proc/thread-self/net/snmp6")?;
        let counter = |name: &str| -> anyhow::Result<u64> {
            snmp6
                .lines()
                .find_map(|line| {
                    let mut fields = line.split_whitespace();
                    (fields.next() == Some(name)).then(|| fields.next())
                })
                .flatten()
                .with_context(|| format!("no counter {name} in snmp6"))?
                .parse()
                .context("counter value")
        };
        Ok((counter("Udp6InCsumErrors")?, counter("Ip6ReasmFails")?))
    })?
}

/// The counter `name` of group `group` (`Udp`, `Ip`, ...) of the calling
/// thread's network namespace, from `/proc/thread-self/net/snmp` (the
/// thread's own namespace, unlike `/proc/net`, which is the process's).
fn snmp_counter(group: &str, name: &str) -> anyhow::Result<u64> {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
    let prefix = format!("{group}:");
    let mut lines = snmp.lines().filter(|line| line.starts_with(&prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no {group} counters in /proc/thread-self/net/snmp");
    };
    let index = names
        .split_whitespace()
        .position(|n| n == name)
        .with_context(|| format!("no counter {group} {name}"))?;
    values
        .split_whitespace()
        .nth(index)
        .context("counter value missing")?
        .parse()
        .context("counter value")
}

impl Drop for BackendServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop with a connection from inside the namespace.
        let addr = self.tcp_addr;
        if let Ok(file) = std::fs::File::open(&self.ns_file) {
            let _ = std::thread::spawn(move || {
                if nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).is_ok() {
                    let _ = TcpStream::connect_timeout(&addr, Duration::from_millis(200));
                }
            })
            .join();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Answers HTTP/1.1 requests on one connection until the client closes it.
fn serve_http(stream: TcpStream, name: &str) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    // `GET /peer` answers the name and the client address the server sees.
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_owned(), |peer| peer.ip().to_string());
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut close = false;
        let mut saw_request = false;
        let mut wants_peer = false;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            if !saw_request {
                wants_peer = line.starts_with("GET /peer ");
            }
            saw_request = true;
            if line.to_ascii_lowercase().starts_with("connection: close") {
                close = true;
            }
        }
        if !saw_request {
            continue;
        }
        let body = if wants_peer {
            format!("{name} {peer}\n")
        } else {
            format!("{name}\n")
        };
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if writer.write_all(response.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// A keep-alive HTTP connection, for flows that must outlive a change.
pub struct HttpConnection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl HttpConnection {
    /// Connects from inside `ns` to `target`.
    pub fn open(ns: &NetNs, target: SocketAddr) -> anyhow::Result<Self> {
        ns.run(move || Self::open_here(target))?
    }

    /// Opens a connection to `target` from the calling thread's namespace.
    pub fn open_here(target: SocketAddr) -> anyhow::Result<Self> {
        let stream = connect(target)?;
        stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(HttpConnection {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    /// The client's end of the connection (address and source port).
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.writer.local_addr()?)
    }

    /// Sends one GET and returns the body (the backend's name).
    pub fn get(&mut self) -> anyhow::Result<String> {
        self.writer
            .write_all(b"GET / HTTP/1.1\r\nHost: service\r\n\r\n")
            .context("sending request")?;
        read_http_response(&mut self.reader)
    }
}

/// Reads one HTTP response with a Content-Length body; returns the body.
fn read_http_response(reader: &mut BufReader<TcpStream>) -> anyhow::Result<String> {
    let mut status = String::new();
    reader.read_line(&mut status).context("reading status")?;
    if !status.starts_with("HTTP/1.1 200") {
        bail!("unexpected status line {status:?}");
    }
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).context("reading headers")? == 0 {
            bail!("connection closed inside the headers");
        }
        if line == "\r\n" {
            break;
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().context("content-length")?;
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).context("reading body")?;
    Ok(String::from_utf8_lossy(&body).trim().to_owned())
}

/// One HTTP GET on a new connection from inside the calling thread's
/// namespace; returns the body. Use through [`NetNs::run`].
pub fn http_get(target: SocketAddr) -> anyhow::Result<String> {
    get_once(connect(target)?)
}

/// One HTTP GET on a new connection, like [`http_get`]; returns the
/// connection's local port with the body.
pub fn http_get_with_local_port(target: SocketAddr) -> anyhow::Result<(u16, String)> {
    let stream = connect(target)?;
    let port = stream.local_addr()?.port();
    Ok((port, get_once(stream)?))
}

/// A TCP connection to `target`, within [`CLIENT_TIMEOUT`].
fn connect(target: SocketAddr) -> anyhow::Result<TcpStream> {
    TcpStream::connect_timeout(&target, CLIENT_TIMEOUT)
        .with_context(|| format!("connecting to {target}"))
}

/// Sends one GET that closes the connection and returns the body.
pub fn get_once(stream: TcpStream) -> anyhow::Result<String> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    writer.write_all(b"GET / HTTP/1.1\r\nHost: service\r\nConnection: close\r\n\r\n")?;
    read_http_response(&mut BufReader::new(stream))
}

/// One UDP request from a new socket (so a new flow) from inside the
/// calling thread's namespace; returns the answer.
pub fn udp_request(target: SocketAddr) -> anyhow::Result<String> {
    let socket = UdpSocket::bind(unspecified_of(target))?;
    socket.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    socket.send_to(b"which backend?\n", target)?;
    read_udp_answer(&socket, target)
}

/// The unspecified address (any port) of `target`'s family: what a client
/// socket towards `target` binds to.
pub fn unspecified_of(target: SocketAddr) -> SocketAddr {
    let any: IpAddr = if target.is_ipv4() {
        [0, 0, 0, 0].into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    SocketAddr::new(any, 0)
}

/// Waits for the answer to a UDP request; fails unless it comes from
/// `target`. Returns the answer as text.
fn read_udp_answer(socket: &UdpSocket, target: SocketAddr) -> anyhow::Result<String> {
    let answer = read_udp_datagram(socket, target)?;
    Ok(String::from_utf8_lossy(&answer).trim().to_owned())
}

/// Waits for the answer to a UDP request; fails unless it comes from
/// `target`. Returns its bytes.
fn read_udp_datagram(socket: &UdpSocket, target: SocketAddr) -> anyhow::Result<Vec<u8>> {
    let mut buf = vec![0u8; LARGEST_DATAGRAM];
    let (n, from) = socket
        .recv_from(&mut buf)
        .context("waiting for the UDP answer")?;
    if from != target {
        bail!("UDP answer came from {from}, not from {target}");
    }
    buf.truncate(n);
    Ok(buf)
}

/// Makes `count` requests, each on a new flow, from inside `ns`, with
/// `request`; returns how often each answer came, and the failures.
pub fn spread(
    ns: &NetNs,
    count: usize,
    target: SocketAddr,
    request: fn(SocketAddr) -> anyhow::Result<String>,
) -> anyhow::Result<(std::collections::BTreeMap<String, usize>, Vec<String>)> {
    ns.run(move || {
        let mut answers = std::collections::BTreeMap::new();
        let mut failures = Vec::new();
        for _ in 0..count {
            match request(target) {
                Ok(name) => *answers.entry(name).or_insert(0) += 1,
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
        (answers, failures)
    })
}

/// A plain `GET path` to `target` from inside the calling thread's
/// namespace; returns the status code and the body (read to the end).
pub fn http_get_path(target: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = connect(target)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no status in {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// `GET /peer` on a new connection to `target`: the answering backend's
/// name and the client address it saw (the source address the datapath
/// left on the connection).
pub fn http_get_peer_seen(target: SocketAddr) -> anyhow::Result<(String, String)> {
    let (status, body) = http_get_path(target, "/peer")?;
    anyhow::ensure!(status == 200, "status {status}: {body:?}");
    let (name, peer) = body
        .trim()
        .split_once(' ')
        .with_context(|| format!("no peer in {body:?}"))?;
    Ok((name.to_owned(), peer.to_owned()))
}

/// One HTTP GET on a new connection, like [`http_get`], failing unless the
/// socket's peer (`getpeername`) is `target`: what a client sees when
/// socket-LB sent its connection to a backend.
pub fn http_get_peer_checked(target: SocketAddr) -> anyhow::Result<String> {
    let stream = connect(target)?;
    let peer = stream.peer_addr().context("getpeername")?;
    if peer != target {
        bail!("the connection's peer is {peer}, not {target}");
    }
    get_once(stream)
}

/// One UDP request from a new socket connected to `target`; fails unless
/// the socket's peer (`getpeername`) and the answer's source (`recvfrom`)
/// are both `target`. Returns the answer.
pub fn udp_request_connected(target: SocketAddr) -> anyhow::Result<String> {
    let socket = UdpSocket::bind(unspecified_of(target))?;
    socket
        .connect(target)
        .with_context(|| format!("connecting to {target}"))?;
    let peer = socket.peer_addr().context("getpeername")?;
    if peer != target {
        bail!("the UDP socket's peer is {peer}, not {target}");
    }
    socket.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    socket.send(b"which backend?\n")?;
    read_udp_answer(&socket, target)
}

/// Runs the `host-client` binary at `exe` (an integration test's
/// `env!("CARGO_BIN_EXE_host-client")`, which only integration tests
/// see) with `args` in the namespace `ns`, inside `cgroup` if given; its
/// JSON report. Panics when it fails.
pub fn run_host_client<A: AsRef<std::ffi::OsStr>>(
    exe: &str,
    ns: &NetNs,
    cgroup: Option<&crate::cgroup::TestCgroup>,
    args: &[A],
) -> serde_json::Value {
    let output = host_client_command(exe, ns, cgroup, args)
        .output()
        .expect("running host-client");
    host_client_report(&output)
}

/// Runs `host-client udp-stream` (`count` datagrams 100 ms apart from one
/// connected socket to `target`) at `exe` in `ns`, inside `cgroup` if
/// given, calls `change` one second in, and returns the report of its run
/// with the time of the change (milliseconds since the Unix epoch, the
/// clock of the datagrams' send times).
pub fn udp_stream_across_change(
    exe: &str,
    ns: &NetNs,
    cgroup: Option<&crate::cgroup::TestCgroup>,
    target: SocketAddr,
    count: usize,
    change: impl FnOnce(),
) -> (serde_json::Value, f64) {
    let args = [
        "udp-stream".to_owned(),
        target.to_string(),
        count.to_string(),
    ];
    let client = host_client_command(exe, ns, cgroup, &args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting host-client");
    std::thread::sleep(std::time::Duration::from_secs(1));
    change();
    let changed_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after the epoch")
        .as_millis() as f64;
    let report = host_client_report(&client.wait_with_output().expect("host-client"));
    (report["runs"][0].clone(), changed_ms)
}

/// The command [`run_host_client`] runs, for a test that does something
/// while it runs (`spawn`, then [`host_client_report`] of its output).
pub fn host_client_command<A: AsRef<std::ffi::OsStr>>(
    exe: &str,
    ns: &NetNs,
    cgroup: Option<&crate::cgroup::TestCgroup>,
    args: &[A],
) -> std::process::Command {
    let mut command = std::process::Command::new(exe);
    command.args(args);
    if let Some(cgroup) = cgroup {
        cgroup
            .join_on_spawn(&mut command)
            .expect("joining the cgroup");
    }
    crate::netns::enter_on_spawn(&ns.path(), &mut command).expect("entering the namespace");
    command
}

/// The JSON report of a finished `host-client`. Panics when it failed.
pub fn host_client_report(output: &std::process::Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "host-client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("host-client JSON")
}

/// The answers of one run of a `host-client` report: backend name to
/// count.
pub fn host_client_answers(run: &serde_json::Value) -> std::collections::BTreeMap<String, u64> {
    run["answers"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, n)| (name.clone(), n.as_u64().unwrap_or(0)))
        .collect()
}
