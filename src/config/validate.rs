//! Validation field by field: every rejection names the field and the value. Never touches the node.

use super::failover;
use super::raw::*;
use super::unique::{check_unique_host_ports, check_unique_marks_and_tables};
use super::*;
use crate::cni;
use crate::error::{Error, Result};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

fn invalid(msg: String) -> Error {
    Error::invalid_config(msg)
}

pub(super) fn validate(raw: RawConf) -> Result<NetConf> {
    validate_network_name(&raw.name)?;
    if raw.plugin_type != "bridge-nat" && !raw.plugin_type.is_empty() {
        log::debug!("running as type {:?}", raw.plugin_type);
    }
    let settings = validate_settings(&raw)?;
    if let Some(b) = &raw.bridge {
        cni::validate_ifname(b).map_err(|e| invalid(format!("bridge: {}", e.msg)))?;
    }
    let routing = match &raw.routing {
        Some(r) if r.enabled.unwrap_or_else(|| names_global_routing(r)) => {
            Some(validate_global_routing(r, settings.mark_mask, &raw.port_forwarding.rules)?)
        }
        _ => None,
    };
    let rules = raw
        .port_forwarding
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| validate_rule(r, settings.mark_mask).map_err(|e| e.context(format!("portForwarding.rules[{i}]"))))
        .collect::<Result<Vec<_>>>()?;
    let port_mappings = runtime::port_mappings(raw.runtime_config.as_ref())?
        .iter()
        .enumerate()
        .map(|(i, m)| validate_mapping(m).map_err(|e| e.context(format!("runtimeConfig.portMappings[{i}]"))))
        .collect::<Result<Vec<_>>>()?;
    check_unique_host_ports(&rules, &port_mappings)?;
    check_unique_marks_and_tables(routing.as_ref(), &rules)?;
    let reply_via = validate_reply_via(raw.routing.as_ref().and_then(|r| r.reply_via.as_deref()))?;
    let valid_attachments = runtime::valid_attachments(raw.valid_attachments.as_ref())?.map(|list| {
        list.into_iter()
            .map(|a| AttachmentId { network: raw.name.clone(), container_id: a.container_id, ifname: a.ifname })
            .collect()
    });
    Ok(NetConf {
        cni_version: raw.cni_version,
        name: raw.name,
        bridge: raw.bridge,
        masquerade: raw.masquerade.unwrap_or(true),
        routing,
        reply_via,
        rules,
        port_mappings,
        settings,
        prev_result: raw.prev_result,
        valid_attachments,
    })
}

pub(super) fn validate_network_name(name: &str) -> Result<()> {
    if cni::is_spec_name(name) {
        Ok(())
    } else {
        Err(invalid(format!(
            "name: {name:?} must start with a letter or digit and hold only letters, digits, '_', '.' and '-'"
        )))
    }
}

pub(super) fn validate_settings(raw: &RawConf) -> Result<Settings> {
    let mut s = Settings::default();
    if let Some(f) = raw.log_file.as_deref().filter(|f| !f.is_empty()) {
        s.log_file = absolute_path("logFile", f)?;
    }
    if let Some(level) = raw.log_level.as_deref().filter(|l| !l.is_empty()) {
        s.log_level = level
            .parse()
            .map_err(|_| invalid(format!("logLevel: {level:?} is not one of off, error, warn, info, debug, trace")))?;
    }
    if let Some(d) = raw.state_dir.as_deref().filter(|d| !d.is_empty()) {
        s.state_dir = absolute_path("stateDir", d)?;
    }
    if let Some(ms) = raw.lock_timeout_ms {
        if !(1..=300_000).contains(&ms) {
            return Err(invalid(format!("lockTimeoutMs: {ms} is outside 1-300000")));
        }
        s.lock_timeout = Duration::from_millis(ms);
    }
    if let Some(ipt) = raw.iptables.as_deref().filter(|i| !i.is_empty()) {
        let base = ipt.rsplit('/').next().unwrap_or(ipt);
        if !["iptables", "iptables-legacy", "iptables-nft"].contains(&base)
            || (ipt.contains('/') && !ipt.starts_with('/'))
        {
            return Err(invalid(format!(
                "iptables: {ipt:?} must be iptables, iptables-legacy or iptables-nft, optionally as an absolute path"
            )));
        }
        s.iptables = ipt.to_string();
    }
    match raw.backend.as_deref() {
        None | Some("") | Some("auto") => s.backend = BackendChoice::Auto,
        Some("iptables") => s.backend = BackendChoice::Only(Backend::Iptables),
        Some("nftables") => s.backend = BackendChoice::Only(Backend::Nftables),
        Some(other) => return Err(invalid(format!("backend: {other:?} must be auto, iptables or nftables"))),
    }
    if let Some(m) = &raw.mark_mask {
        let mask = parse_mark("markMask", m)?;
        if mask == 0 {
            return Err(invalid("markMask: must not be 0".into()));
        }
        s.mark_mask = mask;
    }
    Ok(s)
}

