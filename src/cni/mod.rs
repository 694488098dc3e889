//! The CNI protocol: commands, environment, versions, and what goes to stdout.

pub mod go_json;
pub mod prev_result;

use crate::error::{code, Error, Result};
use serde_json::json;
use std::io::Write;

pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const LATEST_VERSION: &str = "1.1.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

impl Command {
    pub fn parse(s: &str) -> Result<Command> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            other => return Err(Error::new(code::INVALID_ENV, format!("CNI_COMMAND: unknown command {other:?}"))),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Gc => "GC",
            Command::Status => "STATUS",
        }
    }

    /// The first spec version that defines the command.
    fn since(self) -> &'static str {
        match self {
            Command::Check => "0.4.0",
            Command::Gc | Command::Status => "1.1.0",
            _ => "0.3.0",
        }
    }
}

/// The `CNI_*` variables of one invocation, validated for the command.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub path: String,
    /// The pod this attachment belongs to, from `CNI_ARGS`, when the runtime names it.
    pub pod: Option<Pod>,
}

/// A pod as kubelet runtimes and Multus name it in `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for Pod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The pod named by `CNI_ARGS` (`K=V;K=V`). Other keys are other plugins' business, and a pair we
/// cannot read is skipped rather than refused: the runtime passes the same args to every plugin.
/// A key given twice keeps its last value, as libcni's own parser does.
pub fn pod_from_args(args: &str) -> Option<Pod> {
    let (mut namespace, mut name) = (None, None);
    for (k, v) in args.split(';').filter_map(|kv| kv.split_once('=')) {
        match k.trim() {
            "K8S_POD_NAMESPACE" => namespace = Some(v.trim()),
            "K8S_POD_NAME" => name = Some(v.trim()),
            _ => {}
        }
    }
    match (namespace, name) {
        (Some(ns), Some(n)) if !ns.is_empty() && !n.is_empty() => {
            Some(Pod { namespace: ns.to_string(), name: n.to_string() })
        }
        _ => None,
    }
}

impl Env {
    /// Read and validate the variables the command needs, from a lookup function so tests need not
    /// touch the process environment.
    pub fn read(cmd: Command, var: impl Fn(&str) -> Option<String>) -> Result<Env> {
        let get = |name: &str| var(name).unwrap_or_default();
        let env = Env {
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            path: get("CNI_PATH"),
            pod: pod_from_args(&get("CNI_ARGS")),
        };
        let per_attachment = matches!(cmd, Command::Add | Command::Del | Command::Check);
        if per_attachment {
            validate_container_id(&env.container_id)?;
            validate_ifname(&env.ifname).map_err(|e| e.context("CNI_IFNAME"))?;
            if env.netns.is_empty() && cmd != Command::Del {
                return Err(Error::new(code::INVALID_ENV, "CNI_NETNS is required for ADD and CHECK"));
            }
            // DEL must succeed for a container that is already gone; ADD and CHECK must not.
            if cmd != Command::Del && !std::path::Path::new(&env.netns).exists() {
                return Err(Error::new(
                    code::CONTAINER_UNKNOWN,
                    format!("CNI_NETNS {:?} does not exist: the container is gone", env.netns),
                ));
            }
        }
        if env.path.is_empty() && cmd != Command::Version {
            return Err(Error::new(code::INVALID_ENV, "CNI_PATH is required"));
        }
        Ok(env)
    }
}

/// The spec's rule for container ids and network names: a letter or digit, then letters, digits,
/// '_', '.' and '-'. It also keeps them safe as file names and in firewall comments.
pub fn is_spec_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Container ids as the spec and the reference skel accept them.
pub fn validate_container_id(id: &str) -> Result<()> {
    if is_spec_name(id) {
        Ok(())
    } else {
        Err(Error::new(
            code::INVALID_ENV,
            format!("CNI_CONTAINERID {id:?} must start with a letter or digit and hold only letters, digits, '_', '.' and '-'"),
        ))
    }
}

/// Interface names as the kernel accepts them (dev_valid_name).
pub fn validate_ifname(name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if bad {
        Err(Error::new(
            code::INVALID_ENV,
            format!("interface name {name:?} is not one the kernel accepts (1-15 bytes, no '/', ':' or spaces)"),
        ))
    } else {
        Ok(())
    }
}

pub fn is_supported(version: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&version)
}

/// Compare dotted versions numerically.
pub fn version_at_least(version: &str, min: &str) -> bool {
    fn parts(v: &str) -> Vec<u32> {
        v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
    }
    parts(version) >= parts(min)
}

