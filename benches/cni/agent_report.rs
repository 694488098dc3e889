//! The agent's part of the report: its CPU during and after a churn of pods, and the churn's ADD
//! times with and without it.

use std::fmt::Write;

use crate::agent::{AgentCost, AgentSettings, Row};
use crate::report::median_p95;

/// What the issue asks of the largest node, in % of one core over the two windows after the churn.
const GOAL_PERCENT: f64 = 5.0;

impl AgentCost {
    /// Ticks of the two windows after the churn as % of one core over them.
    fn percent(&self, row: &Row, s: &AgentSettings) -> f64 {
        let ticks = (row.after[0] + row.after[1]) as f64;
        ticks * 100.0 / (self.clk_tck.max(1) as f64 * 2.0 * s.window.as_secs_f64())
    }

    pub fn markdown(&self, s: &AgentSettings) -> String {
        let w = s.window.as_secs();
        let mut out = String::new();
        let _ = writeln!(out, "### The agent's cost: `bridge-nat watch` while {} pods start\n", s.churn);
        let _ = writeln!(
            out,
            "| pods on the node | agent's start, ticks | during the churn, ticks (s) | 0–{w} s after | {w}–{} s after | \
             % of a core, {} s after | check passes (during / after) | ADD with the agent, ms | ADD without, ms | \
             with ÷ without (median / p95) |",
            2 * w,
            2 * w
        );
        let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let cell = |v: &[std::time::Duration]| median_p95(v);
        for row in &self.rows {
            let (with, without) = (cell(&row.with_agent), cell(&row.without_agent));
            let ms = |c: Option<(f64, f64)>| c.map_or("—".into(), |(m, p)| format!("{m:.1} / {p:.1}"));
            let ratio = match (with, without) {
                (Some((wm, wp)), Some((om, op))) if om > 0.0 && op > 0.0 => {
                    format!("{:.2}× / {:.2}×", wm / om, wp / op)
                }
                _ => "—".into(),
            };
            let _ = writeln!(
                out,
                "| {} | {}{} | {} ({:.2} s) | {} | {} | {:.1}% | {} / {} / {} | {} | {} | {ratio} |",
                row.n,
                row.start_ticks,
                if row.settled { "" } else { " (still busy)" },
                row.churn_ticks,
                row.churn_time.as_secs_f64(),
                row.after[0],
                row.after[1],
                self.percent(row, s),
                row.passes[0],
                row.passes[1],
                row.passes[2],
                ms(with),
                ms(without),
            );
        }
        let _ = writeln!(
            out,
            "\nA churn of {c} pods on a node with N pods on its bridge (nftables backend): each pod a new namespace and \
             veth on the bridge (made with `ip`), then its ADD with one port mapping, one pod after another. The agent \
             (`bridge-nat watch --interval 300 --log-level debug`, a real process in the node namespace) started after \
             the N pods and settled (no tick for 0.5 s) before the churn. Ticks: its utime + stime + cutime + cstime \
             from /proc/PID/stat, CLK_TCK = {tck}; % of a core = the ticks of both windows after the churn ÷ (CLK_TCK \
             × {} s). Check passes: its debug log's `check pass` lines. ADD: median / p95 in ms of the churn's {c} \
             ADDs, spawn to exit; without: the same churn with new pods right after, the agent stopped.",
            2 * w,
            c = s.churn,
            tck = self.clk_tck,
        );
        if let Some(row) = self.rows.last() {
            let pct = self.percent(row, s);
            let not_slower = match (cell(&row.with_agent), cell(&row.without_agent)) {
                // At the table's precision (0.1 ms): a verdict that agrees with what it shows.
                (Some((wm, wp)), Some((om, op))) => {
                    let tenths = |ms: f64| (ms * 10.0).round() as i64;
                    tenths(wm) <= tenths(om) && tenths(wp) <= tenths(op)
                }
                _ => false,
            };
            let yes_no = |ok: bool| if ok { "met" } else { "**not met**" };
            let _ = writeln!(
                out,
                "\nGoal at {} pods: under {GOAL_PERCENT}% of a core over the {} s after the churn: {pct:.1}%, {}; \
                 no ADD slower with the agent (median and p95, to 0.1 ms): {}.",
                row.n,
                2 * w,
                yes_no(pct < GOAL_PERCENT),
                yes_no(not_slower)
            );
        }
        out
    }
}
