//! Per-instance outcomes: the lines of an import's `SUCCESS/success.ndjson`,
//! `WARNING/warning.ndjson` and `FAILURE/failure.ndjson`, turned into an [`InstanceOutcome`] for
//! the object key of each file the import read.
//!
//! HealthImaging writes one JSON object per line ("Understanding import jobs",
//! https://docs.aws.amazon.com/healthimaging/latest/devguide/understanding-import-jobs.html;
//! docs/aws-facts.md §1 and §12):
//!
//! - success: `{"inputFile": …, "importResponse": {"imageSetId": …, "isPrimary": …}}`;
//! - warning: the same, with `"warnings": [{"warning_reason_code": 45330, "type": …, "message": …}]`
//!   in `importResponse` (the codes: "HealthImaging Warning Codes",
//!   https://docs.aws.amazon.com/healthimaging/latest/devguide/reference-warning-codes.html);
//! - failure: `{"inputFile": …, "exception": {"exceptionType": …, "message": …}}`.
//!
//! Other fields are ignored. Whether HealthImaging writes an empty file or none when there is
//! nothing to report is not documented: both read as no lines.
//!
//! A file is read line by line in blocking code ([`read_results`], run in `spawn_blocking` over a
//! [`super::ResultStream`]): memory holds a read buffer, one line (at most [`MAX_LINE`] bytes) and
//! one chunk of at most [`CHUNK`] outcomes and about [`CHUNK_BYTES`] bytes, whatever the file's
//! size. What one outcome keeps is bounded too: at most [`MAX_WARNINGS`] warnings (the rest are
//! skipped as they stream by, and counted in a last entry), each text at most [`MAX_TEXT`] bytes.

use std::io::{BufRead, Read};

use serde::Deserialize;
use thiserror::Error;

use crate::index::{InstanceOutcome, KeyParts};
use crate::jobs::Job;

/// Most outcomes handed to the index in one call.
pub(crate) const CHUNK: usize = 500;

/// A chunk is handed over once the outcomes it holds reach this many bytes (keys and texts), even
/// if it has fewer than [`CHUNK`]: 500 outcomes of long warnings would otherwise be megabytes.
pub(crate) const CHUNK_BYTES: usize = 1024 * 1024;

/// Most warnings kept per instance; a last entry says how many more there were.
pub(crate) const MAX_WARNINGS: usize = 10;

/// Longest warning, exception type or message kept (in bytes, cut on a character boundary).
pub(crate) const MAX_TEXT: usize = 1024;

/// Longest image set id accepted: HealthImaging's are 32 hexadecimal digits; a longer one is not
/// an id, and the line is malformed.
const MAX_IMAGE_SET_ID: usize = 256;

/// Longest line read. A documented line is a few hundred bytes (a warning line grows with its
/// warnings); one longer than this is not a result line, and is skipped and counted.
pub(crate) const MAX_LINE: usize = 256 * 1024;

/// Read buffer of the line reader.
const READ_BUFFER: usize = 16 * 1024;

/// The three per-file result files of an import, in the order they are read. A file listed in
/// both the success and the warning file ends with its warnings whatever the order (the index
/// never replaces IMPORTED_WITH_WARNINGS by IMPORTED of the same image set,
/// [`InstanceOutcome::replaces`]); a failure is recorded last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResultFile {
    Success,
    Warning,
    Failure,
}

impl ResultFile {
    pub(crate) const ALL: [ResultFile; 3] = [
        ResultFile::Success,
        ResultFile::Warning,
        ResultFile::Failure,
    ];

    /// Its path in the import's output folder.
    pub(crate) fn name(self) -> &'static str {
        match self {
            ResultFile::Success => "SUCCESS/success.ndjson",
            ResultFile::Warning => "WARNING/warning.ndjson",
            ResultFile::Failure => "FAILURE/failure.ndjson",
        }
    }
}

