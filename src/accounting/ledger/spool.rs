//! The spool: ledger lines that PostgreSQL did not take yet, on local disk, in the order they
//! came, until they are sent.
//!
//! One file of JSON lines (the ledger's own lines), appended a batch at a time and fsynced after
//! each batch, so that what a SIGKILL can lose is only what had not reached it. It is read back
//! in chunks from a cursor while being sent, may grow at its end meanwhile, and is emptied
//! (truncated and fsynced) when every line in it was sent. Bounded only by the disk.
//!
//! The file is locked (`flock`, exclusive) while a gateway has it: two replicas given the same
//! spool would send and truncate each other's lines, so the second is refused at start.
//!
//! Edge cases: a last line without its `\n` (a process killed in the middle of an append, or a
//! disk that filled) is cut off when the spool is opened, and counted as lost; a failed append
//! is cut back to where the file ended, so that the file never holds half a line.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

/// The bytes read from the spool at a time while sending it: a few thousand lines.
const CHUNK_BYTES: usize = 1 << 20;

/// Why the spool cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("cannot open the spool {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("the spool {} is in use by another running gateway; give each replica a spool_path of its own", path.display())]
    Locked { path: PathBuf },
}

pub(super) struct Spool {
    path: PathBuf,
    file: File,
    /// Where the next line to send starts.
    cursor: u64,
    /// The file's length: where the next append goes.
    end: u64,
    /// Lines from the cursor to the end.
    lines: u64,
}

impl Spool {
    /// Opens (creating) and locks the spool; returns it and how many torn bytes were cut off
    /// its end.
    pub(super) fn open(path: &Path) -> Result<(Spool, bool), SpoolError> {
        let open_error = |source| SpoolError::Open {
            path: path.to_owned(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(open_error)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(open_error)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(SpoolError::Locked {
                    path: path.to_owned(),
                })
            }
            Err(std::fs::TryLockError::Error(error)) => return Err(open_error(error)),
        }
        let mut spool = Spool {
            path: path.to_owned(),
            file,
            cursor: 0,
            end: 0,
            lines: 0,
        };
        let torn = spool.scan().map_err(open_error)?;
        Ok((spool, torn))
    }

    /// Counts the lines and cuts off a torn last line; says whether there was one.
    fn scan(&mut self) -> io::Result<bool> {
        let length = self.file.metadata()?.len();
        let mut buf = vec![0; CHUNK_BYTES];
        let (mut at, mut lines, mut last_newline) = (0u64, 0u64, 0u64);
        while at < length {
            let read = self.file.read_at(&mut buf, at)?;
            if read == 0 {
                break;
            }
            for position in memchr::memchr_iter(b'\n', &buf[..read]) {
                lines += 1;
                last_newline = at + position as u64 + 1;
            }
            at += read as u64;
        }
        let torn = last_newline < at;
        if torn {
            self.file.set_len(last_newline)?;
            self.file.sync_data()?;
        }
        self.end = last_newline;
        self.lines = lines;
        Ok(torn)
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Lines waiting to be sent.
    pub(super) fn lines(&self) -> u64 {
        self.lines
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lines == 0
    }

    /// Appends `lines` (each ending in `\n`) and fsyncs. On failure nothing of them stays.
    pub(super) fn append(&mut self, lines: &[Bytes]) -> io::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(lines.iter().map(Bytes::len).sum());
        for line in lines {
            buf.extend_from_slice(line);
        }
        let written = self
            .file
            .write_all_at(&buf, self.end)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.end += buf.len() as u64;
                self.lines += lines.len() as u64;
                Ok(())
            }
            Err(error) => {
                // Cut back whatever part was written, so that no half line stays.
                let _ = self.file.set_len(self.end);
                Err(error)
            }
        }
    }

    /// Reads whole lines from the cursor into `buf` (cleared first), at most [`CHUNK_BYTES`];
    /// empty at the end. A "line" longer than a chunk (never written by a gateway) comes back
    /// as one chunk without a `\n`, to be skipped as malformed.
    pub(super) fn read_chunk(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        buf.clear();
        let want = usize::try_from(self.end - self.cursor)
            .unwrap_or(usize::MAX)
            .min(CHUNK_BYTES);
        buf.resize(want, 0);
        let mut filled = 0;
        while filled < want {
            match self
                .file
                .read_at(&mut buf[filled..], self.cursor + filled as u64)?
            {
                0 => break,
                n => filled += n,
            }
        }
        buf.truncate(filled);
        if let Some(last) = memchr::memrchr(b'\n', buf) {
            buf.truncate(last + 1);
        }
        Ok(())
    }

    /// Marks `bytes` holding `lines` lines from the cursor as sent.
    pub(super) fn advance(&mut self, bytes: usize, lines: u64) {
        self.cursor = (self.cursor + bytes as u64).min(self.end);
        self.lines = self.lines.saturating_sub(lines);
    }

    /// Empties the file once everything in it was sent.
    pub(super) fn clear(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.sync_data()?;
        self.cursor = 0;
        self.end = 0;
        self.lines = 0;
        Ok(())
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = self.file.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(range: std::ops::Range<u32>) -> Vec<Bytes> {
        range
            .map(|n| Bytes::from(format!("{{\"n\":{n}}}\n")))
            .collect()
    }

    #[test]
    fn lines_come_back_in_order_across_reopens_and_a_clear_empties_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub").join("spool");
        let (mut spool, torn) = Spool::open(&path).expect("open");
        assert!(!torn && spool.is_empty());
        spool.append(&lines(0..3)).expect("append");
        spool.append(&lines(3..5)).expect("append");
        drop(spool);

        let (mut spool, torn) = Spool::open(&path).expect("reopen");
        assert!(!torn);
        assert_eq!(spool.lines(), 5, "counted from the file");
        let mut buf = Vec::new();
        spool.read_chunk(&mut buf).expect("read");
        let text = String::from_utf8(buf.clone()).expect("utf-8");
        assert_eq!(text.lines().count(), 5);
        assert!(text.starts_with("{\"n\":0}\n{\"n\":1}"), "{text}");
        spool.advance(buf.len(), 5);
        assert!(spool.is_empty(), "every line sent");
        spool.clear().expect("clear");
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 0);
        assert!(spool.is_empty());
    }

    #[test]
    fn a_torn_last_line_is_cut_off_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spool");
        std::fs::write(&path, "{\"n\":1}\n{\"n\":2}\n{\"n\":").expect("write");
        let (mut spool, torn) = Spool::open(&path).expect("open");
        assert!(torn, "the half line is reported");
        assert_eq!(spool.lines(), 2);
        spool.append(&lines(7..8)).expect("append");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(
            text, "{\"n\":1}\n{\"n\":2}\n{\"n\":7}\n",
            "no half line left"
        );
    }

    #[test]
    fn a_second_opener_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spool");
        let _first = Spool::open(&path).expect("open");
        let error = Spool::open(&path).err().expect("locked");
        assert!(matches!(error, SpoolError::Locked { .. }), "{error}");
        assert!(
            error.to_string().contains("spool_path of its own"),
            "{error}"
        );
    }
}
