//! A sans-IO DHCPv4 client (RFC 2131): fed received packets and the clock, it hands out
//! packets to send, the next timer and lease events. No sockets, no sleeping, no reading
//! the clock: the driver does that, so every state is unit-tested with a fake clock.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode};
use dhcproto::Encodable;
use ipnet::Ipv4Net;
use rand::rngs::OsRng;
use rand::TryRngCore;
use serde::{Deserialize, Serialize};

use super::options::{self, Malformed, Packet, RouteSource};
use crate::lease::LearnedRoute;

/// What the client asks for, 121 before 3 and 33 so servers that honour the order prefer it.
const PARAMETER_REQUEST_LIST: [u8; 13] = [1, 121, 3, 33, 249, 6, 15, 26, 28, 51, 54, 58, 59];
const FIRST_RETRANSMIT: Duration = Duration::from_secs(4);
const LAST_RETRANSMIT: Duration = Duration::from_secs(64);
const MIN_RENEW_RETRY: Duration = Duration::from_secs(60);
/// T1 and T2 are at least this (or half the lease when that is shorter): a server sending
/// T1=0 would otherwise have the client renew, re-apply and run the hook in a loop.
const MIN_TIMER_SECS: u32 = 60;
/// Shorter leases count as this long, so the timers derived from them stay apart.
const MIN_LEASE_SECS: u32 = 10;
const REQUEST_ATTEMPTS: u32 = 4;
const MIN_MESSAGE_SIZE: u16 = 576;
const DEFAULT_LEASE_SECS: u32 = 3600;
/// The first "no DHCPOFFER yet" report; later ones back off (see `next_no_offer_report`).
const FIRST_NO_OFFER_REPORT: Duration = Duration::from_secs(10);
const SECOND_NO_OFFER_REPORT: Duration = Duration::from_secs(30);
/// Reports while selecting are at most this far apart.
const MAX_NO_OFFER_REPORT_GAP: Duration = Duration::from_secs(600);

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub mac: [u8; 6],
    /// Option 57 is at least this (and at least 576).
    pub mtu: u16,
    pub hostname: Option<String>,
    /// Leases whose subnet is shorter than this prefix are refused: a /1 would make half of
    /// all addresses on-link.
    pub min_prefix: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Init,
    Selecting,
    Requesting,
    InitReboot,
    Bound,
    Renewing,
    Rebinding,
    Stopped,
}

/// A bound lease, as events report it and as the driver stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub address: Ipv4Net,
    pub server: Ipv4Addr,
    pub routers: Vec<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub routes: Vec<LearnedRoute>,
    pub route_source: RouteSource,
    pub lease_secs: u32,
    pub renew_secs: u32,
    pub rebind_secs: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Bound(Lease),
    /// A renewal or rebinding ACK; routes may differ.
    Renewed {
        previous: Lease,
        lease: Lease,
    },
    /// The lease ran out: remove its address and routes.
    Expired(Lease),
    /// The server refused: remove what the lease installed (if any), start over.
    Nak,
    Released(Lease),
    /// A reply arrived but a classless route option in it was ignored.
    RoutesRejected(Vec<String>),
    /// Still selecting: no DHCPOFFER this long after the first DISCOVER. Reported after
    /// 10 s, 30 s, 1 min, 2 min, … (at most 10 min apart), not per retransmission.
    NoOffer {
        waited: Duration,
    },
}

/// Why the client lost its lease or had to start over: typed, and formatted only for
/// people (logs, `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setback {
    /// The server refused the address with a DHCPNAK.
    Nak { server: Option<Ipv4Addr> },
    /// No DHCPACK to any of the REQUESTs for an offered or stored address.
    NoAck { requested: Option<Ipv4Addr> },
    /// No server answered the renewals and rebinding before the lease ran out.
    Expired { address: Ipv4Net },
    /// An offer or ACK whose subnet is shorter than `--dhcp-min-prefix`: the client goes
    /// on as if it never came.
    Refused {
        ack: bool,
        address: Ipv4Net,
        server: Ipv4Addr,
        min_prefix: u8,
    },
}

impl std::fmt::Display for Setback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Setback::Nak {
                server: Some(server),
            } => {
                write!(f, "DHCPNAK from {server}: the server refused the address")
            }
            Setback::Nak { server: None } => write!(f, "DHCPNAK: the server refused the address"),
            Setback::NoAck {
                requested: Some(address),
            } => write!(
                f,
                "no DHCPACK to {REQUEST_ATTEMPTS} DHCPREQUESTs for {address}; starting over"
            ),
            Setback::NoAck { requested: None } => write!(
                f,
                "no DHCPACK to {REQUEST_ATTEMPTS} DHCPREQUESTs; starting over"
            ),
            Setback::Expired { address } => write!(
                f,
                "the lease of {address} expired: no server answered the renewals"
            ),
            Setback::Refused {
                ack,
                address,
                server,
                min_prefix,
            } => write!(
                f,
                "DHCP lease refused: {} of {address} from server {server} refused: its subnet is shorter than /{min_prefix} (--dhcp-min-prefix)",
                if *ack { "ACK" } else { "offer" }
            ),
        }
    }
}

/// What the client has been doing, for `status` and the logs. Bookkeeping only: nothing
/// here steers the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub state: State,
    /// When the client entered `state`.
    pub since: Instant,
    /// DHCPOFFERs taken up since the client last bound (or started).
    pub offers_seen: u32,
    pub last_setback: Option<(Instant, Setback)>,
    /// While the client holds a lease.
    pub lease_deadlines: Option<LeaseDeadlines>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseDeadlines {
    pub address: Ipv4Net,
    /// T1: renewing (unicast to the server) starts.
    pub renew_at: Instant,
    /// T2: rebinding (broadcast to any server) starts.
    pub rebind_at: Instant,
    pub expires_at: Instant,
}

