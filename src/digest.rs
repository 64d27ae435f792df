//! Content digests (`sha256:<hex>`, `sha512:<hex>`) and readers/writers that
//! refuse bytes which do not match the digest they claim. What ggfs makes is
//! named by sha256; what it checks is checked in the algorithm of the
//! digest it was given.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use sha2::{Digest as _, Sha256, Sha512};

use crate::error::{Error, Result};

/// A validated `algorithm:hex` content digest, sha256 or sha512 (the two the
/// OCI image spec registers).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parse and validate `algorithm:hex` (lower-case hex of the algorithm's length).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |reason: &str| Error::Digest {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let (algo, hex) = s.split_once(':').ok_or_else(|| bad("missing ':'"))?;
        let want = match algo {
            "sha256" => 64,
            "sha512" => 128,
            "" => return Err(bad("empty algorithm")),
            _ => return Err(bad("unsupported algorithm (want sha256 or sha512)")),
        };
        if hex.len() != want {
            return Err(bad(&format!(
                "{algo} needs {want} hex digits, found {}",
                hex.len()
            )));
        }
        if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad("hex part must be lowercase hexadecimal"));
        }
        Ok(Digest(s.to_string()))
    }

    /// The sha256 digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        let mut h = Hasher::new();
        h.update(bytes);
        h.finish()
    }

    /// The digest of `bytes` in this digest's algorithm.
    pub fn of_like(&self, bytes: &[u8]) -> Self {
        let mut h = Hasher::like(self);
        h.update(bytes);
        h.finish()
    }

    /// Whether `bytes` hash to this digest.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        &self.of_like(bytes) == self
    }

    /// `sha256` or `sha512`.
    pub fn algorithm(&self) -> &str {
        self.0.split_once(':').map(|(a, _)| a).unwrap_or_default()
    }

    /// The hex part.
    pub fn hex(&self) -> &str {
        self.0.split_once(':').map(|(_, h)| h).unwrap_or_default()
    }

    /// The whole `algorithm:hex` string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Short form for humans: `sha256:0123456789ab`.
    pub fn short(&self) -> &str {
        &self.0[..self.0.len().min(19)]
    }

    /// Check `bytes` against this digest.
    pub fn verify(&self, bytes: &[u8]) -> Result<()> {
        let actual = self.of_like(bytes);
        if &actual != self {
            return Err(Error::DigestMismatch {
                expected: self.clone(),
                actual,
            });
        }
        Ok(())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.0)
    }
}

impl FromStr for Digest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Digest::parse(s)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Incremental sha256 (or sha512) that also counts bytes.
#[derive(Clone)]
pub struct Hasher {
    sha: Sha,
    len: u64,
}

#[derive(Clone)]
enum Sha {
    S256(Sha256),
    S512(Box<Sha512>),
}

impl Default for Hasher {
    fn default() -> Self {
        Hasher {
            sha: Sha::S256(Sha256::new()),
            len: 0,
        }
    }
}

impl Hasher {
    /// sha256, the algorithm of everything ggfs names.
    pub fn new() -> Self {
        Self::default()
    }

    /// A hasher in `digest`'s algorithm, to check bytes against it.
    pub fn like(digest: &Digest) -> Self {
        let sha = match digest.algorithm() {
            "sha512" => Sha::S512(Box::default()),
            _ => Sha::S256(Sha256::new()),
        };
        Hasher { sha, len: 0 }
    }

