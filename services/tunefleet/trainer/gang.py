"""torchrun for a run of several processes or nodes, exiting with the status of the process that
failed first. torchrun's own status is 1 for every failure, which would hide why from the Job's
podFailurePolicy: with this, the trainer's own failures (1 to 5) still fail the Job, while a
process that lost a peer (6, PEER_LOST: a node preempted or gone) ends its Pod with a status the
Job controller retries. Every node's Pods then start again together and resume from the last
checkpoint (tunefleet.training.manifests).

    python -m tunefleet.trainer.gang <torchrun's arguments> -m tunefleet.trainer --spec FILE
"""

from __future__ import annotations

import signal
import sys


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    try:
        run(get_args_parser().parse_args(argv))  # type: ignore[no-untyped-call]
    except ChildFailedError as error:
        _, failure = error.get_first_failure()
        code = failure.exitcode
        if code < 0:  # killed by a signal, as a shell reports it
            return 128 + (-code if -code in signal.valid_signals() else signal.SIGKILL)
        return code or 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