/// The bookkeeping behind `Progress`, updated at each state change.
struct Tracker {
    state: State,
    since: Instant,
    offers_seen: u32,
    last_setback: Option<(Instant, Setback)>,
    /// The next "no DHCPOFFER yet" report, while selecting.
    no_offer_report_at: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Broadcast,
    /// RENEWING and RELEASE go to the server by unicast UDP from the leased address.
    Server(Ipv4Addr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub destination: Destination,
    pub payload: Vec<u8>,
}

struct Offer {
    address: Ipv4Addr,
    server: Ipv4Addr,
    /// The IP source of the offer (the server, or its relay).
    source: Ipv4Addr,
}

pub struct Client {
    config: ClientConfig,
    state: State,
    xid: u32,
    rng: u64,
    attempt: u32,
    timer: Option<Instant>,
    offer: Option<Offer>,
    lease: Option<Lease>,
    /// When the current lease was bound, for T1, T2 and expiry.
    bound_at: Option<Instant>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    tracker: Tracker,
}

impl Client {
    /// A client with no lease: it sends DISCOVER at the first timeout, which is `now`.
    pub fn new(config: ClientConfig, seed: u64, now: Instant) -> Client {
        Client {
            config,
            state: State::Init,
            xid: 0,
            rng: seed | 1,
            attempt: 0,
            timer: Some(now),
            offer: None,
            lease: None,
            bound_at: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            tracker: Tracker {
                state: State::Init,
                since: now,
                offers_seen: 0,
                last_setback: None,
                no_offer_report_at: None,
            },
        }
    }

    /// A client that first asks to keep a stored lease (INIT-REBOOT).
    pub fn with_stored_lease(
        config: ClientConfig,
        seed: u64,
        now: Instant,
        lease: Lease,
    ) -> Client {
        let mut client = Client::new(config, seed, now);
        client.state = State::InitReboot;
        client.lease = Some(lease);
        client.new_transaction();
        client.send_request(now);
        client
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let report = self
            .tracker
            .no_offer_report_at
            .filter(|_| self.state == State::Selecting);
        [self.timer, report].into_iter().flatten().min()
    }

    pub fn progress(&self) -> Progress {
        Progress {
            state: self.state,
            since: self.tracker.since,
            offers_seen: self.tracker.offers_seen,
            last_setback: self.tracker.last_setback,
            lease_deadlines: match (self.state, self.lease_times(), &self.lease) {
                (
                    State::Bound | State::Renewing | State::Rebinding,
                    Some((renew_at, rebind_at, expires_at)),
                    Some(lease),
                ) => Some(LeaseDeadlines {
                    address: lease.address,
                    renew_at,
                    rebind_at,
                    expires_at,
                }),
                _ => None,
            },
        }
    }

    /// Notes a state change: when it happened, and the first "no DHCPOFFER" report when
    /// selecting starts. Every change ends in `restart`, `send_discover`, `send_request` or
    /// `bind`, which call it (`release` stops the client; nothing is tracked after that).
    fn track(&mut self, now: Instant) {
        if self.tracker.state == self.state {
            return;
        }
        self.tracker.state = self.state;
        self.tracker.since = now;
        self.tracker.no_offer_report_at =
            (self.state == State::Selecting).then(|| now + FIRST_NO_OFFER_REPORT);
    }

    fn set_back(&mut self, now: Instant, setback: Setback) {
        self.tracker.last_setback = Some((now, setback));
    }

    /// Reports a selecting that has seen no offer at the scheduled times.
    fn report_no_offer(&mut self, now: Instant) {
        let Some(report_at) = self.tracker.no_offer_report_at else {
            return;
        };
        if now < report_at || self.state != State::Selecting {
            return;
        }
        let waited = report_at - self.tracker.since;
        self.events.push_back(Event::NoOffer { waited });
        self.tracker.no_offer_report_at = Some(self.tracker.since + next_no_offer_report(waited));
    }

