//! grpc-go's header blocks, as grpc-go decoded them (its uprobes), applied
//! to the HTTP/2 streams parsed from the bytes: on a connection opened
//! before Periscope started, HPACK entries made earlier hide a call's path
//! and status from the bytes, but not from grpc-go.
//!
//! A block names its goroutine and stream, not its connection. grpc-go
//! reads a connection from one goroutine and writes it from another (its
//! `loopyWriter`), so: a block read (`operateHeaders`, after the read)
//! belongs to the connection its goroutine last read; a block written
//! (`writeHeader`, before the write) waits for its goroutine's next write.
//! Exact or not at all: a block whose connection is not known this way is
//! counted, never applied to a guess.

use std::collections::{HashMap, HashSet};

use super::Pipeline;
use crate::connections::ProtocolState;
use crate::events::GrpcHeaders;
use crate::protocols::StreamParser;
use crate::protocols::exchange::{Direction, Exchange};
use crate::protocols::http2::DecodedBlock;
use crate::stats::Stats;

/// Blocks written and not yet matched to a write, per process.
const MAX_PENDING_WRITTEN: usize = 256;
/// Server requests waiting for their path at once.
const MAX_DEFERRED: usize = 1024;
/// Goroutines remembered per daemon with the connection they last read.
const MAX_READERS: usize = 16384;

#[derive(Default)]
pub(super) struct GrpcGoBlocks {
    /// Processes that sent a block: their goroutines' reads are followed.
    processes: HashSet<u32>,
    /// Goroutine (actor key) -> the socket it last read.
    last_read: HashMap<u64, u64>,
    /// Blocks written, waiting for their goroutine's next write.
    written: Vec<(u64, DecodedBlock)>,
    /// Server requests whose path HPACK hid, read by a goroutine of a
    /// grpc-go process: (socket, stream, goroutine). Their identities (and
    /// links) wait for grpc-go's block, so that both ends of a link agree
    /// on the request.
    deferred: Vec<(u64, u64, u64)>,
    /// Sockets holding exchanges parked for blocks: since the last tick,
    /// and since the one before (released at the next tick).
    parked_new: HashSet<u64>,
    parked_old: HashSet<u64>,
}

/// The actor key of a goroutine (as `pipeline::actor` makes it).
fn goroutine_key(tgid: u32, goroutine: u64) -> u64 {
    1 << 63 | u64::from(tgid) << 32 | (goroutine & 0xffff_ffff)
}

impl GrpcGoBlocks {
    pub(super) fn tracks(&self, tgid: u32) -> bool {
        !self.processes.is_empty() && self.processes.contains(&tgid)
    }

    /// A goroutine of a grpc-go process read or wrote `sock` (its chunk
    /// just fed to `parser`).
    pub(super) fn on_goroutine_io(
        &mut self,
        goroutine: u64,
        sock: u64,
        egress: bool,
        parser: &mut StreamParser,
        out: &mut Vec<Exchange>,
        stats: &Stats,
    ) {
        if !egress {
            if self.last_read.len() >= MAX_READERS && !self.last_read.contains_key(&goroutine) {
                self.last_read.clear();
            }
            self.last_read.insert(goroutine, sock);
            return;
        }
        if self.written.is_empty() {
            return;
        }
        let mut k = 0;
        while k < self.written.len() {
            if self.written[k].0 == goroutine {
                let (_, block) = self.written.remove(k);
                apply(parser, &block, out, stats);
            } else {
                k += 1;
            }
        }
    }

    /// Takes out of `started` the requests whose path is not known yet.
    pub(super) fn defer_unnamed(
        &mut self,
        sock: u64,
        goroutine: u64,
        started: &mut Vec<u64>,
        parser: &StreamParser,
    ) {
        started.retain(|&seq| {
            let unnamed = parser.pending_request(seq).is_some_and(|ex| ex.path.is_empty());
            if unnamed && self.deferred.len() < MAX_DEFERRED {
                self.deferred.push((sock, seq, goroutine));
                return false;
            }
            true
        });
    }

    pub(super) fn has_deferred(&self, sock: u64) -> bool {
        !self.deferred.is_empty() && self.deferred.iter().any(|d| d.0 == sock)
    }

