"""Config composition with one-line errors.

Configs live in ``experiments/configs`` (package data, found as ``pkg://gram_pyro.experiments.configs``), so the
command works from any directory and from a non-editable install. Composition uses Hydra's compose
API; any failure becomes a :class:`UserError` naming the key or option and what is allowed.

A run directory's ``config.yaml`` is input like any other file: before anything in it is built, every
``_target_`` it names must be one that ``experiments/configs`` names at the same key (the project's own
classes), it may hold no other Hydra instantiation key (``_args_``, ``_partial_``, ...) and no
interpolation (a run's config is saved resolved). Anything else is a one-line :class:`UserError`.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

CONFIG_MODULE = "gram_pyro.experiments.configs"
RUN_SECTIONS = ("task", "model", "guide", "objective", "trainer")
"""The mappings every run's ``config.yaml`` holds."""


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2, no traceback."""


def command_line(name: str):
    """Decorator of a script's ``main(argv) -> int``: a :class:`UserError` raised in it is printed as
    the one line ``<name>: error: <message>`` on stderr and the exit status is 2."""

    def decorate(main):
        @functools.wraps(main)
        def run(argv: list[str]) -> int:
            try:
                return main(argv)
            except UserError as error:
                print(f"{name}: error: {error}", file=sys.stderr)
                return 2

        return run

    return decorate


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, or its type's name when the message is empty."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


SEED_RANGE = (0, 2**32 - 1)
"""The seeds a config may give (``trainer.seed``, ``seed`` of the commands): what every generator reads whole."""


@dataclass(frozen=True)
class Whole:
    """A config value that must be an integer in ``[low, high]`` (``high=None``: unbounded), or ``null``
    where ``null`` is true."""

    low: int
    high: int | None = None
    null: bool = False

    def problem(self, value) -> str | None:
        """What is wrong with ``value`` (``None``: nothing), as ``allowed: ...``."""
        if (value is None and self.null) or (isinstance(value, int) and not isinstance(value, bool)
                                             and self.low <= value and (self.high is None or value <= self.high)):
            return None
        span = f">= {self.low}" if self.high is None else f"in [{self.low}, {self.high}]"
        return f"allowed: an integer {span}" + (" or null" if self.null else "")


@dataclass(frozen=True)
class Number:
    """A config value that must be a finite number above ``low`` (from ``low`` on where ``closed``) and
    at most ``high``, or ``null`` where ``null`` is true."""

    low: float = 0
    high: float = math.inf
    closed: bool = False
    null: bool = False

    def problem(self, value) -> str | None:
        if value is None and self.null:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and (isinstance(value, int) or math.isfinite(value)) \
                and (self.low <= value if self.closed else self.low < value) and value <= self.high:
            return None
        span = f"in [{self.low:g}, {self.high:g}]" if self.closed and self.high < math.inf \
            else f"{'>=' if self.closed else 'above'} {self.low:g}" + \
            (f" and at most {self.high:g}" if self.high < math.inf else "")
        return f"allowed: a finite number {span}" + (" or null" if self.null else "")


@dataclass(frozen=True)
class Flag:
    """A config value that must be ``true`` or ``false``."""

    def problem(self, value) -> str | None:
        return None if isinstance(value, bool) else "allowed: true, false"


def check_values(cfg: DictConfig, rules: dict, prefix: str = "") -> None:
    """A one-line :class:`UserError` for the first key of ``rules`` (``key -> Whole | Number | Flag``)
    whose value in ``cfg`` breaks its rule, before any work: ``samples=abc`` or ``inputs=0`` is named
    with what is allowed, instead of failing deep inside."""
    for key, rule in rules.items():
        value = cfg[key]
        problem = rule.problem(value)
        if problem:
            raise UserError(f"{prefix}{key}={value!r}; {problem}")


def make_dir(path: Path, key: str) -> Path:
    """Create the directory ``path`` (and its parents); one that cannot be created (a file is in the
    way, no permission, a read-only file system) is a one-line :class:`UserError` naming ``key``."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{key}: cannot create the directory {path} ({error.strerror or first_line(error)})") \
            from None
    return path


