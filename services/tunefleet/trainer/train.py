"""The training loop: warmup then cosine/linear decay, gradient accumulation weighted by tokens
(by pairs for DPO), clipping, periodic evaluation with early stopping, checkpoints and resume,
evaluation against the base model at the end, and the output (adapter or full model) with a
result file. The objective is SFT's cross-entropy or DPO's (`preference.py`)."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tunefleet.core import graders
from tunefleet.core.chat import render
from tunefleet.trainer import checkpoint, outcome, sharding
from tunefleet.trainer.data import (
    IGNORE,
    Batch,
    Conversation,
    Encoded,
    batches,
    encode,
    load_conversations,
)
from tunefleet.trainer.distributed import Distributed
from tunefleet.trainer.model import adapters_disabled, load_model
from tunefleet.trainer.preference import (
    EncodedPairs,
    dpo_loss,
    encode_pairs,
    evaluate_pairs,
    load_pairs,
    pair_batches,
)
from tunefleet.trainer.report import Cancelled, Reporter
from tunefleet.trainer.spec import DataSpec, SpecError, TrainerSpec
from tunefleet.trainer.storage import download_checkpoint, fetch, open_store, upload_checkpoint


def batch_loss(model: Any, batch: Batch) -> Any:
    """Summed cross-entropy over the batch's trainable tokens."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    input_ids = torch.tensor(batch.input_ids, device=device)
    labels = torch.tensor(batch.labels, device=device)
    position_ids = torch.tensor(batch.position_ids, device=device)
    if batch.segments is not None:
        # Packed rows: causal attention within each example only.
        segments = torch.tensor(batch.segments, device=device)
        same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, :, None] > 0)
        causal = torch.tril(
            torch.ones(same.shape[-1], same.shape[-1], dtype=torch.bool, device=device)
        )
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        dtype = dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        mask = torch.zeros(same.shape, dtype=dtype, device=device)
        mask = mask.masked_fill(~(same & causal), torch.finfo(dtype).min)[:, None]
    else:
        mask = torch.tensor(batch.attention_mask, device=device)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).logits
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


def evaluate_loss(model: Any, eval_batches: list[Batch]) -> float:
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches:
            total += float(batch_loss(model, batch))
            count += batch.trainable
    model.train(was_training)
    return total / max(count, 1)


