//! DNS on the wire: messages, TCP framing, and client lookups.
//!
//! - [`parse`] decodes one DNS message (a UDP payload, or one TCP message
//!   without its length prefix) with `hickory-proto` and keeps only what a
//!   span needs: id, QR and TC bits, response code, the first question and
//!   the A/AAAA addresses of the answer section. [`parse_prefix`] does the
//!   same for a message cut short (by the capture limit) or whose later
//!   sections do not decode: header and question must decode, the rest is
//!   best effort.
//! - [`TcpFramer`] splits one direction of a DNS-over-TCP connection into
//!   messages (2-byte big-endian length prefix), across captured pieces of
//!   any size and across uncaptured gaps.
//! - [`LookupTracker`] pairs the queries a client socket sends with the
//!   responses it receives (socket + transaction id + question), counts
//!   retries, and reports lookups that got no answer.
//!
//! No I/O, no BPF, no clocks: timestamps come in with the messages.
//! Nothing here panics on input data; every buffer and table is bounded.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use hickory_proto::op::{Edns, Header, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, DecodeError};

/// Length of the fixed DNS header; shorter messages are never DNS.
pub const HEADER_LEN: usize = 12;
#[allow(dead_code)] // used by the tests and the fuzz target
/// Largest DNS message over TCP (the length prefix is 16 bits).
pub const MAX_TCP_MESSAGE: usize = u16::MAX as usize;
/// Records decoded per message, all sections together. Bounds the work a
/// hostile message can cause through chains of compression pointers (each
/// record's names may hop back through the whole message): 64 KiB of
/// pointers behind 2000 records cost 30 ms; behind 256, under 4 ms. Real
/// stub answers carry far fewer (a 1232-byte EDNS answer fits about 75).
pub const MAX_RECORDS: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    /// The value of `network.transport`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// The question of a message.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Question {
    /// As in the query (case kept), without the trailing dot; `.` for the
    /// root. Bytes outside 32..=126 are written `\DDD` (decimal), tab, CR
    /// and LF `\t` `\r` `\n`; backslash, double quote and a dot inside a
    /// label are backslash-escaped (OTel `dns.question.name`).
    pub name: String,
    /// `A`, `AAAA`, `CNAME`, ...; `TYPE<n>` for types without a mnemonic.
    pub qtype: String,
}

impl Question {
    /// Same question as a response echoes it: names compare without regard
    /// to ASCII case (resolvers may randomise it, RFC 4343), types exactly.
    pub fn matches(&self, other: &Question) -> bool {
        self.qtype == other.qtype && self.name.eq_ignore_ascii_case(&other.name)
    }
}

/// What the agent keeps of one DNS message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub id: u16,
    /// QR bit: a response (else a query).
    pub response: bool,
    /// `NOERROR`, `NXDOMAIN`, `SERVFAIL`, `REFUSED`, ...; `RCODE<n>` for
    /// codes without a name. Includes the EDNS extended bits.
    pub rcode: String,
    /// TC bit: the answer did not fit (the client retries over TCP).
    pub truncated: bool,
    /// The first question (messages practically always carry exactly one).
    pub question: Option<Question>,
    /// A and AAAA records (class IN) of the answer section, in order.
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsError {
    /// The bytes end before the message does.
    Truncated,
    /// Not a decodable DNS message (hickory's reason).
    Malformed(String),
    /// TCP: uncaptured bytes fell inside a message, which was dropped; the
    /// framing is still in step (the message length was known).
    Gap,
    /// TCP: the framing was lost (uncaptured bytes hid a length prefix, or a
    /// length prefix was impossible). Pieces are discarded until one starts
    /// with a plausible message.
    Desync,
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsError::Truncated => f.write_str("DNS message cut short"),
            DnsError::Malformed(why) => write!(f, "malformed DNS message: {why}"),
            DnsError::Gap => f.write_str("DNS message lost to uncaptured bytes"),
            DnsError::Desync => f.write_str("DNS over TCP framing lost"),
        }
    }
}

impl std::error::Error for DnsError {}

fn decode_error(e: DecodeError) -> DnsError {
    match e {
        DecodeError::InsufficientBytes => DnsError::Truncated,
        DecodeError::IncorrectRDataLengthRead { read, len, .. } if read < len => {
            DnsError::Truncated
        }
        other => DnsError::Malformed(other.to_string()),
    }
}

/// Decodes one complete DNS message. Any part that does not decode
/// (including records after the question) makes it an error.
pub fn parse(bytes: &[u8]) -> Result<Message, DnsError> {
    match parse_prefix(bytes)? {
        (msg, None) => Ok(msg),
        (_, Some(e)) => Err(e),
    }
}

/// Decodes as much of a message as the bytes hold. The header and the
/// question section must decode (else `Err`); when a later record does not
/// (cut by the capture limit, or a record type hickory rejects), the message
/// comes back with the addresses read so far and the error beside it. The
/// response code then lacks the EDNS extended bits (which live in the
/// additional section), so extended codes read as their low 4 bits.
pub fn parse_prefix(bytes: &[u8]) -> Result<(Message, Option<DnsError>), DnsError> {
    let mut decoder = BinDecoder::new(bytes);
    let Header {
        mut metadata,
        counts,
    } = Header::read(&mut decoder).map_err(decode_error)?;
    let mut question = None;
    for i in 0..counts.queries {
        let query = Query::read(&mut decoder).map_err(decode_error)?;
        if i == 0 {
            question = Some(Question {
                name: escape_name(&query.name),
                qtype: type_name(query.query_type),
            });
        }
    }
    let mut addresses = Vec::new();
    let rest = read_records(
        &mut decoder,
        counts.answers,
        counts.authorities,
        counts.additionals,
        metadata.op_code,
        &mut addresses,
    );
    let error = match rest {
        Ok(edns) => {
            if let Some(edns) = edns {
                metadata.merge_response_code(edns.rcode_high());
            }
            None
        }
        Err(e) => Some(e),
    };
    let msg = Message {
        id: metadata.id,
        response: metadata.message_type == MessageType::Response,
        rcode: rcode_name(metadata.response_code).into_owned(),
        truncated: metadata.truncation,
        question,
        addresses,
    };
    Ok((msg, error))
}

/// Answer records one by one (so that a cut keeps what came before it),
/// then authority and additional sections through hickory's own reader
/// (for the EDNS record and its extended response code). At most
/// [`MAX_RECORDS`] records in all.
fn read_records(
    decoder: &mut BinDecoder<'_>,
    answers: u16,
    authorities: u16,
    additionals: u16,
    op: OpCode,
    addresses: &mut Vec<IpAddr>,
) -> Result<Option<Edns>, DnsError> {
    let total = usize::from(answers) + usize::from(authorities) + usize::from(additionals);
    for _ in 0..usize::from(answers).min(MAX_RECORDS) {
        let record = Record::read(decoder).map_err(decode_error)?;
        if record.dns_class != DNSClass::IN {
            continue;
        }
        match record.data {
            RData::A(a) => addresses.push(IpAddr::V4(a.0)),
            RData::AAAA(aaaa) => addresses.push(IpAddr::V6(aaaa.0)),
            _ => {}
        }
    }
    if total > MAX_RECORDS {
        return Err(DnsError::Malformed(format!(
            "{total} records, more than the {MAX_RECORDS} decoded"
        )));
    }
    hickory_proto::op::Message::read_records(decoder, usize::from(authorities), false, op)
        .map_err(decode_error)?;
    let (_, edns, _) =
        hickory_proto::op::Message::read_records(decoder, usize::from(additionals), true, op)
            .map_err(decode_error)?;
    Ok(edns)
}

/// The name as `dns.question.name` wants it (see [`Question::name`]).
pub fn escape_name(name: &Name) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, label) in name.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        for &b in label {
            match b {
                b'\\' => out.push_str("\\\\"),
                b'"' => out.push_str("\\\""),
                b'.' => out.push_str("\\."),
                b'\t' => out.push_str("\\t"),
                b'\r' => out.push_str("\\r"),
                b'\n' => out.push_str("\\n"),
                32..=126 => out.push(char::from(b)),
                _ => {
                    out.push('\\');
                    out.push(char::from(b'0' + b / 100));
                    out.push(char::from(b'0' + b / 10 % 10));
                    out.push(char::from(b'0' + b % 10));
                }
            }
        }
    }
    if out.is_empty() {
        out.push('.');
    }
    out
}

/// The record type's mnemonic, `TYPE<n>` (RFC 3597) when it has none.
pub fn type_name(t: RecordType) -> String {
    match t {
        RecordType::Unknown(_) | RecordType::ZERO => format!("TYPE{}", u16::from(t)),
        known => <&'static str>::from(known).to_string(),
    }
}

/// The response code's IANA mnemonic, `RCODE<n>` when it has none.
pub fn rcode_name(code: ResponseCode) -> std::borrow::Cow<'static, str> {
    let n = u16::from(code);
    let name = match n {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        11 => "DSOTYPENI",
        16 => "BADVERS",
        17 => "BADKEY",
        18 => "BADTIME",
        19 => "BADMODE",
        20 => "BADNAME",
        21 => "BADALG",
        22 => "BADTRUNC",
        23 => "BADCOOKIE",
        _ => return format!("RCODE{n}").into(),
    };
    name.into()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FrameState {
    /// At a message boundary (no prefix byte yet).
    Boundary,
    /// One byte of the length prefix seen.
    HalfPrefix(u8),
    /// Collecting a message of this length into `buf`.
    Body(usize),
    /// Discarding this many more bytes of a message that lost bytes.
    Skip(usize),
    /// Framing lost.
    Desynced,
}

