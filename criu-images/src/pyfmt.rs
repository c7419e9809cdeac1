//! Text exactly as crit's Python prints it: `json.dump` with its default separators and ASCII
//! escaping, `base64.encodebytes`, `quopri.encodestring` and `ipaddress`'s compressed form.
//!
//! crit's JSON is the interchange format users already have scripts for, so byte-identical
//! output matters more here than elegance.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Streams JSON in the layout of Python's `json.dump`: `", "` and `": "` separators on one
/// line, or with `indent=4` one item per line.
#[derive(Debug)]
pub struct JsonWriter {
    out: String,
    pretty: bool,
    /// One flag per open container: whether it has had an item yet.
    stack: Vec<bool>,
    /// Set after a key, so the value that follows needs no separator.
    after_key: bool,
}

impl JsonWriter {
    /// A writer; `pretty` selects the `indent=4` layout.
    pub fn new(pretty: bool) -> Self {
        JsonWriter {
            out: String::new(),
            pretty,
            stack: Vec::new(),
            after_key: false,
        }
    }

    /// A writer with room for `capacity` bytes of output.
    pub fn with_capacity(pretty: bool, capacity: usize) -> Self {
        JsonWriter {
            out: String::with_capacity(capacity),
            pretty,
            stack: Vec::new(),
            after_key: false,
        }
    }

    /// A writer that continues a document elsewhere: `open` lists, outermost first, the
    /// containers already open and whether each has had an item, so the items written here
    /// can be written out after the other writer's text. It writes into `buffer`, cleared,
    /// so that one allocation serves many runs.
    pub fn continuing(pretty: bool, open: &[bool], mut buffer: String) -> Self {
        buffer.clear();
        JsonWriter {
            out: buffer,
            pretty,
            stack: open.to_vec(),
            after_key: false,
        }
    }

    /// Where the writer stands, to come back to with [`JsonWriter::rewind`].
    pub fn mark(&self) -> Mark {
        Mark {
            len: self.out.len(),
            depth: self.stack.len(),
            has_items: self.has_items(),
            after_key: self.after_key,
        }
    }

    /// Drops everything written since `mark`, which must have been taken at the current
    /// nesting depth with no container opened since.
    pub fn rewind(&mut self, mark: Mark) {
        self.out.truncate(mark.len);
        self.stack.truncate(mark.depth);
        if let Some(has_items) = self.stack.last_mut() {
            *has_items = mark.has_items;
        }
        self.after_key = mark.after_key;
    }

    /// Whether the innermost open container has had an item yet.
    pub fn has_items(&self) -> bool {
        self.stack.last().copied().unwrap_or(false)
    }

    /// Moves the text written so far to `out`, leaving the writer's state as it was.
    ///
    /// # Errors
    ///
    /// The error from writing.
    pub fn flush_to(&mut self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        out.write_all(self.out.as_bytes())?;
        self.out.clear();
        Ok(())
    }

    /// Takes on that text another writer produced with [`JsonWriter::continuing`] was
    /// written out after this one's: when it had items, the innermost container now has.
    pub fn continued(&mut self, wrote_items: bool) {
        if let (true, Some(has_items)) = (wrote_items, self.stack.last_mut()) {
            *has_items = true;
        }
    }

    /// The text written so far.
    pub fn finish(self) -> String {
        self.out
    }

    fn newline(&mut self, depth: usize) {
        const INDENT: &str = "                                                                ";
        self.out.push('\n');
        let mut width = depth * 4;
        while width > 0 {
            let step = width.min(INDENT.len());
            self.out.push_str(&INDENT[..step]);
            width -= step;
        }
    }

    /// Writes what goes before an item: a separator and, when pretty, a new line.
    fn item(&mut self) {
        if self.after_key {
            self.after_key = false;
            return;
        }
        let depth = self.stack.len();
        if let Some(has_items) = self.stack.last_mut() {
            let first = !*has_items;
            *has_items = true;
            if !first {
                self.out.push(',');
                if !self.pretty {
                    self.out.push(' ');
                }
            }
            if self.pretty {
                self.newline(depth);
            }
        }
    }

    fn open(&mut self, bracket: char) {
        self.item();
        self.out.push(bracket);
        self.stack.push(false);
    }

