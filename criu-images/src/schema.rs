//! The image schema at run time: every message of `proto/`, with its fields in number order
//! and the `criu` rendering options crit reads, compiled once from the embedded descriptors.

use std::collections::HashMap;
use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, Kind, MessageDescriptor, Value as ReflectValue};

/// The encoded descriptor set `build.rs` produced from `proto/`.
const DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/criu-schema.bin"));

/// How crit renders a field, from its `(criu)` option.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CriuOptions {
    /// Integers as `0x…`, inherited by every field of a nested message.
    pub hex: bool,
    /// Repeated words holding an IPv4 or IPv6 address.
    pub ipadd: bool,
    /// Name of the bit-flag table.
    pub flags: Option<String>,
    /// A device number, printed `major:minor`.
    pub dev: bool,
    /// With `dev`: glibc's `dev_t` encoding instead of the kernel's.
    pub odev: bool,
    /// Name of the value-to-name table.
    pub dict: Option<String>,
    /// Special conversion of a bytes field (`unix_name`: quoted-printable).
    pub conv: Option<String>,
}

/// The type of a field's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldType {
    /// `double`.
    Double,
    /// `float`.
    Float,
    /// `int32`.
    Int32,
    /// `int64`.
    Int64,
    /// `uint32`.
    Uint32,
    /// `uint64`.
    Uint64,
    /// `sint32`.
    Sint32,
    /// `sint64`.
    Sint64,
    /// `fixed32`.
    Fixed32,
    /// `fixed64`.
    Fixed64,
    /// `sfixed32`.
    Sfixed32,
    /// `sfixed64`.
    Sfixed64,
    /// `bool`.
    Bool,
    /// `string`.
    String,
    /// `bytes`.
    Bytes,
    /// An enum, by index into [`Schema::enums`].
    Enum(usize),
    /// A message, by index into [`Schema::messages`].
    Message(usize),
}

/// One field of a message.
#[derive(Clone, Debug)]
pub struct FieldSchema {
    /// The field number.
    pub number: u32,
    /// The field name, as crit prints it.
    pub name: String,
    /// The name as a quoted JSON string, rendered once for the JSON writer.
    pub json_name: String,
    /// The value type.
    pub ty: FieldType,
    /// Whether the field is repeated.
    pub repeated: bool,
    /// Whether a repeated scalar is written packed.
    pub packed: bool,
    /// crit's rendering options.
    pub criu: CriuOptions,
}

/// One message type.
#[derive(Clone, Debug)]
pub struct MessageSchema {
    /// The name in `proto/`, e.g. `pagemap_entry`.
    pub name: String,
    /// Fields in number order.
    pub fields: Vec<FieldSchema>,
}

impl MessageSchema {
    /// The field with number `number`.
    pub fn field(&self, number: u32) -> Option<&FieldSchema> {
        self.fields
            .binary_search_by_key(&number, |f| f.number)
            .ok()
            .map(|i| &self.fields[i])
    }

    /// The field named `name`.
    pub fn field_by_name(&self, name: &str) -> Option<&FieldSchema> {
        self.fields.iter().find(|f| f.name == name)
    }
}

/// One enum type.
#[derive(Clone, Debug)]
pub struct EnumSchema {
    /// The name in `proto/`.
    pub name: String,
    /// Values and their names, in declaration order.
    pub values: Vec<(i32, String)>,
}

impl EnumSchema {
    /// The name of `number`, if the enum defines it.
    pub fn name_of(&self, number: i32) -> Option<&str> {
        self.values
            .iter()
            .find(|(n, _)| *n == number)
            .map(|(_, name)| name.as_str())
    }

    /// The number of `name`, if the enum defines it.
    pub fn number_of(&self, name: &str) -> Option<i32> {
        self.values
            .iter()
            .find(|(_, n)| n == name)
            .map(|(number, _)| *number)
    }
}

/// Every message and enum of the image schema.
#[derive(Debug)]
pub struct Schema {
    /// The messages.
    pub messages: Vec<MessageSchema>,
    /// The enums.
    pub enums: Vec<EnumSchema>,
    by_name: HashMap<String, usize>,
}

impl Schema {
    /// The message named `name` (`pagemap_entry`, or its full name `criu.pagemap_entry`).
    pub fn message(&self, name: &str) -> Option<(usize, &MessageSchema)> {
        let name = name.strip_prefix("criu.").unwrap_or(name);
        self.by_name.get(name).map(|&i| (i, &self.messages[i]))
    }
}

/// The schema, compiled on first use.
pub fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        // The descriptors are produced by build.rs from this crate's own files, so failing to
        // decode them is a build defect, not an input error.
        #[allow(clippy::expect_used)]
        let pool = DescriptorPool::decode(DESCRIPTORS).expect("embedded descriptors decode");
        compile(&pool)
    })
}

