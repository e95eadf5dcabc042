//! A regional proxy's side of `POSTAI SUBSCRIBE`: the lines that open a
//! subscription (continue after the subscriber's position when the
//! [`History`] vouches for every commit since, else start where the stream
//! stands) and the lines that carry each [`Feed`]. The edge's driver frames
//! them as CopyData; the simulation hands them to its sites' subscribers.

use crate::invalidation::Lsn;
use crate::stream::Line;
use crate::stream::history::{Feed, History};

/// The regional's own stream has no position yet: nothing to start from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the CDC stream of this proxy is not open yet; subscribe again")]
pub struct NotOpen;

/// The lines that open a subscription asked to continue after `from` (pass
/// `None` when this proxy keeps no history for resumes), given the last
/// position this proxy's stream applied (`None` before it opened): `O` (the
/// history's origin, when known), then either `C from`, the rows kept since
/// and one `K`, or a `K` where the stream stands. Nothing is emitted when it
/// returns [`NotOpen`].
pub fn opening(
    history: &History,
    from: Option<Lsn>,
    last_applied: Option<Lsn>,
    emit: &mut dyn FnMut(Line<'_>),
) -> Result<(), NotOpen> {
    let kept = from.and_then(|f| Some((f, history.since(f)?)));
    let Some(last_applied) = last_applied.or(kept.as_ref().map(|_| Lsn(0))) else {
        return Err(NotOpen);
    };
    // the history the positions that follow are on: the subscriber
    // continues its own only on the same one
    if let Some(o) = history.origin() {
        emit(Line::Origin(o));
    }
    match kept {
        Some((from, kept)) => {
            // the rows kept since, then one keepalive: the subscriber applies them at once
            emit(Line::Continue(from));
            for (lsn, data) in kept.iter().flat_map(|f| &f.rows) {
                emit(Line::Row { lsn, data });
            }
            let current = kept.iter().filter_map(|f| f.current).max().unwrap_or(0);
            emit(Line::Keepalive(Lsn(current).max(last_applied)));
        }
        // where this proxy's stream stands: every commit up to it was
        // published (a position on the slot's timeline, safe to continue from)
        None => emit(Line::Keepalive(last_applied)),
    }
    Ok(())
}

/// The lines of one published feed: a reset (`O` then `X`), or its rows and
/// a keepalive at the primary's position (at least `last_applied`).
pub fn feed_lines(feed: &Feed, last_applied: u64, emit: &mut dyn FnMut(Line<'_>)) {
    if let Some(start) = feed.reset {
        if let Some(o) = &feed.origin {
            emit(Line::Origin(o));
        }
        emit(Line::Reset(start));
        return;
    }
    for (lsn, data) in &feed.rows {
        emit(Line::Row { lsn, data });
    }
    emit(Line::Keepalive(Lsn(feed.current.unwrap_or(0).max(last_applied))));
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::stream::subscriber::Subscriber;
    use crate::stream::{Record, fmt_lsn};

    fn lines(history: &History, from: Option<Lsn>, last: u64) -> Result<Vec<String>, NotOpen> {
        let mut out = Vec::new();
        opening(history, from, (last > 0).then_some(Lsn(last)), &mut |l| out.push(l.to_text()))?;
        Ok(out)
    }

    fn feed(commit: u64) -> Arc<Feed> {
        let lsn = fmt_lsn(Lsn(commit));
        Arc::new(Feed {
            rows: vec![(lsn.clone(), "BEGIN".into()), (lsn, "COMMIT".into())],
            current: Some(commit),
            max_commit: Some(Lsn(commit)),
            ..Feed::default()
        })
    }

    #[test]
    fn a_subscription_continues_only_where_the_history_vouches() {
        let mut h = History::default();
        assert_eq!(lines(&h, None, 0), Err(NotOpen), "nothing to start from");
        h.set_origin(Some("7/1".into()));
        h.start_at(Lsn(100));
        h.push(feed(110), 100);
        assert_eq!(lines(&h, None, 110).expect("open"), ["O 7/1", "K 0/6E"]);
        assert_eq!(lines(&h, Some(Lsn(90)), 110).expect("open"), ["O 7/1", "K 0/6E"], "before the history");
        assert_eq!(
            lines(&h, Some(Lsn(100)), 110).expect("open"),
            ["O 7/1", "C 0/64", "R 0/6E\tBEGIN", "R 0/6E\tCOMMIT", "K 0/6E"]
        );
        assert_eq!(lines(&h, Some(Lsn(100)), 0).map(|l| l.len()), Ok(5), "a kept history opens the stream");
    }

    #[test]
    fn a_subscriber_resumes_through_the_lines_and_a_reset_starts_a_new_history() {
        let mut h = History::default();
        h.set_origin(Some("7/1".into()));
        h.start_at(Lsn(100));
        let mut sub = Subscriber::new();
        let mut decode = |lsn: &str, data: &str| match data {
            "BEGIN" => Record::Begin,
            _ => Record::Commit(crate::stream::parse_lsn(lsn)),
        };
        let mut steps = Vec::new();
        let from = sub.connect(None);
        opening(&h, from, Some(Lsn(100)), &mut |l| steps.push(sub.handle_line(l, &mut decode))).expect("open");
        assert!(steps.iter().any(|s| s.new_history), "a first subscription knows nothing before it");
        let f = feed(110);
        h.push(f.clone(), 100);
        steps.clear();
        feed_lines(&f, 110, &mut |l| steps.push(sub.handle_line(l, &mut decode)));
        assert_eq!(sub.last(), Lsn(110));
        // the subscriber reconnects: it continues after 110, nothing dropped
        let from = sub.connect(None);
        assert_eq!(from, Some(Lsn(110)));
        steps.clear();
        opening(&h, from, Some(Lsn(110)), &mut |l| steps.push(sub.handle_line(l, &mut decode))).expect("open");
        assert!(steps.iter().any(|s| s.resumed) && !steps.iter().any(|s| s.new_history));
        // a new slot (a failover): the reset reaches the subscriber as a new history
        let reset = Feed { reset: Some(Lsn(200)), origin: Some("7/2".into()), ..Feed::default() };
        steps.clear();
        feed_lines(&reset, 110, &mut |l| steps.push(sub.handle_line(l, &mut decode)));
        assert!(steps.iter().any(|s| s.new_history));
        assert_eq!(sub.last(), Lsn(200));
    }
}
