//! runv's guest agent and its host-side helpers.
//!
//! So far: [`initramfs`], the reproducible newc cpio builder the VMM's full-Linux test uses to
//! boot a kernel with a generated root file system.

pub mod initramfs;
