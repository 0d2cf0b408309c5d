//! dicom-gateway: a DICOM Store SCP that lands every instance durably in Amazon S3 (or a local
//! directory) before it says "stored", and groups what it stored into HealthImaging import batches.
//!
//! A reader finds their room by responsibility:
//! - [`listener`]: the accept loop, the association limit, graceful shutdown;
//! - [`association`]: negotiation and the per-association DIMSE loop;
//! - [`pdu`]: Upper Layer PDU framing on an async socket;
//! - [`dimse`]: command sets and statuses;
//! - [`echo`]: the C-ECHO client behind `dicom-gateway echo`;
//! - [`instance`]: one C-STORE data set, streamed from the wire to the store;
//! - [`sniff`]: identifying UIDs read from the start of a data set in any transfer syntax;
//! - [`part10`]: the file meta group written in front of the data set;
//! - [`store`]: the object stores (S3, local directory);
//! - [`batch`]: grouping stored instances into import batches;
//! - [`jobs`]: job records (DynamoDB, local journal) with forward-only status;
//! - [`import`]: recording batches and starting their HealthImaging imports;
//! - [`policy`], [`uid`]: what is accepted;
//! - [`cli`], [`config`]: the command line, turned once into a checked, typed configuration;
//! - [`server`]: wiring for `dicom-gateway serve`.

pub mod association;
pub mod aws;
pub mod batch;
pub mod cli;
pub mod config;
pub mod dimse;
pub mod echo;
pub mod health;
pub mod import;
pub mod instance;
pub mod jobs;
pub mod listener;
pub mod metrics;
pub mod part10;
pub mod pdu;
pub mod policy;
pub mod server;
pub mod sniff;
pub mod store;
pub mod tls;
pub mod uid;
