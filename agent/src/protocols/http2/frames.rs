//! HTTP/2 framing (RFC 9113 §4 and §6): the client preface, the 9-octet
//! frame header, which headers are well formed, and [`detect`].

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const FRAME_HEADER_LEN: usize = 9;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const FLAG_END_STREAM: u8 = 0x1;
pub const FLAG_ACK: u8 = 0x1;
pub const FLAG_END_HEADERS: u8 = 0x4;
pub const FLAG_PADDED: u8 = 0x8;
pub const FLAG_PRIORITY: u8 = 0x20;

pub const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;

/// Longest frame [`FrameHeader::is_plausible`] accepts. The protocol allows
/// up to 16 MiB - 1 once SETTINGS_MAX_FRAME_SIZE is raised, but senders
/// rarely go past 1 MiB and the bound makes random bytes far less likely
/// to pass for frames.
pub const MAX_PLAUSIBLE_LEN: u32 = 1 << 20;

/// A frame's 9-octet header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub len: u32,
    pub ty: u8,
    pub flags: u8,
    /// Stream identifier, reserved bit cleared.
    pub stream: u32,
    /// The reserved bit (must be ignored on receipt).
    pub reserved: bool,
}

impl FrameHeader {
    pub fn parse(b: &[u8; FRAME_HEADER_LEN]) -> Self {
        let sid = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
        FrameHeader {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            ty: b[3],
            flags: b[4],
            stream: sid & 0x7fff_ffff,
            reserved: sid & 0x8000_0000 != 0,
        }
    }

    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Well formed as far as its header shows (stream-id and fixed-length
    /// rules of the known types, RFC 9113 §6; a peer breaking them has the
    /// connection torn down). Unknown types and undefined flags are fine.
    pub fn is_valid(&self) -> bool {
        let on_stream = self.stream != 0;
        match self.ty {
            DATA | HEADERS | CONTINUATION => on_stream,
            PRIORITY => on_stream && self.len == 5,
            RST_STREAM => on_stream && self.len == 4,
            PUSH_PROMISE => on_stream && self.len >= 4,
            SETTINGS => {
                !on_stream && self.len.is_multiple_of(6) && (!self.has(FLAG_ACK) || self.len == 0)
            }
            PING => !on_stream && self.len == 8,
            GOAWAY => !on_stream && self.len >= 8,
            WINDOW_UPDATE => self.len == 4,
            _ => true,
        }
    }

    /// What a frame found where no sync is known should look like: valid,
    /// of a known type, only defined flags, reserved bit clear, at most
    /// [`MAX_PLAUSIBLE_LEN`].
    pub fn is_plausible(&self) -> bool {
        let flags: u8 = match self.ty {
            DATA => FLAG_END_STREAM | FLAG_PADDED,
            HEADERS => FLAG_END_STREAM | FLAG_END_HEADERS | FLAG_PADDED | FLAG_PRIORITY,
            SETTINGS | PING => FLAG_ACK,
            PUSH_PROMISE => FLAG_END_HEADERS | FLAG_PADDED,
            CONTINUATION => FLAG_END_HEADERS,
            PRIORITY | RST_STREAM | GOAWAY | WINDOW_UPDATE => 0,
            _ => return false,
        };
        self.flags & !flags == 0
            && !self.reserved
            && self.len <= MAX_PLAUSIBLE_LEN
            && self.is_valid()
    }

    /// Octets at the start of the payload whose fields are read: pad
    /// length, priority, promised stream, GOAWAY's last stream and code.
    /// The rest is content, then padding.
    pub fn prefix_len(&self) -> u32 {
        let pad = u32::from(self.has(FLAG_PADDED));
        match self.ty {
            DATA => pad,
            HEADERS => pad + if self.has(FLAG_PRIORITY) { 5 } else { 0 },
            PUSH_PROMISE => pad + 4,
            GOAWAY => 8,
            _ => 0,
        }
    }
}

/// Whether the first captured bytes of a connection are HTTP/2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    /// The client preface (or, for a short capture, at least 8 octets of it).
    Preface,
    /// A run of plausible frames: a connection that started before us.
    Frames,
    No,
}

/// Whether captured bytes (the first chunk seen on a connection) are
/// HTTP/2: the client preface, or (connection started before us) a run of
/// well-formed frames (see [`plausible_run`]).
pub fn detect(bytes: &[u8], total_len: u32) -> Detected {
    if starts_with_preface(bytes) {
        Detected::Preface
    } else if plausible_run(bytes, total_len) {
        Detected::Frames
    } else {
        Detected::No
    }
}

