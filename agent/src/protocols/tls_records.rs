//! What the ciphertext says about a TLS handshake.
//!
//! Fed the first bytes a connection carried at the socket level (both
//! directions, in captured pieces of any size), [`HandshakeObserver`] finds
//! the ClientHello and the ServerHello, the first handshake message in each
//! direction, and reads from them the server name (SNI) and the negotiated
//! protocol version. Records and handshake messages are reassembled across
//! pieces and records; the content is decoded by `tls-parser`. After its
//! hello, each direction is watched for a plaintext alert (what a TLS 1.2
//! peer sends when it refuses a certificate, or a server refusing the
//! ClientHello's versions) until it turns to encrypted records; the bodies
//! of other records (certificates) are skipped, not buffered. Buffering is
//! bounded per direction; garbage, SSLv2-style hellos or a handshake that
//! does not fit make it give up, never panic.

use tls_parser::{
    SNIType, TlsAlertDescription, TlsExtension, TlsMessage, TlsMessageHandshake, TlsRecordType,
    parse_tls_client_hello_extensions, parse_tls_message_handshake, parse_tls_raw_record,
    parse_tls_server_hello_extensions,
};

/// Bytes kept per direction before the hello message is complete.
pub const MAX_BUFFERED_PER_DIRECTION: usize = 16 * 1024;

/// Record type, version and handshake type of a ClientHello's first record.
const RECORD_CHANGE_CIPHER_SPEC: u8 = 0x14;
const RECORD_ALERT: u8 = 0x15;
const RECORD_HANDSHAKE: u8 = 0x16;
#[cfg(test)]
const RECORD_APPLICATION_DATA: u8 = 0x17;
const ALERT_LEVEL_FATAL: u8 = 2;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const HANDSHAKE_SERVER_HELLO: u8 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TlsVersion {
    Tls10,
    Tls11,
    Tls12,
    Tls13,
}

impl TlsVersion {
    /// The version as `network.protocol.version`/`tls.protocol.version` write it.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsVersion::Tls10 => "1.0",
            TlsVersion::Tls11 => "1.1",
            TlsVersion::Tls12 => "1.2",
            TlsVersion::Tls13 => "1.3",
        }
    }

    /// From the wire value (TLS 1.3 drafts `0x7fXX` count as 1.3; SSL 3.0
    /// and unknown values are `None`).
    pub fn from_wire(value: u16) -> Option<Self> {
        match value {
            0x0301 => Some(TlsVersion::Tls10),
            0x0302 => Some(TlsVersion::Tls11),
            0x0303 => Some(TlsVersion::Tls12),
            0x0304 => Some(TlsVersion::Tls13),
            0x7f00..=0x7fff => Some(TlsVersion::Tls13),
            _ => None,
        }
    }
}

/// Cheap check of a connection's first bytes: a handshake record (0x16) of
/// record version 3.x (x <= 4) whose first message is a ClientHello (1).
/// Whether bytes start a TLS handshake record carrying a hello (client or
/// server), or are a handshake record header alone.
pub fn starts_tls_record(bytes: &[u8]) -> bool {
    match bytes {
        [RECORD_HANDSHAKE, 0x03, minor, _, _] => *minor <= 0x04,
        [RECORD_HANDSHAKE, 0x03, minor, _, _, 1 | 2, ..] => *minor <= 0x04,
        _ => false,
    }
}

#[cfg(test)]
pub fn looks_like_tls_client_hello(first_bytes: &[u8]) -> bool {
    matches!(
        first_bytes,
        [RECORD_HANDSHAKE, 0x03, minor, _, _, HANDSHAKE_CLIENT_HELLO, ..] if *minor <= 0x04
    )
}

/// A TLS alert seen in plaintext.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsAlert {
    pub level: u8,
    pub description: u8,
    /// Sent by this process (egress), or received from its peer.
    pub sent: bool,
}

impl TlsAlert {
    pub fn fatal(&self) -> bool {
        self.level == ALERT_LEVEL_FATAL
    }

