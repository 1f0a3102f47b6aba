//! Dropped input, by named reason: one set for both transports (the driver adds them up for
//! `status` and logs them rate-limited).

use serde::{Deserialize, Serialize};

/// Declares the counters once: the struct, which of them `total` adds, and their sum.
macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident: $hostile_or_broken:literal ),* $(,)?) => {
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        pub struct Counters {
            $( $(#[$doc])* #[serde(default)] pub $name: u64, )*
        }

        impl Counters {
            /// Dropped input that may be hostile or broken (IPv6 from clients is neither).
            pub fn total(&self) -> u64 {
                0 $( + if $hostile_or_broken { self.$name } else { 0 } )*
            }
        }

        impl std::ops::AddAssign for Counters {
            fn add_assign(&mut self, other: Counters) {
                $( self.$name += other.$name; )*
            }
        }
    };
}

counters! {
    malformed: true,
    unknown_session: true,
    refused_handshakes: true,
    unauthenticated_data: true,
    replayed_data: true,
    spoofed_source: true,
    no_client_for_destination: true,
    /// IPv6 packets from clients (their router solicitations): benign, so outside `total`.
    ipv6_from_client: false,
    /// OpenVPN control packets that failed tls-crypt or tls-crypt-v2, and WireGuard handshakes
    /// whose MAC does not name this server's key: scanners and peers without a valid key.
    unauthenticated_control: true,
    /// Replayed OpenVPN control packets and WireGuard handshake initiations.
    replayed_control: true,
    /// Out-of-order control messages past a session's reassembly budget (the peer resends).
    reassembly_over_budget: true,
    /// Data payloads a client compressed although the stub we pushed says not to.
    compressed_data: true,
    /// WireGuard handshake initiations beyond the rate limit, answered with a cookie instead
    /// of a handshake (a real client retries with it; a flood from forged addresses cannot).
    handshakes_under_load: true,
}

/// The non-zero counters as `name=n`, for logs and `status`.
impl std::fmt::Display for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(self) else {
            return Ok(());
        };
        let nonzero: Vec<String> = fields
            .iter()
            .filter(|(_, count)| count.as_u64().is_some_and(|n| n > 0))
            .map(|(name, count)| format!("{name}={count}"))
            .collect();
        f.write_str(&nonzero.join(" "))
    }
}
