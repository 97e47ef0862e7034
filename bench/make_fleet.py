"""Write a fleet of N random PEFT LoRA adapters for SmolLM2-135M, for the engine tests and benchmarks.

    python bench/make_fleet.py --count 128 [--seed 0] [--out bench/fleet/smollm2-128]
    python bench/make_fleet.py --count 128 --check    # the scale check below (loads SmolLM2 and PEFT)

Tests and benchmarks import it (with bench/ on sys.path) and call :func:`write_fleet`. Adapter ``i``
(named ``a000``, ``a001``, ...) has rank ``RANKS[i % 5]`` and the target set ``KINDS[i % 3]`` (attention
only, MLP only, all seven linear layers), so the first 15 adapters hold every rank with every target
set; every fourth (``i % 4 == 3``) has a ``rank_pattern``: one target module with another rank (and an
``alpha_pattern``) in every layer, and a second one with other ranks in a quarter of the layers (keys
``model.layers.<L>.<parent>.<module>``), all within 4..64. ``lora_alpha`` (r, 2r or 16) and the
weights come from ``(seed, i)`` alone: a fleet of 6 is the first 6 adapters of a fleet of 128.

The files are written directly with safetensors (building PEFT models is the slow way): PEFT's key
names, fp32, A ~ N(0, 1/in) and B ~ N(0, (DELTA_SCALE / (scaling * sqrt(r)))^2), so that whatever the
rank and alpha, ``scaling * B @ A`` acts on an input like DELTA_SCALE times a linear layer with
N(0, 1/in) weights. SmolLM2's own layers have 2.6 (v_proj) to 7.6 (down_proj) times that gain on
real activations, so with DELTA_SCALE = 0.3 the delta is 3 to 10 % of each layer's output (below).
``fleet.json`` in the folder lists each adapter (name, path relative to the folder, rank, max rank
with rank_pattern, lora_alpha, kind, targets, rank_pattern or not, bytes); it is written last, and a
rerun whose arguments match it (and whose files are all there, of the listed sizes) reuses the fleet.

Measured (2026-12-07, the 2-core Xeon VM shared with other work, seed 0): 128 adapters, 2.5 GB, written
in 17.5 s at a load average of 2.5 (43 s at 3.5); 26 adapters of each rank but 25 of 32 and 64, 43
attention / 43 MLP / 42 all, 32 with rank_pattern (22 of them reach rank 64 only through it). vLLM 0.32's
PEFTHelper.from_local_dir + validate_legal (max_lora_rank 64) and dlplora_triton's check_adapter_dir
accept all 128; vLLM's LoRAModel.from_local_checkpoint loads a000-a015 with the ranks of their
rank_pattern.

The scale check (``--check``; SmolLM2 in fp32 through transformers + PEFT, adapters a000-a004, a011,
a014: every rank and target set, two with rank_pattern; 1.5 to 5 minutes on 2 cores): on real
activations ``|delta| / |W x|`` has a median per module of 0.033 (k_proj), 0.036 (down), 0.043 (q),
0.050 (gate), 0.058 (o), 0.062 (up), 0.096 (v_proj). Per-token NLL of CHECK_TEXT (three English
sentences): base 2.31, adapters 2.22 to 2.80 (0.96x to 1.21x the base's). The top-1 next token on it
agrees with the base's 72 to 93 % of the time. Greedy 16 tokens from CHECK_PROMPTS (three English, one
Python): 26 of the 28 continuations differ from the base model's (every adapter changes at least 3 of
4), the first differing token at position 3.9 on average (0 to 12); all stay readable English or
Python. E.g. "Once upon a time, there was a" -> " small town nestled in the heart of a bustling city."
(base), " small town called Oakwood, where everyone knew each other's names." (a002: r 16, all seven).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]

RANKS = (4, 8, 16, 32, 64)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
KINDS = {"attention": ATTENTION, "mlp": MLP, "all": ATTENTION + MLP}
PARENT = {**{m: "self_attn" for m in ATTENTION}, **{m: "mlp" for m in MLP}}
DELTA_SCALE = 0.3  # the adapters' size: 3 to 10 % of SmolLM2's layer outputs (the module docstring)
# Bump when what the same arguments write changes: a fleet.json of another version is rewritten.
FLEET_VERSION = 1
MANIFEST = "fleet.json"
PEFT_PREFIX = "base_model.model."


def default_out(count: int) -> Path:
    return ROOT / "bench" / "fleet" / f"smollm2-{count}"


def model_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """``(in_features, out_features)`` of each Llama-style linear layer, from a transformers config dict."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def _pattern_value(pattern: dict, module_path: str, default):
    """PEFT's rank_pattern / alpha_pattern rule: the first key matching a suffix of the module path."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def plan_adapter(index: int, seed: int, num_layers: int) -> dict:
    """Rank, targets, alpha and patterns of adapter ``index`` (its adapter_config.json fields but a few)."""
    rng = random.Random(f"fleet:{seed}:{index}")  # a str seed is hashed with sha512: stable across runs
    rank = RANKS[index % len(RANKS)]
    kind = list(KINDS)[index % len(KINDS)]
    targets = list(KINDS[kind])
    rank_pattern, alpha_pattern = {}, {}
    if index % 4 == 3:
        other_ranks = [r for r in RANKS if r != rank]
        whole, partial = rng.sample(targets, 2)  # distinct modules: no module matches two keys
        rank_pattern[whole] = rng.choice(other_ranks)
        alpha_pattern[whole] = rank_pattern[whole]  # scaling 1 there, whatever lora_alpha / r is
        for layer in sorted(rng.sample(range(num_layers), max(1, num_layers // 4))):
            rank_pattern[f"model.layers.{layer}.{PARENT[partial]}.{partial}"] = rng.choice(other_ranks)
    return {
        "rank": rank,
        "kind": kind,
        "targets": targets,
        "lora_alpha": rng.choice((rank, 2 * rank, 16)),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }


def adapter_config(plan: dict, base_model: str) -> dict:
    """adapter_config.json as PEFT writes it for a plain LoRA (the fields vLLM and PEFT read)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": plan["rank"],
        "lora_alpha": plan["lora_alpha"],
        "target_modules": plan["targets"],
        "rank_pattern": plan["rank_pattern"],
        "alpha_pattern": plan["alpha_pattern"],
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def adapter_tensors(
    plan: dict, shapes: dict, num_layers: int, generator: torch.Generator, delta_scale: float
):
    """PEFT-named fp32 lora_A [r, in] / lora_B [out, r] of every target module (see the module docstring)."""
    tensors = {}
    for layer in range(num_layers):
        for module in plan["targets"]:
            path = f"model.layers.{layer}.{PARENT[module]}.{module}"
            rank = _pattern_value(plan["rank_pattern"], path, plan["rank"])
            scaling = _pattern_value(plan["alpha_pattern"], path, plan["lora_alpha"]) / rank
            in_features, out_features = shapes[module]
            a = torch.randn(rank, in_features, generator=generator).mul_(in_features**-0.5)
            b = torch.randn(out_features, rank, generator=generator).mul_(delta_scale / (scaling * rank**0.5))
            tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a
            tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b
    return tensors


