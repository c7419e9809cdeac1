//! The library against crit 4.1.1's own output, committed under `fixtures/golden/`: decoding
//! every protobuf image of every fixture gives crit's JSON byte for byte, plain and pretty, and
//! encoding that JSON gives the original image back.

mod common;

use std::fs;
use std::path::Path;

use criu_images::image::Image;
use criu_images::json::{self, DecodeOptions};

fn golden_dir(checkpoint: &Path) -> std::path::PathBuf {
    let name = checkpoint.file_name().expect("fixture has a name");
    common::fixtures().join("golden").join(name)
}

#[test]
fn decode_matches_crit_byte_for_byte() {
    let mut compared = 0;
    for dir in common::checkpoints() {
        for path in common::protobuf_images(&dir) {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .expect("utf-8 name");
            let data = fs::read(&path).expect("fixture readable");
            for (suffix, pretty) in [("json", false), ("pretty.json", true)] {
                let golden = golden_dir(&dir).join(format!("{name}.{suffix}"));
                let Ok(expected) = fs::read_to_string(&golden) else {
                    continue;
                };
                let image = Image::parse(&data).expect("fixture image parses");
                let ours = json::decode(
                    &image,
                    DecodeOptions {
                        pretty,
                        no_payload: false,
                    },
                )
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                // crit prints a newline after the JSON on stdout.
                assert_eq!(
                    ours,
                    expected.trim_end_matches('\n'),
                    "{} ({suffix})",
                    path.display()
                );
                compared += 1;
            }
        }
    }
    assert!(compared >= 40, "only {compared} golden outputs compared");
}

#[test]
fn crit_json_encodes_to_the_original_bytes() {
    let mut compared = 0;
    for dir in common::checkpoints() {
        for path in common::protobuf_images(&dir) {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .expect("utf-8 name");
            let original = fs::read(&path).expect("fixture readable");
            for suffix in ["json", "pretty.json"] {
                let golden = golden_dir(&dir).join(format!("{name}.{suffix}"));
                let Ok(text) = fs::read_to_string(&golden) else {
                    continue;
                };
                let value: serde_json::Value = serde_json::from_str(&text).expect("golden is JSON");
                let encoded = json::encode(&value)
                    .unwrap_or_else(|e| panic!("{} ({suffix}): {e}", path.display()));
                assert!(
                    encoded == original,
                    "{} ({suffix}) re-encodes differently",
                    path.display()
                );
                compared += 1;
            }
        }
    }
    assert!(compared >= 40, "only {compared} golden outputs encoded");
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
