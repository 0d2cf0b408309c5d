//! Whether the gateway commits to one instance: a pure decision from what the instance index (and,
//! for `stored`, the object store) says, and where the request stands in time.

use super::{CommitWhen, FailureReason, SopReference};
use crate::index::{InstanceOutcome, InstanceRecord};

/// Where a request stands in time when one of its instances is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Just received: an instance the index does not know yet may be one whose record the index
    /// writer has not written yet (it runs after the C-STORE response).
    IndexGrace,
    /// The index is caught up: an instance it does not know was never stored.
    Waiting,
    /// `--commitment-timeout` has passed: whatever is still undecided fails.
    PastDeadline,
}

/// Whether a stored object is there, for the `stored` policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Presence {
    Present,
    Missing,
    /// The store could not say (unreachable): decide again later.
    Unknown,
}

/// One instance's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Committed,
    Failed(FailureReason),
    /// Not decided yet: look again later.
    Pending,
}

/// The records of the requested SOP Instance UID whose SOP Class agrees with the request (a
/// record without one, rebuilt from an object without a meta group, agrees), or the reason it
/// fails when the index knows the instance only under another class.
pub(crate) fn matching<'a>(
    reference: &SopReference,
    records: &'a [InstanceRecord],
) -> Result<Vec<&'a InstanceRecord>, FailureReason> {
    let matching: Vec<_> = records
        .iter()
        .filter(|r| {
            r.sop_class_uid
                .as_deref()
                .is_none_or(|c| c == reference.sop_class_uid)
        })
        .collect();
    if matching.is_empty() && !records.is_empty() {
        return Err(FailureReason::ClassInstanceConflict);
    }
    Ok(matching)
}

/// The verdict of the `stored` policy: committed once a record of the instance says stored and
/// its object is in the store. `presence` is the store's answer for each of `records` (the
/// matching ones, in the same order).
pub(crate) fn stored(records: &[&InstanceRecord], presence: &[Presence], phase: Phase) -> Verdict {
    if records.is_empty() {
        return not_found(phase);
    }
    if presence.contains(&Presence::Present) {
        return Verdict::Committed;
    }
    if presence.contains(&Presence::Unknown) {
        return unless_past_deadline(phase);
    }
    // The index knew it, the store no longer has it (deleted since, e.g. by a lifecycle rule).
    Verdict::Failed(FailureReason::NoSuchObjectInstance)
}

/// The verdict of the `imported` policy: committed once HealthImaging reported any copy of the
/// instance imported (with or without warnings); failed when it reported every copy failed.
pub(crate) fn imported(records: &[&InstanceRecord], phase: Phase) -> Verdict {
    if records.is_empty() {
        return not_found(phase);
    }
    let outcomes = || records.iter().map(|r| &r.outcome);
    if outcomes().any(|o| {
        matches!(
            o,
            InstanceOutcome::Imported { .. } | InstanceOutcome::ImportedWithWarnings { .. }
        )
    }) {
        return Verdict::Committed;
    }
    if outcomes().all(|o| matches!(o, InstanceOutcome::Failed { .. })) {
        return Verdict::Failed(FailureReason::ProcessingFailure);
    }
    unless_past_deadline(phase)
}

/// The verdict for an instance the index has no record of.
fn not_found(phase: Phase) -> Verdict {
    match phase {
        Phase::IndexGrace => Verdict::Pending,
        Phase::Waiting | Phase::PastDeadline => {
            Verdict::Failed(FailureReason::NoSuchObjectInstance)
        }
    }
}

fn unless_past_deadline(phase: Phase) -> Verdict {
    match phase {
        Phase::PastDeadline => Verdict::Failed(FailureReason::ProcessingFailure),
        Phase::IndexGrace | Phase::Waiting => Verdict::Pending,
    }
}

