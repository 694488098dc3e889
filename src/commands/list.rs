//! LIST: lock → read every record file, unreadable ones and those of an earlier boot included →
//! what each attachment forwards, and by which uplink the replies leave. Changes nothing.
//!
//! `bridge-nat list --json` prints `{"stateDir": "...", "attachments": [ATTACHMENT, ...]}`, with
//! these field names (stable; a field may be added, none renamed or removed):
//!
//! ATTACHMENT:
//! - `network`, `containerID` (the full id), `ifname`: which attachment.
//! - `status`: `"applied"`, `"applying"` (an ADD started and did not finish, or is running),
//!   `"earlier-boot"` (the record is from before the last reboot: nothing of it is installed), or
//!   `"unreadable"` (the file is corrupt; `error` says why, and only the id is known).
//! - `record`: the record file's path. `error`: only for unreadable records.
//! - `backend`: `"iptables"` or `"nftables"`. `bridge`: the bridge the pod hangs off.
//! - `addresses`: the pod's addresses (strings, without prefix).
//! - `forwards`: [FORWARD]. `marks`: [MARK]. `tables`: [TABLE].
//!
//! FORWARD:
//! - `hostIP` (null: every address of the node), `hostPort`, `protocol` (`"tcp"`, `"udp"`, `"sctp"`).
//! - `podIP`, `podPort`: where it is forwarded to (null in a record written by a version that kept
//!   only the host port).
//! - `mark`: the fwmark its connections get (a number), or null.
//! - `table`: the routing table replies are looked up in (the mark's, or the network's table for
//!   `"pod-default"`), else null.
//! - `replyVia`: how replies leave: `"mark"` (by the forward's mark and table), `"arrival"` (by the
//!   uplink the connection arrived on), `"pod-default"` (by the network's `routing` table for the
//!   pod's own traffic), `"main"` (by the node's main table) or `"unknown"` (old record).
//! - `replyUplink`: the uplink interface for `"mark"` and `"pod-default"`, else null.
//!
//! MARK: `mark`, `mask` (numbers), `table` (the table its ip rule looks up).
//! TABLE: `id`, `name` (null when unnamed), `uplink` (the interface its default route leaves by).

