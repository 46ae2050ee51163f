//! HPACK (RFC 7541) header blocks through `loona-hpack`, with a lenient
//! layer for tables we did not see from their start.
//!
//! The crate does all the decoding (integers, strings, Huffman, the static
//! and dynamic tables). This module only:
//! * walks a block's representations (RFC 7541 §6: only the integer
//!   prefixes and string lengths, to find where each ends) and feeds the
//!   crate one representation at a time, table size updates grouped with
//!   the representation that follows them (a block ending with one is an
//!   error to the crate). Strict mode (a table seen from its start) stops at
//!   the first error, as the crate's whole-block decoding would, and the
//!   block is decoded again leniently from a fresh table. Lenient mode makes
//!   an index into the part of the peer's table we never saw one unknown
//!   field instead of failing the block;
//! * decodes Huffman-coded strings with `httlib-huffman` (a flattened table
//!   read 4 bits at a time) and feeds the literal with plain strings: the
//!   crate would build its Huffman table anew for every string (about 20 us
//!   each), and even a kept one walks the code bit by bit through hash maps;
//! * keeps the crate from panicking: `Decoder::set_max_table_size` asserts
//!   against the allowed maximum, so it is never called; the allowed maximum
//!   is set with `set_max_allowed_table_size` and table size updates from the
//!   wire above it fail strict decoding or are clamped (lenient).
//!
//! Why lenient decoding is sound: the peer's table and ours are both the
//! newest-first prefixes of the same insertion history, as long as we saw
//! every insertion since our table started empty (sizes may differ: a
//! smaller table is a shorter prefix). An index valid in both tables names
//! the same entry; an index beyond ours is unknown. A literal that inserts
//! an entry whose name we cannot read (its name index is beyond our table,
//! or its strings do not decode) inserts a placeholder entry instead (name
//! [`PLACEHOLDER_NAME`], which no legal peer can send), so that later
//! indices stay aligned; a field read through a placeholder is unknown.
//! When a block's insertions cannot all be followed (cut, capture gap,
//! malformed representation), the table is dropped for a fresh, empty one.

use std::cell::RefCell;

use loona_hpack::Decoder;
use loona_hpack::decoder::DecoderError;

/// Name of the placeholder entries the lenient layer inserts. A NUL byte is
/// not allowed in an HTTP/2 field name (RFC 9113 §8.2.1), so no legal peer
/// sends it; a field with this name is reported as unknown.
pub const PLACEHOLDER_NAME: &[u8] = b"\0?";

/// SETTINGS_HEADER_TABLE_SIZE's initial value (RFC 9113 §6.5.2).
pub const DEFAULT_TABLE_SIZE: usize = 4096;

/// Largest dynamic table we keep per direction, whatever the peers agree
/// on: a bigger announced size makes our table a shorter prefix of the
/// peer's (lenient mode), which is sound, only less complete.
pub const MAX_TABLE_SIZE: usize = 64 * 1024;

/// Literal, incremental indexing, placeholder name (2 raw octets "\0?").
const PLACEHOLDER_INSERT: [u8; 4] = [0x40, 0x02, 0x00, b'?'];

/// What a header block decodes to, field by field.
#[derive(Debug, PartialEq, Eq)]
pub enum Field<'a> {
    /// A field read from the static table, a literal or a dynamic entry we saw inserted.
    Known(&'a [u8], &'a [u8]),
    /// A field we cannot read: an index beyond the part of the table we
    /// know, or a placeholder entry, or strings that do not decode.
    Unknown,
    /// Forget the fields reported so far for this block: strict decoding
    /// failed and the block is decoded again, leniently.
    Restart,
}

/// One direction's HPACK decoder.
pub struct HpackDecoder {
    dec: Decoder<'static>,
    lenient: bool,
    /// Largest table size update accepted (strict) or applied (lenient).
    allowed: usize,
    /// Size updates waiting for the representation they are fed with.
    pending: Vec<u8>,
    /// One representation to feed (pending updates + a rewritten literal).
    rep: Vec<u8>,
    /// A literal rewritten with plain strings.
    lit: Vec<u8>,
    /// The blocks are responses: request-only fields are skipped undecoded.
    responses_only: bool,
}

impl HpackDecoder {
    /// A fresh decoder (empty dynamic table of the default size).
    pub fn new(lenient: bool) -> Self {
        let mut d = HpackDecoder {
            dec: Decoder::new(),
            lenient,
            allowed: DEFAULT_TABLE_SIZE,
            pending: Vec::new(),
            rep: Vec::new(),
            lit: Vec::new(),
            responses_only: false,
        };
        d.dec.set_max_allowed_table_size(d.allowed);
        d
    }

    /// Only response fields are read from this direction's blocks.
    pub fn set_responses_only(&mut self, yes: bool) {
        self.responses_only = yes;
    }

    #[allow(dead_code)] // tests and the fuzz targets
    pub fn is_lenient(&self) -> bool {
        self.lenient
    }

