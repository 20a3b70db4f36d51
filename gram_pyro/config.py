"""Config composition with one-line errors.

Configs live in ``experiments/configs`` (package data, found as ``pkg://experiments.configs``), so the
command works from any directory and from a non-editable install. Composition uses Hydra's compose
API; any failure becomes a :class:`UserError` naming the key or option and what is allowed.
"""

from __future__ import annotations

from importlib import resources

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

CONFIG_MODULE = "experiments.configs"


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2, no traceback."""


def group_options(group: str) -> list[str]:
    """The config names available in a group (``task``, ``model``, ...)."""
    folder = resources.files(CONFIG_MODULE) / group
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_module(CONFIG_MODULE, version_base=None):
        return compose(config_name=config_name, overrides=overrides)


def _allowed_keys(config_name: str, overrides: list[str], key: str) -> str:
    """The keys next to ``key`` in the config the group choices among ``overrides`` select."""
    choices = [o for o in overrides if (resources.files(CONFIG_MODULE) / o.partition("=")[0]).is_dir()]
    try:
        node = OmegaConf.select(_compose(config_name, choices), key.rpartition(".")[0]) if "." in key \
            else _compose(config_name, choices)
    except HydraException:
        return ""
    return f"; allowed: {', '.join(k for k in node if k != '_target_')}" if isinstance(node, DictConfig) else ""


def _explain(error: Exception, config_name: str, overrides: list[str]) -> str:
    message = str(error)
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if "/" not in key and "." not in key and f"'{key}/{value}'" in message:
            return f"unknown {key} {value!r}; allowed: {', '.join(group_options(key))}"
        if f"'{key}'" in message and ("not in struct" in message or "Could not override" in message):
            return f"unknown config key {key!r}{_allowed_keys(config_name, overrides, key)}"
    return message.strip().splitlines()[0]


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose ``experiments/configs/<config_name>.yaml`` with command-line ``overrides``."""
    try:
        return _compose(config_name, overrides)
    except HydraException as error:
        raise UserError(_explain(error, config_name, overrides)) from None


def build(node: DictConfig, what: str, **kwargs):
    """Instantiate a ``_target_`` config node; a bad value becomes a one-line :class:`UserError`."""
    try:
        return instantiate(node, **kwargs)
    except MissingMandatoryValue as error:
        key = error.full_key
        raise UserError(f"missing required value {key}: set it on the command line, e.g. {key}=<value>") from None
    except InstantiationException as error:
        cause = error.__cause__ or error
        if isinstance(cause, UserError):  # already says what is wrong (a bad data file line, ...)
            raise cause from None
        raise UserError(f"bad {what} config: {str(cause).strip().splitlines()[0]}") from None


def load_run_config(path) -> DictConfig:
    """A run's saved ``config.yaml``, with trainer keys added to ``trainer/default.yaml`` since the run
    was written filled in from their defaults (so older runs still load and resume)."""
    saved = OmegaConf.load(path)
    defaults = OmegaConf.load(str(resources.files(CONFIG_MODULE) / "trainer" / "default.yaml"))
    saved.trainer = OmegaConf.merge(defaults, saved.trainer)
    return saved


def save_config(cfg: DictConfig, path) -> None:
    OmegaConf.save(cfg, path, resolve=True)
