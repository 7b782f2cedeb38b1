//! CalDAV (RFC 4791), which every groupware server speaks. One
//! `calendar-query` REPORT per lookup asks the server for the events of the
//! next and last day only; [`super::ical`] finds the room's meeting in them.

use super::{Meeting, Source, SourceError, fetch, ical};
use chrono::{DateTime, Utc};
use quick_xml::events::Event;

pub struct CaldavSource {
    client: reqwest::Client,
    /// Calendar collections to search, in order.
    calendars: Vec<String>,
    credentials: Option<(String, String)>,
    /// Zone for times without one ("floating" times).
    floating: chrono_tz::Tz,
}

impl CaldavSource {
    pub fn new(
        client: reqwest::Client,
        calendars: Vec<String>,
        credentials: Option<(String, String)>,
        floating: chrono_tz::Tz,
    ) -> Self {
        CaldavSource {
            client,
            calendars,
            credentials,
            floating,
        }
    }

    async fn query(
        &self,
        calendar: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<String>, SourceError> {
        let fmt = "%Y%m%dT%H%M%SZ";
        let body = format!(
            r#"<?xml version="1.0" encoding="utf-8"?>
<C:calendar-query xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">
  <D:prop><C:calendar-data/></D:prop>
  <C:filter>
    <C:comp-filter name="VCALENDAR">
      <C:comp-filter name="VEVENT">
        <C:time-range start="{}" end="{}"/>
      </C:comp-filter>
    </C:comp-filter>
  </C:filter>
</C:calendar-query>"#,
            from.format(fmt),
            to.format(fmt)
        );
        let method = reqwest::Method::from_bytes(b"REPORT").expect("valid method");
        let mut req = self
            .client
            .request(method, calendar)
            .header("Depth", "1")
            .header("Content-Type", "application/xml; charset=utf-8")
            .body(body);
        if let Some((user, password)) = &self.credentials {
            req = req.basic_auth(user, Some(password));
        }
        match fetch(req).await? {
            None => Err(SourceError::BadAnswer(format!(
                "calendar {calendar} does not exist"
            ))),
            Some(xml) => calendar_data(&xml).map_err(SourceError::BadAnswer),
        }
    }
}

#[async_trait::async_trait]
impl Source for CaldavSource {
    async fn instances(
        &self,
        room: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<Meeting>, SourceError> {
        let mut out = Vec::new();
        for calendar in &self.calendars {
            for ics in self.query(calendar, from, to).await? {
                // Other people's events are none of our business: one
                // malformed event elsewhere must not break this meeting.
                if !icalendar::parser::unfold(&ics).contains(room) {
                    continue;
                }
                let found = ical::instances(&ics, room, from, to, self.floating)
                    .map_err(|e| SourceError::BadAnswer(format!("{calendar}: {e}")))?;
                out.extend(found);
            }
            if !out.is_empty() {
                break;
            }
        }
        out.sort_by_key(|m| m.start);
        Ok(out)
    }
}

/// The text of every `calendar-data` element of a multistatus answer,
/// whatever namespace prefix the server chose.
fn calendar_data(xml: &str) -> Result<Vec<String>, String> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    loop {
        match reader.read_event() {
            Err(e) => return Err(format!("bad multistatus XML: {e}")),
            Ok(Event::Eof) => break,
            Ok(Event::Start(e)) if e.local_name().as_ref() == "calendar-data" => {
                current = Some(String::new());
            }
            Ok(Event::End(e)) if e.local_name().as_ref() == "calendar-data" => {
                if let Some(text) = current.take() {
                    out.push(text);
                }
            }
            Ok(Event::Text(t)) => {
                if let Some(buf) = current.as_mut() {
                    buf.push_str(&t.xml10_content());
                }
            }
            Ok(Event::CData(t)) => {
                if let Some(buf) = current.as_mut() {
                    buf.push_str(&t.xml10_content());
                }
            }
            Ok(Event::GeneralRef(r)) => {
                // Entity and character references (&amp; &#13;) come apart from text.
                if let Some(buf) = current.as_mut() {
                    if let Some(c) = r
                        .resolve_char_ref()
                        .map_err(|e| format!("bad XML character reference: {e}"))?
                    {
                        buf.push(c);
                    } else {
                        let name = r.into_inner();
                        let c = quick_xml::escape::resolve_predefined_entity(&name)
                            .ok_or_else(|| format!("unknown XML entity &{name};"))?;
                        buf.push_str(c);
                    }
                }
            }
            Ok(_) => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_data_with_any_prefix_and_entities() {
        let xml = r#"<?xml version="1.0"?>
<multistatus xmlns="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">
 <response><href>/a.ics</href><propstat><prop>
  <C:calendar-data>BEGIN:VCALENDAR&#13;
SUMMARY:Tom &amp; Jerry&#13;
END:VCALENDAR</C:calendar-data></prop></propstat></response>
 <response><href>/b.ics</href><propstat><prop>
  <cal:calendar-data xmlns:cal="urn:ietf:params:xml:ns:caldav"><![CDATA[BEGIN:VCALENDAR
END:VCALENDAR]]></cal:calendar-data></prop></propstat></response>
</multistatus>"#;
        let got = calendar_data(xml).unwrap();
        assert_eq!(got.len(), 2);
        assert!(got[0].contains("Tom & Jerry\r\n"), "{:?}", got[0]);
        assert!(got[1].starts_with("BEGIN:VCALENDAR\nEND"));
        assert!(calendar_data("<a><b></a>").is_err());
    }
}
