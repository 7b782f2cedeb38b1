//! Admission against a real CalDAV server (Radicale) holding the events a
//! groupware server would: a weekly meeting in a European time zone with an
//! exception and a moved instance, a meeting in Tokyo time, a cancelled one,
//! an attendee who declined, and meetings just ahead and just past.

use chrono::{DateTime, Duration as Span, NaiveDateTime, Utc};
use chrono_tz::Tz;
use confer_signaling::config::SourceKind;
use confer_signaling::token::JoinKind;
use confer_tests::radicale::{self, Radicale};
use confer_tests::{Signal, TestServer, claims, init_logging};
use serde_json::{Value, json};
use std::time::Duration;

const BERLIN_TZ: &str = "BEGIN:VTIMEZONE
TZID:Europe/Berlin
BEGIN:DAYLIGHT
TZOFFSETFROM:+0100
TZOFFSETTO:+0200
TZNAME:CEST
DTSTART:19700329T020000
RRULE:FREQ=YEARLY;BYMONTH=3;BYDAY=-1SU
END:DAYLIGHT
BEGIN:STANDARD
TZOFFSETFROM:+0200
TZOFFSETTO:+0100
TZNAME:CET
DTSTART:19701025T030000
RRULE:FREQ=YEARLY;BYMONTH=10;BYDAY=-1SU
END:STANDARD
END:VTIMEZONE
";

const TOKYO_TZ: &str = "BEGIN:VTIMEZONE
TZID:Asia/Tokyo
BEGIN:STANDARD
TZOFFSETFROM:+0900
TZOFFSETTO:+0900
TZNAME:JST
DTSTART:19700101T000000
END:STANDARD
END:VTIMEZONE
";

fn utc(t: DateTime<Utc>) -> String {
    t.format("%Y%m%dT%H%M%SZ").to_string()
}

fn local(t: NaiveDateTime) -> String {
    t.format("%Y%m%dT%H%M%S").to_string()
}

/// Wall-clock time in `tz`, `offset` from now, to the minute.
fn wall(tz: Tz, offset: Span) -> NaiveDateTime {
    let t = (Utc::now() + offset).with_timezone(&tz).naive_local();
    t - Span::seconds(t.and_utc().timestamp() % 60)
}

fn calendar(timezones: &str, events: &str) -> String {
    format!(
        "BEGIN:VCALENDAR\nVERSION:2.0\nPRODID:-//Confer tests//EN\n{timezones}{events}END:VCALENDAR\n"
    )
}

fn event(uid: &str, body: &str) -> String {
    format!(
        "BEGIN:VEVENT\nUID:{uid}\nDTSTAMP:20260101T000000Z\n{body}ORGANIZER;CN=Alice:mailto:alice@example.com\n\
ATTENDEE;CN=Bob;PARTSTAT=ACCEPTED:mailto:bob@example.com\n\
ATTENDEE;CN=Carol;PARTSTAT=DECLINED:mailto:carol@example.com\nEND:VEVENT\n"
    )
}

/// A single event from `start` to `end` (UTC), found through its LOCATION.
fn single(room: &str, start: Span, end: Span, extra: &str) -> String {
    let now = Utc::now();
    calendar(
        "",
        &event(
            &format!("{room}-uid"),
            &format!(
                "SUMMARY:{room}\nLOCATION:Confer room {room}\nDTSTART:{}\nDTEND:{}\n{extra}",
                utc(now + start),
                utc(now + end)
            ),
        ),
    )
}

