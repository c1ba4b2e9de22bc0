//! Real servers for mailproxy's tests: memcached, Dovecot (IMAP and POP3) and nginx with its mail
//! module, each started on free loopback ports in a temporary directory and stopped when dropped.
//!
//! Every start waits for the server to answer on its ports (a readiness check, not a sleep), and
//! every error says which binary or Debian package is missing.

mod control_plane;
mod dovecot;
mod memcached;
mod nginx;
mod pki;
mod poll;
mod process;
pub mod wire;

pub use control_plane::{ControlPlane, ControlPlaneOptions, KUBERNETES_VERSION};
pub use dovecot::{Dovecot, DovecotOptions};
pub use memcached::Memcached;
pub use nginx::Nginx;
pub use pki::{Pki, replace};
pub use poll::eventually;
pub use process::{Guard, free_port, free_ports, wait_for_port};
