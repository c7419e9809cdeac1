//! Image file framing: the magic words, then entries of a 32-bit size and a protobuf message,
//! each possibly followed by an extra payload.
//!
//! Everything here borrows from the image bytes: an [`Entry`] is a set of slices into them.
//! Sizes are checked against what is left of the input before anything is sliced, so a corrupt
//! size word becomes an error, never an allocation or a panic.

use thiserror::Error;
use zerocopy::byteorder::{NativeEndian, U32};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

use crate::kind::{self, Layout, PayloadRule};
use crate::magic;
use crate::wire::{self, WireError};

/// A magic or size word as it lies in the file: host-endian, since CRIU writes them with a
/// plain `write()` of a `u32`.
#[derive(FromBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
struct RawWord {
    value: U32<NativeEndian>,
}

/// Why an image could not be framed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ImageError {
    /// The file ends before its magic words.
    #[error("image is {len} bytes long, too short for its magic")]
    TooShort {
        /// Length of the image.
        len: usize,
    },
    /// The magic is none CRIU defines; raw images (pages, tmpfs archives) have no magic at
    /// all and are known by their file name instead.
    #[error(
        "unknown magic {magic:#x}: not a CRIU protobuf image (raw images such as pages-*.img \
             have no magic)"
    )]
    UnknownMagic {
        /// The first magic word that is not a head magic.
        magic: u32,
    },
    /// The magic is CRIU's but names no protobuf message.
    #[error("magic {name} ({magic:#x}) has no protobuf entries")]
    NoMessage {
        /// The magic's name.
        name: &'static str,
        /// The magic value.
        magic: u32,
    },
    /// The file ends inside an entry's size word.
    #[error("entry {index} at offset {offset}: size word cut short ({available} of 4 bytes)")]
    TruncatedSize {
        /// Index of the entry.
        index: usize,
        /// Offset of the size word.
        offset: usize,
        /// Bytes left in the file.
        available: usize,
    },
    /// An entry's size runs past the end of the file.
    #[error(
        "entry {index} at offset {offset}: size {size} runs past the end of the image \
             ({available} bytes left)"
    )]
    TruncatedEntry {
        /// Index of the entry.
        index: usize,
        /// Offset of the size word.
        offset: usize,
        /// The size the word claims.
        size: u32,
        /// Bytes left after the size word.
        available: usize,
    },
    /// The message of an entry is not valid protobuf.
    #[error("entry {index} at offset {offset}: malformed {message}")]
    Malformed {
        /// Index of the entry.
        index: usize,
        /// Offset of the entry's size word.
        offset: usize,
        /// Name of the message the entry holds.
        message: &'static str,
        /// What is wrong with the encoding.
        #[source]
        source: WireError,
    },
    /// An entry's extra payload runs past the end of the file.
    #[error(
        "entry {index} at offset {offset}: {what} of {needed} bytes runs past the end of \
             the image ({available} bytes left)"
    )]
    TruncatedPayload {
        /// Index of the entry.
        index: usize,
        /// Offset of the entry's size word.
        offset: usize,
        /// Which payload.
        what: &'static str,
        /// Bytes the message says follow.
        needed: u64,
        /// Bytes left in the file.
        available: usize,
    },
    /// A message too large for CRIU's 32-bit entry size.
    #[error("a {len}-byte message does not fit an entry's 32-bit size")]
    MessageTooLarge {
        /// Length of the message.
        len: usize,
    },
}

/// A parsed image: its magic words and where its entries start.
#[derive(Clone, Copy, Debug)]
pub struct Image<'a> {
    data: &'a [u8],
    head: Option<u32>,
    magic: u32,
    body: usize,
}

fn word_at(data: &[u8], offset: usize) -> Option<u32> {
    let bytes = data.get(offset..offset.checked_add(4)?)?;
    RawWord::read_from_bytes(bytes).ok().map(|w| w.value.get())
}

impl<'a> Image<'a> {
    /// Reads the magic words of `data`.
    ///
    /// # Errors
    ///
    /// [`ImageError::TooShort`] when a magic word is cut off, [`ImageError::UnknownMagic`]
    /// when the kind magic is not one CRIU defines.
    pub fn parse(data: &'a [u8]) -> Result<Self, ImageError> {
        let too_short = ImageError::TooShort { len: data.len() };
        let first = word_at(data, 0).ok_or(too_short.clone())?;
        let (head, magic, body) = match first {
            magic::IMG_COMMON | magic::IMG_SERVICE => {
                (Some(first), word_at(data, 4).ok_or(too_short)?, 8)
            }
            other => (None, other, 4),
        };
        if magic::name(magic).is_none() {
            return Err(ImageError::UnknownMagic { magic });
        }
        Ok(Image {
            data,
            head,
            magic,
            body,
        })
    }

