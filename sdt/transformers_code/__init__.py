"""The code a routed Hugging Face export ships next to its `config.json`: the package's own modules and a thin wrapper.

A routed export (`python -m sdt.export`) loads with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
and runs the package's own model: `modeling_sdt.py` here is a thin `transformers` wrapper (config, `PreTrainedModel`
and `GenerationMixin` adapter, the package's `ModelCache` as generate's cache) around the `LanguageModel` that
`sdt.models.build_model` assembles, with its `RoutedLayer`s and SDT / STT / MoD hooks, its routing and its blocks.
There is no second implementation of the routed forward to drift from the one `sdt` trains.

How the package's modules ship (shipping.py). transformers' dynamic-module loader copies the modeling file together
with the files it imports by a flat sibling import (`from .name import ...`), recursively, and checks that every
other import names an installed package. The package is layered into subpackages (`sdt.blocks`, `sdt.routing`,
`sdt.models`, ...) that import each other absolutely (`from sdt.routing.topk import topk_indices`), which is what
the layering checks (tests/test_architecture.py) read and what lets a module move between layers. So the export
rewrites exactly one thing, mechanically: each import line of an `sdt` module becomes the import of its flat
sibling (`from .topk import topk_indices`), and every module ships under its last name (a package's `__init__.py`
under the package's name). Nothing else in a shipped file changes; tests/test_export_code.py checks that line by
line, and that the export loads in an interpreter where `import sdt` fails. The alternative, relative imports in the
package itself, would need every shipped module in one flat package directory, i.e. giving up the layering.

The shipped modules may import only the standard library, torch and each other (the wrapper also transformers):
`shipped_modules()` follows the imports from the wrapper and refuses (ShippingError, which `python -m sdt.export`
reports as one line) a module that would not load flat.
"""

from sdt.transformers_code.shipping import MODELING_FILE, ShippingError, shipped_modules, shipped_sources

__all__ = ["MODELING_FILE", "ShippingError", "shipped_modules", "shipped_sources"]
