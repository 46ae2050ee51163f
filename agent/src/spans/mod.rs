//! Turning protocol exchanges into spans: kind, timing, attributes, ids.

pub mod clock;
pub mod http;
pub mod model;
