//! crit's JSON (or ours) back to image bytes.

use serde_json::{Map, Value as Json};

use super::tables::{dict_table, flag_table, flags_value, kernel_makedev, old_makedev};
use super::{EncodeError, schema_message, wire_type_of};
use crate::image::{ImageError, ImageWriter};
use crate::kind::{self, Layout, PayloadRule};
use crate::magic;
use crate::pyfmt;
use crate::schema::{FieldSchema, FieldType, MessageSchema, schema};
use crate::wire::{self, WireType};

/// Encodes crit's JSON form of an image (plain or pretty) into image bytes.
///
/// # Errors
///
/// A JSON shape that is not an image, unknown magics and enum names, and values that do not
/// fit their fields, each with the path of the value.
pub fn encode(json: &Json) -> Result<Vec<u8>, EncodeError> {
    let object = json.as_object().ok_or(EncodeError::NotAnImage)?;
    let magic_name = object
        .get("magic")
        .and_then(Json::as_str)
        .ok_or(EncodeError::NotAnImage)?;
    let entries = object
        .get("entries")
        .and_then(Json::as_array)
        .ok_or(EncodeError::NotAnImage)?;
    let magic =
        magic::value(magic_name).ok_or_else(|| EncodeError::UnknownMagic(magic_name.into()))?;
    let crit_name = magic::name(magic).unwrap_or(magic_name);
    let layout = kind::layout(crit_name).ok_or_else(|| EncodeError::NoMessage(crit_name.into()))?;

    let mut writer = ImageWriter::new(magic);
    let mut ghost_chunks = false;
    for (index, entry) in entries.iter().enumerate() {
        let path = format!("entries[{index}]");
        let fields = entry.as_object().ok_or_else(|| EncodeError::WrongType {
            path: path.clone(),
            expected: "an object",
        })?;
        let message_type = match layout {
            Layout::Uniform { message, .. } => message,
            Layout::Pagemap if index == 0 => "pagemap_head",
            Layout::Pagemap => "pagemap_entry",
            Layout::GhostFile if index == 0 => "ghost_file_entry",
            Layout::GhostFile => "ghost_chunk_entry",
        };
        let message = encode_message(message_type, fields, &path)?;
        writer.message(&message)?;

        let extra = fields.get("extra");
        let extra_path = format!("{path}.extra");
        match layout {
            Layout::Uniform { payload, .. } => {
                encode_payload(&mut writer, payload, &message, extra, &extra_path)?;
            }
            Layout::Pagemap => {}
            Layout::GhostFile => {
                if index == 0 {
                    ghost_chunks = wire::last_varint(&message, 9).ok().flatten().unwrap_or(0) != 0;
                }
                if index > 0 || !ghost_chunks {
                    if let Some(extra) = extra {
                        writer.payload(&base64_of(extra, &extra_path)?);
                    }
                }
            }
        }
    }
    Ok(writer.finish())
}

fn base64_of(value: &Json, path: &str) -> Result<Vec<u8>, EncodeError> {
    let text = value.as_str().ok_or_else(|| EncodeError::WrongType {
        path: path.to_owned(),
        expected: "a base64 string",
    })?;
    pyfmt::base64_decode(text).ok_or_else(|| EncodeError::BadBase64 {
        path: path.to_owned(),
    })
}

fn varint_field(message: &[u8], number: u32) -> u64 {
    wire::last_varint(message, number)
        .ok()
        .flatten()
        .unwrap_or(0)
}

fn padding(len: usize, to: usize) -> Vec<u8> {
    vec![0u8; len.div_ceil(to) * to - len]
}

