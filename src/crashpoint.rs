//! Test hook for the kill-mid-call tests: `BRIDGE_NAT_CRASH_AT=<point>` makes the process SIGKILL
//! itself at that point, exactly as a runtime's timeout would; `panic:<point>` panics there instead
//! (to prove a panic still ends as a CNI error). Unset, it costs one env lookup.

pub fn reached(point: &str) {
    let Some(wanted) = std::env::var_os("BRIDGE_NAT_CRASH_AT") else { return };
    if wanted == point {
        log::warn!("crash point {point}: killing myself (BRIDGE_NAT_CRASH_AT)");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    } else if wanted.to_str().and_then(|w| w.strip_prefix("panic:")) == Some(point) {
        panic!("crash point {point}: panicking (BRIDGE_NAT_CRASH_AT)");
    }
}
