"""Ship a trained run's EMA weights as ``pretrained/<name>/`` (inference only).

    python experiments/export_pretrained.py run=<run dir> name=<name> [results=docs/results/<task>-<budget>.json]

Writes ``config.yaml`` (the run's, with ``trainer.device=auto`` so it loads on any machine),
``weights.pt`` (the model's and guide's state dicts holding the EMA weights; no optimizer, no RNG) and
``check.json``: the GRAM accuracy of ``results`` (the whole-test-split figure the weights stand for)
and the accuracy of the exported weights on :data:`CHECK_INPUTS` held-out inputs with
:data:`CHECK_SAMPLES` prior trajectories each, as deep as the results' trajectories (their ``depth``;
the trained depth without results), with its 95% interval, which ``tests/test_pretrained.py``
reproduces. Load them with ``gram-pyro eval pretrained=<name>`` (or ``solve`` / ``sample``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from gram_pyro.checkpoint import save_checkpoint
from gram_pyro.config import UserError, command_line, save_config
from gram_pyro.evaluation import evaluate_run
from gram_pyro.run import PRETRAINED, load_run

CHECK_INPUTS, CHECK_SAMPLES = 64, 20
MAX_BYTES = 5 * 2**20


def export(run: Path, name: str, results: Path | None) -> Path:
    loaded = load_run(run, "cpu")
    out = PRETRAINED / name
    out.mkdir(parents=True, exist_ok=True)
    cfg = loaded.cfg
    cfg.trainer.device = "auto"
    save_config(cfg, out / "config.yaml")
    save_checkpoint(out / "weights.pt", {"model": loaded.model.state_dict(), "guide": loaded.guide.state_dict()})
    if (out / "weights.pt").stat().st_size > MAX_BYTES:
        raise UserError(f"{out / 'weights.pt'} is over {MAX_BYTES // 2**20} MB")
    recorded, depth = None, None
    if results is not None:
        published = json.loads(results.read_text())
        gram, depth = published["models"]["GRAM"], published.get("depth")
        recorded = {"file": str(results), "accuracy": gram.get("accuracy", gram.get("validity"))}
    shipped = load_run(out, "cpu")  # what users get, checked on what they load
    report, _ = evaluate_run(shipped, "test", CHECK_INPUTS, CHECK_SAMPLES, depth=depth)
    check = {"inputs": CHECK_INPUTS, "samples": CHECK_SAMPLES, "depth": report["depth"], "metric": "sample_accuracy",
             **{k: report["metrics"]["sample_accuracy"][k] for k in ("mean", "ci95")}}
    (out / "check.json").write_text(json.dumps({"source": str(run), "results": recorded, "check": check},
                                               indent=2) + "\n")
    return out


@command_line("export_pretrained")
def main(argv: list[str]) -> int:
    options = dict(arg.split("=", 1) for arg in argv if "=" in arg)
    unknown = set(options) - {"run", "name", "results"}
    if unknown or "run" not in options or "name" not in options or len(options) != len(argv):
        raise UserError("usage: export_pretrained.py run=<run dir> name=<name> [results=<results json>]")
    out = export(Path(options["run"]), options["name"],
                 Path(options["results"]) if "results" in options else None)
    print(f"wrote {out}")
    print(OmegaConf.to_yaml(OmegaConf.create(json.loads((out / 'check.json').read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