/// DNS over TCP: 2-byte big-endian length prefix per message. One per
/// connection direction. Buffers at most one message (64 KiB).
pub struct TcpFramer {
    state: FrameState,
    buf: Vec<u8>,
    lost: u64,
    resyncs: u64,
}

impl Default for TcpFramer {
    fn default() -> Self {
        Self::new()
    }
}

impl TcpFramer {
    pub fn new() -> Self {
        Self {
            state: FrameState::Boundary,
            buf: Vec::new(),
            lost: 0,
            resyncs: 0,
        }
    }

    /// `total_len` = bytes the syscall moved, `bytes` = captured prefix (may
    /// be shorter: the rest is a gap; captured bytes beyond `total_len` are
    /// ignored). Complete messages (without prefix) are appended to `out`.
    /// `Err` reports data lost in this call ([`DnsError::Gap`],
    /// [`DnsError::Desync`], or `Malformed` for an impossible length
    /// prefix); messages completed before the loss are in `out` all the
    /// same, and the framer goes on (resyncing where it can).
    pub fn feed(
        &mut self,
        bytes: &[u8],
        total_len: u32,
        out: &mut Vec<Vec<u8>>,
    ) -> Result<(), DnsError> {
        let total = total_len as usize;
        let bytes = &bytes[..bytes.len().min(total)];
        let gap = total - bytes.len();
        if total == 0 {
            return Ok(());
        }
        if self.state == FrameState::Desynced {
            if !starts_message(bytes, total) {
                return Ok(());
            }
            self.state = FrameState::Boundary;
            self.resyncs += 1;
        }
        let mut result = Ok(());
        let mut rest = bytes;
        while !rest.is_empty() {
            match self.state {
                FrameState::Boundary => match rest {
                    [hi, lo, tail @ ..] => {
                        rest = tail;
                        result = self.start_body(u16::from_be_bytes([*hi, *lo]));
                    }
                    [hi] => {
                        rest = &[];
                        self.state = FrameState::HalfPrefix(*hi);
                    }
                    [] => {}
                },
                FrameState::HalfPrefix(hi) => {
                    let (lo, tail) = rest.split_at(1);
                    rest = tail;
                    result = self.start_body(u16::from_be_bytes([hi, lo[0]]));
                }
                FrameState::Body(len) => {
                    let need = len.saturating_sub(self.buf.len());
                    let take = need.min(rest.len());
                    let (part, tail) = rest.split_at(take);
                    rest = tail;
                    if self.buf.is_empty() && take == need {
                        out.push(part.to_vec());
                        self.state = FrameState::Boundary;
                    } else {
                        if self.buf.is_empty() {
                            self.buf.reserve_exact(len);
                        }
                        self.buf.extend_from_slice(part);
                        if self.buf.len() >= len {
                            out.push(std::mem::take(&mut self.buf));
                            self.state = FrameState::Boundary;
                        }
                    }
                }
                FrameState::Skip(remaining) => {
                    let take = remaining.min(rest.len());
                    rest = &rest[take..];
                    self.state = if take == remaining {
                        FrameState::Boundary
                    } else {
                        FrameState::Skip(remaining - take)
                    };
                }
                FrameState::Desynced => break,
            }
        }
        if gap > 0 {
            result = self.skip_gap(gap).and(result);
        }
        result
    }

    fn start_body(&mut self, len: u16) -> Result<(), DnsError> {
        let len = usize::from(len);
        if len < HEADER_LEN {
            self.state = FrameState::Desynced;
            self.buf = Vec::new();
            return Err(DnsError::Malformed(format!(
                "TCP length prefix {len} is shorter than a DNS header"
            )));
        }
        self.state = FrameState::Body(len);
        Ok(())
    }

    /// Uncaptured bytes at the end of a piece.
    fn skip_gap(&mut self, gap: usize) -> Result<(), DnsError> {
        let remaining = match self.state {
            FrameState::Desynced => return Ok(()),
            FrameState::Boundary | FrameState::HalfPrefix(_) => {
                self.state = FrameState::Desynced;
                return Err(DnsError::Desync);
            }
            FrameState::Skip(remaining) => remaining,
            FrameState::Body(len) => len.saturating_sub(self.buf.len()),
        };
        let had_message = matches!(self.state, FrameState::Body(_));
        if had_message {
            self.buf = Vec::new();
            self.lost += 1;
        }
        self.state = match gap.cmp(&remaining) {
            std::cmp::Ordering::Less => FrameState::Skip(remaining - gap),
            std::cmp::Ordering::Equal => FrameState::Boundary,
            std::cmp::Ordering::Greater => {
                self.state = FrameState::Desynced;
                return Err(DnsError::Desync);
            }
        };
        if had_message {
            Err(DnsError::Gap)
        } else {
            Ok(())
        }
    }

    #[allow(dead_code)] // used by the tests and the fuzz target
    /// Whether the framer knows where the next message starts.
    pub fn in_sync(&self) -> bool {
        self.state != FrameState::Desynced
    }

    #[allow(dead_code)] // used by the tests and the fuzz target
    /// Bytes held for an incomplete message.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    #[allow(dead_code)] // used by the tests and the fuzz target
    /// Messages dropped because uncaptured bytes fell inside them.
    pub fn lost_messages(&self) -> u64 {
        self.lost
    }

    #[allow(dead_code)] // used by the tests and the fuzz target
    /// Times the framing was found again after it was lost.
    pub fn resyncs(&self) -> u64 {
        self.resyncs
    }
}

/// Whether a piece (after lost framing) plausibly starts at a message
/// boundary: a chain of length prefixes, each followed by a DNS header with
/// at most one question, that ends exactly at the end of the piece or with
/// a last message that goes on in a later piece. At least one header must
/// be visible.
fn starts_message(bytes: &[u8], total: usize) -> bool {
    let mut pos = 0usize;
    let mut headers_seen = 0;
    loop {
        let Some(prefix) = bytes.get(pos..pos + 2) else {
            return false;
        };
        let len = usize::from(u16::from_be_bytes([prefix[0], prefix[1]]));
        if len < HEADER_LEN {
            return false;
        }
        if let Some(header) = bytes.get(pos + 2..pos + 2 + HEADER_LEN) {
            let qdcount = u16::from_be_bytes([header[4], header[5]]);
            if qdcount > 1 {
                return false;
            }
            headers_seen += 1;
        } else if pos + 2 + HEADER_LEN <= total {
            // Header within the piece but not captured: cannot check it.
            return false;
        }
        pos += 2 + len;
        if pos >= total {
            return headers_seen > 0;
        }
    }
}

/// The response that completed a lookup.
#[derive(Clone, Debug)]
pub struct Answer {
    pub ts_ns: u64,
    pub rcode: String,
    pub addresses: Vec<IpAddr>,
    pub truncated: bool,
}

/// One client lookup: a question sent on one socket with one transaction
/// id, and its response if one came.
#[derive(Clone, Debug)]
pub struct Lookup {
    #[allow(dead_code)] // identifies the lookup in Debug output and tests
    pub sock: u64,
    pub tgid: u32,
    pub tid: u32,
    #[allow(dead_code)] // identifies the lookup in Debug output and tests
    pub id: u16,
    pub transport: Transport,
    pub question: Question,
    /// Start of the first send.
    pub first_query_ns: u64,
    /// Start of the latest send (retries move it).
    pub last_query_ns: u64,
    /// Times the query was sent (> 1: retries).
    pub attempts: u32,
    pub response: Option<Answer>,
    /// The resolver the query went to, when the caller knows it.
    pub peer: Option<std::net::SocketAddr>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LookupCounters {
    /// Responses received on a socket with no pending query of that id.
    pub responses_without_query: u64,
    /// Responses whose id matched a pending query but whose question did not.
    pub mismatched_question: u64,
    /// Queries received or responses sent: the process is a DNS server.
    pub server_side_messages: u64,
    /// Pending lookups dropped (oldest first) because the table was full.
    pub dropped_overflow: u64,
    /// Queries sent without a question section (nothing to match).
    pub queries_without_question: u64,
}

/// Pairs queries with responses per (socket, transaction id, question).
/// Holds at most `max_pending` unanswered lookups.
pub struct LookupTracker {
    max_pending: usize,
    /// (socket, id, sequence) -> lookup; the sequence keeps same-id lookups
    /// with different questions apart and orders them by age.
    pending: BTreeMap<(u64, u16, u64), Lookup>,
    /// sequence -> (socket, id): oldest first, for overflow.
    order: BTreeMap<u64, (u64, u16)>,
    next_seq: u64,
    counters: LookupCounters,
}

impl LookupTracker {
    pub fn new(max_pending: usize) -> Self {
        Self {
            max_pending,
            pending: BTreeMap::new(),
            order: BTreeMap::new(),
            next_seq: 0,
            counters: LookupCounters::default(),
        }
    }

