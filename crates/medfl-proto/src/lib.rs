//! The medfl wire contract: types and gRPC stubs generated from `proto/medfl/v1`, and the
//! conversions between wire and domain types.
//!
//! # Layout
//! - [`v1`]: generated messages, `SiteService` and `RunService` clients and servers.
//! - [`convert`]: wire <-> domain conversions and the metadata keys that carry a site's identity.
//! - [`json`]: how the read messages' enums appear in JSON.

#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("medfl.v1");
}

pub mod convert;
pub mod json;
