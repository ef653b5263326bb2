"""Range checks of the arguments that a config and the operation it configures both take.

:mod:`rankjax.configs` runs them when a config is validated, before any work; the operations
(:func:`rankjax.augment.random_affine`, :mod:`rankjax.evaluation.shift_average`) run them on their
own arguments. Plain Python and NumPy, so that the configs do not import the operations.
"""

from __future__ import annotations

import operator

import numpy as np


def check_affine(rotation_degrees: float, scale: float, shift: float) -> None:
  """Raises ``ValueError`` for augmentation ranges outside those of ``augment.random_affine``.

  Example:
    >>> check_affine(rotation_degrees=10, scale=0.1, shift=0.05)  # fine
  """
  if not 0 <= rotation_degrees <= 180:
    raise ValueError(f"affine rotation_degrees must be in [0, 180]; got {rotation_degrees}.")
  if not 0 <= scale < 1:
    raise ValueError(f"affine scale must be in [0, 1); got {scale}.")
  if not 0 <= shift < 1:
    raise ValueError(f"affine shift must be in [0, 1); got {shift}.")


def check_max_shift(max_shift, image_size=None) -> int:
  """Returns ``max_shift`` as an int, or raises ``ValueError`` if it is not in ``[0, size / 2)``.

  Example:
    >>> check_max_shift(2, image_size=112)
    2
  """
  try:
    shift = operator.index(max_shift)
  except TypeError:
    shift = -1
  if shift < 0:
    raise ValueError(f"the test-time shift must be an integer >= 0 (pixels); got {max_shift!r}.")
  if image_size is not None and 2 * shift >= min(np.atleast_1d(image_size)):
    raise ValueError(f"a test-time shift of {shift} pixels would move the image out of its "
                     f"{image_size} px frame; use less than half the image size.")
  return shift
