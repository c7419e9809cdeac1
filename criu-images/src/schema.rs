//! The image schema at run time: every message of `proto/`, with its fields in number order
//! and the `criu` rendering options crit reads. `build.rs` writes these tables from the proto
//! files, so they cost nothing to load.

/// How crit renders a field, from its `(criu)` option.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CriuOptions {
    /// Integers as `0x…`, inherited by every field of a nested message.
    pub hex: bool,
    /// Repeated words holding an IPv4 or IPv6 address.
    pub ipadd: bool,
    /// Name of the bit-flag table.
    pub flags: Option<&'static str>,
    /// A device number, printed `major:minor`.
    pub dev: bool,
    /// With `dev`: glibc's `dev_t` encoding instead of the kernel's.
    pub odev: bool,
    /// Name of the value-to-name table.
    pub dict: Option<&'static str>,
    /// Special conversion of a bytes field (`unix_name`: quoted-printable).
    pub conv: Option<&'static str>,
}

impl CriuOptions {
    /// A field without a `criu` option.
    pub const NONE: CriuOptions = CriuOptions {
        hex: false,
        ipadd: false,
        flags: None,
        dev: false,
        odev: false,
        dict: None,
        conv: None,
    };
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
#[derive(Clone, Copy, Debug)]
pub struct FieldSchema {
    /// The field number.
    pub number: u32,
    /// The field name, as crit prints it.
    pub name: &'static str,
    /// The name as a quoted JSON string, ready for the JSON writer.
    pub json_name: &'static str,
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
#[derive(Clone, Copy, Debug)]
pub struct MessageSchema {
    /// The name in `proto/`, e.g. `pagemap_entry`.
    pub name: &'static str,
    /// Fields in number order.
    pub fields: &'static [FieldSchema],
}

impl MessageSchema {
    /// The field with number `number`.
    pub fn field(&self, number: u32) -> Option<&'static FieldSchema> {
        let fields = self.fields;
        fields
            .binary_search_by_key(&number, |f| f.number)
            .ok()
            .map(|i| &fields[i])
    }

    /// The field named `name`.
    pub fn field_by_name(&self, name: &str) -> Option<&'static FieldSchema> {
        self.fields.iter().find(|f| f.name == name)
    }
}

/// One enum type.
#[derive(Clone, Copy, Debug)]
pub struct EnumSchema {
    /// The name in `proto/`.
    pub name: &'static str,
    /// Values and their names, in declaration order.
    pub values: &'static [(i32, &'static str)],
}

impl EnumSchema {
    /// The name of `number`, if the enum defines it.
    pub fn name_of(&self, number: i32) -> Option<&'static str> {
        self.values
            .iter()
            .find(|(n, _)| *n == number)
            .map(|(_, name)| *name)
    }

    /// The number of `name`, if the enum defines it.
    pub fn number_of(&self, name: &str) -> Option<i32> {
        self.values
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(number, _)| *number)
    }
}

/// Every message and enum of the image schema.
#[derive(Debug)]
pub struct Schema {
    /// The messages, sorted by name.
    pub messages: &'static [MessageSchema],
    /// The enums, sorted by name.
    pub enums: &'static [EnumSchema],
}

impl Schema {
    /// The message named `name` (`pagemap_entry`, or its full name `criu.pagemap_entry`),
    /// with its index.
    pub fn message(&self, name: &str) -> Option<(usize, &'static MessageSchema)> {
        let name = name.strip_prefix("criu.").unwrap_or(name);
        let messages = self.messages;
        messages
            .binary_search_by_key(&name, |m| m.name)
            .ok()
            .map(|i| (i, &messages[i]))
    }
}

mod tables {
    use super::{CriuOptions, EnumSchema, FieldSchema, FieldType, MessageSchema};

    include!(concat!(env!("OUT_DIR"), "/schema_tables.rs"));
}

static SCHEMA: Schema = Schema {
    messages: tables::MESSAGES,
    enums: tables::ENUMS,
};

/// The schema.
pub fn schema() -> &'static Schema {
    &SCHEMA
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_and_order_come_from_the_proto_files() {
        let (_, vma) = schema().message("vma_entry").expect("vma_entry exists");
        let start = vma.field_by_name("start").expect("start field");
        assert!(start.criu.hex);
        assert_eq!(start.json_name, "\"start\"");
        let status = vma.field_by_name("status").expect("status field");
        assert_eq!(status.criu.flags, Some("mmap.status"));

        let (_, core) = schema()
            .message("criu.core_entry")
            .expect("core_entry exists");
        assert!(core.fields.windows(2).all(|w| w[0].number < w[1].number));
        assert_eq!(core.field(3).map(|f| f.name), Some("tc"));
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
        assert!(schema().messages.windows(2).all(|w| w[0].name < w[1].name));
    }
}
