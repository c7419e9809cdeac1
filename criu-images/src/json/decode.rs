//! Image bytes to crit's JSON text.

use rayon::prelude::*;
use smallvec::SmallVec;

use super::tables::{dict_name, flag_table, kernel_dev, old_dev, push_flag_names, push_hex};
use super::{DecodeError, DecodeOptions, schema_message, wire_type_of};
use crate::image::{Entry, Image, Payload};
use crate::kind::{Layout, PayloadRule};
use crate::pyfmt::{self, JsonWriter};
use crate::schema::{FieldSchema, FieldType, MessageSchema, schema};
use crate::wire::{self, Value, WireError, WireType};

/// Renders `image` as crit's JSON, without a trailing newline.
///
/// # Errors
///
/// Framing errors and malformed messages.
pub fn decode(image: &Image<'_>, options: DecodeOptions) -> Result<String, DecodeError> {
    let mut out = Vec::with_capacity(image.bytes().len() * 4);
    decode_to(image, options, &mut out)?;
    // The writer produces ASCII only (Python's ensure_ascii).
    Ok(String::from_utf8(out).unwrap_or_default())
}

/// Images render in batches of this many entries, so output streams out in bounded memory.
const BATCH_ENTRIES: usize = 16384;

/// Batches at least this large are split over threads.
const PARALLEL_ENTRIES: usize = 2048;

/// Renders `image` as crit's JSON into `out`, without a trailing newline.
///
/// Entries are framed in batches; a large batch (the pagemap of a big process) is rendered in
/// parallel runs that are then written in order, so the text is exactly the sequential one.
///
/// # Errors
///
/// Framing errors, malformed messages and write errors.
pub fn decode_to(
    image: &Image<'_>,
    options: DecodeOptions,
    out: &mut dyn std::io::Write,
) -> Result<(), DecodeError> {
    let layout = image.layout()?;
    let pretty = options.pretty;
    let mut w = JsonWriter::new(pretty);
    w.begin_object();
    w.key("magic");
    w.string(image.magic_name());
    w.key("entries");
    w.begin_array();

    let mut entries = image.entries()?;
    let mut batch: Vec<Entry<'_>> = Vec::new();
    let mut schemas = MessageCache::default();
    // One text buffer per thread, kept across batches.
    let mut buffers: Vec<String> = Vec::new();
    loop {
        batch.clear();
        for entry in entries.by_ref().take(BATCH_ENTRIES) {
            batch.push(entry?);
        }
        if batch.is_empty() {
            break;
        }

        if batch.len() < PARALLEL_ENTRIES {
            for entry in &batch {
                let message = schemas.get(entry.message_type)?;
                decode_entry(&mut w, entry, message, layout, options)?;
            }
        } else {
            let threads = rayon::current_num_threads().max(1);
            buffers.resize_with(threads, String::new);
            let run_len = batch.len().div_ceil(threads);
            let started = w.has_items();
            let rendered: Vec<Result<String, DecodeError>> = batch
                .par_chunks(run_len)
                .zip(buffers.par_drain(..))
                .enumerate()
                .map(|(i, (run, buffer))| {
                    let mut part =
                        JsonWriter::continuing(pretty, &[true, started || i > 0], buffer);
                    let mut schemas = MessageCache::default();
                    for entry in run {
                        let message = schemas.get(entry.message_type)?;
                        decode_entry(&mut part, entry, message, layout, options)?;
                    }
                    Ok(part.finish())
                })
                .collect();
            w.flush_to(out).map_err(DecodeError::Write)?;
            for run in rendered {
                let run = run?;
                out.write_all(run.as_bytes()).map_err(DecodeError::Write)?;
                w.continued(!run.is_empty());
                buffers.push(run);
            }
        }
        w.flush_to(out).map_err(DecodeError::Write)?;
    }
    w.end_array();
    w.end_object();
    w.flush_to(out).map_err(DecodeError::Write)
}

/// crit's `info`: the magic and the number of entries (a pagemap's head not counted).
///
/// # Errors
///
/// Framing errors.
pub fn info(image: &Image<'_>) -> Result<String, DecodeError> {
    let mut count = 0usize;
    for entry in image.entries()? {
        entry?;
        count += 1;
    }
    if image.layout()? == Layout::Pagemap {
        count = count.saturating_sub(1);
    }
    let mut w = JsonWriter::new(true);
    w.begin_object();
    w.key("magic");
    w.string(image.magic_name());
    w.key("count");
    w.int(count as i128);
    w.end_object();
    Ok(w.finish())
}