def _torch_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"fleet:{seed}:{index}".encode()).digest()[:8], "little") >> 1


def _fleet_header(count: int, seed: int, delta_scale: float, base_model: str, config: dict) -> dict:
    shape_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    shape = {k: config[k] for k in shape_keys}
    shape["num_key_value_heads"] = config.get("num_key_value_heads") or config["num_attention_heads"]
    shape["head_dim"] = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return {
        "version": FLEET_VERSION,
        "count": count,
        "seed": seed,
        "delta_scale": delta_scale,
        "base_model": base_model,
        "shape": shape,
    }


def _bytes(adapter_dir: Path) -> int | None:
    try:
        return sum(
            (adapter_dir / f).stat().st_size for f in ("adapter_config.json", "adapter_model.safetensors")
        )
    except OSError:
        return None


def _with_paths(out: Path, adapters: list[dict]) -> list[dict]:
    return [{**a, "path": str(out / a["path"])} for a in adapters]


def _complete(out: Path, manifest: dict, header: dict) -> bool:
    """Whether ``manifest`` was written with ``header``'s arguments and all its files are there, of the
    listed sizes (their contents are not read)."""
    try:
        adapters = manifest["adapters"]
        return (
            {k: manifest.get(k) for k in header} == header
            and len(adapters) == header["count"]
            and all(_bytes(out / a["path"]) == a["bytes"] for a in adapters)
        )
    except (KeyError, TypeError):  # a manifest edited by hand: rewrite
        return False


