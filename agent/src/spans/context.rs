//! Span identities and how they join into traces.
//!
//! A request's identity (span id, and where its trace comes from) is made
//! when the request starts, so that spans begun while it is open can point
//! at it before it ends. A child holds its parent's identity and reads the
//! trace id through it when it is exported, so a parent that learns its own
//! parent later (a server request whose client's event arrived after it)
//! carries its children along.
//!
//! An identity is *settled* when nothing can change its trace any more: a
//! client request, a request with a W3C traceparent, a server request linked
//! to its client, or one whose span has been built. A span whose ancestry is
//! not settled yet waits (bounded, see `HeldSpans`); once any span below an
//! identity has been exported, that identity is never re-linked, so a trace
//! never gets split after the fact.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use rand::Rng;

use super::model::Span;

/// Longest parent chain followed (guards against a cycle made of misordered
/// events; real chains are a handful of hops).
const MAX_DEPTH: usize = 64;

enum Parent {
    None,
    /// A span of this agent.
    Local(Rc<Identity>),
    /// A span elsewhere, from a traceparent header.
    Remote { trace_id: [u8; 16], span_id: [u8; 8] },
}

pub struct Identity {
    span_id: [u8; 8],
    /// The trace id when this identity is a root.
    own_trace: [u8; 16],
    parent: RefCell<Parent>,
    settled: Cell<bool>,
    /// This span or one below it has been exported with the current trace id.
    descendants_exported: Cell<bool>,
}

pub type IdentityRef = Rc<Identity>;

/// Why a link was not made.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkRefused {
    AlreadyLinked,
    /// Spans below it were already exported in its current trace.
    DescendantsExported,
    /// The proposed parent descends from this identity.
    Cycle,
}

impl Identity {
    /// A new trace's root. `settled` says whether a parent may still be found.
    pub fn root(rng: &mut impl Rng, settled: bool) -> IdentityRef {
        Rc::new(Identity {
            span_id: super::http::new_span_id(rng),
            own_trace: super::http::new_trace_id(rng),
            parent: RefCell::new(Parent::None),
            settled: Cell::new(settled),
            descendants_exported: Cell::new(false),
        })
    }

    pub fn child_of(parent: &IdentityRef, rng: &mut impl Rng) -> IdentityRef {
        Rc::new(Identity {
            span_id: super::http::new_span_id(rng),
            own_trace: [0; 16],
            parent: RefCell::new(Parent::Local(parent.clone())),
            settled: Cell::new(true),
            descendants_exported: Cell::new(false),
        })
    }

    /// A child of a span in another process or node (traceparent header).
    pub fn remote_child(trace_id: [u8; 16], parent_span_id: [u8; 8], rng: &mut impl Rng) -> IdentityRef {
        Rc::new(Identity {
            span_id: super::http::new_span_id(rng),
            own_trace: trace_id,
            parent: RefCell::new(Parent::Remote { trace_id, span_id: parent_span_id }),
            settled: Cell::new(true),
            descendants_exported: Cell::new(false),
        })
    }

    pub fn span_id(&self) -> [u8; 8] {
        self.span_id
    }

    pub fn trace_id(&self) -> [u8; 16] {
        let mut trace = self.own_trace;
        let mut current: Option<IdentityRef> = None;
        for _ in 0..MAX_DEPTH {
            let next = {
                let node: &Identity = current.as_deref().unwrap_or(self);
                match &*node.parent.borrow() {
                    Parent::None => return node.own_trace,
                    Parent::Remote { trace_id, .. } => return *trace_id,
                    Parent::Local(p) => {
                        trace = p.own_trace;
                        p.clone()
                    }
                }
            };
            current = Some(next);
        }
        trace
    }

    pub fn parent_span_id(&self) -> Option<[u8; 8]> {
        match &*self.parent.borrow() {
            Parent::None => None,
            Parent::Local(p) => Some(p.span_id),
            Parent::Remote { span_id, .. } => Some(*span_id),
        }
    }

    pub fn has_parent(&self) -> bool {
        !matches!(&*self.parent.borrow(), Parent::None)
    }

    /// Nothing can change this identity's trace any more.
    pub fn settle(&self) {
        self.settled.set(true);
    }

    /// Every identity up the chain is settled.
    pub fn chain_settled(&self) -> bool {
        if !self.settled.get() {
            return false;
        }
        let mut current = self.local_parent();
        for _ in 0..MAX_DEPTH {
            let Some(node) = current else { return true };
            if !node.settled.get() {
                return false;
            }
            current = node.local_parent();
        }
        true
    }

    fn local_parent(&self) -> Option<IdentityRef> {
        match &*self.parent.borrow() {
            Parent::Local(p) => Some(p.clone()),
            _ => None,
        }
    }

