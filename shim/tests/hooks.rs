//! The clone hooks against a real `runv-agent` (a host process, so no PID 1): all hooks go out
//! before the first answer is read, and the first refusal in hook order is the one reported
//! (root and busybox-static needed, otherwise a loud SKIPPED line). Its own binary: it sets
//! `RUNV_AGENT` for the host sandbox it launches.

mod common;

use std::time::Duration;

use protocol::{Request, Response};
use shim::sandbox::host::HostSandbox;
use shim::sandbox::vm::{Hooks, VmError};
use shim::sandbox::Sandbox;
use shim::state::ContainerDir;

#[test]
fn pipelined_hooks_report_the_first_refusal_and_keep_the_connection() {
    let test = "pipelined_hooks_report_the_first_refusal_and_keep_the_connection";
    if common::rootfs(test).is_none() {
        return;
    }
    // This binary's only test: nothing else reads the environment meanwhile.
    std::env::set_var("RUNV_AGENT", common::agent());
    let root = tempfile::tempdir().unwrap();
    let dir = ContainerDir::new(root.path(), "hooks");
    std::fs::create_dir_all(&dir.path).unwrap();
    let mut sb = HostSandbox::launch(&dir).unwrap();
    let mut client = sb.client().unwrap();

    // reseed is done (root), set_clock and set_hostname need PID 1: set_clock, the first
    // refused, is named.
    let hooks = Hooks::fresh(Some("hooked".into())).unwrap();
    match hooks.run(&mut client) {
        Err(VmError::Hook(op, why)) => {
            assert_eq!(op, "set_clock", "{why}");
            assert!(why.contains("PID 1"), "{why}");
        }
        other => panic!("hooks against a host agent: {other:?}"),
    }
    // The answer to set_hostname, sent in the same batch, does not confuse the next call.
    match client.call_timeout(&Request::Ping, Duration::from_secs(5)) {
        Ok(Response::Pong { .. }) => {}
        other => panic!("ping after the hooks: {other:?}"),
    }
    sb.shutdown();
}
