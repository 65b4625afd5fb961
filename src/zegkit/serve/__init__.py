"""`zegkit serve`: a browser page for segmenting any image with any vocabulary.

    pip install "zegkit[web]"
    zegkit serve --model zegkit/tiny-synthetic            # then open http://127.0.0.1:7860

The page drives the library's own API (`load_segmenter`, `Segmenter`, `Segmentation.save`,
`zegkit.viz`); `engine.py` holds that logic without Gradio, `app.py` the Gradio page. Importing this
package does not import Gradio, so `zegkit serve --help` works without the extra.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import tempfile
from pathlib import Path

# Upload caps; --max-upload-mb / --max-pixels raise them.
DEFAULT_MAX_UPLOAD_MB = 20
DEFAULT_MAX_PIXELS = 2048 * 2048  # 4.2 MP: the protocol caps the long side at 2048 anyway
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860  # Gradio's usual port
INSTALL_HINT = 'zegkit serve needs the web extra: pip install "zegkit[web]" (it pins Gradio).'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `zegkit serve` flags, model flags included (the same as `zegkit segment`'s)."""
    from zegkit.cli import add_model_arguments

    group = parser.add_argument_group("server")
    group.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to bind (default: {DEFAULT_HOST})"
    )
    group.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: 7860)")
    group.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder: every written and served file lives here "
        "(default: a new temporary folder)",
    )
    group.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_MB,
        help=f"largest upload in megabytes (default: {DEFAULT_MAX_UPLOAD_MB})",
    )
    group.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"largest image in pixels, width x height (default: {DEFAULT_MAX_PIXELS})",
    )
    group.add_argument(
        "--extra-model",
        action="append",
        default=[],
        metavar="MODEL",
        help="another model the page offers, repeatable (default: --model and "
        "zegkit/tiny-synthetic)",
    )
    group.add_argument(
        "--extra-checkpoint",
        action="append",
        default=[],
        metavar="FILE",
        help="another trained method's checkpoint the page offers, repeatable (default: none)",
    )
    group.add_argument(
        "--custom-paths",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let the page type any model id or checkpoint path the server can read "
        "(default: on for a loopback --host, off otherwise)",
    )
    add_model_arguments(parser)


def is_loopback(host: str) -> bool:
    """Whether `host` binds to this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> None:
    """Serve the page until interrupted.

    Raises:
        RuntimeError: the web extra is not installed (the message says how to install it).
        ValueError: bad caps.
    """
    from zegkit.backbone.loading import SHIPPED_MODELS
    from zegkit.cli import user_settings
    from zegkit.methods import METHODS
    from zegkit.refine import list_refiners
    from zegkit.serve.engine import SegmenterPool, UploadLimits

    if args.max_upload_mb <= 0 or args.max_pixels <= 0:
        raise ValueError("--max-upload-mb and --max-pixels must be positive.")
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="zegkit-serve-"))
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Gradio reads these when it builds the page and stores uploads: its cache (uploads and the
    # copies of the files it serves) goes inside the output folder; no usage reporting.
    os.environ["GRADIO_TEMP_DIR"] = str(out_dir / "gradio")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        from zegkit.serve.app import ServeConfig, launch
    except ImportError as error:
        if "gradio" not in str(error):
            raise
        raise RuntimeError(INSTALL_HINT) from None

    settings = user_settings(args)
    refine = str(settings.pop("refine", "none"))
    models = list(dict.fromkeys([args.model, *args.extra_model, *SHIPPED_MODELS]))
    # --checkpoint comes with the model flags (where the CLI defines it), the others from here.
    given = [getattr(args, "checkpoint", None), *args.extra_checkpoint]
    checkpoints = [str(Path(path).resolve()) for path in given if path]
    config = ServeConfig(
        out_dir=out_dir,
        pool=SegmenterPool(
            device=args.device,
            tokenizer=args.tokenizer,
            templates=args.templates,
            settings=settings,
        ),
        limits=UploadLimits(int(args.max_upload_mb * 2**20), args.max_pixels),
        methods=sorted(METHODS),
        method=args.method,
        models=models,
        checkpoints=checkpoints,
        refiners=list(dict.fromkeys([refine, *list_refiners()])),
        refine=refine,
        custom_paths=is_loopback(args.host) if args.custom_paths is None else args.custom_paths,
    )
    print(f"zegkit serve: files go to {out_dir}")
    launch(config, args.host, args.port)
