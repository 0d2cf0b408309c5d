pub mod dimse;
pub mod part10;
pub mod policy;
pub mod sniff;
pub mod uid;
