//! diff() against a simulator of `iptables-restore --noflush`, for any two states (property tests).

use super::tests::*;
use super::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

// ---------------------------------------------------------------- simulator and properties

type ChainKey = (Family, String, String);

/// iptables-restore --noflush, as far as the plugin's scripts use it, failing where the kernel
/// would: unknown chain, jump to a missing chain, -D of an absent rule, -X of a non-empty or
/// still referenced chain, and any chain line for a built-in or foreign chain.
#[derive(Debug, Default)]
pub(super) struct Sim {
    chains: BTreeMap<ChainKey, Vec<String>>,
}

impl Sim {
    pub(super) fn from_current(cur: &Current) -> Sim {
        let mut s = Sim::default();
        for c in &cur.chains {
            s.chains.entry(c.clone()).or_default();
        }
        for r in &cur.rules {
            s.chains.entry((r.family, r.table.clone(), r.chain.clone())).or_default().push(r.spec.clone());
        }
        s
    }

    fn chain_mut(&mut self, key: &ChainKey) -> std::result::Result<&mut Vec<String>, String> {
        if is_own_chain(&key.2) {
            self.chains.get_mut(key).ok_or_else(|| format!("no chain {key:?}"))
        } else {
            Ok(self.chains.entry(key.clone()).or_default())
        }
    }

    fn check_target(&self, f: Family, table: &str, spec: &str) -> std::result::Result<(), String> {
        match Rule::new(f, table, "X", spec).jump_target() {
            Some(t) if !self.chains.contains_key(&(f, table.to_string(), t.to_string())) => {
                Err(format!("jump to missing chain {t}"))
            }
            _ => Ok(()),
        }
    }

    fn apply(&mut self, f: Family, script: &str) -> std::result::Result<(), String> {
        let mut table: Option<String> = None;
        for line in script.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = Some(t.to_string());
                continue;
            }
            if line == "COMMIT" {
                table = None;
                continue;
            }
            let t = table.clone().ok_or_else(|| format!("{line:?} outside a table"))?;
            let key = |c: &str| (f, t.clone(), c.to_string());
            if let Some(decl) = line.strip_prefix(':') {
                let (c, rest) = decl.split_once(' ').ok_or("bad declaration")?;
                if rest != "- [0:0]" || !is_own_chain(c) {
                    return Err(format!("declaration {line:?} of a built-in or foreign chain"));
                }
                self.chains.entry(key(c)).or_default().clear();
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let (c, spec) = rest.split_once(' ').ok_or("bad -A")?;
                self.check_target(f, &t, spec)?;
                self.chain_mut(&key(c))?.push(spec.to_string());
            } else if let Some(rest) = line.strip_prefix("-I ") {
                let (c, rest) = rest.split_once(' ').ok_or("bad -I")?;
                let spec = rest.strip_prefix("1 ").ok_or("-I without position 1")?;
                self.check_target(f, &t, spec)?;
                self.chain_mut(&key(c))?.insert(0, spec.to_string());
            } else if let Some(rest) = line.strip_prefix("-D ") {
                let (c, spec) = rest.split_once(' ').ok_or("bad -D")?;
                let chain = self.chain_mut(&key(c))?;
                let at = chain.iter().position(|s| s == spec).ok_or_else(|| format!("{line:?}: no such rule"))?;
                chain.remove(at);
            } else if let Some(c) = line.strip_prefix("-X ") {
                let k = key(c);
                if !is_own_chain(c) {
                    return Err(format!("{line:?} of a foreign chain"));
                }
                match self.chains.get(&k) {
                    None => return Err(format!("{line:?}: no such chain")),
                    Some(rules) if !rules.is_empty() => return Err(format!("{line:?}: chain not empty")),
                    Some(_) => {}
                }
                let referenced = self.chains.iter().any(|((rf, rt, rc), specs)| {
                    *rf == f
                        && *rt == t
                        && specs.iter().any(|s| Rule::new(f, &t, rc, s.as_str()).jump_target() == Some(c))
                });
                if referenced {
                    return Err(format!("{line:?}: chain still referenced"));
                }
                self.chains.remove(&k);
            } else {
                return Err(format!("unknown line {line:?}"));
            }
        }
        if table.is_some() {
            return Err("missing COMMIT".into());
        }
        Ok(())
    }

    pub(super) fn apply_tx(&mut self, tx: &Transaction) -> std::result::Result<(), String> {
        for f in [Family::Ipv4, Family::Ipv6] {
            if let Some(s) = tx.script(f) {
                self.apply(f, &s)?;
            }
        }
        Ok(())
    }

    pub(super) fn rules(&self) -> Vec<Rule> {
        self.chains
            .iter()
            .flat_map(|((f, t, c), specs)| specs.iter().map(move |s| Rule::new(*f, t, c, s.as_str())))
            .collect()
    }

    fn own_chains(&self) -> BTreeSet<ChainKey> {
        self.chains.keys().filter(|k| is_own_chain(&k.2)).cloned().collect()
    }

    fn current(&self) -> Current {
        Current { rules: self.rules(), chains: self.own_chains() }
    }
}

