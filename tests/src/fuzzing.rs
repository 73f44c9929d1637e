//! What the packet fuzzers (`tests/tests/fuzz.rs` for IPv4,
//! `tests/tests/fuzz_ipv6.rs` for IPv6) share: the verdicts they accept,
//! XDP's hand-off mark, their size, their seed and their report.

/// `TC_ACT_UNSPEC` as BPF_PROG_TEST_RUN reports it: the packet continues.
pub const TC_CONTINUE: u32 = u32::MAX;
/// `TC_ACT_SHOT`.
pub const TC_DROP: u32 = 2;
/// `TC_ACT_REDIRECT`: a refusal or a hairpin packet sent back out.
pub const TC_REDIRECT: u32 = 7;
/// `XDP_DROP`.
pub const XDP_DROP: u32 = 1;
/// `XDP_PASS`.
pub const XDP_PASS: u32 = 2;

/// The mark XDP puts in the metadata in front of a packet it hands to the
/// TC program beside it (`service-ebpf/src/offload.rs`); BPF_PROG_TEST_RUN
/// returns the metadata in front of the packet.
pub const DEFERRED_MARK: &[u8; 4] = b"SLBD";

/// Packets per fuzzer unless `SERVICE_TESTS_FUZZ_PACKETS` says otherwise.
const DEFAULT_PACKETS: u64 = 1_000_000;

/// How many packets a fuzzer sends: `SERVICE_TESTS_FUZZ_PACKETS`, else a
/// million.
pub fn packets() -> u64 {
    std::env::var("SERVICE_TESTS_FUZZ_PACKETS")
        .map(|v| v.parse().expect("SERVICE_TESTS_FUZZ_PACKETS: a number"))
        .unwrap_or(DEFAULT_PACKETS)
}

/// The run's seed: `SERVICE_TESTS_FUZZ_SEED` (32 hex digits) to replay a
/// run, else fresh from /dev/urandom.
pub fn seed() -> [u8; 16] {
    let mut seed = [0u8; 16];
    match std::env::var("SERVICE_TESTS_FUZZ_SEED") {
        Ok(hex) => {
            assert_eq!(hex.len(), 32, "SERVICE_TESTS_FUZZ_SEED: 32 hex digits");
            for (i, byte) in seed.iter_mut().enumerate() {
                *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex digits");
            }
        }
        Err(_) => {
            use std::io::Read as _;
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut seed))
                .expect("reading /dev/urandom");
        }
    }
    seed
}

/// Bytes as hex digits.
pub fn hex(p: &[u8]) -> String {
    p.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a fuzzer's summary past libtest's capture, so `cargo xtask test`
/// shows the count and rate of every run, passing or not.
pub fn report(summary: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let _ = write!(stdout, "\n{summary}");
    let _ = stdout.flush();
}
