//! Meeting schedules, which the home server owns: is there such a meeting,
//! is it on now, is this person invited, and in what role.
//!
//! One [`Source`] per kind of home server ([`local`], [`caldav`], [`http`]);
//! each returns the meeting's instances around now as plain [`Meeting`]s,
//! and [`admit`] decides. [`Schedule`] puts a cache in front so a meeting of
//! a hundred people asks the home server once.

mod cache;
pub mod caldav;
pub mod http;
pub mod ical;
pub mod local;

pub use cache::{Lookup, Policy, Schedule, ScheduleError};

use chrono::{DateTime, Duration, Utc};
use confer_sfu::Role;
use serde::{Deserialize, Serialize};

/// One instance of a meeting (a recurring meeting has one per occurrence).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meeting {
    pub title: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    #[serde(default)]
    pub status: Status,
    /// Becomes a moderator.
    #[serde(default)]
    pub organizer: Option<String>,
    #[serde(default)]
    pub invitees: Vec<Invitee>,
    /// Anyone holding a valid join token for the room may join, as a participant.
    #[serde(default)]
    pub open: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    #[default]
    Confirmed,
    Tentative,
    Cancelled,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Invitee {
    /// E-mail address or home-server user id.
    pub id: String,
    /// Moderators besides the organizer (CalDAV: `ROLE=CHAIR`).
    #[serde(default)]
    pub moderator: bool,
    #[serde(default)]
    pub declined: bool,
}

/// Who is asking to join, from the verified token.
#[derive(Clone, Copy, Debug)]
pub struct Identity<'a> {
    pub user_id: &'a str,
    pub email: Option<&'a str>,
}

impl Identity<'_> {
    /// Calendar addresses come as `mailto:` URIs in any case.
    fn is(&self, address: &str) -> bool {
        let a = address.trim();
        let a = a
            .strip_prefix("mailto:")
            .or_else(|| a.strip_prefix("MAILTO:"))
            .unwrap_or(a);
        a.eq_ignore_ascii_case(self.user_id)
            || self.email.is_some_and(|e| a.eq_ignore_ascii_case(e))
    }
}

/// The admission window around each instance.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    /// How long before the start people may join.
    pub early_join: Duration,
    /// How long after the end people may still join and the meeting stays open.
    pub grace: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Admission {
    pub role: Role,
    /// The instance admitted to.
    pub meeting: Meeting,
    /// When the room closes: the instance's end plus grace.
    pub closes_at: DateTime<Utc>,
}

/// Why the schedule refuses a join. Each maps to an error code the client shows.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("there is no meeting scheduled for this room")]
    NotScheduled,
    #[error("the meeting has not started yet; you can join from {opens_at}")]
    TooEarly { opens_at: DateTime<Utc> },
    #[error("the meeting ended at {ended_at}")]
    Ended { ended_at: DateTime<Utc> },
    #[error("the meeting has been cancelled")]
    Cancelled,
    #[error("you are not invited to this meeting")]
    NotInvited,
    #[error("you declined this meeting")]
    Declined,
}

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::NotScheduled => "meeting_not_found",
            Refusal::TooEarly { .. } => "meeting_not_started",
            Refusal::Ended { .. } => "meeting_ended",
            Refusal::Cancelled => "meeting_cancelled",
            Refusal::NotInvited => "not_invited",
            Refusal::Declined => "not_invited",
        }
    }
}

/// How far around now sources are asked for instances. Wide enough to say
/// when the next instance starts or the last one ended, and to outlast a
/// cached answer; early-join and grace are validated to stay inside it.
pub const WINDOW: Duration = Duration::days(1);

/// Decides a join against a meeting's instances around `now`.
pub fn admit(
    instances: &[Meeting],
    who: Identity<'_>,
    now: DateTime<Utc>,
    rules: Rules,
) -> Result<Admission, Refusal> {
    let open_at = |m: &Meeting| m.start - rules.early_join;
    let close_at = |m: &Meeting| m.end + rules.grace;
    let on_now = |m: &&Meeting| open_at(m) <= now && now <= close_at(m);

    // Of two instances on now (back-to-back meetings), the one that started last.
    let Some(meeting) = instances
        .iter()
        .filter(on_now)
        .filter(|m| m.status != Status::Cancelled)
        .max_by_key(|m| m.start)
    else {
        if instances
            .iter()
            .filter(on_now)
            .any(|m| m.status == Status::Cancelled)
        {
            return Err(Refusal::Cancelled);
        }
        let live = instances.iter().filter(|m| m.status != Status::Cancelled);
        if let Some(next) = live
            .clone()
            .filter(|m| open_at(m) > now)
            .min_by_key(|m| m.start)
        {
            return Err(Refusal::TooEarly {
                opens_at: open_at(next),
            });
        }
        if let Some(last) = live.filter(|m| close_at(m) < now).max_by_key(|m| m.end) {
            return Err(Refusal::Ended { ended_at: last.end });
        }
        return Err(Refusal::NotScheduled);
    };

    let role = if meeting.organizer.as_deref().is_some_and(|o| who.is(o)) {
        Role::Moderator
    } else if let Some(i) = meeting.invitees.iter().find(|i| who.is(&i.id)) {
        if i.declined {
            return Err(Refusal::Declined);
        }
        if i.moderator {
            Role::Moderator
        } else {
            Role::Participant
        }
    } else if meeting.open {
        Role::Participant
    } else {
        return Err(Refusal::NotInvited);
    };
    Ok(Admission {
        role,
        closes_at: close_at(meeting),
        meeting: meeting.clone(),
    })
}