    /// Hash more bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        match &mut self.sha {
            Sha::S256(h) => h.update(bytes),
            Sha::S512(h) => h.update(bytes),
        }
        self.len += bytes.len() as u64;
    }

    /// Hashes everything `r` yields, streamed through one 256 KiB buffer.
    pub fn read_all(mut r: impl Read) -> io::Result<Self> {
        let mut h = Self::new();
        let mut buf = vec![0; 256 * 1024];
        loop {
            match r.read(&mut buf) {
                Ok(0) => return Ok(h),
                Ok(n) => h.update(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing was hashed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of everything hashed.
    pub fn finish(self) -> Digest {
        Digest(match self.sha {
            Sha::S256(h) => format!("sha256:{}", hex::encode(h.finalize())),
            Sha::S512(h) => format!("sha512:{}", hex::encode(h.finalize())),
        })
    }

    /// Finish and compare against the expected digest and (if known) size.
    pub fn verify(self, expected: &Digest, size: Option<u64>) -> Result<()> {
        let len = self.len;
        if let Some(size) = size.filter(|&s| s != len) {
            return Err(Error::SizeMismatch {
                digest: expected.clone(),
                expected: size,
                actual: len,
            });
        }
        let actual = self.finish();
        if &actual != expected {
            return Err(Error::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        Ok(())
    }
}

/// A hasher is a writer that keeps nothing but the hash.
impl Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Passes bytes through to `inner` while hashing (and counting) them, for
/// digests of what a writer produces (compressed layers, DiffIDs).
pub struct HashingWriter<W> {
    /// Where the bytes go.
    pub inner: W,
    /// What has been written so far, hashed.
    pub hasher: Hasher,
}

impl<W> HashingWriter<W> {
    /// Hash with sha256 what goes to `inner`.
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Hasher::new(),
        }
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes what passes through and, at end of stream, fails with
/// `Error::DigestMismatch`/`SizeMismatch` (inside an `io::Error`) instead of
/// returning EOF when the bytes are not the expected blob. It also refuses to
/// read past the expected size.
pub struct VerifyingReader<R> {
    inner: R,
    hasher: Option<Hasher>,
    expected: Digest,
    size: Option<u64>,
}

impl<R: Read> VerifyingReader<R> {
    /// Read `inner`, which must be the blob `expected` (of `size` bytes, when known).
    pub fn new(inner: R, expected: Digest, size: Option<u64>) -> Self {
        Self {
            inner,
            hasher: Some(Hasher::like(&expected)),
            expected,
            size,
        }
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(hasher) = self.hasher.as_mut() else {
            return Ok(0);
        };
        let n = self.inner.read(buf)?;
        if n == 0 {
            let hasher = self.hasher.take().expect("present");
            hasher.verify(&self.expected, self.size)?;
            return Ok(0);
        }
        hasher.update(&buf[..n]);
        if let Some(size) = self.size.filter(|&s| hasher.len() > s) {
            return Err(Error::SizeMismatch {
                digest: self.expected.clone(),
                expected: size,
                actual: hasher.len(),
            }
            .into());
        }
        Ok(n)
    }
}

/// Writes a blob to a temporary file beside `dest` and renames it into place
/// only once its digest and size check out, so a file at `dest` is always a
/// whole, verified blob.
pub struct BlobWriter {
    tmp: tempfile::NamedTempFile,
    dest: PathBuf,
    hasher: Hasher,
    expected: Digest,
    size: Option<u64>,
}

impl BlobWriter {
    /// Start writing the blob `expected` (of `size` bytes, when known) to land at `dest`.
    pub fn create(dest: impl AsRef<Path>, expected: Digest, size: Option<u64>) -> Result<Self> {
        let dest = dest.as_ref().to_path_buf();
        let dir = dest.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display().to_string(), e))?;
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(dir)
            .map_err(|e| Error::io(dir.display().to_string(), e))?;
        Ok(Self {
            tmp,
            dest,
            hasher: Hasher::like(&expected),
            expected,
            size,
        })
    }

    /// Verify and move into place. On error the temporary file is removed.
    pub fn commit(self) -> Result<PathBuf> {
        self.hasher.verify(&self.expected, self.size)?;
        self.tmp
            .as_file()
            .sync_data()
            .map_err(|e| Error::io(self.dest.display().to_string(), e))?;
        self.tmp
            .persist(&self.dest)
            .map_err(|e| Error::io(self.dest.display().to_string(), e.error))?;
        Ok(self.dest)
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.tmp.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tmp.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parse_and_hash() {
        assert_eq!(Digest::of(b"").as_str(), EMPTY);
        assert_eq!(Digest::parse(EMPTY).unwrap().hex().len(), 64);
        for bad in [
            "sha256",
            "sha256:abc",
            "md5:00",
            &EMPTY.to_uppercase(),
            ":00",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn sha512_digests_are_checked_in_their_algorithm() {
        // sha512("abc"), FIPS 180-2's example.
        let abc = Digest::parse("sha512:ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f").unwrap();
        assert!(abc.matches(b"abc"));
        assert!(!abc.matches(b"abd"));
        assert_eq!(abc.of_like(b"abc"), abc);
        let mut out = Vec::new();
        VerifyingReader::new(&b"abc"[..], abc.clone(), Some(3))
            .read_to_end(&mut out)
            .unwrap();
        assert!(VerifyingReader::new(&b"abd"[..], abc.clone(), None)
            .read_to_end(&mut out)
            .is_err());
        assert!(abc.verify(b"abc").is_ok() && abc.verify(b"ab").is_err());
    }

    #[test]
    fn verifying_reader_rejects_wrong_bytes() {
        let d = Digest::of(b"hello");
        let mut ok = String::new();
        VerifyingReader::new(&b"hello"[..], d.clone(), Some(5))
            .read_to_string(&mut ok)
            .unwrap();
        assert_eq!(ok, "hello");
        let mut out = Vec::new();
        let err = VerifyingReader::new(&b"hellp"[..], d.clone(), None)
            .read_to_end(&mut out)
            .unwrap_err();
        assert!(err.to_string().contains("failed verification"), "{err}");
        let err = VerifyingReader::new(&b"hello!"[..], d, Some(5))
            .read_to_end(&mut out)
            .unwrap_err();
        assert!(err.to_string().contains("expected 5 bytes"), "{err}");
    }

    #[test]
    fn blob_writer_leaves_nothing_on_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("blob");
        let mut w = BlobWriter::create(&dest, Digest::of(b"good"), None).unwrap();
        w.write_all(b"evil").unwrap();
        assert!(w.commit().is_err());
        assert!(!dest.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        let mut w = BlobWriter::create(&dest, Digest::of(b"good"), Some(4)).unwrap();
        w.write_all(b"good").unwrap();
        w.commit().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"good");
    }
}
