//! Measurements the benchmark binaries share.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::chain::{Chain, RIGHT_HOST};
use crate::Netns;

/// iperf3's default port, where its server listens.
const IPERF_PORT: u16 = 5201;

/// How long one iperf3 run lasts.
pub const IPERF_SECONDS: &str = "4";

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// The smallest and the largest sample: the spread a median hides.
pub fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(min, max), &v| {
            (min.min(v), max.max(v))
        })
}

/// "min–max" of the samples, each with `digits` decimals.
pub fn spread(values: &[f64], digits: usize) -> String {
    let (min, max) = min_max(values);
    format!("{min:.digits$}–{max:.digits$}")
}

/// The order in which `count` interleaved contenders run in `round`: rotated every round,
/// so each runs first (and after each other one) equally often and none always meets the
/// machine in the state the same neighbour left it in.
pub fn round_order(round: usize, count: usize) -> impl Iterator<Item = usize> {
    (0..count).map(move |k| (round + k) % count)
}

/// One iperf3 TCP run from the left host to the right host; Gbit/s received.
pub fn iperf_gbps(chain: &Chain) -> f64 {
    iperf_tcp_gbps(
        &chain.left_host,
        &chain.right_host,
        RIGHT_HOST,
        IPERF_SECONDS,
    )
}

/// One iperf3 TCP run of `seconds` from `client` to an iperf3 server started in `server` on
/// `address`; Gbit/s received.
pub fn iperf_tcp_gbps(client: &Netns, server_ns: &Netns, address: &str, seconds: &str) -> f64 {
    iperf_tcp_report(client, server_ns, address, &["-t", seconds])["end"]["sum_received"]
        ["bits_per_second"]
        .as_f64()
        .expect("bits_per_second")
        / 1e9
}

/// One iperf3 TCP run from `client` to an iperf3 server started in `server` on `address`,
/// with the client's `options` (`-t`, `-b`, …); iperf3's JSON report.
pub fn iperf_tcp_report(
    client: &Netns,
    server_ns: &Netns,
    address: &str,
    options: &[&str],
) -> serde_json::Value {
    iperf_tcp_report_on(client, server_ns, address, IPERF_PORT, options)
}

/// [`iperf_tcp_report`] with the server on `port`, so several runs can share a server's
/// namespace at once.
pub fn iperf_tcp_report_on(
    client: &Netns,
    server_ns: &Netns,
    address: &str,
    port: u16,
    options: &[&str],
) -> serde_json::Value {
    // `ip netns exec` starts even when iperf3 is missing; name the package instead.
    crate::prereq::require_command("iperf3", "iperf3");
    let port_text = port.to_string();
    let mut server = server_ns
        .command("iperf3")
        .args(["-s", "-1", "-B", address, "-p", &port_text])
        .stdout(Stdio::null())
        .spawn()
        .expect("iperf3 server (apt-get install iperf3)");
    server_ns.wait_listening(&mut server, "-ltn", port);
    let mut args = vec![
        "-c",
        address,
        "-p",
        &port_text,
        "-J",
        "--connect-timeout",
        "3000",
    ];
    args.extend(options);
    let output = client.exec("iperf3", &args);
    let _ = server.wait();
    assert!(
        output.status.success(),
        "iperf3 client: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    serde_json::from_slice(&output.stdout).expect("iperf3 JSON")
}

/// iperf3 TCP runs at the same time, one from each of `clients` to its own iperf3 server in
/// `server_ns` on `address` (ports 5201, 5202, …), each with the clients' `options`;
/// iperf3's JSON reports in the order of `clients`.
pub fn iperf_tcp_reports_at_once(
    clients: &[&Netns],
    server_ns: &Netns,
    address: &str,
    options: &[&str],
) -> Vec<serde_json::Value> {
    std::thread::scope(|scope| {
        let runs: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(k, client)| {
                let port = IPERF_PORT + k as u16;
                scope.spawn(move || iperf_tcp_report_on(client, server_ns, address, port, options))
            })
            .collect();
        runs.into_iter()
            .map(|run| run.join().expect("an iperf3 run"))
            .collect()
    })
}

/// The bytes each stream of an iperf3 JSON report delivered to its receiver.
pub fn iperf_stream_bytes(report: &serde_json::Value) -> Vec<u64> {
    report["end"]["streams"]
        .as_array()
        .unwrap_or_else(|| panic!("no streams in the iperf3 report: {report}"))
        .iter()
        .map(|stream| {
            stream["receiver"]["bytes"]
                .as_u64()
                .unwrap_or_else(|| panic!("no receiver bytes in {stream}"))
        })
        .collect()
}

/// The segments the sending side retransmitted, as iperf3 reports it (with `-R` too: the
/// server's count comes back in the client's report).
pub fn iperf_retransmits(report: &serde_json::Value) -> u64 {
    report["end"]["sum_sent"]["retransmits"]
        .as_u64()
        .unwrap_or_else(|| panic!("no retransmit count in the iperf3 report: {report}"))
}

/// The kernel's SNMP and TcpExt counters of one namespace (`nstat -asz`: absolute values,
/// the history file left alone), by name.
pub fn kernel_counters(ns: &Netns) -> BTreeMap<String, u64> {
    crate::prereq::require_command("nstat", "iproute2");
    let output = ns.exec("nstat", &["-asz"]);
    assert!(
        output.status.success(),
        "nstat -asz in {}: {}",
        ns.name(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let name = fields.next()?;
            let value = fields.next()?.parse().ok()?;
            Some((name.to_owned(), value))
        })
        .collect()
}

