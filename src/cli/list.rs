//! `list` for people: one row per attachment, then its forwards (each with the uplink its replies
//! leave by), marks and tables, indented below it. `--json` prints the records as documented in
//! commands/list.rs.

use super::Options;
use crate::commands::{self, Listed};
use crate::commands::{ListedForward, ListedMark, ListedTable};
use crate::error::Result;
use serde_json::json;
use std::net::IpAddr;

pub fn list(opts: &Options) -> Result<bool> {
    let found = commands::list(&opts.settings)?;
    let (uplinks, egress) = commands::egress_status(&opts.settings)?;
    if opts.json {
        let all =
            json!({ "stateDir": opts.settings.state_dir, "attachments": found, "uplinks": uplinks, "egress": egress });
        println!("{all}");
    } else if found.is_empty() {
        println!("no attachments on this node (state directory {})", opts.settings.state_dir.display());
    } else {
        print!("{}{}", render(&found), commands::render_egress(&uplinks, &egress));
    }
    Ok(true)
}

/// The text `list` prints.
pub fn render(found: &[Listed]) -> String {
    let mut rows =
        vec![["NETWORK", "CONTAINER", "IFNAME", "STATUS", "BACKEND", "BRIDGE", "ADDRESSES"].map(String::from)];
    for a in found {
        rows.push([
            a.network.clone(),
            a.container_id.chars().take(12).collect(),
            a.ifname.clone(),
            a.status.to_string(),
            a.backend.unwrap_or("-").to_string(),
            a.bridge.clone().unwrap_or_else(|| "-".into()),
            if a.addresses.is_empty() { "-".into() } else { a.addresses.join(" ") },
        ]);
    }
    let widths: Vec<usize> = (0..7).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let line = |row: &[String; 7]| {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        format!("{}\n", cells.join("  ").trim_end())
    };
    let mut out = line(&rows[0]);
    for (a, row) in found.iter().zip(&rows[1..]) {
        out += &line(row);
        if let Some(e) = &a.error {
            out += &format!("  error    {e}\n");
        }
        let forwards: Vec<String> = a.forwards.iter().map(forward).collect();
        let width = forwards.iter().map(|f| f.chars().count()).max().unwrap_or(0);
        for (text, f) in forwards.iter().zip(&a.forwards) {
            out += &format!("  forward  {text:<width$}  replies: {}\n", replies(f, a));
        }
        if !a.marks.is_empty() {
            out += &format!("  marks    {}\n", a.marks.iter().map(mark).collect::<Vec<_>>().join(", "));
        }
        if !a.tables.is_empty() {
            out += &format!("  tables   {}\n", a.tables.iter().map(table).collect::<Vec<_>>().join(", "));
        }
    }
    out
}

fn endpoint(ip: Option<IpAddr>, port: String) -> String {
    match ip {
        Some(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        Some(ip) => format!("{ip}:{port}"),
        None => format!("*:{port}"),
    }
}

/// `hostIP:hostPort/proto → podIP:port`; `*` is every address of the node.
fn forward(f: &ListedForward) -> String {
    let host = endpoint(f.host_ip, format!("{}/{}", f.host_port, f.protocol.as_str()));
    match (f.pod_ip, f.pod_port) {
        (Some(ip), Some(port)) => format!("{host} → {}", endpoint(Some(ip), port.to_string())),
        _ => format!("{host} → (pod port not recorded)"),
    }
}

fn replies(f: &ListedForward, a: &Listed) -> String {
    let uplink = f.reply_uplink.as_deref().unwrap_or("(uplink not recorded)");
    match (f.reply_via, f.mark, f.table) {
        ("mark", Some(m), Some(t)) => format!("{uplink} (mark {m:#x}, table {t})"),
        ("pod-default", _, Some(t)) => format!("{uplink} (table {t}, the pod's default)"),
        ("arrival", ..) => {
            // The uplinks whose tables a mark selects: the connection's arrival decides among them.
            let uplinks: Vec<&str> = a
                .marks
                .iter()
                .filter_map(|m| a.tables.iter().find(|t| t.id == m.table).map(|t| t.uplink.as_str()))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            format!("the uplink it arrived on ({})", uplinks.join(", "))
        }
        ("main", ..) => "main table".into(),
        _ => "unknown (record from an older version)".into(),
    }
}

fn mark(m: &ListedMark) -> String {
    format!("{:#x}/{:#x} → table {}", m.mark, m.mask, m.table)
}

fn table(t: &ListedTable) -> String {
    match &t.name {
        Some(name) => format!("{} {name} → {}", t.id, t.uplink),
        None => format!("{} → {}", t.id, t.uplink),
    }
}