    /// A message the traced process sent (`egress`) or received on socket
    /// `sock`. Queries sent and responses received are client lookups; the
    /// same query (same socket, id, question) sent again before its answer is
    /// a retry. A response completes its lookup and returns it. A response
    /// without a question section (some FORMERR/SERVFAIL answers) matches
    /// when exactly one lookup with its id is pending on the socket. Queries
    /// received and responses sent (the process is a DNS server) are
    /// counted and ignored.
    #[allow(clippy::too_many_arguments)]
    pub fn on_message(
        &mut self,
        sock: u64,
        tgid: u32,
        tid: u32,
        transport: Transport,
        egress: bool,
        ts_ns: u64,
        msg: &Message,
    ) -> Option<Lookup> {
        match (egress, msg.response) {
            (true, false) => {
                self.on_query(sock, tgid, tid, transport, ts_ns, msg);
                None
            }
            (false, true) => self.on_response(sock, ts_ns, msg),
            _ => {
                self.counters.server_side_messages += 1;
                None
            }
        }
    }

    fn on_query(
        &mut self,
        sock: u64,
        tgid: u32,
        tid: u32,
        transport: Transport,
        ts_ns: u64,
        msg: &Message,
    ) {
        let Some(question) = &msg.question else {
            self.counters.queries_without_question += 1;
            return;
        };
        let id = msg.id;
        if let Some((_, lookup)) = self
            .pending
            .range_mut((sock, id, 0)..=(sock, id, u64::MAX))
            .find(|(_, l)| l.question.matches(question))
        {
            lookup.attempts = lookup.attempts.saturating_add(1);
            lookup.last_query_ns = lookup.last_query_ns.max(ts_ns);
            lookup.first_query_ns = lookup.first_query_ns.min(ts_ns);
            return;
        }
        if self.max_pending == 0 {
            self.counters.dropped_overflow += 1;
            return;
        }
        while self.pending.len() >= self.max_pending {
            let Some((seq, (s, i))) = self.order.pop_first() else {
                break;
            };
            self.pending.remove(&(s, i, seq));
            self.counters.dropped_overflow += 1;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert(seq, (sock, id));
        self.pending.insert(
            (sock, id, seq),
            Lookup {
                sock,
                tgid,
                tid,
                id,
                transport,
                question: question.clone(),
                first_query_ns: ts_ns,
                last_query_ns: ts_ns,
                attempts: 1,
                response: None,
                peer: None,
            },
        );
    }

    fn on_response(&mut self, sock: u64, ts_ns: u64, msg: &Message) -> Option<Lookup> {
        let id = msg.id;
        let mut same_id = self.pending.range((sock, id, 0)..=(sock, id, u64::MAX));
        let found = match &msg.question {
            Some(q) => same_id
                .clone()
                .find(|(_, l)| l.question.matches(q))
                .map(|(k, _)| *k),
            None => match (same_id.next(), same_id.next()) {
                (Some((k, _)), None) => Some(*k),
                _ => None,
            },
        };
        let Some(key) = found else {
            if self
                .pending
                .range((sock, id, 0)..=(sock, id, u64::MAX))
                .next()
                .is_some()
            {
                self.counters.mismatched_question += 1;
            } else {
                self.counters.responses_without_query += 1;
            }
            return None;
        };
        let mut lookup = self.pending.remove(&key)?;
        self.order.remove(&key.2);
        lookup.response = Some(Answer {
            ts_ns,
            rcode: msg.rcode.clone(),
            addresses: msg.addresses.clone(),
            truncated: msg.truncated,
        });
        Some(lookup)
    }

    /// Lookups with no response for `timeout_ns` since their last query:
    /// returned (response `None`) and forgotten.
    pub fn expire(&mut self, now_ns: u64, timeout_ns: u64, out: &mut Vec<Lookup>) {
        self.take(
            ..,
            |l| now_ns.saturating_sub(l.last_query_ns) >= timeout_ns,
            out,
        );
    }

    /// Records where the pending queries with this socket and id were sent.
    pub fn note_peer(&mut self, sock: u64, id: u16, peer: std::net::SocketAddr) {
        for (_, l) in self.pending.range_mut((sock, id, 0)..=(sock, id, u64::MAX)) {
            l.peer.get_or_insert(peer);
        }
    }

    /// Unanswered lookups thread `tid` of `tgid` began between `from_ns` and
    /// `to_ns` (a getaddrinfo call that has returned gave up on them),
    /// returned and forgotten.
    pub fn take_started_by(&mut self, tgid: u32, tid: u32, from_ns: u64, to_ns: u64, out: &mut Vec<Lookup>) {
        self.take(
            ..,
            |l| l.tgid == tgid && l.tid == tid && l.first_query_ns >= from_ns && l.first_query_ns <= to_ns,
            out,
        );
    }

    /// When the unanswered lookups of thread `tid` of `tgid`, begun between
    /// `from_ns` and `to_ns`, were first sent.
    pub fn pending_starts(&self, tgid: u32, tid: u32, from_ns: u64, to_ns: u64) -> impl Iterator<Item = u64> + '_ {
        self.pending
            .values()
            .filter(move |l| l.tgid == tgid && l.tid == tid && l.first_query_ns >= from_ns && l.first_query_ns <= to_ns)
            .map(|l| l.first_query_ns)
    }

    /// The socket closed: its unanswered lookups, returned and forgotten.
    pub fn close_socket(&mut self, sock: u64, out: &mut Vec<Lookup>) {
        self.take((sock, 0, 0)..=(sock, u16::MAX, u64::MAX), |_| true, out);
    }

    /// Forget everything of a process (exit), returning unanswered lookups.
    pub fn remove_process(&mut self, tgid: u32, out: &mut Vec<Lookup>) {
        self.take(.., |l| l.tgid == tgid, out);
    }

    fn take(
        &mut self,
        range: impl std::ops::RangeBounds<(u64, u16, u64)>,
        mut pred: impl FnMut(&Lookup) -> bool,
        out: &mut Vec<Lookup>,
    ) {
        let start = out.len();
        for (key, lookup) in self.pending.extract_if(range, |_, l| pred(l)) {
            self.order.remove(&key.2);
            out.push(lookup);
        }
        // Oldest first, whatever the socket.
        out[start..].sort_by_key(|l| l.first_query_ns);
    }

    #[allow(dead_code)] // used by the tests and the fuzz target
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn counters(&self) -> LookupCounters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message as HMessage, MessageType as HType, OpCode as HOp};
    use hickory_proto::rr::rdata::{A, AAAA, CNAME};
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    // Responses as a resolver sends them (name compression, EDNS OPT).

