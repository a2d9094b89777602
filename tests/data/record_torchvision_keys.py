"""Record torchvision's state-dict keys and shapes for the ImageNet DenseNets and
ResNets into torchvision_keys.txt.gz, which tests/test_pretrained.py checks minidense's
mapping against (so the default suite needs no torchvision).

    python tests/data/record_torchvision_keys.py        # needs torch and torchvision

Recorded from torchvision 0.29.1.  Beside a torch it was not built for, ``import
torchvision`` fails in its C++ operators' meta registrations ("operator torchvision::nms
does not exist"), which the models do not use; this script then skips that module.  The
models are built on the "meta" device: shapes without memory or random numbers.
"""
import gzip
import sys
import types
from pathlib import Path

MODELS = ("densenet121", "densenet161", "densenet169", "densenet201",
          "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def import_torchvision():
    try:
        import torchvision
    except RuntimeError:  # the mismatched C++ extension: import without its meta registrations
        for name in [n for n in sys.modules if n.startswith("torchvision")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision
    return torchvision


def main():
    import torch
    torchvision = import_torchvision()
    lines = [f"# torchvision {torchvision.__version__}: every state_dict key of its ImageNet "
             f"DenseNets and ResNets, with its shape ('-' for a 0-d counter)"]
    for name in MODELS:
        with torch.device("meta"):
            state = getattr(torchvision.models, name)().state_dict()
        lines.append(f"[{name}] {len(state)}")
        lines += [f"{key} {'x'.join(map(str, value.shape)) or '-'}" for key, value in state.items()]
    path = Path(__file__).with_name("torchvision_keys.txt.gz")
    # mtime=0: the same keys give the same bytes
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
