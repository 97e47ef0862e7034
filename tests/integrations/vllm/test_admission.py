"""The scheduler hook's admission policy (integrations/vllm/admission.py), driven step by step without vLLM:
slots never overflow, and a mix held back by one-adapter traffic gets in within a bounded number of steps."""

import random

import pytest

from dlplora_triton.integrations.vllm.admission import (
    DEFAULT_PATIENCE,
    PATIENCE_ENV,
    admit,
    patience_from_env,
)


class SlotSimulator:
    """A queue, running requests that each take ``duration`` steps, and ``admit`` deciding each step."""

    def __init__(self, max_loras: int, patience: int, duration: int = 3):
        self.max_loras, self.patience, self.duration = max_loras, patience, duration
        self.waiting: list[dict] = []
        self.running: list[dict] = []
        self.step_no = 0
        self.admitted_at: dict[str, int] = {}

    def arrive(self, name: str, need) -> None:
        self.waiting.append({"name": name, "need": frozenset(need), "waited": 0, "arrived": self.step_no})

    def step(self) -> None:
        held = set().union(*(r["need"] for r in self.running))
        decision = admit(
            held,
            [(i, r["need"], r["waited"]) for i, r in enumerate(self.waiting)],
            self.max_loras,
            self.patience,
        )
        back = set(decision.held_back)
        for i, request in enumerate(self.waiting):
            if i in back:
                request["waited"] += 1
            else:
                request["left"] = self.step_no + self.duration
                self.running.append(request)
                self.admitted_at[request["name"]] = self.step_no
        self.waiting = [r for i, r in enumerate(self.waiting) if i in back]
        in_slots = set().union(*(r["need"] for r in self.running))
        assert len(in_slots) <= self.max_loras, f"step {self.step_no}: {sorted(in_slots)} overflow the slots"
        self.step_no += 1
        self.running = [r for r in self.running if r["left"] > self.step_no]


def adversarial(patience: int, steps: int = 200) -> SlotSimulator:
    """A mix of three arrives behind running one-adapter requests; every step brings four more, on four
    adapters outside the mix, so some of them always hold the slots the mix needs."""
    sim = SlotSimulator(max_loras=4, patience=patience)
    others = ["x1", "x2", "x3", "x4"]
    for i in range(4):
        sim.arrive(f"warm{i}", {others[i]})
    sim.step()
    sim.arrive("mix", {"a", "b", "c"})
    for t in range(steps):
        for i in range(4):
            sim.arrive(f"one{t}.{i}", {others[(t + i) % 4]})
        sim.step()
    return sim


def test_a_mix_starves_without_a_reservation():
    # The policy before patience (hold back whatever does not fit, nothing more): the mix never runs.
    sim = adversarial(patience=10**9)
    assert "mix" not in sim.admitted_at


@pytest.mark.parametrize("patience", [0, 1, DEFAULT_PATIENCE, 10])
def test_a_held_back_mix_gets_in_within_patience_plus_a_run(patience):
    sim = adversarial(patience)
    # Held back `patience` steps, then the running requests drain (each lasts `duration` steps).
    assert sim.admitted_at["mix"] - 1 <= patience + sim.duration
    # ... and the one-adapter traffic goes on after it.
    assert max(sim.admitted_at.values()) >= sim.step_no - 2


def test_requests_fitting_beside_the_reservation_still_run():
    sim = SlotSimulator(max_loras=4, patience=0, duration=5)
    sim.arrive("x", {"x1"})
    sim.arrive("y", {"x2"})
    sim.arrive("z", {"x3"})
    sim.step()  # x, y, z run: three slots held
    sim.arrive("mix", {"a", "b", "c"})  # needs three: one is free
    sim.arrive("keeps", {"x1"})  # x1 (the lowest id) can stay beside the mix: served on
    sim.arrive("drains", {"x3"})  # x3 must drain for the mix: held back
    sim.arrive("one_of_mix", {"a"})  # needs a reserved adapter: cannot delay the mix
    sim.arrive("base", set())  # no LoRA: always fits
    sim.step()
    assert "mix" not in sim.admitted_at
    assert {"keeps", "one_of_mix", "base"} <= set(sim.admitted_at)
    assert "drains" not in sim.admitted_at
    while "mix" not in sim.admitted_at:
        sim.step()
    assert sim.admitted_at["mix"] <= 1 + 5


def test_every_request_waits_a_bounded_time_under_zipf_traffic_with_mixes():
    rng = random.Random(0)
    adapters = [f"a{i}" for i in range(32)]
    weights = [1 / (i + 1) for i in range(32)]  # Zipf, alpha 1
    sim = SlotSimulator(max_loras=4, patience=DEFAULT_PATIENCE)
    arrived = {}
    for t in range(400):
        for j in range(3):
            kind = rng.random()
            size = 0 if kind < 0.1 else 1 if kind < 0.7 else rng.choice([2, 3])
            need = set()
            while len(need) < size:
                need.add(rng.choices(adapters, weights)[0])
            name = f"r{t}.{j}"
            sim.arrive(name, need)
            arrived[name] = sim.step_no
        sim.step()
    for _ in range(2000):  # drain
        if not sim.waiting:
            break
        sim.step()
    assert not sim.waiting
    waits = [sim.admitted_at[n] - arrived[n] for n in arrived]
    # Bounded: no request waits more than a few reservations' worth of steps.
    assert max(waits) < 400, max(waits)


def test_patience_from_env():
    assert patience_from_env({}) == DEFAULT_PATIENCE
    assert patience_from_env({PATIENCE_ENV: "0"}) == 0
    assert patience_from_env({PATIENCE_ENV: "12"}) == 12
    for bad in ("-1", "two", "1.5"):
        with pytest.raises(ValueError, match=PATIENCE_ENV):
            patience_from_env({PATIENCE_ENV: bad})
