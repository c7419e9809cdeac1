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

use rayon::prelude::*;
use serde_json::{Map, Value as Json};
use smallvec::SmallVec;
use thiserror::Error;

use crate::image::{Entry, Image, ImageError, ImageWriter, Payload};
use crate::kind::{self, Layout, PayloadRule};
use crate::magic;
use crate::pyfmt::{self, JsonWriter};
use crate::schema::{FieldSchema, FieldType, MessageSchema, schema};
use crate::wire::{self, Value, WireError, WireType};

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

// ---------------------------------------------------------------------------------------------
// Decoding: image bytes to JSON text.
// ---------------------------------------------------------------------------------------------

/// How to render an image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeOptions {
    /// crit's `--pretty`: indented, with hex, flag, device and name renderings.
    pub pretty: bool,
    /// crit's `show --nopl`: payloads replaced by their size, as `"... <4KB>"`.
    pub no_payload: bool,
}

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

fn wire_type_of(ty: FieldType) -> WireType {
    match ty {
        FieldType::Double | FieldType::Fixed64 | FieldType::Sfixed64 => WireType::Fixed64,
        FieldType::Float | FieldType::Fixed32 | FieldType::Sfixed32 => WireType::Fixed32,
        FieldType::String | FieldType::Bytes | FieldType::Message(_) => WireType::LengthDelimited,
        _ => WireType::Varint,
    }
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

fn schema_message(index: usize) -> &'static MessageSchema {
    &schema().messages[index]
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

/// Python's `"0x%x" % n`.
fn push_hex(out: &mut String, n: i128) {
    use std::fmt::Write as _;
    let _ = if n < 0 {
        write!(out, "-0x{:x}", -n)
    } else {
        write!(out, "0x{n:x}")
    };
}

/// The kernel's `dev_t` split: 12 bits of major above 20 bits of minor.
fn kernel_dev(dev: u64) -> (u64, u64) {
    (dev >> 20, dev & 0xf_ffff)
}

/// glibc's `major()` and `minor()`.
fn old_dev(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major, minor)
}

fn kernel_makedev(major: u64, minor: u64) -> u64 {
    (major << 20) | minor
}

fn old_makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xfff) << 8) | ((major & !0xfff) << 32) | (minor & 0xff) | ((minor & !0xff) << 12)
}

/// The bit-flag tables crit knows, in its order.
fn flag_table(name: &str) -> Option<&'static [(&'static str, u64)]> {
    const PROT: &[(&str, u64)] = &[("PROT_READ", 0x1), ("PROT_WRITE", 0x2), ("PROT_EXEC", 0x4)];
    const MAP: &[(&str, u64)] = &[
        ("MAP_SHARED", 0x1),
        ("MAP_PRIVATE", 0x2),
        ("MAP_ANON", 0x20),
        ("MAP_GROWSDOWN", 0x100),
    ];
    const STATUS: &[(&str, u64)] = &[
        ("VMA_AREA_NONE", 0),
        ("VMA_AREA_REGULAR", 1 << 0),
        ("VMA_AREA_STACK", 1 << 1),
        ("VMA_AREA_VSYSCALL", 1 << 2),
        ("VMA_AREA_VDSO", 1 << 3),
        ("VMA_AREA_HEAP", 1 << 5),
        ("VMA_FILE_PRIVATE", 1 << 6),
        ("VMA_FILE_SHARED", 1 << 7),
        ("VMA_ANON_SHARED", 1 << 8),
        ("VMA_ANON_PRIVATE", 1 << 9),
        ("VMA_AREA_SYSVIPC", 1 << 10),
        ("VMA_AREA_SOCKET", 1 << 11),
        ("VMA_AREA_VVAR", 1 << 12),
        ("VMA_AREA_AIORING", 1 << 13),
        ("VMA_AREA_MEMFD", 1 << 14),
        ("VMA_AREA_SHSTK", 1 << 15),
        ("VMA_UNSUPP", 1 << 31),
    ];
    const OPEN: &[(&str, u64)] = &[
        ("O_WRONLY", 0o1),
        ("O_RDWR", 0o2),
        ("O_CREAT", 0o100),
        ("O_EXCL", 0o200),
        ("O_NOCTTY", 0o400),
        ("O_TRUNC", 0o1000),
        ("O_APPEND", 0o2000),
        ("O_NONBLOCK", 0o4000),
        ("O_DSYNC", 0o10000),
        ("FASYNC", 0o20000),
        ("O_DIRECT", 0o40000),
        ("O_LARGEFILE", 0o100000),
        ("O_DIRECTORY", 0o200000),
        ("O_NOFOLLOW", 0o400000),
        ("O_NOATIME", 0o1000000),
        ("O_CLOEXEC", 0o2000000),
    ];
    const SEALS: &[(&str, u64)] = &[
        ("F_SEAL_SEAL", 0x1),
        ("F_SEAL_SHRINK", 0x2),
        ("F_SEAL_GROW", 0x4),
        ("F_SEAL_WRITE", 0x8),
        ("F_SEAL_FUTURE_WRITE", 0x10),
    ];
    const PAGEMAP: &[(&str, u64)] = &[("PE_PARENT", 1), ("PE_LAZY", 2), ("PE_PRESENT", 4)];
    match name {
        "mmap.prot" => Some(PROT),
        "mmap.flags" => Some(MAP),
        "mmap.status" => Some(STATUS),
        "rfile.flags" => Some(OPEN),
        "seals.flags" => Some(SEALS),
        "pmap.flags" => Some(PAGEMAP),
        _ => None,
    }
}

