//! nf_tables (`NETLINK_NETFILTER`, subsystem `NFNL_SUBSYS_NFTABLES`): the family marker
//! for `Socket<NfTables>`. Its messages are framed by their user (ferry-nft encodes
//! tables, chains, rules and sets as nft does, and sends a whole transaction as one
//! batch), so the typed layer carries them as [`RawMessage`]s: a message type and the
//! bytes after the netlink header.
//!
//! A batch goes out with [`Socket::send_vectored`](crate::Socket::send_vectored) after
//! [`Socket::reserve_send_buffer`](crate::Socket::reserve_send_buffer), its answers come
//! back through [`Socket::receive_within`](crate::Socket::receive_within): the error of
//! each failing message (its sequence number and the extended ack's offset inside it),
//! then the ack of the last message.

use std::fmt;

use netlink_packet_core::{NetlinkDeserializable, NetlinkHeader, NetlinkSerializable};
use netlink_sys::protocols::NETLINK_NETFILTER;

use crate::socket::Family;

/// The nf_tables family marker: `Socket<NfTables>`.
#[derive(Debug, Clone, Copy)]
pub enum NfTables {}

/// `NFNL_SUBSYS_NFTABLES`: the high byte of every nf_tables message type.
const NFNL_SUBSYS_NFTABLES: u16 = 10;

/// One nf_tables message as bytes: its type and what follows the netlink header (the
/// `nfgenmsg` and the attributes).
#[derive(Clone, PartialEq, Eq)]
pub struct RawMessage {
    pub message_type: u16,
    pub payload: Vec<u8>,
}

impl fmt::Debug for RawMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} bytes)", NfTables::describe(self), self.payload.len())
    }
}

impl NetlinkSerializable for RawMessage {
    fn message_type(&self) -> u16 {
        self.message_type
    }

    fn buffer_len(&self) -> usize {
        self.payload.len()
    }

    fn serialize(&self, buffer: &mut [u8]) {
        buffer.copy_from_slice(&self.payload);
    }
}

impl NetlinkDeserializable for RawMessage {
    type Error = std::convert::Infallible;

    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<RawMessage, Self::Error> {
        Ok(RawMessage {
            message_type: header.message_type,
            payload: payload.to_vec(),
        })
    }
}

impl Family for NfTables {
    const PROTOCOL: isize = NETLINK_NETFILTER;
    const NAME: &'static str = "nf_tables";
    type Message = RawMessage;

    fn describe(msg: &RawMessage) -> String {
        let ty = msg.message_type;
        if ty >> 8 != NFNL_SUBSYS_NFTABLES {
            return format!("nfnetlink message type {ty:#06x}");
        }
        // linux/netfilter/nf_tables.h, enum nf_tables_msg_types.
        let names = [
            "NFT_MSG_NEWTABLE",
            "NFT_MSG_GETTABLE",
            "NFT_MSG_DELTABLE",
            "NFT_MSG_NEWCHAIN",
            "NFT_MSG_GETCHAIN",
            "NFT_MSG_DELCHAIN",
            "NFT_MSG_NEWRULE",
            "NFT_MSG_GETRULE",
            "NFT_MSG_DELRULE",
            "NFT_MSG_NEWSET",
            "NFT_MSG_GETSET",
            "NFT_MSG_DELSET",
            "NFT_MSG_NEWSETELEM",
            "NFT_MSG_GETSETELEM",
            "NFT_MSG_DELSETELEM",
        ];
        match names.get(usize::from(ty & 0xff)) {
            Some(name) => name.to_string(),
            None => format!("nf_tables message {}", ty & 0xff),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_named_by_type() {
        let rule = RawMessage {
            message_type: NFNL_SUBSYS_NFTABLES << 8 | 7,
            payload: vec![0; 4],
        };
        assert_eq!(NfTables::describe(&rule), "NFT_MSG_GETRULE");
        let other = RawMessage {
            message_type: 1 << 8 | 2,
            payload: Vec::new(),
        };
        assert_eq!(NfTables::describe(&other), "nfnetlink message type 0x0102");
    }
}
