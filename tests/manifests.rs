//! The packaging: the systemd unit, the DaemonSet, its Containerfile, the example pod and the NAD.
//! Neither Kubernetes, systemd as PID 1 nor a container build can run here, so these tests read
//! each file and check that it names the right command, paths, volumes and capabilities.
//! No root needed.

use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const AGENT_ARGS: [&str; 4] = ["bridge-nat", "watch", "--state-dir", "/run/bridge-nat"];
const STATE_DIR: &str = "/run/bridge-nat";

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Every document of a YAML file, as JSON values (so `pointer` works); aliases are resolved.
fn yaml_docs(rel: &str) -> Vec<Value> {
    let text = read(rel);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{rel}: not valid YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn only_doc_of_kind(rel: &str, kind: &str) -> Value {
    let docs: Vec<Value> = yaml_docs(rel).into_iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(docs.len(), 1, "{rel}: expected exactly one {kind}");
    docs.into_iter().next().unwrap()
}

fn daemonset() -> Value {
    only_doc_of_kind("cni-conf/bridge-nat-agent.yaml", "DaemonSet")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().map(|s| s.as_str().expect("a string").to_string()).collect()).unwrap_or_default()
}

/// What the container runs: command then args.
fn argv(container: &Value) -> Vec<String> {
    let mut argv = strings(&container["command"]);
    argv.extend(strings(&container["args"]));
    argv
}

fn runs_agent(argv: &[String]) -> bool {
    argv.windows(AGENT_ARGS.len()).any(|w| w.iter().map(String::as_str).eq(AGENT_ARGS))
}

fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no entry named {name:?} in {list}"))
}

fn agent_container(ds: &Value) -> Value {
    let containers = ds.pointer("/spec/template/spec/containers").expect("containers").as_array().unwrap();
    let agents: Vec<&Value> = containers.iter().filter(|c| runs_agent(&argv(c))).collect();
    assert_eq!(agents.len(), 1, "exactly one container must run `{}`", AGENT_ARGS.join(" "));
    agents[0].clone()
}

/// mountPath -> host path, for the container's mounts of hostPath volumes.
fn host_mounts(ds: &Value, container: &Value) -> BTreeMap<String, String> {
    let volumes = ds.pointer("/spec/template/spec/volumes").expect("volumes");
    let mut out = BTreeMap::new();
    for m in container["volumeMounts"].as_array().expect("volumeMounts") {
        assert_ne!(m["readOnly"], true, "{m} must be writable");
        if let Some(path) = named(volumes, m["name"].as_str().unwrap()).pointer("/hostPath/path") {
            out.insert(m["mountPath"].as_str().unwrap().to_string(), path.as_str().unwrap().to_string());
        }
    }
    out
}

#[test]
fn daemonset_runs_the_agent_on_every_node_in_the_hosts_network() {
    let ds = daemonset();
    assert_eq!(ds["apiVersion"], "apps/v1");
    assert_eq!(ds.pointer("/metadata/namespace").unwrap(), "kube-system");
    let pod = &ds["spec"]["template"];
    for (k, v) in ds.pointer("/spec/selector/matchLabels").unwrap().as_object().unwrap() {
        assert_eq!(&pod["metadata"]["labels"][k], v, "the selector must match the pod's labels");
    }
    assert_eq!(pod["spec"]["hostNetwork"], true);
    let tolerations = pod["spec"]["tolerations"].as_array().expect("tolerations");
    assert!(
        tolerations.iter().any(|t| t["operator"] == "Exists" && t.get("key").is_none() && t.get("effect").is_none()),
        "a bare `operator: Exists` toleration, so no taint keeps the agent off a node"
    );

    let agent = agent_container(&ds);
    let sc = &agent["securityContext"];
    assert_ne!(sc["privileged"], true, "capabilities, not privileged");
    let added = strings(&sc["capabilities"]["add"]);
    for cap in ["NET_ADMIN", "NET_RAW"] {
        assert!(added.iter().any(|c| c == cap), "the agent needs {cap}: {added:?}");
    }
    if sc["readOnlyRootFilesystem"] == true && argv(&agent)[0] == "with-host-iptables" {
        let script = read("cni-conf/with-host-iptables.sh");
        let dir = script.split("${HOST_IPTABLES_DIR:-").nth(1).and_then(|s| s.split('}').next()).expect("default");
        let mounts: Vec<String> =
            agent["volumeMounts"].as_array().unwrap().iter().map(|m| m["mountPath"].as_str().unwrap().into()).collect();
        assert!(mounts.iter().any(|m| m == dir), "with-host-iptables writes {dir}: the root is read-only");
    }
}

