//! Which of a sandbox VM's disk slots hold which container's root file system.
//!
//! A CRI pod is one VM holding all its containers, so every container needs a disk slot of its
//! own (`runv-slot0`, `runv-slot1`, ... up to the template's `slots`). This is bookkeeping only:
//! the caller attaches (`attach_disk`) after [`SlotTable::take`] and detaches before
//! [`SlotTable::free`].

/// Why no slot could be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    /// Every slot holds a container.
    #[error("pod {pod} uses all {slots} disk slots of template {template}; raise `slots` in the template (`runv-pool template build {template} ... --slots N`, at most 8)")]
    Full {
        /// The pod (the sandbox's first container).
        pod: String,
        /// How many the template has.
        slots: usize,
        /// The template.
        template: String,
    },
    /// The container already has a slot.
    #[error("container {0} already has disk slot {1}")]
    Taken(String, usize),
}

/// The owners of a VM's disk slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotTable {
    owners: Vec<Option<String>>,
}

impl SlotTable {
    /// A table of `slots` free slots.
    pub fn new(slots: usize) -> Self {
        Self {
            owners: vec![None; slots],
        }
    }

    /// How many slots the VM has.
    pub fn len(&self) -> usize {
        self.owners.len()
    }

    /// Whether the VM has no slots.
    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }

    /// The lowest free slot, now owned by `container`; `pod` and `template` name the error.
    pub fn take(&mut self, container: &str, pod: &str, template: &str) -> Result<usize, SlotError> {
        if let Some(slot) = self.slot_of(container) {
            return Err(SlotError::Taken(container.into(), slot));
        }
        let slot = self
            .owners
            .iter()
            .position(Option::is_none)
            .ok_or_else(|| SlotError::Full {
                pod: pod.into(),
                slots: self.owners.len(),
                template: template.into(),
            })?;
        self.owners[slot] = Some(container.into());
        Ok(slot)
    }

    /// The slot `container` owns, if any.
    pub fn slot_of(&self, container: &str) -> Option<usize> {
        self.owners
            .iter()
            .position(|o| o.as_deref() == Some(container))
    }

    /// Frees `slot` (a free or unknown slot is fine).
    pub fn free(&mut self, slot: usize) {
        if let Some(o) = self.owners.get_mut(slot) {
            *o = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_free_slot_per_container_and_a_clear_error_when_full() {
        let mut t = SlotTable::new(2);
        assert_eq!(t.take("pause", "pod1", "tpl"), Ok(0));
        assert_eq!(t.take("app", "pod1", "tpl"), Ok(1));
        assert_eq!(
            t.take("pause", "pod1", "tpl"),
            Err(SlotError::Taken("pause".into(), 0))
        );
        let full = t.take("side", "pod1", "tpl").unwrap_err();
        assert_eq!(
            full.to_string(),
            "pod pod1 uses all 2 disk slots of template tpl; raise `slots` in the template (`runv-pool template build tpl ... --slots N`, at most 8)"
        );
        t.free(t.slot_of("pause").unwrap());
        assert_eq!(t.slot_of("pause"), None);
        assert_eq!(t.take("side", "pod1", "tpl"), Ok(0));
        t.free(7);
        assert_eq!(t.len(), 2);
    }
}