fn criu_options(pool: &DescriptorPool, field: &prost_reflect::FieldDescriptor) -> CriuOptions {
    let Some(extension) = pool.get_extension_by_name("criu.criu") else {
        return CriuOptions::default();
    };
    let options = field.options();
    if !options.has_extension(&extension) {
        return CriuOptions::default();
    }
    let value = options.get_extension(&extension);
    let ReflectValue::Message(opts) = value.as_ref() else {
        return CriuOptions::default();
    };
    let flag = |name: &str| {
        opts.get_field_by_name(name)
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    };
    let text = |name: &str| {
        opts.has_field_by_name(name)
            .then(|| {
                opts.get_field_by_name(name)
                    .and_then(|v| v.as_str().map(str::to_owned))
            })
            .flatten()
    };
    CriuOptions {
        hex: flag("hex"),
        ipadd: flag("ipadd"),
        flags: text("flags"),
        dev: flag("dev"),
        odev: flag("odev"),
        dict: text("dict"),
        conv: text("conv"),
    }
}

fn compile(pool: &DescriptorPool) -> Schema {
    let criu_messages: Vec<MessageDescriptor> = pool
        .all_messages()
        .filter(|m| m.package_name() == "criu")
        .collect();
    let criu_enums: Vec<_> = pool
        .all_enums()
        .filter(|e| e.package_name() == "criu")
        .collect();

    let local = |full: &str| full.strip_prefix("criu.").unwrap_or(full).to_owned();
    let message_index: HashMap<String, usize> = criu_messages
        .iter()
        .enumerate()
        .map(|(i, m)| (m.full_name().to_owned(), i))
        .collect();
    let enum_index: HashMap<String, usize> = criu_enums
        .iter()
        .enumerate()
        .map(|(i, e)| (e.full_name().to_owned(), i))
        .collect();

    let messages = criu_messages
        .iter()
        .map(|message| {
            let mut fields: Vec<FieldSchema> = message
                .fields()
                .map(|field| {
                    let ty = match field.kind() {
                        Kind::Double => FieldType::Double,
                        Kind::Float => FieldType::Float,
                        Kind::Int32 => FieldType::Int32,
                        Kind::Int64 => FieldType::Int64,
                        Kind::Uint32 => FieldType::Uint32,
                        Kind::Uint64 => FieldType::Uint64,
                        Kind::Sint32 => FieldType::Sint32,
                        Kind::Sint64 => FieldType::Sint64,
                        Kind::Fixed32 => FieldType::Fixed32,
                        Kind::Fixed64 => FieldType::Fixed64,
                        Kind::Sfixed32 => FieldType::Sfixed32,
                        Kind::Sfixed64 => FieldType::Sfixed64,
                        Kind::Bool => FieldType::Bool,
                        Kind::String => FieldType::String,
                        Kind::Bytes => FieldType::Bytes,
                        Kind::Enum(e) => FieldType::Enum(enum_index[e.full_name()]),
                        Kind::Message(m) => FieldType::Message(message_index[m.full_name()]),
                    };
                    let mut json_name = String::new();
                    crate::pyfmt::write_json_string(&mut json_name, field.name());
                    FieldSchema {
                        number: field.number(),
                        name: field.name().to_owned(),
                        json_name,
                        ty,
                        repeated: field.is_list(),
                        packed: field.is_packed(),
                        criu: criu_options(pool, &field),
                    }
                })
                .collect();
            fields.sort_by_key(|f| f.number);
            MessageSchema {
                name: local(message.full_name()),
                fields,
            }
        })
        .collect::<Vec<_>>();

    let enums = criu_enums
        .iter()
        .map(|e| EnumSchema {
            name: local(e.full_name()),
            values: e
                .values()
                .map(|v| (v.number(), v.name().to_owned()))
                .collect(),
        })
        .collect();

    let by_name = messages
        .iter()
        .enumerate()
        .map(|(i, m)| (m.name.clone(), i))
        .collect();
    Schema {
        messages,
        enums,
        by_name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_and_order_come_from_the_proto_files() {
        let (_, vma) = schema().message("vma_entry").expect("vma_entry exists");
        let start = vma.field_by_name("start").expect("start field");
        assert!(start.criu.hex);
        let status = vma.field_by_name("status").expect("status field");
        assert_eq!(status.criu.flags.as_deref(), Some("mmap.status"));

        let (_, core) = schema()
            .message("criu.core_entry")
            .expect("core_entry exists");
        let numbers: Vec<u32> = core.fields.iter().map(|f| f.number).collect();
        let mut sorted = numbers.clone();
        sorted.sort_unstable();
        assert_eq!(numbers, sorted);
    }

    #[test]
    fn every_kind_names_a_known_message() {
        for name in [
            "inventory_entry",
            "pagemap_head",
            "pagemap_entry",
            "ghost_chunk_entry",
            "ipc_msg",
            "file_entry",
            "binfmt_misc_entry",
            "pidfd_entry",
        ] {
            assert!(
                schema().message(name).is_some(),
                "{name} missing from the schema"
            );
        }
    }
}
