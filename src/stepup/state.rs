//! A change's life as pure functions of `(change, event, now)`. Nothing here touches the
//! database or the clock: the store applies a [`Transition`] with a conditional update
//! (`WHERE id = ? AND state = ?`), which is what makes "one approval, one release" hold across
//! threads and instances.

use std::fmt;
use std::time::Duration;

use time::OffsetDateTime;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Held,
    CoolingOff,
    /// Released: the request is being forwarded. A lease says until when the releasing
    /// instance owns the forward; after a crash the lease runs out and a later release may
    /// forward again, with the same `Idempotency-Key`.
    Applying,
    Applied,
    Cancelled,
    Expired,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Held => "held",
            State::CoolingOff => "cooling_off",
            State::Applying => "applying",
            State::Applied => "applied",
            State::Cancelled => "cancelled",
            State::Expired => "expired",
        }
    }

    pub fn parse(text: &str) -> Option<State> {
        Some(match text {
            "held" => State::Held,
            "cooling_off" => State::CoolingOff,
            "applying" => State::Applying,
            "applied" => State::Applied,
            "cancelled" => State::Cancelled,
            "expired" => State::Expired,
            _ => return None,
        })
    }

    /// Held and cooling-off changes can still move; the others are final.
    pub fn is_pending(self) -> bool {
        matches!(self, State::Held | State::CoolingOff)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A held request and where it is in its life.
#[derive(Debug, Clone)]
pub struct Change {
    pub id: Uuid,
    pub user_id: String,
    pub rule: String,
    pub method: String,
    /// Canonical path, as matched and as it will be forwarded.
    pub path: String,
    pub query: Option<String>,
    /// End-to-end headers of the held request that carry meaning for the upstream (no
    /// credentials), for display and for a later auto-release.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// SHA-256 over the canonical request; a release must carry the same.
    pub digest: String,
    pub summary: String,
    pub state: State,
    pub cooling_off: Duration,
    pub release_within: Duration,
    pub created_at: OffsetDateTime,
    pub confirm_before: OffsetDateTime,
    pub confirmed_at: Option<OffsetDateTime>,
    pub release_at: Option<OffsetDateTime>,
    pub release_before: Option<OffsetDateTime>,
    /// When it became applied, cancelled or expired.
    pub finished_at: Option<OffsetDateTime>,
    /// While `applying`: until when the current forward owns the change.
    pub lease_until: Option<OffsetDateTime>,
    /// How many times the request was forwarded (more than one only after a crash or an
    /// unknown outcome, always with the same `Idempotency-Key`).
    pub release_attempts: i64,
    /// The upstream's status code for the forward that applied the change.
    pub outcome_status: Option<u16>,
    /// Set when a young passkey confirmed it: `release_at` was moved to this time.
    pub quarantined_until: Option<OffsetDateTime>,
}

impl Change {
    /// Whether a deadline has passed so that the change must become `expired`.
    pub fn lapsed(&self, now: OffsetDateTime) -> bool {
        match self.state {
            State::Held => now > self.confirm_before,
            State::CoolingOff => self.release_before.is_some_and(|until| now > until),
            _ => false,
        }
    }
}

impl Change {
    /// The change as it is after `t` was stored: the same write the store makes.
    pub fn after(mut self, t: &Transition) -> Change {
        self.state = t.to;
        self.confirmed_at = t.confirmed_at.or(self.confirmed_at);
        self.release_at = t.release_at.or(self.release_at);
        self.release_before = t.release_before.or(self.release_before);
        self.lease_until = t.lease_until.or(self.lease_until);
        self.outcome_status = t.outcome_status.or(self.outcome_status);
        self.quarantined_until = t.quarantined_until.or(self.quarantined_until);
        self.release_attempts += i64::from(t.counts_attempt);
        if !t.to.is_pending() && self.finished_at.is_none() {
            self.finished_at = Some(t.at);
        }
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A passkey assertion for this change; `not_before` is the confirming passkey's end of
    /// quarantine, if any: the release may not come before it.
    Confirm {
        not_before: Option<OffsetDateTime>,
    },
    /// A change the gate itself carries out (adding or removing a passkey) is done once its
    /// cooling-off is over; nothing is forwarded.
    Complete,
    /// Take the change for forwarding, owning it until `lease_until`.
    Release {
        lease_until: OffsetDateTime,
    },
    /// The upstream answered the forward with this status.
    Delivered {
        status: u16,
    },
    /// The forward never reached the upstream (connection refused): give the lease back so
    /// the client can retry at once.
    Undelivered,
    Cancel,
    Expire,
}

/// What the store must write: the move and the timestamps it sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    pub at: OffsetDateTime,
    pub confirmed_at: Option<OffsetDateTime>,
    pub release_at: Option<OffsetDateTime>,
    pub release_before: Option<OffsetDateTime>,
    pub lease_until: Option<OffsetDateTime>,
    /// Whether this move is one more forward of the request.
    pub counts_attempt: bool,
    pub outcome_status: Option<u16>,
    pub quarantined_until: Option<OffsetDateTime>,
}

/// Why an event cannot happen now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A deadline passed: the caller should apply [`Event::Expire`] and report `change_expired`.
    Lapsed,
    NotConfirmed,
    CoolingOff {
        release_at: OffsetDateTime,
    },
    NotHeld,
    Cancelled,
    Expired,
    /// Applied already, with the upstream's status when known.
    AlreadyApplied {
        outcome_status: Option<u16>,
    },
    /// Another release is forwarding it right now.
    Applying,
    /// An expiry asked for before any deadline passed.
    NotDue,
    /// An outcome reported for a change that is not being applied.
    NotApplying,
}

