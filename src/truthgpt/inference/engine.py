"""The engine: requests in, outputs out, one `step()` at a time.

`add_request` checks a request and queues its sequences, `step` lets the scheduler pick a
batch, runs it through the model runner, appends the sampled tokens, detokenizes, applies stop
conditions and returns what changed; `abort` ends a request and frees its blocks at once. A
bad request is refused in `add_request` before it touches any state, so the engine goes on
serving everyone else.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from truthgpt.config import InferenceConfig
from truthgpt.errors import RequestError
from truthgpt.inference.detokenizer import IncrementalDetokenizer, end_token_ids_of
from truthgpt.inference.kv_cache import BlockManager
from truthgpt.inference.model_runner import ModelRunner, StepResult
from truthgpt.inference.request import CompletionOutput, RequestOutput
from truthgpt.inference.sampling_params import SamplingParams
from truthgpt.inference.scheduler import PROMPT_LOGPROB_ROWS, ScheduledBatch, Scheduler
from truthgpt.inference.sequence import Sequence
from truthgpt.models.decoder import Decoder

log = logging.getLogger(__name__)

# Host memory for the pool when no GPU sizes it: enough for tiny and small models on a laptop.
_CPU_POOL_BYTES = 2 * 1024**3


@dataclass
class EngineStats:
    """A snapshot for progress bars and /metrics."""

    waiting: int
    running: int
    used_blocks: int
    free_blocks: int
    num_blocks: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    prefix_hit_rate: float
    preemptions: int
    prompt_tokens: int
    generated_tokens: int


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    seqs: list[Sequence]
    prompt_logprobs_sent: bool = False


def check_prompt_length(length: int, context: int) -> None:
    """RequestError when a prompt of `length` tokens leaves no room to generate in `context`."""
    if length >= context:
        raise RequestError(
            f"the prompt has {length} tokens; this model's context is {context} tokens "
            f"(prompt + output), so at most {context - 1} fit"
        )


def check_prompt_text(text: str, field: str = "prompt") -> None:
    """RequestError when `text` cannot be tokenized: a lone surrogate (JSON's "\\ud800", or a
    non-UTF-8 byte from the shell, which Python decodes to U+DC80..U+DCFF) is no Unicode
    character, and the tokenizer fails on it with a TypeError that names nothing."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = ascii(text[exc.start])[1:-1]
        raise RequestError(
            f"{field}: invalid Unicode (lone surrogate {char} at position {exc.start})"
        ) from None


