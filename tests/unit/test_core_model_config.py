"""config.json numbers from the preflight's findings are tenant input (docs/security.md,
"Job results"): a pod of the tenant's namespace wrote them. On main a 300-digit integer
raised OverflowError in the next step (the memory estimate), and an odd one made the
layout check build a divisor list of 10**300 entries. Now every number the operator
reads is typed and bounded first: a bad one is refused with InvalidModelConfig naming
the field; everything else optional is ignored; nothing raises."""

from __future__ import annotations

from typing import Any

import pytest

from preshard.core import steps as cs
from preshard.core.identity import SourcePin
from preshard.core.modelconfig import CONFIG_NUMBER_BOUNDS, model_config
from preshard.core.preflight import parse_preflight
from preshard.core.spec import parse_spec
from preshard.core.steps import next_step

PIN = SourcePin(None, "sha256:" + "1" * 64)
ME = "ml/llama/uid-new"
LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
    "quantization_config": {"quant_method": "fp8"},
}


def _spec(accelerator: str = "cpu", tp: int = 2) -> Any:
    return parse_spec(
        {
            "source": {"uri": "s3://models/llama/"},
            "tensorParallelSize": tp,
            "output": {"uri": "s3://out/llama/"},
            "converter": {
                "accelerator": accelerator,
                "resources": {"limits": {"memory": "64Gi"}, "requests": {"cpu": "8"}},
            },
        }
    )


def _findings(config: Any) -> dict[str, Any]:
    return {
        "kind": "preflight",
        "source": {"uri": "s3://models/llama/", "digest": PIN.digest, "revision": None},
        "vllmVersion": "0.32.0",
        "config": config,
        "output": {"state": "empty", "objects": 0, "overlapping": []},
    }


def test_a_real_config_passes_unchanged() -> None:
    config, problem = model_config(LLAMA)
    assert problem is None and config == LLAMA
    p = parse_preflight(_findings(LLAMA))
    assert p.config == LLAMA and p.config_error is None
    assert next_step(_spec(), ME, p, frozenset(), [], accelerator="cpu").step == "Convert"
    assert cs.memory_estimate_status(_spec(), p, "cpu") is not None


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("num_attention_heads", 10**300, "an integer of 301 digits"),
        ("num_attention_heads", 10**300 + 1, "an integer of 301 digits"),  # odd: the divisor list
        ("hidden_size", 10**300, "an integer of 301 digits"),
        ("vocab_size", -1, "-1"),
        ("num_hidden_layers", "32", "a str"),
        ("intermediate_size", 1.5, "1.5"),
        ("num_key_value_heads", True, "True"),
        ("max_position_embeddings", float("inf"), "inf"),
        ("head_dim", [64], "a list"),
        ("num_local_experts", {"n": 8}, "a dict"),
        ("moe_intermediate_size", 2**26 + 1, str(2**26 + 1)),
    ],
)
def test_a_bad_number_is_refused_naming_the_field(field: str, value: Any, words: str) -> None:
    bad = {**LLAMA, field: value}
    p = parse_preflight(_findings(bad))
    assert p.config_error is not None and field in p.config_error and words in p.config_error
    assert field not in p.config  # never counted with
    for accelerator in ("cpu", "gpu"):
        d = next_step(_spec(accelerator), ME, p, frozenset(), [], accelerator=accelerator)
        assert (d.step, d.reason) == ("CannotConvert", "InvalidModelConfig"), d
        assert field in d.message and len(d.message) < 400
        cs.memory_estimate_status(_spec(accelerator), p, accelerator)  # never raises


def test_optional_fields_of_another_type_are_ignored_and_unknown_ones_dropped() -> None:
    raw = {
        **LLAMA,
        "model_type": "x" * 1000,
        "torch_dtype": 16,
        "architectures": "LlamaForCausalLM",
        "tie_word_embeddings": "yes",
        "quantization_config": {"quant_method": 8, "bits": 10**300},
        "text_config": {"hidden_size": 10**300},
        "rope_theta": 10**300,
    }
    config, problem = model_config(raw)
    assert problem is None
    assert set(config) == set(CONFIG_NUMBER_BOUNDS) & set(LLAMA)
    p = parse_preflight(_findings(raw))
    assert next_step(_spec(), ME, p, frozenset(), [], accelerator="cpu").step == "Convert"


@pytest.mark.parametrize("raw", [None, [], "config", 12, {"hidden_size": None}])
def test_no_config_is_no_problem(raw: Any) -> None:
    config, problem = model_config(raw)
    assert problem is None and config == {}


def test_integral_floats_count_and_bounds_are_inclusive() -> None:
    config, problem = model_config({"hidden_size": 4096.0, "vocab_size": 2**26, "head_dim": 0})
    assert problem is None
    assert config == {"hidden_size": 4096, "vocab_size": 2**26, "head_dim": 0}
    assert isinstance(config["hidden_size"], int)