/// The bytes open with the client preface (a capture shorter than it must
/// hold at least 8 of its octets).
pub fn starts_with_preface(bytes: &[u8]) -> bool {
    bytes.starts_with(PREFACE) || (bytes.len() >= 8 && PREFACE.starts_with(bytes))
}

/// The captured bytes start with a frame header and every frame header met
/// walking the frames by their lengths is plausible
/// ([`FrameHeader::is_plausible`]; after the first, frames of unknown
/// types are accepted too). The last frame may run past the
/// captured bytes (the capture is cut, or the frame continues in the next
/// call); a partial header at the end of a cut capture is not checked.
pub fn plausible_run(bytes: &[u8], total_len: u32) -> bool {
    let total = (total_len as usize).max(bytes.len());
    let mut pos = 0usize;
    let mut frames = 0;
    while let Some(h) = bytes.get(pos..pos + FRAME_HEADER_LEN) {
        let Ok(h) = <&[u8; FRAME_HEADER_LEN]>::try_from(h) else {
            return false;
        };
        let h = FrameHeader::parse(h);
        // Extension frames (unknown types) may follow known ones.
        let extension =
            frames > 0 && h.ty > CONTINUATION && !h.reserved && h.len <= MAX_PLAUSIBLE_LEN;
        if !h.is_plausible() && !extension {
            return false;
        }
        frames += 1;
        pos += FRAME_HEADER_LEN + h.len as usize;
    }
    // A whole call ending with a partial frame header: only if it follows
    // other frames (writers may split anywhere, but one lone fragment is
    // no evidence).
    frames > 0 && (pos >= bytes.len() || bytes.len() < total || frames > 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut v = len.to_be_bytes()[1..].to_vec();
        v.extend([ty, flags]);
        v.extend(stream.to_be_bytes());
        v.extend(payload);
        v
    }

    #[test]
    fn detects_preface_and_frames() {
        assert_eq!(detect(PREFACE, 24), Detected::Preface);
        assert_eq!(detect(&PREFACE[..10], 24), Detected::Preface);
        assert_eq!(detect(&PREFACE[..3], 3), Detected::No);
        let settings = frame(SETTINGS, 0, 0, &[0, 1, 0, 0, 0x10, 0]);
        assert_eq!(detect(&settings, settings.len() as u32), Detected::Frames);
        let mut two = frame(HEADERS, FLAG_END_HEADERS, 1, &[0x82, 0x84]);
        two.extend(frame(DATA, FLAG_END_STREAM, 1, &[0; 100]));
        assert_eq!(detect(&two, two.len() as u32), Detected::Frames);
        // Cut capture inside the DATA payload.
        assert_eq!(detect(&two[..20], 4000), Detected::Frames);
        // Not HTTP/2.
        for b in [
            &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\n\r\n",
            &[
                0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
            ],
            b"*1\r\n$4\r\nPING\r\n",
            &[0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f],
            b"",
        ] {
            assert_eq!(detect(b, b.len() as u32), Detected::No, "{b:?}");
        }
        // Stream-id and length rules.
        assert_eq!(detect(&frame(DATA, 0, 0, b"x"), 10), Detected::No);
        assert_eq!(detect(&frame(SETTINGS, 0, 1, &[]), 9), Detected::No);
        assert_eq!(detect(&frame(PING, 0, 0, &[0; 7]), 16), Detected::No);
        assert_eq!(detect(&frame(DATA, 0x40, 1, b"x"), 10), Detected::No);
        assert_eq!(detect(&frame(0x20, 0, 1, b"x"), 10), Detected::No);
        // A second frame that is not plausible.
        let mut bad = frame(PING, 0, 0, &[0; 8]);
        bad.extend(b"GET / HTTP/1.1\r\n");
        assert_eq!(detect(&bad, bad.len() as u32), Detected::No);
    }

    #[test]
    fn header_fields() {
        let h = FrameHeader::parse(&[0, 1, 2, 9, 0x4, 0x80, 0, 0, 3]);
        assert_eq!(
            (h.len, h.ty, h.flags, h.stream, h.reserved),
            (258, CONTINUATION, 4, 3, true)
        );
        assert!(h.is_valid());
        assert!(!h.is_plausible());
        let h = FrameHeader::parse(&[0, 0, 20, HEADERS, FLAG_PADDED | FLAG_PRIORITY, 0, 0, 0, 1]);
        assert_eq!(h.prefix_len(), 6);
    }
}
