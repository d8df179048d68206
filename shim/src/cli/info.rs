//! list, features and spec.

use std::path::Path;

use anyhow::{bail, Context, Result};
use shim::state::ContainerDir;

use crate::Cli;

/// `runv list`.
pub fn list(cli: &Cli, format: &str, quiet: bool) -> Result<()> {
    let mut records = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&cli.root) {
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if shim::id::validate(&id).is_err() {
                continue;
            }
            if let Ok(r) = ContainerDir::new(&cli.root, &id).load() {
                records.push(r);
            }
        }
    }
    records.sort_by(|a, b| a.id.cmp(&b.id));
    match format {
        "json" => {
            let v: Vec<_> = records.iter().map(|r| r.oci_state()).collect();
            println!("{}", serde_json::to_string(&v)?);
        }
        "table" if quiet => records.iter().for_each(|r| println!("{}", r.id)),
        "table" => {
            println!("ID\tPID\tSTATUS\tBUNDLE\tCREATED\tOWNER");
            for r in &records {
                let s = r.oci_state();
                println!(
                    "{}\t{}\t{}\t{}\t{}\troot",
                    r.id,
                    s["pid"],
                    r.status().name(),
                    r.bundle.display(),
                    r.created
                );
            }
        }
        other => bail!("unknown --format {other:?}: use table or json"),
    }
    Ok(())
}

/// `runv features`: what runv supports, in runc's format.
pub fn features(cli: &Cli) -> Result<()> {
    let v = serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.2.0",
        "hooks": [],
        "mountOptions": ["bind", "rbind", "ro", "rw", "nosuid", "suid", "nodev", "dev",
            "noexec", "exec", "private", "rprivate", "shared", "rshared", "slave", "rslave",
            "relatime", "norelatime", "strictatime", "nostrictatime", "noatime", "atime"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts"],
            "capabilities": ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH",
                "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID", "CAP_SETUID",
                "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
                "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK",
                "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
                "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
                "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG",
                "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL",
                "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG",
                "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON",
                "CAP_BPF", "CAP_CHECKPOINT_RESTORE"],
            "cgroup": {"v1": true, "v2": true, "systemd": false, "systemdUser": false},
            "seccomp": {
                "enabled": true,
                "actions": ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL",
                    "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_LOG",
                    "SCMP_ACT_TRAP"],
                "operators": ["SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_LE",
                    "SCMP_CMP_LT", "SCMP_CMP_MASKED_EQ", "SCMP_CMP_NE"],
                "archs": ["SCMP_ARCH_X86_64"]
            },
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        },
        "annotations": {
            "io.github.runv.sandbox": cli.sandbox,
            "runv.sandbox.backends": "host,vm"
        }
    });
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

/// `runv spec`: writes a default config.json (never over an existing one).
pub fn spec(bundle: &Path) -> Result<()> {
    let path = bundle.join("config.json");
    if path.exists() {
        bail!("{} exists: remove it first", path.display());
    }
    let mut s = oci_spec::runtime::Spec::default();
    if let Some(mut p) = s.process().clone() {
        p.set_terminal(Some(true));
        s.set_process(Some(p));
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&s)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
