//! Compiles `proto/medfl/v1/*.proto` with the vendored protoc, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [root.join("medfl/v1/medfl.proto")];
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    let mut build = tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .btree_map(".");
    // What the CLI's read commands print with --json: these messages as JSON, enums by name.
    for message in [
        "RunSummary",
        "RunDetail",
        "RoundSummary",
        "SiteRoundResult",
        "SiteEvaluation",
        "SiteInfo",
        "DatasetSchema",
    ] {
        build = build.type_attribute(
            format!(".medfl.v1.{message}"),
            "#[derive(serde::Serialize)]",
        );
    }
    build = build
        .field_attribute(
            ".medfl.v1.RunSummary.status",
            "#[serde(serialize_with = \"crate::json::run_status\")]",
        )
        .field_attribute(
            ".medfl.v1.SiteRoundResult.outcome",
            "#[serde(serialize_with = \"crate::json::site_outcome\")]",
        );
    build.compile_protos(&files, &[root])?;
    Ok(())
}
