//! What one look at a scaled group decides, from what the leader remembers of it:
//! pure, so the windows' rules are tested without servers or clocks.
//!
//! Every look recommends `ceil(load / target)` replicas (the larger answer of the
//! two targets when both are set, at least one while requests arrive). The count
//! rises to the smallest recommendation of the scale-up window and falls to the
//! largest of the scale-down window, so it moves only when the whole window
//! agrees; a leader that has not watched a group for a whole window yet leaves
//! that direction alone. A group with `min` 0 and no request for its idle time
//! goes to zero; at zero only requests waiting at the gateway bring it back.

use std::collections::VecDeque;

use aigrid_api::{Scaling, Span};

/// What the leader measured of a group at one look.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Observation {
    /// Requests its replicas are serving, summed.
    pub in_flight: f64,
    /// Tokens per second its replicas generate, summed.
    pub tokens_per_second: f64,
    /// Requests per second its replicas answer, summed.
    pub requests_per_second: f64,
    /// Requests waiting at this server's gateway for a first ready replica.
    pub held: usize,
}

impl Observation {
    fn active(&self) -> bool {
        self.in_flight > 0.0
            || self.requests_per_second > 0.0
            || self.tokens_per_second > 0.0
            || self.held > 0
    }

    /// The load in words, as reasons give it.
    fn words(&self, scaling: &Scaling) -> String {
        let mut parts = Vec::new();
        if scaling.target_concurrency.is_some() {
            parts.push(format!("{} requests in flight", round(self.in_flight)));
        }
        if scaling.target_tokens_per_second.is_some() {
            parts.push(format!("{} tokens/s", round(self.tokens_per_second)));
        }
        parts.join(" and ")
    }
}

fn round(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

/// A change of count the leader commits, with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The new count.
    pub to: u32,
    /// Why, in words.
    pub reason: String,
}

/// What the leader remembers of one group between looks.
#[derive(Debug, Clone)]
pub struct Tracker {
    /// `(ms, recommended replicas)` of the looks within the longest window.
    recommended: VecDeque<(u64, u32)>,
    /// Since when this leader watches the group.
    since: u64,
    /// When it last saw a request, if it did.
    last_active: Option<u64>,
}

impl Tracker {
    /// A group first watched at `now` (milliseconds).
    pub fn new(now: u64) -> Self {
        Tracker {
            recommended: VecDeque::new(),
            since: now,
            last_active: None,
        }
    }

    /// Replicas `observation` wants under `scaling`'s targets.
    pub fn recommend(scaling: &Scaling, observation: &Observation) -> u32 {
        let want =
            |load: f64, target: Option<u32>| target.map_or(0.0, |t| (load / f64::from(t)).ceil());
        let replicas = want(observation.in_flight, scaling.target_concurrency).max(want(
            observation.tokens_per_second,
            scaling.target_tokens_per_second,
        ));
        let replicas = replicas.min(f64::from(u32::MAX)) as u32;
        if observation.active() {
            replicas.max(1)
        } else {
            replicas
        }
    }

    /// One look at `now` at a group of `count` replicas: the change to commit, if
    /// any.
    pub fn look(
        &mut self,
        now: u64,
        scaling: &Scaling,
        count: u32,
        observation: &Observation,
    ) -> Option<Decision> {
        if observation.active() {
            self.last_active = Some(now);
        }
        let recommended = Self::recommend(scaling, observation);
        let up = scaling.scale_up_window.as_millis();
        let down = scaling.scale_down_window.as_millis();
        self.recommended.push_back((now, recommended));
        let oldest = now.saturating_sub(up.max(down));
        while self.recommended.front().is_some_and(|(at, _)| *at < oldest) {
            self.recommended.pop_front();
        }
        let watched = now.saturating_sub(self.since);

        if count == 0 {
            // The idle time counts from the wake: a server's gateway wakes the
            // group at once for a request it holds, between two looks, and that
            // request may be answered before the next look sees it, which must
            // not find the group idle since before it went to zero.
            self.last_active = Some(now);
            // Requests waiting here bring the group back (a server's gateway wakes
            // it too, at once); nothing else does.
            return (observation.held > 0).then(|| Decision {
                to: scaling.min.max(1),
                reason: format!("{} requests waiting at the gateway", observation.held),
            });
        }
        if let Some(idle) = scaling.idle_limit() {
            let quiet = now.saturating_sub(self.last_active.unwrap_or(self.since));
            if quiet >= idle.as_millis() && watched >= idle.as_millis() {
                return Some(Decision {
                    to: 0,
                    reason: format!("no request for {idle}"),
                });
            }
        }
        let lowest = scaling.min.max(1);
        let within = |window: u64| {
            self.recommended
                .iter()
                .filter(move |(at, _)| now.saturating_sub(*at) <= window)
                .map(|(_, r)| *r)
        };
        let rise = within(up).min().unwrap_or(recommended);
        let rise = rise.clamp(lowest, scaling.max);
        if rise > count && watched >= up {
            return Some(Decision {
                to: rise,
                reason: format!(
                    "load rose: {} want {rise} replicas at {} each, for {}",
                    observation.words(scaling),
                    scaling.targets(),
                    Span::from_millis(up),
                ),
            });
        }
        let fall = within(down).max().unwrap_or(recommended);
        let fall = fall.clamp(lowest, scaling.max);
        if fall < count && watched >= down {
            return Some(Decision {
                to: fall,
                reason: format!(
                    "load fell: at most {fall} replicas wanted at {} each for {} ({} now)",
                    scaling.targets(),
                    Span::from_millis(down),
                    observation.words(scaling),
                ),
            });
        }
        None
    }
}