    /// The description as RFC 8446 section 6 names it (`unknown_ca`), from
    /// `tls-parser`'s names; unknown codes as `alert_<code>`.
    pub fn description_name(&self) -> String {
        let code = TlsAlertDescription(self.description);
        let camel = format!("{code}");
        if camel.starts_with("TlsAlertDescription") {
            return format!("alert_{}", self.description);
        }
        let mut name = String::with_capacity(camel.len() + 4);
        for (i, c) in camel.chars().enumerate() {
            if c.is_ascii_uppercase() {
                if i > 0 {
                    name.push('_');
                }
                name.push(c.to_ascii_lowercase());
            } else {
                name.push(c);
            }
        }
        name
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reassembling the direction's first handshake message.
    #[default]
    Hello,
    /// Past the hello, records still in plaintext: watched for an alert.
    Plaintext,
    /// Encrypted records, a fatal alert, or this side gave up: further
    /// bytes are ignored.
    Finished,
}

/// Reassembly state of one direction.
#[derive(Debug, Default)]
struct Direction {
    /// Bytes received and not yet cut into whole records (in the plaintext
    /// phase: at most a record header and an alert's two bytes).
    records: Vec<u8>,
    /// Payload of the handshake records seen so far, in order.
    handshake: Vec<u8>,
    /// Bytes of the current record's body still to skip (plaintext phase).
    skip: usize,
    phase: Phase,
}

/// Per-connection observer of the TLS handshake: feed it the bytes seen in
/// both directions, read the version and SNI once it is done.
#[derive(Debug, Default)]
pub struct HandshakeObserver {
    /// Index 0: ingress, 1: egress.
    directions: [Direction; 2],
    version: Option<TlsVersion>,
    sni: Option<String>,
    client_hello_seen: bool,
    server_hello_seen: bool,
    alert: Option<TlsAlert>,
    failed: Option<&'static str>,
}

impl HandshakeObserver {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes this process sent (`egress`) or received. Whichever
    /// direction starts with a ClientHello is the client's; the ServerHello is
    /// taken from the other. Cheap once [`done`](Self::done).
    pub fn feed(&mut self, egress: bool, bytes: &[u8]) {
        if bytes.is_empty() || self.done() {
            return;
        }
        let index = usize::from(egress);
        match self.directions[index].phase {
            Phase::Finished => return,
            Phase::Plaintext => return self.scan_plaintext(index, bytes),
            Phase::Hello => {}
        }
        let direction = &mut self.directions[index];
        if direction.records.len() + direction.handshake.len() + bytes.len()
            > MAX_BUFFERED_PER_DIRECTION
        {
            self.give_up(index, "handshake larger than the buffering limit");
            return;
        }
        direction.records.extend_from_slice(bytes);
        if let Err(reason) = self.advance(index) {
            self.give_up(index, reason);
        }
    }

    /// The negotiated version, once the ServerHello was seen: from its
    /// supported_versions extension (TLS 1.3), else its legacy version.
    pub fn version(&self) -> Option<TlsVersion> {
        self.version
    }

    /// The server_name the ClientHello asked for, if seen.
    pub fn sni(&self) -> Option<&str> {
        self.sni.as_deref()
    }

    pub fn take_sni(&mut self) -> Option<String> {
        self.sni.take()
    }

    /// The first fatal alert seen in plaintext (else the first warning).
    pub fn alert(&self) -> Option<TlsAlert> {
        self.alert
    }

    /// Nothing more to learn: both directions turned to encrypted records
    /// after their hellos, a fatal alert was seen, or the observer gave up.
    pub fn done(&self) -> bool {
        self.failed.is_some()
            || self.alert.is_some_and(|a| a.fatal())
            || (self.client_hello_seen
                && self.server_hello_seen
                && self.directions.iter().all(|d| d.phase == Phase::Finished))
    }

    /// Why the observer gave up (not TLS, malformed, too big), if it did.
    #[allow(dead_code)] // for debug logs and counters; used by the tests so far
    pub fn gave_up(&self) -> Option<&'static str> {
        self.failed
    }

    fn give_up(&mut self, index: usize, reason: &'static str) {
        self.finish(index);
        self.failed.get_or_insert(reason);
    }

    fn finish(&mut self, index: usize) {
        let direction = &mut self.directions[index];
        direction.phase = Phase::Finished;
        direction.records = Vec::new();
        direction.handshake = Vec::new();
    }

