"""The lm-eval model wrapper ``EfficientLM`` (a ``TemplateLM``) for any causal LM returning
``.logits``: scoring with shared prefixes, rolling log-likelihoods, greedy generation.

``efficientllm.evaluation.harness`` registers it as ``efficientllm`` and runs tasks with it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from efficientllm.errors import ConfigError, DataError
from efficientllm.evaluation.deps import TemplateLM, int_batch_size, require_lm_eval, resolve_dtype

log = logging.getLogger(__name__)


class EfficientLM(TemplateLM):
    """lm-eval model over an in-memory causal LM or a model folder / hub id.

    Scoring: requests are sorted by length (longest first), right-padded and scored in batches
    of ``batch_size`` with one forward pass each (no KV cache); with right padding a causal model
    never attends to the pads, so results do not depend on the batch. Inputs longer than
    ``max_length`` (default: ``config.max_position_embeddings``) are cut on the left. With
    ``share_prefix`` (default) the choices of one question share one pass over their context
    (KV cache), which is 2-3x less work on multiple-choice tasks; log-probabilities are in float32.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        batch_size: int | str | None = 8,
        max_length: int | str | None = None,
        device: str | None = None,
        dtype: Any = None,
        add_bos_token: bool | None = None,
        share_prefix: bool = True,
        max_batch_size: int | None = None,
        trust_remote_code: bool | str | None = None,
        **unused: Any,
    ) -> None:
        require_lm_eval()
        super().__init__()
        if str(trust_remote_code).lower() == "true":
            raise ConfigError("trust_remote_code is never enabled; our loaders run no remote code")
        if unused:
            log.warning("EfficientLM ignores unknown arguments: %s", ", ".join(sorted(unused)))
        if (pretrained is None) == (model is None):
            raise ConfigError("give either pretrained=<folder or hub id> or model=<a loaded model>")
        if pretrained is not None:
            from efficientllm.model_io import load_model, load_tokenizer

            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model = load_model(pretrained, dtype=resolve_dtype(dtype), device=device)
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(pretrained)
        elif device is not None:
            model = model.to(device)
        if tokenizer is None:
            raise ConfigError("EfficientLM(model=...) needs its tokenizer: pass tokenizer=...")
        self.model: Any = model
        self.tokenizer: Any = tokenizer
        self._device = next(model.parameters()).device
        self.batch_size = int_batch_size(batch_size)
        cfg_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self._max_length: Any = int(max_length) if max_length is not None else cfg_len
        if not self._max_length or self._max_length < 2:
            raise ConfigError(
                "the model config has no max_position_embeddings; pass max_length=<tokens>"
            )
        self.add_bos_token = add_bos_token
        self.share_prefix = str(share_prefix).lower() not in ("false", "0", "no")
        if tokenizer.eos_token_id is None and tokenizer.bos_token_id is None:
            raise ConfigError("the tokenizer has neither an EOS nor a BOS token to condition on")
        self.pretrained = pretrained

    # ---- what lm-eval asks of a TemplateLM ---------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self.tokenizer.bos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of ``string``; by default the tokenizer's own special-token setting (as
        lm-eval's ``hf`` model does), never a second BOS when the text already starts with one."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            kw = {"add_special_tokens": False} if bos and string.startswith(bos) else {}
        else:
            kw = {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def get_model_info(self) -> dict[str, Any]:
        return {
            "model_class": type(self.model).__name__,
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(next(self.model.parameters()).dtype),
            "max_length": self.max_length,
        }

    # ---- scoring --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def _pad(self, rows: list[list[int]]) -> torch.Tensor:
        """Right-padded ``[len(rows), longest]`` ids (a causal model never looks at the pads)."""
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else self.eot_token_id
        ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids.to(self._device)

    @staticmethod
    def _score(logits: torch.Tensor, target: list[int]) -> tuple[float, bool]:
        """(sum of log p(target), every target token is the argmax) from ``[len(target), V]``
        logits, in float32."""
        logp = F.log_softmax(logits.float(), dim=-1)
        tgt = torch.tensor(target, dtype=torch.long, device=logp.device)
        return float(logp.gather(-1, tgt[:, None]).sum()), bool((logp.argmax(-1) == tgt).all())

    def _score_batched(
        self, chunk: list[int], prepared: list[tuple[list[int], list[int]]]
    ) -> list[tuple[float, bool]]:
        """One forward over right-padded ``context + continuation[:-1]`` rows; logits are
        kept only from the first scored position of the batch on."""
        width = max(len(prepared[i][0]) for i in chunk)
        first = min(len(prepared[i][0]) - len(prepared[i][1]) for i in chunk)
        ids = self._pad([prepared[i][0] for i in chunk])
        logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=width - first).logits
        scores = []
        for row, i in enumerate(chunk):
            inp, target = prepared[i]
            end = len(inp) - first
            scores.append(self._score(logits[row, end - len(target) : end], target))
        return scores

    def _score_shared(self, ctx: list[int], conts: list[list[int]]) -> list[tuple[float, bool]]:
        """Continuations of one context: the context once (KV cache), then all continuations
        in one batch on top of it; the same numbers as ``_score_batched`` up to rounding."""
        res = self.model(input_ids=self._pad([ctx]), use_cache=True, logits_to_keep=1)
        first = res.logits[0, -1:]  # predicts every continuation's first token
        rest = [c[:-1] for c in conts]
        if not any(rest):
            return [self._score(first, c) for c in conts]
        cache = res.cache
        cache.batch_repeat_interleave(len(conts))
        logits = self.model(input_ids=self._pad(rest), cache=cache, use_cache=True).logits
        return [
            self._score(torch.cat([first, logits[row, : len(c) - 1]]), c)
            for row, c in enumerate(conts)
        ]

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is the greedy choice) per
        ``(key, context_ids, continuation_ids)`` request, in the order given.

        Requests that share their context (the choices of a multiple-choice question) score the
        context once when ``share_prefix`` is on and everything fits in ``max_length``; the
        rest go longest first in right-padded batches of ``batch_size``.
        """
        from tqdm import tqdm

        prepared = []  # (model input = left-truncated context + continuation[:-1], targets)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                raise DataError("an lm-eval request has an empty continuation; nothing to score")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1) :]
            inp = whole[:-1]
            n = min(len(cont), len(inp))
            if n < len(cont):
                log.warning(
                    "continuation of %d tokens is longer than max_length %d: scoring its last %d",
                    len(cont),
                    self.max_length,
                    n,
                )
            prepared.append((inp, list(cont)[-n:]))
            fits = ctx and len(ctx) + len(cont) - 1 <= self.max_length
            if self.share_prefix and fits:
                groups.setdefault(tuple(ctx), []).append(i)
        bs = override_bs or self.batch_size
        out: list[tuple[float, bool] | None] = [None] * len(prepared)
        shared = [
            (ctx, idx[s : s + bs])
            for ctx, idx in groups.items()
            if len(idx) > 1
            for s in range(0, len(idx), bs)
        ]
        in_shared = {i for _, chunk in shared for i in chunk}
        rest = sorted(
            (i for i in range(len(prepared)) if i not in in_shared),
            key=lambda i: (-len(prepared[i][0]), i),
        )
        bar = tqdm(
            total=len(prepared),
            desc="Running loglikelihood requests",
            disable=True if disable_tqdm else None,
        )
        with self._eval_mode():
            for ctx, chunk in shared:  # type: ignore[assignment]
                conts = [list(requests[i][2]) for i in chunk]
                for i, score in zip(chunk, self._score_shared(list(ctx), conts), strict=True):
                    out[i] = score
                bar.update(len(chunk))
            for start in range(0, len(rest), bs):
                chunk = rest[start : start + bs]
                for i, score in zip(chunk, self._score_batched(chunk, prepared), strict=True):
                    out[i] = score
                bar.update(len(chunk))
        bar.close()
        for (key, _, _), score in zip(requests, out, strict=True):  # type: ignore[assignment]
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, score)
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of ``max_length`` (each token scored
        once, the first one conditioned on ``prefix_token_id``)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for r, req in enumerate(requests):
            (string,) = req.args
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)  # type: ignore[arg-type]
        totals = [0.0] * len(requests)
        for r, (s, _) in zip(owner, scores, strict=True):
            totals[r] += s
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding (no KV cache) until a stop string, EOS or ``max_gen_toks`` tokens."""
        from tqdm import tqdm

        results = []
        with self._eval_mode():
            for req in tqdm(requests, desc="Generating", disable=True if disable_tqdm else None):
                context, gen_kwargs = req.args
                gen_kwargs = dict(gen_kwargs or {})
                until = gen_kwargs.pop("until", None)
                until = [until] if isinstance(until, str) else list(until or [])
                eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
                if eos_text and eos_text not in until:
                    until.append(eos_text)
                max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
                if gen_kwargs.get("do_sample"):
                    log.warning("generate_until: sampling is not supported; decoding greedily")
                keep = max(self.max_length - max_new, 1)
                ids = self.tok_encode(context, left_truncate_len=keep) or [self.prefix_token_id]
                new: list[int] = []
                text = ""
                for _ in range(max_new):
                    inp = self._pad([(ids + new)[-self.max_length :]])
                    logits = self.model(input_ids=inp, use_cache=False, logits_to_keep=1).logits
                    nxt = int(logits[0, -1].argmax())
                    if nxt == self.eot_token_id:
                        break
                    new.append(nxt)
                    text = self.tok_decode(new)
                    if any(stop and stop in text for stop in until):
                        break
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
        return results
