use super::*;
use crate::outcome::tests::heap;

const JOB: &str = "01JD6Y7Z8X9W0V1T2S3R4Q5P6N";

fn job(input: &str) -> Job {
    Job::opened(JOB, "2026-11-23T10:00:00.000Z", input, "gw-a")
}

fn prefix() -> InputPrefix {
    InputPrefix::of(&job(&format!("s3://b/import/{JOB}/"))).unwrap()
}

fn key(sop: &str) -> String {
    format!("{JOB}/1.2/1.2.3/{sop}.dcm")
}

fn uri(sop: &str) -> String {
    format!("s3://b/import/{}", key(sop))
}

#[test]
fn a_success_line_gives_the_image_set_and_whether_it_is_primary() {
    let line = format!(
        r#"{{"inputFile":"{}","importResponse":{{"imageSetId":"0a1b","imageSetVersion":1,"isPrimary":false,"somethingNew":[1]}},"other":{{}}}}"#,
        uri("1.2.3.1")
    );
    assert_eq!(
        parse_line(ResultFile::Success, line.as_bytes(), &prefix()),
        Ok((
            key("1.2.3.1"),
            InstanceOutcome::Imported {
                image_set_id: "0a1b".into(),
                is_primary: false
            }
        ))
    );
    let without_primary = format!(
        r#"{{"inputFile":"{}","importResponse":{{"imageSetId":"0a1b"}}}}"#,
        uri("1.2.3.1")
    );
    assert_eq!(
        parse_line(ResultFile::Success, without_primary.as_bytes(), &prefix())
            .unwrap()
            .1,
        InstanceOutcome::Imported {
            image_set_id: "0a1b".into(),
            is_primary: true
        },
        "a line from before non-primary image sets is primary"
    );
}

#[test]
fn a_warning_line_gives_each_warning_as_type_code_and_message() {
    // As "Understanding import jobs" shows it, plus a code given as a string and a bare warning.
    let line = format!(
        r#"{{"inputFile":"{}","importResponse":{{"imageSetId":"0a1b","imageSetVersion":1,"isPrimary":true,"warnings":[{{"warning_reason_code":45330,"type":"InvalidOffsetTable","message":"Basic offset table is invalid"}},{{"warningReasonCode":"45312","type":"TRANSCODING_EXCEPTION"}},{{"extra":true}}]}}}}"#,
        uri("1.2.3.2")
    );
    assert_eq!(
        parse_line(ResultFile::Warning, line.as_bytes(), &prefix()),
        Ok((
            key("1.2.3.2"),
            InstanceOutcome::ImportedWithWarnings {
                image_set_id: "0a1b".into(),
                is_primary: true,
                warnings: vec![
                    "InvalidOffsetTable (45330): Basic offset table is invalid".into(),
                    "TRANSCODING_EXCEPTION (45312)".into(),
                    "warning".into(),
                ],
            }
        ))
    );
}