    fn random(&mut self) -> u64 {
        // xorshift64: enough for jitter, and reproducible from the seed in tests.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// 4 s, 8 s, … 64 s, each ±1 s (RFC 2131 4.1).
    fn backoff(&mut self) -> Duration {
        let base = FIRST_RETRANSMIT
            .saturating_mul(1 << self.attempt.min(4))
            .min(LAST_RETRANSMIT);
        let jitter_ms = self.random() % 2001;
        base + Duration::from_millis(jitter_ms) - Duration::from_secs(1)
    }

    /// A transaction id an off-path sender cannot predict: from the OS CSPRNG.
    fn new_transaction(&mut self) {
        self.xid = match OsRng.try_next_u32() {
            Ok(xid) => xid,
            // getrandom does not fail on Linux ≥ 3.17 once the pool is seeded; should it,
            // a fresh xid still beats none.
            Err(_) => self.random() as u32,
        };
        self.attempt = 0;
    }

    fn lease_times(&self) -> Option<(Instant, Instant, Instant)> {
        let (lease, bound_at) = (self.lease.as_ref()?, self.bound_at?);
        let at = |secs: u32| bound_at + Duration::from_secs(u64::from(secs));
        Some((
            at(lease.renew_secs),
            at(lease.rebind_secs),
            at(lease.lease_secs),
        ))
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.report_no_offer(now);
        if self.timer.is_none_or(|t| now < t) {
            return;
        }
        match self.state {
            State::Init => {
                self.new_transaction();
                self.state = State::Selecting;
                self.send_discover(now);
            }
            State::Selecting => {
                self.attempt += 1;
                self.send_discover(now);
            }
            State::Requesting | State::InitReboot => {
                self.attempt += 1;
                if self.attempt >= REQUEST_ATTEMPTS {
                    let requested = match (&self.offer, &self.lease) {
                        (Some(offer), _) => Some(offer.address),
                        (None, Some(lease)) => Some(lease.address.addr()),
                        (None, None) => None,
                    };
                    self.set_back(now, Setback::NoAck { requested });
                    self.restart(now);
                } else {
                    self.send_request(now);
                }
            }
            State::Bound => {
                self.new_transaction();
                self.state = State::Renewing;
                self.send_request(now);
            }
            State::Renewing | State::Rebinding => {
                let Some((_, rebind_at, expires_at)) = self.lease_times() else {
                    self.restart(now);
                    return;
                };
                if now >= expires_at {
                    if let Some(lease) = self.lease.take() {
                        self.set_back(
                            now,
                            Setback::Expired {
                                address: lease.address,
                            },
                        );
                        self.events.push_back(Event::Expired(lease));
                    }
                    self.restart(now);
                } else {
                    if self.state == State::Renewing && now >= rebind_at {
                        self.new_transaction();
                        self.state = State::Rebinding;
                    }
                    self.send_request(now);
                }
            }
            State::Stopped => self.timer = None,
        }
    }

    fn restart(&mut self, now: Instant) {
        self.state = State::Init;
        self.offer = None;
        self.bound_at = None;
        self.timer = Some(now);
        self.track(now);
    }

    fn message(&self, kind: MessageType) -> Message {
        let mut message = Message::default();
        message
            .set_opcode(Opcode::BootRequest)
            .set_htype(HType::Eth)
            .set_xid(self.xid)
            .set_chaddr(&self.config.mac);
        let options = message.opts_mut();
        options.insert(DhcpOption::MessageType(kind));
        let mut client_id = vec![1];
        client_id.extend_from_slice(&self.config.mac);
        options.insert(DhcpOption::ClientIdentifier(client_id));
        if kind != MessageType::Release {
            options.insert(DhcpOption::ParameterRequestList(
                PARAMETER_REQUEST_LIST
                    .iter()
                    .map(|&c| OptionCode::from(c))
                    .collect(),
            ));
            options.insert(DhcpOption::MaxMessageSize(
                self.config.mtu.max(MIN_MESSAGE_SIZE),
            ));
            if let Some(hostname) = &self.config.hostname {
                options.insert(DhcpOption::Hostname(hostname.clone()));
            }
        }
        message
    }

    fn queue(&mut self, message: &Message, destination: Destination) {
        // Encoding our own well-formed message cannot fail; skip the send if it ever does.
        if let Ok(payload) = message.to_vec() {
            self.transmits.push_back(Transmit {
                destination,
                payload,
            });
        }
    }

    fn send_discover(&mut self, now: Instant) {
        let mut message = self.message(MessageType::Discover);
        message.set_flags(Flags::default().set_broadcast());
        self.queue(&message, Destination::Broadcast);
        let wait = self.backoff();
        self.timer = Some(now + wait);
        self.track(now);
    }

    fn send_request(&mut self, now: Instant) {
        let mut message = self.message(MessageType::Request);
        let destination = match (self.state, &self.offer, &self.lease) {
            (State::Requesting, Some(offer), _) => {
                message.set_flags(Flags::default().set_broadcast());
                message
                    .opts_mut()
                    .insert(DhcpOption::RequestedIpAddress(offer.address));
                message
                    .opts_mut()
                    .insert(DhcpOption::ServerIdentifier(offer.server));
                Destination::Broadcast
            }
            (State::InitReboot, _, Some(lease)) => {
                message.set_flags(Flags::default().set_broadcast());
                message
                    .opts_mut()
                    .insert(DhcpOption::RequestedIpAddress(lease.address.addr()));
                Destination::Broadcast
            }
            // RENEWING and REBINDING: ciaddr, and neither option 50 nor 54 (RFC 2131 4.3.2).
            (State::Renewing, _, Some(lease)) => {
                message.set_ciaddr(lease.address.addr());
                Destination::Server(lease.server)
            }
            (State::Rebinding, _, Some(lease)) => {
                message.set_ciaddr(lease.address.addr());
                Destination::Broadcast
            }
            _ => return self.restart(now),
        };
        self.queue(&message, destination);
        self.timer = Some(match (self.state, self.lease_times()) {
            // Half the time left to the next deadline, at least a minute (RFC 2131 4.4.5).
            (State::Renewing, Some((_, rebind_at, _))) => retry_before(now, rebind_at),
            (State::Rebinding, Some((_, _, expires_at))) => retry_before(now, expires_at),
            _ => {
                let wait = self.backoff();
                now + wait
            }
        });
        self.track(now);
    }

    /// Releases a bound lease (clean shutdown) and stops.
    pub fn release(&mut self) {
        if let (State::Bound | State::Renewing | State::Rebinding, Some(lease)) =
            (self.state, self.lease.take())
        {
            let mut message = self.message(MessageType::Release);
            message.set_ciaddr(lease.address.addr());
            message
                .opts_mut()
                .insert(DhcpOption::ServerIdentifier(lease.server));
            self.queue(&message, Destination::Server(lease.server));
            self.events.push_back(Event::Released(lease));
        }
        self.state = State::Stopped;
        self.timer = None;
    }

    /// Feeds a packet received from IP address `source`. Err says why it was dropped; the
    /// state is then unchanged.
    pub fn handle_packet(
        &mut self,
        now: Instant,
        source: Ipv4Addr,
        bytes: &[u8],
    ) -> Result<(), Malformed> {
        let packet = Packet::parse(bytes)?;
        let header = &packet.header;
        if header.op != 2 {
            return Err(Malformed("not a BOOTREPLY".into()));
        }
        if header.xid != self.xid || header.chaddr != self.config.mac {
            return Err(Malformed(format!(
                "xid {:#x} or chaddr is not ours",
                header.xid
            )));
        }
        let kind = packet
            .byte(options::MESSAGE_TYPE)
            .ok_or_else(|| Malformed("no message type".into()))?;
        self.check_sender(source, packet.address(options::SERVER_ID))?;
        match (self.state, kind) {
            (State::Selecting, 2) => {
                let server = packet
                    .address(options::SERVER_ID)
                    .ok_or_else(|| Malformed("OFFER without server id".into()))?;
                if header.yiaddr.is_unspecified() {
                    return Err(Malformed("OFFER without an address".into()));
                }
                let prefix = lease_prefix(&packet)?;
                if prefix < self.config.min_prefix {
                    self.refuse_prefix(now, false, header.yiaddr, prefix, server);
                    // An offer came: "no DHCPOFFER" would mislead from here on.
                    self.tracker.offers_seen += 1;
                    self.tracker.no_offer_report_at = None;
                    return Ok(());
                }
                self.offer = Some(Offer {
                    address: header.yiaddr,
                    server,
                    source,
                });
                self.tracker.offers_seen += 1;
                self.state = State::Requesting;
                self.attempt = 0;
                self.send_request(now);
                Ok(())
            }
            (State::Requesting | State::InitReboot | State::Renewing | State::Rebinding, 5) => {
                self.bind(now, &packet)
            }
            (State::Requesting | State::InitReboot | State::Renewing | State::Rebinding, 6) => {
                let server = packet.address(options::SERVER_ID);
                self.set_back(now, Setback::Nak { server });
                self.events.push_back(Event::Nak);
                self.lease = None;
                self.restart(now);
                Ok(())
            }
            (state, kind) => Err(Malformed(format!(
                "message type {kind} is unexpected in {state:?}"
            ))),
        }
    }

    /// Only the server whose offer was taken may answer the REQUEST, and only the leasing
    /// server a renewal — by server identifier and IP source — so another server on the
    /// segment cannot slip in an ACK or a NAK. INIT-REBOOT and REBINDING broadcast to any
    /// server (RFC 2131 4.3.2).
    fn check_sender(&self, source: Ipv4Addr, server_id: Option<Ipv4Addr>) -> Result<(), Malformed> {
        let (server, server_source) = match (self.state, &self.offer, &self.lease) {
            (State::Requesting, Some(offer), _) => (offer.server, offer.source),
            (State::Renewing, _, Some(lease)) => (lease.server, lease.server),
            _ => return Ok(()),
        };
        if server_id == Some(server) && source == server_source {
            return Ok(());
        }
        let server_id = server_id.map_or_else(|| "none".to_owned(), |id| id.to_string());
        Err(Malformed(format!(
            "reply from {source} with server id {server_id} in {:?}: only server {server} (from {server_source}) may answer",
            self.state
        )))
    }

    fn refuse_prefix(
        &mut self,
        now: Instant,
        ack: bool,
        address: Ipv4Addr,
        prefix: u8,
        server: Ipv4Addr,
    ) {
        let setback = Setback::Refused {
            ack,
            address: Ipv4Net::new_assert(address, prefix),
            server,
            min_prefix: self.config.min_prefix,
        };
        self.set_back(now, setback);
    }

    fn bind(&mut self, now: Instant, packet: &Packet) -> Result<(), Malformed> {
        let address = packet.header.yiaddr;
        if address.is_unspecified() {
            return Err(Malformed("ACK without an address".into()));
        }
        let prefix = lease_prefix(packet)?;
        let server = packet
            .address(options::SERVER_ID)
            .or(self.lease.as_ref().map(|l| l.server))
            .or(self.offer.as_ref().map(|o| o.server))
            .ok_or_else(|| Malformed("ACK without server id".into()))?;
        if prefix < self.config.min_prefix {
            self.refuse_prefix(now, true, address, prefix, server);
            return Ok(());
        }
        // A lease of a second or two would have the client renew in a loop.
        let lease_secs = packet
            .u32(options::LEASE_TIME)
            .filter(|&s| s > 0)
            .unwrap_or(DEFAULT_LEASE_SECS)
            .max(MIN_LEASE_SECS);
        let floor = MIN_TIMER_SECS.min(lease_secs / 2);
        let mut renew_secs = packet
            .u32(options::RENEWAL_TIME)
            .unwrap_or(lease_secs / 2)
            .max(floor);
        let mut rebind_secs = packet
            .u32(options::REBINDING_TIME)
            .unwrap_or(lease_secs / 8 * 7)
            .max(floor);
        if !(renew_secs < rebind_secs && rebind_secs < lease_secs) {
            renew_secs = lease_secs / 2;
            rebind_secs = lease_secs / 8 * 7;
        }
        let (routes, route_source, rejected) = options::select_routes(packet);
        if !rejected.is_empty() {
            self.events.push_back(Event::RoutesRejected(rejected));
        }
        let lease = Lease {
            address: Ipv4Net::new(address, prefix).map_err(|_| Malformed("bad prefix".into()))?,
            server,
            routers: packet.addresses(options::ROUTER),
            dns: packet.addresses(options::DNS),
            routes,
            route_source,
            lease_secs,
            renew_secs,
            rebind_secs,
        };
        let event = match (self.state, self.lease.take()) {
            (State::Renewing | State::Rebinding, Some(previous)) => Event::Renewed {
                previous,
                lease: lease.clone(),
            },
            _ => Event::Bound(lease.clone()),
        };
        self.events.push_back(event);
        self.lease = Some(lease);
        self.bound_at = Some(now);
        self.offer = None;
        self.state = State::Bound;
        self.timer = self.lease_times().map(|(renew_at, _, _)| renew_at);
        self.tracker.offers_seen = 0;
        self.track(now);
        Ok(())
    }
}

/// 10 s, 30 s, then each report at twice the time waited so far, at most 10 min later.
fn next_no_offer_report(waited: Duration) -> Duration {
    if waited < FIRST_NO_OFFER_REPORT {
        FIRST_NO_OFFER_REPORT
    } else if waited < SECOND_NO_OFFER_REPORT {
        SECOND_NO_OFFER_REPORT
    } else {
        (waited * 2).min(waited + MAX_NO_OFFER_REPORT_GAP)
    }
}

/// The lease's prefix length from option 1 (a /24 without it).
fn lease_prefix(packet: &Packet) -> Result<u8, Malformed> {
    match packet.address(options::SUBNET_MASK) {
        Some(mask) => {
            let bits = u32::from(mask);
            if bits.leading_ones() + bits.trailing_zeros() != 32 {
                return Err(Malformed(format!("subnet mask {mask} is not contiguous")));
            }
            Ok(bits.leading_ones() as u8)
        }
        None => Ok(24),
    }
}

fn retry_before(now: Instant, deadline: Instant) -> Instant {
    let half = deadline.saturating_duration_since(now) / 2;
    (now + half.max(MIN_RENEW_RETRY)).min(deadline)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v4::DhcpOptions;
    use dhcproto::{Decodable, Decoder};

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 7];
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
    const ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 50);

