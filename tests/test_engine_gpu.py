"""The engine on CUDA: Triton paged kernels and CUDA-graph decode against `transformers`.

Run on the GPU machine: `pytest -m gpu tests/test_engine_gpu.py`. fp32 keeps greedy decoding
free of near-ties, so the tokens must equal `generate`'s exactly.
"""

from __future__ import annotations

import pytest
import torch
from test_engine import NEW_TOKENS, _hf_greedy, _models, _prompts, _run  # noqa: F401

from truthgpt.config import InferenceConfig
from truthgpt.inference.engine import Engine
from truthgpt.inference.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # collected in CI (CPU): every test here is skipped
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from test_engine import tokenizer  # noqa: E402,F401  (the fixture)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("graphs", [True, False])
def test_cuda_engine_greedy_matches_transformers(kind, graphs, tokenizer, tmp_path):  # noqa: F811
    reference, ours = _models(kind, tokenizer, tmp_path)
    reference, ours = reference.cuda(), ours.cuda()
    options = InferenceConfig(
        device="cuda",
        block_size=16,
        cuda_graphs=graphs,
        max_num_seqs=16,
        num_blocks=64,
        dtype="fp32",
    )
    engine = Engine(ours, tokenizer, options)
    assert engine.runner.use_kernels and bool(engine.runner.graphs) == graphs
    prompts = _prompts([5, 17, 40, 1, 33, 70])
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    done = _run(engine, prompts, params)
    for index, prompt in enumerate(prompts):
        want = _hf_greedy(reference, prompt)
        assert done[str(index)][0] == want, f"prompt {index}"


def test_cuda_seeded_sampling_alone_equals_in_batch(tokenizer, tmp_path):  # noqa: F811
    _, ours = _models("llama", tokenizer, tmp_path)
    ours = ours.cuda()
    options = InferenceConfig(device="cuda", max_num_seqs=16, num_blocks=64)
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=3, max_tokens=12)
    prompt = _prompts([11])[0]
    alone = _run(Engine(ours, tokenizer, options), [prompt], params)["0"][0]
    engine = Engine(ours, tokenizer, options)
    crowd = _prompts([3, 9, 20, 7], seed=4) + [prompt]
    mixed = [SamplingParams(temperature=1.0, seed=i, max_tokens=12) for i in range(4)] + [params]
    for index, (p, sp) in enumerate(zip(crowd, mixed)):
        engine.add_request(str(index), p, sp, detokenize=False)
    done = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output.outputs[0].token_ids
    assert done["4"] == alone


def test_cuda_one_token_prompt_chunks_beside_graph_decodes(tokenizer, tmp_path):  # noqa: F811
    """15 decodes fill a 16-token step but one: a new prompt then advances one token a step,
    every row has one token, and only the decodes may take the CUDA-graph path (a mid-prompt
    row there would sample a token). Its prompt logprobs come out of the same steps."""
    from test_engine import _check_scores

    reference, ours = _models("llama", tokenizer, tmp_path)
    reference, ours = reference.cuda(), ours.cuda()
    options = InferenceConfig(
        device="cuda", block_size=16, max_num_seqs=16, num_blocks=256, dtype="fp32",
        max_num_batched_tokens=16,
    )  # fmt: skip
    engine = Engine(ours, tokenizer, options)
    assert engine.runner.graphs
    busy = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    for index, prompt in enumerate(_prompts([3] * 15, seed=5)):
        engine.add_request(f"busy{index}", prompt, busy, detokenize=False)
    for _ in range(3):
        engine.step()  # all 15 are decoding now
    late = _prompts([9], seed=6)[0]
    params = SamplingParams(
        temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=2
    )
    engine.add_request("late", late, params, detokenize=False)
    done = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output
    assert done["late"].outputs[0].token_ids == _hf_greedy(reference, late)
    _check_scores(done["late"].prompt_logprobs, reference.cpu(), late, 2, len(tokenizer))
