"""rollout.py without Ray: sampling params, requests, completions and staleness. The client against
real engines is in test_fleet.py."""

from __future__ import annotations

import re

import pytest

from rollfleet.runtime.rollout import SAMPLING_DEFAULTS, Completion, Request, Sample, completion, sampling_params


def test_sampling_defaults_are_vllms_and_overrides_are_kept():
    assert sampling_params(None) == SAMPLING_DEFAULTS
    assert SAMPLING_DEFAULTS["temperature"] == 1.0 and SAMPLING_DEFAULTS["max_tokens"] == 16
    out = sampling_params({"n": 4, "temperature": 0.7, "stop": "\n\n"})
    assert out["n"] == 4 and out["temperature"] == 0.7 and out["stop"] == ["\n\n"] and out["top_p"] == 1.0


def test_an_unknown_sampling_param_gets_one_error_listing_the_supported_ones():
    with pytest.raises(ValueError) as err:
        sampling_params({"best_of": 2, "n": 2})
    msg = str(err.value)
    assert "['best_of'] not supported" in msg
    for key in ("n", "temperature", "top_p", "top_k", "min_p", "max_tokens", "stop", "stop_token_ids", "seed",
                "logprobs", "repetition_penalty", "include_stop_str_in_output", "skip_special_tokens"):
        assert key in msg


@pytest.mark.parametrize("params,fragment", [
    ({"n": 0}, "n: 0 must be >= 1"),
    ({"n": 2.0}, "n: 2.0 is not an integer"),
    ({"temperature": -1}, "temperature: -1 must be >= 0"),
    ({"temperature": float("nan")}, "temperature: nan must be a finite number"),
    ({"top_p": float("inf")}, "top_p: inf must be a finite number"),
    ({"top_p": 0}, "top_p: 0 must be > 0"),
    ({"top_p": 1.5}, "top_p: 1.5 must be <= 1"),
    ({"top_k": -2}, "top_k: -2 must be >= -1"),
    ({"min_p": 2}, "min_p: 2 must be <= 1"),
    ({"max_tokens": 0}, "max_tokens: 0 must be >= 1"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens: 20 must be <= max_tokens (10)"),
    ({"repetition_penalty": 0}, "repetition_penalty: 0 must be > 0"),
    ({"seed": "1"}, "seed: '1' is not an integer"),
    ({"seed": -1}, "seed: -1 must be >= 0"),
    ({"seed": 2**63}, "seed: 9223372036854775808 must be < 2**63 - n + 1"),
    ({"seed": 2**63 - 2, "n": 4}, "seed: 9223372036854775806 must be < 2**63 - n + 1"),
    ({"stop": [""]}, "stop: an empty string never stops; remove it"),
    ({"stop": [3]}, "stop.0: 3 is not a string"),
    ({"stop_token_ids": [1, -3]}, "stop_token_ids: [1, -3] holds a negative token id"),
    ({"stop_token_ids": ["1"]}, "stop_token_ids.0: '1' is not an integer"),
    ({"logprobs": 1}, "logprobs: 1 is not true/false"),
    ({"temperature": True}, "temperature: True is not a number"),
])
def test_bad_sampling_params_name_the_key(params, fragment):
    with pytest.raises(ValueError, match=re.escape("sampling param " + fragment)):
        sampling_params(params)


def test_a_request_takes_exactly_one_prompt_form():
    assert Request(prompt_token_ids=[1, 2]).wire("r1")["prompt_token_ids"] == [1, 2]
    wire = Request(prompt="hi", params={"n": 3}).wire("r2")
    assert wire["prompt"] == "hi" and wire["indices"] == [0, 1, 2] and wire["params"]["n"] == 3
    assert Request(messages=[{"role": "user", "content": "hi"}]).wire("r3")["messages"]
    with pytest.raises(ValueError, match="r4: give exactly one of prompt_token_ids, prompt, messages"):
        Request().wire("r4")
    with pytest.raises(ValueError, match=r"got \['prompt_token_ids', 'prompt'\]"):
        Request(prompt_token_ids=[1], prompt="x").wire("r5")


@pytest.mark.parametrize("request_,fragment", [
    (Request(prompt_token_ids=[]), "prompt_token_ids must be a non-empty list of token ids"),
    (Request(prompt_token_ids=[1, "2"]), "prompt_token_ids must be a non-empty list of token ids"),
    (Request(prompt=3), "prompt must be a non-empty string"),
    (Request(prompt=""), "prompt must be a non-empty string"),
    (Request(messages=[]), "messages must be a non-empty list"),
    (Request(messages=[{"role": "user"}]), "messages must be a non-empty list"),
    (Request(prompt="x", params={"top_k": 1.5}), "sampling param top_k"),
])
def test_bad_requests_name_what_is_wrong(request_, fragment):
    with pytest.raises(ValueError, match=fragment):
        request_.wire("r")


def test_token_ids_beyond_the_vocabulary_are_refused_naming_the_bound():
    assert Request(prompt_token_ids=[1, 1023]).wire("r", vocab_size=1024)
    with pytest.raises(ValueError, match=r"r: prompt_token_ids: \[1024\] beyond the model's vocabulary \(ids < 1024\)"):
        Request(prompt_token_ids=[1, 1024]).wire("r", vocab_size=1024)
    with pytest.raises(ValueError, match=r"sampling param stop_token_ids: \[5000\] beyond the model's vocabulary"):
        Request(prompt="x", params={"stop_token_ids": [5000]}).wire("r", vocab_size=1024)


def _sample(i, admitted, completed) -> dict:
    versions = [(0, admitted)] if admitted == completed else [(0, admitted), (1, completed)]
    return {"index": i, "token_ids": [i, i], "text": str(i), "logprobs": None, "finish_reason": "length",
            "versions": versions}


def test_a_completion_is_as_old_as_its_oldest_sample():
    item = {"id": "r", "engine": 1, "prompt_token_ids": [4, 5, 6],
            "samples": [_sample(1, 2, 3), _sample(0, 3, 3)]}  # out of order on the wire
    c = completion(item, tag="t")
    assert isinstance(c, Completion) and c.tag == "t" and c.engine == 1
    assert [s.index for s in c.samples] == [0, 1]
    assert all(isinstance(s, Sample) and s.prompt_tokens == 3 and s.engine == 1 for s in c.samples)
    assert c.admitted_version == 2 and c.staleness(4) == 2 and c.staleness(2) == 0
    assert c.samples[1].spans_update and not c.samples[0].spans_update
    assert c.samples[1].token_versions() == [2, 3] and c.samples[0].token_versions() == [3, 3]