class Engine:
    """Continuous batching over a paged KV cache for a native `Decoder`."""

    def __init__(
        self,
        model: Decoder,
        tokenizer: PreTrainedTokenizerBase,
        options: InferenceConfig | None = None,
        end_token_ids: Iterable[int] | None = None,
    ) -> None:
        """`end_token_ids`: the tokens that end an answer unless a request sets ignore_eos
        (default: the tokenizer's eos; a folder's generation_config.json may name more)."""
        if not isinstance(model, Decoder):
            raise RequestError(
                f"the engine runs truthgpt's native decoder (llama and gpt2 families); got "
                f"{type(model).__name__}: use truthgpt.LLM, which falls back to transformers"
            )
        options = options or InferenceConfig()
        self.model, self.tokenizer, self.options = model.eval(), tokenizer, options
        device = model.embed.weight.device
        cfg = model.config
        self.max_model_len = min(
            options.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings
        )
        if options.max_model_len and options.max_model_len > cfg.max_position_embeddings:
            log.warning(
                "inference.max_model_len %d is past the model's %d positions; using %d",
                options.max_model_len,
                cfg.max_position_embeddings,
                self.max_model_len,
            )
        use_kernels = self._use_kernels(device, options.kernels)
        block_size = options.block_size
        num_blocks = options.num_blocks or self._size_pool(device, block_size)
        cache = model.new_paged_cache(num_blocks, block_size)
        self.blocks = BlockManager(num_blocks, block_size, options.prefix_caching)
        self.scheduler = Scheduler(
            self.blocks, options.max_num_seqs, options.max_num_batched_tokens
        )
        self.runner = ModelRunner(
            model,
            cache,
            self.max_model_len,
            options.max_num_seqs,
            use_kernels=use_kernels,
            cuda_graphs=options.cuda_graphs and device.type == "cuda" and use_kernels,
            sample_vocab=len(tokenizer),
        )
        if end_token_ids is None:
            end_token_ids = end_token_ids_of(tokenizer)
        self.end_token_ids = frozenset(end_token_ids)
        self.requests: dict[str, _Request] = {}
        self._next_seq_id = 0
        self._seed_rng = random.Random()
        self.prompt_tokens = 0
        self.generated_tokens = 0
        log.info(
            "engine: %d KV blocks of %d tokens (%.2f GiB), max_model_len %d, %s attention%s",
            num_blocks,
            block_size,
            2 * cache.k.numel() * cache.k.element_size() / 1024**3,
            self.max_model_len,
            "Triton" if use_kernels else "PyTorch",
            ", CUDA graphs" if self.runner.graphs else "",
        )

    # -- setup ----------------------------------------------------------------------------------

    @staticmethod
    def _use_kernels(device: torch.device, choice: str) -> bool:
        if choice == "torch" or (device.type != "cuda" and choice == "auto"):
            return False
        from truthgpt.models.paged_kernels import triton_available

        if triton_available(device):  # CUDA sm80+, or CPU under TRITON_INTERPRET=1 (tests)
            return True
        if choice == "triton":
            raise RequestError(
                "inference.kernels: triton needs a CUDA GPU of sm80 or newer with triton "
                "installed; use kernels: auto or torch"
            )
        log.warning("Triton is not available: paged attention falls back to PyTorch (slower)")
        return False

    def _size_pool(self, device: torch.device, block_size: int) -> int:
        per_block = self.model.kv_bytes_per_token() * block_size
        if device.type != "cuda":
            wanted = self.options.max_num_seqs * -(-self.max_model_len // block_size) + 1
            return max(2, min(wanted, _CPU_POOL_BYTES // per_block))
        # Measure what the largest step needs beside the weights (activations, logits), then
        # give the pool its share of what is left.
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        self._profile_step(device, block_size)
        activation_peak = torch.cuda.max_memory_allocated(device) - before
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info(device)
        budget = free * self.options.gpu_memory_fraction - activation_peak
        num_blocks = int(budget // per_block)
        if num_blocks < 2:
            raise RequestError(
                f"no GPU memory left for the KV cache ({free / 1024**3:.2f} GiB free after the "
                f"weights); lower inference.max_num_batched_tokens or use a smaller model"
            )
        return num_blocks

    def _profile_step(self, device: torch.device, block_size: int) -> None:
        """One forward over a full token budget, in a throwaway pool, to measure its memory."""
        from truthgpt.models.attention import AttentionBatch

        tokens = min(self.options.max_num_batched_tokens, self.max_model_len)
        blocks = -(-tokens // block_size) + 1
        cache = self.model.new_paged_cache(blocks, block_size)
        positions = torch.arange(tokens, device=device)
        attn = AttentionBatch(
            positions=positions,
            slot_mapping=positions + block_size,
            dense_query_index=positions[None],
            dense_query_valid=torch.ones(1, tokens, dtype=torch.bool, device=device),
            dense_key_slots=(positions + block_size)[None],
            dense_mask=(positions[None, :] <= positions[:, None])[None, None],
            # A step's logits: its sampling rows and the prompt rows it may score.
            logits_index=torch.arange(max(tokens - PROMPT_LOGPROB_ROWS, 0), tokens, device=device),
        )
        with torch.inference_mode():
            ids = torch.zeros(tokens, dtype=torch.long, device=device)
            self.model.forward_paged(ids, cache, attn)
        del cache

    # -- requests -------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | Seq[int],
        params: SamplingParams | None = None,
        detokenize: bool = True,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request: a prompt string (tokenized here) or token ids. With detokenize
        False and no stop strings, text is decoded once at the end (offline batches)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be SamplingParams, got {type(params).__name__}")
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        prompt_text = prompt if isinstance(prompt, str) else None
        prompt_ids = self._prompt_ids(prompt)
        length = len(prompt_ids)
        check_prompt_length(length, self.max_model_len)
        max_tokens = min(params.max_tokens, self.max_model_len - length)
        needed = self.blocks.blocks_needed(length + max_tokens)
        if needed > self.blocks.num_blocks - 1:
            raise RequestError(
                f"the request needs {needed} KV blocks (prompt {length} + {max_tokens} new "
                f"tokens) but the pool has {self.blocks.num_blocks - 1}; lower max_tokens or "
                f"raise inference.num_blocks / gpu_memory_fraction"
            )
        now = time.monotonic() if arrival_time is None else arrival_time
        seqs = []
        for index in range(params.n):
            seed = (
                params.seed + index if params.seed is not None else self._seed_rng.getrandbits(62)
            )
            detok = None
            if detokenize or params.stop:
                detok = IncrementalDetokenizer(
                    self.tokenizer, prompt_ids, params, self.end_token_ids
                )
            seq = Sequence(
                seq_id=self._next_seq_id,
                request_id=request_id,
                index=index,
                prompt_len=length,
                token_ids=list(prompt_ids),
                params=params,
                seed=seed,
                max_tokens=max_tokens,
                detokenizer=detok,
                arrival_time=now,
            )
            self._next_seq_id += 1
            seqs.append(seq)
        for seq in seqs:
            self.scheduler.add(seq)
        self.requests[request_id] = _Request(request_id, prompt_text, list(prompt_ids), seqs)
        self.prompt_tokens += length * params.n

    def _prompt_ids(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("the prompt is empty")
            check_prompt_text(prompt)
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.model.config.vocab_size
            bad = [
                t
                for t in ids
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab
            ]
            if bad:
                raise RequestError(f"prompt token ids must be ints in [0, {vocab}); got {bad[0]!r}")
        if not ids:
            raise RequestError("the prompt is empty after tokenization")
        return ids

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request now (finish_reason "abort") and free its blocks; None if unknown."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        return self._output(request, {}, finished=True)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the step -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch; returns an output for every request that got new tokens or ended."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        result = self.runner.run(batch)
        return self._apply(batch, result)

    def _apply(self, batch: ScheduledBatch, result: StepResult) -> list[RequestOutput]:
        for seq, count in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += count
        for seq_index, entries in result.prompt_logprobs.items():
            batch.seqs[seq_index].prompt_logprobs.extend(entries)
        now = time.monotonic()
        deltas: dict[int, tuple[str, int]] = {}
        touched: dict[str, _Request] = {}
        for row, seq_index in enumerate(result.seq_indices):
            seq = batch.seqs[seq_index]
            token = result.tokens[row]
            seq.token_ids.append(token)
            self.generated_tokens += 1
            if seq.first_token_time is None:
                seq.first_token_time = now
            if result.logprobs is not None and seq.params.logprobs is not None:
                top = result.top_logprobs[row][: seq.params.logprobs] if result.top_logprobs else []
                entry = {"token_id": token, "logprob": result.logprobs[row], "top": top}
                if seq.detokenizer is not None:  # where its text starts, from the one decode
                    entry["text_offset"] = seq.detokenizer.decoded_length
                seq.logprobs.append(entry)
            text = self._check_stop(seq, token)
            deltas[seq.seq_id] = (text, 1)
            touched[seq.request_id] = self.requests[seq.request_id]
        outputs = []
        for request in touched.values():
            finished = all(seq.is_finished for seq in request.seqs)
            outputs.append(self._output(request, deltas, finished))
            if finished:
                del self.requests[request.request_id]
        return outputs

    def _check_stop(self, seq: Sequence, token: int) -> str:
        """Detokenize the new token, apply the stop rules; returns the text this step adds."""
        params = seq.params
        text = ""
        if seq.detokenizer is not None:
            step = seq.detokenizer.add(token)
            text = step.new_text
            if step.stopped:
                seq.finish_reason, seq.stop_reason = "stop", step.stop_reason
        elif token in params.stop_token_ids or (
            token in self.end_token_ids and not params.ignore_eos
        ):
            seq.finish_reason, seq.stop_reason = "stop", token
        if seq.finish_reason is None and (
            seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len
        ):
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            if seq.detokenizer is not None and not isinstance(seq.stop_reason, str):
                text += (
                    seq.detokenizer.flush()
                )  # held-back text is final unless a stop string cut it
            self.scheduler.finish(seq)
        return text

    def _output(
        self, request: _Request, deltas: dict[int, tuple[str, int]], finished: bool
    ) -> RequestOutput:
        outputs = []
        for seq in request.seqs:
            delta_text, delta_count = deltas.get(seq.seq_id, ("", 0))
            output_ids = seq.output_ids
            # The whole text only once finished (streams read delta_text): joining it every
            # step would make a long output quadratic.
            text = ""
            if seq.is_finished and seq.detokenizer is not None:
                text = seq.detokenizer.text
            elif seq.is_finished:
                text = delta_text = self._final_text(seq)
            outputs.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=output_ids,
                    delta_text=delta_text,
                    delta_token_ids=output_ids[len(output_ids) - delta_count :],
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    logprobs=seq.logprobs if seq.params.logprobs is not None else None,
                )
            )
        first = [s.first_token_time for s in request.seqs if s.first_token_time is not None]
        head = request.seqs[0]
        prompt_logprobs = None
        # In the first output (they are complete once a token exists) and the last one only:
        # copying them into every step's output would make a long output quadratic.
        if head.params.prompt_logprobs is not None and (
            finished or not request.prompt_logprobs_sent
        ):
            prompt_logprobs = [None, *head.prompt_logprobs]
            request.prompt_logprobs_sent = True
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_ids,
            outputs=outputs,
            finished=finished,
            num_cached_tokens=request.seqs[0].num_cached_tokens,
            arrival_time=request.seqs[0].arrival_time,
            first_token_time=min(first) if first else None,
            finished_time=time.monotonic() if finished else None,
            prompt_logprobs=prompt_logprobs,
        )

    def _final_text(self, seq: Sequence) -> str:
        ids = seq.output_ids
        if seq.finish_reason == "stop" and isinstance(seq.stop_reason, int):
            ids = ids[:-1]  # the stop token's text is not part of the answer
        return self.tokenizer.decode(ids, skip_special_tokens=seq.params.skip_special_tokens)

    def stats(self) -> EngineStats:
        prefix = self.blocks.stats
        return EngineStats(
            waiting=len(self.scheduler.waiting),
            running=len(self.scheduler.running),
            used_blocks=self.blocks.num_used_blocks,
            free_blocks=self.blocks.num_free_blocks,
            num_blocks=self.blocks.num_blocks - 1,
            prefix_queried_tokens=prefix.queried_tokens,
            prefix_hit_tokens=prefix.hit_tokens,
            prefix_hit_rate=prefix.hit_rate,
            preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens,
            generated_tokens=self.generated_tokens,
        )