    /// The kind magic.
    pub fn magic(&self) -> u32 {
        self.magic
    }

    /// The name crit gives the kind magic.
    pub fn magic_name(&self) -> &'static str {
        magic::name(self.magic).unwrap_or("UNKNOWN")
    }

    /// The head magic, absent in the inventory.
    pub fn head_magic(&self) -> Option<u32> {
        self.head
    }

    /// The whole image, magic included.
    pub fn bytes(&self) -> &'a [u8] {
        self.data
    }

    /// Offset of the first entry.
    pub fn body_offset(&self) -> usize {
        self.body
    }

    /// How the entries of this kind are laid out.
    ///
    /// # Errors
    ///
    /// [`ImageError::NoMessage`] for a magic without a protobuf message.
    pub fn layout(&self) -> Result<Layout, ImageError> {
        let name = self.magic_name();
        kind::layout(name).ok_or(ImageError::NoMessage {
            name,
            magic: self.magic,
        })
    }

    /// The entries in file order, each with its extra payload.
    ///
    /// # Errors
    ///
    /// [`ImageError::NoMessage`] for a magic without a protobuf message; framing errors come
    /// from the iterator, which stops after the first.
    pub fn entries(&self) -> Result<Entries<'a>, ImageError> {
        Ok(Entries {
            data: self.data,
            pos: self.body,
            index: 0,
            layout: self.layout()?,
            ghost_chunks: false,
            failed: false,
        })
    }
}

/// One entry: its protobuf message and what follows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// Position in the file, from 0.
    pub index: usize,
    /// Offset of the entry's size word.
    pub offset: usize,
    /// Name of the protobuf message the entry holds.
    pub message_type: &'static str,
    /// The encoded message.
    pub message: &'a [u8],
    /// The extra payload.
    pub payload: Payload<'a>,
}

impl Entry<'_> {
    /// Offset just past the entry and its payload.
    pub fn end(&self) -> usize {
        self.offset + 4 + self.message.len() + self.payload.len()
    }
}

/// An entry's extra payload, as slices of the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload<'a> {
    /// Nothing follows the message.
    None,
    /// A run of bytes: pipe or socket queue contents, bpf map keys then values, a ghost file's
    /// contents or one chunk of them.
    Bytes(&'a [u8]),
    /// The two queues of a TCP connection.
    TcpStream {
        /// Receive queue.
        inq: &'a [u8],
        /// Send queue.
        outq: &'a [u8],
    },
    /// The values of a semaphore set, and the zero padding after them.
    Semaphores {
        /// `nsems` native-endian 16-bit values.
        values: &'a [u8],
        /// Padding up to a multiple of 8 bytes.
        padding: &'a [u8],
    },
    /// The messages of a System V message queue.
    Messages(Vec<IpcMessage<'a>>),
    /// A System V shared memory segment stored inline (old dumps only).
    SharedMemory {
        /// `size` bytes of the segment.
        data: &'a [u8],
        /// Padding up to a multiple of 4 bytes.
        padding: &'a [u8],
    },
}

impl Payload<'_> {
    /// The number of bytes the payload takes in the file.
    pub fn len(&self) -> usize {
        match self {
            Payload::None => 0,
            Payload::Bytes(b) => b.len(),
            Payload::TcpStream { inq, outq } => inq.len() + outq.len(),
            Payload::Semaphores { values, padding } => values.len() + padding.len(),
            Payload::Messages(messages) => messages.iter().map(IpcMessage::len).sum(),
            Payload::SharedMemory { data, padding } => data.len() + padding.len(),
        }
    }

    /// Whether the payload takes no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One message of a System V message queue payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpcMessage<'a> {
    /// The encoded `ipc_msg` (mtype and msize).
    pub header: &'a [u8],
    /// `msize` bytes of message text.
    pub text: &'a [u8],
    /// Padding up to a multiple of 8 bytes.
    pub padding: &'a [u8],
}

