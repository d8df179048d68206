//! CPU priority of pooled VMs. Filling the pool is background work: the refill workers run, and
//! start their VMMs, at nice [`REFILL_NICE`] (a process inherits the nice value of the thread
//! that forks it, and every thread of the VMM that of its creator), so on a busy host the
//! refill yields the cores to the request path instead of competing with it. A VM leaving the
//! pool for a lease is raised back to normal priority before its guest runs; a released one is
//! lowered to [`REAP_NICE`] before its teardown.

use std::io;

/// Nice value of the refill workers and of the VMMs they start.
pub const REFILL_NICE: i32 = 10;
/// Nice value of a released VMM while it shuts down: background work like the refill, not
/// lower (a teardown starved by other background work keeps its memory and network longer).
pub const REAP_NICE: i32 = REFILL_NICE;

/// Sets the nice value of the calling thread (Linux: nice is per thread) to `nice`.
pub fn set_this_thread(nice: i32) -> io::Result<()> {
    set(0, nice)
}

/// Sets the nice value of every thread of process `pid` and of its children (a jailed VMM is
/// the child of its keeper) (leasing: 0; reaping: [`REAP_NICE`]). Raising needs
/// `CAP_SYS_NICE` (the pool runs as root).
pub fn set_process(pid: u32, nice: i32) -> io::Result<()> {
    set_tree(pid, nice, 2)
}

fn set_tree(pid: u32, nice: i32, depth: u32) -> io::Result<()> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?;
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<libc::id_t>().ok())
        else {
            continue;
        };
        match set(tid, nice) {
            // A thread that ended meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            r => r?,
        }
        if depth == 0 {
            continue;
        }
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
            match set_tree(child, nice, depth - 1) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                r => r?,
            }
        }
    }
    Ok(())
}

fn set(tid: libc::id_t, nice: i32) -> io::Result<()> {
    // SAFETY: setpriority(2) with plain integer arguments; on Linux PRIO_PROCESS with a thread
    // id (0: the caller) sets that one thread's nice value.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice_of(tid: u32) -> i32 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        // Field 19 (nice), counted after the parenthesised command name.
        let after = stat.rsplit(')').next().unwrap();
        after.split_whitespace().nth(16).unwrap().parse().unwrap()
    }

    #[test]
    fn a_lowered_thread_passes_its_nice_value_to_the_threads_it_starts_and_can_be_raised() {
        std::thread::spawn(|| {
            set_this_thread(REFILL_NICE).unwrap();
            // SAFETY: gettid has no preconditions.
            let me = unsafe { libc::gettid() } as u32;
            assert_eq!(nice_of(me), REFILL_NICE);
            let (tx, rx) = std::sync::mpsc::channel();
            let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
            let h = std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                tx.send(unsafe { libc::gettid() } as u32).unwrap();
                done_rx.recv().unwrap();
            });
            let tid = rx.recv().unwrap();
            assert_eq!(nice_of(tid), REFILL_NICE, "inherited from its creator");
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } == 0 {
                set_process(std::process::id(), 0).unwrap();
                assert_eq!(nice_of(tid), 0);
                assert_eq!(nice_of(me), 0);
            }
            done_tx.send(()).unwrap();
            h.join().unwrap();
        })
        .join()
        .unwrap();
    }
}
