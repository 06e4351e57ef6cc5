"""Code that ships inside exports: `modeling_sdt.py` and the `layers_sdt.py` it imports are copied next to a routed
export's `config.json`.

It imports only torch and transformers (never `sdt`), so an export loads with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` where `sdt` is not installed.
"""

import os

MODELING_FILE = os.path.join(os.path.dirname(__file__), "modeling_sdt.py")  # the module `auto_map` names
SHIPPED_FILES = (MODELING_FILE, os.path.join(os.path.dirname(__file__), "layers_sdt.py"))
