//! The pool's threads: refill workers, the monitor and the reaper.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use vmm_api::ControlClient;

use crate::sandbox::TemplateStatus;

use super::*;

/// A refill thread: starts the VM the most-lacking pool needs (warm before shells on a tie),
/// one at a time, with an exponential backoff per template after failures.
/// How long the refill waits after an acquire before making a VM (unless the template has no
/// ready VM left).
pub(super) const REFILL_QUIET: Duration = Duration::from_millis(25);

pub(super) fn refill_loop(s: &Shared) {
    // Background work: this thread and the VMMs it starts yield to the request path.
    if let Err(e) = crate::priority::set_this_thread(crate::priority::REFILL_NICE) {
        tracing::warn!("lowering the refill worker's priority: {e}");
    }
    let mut st = s.lock();
    loop {
        if st.stopping {
            return;
        }
        let now = Instant::now();
        let job = st
            .templates
            .values_mut()
            .filter(|e| e.info.status == TemplateStatus::Ready && e.retry_at <= now)
            .flat_map(|e| {
                let warm = e
                    .targets
                    .warm
                    .saturating_sub(e.warm.len() + e.starting_warm);
                let shells = e
                    .targets
                    .shells
                    .saturating_sub(e.shells.len() + e.starting_shells);
                [
                    (warm, 1u8, e.info.name.clone(), true, e.targets.network),
                    (shells, 0, e.info.name.clone(), false, None),
                ]
            })
            .filter(|j| j.0 > 0)
            .max_by_key(|j| (j.0, j.1));
        let Some((_, _, name, warm, network)) = job else {
            st = s
                .wake
                .wait_timeout(st, MONITOR_PERIOD)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            continue;
        };
        // Right after an acquire the new lease's guest is starting and more acquires of a
        // burst may be arriving: making a VM now would take the cores from them. Wait a
        // moment, as long as the template has a ready VM left to serve the next acquire.
        let quiet = st.last_acquire.map(|t| t + REFILL_QUIET);
        if let Some(quiet) = quiet.filter(|q| now < *q) {
            let ready = st
                .templates
                .get(&name)
                .is_some_and(|e| !e.warm.is_empty() || !e.shells.is_empty());
            if ready {
                st = s
                    .wake
                    .wait_timeout(st, quiet - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                continue;
            }
        }
        let e = st.templates.get_mut(&name).expect("just found");
        if warm {
            e.starting_warm += 1;
        } else {
            e.starting_shells += 1;
        }
        let t = e.template.clone().expect("a ready template has files");
        drop(st);
        let made = s.make_pooled(&t, warm, network);
        st = s.lock();
        let stopping = st.stopping;
        let Some(e) = st.templates.get_mut(&name) else {
            if let Ok(vm) = made {
                let _ = s.reap.send(Reap::Vm(vm));
            }
            continue;
        };
        let (list, target) = if warm {
            e.starting_warm -= 1;
            (&mut e.warm, e.targets.warm)
        } else {
            e.starting_shells -= 1;
            (&mut e.shells, e.targets.shells)
        };
        match made {
            Ok(vm) if !stopping && list.len() < target => {
                list.push(vm);
                e.failures = 0;
                s.counters.refilled.fetch_add(1, Ordering::Relaxed);
            }
            Ok(vm) => {
                let _ = s.reap.send(Reap::Vm(vm));
            }
            Err(err) => {
                e.failures += 1;
                let backoff = Duration::from_millis(100)
                    .saturating_mul(1 << e.failures.min(10))
                    .min(MAX_BACKOFF);
                e.retry_at = Instant::now() + backoff;
                s.counters.refill_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("refilling {name}: {err} (retry in {backoff:?})");
            }
        }
    }
}

/// The monitor: notices dead VMMs and expired TTLs every [`MONITOR_PERIOD`].
pub(super) fn monitor_loop(s: &Shared) {
    let mut recorded = Vec::new();
    loop {
        let mut st = s.lock();
        if st.stopping {
            return;
        }
        let mut died = 0;
        for e in st.templates.values_mut() {
            for list in [&mut e.shells, &mut e.warm] {
                let before = list.len();
                list.retain_mut(|vm| vm.try_wait().is_none());
                died += before - list.len();
            }
        }
        let now = Instant::now();
        let mut expired = Vec::new();
        for (id, l) in st.sandboxes.iter_mut() {
            if l.deadline.is_some_and(|d| d <= now) {
                expired.push(id.clone());
                continue;
            }
            let dead = match &mut l.vm {
                LeasedVm::Owned(vm) => vm.try_wait().is_some(),
                LeasedVm::Adopted { pid, .. } => !pid_alive(*pid),
                LeasedVm::Gone => false,
            };
            if dead {
                died += 1;
                l.info.state = SandboxState::Dead;
                tracing::warn!("sandbox {id}: its VMM (pid {}) died", l.info.pid);
                // An exited VMM: dropping the handle waits nothing and removes its socket.
                let _ = s.reap.send(Reap::Files(info_files(&l.info)));
                l.vm = LeasedVm::Gone;
            }
        }
        for id in expired {
            if let Some(l) = st.sandboxes.remove(&id) {
                s.counters.expired.fetch_add(1, Ordering::Relaxed);
                tracing::info!("sandbox {id}: TTL expired");
                s.reap_leased(l);
            }
        }
        let record = s.record.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let json = record.as_ref().map(|_| {
            let live: Vec<&SandboxInfo> = st.sandboxes.values().map(|l| &l.info).collect();
            serde_json::to_vec_pretty(&live).expect("sandboxes serialize")
        });
        drop(st);
        if let (Some(path), Some(json)) = (record, json) {
            if json != recorded {
                let tmp = path.with_extension("json.tmp");
                match std::fs::write(&tmp, &json).and_then(|()| std::fs::rename(&tmp, &path)) {
                    Ok(()) => recorded = json,
                    Err(e) => tracing::warn!("recording sandboxes in {}: {e}", path.display()),
                }
            }
        }
        if died > 0 {
            s.counters
                .vm_deaths
                .fetch_add(died as u64, Ordering::Relaxed);
            s.wake.notify_all();
        }
        std::thread::sleep(MONITOR_PERIOD);
    }
}

/// The reaper: shuts VMs down and removes their files, off every request path.
pub(super) fn reaper_loop(s: &Shared, rx: Receiver<Reap>) {
    let run = &s.cfg.run_dir;
    // Files first, then whatever the VMM they belong to left (its directory, jail root and
    // cgroup when jailed), found from the `vm-*` names.
    let remove = |files: &[PathBuf]| {
        for f in files {
            let _ = std::fs::remove_file(f);
        }
        let mut names: Vec<String> = files
            .iter()
            .filter_map(|f| f.file_stem()?.to_str().map(str::to_owned))
            .filter(|n| n.starts_with("vm-"))
            .collect();
        names.sort();
        names.dedup();
        for n in names {
            crate::shell::remove_leftovers(run, &n);
        }
    };
    while let Ok(job) = rx.recv() {
        match job {
            Reap::Vm(mut vm) => {
                let paths = s.vm_paths(&vm);
                // Its teardown (unmapping guest memory, closing the VM) yields to live VMs.
                let _ = crate::priority::set_process(vm.pid(), crate::priority::REAP_NICE);
                let _ = vm.client().set_timeout(REAP_TIMEOUT);
                let _ = vm.shutdown();
                remove(&[paths.log, paths.vsock]);
            }
            Reap::Adopted(info, net) => {
                if let Ok(mut c) = ControlClient::connect(&info.control, REAP_TIMEOUT) {
                    let _ = c.set_timeout(REAP_TIMEOUT);
                    let _ = c.shutdown();
                }
                let deadline = Instant::now() + REAP_TIMEOUT;
                while pid_alive(info.pid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                remove(&info_files(&info));
                // After the VMM: its TAP is in the namespace this removes.
                drop(net);
            }
            Reap::Files(files) => remove(&files),
            Reap::Stop => return,
        }
    }
}