async fn put_events(dav: &Radicale, cal: &str) {
    let berlin: Tz = "Europe/Berlin".parse().unwrap();
    let tokyo: Tz = "Asia/Tokyo".parse().unwrap();
    let week = Span::days(7);

    // Weekly, Berlin time; the instance on now started ten minutes ago. Its
    // first instance was last week, so "now" is an expansion of the rule.
    // Found by its UID. The instance two weeks on is excepted (EXDATE).
    let start = wall(berlin, Span::minutes(-10)) - week;
    let weekly = event(
        "weekly-sync",
        &format!(
            "SUMMARY:Weekly sync\nDTSTART;TZID=Europe/Berlin:{}\nDURATION:PT1H\nRRULE:FREQ=WEEKLY\n\
EXDATE;TZID=Europe/Berlin:{}\n",
            local(start),
            local(start + week * 3)
        ),
    );
    dav.put(cal, "weekly-sync", &calendar(BERLIN_TZ, &weekly))
        .await
        .unwrap();

    // Weekly too, but this week's instance is excepted: no meeting now.
    let skipped = event(
        "weekly-skipped",
        &format!(
            "SUMMARY:Skipped this week\nDTSTART;TZID=Europe/Berlin:{}\nDURATION:PT1H\nRRULE:FREQ=WEEKLY\n\
EXDATE;TZID=Europe/Berlin:{}\n",
            local(start),
            local(start + week)
        ),
    );
    dav.put(cal, "weekly-skipped", &calendar(BERLIN_TZ, &skipped))
        .await
        .unwrap();

    // Daily, today's instance excepted: the server still returns the event
    // (tomorrow's instance is in the queried window), so Confer's own
    // expansion must drop today's.
    let today = start + week;
    let daily = event(
        "daily-skipped",
        &format!(
            "SUMMARY:Daily\nDTSTART;TZID=Europe/Berlin:{}\nDURATION:PT1H\nRRULE:FREQ=DAILY\n\
EXDATE;TZID=Europe/Berlin:{}\n",
            local(today - Span::days(2)),
            local(today)
        ),
    );
    dav.put(cal, "daily-skipped", &calendar(BERLIN_TZ, &daily))
        .await
        .unwrap();

    // Weekly, with this week's instance moved three hours later (an
    // overridden instance with RECURRENCE-ID): too early now.
    let moved_master = event(
        "weekly-moved",
        &format!(
            "SUMMARY:Moved this week\nDTSTART;TZID=Europe/Berlin:{}\nDURATION:PT1H\nRRULE:FREQ=WEEKLY\n",
            local(start)
        ),
    );
    let moved_instance = event(
        "weekly-moved",
        &format!(
            "SUMMARY:Moved this week\nRECURRENCE-ID;TZID=Europe/Berlin:{}\n\
DTSTART;TZID=Europe/Berlin:{}\nDTEND;TZID=Europe/Berlin:{}\n",
            local(start + week),
            local(start + week + Span::hours(3)),
            local(start + week + Span::hours(4))
        ),
    );
    dav.put(
        cal,
        "weekly-moved",
        &calendar(BERLIN_TZ, &(moved_master + &moved_instance)),
    )
    .await
    .unwrap();

    // Tokyo time (UTC+9: a zone mistake would be nine hours off), found by
    // its RFC 7986 CONFERENCE URL.
    let t = wall(tokyo, Span::minutes(-5));
    let tokyo_event = event(
        "tokyo-event",
        &format!(
            "SUMMARY:Tokyo review\nDTSTART;TZID=Asia/Tokyo:{}\nDTEND;TZID=Asia/Tokyo:{}\n\
CONFERENCE;VALUE=URI;FEATURE=VIDEO;LABEL=Join:https://confer.example/m/tokyo-review\n",
            local(t),
            local(t + Span::hours(1))
        ),
    );
    dav.put(cal, "tokyo-event", &calendar(TOKYO_TZ, &tokyo_event))
        .await
        .unwrap();

    for (room, start, end, extra) in [
        ("too-early", Span::minutes(30), Span::minutes(90), ""),
        ("late-in-grace", Span::minutes(-65), Span::minutes(-5), ""),
        ("long-over", Span::minutes(-120), Span::minutes(-30), ""),
        (
            "called-off",
            Span::minutes(-5),
            Span::minutes(55),
            "STATUS:CANCELLED\n",
        ),
    ] {
        dav.put(cal, room, &single(room, start, end, extra))
            .await
            .unwrap();
    }
}

