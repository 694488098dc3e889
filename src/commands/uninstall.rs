//! UNINSTALL: lock → survey what bridge-nat has on the node → (with --yes) remove it: firewall,
//! ip rules, table routes, table names, then the records and the index. The records go last, so a
//! failure halfway leaves them for a second run, which finds the rest.
//!
//! What counts as bridge-nat's, so that a corrupt or lost record leaks nothing:
//! - firewall: everything either backend owns, whatever the records say: iptables chains named
//!   BRIDGE-NAT-* and the jumps to them (in every iptables variant installed: the configured
//!   tool, iptables-nft and iptables-legacy), and the nftables table `inet bridge-nat`;
//! - routing tables: those any record names (of any boot), those the index holds (it survives a
//!   corrupt record), those registered under bridge-nat's name for iproute2, and those looked up
//!   by an ip rule whose fwmark mask is a mask the plugin uses (the records' markMask, and the
//!   default 0x1fff); table ids in a network's config are reserved for bridge-nat (see README),
//!   so every route in them goes;
//! - ip rules: those of the records or the index, every rule that looks up one of those tables,
//!   and the "lookup main suppress_prefixlength 0" rule right before such a `from` rule (the pair
//!   the network's `routing` block installs);
//! - state: `records/`, `index/`, STATUS probe files and the agent's `health.json`. The state directory and its `lock` file
//!   stay: a CNI call already waiting on the lock must still exclude the calls after it.
//!
//! Sysctls stay as they are (ip_forward, route_localnet, src_valid_mark, IPv6 forwarding): the
//! values before the first ADD are not known, and the node's other networking may need them.

use crate::backend::iptables::{Family, Iptables, IptablesBackend};
use crate::backend::nftables::{Nft, NftablesBackend, TABLE};
use crate::backend::{Converge, Firewall};
use crate::config::{Settings, DEFAULT_MARK_MASK};
use crate::error::{Context, Error, Result};
use crate::routing::apply as routes;
use crate::routing::netlink::Netlink;
use crate::routing::rt_tables::RtTables;
use crate::routing::{IpRule, MAIN_TABLE};
use crate::state::{current_boot_id, Index, Record, Store};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What uninstall removed, or would remove: one line per object. `--json` prints it with the
/// field names `firewall`, `ipRules`, `tables`, `tableNames`, `state`, `kept` (arrays of strings)
/// and `removed` (false without --yes).
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Survey {
    pub firewall: Vec<String>,
    pub ip_rules: Vec<String>,
    pub tables: Vec<String>,
    pub table_names: Vec<String>,
    pub state: Vec<String>,
    /// What stays on purpose.
    pub kept: Vec<String>,
}

impl Survey {
    pub fn is_empty(&self) -> bool {
        self.firewall.is_empty()
            && self.ip_rules.is_empty()
            && self.tables.is_empty()
            && self.table_names.is_empty()
            && self.state.is_empty()
    }
}

/// Survey the node and, when `really`, remove everything found.
pub fn uninstall(settings: &Settings, really: bool) -> Result<Survey> {
    // Without --yes nothing is created, not even the state directory.
    let store = match really {
        true => Some(Store::open(&settings.state_dir).context("open state")?),
        false => Store::open_existing(&settings.state_dir)?,
    };
    let _lock = store.as_ref().map(|s| s.lock(settings.lock_timeout)).transpose()?;
    let mut survey = Survey::default();

    let tools = iptables_variants(&settings.iptables);
    let mut ipt_found = Vec::new();
    for tool in &tools {
        let lines = iptables_objects(tool, settings)?;
        if !lines.is_empty() {
            ipt_found.push(tool.clone());
        }
        survey.firewall.extend(lines);
    }
    // A kernel without nf_tables holds no table of ours.
    let nft_table = Nft::open().and_then(|mut n| n.table_exists()).unwrap_or_else(|e| {
        log::warn!("cannot look up the nftables table ({e}); taking it as absent");
        false
    });
    if nft_table {
        survey.firewall.push(format!("nftables: table inet {TABLE}"));
    }

    let records: Vec<Record> = match &store {
        Some(s) => s.scan()?.into_iter().filter_map(|(_, r)| r.ok()).collect(),
        None => Vec::new(),
    };
    let index = Index::existing(&settings.state_dir, &current_boot_id());
    let names = RtTables::system().ours();
    let mut nl = Netlink::open()?;
    let (ip_rules, tables) = routing_objects(&mut nl, &records, index.as_ref(), &names)?;
    survey.ip_rules = ip_rules.iter().map(|r| r.to_string()).collect();
    let name_of: BTreeMap<u32, &str> = names.iter().map(|(id, n)| (*id, n.as_str())).collect();
    for &t in &tables {
        let count = nl.routes(t)?.len();
        if count > 0 {
            let name = name_of.get(&t).map(|n| format!(" {n}")).unwrap_or_default();
            survey.tables.push(format!("table {t}{name}: {count} route(s)"));
        }
    }
    survey.table_names = names.iter().map(|(id, n)| format!("{id} {n}")).collect();
    survey.state = state_entries(&settings.state_dir);
    survey.kept = vec![
        "sysctls (ip_forward, route_localnet, src_valid_mark, IPv6 forwarding): values before bridge-nat are unknown"
            .to_string(),
    ];
    if store.is_some() {
        let lock = settings.state_dir.join("lock");
        survey.kept.push(format!("{}: a CNI call waiting on it still excludes the ones after it", lock.display()));
    }
    if !really {
        return Ok(survey);
    }

    for tool in &ipt_found {
        let mut fw = IptablesBackend::new(tool, settings.lock_timeout);
        fw.converge(&[], Converge::Rebuild).context(format!("remove the {tool} rules"))?;
    }
    if nft_table {
        NftablesBackend::new(&settings.iptables, settings.lock_timeout)
            .converge(&[], Converge::Rebuild)
            .context("remove the nftables table")?;
    }
    routes::remove(&mut nl, &ip_rules, &tables).context("remove policy routing")?;
    RtTables::system().remove_ours()?;
    for name in ["records", "index"] {
        let p = settings.state_dir.join(name);
        match std::fs::remove_dir_all(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io(format!("remove {}", p.display()), e))
            }
            _ => {}
        }
    }
    for probe in probe_files(&settings.state_dir) {
        let _ = std::fs::remove_file(probe);
    }
    log::info!(
        "uninstalled: {} firewall objects, {} ip rules, {} tables, {} table names, {} state entries",
        survey.firewall.len(),
        survey.ip_rules.len(),
        survey.tables.len(),
        survey.table_names.len(),
        survey.state.len()
    );
    Ok(survey)
}

