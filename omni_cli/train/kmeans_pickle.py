"""Read the cluster centres out of the released k-means file without running code from it.

The mHuBERT k-means (`mhubert_base_vp_en_es_fr_it3_L11_km1000.bin`) is a scikit-learn
`MiniBatchKMeans` saved by fairseq's `learn_kmeans.py` with `joblib.dump`: a pickle whose numpy
arrays are written as `joblib.numpy_pickle.NumpyArrayWrapper` objects followed by their raw
bytes. A plain `pickle.dump` of the same estimator is read too. Unpickling can call any
function a file names, so this reader resolves only the globals such files hold — numpy's array
and dtype constructors, a stand-in for the estimator that just keeps its attributes, and one for
joblib's wrapper whose bytes it reads itself — and refuses a file naming anything else before
calling it. Neither scikit-learn nor joblib is needed, and no child process is used.
"""

from __future__ import annotations

import math
import pickle
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from omni_cli.errors import CheckpointError, one_line

# The estimator classes of the release (scikit-learn ≥ 0.22 and the older module path).
ESTIMATORS = {("sklearn.cluster._kmeans", "MiniBatchKMeans"), ("sklearn.cluster.k_means_", "MiniBatchKMeans")}
ARRAY_WRAPPER = ("joblib.numpy_pickle", "NumpyArrayWrapper")
# No k-means file of ours comes near this; a larger declared array is refused before it is allocated.
MAX_ARRAY_BYTES = 1 << 30


class _Refused(pickle.UnpicklingError):
    """The file names a global outside the allow-list."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class _Estimator:
    """Stands in for MiniBatchKMeans: keeps the pickled attributes, runs nothing."""

    state: dict[str, Any]

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {}


class _ArrayWrapper:
    """Stands in for joblib's NumpyArrayWrapper: its attributes say how the raw array bytes after it are laid out."""

    state: dict[str, Any]

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {}


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """numpy's pickle constructors under their numpy 1 and numpy 2 module names (the release predates numpy 2)."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    # Protocol-2 pickles store bytes as _codecs.encode(text, "latin1"), a pure conversion.
    allowed[("_codecs", "encode")] = __import__("_codecs").encode
    return allowed


NUMPY_GLOBALS = _numpy_globals()


class _RestrictedUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its BUILD can be extended
    """Resolves only the allow-listed globals; reads joblib's raw array bytes after each wrapper."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file)
        self._raw = file

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in ESTIMATORS:
            return _Estimator
        if key == ARRAY_WRAPPER:
            return _ArrayWrapper
        if key in NUMPY_GLOBALS:
            return NUMPY_GLOBALS[key]
        dtypes = getattr(np, "dtypes", None)  # numpy ≥ 1.25 may name a dtype's class (Float32DType, ...)
        if module == "numpy.dtypes" and name.endswith("DType") and isinstance(getattr(dtypes, name, None), type):
            return getattr(dtypes, name)
        raise _Refused(f"{module}.{name}")

    def _load_build(self) -> None:
        pickle._Unpickler.load_build(self)
        if isinstance(self.stack[-1], _ArrayWrapper):
            self.stack[-1] = _read_wrapped_array(self.stack[-1].state, self._raw)

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = _load_build


def _read_wrapped_array(state: dict[str, Any], raw: BinaryIO) -> np.ndarray:
    """The array whose bytes follow a joblib wrapper in the file (as joblib's `NumpyArrayWrapper.read_array`)."""
    dtype, shape, order = state.get("dtype"), state.get("shape"), state.get("order", "C")
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("an array of Python objects (only numeric arrays are read)")
    shape = tuple(int(n) for n in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if count < 0 or nbytes > MAX_ARRAY_BYTES:
        raise pickle.UnpicklingError(f"an array of {nbytes} bytes (more than a k-means file holds)")
    if state.get("numpy_array_alignment_bytes") is not None:  # joblib ≥ 1.2 pads arrays to an alignment
        padding = raw.read(1)
        raw.read(padding[0] if padding else 0)
    data = raw.read(nbytes)
    if len(data) != nbytes:
        raise EOFError("the file ends inside an array")
    array = np.frombuffer(data, dtype=dtype, count=count).copy()
    return array.reshape(shape[::-1]).T if order == "F" else array.reshape(shape)


def read_kmeans_centres(path: str | Path) -> np.ndarray:
    """The (clusters, dim) float32 centres of a MiniBatchKMeans file; one-line CheckpointError for anything else."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            if handle.read(1) != pickle.PROTO:
                raise CheckpointError(
                    f"{path} is not an uncompressed pickle (the release's k-means file is one); "
                    "a compressed joblib file must be decompressed first."
                )
            handle.seek(0)
            estimator = _RestrictedUnpickler(handle).load()
    except FileNotFoundError as exc:
        raise CheckpointError(f"k-means file {path} not found; download it (`omni download --units`).") from exc
    except _Refused as exc:
        raise CheckpointError(
            f"{path} names {exc.name}, which a k-means file does not hold; refusing to read it "
            "(only numpy arrays and scikit-learn's MiniBatchKMeans are read, so a file cannot run code)."
        ) from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            struct.error, UnicodeDecodeError, OSError, MemoryError) as exc:  # a damaged or foreign file
        raise CheckpointError(f"{path} is not a readable k-means file ({one_line(exc)}); download it again.") from exc
    if not isinstance(estimator, _Estimator):
        raise CheckpointError(f"{path} holds no scikit-learn MiniBatchKMeans; pass the k-means file of the mHuBERT release.")
    centres = estimator.state.get("cluster_centers_")
    if not isinstance(centres, np.ndarray) or centres.ndim != 2 or centres.dtype.kind not in "fiu":
        raise CheckpointError(f"{path}: the k-means model has no (clusters, dim) cluster_centers_ array; it was never fitted?")
    problem = centres_problem(centres)
    if problem is not None:
        raise CheckpointError(f"{path}: the k-means model {problem}; download the release's k-means file again.")
    return np.ascontiguousarray(centres, dtype=np.float32)


def centres_problem(centres: np.ndarray) -> str | None:
    """What makes an array unusable as k-means centres ("holds no centres", ...), or None.

    Empty or NaN centres would not fail later: every frame would quietly become unit 0.
    """
    if centres.ndim != 2:
        return f"is not a (clusters, dim) matrix (shape {tuple(centres.shape)})"
    if 0 in centres.shape:
        return f"holds no centres (shape {tuple(centres.shape)})"
    if not np.all(np.isfinite(centres)):
        return "holds NaN or infinite centres"
    return None


__all__ = ["read_kmeans_centres", "centres_problem", "ESTIMATORS", "NUMPY_GLOBALS", "MAX_ARRAY_BYTES"]
