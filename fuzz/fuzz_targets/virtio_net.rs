//! virtio-net queue processing (rx, tx) with fuzzed guest memory: descriptor chains, virtio-net
//! headers (offloads, GSO fields), buffer sizes for mergeable receive buffers and lengths all
//! come from the input, on one of [`DEVICES`] devices activated with different negotiated
//! features (activation sets the TAP's offloads, which waits on the kernel: once per device, not
//! per input). The TAPs live in a network namespace of the fuzzing process's own (gone with it),
//! are up, and receive up to three frames from the input through a packet socket before each
//! run, so the receive path (frames split across the guest's buffers) is driven too.
#![no_main]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::fuzzing::{drive, features_from, HEADER};
use vmm::devices::virtio::net::Net;
use vmm::devices::virtio::VirtioDevice;

/// Devices, each with its own TAP and feature set.
const DEVICES: usize = 8;

/// Feature picks ([`features_from`]) of the devices: none, all, and mixes.
const PICKS: [u16; DEVICES] = [0, 0xffff, 0x5555, 0xaaaa, 0x0f0f, 0xf0f0, 0x3333, 0xcccc];

struct Device {
    dev: Net,
    ifindex: i32,
}

struct Rig {
    devices: Vec<Device>,
    /// AF_PACKET socket: what it sends on a TAP, that TAP's device reads.
    inject: OwnedFd,
}

static RIG: Mutex<Option<Rig>> = Mutex::new(None);

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("running ip (iproute2)");
    assert!(st.success(), "ip {args:?} failed");
}

fn rig() -> Rig {
    // SAFETY: unshare(2) with a flag constant; moves this thread (the one libFuzzer runs inputs
    // on) and the processes it starts into a fresh network namespace.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare(CLONE_NEWNET): fuzz as root");
    let devices = PICKS
        .iter()
        .enumerate()
        .map(|(i, &pick)| {
            let tap = format!("rvfuzz{i}");
            ip(&["tuntap", "add", "dev", &tap, "mode", "tap"]);
            ip(&["link", "set", &tap, "up"]);
            let mut dev = Net::new(&tap, [2, 0, 0, 0, 0, 1 + i as u8]).expect("the net device");
            let offered = dev.features();
            dev.activate(features_from(offered, pick));
            let name = std::ffi::CString::new(tap).unwrap();
            // SAFETY: a valid NUL-terminated string.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
            Device { dev, ifindex }
        })
        .collect();
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    assert!(fd >= 0, "AF_PACKET socket");
    // SAFETY: fd is a socket we just opened and own.
    let inject = unsafe { OwnedFd::from_raw_fd(fd) };
    Rig { devices, inject }
}

/// Sends up to three frames taken from the input after the queue header out through the TAP,
/// so that the device has something to receive.
fn inject(inject: &OwnedFd, ifindex: i32, data: &[u8]) {
    let Some(rest) = data.get(HEADER + 1..) else {
        return;
    };
    let Some((&count, mut rest)) = rest.split_first() else {
        return;
    };
    for _ in 0..count % 4 {
        let Some((&len, tail)) = rest.split_first() else {
            return;
        };
        // 14..=1514 bytes: an Ethernet header at least, an MTU's frame at most.
        let len = (14 + usize::from(len) * 6).min(1514).min(tail.len());
        if len < 14 {
            return;
        }
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = ifindex;
        to.sll_halen = 6;
        // SAFETY: sendto(2) from a slice we hold, to an address we own, with their lengths.
        unsafe {
            libc::sendto(
                inject.as_raw_fd(),
                tail.as_ptr().cast(),
                len,
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        rest = &tail[len..];
    }
}

fuzz_target!(|data: &[u8]| {
    let mut guard = RIG.lock().unwrap_or_else(|p| p.into_inner());
    let rig = guard.get_or_insert_with(rig);
    let which = data.get(HEADER).map_or(0, |b| usize::from(*b) % DEVICES);
    let d = &mut rig.devices[which];
    inject(&rig.inject, d.ifindex, data);
    drive(&mut d.dev, data);
});
