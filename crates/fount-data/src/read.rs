//! Readers: JSONL (plain, `.gz`, `.zst`), plain-text files, directories and Parquet, streamed.
//!
//! Every reader yields [`Record`]s one at a time, so memory does not grow with the file. JSON lines
//! are returned unparsed ([`Record::JsonLine`]) so that parsing happens on the worker threads;
//! [`parse_json_line`] turns one into a [`Document`].

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::doc::Document;
use crate::error::{Error, Result};

/// What to do with a record that cannot be read (malformed JSON, invalid UTF-8, no text field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Stop the run with an error naming the file and line.
    #[default]
    Stop,
    /// Record it in `dropped/` with reason `unreadable` and go on.
    Skip,
}

/// How input records map to documents.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReaderConfig {
    /// The field (JSONL) or column (Parquet) holding the text.
    pub text_field: String,
    /// The field holding the id; records without one get `<file stem>:<line>`.
    pub id_field: String,
    /// What to do with unreadable records.
    pub on_error: OnError,
}

impl Default for ReaderConfig {
    fn default() -> Self {
        ReaderConfig {
            text_field: "text".into(),
            id_field: "id".into(),
            on_error: OnError::Stop,
        }
    }
}

/// The input formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// One document per file.
    Text,
    /// Apache Parquet, one document per row.
    Parquet,
}

/// The compression of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// None.
    None,
    /// gzip.
    Gzip,
    /// Zstandard.
    Zstd,
}

/// Recognises a file's format and compression from its name.
pub fn detect(path: &Path) -> Option<(Format, Compression)> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    let (stem, comp) = if let Some(s) = name.strip_suffix(".gz") {
        (s, Compression::Gzip)
    } else if let Some(s) = name.strip_suffix(".zst") {
        (s, Compression::Zstd)
    } else {
        (name.as_str(), Compression::None)
    };
    let fmt = if stem.ends_with(".jsonl") || stem.ends_with(".ndjson") || stem.ends_with(".json") {
        Format::Jsonl
    } else if stem.ends_with(".txt") || stem.ends_with(".md") || stem.ends_with(".text") {
        Format::Text
    } else if stem.ends_with(".parquet") && comp == Compression::None {
        Format::Parquet
    } else {
        return None;
    };
    Some((fmt, comp))
}

/// Expands the inputs: files as given, directories walked recursively (files with a recognised
/// format, sorted by path). Errors on a missing path or an input that yields no files.
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        let meta = fs_err::metadata(input)?;
        if meta.is_dir() {
            let mut found = Vec::new();
            walk(input, &mut found)?;
            found.sort();
            if found.is_empty() {
                return Err(Error::BadInput {
                    path: input.clone(),
                    reason:
                        "directory holds no .jsonl, .jsonl.gz, .jsonl.zst, .txt or .parquet files"
                            .into(),
                });
            }
            out.extend(found);
        } else if detect(input).is_some() {
            out.push(input.clone());
        } else {
            return Err(Error::BadInput {
                path: input.clone(),
                reason:
                    "unknown format (expected .jsonl[.gz|.zst], .txt[.gz|.zst], .md or .parquet)"
                        .into(),
            });
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs_err::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if detect(&path).is_some() {
            out.push(path);
        }
    }
    Ok(())
}

