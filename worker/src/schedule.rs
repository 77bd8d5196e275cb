//! The order of one sync's tasks: which service may start now, and which services a failure
//! blocks. Pure: the sync loop asks it what to start and tells it how each task ended.
//!
//! A service starts only once every service of the same sync it comes `after` has synced; of
//! the services that may start, the first in key order starts first, so the order is the same
//! every time. A service whose predecessor did not sync never starts: it is blocked, and so
//! is every service after it.

/// Where one service of the sync is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
    Synced,
    /// Ran and did not sync (failed, timed out, refused).
    NotSynced,
    /// Never ran: the service at this index, which did not sync, comes before it.
    Blocked {
        by: usize,
    },
}

/// The order of one sync's services, given by index in the sync's (key-ordered) list.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// For each service, the services of this sync it comes after.
    waits_for: Vec<Vec<usize>>,
    state: Vec<State>,
}

impl Schedule {
    /// `after(key)` names the services `key` comes after; those not in `keys` do not hold it.
    pub fn new<'a>(keys: &[&str], after: impl Fn(&str) -> &'a [String]) -> Self {
        let waits_for = keys
            .iter()
            .map(|key| {
                let mut before: Vec<usize> = after(key)
                    .iter()
                    .filter_map(|name| keys.iter().position(|k| k == name))
                    .collect();
                before.sort_unstable();
                before.dedup();
                before
            })
            .collect();
        Schedule {
            waits_for,
            state: vec![State::Waiting; keys.len()],
        }
    }

    /// The first waiting service whose predecessors have all synced, now marked running.
    pub fn start_next(&mut self) -> Option<usize> {
        let next = (0..self.state.len()).find(|&i| {
            self.state[i] == State::Waiting
                && self.waits_for[i]
                    .iter()
                    .all(|&before| self.state[before] == State::Synced)
        })?;
        self.state[next] = State::Running;
        Some(next)
    }

    /// Records how the running service `i` ended. Returns the services this blocks, each with
    /// the service that did not sync at the root of it, in index order.
    pub fn finish(&mut self, i: usize, synced: bool) -> Vec<(usize, usize)> {
        self.state[i] = if synced {
            State::Synced
        } else {
            State::NotSynced
        };
        let mut blocked = Vec::new();
        // Blocking one service may block those after it: repeat until nothing changes.
        loop {
            let newly: Vec<(usize, usize)> = (0..self.state.len())
                .filter(|&j| self.state[j] == State::Waiting)
                .filter_map(|j| {
                    self.waits_for[j]
                        .iter()
                        .find_map(|&before| self.root_failure(before))
                        .map(|root| (j, root))
                })
                .collect();
            if newly.is_empty() {
                break;
            }
            for &(j, root) in &newly {
                self.state[j] = State::Blocked { by: root };
            }
            blocked.extend(newly);
        }
        blocked.sort_unstable();
        blocked
    }

    /// The service that did not sync behind `i`, when `i` did not sync or is blocked.
    fn root_failure(&self, i: usize) -> Option<usize> {
        match self.state[i] {
            State::NotSynced => Some(i),
            State::Blocked { by } => Some(by),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn schedule(keys: &[&str], after: &[(&str, &[&str])]) -> Schedule {
        let after: BTreeMap<&str, Vec<String>> = after
            .iter()
            .map(|(k, v)| (*k, v.iter().map(|s| s.to_string()).collect()))
            .collect();
        Schedule::new(keys, |k| after.get(k).map_or(&[][..], |v| v.as_slice()))
    }

    fn start_all(s: &mut Schedule) -> Vec<usize> {
        std::iter::from_fn(|| s.start_next()).collect()
    }

    #[test]
    fn without_order_every_service_may_start_in_key_order() {
        let mut s = schedule(&["a/a", "a/b", "a/c"], &[]);
        assert_eq!(start_all(&mut s), [0, 1, 2]);
        assert_eq!(s.start_next(), None);
    }

    #[test]
    fn a_service_waits_until_what_it_comes_after_has_synced() {
        // a/a after a/c; a/b after a/a and a service not in this sync.
        let mut s = schedule(
            &["a/a", "a/b", "a/c"],
            &[("a/a", &["a/c"]), ("a/b", &["a/a", "x/elsewhere"])],
        );
        assert_eq!(start_all(&mut s), [2]);
        assert!(s.finish(2, true).is_empty());
        assert_eq!(start_all(&mut s), [0]);
        assert!(s.finish(0, true).is_empty());
        assert_eq!(start_all(&mut s), [1]);
    }

    #[test]
    fn a_failure_blocks_every_service_after_it_naming_the_failure() {
        let mut s = schedule(
            &["a/app", "a/db", "a/web", "a/other"],
            &[("a/app", &["a/db"]), ("a/web", &["a/app"])],
        );
        assert_eq!(start_all(&mut s), [1, 3]);
        assert_eq!(s.finish(1, false), [(0, 1), (2, 1)]);
        assert!(s.finish(3, true).is_empty());
        assert_eq!(s.start_next(), None);
    }

    #[test]
    fn a_service_blocked_while_another_predecessor_still_runs_is_blocked_at_once() {
        let mut s = schedule(&["a/a", "a/b", "a/c"], &[("a/c", &["a/a", "a/b"])]);
        assert_eq!(start_all(&mut s), [0, 1]);
        assert_eq!(s.finish(0, false), [(2, 0)]);
        assert!(s.finish(1, true).is_empty());
        assert_eq!(s.start_next(), None);
    }
}
