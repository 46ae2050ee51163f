//! What every protocol module hands the spans stage: one [`Exchange`] per
//! request and its response, protocol-neutral (timings, the request's
//! identity on its connection, the few fields spans are made of). Also the
//! shape of the bytes the modules are fed ([`Chunk`]).

use compact_str::CompactString;

/// Which way the bytes of a chunk went, seen from the traced process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The process sent these bytes.
    Egress,
    /// The process received these bytes.
    Ingress,
}

impl Direction {
    pub fn idx(self) -> usize {
        match self {
            Direction::Egress => 0,
            Direction::Ingress => 1,
        }
    }

    pub fn other(self) -> Direction {
        match self {
            Direction::Egress => Direction::Ingress,
            Direction::Ingress => Direction::Egress,
        }
    }
}

/// The traced process's role on the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// This process sent the request.
    Client,
    /// This process received the request.
    Server,
}

/// One captured send or receive.
#[derive(Clone, Copy, Debug)]
pub struct Chunk<'a> {
    pub direction: Direction,
    /// Bytes the syscall transferred.
    pub total_len: u32,
    /// Captured prefix of those bytes (may be shorter than `total_len`, or empty).
    pub bytes: &'a [u8],
    /// Captured last bytes of the call: stream positions
    /// `total_len - tail.len() .. total_len`. Empty when `bytes` holds the
    /// whole call or nothing was captured at the end. Ignored unless
    /// `bytes.len() + tail.len() <= total_len`.
    pub tail: &'a [u8],
    /// Kernel monotonic timestamp at completion of the call.
    pub ts_ns: u64,
    /// When the call began, if known (`ts_ns` otherwise): a message whose
    /// head starts in this call started being sent then. For reads it is
    /// the completion time too: the bytes were there when the call returned.
    pub start_ns: u64,
}

/// What the caller should do with the connection after a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feed {
    Continue,
    /// Not this parser's protocol: give up on this connection for it.
    NotHttp,
}

/// A gRPC path `/package.Service/Method` split into its service and
/// method; None when the path is not of that shape.
pub fn grpc_path(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/')).then_some((service, method))
}

/// The HTTP version an exchange was carried by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVersion {
    Http1_0,
    Http1_1,
    Http2,
}

impl HttpVersion {
    /// HTTP/1.`minor`.
    pub fn http1(minor: u8) -> Self {
        if minor == 0 { HttpVersion::Http1_0 } else { HttpVersion::Http1_1 }
    }

    /// `network.protocol.version`.
    pub fn as_str(self) -> &'static str {
        match self {
            HttpVersion::Http1_0 => "1.0",
            HttpVersion::Http1_1 => "1.1",
            HttpVersion::Http2 => "2",
        }
    }
}

/// One request and its response (if one was seen).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    pub side: Side,
    /// Request method, e.g. "GET".
    pub method: CompactString,
    /// Target without query string or fragment: "/a/b"; the path of an
    /// absolute-form target; "*" for asterisk-form; "" for CONNECT.
    pub path: CompactString,
    /// The target had a query string (its value is never kept).
    pub has_query: bool,
    pub version: HttpVersion,
    /// Host header; for absolute-form or CONNECT targets without a Host
    /// header, the target's authority (userinfo removed).
    pub host: Option<CompactString>,
    pub user_agent: Option<CompactString>,
    pub traceparent: Option<CompactString>,
    pub request_content_length: Option<u64>,
    /// gRPC: the request's content-type is `application/grpc` (or `+proto`...).
    pub grpc: bool,
    /// gRPC: `grpc-status` from the response's trailers (or from a
    /// trailers-only response's headers).
    pub grpc_status: Option<u32>,
    /// Final (non-1xx) status; None if no response was seen.
    pub status: Option<u16>,
    /// Body payload bytes (chunked framing excluded; gaps counted). After a
    /// gap hid chunked framing, uncaptured framing is counted too.
    pub request_body_bytes: u64,
    pub response_body_bytes: u64,
    /// ts of the chunk holding the first / last byte of the request.
    pub request_start_ns: u64,
    pub request_end_ns: u64,
    /// ts of the chunk holding the first byte of the final response's head,
    /// and of the chunk holding its last byte (for a response delimited or
    /// cut short by close, the close's ts; when its end could not be seen,
    /// the last chunk that belonged to it).
    pub response_start_ns: Option<u64>,
    pub response_end_ns: Option<u64>,
    /// Why this exchange is built from incomplete data: "capture_gap",
    /// "no_response", "connection_closed", "bad_framing", "parse_error",
    /// "header_too_large".
    pub incomplete: Option<&'static str>,
    /// The request's position on its connection: 0 for the first request
    /// this parser saw, then 1, 2, ... (both ends of a connection count alike).
    pub seq: u64,
}

