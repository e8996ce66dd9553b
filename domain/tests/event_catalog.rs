//! Keeps docs/event-catalog.md true to the code: every event type has a section whose example
//! payload decodes as that type, and the catalog documents no type the code lacks.

use tektree_domain::events::{catalog_entry, Event, EVENT_TYPES};

fn sections() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/event-catalog.md"
    ))
    .expect("docs/event-catalog.md exists");
    let mut out = Vec::new();
    for part in text.split("\n### `").skip(1) {
        let (name, rest) = part.split_once('`').expect("heading closes its backtick");
        let json = rest
            .split("```json\n")
            .nth(1)
            .and_then(|r| r.split("\n```").next())
            .unwrap_or_else(|| panic!("section {name} has a json example"));
        out.push((name.to_string(), json.to_string()));
    }
    out
}

#[test]
fn every_event_type_is_documented_with_a_decodable_example() {
    let docs = sections();
    let names: Vec<&str> = docs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        EVENT_TYPES.to_vec(),
        "catalog sections in catalog order"
    );
    for (name, json) in &docs {
        let payload: serde_json::Value = serde_json::from_str(json)
            .unwrap_or_else(|e| panic!("example of {name} is not JSON: {e}"));
        let version = catalog_entry(name).expect("in the catalog").version;
        let event = Event::decode(name, version, &payload)
            .unwrap_or_else(|e| panic!("example of {name} does not decode: {e}"));
        assert_eq!(event.event_type(), name);
        assert_eq!(event.to_payload(), payload, "example of {name} round-trips");
    }
}
