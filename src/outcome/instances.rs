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
//! one chunk of [`CHUNK`] outcomes, whatever the file's size.

use std::io::{BufRead, Read};

use serde::Deserialize;
use thiserror::Error;

use crate::index::{InstanceOutcome, KeyParts};
use crate::jobs::Job;

/// Outcomes handed to the index in one call.
pub(crate) const CHUNK: usize = 500;

/// Longest line read. A documented line is a few hundred bytes (a warning line grows with its
/// warnings); one longer than this is not a result line, and is skipped and counted.
pub(crate) const MAX_LINE: usize = 256 * 1024;

/// Read buffer of the line reader.
const READ_BUFFER: usize = 16 * 1024;

/// The three per-file result files of an import, in the order they are read: a file listed in
/// both success and warning files ends with its warnings, and a failure is recorded last.
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
    /// Documented as `false` when the file went to a non-primary image set; a line without it
    /// (written before HealthImaging had non-primary image sets) is primary.
    is_primary: Option<bool>,
    #[serde(default)]
    warnings: Vec<WarningDoc>,
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
        let mut out = self.kind.clone().unwrap_or_else(|| "warning".into());
        match &self.warning_reason_code {
            Some(serde_json::Value::Number(n)) => out.push_str(&format!(" ({n})")),
            Some(serde_json::Value::String(s)) if !s.is_empty() => out.push_str(&format!(" ({s})")),
            _ => {}
        }
        if let Some(m) = self.message.as_deref().filter(|m| !m.is_empty()) {
            out.push_str(": ");
            out.push_str(m);
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
    /// `s3://{bucket}/{store prefix}{jobId}/`.
    uri: String,
    job_id: String,
}

impl InputPrefix {
    /// The prefix of `job`'s import: its `inputS3Uri`, which the S3 store builds as
    /// `s3://{bucket}/{prefix}{jobId}/` (`S3Store::input_s3_uri`).
    pub(crate) fn of(job: &Job) -> Result<InputPrefix, String> {
        let uri = &job.input_s3_uri;
        if !uri.starts_with("s3://") || !uri.ends_with(&format!("/{}/", job.job_id)) {
            return Err(format!(
                "inputS3Uri {uri} is not an s3:// prefix ending in the job id"
            ));
        }
        Ok(InputPrefix {
            uri: uri.clone(),
            job_id: job.job_id.clone(),
        })
    }

    /// The object key (`{jobId}/{study}/{series}/{sop}.dcm`, relative to the store's prefix as
    /// index records have it) of an `inputFile` URI under this prefix.
    pub(crate) fn key_of(&self, input_file: &str) -> Option<String> {
        let rest = input_file.strip_prefix(&self.uri)?;
        let key = format!("{}/{rest}", self.job_id);
        KeyParts::parse(&key)?;
        Some(key)
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
    let imported = |doc: LineDoc| -> Result<(String, bool, Vec<WarningDoc>), LineError> {
        let response = doc
            .import_response
            .ok_or_else(|| LineError::Malformed("no importResponse".into()))?;
        let id = response
            .image_set_id
            .filter(|id| !id.is_empty())
            .ok_or_else(|| LineError::Malformed("no importResponse.imageSetId".into()))?;
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
                warnings: warnings.iter().map(WarningDoc::describe).collect(),
            }
        }
        ResultFile::Failure => {
            let exception = doc
                .exception
                .ok_or_else(|| LineError::Malformed("no exception".into()))?;
            InstanceOutcome::Failed {
                exception_type: exception
                    .exception_type
                    .filter(|t| !t.is_empty())
                    .unwrap_or_else(|| "UnknownException".into()),
                message: exception.message.unwrap_or_default(),
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

/// Reads result file `file` from `reader` line by line, handing its outcomes to `sink` in chunks
/// of at most [`CHUNK`]; `sink` returns `false` to stop. Memory: a read buffer, one line (a line
/// longer than [`MAX_LINE`] is skipped as it streams by, and counted malformed) and one chunk.
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
                Ok(outcome) => {
                    tally.outcomes += 1;
                    chunk.push(outcome);
                    if chunk.len() == CHUNK
                        && !sink(std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK)))
                    {
                        return Err(ReadError::Stopped(file.name()));
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
