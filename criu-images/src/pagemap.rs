//! Pagemaps: which pages of a process (or of a shared memory object) a dump holds, and where
//! in the pages file each run of them lies.
//!
//! A pagemap image is a `pagemap_head` naming the pages file, then `pagemap_entry`s in address
//! order. The pages file is the concatenation of the entries that have `PE_PRESENT`, in entry
//! order; entries without it (pages kept in a parent dump, or lazy pages never written) take no
//! room. [`Pagemap`] computes each entry's offset once, so looking an address up is a binary
//! search.

use thiserror::Error;

use crate::image::{Image, ImageError};
use crate::magic;
use crate::wire::{self, Value, WireError};

/// The pages are in the parent dump.
pub const PE_PARENT: u32 = 1 << 0;
/// The pages can be restored lazily.
pub const PE_LAZY: u32 = 1 << 1;
/// The pages are in this dump's pages file.
pub const PE_PRESENT: u32 = 1 << 2;

/// One run of pages, normalised from the three encodings CRIU has used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagemapEntry {
    /// First address (for shared memory: offset inside the object).
    pub vaddr: u64,
    /// Number of pages.
    pub nr_pages: u64,
    /// `PE_*` flags.
    pub flags: u32,
    /// Byte offset of the run in the pages file; meaningful when `PE_PRESENT` is set.
    pub pages_offset: u64,
}

impl PagemapEntry {
    /// Whether the pages are in this dump's pages file.
    pub fn is_present(&self) -> bool {
        self.flags & PE_PRESENT != 0
    }

    /// Whether the pages are in the parent dump.
    pub fn in_parent(&self) -> bool {
        self.flags & PE_PARENT != 0
    }

    /// Whether the pages are lazy and were never written to this dump.
    pub fn is_lazy_only(&self) -> bool {
        self.flags & PE_LAZY != 0 && !self.is_present() && !self.in_parent()
    }
}

/// Why a pagemap cannot be used.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PagemapError {
    /// The image framing is broken.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The image is not a pagemap.
    #[error("not a pagemap: magic is {found}")]
    NotPagemap {
        /// crit's name of the magic found.
        found: &'static str,
    },
    /// The image has no head entry.
    #[error("pagemap has no head entry")]
    NoHead,
    /// An entry's message is malformed.
    #[error("entry {index}: malformed pagemap entry")]
    Malformed {
        /// Index of the entry in the image (the head is 0).
        index: usize,
        /// What is wrong with the encoding.
        #[source]
        source: WireError,
    },
    /// An entry lacks its address or page count.
    #[error("entry {index}: no {field}")]
    MissingField {
        /// Index of the entry in the image.
        index: usize,
        /// The field.
        field: &'static str,
    },
    /// An entry's range wraps around the address space.
    #[error("entry {index}: {nr_pages} pages at {vaddr:#x} overflow the address space")]
    Overflow {
        /// Index of the entry in the image.
        index: usize,
        /// Its address.
        vaddr: u64,
        /// Its page count.
        nr_pages: u64,
    },
    /// Entries are not in ascending, non-overlapping order, which CRIU requires.
    #[error(
        "entry {index}: address {vaddr:#x} is below the end {previous_end:#x} of the \
             previous entry (entries must be sorted and must not overlap)"
    )]
    Unsorted {
        /// Index of the entry in the image.
        index: usize,
        /// Its address.
        vaddr: u64,
        /// End of the entry before it.
        previous_end: u64,
    },
}

/// A decoded pagemap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pagemap {
    /// Number of the pages file, `pages-<pages_id>.img`.
    pub pages_id: u32,
    /// The entries in address order.
    pub entries: Vec<PagemapEntry>,
    /// Page size the offsets were computed with.
    pub page_size: u64,
}

