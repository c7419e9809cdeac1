//! The protobuf wire format at its lowest level: varints and tagged fields over `&[u8]`.
//!
//! The framing code uses it to read the few length fields that say how long an entry's extra
//! payload is, and the JSON codec walks messages with it field by field, so both work on the
//! borrowed entry bytes without building message structs.

use thiserror::Error;

/// How a field's value is laid out on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireType {
    /// A base-128 varint.
    Varint,
    /// Eight little-endian bytes.
    Fixed64,
    /// A varint length followed by that many bytes.
    LengthDelimited,
    /// Four little-endian bytes.
    Fixed32,
}

/// One field as it stands on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field<'a> {
    /// The field number.
    pub number: u32,
    /// The value, still encoded.
    pub value: Value<'a>,
}

/// A field's value, undecoded beyond its wire type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value<'a> {
    /// A varint, as the raw 64 bits.
    Varint(u64),
    /// A fixed 64-bit value.
    Fixed64(u64),
    /// A fixed 32-bit value.
    Fixed32(u32),
    /// The bytes of a string, bytes, message or packed repeated field.
    Bytes(&'a [u8]),
}

impl Value<'_> {
    /// The wire type this value was encoded with.
    pub fn wire_type(&self) -> WireType {
        match self {
            Value::Varint(_) => WireType::Varint,
            Value::Fixed64(_) => WireType::Fixed64,
            Value::Fixed32(_) => WireType::Fixed32,
            Value::Bytes(_) => WireType::LengthDelimited,
        }
    }
}

/// What is wrong with a message's wire encoding.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// A varint ran past the end of the message or past ten bytes.
    #[error("bad varint at byte {offset} of the message")]
    Varint {
        /// Offset of the varint inside the message.
        offset: usize,
    },
    /// A field's value ran past the end of the message.
    #[error("field {number} at byte {offset} runs past the end of the message")]
    Truncated {
        /// The field number.
        number: u32,
        /// Offset of the field's tag inside the message.
        offset: usize,
    },
    /// A tag with field number 0, or a wire type protobuf does not define (or the deprecated
    /// groups, which CRIU never writes).
    #[error("bad tag {tag:#x} at byte {offset} of the message")]
    Tag {
        /// The tag as read.
        tag: u64,
        /// Offset of the tag inside the message.
        offset: usize,
    },
}

/// Reads a varint from the front of `bytes`, returning it and its encoded length.
pub fn read_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    if let Some(&byte) = bytes.first()
        && byte < 0x80
    {
        return Some((u64::from(byte), 1));
    }
    let mut value = 0u64;
    for (i, &byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Appends `value` as a varint.
pub fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Appends a field tag.
pub fn write_tag(out: &mut Vec<u8>, number: u32, wire_type: WireType) {
    let code = match wire_type {
        WireType::Varint => 0,
        WireType::Fixed64 => 1,
        WireType::LengthDelimited => 2,
        WireType::Fixed32 => 5,
    };
    write_varint(out, (u64::from(number) << 3) | code);
}

/// Iterates over the fields of one encoded message, in wire order.
#[derive(Clone, Debug)]
pub struct Fields<'a> {
    bytes: &'a [u8],
    pos: usize,
    failed: bool,
}

/// Iterates over the fields of `message`.
pub fn fields(message: &[u8]) -> Fields<'_> {
    Fields {
        bytes: message,
        pos: 0,
        failed: false,
    }
}

impl<'a> Fields<'a> {
    fn next_field(&mut self) -> Result<Field<'a>, WireError> {
        let start = self.pos;
        let (tag, len) =
            read_varint(&self.bytes[start..]).ok_or(WireError::Varint { offset: start })?;
        self.pos += len;

        let number = tag >> 3;
        if number == 0 || number > u64::from(u32::MAX >> 3) {
            return Err(WireError::Tag { tag, offset: start });
        }
        let number = number as u32;
        let rest = &self.bytes[self.pos..];
        let truncated = WireError::Truncated {
            number,
            offset: start,
        };

        let value = match tag & 7 {
            0 => {
                let (v, n) = read_varint(rest).ok_or(WireError::Varint { offset: self.pos })?;
                self.pos += n;
                Value::Varint(v)
            }
            1 => {
                let raw: [u8; 8] = rest
                    .get(..8)
                    .ok_or(truncated)?
                    .try_into()
                    .map_err(|_| truncated)?;
                self.pos += 8;
                Value::Fixed64(u64::from_le_bytes(raw))
            }
            2 => {
                let (n, k) = read_varint(rest).ok_or(WireError::Varint { offset: self.pos })?;
                let n = usize::try_from(n).map_err(|_| truncated)?;
                let body = rest.get(k..).and_then(|r| r.get(..n)).ok_or(truncated)?;
                self.pos += k + n;
                Value::Bytes(body)
            }
            5 => {
                let raw: [u8; 4] = rest
                    .get(..4)
                    .ok_or(truncated)?
                    .try_into()
                    .map_err(|_| truncated)?;
                self.pos += 4;
                Value::Fixed32(u32::from_le_bytes(raw))
            }
            _ => return Err(WireError::Tag { tag, offset: start }),
        };
        Ok(Field { number, value })
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<Field<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.bytes.len() {
            return None;
        }
        let field = self.next_field();
        self.failed = field.is_err();
        Some(field)
    }
}

/// The last varint value of field `number` in `message` (protobuf's last-one-wins rule), or
/// `None` when the field is absent.
///
/// # Errors
///
/// Returns the wire error when the message cannot be walked up to its end.
pub fn last_varint(message: &[u8], number: u32) -> Result<Option<u64>, WireError> {
    let mut found = None;
    for field in fields(message) {
        let field = field?;
        if let (true, Value::Varint(v)) = (field.number == number, field.value) {
            found = Some(v);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        for value in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            write_varint(&mut out, value);
            assert_eq!(read_varint(&out), Some((value, out.len())));
        }
        assert_eq!(read_varint(&[0x80, 0x80]), None);
        assert_eq!(read_varint(&[0xff; 11]), None);
    }

    #[test]
    fn walks_fields_and_reports_truncation() {
        // vaddr = 0x1000 (field 1), nr_pages = 2 (field 2), flags = 4 (field 4).
        let msg = [0x08, 0x80, 0x20, 0x10, 0x02, 0x20, 0x04];
        let numbers: Vec<u32> = fields(&msg)
            .map(|f| f.map(|f| f.number))
            .collect::<Result<_, _>>()
            .expect("valid message");
        assert_eq!(numbers, [1, 2, 4]);
        assert_eq!(last_varint(&msg, 4), Ok(Some(4)));
        assert_eq!(last_varint(&msg, 3), Ok(None));

        let cut = [0x0a, 0x05, b'a'];
        assert_eq!(
            fields(&cut).next(),
            Some(Err(WireError::Truncated {
                number: 1,
                offset: 0
            }))
        );
        assert!(matches!(
            fields(&[0x07]).next(),
            Some(Err(WireError::Tag { .. }))
        ));
    }
}