fn encode_payload(
    writer: &mut ImageWriter,
    rule: PayloadRule,
    message: &[u8],
    extra: Option<&Json>,
    path: &str,
) -> Result<(), EncodeError> {
    let Some(extra) = extra else {
        return Ok(());
    };
    let wrong = |expected| EncodeError::WrongType {
        path: path.to_owned(),
        expected,
    };
    match rule {
        PayloadRule::None => {}
        PayloadRule::PipeData | PayloadRule::SocketQueue | PayloadRule::BpfMapData => {
            writer.payload(&base64_of(extra, path)?);
        }
        PayloadRule::TcpStream => {
            let queues = extra
                .as_object()
                .ok_or_else(|| wrong("an object with inq and outq"))?;
            for key in ["inq", "outq"] {
                let queue = queues
                    .get(key)
                    .ok_or_else(|| wrong("an object with inq and outq"))?;
                writer.payload(&base64_of(queue, &format!("{path}.{key}"))?);
            }
        }
        PayloadRule::IpcSemaphores => {
            let values = extra
                .as_array()
                .ok_or_else(|| wrong("a list of semaphore values"))?;
            if values.len() as u64 != varint_field(message, 2) {
                return Err(EncodeError::BadPayload {
                    path: path.to_owned(),
                    problem: "number of semaphore values differs from nsems",
                });
            }
            let mut bytes = Vec::with_capacity(values.len() * 2);
            for (i, value) in values.iter().enumerate() {
                let n = value
                    .as_u64()
                    .and_then(|n| u16::try_from(n).ok())
                    .ok_or_else(|| EncodeError::BadInteger {
                        path: format!("{path}[{i}]"),
                        value: value.to_string(),
                        ty: "u16",
                    })?;
                bytes.extend_from_slice(&n.to_ne_bytes());
            }
            let pad = padding(bytes.len(), 8);
            writer.payload(&bytes).payload(&pad);
        }
        PayloadRule::IpcMessages => {
            let items = extra
                .as_array()
                .ok_or_else(|| wrong("a list of message/text pairs"))?;
            for (i, pair) in items.chunks(2).enumerate() {
                let [header, text] = pair else {
                    return Err(EncodeError::BadPayload {
                        path: path.to_owned(),
                        problem: "a message header without its text",
                    });
                };
                let item_path = format!("{path}[{}]", 2 * i);
                let header = header.as_object().ok_or_else(|| EncodeError::WrongType {
                    path: item_path.clone(),
                    expected: "an object",
                })?;
                let encoded = encode_message("ipc_msg", header, &item_path)?;
                let msize = varint_field(&encoded, 2) as usize;
                let text = base64_of(text, &format!("{path}[{}]", 2 * i + 1))?;
                let mut body = text.get(..msize).map(<[u8]>::to_vec).unwrap_or(text);
                body.resize(msize, 0);
                let size = u32::try_from(encoded.len())
                    .map_err(|_| ImageError::MessageTooLarge { len: encoded.len() })?;
                writer
                    .payload(&size.to_ne_bytes())
                    .payload(&encoded)
                    .payload(&body);
                writer.payload(&padding(msize, 8));
            }
        }
        PayloadRule::IpcSharedMemory => {
            if varint_field(message, 3) != 0 {
                return Ok(());
            }
            let size = varint_field(message, 2) as usize;
            let mut data = base64_of(extra, path)?;
            data.resize(size, 0);
            writer.payload(&data).payload(&padding(size, 4));
        }
    }
    Ok(())
}

/// Encodes one message from its JSON object, fields in number order.
fn encode_message(
    name: &str,
    fields: &Map<String, Json>,
    path: &str,
) -> Result<Vec<u8>, EncodeError> {
    let message = schema()
        .message(name)
        .map(|(_, m)| m)
        .ok_or_else(|| EncodeError::NoMessage(name.to_owned()))?;
    let mut out = Vec::new();
    encode_fields(&mut out, message, fields, path)?;
    Ok(out)
}