#[test]
fn daemonset_shares_the_hosts_state_log_table_names_and_xtables_lock() {
    let ds = daemonset();
    let mounts = host_mounts(&ds, &agent_container(&ds));
    // Same path inside and out: records and configs name these paths.
    for path in [STATE_DIR, "/etc/iproute2", "/run/xtables.lock"] {
        assert_eq!(mounts.get(path).map(String::as_str), Some(path), "host {path} at {path}: {mounts:?}");
    }
    assert!(
        ["/var/log", "/var/log/bridge-nat.log"].iter().any(|p| mounts.get(*p).map(String::as_str) == Some(*p)),
        "the host's log at /var/log: {mounts:?}"
    );
}

#[test]
fn daemonset_serves_metrics_on_the_nodes_address_and_probes_healthz() {
    let ds = daemonset();
    let agent = agent_container(&ds);
    let argv = argv(&agent);
    let at = argv.iter().position(|a| a == "--metrics").expect("the agent serves metrics (--metrics)");
    let (host, port) = argv[at + 1].rsplit_once(':').expect("--metrics ADDR:PORT");
    let port: u64 = port.parse().expect("a port number");
    let ports = &agent["ports"];
    assert_eq!(named(ports, "metrics")["containerPort"], port, "the metrics port is declared: {ports}");
    // $(NODE_IP) is the node's address from the downward API, not an address of every uplink.
    let var = host.strip_prefix("$(").and_then(|v| v.strip_suffix(')')).expect("the address from an env var");
    assert_eq!(named(&agent["env"], var).pointer("/valueFrom/fieldRef/fieldPath").unwrap(), "status.hostIP");

    let probe = &agent["livenessProbe"];
    assert_eq!(probe.pointer("/httpGet/path").unwrap(), "/healthz", "{probe}");
    let probed = probe.pointer("/httpGet/port").unwrap();
    assert!(probed == "metrics" || *probed == port, "the probe asks the metrics port: {probe}");
    // /healthz fails after 180 s without a wake: the probe must not give up before the agent could.
    let patience = probe["periodSeconds"].as_u64().unwrap_or(10) * probe["failureThreshold"].as_u64().unwrap_or(3);
    assert!(patience >= 60, "the probe restarts the agent after {patience} s of failures");

    let annotations = ds.pointer("/spec/template/metadata/annotations").expect("scrape annotations");
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], port.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
}

#[test]
fn daemonset_init_container_installs_the_plugin_into_the_cni_bin_dir() {
    let ds = daemonset();
    let bin_dir = ds.pointer("/metadata/annotations/bridge-nat~1cni-bin-dir").and_then(Value::as_str);
    assert_eq!(bin_dir, Some("/opt/cni/bin"), "the one value to change, near the top");
    let top: String = read("cni-conf/bridge-nat-agent.yaml").split("\nspec:").next().unwrap().into();
    assert!(top.contains("/var/lib/rancher/k3s/data/cni"), "k3s's directory is documented beside the value");

    let inits = ds.pointer("/spec/template/spec/initContainers").and_then(Value::as_array).expect("initContainers");
    assert_eq!(inits.len(), 1);
    let init = &inits[0];
    assert_eq!(init["image"], agent_container(&ds)["image"], "the init container installs the agent's own binary");
    let into = host_mounts(&ds, init)
        .into_iter()
        .find(|(_, host)| host == "/opt/cni/bin")
        .map(|(mount, _)| mount)
        .expect("the init container mounts the host's CNI bin dir");
    let script = argv(init).join(" ");
    let binary = containerfile_binary();
    assert!(script.contains(&format!("{binary} {into}/bridge-nat.new")), "copies {binary} in: {script}");
    assert!(script.contains(&format!("mv -f {into}/bridge-nat.new {into}/bridge-nat")), "then renames: {script}");
}

/// Dockerfile instructions with continuation lines joined, comments dropped: (INSTRUCTION, rest).
fn containerfile() -> Vec<(String, String)> {
    let text = read("cni-conf/Containerfile").replace("\\\n", " ");
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (op, rest) = l.split_once(' ').unwrap_or((l, ""));
            (op.to_uppercase(), rest.trim().to_string())
        })
        .collect()
}

