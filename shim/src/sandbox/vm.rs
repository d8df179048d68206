//! The `vm` backend (not yet implemented): a clone acquired from `runv-pool`
//! (`pool_manager::Pool`), its agent reached over vsock with `CONNECT <port>`, clone hooks
//! (`reseed`, `set_clock`, `set_hostname`) run before the container is created.

use super::SandboxError;

/// Whether a template to clone from is configured; until the pool integration lands there never
/// is one, so `create --sandbox vm` fails with a message naming `--sandbox host`.
pub fn preflight() -> Result<(), SandboxError> {
    Err(SandboxError::NoTemplate)
}