def group_options(group: str) -> list[str]:
    """The config names available in a group (``task``, ``model``, ...)."""
    folder = resources.files(CONFIG_MODULE) / group
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _compose(config_name: str, overrides: list[str], hydra: bool = False) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_module(CONFIG_MODULE, version_base=None):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=hydra)


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
    if isinstance(error, TypeError):  # OmegaConf: a dotted key that indexes a list by name (train.trainer.x=1)
        return f"{first_line(error)}: a dotted key cannot reach into a list; give the whole list (key=[a,b])"
    if message.startswith("Ambiguous value for argument"):
        return (f"{first_line(error)}: to sweep over it add --multirun (gram-pyro train only); a list is "
                f"written key=[a,b], a string with commas key='a,b'")
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if "no viable alternative" in message and value.startswith("[") and "=" in value:
            quoted = ",".join(f"'{element.strip()}'" for element in value.strip("[]").split(","))
            return f"{first_line(error)}: a list element holding '=' is quoted, {key}=[{quoted}]"
        if "/" not in key and "." not in key and f"'{key}/{value}'" in message:
            return f"unknown {key} {value!r}; allowed: {', '.join(group_options(key))}"
        if f"'{key}'" in message and ("not in struct" in message or "Could not override" in message):
            return f"unknown config key {key!r}{_allowed_keys(config_name, overrides, key)}"
    return first_line(error)


RENAMED_KEYS = {"sample": {"n": "samples"}, "diagnose": {"trajectories": "samples"}}
"""Per config, keys that have a new name (``samples`` is the number of trajectories per input in every
command): an override of the old key is a one-line error that names the new one."""


def _check_renamed(config_name: str, overrides: list[str]) -> None:
    renamed = RENAMED_KEYS.get(config_name, {})
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in renamed:
            raise UserError(f"{key}= is now called {renamed[key]}=: use {renamed[key]}={value or '<N>'}")


OPTIONAL_GROUPS = ("recipe",)
"""Config groups a defaults list includes as ``optional``: Hydra skips a choice that names no file, so a
choice given on the command line is checked here (a misspelt recipe would train the paper's silently)."""