fn encode_fields(
    out: &mut Vec<u8>,
    message: &MessageSchema,
    fields: &Map<String, Json>,
    path: &str,
) -> Result<(), EncodeError> {
    for field in message.fields {
        let Some(value) = fields.get(field.name) else {
            continue;
        };
        let field_path = format!("{path}.{}", field.name);
        if !field.repeated {
            encode_value(out, field, value, &field_path)?;
            continue;
        }
        let items = value.as_array().ok_or_else(|| EncodeError::WrongType {
            path: field_path.clone(),
            expected: "a list",
        })?;
        if field.criu.ipadd && items.first().is_some_and(Json::is_string) {
            let text = items[0].as_str().unwrap_or_default();
            let words = pyfmt::ip_words(text).ok_or_else(|| EncodeError::BadAddress {
                path: field_path.clone(),
                value: text.to_owned(),
            })?;
            let values: Vec<Json> = words.into_iter().map(Json::from).collect();
            encode_list(out, field, &values, &field_path)?;
        } else {
            encode_list(out, field, items, &field_path)?;
        }
    }
    Ok(())
}

fn encode_list(
    out: &mut Vec<u8>,
    field: &FieldSchema,
    items: &[Json],
    path: &str,
) -> Result<(), EncodeError> {
    if !field.packed {
        for (i, item) in items.iter().enumerate() {
            encode_value(out, field, item, &format!("{path}[{i}]"))?;
        }
        return Ok(());
    }
    if items.is_empty() {
        return Ok(());
    }
    let mut body = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let bits = integer_bits(field, item, &format!("{path}[{i}]"))?;
        match wire_type_of(field.ty) {
            WireType::Fixed32 => body.extend_from_slice(&(bits as u32).to_le_bytes()),
            WireType::Fixed64 => body.extend_from_slice(&bits.to_le_bytes()),
            _ => wire::write_varint(&mut body, bits),
        }
    }
    wire::write_tag(out, field.number, WireType::LengthDelimited);
    wire::write_varint(out, body.len() as u64);
    out.extend_from_slice(&body);
    Ok(())
}

fn encode_value(
    out: &mut Vec<u8>,
    field: &FieldSchema,
    value: &Json,
    path: &str,
) -> Result<(), EncodeError> {
    let wrong = |expected| EncodeError::WrongType {
        path: path.to_owned(),
        expected,
    };
    match field.ty {
        FieldType::Message(index) => {
            let object = value.as_object().ok_or_else(|| wrong("an object"))?;
            let mut body = Vec::new();
            encode_fields(&mut body, schema_message(index), object, path)?;
            wire::write_tag(out, field.number, WireType::LengthDelimited);
            wire::write_varint(out, body.len() as u64);
            out.extend_from_slice(&body);
        }
        FieldType::String | FieldType::Bytes => {
            let bytes = match (field.ty, value) {
                (FieldType::String, Json::String(s)) => s.as_bytes().to_vec(),
                (FieldType::String, other) => other.to_string().into_bytes(),
                (_, Json::String(s)) if field.criu.conv == Some("unix_name") => {
                    pyfmt::quopri_decode(s)
                }
                (_, v) => base64_of(v, path)?,
            };
            wire::write_tag(out, field.number, WireType::LengthDelimited);
            wire::write_varint(out, bytes.len() as u64);
            out.extend_from_slice(&bytes);
        }
        FieldType::Double | FieldType::Float => {
            let v = value.as_f64().ok_or_else(|| wrong("a number"))?;
            if field.ty == FieldType::Double {
                wire::write_tag(out, field.number, WireType::Fixed64);
                out.extend_from_slice(&v.to_bits().to_le_bytes());
            } else {
                wire::write_tag(out, field.number, WireType::Fixed32);
                out.extend_from_slice(&(v as f32).to_bits().to_le_bytes());
            }
        }
        _ => {
            let bits = integer_bits(field, value, path)?;
            let wire_type = wire_type_of(field.ty);
            wire::write_tag(out, field.number, wire_type);
            match wire_type {
                WireType::Fixed32 => out.extend_from_slice(&(bits as u32).to_le_bytes()),
                WireType::Fixed64 => out.extend_from_slice(&bits.to_le_bytes()),
                _ => wire::write_varint(out, bits),
            }
        }
    }
    Ok(())
}

