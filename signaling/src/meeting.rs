//! Meetings in progress: when each scheduled room closes (with a warning
//! first, and a last look at the home server in case the meeting was
//! extended), and the room lifecycle turned into webhooks.

use crate::media::{Announcement, Media};
use crate::schedule::{Admission, Schedule};
use crate::webhook::Webhooks;
use chrono::{DateTime, SecondsFormat, Utc};
use confer_sfu::Lifecycle;
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::task::AbortHandle;
use tracing::{info, warn};

/// The reason participants see when the schedule closes their room.
pub const ENDED_BY_SCHEDULE: &str = "meeting_ended";
pub const ENDED_BY_MODERATOR: &str = "ended_by_moderator";

pub struct Meetings {
    media: Media,
    schedule: Option<Arc<Schedule>>,
    webhooks: Option<Arc<Webhooks>>,
    warn_before: Duration,
    rooms: Mutex<HashMap<String, Tracked>>,
}

struct Tracked {
    title: String,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    closes_at: DateTime<Utc>,
    timer: AbortHandle,
}

impl Meetings {
    pub fn new(
        media: Media,
        schedule: Option<Arc<Schedule>>,
        webhooks: Option<Arc<Webhooks>>,
        warn_before: Duration,
    ) -> Arc<Meetings> {
        Arc::new(Meetings {
            media,
            schedule,
            webhooks,
            warn_before,
            rooms: Mutex::new(HashMap::new()),
        })
    }

    /// Someone was admitted to `room` by the schedule: make sure the room
    /// closes when that instance does.
    pub fn admitted(self: &Arc<Self>, room: &str, a: &Admission) {
        let mut rooms = self.rooms.lock().unwrap();
        if let Some(t) = rooms.get(room)
            && t.closes_at >= a.closes_at
        {
            return;
        }
        if let Some(old) = rooms.remove(room) {
            old.timer.abort();
        }
        let timer = tokio::spawn(close_when_due(
            Arc::downgrade(self),
            room.to_owned(),
            a.closes_at,
        ))
        .abort_handle();
        rooms.insert(
            room.to_owned(),
            Tracked {
                title: a.meeting.title.clone(),
                start: a.meeting.start,
                end: a.meeting.end,
                closes_at: a.closes_at,
                timer,
            },
        );
    }

    /// When the scheduled meeting in `room` closes, if one is tracked.
    pub fn closes_at(&self, room: &str) -> Option<DateTime<Utc>> {
        self.rooms.lock().unwrap().get(room).map(|t| t.closes_at)
    }

    fn forget(&self, room: &str) {
        if let Some(t) = self.rooms.lock().unwrap().remove(room) {
            t.timer.abort();
        }
    }

    /// Turns the SFU's room lifecycle into webhooks and bookkeeping. Runs
    /// for the life of the process.
    pub async fn follow(
        self: Arc<Self>,
        mut events: tokio::sync::mpsc::UnboundedReceiver<Lifecycle>,
        recordings: Arc<crate::recordings::Recordings>,
    ) {
        while let Some(e) = events.recv().await {
            let (room, kind, data) = match e {
                Lifecycle::RoomOpened { room } => {
                    let data = match self.rooms.lock().unwrap().get(&room) {
                        Some(t) => json!({
                            "scheduled": true,
                            "title": t.title,
                            "scheduled_start": rfc3339(t.start),
                            "scheduled_end": rfc3339(t.end),
                        }),
                        None => json!({ "scheduled": false }),
                    };
                    (room, "meeting.started", data)
                }
                Lifecycle::Joined { room, participant } => {
                    let data = json!({
                        "participant_id": participant.id,
                        "user_id": participant.user_id,
                        "name": participant.name,
                        "role": participant.role,
                    });
                    (room, "participant.joined", data)
                }
                Lifecycle::Left {
                    room,
                    participant_id,
                    user_id,
                    reason,
                } => {
                    let data = json!({
                        "participant_id": participant_id,
                        "user_id": user_id,
                        "reason": reason,
                    });
                    (room, "participant.left", data)
                }
                Lifecycle::RoomClosed { room, reason } => {
                    self.forget(&room);
                    // A recording ends with its room; it is stored in the background.
                    let _ = recordings.stop(&room, "the meeting ended");
                    (room, "meeting.ended", json!({ "reason": reason }))
                }
            };
            if let Some(w) = &self.webhooks {
                w.send(&room, kind, data);
            }
        }
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

async fn sleep_until(t: DateTime<Utc>) {
    if let Ok(d) = (t - Utc::now()).to_std() {
        tokio::time::sleep(d).await;
    }
}

/// Warns the room before `closes_at` and closes it then. Just before
/// warning it asks the home server again: an extended meeting moves the
/// deadline; an unreachable home server keeps the one we know.
async fn close_when_due(meetings: Weak<Meetings>, room: String, mut closes_at: DateTime<Utc>) {
    loop {
        let warn_before = match meetings.upgrade() {
            Some(m) => chrono::Duration::from_std(m.warn_before).unwrap_or_default(),
            None => return,
        };
        sleep_until(closes_at - warn_before).await;
        let Some(m) = meetings.upgrade() else { return };
        if let Some(schedule) = &m.schedule {
            match schedule.closes_at(&room, Utc::now()).await {
                Ok(Some(later)) if later > closes_at => {
                    info!(room, %later, "meeting extended on the home server");
                    closes_at = later;
                    if let Some(t) = m.rooms.lock().unwrap().get_mut(&room) {
                        t.closes_at = later;
                    }
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(room, error = %e, "could not re-check the schedule; closing as planned")
                }
            }
        }
        let media = m.media.clone();
        drop(m);
        media.announce(
            &room,
            Announcement::Closing {
                closes_at: closes_at.timestamp().max(0) as u64,
                reason: "the meeting's scheduled time is over".into(),
            },
        );
        sleep_until(closes_at).await;
        if media.close_room(&room, ENDED_BY_SCHEDULE).await.is_ok() {
            info!(room, "meeting closed at the end of its scheduled time");
        }
        if let Some(m) = meetings.upgrade() {
            m.rooms.lock().unwrap().remove(&room);
        }
        return;
    }
}