    /// Decode strictly from now on (the table is known from its start:
    /// only valid while no block has been decoded).
    pub fn set_strict(&mut self) {
        self.lenient = false;
    }

    /// Forget the table: a fresh decoder, lenient from now on.
    pub fn reset_lenient(&mut self) {
        self.dec = Decoder::new();
        self.dec.set_max_allowed_table_size(self.allowed);
        self.lenient = true;
        self.pending.clear();
    }

    /// The decoding endpoint announced SETTINGS_HEADER_TABLE_SIZE = `size`:
    /// the largest table its peer may use. Only the allowed maximum changes
    /// (the table itself changes with the encoder's size updates); it never
    /// goes below the default (settings take effect only when acknowledged,
    /// and blocks sent before that may still use the old size) nor above
    /// [`MAX_TABLE_SIZE`].
    pub fn set_allowed_table_size(&mut self, size: u32) {
        let size = (size as usize).clamp(DEFAULT_TABLE_SIZE, MAX_TABLE_SIZE);
        if size > self.allowed {
            self.allowed = size;
            // Never `set_max_table_size`: it asserts against this bound.
            self.dec.set_max_allowed_table_size(size);
        }
    }

    /// Decode a whole header block (HEADERS or PUSH_PROMISE plus its
    /// CONTINUATIONs). Returns true if an HPACK error was seen (strict
    /// decoding failed, or the block is malformed): the table was then
    /// replaced by a fresh lenient one.
    pub fn decode_block(&mut self, block: &[u8], sink: &mut impl FnMut(Field<'_>)) -> bool {
        if !self.lenient {
            if self.walk(block, true, true, sink).is_ok() {
                return false;
            }
            // Fields reported so far are right, but the block's end is not:
            // decode it again from a fresh table, leniently, so that its
            // insertions are followed.
            sink(Field::Restart);
            self.reset_lenient();
            let _ = self.walk(block, true, false, sink);
            return true;
        }
        self.walk(block, true, false, sink).unwrap_or(true)
    }

    /// Decode the first bytes of a block whose rest is lost (cut at the
    /// header-block limit, or a capture gap): every whole representation is
    /// read leniently with the current table, then the table is forgotten
    /// (the lost part may have inserted entries).
    pub fn decode_partial(&mut self, block: &[u8], sink: &mut impl FnMut(Field<'_>)) {
        let _ = self.walk(block, false, false, sink);
        self.reset_lenient();
    }

    /// Feed the block to the crate one representation at a time.
    ///
    /// `strict`: the first error fails the walk (`Err`), as the crate's
    /// whole-block decoding would. Otherwise (lenient) unknown indices give
    /// unknown fields and placeholder entries, and the result says whether
    /// the block was malformed (the table was then reset). `complete`: the
    /// block is whole, so a truncated representation is an error.
    ///
    /// Huffman-coded strings are decoded here (`httlib-huffman`), and the
    /// representation is fed with plain strings: the crate builds its
    /// Huffman table anew for every string it decodes (about 20 us each),
    /// most of a request's cost otherwise.
    fn walk(
        &mut self,
        block: &[u8],
        complete: bool,
        strict: bool,
        sink: &mut impl FnMut(Field<'_>),
    ) -> Result<bool, ()> {
        self.pending.clear();
        let mut p = 0;
        while p < block.len() {
            let rest = &block[p..];
            let first = rest[0];
            if first & 0x80 != 0 {
                // Indexed field (§6.1).
                let Some((_, n)) = decode_int(rest, 7) else {
                    return self.malformed(complete, strict);
                };
                if self.feed(&rest[..n], sink).is_err() {
                    if strict {
                        return Err(());
                    }
                    // Beyond our table (or index 0): unknown, nothing inserted.
                    sink(Field::Unknown);
                }
                p += n;
            } else if first & 0xe0 == 0x20 {
                // Dynamic table size update (§6.3): applied with the next
                // representation (a block may not end with one).
                let Some((size, n)) = decode_int(rest, 5) else {
                    return self.malformed(complete, strict);
                };
                if strict && size > self.allowed {
                    return Err(());
                }
                encode_int(size.min(self.allowed), 5, 0x20, &mut self.pending);
                p += n;
            } else {
                // Literal (§6.2): with incremental indexing (01), without
                // indexing (0000) or never indexed (0001).
                let indexing = first & 0x40 != 0;
                let prefix = if indexing { 6 } else { 4 };
                let Some((name_index, n)) = decode_int(rest, prefix) else {
                    return self.malformed(complete, strict);
                };
                let mut name_end = n;
                if name_index == 0 {
                    let Some(end) = skip_string(rest, n) else {
                        return self.malformed(complete, strict);
                    };
                    name_end = end;
                }
                let Some(end) = skip_string(rest, name_end) else {
                    return self.malformed(complete, strict);
                };
                // A field the table does not keep and whose name we do not
                // read (date, server, etag...) is skipped undecoded: its
                // Huffman value was most of a response's decoding cost.
                if !indexing && !wanted_name(name_index, &rest[n..name_end], self.responses_only) {
                    p += end;
                    continue;
                }
                let huffman =
                    rest[name_end] & 0x80 != 0 || (name_index == 0 && rest[n] & 0x80 != 0);
                let mut lit = std::mem::take(&mut self.lit);
                lit.clear();
                // A field the table keeps under a static name we never read
                // (date, server, ...): inserted with an empty value instead
                // of decoding it. Sound: an entry smaller than the peer's
                // only makes our table evict later, so it stays a longer
                // newest-first list of the same history, and any index the
                // peer sends names the same entry in both; ours just holds
                // no value nobody reads.
                let unread =
                    indexing && (15..=61).contains(&name_index) && !wanted_name(name_index, &[], self.responses_only);
                let (fed, value_at) = if unread {
                    lit.extend_from_slice(&rest[..n]);
                    let value_at = lit.len();
                    lit.push(0);
                    (self.feed(&lit, sink).is_ok(), Some(value_at))
                } else if huffman {
                    lit.extend_from_slice(&rest[..n]);
                    let name_ok = name_index != 0 || plain_string(&rest[n..name_end], &mut lit);
                    let value_at = lit.len();
                    let value_ok = plain_string(&rest[name_end..end], &mut lit);
                    let fed = if name_ok && value_ok {
                        self.feed(&lit, sink).is_ok()
                    } else {
                        false
                    };
                    (fed, value_ok.then_some(value_at))
                } else {
                    lit.extend_from_slice(&rest[name_end..end]);
                    (self.feed(&rest[..end], sink).is_ok(), Some(0))
                };
                let mut result = Ok(());
                if !fed {
                    if strict {
                        result = Err(());
                    } else if indexing {
                        // Keep the indices aligned: insert a placeholder,
                        // with the value when it decodes.
                        let value = value_at.map_or(&[0u8][..], |at| &lit[at..]);
                        if !self.insert_placeholder(value, sink) {
                            result = Err(());
                        }
                    } else {
                        sink(Field::Unknown);
                    }
                }
                self.lit = lit;
                if result.is_err() {
                    return if strict {
                        Err(())
                    } else {
                        self.malformed(true, false)
                    };
                }
                p += end;
            }
        }
        if !self.pending.is_empty() {
            // Trailing size updates: the crate applies them, then reports
            // the error of a block ending with one (ignored when lenient).
            let pending = std::mem::take(&mut self.pending);
            let _ = self.dec.decode_with_cb(&pending, |_, _| {});
            self.pending = pending;
            self.pending.clear();
            if strict {
                return Err(());
            }
        }
        Ok(false)
    }

    /// A literal with incremental indexing the crate refused (unknown name
    /// index, or strings that do not decode): insert a placeholder entry
    /// in its place, with its original value when that decodes, else empty.
    fn insert_placeholder(&mut self, value: &[u8], sink: &mut impl FnMut(Field<'_>)) -> bool {
        for v in [value, &[0u8][..]] {
            self.rep.clear();
            self.rep.extend_from_slice(&PLACEHOLDER_INSERT);
            self.rep.extend_from_slice(v);
            if self
                .dec
                .decode_with_cb(&self.rep, |n, v| emit(sink, &n, &v))
                .is_ok()
            {
                return true;
            }
        }
        false
    }

    /// Feed one representation, after the size updates waiting for it.
    fn feed(&mut self, rep: &[u8], sink: &mut impl FnMut(Field<'_>)) -> Result<(), DecoderError> {
        if self.pending.is_empty() {
            return self.dec.decode_with_cb(rep, |n, v| emit(sink, &n, &v));
        }
        self.rep.clear();
        self.rep.extend_from_slice(&self.pending);
        self.rep.extend_from_slice(rep);
        // The crate applies the updates before the representation, even
        // when the representation then fails.
        self.pending.clear();
        self.dec
            .decode_with_cb(&self.rep, |n, v| emit(sink, &n, &v))
    }

    /// A representation that cannot be walked: the rest of the block (and
    /// its insertions) is lost. At the end of an incomplete block that is
    /// just where the block was cut.
    fn malformed(&mut self, complete: bool, strict: bool) -> Result<bool, ()> {
        self.pending.clear();
        if strict {
            return Err(());
        }
        if complete {
            self.reset_lenient();
        }
        Ok(complete)
    }
}

thread_local! {
    /// A Huffman string's decoded bytes, before their length is known.
    static HUFFMAN_OUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Names of the regular fields the HTTP/2 parser reads.
const WANTED_NAMES: [&[u8]; 6] = [b"host", b"user-agent", b"content-length", b"content-type", b"traceparent", b"grpc-status"];

/// Whether a literal's name (a static table index, or the name string
/// when `index` is 0) may be one the HTTP/2 parser reads: the pseudo-headers,
/// host, user-agent, content-length, content-type, traceparent and
/// grpc-status; in a direction that carries responses only, :status and
/// grpc-status. A Huffman-coded name string is compared in its coded form:
/// a canonical Huffman code padded with ones (RFC 7541 §5.2) gives a string
/// one encoding, so nginx's `etag` and `accept-ranges` are skipped without
/// being decoded.
fn wanted_name(index: usize, name_string: &[u8], responses_only: bool) -> bool {
    let wanted = |name: &[u8]| if responses_only { name == b"grpc-status" } else { WANTED_NAMES.contains(&name) };
    match index {
        0 => {
            let Some((&first, name)) = name_string.split_first() else { return true };
            if first & 0x80 == 0 {
                return name.first() == Some(&b':') || wanted(name);
            }
            // ':' is the 7-bit code 1011100: a pseudo-header's name.
            name.first().is_some_and(|b| b >> 1 == 0x5c)
                || huffman_names().iter().zip(WANTED_NAMES).any(|(coded, plain)| coded.as_slice() == name && wanted(plain))
        }
        8..=14 => true,
        1..=7 | 28 | 31 | 38 | 58 => !responses_only,
        15..=61 => false,
        // Dynamic table names: decoded (the crate resolves them).
        _ => true,
    }
}

/// [`WANTED_NAMES`], Huffman-coded (same order).
fn huffman_names() -> &'static [Vec<u8>; 6] {
    static CODED: std::sync::OnceLock<[Vec<u8>; 6]> = std::sync::OnceLock::new();
    CODED.get_or_init(|| {
        WANTED_NAMES.map(|name| {
            let mut coded = Vec::new();
            // Cannot fail: every octet has a code.
            let _ = httlib_huffman::encode(name, &mut coded);
            coded
        })
    })
}

/// Appends the string literal `s` (§5.2) as a plain (not Huffman-coded)
/// literal; false, and nothing appended, if its Huffman code is invalid.
fn plain_string(s: &[u8], out: &mut Vec<u8>) -> bool {
    let Some((len, n)) = decode_int(s, 7) else {
        return false;
    };
    let Some(raw) = s.get(n..n.saturating_add(len)) else {
        return false;
    };
    if s[0] & 0x80 == 0 {
        out.extend_from_slice(&s[..n + len]);
        return true;
    }
    HUFFMAN_OUT.with(|decoded| {
        let mut decoded = decoded.borrow_mut();
        decoded.clear();
        if httlib_huffman::decode(raw, &mut decoded, httlib_huffman::DecoderSpeed::FourBits).is_err() {
            return false;
        }
        encode_int(decoded.len(), 7, 0, out);
        out.extend_from_slice(&decoded);
        true
    })
}

fn emit(sink: &mut impl FnMut(Field<'_>), name: &[u8], value: &[u8]) {
    if name == PLACEHOLDER_NAME {
        sink(Field::Unknown);
    } else {
        sink(Field::Known(name, value));
    }
}

/// RFC 7541 §5.1 integer with an N-bit prefix: (value, octets used). At
/// most 5 octets, as the crate accepts; None when truncated or longer.
pub fn decode_int(buf: &[u8], prefix: u8) -> Option<(usize, usize)> {
    let mask = ((1u16 << prefix) - 1) as u8;
    let first = buf.first()? & mask;
    if first < mask {
        return Some((usize::from(first), 1));
    }
    let mut value = usize::from(mask);
    for (i, &b) in buf.iter().enumerate().skip(1).take(4) {
        value += usize::from(b & 0x7f) << (7 * (i - 1));
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// End of the string literal (§5.2) starting at `at`, if it is all there.
fn skip_string(buf: &[u8], at: usize) -> Option<usize> {
    let (len, n) = decode_int(buf.get(at..)?, 7)?;
    let end = at.checked_add(n)?.checked_add(len)?;
    (end <= buf.len()).then_some(end)
}

/// RFC 7541 §5.1 encoding of `value` with an N-bit prefix under `flags`.
fn encode_int(value: usize, prefix: u8, flags: u8, out: &mut Vec<u8>) {
    let mask = ((1u16 << prefix) - 1) as usize;
    if value < mask {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | mask as u8);
    let mut rest = value - mask;
    while rest >= 0x80 {
        out.push(0x80 | (rest & 0x7f) as u8);
        rest >>= 7;
    }
    out.push(rest as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use loona_hpack::Encoder;

    type Owned = Option<(Vec<u8>, Vec<u8>)>;

    fn decode(d: &mut HpackDecoder, block: &[u8]) -> (Vec<Owned>, bool) {
        let mut got = Vec::new();
        let err = d.decode_block(block, &mut |f| match f {
            Field::Known(n, v) => got.push(Some((n.to_vec(), v.to_vec()))),
            Field::Unknown => got.push(None),
            Field::Restart => got.clear(),
        });
        (got, err)
    }

    fn known(n: &str, v: &str) -> Owned {
        Some((n.as_bytes().to_vec(), v.as_bytes().to_vec()))
    }

    fn enc(e: &mut Encoder<'_>, fields: &[(&str, &str)]) -> Vec<u8> {
        e.encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    const REQ1: &[(&str, &str)] = &[
        (":method", "GET"),
        (":path", "/a"),
        ("x-custom", "one"),
        ("user-agent", "ua/1"),
    ];

    #[test]
    fn strict_decodes_a_conversation() {
        let mut e = Encoder::new();
        let mut d = HpackDecoder::new(false);
        for _ in 0..3 {
            let b = enc(&mut e, REQ1);
            let (got, err) = decode(&mut d, &b);
            assert!(!err);
            assert_eq!(
                got,
                REQ1.iter().map(|(n, v)| known(n, v)).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn lenient_on_the_last_block_only() {
        let mut e = Encoder::new();
        let _ = enc(&mut e, REQ1);
        let _ = enc(&mut e, &[(":path", "/b"), ("x-other", "two")]);
        // Block 3: x-custom is indexed into the part of the table we never
        // saw; :method GET is static; :path and user-agent are literals
        // with static names (this encoder does not index them); x-new is
        // a new literal, inserted.
        let b3 = enc(
            &mut e,
            &[
                (":method", "GET"),
                (":path", "/c"),
                ("x-custom", "one"),
                ("user-agent", "ua/1"),
                ("x-new", "3"),
            ],
        );
        let mut d = HpackDecoder::new(true);
        let (got, err) = decode(&mut d, &b3);
        assert!(!err);
        assert_eq!(
            got,
            vec![
                known(":method", "GET"),
                known(":path", "/c"),
                None,
                known("user-agent", "ua/1"),
                known("x-new", "3")
            ]
        );
        // Block 4 refers to the entry block 3 inserted (index 62, newest):
        // we saw that insertion, so it is known.
        let b4 = enc(&mut e, &[("x-new", "3"), ("x-custom", "one")]);
        let (got, _) = decode(&mut d, &b4);
        assert_eq!(got, vec![known("x-new", "3"), None]);
    }

    #[test]
    fn unknown_name_index_inserts_a_placeholder_and_keeps_alignment() {
        // The peer inserted (x-name, v1) at 62 before we joined. Block 2:
        // literal with incremental indexing, name from entry 62 (unknown to
        // us), value v2: the peer inserts (x-name, v2), we a placeholder.
        let b2 = [0x40 | 62, 0x02, b'v', b'2'];
        // Block 3 inserts (x-later, L) with a literal name.
        let b3 = [
            0x40, 0x07, b'x', b'-', b'l', b'a', b't', b'e', b'r', 0x01, b'L',
        ];
        let mut d = HpackDecoder::new(true);
        let (got, err) = decode(&mut d, &b2);
        assert!(!err);
        assert_eq!(got, vec![None]);
        let (got, _) = decode(&mut d, &b3);
        assert_eq!(got, vec![known("x-later", "L")]);
        // The peer's table is [x-later, x-name:v2, x-name:v1] and ours
        // [x-later, placeholder]: index 62 known, 63 placeholder, 64 beyond.
        let b4 = [0x80 | 62, 0x80 | 63, 0x80 | 64];
        let (got, _) = decode(&mut d, &b4);
        assert_eq!(got, vec![known("x-later", "L"), None, None]);
        // A literal whose name is read through the placeholder is unknown too.
        let (got, _) = decode(&mut d, &[0x0f, 63 - 15, 0x01, b'z']);
        assert_eq!(got, vec![None]);
    }

    #[test]
    fn literal_without_indexing_with_unknown_name_is_unknown() {
        // 0000xxxx with name index 70 (beyond), value "v".
        let mut d = HpackDecoder::new(true);
        let block = [0x0f, 70 - 15, 0x01, b'v', 0x82];
        let (got, err) = decode(&mut d, &block);
        assert!(!err);
        assert_eq!(got, vec![None, known(":method", "GET")]);
        // Never indexed, same.
        let block = [0x1f, 70 - 15, 0x01, b'v'];
        assert_eq!(decode(&mut d, &block).0, vec![None]);
    }

    #[test]
    fn strict_error_switches_to_lenient() {
        let mut d = HpackDecoder::new(false);
        // Index 70 does not exist in a fresh table: strict fails, the block
        // is decoded again leniently.
        let (got, err) = decode(&mut d, &[0x82, 0x80 | 70, 0x84]);
        assert!(err);
        assert!(d.is_lenient());
        assert_eq!(
            got,
            vec![known(":method", "GET"), None, known(":path", "/")]
        );
    }

    #[test]
    fn size_updates_evict_and_are_clamped() {
        let mut e = Encoder::new();
        let mut d = HpackDecoder::new(true);
        let b1 = enc(&mut e, &[("x-a", "1"), ("x-b", "2")]);
        assert_eq!(
            decode(&mut d, &b1).0,
            vec![known("x-a", "1"), known("x-b", "2")]
        );
        // Size update to 0 (evicts all) then to 4096, then index 62.
        let (got, err) = decode(&mut d, &[0x20, 0x3f, 0xe1, 0x1f, 0x80 | 62, 0x82]);
        assert!(!err);
        assert_eq!(got, vec![None, known(":method", "GET")]);
        // A size update far above the allowed maximum is clamped, not an
        // error, and never a panic.
        let mut big = Vec::new();
        encode_int(1 << 27, 5, 0x20, &mut big);
        big.push(0x82);
        assert_eq!(decode(&mut d, &big), (vec![known(":method", "GET")], false));
        // A block that is only a size update.
        assert_eq!(decode(&mut d, &[0x20]), (vec![], false));
        // Strict: above the allowed size is an error (then lenient), not a panic.
        let mut s = HpackDecoder::new(false);
        let (got, err) = decode(&mut s, &big);
        assert!(err);
        assert_eq!(got, vec![known(":method", "GET")]);
    }

    #[test]
    fn settings_raise_the_allowed_size() {
        let mut s = HpackDecoder::new(false);
        s.set_allowed_table_size(16384);
        let mut b = Vec::new();
        encode_int(16384, 5, 0x20, &mut b);
        b.push(0x82);
        assert_eq!(decode(&mut s, &b), (vec![known(":method", "GET")], false));
        s.set_allowed_table_size(u32::MAX);
        assert_eq!(s.allowed, MAX_TABLE_SIZE);
    }

    #[test]
    fn eviction_follows_the_peer() {
        let mut e = Encoder::new();
        e.set_max_table_size(100);
        let mut d = HpackDecoder::new(true);
        // Tell the decoder: size update to 100 (the encoder has no API to
        // emit one; write it by hand).
        let mut b = Vec::new();
        encode_int(100, 5, 0x20, &mut b);
        b.extend(enc(&mut e, &[("x-a", "1")]));
        assert_eq!(decode(&mut d, &b).0, vec![known("x-a", "1")]);
        // 32 + 4 = 36 octets each: a third insertion evicts x-a.
        let b2 = enc(&mut e, &[("x-b", "2"), ("x-c", "3")]);
        assert_eq!(
            decode(&mut d, &b2).0,
            vec![known("x-b", "2"), known("x-c", "3")]
        );
        let b3 = enc(&mut e, &[("x-c", "3"), ("x-b", "2"), ("x-a", "1")]);
        // x-a was evicted on both sides: re-sent as a literal.
        assert_eq!(
            decode(&mut d, &b3).0,
            vec![known("x-c", "3"), known("x-b", "2"), known("x-a", "1")]
        );
    }

    #[test]
    fn huffman_values_decode_and_bad_huffman_inserts_a_placeholder() {
        // RFC 7541 C.4.1: GET http://www.example.com/ with Huffman.
        let block = [
            0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab,
            0x90, 0xf4, 0xff,
        ];
        let mut d = HpackDecoder::new(true);
        let (got, err) = decode(&mut d, &block);
        assert!(!err);
        assert_eq!(got[3], known(":authority", "www.example.com"));
        // Indexing literal with an invalid Huffman value (EOS): placeholder inserted.
        let bad = [0x41, 0x84, 0xff, 0xff, 0xff, 0xff, 0x80 | 62, 0x80 | 63];
        let (got, err) = decode(&mut d, &bad);
        assert!(!err);
        assert_eq!(
            got,
            vec![None, None, known(":authority", "www.example.com")]
        );
    }

    /// RFC 7541 C.6: responses with Huffman coding and a 256-octet table
    /// (evictions), strict; then a lenient decoder that only sees the last.
    #[test]
    fn rfc7541_huffman_responses() {
        let c61 = [
            0x3f, 0xe1, 0x01, // size update: 256
            0x48, 0x82, 0x64, 0x02, 0x58, 0x85, 0xae, 0xc3, 0x77, 0x1a, 0x4b, 0x61, 0x96, 0xd0,
            0x7a, 0xbe, 0x94, 0x10, 0x54, 0xd4, 0x44, 0xa8, 0x20, 0x05, 0x95, 0x04, 0x0b, 0x81,
            0x66, 0xe0, 0x82, 0xa6, 0x2d, 0x1b, 0xff, 0x6e, 0x91, 0x9d, 0x29, 0xad, 0x17, 0x18,
            0x63, 0xc7, 0x8f, 0x0b, 0x97, 0xc8, 0xe9, 0xae, 0x82, 0xae, 0x43, 0xd3,
        ];
        let c62 = [0x48, 0x83, 0x64, 0x0e, 0xff, 0xc1, 0xc0, 0xbf];
        let c63 = [
            0x88, 0xc1, 0x61, 0x96, 0xd0, 0x7a, 0xbe, 0x94, 0x10, 0x54, 0xd4, 0x44, 0xa8, 0x20,
            0x05, 0x95, 0x04, 0x0b, 0x81, 0x66, 0xe0, 0x84, 0xa6, 0x2d, 0x1b, 0xff, 0xc0, 0x5a,
            0x83, 0x9b, 0xd9, 0xab, 0x77, 0xad, 0x94, 0xe7, 0x82, 0x1d, 0xd7, 0xf2, 0xe6, 0xc7,
            0xb3, 0x35, 0xdf, 0xdf, 0xcd, 0x5b, 0x39, 0x60, 0xd5, 0xaf, 0x27, 0x08, 0x7f, 0x36,
            0x72, 0xc1, 0xab, 0x27, 0x0f, 0xb5, 0x29, 0x1f, 0x95, 0x87, 0x31, 0x60, 0x65, 0xc0,
            0x03, 0xed, 0x4e, 0xe5, 0xb1, 0x06, 0x3d, 0x50, 0x07,
        ];
        // Fields the table keeps under a static name the parser never reads
        // are inserted with an empty value, undecoded (their entries are
        // smaller than the peer's: ours evicts later, and the indices the
        // peer sends still name the same entries).
        let mut d = HpackDecoder::new(false);
        let want1 = vec![
            known(":status", "302"),
            known("cache-control", ""),
            known("date", ""),
            known("location", ""),
        ];
        assert_eq!(decode(&mut d, &c61), (want1, false));
        let want2 = vec![
            known(":status", "307"),
            known("cache-control", ""),
            known("date", ""),
            known("location", ""),
        ];
        assert_eq!(decode(&mut d, &c62), (want2, false));
        let want3 = vec![
            known(":status", "200"),
            known("cache-control", ""),
            known("date", ""),
            known("location", ""),
            known("content-encoding", ""),
            known("set-cookie", ""),
        ];
        assert_eq!(decode(&mut d, &c63), (want3, false));
        assert!(!d.is_lenient());
        let mut l = HpackDecoder::new(true);
        let (got, err) = decode(&mut l, &c63);
        assert!(!err);
        assert_eq!(
            got,
            vec![
                known(":status", "200"),
                None,
                known("date", ""),
                None,
                known("content-encoding", ""),
                known("set-cookie", ""),
            ]
        );
    }

    #[test]
    fn partial_blocks_keep_whole_fields_then_forget_the_table() {
        let mut e = Encoder::new();
        let b = enc(&mut e, REQ1);
        let mut d = HpackDecoder::new(false);
        let mut got = Vec::new();
        d.decode_partial(&b[..b.len() - 2], &mut |f| {
            if let Field::Known(n, _) = f {
                got.push(n.to_vec())
            }
        });
        assert_eq!(
            got,
            vec![b":method".to_vec(), b":path".to_vec(), b"x-custom".to_vec()]
        );
        assert!(d.is_lenient());
        // x-custom (entry 62) is unknown now; the rest are static or literal.
        let b2 = enc(&mut e, REQ1);
        assert_eq!(
            decode(&mut d, &b2).0,
            vec![
                known(":method", "GET"),
                known(":path", "/a"),
                None,
                known("user-agent", "ua/1")
            ]
        );
    }

    #[test]
    fn malformed_blocks_never_panic() {
        let mut d = HpackDecoder::new(true);
        for block in [
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff][..],
            &[0x40, 0x7f, 0xff, 0xff, 0xff, 0x7f],
            &[0x40, 0x05, b'a'],
            &[0x3f, 0xff, 0xff, 0xff, 0xff, 0x0f],
            &[0x80],
            &[0x00, 0x00, 0x00],
        ] {
            let _ = decode(&mut d, block);
            let mut s = HpackDecoder::new(false);
            let _ = decode(&mut s, block);
        }
    }

    #[test]
    fn integers() {
        assert_eq!(decode_int(&[10], 5), Some((10, 1)));
        assert_eq!(decode_int(&[31, 154, 10], 5), Some((1337, 3)));
        assert_eq!(decode_int(&[31, 154], 5), None);
        assert_eq!(
            decode_int(&[0xff, 0xff, 0xff, 0xff, 0x7f], 8),
            Some((255 + 127 + (127 << 7) + (127 << 14) + (127 << 21), 5))
        );
        assert_eq!(decode_int(&[0xff, 0xff, 0xff, 0xff, 0xff, 0], 8), None);
        for v in [0usize, 30, 31, 127, 128, 4096, 65536, 1 << 27] {
            let mut b = Vec::new();
            encode_int(v, 5, 0x20, &mut b);
            assert_eq!(decode_int(&b, 5), Some((v, b.len())));
        }
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever part of a conversation the lenient decoder joins, every
        /// field it reports as known is the field the encoder sent.
        #[test]
        fn lenient_never_reports_a_wrong_field(
            blocks in prop::collection::vec(
                prop::collection::vec((0usize..6, 0usize..4), 1..6), 1..8),
            skip in 0usize..8,
            table in prop::sample::select(vec![0usize, 64, 100, 256, 4096]),
        ) {
            const NAMES: [&str; 6] = [":path", "x-a", "x-b", "user-agent", "content-type", "x-c"];
            const VALUES: [&str; 4] = ["/", "one", "two-longer-value", "3"];
            let mut e = Encoder::new();
            e.set_max_table_size(table);
            let mut d = HpackDecoder::new(true);
            for (k, fields) in blocks.iter().enumerate() {
                let want: Vec<(&str, &str)> = fields.iter().map(|&(n, v)| (NAMES[n], VALUES[v])).collect();
                let mut b = Vec::new();
                if k == 0 {
                    encode_int(table, 5, 0x20, &mut b);
                }
                b.extend(enc(&mut e, &want));
                if k < skip {
                    continue;
                }
                let (got, err) = decode(&mut d, &b);
                prop_assert!(!err);
                prop_assert_eq!(got.len(), want.len());
                for (g, w) in got.iter().zip(&want) {
                    if let Some(g) = g {
                        prop_assert_eq!(g, &(w.0.as_bytes().to_vec(), w.1.as_bytes().to_vec()));
                    }
                }
                if skip == 0 {
                    prop_assert!(got.iter().all(|g| g.is_some()));
                }
            }
        }

        #[test]
        fn random_blocks_never_panic(
            blocks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..6),
            strict in any::<bool>(),
        ) {
            let mut d = HpackDecoder::new(!strict);
            for b in &blocks {
                let _ = decode(&mut d, b);
                d.decode_partial(b, &mut |_| {});
            }
        }
    }
}

/// The Huffman decoder against loona-hpack's (slow, but the crate the rest
/// of the decoding trusts): same bytes whenever that one succeeds.
#[cfg(test)]
mod huffman_tests {
    use super::plain_string;
    use proptest::prelude::*;

    fn huffman_literal(raw: &[u8]) -> Vec<u8> {
        let mut s = Vec::new();
        super::encode_int(raw.len(), 7, 0x80, &mut s);
        s.extend_from_slice(raw);
        s
    }

    fn decoded(raw: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        if !plain_string(&huffman_literal(raw), &mut out) {
            return None;
        }
        let (len, n) = super::decode_int(&out, 7)?;
        assert_eq!(out.len(), n + len, "length prefix and bytes agree");
        Some(out[n..].to_vec())
    }

    /// A literal without indexing, new name: 0x00, then name and value,
    /// both Huffman-coded.
    fn huffman_literal_field(name: &[u8], value: &[u8]) -> Vec<u8> {
        let mut block = vec![0x00];
        for s in [name, value] {
            let mut raw = Vec::new();
            httlib_huffman::encode(s, &mut raw).unwrap();
            block.extend_from_slice(&huffman_literal(&raw));
        }
        block
    }

    #[test]
    fn huffman_coded_names_are_compared_coded() {
        // nginx's etag and accept-ranges, then fields the parser reads.
        let mut block = Vec::new();
        for (n, v) in [
            (&b"etag"[..], &b"\"6b1396f5-2a\""[..]),
            (b"accept-ranges", b"bytes"),
            (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            (b"grpc-status", b"0"),
            (b":protocol", b"websocket"),
        ] {
            block.extend_from_slice(&huffman_literal_field(n, v));
        }
        for responses_only in [false, true] {
            let mut d = super::HpackDecoder::new(false);
            d.set_responses_only(responses_only);
            let mut names = Vec::new();
            let err = d.decode_block(&block, &mut |f| {
                if let super::Field::Known(n, _) = f {
                    names.push(String::from_utf8_lossy(n).into_owned())
                }
            });
            assert!(!err);
            let want: &[&str] =
                if responses_only { &["grpc-status", ":protocol"] } else { &["traceparent", "grpc-status", ":protocol"] };
            assert_eq!(names, want, "responses only: {responses_only}");
        }
    }

    #[test]
    fn rfc_7541_examples() {
        // C.4.1: "www.example.com"; C.6.1: a date; a custom value.
        let www = [0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff];
        assert_eq!(decoded(&www).as_deref(), Some(&b"www.example.com"[..]));
        let date = [
            0xd0, 0x7a, 0xbe, 0x94, 0x10, 0x54, 0xd4, 0x44, 0xa8, 0x20, 0x05, 0x95, 0x04, 0x0b, 0x81, 0x66, 0xe0,
            0x82, 0xa6, 0x2d, 0x1b, 0xff,
        ];
        assert_eq!(decoded(&date).as_deref(), Some(&b"Mon, 21 Oct 2013 20:13:21 GMT"[..]));
        // EOS inside the string, and padding longer than 7 bits, are errors.
        assert_eq!(decoded(&[0xff, 0xff, 0xff, 0xff]), None);
    }

    proptest! {
        #[test]
        fn encoded_strings_decode_back(text in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut raw = Vec::new();
            httlib_huffman::encode(&text, &mut raw).unwrap();
            prop_assert_eq!(decoded(&raw), Some(text.clone()));
            let theirs = loona_hpack::huffman::HuffmanDecoder::new().decode(&raw).ok();
            prop_assert_eq!(theirs, Some(text));
        }

        #[test]
        fn arbitrary_bytes_agree_with_the_crate_when_it_decodes(raw in proptest::collection::vec(any::<u8>(), 0..64)) {
            let ours = decoded(&raw);
            if let Ok(theirs) = loona_hpack::huffman::HuffmanDecoder::new().decode(&raw) {
                prop_assert_eq!(ours, Some(theirs));
            }
        }
    }
}
