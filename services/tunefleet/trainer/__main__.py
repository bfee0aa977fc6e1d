"""`python -m tunefleet.trainer --spec spec.json`: run one training job.

Exit status: 0 when the job succeeded, 2 when the spec cannot work (nothing big was loaded),
3 when TrainingService cancelled the job, 1 when training failed.
Progress goes to OUTPUT_DIR/progress.jsonl (and to TrainingService when
the spec names an endpoint); the result to OUTPUT_DIR/result.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tunefleet.trainer.report import Cancelled
from tunefleet.trainer.spec import SpecError, load_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunefleet.trainer", description=__doc__)
    parser.add_argument("--spec", type=Path, required=True, help="the job spec (JSON)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
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
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        trainer.run()
    except SpecError as error:
        trainer.reporter.event("failed", reason="INVALID_SPEC", message=str(error))
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Cancelled:
        logging.info("stopped: the job was cancelled")
        return 3
    except Exception as error:
        logging.exception("training failed")
        trainer.reporter.event(
            "failed", reason="TRAINER_FAILED", message=f"{type(error).__name__}: {error}"
        )
        return 1
    finally:
        trainer.reporter.close()
        trainer.dist.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