def read_fleet(out_dir: str | os.PathLike) -> dict | None:
    """The fleet.json of ``out_dir`` (None if absent or unreadable)."""
    try:
        manifest = json.loads((Path(out_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def write_fleet(
    out_dir: str | os.PathLike,
    count: int,
    seed: int = 0,
    model_folder: str | os.PathLike | None = None,
    config: dict | None = None,
    delta_scale: float = DELTA_SCALE,
) -> list[dict]:
    """Write ``count`` adapters to ``out_dir`` (or reuse the complete fleet already there); returns the
    manifest's adapter entries, each ``path`` made absolute.

    The base model's shapes come from ``config`` (a transformers config dict, for a tiny test model),
    else from ``model_folder``'s config.json (default: the SmolLM2 folder, converted on first use).
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if config is None:
        if model_folder is None:
            from dlplora_triton.demo.smollm2 import MODEL_NAME, smollm2_folder

            model_folder, base_model = smollm2_folder(), MODEL_NAME
        else:
            base_model = str(model_folder)
        config = json.loads((Path(model_folder) / "config.json").read_text())
    else:
        base_model = str(model_folder or config.get("_name_or_path") or "custom")
    out = Path(out_dir)
    header = _fleet_header(count, seed, delta_scale, base_model, config)

    old = read_fleet(out)
    if old is not None and _complete(out, old, header):
        return _with_paths(out, old["adapters"])

    # The manifest goes first and comes back last: a run cut off leaves no manifest, so it is rewritten.
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    width = max(3, len(str(count - 1)))
    names = [f"a{i:0{width}d}" for i in range(count)]
    for stale in (old or {}).get("adapters") or []:  # the old fleet's adapters this one does not rewrite
        if (
            isinstance(stale, dict)
            and stale.get("path") not in names
            and re.fullmatch(r"a\d+", str(stale.get("path")))
        ):
            shutil.rmtree(out / stale["path"], ignore_errors=True)

    num_layers = config["num_hidden_layers"]
    shapes = model_shapes(config)
    adapters = []
    for index, name in enumerate(names):
        plan = plan_adapter(index, seed, num_layers)
        generator = torch.Generator().manual_seed(_torch_seed(seed, index))
        tensors = adapter_tensors(plan, shapes, num_layers, generator, delta_scale)
        adapter_dir = out / name
        adapter_dir.mkdir(exist_ok=True)
        (adapter_dir / "adapter_config.json").write_text(
            json.dumps(adapter_config(plan, base_model), indent=2) + "\n"
        )
        save_file(tensors, str(adapter_dir / "adapter_model.safetensors"))
        adapters.append(
            {
                "name": name,
                "path": name,
                "rank": plan["rank"],
                "max_rank": max([plan["rank"], *plan["rank_pattern"].values()]),
                "lora_alpha": plan["lora_alpha"],
                "kind": plan["kind"],
                "targets": plan["targets"],
                "rank_pattern": bool(plan["rank_pattern"]),
                "bytes": _bytes(adapter_dir),
            }
        )
    (out / MANIFEST).write_text(json.dumps({**header, "adapters": adapters}, indent=1) + "\n")
    return _with_paths(out, adapters)


CHECK_ADAPTERS = (0, 1, 2, 3, 4, 11, 14)  # every rank and target set; a003, a011 with rank_pattern
CHECK_PROMPTS = (
    "The capital of France is",
    "Once upon a time, there was a",
    "The three primary colors are",
    "def fibonacci(n):\n",
)
CHECK_TEXT = (
    "The sun rises in the east and sets in the west. Every morning, people all over the world wake up, "
    "drink a cup of coffee or tea, and go to work. Water boils at one hundred degrees Celsius at sea level."
)
CHECK_TOKENS = 16


def scale_check(adapters: list[dict]) -> dict:
    """Load SmolLM2 (fp32) with a few of the fleet's adapters through PEFT; print and return how far
    each moves the model: |delta| / |W x| per module on real activations, per-token NLL of CHECK_TEXT,
    top-1 agreement with the base, and the greedy continuations of CHECK_PROMPTS."""
    import statistics
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dlplora_triton.demo.smollm2 import smollm2_folder

    folder = str(smollm2_folder())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    chosen = [adapters[i] for i in CHECK_ADAPTERS if i < len(adapters)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(base, chosen[0]["path"], adapter_name=chosen[0]["name"])
        for a in chosen[1:]:
            model.load_adapter(a["path"], adapter_name=a["name"])
    model.eval()

    # |delta| / |W x| per token: forward hooks on each LoRA layer (base + delta) and its base_layer.
    outputs: dict[str, torch.Tensor] = {}
    ratios: dict[str, list[float]] = {}

    def keep(name):
        def hook(module, args, out):
            outputs[name] = out.detach()

        return hook

    hooks = []
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and isinstance(module.base_layer, torch.nn.Linear):
            hooks.append(module.register_forward_hook(keep(name)))
            hooks.append(module.base_layer.register_forward_hook(keep(name + ".base")))

    text_ids = tokenizer(CHECK_TEXT, return_tensors="pt").input_ids
    prompts = [tokenizer(p, return_tensors="pt").input_ids for p in CHECK_PROMPTS]

    def measure():
        outputs.clear()
        with torch.no_grad():
            logits = model(text_ids).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, text_ids[0, 1:]).item()
        delta = {
            n: ((outputs[n] - outputs[n + ".base"]).norm(dim=-1) / outputs[n + ".base"].norm(dim=-1)).median()
            for n in outputs
            if not n.endswith(".base")
        }
        with torch.no_grad():
            greedy = [
                model.generate(input_ids=p, max_new_tokens=CHECK_TOKENS, do_sample=False)[0, p.shape[1] :]
                for p in prompts
            ]
        return logits.argmax(-1), nll, delta, greedy

    with model.disable_adapter():
        base_top1, base_nll, _, base_greedy = measure()
    print(f"base: NLL {base_nll:.3f}/token")
    for p, g in zip(CHECK_PROMPTS, base_greedy):
        print(f"    {p!r} -> {tokenizer.decode(g)!r}")

    rows = []
    for a in chosen:
        model.set_adapter(a["name"])
        top1, nll, delta, greedy = measure()
        for n, v in delta.items():
            ratios.setdefault(n.rsplit(".", 1)[-1], []).append(v.item())
        differ = [
            next((i for i, (x, y) in enumerate(zip(g, b)) if x != y), None)
            for g, b in zip(greedy, base_greedy)
        ]
        row = {
            "name": a["name"],
            "rank": a["rank"],
            "kind": a["kind"],
            "rank_pattern": a["rank_pattern"],
            "nll": nll,
            "nll_ratio": nll / base_nll,
            "top1_agreement": (top1 == base_top1).float().mean().item(),
            "differing_continuations": sum(d is not None for d in differ),
            "first_difference": [d for d in differ if d is not None],
        }
        rows.append(row)
        print(
            f"{a['name']} r={a['rank']} {a['kind']}{' +rank_pattern' if a['rank_pattern'] else ''}: "
            f"NLL {nll:.3f} ({row['nll_ratio']:.2f}x), top-1 agreement {row['top1_agreement']:.2f}, "
            f"{row['differing_continuations']}/{len(prompts)} continuations differ (first at {row['first_difference']})"
        )
        for p, g in zip(CHECK_PROMPTS, greedy):
            print(f"    {p!r} -> {tokenizer.decode(g)!r}")
    for h in hooks:
        h.remove()
    medians = {k: statistics.median(v) for k, v in sorted(ratios.items())}
    print("median |delta| / |W x| per module: " + ", ".join(f"{k} {v:.3f}" for k, v in medians.items()))
    return {"base_nll": base_nll, "adapters": rows, "delta_ratio": medians}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: bench/fleet/smollm2-<count>")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check", action="store_true", help="then run the scale check on a few adapters")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or default_out(args.count)

    manifest = Path(out) / MANIFEST
    before = manifest.stat().st_mtime_ns if manifest.exists() else None
    start = time.perf_counter()
    adapters = write_fleet(out, args.count, args.seed)
    seconds = time.perf_counter() - start
    total = sum(a["bytes"] for a in adapters)
    what = "reused" if manifest.stat().st_mtime_ns == before else f"written in {seconds:.1f} s"
    print(f"{len(adapters)} adapters, {total / 1e9:.2f} GB in {out}: {what}")
    if args.check:
        scale_check(adapters)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # dlplora_triton from this checkout when it is not installed
    main()
