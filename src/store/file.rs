//! The file backend: the memory backend plus one JSON file per thread.
//!
//! Every change is written crash-safely: a temp file in the same directory, `fsync`, then
//! `rename` over the old file (or a hard link for an exclusive create), then an `fsync` of the
//! directory. A crash at any point leaves either the old or the new file, never a torn one;
//! stray temp files are ignored and removed on load. File names are the id's
//! [`ThreadId::encoded`] form, so no id can name a path outside the data directory or another
//! thread's file. A lock file keeps a second process from opening the same directory.

use super::memory::{Persist, Records};
use super::record::Record;
use super::{Result, StoreError};
use crate::id::ThreadId;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

const EXT: &str = "json";
const TMP_PREFIX: &str = ".tmp-";
const LOCK_FILE: &str = ".lock";
/// Where thread files that cannot be read back are moved at start-up, for an operator to
/// inspect; the loader never looks inside it.
pub const SET_ASIDE_DIR: &str = "set-aside";

pub struct Files {
    dir: PathBuf,
    /// Held for the store's lifetime: the OS lock on `LOCK_FILE`.
    _lock: File,
    tmp_seq: AtomicU64,
}

/// The file backend: records in memory, each persisted to its own file.
pub type FileStore = Records<Files>;

impl FileStore {
    /// Opens (creating if needed) the data directory and loads every thread in it.
    pub async fn open(dir: impl AsRef<Path>) -> anyhow::Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        tokio::task::spawn_blocking(move || Self::open_blocking(dir)).await?
    }

    fn open_blocking(dir: PathBuf) -> anyhow::Result<Self> {
        fs::create_dir_all(&dir)
            .map_err(|e| anyhow::anyhow!("cannot create data dir {}: {e}", dir.display()))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))?;
        lock.try_lock().map_err(|_| {
            anyhow::anyhow!(
                "data dir {} is in use by another threadgate process",
                dir.display()
            )
        })?;
        let mut loaded = BTreeMap::new();
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.starts_with(TMP_PREFIX) {
                // A write that never reached its rename: the previous file is intact.
                fs::remove_file(&path)?;
                continue;
            }
            let Some(id) = name
                .strip_suffix(&format!(".{EXT}"))
                .and_then(ThreadId::decode)
            else {
                continue;
            };
            let bytes = fs::read(&path)?;
            match serde_json::from_slice::<Record>(&bytes) {
                Ok(mut record) => {
                    record.rebuild_ids();
                    loaded.insert(id, record);
                }
                // One unreadable thread (edited by hand, or written by an older version beyond
                // today's limits) must not keep the others from being served.
                Err(e) => set_aside(&dir, &path, &id, &e)?,
            }
        }
        let files = Files {
            dir,
            _lock: lock,
            tmp_seq: AtomicU64::new(0),
        };
        Ok(Records::with(files, loaded))
    }
}

/// Moves an unreadable thread file into [`SET_ASIDE_DIR`] (with a timestamp, so nothing is
/// overwritten) and logs why; the thread is then absent until the file is repaired and moved
/// back.
fn set_aside(dir: &Path, path: &Path, id: &ThreadId, why: &serde_json::Error) -> io::Result<()> {
    let aside = dir.join(SET_ASIDE_DIR);
    fs::create_dir_all(&aside)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let target = aside.join(format!("{name}.{}", super::now_ms()));
    fs::rename(path, &target)?;
    File::open(dir)?.sync_all()?;
    tracing::error!(
        thread = %id,
        error = %why,
        moved_to = %target.display(),
        "thread file cannot be read back; set aside, serving the other threads"
    );
    Ok(())
}

impl Files {
    fn path(&self, id: &ThreadId) -> PathBuf {
        self.dir.join(format!("{}.{EXT}", id.encoded()))
    }

    /// Writes `record` to a fresh, fsynced temp file and returns its path.
    fn write_tmp(&self, id: &ThreadId, record: &Record) -> io::Result<PathBuf> {
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!(
            "{TMP_PREFIX}{}-{}-{seq}",
            id.encoded(),
            std::process::id()
        ));
        let bytes = serde_json::to_vec(record).map_err(io::Error::other)?;
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        Ok(tmp)
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

fn io_err(e: io::Error) -> StoreError {
    StoreError::Unavailable(format!("file store: {e}"))
}

impl Persist for Files {
    const DURABLE: bool = true;

    fn create(&self, id: &ThreadId, record: &Record) -> Result<()> {
        let tmp = self.write_tmp(id, record).map_err(io_err)?;
        // A hard link fails if the name exists: an exclusive create, even across processes.
        let linked = fs::hard_link(&tmp, self.path(id));
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => self.sync_dir().map_err(io_err),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(StoreError::AlreadyExists),
            Err(e) => Err(io_err(e)),
        }
    }

    fn save(&self, id: &ThreadId, record: &Record) -> Result<()> {
        let tmp = self.write_tmp(id, record).map_err(io_err)?;
        if let Err(e) = fs::rename(&tmp, self.path(id)) {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(e));
        }
        self.sync_dir().map_err(io_err)
    }

    fn remove(&self, id: &ThreadId) -> Result<()> {
        match fs::remove_file(self.path(id)) {
            Ok(()) => self.sync_dir().map_err(io_err),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(e)),
        }
    }
}
