//! Compiles `proto/medfl/v1/*.proto` with the vendored protoc, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [root.join("medfl/v1/medfl.proto")];
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .btree_map(".")
        .compile_protos(&files, &[root])?;
    Ok(())
}
