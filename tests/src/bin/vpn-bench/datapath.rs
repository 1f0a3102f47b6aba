//! The data-path rows (issue 18), `vpn-bench datapath`: Dockvpn's batched data path run three
//! ways — `--threads 2`, `--threads 1`, and `--threads 1 --offload off` (one datagram and one
//! tun packet per system call, the path before batching) — against an `openvpn` 2.6 server
//! and a `wireguard-go` server in the same SI, in interleaved rounds (rotated order). Each
//! round restarts Dockvpn with the variant's flags on one state directory, so every variant
//! serves the same clients. Per contender: iperf3 TCP through one OpenVPN client in both
//! directions, through four OpenVPN clients at once (each in its own namespace behind the
//! right host), and through one WireGuard client in both directions, with the server's CPU
//! seconds per GB. Then the ceiling (ring's AES-256-GCM and ChaCha20-Poly1305 seal rate on one
//! core), a profile of Dockvpn during a one-client transfer (`perf record` and `perf trace`,
//! per-thread user/system time from /proc), and the RSS with 20 clients of each transport.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use docknfv_tests::chain::{link, LEFT_HOST, RIGHT_HOST};
use docknfv_tests::measure::{
    aead_seal_gbps, cpu_seconds, iperf_tcp_reports_at_once, median, round_order, rss_kib, spread,
    thread_cpu_times, CpuTime,
};
use docknfv_tests::openvpn::{dockvpn_cli, dockvpn_output, start_on_state, text, OpenvpnClient};
use docknfv_tests::prereq::require_command;
use docknfv_tests::{Chain, Netns, Vnf};

use super::wireguard::{
    self, chacha20_poly1305_seal_gbps, handshake_peers, start_client, SEAL_PACKET, SEAL_SAMPLE,
};
use super::{start_openvpn_server, OPENVPN_PORT};

/// Rounds of the interleaved transfers, and how long each iperf3 run lasts.
const ROUNDS: usize = 3;
const SECONDS: &str = "5";
/// OpenVPN clients carrying a stream each at the same time in the multi-client row.
const CLIENTS_AT_ONCE: usize = 4;
/// Clients of each transport connected at once in the RSS row, and the bound.
const RSS_CLIENTS: usize = 20;
const RSS_LIMIT_MIB: f64 = 32.0;
/// How long the profilers watch Dockvpn, starting once the stream has ramped up.
const PROFILE_WARM_UP: Duration = Duration::from_secs(1);
const PROFILE_SECONDS: u64 = 3;
/// Symbols shown in the profile: the largest self shares first.
const PROFILE_TOP: usize = 12;
/// Kernel functions whose inclusive share (children) says where the system time goes, with
/// what each stands for. Those that do not show up in a recording are left out.
const KERNEL_STEPS: [(&str, &str); 14] = [
    ("do_syscall_64", "all system calls"),
    (
        "tun_get_user",
        "tun write (the kernel forwarding the packet on included)",
    ),
    ("tun_do_read", "tun read"),
    ("udp_sendmsg", "UDP send (the veth transmit included)"),
    ("udp_recvmsg", "UDP receive"),
    ("do_sys_poll", "poll (the receive thread waiting)"),
    ("do_epoll_wait", "epoll_wait (the engines' thread waiting)"),
    ("do_futex", "futex (hand-offs between the threads)"),
    (
        "handle_softirqs",
        "softirqs run on its time (forwarding, TCP, veth)",
    ),
    ("schedule", "scheduler"),
    ("_copy_from_iter", "copies from user memory"),
    ("_copy_to_iter", "copies to user memory"),
    ("skb_segment", "kernel segmentation (GSO)"),
    ("csum_partial", "checksums"),
];

/// A way to run Dockvpn's data path: the flags `dockvpn run` gets.
#[derive(Clone, Copy)]
struct Variant {
    label: &'static str,
    args: &'static [&'static str],
}

const THREADS_2: Variant = Variant {
    label: "Dockvpn --threads 2",
    args: &["--threads", "2"],
};
const THREADS_1: Variant = Variant {
    label: "Dockvpn --threads 1",
    args: &["--threads", "1"],
};
/// One thread and no offloads: one `recvfrom`/`sendto` and one tun read/write per packet.
const UNBATCHED: Variant = Variant {
    label: "Dockvpn --threads 1 --offload off",
    args: &["--threads", "1", "--offload", "off"],
};

/// Who serves a round's transfers: Dockvpn run one way, or the stock servers (`openvpn` for
/// the OpenVPN rows, `wireguard-go` for the WireGuard rows).
#[derive(Clone, Copy)]
enum Contender {
    Dockvpn(Variant),
    Stock,
}

