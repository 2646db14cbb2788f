//! The KServe v2 REST endpoint (`--http-listen`): driven by Python's `tritonclient.http`
//! unchanged (health, metadata, upload, binary and JSON tensors against onnxruntime,
//! statistics, errors, unload), and by hand for what a `curl` user sends.

use opreg_tests::*;
use std::io::{Read, Write};

/// The REST address the daemon logged.
fn http_addr(d: &Daemon) -> String {
    let log = d.wait_log("KServe v2 REST on http://");
    let start =
        log.find("KServe v2 REST on http://").expect("line") + "KServe v2 REST on http://".len();
    let rest = &log[start..];
    rest[..rest.find("/v2").expect("path")].to_string()
}

/// One HTTP/1.0 exchange: the status line and the body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

#[test]
fn tritonclient_http_talks_to_the_daemon() {
    let repo = tempfile::tempdir().unwrap();
    let (d, _plugins) = start_serving(repo.path(), &[]);
    let addr = http_addr(&d);
    let Some(line) = run_python("tritonclient_http.py", &[&addr]) else {
        return;
    };
    let v: serde_json::Value = serde_json::from_str(&line).expect("json");
    assert_eq!(v["live"], true, "{line}");
    assert_eq!(v["ready"], true, "{line}");
    assert_eq!(v["server"], "opreg", "{line}");
    assert_eq!(v["model_ready"], true, "{line}");
    assert_eq!(v["inputs"][0][0], "x", "{line}");
    for tag in ["binary", "json"] {
        assert!(v[format!("{tag}_diff")].as_f64().unwrap() < 1e-5, "{line}");
        assert_eq!(v[format!("{tag}_argmax_equal")], true, "{line}");
    }
    assert_eq!(
        v["default_outputs"],
        serde_json::json!(["k", "y"]),
        "{line}"
    );
    // Three requests (the model is not batched: one inference each).
    assert_eq!(v["inference_count"], 3, "{line}");
    let err = v["bad_shape_error"].as_str().expect("an error");
    assert!(err.contains("input 'x' has shape"), "{err}");
    assert_eq!(v["ready_after_unload"], false, "{line}");
}

#[test]
fn curl_style_json_requests_get_json_answers_and_clear_errors() {
    let repo = tempfile::tempdir().unwrap();
    let dir = repo.path().join("demo").join("1");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        workspace().join("examples/models/demo/1/model.onnx"),
        dir.join("model.onnx"),
    )
    .unwrap();
    let (d, _plugins) = start_serving(repo.path(), &[]);
    let addr = http_addr(&d);
    assert_eq!(
        http(&addr, "GET", "/v2/health/ready", "").0,
        "HTTP/1.0 200 OK"
    );
    let (status, body) = http(&addr, "GET", "/v2/models/demo", "");
    assert!(status.contains("200"), "{status} {body}");
    let meta: serde_json::Value = serde_json::from_str(&body).unwrap();
    let input = &meta["inputs"][0];
    let name = input["name"].as_str().unwrap();
    let n: i64 = input["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_i64().unwrap().max(1))
        .product();
    let data: Vec<f32> = (0..n).map(|i| i as f32 * 0.1).collect();
    let shape: Vec<i64> = input["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_i64().unwrap().max(1))
        .collect();
    let req = serde_json::json!({
        "inputs": [{"name": name, "datatype": input["datatype"], "shape": shape, "data": data}]
    });
    let (status, body) = http(&addr, "POST", "/v2/models/demo/infer", &req.to_string());
    assert!(status.contains("200"), "{status} {body}");
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["model_name"], "demo");
    assert!(
        r["outputs"][0]["data"]
            .as_array()
            .is_some_and(|a| !a.is_empty()),
        "{body}"
    );

    // Errors: KServe's {"error": ...} with a 4xx status.
    let (status, body) = http(&addr, "POST", "/v2/models/demo/infer", "{not json");
    assert!(status.contains("400"), "{status}");
    assert!(
        body.contains("\"error\"") && body.contains("not JSON"),
        "{body}"
    );
    let (status, body) = http(&addr, "POST", "/v2/models/nope/infer", &req.to_string());
    assert!(status.contains("404"), "{status} {body}");
    let short = serde_json::json!({
        "inputs": [{"name": name, "datatype": "FP32", "shape": shape, "data": [1.0]}]
    });
    let (status, body) = http(&addr, "POST", "/v2/models/demo/infer", &short.to_string());
    assert!(status.contains("400"), "{status} {body}");
    let binary_short = serde_json::json!({
        "inputs": [{"name": name, "datatype": "FP32", "shape": shape, "parameters": {"binary_data_size": 1000000}}]
    });
    let (status, body) = http(
        &addr,
        "POST",
        "/v2/models/demo/infer",
        &binary_short.to_string(),
    );
    assert!(
        status.contains("400") && body.contains("binary"),
        "{status} {body}"
    );
}

/// Sends a request head declaring `length` body bytes and only the first few of them; the
/// status line answered within 10 s (the daemon must answer without waiting for the rest).
fn declared_only(addr: &str, path: &str, length: u64, extra: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{extra}Content-Length: {length}\r\n\r\n{{\"inputs\""
    )
    .expect("write");
    let mut head = [0u8; 512];
    let n = s
        .read(&mut head)
        .expect("an answer within 10 s, before the body");
    String::from_utf8_lossy(&head[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[test]
fn bodies_are_read_after_the_access_check_and_within_the_receiving_budget() {
    let repo = tempfile::tempdir().unwrap();
    let (d, _plugins) = start_serving(
        repo.path(),
        &[
            "--admin-token",
            "s3cret",
            "--max-receiving-bytes",
            "1048576",
        ],
    );
    let addr = http_addr(&d);
    // Without the token, a load is refused at once: its 100 MiB body is not read first.
    let status = declared_only(&addr, "/v2/repository/models/m/load", 100 << 20, "");
    assert!(status.contains(" 401"), "{status}");
    // With it, a body past the receiving budget is refused at its head (429, RESOURCE_EXHAUSTED).
    let status = declared_only(
        &addr,
        "/v2/repository/models/m/load",
        2 << 20,
        "Authorization: Bearer s3cret\r\n",
    );
    assert!(status.contains(" 429"), "{status}");
    // Past the 2 GiB a body may have: refused whatever the budget.
    let status = declared_only(&addr, "/v2/models/m/infer", 3 << 30, "");
    assert!(status.contains(" 400"), "{status}");
    // The daemon still answers.
    assert_eq!(
        http(&addr, "GET", "/v2/health/live", "").0,
        "HTTP/1.0 200 OK"
    );
    // A counted body that stops arriving fails after the idle time (504), its share back.
    let (d, _plugins) = start_serving(repo.path(), &["--receive-idle-timeout-s", "1"]);
    let addr = http_addr(&d);
    let status = declared_only(&addr, "/v2/models/m/infer", 2 << 20, "");
    assert!(status.contains(" 504"), "{status}");
}