/// A reader that computes the SHA-256 of the bytes read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// The SHA-256 and size of what a [`HashingReader`] has read, shared with the reader.
#[derive(Debug, Clone, Default)]
pub struct FileDigest {
    /// Lower-case hex SHA-256 of the file's bytes (compressed, as stored).
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of a file (streamed).
pub fn sha256_file(path: &Path) -> Result<FileDigest> {
    let mut r = HashingReader::new(BufReader::with_capacity(1 << 20, fs_err::File::open(path)?));
    std::io::copy(&mut r, &mut std::io::sink())?;
    Ok(FileDigest {
        sha256: hex(&r.hasher.finalize()),
        bytes: r.bytes,
    })
}

/// One unit read from an input.
#[derive(Debug)]
pub enum Record {
    /// A raw JSON line (1-based line number), parsed later by [`parse_json_line`].
    JsonLine(u64, Vec<u8>),
    /// A document read whole (text files, Parquet rows).
    Doc(Document),
    /// A record that could not be read, with the error (only yielded under [`OnError::Skip`]).
    Unreadable(Error),
}

/// The file stem used for assigned ids.
fn stem(path: &Path) -> String {
    let name = path.file_name().and_then(|s| s.to_str()).unwrap_or("input");
    name.split('.').next().unwrap_or(name).to_string()
}

/// Parses one JSON line into a document.
pub fn parse_json_line(
    path: &Path,
    line_no: u64,
    bytes: &[u8],
    cfg: &ReaderConfig,
) -> Result<Document> {
    let text = std::str::from_utf8(bytes).map_err(|e| Error::InvalidUtf8 {
        path: path.to_path_buf(),
        line: line_no,
        offset: e.valid_up_to(),
    })?;
    let value: Value = serde_json::from_str(text).map_err(|e| Error::MalformedJson {
        path: path.to_path_buf(),
        line: line_no,
        reason: e.to_string(),
    })?;
    let Value::Object(mut map) = value else {
        return Err(Error::MalformedJson {
            path: path.to_path_buf(),
            line: line_no,
            reason: "the line is not a JSON object".into(),
        });
    };
    let text = match map.remove(&cfg.text_field) {
        Some(Value::String(s)) => s,
        _ => {
            return Err(Error::MissingField {
                path: path.to_path_buf(),
                line: line_no,
                field: cfg.text_field.clone(),
            })
        }
    };
    let id = match map.remove(&cfg.id_field) {
        Some(Value::String(s)) => s,
        Some(Value::Number(n)) => n.to_string(),
        _ => format!("{}:{line_no}", stem(path)),
    };
    Ok(Document {
        id,
        text,
        meta: map,
        lang: None,
        lang_score: 0.0,
    })
}

fn open_decompressed(
    path: &Path,
    comp: Compression,
) -> Result<(Box<dyn BufRead + Send>, SharedDigest)> {
    let file = fs_err::File::open(path)?;
    let digest = std::sync::Arc::new(std::sync::Mutex::new(FileDigest::default()));
    let hashing = DigestOnDrop {
        inner: HashingReader::new(file),
        out: digest.clone(),
    };
    let raw = BufReader::with_capacity(1 << 20, hashing);
    let r: Box<dyn BufRead + Send> = match comp {
        Compression::None => Box::new(raw),
        Compression::Gzip => Box::new(BufReader::with_capacity(
            1 << 20,
            flate2::bufread::MultiGzDecoder::new(raw),
        )),
        Compression::Zstd => Box::new(BufReader::with_capacity(
            1 << 20,
            zstd::stream::read::Decoder::with_buffer(raw).map_err(Error::Io)?,
        )),
    };
    Ok((r, digest))
}

/// The digest a reader publishes when it reaches the end of its file.
type SharedDigest = std::sync::Arc<std::sync::Mutex<FileDigest>>;

/// Publishes the digest of everything read when the reader reaches its end.
struct DigestOnDrop<R> {
    inner: HashingReader<R>,
    out: SharedDigest,
}

impl<R: Read> Read for DigestOnDrop<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            if let Ok(mut d) = self.out.lock() {
                d.sha256 = hex(&self.inner.hasher.clone().finalize());
                d.bytes = self.inner.bytes;
            }
        }
        Ok(n)
    }
}

/// A streaming reader over one input file.
pub struct InputReader {
    path: PathBuf,
    kind: ReaderKind,
    cfg: ReaderConfig,
    digest: Option<SharedDigest>,
    line: u64,
}

enum ReaderKind {
    Lines(Box<dyn BufRead + Send>),
    Text(Option<Box<dyn BufRead + Send>>),
    Parquet(Box<dyn Iterator<Item = Result<Document>> + Send>),
}

impl InputReader {
    /// Opens `path` (format from its name).
    pub fn open(path: &Path, cfg: &ReaderConfig) -> Result<InputReader> {
        let (fmt, comp) = detect(path).ok_or_else(|| Error::BadInput {
            path: path.to_path_buf(),
            reason: "unknown format".into(),
        })?;
        let (kind, digest) = match fmt {
            Format::Jsonl => {
                let (r, d) = open_decompressed(path, comp)?;
                (ReaderKind::Lines(r), Some(d))
            }
            Format::Text => {
                let (r, d) = open_decompressed(path, comp)?;
                (ReaderKind::Text(Some(r)), Some(d))
            }
            Format::Parquet => (ReaderKind::Parquet(parquet_rows(path, cfg)?), None),
        };
        Ok(InputReader {
            path: path.to_path_buf(),
            kind,
            cfg: cfg.clone(),
            digest,
            line: 0,
        })
    }

