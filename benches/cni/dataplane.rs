//! The data-plane measurement: how many new TCP connections per second reach a pod through a
//! forwarded host port while N forwards are present on the node, per contender, and how long after
//! ADD a new pod's forward answers its first connection. Every forward is installed by the
//! contender's own ADDs, each for a pod that exists on the bridge (pods.rs), so N forwards are N
//! pods on one bridge; the client comes from outside the node (traffic.rs), so each connection
//! goes through the node's DNAT and FORWARD path.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::plugin::{Attachment, Kind, Op, Plugin};
use crate::pods::{PodSpec, Pods};
use crate::traffic::{Endpoints, Rate, Server, SERVER_PORT};
use crate::Result;

/// hostPort of the measured forward.
const MEASURED_PORT: u16 = 29000;
/// hostPort of the new pods whose first connection is timed.
const FIRST_PORT: u16 = 29001;
/// A first connection later than this stops the bench: the 5 s of a neighbour entry gone wrong
/// must not pass as a slow figure.
pub const FIRST_LIMIT: Duration = Duration::from_secs(3);
/// Host ports of the other forwards: `BACKGROUND_PORT + k` (kept below the control plane's
/// fresh ports, though both are never on the node at once).
const BACKGROUND_PORT: usize = 30000;
pub const MAX_FORWARDS: usize = 10000;

pub struct DpSettings {
    /// Measured time per contender and N.
    pub seconds: f64,
    /// Ascending numbers of forwards on the node, the measured one included.
    pub forwards: Vec<usize>,
    /// Port mappings per background attachment.
    pub per_attachment: usize,
    /// New pods whose first connection is timed, per contender and number of forwards.
    pub first_reps: usize,
}

/// The ADDs of new pods and their first connections, in order.
#[derive(Default)]
pub struct FirstConnections {
    pub add: Vec<Duration>,
    pub first: Vec<Duration>,
}

#[derive(Default)]
pub struct DataPlane {
    pub rates: BTreeMap<(usize, Kind), Rate>,
    pub first: BTreeMap<(usize, Kind), FirstConnections>,
    /// Most background attachments one contender had on the node.
    pub max_attachments: usize,
    /// New pods made for first connections so far (each has its own address, MAC and namespace).
    new_pods: u32,
}

/// Measures each contender alone on the node, from the fewest forwards to the most, and deletes
/// every attachment it added before the next contender starts. The pods of the most forwards are
/// all made first and stay: every contender meets the same bridge at every number of forwards
/// (made as needed, the first contender's few forwards would find a quieter bridge than the
/// others').
pub fn run(
    plugins: &BTreeMap<Kind, Plugin>,
    kinds: &[Kind],
    settings: &DpSettings,
    node_name: &str,
    first_pod: u32,
    out: &mut DataPlane,
) -> Result<()> {
    let server_ip = Attachment::pod_ip(first_pod);
    let server_pod = PodSpec::of(&bare(server_ip), format!("{node_name}-server"), "dp-server".into());
    let ends = Endpoints::create(node_name, server_pod.clone());
    let mut pods = Pods::default();
    let background_pod = |k: usize| {
        let ip = Attachment::pod_ip(first_pod + 1 + k as u32);
        PodSpec::of(&bare(ip), format!("{node_name}-bg{k}"), format!("dpb{k}"))
    };
    let most = settings.forwards.iter().map(|&n| (n - 1).div_ceil(settings.per_attachment)).max().unwrap_or(0);
    eprintln!("  making {most} pods on the bridge ...");
    pods.extend_to(&(0..most).map(background_pod).collect::<Vec<_>>())?;
    for kind in [Kind::Nftables, Kind::Iptables, Kind::Portmap].into_iter().filter(|k| kinds.contains(k)) {
        eprintln!("=== data plane: {} ===", kind.label());
        let plugin = &plugins[&kind];
        // The measured forward: added after the others, so it sits at the end of every chain
        // that grows by appending (the newest pod on a busy node).
        let measured = Attachment {
            container_id: format!("dp-{}-server", kind.key()),
            mappings: vec![(MEASURED_PORT, SERVER_PORT)],
            sandbox: Some(server_pod.netns_path()),
            ..bare(server_ip)
        };
        let mut background: Vec<Attachment> = Vec::new();
        let mut background_forwards = 0;
        for &n in &settings.forwards {
            let started = Instant::now();
            while background_forwards < n - 1 {
                let m = settings.per_attachment.min(n - 1 - background_forwards);
                let pod = background_pod(background.len());
                let att = Attachment {
                    container_id: format!("dp-{}-bg-{:05}", kind.key(), background.len()),
                    mappings: (0..m).map(|j| ((BACKGROUND_PORT + background_forwards + j) as u16, 80)).collect(),
                    sandbox: Some(pod.netns_path()),
                    ..bare(pod.ip)
                };
                plugin.run_ok(Op::Add, &att)?;
                background_forwards += m;
                background.push(att);
                if background.len().is_multiple_of(100) {
                    eprintln!("  {} attachments, {:.0} s", background.len(), started.elapsed().as_secs_f64());
                }
            }
            out.max_attachments = out.max_attachments.max(background.len());
            eprintln!(
                "  {n} forward(s) ({} other attachment(s), added in {:.0} s); measuring {} s ...",
                background.len(),
                started.elapsed().as_secs_f64(),
                settings.seconds
            );
            measure_rate(plugin, &ends, &measured, n, settings.seconds, out)?;
            time_first_connections(plugin, &ends, node_name, first_pod, n, settings.first_reps, out)?;
            crate::node::check_interrupted();
        }
        let started = Instant::now();
        for att in background.iter().rev() {
            plugin.run_ok(Op::Del, att)?;
        }
        eprintln!("  deleted {} attachment(s) in {:.0} s", background.len(), started.elapsed().as_secs_f64());
    }
    Ok(())
}

