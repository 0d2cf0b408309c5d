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
        format!("https://other.s3.us-east-1.amazonaws.com/dicom/in/{JOB}/{rest}"), // another bucket
        format!("https://s3.us-east-1.amazonaws.com/other/dicom/in/{JOB}/{rest}"), // the same
        format!("https://b.example.com/dicom/in/{JOB}/{rest}"), // not S3
        format!("file:///dicom/in/{JOB}/{rest}"), // not S3
        format!("other/{JOB}/{rest}"),  // relative, of another prefix
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
    assert!(InputPrefix::of(&job(&format!("s3://b/import/x{JOB}/"))).is_err());
}

#[test]
fn an_input_file_as_an_https_url_or_a_relative_path_names_the_same_object() {
    let with = InputPrefix::of(&job(&format!("s3://b/dicom/in/{JOB}/"))).unwrap();
    let rest = "1.2/1.2.3/1.2.3.4.dcm";
    let want = Some(format!("{JOB}/{rest}"));
    for same in [
        format!("https://b.s3.eu-west-1.amazonaws.com/dicom/in/{JOB}/{rest}"), // virtual-hosted
        format!("https://b.s3.amazonaws.com/dicom/in/{JOB}/{rest}"), // legacy global endpoint
        format!("https://b.s3-eu-west-1.amazonaws.com/dicom/in/{JOB}/{rest}"), // legacy dash
        format!("https://s3.eu-west-1.amazonaws.com/b/dicom/in/{JOB}/{rest}"), // path-style
        format!("dicom/in/{JOB}/{rest}"),                            // relative to the bucket
        format!("/dicom/in/{JOB}/{rest}"),                           // the same, rooted
        format!("{JOB}/{rest}"),                                     // relative to the store prefix
        rest.to_string(), // relative to the job's input prefix
    ] {
        assert_eq!(with.key_of(&same), want, "{same}");
    }
}

/// `n` lines of `file` for objects `{input}1.2/{series}/{series}.{i}.dcm` (every tenth one of
/// another job instead).
pub(crate) fn result_lines(file: ResultFile, n: usize, input: &str, series: &str) -> Vec<u8> {
    lines_of(file, n, input, series, true)
}

/// `n` lines of `file` for objects `{input}1.2/{series}/{series}.{i}.dcm`, all of them.
pub(crate) fn own_result_lines(file: ResultFile, n: usize, input: &str, series: &str) -> Vec<u8> {
    lines_of(file, n, input, series, false)
}

fn lines_of(file: ResultFile, n: usize, input: &str, series: &str, foreign: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        let object = if foreign && i % 10 == 9 {
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

#[test]
fn a_line_with_a_flood_of_long_warnings_keeps_a_few_clipped_ones_and_says_how_many_more() {
    // 80,000 warnings fit in a line of MAX_LINE bytes.
    let mut warnings = vec![format!(
        r#"{{"warning_reason_code":45330,"type":"InvalidOffsetTable","message":"{}"}}"#,
        "é".repeat(4 * MAX_TEXT)
    )];
    warnings.extend((1..80_000).map(|_| "{}".to_string()));
    let line = format!(
        r#"{{"inputFile":"{}","importResponse":{{"imageSetId":"0a1b","warnings":[{}]}}}}"#,
        uri("1.2.3.2"),
        warnings.join(",")
    );
    assert!(line.len() < MAX_LINE, "{} bytes", line.len());
    let ((_, outcome), peak) =
        heap::peak_of(|| parse_line(ResultFile::Warning, line.as_bytes(), &prefix()).unwrap());
    let InstanceOutcome::ImportedWithWarnings { warnings, .. } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(warnings.len(), MAX_WARNINGS + 1);
    assert!(warnings[0].starts_with("InvalidOffsetTable (45330): éé"));
    assert!(warnings[0].ends_with('…'), "clipped");
    assert!(warnings[0].len() <= MAX_TEXT + '…'.len_utf8());
    assert_eq!(warnings[1], "warning");
    assert_eq!(warnings[MAX_WARNINGS], "… and 79990 more warnings");
    assert!(
        peak < 64 * 1024,
        "the skipped warnings are not held: peak {peak} bytes"
    );

    let long = format!(
        r#"{{"inputFile":"{}","exception":{{"exceptionType":"{}","message":"{}"}}}}"#,
        uri("1.2.3.3"),
        "T".repeat(3 * MAX_TEXT),
        "m".repeat(100 * MAX_TEXT)
    );
    let (_, failed) = parse_line(ResultFile::Failure, long.as_bytes(), &prefix()).unwrap();
    let InstanceOutcome::Failed {
        exception_type,
        message,
    } = failed
    else {
        panic!("{failed:?}")
    };
    assert_eq!(exception_type.len(), MAX_TEXT + '…'.len_utf8());
    assert_eq!(message.len(), MAX_TEXT + '…'.len_utf8());

    let huge_id = format!(
        r#"{{"inputFile":"{}","importResponse":{{"imageSetId":"{}"}}}}"#,
        uri("1.2.3.1"),
        "a".repeat(10_000)
    );
    assert!(matches!(
        parse_line(ResultFile::Success, huge_id.as_bytes(), &prefix()),
        Err(LineError::Malformed(_))
    ));
}

#[test]
fn chunks_of_long_outcomes_are_handed_over_by_bytes_before_they_reach_500() {
    let input = format!("s3://b/import/{JOB}/");
    // 1,000 warning lines of ten 1 KiB warnings each: ~10 MB of outcomes, 500 to a chunk would
    // hold ~5 MB.
    let message = "w".repeat(MAX_TEXT);
    let warnings =
        vec![
            format!(r#"{{"warning_reason_code":45330,"type":"T","message":"{message}"}}"#);
            MAX_WARNINGS
        ]
        .join(",");
    let mut body = Vec::new();
    for i in 0..1_000 {
        body.extend_from_slice(
            format!(
                r#"{{"inputFile":"{input}1.2/1.2.3/1.2.3.{i}.dcm","importResponse":{{"imageSetId":"{i:032x}","warnings":[{warnings}]}}}}"#
            )
            .as_bytes(),
        );
        body.push(b'\n');
    }
    let mut chunks = Vec::new();
    let (tally, peak) = heap::peak_of(|| {
        read_results(&body[..], ResultFile::Warning, &prefix(), |chunk| {
            let bytes: usize = chunk.iter().map(|(k, o)| outcome_bytes(k, o)).sum();
            chunks.push((chunk.len(), bytes));
            true
        })
        .unwrap()
    });
    assert_eq!(tally.outcomes, 1_000);
    assert!(chunks.len() >= 10, "{chunks:?}");
    let biggest = chunks.iter().map(|(_, bytes)| *bytes).max().unwrap();
    assert!(
        biggest < CHUNK_BYTES + 16 * 1024,
        "a chunk holds at most about CHUNK_BYTES: {chunks:?}"
    );
    assert_eq!(chunks.iter().map(|(n, _)| n).sum::<usize>(), 1_000);
    // The read buffer, a line, one chunk (its strings and their overhead): far below the ~10 MB.
    assert!(
        peak < 3 * CHUNK_BYTES,
        "peak heap {peak} bytes for {} bytes of lines",
        body.len()
    );
}
