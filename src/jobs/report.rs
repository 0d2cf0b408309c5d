//! Text output of `dicom-gateway jobs list` and `jobs show`, for operators answering "where is my study?".

use super::Job;

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "-".into())
}

/// One line per job, newest first, under a header.
pub(crate) fn table(jobs: &[Job]) -> String {
    let mut out = format!(
        "{:<26}  {:<21}  {:<24}  {:>9}  {:>12}  {:>8}  {:>6}\n",
        "JOB ID", "STATUS", "CREATED", "INSTANCES", "BYTES", "IMPORTED", "FAILED"
    );
    for j in jobs {
        out.push_str(&format!(
            "{:<26}  {:<21}  {:<24}  {:>9}  {:>12}  {:>8}  {:>6}\n",
            j.job_id,
            j.status.as_str(),
            j.created_at,
            or_dash(j.instance_count),
            or_dash(j.total_bytes),
            or_dash(j.imported_count),
            or_dash(j.failed_count)
        ));
    }
    if jobs.is_empty() {
        out.push_str("(no jobs)\n");
    }
    out
}

/// Every attribute of a job, one per line, with a hint on what to do next.
pub(crate) fn details(job: &Job) -> String {
    let value = serde_json::to_value(job).unwrap_or_default();
    let mut out = String::new();
    if let Some(map) = value.as_object() {
        let width = map.keys().map(String::len).max().unwrap_or(0);
        for (k, v) in map {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(a) => a
                    .iter()
                    .map(|x| {
                        x.as_str()
                            .map(String::from)
                            .unwrap_or_else(|| x.to_string())
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                other => other.to_string(),
            };
            out.push_str(&format!("{k:<width$}  {text}\n"));
        }
    }
    out.push_str(&format!("\n{}\n", next_step(job)));
    out
}

/// What the status means for the operator.
pub(crate) fn next_step(job: &Job) -> String {
    use super::JobStatus::*;
    match job.status {
        Open => "The batch is still receiving instances; it closes after the idle time, its age limit or a size limit.".into(),
        Closed => "The batch is stored but its import has not started: is a state machine configured (--state-machine-arn)? Check the gateway log for 'starting the import failed'.".into(),
        Submitted => "The import state machine was started; see the execution in the Step Functions console.".into(),
        Importing => format!("HealthImaging is importing (import job {}).", or_dash(job.import_job_id.as_deref())),
        Imported => format!("HealthImaging finished import job {}; a gateway reads its job-output-manifest.json under {} and records the counts and the final status within a poll interval. If the job stays IMPORTED, no gateway with an S3 store is running, or it cannot read the results prefix: see its log for 'import outcome'.", or_dash(job.import_job_id.as_deref()), or_dash(job.output_s3_uri.as_deref())),
        Completed => "Imported: every file reached HealthImaging.".into(),
        CompletedWithErrors => format!("Imported with errors: `dicom-gateway jobs show {} --failed` lists the instances HealthImaging refused and why (from the FAILURE folder under {}).", job.job_id, or_dash(job.output_s3_uri.as_deref())),
        Failed => format!("The import failed: {}. The instances are still stored under {}.", or_dash(job.message.as_deref()), job.input_s3_uri),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::JobStatus;

    #[test]
    fn table_and_details_show_the_essentials() {
        let mut job = Job::opened(
            "01JD6Y7Z8X9W0V1T2S3R4Q5P6N",
            "2026-11-23T10:00:00.000Z",
            "s3://b/import/01JD6Y7Z8X9W0V1T2S3R4Q5P6N/",
            "gw",
        );
        job.status = JobStatus::Failed;
        job.instance_count = Some(3);
        job.message = Some("MedicalImaging.AccessDeniedException: role cannot read".into());
        job.study_instance_uids = vec!["1.2".into(), "1.3".into()];
        let t = table(std::slice::from_ref(&job));
        assert!(t.starts_with("JOB ID"));
        assert!(t.contains("01JD6Y7Z8X9W0V1T2S3R4Q5P6N  FAILED"));
        let d = details(&job);
        assert!(d.contains("studyInstanceUids"));
        assert!(d.contains("1.2, 1.3"));
        assert!(d.contains("The import failed: MedicalImaging.AccessDeniedException"));
        assert!(table(&[]).contains("(no jobs)"));
        job.status = JobStatus::Imported;
        job.import_job_id = Some("import-job-0001".into());
        job.output_s3_uri = Some("s3://b/results/J/ds-DicomImport-import-job-0001/".into());
        let hint = next_step(&job);
        assert!(
            hint.contains("finished import job import-job-0001")
                && hint.contains("job-output-manifest.json under s3://b/results/J/"),
            "{hint}"
        );
    }
}
