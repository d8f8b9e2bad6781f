//! End to end against a real model server: llama.cpp's `llama-server` from
//! `../shared/upstream/` (`setup.sh` once, then `start.sh 8091`). Runs when
//! `TOLLGATE_LLAMA_URL` is set (e.g. `http://127.0.0.1:8091`; its key in `TOLLGATE_LLAMA_KEY`,
//! default `sk-upstream-test`); otherwise it says so and does nothing.

use serde_json::{json, Value};

use crate::common::{self, key_entry, TestGateway};

#[tokio::test]
async fn the_real_llama_server_through_the_gateway() {
    let Ok(url) = std::env::var("TOLLGATE_LLAMA_URL") else {
        eprintln!("TOLLGATE_LLAMA_URL not set: skipping the real-upstream test");
        return;
    };
    let key = std::env::var("TOLLGATE_LLAMA_KEY").unwrap_or_else(|_| "sk-upstream-test".into());
    std::env::set_var("TOLLGATE_TEST_LLAMA_KEY", key);
    let ledger = common::state_path().with_file_name("usage.jsonl");
    let tail = format!(
        "{}\n[ledger]\npath = \"{}\"\n",
        key_entry(
            "real",
            "tg-real",
            "max_tokens = 64\nquotas = [{ tokens = 1000000, per = \"1d\" }]"
        ),
        ledger.display()
    );
    let mut gateway = TestGateway::start_toml(&common::config_toml(
        &url,
        "",
        "api_key_env = \"TOLLGATE_TEST_LLAMA_KEY\"",
        &tail,
    ))
    .await;
    let auth = [("authorization", "Bearer tg-real")];
    let chat = |stream: bool| {
        json!({"model": "any", "messages": [{"role": "user", "content": "Name a colour."}],
               "max_tokens": 8, "temperature": 0, "stream": stream})
        .to_string()
    };

    let (status, _, body) = common::post(
        &format!("{}/openai/v1/chat/completions", gateway.url()),
        &chat(false),
        &auth,
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let answer: Value = serde_json::from_slice(&body).expect("JSON");
    assert!(
        answer["usage"]["completion_tokens"].as_u64().is_some(),
        "{answer}"
    );

    // Streams without include_usage: usage is asked for and stripped; the server closes the
    // connection after every stream, which must never fail the next request.
    for i in 0..12 {
        let (status, _, body) = common::post(
            &format!("{}/v1/chat/completions", gateway.url()),
            &chat(true),
            &auth,
        )
        .await;
        assert_eq!(status, 200, "stream {i}");
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.ends_with("data: [DONE]\n\n"),
            "stream {i} complete: {text}"
        );
        assert!(
            !text.contains("\"usage\""),
            "stream {i}: injected usage stripped: {text}"
        );
    }

    let completion = json!({"model": "any", "prompt": "The capital of France is", "max_tokens": 4, "stream": true}).to_string();
    let (status, _, body) = common::post(
        &format!("{}/v1/completions", gateway.url()),
        &completion,
        &auth,
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        String::from_utf8_lossy(&body).contains("\"usage\""),
        "llama.cpp sends usage on completions streams unasked; kept"
    );

    gateway.begin_shutdown().await.expect("shutdown");
    let lines: Vec<Value> = std::fs::read_to_string(&ledger)
        .expect("ledger")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 14, "one line per request");
    for line in &lines {
        assert_eq!(
            line["source"], "reported",
            "exact usage from the real server: {line}"
        );
        assert_eq!(line["outcome"], "complete", "{line}");
        assert!(line["prompt_tokens"].as_u64().unwrap_or(0) > 0, "{line}");
    }
}