    fn close(&mut self, bracket: char) {
        let had_items = self.stack.pop().unwrap_or(false);
        if had_items && self.pretty {
            let depth = self.stack.len();
            self.newline(depth);
        }
        self.out.push(bracket);
    }

    /// Opens an object.
    pub fn begin_object(&mut self) {
        self.open('{');
    }

    /// Closes the innermost object.
    pub fn end_object(&mut self) {
        self.close('}');
    }

    /// Opens an array.
    pub fn begin_array(&mut self) {
        self.open('[');
    }

    /// Closes the innermost array.
    pub fn end_array(&mut self) {
        self.close(']');
    }

    /// Writes an object key; the next value written is its value.
    pub fn key(&mut self, key: &str) {
        self.item();
        write_json_string(&mut self.out, key);
        self.out.push_str(": ");
        self.after_key = true;
    }

    /// Writes an object key given already quoted and escaped, as [`write_json_string`]
    /// renders it.
    pub fn quoted_key(&mut self, quoted: &str) {
        self.item();
        self.out.push_str(quoted);
        self.out.push_str(": ");
        self.after_key = true;
    }

    /// Writes a string value produced by `write`, which must append only printable ASCII
    /// other than `"` and `\\` (it is not escaped).
    pub fn plain_string(&mut self, write: impl FnOnce(&mut String)) {
        self.item();
        self.out.push('"');
        write(&mut self.out);
        self.out.push('"');
    }

    /// Writes a string value.
    pub fn string(&mut self, value: &str) {
        self.item();
        write_json_string(&mut self.out, value);
    }

    /// Writes an integer value.
    pub fn int(&mut self, value: i128) {
        self.item();
        let mut buffer = itoa::Buffer::new();
        // 64-bit formatting is much faster, and every protobuf integer fits one of the two.
        let text = match (u64::try_from(value), i64::try_from(value)) {
            (Ok(v), _) => buffer.format(v),
            (_, Ok(v)) => buffer.format(v),
            _ => buffer.format(value),
        };
        self.out.push_str(text);
    }

    /// Writes a boolean value.
    pub fn bool(&mut self, value: bool) {
        self.item();
        self.out.push_str(if value { "true" } else { "false" });
    }

    /// Writes a floating-point value.
    pub fn float(&mut self, value: f64) {
        self.item();
        let _ = write!(self.out, "{}", python_float(value));
    }
}

/// A position in a [`JsonWriter`]'s output.
#[derive(Clone, Copy, Debug)]
pub struct Mark {
    len: usize,
    depth: usize,
    has_items: bool,
    after_key: bool,
}

/// `repr()` of a Python float, close enough for the values images hold.
fn python_float(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value.is_infinite() {
        if value > 0.0 { "Infinity" } else { "-Infinity" }.to_owned()
    } else if value.fract() == 0.0 && value.abs() < 1e16 {
        format!("{value:.1}")
    } else {
        format!("{value}")
    }
}

/// Appends `value` as a JSON string with Python's `ensure_ascii` escaping: everything outside
/// printable ASCII becomes a `\u` escape of four hex digits (astral characters as surrogate
/// pairs).
pub fn write_json_string(out: &mut String, value: &str) {
    out.push('"');
    // Most strings (field names, flag names, paths) need no escaping at all.
    if value
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
    {
        out.push_str(value);
        out.push('"');
        return;
    }
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

/// `base64.encodebytes`: standard base64 with a newline after every 76 characters and at the
/// end; the empty input gives the empty string.
pub fn base64_lines(data: &[u8]) -> String {
    let encoded = STANDARD.encode(data);
    let mut out = String::with_capacity(encoded.len() + encoded.len() / 76 + 1);
    for line in encoded.as_bytes().chunks(76) {
        // Base64 output is ASCII, so any split of it is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out
}

/// `base64.decodebytes`: standard base64, line breaks and other non-alphabet characters
/// skipped as Python's non-strict decoder skips them.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let cleaned: String = text
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '='))
        .collect();
    STANDARD.decode(cleaned).ok()
}

const QP_LINE: usize = 76;

fn push_hex(out: &mut Vec<u8>, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push(b'=');
    out.push(HEX[usize::from(byte >> 4)]);
    out.push(HEX[usize::from(byte & 15)]);
}

