"""`tunefleet generate` and `tunefleet feedback`."""

from __future__ import annotations

import sys
from typing import Any

import click

from tunefleet.cli.output import (
    calls,
    client,
    console,
    enum_name,
    errors,
    handles_errors,
    output_option,
    print_json,
)
from tunefleet.v1 import inference_pb2


@click.command()
@click.argument("prompt", required=False)
@click.option("--adapter", default="", help="adapters/{a}@{alias} or adapters/{a}/versions/{n}.")
@click.option("--chat", is_flag=True, help="Send PROMPT as a user turn through the chat template.")
@click.option("--system", default="", help="With --chat: a system message.")
@click.option("--max-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--seed", type=int)
@output_option
@handles_errors
@calls("InferenceService.Generate", "InferenceService.StreamGenerate")
def generate(
    prompt: str | None,
    adapter: str,
    chat: bool,
    system: str,
    max_tokens: int,
    temperature: float,
    top_p: float,
    stop: tuple[str, ...],
    seed: int | None,
    output: str,
) -> None:
    """Generate a completion of PROMPT (read from stdin when omitted), streamed to the terminal.

    The response id, printed last (on stderr), is what `tunefleet feedback` rates.
    """
    text = prompt if prompt is not None else sys.stdin.read()
    if not text.strip():
        raise click.UsageError("give a PROMPT (or pipe it on stdin)")
    messages = None
    if chat:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": text})
    sampling: dict[str, Any] = {
        "adapter": adapter,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "stop": stop,
        "seed": seed,
    }
    with client() as tunefleet:
        if output == "json":
            response = tunefleet.inference.generate(
                None if chat else text, messages=messages, **sampling
            )
            print_json(response)
            return
        last = None
        for piece in tunefleet.inference.generate_stream(
            None if chat else text, messages=messages, **sampling
        ):
            click.echo(piece.text_delta, nl=False)
            sys.stdout.flush()
            last = piece
    click.echo()
    if last is not None:
        reason = enum_name(inference_pb2.FinishReason, last.finish_reason, "FINISH_REASON_")
        errors.print(
            f"[{last.adapter_version or 'base model'}; {last.usage.completion_tokens} tokens, "
            f"{reason.lower()}; response {last.response_id}]",
            markup=False,
        )


@click.command()
@click.argument("response_id")
@click.option("--rating", type=click.FloatRange(-1, 1), required=True, help="-1 (bad) to 1 (good).")
@click.option("--corrected-text", default="", help="What the answer should have been.")
@click.option("--comment", default="")
@output_option
@handles_errors
@calls("InferenceService.CreateFeedback")
def feedback(
    response_id: str, rating: float, corrected_text: str, comment: str, output: str
) -> None:
    """Rate a response (by the id `tunefleet generate` printed); feeds retraining."""
    with client() as tunefleet:
        recorded = tunefleet.inference.feedback(
            response_id, rating=rating, corrected_text=corrected_text, comment=comment
        )
    if output == "json":
        print_json(recorded)
        return
    console.print(
        f"recorded {recorded.name}: rating {recorded.rating:+g} for "
        f"{recorded.adapter_version or 'the base model'}",
        markup=False,
    )
