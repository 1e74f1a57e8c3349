"""The compiled decode step (engine.compiled): the same logits and greedy tokens as the
eager forward, dense and MoE, quantized too; used by stream_generate by default; anything it
cannot compile (forced runs, other caches) goes through the eager forward."""

from __future__ import annotations

import numpy as np
import pytest
from checkpoints import build, tiny_config, tokens

from qwen3_chat import SamplingParams
from qwen3_chat.engine.compiled import CompiledDecoder, decoder_for, eager_decode
from qwen3_chat.engine.events import Finished
from qwen3_chat.engine.generate import generate_tokens, prefill, stream_generate
from qwen3_chat.engine.sampling import make_sampler
from qwen3_chat.weights.quantize import quantize_model

GREEDY = SamplingParams(temperature=0)


def greedy_run(model, decoder, prompt: list[int], n: int) -> list[int]:
    cache = model.make_cache()
    stream = generate_tokens(model, prompt, cache, make_sampler(GREEDY), [], decoder=decoder)
    out = [t for t, _ in (next(stream) for _ in range(n))]
    stream.close()
    return out


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("bits", [None, 4], ids=["float", "4bit"])
def test_compiled_step_matches_eager(moe: bool, bits: int | None) -> None:
    model = build(tiny_config(moe=moe, num_hidden_layers=3))
    if bits:
        quantize_model(model, bits)
    prompt = tokens(9).tolist()[0]
    compiled = CompiledDecoder(model)
    # The logits of many consecutive steps agree to float rounding...
    eager_cache, comp_cache = model.make_cache(), model.make_cache()
    for cache in (eager_cache, comp_cache):
        prefill(model, prompt, cache)
    for t in tokens(20, seed=5).tolist()[0]:
        a = eager_decode(model, [t], eager_cache)
        b = compiled(model, [t], comp_cache)
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-4)
    assert comp_cache[0].offset == eager_cache[0].offset == 29
    # ...and a long greedy run picks the very same tokens.
    assert greedy_run(model, compiled, prompt, 40) == greedy_run(model, eager_decode, prompt, 40)


def test_stream_generate_uses_the_compiled_step(tiny) -> None:
    model, tok = tiny
    dec = decoder_for(model)
    assert isinstance(dec, CompiledDecoder) and decoder_for(model) is dec  # one per model
    ids = tok.encode("<|im_start|>user\nCount to ten.<|im_end|>\n<|im_start|>assistant\n")

    def run(decoder) -> tuple[int, ...]:
        evs = stream_generate(model, tok, ids, sampling=GREEDY, max_tokens=24, decoder=decoder)
        return [e for e in evs if isinstance(e, Finished)][0].token_ids

    assert run(None) == run(eager_decode)


def test_forced_runs_and_other_caches_fall_back_to_eager() -> None:
    model = build(tiny_config())
    compiled = CompiledDecoder(model)
    prompt = tokens(5).tolist()[0]
    eager_cache, comp_cache = model.make_cache(), model.make_cache()
    for cache in (eager_cache, comp_cache):
        prefill(model, prompt, cache)
    run = [7, 8, 9]  # a forced run: several tokens in one step
    np.testing.assert_allclose(
        np.array(compiled(model, run, comp_cache)), np.array(eager_decode(model, run, eager_cache)),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    assert comp_cache[0].offset == 8


def test_a_model_without_the_split_halves_gets_the_eager_step() -> None:
    class Opaque:
        layers: list = []

    assert decoder_for(Opaque()) is eager_decode
    with pytest.raises(ValueError):
        CompiledDecoder(Opaque())


def test_a_models_decoder_does_not_keep_it_alive() -> None:
    # /model switches models: the old one's weights must be freed, traces and all.
    import gc
    import weakref

    model = build(tiny_config())
    dec = decoder_for(model)
    greedy_run(model, dec, tokens(4).tolist()[0], 3)
    gone = weakref.ref(model)
    del model, dec
    gc.collect()
    assert gone() is None