/// Decodes the fields of one pagemap entry: vaddr (1), the 32-bit page count (2, named
/// `compat_nr_pages` since CRIU 4.2), in_parent (3), flags (4) and the 64-bit page count (5)
/// that CRIU 4.2 writes instead of field 2.
fn decode_entry(message: &[u8], index: usize) -> Result<(u64, u64, u32), PagemapError> {
    let (mut vaddr, mut nr32, mut in_parent, mut flags, mut nr64) = (None, None, false, None, None);
    let mut record = |number: u32, v: u64| match number {
        1 => vaddr = Some(v),
        2 => nr32 = Some(v as u32),
        3 => in_parent = v != 0,
        4 => flags = Some(v as u32),
        5 => nr64 = Some(v),
        _ => {}
    };
    // Pagemaps can hold millions of entries, all varints in practice: read them directly,
    // and walk the message generically only when something else turns up.
    match varint_fields(message) {
        Some(fields) => {
            for (number, value) in fields.into_iter().flatten() {
                record(number, value);
            }
        }
        None => {
            for field in wire::fields(message) {
                let field = field.map_err(|source| PagemapError::Malformed { index, source })?;
                if let Value::Varint(v) = field.value {
                    record(field.number, v);
                }
            }
        }
    }
    let vaddr = vaddr.ok_or(PagemapError::MissingField {
        index,
        field: "vaddr",
    })?;
    let nr_pages = nr64
        .or(nr32.map(u64::from))
        .ok_or(PagemapError::MissingField {
            index,
            field: "nr_pages",
        })?;
    // CRIU's compatibility rule: the legacy in_parent flag wins, and an entry without flags
    // is an ordinary present one.
    let flags = match (in_parent, flags) {
        (true, f) => f.unwrap_or(0) | PE_PARENT,
        (false, Some(f)) => f,
        (false, None) => PE_PRESENT,
    };
    Ok((vaddr, nr_pages, flags))
}

/// The fields of a message made of varint fields only (at most eight of them), or `None` for
/// anything else.
fn varint_fields(message: &[u8]) -> Option<[Option<(u32, u64)>; 8]> {
    let mut out = [None; 8];
    let mut pos = 0;
    let mut count = 0;
    while pos < message.len() {
        let (tag, n) = wire::read_varint(&message[pos..])?;
        pos += n;
        if tag & 7 != 0 || count == out.len() {
            return None;
        }
        let (value, n) = wire::read_varint(&message[pos..])?;
        pos += n;
        out[count] = Some(((tag >> 3) as u32, value));
        count += 1;
    }
    Some(out)
}

impl Pagemap {
    /// Decodes a pagemap image, computing each present entry's offset in the pages file.
    ///
    /// # Errors
    ///
    /// Framing errors, a missing head, malformed or unsorted entries, and ranges that overflow.
    pub fn parse(data: &[u8], page_size: u64) -> Result<Self, PagemapError> {
        let image = Image::parse(data)?;
        if image.magic() != magic::PAGEMAP {
            return Err(PagemapError::NotPagemap {
                found: image.magic_name(),
            });
        }
        let mut entries_iter = image.entries()?;
        let head = entries_iter.next().ok_or(PagemapError::NoHead)??;
        let pages_id = wire::last_varint(head.message, 1)
            .map_err(|source| PagemapError::Malformed { index: 0, source })?
            .ok_or(PagemapError::MissingField {
                index: 0,
                field: "pages_id",
            })? as u32;

        // An entry takes at least ten bytes (a size word and three one-byte fields), so this
        // is room for all of them in one allocation, bounded by the file size.
        let mut entries = Vec::with_capacity(data.len() / 10 + 1);
        let mut offset = 0u64;
        let mut previous_end = 0u64;
        for entry in entries_iter {
            let entry = entry?;
            let index = entry.index;
            let (vaddr, nr_pages, flags) = decode_entry(entry.message, index)?;
            let overflow = PagemapError::Overflow {
                index,
                vaddr,
                nr_pages,
            };
            let len = nr_pages.checked_mul(page_size).ok_or(overflow.clone())?;
            let end = vaddr.checked_add(len).ok_or(overflow)?;
            if vaddr < previous_end {
                return Err(PagemapError::Unsorted {
                    index,
                    vaddr,
                    previous_end,
                });
            }
            previous_end = end;

            entries.push(PagemapEntry {
                vaddr,
                nr_pages,
                flags,
                pages_offset: offset,
            });
            if flags & PE_PRESENT != 0 {
                // The sum of present lengths cannot exceed the address space, which the
                // sortedness check above bounds.
                offset = offset.saturating_add(len);
            }
        }
        Ok(Pagemap {
            pages_id,
            entries,
            page_size,
        })
    }

    /// End address of entry `entry`.
    pub fn end_of(&self, entry: &PagemapEntry) -> u64 {
        entry.vaddr + entry.nr_pages * self.page_size
    }

