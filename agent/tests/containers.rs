//! Real containers run by a real `runv-agent` process on this host.

mod common;

use common::*;

#[test]
fn echo_exit_code_and_signal_death() {
    let Some(root) = rootfs("echo_exit_code_and_signal_death") else {
        return;
    };
    let agent = Agent::start();
    let mut c = agent.client();
    let (out, _, st) = run(&mut c, "echo", spec(&["echo", "hello"]), &root);
    assert_eq!((out.as_str(), st.code), ("hello\n", 0));
    let (_, _, st) = run(&mut c, "seven", spec(&["sh", "-c", "exit 7"]), &root);
    assert_eq!((st.code, st.signal), (7, None));
}