/// One result line, as far as the gateway reads it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LineDoc {
    input_file: String,
    import_response: Option<ImportResponseDoc>,
    exception: Option<ExceptionDoc>,
}

/// `importResponse` of a success or warning line.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImportResponseDoc {
    image_set_id: Option<String>,
    /// Documented as `false` when the file went to a non-primary image set ("Understanding import
    /// jobs"): imported data that conflicts with a primary image set already in the data store is
    /// kept as non-primary ("Understanding image sets",
    /// https://docs.aws.amazon.com/healthimaging/latest/devguide/understanding-image-sets.html).
    /// What a line without `isPrimary` means is not documented (docs/aws-facts.md, "What could not
    /// be confirmed"): the gateway records it as primary, the only kind of image set there is
    /// without a conflict.
    is_primary: Option<bool>,
    #[serde(default)]
    warnings: CappedWarnings,
}

/// `warnings`, read entry by entry: the first [`MAX_WARNINGS`] kept, the others skipped without
/// being held (a line of [`MAX_LINE`] bytes can list tens of thousands) and counted.
#[derive(Default)]
struct CappedWarnings {
    kept: Vec<WarningDoc>,
    more: usize,
}

impl<'de> Deserialize<'de> for CappedWarnings {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// Visits the array without collecting it.
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = CappedWarnings;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of warnings")
            }
            fn visit_unit<E>(self) -> Result<CappedWarnings, E> {
                Ok(CappedWarnings::default())
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<CappedWarnings, A::Error> {
                let mut out = CappedWarnings::default();
                loop {
                    if out.kept.len() < MAX_WARNINGS {
                        match seq.next_element::<WarningDoc>()? {
                            Some(w) => out.kept.push(w),
                            None => break,
                        }
                    } else if seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                        out.more += 1;
                    } else {
                        break;
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_any(Entries)
    }
}

impl CappedWarnings {
    /// Each kept warning as `type (code): message` (at most [`MAX_TEXT`] bytes), and a last entry
    /// saying how many more there were.
    fn describe(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .kept
            .iter()
            .map(|w| clip(w.describe(), MAX_TEXT))
            .collect();
        if self.more > 0 {
            out.push(format!("… and {} more warnings", self.more));
        }
        out
    }
}

/// `text` cut to at most `max` bytes on a character boundary, `…` marking the cut.
pub(crate) fn clip(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// One entry of `warnings`.
#[derive(Deserialize)]
struct WarningDoc {
    #[serde(alias = "warningReasonCode")]
    warning_reason_code: Option<serde_json::Value>,
    #[serde(rename = "type")]
    kind: Option<String>,
    message: Option<String>,
}

impl WarningDoc {
    /// `type (code): message`, leaving out what is missing.
    fn describe(&self) -> String {
        let mut out = self
            .kind
            .as_deref()
            .map(|k| clip(k.to_string(), MAX_TEXT))
            .unwrap_or_else(|| "warning".into());
        match &self.warning_reason_code {
            Some(serde_json::Value::Number(n)) => out.push_str(&format!(" ({n})")),
            Some(serde_json::Value::String(s)) if !s.is_empty() => out.push_str(&format!(" ({s})")),
            _ => {}
        }
        if let Some(m) = self.message.as_deref().filter(|m| !m.is_empty()) {
            out.push_str(": ");
            // Only what the clip of the whole keeps is copied, and a few bytes more (a character
            // is at most 4) so that the clip sees the text was longer.
            let room = (MAX_TEXT + 4).saturating_sub(out.len()).min(m.len());
            let mut end = room;
            while !m.is_char_boundary(end) {
                end -= 1;
            }
            out.push_str(&m[..end]);
        }
        out
    }
}

/// `exception` of a failure line.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExceptionDoc {
    exception_type: Option<String>,
    message: Option<String>,
}

/// Why a line gave no outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LineError {
    /// Not JSON, or not a result line of this file (e.g. a success line without an image set).
    Malformed(String),
    /// Its `inputFile` is not an object of this job's input prefix in the store's key layout.
    Foreign,
}