fn absolute_path(field: &str, p: &str) -> Result<PathBuf> {
    if !p.starts_with('/') || p.contains('\0') {
        return Err(invalid(format!("{field}: {p:?} must be an absolute path")));
    }
    Ok(PathBuf::from(p))
}

fn parse_mark(field: &str, m: &RawMark) -> Result<u32> {
    let parsed = match m {
        RawMark::Number(n) => u32::try_from(*n).ok(),
        RawMark::Text(t) => {
            let t = t.trim();
            match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                Some(hex) => u32::from_str_radix(hex, 16).ok(),
                None => t.parse::<u32>().ok(),
            }
        }
    };
    let shown = match m {
        RawMark::Number(n) => n.to_string(),
        RawMark::Text(t) => format!("{t:?}"),
    };
    parsed.ok_or_else(|| invalid(format!("{field}: {shown} is not a 32-bit mark (hex \"0x65\" or decimal)")))
}

fn validate_fwmark(field: &str, m: &RawMark, mask: u32) -> Result<u32> {
    let mark = parse_mark(field, m)?;
    if mark == 0 {
        return Err(invalid(format!("{field}: must not be 0 (0 means unmarked)")));
    }
    if mark & !mask != 0 {
        return Err(invalid(format!(
            "{field}: {mark:#x} has bits outside markMask {mask:#x} (bits owned by kube-proxy, portmap or Calico)"
        )));
    }
    Ok(mark)
}

fn validate_port(field: &str, p: i64) -> Result<u16> {
    match u16::try_from(p) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(invalid(format!("{field}: {p} is outside 1-65535"))),
    }
}

fn validate_protocol(p: &str) -> Result<Protocol> {
    match p.to_ascii_lowercase().as_str() {
        "" | "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        "sctp" => Ok(Protocol::Sctp),
        _ => Err(invalid(format!("protocol: {p:?} is not tcp, udp or sctp"))),
    }
}

fn validate_ip(field: &str, s: &str) -> Result<Option<IpAddr>> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| invalid(format!("{field}: {s:?} is not an IP address")))
}

fn validate_table_id(field: &str, id: Option<i64>) -> Result<u32> {
    match id {
        Some(id @ 1..=252) => Ok(id as u32),
        Some(id) => Err(invalid(format!("{field}: {id} is outside 1-252"))),
        None => Err(invalid(format!("{field}: is required"))),
    }
}

/// Names iproute2 can register and resolve: not a number, not a reserved table, no spaces.
fn validate_table_name(field: &str, name: &Option<String>) -> Result<Option<String>> {
    let Some(name) = name.as_deref().filter(|n| !n.is_empty()) else {
        return Ok(None);
    };
    let mut chars = name.chars();
    let ok = name.len() <= 64
        && matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !["local", "main", "default", "unspec"].contains(&name);
    if ok {
        Ok(Some(name.to_string()))
    } else {
        Err(invalid(format!(
            "{field}: {name:?} must start with a letter, hold only letters, digits, '_', '-' and '.', \
             be at most 64 bytes and not be local, main, default or unspec"
        )))
    }
}

fn validate_outbound(field: &str, o: &Option<RawOutbound>) -> Result<Outbound> {
    let Some(o) = o else {
        return Err(invalid(format!("{field}: is required")));
    };
    cni::validate_ifname(&o.interface).map_err(|e| invalid(format!("{field}.interface: {}", e.msg)))?;
    let (gateway, gateway6) = validate_gateways(field, o)?;
    Ok(Outbound { interface: o.interface.clone(), gateway, gateway6, use_default_route: o.use_default_route })
}

/// `gateway` is IPv4's next hop and `gateway6` IPv6's. An IPv6 address in `gateway` (which
/// earlier versions accepted and could not use) is taken as `gateway6` when that is not given.
pub(super) fn validate_gateways(field: &str, o: &RawOutbound) -> Result<(Option<IpAddr>, Option<IpAddr>)> {
    let gateway = validate_ip(&format!("{field}.gateway"), &o.gateway)?;
    let gateway6 = validate_ip(&format!("{field}.gateway6"), &o.gateway6)?;
    if let Some(gw) = gateway6.filter(IpAddr::is_ipv4) {
        return Err(invalid(format!("{field}.gateway6: {gw} is not an IPv6 address (IPv4's next hop is gateway)")));
    }
    match (gateway, gateway6) {
        (Some(gw), Some(_)) if gw.is_ipv6() => Err(invalid(format!(
            "{field}.gateway: {gw} is an IPv6 address and gateway6 is given too; gateway is IPv4's next hop"
        ))),
        (Some(gw), None) if gw.is_ipv6() => Ok((None, Some(gw))),
        other => Ok(other),
    }
}

