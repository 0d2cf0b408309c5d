//! dicom-gateway: a DICOM Store SCP that lands every instance durably in Amazon S3 (or a local
//! directory) before it says "stored", and groups what it stored into HealthImaging import batches.
//!
//! A reader finds their room by responsibility, in the order an instance travels:
//! - `listener`: the accept loop, pending connections and the association limit, graceful shutdown
//!   (`tls` on the TLS port, `proxy_protocol` behind a load balancer);
//! - `association`: negotiation and the per-association DIMSE loop, over a `connection`;
//! - `connection`: one socket, its buffers, PDU sizes and timeouts;
//! - `pdu`: Upper Layer PDU framing; `dimse`: command sets and statuses;
//! - `instance`: one C-STORE data set, streamed from the wire to the store;
//! - `sniff`: identifying UIDs read from the start of a data set in any transfer syntax;
//! - `part10`: the file meta group written in front of the data set;
//! - `store`: the object stores (S3, local directory), and edge mode's spool in front of S3;
//! - `batch`: grouping stored instances into import batches, one job each;
//! - `index`: one record per stored instance (local journal), written off the acknowledgement path;
//! - `commitment`: Storage Commitment (N-ACTION in, N-EVENT-REPORT out), decided from the index;
//! - `jobs`: job records (DynamoDB, local journal) with forward-only status;
//! - `import`: recording batches and starting their HealthImaging imports;
//! - `outcome`: ending imported jobs from their results in S3 (the manifest is too large for
//!   Step Functions state), exactly one gateway of the fleet per job;
//! - `recovery`: finishing the jobs a stopped gateway left OPEN or CLOSED;
//! - `policy`, `uid`: what is accepted; `health`, `metrics`, `emf` (CloudWatch): what operators see;
//! - `clock`: the one timestamp format of job records, the index and logs;
//! - `cli`, `config`: the command line, turned once into a checked, typed configuration;
//! - `server`: the wiring for `dicom-gateway serve`; `echo`: the client behind `dicom-gateway echo`;
//! - `commands`: the subcommands, run by `main`.

pub(crate) mod association;
pub(crate) mod aws;
pub(crate) mod batch;
pub(crate) mod cli;
pub(crate) mod clock;
pub mod commands;
pub(crate) mod commitment;
pub(crate) mod config;
pub(crate) mod connection;
pub mod dimse;
pub(crate) mod durable;
pub(crate) mod echo;
pub(crate) mod emf;
pub(crate) mod health;
pub(crate) mod import;
pub mod index;
pub(crate) mod instance;
pub mod jobs;
pub(crate) mod listener;
pub(crate) mod metrics;
pub(crate) mod outcome;
pub mod part10;
pub mod pdu;
pub mod policy;
pub(crate) mod proxy_protocol;
pub(crate) mod recovery;
pub(crate) mod server;
pub mod sniff;
pub mod store;
pub(crate) mod tls;
pub(crate) mod uid;