    /// `example.com A`: two A records, owner names compressed to the question.
    const A_RESPONSE: &[u8] = &[
        0x8a, 0x1f, 0x81, 0x80, 0x00, 0x01, 0x00, 0x02, 0x00, 0x00, 0x00, 0x01, 0x07, 0x65, 0x78,
        0x61, 0x6d, 0x70, 0x6c, 0x65, 0x03, 0x63, 0x6f, 0x6d, 0x00, 0x00, 0x01, 0x00, 0x01, 0xc0,
        0x0c, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x01, 0x0c, 0x00, 0x04, 0x17, 0xc0, 0xe4, 0x50,
        0xc0, 0x0c, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x01, 0x0c, 0x00, 0x04, 0x17, 0xc0, 0xe4,
        0x54, 0x00, 0x00, 0x29, 0x04, 0xd0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    /// `nonexistent.example.com A` -> NXDOMAIN with the zone's SOA in the
    /// authority section (owner and RNAME compressed).
    const NXDOMAIN_RESPONSE: &[u8] = &[
        0x3c, 0x41, 0x81, 0x83, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01, 0x0b, 0x6e, 0x6f,
        0x6e, 0x65, 0x78, 0x69, 0x73, 0x74, 0x65, 0x6e, 0x74, 0x07, 0x65, 0x78, 0x61, 0x6d, 0x70,
        0x6c, 0x65, 0x03, 0x63, 0x6f, 0x6d, 0x00, 0x00, 0x01, 0x00, 0x01, 0xc0, 0x18, 0x00, 0x06,
        0x00, 0x01, 0x00, 0x00, 0x0e, 0x10, 0x00, 0x2c, 0x02, 0x6e, 0x73, 0x05, 0x69, 0x63, 0x61,
        0x6e, 0x6e, 0x03, 0x6f, 0x72, 0x67, 0x00, 0x03, 0x6e, 0x6f, 0x63, 0x03, 0x64, 0x6e, 0x73,
        0xc0, 0x38, 0x78, 0xb3, 0x39, 0x91, 0x00, 0x00, 0x1c, 0x20, 0x00, 0x00, 0x0e, 0x10, 0x00,
        0x12, 0x75, 0x00, 0x00, 0x00, 0x0e, 0x10, 0x00, 0x00, 0x29, 0x04, 0xd0, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00,
    ];

    /// `one.one.one.one AAAA`: two AAAA records.
    const AAAA_RESPONSE: &[u8] = &[
        0x0d, 0x0e, 0x81, 0x80, 0x00, 0x01, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x03, 0x6f, 0x6e,
        0x65, 0x03, 0x6f, 0x6e, 0x65, 0x03, 0x6f, 0x6e, 0x65, 0x03, 0x6f, 0x6e, 0x65, 0x00, 0x00,
        0x1c, 0x00, 0x01, 0xc0, 0x0c, 0x00, 0x1c, 0x00, 0x01, 0x00, 0x00, 0x01, 0x2c, 0x00, 0x10,
        0x26, 0x06, 0x47, 0x00, 0x47, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x11,
        0x11, 0xc0, 0x0c, 0x00, 0x1c, 0x00, 0x01, 0x00, 0x00, 0x01, 0x2c, 0x00, 0x10, 0x26, 0x06,
        0x47, 0x00, 0x47, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x01,
    ];

    /// `www.microsoft.com A`: three CNAMEs (each owner a pointer into the
    /// previous record's data, the last target ending in a pointer) and the A.
    const CNAME_CHAIN_RESPONSE: &[u8] = &[
        0x5e, 0x77, 0x81, 0x80, 0x00, 0x01, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x03, 0x77, 0x77,
        0x77, 0x09, 0x6d, 0x69, 0x63, 0x72, 0x6f, 0x73, 0x6f, 0x66, 0x74, 0x03, 0x63, 0x6f, 0x6d,
        0x00, 0x00, 0x01, 0x00, 0x01, 0xc0, 0x0c, 0x00, 0x05, 0x00, 0x01, 0x00, 0x00, 0x0e, 0x10,
        0x00, 0x23, 0x03, 0x77, 0x77, 0x77, 0x09, 0x6d, 0x69, 0x63, 0x72, 0x6f, 0x73, 0x6f, 0x66,
        0x74, 0x07, 0x63, 0x6f, 0x6d, 0x2d, 0x63, 0x2d, 0x33, 0x07, 0x65, 0x64, 0x67, 0x65, 0x6b,
        0x65, 0x79, 0x03, 0x6e, 0x65, 0x74, 0x00, 0xc0, 0x2f, 0x00, 0x05, 0x00, 0x01, 0x00, 0x00,
        0x03, 0x84, 0x00, 0x3a, 0x03, 0x77, 0x77, 0x77, 0x09, 0x6d, 0x69, 0x63, 0x72, 0x6f, 0x73,
        0x6f, 0x66, 0x74, 0x07, 0x63, 0x6f, 0x6d, 0x2d, 0x63, 0x2d, 0x33, 0x07, 0x65, 0x64, 0x67,
        0x65, 0x6b, 0x65, 0x79, 0x03, 0x6e, 0x65, 0x74, 0x0b, 0x67, 0x6c, 0x6f, 0x62, 0x61, 0x6c,
        0x72, 0x65, 0x64, 0x69, 0x72, 0x06, 0x61, 0x6b, 0x61, 0x64, 0x6e, 0x73, 0x03, 0x6e, 0x65,
        0x74, 0x00, 0xc0, 0x5e, 0x00, 0x05, 0x00, 0x01, 0x00, 0x00, 0x03, 0x84, 0x00, 0x19, 0x06,
        0x65, 0x31, 0x33, 0x36, 0x37, 0x38, 0x04, 0x64, 0x73, 0x63, 0x62, 0x0a, 0x61, 0x6b, 0x61,
        0x6d, 0x61, 0x69, 0x65, 0x64, 0x67, 0x65, 0xc0, 0x93, 0xc0, 0xa4, 0x00, 0x01, 0x00, 0x01,
        0x00, 0x00, 0x00, 0x14, 0x00, 0x04, 0x17, 0x35, 0x78, 0xbb,
    ];

    /// A glibc-style query: `example.com A`, RD set, no EDNS.
    const A_QUERY: &[u8] = &[
        0x8a, 0x1f, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x07, 0x65, 0x78,
        0x61, 0x6d, 0x70, 0x6c, 0x65, 0x03, 0x63, 0x6f, 0x6d, 0x00, 0x00, 0x01, 0x00, 0x01,
    ];

    fn q(name: &str, qtype: &str) -> Question {
        Question {
            name: name.into(),
            qtype: qtype.into(),
        }
    }

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn hquery(id: u16, qname: &str, qtype: RecordType) -> HMessage {
        let mut m = HMessage::new(id, HType::Query, HOp::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(name(qname), qtype));
        m
    }

    fn hresponse(
        id: u16,
        qname: &str,
        qtype: RecordType,
        rcode: ResponseCode,
        answers: &[IpAddr],
    ) -> HMessage {
        let mut m = hquery(id, qname, qtype);
        m.metadata.message_type = HType::Response;
        m.metadata.response_code = rcode;
        for a in answers {
            let data = match a {
                IpAddr::V4(v4) => RData::A(A(*v4)),
                IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
            };
            m.add_answer(Record::from_rdata(name(qname), 60, data));
        }
        m
    }

    fn bytes(m: &HMessage) -> Vec<u8> {
        m.to_vec().unwrap()
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    // ---- parse ----

    #[test]
    fn hickory_built_query_and_response() {
        let query = parse(&bytes(&hquery(0x1234, "api.example.com.", RecordType::A))).unwrap();
        assert_eq!(
            query,
            Message {
                id: 0x1234,
                response: false,
                rcode: "NOERROR".into(),
                truncated: false,
                question: Some(q("api.example.com", "A")),
                addresses: vec![],
            }
        );
        let v6: IpAddr = "2001:db8::7".parse().unwrap();
        let resp = parse(&bytes(&hresponse(
            0x1234,
            "api.example.com.",
            RecordType::AAAA,
            ResponseCode::NoError,
            &[v6, v4(10, 0, 0, 1)],
        )))
        .unwrap();
        assert!(resp.response);
        assert_eq!(resp.question, Some(q("api.example.com", "AAAA")));
        assert_eq!(resp.addresses, vec![v6, v4(10, 0, 0, 1)]);
    }

    #[test]
    fn hickory_built_cname_then_a_keeps_only_addresses_in_order() {
        let mut m = hresponse(
            7,
            "www.example.com.",
            RecordType::A,
            ResponseCode::NoError,
            &[],
        );
        m.add_answer(Record::from_rdata(
            name("www.example.com."),
            60,
            RData::CNAME(CNAME(name("edge.cdn.net."))),
        ));
        m.add_answer(Record::from_rdata(
            name("edge.cdn.net."),
            60,
            RData::A(A::new(192, 0, 2, 1)),
        ));
        m.add_answer(Record::from_rdata(
            name("edge.cdn.net."),
            60,
            RData::A(A::new(192, 0, 2, 2)),
        ));
        let msg = parse(&bytes(&m)).unwrap();
        assert_eq!(msg.addresses, vec![v4(192, 0, 2, 1), v4(192, 0, 2, 2)]);
    }

    #[test]
    fn captured_a_response_with_compression() {
        let msg = parse(A_RESPONSE).unwrap();
        assert_eq!(
            msg,
            Message {
                id: 0x8a1f,
                response: true,
                rcode: "NOERROR".into(),
                truncated: false,
                question: Some(q("example.com", "A")),
                addresses: vec![v4(23, 192, 228, 80), v4(23, 192, 228, 84)],
            }
        );
        let query = parse(A_QUERY).unwrap();
        assert_eq!(
            (query.id, query.response, query.question),
            (0x8a1f, false, Some(q("example.com", "A")))
        );
    }

    #[test]
    fn captured_nxdomain() {
        let msg = parse(NXDOMAIN_RESPONSE).unwrap();
        assert_eq!(msg.rcode, "NXDOMAIN");
        assert_eq!(msg.question, Some(q("nonexistent.example.com", "A")));
        assert!(msg.addresses.is_empty());
        assert!(msg.response && !msg.truncated);
    }

    #[test]
    fn captured_aaaa() {
        let msg = parse(AAAA_RESPONSE).unwrap();
        assert_eq!(msg.question, Some(q("one.one.one.one", "AAAA")));
        assert_eq!(
            msg.addresses,
            vec![
                IpAddr::V6("2606:4700:4700::1111".parse::<Ipv6Addr>().unwrap()),
                IpAddr::V6("2606:4700:4700::1001".parse::<Ipv6Addr>().unwrap()),
            ]
        );
    }

    #[test]
    fn captured_cname_chain() {
        let msg = parse(CNAME_CHAIN_RESPONSE).unwrap();
        assert_eq!(msg.question, Some(q("www.microsoft.com", "A")));
        assert_eq!(msg.addresses, vec![v4(23, 53, 120, 187)]);
        // The chain itself decoded through the pointers.
        let full = HMessage::from_vec(CNAME_CHAIN_RESPONSE).unwrap();
        let targets: Vec<String> = full
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::CNAME(c) => Some(c.0.to_ascii()),
                _ => None,
            })
            .collect();
        assert_eq!(
            targets,
            [
                "www.microsoft.com-c-3.edgekey.net.",
                "www.microsoft.com-c-3.edgekey.net.globalredir.akadns.net.",
                "e13678.dscb.akamaiedge.net."
            ]
        );
    }

    #[test]
    fn response_codes_and_flags() {
        for (code, want) in [
            (ResponseCode::ServFail, "SERVFAIL"),
            (ResponseCode::Refused, "REFUSED"),
            (ResponseCode::FormErr, "FORMERR"),
            (ResponseCode::NotImp, "NOTIMP"),
            (ResponseCode::Unknown(12), "RCODE12"),
        ] {
            let msg = parse(&bytes(&hresponse(1, "a.b.", RecordType::A, code, &[]))).unwrap();
            assert_eq!(msg.rcode, want);
        }
        let mut tc = hresponse(
            2,
            "big.example.",
            RecordType::TXT,
            ResponseCode::NoError,
            &[],
        );
        tc.metadata.truncation = true;
        let msg = parse(&bytes(&tc)).unwrap();
        assert!(msg.truncated);
        assert_eq!(msg.question, Some(q("big.example", "TXT")));
    }

