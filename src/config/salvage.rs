//! What can still be read of a config that does not decode: enough to log the failure where the
//! operator looks (`logFile`), to answer in the config's own `cniVersion`, and to let DEL remove
//! the record's attachment (`name`, `stateDir`) so that the runtime goes on to `bridge` and
//! `host-local` and the sandbox can be removed.

use super::raw::RawConf;
use super::validate::validate_settings;
use super::Settings;
use serde_json::{Map, Value};

/// The fields of `Settings`, each taken alone when it decodes and validates by itself.
const SETTINGS_FIELDS: &[&str] =
    &["logFile", "logLevel", "stateDir", "lockTimeoutMs", "iptables", "backend", "markMask"];

#[derive(Debug, Default)]
pub struct Salvage {
    pub cni_version: Option<String>,
    pub name: Option<String>,
    pub settings: Settings,
}

/// Never fails: what cannot be read stays None or at its default.
pub fn salvage(stdin: &[u8]) -> Salvage {
    let Ok(Value::Object(tree)) = serde_json::from_slice::<Value>(stdin) else { return Salvage::default() };
    let text = |key: &str| tree.get(key).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
    let settings_of = |fields: Map<String, Value>| {
        serde_json::from_value::<RawConf>(Value::Object(fields)).ok().and_then(|raw| validate_settings(&raw).ok())
    };
    let usable: Map<String, Value> = SETTINGS_FIELDS
        .iter()
        .filter_map(|key| tree.get(*key).map(|v| (key.to_string(), v.clone())))
        .filter(|(k, v)| settings_of(Map::from_iter([(k.clone(), v.clone())])).is_some())
        .collect();
    Salvage { cni_version: text("cniVersion"), name: text("name"), settings: settings_of(usable).unwrap_or_default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_fields_survive_beside_bad_ones() {
        let s = salvage(
            br#"{"cniVersion": "1.0.0", "name": "dind", "logFile": "/tmp/x.log", "stateDir": "relative",
                 "lockTimeoutMs": "soon", "routing": 5, "runtimeConfig": []}"#,
        );
        assert_eq!(s.cni_version.as_deref(), Some("1.0.0"));
        assert_eq!(s.name.as_deref(), Some("dind"));
        assert_eq!(s.settings.log_file, std::path::PathBuf::from("/tmp/x.log"));
        assert_eq!(s.settings.state_dir, Settings::default().state_dir);
        assert_eq!(s.settings.lock_timeout, Settings::default().lock_timeout);
    }

    #[test]
    fn nothing_readable_gives_defaults() {
        for bytes in [&b"{"[..], b"[]", b"", b"{\"name\": 5, \"cniVersion\": null}"] {
            let s = salvage(bytes);
            assert_eq!((s.cni_version, s.name), (None, None));
            assert_eq!(s.settings, Settings::default());
        }
    }
}
