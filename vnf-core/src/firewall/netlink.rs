//! The common small edit sent to the kernel over nfnetlink, without running `nft`: nft 1.0.6
//! loads every element of every set in the table before it changes one, which at 100,000
//! rules is most of an edit's time and memory (see BENCHMARKS.md). Covered: the marker
//! chain's swap and elements added to or removed from existing sets with single-value keys
//! (no intervals), which is what adding or deleting a rule of an existing shape produces.
//! Anything else returns None and goes through `nft` as before. The whole edit is one
//! nfnetlink batch, so the kernel applies it whole or not at all, like an `nft -f`.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};

use nftables::expr::{Expression, NamedExpression};
use nftables::schema::{
    Chain, Element, NfCmd, NfListObject, NfObject, SetFlag, SetType, SetTypeValue,
};
use nftables::types::NfFamily;
use nix::sys::socket::{
    recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

use netlink_packet_core::{NLA_F_NESTED, NLMSG_ERROR, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST};

use super::compile::{Compiled, TABLE};
use crate::error::{Error, Result};

// nf_tables message constants (linux/netfilter/nfnetlink.h, nf_tables.h); the netlink ones
// come from netlink-packet-core.
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFPROTO_INET: u8 = 1;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_DATA_VALUE: u16 = 1;
/// The type nft gives an element's comment in its user data (type, length, text with NUL).
const USERDATA_ELEMENT_COMMENT: u8 = 0;
/// Attribute lengths are 16 bits: a message's element list is cut well below that.
const ELEMENTS_PER_MESSAGE_BYTES: usize = 32 * 1024;
/// A batch larger than this goes through `nft` (the socket's default send buffer is ~200 KiB).
const MAX_BATCH_BYTES: usize = 128 * 1024;
const REPLY_TIMEOUT_SECONDS: i64 = 5;

/// An encoded nfnetlink batch and how many acknowledgements it asks for.
pub struct Batch {
    bytes: Vec<u8>,
    acks: u32,
}

/// The batch as nfnetlink messages, or None when it holds anything this fast path does not
/// cover (then `nft` applies it).
pub fn encode(batch: &[NfObject<'static>], new: &Compiled) -> Option<Batch> {
    let mut writer = Writer::default();
    writer.message(NFNL_MSG_BATCH_BEGIN, 0, 0, NFNL_SUBSYS_NFTABLES, |_| {});
    for object in batch {
        match object {
            NfObject::CmdObject(NfCmd::Delete(NfListObject::Chain(chain))) if plain(chain) => {
                writer.chain(NFT_MSG_DELCHAIN, 0, &chain.name);
            }
            NfObject::CmdObject(NfCmd::Add(NfListObject::Chain(chain))) if plain(chain) => {
                writer.chain(NFT_MSG_NEWCHAIN, NLM_F_CREATE, &chain.name);
            }
            NfObject::CmdObject(NfCmd::Add(NfListObject::Element(element))) => {
                writer.elements(NFT_MSG_NEWSETELEM, NLM_F_CREATE, element, new)?;
            }
            NfObject::CmdObject(NfCmd::Delete(NfListObject::Element(element))) => {
                writer.elements(NFT_MSG_DELSETELEM, 0, element, new)?;
            }
            _ => return None,
        }
    }
    writer.message(NFNL_MSG_BATCH_END, 0, 0, NFNL_SUBSYS_NFTABLES, |_| {});
    (writer.bytes.len() <= MAX_BATCH_BYTES).then_some(Batch {
        bytes: writer.bytes,
        acks: writer.acks,
    })
}

/// A regular chain of our table with nothing but a name (the marker chain).
fn plain(chain: &Chain<'static>) -> bool {
    *chain == super::nft::plain_chain(&chain.name)
}

#[derive(Default)]
struct Writer {
    bytes: Vec<u8>,
    sequence: u32,
    acks: u32,
}

impl Writer {
    /// One netlink message: header, nfgenmsg, then what `body` writes.
    fn message(
        &mut self,
        kind: u16,
        flags: u16,
        family: u8,
        resource: u16,
        body: impl FnOnce(&mut Vec<u8>),
    ) {
        let start = self.bytes.len();
        self.sequence += 1;
        self.bytes.extend_from_slice(&0u32.to_ne_bytes()); // length, set below
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes
            .extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        self.bytes.extend_from_slice(&self.sequence.to_ne_bytes());
        self.bytes.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        self.bytes.extend_from_slice(&[family, 0]);
        self.bytes.extend_from_slice(&resource.to_be_bytes());
        body(&mut self.bytes);
        let length = (self.bytes.len() - start) as u32;
        self.bytes[start..start + 4].copy_from_slice(&length.to_ne_bytes());
    }

    /// An nf_tables request in our table; each asks for an acknowledgement.
    fn request(&mut self, kind: u16, flags: u16, body: impl FnOnce(&mut Vec<u8>)) {
        self.acks += 1;
        self.message(
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            NLM_F_ACK | flags,
            NFPROTO_INET,
            0,
            body,
        );
    }

    fn chain(&mut self, kind: u16, flags: u16, name: &str) {
        self.request(kind, flags, |out| {
            attribute(out, NFTA_CHAIN_TABLE, &text(TABLE));
            attribute(out, NFTA_CHAIN_NAME, &text(name));
        });
    }

    /// Elements of one existing set, in as many messages as their size needs.
    fn elements(
        &mut self,
        kind: u16,
        flags: u16,
        element: &Element<'static>,
        new: &Compiled,
    ) -> Option<()> {
        let set = new.sets.get(element.name.as_ref())?;
        let has_intervals = set
            .flags
            .as_ref()
            .is_some_and(|flags| flags.contains(&SetFlag::Interval));
        if element.family != NfFamily::INet || element.table != TABLE || has_intervals {
            return None;
        }
        let encoded = element
            .elem
            .iter()
            .map(|expression| encode_element(expression, &set.set_type))
            .collect::<Option<Vec<_>>>()?;
        for chunk in chunks(&encoded) {
            self.request(kind, flags, |out| {
                attribute(out, NFTA_SET_ELEM_LIST_TABLE, &text(TABLE));
                attribute(out, NFTA_SET_ELEM_LIST_SET, &text(&element.name));
                let list: Vec<u8> = chunk.concat();
                attribute(out, NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, &list);
            });
        }
        Some(())
    }
}

/// Consecutive runs of encoded elements that fit one message.
fn chunks(encoded: &[Vec<u8>]) -> Vec<&[Vec<u8>]> {
    let mut chunks = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (index, element) in encoded.iter().enumerate() {
        if size + element.len() > ELEMENTS_PER_MESSAGE_BYTES && index > start {
            chunks.push(&encoded[start..index]);
            (start, size) = (index, 0);
        }
        size += element.len();
    }
    if start < encoded.len() {
        chunks.push(&encoded[start..]);
    }
    chunks
}

/// One NFTA_LIST_ELEM: the key, and the comment when the element carries one.
fn encode_element(expression: &Expression<'static>, set_type: &SetTypeValue) -> Option<Vec<u8>> {
    let (value, comment) = match expression {
        Expression::Named(NamedExpression::Elem(elem)) => {
            if elem.timeout.is_some() || elem.expires.is_some() || elem.counter.is_some() {
                return None;
            }
            (elem.val.as_ref(), elem.comment.as_deref())
        }
        other => (other, None),
    };
    let key = match set_type {
        SetTypeValue::Single(kind) => key_field(value, *kind)?,
        SetTypeValue::Concatenated(kinds) => {
            let Expression::Named(NamedExpression::Concat(values)) = value else {
                return None;
            };
            if values.len() != kinds.len() {
                return None;
            }
            // Each field of a concatenation takes whole 32-bit registers.
            let mut key = Vec::new();
            for (value, kind) in values.iter().zip(kinds.iter()) {
                let mut field = key_field(value, *kind)?;
                field.resize(field.len().div_ceil(4) * 4, 0);
                key.extend(field);
            }
            key
        }
    };
    let mut data = Vec::new();
    attribute(&mut data, NFTA_DATA_VALUE, &key);
    let mut inner = Vec::new();
    attribute(&mut inner, NFTA_SET_ELEM_KEY | NLA_F_NESTED, &data);
    if let Some(comment) = comment {
        let mut userdata = vec![
            USERDATA_ELEMENT_COMMENT,
            u8::try_from(comment.len() + 1).ok()?,
        ];
        userdata.extend_from_slice(comment.as_bytes());
        userdata.push(0);
        attribute(&mut inner, NFTA_SET_ELEM_USERDATA, &userdata);
    }
    let mut element = Vec::new();
    attribute(&mut element, NFTA_LIST_ELEM | NLA_F_NESTED, &inner);
    Some(element)
}

/// A key field in network byte order, as the kernel compares it with packet data.
fn key_field(value: &Expression<'static>, kind: SetType) -> Option<Vec<u8>> {
    match (kind, value) {
        (SetType::Ipv4Addr, Expression::String(address)) => {
            Some(address.parse::<Ipv4Addr>().ok()?.octets().to_vec())
        }
        (SetType::Ipv6Addr, Expression::String(address)) => {
            Some(address.parse::<Ipv6Addr>().ok()?.octets().to_vec())
        }
        (SetType::InetService, Expression::Number(port)) => {
            Some(u16::try_from(*port).ok()?.to_be_bytes().to_vec())
        }
        _ => None,
    }
}

fn text(value: &str) -> Vec<u8> {
    let mut bytes = value.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

/// Appends one attribute, padded to 4 bytes.
fn attribute(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let length = (4 + payload.len()) as u16;
    out.extend_from_slice(&length.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().div_ceil(4) * 4, 0);
}

/// Sends the batch and waits for every acknowledgement; the kernel's first error otherwise
/// (then it applied none of the batch).
pub fn send(batch: &Batch) -> Result<()> {
    let io = |context: &str| {
        let context = context.to_string();
        move |error: nix::Error| Error::Io {
            context,
            source: error.into(),
        }
    };
    let fd: OwnedFd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .map_err(io("open an nfnetlink socket"))?;
    setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &TimeVal::new(REPLY_TIMEOUT_SECONDS, 0),
    )
    .map_err(io("set the nfnetlink reply timeout"))?;
    let kernel = NetlinkAddr::new(0, 0);
    sendto(fd.as_raw_fd(), &batch.bytes, &kernel, MsgFlags::empty())
        .map_err(io("send the nfnetlink batch"))?;
    let mut acknowledged = 0;
    let mut buffer = vec![0u8; 64 * 1024];
    while acknowledged < batch.acks {
        let received = recv(fd.as_raw_fd(), &mut buffer, MsgFlags::empty())
            .map_err(io("read the kernel's nfnetlink reply"))?;
        for code in error_codes(&buffer[..received]) {
            if code != 0 {
                return Err(Error::Nft(format!(
                    "the kernel refused the nfnetlink batch: {}",
                    std::io::Error::from_raw_os_error(-code)
                )));
            }
            acknowledged += 1;
        }
    }
    Ok(())
}

/// The error codes (0: acknowledged) of the NLMSG_ERROR messages in one datagram.
fn error_codes(mut datagram: &[u8]) -> Vec<i32> {
    let mut codes = Vec::new();
    while datagram.len() >= 20 {
        let length = u32::from_ne_bytes([datagram[0], datagram[1], datagram[2], datagram[3]]);
        let length = (length as usize).clamp(16, datagram.len());
        let kind = u16::from_ne_bytes([datagram[4], datagram[5]]);
        if kind == NLMSG_ERROR {
            codes.push(i32::from_ne_bytes([
                datagram[16],
                datagram[17],
                datagram[18],
                datagram[19],
            ]));
        }
        datagram = &datagram[(length.div_ceil(4) * 4).min(datagram.len())..];
    }
    codes
}