/// The verdict of `policy` for one reference, given the index's records of it and (for `stored`)
/// the store's answer for each matching record.
pub(crate) fn verdict(
    policy: CommitWhen,
    reference: &SopReference,
    records: &[InstanceRecord],
    presence: &[Presence],
    phase: Phase,
) -> Verdict {
    let matching = match matching(reference, records) {
        Ok(m) => m,
        Err(reason) => return Verdict::Failed(reason),
    };
    match policy {
        CommitWhen::Stored => stored(&matching, presence, phase),
        CommitWhen::Imported => imported(&matching, phase),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::KeyParts;

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    const MR: &str = "1.2.840.10008.5.1.4.1.1.4";
    const KEY: &str = "01JD6Y7Z8X9W0V1T2S3R4Q5P6N/1.2.3/1.2.3.4/1.2.3.4.5.dcm";

    fn reference() -> SopReference {
        SopReference {
            sop_class_uid: CT.into(),
            sop_instance_uid: "1.2.3.4.5".into(),
        }
    }

    fn record(class: Option<&str>, outcome: InstanceOutcome) -> InstanceRecord {
        let mut r = KeyParts::parse(KEY).unwrap().record(
            KEY,
            10,
            class.map(String::from),
            None,
            "2026-11-24T06:00:00.000Z".into(),
        );
        r.outcome = outcome;
        r
    }

    fn failed() -> InstanceOutcome {
        InstanceOutcome::Failed {
            exception_type: "InvalidDicomFile".into(),
            message: "bad".into(),
        }
    }

    fn imported_outcome() -> InstanceOutcome {
        InstanceOutcome::Imported {
            image_set_id: "a".into(),
            is_primary: true,
        }
    }

    use Phase::*;

    #[test]
    fn stored_commits_a_present_object_and_fails_an_unknown_one_after_the_grace() {
        let stored_record = [record(Some(CT), InstanceOutcome::Stored)];
        let v = |records: &[InstanceRecord], presence: &[Presence], phase| {
            verdict(CommitWhen::Stored, &reference(), records, presence, phase)
        };
        assert_eq!(
            v(&stored_record, &[Presence::Present], IndexGrace),
            Verdict::Committed
        );
        assert_eq!(
            v(&[], &[], IndexGrace),
            Verdict::Pending,
            "the writer may be behind"
        );
        assert_eq!(
            v(&[], &[], Waiting),
            Verdict::Failed(FailureReason::NoSuchObjectInstance)
        );
        assert_eq!(
            v(&stored_record, &[Presence::Missing], Waiting),
            Verdict::Failed(FailureReason::NoSuchObjectInstance),
            "deleted since it was stored"
        );
        assert_eq!(
            v(&stored_record, &[Presence::Unknown], Waiting),
            Verdict::Pending,
            "the store is unreachable: ask again"
        );
        assert_eq!(
            v(&stored_record, &[Presence::Unknown], PastDeadline),
            Verdict::Failed(FailureReason::ProcessingFailure)
        );
    }

    #[test]
    fn a_different_sop_class_is_a_class_instance_conflict() {
        let records = [record(Some(MR), InstanceOutcome::Stored)];
        assert_eq!(
            verdict(CommitWhen::Stored, &reference(), &records, &[], IndexGrace),
            Verdict::Failed(FailureReason::ClassInstanceConflict)
        );
        // A rebuilt record without a class is taken as agreeing.
        let records = [record(None, InstanceOutcome::Stored)];
        assert_eq!(
            verdict(
                CommitWhen::Stored,
                &reference(),
                &records,
                &[Presence::Present],
                Waiting
            ),
            Verdict::Committed
        );
    }

    #[test]
    fn imported_waits_for_healthimaging_and_bounds_the_wait() {
        let v = |records: &[InstanceRecord], phase| {
            verdict(CommitWhen::Imported, &reference(), records, &[], phase)
        };
        let stored = [record(Some(CT), InstanceOutcome::Stored)];
        assert_eq!(v(&stored, Waiting), Verdict::Pending);
        assert_eq!(
            v(&stored, PastDeadline),
            Verdict::Failed(FailureReason::ProcessingFailure)
        );
        assert_eq!(
            v(&[record(Some(CT), imported_outcome())], Waiting),
            Verdict::Committed
        );
        let warned = InstanceOutcome::ImportedWithWarnings {
            image_set_id: "a".into(),
            is_primary: false,
            warnings: vec!["w".into()],
        };
        assert_eq!(v(&[record(Some(CT), warned)], Waiting), Verdict::Committed);
        assert_eq!(
            v(&[record(Some(CT), failed())], Waiting),
            Verdict::Failed(FailureReason::ProcessingFailure)
        );
        // Sent twice: one copy failed, the other is still on its way.
        assert_eq!(
            v(
                &[
                    record(Some(CT), failed()),
                    record(Some(CT), InstanceOutcome::Stored)
                ],
                Waiting
            ),
            Verdict::Pending
        );
        assert_eq!(
            v(&[], Waiting),
            Verdict::Failed(FailureReason::NoSuchObjectInstance)
        );
    }
}
