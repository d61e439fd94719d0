//! A redb file that survives I/O errors: the spool's, the coalescer's and the webhook
//! gate's stores all hold one.
//!
//! After an I/O error (a full disk) redb refuses every later call with
//! `PreviousIo` until the database is reopened. [`Durable`] marks itself broken on
//! such an error, reopens the file on the next call (at most once per `reopen_every`,
//! so a disk that stays full is not hammered) and reports the error until a write
//! succeeds again ([`Durable::write_error`]), which the stores show in `/health`.

// redb's own error type is large; it only passes between the transaction closures here.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use redb::Database;

/// Shortest time between two attempts to reopen a database that failed.
pub const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// Opens the database at a path: the file, or a test's failing backend.
pub type Opener = Box<dyn Fn(&Path) -> Result<Database, String> + Send + Sync>;

/// Readies a (re)opened database (creates tables, recounts what it holds) before
/// calls use it; an error leaves it unused.
pub type Prepare<'a> = &'a dyn Fn(&Database) -> Result<(), redb::Error>;

/// Why a call on the database failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbError {
    /// The file cannot be used now (an I/O error, or a reopen that failed); a later
    /// call reopens it.
    Unavailable(String),
    /// Anything else (a corrupt table, a missing value): the file is fine.
    Other(String),
}

/// The opener of a plain file, created mode 0600 in the call that creates it: no
/// moment when another local user could open it (the stores hold keys and bodies).
/// An older file keeps its data and loses wider permissions.
pub fn file_opener() -> Opener {
    Box::new(|p| {
        create_private(p).map_err(|e| e.to_string())?;
        Database::create(p).map_err(|e| e.to_string())
    })
}

fn create_private(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut open = std::fs::OpenOptions::new();
    open.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        open.mode(0o600);
        let file = open.open(path)?;
        if file.metadata()?.permissions().mode() & 0o077 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
    }
    #[cfg(not(unix))]
    open.open(path)?;
    Ok(())
}

/// An I/O failure (or redb's memory of one): the database must be reopened.
fn is_io(e: &redb::Error) -> bool {
    matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo)
}

#[derive(Default)]
struct State {
    /// The database refused a call for an I/O reason: reopen before the next.
    broken: bool,
    /// The last write failed, with this reason; cleared by the next write that succeeds.
    write_error: Option<String>,
    last_reopen: Option<Instant>,
}

/// A redb database that reopens itself after an I/O error.
pub struct Durable {
    /// What it is, for logs: `spool`, `coalesce store`, `webhook store`.
    what: &'static str,
    path: PathBuf,
    opener: Opener,
    /// `None` while a reopen failed.
    db: RwLock<Option<Database>>,
    state: Mutex<State>,
    reopen_every: Duration,
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Durable({} {})", self.what, self.path.display())
    }
}

