"""Code that ships inside routed exports, copied flat next to `config.json` by `python -m sdt.export`.

An export directory holds:
- `modeling_sdt.py` (the module `auto_map` names: config, the routed units, `SDTForCausalLM`) and `layers_sdt.py`
  (what only the export needs: its decoding cache, running a block on a subset of tokens), both from this package;
- the package's own files, byte for byte and under their own names (PACKAGE_FILES): the backbone, `layers.py` and
  `kv_cache.py` from `sdt/blocks/`, and the routing pieces that need nothing else, `priors.py` (the prior /
  transition network; its norm is handed in), `surprise.py` (the surprise gate), `students.py` (causal routers),
  `routers.py` (MoD's router), `quantiles.py`, `topk.py`, `gates.py` and `skip_maps.py` from `sdt/routing/`. The
  export runs the very code the package trains and calibrates, so the two cannot drift. `sdt/routing/execution.py`
  is not among them: it builds on `sdt.blocks`, another package, and the only relative import transformers' loader
  follows names a sibling file (`from .name import ...`), so `layers_sdt.py` has its own `execute_tokens`, for the
  causal modes only.

The exported code imports only torch, transformers and its sibling files, by relative import (`from .layers import
Block`); the package files import only torch, the standard library and each other. transformers' dynamic-module
loader copies a modeling file together with the files it imports relatively (recursively), so an export loads with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` where `sdt` is not installed.

Inside the package, the same relative imports have to find the package files as siblings too: this package's module
search path (`__path__`) therefore also holds the directories of PACKAGE_FILES, as the export directory holds the
files themselves. Only the exported code imports through it (`sdt.transformers_code.layers` is `sdt/blocks/layers.py`
loaded for `modeling_sdt`); the package itself imports `sdt.blocks`.
"""

import os

HERE = os.path.dirname(__file__)
PACKAGE_DIR = os.path.dirname(HERE)

MODELING_FILE = os.path.join(HERE, "modeling_sdt.py")  # the module `auto_map` names
EXPORT_FILES = (MODELING_FILE, os.path.join(HERE, "layers_sdt.py"))  # written for the export
PACKAGE_FILES = tuple(os.path.join(PACKAGE_DIR, "blocks", name) for name in ("layers.py", "kv_cache.py")) + tuple(
    os.path.join(PACKAGE_DIR, "routing", name)
    for name in (
        "priors.py",
        "surprise.py",
        "students.py",
        "routers.py",
        "quantiles.py",
        "topk.py",
        "gates.py",
        "skip_maps.py",
    )
)
SHIPPED_FILES = EXPORT_FILES + PACKAGE_FILES  # copied to the export under their base names

__path__ += sorted({os.path.dirname(path) for path in PACKAGE_FILES})
