"""The batched sampler and the stop-string checker, on hand-made logits (no model)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from hanlin.engine.sampling import (
    SamplingParams,
    StopChecker,
    apply_penalties,
    make_generator,
    probabilities,
    sample,
)

V = 50


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def draw_many(logits_V: torch.Tensor, params: SamplingParams, draws: int = 2000, seed: int = 0) -> set[int]:
    generator = make_generator(seed)
    logits_BV = logits_V.expand(draws, -1)
    tokens = sample(logits_BV, [params] * draws, [generator] * draws)
    return set(tokens.tolist())


# ---- greedy and seeding -------------------------------------------------------------------------


def test_greedy_is_argmax() -> None:
    logits = random_logits(8)
    tokens = sample(logits, [SamplingParams(temperature=0.0)] * 8, [None] * 8)
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_top_k_one_is_greedy() -> None:
    logits = random_logits(8)
    generators = [make_generator(i) for i in range(8)]
    tokens = sample(logits, [SamplingParams(temperature=1.5, top_k=1)] * 8, generators)
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_seeded_sampling_is_reproducible() -> None:
    logits = random_logits(1) / 3
    params = SamplingParams(temperature=1.0, seed=7)
    first = [int(sample(logits, [params], [g])[0]) for g in [make_generator(7)] for _ in range(20)]
    second = [int(sample(logits, [params], [g])[0]) for g in [make_generator(7)] for _ in range(20)]
    assert first == second
    assert len(set(first)) > 1  # it really samples


def test_seeded_row_is_independent_of_batch_composition() -> None:
    target_logits = random_logits(1, seed=1)[0]
    target = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.01, seed=123)

    def run_alone() -> list[int]:
        g = make_generator(123)
        return [int(sample(target_logits[None], [target], [g])[0]) for _ in range(30)]

    def run_in_batch() -> list[int]:
        others = random_logits(3, seed=2)
        logits = torch.stack([others[0], others[1], target_logits, others[2]])
        params = [SamplingParams(temperature=0.0), SamplingParams(top_k=3, seed=5), target, SamplingParams(top_p=0.5)]
        generators = [None, make_generator(5), make_generator(123), None]
        return [int(sample(logits, params, generators)[2]) for _ in range(30)]

    assert run_alone() == run_in_batch()


def test_sampling_frequencies_match_probabilities() -> None:
    logits = random_logits(1)[0] / 3
    draws = 20000
    tokens = sample(logits.expand(draws, -1), [SamplingParams()] * draws, [make_generator(0)] * draws)
    frequencies = torch.bincount(tokens, minlength=V) / draws
    assert (frequencies - logits.softmax(dim=-1)).abs().max() < 0.01


def test_mixed_batch_greedy_rows_use_argmax() -> None:
    logits = random_logits(4)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=2.0), SamplingParams(temperature=0.0), SamplingParams()]
    tokens = sample(logits, params, [None, make_generator(0), None, make_generator(1)])
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


def test_sample_does_not_modify_caller_logits() -> None:
    logits = random_logits(2)
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, top_p=0.5)] * 2
    sample(logits, params, [None, None], [[1, 2, 3], [4, 4]])
    assert torch.equal(logits, before)


# ---- filters ------------------------------------------------------------------------------------


def test_top_k_never_samples_outside_the_k_best() -> None:
    logits = random_logits(1)[0]
    allowed = set(logits.topk(5).indices.tolist())
    seen = draw_many(logits, SamplingParams(temperature=5.0, top_k=5))
    assert seen == allowed  # high temperature: every allowed token shows up, nothing else


def test_top_p_keeps_the_smallest_nucleus() -> None:
    # probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625 (sorted as tokens 3, 0, 4, 1, 2)
    probs = torch.tensor([0.25, 0.0625, 0.0625, 0.5, 0.125])
    logits = probs.log()
    assert draw_many(logits, SamplingParams(top_p=0.7)) == {3, 0}  # 0.5 < 0.7 <= 0.75
    assert draw_many(logits, SamplingParams(top_p=0.75)) == {3, 0}  # exactly reached: no third token
    assert draw_many(logits, SamplingParams(top_p=0.76)) == {3, 0, 4}
    assert draw_many(logits, SamplingParams(top_p=0.3)) == {3}  # the best token is always kept
    filtered = probabilities(logits[None], [SamplingParams(top_p=0.7)])[0]
    assert torch.allclose(filtered, torch.tensor([1 / 3, 0, 0, 2 / 3, 0]))


def test_top_p_falls_back_to_a_full_sort_when_candidates_miss_the_nucleus(monkeypatch: pytest.MonkeyPatch) -> None:
    import hanlin.engine.sampling as sampling

    logits = random_logits(4, seed=3) / 4  # flat: the 0.95 nucleus needs many tokens
    params = [SamplingParams(top_p=0.95), SamplingParams(top_p=0.5), SamplingParams(top_p=0.1), SamplingParams()]
    expected = probabilities(logits, params)
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", 3)
    assert torch.equal(probabilities(logits, params), expected)
    assert int((expected[0] > 0).sum()) > 3


def test_min_p_drops_tokens_below_a_fraction_of_the_best() -> None:
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = probs.log()
    # threshold 0.3 * 0.4 = 0.12: tokens 0, 1, 2 survive
    assert draw_many(logits, SamplingParams(min_p=0.3)) == {0, 1, 2}
    filtered = probabilities(logits[None], [SamplingParams(min_p=0.3)])[0]
    assert torch.allclose(filtered, torch.tensor([0.4, 0.3, 0.15, 0, 0]) / 0.85)


def test_filters_compose_in_order_top_k_then_top_p_then_min_p() -> None:
    probs = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1])
    logits = probs.log()
    # top_k=3 renormalises to .3/.75=.4, .25/.75≈.333, .2/.75≈.267; top_p=0.7 then keeps tokens 0 and 1.
    assert draw_many(logits, SamplingParams(top_k=3, top_p=0.7)) == {0, 1}
    # min_p=0.9 afterwards: 0.333 / 0.4 = 0.83 < 0.9, so only token 0 remains.
    assert draw_many(logits, SamplingParams(top_k=3, top_p=0.7, min_p=0.9)) == {0}


def test_temperature_scales_logits() -> None:
    logits = torch.tensor([[1.0, 2.0, 4.0]])
    got = probabilities(logits, [SamplingParams(temperature=0.5)])[0]
    assert torch.allclose(got, torch.softmax(logits[0] / 0.5, dim=-1))


def test_per_row_filters_differ_within_a_batch() -> None:
    logits = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]).log().expand(2, -1)
    probs = probabilities(logits, [SamplingParams(top_k=1), SamplingParams()])
    assert torch.equal(probs[0] > 0, torch.tensor([True, False, False, False, False]))
    assert bool((probs[1] > 0).all())


# ---- penalties ----------------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([[2.0, -1.0, 3.0, -4.0, 0.5]])
    params = [SamplingParams(repetition_penalty=2.0)]
    # tokens 0 and 1 in the prompt, 3 in the output; repeated tokens count once
    got = apply_penalties(logits, params, [[0, 1, 0, 3]], prompt_lengths=[2])
    assert got.tolist() == [[1.0, -2.0, 3.0, -8.0, 0.5]]


def test_presence_and_frequency_penalties_use_output_counts_only() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)]
    # prompt [0, 0]; output [1, 2, 2, 2]
    got = apply_penalties(logits, params, [[0, 0, 1, 2, 2, 2]], prompt_lengths=[2])
    expected = [1.0, 1.0 - 0.5 - 0.25 * 1, 1.0 - 0.5 - 0.25 * 3, 1.0]
    assert torch.allclose(got, torch.tensor([expected]))


def test_all_penalties_together_are_per_row() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0], [2.0, -2.0, 1.0]])
    params = [SamplingParams(repetition_penalty=4.0, frequency_penalty=1.0), SamplingParams()]
    got = apply_penalties(logits, params, [[0, 1, 1], [0, 1, 2]], prompt_lengths=[1, 0])
    # row 0: repetition on 0, 1 → [0.5, -8]; frequency on output [1, 1] → token 1 minus 2
    assert torch.allclose(got[0], torch.tensor([0.5, -10.0, 1.0]))
    assert torch.equal(got[1], logits[1])


def test_penalties_steer_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    params = SamplingParams(temperature=0.0, frequency_penalty=0.2)
    assert int(sample(logits, [params], [None], [[0]])[0]) == 1


# ---- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("max_tokens", 0),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("seed", -1),
        ("stop", [""]),
        ("stop_token_ids", [-5]),
    ],
)
def test_validate_rejects_out_of_range_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validate()


def test_validate_accepts_defaults_and_edges() -> None:
    SamplingParams().validate()
    SamplingParams(temperature=0.0, top_p=1.0, min_p=1.0, top_k=1, max_tokens=1, presence_penalty=-2.0).validate()


# ---- stop strings -------------------------------------------------------------------------------


def run_checker(stop: list[str], chunks: list[str]) -> tuple[str, bool, list[str]]:
    checker = StopChecker(stop)
    emitted: list[str] = []
    hit = False
    for chunk in chunks:
        text, hit = checker.push(chunk)
        emitted.append(text)
        if hit:
            break
    if not hit:
        emitted.append(checker.flush())
    return "".join(emitted), hit, emitted


def expected_output(stop: list[str], text: str) -> tuple[str, bool]:
    positions = [text.find(s) for s in stop if s in text]
    return (text[: min(positions)], True) if positions else (text, False)


def all_chunkings(text: str, max_cuts: int = 3) -> list[list[str]]:
    """Every way to cut text at up to max_cuts points (exhaustive for short strings)."""
    from itertools import combinations

    result = []
    for cuts in range(max_cuts + 1):
        for points in combinations(range(1, len(text)), cuts):
            bounds = [0, *points, len(text)]
            result.append([text[a:b] for a, b in zip(bounds, bounds[1:])])
    return result


STOP_CASES = [
    (["</s>"], "hello </s> world"),
    (["</s>"], "a < b </ c </s"),  # partial at the end: released by flush, never a stop
    (["END", "ENDING"], "the ENDING"),
    (["abab"], "abaabababab"),
    (["\n\n", "User:"], "Sure.\nUse\nUser: hi"),
    (["xyz"], "no stop here at all"),
    (["aaa"], "aaaaa"),
    (["ba", "aab"], "caab"),  # "aab" starts first
]


@pytest.mark.parametrize(("stop", "text"), STOP_CASES)
def test_stop_checker_over_every_chunking(stop: list[str], text: str) -> None:
    want_text, want_hit = expected_output(stop, text)
    for chunks in all_chunkings(text):
        got_text, hit, emitted = run_checker(stop, chunks)
        assert (got_text, hit) == (want_text, want_hit), chunks
        # never leak: every prefix of emitted text is a prefix of the final answer
        assert want_text.startswith("".join(emitted)), chunks


def test_stop_checker_random_property() -> None:
    rng = random.Random(0)
    for _ in range(500):
        alphabet = "ab<>/"
        stop = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        chunks, i = [], 0
        while i < len(text):
            j = i + rng.randint(0, 4)
            chunks.append(text[i:j])
            i = j
        want_text, want_hit = expected_output(stop, text)
        got_text, hit, _ = run_checker(stop, chunks)
        assert (got_text, hit) == (want_text, want_hit), (stop, chunks)


def test_stop_checker_holds_partial_stop_until_disproved() -> None:
    checker = StopChecker(["<|end|>"])
    assert checker.push("Hello <|en") == ("Hello ", False)
    assert checker.push("d") == ("", False)
    assert checker.push("less") == ("<|endless", False)
    assert checker.push(" <|end|> more") == (" ", True)
    assert checker.matched == "<|end|>"
    assert checker.push("after") == ("", True)
    assert checker.flush() == ""


def test_stop_checker_without_stops_passes_text_through() -> None:
    checker = StopChecker([])
    assert checker.push("abc") == ("abc", False)
    assert checker.flush() == ""


def test_argmax_rows_is_torch_argmax() -> None:
    """The compiled kernels' greedy argmax: ties go to the first index, a NaN counts as the largest (its first
    occurrence), all -inf gives 0; widths past the 8-wide vector loop."""
    from hanlin.engine.sampling import argmax_rows
    from hanlin.kernels import cpu_kernels

    if cpu_kernels() is None:
        pytest.skip("needs the compiled CPU kernels")
    torch.manual_seed(0)
    for width in (1, 7, 8, 13, 49152):
        logits = torch.randn(6, width)
        logits[1] = 3.0  # every value ties
        logits[2, width // 2 :] = float("nan")  # NaNs after the largest value
        logits[3] = float("-inf")
        logits[4, -1] = 1e30
        assert torch.equal(cpu_kernels().argmax_rows(logits), logits.argmax(dim=-1)), width
        assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))