def task_metrics(
    model: Any,
    tokenizer: Any,
    conversations: list[Conversation],
    metrics: Sequence[str],
    max_new_tokens: int,
    synced: bool = False,
) -> dict[str, float]:
    """Greedy answers to held-out conversations (all turns but the last assistant one), scored by
    EvaluationService's graders of the same names (one implementation). `synced`: every process
    of a sharded model generates in step (each pass is collective)."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    scorers = {name: graders.grader(name) for name in metrics}
    totals = dict.fromkeys(metrics, 0.0)
    for conversation in conversations:
        messages = conversation.messages
        prompt = render(tokenizer, messages[:-1], generation_prompt=True, tools=conversation.tools)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                synced_gpus=synced,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        item = graders.Item(id="", reference=messages[-1]["content"])
        for name, grader in scorers.items():
            totals[name] += grader.score(answer, item)
    return {name: total / max(len(conversations), 1) for name, total in totals.items()}


def _schedule(spec: TrainerSpec, total_steps: int) -> Any:
    warmup = math.floor(total_steps * spec.hyperparameters.warmup_ratio)
    kind = spec.hyperparameters.lr_scheduler

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if kind == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return factor


class Trainer:
    def __init__(self, spec: TrainerSpec) -> None:
        self.spec = spec
        self.dist = Distributed.from_environment()
        progress = spec.output_dir / "progress.jsonl" if self.dist.main else None
        self.reporter = Reporter(progress, spec.report)
        self.store = open_store(spec.storage, spec.output_dir) if spec.storage else None
        self.holder = sharding.for_run(self.dist, spec.fsdp)

    @property
    def dpo(self) -> bool:
        return self.spec.objective == "dpo"

    def prepare_data(
        self, tokenizer: Any
    ) -> tuple[Encoded | EncodedPairs, Encoded | EncodedPairs, list[Conversation]]:
        """Tokenised training and validation data (conversations, or pairs for DPO), and the
        held-out conversations of task metrics; refuses data that cannot train."""
        spec = self.spec
        hp = spec.hyperparameters
        inputs = spec.output_dir / "inputs"
        train_path = fetch(spec.train_data.uri, self.store, inputs)
        if spec.validation_data is None:
            validation_spec, validation_path = (
                DataSpec(uri=spec.train_data.uri, split="validation"),
                train_path,
            )
        else:
            validation_spec = spec.validation_data
            validation_path = fetch(spec.validation_data.uri, self.store, inputs)
        if self.dpo:
            train_pairs = load_pairs(spec.train_data, train_path)
            validation_pairs = load_pairs(validation_spec, validation_path)
            size = len(train_pairs)
            encoded: Encoded | EncodedPairs = encode_pairs(
                tokenizer, train_pairs, hp.max_sequence_length
            )
            held = [p.conversation(p.chosen) for p in validation_pairs]
            validation: Encoded | EncodedPairs = encode_pairs(
                tokenizer, validation_pairs, hp.max_sequence_length
            )
        else:
            train = load_conversations(spec.train_data, train_path)
            size = len(train)
            encoded = encode(tokenizer, train, hp.max_sequence_length)
            held = load_conversations(validation_spec, validation_path)
            validation = encode(tokenizer, held, hp.max_sequence_length)
        if not size:
            raise SpecError(
                f"train_data: no {spec.train_data.split} records in {spec.train_data.uri}"
            )
        if not encoded.examples:
            raise SpecError(
                f"train_data: all {size} examples lose every assistant token at "
                f"max_sequence_length {hp.max_sequence_length}"
            )
        held_out = held[: spec.evaluation.examples] if spec.evaluation.examples else []
        return encoded, validation, held_out

    def _batches(
        self, encoded: Encoded | EncodedPairs, pad_id: int, epoch: int, packing: bool
    ) -> list[Batch]:
        hp = self.spec.hyperparameters
        if isinstance(encoded, EncodedPairs):
            return pair_batches(encoded.examples, hp.micro_batch_size, pad_id, hp.seed, epoch)
        length = hp.max_sequence_length
        return batches(
            encoded.examples, hp.micro_batch_size, pad_id, packing, length, hp.seed, epoch
        )

    def _loss(self, model: Any, batch: Batch) -> Any:
        """The summed loss of a batch: over its trainable tokens, or its pairs for DPO."""
        if self.dpo:
            return dpo_loss(model, batch, self.spec.dpo.beta)
        return batch_loss(model, batch)

    def _evaluate(self, model: Any, eval_batches: list[Batch]) -> dict[str, float]:
        """validation_loss, and for DPO reward_accuracy and reward_margin."""
        if self.dpo:
            return evaluate_pairs(model, eval_batches, self.spec.dpo.beta)
        return {"validation_loss": evaluate_loss(model, eval_batches)}

    def run(self) -> dict[str, Any]:
        import torch
        from transformers import AutoTokenizer

        spec, hp = self.spec, self.spec.hyperparameters
        tokenizer = AutoTokenizer.from_pretrained(str(spec.model_dir))
        pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        train, validation, held_out = self.prepare_data(tokenizer)
        random.seed(hp.seed)
        np.random.seed(hp.seed % 2**32)
        torch.manual_seed(hp.seed)
        dist, holder = self.dist, self.holder
        # A sharded model is loaded on the CPU: fully_shard moves each process's shard to its GPU.
        model = holder.prepare(load_model(spec, "cpu" if holder.sharded else dist.device))
        model.train()
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            parameters, lr=spec.learning_rate, weight_decay=hp.weight_decay
        )

        def epoch_batches(epoch: int) -> list[Batch]:
            return dist.shard(self._batches(train, pad_id, epoch, hp.packing))

        steps_per_epoch = math.ceil(len(epoch_batches(0)) / hp.gradient_accumulation_steps)
        total_steps = math.ceil(hp.epochs * steps_per_epoch)
        if hp.max_steps:
            total_steps = min(total_steps, hp.max_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(spec, total_steps))
        eval_batches = self._batches(validation, pad_id, 0, packing=False)
        eval_every = hp.eval_every_steps or steps_per_epoch
        checkpoint_every = hp.checkpoint_every_steps or eval_every

        resumed_from = self._resume_point()
        if resumed_from is not None:
            state = self._restore(resumed_from, model, optimizer, scheduler)
            state.setdefault("best_step", None)
            if state.get("best_step") == state["step"]:
                state["best_uri"] = spec.resume_from  # this checkpoint is the best one
            self.reporter.event("resumed", step=state["step"], checkpoint=str(resumed_from))
        else:
            state = {
                "step": 0,
                "epoch": 0,
                "position": 0,
                "best": None,
                "best_step": None,  # the step of the best evaluation, and its stored checkpoint
                "best_uri": "",
                "bad_evaluations": 0,
                "base_validation_loss": None,
                "base_task_metrics": {},
            }
            if eval_batches:
                state["base_validation_loss"] = self._base_loss(model, eval_batches)
            if held_out:
                with adapters_disabled(model):
                    state["base_task_metrics"] = task_metrics(
                        model,
                        tokenizer,
                        held_out,
                        spec.evaluation.metrics,
                        spec.evaluation.max_new_tokens,
                        holder.sharded,
                    )
                model.train()
        self.reporter.event(
            "started",
            total_steps=total_steps,
            examples=len(train.examples),
            truncated=train.truncated,
            dropped=train.dropped,
        )

        started, tokens_seen, stopped_early = time.perf_counter(), 0, False
        first_step = state["step"]
        last_scores: dict[str, float] = {}  # of the latest evaluation of the current weights
        while state["step"] < total_steps and not stopped_early:
            micro_batches = epoch_batches(state["epoch"])
            groups = [
                micro_batches[i : i + hp.gradient_accumulation_steps]
                for i in range(0, len(micro_batches), hp.gradient_accumulation_steps)
            ]
            while state["position"] < len(groups) and state["step"] < total_steps:
                group = groups[state["position"]]
                # Tokens (pairs for DPO) of every process: each counts the same.
                trainable = dist.sum(sum(b.pairs or b.trainable for b in group))
                train_loss = 0.0
                for batch in group:
                    loss = self._loss(model, batch) / max(trainable, 1)
                    loss.backward()
                    train_loss += float(loss.detach())
                if not holder.sharded:  # FSDP reduced them in the backward pass
                    dist.sum_gradients(parameters)
                train_loss = dist.sum(train_loss)
                tokens_seen += int(dist.sum(sum(b.tokens for b in group)))
                grad_norm = holder.grad_norm(parameters, hp.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                state["position"] += 1
                step = state["step"]
                evaluate_now = bool(eval_batches) and (
                    step % eval_every == 0 or step == total_steps
                )
                scores = self._evaluate(model, eval_batches) if evaluate_now else {}
                validation_loss = scores.get("validation_loss")
                elapsed = time.perf_counter() - started
                self.reporter.event(
                    "progress",
                    step=step,
                    total_steps=total_steps,
                    epoch=state["epoch"] + state["position"] / len(groups),
                    train_loss=train_loss,
                    validation_loss=validation_loss,
                    learning_rate=scheduler.get_last_lr()[0],
                    grad_norm=grad_norm,
                    tokens_per_second=tokens_seen / max(elapsed, 1e-9),
                    eta_seconds=elapsed / max(step - first_step, 1) * (total_steps - step),
                    reward_accuracy=scores.get("reward_accuracy"),
                    reward_margin=scores.get("reward_margin"),
                )
                improved = False
                if validation_loss is not None:
                    last_scores = scores
                    improved, stopped_early = self._early_stop(state, validation_loss, step)
                save = (
                    step % checkpoint_every == 0
                    or step == total_steps
                    or stopped_early
                    # With early stopping the result is the best step's: keep its weights.
                    or (improved and hp.early_stopping_patience > 0)
                )
                if save and (dist.main or holder.sharded):
                    weights, optimizer_state = holder.gather(model, optimizer)
                    if dist.main:
                        self._save_checkpoint(
                            step, weights, optimizer_state, scheduler, state, validation_loss
                        )
                cancelled = dist.any(self.reporter.cancel_requested)
                if stopped_early or cancelled:
                    break
            if state["position"] >= len(groups):
                state["epoch"] += 1
                state["position"] = 0
            if dist.any(self.reporter.cancel_requested):
                raise Cancelled("cancelled by TrainingService")
        if stopped_early:
            self.reporter.event(
                "early_stopped",
                step=state["step"],
                best=state["best"],
                best_step=state["best_step"],
            )
            if (dist.main or holder.sharded) and self._restore_best(model, state):
                last_scores = {}  # evaluated again, on the restored weights
        dist.barrier()
        if not dist.main and not holder.sharded:  # the first process evaluates and registers
            return {"steps": state["step"]}
        return self._finish(model, tokenizer, eval_batches, held_out, state, train, last_scores)

    def _early_stop(
        self, state: dict[str, Any], validation_loss: float, step: int
    ) -> tuple[bool, bool]:
        """Whether this evaluation is the best so far, and whether training should stop."""
        hp = self.spec.hyperparameters
        best = state["best"]
        if best is None or validation_loss < best - hp.early_stopping_min_delta:
            state["best"], state["best_step"], state["bad_evaluations"] = validation_loss, step, 0
            return True, False
        state["bad_evaluations"] += 1
        stop = (
            bool(hp.early_stopping_patience)
            and state["bad_evaluations"] >= hp.early_stopping_patience
        )
        return False, stop

    def _resume_point(self) -> Path | None:
        """The checkpoint to resume from, if any. With a replicated model the first process of
        every node fetches a stored one and each process reads it; with a sharded one only the
        first process reads it (and broadcasts what it read)."""
        spec, dist, sharded = self.spec, self.dist, self.holder.sharded
        reads = dist.main or not sharded
        if spec.resume_from and reads and (dist.local_main or sharded):
            assert self.store is not None  # checked with the spec
            download_checkpoint(self.store, spec.resume_from, spec.checkpoint_dir)
        dist.barrier()
        resume = spec.resume or bool(spec.resume_from)
        found = checkpoint.latest(spec.checkpoint_dir) if resume and reads else None
        return dist.broadcast(found) if sharded else found

    def _restore(self, path: Path, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
        """Load a checkpoint into the model, optimizer and scheduler; the loop's state."""
        dist, holder = self.dist, self.holder
        weights: dict[str, Any] = {}
        saved: dict[str, Any] = {}
        state: dict[str, Any] = {}
        if dist.main or not holder.sharded:
            weights, saved, state = checkpoint.read(path)
        holder.restore(model, optimizer, weights, saved.get("optimizer", {}))
        if holder.sharded:
            rest = {k: v for k, v in saved.items() if k != "optimizer"}
            saved, state = dist.broadcast((rest, state))
        checkpoint.restore_training_state(saved, scheduler)
        return state

    def _save_checkpoint(
        self,
        step: int,
        weights: dict[str, Any],
        optimizer_state: dict[str, Any],
        scheduler: Any,
        state: dict[str, Any],
        validation_loss: float | None,
    ) -> None:
        """Write, store and report a checkpoint, then delete local ones no longer kept (the
        newest `keep_checkpoints` and the best stay)."""
        spec = self.spec
        path = checkpoint.save(
            spec.checkpoint_dir, step, weights, optimizer_state, scheduler, state
        )
        stored = upload_checkpoint(self.store, path) if self.store else ""
        if state["best_step"] == step:
            state["best_uri"] = stored
        self.reporter.event(
            "checkpoint",
            step=step,
            uri=stored or path.resolve().as_uri(),
            size_bytes=sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
            validation_loss=validation_loss,
        )
        checkpoint.prune(spec.checkpoint_dir, spec.keep_checkpoints, state["best_step"])

    def _restore_best(self, model: Any, state: dict[str, Any]) -> bool:
        """Put the best evaluation's weights back in `model` (training stopped early); whether
        they were not the model's already."""
        best_step = state["best_step"]
        if best_step is None or best_step == state["step"]:
            return False
        weights: dict[str, Any] = {}
        if self.dist.main:  # the one that wrote the checkpoints
            path = checkpoint.path(self.spec.checkpoint_dir, best_step)
            if not path.exists() and state["best_uri"] and self.store is not None:
                download_checkpoint(self.store, state["best_uri"], self.spec.checkpoint_dir)
            if not path.exists():
                raise RuntimeError(f"the checkpoint of the best step {best_step} is gone")
            weights = checkpoint.read_weights(path)
        self.holder.restore(model, None, weights, {})
        self.reporter.event("restored_best", step=best_step, best=state["best"])
        return True

    def _base_loss(self, model: Any, eval_batches: list[Batch]) -> float:
        if self.dpo:
            return math.log(2)  # the base model is the reference: every reward is 0
        with adapters_disabled(model):
            return evaluate_loss(model, eval_batches)

    def _finish(
        self,
        model: Any,
        tokenizer: Any,
        eval_batches: list[Batch],
        held_out: list[Conversation],
        state: dict[str, Any],
        train: Encoded | EncodedPairs,
        last_scores: dict[str, float],
    ) -> dict[str, Any]:
        import torch

        spec = self.spec
        if not last_scores and eval_batches:
            last_scores = self._evaluate(model, eval_batches)
        validation_loss = last_scores.get("validation_loss")
        lm_loss = not self.dpo  # perplexity is of a language-modelling loss: DPO's is not one
        evaluation: dict[str, Any] = {
            "base_validation_loss": state["base_validation_loss"],
            "validation_loss": validation_loss,
            "base_perplexity": _perplexity(state["base_validation_loss"]) if lm_loss else None,
            "perplexity": _perplexity(validation_loss) if lm_loss else None,
            "reward_accuracy": last_scores.get("reward_accuracy"),
            "reward_margin": last_scores.get("reward_margin"),
            "base_task_metrics": state["base_task_metrics"],
            "task_metrics": task_metrics(
                model,
                tokenizer,
                held_out,
                spec.evaluation.metrics,
                spec.evaluation.max_new_tokens,
                self.holder.sharded,
            )
            if held_out
            else {},
        }
        if hasattr(model, "disable_adapter") and eval_batches:
            probe = eval_batches[0]
            model.eval()
            with torch.no_grad():
                adapted = float(batch_loss(model, probe))
                with adapters_disabled(model):
                    plain = float(batch_loss(model, probe))
            evaluation["adapter_changes_logits"] = adapted != plain
        else:
            evaluation["adapter_changes_logits"] = True
        # A sharded model's weights are gathered by every process; the first one saves them.
        weights = self.holder.state_dict(model)
        if not self.dist.main:
            return {"steps": state["step"]}
        output = spec.output_dir / ("model" if spec.method == "full" else "adapter")
        model.save_pretrained(str(output), safe_serialization=True, state_dict=weights)
        if spec.method == "full":
            tokenizer.save_pretrained(str(output))
        result = {
            "output_dir": str(output),
            "steps": state["step"],
            "examples": len(train.examples),
            "truncated": train.truncated,
            "dropped": train.dropped,
            "model_memory_bytes": int(model.get_memory_footprint()),
            "evaluation": evaluation,
        }
        (spec.output_dir / "result.json").write_text(json.dumps(result, indent=2))
        if spec.registry.endpoint:
            from tunefleet.trainer.register import register

            metrics = {k: v for k, v in evaluation.items() if isinstance(v, float)}
            result["adapter_version"] = register(spec, output, metrics, self.store)
            (spec.output_dir / "result.json").write_text(json.dumps(result, indent=2))
        # Where the launcher looks when the final report cannot reach TrainingService.
        outcome.record(adapter_version=result.get("adapter_version", ""))
        self.reporter.event(
            "finished",
            **{k: v for k, v in result.items() if k != "evaluation"},
            evaluation=evaluation,
        )
        return result


def _perplexity(loss: float | None) -> float | None:
    return math.exp(min(loss, 50.0)) if loss is not None else None
