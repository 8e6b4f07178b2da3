"""`python -m qpeft.build`: prebuild the CUDA extension and print where it went.

Without a GPU, set TORCH_CUDA_ARCH_LIST (e.g. 9.0): the extension is compiled and linked (CI does
this to catch compile and link errors); loading it needs no GPU, running it does.
"""
from __future__ import annotations

import sys

from . import _jit


def main(argv: list[str] | None = None) -> int:
    try:
        out = _jit.load()
    except Exception as e:
        print(f"qpeft: CUDA extension build failed: {e}", file=sys.stderr)
        return 1
    import torch

    libs = sorted(out.glob("*.so"))
    print(f"qpeft_C built in {out}")
    for lib in libs:
        print(f"  {lib}")
    ops = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("qpeft_C::"))
    print(f"registered raw ops: {', '.join(ops) if ops else '(none)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