    fn note_alert(&mut self, index: usize, level: u8, description: u8) {
        let alert = TlsAlert { level, description, sent: index == 1 };
        match self.alert {
            Some(seen) if seen.fatal() || !alert.fatal() => {}
            _ => self.alert = Some(alert),
        }
        if alert.fatal() {
            self.finish(index);
        }
    }

    /// Past the hello: skips record bodies, notes plaintext alerts, and
    /// stops at the first encrypted record (application data, or for TLS
    /// 1.2 and older a ChangeCipherSpec; TLS 1.3's is only a formality).
    fn scan_plaintext(&mut self, index: usize, mut bytes: &[u8]) {
        while self.directions[index].phase == Phase::Plaintext {
            let direction = &mut self.directions[index];
            if direction.skip > 0 {
                let n = direction.skip.min(bytes.len());
                direction.skip -= n;
                bytes = &bytes[n..];
            }
            if bytes.is_empty() {
                return;
            }
            let have = direction.records.len();
            let want = match direction.records.first() {
                Some(&RECORD_ALERT) if direction.records.get(3..5) == Some(&[0, 2]) => 7,
                _ => 5,
            };
            let take = (want - have.min(want)).min(bytes.len());
            direction.records.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if direction.records.len() < want {
                continue;
            }
            if let Err(reason) = check_record_header(&direction.records) {
                return self.give_up(index, reason);
            }
            let header = std::mem::take(&mut direction.records);
            let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
            match header[0] {
                RECORD_ALERT if length == 2 && header.len() == 7 => {
                    self.note_alert(index, header[5], header[6]);
                }
                // A 2-byte alert waits for its body; longer ones are encrypted.
                RECORD_ALERT if length == 2 => {
                    self.directions[index].records = header;
                }
                RECORD_ALERT | RECORD_HANDSHAKE => self.directions[index].skip = length,
                RECORD_CHANGE_CIPHER_SPEC
                    if self.version.is_some_and(|v| v != TlsVersion::Tls13) =>
                {
                    self.finish(index)
                }
                RECORD_CHANGE_CIPHER_SPEC => self.directions[index].skip = length,
                // Application data (0x17) or heartbeat: encrypted from here.
                _ => self.finish(index),
            }
        }
    }

    /// Cuts whole records off the direction's buffer and handles its first
    /// handshake message once it is complete.
    fn advance(&mut self, index: usize) -> Result<(), &'static str> {
        let direction = &mut self.directions[index];
        let mut consumed = 0;
        loop {
            let rest = &direction.records[consumed..];
            if rest.is_empty() {
                break;
            }
            // Validate the header as soon as its first bytes arrive, so
            // garbage and SSLv2 hellos (high bit set in byte 0) are rejected
            // without waiting for a "record" of garbage length.
            check_record_header(rest)?;
            let record = match parse_tls_raw_record(rest) {
                Ok((_, record)) => record,
                Err(tls_parser::nom::Err::Incomplete(_)) => break,
                Err(_) => return Err("malformed TLS record"),
            };
            consumed += 5 + record.data.len();
            if record.hdr.record_type == TlsRecordType::Alert
                && direction.handshake.is_empty()
                && let [level, description] = *record.data
            {
                // A peer refusing the other side's hello answers with an
                // alert instead of its own.
                self.note_alert(index, level, description);
                self.finish(index);
                return Ok(());
            }
            if record.hdr.record_type != TlsRecordType::Handshake {
                // ChangeCipherSpec or application data before this side's
                // hello: nothing to learn here.
                return Err("no hello before a non-handshake record");
            }
            direction.handshake.extend_from_slice(record.data);
            if let Some(length) = complete_message_len(&direction.handshake)? {
                let message = std::mem::take(&mut direction.handshake);
                let mut rest = std::mem::take(&mut direction.records);
                rest.drain(..consumed);
                direction.phase = Phase::Plaintext;
                self.on_first_message(&message[..length])?;
                self.scan_plaintext(index, &rest);
                return Ok(());
            }
        }
        direction.records.drain(..consumed);
        Ok(())
    }

    fn on_first_message(&mut self, message: &[u8]) -> Result<(), &'static str> {
        let parsed = match parse_tls_message_handshake(message) {
            Ok((_, TlsMessage::Handshake(parsed))) => parsed,
            _ => return Err("malformed handshake message"),
        };
        match parsed {
            TlsMessageHandshake::ClientHello(hello) => {
                self.client_hello_seen = true;
                if let Some(Ok((_, extensions))) = hello.ext.map(parse_tls_client_hello_extensions)
                {
                    self.sni = extensions.iter().find_map(|ext| match ext {
                        TlsExtension::SNI(names) => names
                            .iter()
                            .find(|(kind, _)| *kind == SNIType::HostName)
                            .and_then(|(_, name)| std::str::from_utf8(name).ok())
                            .map(str::to_owned),
                        _ => None,
                    });
                }
                Ok(())
            }
            TlsMessageHandshake::ServerHello(hello) => {
                self.server_hello_seen = true;
                let selected = match hello.ext.map(parse_tls_server_hello_extensions) {
                    None => None,
                    Some(Ok((_, extensions))) => extensions.iter().find_map(|ext| match ext {
                        TlsExtension::SupportedVersions(versions) => versions.first().map(|v| v.0),
                        _ => None,
                    }),
                    // Unreadable extensions: the legacy field could hide 1.3,
                    // so report nothing rather than something wrong.
                    Some(Err(_)) => return Err("malformed ServerHello extensions"),
                };
                self.version = TlsVersion::from_wire(selected.unwrap_or(hello.version.0));
                if self.version.is_none() {
                    return Err("unsupported protocol version (SSL 3.0 or unknown)");
                }
                Ok(())
            }
            TlsMessageHandshake::ServerHelloV13Draft18(hello) => {
                self.server_hello_seen = true;
                self.version = TlsVersion::from_wire(hello.version.0);
                Ok(())
            }
            _ => Err("the first handshake message is not a hello"),
        }
    }
}

