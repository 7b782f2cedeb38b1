//! Home servers with their own API: `GET` a configured URL (with `{room}`,
//! `{from}` and `{to}` filled in) that answers JSON, schema in
//! `docs/home-server.md`. 404 means "no such meeting".

use super::{Meeting, Source, SourceError, fetch};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;

pub struct HttpSource {
    client: reqwest::Client,
    url_template: String,
    /// `(header name, value)`, e.g. `("Authorization", "Bearer …")`.
    auth: Option<(String, String)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    meetings: Vec<Meeting>,
}

impl HttpSource {
    pub fn new(
        client: reqwest::Client,
        url_template: String,
        auth: Option<(String, String)>,
    ) -> Self {
        HttpSource {
            client,
            url_template,
            auth,
        }
    }

    fn url(&self, room: &str, from: DateTime<Utc>, to: DateTime<Utc>) -> String {
        // Room ids are [A-Za-z0-9_-] and RFC 3339 UTC times need no escaping
        // but the colons, which are legal in a query.
        self.url_template
            .replace("{room}", room)
            .replace("{from}", &from.to_rfc3339_opts(SecondsFormat::Secs, true))
            .replace("{to}", &to.to_rfc3339_opts(SecondsFormat::Secs, true))
    }
}

#[async_trait::async_trait]
impl Source for HttpSource {
    async fn instances(
        &self,
        room: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<Meeting>, SourceError> {
        let mut req = self
            .client
            .get(self.url(room, from, to))
            .header("Accept", "application/json");
        if let Some((name, value)) = &self.auth {
            req = req.header(name, value);
        }
        let Some(body) = fetch(req).await? else {
            return Ok(Vec::new());
        };
        let de = &mut serde_json::Deserializer::from_str(&body);
        let answer: Answer = serde_path_to_error::deserialize(de)
            .map_err(|e| SourceError::BadAnswer(format!("{}: {}", e.path(), e.inner())))?;
        if let Some(m) = answer.meetings.iter().find(|m| m.end < m.start) {
            return Err(SourceError::BadAnswer(format!(
                "meeting {:?} ends before it starts",
                m.title
            )));
        }
        Ok(answer
            .meetings
            .into_iter()
            .filter(|m| m.start <= to && m.end >= from)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_answer_parses() {
        let example = crate::doc_examples::marked("home-server.md", "http-answer");
        let answer: Answer = serde_json::from_str(&example).unwrap();
        let m = &answer.meetings[0];
        assert_eq!(m.title, "Weekly sync");
        assert!(m.invitees[1].declined && m.invitees[2].moderator);
    }
}