impl IpcMessage<'_> {
    fn len(&self) -> usize {
        4 + self.header.len() + self.text.len() + self.padding.len()
    }
}

/// Iterator over the entries of an image; stops after the first error.
#[derive(Clone, Debug)]
pub struct Entries<'a> {
    data: &'a [u8],
    pos: usize,
    index: usize,
    layout: Layout,
    ghost_chunks: bool,
    failed: bool,
}

/// Reads one size-framed protobuf message at `pos`.
fn framed_at(data: &[u8], pos: usize, index: usize) -> Result<&[u8], ImageError> {
    let available = data.len() - pos;
    let size = word_at(data, pos).ok_or(ImageError::TruncatedSize {
        index,
        offset: pos,
        available,
    })?;
    let start = pos + 4;
    usize::try_from(size)
        .ok()
        .and_then(|len| data.get(start..start.checked_add(len)?))
        .ok_or(ImageError::TruncatedEntry {
            index,
            offset: pos,
            size,
            available: available - 4,
        })
}

/// Rounds `n` up to a multiple of `to`, a power of two.
fn round_up(n: u64, to: u64) -> Option<u64> {
    Some(n.checked_add(to - 1)? & !(to - 1))
}

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
    index: usize,
    offset: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, what: &'static str, len: u64) -> Result<&'a [u8], ImageError> {
        let available = self.data.len() - self.pos;
        let error = ImageError::TruncatedPayload {
            index: self.index,
            offset: self.offset,
            what,
            needed: len,
            available,
        };
        let len = usize::try_from(len).map_err(|_| error.clone())?;
        let end = self.pos.checked_add(len).ok_or(error.clone())?;
        let bytes = self.data.get(self.pos..end).ok_or(error)?;
        self.pos = end;
        Ok(bytes)
    }
}

impl<'a> Entries<'a> {
    fn field(
        &self,
        message: &[u8],
        message_type: &'static str,
        offset: usize,
        number: u32,
    ) -> Result<u64, ImageError> {
        wire::last_varint(message, number)
            .map(|v| v.unwrap_or(0))
            .map_err(|source| ImageError::Malformed {
                index: self.index,
                offset,
                message: message_type,
                source,
            })
    }