impl Durable {
    /// Opens the database; the store readies it (its first call runs its `prepare`).
    pub fn open(what: &'static str, path: &Path, opener: Opener, reopen_every: Duration) -> Result<Durable, String> {
        let db = opener(path)?;
        Ok(Durable {
            what,
            path: path.into(),
            opener,
            db: RwLock::new(Some(db)),
            state: Mutex::new(State::default()),
            reopen_every,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Why writes fail now, if they do (from memory; never a key).
    pub fn write_error(&self) -> Option<String> {
        let state = self.state();
        state.write_error.clone().or_else(|| state.broken.then(|| "reopening after an I/O error".into()))
    }

    /// Reopens the database if a call failed for an I/O reason (at most once per
    /// `reopen_every`); an error when it is still unusable.
    fn recover(&self, prepare: Prepare<'_>) -> Result<(), DbError> {
        {
            let mut state = self.state();
            if !state.broken {
                return Ok(());
            }
            if state.last_reopen.is_some_and(|at| at.elapsed() < self.reopen_every) {
                return Err(DbError::Unavailable(state.write_error.clone().unwrap_or_else(|| "reopening".into())));
            }
            state.last_reopen = Some(Instant::now());
        }
        let failed = |message: String| {
            tracing::warn!(store = self.what, path = %self.path.display(), error = %message, "reopen failed");
            self.state().write_error = Some(message.clone());
            DbError::Unavailable(message)
        };
        let mut slot = self.db.write().unwrap_or_else(PoisonError::into_inner);
        // Another caller reopened it while this one waited.
        if !self.state().broken {
            return Ok(());
        }
        // The old handle goes first: it holds the file's lock.
        drop(slot.take());
        let db = (self.opener)(&self.path).map_err(failed)?;
        prepare(&db).map_err(|e| failed(e.to_string()))?;
        *slot = Some(db);
        self.state().broken = false;
        tracing::info!(store = self.what, path = %self.path.display(), "reopened after an I/O error");
        Ok(())
    }

    /// Runs `f` on the database, reopening it first (readied by `prepare`) if it failed
    /// before; an I/O error marks it for reopening. A `write` that succeeds clears the
    /// error [`Durable::write_error`] reports.
    pub fn with_db<T>(
        &self,
        write: bool,
        prepare: Prepare<'_>,
        f: impl FnOnce(&Database) -> Result<T, redb::Error>,
    ) -> Result<T, DbError> {
        self.recover(prepare)?;
        let result = {
            let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
            let Some(db) = db.as_ref() else { return Err(DbError::Unavailable("not open".into())) };
            f(db)
        };
        match result {
            Ok(v) => {
                if write {
                    self.state().write_error = None;
                }
                Ok(v)
            }
            Err(e) if is_io(&e) => {
                let mut state = self.state();
                // `PreviousIo` is redb's memory of an error already recorded (a call
                // that was on the database when another failed): keep that reason.
                if let (redb::Error::PreviousIo, Some(first)) = (&e, state.write_error.clone()) {
                    state.broken = true;
                    return Err(DbError::Unavailable(first));
                }
                let message = e.to_string();
                tracing::error!(store = self.what, path = %self.path.display(), error = %message, "I/O error; the file will be reopened");
                state.broken = true;
                state.write_error = Some(message.clone());
                Err(DbError::Unavailable(message))
            }
            Err(e) => Err(DbError::Other(e.to_string())),
        }
    }

    /// Runs `f` in one write transaction and commits it durably (fsync).
    pub fn write<T>(
        &self,
        prepare: Prepare<'_>,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, DbError> {
        self.with_db(true, prepare, |db| {
            let tx = db.begin_write()?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
    }

    /// Runs `f` in one read transaction.
    pub fn read<T>(
        &self,
        prepare: Prepare<'_>,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, DbError> {
        self.with_db(false, prepare, |db| f(&db.begin_read()?))
    }
}

/// A file backend whose writes fail while a flag is set, as on a full disk: the
/// stores' tests inject I/O errors with it.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::Opener;

    #[derive(Debug)]
    struct Flaky {
        file: redb::backends::FileBackend,
        fail: Arc<AtomicBool>,
    }

    impl Flaky {
        fn check(&self) -> std::io::Result<()> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left on device"));
            }
            Ok(())
        }
    }

    impl redb::StorageBackend for Flaky {
        fn len(&self) -> std::io::Result<u64> {
            self.file.len()
        }
        fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
            self.file.read(offset, len)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.check()?;
            self.file.set_len(len)
        }
        fn sync_data(&self, eventual: bool) -> std::io::Result<()> {
            self.check()?;
            self.file.sync_data(eventual)
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.file.write(offset, data)
        }
    }

    /// An opener whose databases fail every write while `fail` is set.
    pub(crate) fn flaky_opener(fail: Arc<AtomicBool>) -> Opener {
        Box::new(move |p| {
            super::create_private(p).map_err(|e| e.to_string())?;
            let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(p);
            let file = redb::backends::FileBackend::new(file.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
            redb::Builder::new().create_with_backend(Flaky { file, fail: fail.clone() }).map_err(|e| e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call that was already on the database when another one failed meets redb's
    /// `PreviousIo`: `/health` keeps the reason of the failure itself (a full disk),
    /// not redb's "close and re-open".
    #[test]
    fn a_previous_io_error_keeps_the_first_reason() {
        let dir = std::env::temp_dir().join(format!("kp-durable-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let db = Durable::open("test store", &dir.join("d.redb"), file_opener(), REOPEN_EVERY).unwrap();
        let prepare: Prepare<'_> = &|_| Ok(());
        let full = || redb::Error::Io(std::io::Error::new(std::io::ErrorKind::StorageFull, "File too large"));
        let outer = db.with_db(true, prepare, |_| {
            // Fails while the outer call holds the database, as a concurrent write does.
            assert!(db.with_db(true, prepare, |_| Err::<(), _>(full())).is_err());
            Err::<(), _>(redb::Error::PreviousIo)
        });
        assert!(outer.is_err());
        let error = db.write_error().expect("writes fail");
        assert!(error.contains("File too large"), "{error}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
