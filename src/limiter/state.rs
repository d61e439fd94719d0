//! The local store across restarts (`limiter.state_path`).
//!
//! A restart must not let a window exceed its limit: a fresh process would otherwise
//! send a second full steady window, or a second day's worth of a daily cap. So:
//! - a **snapshot** of the takes that still matter (per window, the newest `limit`
//!   takes inside it, as ages) and of running pauses is written every second and at a
//!   clean shutdown, atomically (a temporary file renamed over the old one), marked
//!   `clean` only by the shutdown;
//! - a **journal** names every bucket that sends something after a snapshot was taken
//!   (one small record the first time, appended with a plain `write`, which a `kill -9`
//!   cannot lose). Two journal files alternate, so a snapshot being written never
//!   drops the records of the one before it.
//!
//! On start, the snapshot's takes come back at their ages. After an unclean stop (no
//! clean marker), every bucket named in a journal is treated as full from the restart
//! until its windows have passed: what it sent after the snapshot is unknown, so the
//! proxy assumes the worst.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{Account, BucketId};

/// The snapshot file.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// Written by a clean shutdown: nothing was sent after it.
    pub clean: bool,
    /// Unix time of the snapshot, in µs.
    pub written_us: u64,
    /// Every bucket that holds a take inside a window, or a pause.
    pub buckets: Vec<SavedBucket>,
}

/// One bucket in a snapshot.
#[derive(Debug, Serialize, Deserialize)]
pub struct SavedBucket {
    /// The account (a keyed hash, never a credential), in hex.
    pub account: String,
    /// Which of the account's buckets.
    pub bucket: SavedId,
    /// `(limit, period µs)` per window.
    pub windows: Vec<(u32, u64)>,
    /// Per window: `(age µs, count)` of the newest takes inside it, newest first.
    pub takes: Vec<Vec<(u64, u64)>>,
    /// How long the bucket's pause had left, in µs.
    pub paused_for_us: u64,
}

/// A [`BucketId`] as stored: `(kind, endpoint, condition)`.
pub type SavedId = (u8, u16, u8);

pub(crate) fn save_id(id: BucketId) -> SavedId {
    match id {
        BucketId::Endpoint(e) => (0, e, 0),
        BucketId::Condition(e, c) => (1, e, c),
        BucketId::Unknown => (2, 0, 0),
    }
}

pub(crate) fn load_id((kind, e, c): SavedId) -> Option<BucketId> {
    match kind {
        0 => Some(BucketId::Endpoint(e)),
        1 => Some(BucketId::Condition(e, c)),
        2 => Some(BucketId::Unknown),
        _ => None,
    }
}

/// Unix time now, in µs.
pub(crate) fn unix_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

const RECORD: usize = 20;

/// How often the local store writes its snapshot.
pub const SNAPSHOT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// What [`Persist::open`] found: the journals to write, the previous process's last
/// snapshot, and the buckets it named in its journals.
pub type Opened = (Persist, Option<Snapshot>, Vec<(Account, BucketId)>);

/// The snapshot's path and the two journals next to it.
#[derive(Debug)]
pub struct Persist {
    path: PathBuf,
    journals: [Mutex<File>; 2],
    active: AtomicUsize,
}

fn journal_path(path: &Path, n: usize) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".touched.{n}"));
    path.with_file_name(name)
}

impl Persist {
    /// Reads what the last process left (the snapshot, and the buckets its journals
    /// name), then opens fresh journals.
    pub fn open(path: &Path) -> io::Result<Opened> {
        let snapshot = match std::fs::read(path) {
            Ok(bytes) => Some(serde_json::from_slice(&bytes).map_err(io::Error::other)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let mut touched = Vec::new();
        for n in 0..2 {
            let bytes = match std::fs::read(journal_path(path, n)) {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for rec in bytes.chunks_exact(RECORD) {
                let account = Account(u128::from_le_bytes(rec[..16].try_into().expect("16 bytes")));
                let id = (rec[16], u16::from_le_bytes([rec[17], rec[18]]), rec[19]);
                touched.extend(load_id(id).map(|id| (account, id)));
            }
        }
        let open = |n| {
            let p = journal_path(path, n);
            // The old journals were read above; from here on they describe this process.
            OpenOptions::new().create(true).write(true).truncate(true).open(p).map(Mutex::new)
        };
        let persist = Persist { path: path.to_path_buf(), journals: [open(0)?, open(1)?], active: AtomicUsize::new(0) };
        Ok((persist, snapshot, touched))
    }

    /// Names a bucket that sent something after the latest snapshot was taken.
    pub fn journal(&self, account: Account, id: BucketId) {
        let mut rec = [0u8; RECORD];
        rec[..16].copy_from_slice(&account.0.to_le_bytes());
        let (kind, e, c) = save_id(id);
        rec[16] = kind;
        rec[17..19].copy_from_slice(&e.to_le_bytes());
        rec[19] = c;
        let n = self.active.load(Ordering::Acquire);
        let mut file = self.journals[n].lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(error) = file.write_all(&rec) {
            tracing::warn!(%error, "cannot journal a limiter bucket; a crash now may forget its takes");
        }
    }

    /// Starts a new journal generation, before a snapshot is taken: the other file is
    /// emptied (its records are older than the snapshot on disk) and becomes active.
    pub fn rotate(&self) -> io::Result<()> {
        let next = 1 - self.active.load(Ordering::Acquire);
        self.journals[next].lock().unwrap_or_else(std::sync::PoisonError::into_inner).set_len(0)?;
        self.active.store(next, Ordering::Release);
        Ok(())
    }

    /// Writes a snapshot atomically; a clean one also empties both journals.
    pub fn write(&self, snapshot: &Snapshot) -> io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        {
            let mut f = File::create(&tmp)?;
            serde_json::to_writer(&mut f, snapshot).map_err(io::Error::other)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if snapshot.clean {
            for j in &self.journals {
                j.lock().unwrap_or_else(std::sync::PoisonError::into_inner).set_len(0)?;
            }
        }
        Ok(())
    }
}
