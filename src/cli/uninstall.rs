//! `uninstall` for people: without `--yes` what would go, with it what went; one line per object,
//! then what stays on purpose. What counts as bridge-nat's is explained in commands/uninstall.rs.

use super::Options;
use crate::commands::{self, Survey};
use crate::error::Result;

pub fn uninstall(opts: &Options) -> Result<bool> {
    let survey = commands::uninstall(&opts.settings, opts.yes)?;
    if opts.json {
        let mut v = serde_json::to_value(&survey).expect("a survey serializes");
        v["removed"] = serde_json::Value::Bool(opts.yes);
        println!("{v}");
        return Ok(true);
    }
    print!("{}", render(&survey, opts.yes));
    Ok(true)
}

fn render(s: &Survey, removed: bool) -> String {
    let mut out = String::new();
    if s.is_empty() {
        out += "nothing of bridge-nat on this node\n";
    } else {
        out += if removed { "removed:\n" } else { "would remove (nothing is changed without --yes):\n" };
        let names: Vec<String> = s.table_names.iter().map(|n| format!("table name {n}")).collect();
        let groups = [
            ("firewall", &s.firewall),
            ("routing", &s.ip_rules),
            ("routing", &s.tables),
            ("iproute2", &names),
            ("state", &s.state),
        ];
        for (what, lines) in groups {
            for l in lines {
                out += &format!("  {what:<9} {l}\n");
            }
        }
    }
    out += "kept:\n";
    for k in &s.kept {
        out += &format!("  {k}\n");
    }
    if !removed && !s.is_empty() {
        out += "run `bridge-nat uninstall --yes` to remove it\n";
    }
    out
}