/// `quopri.encodestring` (which is `binascii.b2a_qp` in text mode): quoted-printable with
/// soft line breaks at 76 columns, as crit renders unix socket names.
pub fn quopri_encode(data: &[u8]) -> String {
    let crlf = data
        .iter()
        .position(|&b| b == b'\n')
        .is_some_and(|i| i > 0 && data[i - 1] == b'\r');
    let soft_break = |out: &mut Vec<u8>| {
        out.push(b'=');
        if crlf {
            out.push(b'\r');
        }
        out.push(b'\n');
    };

    let mut out = Vec::with_capacity(data.len() * 3);
    let mut line = 0usize;
    let mut i = 0;
    while i < data.len() {
        let c = data[i];
        let last = i + 1 == data.len();
        let next = data.get(i + 1).copied();
        let lone_dot =
            c == b'.' && line == 0 && matches!(next, None | Some(b'\n') | Some(b'\r') | Some(0));
        let must_quote = c > 126
            || c == b'='
            || lone_dot
            || ((c == b'\t' || c == b' ') && last)
            || (c < 33 && c != b'\r' && c != b'\n' && c != b'\t' && c != b' ');

        if must_quote {
            if line + 3 >= QP_LINE {
                soft_break(&mut out);
                line = 0;
            }
            push_hex(&mut out, c);
            line += 3;
            i += 1;
        } else if c == b'\n' || (c == b'\r' && next == Some(b'\n')) {
            line = 0;
            // Whitespace at the end of a line is protected by quoting it.
            if let Some(&ws @ (b' ' | b'\t')) = out.last() {
                out.pop();
                push_hex(&mut out, ws);
            }
            if crlf {
                out.push(b'\r');
            }
            out.push(b'\n');
            i += if c == b'\r' { 2 } else { 1 };
        } else {
            if !last && next != Some(b'\n') && line + 1 >= QP_LINE {
                soft_break(&mut out);
                line = 0;
            }
            line += 1;
            out.push(c);
            i += 1;
        }
    }
    // Every byte pushed is printable ASCII, '=', a hex digit or a line break.
    String::from_utf8(out).unwrap_or_default()
}

/// `quopri.decodestring`: `=XX` escapes and soft line breaks undone.
pub fn quopri_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'=' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let rest = &bytes[i + 1..];
        if rest.starts_with(b"\r\n") {
            i += 3;
        } else if rest.starts_with(b"\n") {
            i += 2;
        } else if let Some(byte) = rest
            .get(..2)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            i += 3;
        } else {
            out.push(b'=');
            i += 1;
        }
    }
    out
}

/// crit's rendering of an `ipadd` field: one word is IPv4, four words are IPv6, each word
/// holding the address bytes in network order.
pub fn ip_address(words: &[u32]) -> Option<String> {
    match words {
        [v4] => Some(Ipv4Addr::from(v4.to_ne_bytes()).to_string()),
        [a, b, c, d, ..] => {
            let mut octets = [0u8; 16];
            for (chunk, word) in octets.chunks_mut(4).zip([a, b, c, d]) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            Some(ipv6_compressed(Ipv6Addr::from(octets)))
        }
        _ => None,
    }
}