fn message_schema(name: &'static str) -> Result<&'static MessageSchema, DecodeError> {
    schema()
        .message(name)
        .map(|(_, m)| m)
        .ok_or(DecodeError::UnknownMessage(name))
}

/// The schemas of the (at most two) message types of one image, looked up once.
#[derive(Default)]
struct MessageCache {
    known: SmallVec<[(&'static str, &'static MessageSchema); 2]>,
}

impl MessageCache {
    fn get(&mut self, name: &'static str) -> Result<&'static MessageSchema, DecodeError> {
        // Names come from the layout tables, so the same name is the same pointer.
        if let Some(&(_, message)) = self.known.iter().find(|(n, _)| std::ptr::eq(*n, name)) {
            return Ok(message);
        }
        let message = message_schema(name)?;
        self.known.push((name, message));
        Ok(message)
    }
}

fn decode_entry(
    w: &mut JsonWriter,
    entry: &Entry<'_>,
    message: &MessageSchema,
    layout: Layout,
    options: DecodeOptions,
) -> Result<(), DecodeError> {
    let pretty = options.pretty;
    let malformed = |source| DecodeError::Malformed {
        index: entry.index,
        offset: entry.offset,
        message: message.name.to_owned(),
        source,
    };
    w.begin_object();
    write_fields(w, message, entry.message, pretty, false).map_err(malformed)?;

    let rule = match layout {
        Layout::Uniform { payload, .. } => payload,
        Layout::Pagemap => PayloadRule::None,
        Layout::GhostFile => {
            // crit leaves ghost contents out entirely under --nopl.
            if let (Payload::Bytes(bytes), false) = (&entry.payload, options.no_payload) {
                w.key("extra");
                w.string(&pyfmt::base64_lines(bytes));
            }
            PayloadRule::None
        }
    };
    if rule != PayloadRule::None && options.no_payload {
        w.key("extra");
        w.string(&format!(
            "... <{}>",
            human_size(payload_size(&entry.payload))
        ));
    } else if rule != PayloadRule::None {
        write_payload(w, &entry.payload).map_err(malformed)?;
    }
    w.end_object();
    Ok(())
}

/// The payload size crit reports under `--nopl`: data bytes without padding, and for message
/// queues each message's header and text.
fn payload_size(payload: &Payload<'_>) -> u64 {
    let size = match payload {
        Payload::None => 0,
        Payload::Bytes(bytes) => bytes.len(),
        Payload::TcpStream { inq, outq } => inq.len() + outq.len(),
        Payload::Semaphores { values, .. } => values.len(),
        Payload::Messages(messages) => messages.iter().map(|m| m.header.len() + m.text.len()).sum(),
        Payload::SharedMemory { data, .. } => data.len(),
    };
    size as u64
}

/// crit's `human_readable`: `512B`, `4KB`, `1.5MB`.
fn human_size(size: u64) -> String {
    let mut value = size as f64;
    for unit in ["", "K", "M", "G", "T", "P", "E", "Z"] {
        if value < 1024.0 {
            return if value.fract() == 0.0 {
                format!("{value:.0}{unit}B")
            } else {
                format!("{value:.1}{unit}B")
            };
        }
        value /= 1024.0;
    }
    format!("{value:.1}YB")
}

fn write_payload(w: &mut JsonWriter, payload: &Payload<'_>) -> Result<(), WireError> {
    match payload {
        // An ipcns-shm entry whose segment lives in a shmem pagemap has no inline payload.
        // crit prints "" here for the last entry (it reads past the end of the file), so the
        // empty string keeps single-segment images identical to crit's output.
        Payload::None => {
            w.key("extra");
            w.string("");
        }
        Payload::Bytes(bytes) | Payload::SharedMemory { data: bytes, .. } => {
            w.key("extra");
            w.string(&pyfmt::base64_lines(bytes));
        }
        Payload::TcpStream { inq, outq } => {
            w.key("extra");
            w.begin_object();
            w.key("inq");
            w.string(&pyfmt::base64_lines(inq));
            w.key("outq");
            w.string(&pyfmt::base64_lines(outq));
            w.end_object();
        }
        Payload::Semaphores { values, .. } => {
            w.key("extra");
            w.begin_array();
            for pair in values.chunks_exact(2) {
                w.int(i128::from(u16::from_ne_bytes([pair[0], pair[1]])));
            }
            w.end_array();
        }
        Payload::Messages(messages) => {
            w.key("extra");
            w.begin_array();
            let Some((_, ipc_msg)) = schema().message("ipc_msg") else {
                return Ok(());
            };
            for message in messages {
                // crit renders these headers without --pretty's conversions even in pretty mode.
                w.begin_object();
                write_fields(w, ipc_msg, message.header, false, false)?;
                w.end_object();
                w.string(&pyfmt::base64_lines(message.text));
            }
            w.end_array();
        }
    }
    Ok(())
}

/// Field values found on the wire, as (position in the schema's fields, value). Sixteen fit
/// on the stack, which covers nearly every CRIU message.
type Found<'a> = SmallVec<[(u16, Value<'a>); 16]>;