use crate::config::{AttachmentId, Protocol, Settings};
use crate::error::Result;
use crate::family::family_of;
use crate::routing::MAIN_TABLE;
use crate::state::{Record, Store};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listed {
    pub network: String,
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    pub status: &'static str,
    pub record: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub backend: Option<&'static str>,
    pub bridge: Option<String>,
    pub addresses: Vec<String>,
    pub forwards: Vec<ListedForward>,
    pub marks: Vec<ListedMark>,
    pub tables: Vec<ListedTable>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedForward {
    #[serde(rename = "hostIP")]
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    pub protocol: Protocol,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<IpAddr>,
    pub pod_port: Option<u16>,
    pub mark: Option<u32>,
    pub table: Option<u32>,
    pub reply_via: &'static str,
    pub reply_uplink: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListedMark {
    pub mark: u32,
    pub mask: u32,
    pub table: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListedTable {
    pub id: u32,
    pub name: Option<String>,
    pub uplink: String,
}

/// Every attachment the state directory has a record file of, in file order (network, then
/// container id); none when the directory does not exist (it is not created).
pub fn list(settings: &Settings) -> Result<Vec<Listed>> {
    let Some(store) = Store::open_existing(&settings.state_dir)? else {
        return Ok(Vec::new());
    };
    let _lock = store.lock(settings.lock_timeout)?;
    Ok(store
        .scan()?
        .into_iter()
        .map(|(path, rec)| match rec {
            Ok(rec) => listed(&rec, path),
            Err(e) => unreadable(path, e.to_string()),
        })
        .collect())
}

fn listed(rec: &Record, record: PathBuf) -> Listed {
    let status = rec.status_name();
    let uplink_of: BTreeMap<u32, &str> = rec.tables.iter().map(|t| (t.id, t.outbound.interface.as_str())).collect();
    let mut tables: Vec<ListedTable> = rec
        .tables
        .iter()
        .map(|t| ListedTable { id: t.id, name: t.name.clone(), uplink: t.outbound.interface.clone() })
        .collect();
    // A table is planned once per subnet of the attachment.
    tables.dedup_by_key(|t| t.id);
    let mut marks: Vec<ListedMark> = Vec::new();
    // A mark has an ip rule per family routed; it is listed once.
    for m in rec.ip_rules.iter().filter_map(|r| r.fwmark.map(|(mark, mask)| ListedMark { mark, mask, table: r.table }))
    {
        if !marks.contains(&m) {
            marks.push(m);
        }
    }
    let forwards = if rec.forwards.is_empty() && !rec.host_ports.is_empty() {
        rec.host_ports
            .iter()
            .map(|h| ListedForward {
                host_ip: h.host_ip,
                host_port: h.port,
                protocol: h.protocol,
                pod_ip: None,
                pod_port: None,
                mark: None,
                table: None,
                reply_via: "unknown",
                reply_uplink: None,
            })
            .collect()
    } else {
        rec.forwards
            .iter()
            .map(|f| {
                let marked = f.mark.and_then(|m| marks.iter().find(|k| k.mark == m)).map(|k| k.table);
                let (reply_via, table) = reply_path(rec, f.pod_ip, marked);
                let reply_uplink = table.and_then(|t| uplink_of.get(&t)).map(|u| u.to_string());
                ListedForward {
                    host_ip: f.host.host_ip,
                    host_port: f.host.port,
                    protocol: f.host.protocol,
                    pod_ip: Some(f.pod_ip),
                    pod_port: Some(f.pod_port),
                    mark: f.mark,
                    table,
                    reply_via,
                    reply_uplink,
                }
            })
            .collect()
    };
    Listed {
        network: rec.id.network.clone(),
        container_id: rec.id.container_id.clone(),
        ifname: rec.id.ifname.clone(),
        status,
        record,
        error: None,
        backend: Some(rec.backend.name()),
        bridge: Some(rec.bridge.clone()),
        addresses: rec.addresses.clone(),
        forwards,
        marks,
        tables,
    }
}

/// How a forward's replies leave, and by which table: a marked connection follows its mark's
/// table, an unmarked one the table of the pod's own traffic when the network has one. Records of
/// versions that routed only IPv4 hold no IPv6 rule: their IPv6 replies follow main.
fn reply_path(rec: &Record, pod_ip: IpAddr, marked_table: Option<u32>) -> (&'static str, Option<u32>) {
    if rec.ip_rules.iter().all(|r| r.family != family_of(pod_ip)) {
        return ("main", None);
    }
    if rec.reply_via.as_deref() == Some("arrival") {
        return ("arrival", None);
    }
    if marked_table.is_some() {
        return ("mark", marked_table);
    }
    let pod_default = rec.ip_rules.iter().find(|r| {
        r.fwmark.is_none() && !r.suppress_default && r.table != MAIN_TABLE && r.from.is_some_and(|n| n.contains(pod_ip))
    });
    match pod_default {
        Some(r) => ("pod-default", Some(r.table)),
        None => ("main", None),
    }
}

fn unreadable(record: PathBuf, error: String) -> Listed {
    let id = id_of_path(&record);
    Listed {
        network: id.network,
        container_id: id.container_id,
        ifname: id.ifname,
        status: "unreadable",
        record,
        error: Some(error),
        backend: None,
        bridge: None,
        addresses: Vec::new(),
        forwards: Vec::new(),
        marks: Vec::new(),
        tables: Vec::new(),
    }
}

/// records/<network>/<container id>.<escaped ifname>.json: container ids hold no '%', and the
/// escaped ifname no '.', so the last dot splits them.
fn id_of_path(path: &Path) -> AttachmentId {
    let network = path.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned());
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let (container_id, ifname) = match stem.rsplit_once('.') {
        Some((c, i)) => (c.to_string(), unescape(i)),
        None => (stem.clone(), String::new()),
    };
    AttachmentId { network: network.unwrap_or_default(), container_id, ifname }
}

fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_record_is_named_by_its_path() {
        let id = id_of_path(Path::new("/run/bridge-nat/records/dind/ctr.a-1.net%2e1.json"));
        assert_eq!(id.network, "dind");
        assert_eq!(id.container_id, "ctr.a-1");
        assert_eq!(id.ifname, "net.1");
        let escaped = crate::state::encode_ifname("a/b.c");
        assert_eq!(unescape(&escaped), "a/b.c");
    }
}
