"""Make the CPU vLLM stack importable after pip has installed it (docs/development.md, trap 1).

PyPI's torchvision is a CUDA build whose native ops cannot load beside the CPU torch.
Its import dies on two unguarded `register_fake("torchvision::nms"/"qnms")` decorators;
guard them with `torchvision.extension._has_ops()` as torchvision does for every other op.
Idempotent: run it after every install. (torchaudio/torchcodec are uninstalled by the Makefile.)
"""

import importlib.util
import pathlib

spec = importlib.util.find_spec("torchvision")
assert spec and spec.origin, "torchvision is not installed"
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
text = path.read_text()
for op in ("nms", "qnms"):
    plain = f'@torch.library.register_fake("torchvision::{op}")'
    guarded = (
        f'@(torch.library.register_fake("torchvision::{op}") '
        "if torchvision.extension._has_ops() else (lambda fn: fn))"
    )
    if plain + "\n" in text:
        text = text.replace(plain + "\n", guarded + "\n")
path.write_text(text)
print(f"torchvision meta registrations guarded: {path}")
