//! IPv6 settings of an uplink that defeat what bridge-nat sets up without being its own to change:
//! said at ADD (logged), since nothing in the tables or the firewall shows them. (Temporary
//! addresses no longer are: the pods' IPv6 egress is translated to a stable address, see
//! commands/snat6.rs, which warns of an uplink that has none.)

/// `sysctl(key)` reads `net/ipv6/conf/<uplink>/<key>` (or `all`'s when `uplink` is "all");
/// `advertised`: the uplink's IPv6 gateway is link-local, as router advertisements install it.
pub fn uplink_warnings(uplink: &str, advertised: bool, sysctl: impl Fn(&str, &str) -> Option<i64>) -> Vec<String> {
    let mut out = Vec::new();
    let forwarding = sysctl("all", "forwarding").unwrap_or(0) == 1 || sysctl(uplink, "forwarding").unwrap_or(0) == 1;
    // With forwarding on, the kernel takes router advertisements only where accept_ra is 2: the
    // uplink's advertised default then expires and is never renewed.
    if advertised && forwarding && sysctl(uplink, "accept_ra") == Some(1) {
        out.push(format!(
            "uplink {uplink} ignores router advertisements (IPv6 forwarding is on and its accept_ra is 1): a \
             router-advertised default expires and is not renewed; set net.ipv6.conf.{uplink}.accept_ra=2"
        ));
    }
    out
}

/// Reads `/proc/sys/net/ipv6/conf/<uplink>/<key>`; None when absent (an uplink not there yet).
pub fn read_ipv6_conf(uplink: &str, key: &str) -> Option<i64> {
    std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{uplink}/{key}")).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf<'a>(values: &'a [(&'a str, &'a str, i64)]) -> impl Fn(&str, &str) -> Option<i64> + 'a {
        move |i, k| values.iter().find(|(vi, vk, _)| *vi == i && *vk == k).map(|v| v.2)
    }

    #[test]
    fn a_forwarding_node_that_ignores_advertisements_is_told_to_accept_them() {
        let ignoring = [("all", "forwarding", 1), ("wan1", "accept_ra", 1)];
        let w = uplink_warnings("wan1", true, conf(&ignoring));
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("net.ipv6.conf.wan1.accept_ra=2"), "{w:?}");
        assert!(uplink_warnings("wan1", true, conf(&[("all", "forwarding", 1), ("wan1", "accept_ra", 2)])).is_empty());
        assert!(uplink_warnings("wan1", true, conf(&[("all", "forwarding", 0), ("wan1", "accept_ra", 1)])).is_empty());
        // A static gateway needs no advertisements.
        assert!(uplink_warnings("wan1", false, conf(&ignoring)).is_empty());
    }
}
