//! A real Prometheus server (Debian's `prometheus`) in a node namespace, with its own config and
//! data directory, scraping targets there every second; and its HTTP API, asked from inside the
//! namespace with curl. Killed, and its data directory removed, when dropped.

use super::{wait_for, Background, Node};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Where it listens, in the node namespace.
pub const LISTEN: &str = "127.0.0.1:9090";

pub struct Prometheus<'a> {
    node: &'a Node,
    dir: PathBuf,
    server: Option<Background>,
}

/// Fails (in CI too: a missing tool is a failure there, not a skip) when `tool` is not installed.
pub fn require_tool(tool: &str) {
    let found =
        Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success());
    assert!(found, "{tool} is not installed: run tests/install-deps.sh (Debian's prometheus and curl packages)");
}

impl<'a> Prometheus<'a> {
    /// Start it in `node`'s namespace, scraping `target` (host:port) as job `bridge-nat` every 1 s.
    pub fn start(node: &'a Node, target: &str) -> Prometheus<'a> {
        require_tool("prometheus");
        require_tool("curl");
        let dir = node.dir().join("prometheus");
        std::fs::create_dir_all(dir.join("data")).expect("create the prometheus directory");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: bridge-nat\n    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("write prometheus.yml");
        let server = node.ns.spawn(&format!(
            "exec prometheus --config.file={0}/prometheus.yml --storage.tsdb.path={0}/data \
             --web.listen-address={LISTEN} >{0}/prometheus.log 2>&1",
            dir.display()
        ));
        let p = Prometheus { node, dir, server: Some(server) };
        let ready = wait_for(|| p.get("/-/ready").is_some(), Duration::from_secs(30));
        assert!(ready, "prometheus did not become ready:\n{}", p.log());
        p
    }

    /// The body of GET `path`, if it answered 2xx.
    fn get(&self, path: &str) -> Option<String> {
        let out = self.node.ns.exec(&["curl", "-sf", "-m", "2", &format!("http://{LISTEN}{path}")]);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// An instant query through the HTTP API: each series' labels and value.
    pub fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        let out = self.node.ns.exec(&[
            "curl",
            "-sf",
            "-m",
            "2",
            &format!("http://{LISTEN}/api/v1/query"),
            "--data-urlencode",
            &format!("query={promql}"),
        ]);
        assert!(out.status.success(), "query {promql}: curl failed: {}", String::from_utf8_lossy(&out.stderr));
        let body: Value = serde_json::from_slice(&out.stdout).expect("the query API answers JSON");
        assert_eq!(body["status"], "success", "query {promql}: {body}");
        body["data"]["result"]
            .as_array()
            .expect("a vector result")
            .iter()
            .map(|s| (s["metric"].clone(), s["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)))
            .collect()
    }

    /// Waits until `promql` has a series for which `pred` holds; panics with what it last saw.
    #[track_caller]
    pub fn wait_for_series(&self, promql: &str, timeout: Duration, pred: impl Fn(&Value, f64) -> bool) -> f64 {
        let mut last = Vec::new();
        let mut found = None;
        wait_for(
            || {
                last = self.query(promql);
                found = last.iter().find(|(m, v)| pred(m, *v)).map(|(_, v)| *v);
                found.is_some()
            },
            timeout,
        );
        found.unwrap_or_else(|| {
            panic!("prometheus never had the series wanted for {promql}; last: {last:?}\n{}", self.log())
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        // Killed and reaped before its data directory goes.
        drop(self.server.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
