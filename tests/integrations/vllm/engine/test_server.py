"""vLLM's OpenAI server with the plugin and its mix middleware, driven by the ``openai`` client.

One server for the module (started on 127.0.0.1 on a free port, waited for on /health, stopped by its
PID, its log kept when a test failed): SmolLM2-135M fp32, ``--max-loras 4``, ``de`` and ``code`` from
``--lora-modules``, the other adapters loaded on first use from the adapter directory, which also holds
broken adapters for the bad-request tests. Every answer is checked against the same request served
alone by transformers + PEFT (greedy tokens, log-probs within 1e-4).
"""

import json
import random
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
from engine_util import (
    ADAPTER_DIR,
    ADAPTERS,
    ENGINE_ARGS,
    assert_matches,
    greedy_completion,
    mix_name,
    serve_for_module,
    server_args,
)

MAX_TOKENS = 6
MIDDLEWARE = "dlplora_triton.integrations.vllm.server.MixMiddleware"


def _adapter_dir(root):
    """The six adapters plus broken ones: truncated weights, not a LoRA, a rank above 16, empty."""
    root.mkdir()
    for name in ADAPTERS:
        (root / name).symlink_to(ADAPTER_DIR / name)
    truncated = root / "truncated"
    shutil.copytree(ADAPTER_DIR / "de", truncated)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    not_lora = root / "notlora"
    not_lora.mkdir()
    (not_lora / "adapter_config.json").write_text(
        json.dumps({"peft_type": "IA3", "target_modules": ["q_proj"]})
    )
    big = root / "bigrank"
    shutil.copytree(ADAPTER_DIR / "de", big)
    config = json.loads((big / "adapter_config.json").read_text())
    (big / "adapter_config.json").write_text(json.dumps(dict(config, r=32, rank_pattern={})))
    (root / "empty").mkdir()
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("server")
    adapters = _adapter_dir(root / "adapters")
    args = server_args("--middleware", MIDDLEWARE)
    yield from serve_for_module(
        request, root / "server.log", args, env={"DLPLORA_VLLM_ADAPTER_DIR": str(adapters)}
    )


def complete(client, ids, mix, max_tokens=MAX_TOKENS, **kw):
    return greedy_completion(client, ids, mix, max_tokens, **kw)


MIXES = (
    (),
    (("de", 1.0),),
    (("code", 1.0),),
    (("fr", 1.0),),  # loaded on first use from the adapter directory
    (("de", 0.7), ("code", 0.3)),
    (("de", 1.0), ("code", -0.5)),
    (("ru", 0.5), ("ja", 0.25), ("zh", 0.25)),
)


def test_completions_equal_peft(client, reference, prompts):
    for i, mix in enumerate(MIXES):
        ids = prompts[i % len(prompts)]
        assert_matches(
            *complete(client, ids, mix), reference.greedy(ids, mix, MAX_TOKENS), f"{mix_name(mix)}"
        )


