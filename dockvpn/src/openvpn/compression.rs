//! Old profiles with `comp-lzo` or `compress`: such a client frames every data payload for
//! its compression algorithm even when it compresses nothing. Dockvpn never compresses
//! (compressing before encryption leaks plaintext, VORACLE), so it pushes a stub, which the
//! client then uses whatever its profile said (the stock 2.6 client switches every
//! `comp-lzo` and `compress` variant to `stubv2`), and keeps only the stub's framing. A
//! payload the client compressed anyway is refused (`Unframed::Compressed`).

use super::keymethod::PeerInfo;

/// `comp-lzo` framing: a leading byte says whether the payload is compressed.
const LZO_UNCOMPRESSED: u8 = 0xfa;
/// `compress stub-v2` / `lz4-v2` framing: payloads go as they are unless they start with
/// this byte; then it is followed by an algorithm byte (0: none).
const V2_INDICATOR: u8 = 0x50;
const V2_UNCOMPRESSED: u8 = 0x00;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Framing {
    /// No compression configured: payloads as they are.
    #[default]
    None,
    /// `comp-lzo`: one leading byte on every payload.
    Lzo,
    /// `compress stub-v2` and `lz4-v2`: an escape only for payloads starting with 0x50.
    V2,
}

/// What a framed payload turned out to be: plain (`unframe` left it in its buffer), or
/// compressed by the client, with the framing byte that says so.
#[derive(Debug, PartialEq, Eq)]
pub enum Unframed {
    Plain,
    Compressed(u8),
}

impl Framing {
    /// The framing a client uses after our push, and the option that sets it, from its
    /// options string (which names `comp-lzo` whenever any compression is configured) and
    /// what its peer info says it can do. None: no compression configured.
    pub fn for_client(options: &str, peer_info: &PeerInfo) -> Option<(Framing, &'static str)> {
        if !options.split(',').any(|option| option == "comp-lzo") {
            return None;
        }
        if peer_info.get("IV_COMP_STUBv2") == Some("1") {
            Some((Framing::V2, "compress stub-v2"))
        } else {
            Some((Framing::Lzo, "comp-lzo no"))
        }
    }

    /// What goes before `payload` on the wire so that the client reads it as uncompressed;
    /// the sealer writes it and the payload straight into the datagram.
    pub fn prefix(self, payload: &[u8]) -> &'static [u8] {
        match (self, payload.first()) {
            (Framing::None, _) | (_, None) => &[],
            (Framing::Lzo, Some(_)) => &[LZO_UNCOMPRESSED],
            (Framing::V2, Some(&V2_INDICATOR)) => &[V2_INDICATOR, V2_UNCOMPRESSED],
            (Framing::V2, Some(_)) => &[],
        }
    }

    /// Takes the framing off the payload in `framed`, in place; or says the client
    /// compressed it.
    pub fn unframe(self, framed: &mut Vec<u8>) -> Unframed {
        match (self, framed.first().copied()) {
            (Framing::None, _) | (_, None) => Unframed::Plain,
            (Framing::Lzo, Some(LZO_UNCOMPRESSED)) => {
                framed.remove(0);
                Unframed::Plain
            }
            (Framing::V2, Some(V2_INDICATOR)) => match framed.get(1) {
                Some(&V2_UNCOMPRESSED) => {
                    framed.drain(..2);
                    Unframed::Plain
                }
                _ => Unframed::Compressed(V2_INDICATOR),
            },
            (Framing::V2, Some(_)) => Unframed::Plain,
            (Framing::Lzo, Some(byte)) => Unframed::Compressed(byte),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: [u8; 4] = [0x45, 0, 0, 20];

    #[test]
    fn each_framing_round_trips_and_looks_as_documented() {
        let cases: [(Framing, &[u8], &[u8]); 4] = [
            (Framing::None, &IP, &IP),
            (Framing::Lzo, &IP, &[0xfa, 0x45, 0, 0, 20]),
            (Framing::V2, &IP, &IP),
            (Framing::V2, &[0x50, 1], &[0x50, 0, 0x50, 1]),
        ];
        for (framing, payload, wire) in cases {
            let mut framed = [framing.prefix(payload), payload].concat();
            assert_eq!(framed, wire, "{framing:?}");
            assert_eq!(framing.unframe(&mut framed), Unframed::Plain, "{framing:?}");
            assert_eq!(framed, payload, "{framing:?}");
        }
    }

    #[test]
    fn compressed_payloads_are_refused() {
        assert_eq!(
            Framing::Lzo.unframe(&mut vec![0x66, 1, 2]),
            Unframed::Compressed(0x66)
        );
        assert_eq!(
            Framing::V2.unframe(&mut vec![0x50, 1, 2]),
            Unframed::Compressed(0x50)
        );
        assert_eq!(
            Framing::V2.unframe(&mut vec![0x50]),
            Unframed::Compressed(0x50)
        );
    }

    #[test]
    fn the_push_follows_the_options_string_and_peer_info() {
        let stub_v2 = PeerInfo::parse("IV_LZO_STUB=1\nIV_COMP_STUB=1\nIV_COMP_STUBv2=1\n");
        let old = PeerInfo::parse("IV_LZO=1\n");
        assert_eq!(
            Framing::for_client("V4,dev-type tun,cipher x", &stub_v2),
            None
        );
        assert_eq!(
            Framing::for_client("V4,dev-type tun,comp-lzo,cipher x", &stub_v2),
            Some((Framing::V2, "compress stub-v2"))
        );
        assert_eq!(
            Framing::for_client("V4,comp-lzo", &old),
            Some((Framing::Lzo, "comp-lzo no"))
        );
    }
}