    /// Index of the first entry that ends above `addr`: the entry holding `addr` when there is
    /// one, else the next entry after it.
    pub fn first_ending_above(&self, addr: u64) -> usize {
        self.entries.partition_point(|e| self.end_of(e) <= addr)
    }

    /// The entry holding `addr`, if any.
    pub fn find(&self, addr: u64) -> Option<&PagemapEntry> {
        let entry = self.entries.get(self.first_ending_above(addr))?;
        (entry.vaddr <= addr).then_some(entry)
    }

    /// Number of pages with `PE_PRESENT`.
    pub fn present_pages(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.is_present())
            .map(|e| e.nr_pages)
            .sum()
    }

    /// Number of pages in the parent dump.
    pub fn parent_pages(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.in_parent())
            .map(|e| e.nr_pages)
            .sum()
    }

    /// Number of lazy pages that were never written to this dump.
    pub fn lazy_only_pages(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.is_lazy_only())
            .map(|e| e.nr_pages)
            .sum()
    }

    /// The length the pages file must have: every present page, in bytes.
    pub fn pages_len(&self) -> u64 {
        self.present_pages() * self.page_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ImageWriter;

    fn entry(fields: &[(u32, u64)]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(number, value) in fields {
            wire::write_tag(&mut out, number, wire::WireType::Varint);
            wire::write_varint(&mut out, value);
        }
        out
    }

    fn pagemap(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut writer = ImageWriter::new(magic::PAGEMAP);
        writer.message(&entry(&[(1, 7)])).expect("small message");
        for e in entries {
            writer.message(e).expect("small message");
        }
        writer.finish()
    }

    #[test]
    fn offsets_count_present_pages_only() {
        let data = pagemap(&[
            entry(&[(1, 0x1000), (2, 2), (4, u64::from(PE_PRESENT))]),
            entry(&[(1, 0x3000), (2, 1), (4, u64::from(PE_PARENT))]),
            entry(&[(1, 0x4000), (2, 1), (4, u64::from(PE_LAZY))]),
            entry(&[(1, 0x8000), (2, 3), (4, u64::from(PE_PRESENT | PE_LAZY))]),
        ]);
        let map = Pagemap::parse(&data, 4096).expect("valid pagemap");
        assert_eq!(map.pages_id, 7);
        let offsets: Vec<u64> = map.entries.iter().map(|e| e.pages_offset).collect();
        assert_eq!(offsets, [0, 8192, 8192, 8192]);
        assert_eq!(map.present_pages(), 5);
        assert_eq!(map.find(0x8fff).map(|e| e.vaddr), Some(0x8000));
        assert_eq!(map.find(0x5000), None);
        assert!(map.entries[2].is_lazy_only());
    }

    #[test]
    fn compat_encodings_are_normalised() {
        let data = pagemap(&[
            entry(&[(1, 0x1000), (2, 1)]),
            entry(&[(1, 0x2000), (2, 1), (3, 1)]),
            entry(&[(1, 0x3000), (2, 0), (4, 4), (5, 1 << 33)]),
        ]);
        let map = Pagemap::parse(&data, 4096).expect("valid pagemap");
        assert_eq!(map.entries[0].flags, PE_PRESENT);
        assert_eq!(map.entries[1].flags, PE_PARENT);
        assert_eq!(map.entries[2].nr_pages, 1 << 33);
    }

    #[test]
    fn unsorted_and_overflowing_entries_are_errors() {
        let data = pagemap(&[entry(&[(1, 0x2000), (2, 2)]), entry(&[(1, 0x2000), (2, 1)])]);
        assert!(matches!(
            Pagemap::parse(&data, 4096),
            Err(PagemapError::Unsorted { index: 2, .. })
        ));
        let data = pagemap(&[entry(&[(1, u64::MAX - 4095), (2, 2)])]);
        assert!(matches!(
            Pagemap::parse(&data, 4096),
            Err(PagemapError::Overflow { index: 1, .. })
        ));
        let data = pagemap(&[entry(&[(2, 2)])]);
        assert_eq!(
            Pagemap::parse(&data, 4096),
            Err(PagemapError::MissingField {
                index: 1,
                field: "vaddr"
            })
        );
    }
}
