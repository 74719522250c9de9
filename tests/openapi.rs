//! `GET /openapi.json` describes exactly the routes the router serves: every
//! route is documented, and every documented path is routed (not the 404 fallback).

mod common;

use std::collections::BTreeSet;

use common::TestApp;
use micro8gents::ingress::{OPENAPI, routes};

fn documented() -> BTreeSet<(String, String)> {
    let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("the document is JSON");
    assert_eq!(doc["openapi"], "3.1.0");
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().unwrap().keys() {
            ops.insert((method.to_uppercase(), path.clone()));
        }
    }
    ops
}

#[test]
fn the_document_and_the_router_list_the_same_routes() {
    let routed: BTreeSet<(String, String)> =
        routes().iter().map(|r| (r.method.to_string(), r.path.to_string())).collect();
    assert_eq!(documented(), routed);
}

#[test]
fn every_reference_in_the_document_resolves() {
    let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
    fn walk(doc: &serde_json::Value, v: &serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(r) = m.get("$ref").and_then(|r| r.as_str()) {
                    let pointer = r.strip_prefix('#').unwrap_or_else(|| panic!("external ref {r}"));
                    assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
                }
                m.values().for_each(|x| walk(doc, x));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(doc, x)),
            _ => {}
        }
    }
    walk(&doc, &doc);
}

#[tokio::test]
async fn every_documented_path_is_served_and_the_document_is_too() {
    let app = TestApp::spawn().await;
    let served: serde_json::Value =
        app.http.get(format!("{}/openapi.json", app.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(served, serde_json::from_str::<serde_json::Value>(OPENAPI).unwrap());

    for (method, path) in documented() {
        let url = format!("{}{}", app.base, path.replace("{business_id}", "1"));
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = app.http.request(method.clone(), &url).send().await.unwrap();
        assert_ne!(r.status(), 405, "{method} {path}");
        let body = r.text().await.unwrap();
        assert!(!body.contains("\"error\":\"not_found\""), "{method} {path} fell through to the fallback: {body}");
    }
    // The fallback itself, to be sure the check above can fail.
    let r = app.http.get(format!("{}/nope", app.base)).send().await.unwrap();
    assert!(r.text().await.unwrap().contains("\"error\":\"not_found\""));
    app.stop().await;
}

#[test]
fn the_notices_are_documented_as_webhooks_one_per_type() {
    let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
    let hooks: BTreeSet<String> = doc["webhooks"].as_object().expect("webhooks").keys().cloned().collect();
    let kinds: BTreeSet<String> =
        micro8gents::notify::notice::NoticeKind::ALL.iter().map(|k| k.as_str().to_string()).collect();
    assert_eq!(hooks, kinds);
    for kind in &kinds {
        let schema = doc["webhooks"][kind]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            .as_str()
            .unwrap();
        let schema = doc.pointer(schema.strip_prefix('#').unwrap()).unwrap();
        assert_eq!(schema["properties"]["type"]["const"], kind.as_str());
    }
}
