//! TLS material for Ferry's ports, read from PEM files and reloaded when
//! they change, so certificates rotate without a restart:
//!
//! - [`Certificates`]: a server's certificates, chosen per handshake by SNI
//!   (the proxy's TLS listener, the control plane's xDS port);
//! - [`ClientCa`]: the CA bundle a server checks client certificates
//!   against (mutual TLS);
//! - [`PeerNames`]: the names a verified client certificate carries (URI
//!   and DNS subjectAltNames, subject CN), which authorization matches;
//! - [`entry_hash`]: bearer tokens as auth files list them.

mod certs;
mod client_ca;
mod files;
mod identity;
mod token;

pub use certs::{CertPair, Certificates, Scope, TlsError, grpc_server_config, server_config};
pub use client_ca::ClientCa;
pub use identity::PeerNames;
pub use token::{TokenEntryError, entry_hash, token_hash};
