//! `events.log`: the append-only event log. After an 8-byte magic
//! (`HVPLOG` + format version as u16 LE), each record is
//! `u32 len | u32 crc32(payload) | payload` (little endian), the payload
//! being one raw event as the eBPF program wrote it. A crash can only cut
//! the last record; the reader stops there and says so. A record longer
//! than [`MAX_RECORD`] or with a bad checksum is corruption, reported with
//! its offset, never a panic or an unbounded allocation.

use std::{
    fs::File,
    io::{BufReader, BufWriter, ErrorKind, Read, Write},
    path::Path,
};

pub const MAGIC: &[u8; 6] = b"HVPLOG";
pub const VERSION: u16 = 1;
/// Largest payload accepted when reading.
pub const MAX_RECORD: u32 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not an hvprof event log (bad magic)")]
    BadMagic { path: String },
    #[error("{path}: event-log version {found} is not supported (this hvprof reads {VERSION})")]
    Version { path: String, found: u16 },
    #[error("{path}: corrupt record at byte {offset}: {what}")]
    Corrupt {
        path: String,
        offset: u64,
        what: String,
    },
}

/// Appends records; flushed by the caller after each batch so that what is
/// on disk is always a valid prefix.
pub struct LogWriter {
    out: BufWriter<File>,
    path: String,
    pub records: u64,
    pub bytes: u64,
}

impl LogWriter {
    pub fn create(path: &Path) -> Result<Self, LogError> {
        let io = |source| LogError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = File::options()
            .create_new(true)
            .write(true)
            .open(path)
            .map_err(io)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(MAGIC).map_err(io)?;
        out.write_all(&VERSION.to_le_bytes()).map_err(io)?;
        Ok(Self {
            out,
            path: path.display().to_string(),
            records: 0,
            bytes: 8,
        })
    }

    pub fn append(&mut self, payload: &[u8]) -> Result<(), LogError> {
        let len = payload.len() as u32;
        let crc = crc32fast::hash(payload);
        let mut head = [0u8; 8];
        head[..4].copy_from_slice(&len.to_le_bytes());
        head[4..].copy_from_slice(&crc.to_le_bytes());
        self.out
            .write_all(&head)
            .and_then(|()| self.out.write_all(payload))
            .map_err(|source| LogError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.records += 1;
        self.bytes += 8 + u64::from(len);
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), LogError> {
        self.out.flush().map_err(|source| LogError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// Reads records in order.
pub struct LogReader<R> {
    input: R,
    path: String,
    offset: u64,
    buf: Vec<u8>,
    /// Set when the log ended inside a record (a crash while writing).
    pub truncated_tail: bool,
}

impl LogReader<BufReader<File>> {
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let file = File::open(path).map_err(|source| LogError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::new(
            BufReader::with_capacity(1 << 20, file),
            &path.display().to_string(),
        )
    }
}

impl<R: Read> LogReader<R> {
    pub fn new(mut input: R, path: &str) -> Result<Self, LogError> {
        let mut head = [0u8; 8];
        match read_full(&mut input, &mut head) {
            Ok(8) => {}
            Ok(_) => return Err(LogError::BadMagic { path: path.into() }),
            Err(source) => {
                return Err(LogError::Io {
                    path: path.into(),
                    source,
                });
            }
        }
        if &head[..6] != MAGIC {
            return Err(LogError::BadMagic { path: path.into() });
        }
        let found = u16::from_le_bytes([head[6], head[7]]);
        if found != VERSION {
            return Err(LogError::Version {
                path: path.into(),
                found,
            });
        }
        Ok(Self {
            input,
            path: path.into(),
            offset: 8,
            buf: Vec::with_capacity(256),
            truncated_tail: false,
        })
    }

    /// The next record's payload; `Ok(None)` at the end (or at a cut tail).
    pub fn next_record(&mut self) -> Result<Option<&[u8]>, LogError> {
        let io = |path: &str, source| LogError::Io {
            path: path.to_string(),
            source,
        };
        let mut head = [0u8; 8];
        let n = read_full(&mut self.input, &mut head).map_err(|e| io(&self.path, e))?;
        if n == 0 {
            return Ok(None);
        }
        if n < 8 {
            self.truncated_tail = true;
            return Ok(None);
        }
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len > MAX_RECORD {
            return Err(LogError::Corrupt {
                path: self.path.clone(),
                offset: self.offset,
                what: format!("length {len} exceeds {MAX_RECORD}"),
            });
        }
        self.buf.resize(len as usize, 0);
        let got = read_full(&mut self.input, &mut self.buf).map_err(|e| io(&self.path, e))?;
        if got < len as usize {
            self.truncated_tail = true;
            return Ok(None);
        }
        if crc32fast::hash(&self.buf) != crc {
            return Err(LogError::Corrupt {
                path: self.path.clone(),
                offset: self.offset,
                what: "checksum mismatch".into(),
            });
        }
        self.offset += 8 + u64::from(len);
        Ok(Some(&self.buf))
    }
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_bytes(records: &[&[u8]]) -> Vec<u8> {
        // Tests run in parallel threads: one file each.
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("hvprof-log-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let mut w = LogWriter::create(&dir).expect("create");
        for r in records {
            w.append(r).expect("append");
        }
        w.flush().expect("flush");
        drop(w);
        let bytes = std::fs::read(&dir).expect("read");
        let _ = std::fs::remove_file(&dir);
        bytes
    }

    fn read_all(bytes: &[u8]) -> Result<(Vec<Vec<u8>>, bool), LogError> {
        let mut r = LogReader::new(bytes, "t")?;
        let mut out = Vec::new();
        while let Some(rec) = r.next_record()? {
            out.push(rec.to_vec());
        }
        Ok((out, r.truncated_tail))
    }

    #[test]
    fn round_trip_and_every_cut_keeps_the_complete_prefix() {
        let recs: [&[u8]; 3] = [b"alpha", b"", b"gamma-gamma"];
        let bytes = log_bytes(&recs);
        let (all, cut) = read_all(&bytes).expect("reads");
        assert_eq!(all, recs.iter().map(|r| r.to_vec()).collect::<Vec<_>>());
        assert!(!cut);
        // Cut at every byte: never an error, always a prefix of whole records.
        for n in 8..bytes.len() {
            let (got, _) = read_all(&bytes[..n]).expect("a cut log still reads");
            assert!(got.len() <= recs.len());
            for (g, r) in got.iter().zip(recs.iter()) {
                assert_eq!(g.as_slice(), *r);
            }
        }
    }

    #[test]
    fn corruption_is_an_error_not_a_panic() {
        let mut bytes = log_bytes(&[b"payload"]);
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        assert!(matches!(read_all(&bytes), Err(LogError::Corrupt { .. })));
        let mut huge = log_bytes(&[b"x"]);
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(read_all(&huge), Err(LogError::Corrupt { .. })));
        assert!(matches!(
            read_all(b"NOTALOG!"),
            Err(LogError::BadMagic { .. })
        ));
        assert!(matches!(read_all(b"HVP"), Err(LogError::BadMagic { .. })));
    }
}