/// The words of an address written as crit writes it.
pub fn ip_words(text: &str) -> Option<Vec<u32>> {
    if let Ok(v4) = text.parse::<Ipv4Addr>() {
        return Some(vec![u32::from_ne_bytes(v4.octets())]);
    }
    let v6 = text.parse::<Ipv6Addr>().ok()?;
    Some(
        v6.octets()
            .chunks(4)
            .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

/// Python's `IPv6Address.compressed`: lowercase hextets without leading zeros, the longest run
/// of two or more zero hextets (the first on a tie) as `::`, and no dotted IPv4 tail.
fn ipv6_compressed(addr: Ipv6Addr) -> String {
    let hextets = addr.segments();
    let (mut best_start, mut best_len) = (None, 0);
    let mut run_start = None;
    for (i, &h) in hextets.iter().enumerate() {
        if h == 0 {
            let start = *run_start.get_or_insert(i);
            if i + 1 - start > best_len {
                best_len = i + 1 - start;
                best_start = Some(start);
            }
        } else {
            run_start = None;
        }
    }
    let parts: Vec<String> = hextets.iter().map(|h| format!("{h:x}")).collect();
    match best_start.filter(|_| best_len > 1) {
        None => parts.join(":"),
        Some(start) => {
            let head = parts[..start].join(":");
            let tail = parts[start + best_len..].join(":");
            format!("{head}::{tail}")
        }
    }
}

/// Python's `int(text, 0)`: an optional sign, then a decimal number without leading zeros or a
/// `0x`, `0o` or `0b` literal; underscores between digits and surrounding blanks allowed.
pub fn parse_int(text: &str) -> Option<i128> {
    let text = text.trim();
    let (negative, digits) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let lower = digits.to_ascii_lowercase();
    let (radix, body) = if let Some(rest) = lower.strip_prefix("0x") {
        (16, rest.trim_start_matches('_'))
    } else if let Some(rest) = lower.strip_prefix("0o") {
        (8, rest.trim_start_matches('_'))
    } else if let Some(rest) = lower.strip_prefix("0b") {
        (2, rest.trim_start_matches('_'))
    } else {
        if lower.len() > 1
            && lower.starts_with('0')
            && lower.bytes().any(|b| b != b'0' && b != b'_')
        {
            return None;
        }
        (10, lower.as_str())
    };
    if body.is_empty() || body.starts_with('_') || body.ends_with('_') || body.contains("__") {
        return None;
    }
    let value = i128::from_str_radix(&body.replace('_', ""), radix).ok()?;
    Some(if negative { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_layouts_match_python() {
        let mut w = JsonWriter::new(false);
        w.begin_object();
        w.key("a");
        w.begin_array();
        w.int(1);
        w.string("é\u{1f600}");
        w.end_array();
        w.key("b");
        w.begin_object();
        w.end_object();
        w.end_object();
        assert_eq!(w.finish(), r#"{"a": [1, "\u00e9\ud83d\ude00"], "b": {}}"#);

        let mut w = JsonWriter::new(true);
        w.begin_object();
        w.key("a");
        w.begin_array();
        w.end_array();
        w.key("b");
        w.begin_array();
        w.bool(true);
        w.end_array();
        w.end_object();
        assert_eq!(
            w.finish(),
            "{\n    \"a\": [],\n    \"b\": [\n        true\n    ]\n}"
        );
    }

    #[test]
    fn base64_breaks_lines_like_encodebytes() {
        assert_eq!(base64_lines(b""), "");
        assert_eq!(base64_lines(b"abc"), "YWJj\n");
        let long = base64_lines(&[0u8; 60]);
        assert_eq!(long.lines().map(str::len).collect::<Vec<_>>(), [76, 4]);
        assert_eq!(base64_decode(&long), Some(vec![0u8; 60]));
    }

    #[test]
    fn quoted_printable_round_trips() {
        assert_eq!(
            quopri_encode(b"\0abstract=name\xff"),
            "=00abstract=3Dname=FF"
        );
        assert_eq!(quopri_encode(b"/tmp/sock "), "/tmp/sock=20");
        let long = vec![b'a'; 100];
        let encoded = quopri_encode(&long);
        assert!(encoded.contains("=\n"));
        assert_eq!(quopri_decode(&encoded), long);
    }

    #[test]
    fn addresses_render_like_ipaddress() {
        let words = ip_words("127.0.0.1").expect("valid v4");
        assert_eq!(ip_address(&words).as_deref(), Some("127.0.0.1"));
        let words = ip_words("::ffff:127.0.0.1").expect("valid v6");
        assert_eq!(ip_address(&words).as_deref(), Some("::ffff:7f00:1"));
        let words = ip_words("2001:db8:0:1:0:0:0:1").expect("valid v6");
        assert_eq!(ip_address(&words).as_deref(), Some("2001:db8:0:1::1"));
        let words = ip_words("1:0:2:3:4:5:6:7").expect("valid v6");
        assert_eq!(ip_address(&words).as_deref(), Some("1:0:2:3:4:5:6:7"));
    }

    #[test]
    fn integers_parse_like_int_base_0() {
        assert_eq!(parse_int("0x1f"), Some(31));
        assert_eq!(parse_int(" -0o17 "), Some(-15));
        assert_eq!(parse_int("1_000"), Some(1000));
        assert_eq!(parse_int("0"), Some(0));
        assert_eq!(parse_int("00"), Some(0));
        assert_eq!(parse_int("012"), None);
        assert_eq!(parse_int("0x"), None);
        assert_eq!(parse_int("abc"), None);
    }
}
