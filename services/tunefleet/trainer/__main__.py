"""`python -m tunefleet.trainer --spec spec.json`: run one training job.

Exit status: 0 when the job succeeded, 2 when the spec cannot work (nothing big was loaded),
3 when TrainingService cancelled the job, 4 when the trained result could not be registered,
5 when memory ran out, 6 when a process of a multi-process run lost a peer (another process or
node went away: not its own fault), 1 when training failed otherwise.
Progress goes to OUTPUT_DIR/progress.jsonl (and to TrainingService when
the spec names an endpoint); the result to OUTPUT_DIR/result.json; the outcome (see outcome.py)
to $TUNEFLEET_RESULT_FILE.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tunefleet.trainer import outcome
from tunefleet.trainer.outcome import PEER_LOST_EXIT
from tunefleet.trainer.register import RegistrationFailed
from tunefleet.trainer.report import Cancelled
from tunefleet.trainer.spec import SpecError, load_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunefleet.trainer", description=__doc__)
    parser.add_argument("--spec", type=Path, required=True, help="the job spec (JSON)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    args = parser.parse_args(argv)
    outcome.reset()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # `import peft` imports bitsandbytes, which on CPUs with AVX512-BF16 tries to fetch an
    # inference kernel from the Hugging Face Hub and warns ("pip install kernels") in every
    # trainer log when it cannot. The trainer never uses that kernel (see model.py).
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        spec = load_spec(args.spec)
        if args.resume:
            spec = spec.model_copy(update={"resume": True})
        from tunefleet.trainer.train import Trainer

        logging.getLogger("tunefleet.trainer").info(
            "%s: %s fine-tuning of %s", spec.job or "training", spec.method, spec.base_model
        )

        trainer = Trainer(spec)
    except SpecError as error:
        outcome.record(reason="INVALID_SPEC", message=str(error))
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        trainer.run()
    except SpecError as error:
        return _failed(trainer, 2, "INVALID_SPEC", str(error))
    except Cancelled:
        logging.info("stopped: the job was cancelled")
        return 3
    except RegistrationFailed as error:
        return _failed(trainer, 4, "REGISTRATION_FAILED", str(error))
    except Exception as error:
        logging.exception("training failed")
        if _out_of_memory(error):
            code, reason = 5, "OUT_OF_MEMORY"
        elif trainer.dist.world > 1 and _peer_lost(error):
            code, reason = PEER_LOST_EXIT, "PEER_LOST"
        else:
            code, reason = 1, "TRAINER_FAILED"
        return _failed(trainer, code, reason, f"{type(error).__name__}: {error}")
    finally:
        trainer.reporter.close()
        trainer.dist.close()
    return 0


def _failed(trainer: object, code: int, reason: str, message: str) -> int:
    """Say why the run failed, to TrainingService and in the outcome; the exit status."""
    print(f"error: {reason}: {message}", file=sys.stderr)
    outcome.record(reason=reason, message=message)
    trainer.reporter.event("failed", reason=reason, message=message)  # type: ignore[attr-defined]
    return code


# What a collective says when another process of the run went away (gloo, NCCL, the store).
PEER_GONE = (
    "connection reset by peer",
    "connection closed by peer",
    "broken pipe",
    "nccl communicator was aborted",
    "remote process exited",
)


def _peer_lost(error: BaseException) -> bool:
    """Whether a collective failed because another process of the run is gone (a preempted or
    lost node), not because of this process's own fault."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, torch.distributed.DistError):
        return True
    text = str(error).lower()
    return any(phrase in text for phrase in PEER_GONE)


def _out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(error, torch.OutOfMemoryError)


if __name__ == "__main__":
    sys.exit(main())
