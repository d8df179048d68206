//! Placeholder: this crate is filled by a later issue (see README "Status").

pub mod image;
