"""`tunefleet served ...` (what an InferenceService has loaded) and `tunefleet score`."""

from __future__ import annotations

import click

from tunefleet.cli.output import (
    calls,
    client,
    console,
    enum_name,
    handles_errors,
    listing,
    output_option,
    print_json,
    when,
)
from tunefleet.v1 import common_pb2, inference_pb2


@click.group()
def served() -> None:
    """Adapter versions loaded in the InferenceService the target reaches (one replica)."""


@served.command("list")
@output_option
@handles_errors
@calls("InferenceService.ListServedAdapters")
def list_served(output: str) -> None:
    """List the loaded versions, their state, engine and the aliases routed to them."""
    with client() as tunefleet:
        items = list(tunefleet.inference.served())
    listing(
        items,
        output,
        ["VERSION", "STATE", "ENGINE", "ALIASES", "PINNED", "LOADED"],
        lambda s: (
            s.adapter_version,
            enum_name(inference_pb2.ServedAdapter.State, s.state, "STATE_"),
            enum_name(common_pb2.ServingEngine, s.engine, "SERVING_ENGINE_"),
            ", ".join(s.routed_aliases) or "-",
            "yes" if s.pinned else "-",
            when(s.load_time),
        ),
    )


@served.command()
@click.argument("adapter")
@click.option("--pin", is_flag=True, help="Keep it loaded whatever the cache's size.")
@output_option
@handles_errors
@calls("InferenceService.LoadAdapter")
def load(adapter: str, pin: bool, output: str) -> None:
    """Load ADAPTER (a version, or adapters/{a}@{alias}) before a request needs it."""
    with client() as tunefleet:
        loaded = tunefleet.inference.load(adapter, pin=pin)
    report(loaded, output)


@served.command()
@click.argument("adapter")
@output_option
@handles_errors
@calls("InferenceService.UnloadAdapter")
def unload(adapter: str, output: str) -> None:
    """Unload a version from this server (it is loaded again when a request needs it)."""
    with client() as tunefleet:
        unloaded = tunefleet.inference.unload(adapter)
    report(unloaded, output)


def report(found: inference_pb2.ServedAdapter, output: str) -> None:
    if output == "json":
        print_json(found)
        return
    state = enum_name(inference_pb2.ServedAdapter.State, found.state, "STATE_")
    console.print(f"{found.adapter_version}: {state}", markup=False)


@click.command()
@click.argument("prompt")
@click.argument("completion")
@click.option("--adapter", default="", help="adapters/{a}@{alias} or adapters/{a}/versions/{n}.")
@click.option("--top-logprobs", type=click.IntRange(0, 20), default=0, show_default=True)
@output_option
@handles_errors
@calls("InferenceService.ScoreCompletion")
def score(prompt: str, completion: str, adapter: str, top_logprobs: int, output: str) -> None:
    """The log-probability of each token of COMPLETION after PROMPT, and their sum."""
    with client() as tunefleet:
        scored = tunefleet.inference.score(
            prompt, completion=completion, adapter=adapter, top_logprobs=top_logprobs
        )
    if output == "json":
        print_json(scored)
        return
    for token in scored.tokens:
        others = ", ".join(f"{t.text!r} {t.logprob:.3f}" for t in token.top_logprobs)
        console.print(
            f"{token.text!r:>16} {token.logprob:9.4f}" + (f"   ({others})" if others else ""),
            markup=False,
        )
    total = sum(scored.token_logprobs)
    console.print(
        f"{'total':>16} {total:9.4f}  [{scored.adapter_version or 'base model'}]", markup=False
    )
