//! Join tokens: JWTs the home server signs (HS256 with a shared secret, or
//! EdDSA with a key pair). In demo mode Confer mints them itself with a
//! per-process secret, so nobody outside can forge one either.

use confer_sfu::Role;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds of clock skew tolerated between the home server and Confer.
const LEEWAY_SECS: u64 = 30;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    /// User id on the home server.
    pub sub: String,
    /// Display name.
    pub name: String,
    /// Room (meeting) id.
    pub room: String,
    pub role: Role,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// `meeting` (the default): admission is checked against the schedule,
    /// which also decides the role. `call`: a one-to-one call from a chat
    /// window; the token alone admits, with the token's role.
    #[serde(default)]
    pub kind: JoinKind,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JoinKind {
    #[default]
    Meeting,
    Call,
    /// A recorder process joining to record (see `recorders`): only
    /// Confer mints these, for itself.
    Recorder,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TokenError {
    #[error("token has expired")]
    Expired,
    #[error("token is invalid: {0}")]
    Invalid(String),
}

impl TokenError {
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Expired => "token_expired",
            TokenError::Invalid(_) => "token_invalid",
        }
    }
}

pub struct Tokens {
    keys: Vec<(DecodingKey, Algorithm)>,
    /// Only in demo mode.
    minting: Option<EncodingKey>,
    /// Per process, for the recorders it sends into its rooms.
    internal: (EncodingKey, DecodingKey),
    /// Recorder tokens already used (signature → expiry): each admits once,
    /// so one seen on the way cannot let anyone else in unseen.
    used: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

/// The `kid` of tokens Confer mints for its recorders.
const RECORDER_KID: &str = "confer-recorder";

fn internal_key() -> (EncodingKey, DecodingKey) {
    let secret: [u8; 32] = rand::random();
    (
        EncodingKey::from_secret(&secret),
        DecodingKey::from_secret(&secret),
    )
}

impl Tokens {
    /// Verifies tokens signed with `secret` (HS256) and/or the Ed25519 key in `public_key_pem`.
    pub fn new(secret: Option<&str>, public_key_pem: Option<&[u8]>) -> Result<Tokens, String> {
        let mut keys = Vec::new();
        if let Some(s) = secret {
            keys.push((DecodingKey::from_secret(s.as_bytes()), Algorithm::HS256));
        }
        if let Some(pem) = public_key_pem {
            let key = DecodingKey::from_ed_pem(pem)
                .map_err(|e| format!("not an Ed25519 public key in PEM: {e}"))?;
            keys.push((key, Algorithm::EdDSA));
        }
        Ok(Tokens {
            keys,
            minting: None,
            internal: internal_key(),
            used: Default::default(),
        })
    }

    /// Demo mode: a random per-process secret that Confer signs with itself.
    pub fn demo() -> Tokens {
        let secret: [u8; 32] = rand::random();
        Tokens {
            keys: vec![(DecodingKey::from_secret(&secret), Algorithm::HS256)],
            minting: Some(EncodingKey::from_secret(&secret)),
            internal: internal_key(),
            used: Default::default(),
        }
    }

    /// A token for a recorder to join `room` hidden, valid one minute:
    /// only this process accepts it.
    pub fn mint_recorder(&self, room: &str) -> String {
        let claims = Claims {
            sub: "confer-recorder".into(),
            name: "Recorder".into(),
            room: room.to_owned(),
            role: Role::Recorder,
            exp: now_secs() + 60,
            email: None,
            kind: JoinKind::Recorder,
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(RECORDER_KID.into());
        jsonwebtoken::encode(&header, &claims, &self.internal.0).expect("HS256 signs")
    }

    pub fn can_mint(&self) -> bool {
        self.minting.is_some()
    }

    pub fn mint(&self, claims: &Claims) -> Option<String> {
        let key = self.minting.as_ref()?;
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, key).ok()
    }

    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        if token.len() > 8192 {
            return Err(TokenError::Invalid("longer than 8 KiB".into()));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Invalid(e.to_string()))?;
        let recorder = header.kid.as_deref() == Some(RECORDER_KID);
        let found = match recorder {
            true => Some((&self.internal.1, &Algorithm::HS256)),
            false => self
                .keys
                .iter()
                .find(|(_, a)| *a == header.alg)
                .map(|(k, a)| (k, a)),
        };
        let Some((key, alg)) = found else {
            return Err(TokenError::Invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        };
        let mut v = Validation::new(*alg);
        v.leeway = LEEWAY_SECS;
        v.set_required_spec_claims(&["exp", "sub"]);
        v.validate_aud = false;
        match jsonwebtoken::decode::<Claims>(token, key, &v) {
            Ok(data) => {
                let c = data.claims;
                let claims_recorder = c.kind == JoinKind::Recorder || c.role == Role::Recorder;
                if claims_recorder && !recorder {
                    return Err(TokenError::Invalid(
                        "only Confer's own recorders join as recorder".into(),
                    ));
                }
                if recorder {
                    let signature = token.rsplit('.').next().unwrap_or_default();
                    let mut used = self.used.lock().unwrap();
                    let now = now_secs();
                    used.retain(|_, exp| *exp + LEEWAY_SECS >= now);
                    if used.insert(signature.to_owned(), c.exp).is_some() {
                        return Err(TokenError::Invalid(
                            "this recorder token was used already".into(),
                        ));
                    }
                }
                validate_claims(c)
            }
            Err(e) => match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => Err(TokenError::Expired),
                _ => Err(TokenError::Invalid(e.to_string())),
            },
        }
    }
}

