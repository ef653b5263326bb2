r"""Deterministic fault injection: a training run kills itself at a named point of its loop.

The resume tests (tests/test_faults.py) need a process to die at an exact place (during a
checkpoint save, during a validation evaluation, ...) rather than wherever a timer happens to
fire. :func:`train_and_evaluate <rankjax.train.train_and_evaluate>` calls :func:`point` at each
such place; with the environment variable ``RANKJAX_FAULT`` unset (always, outside the tests) it
does nothing.

``RANKJAX_FAULT="POINT@STEP[,POINT@STEP...]"`` makes the process send itself ``SIGKILL`` (as
``kill -9`` would: no clean-up, no ``finally``) when it reaches ``POINT`` at training step
``STEP``. The points, in the order a step reaches them:

* ``train``: the update step of ``STEP`` has been dispatched (nothing saved of it yet);
* ``save``: the checkpoint of ``STEP`` has begun writing (asynchronously) and is not committed;
* ``val``: the validation evaluation of ``STEP`` has computed its metrics, which are not yet
  logged or recorded, and the best checkpoint is not yet chosen;
* ``test``: the final evaluation (``STEP`` is the last step) has computed its metrics and
  ``metrics.json`` is not yet written.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "RANKJAX_FAULT"
POINTS = ("train", "save", "val", "test")


def parse(spec: str | None) -> set[tuple[str, int]]:
  """The ``(point, step)`` pairs of a ``RANKJAX_FAULT`` value; raises ``ValueError`` if malformed.

  Example:
    >>> sorted(parse("save@4,val@6"))
    [('save', 4), ('val', 6)]
  """
  pairs = set()
  for item in filter(None, (s.strip() for s in (spec or "").split(","))):
    name, _, step = item.partition("@")
    if name not in POINTS or not step.isdigit():
      raise ValueError(f"{ENV_VAR}={spec!r}: expected POINT@STEP items, POINT one of "
                       f"{', '.join(POINTS)}; could not read {item!r}.")
    pairs.add((name, int(step)))
  return pairs


def point(name: str, step: int) -> None:
  """Kills this process with ``SIGKILL`` if ``RANKJAX_FAULT`` names ``name@step``; else nothing."""
  if name not in POINTS:
    raise ValueError(f"Unknown fault point {name!r}; the points are {', '.join(POINTS)}.")
  spec = os.environ.get(ENV_VAR)
  if spec and (name, int(step)) in parse(spec):
    os.kill(os.getpid(), signal.SIGKILL)
