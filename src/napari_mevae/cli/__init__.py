"""The ``mevae`` command: the reference's flags and folder layout, its outputs, its defects fixed.

mevae train   --data_dir InputImages1/ --input2_dir InputImages2/ --out1_dir OutputImages/ ...
mevae train   --targets OutputImages/ --nuisances rotation,polarity ...   (fresh pairs each epoch)
mevae encode  --checkpoint Outputs/ --data_dir NewCells/ --out encodings.csv
mevae pairs   --image IMG.tif --labels LABELS.tif --out DIR
mevae evaluate --checkpoint Outputs/ --targets OutputImages/ --out report.json
mevae export  --checkpoint Outputs/ --out model.zip --authors "..."   (BioImage Model Zoo)
mevae demo    [--out mevae-demo]
mevae crop    --image 'fields/*.tif' --labels 'fields/*_labels.tif' --out STORE   (whole screens)
mevae features --checkpoint Outputs/ --cells STORE --out features.parquet --umap --clusters 8
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence

from .commands import cmd_demo, cmd_encode, cmd_evaluate, cmd_export, cmd_pairs
from .common import _one_line, explain
from .parser import build_parser
from .screens import cmd_crop, cmd_features
from .train import cmd_train

__all__ = ["COMMANDS", "build_parser", "explain", "main"]

log = logging.getLogger("mevae")


COMMANDS = {
    "train": cmd_train,
    "encode": cmd_encode,
    "pairs": cmd_pairs,
    "evaluate": cmd_evaluate,
    "export": cmd_export,
    "demo": cmd_demo,
    "crop": cmd_crop,
    "features": cmd_features,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("MEVAE_DEBUG", "") not in ("", "0")
    logging.basicConfig(level=logging.WARNING, format="mevae: %(message)s")
    start = time.perf_counter()
    prefix = f"mevae {args.command}"
    with warnings.catch_warnings():
        if not debug:  # warnings in one line too, not file:line + source

            def show(message, category, filename, lineno, file=None, line=None) -> None:
                print(f"{prefix}: warning: {_one_line(message)}", file=sys.stderr, flush=True)

            warnings.showwarning = show
        try:
            code = COMMANDS[args.command](args)
        except KeyboardInterrupt:
            if debug:
                raise
            print(
                f"{prefix}: interrupted: files being written were left as they were",
                file=sys.stderr,
            )
            return 130
        except Exception as err:
            message = None if debug else explain(err)
            if message is None:
                raise
            print(f"{prefix}: error: {message}", file=sys.stderr)
            return 2
    log.info("done in %.1f s", time.perf_counter() - start)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