    fn payload(
        &self,
        rule: PayloadRule,
        message: &[u8],
        message_type: &'static str,
        cursor: &mut Cursor<'a>,
    ) -> Result<Payload<'a>, ImageError> {
        let offset = cursor.offset;
        let field = |number| self.field(message, message_type, offset, number);
        Ok(match rule {
            PayloadRule::None => Payload::None,
            PayloadRule::PipeData => Payload::Bytes(cursor.take("pipe data", field(2)?)?),
            PayloadRule::SocketQueue => Payload::Bytes(cursor.take("queued packet", field(2)?)?),
            PayloadRule::TcpStream => {
                let inq = cursor.take("receive queue", field(1)?)?;
                let outq = cursor.take("send queue", field(3)?)?;
                Payload::TcpStream { inq, outq }
            }
            PayloadRule::BpfMapData => {
                let total = field(2)?.saturating_add(field(3)?);
                Payload::Bytes(cursor.take("bpf map keys and values", total)?)
            }
            PayloadRule::IpcSemaphores => {
                let size = field(2)?.saturating_mul(2);
                let values = cursor.take("semaphore values", size)?;
                let padded = round_up(size, 8).unwrap_or(u64::MAX);
                let padding = cursor.take("semaphore padding", padded - size)?;
                Payload::Semaphores { values, padding }
            }
            PayloadRule::IpcMessages => {
                let mut messages = Vec::new();
                for _ in 0..field(3)? {
                    messages.push(self.ipc_message(cursor)?);
                }
                Payload::Messages(messages)
            }
            PayloadRule::IpcSharedMemory => {
                if field(3)? != 0 {
                    return Ok(Payload::None);
                }
                let size = field(2)?;
                let data = cursor.take("shared memory segment", size)?;
                let padded = round_up(size, 4).unwrap_or(u64::MAX);
                let padding = cursor.take("shared memory padding", padded - size)?;
                Payload::SharedMemory { data, padding }
            }
        })
    }

    fn ipc_message(&self, cursor: &mut Cursor<'a>) -> Result<IpcMessage<'a>, ImageError> {
        let size_word = cursor.take("message size word", 4)?;
        let size = u32::from_ne_bytes([size_word[0], size_word[1], size_word[2], size_word[3]]);
        let header = cursor.take("message header", u64::from(size))?;
        let msize = self.field(header, "ipc_msg", cursor.offset, 2)?;
        let text = cursor.take("message text", msize)?;
        let padded = round_up(msize, 8).unwrap_or(u64::MAX);
        let padding = cursor.take("message padding", padded - msize)?;
        Ok(IpcMessage {
            header,
            text,
            padding,
        })
    }

    fn next_entry(&mut self) -> Result<Entry<'a>, ImageError> {
        let offset = self.pos;
        let message = framed_at(self.data, offset, self.index)?;
        let mut cursor = Cursor {
            data: self.data,
            pos: offset + 4 + message.len(),
            index: self.index,
            offset,
        };

        let (message_type, payload) = match self.layout {
            Layout::Uniform {
                message: message_type,
                payload,
            } => (
                message_type,
                self.payload(payload, message, message_type, &mut cursor)?,
            ),
            Layout::Pagemap if self.index == 0 => ("pagemap_head", Payload::None),
            Layout::Pagemap => ("pagemap_entry", Payload::None),
            Layout::GhostFile if self.index == 0 => {
                let message_type = "ghost_file_entry";
                self.ghost_chunks = self.field(message, message_type, offset, 9)? != 0;
                if self.ghost_chunks {
                    (message_type, Payload::None)
                } else {
                    let rest = (self.data.len() - cursor.pos) as u64;
                    (
                        message_type,
                        Payload::Bytes(cursor.take("ghost file contents", rest)?),
                    )
                }
            }
            Layout::GhostFile => {
                let message_type = "ghost_chunk_entry";
                let len = self.field(message, message_type, offset, 1)?;
                (
                    message_type,
                    Payload::Bytes(cursor.take("ghost file chunk", len)?),
                )
            }
        };

        self.pos = cursor.pos;
        let entry = Entry {
            index: self.index,
            offset,
            message_type,
            message,
            payload,
        };
        self.index += 1;
        Ok(entry)
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<Entry<'a>, ImageError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.data.len() {
            return None;
        }
        // A ghost file without chunks holds its whole contents after the first entry.
        if self.layout == Layout::GhostFile && self.index > 0 && !self.ghost_chunks {
            return None;
        }
        let entry = self.next_entry();
        self.failed = entry.is_err();
        Some(entry)
    }
}

/// Writes an image: the magic words, then entries framed as CRIU frames them.
#[derive(Debug, Default)]
pub struct ImageWriter {
    out: Vec<u8>,
}

impl ImageWriter {
    /// Starts an image of kind `magic`, with the head magic CRIU puts in front of it.
    pub fn new(magic: u32) -> Self {
        let mut out = Vec::new();
        if let Some(head) = magic::head_for(magic) {
            out.extend_from_slice(&head.to_ne_bytes());
        }
        out.extend_from_slice(&magic.to_ne_bytes());
        ImageWriter { out }
    }

    /// Appends one entry's message, framed by its size.
    ///
    /// # Errors
    ///
    /// [`ImageError::MessageTooLarge`] for a message that a 32-bit size cannot frame.
    pub fn message(&mut self, message: &[u8]) -> Result<&mut Self, ImageError> {
        let size = u32::try_from(message.len())
            .map_err(|_| ImageError::MessageTooLarge { len: message.len() })?;
        self.out.extend_from_slice(&size.to_ne_bytes());
        self.out.extend_from_slice(message);
        Ok(self)
    }

    /// Appends raw payload bytes after the last message.
    pub fn payload(&mut self, bytes: &[u8]) -> &mut Self {
        self.out.extend_from_slice(bytes);
        self
    }

    /// The image bytes.
    pub fn finish(self) -> Vec<u8> {
        self.out
    }
}

