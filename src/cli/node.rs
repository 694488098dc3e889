//! `check` and `reconcile` for people: one line per attachment or per repair, or JSON.

use super::Options;
use crate::commands;
use crate::error::Result;
use serde_json::json;

/// Every attachment's problems; true when there are none.
pub fn check(opts: &Options) -> Result<bool> {
    // Like a CNI call: an ADD halfway through is not reported as a problem.
    let _lock = commands::lock_node(&opts.settings)?;
    let found = commands::problems_per_attachment(&opts.settings)?;
    let healthy = found.iter().all(|(_, p)| p.is_empty());
    let (uplinks, egress) = commands::egress_status(&opts.settings)?;
    if opts.json {
        let list: Vec<_> = found
            .iter()
            .map(|(id, problems)| json!({ "network": id.network, "containerID": id.container_id, "ifname": id.ifname, "problems": problems }))
            .collect();
        println!("{}", json!({ "ok": healthy, "attachments": list, "uplinks": uplinks, "egress": egress }));
        return Ok(healthy);
    }
    if found.is_empty() {
        println!("no attachments on this node");
    }
    for (id, problems) in &found {
        match problems.len() {
            0 => println!("ok       {}", id.describe()),
            n => {
                println!("PROBLEM  {}: {n} problem(s)", id.describe());
                for p in problems {
                    println!("           - {p}");
                }
            }
        }
    }
    print!("{}", commands::render_egress(&uplinks, &egress));
    Ok(healthy)
}

/// One pass of repairs; true when the node is right afterwards.
pub fn reconcile(opts: &Options) -> Result<bool> {
    let report = commands::reconcile(&opts.settings)?;
    let healthy = report.unresolved.is_empty();
    if opts.json {
        println!("{}", json!({ "ok": healthy, "repairs": report.repairs, "unresolved": report.unresolved }));
        return Ok(healthy);
    }
    for r in &report.repairs {
        println!("repaired: {r}");
    }
    for u in &report.unresolved {
        println!("NOT RIGHT: {u}");
    }
    if report.repairs.is_empty() && healthy {
        println!("nothing to repair: the node matches the records");
    }
    Ok(healthy)
}
