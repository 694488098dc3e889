//! Fields of bridge-nat's entry that nothing reads: a typo such as `portForwardin` would otherwise
//! do nothing at all, silently. They stay accepted (runtimes and meta-plugins add their own keys,
//! and a newer config must still load in an older plugin); each is named in a warning with the
//! nearest known name. The known names are exactly the ones serde accepts, asked of the raw types
//! themselves, plus the keys the CNI specification defines for every plugin's entry.

use super::raw::{RawConf, RawOutbound, RawPortForwarding, RawRouting, RawRule, RawRuleRouting};
use serde::de::{self, Deserialize, Deserializer, Visitor};
use serde_json::Value;

/// Keys the CNI specification (or libcni) puts in any plugin's entry.
const CNI_STANDARD: &[&str] =
    &["cniVersion", "name", "type", "args", "ipMasq", "ipam", "dns", "capabilities", "prevResult", "runtimeConfig"];

/// One warning per field bridge-nat does not know, nearest known name included.
pub(super) fn unknown_fields(conf: &Value) -> Vec<String> {
    let mut top: Vec<&'static str> = fields_of::<RawConf>().to_vec();
    top.extend_from_slice(CNI_STANDARD);
    let mut out = Vec::new();
    check(conf, "", &top, &mut out);
    if let Some(routing) = conf.get("routing") {
        check(routing, "routing.", fields_of::<RawRouting>(), &mut out);
        if let Some(o) = routing.get("outbound") {
            check(o, "routing.outbound.", fields_of::<RawOutbound>(), &mut out);
        }
    }
    if let Some(pf) = conf.get("portForwarding") {
        check(pf, "portForwarding.", fields_of::<RawPortForwarding>(), &mut out);
        for (i, rule) in pf.get("rules").and_then(Value::as_array).into_iter().flatten().enumerate() {
            let at = format!("portForwarding.rules[{i}].");
            check(rule, &at, fields_of::<RawRule>(), &mut out);
            if let Some(r) = rule.get("routing") {
                check(r, &format!("{at}routing."), fields_of::<RawRuleRouting>(), &mut out);
                if let Some(o) = r.get("outbound") {
                    check(o, &format!("{at}routing.outbound."), fields_of::<RawOutbound>(), &mut out);
                }
            }
        }
    }
    // runtimeConfig is the runtime's, filled from capabilities other plugins may have declared.
    out
}

fn check(obj: &Value, at: &str, known: &[&str], out: &mut Vec<String>) {
    let Some(map) = obj.as_object() else { return };
    for key in map.keys() {
        // Namespaced keys ("cni.dev/valid-attachments", "example.com/x") belong to someone else.
        if known.contains(&key.as_str()) || key.contains('/') {
            continue;
        }
        let mut msg = format!("unknown field {at}{key} in the bridge-nat config is ignored");
        if let Some(near) = nearest(key, known) {
            msg.push_str(&format!("; did you mean {near}?"));
        }
        out.push(msg);
    }
}

/// The known name closest to `key` (case does not count), if any is close enough to be a typo.
fn nearest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    let key = key.to_lowercase();
    let (best, distance) = known.iter().map(|k| (*k, levenshtein(&key, &k.to_lowercase()))).min_by_key(|(_, d)| *d)?;
    (distance <= (key.chars().count() / 2).max(2)).then_some(best)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1).min(row[j] + 1).min(diagonal + usize::from(ca != *cb));
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// The field names serde's derive gives `deserialize_struct` for `T`: exactly what it accepts.
fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(FieldNames(&mut fields));
    fields
}

struct FieldNames<'a>(&'a mut &'static [&'static str]);

impl<'de> Deserializer<'de> for FieldNames<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("only structs are asked for their field names"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("field names taken"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
        unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn known_names_are_what_serde_accepts() {
        let top = fields_of::<RawConf>();
        for name in ["portForwarding", "stateDir", "markMask", "cni.dev/valid-attachments", "type"] {
            assert!(top.contains(&name), "{name} missing from {top:?}");
        }
        assert!(fields_of::<RawRule>().contains(&"destIP"));
        assert!(fields_of::<RawOutbound>().contains(&"useDefaultRoute"));
    }

    #[test]
    fn a_typo_is_named_with_the_nearest_known_name() {
        let conf = json!({
            "cniVersion": "1.0.0", "name": "dind", "type": "bridge-nat", "ipam": {}, "capabilities": {},
            "portForwardin": { "rules": [] },
            "cni.dev/valid-attachments": [],
            "runtimeConfig": { "bandwidth": {} },
        });
        assert_eq!(
            unknown_fields(&conf),
            vec!["unknown field portForwardin in the bridge-nat config is ignored; did you mean portForwarding?"]
        );
    }

    #[test]
    fn nested_typos_are_named_by_their_path() {
        let conf = json!({
            "routing": { "tableID": 100, "outbound": { "interfaces": "eth0" } },
            "portForwarding": { "rules": [
                { "hostPort": 1, "destPort": 2 },
                { "hostport": 1, "destPort": 2, "routing": { "fwMark": "0x1", "outbound": { "gatway": "1.2.3.4" } } }
            ] }
        });
        assert_eq!(
            unknown_fields(&conf),
            vec![
                "unknown field routing.tableID in the bridge-nat config is ignored; did you mean tableId?",
                "unknown field routing.outbound.interfaces in the bridge-nat config is ignored; did you mean interface?",
                "unknown field portForwarding.rules[1].hostport in the bridge-nat config is ignored; did you mean \
                 hostPort?",
                "unknown field portForwarding.rules[1].routing.fwMark in the bridge-nat config is ignored; did you \
                 mean fwmark?",
                "unknown field portForwarding.rules[1].routing.outbound.gatway in the bridge-nat config is ignored; \
                 did you mean gateway?",
            ]
        );
    }

    #[test]
    fn a_name_far_from_every_known_one_gets_no_guess() {
        let msgs = unknown_fields(&json!({ "colour": "blue" }));
        assert_eq!(msgs, vec!["unknown field colour in the bridge-nat config is ignored"]);
    }

    #[test]
    fn levenshtein_counts_edits() {
        assert_eq!(levenshtein("portforwardin", "portforwarding"), 1);
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("", "abc"), 3);
    }
}