fn validate_claims(c: Claims) -> Result<Claims, TokenError> {
    if !valid_room_id(&c.room) {
        return Err(TokenError::Invalid(
            "room must be 1-64 characters of A-Z a-z 0-9 _ -".into(),
        ));
    }
    if c.sub.is_empty() || c.sub.len() > 256 {
        return Err(TokenError::Invalid("sub must be 1-256 characters".into()));
    }
    if c.name.trim().is_empty() || c.name.chars().count() > 100 {
        return Err(TokenError::Invalid("name must be 1-100 characters".into()));
    }
    Ok(c)
}

pub fn valid_room_id(room: &str) -> bool {
    (1..=64).contains(&room.len())
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "u1".into(),
            name: "Ada".into(),
            room: "standup".into(),
            role: Role::Participant,
            exp,
            email: None,
            kind: JoinKind::Meeting,
        }
    }

    /// The minting recipe in docs/home-server.md makes tokens we accept.
    #[test]
    fn the_documented_python_minting_recipe_works() {
        let code = crate::doc_examples::marked("home-server.md", "mint-token");
        let secret = "0123456789abcdef0123456789abcdef";
        let script = format!(
            "{code}\nprint(join_token('{secret}', 'u-17', 'Grace', 'grace@example.com', 'weekly-sync'))\n"
        );
        let out = std::process::Command::new("python3")
            .args(["-c", &script])
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8(out.stdout).unwrap();
        let claims = Tokens::new(Some(secret), None)
            .unwrap()
            .verify(token.trim())
            .unwrap();
        assert_eq!(claims.email.as_deref(), Some("grace@example.com"));
        assert_eq!(claims.kind, JoinKind::Meeting);
        assert_eq!(claims.room, "weekly-sync");
    }

    #[test]
    fn hs256_round_trip_and_rejections() {
        let secret = "0123456789abcdef0123456789abcdef";
        let tokens = Tokens::new(Some(secret), None).unwrap();
        let good = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(now_secs() + 60),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        assert_eq!(tokens.verify(&good).unwrap().room, "standup");

        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(now_secs() - 3600),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        assert_eq!(tokens.verify(&expired), Err(TokenError::Expired));

        let forged = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(now_secs() + 60),
            &EncodingKey::from_secret(b"another secret of enough length!!"),
        )
        .unwrap();
        assert_eq!(tokens.verify(&forged).unwrap_err().code(), "token_invalid");
        assert_eq!(
            tokens.verify("garbage").unwrap_err().code(),
            "token_invalid"
        );
    }

    #[test]
    fn only_confer_itself_admits_recorders() {
        let secret = "0123456789abcdef0123456789abcdef";
        let tokens = Tokens::new(Some(secret), None).unwrap();
        let minted = tokens.mint_recorder("standup");
        let c = tokens.verify(&minted).unwrap();
        assert_eq!((c.role, c.kind), (Role::Recorder, JoinKind::Recorder));
        // Once only.
        let again = tokens.verify(&minted).unwrap_err();
        assert!(again.to_string().contains("used already"), "{again}");
        // Another process's recorder token, and a home server's token that
        // claims the recorder role, are both refused.
        let other = Tokens::new(Some(secret), None).unwrap();
        assert!(other.verify(&minted).is_err());
        let mut claimed = claims(now_secs() + 60);
        claimed.role = Role::Recorder;
        let forged = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claimed,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        let e = tokens.verify(&forged).unwrap_err();
        assert!(e.to_string().contains("recorder"), "{e}");
    }

    #[test]
    fn demo_tokens_verify_only_in_their_own_process() {
        let a = Tokens::demo();
        let b = Tokens::demo();
        let t = a.mint(&claims(now_secs() + 60)).unwrap();
        assert!(a.verify(&t).is_ok());
        assert!(b.verify(&t).is_err());
    }

    #[test]
    fn room_ids() {
        assert!(valid_room_id("team-42_x"));
        assert!(!valid_room_id(""));
        assert!(!valid_room_id("../etc"));
        assert!(!valid_room_id(&"a".repeat(65)));
    }
}