/// Where the runtime stage puts the binary built in the `build` stage.
fn containerfile_binary() -> String {
    let copy = containerfile()
        .into_iter()
        .find(|(op, rest)| op == "COPY" && rest.starts_with("--from=build "))
        .expect("a COPY --from=build");
    copy.1.split_whitespace().last().unwrap().to_string()
}

#[test]
fn containerfile_builds_a_static_release_binary_into_a_slim_image_with_the_firewall_tools() {
    let ins = containerfile();
    let froms: Vec<&String> = ins.iter().filter(|(op, _)| op == "FROM").map(|(_, r)| r).collect();
    assert_eq!(froms.len(), 2, "a build stage and a runtime stage: {froms:?}");
    assert!(froms[0].contains("library/rust:") && froms[0].ends_with(" AS build"), "{}", froms[0]);
    assert!(froms[1].contains("library/debian:") && froms[1].contains("-slim"), "{}", froms[1]);
    let rust_version = read("Cargo.toml").lines().find_map(|l| l.strip_prefix("rust-version = ")).unwrap().to_string();
    assert!(ins.contains(&("ARG".into(), format!("RUST_VERSION={}", rust_version.trim_matches('"')))));

    let build_stage = ins.iter().position(|(op, _)| op == "FROM").unwrap();
    let runtime_stage = ins.iter().rposition(|(op, _)| op == "FROM").unwrap();
    let runs = |range: std::ops::Range<usize>| -> String {
        ins[range].iter().filter(|(op, _)| op == "RUN").map(|(_, r)| r.as_str()).collect::<Vec<_>>().join("\n")
    };
    let build = runs(build_stage..runtime_stage);
    assert!(build.contains("cargo build --release --locked"), "{build}");
    assert!(build.contains("+crt-static") && build.contains("--target"), "static, so it runs on any host: {build}");
    let runtime = runs(runtime_stage..ins.len());
    for pkg in ["iptables", "nftables", "iproute2"] {
        assert!(runtime.split_whitespace().any(|w| w == pkg), "the runtime image installs {pkg}");
    }
    assert_eq!(containerfile_binary(), "/usr/local/bin/bridge-nat");
    for (op, rest) in &ins {
        if op == "COPY" && !rest.starts_with("--from") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            for src in &words[..words.len() - 1] {
                assert!(repo(src).exists(), "COPY source {src} is not in the repository");
            }
        }
    }
    assert!(ins.contains(&("COPY".into(), "cni-conf/with-host-iptables.sh /usr/local/bin/with-host-iptables".into())));
    let cmd = &ins.iter().rfind(|(op, _)| op == "CMD").expect("a CMD").1;
    let cmd: Vec<String> = serde_json::from_str(cmd).expect("CMD in exec form");
    // The DaemonSet adds only its args: the metrics address, which only the pod knows.
    let agent = agent_container(&daemonset());
    assert_eq!(cmd, strings(&agent["command"]), "the image's CMD is what the DaemonSet runs");
}

/// A unit file's keys per section, in order, each with every value it was given.
fn unit_file() -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut sections: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut section = String::new();
    for line in read("cni-conf/bridge-nat-agent.service").lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("not a key=value line: {line}"));
        sections.entry(section.clone()).or_default().entry(key.trim().into()).or_default().push(value.trim().into());
    }
    sections
}