/// Refuse a cniVersion this plugin does not speak, or a command the version does not define.
pub fn check_version(cmd: Command, version: &str) -> Result<()> {
    if !is_supported(version) {
        return Err(Error::new(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion {version:?} is not supported; supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    if !version_at_least(version, cmd.since()) {
        return Err(Error::new(
            code::INCOMPATIBLE_VERSION,
            format!("{} is not defined for cniVersion {version}; it needs {} or later", cmd.name(), cmd.since()),
        ));
    }
    Ok(())
}

/// The VERSION answer: echo the caller's version when we speak it, as the spec asks.
pub fn version_info(requested: Option<&str>) -> serde_json::Value {
    let version = requested.filter(|v| is_supported(v)).unwrap_or(LATEST_VERSION);
    json!({ "cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS })
}

pub fn error_json(err: &Error, version: &str) -> serde_json::Value {
    let mut v = json!({ "cniVersion": version, "code": err.code, "msg": err.msg });
    if !err.details.is_empty() {
        v["details"] = json!(err.details);
    }
    v
}

/// The only writer to stdout.
pub fn write_stdout(value: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, value);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

pub fn about() -> String {
    format!(
        "CNI bridge-nat plugin v{}\nCNI protocol versions supported: {}",
        env!("CARGO_PKG_VERSION"),
        SUPPORTED_VERSIONS.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn check_needs_0_4_0_and_gc_needs_1_1_0() {
        assert_eq!(check_version(Command::Check, "0.3.1").unwrap_err().code, 1);
        assert!(check_version(Command::Check, "0.4.0").is_ok());
        assert_eq!(check_version(Command::Gc, "1.0.0").unwrap_err().code, 1);
        assert_eq!(check_version(Command::Status, "0.4.0").unwrap_err().code, 1);
        assert!(check_version(Command::Gc, "1.1.0").is_ok());
        assert_eq!(check_version(Command::Add, "0.2.0").unwrap_err().code, 1);
        assert_eq!(check_version(Command::Add, "2.0.0").unwrap_err().code, 1);
    }

    #[test]
    fn version_info_echoes_supported_request() {
        assert_eq!(version_info(Some("0.4.0"))["cniVersion"], "0.4.0");
        assert_eq!(version_info(Some("9.9.9"))["cniVersion"], LATEST_VERSION);
        assert_eq!(version_info(None)["supportedVersions"].as_array().unwrap().len(), 5);
    }

    #[test]
    fn env_rejects_bad_container_id_and_ifname() {
        let e = Env::read(
            Command::Add,
            env_of(&[
                ("CNI_CONTAINERID", "a;rm -rf"),
                ("CNI_NETNS", "/proc/self/ns/net"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/b"),
            ]),
        )
        .unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("CNI_CONTAINERID"));
        let e = Env::read(
            Command::Add,
            env_of(&[
                ("CNI_CONTAINERID", "abc"),
                ("CNI_NETNS", "/proc/self/ns/net"),
                ("CNI_IFNAME", "eth0/1"),
                ("CNI_PATH", "/b"),
            ]),
        )
        .unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("CNI_IFNAME"));
    }

    #[test]
    fn env_requires_netns_except_for_del() {
        let vars = [("CNI_CONTAINERID", "abc"), ("CNI_IFNAME", "net1"), ("CNI_PATH", "/b")];
        assert_eq!(Env::read(Command::Add, env_of(&vars)).unwrap_err().code, 4);
        assert!(Env::read(Command::Del, env_of(&vars)).is_ok());
        assert!(Env::read(Command::Gc, env_of(&[("CNI_PATH", "/b")])).is_ok());
        assert_eq!(Env::read(Command::Gc, env_of(&[])).unwrap_err().code, 4);
    }

    #[test]
    fn version_comparison_is_numeric() {
        assert!(version_at_least("1.10.0", "1.9.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
    }

    #[test]
    fn pod_comes_from_cni_args_and_other_keys_are_ignored() {
        let pod = |ns: &str, n: &str| Some(Pod { namespace: ns.into(), name: n.into() });
        let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-7d9f;K8S_POD_INFRA_CONTAINER_ID=abc";
        assert_eq!(pod_from_args(args), pod("default", "web-7d9f"));
        // Podman names the container but no namespace: no pod.
        assert_eq!(pod_from_args("IgnoreUnknown=1;K8S_POD_NAME=web"), None);
        assert_eq!(pod_from_args("K8S_POD_NAME=a;garbage;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=b"), pod("ns", "b"));
        assert_eq!(pod_from_args("K8S_POD_NAMESPACE=;K8S_POD_NAME=web"), None);
        assert_eq!(pod_from_args(""), None);
        let vars = [("CNI_PATH", "/b"), ("CNI_ARGS", "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p")];
        assert_eq!(Env::read(Command::Gc, env_of(&vars)).unwrap().pod, pod("ns", "p"));
    }
}