def _check_optional_choices(overrides: list[str]) -> None:
    for override in overrides:
        group, _, choice = override.lstrip("+").partition("=")
        if group in OPTIONAL_GROUPS and choice not in group_options(group):
            raise UserError(f"{group}={choice}: no such {group}; allowed: {', '.join(group_options(group))}")


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose ``experiments/configs/<config_name>.yaml`` with command-line ``overrides`` (an old key
    of :data:`RENAMED_KEYS` or a choice of an optional group that names no file is a one-line error)."""
    _check_renamed(config_name, overrides)
    _check_optional_choices(overrides)
    try:
        return _compose(config_name, overrides)
    except (HydraException, TypeError) as error:
        raise UserError(_explain(error, config_name, overrides)) from None


def compose_choices(config_name: str, overrides: list[str]) -> tuple[DictConfig, dict[str, str]]:
    """:func:`compose_config` and the option chosen in each config group of the project (``{"task":
    "nqueens", "model": "gram", ...}``, Hydra's own groups left out; an optional group's choice may name
    no file: ``recipe`` where the task has no recipe for the combination)."""
    try:
        cfg = _compose(config_name, overrides, hydra=True)
    except (HydraException, TypeError) as error:
        raise UserError(_explain(error, config_name, overrides)) from None
    choices = {group: choice for group, choice in cfg.hydra.runtime.choices.items()
               if not group.startswith("hydra") and choice is not None}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def _entries(node, path: str = ""):
    """``(key path of the mapping, key, value)`` of every mapping entry of a plain yaml tree, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, str(key), value
            yield from _entries(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _entries(value, f"{path}[{index}]")


def _package(text: str, group: str) -> str:
    """The key a config file's content sits at: its ``# @package`` header (``_global_`` the top,
    ``_group_`` its group) or, without one, its group's folder path (``task``, ``model``, ...)."""
    header = re.search(r"^#\s*@package\s+(\S+)", text, re.MULTILINE)
    if not header:
        return group
    parts = [group if part == "_group_" else part for part in header.group(1).split(".")]
    return ".".join(part for part in parts if part and part != "_global_")


def _config_files(folder=None, group: str = ""):
    """``(package, text)`` of every yaml file under ``experiments/configs`` (:func:`_package`)."""
    folder = folder or resources.files(CONFIG_MODULE)
    for entry in folder.iterdir():
        if entry.is_dir():
            yield from _config_files(entry, f"{group}.{entry.name}" if group else entry.name)
        elif entry.name.endswith(".yaml"):
            text = entry.read_text()
            yield _package(text, group), text


@functools.cache
def allowed_targets() -> dict[str, frozenset[str]]:
    """The ``_target_`` values the configs of ``experiments/configs`` name, by the key they sit at
    (``task``, ``model``, ``guide``, ``objective``): all that a run's config may build."""
    found: dict[str, set[str]] = {}
    for package, text in _config_files():
        for path, key, value in _entries(yaml.safe_load(text), package):
            if key == "_target_":
                found.setdefault(path, set()).add(value)
    return {path: frozenset(targets) for path, targets in found.items()}


def _plain(cfg, where: str, resolve: bool):
    """``cfg`` as plain dicts and lists (interpolations resolved when ``resolve``)."""
    try:
        return OmegaConf.to_container(cfg, resolve=resolve) if OmegaConf.is_config(cfg) else cfg
    except OmegaConfBaseException as error:
        raise UserError(f"{where}: cannot resolve {first_line(error)}") from None


def check_targets(cfg, where: str, path: str = "") -> None:
    """A one-line :class:`UserError` unless every ``_target_`` in ``cfg`` (the node at key ``path`` of a
    run's config, interpolations resolved) is one that ``experiments/configs`` names at that key, and no
    other Hydra instantiation key (``_args_``, ``_partial_``, ``_recursive_``, ...) appears: checked
    before anything is built, so that a config can only build the project's own classes."""
    allowed = allowed_targets()
    entries = [(f"{at}.{key}" if at else key, at, key, value)
               for at, key, value in _entries(_plain(cfg, where, resolve=True), path)]
    for name, at, key, value in entries:  # a foreign target first: the most telling complaint
        options = allowed.get(at, frozenset())
        if key == "_target_" and not (isinstance(value, str) and value in options):
            what = f"allowed: {', '.join(sorted(options))}" if options else "nothing may be built there"
            raise UserError(f"{where}: {name}={value!r} is not one of the project's classes; {what}")
    for name, at, key, value in entries:
        if key != "_target_" and re.fullmatch(r"_\w*_", key):
            raise UserError(f"{where}: {name} is not allowed; only _target_ may say what is built")


def _check_run_config(cfg: DictConfig, where: str) -> None:
    """A saved run config is safe to build from: no interpolation (runs are saved resolved), the
    sections of :data:`RUN_SECTIONS` as mappings, and :func:`check_targets`."""
    for at, key, value in _entries(_plain(cfg, where, resolve=False)):
        if isinstance(value, str) and "${" in value:
            raise UserError(f"{where}: {at + '.' if at else ''}{key} is an interpolation ({value}); "
                            f"a run's config holds plain values")
    missing = [key for key in RUN_SECTIONS if not isinstance(cfg.get(key), DictConfig)]
    if missing:
        raise UserError(f"{where} is not a run's config: it lacks the mapping{'s' * (len(missing) > 1)} "
                        f"{', '.join(missing)}")
    check_targets(cfg, where)


def build(node: DictConfig, what: str, **kwargs):
    """Instantiate the ``_target_`` config node at key ``what`` of a config (``task``, ``model``, ...);
    a target not on the allow-list (:func:`check_targets`) or a bad value is a one-line :class:`UserError`."""
    check_targets(node, f"{what} config", what)
    try:
        return instantiate(node, **kwargs)
    except MissingMandatoryValue as error:
        key = error.full_key
        raise UserError(f"missing required value {key}: set it on the command line, e.g. {key}=<value>") from None
    except InstantiationException as error:
        cause = error.__cause__ or error
        if isinstance(cause, UserError):  # already says what is wrong (a bad data file line, ...)
            raise cause from None
        raise UserError(f"bad {what} config: {first_line(cause)}") from None


def _read_yaml(path) -> DictConfig:
    """The yaml mapping in ``path``; an unreadable or unparsable file, or one that holds no mapping,
    is a one-line :class:`UserError`."""
    try:
        loaded = OmegaConf.load(path)
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as error:
        raise UserError(f"{path} is not a readable yaml mapping ({first_line(error)})") from None
    if not isinstance(loaded, DictConfig):
        raise UserError(f"{path} is not a readable yaml mapping (it holds a list)")
    return loaded


def load_run_config(path) -> DictConfig:
    """A run's saved ``config.yaml``, checked before anything is built from it (the module docstring),
    with trainer keys added to ``trainer/default.yaml`` since the run was written filled in from their
    defaults, objective options likewise (:func:`_fill_objective`), and renamed keys and moved classes
    translated (:func:`_translate_trainer`, :func:`_translate_targets`), so older runs still load and
    resume."""
    saved = _read_yaml(path)
    _translate_targets(saved)
    _check_run_config(saved, str(path))
    defaults = OmegaConf.load(str(resources.files(CONFIG_MODULE) / "trainer" / "default.yaml"))
    saved.trainer = OmegaConf.merge(defaults, _translate_trainer(saved.trainer))
    _fill_objective(saved)
    return saved


def _fill_objective(saved: DictConfig) -> None:
    """In place: the options that the objective's class gained since the run was written, from the one
    ``objective/*.yaml`` of that class (whose defaults keep the old behaviour); nothing where no file,
    or more than one, names the class."""
    objective = saved.get("objective")
    target = objective.get("_target_") if isinstance(objective, DictConfig) else None
    files = [OmegaConf.load(str(f)) for f in (resources.files(CONFIG_MODULE) / "objective").iterdir()
             if f.name.endswith(".yaml")]
    matching = [f for f in files if f.get("_target_") == target]
    if target is not None and len(matching) == 1:
        with open_dict(objective):
            for key, value in matching[0].items():
                objective.setdefault(key, value)


MOVED_PACKAGES = ("models.", "guides.")
"""Packages installed inside ``gram_pyro`` since: a run saved before names their classes without the prefix."""


def _translate_targets(saved: DictConfig) -> None:
    """In place: the ``model`` and ``guide`` targets of a run saved before the move of
    :data:`MOVED_PACKAGES` (``models.RecursiveReasoningModel``) read as ``gram_pyro.models...``."""
    for section in ("model", "guide"):
        node = saved.get(section)
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        if isinstance(target, str) and target.startswith(MOVED_PACKAGES):
            node._target_ = "gram_pyro." + target


def _translate_trainer(trainer: DictConfig) -> DictConfig:
    """The trainer section of a run saved before ``precision`` and the compile modes: ``bf16: true``
    (bf16 on CUDA only) reads as ``precision: auto``, ``false`` as ``fp32``; ``compile: false`` /
    ``true`` as ``none`` / ``default``."""
    trainer = trainer.copy()
    if "bf16" in trainer:
        bf16 = trainer.pop("bf16")
        trainer.precision = "auto" if bf16 is True else "fp32" if bf16 is False else bf16
    if isinstance(trainer.get("compile"), bool):
        trainer.compile = "default" if trainer.compile else "none"
    return trainer


def save_config(cfg: DictConfig, path) -> None:
    OmegaConf.save(cfg, path, resolve=True)