pub fn transition(
    change: &Change,
    event: Event,
    now: OffsetDateTime,
) -> Result<Transition, Refusal> {
    let moved = |to: State| Transition {
        from: change.state,
        to,
        at: now,
        confirmed_at: None,
        release_at: None,
        release_before: None,
        lease_until: None,
        counts_attempt: false,
        outcome_status: None,
        quarantined_until: None,
    };
    let applied = Refusal::AlreadyApplied {
        outcome_status: change.outcome_status,
    };
    match (change.state, event) {
        (State::Applied | State::Cancelled | State::Expired, Event::Expire) => Err(Refusal::NotDue),
        (State::Applied, _) => Err(applied),
        (State::Cancelled, _) => Err(Refusal::Cancelled),
        (State::Expired, _) => Err(Refusal::Expired),

        (State::Held | State::CoolingOff, Event::Expire) => {
            if change.lapsed(now) {
                Ok(moved(State::Expired))
            } else {
                Err(Refusal::NotDue)
            }
        }
        // Cancelling must always be easy, even past a deadline: the user wants it stopped.
        (State::Held | State::CoolingOff, Event::Cancel) => Ok(moved(State::Cancelled)),

        (State::Held, Event::Confirm { not_before }) => {
            if change.lapsed(now) {
                return Err(Refusal::Lapsed);
            }
            let cooled = now + change.cooling_off;
            // A passkey in quarantine can confirm, but the release waits for the quarantine.
            let quarantined_until = not_before.filter(|until| *until > cooled);
            let release_at = quarantined_until.unwrap_or(cooled);
            Ok(Transition {
                confirmed_at: Some(now),
                release_at: Some(release_at),
                release_before: Some(release_at + change.release_within),
                quarantined_until,
                ..moved(State::CoolingOff)
            })
        }
        (State::CoolingOff, Event::Confirm { .. }) => Err(Refusal::NotHeld),
        (State::CoolingOff, Event::Complete) => match change.release_at {
            Some(release_at) if now >= release_at => Ok(moved(State::Applied)),
            Some(release_at) => Err(Refusal::CoolingOff { release_at }),
            None => Err(Refusal::NotConfirmed),
        },
        (State::Held, Event::Complete) => Err(Refusal::NotConfirmed),
        (State::Applying, Event::Complete) => Err(Refusal::Applying),

        (State::Held, Event::Release { .. }) => {
            if change.lapsed(now) {
                Err(Refusal::Lapsed)
            } else {
                Err(Refusal::NotConfirmed)
            }
        }
        (State::CoolingOff, Event::Release { lease_until }) => {
            if change.lapsed(now) {
                return Err(Refusal::Lapsed);
            }
            match change.release_at {
                Some(release_at) if now >= release_at => Ok(Transition {
                    lease_until: Some(lease_until),
                    counts_attempt: true,
                    ..moved(State::Applying)
                }),
                Some(release_at) => Err(Refusal::CoolingOff { release_at }),
                // A cooling-off change always has release_at; treat a broken row as not ready.
                None => Err(Refusal::NotConfirmed),
            }
        }
        (State::Held | State::CoolingOff, Event::Delivered { .. } | Event::Undelivered) => {
            Err(Refusal::NotApplying)
        }

        // Applying: the release was given; only the forward's outcome, or a retry after the
        // lease ran out (the forwarding instance died), moves it. It can no longer be
        // cancelled or expire: the request may already have reached the upstream.
        (State::Applying, Event::Release { lease_until }) => match change.lease_until {
            Some(current) if now < current => Err(Refusal::Applying),
            _ => Ok(Transition {
                lease_until: Some(lease_until),
                counts_attempt: true,
                ..moved(State::Applying)
            }),
        },
        (State::Applying, Event::Delivered { status }) => Ok(Transition {
            outcome_status: Some(status),
            ..moved(State::Applied)
        }),
        (State::Applying, Event::Undelivered) => Ok(Transition {
            lease_until: Some(now),
            ..moved(State::Applying)
        }),
        (State::Applying, Event::Confirm { .. }) => Err(Refusal::NotHeld),
        (State::Applying, Event::Cancel | Event::Expire) => Err(Refusal::Applying),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);

    fn held(now: OffsetDateTime) -> Change {
        Change {
            id: Uuid::new_v4(),
            user_id: "alice".into(),
            rule: "enable-withdrawals".into(),
            method: "PUT".into(),
            path: "/api/v1/api-keys/k1".into(),
            query: None,
            headers: vec![],
            body: b"{}".to_vec(),
            digest: "d".into(),
            summary: "s".into(),
            state: State::Held,
            cooling_off: 24 * HOUR,
            release_within: 24 * HOUR,
            created_at: now,
            confirm_before: now + 10 * MIN,
            confirmed_at: None,
            release_at: None,
            release_before: None,
            finished_at: None,
            lease_until: None,
            release_attempts: 0,
            outcome_status: None,
            quarantined_until: None,
        }
    }

    fn release(at: OffsetDateTime) -> Event {
        Event::Release {
            lease_until: at + MIN,
        }
    }

    fn apply(change: &mut Change, t: &Transition) {
        *change = change.clone().after(t);
    }

    #[test]
    fn happy_path_held_confirm_cool_release() {
        let t0 = OffsetDateTime::now_utc();
        let mut c = held(t0);
        assert_eq!(transition(&c, release(t0), t0), Err(Refusal::NotConfirmed));
        let confirm = transition(&c, Event::Confirm { not_before: None }, t0 + MIN).unwrap();
        assert_eq!(confirm.to, State::CoolingOff);
        assert_eq!(confirm.release_at, Some(t0 + MIN + 24 * HOUR));
        apply(&mut c, &confirm);
        assert_eq!(
            transition(&c, release(t0), t0 + 2 * MIN),
            Err(Refusal::CoolingOff {
                release_at: t0 + MIN + 24 * HOUR
            })
        );
        let due = t0 + MIN + 24 * HOUR;
        let taken = transition(&c, release(due), due).unwrap();
        assert_eq!(taken.to, State::Applying);
        assert!(taken.counts_attempt);
        assert_eq!(taken.lease_until, Some(due + MIN));
        apply(&mut c, &taken);
        assert_eq!(c.release_attempts, 1);
        assert_eq!(transition(&c, Event::Cancel, due), Err(Refusal::Applying));
        let delivered = transition(&c, Event::Delivered { status: 200 }, due).unwrap();
        assert_eq!(delivered.to, State::Applied);
        apply(&mut c, &delivered);
        assert_eq!(c.finished_at, Some(due));
        let applied = Err(Refusal::AlreadyApplied {
            outcome_status: Some(200),
        });
        assert_eq!(transition(&c, release(due), t0 + 25 * HOUR), applied);
        assert_eq!(transition(&c, Event::Cancel, t0 + 25 * HOUR), applied);
    }

    #[test]
    fn deadlines_lapse_into_expiry() {
        let t0 = OffsetDateTime::now_utc();
        let mut c = held(t0);
        assert_eq!(
            transition(&c, Event::Confirm { not_before: None }, t0 + 11 * MIN),
            Err(Refusal::Lapsed)
        );
        assert_eq!(
            transition(&c, Event::Expire, t0 + 5 * MIN),
            Err(Refusal::NotDue)
        );
        let expire = transition(&c, Event::Expire, t0 + 11 * MIN).unwrap();
        assert_eq!(expire.to, State::Expired);

        let confirm = transition(&c, Event::Confirm { not_before: None }, t0).unwrap();
        apply(&mut c, &confirm);
        let late = t0 + 24 * HOUR + 24 * HOUR + MIN;
        assert_eq!(transition(&c, release(late), late), Err(Refusal::Lapsed));
        assert_eq!(
            transition(&c, Event::Expire, late).unwrap().to,
            State::Expired
        );
    }

    #[test]
    fn cancel_from_pending_states_only() {
        let t0 = OffsetDateTime::now_utc();
        let mut c = held(t0);
        assert_eq!(
            transition(&c, Event::Cancel, t0).unwrap().to,
            State::Cancelled
        );
        let confirm = transition(&c, Event::Confirm { not_before: None }, t0).unwrap();
        apply(&mut c, &confirm);
        assert_eq!(
            transition(&c, Event::Cancel, t0).unwrap().to,
            State::Cancelled
        );
        assert_eq!(
            transition(&c, Event::Confirm { not_before: None }, t0),
            Err(Refusal::NotHeld)
        );
        c.state = State::Cancelled;
        assert_eq!(transition(&c, release(t0), t0), Err(Refusal::Cancelled));
        c.state = State::Expired;
        assert_eq!(transition(&c, Event::Cancel, t0), Err(Refusal::Expired));
    }

    #[test]
    fn a_release_whose_forward_was_lost_can_be_retried_only_after_the_lease() {
        let t0 = OffsetDateTime::now_utc();
        let mut c = held(t0);
        c.cooling_off = Duration::ZERO;
        let confirm = transition(&c, Event::Confirm { not_before: None }, t0).unwrap();
        apply(&mut c, &confirm);
        let taken = transition(&c, release(t0), t0).unwrap();
        apply(&mut c, &taken);
        // While the first forward owns the lease, nobody else forwards.
        let before_lease_end = t0 + Duration::from_secs(59);
        assert_eq!(
            transition(&c, release(t0), before_lease_end),
            Err(Refusal::Applying)
        );
        // The forwarding instance died: after the lease, a retry takes it again.
        let retry = transition(&c, release(t0 + MIN), t0 + MIN).unwrap();
        assert_eq!(retry.to, State::Applying);
        assert!(retry.counts_attempt);
        apply(&mut c, &retry);
        assert_eq!(c.release_attempts, 2);
        // A refused connection gives the lease back at once.
        let given_back = transition(&c, Event::Undelivered, t0 + MIN).unwrap();
        assert_eq!(given_back.lease_until, Some(t0 + MIN));
        assert!(!given_back.counts_attempt);
        apply(&mut c, &given_back);
        assert!(transition(&c, release(t0 + MIN), t0 + MIN).is_ok());
    }

    #[test]
    fn a_quarantined_passkey_moves_release_at_only_later() {
        let t0 = OffsetDateTime::now_utc();
        let c = held(t0);
        let early = Event::Confirm {
            not_before: Some(t0 + HOUR),
        };
        assert_eq!(
            transition(&c, early, t0).unwrap().release_at,
            Some(t0 + 24 * HOUR)
        );
        assert_eq!(transition(&c, early, t0).unwrap().quarantined_until, None);
        let late = Event::Confirm {
            not_before: Some(t0 + 48 * HOUR),
        };
        let t = transition(&c, late, t0).unwrap();
        assert_eq!(t.release_at, Some(t0 + 48 * HOUR));
        assert_eq!(t.quarantined_until, Some(t0 + 48 * HOUR));
        assert_eq!(t.release_before, Some(t0 + 72 * HOUR));
    }

    #[test]
    fn built_in_changes_complete_without_a_forward() {
        let t0 = OffsetDateTime::now_utc();
        let mut c = held(t0);
        assert_eq!(
            transition(&c, Event::Complete, t0),
            Err(Refusal::NotConfirmed)
        );
        let confirm = transition(&c, Event::Confirm { not_before: None }, t0).unwrap();
        apply(&mut c, &confirm);
        let early = transition(&c, Event::Complete, t0);
        assert_eq!(
            early,
            Err(Refusal::CoolingOff {
                release_at: t0 + 24 * HOUR
            })
        );
        assert_eq!(
            transition(&c, Event::Complete, t0 + 24 * HOUR).unwrap().to,
            State::Applied
        );
    }

    #[test]
    fn outcomes_only_move_applying_changes() {
        let t0 = OffsetDateTime::now_utc();
        let c = held(t0);
        let delivered = Event::Delivered { status: 200 };
        assert_eq!(transition(&c, delivered, t0), Err(Refusal::NotApplying));
        assert_eq!(
            transition(&c, Event::Undelivered, t0),
            Err(Refusal::NotApplying)
        );
    }

    #[test]
    fn state_names_round_trip() {
        for s in [
            State::Held,
            State::CoolingOff,
            State::Applying,
            State::Applied,
            State::Cancelled,
            State::Expired,
        ] {
            assert_eq!(State::parse(s.as_str()), Some(s));
        }
        assert_eq!(State::parse("released"), None);
    }
}