/// Rules shaped like plan::plan's, over both families and tables, plus an own chain reached
/// only by its own rules.
fn universe() -> Vec<Rule> {
    let mut u = Vec::new();
    for f in [Family::Ipv4, Family::Ipv6] {
        u.extend(jumps(f));
        for (i, port) in [30080, 30081, 30082].into_iter().enumerate() {
            let c = format!("-m comment --comment bridge-nat:dind:c{i}:net1");
            u.push(Rule::new(
                f,
                "nat",
                DNAT,
                format!("-p tcp -m tcp --dport {port} {c} -j DNAT --to-destination pod{i}:80"),
            ));
            u.push(Rule::new(
                f,
                "filter",
                FWD,
                format!("-d pod{i} -o dind-br0 -p tcp -m tcp --dport 80 {c} -j ACCEPT"),
            ));
        }
        u.push(Rule::new(
            f,
            "nat",
            POSTRT,
            "-s subnet ! -o dind-br0 -m comment --comment bridge-nat:dind -j MASQUERADE",
        ));
        u.push(Rule::new(f, "nat", POSTRT, "-s subnet -o dind-br0 -m comment --comment bridge-nat:dind -j MASQUERADE"));
        u.push(Rule::new(f, "filter", FWD, "-i dind-br0 -m comment --comment bridge-nat:dind -j ACCEPT"));
    }
    u.push(r4("mangle", "BRIDGE-NAT-MARK", "-j MARK --set-xmark 0x64/0x1fff"));
    u.push(r4("mangle", "BRIDGE-NAT-MARK", "-j CONNMARK --save-mark"));
    u
}

fn pick(universe: &[Rule], counts: &[u8]) -> Vec<Rule> {
    universe.iter().zip(counts).flat_map(|(r, n)| std::iter::repeat_n(r.clone(), *n as usize)).collect()
}

fn set_of(universe: &[Rule], mask: &[bool]) -> BTreeSet<Rule> {
    universe.iter().zip(mask).filter(|(_, k)| **k).map(|(r, _)| r.clone()).collect()
}

fn check_reaches(cur: &Current, b: &BTreeSet<Rule>) -> std::result::Result<(), TestCaseError> {
    let tx = diff(cur, b);
    let mut sim = Sim::from_current(cur);
    if let Err(e) = sim.apply_tx(&tx) {
        return Err(TestCaseError::fail(format!(
            "{e}\nv4:\n{}\nv6:\n{}",
            tx.script(Family::Ipv4).unwrap_or_default(),
            tx.script(Family::Ipv6).unwrap_or_default()
        )));
    }
    let got = sim.rules();
    let got_set: BTreeSet<Rule> = got.iter().cloned().collect();
    prop_assert_eq!(got.len(), got_set.len(), "duplicates left: {:?}", got);
    prop_assert_eq!(&got_set, b);
    prop_assert_eq!(sim.own_chains(), Current::from_rules(b).chains);
    // Converged: nothing more to do.
    prop_assert!(diff(&sim.current(), b).is_empty());
    Ok(())
}

const N: usize = 28;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn diff_takes_a_to_b(a in prop::collection::vec(any::<bool>(), N), b in prop::collection::vec(any::<bool>(), N)) {
        let u = universe();
        prop_assert_eq!(u.len(), N);
        let a = set_of(&u, &a);
        let b = set_of(&u, &b);
        check_reaches(&Current::from_rules(&a), &b)?;
    }

    #[test]
    fn diff_takes_a_with_duplicates_to_b(a in prop::collection::vec(0u8..3, N), b in prop::collection::vec(any::<bool>(), N)) {
        let u = universe();
        let rules = pick(&u, &a);
        let cur = Current { chains: Current::from_rules(&rules).chains, rules };
        check_reaches(&cur, &set_of(&u, &b))?;
    }

    #[test]
    fn diff_from_parse_save_of_the_simulated_state(a in prop::collection::vec(any::<bool>(), N), b in prop::collection::vec(any::<bool>(), N)) {
        // Render A as iptables-save would (with quoted comments), parse it back, and diff from there.
        let u = universe();
        let a = set_of(&u, &a);
        let sim = Sim::from_current(&Current::from_rules(&a));
        for f in [Family::Ipv4, Family::Ipv6] {
            let mut text = String::new();
            let tables: BTreeSet<&String> = sim.chains.keys().filter(|k| k.0 == f).map(|k| &k.1).collect();
            for t in tables {
                text.push_str(&format!("*{t}\n"));
                for ((_, _, c), _) in sim.chains.iter().filter(|(k, _)| k.0 == f && &k.1 == t) {
                    let policy = if is_own_chain(c) { "-" } else { "ACCEPT" };
                    text.push_str(&format!(":{c} {policy} [0:0]\n"));
                }
                for ((_, _, c), specs) in sim.chains.iter().filter(|(k, _)| k.0 == f && &k.1 == t) {
                    for s in specs {
                        let quoted = match s.split_once("--comment ") {
                            Some((pre, rest)) if rest.contains(':') => {
                                let (val, post) = rest.split_once(' ').unwrap_or((rest, ""));
                                format!("{pre}--comment \"{val}\" {post}")
                            }
                            _ => s.clone(),
                        };
                        text.push_str(&format!("-A {c} {}\n", quoted.trim_end()));
                    }
                }
                text.push_str("COMMIT\n");
            }
            let parsed = parse_save(f, &text);
            let want = Current::from_rules(a.iter().filter(|r| r.family == f));
            prop_assert_eq!(parsed.chains, want.chains);
            prop_assert_eq!(parsed.rules.into_iter().collect::<BTreeSet<_>>(), want.rules.into_iter().collect::<BTreeSet<_>>());
        }
        check_reaches(&Current::from_rules(&a), &set_of(&u, &b))?;
    }
}