    #[test]
    fn extended_rcode_from_edns() {
        // BADVERS = 16: low 4 bits 0 in the header, high bits 1 in the OPT record.
        let mut m = hresponse(3, "a.example.", RecordType::A, ResponseCode::BADVERS, &[]);
        m.set_edns(Edns::new());
        let wire = bytes(&m);
        assert_eq!(parse(&wire).unwrap().rcode, "BADVERS");
        // Cut before the OPT record: only the header's bits are known.
        let (partial, err) = parse_prefix(&wire[..wire.len() - 3]).unwrap();
        assert_eq!(partial.rcode, "NOERROR");
        assert_eq!(err, Some(DnsError::Truncated));
    }

    #[test]
    fn type_names() {
        let t = |n: u16| type_name(RecordType::from(n));
        assert_eq!(t(1), "A");
        assert_eq!(t(28), "AAAA");
        assert_eq!(t(5), "CNAME");
        assert_eq!(t(12), "PTR");
        assert_eq!(t(33), "SRV");
        assert_eq!(t(65), "HTTPS");
        assert_eq!(t(0), "TYPE0");
        assert_eq!(t(65280), "TYPE65280");
        let mut m = hquery(9, "x.example.", RecordType::Unknown(65280));
        m.metadata.recursion_desired = false;
        assert_eq!(
            parse(&bytes(&m)).unwrap().question,
            Some(q("x.example", "TYPE65280"))
        );
    }

    #[test]
    fn names_escaped_per_semconv() {
        let labels: Vec<&[u8]> = vec![
            b"a\tb\r\nc",
            b"d.e",
            b"q\"s\\x",
            &[0, 31, 127, 200, 255],
            b"sp ace",
        ];
        let n = Name::from_labels(labels).unwrap();
        assert_eq!(
            escape_name(&n),
            "a\\tb\\r\\nc.d\\.e.q\\\"s\\\\x.\\000\\031\\127\\200\\255.sp ace"
        );
        // Case is kept as sent.
        assert_eq!(escape_name(&name("WwW.ExAmple.COM.")), "WwW.ExAmple.COM");
        assert_eq!(escape_name(&Name::root()), ".");
        let msg = parse(&bytes(&hquery(5, "MiXeD.Example.", RecordType::A))).unwrap();
        assert_eq!(msg.question.unwrap().name, "MiXeD.Example");
    }

    #[test]
    fn every_cut_of_a_message_is_an_error_but_prefix_parse_keeps_the_rest() {
        for full in [
            A_RESPONSE,
            NXDOMAIN_RESPONSE,
            AAAA_RESPONSE,
            CNAME_CHAIN_RESPONSE,
            A_QUERY,
        ] {
            let whole = parse(full).unwrap();
            for cut in 0..full.len() {
                let err = parse(&full[..cut]).unwrap_err();
                assert_eq!(err, DnsError::Truncated, "cut at {cut}");
                match parse_prefix(&full[..cut]) {
                    Ok((msg, Some(_))) => {
                        assert_eq!(
                            (msg.id, &msg.question, msg.response),
                            (whole.id, &whole.question, whole.response)
                        );
                        assert!(whole.addresses.starts_with(&msg.addresses), "cut at {cut}");
                    }
                    Ok((_, None)) => panic!("cut at {cut} decoded as complete"),
                    Err(e) => assert_eq!(e, DnsError::Truncated),
                }
            }
        }
        // Cut inside the second A record: the first address is kept.
        let (msg, err) = parse_prefix(&A_RESPONSE[..58]).unwrap();
        assert_eq!(msg.addresses, vec![v4(23, 192, 228, 80)]);
        assert_eq!(err, Some(DnsError::Truncated));
    }

    fn malformed(b: &[u8]) {
        match parse(b) {
            Err(DnsError::Malformed(_)) | Err(DnsError::Truncated) => {}
            other => panic!("{b:02x?} parsed: {other:?}"),
        }
    }