/// Where a job's objects are, to turn an `inputFile` back into the object key the index knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InputPrefix {
    bucket: String,
    /// `{store prefix}{jobId}/`: the job's objects' keys in `bucket` start with it.
    key_prefix: String,
    job_id: String,
}

/// Why a job's `inputS3Uri` does not say where its objects are.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub(crate) enum InputPrefixError {
    #[error("inputS3Uri {uri} is not an s3:// prefix ending in the job id")]
    NotAJobPrefix { uri: String },
}

/// Where an `inputFile` points, as far as [`InputPrefix::key_of`] cares.
enum Located<'a> {
    /// A key in the job's bucket.
    InBucket(&'a str),
    /// A path without scheme or host.
    Relative(&'a str),
    /// Another bucket, or not S3.
    Elsewhere,
}

impl InputPrefix {
    /// The prefix of `job`'s import: its `inputS3Uri`, which the S3 store builds as
    /// `s3://{bucket}/{prefix}{jobId}/` (`S3Store::input_s3_uri`).
    pub(crate) fn of(job: &Job) -> Result<InputPrefix, InputPrefixError> {
        let uri = &job.input_s3_uri;
        let not_ours = || InputPrefixError::NotAJobPrefix { uri: uri.clone() };
        let (bucket, key_prefix) = uri
            .strip_prefix("s3://")
            .and_then(|rest| rest.split_once('/'))
            .ok_or_else(not_ours)?;
        let job_dir = format!("{}/", job.job_id);
        if bucket.is_empty()
            || !(key_prefix == job_dir || key_prefix.ends_with(&format!("/{job_dir}")))
        {
            return Err(not_ours());
        }
        Ok(InputPrefix {
            bucket: bucket.to_string(),
            key_prefix: key_prefix.to_string(),
            job_id: job.job_id.clone(),
        })
    }

    /// The object key (`{jobId}/{study}/{series}/{sop}.dcm`, relative to the store's prefix as
    /// index records have it) of an `inputFile` of this job's import. The documented form is the
    /// object's `s3://{bucket}/{key}` URI; since whether HealthImaging always writes that is not
    /// confirmed (docs/aws-facts.md), these name the same object too: its `https://` URL,
    /// virtual-hosted (`https://{bucket}.s3.{region}.amazonaws.com/{key}`) or path-style
    /// (`https://s3.{region}.amazonaws.com/{bucket}/{key}`) ("Virtual hosting of general purpose
    /// buckets", https://docs.aws.amazon.com/AmazonS3/latest/userguide/VirtualHosting.html), and
    /// a path without scheme relative to the bucket, to the store's prefix or to the job's input
    /// prefix. Anything else, or an object of another bucket, job or layout, is `None`.
    pub(crate) fn key_of(&self, input_file: &str) -> Option<String> {
        let rest = match self.locate(input_file) {
            Located::InBucket(key) => key.strip_prefix(self.key_prefix.as_str())?,
            Located::Relative(path) => {
                let path = path.strip_prefix('/').unwrap_or(path);
                path.strip_prefix(self.key_prefix.as_str())
                    .or_else(|| {
                        path.strip_prefix(self.job_id.as_str())
                            .and_then(|p| p.strip_prefix('/'))
                    })
                    .unwrap_or(path)
            }
            Located::Elsewhere => return None,
        };
        let key = format!("{}/{rest}", self.job_id);
        KeyParts::parse(&key)?;
        Some(key)
    }

    fn locate<'a>(&self, input_file: &'a str) -> Located<'a> {
        let in_bucket = |bucket: &str, key: &'a str| {
            if bucket == self.bucket {
                Located::InBucket(key)
            } else {
                Located::Elsewhere
            }
        };
        if let Some(rest) = input_file.strip_prefix("s3://") {
            let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
            return in_bucket(bucket, key);
        }
        if let Some(rest) = input_file.strip_prefix("https://") {
            let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
            let aws = host.ends_with(".amazonaws.com") || host.ends_with(".amazonaws.com.cn");
            if !aws {
                return Located::Elsewhere;
            }
            // Path-style: the host is the endpoint (`s3.{region}…`, legacy `s3-{region}…`).
            if host.starts_with("s3.") || host.starts_with("s3-") {
                let (bucket, key) = path.split_once('/').unwrap_or((path, ""));
                return in_bucket(bucket, key);
            }
            // Virtual-hosted: the bucket, then the endpoint.
            return match host.strip_prefix(self.bucket.as_str()) {
                Some(endpoint) if endpoint.starts_with(".s3.") || endpoint.starts_with(".s3-") => {
                    Located::InBucket(path)
                }
                _ => Located::Elsewhere,
            };
        }
        if input_file.contains("://") {
            return Located::Elsewhere;
        }
        Located::Relative(input_file)
    }
}

