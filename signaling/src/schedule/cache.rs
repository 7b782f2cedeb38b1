//! The schedule as signaling sees it: a [`Source`] behind a cache, with
//! retries and the policy for an unreachable home server.
//!
//! Concurrent misses for one room wait on the same per-room lock, so a
//! hundred people joining at once cause one request to the home server.

use super::{Admission, Identity, Meeting, Refusal, Rules, Source, SourceError, WINDOW, admit};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// An empty answer ("no such meeting") is kept only this long, so a meeting
/// created a moment ago on the home server is found quickly.
const NEGATIVE_TTL: Duration = Duration::from_secs(15);

pub struct Schedule {
    source: Arc<dyn Source>,
    pub rules: Rules,
    ttl: Duration,
    /// `Some(age)`: when the home server cannot be reached, a cached answer
    /// up to this old still admits. `None`: refuse.
    stale_for: Option<Duration>,
    retries: u32,
    backoff: Duration,
    rooms: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Entry>>>>>,
}

#[derive(Clone)]
struct Entry {
    fetched: Instant,
    /// The instances were asked for `[center - WINDOW, center + WINDOW]`.
    center: DateTime<Utc>,
    instances: Arc<Vec<Meeting>>,
}

/// How an answer was obtained, for logs and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// From the home server just now.
    Fetched,
    /// From a cache entry within its TTL.
    Cached,
    /// From an expired cache entry, because the home server is unreachable.
    Stale,
}

/// Why a join could not be decided or was refused.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    BadAnswer(String),
}

impl ScheduleError {
    pub fn code(&self) -> &'static str {
        match self {
            ScheduleError::Refused(r) => r.code(),
            ScheduleError::Unreachable(_) => "home_server_unreachable",
            ScheduleError::BadAnswer(_) => "home_server_error",
        }
    }
}

/// Settings for [`Schedule::new`].
pub struct Policy {
    pub ttl: Duration,
    pub stale_for: Option<Duration>,
    pub retries: u32,
    pub backoff: Duration,
}

impl Schedule {
    pub fn new(source: Arc<dyn Source>, rules: Rules, policy: Policy) -> Schedule {
        Schedule {
            source,
            rules,
            ttl: policy.ttl,
            stale_for: policy.stale_for,
            retries: policy.retries,
            backoff: policy.backoff,
            rooms: Mutex::new(HashMap::new()),
        }
    }

    /// Decides whether `who` may join `room` now.
    pub async fn admit(
        &self,
        room: &str,
        who: Identity<'_>,
        now: DateTime<Utc>,
    ) -> Result<(Admission, Lookup), ScheduleError> {
        let (instances, how) = self.instances(room, now, false).await?;
        let admission = admit(&instances, who, now, self.rules)?;
        Ok((admission, how))
    }

