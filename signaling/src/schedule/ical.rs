//! iCalendar (RFC 5545) events to [`Meeting`] instances: which VEVENT is a
//! room's meeting, its time zone, and its recurrences (RRULE, RDATE, EXDATE,
//! and overridden instances carrying a RECURRENCE-ID).
//!
//! Parsing is the `icalendar` crate's, recurrence expansion the `rrule`
//! crate's; this module only maps one onto the other.

use super::{Invitee, Meeting, Status};
use chrono::{DateTime, Duration, NaiveDate, NaiveDateTime, TimeZone, Utc};
use icalendar::parser::{Component, Property};
use std::str::FromStr;

/// Instances of the meeting held in `room` found in one iCalendar object,
/// overlapping `[from, to]`. Times without a zone are read in `floating`.
pub fn instances(
    ics: &str,
    room: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    floating: chrono_tz::Tz,
) -> Result<Vec<Meeting>, String> {
    let unfolded = icalendar::parser::unfold(ics);
    let calendar = icalendar::parser::read_calendar(&unfolded)
        .map_err(|e| format!("not valid iCalendar: {}", first_line(&e)))?;
    let events: Vec<&Component> = calendar
        .components
        .iter()
        .filter(|c| c.name.as_str().eq_ignore_ascii_case("VEVENT"))
        .collect();
    // The master event of the room's meeting and its overridden instances
    // share a UID; any of them may carry the room reference.
    let Some(uid) = events.iter().find(|e| refers_to(e, room)).map(|e| {
        prop(e, "UID")
            .map(|p| p.val.as_str().to_owned())
            .unwrap_or_default()
    }) else {
        return Ok(Vec::new());
    };
    let same_uid =
        |e: &&&Component| prop(e, "UID").map(|p| p.val.as_str()).unwrap_or_default() == uid;
    let master = events
        .iter()
        .filter(same_uid)
        .find(|e| prop(e, "RECURRENCE-ID").is_none());
    let overrides: Vec<&Component> = events
        .iter()
        .filter(same_uid)
        .filter(|e| prop(e, "RECURRENCE-ID").is_some())
        .copied()
        .collect();

    let mut out = Vec::new();
    let mut replaced = Vec::new();
    for o in &overrides {
        let rid = prop(o, "RECURRENCE-ID").expect("filtered above");
        replaced.push(date_time(rid, floating)?.0.with_timezone(&Utc));
        let m = single(o, floating)?;
        if m.start <= to && m.end >= from {
            out.push(m);
        }
    }
    let Some(master) = master else {
        return Ok(out);
    };
    let template = single(master, floating)?;
    let length = template.end - template.start;
    let rrules: Vec<&Property> = props(master, "RRULE").collect();
    let rdates: Vec<&Property> = props(master, "RDATE").collect();
    if rrules.is_empty() && rdates.is_empty() {
        if template.start <= to && template.end >= from {
            out.push(template);
        }
        return Ok(out);
    }

    let (start, _) = date_time(prop(master, "DTSTART").expect("single() checked"), floating)?;
    let start = start.with_timezone(&rrule_tz(&start));
    let mut set = rrule::RRuleSet::new(start);
    for r in rrules {
        let rule: rrule::RRule<rrule::Unvalidated> = r
            .val
            .as_str()
            .parse()
            .map_err(|e| format!("RRULE {:?}: {e}", r.val.as_str()))?;
        let rule = rule
            .validate(start)
            .map_err(|e| format!("RRULE {:?}: {e}", r.val.as_str()))?;
        set = set.rrule(rule);
    }
    for p in rdates {
        for d in date_times(p, floating)? {
            set = set.rdate(d.with_timezone(&rrule::Tz::UTC));
        }
    }
    for p in props(master, "EXDATE") {
        for d in date_times(p, floating)? {
            set = set.exdate(d.with_timezone(&rrule::Tz::UTC));
        }
    }
    let after = (from - length).with_timezone(&rrule::Tz::UTC);
    let before = to.with_timezone(&rrule::Tz::UTC);
    // A hostile rule (FREQ=SECONDLY) cannot make us enumerate forever.
    let occurrences = set.after(after).before(before).all(1000);
    for s in occurrences.dates {
        let s = s.with_timezone(&Utc);
        if replaced.contains(&s) {
            continue;
        }
        out.push(Meeting {
            start: s,
            end: s + length,
            ..template.clone()
        });
    }
    out.sort_by_key(|m| m.start);
    Ok(out)
}

