//! What the answers being relayed reflect, and telling it to a postai
//! proxy downstream.

use bytes::BytesMut;
use postai_core::Lsn;

use crate::protocol;

/// What the answers being relayed reflect (every commit up to an LSN, for the
/// rows they read): what a fill is filed at, and what a client that asked
/// is told (`protocol::ANSWER_LSN`: a postai proxy downstream, which must
/// file an answer from this proxy's cache at what that entry reflects, not
/// at the primary's current position).
#[derive(Debug, Default)]
pub struct Answers {
    /// The client asked to be told.
    pub tell: bool,
    /// If PostgreSQL itself answers: a lower bound of its snapshot, taken
    /// before the request was sent (the primary's LSN seen, a replica's replay).
    pub floor: Option<Lsn>,
    /// The upstream is a postai proxy: only its word counts.
    upstream_tells: bool,
    /// What it told for the answer being relayed.
    told: Option<Lsn>,
    /// What the last relayed answer reflects; `None`: unknown (not filed).
    pub at: Option<Lsn>,
}

impl Answers {
    /// `tell`: the client asked to be told.
    pub fn new(tell: bool) -> Answers {
        Answers { tell, ..Answers::default() }
    }

    /// A relay starts, on a connection to a postai proxy (`tells`) or not.
    pub fn start(&mut self, tells: bool) {
        self.upstream_tells = tells;
        self.told = None;
        self.at = None;
    }

    /// The upstream's word on the answer being relayed (`None`: unreadable).
    pub fn told(&mut self, lsn: Option<Lsn>) {
        self.told = lsn;
    }

    /// The relay's ReadyForQuery: what its answers reflect.
    pub fn end(&mut self) -> Option<Lsn> {
        let floor = self.floor.take();
        self.at = if self.upstream_tells { self.told.take() } else { floor };
        self.at
    }

    /// Tells `at` to a client that asked, in `out` (before a ReadyForQuery).
    pub fn tell(&self, out: &mut BytesMut, at: Option<Lsn>) {
        if self.tell
            && let Some(l) = at
        {
            out.extend_from_slice(&protocol::parameter_status(protocol::ANSWER_LSN, &postai_core::stream::fmt_lsn(l)));
        }
    }
}
