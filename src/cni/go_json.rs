//! JSON that runtimes write (`runtimeConfig`, `prevResult`, `cni.dev/valid-attachments`), read the
//! way Go's encoding/json reads it for the Go plugins every runtime is tested with. containerd's
//! go-cni marshals its port mappings from a struct without JSON tags, so the keys arrive as
//! `HostPort`, `ContainerPort`, `Protocol`, `HostIP`; portmap accepts them because Go matches keys
//! to fields ignoring case. Keys we do not read are ignored, and `null` leaves a field at its zero
//! value, as in Go.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// The members of `value` that name one of `fields`, renamed to the field's own spelling: a key
/// spelled exactly like the field wins, else one equal to it ignoring ASCII case (Go's rule).
/// Members whose value is `null` are left out, so serde defaults give Go's zero values.
/// `null` itself reads as an empty object; anything else that is not an object is an error.
pub fn fold_object(value: &Value, fields: &[&str]) -> Result<Map<String, Value>, String> {
    let map = match value {
        Value::Null => return Ok(Map::new()),
        Value::Object(map) => map,
        other => return Err(format!("expected an object, got {}", kind_of(other))),
    };
    let mut out = Map::new();
    for field in fields {
        let exact = map.get(*field);
        let folded = || map.iter().find(|(k, _)| k.eq_ignore_ascii_case(field)).map(|(_, v)| v);
        if let Some(v) = exact.or_else(folded).filter(|v| !v.is_null()) {
            out.insert((*field).to_string(), v.clone());
        }
    }
    Ok(out)
}

/// The member of an object named `field` in any case, or None (also for `null` and non-objects).
pub fn member<'a>(value: &'a Value, field: &str) -> Option<&'a Value> {
    let map = value.as_object()?;
    map.get(field)
        .or_else(|| map.iter().find(|(k, _)| k.eq_ignore_ascii_case(field)).map(|(_, v)| v))
        .filter(|v| !v.is_null())
}

/// The elements of an array member (`null` or absent: none).
pub fn elements<'a>(value: &'a Value, field: &str) -> Result<&'a [Value], String> {
    match member(value, field) {
        None => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(other) => Err(format!("{field}: expected an array, got {}", kind_of(other))),
    }
}

/// Decode one object into `T` (whose serde names are `fields`) after folding its keys. An error
/// says where, relative to the object: `"hostPort: invalid type: ..."`, or just what for the whole.
pub fn decode<T: DeserializeOwned>(value: &Value, fields: &[&str]) -> Result<T, String> {
    let folded = fold_object(value, fields)?;
    serde_path_to_error::deserialize(Value::Object(folded)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        }
    })
}

/// `at` and a `decode` error joined into one field path: `runtimeConfig.portMappings[0].hostPort: ...`.
pub fn at_field(at: &str, err: &str) -> String {
    match err.split_once(": ") {
        Some((field, rest)) if !field.contains(' ') => format!("{at}.{field}: {rest}"),
        _ => format!("{at}: {err}"),
    }
}

pub fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const MAPPING: &[&str] = &["hostPort", "containerPort", "protocol", "hostIP"];

    #[test]
    fn go_cni_capitalised_keys_fold_to_the_spec_names() {
        let v = json!({"HostPort": 30080, "ContainerPort": 8080, "Protocol": "tcp", "HostIP": ""});
        let m = fold_object(&v, MAPPING).unwrap();
        assert_eq!(
            Value::Object(m),
            json!({"hostPort": 30080, "containerPort": 8080, "protocol": "tcp", "hostIP": ""})
        );
    }

    #[test]
    fn exact_spelling_wins_over_another_case_and_unknown_keys_are_dropped() {
        let v = json!({"HOSTPORT": 1, "hostPort": 2, "Bogus": true, "hostip": "10.0.0.1"});
        let m = fold_object(&v, MAPPING).unwrap();
        assert_eq!(Value::Object(m), json!({"hostPort": 2, "hostIP": "10.0.0.1"}));
    }

    #[test]
    fn null_reads_as_zero_values_and_other_kinds_are_refused() {
        assert!(fold_object(&Value::Null, MAPPING).unwrap().is_empty());
        assert!(fold_object(&json!({"hostPort": null}), MAPPING).unwrap().is_empty());
        assert_eq!(fold_object(&json!([1]), MAPPING).unwrap_err(), "expected an object, got an array");
        assert_eq!(elements(&json!({"PortMappings": null}), "portMappings").unwrap().len(), 0);
        assert_eq!(elements(&json!({"PORTMAPPINGS": [{}]}), "portMappings").unwrap().len(), 1);
        assert!(elements(&json!({"portMappings": {}}), "portMappings").unwrap_err().contains("expected an array"));
    }

    #[test]
    fn decode_names_the_field_that_has_the_wrong_type() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(rename_all = "camelCase")]
        #[allow(dead_code)]
        struct M {
            host_port: i64,
        }
        let e = decode::<M>(&json!({"HostPort": "80"}), &["hostPort"]).unwrap_err();
        assert!(e.starts_with("hostPort: invalid type: string"), "{e}");
        assert_eq!(decode::<M>(&json!({"HOSTport": 80}), &["hostPort"]).unwrap().host_port, 80);
    }
}
