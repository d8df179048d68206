//! Measures what the order of VM setup costs on this host (issue: the first memslot of a VM
//! waits ~7.5 ms once an in-kernel irqchip exists). For each variant, the median wall time of
//! setup (VM, irqchip, memslot, one vCPU) and of teardown (closing the fds), over 20 VMs:
//!
//! - `irqchip_first`: TSS, `KVM_CREATE_IRQCHIP`, PIT, memslot (what runv did);
//! - `memslot_first`: TSS, memslot, `KVM_CREATE_IRQCHIP`, PIT (what runv does now);
//! - `split_irqchip`: `KVM_CAP_SPLIT_IRQCHIP` (userspace IOAPIC/PIC, no PIT), memslot.
//!
//! `cargo run --release -p vmm --example irqchip_order`

use std::time::{Duration, Instant};

use kvm_bindings::{kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::Kvm;

const MEM: usize = 256 << 20;

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

fn main() {
    let kvm = Kvm::new().expect("/dev/kvm");
    // SAFETY: a fresh anonymous private mapping, owned here and never unmapped while VMs use it.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(host, libc::MAP_FAILED);
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM as u64,
        userspace_addr: host as u64,
    };
    for variant in ["irqchip_first", "memslot_first", "split_irqchip"] {
        let (mut setup, mut teardown) = (Vec::new(), Vec::new());
        for _ in 0..20 {
            let t0 = Instant::now();
            let vm = kvm.create_vm().expect("KVM_CREATE_VM");
            let pit = || {
                vm.create_pit2(kvm_pit_config::default())
                    .expect("KVM_CREATE_PIT2")
            };
            // SAFETY: the region is a live mapping that outlives every VM of this loop.
            let memslot = || unsafe { vm.set_user_memory_region(region) }.expect("memslot");
            match variant {
                "irqchip_first" => {
                    vm.set_tss_address(0xfffb_d000).unwrap();
                    vm.create_irq_chip().unwrap();
                    pit();
                    memslot();
                }
                "memslot_first" => {
                    vm.set_tss_address(0xfffb_d000).unwrap();
                    memslot();
                    vm.create_irq_chip().unwrap();
                    pit();
                }
                _ => {
                    let mut cap = kvm_enable_cap {
                        cap: kvm_bindings::KVM_CAP_SPLIT_IRQCHIP,
                        ..Default::default()
                    };
                    cap.args[0] = 24;
                    vm.enable_cap(&cap).expect("KVM_CAP_SPLIT_IRQCHIP");
                    memslot();
                }
            }
            let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
            setup.push(t0.elapsed());
            let t1 = Instant::now();
            drop(vcpu);
            drop(vm);
            teardown.push(t1.elapsed());
        }
        println!(
            "{variant:14} setup {:6.2} ms  teardown {:6.2} ms  (medians of 20)",
            median(setup),
            median(teardown)
        );
    }
}
