//! This process's network namespace, as the kernel names it to BPF
//! programs (`bpf_get_netns_cookie`): what `--socket-lb-host-namespace-only`
//! limits socket-LB to.

use std::os::fd::AsRawFd as _;

use crate::error::Context as _;

/// `SO_NETNS_COOKIE` (Linux 5.14), which the libc crate does not name.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the calling thread's network namespace.
pub fn current_netns_cookie() -> crate::Result<u64> {
    let socket = std::net::UdpSocket::bind(("127.0.0.1", 0))
        .or_else(|_| std::net::UdpSocket::bind(("::1", 0)))
        .context("opening a socket to read the network namespace cookie")?;
    let mut cookie: u64 = 0;
    let mut length = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `length` are valid for the kernel to write; the
    // descriptor is open for the call.
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut length,
        )
    };
    if result != 0 {
        return Err(std::io::Error::last_os_error())
            .context("getsockopt(SO_NETNS_COOKIE) (Linux 5.14 or later)");
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_stable_and_not_zero() {
        let cookie = current_netns_cookie().unwrap();
        assert_ne!(cookie, 0);
        assert_eq!(current_netns_cookie().unwrap(), cookie);
    }
}
