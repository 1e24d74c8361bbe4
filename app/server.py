"""Serve the page: python -m app [--host 127.0.0.1] [--port 7860] [--checkpoint CKPT ...]
[--exp exp] [--device cpu] [--max-upload-mb 20]   (make app APP_ARGS="...")

Lists every checkpoint under --exp (the demo's best.pth first) and those given with
--checkpoint; opens no other file. Binds 127.0.0.1 (this machine only) unless --host says
otherwise, and prints the address. Gradio's usage statistics and update check are off, and the
page loads nothing from outside (no web fonts, no share link).
"""
from __future__ import annotations

import argparse
import os

from app.catalog import Catalog
from app.page import build_page, theme
from util.errors import CheckpointError, UserError

DEFAULT_PORT = 7860


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (0.0.0.0: every interface, reachable from other machines)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to serve on")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="CKPT",
                        help="a checkpoint to offer besides those under --exp (repeat for more)")
    parser.add_argument("--exp", default="exp", help="folder searched for .pth checkpoints")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest file the page accepts, in MB")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port} is not a port; use 1..65535")
    if args.max_upload_mb <= 0:
        parser.error("--max-upload-mb must be positive")
    return args


def build_catalog(args) -> Catalog:
    for path in args.checkpoint:
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint '{path}' (--checkpoint) does not exist; check the path")
    catalog = Catalog.scan(args.exp, tuple(args.checkpoint), args.device)
    if not catalog.entries:
        raise CheckpointError(f"no checkpoint under '{args.exp}' and none given: run make demo (it trains "
                              f"exp/synthetic/split0_resnet18/model/best.pth), or pass --checkpoint CKPT")
    return catalog


def serve(args, block: bool = True):
    """Build the page and serve it; returns (blocks, url). ``block=False`` returns at once and
    leaves the server running in a thread (the tests: ``blocks.close()`` stops it)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"      # no usage statistics, no update check
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    catalog = build_catalog(args)
    max_bytes = int(args.max_upload_mb * 2**20)
    blocks = build_page(catalog, max_bytes)
    try:
        _, url, _ = blocks.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False,
                                  max_file_size=max_bytes, ssr_mode=False, mcp_server=False, theme=theme(),
                                  quiet=True, show_error=False, prevent_thread_lock=True)
    except OSError as e:
        raise UserError(f"cannot serve on {args.host}:{args.port} ({e}); pass another --port "
                        f"(make app APP_ARGS=\"--port 7861\")") from None
    usable = sum(1 for e in catalog.entries if not e.problem)
    print(f"app: serving {url} ({usable} checkpoint(s); Ctrl-C stops it)", flush=True)
    if block:
        try:
            blocks.block_thread()
        finally:
            blocks.close()
    return blocks, url


def main(argv=None):
    serve(parse(argv))
