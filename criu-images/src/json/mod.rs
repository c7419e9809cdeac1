//! crit's JSON form of images, in both directions.
//!
//! `decode` renders an image as `{"magic": NAME, "entries": [...]}` exactly as crit 4.1.1
//! prints it, plain or `--pretty`; `encode` turns such JSON (crit's or ours) back into image
//! bytes. Messages are walked straight from the wire with the run-time [`schema`], and the
//! text is streamed, so a pagemap of a hundred thousand entries needs no message structs.
//!
//! Where crit is wrong, this module is right and says so here:
//! - `ipcns-shm` entries with `in_pagemaps` set have no payload (the segment is in a shmem
//!   pagemap); crit reads `size` bytes after them anyway and garbles the following entries.
//!   Their `extra` is the empty string, which is also what crit prints for the last entry,
//!   and `--nopl` reports `... <0B>` where crit reports the segment size.
//! - `task_state` 3 is `Stopped` and 6 is `Zombie`, as the kernel and CRIU define them; crit
//!   4.1.1 swaps the two names. JSON is read back with the correct names, so crit's JSON of a
//!   stopped or zombie task encodes to the other state.
//! - An enum value the schema does not define is printed as its number; crit drops the field.
//! - `bpfmap-data` payloads encode (crit fails on them with a bytes/str error).

mod decode;
mod encode;
mod tables;

use thiserror::Error;

use crate::image::ImageError;
use crate::schema::{FieldType, MessageSchema, schema};
use crate::wire::{WireError, WireType};

pub use decode::{decode, decode_to, info};
pub use encode::encode;

/// Why an image could not be rendered as JSON.
#[derive(Debug, Error)]
pub enum DecodeError {
    /// The image framing is broken.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// An entry's message is malformed.
    #[error("entry {index} at offset {offset}: malformed {message}")]
    Malformed {
        /// Index of the entry.
        index: usize,
        /// Offset of the entry's size word.
        offset: usize,
        /// Name of the message.
        message: String,
        /// What is wrong with its encoding.
        #[source]
        source: WireError,
    },
    /// The JSON could not be written out.
    #[error("cannot write the JSON")]
    Write(#[source] std::io::Error),
    /// The layout names a message the schema lacks (a defect of this crate's tables).
    #[error("no schema for message {0}")]
    UnknownMessage(&'static str),
}

/// Why JSON could not be turned into an image.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// The top level is not `{"magic": ..., "entries": [...]}`.
    #[error("JSON image must be an object with \"magic\" and \"entries\"")]
    NotAnImage,
    /// The magic names no image kind.
    #[error("unknown magic {0:?}")]
    UnknownMagic(String),
    /// The magic names a kind without protobuf entries.
    #[error("magic {0} has no protobuf entries to encode")]
    NoMessage(String),
    /// A value has the wrong JSON type.
    #[error("{path}: expected {expected}")]
    WrongType {
        /// Where, e.g. `entries[2].vmas[0].prot`.
        path: String,
        /// What was expected.
        expected: &'static str,
    },
    /// An integer is malformed or outside its field's range.
    #[error("{path}: {value} is not a valid {ty}")]
    BadInteger {
        /// Where.
        path: String,
        /// The value as written.
        value: String,
        /// The field's type.
        ty: &'static str,
    },
    /// An enum name the schema does not define.
    #[error("{path}: {name:?} is not a value of enum {enum_name}")]
    UnknownEnum {
        /// Where.
        path: String,
        /// The name written.
        name: String,
        /// The enum.
        enum_name: String,
    },
    /// Bytes that are not valid base64.
    #[error("{path}: invalid base64")]
    BadBase64 {
        /// Where.
        path: String,
    },
    /// An address that is neither IPv4 nor IPv6.
    #[error("{path}: {value:?} is not an IP address")]
    BadAddress {
        /// Where.
        path: String,
        /// The value written.
        value: String,
    },
    /// A payload that does not match its entry.
    #[error("{path}: {problem}")]
    BadPayload {
        /// Where.
        path: String,
        /// What does not match.
        problem: &'static str,
    },
    /// A message too large to frame.
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// How to render an image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeOptions {
    /// crit's `--pretty`: indented, with hex, flag, device and name renderings.
    pub pretty: bool,
    /// crit's `show --nopl`: payloads replaced by their size, as `"... <4KB>"`.
    pub no_payload: bool,
}

/// The wire type a field's values are encoded with.
fn wire_type_of(ty: FieldType) -> WireType {
    match ty {
        FieldType::Double | FieldType::Fixed64 | FieldType::Sfixed64 => WireType::Fixed64,
        FieldType::Float | FieldType::Fixed32 | FieldType::Sfixed32 => WireType::Fixed32,
        FieldType::String | FieldType::Bytes | FieldType::Message(_) => WireType::LengthDelimited,
        _ => WireType::Varint,
    }
}

/// The message at `index` in the schema.
fn schema_message(index: usize) -> &'static MessageSchema {
    &schema().messages[index]
}
