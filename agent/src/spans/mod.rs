//! Turning protocol exchanges into spans: kind, timing, attributes, ids.

pub mod clock;
pub mod context;
pub mod dns;
pub mod http;
pub mod links;
pub mod model;
pub mod phases;
pub mod resolutions;
pub mod rpc;
