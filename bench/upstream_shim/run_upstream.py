"""python bench/upstream_shim/run_upstream.py SCRIPT [ARGS]: run one of diffusers' example scripts
unmodified, with the torchvision stand-in in stand_in/ importable by the script alone.

transformers and diffusers decide once, when first asked, whether torchvision is installed; they
are asked here before the stand-in exists, so they keep their torchvision-free paths, as in our
own runs. Only then does `import torchvision` find the stand-in, and the script runs as __main__.
"""

import os
import runpy
import sys


def main() -> None:
    import diffusers.utils.import_utils as diffusers_imports
    import transformers.utils.import_utils as transformers_imports

    transformers_imports.is_torchvision_available()
    diffusers_imports.is_torchvision_available()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "stand_in"))
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