def test_chat_equals_peft_and_names_the_mix(client, reference):
    mix = (("de", 0.7), ("code", 0.3))
    raw = client.chat.completions.with_raw_response.create(
        model=mix_name(mix),
        messages=[{"role": "user", "content": "Schreibe eine Funktion, die zwei Zahlen addiert."}],
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        logprobs=True,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    assert raw.headers["x-dlplora-mix"] == "de=0.7,code=0.3"
    out = raw.parse()
    assert out.model == mix_name(mix)
    choice = out.choices[0]
    logprobs = [entry.logprob for entry in choice.logprobs.content]
    assert_matches(
        choice.token_ids, logprobs, reference.greedy(out.prompt_token_ids, mix, MAX_TOKENS), "chat"
    )


def test_streaming_gives_the_same_text(client, prompts):
    mix = (("de", 1.0), ("code", -0.5))
    whole = client.completions.create(
        model=mix_name(mix),
        prompt=prompts[1],
        max_tokens=12,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    stream = client.completions.create(
        model=mix_name(mix),
        prompt=prompts[1],
        max_tokens=12,
        temperature=0.0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == whole.choices[0].text


def _concurrently(client, rows, max_tokens=MAX_TOKENS):
    with ThreadPoolExecutor(len(rows)) as pool:
        futures = [pool.submit(complete, client, ids, mix, max_tokens) for ids, mix in rows]
        return [f.result() for f in futures]


def test_a_burst_needing_more_slots_than_exist(server, client, reference, prompts):
    # Nine requests at once needing all six adapters with four slots: queued by the scheduler, all served.
    rows = [(prompts[i % 6], MIXES[i % len(MIXES)]) for i in range(9)]
    rows.append((prompts[4], (("ja", 0.6), ("zh", 0.4))))
    for (ids, mix), got in zip(rows, _concurrently(client, rows)):
        assert_matches(*got, reference.greedy(ids, mix, MAX_TOKENS), f"burst {mix_name(mix)}")
    assert server.alive()


def test_32_weightings_of_three_adapters_run_at_once(server, client, reference, prompts):
    rng = random.Random(32)
    rows = []
    for i in range(32):
        a, b = round(rng.uniform(-1, 1), 3), round(rng.uniform(-1, 1), 3)
        rows.append((prompts[i % 3], (("de", a), ("code", b), ("fr", round(1 - a - b, 3)))))
    with server.peak_running() as peak:
        results = _concurrently(client, rows, max_tokens=16)
    for (ids, mix), got in zip(rows, results):
        assert_matches(*got, reference.greedy(ids, mix, 16), f"{mix_name(mix)}")
    # 32 weightings of 3 adapters share 3 slots: far more than max_loras=4 requests run in one step.
    assert peak[0] > ENGINE_ARGS["max_loras"], f"at most {peak[0]} requests ran at once"
    assert "smollm2" in server.metrics()


def test_churn_of_mixed_requests_through_the_server(server, client, reference, prompts):
    rng = random.Random(19)
    models = [
        *MIXES,
        *[((n, 1.0),) for n in ADAPTERS],
        (("ja", 0.6), ("zh", 0.4)),
        (("code", 0.9), ("fr", 0.1)),
    ]
    for round_ in range(12):
        rows = [(rng.choice(prompts), rng.choice(models)) for _ in range(rng.randint(1, 6))]
        for (ids, mix), got in zip(rows, _concurrently(client, rows)):
            assert_matches(*got, reference.greedy(ids, mix, MAX_TOKENS), f"round {round_} {mix_name(mix)}")
    assert server.alive()


BAD_REQUESTS = [
    ("mix:de=0.7,nosuch=0.3", 404, "nosuch"),
    ("mix:", 400, "names no adapter"),
    ("mix:de=", 400, "is not 'adapter=weight'"),
    ("mix:de", 400, "is not 'adapter=weight'"),
    ("mix:de=nan", 400, "not a number"),
    ("mix:de=1e999", 400, "not finite"),
    ("mix:de=abc", 400, "not a number"),
    ("mix:de=0.5,de=0.5", 400, "twice"),
    ("mix:" + ",".join(f"a{i}=1" for i in range(64)), 400, "max_loras"),
    ("mix:de=1,code=-1", 400, "sum to 0"),
    ("mix:../de=1", 400, "not an adapter name"),
    ("mix:de=0.5,truncated=0.5", 400, "truncated"),
    ("mix:de=0.5,notlora=0.5", 400, "unsupported PEFT type"),
    ("mix:de=0.5,bigrank=0.5", 400, "max_lora_rank"),
    ("mix:de=0.5,empty=0.5", 404, "adapter_config.json"),
    ("truncated", 400, "truncated"),
]


@pytest.mark.parametrize("model, status, words", BAD_REQUESTS, ids=[m[:24] for m, _, _ in BAD_REQUESTS])
def test_bad_requests_are_4xx_and_the_server_stays_right(
    server, client, reference, prompts, model, status, words
):
    code, body = server.post("/v1/completions", {"model": model, "prompt": "Hallo", "max_tokens": 4})
    assert code == status, body
    assert words in body["error"]["message"], body
    assert server.alive()
    mix = (("de", 0.7), ("code", 0.3))
    assert_matches(*complete(client, prompts[0], mix), reference.greedy(prompts[0], mix, MAX_TOKENS), "after")


def test_a_client_cannot_set_the_mix_argument(server):
    code, body = server.post(
        "/v1/completions",
        {"model": "de", "prompt": "Hallo", "max_tokens": 2, "vllm_xargs": {"dlplora_mix": "[]"}},
    )
    assert code == 400 and "dlplora_mix" in body["error"]["message"]
    assert server.alive()


def test_live_mix_names_are_not_kept(client):
    complete(client, [1, 2, 3], (("de", 0.25), ("code", 0.75)), max_tokens=1)
    names = {m.id for m in client.models.list().data}
    assert not any(n.startswith("mix:") for n in names), names
    assert {"de", "code", "fr"} <= names