/// The configured iptables tool and the other variants installed, each once.
fn iptables_variants(configured: &str) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for tool in [configured, "iptables-nft", "iptables-legacy"] {
        let Some(path) = find_tool(tool) else { continue };
        // `iptables` is usually a link to the binary of one of the two others, which acts by the
        // name it is called by: the same binary is the same variant.
        if seen.insert(std::fs::canonicalize(&path).unwrap_or(path)) {
            out.push(tool.to_string());
        }
    }
    out
}

fn find_tool(tool: &str) -> Option<PathBuf> {
    if tool.contains('/') {
        return Path::new(tool).is_file().then(|| PathBuf::from(tool));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| p.is_file())
}

/// bridge-nat's chains (with their rule counts) and the jumps to them, as one line each.
fn iptables_objects(tool: &str, settings: &Settings) -> Result<Vec<String>> {
    let current = Iptables::new(tool, settings.lock_timeout).read(&[Family::Ipv4, Family::Ipv6])?;
    let mut lines = Vec::new();
    for (family, table, chain) in &current.chains {
        let n = current.rules.iter().filter(|r| r.family == *family && &r.table == table && &r.chain == chain).count();
        let family = if *family == Family::Ipv4 { "ipv4" } else { "ipv6" };
        lines.push(format!("{tool}: {family} {table} chain {chain} ({n} rule(s))"));
    }
    for r in current.rules.iter().filter(|r| r.in_builtin_chain()) {
        lines.push(format!("{tool}: {r}"));
    }
    Ok(lines)
}

/// The ip rules to delete and the tables to flush (see the module comment for what counts).
fn routing_objects(
    nl: &mut Netlink,
    records: &[Record],
    index: Option<&Index>,
    names: &BTreeSet<(u32, String)>,
) -> Result<(BTreeSet<IpRule>, BTreeSet<u32>)> {
    let reserved = |t: u32| t == 0 || (253..=255).contains(&t);
    let held = |prefix: &str| -> Result<Vec<String>> { index.map_or(Ok(Vec::new()), |i| i.held_keys(prefix)) };
    let recorded: BTreeSet<&IpRule> = records.iter().flat_map(|r| &r.ip_rules).collect();
    let held_rules: BTreeSet<String> = held("iprule:")?.into_iter().collect();
    let mut masks: BTreeSet<u32> = recorded.iter().filter_map(|r| r.fwmark.map(|(_, m)| m)).collect();
    masks.insert(DEFAULT_MARK_MASK);

    let mut tables: BTreeSet<u32> = records.iter().flat_map(|r| r.tables.iter().map(|t| t.id)).collect();
    tables.extend(recorded.iter().map(|r| r.table));
    tables.extend(held("rtable:")?.iter().filter_map(|t| t.parse::<u32>().ok()));
    tables.extend(names.iter().map(|(id, _)| *id));
    let kernel = nl.rules()?;
    let by_mask = |r: &IpRule| r.fwmark.is_some_and(|(_, m)| masks.contains(&m));
    tables.extend(kernel.iter().filter(|r| by_mask(r)).map(|r| r.table));
    tables.retain(|t| !reserved(*t));

    let mut rules: BTreeSet<IpRule> = kernel
        .iter()
        .filter(|r| {
            recorded.contains(r) || held_rules.contains(&r.to_string()) || tables.contains(&r.table) || by_mask(r)
        })
        .filter(|r| !reserved(r.table) || r.suppress_default)
        .cloned()
        .collect();
    let pairs: Vec<IpRule> = kernel
        .iter()
        .filter(|s| s.suppress_default && s.table == MAIN_TABLE && s.from.is_some())
        .filter(|s| rules.iter().any(|r| r.from == s.from && r.priority == s.priority + 1 && tables.contains(&r.table)))
        .cloned()
        .collect();
    rules.extend(pairs);
    Ok((rules, tables))
}

/// What of the state directory uninstall removes, one line each.
fn state_entries(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let records = dir.join("records");
    if records.is_dir() {
        let files: Vec<PathBuf> = std::fs::read_dir(&records)
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|net| std::fs::read_dir(net.path()).into_iter().flatten().flatten().map(|f| f.path()))
            .collect();
        // An empty one is what opening the state for the lock creates: nothing to report.
        if !files.is_empty() {
            out.push(format!("{} ({} file(s))", records.display(), files.len()));
        }
    }
    let index = dir.join("index");
    if index.is_dir() {
        out.push(index.display().to_string());
    }
    out.extend(probe_files(dir).iter().map(|p| p.display().to_string()));
    out
}

fn probe_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        // STATUS probes, and the agent's shared uplink health (with its temp file).
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(".status-probe.") || n == "health.json" || n.starts_with(".health.json.tmp.")
            })
        })
        .collect()
}
