//! The bench's environment variables (see main.rs), parsed and checked before anything runs.

use std::path::PathBuf;

use crate::agent::AgentSettings;
use crate::dataplane::{DpSettings, MAX_FORWARDS};
use crate::plugin::Kind;
use crate::{fresh_ports, Result, BACKGROUND_PORTS};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Separate,
    Shared,
}

pub struct Settings {
    /// `BENCH_SHORT=1`: the CI run (smaller defaults; see main.rs).
    pub short: bool,
    pub contenders: Vec<Kind>,
    pub layout: Layout,
    pub ns: Vec<usize>,
    pub reps: Option<usize>,
    pub log_level: String,
    pub bridge_nat: PathBuf,
    /// None with `BENCH_DATAPLANE=0`.
    pub dataplane: Option<DpSettings>,
    /// None with `BENCH_AGENT=0`.
    pub agent: Option<AgentSettings>,
}

impl Settings {
    pub fn from_env() -> Result<Settings> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let short = match var("BENCH_SHORT").as_deref().map(str::trim) {
            None | Some("0") => false,
            Some("1") => true,
            Some(other) => return Err(format!("BENCH_SHORT: {other:?} is neither 0 nor 1")),
        };
        let ns = ascending_from_env(&var, "BENCH_NS", if short { "0,100" } else { "0,100,500,1000" })?;
        let max_n = ns.last().copied().unwrap_or(0);
        if BACKGROUND_PORTS + Kind::ALL.len() * max_n > usize::from(fresh_ports(Kind::Iptables)) {
            return Err(format!("BENCH_NS: {max_n} background attachments per contender do not fit the port ranges"));
        }
        let reps = match var("BENCH_REPS") {
            None => None,
            Some(r) => Some(r.trim().parse().map_err(|_| format!("BENCH_REPS: {r:?} is not a number"))?),
        };
        let mut contenders = Vec::new();
        for key in var("BENCH_CONTENDERS").unwrap_or_else(|| "portmap,iptables,nftables".into()).split(',') {
            let kind = Kind::from_key(key.trim()).ok_or_else(|| {
                format!("BENCH_CONTENDERS: {key:?} is none of portmap, iptables, nftables (comma-separated)")
            })?;
            if !contenders.contains(&kind) {
                contenders.push(kind);
            }
        }
        contenders.sort();
        let layout = match var("BENCH_LAYOUT").as_deref().map(str::trim) {
            None | Some("separate") => Layout::Separate,
            Some("shared") => Layout::Shared,
            Some(other) => return Err(format!("BENCH_LAYOUT: {other:?} is neither separate nor shared")),
        };
        Ok(Settings {
            short,
            contenders,
            layout,
            ns,
            reps,
            log_level: var("BENCH_LOG_LEVEL").unwrap_or_else(|| "info".into()),
            bridge_nat: std::env::var_os("BENCH_BRIDGE_NAT")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_bridge-nat"))),
            dataplane: dataplane_from_env(&var, short)?,
            agent: crate::agent::from_env(&var, short)?,
        })
    }

    pub fn reps(&self, n: usize) -> usize {
        self.reps.unwrap_or(if self.short {
            3
        } else if n <= 100 {
            30
        } else {
            15
        })
    }

    /// Groups of contenders measured together. Separate: bridge-nat nftables first (the newest
    /// code fails soonest), portmap last (its chains outlive its last DEL).
    pub fn phases(&self) -> Vec<Vec<Kind>> {
        match self.layout {
            Layout::Shared => vec![self.contenders.clone()],
            Layout::Separate => [Kind::Nftables, Kind::Iptables, Kind::Portmap]
                .into_iter()
                .filter(|k| self.contenders.contains(k))
                .map(|k| vec![k])
                .collect(),
        }
    }
}

/// Ascending comma-separated numbers from `name`, or from `default`.
pub fn ascending_from_env(var: &dyn Fn(&str) -> Option<String>, name: &str, default: &str) -> Result<Vec<usize>> {
    let list = var(name)
        .unwrap_or_else(|| default.into())
        .split(',')
        .map(|s| s.trim().parse().map_err(|_| format!("{name}: {s:?} is not a number")))
        .collect::<Result<Vec<usize>>>()?;
    if !list.windows(2).all(|w| w[0] < w[1]) {
        return Err(format!("{name} must be ascending: {list:?}"));
    }
    Ok(list)
}

/// A positive number from `name`, or `default`.
pub fn count_from_env(var: &dyn Fn(&str) -> Option<String>, name: &str, default: usize, max: usize) -> Result<usize> {
    match var(name) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse()
            .ok()
            .filter(|m| (1..=max).contains(m))
            .ok_or_else(|| format!("{name}: {v:?} is not a number from 1 to {max}")),
    }
}

fn dataplane_from_env(var: &dyn Fn(&str) -> Option<String>, short: bool) -> Result<Option<DpSettings>> {
    match var("BENCH_DATAPLANE").as_deref().map(str::trim) {
        None | Some("1") => {}
        Some("0") => return Ok(None),
        Some(other) => return Err(format!("BENCH_DATAPLANE: {other:?} is neither 0 nor 1")),
    }
    let seconds = match var("BENCH_DP_SECONDS") {
        None if short => 1.0,
        None => 3.0,
        Some(s) => s
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| (0.5..=60.0).contains(s))
            .ok_or_else(|| format!("BENCH_DP_SECONDS: {s:?} is not a number of seconds from 0.5 to 60"))?,
    };
    let forwards =
        var("BENCH_DP_FORWARDS")
            .unwrap_or_else(|| if short { "1,100" } else { "1,100,1000" }.into())
            .split(',')
            .map(|s| {
                s.trim().parse().ok().filter(|n| (1..=MAX_FORWARDS).contains(n)).ok_or_else(|| {
                    format!("BENCH_DP_FORWARDS: {s:?} is not a number of forwards from 1 to {MAX_FORWARDS}")
                })
            })
            .collect::<Result<Vec<usize>>>()?;
    if !forwards.windows(2).all(|w| w[0] < w[1]) {
        return Err(format!("BENCH_DP_FORWARDS must be ascending: {forwards:?}"));
    }
    let per_attachment = count_from_env(var, "BENCH_DP_MAPPINGS", 1, 1000)?;
    let first_reps = count_from_env(var, "BENCH_DP_FIRST_REPS", if short { 2 } else { 5 }, 100)?;
    Ok(Some(DpSettings { seconds, forwards, per_attachment, first_reps }))
}