/// Rewrites some entries of an image and copies everything else byte for byte.
///
/// `change` sees each entry and returns the new encoding of its message, or `None` to keep
/// it. Unchanged entries keep their exact bytes (unknown fields included), and every payload is
/// copied as it was, so only what `change` touched differs in the result.
///
/// # Errors
///
/// Framing errors of the input and messages too large to frame; `change`'s own errors.
pub fn rewrite<E>(
    image: &Image<'_>,
    mut change: impl FnMut(&Entry<'_>) -> Result<Option<Vec<u8>>, E>,
) -> Result<Vec<u8>, E>
where
    E: From<ImageError>,
{
    let data = image.bytes();
    let mut out = Vec::with_capacity(data.len());
    out.extend_from_slice(&data[..image.body_offset()]);
    for entry in image.entries()? {
        let entry = entry?;
        let payload_start = entry.offset + 4 + entry.message.len();
        match change(&entry)? {
            None => out.extend_from_slice(&data[entry.offset..payload_start]),
            Some(message) => {
                let size = u32::try_from(message.len())
                    .map_err(|_| ImageError::MessageTooLarge { len: message.len() })?;
                out.extend_from_slice(&size.to_ne_bytes());
                out.extend_from_slice(&message);
            }
        }
        out.extend_from_slice(&data[payload_start..entry.end()]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::WireType;

    fn sk_queue_image() -> Vec<u8> {
        // sk_packet_entry { id_for: 7, length: 3 } followed by 3 payload bytes, twice; the
        // second entry also carries an unknown field 99.
        let mut first = Vec::new();
        wire::write_tag(&mut first, 1, WireType::Varint);
        wire::write_varint(&mut first, 7);
        wire::write_tag(&mut first, 2, WireType::Varint);
        wire::write_varint(&mut first, 3);
        let mut second = first.clone();
        wire::write_tag(&mut second, 99, WireType::Varint);
        wire::write_varint(&mut second, 1);

        let mut writer = ImageWriter::new(magic::value("SK_QUEUES").expect("known magic"));
        writer.message(&first).expect("small").payload(b"abc");
        writer.message(&second).expect("small").payload(b"xyz");
        writer.finish()
    }

    #[test]
    fn payloads_are_framed_by_their_entries() {
        let data = sk_queue_image();
        let image = Image::parse(&data).expect("valid image");
        let entries: Vec<Entry<'_>> = image
            .entries()
            .expect("has a layout")
            .collect::<Result<_, _>>()
            .expect("valid entries");
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].payload, Payload::Bytes(b"abc"));
        assert_eq!(entries[1].payload, Payload::Bytes(b"xyz"));
        assert_eq!(entries[1].end(), data.len());
    }

    #[test]
    fn rewrite_keeps_untouched_bytes_and_unknown_fields() {
        let data = sk_queue_image();
        let image = Image::parse(&data).expect("valid image");
        let same = rewrite::<ImageError>(&image, |_| Ok(None)).expect("rewrites");
        assert_eq!(same, data);

        let changed = rewrite::<ImageError>(&image, |entry| {
            Ok((entry.index == 0).then(|| {
                let mut message = entry.message.to_vec();
                message[1] = 8;
                message
            }))
        })
        .expect("rewrites");
        let differing: Vec<usize> = (0..data.len()).filter(|&i| data[i] != changed[i]).collect();
        assert_eq!(differing.len(), 1, "only the patched byte differs");
        assert!(changed.ends_with(b"xyz"));
    }

    #[test]
    fn corrupt_framing_is_reported_with_its_place() {
        let mut data = sk_queue_image();
        assert!(matches!(
            Image::parse(&data[..6]),
            Err(ImageError::TooShort { len: 6 })
        ));

        let last = data.len() - 1;
        data.truncate(last);
        let image = Image::parse(&data).expect("magic intact");
        let error = image
            .entries()
            .expect("layout")
            .last()
            .expect("an item")
            .expect_err("cut");
        assert!(matches!(
            error,
            ImageError::TruncatedPayload {
                index: 1,
                needed: 3,
                available: 2,
                ..
            }
        ));

        let mut data = sk_queue_image();
        data[8..12].copy_from_slice(&u32::MAX.to_ne_bytes());
        let image = Image::parse(&data).expect("magic intact");
        let error = image
            .entries()
            .expect("layout")
            .next()
            .expect("an item")
            .expect_err("bad size");
        assert!(matches!(
            error,
            ImageError::TruncatedEntry {
                index: 0,
                offset: 8,
                size: u32::MAX,
                ..
            }
        ));

        let mut data = sk_queue_image();
        data[4..8].copy_from_slice(&0x1234_5678u32.to_ne_bytes());
        assert_eq!(
            Image::parse(&data).err(),
            Some(ImageError::UnknownMagic { magic: 0x1234_5678 })
        );
    }
}
