//! The run directory's files: where each part lives, compressed JSONL written and read back,
//! output entries for the manifest, and stale outputs of earlier runs removed.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::manifest::OutputEntry;
use crate::read::sha256_file;

/// The work directory of input file `i`.
pub(super) fn part_dir(out: &Path, i: usize) -> PathBuf {
    out.join("work").join("parts").join(format!("{i:05}"))
}

pub(super) fn zst_writer(
    path: &Path,
) -> Result<zstd::stream::AutoFinishEncoder<'static, BufWriter<fs_err::File>>> {
    let w = BufWriter::with_capacity(1 << 20, fs_err::File::create(path)?);
    Ok(zstd::stream::Encoder::new(w, 3)?.auto_finish())
}

pub(super) fn write_json_line(w: &mut impl Write, v: &Value) -> Result<()> {
    serde_json::to_writer(&mut *w, v)?;
    w.write_all(b"\n")?;
    Ok(())
}

/// Reads a `.jsonl.zst` file written by the pipeline.
pub fn read_zst_jsonl(path: &Path) -> Result<impl Iterator<Item = Result<Value>>> {
    let file = fs_err::File::open(path)?;
    let r = BufReader::with_capacity(1 << 20, zstd::stream::read::Decoder::new(file)?);
    let path = path.to_path_buf();
    Ok(r.lines().enumerate().map(move |(i, line)| {
        let line = line?;
        serde_json::from_str(&line).map_err(|e| Error::MalformedJson {
            path: path.clone(),
            line: i as u64 + 1,
            reason: e.to_string(),
        })
    }))
}

pub(super) fn output_entry(out: &Path, path: &Path) -> Result<OutputEntry> {
    let d = sha256_file(path)?;
    Ok(OutputEntry {
        path: path.strip_prefix(out).unwrap_or(path).display().to_string(),
        bytes: d.bytes,
        sha256: d.sha256,
    })
}

pub(super) fn part_number(digits: &str) -> usize {
    digits.parse().unwrap_or(usize::MAX)
}

/// Removes the files of `dir` whose names `stale` accepts.
pub(super) fn remove_stale(dir: &Path, stale: impl Fn(&str) -> bool) -> Result<()> {
    for entry in fs_err::read_dir(dir)? {
        let path = entry?.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(&stale)
        {
            fs_err::remove_file(path)?;
        }
    }
    Ok(())
}

/// The texts of the kept files, streamed (unreadable lines are skipped: the pipeline wrote them).
pub(super) fn kept_texts(files: &[PathBuf]) -> impl Iterator<Item = String> + Send + '_ {
    files.iter().flat_map(|f| {
        let it: Box<dyn Iterator<Item = String> + Send> = match read_zst_jsonl(f) {
            Ok(it) => Box::new(
                it.filter_map(|r| r.ok())
                    .filter_map(|v| v.get("text").and_then(Value::as_str).map(str::to_string)),
            ),
            Err(_) => Box::new(std::iter::empty()),
        };
        it
    })
}
