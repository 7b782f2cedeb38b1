//! The embedded default: meetings kept in a JSON file in the data
//! directory, written by hand or by the demo page's "schedule a meeting".
//! Format in `docs/home-server.md`.

use super::{Meeting, Source, SourceError};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use tokio::sync::Mutex;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MeetingsFile {
    pub meetings: Vec<LocalMeeting>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LocalMeeting {
    pub room: String,
    #[serde(flatten)]
    pub meeting: Meeting,
}

pub struct LocalSource {
    path: PathBuf,
    /// Serialises writers; readers read the file, which is replaced atomically.
    write: Mutex<()>,
}

impl LocalSource {
    pub fn new(path: PathBuf) -> LocalSource {
        LocalSource {
            path,
            write: Mutex::new(()),
        }
    }

    /// Reads the file; a missing file is an empty schedule.
    pub async fn read(&self) -> Result<MeetingsFile, String> {
        let text = match tokio::fs::read_to_string(&self.path).await {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(MeetingsFile::default());
            }
            Err(e) => return Err(format!("{}: {e}", self.path.display())),
        };
        let de = &mut serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(de)
            .map_err(|e| format!("{}: {}: {}", self.path.display(), e.path(), e.inner()))
    }

    /// Adds a meeting and writes the file (to a temporary name first, so a
    /// crash never leaves half a file).
    pub async fn add(&self, m: LocalMeeting) -> Result<(), String> {
        let _guard = self.write.lock().await;
        let mut file = self.read().await?;
        file.meetings.push(m);
        let text = serde_json::to_string_pretty(&file).map_err(|e| e.to_string())?;
        if let Some(dir) = self.path.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let tmp = self.path.with_extension("json.tmp");
        tokio::fs::write(&tmp, text)
            .await
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        tokio::fs::rename(&tmp, &self.path)
            .await
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }
}

#[async_trait::async_trait]
impl Source for LocalSource {
    async fn instances(
        &self,
        room: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<Meeting>, SourceError> {
        let file = self.read().await.map_err(SourceError::BadAnswer)?;
        Ok(file
            .meetings
            .into_iter()
            .filter(|m| m.room == room && m.meeting.start <= to && m.meeting.end >= from)
            .map(|m| m.meeting)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn the_documented_file_parses() {
        let example = crate::doc_examples::marked("home-server.md", "local-file");
        let file: MeetingsFile = serde_json::from_str(&example).unwrap();
        assert_eq!(file.meetings[0].room, "weekly-sync");
    }

    #[tokio::test]
    async fn add_then_find_and_bad_files_name_the_field() {
        let dir = std::env::temp_dir().join(format!("confer-local-{}", rand::random::<u64>()));
        let src = LocalSource::new(dir.join("meetings.json"));
        let now = Utc::now();
        assert!(src.instances("r1", now, now).await.unwrap().is_empty());
        let meeting = Meeting {
            title: "Demo".into(),
            start: now,
            end: now + Duration::hours(1),
            status: Default::default(),
            organizer: Some("alice".into()),
            invitees: vec![],
            open: true,
        };
        src.add(LocalMeeting {
            room: "r1".into(),
            meeting: meeting.clone(),
        })
        .await
        .unwrap();
        let got = src
            .instances("r1", now - Duration::days(1), now + Duration::days(1))
            .await
            .unwrap();
        assert_eq!(got, vec![meeting]);
        assert!(src.instances("r2", now, now).await.unwrap().is_empty());

        std::fs::write(
            dir.join("meetings.json"),
            r#"{"meetings":[{"room":"r1","title":"x","start":"soon","end":"later"}]}"#,
        )
        .unwrap();
        let err = src.instances("r1", now, now).await.unwrap_err().to_string();
        assert!(err.contains("meetings[0]"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
