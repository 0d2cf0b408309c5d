//! A-ASSOCIATE negotiation (PS3.8 §7.1, §9.3.2–9.3.4): a pure decision from the request and the
//! configured policy, so every rule can be tested without a socket.

use std::collections::HashMap;

use dicom_ul::pdu::{
    AssociationAC, AssociationRJ, AssociationRJResult, AssociationRJServiceProviderASCEReason,
    AssociationRJServiceUserReason, AssociationRJSource, AssociationRQ, PresentationContextResult,
    PresentationContextResultReason, UserVariableItem,
};

use dicom_dictionary_std::uids::{DICOM_APPLICATION_CONTEXT, IMPLICIT_VR_LITTLE_ENDIAN};

use crate::part10::{IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME};
use crate::policy::SyntaxPolicy;
use crate::uid::trim_uid;

/// A calling AE title bound to the common name of a client certificate (`--tls-ae-binding`).
pub(crate) type AeBinding = (String, String);

/// What an association is checked against.
#[derive(Debug, Clone)]
pub(crate) struct AcceptancePolicy {
    /// Our AE title; the called AE title must match it unless `accept_any_called_ae`.
    pub ae_title: String,
    pub accept_any_called_ae: bool,
    /// Calling AE titles allowed to associate; empty means any.
    pub calling_ae_allow: Vec<String>,
    pub syntaxes: SyntaxPolicy,
    /// Our Maximum Length Received for P-DATA-TF PDUs.
    pub max_pdu: u32,
    /// (calling AE title, client certificate subject CN) pairs: on TLS, a calling AE title listed
    /// here is accepted only from a client whose certificate carries that common name.
    pub ae_bindings: Vec<AeBinding>,
}

/// A presentation context accepted for this association.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AcceptedContext {
    pub abstract_syntax: String,
    pub transfer_syntax: String,
}

/// The answer to an A-ASSOCIATE-RQ: accepted with its contexts, or rejected with a reason.
#[derive(Debug)]
pub(crate) enum Negotiation {
    Accepted {
        ac: AssociationAC,
        contexts: HashMap<u8, AcceptedContext>,
        /// The peer's Maximum Length Received (0: unlimited).
        peer_max_pdu: u32,
        /// Contexts rejected, with the reason, for the log.
        rejected: Vec<(String, PresentationContextResultReason)>,
    },
    Rejected {
        rj: AssociationRJ,
        reason: &'static str,
    },
}

/// AE titles are compared without their space padding, case-sensitively (PS3.8 §9.3.2).
pub(crate) fn ae_matches(a: &str, b: &str) -> bool {
    a.trim() == b.trim()
}

pub(crate) fn rejection(
    result: AssociationRJResult,
    source: AssociationRJSource,
    reason: &'static str,
) -> Negotiation {
    Negotiation::Rejected {
        rj: AssociationRJ { result, source },
        reason,
    }
}

