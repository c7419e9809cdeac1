//! Mutation test: thousands of truncated, bit-flipped and size-corrupted variants of the real
//! fixture images go through every parser. Each must give a value or a typed error; a panic
//! (or an allocation driven by a corrupt size) fails the test.

mod common;

use criu_images::image::Image;
use criu_images::json::{self, DecodeOptions};
use criu_images::pagemap::Pagemap;
use criu_images::{magic, pb};
use prost::Message;

/// A small deterministic generator, so a failure reproduces from its printed seed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Runs every parser over `data`, ignoring results: only panics matter.
fn exercise(data: &[u8]) {
    let Ok(image) = Image::parse(data) else {
        return;
    };
    let _ = json::decode(
        &image,
        DecodeOptions {
            pretty: true,
            no_payload: false,
        },
    );
    let _ = json::decode(
        &image,
        DecodeOptions {
            pretty: false,
            no_payload: true,
        },
    );
    let _ = json::info(&image);
    if image.magic() == magic::PAGEMAP {
        let _ = Pagemap::parse(data, 4096);
    }
    let Ok(entries) = image.entries() else {
        return;
    };
    for entry in entries.flatten() {
        match image.magic_name() {
            "CORE" => drop(pb::CoreEntry::decode(entry.message)),
            "MM" => drop(pb::MmEntry::decode(entry.message)),
            "FILES" => drop(pb::FileEntry::decode(entry.message)),
            "INVENTORY" => drop(pb::InventoryEntry::decode(entry.message)),
            _ => {}
        }
    }
}

/// Offsets of the size words of the image's entries.
fn size_word_offsets(data: &[u8]) -> Vec<usize> {
    let Ok(image) = Image::parse(data) else {
        return Vec::new();
    };
    let Ok(entries) = image.entries() else {
        return Vec::new();
    };
    entries.flatten().map(|e| e.offset).collect()
}

#[test]
fn corrupted_images_never_panic() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut variants = 0usize;
    let mut images = 0usize;

    for dir in common::checkpoints() {
        for path in common::protobuf_images(&dir) {
            let original = std::fs::read(&path).expect("fixture readable");
            images += 1;

            // Every truncation of small files; an even spread of them for large ones.
            let step = (original.len() / 256).max(1);
            for len in (0..original.len()).step_by(step) {
                exercise(&original[..len]);
                variants += 1;
            }

            // Single and multiple bit flips.
            for round in 0..64 {
                let mut data = original.clone();
                for _ in 0..=(round % 4) {
                    let bit = rng.below(data.len() * 8);
                    data[bit / 8] ^= 1 << (bit % 8);
                }
                exercise(&data);
                variants += 1;
            }

            // Size words set to values past the end of the file and to the extremes.
            for offset in size_word_offsets(&original) {
                for value in [
                    u32::MAX,
                    0x8000_0000,
                    original.len() as u32,
                    0,
                    rng.next() as u32,
                ] {
                    let mut data = original.clone();
                    data[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
                    exercise(&data);
                    variants += 1;
                }
            }

            // Random bytes spliced into the middle.
            for _ in 0..16 {
                let mut data = original.clone();
                let at = rng.below(data.len());
                let junk: Vec<u8> = (0..rng.below(32) + 1).map(|_| rng.next() as u8).collect();
                data.splice(at..at, junk);
                exercise(&data);
                variants += 1;
            }
        }
    }

    println!("exercised {variants} variants of {images} images");
    assert!(
        images > 0,
        "no fixture images found under {}",
        common::fixtures().display()
    );
    assert!(variants > 1000, "only {variants} variants were exercised");
}
