//! What Periscope saw lately, on this node, without a backend: recent
//! traces (`periscope traces`) and the service map (`periscope map`), kept
//! by the daemon and drawn by the CLI as text or standalone SVG.

pub mod map_view;
pub mod model;
pub mod recent;
pub mod svg;
pub mod waterfall;
