"""`python -m sdt.data.prepare data=hf_hub data.name=...`: tokenize a corpus ahead of a (cluster) job.

Takes the same overrides as `train.py` (only `data.*` and `paths.*` matter), builds the tokenizer and the token
cache exactly as training would, and prints where they went and the command that trains from them. Interrupted,
it resumes from its last complete shard when run again; run against an intact cache it only checks it.
Bad input: one line `error: ...` on stderr, exit code 2.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from pathlib import Path

from sdt.common.errors import EXIT_USER_ERROR, UserError
from sdt.data.config import DataConfig
from sdt.data.datamodule import LMDataModule

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def prepare(overrides: list[str]) -> str:
    """Prepare the corpus the overrides name; returns the report printed by `main`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)  # paths.* resolve from ${hydra:runtime.cwd} as under train.py
            data = OmegaConf.to_container(cfg.data, resolve=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(str(e).splitlines()[0]) from None
    finally:
        GlobalHydra.instance().clear()
    assert isinstance(data, dict)
    if data.get("corpus") not in ("shakespeare", "text_files", "hf_hub"):
        raise UserError(f"data.corpus={data.get('corpus')}: prepare handles shakespeare, text_files and hf_hub")
    data_cfg = DataConfig.from_dict(data)
    start = time.perf_counter()
    dm = LMDataModule(data_cfg)
    dm.prepare_data()
    dm.setup()
    meta = dm.split_stats
    lines = [f"prepared in {time.perf_counter() - start:.1f}s: {dm.tokens_dir}"]
    for split, stats in meta.items():
        lines.append(f"  {split}: {int(stats['num_tokens']):,} tokens")
    data_overrides = [o for o in overrides if o.lstrip("+~").startswith(("data", "paths", "seed"))]
    lines.append("train from it with:")
    lines.append("  python train.py " + " ".join(shlex.quote(o) for o in data_overrides))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(prepare(argv))
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