/// How a group of `count` reaches `to` where it may reach `room` without its
/// circle's quorum (`None`: without limit): the count to commit directly, and the
/// count to propose, if growing past the room needs one. A fall is always direct.
pub fn within_room(count: u32, to: u32, room: Option<u32>) -> (u32, Option<u32>) {
    match room {
        Some(room) if to > room && to > count => (room.max(count).min(to), Some(to)),
        _ => (to, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scaling(min: u32, max: u32, up: u64, down: u64, idle: Option<u64>) -> Scaling {
        Scaling {
            min,
            max,
            target_concurrency: Some(4),
            target_tokens_per_second: None,
            scale_up_window: Span::from_secs(up),
            scale_down_window: Span::from_secs(down),
            idle_to_zero: idle.map(Span::from_secs),
        }
    }

    fn load(in_flight: f64) -> Observation {
        Observation {
            in_flight,
            ..Observation::default()
        }
    }

    /// Looks once a second from `from` to `to` seconds with `obs`, the count
    /// following each decision; answers the count and the decisions' times.
    fn run(
        tracker: &mut Tracker,
        s: &Scaling,
        count: &mut u32,
        from: u64,
        to: u64,
        obs: Observation,
    ) -> Vec<(u64, u32)> {
        let mut changes = Vec::new();
        for sec in from..=to {
            if let Some(d) = tracker.look(sec * 1000, s, *count, &obs) {
                assert!(!d.reason.is_empty());
                *count = d.to;
                changes.push((sec, d.to));
            }
        }
        changes
    }

    #[test]
    fn recommendations_follow_the_larger_target_and_one_replica_serves_any_request() {
        let mut s = scaling(0, 10, 0, 0, None);
        assert_eq!(Tracker::recommend(&s, &load(0.0)), 0);
        assert_eq!(Tracker::recommend(&s, &load(0.5)), 1);
        assert_eq!(Tracker::recommend(&s, &load(8.0)), 2);
        assert_eq!(Tracker::recommend(&s, &load(9.0)), 3);
        s.target_tokens_per_second = Some(100);
        let both = Observation {
            in_flight: 4.0,
            tokens_per_second: 450.0,
            ..Observation::default()
        };
        assert_eq!(Tracker::recommend(&s, &both), 5);
        let answered = Observation {
            requests_per_second: 0.2,
            ..Observation::default()
        };
        assert_eq!(Tracker::recommend(&s, &answered), 1);
    }

    #[test]
    fn a_rise_is_followed_after_the_up_window_and_a_spike_shorter_than_it_is_not() {
        let s = scaling(1, 8, 10, 60, None);
        let mut t = Tracker::new(0);
        let mut count = 1;
        assert!(run(&mut t, &s, &mut count, 0, 30, load(3.0)).is_empty());
        // A 5 s spike inside a 10 s window adds nothing.
        assert!(run(&mut t, &s, &mut count, 31, 35, load(30.0)).is_empty());
        assert!(run(&mut t, &s, &mut count, 36, 50, load(3.0)).is_empty());
        // A lasting rise: the window's smallest wish is 5 replicas once the 10 s
        // before hold nothing smaller.
        let changes = run(&mut t, &s, &mut count, 51, 70, load(20.0));
        assert_eq!(changes, vec![(61, 5)]);
        // Past max, max.
        let changes = run(&mut t, &s, &mut count, 71, 90, load(100.0));
        assert_eq!(changes, vec![(81, 8)]);
    }

    #[test]
    fn a_fall_is_followed_only_once_the_down_window_agrees() {
        let s = scaling(1, 8, 0, 60, None);
        let mut t = Tracker::new(0);
        let mut count = 1;
        assert_eq!(run(&mut t, &s, &mut count, 0, 5, load(24.0)), vec![(0, 6)]);
        // The load falls to 2 replicas' worth at 6 s; the window still holds 6
        // until 60 s later.
        let changes = run(&mut t, &s, &mut count, 6, 80, load(7.0));
        assert_eq!(changes, vec![(66, 2)]);
        // Idle with min 1: down to 1, never to 0.
        let changes = run(&mut t, &s, &mut count, 81, 300, load(0.0));
        assert_eq!(changes, vec![(141, 1)]);
    }

    #[test]
    fn an_idle_group_goes_to_zero_and_only_waiting_requests_bring_it_back() {
        let s = scaling(0, 4, 0, 30, Some(120));
        let mut t = Tracker::new(0);
        let mut count = 2;
        assert!(run(&mut t, &s, &mut count, 0, 10, load(5.0)).is_empty());
        // Quiet from 11 s: down to one replica after the 30 s window, to zero once
        // 120 s passed without a request.
        let changes = run(&mut t, &s, &mut count, 11, 200, load(0.0));
        assert_eq!(changes, vec![(41, 1), (130, 0)]);
        // At zero, an idle look changes nothing.
        assert!(run(&mut t, &s, &mut count, 201, 220, load(0.0)).is_empty());
        let waiting = Observation {
            held: 3,
            ..Observation::default()
        };
        let d = t.look(221_000, &s, 0, &waiting).unwrap();
        assert_eq!(d.to, 1);
        assert_eq!(d.reason, "3 requests waiting at the gateway");
    }

    /// Woken by a gateway between two looks for a request answered before the
    /// next look, the group keeps its replica for its whole idle time.
    #[test]
    fn a_group_woken_between_looks_is_idle_only_from_its_wake() {
        let s = scaling(0, 4, 0, 2, Some(3));
        let mut t = Tracker::new(0);
        let mut count = 1;
        let changes = run(&mut t, &s, &mut count, 0, 10, load(0.0));
        assert_eq!(changes, vec![(3, 0)]);
        // At zero until 20 s; the gateway wakes it at 20.5 s and the request is
        // answered by 21 s, when the next look sees nothing in flight.
        assert!(run(&mut t, &s, &mut count, 11, 20, load(0.0)).is_empty());
        count = 1;
        let changes = run(&mut t, &s, &mut count, 21, 30, load(0.0));
        assert_eq!(changes, vec![(23, 0)]);
    }

    #[test]
    fn a_new_leader_waits_a_whole_window_before_it_acts() {
        let s = scaling(0, 4, 10, 30, Some(60));
        // A leader taking over a quiet group of 3 removes none before its windows.
        let mut t = Tracker::new(1_000_000);
        let mut count = 3;
        let changes = run(&mut t, &s, &mut count, 1000, 1100, load(0.0));
        assert_eq!(changes, vec![(1030, 1), (1060, 0)]);
        let mut t = Tracker::new(1_000_000);
        let mut count = 1;
        let changes = run(&mut t, &s, &mut count, 1000, 1020, load(16.0));
        assert_eq!(changes, vec![(1010, 4)]);
    }

    #[test]
    fn growth_past_the_room_is_proposed_and_the_rest_is_direct() {
        // No limit: everything direct.
        assert_eq!(within_room(1, 4, None), (4, None));
        // Within the room.
        assert_eq!(within_room(1, 2, Some(3)), (2, None));
        // Past it: up to the room at once, the whole way proposed.
        assert_eq!(within_room(1, 4, Some(2)), (2, Some(4)));
        // Already at or past the room (an approval took it there): nothing direct.
        assert_eq!(within_room(3, 4, Some(2)), (3, Some(4)));
        // A fall is direct, wherever the room is.
        assert_eq!(within_room(4, 3, Some(1)), (3, None));
        assert_eq!(within_room(4, 0, Some(0)), (0, None));
    }
}