/// Why a source could not answer.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SourceError {
    /// Connection refused, timed out, or a 5xx: worth retrying, and the
    /// configured unreachable policy applies.
    #[error("home server unreachable: {0}")]
    Unreachable(String),
    /// The home server answered, but not with something we understand.
    #[error("home server sent an answer Confer cannot use: {0}")]
    BadAnswer(String),
}

/// A place meetings are scheduled. Two real implementations talk to home
/// servers (CalDAV, HTTP); the local one is the embedded default.
#[async_trait::async_trait]
pub trait Source: Send + Sync {
    /// The instances of the meeting held in `room` that overlap `[from, to]`;
    /// empty if there is no such meeting.
    async fn instances(
        &self,
        room: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<Meeting>, SourceError>;
}

/// Largest home-server answer read; a calendar query for one meeting and
/// two days is a few kilobytes.
const MAX_ANSWER_BYTES: usize = 2 << 20;

/// Sends a request to the home server and reads the body, mapping failures
/// onto [`SourceError`]. `None` for 404.
pub(crate) async fn fetch(req: reqwest::RequestBuilder) -> Result<Option<String>, SourceError> {
    let unreachable = |e: reqwest::Error| SourceError::Unreachable(plain(&e));
    let mut resp = req.send().await.map_err(unreachable)?;
    let status = resp.status();
    if status == reqwest::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if status.is_server_error() {
        return Err(SourceError::Unreachable(format!("HTTP {status}")));
    }
    if !status.is_success() {
        return Err(SourceError::BadAnswer(format!("HTTP {status}")));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(unreachable)? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(SourceError::BadAnswer(format!(
                "answer larger than {MAX_ANSWER_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body)
        .map(Some)
        .map_err(|_| SourceError::BadAnswer("answer is not UTF-8".into()))
}

/// reqwest's error with its causes, which say what actually failed
/// ("connection refused", "operation timed out").
fn plain(e: &reqwest::Error) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 24, h, m, 0).unwrap()
    }

    fn meeting(start: DateTime<Utc>, end: DateTime<Utc>) -> Meeting {
        Meeting {
            title: "Standup".into(),
            start,
            end,
            status: Status::Confirmed,
            organizer: Some("mailto:Alice@example.com".into()),
            invitees: vec![
                Invitee {
                    id: "mailto:bob@example.com".into(),
                    moderator: false,
                    declined: false,
                },
                Invitee {
                    id: "mailto:carol@example.com".into(),
                    moderator: false,
                    declined: true,
                },
                Invitee {
                    id: "dave".into(),
                    moderator: true,
                    declined: false,
                },
            ],
            open: false,
        }
    }

    const RULES: Rules = Rules {
        early_join: Duration::minutes(10),
        grace: Duration::minutes(15),
    };

    fn who(email: &str) -> Identity<'_> {
        Identity {
            user_id: "u-1",
            email: Some(email),
        }
    }

    #[test]
    fn window_and_roles() {
        let m = [meeting(at(10, 0), at(11, 0))];
        let bob = who("bob@example.com");
        assert_eq!(
            admit(&m, bob, at(9, 49), RULES),
            Err(Refusal::TooEarly {
                opens_at: at(9, 50)
            })
        );
        assert_eq!(
            admit(&m, bob, at(9, 50), RULES).unwrap().role,
            Role::Participant
        );
        let late = admit(&m, bob, at(11, 14), RULES).unwrap();
        assert_eq!(late.closes_at, at(11, 15));
        assert_eq!(
            admit(&m, bob, at(11, 16), RULES),
            Err(Refusal::Ended {
                ended_at: at(11, 0)
            })
        );
        assert_eq!(
            admit(&m, who("ALICE@example.com"), at(10, 5), RULES)
                .unwrap()
                .role,
            Role::Moderator
        );
        let dave = Identity {
            user_id: "dave",
            email: None,
        };
        assert_eq!(
            admit(&m, dave, at(10, 5), RULES).unwrap().role,
            Role::Moderator
        );
        assert_eq!(
            admit(&m, who("carol@example.com"), at(10, 5), RULES),
            Err(Refusal::Declined)
        );
        assert_eq!(
            admit(&m, who("eve@example.com"), at(10, 5), RULES),
            Err(Refusal::NotInvited)
        );
        assert_eq!(
            admit(&[], bob, at(10, 5), RULES),
            Err(Refusal::NotScheduled)
        );
    }

    #[test]
    fn cancelled_and_back_to_back_instances() {
        let mut cancelled = meeting(at(10, 0), at(11, 0));
        cancelled.status = Status::Cancelled;
        let bob = who("bob@example.com");
        assert_eq!(
            admit(&[cancelled.clone()], bob, at(10, 5), RULES),
            Err(Refusal::Cancelled)
        );
        // A later instance on the same day still admits.
        let next = meeting(at(14, 0), at(15, 0));
        let both = [cancelled, next.clone()];
        assert_eq!(
            admit(&both, bob, at(12, 0), RULES),
            Err(Refusal::TooEarly {
                opens_at: at(13, 50)
            })
        );
        assert_eq!(admit(&both, bob, at(14, 0), RULES).unwrap().meeting, next);
        // Back to back: the grace of the first overlaps the second; the second wins.
        let first = meeting(at(9, 0), at(10, 0));
        let second = meeting(at(10, 0), at(11, 0));
        let got = admit(&[first, second.clone()], bob, at(10, 5), RULES).unwrap();
        assert_eq!(got.meeting, second);
    }

    #[test]
    fn open_meetings_admit_anyone_with_a_token() {
        let mut m = meeting(at(10, 0), at(11, 0));
        m.open = true;
        assert_eq!(
            admit(&[m], who("eve@example.com"), at(10, 5), RULES)
                .unwrap()
                .role,
            Role::Participant
        );
    }
}
