//! `containerd-shim-runv-v2`: the containerd runtime v2 shim for runv (`io.containerd.runv.v2`).
//! See `shim::containerd`.

fn main() {
    containerd_shim::run::<shim::containerd::Shim>(shim::containerd::RUNTIME, None);
}
