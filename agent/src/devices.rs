//! `linux.resources.devices`: the spec's device cgroup rules, validated, plus runc's default
//! allowed devices, as lines for the cgroup v1 `devices` controller.
//!
//! As runc, the spec's rules come first and the defaults (`/dev/null`, `zero`, `full`,
//! `random`, `urandom`, `tty`, `ptmx`, `pts/*`, and mknod of any device) are appended; each rule
//! is written in order to `devices.allow` or `devices.deny`. cgroup v2 needs an eBPF program,
//! which this agent does not build: there, rules beyond the default policy are refused.

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType, Spec};

/// A spec's device rules the agent cannot apply.
#[derive(Debug, thiserror::Error)]
#[error("linux.resources.devices: {0}")]
pub struct DeviceRuleError(String);

/// One rule: allow or deny `type major:minor access`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRule {
    /// Allow (`devices.allow`) or deny (`devices.deny`).
    pub allow: bool,
    /// `a`, `c` or `b`.
    pub typ: char,
    /// Major number; None for any.
    pub major: Option<i64>,
    /// Minor number; None for any.
    pub minor: Option<i64>,
    /// Some of `r`, `w`, `m`.
    pub access: String,
}

impl DeviceRule {
    /// The cgroup v1 file this rule is written to.
    pub fn file(&self) -> &'static str {
        if self.allow {
            "devices.allow"
        } else {
            "devices.deny"
        }
    }

    /// The v1 line: `c 1:3 rwm`, `a`.
    pub fn line(&self) -> String {
        if self.typ == 'a' {
            return "a".into();
        }
        let n = |v: Option<i64>| v.map_or("*".to_string(), |v| v.to_string());
        format!(
            "{} {}:{} {}",
            self.typ,
            n(self.major),
            n(self.minor),
            self.access
        )
    }

    fn is_deny_all(&self) -> bool {
        !self.allow && self.typ == 'a'
    }
}

/// runc's default allowed devices.
pub fn default_allowed() -> Vec<DeviceRule> {
    [
        ('c', None, None, "m"),
        ('b', None, None, "m"),
        ('c', Some(1), Some(3), "rwm"),
        ('c', Some(1), Some(8), "rwm"),
        ('c', Some(1), Some(7), "rwm"),
        ('c', Some(5), Some(0), "rwm"),
        ('c', Some(1), Some(5), "rwm"),
        ('c', Some(1), Some(9), "rwm"),
        ('c', Some(136), None, "rwm"),
        ('c', Some(5), Some(2), "rwm"),
    ]
    .into_iter()
    .map(|(typ, major, minor, access)| DeviceRule {
        allow: true,
        typ,
        major,
        minor,
        access: access.into(),
    })
    .collect()
}

fn rule(d: &LinuxDeviceCgroup) -> Result<DeviceRule, DeviceRuleError> {
    let typ = match d.typ().unwrap_or(LinuxDeviceType::A) {
        LinuxDeviceType::A => 'a',
        LinuxDeviceType::C | LinuxDeviceType::U => 'c',
        LinuxDeviceType::B => 'b',
        LinuxDeviceType::P => {
            return Err(DeviceRuleError(
                "type p (FIFO) is not a device cgroup type: remove the rule".into(),
            ))
        }
    };
    let access = d.access().clone().unwrap_or_else(|| "rwm".into());
    if access.is_empty() || !access.chars().all(|c| matches!(c, 'r' | 'w' | 'm')) {
        return Err(DeviceRuleError(format!(
            "access {access:?} must be some of r, w, m"
        )));
    }
    for n in [d.major(), d.minor()].into_iter().flatten() {
        if n < -1 {
            return Err(DeviceRuleError(format!("device number {n} is negative")));
        }
    }
    let num = |v: Option<i64>| v.filter(|n| *n >= 0);
    let (major, minor) = (num(d.major()), num(d.minor()));
    let full = access.contains('r') && access.contains('w') && access.contains('m');
    if typ == 'a' && (major.is_some() || minor.is_some() || !full) {
        return Err(DeviceRuleError(format!(
            "a type-a rule covers every device with rwm; {major:?}:{minor:?} {access} cannot be expressed: use type c or b"
        )));
    }
    Ok(DeviceRule {
        allow: d.allow(),
        typ,
        major,
        minor,
        access,
    })
}

/// The rules to apply for `spec`, defaults appended; empty when the spec has none (devices
/// stay as the parent cgroup allows, as with runc).
pub fn rules_from_spec(spec: &Spec) -> Result<Vec<DeviceRule>, DeviceRuleError> {
    let Some(devs) = spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.devices().as_ref())
        .filter(|d| !d.is_empty())
    else {
        return Ok(Vec::new());
    };
    let mut rules: Vec<DeviceRule> = devs.iter().map(rule).collect::<Result<_, _>>()?;
    rules.extend(default_allowed());
    Ok(rules)
}

/// Whether `rules` only express the default policy (deny all but the default devices), which
/// needs no enforcement beyond the device nodes the agent binds into /dev.
pub fn is_default_policy(rules: &[DeviceRule]) -> bool {
    let defaults = default_allowed();
    rules
        .iter()
        .all(|r| r.is_deny_all() || defaults.contains(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(devices: serde_json::Value) -> Spec {
        let mut v = serde_json::to_value(Spec::default()).unwrap();
        v["linux"]["resources"]["devices"] = devices;
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn runc_default_is_deny_all_then_defaults() {
        let r = rules_from_spec(&spec(
            serde_json::json!([{"allow": false, "access": "rwm"}]),
        ))
        .unwrap();
        let lines: Vec<String> = r
            .iter()
            .map(|r| format!("{} {}", r.file(), r.line()))
            .collect();
        assert_eq!(lines[0], "devices.deny a");
        assert!(
            lines.contains(&"devices.allow c 1:3 rwm".to_string()),
            "{lines:?}"
        );
        assert!(lines.contains(&"devices.allow c 136:* rwm".to_string()));
        assert!(lines.contains(&"devices.allow c *:* m".to_string()));
        assert!(is_default_policy(&r));
        assert!(rules_from_spec(&spec(serde_json::json!([])))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn specific_rules_are_kept_in_order_and_are_not_default() {
        let r = rules_from_spec(&spec(serde_json::json!([
            {"allow": false, "access": "rwm"},
            {"allow": true, "type": "c", "major": 10, "minor": 229, "access": "rw"},
            {"allow": false, "type": "b", "major": 8, "access": "m"}
        ])))
        .unwrap();
        assert_eq!(r[1].line(), "c 10:229 rw");
        assert_eq!(
            (r[2].file(), r[2].line().as_str()),
            ("devices.deny", "b 8:* m")
        );
        assert!(!is_default_policy(&r));
    }

    #[test]
    fn rules_v1_cannot_express_are_refused() {
        for bad in [
            serde_json::json!([{"allow": true, "type": "c", "major": 1, "access": "rwx"}]),
            serde_json::json!([{"allow": false, "type": "a", "major": 1, "access": "rwm"}]),
            serde_json::json!([{"allow": false, "access": "r"}]),
            serde_json::json!([{"allow": true, "type": "p", "access": "rwm"}]),
            serde_json::json!([{"allow": true, "type": "c", "major": -5, "access": "rwm"}]),
        ] {
            assert!(rules_from_spec(&spec(bad.clone())).is_err(), "{bad}");
        }
    }
}