    #[test]
    fn compression_loops_and_bad_names_are_errors() {
        let header = |qd: u8, an: u8| vec![0, 1, 0x81, 0x80, 0, qd, 0, an, 0, 0, 0, 0];
        // Question name is a pointer to itself.
        let mut b = header(1, 0);
        b.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        malformed(&b);
        // Pointer forward (to the answer).
        let mut b = header(1, 0);
        b.extend_from_slice(&[0xc0, 18, 0, 1, 0, 1, 1, b'a', 0]);
        malformed(&b);
        // Two names pointing at each other: the answer owner points to a
        // label whose continuation points back to the answer owner.
        let mut b = header(1, 1);
        b.extend_from_slice(&[1, b'a', 0xc0, 19, 0, 1, 0, 1]); // question at 12, pointer to 19
        b.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 1, 0, 4, 1, 2, 3, 4]);
        malformed(&b);
        // Reserved label type bits (0b10 and 0b01).
        for code in [0x80u8, 0x40] {
            let mut b = header(1, 0);
            b.extend_from_slice(&[code | 3, b'a', b'b', b'c', 0, 0, 1, 0, 1]);
            malformed(&b);
        }
        // Name longer than 255 bytes (five 63-byte labels).
        let mut b = header(1, 0);
        for _ in 0..5 {
            b.push(63);
            b.extend_from_slice(&[b'x'; 63]);
        }
        b.extend_from_slice(&[0, 0, 1, 0, 1]);
        malformed(&b);
        // Name without its terminating zero.
        let mut b = header(1, 0);
        b.extend_from_slice(&[3, b'a', b'b', b'c']);
        malformed(&b);
        // RDLENGTH beyond the end of the message.
        let mut b = A_RESPONSE[..A_RESPONSE.len() - 11].to_vec();
        let rdlen = b.len() - 6;
        b[rdlen] = 0x40;
        malformed(&b);
        // A record with 3 bytes of address.
        let mut b = header(0, 1);
        b.extend_from_slice(&[0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 3, 1, 2, 3]);
        malformed(&b);
        // Header only, then nothing although it announces 65535 questions.
        malformed(&[0, 1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0]);
        malformed(&[]);
        malformed(&[0x12]);
    }

    /// Records whose owner names chain through the previous record's
    /// owner: each hop a label and a pointer back.
    fn chained_owners(records: usize) -> Vec<u8> {
        let mut b = vec![
            0,
            1,
            0x81,
            0x80,
            0,
            1,
            (records >> 8) as u8,
            records as u8,
            0,
            0,
            0,
            0,
        ];
        b.extend_from_slice(&[1, b'a', 0, 0, 1, 0, 1]);
        let mut prev = 12usize;
        for i in 0..records {
            let at = b.len();
            b.extend_from_slice(&[1, b'b', 0xc0 | (prev >> 8) as u8, prev as u8]);
            b.extend_from_slice(&[
                0,
                1,
                0,
                1,
                0,
                0,
                0,
                60,
                0,
                4,
                10,
                0,
                (i >> 8) as u8,
                i as u8,
            ]);
            prev = at;
        }
        b
    }

    #[test]
    fn long_valid_pointer_chains_parse_and_overlong_names_do_not() {
        // 120 hops: a 243-byte name, still valid.
        let msg = parse(&chained_owners(120)).unwrap();
        assert_eq!(msg.addresses.len(), 120);
        assert_eq!(msg.addresses[119], v4(10, 0, 0, 119));
        // 130 hops make the last owner name longer than 255 bytes.
        malformed(&chained_owners(130));
    }

    /// Worst case for pointer chasing: a 64 KiB message whose records all
    /// point at the end of a chain of pure pointers (each one hop back).
    fn pointer_bomb() -> Vec<u8> {
        let chain = 30_000usize;
        let records = (MAX_TCP_MESSAGE - 12 - 11 - chain) / 16;
        let mut b = vec![
            0,
            1,
            0x81,
            0x80,
            0,
            0,
            ((records + 1) >> 8) as u8,
            (records + 1) as u8,
            0,
            0,
            0,
            0,
        ];
        // Record 0: root owner, private type, rdata = a root label then the chain.
        b.extend_from_slice(&[0, 0xff, 0x00, 0, 1, 0, 0, 0, 0]);
        b.extend_from_slice(&(chain as u16).to_be_bytes());
        let base = b.len();
        b.push(0);
        b.push(0); // padding so that pointers start on an even offset
        let mut p = base;
        while b.len() + 2 <= base + chain {
            let at = b.len();
            b.extend_from_slice(&[0xc0 | (p >> 8) as u8, p as u8]);
            p = at;
        }
        b.resize(base + chain, 0);
        for _ in 0..records {
            b.extend_from_slice(&[
                0xc0 | (p >> 8) as u8,
                p as u8,
                0,
                1,
                0,
                1,
                0,
                0,
                0,
                60,
                0,
                4,
                1,
                2,
                3,
                4,
            ]);
        }
        b
    }

    #[test]
    fn pointer_chain_bomb_is_bounded() {
        let bomb = pointer_bomb();
        assert!(bomb.len() <= MAX_TCP_MESSAGE);
        // The work is bounded by the record cap, checked below; no wall-clock
        // assertion (an unoptimised build on a busy machine made one flaky).
        assert!(matches!(parse(&bomb), Err(DnsError::Malformed(_))));
        let (partial, err) = parse_prefix(&bomb).unwrap();
        // Record 0 (the chain) and 255 A records decoded, the rest refused.
        assert_eq!(partial.addresses.len(), MAX_RECORDS - 1);
        assert!(matches!(err, Some(DnsError::Malformed(_))));
    }

    #[test]
    fn record_limit() {
        let flat = |records: usize| {
            let mut b = vec![
                0,
                1,
                0x81,
                0x80,
                0,
                1,
                (records >> 8) as u8,
                records as u8,
                0,
                0,
                0,
                0,
            ];
            b.extend_from_slice(&[1, b'a', 0, 0, 1, 0, 1]);
            for i in 0..records {
                b.extend_from_slice(&[
                    0xc0,
                    12,
                    0,
                    1,
                    0,
                    1,
                    0,
                    0,
                    0,
                    60,
                    0,
                    4,
                    10,
                    0,
                    (i >> 8) as u8,
                    i as u8,
                ]);
            }
            b
        };
        assert_eq!(
            parse(&flat(MAX_RECORDS)).unwrap().addresses.len(),
            MAX_RECORDS
        );
        assert!(matches!(
            parse(&flat(MAX_RECORDS + 1)),
            Err(DnsError::Malformed(_))
        ));
        let (partial, err) = parse_prefix(&flat(MAX_RECORDS + 1)).unwrap();
        assert_eq!(partial.addresses.len(), MAX_RECORDS);
        assert!(err.is_some());
    }

    // ---- TCP framing ----

    fn framed(msgs: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in msgs {
            out.extend_from_slice(&(m.len() as u16).to_be_bytes());
            out.extend_from_slice(m);
        }
        out
    }

    fn feed_all(f: &mut TcpFramer, b: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        f.feed(b, b.len() as u32, &mut out).unwrap();
        out
    }

    #[test]
    fn tcp_one_and_two_messages_per_piece() {
        let mut f = TcpFramer::new();
        assert_eq!(
            feed_all(&mut f, &framed(&[A_QUERY])),
            vec![A_QUERY.to_vec()]
        );
        assert_eq!(
            feed_all(&mut f, &framed(&[A_RESPONSE, AAAA_RESPONSE])),
            vec![A_RESPONSE.to_vec(), AAAA_RESPONSE.to_vec()]
        );
        assert_eq!(f.buffered(), 0);
        assert!(f.in_sync());
    }

    #[test]
    fn tcp_split_at_every_point_and_byte_by_byte() {
        let stream = framed(&[A_RESPONSE, CNAME_CHAIN_RESPONSE, NXDOMAIN_RESPONSE]);
        let want = vec![
            A_RESPONSE.to_vec(),
            CNAME_CHAIN_RESPONSE.to_vec(),
            NXDOMAIN_RESPONSE.to_vec(),
        ];
        for cut in 0..=stream.len() {
            let mut f = TcpFramer::new();
            let mut out = feed_all(&mut f, &stream[..cut]);
            out.extend(feed_all(&mut f, &stream[cut..]));
            assert_eq!(out, want, "cut at {cut}");
        }
        let mut f = TcpFramer::new();
        let mut out = Vec::new();
        for b in &stream {
            out.extend(feed_all(&mut f, std::slice::from_ref(b)));
        }
        assert_eq!(out, want);
    }

    #[test]
    fn tcp_gap_inside_a_message_drops_it_and_keeps_framing() {
        let stream = framed(&[CNAME_CHAIN_RESPONSE, A_RESPONSE]);
        let mut f = TcpFramer::new();
        let mut out = Vec::new();
        // First piece: the whole first message moved, only 50 bytes captured.
        let first = 2 + CNAME_CHAIN_RESPONSE.len();
        assert_eq!(
            f.feed(&stream[..50], first as u32, &mut out),
            Err(DnsError::Gap)
        );
        assert!(out.is_empty());
        assert!(f.in_sync());
        assert_eq!(f.buffered(), 0);
        f.feed(&stream[first..], (stream.len() - first) as u32, &mut out)
            .unwrap();
        assert_eq!(out, vec![A_RESPONSE.to_vec()]);
        assert_eq!(f.lost_messages(), 1);

        // The gap ends inside the message: the rest is skipped exactly.
        let mut f = TcpFramer::new();
        let mut out = Vec::new();
        assert_eq!(f.feed(&stream[..30], 100, &mut out), Err(DnsError::Gap));
        f.feed(&stream[100..], (stream.len() - 100) as u32, &mut out)
            .unwrap();
        assert_eq!(out, vec![A_RESPONSE.to_vec()]);
    }

    #[test]
    fn tcp_gap_over_a_boundary_desyncs_then_resyncs() {
        let stream = framed(&[A_RESPONSE, AAAA_RESPONSE]);
        let mut f = TcpFramer::new();
        let mut out = Vec::new();
        // Both messages in one write, only 20 bytes captured: the second
        // message's prefix is in the gap.
        assert_eq!(
            f.feed(&stream[..20], stream.len() as u32, &mut out),
            Err(DnsError::Desync)
        );
        assert!(!f.in_sync());
        // Garbage and a piece from the middle of a message are discarded.
        f.feed(
            &[
                0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
            ],
            17,
            &mut out,
        )
        .unwrap();
        f.feed(&A_RESPONSE[10..], (A_RESPONSE.len() - 10) as u32, &mut out)
            .unwrap();
        assert!(out.is_empty());
        assert!(!f.in_sync());
        // A piece that starts with a whole framed message resyncs.
        let next = framed(&[NXDOMAIN_RESPONSE]);
        f.feed(&next, next.len() as u32, &mut out).unwrap();
        assert_eq!(out, vec![NXDOMAIN_RESPONSE.to_vec()]);
        assert!(f.in_sync());
        assert_eq!(f.resyncs(), 1);

        // A gap right at a boundary (a whole uncaptured write) also loses the framing.
        let mut f = TcpFramer::new();
        assert_eq!(f.feed(&[], 40, &mut out), Err(DnsError::Desync));
    }

    #[test]
    fn tcp_prefix_written_alone_then_body() {
        let mut f = TcpFramer::new();
        let mut out = feed_all(&mut f, &(A_QUERY.len() as u16).to_be_bytes());
        assert!(out.is_empty());
        out.extend(feed_all(&mut f, A_QUERY));
        assert_eq!(out, vec![A_QUERY.to_vec()]);
    }

    #[test]
    fn tcp_impossible_length_and_overlong_capture() {
        let mut f = TcpFramer::new();
        let mut out = Vec::new();
        assert!(matches!(
            f.feed(&[0, 3, 1, 2, 3], 5, &mut out),
            Err(DnsError::Malformed(_))
        ));
        assert!(!f.in_sync());
        // Captured bytes beyond what the call moved are ignored.
        let mut f = TcpFramer::new();
        let stream = framed(&[A_QUERY]);
        let mut longer = stream.clone();
        longer.extend_from_slice(&[0, 40, 9, 9, 9]);
        f.feed(&longer, stream.len() as u32, &mut out).unwrap();
        assert_eq!(out, vec![A_QUERY.to_vec()]);
        assert!(f.in_sync() && f.buffered() == 0);
    }

    #[test]
    fn tcp_largest_message_is_buffered_and_bounded() {
        let mut big = vec![0u8; MAX_TCP_MESSAGE];
        big[..12].copy_from_slice(&[0, 1, 0x81, 0x80, 0, 0, 0, 0, 0, 0, 0, 0]);
        let stream = framed(&[&big]);
        let mut f = TcpFramer::new();
        let mut out = Vec::new();
        for piece in stream.chunks(1000) {
            f.feed(piece, piece.len() as u32, &mut out).unwrap();
            assert!(f.buffered() <= MAX_TCP_MESSAGE);
        }
        assert_eq!(out, vec![big]);
        assert_eq!(f.buffered(), 0);
    }

    // ---- lookups ----

    const SOCK: u64 = 0xffff_8880_1234_5600;

    fn query_msg(id: u16, qname: &str, qtype: &str) -> Message {
        Message {
            id,
            response: false,
            rcode: "NOERROR".into(),
            truncated: false,
            question: Some(q(qname, qtype)),
            addresses: vec![],
        }
    }

    fn response_msg(
        id: u16,
        qname: &str,
        qtype: &str,
        rcode: &str,
        addresses: Vec<IpAddr>,
    ) -> Message {
        Message {
            id,
            response: true,
            rcode: rcode.into(),
            truncated: false,
            question: Some(q(qname, qtype)),
            addresses,
        }
    }

    fn send(t: &mut LookupTracker, sock: u64, ts: u64, m: &Message) -> Option<Lookup> {
        t.on_message(sock, 100, 101, Transport::Udp, true, ts, m)
    }

    fn recv(t: &mut LookupTracker, sock: u64, ts: u64, m: &Message) -> Option<Lookup> {
        t.on_message(sock, 100, 101, Transport::Udp, false, ts, m)
    }

    #[test]
    fn query_then_response_from_real_bytes() {
        let mut t = LookupTracker::new(16);
        assert!(send(&mut t, SOCK, 1_000, &parse(A_QUERY).unwrap()).is_none());
        assert_eq!(t.pending(), 1);
        let l = recv(&mut t, SOCK, 5_000, &parse(A_RESPONSE).unwrap()).expect("completed");
        assert_eq!(
            (l.sock, l.tgid, l.tid, l.id, l.transport),
            (SOCK, 100, 101, 0x8a1f, Transport::Udp)
        );
        assert_eq!(l.question, q("example.com", "A"));
        assert_eq!(
            (l.first_query_ns, l.last_query_ns, l.attempts),
            (1_000, 1_000, 1)
        );
        let a = l.response.unwrap();
        assert_eq!(
            (a.ts_ns, a.rcode.as_str(), a.truncated),
            (5_000, "NOERROR", false)
        );
        assert_eq!(
            a.addresses,
            vec![v4(23, 192, 228, 80), v4(23, 192, 228, 84)]
        );
        assert_eq!(t.pending(), 0);
        assert_eq!(t.counters(), LookupCounters::default());
    }

    #[test]
    fn retries_count_attempts() {
        let mut t = LookupTracker::new(16);
        let m = query_msg(7, "db.internal", "A");
        send(&mut t, SOCK, 1_000, &m);
        send(&mut t, SOCK, 5_001_000, &m);
        send(&mut t, SOCK, 10_001_000, &m);
        assert_eq!(t.pending(), 1);
        let l = recv(
            &mut t,
            SOCK,
            10_002_000,
            &response_msg(7, "db.internal", "A", "NOERROR", vec![v4(10, 1, 1, 1)]),
        )
        .unwrap();
        assert_eq!(
            (l.first_query_ns, l.last_query_ns, l.attempts),
            (1_000, 10_001_000, 3)
        );
        // A second copy of the response has nothing left to answer.
        assert!(
            recv(
                &mut t,
                SOCK,
                10_003_000,
                &response_msg(7, "db.internal", "A", "NOERROR", vec![])
            )
            .is_none()
        );
        assert_eq!(t.counters().responses_without_query, 1);
    }

    #[test]
    fn a_and_aaaa_in_parallel_on_one_socket() {
        let mut t = LookupTracker::new(16);
        send(&mut t, SOCK, 100, &query_msg(0x1111, "svc.local", "A"));
        send(&mut t, SOCK, 110, &query_msg(0x2222, "svc.local", "AAAA"));
        assert_eq!(t.pending(), 2);
        let v6: IpAddr = "fd00::5".parse().unwrap();
        let aaaa = recv(
            &mut t,
            SOCK,
            300,
            &response_msg(0x2222, "svc.local", "AAAA", "NOERROR", vec![v6]),
        )
        .unwrap();
        let a = recv(
            &mut t,
            SOCK,
            400,
            &response_msg(0x1111, "svc.local", "A", "NOERROR", vec![v4(10, 0, 0, 5)]),
        )
        .unwrap();
        assert_eq!(
            (aaaa.question.qtype.as_str(), aaaa.first_query_ns),
            ("AAAA", 110)
        );
        assert_eq!(aaaa.response.unwrap().addresses, vec![v6]);
        assert_eq!((a.question.qtype.as_str(), a.first_query_ns), ("A", 100));
        assert_eq!(a.response.unwrap().ts_ns, 400);
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn same_id_other_question_is_not_a_match() {
        let mut t = LookupTracker::new(16);
        send(&mut t, SOCK, 100, &query_msg(42, "a.example", "A"));
        assert!(
            recv(
                &mut t,
                SOCK,
                200,
                &response_msg(42, "evil.example", "A", "NOERROR", vec![v4(6, 6, 6, 6)])
            )
            .is_none()
        );
        assert!(
            recv(
                &mut t,
                SOCK,
                200,
                &response_msg(42, "a.example", "AAAA", "NOERROR", vec![])
            )
            .is_none()
        );
        assert_eq!(t.counters().mismatched_question, 2);
        assert_eq!(t.pending(), 1);
        // Other socket, same id: not this lookup's answer either.
        assert!(
            recv(
                &mut t,
                SOCK + 1,
                250,
                &response_msg(42, "a.example", "A", "NOERROR", vec![])
            )
            .is_none()
        );
        assert_eq!(t.counters().responses_without_query, 1);
        // The real answer (name case randomised by the resolver) matches.
        let l = recv(
            &mut t,
            SOCK,
            300,
            &response_msg(42, "A.eXample", "A", "NOERROR", vec![v4(1, 2, 3, 4)]),
        )
        .unwrap();
        assert_eq!(l.question.name, "a.example");
        // Same id, two different questions pending: each answer finds its own.
        send(&mut t, SOCK, 400, &query_msg(9, "one.example", "A"));
        send(&mut t, SOCK, 401, &query_msg(9, "two.example", "A"));
        assert_eq!(t.pending(), 2);
        let two = recv(
            &mut t,
            SOCK,
            500,
            &response_msg(9, "two.example", "A", "NXDOMAIN", vec![]),
        )
        .unwrap();
        assert_eq!(two.question.name, "two.example");
        assert_eq!(t.pending(), 1);
    }

    #[test]
    fn response_without_question_matches_a_single_pending_lookup() {
        let mut t = LookupTracker::new(16);
        send(&mut t, SOCK, 100, &query_msg(5, "x.example", "A"));
        let mut formerr = response_msg(5, "", "", "FORMERR", vec![]);
        formerr.question = None;
        let l = recv(&mut t, SOCK, 200, &formerr).unwrap();
        assert_eq!(l.response.unwrap().rcode, "FORMERR");
        // Ambiguous: two pending with id 6.
        send(&mut t, SOCK, 300, &query_msg(6, "y.example", "A"));
        send(&mut t, SOCK, 301, &query_msg(6, "z.example", "A"));
        formerr.id = 6;
        assert!(recv(&mut t, SOCK, 400, &formerr).is_none());
        assert_eq!(t.counters().mismatched_question, 1);
    }

    #[test]
    fn server_side_messages_are_ignored() {
        let mut t = LookupTracker::new(16);
        // The process received a query and sent the response: it is a server.
        assert!(recv(&mut t, SOCK, 100, &query_msg(1, "a.example", "A")).is_none());
        assert!(
            send(
                &mut t,
                SOCK,
                200,
                &response_msg(1, "a.example", "A", "NOERROR", vec![])
            )
            .is_none()
        );
        assert_eq!(t.pending(), 0);
        assert_eq!(t.counters().server_side_messages, 2);
        assert_eq!(t.counters().responses_without_query, 0);
        // A query without a question is not a lookup.
        let mut empty = query_msg(2, "", "");
        empty.question = None;
        send(&mut t, SOCK, 300, &empty);
        assert_eq!((t.pending(), t.counters().queries_without_question), (0, 1));
    }

    #[test]
    fn truncated_udp_answer_then_tcp_lookup() {
        let mut t = LookupTracker::new(16);
        send(&mut t, SOCK, 100, &query_msg(3, "big.example", "TXT"));
        let mut tc = response_msg(3, "big.example", "TXT", "NOERROR", vec![]);
        tc.truncated = true;
        let udp = recv(&mut t, SOCK, 200, &tc).unwrap();
        assert!(udp.response.unwrap().truncated);
        let tcp_sock = SOCK + 0x100;
        assert!(
            t.on_message(
                tcp_sock,
                100,
                101,
                Transport::Tcp,
                true,
                300,
                &query_msg(3, "big.example", "TXT")
            )
            .is_none()
        );
        let tcp = t
            .on_message(
                tcp_sock,
                100,
                101,
                Transport::Tcp,
                false,
                400,
                &response_msg(3, "big.example", "TXT", "NOERROR", vec![]),
            )
            .unwrap();
        assert_eq!(
            (tcp.transport, tcp.attempts, tcp.first_query_ns),
            (Transport::Tcp, 1, 300)
        );
        assert!(!tcp.response.unwrap().truncated);
    }

    #[test]
    fn timeouts_expire_unanswered_lookups() {
        let mut t = LookupTracker::new(16);
        let sec = 1_000_000_000u64;
        send(&mut t, SOCK, sec, &query_msg(1, "slow.example", "A"));
        send(&mut t, SOCK, 2 * sec, &query_msg(2, "retried.example", "A"));
        send(&mut t, SOCK, 6 * sec, &query_msg(2, "retried.example", "A"));
        let mut out = Vec::new();
        t.expire(5 * sec, 5 * sec, &mut out);
        assert!(out.is_empty(), "{out:?}");
        t.expire(6 * sec, 5 * sec, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].id, out[0].attempts, out[0].response.is_none()),
            (1, 1, true)
        );
        out.clear();
        // The retry moved the deadline of id 2 to 11 s.
        t.expire(10 * sec, 5 * sec, &mut out);
        assert!(out.is_empty());
        t.expire(11 * sec, 5 * sec, &mut out);
        assert_eq!(
            (
                out[0].id,
                out[0].attempts,
                out[0].first_query_ns,
                out[0].last_query_ns
            ),
            (2, 2, 2 * sec, 6 * sec)
        );
        assert_eq!(t.pending(), 0);
        // A late answer after expiry is just counted.
        assert!(
            recv(
                &mut t,
                SOCK,
                12 * sec,
                &response_msg(1, "slow.example", "A", "NOERROR", vec![])
            )
            .is_none()
        );
        assert_eq!(t.counters().responses_without_query, 1);
    }

    #[test]
    fn close_socket_and_process_exit() {
        let mut t = LookupTracker::new(16);
        send(&mut t, SOCK, 100, &query_msg(1, "a.example", "A"));
        send(&mut t, SOCK, 90, &query_msg(2, "a.example", "AAAA"));
        send(&mut t, SOCK + 8, 100, &query_msg(1, "b.example", "A"));
        t.on_message(
            SOCK + 16,
            200,
            201,
            Transport::Udp,
            true,
            100,
            &query_msg(1, "c.example", "A"),
        );
        let mut out = Vec::new();
        t.close_socket(SOCK, &mut out);
        assert_eq!(
            out.iter().map(|l| (l.sock, l.id)).collect::<Vec<_>>(),
            vec![(SOCK, 2), (SOCK, 1)]
        );
        assert_eq!(t.pending(), 2);
        out.clear();
        t.remove_process(200, &mut out);
        assert_eq!(
            out.iter()
                .map(|l| l.question.name.as_str())
                .collect::<Vec<_>>(),
            vec!["c.example"]
        );
        assert_eq!(t.pending(), 1);
        out.clear();
        t.close_socket(SOCK + 8, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn overflow_drops_the_oldest() {
        let mut t = LookupTracker::new(3);
        for id in 0..5u16 {
            send(
                &mut t,
                SOCK,
                u64::from(id),
                &query_msg(id, "n.example", "A"),
            );
        }
        assert_eq!(t.pending(), 3);
        assert_eq!(t.counters().dropped_overflow, 2);
        assert!(
            recv(
                &mut t,
                SOCK,
                10,
                &response_msg(0, "n.example", "A", "NOERROR", vec![])
            )
            .is_none()
        );
        assert!(
            recv(
                &mut t,
                SOCK,
                10,
                &response_msg(1, "n.example", "A", "NOERROR", vec![])
            )
            .is_none()
        );
        for id in 2..5u16 {
            assert!(
                recv(
                    &mut t,
                    SOCK,
                    10,
                    &response_msg(id, "n.example", "A", "NOERROR", vec![])
                )
                .is_some()
            );
        }
        // Retries do not take room.
        let mut t = LookupTracker::new(1);
        for ts in 0..10 {
            send(&mut t, SOCK, ts, &query_msg(1, "n.example", "A"));
        }
        assert_eq!((t.pending(), t.counters().dropped_overflow), (1, 0));
        let mut t = LookupTracker::new(0);
        send(&mut t, SOCK, 0, &query_msg(1, "n.example", "A"));
        assert_eq!((t.pending(), t.counters().dropped_overflow), (0, 1));
    }

    // ---- properties ----

    /// Inverse of `escape_name` (test only).
    fn unescape(s: &str) -> Vec<Vec<u8>> {
        if s == "." {
            return vec![];
        }
        let b = s.as_bytes();
        let mut labels = vec![Vec::new()];
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'.' => labels.push(Vec::new()),
                b'\\' => {
                    i += 1;
                    let c = b[i];
                    let byte = match c {
                        b't' => b'\t',
                        b'r' => b'\r',
                        b'n' => b'\n',
                        b'0'..=b'9' => {
                            let v = (c - b'0') as u32 * 100
                                + (b[i + 1] - b'0') as u32 * 10
                                + (b[i + 2] - b'0') as u32;
                            i += 2;
                            v as u8
                        }
                        other => other,
                    };
                    labels.last_mut().unwrap().push(byte);
                }
                c => labels.last_mut().unwrap().push(c),
            }
            i += 1;
        }
        labels
    }

    fn arb_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(|o| IpAddr::V4(Ipv4Addr::from(o))),
            any::<[u8; 16]>().prop_map(|o| IpAddr::V6(Ipv6Addr::from(o))),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse(&data);
            let _ = parse_prefix(&data);
        }

        #[test]
        fn mutated_real_packets_never_panic(
            which in 0usize..5,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let base = [A_RESPONSE, NXDOMAIN_RESPONSE, AAAA_RESPONSE, CNAME_CHAIN_RESPONSE, A_QUERY][which];
            let mut b = base.to_vec();
            for (at, v) in flips {
                let n = b.len();
                b[at % n] = v;
            }
            b.truncate(cut % (b.len() + 1));
            if let Ok(m) = parse(&b) {
                // Whatever decodes completely decodes the same way prefix-wise.
                prop_assert_eq!(parse_prefix(&b).unwrap(), (m, None));
            }
        }

        #[test]
        fn framer_never_panics_and_stays_bounded(
            pieces in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..300), 0u32..70_000), 0..12)
        ) {
            let mut f = TcpFramer::new();
            let mut out = Vec::new();
            let mut captured = 0usize;
            for (bytes, extra) in pieces {
                captured += bytes.len();
                let _ = f.feed(&bytes, bytes.len() as u32 + extra % 3 * (extra / 3), &mut out);
                prop_assert!(f.buffered() <= MAX_TCP_MESSAGE);
            }
            let emitted: usize = out.iter().map(|m| m.len() + 2).sum();
            prop_assert!(emitted <= captured);
            for m in &out {
                prop_assert!(m.len() >= HEADER_LEN && m.len() <= MAX_TCP_MESSAGE);
            }
        }

        #[test]
        fn framer_reassembles_any_split(
            which in proptest::collection::vec(0usize..4, 1..6),
            cuts in proptest::collection::vec(any::<usize>(), 0..10),
        ) {
            let all = [A_RESPONSE, NXDOMAIN_RESPONSE, AAAA_RESPONSE, CNAME_CHAIN_RESPONSE];
            let msgs: Vec<&[u8]> = which.iter().map(|&i| all[i]).collect();
            let stream = framed(&msgs);
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
            points.push(0);
            points.push(stream.len());
            points.sort_unstable();
            let mut f = TcpFramer::new();
            let mut out = Vec::new();
            for w in points.windows(2) {
                let piece = &stream[w[0]..w[1]];
                prop_assert!(f.feed(piece, piece.len() as u32, &mut out).is_ok());
            }
            prop_assert_eq!(out, msgs.iter().map(|m| m.to_vec()).collect::<Vec<_>>());
        }

        #[test]
        fn hickory_messages_round_trip(
            id in any::<u16>(),
            response in any::<bool>(),
            labels in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..20), 1..5),
            qtype in prop_oneof![Just(RecordType::A), Just(RecordType::AAAA), Just(RecordType::MX), Just(RecordType::Unknown(4000))],
            ips in proptest::collection::vec(arb_ip(), 0..6),
            rcode in 0u16..12,
        ) {
            let qname = Name::from_labels(labels.iter().map(|l| l.as_slice())).unwrap();
            let mut m = HMessage::new(id, if response { HType::Response } else { HType::Query }, HOp::Query);
            m.add_query(Query::query(qname.clone(), qtype));
            m.metadata.response_code = <ResponseCode as From<u16>>::from(rcode);
            for ip in &ips {
                let data = match ip {
                    IpAddr::V4(a) => RData::A(A(*a)),
                    IpAddr::V6(a) => RData::AAAA(AAAA(*a)),
                };
                m.add_answer(Record::from_rdata(qname.clone(), 30, data));
            }
            let parsed = parse(&m.to_vec().unwrap()).unwrap();
            prop_assert_eq!(parsed.id, id);
            prop_assert_eq!(parsed.response, response);
            prop_assert_eq!(&parsed.addresses, &ips);
            prop_assert_eq!(parsed.rcode, rcode_name(<ResponseCode as From<u16>>::from(rcode)).into_owned());
            let question = parsed.question.unwrap();
            prop_assert_eq!(question.qtype, type_name(qtype));
            prop_assert!(question.name.bytes().all(|b| (32..=126).contains(&b)));
            prop_assert_eq!(unescape(&question.name), labels);
        }

        #[test]
        fn tracker_stays_bounded(
            events in proptest::collection::vec((0u64..4, any::<u8>(), any::<bool>(), any::<bool>(), 0u8..3), 0..200)
        ) {
            let mut t = LookupTracker::new(8);
            let mut out = Vec::new();
            for (i, (sock, id, egress, response, qn)) in events.into_iter().enumerate() {
                let name = ["a.x", "b.x", "c.x"][usize::from(qn)];
                let m = if response {
                    response_msg(u16::from(id % 4), name, "A", "NOERROR", vec![])
                } else {
                    query_msg(u16::from(id % 4), name, "A")
                };
                if let Some(l) = t.on_message(sock, 1, 1, Transport::Udp, egress, i as u64, &m) {
                    prop_assert!(l.response.is_some());
                    prop_assert_eq!(l.sock, sock);
                }
                prop_assert!(t.pending() <= 8);
                if i % 17 == 0 {
                    t.expire(i as u64, 10, &mut out);
                }
            }
            prop_assert!(out.iter().all(|l| l.response.is_none()));
            t.close_socket(0, &mut out);
            t.remove_process(1, &mut out);
            prop_assert_eq!(t.pending(), 0);
            prop_assert_eq!(t.order.len(), 0);
        }
    }
}
