//! Dockvpn's metrics, read at every scrape from what the VPN driver writes for `status`
//! (`status.json`, rewritten every 2 s and on changes): clients and completed handshakes per
//! transport, handshake failures and drops by reason, renegotiations and bytes of the
//! connected clients.

use std::path::PathBuf;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use vnf_core::metrics::{routing_health, Exporter};
use vnf_core::runtime::RuntimeConfig;
use vnf_core::Result;

use crate::vpn::VpnStatus;

const TRANSPORTS: [&str; 2] = ["openvpn", "wireguard"];

/// Why a handshake failed.
const FAILURE_REASONS: [&str; 6] = [
    "bad_certificate",
    "revoked",
    "wrong_password",
    "tls_crypt",
    "limit",
    "other",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabels {
    transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Client names are bounded by the registry and checked by `client add`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientLabels {
    client: String,
    transport: &'static str,
}

pub struct VpnExporter {
    pub state_dir: PathBuf,
    pub config: RuntimeConfig,
    /// `--metrics-per-client`: a series per connected client.
    pub per_client: bool,
}

fn transport_label(transport: &str) -> &'static str {
    TRANSPORTS
        .into_iter()
        .find(|&known| known == transport)
        .unwrap_or("openvpn")
}

impl VpnExporter {
    fn status(&self) -> Option<VpnStatus> {
        crate::read_vpn_status(&self.state_dir)
    }
}

impl Exporter for VpnExporter {
    async fn register(&self, registry: &mut Registry) -> Result<()> {
        let status = self.status();
        let serving = Gauge::<i64>::default();
        let connected = Family::<TransportLabels, Gauge>::default();
        let renegotiations = Family::<TransportLabels, Gauge>::default();
        let (bytes_in, bytes_out) = (
            Family::<TransportLabels, Gauge>::default(),
            Family::<TransportLabels, Gauge>::default(),
        );
        let handshaking = Gauge::<i64>::default();
        let handshakes = Family::<TransportLabels, Counter>::default();
        for transport in TRANSPORTS {
            let labels = TransportLabels { transport };
            for family in [&connected, &renegotiations, &bytes_in, &bytes_out] {
                family.get_or_create(&labels).set(0);
            }
            handshakes.get_or_create(&labels).inc_by(0);
        }
        let failures = Family::<ReasonLabels, Counter>::default();
        // Every reason gets a series, 0 until counted.
        for reason in FAILURE_REASONS {
            failures.get_or_create(&ReasonLabels { reason }).inc_by(0);
        }
        let dropped = Family::<ReasonLabels, Counter>::default();
        let client_bytes_in = Family::<ClientLabels, Counter>::default();
        let client_bytes_out = Family::<ClientLabels, Counter>::default();
        if let Some(status) = &status {
            serving.set(1);
            handshaking.set(i64::try_from(status.handshaking).unwrap_or(i64::MAX));
            for (transport, count) in [
                ("openvpn", status.handshakes.openvpn),
                ("wireguard", status.handshakes.wireguard),
            ] {
                handshakes
                    .get_or_create(&TransportLabels { transport })
                    .inc_by(count);
            }
            for client in &status.clients {
                let labels = TransportLabels {
                    transport: transport_label(&client.transport),
                };
                let gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
                connected.get_or_create(&labels).inc();
                renegotiations
                    .get_or_create(&labels)
                    .inc_by(gauge(client.renegotiations));
                bytes_in
                    .get_or_create(&labels)
                    .inc_by(gauge(client.bytes_in));
                bytes_out
                    .get_or_create(&labels)
                    .inc_by(gauge(client.bytes_out));
                if self.per_client {
                    let labels = ClientLabels {
                        client: client.name.clone(),
                        transport: labels.transport,
                    };
                    client_bytes_in
                        .get_or_create(&labels)
                        .inc_by(client.bytes_in);
                    client_bytes_out
                        .get_or_create(&labels)
                        .inc_by(client.bytes_out);
                }
            }
            let drops = &status.dropped;
            let refused = &status.refused;
            for (reason, count) in [
                ("bad_certificate", refused.bad_certificate),
                ("revoked", refused.revoked),
                ("wrong_password", refused.wrong_password),
                ("tls_crypt", drops.unauthenticated_control),
                ("limit", drops.refused_handshakes),
            ] {
                failures
                    .get_or_create(&ReasonLabels { reason })
                    .inc_by(count);
            }
            for (reason, count) in drops.by_reason() {
                dropped
                    .get_or_create(&ReasonLabels { reason })
                    .inc_by(count);
            }
        }
        let dockvpn = registry.sub_registry_with_prefix("dockvpn");
        dockvpn.register(
            "serving",
            "Whether the VPN server serves (1) or waits, e.g. for its DHCP lease (0)",
            serving,
        );
        dockvpn.register(
            "clients_connected",
            "Connected clients per transport",
            connected,
        );
        dockvpn.register(
            "handshaking",
            "OpenVPN sessions in their first handshake",
            handshaking,
        );
        dockvpn.register(
            "handshakes",
            "Handshakes completed per transport: connects and renegotiations (OpenVPN), connects and rekeys (WireGuard)",
            handshakes,
        );
        dockvpn.register(
            "handshake_failures",
            "Handshakes refused, by reason",
            failures,
        );
        dockvpn.register("dropped", "Input dropped, by reason", dropped);
        dockvpn.register(
            "renegotiations",
            "Data-key renegotiations (OpenVPN) and rekeys (WireGuard) of the connected clients",
            renegotiations,
        );
        dockvpn.register(
            "bytes_in",
            "Bytes received from the connected clients",
            bytes_in,
        );
        dockvpn.register(
            "bytes_out",
            "Bytes sent to the connected clients",
            bytes_out,
        );
        if self.per_client {
            dockvpn.register(
                "client_bytes_in",
                "Bytes received from each connected client",
                client_bytes_in,
            );
            dockvpn.register(
                "client_bytes_out",
                "Bytes sent to each connected client",
                client_bytes_out,
            );
        }
        Ok(())
    }

    async fn health(&self) -> std::result::Result<(), String> {
        routing_health(&self.config).await?;
        match self.status() {
            Some(_) => Ok(()),
            None => Err("the VPN server is not serving (is it waiting for its DHCP lease?)".into()),
        }
    }
}
