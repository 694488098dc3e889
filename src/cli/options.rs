//! Command-line options shared by every subcommand. The defaults are the plugin's own, so a
//! subcommand sees the records a CNI call with a default config wrote.

use crate::agent::WatchOptions;
use crate::config::{Settings, DEFAULT_LOG_FILE, DEFAULT_STATE_DIR};
use std::net::SocketAddr;
use std::path::PathBuf;

pub const HELP: &str = "options:\n  \
    --state-dir DIR   the plugin's stateDir (default /run/bridge-nat)\n  \
    --log-file FILE   the plugin's logFile (default /var/log/bridge-nat.log)\n  \
    --log-level LEVEL error, warn, info, debug (default info)\n  \
    --iptables TOOL   iptables, iptables-nft, iptables-legacy or a path (default iptables)\n  \
    --json            machine-readable output\n  \
    --interval SECS   watch: the safety reconcile's period (default 300)\n  \
    --metrics ADDR:PORT  watch: serve /metrics (Prometheus) and /healthz there (default: off;\n                         an IPv6 ADDR with or without brackets)\n  \
    --yes             uninstall: really remove";

#[derive(Debug, Clone)]
pub struct Options {
    pub settings: Settings,
    pub json: bool,
    pub yes: bool,
    /// Log lines also go to stderr (the agent, so journald and `kubectl logs` see them).
    pub echo_log: bool,
    pub interval_secs: u64,
    pub metrics: Option<SocketAddr>,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options, String> {
        let mut settings = Settings {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            log_file: PathBuf::from(DEFAULT_LOG_FILE),
            ..Settings::default()
        };
        let mut opts = Options {
            settings: Settings::default(),
            json: false,
            yes: false,
            echo_log: true,
            interval_secs: 300,
            metrics: None,
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
                _ => (arg.as_str(), None),
            };
            let mut value = |name: &str| -> Result<String, String> {
                inline.clone().or_else(|| it.next().cloned()).ok_or_else(|| format!("{name} needs a value"))
            };
            match flag {
                "--state-dir" => settings.state_dir = absolute(&value(flag)?, flag)?,
                "--log-file" => settings.log_file = absolute(&value(flag)?, flag)?,
                "--log-level" => {
                    let v = value(flag)?;
                    settings.log_level = v.parse().map_err(|_| format!("--log-level: {v:?} is not a level"))?;
                }
                "--iptables" => settings.iptables = value(flag)?,
                "--interval" => {
                    let v = value(flag)?;
                    opts.interval_secs = v
                        .parse()
                        .ok()
                        .filter(|s| (1..=86_400).contains(s))
                        .ok_or_else(|| format!("--interval: {v:?} is not a number of seconds from 1 to 86400"))?;
                }
                "--metrics" => {
                    let v = value(flag)?;
                    let addr = parse_listen(&v).ok_or_else(|| {
                        format!("--metrics: {v:?} is not an address and port (e.g. 127.0.0.1:9469 or [fd00::1]:9469)")
                    })?;
                    opts.metrics = Some(addr);
                }
                "--json" => opts.json = true,
                "--yes" => opts.yes = true,
                other => return Err(format!("unknown option {other:?}")),
            }
        }
        opts.settings = settings;
        Ok(opts)
    }

    /// What `watch` needs of them.
    pub fn watch_options(&self) -> WatchOptions {
        WatchOptions { settings: self.settings.clone(), interval_secs: self.interval_secs, metrics: self.metrics }
    }
}

fn absolute(v: &str, flag: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(v);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(format!("{flag}: {v:?} must be an absolute path"))
    }
}

/// `ADDR:PORT`, where an IPv6 ADDR may also come without brackets (the port is after the last
/// colon): the DaemonSet writes `$(NODE_IP):9469`, and Kubernetes gives an IPv6-only node's
/// address bare.
fn parse_listen(v: &str) -> Option<SocketAddr> {
    if let Ok(addr) = v.parse() {
        return Some(addr);
    }
    let (host, port) = v.rsplit_once(':')?;
    let ip: std::net::Ipv6Addr = host.parse().ok()?;
    Some(SocketAddr::new(ip.into(), port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_take_values_separately_or_inline() {
        let o = Options::parse(&args(&["--state-dir", "/tmp/s", "--log-file=/tmp/l", "--json", "--interval", "7"]))
            .unwrap();
        assert_eq!(o.settings.state_dir, PathBuf::from("/tmp/s"));
        assert_eq!(o.settings.log_file, PathBuf::from("/tmp/l"));
        assert!(o.json && !o.yes);
        assert_eq!(o.interval_secs, 7);
        assert_eq!(o.metrics, None);
        let o = Options::parse(&args(&["--metrics", "127.0.0.1:9469"])).unwrap();
        assert_eq!(o.watch_options().metrics, Some("127.0.0.1:9469".parse().unwrap()));
    }

    #[test]
    fn defaults_are_the_plugins() {
        let o = Options::parse(&[]).unwrap();
        assert_eq!(o.settings.state_dir, PathBuf::from("/run/bridge-nat"));
        assert_eq!(o.settings.log_file, PathBuf::from("/var/log/bridge-nat.log"));
    }

    #[test]
    fn mistakes_name_the_option() {
        assert!(Options::parse(&args(&["--state-dir"])).unwrap_err().contains("--state-dir needs a value"));
        assert!(Options::parse(&args(&["--state-dir", "rel"])).unwrap_err().contains("absolute"));
        assert!(Options::parse(&args(&["--frobnicate"])).unwrap_err().contains("--frobnicate"));
        assert!(Options::parse(&args(&["--interval", "0"])).unwrap_err().contains("--interval"));
        assert!(Options::parse(&args(&["--metrics", "9469"])).unwrap_err().contains("--metrics: \"9469\""));
        assert!(Options::parse(&args(&["--metrics", "fd00::1"])).is_err(), "an address without a port");
        assert!(Options::parse(&args(&["--metrics", "10.0.0.1:99999"])).is_err());
    }

    #[test]
    fn metrics_take_an_ipv6_address_with_or_without_brackets() {
        for v in ["[fd00::1]:9469", "fd00::1:9469"] {
            let o = Options::parse(&args(&["--metrics", v])).unwrap();
            assert_eq!(o.metrics, Some("[fd00::1]:9469".parse().unwrap()), "{v}");
        }
    }
}