    /// The SHA-256 and size of the file, complete once the reader is exhausted.
    pub fn digest(&self) -> Result<FileDigest> {
        match &self.digest {
            Some(d) => Ok(d.lock().map(|d| d.clone()).unwrap_or_default()),
            None => sha256_file(&self.path),
        }
    }

    fn unreadable(&self, e: Error) -> Result<Record> {
        match self.cfg.on_error {
            OnError::Stop => Err(e),
            OnError::Skip => Ok(Record::Unreadable(e)),
        }
    }
}

impl Iterator for InputReader {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.kind {
            ReaderKind::Lines(r) => loop {
                let mut buf = Vec::new();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) => return None,
                    Ok(_) => {
                        self.line += 1;
                        while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                            buf.pop();
                        }
                        if buf.iter().all(u8::is_ascii_whitespace) {
                            continue;
                        }
                        return Some(Ok(Record::JsonLine(self.line, buf)));
                    }
                    Err(e) => return Some(Err(Error::Io(e))),
                }
            },
            ReaderKind::Text(slot) => {
                let mut r = slot.take()?;
                let mut bytes = Vec::new();
                if let Err(e) = r.read_to_end(&mut bytes) {
                    return Some(Err(Error::Io(e)));
                }
                // drain so the digest is published
                let _ = r.fill_buf();
                drop(r);
                match String::from_utf8(bytes) {
                    Ok(text) => {
                        let id = self.path.to_string_lossy().to_string();
                        Some(Ok(Record::Doc(Document::new(id, text))))
                    }
                    Err(e) => {
                        let err = Error::InvalidUtf8 {
                            path: self.path.clone(),
                            line: 1,
                            offset: e.utf8_error().valid_up_to(),
                        };
                        Some(self.unreadable(err))
                    }
                }
            }
            ReaderKind::Parquet(it) => {
                let item = it.next()?;
                Some(match item {
                    Ok(doc) => Ok(Record::Doc(doc)),
                    Err(e @ Error::MissingField { .. }) => self.unreadable(e),
                    Err(e) => Err(e),
                })
            }
        }
    }
}

fn parquet_rows(
    path: &Path,
    cfg: &ReaderConfig,
) -> Result<Box<dyn Iterator<Item = Result<Document>> + Send>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    let perr = |e: parquet::errors::ParquetError| Error::Parquet {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let file = fs_err::File::open(path)?.into_parts().0;
    let reader = SerializedFileReader::new(file).map_err(perr)?;
    let schema = reader.metadata().file_metadata().schema_descr();
    if !schema.columns().iter().any(|c| c.name() == cfg.text_field) {
        return Err(Error::MissingField {
            path: path.to_path_buf(),
            line: 0,
            field: cfg.text_field.clone(),
        });
    }
    let rows = reader.into_iter();
    let path = path.to_path_buf();
    let cfg = cfg.clone();
    let stem = stem(&path);
    let mut row_no = 0u64;
    Ok(Box::new(rows.map(move |row| {
        row_no += 1;
        let row = row.map_err(|e| Error::Parquet {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let mut text = None;
        let mut id = None;
        let mut meta = serde_json::Map::new();
        for (name, field) in row.get_column_iter() {
            if *name == cfg.text_field {
                if let Field::Str(s) = field {
                    text = Some(s.clone());
                }
            } else if *name == cfg.id_field {
                id = Some(match field {
                    Field::Str(s) => s.clone(),
                    other => other.to_string(),
                });
            } else {
                meta.insert(name.clone(), field.to_json_value());
            }
        }
        let text = text.ok_or_else(|| Error::MissingField {
            path: path.clone(),
            line: row_no,
            field: cfg.text_field.clone(),
        })?;
        Ok(Document {
            id: id.unwrap_or_else(|| format!("{stem}:{row_no}")),
            text,
            meta,
            lang: None,
            lang_score: 0.0,
        })
    })))
}
