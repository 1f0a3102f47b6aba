//! Old profiles with `comp-lzo` or `compress`: such a client frames every data payload for
//! its compression algorithm even when it compresses nothing. Dockvpn never compresses
//! (compressing before encryption leaks plaintext, VORACLE), so it pushes a stub, which the
//! client then uses whatever its profile said (the stock 2.6 client switches every
//! `comp-lzo` and `compress` variant to `stubv2`), and keeps only the stub's framing. A
//! payload the client compressed anyway is refused (`Unframed::Compressed`).

use std::borrow::Cow;

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

/// A data payload without its framing, or the framing byte of one the client compressed.
#[derive(Debug, PartialEq, Eq)]
pub enum Unframed {
    Plain(Vec<u8>),
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

    /// `payload` as the client expects it.
    pub fn frame<'a>(self, payload: &'a [u8]) -> Cow<'a, [u8]> {
        match (self, payload.split_first()) {
            (Framing::None, _) | (_, None) => Cow::Borrowed(payload),
            (Framing::Lzo, Some(_)) => Cow::Owned([&[LZO_UNCOMPRESSED], payload].concat()),
            (Framing::V2, Some((&V2_INDICATOR, _))) => {
                Cow::Owned([&[V2_INDICATOR, V2_UNCOMPRESSED], payload].concat())
            }
            (Framing::V2, Some(_)) => Cow::Borrowed(payload),
        }
    }

    /// The payload the client framed, or the byte that says it compressed it.
    pub fn unframe(self, mut framed: Vec<u8>) -> Unframed {
        match (self, framed.first().copied()) {
            (Framing::None, _) | (_, None) => Unframed::Plain(framed),
            (Framing::Lzo, Some(LZO_UNCOMPRESSED)) => {
                framed.remove(0);
                Unframed::Plain(framed)
            }
            (Framing::V2, Some(V2_INDICATOR)) => match framed.get(1) {
                Some(&V2_UNCOMPRESSED) => {
                    framed.drain(..2);
                    Unframed::Plain(framed)
                }
                _ => Unframed::Compressed(V2_INDICATOR),
            },
            (Framing::V2, Some(_)) => Unframed::Plain(framed),
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
            let framed = framing.frame(payload);
            assert_eq!(&*framed, wire, "{framing:?}");
            assert_eq!(
                framing.unframe(framed.into_owned()),
                Unframed::Plain(payload.to_vec()),
                "{framing:?}"
            );
        }
    }

    #[test]
    fn compressed_payloads_are_refused() {
        assert_eq!(
            Framing::Lzo.unframe(vec![0x66, 1, 2]),
            Unframed::Compressed(0x66)
        );
        assert_eq!(
            Framing::V2.unframe(vec![0x50, 1, 2]),
            Unframed::Compressed(0x50)
        );
        assert_eq!(Framing::V2.unframe(vec![0x50]), Unframed::Compressed(0x50));
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