    /// A span with this identity is exported: its trace and its ancestors'
    /// are now fixed for good.
    pub fn mark_exported(&self) {
        self.descendants_exported.set(true);
        let mut current = self.local_parent();
        for _ in 0..MAX_DEPTH {
            let Some(node) = current else { return };
            if node.descendants_exported.replace(true) {
                return;
            }
            current = node.local_parent();
        }
    }

    /// Makes this (root) identity the child of `parent`, and settles it.
    pub fn link_to(self: &IdentityRef, parent: &IdentityRef) -> Result<(), LinkRefused> {
        if self.has_parent() {
            return Err(LinkRefused::AlreadyLinked);
        }
        if self.descendants_exported.get() {
            return Err(LinkRefused::DescendantsExported);
        }
        let mut current = Some(parent.clone());
        for _ in 0..MAX_DEPTH {
            let Some(node) = current else { break };
            if Rc::ptr_eq(&node, self) {
                return Err(LinkRefused::Cycle);
            }
            current = node.local_parent();
        }
        *self.parent.borrow_mut() = Parent::Local(parent.clone());
        self.settled.set(true);
        Ok(())
    }
}

/// Fills in the ids of a bundle: the first span is the identity's own, the
/// others (its phases, lookups) already carry their span and parent ids and
/// only take the trace id.
pub fn stamp(spans: &mut [Span], identity: &Identity) {
    let trace_id = identity.trace_id();
    for (i, span) in spans.iter_mut().enumerate() {
        span.trace_id = trace_id;
        if i == 0 {
            span.span_id = identity.span_id();
            span.parent_span_id = identity.parent_span_id();
        }
    }
}

/// Bundles of spans waiting for their ancestry to settle, oldest first.
/// Bounded: when full, the oldest goes out as it is.
pub struct HeldSpans {
    held: VecDeque<(u64, Vec<Span>, IdentityRef)>,
    max: usize,
}

pub type Bundle = (Vec<Span>, IdentityRef);

impl HeldSpans {
    pub fn new(max: usize) -> Self {
        Self { held: VecDeque::new(), max }
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Holds a bundle until `deadline_ns`; returns one pushed out by the bound.
    pub fn hold(&mut self, deadline_ns: u64, spans: Vec<Span>, identity: IdentityRef) -> Option<Bundle> {
        let out = if self.held.len() >= self.max { self.held.pop_front().map(|(_, s, i)| (s, i)) } else { None };
        self.held.push_back((deadline_ns, spans, identity));
        out
    }

    /// Bundles whose ancestry settled (`settled`) or whose time is up (`expired`).
    pub fn release(&mut self, now_ns: u64, settled: &mut Vec<Bundle>, expired: &mut Vec<Bundle>) {
        let mut i = 0;
        while i < self.held.len() {
            let (deadline, _, identity) = &self.held[i];
            let ready = identity.chain_settled();
            if ready || *deadline <= now_ns {
                if let Some((_, spans, identity)) = self.held.remove(i) {
                    if ready { settled.push((spans, identity)) } else { expired.push((spans, identity)) }
                }
            } else {
                i += 1;
            }
        }
    }

    pub fn drain(&mut self) -> impl Iterator<Item = Bundle> + '_ {
        self.held.drain(..).map(|(_, s, i)| (s, i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_follow_a_parent_linked_later() {
        let rng = &mut rand::rng();
        let client = Identity::root(rng, true);
        let server = Identity::root(rng, false);
        let inner = Identity::child_of(&server, rng);
        assert_eq!(inner.trace_id(), server.trace_id());
        assert!(!inner.chain_settled());
        server.link_to(&client).unwrap();
        assert_eq!(inner.trace_id(), client.trace_id());
        assert_eq!(server.parent_span_id(), Some(client.span_id()));
        assert!(inner.chain_settled());
        assert_eq!(server.link_to(&client), Err(LinkRefused::AlreadyLinked));
    }

    #[test]
    fn no_relink_after_export_and_no_cycles() {
        let rng = &mut rand::rng();
        let a = Identity::root(rng, false);
        let b = Identity::child_of(&a, rng);
        b.mark_exported();
        let other = Identity::root(rng, true);
        assert_eq!(a.link_to(&other), Err(LinkRefused::DescendantsExported));
        let c = Identity::root(rng, false);
        let d = Identity::child_of(&c, rng);
        assert_eq!(c.link_to(&d), Err(LinkRefused::Cycle));
    }

    #[test]
    fn remote_parent() {
        let rng = &mut rand::rng();
        let id = Identity::remote_child([7; 16], [9; 8], rng);
        let child = Identity::child_of(&id, rng);
        assert_eq!(child.trace_id(), [7; 16]);
        assert_eq!(id.parent_span_id(), Some([9; 8]));
        assert!(child.chain_settled());
    }
}
