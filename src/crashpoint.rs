//! Test hook for the kill-mid-call tests: `BRIDGE_NAT_CRASH_AT=<point>` makes the process SIGKILL
//! itself at that point, exactly as a runtime's timeout would. Unset, it costs one env lookup.

pub fn reached(point: &str) {
    if std::env::var_os("BRIDGE_NAT_CRASH_AT").is_some_and(|p| p == point) {
        log::warn!("crash point {point}: killing myself (BRIDGE_NAT_CRASH_AT)");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
