"""A user's program reading readouts: the typed route the docs recommend.

Checked by ``mypy --strict tests/typing`` (nox's typecheck session), never run.
"""

from __future__ import annotations

from typing import assert_type

import numpy as np
import numpy.typing as npt

import poc_api


def flat_readout(ev: poc_api.Token, manifest: poc_api.ReadoutManifest) -> None:
    if ev.readout is not None:
        flat = np.asarray(ev.readout, dtype=np.float32)
        assert_type(flat, npt.NDArray[np.float32])
        shaped = flat.reshape(manifest.shape)
        assert_type(shaped, np.ndarray[tuple[int, int], np.dtype[np.float32]])


def shaped_readout(ev: poc_api.TokenOut) -> float:
    if ev.readout is None:
        return 0.0
    layers = np.asarray(ev.readout, dtype=np.float32)
    assert_type(layers, npt.NDArray[np.float32])
    return float(layers.sum())


def without_numpy(ev: poc_api.Token) -> None:
    if ev.readout is not None:
        # Floats at run time; typeshed says ints, as the docs warn (were typeshed
        # to change, the docs' warning would go too).
        assert_type(ev.readout.tolist(), list[int])