/// Rejects bytes that cannot start a TLS record: an unknown content type, a
/// record version other than 3.0..3.4, or an over-long record (checked as
/// far as the bytes present allow).
fn check_record_header(bytes: &[u8]) -> Result<(), &'static str> {
    if let Some(&content_type) = bytes.first()
        && !(0x14..=0x18).contains(&content_type)
    {
        return Err("not a TLS record (SSLv2 hello or other protocol)");
    }
    if let Some(&major) = bytes.get(1)
        && major != 0x03
    {
        return Err("not a TLS record version");
    }
    if let Some(&minor) = bytes.get(2)
        && minor > 0x04
    {
        return Err("not a TLS record version");
    }
    if let Some(length) = bytes.get(3..5) {
        // A plaintext record carries at most 2^14 bytes (RFC 8446 5.1).
        if usize::from(u16::from_be_bytes([length[0], length[1]])) > 16 * 1024 {
            return Err("TLS record too long for a plaintext handshake record");
        }
    }
    Ok(())
}

/// Length (header included) of the first handshake message when all of it
/// is present; `Err` when even its header cannot be a hello.
fn complete_message_len(handshake: &[u8]) -> Result<Option<usize>, &'static str> {
    let Some(&kind) = handshake.first() else {
        return Ok(None);
    };
    if kind != HANDSHAKE_CLIENT_HELLO && kind != HANDSHAKE_SERVER_HELLO {
        return Err("the first handshake message is not a hello");
    }
    let Some(length) = handshake.get(1..4) else {
        return Ok(None);
    };
    let length =
        4 + (usize::from(length[0]) << 16 | usize::from(length[1]) << 8 | usize::from(length[2]));
    if length > MAX_BUFFERED_PER_DIRECTION {
        return Err("hello message larger than the buffering limit");
    }
    Ok((handshake.len() >= length).then_some(length))
}

#[cfg(test)]
mod start_tests {
    use super::*;