/// A block that only says `replyVia` (for forwards with their own routing) turns nothing else on.
fn names_global_routing(r: &RawRouting) -> bool {
    r.table_id.is_some()
        || r.table_name.is_some()
        || r.fwmark.is_some()
        || r.rule_priority.is_some()
        || r.outbound.is_some()
}

fn validate_reply_via(v: Option<&str>) -> Result<ReplyVia> {
    match v {
        None | Some("arrival") => Ok(ReplyVia::Arrival),
        Some("rule") => Ok(ReplyVia::Rule),
        Some(other) => Err(invalid(format!("routing.replyVia: {other:?} is not one of \"arrival\", \"rule\""))),
    }
}

fn validate_global_routing(r: &RawRouting, mask: u32, rules: &[RawRule]) -> Result<GlobalRouting> {
    let rule_priority = match r.rule_priority {
        None => DEFAULT_RULE_PRIORITY,
        Some(p @ 1..=32755) => p as u32,
        Some(p) => return Err(invalid(format!("routing.rulePriority: {p} is outside 1-32755"))),
    };
    let table_id = validate_table_id("routing.tableId", r.table_id)?;
    let outbound = validate_outbound("routing.outbound", &r.outbound)?;
    let fallback = failover::validate_fallback(r, &outbound, table_id, rules)?;
    Ok(GlobalRouting {
        table_id,
        table_name: validate_table_name("routing.tableName", &r.table_name)?,
        fwmark: r.fwmark.as_ref().map(|m| validate_fwmark("routing.fwmark", m, mask)).transpose()?,
        rule_priority,
        health: failover::validate_health(r.health.as_ref(), !fallback.is_empty())?,
        fallback,
        outbound,
    })
}

fn validate_rule(r: &RawRule, mask: u32) -> Result<PortRule> {
    failover::refuse_rule_fallback(r)?;
    let routing = match &r.routing {
        None => None,
        Some(rr) => Some(RouteSpec {
            fwmark: match &rr.fwmark {
                Some(m) => validate_fwmark("routing.fwmark", m, mask)?,
                None => return Err(invalid("routing.fwmark: is required".into())),
            },
            table_id: validate_table_id("routing.tableId", rr.table_id)?,
            table_name: validate_table_name("routing.tableName", &rr.table_name)?,
            outbound: validate_outbound("routing.outbound", &rr.outbound)?,
        }),
    };
    Ok(PortRule {
        name: r.name.clone(),
        host_port: validate_port("hostPort", r.host_port)?,
        dest_ip: validate_ip("destIP", &r.dest_ip)?,
        pod: r.pod.as_deref().map(validate_pod).transpose()?,
        dest_port: validate_port("destPort", r.dest_port)?,
        protocol: validate_protocol(&r.protocol)?,
        routing,
    })
}

/// Kubernetes' own rules: the namespace is a DNS label, the name a DNS subdomain; so is the name's
/// prefix before a trailing `*`, which may be empty (every pod of the namespace).
fn validate_pod(s: &str) -> Result<PodSelector> {
    let bad = |why: &str| invalid(format!("pod: {s:?} {why}"));
    let (namespace, name) = s.split_once('/').ok_or_else(|| bad("is not NAMESPACE/NAME"))?;
    let (name, prefix) = match name.strip_suffix('*') {
        Some(p) => (p, true),
        None => (name, false),
    };
    let allowed = |c: char, dot: bool| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dot && c == '.');
    let starts_ok = |x: &str| x.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit());
    if namespace.is_empty()
        || namespace.len() > 63
        || !starts_ok(namespace)
        || !namespace.chars().all(|c| allowed(c, false))
    {
        return Err(bad("has a namespace that is not a DNS label (lowercase letters, digits and '-', at most 63)"));
    }
    let name_ok =
        name.len() <= 253 && (name.is_empty() && prefix || starts_ok(name)) && name.chars().all(|c| allowed(c, true));
    if !name_ok {
        return Err(bad(
            "has a name that is not a DNS subdomain (lowercase letters, digits, '-' and '.') with at most a trailing '*'",
        ));
    }
    Ok(PodSelector { namespace: namespace.to_string(), name: name.to_string(), prefix })
}

fn validate_mapping(m: &RawPortMapping) -> Result<PortMapping> {
    Ok(PortMapping {
        host_port: validate_port("hostPort", m.host_port)?,
        container_port: validate_port("containerPort", m.container_port)?,
        protocol: validate_protocol(&m.protocol)?,
        host_ip: validate_ip("hostIP", &m.host_ip)?.filter(|ip| !ip.is_unspecified()),
    })
}
