"""The PEFT engine: transformers + PEFT on CPU or GPU, many adapters on one base model.

Requests wait up to `batch_window` seconds to be batched with others (at most `max_batch`).
A batch mixes adapters and the base model row by row. PEFT loads and holds the adapters, but
its own mixed-batch forward (`adapter_names`) loops over the adapters of a batch in every layer;
instead, each adapted layer gets its adapters' weights stacked (rank padded with zeros, scaling
folded in, slot 0 all zeros for the base model) and one gathered batched matmul per layer adds
every row's LoRA delta, the way Punica and S-LoRA do (`_Stacks`). DoRA adapters cannot be
mixed, so each is batched only with requests for itself, through PEFT. A batch is decoded with
the KV cache, left-padded, each row with its own sampling, stop strings and token limit, and
every row streams its text as it is produced. All model work (loading, unloading, decoding)
runs on one thread, one batch at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from tunefleet.inference.engine import (
    AdapterFiles,
    Finish,
    GenerationRequest,
    Output,
    TextStream,
)
from tunefleet.runtime.tasks import cancel

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    request: GenerationRequest
    outputs: asyncio.Queue[Output | BaseException]
    loop: asyncio.AbstractEventLoop
    cancelled: bool = False

    def put(self, item: Output | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)


@dataclass
class _Row:
    pending: _Pending
    stream: TextStream
    generator: Any
    tokens: int = 0
    done: bool = False
    unsent: list[int] = field(default_factory=list)  # token ids since the last piece sent

    def send(self, text: str, finish: Finish | None = None) -> None:
        self.pending.put(Output(text, tuple(self.unsent), finish, self.tokens))
        self.unsent = []


class _Stacks:
    """Every non-DoRA adapter's LoRA weights, stacked per adapted layer, and forward hooks on the
    layers' base modules that add each row's delta while `rows` (adapter slot per row) is set."""

    def __init__(self, model: Any, adapters: list[str]) -> None:
        import torch
        from peft.tuners.lora import Linear as LoraLinear

        self.slots = {name: index + 1 for index, name in enumerate(adapters)}
        self.rows: Any = None
        self._hooks: list[Any] = []
        for module in model.modules():
            if not isinstance(module, LoraLinear):
                continue
            module = cast(Any, module)
            present = [name for name in adapters if name in module.lora_A]
            if not present:
                continue
            rank = max(module.r[name] for name in present)
            weight: Any = module.base_layer.weight
            a = torch.zeros(len(adapters) + 1, rank, weight.shape[1], dtype=weight.dtype)
            b = torch.zeros(len(adapters) + 1, weight.shape[0], rank, dtype=weight.dtype)
            for name in present:
                r, slot = module.r[name], self.slots[name]
                a[slot, :r] = module.lora_A[name].weight.detach()
                b[slot, :, :r] = module.lora_B[name].weight.detach() * module.scaling[name]
            a, b = a.to(weight.device), b.to(weight.device)
            self._hooks.append(module.base_layer.register_forward_hook(self._hook(a, b)))

    def _hook(self, a: Any, b: Any) -> Any:
        import torch

        def add_delta(module: Any, inputs: Any, output: Any) -> Any:
            if self.rows is None:
                return output
            x = inputs[0]
            down = torch.einsum("bsi,bri->bsr", x, a[self.rows])
            return output + torch.einsum("bsr,bor->bso", down, b[self.rows])

        return add_delta

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


@dataclass
class PeftEngine:
    model_dir: Path
    device: str = "cpu"
    dtype: str = "float32"
    batch_window: float = 0.005
    max_batch: int = 16
    name: str = "peft"
    model: Any = None
    tokenizer: Any = None
    _dora: set[str] = field(default_factory=set)
    _stacks: _Stacks | None = None
    _queue: asyncio.Queue[_Pending] | None = None
    _task: asyncio.Task[None] | None = None
    _executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="peft-engine")
    )

    async def start(self) -> None:
        await self._run(self._load_base)
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._batches(), name="peft-batches")

    def _load_base(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(
            str(self.model_dir), dtype=getattr(torch, self.dtype)
        ).to(torch.device(self.device))  # type: ignore[arg-type]
        self.model.eval()

    async def close(self) -> None:
        if self._task is not None:
            await cancel(self._task)
        self._executor.shutdown(wait=True)

    async def _run(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    # --- adapters ------------------------------------------------------------------------------

    def refusal(self, config: dict[str, Any]) -> str | None:
        if config.get("peft_type", "LORA") != "LORA":
            return f"the PEFT engine serves LoRA adapters, not {config.get('peft_type')}"
        return None

    async def load_adapter(self, adapter: AdapterFiles) -> None:
        await self._run(self._load_adapter, adapter)

    def _load_adapter(self, adapter: AdapterFiles) -> None:
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(adapter.path), adapter_name=adapter.serving_name)
        else:
            self.model = PeftModel.from_pretrained(
                self.model, str(adapter.path), adapter_name=adapter.serving_name
            )
        self.model.eval()
        if adapter.config.get("use_dora"):
            self._dora.add(adapter.serving_name)
        self._restack()

    def _restack(self) -> None:
        """Stack the weights of the adapters now loaded (after each load and unload)."""
        from peft import PeftModel

        if self._stacks is not None:
            self._stacks.remove()
            self._stacks = None
        if isinstance(self.model, PeftModel):
            names = [n for n in self.model.peft_config if n not in self._dora]
            if names:
                self._stacks = _Stacks(self.model, names)

    async def unload_adapter(self, serving_name: str) -> None:
        await self._run(self._unload_adapter, serving_name)

    def _unload_adapter(self, serving_name: str) -> None:
        from peft import PeftModel

        if not isinstance(self.model, PeftModel) or serving_name not in self.model.peft_config:
            return
        if len(self.model.peft_config) == 1:
            # PEFT cannot delete its last adapter cleanly: take the LoRA layers out instead.
            self.model = self.model.unload()
        else:
            if serving_name in self.model.active_adapters:
                other = next(n for n in self.model.peft_config if n != serving_name)
                self.model.set_adapter(other)
            self.model.delete_adapter(serving_name)
        self._dora.discard(serving_name)
        self._restack()

    # --- generation ----------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Output]:
        assert self._queue is not None, "start() the engine first"
        pending = _Pending(request, asyncio.Queue(), asyncio.get_running_loop())
        await self._queue.put(pending)
        try:
            while True:
                item = await pending.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish is not None:
                    return
        finally:
            pending.cancelled = True  # a client that went away frees its row

    async def _batches(self) -> None:
        assert self._queue is not None
        while True:
            waiting = [await self._queue.get()]
            deadline = asyncio.get_running_loop().time() + self.batch_window
            while len(waiting) < self.max_batch:
                timeout = deadline - asyncio.get_running_loop().time()
                try:
                    async with asyncio.timeout(max(timeout, 0)):
                        waiting.append(await self._queue.get())
                except TimeoutError:
                    break
            for group in self._groups(waiting):
                try:
                    await self._run(self._decode, group)
                except Exception as error:
                    log.exception("decoding a batch failed")
                    for pending in group:
                        pending.put(error)

    def _groups(self, waiting: list[_Pending]) -> list[list[_Pending]]:
        """Mixed batches, except that each DoRA adapter gets a batch of its own."""
        mixed = [p for p in waiting if p.request.adapter not in self._dora]
        groups = [mixed] if mixed else []
        for name in sorted({p.request.adapter or "" for p in waiting} & self._dora):
            groups.append([p for p in waiting if p.request.adapter == name])
        return groups

    def _decode(self, group: list[_Pending]) -> None:
        import torch
        from peft import PeftModel

        model, pad = self.model, self.tokenizer.pad_token_id
        pad = pad if pad is not None else self.tokenizer.eos_token_id
        eos = self.tokenizer.eos_token_id
        device = torch.device(self.device)
        rows = []
        for pending in group:
            sampling = pending.request.sampling
            generator = None
            if sampling.temperature > 0:
                generator = torch.Generator(device=device)
                if sampling.seed is not None:
                    generator.manual_seed(sampling.seed)
                else:
                    generator.seed()
            rows.append(_Row(pending, TextStream(self.tokenizer, sampling.stop), generator))
        width = max(len(p.request.prompt_ids) for p in group)
        input_ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, pending in enumerate(group):
            ids = pending.request.prompt_ids
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            mask[i, width - len(ids) :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        stacks, adapters_off = self._stacks, cast(Any, contextlib.nullcontext())
        names = [p.request.adapter for p in group]
        if isinstance(model, PeftModel) and names[0] in self._dora:
            model.set_adapter(names[0])  # a DoRA batch: one adapter, through PEFT
            stacks = None
        elif isinstance(model, PeftModel):
            # PEFT's own adapters off; the stacked weights add each row's delta instead.
            adapters_off = model.disable_adapter()
            if stacks is not None:
                slots = [stacks.slots.get(n or "", 0) for n in names]
                stacks.rows = torch.tensor(slots, device=device)
        past = None
        with torch.inference_mode(), adapters_off:
            for _ in range(max(p.request.sampling.max_tokens for p in group)):
                out = model(
                    input_ids=input_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=past,
                    use_cache=True,
                )
                past = out.past_key_values
                logits = out.logits[:, -1, :].float()
                chosen = []
                for i, row in enumerate(rows):
                    token = self._choose(logits[i], row) if not row.done else pad
                    chosen.append(token)
                    if not row.done:
                        self._emit(row, token, eos)
                if all(row.done for row in rows):
                    break
                input_ids = torch.tensor(chosen, device=device)[:, None]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                positions = positions[:, -1:] + 1
        if stacks is not None:
            stacks.rows = None

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

    def _emit(self, row: _Row, token: int, eos: int | None) -> None:
        pending, sampling = row.pending, row.pending.request.sampling
        if pending.cancelled:
            row.done = True
            return
        if token == eos:
            row.done = True
            row.send(row.stream.flush(), Finish.STOP)
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