/// Joins `room` as the user with `email`; the `joined` message, or the error code.
async fn join(server: &TestServer, room: &str, email: &str) -> Result<Value, String> {
    let mut c = claims(email.split('@').next().unwrap(), room, JoinKind::Meeting);
    c.email = Some(email.to_owned());
    let mut sig = Signal::connect(&server.ws_url()).await.unwrap();
    sig.send(json!({"type": "join", "token": server.mint(c)}));
    loop {
        let v = tokio::time::timeout(Duration::from_secs(15), sig.rx.recv())
            .await
            .expect("an answer to join within 15 s")
            .expect("socket open");
        match v["type"].as_str() {
            Some("joined") => {
                sig.send(json!({"type": "leave"}));
                return Ok(v);
            }
            Some("error") => return Err(v["code"].as_str().unwrap().to_owned()),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_follows_the_caldav_schedule() {
    init_logging();
    let dav = Radicale::start().await.unwrap();
    let cal = dav.calendar("meetings").await.unwrap();
    put_events(&dav, &cal).await;

    let server = TestServer::start_with(|c| {
        c.schedule.source = SourceKind::Caldav;
        c.schedule.caldav.calendars = vec![cal.clone()];
        c.schedule.caldav.username = Some(radicale::USER.into());
        c.schedule.caldav.password = Some(radicale::PASSWORD.into());
        c.schedule.early_join = Duration::from_secs(10 * 60);
        c.schedule.grace = Duration::from_secs(15 * 60);
    })
    .await
    .unwrap();

    // On time, recurring, Berlin time: the invitee is a participant...
    let bob = join(&server, "weekly-sync", "bob@example.com")
        .await
        .unwrap();
    assert_eq!(bob["role"], "participant");
    assert_eq!(bob["meeting"]["title"], "Weekly sync");
    // ...and the organizer (matched case-insensitively) is a moderator.
    let alice = join(&server, "weekly-sync", "Alice@Example.com")
        .await
        .unwrap();
    assert_eq!(alice["role"], "moderator");
    // Not invited, and invited but declined.
    assert_eq!(
        join(&server, "weekly-sync", "eve@example.com")
            .await
            .unwrap_err(),
        "not_invited"
    );
    assert_eq!(
        join(&server, "weekly-sync", "carol@example.com")
            .await
            .unwrap_err(),
        "not_invited"
    );

    // The exception: this week's instance is excepted, so nothing is on.
    assert_eq!(
        join(&server, "weekly-skipped", "bob@example.com")
            .await
            .unwrap_err(),
        "meeting_not_found"
    );
    assert_eq!(
        join(&server, "daily-skipped", "bob@example.com")
            .await
            .unwrap_err(),
        "meeting_not_started",
        "today's instance is excepted; tomorrow's is next"
    );
    // The overridden instance moved three hours later.
    assert_eq!(
        join(&server, "weekly-moved", "bob@example.com")
            .await
            .unwrap_err(),
        "meeting_not_started"
    );
    // Tokyo time, found by its CONFERENCE URL.
    let tokyo = join(&server, "tokyo-review", "bob@example.com")
        .await
        .unwrap();
    assert_eq!(tokyo["meeting"]["title"], "Tokyo review");

    // Too early (starts in 30 min, doors open 10 min before).
    assert_eq!(
        join(&server, "too-early", "bob@example.com")
            .await
            .unwrap_err(),
        "meeting_not_started"
    );
    // Late, within the 15 min grace after the end.
    assert!(
        join(&server, "late-in-grace", "bob@example.com")
            .await
            .is_ok()
    );
    // After the end plus grace.
    assert_eq!(
        join(&server, "long-over", "bob@example.com")
            .await
            .unwrap_err(),
        "meeting_ended"
    );
    // Cancelled.
    assert_eq!(
        join(&server, "called-off", "alice@example.com")
            .await
            .unwrap_err(),
        "meeting_cancelled"
    );
    // No such meeting at all.
    assert_eq!(
        join(&server, "nowhere", "bob@example.com")
            .await
            .unwrap_err(),
        "meeting_not_found"
    );
}