/// The object key and outcome one line of `file` gives.
pub(crate) fn parse_line(
    file: ResultFile,
    line: &[u8],
    prefix: &InputPrefix,
) -> Result<(String, InstanceOutcome), LineError> {
    let doc: LineDoc =
        serde_json::from_slice(line).map_err(|e| LineError::Malformed(e.to_string()))?;
    let key = prefix.key_of(&doc.input_file).ok_or(LineError::Foreign)?;
    let imported = |doc: LineDoc| -> Result<(String, bool, CappedWarnings), LineError> {
        let response = doc
            .import_response
            .ok_or_else(|| LineError::Malformed("no importResponse".into()))?;
        let id = response
            .image_set_id
            .filter(|id| !id.is_empty())
            .ok_or_else(|| LineError::Malformed("no importResponse.imageSetId".into()))?;
        if id.len() > MAX_IMAGE_SET_ID {
            return Err(LineError::Malformed(format!(
                "an importResponse.imageSetId of {} bytes",
                id.len()
            )));
        }
        Ok((id, response.is_primary.unwrap_or(true), response.warnings))
    };
    let outcome = match file {
        ResultFile::Success => {
            let (image_set_id, is_primary, _) = imported(doc)?;
            InstanceOutcome::Imported {
                image_set_id,
                is_primary,
            }
        }
        ResultFile::Warning => {
            let (image_set_id, is_primary, warnings) = imported(doc)?;
            InstanceOutcome::ImportedWithWarnings {
                image_set_id,
                is_primary,
                warnings: warnings.describe(),
            }
        }
        ResultFile::Failure => {
            let exception = doc
                .exception
                .ok_or_else(|| LineError::Malformed("no exception".into()))?;
            InstanceOutcome::Failed {
                exception_type: clip(
                    exception
                        .exception_type
                        .filter(|t| !t.is_empty())
                        .unwrap_or_else(|| "UnknownException".into()),
                    MAX_TEXT,
                ),
                message: clip(exception.message.unwrap_or_default(), MAX_TEXT),
            }
        }
    };
    Ok((key, outcome))
}

/// What reading one result file gave.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct FileTally {
    /// Non-empty lines.
    pub lines: u64,
    /// Lines turned into an outcome for an object of the job (handed to the index).
    pub outcomes: u64,
    /// Lines naming an object outside the job's input prefix or key layout.
    pub foreign: u64,
    /// Lines that are not result lines of this file (not JSON, missing fields, too long).
    pub malformed: u64,
    /// The first malformed line's number (1-based), for the log.
    pub first_malformed: Option<u64>,
}