    #[test]
    fn server_hello_also_starts_tls_observation() {
        assert!(starts_tls_record(&[0x16, 0x03, 0x03, 0x00, 0x7a, 0x02, 0x00]));
        assert!(starts_tls_record(&[0x16, 0x03, 0x01, 0x01, 0x58, 0x01]));
        assert!(starts_tls_record(&[0x16, 0x03, 0x01, 0x01, 0x58]));
        assert!(!starts_tls_record(&[0x16, 0x03, 0x03, 0x00, 0x7a, 0x0b]));
        assert!(!starts_tls_record(b"HTTP/1.1 200 OK"));
    }

}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    macro_rules! fixture {
        ($name:literal) => {
            (
                include_bytes!(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests-data/tls/",
                    $name,
                    ".client.bin"
                )) as &[u8],
                include_bytes!(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests-data/tls/",
                    $name,
                    ".server.bin"
                )) as &[u8],
            )
        };
    }

    const TLS13: (&[u8], &[u8]) = fixture!("tls13");
    const TLS12: (&[u8], &[u8]) = fixture!("tls12");
    const TLS11: (&[u8], &[u8]) = fixture!("tls11");
    const TLS13_HRR: (&[u8], &[u8]) = fixture!("tls13_hrr");

    /// Feeds a client-side view: egress = what the client sent.
    fn observe_client_side((to_server, to_client): (&[u8], &[u8])) -> HandshakeObserver {
        let mut o = HandshakeObserver::new();
        o.feed(true, to_server);
        o.feed(false, to_client);
        o
    }

    #[test]
    fn tls13_version_and_sni() {
        let o = observe_client_side(TLS13);
        assert_eq!(o.version(), Some(TlsVersion::Tls13));
        assert_eq!(o.sni(), Some("example.test"));
        assert!(o.done());
        assert_eq!(o.gave_up(), None);
    }

    #[test]
    fn tls12_version_and_sni() {
        let o = observe_client_side(TLS12);
        assert_eq!(o.version(), Some(TlsVersion::Tls12));
        assert_eq!(o.sni(), Some("api.example.test"));
        assert!(o.done());
    }

    #[test]
    fn tls11_version() {
        let o = observe_client_side(TLS11);
        assert_eq!(o.version(), Some(TlsVersion::Tls11));
        assert_eq!(o.sni(), Some("old.example.test"));
    }

    #[test]
    fn tls13_after_hello_retry_request() {
        let o = observe_client_side(TLS13_HRR);
        assert_eq!(o.version(), Some(TlsVersion::Tls13));
        assert_eq!(o.sni(), Some("retry.example.test"));
    }

    #[test]
    fn server_side_view_is_the_same() {
        // On the server, the ClientHello is ingress and the ServerHello egress.
        for (fixture, version) in [(TLS13, TlsVersion::Tls13), (TLS12, TlsVersion::Tls12)] {
            let mut o = HandshakeObserver::new();
            o.feed(false, fixture.0);
            o.feed(true, fixture.1);
            assert_eq!(o.version(), Some(version));
            assert!(o.sni().is_some());
            assert!(o.done());
        }
    }

    #[test]
    fn server_hello_before_client_hello_still_works() {
        let mut o = HandshakeObserver::new();
        o.feed(false, TLS12.1);
        assert_eq!(o.version(), Some(TlsVersion::Tls12));
        assert!(!o.done(), "still waiting for the ClientHello");
        o.feed(true, TLS12.0);
        assert_eq!(o.sni(), Some("api.example.test"));
        assert!(o.done());
    }

    #[test]
    fn byte_at_a_time() {
        let mut o = HandshakeObserver::new();
        for &b in TLS13.0 {
            o.feed(true, &[b]);
        }
        assert_eq!(o.sni(), Some("example.test"));
        assert_eq!(o.version(), None);
        for &b in TLS13.1 {
            o.feed(false, &[b]);
        }
        assert_eq!(o.version(), Some(TlsVersion::Tls13));
    }

    /// Re-frames a direction's first handshake message into records of at
    /// most `chunk` payload bytes, as a TLS stack may for a big ClientHello.
    fn refragment(stream: &[u8], chunk: usize) -> Vec<u8> {
        assert_eq!(stream[0], RECORD_HANDSHAKE);
        let len = usize::from(u16::from_be_bytes([stream[3], stream[4]]));
        let payload = &stream[5..5 + len];
        let mut out = Vec::new();
        for piece in payload.chunks(chunk) {
            out.extend_from_slice(&[RECORD_HANDSHAKE, 0x03, 0x01]);
            out.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            out.extend_from_slice(piece);
        }
        out.extend_from_slice(&stream[5 + len..]);
        out
    }

    #[test]
    fn hello_spanning_several_records() {
        let client = refragment(TLS13.0, 37);
        assert!(looks_like_tls_client_hello(&client));
        let server = refragment(TLS12.1, 1);
        let mut o = HandshakeObserver::new();
        for piece in client.chunks(50) {
            o.feed(true, piece);
        }
        o.feed(false, &server);
        assert_eq!(o.sni(), Some("example.test"));
        assert_eq!(o.version(), Some(TlsVersion::Tls12));
    }

    #[test]
    fn client_hello_check() {
        assert!(looks_like_tls_client_hello(TLS13.0));
        assert!(looks_like_tls_client_hello(TLS12.0));
        assert!(!looks_like_tls_client_hello(TLS13.1), "a ServerHello");
        assert!(!looks_like_tls_client_hello(b"GET / HTTP/1.1\r\n"));
        assert!(!looks_like_tls_client_hello(&TLS13.0[..5]));
        assert!(!looks_like_tls_client_hello(&[]));
        // SSLv2-compatible hello: 2-byte length with the high bit, type 1.
        assert!(!looks_like_tls_client_hello(&[
            0x80, 0x2e, 0x01, 0x03, 0x01, 0x00
        ]));
    }

    #[test]
    fn gives_up_on_plaintext_http() {
        let mut o = HandshakeObserver::new();
        o.feed(true, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(o.done());
        assert!(o.gave_up().is_some());
        assert_eq!(o.version(), None);
        o.feed(false, TLS13.1);
        assert_eq!(o.version(), None, "done: later bytes are ignored");
    }

    #[test]
    fn gives_up_on_sslv2_hello() {
        let mut o = HandshakeObserver::new();
        o.feed(
            true,
            &[
                0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10,
            ],
        );
        assert!(o.done());
        assert!(o.gave_up().is_some());
    }

    #[test]
    fn a_server_answering_the_client_hello_with_an_alert() {
        let mut o = HandshakeObserver::new();
        o.feed(true, TLS13.0);
        o.feed(false, &[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x46]);
        assert!(o.done());
        assert_eq!(o.gave_up(), None);
        assert_eq!(o.version(), None);
        assert_eq!(o.sni(), Some("example.test"));
        let alert = o.alert().expect("the alert");
        assert_eq!((alert.fatal(), alert.sent), (true, false));
        assert_eq!(alert.description_name(), "protocol_version");
    }

    /// Bytes of the stream up to (not including) its first record of
    /// `record_type` after the first record.
    fn up_to_record(stream: &[u8], record_type: u8) -> &[u8] {
        let mut at = 0;
        while at + 5 <= stream.len() {
            if at > 0 && stream[at] == record_type {
                return &stream[..at];
            }
            at += 5 + usize::from(u16::from_be_bytes([stream[at + 3], stream[at + 4]]));
        }
        stream
    }

    #[test]
    fn tls12_client_refusing_the_certificate() {
        // The server's whole first flight (hello, certificate, ...), then
        // the client's answer: a plaintext fatal unknown_ca alert.
        let server_flight = up_to_record(TLS12.1, RECORD_CHANGE_CIPHER_SPEC);
        let client_hello = up_to_record(TLS12.0, RECORD_HANDSHAKE);
        let alert = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x30];
        for cut in [1, 3, 5, 6, 7] {
            // Client side: the alert is egress; server side: ingress.
            for client_is_egress in [true, false] {
                let mut o = HandshakeObserver::new();
                o.feed(client_is_egress, client_hello);
                for piece in server_flight.chunks(100) {
                    o.feed(!client_is_egress, piece);
                }
                assert_eq!(o.version(), Some(TlsVersion::Tls12));
                assert!(!o.done(), "still in plaintext both ways");
                o.feed(client_is_egress, &alert[..cut]);
                o.feed(client_is_egress, &alert[cut..]);
                let seen = o.alert().expect("the alert");
                assert_eq!(seen.description_name(), "unknown_ca");
                assert_eq!(seen.sent, client_is_egress);
                assert!(o.done());
            }
        }
    }

    #[test]
    fn encrypted_alerts_and_warnings_are_not_fatal_plaintext_alerts() {
        let client_hello = up_to_record(TLS12.0, RECORD_HANDSHAKE);
        let mut o = HandshakeObserver::new();
        o.feed(true, client_hello);
        o.feed(false, up_to_record(TLS12.1, RECORD_CHANGE_CIPHER_SPEC));
        // An encrypted alert is longer than two bytes: skipped.
        o.feed(true, &[0x15, 0x03, 0x03, 0x00, 0x1a]);
        o.feed(true, &[0xaa; 0x1a]);
        assert_eq!(o.alert(), None);
        // A warning is kept, but a later fatal alert replaces it.
        o.feed(true, &[0x15, 0x03, 0x03, 0x00, 0x02, 0x01, 0x70]);
        assert_eq!(o.alert().map(|a| a.description_name()), Some("unrecognized_name".into()));
        assert!(!o.done());
        o.feed(false, &[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x2a]);
        assert_eq!(o.alert().map(|a| (a.description_name(), a.sent)), Some(("bad_certificate".into(), false)));
        assert_eq!(TlsAlert { level: 2, description: 0xfe, sent: true }.description_name(), "alert_254");
    }

    #[test]
    fn tls13_ends_at_the_first_encrypted_record_and_ignores_what_follows() {
        // After the hellos and the first application-data record, an alert-
        // shaped record is ignored: it would be encrypted.
        let mut o = observe_client_side(TLS13);
        assert!(o.done());
        o.feed(true, &[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x30]);
        assert_eq!(o.alert(), None);
        // The dummy ChangeCipherSpec of 1.3 does not end the plaintext.
        let mut o = HandshakeObserver::new();
        o.feed(true, up_to_record(TLS13.0, RECORD_CHANGE_CIPHER_SPEC));
        o.feed(false, up_to_record(TLS13.1, RECORD_APPLICATION_DATA));
        assert!(!o.done());
        o.feed(false, &[0x17, 0x03, 0x03, 0x00, 0x01, 0x00]);
        o.feed(true, &[0x14, 0x03, 0x03, 0x00, 0x01, 0x01]);
        assert!(!o.done(), "client: only the dummy ChangeCipherSpec so far");
        o.feed(true, &[0x17, 0x03, 0x03, 0x00, 0x01, 0x00]);
        assert!(o.done());
        assert_eq!(o.alert(), None);
    }

    #[test]
    fn gives_up_past_the_buffer_limit() {
        // A handshake record announcing a hello that never completes.
        let mut o = HandshakeObserver::new();
        let mut first = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0xff, 0xff];
        first.resize(5 + 0x4000, 0);
        o.feed(true, &first);
        assert!(o.done());
        let mut o = HandshakeObserver::new();
        for _ in 0..=MAX_BUFFERED_PER_DIRECTION / 1000 {
            o.feed(true, &[0x16, 0x03, 0x01, 0x03, 0xe8]);
            o.feed(true, &[0u8; 1000][..]);
        }
        assert!(o.done());
    }

    #[test]
    fn truncated_hello_is_not_done() {
        let mut o = HandshakeObserver::new();
        o.feed(true, &TLS13.0[..100]);
        o.feed(false, &TLS13.1[..40]);
        assert!(!o.done());
        assert_eq!(o.version(), None);
        assert_eq!(o.sni(), None);
    }

    #[test]
    fn corrupted_hello_does_not_panic() {
        for i in 5..TLS13.1.len().min(200) {
            let mut server = TLS13.1.to_vec();
            server[i] ^= 0xff;
            let mut o = observe_client_side((TLS13.0, &server));
            o.feed(false, &server);
            let _ = (o.version(), o.sni(), o.done());
        }
    }

    #[test]
    fn version_strings() {
        assert_eq!(TlsVersion::Tls10.as_str(), "1.0");
        assert_eq!(TlsVersion::Tls11.as_str(), "1.1");
        assert_eq!(TlsVersion::Tls12.as_str(), "1.2");
        assert_eq!(TlsVersion::Tls13.as_str(), "1.3");
        assert_eq!(TlsVersion::from_wire(0x0300), None);
    }

    /// Cuts `bytes` at the given (sorted, deduplicated) points.
    fn split_at_points<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        points.sort_unstable();
        points.dedup();
        let mut pieces = Vec::new();
        let mut start = 0;
        for p in points {
            pieces.push(&bytes[start..p]);
            start = p;
        }
        pieces.push(&bytes[start..]);
        pieces
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(
            feeds in proptest::collection::vec((any::<bool>(), proptest::collection::vec(any::<u8>(), 0..600)), 0..8)
        ) {
            let mut o = HandshakeObserver::new();
            for (egress, bytes) in &feeds {
                o.feed(*egress, bytes);
                let _ = (o.version(), o.sni(), o.done());
            }
        }

        #[test]
        fn tls_shaped_garbage_never_panics(
            kind in prop_oneof![Just(1u8), Just(2u8), any::<u8>()],
            body in proptest::collection::vec(any::<u8>(), 0..400),
            cut in 0usize..500,
        ) {
            let len = body.len() + 4;
            let mut record = vec![0x16, 0x03, 0x03];
            record.extend_from_slice(&(len as u16).to_be_bytes());
            record.extend_from_slice(&[kind, 0, (body.len() >> 8) as u8, body.len() as u8]);
            record.extend_from_slice(&body);
            let mut o = HandshakeObserver::new();
            let cut = cut.min(record.len());
            o.feed(false, &record[..cut]);
            o.feed(false, &record[cut..]);
            let _ = (o.version(), o.sni(), o.done());
        }

        #[test]
        fn anything_after_the_hellos_never_panics_and_keeps_them(
            feeds in proptest::collection::vec((any::<bool>(), prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..300),
                (prop_oneof![Just(0x14u8), Just(0x15), Just(0x16), Just(0x17)], 0u16..40, proptest::collection::vec(any::<u8>(), 0..40))
                    .prop_map(|(kind, len, body)| {
                        let mut r = vec![kind, 0x03, 0x03];
                        r.extend_from_slice(&len.to_be_bytes());
                        r.extend_from_slice(&body);
                        r
                    }),
            ]), 0..10)
        ) {
            let mut o = HandshakeObserver::new();
            o.feed(true, up_to_record(TLS12.0, RECORD_HANDSHAKE));
            o.feed(false, up_to_record(TLS12.1, RECORD_CHANGE_CIPHER_SPEC));
            for (egress, bytes) in &feeds {
                o.feed(*egress, bytes);
                let _ = (o.alert().map(|a| a.description_name()), o.done());
            }
            prop_assert_eq!(o.version(), Some(TlsVersion::Tls12));
            prop_assert_eq!(o.sni(), Some("api.example.test"));
        }

        #[test]
        fn any_split_gives_the_same_result(
            which in 0usize..4,
            client_cuts in proptest::collection::vec(any::<usize>(), 0..12),
            server_cuts in proptest::collection::vec(any::<usize>(), 0..12),
            interleave in proptest::collection::vec(any::<bool>(), 0..30),
        ) {
            let (fixture, version, sni) = [
                (TLS13, TlsVersion::Tls13, "example.test"),
                (TLS12, TlsVersion::Tls12, "api.example.test"),
                (TLS11, TlsVersion::Tls11, "old.example.test"),
                (TLS13_HRR, TlsVersion::Tls13, "retry.example.test"),
            ][which];
            let mut client = split_at_points(fixture.0, &client_cuts).into_iter();
            let mut server = split_at_points(fixture.1, &server_cuts).into_iter();
            let mut o = HandshakeObserver::new();
            let mut order = interleave.into_iter();
            loop {
                // Client bytes first unless told otherwise.
                let from_server = order.next().unwrap_or(false);
                let next = if from_server { server.next().map(|p| (false, p)) } else { None }
                    .or_else(|| client.next().map(|p| (true, p)))
                    .or_else(|| server.next().map(|p| (false, p)));
                let Some((egress, piece)) = next else { break };
                o.feed(egress, piece);
            }
            prop_assert_eq!(o.version(), Some(version));
            prop_assert_eq!(o.sni(), Some(sni));
            prop_assert!(o.done());
        }
    }
}
