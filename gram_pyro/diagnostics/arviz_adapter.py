"""The one module that imports ArviZ (written against the 0.2x API), so that supporting ArviZ 1.x
touches this file alone.

Data crosses this boundary as plain numpy: a group is ``{variable: (dims, array)}`` and ``coords``
maps a dim name to its labels. Groups with ``chain``/``draw`` dims follow ArviZ's conventions
(``posterior``, ``sample_stats``, ``posterior_predictive``, ``prior_predictive``); per-input summaries
without those dims (k-hat) may sit beside them in ``sample_stats``. NetCDF goes through h5netcdf,
which ArviZ itself requires.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

with warnings.catch_warnings():  # 0.2x announces its 1.x refactor on import
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

Variables = dict[str, tuple[tuple[str, ...], np.ndarray]]
"""``{variable name: (dim names, array)}``: one group of an InferenceData."""


@contextlib.contextmanager
def _quiet():
    """Silence warnings inside an ArviZ call: 0.2x announces its own and matplotlib's coming API
    changes and warns for every k-hat above 0.7 (the caller reports those)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def inference_data(groups: dict[str, Variables], coords: dict[str, np.ndarray]) -> az.InferenceData:
    """An InferenceData with one xarray Dataset per group; each dataset carries the coords of the
    dims it uses."""
    datasets = {}
    for group, variables in groups.items():
        used = {dim for dims, _ in variables.values() for dim in dims}
        datasets[group] = xr.Dataset({name: (dims, value) for name, (dims, value) in variables.items()},
                                     coords={dim: labels for dim, labels in coords.items() if dim in used})
    return az.InferenceData(**datasets)


def write_netcdf(data: az.InferenceData, path: Path) -> None:
    data.to_netcdf(str(path))


def read_netcdf(path: Path) -> az.InferenceData:
    return az.from_netcdf(str(path))


def pareto_khat(log_weights: np.ndarray) -> np.ndarray:
    """PSIS shape estimates ``[M]`` of the importance log weights ``[M, K]`` (float64; ``K``
    independent draws, so relative efficiency 1)."""
    with _quiet():
        _, khat = az.psislw(np.asarray(log_weights, dtype=np.float64), reff=1.0)
    return np.asarray(khat, dtype=np.float64)


def convergence_summary(data: az.InferenceData, variable: str):
    """``az.summary`` diagnostics of ``posterior[variable]``: a pandas DataFrame with one row per
    coordinate and columns ``mcse_mean, mcse_sd, ess_bulk, ess_tail, r_hat``."""
    return az.summary(data, var_names=[variable], kind="diagnostics")


def plot_khat(khat: np.ndarray, ax) -> None:
    """k-hat per input on ``ax`` with ArviZ's reference lines (0.5, 0.7, 1)."""
    with _quiet():  # 0.2x prefers ELPDData (a LOO result) to a plain array
        az.plot_khat(khat, ax=ax, show_hlines=True, show_bins=True)


def plot_trace(data: az.InferenceData, variable: str, coords: dict, axes) -> None:
    """Trace plot of ``posterior[variable]`` at ``coords``; ``axes`` ``[rows, 2]``, one row per
    coordinate left after ``coords``."""
    with _quiet():
        az.plot_trace(data, var_names=[variable], coords=coords, compact=False, axes=axes)


def plot_rank(data: az.InferenceData, variable: str, coords: dict, axes) -> None:
    """Rank plot (per-chain rank histograms) of ``posterior[variable]`` at ``coords``."""
    with _quiet():
        az.plot_rank(data, var_names=[variable], coords=coords, ax=axes)