/// Why a result file could not be read to its end.
#[derive(Debug, Error)]
pub(crate) enum ReadError {
    /// The stream broke (S3, network): reading again may work.
    #[error("reading {file} failed at line {line}: {message}")]
    Io {
        file: &'static str,
        line: u64,
        message: String,
    },
    /// Whoever takes the chunks stopped (the claim was lost, or the index failed).
    #[error("reading {0} was stopped")]
    Stopped(&'static str),
}

/// About how many bytes an outcome of `key` holds: its strings (what grows with the file).
pub(crate) fn outcome_bytes(key: &str, outcome: &InstanceOutcome) -> usize {
    key.len()
        + match outcome {
            InstanceOutcome::Stored => 0,
            InstanceOutcome::Imported { image_set_id, .. } => image_set_id.len(),
            InstanceOutcome::ImportedWithWarnings {
                image_set_id,
                warnings,
                ..
            } => image_set_id.len() + warnings.iter().map(|w| w.len() + 24).sum::<usize>(),
            InstanceOutcome::Failed {
                exception_type,
                message,
            } => exception_type.len() + message.len(),
        }
}

/// Reads result file `file` from `reader` line by line, handing its outcomes to `sink` in chunks
/// of at most [`CHUNK`] outcomes, a chunk handed over early once it holds [`CHUNK_BYTES`] bytes;
/// `sink` returns `false` to stop. Memory: a read buffer, one line (a line longer than
/// [`MAX_LINE`] is skipped as it streams by, and counted malformed) and one chunk.
/// Blocking: run it in `spawn_blocking` over a [`super::ResultStream`].
pub(crate) fn read_results(
    reader: impl Read,
    file: ResultFile,
    prefix: &InputPrefix,
    mut sink: impl FnMut(Vec<(String, InstanceOutcome)>) -> bool,
) -> Result<FileTally, ReadError> {
    let mut reader = std::io::BufReader::with_capacity(READ_BUFFER, reader);
    let mut tally = FileTally::default();
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut chunk_bytes = 0;
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        let (ended, too_long) = read_line(&mut reader, &mut line).map_err(|e| ReadError::Io {
            file: file.name(),
            line: number + 1,
            message: e.to_string(),
        })?;
        if ended && line.is_empty() && !too_long {
            break;
        }
        number += 1;
        let text = line.trim_ascii();
        if too_long || !text.is_empty() {
            tally.lines += 1;
            let parsed = if too_long {
                Err(LineError::Malformed(format!(
                    "longer than {MAX_LINE} bytes"
                )))
            } else {
                parse_line(file, text, prefix)
            };
            match parsed {
                Ok((key, outcome)) => {
                    tally.outcomes += 1;
                    chunk_bytes += outcome_bytes(&key, &outcome);
                    chunk.push((key, outcome));
                    if chunk.len() == CHUNK || chunk_bytes >= CHUNK_BYTES {
                        chunk_bytes = 0;
                        if !sink(std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK))) {
                            return Err(ReadError::Stopped(file.name()));
                        }
                    }
                }
                Err(LineError::Foreign) => tally.foreign += 1,
                Err(LineError::Malformed(_)) => {
                    tally.malformed += 1;
                    tally.first_malformed.get_or_insert(number);
                }
            }
        }
        line.clear();
        if ended {
            break;
        }
    }
    if !chunk.is_empty() && !sink(chunk) {
        return Err(ReadError::Stopped(file.name()));
    }
    Ok(tally)
}

/// Reads one line into `line` (without its `\n`), keeping at most [`MAX_LINE`] bytes: the rest of
/// a longer line is consumed without being kept. Returns (end of input reached, line too long).
fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>) -> std::io::Result<(bool, bool)> {
    let mut too_long = false;
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok((true, too_long));
        }
        let (part, found, used) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], true, i + 1),
            None => (buf, false, buf.len()),
        };
        if !too_long {
            if line.len() + part.len() > MAX_LINE {
                too_long = true;
                line.clear();
                line.shrink_to(0);
            } else {
                line.extend_from_slice(part);
            }
        }
        reader.consume(used);
        if found {
            return Ok((false, too_long));
        }
    }
}

#[cfg(test)]
pub(super) mod tests;