/// Writes the fields of one message as object members, in field-number order as protobuf's
/// `ListFields` returns them: repeated fields gathered into one list, the last value winning
/// for the others.
fn write_fields(
    w: &mut JsonWriter,
    message: &MessageSchema,
    bytes: &[u8],
    pretty: bool,
    hex: bool,
) -> Result<(), WireError> {
    if write_simple_fields(w, message, bytes, pretty, hex)? {
        return Ok(());
    }
    let mut found: Found<'_> = SmallVec::new();
    let mut sorted = true;
    for field in wire::fields(bytes) {
        let field = field?;
        let Ok(position) = message
            .fields
            .binary_search_by_key(&field.number, |f| f.number)
        else {
            continue;
        };
        let position = position as u16;
        sorted &= found.last().is_none_or(|&(last, _)| last <= position);
        found.push((position, field.value));
    }
    // CRIU writes fields in number order, so this sort almost never runs; it is stable, which
    // keeps repeated values in wire order.
    if !sorted {
        found.sort_by_key(|&(position, _)| position);
    }

    let mut start = 0;
    while start < found.len() {
        let position = found[start].0;
        let end = start
            + found[start..]
                .iter()
                .take_while(|(p, _)| *p == position)
                .count();
        let schema = &message.fields[usize::from(position)];
        let group = &found[start..end];
        start = end;

        if !schema.repeated {
            let wanted = wire_type_of(schema.ty);
            if let Some(&(_, value)) = group.iter().rev().find(|(_, v)| v.wire_type() == wanted) {
                w.quoted_key(schema.json_name);
                write_value(w, schema, value, pretty, hex)?;
            }
            continue;
        }

        let mut values: SmallVec<[Value<'_>; 8]> = SmallVec::new();
        for &(_, value) in group {
            unpack_into(schema, value, &mut values)?;
        }
        if values.is_empty() {
            continue;
        }
        w.quoted_key(schema.json_name);
        w.begin_array();
        let address = (pretty && schema.criu.ipadd)
            .then(|| {
                let words: Vec<u32> = values.iter().map(|v| scalar_bits(*v) as u32).collect();
                pyfmt::ip_address(&words)
            })
            .flatten();
        match address {
            Some(text) => w.string(&text),
            None => {
                for value in values {
                    write_value(w, schema, value, pretty, hex)?;
                }
            }
        }
        w.end_array();
    }
    Ok(())
}

/// The fast path of [`write_fields`], for the common message whose fields are scalars that
/// stand once each, in number order: they are written as they are read. On meeting anything
/// else it takes back what it wrote and returns `false`.
fn write_simple_fields(
    w: &mut JsonWriter,
    message: &MessageSchema,
    bytes: &[u8],
    pretty: bool,
    hex: bool,
) -> Result<bool, WireError> {
    let mark = w.mark();
    let mut next_position = 0;
    for field in wire::fields(bytes) {
        let field = field?;
        let found = message.fields[next_position.min(message.fields.len())..]
            .iter()
            .position(|f| f.number == field.number);
        let Some(offset) = found else {
            w.rewind(mark);
            return Ok(false);
        };
        let position = next_position + offset;
        let schema = &message.fields[position];
        let simple = !schema.repeated
            && !matches!(schema.ty, FieldType::Message(_))
            && field.value.wire_type() == wire_type_of(schema.ty);
        if !simple {
            w.rewind(mark);
            return Ok(false);
        }
        w.quoted_key(schema.json_name);
        write_value(w, schema, field.value, pretty, hex)?;
        next_position = position + 1;
    }
    Ok(true)
}

/// Adds a repeated field's value, unpacking a packed run of scalars.
fn unpack_into<'a>(
    schema: &FieldSchema,
    value: Value<'a>,
    out: &mut SmallVec<[Value<'a>; 8]>,
) -> Result<(), WireError> {
    let expected = wire_type_of(schema.ty);
    match (value, expected) {
        (v, t) if v.wire_type() == t => out.push(v),
        (Value::Bytes(mut packed), WireType::Varint) => {
            while !packed.is_empty() {
                let (v, n) = wire::read_varint(packed).ok_or(WireError::Varint { offset: 0 })?;
                out.push(Value::Varint(v));
                packed = &packed[n..];
            }
        }
        (Value::Bytes(packed), WireType::Fixed32) => {
            for c in packed.chunks_exact(4) {
                out.push(Value::Fixed32(u32::from_le_bytes([c[0], c[1], c[2], c[3]])));
            }
        }
        (Value::Bytes(packed), WireType::Fixed64) => {
            for c in packed.chunks_exact(8) {
                let mut raw = [0u8; 8];
                raw.copy_from_slice(c);
                out.push(Value::Fixed64(u64::from_le_bytes(raw)));
            }
        }
        // A value of another wire type is an unknown field to protobuf, and crit drops it.
        _ => {}
    }
    Ok(())
}

fn scalar_bits(value: Value<'_>) -> u64 {
    match value {
        Value::Varint(v) | Value::Fixed64(v) => v,
        Value::Fixed32(v) => u64::from(v),
        Value::Bytes(_) => 0,
    }
}

/// The integer a scalar field holds, by its declared type.
fn integer(ty: FieldType, bits: u64) -> i128 {
    match ty {
        FieldType::Int32 | FieldType::Enum(_) | FieldType::Sfixed32 => i128::from(bits as i32),
        FieldType::Int64 | FieldType::Sfixed64 => i128::from(bits as i64),
        FieldType::Uint32 | FieldType::Fixed32 => i128::from(bits as u32),
        FieldType::Sint32 => {
            let v = bits as u32;
            i128::from(((v >> 1) as i32) ^ -((v & 1) as i32))
        }
        FieldType::Sint64 => i128::from(((bits >> 1) as i64) ^ -((bits & 1) as i64)),
        _ => i128::from(bits),
    }
}

fn write_value(
    w: &mut JsonWriter,
    schema: &FieldSchema,
    value: Value<'_>,
    pretty: bool,
    hex: bool,
) -> Result<(), WireError> {
    let hex = hex || schema.criu.hex;
    match (schema.ty, value) {
        (FieldType::Message(index), Value::Bytes(bytes)) => {
            w.begin_object();
            write_fields(w, schema_message(index), bytes, pretty, hex)?;
            w.end_object();
        }
        (FieldType::Bytes, Value::Bytes(bytes)) => match schema.criu.conv {
            Some("unix_name") => w.string(&pyfmt::quopri_encode(bytes)),
            _ => w.string(&pyfmt::base64_lines(bytes)),
        },
        (FieldType::String, Value::Bytes(bytes)) => w.string(&String::from_utf8_lossy(bytes)),
        (FieldType::Enum(index), v) => {
            let number = scalar_bits(v) as i32;
            match crate::schema::schema().enums[index].name_of(number) {
                Some(name) => w.string(name),
                None => w.int(i128::from(number)),
            }
        }
        (FieldType::Bool, v) => w.bool(scalar_bits(v) != 0),
        (FieldType::Double, v) => w.float(f64::from_bits(scalar_bits(v))),
        (FieldType::Float, v) => w.float(f64::from(f32::from_bits(scalar_bits(v) as u32))),
        (ty, v) => {
            let n = integer(ty, scalar_bits(v));
            if !(pretty && write_pretty_integer(w, schema, n, hex)) {
                w.int(n);
            }
        }
    }
    Ok(())
}

/// Writes `--pretty`'s rendering of an integer as a string value, or returns `false` when
/// it prints as a plain number. Every rendering is ASCII that needs no escaping, so it is
/// written straight into the output.
fn write_pretty_integer(w: &mut JsonWriter, schema: &FieldSchema, n: i128, hex: bool) -> bool {
    if hex {
        w.plain_string(|out| push_hex(out, n));
        return true;
    }
    if schema.criu.dev {
        let (major, minor) = if schema.criu.odev {
            old_dev(n as u64)
        } else {
            kernel_dev(n as u64)
        };
        w.plain_string(|out| {
            let mut buffer = itoa::Buffer::new();
            out.push_str(buffer.format(major));
            out.push(':');
            out.push_str(buffer.format(minor));
        });
        return true;
    }
    if let Some(table) = schema.criu.flags {
        match flag_table(table) {
            Some(flags) => w.plain_string(|out| push_flag_names(out, n, flags)),
            None => w.plain_string(|out| push_hex(out, n)),
        }
        return true;
    }
    match schema
        .criu
        .dict
        .and_then(|dict| dict_name(dict, schema.name, n))
    {
        Some(name) => {
            w.string(name);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_sizes_read_like_crit() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(4096), "4KB");
        assert_eq!(human_size(1536), "1.5KB");
        assert_eq!(human_size(65536 * 1024), "64MB");
    }
}