/// An attachment at `ip` with no mappings and no pod, to fill in.
fn bare(ip: std::net::Ipv4Addr) -> Attachment {
    Attachment { container_id: String::new(), ip, mappings: Vec::new(), static_rules: None, sandbox: None }
}

/// ADD of the measured forward, the rate through it, its DEL; the port must refuse before and after.
fn measure_rate(
    plugin: &Plugin,
    ends: &Endpoints,
    measured: &Attachment,
    n: usize,
    seconds: f64,
    out: &mut DataPlane,
) -> Result<()> {
    let kind = plugin.kind;
    let refused = |when: &str| match ends.probe(MEASURED_PORT) {
        Ok(()) => Err(format!("data plane, contender {}: port {MEASURED_PORT} answers {when}", kind.label())),
        Err(_) => Ok(()),
    };
    refused("before the ADD of its forward (something else forwards it)")?;
    plugin.run_ok(Op::Add, measured)?;
    ends.probe(MEASURED_PORT).map_err(|e| {
        format!(
            "data plane, contender {}: after ADD, no connection from the client through port {MEASURED_PORT} to the pod: {e}",
            kind.label()
        )
    })?;
    let rate = ends.measure(MEASURED_PORT, seconds);
    plugin.run_ok(Op::Del, measured)?;
    refused("after the DEL of its forward (the DEL left it)")?;
    // A SYN lost now and then in a storm of new connections on a shared machine is noise, reported
    // in the notes; a forward that stops carrying traffic fails every connection.
    let failed = (rate.failures * 1000 > rate.failures + rate.connections).then(|| {
        format!(
            "data plane, contender {}: {} of {} connections through port {MEASURED_PORT} failed at {n} forwards (first: {})",
            kind.label(),
            rate.failures,
            rate.failures + rate.connections,
            rate.first_error.as_deref().unwrap_or("?")
        )
    });
    out.rates.insert((n, kind), rate);
    failed.map_or(Ok(()), Err)
}

/// `reps` times: a new pod (namespace, veth on the bridge, a new address and MAC, a listening
/// server), its ADD with one forward, the time from ADD's return to the first connection the pod
/// accepted through it, its DEL, the pod deleted.
fn time_first_connections(
    plugin: &Plugin,
    ends: &Endpoints,
    node_name: &str,
    first_pod: u32,
    n: usize,
    reps: usize,
    out: &mut DataPlane,
) -> Result<()> {
    let kind = plugin.kind;
    for _ in 0..reps {
        let k = out.new_pods;
        out.new_pods += 1;
        let ip = Attachment::pod_ip(first_pod + 1 + MAX_FORWARDS as u32 + k);
        let spec = PodSpec::of(&bare(ip), format!("{node_name}-new{k}"), format!("dpn{k}"));
        let att = Attachment {
            container_id: format!("dp-{}-new-{k:04}", kind.key()),
            mappings: vec![(FIRST_PORT, SERVER_PORT)],
            sandbox: Some(spec.netns_path()),
            ..bare(ip)
        };
        let mut pod = Pods::default();
        pod.extend_to(std::slice::from_ref(&spec))?;
        let server = Server::start(&spec.netns);
        let add = plugin.run_ok(Op::Add, &att)?;
        let first = ends.first_connection(FIRST_PORT, &server, add.ended, FIRST_LIMIT);
        plugin.run_ok(Op::Del, &att)?;
        drop(server);
        drop(pod);
        let first =
            first.map_err(|e| format!("data plane, contender {}, a new pod at {n} forwards: {e}", kind.label()))?;
        let entry = out.first.entry((n, kind)).or_default();
        entry.add.push(add.elapsed);
        entry.first.push(first);
    }
    Ok(())
}
