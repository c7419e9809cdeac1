//! The library against crit 4.1.1's own output, committed under `fixtures/golden/`: decoding
//! every protobuf image of every fixture gives crit's JSON byte for byte, plain and pretty, and
//! encoding that JSON gives the original image back.

mod common;

use std::fs;
use std::path::PathBuf;

use criu_images::image::Image;
use criu_images::json::{self, DecodeOptions};

/// One committed crit output: the image it was made from and crit's text.
struct Golden {
    image: PathBuf,
    original: Vec<u8>,
    pretty: bool,
    text: String,
}

/// Every committed crit decode of every protobuf image of every fixture.
fn goldens() -> Vec<Golden> {
    let mut out = Vec::new();
    for dir in common::checkpoints() {
        let name = dir.file_name().expect("fixture has a name");
        let golden_dir = common::fixtures().join("golden").join(name);
        for image in common::protobuf_images(&dir) {
            let file = image
                .file_name()
                .and_then(|n| n.to_str())
                .expect("utf-8 name");
            let original = fs::read(&image).expect("fixture readable");
            for (suffix, pretty) in [("json", false), ("pretty.json", true)] {
                if let Ok(text) = fs::read_to_string(golden_dir.join(format!("{file}.{suffix}"))) {
                    out.push(Golden {
                        image: image.clone(),
                        original: original.clone(),
                        pretty,
                        text,
                    });
                }
            }
        }
    }
    assert!(out.len() >= 40, "only {} golden outputs found", out.len());
    out
}

#[test]
fn decode_matches_crit_byte_for_byte() {
    for golden in goldens() {
        let image = Image::parse(&golden.original).expect("fixture image parses");
        let options = DecodeOptions {
            pretty: golden.pretty,
            no_payload: false,
        };
        let ours = json::decode(&image, options)
            .unwrap_or_else(|e| panic!("{}: {e}", golden.image.display()));
        // crit prints a newline after the JSON on stdout.
        let expected = golden.text.trim_end_matches('\n');
        assert_eq!(
            ours,
            expected,
            "{} (pretty: {})",
            golden.image.display(),
            golden.pretty
        );
    }
}

#[test]
fn crit_json_encodes_to_the_original_bytes() {
    for golden in goldens() {
        let value: serde_json::Value = serde_json::from_str(&golden.text).expect("golden is JSON");
        let encoded = json::encode(&value).unwrap_or_else(|e| {
            panic!(
                "{} (pretty: {}): {e}",
                golden.image.display(),
                golden.pretty
            )
        });
        assert!(
            encoded == golden.original,
            "{} (pretty: {}) re-encodes differently",
            golden.image.display(),
            golden.pretty
        );
    }
}

#[test]
fn our_json_round_trips_every_image() {
    let mut images = 0;
    for dir in common::checkpoints() {
        for path in common::protobuf_images(&dir) {
            let original = fs::read(&path).expect("fixture readable");
            let image = Image::parse(&original).expect("fixture image parses");
            for pretty in [false, true] {
                let text = json::decode(
                    &image,
                    DecodeOptions {
                        pretty,
                        no_payload: false,
                    },
                )
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let value: serde_json::Value =
                    serde_json::from_str(&text).expect("our JSON parses");
                let encoded = json::encode(&value).expect("our JSON encodes");
                assert!(
                    encoded == original,
                    "{} (pretty: {pretty}) round trip",
                    path.display()
                );
            }
            images += 1;
        }
    }
    assert!(images >= 20, "only {images} images round-tripped");
}