#[test]
fn a_failure_line_gives_the_exception_type_and_message() {
    let line = format!(
        r#"{{"inputFile":"{}","exception":{{"exceptionType":"ValidationException","message":"Transfer syntax not supported","detail":1}}}}"#,
        uri("1.2.3.3")
    );
    assert_eq!(
        parse_line(ResultFile::Failure, line.as_bytes(), &prefix()),
        Ok((
            key("1.2.3.3"),
            InstanceOutcome::Failed {
                exception_type: "ValidationException".into(),
                message: "Transfer syntax not supported".into()
            }
        ))
    );
    let bare = format!(r#"{{"inputFile":"{}","exception":{{}}}}"#, uri("1.2.3.3"));
    assert_eq!(
        parse_line(ResultFile::Failure, bare.as_bytes(), &prefix())
            .unwrap()
            .1,
        InstanceOutcome::Failed {
            exception_type: "UnknownException".into(),
            message: String::new()
        }
    );
}

#[test]
fn lines_that_are_not_result_lines_of_their_file_are_malformed() {
    let success_without_response = format!(r#"{{"inputFile":"{}"}}"#, uri("1.2.3.1"));
    let failure_without_exception = format!(
        r#"{{"inputFile":"{}","importResponse":{{"imageSetId":"0a1b"}}}}"#,
        uri("1.2.3.1")
    );
    let empty_image_set = format!(
        r#"{{"inputFile":"{}","importResponse":{{"imageSetId":""}}}}"#,
        uri("1.2.3.1")
    );
    for (file, line) in [
        (ResultFile::Success, "not json".to_string()),
        (ResultFile::Success, r#"{"importResponse":{}}"#.to_string()),
        (ResultFile::Success, success_without_response),
        (ResultFile::Warning, empty_image_set),
        (ResultFile::Failure, failure_without_exception),
    ] {
        assert!(
            matches!(
                parse_line(file, line.as_bytes(), &prefix()),
                Err(LineError::Malformed(_))
            ),
            "{file:?} {line}"
        );
    }
}

#[test]
fn an_input_file_maps_to_its_object_key_with_or_without_a_store_prefix() {
    let with = InputPrefix::of(&job(&format!("s3://b/dicom/in/{JOB}/"))).unwrap();
    let without = InputPrefix::of(&job(&format!("s3://b/{JOB}/"))).unwrap();
    let rest = "1.2/1.2.3/1.2.3.4.dcm";
    assert_eq!(
        with.key_of(&format!("s3://b/dicom/in/{JOB}/{rest}")),
        Some(format!("{JOB}/{rest}"))
    );
    assert_eq!(
        without.key_of(&format!("s3://b/{JOB}/{rest}")),
        Some(format!("{JOB}/{rest}"))
    );
    for foreign in [
        format!("s3://b/{JOB}/{rest}"), // without the store prefix
        format!("s3://other/dicom/in/{JOB}/{rest}"), // another bucket
        format!("s3://b/dicom/in/01JD6Y7Z8X9W0V1T2S3R4Q5P6M/{rest}"), // another job
        format!("s3://b/dicom/in/{JOB}/1.2/1.2.3/x/1.2.3.4.dcm"), // deeper
        format!("s3://b/dicom/in/{JOB}/1.2/1.2.3/1.2.3.4.json"), // not an object of ours
        format!("s3://b/dicom/in/{JOB}/1.2/1.2.3.4.dcm"), // shallower
        format!("dicom/in/{JOB}/{rest}"), // not a URI
    ] {
        assert_eq!(with.key_of(&foreign), None, "{foreign}");
    }
    let line = format!(
        r#"{{"inputFile":"s3://b/other/{JOB}/{rest}","importResponse":{{"imageSetId":"a"}}}}"#
    );
    assert_eq!(
        parse_line(ResultFile::Success, line.as_bytes(), &with),
        Err(LineError::Foreign)
    );
    assert!(InputPrefix::of(&job(&format!("/data/store/{JOB}/"))).is_err());
    assert!(InputPrefix::of(&job("s3://b/import/someone-else/")).is_err());
}

/// `n` lines of `file` for objects `{input}1.2/{series}/{series}.{i}.dcm` (every tenth one of
/// another job instead).
pub(crate) fn result_lines(file: ResultFile, n: usize, input: &str, series: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        let object = if i % 10 == 9 {
            format!("s3://b/import/01JD6Y7Z8X9W0V1T2S3R4Q5P6M/1.2/{series}/{series}.{i}.dcm")
        } else {
            format!("{input}1.2/{series}/{series}.{i}.dcm")
        };
        let line = match file {
            ResultFile::Success => format!(
                r#"{{"inputFile":"{object}","importResponse":{{"imageSetId":"{i:032x}","imageSetVersion":1,"isPrimary":true}}}}"#
            ),
            ResultFile::Warning => format!(
                r#"{{"inputFile":"{object}","importResponse":{{"imageSetId":"{i:032x}","imageSetVersion":1,"isPrimary":true,"warnings":[{{"warning_reason_code":45330,"type":"InvalidOffsetTable","message":"offset table of {i}"}}]}}}}"#
            ),
            ResultFile::Failure => format!(
                r#"{{"inputFile":"{object}","exception":{{"exceptionType":"ValidationException","message":"file {i} is not valid"}}}}"#
            ),
        };
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out
}

#[test]
fn a_file_is_handed_over_in_chunks_and_its_lines_counted() {
    let input = format!("s3://b/import/{JOB}/");
    let mut body = result_lines(ResultFile::Success, 1_203, &input, "1.2.3");
    // Blank lines, a CRLF line, a malformed line in the middle, no newline at the end.
    body.extend_from_slice(b"\n\r\nnot json\n");
    body.extend_from_slice(&result_lines(ResultFile::Success, 1, &input, "1.2.3")[..]);
    body.pop();
    body.extend_from_slice(b"\r");
    let mut chunks = Vec::new();
    let tally = read_results(&body[..], ResultFile::Success, &prefix(), |c| {
        chunks.push(c.len());
        true
    })
    .unwrap();
    let ours = 1_203 - 1_203 / 10 + 1;
    assert_eq!(
        tally,
        FileTally {
            lines: 1_205,
            outcomes: ours as u64,
            foreign: 120,
            malformed: 1,
            first_malformed: Some(1_206),
        }
    );
    assert!(chunks.iter().all(|&n| n <= CHUNK), "{chunks:?}");
    assert_eq!(chunks.iter().sum::<usize>(), ours);
    assert_eq!(chunks.len(), ours.div_ceil(CHUNK));

    let empty = read_results(&b""[..], ResultFile::Failure, &prefix(), |_| true).unwrap();
    assert_eq!(empty, FileTally::default(), "an empty file has no lines");
}

#[test]
fn an_overlong_line_is_skipped_as_it_streams_by_and_the_next_one_read() {
    let input = format!("s3://b/import/{JOB}/");
    let mut body = vec![b'x'; MAX_LINE * 3];
    body.push(b'\n');
    body.extend_from_slice(&result_lines(ResultFile::Failure, 1, &input, "1.2.3"));
    let mut got = Vec::new();
    let (tally, peak) = heap::peak_of(|| {
        read_results(&body[..], ResultFile::Failure, &prefix(), |c| {
            got.extend(c);
            true
        })
        .unwrap()
    });
    assert_eq!((tally.lines, tally.malformed, tally.outcomes), (2, 1, 1));
    assert_eq!(tally.first_malformed, Some(1));
    assert_eq!(got[0].0, key("1.2.3.0"));
    assert!(
        peak < MAX_LINE + 64 * 1024 + CHUNK * 256,
        "the line is not held whole: peak {peak} bytes"
    );
}

/// A reader whose stream breaks after `ok` bytes, as a dropped connection would.
struct Breaks<'a> {
    ok: &'a [u8],
}

impl Read for Breaks<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.ok.is_empty() {
            return Err(std::io::Error::other("connection reset"));
        }
        let n = buf.len().min(self.ok.len());
        buf[..n].copy_from_slice(&self.ok[..n]);
        self.ok = &self.ok[n..];
        Ok(n)
    }
}

