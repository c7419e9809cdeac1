//! Compiles the image schema in `proto/` without `protoc`: `protox` parses the files into a
//! descriptor set, `prost-build` turns it into Rust types, and the encoded descriptor set is
//! embedded so the crit-compatible JSON codec can read field names and the `criu` options at
//! run time.

use std::path::PathBuf;
use std::{env, fs};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = PathBuf::from("proto");
    println!("cargo:rerun-if-changed=proto");

    let mut files: Vec<PathBuf> = fs::read_dir(&proto_dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    files.sort();
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let mut compiler = protox::Compiler::new([&proto_dir])?;
    compiler.include_imports(true).include_source_info(false);
    compiler.open_files(&files)?;

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("criu-schema.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    // Only our own package becomes Rust; descriptor.proto is there for the `criu` option.
    let mut descriptors = compiler.file_descriptor_set();
    descriptors.file.retain(|file| file.package() == "criu");
    prost_build::Config::new()
        .out_dir(&out_dir)
        .compile_fds(descriptors)?;
    Ok(())
}