/// `peer_cn` is the subject common name of the client's TLS certificate, if any.
pub(crate) fn negotiate(
    rq: &AssociationRQ,
    cfg: &AcceptancePolicy,
    peer_cn: Option<&str>,
) -> Negotiation {
    use AssociationRJResult::Permanent;
    if rq.protocol_version & 1 == 0 {
        return rejection(
            Permanent,
            AssociationRJSource::ServiceProviderASCE(
                AssociationRJServiceProviderASCEReason::ProtocolVersionNotSupported,
            ),
            "protocol version not supported",
        );
    }
    if trim_uid(&rq.application_context_name) != DICOM_APPLICATION_CONTEXT {
        return rejection(
            Permanent,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::ApplicationContextNameNotSupported,
            ),
            "application context name not supported",
        );
    }
    if !cfg.accept_any_called_ae && !ae_matches(&rq.called_ae_title, &cfg.ae_title) {
        return rejection(
            Permanent,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CalledAETitleNotRecognized,
            ),
            "called AE title not recognized",
        );
    }
    if !cfg.calling_ae_allow.is_empty()
        && !cfg
            .calling_ae_allow
            .iter()
            .any(|a| ae_matches(a, &rq.calling_ae_title))
    {
        return rejection(
            Permanent,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CallingAETitleNotRecognized,
            ),
            "calling AE title not recognized",
        );
    }

    if let Some((_, cn)) = cfg
        .ae_bindings
        .iter()
        .find(|(ae, _)| ae_matches(ae, &rq.calling_ae_title))
        && peer_cn != Some(cn.as_str())
    {
        return rejection(
            Permanent,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CallingAETitleNotRecognized,
            ),
            "calling AE title not bound to the client certificate",
        );
    }

    let mut results = Vec::with_capacity(rq.presentation_contexts.len());
    let mut contexts = HashMap::new();
    let mut rejected = Vec::new();
    for pc in &rq.presentation_contexts {
        let abstract_syntax = trim_uid(&pc.abstract_syntax).to_string();
        let (reason, ts) = if !cfg.syntaxes.accepts_sop_class(&abstract_syntax) {
            (
                PresentationContextResultReason::AbstractSyntaxNotSupported,
                None,
            )
        } else {
            match cfg
                .syntaxes
                .choose_transfer_syntax_for(&abstract_syntax, &pc.transfer_syntaxes)
            {
                Some(ts) => (
                    PresentationContextResultReason::Acceptance,
                    Some(ts.to_string()),
                ),
                None => (
                    PresentationContextResultReason::TransferSyntaxesNotSupported,
                    None,
                ),
            }
        };
        match &ts {
            Some(ts) => {
                contexts.insert(
                    pc.id,
                    AcceptedContext {
                        abstract_syntax: abstract_syntax.clone(),
                        transfer_syntax: ts.clone(),
                    },
                );
            }
            None => rejected.push((abstract_syntax, reason.clone())),
        }
        // For a rejected context the transfer syntax field is not significant (PS3.8 §9.3.3.2).
        results.push(PresentationContextResult {
            id: pc.id,
            reason,
            transfer_syntax: ts.unwrap_or_else(|| IMPLICIT_VR_LITTLE_ENDIAN.to_string()),
        });
    }

    let peer_max_pdu = rq
        .user_variables
        .iter()
        .find_map(|v| match v {
            UserVariableItem::MaxLength(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(0);
    let ac = AssociationAC {
        protocol_version: 1,
        calling_ae_title: rq.calling_ae_title.clone(),
        called_ae_title: rq.called_ae_title.clone(),
        application_context_name: DICOM_APPLICATION_CONTEXT.to_string(),
        presentation_contexts: results,
        user_variables: vec![
            UserVariableItem::MaxLength(cfg.max_pdu),
            UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.to_string()),
            UserVariableItem::ImplementationVersionName(IMPLEMENTATION_VERSION_NAME.to_string()),
        ],
    };
    Negotiation::Accepted {
        ac,
        contexts,
        peer_max_pdu,
        rejected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_dictionary_std::uids::{EXPLICIT_VR_LITTLE_ENDIAN, VERIFICATION};
    use dicom_ul::pdu::PresentationContextProposed;

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";

    fn cfg() -> AcceptancePolicy {
        AcceptancePolicy {
            ae_title: "GATEWAY".into(),
            accept_any_called_ae: false,
            calling_ae_allow: vec![],
            syntaxes: SyntaxPolicy::standard(),
            max_pdu: 65536,
            ae_bindings: vec![],
        }
    }

    #[test]
    fn a_bound_calling_ae_needs_the_matching_client_certificate() {
        let c = AcceptancePolicy {
            ae_bindings: vec![("CT1".into(), "ct1.hospital.example".into())],
            ..cfg()
        };
        let req = rq(
            "GATEWAY",
            "CT1",
            vec![(CT, vec![EXPLICIT_VR_LITTLE_ENDIAN])],
        );
        assert!(matches!(
            negotiate(&req, &c, Some("ct1.hospital.example")),
            Negotiation::Accepted { .. }
        ));
        for cn in [None, Some("mr1.hospital.example")] {
            let Negotiation::Rejected { rj, reason } = negotiate(&req, &c, cn) else {
                panic!("{cn:?} must be rejected")
            };
            assert_eq!(
                rj.source,
                AssociationRJSource::ServiceUser(
                    AssociationRJServiceUserReason::CallingAETitleNotRecognized
                )
            );
            assert_eq!(
                reason,
                "calling AE title not bound to the client certificate"
            );
        }
        // AE titles without a binding are unaffected.
        assert!(matches!(
            negotiate(
                &rq(
                    "GATEWAY",
                    "MR1",
                    vec![(CT, vec![EXPLICIT_VR_LITTLE_ENDIAN])]
                ),
                &c,
                None
            ),
            Negotiation::Accepted { .. }
        ));
    }

    fn rq(called: &str, calling: &str, contexts: Vec<(&str, Vec<&str>)>) -> AssociationRQ {
        AssociationRQ {
            protocol_version: 1,
            calling_ae_title: calling.into(),
            called_ae_title: called.into(),
            application_context_name: DICOM_APPLICATION_CONTEXT.into(),
            presentation_contexts: contexts
                .into_iter()
                .enumerate()
                .map(|(i, (a, ts))| PresentationContextProposed {
                    id: (i * 2 + 1) as u8,
                    abstract_syntax: a.into(),
                    transfer_syntaxes: ts.into_iter().map(String::from).collect(),
                })
                .collect(),
            user_variables: vec![UserVariableItem::MaxLength(16384)],
        }
    }

    fn reason_of(n: Negotiation) -> (AssociationRJResult, AssociationRJSource) {
        match n {
            Negotiation::Rejected { rj, .. } => (rj.result, rj.source),
            Negotiation::Accepted { .. } => panic!("expected a rejection"),
        }
    }

    #[test]
    fn wrong_called_ae_is_rejected_permanently_by_the_service_user() {
        let (result, source) = reason_of(negotiate(
            &rq("OTHER", "SCU", vec![(CT, vec![EXPLICIT_VR_LITTLE_ENDIAN])]),
            &cfg(),
            None,
        ));
        assert_eq!(result, AssociationRJResult::Permanent);
        assert_eq!(
            source,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CalledAETitleNotRecognized
            )
        );
    }

    #[test]
    fn called_ae_matches_without_padding_or_with_accept_any() {
        assert!(matches!(
            negotiate(
                &rq(
                    "GATEWAY         ",
                    "SCU",
                    vec![(CT, vec![EXPLICIT_VR_LITTLE_ENDIAN])]
                ),
                &cfg(),
                None
            ),
            Negotiation::Accepted { .. }
        ));
        let any = AcceptancePolicy {
            accept_any_called_ae: true,
            ..cfg()
        };
        assert!(matches!(
            negotiate(
                &rq(
                    "WHATEVER",
                    "SCU",
                    vec![(CT, vec![EXPLICIT_VR_LITTLE_ENDIAN])]
                ),
                &any,
                None
            ),
            Negotiation::Accepted { .. }
        ));
    }

    #[test]
    fn calling_ae_outside_the_allow_list_is_rejected() {
        let c = AcceptancePolicy {
            calling_ae_allow: vec!["CT1".into(), "MR1".into()],
            ..cfg()
        };
        let (_, source) = reason_of(negotiate(
            &rq(
                "GATEWAY",
                "EVIL",
                vec![(CT, vec![EXPLICIT_VR_LITTLE_ENDIAN])],
            ),
            &c,
            None,
        ));
        assert_eq!(
            source,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CallingAETitleNotRecognized
            )
        );
        assert!(matches!(
            negotiate(
                &rq(
                    "GATEWAY",
                    "MR1 ",
                    vec![(CT, vec![EXPLICIT_VR_LITTLE_ENDIAN])]
                ),
                &c,
                None
            ),
            Negotiation::Accepted { .. }
        ));
    }

    #[test]
    fn wrong_application_context_and_protocol_version_are_rejected() {
        let mut r = rq("GATEWAY", "SCU", vec![]);
        r.application_context_name = "1.2.3".into();
        let (_, source) = reason_of(negotiate(&r, &cfg(), None));
        assert_eq!(
            source,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::ApplicationContextNameNotSupported
            )
        );
        let mut r = rq("GATEWAY", "SCU", vec![]);
        r.protocol_version = 2;
        let (_, source) = reason_of(negotiate(&r, &cfg(), None));
        assert_eq!(
            source,
            AssociationRJSource::ServiceProviderASCE(
                AssociationRJServiceProviderASCEReason::ProtocolVersionNotSupported
            )
        );
    }

    #[test]
    fn contexts_are_accepted_or_rejected_one_by_one() {
        let restricted = AcceptancePolicy {
            syntaxes: SyntaxPolicy::new(None, Some(&[EXPLICIT_VR_LITTLE_ENDIAN.to_string()])),
            ..cfg()
        };
        let n = negotiate(
            &rq(
                "GATEWAY",
                "SCU",
                vec![
                    (
                        CT,
                        vec!["1.2.840.10008.1.2.4.50", EXPLICIT_VR_LITTLE_ENDIAN],
                    ),
                    (
                        "1.2.840.10008.5.1.4.1.2.1.1",
                        vec![EXPLICIT_VR_LITTLE_ENDIAN],
                    ), // Q/R FIND: not a storage class
                    (CT, vec!["1.2.840.10008.1.2.4.50"]),
                    (VERIFICATION, vec![EXPLICIT_VR_LITTLE_ENDIAN]),
                ],
            ),
            &restricted,
            None,
        );
        let Negotiation::Accepted {
            ac,
            contexts,
            peer_max_pdu,
            rejected,
        } = n
        else {
            panic!()
        };
        assert_eq!(peer_max_pdu, 16384);
        let reasons: Vec<_> = ac
            .presentation_contexts
            .iter()
            .map(|r| (r.id, r.reason.clone()))
            .collect();
        assert_eq!(
            reasons,
            vec![
                (1, PresentationContextResultReason::Acceptance),
                (
                    3,
                    PresentationContextResultReason::AbstractSyntaxNotSupported
                ),
                (
                    5,
                    PresentationContextResultReason::TransferSyntaxesNotSupported
                ),
                (7, PresentationContextResultReason::Acceptance),
            ]
        );
        assert_eq!(
            contexts[&1],
            AcceptedContext {
                abstract_syntax: CT.into(),
                transfer_syntax: EXPLICIT_VR_LITTLE_ENDIAN.into()
            }
        );
        assert_eq!(contexts.len(), 2);
        assert_eq!(rejected.len(), 2);
        assert!(
            ac.user_variables
                .contains(&UserVariableItem::MaxLength(65536))
        );
    }
}
