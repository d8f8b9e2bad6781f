//! A real client no one here wrote: the `async-openai` crate, pointed at the gateway's base URL.

use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestSystemMessageArgs, ChatCompletionRequestUserMessageArgs,
    CreateChatCompletionRequestArgs,
};
use async_openai::types::completions::CreateCompletionRequestArgs;
use async_openai::Client;
use futures_util::StreamExt;
use mock_upstream::MockUpstream;

use crate::common::TestGateway;

fn client_for(gateway: &TestGateway) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{}/openai/v1", gateway.url()))
            .with_api_key(crate::common::TEST_KEY),
    )
}

fn chat_request(max_tokens: u32) -> async_openai::types::chat::CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model("mock-model")
        .max_completion_tokens(max_tokens)
        .messages([
            ChatCompletionRequestSystemMessageArgs::default()
                .content("You are terse.")
                .build()
                .expect("system message")
                .into(),
            ChatCompletionRequestUserMessageArgs::default()
                .content("Say hello")
                .build()
                .expect("user message")
                .into(),
        ])
        .build()
        .expect("chat request")
}

#[tokio::test]
async fn async_openai_chat_and_completions_work_through_the_gateway() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start(&upstream.url()).await;
    let client = client_for(&gateway);

    let answer = client
        .chat()
        .create(chat_request(4))
        .await
        .expect("non-streamed chat through the gateway");
    assert_eq!(answer.choices.len(), 1);
    assert!(
        answer.choices[0].message.content.is_some(),
        "an answer came back"
    );
    assert_eq!(answer.usage.expect("usage").completion_tokens, 4);

    let mut stream = client
        .chat()
        .create_stream(chat_request(6))
        .await
        .expect("streamed chat through the gateway");
    let mut text = String::new();
    let mut chunks = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("every chunk parses");
        chunks += 1;
        for choice in chunk.choices {
            text.push_str(choice.delta.content.as_deref().unwrap_or(""));
        }
    }
    assert!(
        chunks >= 7,
        "role + 6 content + finish chunks, got {chunks}"
    );
    assert!(!text.is_empty(), "streamed text arrived");

    let completion = client
        .completions()
        .create(
            CreateCompletionRequestArgs::default()
                .model("mock-model")
                .prompt("The capital of France is")
                .max_tokens(3u32)
                .build()
                .expect("completion request"),
        )
        .await
        .expect("completions through the gateway");
    assert_eq!(completion.choices.len(), 1);
    assert_eq!(completion.usage.expect("usage").completion_tokens, 3);

    let requests = upstream.requests();
    assert_eq!(requests.len(), 3, "each call reached the upstream once");
    assert!(
        requests
            .iter()
            .all(|r| r.headers.get("authorization").is_none()),
        "the client's key never reaches the upstream"
    );
}