    fn config() -> ClientConfig {
        ClientConfig {
            mac: MAC,
            mtu: 1500,
            hostname: Some("si".into()),
            min_prefix: 8,
        }
    }

    fn decode(transmit: &Transmit) -> Message {
        Message::decode(&mut Decoder::new(&transmit.payload)).unwrap()
    }

    fn kind(message: &Message) -> MessageType {
        message.opts().msg_type().unwrap()
    }

    fn reply(request: &Message, kind: MessageType, extra: &[DhcpOption]) -> Vec<u8> {
        let mut message = Message::default();
        message
            .set_opcode(Opcode::BootReply)
            .set_htype(HType::Eth)
            .set_xid(request.xid())
            .set_chaddr(&MAC);
        if kind != MessageType::Nak {
            message.set_yiaddr(ADDRESS);
        }
        let mut options = DhcpOptions::default();
        options.insert(DhcpOption::MessageType(kind));
        options.insert(DhcpOption::ServerIdentifier(SERVER));
        for option in extra {
            options.insert(option.clone());
        }
        message.set_opts(options);
        message.to_vec().unwrap()
    }

    fn ack_options(lease_secs: u32, classless: &[u8]) -> Vec<DhcpOption> {
        vec![
            DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)),
            DhcpOption::AddressLeaseTime(lease_secs),
            DhcpOption::Router(vec![SERVER]),
            DhcpOption::Unknown(dhcproto::v4::UnknownOption::new(
                OptionCode::from(121),
                classless.to_vec(),
            )),
        ]
    }

    /// Drives a fresh client to REQUESTING at `now`; returns it and its REQUEST.
    fn requesting(seed: u64, now: Instant) -> (Client, Message) {
        let mut client = Client::new(config(), seed, now);
        client.handle_timeout(now);
        let discover = decode(&client.poll_transmit().unwrap());
        client
            .handle_packet(now, SERVER, &reply(&discover, MessageType::Offer, &[]))
            .unwrap();
        let request = decode(&client.poll_transmit().unwrap());
        (client, request)
    }

    /// Drives a fresh client to BOUND; returns it and the time it bound.
    fn bound(lease_secs: u32) -> (Client, Instant) {
        let start = Instant::now();
        let (mut client, request) = requesting(42, start);
        client
            .handle_packet(
                start,
                SERVER,
                &reply(
                    &request,
                    MessageType::Ack,
                    &ack_options(lease_secs, &[24, 192, 168, 10, 10, 0, 1, 1]),
                ),
            )
            .unwrap();
        (client, start)
    }

    #[test]
    fn discover_offer_request_ack() {
        let now = Instant::now();
        let mut client = Client::new(config(), 1, now);
        assert_eq!(client.poll_timeout(), Some(now));
        client.handle_timeout(now);
        let transmit = client.poll_transmit().unwrap();
        assert_eq!(transmit.destination, Destination::Broadcast);
        let discover = decode(&transmit);
        assert_eq!(kind(&discover), MessageType::Discover);
        let Some(DhcpOption::ParameterRequestList(list)) =
            discover.opts().get(OptionCode::ParameterRequestList)
        else {
            panic!("no parameter request list")
        };
        let position = |code: u8| list.iter().position(|c| u8::from(*c) == code).unwrap();
        assert!(
            position(121) < position(3)
                && position(121) < position(33)
                && list.iter().any(|c| u8::from(*c) == 249)
        );
        assert_eq!(
            discover.opts().get(OptionCode::MaxMessageSize),
            Some(&DhcpOption::MaxMessageSize(1500))
        );
        let wait = client.poll_timeout().unwrap() - now;
        assert!(
            wait >= Duration::from_secs(3) && wait <= Duration::from_secs(5),
            "{wait:?}"
        );

        client
            .handle_packet(now, SERVER, &reply(&discover, MessageType::Offer, &[]))
            .unwrap();
        let request = decode(&client.poll_transmit().unwrap());
        assert_eq!(kind(&request), MessageType::Request);
        assert_eq!(request.xid(), discover.xid(), "one transaction");
        assert_eq!(
            request.opts().get(OptionCode::RequestedIpAddress),
            Some(&DhcpOption::RequestedIpAddress(ADDRESS))
        );
        assert_eq!(
            request.opts().get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(SERVER))
        );

        client
            .handle_packet(
                now,
                SERVER,
                &reply(
                    &request,
                    MessageType::Ack,
                    &ack_options(100, &[24, 192, 168, 10, 10, 0, 1, 1]),
                ),
            )
            .unwrap();
        let Some(Event::Bound(lease)) = client.poll_event() else {
            panic!("not bound")
        };
        assert_eq!(lease.address, "10.0.1.50/24".parse::<Ipv4Net>().unwrap());
        assert_eq!(
            lease.routes,
            vec![LearnedRoute {
                destination: "192.168.10.0/24".parse().unwrap(),
                gateway: Some(SERVER)
            }]
        );
        assert_eq!(lease.route_source, RouteSource::Classless);
        assert_eq!((lease.renew_secs, lease.rebind_secs), (50, 84));
        assert_eq!(client.poll_timeout(), Some(now + Duration::from_secs(50)));
        assert_eq!(client.state(), State::Bound);
    }

    /// Runs the timers up to the next packet, past the "no offer" reports in between.
    fn next_transmission(client: &mut Client) -> (Instant, Transmit) {
        for _ in 0..10 {
            let at = client.poll_timeout().expect("a timer");
            client.handle_timeout(at);
            if let Some(transmit) = client.poll_transmit() {
                return (at, transmit);
            }
        }
        panic!("ten timeouts without a packet")
    }

    #[test]
    fn retransmissions_back_off_and_keep_the_transaction() {
        let start = Instant::now();
        let mut client = Client::new(config(), 7, start);
        client.handle_timeout(start);
        let first = decode(&client.poll_transmit().unwrap());
        let mut previous = start;
        for (attempt, expected) in [4u64, 8, 16, 32, 64, 64].into_iter().enumerate() {
            let (at, transmit) = next_transmission(&mut client);
            let again = decode(&transmit);
            assert_eq!(again.xid(), first.xid(), "attempt {attempt}");
            let wait = at - previous;
            assert!(
                wait >= Duration::from_secs(expected - 1)
                    && wait <= Duration::from_secs(expected + 1),
                "{wait:?}"
            );
            assert!(at > previous);
            previous = at;
        }
        // Early timer calls do nothing.
        client.handle_timeout(previous);
        assert!(client.poll_transmit().is_none());
    }

    #[test]
    fn selecting_without_offers_is_reported_with_backoff_not_per_discover() {
        let start = Instant::now();
        let mut client = Client::new(config(), 11, start);
        client.handle_timeout(start);
        let (mut reports, mut discovers) = (Vec::new(), 1);
        while let Some(at) = client
            .poll_timeout()
            .filter(|&at| at < start + Duration::from_secs(1000))
        {
            client.handle_timeout(at);
            discovers += std::iter::from_fn(|| client.poll_transmit()).count();
            while let Some(event) = client.poll_event() {
                let Event::NoOffer { waited } = event else {
                    panic!("unexpected {event:?}")
                };
                assert_eq!(at - start, waited, "reported when due");
                reports.push(waited.as_secs());
            }
        }
        assert_eq!(reports, [10, 30, 60, 120, 240, 480, 960]);
        assert!(discovers > reports.len(), "{discovers} DISCOVERs");
        let progress = client.progress();
        assert_eq!(
            (progress.state, progress.since, progress.offers_seen),
            (State::Selecting, start, 0)
        );
        assert_eq!(
            (progress.last_setback, progress.lease_deadlines),
            (None, None)
        );
    }

    #[test]
    fn an_offer_is_counted_and_ends_the_no_offer_reports() {
        let start = Instant::now();
        let mut client = Client::new(config(), 12, start);
        client.handle_timeout(start);
        let (at, transmit) = next_transmission(&mut client);
        assert_eq!(
            client.poll_event(),
            None,
            "no report before 10 s (retransmission at {:?})",
            at - start
        );
        let offered_at = start + Duration::from_secs(5);
        client
            .handle_packet(
                offered_at,
                SERVER,
                &reply(&decode(&transmit), MessageType::Offer, &[]),
            )
            .unwrap();
        let progress = client.progress();
        assert_eq!(
            (progress.state, progress.since, progress.offers_seen),
            (State::Requesting, offered_at, 1)
        );
        // Only the REQUEST retransmissions remain: no "no offer" report comes any more.
        for _ in 0..REQUEST_ATTEMPTS - 1 {
            let (at, _) = next_transmission(&mut client);
            assert!(at < start + Duration::from_secs(100));
        }
        assert_eq!(client.poll_event(), None);
    }

    #[test]
    fn unanswered_requests_nak_and_expiry_are_the_last_setback() {
        let start = Instant::now();
        let (mut client, _) = requesting(13, start);
        let mut now = start;
        while client.state() == State::Requesting {
            now = client.poll_timeout().unwrap();
            client.handle_timeout(now);
            client.poll_transmit();
        }
        let progress = client.progress();
        assert_eq!(
            progress.last_setback,
            Some((
                now,
                Setback::NoAck {
                    requested: Some(ADDRESS)
                }
            ))
        );
        assert_eq!(
            (progress.state, progress.since, progress.offers_seen),
            (State::Init, now, 1)
        );
        assert_eq!(
            progress.last_setback.unwrap().1.to_string(),
            "no DHCPACK to 4 DHCPREQUESTs for 10.0.1.50; starting over"
        );

        client.handle_timeout(now);
        let discover = decode(&client.poll_transmit().unwrap());
        let offer = reply(&discover, MessageType::Offer, &[]);
        client.handle_packet(now, SERVER, &offer).unwrap();
        assert_eq!(client.progress().offers_seen, 2, "counted until bound");

        let (mut refused, request) = requesting(14, start);
        refused
            .handle_packet(start, SERVER, &reply(&request, MessageType::Nak, &[]))
            .unwrap();
        assert_eq!(
            refused.progress().last_setback,
            Some((
                start,
                Setback::Nak {
                    server: Some(SERVER)
                }
            ))
        );

        let (mut client, bound_at) = bound(1000);
        let progress = client.progress();
        assert_eq!((progress.state, progress.offers_seen), (State::Bound, 0));
        assert_eq!(
            progress.lease_deadlines,
            Some(LeaseDeadlines {
                address: "10.0.1.50/24".parse().unwrap(),
                renew_at: bound_at + Duration::from_secs(500),
                rebind_at: bound_at + Duration::from_secs(875),
                expires_at: bound_at + Duration::from_secs(1000),
            })
        );
        while client.state() != State::Init {
            let now = client.poll_timeout().unwrap();
            client.handle_timeout(now);
            if client.state() == State::Renewing {
                assert_eq!(client.progress().since, bound_at + Duration::from_secs(500));
            }
        }
        let progress = client.progress();
        assert_eq!(
            progress.last_setback,
            Some((
                bound_at + Duration::from_secs(1000),
                Setback::Expired {
                    address: "10.0.1.50/24".parse().unwrap()
                }
            ))
        );
        assert_eq!(progress.lease_deadlines, None);
    }

    #[test]
    fn nak_returns_to_init_with_a_fresh_transaction() {
        let now = Instant::now();
        let (mut client, request) = requesting(5, now);
        client
            .handle_packet(now, SERVER, &reply(&request, MessageType::Nak, &[]))
            .unwrap();
        assert_eq!(client.poll_event(), Some(Event::Nak));
        assert_eq!(client.state(), State::Init);
        client.handle_timeout(now);
        let again = decode(&client.poll_transmit().unwrap());
        assert_eq!(kind(&again), MessageType::Discover);
        assert_ne!(again.xid(), request.xid());
    }

    #[test]
    fn renewing_unicasts_without_50_and_54_and_reports_changed_routes() {
        let (mut client, start) = bound(100);
        client.poll_event();
        let t1 = start + Duration::from_secs(50);
        client.handle_timeout(t1);
        assert_eq!(client.state(), State::Renewing);
        let transmit = client.poll_transmit().unwrap();
        assert_eq!(transmit.destination, Destination::Server(SERVER));
        let request = decode(&transmit);
        assert_eq!(request.ciaddr(), ADDRESS);
        assert!(request.opts().get(OptionCode::RequestedIpAddress).is_none());
        assert!(request.opts().get(OptionCode::ServerIdentifier).is_none());
        client
            .handle_packet(
                t1,
                SERVER,
                &reply(
                    &request,
                    MessageType::Ack,
                    &ack_options(100, &[16, 172, 16, 10, 0, 1, 1]),
                ),
            )
            .unwrap();
        let Some(Event::Renewed { previous, lease }) = client.poll_event() else {
            panic!("no renewal")
        };
        assert_ne!(previous.routes, lease.routes);
        assert_eq!(
            lease.routes[0].destination,
            "172.16.0.0/16".parse::<Ipv4Net>().unwrap()
        );
        assert_eq!(client.poll_timeout(), Some(t1 + Duration::from_secs(50)));
    }

    #[test]
    fn unanswered_renewal_rebinds_by_broadcast_then_expires() {
        let (mut client, start) = bound(1000);
        client.poll_event();
        let mut now = start + Duration::from_secs(500);
        client.handle_timeout(now);
        assert_eq!(client.state(), State::Renewing);
        let mut rebinding_seen = false;
        for _ in 0..20 {
            client.poll_transmit();
            now = client.poll_timeout().unwrap();
            client.handle_timeout(now);
            if client.state() == State::Rebinding && !rebinding_seen {
                rebinding_seen = true;
                assert!(now >= start + Duration::from_secs(875));
                assert_eq!(
                    client.poll_transmit().unwrap().destination,
                    Destination::Broadcast
                );
            }
            if client.state() == State::Init {
                break;
            }
        }
        assert!(rebinding_seen);
        assert!(matches!(client.poll_event(), Some(Event::Expired(_))));
        assert_eq!(now, start + Duration::from_secs(1000));
    }

    #[test]
    fn init_reboot_asks_for_the_stored_address() {
        let (mut first, _) = bound(100);
        let Some(Event::Bound(stored)) = first.poll_event() else {
            panic!()
        };
        let now = Instant::now();
        let mut client = Client::with_stored_lease(config(), 9, now, stored.clone());
        let request = decode(&client.poll_transmit().unwrap());
        assert_eq!(kind(&request), MessageType::Request);
        assert_eq!(
            request.opts().get(OptionCode::RequestedIpAddress),
            Some(&DhcpOption::RequestedIpAddress(ADDRESS))
        );
        assert!(request.opts().get(OptionCode::ServerIdentifier).is_none());
        client
            .handle_packet(
                now,
                SERVER,
                &reply(
                    &request,
                    MessageType::Ack,
                    &ack_options(100, &[24, 192, 168, 10, 10, 0, 1, 1]),
                ),
            )
            .unwrap();
        assert!(matches!(client.poll_event(), Some(Event::Bound(_))));

        let mut refused = Client::with_stored_lease(config(), 10, now, stored);
        let request = decode(&refused.poll_transmit().unwrap());
        refused
            .handle_packet(now, SERVER, &reply(&request, MessageType::Nak, &[]))
            .unwrap();
        assert_eq!(refused.poll_event(), Some(Event::Nak));
        assert_eq!(refused.state(), State::Init);
    }

    #[test]
    fn release_on_shutdown() {
        let (mut client, _) = bound(100);
        client.poll_event();
        client.release();
        let transmit = client.poll_transmit().unwrap();
        assert_eq!(transmit.destination, Destination::Server(SERVER));
        let release = decode(&transmit);
        assert_eq!(kind(&release), MessageType::Release);
        assert_eq!(release.ciaddr(), ADDRESS);
        assert!(matches!(client.poll_event(), Some(Event::Released(_))));
        assert_eq!(
            (client.state(), client.poll_timeout()),
            (State::Stopped, None)
        );
    }

    #[test]
    fn bad_packets_are_dropped_and_change_nothing() {
        let (mut client, start) = bound(100);
        client.poll_event();
        let timer = client.poll_timeout();
        let mut foreign = reply(&Message::default(), MessageType::Ack, &[]);
        for bytes in [
            vec![],
            vec![0u8; 300],
            foreign.clone(),
            foreign[..250].to_vec(),
        ] {
            assert!(client.handle_packet(start, SERVER, &bytes).is_err());
        }
        foreign[0] = 1;
        assert!(client.handle_packet(start, SERVER, &foreign).is_err());
        assert_eq!(
            (client.state(), client.poll_timeout(), client.poll_event()),
            (State::Bound, timer, None)
        );
    }

    const ROGUE: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 66);

    /// A reply like `reply` but claiming `server_id` as its server identifier.
    fn reply_from(request: &Message, kind: MessageType, server_id: Ipv4Addr) -> Vec<u8> {
        let mut message = Message::decode(&mut Decoder::new(&reply(
            request,
            kind,
            &ack_options(3600, &[24, 192, 168, 66, 10, 0, 1, 66]),
        )))
        .unwrap();
        message
            .opts_mut()
            .insert(DhcpOption::ServerIdentifier(server_id));
        message.to_vec().unwrap()
    }

    /// A fresh client that sent DISCOVER, took the offer of SERVER and sent REQUEST.
    #[test]
    fn only_the_offering_server_may_answer_the_request() {
        let now = Instant::now();
        let (mut client, request) = requesting(5, now);
        for (source, server_id, kind) in [
            (SERVER, ROGUE, MessageType::Ack),
            (ROGUE, SERVER, MessageType::Ack),
            (ROGUE, ROGUE, MessageType::Ack),
            (ROGUE, ROGUE, MessageType::Nak),
        ] {
            let forged = reply_from(&request, kind, server_id);
            assert!(
                client.handle_packet(now, source, &forged).is_err(),
                "{kind:?} from {source} with server id {server_id} was taken"
            );
            assert_eq!(
                (client.state(), client.poll_event()),
                (State::Requesting, None)
            );
        }
        client
            .handle_packet(now, SERVER, &reply_from(&request, MessageType::Ack, SERVER))
            .unwrap();
        assert!(matches!(client.poll_event(), Some(Event::Bound(_))));
    }

    #[test]
    fn a_renewal_is_answered_only_by_the_leasing_server() {
        let (mut client, start) = bound(1000);
        client.poll_event();
        let t1 = start + Duration::from_secs(500);
        client.handle_timeout(t1);
        let request = decode(&client.poll_transmit().unwrap());
        assert!(client
            .handle_packet(t1, ROGUE, &reply_from(&request, MessageType::Ack, ROGUE))
            .is_err());
        assert!(client
            .handle_packet(t1, ROGUE, &reply_from(&request, MessageType::Nak, SERVER))
            .is_err());
        assert_eq!(
            (client.state(), client.poll_event()),
            (State::Renewing, None)
        );
        client
            .handle_packet(t1, SERVER, &reply_from(&request, MessageType::Ack, SERVER))
            .unwrap();
        assert!(matches!(client.poll_event(), Some(Event::Renewed { .. })));
    }

    #[test]
    fn a_server_sending_t1_zero_gets_a_renewal_a_minute_at_most() {
        let now = Instant::now();
        let (mut client, request) = requesting(5, now);
        let mut options = ack_options(3600, &[24, 192, 168, 10, 10, 0, 1, 1]);
        options.push(DhcpOption::Renewal(0));
        options.push(DhcpOption::Rebinding(0));
        client
            .handle_packet(now, SERVER, &reply(&request, MessageType::Ack, &options))
            .unwrap();
        let Some(Event::Bound(lease)) = client.poll_event() else {
            panic!("not bound")
        };
        assert_eq!((lease.renew_secs, lease.rebind_secs), (1800, 3150));
        options[4] = DhcpOption::Renewal(0);
        options[5] = DhcpOption::Rebinding(3000);
        let renewal_at = client.poll_timeout().unwrap();
        client.handle_timeout(renewal_at);
        let renewal = decode(&client.poll_transmit().unwrap());
        client
            .handle_packet(
                renewal_at,
                SERVER,
                &reply(&renewal, MessageType::Ack, &options),
            )
            .unwrap();
        let Some(Event::Renewed { lease, .. }) = client.poll_event() else {
            panic!("not renewed")
        };
        assert_eq!((lease.renew_secs, lease.rebind_secs), (60, 3000));
        assert_eq!(
            client.poll_timeout(),
            Some(renewal_at + Duration::from_secs(60))
        );

        // A lease shorter than two minutes renews at half its time.
        let now = Instant::now();
        let (mut short, request) = requesting(5, now);
        let mut options = ack_options(40, &[24, 192, 168, 10, 10, 0, 1, 1]);
        options.push(DhcpOption::Renewal(0));
        short
            .handle_packet(now, SERVER, &reply(&request, MessageType::Ack, &options))
            .unwrap();
        assert_eq!(short.poll_timeout(), Some(now + Duration::from_secs(20)));

        // A one-second lease counts as ten: no renewal loop at network speed.
        let (mut tiny, request) = requesting(5, now);
        let mut options = ack_options(1, &[24, 192, 168, 10, 10, 0, 1, 1]);
        options.push(DhcpOption::Renewal(0));
        tiny.handle_packet(now, SERVER, &reply(&request, MessageType::Ack, &options))
            .unwrap();
        assert_eq!(tiny.poll_timeout(), Some(now + Duration::from_secs(5)));
    }

    #[test]
    fn leases_with_a_subnet_shorter_than_the_minimum_are_refused() {
        let now = Instant::now();
        let mut client = Client::new(config(), 6, now);
        client.handle_timeout(now);
        let discover = decode(&client.poll_transmit().unwrap());
        let wide = [DhcpOption::SubnetMask(Ipv4Addr::new(128, 0, 0, 0))];
        client
            .handle_packet(now, SERVER, &reply(&discover, MessageType::Offer, &wide))
            .unwrap();
        let (_, refusal) = client.progress().last_setback.expect("offer refused");
        let reason = refusal.to_string();
        assert!(
            reason.contains("10.0.1.50/1") && reason.contains("/8"),
            "{reason}"
        );
        assert_eq!(client.state(), State::Selecting);
        assert!(client.poll_transmit().is_none(), "no REQUEST for a /1");
        assert_eq!(client.progress().offers_seen, 1, "seen, if refused");
        client.handle_timeout(now + Duration::from_secs(60));
        assert!(
            !std::iter::from_fn(|| client.poll_event()).any(|e| matches!(e, Event::NoOffer { .. })),
            "no \"no DHCPOFFER\" report once one was refused"
        );

        let now = Instant::now();
        let (mut client, request) = requesting(5, now);
        let mut options = ack_options(3600, &[]);
        options[0] = DhcpOption::SubnetMask(Ipv4Addr::new(254, 0, 0, 0));
        client
            .handle_packet(now, SERVER, &reply(&request, MessageType::Ack, &options))
            .unwrap();
        assert!(matches!(
            client.progress().last_setback,
            Some((_, Setback::Refused { ack: true, .. }))
        ));
        assert_eq!((client.state(), client.lease()), (State::Requesting, None));
    }

    #[test]
    fn transaction_ids_do_not_follow_from_the_seed() {
        let now = Instant::now();
        let xid = |seed| {
            let mut client = Client::new(config(), seed, now);
            client.handle_timeout(now);
            decode(&client.poll_transmit().unwrap()).xid()
        };
        // Two clients with one seed: a seeded generator would give both the same xid.
        assert_ne!(xid(11), xid(11));
    }
}