/// How much each of the kernel's TCP reordering counters (`TcpExt…Reorder…`: reordering a
/// sender detected from SACKs, timestamps or duplicate ACKs) grew between two snapshots of
/// [`kernel_counters`].
pub fn tcp_reordering_between(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    let reordering: BTreeMap<String, u64> = after
        .iter()
        .filter(|(name, _)| name.starts_with("TcpExt") && name.contains("Reorder"))
        .map(|(name, &value)| {
            let grown = value.saturating_sub(before.get(name).copied().unwrap_or(0));
            (name.clone(), grown)
        })
        .collect();
    assert!(
        !reordering.is_empty(),
        "this kernel shows no TcpExt…Reorder counters: {after:?}"
    );
    reordering
}

/// The bytes each reporting interval (1 s by default) of an iperf3 JSON report carried.
pub fn iperf_interval_bytes(report: &serde_json::Value) -> Vec<u64> {
    report["intervals"]
        .as_array()
        .expect("iperf3 intervals")
        .iter()
        .map(|interval| interval["sum"]["bytes"].as_u64().expect("interval bytes"))
        .collect()
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("/proc/PID/status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// CPU time (user + system, all threads) a process has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let time = cpu_time(&format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    time.user + time.system
}

/// CPU time of a process or thread, in seconds, split as the kernel accounts it.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTime {
    pub user: f64,
    pub system: f64,
}

impl std::ops::Sub for CpuTime {
    type Output = CpuTime;
    fn sub(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user - earlier.user,
            system: self.system - earlier.system,
        }
    }
}

/// Each thread of process `pid` by name (`comm`) with the CPU time it has used so far,
/// sorted by thread id. Threads that end while being read are left out.
pub fn thread_cpu_times(pid: u32) -> Vec<(String, CpuTime)> {
    let mut threads: Vec<(u32, String, CpuTime)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("/proc/PID/task")
        .filter_map(|entry| {
            let tid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let name = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
            let time = cpu_time(&format!("/proc/{pid}/task/{tid}/stat"))?;
            Some((tid, name.trim().to_owned(), time))
        })
        .collect();
    threads.sort_by_key(|(tid, _, _)| *tid);
    threads
        .into_iter()
        .map(|(_, name, time)| (name, time))
        .collect()
}

/// utime and stime of a `/proc/…/stat` file; None when it cannot be read.
fn cpu_time(path: &str) -> Option<CpuTime> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are the 14th and 15th fields of the line (the 12th and 13th after the
    // name), in USER_HZ ticks: 100 a second on Linux.
    let seconds = |field: &str| field.parse::<u64>().ok().map(|ticks| ticks as f64 / 100.0);
    Some(CpuTime {
        user: seconds(fields.get(11)?)?,
        system: seconds(fields.get(12)?)?,
    })
}

/// Seal throughput of one core for `algorithm` (ring), GB/s: `packet`-byte packets sealed
/// in place, one after another, for `sample`. The ceiling a tunnel's crypto sets.
pub fn aead_seal_gbps(
    algorithm: &'static ring::aead::Algorithm,
    packet: usize,
    sample: Duration,
) -> f64 {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey};
    let key_bytes = vec![0x42; algorithm.key_len()];
    let key = LessSafeKey::new(UnboundKey::new(algorithm, &key_bytes).expect("a key"));
    let mut plaintext = vec![0u8; packet];
    let mut counter = 0u64;
    let started = Instant::now();
    while started.elapsed() < sample {
        for _ in 0..1024 {
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&counter.to_le_bytes());
            counter += 1;
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::empty(),
                    &mut plaintext,
                )
                .expect("seal");
            std::hint::black_box(&tag);
        }
    }
    (counter as f64 * packet as f64) / started.elapsed().as_secs_f64() / 1e9
}

/// What [`new_connections`] measured: the rate, and how many attempts failed on the way.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionRate {
    pub per_second: f64,
    pub failed: usize,
}

/// New TCP connections per second from `client` to `address:port` served in `server`: 1000
/// connections or 20 s, whichever ends first; and how many attempts failed.
pub fn new_connections(client: &Netns, server: &Netns, address: &str, port: u16) -> ConnectionRate {
    const CONNECTIONS: usize = 1000;
    let address: std::net::SocketAddr = format!("{address}:{port}").parse().expect("address");
    let listener = server
        .run(|| std::net::TcpListener::bind(address))
        .expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                if listener.accept().is_err() {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        });
        let rate = client.run(|| {
            let started = Instant::now();
            let (mut made, mut failed) = (0, 0);
            while made < CONNECTIONS && started.elapsed() < Duration::from_secs(20) {
                if std::net::TcpStream::connect_timeout(&address, Duration::from_secs(1)).is_ok() {
                    made += 1;
                } else {
                    failed += 1;
                }
            }
            ConnectionRate {
                per_second: made as f64 / started.elapsed().as_secs_f64(),
                failed,
            }
        });
        done.store(true, Ordering::Relaxed);
        rate
    })
}
