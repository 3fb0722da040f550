"""Every public generation parameter is validated at the boundary (issue 14): for arbitrary values,
valid or not, generate() either returns a result that keeps its contract or raises ValueError /
TypeError naming the parameter; never another exception, never a silently converted value."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FakeModel, loaded
from outrider import SpeculativeDecoder
from outrider.drafters import DraftModel

V = 6
NAMES = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")


def decoder() -> SpeculativeDecoder:
    return SpeculativeDecoder(loaded(FakeModel(vocab_size=V, seed=0)), DraftModel(FakeModel(vocab_size=V, seed=1), V, k=3), k=3)


junk = st.one_of(st.none(), st.booleans(), st.binary(max_size=3), st.floats(allow_nan=True, allow_infinity=True),
                 st.lists(st.lists(st.integers(0, 5), max_size=2), min_size=1, max_size=2), st.text(max_size=3))
prompts = st.one_of(st.lists(st.integers(-2, V + 1), max_size=6), st.lists(st.floats(0, 5), min_size=1, max_size=3),
                    st.lists(st.booleans(), min_size=1, max_size=2), junk)
counts = st.one_of(st.integers(-2, 12), junk)
temperatures = st.one_of(st.floats(-1, 3, allow_nan=False), st.sampled_from([0, 1, float("nan"), float("inf")]), junk)
top_ks = st.one_of(st.integers(-1, 8), junk)
top_ps = st.one_of(st.floats(-0.5, 1.5, allow_nan=False), junk)
seeds = st.one_of(st.integers(-3, 2**64), junk)
stops = st.one_of(st.none(), st.text(max_size=2), st.lists(st.text(max_size=2), max_size=2), junk)


def valid(prompt, max_new, temperature, top_k, top_p, seed, stop) -> bool:
    """The rules the boundary enforces (for a target without a tokenizer: no text, no stop strings)."""
    real = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    ids_ok = isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         and 0 <= t < V for t in prompt)
    return bool(
        ids_ok
        and isinstance(max_new, int) and not isinstance(max_new, bool) and max_new >= 1
        and real(temperature) and math.isfinite(temperature) and temperature >= 0
        and (top_k is None or (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1))
        and (top_p is None or (real(top_p) and 0 < top_p <= 1))
        and (seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63))
        and (stop is None or stop == [])
    )


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts, counts, temperatures, top_ks, top_ps, seeds, stops)
def test_generate_keeps_its_contract_or_names_the_bad_parameter(prompt, max_new, temperature, top_k, top_p, seed, stop):
    dec = decoder()
    try:
        res = dec.generate(prompt, max_new_tokens=max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=seed, stop=stop)
    except (ValueError, TypeError) as e:
        assert any(name in str(e) for name in NAMES) or "tokenizer" in str(e), str(e)
        assert not valid(prompt, max_new, temperature, top_k, top_p, seed, stop), str(e)
        return
    assert valid(prompt, max_new, temperature, top_k, top_p, seed, stop), (prompt, max_new, temperature, top_k, top_p, seed, stop)
    assert 1 <= len(res.token_ids) <= max_new and all(0 <= t < V for t in res.token_ids)
    assert res.finish_reason in ("length", "eos", "stop")


@pytest.mark.parametrize("kwargs, needle", [
    ({"temperature": float("nan")}, "temperature=nan"),
    ({"temperature": float("inf")}, "temperature=inf"),
    ({"temperature": True}, "temperature=True"),
    ({"top_p": float("nan")}, "top_p=nan"),
    ({"top_k": True}, "top_k=True"),
    ({"seed": -1}, "seed=-1"),
    ({"seed": 1.5}, "seed=1.5"),
    ({"max_new_tokens": 2.0}, "max_new_tokens=2.0"),
])
def test_values_one_step_off_the_documented_path_are_refused(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        decoder().generate([1, 2, 3], **kwargs)


@pytest.mark.parametrize("prompt, needle", [
    (None, "exactly one of prompt"), (b"x", "prompt=b'x'"), ([1.5], "got 1.5"), ([True], "got True"), ([[1, 2]], "got \\[1, 2\\]"),
])
def test_prompts_that_are_not_text_or_token_ids_are_refused(prompt, needle):
    with pytest.raises(ValueError, match=needle):
        decoder().generate(prompt, max_new_tokens=2)


def test_a_tensor_of_token_ids_is_a_prompt():
    dec = decoder()
    assert dec.generate(torch.tensor([1, 2, 3]), max_new_tokens=4).token_ids == dec.generate([1, 2, 3], max_new_tokens=4).token_ids


numbers = st.one_of(st.integers(-3, 40).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.sampled_from(["nan", "inf", "-inf", "1e400", "0x10", "", " ", "True", "1,2", "abc"]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["--temperature", "--top-p", "--top-k", "--max-new-tokens", "--seed",
                                        "--k", "--prompt-ids"]), numbers, max_size=3))
def test_cli_exits_0_or_2_with_a_message_never_a_traceback(model_dirs, capsys, options):
    """The same property through `outrider generate`: any values give a result (status 0) or a
    message with status 2 (argparse's own or outrider's), never a traceback."""
    from outrider.cli import main

    target, _ = model_dirs
    argv = ["generate", "--target", str(target), "--method", "prompt_lookup", "--json"]
    argv += ["--prompt-ids", options.pop("--prompt-ids")] if "--prompt-ids" in options else ["--prompt", "def f"]
    for flag, value in options.items():
        argv += [flag, value]
    argv += [] if "--max-new-tokens" in options else ["--max-new-tokens", "4"]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse refuses what it cannot parse, with usage and status 2
        code = e.code
    captured = capsys.readouterr()
    assert code in (0, 2), (argv, code, captured.err)
    assert "Traceback" not in captured.err
    if code == 2:
        assert "error" in captured.err