/// Whether an event is the meeting held in `room`: its UID is the room id,
/// or its CONFERENCE (RFC 7986), URL or LOCATION names the room.
pub fn refers_to(event: &Component, room: &str) -> bool {
    if prop(event, "UID").is_some_and(|p| p.val.as_str() == room) {
        return true;
    }
    ["CONFERENCE", "URL", "LOCATION"]
        .iter()
        .flat_map(|name| props(event, name))
        .any(|p| mentions(p.val.as_str(), room))
}

/// `room` appears in `text` as a whole token: `…/m/standup-42?x` and
/// `Room standup-42` match, `standup-420` does not.
fn mentions(text: &str, room: &str) -> bool {
    let is_id_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    text.match_indices(room).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + room.len()..].chars().next();
        !before.is_some_and(is_id_char) && !after.is_some_and(is_id_char)
    })
}

/// One event as one instance (a non-recurring event, an override, or the
/// template of a recurring one).
fn single(event: &Component, floating: chrono_tz::Tz) -> Result<Meeting, String> {
    let uid = prop(event, "UID").map(|p| p.val.as_str()).unwrap_or("?");
    let start_prop = prop(event, "DTSTART").ok_or_else(|| format!("event {uid} has no DTSTART"))?;
    let (start, all_day) = date_time(start_prop, floating)?;
    let start = start.with_timezone(&Utc);
    let end = if let Some(p) = prop(event, "DTEND") {
        date_time(p, floating)?.0.with_timezone(&Utc)
    } else if let Some(p) = prop(event, "DURATION") {
        start
            + duration(p.val.as_str())
                .ok_or_else(|| format!("bad DURATION {:?}", p.val.as_str()))?
    } else if all_day {
        start + Duration::days(1)
    } else {
        start
    };
    if end < start {
        return Err(format!("event {uid} ends before it starts"));
    }
    let status = match prop(event, "STATUS").map(|p| p.val.as_str().to_ascii_uppercase()) {
        Some(s) if s == "CANCELLED" => Status::Cancelled,
        Some(s) if s == "TENTATIVE" => Status::Tentative,
        _ => Status::Confirmed,
    };
    let invitees = props(event, "ATTENDEE")
        .map(|a| Invitee {
            id: a.val.as_str().to_owned(),
            moderator: param(a, "ROLE").is_some_and(|r| r.eq_ignore_ascii_case("CHAIR")),
            declined: param(a, "PARTSTAT").is_some_and(|r| r.eq_ignore_ascii_case("DECLINED")),
        })
        .collect();
    Ok(Meeting {
        title: prop(event, "SUMMARY")
            .map(|p| p.val.clone().unescape_text().as_str().to_owned())
            .unwrap_or_default(),
        start,
        end,
        status,
        organizer: prop(event, "ORGANIZER").map(|p| p.val.as_str().to_owned()),
        invitees,
        open: false,
    })
}

fn props<'a>(c: &'a Component, name: &'a str) -> impl Iterator<Item = &'a Property<'a>> + 'a {
    c.properties
        .iter()
        .filter(move |p| p.name.as_str().eq_ignore_ascii_case(name))
}

fn prop<'a>(c: &'a Component, name: &str) -> Option<&'a Property<'a>> {
    c.properties
        .iter()
        .find(|p| p.name.as_str().eq_ignore_ascii_case(name))
}

fn param<'a>(p: &'a Property, key: &str) -> Option<&'a str> {
    p.params
        .iter()
        .find(|x| x.key.as_str().eq_ignore_ascii_case(key))
        .and_then(|x| x.val.as_ref())
        .map(|v| v.as_str().trim_matches('"'))
}

/// A DATE or DATE-TIME property value in its zone; true when it is a DATE
/// (an all-day event).
fn date_time(
    p: &Property,
    floating: chrono_tz::Tz,
) -> Result<(DateTime<chrono_tz::Tz>, bool), String> {
    let tz = match param(p, "TZID") {
        Some(id) => zone(id)?,
        None => floating,
    };
    parse_value(p.val.as_str(), tz).map_err(|e| format!("{}: {e}", p.name.as_str()))
}

/// EXDATE and RDATE may list several values.
fn date_times(
    p: &Property,
    floating: chrono_tz::Tz,
) -> Result<Vec<DateTime<chrono_tz::Tz>>, String> {
    let tz = match param(p, "TZID") {
        Some(id) => zone(id)?,
        None => floating,
    };
    p.val
        .as_str()
        .split(',')
        .map(|v| parse_value(v, tz).map(|(d, _)| d))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", p.name.as_str()))
}

