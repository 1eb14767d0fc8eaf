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
    Applied,
    Cancelled,
    Expired,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Held => "held",
            State::CoolingOff => "cooling_off",
            State::Applied => "applied",
            State::Cancelled => "cancelled",
            State::Expired => "expired",
        }
    }

    pub fn parse(text: &str) -> Option<State> {
        Some(match text {
            "held" => State::Held,
            "cooling_off" => State::CoolingOff,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Confirm,
    Release,
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
    AlreadyApplied,
    /// An expiry asked for before any deadline passed.
    NotDue,
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
    };
    match (change.state, event) {
        (State::Applied, Event::Expire)
        | (State::Cancelled, Event::Expire)
        | (State::Expired, Event::Expire) => Err(Refusal::NotDue),
        (State::Applied, _) => Err(Refusal::AlreadyApplied),
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

        (State::Held, Event::Confirm) => {
            if change.lapsed(now) {
                return Err(Refusal::Lapsed);
            }
            let release_at = now + change.cooling_off;
            Ok(Transition {
                confirmed_at: Some(now),
                release_at: Some(release_at),
                release_before: Some(release_at + change.release_within),
                ..moved(State::CoolingOff)
            })
        }
        (State::CoolingOff, Event::Confirm) => Err(Refusal::NotHeld),

        (State::Held, Event::Release) => {
            if change.lapsed(now) {
                Err(Refusal::Lapsed)
            } else {
                Err(Refusal::NotConfirmed)
            }
        }
        (State::CoolingOff, Event::Release) => {
            if change.lapsed(now) {
                return Err(Refusal::Lapsed);
            }
            match change.release_at {
                Some(release_at) if now >= release_at => Ok(moved(State::Applied)),
                Some(release_at) => Err(Refusal::CoolingOff { release_at }),
                // A cooling-off change always has release_at; treat a broken row as not ready.
                None => Err(Refusal::NotConfirmed),
            }
        }
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
        }
    }

    fn apply(change: &mut Change, t: &Transition) {
        change.state = t.to;
        change.confirmed_at = t.confirmed_at.or(change.confirmed_at);
        change.release_at = t.release_at.or(change.release_at);
        change.release_before = t.release_before.or(change.release_before);
    }

    #[test]
    fn happy_path_held_confirm_cool_release() {
        let t0 = OffsetDateTime::now_utc();
        let mut c = held(t0);
        assert_eq!(
            transition(&c, Event::Release, t0),
            Err(Refusal::NotConfirmed)
        );
        let confirm = transition(&c, Event::Confirm, t0 + MIN).unwrap();
        assert_eq!(confirm.to, State::CoolingOff);
        assert_eq!(confirm.release_at, Some(t0 + MIN + 24 * HOUR));
        apply(&mut c, &confirm);
        assert_eq!(
            transition(&c, Event::Release, t0 + 2 * MIN),
            Err(Refusal::CoolingOff {
                release_at: t0 + MIN + 24 * HOUR
            })
        );
        let release = transition(&c, Event::Release, t0 + MIN + 24 * HOUR).unwrap();
        assert_eq!(release.to, State::Applied);
        apply(&mut c, &release);
        assert_eq!(
            transition(&c, Event::Release, t0 + 25 * HOUR),
            Err(Refusal::AlreadyApplied)
        );
        assert_eq!(
            transition(&c, Event::Cancel, t0 + 25 * HOUR),
            Err(Refusal::AlreadyApplied)
        );
    }

    #[test]
    fn deadlines_lapse_into_expiry() {
        let t0 = OffsetDateTime::now_utc();
        let mut c = held(t0);
        assert_eq!(
            transition(&c, Event::Confirm, t0 + 11 * MIN),
            Err(Refusal::Lapsed)
        );
        assert_eq!(
            transition(&c, Event::Expire, t0 + 5 * MIN),
            Err(Refusal::NotDue)
        );
        let expire = transition(&c, Event::Expire, t0 + 11 * MIN).unwrap();
        assert_eq!(expire.to, State::Expired);

        let confirm = transition(&c, Event::Confirm, t0).unwrap();
        apply(&mut c, &confirm);
        let late = t0 + 24 * HOUR + 24 * HOUR + MIN;
        assert_eq!(transition(&c, Event::Release, late), Err(Refusal::Lapsed));
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
        let confirm = transition(&c, Event::Confirm, t0).unwrap();
        apply(&mut c, &confirm);
        assert_eq!(
            transition(&c, Event::Cancel, t0).unwrap().to,
            State::Cancelled
        );
        assert_eq!(transition(&c, Event::Confirm, t0), Err(Refusal::NotHeld));
        c.state = State::Cancelled;
        assert_eq!(transition(&c, Event::Release, t0), Err(Refusal::Cancelled));
        c.state = State::Expired;
        assert_eq!(transition(&c, Event::Cancel, t0), Err(Refusal::Expired));
    }

    #[test]
    fn state_names_round_trip() {
        for s in [
            State::Held,
            State::CoolingOff,
            State::Applied,
            State::Cancelled,
            State::Expired,
        ] {
            assert_eq!(State::parse(s.as_str()), Some(s));
        }
        assert_eq!(State::parse("applying"), None);
    }
}
