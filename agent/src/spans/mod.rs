//! Turning protocol exchanges into spans: kind, timing, attributes, ids.

pub mod clock;
pub mod context;
// Not all of the DNS API is used by the pipeline yet (drop the allow once it is).
#[allow(dead_code)]
pub mod dns;
pub mod http;
pub mod links;
pub mod model;
pub mod phases;
pub mod resolutions;