    /// When the meeting held in `room` that is on at `now` closes, asking the
    /// home server afresh (the meeting may have been extended). `None` if it
    /// is no longer scheduled at all.
    pub async fn closes_at(
        &self,
        room: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, ScheduleError> {
        let (instances, _) = self.instances(room, now, true).await?;
        let on_now = instances
            .iter()
            .filter(|m| m.status != super::Status::Cancelled)
            .filter(|m| m.start - self.rules.early_join <= now && now <= m.end + self.rules.grace)
            .map(|m| m.end + self.rules.grace)
            .max();
        Ok(on_now)
    }

    async fn instances(
        &self,
        room: &str,
        now: DateTime<Utc>,
        force: bool,
    ) -> Result<(Arc<Vec<Meeting>>, Lookup), ScheduleError> {
        let slot = {
            let mut rooms = self.rooms.lock().unwrap();
            if rooms.len() > 10_000 {
                // Forget rooms nobody is waiting on; their entries are old news.
                rooms.retain(|_, s| Arc::strong_count(s) > 1);
            }
            rooms.entry(room.to_owned()).or_default().clone()
        };
        let mut entry = slot.lock().await;
        if let Some(e) = entry.as_ref()
            && !force
            && self.usable(e, now)
        {
            let ttl = if e.instances.is_empty() {
                NEGATIVE_TTL.min(self.ttl)
            } else {
                self.ttl
            };
            if e.fetched.elapsed() < ttl {
                return Ok((e.instances.clone(), Lookup::Cached));
            }
        }
        match self.fetch(room, now).await {
            Ok(instances) => {
                let instances = Arc::new(instances);
                *entry = Some(Entry {
                    fetched: Instant::now(),
                    center: now,
                    instances: instances.clone(),
                });
                Ok((instances, Lookup::Fetched))
            }
            Err(SourceError::Unreachable(msg)) => {
                if let (Some(limit), Some(e)) = (self.stale_for, entry.as_ref())
                    && e.fetched.elapsed() < limit
                    && self.usable(e, now)
                {
                    warn!(room, error = %msg, "home server unreachable; using the cached schedule");
                    return Ok((e.instances.clone(), Lookup::Stale));
                }
                Err(ScheduleError::Unreachable(format!(
                    "the home server could not be reached to check this meeting ({msg}); try again in a minute"
                )))
            }
            Err(SourceError::BadAnswer(msg)) => Err(ScheduleError::BadAnswer(format!(
                "the home server's schedule for this meeting could not be read: {msg}"
            ))),
        }
    }

    /// An entry's window must still cover what admission looks at.
    fn usable(&self, e: &Entry, now: DateTime<Utc>) -> bool {
        let reach = self.rules.early_join.max(self.rules.grace);
        now - reach >= e.center - WINDOW && now + reach <= e.center + WINDOW
    }

    /// Asks the source, retrying an unreachable home server with backoff.
    async fn fetch(&self, room: &str, now: DateTime<Utc>) -> Result<Vec<Meeting>, SourceError> {
        let mut delay = self.backoff;
        let mut attempt = 0;
        loop {
            match self
                .source
                .instances(room, now - WINDOW, now + WINDOW)
                .await
            {
                Err(SourceError::Unreachable(msg)) if attempt < self.retries => {
                    debug!(room, attempt, error = %msg, "home server unreachable; retrying");
                    attempt += 1;
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    struct Counting {
        calls: AtomicU32,
        down: AtomicBool,
        meeting: Meeting,
    }

    #[async_trait::async_trait]
    impl Source for Counting {
        async fn instances(
            &self,
            _room: &str,
            _from: DateTime<Utc>,
            _to: DateTime<Utc>,
        ) -> Result<Vec<Meeting>, SourceError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            if self.down.load(Ordering::SeqCst) {
                return Err(SourceError::Unreachable("connection refused".into()));
            }
            Ok(vec![self.meeting.clone()])
        }
    }

    fn setup(stale_for: Option<Duration>, ttl: Duration) -> (Arc<Counting>, Arc<Schedule>) {
        let now = Utc::now();
        let source = Arc::new(Counting {
            calls: AtomicU32::new(0),
            down: AtomicBool::new(false),
            meeting: Meeting {
                title: "m".into(),
                start: now - chrono::Duration::minutes(5),
                end: now + chrono::Duration::minutes(55),
                status: Default::default(),
                organizer: None,
                invitees: vec![],
                open: true,
            },
        });
        let schedule = Schedule::new(
            source.clone(),
            Rules {
                early_join: chrono::Duration::minutes(10),
                grace: chrono::Duration::minutes(10),
            },
            Policy {
                ttl,
                stale_for,
                retries: 2,
                backoff: Duration::from_millis(10),
            },
        );
        (source, Arc::new(schedule))
    }

    const ANYONE: Identity<'static> = Identity {
        user_id: "u",
        email: None,
    };

    #[tokio::test]
    async fn fifty_concurrent_joins_ask_once() {
        let (source, schedule) = setup(None, Duration::from_secs(60));
        let joins: Vec<_> = (0..50)
            .map(|_| {
                let s = schedule.clone();
                tokio::spawn(
                    async move { s.admit("room", ANYONE, Utc::now()).await.map(|(_, l)| l) },
                )
            })
            .collect();
        let mut fetched = 0;
        for j in joins {
            if j.await.unwrap().unwrap() == Lookup::Fetched {
                fetched += 1;
            }
        }
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
        assert_eq!(fetched, 1);
    }

    #[tokio::test]
    async fn unreachable_retries_then_follows_the_policy() {
        // Refuse policy: retried (1 + 2 attempts), then a clear error.
        let (source, schedule) = setup(None, Duration::ZERO);
        source.down.store(true, Ordering::SeqCst);
        let err = schedule
            .admit("room", ANYONE, Utc::now())
            .await
            .unwrap_err();
        assert_eq!(err.code(), "home_server_unreachable");
        assert_eq!(source.calls.load(Ordering::SeqCst), 3);

        // Stale policy: an expired entry still admits while the server is down.
        let (source, schedule) = setup(Some(Duration::from_secs(600)), Duration::ZERO);
        let (_, how) = schedule.admit("room", ANYONE, Utc::now()).await.unwrap();
        assert_eq!(how, Lookup::Fetched);
        source.down.store(true, Ordering::SeqCst);
        let (_, how) = schedule.admit("room", ANYONE, Utc::now()).await.unwrap();
        assert_eq!(how, Lookup::Stale);
        // ...but not for a room it never knew.
        let err = schedule
            .admit("other", ANYONE, Utc::now())
            .await
            .unwrap_err();
        assert_eq!(err.code(), "home_server_unreachable");
    }
}