fn parse_value(v: &str, tz: chrono_tz::Tz) -> Result<(DateTime<chrono_tz::Tz>, bool), String> {
    let v = v.trim();
    if let Some(utc) = v.strip_suffix('Z') {
        let n = NaiveDateTime::parse_from_str(utc, "%Y%m%dT%H%M%S")
            .map_err(|e| format!("bad UTC date-time {v:?}: {e}"))?;
        return Ok((Utc.from_utc_datetime(&n).with_timezone(&tz), false));
    }
    let (naive, all_day) = if v.len() == 8 {
        let d =
            NaiveDate::parse_from_str(v, "%Y%m%d").map_err(|e| format!("bad date {v:?}: {e}"))?;
        (d.and_hms_opt(0, 0, 0).expect("midnight exists"), true)
    } else {
        let n = NaiveDateTime::parse_from_str(v, "%Y%m%dT%H%M%S")
            .map_err(|e| format!("bad date-time {v:?}: {e}"))?;
        (n, false)
    };
    // RFC 5545 3.3.5: a local time in a DST gap means the time an hour
    // later; an ambiguous one (the repeated hour) means the first.
    let at = tz
        .from_local_datetime(&naive)
        .earliest()
        .or_else(|| {
            tz.from_local_datetime(&(naive + Duration::hours(1)))
                .earliest()
        })
        .ok_or_else(|| format!("{v:?} does not exist in {tz}"))?;
    Ok((at, all_day))
}

/// A TZID to a zone. Servers use IANA names, sometimes behind a vendor
/// prefix (`/mozilla.org/20050126_1/Europe/Berlin`).
fn zone(id: &str) -> Result<chrono_tz::Tz, String> {
    if let Ok(tz) = chrono_tz::Tz::from_str(id) {
        return Ok(tz);
    }
    let parts: Vec<&str> = id.split('/').filter(|s| !s.is_empty()).collect();
    for n in (1..parts.len().min(3)).rev() {
        if let Ok(tz) = chrono_tz::Tz::from_str(&parts[parts.len() - n - 1..].join("/")) {
            return Ok(tz);
        }
    }
    Err(format!(
        "unknown time zone TZID={id:?} (Confer reads IANA zone names)"
    ))
}

fn rrule_tz(d: &DateTime<chrono_tz::Tz>) -> rrule::Tz {
    rrule::Tz::Tz(d.timezone())
}

/// RFC 5545 DURATION: `P1W`, `PT1H30M`, `P1DT2H`, optionally signed.
fn duration(v: &str) -> Option<Duration> {
    let (neg, rest) = match v.trim().strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, v.trim().trim_start_matches('+')),
    };
    let rest = rest.strip_prefix('P')?;
    let mut total = Duration::zero();
    let mut number = String::new();
    let mut in_time = false;
    for c in rest.chars() {
        match c {
            'T' => in_time = true,
            '0'..='9' => number.push(c),
            unit => {
                let n: i64 = number.parse().ok()?;
                number.clear();
                total += match (unit, in_time) {
                    ('W', false) => Duration::weeks(n),
                    ('D', false) => Duration::days(n),
                    ('H', true) => Duration::hours(n),
                    ('M', true) => Duration::minutes(n),
                    ('S', true) => Duration::seconds(n),
                    _ => return None,
                };
            }
        }
    }
    if !number.is_empty() {
        return None;
    }
    Some(if neg { -total } else { total })
}

