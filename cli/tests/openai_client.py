"""The PyPI `openai` client against aigrid's `/v1` (run by cli/tests/suite/serving.rs).

usage: openai_client.py BASE_URL CHAT_MODEL [EMBEDDING_MODEL]

Checks the shapes the client parses into its types: choices, deltas, finish reasons,
usage, and (with an embedding model) unit-length vectors. Prints `openai client: ok`.
"""

import math
import sys

from openai import NotFoundError, OpenAI

MAX_TOKENS = 8


def check_usage(usage):
    assert usage is not None, "no usage"
    assert usage.prompt_tokens > 0, usage
    assert 0 <= usage.completion_tokens <= MAX_TOKENS, usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage


def check_finish(reason, completion_tokens=None):
    assert reason in ("stop", "length"), reason
    if completion_tokens is not None:
        assert (reason == "length") == (completion_tokens == MAX_TOKENS), (
            reason,
            completion_tokens,
        )


def main():
    base_url, chat_model = sys.argv[1], sys.argv[2]
    embed_model = sys.argv[3] if len(sys.argv) > 3 else None
    client = OpenAI(base_url=base_url, api_key="not-needed", max_retries=0, timeout=60)

    ids = [m.id for m in client.models.list()]
    assert chat_model in ids, ids

    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hello"},
    ]
    chat = client.chat.completions.create(
        model=chat_model, messages=messages, max_tokens=MAX_TOKENS
    )
    assert chat.object == "chat.completion", chat
    assert len(chat.choices) == 1, chat
    choice = chat.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    check_usage(chat.usage)
    check_finish(choice.finish_reason, chat.usage.completion_tokens)

    stream = client.chat.completions.create(
        model=chat_model, messages=messages, max_tokens=MAX_TOKENS, stream=True
    )
    chunks = list(stream)
    assert chunks, "an empty stream"
    reasons = []
    text = ""
    for chunk in chunks:
        assert chunk.object == "chat.completion.chunk", chunk
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.finish_reason is not None:
                reasons.append(c.finish_reason)
    assert len(reasons) == 1, reasons
    check_finish(reasons[0])

    completion = client.completions.create(
        model=chat_model, prompt="Once upon a time", max_tokens=MAX_TOKENS
    )
    assert completion.object == "text_completion", completion
    assert len(completion.choices) == 1, completion
    assert isinstance(completion.choices[0].text, str)
    check_usage(completion.usage)
    check_finish(completion.choices[0].finish_reason, completion.usage.completion_tokens)

    stream = client.completions.create(
        model=chat_model, prompt="Once upon a time", max_tokens=MAX_TOKENS, stream=True
    )
    reasons = [c.finish_reason for chunk in stream for c in chunk.choices if c.finish_reason]
    assert len(reasons) == 1, reasons
    check_finish(reasons[0])

    try:
        client.chat.completions.create(model="no-such-model", messages=messages)
        raise AssertionError("an unknown model was served")
    except NotFoundError as e:
        assert e.status_code == 404

    if embed_model:
        sentences = ["A cat sits on the mat.", "Ein Hund rennt im Park."]
        out = client.embeddings.create(model=embed_model, input=sentences)
        assert out.object == "list", out
        assert [d.index for d in out.data] == [0, 1], out
        for d in out.data:
            assert len(d.embedding) == 384, len(d.embedding)
            norm = math.sqrt(sum(x * x for x in d.embedding))
            assert abs(norm - 1.0) < 1e-3, norm
        assert out.usage.prompt_tokens > 0, out.usage
        one = client.embeddings.create(model=embed_model, input=sentences[0])
        same = sum(a * b for a, b in zip(one.data[0].embedding, out.data[0].embedding))
        assert same > 0.999, same

    print("openai client: ok")


if __name__ == "__main__":
    main()