const CONTENDERS: [Contender; 4] = [
    Contender::Dockvpn(THREADS_2),
    Contender::Dockvpn(THREADS_1),
    Contender::Dockvpn(UNBATCHED),
    Contender::Stock,
];

/// Which way a stream runs through the tunnel. The client is on the right, so `ToLeft` is
/// the client sending (Dockvpn receives datagrams: UDP GRO, then tun writes) and `FromLeft`
/// the client receiving (Dockvpn reads the tun: TSO super-packets, then UDP GSO).
#[derive(Clone, Copy, PartialEq)]
enum Direction {
    ToLeft,
    FromLeft,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Direction::ToLeft => "right → left",
            Direction::FromLeft => "left → right",
        }
    }

    /// iperf3's client runs in the right namespace; `-R` makes the left server send.
    fn iperf_options(self) -> &'static [&'static str] {
        match self {
            Direction::ToLeft => &[],
            Direction::FromLeft => &["-R"],
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Transport {
    Openvpn,
    Wireguard,
}

/// One table row: a transport, how many clients stream at once, and which way; and the
/// issue's targets for Dockvpn against the stock server (throughput at least, CPU per GB at
/// most that many times the stock server's).
#[derive(Clone, Copy, PartialEq)]
struct Row {
    transport: Transport,
    clients: usize,
    direction: Direction,
    gbps_target: Option<f64>,
    cpu_target: Option<f64>,
}

const ROWS: [Row; 5] = [
    Row {
        transport: Transport::Openvpn,
        clients: 1,
        direction: Direction::ToLeft,
        gbps_target: Some(1.5),
        cpu_target: Some(0.3),
    },
    Row {
        transport: Transport::Openvpn,
        clients: 1,
        direction: Direction::FromLeft,
        gbps_target: Some(1.5),
        cpu_target: Some(0.3),
    },
    Row {
        transport: Transport::Openvpn,
        clients: CLIENTS_AT_ONCE,
        direction: Direction::ToLeft,
        gbps_target: Some(2.0),
        cpu_target: None,
    },
    Row {
        transport: Transport::Wireguard,
        clients: 1,
        direction: Direction::ToLeft,
        gbps_target: Some(1.3),
        cpu_target: Some(0.7),
    },
    Row {
        transport: Transport::Wireguard,
        clients: 1,
        direction: Direction::FromLeft,
        gbps_target: Some(1.3),
        cpu_target: Some(0.7),
    },
];

impl Row {
    /// The index in ROWS of the row for these streams.
    fn index(transport: Transport, clients: usize, direction: Direction) -> usize {
        ROWS.iter()
            .position(|row| {
                row.transport == transport && row.clients == clients && row.direction == direction
            })
            .expect("a row in ROWS")
    }

    fn label(self) -> String {
        let transport = match self.transport {
            Transport::Openvpn => "OpenVPN UDP",
            Transport::Wireguard => "WireGuard",
        };
        let clients = if self.clients == 1 {
            "1 client".to_owned()
        } else {
            format!("{} clients", self.clients)
        };
        format!("{transport}, {clients}, {}", self.direction.label())
    }
}

/// The payload of a full TCP segment through the tunnels (MSS with timestamps), to count
/// segments from bytes.
const TCP_SEGMENT: f64 = 1448.0;

/// What one transfer measured.
#[derive(Clone, Copy)]
struct Carried {
    gbps: f64,
    cpu_per_gb: f64,
    /// TCP retransmits the senders counted per 100 segments carried: reordering or loss in
    /// the tunnel shows here.
    retransmit_percent: f64,
}

/// iperf3 streams (one per client namespace, at once) through the tunnels to the left host,
/// with the CPU seconds the server `server_pid` spent per GB they carried.
fn carried(chain: &Chain, clients: &[&Netns], server_pid: u32, direction: Direction) -> Carried {
    let mut options = vec!["-t", SECONDS];
    options.extend(direction.iperf_options());
    let cpu_before = cpu_seconds(server_pid);
    let reports = iperf_tcp_reports_at_once(clients, &chain.left_host, LEFT_HOST, &options);
    let cpu = cpu_seconds(server_pid) - cpu_before;
    let sum = |pick: fn(&serde_json::Value) -> Option<f64>| -> f64 {
        reports
            .iter()
            .map(|r| pick(r).expect("iperf3 totals"))
            .sum()
    };
    let bytes = sum(|r| r["end"]["sum_received"]["bytes"].as_f64());
    Carried {
        gbps: sum(|r| r["end"]["sum_received"]["bits_per_second"].as_f64()) / 1e9,
        cpu_per_gb: cpu / (bytes / 1e9),
        retransmit_percent: 100.0
            * sum(|r| r["end"]["sum_sent"]["retransmits"].as_f64().or(Some(0.0)))
            / (bytes / TCP_SEGMENT),
    }
}

/// Namespaces behind the right host, each with a veth to it (172.16.N.2, N = 1…), the right
/// host routing for them and the right gateway routing their networks back to it, as the
/// NAT test's hosts are wired, without the NAT: each client is its own address.
fn client_hosts(chain: &Chain, count: usize) -> Vec<Netns> {
    chain.right_host.set_sysctl("net.ipv4.ip_forward", 1);
    (1..=count)
        .map(|n| {
            let host = Netns::new(&format!("vc{n}"));
            let (network, gateway) = (format!("172.16.{n}.0/24"), format!("172.16.{n}.1"));
            link(
                &host,
                "eth0",
                &format!("172.16.{n}.2/24"),
                &chain.right_host,
                &format!("c{n}"),
                &format!("{gateway}/24"),
            );
            host.ip(&["route", "add", "default", "via", &gateway]);
            chain
                .right_gateway
                .ip(&["route", "add", &network, "via", RIGHT_HOST]);
            host
        })
        .collect()
}

/// Dockvpn's state directory for this part: every variant is started on it, so they share
/// the PKI and the registered clients. Removed on drop.
struct StateDir(PathBuf);

impl StateDir {
    fn new() -> StateDir {
        let path = std::env::temp_dir().join(format!("vpn-bench-datapath-{}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create the state directory");
        StateDir(path)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `dockvpn run` with the variant's flags on `state`, once it listens; and what its status
/// says the data path negotiated (threads, UDP and tun offloads).
fn start_dockvpn(chain: &Chain, state: &Path, variant: Variant) -> (Vnf, String) {
    let dockvpn = start_on_state(chain, state, variant.args);
    // The status file is rewritten every 2 s; the data path appears in the first one.
    let deadline = Instant::now() + Duration::from_secs(10);
    let data_path = loop {
        // `status` exits non-zero while the VNF reports itself unhealthy (the chain has no
        // management side); its JSON is there all the same.
        let output = dockvpn_output(&chain.si, state, &["status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", text(&output)));
        let data_path = &status["vpn"]["data_path"];
        // The previous variant's status stays in the state directory until this one
        // rewrites it.
        let current = status["vpn"]["pid"].as_u64() == Some(u64::from(dockvpn.pid()));
        if current && data_path.is_object() {
            break format!(
                "threads {}, udp {}, tun {}",
                data_path["threads"], data_path["udp_offloads"], data_path["tun_offloads"]
            );
        }
        assert!(
            Instant::now() < deadline,
            "{}: no vpn.data_path in the status within 10 s: {status}",
            variant.label
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    (dockvpn, data_path)
}

/// `dockvpn client add NAME` and its UDP profile.
fn openvpn_profile(chain: &Chain, state: &Path, name: &str) -> String {
    dockvpn_cli(&chain.si, state, &["client", "add", name]);
    dockvpn_cli(
        &chain.si,
        state,
        &["client", "config", name, "--proto", "udp"],
    )
}

/// A Dockvpn profile pointed at the `openvpn` server instead.
fn for_openvpn_server(profile: &str) -> String {
    profile.replace(
        "remote 10.0.2.2 1194",
        &format!("remote 10.0.2.2 {OPENVPN_PORT}"),
    )
}

/// Stock openvpn clients, one per (namespace, profile), started together; returns once all
/// are connected (each has 30 s).
fn connect_openvpn(clients: &[(&Netns, &str)], extra: &[&str], server: &Vnf) -> Vec<OpenvpnClient> {
    let connected: Vec<OpenvpnClient> = clients
        .iter()
        .map(|(ns, profile)| OpenvpnClient::start(ns, profile, extra))
        .collect();
    for client in &connected {
        client.assert_connected(server);
    }
    connected
}

/// The profiles and servers every round uses.
struct Setup {
    state: StateDir,
    /// Dockvpn profiles; the first is the one-client rows' client, the first CLIENTS_AT_ONCE
    /// the multi-client row's, all RSS_CLIENTS the RSS row's.
    openvpn_profiles: Vec<String>,
    openvpn_server: Vnf,
    wireguard: wireguard::Contenders,
    client_hosts: Vec<Netns>,
}

impl Setup {
    /// The server process that carries `transport`'s streams for `contender`.
    fn server_pid(&self, contender: Contender, transport: Transport, dockvpn: &Vnf) -> u32 {
        match (contender, transport) {
            (Contender::Dockvpn(_), _) => dockvpn.pid(),
            (Contender::Stock, Transport::Openvpn) => self.openvpn_server.pid(),
            (Contender::Stock, Transport::Wireguard) => self.wireguard.go_server.process.pid(),
        }
    }

    fn openvpn_profile(&self, contender: Contender, k: usize) -> String {
        match contender {
            Contender::Dockvpn(_) => self.openvpn_profiles[k].clone(),
            Contender::Stock => for_openvpn_server(&self.openvpn_profiles[k]),
        }
    }
}

/// Every row's transfer for `contender`, each with its index in ROWS, while `dockvpn` (the
/// variant's, or an idle one beside the stock servers) runs.
fn contender_transfers(
    chain: &Chain,
    setup: &Setup,
    contender: Contender,
    dockvpn: &Vnf,
) -> Vec<(usize, Carried)> {
    let mut samples = Vec::new();
    let openvpn_log_server = match contender {
        Contender::Dockvpn(_) => dockvpn,
        Contender::Stock => &setup.openvpn_server,
    };
    // One OpenVPN client, both directions.
    let profile = setup.openvpn_profile(contender, 0);
    let client = connect_openvpn(&[(&chain.right_host, &profile)], &[], openvpn_log_server);
    let pid = setup.server_pid(contender, Transport::Openvpn, dockvpn);
    for direction in [Direction::ToLeft, Direction::FromLeft] {
        samples.push((
            Row::index(Transport::Openvpn, 1, direction),
            carried(chain, &[&chain.right_host], pid, direction),
        ));
    }
    drop(client);
    // CLIENTS_AT_ONCE OpenVPN clients, one stream each.
    let profiles: Vec<String> = (0..CLIENTS_AT_ONCE)
        .map(|k| setup.openvpn_profile(contender, k))
        .collect();
    let hosts: Vec<&Netns> = setup.client_hosts.iter().collect();
    let pairs: Vec<(&Netns, &str)> = hosts
        .iter()
        .copied()
        .zip(profiles.iter().map(String::as_str))
        .collect();
    let clients = connect_openvpn(&pairs, &[], openvpn_log_server);
    samples.push((
        Row::index(Transport::Openvpn, CLIENTS_AT_ONCE, Direction::ToLeft),
        carried(chain, &hosts, pid, Direction::ToLeft),
    ));
    drop(clients);
    // One WireGuard client, both directions.
    let (profile, wireguard_server) = match contender {
        Contender::Dockvpn(_) => (&setup.wireguard.client, dockvpn),
        Contender::Stock => (
            &setup.wireguard.go_client,
            &setup.wireguard.go_server.process,
        ),
    };
    let client = start_client(&chain.right_host, profile, wireguard_server);
    let pid = setup.server_pid(contender, Transport::Wireguard, dockvpn);
    for direction in [Direction::ToLeft, Direction::FromLeft] {
        samples.push((
            Row::index(Transport::Wireguard, 1, direction),
            carried(chain, &[&chain.right_host], pid, direction),
        ));
    }
    drop(client);
    // Let the servers forget the clients before the next contender.
    std::thread::sleep(Duration::from_millis(300));
    samples
}

/// What the profilers saw during a one-client OpenVPN transfer through `dockvpn`.
struct Profile {
    direction: Direction,
    /// The stream's rate while profiled (perf record's sampling costs a little).
    gbps: f64,
    /// How long perf record ran, and per thread: name, user and system seconds meanwhile.
    seconds: f64,
    threads: Vec<(String, CpuTime)>,
    /// The stock openvpn client's CPU seconds in the same window: when it nears the whole
    /// window, the client, not the server, sets the rate.
    client_cpu: f64,
    /// `perf report` lines (or why there are none).
    perf_report: String,
    /// `perf trace -s` per-thread syscall summary (or why there is none).
    syscalls: String,
}

/// A stream watched by a profiler: the stream's rate, each Dockvpn thread's and the
/// client's CPU time while the profiler ran, and the profiler's output (or why none).
struct Watched {
    gbps: f64,
    /// How long the profiler ran: its sampling time plus its own start and finish.
    seconds: f64,
    threads: Vec<(String, CpuTime)>,
    client_cpu: f64,
    output: Result<String, String>,
}

/// Runs `profiler` (a bounded command) against `pid` once a one-client stream through the
/// tunnel has ramped up, and returns its output with the stream's rate and the per-thread
/// CPU time of `pid` while it ran.
fn during_transfer(
    chain: &Chain,
    pid: u32,
    client_pid: u32,
    direction: Direction,
    profiler: &mut Command,
) -> Watched {
    std::thread::scope(|scope| {
        let stream = scope.spawn(|| carried(chain, &[&chain.right_host], pid, direction));
        std::thread::sleep(PROFILE_WARM_UP);
        let (before, client_before) = (thread_cpu_times(pid), cpu_seconds(client_pid));
        let profiler_started = Instant::now();
        let output = profiler.output();
        let seconds = profiler_started.elapsed().as_secs_f64();
        let (after, client_cpu) = (
            thread_cpu_times(pid),
            cpu_seconds(client_pid) - client_before,
        );
        let threads = after
            .into_iter()
            .map(|(name, time)| {
                let start = before
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or(CpuTime::default(), |(_, t)| *t);
                (name, time - start)
            })
            .collect();
        let output = match output {
            Ok(output) if output.status.success() => Ok(String::from_utf8_lossy(&output.stdout)
                .into_owned()
                + &String::from_utf8_lossy(&output.stderr)),
            Ok(output) => Err(format!(
                "{profiler:?} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )),
            Err(error) => Err(format!("cannot run {profiler:?}: {error}")),
        };
        let gbps = stream.join().expect("the profiled stream").gbps;
        Watched {
            gbps,
            seconds,
            threads,
            client_cpu,
            output,
        }
    })
}

/// `perf record` of Dockvpn during a stream, then `perf report`: inclusive shares of the
/// kernel's system-call entry points and the largest symbols, and the self shares by binary
/// (Dockvpn's release binary is stripped: its own code, ring's AEAD included, is one lump).
/// When perf cannot record here, `strace -c -f` for the same window instead.
fn profile(chain: &Chain, dockvpn: &Vnf, client: &OpenvpnClient, direction: Direction) -> Profile {
    let client_pid = client.process.pid();
    let data = std::env::temp_dir().join(format!("vpn-bench-perf-{}.data", std::process::id()));
    let pid = dockvpn.pid().to_string();
    let seconds = PROFILE_SECONDS.to_string();
    let mut record = Command::new("perf");
    record
        .args([
            "record",
            "-g",
            "-e",
            "cpu-clock",
            "-F",
            "999",
            "-p",
            &pid,
            "-o",
        ])
        .arg(&data)
        .args(["--", "sleep", &seconds]);
    let recorded = during_transfer(chain, dockvpn.pid(), client_pid, direction, &mut record);
    let perf_report = match recorded.output {
        Ok(_) => perf_report(&data),
        Err(why) => {
            let mut strace = Command::new("timeout");
            strace.args(["-s", "INT", &seconds, "strace", "-c", "-f", "-p", &pid]);
            let counted =
                during_transfer(chain, dockvpn.pid(), client_pid, direction, &mut strace).output;
            format!(
                "perf record failed ({why}); strace -c -f for {seconds} s instead:\n{}",
                counted.unwrap_or_else(|e| e)
            )
        }
    };
    let _ = std::fs::remove_file(&data);
    let mut trace = Command::new("perf");
    trace.args(["trace", "-s", "-p", &pid, "--", "sleep", &seconds]);
    let traced = during_transfer(chain, dockvpn.pid(), client_pid, direction, &mut trace).output;
    Profile {
        direction,
        gbps: recorded.gbps,
        seconds: recorded.seconds,
        threads: recorded.threads,
        client_cpu: recorded.client_cpu,
        perf_report,
        syscalls: traced
            .map(|summary| syscall_summary(&summary))
            .unwrap_or_else(|why| why),
    }
}

/// The shares `perf report` gives for a recording: by binary (self), the system calls'
/// entry points (inclusive: everything the kernel did inside them, softirqs it ran on the
/// way included), and the largest symbols (self).
fn perf_report(data: &Path) -> String {
    let report = |args: &[&str]| -> String {
        let output = Command::new("perf")
            .arg("report")
            .arg("-i")
            .arg(data)
            .args(["--stdio", "-g", "none", "--percent-limit", "0.5"])
            .args(args)
            .output()
            .expect("run perf report");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let lines = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|line| !line.trim_start().starts_with('#') && !line.trim().is_empty())
            .map(|line| line.trim().to_owned())
            .collect()
    };
    let by_binary = lines(&report(&["--no-children", "--sort", "comm,dso"]));
    let inclusive = lines(&report(&["--children", "--sort", "sym"]));
    let steps: Vec<String> = KERNEL_STEPS
        .iter()
        .filter_map(|(symbol, meaning)| {
            let line = inclusive
                .iter()
                .find(|line| line.split_whitespace().last() == Some(symbol))?;
            let children = line.split_whitespace().next()?;
            Some(format!("{children:>7}  {symbol:<16} {meaning}"))
        })
        .collect();
    let symbols: Vec<String> = lines(&report(&["--no-children", "--sort", "dso,sym"]))
        .into_iter()
        .take(PROFILE_TOP)
        .collect();
    format!(
        "self time by thread and binary:\n  {}\nkernel functions, inclusive (children):\n  {}\nlargest symbols, self:\n  {}",
        by_binary.join("\n  "),
        steps.join("\n  "),
        symbols.join("\n  ")
    )
}

/// The rows of `perf trace -s` that carry calls: the per-thread headers and each thread's
/// busiest system calls.
fn syscall_summary(summary: &str) -> String {
    let mut kept = Vec::new();
    let mut in_thread = 0;
    for line in summary.lines() {
        let trimmed = line.trim();
        if trimmed.contains(" events, ") {
            kept.push(trimmed.to_owned());
            in_thread = 0;
        } else if trimmed.starts_with("syscall") {
            kept.push(format!("  {trimmed}"));
        } else if !trimmed.is_empty()
            && !trimmed.starts_with("---")
            && !trimmed.starts_with("Summary")
            && in_thread < 6
        {
            kept.push(format!("  {trimmed}"));
            in_thread += 1;
        }
    }
    kept.join("\n")
}

/// RSS of each server with RSS_CLIENTS OpenVPN clients (stock client processes in the right
/// host, pushed routes ignored: they would collide) and then RSS_CLIENTS WireGuard sessions
/// (boringtun handshakes) too. Dockvpn's figure is its whole process, having carried the
/// profiled streams first, so its buffer pools are at their working size.
struct Memory {
    dockvpn_idle: u64,
    dockvpn_openvpn: u64,
    dockvpn_both: u64,
    openvpn_server: u64,
    wireguard_go: u64,
}

fn memory(chain: &Chain, setup: &Setup, dockvpn: &Vnf) -> Memory {
    let dockvpn_idle = rss_kib(dockvpn.pid());
    let no_routes = ["--route-nopull"];
    let profiles: Vec<&str> = setup.openvpn_profiles[..RSS_CLIENTS]
        .iter()
        .map(String::as_str)
        .collect();
    let pairs: Vec<(&Netns, &str)> = profiles.iter().map(|p| (&chain.right_host, *p)).collect();
    let clients = connect_openvpn(&pairs, &no_routes, dockvpn);
    let dockvpn_openvpn = rss_kib(dockvpn.pid());
    handshake_peers(&chain.right_host, &setup.wireguard.peers);
    let dockvpn_both = rss_kib(dockvpn.pid());
    drop(clients);

    let stock_profiles: Vec<String> = profiles.iter().map(|p| for_openvpn_server(p)).collect();
    let pairs: Vec<(&Netns, &str)> = stock_profiles
        .iter()
        .map(|p| (&chain.right_host, p.as_str()))
        .collect();
    let clients = connect_openvpn(&pairs, &no_routes, &setup.openvpn_server);
    let openvpn_server = rss_kib(setup.openvpn_server.pid());
    drop(clients);
    handshake_peers(&chain.right_host, &setup.wireguard.go_peers);
    let wireguard_go = rss_kib(setup.wireguard.go_server.process.pid());
    Memory {
        dockvpn_idle,
        dockvpn_openvpn,
        dockvpn_both,
        openvpn_server,
        wireguard_go,
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// `median (min–max)`, `digits` decimals.
fn median_spread(values: &[f64], digits: usize) -> String {
    format!(
        "{:.digits$} ({})",
        median(&mut values.to_vec()),
        spread(values, digits)
    )
}

pub fn rows(chain: &Chain) {
    require_command("perf", "linux-perf");
    println!("load average at the start: {}", load_average());
    let state = StateDir::new();
    // The first start makes the PKI; profiles are issued while it runs.
    let (setup_dockvpn, _) = start_dockvpn(chain, &state.0, THREADS_2);
    let openvpn_profiles: Vec<String> = (1..=RSS_CLIENTS)
        .map(|k| openvpn_profile(chain, &state.0, &format!("dp{k}")))
        .collect();
    let wireguard = wireguard::Contenders::start(chain, &state.0);
    let openvpn_server = start_openvpn_server(chain, &state.0.join("pki"), "udp", OPENVPN_PORT, 0);
    drop(setup_dockvpn);
    let setup = Setup {
        openvpn_profiles,
        openvpn_server,
        wireguard,
        client_hosts: client_hosts(chain, CLIENTS_AT_ONCE),
        state,
    };

    // samples[row][contender]
    let mut samples: Vec<Vec<Vec<Carried>>> = vec![vec![Vec::new(); CONTENDERS.len()]; ROWS.len()];
    let mut data_paths: Vec<String> = vec![String::new(); CONTENDERS.len()];
    let mut loads = Vec::new();
    // The SI's routes back to the clients are Dockvpn's (removed when it exits), so the
    // stock servers run beside a Dockvpn, as in the other rows: the last variant stays up,
    // idle, while they carry their streams.
    let mut running: Option<Vnf> = None;
    let started = Instant::now();
    for round in 0..ROUNDS {
        for k in round_order(round, CONTENDERS.len()) {
            let contender = CONTENDERS[k];
            if let Contender::Dockvpn(variant) = contender {
                if let Some(mut previous) = running.take() {
                    previous.terminate();
                }
                let (dockvpn, data_path) = start_dockvpn(chain, &setup.state.0, variant);
                data_paths[k] = data_path;
                running = Some(dockvpn);
            } else if running.is_none() {
                running = Some(start_dockvpn(chain, &setup.state.0, THREADS_2).0);
            }
            let dockvpn = running.as_ref().expect("a Dockvpn runs");
            let carried = contender_transfers(chain, &setup, contender, dockvpn);
            for (row, sample) in carried {
                samples[row][k].push(sample);
            }
        }
        loads.push(load_average());
        println!(
            "round {} done after {:.0} s, load average {}",
            round + 1,
            started.elapsed().as_secs_f64(),
            loads.last().expect("a load")
        );
    }
    if let Some(mut previous) = running.take() {
        previous.terminate();
    }

    let seal_sample = |algorithm| -> Vec<f64> {
        (0..3)
            .map(|_| aead_seal_gbps(algorithm, SEAL_PACKET, SEAL_SAMPLE))
            .collect()
    };
    let aes_gcm = seal_sample(&ring::aead::AES_256_GCM);
    let chacha: Vec<f64> = (0..3).map(|_| chacha20_poly1305_seal_gbps()).collect();

    let (dockvpn, data_path) = start_dockvpn(chain, &setup.state.0, THREADS_2);
    let profiles: Vec<Profile> = {
        let client = connect_openvpn(
            &[(&chain.right_host, &setup.openvpn_profiles[0])],
            &[],
            &dockvpn,
        );
        let profiles = [Direction::ToLeft, Direction::FromLeft]
            .into_iter()
            .map(|direction| profile(chain, &dockvpn, &client[0], direction))
            .collect();
        drop(client);
        profiles
    };
    let memory = memory(chain, &setup, &dockvpn);
    let end_load = load_average();
    drop(dockvpn);

    report(
        &samples,
        &data_paths,
        &loads,
        &aes_gcm,
        &chacha,
        &data_path,
        &profiles,
        &memory,
        &end_load,
    );
}

#[allow(clippy::too_many_arguments)]
fn report(
    samples: &[Vec<Vec<Carried>>],
    data_paths: &[String],
    loads: &[String],
    aes_gcm: &[f64],
    chacha: &[f64],
    profiled_data_path: &str,
    profiles: &[Profile],
    memory: &Memory,
    end_load: &str,
) {
    let names: Vec<&str> = CONTENDERS
        .iter()
        .map(|c| match c {
            Contender::Dockvpn(variant) => variant.label,
            Contender::Stock => "stock server",
        })
        .collect();
    println!(
        "\nData path (issue 18): {ROUNDS} interleaved rounds of {SECONDS} s iperf3 TCP per row and contender; median (min–max)"
    );
    println!("load average after each round: {}", loads.join(" | "));
    for (k, name) in names.iter().enumerate() {
        if !data_paths[k].is_empty() {
            println!("  {name}: {}", data_paths[k]);
        }
    }
    let stock = CONTENDERS.len() - 1;
    let middle = |values: &[Carried], pick: fn(&Carried) -> f64| {
        median(&mut values.iter().map(pick).collect::<Vec<_>>())
    };
    for (r, row) in ROWS.iter().enumerate() {
        let stock_name = match row.transport {
            Transport::Openvpn => "openvpn 2.6 server",
            Transport::Wireguard => "wireguard-go server",
        };
        println!("\n{}", row.label());
        println!(
            "  {:<36}{:>22}{:>22}{:>18}{:>9}{:>7}",
            "", "Gbit/s", "server CPU s/GB", "retransmit %", "×Gbit/s", "×CPU"
        );
        for (k, name) in names.iter().enumerate() {
            let values = &samples[r][k];
            let name = if k == stock { stock_name } else { name };
            let column = |pick: fn(&Carried) -> f64, digits| {
                median_spread(&values.iter().map(pick).collect::<Vec<_>>(), digits)
            };
            let ratio =
                |pick: fn(&Carried) -> f64| middle(values, pick) / middle(&samples[r][stock], pick);
            println!(
                "  {name:<36}{:>22}{:>22}{:>18}{:>9.2}{:>7.2}",
                column(|c| c.gbps, 2),
                column(|c| c.cpu_per_gb, 2),
                column(|c| c.retransmit_percent, 2),
                ratio(|c| c.gbps),
                ratio(|c| c.cpu_per_gb),
            );
        }
        // The targets are the default data path's: two threads on this 2-core machine.
        let verdict = |ratio: f64, met: bool, target: String| {
            format!("{target} → {ratio:.3}× {}", met_or_not(met))
        };
        let mut targets = Vec::new();
        if let Some(target) = row.gbps_target {
            let ratio = middle(&samples[r][0], |c| c.gbps) / middle(&samples[r][stock], |c| c.gbps);
            targets.push(verdict(
                ratio,
                ratio >= target,
                format!("throughput ≥ {target}×"),
            ));
        }
        if let Some(target) = row.cpu_target {
            let ratio = middle(&samples[r][0], |c| c.cpu_per_gb)
                / middle(&samples[r][stock], |c| c.cpu_per_gb);
            targets.push(verdict(
                ratio,
                ratio <= target,
                format!("CPU per GB ≤ {target}×"),
            ));
        }
        println!("  targets ({}): {}", names[0], targets.join("; "));
    }

    println!("\nThe ceiling: one core sealing {SEAL_PACKET}-byte packets in place (ring), 3 × 1 s");
    let threads_2 = 0;
    for (cipher, rates, transport) in [
        ("AES-256-GCM", aes_gcm, Transport::Openvpn),
        ("ChaCha20-Poly1305", chacha, Transport::Wireguard),
    ] {
        let seal = median(&mut rates.to_vec());
        println!(
            "  {cipher}: {} GB/s = {:.2} s/GB",
            median_spread(rates, 2),
            1.0 / seal
        );
        for (r, row) in ROWS.iter().enumerate() {
            if row.transport != transport {
                continue;
            }
            let gbps = middle(&samples[r][threads_2], |c| c.gbps);
            println!(
                "    {}: {} reaches {:.0} % of it ({:.2} GB/s)",
                row.label(),
                names[threads_2],
                100.0 * gbps / 8.0 / seal,
                gbps / 8.0
            );
        }
    }

    println!("\nWhere Dockvpn's time goes: --threads 2 ({profiled_data_path}), one OpenVPN client");
    for profile in profiles {
        println!(
            "\n{} ({:.2} Gbit/s while recorded); CPU seconds per thread in the {:.1} s perf record ran (user / system):",
            profile.direction.label(),
            profile.gbps,
            profile.seconds
        );
        for (name, time) in &profile.threads {
            if time.user + time.system > 0.0 {
                println!("  {name:<20} {:.2} / {:.2}", time.user, time.system);
            }
        }
        println!(
            "  {:<20} {:.2} (user + system)",
            "openvpn client", profile.client_cpu
        );
        // The AEAD's share, from ring's rate on this core: each byte is opened or sealed
        // once by the server, and opening costs what sealing does.
        let busy: f64 = profile.threads.iter().map(|(_, t)| t.user + t.system).sum();
        let gigabytes = profile.gbps / 8.0 * profile.seconds;
        let crypto = gigabytes / median(&mut aes_gcm.to_vec());
        println!(
            "  AES-256-GCM at ring's rate for the {gigabytes:.2} GB carried: {crypto:.3} s, {:.0} % of the {busy:.2} s",
            100.0 * crypto / busy
        );
        println!("{}", profile.perf_report);
        println!(
            "perf trace -s (system calls per thread, {PROFILE_SECONDS} s):\n{}",
            profile.syscalls
        );
    }

    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "\nRSS (MiB), Dockvpn --threads 2 after the profiled streams; bound {RSS_LIMIT_MIB} MiB"
    );
    println!(
        "  Dockvpn idle                                  {:.1}",
        mib(memory.dockvpn_idle)
    );
    println!(
        "  Dockvpn, {RSS_CLIENTS} OpenVPN clients                   {:.1} ({})",
        mib(memory.dockvpn_openvpn),
        met_or_not(mib(memory.dockvpn_openvpn) <= RSS_LIMIT_MIB)
    );
    println!(
        "  Dockvpn, {RSS_CLIENTS} OpenVPN + {RSS_CLIENTS} WireGuard clients   {:.1} ({})",
        mib(memory.dockvpn_both),
        met_or_not(mib(memory.dockvpn_both) <= RSS_LIMIT_MIB)
    );
    println!(
        "  openvpn server, {RSS_CLIENTS} clients                   {:.1}",
        mib(memory.openvpn_server)
    );
    println!(
        "  wireguard-go server, {RSS_CLIENTS} peers                {:.1}",
        mib(memory.wireguard_go)
    );
    println!("load average at the end: {end_load}");
}

/// How a target reads in the report.
fn met_or_not(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}