    pub(super) fn note_process(&mut self, tgid: u32) {
        self.processes.insert(tgid);
    }

    pub(super) fn note_parked(&mut self, sock: u64) {
        self.parked_new.insert(sock);
    }

    pub(super) fn forget_process(&mut self, tgid: u32) {
        if self.processes.remove(&tgid) {
            self.last_read.retain(|k, _| (k >> 32) as u32 & 0x7fff_ffff != tgid);
            self.written.retain(|(k, _)| (k >> 32) as u32 & 0x7fff_ffff != tgid);
        }
    }
}

fn apply(parser: &mut StreamParser, block: &DecodedBlock, out: &mut Vec<Exchange>, stats: &Stats) {
    if parser.apply_decoded(block, out) {
        Stats::inc(&stats.grpc_go_header_blocks);
    } else {
        Stats::inc(&stats.grpc_go_header_blocks_unmatched);
    }
}

fn decoded_block(h: &GrpcHeaders<'_>) -> DecodedBlock {
    let direction = if h.egress { Direction::Egress } else { Direction::Ingress };
    let mut block = DecodedBlock::new(h.stream_id, direction);
    for (name, value) in &h.fields[..h.count] {
        if !name.is_empty() {
            block.field(name, value);
        }
    }
    block
}

impl Pipeline {
    pub(super) fn on_grpc_headers(&mut self, h: &GrpcHeaders<'_>) {
        let tgid = h.header.tgid;
        self.grpc_go.processes.insert(tgid);
        let goroutine = goroutine_key(tgid, h.goroutine);
        let block = decoded_block(h);
        if h.egress {
            let written = &mut self.grpc_go.written;
            if written.len() >= MAX_PENDING_WRITTEN {
                written.remove(0);
                Stats::inc(&self.stats.grpc_go_header_blocks_unmatched);
            }
            written.push((goroutine, block));
            return;
        }
        let Some(&sock) = self.grpc_go.last_read.get(&goroutine) else {
            Stats::inc(&self.stats.grpc_go_header_blocks_unmatched);
            return;
        };
        let Some(conn) = self.connections.get_mut(sock) else {
            Stats::inc(&self.stats.grpc_go_header_blocks_unmatched);
            return;
        };
        let ProtocolState::Stream(parser) = &mut conn.protocol else {
            Stats::inc(&self.stats.grpc_go_header_blocks_unmatched);
            return;
        };
        apply(parser, &block, &mut self.exchanges, &self.stats);
        if parser.parked() > 0 {
            self.grpc_go.parked_new.insert(sock);
        }
        self.start_deferred(sock, Some(u64::from(h.stream_id)));
        self.emit_exchanges(sock);
    }

    /// Starts the deferred requests of `sock` (only stream `stream` if
    /// given): their identities and links are made now.
    pub(super) fn start_deferred(&mut self, sock: u64, stream: Option<u64>) {
        let mut k = 0;
        while k < self.grpc_go.deferred.len() {
            let (s, seq, goroutine) = self.grpc_go.deferred[k];
            if s == sock && stream.is_none_or(|id| id == seq) {
                self.grpc_go.deferred.swap_remove(k);
                self.new_requests.push(seq);
                self.start_requests(sock, Some(goroutine));
            } else {
                k += 1;
            }
        }
    }

    /// Exchanges parked for a block that never came (at least one tick
    /// ago) are emitted as they are.
    pub(super) fn release_parked_exchanges(&mut self) {
        let socks: Vec<u64> = self.grpc_go.deferred.iter().map(|d| d.0).collect();
        for sock in socks {
            self.start_deferred(sock, None);
        }
        let old = std::mem::take(&mut self.grpc_go.parked_old);
        self.grpc_go.parked_old = std::mem::take(&mut self.grpc_go.parked_new);
        for sock in old {
            let Some(conn) = self.connections.get_mut(sock) else {
                continue;
            };
            if let ProtocolState::Stream(parser) = &mut conn.protocol {
                parser.release_parked(&mut self.exchanges);
            }
            self.emit_exchanges(sock);
        }
    }
}