fn first_line(s: &str) -> &str {
    s.lines().find(|l| !l.trim().is_empty()).unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    const WEEKLY: &str = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:test\r\n\
BEGIN:VEVENT\r\nUID:weekly-1\r\nSUMMARY:Weekly\\, with comma\r\n\
DTSTART;TZID=Europe/Berlin:20261103T100000\r\nDTEND;TZID=Europe/Berlin:20261103T110000\r\n\
RRULE:FREQ=WEEKLY;BYDAY=TU\r\nEXDATE;TZID=Europe/Berlin:20261110T100000\r\n\
CONFERENCE;VALUE=URI;FEATURE=VIDEO:https://confer.example/m/team-sync\r\n\
ORGANIZER;CN=Alice:mailto:alice@example.com\r\n\
ATTENDEE;PARTSTAT=ACCEPTED:mailto:bob@example.com\r\nEND:VEVENT\r\n\
BEGIN:VEVENT\r\nUID:weekly-1\r\nRECURRENCE-ID;TZID=Europe/Berlin:20261117T100000\r\n\
DTSTART;TZID=Europe/Berlin:20261117T140000\r\nDTEND;TZID=Europe/Berlin:20261117T150000\r\n\
SUMMARY:Moved\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n";

    fn berlin() -> chrono_tz::Tz {
        chrono_tz::Europe::Berlin
    }

    #[test]
    fn weekly_with_exception_and_override() {
        let got = instances(
            WEEKLY,
            "team-sync",
            utc(2026, 11, 1, 0, 0),
            utc(2026, 11, 30, 0, 0),
            chrono_tz::UTC,
        )
        .unwrap();
        let starts: Vec<_> = got.iter().map(|m| (m.start, m.title.as_str())).collect();
        // 10:00 Berlin is 09:00 UTC in November; the 10th is excepted, the
        // 17th moved to 14:00 local.
        assert_eq!(
            starts,
            vec![
                (utc(2026, 11, 3, 9, 0), "Weekly, with comma"),
                (utc(2026, 11, 17, 13, 0), "Moved"),
                (utc(2026, 11, 24, 9, 0), "Weekly, with comma"),
            ]
        );
        assert_eq!(got[0].end - got[0].start, Duration::hours(1));
        assert_eq!(
            got[0].organizer.as_deref(),
            Some("mailto:alice@example.com")
        );
    }

    #[test]
    fn summer_time_follows_the_zone() {
        // The same 10:00 Berlin meeting is 08:00 UTC in summer.
        let got = instances(
            WEEKLY,
            "team-sync",
            utc(2027, 6, 1, 0, 0),
            utc(2027, 6, 2, 0, 0),
            chrono_tz::UTC,
        )
        .unwrap();
        assert_eq!(got[0].start, utc(2027, 6, 1, 8, 0));
    }

    #[test]
    fn matching_the_room() {
        let from = utc(2026, 11, 1, 0, 0);
        let to = utc(2026, 11, 30, 0, 0);
        assert!(
            instances(WEEKLY, "team", from, to, berlin())
                .unwrap()
                .is_empty()
        );
        assert!(
            instances(WEEKLY, "team-sync2", from, to, berlin())
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            instances(WEEKLY, "weekly-1", from, to, berlin())
                .unwrap()
                .len(),
            3
        );
        assert!(mentions("Room: abc", "abc"));
        assert!(mentions("https://x/m/abc?y=1", "abc"));
        assert!(!mentions("https://x/m/abcd", "abc"));
    }

    #[test]
    fn floating_all_day_and_durations() {
        let ics = "BEGIN:VCALENDAR\nBEGIN:VEVENT\nUID:a\nLOCATION:room-a\nDTSTART:20261124T100000\nDURATION:PT1H30M\nEND:VEVENT\n\
BEGIN:VEVENT\nUID:b\nLOCATION:room-b\nDTSTART;VALUE=DATE:20261124\nSTATUS:CANCELLED\nEND:VEVENT\nEND:VCALENDAR\n";
        let from = utc(2026, 11, 23, 0, 0);
        let to = utc(2026, 11, 26, 0, 0);
        let a = instances(ics, "room-a", from, to, berlin()).unwrap();
        assert_eq!(a[0].start, utc(2026, 11, 24, 9, 0));
        assert_eq!(a[0].end, utc(2026, 11, 24, 10, 30));
        let b = instances(ics, "room-b", from, to, chrono_tz::UTC).unwrap();
        assert_eq!(b[0].end - b[0].start, Duration::days(1));
        assert_eq!(b[0].status, Status::Cancelled);
        assert_eq!(duration("P1W"), Some(Duration::weeks(1)));
        assert_eq!(duration("-PT15M"), Some(Duration::minutes(-15)));
        assert_eq!(duration("PT"), Some(Duration::zero()));
        assert_eq!(duration("P1H"), None);
    }

    #[test]
    fn hostile_input_is_an_error_not_a_panic() {
        let from = utc(2026, 11, 1, 0, 0);
        let to = utc(2026, 11, 30, 0, 0);
        for bad in [
            "not a calendar",
            "BEGIN:VCALENDAR\nBEGIN:VEVENT\nUID:x\nDTSTART;TZID=Mars/Olympus:20261124T100000\nEND:VEVENT\nEND:VCALENDAR\n",
            "BEGIN:VCALENDAR\nBEGIN:VEVENT\nUID:x\nDTSTART:2026-11-24\nEND:VEVENT\nEND:VCALENDAR\n",
            "BEGIN:VCALENDAR\nBEGIN:VEVENT\nUID:x\nDTSTART:20261124T100000Z\nRRULE:FREQ=SOMETIMES\nEND:VEVENT\nEND:VCALENDAR\n",
        ] {
            assert!(instances(bad, "x", from, to, berlin()).is_err(), "{bad}");
        }
        // A rule that would produce millions of instances is cut off.
        let many = "BEGIN:VCALENDAR\nBEGIN:VEVENT\nUID:x\nDTSTART:20261101T000000Z\nRRULE:FREQ=SECONDLY\nEND:VEVENT\nEND:VCALENDAR\n";
        assert!(instances(many, "x", from, to, berlin()).unwrap().len() <= 1000);
        assert_eq!(
            zone("/mozilla.org/20050126_1/Europe/Berlin").unwrap(),
            berlin()
        );
    }
}