/// The wire bits of a scalar (integer, bool or enum) field's JSON value, accepting every
/// string form `--pretty` prints.
fn integer_bits(field: &FieldSchema, value: &Json, path: &str) -> Result<u64, EncodeError> {
    let bad = |ty: &'static str| EncodeError::BadInteger {
        path: path.to_owned(),
        value: value.to_string(),
        ty,
    };
    if field.ty == FieldType::Bool {
        let truthy = match value {
            Json::Bool(b) => *b,
            Json::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
            Json::String(s) => !s.is_empty(),
            Json::Null => false,
            Json::Array(a) => !a.is_empty(),
            Json::Object(o) => !o.is_empty(),
        };
        return Ok(u64::from(truthy));
    }
    if let FieldType::Enum(index) = field.ty {
        let enum_schema = &schema().enums[index];
        let number = match value {
            Json::String(name) => {
                enum_schema
                    .number_of(name)
                    .ok_or_else(|| EncodeError::UnknownEnum {
                        path: path.to_owned(),
                        name: name.clone(),
                        enum_name: enum_schema.name.to_owned(),
                    })?
            }
            Json::Number(n) => n
                .as_i64()
                .and_then(|n| i32::try_from(n).ok())
                .ok_or_else(|| bad("enum"))?,
            _ => return Err(bad("enum")),
        };
        return Ok(number as i64 as u64);
    }

    let n: i128 = match value {
        Json::Number(n) => n
            .as_u64()
            .map(i128::from)
            .or_else(|| n.as_i64().map(i128::from))
            .ok_or_else(|| bad("integer"))?,
        Json::String(text) => string_integer(field, text).ok_or_else(|| bad("integer"))?,
        Json::Bool(b) => i128::from(*b),
        _ => return Err(bad("integer")),
    };
    let (ty, fits) = match field.ty {
        FieldType::Int32 | FieldType::Sint32 | FieldType::Sfixed32 => {
            ("int32", i32::try_from(n).is_ok())
        }
        FieldType::Uint32 | FieldType::Fixed32 => ("uint32", u32::try_from(n).is_ok()),
        FieldType::Int64 | FieldType::Sint64 | FieldType::Sfixed64 => {
            ("int64", i64::try_from(n).is_ok())
        }
        _ => ("uint64", u64::try_from(n).is_ok()),
    };
    if !fits {
        return Err(bad(ty));
    }
    Ok(match field.ty {
        FieldType::Sint32 => {
            let v = n as i32;
            u64::from(((v << 1) ^ (v >> 31)) as u32)
        }
        FieldType::Sint64 => {
            let v = n as i64;
            ((v << 1) ^ (v >> 63)) as u64
        }
        FieldType::Fixed32 | FieldType::Sfixed32 => u64::from(n as i32 as u32),
        _ => n as i64 as u64,
    })
}

/// An integer written as a string: a device, flag names, a dictionary name or a literal.
fn string_integer(field: &FieldSchema, text: &str) -> Option<i128> {
    if field.criu.dev {
        let (major, minor) = text.split_once(':')?;
        let (major, minor) = (major.trim().parse().ok()?, minor.trim().parse().ok()?);
        let dev = if field.criu.odev {
            old_makedev(major, minor)
        } else {
            kernel_makedev(major, minor)
        };
        return Some(i128::from(dev));
    }
    if let Some(table) = field.criu.flags.and_then(flag_table) {
        return flags_value(text, table);
    }
    if let Some(dict) = field.criu.dict {
        if let Some((n, _)) = dict_table(dict, field.name)?
            .iter()
            .find(|(_, name)| *name == text)
        {
            return Some(*n);
        }
    }
    pyfmt::parse_int(text)
}