#[test]
fn systemd_unit_runs_the_agent_keeps_it_running_and_removes_nothing_on_stop() {
    let unit = unit_file();
    let service = &unit["Service"];
    let one = |key: &str| -> &str {
        let v = service.get(key).unwrap_or_else(|| panic!("[Service] {key} missing"));
        assert_eq!(v.len(), 1, "[Service] {key} given more than once");
        &v[0]
    };
    assert_eq!(one("ExecStart"), format!("/opt/cni/bin/{}", AGENT_ARGS.join(" ")));
    assert_eq!(one("Restart"), "always");
    assert!(unit["Unit"]["After"].iter().any(|v| v.split_whitespace().any(|u| u == "network.target")));
    assert_eq!(unit["Install"]["WantedBy"], ["multi-user.target"]);
    for key in ["ExecStop", "ExecStopPost"] {
        assert!(!service.contains_key(key), "{key}: stopping the agent must remove nothing");
    }
    if service.contains_key("RuntimeDirectory") {
        assert_eq!(one("RuntimeDirectoryPreserve"), "yes", "systemd deletes a RuntimeDirectory on stop otherwise");
    }

    let caps = one("CapabilityBoundingSet");
    for cap in ["CAP_NET_ADMIN", "CAP_NET_RAW"] {
        assert!(caps.split_whitespace().any(|c| c == cap), "{cap} in {caps}");
    }
    assert_ne!(service.get("ProtectKernelTunables").map(|v| v[0].as_str()), Some("yes"), "the agent sets sysctls");
    assert_ne!(service.get("PrivateNetwork").map(|v| v[0].as_str()), Some("yes"), "the host's network is its job");
    // Under ProtectSystem=strict every path the agent writes must be opened up explicitly.
    if one("ProtectSystem") == "strict" {
        let writable: Vec<&str> =
            service.get("ReadWritePaths").into_iter().flatten().flat_map(|v| v.split_whitespace()).collect();
        let runtime_dir = service.get("RuntimeDirectory").map(|v| format!("/run/{}", v[0]));
        for path in [STATE_DIR, "/var/log/bridge-nat.log", "/etc/iproute2/rt_tables", "/run/xtables.lock"] {
            let covered = writable
                .iter()
                .map(|w| w.trim_start_matches('-'))
                .chain(runtime_dir.as_deref())
                .any(|w| path == w || path.strip_prefix(w).is_some_and(|rest| rest.starts_with('/')));
            assert!(covered, "{path} is not writable under ProtectSystem=strict: {writable:?} {runtime_dir:?}");
        }
    }

    let install = read("install.sh");
    assert!(install.contains("cni-conf/bridge-nat-agent.service"), "install.sh --agent installs this unit");
    assert!(install.contains("[ -d /run/systemd/system ]"), "install.sh enables it only where systemd runs");
}

#[test]
fn install_help_names_the_agent_option() {
    let out = Command::new("bash").arg(repo("install.sh")).arg("--help").output().expect("run bash");
    assert!(out.status.success(), "install.sh --help: {:?}", out);
    let help = String::from_utf8_lossy(&out.stdout);
    for option in ["--agent", "--demo"] {
        assert!(help.contains(option), "install.sh --help does not mention {option}:\n{help}");
    }
}

#[test]
fn example_pod_asks_multus_for_port_mappings_that_the_nad_accepts() {
    let nad = only_doc_of_kind("cni-conf/dind-nad.yaml", "NetworkAttachmentDefinition");
    let config: Value =
        serde_json::from_str(nad["spec"]["config"].as_str().expect("spec.config")).expect("the NAD's config is JSON");
    let entry = config["plugins"].as_array().unwrap().iter().find(|p| p["type"] == "bridge-nat").expect("bridge-nat");
    assert_eq!(entry["capabilities"]["portMappings"], true, "Multus passes portMappings only when asked for them");
    let static_ports: Vec<(u64, String)> = entry["portForwarding"]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| (r["hostPort"].as_u64().unwrap(), r["protocol"].as_str().unwrap_or("tcp").to_string()))
        .collect();

    let pod = only_doc_of_kind("cni-conf/pod-with-port-mappings.yaml", "Pod");
    let annotation = pod.pointer("/metadata/annotations/k8s.v1.cni.cncf.io~1networks").and_then(Value::as_str);
    let selection: Value =
        serde_json::from_str(annotation.expect("the network-selection annotation")).expect("the annotation is JSON");
    let element = &selection.as_array().expect("a list of network-selection elements")[0];
    assert_eq!(element["name"], nad["metadata"]["name"]);
    let mappings = element["portMappings"].as_array().filter(|m| !m.is_empty()).expect("portMappings");
    let declared: Vec<u64> = pod
        .pointer("/spec/containers")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["containerPort"].as_u64())
        .collect();
    for m in mappings {
        let port = |k: &str| m[k].as_u64().filter(|p| (1..=65535).contains(p)).unwrap_or_else(|| panic!("{k} in {m}"));
        let proto = m["protocol"].as_str().expect("protocol");
        assert!(["tcp", "udp", "sctp"].contains(&proto), "{proto}");
        assert!(
            !static_ports.contains(&(port("hostPort"), proto.to_string())),
            "host port {}/{proto} is a static rule of the NAD: the ADD would be refused",
            port("hostPort")
        );
        assert!(declared.contains(&port("containerPort")), "the pod serves containerPort {}", port("containerPort"));
    }
}