#[test]
fn a_broken_stream_is_a_read_error_and_a_stopped_sink_stops_the_reading() {
    let body = result_lines(
        ResultFile::Success,
        2_000,
        &format!("s3://b/import/{JOB}/"),
        "1.2.3",
    );
    let err = read_results(
        Breaks {
            ok: &body[..body.len() / 2],
        },
        ResultFile::Success,
        &prefix(),
        |_| true,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            ReadError::Io {
                file: "SUCCESS/success.ndjson",
                ..
            }
        ),
        "{err}"
    );
    let mut handed = 0;
    let err = read_results(&body[..], ResultFile::Success, &prefix(), |_| {
        handed += 1;
        false
    })
    .unwrap_err();
    assert!(matches!(err, ReadError::Stopped(_)), "{err}");
    assert_eq!(handed, 1, "nothing is read after the sink said stop");
}

#[test]
fn three_files_of_5000_lines_are_read_in_small_bounded_memory() {
    let input = format!("s3://b/import/{JOB}/");
    let files = |n: usize| -> Vec<(ResultFile, Vec<u8>)> {
        ResultFile::ALL
            .into_iter()
            .map(|f| (f, result_lines(f, n, &input, "1.2.3")))
            .collect()
    };
    let read_all = |files: &[(ResultFile, Vec<u8>)]| -> u64 {
        let mut outcomes = 0;
        for (file, body) in files {
            // The sink drops each chunk, as the index does once it has recorded it.
            let tally = read_results(&body[..], *file, &prefix(), |chunk| {
                outcomes += chunk.len() as u64;
                true
            })
            .unwrap();
            assert_eq!(tally.outcomes + tally.foreign, tally.lines);
        }
        outcomes
    };
    let small = files(5_000);
    let large = files(50_000);
    let size = |f: &[(ResultFile, Vec<u8>)]| f.iter().map(|(_, b)| b.len()).sum::<usize>();
    let (n_small, peak_small) = heap::peak_of(|| read_all(&small));
    let (n_large, peak_large) = heap::peak_of(|| read_all(&large));
    assert_eq!(n_small, 3 * 4_500);
    assert_eq!(n_large, 3 * 45_000);
    assert!(
        peak_small >= READ_BUFFER,
        "the meter sees the read buffer ({peak_small} bytes)"
    );
    // A read buffer, a line, one chunk of outcomes: far below the files' sizes, and the same for
    // ten times as many lines.
    let bound = READ_BUFFER + 4 * 1024 + CHUNK * 600;
    assert!(
        peak_small < bound && peak_large < bound,
        "peak heap {peak_small} and {peak_large} bytes for files of {} and {} bytes (bound {bound})",
        size(&small),
        size(&large)
    );
}
