//! The crit commands that convert single images: `decode`, `encode`, `show` and `info`.

use std::path::Path;

use anyhow::Context as _;
use criu_images::image::Image;
use criu_images::json::{self, DecodeOptions};

use crate::output::{self, InvalidInput};

/// `decode` and `show`: an image to crit's JSON. Like crit, a newline follows the JSON on
/// stdout but not in a file.
pub fn decode(
    input: Option<&Path>,
    out: Option<&Path>,
    pretty: bool,
    no_payload: bool,
) -> anyhow::Result<()> {
    let data = output::read_in(input)?;
    let name = input.map_or_else(|| "stdin".to_owned(), |p| p.display().to_string());
    let image = Image::parse(&data).with_context(|| format!("cannot decode {name}"))?;
    let options = DecodeOptions { pretty, no_payload };
    output::with_out(out, |writer, to_stdout| {
        json::decode_to(&image, options, writer)
            .with_context(|| format!("cannot decode {name}"))?;
        if to_stdout {
            writer.write_all(b"\n")?;
        }
        Ok(())
    })
}

/// `encode`: crit's JSON (or ours) back to an image.
pub fn encode(input: Option<&Path>, out: Option<&Path>) -> anyhow::Result<()> {
    let data = output::read_in(input)?;
    let name = input.map_or_else(|| "stdin".to_owned(), |p| p.display().to_string());
    let value: serde_json::Value = serde_json::from_slice(&data).map_err(|e| {
        InvalidInput(format!(
            "{name} is not JSON ({e}); encode expects the JSON that decode prints"
        ))
    })?;
    let image = json::encode(&value).with_context(|| format!("cannot encode {name}"))?;
    output::write_out(out, &image)
}

/// `info`: the magic and the number of entries.
pub fn info(input: &Path) -> anyhow::Result<()> {
    let data = output::read_in(Some(input))?;
    let image = Image::parse(&data).with_context(|| format!("cannot read {}", input.display()))?;
    let mut text =
        json::info(&image).with_context(|| format!("cannot read {}", input.display()))?;
    text.push('\n');
    output::write_out(None, text.as_bytes())
}
