//! Records a meeting: every participant's audio mixed into one Opus track,
//! the active speaker's VP8 video forwarded without re-encoding, written as
//! WebM segments as it goes and joined into one file at the end.
//!
//! - [`jitter`]: per-stream reordering, a bounded wait for retransmissions.
//! - [`vp8`]: VP8 frames out of RTP, keyframes and their size; [`h264`]:
//!   H.264 access units out of RTP, which [`transcode`] turns into VP8.
//! - [`audio`]: Opus decoding, the mixer with its limiter, the encoder.
//! - [`mux`]: WebM segments through FFmpeg, joined without decoding.
//! - [`timeline`]: RTP time onto the recording's timeline, lips in sync.
//! - [`recording`]: one recording, from the SFU's tap to the store.
//! - [`upload`]: segments uploaded as they complete, and recordings
//!   finished from them when their recorder's machine is gone.
//! - [`store`]: the object-store trait, the local directory, manifests,
//!   listing and the expiry sweep; [`s3`]: the same on S3.

pub mod audio;
pub mod h264;
pub mod jitter;
pub mod mux;
pub mod participant;
pub mod recording;
pub mod s3;
pub mod store;
pub mod timeline;
pub mod transcode;
pub mod upload;
pub mod vp8;
pub mod worker;

pub use recording::{Running, Settings, recover, spool_bytes, start};
pub use store::{LocalStore, Manifest, Store};
pub use upload::recover_orphans;
