//! What the sans-IO engines hand their driver, in one shape for both transports.

/// `To` is where a datagram goes (OpenVPN: a `Link`; WireGuard: a socket address), `Event`
/// the engine's connect and disconnect news.
#[derive(Debug)]
pub enum Output<To, Event> {
    Transmit { to: To, datagram: Vec<u8> },
    Tun(Vec<u8>),
    Event(Event),
}