/// crit's `map_flags`: the names of the set bits in table order joined by `" | "`, leftover
/// bits as one hex number, and the empty string for 0.
fn push_flag_names(out: &mut String, n: i128, table: &[(&str, u64)]) {
    let value = n as u64;
    let mut first = true;
    let mut separator = |out: &mut String| {
        if !std::mem::take(&mut first) {
            out.push_str(" | ");
        }
    };
    for (name, bit) in table {
        if value & bit != 0 {
            separator(out);
            out.push_str(name);
        }
    }
    let known = table.iter().fold(0u64, |acc, (_, bit)| acc | bit);
    let rest = value & !known;
    if rest != 0 {
        separator(out);
        push_hex(out, i128::from(rest));
    }
}

#[cfg(test)]
fn flag_names(n: i128, table: &[(&str, u64)]) -> String {
    let mut out = String::new();
    push_flag_names(&mut out, n, table);
    out
}

fn flags_value(text: &str, table: &[(&str, u64)]) -> Option<i128> {
    if text.is_empty() {
        return Some(0);
    }
    text.split('|')
        .map(str::trim)
        .map(|token| {
            table
                .iter()
                .find(|(name, _)| *name == token)
                .map(|(_, bit)| i128::from(*bit))
                .or_else(|| pyfmt::parse_int(token))
        })
        .sum()
}

/// The value-to-name tables crit knows, keyed by table and field name. `task_state` uses the
/// kernel's numbering (3 stopped, 6 zombie), not crit 4.1.1's swapped one.
fn dict_table(dict: &str, field: &str) -> Option<&'static [(i128, &'static str)]> {
    const TASK_STATE: &[(i128, &str)] = &[(1, "Alive"), (3, "Stopped"), (6, "Zombie")];
    const FAMILY: &[(i128, &str)] = &[
        (1, "UNIX"),
        (2, "INET"),
        (10, "INET6"),
        (16, "NETLINK"),
        (17, "PACKET"),
    ];
    const TYPE: &[(i128, &str)] = &[
        (1, "STREAM"),
        (2, "DGRAM"),
        (3, "RAW"),
        (5, "SEQPACKET"),
        (10, "PACKET"),
    ];
    const STATE: &[(i128, &str)] = &[
        (1, "ESTABLISHED"),
        (2, "SYN_SENT"),
        (3, "SYN_RECV"),
        (4, "FIN_WAIT1"),
        (5, "FIN_WAIT2"),
        (6, "TIME_WAIT"),
        (7, "CLOSE"),
        (8, "CLOSE_WAIT"),
        (9, "LAST_ACK"),
        (10, "LISTEN"),
    ];
    const PROTO: &[(i128, &str)] = &[(0, "IP"), (6, "TCP"), (17, "UDP"), (136, "UDPLITE")];
    match (dict, field) {
        ("gen", "task_state") => Some(TASK_STATE),
        ("sk", "family") => Some(FAMILY),
        ("sk", "type") => Some(TYPE),
        ("sk", "state") => Some(STATE),
        ("sk", "proto") => Some(PROTO),
        _ => None,
    }
}

fn dict_name(dict: &str, field: &str, n: i128) -> Option<&'static str> {
    dict_table(dict, field)?
        .iter()
        .find(|(v, _)| *v == n)
        .map(|(_, name)| *name)
}

// ---------------------------------------------------------------------------------------------
// Encoding: JSON to image bytes.
// ---------------------------------------------------------------------------------------------

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_render_and_parse_back() {
        let table = flag_table("mmap.flags").expect("known table");
        assert_eq!(flag_names(0x8022, table), "MAP_PRIVATE | MAP_ANON | 0x8000");
        assert_eq!(flag_names(0, table), "");
        assert_eq!(
            flags_value("MAP_PRIVATE | MAP_ANON | 0x8000", table),
            Some(0x8022)
        );
        assert_eq!(flags_value("", table), Some(0));
        assert_eq!(flags_value("MAP_NOPE", table), None);
    }

    #[test]
    fn payload_sizes_read_like_crit() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(4096), "4KB");
        assert_eq!(human_size(1536), "1.5KB");
        assert_eq!(human_size(65536 * 1024), "64MB");
    }

    #[test]
    fn devices_split_both_ways() {
        assert_eq!(kernel_dev(48), (0, 48));
        assert_eq!(kernel_makedev(8, 1), 8 << 20 | 1);
        assert_eq!(old_dev(0x8803), (136, 3));
        assert_eq!(old_makedev(136, 3), 0x8803);
    }
}
